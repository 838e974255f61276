// The GPU job's planted bugs (bench/gpu/plants/*.patch, built by bench/gpu/pack.sh) must apply to
// the tree as it is: a patch that no longer applies stops the pack, and the check it stands for
// (a CUDA update test that must fail on it) would be gone from the next GPU run. Checked here, on
// every machine, so a change to the CUDA sources that breaks one is seen before the GPU job.
import { execFileSync } from 'node:child_process';
import { readdirSync } from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';

const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');
const dir = path.join(root, 'bench', 'gpu', 'plants');
const patches = readdirSync(dir).filter((f) => f.endsWith('.patch'));

describe('the GPU job planted bugs', () => {
  it('are there', () => {
    expect(patches.length).toBeGreaterThanOrEqual(6);
  });
  for (const patch of patches)
    it(`${patch} applies to the tree`, () => {
      // throws (with git's message naming the hunk) when it does not
      execFileSync('git', ['apply', '--check', path.join(dir, patch)], { cwd: root, stdio: 'pipe' });
    });
});
