// Preference models: the interface, a JS-function judge and the styled-reversal oracle.
export * from './matrix.js';
export * from './model.js';
export * from './function.js';
export * from './styled-reversal.js';
