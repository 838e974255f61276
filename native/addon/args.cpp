// Reading a call's arguments (see args.h). The model config goes through one table of its
// fields, which also writes it back to JS and names the fields the addon exports.
#include "addon/args.h"

#include <cmath>
#include <iterator>
#include <variant>

#include "cuda/cuda_backend.h"

namespace sppo::addon {

namespace {

using sppo::ModelConfig;
using sppo::RopeScaling;

// A JS value as T. Integers use napi's saturating conversions, defined for any double; the
// TypeScript layer has refused non-integers and values out of range.
template <class T>
T value_as(Napi::Value v) {
  if constexpr (std::is_same_v<T, bool>)
    return v.As<Napi::Boolean>().Value();
  else if constexpr (std::is_same_v<T, std::string>)
    return v.As<Napi::String>().Utf8Value();
  else if constexpr (std::is_same_v<T, double>)
    return v.As<Napi::Number>().DoubleValue();
  else if constexpr (std::is_same_v<T, int>)
    return v.As<Napi::Number>().Int32Value();
  else
    return T(v.As<Napi::Number>().Int64Value());  // int64_t, uint64_t (a non-negative seed)
}

bool absent(Napi::Value v) { return v.IsUndefined() || v.IsNull(); }

// A field of an options object, or `fallback` when it is absent.
template <class T>
T field(Napi::Object o, const char* key, T fallback) {
  const Napi::Value v = o.Get(key);
  return absent(v) ? fallback : value_as<T>(v);
}

RopeScaling parse_rope_scaling(Napi::Env env, Napi::Object r) {
  RopeScaling s;
  const std::string kind = field(r, "rope_type", field(r, "type", std::string("default")));
  if (kind == "llama3") {
    s.kind = RopeScaling::Kind::Llama3;
    s.low_freq_factor = field(r, "low_freq_factor", s.low_freq_factor);
    s.high_freq_factor = field(r, "high_freq_factor", s.high_freq_factor);
    s.original_max_position_embeddings =
        field(r, "original_max_position_embeddings", s.original_max_position_embeddings);
  } else if (kind == "linear") {
    s.kind = RopeScaling::Kind::Linear;
  } else if (kind != "default") {
    throw Napi::TypeError::New(
        env, "config.rope_scaling.rope_type '" + kind + "' is not supported (supported: default, linear, llama3)");
  }
  s.factor = field(r, "factor", 1.0);
  return s;
}

Napi::Value rope_scaling_to_js(Napi::Env env, const RopeScaling& r) {
  if (r.kind == RopeScaling::Kind::None) return env.Null();
  Napi::Object s = Napi::Object::New(env);
  s.Set("rope_type", r.kind == RopeScaling::Kind::Linear ? "linear" : "llama3");
  s.Set("factor", r.factor);
  if (r.kind == RopeScaling::Kind::Llama3) {
    s.Set("low_freq_factor", r.low_freq_factor);
    s.Set("high_freq_factor", r.high_freq_factor);
    s.Set("original_max_position_embeddings", r.original_max_position_embeddings);
  }
  return s;
}

// One row per ModelConfig field, in config.json order: parse_model_config reads them,
// config_to_js writes them, and the addon exports their names (modelConfigFields).
using ConfigMember = std::variant<int ModelConfig::*, double ModelConfig::*, bool ModelConfig::*,
                                  uint64_t ModelConfig::*, RopeScaling ModelConfig::*>;
struct ConfigField {
  const char* name;
  ConfigMember member;
};
const ConfigField kConfigFields[] = {
    {"vocab_size", &ModelConfig::vocab_size},
    {"hidden_size", &ModelConfig::hidden_size},
    {"num_hidden_layers", &ModelConfig::num_hidden_layers},
    {"num_attention_heads", &ModelConfig::num_attention_heads},
    {"num_key_value_heads", &ModelConfig::num_key_value_heads},
    {"head_dim", &ModelConfig::head_dim},
    {"intermediate_size", &ModelConfig::intermediate_size},
    {"max_position_embeddings", &ModelConfig::max_position_embeddings},
    {"rms_norm_eps", &ModelConfig::rms_norm_eps},
    {"rope_theta", &ModelConfig::rope_theta},
    {"rope_scaling", &ModelConfig::rope_scaling},
    {"attention_bias", &ModelConfig::attention_bias},
    {"tie_word_embeddings", &ModelConfig::tie_word_embeddings},
    {"initializer_range", &ModelConfig::initializer_range},
    {"seed", &ModelConfig::seed},
};

template <class M>
using MemberType = std::remove_reference_t<decltype(std::declval<ModelConfig&>().*std::declval<M>())>;

}  // namespace

BatchArgs parse_batch(const Napi::CallbackInfo& info, bool with_mask) {
  Napi::Env env = info.Env();
  BatchArgs a;
  a.tokens = Array<int32_t>::read(info[0], "tokens");
  a.batch = info[1].As<Napi::Number>().Int64Value();
  a.seq = info[2].As<Napi::Number>().Int64Value();
  if (a.batch < 0 || a.seq < 0 || a.batch > INT32_MAX || a.seq > INT32_MAX)
    throw Napi::RangeError::New(env, "batch and seq must be 32-bit integers >= 0");
  const std::string shape = "batch x seq = " + std::to_string(a.batch) + " x " + std::to_string(a.seq);
  require_length(env, a.tokens, a.batch * a.seq, "tokens", shape);
  if (with_mask && !absent(info[3])) {
    a.mask = Array<uint8_t>::read(info[3], "targetMask");
    require_length(env, a.mask, a.batch * a.seq, "targetMask", shape);
  }
  return a;
}

PreferenceArgs parse_preference(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  PreferenceArgs a;
  a.seqs = parse_batch(info, true);
  const std::string shape = "the batch has " + std::to_string(a.seqs.batch) + " sequences";
  a.ref_logp = Array<double>::read(info[4], "refLogp");
  require_length(env, a.ref_logp, a.seqs.batch, "refLogp", shape);
  a.target = Array<double>::read(info[5], "target");
  require_length(env, a.target, a.seqs.batch, "target", shape);
  a.loss = or_range_error(env, [&] { return sppo::parse_preference_loss(value_as<std::string>(info[6])); });
  a.eta = value_as<double>(info[7]);
  return a;
}

sppo::ModelConfig parse_model_config(Napi::Env env, Napi::Value v) {
  const Napi::Object o = v.As<Napi::Object>();
  ModelConfig c;  // an absent field keeps the engine's default
  for (const ConfigField& f : kConfigFields) {
    const Napi::Value x = o.Get(f.name);
    if (absent(x)) continue;
    std::visit(
        [&](auto member) {
          using T = MemberType<decltype(member)>;
          if constexpr (std::is_same_v<T, RopeScaling>)
            c.*member = parse_rope_scaling(env, x.As<Napi::Object>());
          else
            c.*member = value_as<T>(x);
        },
        f.member);
  }
  or_range_error(env, [&] { c.resolve_and_validate(); });
  return c;
}

Napi::Object config_to_js(Napi::Env env, const sppo::ModelConfig& c) {
  Napi::Object o = Napi::Object::New(env);
  for (const ConfigField& f : kConfigFields) {
    std::visit(
        [&](auto member) {
          using T = MemberType<decltype(member)>;
          if constexpr (std::is_same_v<T, RopeScaling>)
            o.Set(f.name, rope_scaling_to_js(env, c.*member));
          else if constexpr (std::is_same_v<T, uint64_t>)
            o.Set(f.name, double(c.*member));
          else
            o.Set(f.name, c.*member);
        },
        f.member);
  }
  return o;
}

Napi::Array model_config_fields(Napi::Env env) {
  Napi::Array names = Napi::Array::New(env, std::size(kConfigFields));
  for (uint32_t i = 0; i < std::size(kConfigFields); ++i) names.Set(i, kConfigFields[i].name);
  return names;
}

sppo::MemoryPlan parse_memory_plan(Napi::Value v) {
  const Napi::Object p = v.As<Napi::Object>();
  return {field(p, "maxBatch", 0), field(p, "maxSeq", 0)};
}

sppo::MemoryPlan CreateOptions::applied_to(sppo::MemoryPlan plan) const {
  plan.checkpoint_activations = activation_checkpointing;
  plan.bf16_gradients = bf16_gradients;
  return plan;
}

CreateOptions parse_create_options(Napi::Env env, Napi::Value v) {
  CreateOptions o;
  if (absent(v)) return o;
  const Napi::Object f = v.As<Napi::Object>();
  o.initialize = field(f, "initialize", o.initialize);
  o.device = field(f, "device", o.device);
  if (o.device != "cpu" && o.device != "cuda" && o.device != "auto")
    throw Napi::RangeError::New(env, "options.device must be 'cpu', 'cuda' or 'auto', got '" + o.device + "'");
  o.activation_checkpointing = field(f, "activationCheckpointing", o.activation_checkpointing);
  o.bf16_gradients = field(f, "bf16Gradients", o.bf16_gradients);
  if (!absent(f.Get("lora"))) {
    const Napi::Object l = f.Get("lora").As<Napi::Object>();
    o.lora.rank = field(l, "rank", 0);
    o.lora.alpha = field(l, "alpha", 0.0);
    const Napi::Array targets = l.Get("targets").As<Napi::Array>();
    for (uint32_t i = 0; i < targets.Length(); ++i)
      or_range_error(env, [&] { o.lora.add_target(targets.Get(i).As<Napi::String>().Utf8Value()); });
  }
  return o;
}

PlanOptions parse_plan_options(Napi::Env env, Napi::Value v) {
  PlanOptions p;
  p.model = parse_create_options(env, v);
  if (absent(v)) return p;
  const Napi::Object f = v.As<Napi::Object>();
  if (!absent(f.Get("optimizer"))) p.optimizer = parse_optimizer(env, f.Get("optimizer")).kind;
  if (!absent(f.Get("generator"))) p.generator = parse_generator_plan(f.Get("generator"));
  return p;
}

bool CreateOptions::cuda() const { return device == "cuda" || (device == "auto" && sppo::cuda::probe().available); }

Napi::Object memory_report_to_js(Napi::Env env, const sppo::MemoryReport& r) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("params", double(r.params));
  o.Set("master", double(r.master));
  o.Set("grads", double(r.grads));
  o.Set("optimizer", double(r.optimizer));
  o.Set("activations", double(r.activations));
  o.Set("scratch", double(r.scratch));
  o.Set("kvCache", double(r.kv_cache));
  o.Set("total", double(r.total()));
  return o;
}

