// A model directory's weights: `model.safetensors`, or shards listed by
// `model.safetensors.index.json` ({metadata: {total_size}, weight_map: {tensor: shard file}}),
// the two layouts transformers writes and reads.
import { existsSync } from 'node:fs';
import { readFile, readdir, rm } from 'node:fs/promises';
import path from 'node:path';
import {
  dtypeBytes,
  type ReadScratch,
  SafetensorsError,
  SafetensorsFile,
  writeSafetensorsTemp,
  type TensorInfo,
  type TensorSource,
  type WriteDtype,
} from './safetensors.js';
import type { StagedFiles } from './staging.js';
import { jsonSyntaxProblem } from '../util/json.js';

export const WEIGHTS_NAME = 'model.safetensors';
export const WEIGHTS_INDEX_NAME = 'model.safetensors.index.json';
const SHARD_NAME = /^model-\d{5}-of-\d{5}\.safetensors$/;

/** transformers' default shard limit (5 GB). */
export const DEFAULT_MAX_SHARD_BYTES = 5_000_000_000;

/** Every tensor of a checkpoint, single-file or sharded, with the file that holds it. */
export class CheckpointWeights {
  private constructor(
    readonly dir: string,
    private readonly files: SafetensorsFile[],
    readonly tensors: Map<string, TensorInfo & { file: SafetensorsFile }>,
  ) {}

  static async open(dir: string): Promise<CheckpointWeights> {
    const single = path.join(dir, WEIGHTS_NAME);
    const index = path.join(dir, WEIGHTS_INDEX_NAME);
    if (existsSync(single)) {
      const f = await SafetensorsFile.open(single);
      return new CheckpointWeights(dir, [f], new Map([...f.tensors].map(([n, t]) => [n, { ...t, file: f }])));
    }
    if (!existsSync(index)) {
      throw new SafetensorsError(
        `${dir}: no ${WEIGHTS_NAME} or ${WEIGHTS_INDEX_NAME} (only safetensors weights are read; convert .bin checkpoints first)`,
      );
    }
    const weightMap = parseIndex(await readFile(index, 'utf8'), index);
    const files: SafetensorsFile[] = [];
    try {
      const byShard = new Map<string, SafetensorsFile>();
      const tensors = new Map<string, TensorInfo & { file: SafetensorsFile }>();
      for (const [name, shard] of weightMap) {
        let f = byShard.get(shard);
        if (!f) {
          f = await SafetensorsFile.open(path.join(dir, shard));
          files.push(f);
          byShard.set(shard, f);
        }
        const t = f.tensors.get(name);
        if (!t) throw new SafetensorsError(`${index}: weight_map puts '${name}' in ${shard}, which has no such tensor`);
        tensors.set(name, { ...t, file: f });
      }
      for (const [shard, f] of byShard) {
        for (const name of f.tensors.keys()) {
          if (weightMap.get(name) !== shard) {
            throw new SafetensorsError(
              `${f.path}: holds tensor '${name}' that ${WEIGHTS_INDEX_NAME} ${weightMap.has(name) ? `assigns to ${weightMap.get(name)}` : 'does not list'}`,
            );
          }
        }
      }
      return new CheckpointWeights(dir, files, tensors);
    } catch (e) {
      await Promise.all(files.map((f) => f.close()));
      throw e;
    }
  }

  /** The tensor `name`, or a SafetensorsError when the checkpoint has none. */
  tensor(name: string): TensorInfo & { file: SafetensorsFile } {
    const t = this.tensors.get(name);
    if (!t) throw new SafetensorsError(`${this.dir}: the checkpoint has no tensor '${name}'`);
    return t;
  }

  async readFloat32(name: string, scratch?: ReadScratch): Promise<Float32Array> {
    return this.tensor(name).file.readFloat32(name, scratch);
  }

  async close(): Promise<void> {
    await Promise.all(this.files.map((f) => f.close()));
  }
}

