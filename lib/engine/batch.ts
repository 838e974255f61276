// Turns the accepted batch forms into the flat typed arrays the addon reads, rejecting ragged
// rows, non-integer ids and mismatched masks with messages that name the row and position.
import { isInt32, tokenIdError } from '../util/int32.js';
import type { BatchInput, TokenBatch } from './types.js';

export function toTokenBatch(input: BatchInput): TokenBatch {
  if (Array.isArray(input)) return fromRows(input, undefined);
  if ('rows' in input) return fromRows(input.rows, input.targetMask);
  const { tokens, batch, seq, targetMask } = input;
  if (!(tokens instanceof Int32Array)) throw new TypeError('batch.tokens must be an Int32Array');
  if (!Number.isInteger(batch) || batch < 0 || !Number.isInteger(seq) || seq < 0)
    throw new RangeError(`batch.batch and batch.seq must be non-negative integers, got ${batch} and ${seq}`);
  if (tokens.length !== batch * seq)
    throw new RangeError(`batch.tokens has ${tokens.length} elements but batch x seq = ${batch} x ${seq}`);
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
    targetMask = new Uint8Array(tokens.length);
    mask.forEach((row, r) => {
      if (row.length !== seq) throw new RangeError(`targetMask row ${r} has ${row.length} entries, sequences have ${seq}`);
      row.forEach((m, t) => {
        if (m !== 0 && m !== 1) throw new RangeError(`targetMask at sequence ${r}, position ${t} must be 0 or 1, got ${m}`);
        targetMask![r * seq + t] = m;
      });
    });
  }
  return { tokens, batch: rows.length, seq, targetMask };
}
