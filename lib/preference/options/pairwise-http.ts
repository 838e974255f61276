// The pairwise HTTP judge's options in a run configuration (preference.kind 'pairwise-http'):
// any ranker served over HTTP that takes {prompt, responses} and answers a K×K matrix or
// per-pair probabilities. A leaf (zod and the config's field helpers only), so lib/config can
// compose it; the transport's fields are the HTTP judge's own.
import { z } from 'zod';
import { judgeConcurrency, maxUnusableFraction } from './common.js';
import { httpTransportFields, httpUrl } from './http.js';

export const pairwiseHttpOptionsSchema = z
  .strictObject({
    kind: z
      .literal('pairwise-http')
      .describe(
        'a ranker behind an HTTP endpoint: POST {prompt, responses} answered by {matrix: K×K, P(i ≻ j)} or {pairs: [{i, j, p}, …]} (answers cached on disk)',
      ),
    url: httpUrl().describe('where each prompt’s {prompt, responses} is POSTed (JSON); no credentials (user:password@) in it'),
    ...httpTransportFields(
      'a matrix or pairs of the right size, and answers with an entry that is not a probability in [0, 1]',
      'prompt whose answer was fully usable (the matrix)',
    ),
    concurrency: judgeConcurrency(),
    maxUnusableFraction: maxUnusableFraction(),
  })
  .describe('the pairwise HTTP judge');
