// The files a run reads besides its config, fingerprinted into run.json so that a resumed run
// notices one that changed since it started (prompts edited between a kill and the resume would
// otherwise judge iteration 2's answers against base answers to other prompts):
//
//   data.prompts                      the prompt file
//   preference.module                 a function judge's module (the file itself, not what it imports)
//   model.path/<file>                 the policy's directory: config.json, generation_config.json,
//   preference.path/<file>            the weights' index and headers, tokenizer and chat template
//                                     files; an lm-judge's or reward model's directory alike
//
// Every file is hashed whole (sha256) except the weights: a multi-GB shard is fingerprinted by
// its safetensors header (every tensor's name, dtype, shape and offsets), its size and its
// modification time, which is cheap and catches a replaced or retrained checkpoint, not a byte
// edited in place with the time restored. A file that does not exist is recorded as absent, so
// one that appears later (a chat_template.jinja) counts as a change too.
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { open, readdir, stat } from 'node:fs/promises';
import path from 'node:path';
import type { FieldPath } from '../config/errors.js';
import type { RunConfig } from '../config/schema.js';
import { TOKENIZER_FILES } from '../io/tokenizer.js';
import { WEIGHTS_INDEX_NAME } from '../io/weights.js';

/** input key (`data.prompts`, `model.path/config.json`) → fingerprint */
export type InputFingerprints = Record<string, string>;

export interface InputFile {
  /** `data.prompts`, `model.path/config.json` */
  key: string;
  /** the config field that names it */
  field: FieldPath;
  file: string;
}

/** The files of a model directory (besides its weight shards) that loading it reads. */
const MODEL_DIR_FILES = ['config.json', 'generation_config.json', WEIGHTS_INDEX_NAME, ...TOKENIZER_FILES];
const ABSENT = 'absent';

/** The input files of `config`: the files its fields name, and those of the model directories it names. */
export async function inputFiles(config: RunConfig): Promise<InputFile[]> {
  const files: InputFile[] = [];
  const one = (field: FieldPath, file: string) => files.push({ key: field.join('.'), field, file });
  const dir = async (field: FieldPath, root: string) => {
    const names = await readdir(root).catch(() => [] as string[]);
    const shards = names.filter((n) => n.endsWith('.safetensors')).sort();
    for (const name of [...MODEL_DIR_FILES, ...shards])
      files.push({ key: `${field.join('.')}/${name}`, field, file: path.join(root, name) });
  };
  if (config.data.prompts !== undefined) one(['data', 'prompts'], config.data.prompts);
  if (config.model.path !== undefined) await dir(['model', 'path'], config.model.path);
  const pref = config.preference;
  if (pref.kind === 'function' && pref.module !== undefined) one(['preference', 'module'], pref.module);
  if (pref.kind === 'lm-judge' || pref.kind === 'reward-model' || pref.kind === 'pairrm') await dir(['preference', 'path'], pref.path);
  return files;
}

/** Every input file's fingerprint. */
export async function fingerprintInputs(files: readonly InputFile[]): Promise<InputFingerprints> {
  const out: InputFingerprints = {};
  for (const f of files) out[f.key] = await fingerprint(f.file);
  return out;
}

async function fingerprint(file: string): Promise<string> {
  const info = await stat(file).catch(() => undefined);
  if (!info?.isFile()) return ABSENT;
  if (file.endsWith('.safetensors')) {
    const header = await safetensorsHeader(file, info.size);
    return `header-sha256:${sha256(header)} bytes:${info.size} modified:${info.mtime.toISOString()}`;
  }
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(file)) hash.update(chunk as Buffer);
  return `sha256:${hash.digest('hex')}`;
}

const sha256 = (data: Uint8Array) => createHash('sha256').update(data).digest('hex');

/** The 8-byte length and the JSON header of a safetensors file (at most 100 MB of it; a broken one as far as it goes). */
async function safetensorsHeader(file: string, size: number): Promise<Uint8Array> {
  const handle = await open(file, 'r');
  try {
    const prefix = Buffer.alloc(Math.min(8, size));
    await handle.read(prefix, 0, prefix.length, 0);
    const length = prefix.length === 8 ? Number(prefix.readBigUInt64LE(0)) : 0;
    const header = Buffer.alloc(Math.min(length, size - prefix.length, 100_000_000));
    await handle.read(header, 0, header.length, prefix.length);
    return Buffer.concat([prefix, header]);
  } finally {
    await handle.close();
  }
}

/** What a change of an input's fingerprint says: which part of a weight shard's differs. */
export function describeInputChange(before: string | undefined, after: string): string {
  if (before === ABSENT) return 'appeared';
  if (after === ABSENT) return 'was removed';
  const parts = (s: string | undefined) => new Map((s ?? '').split(' ').map((p) => [p.slice(0, p.indexOf(':')), p] as const));
  const [a, b] = [parts(before), parts(after)];
  if (!b.has('header-sha256')) return 'changed content';
  const differ = [...b]
    .filter(([k, v]) => a.get(k) !== v)
    .map(([k]) => (k === 'header-sha256' ? 'header' : k === 'bytes' ? 'size' : 'modification time'));
  return `changed (${differ.join(', ')} differ${differ.length === 1 ? 's' : ''})`;
}
