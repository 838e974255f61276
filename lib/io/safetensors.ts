// Safetensors files (the Hugging Face weight format): an 8-byte little-endian header length,
// a JSON header {name: {dtype, shape, data_offsets: [begin, end]}, __metadata__?}, then the
// tensors' bytes. Every header field is validated before any tensor byte is read, so a
// truncated or hostile file fails with a SafetensorsError naming the file, tensor and field,
// never with a RangeError from deep inside or an allocation the size of a lie.
//
// Reading goes tensor by tensor through a file handle at explicit positions: a checkpoint
// never exists twice in memory (at most one tensor's raw bytes beside its float32 copy).
// Writing goes to a temporary file that is renamed over the target once complete.
import { constants as fsConstants } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import { endianness } from 'node:os';
import { commitTemporaries, writeTemporary } from '../util/atomic-write.js';
import { jsonSyntaxProblem } from '../util/json.js';

export class SafetensorsError extends Error {
  override name = 'SafetensorsError';
}

/** Bytes per element of every dtype the format defines; any other dtype string is refused. */
const DTYPE_BYTES: Readonly<Record<string, number>> = {
  BOOL: 1,
  U8: 1,
  I8: 1,
  F8_E4M3: 1,
  F8_E5M2: 1,
  I16: 2,
  U16: 2,
  F16: 2,
  BF16: 2,
  I32: 4,
  U32: 4,
  F32: 4,
  I64: 8,
  U64: 8,
  F64: 8,
};

/** The dtypes written. */
export type WriteDtype = 'F32' | 'BF16';

/**
 * The reference implementation refuses headers above 100 MB; a header that size already
 * describes millions of tensors, so anything larger is a corrupt or hostile length field.
 */
export const MAX_HEADER_BYTES = 100 * 1024 * 1024;

export interface TensorInfo {
  dtype: string;
  shape: number[];
  /** byte range relative to the start of the data section (after the header) */
  begin: number;
  end: number;
}

export interface SafetensorsHeader {
  /** bytes of JSON after the 8-byte length */
  headerBytes: number;
  /** absolute file offset of the data section */
  dataStart: number;
  metadata: Record<string, string>;
  /** tensors in file order (ascending offsets) */
  tensors: Map<string, TensorInfo>;
}

// Typed-array views below reinterpret file bytes in host order.
if (endianness() !== 'LE') throw new Error('sppo-engine safetensors I/O needs a little-endian host');

function isNonNegativeInteger(v: unknown): v is number {
  return typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;
}

/**
 * Validates a header (the JSON bytes after the length field) against the size of the file it
 * came from. `label` names the file in errors.
 */
export function parseSafetensorsHeader(json: Uint8Array, fileSize: number, label: string): SafetensorsHeader {
  const fail = (msg: string): never => {
    throw new SafetensorsError(`${label}: ${msg}`);
  };
  let text: string;
  try {
    text = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true }).decode(json);
  } catch {
    return fail('header is not valid UTF-8');
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (e) {
    return fail(`header is ${jsonSyntaxProblem(text, e)}`);
  }
  if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) fail('header must be a JSON object');

  const dataStart = 8 + json.length;
  const dataBytes = fileSize - dataStart;
  const metadata: Record<string, string> = {};
  const entries: [string, TensorInfo][] = [];
  for (const [name, raw] of Object.entries(parsed as Record<string, unknown>)) {
    if (name === '__metadata__') {
      if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) fail('__metadata__ must be an object of strings');
      for (const [k, v] of Object.entries(raw as Record<string, unknown>)) {
        if (typeof v !== 'string') fail(`__metadata__.${k} must be a string, got ${JSON.stringify(v)}`);
        metadata[k] = v as string;
      }
      continue;
    }
    const where = `tensor '${name}'`;
    if (name.length === 0) fail('a tensor has an empty name');
    if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) fail(`${where} must be an object`);
    const t = raw as Record<string, unknown>;
    const extra = Object.keys(t).filter((k) => k !== 'dtype' && k !== 'shape' && k !== 'data_offsets');
    if (extra.length > 0) fail(`${where} has unknown field(s) ${extra.join(', ')}`);
    const dtype = t.dtype;
    if (typeof dtype !== 'string') fail(`${where}: dtype must be a string`);
    const elemBytes = DTYPE_BYTES[dtype as string];
    if (elemBytes === undefined) fail(`${where}: unknown dtype ${JSON.stringify(dtype)}`);
    const shape = t.shape;
    if (!Array.isArray(shape) || !shape.every(isNonNegativeInteger)) {
      fail(`${where}: shape must be an array of non-negative integers, got ${JSON.stringify(shape)}`);
    }
    const offsets = t.data_offsets;
    if (!Array.isArray(offsets) || offsets.length !== 2 || !offsets.every(isNonNegativeInteger)) {
      fail(`${where}: data_offsets must be [begin, end] non-negative integers, got ${JSON.stringify(offsets)}`);
    }
    const [begin, end] = offsets as [number, number];
    if (end < begin) fail(`${where}: data_offsets [${begin}, ${end}] end before begin`);
    if (end > dataBytes) {
      fail(
        `${where}: data_offsets [${begin}, ${end}] run past the end of the data section (${Math.max(dataBytes, 0)} bytes; the file is truncated or the offsets are wrong)`,
      );
    }
    // BigInt: a hostile shape's product can exceed 2^53 and compare equal by rounding.
    const elements = (shape as number[]).reduce((a, d) => a * BigInt(d), 1n);
    const expected = elements * BigInt(elemBytes);
    if (expected !== BigInt(end - begin)) {
      fail(
        `${where}: shape [${(shape as number[]).join(', ')}] of ${dtype as string} needs ${expected} bytes but data_offsets [${begin}, ${end}] hold ${end - begin}`,
      );
    }
    entries.push([name, { dtype: dtype as string, shape: [...(shape as number[])], begin, end }]);
  }

  // The data section must be covered exactly: sorted ranges that touch, from 0 to its end.
  entries.sort((a, b) => a[1].begin - b[1].begin || a[1].end - b[1].end);
  let cursor = 0;
  for (const [name, t] of entries) {
    if (t.begin < cursor)
      fail(`tensor '${name}': data_offsets [${t.begin}, ${t.end}] overlap the previous tensor (which ends at ${cursor})`);
    if (t.begin > cursor) fail(`tensor '${name}': data_offsets [${t.begin}, ${t.end}] leave a hole at bytes [${cursor}, ${t.begin})`);
    cursor = t.end;
  }
  if (cursor !== dataBytes) {
    fail(`the tensors cover ${cursor} bytes of data but the data section holds ${dataBytes} (trailing bytes after the last tensor)`);
  }
  return { headerBytes: json.length, dataStart, metadata, tensors: new Map(entries) };
}

