// Parquet prompt sets read through hyparquet. No Parquet writer is installed, so the test writes
// its files with the small encoder below, straight from the format spec (apache/parquet-format:
// "PAR1", data pages v1 with PLAIN values and RLE/bit-packed definition levels, a Thrift
// compact-protocol footer). Pages are stored uncompressed, GZIP-compressed by node's zlib, or
// SNAPPY-framed (literal runs only, a valid Snappy stream), so the decompressors run too.
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { gzipSync } from 'node:zlib';
import { afterAll, describe, expect, it } from 'vitest';
import { loadPrompts, MAX_PROMPT_BYTES, readParquetPrompts, splitPrompts } from '../lib/data/index.js';

// ---- a minimal Parquet writer -------------------------------------------------------------

type Codec = 'UNCOMPRESSED' | 'SNAPPY' | 'GZIP';
interface Column {
  name: string;
  type: 'string' | 'int64';
  /** OPTIONAL (nullable, with definition levels) instead of REQUIRED */
  optional?: boolean;
  values: (string | number | null)[];
}

const CODEC_ID: Record<Codec, number> = { UNCOMPRESSED: 0, SNAPPY: 1, GZIP: 2 };
const T_I32 = 5,
  T_I64 = 6,
  T_BINARY = 8,
  T_LIST = 9,
  T_STRUCT = 12;

