// Builds the native addon at `npm install`: cmake-js (the main build, tests and benchmarks
// included) when cmake-js and CMake >= 3.19 are available, else node-gyp over binding.gyp (CPU
// backend only). Both read native/sources.json and build offline: cmake-js against the
// node-api-headers package, node-gyp against node's own headers or, failing those, that package.
// A failed attempt never cleans build/: the last working addon and the incremental state stay.
import { spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, readdirSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { availableParallelism } from 'node:os';
import path from 'node:path';

const require = createRequire(import.meta.url);
const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');
const jobs = String(Math.max(1, availableParallelism()));

function run(cmd, args) {
  const r = spawnSync(cmd, args, { cwd: root, stdio: 'inherit', shell: false });
  return r.status === 0;
}

function resolve(id) {
  try {
    return require.resolve(id, { paths: [root] });
  } catch {
    return undefined;
  }
}

// Why CMake cannot drive the build here, or undefined when it can (CMakeLists.txt needs 3.19).
function cmakeUnusable() {
  const r = spawnSync('cmake', ['--version'], { encoding: 'utf8' });
  if (r.status !== 0) return 'cmake not found';
  const [major, minor] = (/version (\d+)\.(\d+)/.exec(r.stdout) ?? []).slice(1).map(Number);
  if (!(major > 3 || (major === 3 && minor >= 19))) return `cmake ${major}.${minor} is older than 3.19`;
  return undefined;
}

// node-gyp's --nodedir: node's own headers when installed beside it, else a directory laid out
// as node-gyp expects around the node-api-headers package (Node-API needs nothing else).
// Undefined when neither exists: node-gyp then uses its cache (or downloads the headers).
function nodeHeadersDir() {
  const prefix = path.resolve(path.dirname(process.execPath), '..');
  const own = path.join(prefix, 'include', 'node');
  if (existsSync(path.join(own, 'node_api.h')) && existsSync(path.join(own, 'common.gypi'))) return prefix;
  const pkg = resolve('node-api-headers/package.json');
  if (!pkg) return undefined;
  const dir = path.join(root, 'build', 'node-api-nodedir');
  const include = path.join(dir, 'include', 'node');
  mkdirSync(include, { recursive: true });
  const headers = path.join(path.dirname(pkg), 'include');
  for (const h of readdirSync(headers)) copyFileSync(path.join(headers, h), path.join(include, h));
  const common = {
    target_defaults: {
      default_configuration: 'Release',
      configurations: { Release: {}, Debug: {} },
      cflags: ['-pthread'],
      ldflags: ['-pthread'],
    },
  };
  writeFileSync(path.join(include, 'common.gypi'), JSON.stringify(common, null, 2));
  return dir;
}

const cmakeJs = resolve('cmake-js/bin/cmake-js');
const whyNotCmake = cmakeJs ? cmakeUnusable() : 'cmake-js is not installed';
if (!whyNotCmake) {
  // configure every time, so SPPO_CUDA (default AUTO) applies to an existing build/ as well;
  // `build`, not `compile`: compile answers a failed build with a clean rebuild.
  const cuda = `--CDSPPO_CUDA=${process.env.SPPO_CUDA || 'AUTO'}`;
  const ok = run(process.execPath, [cmakeJs, 'configure', cuda]) && run(process.execPath, [cmakeJs, 'build', '--parallel', jobs]);
  process.exit(ok ? 0 : 1);
}

console.error(`sppo-engine: ${whyNotCmake}; building with node-gyp (CPU backend only, no C++ tests)`);
const nodeGyp = resolve('node-gyp/bin/node-gyp.js');
if (!nodeGyp) {
  console.error('sppo-engine: node-gyp is not installed either; install CMake >= 3.19 or node-gyp');
  process.exit(1);
}
const nodedir = nodeHeadersDir();
// configure + build, not rebuild: rebuild starts by deleting build/.
const ok =
  run(process.execPath, [nodeGyp, 'configure', ...(nodedir ? [`--nodedir=${nodedir}`] : [])]) &&
  run(process.execPath, [nodeGyp, 'build', `--jobs=${jobs}`]);
process.exit(ok ? 0 : 1);
