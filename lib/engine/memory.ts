// The memory plan: what a model would take, by category, before anything is allocated. The
// numbers come from the engine's own allocating code, run over its meta op set
// (native/ops/meta_ops.h), so they are the bytes Model.create will ask for, on any machine: a
// plan for device 'cuda' needs no GPU. Here: resolving the options (the device, 'auto'
// checkpointing against the memory available), the table, and the refusal that says what would fit.
import { freemem } from 'node:os';
import type { GeneratorPlan } from './generate.js';
import { LORA_TARGETS, type LoraOptions } from './lora.js';
import { native } from './native.js';
import type { MemoryPlan, MemoryReport, ModelConfig, OptimizerConfig } from './types.js';

/** Where a model runs: 'auto' takes the GPU when `cudaInfo().available`, else the CPU. */
export type Device = 'cpu' | 'cuda' | 'auto';

/** What Model.plan counts: Model.create's options, plus the optimizer and generator that will follow. */
export interface PlanOptions {
  /** default 'cpu'; 'cuda' plans bf16 parameters over float32 master weights, GPU or not */
  device?: Device;
  /**
   * Keep only each layer's input through the forward pass and recompute the layer in the
   * backward (one more forward pass per step; gradients are bitwise the same). 'auto' (the
   * default) turns it on when the plan without it does not fit `available`.
   */
  activationCheckpointing?: boolean | 'auto';
  /**
   * The precision gradients accumulate in over a step's micro-batches. 'bf16' halves their memory
   * (2 bytes a parameter, plus a float32 stage for the largest gradient made at once: a layer's, or
   * the LM head's or embedding's vocabulary × hidden) at one rounding per micro-batch; the norm
   * clipping divides by is the exact norm of the stored values. Full fine-tuning only (LoRA
   * adapters keep float32 gradients). Default 'fp32'; 'auto' takes 'bf16' when the plan does not
   * fit `available` otherwise (after checkpointing, which changes no result).
   */
  gradientPrecision?: GradientPrecision | 'auto';
  /**
   * Low-rank adapters on the listed projections, the base frozen: only the adapters have
   * gradients, master weights and optimizer state (scale alpha / rank, PEFT's parametrisation).
   */
  lora?: LoraOptions;
  /** the optimizer whose state to count (setOptimizer allocates it); none when absent */
  optimizer?: { kind: NonNullable<OptimizerConfig['kind']> };
  /** a generator whose KV cache to count (createGenerator allocates it); none when absent */
  generator?: GeneratorPlan;
  /**
   * Bytes the device has for the model; default what it reports now (the GPU's free memory, or
   * the host's available memory for 'cpu'); unknown for 'cuda' on a machine without a GPU.
   */
  available?: number;
}

/** What gradients accumulate in: float32, or bf16 (PlanOptions.gradientPrecision). */
export type GradientPrecision = 'fp32' | 'bf16';

/** Model.plan's answer: bytes per category and their total, with the options it resolved. */
export interface MemoryPlanReport extends MemoryReport {
  device: 'cpu' | 'cuda';
  activationCheckpointing: boolean;
  gradientPrecision: GradientPrecision;
  /** the bytes the plan was checked against, when known */
  available?: number;
}

/** The categories in the order tables list them, with their names in words. */
export const MEMORY_CATEGORIES = [
  ['params', 'parameters'],
  ['master', 'master weights'],
  ['grads', 'gradients'],
  ['optimizer', 'optimizer state'],
  ['activations', 'activations'],
  ['scratch', 'scratch'],
  ['kvCache', 'generator KV cache'],
] as const satisfies readonly (readonly [Exclude<keyof MemoryReport, 'total'>, string])[];

const GiB = 1024 ** 3;
const gib = (bytes: number) => (bytes / GiB).toFixed(bytes > 0 && bytes < 0.05 * GiB ? 3 : 1);

/** The device a Device names here: 'auto' is the GPU when one is usable. */
export function resolveDevice(device: Device | undefined): 'cpu' | 'cuda' {
  if (device === 'auto') return native().cudaInfo().available ? 'cuda' : 'cpu';
  return device ?? 'cpu';
}

function availableOn(device: 'cpu' | 'cuda'): number | undefined {
  if (device === 'cpu') return freemem();
  const info = native().cudaInfo();
  return info.available ? info.freeMemory : undefined;
}

