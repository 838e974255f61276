// Prompt sets and seeded randomness.
export * from './prompts.js';
export * from './random.js';
