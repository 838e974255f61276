// `npm run bench`: the engine beside its peers, measured in the same run on the same machine.
//
//   train   train-step tokens/s through the Node API ('tiny' B16 T256, 'small' B8 T512) vs the
//           PyTorch CPU baseline (bench/pytorch_cpu_baseline.py, a verbatim copy of
//           ../shared/anchors/pytorch_cpu_baseline.py; its decode / loss-head numbers are kept
//           in the JSON output)                                             target >= 2x
//   gemm    GFLOP/s of `build/sppo_bench gemm` vs bench/gemm_openblas.py (numpy/OpenBLAS) on the
//           model's shapes, joined by (case, M, N, K, trans); best of 2 alternating rounds
//           each (--gemm-rounds N)                                          target >= 0.7x
//   mem     peak RSS of one 'small' B8 T512 train step in a child node process (plus the
//           engine's planned memory) vs a python child running one step of the baseline's model
//   head    the fused LM head + sequence log-prob + SPPO loss, fwd+bwd, N 4096, V 32000,
//           d 512 / 1024 (`build/sppo_bench fused_head`, which also times the engine's own
//           unfused path) vs PyTorch CPU's unfused head (bench/pytorch_head.py): time target
//           >= 1.5x, extra memory <= 1/10 of the unfused path's
//   decode  KV-cache decode tok/s (`build/sppo_bench generate`: 32-token prompts, 64 new tokens,
//           T = 0.7, as the baseline's decode loop) at batch 1 / 16 / 64 vs the baseline's batch-16
//           decode loop (target >= 3x at batch 16); per-token time at positions 16 / 256 / 1024;
//           `sequenceLogprobs` tok/s through the Node API ('small', 8 x 512 tokens)
//   sampling  SPPO's generation step (issue 14): 'small', 16 prompts of 256 tokens, K = 5, 128 new
//           tokens (`build/sppo_bench shared_prompts`): the paged cache with prefix sharing vs
//           today's generator (no sharing, maxBatch 16, a slot of maxContext per sequence) in the
//           same KV-cache bytes, whole calls                               target >= 2.5x
//   generate-k  issue 14's CPU generation workload: the SPPO loop's sampling step on the 'small'
//           shape, 16 prompts of 256 tokens, K = 5 samples each, 128 new tokens, T = 0.7, through
//           the Node API (model.createGenerator, samplesPerPrompt) vs bench/pytorch_generate.py
//           (HF-style eager generate with a KV cache, the baseline's model imported, its shape
//           passed from presetConfig); tok/s = new tokens / wall time of the whole call, engine
//           best of 2 runs, peer 1 run (minutes long)                      target >= 6x (after
//           prefix sharing)
//   cxx     `build/sppo_bench train_step` (C++ only, no Node), for reference
//
// Before any of these, bench/peer_blas.py names the BLAS under each Python peer the chosen
// sections use (PyTorch, numpy) and measures its sgemm; a speed ratio against a peer on the
// reference BLAS or below MIN_PEER_SGEMM_GFLOPS is withheld (bench/peer_blas.ts).
//
// Options: --only train,gemm,mem,head,decode,sampling,generate-k,cxx   run a subset        --json FILE   write every number
//          --reps N                    timed steps (default: tiny 5, small 3, after 1 warm-up)
//          --gemm-rounds N             alternating GEMM rounds (default 2)
// The engine and its peer are measured back to back per shape (engine tiny, torch tiny, engine
// small, torch small): this shared 2-core VM's speed drifts by up to 2x over minutes.
// Timing is the median of N wall-clock runs of one step, after one warm-up step. tinybench
// (a devDependency) is not used for these: a train step takes seconds, so its time-budgeted
// sampling would either run far too long or take 1-2 samples; a fixed median-of-N matches
// what the PyTorch baseline and the C++ bench do.
import { spawnSync, type SpawnSyncReturns } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, loadavg, tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { Model, numThreads, presetConfig, type PresetName } from '../lib/index.js';
import { native } from '../lib/engine/native.js';
import { checkPeerBlas, describePeerBlas, PEER_NAMES, type PeerBlas, type PythonPeer } from './peer_blas.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const PYTHON = '/usr/bin/python3';
const SPPO_BENCH = path.join(ROOT, 'build', 'sppo_bench');
const BASELINE = path.join(ROOT, 'bench', 'pytorch_cpu_baseline.py');
const GEMM_OPENBLAS = path.join(ROOT, 'bench', 'gemm_openblas.py');
const PYTORCH_HEAD = path.join(ROOT, 'bench', 'pytorch_head.py');
const PYTORCH_GENERATE = path.join(ROOT, 'bench', 'pytorch_generate.py');
const TSX = path.join(ROOT, 'node_modules', '.bin', 'tsx');

