// LoRA's vocabulary, written once for the engine, the PEFT adapter files and the run config:
// which projections an adapter may target, the options' shape, and each adapter tensor's name.
// Imports nothing, so the config schema (a leaf, test/import-graph.test.ts) may read it.
//
// An adapter on a projection y = x·Wᵀ (W: out × in) adds (alpha / rank)·(x·Aᵀ)·Bᵀ, with A
// (rank × in) and B (out × rank), PEFT's parametrisation (no rsLoRA, dropout 0).

/** The projections of a Llama-family layer an adapter may target, by their Hugging Face / PEFT module names. */
export const LORA_TARGETS = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'] as const;

export type LoraTarget = (typeof LORA_TARGETS)[number];

export interface LoraOptions {
  rank: number;
  alpha: number;
  targets: readonly LoraTarget[];
}

/** The module holding each target inside `model.layers.N` (Hugging Face's Llama / Mistral / Qwen2 layout). */
export const LORA_TARGET_MODULE: Readonly<Record<LoraTarget, 'self_attn' | 'mlp'>> = {
  q_proj: 'self_attn',
  k_proj: 'self_attn',
  v_proj: 'self_attn',
  o_proj: 'self_attn',
  gate_proj: 'mlp',
  up_proj: 'mlp',
  down_proj: 'mlp',
};

/** What PEFT writes before a module path in adapter_model.safetensors. */
export const PEFT_TENSOR_PREFIX = 'base_model.model.';

/**
 * The engine's name of one adapter tensor, the module path Hugging Face names the projection by
 * plus `lora_A.weight` (rank × in) or `lora_B.weight` (out × rank); PEFT's file name is
 * PEFT_TENSOR_PREFIX + this.
 */
export function loraTensorName(layer: number, target: LoraTarget, factor: 'A' | 'B'): string {
  return `model.layers.${layer}.${LORA_TARGET_MODULE[target]}.${target}.lora_${factor}.weight`;
}

export function isLoraTarget(name: unknown): name is LoraTarget {
  return typeof name === 'string' && (LORA_TARGETS as readonly string[]).includes(name);
}
