// Public API of sppo-engine.
export { Model, presetConfig, setNumThreads, numThreads, type PresetName } from './engine/model.js';
export { native } from './engine/native.js';
export { PREFERENCE_LOSSES } from './engine/preference.js';
export type * from './engine/types.js';
