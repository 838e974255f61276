// Prompt sets: JSONL (one JSON object per line, e.g. UltraFeedback rows) or Parquet, reading one
// string column ('prompt' by default); then a seeded shuffle and split into one disjoint part per
// SPPO iteration (as the reference splits UltraFeedback into three) plus a held-out eval set.
// A JSONL file is streamed line by line, so a runaway line is refused once it passes the limit
// instead of being read whole; a Parquet file is read one row group at a time.
import { createReadStream } from 'node:fs';
import { open, readFile, stat } from 'node:fs/promises';
import { extname } from 'node:path';
import { asyncBufferFromFile, parquetMetadataAsync, parquetReadObjects, parquetSchema, type FileMetaData } from 'hyparquet';
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

/**
 * The longest prompt read, in bytes of UTF-8: a JSONL line or a Parquet cell. 4 MiB is about a
 * million tokens, more than any model's context, so a longer one is a damaged or wrong file
 * rather than a prompt; refusing it while streaming keeps memory bounded whatever the file holds.
 */
export const MAX_PROMPT_BYTES = 4 * 1024 * 1024;

/** A .json file holding one array is parsed whole, so it may be at most this large (JSONL streams, without a limit). */
export const MAX_JSON_ARRAY_BYTES = 64 * 1024 * 1024;

/** Malformed lines are listed (up to this many) in one error, so a file can be fixed in one pass. */
const MAX_REPORTED = 5;

const MIB = 1024 * 1024;

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
  try {
    if (!(await startsWithArray(path))) return await streamJsonlPrompts(path, options);
    const { size } = await stat(path);
    if (size > MAX_JSON_ARRAY_BYTES)
      throw new RangeError(
        `${path}: a JSON array of ${(size / MIB).toFixed(1)} MiB is over the ${MAX_JSON_ARRAY_BYTES / MIB} MiB read whole; write it as JSON Lines (one object per line), which is streamed`,
      );
    return parsePromptsJsonl(await readFile(path, 'utf8'), { ...options, source: path });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === undefined) throw err;
    throw new Error(`cannot read the prompt file ${path}: ${(err as Error).message}`, { cause: err });
  }
}

/** Whether the file's first character after a BOM and whitespace is '[' (a .json array of rows). */
async function startsWithArray(path: string): Promise<boolean> {
  const file = await open(path, 'r');
  try {
    const { buffer, bytesRead } = await file.read(Buffer.alloc(64 * 1024), 0, 64 * 1024, 0);
    const head = buffer.subarray(0, bytesRead).toString('utf8');
    return head
      .replace(/^\ufeff/, '')
      .trimStart()
      .startsWith('[');
  } finally {
    await file.close();
  }
}

