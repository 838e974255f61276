// examples/: every config there loads through the schema, points at files that exist where the
// repository ships them, and the demo config is exactly what `sppo demo` runs.
import { readdirSync } from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { demoConfigInput, loadConfig, loadPrompts, parseConfig, splitPrompts } from '../lib/index.js';

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
