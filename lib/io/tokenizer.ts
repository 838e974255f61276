// A Hugging Face tokenizer directory: tokenizer.json through @huggingface/tokenizers (pure JS),
// special tokens from tokenizer_config.json / special_tokens_map.json / generation_config.json,
// and the chat template (chat_template.jinja, else tokenizer_config.json's chat_template)
// rendered with @huggingface/jinja, the same way transformers' apply_chat_template does, within
// a budget of time and output. At load, text must survive encode → decode and the chat template
// must render a probe conversation, so that a damaged tokenizer fails here rather than turning
// every prompt into unknown tokens.
import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { Environment, Interpreter, Template } from '@huggingface/jinja';
import { Tokenizer as HfTokenizer } from '@huggingface/tokenizers';
import { parseJsonObject } from '../util/json.js';

export class TokenizerError extends Error {
  override name = 'TokenizerError';
}

export interface ChatMessage {
  role: string;
  content: string;
  [key: string]: unknown;
}

export interface ChatTemplateOptions {
  /** end with the assistant header so the model writes the reply (default false) */
  addGenerationPrompt?: boolean;
  /** a named template from tokenizer_config.json's list (default: 'default' or the only one) */
  templateName?: string;
  tools?: unknown[];
  documents?: unknown[];
  /** further template variables (e.g. enable_thinking) */
  variables?: Record<string, unknown>;
}

export interface TokenizerFiles {
  /** parsed tokenizer.json */
  tokenizer: Record<string, unknown>;
  /** parsed tokenizer_config.json */
  tokenizerConfig?: Record<string, unknown>;
  specialTokensMap?: Record<string, unknown>;
  generationConfig?: Record<string, unknown>;
  /** the text of chat_template.jinja */
  chatTemplate?: string;
  /** names the source in errors */
  label?: string;
  /** limits on rendering the chat template (default CHAT_TEMPLATE_BUDGET) */
  chatTemplateBudget?: Partial<ChatTemplateBudget>;
}

/**
 * What rendering a chat template may take, per render: wall-clock time, the longest string it may
 * build (prompts are at most 4 MiB, so 16 Mi characters leaves room for any real template), and
 * the most items range() may make (real templates count messages). A template past any of them —
 * an endless loop, range(1e8) — is refused with the budget it broke instead of hanging or
 * exhausting memory.
 */
export interface ChatTemplateBudget {
  milliseconds: number;
  outputChars: number;
  rangeItems: number;
}
export const CHAT_TEMPLATE_BUDGET: Readonly<ChatTemplateBudget> = {
  milliseconds: 2000,
  outputChars: 16 * 1024 * 1024,
  rangeItems: 100_000,
};

/** The tokenizer files saved with a model, in the order transformers writes them. */
export const TOKENIZER_FILES = [
  'tokenizer.json',
  'tokenizer_config.json',
  'special_tokens_map.json',
  'chat_template.jinja',
  'tokenizer.model',
];

/**
 * The files of a tokenizer directory (file name → text) that Tokenizer.fromDirectory reads back
 * as `files`; generation_config.json is left to the model's checkpoint.
 */
export function tokenizerFileTexts(files: TokenizerFiles): Map<string, string> {
  const json = (v: unknown) => JSON.stringify(v, null, 2) + '\n';
  const texts = new Map([['tokenizer.json', json(files.tokenizer)]]);
  if (files.tokenizerConfig) texts.set('tokenizer_config.json', json(files.tokenizerConfig));
  if (files.specialTokensMap) texts.set('special_tokens_map.json', json(files.specialTokensMap));
  if (files.chatTemplate !== undefined) texts.set('chat_template.jinja', files.chatTemplate);
  return texts;
}

/**
 * The part of @huggingface/tokenizers' Tokenizer used here. The package's .d.ts files import one
 * another without file extensions, which NodeNext resolution does not follow, so its class
 * arrives untyped; this is its declared signature for these methods.
 */
interface HfTokenizerApi {
  token_to_id(token: string): number | undefined;
  get_vocab(withAddedTokens?: boolean): Map<string, number>;
  encode(text: string, options?: { add_special_tokens?: boolean }): { ids: number[] };
  decode(ids: number[], options?: { skip_special_tokens?: boolean; clean_up_tokenization_spaces?: boolean | null }): string;
}
const HfTokenizerClass = HfTokenizer as unknown as new (tokenizer: object, config: object) => HfTokenizerApi;

