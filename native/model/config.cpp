// Validation of configurations and the learning-rate schedules (the one place each is written).
#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "sppo/config.h"

namespace sppo {

void ModelConfig::resolve_and_validate() {
  SPPO_REQUIRE(vocab_size > 0, "config.vocab_size must be a positive integer, got ", vocab_size);
  SPPO_REQUIRE(hidden_size > 0, "config.hidden_size must be a positive integer, got ", hidden_size);
  SPPO_REQUIRE(num_hidden_layers > 0, "config.num_hidden_layers must be a positive integer, got ", num_hidden_layers);
  SPPO_REQUIRE(num_attention_heads > 0, "config.num_attention_heads must be a positive integer, got ",
               num_attention_heads);
  SPPO_REQUIRE(intermediate_size > 0, "config.intermediate_size must be a positive integer, got ", intermediate_size);
  SPPO_REQUIRE(max_position_embeddings > 0, "config.max_position_embeddings must be a positive integer, got ",
               max_position_embeddings);
  if (num_key_value_heads == 0) num_key_value_heads = num_attention_heads;
  SPPO_REQUIRE(num_key_value_heads > 0, "config.num_key_value_heads must be a positive integer, got ",
               num_key_value_heads);
  SPPO_REQUIRE(num_attention_heads % num_key_value_heads == 0, "config.num_key_value_heads (", num_key_value_heads,
               ") must divide config.num_attention_heads (", num_attention_heads, ")");
  if (head_dim == 0) {
    SPPO_REQUIRE(hidden_size % num_attention_heads == 0, "config.num_attention_heads (", num_attention_heads,
                 ") must divide config.hidden_size (", hidden_size, ") unless config.head_dim is given");
    head_dim = hidden_size / num_attention_heads;
  }
  SPPO_REQUIRE(head_dim > 0 && head_dim % 2 == 0,
               "config.head_dim must be a positive even integer (rotary pairs), got ", head_dim);
  SPPO_REQUIRE(std::isfinite(rms_norm_eps) && rms_norm_eps > 0, "config.rms_norm_eps must be a positive number, got ",
               rms_norm_eps);
  SPPO_REQUIRE(std::isfinite(rope_theta) && rope_theta > 1, "config.rope_theta must be a number > 1, got ", rope_theta);
  SPPO_REQUIRE(std::isfinite(initializer_range) && initializer_range >= 0,
               "config.initializer_range must be >= 0, got ", initializer_range);
  const RopeScaling& r = rope_scaling;
  if (r.kind != RopeScaling::Kind::None) {
    SPPO_REQUIRE(std::isfinite(r.factor) && r.factor >= 1, "config.rope_scaling.factor must be >= 1, got ", r.factor);
  }
  if (r.kind == RopeScaling::Kind::Llama3) {
    SPPO_REQUIRE(std::isfinite(r.low_freq_factor) && r.low_freq_factor > 0,
                 "config.rope_scaling.low_freq_factor must be > 0, got ", r.low_freq_factor);
    SPPO_REQUIRE(std::isfinite(r.high_freq_factor) && r.high_freq_factor > r.low_freq_factor,
                 "config.rope_scaling.high_freq_factor (", r.high_freq_factor, ") must exceed low_freq_factor (",
                 r.low_freq_factor, ")");
    SPPO_REQUIRE(r.original_max_position_embeddings > 0,
                 "config.rope_scaling.original_max_position_embeddings must be a positive integer, got ",
                 r.original_max_position_embeddings);
  }
}

void MemoryPlan::validate(const ModelConfig& c) const {
  SPPO_REQUIRE(max_batch > 0, "plan.maxBatch must be a positive integer, got ", max_batch);
  SPPO_REQUIRE(max_seq > 0, "plan.maxSeq must be a positive integer, got ", max_seq);
  SPPO_REQUIRE(max_seq <= c.max_position_embeddings, "plan.maxSeq (", max_seq,
               ") exceeds config.max_position_embeddings (", c.max_position_embeddings, ")");
}

const char* const kLoraTargetNames[kLoraTargets] = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                                    "gate_proj", "up_proj", "down_proj"};

bool LoraConfig::targets_module(LoraTarget t) const {
  return std::find(targets.begin(), targets.end(), t) != targets.end();
}

void LoraConfig::add_target(const std::string& name) {
  const auto* end = kLoraTargetNames + kLoraTargets;
  const auto* it = std::find_if(kLoraTargetNames, end, [&](const char* n) { return name == n; });
  if (it == end) {
    std::string known;
    for (const char* n : kLoraTargetNames) known += known.empty() ? n : std::string(", ") + n;
    throw Error("lora.targets: unknown target '" + name + "' (known: " + known + ")");
  }
  const LoraTarget t = LoraTarget(it - kLoraTargetNames);
  SPPO_REQUIRE(!targets_module(t), "lora.targets lists '", name, "' twice");
  targets.push_back(t);
}

