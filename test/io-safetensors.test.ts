// Safetensors reading and writing: exact round trips (F32, BF16 with round-to-nearest-even,
// F16 decoding), the byte layout transformers expects, and every malformed or hostile file
// refused with a SafetensorsError that names the problem — including a seeded fuzz run over
// mutated headers and bytes, where anything but a clean read or our own error is a failure.
import { mkdtempSync, rmSync, writeFileSync, readFileSync, openSync, ftruncateSync, writeSync, closeSync, readdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { CheckpointWeights, float32ToBf16, readSafetensors, SafetensorsError, SafetensorsFile, writeSafetensors } from '../lib/index.js';
import { MAX_HEADER_BYTES, ReadScratch } from '../lib/io/safetensors.js';
import { prng } from './fixtures/engine-helpers.js';

const dir = mkdtempSync(path.join(tmpdir(), 'sppo-io-st-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
let counter = 0;
const fresh = (name = 'f') => path.join(dir, `${name}-${counter++}.safetensors`);

/** A file from a header object (or raw header bytes) and a data section, laid out by hand. */
function rawFile(header: unknown, data: Uint8Array | number = 0, declaredLength?: bigint): string {
  const json = header instanceof Uint8Array ? header : new TextEncoder().encode(JSON.stringify(header));
  const bytes = data instanceof Uint8Array ? data : new Uint8Array(data);
  const buf = new Uint8Array(8 + json.length + bytes.length);
  new DataView(buf.buffer).setBigUint64(0, declaredLength ?? BigInt(json.length), true);
  buf.set(json, 8);
  buf.set(bytes, 8 + json.length);
  const file = fresh('raw');
  writeFileSync(file, buf);
  return file;
}

async function openError(file: string): Promise<Error> {
  try {
    const f = await SafetensorsFile.open(file);
    for (const name of f.tensors.keys()) await f.readFloat32(name);
    await f.close();
  } catch (e) {
    return e as Error;
  }
  throw new Error(`${file} was accepted`);
}

const randomData = (n: number, seed: number) => {
  const r = prng(seed);
  return Float32Array.from({ length: n }, () => (r() - 0.5) * 4);
};

describe('writing and reading back', () => {
  it("round-trips F32 tensors bit for bit, lazily produced data included, in transformers' layout", async () => {
    const a = randomData(12, 1);
    const b = randomData(5, 2);
    const file = fresh();
    await writeSafetensors(
      file,
      [
        { name: 'a', shape: [3, 4], data: a },
        { name: 'b.bias', shape: [5], data: () => b },
        { name: 'empty', shape: [0, 7], data: new Float32Array(0) },
      ],
      { metadata: { note: 'x' } },
    );
    const bytes = readFileSync(file);
    const n = Number(bytes.readBigUInt64LE(0));
    expect(n % 8).toBe(0); // data section 8-byte aligned
    const headerText = bytes.subarray(8, 8 + n).toString('utf8');
    expect(headerText.startsWith('{')).toBe(true);
    expect(headerText).toBe(headerText.trimEnd() + ' '.repeat(headerText.length - headerText.trimEnd().length));
    expect(JSON.parse(headerText).__metadata__).toEqual({ note: 'x', format: 'pt' });
    expect(bytes.length).toBe(8 + n + (12 + 5) * 4);

    const { metadata, tensors } = await readSafetensors(file);
    expect(metadata.format).toBe('pt');
    expect(tensors.get('a')).toEqual({ dtype: 'F32', shape: [3, 4], data: a });
    expect(tensors.get('b.bias')!.data).toEqual(b);
    expect(tensors.get('empty')!.shape).toEqual([0, 7]);
    expect(readdirSync(dir).filter((f) => f.includes('.tmp-'))).toEqual([]);
  });

  it('writes BF16 with round-to-nearest-even, NaN kept, overflow to infinity', async () => {
    const values = Float32Array.from([
      1,
      -2.5,
      1 + 2 ** -8,
      /* tie → even (1) */ 1 + 3 * 2 ** -8 /* tie → even (1 + 2^-6) */,
      1 + 2 ** -8 + 2 ** -20,
      /* above the tie → up */ 3.4e38,
      /* rounds past the max → inf */ NaN,
      -0,
      1e-40,
    ]);
    const bits = float32ToBf16(values);
    const back = new Float32Array(new Uint32Array(Array.from(bits, (h) => h << 16)).buffer);
    expect(Array.from(back.slice(0, 6))).toEqual([1, -2.5, 1, 1 + 2 ** -6, 1 + 2 ** -7, Infinity]);
    expect(Number.isNaN(back[6])).toBe(true);
    expect(Object.is(back[7], -0)).toBe(true);
    // Every finite result is one of the two bf16 neighbours of the input, and the nearer one.
    const r = randomData(4096, 3);
    const rb = float32ToBf16(r);
    for (let i = 0; i < r.length; i++) {
      const u = new Uint32Array(r.buffer)[i];
      const lo = new Float32Array(new Uint32Array([u & 0xffff0000]).buffer)[0];
      const hi = new Float32Array(new Uint32Array([(u & 0xffff0000) + 0x10000]).buffer)[0];
      const got = new Float32Array(new Uint32Array([rb[i] << 16]).buffer)[0];
      expect([lo, hi]).toContain(got);
      expect(Math.abs(got - r[i])).toBeLessThanOrEqual(Math.min(Math.abs(lo - r[i]), Math.abs(hi - r[i])));
    }

    const file = fresh();
    await writeSafetensors(file, [{ name: 'w', shape: [values.length], data: values }], { dtype: 'BF16' });
    const t = (await readSafetensors(file)).tensors.get('w')!;
    expect(t.dtype).toBe('BF16');
    expect(Array.from(t.data.slice(0, 6))).toEqual(Array.from(back.slice(0, 6)));
  });

  it('decodes F16 (normals, subnormals, infinities) and F64', async () => {
    const halves = Uint16Array.from([0x3c00, 0xc000, 0x7bff, 0x0001, 0x7c00, 0x3555, 0x8000]);
    const f64 = Float64Array.from([0.1, -3]);
    const data = new Uint8Array(halves.byteLength + f64.byteLength + 2);
    data.set(new Uint8Array(halves.buffer), 0);
    data.set(new Uint8Array(f64.buffer), 16); // after 2 bytes of an I8 tensor below
    data.set(new Uint8Array(halves.buffer), 0);
    const file = rawFile(
      {
        h: { dtype: 'F16', shape: [7], data_offsets: [0, 14] },
        i: { dtype: 'I8', shape: [2], data_offsets: [14, 16] },
        d: { dtype: 'F64', shape: [2], data_offsets: [16, 32] },
      },
      data,
    );
    const f = await SafetensorsFile.open(file);
    expect(Array.from(await f.readFloat32('h'))).toEqual([1, -2, 65504, 2 ** -24, Infinity, 0.333251953125, -0]);
    expect(Array.from(await f.readFloat32('d'))).toEqual([Math.fround(0.1), -3]);
    // with reused buffers: same values, and each read overwrites the previous one's memory
    const scratch = new ReadScratch();
    const h = await f.readFloat32('h', scratch);
    expect(Array.from(h)).toEqual([1, -2, 65504, 2 ** -24, Infinity, 0.333251953125, -0]);
    const d = await f.readFloat32('d', scratch);
    expect(Array.from(d)).toEqual([Math.fround(0.1), -3]);
    expect(d.buffer).toBe(h.buffer);
    await expect(f.readFloat32('i')).rejects.toThrow(/tensor 'i': dtype I8 cannot be read as floating point/);
    await expect(f.readFloat32('nope')).rejects.toThrow(/no tensor named 'nope'/);
    await f.close();
    await expect(f.readRaw('h')).rejects.toThrow(/closed/);
  });

  it('refuses bad input to the writer and leaves the existing file untouched', async () => {
    const file = fresh();
    await writeSafetensors(file, [{ name: 'keep', shape: [2], data: Float32Array.from([1, 2]) }]);
    const before = readFileSync(file);
    await expect(writeSafetensors(file, [{ name: 'x', shape: [3], data: new Float32Array(2) }])).rejects.toThrow(
      /'x': shape \[3\] has 3 elements but the data has 2/,
    );
    await expect(
      writeSafetensors(file, [
        { name: 'x', shape: [1], data: new Float32Array(1) },
        { name: 'x', shape: [1], data: new Float32Array(1) },
      ]),
    ).rejects.toThrow(/listed twice/);
    await expect(writeSafetensors(file, [{ name: '__metadata__', shape: [1], data: new Float32Array(1) }])).rejects.toThrow(
      /invalid tensor name/,
    );
    await expect(
      writeSafetensors(file, [
        {
          name: 'x',
          shape: [1],
          data: () => {
            throw new Error('producer failed');
          },
        },
      ]),
    ).rejects.toThrow(/producer failed/);
    expect(readFileSync(file).equals(before)).toBe(true);
    expect(readdirSync(dir).filter((f) => f.includes('.tmp-'))).toEqual([]);
  });
});

describe('malformed and hostile files', () => {
  const ok = { a: { dtype: 'F32', shape: [2], data_offsets: [0, 8] } };
  const cases: [string, () => string, RegExp][] = [
    [
      'shorter than the length field',
      () => {
        const f = fresh();
        writeFileSync(f, new Uint8Array(5));
        return f;
      },
      /5 bytes is too short for the 8-byte header length/,
    ],
    ['header length beyond the file', () => rawFile(ok, 8, 10_000n), /header length 10000 runs past the end of the file/],
    ['header length 2^64-1', () => rawFile(ok, 8, 2n ** 64n - 1n), /header length 18446744073709551615 runs past the end/],
    ['header not UTF-8', () => rawFile(Uint8Array.from([0x7b, 0xff, 0xfe, 0x7d])), /header is not valid UTF-8/],
    ['header not JSON', () => rawFile(new TextEncoder().encode('{"a": ')), /header is not valid JSON/],
    ['header a JSON array', () => rawFile([1, 2]), /header must be a JSON object/],
    ['header null', () => rawFile(null), /header must be a JSON object/],
    ['truncated data', () => rawFile(ok, 4), /tensor 'a': data_offsets \[0, 8\] run past the end of the data section \(4 bytes/],
    ['unknown dtype', () => rawFile({ a: { dtype: 'F33', shape: [2], data_offsets: [0, 8] } }, 8), /tensor 'a': unknown dtype "F33"/],
    ['dtype not a string', () => rawFile({ a: { dtype: 4, shape: [2], data_offsets: [0, 8] } }, 8), /tensor 'a': dtype must be a string/],
    [
      'wrong dtype size',
      () => rawFile({ a: { dtype: 'F16', shape: [2], data_offsets: [0, 8] } }, 8),
      /shape \[2\] of F16 needs 4 bytes but data_offsets \[0, 8\] hold 8/,
    ],
    [
      'huge shape',
      () => rawFile({ a: { dtype: 'F32', shape: [2 ** 40, 2 ** 40], data_offsets: [0, 8] } }, 8),
      /needs 4835703278458516698824704 bytes/,
    ],
    [
      'negative dimension',
      () => rawFile({ a: { dtype: 'F32', shape: [-2], data_offsets: [0, 8] } }, 8),
      /shape must be an array of non-negative integers/,
    ],
    [
      'fractional dimension',
      () => rawFile({ a: { dtype: 'F32', shape: [2.5], data_offsets: [0, 10] } }, 10),
      /shape must be an array of non-negative integers/,
    ],
    ['shape not an array', () => rawFile({ a: { dtype: 'F32', shape: '2', data_offsets: [0, 8] } }, 8), /shape must be an array/],
    [
      'negative offset',
      () => rawFile({ a: { dtype: 'F32', shape: [2], data_offsets: [-8, 0] } }, 8),
      /data_offsets must be \[begin, end\] non-negative integers, got \[-8,0\]/,
    ],
    [
      'non-integer offset',
      () => rawFile({ a: { dtype: 'F32', shape: [2], data_offsets: [0, 8.5] } }, 9),
      /data_offsets must be \[begin, end\] non-negative integers/,
    ],
    [
      'offset beyond 2^53',
      () => rawFile({ a: { dtype: 'F32', shape: [2], data_offsets: [0, 2 ** 60] } }, 8),
      /data_offsets must be \[begin, end\] non-negative integers/,
    ],
    [
      'three offsets',
      () => rawFile({ a: { dtype: 'F32', shape: [2], data_offsets: [0, 8, 9] } }, 8),
      /data_offsets must be \[begin, end\]/,
    ],
    ['end before begin', () => rawFile({ a: { dtype: 'F32', shape: [0], data_offsets: [8, 0] } }, 8), /end before begin/],
    [
      'overlapping ranges',
      () =>
        rawFile(
          {
            a: { dtype: 'F32', shape: [2], data_offsets: [0, 8] },
            b: { dtype: 'F32', shape: [2], data_offsets: [4, 12] },
          },
          12,
        ),
      /tensor 'b': data_offsets \[4, 12\] overlap the previous tensor \(which ends at 8\)/,
    ],
    [
      'aliased tensors',
      () =>
        rawFile(
          {
            a: { dtype: 'F32', shape: [2], data_offsets: [0, 8] },
            b: { dtype: 'F32', shape: [2], data_offsets: [0, 8] },
          },
          8,
        ),
      /overlap the previous tensor/,
    ],
    [
      'a hole',
      () =>
        rawFile(
          {
            a: { dtype: 'F32', shape: [1], data_offsets: [0, 4] },
            b: { dtype: 'F32', shape: [1], data_offsets: [8, 12] },
          },
          12,
        ),
      /tensor 'b': data_offsets \[8, 12\] leave a hole at bytes \[4, 8\)/,
    ],
    ['trailing bytes', () => rawFile(ok, 12), /cover 8 bytes of data but the data section holds 12/],
    ['tensor entry not an object', () => rawFile({ a: [1] }), /tensor 'a' must be an object/],
    ['unknown tensor field', () => rawFile({ a: { ...ok.a, offset: 3 } }, 8), /tensor 'a' has unknown field\(s\) offset/],
    ['empty tensor name', () => rawFile({ '': ok.a }, 8), /a tensor has an empty name/],
    ['metadata not strings', () => rawFile({ __metadata__: { format: 1 }, ...ok }, 8), /__metadata__.format must be a string/],
    ['metadata an array', () => rawFile({ __metadata__: [], ...ok }, 8), /__metadata__ must be an object of strings/],
  ];
  for (const [what, make, message] of cases) {
    it(`refuses ${what}`, async () => {
      const e = await openError(make());
      expect(e).toBeInstanceOf(SafetensorsError);
      expect(e.message).toMatch(message);
      expect(e.message).toContain(dir); // names the file
    });
  }

  it('refuses a header larger than the limit before reading it (sparse 120 MB file)', async () => {
    const file = fresh('big');
    const fd = openSync(file, 'w');
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(MAX_HEADER_BYTES + 1));
    writeSync(fd, len, 0, 8, 0);
    ftruncateSync(fd, 120 * 1024 * 1024);
    closeSync(fd);
    const e = await openError(file);
    expect(e).toBeInstanceOf(SafetensorsError);
    expect(e.message).toMatch(/header length 104857601 is larger than the 104857600-byte limit/);
  });

  it('refuses a missing file and hostile shard indexes', async () => {
    expect(await openError(path.join(dir, 'absent.safetensors'))).toBeInstanceOf(SafetensorsError);
    const ckpt = (index: unknown, shards: Record<string, string> = {}) => {
      const d = mkdtempSync(path.join(dir, 'ckpt-'));
      writeFileSync(path.join(d, 'model.safetensors.index.json'), typeof index === 'string' ? index : JSON.stringify(index));
      for (const [name, from] of Object.entries(shards)) writeFileSync(path.join(d, name), readFileSync(from));
      return d;
    };
    const shard = fresh();
    await writeSafetensors(shard, [
      { name: 'a', shape: [1], data: new Float32Array(1) },
      { name: 'b', shape: [1], data: new Float32Array(1) },
    ]);
    await expect(CheckpointWeights.open(ckpt('{'))).rejects.toThrow(/index.json: not valid JSON/);
    await expect(CheckpointWeights.open(ckpt({ weight_map: [] }))).rejects.toThrow(/weight_map must be an object/);
    await expect(CheckpointWeights.open(ckpt({ weight_map: {} }))).rejects.toThrow(/weight_map lists no tensors/);
    await expect(CheckpointWeights.open(ckpt({ weight_map: { a: '../x.safetensors' } }))).rejects.toThrow(
      /weight_map\['a'\] must be a file name in the same directory, got "..\/x.safetensors"/,
    );
    await expect(CheckpointWeights.open(ckpt({ weight_map: { a: '/etc/passwd' } }))).rejects.toThrow(
      /must be a file name in the same directory/,
    );
    await expect(CheckpointWeights.open(ckpt({ weight_map: { a: 'gone.safetensors' } }))).rejects.toThrow(/gone.safetensors: cannot open/);
    await expect(
      CheckpointWeights.open(ckpt({ weight_map: { a: 's.safetensors', c: 's.safetensors' } }, { 's.safetensors': shard })),
    ).rejects.toThrow(/weight_map puts 'c' in s.safetensors, which has no such tensor/);
    await expect(CheckpointWeights.open(ckpt({ weight_map: { a: 's.safetensors' } }, { 's.safetensors': shard }))).rejects.toThrow(
      /s.safetensors: holds tensor 'b' that model.safetensors.index.json does not list/,
    );
    await expect(CheckpointWeights.open(mkdtempSync(path.join(dir, 'empty-')))).rejects.toThrow(
      /no model.safetensors or model.safetensors.index.json/,
    );
  });
});

describe('fuzz: mutated headers and bytes', () => {
  it('gives a clean read or a SafetensorsError for 400 seeded mutations, never anything else', async () => {
    const base = fresh('base');
    await writeSafetensors(
      base,
      [
        { name: 'w', shape: [3, 4], data: randomData(12, 5) },
        { name: 'b', shape: [4], data: randomData(4, 6) },
        { name: 'v', shape: [2, 2], data: randomData(4, 7) },
      ],
      { dtype: 'BF16' },
    );
    const original = readFileSync(base);
    const headerLen = Number(original.readBigUInt64LE(0));
    const header = JSON.parse(original.subarray(8, 8 + headerLen).toString('utf8'));
    const r = prng(2024);
    const int = (n: number) => Math.floor(r() * n);
    const junk = [-1, 0, 1, 2.5, 2 ** 53, 1e300, 'x', null, [], {}, [1, 2, 3], true, -0, 2 ** 31];
    const mutate = (): Uint8Array => {
      const kind = int(6);
      if (kind === 0) {
        // flip bytes anywhere
        const b = Uint8Array.from(original);
        for (let k = 0, n = 1 + int(4); k < n; k++) b[int(b.length)] ^= 1 << int(8);
        return b;
      }
      if (kind === 1) return original.subarray(0, int(original.length)); // truncate
      if (kind === 2) {
        // rewrite the length field
        const b = Uint8Array.from(original);
        new DataView(b.buffer).setBigUint64(
          0,
          [BigInt(int(200)), 2n ** 63n, BigInt(headerLen - 1 - int(8)), BigInt(headerLen + 1 + int(8))][int(4)],
          true,
        );
        return b;
      }
      // JSON-level: replace one field of one tensor with junk, then re-lay the file
      const h = structuredClone(header);
      const names = ['w', 'b', 'v'];
      const t = h[names[int(3)]];
      const field = ['dtype', 'shape', 'data_offsets'][int(3)];
      if (kind === 3) t[field] = junk[int(junk.length)];
      else if (kind === 4 && field !== 'dtype') t[field] = (t[field] as number[]).map((x: number) => (r() < 0.5 ? x : x + int(5) - 2));
      else t.dtype = ['F32', 'F16', 'BF16', 'I64', 'U8', 'bf16', ''][int(7)];
      const json = new TextEncoder().encode(JSON.stringify(h));
      const data = original.subarray(8 + headerLen);
      const extra = kind === 5 ? int(3) : 0;
      const b = new Uint8Array(8 + json.length + data.length + extra);
      new DataView(b.buffer).setBigUint64(0, BigInt(json.length), true);
      b.set(json, 8);
      b.set(data, 8 + json.length);
      return b;
    };
    const outcomes = { read: 0, refused: 0 };
    const file = fresh('fuzz');
    for (let i = 0; i < 400; i++) {
      writeFileSync(file, mutate());
      try {
        const f = await SafetensorsFile.open(file);
        try {
          for (const [name, t] of f.tensors) {
            const elems = t.shape.reduce((a, d) => a * d, 1);
            if (['F32', 'F16', 'BF16', 'F64'].includes(t.dtype)) expect((await f.readFloat32(name)).length).toBe(elems);
            else expect((await f.readRaw(name)).length).toBe(t.end - t.begin);
          }
        } finally {
          await f.close();
        }
        outcomes.read++;
      } catch (e) {
        if (!(e instanceof SafetensorsError)) throw new Error(`mutation ${i} escaped as ${(e as Error).name}: ${(e as Error).message}`);
        outcomes.refused++;
      }
    }
    // Both outcomes occur, so the mutations are neither all fatal nor all harmless.
    expect(outcomes.refused).toBeGreaterThan(100);
    expect(outcomes.read).toBeGreaterThan(10);
  });
});
