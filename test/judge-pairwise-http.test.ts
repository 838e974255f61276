// The pairwise HTTP judge against a real local ranker (node:http on 127.0.0.1), scripted per
// test: matrix and pair-list answers, position-bias averaging, malformed answers (wrong sizes,
// missing or repeated pairs) that are retried and then fail naming the problem, entries that are
// not probabilities (Python's bare NaN, null, 1.5) that are retried and then scored ½ and counted,
// the disk cache, the body cap and the request limit it shares with the HTTP judge, and the kind
// in a run config.
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { parseConfig, RunConfigError } from '../lib/config/index.js';
import {
  assertPreferenceMatrix,
  pairwiseHttpJudge,
  preferenceFromConfig,
  UnusableVerdictsError,
  type PairwiseHttpJudgeOptions,
} from '../lib/preference/index.js';

const tmp = mkdtempSync(path.join(tmpdir(), 'sppo-judge-pairwise-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));
let dirs = 0;
const freshDir = (): string => path.join(tmp, `cache-${dirs++}`);

interface Ask {
  prompt: string;
  responses: string[];
  headers: IncomingMessage['headers'];
}
interface Reply {
  status?: number;
  /** sent as it is (e.g. Python's json.dumps with a bare NaN) */
  raw?: string;
  body?: unknown;
  delayMs?: number;
}

// A ranker with a position bias: q(i, j) = P(i ≻ j) from the lengths, plus 0.1 toward the first.
const q = (a: string, b: string): number => Math.min(0.95, Math.max(0.05, 0.5 + 0.1 * (a.length - b.length) + 0.1));
const matrixOf = (responses: string[]): number[][] => responses.map((a, i) => responses.map((b, j) => (i === j ? 0 : q(a, b))));

let handler: (ask: Ask) => Reply | Promise<Reply> = ({ responses }) => ({ body: { matrix: matrixOf(responses) } });
const log: Ask[] = [];
let inFlight = 0;
let peakInFlight = 0;
let server: Server;
let url: string;

beforeAll(async () => {
  server = createServer((req: IncomingMessage, res: ServerResponse) => {
    let data = '';
    req.setEncoding('utf8');
    req.on('data', (c: string) => (data += c));
    req.on('end', () => {
      void (async () => {
        inFlight++;
        peakInFlight = Math.max(peakInFlight, inFlight);
        const { prompt, responses } = JSON.parse(data) as { prompt: string; responses: string[] };
        const ask = { prompt, responses, headers: req.headers };
        log.push(ask);
        const reply = await handler(ask);
        if (reply.delayMs) await new Promise((r) => setTimeout(r, reply.delayMs));
        inFlight--;
        res.writeHead(reply.status ?? 200, { 'content-type': 'application/json' });
        res.end(reply.raw ?? JSON.stringify(reply.body));
      })();
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/rank`;
});
afterAll(async () => {
  server.closeAllConnections();
  await new Promise((r) => server.close(r));
});
afterEach(() => {
  log.length = 0;
  peakInFlight = 0;
  handler = ({ responses }) => ({ body: { matrix: matrixOf(responses) } });
});

const judge = (opts: Partial<PairwiseHttpJudgeOptions> = {}) => pairwiseHttpJudge({ url, backoffMs: 5, maxBackoffMs: 50, ...opts });

describe('pairwiseHttpJudge answers', () => {
  it('POSTs {prompt, responses} once per prompt and averages a matrix’s two orders', async () => {
    const j = judge();
    const responses = ['a', 'bbb', 'cc', 'dddd'];
    const judged = await j.judge('hello', responses);
    assertPreferenceMatrix(judged.P, { size: 4 });
    expect(log).toEqual([{ prompt: 'hello', responses, headers: expect.anything() as unknown }]);
    for (let i = 0; i < 4; i++)
      for (let k = 0; k < 4; k++)
        if (i !== k) expect(judged.P[i][k]).toBeCloseTo((q(responses[i], responses[k]) + 1 - q(responses[k], responses[i])) / 2, 12);
    expect(judged.verdicts).toBe(12); // K(K − 1) ordered comparisons
    expect(j.stats).toMatchObject({ requests: 1, answers: 1, unusable: 0 });
  });

  it('reads per-pair probabilities: one order as given, both orders averaged', async () => {
    handler = () => ({
      body: {
        pairs: [
          { i: 0, j: 1, p: 0.8 },
          { i: 2, j: 0, p: 0.9 },
          { i: 1, j: 2, p: 0.3 },
          { i: 2, j: 1, p: 0.5 },
        ],
      },
    });
    const judged = await judge().judge('p', ['x', 'y', 'z']);
    expect(judged.P[0][1]).toBeCloseTo(0.8, 12);
    expect(judged.P[0][2]).toBeCloseTo(0.1, 12);
    expect(judged.P[1][2]).toBeCloseTo((0.3 + 1 - 0.5) / 2, 12);
    expect(judged.verdicts).toBe(4);
  });

  it('accepts a bare K×K array as the matrix, its diagonal ignored', async () => {
    handler = () => ({
      body: [
        [null, 0.7],
        [0.3, 'anything'],
      ],
    });
    expect((await judge().compare('p', ['x', 'y']))[0][1]).toBeCloseTo(0.7, 12);
  });
});

describe('pairwiseHttpJudge malformed answers: retried, then an error naming the problem', () => {
  const cases: [string, unknown, RegExp][] = [
    ['too few rows', { matrix: [[0, 1]] }, /a matrix of 1 rows for 3 responses/],
    [
      'a short row',
      {
        matrix: [
          [0, 1, 1],
          [0, 0],
          [0, 1, 0],
        ],
      },
      /row 1 has 2 entries, expected 3/,
    ],
    ['neither field', { scores: [1, 2, 3] }, /neither "matrix" nor "pairs"/],
    [
      'a missing pair',
      {
        pairs: [
          { i: 0, j: 1, p: 1 },
          { i: 0, j: 2, p: 1 },
        ],
      },
      /leave out the pair \(1, 2\)/,
    ],
    [
      'a repeated pair',
      {
        pairs: [
          { i: 0, j: 1, p: 1 },
          { i: 0, j: 1, p: 0 },
        ],
      },
      /the pair \(0, 1\) given twice/,
    ],
    ['an index out of range', { pairs: [{ i: 0, j: 3, p: 1 }] }, /not two different indices in \[0, 3\)/],
  ];
  for (const [name, body, message] of cases)
    it(name, async () => {
      handler = () => ({ body });
      const j = judge({ maxRetries: 2 });
      await expect(j.compare('p', ['x', 'y', 'z'])).rejects.toThrow(message);
      await expect(j.compare('p', ['x', 'y', 'z'])).rejects.toThrow(/pairwise HTTP judge: POST .* failed after 3 attempts/);
      expect(log).toHaveLength(6);
    });

  it('a body that is not JSON', async () => {
    handler = () => ({ raw: '<html>oops</html>' });
    await expect(judge({ maxRetries: 0 }).compare('p', ['x', 'y'])).rejects.toThrow(/not JSON: <html>oops<\/html>/);
  });
});

describe('pairwiseHttpJudge unusable entries: retried, then scored ½ and counted', () => {
  // Python's json.dumps writes a bare NaN; null and 1.5 are no probabilities either
  const raw = '{"matrix": [[0, NaN, 0.8], [null, 0, 0.6], [0.2, 1.5, 0]]}';

  it('scores what is usable, ½ where neither order is, and names each bad entry', async () => {
    handler = () => ({ raw });
    const j = judge({ maxRetries: 1 });
    const judged = await j.judge('p', ['x', 'y', 'z'], { maxUnusableFraction: 1 });
    expect(log).toHaveLength(2); // asked again once
    expect(judged.P[0][1]).toBe(0.5); // both orders unusable
    expect(judged.P[0][2]).toBeCloseTo((0.8 + 1 - 0.2) / 2, 12);
    expect(judged.P[1][2]).toBeCloseTo(0.6, 12); // the other order (1.5) unusable
    expect(judged.verdicts).toBe(6);
    expect(judged.unusable).toEqual([
      'P(0 ≻ 1) = NaN is not a probability in [0, 1]',
      'P(1 ≻ 0) = null is not a probability in [0, 1]',
      'P(2 ≻ 1) = 1.5 is not a probability in [0, 1]',
    ]);
    expect(j.stats).toMatchObject({ unusable: 3, retries: 1, requests: 2 });
  });

  it('fails a call with more unusable verdicts than maxUnusableFraction allows, and never caches them', async () => {
    handler = () => ({ raw: '{"pairs": [{"i": 0, "j": 1, "p": Infinity}]}' });
    const cacheDir = freshDir();
    await expect(judge({ maxRetries: 0, cacheDir }).compare('p', ['x', 'y'])).rejects.toThrow(UnusableVerdictsError);
    await expect(judge({ maxRetries: 0, cacheDir }).compare('p', ['x', 'y'])).rejects.toThrow(
      /1 of 1 verdicts .* P\(0 ≻ 1\) = Infinity is not a probability/,
    );
    expect(log).toHaveLength(2);
  });

  it('a later good answer after a bad one is used', async () => {
    let n = 0;
    handler = ({ responses }) => (n++ === 0 ? { raw } : { body: { matrix: matrixOf(responses) } });
    const judged = await judge({ maxRetries: 1 }).judge('p', ['x', 'y', 'z']);
    expect(judged.unusable).toEqual([]);
  });
});

describe('pairwiseHttpJudge transport (shared with the HTTP judge)', () => {
  it('retries a 500 and a 429, then caches the answer: a second judge makes no request', async () => {
    let n = 0;
    handler = ({ responses }) =>
      ++n <= 2 ? { status: n === 1 ? 500 : 429, body: { error: 'busy' } } : { body: { matrix: matrixOf(responses) } };
    const cacheDir = freshDir();
    const first = judge({ cacheDir });
    const P = await first.compare('p', ['x', 'yy', 'zzz']);
    expect(first.stats).toMatchObject({ requests: 3, retries: 2, answers: 1 });
    const second = judge({ cacheDir });
    expect(await second.compare('p', ['x', 'yy', 'zzz'])).toEqual(P);
    expect(second.stats).toMatchObject({ requests: 0, cacheHits: 1 });
    expect(log).toHaveLength(3);
  });

  it('cancels a body longer than maxResponseBytes and names the cap', async () => {
    handler = () => ({ body: { matrix: matrixOf(['x', 'y']), padding: 'x'.repeat(5000) } });
    await expect(judge({ maxResponseBytes: 1000, maxRetries: 0 }).compare('p', ['x', 'y'])).rejects.toThrow(
      /longer than maxResponseBytes \(1000 bytes\)/,
    );
  });

  it('keeps at most requestConcurrency requests in flight, and sends the API key as a Bearer token', async () => {
    handler = ({ responses }) => ({ body: { matrix: matrixOf(responses) }, delayMs: 30 });
    const j = judge({ requestConcurrency: 2, concurrency: 8, apiKeyEnv: 'RANKER_KEY', env: { RANKER_KEY: 'sk-ranker' } });
    await j.compareBatch(Array.from({ length: 6 }, (_, i) => ({ prompt: `p${i}`, responses: ['a', 'bb'] })));
    expect(peakInFlight).toBe(2);
    expect(log.every((a) => a.headers.authorization === 'Bearer sk-ranker')).toBe(true);
  });

  it('times an attempt out after timeoutMs', async () => {
    handler = ({ responses }) => ({ body: { matrix: matrixOf(responses) }, delayMs: 500 });
    await expect(judge({ timeoutMs: 50, maxRetries: 0 }).compare('p', ['x', 'y'])).rejects.toThrow(/timed out after 50 ms/);
  });

  it('refuses a URL with credentials without echoing it', () => {
    expect(() => pairwiseHttpJudge({ url: 'http://me:secret@127.0.0.1/rank' })).toThrow(/must not contain credentials/);
    expect(() => pairwiseHttpJudge({ url: 'http://me:secret@127.0.0.1/rank' })).not.toThrow(/secret/);
  });
});

describe("preference kind 'pairwise-http' in a run config", () => {
  const base = { model: { path: 'model' }, data: { prompts: 'prompts.jsonl' } };

  it('fills the HTTP judge’s transport defaults and builds the judge', async () => {
    const c = parseConfig({ ...base, preference: { kind: 'pairwise-http', url } });
    expect(c.preference).toEqual({
      kind: 'pairwise-http',
      url,
      requestConcurrency: 8,
      timeoutMs: 60_000,
      maxRetries: 5,
      maxResponseBytes: 1024 * 1024,
      concurrency: 4,
      maxUnusableFraction: 0.05,
    });
    const j = await preferenceFromConfig(c.preference);
    expect(j.id).toMatch(/^pairwise-http\(http:\/\/127\.0\.0\.1:\d+\/rank,[0-9a-f]{12}\)$/);
    expect((await j.compare('p', ['x', 'yy']))[1][0]).toBeCloseTo((q('yy', 'x') + 1 - q('x', 'yy')) / 2, 12);
  });

  it('refuses a URL that is not http(s), naming the field', () => {
    expect(() => parseConfig({ ...base, preference: { kind: 'pairwise-http', url: 'ftp://x/rank' } })).toThrow(RunConfigError);
    expect(() => parseConfig({ ...base, preference: { kind: 'pairwise-http', url: 'ftp://x/rank' } })).toThrow(
      /preference\.url.*must be an http\(s\) URL/,
    );
  });
});
