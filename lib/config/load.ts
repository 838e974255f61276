// Loading (YAML or JSON), error messages that name the field, a stable hash of the resolved
// config, and a field-by-field diff (so resuming with a changed config can say what changed).
import { createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { dirname, extname, isAbsolute, resolve } from 'node:path';
import { parse as parseYaml, YAMLParseError } from 'yaml';
import type { z } from 'zod';
import { formatFieldPath, type FieldPath } from './errors.js';
import { runConfigSchema, type RunConfig } from './schema.js';

/** One problem of a config the schema refuses: the field, and what is wrong with it. */
export interface ConfigIssue {
  path: FieldPath;
  /** the line printed for it: `training.eta: must be > 0` */
  line: string;
}

export class RunConfigError extends Error {
  /** one line per problem: `training.eta: must be > 0` */
  readonly problems: string[];
  /** the same problems with their fields */
  readonly issues: readonly ConfigIssue[];
  constructor(source: string, issues: readonly ConfigIssue[]) {
    const problems = issues.map((i) => i.line);
    super(`${source}: invalid configuration:\n  ${problems.join('\n  ')}`);
    this.name = 'RunConfigError';
    this.problems = problems;
    this.issues = issues;
  }
}

function configIssues(issue: z.core.$ZodIssue): ConfigIssue[] {
  const path = issue.path.filter((p): p is string | number => typeof p !== 'symbol');
  const at = formatFieldPath(path);
  const one = (text: string): ConfigIssue[] => [{ path, line: `${at}: ${text}` }];
  if (issue.code === 'unrecognized_keys')
    return issue.keys.map((k) => ({ path: [...path, k], line: `${formatFieldPath([...path, k])}: unknown field` }));
  if (issue.code === 'invalid_type' && issue.message.startsWith('Invalid input'))
    return one(issue.input === undefined ? 'required' : `expected ${issue.expected}`);
  if (issue.code === 'invalid_value' && issue.message.startsWith('Invalid option'))
    return one(`must be one of ${issue.values.map((v) => JSON.stringify(v)).join(', ')}`);
  // a message that opens with its own field (`model.preset 'tiny' has …`) reads better without the prefix
  if (issue.message.startsWith(`${at} `)) return [{ path, line: issue.message }];
  return one(issue.message);
}

export interface ParseConfigOptions {
  /** relative paths (model.path, data.prompts, run.dir, preference.module, preference.path) resolve against this */
  baseDir?: string;
  /** named in errors; default 'config' */
  source?: string;
}

/** Validates a parsed config object and fills in every default. */
export function parseConfig(raw: unknown, options: ParseConfigOptions = {}): RunConfig {
  const source = options.source ?? 'config';
  const result = runConfigSchema.safeParse(raw, { reportInput: true });
  if (!result.success) throw new RunConfigError(source, result.error.issues.flatMap(configIssues));
  const config = result.data;
  const { baseDir } = options;
  if (baseDir !== undefined) {
    const abs = (p: string): string => (isAbsolute(p) ? p : resolve(baseDir, p));
    if (config.model.path !== undefined) config.model.path = abs(config.model.path);
    if (config.data.prompts !== undefined) config.data.prompts = abs(config.data.prompts);
    const pref = config.preference;
    if (pref.kind === 'function' && pref.module !== undefined) pref.module = abs(pref.module);
    if ((pref.kind === 'http' || pref.kind === 'pairwise-http') && pref.cacheDir !== undefined) pref.cacheDir = abs(pref.cacheDir);
    if (pref.kind === 'lm-judge' || pref.kind === 'reward-model' || pref.kind === 'pairrm') pref.path = abs(pref.path);
    config.run.dir = abs(config.run.dir);
  }
  return config;
}

/** Reads a .yaml / .yml / .json config; relative paths in it resolve against its folder. */
export async function loadConfig(file: string): Promise<RunConfig> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (err) {
    throw new Error(`cannot read the config ${file}: ${(err as Error).message}`, { cause: err });
  }
  const ext = extname(file).toLowerCase();
  let raw: unknown;
  try {
    if (ext === '.json') raw = JSON.parse(text);
    else if (ext === '.yaml' || ext === '.yml') raw = parseYaml(text, { uniqueKeys: true });
    else throw new RangeError(`${file}: a config must be .yaml, .yml or .json, got '${ext || 'no extension'}'`);
  } catch (err) {
    if (err instanceof RangeError) throw err;
    const at = err instanceof YAMLParseError && err.linePos ? ` at line ${err.linePos[0].line}, column ${err.linePos[0].col}` : '';
    throw new SyntaxError(`${file}: not valid ${ext === '.json' ? 'JSON' : 'YAML'}${at}: ${(err as Error).message}`, { cause: err });
  }
  return parseConfig(raw, { baseDir: dirname(resolve(file)), source: file });
}

/** Canonical JSON: keys sorted at every level, undefined fields left out. */
export function canonicalJson(value: unknown): string {
  if (value === null || typeof value !== 'object') return JSON.stringify(value);
  if (Array.isArray(value)) return `[${value.map(canonicalJson).join(',')}]`;
  const entries = Object.entries(value as Record<string, unknown>)
    .filter(([, v]) => v !== undefined)
    .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
  return `{${entries.map(([k, v]) => `${JSON.stringify(k)}:${canonicalJson(v)}`).join(',')}}`;
}

/** sha256 (hex) of the resolved config's canonical JSON: equal configs hash equal, whatever the key order. */
export function configHash(config: RunConfig): string {
  return createHash('sha256').update(canonicalJson(config)).digest('hex');
}

export interface ConfigChange {
  /** `training.eta`, `preference.A[0][1]` */
  path: string;
  before: unknown;
  after: unknown;
}

/** Every leaf field that differs between two resolved configs (added or removed fields included). */
export function diffConfigs(before: RunConfig, after: RunConfig): ConfigChange[] {
  const changes: ConfigChange[] = [];
  const walk = (a: unknown, b: unknown, path: PropertyKey[]): void => {
    const isObj = (v: unknown): v is Record<string, unknown> => v !== null && typeof v === 'object' && !Array.isArray(v);
    if (isObj(a) && isObj(b)) {
      const keys = [...new Set([...Object.keys(a), ...Object.keys(b)])].sort();
      for (const k of keys) walk(a[k], b[k], [...path, k]);
    } else if (Array.isArray(a) && Array.isArray(b) && a.length === b.length) {
      a.forEach((v, i) => walk(v, b[i], [...path, i]));
    } else if (canonicalJson(a) !== canonicalJson(b)) {
      changes.push({ path: formatFieldPath(path), before: a, after: b });
    }
  };
  walk(before, after, []);
  return changes;
}
