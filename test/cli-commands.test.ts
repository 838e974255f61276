// The `sppo` command line: --help for every subcommand, usage and config errors (exit code 2, one
// line naming the option or the config field, no stack trace), and `sppo eval` over a run
// directory. Most cases call main() in-process; a few spawn the real executable.
import { spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { Writable } from 'node:stream';
import { afterAll, describe, expect, it } from 'vitest';
import { main } from '../lib/cli/cli.js';
import { loadConfig, parseConfig } from '../lib/config/load.js';
import { demoConfigInput } from '../lib/demo/demo.js';
import { CharTokenizer, demoModelConfig } from '../lib/demo/task.js';
import { Model } from '../lib/engine/model.js';
import { loadPretrained, savePretrained } from '../lib/io/checkpoint.js';
import { mergeAdapter, saveAdapter } from '../lib/io/peft.js';
import { tokenizerFileTexts } from '../lib/io/tokenizer.js';
import { writeTinyMistralPolicy } from './fixtures/mistral-tokenizer.js';
import { randomAdapter } from './fixtures/peft-adapters.js';

const root = new URL('..', import.meta.url).pathname;
const dir = mkdtempSync(join(tmpdir(), 'sppo-cli-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

function sink(): Writable & { text: string } {
  const w = new Writable({
    write(chunk: Buffer, _enc, done) {
      w.text += chunk.toString();
      done();
    },
  }) as Writable & { text: string };
  w.text = '';
  return w;
}

async function sppo(...argv: string[]): Promise<CliResult> {
  const stdout = sink();
  const stderr = sink();
  const code = await main(argv, { stdout, stderr });
  return { code, stdout: stdout.text, stderr: stderr.text };
}

function sppoProcess(...argv: string[]): CliResult {
  const r = spawnSync(process.execPath, ['--import', 'tsx', join(root, 'lib/cli/main.ts'), ...argv], {
    cwd: root,
    encoding: 'utf8',
    timeout: 60_000,
  });
  return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

function file(name: string, text: string): string {
  const p = join(dir, name);
  mkdirSync(dirname(p), { recursive: true });
  writeFileSync(p, text);
  return p;
}

/** A usage or config error: exit 2, nothing on stdout, exactly one line on stderr. */
function expectUsageError(r: CliResult, ...fragments: string[]): void {
  expect(r.code, r.stderr).toBe(2);
  expect(r.stdout).toBe('');
  expect(r.stderr.trimEnd().split('\n')).toHaveLength(1);
  for (const f of fragments) expect(r.stderr).toContain(f);
}

describe('help', () => {
  it.each(['run', 'demo', 'generate', 'eval', 'merge-adapter'])('sppo %s --help describes its options', async (name) => {
    const r = await sppo(name, '--help');
    expect(r.code).toBe(0);
    expect(r.stdout).toContain(`Usage: sppo ${name}`);
    expect(r.stdout).toContain('--help');
    expect(await sppo(name, '-h')).toEqual(r);
  });

  it('sppo --help lists the commands; no command is a usage error', async () => {
    const r = await sppo('--help');
    expect(r.code).toBe(0);
    for (const name of ['run', 'demo', 'generate', 'eval', 'merge-adapter']) expect(r.stdout).toMatch(new RegExp(`^  ${name} `, 'm'));
    const none = await sppo();
    expect(none.code).toBe(2);
    expect(none.stderr).toContain('Usage: sppo <command>');
  });

  it('the executable prints help and exits 0', () => {
    const r = sppoProcess('generate', '--help');
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toContain('--demo-run RUN_DIR');
  });
});

describe('usage errors', () => {
  it('an unknown command', async () =>
    expectUsageError(await sppo('frob'), "unknown command 'frob'", 'run, demo, generate, eval, merge-adapter'));
  it('an unknown option', async () => expectUsageError(await sppo('demo', '--bogus'), "'--bogus'", 'sppo demo --help'));
  it('an option without its value', async () => expectUsageError(await sppo('run', '--config'), '--config'));
  it('an unknown activation-checkpointing setting', async () =>
    expectUsageError(
      await sppo('run', '--config', 'run.yaml', '--activation-checkpointing', 'sometimes'),
      "--activation-checkpointing must be on, off or auto, got 'sometimes'",
    ));
  it('a stray positional argument', async () => expectUsageError(await sppo('eval', 'somewhere'), "'somewhere'"));
  it('a missing required option', async () => {
    expectUsageError(await sppo('run'), '--config is required');
    expectUsageError(await sppo('eval'), '--run is required');
    expectUsageError(await sppo('generate', '--model', dir), '--prompts is required');
  });
  it('bad numbers and choices', async () => {
    expectUsageError(await sppo('demo', '--iterations', '0'), '--iterations must be an integer ≥ 1', "'0'");
    expectUsageError(await sppo('demo', '--iterations', '2.5'), '--iterations');
    expectUsageError(await sppo('demo', '--loss', 'ppo'), '--loss must be one of', 'sppo-pair', "'ppo'");
    expectUsageError(await sppo('demo', '--compare', '--loss', 'dpo'), '--compare', 'no --loss');
    const prompts = file('p.jsonl', '{"prompt":"abc"}\n');
    expectUsageError(await sppo('generate', '--model', dir, '--prompts', prompts, '--top-p', '1.5'), '--top-p must be a number', '≤ 1');
    expectUsageError(await sppo('generate', '--model', dir, '--prompts', prompts, '--samples', 'x'), '--samples');
  });
  it('generate needs exactly one checkpoint source', async () => {
    const prompts = file('p.jsonl', '{"prompt":"abc"}\n');
    expectUsageError(await sppo('generate', '--prompts', prompts), 'exactly one of --model');
    expectUsageError(await sppo('generate', '--prompts', prompts, '--model', dir, '--demo-run', dir), 'exactly one of --model');
    expectUsageError(await sppo('generate', '--prompts', prompts, '--demo-run', dir), 'no run.json');
    expectUsageError(await sppo('generate', '--prompts', prompts, '--model', dir), 'no config.json');
  });
  it('generate --demo-run checks the run, the iteration and the prompts against the demo', async () => {
    const run = join(dir, 'demo-run');
    file('demo-run/run.json', JSON.stringify({ hash: 'h', config: parseConfig(demoConfigInput({ dir: run, iterations: 2 })) }));
    file('demo-run/base/policy/config.json', JSON.stringify({ max_position_embeddings: 32 }));
    file('demo-run/base/base.json', JSON.stringify({ value: {}, seconds: 1 }));
    for (const [name, text] of tokenizerFileTexts(new CharTokenizer('abcdefgh').files())) file(`demo-run/base/policy/${name}`, text);
    const words = file('words.jsonl', '{"prompt":"abc"}\n{"prompt":"xyz"}\n');
    expectUsageError(await sppo('generate', '--demo-run', run, '--iteration', '2', '--prompts', words), 'no checkpoint of iteration 2');
    expectUsageError(await sppo('generate', '--demo-run', run, '--prompts', words), '--prompts', "character 'x'", 'alphabet');
    const hfRun = join(dir, 'hf-run');
    const hfConfig = parseConfig({ model: { path: '/models/x' }, data: { prompts: 'p.jsonl' }, preference: { kind: 'styled-reversal' } });
    file('hf-run/run.json', JSON.stringify({ hash: 'h', config: hfConfig }));
    expectUsageError(await sppo('generate', '--demo-run', hfRun, '--prompts', words), 'not a demo run', '--model');
  });

  it('a device other than cpu, cuda or auto', async () => {
    expectUsageError(await sppo('demo', '--device', 'gpu'), "--device must be cpu, cuda or auto, got 'gpu'");
    expectUsageError(await sppo('generate', '--model', dir, '--prompts', 'p.jsonl', '--device', 'tpu'), "got 'tpu'");
  });
  it('eval of a directory that does not exist', async () =>
    expectUsageError(await sppo('eval', '--run', join(dir, 'nowhere')), 'does not exist'));
});

describe('config errors', () => {
  const valid = 'model: {preset: demo}\ndata: {words: 100}\npreference: {kind: styled-reversal}\n';

  it('name every bad field on one line, with exit code 2 and no stack trace (real process)', () => {
    const bad = file('bad.yaml', `${valid}training: {eta: -1, learningRate: 3}\n`);
    const r = sppoProcess('run', '--config', bad);
    expectUsageError(r, bad, 'training.eta: must be > 0', 'training.learningRate: unknown field');
    expect(r.stderr).not.toMatch(/\n\s+at /);
  });

  it('unknown top-level keys, wrong types and bad enum values', async () => {
    expectUsageError(await sppo('run', '--config', file('a.yaml', `${valid}optimiser: {lr: 1}\n`)), 'optimiser: unknown field');
    expectUsageError(await sppo('run', '--config', file('b.yaml', `${valid}run: {iterations: three}\n`)), 'run.iterations');
    expectUsageError(await sppo('run', '--config', file('c.yaml', `${valid}training: {loss: ppo}\n`)), 'training.loss: must be one of');
  });

  it('files that cannot be read or parsed', async () => {
    expectUsageError(await sppo('run', '--config', join(dir, 'missing.yaml')), 'cannot read the config');
    expectUsageError(await sppo('run', '--config', file('broken.yaml', 'model: {preset: demo\n')), 'not valid YAML', 'line');
    expectUsageError(await sppo('run', '--config', file('run.toml', 'x = 1\n')), 'must be .yaml, .yml or .json');
  });

  it('refuses what `sppo run` cannot run yet, naming the field', async () => {
    const prompts = file('prompts.jsonl', Array.from({ length: 20 }, (_, i) => JSON.stringify({ prompt: `p${i}` })).join('\n'));
    const tiny = `model: {preset: tiny}\ndata: {prompts: ${prompts}}\npreference: {kind: styled-reversal}\n`;
    expectUsageError(await sppo('run', '--config', file('tiny.yaml', tiny)), "model.preset 'tiny'", 'no tokenizer');
    const hf = (rest: string) => `model: {path: ${join(dir, 'no-model')}}\ndata: {prompts: ${prompts}, evalSize: 4}\n${rest}`;
    expectUsageError(
      await sppo(
        'run',
        '--config',
        file('nofile.yaml', hf('preference: {kind: styled-reversal}\n').replace(prompts, join(dir, 'none.jsonl'))),
      ),
      'data.prompts',
      'none.jsonl',
    );
    expectUsageError(await sppo('run', '--config', file('fn.yaml', hf('preference: {kind: function}\n'))), 'preference.module: required');
    // the judge is built after the prompts are checked against the model's tokenizer and context
    const policy = join(dir, 'policy');
    await writeTinyMistralPolicy(policy);
    const judge = file('judge.mjs', 'export const judge = () => 0.5;\n');
    expectUsageError(
      await sppo(
        'run',
        '--config',
        file(
          'fn2.yaml',
          hf(`preference: {kind: function, module: ${judge}, export: score}\ngeneration: {maxNewTokens: 16}\n`).replace(
            join(dir, 'no-model'),
            policy,
          ),
        ),
      ),
      'preference.export',
      "'score'",
      'exports: judge',
    );
  });
});

describe('--device', () => {
  it('auto says where the policy runs and, on the CPU, why not the GPU', async () => {
    const r = await sppo('demo', '--quick', '--iterations', '1', '--device', 'auto', '--dir', join(dir, 'demo-auto'));
    expect(r.code, r.stderr).toBe(0);
    const line = r.stdout.split('\n').find((l) => l.startsWith('device: '));
    expect(line).toMatch(/^device: (cpu \(no usable GPU: .{10,}\)|cuda \(.+; bf16 weights and activations, fp32 master weights\))$/);
  }, 120_000);
});

/** The demo run's sampling settings (temperature 1, top-p 1, 12 new tokens) as generate's flags. */
const DEMO_SAMPLING = ['--temperature', '1', '--top-p', '1', '--max-new-tokens', '12'];

describe('sppo generate --demo-run', () => {
  it('samples with the tokenizer saved in the checkpoint, as --model does through its chat template', async () => {
    const run = join(dir, 'demo-sampled');
    const policy = join(run, 'base', 'policy');
    file('demo-sampled/run.json', JSON.stringify({ hash: 'h', config: parseConfig(demoConfigInput({ dir: run, iterations: 1 })) }));
    file('demo-sampled/base/base.json', JSON.stringify({ value: {}, seconds: 1 }));
    const tokenizer = new CharTokenizer('abcdefgh'); // the styled-reversal task's default alphabet
    const model = Model.create(demoModelConfig(tokenizer, 3), { maxBatch: 1, maxSeq: 32 });
    try {
      await savePretrained(model, policy, { tokenizer: tokenizer.files() });
    } finally {
      await model.dispose();
    }
    const words = file('sampled.jsonl', '{"prompt":"abc"}\n{"prompt":"hgfe"}\n');
    const jsonl = (text: string) =>
      text
        .trimEnd()
        .split('\n')
        .map((l) => JSON.parse(l) as { prompt: string; response: string; logprob: number });

    const demo = await sppo('generate', '--demo-run', run, '--prompts', words);
    expect(demo.code, demo.stderr).toBe(0);
    const sampled = jsonl(demo.stdout);
    expect(sampled.map((r) => r.prompt)).toEqual(['abc', 'hgfe']);
    for (const r of sampled) expect(r.response).toMatch(new RegExp(`^[${tokenizer.chars}�]*$`));
    // the demo run's sampling settings (temperature 1, top-p 1, 12 new tokens) given to --model
    const viaModel = await sppo('generate', '--model', policy, '--prompts', words, ...DEMO_SAMPLING);
    expect(viaModel.code, viaModel.stderr).toBe(0);
    // the same tokens: the chat text leaves the special tokens out where the demo's shows '�'
    expect(jsonl(viaModel.stdout)).toEqual(sampled.map((r) => ({ ...r, response: r.response.replaceAll('�', '') })));

    // a checkpoint of a run made before demo checkpoints saved their tokenizer
    rmSync(join(policy, 'tokenizer.json'));
    expectUsageError(await sppo('generate', '--demo-run', run, '--prompts', words), policy, 'no tokenizer.json', 'sppo demo --dir');
  });
});

describe('sppo generate --seed', () => {
  it("gives each prompt a random stream of its own, derived from (seed, the prompt's index) only", async () => {
    const policy = join(dir, 'seeded-policy');
    const tokenizer = new CharTokenizer('abcdefgh');
    const model = Model.create(demoModelConfig(tokenizer, 4), { maxBatch: 1, maxSeq: 32 });
    try {
      await savePretrained(model, policy, { tokenizer: tokenizer.files() });
    } finally {
      await model.dispose();
    }
    const run = async (name: string, prompts: string[], seed: string) => {
      const p = file(`${name}.jsonl`, prompts.map((prompt) => JSON.stringify({ prompt }) + '\n').join(''));
      const r = await sppo('generate', '--model', policy, '--prompts', p, '--seed', seed, '--samples', '2', ...DEMO_SAMPLING);
      expect(r.code, r.stderr).toBe(0);
      return r.stdout
        .trimEnd()
        .split('\n')
        .map((l) => (JSON.parse(l) as { response: string }).response);
    };
    // The same prompt at indices 0 and 1: the same seed for both would give the same samples.
    const twice = await run('twice', ['abc', 'abc'], '5');
    expect(twice).toHaveLength(4);
    expect(twice.slice(2)).not.toEqual(twice.slice(0, 2));
    // A prompt's samples depend on (seed, its index) only: alone at index 0, or beside others.
    expect(await run('alone', ['abc'], '5')).toEqual(twice.slice(0, 2));
    expect((await run('after', ['hgfe', 'abc'], '5')).slice(2)).toEqual(twice.slice(2));
    // and on the seed
    expect(await run('other-seed', ['abc'], '6')).not.toEqual(twice.slice(0, 2));
  }, 120_000);
});

describe('sppo eval', () => {
  it("prints a run's table and writes its report", async () => {
    const run = join(dir, 'run');
    const row = (t: number, mean: number) =>
      JSON.stringify({
        iteration: t,
        winRateVsBase: { mean, low: mean - 0.02, high: mean + 0.02, n: 50 },
        meanResponseLength: 9.25,
        seconds: { evaluate: 1.25 },
      });
    file('run/.keep', '');
    writeFileSync(join(run, 'metrics.jsonl'), `${row(0, 0.5)}\n${row(1, 0.625)}\n`);
    const r = await sppo('eval', '--run', run);
    expect(r.code, r.stderr).toBe(0);
    const lines = r.stdout.split('\n');
    expect(lines.find((l) => /^\s+1\s/.test(l))).toMatch(/1\s+0\.625 ± 0\.020\s+–\s+–\s+–\s+–\s+–\s+9\.3\s+–\s+1\.3/);
    expect(r.stdout).toContain(`report: ${join(run, 'report.html')}`);
    expect(readFileSync(join(run, 'report.html'), 'utf8')).toContain('0.625 ± 0.020');
  });

  it('a corrupt metrics file is a run failure naming the line', async () => {
    file('corrupt/metrics.jsonl', '{"iteration":0}\n');
    const r = await sppo('eval', '--run', join(dir, 'corrupt'));
    expect(r.code).toBe(1);
    expect(r.stderr).toContain('line 1 is not an iteration');
  });
});

describe('sppo init', () => {
  const initDir = join(dir, 'init');
  mkdirSync(initDir, { recursive: true });

  it('writes a commented config that loads as the demo, or as each judge over a model directory', async () => {
    const out = join(initDir, 'demo.yaml');
    expect((await sppo('init', '--demo', '--out', out)).code).toBe(0);
    expect(await loadConfig(out)).toEqual(parseConfig(demoConfigInput(), { baseDir: initDir }));

    for (const judge of ['http', 'lm-judge', 'reward-model', 'function']) {
      const file = join(initDir, 'sub', `${judge}.yaml`);
      mkdirSync(dirname(file), { recursive: true });
      const r = await sppo('init', '--out', file, '--judge', judge, '--model', join(dir, 'my-model'), '--prompts', join(dir, 'p.jsonl'));
      expect(r.code, r.stderr).toBe(0);
      const config = await loadConfig(file);
      expect(config.preference.kind).toBe(judge);
      // the options' paths survive being written relative to the config's folder
      expect(config.model.path).toBe(join(dir, 'my-model'));
      expect(config.data.prompts).toBe(join(dir, 'p.jsonl'));
      const text = readFileSync(file, 'utf8');
      expect(text).toContain('path: ../../my-model\n');
      // every field is documented; optional ones without a default wait commented out
      expect(text).toMatch(/# η of the multiplicative-weights update[^\n]*\n {2}eta: 1000\n/);
      expect(text).toMatch(/\n {4}# alpha:\n/);
    }
  });

  it('never overwrites a file, and refuses bad options', async () => {
    const out = join(initDir, 'kept.yaml');
    writeFileSync(out, 'mine\n');
    expectUsageError(await sppo('init', '--out', out), 'already exists');
    expect(readFileSync(out, 'utf8')).toBe('mine\n');
    expectUsageError(await sppo('init', '--out', join(initDir, 'x.yaml'), '--judge', 'oracle'), '--judge', 'oracle');
    expectUsageError(await sppo('init', '--out', join(initDir, 'x.json')), '.yaml');
    expectUsageError(await sppo('init', '--out', join(initDir, 'x.yaml'), '--demo', '--model', 'm'), '--demo');
    expectUsageError(await sppo('init', '--out', join(initDir, 'none', 'x.yaml')), 'does not exist');
  });
});

describe('sppo merge-adapter', () => {
  it('writes the merged checkpoint, which loads; refuses bad options and an adapter of another model', async () => {
    const base = join(dir, 'merge-base');
    await writeTinyMistralPolicy(base);
    const { model } = await loadPretrained(base, { maxBatch: 1, maxSeq: 8 });
    const config = model.config;
    await model.dispose();
    const lora = { rank: 2, alpha: 4, targets: ['q_proj', 'up_proj'] as const };
    const adapter = join(dir, 'merge-adapter');
    await saveAdapter(adapter, { lora, modelConfig: config, tensors: randomAdapter(config, lora, 1) });
    const out = join(dir, 'merged');
    const r = await sppo('merge-adapter', '--base', base, '--adapter', adapter, '--out', out, '--dtype', 'bfloat16');
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toContain(`files in ${out}`);
    const merged = await loadPretrained(out, { maxBatch: 1, maxSeq: 8 });
    expect(merged.config.torch_dtype).toBe('bfloat16');
    await merged.model.dispose();

    // saved with no base model: --base is needed
    expectUsageError(
      await sppo('merge-adapter', '--adapter', adapter, '--out', out),
      `--adapter: ${adapter} is a LoRA adapter directory that names no base model (base_model_name_or_path); give the base with --base DIR`,
    );
    expectUsageError(
      await sppo('merge-adapter', '--base', base, '--adapter', adapter, '--out', out, '--dtype', 'fp8'),
      "--dtype must be float32 or bfloat16, got 'fp8'",
    );
    expectUsageError(await sppo('merge-adapter', '--base', join(dir, 'nowhere'), '--adapter', adapter, '--out', out), 'does not exist');
    const other = { ...config, hidden_size: config.hidden_size * 2 };
    const wrong = join(dir, 'merge-wrong-adapter');
    await saveAdapter(wrong, { lora, modelConfig: other, tensors: randomAdapter(other, lora, 1) });
    const failed = await sppo('merge-adapter', '--base', base, '--adapter', wrong, '--out', join(dir, 'merged-wrong'));
    expect(failed.code).toBe(1);
    expect(failed.stderr.trimEnd().split('\n')).toHaveLength(1);
    expect(failed.stderr).toMatch(/sppo merge-adapter: .*has shape \[2, 64\] but the base model in .* needs \[2, 32\]/);
  });

  it('finds the base an adapter names as PEFT does: an absolute path from anywhere, a relative one from the working directory; --base overrides', async () => {
    // work/models/base, and adapters over it naming it relative to work/ (as PEFT records a base
    // loaded as 'models/base' from work/) and absolutely (as sppo run writes it)
    const work = join(dir, 'resolve');
    const elsewhere = join(dir, 'resolve-elsewhere');
    mkdirSync(elsewhere, { recursive: true });
    const base = join(work, 'models', 'base');
    await writeTinyMistralPolicy(base);
    const { model } = await loadPretrained(base, { maxBatch: 1, maxSeq: 8 });
    const config = model.config;
    await model.dispose();
    const lora = { rank: 2, alpha: 4, targets: ['q_proj', 'down_proj'] as const };
    const tensors = randomAdapter(config, lora, 2);
    const relative = join(work, 'adapters', 'relative');
    const absolute = join(work, 'adapters', 'absolute');
    await saveAdapter(relative, { lora, modelConfig: config, tensors, baseModel: join('models', 'base') });
    await saveAdapter(absolute, { lora, modelConfig: config, tensors, baseModel: base });
    const reference = join(dir, 'resolve-reference');
    await mergeAdapter(base, relative, reference);
    const weights = (d: string) => readFileSync(join(d, 'model.safetensors'));

    // from work/: the relative name is work/models/base (not the adapter's own models/base, which is no directory)
    const fromWork = await inDirectory(work, () => sppo('merge-adapter', '--adapter', relative, '--out', join(dir, 'resolve-1')));
    expect(fromWork.code, fromWork.stderr).toBe(0);
    expect(fromWork.stdout).toContain(`into ${base}:`);
    expect(weights(join(dir, 'resolve-1')).equals(weights(reference))).toBe(true);
    // from elsewhere the relative name finds nothing, and the error says where it looked and why
    expectUsageError(
      await inDirectory(elsewhere, () => sppo('merge-adapter', '--adapter', relative, '--out', join(dir, 'resolve-2'))),
      `--adapter: ${relative} is a LoRA adapter over models/base, which is not a model directory here ` +
        `(${join(elsewhere, 'models', 'base')}: a relative path is resolved against the working directory, as PEFT does); give the base with --base DIR`,
    );
    // the absolute name, from anywhere
    const fromElsewhere = await inDirectory(elsewhere, () => sppo('merge-adapter', '--adapter', absolute, '--out', join(dir, 'resolve-3')));
    expect(fromElsewhere.code, fromElsewhere.stderr).toBe(0);
    expect(weights(join(dir, 'resolve-3')).equals(weights(reference))).toBe(true);

    // sppo generate resolves it the same way, and --base stands in for a base it cannot find
    const prompts = file('resolve-prompts.jsonl', '{"prompt":"abc"}\n');
    const args = ['--prompts', prompts, '--max-new-tokens', '3', '--seed', '1'];
    const sampled = await inDirectory(work, () => sppo('generate', '--model', relative, ...args));
    expect(sampled.code, sampled.stderr).toBe(0);
    expectUsageError(
      await inDirectory(elsewhere, () => sppo('generate', '--model', relative, ...args)),
      `--model: ${relative} is a LoRA adapter over models/base, which is not a model directory here (${join(elsewhere, 'models', 'base')}:`,
      'give its base with --base DIR',
    );
    const given = await inDirectory(elsewhere, () => sppo('generate', '--model', relative, '--base', base, ...args));
    expect(given.code, given.stderr).toBe(0);
    expect(given.stdout).toBe(sampled.stdout);
    const absoluteSampled = await inDirectory(elsewhere, () => sppo('generate', '--model', absolute, ...args));
    expect(absoluteSampled.stdout).toBe(sampled.stdout);
    expectUsageError(await sppo('generate', '--model', base, '--base', base, ...args), `--base: ${base} is not a LoRA adapter directory`);
  });
});

/** `fn` run with `cwd` as the working directory, which is then restored. */
async function inDirectory<T>(cwd: string, fn: () => Promise<T>): Promise<T> {
  const before = process.cwd();
  process.chdir(cwd);
  try {
    return await fn();
  } finally {
    process.chdir(before);
  }
}
