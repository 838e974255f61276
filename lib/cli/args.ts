// Argument parsing shared by the subcommands: node:util parseArgs (strict, no positionals) with
// errors turned into UsageError, which the entry point prints as one line and exits with 2.
import { existsSync, statSync } from 'node:fs';
import path from 'node:path';
import { parseArgs, type ParseArgsConfig } from 'node:util';
import { cudaInfo, type Device, type Model } from '../engine/model.js';

/** The user asked for something the command cannot do as asked (exit code 2). */
export class UsageError extends Error {
  override name = 'UsageError';
}

export interface Io {
  stdout: NodeJS.WritableStream & { isTTY?: boolean };
  stderr: NodeJS.WritableStream;
}

export interface Command {
  name: string;
  summary: string;
  /** the full `--help` text */
  help: string;
  run(argv: string[], io: Io): Promise<number>;
}

type Options = NonNullable<ParseArgsConfig['options']>;
type Values<O extends Options> = ReturnType<typeof parseArgs<{ options: O; strict: true; allowPositionals: false }>>['values'];

export function parseOptions<O extends Options>(command: string, argv: string[], options: O): Values<O> {
  try {
    return parseArgs({ args: argv, options, strict: true, allowPositionals: false }).values;
  } catch (err) {
    const code = (err as { code?: string }).code;
    if (!code?.startsWith('ERR_PARSE_ARGS')) throw err;
    // Node appends advice about '--' positionals, which no sppo command takes.
    const message = (err as Error).message.replace(/\. To specify a positional argument.*$/s, '');
    throw new UsageError(`${message} (see sppo ${command} --help)`);
  }
}

export function integerOption(value: string | undefined, flag: string, min: number): number | undefined {
  if (value === undefined) return undefined;
  const n = Number(value);
  if (value.trim() === '' || !Number.isSafeInteger(n) || n < min)
    throw new UsageError(`--${flag} must be an integer ≥ ${min}, got '${value}'`);
  return n;
}

export function numberOption(value: string | undefined, flag: string, range: { min: number; max?: number }): number | undefined {
  if (value === undefined) return undefined;
  const n = Number(value);
  const { min, max } = range;
  if (value.trim() === '' || !Number.isFinite(n) || n < min || (max !== undefined && n > max))
    throw new UsageError(`--${flag} must be a number ≥ ${min}${max === undefined ? '' : ` and ≤ ${max}`}, got '${value}'`);
  return n;
}

/** --device: where the policy runs ('auto': the GPU when one is usable, else the CPU). */
export function deviceOption(value: string | undefined): Device | undefined {
  if (value === undefined || value === 'cpu' || value === 'cuda' || value === 'auto') return value;
  throw new UsageError(`--device must be cpu, cuda or auto, got '${value}'`);
}

/** --activation-checkpointing on | off | auto, as Model.create's activationCheckpointing. */
export function checkpointingOption(value: string | undefined): boolean | 'auto' | undefined {
  if (value === undefined || value === 'auto') return value;
  if (value === 'on' || value === 'off') return value === 'on';
  throw new UsageError(`--activation-checkpointing must be on, off or auto, got '${value}'`);
}

/** One line saying where a model runs and, when the GPU was wanted but is not there, why. */
export function deviceLine(model: Model, asked: Device | undefined): string {
  if (model.device === 'cuda') {
    const info = cudaInfo();
    return `device: cuda (${info.name ?? 'GPU'}; bf16 weights and activations, fp32 master weights)\n`;
  }
  if (asked === 'auto') return `device: cpu (no usable GPU: ${cudaInfo().reason ?? 'unknown reason'})\n`;
  return 'device: cpu\n';
}

export function requireOption<T>(value: T | undefined, flag: string, command: string): T {
  if (value === undefined) throw new UsageError(`--${flag} is required (see sppo ${command} --help)`);
  return value;
}

/** A path option's value; an empty one is refused (it would resolve to the working directory). */
export function pathOption(value: string | undefined, flag: string): string | undefined {
  if (value?.trim() === '')
    throw new UsageError(`--${flag}: an empty path; give a ${flag === 'out' || flag === 'config' ? 'file' : 'directory'} name`);
  return value;
}

/** A required path option that must already exist, resolved against the working directory. */
export function existingPathOption(value: string | undefined, flag: string, command: string): string {
  const resolved = path.resolve(requireOption(pathOption(value, flag), flag, command));
  if (!existsSync(resolved)) throw new UsageError(`--${flag}: ${resolved} does not exist`);
  return resolved;
}

/** --out's value, refused when empty or when it is the file of `--${inputFlag}` (writing would replace it). */
export function outputOption(out: string | undefined, input: string, inputFlag: string): string | undefined {
  if (out === undefined) return undefined;
  pathOption(out, 'out');
  const same = (a: string, b: string) => {
    if (path.resolve(a) === path.resolve(b)) return true;
    const [x, y] = [statSync(a, { throwIfNoEntry: false }), statSync(b, { throwIfNoEntry: false })];
    return x !== undefined && y !== undefined && x.dev === y.dev && x.ino === y.ino; // a link to it
  };
  if (same(out, input)) throw new UsageError(`--out is the --${inputFlag} file (${path.resolve(input)}); writing there would replace it`);
  return out;
}

/** The command line as typed, for "resume with the same command". */
export function commandLine(argv: readonly string[]): string {
  const quote = (a: string) => (/^[\w@%+=:,./-]+$/.test(a) ? a : `'${a.replace(/'/g, `'\\''`)}'`);
  return ['sppo', ...argv.map(quote)].join(' ');
}