const TRAIN_SHAPES: { preset: PresetName; batch: number; seq: number; reps: number }[] = [
  { preset: 'tiny', batch: 16, seq: 256, reps: 5 },
  { preset: 'small', batch: 8, seq: 512, reps: 3 },
];
const MEM_SHAPE = { preset: 'small' as PresetName, batch: 8, seq: 512 };
// Issue 14's CPU generation workload (one SPPO iteration's sampling on the 'small' shape).
const GENERATE_K = {
  preset: 'small' as PresetName,
  prompts: 16,
  promptLen: 256,
  samples: 5,
  newTokens: 128,
  temperature: 0.7,
  runs: 2,
};

// ---------------------------------------------------------------------------------------------
// helpers

function arg(name: string): string | undefined {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : undefined;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)];
}

function run(cmd: string, args: string[], opts: { env?: NodeJS.ProcessEnv; timeoutMs?: number } = {}): SpawnSyncReturns<string> {
  return spawnSync(cmd, args, {
    cwd: ROOT,
    encoding: 'utf8',
    env: opts.env ?? process.env,
    timeout: opts.timeoutMs ?? 20 * 60_000,
    maxBuffer: 64 << 20,
  });
}

function failure(r: SpawnSyncReturns<string>): string {
  const tail = `${r.stderr ?? ''}${r.stdout ?? ''}`.trim().split('\n').slice(-3).join(' | ');
  return r.error ? r.error.message : `exit ${r.status}${r.signal ? ` (${r.signal})` : ''}: ${tail}`;
}

let torchChecked: boolean | undefined;
function haveTorch(): boolean {
  torchChecked ??= run(PYTHON, ['-c', 'import torch'], { timeoutMs: 60_000 }).status === 0;
  return torchChecked;
}

function randomTokens(n: number, vocab: number, seed: number): Int32Array {
  let s = seed >>> 0;
  const out = new Int32Array(n);
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    out[i] = Math.floor((s / 4294967296) * vocab);
  }
  return out;
}

const MiB = 1024 * 1024;
const fmt = (x: number | undefined, digits = 0) => (x === undefined || !Number.isFinite(x) ? '—' : x.toFixed(digits));

interface Row {
  what: string;
  unit: string;
  engine?: number;
  peer?: number;
  /** engine/peer for throughput, peer/engine for memory (higher is better either way) */
  ratio?: number;
  target?: string;
  note?: string;
  /** the Python peer a speed ratio is taken against (its BLAS decides whether it is shown) */
  against?: PythonPeer;
  /** why the ratio is not reported */
  ratioWithheld?: string;
}

// ---------------------------------------------------------------------------------------------
// the memory child: `tsx bench/run.ts --mem-child` runs one step and prints JSON

async function memChild(): Promise<void> {
  const { preset, batch, seq } = MEM_SHAPE;
  const rssStart = process.memoryUsage().rss;
  const model = Model.create(preset, { maxBatch: batch, maxSeq: seq });
  model.setOptimizer({ kind: 'adamw', lr: 1e-4 });
  const rssCreated = process.memoryUsage().rss;
  const tokens = randomTokens(batch * seq, model.config.vocab_size, 1);
  await model.trainStep({ tokens, batch, seq });
  const out = {
    maxRSS: process.resourceUsage().maxRSS * 1024, // resourceUsage reports KiB
    rssStart,
    rssCreated,
    rssAfter: process.memoryUsage().rss,
    memory: model.memory(),
  };
  await model.dispose();
  process.stdout.write(JSON.stringify(out) + '\n');
}

// ---------------------------------------------------------------------------------------------
// sections

async function engineTrain(s: (typeof TRAIN_SHAPES)[number]): Promise<number> {
  const reps = arg('--reps') ? Number(arg('--reps')) : s.reps;
  const model = Model.create(s.preset, { maxBatch: s.batch, maxSeq: s.seq });
  model.setOptimizer({ kind: 'adamw', lr: 1e-4 });
  const tokens = randomTokens(s.batch * s.seq, presetConfig(s.preset).vocab_size, 1);
  const input = { tokens, batch: s.batch, seq: s.seq };
  await model.trainStep(input); // warm-up
  const times: number[] = [];
  for (let i = 0; i < reps; i++) {
    const t0 = performance.now();
    await model.trainStep(input);
    times.push((performance.now() - t0) / 1e3);
  }
  await model.dispose();
  const t = median(times);
  const tokS = (s.batch * s.seq) / t;
  console.log(
    `engine train ${s.preset} B${s.batch} T${s.seq}: ${fmt(tokS)} tok/s ` +
      `(median ${t.toFixed(3)} s of [${times.map((x) => x.toFixed(3)).join(', ')}])`,
  );
  return tokS;
}

