// Packs preference examples (prompt + response token ids, reference log-probs, targets) into
// the rectangular, response-masked batches the engine's fused head + preference loss reads.
import { isInt32, tokenIdError } from '../util/int32.js';
import { checkKnownFields, describeValue } from './batch.js';
import { PREFERENCE_LOSSES, type PreferenceLossName } from './losses.js';
import type { PreferenceBatchInput, PreferenceExample, PreferencePair, PreferenceResponse, SequenceInput, TokenBatch } from './types.js';

// The fields of each kind of item: any other is refused (a misspelt refLogp or target would
// otherwise read as missing only where the loss reads it).
const SEQUENCE_FIELDS = ['prompt', 'response'] as const satisfies readonly (keyof SequenceInput)[];
const EXAMPLE_FIELDS = ['prompt', 'response', 'refLogp', 'target'] as const satisfies readonly (keyof PreferenceExample)[];
const PAIR_FIELDS = ['prompt', 'chosen', 'rejected', 'q'] as const satisfies readonly (keyof PreferencePair)[];
const RESPONSE_FIELDS = ['response', 'refLogp', 'target'] as const satisfies readonly (keyof PreferenceResponse)[];

function checkArray(v: unknown, path: string, of: string): void {
  if (!Array.isArray(v)) throw new TypeError(`${path} must be an array of ${of}, got ${describeValue(v)}`);
}

/** Rows = prompt + response, right-padded with token 0; the mask selects the response tokens. */
/** A packed batch of prompt + response sequences: its mask marks the response tokens. */
export type SequenceBatch = TokenBatch & { targetMask: Uint8Array };

/** `path` names the items in errors; each item may have the fields `known` (its own, by default). */
export function packSequences(items: readonly SequenceInput[], path: string, known: readonly string[] = SEQUENCE_FIELDS): SequenceBatch {
  checkArray(items, path, '{ prompt, response }');
  if (items.length === 0) throw new RangeError('the batch is empty (0 sequences)');
  items.forEach((it, i) => {
    checkKnownFields(it, `${path}[${i}]`, known);
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
  const given: unknown = input;
  if (typeof given !== 'object' || given === null)
    throw new TypeError(`the preference batch must be an object, got ${describeValue(given)}`);
  if (loss === 'sppo') {
    if (!('examples' in input)) throw new TypeError("loss 'sppo' takes { examples: [...] }, each response with its own target");
    checkKnownFields(input, 'the preference batch', ['examples']);
    const ex = input.examples;
    return {
      batch: packSequences(ex, 'examples', EXAMPLE_FIELDS),
      refLogp: Float64Array.from(ex, (e, i) => finite(e.refLogp, `examples[${i}].refLogp`)),
      target: Float64Array.from(ex, (e, i) => finite(e.target, `examples[${i}].target`)),
    };
  }
  if (!('pairs' in input)) throw new TypeError(`loss '${loss}' takes { pairs: [{ prompt, chosen, rejected }] }`);
  checkKnownFields(input, 'the preference batch', ['pairs']);
  checkArray(input.pairs, 'pairs', '{ prompt, chosen, rejected }');
  const rows: SequenceInput[] = [];
  const ref: number[] = [];
  const target: number[] = [];
  input.pairs.forEach((p, k) => {
    checkKnownFields(p, `pairs[${k}]`, PAIR_FIELDS);
    checkKnownFields(p.chosen, `pairs[${k}].chosen`, RESPONSE_FIELDS);
    checkKnownFields(p.rejected, `pairs[${k}].rejected`, RESPONSE_FIELDS);
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
  return { batch: packSequences(rows, 'pairs'), refLogp: Float64Array.from(ref), target: Float64Array.from(target) };
}
