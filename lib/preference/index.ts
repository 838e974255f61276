// Preference models: the interface, a JS-function judge, the styled-reversal oracle, and the HTTP, LM and reward-model judges.
export * from './matrix.js';
export * from './model.js';
export * from './function.js';
export * from './styled-reversal.js';
export * from './http.js';
export * from './lm-judge.js';
export * from './reward-model.js';
