// A run configuration's judge (its `preference` section) as a PreferenceModel. What the schema
// cannot check — a module to import, an environment variable, a judge model directory — fails
// here as a SetupError naming the field to change.
import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { SetupError } from '../config/errors.js';
import type { PreferenceConfig } from '../config/schema.js';
import type { Device } from '../engine/model.js';
import { functionPreference, type PreferenceFunction } from './function.js';
import { httpJudge } from './http.js';
import { loadLmJudge } from './lm-judge.js';
import type { PreferenceModel } from './model.js';
import { pairwiseHttpJudge } from './pairwise-http.js';
import { loadPairRM, PairRMPrecisionError } from './pairrm.js';
import { loadRewardModel } from './reward-model.js';
import { styledReversalOracle } from './styled-reversal.js';

export interface PreferenceFromConfigOptions {
  /** where an engine judge (lm-judge, reward-model) runs; default 'cpu' */
  device?: Device;
  /** the HTTP judge's disk cache when the config gives no cacheDir (a run uses <run.dir>/judge-cache); none: no disk cache */
  judgeCacheDir?: string;
  /** where the HTTP judge's apiKeyEnv is looked up; default process.env */
  env?: Record<string, string | undefined>;
  /** PairRM's source text of a prompt: the prompt after the policy's chat template (a run gives it); default the prompt itself */
  sourceText?: (prompt: string) => string;
  /** a kind 'function' judge given in code (an embedding tool's own scorer) instead of preference.module */
  judgeFunction?: PreferenceFunction;
}

/**
 * The context length of a model directory (config.json's max_position_embeddings), which a
 * memory plan must not exceed; a SetupError naming `field` if the directory has no config.json.
 */
export async function contextLimit(dir: string, field: string): Promise<number> {
  const file = path.join(dir, 'config.json');
  if (!existsSync(file)) throw new SetupError(field.split('.'), `${dir} is not a model directory (no config.json)`);
  const { max_position_embeddings: n } = JSON.parse(await readFile(file, 'utf8')) as { max_position_embeddings?: unknown };
  return typeof n === 'number' ? n : Infinity;
}

/** An engine judge loaded with rows no longer than its model's context; a failure names preference.path. */
async function loadEngineJudge(dir: string, maxSeq: number, load: (maxSeq: number) => Promise<PreferenceModel>): Promise<PreferenceModel> {
  try {
    return await load(Math.min(maxSeq, await contextLimit(dir, 'preference.path')));
  } catch (err) {
    if (err instanceof SetupError) throw err;
    throw new SetupError(['preference', 'path'], (err as Error).message.replace(/^(lm-judge|reward-model): /, ''), { cause: err });
  }
}

async function importFunction(module: string, name: string): Promise<PreferenceFunction> {
  let mod: Record<string, unknown>;
  try {
    mod = (await import(pathToFileURL(module).href)) as Record<string, unknown>; // a module namespace: export name → value
  } catch (err) {
    throw new SetupError(['preference', 'module'], `cannot import ${module}: ${(err as Error).message}`, { cause: err });
  }
  const fn = mod[name];
  if (typeof fn !== 'function')
    throw new SetupError(
      ['preference', 'export'],
      `${module} has no function export '${name}' (exports: ${Object.keys(mod).join(', ') || 'none'})`,
    );
  return fn as PreferenceFunction;
}

/**
 * Where a judge function comes from: code (options.judgeFunction) belongs to a kind 'function'
 * section only, and such a section needs exactly one of code and `module`. Checked without I/O,
 * so setupFromConfig refuses it before reading prompts or weights. Returns the module to import,
 * if the function is not given in code.
 */
export function refuseMisplacedJudgeFunction(
  preference: PreferenceConfig,
  judgeFunction: PreferenceFunction | undefined,
): string | undefined {
  if (preference.kind !== 'function') {
    if (judgeFunction !== undefined)
      throw new SetupError(
        ['preference', 'kind'],
        `a judge function was given in code, so the kind must be 'function', not '${preference.kind}'`,
      );
    return undefined;
  }
  if (preference.module !== undefined && judgeFunction !== undefined)
    throw new SetupError(['preference', 'module'], 'a judge function was also given in code: give one or the other');
  if (preference.module === undefined && judgeFunction === undefined)
    throw new SetupError(
      ['preference', 'module'],
      'required unless the judge function is given in code (a JS module exporting (prompt, a, b) => P(a ≻ b))',
    );
  return preference.module;
}

/** The judge a config's `preference` section describes; engine judges (lm-judge, reward-model, pairrm) load their model on `device`. */
export async function preferenceFromConfig(
  preference: PreferenceConfig,
  options: PreferenceFromConfigOptions = {},
): Promise<PreferenceModel> {
  const p = preference;
  const { device } = options;
  const judgeModule = refuseMisplacedJudgeFunction(p, options.judgeFunction);
  switch (p.kind) {
    case 'styled-reversal': {
      const { kind, concurrency, ...params } = p;
      return styledReversalOracle(params);
    }
    case 'function': {
      const fn = judgeModule === undefined ? options.judgeFunction : await importFunction(judgeModule, p.export);
      if (fn === undefined) throw new Error('unreachable: refuseMisplacedJudgeFunction requires a module or a function');
      return functionPreference(fn, {
        id: p.id,
        concurrency: p.concurrency,
        callTimeoutMs: p.callTimeoutMs,
        maxUnusableFraction: p.maxUnusableFraction,
      });
    }
    case 'http':
    case 'pairwise-http': {
      const { cacheDir, ...rest } = p;
      const env = options.env ?? process.env;
      if (rest.apiKeyEnv !== undefined && !env[rest.apiKeyEnv])
        throw new SetupError(['preference', 'apiKeyEnv'], `the environment variable ${rest.apiKeyEnv} (apiKeyEnv) is not set`);
      const given = { ...rest, env, cacheDir: cacheDir ?? options.judgeCacheDir };
      try {
        return given.kind === 'http' ? httpJudge(given) : pairwiseHttpJudge(given);
      } catch (err) {
        throw new SetupError(['preference'], (err as Error).message.replace(/^(httpJudge|pairwiseHttpJudge): /, ''), { cause: err });
      }
    }
    case 'lm-judge': {
      const { kind, path: dir, ...rest } = p;
      return loadEngineJudge(dir, rest.maxSeq, (maxSeq) => loadLmJudge(dir, { ...rest, device, maxSeq }));
    }
    case 'reward-model': {
      const { kind, path: dir, ...rest } = p;
      return loadEngineJudge(dir, rest.maxSeq, (maxSeq) => loadRewardModel(dir, { ...rest, device, maxSeq }));
    }
    case 'pairrm': {
      const { kind, path: dir, ...rest } = p;
      try {
        return await loadPairRM(dir, { ...rest, device, sourceText: options.sourceText });
      } catch (err) {
        const field = err instanceof PairRMPrecisionError ? 'precision' : 'path';
        throw new SetupError(['preference', field], (err as Error).message, { cause: err });
      }
    }
  }
}
