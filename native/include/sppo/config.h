// Model and optimizer configuration. Field names follow Hugging Face's config.json for the
// model, so a checkpoint's config maps onto ModelConfig one to one.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace sppo {

struct RopeScaling {
  enum class Kind { None, Linear, Llama3 };
  Kind kind = Kind::None;
  double factor = 1.0;
  double low_freq_factor = 1.0;                 // llama3
  double high_freq_factor = 4.0;                // llama3
  int original_max_position_embeddings = 8192;  // llama3
};

struct ModelConfig {
  int vocab_size = 0;
  int hidden_size = 0;
  int num_hidden_layers = 0;
  int num_attention_heads = 0;
  int num_key_value_heads = 0;  // 0: same as num_attention_heads
  int head_dim = 0;             // 0: hidden_size / num_attention_heads
  int intermediate_size = 0;
  int max_position_embeddings = 0;
  double rms_norm_eps = 1e-5;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  bool attention_bias = false;       // q/k/v projections carry a bias (Qwen2)
  bool tie_word_embeddings = false;  // lm_head shares model.embed_tokens.weight
  double initializer_range = 0.02;
  uint64_t seed = 0;

  // Fills the 0-defaults above and throws sppo::Error naming the first inconsistent field.
  void resolve_and_validate();
  int kv_heads() const { return num_key_value_heads; }
  int64_t q_dim() const { return int64_t(num_attention_heads) * head_dim; }
  int64_t kv_dim() const { return int64_t(num_key_value_heads) * head_dim; }
  int64_t qkv_dim() const { return q_dim() + 2 * kv_dim(); }
};

// What the engine plans memory for: every buffer is sized for max_batch x max_seq tokens.
struct MemoryPlan {
  int max_batch = 0;
  int max_seq = 0;
  // Keep only each layer's input through the forward pass and recompute the layer in the
  // backward: activations shrink from ~(4C + QKV + 2F)·N per layer to C·N per layer plus one
  // layer's worth, for one more forward pass per training step.
  bool checkpoint_activations = false;
  // Accumulate the gradients in bf16 (2 bytes a parameter instead of 4): each micro-batch's
  // weight gradients are computed in Master precision into a scratch the size of the largest of
  // one layer, the LM head and the embedding, and added into the bf16 buffer with one rounding
  // (docs/memory.md). Full fine-tuning only: LoRA adapters keep Master gradients.
  bool bf16_gradients = false;
  void validate(const ModelConfig& c) const;
};

// The projections of a layer a low-rank adapter may target, in lib/engine/lora.ts's LORA_TARGETS
// order (kLoraTargetNames gives their Hugging Face / PEFT module names; the addon exports them and
// test/native-surface.test.ts checks the two lists agree).
enum class LoraTarget { Q, K, V, O, Gate, Up, Down };
constexpr int kLoraTargets = 7;
extern const char* const kLoraTargetNames[kLoraTargets];

// Low-rank adapters (LoRA) in PEFT's parametrisation: a targeted projection y = x·Wᵀ (W: out × in)
// becomes y + scale·(x·Aᵀ)·Bᵀ with A (rank × in), B (out × rank) and scale = alpha / rank (no
// rsLoRA, dropout 0). With adapters the base weights are frozen: only A and B have gradients,
// master weights and optimizer state.
struct LoraConfig {
  int rank = 0;  // 0: no adapters
  double alpha = 0;
  std::vector<LoraTarget> targets;  // in the order given; add_target refuses duplicates

  bool enabled() const { return rank > 0; }
  bool targets_module(LoraTarget t) const;
  double scale() const { return alpha / double(rank); }
  // Appends a target by module name ('q_proj' ...), refusing unknown names and repeats.
  void add_target(const std::string& name);
  // Throws sppo::Error naming the problem: rank < 1 or above min(in, out) of a targeted
  // projection, alpha not finite and > 0, no targets. A disabled config (rank 0, no targets) is valid.
  void validate(const ModelConfig& c) const;
  // in and out of a target's projection for this model config.
  static int64_t in_features(const ModelConfig& c, LoraTarget t);
  static int64_t out_features(const ModelConfig& c, LoraTarget t);
};

struct ScheduleConfig {
  enum class Kind { Constant, Linear, Cosine };
  Kind kind = Kind::Constant;
  int64_t warmup_steps = 0;
  int64_t total_steps = 0;    // required by linear and cosine
  double min_lr_ratio = 0.0;  // cosine floor, as a fraction of lr
};

struct OptimizerConfig {
  enum class Kind { AdamW, RMSprop };
  Kind kind = Kind::AdamW;
  double lr = 1e-3;
  double beta1 = 0.9, beta2 = 0.999;  // AdamW
  double alpha = 0.99;                // RMSprop smoothing (PyTorch's default)
  double eps = 1e-8;
  double weight_decay = 0.0;   // decoupled: p -= lr * wd * p, on matrices only (not norms, biases)
  double max_grad_norm = 0.0;  // global-norm clipping; 0 disables
  int grad_accum_steps = 1;
  ScheduleConfig schedule;

  void validate() const;
  // The learning rate for optimizer step `step` (0-based), as Hugging Face's schedulers give it.
  double lr_at(int64_t step) const;
};

}  // namespace sppo
