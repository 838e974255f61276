// The run configuration: schema, loading, hashing and diffing, and the errors that name a field.
export * from './schema.js';
export * from './load.js';
export * from './errors.js';