/** Thrift compact protocol, just the parts a Parquet footer and page header use. */
class Thrift {
  bytes: number[] = [];
  #last: number[] = [0];
  varint(n: number): void {
    while (n >= 0x80) {
      this.bytes.push((n & 0x7f) | 0x80);
      n = Math.floor(n / 128);
    }
    this.bytes.push(n);
  }
  zigzag(n: number): void {
    this.varint(n >= 0 ? 2 * n : -2 * n - 1);
  }
  #field(id: number, type: number): void {
    const delta = id - this.#last[this.#last.length - 1];
    if (delta < 1 || delta > 15) throw new Error('field ids must increase by 1..15');
    this.bytes.push((delta << 4) | type);
    this.#last[this.#last.length - 1] = id;
  }
  #raw(b: Uint8Array | string): void {
    const data = typeof b === 'string' ? new TextEncoder().encode(b) : b;
    this.varint(data.length);
    this.bytes.push(...data);
  }
  #listHeader(n: number, type: number): void {
    if (n < 15) this.bytes.push((n << 4) | type);
    else {
      this.bytes.push(0xf0 | type);
      this.varint(n);
    }
  }
  #structBody(fn: () => void): void {
    this.#last.push(0);
    fn();
    this.bytes.push(0);
    this.#last.pop();
  }
  i32(id: number, v: number): this {
    this.#field(id, T_I32);
    this.zigzag(v);
    return this;
  }
  i64(id: number, v: number): this {
    this.#field(id, T_I64);
    this.zigzag(v);
    return this;
  }
  binary(id: number, v: string): this {
    this.#field(id, T_BINARY);
    this.#raw(v);
    return this;
  }
  struct(id: number, fn: () => void): this {
    this.#field(id, T_STRUCT);
    this.#structBody(fn);
    return this;
  }
  listI32(id: number, vs: number[]): this {
    this.#field(id, T_LIST);
    this.#listHeader(vs.length, T_I32);
    vs.forEach((v) => this.zigzag(v));
    return this;
  }
  listBinary(id: number, vs: string[]): this {
    this.#field(id, T_LIST);
    this.#listHeader(vs.length, T_BINARY);
    vs.forEach((v) => this.#raw(v));
    return this;
  }
  listStruct<T>(id: number, items: T[], fn: (item: T) => void): this {
    this.#field(id, T_LIST);
    this.#listHeader(items.length, T_STRUCT);
    items.forEach((it) => this.#structBody(() => fn(it)));
    return this;
  }
  /** a top-level struct (a page header or the footer) */
  static struct(fn: (t: Thrift) => void): Uint8Array {
    const t = new Thrift();
    fn(t);
    t.bytes.push(0);
    return Uint8Array.from(t.bytes);
  }
}

function u32le(n: number): number[] {
  return [n & 0xff, (n >>> 8) & 0xff, (n >>> 16) & 0xff, (n >>> 24) & 0xff];
}

/** Snappy with literal runs only: the uncompressed length, then ≤ 60-byte literal elements. */
function snappyLiterals(data: Uint8Array): Uint8Array {
  const t = new Thrift();
  t.varint(data.length);
  for (let at = 0; at < data.length; at += 60) {
    const chunk = data.subarray(at, at + 60);
    t.bytes.push((chunk.length - 1) << 2, ...chunk);
  }
  return Uint8Array.from(t.bytes);
}

function compress(data: Uint8Array, codec: Codec): Uint8Array {
  if (codec === 'GZIP') return new Uint8Array(gzipSync(data));
  if (codec === 'SNAPPY') return snappyLiterals(data);
  return data;
}

/** A data page v1: [definition levels], then the non-null values, PLAIN-encoded. */
function pageData(col: Column, values: (string | number | null)[]): Uint8Array {
  const out: number[] = [];
  if (col.optional) {
    // bit-packed run of 1-bit levels: header (groups << 1) | 1, then one byte per 8 levels
    const groups = Math.ceil(values.length / 8);
    const levels = [...new Array(groups)].map((_, g) =>
      values.slice(g * 8, g * 8 + 8).reduce<number>((b, v, k) => b | ((v === null ? 0 : 1) << k), 0),
    );
    const t = new Thrift();
    t.varint((groups << 1) | 1);
    const rle = [...t.bytes, ...levels];
    out.push(...u32le(rle.length), ...rle);
  } else if (values.includes(null)) throw new Error('null in a REQUIRED column');
  for (const v of values) {
    if (v === null) continue;
    if (col.type === 'string') {
      const b = new TextEncoder().encode(v as string);
      out.push(...u32le(b.length));
      for (const x of b) out.push(x); // no spread: a prompt may be megabytes
    } else {
      const big = BigInt(v);
      for (let k = 0n; k < 8n; k++) out.push(Number((big >> (8n * k)) & 0xffn));
    }
  }
  return Uint8Array.from(out);
}

function writeParquet(file: string, columns: Column[], options: { codec?: Codec; rowGroupSize?: number } = {}): void {
  const codec = options.codec ?? 'UNCOMPRESSED';
  const numRows = columns[0].values.length;
  const groupSize = options.rowGroupSize ?? Math.max(numRows, 1);
  const body: number[] = [...new TextEncoder().encode('PAR1')];
  const rowGroups: { rows: number; chunks: { col: Column; offset: number; raw: number; stored: number; n: number }[] }[] = [];
  for (let start = 0; start < numRows || (numRows === 0 && start === 0); start += groupSize) {
    const rows = Math.min(groupSize, numRows - start);
    const chunks = columns.map((col) => {
      const values = col.values.slice(start, start + rows);
      const raw = pageData(col, values);
      const stored = compress(raw, codec);
      const header = Thrift.struct((t) =>
        t
          .i32(1, 0)
          .i32(2, raw.length)
          .i32(3, stored.length)
          .struct(5, () => {
            t.i32(1, values.length).i32(2, 0).i32(3, 3).i32(4, 3);
          }),
      );
      const offset = body.length;
      body.push(...header);
      for (const x of stored) body.push(x);
      return { col, offset, raw: header.length + raw.length, stored: header.length + stored.length, n: values.length };
    });
    rowGroups.push({ rows, chunks });
    if (numRows === 0) break;
  }
  const footer = Thrift.struct((t) => {
    t.i32(1, 1);
    t.listStruct(2, [null, ...columns], (col) => {
      if (col === null) t.binary(4, 'schema').i32(5, columns.length);
      else {
        t.i32(1, col.type === 'string' ? 6 : 2)
          .i32(3, col.optional ? 1 : 0)
          .binary(4, col.name);
        if (col.type === 'string') t.i32(6, 0); // converted type UTF8
      }
    });
    t.i64(3, numRows);
    t.listStruct(4, rowGroups, (rg) => {
      t.listStruct(1, rg.chunks, (c) => {
        t.i64(2, c.offset).struct(3, () => {
          t.i32(1, c.col.type === 'string' ? 6 : 2)
            .listI32(2, [0, 3])
            .listBinary(3, [c.col.name])
            .i32(4, CODEC_ID[codec])
            .i64(5, c.n)
            .i64(6, c.raw)
            .i64(7, c.stored)
            .i64(9, c.offset);
        });
      });
      t.i64(
        2,
        rg.chunks.reduce((s, c) => s + c.raw, 0),
      ).i64(3, rg.rows);
    });
    t.binary(6, 'sppo-engine test writer');
  });
  body.push(...footer, ...u32le(footer.length), ...new TextEncoder().encode('PAR1'));
  writeFileSync(file, Uint8Array.from(body));
}

// ---- tests ----------------------------------------------------------------------------------

const dir = mkdtempSync(join(tmpdir(), 'sppo-parquet-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

// UltraFeedback-like rows: prompt among other columns, non-ASCII text, a long prompt
const prompts = Array.from({ length: 23 }, (_, i) =>
  i === 5 ? 'Übersetze: « café » — 日本語で答えて' : i === 9 ? 'long '.repeat(300) + 'prompt' : `How do I sort ${i} numbers?`,
);
const ultraFeedbackLike: Column[] = [
  { name: 'prompt_id', type: 'string', values: prompts.map((_, i) => `id-${i}`) },
  { name: 'prompt', type: 'string', values: prompts },
  { name: 'score_chosen', type: 'int64', values: prompts.map((_, i) => i * 3) },
];

describe('Parquet prompt sets', () => {
  for (const codec of ['UNCOMPRESSED', 'GZIP', 'SNAPPY'] as const) {
    it(`reads the prompt column of a ${codec} file with other columns, across row groups`, async () => {
      const file = join(dir, `uf-${codec}.parquet`);
      writeParquet(file, ultraFeedbackLike, { codec, rowGroupSize: 10 });
      expect(await loadPrompts(file)).toEqual(prompts);
    });
  }

  it('reads a nullable (OPTIONAL) column without nulls, and another column by name', async () => {
    const file = join(dir, 'optional.parquet');
    writeParquet(
      file,
      [
        { name: 'instruction', type: 'string', optional: true, values: ['a', 'b', 'c', 'd', 'e', 'f', 'g', 'h', 'i'] },
        { name: 'prompt', type: 'int64', values: [1, 2, 3, 4, 5, 6, 7, 8, 9] },
      ],
      { codec: 'GZIP' },
    );
    expect(await readParquetPrompts(file, { column: 'instruction' })).toEqual(['a', 'b', 'c', 'd', 'e', 'f', 'g', 'h', 'i']);
  });

  it('splits a Parquet prompt set like any other', async () => {
    const file = join(dir, 'split.parquet');
    writeParquet(file, ultraFeedbackLike);
    const split = splitPrompts(await loadPrompts(file), { iterations: 3, evalSize: 5, seed: 1 });
    expect(split.iterations.map((p) => p.length)).toEqual([6, 6, 6]);
    expect([...split.evaluation, ...split.iterations.flat()].sort()).toEqual([...prompts].sort());
  });

  it('names the missing column and lists the ones there are', async () => {
    const file = join(dir, 'noprompt.parquet');
    writeParquet(file, [
      { name: 'instruction', type: 'string', values: ['x'] },
      { name: 'output', type: 'string', values: ['y'] },
    ]);
    await expect(loadPrompts(file)).rejects.toThrow(/no 'prompt' column \(columns: instruction, output\)/);
  });

  it('refuses a prompt column that does not hold strings', async () => {
    const file = join(dir, 'intprompt.parquet');
    writeParquet(file, [{ name: 'prompt', type: 'int64', values: [1, 2] }]);
    await expect(loadPrompts(file)).rejects.toThrow(/column 'prompt' holds INT64 values, expected strings/);
  });

  it('names the rows whose prompt is null or empty', async () => {
    const file = join(dir, 'nulls.parquet');
    writeParquet(file, [{ name: 'prompt', type: 'string', optional: true, values: ['ok', null, 'fine', '  ', null] }], { codec: 'SNAPPY' });
    const err = await loadPrompts(file).catch((e: unknown) => e);
    expect((err as Error).message).toMatch(/3 bad row\(s\)/);
    expect((err as Error).message).toMatch(/row 1: 'prompt' is null/);
    expect((err as Error).message).toMatch(/row 3: 'prompt' is empty/);
    expect((err as Error).message).toMatch(/row 4: 'prompt' is null/);
  });

  it('refuses an empty set', async () => {
    const file = join(dir, 'empty.parquet');
    writeParquet(file, [{ name: 'prompt', type: 'string', values: [] }]);
    await expect(loadPrompts(file)).rejects.toThrow(/no prompts/);
  });

  it('says when a file is not Parquet at all', async () => {
    const file = join(dir, 'fake.parquet');
    writeFileSync(file, '{"prompt": "this is JSON"}\n');
    await expect(loadPrompts(file)).rejects.toThrow(/fake\.parquet: cannot read as Parquet/);
  });
});

describe('damaged and oversized Parquet files', () => {
  /** A GZIP file of two row groups of ten prompts. */
  function twoGroups(file: string): void {
    writeParquet(file, [{ name: 'prompt', type: 'string', values: prompts.slice(0, 20) }], { codec: 'GZIP', rowGroupSize: 10 });
  }

  it('a truncated file names the file', async () => {
    const file = join(dir, 'truncated.parquet');
    twoGroups(file);
    const bytes = readFileSync(file);
    writeFileSync(file, bytes.subarray(0, bytes.length - 40));
    await expect(loadPrompts(file)).rejects.toThrow(/truncated\.parquet: cannot read as Parquet/);
  });

  it("a damaged page names the file, the column and the rows, not only the decoder's words", async () => {
    const file = join(dir, 'damaged.parquet');
    twoGroups(file);
    const bytes = readFileSync(file);
    // the second row group's page: its gzip stream starts after the first group's; damage its middle
    const second = bytes.indexOf(Buffer.from([0x1f, 0x8b]), bytes.indexOf(Buffer.from([0x1f, 0x8b])) + 2);
    expect(second).toBeGreaterThan(0);
    bytes.fill(0xff, second + 12, second + 40);
    writeFileSync(file, bytes);
    const err = (await loadPrompts(file).catch((e: unknown) => e)) as Error;
    expect(err.message).toMatch(
      /^.*damaged\.parquet: column 'prompt' cannot be read in row group 1 \(rows 10–19\): the file is damaged or encoded in a way the reader does not support \(.+\)$/,
    );
  });

  it('refuses a prompt cell over 4 MiB, naming the row and the limit', async () => {
    const file = join(dir, 'huge-cell.parquet');
    writeParquet(file, [{ name: 'prompt', type: 'string', values: ['short', 'x'.repeat(MAX_PROMPT_BYTES + 1), 'fine'] }]);
    await expect(loadPrompts(file)).rejects.toThrow(
      `huge-cell.parquet: 1 bad row(s):\n  row 1: 'prompt' is ${MAX_PROMPT_BYTES + 1} bytes, over the 4 MiB (4194304 bytes) a prompt may hold`,
    );
  });
});
