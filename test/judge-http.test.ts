// The HTTP judge against a real local server (node:http on 127.0.0.1) that answers like an
// OpenAI chat-completions endpoint and is scripted per test: logprob and text-only answers,
// position-bias averaging, 429 / 500 / slow / malformed replies and their retries, the request
// concurrency limit, the disk cache (a second run makes no requests; a run aborted mid-batch
// reruns only what is missing) and the API key (sent as Bearer, never written to the cache).
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { parseConfig, RunConfigError } from '../lib/config/index.js';
import { assertPreferenceMatrix, httpJudge, verdictFromCompletion, type HttpJudgeOptions } from '../lib/preference/index.js';

const tmp = mkdtempSync(path.join(tmpdir(), 'sppo-judge-http-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));
let dirs = 0;
const freshDir = (): string => path.join(tmp, `cache-${dirs++}`);

// A template the server can read back: which prompt, which response is A and which is B.
const TEMPLATE = 'P:{prompt}\nA:{a}\nB:{b}';

interface Ask {
  prompt: string;
  a: string;
  b: string;
  body: Record<string, unknown>;
  headers: IncomingMessage['headers'];
  /** 1-based index of this request among all the server has seen */
  n: number;
}
type Reply = {
  status?: number;
  headers?: Record<string, string>;
  body?: unknown;
  raw?: string;
  delayMs?: number;
  hold?: boolean;
  /** writes the whole response itself (a stream) */
  custom?: (res: ServerResponse) => Promise<void>;
};

let handler: (ask: Ask) => Reply | Promise<Reply> = () => ({ body: completion({ text: 'A' }) });
const log: Ask[] = [];
let inFlight = 0;
let peakInFlight = 0;
let server: Server;
let baseUrl: string;

/** An OpenAI chat completion of one token: `text`, and `top` as top_logprobs (token → probability). */
function completion({ text, top }: { text: string | null; top?: Record<string, number> }): unknown {
  return {
    id: 'chatcmpl-test',
    object: 'chat.completion',
    model: 'judge-model',
    choices: [
      {
        index: 0,
        message: { role: 'assistant', content: text },
        logprobs: top
          ? {
              content: [
                {
                  token: text ?? '',
                  logprob: 0,
                  top_logprobs: Object.entries(top).map(([token, p]) => ({ token, logprob: Math.log(p), bytes: null })),
                },
              ],
            }
          : null,
        finish_reason: 'length',
      },
    ],
  };
}

beforeAll(async () => {
  async function answer(req: IncomingMessage, res: ServerResponse, data: string): Promise<void> {
    inFlight++;
    peakInFlight = Math.max(peakInFlight, inFlight);
    let done = false;
    const finish = (): void => {
      if (!done) inFlight--;
      done = true;
    };
    res.on('close', finish);
    const body = JSON.parse(data) as { messages: { role: string; content: string }[] };
    const user = body.messages.find((m) => m.role === 'user')!.content;
    const m = /^P:(.*)\nA:(.*)\nB:(.*)$/s.exec(user)!;
    const ask: Ask = { prompt: m[1], a: m[2], b: m[3], body, headers: req.headers, n: log.length + 1 };
    log.push(ask);
    const reply = await handler(ask);
    if (reply.hold) return; // never answered: the client's abort closes it
    if (reply.custom) {
      await reply.custom(res);
      finish();
      return;
    }
    if (reply.delayMs) await new Promise((r) => setTimeout(r, reply.delayMs));
    if (!res.destroyed) {
      res.writeHead(reply.status ?? 200, { 'content-type': 'application/json', ...reply.headers });
      res.end(reply.raw ?? JSON.stringify(reply.body));
    }
    finish();
  }
  server = createServer((req: IncomingMessage, res: ServerResponse) => {
    let data = '';
    req.setEncoding('utf8');
    req.on('data', (c: string) => (data += c));
    req.on('end', () => void answer(req, res, data));
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  baseUrl = `http://127.0.0.1:${(server.address() as AddressInfo).port}/v1`;
});
afterAll(async () => {
  server.closeAllConnections();
  await new Promise((r) => server.close(r));
});
afterEach(() => {
  log.length = 0;
  peakInFlight = 0;
  handler = () => ({ body: completion({ text: 'A' }) });
});

const judge = (opts: Partial<HttpJudgeOptions> = {}) =>
  httpJudge({ baseUrl, model: 'judge-model', template: TEMPLATE, backoffMs: 5, maxBackoffMs: 50, ...opts });

// Scripted q(first, second) = P(first ≻ second | first shown as A), with a position bias toward A.
const q = (a: string, b: string): number => Math.min(0.95, Math.max(0.05, 0.6 + 0.1 * (a.length - b.length)));
const logprobReply = ({ a, b }: Ask): Reply => {
  const p = q(a, b);
  // A and B split 90% of the mass between spaced and bare tokens; 10% goes to a distractor
  return {
    body: completion({ text: p >= 0.5 ? 'A' : 'B', top: { A: 0.6 * p, ' A': 0.3 * p, B: 0.6 * (1 - p), ' B': 0.3 * (1 - p), C: 0.1 } }),
  };
};

describe('httpJudge answers', () => {
  it('asks both orders with 1 token, temperature 0, top-5 logprobs, and averages out position bias', async () => {
    handler = logprobReply;
    const j = judge();
    const responses = ['a', 'bbb', 'cc', 'dddd'];
    const P = await j.compare('hello', responses);
    assertPreferenceMatrix(P, { size: 4 });
    expect(log).toHaveLength(12); // K(K − 1) ordered pairs
    for (const { body } of log)
      expect(body).toMatchObject({ model: 'judge-model', max_tokens: 1, temperature: 0, logprobs: true, top_logprobs: 5 });
    for (let i = 0; i < 4; i++)
      for (let j2 = 0; j2 < 4; j2++) {
        if (i === j2) continue;
        const expected = (q(responses[i], responses[j2]) + 1 - q(responses[j2], responses[i])) / 2;
        expect(P[i][j2]).toBeCloseTo(expected, 12);
        expect(P[i][j2] + P[j2][i]).toBe(1);
      }
    expect(j.stats).toMatchObject({ requests: 12, answers: 12, fromLogprobs: 12, fromText: 0, unparseable: 0 });
  });

  it('scores a judge that always answers A (pure position bias) ½ everywhere', async () => {
    handler = () => ({ body: completion({ text: 'A', top: { A: 0.99, B: 0.01 } }) });
    const P = await judge().compare('x', ['one', 'two', 'three']);
    expect(P.flat().every((v) => Math.abs(v - 0.5) < 1e-12)).toBe(true);
  });

  it('reads text-only answers: first non-space A → 1, B → 0, anything else ½ (an unusable verdict, after its retries)', async () => {
    const say: Record<string, string> = { 'x|y': ' A', 'y|x': 'B', 'x|z': 'maybe', 'z|x': '  B.', 'y|z': 'A', 'z|y': '' };
    handler = ({ a, b }) => ({ body: completion({ text: say[`${a}|${b}`] }) });
    const j = judge({ maxRetries: 1 });
    const judged = await j.judge('p', ['x', 'y', 'z'], { maxUnusableFraction: 0.5 });
    const P = judged.P;
    expect(P[0][1]).toBe(1); // x first: A; y first: B
    expect(P[0][2]).toBe(0.75); // ½(½ + 1 − 0)
    expect(P[1][2]).toBe(0.75); // ½(1 + 1 − ½)
    expect(j.stats).toMatchObject({ fromText: 4, unparseable: 2, retries: 2, requests: 8 });
    expect(judged.verdicts).toBe(6);
    expect(judged.unusable).toEqual([
      'responses 0 and 2 (0 shown as A): the answer "maybe" names neither A nor B',
      'responses 2 and 1 (2 shown as A): an empty answer',
    ]);
  });

  it('scores identical responses ½ without a request, and asks a duplicated pair once', async () => {
    handler = logprobReply;
    const j = judge();
    const P = await j.compare('p', ['same', 'same', 'other']);
    expect(P[0][1]).toBe(0.5);
    expect(P[0][2]).toBe(P[1][2]);
    expect(log).toHaveLength(2);
  });

  it('parses completions as documented', () => {
    expect(verdictFromCompletion(completion({ text: 'B', top: { '\u2581A': 0.2, 'Ġ B': 0.6 } }))).toMatchObject({
      p: 0.25,
      source: 'logprobs',
    });
    expect(verdictFromCompletion(completion({ text: 'A', top: { the: 0.9 } }))).toMatchObject({ p: 1, source: 'text' });
    for (const [answer, p] of [
      ['A is better.', 1],
      ['  B)', 0],
      ['Both are fine.', 0.5],
      ['As an AI, I cannot say.', 0.5],
      ['Ä', 0.5],
      ['B2', 0.5],
      ['', 0.5],
    ] as const)
      expect(verdictFromCompletion(completion({ text: answer })), answer).toMatchObject({ p, source: p === 0.5 ? 'unparseable' : 'text' });
    expect(verdictFromCompletion({ choices: [] })).toBeUndefined();
    expect(verdictFromCompletion({ choices: [{ message: { content: null } }] })).toBeUndefined();
  });
});

describe('httpJudge API key', () => {
  it('sends the key from apiKeyEnv as Bearer and never writes it to the cache', async () => {
    const secret = 'sk-test-5ecret-do-not-store';
    const cacheDir = freshDir();
    const j = judge({ apiKeyEnv: 'JUDGE_KEY', env: { JUDGE_KEY: secret }, cacheDir });
    await j.compare('p', ['a', 'b']);
    expect(log.map((l) => l.headers.authorization)).toEqual([`Bearer ${secret}`, `Bearer ${secret}`]);
    const files = readdirSync(cacheDir, { recursive: true, withFileTypes: true }).filter((d) => d.isFile());
    expect(files).toHaveLength(2);
    for (const f of files) expect(readFileSync(path.join(f.parentPath, f.name), 'utf8')).not.toContain(secret);
    expect(j.id).not.toContain(secret);
  });

  it('refuses to start when the variable is unset, and sends no header without apiKeyEnv', async () => {
    expect(() => judge({ apiKeyEnv: 'JUDGE_KEY_MISSING', env: {} })).toThrow(/JUDGE_KEY_MISSING \(apiKeyEnv\) is not set/);
    await judge().compare('p', ['a', 'b']);
    expect(log[0].headers.authorization).toBeUndefined();
  });

  it('a different key shares the cache (the key is not part of it)', async () => {
    const cacheDir = freshDir();
    await judge({ apiKeyEnv: 'K', env: { K: 'one' }, cacheDir }).compare('p', ['a', 'b']);
    await judge({ apiKeyEnv: 'K', env: { K: 'two' }, cacheDir }).compare('p', ['a', 'b']);
    expect(log).toHaveLength(2);
  });
});

describe('httpJudge retries', () => {
  it('retries 429 (respecting retry-after-ms) and 500, then succeeds', async () => {
    const times: number[] = [];
    let n = 0;
    handler = ({ a }) => {
      if (a !== 'a') return { body: completion({ text: 'B' }) };
      times.push(Date.now());
      n++;
      if (n === 1) return { status: 429, headers: { 'retry-after-ms': '300' }, body: { error: { message: 'rate limited' } } };
      if (n === 2) return { status: 500, body: { error: { message: 'boom' } } };
      return { body: completion({ text: 'A' }) };
    };
    const j = judge({ requestConcurrency: 1 });
    const P = await j.compare('p', ['a', 'b']);
    assertPreferenceMatrix(P);
    expect(log).toHaveLength(4);
    expect(times[1] - times[0]).toBeGreaterThanOrEqual(280);
    expect(j.stats).toMatchObject({ requests: 4, retries: 2, answers: 2 });
  });

  it('retries a request that times out', async () => {
    let slow = true;
    handler = ({ a }) => {
      if (a !== 'a') return { body: completion({ text: 'B' }) };
      if (slow) {
        slow = false;
        return { delayMs: 400, body: completion({ text: 'B' }) };
      }
      return { body: completion({ text: 'A' }) };
    };
    const j = judge({ requestConcurrency: 1, timeoutMs: 100 });
    const P = await j.compare('p', ['a', 'b']);
    expect(P[0][1]).toBe(1); // the retry's 'A' for a first, 'B' for b first: the slow reply was not used
    expect(j.stats.retries).toBe(1);
  });

  it('retries malformed bodies (not JSON, no choices) and then succeeds', async () => {
    handler = ({ n }) =>
      n === 1 ? { raw: '<html>bad gateway' } : n === 2 ? { body: { object: 'chat.completion' } } : { body: completion({ text: 'A' }) };
    const j = judge({ requestConcurrency: 1 });
    await j.compare('p', ['a', 'b']);
    expect(j.stats.retries).toBe(2);
  });

  it('reports the status and a body excerpt after the last retry', async () => {
    handler = () => ({ status: 503, body: { error: { message: 'overloaded, try later' } } });
    const j = judge({ maxRetries: 2 });
    await expect(j.compare('p', ['a', 'b'])).rejects.toThrow(/failed after 3 attempts: HTTP 503: .*overloaded, try later/);
    expect(log).toHaveLength(6);
  });

  it('reports a malformed body after the last retry', async () => {
    handler = () => ({ raw: 'not json at all' });
    await expect(judge({ maxRetries: 1 }).compare('p', ['a', 'b'])).rejects.toThrow(/after 2 attempts: .*not JSON: not json at all/);
  });

  it('does not retry a 400', async () => {
    handler = () => ({ status: 400, body: { error: { message: 'unknown model' } } });
    const j = judge();
    await expect(j.compare('p', ['a', 'b'])).rejects.toThrow(/failed: HTTP 400: .*unknown model/);
    expect(log).toHaveLength(2); // one per order, none again
    expect(j.stats.retries).toBe(0);
  });

  it('retries network errors (a connection refused) and names them', async () => {
    const dead = createServer();
    await new Promise<void>((r) => dead.listen(0, '127.0.0.1', r));
    const port = (dead.address() as AddressInfo).port;
    await new Promise((r) => dead.close(r));
    const j = httpJudge({ baseUrl: `http://127.0.0.1:${port}/v1`, model: 'm', maxRetries: 2, backoffMs: 1 });
    await expect(j.compare('p', ['a', 'b'])).rejects.toThrow(/after 3 attempts: network error/);
    expect(j.stats.retries).toBe(4);
  });
});

describe('httpJudge concurrency', () => {
  it('never has more than requestConcurrency requests in flight', async () => {
    handler = (ask) => ({ ...logprobReply(ask), delayMs: 15 });
    const j = judge({ requestConcurrency: 3 });
    const items = ['p1', 'p2', 'p3'].map((prompt) => ({ prompt, responses: ['a', 'bb', 'ccc', 'dddd', 'eeeee'] }));
    const out = await j.compareBatch(items, { concurrency: 3 });
    expect(out).toHaveLength(3);
    expect(log).toHaveLength(60);
    expect(peakInFlight).toBe(3);
  });
});

describe('httpJudge cache', () => {
  it('answers a second run from disk with zero requests', async () => {
    handler = logprobReply;
    const cacheDir = freshDir();
    const responses = ['a', 'bb', 'ccc', 'dd'];
    const first = await judge({ cacheDir }).compare('p', responses);
    expect(log).toHaveLength(12);
    const again = judge({ cacheDir });
    expect(await again.compare('p', responses)).toEqual(first);
    expect(log).toHaveLength(12);
    expect(again.stats).toMatchObject({ requests: 0, cacheHits: 12 });
    // a changed template is another judge: it asks again
    await judge({ cacheDir, template: TEMPLATE.replace('{prompt}', '{prompt} ') }).compare('p', responses);
    expect(log).toHaveLength(24);
    await judge({ cacheDir, model: 'other-model' }).compare('p', responses);
    expect(log).toHaveLength(36);
  });

  it('keeps every answer of a run aborted mid-batch; the rerun asks only for the missing ones', async () => {
    const cacheDir = freshDir();
    const items = ['p1', 'p2', 'p3', 'p4'].map((prompt) => ({ prompt, responses: ['a', 'bb', 'ccc'] })); // 4 × 6 = 24 comparisons
    const N = 7;
    const answered = new Set<string>();
    // the server answers N requests, then holds every later one until the client gives up
    handler = (ask) => {
      if (answered.size >= N) return { hold: true };
      answered.add(`${ask.prompt}|${ask.a}|${ask.b}`);
      return logprobReply(ask);
    };
    const controller = new AbortController();
    const cacheFiles = (): string[] =>
      readdirSync(cacheDir, { recursive: true, withFileTypes: true })
        .filter((d) => d.isFile())
        .map((d) => d.name);
    const run = judge({ cacheDir, requestConcurrency: 4 }).compareBatch(items, { concurrency: 2, signal: controller.signal });
    const caught = run.catch((e: unknown) => e);
    for (let t = 0; t < 400; t++) {
      await new Promise((r) => setTimeout(r, 10));
      try {
        if (cacheFiles().length >= N) break;
      } catch {
        // no cache directory yet
      }
    }
    controller.abort(); // the "kill"
    expect(((await caught) as Error).name).toBe('AbortError');
    expect(cacheFiles()).toHaveLength(N);
    expect(cacheFiles().every((f) => f.endsWith('.json'))).toBe(true); // no temp file left behind

    log.length = 0;
    handler = logprobReply;
    const rerun = judge({ cacheDir });
    const out = await rerun.compareBatch(items);
    const asked = log.map((l) => `${l.prompt}|${l.a}|${l.b}`);
    expect(asked).toHaveLength(24 - N);
    expect(new Set(asked).size).toBe(24 - N);
    for (const k of asked) expect(answered.has(k)).toBe(false);
    expect(rerun.stats.cacheHits).toBe(N);
    out.forEach((P) => assertPreferenceMatrix(P, { size: 3 }));
    // and the same matrices as a run that was never interrupted
    const fresh = await judge().compareBatch(items);
    expect(out).toEqual(fresh);
  });
});

describe("preference kind 'http' in a run config", () => {
  const base = { model: { path: 'model' }, data: { prompts: 'prompts.jsonl' } };
  const problems = (preference: unknown): string[] => {
    try {
      parseConfig({ ...base, preference });
      return [];
    } catch (err) {
      if (err instanceof RunConfigError) return err.problems;
      throw err;
    }
  };

  it('fills the defaults', () => {
    const c = parseConfig({
      ...base,
      preference: { kind: 'http', baseUrl: 'https://api.example.com/v1', model: 'gpt-judge', apiKeyEnv: 'JUDGE_KEY' },
    });
    expect(c.preference).toEqual({
      kind: 'http',
      baseUrl: 'https://api.example.com/v1',
      model: 'gpt-judge',
      apiKeyEnv: 'JUDGE_KEY',
      requestConcurrency: 8,
      timeoutMs: 60_000,
      maxRetries: 5,
      maxResponseBytes: 1024 * 1024,
      concurrency: 4,
      maxUnusableFraction: 0.05,
    });
  });

  it('names what is wrong', () => {
    expect(problems({ kind: 'http', baseUrl: 'ftp://x', model: 'm' })).toEqual(['preference.baseUrl: must be an http(s) URL']);
    expect(problems({ kind: 'http', baseUrl: 'http://x', model: 'm', template: 'Better? {a} or {b}' })).toEqual([
      'preference.template: must contain {prompt}, {a} and {b}',
    ]);
    expect(problems({ kind: 'http', baseUrl: 'http://x', model: 'm', apiKey: 'sk-...' })).toEqual(['preference.apiKey: unknown field']);
  });
});

const cacheFilesOf = (dir: string): string[] =>
  readdirSync(dir, { recursive: true, withFileTypes: true })
    .filter((d) => d.isFile())
    .map((d) => path.join(d.parentPath, d.name));

describe('httpJudge unusable answers', () => {
  const PROSE = 'I think the first response is clearly better.';

  it('retries a prose answer like a malformed body, and caches what it then reads', async () => {
    let prose = 1;
    handler = ({ a }) =>
      a === 'a' && prose-- > 0 ? { body: completion({ text: PROSE }) } : { body: completion({ text: a === 'a' ? 'A' : 'B' }) };
    const cacheDir = freshDir();
    const j = judge({ cacheDir, requestConcurrency: 1 });
    expect(await j.compare('p', ['a', 'b'])).toEqual([
      [0.5, 1],
      [0, 0.5],
    ]);
    expect(j.stats).toMatchObject({ requests: 3, retries: 1, unparseable: 0, fromText: 2 });
    const files = cacheFilesOf(cacheDir);
    expect(files).toHaveLength(2);
    for (const f of files) expect(readFileSync(f, 'utf8')).not.toContain('clearly');
  });

  it('an answer still unreadable after the last retry is scored ½, counted, never cached; past the limit the call fails', async () => {
    handler = ({ a }) => ({ body: completion({ text: a === 'a' ? PROSE : 'B' }) });
    const cacheDir = freshDir();
    const j = judge({ cacheDir, maxRetries: 2 });
    const err = await j.compare('p', ['a', 'b']).catch((e: unknown) => e);
    expect(err).toMatchObject({ name: 'UnusableVerdictsError', unusable: 1, verdicts: 2 });
    expect((err as Error).message).toMatch(
      /1 of 2 verdicts \(50%\) were unusable, more than maxUnusableFraction = 5% allows; e\.g\. responses 0 and 1 \(0 shown as A\): the answer "I think the first response is clearly better\." names neither A nor B/,
    );
    expect(log.filter((l) => l.a === 'a')).toHaveLength(3); // asked, and retried twice
    expect(j.stats).toMatchObject({ unparseable: 1, retries: 2 });
    expect(cacheFilesOf(cacheDir)).toHaveLength(1); // only the readable answer

    // allowed by the call's limit: ½ for the unreadable order, and it is asked again next time (never cached)
    log.length = 0;
    const again = judge({ cacheDir, maxRetries: 0 });
    const judged = await again.judge('p', ['a', 'b'], { maxUnusableFraction: 0.5 });
    expect(judged.P[0][1]).toBe(0.75); // ½(½ + 1 − 0)
    expect(judged.verdicts).toBe(2);
    expect(judged.unusable).toHaveLength(1);
    expect(log.map((l) => l.a)).toEqual(['a']);
    expect(again.stats).toMatchObject({ cacheHits: 1, unparseable: 1 });
    expect(cacheFilesOf(cacheDir)).toHaveLength(1);
  });

  it('NaN or infinite logprobs are unusable verdicts: retried, never cached (formerly "p":null)', async () => {
    // JSON cannot say Infinity; 1e999 parses as it
    const infinite =
      '{"choices":[{"message":{"content":"A"},"logprobs":{"content":[{"token":"A","logprob":0,' +
      '"top_logprobs":[{"token":"A","logprob":1e999},{"token":"B","logprob":-1}]}]}}]}';
    handler = ({ a }) => (a === 'a' ? { raw: infinite } : { body: completion({ text: 'B', top: { A: 0.2, B: 0.8 } }) });
    const cacheDir = freshDir();
    const j = judge({ cacheDir, maxRetries: 1 });
    const judged = await j.judge('p', ['a', 'b'], { maxUnusableFraction: 1 });
    expect(judged.unusable).toEqual(["responses 0 and 1 (0 shown as A): a non-finite logprob (Infinity) for 'A'"]);
    expect(judged.P[0][1]).toBeCloseTo((0.5 + 1 - 0.2) / 2, 12);
    expect(log.filter((l) => l.a === 'a')).toHaveLength(2);
    const files = cacheFilesOf(cacheDir);
    expect(files).toHaveLength(1);
    expect(readFileSync(files[0], 'utf8')).not.toContain('null');
    expect(verdictFromCompletion(completion({ text: 'A', top: { A: Number.NaN, B: 0.5 } }))).toMatchObject({ source: 'unparseable' });
    expect(
      verdictFromCompletion({
        choices: [{ message: { content: 'A' }, logprobs: { content: [{ top_logprobs: [{ token: 'B', logprob: null }] }] } }],
      }),
    ).toMatchObject({ p: 0.5, source: 'unparseable', reason: "a non-finite logprob (null) for 'B'" });
    expect(verdictFromCompletion(completion({ text: 'A', top: { A: 0, B: 0 } }))).toMatchObject({ p: 1, source: 'text' }); // both −∞: the text
  });

  it('asks again what an older version cached as unparseable or "p":null', async () => {
    handler = logprobReply;
    const cacheDir = freshDir();
    await judge({ cacheDir }).compare('p', ['a', 'bb']);
    const files = cacheFilesOf(cacheDir);
    writeFileSync(files[0], JSON.stringify({ p: 0.5, source: 'unparseable', text: 'maybe', model: 'judge-model' }));
    writeFileSync(files[1], JSON.stringify({ p: null, source: 'logprobs', text: 'A', model: 'judge-model' }));
    log.length = 0;
    const again = judge({ cacheDir });
    await again.compare('p', ['a', 'bb']);
    expect(log).toHaveLength(2);
    expect(again.stats).toMatchObject({ cacheHits: 0, fromLogprobs: 2 });
    for (const f of cacheFilesOf(cacheDir)) expect(JSON.parse(readFileSync(f, 'utf8'))).toMatchObject({ source: 'logprobs' });
  });

  it('caches only the verdict and a bounded excerpt of an answer that ignores max_tokens', async () => {
    handler = ({ a }) => ({ body: completion({ text: (a === 'a' ? 'A' : 'B') + ' because'.repeat(50_000) }) });
    const cacheDir = freshDir();
    const j = judge({ cacheDir });
    expect((await j.compare('p', ['a', 'b']))[0][1]).toBe(1);
    for (const f of cacheFilesOf(cacheDir)) {
      const cached = JSON.parse(readFileSync(f, 'utf8')) as { text: string };
      expect(readFileSync(f).length).toBeLessThan(1024);
      expect(cached.text.length).toBeLessThanOrEqual(201);
    }
  });
});

describe('httpJudge response size', () => {
  const MiB = 1024 * 1024;

  it('an endless chunked body fails the request naming the cap, and memory stays bounded', async () => {
    let sent = 0;
    let stopped = false;
    let serverDone: () => void = () => undefined;
    const served = new Promise<void>((r) => (serverDone = r));
    const STREAM_LIMIT = 256 * MiB; // 256 times the cap: a safety stop for a client that never hangs up
    handler = () => ({
      custom: async (res) => {
        res.writeHead(200, { 'content-type': 'application/json' }); // no content-length: chunked
        res.write('{"choices":[{"message":{"content":"');
        const chunk = Buffer.alloc(256 * 1024, 'x');
        while (!res.destroyed && sent < STREAM_LIMIT) {
          sent += chunk.length;
          if (!res.write(chunk)) await new Promise((r) => (res.once('drain', r), res.once('close', r)));
        }
        stopped = res.destroyed;
        res.destroy();
        serverDone();
      },
    });
    const before = process.memoryUsage().rss;
    let peak = before;
    const sampler = setInterval(() => (peak = Math.max(peak, process.memoryUsage().rss)), 5);
    try {
      // the default cap (1 MiB); a cancelled body is not retried
      const err = await judge({ maxRetries: 3, timeoutMs: 60_000 })
        .compare('p', ['a', 'b'])
        .catch((e: unknown) => e);
      expect((err as Error).message).toMatch(
        /failed: the response body is longer than maxResponseBytes \(1048576 bytes\); the request was cancelled/,
      );
    } finally {
      clearInterval(sampler);
    }
    expect(log).toHaveLength(2);
    await served; // the handler's loop ends once it sees the hang-up (or at its own limit)
    console.log(`endless body: the server sent ${(sent / MiB).toFixed(1)} MiB, rss grew ${((peak - before) / MiB).toFixed(1)} MiB`);
    expect(stopped).toBe(true); // the client hung up; the server did not reach its own limit
    expect(sent).toBeLessThan(64 * MiB);
    expect(peak - before).toBeLessThan(100 * MiB);
  });

  it('a body just over the cap fails, one at the cap is read; a content-length over it fails before the body', async () => {
    const body = JSON.stringify(completion({ text: 'A' }));
    const padded = (n: number): string => body + ' '.repeat(n - body.length); // JSON allows trailing spaces
    const cap = 4096;
    let size = cap;
    let declared = false;
    handler = () => ({
      custom: async (res) => {
        const text = padded(size);
        res.writeHead(200, { 'content-type': 'application/json', ...(declared && { 'content-length': String(text.length) }) });
        // in two chunks, so the cap is met by what arrives rather than a header
        res.write(text.slice(0, 3000));
        await new Promise((r) => setTimeout(r, 5));
        res.end(text.slice(3000));
      },
    });
    expect((await judge({ maxResponseBytes: cap }).compare('p', ['a', 'b']))[0][1]).toBe(0.5); // both orders 'A'
    size = cap + 1;
    await expect(judge({ maxResponseBytes: cap, maxRetries: 2 }).compare('p', ['a', 'b'])).rejects.toThrow(
      /longer than maxResponseBytes \(4096 bytes\)/,
    );
    declared = true;
    await expect(judge({ maxResponseBytes: cap }).compare('p', ['a', 'b'])).rejects.toThrow(/longer than maxResponseBytes \(4096 bytes\)/);
    expect(() => judge({ maxResponseBytes: 0 })).toThrow(/maxResponseBytes must be an integer ≥ 1, got 0/);
  });

  it('the cap is a config field, 1 MiB by default', () => {
    const c = parseConfig({
      model: { path: 'model' },
      data: { prompts: 'prompts.jsonl' },
      preference: { kind: 'http', baseUrl: 'http://x', model: 'm', maxResponseBytes: 2048 },
    });
    expect(c.preference).toMatchObject({ maxResponseBytes: 2048 });
  });
});

describe('httpJudge secrets', () => {
  it('refuses a baseUrl with credentials, in httpJudge and in a config, without echoing them', () => {
    for (const baseUrl of ['http://alice:pw-s3cret@127.0.0.1:9/v1', 'https://tok-s3cret@api.example.com/v1']) {
      let err: unknown;
      try {
        httpJudge({ baseUrl, model: 'm' });
      } catch (e) {
        err = e;
      }
      expect((err as Error).message).toMatch(/^httpJudge: baseUrl must not contain credentials \(user:password@\)/);
      expect((err as Error).message).not.toMatch(/s3cret|alice/);
      try {
        parseConfig({ model: { path: 'model' }, data: { prompts: 'p.jsonl' }, preference: { kind: 'http', baseUrl, model: 'm' } });
        expect.unreachable();
      } catch (e) {
        expect((e as RunConfigError).problems).toEqual([
          'preference.baseUrl: must not contain credentials (user:password@): give the API key through apiKeyEnv, the environment variable that holds it',
        ]);
        expect((e as Error).message).not.toMatch(/s3cret|alice/);
      }
    }
    expect(() => httpJudge({ baseUrl: 'no url s3cret', model: 'm' })).toThrow(/^httpJudge: baseUrl is not a valid URL \(e\.g\. https/);
    expect(() => httpJudge({ baseUrl: 'no url s3cret', model: 'm' })).not.toThrow(/s3cret/);
  });

  it('never echoes the API key, even when the server quotes it', async () => {
    const key = 'sk-live-0123456789abcdef';
    handler = ({ headers }) => ({
      status: 401,
      body: { error: { message: `Incorrect API key provided: ${String(headers.authorization)}` } },
    });
    const err = await judge({ apiKeyEnv: 'K', env: { K: key } })
      .compare('p', ['a', 'b'])
      .catch((e: unknown) => e);
    expect((err as Error).message).toMatch(/HTTP 401: .*Incorrect API key provided: Bearer \[API key\]/);
    expect((err as Error).message).not.toContain(key);
    // a key an HTTP header cannot carry is refused before any request, without quoting it
    for (const bad of [`${key}\n`, `${key} x`, 'ключ-s3cret'])
      expect(() => judge({ apiKeyEnv: 'K', env: { K: bad } })).toThrow(
        /^httpJudge: the environment variable K \(apiKeyEnv\) holds characters an HTTP header cannot carry/,
      );
    expect(() => judge({ apiKeyEnv: 'K', env: { K: 'ключ-s3cret' } })).not.toThrow(/s3cret/);
  });
});
