// The Node binding: the only code that knows about JavaScript. It converts and checks
// arguments on the JS thread, runs every slow call on a libuv worker (a Promise), and turns
// engine errors into JS exceptions. Config objects use Hugging Face config.json field names.
#include <napi.h>

#include <atomic>
#include <cmath>
#include <future>
#include <memory>
#include <set>
#include <string>

#include "core/error.h"
#include "core/threadpool.h"
#include "cpu/cpu_ops.h"
#include "cpu/gemm.h"
#include "cuda/cuda_backend.h"
#include "sppo/generate.h"
#include "sppo/model.h"

namespace {

using sppo::Model;
using sppo::ModelConfig;
// Host-side values are float for every backend (the CPU's float model, CUDA's bf16 model with
// float master weights), so the binding holds either behind one interface.
using ModelApi = sppo::ModelApi<float>;

[[noreturn]] void throw_type(Napi::Env env, const std::string& msg) {
  throw Napi::TypeError::New(env, msg);
}

// Reads a JS object field by field, refusing unknown keys and wrong types with the field's path.
class Fields {
 public:
  Fields(Napi::Env env, Napi::Value v, std::string path, std::set<std::string> known)
      : env_(env), path_(std::move(path)), known_(std::move(known)) {
    if (!v.IsObject() || v.IsArray()) throw_type(env, path_ + " must be an object");
    obj_ = v.As<Napi::Object>();
    Napi::Array keys = obj_.GetPropertyNames();
    for (uint32_t i = 0; i < keys.Length(); ++i) {
      std::string k = keys.Get(i).ToString();
      if (!known_.count(k)) throw_type(env, path_ + " has an unknown field '" + k + "'");
    }
  }
  bool has(const std::string& k) const { return obj_.Has(k) && !obj_.Get(k).IsUndefined() && !obj_.Get(k).IsNull(); }
  Napi::Value get(const std::string& k) const { return obj_.Get(k); }
  double number(const std::string& k, double fallback) const {
    if (!has(k)) return fallback;
    Napi::Value v = obj_.Get(k);
    if (!v.IsNumber()) throw_type(env_, name(k) + " must be a number, got " + type_of(v));
    double d = v.As<Napi::Number>().DoubleValue();
    if (!std::isfinite(d)) throw_type(env_, name(k) + " must be finite, got " + v.ToString().Utf8Value());
    return d;
  }
  int64_t integer(const std::string& k, int64_t fallback) const {
    double d = number(k, double(fallback));
    if (d != std::floor(d) || std::fabs(d) > 9007199254740991.0) throw_type(env_, name(k) + " must be an integer, got " + std::to_string(d));
    return int64_t(d);
  }
  bool boolean(const std::string& k, bool fallback) const {
    if (!has(k)) return fallback;
    Napi::Value v = obj_.Get(k);
    if (!v.IsBoolean()) throw_type(env_, name(k) + " must be a boolean, got " + type_of(v));
    return v.As<Napi::Boolean>().Value();
  }
  std::string string(const std::string& k, const std::string& fallback) const {
    if (!has(k)) return fallback;
    Napi::Value v = obj_.Get(k);
    if (!v.IsString()) throw_type(env_, name(k) + " must be a string, got " + type_of(v));
    return v.As<Napi::String>().Utf8Value();
  }
  std::string name(const std::string& k) const { return path_ + "." + k; }

 private:
  static std::string type_of(Napi::Value v) {
    switch (v.Type()) {
      case napi_string: return "a string";
      case napi_boolean: return "a boolean";
      case napi_number: return "a number";
      case napi_object: return v.IsArray() ? "an array" : "an object";
      default: return "a " + std::string(v.IsFunction() ? "function" : "value of another type");
    }
  }
  Napi::Env env_;
  std::string path_;
  std::set<std::string> known_;
  Napi::Object obj_;
};

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

class NativeModel;

// Calls running on libuv workers, across all models: the thread pool cannot be rebuilt under them.
std::atomic<int> g_running_calls{0};

// Runs `work` on a libuv worker thread and settles a Promise; holds references to the typed
// arrays it reads or writes so they outlive the call, and releases the model's busy flag.
class Job : public Napi::AsyncWorker {
 public:
  Job(Napi::Env env, NativeModel* owner, std::function<void()> work, std::function<Napi::Value(Napi::Env)> result)
      : Napi::AsyncWorker(env), deferred_(Napi::Promise::Deferred::New(env)), owner_(owner), work_(std::move(work)),
        result_(std::move(result)) {}
  Napi::Promise promise() { return deferred_.Promise(); }
  void keep(Napi::Value v) { kept_.push_back(Napi::Persistent(v.As<Napi::Object>())); }
  void set_work(std::function<void()> work) { work_ = std::move(work); }
  void Execute() override {
    try {
      work_();
    } catch (const std::exception& e) {
      SetError(e.what());
    }
  }
  void OnOK() override;
  void OnError(const Napi::Error& e) override;

