// Small model configurations shared by the CPU model tests (model_test, generate_test, lora_test),
// and the central difference they check gradients with.
#pragma once
#include <cstdint>

#include "sppo/config.h"

namespace sppo::testutil {

// GQA (4 heads on 2 kv heads), head_dim 6 (not hidden / heads), q/k/v bias, untied head, llama3
// rope scaling: a tiny decoder that takes every feature's code path. Callers pick the vocabulary
// and the seed, and change what their tests need on top.
inline ModelConfig gqa_llama3_config(int vocab_size, uint64_t seed) {
  ModelConfig c;
  c.vocab_size = vocab_size, c.hidden_size = 16, c.num_hidden_layers = 2, c.num_attention_heads = 4;
  c.num_key_value_heads = 2, c.head_dim = 6, c.intermediate_size = 20, c.max_position_embeddings = 96;
  c.attention_bias = true;
  c.rope_theta = 500.0;
  c.rope_scaling.kind = RopeScaling::Kind::Llama3;
  c.rope_scaling.factor = 8, c.rope_scaling.low_freq_factor = 1, c.rope_scaling.high_freq_factor = 4;
  c.rope_scaling.original_max_position_embeddings = 16;
  c.initializer_range = 0.3, c.seed = seed;
  return c;
}

// A model whose every feature differs from the plain case: GQA (4 heads on 2 kv heads),
// head_dim (6) not hidden/heads, q/k/v bias, tied embeddings, llama3 rope scaling.
inline ModelConfig featureful_config() {
  ModelConfig c = gqa_llama3_config(23, 11);
  c.tie_word_embeddings = true;
  return c;
}

// Plain multi-head attention, untied head, linear rope scaling, no bias.
inline ModelConfig plain_config() {
  ModelConfig c;
  c.vocab_size = 19, c.hidden_size = 12, c.num_hidden_layers = 2, c.num_attention_heads = 3;
  c.intermediate_size = 14, c.max_position_embeddings = 128;
  c.rope_scaling.kind = RopeScaling::Kind::Linear;
  c.rope_scaling.factor = 2;
  c.initializer_range = 0.3, c.seed = 5;
  return c;
}

// (loss(w + h) − loss(w − h)) / 2h, restoring *w.
template <class Loss>
double central_difference(double* w, double h, Loss&& loss) {
  const double saved = *w;
  *w = saved + h;
  const double up = loss();
  *w = saved - h;
  const double down = loss();
  *w = saved;
  return (up - down) / (2 * h);
}

}  // namespace sppo::testutil