sppo::OptimizerConfig parse_optimizer(Napi::Env env, Napi::Value v) {
  const Napi::Object f = v.As<Napi::Object>();
  sppo::OptimizerConfig o;
  const std::string kind = field(f, "kind", std::string("adamw"));
  if (kind == "adamw")
    o.kind = sppo::OptimizerConfig::Kind::AdamW;
  else if (kind == "rmsprop")
    o.kind = sppo::OptimizerConfig::Kind::RMSprop;
  else
    throw Napi::TypeError::New(env, "optimizer.kind must be 'adamw' or 'rmsprop', got '" + kind + "'");
  o.lr = field(f, "lr", o.lr);
  o.beta1 = field(f, "beta1", o.beta1);
  o.beta2 = field(f, "beta2", o.beta2);
  o.alpha = field(f, "alpha", o.alpha);
  o.eps = field(f, "eps", o.eps);
  o.weight_decay = field(f, "weightDecay", o.weight_decay);
  o.max_grad_norm = field(f, "maxGradNorm", o.max_grad_norm);
  o.grad_accum_steps = field(f, "gradAccumSteps", o.grad_accum_steps);
  const Napi::Value schedule = f.Get("schedule");
  if (!absent(schedule)) {
    const Napi::Object s = schedule.As<Napi::Object>();
    const std::string sk = field(s, "kind", std::string("constant"));
    if (sk == "constant")
      o.schedule.kind = sppo::ScheduleConfig::Kind::Constant;
    else if (sk == "linear")
      o.schedule.kind = sppo::ScheduleConfig::Kind::Linear;
    else if (sk == "cosine")
      o.schedule.kind = sppo::ScheduleConfig::Kind::Cosine;
    else
      throw Napi::TypeError::New(env,
                                 "optimizer.schedule.kind must be 'constant', 'linear' or 'cosine', got '" + sk + "'");
    o.schedule.warmup_steps = field(s, "warmupSteps", o.schedule.warmup_steps);
    o.schedule.total_steps = field(s, "totalSteps", o.schedule.total_steps);
    o.schedule.min_lr_ratio = field(s, "minLrRatio", o.schedule.min_lr_ratio);
  }
  or_range_error(env, [&] { o.validate(); });
  return o;
}