 private:
  Napi::Promise::Deferred deferred_;
  NativeModel* owner_;
  std::function<void()> work_;
  std::function<Napi::Value(Napi::Env)> result_;
  std::vector<Napi::ObjectReference> kept_;
};

class NativeModel : public Napi::ObjectWrap<NativeModel> {
 public:
  friend class NativeGenerator;  // shares the busy flag and the call queue

  static Napi::Function Init(Napi::Env env) {
    return DefineClass(env, "NativeModel",
                       {InstanceMethod<&NativeModel::Forward>("forward"),
                        InstanceMethod<&NativeModel::EvalLoss>("evalLoss"),
                        InstanceMethod<&NativeModel::TrainStep>("trainStep"),
                        InstanceMethod<&NativeModel::SequenceLogprobs>("sequenceLogprobs"),
                        InstanceMethod<&NativeModel::EvalPreference>("evalPreference"),
                        InstanceMethod<&NativeModel::PreferenceStep>("preferenceStep"),
                        InstanceMethod<&NativeModel::SetOptimizer>("setOptimizer"),
                        InstanceMethod<&NativeModel::Params>("params"),
                        InstanceMethod<&NativeModel::GetParam>("getParam"),
                        InstanceMethod<&NativeModel::SetParam>("setParam"),
                        InstanceMethod<&NativeModel::Memory>("memory"),
                        InstanceMethod<&NativeModel::Config>("config"),
                        InstanceMethod<&NativeModel::State>("state"),
                        InstanceMethod<&NativeModel::Dispose>("dispose")});
  }

  NativeModel(const Napi::CallbackInfo& info) : Napi::ObjectWrap<NativeModel>(info) {
    Napi::Env env = info.Env();
    ModelConfig c = parse_model_config(env, info[0]);
    Fields p(env, info[1], "plan", {"maxBatch", "maxSeq"});
    sppo::MemoryPlan plan{checked_int(env, p.integer("maxBatch", 0), "plan.maxBatch"),
                          checked_int(env, p.integer("maxSeq", 0), "plan.maxSeq")};
    bool initialize = true;
    std::string device = "cpu";
    if (!info[2].IsUndefined()) {
      Fields o(env, info[2], "options", {"initialize", "device"});
      initialize = o.boolean("initialize", true);
      device = o.string("device", "cpu");
    }
    if (device != "cpu" && device != "cuda" && device != "auto")
      throw Napi::RangeError::New(env, "options.device must be 'cpu', 'cuda' or 'auto', got '" + device + "'");
    if (device == "auto") device = sppo::cuda::probe().available ? "cuda" : "cpu";
    try {
      if (device == "cuda")
        model_ = std::make_unique<Model<sppo::bf16>>(c, plan, sppo::cuda::make_ops(0), initialize);
      else
        model_ = std::make_unique<Model<float>>(c, plan, std::make_unique<sppo::cpu::CpuOps<float>>(), initialize);
    } catch (const std::exception& e) {
      throw Napi::RangeError::New(env, e.what());
    }
  }

  void release() {
    busy_.store(false);
    g_running_calls.fetch_sub(1);
  }

 private:
  ModelApi& usable(Napi::Env env) {
    if (!model_) throw Napi::Error::New(env, "the model has been disposed");
    if (busy_.load()) throw Napi::Error::New(env, "the model is busy with another call; await it before starting the next");
    return *model_;
  }

