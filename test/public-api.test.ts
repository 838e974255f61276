// The package's public surface, written out by hand: adding, removing or renaming a runtime
// export shows up as a diff of this list, to be made on purpose. Types are checked by tsc.
import { describe, expect, it } from 'vitest';
import * as api from '../lib/index.js';

const RUNTIME_EXPORTS = [
  // classes and errors
  'AdapterError',
  'CharTokenizer',
  'CheckpointError',
  'CheckpointWeights',
  'ConfigError',
  'Generator',
  'JudgeTimeoutError',
  'Model',
  'PreferenceError',
  'RewardModelError',
  'RunConfigError',
  'RunDir',
  'RunDirError',
  'SafetensorsError',
  'SafetensorsFile',
  'SetupError',
  'Tokenizer',
  'TokenizerError',
  'UnusableVerdictsError',
  // constants
  'ADAPTER_CONFIG_NAME',
  'ADAPTER_WEIGHTS_NAME',
  'DEFAULT_JUDGE_TEMPLATE',
  'DEFAULT_MAX_SHARD_BYTES',
  'DEFAULT_STYLED_REVERSAL',
  'LORA_TARGETS',
  'MEMORY_CATEGORIES',
  'PREFERENCE_LOSSES',
  'WEIGHTS_INDEX_NAME',
  'WEIGHTS_NAME',
  // the engine
  'cudaInfo',
  'formatMemoryPlan',
  'numThreads',
  'presetConfig',
  'resolveConfig',
  'setNumThreads',
  // checkpoints and files
  'engineConfigFromHf',
  'float32ToBf16',
  'hfConfigFromEngine',
  'loadAdapter',
  'loadPretrained',
  'loraTensorShapes',
  'mergeAdapter',
  'parseSafetensorsHeader',
  'readSafetensors',
  'saveAdapter',
  'savePretrained',
  'writeSafetensors',
  // preference models
  'assertPreferenceMatrix',
  'definePreferenceModel',
  'dualityGap',
  'functionPreference',
  'httpJudge',
  'idealAnswer',
  'lmJudge',
  'loadLmJudge',
  'loadRewardModel',
  'nashStyles',
  'oraclePreference',
  'randomWords',
  'rewardModelJudge',
  'styleOf',
  'styledReversalOracle',
  'styledReversalQuality',
  'summarizeAnswers',
  'preferenceFromConfig',
  // each judge's options in a run configuration (zod schemas)
  'functionJudgeOptionsSchema',
  'httpJudgeOptionsSchema',
  'lmJudgeOptionsSchema',
  'rewardModelOptionsSchema',
  'styledReversalOptionsSchema',
  // the SPPO pipeline, its configuration, the demo and the report
  'buildTrainingSet',
  'configHash',
  'datasetModeForLoss',
  'demoConfigInput',
  'demoPolicyText',
  'demoSetup',
  'diffConfigs',
  'loadConfig',
  'loadPrompts',
  'multiplicativeWeightsStep',
  'parseConfig',
  'readMetrics',
  'runDemo',
  'runSppo',
  'setupFromConfig',
  'splitPrompts',
  'winRates',
  'writeReport',
];

describe('the public API (lib/index.ts)', () => {
  it('exports exactly the names written here', () => {
    expect(Object.keys(api).sort()).toEqual([...RUNTIME_EXPORTS].sort());
  });

  it('exports the reward-model judge the README advertises', () => {
    expect(typeof api.loadRewardModel).toBe('function');
    expect(typeof api.rewardModelJudge).toBe('function');
    expect(new api.RewardModelError('x')).toBeInstanceOf(Error);
  });

  it('does not export the raw native addon or reader internals', () => {
    for (const name of ['native', 'ReadScratch', 'MAX_HEADER_BYTES']) expect(Object.keys(api)).not.toContain(name);
  });
});