/** The plan of a checked config and options (Model.plan checks them first). */
export function planMemory(config: ModelConfig, plan: MemoryPlan, options: PlanOptions): MemoryPlanReport {
  const device = resolveDevice(options.device);
  const available = options.available ?? availableOn(device);
  const report = (activationCheckpointing: boolean, gradientPrecision: GradientPrecision): MemoryPlanReport => ({
    ...native().planMemory(config, plan, {
      device,
      activationCheckpointing,
      bf16Gradients: gradientPrecision === 'bf16',
      ...(options.lora && { lora: options.lora }),
      ...(options.optimizer && { optimizer: { kind: options.optimizer.kind } }),
      ...(options.generator && { generator: options.generator }),
    }),
    device,
    activationCheckpointing,
    gradientPrecision,
    ...(available !== undefined && { available }),
  });
  // 'auto' settings, in the order they are tried: the result-neutral checkpointing first, then
  // bf16 gradients (never with LoRA, and only where they shrink the plan: their float32 stage of
  // vocabulary × hidden can outweigh what a small model's gradients save); the first that fits,
  // else the smallest.
  const asked = options.activationCheckpointing ?? 'auto';
  const checkpointing = asked === 'auto' ? [false, true] : [asked];
  const askedPrecision = options.gradientPrecision ?? 'fp32';
  const precisions: GradientPrecision[] = askedPrecision !== 'auto' ? [askedPrecision] : options.lora ? ['fp32'] : ['fp32', 'bf16'];
  const tried: MemoryPlanReport[] = [];
  for (const precision of precisions)
    for (const ckpt of checkpointing) {
      const r = report(ckpt, precision);
      const same = tried.find((t) => t.activationCheckpointing === ckpt);
      if (askedPrecision === 'auto' && same && r.total >= same.total) continue;
      if (available === undefined || r.total <= available) return r;
      tried.push(r);
    }
  return tried.reduce((a, b) => (b.total < a.total ? b : a));
}

/** The plan as a table: one line per category, then the total (and what is available). */
export function formatMemoryPlan(r: MemoryPlanReport): string {
  const lines = MEMORY_CATEGORIES.filter(([key]) => r[key] > 0).map(([key, name]) => `  ${name.padEnd(20)}${gib(r[key]).padStart(8)} GiB`);
  lines.push(`  ${'total'.padEnd(20)}${gib(r.total).padStart(8)} GiB`);
  const checkpointing = `activation checkpointing ${r.activationCheckpointing ? 'on' : 'off'}`;
  const gradients = r.gradientPrecision === 'bf16' ? ', bf16 gradients' : '';
  const available = r.available === undefined ? '' : `, ${gib(r.available)} GiB available`;
  return `memory plan on ${r.device} (${checkpointing}${gradients}${available}):\n${lines.join('\n')}`;
}

/** Whether the planner accepts a variant: it throws RangeError for a pool under one block. */
function planFits(variant: () => unknown): boolean {
  try {
    variant();
    return true;
  } catch (e) {
    if (e instanceof RangeError) return false;
    throw e;
  }
}

/**
 * The adapters the refusal suggests: rank 16 on all seven projections (alpha 2 × rank, as usual),
 * or the smallest projection's size where a model is narrower than that.
 */
function suggestedLora(c: ModelConfig): LoraOptions {
  const heads = c.num_attention_heads;
  const headDim = c.head_dim || c.hidden_size / heads;
  const kvHeads = c.num_key_value_heads || heads;
  const rank = Math.max(1, Math.floor(Math.min(16, c.hidden_size, c.intermediate_size, kvHeads * headDim, heads * headDim)));
  return { rank, alpha: 2 * rank, targets: LORA_TARGETS };
}

/**
 * Model.create's refusal of a plan that does not fit: what it needs against what is free, the
 * categories, and each change of the options that shrinks it, with the total it would reach.
 */
