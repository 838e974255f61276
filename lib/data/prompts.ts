// Prompt sets: JSONL (one JSON object per line, e.g. UltraFeedback rows) or Parquet, reading one
// string column ('prompt' by default); then a seeded shuffle and split into one disjoint part per
// SPPO iteration (as the reference splits UltraFeedback into three) plus a held-out eval set.
import { readFile } from 'node:fs/promises';
import { extname } from 'node:path';
import { asyncBufferFromFile, parquetMetadataAsync, parquetReadObjects, parquetSchema } from 'hyparquet';
import { compressors } from 'hyparquet-compressors';
import { seededShuffle } from './random.js';

export type PromptFormat = 'jsonl' | 'parquet';

export interface PromptSourceOptions {
  /** the column holding the prompt text; default 'prompt' */
  column?: string;
}

export interface LoadPromptsOptions extends PromptSourceOptions {
  /** default: from the extension (.jsonl/.ndjson/.json → jsonl, .parquet → parquet) */
  format?: PromptFormat;
}

/** Malformed lines are listed (up to this many) in one error, so a file can be fixed in one pass. */
const MAX_REPORTED = 5;

export function promptFormatOf(path: string): PromptFormat {
  const ext = extname(path).toLowerCase();
  if (ext === '.jsonl' || ext === '.ndjson' || ext === '.json') return 'jsonl';
  if (ext === '.parquet') return 'parquet';
  throw new RangeError(
    `${path}: cannot tell the prompt file's format from '${ext || 'no extension'}' (use .jsonl or .parquet, or pass format)`,
  );
}

/** Reads the prompts of a JSONL or Parquet file, in file order. */
export async function loadPrompts(path: string, options: LoadPromptsOptions = {}): Promise<string[]> {
  const format = options.format ?? promptFormatOf(path);
  if (format === 'parquet') return readParquetPrompts(path, options);
  if (format !== 'jsonl') throw new RangeError(`unknown prompt format ${JSON.stringify(format)} (known: jsonl, parquet)`);
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    throw new Error(`cannot read the prompt file ${path}: ${(err as Error).message}`, { cause: err });
  }
  return parsePromptsJsonl(text, { ...options, source: path });
}

function typeName(v: unknown): string {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'an array';
  return typeof v === 'object' ? 'an object' : `a ${typeof v}`;
}

function fieldList(row: object): string {
  const keys = Object.keys(row);
  return keys.length ? keys.join(', ') : 'none';
}

/**
 * Prompts from JSON Lines text: one object per non-blank line with a string `column` field
 * (other fields are ignored). A `.json` file holding one JSON array of such objects is read too
 * (line numbers are then array indices).
 */
export function parsePromptsJsonl(text: string, options: PromptSourceOptions & { source?: string } = {}): string[] {
  const column = options.column ?? 'prompt';
  const source = options.source ?? 'prompts';
  const body = text.charCodeAt(0) === 0xfeff ? text.slice(1) : text;
  let rows: { line: number; where: string; value: unknown; error?: string }[];
  if (body.trimStart().startsWith('[')) {
    let array: unknown;
    try {
      array = JSON.parse(body);
    } catch (err) {
      throw new SyntaxError(`${source}: not valid JSON: ${(err as Error).message}`);
    }
    rows = (array as unknown[]).map((value, i) => ({ line: i, where: `row ${i}`, value }));
  } else {
    rows = [];
    body.split('\n').forEach((raw, i) => {
      const line = raw.endsWith('\r') ? raw.slice(0, -1) : raw;
      if (line.trim() === '') return;
      try {
        rows.push({ line: i + 1, where: `line ${i + 1}`, value: JSON.parse(line) });
      } catch (err) {
        rows.push({ line: i + 1, where: `line ${i + 1}`, value: undefined, error: `not valid JSON (${(err as Error).message})` });
      }
    });
  }
  const problems: string[] = [];
  const prompts: string[] = [];
  for (const row of rows) {
    let problem = row.error;
    const v = row.value;
    if (!problem) {
      if (v === null || typeof v !== 'object' || Array.isArray(v)) problem = `expected a JSON object, got ${typeName(v)}`;
      else if (!(column in v)) problem = `no '${column}' field (fields: ${fieldList(v)})`;
      else {
        const p = (v as Record<string, unknown>)[column];
        if (typeof p !== 'string') problem = `'${column}' is ${typeName(p)}, expected a string`;
        else if (p.trim() === '') problem = `'${column}' is empty`;
        else prompts.push(p);
      }
    }
    if (problem) problems.push(`${row.where}: ${problem}`);
  }
  if (problems.length) {
    const more = problems.length > MAX_REPORTED ? `\n  … and ${problems.length - MAX_REPORTED} more` : '';
    throw new SyntaxError(`${source}: ${problems.length} bad row(s):\n  ${problems.slice(0, MAX_REPORTED).join('\n  ')}${more}`);
  }
  if (prompts.length === 0) throw new RangeError(`${source}: no prompts (the file has no rows)`);
  return prompts;
}