int64_t LoraConfig::in_features(const ModelConfig& c, LoraTarget t) {
  switch (t) {
    case LoraTarget::O:
      return c.q_dim();
    case LoraTarget::Down:
      return c.intermediate_size;
    default:
      return c.hidden_size;
  }
}

int64_t LoraConfig::out_features(const ModelConfig& c, LoraTarget t) {
  switch (t) {
    case LoraTarget::Q:
      return c.q_dim();
    case LoraTarget::K:
    case LoraTarget::V:
      return c.kv_dim();
    case LoraTarget::Gate:
    case LoraTarget::Up:
      return c.intermediate_size;
    default:
      return c.hidden_size;
  }
}

void LoraConfig::validate(const ModelConfig& c) const {
  if (rank == 0 && targets.empty()) return;
  SPPO_REQUIRE(rank >= 1, "lora.rank must be an integer >= 1, got ", rank);
  SPPO_REQUIRE(std::isfinite(alpha) && alpha > 0, "lora.alpha must be a finite number > 0, got ", alpha);
  SPPO_REQUIRE(!targets.empty(), "lora.targets is empty: name at least one of the projections to adapt");
  for (LoraTarget t : targets) {
    const int64_t in = in_features(c, t), out = out_features(c, t);
    SPPO_REQUIRE(rank <= std::min(in, out), "lora.rank (", rank, ") exceeds min(in, out) = ", std::min(in, out), " of ",
                 kLoraTargetNames[int(t)], " (", in, " in, ", out, " out)");
  }
}

void OptimizerConfig::validate() const {
  SPPO_REQUIRE(std::isfinite(lr) && lr >= 0, "optimizer.lr must be a finite number >= 0, got ", lr);
  SPPO_REQUIRE(beta1 >= 0 && beta1 < 1, "optimizer.beta1 must be in [0, 1), got ", beta1);
  SPPO_REQUIRE(beta2 >= 0 && beta2 < 1, "optimizer.beta2 must be in [0, 1), got ", beta2);
  SPPO_REQUIRE(alpha >= 0 && alpha < 1, "optimizer.alpha must be in [0, 1), got ", alpha);
  SPPO_REQUIRE(std::isfinite(eps) && eps > 0, "optimizer.eps must be > 0, got ", eps);
  SPPO_REQUIRE(std::isfinite(weight_decay) && weight_decay >= 0, "optimizer.weightDecay must be >= 0, got ",
               weight_decay);
  SPPO_REQUIRE(std::isfinite(max_grad_norm) && max_grad_norm >= 0,
               "optimizer.maxGradNorm must be >= 0 (0 disables clipping), got ", max_grad_norm);
  SPPO_REQUIRE(grad_accum_steps >= 1, "optimizer.gradAccumSteps must be an integer >= 1, got ", grad_accum_steps);
  const ScheduleConfig& s = schedule;
  SPPO_REQUIRE(s.warmup_steps >= 0, "optimizer.schedule.warmupSteps must be >= 0, got ", s.warmup_steps);
  if (s.kind != ScheduleConfig::Kind::Constant) {
    SPPO_REQUIRE(s.total_steps > 0,
                 "optimizer.schedule.totalSteps must be a positive integer for linear and cosine schedules, got ",
                 s.total_steps);
    SPPO_REQUIRE(s.warmup_steps <= s.total_steps, "optimizer.schedule.warmupSteps (", s.warmup_steps,
                 ") exceeds totalSteps (", s.total_steps, ")");
  }
  SPPO_REQUIRE(s.min_lr_ratio >= 0 && s.min_lr_ratio <= 1, "optimizer.schedule.minLrRatio must be in [0, 1], got ",
               s.min_lr_ratio);
}

double OptimizerConfig::lr_at(int64_t step) const {
  const ScheduleConfig& s = schedule;
  // Warm-up ramps from 0 at step 0, as transformers' get_*_schedule_with_warmup do.
  if (step < s.warmup_steps) return lr * double(step) / double(s.warmup_steps);
  switch (s.kind) {
    case ScheduleConfig::Kind::Constant:
      return lr;
    case ScheduleConfig::Kind::Linear: {
      double span = double(std::max<int64_t>(1, s.total_steps - s.warmup_steps));
      return lr * std::max(0.0, double(s.total_steps - step) / span);
    }
    case ScheduleConfig::Kind::Cosine: {
      double span = double(std::max<int64_t>(1, s.total_steps - s.warmup_steps));
      double progress = std::min(1.0, double(step - s.warmup_steps) / span);
      double cosine = 0.5 * (1.0 + std::cos(M_PI * progress));
      return lr * (s.min_lr_ratio + (1.0 - s.min_lr_ratio) * cosine);
    }
  }
  return lr;
}

}  // namespace sppo