  // (tokens: Int32Array, batch, seq) checked against each other on the JS thread.
  struct TokenArgs {
    Napi::Int32Array tokens;
    int64_t batch, seq;
  };
  TokenArgs token_args(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!info[0].IsTypedArray() || info[0].As<Napi::TypedArray>().TypedArrayType() != napi_int32_array)
      throw_type(env, "tokens must be an Int32Array");
    if (!info[1].IsNumber() || !info[2].IsNumber()) throw_type(env, "batch and seq must be numbers");
    TokenArgs a{info[0].As<Napi::Int32Array>(), info[1].As<Napi::Number>().Int64Value(), info[2].As<Napi::Number>().Int64Value()};
    if (a.batch < 0 || a.seq < 0 || int64_t(a.tokens.ElementLength()) != a.batch * a.seq)
      throw Napi::RangeError::New(env, "tokens has " + std::to_string(a.tokens.ElementLength()) + " elements but batch x seq = " +
                                           std::to_string(a.batch) + " x " + std::to_string(a.seq));
    return a;
  }
  const uint8_t* mask_arg(const Napi::CallbackInfo& info, size_t index, int64_t n, Job* job) {
    Napi::Value v = info[index];
    if (v.IsUndefined() || v.IsNull()) return nullptr;
    if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array)
      throw_type(info.Env(), "targetMask must be a Uint8Array");
    Napi::Uint8Array m = v.As<Napi::Uint8Array>();
    if (int64_t(m.ElementLength()) != n)
      throw Napi::RangeError::New(info.Env(), "targetMask has " + std::to_string(m.ElementLength()) + " elements, tokens has " + std::to_string(n));
    job->keep(m);
    return m.Data();
  }
  // Jobs are owned here until queued, so an argument error thrown while one is being set up
  // frees it; once queued, libuv owns it. Every job keeps this model's JS object alive: its
  // worker reads the model, which must not be collected mid-call.
  Napi::Value queue(std::unique_ptr<Job> job) {
    job->keep(Value());
    busy_.store(true);
    g_running_calls.fetch_add(1);
    Napi::Promise p = job->promise();
    job.release()->Queue();
    return p;
  }

  Napi::Value Forward(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    ModelApi& m = usable(env);
    TokenArgs a = token_args(info);
    std::string want = info[3].IsString() ? info[3].As<Napi::String>().Utf8Value() : "logits";
    if (want != "logits" && want != "hidden" && want != "both") throw_type(env, "output must be 'logits', 'hidden' or 'both'");
    const ModelConfig& c = m.config();
    const int64_t n = a.batch * a.seq;
    Napi::Float32Array logits, hidden;
    if (want != "hidden") logits = Napi::Float32Array::New(env, size_t(n * c.vocab_size));
    if (want != "logits") hidden = Napi::Float32Array::New(env, size_t(n * c.hidden_size));
    float* lp = logits.IsEmpty() ? nullptr : logits.Data();
    float* hp = hidden.IsEmpty() ? nullptr : hidden.Data();
    const int32_t* tp = a.tokens.Data();
    const int64_t batch = a.batch, seq = a.seq;
    auto job = std::make_unique<Job>(
        env, this, [&m, tp, batch, seq, hp, lp] { m.forward(tp, batch, seq, hp, lp); },
        [logits_ref = std::make_shared<Napi::ObjectReference>(logits.IsEmpty() ? Napi::ObjectReference() : Napi::Persistent(Napi::Object(logits))),
         hidden_ref = std::make_shared<Napi::ObjectReference>(hidden.IsEmpty() ? Napi::ObjectReference() : Napi::Persistent(Napi::Object(hidden)))](Napi::Env env) {
          Napi::Object r = Napi::Object::New(env);
          if (!logits_ref->IsEmpty()) r.Set("logits", logits_ref->Value());
          if (!hidden_ref->IsEmpty()) r.Set("hidden", hidden_ref->Value());
          return r;
        });
    job->keep(a.tokens);
    return queue(std::move(job));
  }

  Napi::Value EvalLoss(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    ModelApi& m = usable(env);
    TokenArgs a = token_args(info);
    auto out = std::make_shared<std::pair<double, int64_t>>();
    auto job = std::make_unique<Job>(env, this, nullptr, [out](Napi::Env env) {
      Napi::Object r = Napi::Object::New(env);
      r.Set("loss", out->first);
      r.Set("targetTokens", double(out->second));
      return r;
    });
    const uint8_t* mask = mask_arg(info, 3, a.batch * a.seq, job.get());
    sppo::Batch b{a.tokens.Data(), mask, a.batch, a.seq};
    job->set_work([&m, b, out] { out->first = m.eval_loss(b, &out->second); });
    job->keep(a.tokens);
    return queue(std::move(job));
  }

  Napi::Value TrainStep(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    ModelApi& m = usable(env);
    TokenArgs a = token_args(info);
    auto out = std::make_shared<sppo::StepResult>();
    auto job = std::make_unique<Job>(env, this, nullptr, [out](Napi::Env env) { return step_to_js(env, *out); });
    const uint8_t* mask = mask_arg(info, 3, a.batch * a.seq, job.get());
    sppo::Batch b{a.tokens.Data(), mask, a.batch, a.seq};
    job->set_work([&m, b, out] { *out = m.train_step(b); });
    job->keep(a.tokens);
    return queue(std::move(job));
  }

  Napi::Value SequenceLogprobs(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    ModelApi& m = usable(env);
    TokenArgs a = token_args(info);
    const bool per_token = info[4].IsBoolean() && info[4].As<Napi::Boolean>().Value();
    Napi::Float64Array sums = Napi::Float64Array::New(env, size_t(a.batch));
    Napi::Float64Array tokens = per_token ? Napi::Float64Array::New(env, size_t(a.batch * a.seq)) : Napi::Float64Array();
    auto refs = std::make_shared<std::pair<Napi::ObjectReference, Napi::ObjectReference>>(
        Napi::Persistent(Napi::Object(sums)), per_token ? Napi::Persistent(Napi::Object(tokens)) : Napi::ObjectReference());
    auto job = std::make_unique<Job>(env, this, nullptr, [refs](Napi::Env env) {
      Napi::Object r = Napi::Object::New(env);
      r.Set("sum", refs->first.Value());
      if (!refs->second.IsEmpty()) r.Set("perToken", refs->second.Value());
      return r;
    });
    const uint8_t* mask = mask_arg(info, 3, a.batch * a.seq, job.get());
    sppo::Batch b{a.tokens.Data(), mask, a.batch, a.seq};
    double* sp = sums.Data();
    double* tp = per_token ? tokens.Data() : nullptr;
    job->set_work([&m, b, sp, tp] { m.sequence_logprobs(b, sp, tp); });
    job->keep(a.tokens);
    return queue(std::move(job));
  }

  // (tokens, batch, seq, mask, refLogp: Float64Array, target: Float64Array, loss, eta)
  struct PreferenceArgs {
    sppo::PreferenceBatch batch;
    Napi::Float64Array logps;  // (batch) out: the policy's sequence log-probs
  };
  PreferenceArgs preference_args(const Napi::CallbackInfo& info, Job* job) {
    Napi::Env env = info.Env();
    TokenArgs a = token_args(info);
    const uint8_t* mask = mask_arg(info, 3, a.batch * a.seq, job);
    auto f64 = [&](size_t i, const char* what) {
      if (!info[i].IsTypedArray() || info[i].As<Napi::TypedArray>().TypedArrayType() != napi_float64_array)
        throw_type(env, std::string(what) + " must be a Float64Array");
      Napi::Float64Array v = info[i].As<Napi::Float64Array>();
      if (int64_t(v.ElementLength()) != a.batch)
        throw Napi::RangeError::New(env, std::string(what) + " has " + std::to_string(v.ElementLength()) +
                                             " entries, the batch has " + std::to_string(a.batch) + " sequences");
      job->keep(v);
      return v.Data();
    };
    const double* ref = f64(4, "refLogp");
    const double* target = f64(5, "target");
    if (!info[6].IsString()) throw_type(env, "loss must be a string");
    if (!info[7].IsNumber()) throw_type(env, "eta must be a number");
    sppo::PreferenceLoss loss;
    try {
      loss = sppo::parse_preference_loss(info[6].As<Napi::String>());
    } catch (const sppo::Error& e) {
      throw Napi::RangeError::New(env, e.what());
    }
    job->keep(a.tokens);
    Napi::Float64Array logps = Napi::Float64Array::New(env, size_t(a.batch));
    job->keep(logps);
    return {{{a.tokens.Data(), mask, a.batch, a.seq}, ref, target, loss, info[7].As<Napi::Number>().DoubleValue()}, logps};
  }

  static Napi::Object metrics_to_js(Napi::Env env, const sppo::PreferenceMetrics& m) {
    // TRL's names, so logs read the same as the reference trainer's.
    Napi::Object o = Napi::Object::New(env);
    o.Set("loss", m.loss);
    if (m.pairs > 0) {
      o.Set("rewards/chosen", m.rewards_chosen);
      o.Set("rewards/rejected", m.rewards_rejected);
      o.Set("rewards/margins", m.rewards_margins);
      o.Set("rewards/accuracies", m.rewards_accuracies);
      o.Set("logps/chosen", m.logps_chosen);
      o.Set("logps/rejected", m.logps_rejected);
    }
    o.Set("rewards/mean", m.rewards_mean);
    o.Set("logps/mean", m.logps_mean);
    return o;
  }

  Napi::Value EvalPreference(const Napi::CallbackInfo& info) { return PreferenceCall(info, false); }
  Napi::Value PreferenceStep(const Napi::CallbackInfo& info) { return PreferenceCall(info, true); }

  // The preference loss of a batch: without gradients (train = false), or one training micro-step.
  Napi::Value PreferenceCall(const Napi::CallbackInfo& info, bool train) {
    Napi::Env env = info.Env();
    ModelApi& m = usable(env);
    auto out = std::make_shared<sppo::PreferenceStepResult>();
    auto logps_ref = std::make_shared<Napi::ObjectReference>();
    auto job = std::make_unique<Job>(env, this, nullptr, [out, logps_ref, train](Napi::Env env) {
      Napi::Object r = train ? step_to_js(env, out->step) : Napi::Object::New(env);
      r.Set("metrics", metrics_to_js(env, out->metrics));
      r.Set("logps", logps_ref->Value());
      return r;
    });
    PreferenceArgs a = preference_args(info, job.get());
    *logps_ref = Napi::Persistent(Napi::Object(a.logps));
    double* lp = a.logps.Data();
    sppo::PreferenceBatch pb = a.batch;
    job->set_work([&m, pb, lp, out, train] {
      if (train) *out = m.preference_step(pb, lp);
      else out->metrics = m.eval_preference(pb, lp);
    });
    return queue(std::move(job));
  }

  static Napi::Object step_to_js(Napi::Env env, const sppo::StepResult& s) {
    Napi::Object r = Napi::Object::New(env);
    r.Set("loss", s.loss);
    r.Set("targetTokens", double(s.target_tokens));
    r.Set("stepped", s.stepped);
    r.Set("step", double(s.step));
    if (s.stepped) {
      r.Set("lr", s.lr);
      r.Set("gradNorm", s.grad_norm);
    }
    return r;
  }

  Napi::Value SetOptimizer(const Napi::CallbackInfo& info) {
    ModelApi& m = usable(info.Env());
    sppo::OptimizerConfig oc = parse_optimizer(info.Env(), info[0]);
    m.set_optimizer(oc);
    return info.Env().Undefined();
  }

  Napi::Value Params(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!model_) throw Napi::Error::New(env, "the model has been disposed");
    const auto& ps = model_->params();
    Napi::Array arr = Napi::Array::New(env, ps.size());
    for (size_t i = 0; i < ps.size(); ++i) {
      Napi::Object o = Napi::Object::New(env);
      o.Set("name", ps[i].name);
      Napi::Array shape = Napi::Array::New(env, ps[i].shape.size());
      for (size_t d = 0; d < ps[i].shape.size(); ++d) shape.Set(uint32_t(d), double(ps[i].shape[d]));
      o.Set("shape", shape);
      arr.Set(uint32_t(i), o);
    }
    return arr;
  }

  Napi::Value GetParam(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    ModelApi& m = usable(env);
    if (!info[0].IsString()) throw_type(env, "parameter name must be a string");
    try {
      const sppo::ParamInfo& p = m.param(info[0].As<Napi::String>());
      Napi::Float32Array out = Napi::Float32Array::New(env, size_t(p.size));
      m.get_param(p.name, out.Data());
      return out;
    } catch (const sppo::Error& e) {
      throw Napi::RangeError::New(env, e.what());
    }
  }

  Napi::Value SetParam(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    ModelApi& m = usable(env);
    if (!info[0].IsString()) throw_type(env, "parameter name must be a string");
    if (!info[1].IsTypedArray() || info[1].As<Napi::TypedArray>().TypedArrayType() != napi_float32_array)
      throw_type(env, "parameter values must be a Float32Array");
    Napi::Float32Array v = info[1].As<Napi::Float32Array>();
    try {
      m.set_param(info[0].As<Napi::String>(), v.Data(), int64_t(v.ElementLength()));
    } catch (const sppo::Error& e) {
      throw Napi::RangeError::New(env, e.what());
    }
    return env.Undefined();
  }

  Napi::Value Memory(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!model_) throw Napi::Error::New(env, "the model has been disposed");
    sppo::MemoryReport r = model_->memory();
    Napi::Object o = Napi::Object::New(env);
    o.Set("params", double(r.params));
    o.Set("grads", double(r.grads));
    o.Set("optimizer", double(r.optimizer));
    o.Set("activations", double(r.activations));
    o.Set("scratch", double(r.scratch));
    o.Set("total", double(r.total()));
    return o;
  }

  Napi::Value Config(const Napi::CallbackInfo& info) {
    if (!model_) throw Napi::Error::New(info.Env(), "the model has been disposed");
    return config_to_js(info.Env(), model_->config());
  }

  Napi::Value State(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Napi::Object o = Napi::Object::New(env);
    o.Set("disposed", !model_);
    o.Set("busy", busy_.load());
    if (model_) {
      o.Set("device", model_->backend());
      o.Set("step", double(model_->optimizer_steps()));
      o.Set("pendingMicroBatches", model_->pending_micro_batches());
      o.Set("numParams", double(model_->num_params()));
    }
    return o;
  }

  Napi::Value Dispose(const Napi::CallbackInfo& info) {
    if (busy_.load()) throw Napi::Error::New(info.Env(), "cannot dispose the model while a call is running; await it first");
    model_.reset();
    return info.Env().Undefined();
  }

  std::unique_ptr<ModelApi> model_;
  std::atomic<bool> busy_{false};
};

