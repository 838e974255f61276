// The embedded default task: styled reversal (lib/preference/styled-reversal.ts) with a
// character tokenizer, a small Llama-architecture policy, and the supervised data that gives
// the base policy a clearly exploitable style mix (R 0.6, P 0.3, S 0.1) and imperfect reversals.
import type { Model } from '../engine/model.js';
import type { ModelConfig, StepResult } from '../engine/types.js';
import { seededRng } from '../data/random.js';
import { specialAddedToken, type Tokenizer, type TokenizerFiles } from '../io/tokenizer.js';
import { idealAnswer, STYLES, type Style } from '../preference/styled-reversal.js';
import type { PolicyText } from '../sppo/run.js';
import { throwIfAborted } from '../util/abort.js';

/** The policy's context: a prompt word, the separator and a styled answer fit with room to spare. */
export const DEMO_CONTEXT = 32;

/** Prompt `cabd` is encoded as <bos> c a b d >; an answer `S:dbac` as S : d b a c <eos>. */
export class CharTokenizer {
  static readonly PAD = 0;
  static readonly BOS = 1;
  static readonly EOS = 2;
  static readonly SEPARATOR = '>';
  /** the special tokens' names in tokenizer.json, by id */
  static readonly SPECIAL_TOKENS = ['<pad>', '<s>', '</s>'] as const;
  readonly chars: string;
  readonly #ids: Map<string, number>;

  constructor(alphabet: string) {
    this.chars = [...new Set(`${alphabet}${STYLES.join('')}:${CharTokenizer.SEPARATOR}`)].join('');
    this.#ids = new Map([...this.chars].map((c, i) => [c, i + 3]));
  }

  get vocabSize(): number {
    return this.chars.length + 3;
  }

  get stopTokens(): number[] {
    return [CharTokenizer.EOS];
  }

  encode(text: string): number[] {
    return [...text].map((c, i) => {
      const id = this.#ids.get(c);
      if (id === undefined) throw new RangeError(`character '${c}' at ${i} of '${text}' is not in the tokenizer's alphabet`);
      return id;
    });
  }

  /** The prompt as the policy sees it. */
  promptIds(prompt: string): number[] {
    return [CharTokenizer.BOS, ...this.encode(prompt), ...this.encode(CharTokenizer.SEPARATOR)];
  }

  /** The answer text of generated ids: everything before the first <eos>. */
  decode(ids: ArrayLike<number>): string {
    let out = '';
    for (let i = 0; i < ids.length; i++) {
      const id = ids[i];
      if (id === CharTokenizer.EOS) break;
      out += id >= 3 && id - 3 < this.chars.length ? this.chars[id - 3] : '�';
    }
    return out;
  }

  /**
   * This tokenizer as Hugging Face files, saved with every checkpoint of a demo run: a
   * character-level WordLevel model whose post-processor frames a prompt as promptIds does, whose
   * decoder shows <pad> and <s> as '�' as decode does, and a chat template that gives the same
   * prompt ids, so transformers and `sppo generate --model` read the policy like any other.
   */
  files(): TokenizerFiles {
    const [pad, bos, eos] = CharTokenizer.SPECIAL_TOKENS;
    const vocab = Object.fromEntries([...CharTokenizer.SPECIAL_TOKENS, ...this.chars].map((token, id) => [token, id]));
    const special = (token: string) => ({ SpecialToken: { id: token, type_id: 0 } });
    const sep = CharTokenizer.SEPARATOR;
    return {
      tokenizer: {
        version: '1.0',
        truncation: null,
        padding: null,
        added_tokens: CharTokenizer.SPECIAL_TOKENS.map((content, id) => specialAddedToken(content, id)),
        normalizer: null,
        pre_tokenizer: { type: 'Split', pattern: { Regex: '[\\s\\S]' }, behavior: 'Isolated', invert: false },
        post_processor: {
          type: 'TemplateProcessing',
          single: [special(bos), { Sequence: { id: 'A', type_id: 0 } }, special(sep)],
          pair: [special(bos), { Sequence: { id: 'A', type_id: 0 } }, special(sep), { Sequence: { id: 'B', type_id: 1 } }],
          special_tokens: Object.fromEntries([bos, sep].map((t) => [t, { id: t, ids: [vocab[t]], tokens: [t] }])),
        },
        decoder: {
          type: 'Sequence',
          decoders: [...[pad, bos].map((t) => ({ type: 'Replace', pattern: { String: t }, content: '�' })), { type: 'Fuse' }],
        },
        // No <unk>: a character outside the alphabet is an error, as in encode.
        model: { type: 'WordLevel', vocab, unk_token: '<unk>' },
      },
      tokenizerConfig: {
        tokenizer_class: 'PreTrainedTokenizerFast',
        bos_token: bos,
        eos_token: eos,
        pad_token: pad,
        clean_up_tokenization_spaces: false,
        model_max_length: DEMO_CONTEXT,
        chat_template: `{{ bos_token }}{{ messages[-1]['content'] }}{% if add_generation_prompt %}${sep}{% endif %}`,
      },
    };
  }
}

