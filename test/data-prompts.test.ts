// JSONL prompt sets (plain and UltraFeedback-like rows), their errors with line numbers, and the
// seeded split into disjoint per-iteration parts plus a held-out evaluation set.
import { closeSync, mkdtempSync, openSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import {
  loadPrompts,
  MAX_JSON_ARRAY_BYTES,
  MAX_PROMPT_BYTES,
  parsePromptsJsonl,
  promptFormatOf,
  seededShuffle,
  splitPrompts,
} from '../lib/data/index.js';

const dir = mkdtempSync(join(tmpdir(), 'sppo-prompts-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function file(name: string, text: string): string {
  const path = join(dir, name);
  writeFileSync(path, text);
  return path;
}

describe('JSONL prompt sets', () => {
  it('reads one prompt per line, skipping blank lines, with CRLF and a BOM', async () => {
    const path = file('plain.jsonl', '\ufeff{"prompt": "first"}\r\n\r\n{"prompt": "second\\nline"}\n   \n{"prompt": "third"}');
    expect(await loadPrompts(path)).toEqual(['first', 'second\nline', 'third']);
  });

  it('reads UltraFeedback-like rows, ignoring the other columns', async () => {
    const rows = [
      { prompt: 'Explain SPPO.', prompt_id: 'a1', chosen: [{ role: 'user', content: 'Explain SPPO.' }], score_chosen: 8.5 },
      { source: 'evol_instruct', prompt: 'Sort [3, 1, 2].', messages: [], score_rejected: null },
    ];
    const path = file('uf.jsonl', rows.map((r) => JSON.stringify(r)).join('\n') + '\n');
    expect(await loadPrompts(path)).toEqual(['Explain SPPO.', 'Sort [3, 1, 2].']);
  });

  it('reads another column by name, and a .json array of rows', async () => {
    expect(parsePromptsJsonl('{"instruction": "a"}\n{"instruction": "b"}', { column: 'instruction' })).toEqual(['a', 'b']);
    const path = file('rows.json', JSON.stringify([{ prompt: 'x' }, { prompt: 'y' }]));
    expect(await loadPrompts(path)).toEqual(['x', 'y']);
  });

  it('reports every malformed line with its line number', async () => {
    const text = [
      '{"prompt": "ok"}',
      '{"prompt": "unterminated}',
      '',
      '["prompt"]',
      '{"text": "no prompt"}',
      '{"prompt": 42}',
      '{"prompt": "   "}',
      '{"prompt": null}',
    ].join('\n');
    const err = await loadPrompts(file('bad.jsonl', text)).catch((e: unknown) => e);
    const msg = (err as Error).message;
    expect(msg).toMatch(/bad\.jsonl: 6 bad row\(s\):/);
    expect(msg).toMatch(/line 2: not valid JSON/);
    expect(msg).toMatch(/line 4: expected a JSON object, got an array/);
    expect(msg).toMatch(/line 5: no 'prompt' field \(fields: text\)/);
    expect(msg).toMatch(/line 6: 'prompt' is a number, expected a string/);
    expect(msg).toMatch(/line 7: 'prompt' is empty/);
    expect(msg).toMatch(/… and 1 more/);
    expect(msg).not.toMatch(/line 1:/);
  });

  it('refuses an empty set', async () => {
    await expect(loadPrompts(file('empty.jsonl', '\n  \n'))).rejects.toThrow(/empty\.jsonl: no prompts/);
    await expect(loadPrompts(file('empty.json', '[]'))).rejects.toThrow(/no prompts/);
  });

  it('says when the file or its format is wrong', async () => {
    await expect(loadPrompts(join(dir, 'missing.jsonl'))).rejects.toThrow(/cannot read the prompt file .*missing\.jsonl/);
    expect(() => promptFormatOf('prompts.csv')).toThrow(/cannot tell the prompt file's format from '\.csv'/);
    expect(promptFormatOf('a/b.PARQUET')).toBe('parquet');
    expect(promptFormatOf('a/b.ndjson')).toBe('jsonl');
  });
});

describe('oversized input', () => {
  /** A file of `lines`, where a number is a line of that many bytes ({"prompt": "xxx…"}), written in pieces. */
  function bigFile(name: string, lines: (string | number)[]): string {
    const path = join(dir, name);
    const fd = openSync(path, 'w');
    const piece = Buffer.alloc(1024 * 1024, 'x');
    for (const line of lines) {
      if (typeof line === 'string') writeSync(fd, line + '\n');
      else {
        writeSync(fd, '{"prompt": "');
        for (let left = line - 14; left > 0; left -= piece.length) writeSync(fd, piece, 0, Math.min(left, piece.length));
        writeSync(fd, '"}\n');
      }
    }
    closeSync(fd);
    return path;
  }

  /** The most the heap and buffers grew above their level before `fn` while it ran, in MB. */
  async function peakGrowth(fn: () => Promise<unknown>): Promise<number> {
    const used = () => {
      const m = process.memoryUsage();
      return m.heapUsed + m.arrayBuffers;
    };
    const before = used();
    let peak = before;
    const timer = setInterval(() => (peak = Math.max(peak, used())), 1);
    try {
      await fn().catch(() => undefined);
    } finally {
      clearInterval(timer);
    }
    return (Math.max(peak, used()) - before) / 1e6;
  }

  it('refuses a 100 MB line while streaming, naming the file, the line and the limit, in bounded memory', async () => {
    const path = bigFile('huge-line.jsonl', ['{"prompt": "a"}', '', 100_000_000, '{"prompt": "never read"}']);
    await expect(loadPrompts(path)).rejects.toThrow(
      `${path}: line 3 is longer than 4 MiB (4194304 bytes), the most a prompt line may hold (more than any model's context: a damaged file?)`,
    );
    // The whole file read at once would take 100 MB of buffer and 100 MB of string at least.
    expect(await peakGrowth(() => loadPrompts(path))).toBeLessThan(40);
  });

  it('reads a line just under the limit, and refuses one just over (10 MB), in text too', async () => {
    const fits = bigFile('fits.jsonl', [MAX_PROMPT_BYTES, '{"prompt": "b"}']);
    const read = await loadPrompts(fits);
    expect(read.map((p) => p.length)).toEqual([MAX_PROMPT_BYTES - 14, 1]);
    const over = bigFile('ten-mb.jsonl', [10_000_000]);
    await expect(loadPrompts(over)).rejects.toThrow(/ten-mb\.jsonl: line 1 is longer than 4 MiB/);
    expect(() => parsePromptsJsonl('{"prompt": "ok"}\n' + 'y'.repeat(MAX_PROMPT_BYTES + 1), { source: 'text' })).toThrow(
      /^text: line 2 is longer than 4 MiB/,
    );
  });

  it('refuses a .json array too large to read whole, and a prompt in it over the limit', async () => {
    const path = join(dir, 'big-array.json');
    const fd = openSync(path, 'w');
    writeSync(fd, '[');
    const row = JSON.stringify({ prompt: 'z'.repeat(1000) }) + ',';
    for (let n = 0; n * row.length <= MAX_JSON_ARRAY_BYTES; n += 1000) writeSync(fd, row.repeat(1000));
    writeSync(fd, '{"prompt": "last"}]');
    closeSync(fd);
    await expect(loadPrompts(path)).rejects.toThrow(
      /big-array\.json: a JSON array of 64\.\d MiB is over the 64 MiB read whole; write it as JSON Lines/,
    );
    const one = file('one-huge.json', JSON.stringify([{ prompt: 'ok' }, { prompt: 'w'.repeat(MAX_PROMPT_BYTES + 1) }]));
    await expect(loadPrompts(one)).rejects.toThrow(/row 1: 'prompt' is 4194305 bytes, over the 4 MiB/);
  });
});

describe('splitPrompts', () => {
  const prompts = Array.from({ length: 103 }, (_, i) => `p${i}`);

  it('gives T disjoint parts and an eval set that together are the whole set', () => {
    const s = splitPrompts(prompts, { iterations: 3, evalSize: 10, seed: 7 });
    expect(s.evaluation).toHaveLength(10);
    // 93 left: 31 each
    expect(s.iterations.map((p) => p.length)).toEqual([31, 31, 31]);
    const all = [...s.evaluation, ...s.iterations.flat()];
    expect(new Set(all).size).toBe(103);
    expect([...all].sort()).toEqual([...prompts].sort());
  });

  it('is deterministic in the seed and shuffles', () => {
    const a = splitPrompts(prompts, { iterations: 3, evalSize: 10, seed: 7 });
    expect(splitPrompts(prompts, { iterations: 3, evalSize: 10, seed: 7 })).toEqual(a);
    expect(splitPrompts(prompts, { iterations: 3, evalSize: 10, seed: 8 })).not.toEqual(a);
    expect(a.iterations[0]).not.toEqual(prompts.slice(10, 41));
    // the shuffle is a permutation
    expect([...seededShuffle(prompts, 3)].sort()).toEqual([...prompts].sort());
  });

  it('keeps the eval set the same whatever T or the part size', () => {
    const a = splitPrompts(prompts, { iterations: 3, evalSize: 10, seed: 7 });
    const b = splitPrompts(prompts, { iterations: 5, evalSize: 10, seed: 7, promptsPerIteration: 4 });
    expect(b.evaluation).toEqual(a.evaluation);
    expect(b.iterations.map((p) => p.length)).toEqual([4, 4, 4, 4, 4]);
  });

  it('spreads a remainder over the first parts', () => {
    // 103 − 3 = 100 over 3: 34, 33, 33
    expect(splitPrompts(prompts, { iterations: 3, evalSize: 3, seed: 1 }).iterations.map((p) => p.length)).toEqual([34, 33, 33]);
  });

  it('refuses splits that cannot be made', () => {
    expect(() => splitPrompts([], { iterations: 1, evalSize: 0, seed: 1 })).toThrow(/the prompt set is empty/);
    expect(() => splitPrompts(prompts, { iterations: 3, evalSize: 101, seed: 1 })).toThrow(
      /103 prompts cannot give 101 for evaluation and at least one to each of 3 iterations/,
    );
    expect(() => splitPrompts(prompts, { iterations: 3, evalSize: 10, seed: 1, promptsPerIteration: 40 })).toThrow(
      /3 iterations × 40 prompts need 120, but only 93 remain/,
    );
    expect(() => splitPrompts(prompts, { iterations: 0, evalSize: 0, seed: 1 })).toThrow(/iterations must be an integer ≥ 1/);
    expect(() => splitPrompts(prompts, { iterations: 1, evalSize: -1, seed: 1 })).toThrow(/evalSize must be an integer ≥ 0/);
    expect(() => splitPrompts(prompts, { iterations: 1, evalSize: 0, seed: 1.5 })).toThrow(/seed must be an integer/);
  });
});
