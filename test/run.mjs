// `npm test`: the vitest suite, then the C++ test executable through ctest, then one closing
// line "N passed, N failed" for the whole run (the line CI reads).
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';

const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');
const args = process.argv.slice(2);
let passed = 0;
let failed = 0;

const dir = mkdtempSync(path.join(tmpdir(), 'sppo-test-'));
const report = path.join(dir, 'vitest.json');
const vitest = spawnSync(
  process.execPath,
  [
    path.join(root, 'node_modules/vitest/vitest.mjs'),
    'run',
    '--reporter=default',
    '--reporter=json',
    `--outputFile.json=${report}`,
    ...args,
  ],
  { cwd: root, stdio: 'inherit' },
);
if (existsSync(report)) {
  const r = JSON.parse(readFileSync(report, 'utf8'));
  passed += r.numPassedTests;
  failed += r.numFailedTests;
  // A suite that failed to load has no tests to count: count it as one failure.
  failed += r.testResults.filter((s) => s.status === 'failed' && s.assertionResults.length === 0).length;
} else {
  console.error(`vitest produced no report (exit ${vitest.status})`);
  failed += 1;
}
rmSync(dir, { recursive: true, force: true });

const build = path.join(root, 'build');
if (args.length > 0) {
  // A filtered run (npm test -- some.test.ts) is a vitest run only.
} else if (existsSync(path.join(build, 'CTestTestfile.cmake'))) {
  const ctest = spawnSync('ctest', ['--test-dir', build, '-V'], { cwd: root, encoding: 'utf8' });
  process.stdout.write(ctest.stdout ?? '');
  process.stderr.write(ctest.stderr ?? '');
  const m = /(\d+) passed, (\d+) failed/.exec(ctest.stdout ?? '');
  if (m) {
    passed += Number(m[1]);
    failed += Number(m[2]);
  } else {
    console.error(`C++ tests did not report a summary (ctest exit ${ctest.status})`);
    failed += 1;
  }
} else {
  console.log('C++ tests skipped: the addon was built by node-gyp (no CMake build directory).');
}

console.log(`${passed} passed, ${failed} failed`);
process.exit(failed > 0 || vitest.status !== 0 ? 1 : 0);