// One step's sampled tokens on their way to the JS callback; `delivered` is set once it has run.
struct StepTokens {
  std::vector<sppo::TokenEvent> events;
  std::promise<void> delivered;
};

// Batched sampling: a generator with its own KV cache over a NativeModel's weights. Its
// calls hold the model's busy flag, so no training step changes the weights mid-generation.
class NativeGenerator : public Napi::ObjectWrap<NativeGenerator> {
 public:
  static Napi::Function Init(Napi::Env env) {
    return DefineClass(env, "NativeGenerator",
                       {InstanceMethod<&NativeGenerator::Generate>("generate"),
                        InstanceMethod<&NativeGenerator::Abort>("abort"),
                        InstanceMethod<&NativeGenerator::Memory>("memory"),
                        InstanceMethod<&NativeGenerator::Dispose>("dispose")});
  }

  // (model: NativeModel, plan: {maxBatch, maxContext})
  NativeGenerator(const Napi::CallbackInfo& info) : Napi::ObjectWrap<NativeGenerator>(info) {
    Napi::Env env = info.Env();
    if (!info[0].IsObject()) throw_type(env, "a generator needs the model it samples from");
    owner_ = NativeModel::Unwrap(info[0].As<Napi::Object>());
    model_ref_ = Napi::Persistent(info[0].As<Napi::Object>());
    if (!owner_->model_) throw Napi::Error::New(env, "the model has been disposed");
    Fields p(env, info[1], "plan", {"maxBatch", "maxContext"});
    sppo::GeneratorPlan plan{checked_int(env, p.integer("maxBatch", 0), "plan.maxBatch"),
                             checked_int(env, p.integer("maxContext", 0), "plan.maxContext")};
    try {
      gen_ = owner_->model_->make_generator(plan);
    } catch (const std::exception& e) {
      throw Napi::RangeError::New(env, e.what());
    }
  }

