// PairRM judge speed on the CPU: ordered comparisons per second at PairRM's 2048-token budget with
// K = 5 (one prompt, its 20 ordered pairs), the engine's judge (tokenization included) against
// the same encoder and head in plain PyTorch on the CPU (bench/pairrm_torch.py, given the same
// rows in the same batches), measured alternately in the same run. Random weights in
// DeBERTa-v3-large's shape (hidden 1024, 16 heads, FFN 4096, 256 buckets); --layers picks how many
// of its 24 layers (both sides run the same count: every layer costs the same, so the ratio is the
// full model's). Target: engine ≥ 1.5× PyTorch. Results go in bench/NOTES.md.
//
//   npx tsx bench/pairrm.ts [--layers 24] [--reps 2] [--batch 4] [--threads N]
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { native, type NativeEncoderConfig } from '../lib/engine/native.js';
import { numThreads, setNumThreads } from '../lib/index.js';
import { Tokenizer } from '../lib/io/tokenizer.js';
import { pairrmJudge } from '../lib/preference/pairrm.js';
import { PAIRRM_LARGE, randomValues, tinyDebertaTokenizer } from '../test/fixtures/pairrm-fixture.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const arg = (name: string, fallback: number): number => {
  const i = process.argv.indexOf(name);
  return i >= 0 ? Number(process.argv[i + 1]) : fallback;
};
const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

const layers = arg('--layers', 24);
const reps = arg('--reps', 2);
const batchSize = arg('--batch', 4);
if (process.argv.includes('--threads')) setNumThreads(arg('--threads', 0));
const threads = numThreads();

const { json, vocabSize } = tinyDebertaTokenizer();
const tokenizer = new Tokenizer({ tokenizer: json, label: 'bench tokenizer' });
const config: NativeEncoderConfig = {
  vocabSize,
  hiddenSize: PAIRRM_LARGE.hidden,
  numLayers: layers,
  numHeads: PAIRRM_LARGE.heads,
  intermediateSize: PAIRRM_LARGE.intermediate,
  positionBuckets: PAIRRM_LARGE.positionBuckets,
  maxRelativePositions: PAIRRM_LARGE.maxPositions,
  layerNormEps: 1e-7,
  headHidden: PAIRRM_LARGE.headHidden,
};
const encoder = new (native().NativeEncoder)(config, { maxBatch: batchSize, maxSeq: 2048 }, 'cpu', 'fp32');
let seed = 1;
for (const p of encoder.parameters()) {
  const n = p.shape.reduce((a, b) => a * b, 1);
  const values = randomValues(n, seed++, p.name.includes('LayerNorm') ? 0.1 : 1 / Math.sqrt(p.shape.at(-1) ?? 1));
  if (p.name.includes('LayerNorm.weight')) for (let i = 0; i < n; i++) values[i] += 1;
  encoder.setParameter(p.name, values);
}
const judge = pairrmJudge(encoder, tokenizer, { batchSize });
console.error(`parameters set (${layers} layers)`);

// A prompt that fills the source's 1224 tokens and five responses that fill the candidates' share:
// every comparison is a full 2048-token row, as with long UltraFeedback answers.
const words = ['the', 'answer', 'is', 'good', 'hello', 'world', 'question', 'better', 'of', 'and'];
const text = (n: number, shift: number): string => Array.from({ length: n }, (_, i) => words[(i * 7 + shift) % words.length]).join(' ');
const prompt = text(1500, 0);
const responses = Array.from({ length: 5 }, (_, k) => text(600 + 50 * k, k + 1));
const rows: { ids: number[]; pool: number[] }[] = [];
for (let i = 0; i < 5; i++) for (let j = 0; j < 5; j++) if (i !== j) rows.push(judge.comparisonIds(prompt, responses[i], responses[j]));
rows.sort((a, b) => a.ids.length - b.ids.length); // the judge's own batching
const batches = Array.from({ length: Math.ceil(rows.length / batchSize) }, (_, b) => rows.slice(b * batchSize, (b + 1) * batchSize));
const tokens = rows.reduce((a, r) => a + r.ids.length, 0) / rows.length;

const dir = mkdtempSync(path.join(tmpdir(), 'sppo-bench-pairrm-'));
const spec = path.join(dir, 'rows.json');
writeFileSync(spec, JSON.stringify({ config: { ...config, maxRelativePositions: PAIRRM_LARGE.maxPositions }, batches, threads, reps: 1 }));

const engine: number[] = [];
const torch: number[] = [];
try {
  await judge.comparisons(prompt, responses); // warm-up: first-touch pages, scratch growth
  for (let r = 0; r < reps; r++) {
    const t = performance.now();
    await judge.comparisons(prompt, responses);
    engine.push((performance.now() - t) / 1000);
    console.error(`engine: ${engine.at(-1)?.toFixed(1)} s`);
    const p = spawnSync('/usr/bin/python3', [path.join(ROOT, 'bench', 'pairrm_torch.py'), spec], { encoding: 'utf8', maxBuffer: 16 << 20 });
    if (p.status !== 0) throw new Error(`bench/pairrm_torch.py failed: ${p.stderr || p.error?.message}`);
    torch.push((JSON.parse(p.stdout.trim().split('\n').at(-1) ?? '{}') as { seconds: number[] }).seconds[0]);
    console.error(`pytorch: ${torch.at(-1)?.toFixed(1)} s`);
  }
} finally {
  await judge.dispose();
  rmSync(dir, { recursive: true, force: true });
}
const perSecond = (s: number): number => rows.length / s;
console.log(
  JSON.stringify(
    {
      what: `PairRM ordered comparisons/s, K = 5 (${rows.length} rows of ${tokens.toFixed(0)} tokens), ${layers} of 24 layers, batch ${batchSize}, ${threads} threads`,
      engine: { seconds: engine, comparisonsPerSecond: perSecond(median(engine)) },
      pytorch: { seconds: torch, comparisonsPerSecond: perSecond(median(torch)) },
      ratio: median(torch) / median(engine),
      target: 1.5,
    },
    null,
    1,
  ),
);