/**
 * The demo's prompt and answer text over its tokenizer as loaded from a checkpoint
 * (CharTokenizer.files()): the same ids, errors and answers as the CharTokenizer it was saved from.
 */
export function demoPolicyText(tokenizer: Tokenizer): PolicyText {
  const stopTokens = tokenizer.eosTokenIds;
  return {
    promptIds(prompt) {
      [...prompt].forEach((c, i) => {
        if (tokenizer.tokenId(c) === undefined)
          throw new RangeError(`character '${c}' at ${i} of '${prompt}' is not in the tokenizer's alphabet`);
      });
      return tokenizer.encode(prompt);
    },
    decode(ids) {
      const all = Array.from(ids);
      const end = all.findIndex((id) => stopTokens.includes(id));
      return tokenizer.decode(end < 0 ? all : all.slice(0, end));
    },
    stopTokens,
  };
}

/** A small Llama-architecture policy sized for the task (about 0.1M parameters). */
export function demoModelConfig(tokenizer: CharTokenizer, seed: number): ModelConfig {
  return {
    vocab_size: tokenizer.vocabSize,
    hidden_size: 64,
    num_hidden_layers: 2,
    num_attention_heads: 4,
    num_key_value_heads: 2,
    intermediate_size: 176,
    max_position_embeddings: DEMO_CONTEXT,
    initializer_range: 0.05,
    seed,
  };
}

export interface SupervisedData {
  /** style mix of the answers */
  styles: Record<Style, number>;
  /** probability that an answer's reversal has one wrong letter */
  corruption: number;
}

/** Supervised (prompt, answer) rows for the base policy: styles drawn from the mix, reversals sometimes wrong. */
export function supervisedExamples(
  words: readonly string[],
  data: SupervisedData,
  alphabet: string,
  seed: number,
  tokenizer: CharTokenizer,
): { prompt: number[]; response: number[] }[] {
  const rng = seededRng(seed);
  const total = STYLES.reduce((s, c) => s + data.styles[c], 0);
  return words.map((word) => {
    let u = rng.next() * total;
    const style = STYLES.find((c) => (u -= data.styles[c]) < 0) ?? 'S';
    const answer = [...idealAnswer(word, style)];
    if (rng.next() < data.corruption) {
      const at = 2 + rng.int(word.length); // a letter of the reversed body
      const others = [...alphabet].filter((c) => c !== answer[at]);
      answer[at] = others[rng.int(others.length)];
    }
    return { prompt: tokenizer.promptIds(word), response: [...tokenizer.encode(answer.join('')), CharTokenizer.EOS] };
  });
}

export interface SupervisedOptions {
  steps: number;
  batchSize: number;
  lr: number;
  seed: number;
  signal?: AbortSignal;
  onProgress?: (step: number, total: number, result: StepResult) => void;
}

/** Supervised fine-tuning on prompt → answer rows (loss on the answer tokens only). */
export async function supervisedFineTune(
  model: Model,
  rows: readonly { prompt: number[]; response: number[] }[],
  o: SupervisedOptions,
): Promise<StepResult[]> {
  model.setOptimizer({
    kind: 'adamw',
    lr: o.lr,
    maxGradNorm: 1,
    schedule: { kind: 'cosine', warmupSteps: Math.ceil(o.steps / 20), totalSteps: o.steps, minLrRatio: 0.1 },
  });
  const rng = seededRng(o.seed);
  const results: StepResult[] = [];
  for (let step = 0; step < o.steps; step++) {
    throwIfAborted(o.signal);
    const batch = Array.from({ length: o.batchSize }, () => rows[rng.int(rows.length)]);
    const seq = Math.max(...batch.map((r) => r.prompt.length + r.response.length));
    const rowsOut = batch.map((r) => [
      ...r.prompt,
      ...r.response,
      ...new Array<number>(seq - r.prompt.length - r.response.length).fill(CharTokenizer.PAD),
    ]);
    const mask = batch.map((r) =>
      Array.from({ length: seq }, (_, t) => (t >= r.prompt.length && t < r.prompt.length + r.response.length ? 1 : 0)),
    );
    const result = await model.trainStep({ rows: rowsOut, targetMask: mask }, { signal: o.signal });
    results.push(result);
    o.onProgress?.(step + 1, o.steps, result);
  }
  return results;
}