 private:
  // (tokens: Int32Array, lengths: Int32Array, seeds: Float64Array, samplesPerPrompt, options,
  //  onStep: ((sequences, tokens, logprobs) => void) | null): prompts are concatenated in tokens.
  Napi::Value Generate(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!gen_) throw Napi::Error::New(env, "the generator has been disposed");
    owner_->usable(env);
    auto typed = [&](size_t i, napi_typedarray_type t, const char* what) {
      if (!info[i].IsTypedArray() || info[i].As<Napi::TypedArray>().TypedArrayType() != t) throw_type(env, what);
      return info[i].As<Napi::TypedArray>();
    };
    Napi::Int32Array tokens = typed(0, napi_int32_array, "prompt tokens must be an Int32Array").As<Napi::Int32Array>();
    Napi::Int32Array lengths = typed(1, napi_int32_array, "prompt lengths must be an Int32Array").As<Napi::Int32Array>();
    Napi::Float64Array seeds = typed(2, napi_float64_array, "seeds must be a Float64Array").As<Napi::Float64Array>();
    if (!info[3].IsNumber()) throw_type(env, "samplesPerPrompt must be a number");
    const int64_t samples = info[3].As<Napi::Number>().Int64Value();
    if (samples < 1) throw Napi::RangeError::New(env, "samplesPerPrompt must be at least 1, got " + std::to_string(samples));
    const size_t n_prompts = lengths.ElementLength();
    if (seeds.ElementLength() != n_prompts)
      throw Napi::RangeError::New(env, "seeds has " + std::to_string(seeds.ElementLength()) + " entries for " +
                                           std::to_string(n_prompts) + " prompts");

