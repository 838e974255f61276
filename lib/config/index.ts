// The run configuration: schema, loading, hashing and diffing.
export * from './schema.js';
export * from './load.js';
