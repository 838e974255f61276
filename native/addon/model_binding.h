// The NativeModel class: a model's calls, each run on a libuv worker behind a Promise.
#pragma once
#include <napi.h>

#include <atomic>
#include <functional>
#include <memory>
#include <string>

#include "addon/args.h"
#include "core/error.h"
#include "cpu/cpu_ops.h"
#include "cuda/cuda_backend.h"
#include "sppo/model.h"

namespace sppo::addon {

using sppo::Model;
// Host-side values are float for every backend (the CPU's float model, CUDA's bf16 model with
// float master weights), so the binding holds either behind one interface.
using ModelApi = sppo::ModelApi<float>;

class NativeModel;

extern std::atomic<int> g_running_calls;

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

}  // namespace sppo::addon