/** An entry of tokenizer_config.json's chat_template list. */
function isNamedTemplate(v: unknown): v is { name: string; template: string } {
  const t = v as { name?: unknown; template?: unknown } | null | undefined;
  return typeof t?.name === 'string' && typeof t.template === 'string';
}

/** A broken rendering budget: the message says which. */
class BudgetExceeded extends Error {}

/**
 * The parts of @huggingface/jinja's runtime used here, with their declared signatures: its
 * index.d.ts re-exports them from "./runtime" without an extension, which NodeNext resolution
 * does not follow, so the classes arrive untyped (as HfTokenizer does above).
 */
interface JinjaValue {
  type: string;
  value: unknown;
}
interface JinjaEnvironment {
  set(name: string, value: unknown): unknown;
}
interface JinjaInterpreter {
  run(program: Template['parsed']): JinjaValue;
  evaluate(statement: unknown, environment: JinjaEnvironment): JinjaValue;
}
const JinjaEnvironmentClass = Environment as unknown as new () => JinjaEnvironment;
const JinjaInterpreterClass = Interpreter as unknown as new (env: JinjaEnvironment) => JinjaInterpreter;

/** The interpreter with a clock and an output cap checked as it evaluates. */
class BudgetedInterpreter extends JinjaInterpreterClass {
  #calls = 0;
  readonly #deadline: number;
  constructor(
    env: JinjaEnvironment,
    readonly budget: ChatTemplateBudget,
  ) {
    super(env);
    this.#deadline = performance.now() + budget.milliseconds;
  }

