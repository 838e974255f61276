// lib/config and the judges' options schemas (lib/preference/options) are leaves: following their
// import statements (type-only ones included) never reaches a pipeline module — the engine and
// its addon, io, the judges, sppo, the CLI, the demo, the report — so the configuration can be
// loaded, validated and documented without any of them. The checker itself is shown to fail on
// modules that do reach the pipeline.
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';

const root = path.resolve(new URL('..', import.meta.url).pathname);
const LEAF_DIRS = ['lib/config/', 'lib/preference/options/'];
/** Constants modules elsewhere that a leaf may read; each must import nothing itself. */
const LEAF_CONSTANTS = ['lib/engine/losses.ts', 'lib/engine/lora.ts'];
/** Packages a leaf must not load (the native addon's loader). */
const PIPELINE_PACKAGES = ['bindings'];

/** Every module specifier in a TypeScript source: static imports and re-exports (type-only too), side-effect and dynamic imports. */
function importSpecifiers(source: string): string[] {
  const code = source.replace(/\/\*[\s\S]*?\*\//g, '').replace(/^\s*\/\/.*$/gm, '');
  const found: string[] = [];
  const patterns = [
    /\b(?:import|export)\s+(?:type\s+)?[^'";]*?\bfrom\s*['"]([^'"]+)['"]/g,
    /\bimport\s*['"]([^'"]+)['"]/g,
    /\bimport\s*\(\s*['"]([^'"]+)['"]\s*\)/g,
  ];
  for (const re of patterns) for (const m of code.matchAll(re)) found.push(m[1]);
  return found;
}

/** The repository-relative .ts file a relative specifier names ('./x.js' → x.ts). */
function resolveModule(from: string, spec: string): string {
  const abs = path.resolve(root, path.dirname(from), spec);
  const ts = abs.replace(/\.js$/, '.ts');
  const file = existsSync(ts) ? ts : existsSync(`${abs}.ts`) ? `${abs}.ts` : path.join(abs, 'index.ts');
  return path.relative(root, file).split(path.sep).join('/');
}

const isLeaf = (file: string): boolean => LEAF_DIRS.some((d) => file.startsWith(d)) || LEAF_CONSTANTS.includes(file);

/** Each module outside the leaves that `roots` reach, with the import chain that reaches it. */
function pipelineReached(roots: readonly string[]): string[] {
  const problems: string[] = [];
  const seen = new Set<string>();
  const walk = (file: string, chain: string[]): void => {
    if (seen.has(file)) return;
    seen.add(file);
    for (const spec of importSpecifiers(readFileSync(path.join(root, file), 'utf8'))) {
      if (!spec.startsWith('.')) {
        if (PIPELINE_PACKAGES.includes(spec)) problems.push(`${[...chain, file].join(' → ')} → ${spec}`);
        continue;
      }
      const target = resolveModule(file, spec);
      if (!isLeaf(target)) problems.push(`${[...chain, file].join(' → ')} → ${target}`);
      else walk(target, [...chain, file]);
    }
  };
  for (const r of roots) walk(r, []);
  return problems;
}

const tsFiles = (dir: string): string[] =>
  readdirSync(path.join(root, dir))
    .filter((f) => f.endsWith('.ts'))
    .map((f) => `${dir}${f}`);

describe('import graph', () => {
  it('reads every kind of import statement', () => {
    const src = [
      "import { z } from 'zod';",
      "import type { Model } from '../engine/model.js';",
      'import {\n  a,\n  type B,\n} from "./multi-line.js";',
      "export * from './re-export.js';",
      "export { x } from './named.js';",
      "import './side-effect.js';",
      "const m = await import('./dynamic.js');",
      "// import { gone } from './commented.js';",
      "/* import { gone } from './block-commented.js'; */",
      "const s = 'not an import from here';",
    ].join('\n');
    expect(importSpecifiers(src).sort()).toEqual(
      ['../engine/model.js', './dynamic.js', './multi-line.js', './named.js', './re-export.js', './side-effect.js', 'zod'].sort(),
    );
  });

  it('the checker fails on modules that reach the pipeline', () => {
    expect(pipelineReached(['lib/preference/http-transport.ts'])).toContain('lib/preference/http-transport.ts → lib/util/abort.ts');
    expect(pipelineReached(['lib/sppo/setup.ts']).some((p) => p.endsWith('→ lib/engine/model.ts'))).toBe(true);
  });

  it('lib/config and lib/preference/options reach no pipeline module', () => {
    const roots = [...tsFiles('lib/config/'), ...tsFiles('lib/preference/options/')];
    expect(roots).toContain('lib/config/schema.ts');
    expect(roots).toContain('lib/preference/options/lm-judge.ts');
    expect(pipelineReached(roots)).toEqual([]);
  });

  it('the constants modules a leaf may read import nothing', () => {
    for (const file of LEAF_CONSTANTS) expect(importSpecifiers(readFileSync(path.join(root, file), 'utf8')), file).toEqual([]);
  });
});
