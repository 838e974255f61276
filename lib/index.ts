// Public API of sppo-engine.
export { Model, presetConfig, setNumThreads, numThreads, type PresetName } from './engine/model.js';
export { native } from './engine/native.js';
export {
  Generator,
  type GenerateOptions,
  type GeneratedSequence,
  type GeneratedToken,
  type GeneratorPlan,
  type PromptTokens,
  type StopReason,
} from './engine/generate.js';
export { PREFERENCE_LOSSES } from './engine/preference.js';
export type * from './engine/types.js';
export { loadPretrained, savePretrained, CheckpointError, type LoadOptions, type Pretrained, type SaveOptions } from './io/checkpoint.js';
export { engineConfigFromHf, hfConfigFromEngine, ConfigError, type Architecture, type HfConfig, type FromHfOptions, type ToHfOptions } from './io/hf-config.js';
export {
  readSafetensors, writeSafetensors, parseSafetensorsHeader, SafetensorsFile, ReadScratch, SafetensorsError, float32ToBf16, MAX_HEADER_BYTES,
  type LoadedTensor, type SafetensorsHeader, type TensorInfo, type TensorSource, type WriteDtype, type WriteOptions,
} from './io/safetensors.js';
export { CheckpointWeights, WEIGHTS_NAME, WEIGHTS_INDEX_NAME, DEFAULT_MAX_SHARD_BYTES } from './io/weights.js';
export { Tokenizer, TokenizerError, type ChatMessage, type ChatTemplateOptions, type TokenizerFiles } from './io/tokenizer.js';
