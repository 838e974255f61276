// Interop with transformers itself (test/hf_transformers_check.py): small random Llama (llama3
// RoPE), Mistral and Qwen2 (biases, tied) models saved by transformers load into the engine
// with the same logits, and the engine's saves (F32, and BF16 re-read) load back into
// transformers with the same logits and no missing or unexpected tensor.
//
// Skipped, with a message, where /usr/bin/python3 cannot import transformers and torch.
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadPretrained, savePretrained } from '../lib/index.js';

// SPPO_PYTHON: another interpreter (e.g. the GPU machine's, which has transformers).
const PYTHON = process.env.SPPO_PYTHON ?? '/usr/bin/python3';
const SCRIPT = path.join(path.dirname(fileURLToPath(import.meta.url)), 'hf_transformers_check.py');
/** max |logits_engine - logits_transformers| / max |logits_transformers| (fp32 both) */
const TOLERANCE = 1e-4;

const probe = spawnSync(PYTHON, ['-c', 'import torch, transformers, safetensors'], { encoding: 'utf8', timeout: 120_000 });
const HAVE = probe.status === 0;
if (!HAVE) {
  console.warn(
    `io-transformers: SKIPPED — ${PYTHON} cannot import torch, transformers and safetensors ` +
      `(${(probe.stderr || probe.error?.message || 'not found').trim().split('\n').pop()}). ` +
      "Install them to check that transformers and the engine load each other's checkpoints.",
  );
}

function python(args: string[]): string {
  const r = spawnSync(PYTHON, [SCRIPT, ...args], { encoding: 'utf8', timeout: 300_000 });
  if (r.status !== 0 && r.status !== 1) throw new Error(`hf_transformers_check.py ${args[0]} failed (${r.status}):\n${r.stderr}`);
  return r.stdout.trim().split('\n').pop()!;
}

function relativeError(ours: Float32Array, theirs: Float32Array): number {
  let diff = 0;
  let scale = 0;
  for (let i = 0; i < theirs.length; i++) {
    diff = Math.max(diff, Math.abs(ours[i] - theirs[i]));
    scale = Math.max(scale, Math.abs(theirs[i]));
  }
  return diff / scale;
}

describe.skipIf(!HAVE)('transformers ↔ engine', () => {
  const out = mkdtempSync(path.join(tmpdir(), 'sppo-io-hf-'));
  afterAll(() => rmSync(out, { recursive: true, force: true }));
  beforeAll(() => {
    console.log(python(['make', out]));
  });

  for (const name of ['llama', 'mistral', 'qwen2']) {
    it(`${name}: loads transformers' checkpoint with its logits, and saves one transformers loads with ours`, async () => {
      const dir = path.join(out, name);
      const tokens: number[][] = JSON.parse(readFileSync(path.join(dir, 'tokens.json'), 'utf8'));
      const reference = new Float32Array(readFileSync(path.join(dir, 'logits.f32')).buffer.slice(0));
      const { model } = await loadPretrained(path.join(dir, 'model'), { maxBatch: tokens.length, maxSeq: tokens[0].length });
      try {
        const { logits } = await model.forward(tokens);
        expect(logits!.length).toBe(reference.length);
        expect(relativeError(logits!, reference)).toBeLessThan(TOLERANCE);

        for (const dtype of ['float32', 'bfloat16'] as const) {
          const saved = path.join(dir, `engine-${dtype}`);
          await savePretrained(model, saved, { sourceDir: path.join(dir, 'model'), dtype });
          // the BF16 save is compared with the engine's logits on the same rounded weights
          const { model: again } = await loadPretrained(saved, { maxBatch: tokens.length, maxSeq: tokens[0].length });
          const ours = (await again.forward(tokens)).logits!;
          await again.dispose();
          const file = path.join(dir, `engine-${dtype}.f32`);
          writeFileSync(file, ours);
          const verdict = JSON.parse(python(['check', saved, path.join(dir, 'tokens.json'), file]));
          expect(verdict, JSON.stringify(verdict)).toMatchObject({ ok: true, loading: {} });
        }
      } finally {
        await model.dispose();
      }
    });
  }
});