sppo::GeneratorPlan parse_generator_plan(Napi::Value v) {
  const Napi::Object p = v.As<Napi::Object>();
  sppo::GeneratorPlan plan;
  plan.max_batch = field(p, "maxBatch", 0);
  plan.max_context = field(p, "maxContext", 0);
  plan.kv_cache_bytes = field(p, "kvCacheBytes", plan.kv_cache_bytes);
  plan.share_prefixes = field(p, "sharePrefixes", plan.share_prefixes);
  plan.pack_weights = field(p, "packWeights", plan.pack_weights);
  return plan;
}

GenerateArgs parse_generate(const Napi::CallbackInfo& info, const sppo::GeneratorApi& gen) {
  Napi::Env env = info.Env();
  GenerateArgs a;
  a.tokens = Array<int32_t>::read(info[0], "prompt tokens");
  const Array<int32_t> lengths = Array<int32_t>::read(info[1], "prompt lengths");
  const Array<double> seeds = Array<double>::read(info[2], "seeds");
  require_length(env, seeds, lengths.size(), "seeds", "there are " + std::to_string(lengths.size()) + " prompts");
  const int64_t samples = value_as<int64_t>(info[3]);
  if (samples < 1)
    throw Napi::RangeError::New(env, "samplesPerPrompt must be at least 1, got " + std::to_string(samples));

  const Napi::Object o = info[4].As<Napi::Object>();
  sppo::SamplingOptions& so = a.options;
  so.max_new_tokens = field(o, "maxNewTokens", so.max_new_tokens);
  so.temperature = field(o, "temperature", so.temperature);
  so.top_k = field(o, "topK", so.top_k);
  so.top_p = field(o, "topP", so.top_p);
  if (!absent(o.Get("stopTokens"))) {
    const Array<int32_t> stop = Array<int32_t>::read(o.Get("stopTokens"), "options.stopTokens");
    so.stop_tokens.assign(stop.data(), stop.data() + stop.size());
  }

  // One request per prompt to validate (errors then name the prompt), one per sample to run.
  std::vector<sppo::SequenceRequest> prompts;
  const std::string mismatch = "prompt lengths do not match the " + std::to_string(a.tokens.size()) + " prompt tokens";
  int64_t at = 0;
  for (int64_t p = 0; p < lengths.size(); ++p) {
    const int64_t len = lengths.data()[p];
    if (len < 0 || at + len > a.tokens.size()) throw Napi::RangeError::New(env, mismatch);
    const double s = seeds.data()[p];  // converted to an integer only when exactly one
    if (!(s >= 0 && s <= 9007199254740991.0 && s == std::floor(s)))
      throw Napi::RangeError::New(env, "seed of prompt " + std::to_string(p) + " must be a non-negative safe integer");
    prompts.push_back({a.tokens.data() + at, len, uint64_t(s), 0});
    for (int64_t k = 0; k < samples; ++k) a.sequences.push_back({a.tokens.data() + at, len, uint64_t(s), uint64_t(k)});
    at += len;
  }
  if (at != a.tokens.size()) throw Napi::RangeError::New(env, mismatch);
  or_range_error(env, [&] { gen.validate(prompts, so); });
  return a;
}

}  // namespace sppo::addon
