// One full SPPO iteration through the `sppo run` path (a YAML config file → loadConfig →
// setupFromConfig → runSppo, in this process) with each judge kind for real use configured from
// the file: `http` against an OpenAI-style chat-completions server on loopback started here,
// `lm-judge` with a tiny random causal judge and `reward-model` with a tiny random
// LlamaForSequenceClassification, both in the Hugging Face layout over the real Mistral-7B
// tokenizer. The policy is a tiny random Llama over the same tokenizer. For each kind: every
// stage file is there and well-formed, the stored matrices satisfy P_ij + P_ji = 1, the training
// set follows from them, training took the steps the set implies with finite losses, the
// checkpoint loads back as the trained weights, and the stored matrices (and the evaluation's win
// rate) equal what the same judge gives when asked directly — for http, what the server's
// logprobs imply. The http run also counts requests: one per distinct ordered comparison, none
// when the finished run is resumed, none when the judge and evaluate stages are redone from the
// disk cache, and the judge stage's count again once that cache is gone.
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { stringify as toYaml } from 'yaml';
import { writeMistralTokenizer } from './fixtures/mistral-tokenizer.js';
import { loadConfig } from '../lib/config/index.js';
import { loadPretrained, Model, savePretrained, setupFromConfig, Tokenizer, writeSafetensors, type RunConfigInput } from '../lib/index.js';
import { loadLmJudge, loadRewardModel, type PreferenceModel } from '../lib/preference/index.js';
import { Progress, runProgressHooks } from '../lib/cli/progress.js';
import { runSppo, type RunHooks, type StageName } from '../lib/sppo/run.js';