    Fields f(env, info[4], "options", {"maxNewTokens", "temperature", "topK", "topP", "stopTokens"});
    sppo::SamplingOptions o;
    o.max_new_tokens = f.integer("maxNewTokens", -1);
    if (f.has("maxNewTokens") && o.max_new_tokens < 1)
      throw Napi::RangeError::New(env, "maxNewTokens must be at least 1, got " + std::to_string(o.max_new_tokens));
    o.temperature = f.number("temperature", 1.0);
    o.top_k = f.integer("topK", 0);
    o.top_p = f.number("topP", 1.0);
    if (f.has("stopTokens")) {
      Napi::Value st = f.get("stopTokens");
      if (!st.IsTypedArray() || st.As<Napi::TypedArray>().TypedArrayType() != napi_int32_array)
        throw_type(env, "options.stopTokens must be an Int32Array");
      Napi::Int32Array a = st.As<Napi::Int32Array>();
      o.stop_tokens.assign(a.Data(), a.Data() + a.ElementLength());
    }

    // One request per prompt to validate (errors then name the prompt), one per sample to run.
    std::vector<sppo::SequenceRequest> prompts, seqs;
    int64_t at = 0;
    for (size_t p = 0; p < n_prompts; ++p) {
      const int64_t len = lengths.Data()[p];
      if (len < 0 || at + len > int64_t(tokens.ElementLength()))
        throw Napi::RangeError::New(env, "prompt lengths do not match the " + std::to_string(tokens.ElementLength()) + " prompt tokens");
      const double s = seeds.Data()[p];
      if (!(s >= 0 && s <= 9007199254740991.0 && s == std::floor(s)))
        throw Napi::RangeError::New(env, "seed of prompt " + std::to_string(p) + " must be a non-negative safe integer");
      prompts.push_back({tokens.Data() + at, len, uint64_t(s), 0});
      for (int64_t k = 0; k < samples; ++k) seqs.push_back({tokens.Data() + at, len, uint64_t(s), uint64_t(k)});
      at += len;
    }
    if (at != int64_t(tokens.ElementLength()))
      throw Napi::RangeError::New(env, "prompt lengths do not match the " + std::to_string(tokens.ElementLength()) + " prompt tokens");
    try {
      gen_->validate(prompts, o);
    } catch (const sppo::Error& e) {
      throw Napi::RangeError::New(env, e.what());
    }

