// Batched sampling with a paged KV cache: a Generator plans its cache once (a pool of blocks of
// 16 positions; by default room for maxBatch sequences of maxContext tokens) and samples from the
// weights of the model that created it. The samples of one prompt share the prompt's blocks (one
// prefill, then copy-on-write). Its calls queue with the model's other calls, stream tokens as
// they are sampled, and stop cleanly on abort, returning what was generated so far.
import { isInt32, tokenIdError } from '../util/int32.js';
import { CALL_FIELDS, checkFields, describeValue, type FieldCheck, type FieldKind } from './batch.js';
import { native, type NativeGenerateResult, type NativeGeneratorHandle, type NativeModelHandle } from './native.js';
import type { CallOptions } from './types.js';

/**
 * What a generator plans memory for. Its KV cache is a pool of blocks of 16 positions (every
 * layer's keys and values); a sequence takes blocks as it grows and returns them when it ends, so
 * the pool, not maxBatch × maxContext, decides how many sequences are in flight at once. A
 * sequence starts when the blocks it may need (prompt + maxNewTokens, or up to maxContext) are
 * free, and waits otherwise; a sequence that alone needs more than the whole pool is refused.
 */
export interface GeneratorPlan {
  /** sequences decoded together at most; more wait for a place (and for blocks) */
  maxBatch: number;
  /** prompt + generated tokens per sequence, at most the model's max_position_embeddings */
  maxContext: number;
  /**
   * bytes of the KV-cache pool, rounded down to whole blocks (generator.kvCache().blockBytes
   * each); default: room for maxBatch sequences of maxContext tokens
   */
  kvCacheBytes?: number;
  /**
   * default true: the samples of a prompt (and any prompts of one call with identical tokens)
   * share the prompt's blocks, prefilled once; false: every sequence prefills its own copy.
   * Results are the same either way (bit for bit on the CPU).
   */
  sharePrefixes?: boolean;
  /**
   * default true: on the CPU the generator keeps a copy of the weights packed for its GEMM (the
   * projections' and LM head's size again, counted in the plan's kvCache), packed once per
   * generate call, so decode steps of 5 or more sequences skip packing; false saves that memory.
   * Results are the same either way, bit for bit. No effect on CUDA.
   */
  packWeights?: boolean;
}

/** A generator's plan as built: kvCacheBytes is the pool it got (whole blocks). */
export type ResolvedGeneratorPlan = Required<GeneratorPlan>;

/** The KV-cache pool now: blocks in all, free, and promised to sequences in flight. */
export interface KvCacheState {
  blocks: number;
  /** positions per block */
  blockSize: number;
  /** bytes of one block: every layer's keys and values for blockSize positions */
  blockBytes: number;
  freeBlocks: number;
  reservedBlocks: number;
}

/** What the generator's last generate call did. */
export interface GenerateStats {
  /** extend steps (forward passes over the step's rows) */
  steps: number;
  /** prompt tokens run through the model: with sharing, a prompt's prefix once for all its samples */
  promptRows: number;
  /** sampled tokens run through the model */
  generatedRows: number;
  /** prompts whose prefix was prefilled once for several samples */
  sharedPrompts: number;
  /** copy-on-write copies of a shared prompt's partly filled last block */
  copiedBlocks: number;
  /** most blocks in use at once */
  peakBlocks: number;
  /** most sequences in flight at once */
  peakSequences: number;
}

export interface GeneratedToken {
  /** index into the result array (prompt-major: prompt * samplesPerPrompt + sample) */
  sequence: number;
  token: number;
  /** log-probability of the token under the raw policy (temperature 1, no truncation) */
  logprob: number;
}

export interface GenerateOptions extends CallOptions {
  /** new tokens per sequence; default: until a stop token or the context is full */
  maxNewTokens?: number;
  /** default 1; 0 samples greedily (argmax, ties to the lowest id) */
  temperature?: number;
  /** keep the k most likely tokens (ties at the k-th kept); 0 (default) keeps all */
  topK?: number;
  /** nucleus sampling over the temperature-scaled distribution, after top-k; default 1 */
  topP?: number;
  /** any of these ends a sequence; the stop token is kept as its last token */
  stopTokens?: readonly number[];
  /**
   * Seed of each prompt's random numbers (one number for all, or one per prompt); default 0.
   * Sample s of a prompt draws from stream s of its seed, so its tokens depend only on the
   * prompt, the options and the seed, never on the rest of the batch. With one number, every
   * prompt draws the same streams: give one seed per prompt (`sppo run` and `sppo generate` derive
   * them from a base seed and the prompt's index) for samples independent across prompts.
   */
  seed?: number | readonly number[];
  /** samples drawn per prompt; default 1 */
  samplesPerPrompt?: number;
  /**
   * Called on the JavaScript thread for every token, step by step; generation waits for it
   * between steps, so aborting from inside it stops at the next step.
   */
  onToken?: (t: GeneratedToken) => void;
}

