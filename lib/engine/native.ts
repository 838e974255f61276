// Loads the compiled addon with `bindings` and declares its surface: the one declaration of it.
// A missing, broken or stale binary becomes one clear error that says how to rebuild, instead
// of a loader stack trace. The addon trusts its arguments' types and shapes (it checks only what
// memory safety needs): model.ts, generate.ts, batch.ts and preference.ts check them first.
import { createRequire } from 'node:module';
import type { GenerateStats, KvCacheState, StopReason } from './generate.js';
import type { LoraOptions } from './lora.js';
import type { MemoryReport, ParamInfo, StepResult } from './types.js';

const require = createRequire(import.meta.url);

/** The addon's ABI version; native/addon/addon.cpp exports its own and native() refuses others. */
export const ABI_VERSION = 5;

export interface NativeModelHandle {
  forward(tokens: Int32Array, batch: number, seq: number, output: string): Promise<{ logits?: Float32Array; hidden?: Float32Array }>;
  evalLoss(tokens: Int32Array, batch: number, seq: number, mask: Uint8Array | null): Promise<{ loss: number; targetTokens: number }>;
  trainStep(tokens: Int32Array, batch: number, seq: number, mask: Uint8Array | null): Promise<StepResult>;
  sequenceLogprobs(
    tokens: Int32Array,
    batch: number,
    seq: number,
    mask: Uint8Array | null,
    perToken: boolean,
  ): Promise<{ sum: Float64Array; perToken?: Float64Array }>;
  evalPreference(
    tokens: Int32Array,
    batch: number,
    seq: number,
    mask: Uint8Array | null,
    refLogp: Float64Array,
    target: Float64Array,
    loss: string,
    eta: number,
  ): Promise<{ metrics: Record<string, number>; logps: Float64Array }>;
  preferenceStep(
    tokens: Int32Array,
    batch: number,
    seq: number,
    mask: Uint8Array | null,
    refLogp: Float64Array,
    target: Float64Array,
    loss: string,
    eta: number,
  ): Promise<StepResult & { metrics: Record<string, number>; logps: Float64Array }>;
  setOptimizer(config: object): void;
  params(): ParamInfo[];
  getParam(name: string): Float32Array;
  setParam(name: string, values: Float32Array): void;
  memory(): MemoryReport;
  config(): Record<string, unknown>;
  state(): { disposed: boolean; busy: boolean; device?: 'cpu' | 'cuda'; step?: number; pendingMicroBatches?: number; numParams?: number };
  dispose(): void;
}

export interface NativeGenerateResult {
  /** every sequence's new tokens, concatenated (prompt-major) */
  tokens: Int32Array;
  /** tokens per sequence */
  counts: Int32Array;
  logprobs: Float64Array;
  reasons: StopReason[];
}

export interface NativeGeneratorHandle {
  /** the prompts concatenated in `tokens`, lengths[i] tokens each, with one seed per prompt */
  generate(
    tokens: Int32Array,
    lengths: Int32Array,
    seeds: Float64Array,
    samplesPerPrompt: number,
    options: { maxNewTokens?: number; temperature?: number; topK?: number; topP?: number; stopTokens: Int32Array },
    onStep: ((sequences: Int32Array, tokens: Int32Array, logprobs: Float64Array) => void) | null,
  ): Promise<NativeGenerateResult>;
  abort(): void;
  memory(): number;
  kvCache(): KvCacheState;
  stats(): GenerateStats;
  dispose(): void;
}

/** The DeBERTa-v3 encoder's shape as the addon reads it (native/include/sppo/encoder.h). */
export interface NativeEncoderConfig {
  vocabSize: number;
  hiddenSize: number;
  numLayers: number;
  numHeads: number;
  intermediateSize: number;
  positionBuckets: number;
  maxRelativePositions: number;
  layerNormEps: number;
  /** PairRM's head: Linear(2·hidden → headHidden), tanh, Linear(→ 1) */
  headHidden: number;
}

