// examples/: every config there loads through the schema, points at files that exist where the
// repository ships them, and the demo config is exactly what `sppo demo` runs; the TypeScript
// examples run (on a tiny random-weight Llama over the real Mistral tokenizer, so in seconds).
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { alignWithHouseStyle, houseStyle } from '../examples/embed-in-a-tool.js';
import { runConfigured } from '../examples/run-config.js';
import { makeMistralChatModel } from './fixtures/mistral-tokenizer.js';
import { demoConfigInput, loadConfig, loadPrompts, Model, parseConfig, RunDir, savePretrained, splitPrompts } from '../lib/index.js';

const examples = path.resolve(import.meta.dirname, '../examples');
const configs = readdirSync(path.join(examples, 'configs')).filter((f) => /\.(ya?ml|json)$/.test(f));

describe('examples/configs', () => {
  it('holds the demo and one config per kind of Hugging Face judge', () => {
    expect(configs.sort()).toEqual(['demo.yaml', 'hf-http-judge.yaml', 'hf-lm-judge.yaml', 'hf-reward-model.yaml']);
  });

  it.each(configs)('%s loads through the schema, and its prompt file splits over its iterations', async (name) => {
    const config = await loadConfig(path.join(examples, 'configs', name));
    if (config.data.prompts !== undefined) {
      const prompts = await loadPrompts(config.data.prompts, { column: config.data.column });
      const split = splitPrompts(prompts, { iterations: config.run.iterations, evalSize: config.data.evalSize, seed: config.run.seed });
      expect(split.iterations).toHaveLength(config.run.iterations);
      expect(split.evaluation).toHaveLength(config.data.evalSize);
    }
  });

  it('demo.yaml is the configuration `sppo demo` runs', async () => {
    const file = path.join(examples, 'configs', 'demo.yaml');
    const fromFile = await loadConfig(file);
    const demo = parseConfig(demoConfigInput(), { baseDir: path.dirname(file) });
    expect(fromFile).toEqual(demo);
  });
});

const tmp = mkdtempSync(path.join(tmpdir(), 'sppo-examples-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

/** A chat model directory: random Llama weights, the Mistral-7B tokenizer and chat template. */
async function tinyChatModel(dir: string): Promise<void> {
  const model = Model.create(
    {
      vocab_size: 32000,
      hidden_size: 16,
      num_hidden_layers: 1,
      num_attention_heads: 2,
      intermediate_size: 32,
      max_position_embeddings: 512,
      seed: 5,
    },
    { maxBatch: 1, maxSeq: 8 },
  );
  try {
    await savePretrained(model, dir);
  } finally {
    await model.dispose();
  }
  makeMistralChatModel(dir);
}

describe('examples/*.ts', () => {
  it("embed-in-a-tool aligns a model with the tool's own scorer and answers from the aligned policy", async () => {
    const modelDir = path.join(tmp, 'model');
    await tinyChatModel(modelDir);
    const runDir = path.join(tmp, 'house-style');
    const lines: string[] = [];
    const maxNewTokens = 6;
    const aligned = await alignWithHouseStyle({
      modelDir,
      promptsFile: path.join(examples, 'prompts.jsonl'),
      runDir,
      iterations: 1,
      maxNewTokens,
      log: (l) => lines.push(l),
    });
    expect(aligned.metrics.map((m) => m.iteration)).toEqual([0, 1]);
    expect(lines).toHaveLength(2);
    expect(aligned.policyDir).toBe(RunDir.at(runDir).policy(1));
    for (const file of ['config.json', 'tokenizer.json']) expect(existsSync(path.join(aligned.policyDir, file))).toBe(true);
    expect(typeof aligned.answer).toBe('string');
    // The judge of the run was the tool's function: every judged pair is its verdict on the two texts.
    const run = RunDir.at(runDir);
    const generated = (await run.readStage(1, 'generate'))!.value;
    const judged = (await run.readStage(1, 'judge'))!.value;
    const verdict = houseStyle(4 * maxNewTokens);
    expect(judged.preference).toHaveLength(generated.responses.length);
    judged.preference.forEach((P, p) => {
      const texts = generated.responses[p].map((r) => r.text);
      for (let i = 0; i < texts.length; ++i)
        for (let j = 0; j < texts.length; ++j) if (i !== j) expect(P[i][j]).toBeCloseTo(verdict('', texts[i], texts[j]), 12);
    });
  });

  it('run-config runs the demo config file to the end and resumes it without recomputing', async () => {
    const raw = readFileSync(path.join(examples, 'configs', 'demo.yaml'), 'utf8')
      .replace(/words: \d+/, 'words: 60')
      .replace(/evalSize: \d+/, 'evalSize: 20')
      .replace(/steps: 400/, 'steps: 20')
      .replace(/examples: 4000/, 'examples: 200')
      .replace(/iterations: 3/, 'iterations: 1')
      .replace(/dir: sppo-demo/, `dir: ${JSON.stringify(path.join(tmp, 'demo'))}`);
    const file = path.join(tmp, 'demo.yaml');
    writeFileSync(file, raw);
    const first: string[] = [];
    const result = await runConfigured(file, { log: (l) => first.push(l) });
    expect(result.metrics.map((m) => m.iteration)).toEqual([0, 1]);
    expect(first.some((l) => l.startsWith('π_1: win rate vs π_0'))).toBe(true);
    const again: string[] = [];
    await runConfigured(file, { log: (l) => again.push(l) });
    expect(again.filter((l) => l.includes(': already done')).length).toBeGreaterThan(0);
    expect(again.some((l) => / s$/.test(l))).toBe(false);
  });
});