/** stop: a stop token; maxTokens: maxNewTokens reached; contextFull: maxContext reached. */
export type StopReason = 'stop' | 'maxTokens' | 'aborted' | 'contextFull';

export interface GeneratedSequence {
  prompt: number;
  sample: number;
  tokens: Int32Array;
  /** per token: log π(token | prompt, earlier tokens) under the raw policy */
  logprobs: Float64Array;
  stopReason: StopReason;
}

/** Runs `fn` in the owning model's call queue (rejecting if `signal` is already aborted). */
export type ModelQueue = <T>(fn: () => Promise<T>, signal?: AbortSignal) => Promise<T>;

/** A prompt's token ids. */
export type PromptTokens = readonly number[] | Int32Array;

function promptsToArrays(prompts: readonly PromptTokens[]): { tokens: Int32Array; lengths: Int32Array } {
  // (checked on an unknown: Array.isArray would narrow `prompts` itself to any[])
  const given: unknown = prompts;
  if (!Array.isArray(given)) throw new TypeError('prompts must be an array of token id arrays');
  if (prompts.length === 0) throw new RangeError('no prompts to generate from');
  const lengths = new Int32Array(prompts.length);
  prompts.forEach((p, i) => {
    if (!Array.isArray(p) && !(p instanceof Int32Array)) throw new TypeError(`prompt ${i} is not an array of token ids`);
    lengths[i] = p.length;
  });
  const tokens = new Int32Array(lengths.reduce((a, b) => a + b, 0));
  let at = 0;
  prompts.forEach((p, i) => {
    for (let t = 0; t < p.length; t++) {
      const id = p[t];
      if (!isInt32(id)) throw tokenIdError(`token at prompt ${i}, position ${t}`, id);
      tokens[at++] = id;
    }
  });
  return { tokens, lengths };
}

function seedsFor(seed: GenerateOptions['seed'], n: number): Float64Array {
  const given: unknown = seed ?? 0;
  if (typeof given !== 'number' && !Array.isArray(given))
    throw new TypeError(`options.seed must be a number or an array of numbers (one per prompt), got ${describeValue(given)}`);
  const list: unknown[] = typeof given === 'number' ? [given] : given;
  if (typeof given !== 'number' && list.length !== n)
    throw new RangeError(`options.seed has ${list.length} entries for ${n} prompts (give one number, or one per prompt)`);
  list.forEach((s, i) => {
    const name = `options.seed${typeof given === 'number' ? '' : `[${i}]`}`;
    if (typeof s !== 'number') throw new TypeError(`${name} must be a number, got ${describeValue(s)}`);
    if (!Number.isSafeInteger(s) || s < 0) throw new RangeError(`${name} must be a non-negative safe integer, got ${s}`);
  });
  return Float64Array.from({ length: n }, (_, i) => list[list.length === 1 ? 0 : i] as number);
}

export const GENERATOR_PLAN_FIELDS: Record<keyof GeneratorPlan, FieldKind> = {
  maxBatch: 'int32',
  maxContext: 'int32',
  kvCacheBytes: 'uint53',
  sharePrefixes: 'boolean',
  packWeights: 'boolean',
};
// Every field generate() takes: the sampling options the addon reads, checked by kind here and by
// value in the engine; the seed, stop tokens and samplesPerPrompt, checked in generate(); the
// callback and the signal. An unknown field (a misspelt temperature) is refused, not ignored.
const GENERATE_FIELDS = {
  ...CALL_FIELDS,
  maxNewTokens: 'int53',
  temperature: 'number',
  topK: 'int53',
  topP: 'number',
  stopTokens: (v, name) => {
    if (!Array.isArray(v)) throw new TypeError(`${name} must be an array of token ids, got ${describeValue(v)}`);
  },
  seed: (v, name) => {
    if (typeof v !== 'number' && !Array.isArray(v))
      throw new TypeError(`${name} must be a number or an array of numbers (one per prompt), got ${describeValue(v)}`);
  },
  samplesPerPrompt: 'int32',
  onToken: 'function',
} satisfies Record<keyof GenerateOptions, FieldKind | FieldCheck>;

// Held by this module only: the Generator constructor refuses any caller without it, so a
// Generator comes from Model.createGenerator (through openGenerator) and from nowhere else.
const OPEN = Symbol('Generator');

/** Model.createGenerator's way to a Generator: a KV cache over `model`'s weights, planned for `plan`. */
export function openGenerator(model: NativeModelHandle, plan: GeneratorPlan, queue: ModelQueue): Generator {
  checkFields(plan, 'plan', GENERATOR_PLAN_FIELDS);
  return new Generator(OPEN, new (native().NativeGenerator)(model, plan), plan, queue);
}

export class Generator {
  readonly plan: ResolvedGeneratorPlan;
  #handle: NativeGeneratorHandle | undefined;
  #queue: ModelQueue;