    // Each step's tokens go to the JS callback through a thread-safe function, and the worker
    // waits until the callback has run: tokens reach JS in step order before the promise
    // settles, and an abort raised inside the callback takes effect at the very next step.
    std::shared_ptr<Napi::ThreadSafeFunction> tsfn;
    if (info[5].IsFunction())
      tsfn = std::make_shared<Napi::ThreadSafeFunction>(
          Napi::ThreadSafeFunction::New(env, info[5].As<Napi::Function>(), "sppo generate onStep", 0, 1));
    abort_.store(false);
    auto out = std::make_shared<std::vector<sppo::SequenceResult>>();
    auto job = std::make_unique<Job>(env, owner_, nullptr, [out](Napi::Env env) {
      size_t total = 0;
      for (const auto& r : *out) total += r.tokens.size();
      Napi::Int32Array toks = Napi::Int32Array::New(env, total);
      Napi::Float64Array lps = Napi::Float64Array::New(env, total);
      Napi::Int32Array counts = Napi::Int32Array::New(env, out->size());
      Napi::Array reasons = Napi::Array::New(env, out->size());
      size_t k = 0;
      for (size_t i = 0; i < out->size(); ++i) {
        const sppo::SequenceResult& r = (*out)[i];
        std::copy(r.tokens.begin(), r.tokens.end(), toks.Data() + k);
        std::copy(r.logprobs.begin(), r.logprobs.end(), lps.Data() + k);
        k += r.tokens.size();
        counts[i] = int32_t(r.tokens.size());
        reasons.Set(uint32_t(i), sppo::stop_reason_name(r.reason));
      }
      Napi::Object res = Napi::Object::New(env);
      res.Set("tokens", toks);
      res.Set("counts", counts);
      res.Set("logprobs", lps);
      res.Set("reasons", reasons);
      return res;
    });
    sppo::GeneratorApi* gen = gen_.get();
    std::atomic<bool>* abort = &abort_;
    job->set_work([gen, seqs, o, out, tsfn, abort] {
      std::function<void(const std::vector<sppo::TokenEvent>&)> on_step;
      if (tsfn)
        on_step = [&tsfn](const std::vector<sppo::TokenEvent>& events) {
          StepTokens step{events, {}};
          std::future<void> done = step.delivered.get_future();
          auto deliver = [](Napi::Env env, Napi::Function fn, StepTokens* st) {
            // Runs on the JS thread, or with a null env while the environment shuts down.
            struct Signal {
              StepTokens* st;
              ~Signal() { st->delivered.set_value(); }
            } signal{st};
            if (!env) return;
            const size_t n = st->events.size();
            Napi::Int32Array s = Napi::Int32Array::New(env, n), t = Napi::Int32Array::New(env, n);
            Napi::Float64Array l = Napi::Float64Array::New(env, n);
            for (size_t i = 0; i < n; ++i) {
              s[i] = int32_t(st->events[i].sequence), t[i] = st->events[i].token, l[i] = st->events[i].logprob;
            }
            fn.Call({s, t, l});
          };
          if (tsfn->BlockingCall(&step, deliver) == napi_ok) done.wait();
        };
      try {
        *out = gen->generate(seqs, o, abort, on_step);
      } catch (...) {
        if (tsfn) tsfn->Release();
        throw;
      }
      if (tsfn) tsfn->Release();
    });
    job->keep(tokens);
    job->keep(info.This());  // the generator outlives its call
    return owner_->queue(std::move(job));
  }

  // Ends the running generate after its current step (a no-op when none runs).
  Napi::Value Abort(const Napi::CallbackInfo& info) {
    abort_.store(true);
    return info.Env().Undefined();
  }

  Napi::Value Memory(const Napi::CallbackInfo& info) {
    if (!gen_) throw Napi::Error::New(info.Env(), "the generator has been disposed");
    return Napi::Number::New(info.Env(), double(gen_->memory_bytes()));
  }

  Napi::Value Dispose(const Napi::CallbackInfo& info) {
    if (owner_->busy_.load())
      throw Napi::Error::New(info.Env(), "cannot dispose the generator while its model runs a call; await it first");
    gen_.reset();
    return info.Env().Undefined();
  }

  NativeModel* owner_ = nullptr;
  Napi::ObjectReference model_ref_;  // keeps the model (and its weights) alive
  std::unique_ptr<sppo::GeneratorApi> gen_;
  std::atomic<bool> abort_{false};
};