// The baseline for one config (`--configs NAME`), so the peer runs right after the engine's
// measurement of the same shape: this machine's speed drifts over minutes (shared host).
function pytorchBaseline(preset: PresetName): Record<string, number> | undefined {
  if (!haveTorch()) {
    console.log(`pytorch baseline: skipped (${PYTHON} cannot import torch)`);
    return undefined;
  }
  const dir = mkdtempSync(path.join(tmpdir(), 'sppo-bench-'));
  try {
    const json = path.join(dir, 'baseline.json');
    const r = run(PYTHON, [BASELINE, '--configs', preset, '--json', json]);
    if (r.status !== 0 || !existsSync(json)) {
      console.log(`pytorch baseline failed: ${failure(r)}`);
      return undefined;
    }
    const res = JSON.parse(readFileSync(json, 'utf8')) as Record<string, number>;
    console.log(`pytorch baseline ${preset} (torch ${res.torch}, ${res.threads} threads): ${JSON.stringify(res)}`);
    return res;
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

interface GemmRow {
  case: string;
  M: number;
  N: number;
  K: number;
  trans: string;
  ms: number;
  gflops: number;
}
const gemmKey = (r: GemmRow) => `${r.case} ${r.M}x${r.N}x${r.K} ${r.trans}`;

// The C++ bench prints a table: `case M N K trans ms GFLOP/s` rows (native/bench/bench_gemm.cpp); rows are
// matched by a regex, anything else (headers, the kernel line) is ignored.
function parseGemmTable(text: string): { rows: GemmRow[]; kernel?: string } {
  const rows: GemmRow[] = [];
  const re = /^\s*([A-Za-z_]\w*)\s+(\d+)\s+(\d+)\s+(\d+)\s+([NT]{2})\s+([\d.eE+-]+)\s+([\d.eE+-]+)\s*$/;
  for (const line of text.split('\n')) {
    const m = re.exec(line);
    if (m) rows.push({ case: m[1], M: +m[2], N: +m[3], K: +m[4], trans: m[5], ms: +m[6], gflops: +m[7] });
  }
  const kernel = /^kernel (.*)$/m.exec(text)?.[1];
  return { rows, kernel };
}

// numpy's environment for the GEMM peer (and its BLAS probe): some machines set these to work
// around old OpenBLAS builds, and they make a current one pick a slower kernel.
function gemmPeerEnv(): NodeJS.ProcessEnv {
  const env = { ...process.env };
  delete env.OPENBLAS_CORETYPE;
  delete env.OPENBLAS_L2_SIZE;
  return env;
}

// Per-shape best GFLOP/s over `rounds` alternating runs of the two programs (C++, numpy, C++,
// numpy, ...): interference from other processes only ever slows a run down, and alternating
// keeps both sides exposed to the same drift.
function gemm(results: Record<string, unknown>): Row[] {
  if (!existsSync(SPPO_BENCH)) {
    console.log(`gemm: skipped (${SPPO_BENCH} not built)`);
    return [];
  }
  const rounds = Number(arg('--gemm-rounds') ?? 2);
  const env = gemmPeerEnv();
  const best = (acc: Map<string, GemmRow>, rows: GemmRow[]) => {
    for (const r of rows) {
      const k = gemmKey(r);
      if (!acc.has(k) || acc.get(k)!.gflops < r.gflops) acc.set(k, r);
    }
  };
  const engine = new Map<string, GemmRow>();
  const peer = new Map<string, GemmRow>();
  let kernel: string | undefined;
  for (let round = 0; round < rounds; round++) {
    const cxx = run(SPPO_BENCH, ['gemm']);
    if (cxx.status !== 0) {
      console.log(`gemm: build/sppo_bench gemm failed: ${failure(cxx)}`);
      return [];
    }
    const parsed = parseGemmTable(cxx.stdout);
    if (parsed.rows.length === 0) {
      console.log(`gemm: no rows parsed from build/sppo_bench gemm output:\n${cxx.stdout}`);
      return [];
    }
    kernel = parsed.kernel;
    best(engine, parsed.rows);
    if (!existsSync(GEMM_OPENBLAS)) {
      if (round === 0) console.log('gemm: bench/gemm_openblas.py missing, no OpenBLAS column');
      continue;
    }
    const dir = mkdtempSync(path.join(tmpdir(), 'sppo-bench-'));
    try {
      const json = path.join(dir, 'gemm.json');
      const r = run(PYTHON, [GEMM_OPENBLAS, '--json', json], { env });
      if (r.status === 0 && existsSync(json)) best(peer, JSON.parse(readFileSync(json, 'utf8')) as GemmRow[]);
      else if (r.status === 0)
        best(peer, parseGemmTable(r.stdout).rows); // a version without --json
      else console.log(`gemm: bench/gemm_openblas.py failed: ${failure(r)}`);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }
  console.log(`gemm: ${engine.size} engine shapes (${kernel ?? 'kernel ?'}), ${peer.size} OpenBLAS shapes, best of ${rounds} rounds`);
  const rows: Row[] = [...engine.values()].map((e) => {
    const p = peer.get(gemmKey(e));
    return {
      what: `gemm ${e.case} ${e.M}x${e.N}x${e.K} ${e.trans}`,
      unit: 'GFLOP/s',
      engine: e.gflops,
      peer: p?.gflops,
      ratio: p ? e.gflops / p.gflops : undefined,
      target: '>= 0.7',
      against: 'numpy',
    };
  });
  const unmatched = [...peer.keys()].filter((k) => !engine.has(k));
  if (unmatched.length) console.log(`gemm: OpenBLAS rows without an engine row of the same shape: ${unmatched.join(', ')}`);
  results.gemm = { kernel, rounds, engine: [...engine.values()], openblas: [...peer.values()] };
  return rows;
}

interface MemChildOut {
  maxRSS: number;
  rssStart: number;
  rssCreated: number;
  rssAfter: number;
  memory: Record<string, number>;
}

function engineMemory(): MemChildOut | undefined {
  const r = run(TSX, [fileURLToPath(import.meta.url), '--mem-child']);
  const line = r.stdout?.trim().split('\n').pop();
  if (r.status !== 0 || !line?.startsWith('{')) {
    console.log(`engine memory child failed: ${failure(r)}`);
    return undefined;
  }
  return JSON.parse(line) as MemChildOut;
}

// One train step of the baseline's own model and step function, in a fresh python; prints the
// peak RSS (ru_maxrss, KiB on Linux) after `import torch` + model creation and after the step.
function pytorchMemory(): { afterBuild: number; afterStep: number } | undefined {
  if (!haveTorch()) return undefined;
  const { preset, batch, seq } = MEM_SHAPE;
  const code = `
import resource, sys, json
sys.path.insert(0, ${JSON.stringify(path.join(ROOT, 'bench'))})
import torch, torch.nn.functional as F
from pytorch_cpu_baseline import Llama, CONFIGS
d, L, h, kv, ffn, V, B, T = CONFIGS[${JSON.stringify(preset)}]
assert (B, T) == (${batch}, ${seq})
torch.manual_seed(0)
m = Llama(d, L, h, kv, ffn, V); opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
ids = torch.randint(0, V, (B, T))
built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
loss = F.cross_entropy(m(ids)[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1)); loss.backward(); opt.step(); opt.zero_grad()
print(json.dumps({"afterBuild": built * 1024, "afterStep": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
`;
  const r = run(PYTHON, ['-c', code]);
  const line = r.stdout?.trim().split('\n').pop();
  if (r.status !== 0 || !line?.startsWith('{')) {
    console.log(`pytorch memory child failed: ${failure(r)}`);
    return undefined;
  }
  return JSON.parse(line) as { afterBuild: number; afterStep: number };
}

// `build/sppo_bench fused_head` prints rows "d path ms extraMiB" (native/bench/bench_head.cpp).
function fusedHead(results: Record<string, unknown>): Row[] {
  if (!existsSync(SPPO_BENCH)) return [];
  const r = run(SPPO_BENCH, ['fused_head']);
  if (r.status !== 0) {
    console.log(`build/sppo_bench fused_head failed: ${failure(r)}`);
    return [];
  }
  const engine = new Map<string, { ms: number; mib: number }>();
  for (const m of r.stdout.matchAll(/^(\d+)\s+(fused|unfused)\s+([\d.]+)\s+([\d.]+)$/gm))
    engine.set(`${m[1]} ${m[2]}`, { ms: Number(m[3]), mib: Number(m[4]) });
  let torch: { d: number; ms: number; extra_mib: number; threads: number }[] = [];
  if (haveTorch()) {
    const dir = mkdtempSync(path.join(tmpdir(), 'sppo-head-'));
    const out = path.join(dir, 'head.json');
    const p = run(PYTHON, [PYTORCH_HEAD, '--json', out]);
    if (p.status === 0 && existsSync(out)) torch = JSON.parse(readFileSync(out, 'utf8')) as typeof torch;
    else console.log(`bench/pytorch_head.py failed: ${failure(p)}`);
    rmSync(dir, { recursive: true, force: true });
  }
  results.fusedHead = { engine: Object.fromEntries(engine), pytorch: torch };
  const rows: Row[] = [];
  for (const d of [512, 1024]) {
    const fused = engine.get(`${d} fused`);
    const unfused = engine.get(`${d} unfused`);
    const py = torch.find((t) => t.d === d);
    if (!fused) continue;
    rows.push({
      what: `fused SPPO head fwd+bwd N4096 V32000 d${d}`,
      unit: 'ms',
      engine: fused.ms,
      peer: py?.ms,
      ratio: py ? py.ms / fused.ms : undefined,
      target: '>= 1.5 (peer/engine)',
      against: 'torch',
      note: py ? `PyTorch unfused, ${py.threads} thr; engine unfused ${fmt(unfused?.ms ?? NaN)} ms` : 'no torch',
    });
    rows.push({
      what: `fused SPPO head extra memory d${d}`,
      unit: 'MiB',
      engine: fused.mib,
      peer: unfused?.mib,
      ratio: unfused ? fused.mib / unfused.mib : undefined,
      target: '<= 0.1 (engine/unfused)',
      note: py ? `PyTorch unfused peak extra RSS ${fmt(py.extra_mib)} MiB` : '',
    });
  }
  return rows;
}

// `build/sppo_bench shared_prompts` prints "shared_prompts LABEL  S s  T tok/s  (...)" per case
// (native/bench/bench_generate.cpp): engine (sharing, 80 in flight at most, the peer's KV bytes),
// today (no sharing, maxBatch 16, pool 16 x maxContext), engine16 (sharing in today's exact
// plan), engine80 and today80 (sharing on and off at maxBatch 80, 5x the KV bytes). The numbers are kept in --json
// (sppoSampling), for a peer measured in the same run to sit beside them.
function sppoSampling(results: Record<string, unknown>): Row[] {
  if (!existsSync(SPPO_BENCH)) return [];
  const r = run(SPPO_BENCH, ['shared_prompts']);
  if (r.status !== 0) {
    console.log(`build/sppo_bench shared_prompts failed: ${failure(r)}`);
    return [];
  }
  const cases: Record<string, { seconds: number; cpuSeconds: number; tokS: number; detail: string }> = {};
  for (const m of (r.stdout ?? '').matchAll(/^shared_prompts (\w+)\s+([\d.]+) s\s+([\d.]+) tok\/s\s+\(cpu ([\d.]+) s; (.*)\)$/gm))
    cases[m[1]] = { seconds: Number(m[2]), tokS: Number(m[3]), cpuSeconds: Number(m[4]), detail: m[5] };
  results.sppoSampling = cases;
  const { engine, today, engine16, engine80, today80 } = cases;
  if (!engine || !today) return [];
  const others = [
    engine16 && `sharing at maxBatch 16 ${fmt(engine16.seconds)} s`,
    engine80 && today80 && `at maxBatch 80 (5x the KV bytes) ${fmt(engine80.seconds)} s vs ${fmt(today80.seconds)} s without sharing`,
  ].filter(Boolean);
  return [
    {
      what: 'SPPO sampling small 16x256 K5 +128 (sharing)',
      unit: 's',
      engine: engine.seconds,
      peer: today.seconds,
      ratio: today.seconds / engine.seconds,
      target: '>= 2.5 (peer/engine)',
      note:
        `peer: today's generator (no sharing, maxBatch 16), same KV bytes; CPU time ratio ` +
        `${(today.cpuSeconds / engine.cpuSeconds).toFixed(2)}x; ${others.join(', ')}`,
    },
  ];
}

// `build/sppo_bench generate` prints "decode PRESET batch B  N tok/s" and
// "decode PRESET batch 1 position P  T ms/token" lines (native/bench/bench_generate.cpp).
async function decode(results: Record<string, unknown>, baseline: Record<string, number>): Promise<Row[]> {
  const rows: Row[] = [];
  if (existsSync(SPPO_BENCH)) {
    const r = run(SPPO_BENCH, ['generate']);
    if (r.status !== 0) console.log(`build/sppo_bench generate failed: ${failure(r)}`);
    const tok = new Map<string, number>();
    for (const m of (r.stdout ?? '').matchAll(/^decode (\w+)\s+batch (\d+)\s+([\d.]+) tok\/s/gm)) tok.set(`${m[1]} ${m[2]}`, Number(m[3]));
    const pos = [...(r.stdout ?? '').matchAll(/^decode (\w+)\s+batch 1 position (\d+)\s+([\d.]+) ms\/token/gm)];
    for (const preset of ['tiny', 'small'] as PresetName[]) {
      const py = baseline[`decode_${preset}_tok_s`] ?? pytorchBaseline(preset)?.[`decode_${preset}_tok_s`];
      if (py !== undefined) baseline[`decode_${preset}_tok_s`] = py;
      for (const b of [1, 16, 64]) {
        const eng = tok.get(`${preset} ${b}`);
        if (eng === undefined) continue;
        rows.push({
          what: `decode ${preset} batch ${b} (KV cache, T=0.7)`,
          unit: 'tok/s',
          engine: eng,
          peer: b === 16 ? py : undefined,
          ratio: b === 16 && py ? eng / py : undefined,
          target: b === 16 ? '>= 3' : '',
          against: 'torch',
          note: b === 16 ? 'PyTorch CPU KV-cache loop, batch 16' : '',
        });
      }
      const times = pos.filter((m) => m[1] === preset).map((m) => `${m[2]}: ${m[3]}`);
      if (times.length) rows.push({ what: `decode ${preset} batch 1, ms/token at position`, unit: 'ms', note: times.join(', ') });
    }
    results.decode = Object.fromEntries(tok);
  }
  // sequenceLogprobs through the Node API: 8 sequences of a 64-token prompt + 448-token response.
  const model = Model.create('small', { maxBatch: 8, maxSeq: 512 });
  const vocab = presetConfig('small').vocab_size;
  const ids = randomTokens(8 * 512, vocab, 3);
  const items = Array.from({ length: 8 }, (_, i) => ({
    prompt: Array.from(ids.subarray(i * 512, i * 512 + 64)),
    response: Array.from(ids.subarray(i * 512 + 64, (i + 1) * 512)),
  }));
  await model.sequenceLogprobs(items); // warm-up
  const times: number[] = [];
  for (let i = 0; i < 3; i++) {
    const t0 = performance.now();
    await model.sequenceLogprobs(items);
    times.push((performance.now() - t0) / 1e3);
  }
  await model.dispose();
  const tokS = (8 * 512) / median(times);
  results.sequenceLogprobs = tokS;
  rows.push({
    what: 'sequenceLogprobs small 8 x 512 (Node API)',
    unit: 'tok/s',
    engine: tokS,
    note: 'forward + fused head, prompt masked',
  });
  return rows;
}

// The engine's side of generate-k: one generator holding every sequence of the workload, each
// prompt with its own seed, the whole generate() call timed (prefill included).
async function engineGenerateK(): Promise<{ tokS: number; seconds: number[]; generatorBytes: number }> {
  const g = GENERATE_K;
  const sequences = g.prompts * g.samples;
  const model = Model.create(g.preset, { maxBatch: 1, maxSeq: 16 });
  const gen = model.createGenerator({ maxBatch: sequences, maxContext: g.promptLen + g.newTokens });
  const vocab = model.config.vocab_size;
  const prompts = Array.from({ length: g.prompts }, (_, i) => randomTokens(g.promptLen, vocab, 100 + i));
  const seconds: number[] = [];
  try {
    for (let r = 0; r < g.runs; r++) {
      const t0 = performance.now();
      const out = await gen.generate(prompts, {
        samplesPerPrompt: g.samples,
        maxNewTokens: g.newTokens,
        temperature: g.temperature,
        seed: prompts.map((_, i) => i),
      });
      seconds.push((performance.now() - t0) / 1e3);
      // No stop tokens: every sequence must come back with all its tokens, or the rate is wrong.
      const short = out.filter((s) => s.tokens.length !== g.newTokens);
      if (out.length !== sequences || short.length > 0)
        throw new Error(`generate-k: ${out.length} sequences, ${short.length} of them short of ${g.newTokens} tokens`);
    }
    return { tokS: (sequences * g.newTokens) / Math.min(...seconds), seconds, generatorBytes: gen.memory() };
  } finally {
    await gen.dispose();
    await model.dispose();
  }
}

// The PyTorch side, on the preset's shape as the engine reports it.
function pytorchGenerateK(): { tok_s: number; seconds: number[]; threads: number; torch: string } | undefined {
  if (!haveTorch()) {
    console.log(`pytorch generate-k: skipped (${PYTHON} cannot import torch)`);
    return undefined;
  }
  const g = GENERATE_K;
  const c = presetConfig(g.preset);
  // The peer's model derives head_dim as hidden / heads; another head_dim would be another model.
  if (c.head_dim !== undefined && c.head_dim * c.num_attention_heads !== c.hidden_size)
    throw new Error(`generate-k: preset ${g.preset} has head_dim ${c.head_dim}, which bench/pytorch_generate.py cannot express`);
  const dir = mkdtempSync(path.join(tmpdir(), 'sppo-genk-'));
  try {
    const json = path.join(dir, 'generate.json');
    const dims = {
      hidden: c.hidden_size,
      layers: c.num_hidden_layers,
      heads: c.num_attention_heads,
      'kv-heads': c.num_key_value_heads,
      ffn: c.intermediate_size,
      vocab: c.vocab_size,
      prompts: g.prompts,
      'prompt-len': g.promptLen,
      samples: g.samples,
      'new-tokens': g.newTokens,
      temperature: g.temperature,
      // The engine's thread count: PyTorch's default here is 1 thread, which halves the peer.
      threads: numThreads(),
      // One run: the peer's takes minutes (over 10 under load), so its noise is small already.
      runs: 1,
    };
    const args = Object.entries(dims).flatMap(([k, v]) => [`--${k}`, String(v)]);
    const r = run(PYTHON, [PYTORCH_GENERATE, ...args, '--json', json], { timeoutMs: 90 * 60_000 });
    if (r.status !== 0 || !existsSync(json)) {
      console.log(`bench/pytorch_generate.py failed: ${failure(r)}`);
      return undefined;
    }
    return JSON.parse(readFileSync(json, 'utf8')) as { tok_s: number; seconds: number[]; threads: number; torch: string };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

async function generateK(results: Record<string, unknown>): Promise<Row[]> {
  const g = GENERATE_K;
  const eng = await engineGenerateK();
  const fmtRuns = (xs: number[]) => xs.map((x) => x.toFixed(2)).join(', ');
  console.log(
    `engine generate-k ${g.preset}: ${fmt(eng.tokS)} tok/s (runs ${fmtRuns(eng.seconds)} s; generator ` +
      `${fmt(eng.generatorBytes / MiB)} MiB)`,
  );
  const py = pytorchGenerateK();
  if (py) console.log(`pytorch generate-k ${g.preset}: ${fmt(py.tok_s)} tok/s (runs ${fmtRuns(py.seconds)} s)`);
  results.generateK = { ...g, engine: eng, pytorch: py };
  return [
    {
      what: `generate-k ${g.preset}: ${g.prompts} prompts x ${g.promptLen}, K=${g.samples}, ${g.newTokens} new (T=${g.temperature})`,
      unit: 'tok/s',
      engine: eng.tokS,
      peer: py?.tok_s,
      ratio: py ? eng.tokS / py.tok_s : undefined,
      target: '>= 6 (issue 14)',
      against: 'torch',
      note: py ? `PyTorch ${py.torch} HF-style generate, ${py.threads} thr` : 'no torch',
    },
  ];
}

function cxxTrainStep(results: Record<string, unknown>): string[] {
  if (!existsSync(SPPO_BENCH)) return [`(${SPPO_BENCH} not built)`];
  const r = run(SPPO_BENCH, ['train_step']);
  if (r.status !== 0) return [`build/sppo_bench train_step failed: ${failure(r)}`];
  const lines = r.stdout.split('\n').filter((l) => /^(train|threads)\b/.test(l));
  results.cxxTrainStep = lines;
  return lines;
}

// ---------------------------------------------------------------------------------------------

function cpuModel(): string {
  const r = spawnSync('lscpu', [], { encoding: 'utf8' });
  return /^Model name:\s*(.*)$/m.exec(r.stdout ?? '')?.[1]?.trim() ?? cpus()[0]?.model ?? 'unknown CPU';
}

// Drops the speed ratios taken against a peer whose BLAS is the reference one or too slow
// (peerRatioVerdict); returns each such peer's reason, for a line under the table.
function withholdUnfairRatios(rows: Row[], peerBlas: Partial<Record<PythonPeer, PeerBlas>>): Map<PythonPeer, string> {
  const withheld = new Map<PythonPeer, string>();
  for (const r of rows) {
    if (!r.against || r.ratio === undefined) continue;
    const c = peerBlas[r.against];
    const verdict = c?.verdict ?? { ok: false, reason: 'its BLAS was not probed' };
    if (verdict.ok) continue;
    const sgemm = c?.probe ? `, sgemm ${c.probe.sgemmGflops.toFixed(1)} GFLOP/s` : '';
    r.ratio = undefined;
    r.ratioWithheld = verdict.reason;
    const blas = !c || c.blas === 'unknown' ? 'an unidentified BLAS' : c.blas;
    // The whole note goes: some quote a ratio (the GEMM geometric mean's worst shape).
    r.note = `no ratio: ${PEER_NAMES[r.against]} on ${blas}${sgemm} (see below)`;
    withheld.set(r.against, verdict.reason);
  }
  return withheld;
}

function printTable(rows: Row[]): void {
  const head = ['what', 'unit', 'engine', 'peer', 'ratio', 'target', 'note'];
  const body = rows.map((r) => [
    r.what,
    r.unit,
    fmt(r.engine, r.unit === 'GFLOP/s' ? 1 : 0),
    fmt(r.peer, r.unit === 'GFLOP/s' ? 1 : 0),
    r.ratio === undefined ? '—' : `${r.ratio.toFixed(2)}x`,
    r.target ?? '',
    r.note ?? '',
  ]);
  const w = head.map((h, i) => Math.max(h.length, ...body.map((b) => b[i].length)));
  const line = (cells: string[]) => `| ${cells.map((c, i) => (i >= 2 && i <= 4 ? c.padStart(w[i]) : c.padEnd(w[i]))).join(' | ')} |`;
  console.log(line(head));
  console.log(`|${w.map((n, i) => (i >= 2 && i <= 4 ? '-'.repeat(n + 1) + ':' : '-'.repeat(n + 2))).join('|')}|`);
  for (const b of body) console.log(line(b));
}

async function main(): Promise<void> {
  if (process.argv.includes('--mem-child')) return memChild();
  const only = new Set((arg('--only') ?? 'train,gemm,mem,head,decode,sampling,generate-k,cxx').split(','));
  const machine = {
    date: new Date().toISOString(),
    cpu: cpuModel(),
    cores: cpus().length,
    engineThreads: numThreads(),
    gemmKernel: native().gemmKernel,
    loadavgStart: loadavg(),
  };
  const results: Record<string, unknown> = { ...machine };
  console.log(
    `${machine.date}  ${machine.cpu}, ${machine.cores} cores, engine threads ${machine.engineThreads}, ` +
      `gemm kernel ${machine.gemmKernel}, load average ${loadavg()
        .map((x) => x.toFixed(2))
        .join(' ')}`,
  );
  // The peers' BLAS, measured before anything is compared with them.
  const peerBlas: Partial<Record<PythonPeer, PeerBlas>> = {};
  if (haveTorch() && ['train', 'head', 'decode', 'generate-k'].some((s) => only.has(s))) peerBlas.torch = checkPeerBlas(PYTHON, 'torch');
  if (only.has('gemm') && existsSync(SPPO_BENCH)) peerBlas.numpy = checkPeerBlas(PYTHON, 'numpy', gemmPeerEnv());
  for (const [peer, c] of Object.entries(peerBlas)) console.log(describePeerBlas(peer as PythonPeer, c));
  results.peerBlas = peerBlas;

  const rows: Row[] = [];
  let cxxLines: string[] = [];

  if (only.has('train')) {
    const baseline: Record<string, number> = {};
    const engineTok: Record<string, number> = {};
    for (const s of TRAIN_SHAPES) {
      const eng = await engineTrain(s);
      const py = pytorchBaseline(s.preset);
      engineTok[s.preset] = eng;
      if (py) Object.assign(baseline, py); // train, decode and sppo_head numbers, all kept
      const peer = py?.[`train_${s.preset}_tok_s`];
      rows.push({
        what: `train step ${s.preset} B${s.batch} T${s.seq} (Node API)`,
        unit: 'tok/s',
        engine: eng,
        peer,
        ratio: peer ? eng / peer : undefined,
        target: '>= 2',
        against: 'torch',
        note: py ? `PyTorch ${py.torch} CPU, ${py.threads} thr` : 'no torch',
      });
    }
    results.engineTrain = engineTok;
    results.pytorchBaseline = baseline;
  }
  if (only.has('gemm')) {
    const g = gemm(results);
    rows.push(...g);
    const matched = g.filter((r) => r.ratio !== undefined);
    if (matched.length) {
      const geo = Math.exp(matched.reduce((a, r) => a + Math.log(r.ratio!), 0) / matched.length);
      const min = matched.reduce((a, r) => (r.ratio! < a.ratio! ? r : a));
      rows.push({
        what: `gemm geometric mean over ${matched.length} shapes`,
        unit: 'ratio',
        ratio: geo,
        target: '>= 0.7',
        against: 'numpy',
        note: `worst ${min.ratio!.toFixed(2)}x (${min.what.replace('gemm ', '')})`,
      });
    }
  }
  if (only.has('mem')) {
    const e = engineMemory();
    const p = pytorchMemory();
    results.memory = { engine: e, pytorch: p };
    const { preset, batch, seq } = MEM_SHAPE;
    if (e) {
      const m = e.memory;
      console.log(
        `engine memory ${preset} B${batch} T${seq}: peak RSS ${fmt(e.maxRSS / MiB)} MiB ` +
          `(node at start ${fmt(e.rssStart / MiB)} MiB, after create ${fmt(e.rssCreated / MiB)} MiB); planned ` +
          `${fmt(m.total / MiB)} MiB = params ${fmt(m.params / MiB)} + grads ${fmt(m.grads / MiB)} + optimizer ` +
          `${fmt(m.optimizer / MiB)} + activations ${fmt(m.activations / MiB)} + scratch ${fmt(m.scratch / MiB)}`,
      );
    }
    if (p)
      console.log(
        `pytorch memory ${preset} B${batch} T${seq}: peak RSS ${fmt(p.afterStep / MiB)} MiB ` +
          `(${fmt(p.afterBuild / MiB)} MiB after import + model build)`,
      );
    rows.push({
      what: `peak RSS, one train step ${preset} B${batch} T${seq}`,
      unit: 'MiB',
      engine: e ? e.maxRSS / MiB : undefined,
      peer: p ? p.afterStep / MiB : undefined,
      ratio: e && p ? p.afterStep / e.maxRSS : undefined,
      target: '(peer/engine)',
      note: e ? `engine planned ${fmt(e.memory.total / MiB)} MiB` : '',
    });
  }
  if (only.has('head')) rows.push(...fusedHead(results));
  if (only.has('decode')) {
    const baseline = (results.pytorchBaseline ??= {}) as Record<string, number>;
    rows.push(...(await decode(results, baseline)));
  }
  if (only.has('sampling')) rows.push(...sppoSampling(results));
  if (only.has('generate-k')) rows.push(...(await generateK(results)));
  if (only.has('cxx')) cxxLines = cxxTrainStep(results);

  const withheld = withholdUnfairRatios(rows, peerBlas);
  results.loadavgEnd = loadavg();
  console.log('');
  printTable(rows);
  for (const [peer, reason] of withheld) console.log(`— ratios against ${PEER_NAMES[peer]} withheld: ${reason}`);
  if (cxxLines.length) {
    console.log('\nbuild/sppo_bench train_step (C++ only, no Node):');
    for (const l of cxxLines) console.log(`  ${l}`);
  }
  console.log(
    `\nload average at the end: ${loadavg()
      .map((x) => x.toFixed(2))
      .join(' ')} (other processes skew numbers)`,
  );
  results.table = rows;
  const jsonOut = arg('--json');
  if (jsonOut) {
    writeFileSync(jsonOut, JSON.stringify(results, null, 1));
    console.log(`wrote ${jsonOut}`);
  }
}

await main();