export interface NativeEncoderHandle {
  parameters(): { name: string; shape: number[] }[];
  setParameter(name: string, values: Float32Array): void;
  /** f(x, y1, y2) per row; pool holds each row's <|source|>, <|candidate1|>, <|candidate2|> positions */
  pairrm(
    ids: Int32Array,
    lengths: Int32Array,
    pool: Int32Array,
    batch: number,
    seq: number,
    hidden: boolean,
  ): Promise<{ logits: Float64Array; hidden?: Float32Array }>;
  /** the storage type it was made with */
  precision(): 'fp32' | 'bf16';
  dispose(): void;
}

export interface NativeModelOptions {
  initialize?: boolean;
  /** default 'cpu' ('auto' is resolved by lib/engine/memory.ts before it gets here) */
  device?: 'cpu' | 'cuda' | 'auto';
  activationCheckpointing?: boolean;
  /** gradients accumulated in bf16 ('auto' is resolved first, as for checkpointing) */
  bf16Gradients?: boolean;
  /** adapters on the base, which they freeze (targets by module name; the engine validates the values) */
  lora?: LoraOptions;
}

export interface NativeAddon {
  NativeEncoder: new (
    config: NativeEncoderConfig,
    plan: { maxBatch: number; maxSeq: number },
    device: 'cpu' | 'cuda',
    /** 'bf16' on CUDA only */
    precision: 'fp32' | 'bf16',
  ) => NativeEncoderHandle;
  NativeModel: new (config: object, plan: object, options?: NativeModelOptions) => NativeModelHandle;
  /** what NativeModel would allocate for these arguments (and an optimizer's state and a generator's cache) */
  planMemory(
    config: object,
    plan: object,
    options: NativeModelOptions & { optimizer?: { kind: string }; generator?: { maxBatch: number; maxContext: number } },
  ): MemoryReport;
  NativeGenerator: new (model: NativeModelHandle, plan: object) => NativeGeneratorHandle;
  cudaInfo(): CudaInfo;
  setNumThreads(n: number): void;
  numThreads(): number;
  presetConfig(name: string): Record<string, unknown>;
  /** the config with the engine's defaults filled in, validated */
  resolveConfig(config: object): Record<string, unknown>;
  gemmKernel: string;
  /** the engine's preference losses, in order (lib/engine/losses.ts lists the same) */
  preferenceLosses: string[];
  /** the model config fields the addon reads (lib/engine/model.ts MODEL_CONFIG_FIELDS lists the same) */
  modelConfigFields: string[];
  /** the projections an adapter may target, in order (lib/engine/lora.ts LORA_TARGETS lists the same) */
  loraTargets: string[];
  abiVersion: number;
}

/** What the CUDA backend can do in this process (see `cudaInfo()` in lib/engine/model.ts). */
export interface CudaInfo {
  /** the addon was compiled with the CUDA backend (nvcc was present at install) */
  built: boolean;
  /** a usable GPU, driver and cuBLASLt are present */
  available: boolean;
  /** why not, when unavailable */
  reason?: string;
  name?: string;
  computeCapability?: string;
  totalMemory?: number;
  freeMemory?: number;
  runtimeVersion?: number;
  driverVersion?: number;
}

let cached: NativeAddon | undefined;

export function native(): NativeAddon {
  if (cached) return cached;
  let addon: NativeAddon;
  try {
    addon = (require('bindings') as (name: string) => NativeAddon)('sppo');
  } catch (err) {
    throw new Error(
      `sppo-engine: the native addon could not be loaded (${(err as Error).message.split('\n')[0]}). ` +
        'Rebuild it with `npm run build:native` (needs CMake and a C++20 compiler, or node-gyp) ' +
        'in the sppo-engine package directory.',
    );
  }
  if (addon.abiVersion !== ABI_VERSION) {
    throw new Error(
      `sppo-engine: the native addon is stale (ABI ${addon.abiVersion}, expected ${ABI_VERSION}); ` +
        'rebuild it with `npm run build:native`.',
    );
  }
  cached = addon;
  return addon;
}