export function refusalMessage(config: ModelConfig, plan: MemoryPlan, options: PlanOptions, r: MemoryPlanReport): string {
  const available = r.available ?? 0;
  const parts = MEMORY_CATEGORIES.filter(([key]) => r[key] > 0)
    .map(([key, name]) => `${name} ${gib(r[key])}`)
    .join(', ');
  const fixed: PlanOptions = {
    ...options,
    device: r.device,
    available,
    activationCheckpointing: r.activationCheckpointing,
    gradientPrecision: r.gradientPrecision,
  };
  const alternatives: string[] = [];
  let fits = false;
  // Each change alone, and all of them together (`all`) when none fits alone.
  let all = fixed;
  let allPlan = plan;
  // `v`: the variant's plan, when the caller has already computed it to decide on the change.
  const consider = (
    change: string,
    what: readonly (keyof MemoryReport)[],
    variant: PlanOptions,
    variantPlan = plan,
    v = planMemory(config, variantPlan, variant),
  ) => {
    const names = what.map((k) => MEMORY_CATEGORIES.find(([key]) => key === k)?.[1] ?? k).join(' and ');
    const size = gib(what.reduce((sum, k) => sum + v[k], 0));
    fits ||= v.total <= available;
    alternatives.push(`${change} brings ${names} to ${size} (total ${gib(v.total)} GiB${v.total <= available ? ', fits' : ''})`);
  };
  if (!r.activationCheckpointing) {
    all = { ...all, activationCheckpointing: true };
    consider('activationCheckpointing: true', ['activations'], { ...fixed, activationCheckpointing: true });
  }
  // bf16 gradients, where they shrink the plan (their stage can outweigh a small model's saving).
  if (!options.lora && r.gradientPrecision === 'fp32') {
    const bf16: PlanOptions = { ...fixed, gradientPrecision: 'bf16' };
    const v = planMemory(config, plan, bf16);
    if (v.total < r.total) {
      all = { ...all, gradientPrecision: 'bf16' };
      consider("gradientPrecision: 'bf16'", ['grads'], bf16, plan, v);
    }
  }
  if (!options.lora) {
    // LoRA's adapters keep float32 gradients: the suggestion replaces bf16 gradients, and says so
    // (and "all of these together" counts LoRA, not a bf16 gradients suggestion above).
    const lora = suggestedLora(config);
    const precision = r.gradientPrecision === 'bf16' ? " with gradientPrecision: 'fp32'" : '';
    all = { ...all, lora, gradientPrecision: 'fp32' };
    consider(
      `lora: {rank: ${lora.rank}} (all seven projections)${precision}`,
      r.master > 0 ? ['master', 'grads', 'optimizer'] : ['grads', 'optimizer'],
      { ...fixed, lora, gradientPrecision: 'fp32' },
    );
  }
  if (options.optimizer?.kind === 'adamw') {
    all = { ...all, optimizer: { kind: 'rmsprop' } };
    consider("optimizer: {kind: 'rmsprop'}", ['optimizer'], { ...fixed, optimizer: { kind: 'rmsprop' } });
  }
  if (plan.maxBatch > 1) {
    allPlan = { ...plan, maxBatch: Math.max(1, Math.floor(plan.maxBatch / 2)) };
    consider(`plan.maxBatch: ${allPlan.maxBatch}`, ['activations', 'scratch'], fixed, allPlan);
  }
  // The CPU generator's packed copy of the weights (the weights' size again) is optional.
  if (options.generator && options.generator.packWeights !== false && r.device === 'cpu') {
    const generator = { ...options.generator, packWeights: false };
    const v = planMemory(config, plan, { ...fixed, generator });
    if (v.kvCache < r.kvCache) {
      all = { ...all, generator: { ...(all.generator ?? generator), packWeights: false } };
      consider('generator.packWeights: false', ['kvCache'], { ...fixed, generator }, plan, v);
    }
  }
  // A pool sized in bytes does not follow maxBatch: halve whichever sets it.
  const pool = options.generator?.kvCacheBytes;
  if (options.generator && pool !== undefined) {
    const generator = { ...options.generator, kvCacheBytes: Math.floor(pool / 2) };
    // Half a pool of one block is no pool, and the planner refuses it: nothing to suggest then.
    if (planFits(() => planMemory(config, plan, { ...fixed, generator }))) {
      all = { ...all, generator: { ...(all.generator ?? generator), kvCacheBytes: generator.kvCacheBytes } };
      consider(`generator.kvCacheBytes: ${generator.kvCacheBytes}`, ['kvCache'], { ...fixed, generator });
    }
  } else if (options.generator && options.generator.maxBatch > 1) {
    const generator = { ...options.generator, maxBatch: Math.max(1, Math.floor(options.generator.maxBatch / 2)) };
    all = { ...all, generator: { ...(all.generator ?? generator), maxBatch: generator.maxBatch } };
    consider(`generator.maxBatch: ${generator.maxBatch}`, ['kvCache'], { ...fixed, generator });
  }
  if (!fits && alternatives.length > 1) {
    const v = planMemory(config, allPlan, all);
    alternatives.push(`all of these together bring the total to ${gib(v.total)} GiB${v.total <= available ? ', which fits' : ''}`);
  }
  const advice = alternatives.length > 0 ? ` — ${alternatives.join('; ')}` : '';
  return `needs ${gib(r.total)} GiB on ${r.device} (${gib(available)} GiB free): ${parts}${advice}\n${formatMemoryPlan(r)}`;
}