function lineTooLong(source: string, line: number): RangeError {
  return new RangeError(
    `${source}: line ${line} is longer than ${MAX_PROMPT_BYTES / MIB} MiB (${MAX_PROMPT_BYTES} bytes), the most a prompt line may hold (more than any model's context: a damaged file?)`,
  );
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

/** Prompts gathered row by row, with every bad row's problem, so that one error lists them all. */
class PromptRows {
  readonly prompts: string[] = [];
  readonly #problems: string[] = [];
  constructor(readonly column: string) {}

  /** A parsed JSON row (`where`: "line 3", "row 3"). */
  value(where: string, v: unknown): void {
    const { column } = this;
    if (v === null || typeof v !== 'object' || Array.isArray(v)) this.problem(where, `expected a JSON object, got ${typeName(v)}`);
    else if (!(column in v)) this.problem(where, `no '${column}' field (fields: ${fieldList(v)})`);
    else this.cell(where, (v as Record<string, unknown>)[column]);
  }

  /** A JSON Lines line without its newline (and carriage return). */
  line(n: number, text: string): void {
    if (text.trim() === '') return;
    let v: unknown;
    try {
      v = JSON.parse(text);
    } catch (err) {
      this.problem(`line ${n}`, `not valid JSON (${(err as Error).message})`);
      return;
    }
    this.value(`line ${n}`, v);
  }

  /** The prompt column's value of a row. */
  cell(where: string, p: unknown): void {
    const { column } = this;
    if (p === null || p === undefined) this.problem(where, `'${column}' is null`);
    else if (typeof p !== 'string') this.problem(where, `'${column}' is ${typeName(p)}, expected a string`);
    else if (p.trim() === '') this.problem(where, `'${column}' is empty`);
    // a UTF-8 character takes at most 3 bytes per UTF-16 unit
    else if (p.length > MAX_PROMPT_BYTES / 3 && Buffer.byteLength(p) > MAX_PROMPT_BYTES) this.tooLarge(where, Buffer.byteLength(p));
    else this.prompts.push(p);
  }

  tooLarge(where: string, bytes: number): void {
    this.problem(
      where,
      `'${this.column}' is ${bytes} bytes, over the ${MAX_PROMPT_BYTES / MIB} MiB (${MAX_PROMPT_BYTES} bytes) a prompt may hold`,
    );
  }

  problem(where: string, problem: string): void {
    this.#problems.push(`${where}: ${problem}`);
  }

  /** The prompts, or an error listing the bad rows; an empty set is refused. */
  result(source: string, ErrorClass: new (message: string) => Error): string[] {
    const problems = this.#problems;
    if (problems.length) {
      const more = problems.length > MAX_REPORTED ? `\n  … and ${problems.length - MAX_REPORTED} more` : '';
      throw new ErrorClass(`${source}: ${problems.length} bad row(s):\n  ${problems.slice(0, MAX_REPORTED).join('\n  ')}${more}`);
    }
    if (this.prompts.length === 0) throw new RangeError(`${source}: no prompts (the file has no rows)`);
    return this.prompts;
  }
}

/** A JSON Lines file read as a stream: no line longer than MAX_PROMPT_BYTES is ever held. */
async function streamJsonlPrompts(path: string, options: PromptSourceOptions): Promise<string[]> {
  const rows = new PromptRows(options.column ?? 'prompt');
  const stream = createReadStream(path, { highWaterMark: 1024 * 1024 });
  let pieces: Buffer[] = [];
  let bytes = 0;
  let line = 1;
  const finishLine = () => {
    let text = Buffer.concat(pieces).toString('utf8');
    if (line === 1 && text.charCodeAt(0) === 0xfeff) text = text.slice(1);
    rows.line(line, text.endsWith('\r') ? text.slice(0, -1) : text);
    pieces = [];
    bytes = 0;
  };
  try {
    for await (const chunk of stream as AsyncIterable<Buffer>) {
      for (let start = 0; ;) {
        const nl = chunk.indexOf(10, start);
        const end = nl < 0 ? chunk.length : nl;
        bytes += end - start;
        if (bytes > MAX_PROMPT_BYTES) throw lineTooLong(path, line);
        pieces.push(chunk.subarray(start, end));
        if (nl < 0) break;
        finishLine();
        line++;
        start = nl + 1;
      }
    }
  } finally {
    stream.destroy();
  }
  if (bytes > 0) finishLine();
  return rows.result(path, SyntaxError);
}

/**
 * Prompts from JSON Lines text: one object per non-blank line with a string `column` field
 * (other fields are ignored). A `.json` file holding one JSON array of such objects is read too
 * (line numbers are then array indices). Lines over MAX_PROMPT_BYTES are refused, as loadPrompts does.
 */
export function parsePromptsJsonl(text: string, options: PromptSourceOptions & { source?: string } = {}): string[] {
  const rows = new PromptRows(options.column ?? 'prompt');
  const source = options.source ?? 'prompts';
  const body = text.charCodeAt(0) === 0xfeff ? text.slice(1) : text;
  if (body.trimStart().startsWith('[')) {
    let array: unknown;
    try {
      array = JSON.parse(body);
    } catch (err) {
      throw new SyntaxError(`${source}: not valid JSON: ${(err as Error).message}`);
    }
    if (!Array.isArray(array)) throw new SyntaxError(`${source}: expected one JSON array of rows`);
    array.forEach((value, i) => {
      rows.value(`row ${i}`, value);
    });
  } else {
    body.split('\n').forEach((raw, i) => {
      if (raw.length > MAX_PROMPT_BYTES / 3 && Buffer.byteLength(raw) > MAX_PROMPT_BYTES) throw lineTooLong(source, i + 1);
      rows.line(i + 1, raw.endsWith('\r') ? raw.slice(0, -1) : raw);
    });
  }
  return rows.result(source, SyntaxError);
}

/**
 * Prompts from a Parquet file's string column (only that column is read and decompressed, one
 * row group at a time). A page that cannot be decoded names the file, the column and the rows.
 */
export async function readParquetPrompts(path: string, options: PromptSourceOptions = {}): Promise<string[]> {
  const column = options.column ?? 'prompt';
  let file;
  let metadata: FileMetaData;
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
  const decoder = new TextDecoder('utf-8', { fatal: true });
  const rows = new PromptRows(column);
  let rowStart = 0;
  for (const [g, group] of metadata.row_groups.entries()) {
    const rowEnd = rowStart + Number(group.num_rows);
    let values: Record<string, unknown>[];
    try {
      values = await parquetReadObjects({ file, metadata, columns: [column], compressors, rowFormat: 'object', rowStart, rowEnd });
    } catch (err) {
      throw new Error(
        `${path}: column '${column}' cannot be read in row group ${g} (rows ${rowStart}–${rowEnd - 1}): the file is damaged or encoded in a way the reader does not support (${(err as Error).message})`,
        { cause: err },
      );
    }
    values.forEach((row, k) => {
      const where = `row ${rowStart + k}`;
      const p = row[column];
      if (!(p instanceof Uint8Array)) rows.cell(where, p);
      else if (p.length > MAX_PROMPT_BYTES) rows.tooLarge(where, p.length);
      else {
        try {
          rows.cell(where, decoder.decode(p));
        } catch {
          rows.problem(where, `'${column}' is not valid UTF-8`);
        }
      }
    });
    rowStart = rowEnd;
  }
  return rows.result(path, RangeError);
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

/** A split that cannot be made; `option` is the SplitOptions field to change (or 'prompts' for an empty set). */
export class SplitError extends RangeError {
  override name = 'SplitError';
  constructor(
    readonly option: keyof SplitOptions | 'prompts',
    message: string,
  ) {
    super(message);
  }
}

/** A seeded shuffle, the first `evalSize` held out, then T disjoint iteration parts. */
export function splitPrompts<T>(prompts: readonly T[], options: SplitOptions): PromptSplit<T> {
  const { iterations: T, evalSize, seed } = options;
  const n = prompts.length;
  if (n === 0) throw new SplitError('prompts', 'the prompt set is empty');
  if (!Number.isInteger(T) || T < 1) throw new SplitError('iterations', `iterations must be an integer ≥ 1, got ${T}`);
  if (!Number.isInteger(evalSize) || evalSize < 0) throw new SplitError('evalSize', `evalSize must be an integer ≥ 0, got ${evalSize}`);
  const rest = n - evalSize;
  if (rest < T)
    throw new SplitError('evalSize', `${n} prompts cannot give ${evalSize} for evaluation and at least one to each of ${T} iterations`);
  const per = options.promptsPerIteration;
  if (per !== undefined) {
    if (!Number.isInteger(per) || per < 1)
      throw new SplitError('promptsPerIteration', `promptsPerIteration must be an integer ≥ 1, got ${per}`);
    if (per * T > rest)
      throw new SplitError(
        'promptsPerIteration',
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
