// What crosses into the addon, checked here since the addon trusts types and shapes: the
// accepted batch forms become the flat typed arrays it reads (ragged rows, non-integer ids and
// mismatched masks are refused naming the row and position), and option objects' fields are
// checked against their kinds (an unknown field or a wrong type names the field's path).
import { INT32_MAX, INT32_MIN, isInt32, tokenIdError } from '../util/int32.js';
import type { BatchInput, TokenBatch, TokenRows } from './types.js';

/** The kind of value an option field takes; the engine checks the value's range. */
export type FieldKind = 'int32' | 'int53' | 'uint53' | 'number' | 'boolean' | 'string' | 'object' | 'function' | 'signal';

/** A field's own check, for values no single kind describes (a choice of strings, a union); throws a TypeError or RangeError naming `name`. */
export type FieldCheck = (value: unknown, name: string) => void;

/** How a value is named in an error: "a string", "an array", "undefined" … */
export function describeValue(v: unknown): string {
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
  if (kind === 'signal') {
    if (!(v instanceof AbortSignal)) throw new TypeError(`${name} must be an AbortSignal, got ${describeValue(v)}`);
    return;
  }
  const type = kind === 'boolean' || kind === 'string' || kind === 'object' || kind === 'function' ? kind : 'number';
  if (typeof v !== type || (type === 'object' && (v === null || Array.isArray(v))))
    throw new TypeError(`${name} must be ${type === 'object' ? 'an' : 'a'} ${type}, got ${describeValue(v)}`);
  if (type !== 'number') return;
  const n = v as number;
  if (!Number.isFinite(n)) throw new TypeError(`${name} must be finite, got ${n}`);
  if (kind === 'number') return;
  if (!Number.isSafeInteger(n)) throw new TypeError(`${name} must be an integer, got ${n}`);
  if (kind === 'int32' && (n < INT32_MIN || n > INT32_MAX)) throw new TypeError(`${name} is out of range (a 32-bit integer), got ${n}`);
  if (kind === 'uint53' && n < 0) throw new TypeError(`${name} must be a non-negative integer, got ${n}`);
}

/** A FieldCheck that takes one of `choices` (strings), naming them when the value is another. */
export function oneOf(choices: readonly string[]): FieldCheck {
  return (v, name) => {
    if (typeof v === 'string' && choices.includes(v)) return;
    const list = choices.map((c) => `'${c}'`);
    const said = list.length > 1 ? `${list.slice(0, -1).join(', ')} or ${list[list.length - 1]}` : list[0];
    throw new TypeError(`${name} must be ${said}, got ${typeof v === 'string' ? `'${v}'` : describeValue(v)}`);
  };
}

// Edit distance of two short names (case-insensitive), for "did you mean" on an unknown field.
function distance(a: string, b: string): number {
  const [x, y] = [a.toLowerCase(), b.toLowerCase()];
  let row = Array.from({ length: y.length + 1 }, (_, j) => j);
  for (let i = 1; i <= x.length; i++) {
    const next = [i];
    for (let j = 1; j <= y.length; j++) next.push(Math.min(row[j] + 1, next[j - 1] + 1, row[j - 1] + (x[i - 1] === y[j - 1] ? 0 : 1)));
    row = next;
  }
  return row[y.length];
}

/**
 * Checks that `value` is a plain object (not null, not an array) whose fields are all among
 * `known`; the values are the caller's to check. An unknown field is a TypeError naming it, the
 * closest known name when one is near, and the known ones.
 */
export function checkKnownFields(value: unknown, path: string, known: readonly string[]): Record<string, unknown> {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw new TypeError(`${path} must be an object`);
  const fields = value as Record<string, unknown>;
  for (const key of Object.keys(fields)) {
    if (known.includes(key)) continue;
    const near = known
      .filter((k) => distance(k, key) <= Math.max(1, Math.floor(k.length / 4)))
      .sort((a, b) => distance(a, key) - distance(b, key));
    const hint = near.length > 0 ? ` (did you mean '${near[0]}'?)` : '';
    throw new TypeError(`${path} has an unknown field '${key}'${hint}; the known fields are ${known.join(', ')}`);
  }
  return fields;
}

