// The reward-model judge's options in a run configuration (preference.kind 'reward-model') and
// its defaults. A leaf (zod and the config's field helpers only), so lib/config can compose it.
import { z } from 'zod';
import { filePath, positive } from '../../config/fields.js';
import { ENGINE_JUDGE_DEFAULTS, engineJudgeFields } from './common.js';

export const REWARD_MODEL_DEFAULTS = Object.freeze({
  temperature: 1,
  ...ENGINE_JUDGE_DEFAULTS,
});

export const rewardModelOptionsSchema = z
  .strictObject({
    kind: z.literal('reward-model').describe('a scalar reward model on the engine: P_ij = σ((r_i − r_j)/τ)'),
    path: filePath().describe('a Hugging Face sequence-classification directory (num_labels 1) with tokenizer.json and a chat template'),
    temperature: positive().default(REWARD_MODEL_DEFAULTS.temperature).describe('τ of P_ij = σ((r_i − r_j)/τ)'),
    ...engineJudgeFields('reward-model', 'a longer conversation keeps its first token (BOS) and its last tokens'),
  })
  .describe('the reward-model judge');