const tmp = mkdtempSync(path.join(tmpdir(), 'sppo-judges-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const K = 4;
const MAX_NEW = 6;
const PER_ITERATION = 4;
const EVAL = 3;
const BATCH = 2;
/** the reward model's τ: rewards of the random model differ by several units, so P stays off 0 and 1 */
const TAU = 2;
const PROMPTS = ['apple', 'river', 'seven', 'green', 'stone', 'cloud', 'violet', 'north'].map(
  (w, i) => `Write a short line about ${w} number ${i}.`,
);
// A judge template the server can read back: prompt, first response (A), second (B).
const HTTP_TEMPLATE = '<<P>>{prompt}<</P>>\n<<A>>{a}<</A>>\n<<B>>{b}<</B>>';
const HTTP_QUESTION = /^<<P>>([\s\S]*)<<\/P>>\n<<A>>([\s\S]*)<<\/A>>\n<<B>>([\s\S]*)<<\/B>>$/;

const policyDir = path.join(tmp, 'policy');
const lmJudgeDir = path.join(tmp, 'judges', 'lm');
const rewardDir = path.join(tmp, 'judges', 'reward');
let tokenizer: Tokenizer;

/** Scales a parameter in place: peaked attention and a larger head give a random judge visible opinions. */
function scale(model: Model, name: string, by: number): void {
  model.setParam(
    name,
    model.getParam(name).map((v) => v * by),
  );
}
function sharpen(model: Model): void {
  for (let l = 0; l < model.config.num_hidden_layers; l++) {
    for (const w of ['q_proj', 'k_proj']) scale(model, `model.layers.${l}.self_attn.${w}.weight`, 20);
    for (const w of ['v_proj', 'o_proj']) scale(model, `model.layers.${l}.self_attn.${w}.weight`, 6);
  }
}
function patchConfig(dir: string, patch: Record<string, unknown>, drop: string[] = []): void {
  const file = path.join(dir, 'config.json');
  const cfg = { ...(JSON.parse(readFileSync(file, 'utf8')) as Record<string, unknown>), ...patch };
  writeFileSync(file, JSON.stringify(Object.fromEntries(Object.entries(cfg).filter(([k]) => !drop.includes(k))), null, 2));
}
const tinyLlama = (seed: number, tied = false) =>
  Model.create(
    {
      vocab_size: 32000,
      hidden_size: 32,
      num_hidden_layers: 2,
      num_attention_heads: 4,
      num_key_value_heads: 2,
      intermediate_size: 64,
      max_position_embeddings: 256,
      tie_word_embeddings: tied,
      seed,
    },
    { maxBatch: 1, maxSeq: 8 },
  );

beforeAll(async () => {
  // the policy: random weights over the Mistral vocabulary, with its token ids and a chat template
  const policy = tinyLlama(11);
  try {
    await savePretrained(policy, policyDir);
  } finally {
    await policy.dispose();
  }
  patchConfig(policyDir, { bos_token_id: 1, eos_token_id: 2 });
  writeMistralTokenizer(policyDir);
  tokenizer = await Tokenizer.fromDirectory(policyDir);
  writeFileSync(path.join(tmp, 'prompts.jsonl'), PROMPTS.map((prompt) => JSON.stringify({ prompt })).join('\n') + '\n');

  // the LM judge: a causal LM directory, sharpened
  const lm = tinyLlama(5);
  try {
    scale(lm, 'lm_head.weight', 10);
    sharpen(lm);
    await savePretrained(lm, lmJudgeDir);
  } finally {
    await lm.dispose();
  }
  patchConfig(lmJudgeDir, { bos_token_id: 1, eos_token_id: 2 });
  writeMistralTokenizer(lmJudgeDir);

  // the reward model: backbone `model.*` + score.weight (1, hidden), no lm_head, num_labels 1
  const rm = tinyLlama(7, true);
  try {
    sharpen(rm);
    await savePretrained(rm, rewardDir);
    let s = 4242;
    const score = Float32Array.from({ length: 32 }, () => ((s = (s * 1103515245 + 12345) % 2 ** 31) / 2 ** 31 - 0.5) * 2);
    await writeSafetensors(path.join(rewardDir, 'model.safetensors'), [
      ...rm.params().map((p) => ({ name: p.name, shape: p.shape, data: Float32Array.from(rm.getParam(p.name)) })),
      { name: 'score.weight', shape: [1, 32], data: score },
    ]);
  } finally {
    await rm.dispose();
  }
  patchConfig(
    rewardDir,
    {
      architectures: ['LlamaForSequenceClassification'],
      num_labels: 1,
      bos_token_id: 1,
      eos_token_id: 2,
      pad_token_id: 0,
    },
    ['tie_word_embeddings'],
  );
  writeMistralTokenizer(rewardDir);
});

// ---- running the pipeline from a config file ----

/** Writes <tmp>/<name>/sppo.yaml with paths relative to it; returns the file. */
function writeRunConfig(name: string, preference: Record<string, unknown>): string {
  const dir = path.join(tmp, name);
  mkdirSync(dir, { recursive: true });
  const config: RunConfigInput = {
    model: { path: '../policy' },
    data: { prompts: '../prompts.jsonl', evalSize: EVAL, promptsPerIteration: PER_ITERATION, maxPromptTokens: 48 },
    generation: { samplesPerPrompt: K, maxNewTokens: MAX_NEW, maxBatch: 8, temperature: 1, topP: 1 },
    preference: preference as RunConfigInput['preference'],
    training: {
      loss: 'sppo-pair',
      eta: 1,
      optimizer: { kind: 'adamw', lr: 1e-3 },
      schedule: { kind: 'constant', warmupRatio: 0 },
      batchSize: BATCH,
      gradAccumSteps: 1,
      maxLength: 64,
    },
    run: { dir: 'run', iterations: 1, seed: 3 },
  };
  const file = path.join(dir, 'sppo.yaml');
  writeFileSync(file, `# written by test/sppo-judges.test.ts\n${toYaml(config)}`);
  return file;
}

interface Run {
  runDir: string;
  /** stage → the last status reported for it */
  stages: Map<string, string>;
  /** π_1 as the model held it when the run returned */
  trained: Map<string, Float32Array>;
  seconds: number;
}

/** `sppo run --config FILE` without the terminal: the config file through the same setup and scheduler. */
async function sppoRun(configFile: string, hooks: RunHooks = {}): Promise<Run> {
  const t0 = performance.now();
  const config = await loadConfig(configFile);
  const setup = await setupFromConfig(config);
  const stages = new Map<string, string>();
  try {
    const result = await runSppo(setup, {
      ...hooks,
      onStage: (e) => {
        stages.set(`${e.iteration}:${e.stage}`, e.status);
        hooks.onStage?.(e);
      },
    });
    const trained = new Map(setup.model.params().map((p) => [p.name, setup.model.getParam(p.name)]));
    return { runDir: result.dir, stages, trained, seconds: (performance.now() - t0) / 1000 };
  } finally {
    await setup.model.dispose();
    await setup.preference.dispose();
  }
}

const ALL_STAGES: [number, StageName][] = [
  [0, 'base'],
  [0, 'base-eval'],
  [1, 'generate'],
  [1, 'judge'],
  [1, 'dataset'],
  [1, 'train'],
  [1, 'evaluate'],
];

// ---- the stage files ----

interface Generations {
  prompts: { text: string; ids: number[] }[];
  responses: { tokens: number[]; logprobs: number[]; text: string; stopReason: string }[][];
}
interface Dataset {
  mode: string;
  pairs: {
    prompt: number[];
    chosen: { response: number[]; refLogp: number; target: number };
    rejected: { response: number[]; refLogp: number; target: number };
    q?: number;
  }[];
  sources: { prompt: number; chosen: number; rejected: number }[];
  skipped: number[];
  winRates: number[][];
}
interface Sample {
  prompt: string;
  answer: string;
  tokens: number[];
}
interface Interval {
  mean: number;
  n: number;
}
interface Evaluation {
  samples: Sample[];
  winRateVsBase: Interval;
  winRateVsPrevious: Interval;
}
interface Iteration {
  gen: Generations;
  P: number[][][];
  data: Dataset;
  steps: { step: number; loss: number; gradNorm?: number }[];
  ev: Evaluation;
  base: Evaluation;
}

const stage = <T>(runDir: string, ...parts: string[]): T => JSON.parse(readFileSync(path.join(runDir, ...parts), 'utf8')).value as T;
const sameText = (xs: readonly string[]): number[][] => xs.map((a) => xs.map((b) => (a === b ? 1 : 0)));

/** Reads iteration 1's stage files and checks everything that holds whatever the judge. */
async function checkIteration(run: Run): Promise<Iteration> {
  const { runDir } = run;
  for (const f of [
    'run.json',
    'base/base.json',
    'base/eval.json',
    'metrics.jsonl',
    ...['generations', 'judgments', 'dataset', 'train', 'eval'].map((s) => `iter-1/${s}.json`),
  ])
    expect(existsSync(path.join(runDir, f)), f).toBe(true);
  expect(existsSync(path.join(runDir, 'iter-2'))).toBe(false);

  // generate: PER_ITERATION prompts (chat-template ids), K decoded responses each with their log-probs
  const gen = stage<Generations>(runDir, 'iter-1', 'generations.json');
  expect(gen.prompts).toHaveLength(PER_ITERATION);
  for (const p of gen.prompts) {
    expect(PROMPTS).toContain(p.text);
    expect(p.ids).toEqual(tokenizer.encodeChat([{ role: 'user', content: p.text }], { addGenerationPrompt: true }));
  }
  expect(gen.responses).toHaveLength(PER_ITERATION);
  for (const rs of gen.responses) {
    expect(rs).toHaveLength(K);
    for (const r of rs) {
      expect(r.tokens.length).toBeGreaterThan(0);
      expect(r.tokens.length).toBeLessThanOrEqual(MAX_NEW);
      expect(r.logprobs).toHaveLength(r.tokens.length);
      expect(r.logprobs.every((l) => Number.isFinite(l) && l <= 0)).toBe(true);
      expect(r.text).toBe(tokenizer.decode(r.tokens, { skipSpecialTokens: true }));
    }
  }

  // judge: one K×K matrix per prompt with P_ii = ½ and P_ij + P_ji = 1
  const { preference: P } = stage<{ preference: number[][][] }>(runDir, 'iter-1', 'judgments.json');
  expect(P).toHaveLength(PER_ITERATION);
  let opinions = 0;
  P.forEach((M, n) => {
    expect(M).toHaveLength(K);
    const same = sameText(gen.responses[n].map((r) => r.text));
    for (let i = 0; i < K; i++) {
      expect(M[i]).toHaveLength(K);
      for (let j = 0; j < K; j++) {
        expect(M[i][j]).toBeGreaterThanOrEqual(0);
        expect(M[i][j]).toBeLessThanOrEqual(1);
        expect(Math.abs(M[i][j] + M[j][i] - 1), `prompt ${n}: P[${i}][${j}] + P[${j}][${i}]`).toBeLessThan(1e-12);
        if (same[i][j]) expect(M[i][j]).toBe(0.5);
        if (i !== j && Math.abs(M[i][j] - 0.5) > 1e-3 && Math.abs(M[i][j] - 0.5) < 0.49) opinions++;
      }
    }
  });
  // A judge with no opinion (all ½) or a saturated one (all 0 or 1) would make the comparisons
  // below weak: most entries must lie in between.
  expect(opinions).toBeGreaterThan((PER_ITERATION * K * (K - 1)) / 2);

  // dataset: win rates are the rows' means (diagonal included), one (argmax, argmin) pair per prompt
  const data = stage<Dataset>(runDir, 'iter-1', 'dataset.json');
  expect(data.mode).toBe('pair');
  const rates = P.map((M) => M.map((row) => row.reduce((a, b) => a + b, 0) / K));
  data.winRates.forEach((r, n) => r.forEach((v, i) => expect(v).toBeCloseTo(rates[n][i], 12)));
  expect(data.pairs.length + data.skipped.length).toBe(PER_ITERATION);
  expect(data.pairs.length).toBeGreaterThan(0);
  data.sources.forEach((s, m) => {
    const r = rates[s.prompt];
    expect(r[s.chosen]).toBeCloseTo(Math.max(...r), 12);
    expect(r[s.rejected]).toBeCloseTo(Math.min(...r), 12);
    const pair = data.pairs[m];
    const [w, l] = [gen.responses[s.prompt][s.chosen], gen.responses[s.prompt][s.rejected]];
    expect(pair.prompt).toEqual(gen.prompts[s.prompt].ids);
    expect(pair.chosen.response).toEqual(w.tokens);
    expect(pair.rejected.response).toEqual(l.tokens);
    expect(pair.chosen.refLogp).toBeCloseTo(
      w.logprobs.reduce((a, b) => a + b, 0),
      9,
    );
    expect(pair.chosen.target).toBeCloseTo(r[s.chosen], 12);
    expect(pair.rejected.target).toBeCloseTo(r[s.rejected], 12);
    expect(pair.q).toBe(P[s.prompt][s.chosen][s.rejected]);
  });

  // train: ceil(pairs / batchSize) optimizer steps (gradAccumSteps 1, one epoch), finite losses
  const { steps } = stage<{ steps: Iteration['steps'] }>(runDir, 'iter-1', 'train.json');
  expect(steps).toHaveLength(Math.ceil(data.pairs.length / BATCH));
  steps.forEach((s, i) => {
    expect(s.step).toBe(i + 1);
    expect(Number.isFinite(s.loss)).toBe(true);
    expect(s.gradNorm).toBeGreaterThan(0);
  });
  const rows = readFileSync(path.join(runDir, 'metrics.jsonl'), 'utf8')
    .trimEnd()
    .split('\n')
    .map((l) => JSON.parse(l));
  expect(rows.map((r) => r.iteration)).toEqual([0, 1]);
  expect(rows[1].train.steps).toBe(steps.length);
  expect(rows[1].train.last.loss).toBe(steps[steps.length - 1].loss);

  // the checkpoint loads back as the weights the run trained, which moved away from π_0
  const plan = { maxBatch: 1, maxSeq: 64 };
  const [base, iter1] = await Promise.all([
    loadPretrained(path.join(runDir, 'base/policy'), plan),
    loadPretrained(path.join(runDir, 'iter-1/policy'), plan),
  ]);
  try {
    expect(iter1.model.config).toEqual(base.model.config);
    expect(iter1.tokenizer?.vocabSize).toBe(32000);
    let moved = 0;
    for (const { name } of iter1.model.params()) {
      const t = iter1.model.getParam(name);
      expect(
        t.every((v, i) => v === run.trained.get(name)![i]),
        `iter-1/policy ${name} is the trained model's`,
      ).toBe(true);
      if (t.some((v, i) => v !== base.model.getParam(name)[i])) moved++;
    }
    expect(moved).toBeGreaterThan(0);
  } finally {
    await Promise.all([base.model.dispose(), iter1.model.dispose()]);
  }

  // evaluate: a sample per held-out prompt, judged against π_0's
  const ev = stage<Evaluation>(runDir, 'iter-1', 'eval.json');
  const baseEv = stage<Evaluation>(runDir, 'base', 'eval.json');
  expect(ev.samples).toHaveLength(EVAL);
  expect(ev.samples.map((s) => s.prompt)).toEqual(baseEv.samples.map((s) => s.prompt));
  expect(ev.winRateVsBase.n).toBe(EVAL);
  expect(ev.samples.some((s) => gen.prompts.some((p) => p.text === s.prompt))).toBe(false);
  return { gen, P, data, steps, ev, base: baseEv };
}

const items = (it: Iteration) => it.gen.prompts.map((p, n) => ({ prompt: p.text, responses: it.gen.responses[n].map((r) => r.text) }));
const versusItems = (it: Iteration) =>
  it.ev.samples.map((s, n) => ({ prompt: s.prompt, responses: [s.answer, it.base.samples[n].answer] }));

/** The stored matrices and the evaluation's win rate equal the judge's own answers, within 1e-6. */
async function expectSameAsDirect(it: Iteration, judge: PreferenceModel): Promise<void> {
  // prompt by prompt, so the engine judges batch differently from the pipeline's one call
  for (const [n, item] of items(it).entries()) {
    const direct = await judge.compare(item.prompt, item.responses);
    for (let i = 0; i < K; i++)
      for (let j = 0; j < K; j++) expect(Math.abs(it.P[n][i][j] - direct[i][j]), `prompt ${n} P[${i}][${j}]`).toBeLessThan(1e-6);
  }
  const vs = await judge.compareBatch(versusItems(it));
  const mean = vs.reduce((a, M) => a + M[0][1], 0) / vs.length;
  expect(Math.abs(it.ev.winRateVsBase.mean - mean)).toBeLessThan(1e-6);
}

// ---- http ----

/** A chat-completions server on loopback: `answer` turns a request (its JSON body and URL) into a status and a JSON body. */
async function judgeServer(
  answer: (body: unknown, url: string | undefined) => { status?: number; body: unknown },
): Promise<{ server: Server; baseUrl: string }> {
  const server = createServer((req, res) => {
    let raw = '';
    req.setEncoding('utf8');
    req.on('data', (c: string) => (raw += c));
    req.on('end', () => {
      const { status = 200, body } = answer(JSON.parse(raw), req.url);
      res.writeHead(status, { 'content-type': 'application/json' });
      res.end(JSON.stringify(body));
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return { server, baseUrl: `http://127.0.0.1:${(server.address() as AddressInfo).port}/v1` };
}

async function closeServer(server: Server | undefined): Promise<void> {
  server?.closeAllConnections();
  await new Promise((r) => server?.close(r));
}

interface Answered {
  prompt: string;
  a: string;
  b: string;
  top: { token: string; logprob: number }[];
}

describe("preference kind 'http': an OpenAI-compatible server on loopback", () => {
  let server: Server;
  let baseUrl: string;
  let requests = 0;
  let refused = 0;
  /** what the server answered, per ordered comparison */
  const answered = new Map<string, Answered>();
  const key = (prompt: string, a: string, b: string): string => JSON.stringify([prompt, a, b]);
  let configFile: string;
  let first: Run;
  let it1: Iteration;

  beforeAll(async () => {
    // Deterministic logprobs from a hash of the question: 'A', ' A' (both read as A), 'B', and a
    // distractor 'C' that the judge must ignore.
    ({ server, baseUrl } = await judgeServer((json, url) => {
      requests++;
      const body = json as {
        model: string;
        messages: { role: string; content: string }[];
        max_tokens: number;
        logprobs: unknown;
        top_logprobs: number;
      };
      const m = HTTP_QUESTION.exec(body.messages.find((x) => x.role === 'user')?.content ?? '');
      if (!m || body.model !== 'judge-model' || body.max_tokens !== 1 || body.logprobs !== true || url !== '/v1/chat/completions') {
        refused++;
        return { status: 400, body: { error: { message: 'not the expected judge request' } } };
      }
      const [, prompt, a, b] = m;
      const h = createHash('sha256')
        .update(key(prompt, a, b))
        .digest();
      const u = (i: number): number => h.readUInt32BE(4 * i) / 2 ** 32;
      const top = [
        { token: 'A', logprob: -0.1 - 3 * u(0) },
        { token: ' A', logprob: -1 - 3 * u(1) },
        { token: 'B', logprob: -0.1 - 3 * u(2) },
        { token: 'C', logprob: -0.7 },
      ];
      answered.set(key(prompt, a, b), { prompt, a, b, top });
      const best = top.reduce((x, y) => (y.logprob > x.logprob ? y : x));
      return {
        body: {
          id: 'chatcmpl-test',
          object: 'chat.completion',
          model: 'judge-model',
          choices: [
            {
              index: 0,
              message: { role: 'assistant', content: best.token.trim() },
              finish_reason: 'length',
              logprobs: { content: [{ token: best.token, logprob: best.logprob, top_logprobs: top }] },
            },
          ],
        },
      };
    }));
    configFile = writeRunConfig('http', {
      kind: 'http',
      baseUrl,
      model: 'judge-model',
      template: HTTP_TEMPLATE,
      requestConcurrency: 4,
      maxRetries: 0,
    });
    first = await sppoRun(configFile);
    console.log(`http: first run ${first.seconds.toFixed(1)} s, ${requests} requests`);
  });
  afterAll(() => closeServer(server));

  /** q(a, b) by hand from the logprobs the server returned: A's mass over A's and B's. */
  const q = (prompt: string, a: string, b: string): number => {
    const got = answered.get(key(prompt, a, b));
    if (!got) throw new Error(`the server was never asked ${key(prompt, a, b)}`);
    const mass = (letter: string) => got.top.filter((t) => t.token.trim() === letter).reduce((s, t) => s + Math.exp(t.logprob), 0);
    return mass('A') / (mass('A') + mass('B'));
  };
  const expectedMatrix = (prompt: string, rs: readonly string[]): number[][] =>
    rs.map((a, i) => rs.map((b, j) => (i === j || a === b ? 0.5 : (q(prompt, a, b) + 1 - q(prompt, b, a)) / 2)));
  /** Every ordered comparison of distinct texts the judge and evaluate stages need. */
  const needed = (it: Iteration, stages: ('judge' | 'evaluate')[]): Set<string> => {
    const out = new Set<string>();
    const add = ({ prompt, responses }: { prompt: string; responses: string[] }) =>
      responses.forEach((a) => responses.forEach((b) => a !== b && out.add(key(prompt, a, b))));
    if (stages.includes('judge')) items(it).forEach(add);
    if (stages.includes('evaluate')) versusItems(it).forEach(add);
    return out;
  };

  it('runs the iteration: stage files, P_ij + P_ji = 1, training set, training, checkpoint', async () => {
    it1 = await checkIteration(first);
  });

  it('the stored P is what the server’s logprobs give, both orders averaged; so is the evaluation’s win rate', () => {
    expect(refused).toBe(0);
    it1.P.forEach((M, n) => {
      const expected = expectedMatrix(
        it1.gen.prompts[n].text,
        it1.gen.responses[n].map((r) => r.text),
      );
      for (let i = 0; i < K; i++) for (let j = 0; j < K; j++) expect(M[i][j]).toBeCloseTo(expected[i][j], 12);
    });
    const vs = versusItems(it1).map(({ prompt, responses }) => expectedMatrix(prompt, responses)[0][1]);
    expect(it1.ev.winRateVsBase.mean).toBeCloseTo(vs.reduce((a, b) => a + b, 0) / vs.length, 12);
  });

  it('asks each distinct ordered comparison exactly once (the evaluation’s second matchup comes from the cache)', () => {
    const want = needed(it1, ['judge', 'evaluate']);
    expect(new Set(answered.keys())).toEqual(want);
    expect(requests).toBe(want.size);
    expect(existsSync(path.join(first.runDir, 'judge-cache'))).toBe(true);
  });

  it('resuming the finished run skips every stage and sends no request', async () => {
    const before = requests;
    const again = await sppoRun(configFile);
    expect(requests - before).toBe(0);
    for (const [t, s] of ALL_STAGES) expect(again.stages.get(`${t}:${s}`), `${t}:${s}`).toBe('skipped');
  });

  it('redoing the judge and evaluate stages is answered from the disk cache: zero requests, the same results', async () => {
    const judgments = readFileSync(path.join(first.runDir, 'iter-1/judgments.json'), 'utf8');
    const ev = stage<Evaluation>(first.runDir, 'iter-1', 'eval.json');
    rmSync(path.join(first.runDir, 'iter-1/judgments.json'));
    rmSync(path.join(first.runDir, 'iter-1/eval.json'));
    const before = requests;
    const redo = await sppoRun(configFile);
    expect(requests - before).toBe(0);
    expect(redo.stages.get('1:judge')).toBe('done');
    expect(redo.stages.get('1:evaluate')).toBe('done');
    expect(redo.stages.get('1:train')).toBe('skipped');
    expect(JSON.parse(readFileSync(path.join(first.runDir, 'iter-1/judgments.json'), 'utf8')).value).toEqual(JSON.parse(judgments).value);
    expect(stage<Evaluation>(first.runDir, 'iter-1', 'eval.json')).toEqual(ev);
  });

  it('without the cache the judge stage asks the server again, once per ordered comparison', async () => {
    const judgments = stage<unknown>(first.runDir, 'iter-1', 'judgments.json');
    rmSync(path.join(first.runDir, 'iter-1/judgments.json'));
    rmSync(path.join(first.runDir, 'judge-cache'), { recursive: true });
    const before = requests;
    await sppoRun(configFile);
    expect(requests - before).toBe(needed(it1, ['judge']).size);
    expect(stage<unknown>(first.runDir, 'iter-1', 'judgments.json')).toEqual(judgments);
    expect(refused).toBe(0);
  });
});

// ---- unusable verdicts ----

describe("preference kind 'http' answering in prose: unusable verdicts", () => {
  let server: Server;
  let baseUrl: string;
  /** the ordered comparisons asked, one entry per request */
  const asked: string[] = [];
  /** whether the server answers this ordered comparison in prose (else a letter) */
  let prose: (question: string) => boolean = () => true;

  beforeAll(async () => {
    ({ server, baseUrl } = await judgeServer((json) => {
      const question = (json as { messages: { role: string; content: string }[] }).messages.find((m) => m.role === 'user')!.content;
      asked.push(question);
      // prose that opens with a capital B, which is not the letter B
      const content = prose(question)
        ? 'Both responses have merits, but I would lean towards the first.'
        : createHash('sha256').update(question).digest()[0] % 2
          ? 'A'
          : 'B';
      return { body: { object: 'chat.completion', choices: [{ index: 0, message: { role: 'assistant', content }, logprobs: null }] } };
    }));
  });
  afterAll(() => closeServer(server));
  const config = (name: string, extra: Record<string, unknown> = {}) =>
    writeRunConfig(name, { kind: 'http', baseUrl, model: 'judge-model', template: HTTP_TEMPLATE, maxRetries: 1, ...extra });
  const cacheFiles = (runDir: string): string[] =>
    existsSync(path.join(runDir, 'judge-cache'))
      ? readdirSync(path.join(runDir, 'judge-cache'), { recursive: true, withFileTypes: true })
          .filter((d) => d.isFile())
          .map((d) => d.name)
      : [];

  it('a judge answering in prose fails the judge stage with a clear error and caches nothing; once it answers, the resume asks again', async () => {
    prose = () => true;
    asked.length = 0;
    const file = config('prose');
    const runDir = path.join(tmp, 'prose', 'run');
    const err = await sppoRun(file).catch((e: unknown) => e);
    expect(err).toMatchObject({ name: 'UnusableVerdictsError' });
    const message = (err as Error).message;
    expect(message).toMatch(
      /^iteration 1 judge: preference model 'http\(judge-model@.*\)': (\d+) of \1 verdicts \(100%\) were unusable, more than preference\.maxUnusableFraction = 5% allows; e\.g\. prompt 0: responses 0 and 1 \(0 shown as A\): the answer "Both responses have merits, but I would lean towards the first\." names neither A nor B/,
    );
    const verdicts = Number(/(\d+) of/.exec(message)![1]);
    expect(asked).toHaveLength(2 * verdicts); // each asked, and retried once (maxRetries 1)
    expect(existsSync(path.join(runDir, 'iter-1', 'judgments.json'))).toBe(false);
    expect(existsSync(path.join(runDir, 'metrics.jsonl'))).toBe(true); // π_0's row only
    expect(cacheFiles(runDir)).toEqual([]);

    // the judge answers now: the judge stage asks every comparison again (nothing unusable was cached)
    prose = () => false;
    asked.length = 0;
    const lines: string[] = [];
    const resumed = await sppoRun(
      file,
      runProgressHooks(new Progress({ write: (s: string) => lines.push(s) } as unknown as NodeJS.WritableStream, false)),
    );
    expect(resumed.stages.get('1:generate')).toBe('skipped');
    expect(resumed.stages.get('1:judge')).toBe('done');
    const judged = stage<{ verdicts: number; unusable: number }>(runDir, 'iter-1', 'judgments.json');
    expect(judged).toMatchObject({ verdicts, unusable: 0 });
    expect(new Set(asked.slice(0, verdicts)).size).toBe(verdicts);
    expect(lines.join('')).toContain(`iteration 1 judge: 0 of ${verdicts} verdicts unusable\n`);
  });

  it('a few unusable verdicts, within preference.maxUnusableFraction, are scored ½ and counted in the stage file, the progress line and the metrics', async () => {
    let first: string | undefined;
    prose = (q) => (first ??= q) === q; // the first comparison asked, every time it is asked
    asked.length = 0;
    const lines: string[] = [];
    const run = await sppoRun(
      config('few'),
      runProgressHooks(new Progress({ write: (s: string) => lines.push(s) } as unknown as NodeJS.WritableStream, false)),
    );
    const judged = stage<{ preference: number[][][]; verdicts: number; unusable: number }>(run.runDir, 'iter-1', 'judgments.json');
    expect(judged.unusable).toBe(1);
    expect(judged.verdicts).toBeGreaterThan(20); // so 1 is within 5%
    expect(asked.filter((q) => q === first)).toHaveLength(2);
    expect(cacheFiles(run.runDir)).toHaveLength(new Set(asked).size - 1);
    expect(lines.join('')).toContain(`iteration 1 judge: 1 of ${judged.verdicts} verdicts unusable (scored ½)\n`);
    const rows = readFileSync(path.join(run.runDir, 'metrics.jsonl'), 'utf8')
      .trimEnd()
      .split('\n')
      .map((l) => JSON.parse(l) as { verdicts?: unknown });
    expect(rows[0].verdicts).toBeUndefined();
    expect(rows[1].verdicts).toEqual({ total: judged.verdicts, unusable: 1 });
  });

  it('raising preference.maxUnusableFraction lets an all-prose judge through, every matrix ½', async () => {
    prose = () => true;
    const run = await sppoRun(config('lenient', { maxUnusableFraction: 1 }));
    const judged = stage<{ preference: number[][][]; verdicts: number; unusable: number }>(run.runDir, 'iter-1', 'judgments.json');
    expect(judged.unusable).toBe(judged.verdicts);
    expect(judged.preference.flat(2).every((p) => p === 0.5)).toBe(true);
  });
});

// ---- engine judges ----

describe.each([
  { kind: 'lm-judge', dir: lmJudgeDir, load: () => loadLmJudge(lmJudgeDir, { batchSize: 4, maxSeq: 256 }) },
  { kind: 'reward-model', dir: rewardDir, load: () => loadRewardModel(rewardDir, { batchSize: 4, maxSeq: 256, temperature: TAU }) },
])('preference kind $kind', ({ kind, dir, load }) => {
  let run: Run;
  let it1: Iteration;

  beforeAll(async () => {
    const options = kind === 'reward-model' ? { temperature: TAU } : {};
    run = await sppoRun(
      writeRunConfig(kind, { kind, path: path.relative(path.join(tmp, kind), dir), batchSize: 4, maxSeq: 256, ...options }),
    );
    console.log(`${kind}: run ${run.seconds.toFixed(1)} s`);
  });

  it('runs the iteration: stage files, P_ij + P_ji = 1, training set, training, checkpoint', async () => {
    it1 = await checkIteration(run);
  });

  it('the stored P and the evaluation’s win rate are what the judge loaded directly gives, within 1e-6', async () => {
    const judge = await load();
    try {
      expect(judge.id).toContain(dir);
      await expectSameAsDirect(it1, judge);
    } finally {
      await judge.dispose();
    }
  });
});
