// Builds the native addon at `npm install`: cmake-js (the main build, tests and benchmarks
// included) when CMake is available, else node-gyp over binding.gyp (CPU backend only).
// Both read native/sources.json and use node-api-headers, so nothing is downloaded.
import { spawnSync } from 'node:child_process';
import { createRequire } from 'node:module';
import path from 'node:path';

const require = createRequire(import.meta.url);
const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');

function run(cmd, args) {
  const r = spawnSync(cmd, args, { cwd: root, stdio: 'inherit', shell: false });
  return r.status === 0;
}

const hasCmake = spawnSync('cmake', ['--version'], { stdio: 'ignore' }).status === 0;
const extra = process.env.SPPO_CUDA ? [`--CDSPPO_CUDA=${process.env.SPPO_CUDA}`] : [];
if (hasCmake) {
  const cmakeJs = require.resolve('cmake-js/bin/cmake-js');
  const jobs = String(Math.max(1, (await import('node:os')).availableParallelism()));
  if (run(process.execPath, [cmakeJs, 'compile', '--parallel', jobs, ...extra])) process.exit(0);
  console.error('sppo-engine: cmake-js build failed; trying node-gyp (CPU backend only)');
} else {
  console.error('sppo-engine: cmake not found; building with node-gyp (CPU backend only, no C++ tests)');
}
const nodeGyp = require.resolve('node-gyp/bin/node-gyp.js');
process.exit(run(process.execPath, [nodeGyp, 'rebuild']) ? 0 : 1);