function parseIndex(text: string, label: string): Map<string, string> {
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (e) {
    throw new SafetensorsError(`${label}: ${jsonSyntaxProblem(text, e)}`, { cause: e });
  }
  const weightMap = (parsed as { weight_map?: unknown } | null)?.weight_map;
  if (typeof weightMap !== 'object' || weightMap === null || Array.isArray(weightMap)) {
    throw new SafetensorsError(`${label}: weight_map must be an object of tensor name → shard file`);
  }
  const out = new Map<string, string>();
  for (const [name, shard] of Object.entries(weightMap)) {
    // Shards must be plain file names in the same directory: an index must not reach elsewhere.
    if (typeof shard !== 'string' || shard !== path.basename(shard) || shard === '.' || shard === '..' || shard.includes('\\')) {
      throw new SafetensorsError(`${label}: weight_map['${name}'] must be a file name in the same directory, got ${JSON.stringify(shard)}`);
    }
    out.set(name, shard);
  }
  if (out.size === 0) throw new SafetensorsError(`${label}: weight_map lists no tensors`);
  return out;
}

export interface WeightsWriteOptions {
  /** a shard's tensor bytes stay at or under this, unless one tensor alone is larger */
  maxShardBytes?: number;
  dtype?: WriteDtype;
}

/**
 * Writes `tensors` as `model.safetensors`, or as shards plus the index when they exceed
 * maxShardBytes, into temporary files registered with `staging`. Returns the final file names.
 */
export async function stageWeights(
  dir: string,
  tensors: readonly TensorSource[],
  options: WeightsWriteOptions,
  staging: StagedFiles,
): Promise<string[]> {
  const dtype = options.dtype ?? 'F32';
  const maxShardBytes = options.maxShardBytes ?? DEFAULT_MAX_SHARD_BYTES;
  if (!(Number.isSafeInteger(maxShardBytes) && maxShardBytes > 0))
    throw new RangeError(`maxShardBytes must be a positive integer, got ${maxShardBytes}`);
  const size = (t: TensorSource) => t.shape.reduce((a, d) => a * d, 1) * dtypeBytes(dtype);

  const shards: TensorSource[][] = [[]];
  let shardBytes = 0;
  for (const t of tensors) {
    const bytes = size(t);
    if (shardBytes + bytes > maxShardBytes && shards[shards.length - 1].length > 0) {
      shards.push([]);
      shardBytes = 0;
    }
    shards[shards.length - 1].push(t);
    shardBytes += bytes;
  }

  if (shards.length === 1) {
    const target = path.join(dir, WEIGHTS_NAME);
    await staging.stage(target, () => writeSafetensorsTemp(target, tensors, { dtype }));
    return [WEIGHTS_NAME];
  }
  const n = shards.length;
  const pad = (i: number) => String(i).padStart(5, '0');
  const names = shards.map((_, i) => `model-${pad(i + 1)}-of-${pad(n)}.safetensors`);
  const weightMap: Record<string, string> = {};
  for (let i = 0; i < n; i++) {
    const target = path.join(dir, names[i]);
    await staging.stage(target, () => writeSafetensorsTemp(target, shards[i], { dtype }));
    for (const t of shards[i]) weightMap[t.name] = names[i];
  }
  const totalSize = tensors.reduce((a, t) => a + size(t), 0);
  const sortedMap = Object.fromEntries(
    Object.keys(weightMap)
      .sort()
      .map((k) => [k, weightMap[k]]),
  );
  // Staged last, so it is renamed into place only after every shard it names.
  await staging.writeText(
    path.join(dir, WEIGHTS_INDEX_NAME),
    JSON.stringify({ metadata: { total_size: totalSize }, weight_map: sortedMap }, null, 2) + '\n',
  );
  return [...names, WEIGHTS_INDEX_NAME];
}

/** Removes weight files of an earlier save that the new one did not write (e.g. old shards). */
export async function removeStaleWeights(dir: string, keep: readonly string[]): Promise<void> {
  const stale = (await readdir(dir)).filter(
    (f) => !keep.includes(f) && (f === WEIGHTS_NAME || f === WEIGHTS_INDEX_NAME || SHARD_NAME.test(f)),
  );
  await Promise.all(stale.map((f) => rm(path.join(dir, f), { force: true })));
}