async function readExactly(fh: FileHandle, into: Uint8Array, position: number, label: string, what: string): Promise<void> {
  let done = 0;
  while (done < into.length) {
    const { bytesRead } = await fh.read(into, done, into.length - done, position + done);
    if (bytesRead === 0) throw new SafetensorsError(`${label}: file ended while reading ${what} (at byte ${position + done})`);
    done += bytesRead;
  }
}

let halfTable: Float32Array | undefined;
/** Every IEEE half value as float32, built once (256 KiB) so F16 decoding is a table look-up. */
function halfToFloatTable(): Float32Array {
  if (halfTable) return halfTable;
  halfTable = new Float32Array(65536);
  for (let h = 0; h < 65536; h++) {
    const sign = h & 0x8000 ? -1 : 1;
    const exp = (h >> 10) & 0x1f;
    const frac = h & 0x3ff;
    if (exp === 0) halfTable[h] = sign * frac * 2 ** -24;
    else if (exp === 31) halfTable[h] = frac ? NaN : sign * Infinity;
    else halfTable[h] = sign * (1 + frac / 1024) * 2 ** (exp - 15);
  }
  return halfTable;
}

const FLOAT_DTYPES = new Set<string>(['F32', 'F16', 'BF16', 'F64']);

function notFloat(label: string, dtype: string): SafetensorsError {
  return new SafetensorsError(`${label}: dtype ${dtype} cannot be read as floating point (supported: F32, F16, BF16, F64)`);
}

/**
 * Converts one tensor's raw little-endian bytes to float32, into `out` (of the right length)
 * when given, else into a new array (F32 is then a view of `raw`).
 */
export function toFloat32(raw: Uint8Array, dtype: string, label: string, out?: Float32Array): Float32Array {
  if (raw.byteOffset % 8 !== 0) raw = raw.slice();
  switch (dtype) {
    case 'F32': {
      const view = new Float32Array(raw.buffer, raw.byteOffset, raw.length / 4);
      if (!out) return view;
      out.set(view);
      return out;
    }
    case 'BF16': {
      // bfloat16 is the top half of a float32: widening is a 16-bit shift.
      const src = new Uint16Array(raw.buffer, raw.byteOffset, raw.length / 2);
      out ??= new Float32Array(src.length);
      const bits = new Uint32Array(out.buffer, out.byteOffset, out.length);
      for (let i = 0; i < src.length; i++) bits[i] = src[i] << 16;
      return out;
    }
    case 'F16': {
      const table = halfToFloatTable();
      const src = new Uint16Array(raw.buffer, raw.byteOffset, raw.length / 2);
      out ??= new Float32Array(src.length);
      for (let i = 0; i < src.length; i++) out[i] = table[src[i]];
      return out;
    }
    case 'F64': {
      const src = new Float64Array(raw.buffer, raw.byteOffset, raw.length / 8);
      out ??= new Float32Array(src.length);
      out.set(src);
      return out;
    }
    default:
      throw notFloat(label, dtype);
  }
}

