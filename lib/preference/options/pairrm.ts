// The PairRM judge's options in a run configuration (preference.kind 'pairrm': the SPPO paper's
// judge, llm-blender/PairRM, on the engine) and its defaults. A leaf (zod and the config's field
// helpers only), so lib/config can compose it.
import { z } from 'zod';
import { filePath, positiveInt } from '../../config/fields.js';
import { callTimeoutMs, ENGINE_JUDGE_DEFAULTS, judgeConcurrency, maxUnusableFraction } from './common.js';

/** How P̂ is made from the ordered comparisons C[i,j] = f(x, y_i, y_j). */
export const PAIRRM_AGGREGATIONS = ['sppo', 'pair'] as const;
export type PairRMAggregation = (typeof PAIRRM_AGGREGATIONS)[number];

/**
 * The encoder's storage type. 'fp32': float32 weights and activations (the reference's
 * precision; on CUDA its GEMMs are full fp32, no TF32); 'bf16': bf16 weights and activations,
 * fp32 math, CUDA only (half the memory, tensor-core GEMMs); 'auto': fp32 on the CPU, bf16 on CUDA.
 */
export const PAIRRM_PRECISIONS = ['auto', 'fp32', 'bf16'] as const;
export type PairRMPrecision = (typeof PAIRRM_PRECISIONS)[number];

export const PAIRRM_DEFAULTS = Object.freeze({
  /** ordered comparisons per forward pass */
  batchSize: 4,
  /** PairRM's input budget: source + 2 candidates (llm-blender: 1224 + 2·412) */
  maxSeq: 2048,
  /** the source's share, its [CLS], <|source|> and [SEP] included */
  sourceMaxTokens: 1224,
  aggregation: 'sppo',
  precision: 'auto',
  callTimeoutMs: ENGINE_JUDGE_DEFAULTS.callTimeoutMs,
});

export const pairrmOptionsSchema = z
  .strictObject({
    kind: z
      .literal('pairrm')
      .describe("PairRM (llm-blender/PairRM, the SPPO paper's judge) on the engine's DeBERTa-v3 encoder, every ordered pair compared"),
    path: filePath().describe(
      'a PairRM directory: config.json, model.safetensors (float32, pretrained_model.* and head_layer.*) and tokenizer.json',
    ),
    aggregation: z
      .enum(PAIRRM_AGGREGATIONS, { error: `must be one of ${PAIRRM_AGGREGATIONS.join(', ')}` })
      .default(PAIRRM_DEFAULTS.aggregation)
      .describe(
        "'sppo': the reference's P̂[i,j] = σ(s_i − s_j) with s_i = (1/K)·Σ_j (C[i,j] − C[j,i]); 'pair': P[i,j] = ½(σ(C[i,j]) + σ(−C[j,i])), each pair on its own",
      ),
    batchSize: positiveInt().default(PAIRRM_DEFAULTS.batchSize).describe('ordered comparisons per forward pass'),
    precision: z
      .enum(PAIRRM_PRECISIONS, { error: `must be one of ${PAIRRM_PRECISIONS.join(', ')}` })
      .default(PAIRRM_DEFAULTS.precision)
      .describe(
        "the encoder's storage: 'fp32' (float32, the reference's precision; full fp32 GEMMs on CUDA too), 'bf16' (bf16 weights and activations with fp32 math: half the memory and faster GEMMs, CUDA only), 'auto' (fp32 on the CPU, bf16 on CUDA); the device is the run's",
      ),
    maxSeq: positiveInt()
      .min(16, { error: 'must be ≥ 16 (a source and two candidates need room)' })
      .default(PAIRRM_DEFAULTS.maxSeq)
      .describe('tokens of one comparison (source + two candidates); each candidate gets (maxSeq − source tokens) // 2'),
    sourceMaxTokens: positiveInt()
      .default(PAIRRM_DEFAULTS.sourceMaxTokens)
      .describe(
        'tokens of the source (the prompt after the policy’s chat template), its three special tokens included; longer ones are cut at the right',
      ),
    concurrency: judgeConcurrency(),
    callTimeoutMs: callTimeoutMs(PAIRRM_DEFAULTS.callTimeoutMs, 'one forward pass of the judge model'),
    maxUnusableFraction: maxUnusableFraction(),
  })
  .describe('the PairRM judge');
