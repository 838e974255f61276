// Public API of sppo-engine.
export {
  Model,
  cudaInfo,
  presetConfig,
  resolveConfig,
  setNumThreads,
  numThreads,
  type CreateOptions,
  type Device,
  type PresetName,
} from './engine/model.js';
export { formatMemoryPlan, MEMORY_CATEGORIES, type GradientPrecision, type MemoryPlanReport, type PlanOptions } from './engine/memory.js';
export type { CudaInfo } from './engine/native.js';
export { LORA_TARGETS, type LoraOptions, type LoraTarget } from './engine/lora.js';
export {
  Generator,
  type GenerateOptions,
  type GeneratedSequence,
  type GeneratedToken,
  type GeneratorPlan,
  type ResolvedGeneratorPlan,
  type KvCacheState,
  type GenerateStats,
  type PromptTokens,
  type StopReason,
} from './engine/generate.js';
export { PREFERENCE_LOSSES, datasetModeForLoss, type DatasetMode } from './engine/losses.js';
export type * from './engine/types.js';
export { loadPretrained, savePretrained, CheckpointError, type LoadOptions, type Pretrained, type SaveOptions } from './io/checkpoint.js';
export {
  engineConfigFromHf,
  hfConfigFromEngine,
  ConfigError,
  type Architecture,
  type HfConfig,
  type FromHfOptions,
  type ToHfOptions,
} from './io/hf-config.js';
export {
  readSafetensors,
  writeSafetensors,
  parseSafetensorsHeader,
  SafetensorsFile,
  SafetensorsError,
  float32ToBf16,
  type LoadedTensor,
  type SafetensorsHeader,
  type TensorInfo,
  type TensorSource,
  type WriteDtype,
  type WriteOptions,
} from './io/safetensors.js';
export { CheckpointWeights, WEIGHTS_NAME, WEIGHTS_INDEX_NAME, DEFAULT_MAX_SHARD_BYTES } from './io/weights.js';
export {
  saveAdapter,
  loadAdapter,
  mergeAdapter,
  loraTensorShapes,
  AdapterError,
  ADAPTER_CONFIG_NAME,
  ADAPTER_WEIGHTS_NAME,
  type AdapterTensorShape,
  type LoadedAdapter,
  type LoraModelShape,
  type MergeOptions,
  type SaveAdapterOptions,
} from './io/peft.js';
export { Tokenizer, TokenizerError, type ChatMessage, type ChatTemplateOptions, type TokenizerFiles } from './io/tokenizer.js';
// The SPPO pipeline: preference models, win rates and training sets, prompt sets, the run
// configuration, the scheduler and the embedded demo.
export {
  definePreferenceModel,
  PreferenceError,
  UnusableVerdictsError,
  JudgeTimeoutError,
  assertPreferenceMatrix,
  functionPreference,
  httpJudge,
  lmJudge,
  loadLmJudge,
  rewardModelJudge,
  loadRewardModel,
  RewardModelError,
  styledReversalOracle,
  styledReversalQuality,
  styleOf,
  oraclePreference,
  dualityGap,
  nashStyles,
  randomWords,
  idealAnswer,
  summarizeAnswers,
  DEFAULT_STYLED_REVERSAL,
  DEFAULT_JUDGE_TEMPLATE,
  preferenceFromConfig,
  styledReversalOptionsSchema,
  functionJudgeOptionsSchema,
  httpJudgeOptionsSchema,
  lmJudgeOptionsSchema,
  rewardModelOptionsSchema,
  type PreferenceFromConfigOptions,
  type PreferenceModel,
  type PreferenceModelSpec,
  type CompareItem,
  type CompareOptions,
  type CompareBatchOptions,
  type Judgment,
  type BatchJudgment,
  type PreferenceFunction,
  type FunctionPreferenceOptions,
  type HttpJudge,
  type HttpJudgeOptions,
  type LmJudge,
  type LmJudgeOptions,
  type RewardModelJudge,
  type RewardModelOptions,
  type RewardModelStats,
  type StyledReversalParams,
  type PolicySummary,
} from './preference/index.js';
export { winRates, type WinRateDiagonal } from './sppo/winrates.js';
export { buildTrainingSet, type JudgedPrompt, type TrainingSet } from './sppo/dataset.js';
export { multiplicativeWeightsStep } from './sppo/multiplicative-weights.js';
export {
  runSppo,
  type RunSetup,
  type RunHooks,
  type RunResult,
  type IterationMetrics,
  type PolicyText,
  type StageName,
} from './sppo/run.js';
export { setupFromConfig, type SetupOptions } from './sppo/setup.js';
export { RunDir, RunDirError, type RunRecord, type StageOutput } from './sppo/run-dir.js';
export { loadPrompts, splitPrompts } from './data/prompts.js';
export { loadConfig, parseConfig, configHash, diffConfigs, RunConfigError, type ConfigIssue } from './config/load.js';
export { SetupError, type FieldPath } from './config/errors.js';
export type { RunConfig, RunConfigInput, PreferenceConfig } from './config/schema.js';
export { runDemo, demoConfigInput, demoSetup, type DemoOptions } from './demo/demo.js';
export { CharTokenizer, demoPolicyText } from './demo/task.js';
export { writeReport, readMetrics } from './report/report.js';
