#include "addon/args.h"

namespace sppo::addon {

[[noreturn]] void throw_type(Napi::Env env, const std::string& msg) {
  throw Napi::TypeError::New(env, msg);
}

int checked_int(Napi::Env env, int64_t v, const std::string& name) {
  if (v < INT32_MIN || v > INT32_MAX) throw_type(env, name + " is out of range");
  return int(v);
}

ModelConfig parse_model_config(Napi::Env env, Napi::Value v) {
  Fields f(env, v, "config",
           {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
            "intermediate_size", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
            "attention_bias", "tie_word_embeddings", "initializer_range", "seed"});
  ModelConfig c;
  auto i32 = [&](const char* k, int fallback) { return checked_int(env, f.integer(k, fallback), f.name(k)); };
  c.vocab_size = i32("vocab_size", 0);
  c.hidden_size = i32("hidden_size", 0);
  c.num_hidden_layers = i32("num_hidden_layers", 0);
  c.num_attention_heads = i32("num_attention_heads", 0);
  c.num_key_value_heads = i32("num_key_value_heads", 0);
  c.head_dim = i32("head_dim", 0);
  c.intermediate_size = i32("intermediate_size", 0);
  c.max_position_embeddings = i32("max_position_embeddings", 0);
  c.rms_norm_eps = f.number("rms_norm_eps", c.rms_norm_eps);
  c.rope_theta = f.number("rope_theta", c.rope_theta);
  c.attention_bias = f.boolean("attention_bias", false);
  c.tie_word_embeddings = f.boolean("tie_word_embeddings", false);
  c.initializer_range = f.number("initializer_range", c.initializer_range);
  int64_t seed = f.integer("seed", 0);
  if (seed < 0) throw_type(env, "config.seed must be a non-negative integer");
  c.seed = uint64_t(seed);
  if (f.has("rope_scaling")) {
    Fields r(env, f.get("rope_scaling"), "config.rope_scaling",
             {"rope_type", "type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"});
    std::string kind = r.string("rope_type", r.string("type", "default"));
    if (kind == "llama3") {
      c.rope_scaling.kind = sppo::RopeScaling::Kind::Llama3;
      c.rope_scaling.low_freq_factor = r.number("low_freq_factor", c.rope_scaling.low_freq_factor);
      c.rope_scaling.high_freq_factor = r.number("high_freq_factor", c.rope_scaling.high_freq_factor);
      c.rope_scaling.original_max_position_embeddings =
          checked_int(env, r.integer("original_max_position_embeddings", c.rope_scaling.original_max_position_embeddings),
                      "config.rope_scaling.original_max_position_embeddings");
    } else if (kind == "linear") {
      c.rope_scaling.kind = sppo::RopeScaling::Kind::Linear;
    } else if (kind != "default") {
      throw_type(env, "config.rope_scaling.rope_type '" + kind + "' is not supported (supported: default, linear, llama3)");
    }
    c.rope_scaling.factor = r.number("factor", 1.0);
  }
  try {
    c.resolve_and_validate();
  } catch (const std::exception& e) {
    throw Napi::RangeError::New(env, e.what());
  }
  return c;
}

sppo::OptimizerConfig parse_optimizer(Napi::Env env, Napi::Value v) {
  Fields f(env, v, "optimizer",
           {"kind", "lr", "beta1", "beta2", "alpha", "eps", "weightDecay", "maxGradNorm", "gradAccumSteps", "schedule"});
  sppo::OptimizerConfig o;
  std::string kind = f.string("kind", "adamw");
  if (kind == "adamw") o.kind = sppo::OptimizerConfig::Kind::AdamW;
  else if (kind == "rmsprop") o.kind = sppo::OptimizerConfig::Kind::RMSprop;
  else throw_type(env, "optimizer.kind must be 'adamw' or 'rmsprop', got '" + kind + "'");
  o.lr = f.number("lr", o.lr);
  o.beta1 = f.number("beta1", o.beta1);
  o.beta2 = f.number("beta2", o.beta2);
  o.alpha = f.number("alpha", o.alpha);
  o.eps = f.number("eps", o.eps);
  o.weight_decay = f.number("weightDecay", o.weight_decay);
  o.max_grad_norm = f.number("maxGradNorm", o.max_grad_norm);
  o.grad_accum_steps = checked_int(env, f.integer("gradAccumSteps", 1), "optimizer.gradAccumSteps");
  if (f.has("schedule")) {
    Fields s(env, f.get("schedule"), "optimizer.schedule", {"kind", "warmupSteps", "totalSteps", "minLrRatio"});
    std::string sk = s.string("kind", "constant");
    if (sk == "constant") o.schedule.kind = sppo::ScheduleConfig::Kind::Constant;
    else if (sk == "linear") o.schedule.kind = sppo::ScheduleConfig::Kind::Linear;
    else if (sk == "cosine") o.schedule.kind = sppo::ScheduleConfig::Kind::Cosine;
    else throw_type(env, "optimizer.schedule.kind must be 'constant', 'linear' or 'cosine', got '" + sk + "'");
    o.schedule.warmup_steps = s.integer("warmupSteps", 0);
    o.schedule.total_steps = s.integer("totalSteps", 0);
    o.schedule.min_lr_ratio = s.number("minLrRatio", 0.0);
  }
  try {
    o.validate();
  } catch (const std::exception& e) {
    throw Napi::RangeError::New(env, e.what());
  }
  return o;
}

Napi::Object config_to_js(Napi::Env env, const ModelConfig& c) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("vocab_size", c.vocab_size);
  o.Set("hidden_size", c.hidden_size);
  o.Set("num_hidden_layers", c.num_hidden_layers);
  o.Set("num_attention_heads", c.num_attention_heads);
  o.Set("num_key_value_heads", c.num_key_value_heads);
  o.Set("head_dim", c.head_dim);
  o.Set("intermediate_size", c.intermediate_size);
  o.Set("max_position_embeddings", c.max_position_embeddings);
  o.Set("rms_norm_eps", c.rms_norm_eps);
  o.Set("rope_theta", c.rope_theta);
  o.Set("attention_bias", c.attention_bias);
  o.Set("tie_word_embeddings", c.tie_word_embeddings);
  o.Set("initializer_range", c.initializer_range);
  o.Set("seed", double(c.seed));
  const auto& r = c.rope_scaling;
  if (r.kind == sppo::RopeScaling::Kind::None) {
    o.Set("rope_scaling", env.Null());
  } else {
    Napi::Object s = Napi::Object::New(env);
    s.Set("rope_type", r.kind == sppo::RopeScaling::Kind::Linear ? "linear" : "llama3");
    s.Set("factor", r.factor);
    if (r.kind == sppo::RopeScaling::Kind::Llama3) {
      s.Set("low_freq_factor", r.low_freq_factor);
      s.Set("high_freq_factor", r.high_freq_factor);
      s.Set("original_max_position_embeddings", r.original_max_position_embeddings);
    }
    o.Set("rope_scaling", s);
  }
  return o;
}

}  // namespace sppo::addon
