// The commands' handling of run directories and output paths: an empty path is refused rather
// than resolved to the working directory, `sppo generate` never writes its output over its
// prompt file, and `sppo eval` shows a finished run from a read-only copy (the table printed,
// the report left as it is, nothing written), as another user when the tests run as root, since
// root writes through permissions.
import { spawnSync } from 'node:child_process';
import { chmodSync, cpSync, existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { PassThrough } from 'node:stream';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { main } from '../lib/cli/cli.js';
import { parseConfig } from '../lib/config/load.js';
import { demoConfigInput } from '../lib/demo/demo.js';
import { RunDir } from '../lib/sppo/run-dir.js';

const repo = fileURLToPath(new URL('..', import.meta.url));
const root = mkdtempSync(path.join(tmpdir(), 'sppo-cli-run-dir-'));
chmodSync(root, 0o755);
afterAll(() => {
  spawnSync('chmod', ['-R', 'u+w', root]);
  rmSync(root, { recursive: true, force: true });
});

async function sppo(...argv: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const text = { stdout: '', stderr: '' };
  const stream = (key: keyof typeof text) => new PassThrough().on('data', (d: Buffer) => (text[key] += d.toString()));
  const code = await main(argv, { stdout: stream('stdout'), stderr: stream('stderr') });
  return { code, ...text };
}

describe('empty paths', () => {
  it.each([
    ['demo', '--dir'],
    ['eval', '--run'],
    ['run', '--config'],
  ])('sppo %s %s "" is refused, not taken as the working directory', async (command, flag) => {
    const r = await sppo(command, flag, '');
    expect(r.code, r.stderr).toBe(2);
    expect(r.stderr).toContain(`${flag}: an empty path`);
    expect(existsSync(path.join(process.cwd(), 'run.json'))).toBe(false);
  });
});

describe('sppo generate --out', () => {
  const prompts = path.join(root, 'prompts.jsonl');
  writeFileSync(prompts, '{"prompt": "abc"}\n');

  it.each([
    ['the prompt file', prompts],
    ['the prompt file by another name', path.join(root, '.', 'prompts.jsonl')],
    ['a link to the prompt file', path.join(root, 'link.jsonl')],
  ])('is refused when it is %s', async (_, out) => {
    if (out.endsWith('link.jsonl') && !existsSync(out)) symlinkSync(prompts, out);
    const r = await sppo('generate', '--model', path.join(root, 'no-model'), '--prompts', prompts, '--out', out);
    expect(r.code, r.stderr).toBe(2);
    expect(r.stderr).toContain(`--out is the --prompts file (${prompts}); writing there would replace it`);
    expect(readFileSync(prompts, 'utf8')).toBe('{"prompt": "abc"}\n');
  });

  it('an empty --out is refused', async () => {
    const r = await sppo('generate', '--model', path.join(root, 'no-model'), '--prompts', prompts, '--out', '');
    expect(r.code).toBe(2);
    expect(r.stderr).toContain('--out: an empty path');
  });
});

describe('sppo eval of a read-only copy of a run', () => {
  it('prints the table, says the report was not rewritten, writes nothing and exits 0', async () => {
    const original = path.join(root, 'run');
    const copy = path.join(root, 'read-only');
    const run = await RunDir.open(original, parseConfig(demoConfigInput({ dir: original, iterations: 1, quick: true })));
    for (const [t, mean] of [
      [0, 0.5],
      [1, 0.625],
    ])
      await run.appendMetrics({
        iteration: t,
        winRateVsBase: { mean, low: mean - 0.02, high: mean + 0.02, n: 40 },
        meanResponseLength: 7,
        seconds: {},
      });
    // copied while the run holds its lock: eval takes no lock
    cpSync(original, copy, { recursive: true });
    await run.close();
    expect(readdirSync(copy).sort()).toEqual(['metrics.jsonl', 'run.json', 'run.lock', 'run.log']);
    spawnSync('chmod', ['-R', 'a-w', copy]);

    const asUser = process.getuid?.() === 0 ? { uid: 65534, gid: 65534 } : {};
    const r = spawnSync(process.execPath, ['--import', 'tsx', path.join(repo, 'lib/cli/main.ts'), 'eval', '--run', copy], {
      cwd: repo,
      encoding: 'utf8',
      timeout: 60_000,
      ...asUser,
    });
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/\n\s+1\s+0\.625 ± 0\.020/);
    expect(r.stderr).toContain(`${copy} is not writable (EACCES), so its report (report.html, curves.png, curves.svg) was not rewritten`);
    expect(readdirSync(copy).sort()).toEqual(['metrics.jsonl', 'run.json', 'run.lock', 'run.log']);
  }, 60_000);
});
