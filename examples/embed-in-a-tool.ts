// A Node tool that already has its own scorer embeds the engine to align a chat model with it.
// Here the tool's "house style" prefers answers that stay within a length budget and end a
// sentence; the scorer is an ordinary function (prompt, a, b) => P(a ≻ b), and may be async (an
// internal service, a rules engine, a human queue). The config is built in code, the judge is
// passed in code, and the aligned policy is loaded back to answer a question:
//
//   npx tsx examples/embed-in-a-tool.ts models/Qwen2-0.5B-Instruct
import path from 'node:path';
import {
  loadPretrained,
  parseConfig,
  RunDir,
  runSppo,
  setupFromConfig,
  type Device,
  type IterationMetrics,
  type RunConfigInput,
} from 'sppo-engine';

/** The tool's own preference: within `budget` characters beats over it, then a finished sentence beats an unfinished one. */
export function houseStyle(budget: number) {
  const score = (s: string): number => (s.length <= budget ? 2 : 0) + (/[.!?]\s*$/.test(s) ? 1 : 0);
  return (_prompt: string, a: string, b: string): number => {
    const d = score(a) - score(b);
    return d === 0 ? 0.5 : d > 0 ? 0.9 : 0.1;
  };
}

export interface AlignOptions {
  /** a Hugging Face chat model directory (Llama, Mistral or Qwen2 with tokenizer.json and a chat template) */
  modelDir: string;
  /** a JSONL file of {"prompt": ...} lines */
  promptsFile: string;
  runDir: string;
  device?: Device;
  iterations?: number;
  /** response length of the sampled answers, in tokens */
  maxNewTokens?: number;
  signal?: AbortSignal;
  log?: (line: string) => void;
}

export interface Aligned {
  metrics: IterationMetrics[];
  /** the newest policy checkpoint: a Hugging Face directory transformers and vLLM load */
  policyDir: string;
  /** the aligned policy's answer to one question */
  answer: string;
}

export async function alignWithHouseStyle(o: AlignOptions): Promise<Aligned> {
  const log = o.log ?? console.log;
  const maxNewTokens = o.maxNewTokens ?? 128;
  const input: RunConfigInput = {
    model: { path: o.modelDir },
    data: { prompts: o.promptsFile, evalSize: 4, maxPromptTokens: 256 },
    generation: { samplesPerPrompt: 4, maxNewTokens, maxBatch: 16 },
    // The id is part of the config hash: change it whenever the scorer changes, so a run made
    // with the old scorer is not resumed with the new one.
    preference: { kind: 'function', id: 'house-style-v1' },
    training: { eta: 1000, optimizer: { kind: 'rmsprop', lr: 5e-7 }, batchSize: 2, gradAccumSteps: 2, maxLength: 256 + maxNewTokens },
    run: { dir: o.runDir, iterations: o.iterations ?? 2 },
  };
  const setup = await setupFromConfig(parseConfig(input, { baseDir: process.cwd() }), {
    device: o.device,
    judgeFunction: houseStyle(4 * maxNewTokens),
  });
  let metrics: IterationMetrics[];
  try {
    ({ metrics } = await runSppo(setup, {
      signal: o.signal,
      onMetrics: (m) => log(`π_${m.iteration}: win rate vs π_0 ${m.winRateVsBase.mean.toFixed(3)}`),
    }));
  } finally {
    await setup.model.dispose();
    await setup.preference.dispose();
  }

  const run = RunDir.at(o.runDir);
  const newest = await run.newestPolicy();
  if (newest === undefined) throw new Error(`${o.runDir} holds no finished policy`);
  const policyDir = run.policy(newest);
  const { model, tokenizer } = await loadPretrained(policyDir, { maxBatch: 1, maxSeq: 512 }, { device: o.device });
  try {
    if (!tokenizer) throw new Error(`${policyDir} has no tokenizer`); // checkpoints of a Hugging Face run always carry one
    const prompt = tokenizer.encodeChat([{ role: 'user', content: 'In one sentence: what is a prime number?' }], {
      addGenerationPrompt: true,
    });
    const generator = model.createGenerator({ maxBatch: 1, maxContext: prompt.length + maxNewTokens });
    const [out] = await generator.generate([prompt], { maxNewTokens, temperature: 0, stopTokens: tokenizer.eosTokenIds, seed: 1 });
    await generator.dispose();
    return { metrics, policyDir, answer: tokenizer.decode(Array.from(out.tokens), { skipSpecialTokens: true }) };
  } finally {
    await model.dispose();
  }
}

if (import.meta.url === new URL(`file://${process.argv[1]}`).href) {
  const modelDir = process.argv[2];
  if (!modelDir) {
    console.error('usage: npx tsx examples/embed-in-a-tool.ts MODEL_DIR');
    process.exit(2);
  }
  const here = path.dirname(new URL(import.meta.url).pathname);
  const aligned = await alignWithHouseStyle({ modelDir, promptsFile: path.join(here, 'prompts.jsonl'), runDir: 'runs/house-style' });
  console.log(`policy ${aligned.policyDir}\nanswer: ${aligned.answer}`);
}