/** Prompts from a Parquet file's string column (only that column is read and decompressed). */
export async function readParquetPrompts(path: string, options: PromptSourceOptions = {}): Promise<string[]> {
  const column = options.column ?? 'prompt';
  let file;
  let metadata;
  try {
    file = await asyncBufferFromFile(path);
    metadata = await parquetMetadataAsync(file);
  } catch (err) {
    throw new Error(`${path}: cannot read as Parquet: ${(err as Error).message}`, { cause: err });
  }
  const fields = parquetSchema(metadata).children;
  const field = fields.find((f) => f.element.name === column);
  if (!field) throw new RangeError(`${path}: no '${column}' column (columns: ${fields.map((f) => f.element.name).join(', ') || 'none'})`);
  const el = field.element;
  if (field.children.length > 0 || el.repetition_type === 'REPEATED')
    throw new TypeError(`${path}: column '${column}' is nested (a list or struct), expected a string column`);
  if (el.type !== 'BYTE_ARRAY') throw new TypeError(`${path}: column '${column}' holds ${el.type} values, expected strings`);
  const rows = await parquetReadObjects({ file, metadata, columns: [column], compressors, rowFormat: 'object' });
  const decoder = new TextDecoder('utf-8', { fatal: true });
  const problems: string[] = [];
  const prompts: string[] = [];
  rows.forEach((row, i) => {
    let p: unknown = row[column];
    if (p instanceof Uint8Array) {
      try {
        p = decoder.decode(p);
      } catch {
        problems.push(`row ${i}: '${column}' is not valid UTF-8`);
        return;
      }
    }
    if (p === null || p === undefined) problems.push(`row ${i}: '${column}' is null`);
    else if (typeof p !== 'string') problems.push(`row ${i}: '${column}' is ${typeName(p)}, expected a string`);
    else if (p.trim() === '') problems.push(`row ${i}: '${column}' is empty`);
    else prompts.push(p);
  });
  if (problems.length) {
    const more = problems.length > MAX_REPORTED ? `\n  … and ${problems.length - MAX_REPORTED} more` : '';
    throw new RangeError(`${path}: ${problems.length} bad row(s):\n  ${problems.slice(0, MAX_REPORTED).join('\n  ')}${more}`);
  }
  if (prompts.length === 0) throw new RangeError(`${path}: no prompts (the file has no rows)`);
  return prompts;
}

export interface SplitOptions {
  /** T: one disjoint part per SPPO iteration */
  iterations: number;
  /** prompts held out for evaluation (taken first from the shuffle, so they do not depend on T) */
  evalSize: number;
  seed: number;
  /** prompts per iteration; default: the rest split as evenly as possible (earlier parts get the extra one) */
  promptsPerIteration?: number;
}

export interface PromptSplit<T> {
  /** iterations[t]: the prompts of iteration t+1 */
  iterations: T[][];
  evaluation: T[];
}

/** A seeded shuffle, the first `evalSize` held out, then T disjoint iteration parts. */
export function splitPrompts<T>(prompts: readonly T[], options: SplitOptions): PromptSplit<T> {
  const { iterations: T, evalSize, seed } = options;
  const n = prompts.length;
  if (n === 0) throw new RangeError('the prompt set is empty');
  if (!Number.isInteger(T) || T < 1) throw new RangeError(`iterations must be an integer ≥ 1, got ${T}`);
  if (!Number.isInteger(evalSize) || evalSize < 0) throw new RangeError(`evalSize must be an integer ≥ 0, got ${evalSize}`);
  const rest = n - evalSize;
  if (rest < T) throw new RangeError(`${n} prompts cannot give ${evalSize} for evaluation and at least one to each of ${T} iterations`);
  const per = options.promptsPerIteration;
  if (per !== undefined) {
    if (!Number.isInteger(per) || per < 1) throw new RangeError(`promptsPerIteration must be an integer ≥ 1, got ${per}`);
    if (per * T > rest)
      throw new RangeError(
        `${T} iterations × ${per} prompts need ${per * T}, but only ${rest} remain after ${evalSize} for evaluation (of ${n})`,
      );
  }
  const shuffled = seededShuffle(prompts, seed);
  const evaluation = shuffled.slice(0, evalSize);
  const parts: T[][] = [];
  let at = evalSize;
  for (let t = 0; t < T; t++) {
    const size = per ?? Math.floor(rest / T) + (t < rest % T ? 1 : 0);
    parts.push(shuffled.slice(at, at + size));
    at += size;
  }
  return { iterations: parts, evaluation };
}
