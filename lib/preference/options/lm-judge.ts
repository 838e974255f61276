// The LM judge's options in a run configuration (preference.kind 'lm-judge') and its defaults.
// A leaf (zod and the config's field helpers only), so lib/config can compose it.
import { z } from 'zod';
import { filePath, nonEmpty } from '../../config/fields.js';
import { ENGINE_JUDGE_DEFAULTS, engineJudgeFields } from './common.js';
import { judgeTemplate } from './http.js';

export const LM_JUDGE_DEFAULTS = Object.freeze({
  answerTokens: Object.freeze(['A', 'B'] as const),
  chatTemplate: true,
  ...ENGINE_JUDGE_DEFAULTS,
});

export const lmJudgeOptionsSchema = z
  .strictObject({
    kind: z.literal('lm-judge').describe('a causal LM on the engine, read as P(first is better) from its next-token distribution'),
    path: filePath().describe('a Hugging Face causal LM directory with tokenizer.json (and a chat template unless chatTemplate is false)'),
    template: judgeTemplate().optional(),
    answerTokens: z
      .tuple([nonEmpty(), nonEmpty()])
      .default([...LM_JUDGE_DEFAULTS.answerTokens])
      .describe("the next tokens read as 'the first is better' and 'the second is better'"),
    chatTemplate: z
      .boolean()
      .default(LM_JUDGE_DEFAULTS.chatTemplate)
      .describe("format the question through the judge tokenizer's chat template"),
    ...engineJudgeFields('judge', 'a longer question keeps its first token (BOS) and its last tokens'),
  })
  .describe('the LM judge');
