// setupFromConfig through the public API: the demo config gives the embedded policy, its oracle
// and supervised base; a tiny Hugging Face directory (random Llama weights over the real
// Mistral-7B tokenizer, as test/judge-lm.test.ts builds its judge) gives a chat policy, the split
// and the judge. What the schema refuses is a RunConfigError whose issues carry their field;
// what only setup can find out is a SetupError whose `path` names the field to change.
import { cpSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { INST_CHAT_TEMPLATE, makeMistralChatModel } from './fixtures/mistral-tokenizer.js';
import { generatorPlanFor } from '../lib/sppo/run.js';
import { runMemoryPlan } from '../lib/sppo/setup.js';
import {
  demoConfigInput,
  formatMemoryPlan,
  Model,
  parseConfig,
  RunConfigError,
  savePretrained,
  SetupError,
  setupFromConfig,
  type RunConfig,
  type RunConfigInput,
  type RunSetup,
} from '../lib/index.js';

const tmp = mkdtempSync(path.join(tmpdir(), 'sppo-setup-'));
const policyDir = path.join(tmp, 'policy');
const prompts = path.join(tmp, 'prompts.jsonl');
const judgeModule = path.join(tmp, 'judge.mjs');
const PROMPTS = Array.from({ length: 6 }, (_, i) => `Say ${'abcdef'[i]}.`);

async function writePolicy(dir: string, vocab: number, tokenizer = true): Promise<void> {
  const model = Model.create(
    {
      vocab_size: vocab,
      hidden_size: 16,
      num_hidden_layers: 1,
      num_attention_heads: 2,
      intermediate_size: 32,
      max_position_embeddings: 128,
      seed: 3,
    },
    { maxBatch: 1, maxSeq: 8 },
  );
  try {
    await savePretrained(model, dir);
  } finally {
    await model.dispose();
  }
  if (tokenizer) makeMistralChatModel(dir);
}

beforeAll(async () => {
  await writePolicy(policyDir, 32000);
  writeFileSync(prompts, PROMPTS.map((prompt) => JSON.stringify({ prompt })).join('\n'));
  writeFileSync(
    judgeModule,
    'export const longer = (prompt, a, b) => (a.length === b.length ? 0.5 : a.length > b.length ? 0.75 : 0.25);\n',
  );
}, 60_000);
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

/** A config over the tiny policy directory, with `patch`'s sections replacing the defaults here. */
function hfConfig(patch: Partial<RunConfigInput> = {}): RunConfig {
  return parseConfig({
    model: { path: policyDir },
    data: { prompts, evalSize: 2, maxPromptTokens: 12 },
    generation: { maxNewTokens: 4 },
    preference: { kind: 'function', module: judgeModule, export: 'longer', id: 'longer-v1' },
    training: { maxLength: 32, batchSize: 1 },
    run: { dir: path.join(tmp, 'run'), iterations: 2 },
    ...patch,
  });
}

async function dispose(setup: RunSetup): Promise<void> {
  await setup.model.dispose();
  await setup.preference.dispose();
}

/** The SetupError setupFromConfig rejects with. */
async function setupError(config: RunConfig): Promise<SetupError> {
  const err = await setupFromConfig(config).then(
    async (s) => {
      await dispose(s);
      return undefined;
    },
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(SetupError);
  return err as SetupError;
}

/** The issues parseConfig refuses a config with. */
function configIssues(raw: unknown): RunConfigError['issues'] {
  let refused: unknown;
  try {
    parseConfig(raw);
  } catch (err) {
    refused = err;
  }
  expect(refused).toBeInstanceOf(RunConfigError);
  return (refused as RunConfigError).issues;
}

describe('setupFromConfig', () => {
  it("builds the demo: the 'demo' policy, the oracle and a supervised base", async () => {
    const config = parseConfig(demoConfigInput({ quick: true, iterations: 2, dir: path.join(tmp, 'demo') }));
    const setup = await setupFromConfig(config);
    try {
      expect(setup.config).toBe(config);
      expect(setup.preference.id).toMatch(/^styled-reversal\(a=0\.25,b=0\.25,/);
      expect(setup.makeBase).toBeTypeOf('function');
      expect(setup.split.iterations).toHaveLength(2);
      expect(setup.split.evaluation).toHaveLength(config.data.evalSize);
      expect(setup.text.decode(setup.text.promptIds('cab'))).toContain('cab');
      expect(setup.model.device).toBe('cpu');
    } finally {
      await dispose(setup);
    }
  });

  it('builds a Hugging Face run: the chat policy, the split and the judge', async () => {
    const config = hfConfig();
    const setup = await setupFromConfig(config, { device: 'cpu' });
    try {
      expect(setup.sourceDir).toBe(policyDir);
      expect(setup.model.config.vocab_size).toBe(32000);
      expect(setup.makeBase).toBeUndefined();
      expect(setup.split.evaluation).toHaveLength(2);
      expect(setup.split.iterations.map((it) => it.length)).toEqual([2, 2]);
      expect([...setup.split.evaluation, ...setup.split.iterations.flat()].sort()).toEqual([...PROMPTS].sort());
      const ids = setup.text.promptIds('Say a.');
      expect(ids.length).toBeLessThanOrEqual(config.data.maxPromptTokens);
      expect(setup.text.stopTokens).toEqual([2]);
      expect(setup.preference.id).toBe('longer-v1');
      expect(await setup.preference.compare('p', ['ab', 'a'])).toEqual([
        [0.5, 0.75],
        [0.25, 0.5],
      ]);
    } finally {
      await dispose(setup);
    }
  });
});

describe('training.gradientPrecision', () => {
  it("makes the policy's gradients bf16, in the model and in the plan `sppo run` prints", async () => {
    const full = await setupFromConfig(hfConfig(), { device: 'cpu' });
    const half = await setupFromConfig(hfConfig({ training: { maxLength: 32, batchSize: 1, gradientPrecision: 'bf16' } }), {
      device: 'cpu',
    });
    try {
      expect([full.model.gradientPrecision, half.model.gradientPrecision]).toEqual(['fp32', 'bf16']);
      const [a, b] = [runMemoryPlan(full), runMemoryPlan(half)];
      expect(b.gradientPrecision).toBe('bf16');
      expect(2 * b.grads).toBe(a.grads);
      expect(half.model.memory().grads).toBe(b.grads);
      expect(formatMemoryPlan(b)).toMatch(/^memory plan on cpu \(activation checkpointing off, bf16 gradients, /);
    } finally {
      await dispose(full);
      await dispose(half);
    }
  });
});

describe('generation.kvCacheBytes', () => {
  it("sizes the run's KV-cache pool: in the plan `sppo run` prints and in the generator the run creates", async () => {
    const setup = await setupFromConfig(hfConfig(), { device: 'cpu' });
    try {
      const blockBytes = setup.model
        .createGenerator(generatorPlanFor(setup.config, setup.model.config, setup.model.plan))
        .kvCache().blockBytes;
      const byDefault = runMemoryPlan(setup).kvCache;
      // 3 blocks and a bit: the pool rounds down to whole blocks
      const sized = { ...setup, config: hfConfig({ generation: { maxNewTokens: 4, kvCacheBytes: 3 * blockBytes + 7 } }) };
      const gen = setup.model.createGenerator(generatorPlanFor(sized.config, setup.model.config, setup.model.plan));
      expect(gen.plan.kvCacheBytes).toBe(3 * blockBytes);
      expect(gen.kvCache().blocks).toBe(3);
      expect(runMemoryPlan(sized).kvCache).toBe(gen.memory());
      expect(gen.memory()).toBeLessThan(byDefault);
    } finally {
      await dispose(setup);
    }
  });

  it('generation.packWeights: false leaves the CPU generator without its packed copy of the weights, in the plan and the generator', async () => {
    const setup = await setupFromConfig(hfConfig(), { device: 'cpu' });
    try {
      const plain = { ...setup, config: hfConfig({ generation: { maxNewTokens: 4, packWeights: false } }) };
      const gen = setup.model.createGenerator(generatorPlanFor(plain.config, setup.model.config, setup.model.plan));
      expect(runMemoryPlan(plain).kvCache).toBe(gen.memory());
      expect(runMemoryPlan(plain).kvCache).toBeLessThan(runMemoryPlan(setup).kvCache);
    } finally {
      await dispose(setup);
    }
  });

  it('is refused by its path when it is not a positive integer', () => {
    for (const kvCacheBytes of [0, -4096, 1.5, '1 GiB'])
      expect(
        configIssues({
          model: { path: policyDir },
          data: { prompts },
          preference: { kind: 'function', module: judgeModule, export: 'longer' },
          generation: { kvCacheBytes },
        }).map((i) => i.path),
      ).toEqual([['generation', 'kvCacheBytes']]);
  });
});

describe('a judge function given in code', () => {
  const shorter = (_prompt: string, a: string, b: string): number => (a.length === b.length ? 0.5 : a.length < b.length ? 0.9 : 0.1);
  const inCode = () => hfConfig({ preference: { kind: 'function', id: 'shorter-v1' } });

  it("is the judge of a kind 'function' section without a module", async () => {
    const setup = await setupFromConfig(inCode(), { judgeFunction: shorter });
    try {
      expect(setup.preference.id).toBe('shorter-v1');
      expect(await setup.preference.compare('p', ['ab', 'a'])).toEqual([
        [0.5, 0.1],
        [0.9, 0.5],
      ]);
    } finally {
      await dispose(setup);
    }
  });

  it('is refused beside a module, and beside any other kind (the demo included)', async () => {
    const both = await setupFromConfig(hfConfig(), { judgeFunction: shorter }).catch((e: unknown) => e);
    expect(both).toBeInstanceOf(SetupError);
    expect((both as SetupError).path).toEqual(['preference', 'module']);
    const demo = parseConfig(demoConfigInput({ quick: true, dir: path.join(tmp, 'demo-fn') }));
    for (const config of [demo, hfConfig({ preference: { kind: 'lm-judge', path: policyDir } })]) {
      const err = await setupFromConfig(config, { judgeFunction: shorter }).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(SetupError);
      expect((err as SetupError).path).toEqual(['preference', 'kind']);
    }
  });
});

describe('preference.concurrency', () => {
  it('is how many prompts an engine judge takes at once', async () => {
    const items = ['a', 'b', 'c'].map((w) => ({ prompt: `Say ${w}.`, responses: [w, `${w}${w}`] }));
    for (const [concurrency, expected] of [
      [1, [1, 2, 3]],
      [2, [2, 3]],
      [undefined, [3]],
    ] as const) {
      const setup = await setupFromConfig(hfConfig({ preference: { kind: 'lm-judge', path: policyDir, batchSize: 2, concurrency } }));
      try {
        const progress: number[] = [];
        await setup.preference.compareBatch(items, { onProgress: (done) => progress.push(done) });
        expect(progress).toEqual(expected);
      } finally {
        await dispose(setup);
      }
    }
  });
});

describe('refusals name the field', () => {
  it('the schema refuses presets without a tokenizer, and SFT without the demo policy', () => {
    const base = { data: { prompts }, preference: { kind: 'styled-reversal' } };
    for (const preset of ['tiny', 'small']) {
      const issues = configIssues({ ...base, model: { preset } });
      expect(issues.map((i) => i.path)).toEqual([['model', 'preset']]);
      expect(issues[0].line).toMatch(new RegExp(`^model\\.preset '${preset}' has random weights and no tokenizer`));
    }
    const sft = configIssues({ ...base, model: { path: policyDir }, sft: {} });
    expect(sft).toEqual([
      { path: ['sft'], line: "sft: supervised fine-tuning of the base policy is only available with model.preset 'demo'" },
    ]);
    expect(configIssues({ ...base, model: { path: policyDir }, training: { eta: 0 } })).toEqual([
      { path: ['training', 'eta'], line: 'training.eta: must be > 0' },
    ]);
  });

  it('a config built by hand with a preset that has no tokenizer', async () => {
    const config = { ...hfConfig(), model: { preset: 'tiny' as const } };
    expect((await setupError(config)).path).toEqual(['model', 'preset']);
  });

  it('prompts: a missing file, too few for the split', async () => {
    const missing = await setupError(hfConfig({ data: { prompts: path.join(tmp, 'none.jsonl') } }));
    expect(missing.path).toEqual(['data', 'prompts']);
    expect(missing.message).toMatch(/^data\.prompts: .*none\.jsonl/);
    const few = await setupError(hfConfig({ data: { prompts, evalSize: 100 } }));
    expect(few.path).toEqual(['data', 'evalSize']);
    expect(few.message).toBe(
      `data.evalSize: 6 prompts cannot give 100 for evaluation and at least one to each of 2 iterations (the prompts: the 6 prompts of ${prompts}; data.evalSize 100, run.iterations 2)`,
    );
    const per = await setupError(hfConfig({ data: { prompts, evalSize: 2, promptsPerIteration: 3 } }));
    expect(per.path).toEqual(['data', 'promptsPerIteration']);
    expect(per.message).toMatch(/^data\.promptsPerIteration: 2 iterations × 3 prompts need 6, but only 4 remain/);
  });

  it('the judge: its module, its export, its API key, its model directory', async () => {
    const fn = (p: Record<string, unknown>) => hfConfig({ preference: { kind: 'function', ...p } as RunConfigInput['preference'] });
    expect((await setupError(fn({}))).message).toMatch(/^preference\.module: required/);
    expect((await setupError(fn({}))).path).toEqual(['preference', 'module']);
    expect((await setupError(fn({ module: path.join(tmp, 'nowhere.mjs') }))).path).toEqual(['preference', 'module']);
    const noExport = await setupError(fn({ module: judgeModule, export: 'shorter' }));
    expect(noExport.path).toEqual(['preference', 'export']);
    expect(noExport.message).toContain('exports: longer');
    delete process.env.SPPO_SETUP_TEST_KEY;
    const key = await setupError(
      hfConfig({ preference: { kind: 'http', baseUrl: 'http://127.0.0.1:9/v1', model: 'm', apiKeyEnv: 'SPPO_SETUP_TEST_KEY' } }),
    );
    expect(key.path).toEqual(['preference', 'apiKeyEnv']);
    expect(key.message).toBe('preference.apiKeyEnv: the environment variable SPPO_SETUP_TEST_KEY (apiKeyEnv) is not set');
    const judge = await setupError(hfConfig({ preference: { kind: 'lm-judge', path: tmp } }));
    expect(judge.path).toEqual(['preference', 'path']);
    expect(judge.message).toContain('is not a model directory (no config.json)');
    const rm = await setupError(hfConfig({ preference: { kind: 'reward-model', path: policyDir } }));
    expect(rm.path).toEqual(['preference', 'path']);
    expect(rm.message).toMatch(/^preference\.path: .*architectures must be one of/);
  });

  it('the policy: not a model directory, no tokenizer, a broken config.json, a tokenizer of another model', async () => {
    const notModel = await setupError(hfConfig({ model: { path: tmp } }));
    expect(notModel.path).toEqual(['model', 'path']);
    expect(notModel.message).toBe(`model.path: ${tmp} is not a model directory (no config.json)`);

    const bare = path.join(tmp, 'bare');
    await writePolicy(bare, 32000, false);
    const noTokenizer = await setupError(hfConfig({ model: { path: bare } }));
    expect(noTokenizer.path).toEqual(['model', 'path']);
    expect(noTokenizer.message).toContain('has no tokenizer.json');

    const broken = path.join(tmp, 'broken');
    mkdirSync(broken);
    writeFileSync(path.join(broken, 'config.json'), JSON.stringify({ architectures: ['GPT2LMHeadModel'], max_position_embeddings: 64 }));
    expect((await setupError(hfConfig({ model: { path: broken } }))).path).toEqual(['model', 'path']);

    const small = path.join(tmp, 'small-vocab');
    await writePolicy(small, 1000);
    const vocab = await setupError(hfConfig({ model: { path: small } }));
    expect(vocab.path).toEqual(['model', 'path']);
    expect(vocab.message).toMatch(/into token id \d+, but the model's vocab_size is 1000/);
  });
});

describe('checked before the judge and the weights are loaded', () => {
  let copies = 0;
  /** A copy of the policy directory without its weights (so a check that passes would fail on them), edited by `edit`. */
  function policyCopy(edit: (dir: string) => void = () => undefined): string {
    const dir = path.join(tmp, `copy-${copies++}`);
    cpSync(policyDir, dir, { recursive: true });
    rmSync(path.join(dir, 'model.safetensors'));
    edit(dir);
    return dir;
  }

  it('prompt + generation.maxNewTokens against the context, for the longest prompt', async () => {
    const dir = policyCopy();
    const err = await setupError(hfConfig({ model: { path: dir }, generation: { maxNewTokens: 125 } }));
    expect(err.path).toEqual(['generation', 'maxNewTokens']);
    expect(err.message).toMatch(
      new RegExp(
        `^generation\\.maxNewTokens: the longest prompt \\("Say .\\."\\) takes (\\d+) tokens \\(data\\.maxPromptTokens 12\\) and generation\\.maxNewTokens is 125: \\d+ tokens exceed the model's context of 128 \\(max_position_embeddings in ${path.join(dir, 'config.json')}\\); lower generation\\.maxNewTokens to \\d+ or less, or lower data\\.maxPromptTokens`,
      ),
    );
    // what fits is let through to the weights, which this copy lacks
    const fits = await setupError(hfConfig({ model: { path: dir }, generation: { maxNewTokens: 100 } }));
    expect(fits.message).toMatch(/no model\.safetensors/);
  });

  it('the chat template renders every prompt', async () => {
    const dir = policyCopy((d) => {
      writeFileSync(
        path.join(d, 'chat_template.jinja'),
        `{% if messages[0].content == 'Say c.' %}{{ raise_exception('no c, please') }}{% endif %}${INST_CHAT_TEMPLATE}`,
      );
    });
    const err = await setupError(hfConfig({ model: { path: dir } }));
    expect(err.path).toEqual(['model', 'path']);
    expect(err.message).toBe(
      `model.path: the prompt "Say c." cannot be turned into tokens: ${dir}: chat template 'default' (chat_template.jinja) failed to render (no c, please)`,
    );
  });

  it('a config.json syntax error names the file and the line, and an empty tokenizer.json vocabulary is refused', async () => {
    const broken = policyCopy((d) => {
      writeFileSync(
        path.join(d, 'config.json'),
        readFileSync(path.join(d, 'config.json'), 'utf8').replace(/,\s*"hidden_size"/, ' "hidden_size"'),
      );
    });
    const syntax = await setupError(hfConfig({ model: { path: broken } }));
    expect(syntax.path).toEqual(['model', 'path']);
    expect(syntax.message).toMatch(
      new RegExp(`^model\\.path: ${path.join(broken, 'config.json')}: not valid JSON at line \\d+, column \\d+ \\(`),
    );

    const empty = policyCopy((d) => {
      const file = path.join(d, 'tokenizer.json');
      const t = JSON.parse(readFileSync(file, 'utf8')) as { model: Record<string, unknown> };
      t.model.vocab = {};
      t.model.merges = [];
      writeFileSync(file, JSON.stringify(t));
    });
    const unk = await setupError(hfConfig({ model: { path: empty } }));
    expect(unk.path).toEqual(['model', 'path']);
    expect(unk.message).toMatch(new RegExp(`^model\\.path: ${empty}: tokenizer\\.json has no ordinary token that decodes to text`));
  });

  it('the demo preset: its split and its context, naming the field', async () => {
    const demo = (patch: Partial<RunConfigInput>) => {
      const input = demoConfigInput({ quick: true, dir: path.join(tmp, 'demo-checks') });
      return parseConfig({ ...input, ...patch, data: { ...input.data, ...patch.data } });
    };
    const evalSize = await setupError(demo({ data: { words: 500, evalSize: 600 } }));
    expect(evalSize.path).toEqual(['data', 'evalSize']);
    expect(evalSize.message).toBe(
      'data.evalSize: 500 prompts cannot give 600 for evaluation and at least one to each of 3 iterations (the prompts: data.words = 500 generated words; data.evalSize 600, run.iterations 3)',
    );
    const input = demoConfigInput({ quick: true });
    const long = await setupError(demo({ generation: { ...input.generation, maxNewTokens: 2048 } }));
    expect(long.path).toEqual(['generation', 'maxNewTokens']);
    expect(long.message).toMatch(
      /^generation\.maxNewTokens: the longest prompt \(".+"\) takes 8 tokens and generation\.maxNewTokens is 2048: 2056 tokens exceed the model's context of 32 \(the demo policy's context\); lower generation\.maxNewTokens to 24 or less$/,
    );
  });
});