/**
 * Checks an options object against its fields' kinds: it must be a plain object without unknown
 * fields, each present field of its kind (or passing its own check). Absent fields (undefined or
 * null) take the engine's defaults. Errors are TypeErrors naming the field's path (`path.field`).
 */
export function checkFields(
  value: unknown,
  path: string,
  kinds: Readonly<Record<string, FieldKind | FieldCheck>>,
): Record<string, unknown> {
  const fields = checkKnownFields(value, path, Object.keys(kinds));
  for (const [key, v] of Object.entries(fields)) {
    if (v === undefined || v === null) continue;
    const kind = kinds[key];
    if (typeof kind === 'function') kind(v, `${path}.${key}`);
    else checkKind(v, kind, `${path}.${key}`);
  }
  return fields;
}

/** The fields every call's options take (CallOptions). */
export const CALL_FIELDS = { signal: 'signal' } as const satisfies Record<string, FieldKind>;

const ROWS_FIELDS = ['rows', 'targetMask'] as const satisfies readonly (keyof TokenRows)[];
const TYPED_FIELDS = ['tokens', 'batch', 'seq', 'targetMask'] as const satisfies readonly (keyof TokenBatch)[];

export function toTokenBatch(input: BatchInput): TokenBatch {
  const given: unknown = input; // (checked on an unknown: Array.isArray would narrow `input` to any[])
  if (Array.isArray(given)) return fromRows(input as number[][], undefined, 'batch');
  if (typeof given !== 'object' || given === null)
    throw new TypeError(
      `batch must be rows of token ids, { rows, targetMask? } or { tokens, batch, seq, targetMask? }, got ${describeValue(given)}`,
    );
  if ('rows' in given) {
    checkKnownFields(given, 'batch', ROWS_FIELDS);
    const rows = input as TokenRows;
    return fromRows(rows.rows, rows.targetMask ?? undefined, 'batch.rows');
  }
  checkKnownFields(given, 'batch', TYPED_FIELDS);
  const typed = input as TokenBatch;
  const { tokens, batch, seq, targetMask } = typed;
  if (!(tokens instanceof Int32Array)) throw new TypeError('batch.tokens must be an Int32Array');
  if (!Number.isInteger(batch) || batch < 0 || !Number.isInteger(seq) || seq < 0)
    throw new RangeError(`batch.batch and batch.seq must be non-negative integers, got ${batch} and ${seq}`);
  if (tokens.length !== batch * seq) throw new RangeError(`batch.tokens has ${tokens.length} elements but batch x seq = ${batch} x ${seq}`);
  if (targetMask !== undefined) {
    if (!(targetMask instanceof Uint8Array)) throw new TypeError('batch.targetMask must be a Uint8Array');
    if (targetMask.length !== tokens.length)
      throw new RangeError(`batch.targetMask has ${targetMask.length} elements, batch.tokens has ${tokens.length}`);
  }
  return typed;
}

function fromRows(rows: number[][], mask: number[][] | undefined, name: string): TokenBatch {
  const given: unknown = rows;
  if (!Array.isArray(given)) throw new TypeError(`${name} must be an array of token id rows, got ${describeValue(given)}`);
  const givenMask: unknown = mask;
  if (givenMask !== undefined && !Array.isArray(givenMask))
    throw new TypeError(
      `batch.targetMask must be an array of rows of 0/1 (a Uint8Array goes with { tokens, batch, seq }), got ${describeValue(mask)}`,
    );
  if (rows.length === 0) throw new RangeError('batch is empty (0 sequences)');
  const first: unknown = rows[0];
  const seq = Array.isArray(first) ? first.length : 0;
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
      const givenRow: unknown = row;
      if (!Array.isArray(givenRow)) throw new TypeError(`targetMask row ${r} is not an array of 0/1`);
      if (row.length !== seq) throw new RangeError(`targetMask row ${r} has ${row.length} entries, sequences have ${seq}`);
      row.forEach((m, t) => {
        if (m !== 0 && m !== 1) throw new RangeError(`targetMask at sequence ${r}, position ${t} must be 0 or 1, got ${m}`);
        out[r * seq + t] = m;
      });
    });
  }
  return { tokens, batch: rows.length, seq, targetMask };
}
