// Preference models: the interface, a JS-function judge, the styled-reversal oracle, and the HTTP, pairwise HTTP, LM, reward-model and PairRM judges.
export * from './matrix.js';
export * from './model.js';
export * from './function.js';
export * from './styled-reversal.js';
export * from './http.js';
export * from './pairwise-http.js';
export * from './lm-judge.js';
export * from './reward-model.js';
export * from './pairrm.js';
export * from './from-config.js';
// Each judge's options in a run configuration (zod schemas) and its defaults.
export * from './options/common.js';
export * from './options/function.js';
export * from './options/http.js';
export * from './options/lm-judge.js';
export * from './options/pairwise-http.js';
export * from './options/pairrm.js';
export * from './options/reward-model.js';
export { styledReversalOptionsSchema } from './options/styled-reversal.js';
