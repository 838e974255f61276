// The engine's PairRM against transformers' DebertaV2Model (test/pairrm_transformers_check.py),
// in PairRM's config shape (DeBERTa-v3-large: 24 layers of 1024, 16 heads, 256 log buckets) with
// random weights, in both directions of loading: a checkpoint transformers made loads into the
// engine with the same hidden states, head logits and P̂; a checkpoint written by this package
// (names from the issue) loads into transformers with load_state_dict(strict) and the same
// logits; where a GPU is usable, the judge on CUDA at both precisions too (fp32 to the CPU's
// tolerance, bf16 to its own). Runs in the GPU job (bench/gpu/run.sh), whose machine has
// transformers.
//
// Skipped, with a message, where the python (SPPO_PYTHON, default /usr/bin/python3) cannot
// import torch, transformers and safetensors.
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { cudaInfo } from '../lib/engine/model.js';
import type { Device } from '../lib/engine/model.js';
import { loadPairRM, loadPairRMEncoder, pairrmMatrix, type PairRMPrecision } from '../lib/preference/index.js';
import { PAIRRM_LARGE, tinyDebertaTokenizer, writePairRMDir } from './fixtures/pairrm-fixture.js';

const PYTHON = process.env.SPPO_PYTHON ?? '/usr/bin/python3';
const SCRIPT = path.join(path.dirname(fileURLToPath(import.meta.url)), 'pairrm_transformers_check.py');
/**
 * max |engine − transformers| / max |transformers|, by the engine's precision: float32 on both
 * sides (the CPU, or CUDA's fp32 encoder, whose GEMMs use no TF32) to float rounding through 24
 * layers; bf16 storage (8 bits of mantissa, every op's output rounded) through 24 layers to 5e-2.
 */
const TOLERANCE = { fp32: 1e-4, bf16: 5e-2 } as const;

const probe = spawnSync(PYTHON, ['-c', 'import torch, transformers, safetensors'], { encoding: 'utf8', timeout: 120_000 });
const HAVE = probe.status === 0;
if (!HAVE)
  console.warn(
    `pairrm-transformers: SKIPPED — ${PYTHON} cannot import torch, transformers and safetensors ` +
      `(${(probe.stderr || probe.error?.message || 'not found').trim().split('\n').pop()}); the GPU job runs it.`,
  );

function python(args: string[]): void {
  const r = spawnSync(PYTHON, [SCRIPT, ...args], { encoding: 'utf8', timeout: 600_000 });
  if (r.status !== 0) throw new Error(`pairrm_transformers_check.py ${args[0]} failed (${r.status}):\n${r.stderr}`);
  console.log(r.stdout.trim());
}

function relativeError(ours: ArrayLike<number>, theirs: ArrayLike<number>): number {
  let diff = 0;
  let scale = 0;
  for (let i = 0; i < theirs.length; i++) {
    diff = Math.max(diff, Math.abs(ours[i] - theirs[i]));
    scale = Math.max(scale, Math.abs(theirs[i]));
  }
  return diff / scale;
}

const PROMPT = 'hello, the question of the world?';
const RESPONSES = ['the answer is good', 'a better answer, of the world', 'hello hello', 'the best answer'];

/** The engine's C over every ordered pair, and transformers' logits on the same rows. */
async function bothSides(
  dir: string,
  out: string,
): Promise<{ ours: number[][]; theirs: number[][]; rows: { ids: number[]; pool: number[] }[] }> {
  const judge = await loadPairRM(dir, { batchSize: 4, device: 'cpu', precision: 'fp32' });
  try {
    const rows: { ids: number[]; pool: number[] }[] = [];
    for (let i = 0; i < RESPONSES.length; i++)
      for (let j = 0; j < RESPONSES.length; j++) if (i !== j) rows.push(judge.comparisonIds(PROMPT, RESPONSES[i], RESPONSES[j]));
    const ours = await judge.comparisons(PROMPT, RESPONSES);
    const rowsFile = path.join(out, `${path.basename(dir)}-rows.json`);
    const outFile = path.join(out, `${path.basename(dir)}-transformers.json`);
    writeFileSync(rowsFile, JSON.stringify(rows));
    python(['run', dir, rowsFile, outFile]);
    const { logits } = JSON.parse(readFileSync(outFile, 'utf8')) as { logits: number[] };
    const K = RESPONSES.length;
    const theirs = Array.from({ length: K }, () => new Array<number>(K).fill(0));
    let n = 0;
    for (let i = 0; i < K; i++) for (let j = 0; j < K; j++) if (i !== j) theirs[i][j] = logits[n++];
    return { ours, theirs, rows };
  } finally {
    await judge.dispose();
  }
}

