// `npm run check:format` (--check) and `npm run format` (--write): Prettier over the TypeScript,
// JavaScript, JSON and Markdown files (.prettierrc.json, .prettierignore), and clang-format over
// every C++/CUDA source under native/ (.clang-format). --check changes nothing: it lists what
// either tool would change and exits 1 if anything would.
import { spawnSync } from 'node:child_process';
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const NATIVE_SOURCE = /\.(c|cc|cpp|h|hpp|cu|cuh)$/;

/** The C++/CUDA sources under native/, relative to the repository root, sorted. */
function nativeSources(): string[] {
  return readdirSync(path.join(root, 'native'), { recursive: true, encoding: 'utf8' })
    .map((file) => path.join('native', file))
    .filter((file) => NATIVE_SOURCE.test(file) && statSync(path.join(root, file)).isFile())
    .sort();
}

function clangFormatBinary(): string {
  // The clang-format npm package ships a binary per platform and knows which one to use.
  const clangFormat = createRequire(import.meta.url)('clang-format') as { getNativeBinary(): string };
  return clangFormat.getNativeBinary();
}

/** Runs clang-format over the native sources; returns the files it changed (--write) or would change (--check). */
function clangFormat(write: boolean): string[] {
  const binary = clangFormatBinary();
  const files = nativeSources();
  if (write) {
    const r = spawnSync(binary, ['--style=file', '-i', ...files], { cwd: root, stdio: 'inherit' });
    if (r.status !== 0) throw new Error(`clang-format -i failed (exit ${r.status})`);
    return files;
  }
  return files.filter((file) => {
    const r = spawnSync(binary, ['--style=file', file], { cwd: root, encoding: 'utf8', maxBuffer: 64 << 20 });
    if (r.status !== 0) throw new Error(`clang-format failed on ${file}: ${r.stderr}`);
    return r.stdout !== readFileSync(path.join(root, file), 'utf8');
  });
}

function prettier(write: boolean): boolean {
  const cli = path.join(root, 'node_modules', 'prettier', 'bin', 'prettier.cjs');
  const r = spawnSync(process.execPath, [cli, write ? '--write' : '--check', '.'], { cwd: root, stdio: 'inherit' });
  return r.status === 0;
}

function main(): void {
  const mode = process.argv[2];
  if (mode !== '--check' && mode !== '--write') {
    console.error('usage: tsx scripts/format.ts --check | --write');
    process.exit(2);
  }
  const write = mode === '--write';
  const prettierOk = prettier(write);
  const unformatted = clangFormat(write);
  if (write) {
    console.log(`clang-format: ${unformatted.length} native sources formatted`);
    process.exit(prettierOk ? 0 : 1);
  }
  for (const file of unformatted) console.log(`[warn] ${file}`);
  if (unformatted.length > 0) console.log(`[warn] clang-format would change ${unformatted.length} native sources. Run npm run format.`);
  else console.log('All native sources use clang-format style!');
  process.exit(prettierOk && unformatted.length === 0 ? 0 : 1);
}

main();