  /** Not for use: a Generator comes from `model.createGenerator(plan)`. */
  constructor(token: symbol, handle: NativeGeneratorHandle, plan: GeneratorPlan, queue: ModelQueue) {
    if (token !== OPEN) throw new TypeError('a Generator comes from model.createGenerator(plan); it has no public constructor');
    this.#handle = handle;
    const pool = handle.kvCache();
    this.plan = {
      maxBatch: plan.maxBatch,
      maxContext: plan.maxContext,
      kvCacheBytes: pool.blocks * pool.blockBytes,
      sharePrefixes: plan.sharePrefixes ?? true,
      packWeights: plan.packWeights ?? true,
    };
    this.#queue = queue;
  }

  get disposed(): boolean {
    return this.#handle === undefined;
  }

  /** Bytes of the KV cache and step buffers. */
  memory(): number {
    return this.#live().memory();
  }

  /** The KV-cache pool: its blocks, and how many are free now (all of them between calls). */
  kvCache(): KvCacheState {
    return this.#live().kvCache();
  }

  /** What the last generate call did (prefill rows, shared prompts, peak blocks…). */
  lastStats(): GenerateStats {
    return this.#live().stats();
  }

  #live(): NativeGeneratorHandle {
    if (!this.#handle) throw new Error('the generator has been disposed');
    return this.#handle;
  }

  /**
   * Samples `samplesPerPrompt` continuations of every prompt (prompts may differ in length).
   * Results are prompt-major. On abort the promise resolves with what each sequence has so far
   * and stopReason 'aborted' (it rejects only if the signal fired before generation started).
   */
  async generate(prompts: readonly PromptTokens[], options: GenerateOptions = {}): Promise<GeneratedSequence[]> {
    checkFields(options, 'options', GENERATE_FIELDS);
    const { tokens, lengths } = promptsToArrays(prompts);
    const samples = options.samplesPerPrompt ?? 1;
    if (samples < 1) throw new RangeError(`options.samplesPerPrompt must be a positive integer, got ${samples}`);
    const seeds = seedsFor(options.seed, lengths.length);
    const stop = options.stopTokens ?? [];
    stop.forEach((id, i) => {
      if (!isInt32(id)) throw tokenIdError(`stopTokens[${i}]`, id);
    });
    // null (absent) fields are left out: the addon reads absent fields as their defaults.
    const nativeOptions = {
      maxNewTokens: options.maxNewTokens ?? undefined,
      temperature: options.temperature ?? undefined,
      topK: options.topK ?? undefined,
      topP: options.topP ?? undefined,
      stopTokens: Int32Array.from(stop),
    };
    if (nativeOptions.maxNewTokens !== undefined && nativeOptions.maxNewTokens < 1)
      throw new RangeError(`maxNewTokens must be at least 1, got ${nativeOptions.maxNewTokens}`);
    const { onToken, signal } = options;

    return this.#queue(async () => {
      const handle = this.#live();
      // The worker waits for each step's callback, so every token has been seen by onToken
      // before the result arrives. A throwing onToken aborts the generation and its error
      // rejects the call.
      let callbackError: { error: unknown } | undefined;
      const onStep =
        onToken &&
        ((seqs: Int32Array, toks: Int32Array, lps: Float64Array) => {
          for (let i = 0; i < seqs.length && callbackError === undefined; i++) {
            try {
              onToken({ sequence: seqs[i], token: toks[i], logprob: lps[i] });
            } catch (err) {
              callbackError = { error: err };
              handle.abort();
            }
          }
        });
      const abort = () => handle.abort();
      signal?.addEventListener('abort', abort, { once: true });
      let r: NativeGenerateResult;
      try {
        r = await handle.generate(tokens, lengths, seeds, samples, nativeOptions, onStep ?? null);
      } finally {
        signal?.removeEventListener('abort', abort);
      }
      if (callbackError !== undefined) throw callbackError.error;
      const out: GeneratedSequence[] = [];
      let at = 0;
      for (let i = 0; i < r.counts.length; i++) {
        const n = r.counts[i];
        out.push({
          prompt: Math.floor(i / samples),
          sample: i % samples,
          tokens: r.tokens.slice(at, at + n),
          logprobs: r.logprobs.slice(at, at + n),
          stopReason: r.reasons[i],
        });
        at += n;
      }
      return out;
    }, signal);
  }

  /** Frees the KV cache once the generator's pending calls have settled. Safe to call twice. */
  async dispose(): Promise<void> {
    // Freed inside the model's queue, so a model call queued right after dispose() cannot start
    // first and hold the model busy; if the model is gone already, the queue refuses and the
    // cache is freed here.
    const free = () => {
      this.#handle?.dispose();
      this.#handle = undefined;
    };
    await this.#queue(() => {
      free();
      return Promise.resolve();
    }).catch(free);
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.dispose();
  }
}
