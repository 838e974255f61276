// The function judge's options in a run configuration (preference.kind 'function'). A leaf (zod
// and the config's field helpers only), so lib/config can compose it.
import { z } from 'zod';
import { filePath, nonEmpty } from '../../config/fields.js';
import { callTimeoutMs, judgeConcurrency, maxUnusableFraction } from './common.js';

export const FUNCTION_JUDGE_DEFAULTS = Object.freeze({
  /** one call of the function, in ms */
  callTimeoutMs: 300_000,
});

export const functionJudgeOptionsSchema = z
  .strictObject({
    kind: z.literal('function').describe('a JavaScript judge (prompt, a, b) => P(a ≻ b)'),
    module: filePath()
      .optional()
      .describe(
        'a JS module that exports the judge; required to build it from the config (a program may instead build its RunSetup with functionPreference)',
      ),
    export: nonEmpty().default('default').describe("the module's export that is the judge"),
    id: nonEmpty()
      .optional()
      .describe("the judge's id: change it whenever the function's behaviour changes (it is part of the config hash)"),
    concurrency: judgeConcurrency(),
    callTimeoutMs: callTimeoutMs(FUNCTION_JUDGE_DEFAULTS.callTimeoutMs, 'one call of the function (one pair of responses)'),
    maxUnusableFraction: maxUnusableFraction(),
  })
  .describe('the function judge');