describe.skipIf(!HAVE)('PairRM: transformers ↔ engine', () => {
  const out = mkdtempSync(path.join(tmpdir(), 'sppo-pairrm-hf-'));
  afterAll(() => rmSync(out, { recursive: true, force: true }));
  const { json, vocabSize } = tinyDebertaTokenizer();

  it("loads transformers' checkpoint: the same hidden states, head logits and P̂", { timeout: 900_000 }, async () => {
    const dir = path.join(out, 'from-transformers');
    python(['make', dir, String(vocabSize), String(PAIRRM_LARGE.layers)]);
    writeFileSync(path.join(dir, 'tokenizer.json'), JSON.stringify(json));
    const { ours, theirs, rows } = await bothSides(dir, out);
    const { hidden: reference } = JSON.parse(readFileSync(path.join(out, 'from-transformers-transformers.json'), 'utf8')) as {
      hidden: number[];
    };
    // the hidden states of the first row, straight from the encoder
    const hiddenError = async (device: Device, precision: PairRMPrecision): Promise<number> => {
      const { encoder } = await loadPairRMEncoder(dir, { maxBatch: 1, maxSeq: rows[0].ids.length }, device, precision);
      try {
        const r = rows[0];
        const { hidden } = await encoder.pairrm(
          Int32Array.from(r.ids),
          Int32Array.of(r.ids.length),
          Int32Array.from(r.pool),
          1,
          r.ids.length,
          true,
        );
        return relativeError(hidden!, reference);
      } finally {
        encoder.dispose();
      }
    };
    const report = (where: string, H: number, C: number, P: number, tolerance: number): void => {
      console.log(
        `transformers → engine ${where}: hidden ${H.toExponential(2)}, logits ${C.toExponential(2)}, P̂ ${P.toExponential(2)} (tolerance ${tolerance})`,
      );
      expect(H).toBeLessThan(tolerance);
      expect(C).toBeLessThan(tolerance);
      expect(P).toBeLessThan(tolerance);
    };
    report(
      'on the CPU (fp32)',
      await hiddenError('cpu', 'fp32'),
      relativeError(ours.flat(), theirs.flat()),
      relativeError(pairrmMatrix(ours).flat(), pairrmMatrix(theirs).flat()),
      TOLERANCE.fp32,
    );
    if (!cudaInfo().available) return;
    // the same judge on the GPU at both precisions
    for (const precision of ['fp32', 'bf16'] as const) {
      const gpu = await loadPairRM(dir, { batchSize: 4, device: 'cuda', precision });
      try {
        expect(gpu.precision).toBe(precision);
        const onGpu = await gpu.comparisons(PROMPT, RESPONSES);
        report(
          `on CUDA (${precision})`,
          await hiddenError('cuda', precision),
          relativeError(onGpu.flat(), theirs.flat()),
          relativeError(pairrmMatrix(onGpu).flat(), pairrmMatrix(theirs).flat()),
          TOLERANCE[precision],
        );
      } finally {
        await gpu.dispose();
      }
    }
  });

  it('writes a checkpoint transformers loads strictly, with the same logits and P̂', { timeout: 900_000 }, async () => {
    const dir = path.join(out, 'from-engine');
    await writePairRMDir(dir, PAIRRM_LARGE);
    const { ours, theirs } = await bothSides(dir, out);
    const C = relativeError(ours.flat(), theirs.flat());
    const P = relativeError(pairrmMatrix(ours).flat(), pairrmMatrix(theirs).flat());
    console.log(`engine → transformers: logits ${C.toExponential(2)}, P̂ ${P.toExponential(2)}`);
    expect(C).toBeLessThan(TOLERANCE.fp32);
    expect(P).toBeLessThan(TOLERANCE.fp32);
  });
});
