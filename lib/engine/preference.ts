// Packs preference examples (prompt + response token ids, reference log-probs, targets) into
// the rectangular, response-masked batches the engine's fused head + preference loss reads.
import { isInt32, tokenIdError } from '../util/int32.js';
import { PREFERENCE_LOSSES, type PreferenceLossName } from './losses.js';
import type { PreferenceBatchInput, SequenceInput, TokenBatch } from './types.js';

/** Rows = prompt + response, right-padded with token 0; the mask selects the response tokens. */
/** A packed batch of prompt + response sequences: its mask marks the response tokens. */
export type SequenceBatch = TokenBatch & { targetMask: Uint8Array };

export function packSequences(items: readonly SequenceInput[]): SequenceBatch {
  if (items.length === 0) throw new RangeError('the batch is empty (0 sequences)');
  items.forEach((it, i) => {
    if (!Array.isArray(it.prompt) || it.prompt.length === 0)
      throw new RangeError(`sequence ${i}: the prompt is empty (a response token needs at least one token before it)`);
    if (!Array.isArray(it.response) || it.response.length === 0) throw new RangeError(`sequence ${i}: the response is empty`);
  });
  const seq = Math.max(...items.map((it) => it.prompt.length + it.response.length));
  const tokens = new Int32Array(items.length * seq);
  const targetMask = new Uint8Array(items.length * seq);
  items.forEach((it, r) => {
    const row = [...it.prompt, ...it.response];
    row.forEach((id, t) => {
      if (!isInt32(id)) throw tokenIdError(`token at sequence ${r}, position ${t}`, id);
      tokens[r * seq + t] = id;
      if (t >= it.prompt.length) targetMask[r * seq + t] = 1;
    });
  });
  return { tokens, batch: items.length, seq, targetMask };
}

export interface PackedPreferenceBatch {
  batch: SequenceBatch;
  refLogp: Float64Array;
  target: Float64Array;
}

/** Examples for `sppo`; (chosen, rejected) pairs, flattened as rows 2k / 2k+1, for the others. */
export function packPreferenceBatch(input: PreferenceBatchInput, loss: PreferenceLossName): PackedPreferenceBatch {
  if (!PREFERENCE_LOSSES.includes(loss)) throw new RangeError(`unknown loss '${loss}' (known: ${PREFERENCE_LOSSES.join(', ')})`);
  const finite = (v: unknown, what: string): number => {
    if (typeof v !== 'number' || !Number.isFinite(v)) throw new RangeError(`${what} must be a finite number, got ${String(v)}`);
    return v;
  };
  const NO_TARGET = Number.NaN; // not read by the loss
  if (loss === 'sppo') {
    if (!('examples' in input)) throw new TypeError("loss 'sppo' takes { examples: [...] }, each response with its own target");
    const ex = input.examples;
    return {
      batch: packSequences(ex),
      refLogp: Float64Array.from(ex, (e, i) => finite(e.refLogp, `examples[${i}].refLogp`)),
      target: Float64Array.from(ex, (e, i) => finite(e.target, `examples[${i}].target`)),
    };
  }
  if (!('pairs' in input)) throw new TypeError(`loss '${loss}' takes { pairs: [{ prompt, chosen, rejected }] }`);
  const rows: SequenceInput[] = [];
  const ref: number[] = [];
  const target: number[] = [];
  input.pairs.forEach((p, k) => {
    rows.push({ prompt: p.prompt, response: p.chosen.response }, { prompt: p.prompt, response: p.rejected.response });
    ref.push(finite(p.chosen.refLogp, `pairs[${k}].chosen.refLogp`), finite(p.rejected.refLogp, `pairs[${k}].rejected.refLogp`));
    if (loss === 'sppo-pair') {
      target.push(finite(p.chosen.target, `pairs[${k}].chosen.target`), finite(p.rejected.target, `pairs[${k}].rejected.target`));
    } else if (loss === 'sppo-single') {
      target.push(finite(p.q, `pairs[${k}].q`), NO_TARGET);
    } else {
      target.push(NO_TARGET, NO_TARGET);
    }
  });
  return { batch: packSequences(rows), refLogp: Float64Array.from(ref), target: Float64Array.from(target) };
}