/**
 * Buffers reused across the reads of many tensors. Fresh memory costs a page fault per 4 KiB
 * on first touch, which for a large checkpoint takes as long as the BF16 conversion itself.
 * An array read with a scratch is overwritten by the next read that uses the same scratch.
 */
export class ReadScratch {
  #raw = new ArrayBuffer(0);
  #floats = new ArrayBuffer(0);

  bytes(n: number): Uint8Array {
    if (this.#raw.byteLength < n) this.#raw = new ArrayBuffer(n);
    return new Uint8Array(this.#raw, 0, n);
  }

  floats(n: number): Float32Array {
    if (this.#floats.byteLength < n * 4) this.#floats = new ArrayBuffer(n * 4);
    return new Float32Array(this.#floats, 0, n);
  }
}

/** An open safetensors file whose header has been validated; tensors are read on demand. */
export class SafetensorsFile {
  private constructor(
    readonly path: string,
    readonly header: SafetensorsHeader,
    private fh: FileHandle | undefined,
  ) {}

  static async open(file: string): Promise<SafetensorsFile> {
    let fh: FileHandle;
    try {
      fh = await open(file, fsConstants.O_RDONLY);
    } catch (e) {
      throw new SafetensorsError(`${file}: cannot open (${(e as Error).message})`);
    }
    try {
      const { size } = await fh.stat();
      if (size < 8) throw new SafetensorsError(`${file}: ${size} bytes is too short for the 8-byte header length`);
      const lenBytes = new Uint8Array(8);
      await readExactly(fh, lenBytes, 0, file, 'the header length');
      const declared = new DataView(lenBytes.buffer).getBigUint64(0, true);
      if (declared > BigInt(size - 8)) {
        throw new SafetensorsError(`${file}: header length ${declared} runs past the end of the file (${size} bytes)`);
      }
      if (declared > BigInt(MAX_HEADER_BYTES)) {
        throw new SafetensorsError(`${file}: header length ${declared} is larger than the ${MAX_HEADER_BYTES}-byte limit`);
      }
      const json = new Uint8Array(Number(declared));
      await readExactly(fh, json, 8, file, 'the header');
      return new SafetensorsFile(file, parseSafetensorsHeader(json, size, file), fh);
    } catch (e) {
      await fh.close();
      throw e;
    }
  }

  get tensors(): Map<string, TensorInfo> {
    return this.header.tensors;
  }

  #handle(): FileHandle {
    if (!this.fh) throw new SafetensorsError(`${this.path}: the file has been closed`);
    return this.fh;
  }

  #info(name: string): TensorInfo {
    this.#handle();
    const t = this.header.tensors.get(name);
    if (!t) throw new SafetensorsError(`${this.path}: no tensor named '${name}'`);
    return t;
  }

  /** The tensor's bytes as stored (little-endian), in an ArrayBuffer of their own or in `into`. */
  async readRaw(name: string, into?: Uint8Array): Promise<Uint8Array> {
    const t = this.#info(name);
    const bytes = into ?? new Uint8Array(t.end - t.begin);
    await readExactly(this.#handle(), bytes, this.header.dataStart + t.begin, this.path, `tensor '${name}'`);
    return bytes;
  }

  /**
   * The tensor converted to float32 (F32, F16, BF16 or F64 on disk); with a scratch, in the
   * scratch's memory (valid until its next use).
   */
  async readFloat32(name: string, scratch?: ReadScratch): Promise<Float32Array> {
    const t = this.#info(name);
    const label = `${this.path}: tensor '${name}'`;
    // Refused before reading, so an integer tensor is not loaded only to be rejected.
    if (!FLOAT_DTYPES.has(t.dtype)) throw notFloat(label, t.dtype);
    if (!scratch) return toFloat32(await this.readRaw(name), t.dtype, label);
    const n = t.shape.reduce((a, d) => a * d, 1);
    const out = scratch.floats(n);
    if (t.dtype === 'F32') {
      await this.readRaw(name, new Uint8Array(out.buffer, out.byteOffset, out.byteLength));
      return out;
    }
    return toFloat32(await this.readRaw(name, scratch.bytes(t.end - t.begin)), t.dtype, label, out);
  }

  async close(): Promise<void> {
    const fh = this.fh;
    this.fh = undefined;
    await fh?.close();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}

export interface LoadedTensor {
  /** dtype on disk */
  dtype: string;
  shape: number[];
  data: Float32Array;
}

/** Reads a whole (small) safetensors file; use SafetensorsFile for large ones. */
export async function readSafetensors(file: string): Promise<{ metadata: Record<string, string>; tensors: Map<string, LoadedTensor> }> {
  const f = await SafetensorsFile.open(file);
  try {
    const tensors = new Map<string, LoadedTensor>();
    for (const [name, t] of f.tensors) tensors.set(name, { dtype: t.dtype, shape: t.shape, data: await f.readFloat32(name) });
    return { metadata: f.header.metadata, tensors };
  } finally {
    await f.close();
  }
}

// ---------------------------------------------------------------------------------------------
// Writing

/** A tensor to write; `data` may be produced on demand so a large model is never copied whole. */
export interface TensorSource {
  name: string;
  shape: number[];
  data: Float32Array | (() => Float32Array | Promise<Float32Array>);
}

export interface WriteOptions {
  /** on-disk dtype (default F32) */
  dtype?: WriteDtype;
  /** extra string metadata; format: "pt" is always written (transformers checks it) */
  metadata?: Record<string, string>;
}

/** float32 → bfloat16 with round-to-nearest-even (what torch's .to(torch.bfloat16) does). */
export function float32ToBf16(src: Float32Array): Uint16Array {
  const bits = new Uint32Array(src.buffer, src.byteOffset, src.length);
  const out = new Uint16Array(src.length);
  for (let i = 0; i < bits.length; i++) {
    const u = bits[i];
    if ((u & 0x7fffffff) > 0x7f800000)
      out[i] = (u >>> 16) | 0x40; // NaN stays a (quiet) NaN
    else out[i] = (u + 0x7fff + ((u >>> 16) & 1)) >>> 16;
  }
  return out;
}

export function dtypeBytes(dtype: WriteDtype): number {
  return DTYPE_BYTES[dtype];
}

function elementCount(shape: number[], name: string): number {
  if (!Array.isArray(shape) || !shape.every(isNonNegativeInteger)) {
    throw new SafetensorsError(`tensor '${name}': shape must be non-negative integers, got ${JSON.stringify(shape)}`);
  }
  return shape.reduce((a, d) => a * d, 1);
}

/** The header bytes (length field + JSON padded with spaces to 8-byte alignment) for `tensors`. */
function encodeHeader(tensors: readonly TensorSource[], dtype: WriteDtype, metadata: Record<string, string>): Uint8Array {
  const header: Record<string, unknown> = { __metadata__: { ...metadata, format: 'pt' } };
  let offset = 0;
  for (const t of tensors) {
    if (t.name === '__metadata__' || t.name.length === 0) throw new SafetensorsError(`invalid tensor name '${t.name}'`);
    if (Object.hasOwn(header, t.name)) throw new SafetensorsError(`tensor '${t.name}' is listed twice`);
    const bytes = elementCount(t.shape, t.name) * DTYPE_BYTES[dtype];
    header[t.name] = { dtype, shape: t.shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  const json = new TextEncoder().encode(JSON.stringify(header));
  // Padding keeps the data section 8-byte aligned so readers can map tensors in place.
  const padded = Math.ceil(json.length / 8) * 8;
  const out = new Uint8Array(8 + padded).fill(0x20);
  new DataView(out.buffer).setBigUint64(0, BigInt(padded), true);
  out.set(json, 8);
  return out;
}

/**
 * Writes `tensors` to a temporary file next to `target` and fsyncs it, without renaming;
 * returns the temporary path. The caller commits it (commitTemporaries) or removes it.
 */
export async function writeSafetensorsTemp(target: string, tensors: readonly TensorSource[], options: WriteOptions = {}): Promise<string> {
  const dtype = options.dtype ?? 'F32';
  if (dtype !== 'F32' && dtype !== 'BF16') throw new SafetensorsError(`cannot write dtype ${String(dtype)} (supported: F32, BF16)`);
  const header = encodeHeader(tensors, dtype, options.metadata ?? {});
  return writeTemporary(target, async (fh) => {
    await fh.write(header, 0, header.length, 0);
    let position = header.length;
    for (const t of tensors) {
      const data = typeof t.data === 'function' ? await t.data() : t.data;
      const n = elementCount(t.shape, t.name);
      if (!(data instanceof Float32Array) || data.length !== n) {
        throw new SafetensorsError(`tensor '${t.name}': shape [${t.shape.join(', ')}] has ${n} elements but the data has ${data?.length}`);
      }
      const out = dtype === 'F32' ? data : float32ToBf16(data);
      const bytes = new Uint8Array(out.buffer, out.byteOffset, out.byteLength);
      await fh.write(bytes, 0, bytes.length, position);
      position += bytes.length;
    }
  });
}

/** Writes one safetensors file atomically: a reader sees the old file or the complete new one. */
export async function writeSafetensors(file: string, tensors: readonly TensorSource[], options: WriteOptions = {}): Promise<void> {
  await commitTemporaries([{ tmp: await writeSafetensorsTemp(file, tensors, options), target: file }]);
}