void Job::OnOK() {
  owner_->release();
  deferred_.Resolve(result_(Env()));
}

void Job::OnError(const Napi::Error& e) {
  owner_->release();
  deferred_.Reject(e.Value());
}

Napi::Value SetNumThreads(const Napi::CallbackInfo& info) {
  if (!info[0].IsNumber()) throw_type(info.Env(), "threads must be a number");
  int n = info[0].As<Napi::Number>().Int32Value();
  if (n < 0 || n > 1024) throw Napi::RangeError::New(info.Env(), "threads must be between 0 (all cores) and 1024");
  if (g_running_calls.load() > 0)
    throw Napi::Error::New(info.Env(), "cannot change the thread count while a model call is running; await it first");
  sppo::set_num_threads(n);
  return info.Env().Undefined();
}

Napi::Value NumThreads(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), sppo::num_threads()); }

Napi::Value PresetConfig(const Napi::CallbackInfo& info) {
  if (!info[0].IsString()) throw_type(info.Env(), "preset name must be a string");
  try {
    return config_to_js(info.Env(), sppo::preset_config(info[0].As<Napi::String>()));
  } catch (const sppo::Error& e) {
    throw Napi::RangeError::New(info.Env(), e.what());
  }
}

// What the CUDA backend can do here: built into this addon, a usable device, and why not.
Napi::Value CudaInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const sppo::cuda::DeviceInfo d = sppo::cuda::probe();
  Napi::Object o = Napi::Object::New(env);
  o.Set("built", d.built);
  o.Set("available", d.available);
  if (!d.available) o.Set("reason", d.why_not);
  if (d.available) {
    o.Set("name", d.name);
    o.Set("computeCapability", std::to_string(d.sm_major) + "." + std::to_string(d.sm_minor));
    o.Set("totalMemory", double(d.total_memory));
    o.Set("freeMemory", double(d.free_memory));
    o.Set("runtimeVersion", d.runtime_version);
    o.Set("driverVersion", d.driver_version);
  }
  return o;
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("NativeModel", NativeModel::Init(env));
  exports.Set("NativeGenerator", NativeGenerator::Init(env));
  exports.Set("setNumThreads", Napi::Function::New(env, SetNumThreads));
  exports.Set("numThreads", Napi::Function::New(env, NumThreads));
  exports.Set("presetConfig", Napi::Function::New(env, PresetConfig));
  exports.Set("gemmKernel", Napi::String::New(env, sppo::cpu::gemm_kernel_name()));
  exports.Set("cudaInfo", Napi::Function::New(env, CudaInfo));
  exports.Set("abiVersion", Napi::Number::New(env, 2));
  return exports;
}

}  // namespace

NODE_API_MODULE(sppo, Init)