  override evaluate(...args: Parameters<JinjaInterpreter['evaluate']>): JinjaValue {
    if ((++this.#calls & 255) === 0 && performance.now() > this.#deadline)
      throw new BudgetExceeded(`rendering took over ${this.budget.milliseconds} ms`);
    const v = super.evaluate(...args);
    if (typeof v.value === 'string' && v.value.length > this.budget.outputChars)
      throw new BudgetExceeded(`rendering built a string of over ${this.budget.outputChars} characters`);
    return v;
  }
}

// The library's own strftime_now, reached through a template of its own (its globals are not exported).
const strftimeTemplate = new Template('{{ strftime_now(format) }}');

/**
 * Renders `template` with `vars` as Template.render does (the same globals: true/false/none in
 * both spellings, raise_exception, range, strftime_now), within `budget`.
 */
function renderWithin(template: Template, vars: Record<string, unknown>, budget: ChatTemplateBudget): string {
  const env = new JinjaEnvironmentClass();
  const globals: Record<string, unknown> = {
    false: false,
    true: true,
    none: null,
    False: false,
    True: true,
    None: null,
    raise_exception: (message: unknown) => {
      throw new Error(String(message));
    },
    range: (start: number, stop?: number, step = 1) => {
      const [from, to] = stop === undefined ? [0, start] : [start, stop];
      if (step === 0) throw new Error('range() step must not be zero');
      const n = Math.max(0, Math.ceil((to - from) / step));
      if (n > budget.rangeItems) throw new BudgetExceeded(`range() of ${n} items is over the ${budget.rangeItems} a template may make`);
      return Array.from({ length: n }, (_, i) => from + i * step);
    },
    strftime_now: (format: unknown) => strftimeTemplate.render({ format }),
  };
  for (const [name, value] of Object.entries({ ...globals, ...vars })) env.set(name, value);
  const result = new BudgetedInterpreter(env, budget).run(template.parsed).value;
  return typeof result === 'string' ? result : String(result);
}

/** Text as the round-trip check compares it: compatibility forms, case, accents and whitespace set aside. */
function comparable(text: string): string {
  return text
    .normalize('NFKD')
    .replace(/[\p{M}\s]/gu, '')
    .toLowerCase();
}

async function readJson(file: string): Promise<Record<string, unknown> | undefined> {
  if (!existsSync(file)) return undefined;
  return parseJsonObject(await readFile(file, 'utf8'), file, TokenizerError);
}

/** A special token as written in tokenizer_config.json: a string or an AddedToken object. */
function tokenContent(v: unknown): string | undefined {
  if (typeof v === 'string') return v;
  if (typeof v === 'object' && v !== null && typeof (v as { content?: unknown }).content === 'string')
    return (v as { content: string }).content;
  return undefined;
}

/** generation_config's eos_token_id: an int or a list of ints. */
function idList(v: unknown): number[] {
  if (Number.isInteger(v)) return [v as number];
  if (Array.isArray(v)) return v.filter((x): x is number => Number.isInteger(x));
  return [];
}

export class Tokenizer {
  readonly bosToken: string | undefined;
  readonly eosToken: string | undefined;
  readonly padToken: string | undefined;
  readonly bosTokenId: number | undefined;
  /** every id that ends generation: generation_config.json's first, then the tokenizer's eos */
  readonly eosTokenIds: number[];
  readonly padTokenId: number | undefined;
  /** named chat templates; 'default' is the one used without a templateName */
  readonly chatTemplates: ReadonlyMap<string, string>;
  readonly #hf: HfTokenizerApi;
  readonly #label: string;
  readonly #compiled = new Map<string, Template>();
  /** the file each chat template came from */
  readonly #templateFiles = new Map<string, string>();
  readonly #budget: ChatTemplateBudget;
  /** the round-trip probe's text, which the chat template's probe conversation sends */
  #probe = '';
  #vocabSize: number | undefined;

  constructor(files: TokenizerFiles) {
    this.#label = files.label ?? 'tokenizer';
    const config = files.tokenizerConfig ?? {};
    try {
      this.#hf = new HfTokenizerClass(files.tokenizer, config);
    } catch (e) {
      throw new TokenizerError(`${this.#label}: tokenizer.json could not be loaded (${(e as Error).message})`);
    }
    const special = (key: string) => tokenContent(config[key]) ?? tokenContent(files.specialTokensMap?.[key]);
    this.bosToken = special('bos_token');
    this.eosToken = special('eos_token');
    this.padToken = special('pad_token');
    const id = (token: string | undefined) => (token === undefined ? undefined : this.#hf.token_to_id(token));
    this.bosTokenId = id(this.bosToken) ?? idList(files.generationConfig?.bos_token_id)[0];
    const eos = [...idList(files.generationConfig?.eos_token_id), id(this.eosToken)].filter((x): x is number => x !== undefined);
    this.eosTokenIds = [...new Set(eos)];
    this.padTokenId = id(this.padToken) ?? idList(files.generationConfig?.pad_token_id)[0];
    this.#budget = { ...CHAT_TEMPLATE_BUDGET, ...files.chatTemplateBudget };
    this.chatTemplates = this.#templates(files);
    this.#checkText(files);
    this.#checkChatTemplate();
  }

  #templates(files: TokenizerFiles): Map<string, string> {
    const label = this.#label;
    const out = new Map<string, string>();
    const fromConfig = files.tokenizerConfig?.chat_template;
    if (typeof fromConfig === 'string') out.set('default', fromConfig);
    else if (Array.isArray(fromConfig)) {
      for (const t of fromConfig) {
        if (!isNamedTemplate(t)) {
          throw new TokenizerError(`${label}: tokenizer_config.json chat_template list entries must be {name, template} strings`);
        }
        out.set(t.name, t.template);
      }
    } else if (fromConfig !== undefined && fromConfig !== null) {
      throw new TokenizerError(`${label}: tokenizer_config.json chat_template must be a string or a list of {name, template}`);
    }
    for (const name of out.keys()) this.#templateFiles.set(name, 'tokenizer_config.json');
    // transformers ≥ 4.43 saves the template as its own file, which takes precedence.
    if (files.chatTemplate !== undefined) {
      out.set('default', files.chatTemplate);
      this.#templateFiles.set('default', 'chat_template.jinja');
    }
    return out;
  }

  /**
   * Refuses a tokenizer that cannot carry text: an empty vocabulary, a model type that does not
   * fit the vocabulary (a BPE vocabulary read as WordPiece), a broken decoder. The probe is text
   * made of the vocabulary's own ordinary tokens, so it suits any alphabet; it must come back from
   * encode → decode equal up to Unicode compatibility forms, case, accents and whitespace (which
   * normalizers such as lowercasing or NFKC may change).
   */
  #checkText(files: TokenizerFiles): void {
    const model = files.tokenizer.model as { type?: unknown; unk_token?: unknown } | undefined;
    const kind = typeof model?.type === 'string' ? `model type ${model.type}` : 'no model type';
    const added = new Set(
      (Array.isArray(files.tokenizer.added_tokens) ? (files.tokenizer.added_tokens as { id?: unknown }[]) : []).map((t) => t.id),
    );
    const ordinary = [...this.#hf.get_vocab(true).values()].filter((id) => !added.has(id)).sort((a, b) => a - b);
    const fail = (problem: string): never => {
      throw new TokenizerError(
        `${this.#label}: tokenizer.json ${problem} (${kind}, ${ordinary.length} ordinary tokens), so every prompt would become unknown tokens; the file is damaged or not this tokenizer's`,
      );
    };
    // Up to 16 tokens spread over the vocabulary that each decode to visible, whole characters.
    const picked: number[] = [];
    const tries = Math.min(ordinary.length, 256);
    for (let k = 0; k < tries && picked.length < 16; k++) {
      const id = ordinary[Math.floor((k * ordinary.length) / tries)];
      const piece = this.#hf.decode([id], { skip_special_tokens: false, clean_up_tokenization_spaces: false });
      if (piece.trim() !== '' && !piece.includes('\ufffd') && !/\p{Cc}/u.test(piece)) picked.push(id);
    }
    if (picked.length === 0) fail('has no ordinary token that decodes to text');
    const probe = this.#hf.decode(picked, { skip_special_tokens: false, clean_up_tokenization_spaces: false });
    const ids = this.encode(probe, { addSpecialTokens: false });
    const back = this.#hf.decode(ids, { skip_special_tokens: false, clean_up_tokenization_spaces: false });
    if (comparable(back) !== comparable(probe)) {
      const unk = typeof model?.unk_token === 'string' ? this.#hf.token_to_id(model.unk_token) : undefined;
      const unknown = unk === undefined ? '' : ` (${ids.filter((id) => id === unk).length} of them unknown)`;
      fail(
        `does not round-trip text: ${JSON.stringify(probe.slice(0, 80))} encodes to ${ids.length} ids${unknown} that decode to ${JSON.stringify(back.slice(0, 80))}`,
      );
    }
    this.#probe = probe.trim();
  }

  /** Refuses a default chat template that fails to render a one-message conversation, renders it to no tokens or leaves the message out. */
  #checkChatTemplate(): void {
    const name = this.#defaultTemplateName();
    if (!this.chatTemplates.has(name)) return;
    const text = this.applyChatTemplate([{ role: 'user', content: this.#probe }], { addGenerationPrompt: true });
    const ids = this.encode(text, { addSpecialTokens: false });
    const problem =
      ids.length === 0 ? 'to no tokens' : !text.includes(this.#probe) ? `without the message (${JSON.stringify(text.slice(0, 80))})` : '';
    if (problem)
      throw new TokenizerError(
        `${this.#templateLabel(name)} renders a probe conversation (one user message, ${JSON.stringify(this.#probe.slice(0, 40))}) ${problem}, so prompts would not reach the model`,
      );
  }

  #defaultTemplateName(): string {
    return this.chatTemplates.size === 1 ? [...this.chatTemplates.keys()][0] : 'default';
  }

  /** "<dir>: chat template 'default' (chat_template.jinja)" */
  #templateLabel(name: string): string {
    const file = this.#templateFiles.get(name);
    return `${this.#label}: chat template '${name}'${file ? ` (${file})` : ''}`;
  }

  /** Reads tokenizer.json (required) and whichever companion files the directory has. */
  static async fromDirectory(dir: string): Promise<Tokenizer> {
    const file = (name: string) => path.join(dir, name);
    const tokenizer = await readJson(file('tokenizer.json'));
    if (!tokenizer) throw new TokenizerError(`${dir}: no tokenizer.json (only fast tokenizers are supported)`);
    const templateFile = file('chat_template.jinja');
    return new Tokenizer({
      tokenizer,
      tokenizerConfig: await readJson(file('tokenizer_config.json')),
      specialTokensMap: await readJson(file('special_tokens_map.json')),
      generationConfig: await readJson(file('generation_config.json')),
      chatTemplate: existsSync(templateFile) ? await readFile(templateFile, 'utf8') : undefined,
      label: dir,
    });
  }

  /** The vocabulary size including added tokens. */
  get vocabSize(): number {
    return (this.#vocabSize ??= this.#hf.get_vocab(true).size);
  }

  tokenId(token: string): number | undefined {
    return this.#hf.token_to_id(token);
  }

  /** Token ids of `text`; special tokens (e.g. BOS) are added as tokenizer.json's post-processor says. */
  encode(text: string, options: { addSpecialTokens?: boolean } = {}): number[] {
    return this.#hf.encode(text, { add_special_tokens: options.addSpecialTokens ?? true }).ids;
  }

  /** Text of `ids`; cleanUpTokenizationSpaces defaults to tokenizer_config.json's setting, as in transformers. */
  decode(ids: readonly number[], options: { skipSpecialTokens?: boolean; cleanUpTokenizationSpaces?: boolean } = {}): string {
    if (ids.length === 0) return '';
    const bad = ids.findIndex((id) => !Number.isInteger(id) || id < 0 || id >= this.vocabSize);
    if (bad >= 0)
      throw new TokenizerError(`${this.#label}: token id ${ids[bad]} at ${bad} is not in the vocabulary (ids 0..${this.vocabSize - 1})`);
    return this.#hf.decode([...ids], {
      skip_special_tokens: options.skipSpecialTokens ?? false,
      clean_up_tokenization_spaces: options.cleanUpTokenizationSpaces ?? null,
    });
  }

  #template(name: string | undefined): Template {
    const key = name ?? this.#defaultTemplateName();
    const source = this.chatTemplates.get(key);
    if (source === undefined) {
      throw new TokenizerError(
        this.chatTemplates.size === 0
          ? `${this.#label}: no chat template (add chat_template.jinja or tokenizer_config.json chat_template)`
          : `${this.#label}: no chat template named '${key}' (have: ${[...this.chatTemplates.keys()].join(', ')})`,
      );
    }
    let t = this.#compiled.get(key);
    if (!t) {
      try {
        t = new Template(source);
      } catch (e) {
        throw new TokenizerError(`${this.#templateLabel(key)} does not parse (${(e as Error).message})`);
      }
      this.#compiled.set(key, t);
    }
    return t;
  }

  /** The conversation as the model's prompt text. */
  applyChatTemplate(messages: readonly ChatMessage[], options: ChatTemplateOptions = {}): string {
    const name = options.templateName ?? this.#defaultTemplateName();
    const template = this.#template(name);
    const vars: Record<string, unknown> = {
      ...options.variables,
      messages,
      add_generation_prompt: options.addGenerationPrompt ?? false,
      bos_token: this.bosToken ?? '',
      eos_token: this.eosToken ?? '',
      pad_token: this.padToken ?? '',
    };
    if (options.tools) vars.tools = options.tools;
    if (options.documents) vars.documents = options.documents;
    try {
      return renderWithin(template, vars, this.#budget);
    } catch (e) {
      if (e instanceof BudgetExceeded) {
        const { milliseconds, outputChars, rangeItems } = this.#budget;
        throw new TokenizerError(
          `${this.#templateLabel(name)} exceeded its rendering budget: ${e.message} (budget: ${milliseconds} ms, ${outputChars} characters, range() of ${rangeItems} items)`,
        );
      }
      throw new TokenizerError(`${this.#templateLabel(name)} failed to render (${(e as Error).message})`);
    }
  }

  /**
   * The prompt for generation as token ids (addGenerationPrompt defaults to true). The template
   * decides every special token: the text is encoded without adding any, as transformers does,
   * so a template that writes bos_token yields one BOS, not two.
   */
  encodeChat(messages: readonly ChatMessage[], options: ChatTemplateOptions = {}): number[] {
    const text = this.applyChatTemplate(messages, { ...options, addGenerationPrompt: options.addGenerationPrompt ?? true });
    return this.encode(text, { addSpecialTokens: false });
  }
}

/** A tokenizer.json `added_tokens` entry for a special token: matched whole, never normalized or stripped. */
export function specialAddedToken(content: string, id: number) {
  return { id, content, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true };
}
