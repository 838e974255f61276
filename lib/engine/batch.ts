// What crosses into the addon, checked here since the addon trusts types and shapes: the
// accepted batch forms become the flat typed arrays it reads (ragged rows, non-integer ids and
// mismatched masks are refused naming the row and position), and option objects' fields are
// checked against their kinds (an unknown field or a wrong type names the field's path).
import { INT32_MAX, INT32_MIN, isInt32, tokenIdError } from '../util/int32.js';
import type { BatchInput, TokenBatch } from './types.js';

/** The kind of value an option field takes; the engine checks the value's range. */
export type FieldKind = 'int32' | 'int53' | 'uint53' | 'number' | 'boolean' | 'string' | 'object';

function describe(v: unknown): string {
  if (v === undefined || v === null) return String(v);
  if (Array.isArray(v)) return 'an array';
  switch (typeof v) {
    case 'string':
      return 'a string';
    case 'boolean':
      return 'a boolean';
    case 'number':
      return 'a number';
    case 'object':
      return 'an object';
    case 'function':
      return 'a function';
    default:
      return 'a value of another type';
  }
}

/** Throws a TypeError naming `name` unless `v` is of the given kind. */
export function checkKind(v: unknown, kind: FieldKind, name: string): void {
  const type = kind === 'boolean' || kind === 'string' || kind === 'object' ? kind : 'number';
  if (typeof v !== type || (type === 'object' && (v === null || Array.isArray(v))))
    throw new TypeError(`${name} must be ${type === 'object' ? 'an' : 'a'} ${type}, got ${describe(v)}`);
  if (type !== 'number') return;
  const n = v as number;
  if (!Number.isFinite(n)) throw new TypeError(`${name} must be finite, got ${n}`);
  if (kind === 'number') return;
  if (!Number.isSafeInteger(n)) throw new TypeError(`${name} must be an integer, got ${n}`);
  if (kind === 'int32' && (n < INT32_MIN || n > INT32_MAX)) throw new TypeError(`${name} is out of range (a 32-bit integer), got ${n}`);
  if (kind === 'uint53' && n < 0) throw new TypeError(`${name} must be a non-negative integer, got ${n}`);
}

/**
 * Checks an options object against its fields' kinds: it must be a plain object without unknown
 * fields, each present field of its kind. Absent fields (undefined or null) take the engine's
 * defaults. Errors are TypeErrors naming the field's path (`path.field`).
 */
export function checkFields(value: unknown, path: string, kinds: Readonly<Record<string, FieldKind>>): Record<string, unknown> {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw new TypeError(`${path} must be an object`);
  const fields = value as Record<string, unknown>;
  for (const [key, v] of Object.entries(fields)) {
    if (!Object.hasOwn(kinds, key)) throw new TypeError(`${path} has an unknown field '${key}'`);
    if (v !== undefined && v !== null) checkKind(v, kinds[key], `${path}.${key}`);
  }
  return fields;
}

export function toTokenBatch(input: BatchInput): TokenBatch {
  if (Array.isArray(input)) return fromRows(input, undefined);
  if ('rows' in input) return fromRows(input.rows, input.targetMask);
  const { tokens, batch, seq, targetMask } = input;
  if (!(tokens instanceof Int32Array)) throw new TypeError('batch.tokens must be an Int32Array');
  if (!Number.isInteger(batch) || batch < 0 || !Number.isInteger(seq) || seq < 0)
    throw new RangeError(`batch.batch and batch.seq must be non-negative integers, got ${batch} and ${seq}`);
  if (tokens.length !== batch * seq) throw new RangeError(`batch.tokens has ${tokens.length} elements but batch x seq = ${batch} x ${seq}`);
  if (targetMask !== undefined) {
    if (!(targetMask instanceof Uint8Array)) throw new TypeError('batch.targetMask must be a Uint8Array');
    if (targetMask.length !== tokens.length)
      throw new RangeError(`batch.targetMask has ${targetMask.length} elements, batch.tokens has ${tokens.length}`);
  }
  return input;
}

function fromRows(rows: number[][], mask: number[][] | undefined): TokenBatch {
  if (rows.length === 0) throw new RangeError('batch is empty (0 sequences)');
  const seq = rows[0].length;
  const tokens = new Int32Array(rows.length * seq);
  rows.forEach((row, r) => {
    if (!Array.isArray(row)) throw new TypeError(`batch row ${r} is not an array of token ids`);
    if (row.length !== seq)
      throw new RangeError(
        `ragged batch: sequence ${r} has ${row.length} tokens but sequence 0 has ${seq}; ` +
          'pad rows to one length and mask the padding with targetMask',
      );
    row.forEach((id, t) => {
      if (!isInt32(id)) throw tokenIdError(`token at sequence ${r}, position ${t}`, id);
      tokens[r * seq + t] = id;
    });
  });
  let targetMask: Uint8Array | undefined;
  if (mask !== undefined) {
    if (mask.length !== rows.length) throw new RangeError(`targetMask has ${mask.length} rows, the batch has ${rows.length}`);
    const out = new Uint8Array(tokens.length);
    targetMask = out;
    mask.forEach((row, r) => {
      if (row.length !== seq) throw new RangeError(`targetMask row ${r} has ${row.length} entries, sequences have ${seq}`);
      row.forEach((m, t) => {
        if (m !== 0 && m !== 1) throw new RangeError(`targetMask at sequence ${r}, position ${t} must be 0 or 1, got ${m}`);
        out[r * seq + t] = m;
      });
    });
  }
  return { tokens, batch: rows.length, seq, targetMask };
}
