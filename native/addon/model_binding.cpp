// NativeModel's calls: each reads its arguments (args.h), then runs on a worker (`run`) or,
// for the quick ones, returns at once.
#include "addon/model_binding.h"

#include <string>

#include "addon/args.h"
#include "cpu/cpu_ops.h"
#include "cuda/cuda_backend.h"

namespace sppo::addon {

std::atomic<int> g_running_calls{0};
const napi_type_tag kNativeModelTag = {0x5f0c2d6e1b8a4c37, 0x9a41e7d2c3b65f08};

namespace {

Napi::Object step_to_js(Napi::Env env, const sppo::StepResult& s) {
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

// TRL's names, so logs read the same as the reference trainer's.
Napi::Object metrics_to_js(Napi::Env env, const sppo::PreferenceMetrics& m) {
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

}  // namespace

Napi::Function NativeModel::Init(Napi::Env env) {
  return DefineClass(
      env, "NativeModel",
      {InstanceMethod<&NativeModel::Forward>("forward"), InstanceMethod<&NativeModel::EvalLoss>("evalLoss"),
       InstanceMethod<&NativeModel::TrainStep>("trainStep"),
       InstanceMethod<&NativeModel::SequenceLogprobs>("sequenceLogprobs"),
       InstanceMethod<&NativeModel::EvalPreference>("evalPreference"),
       InstanceMethod<&NativeModel::PreferenceStep>("preferenceStep"),
       InstanceMethod<&NativeModel::SetOptimizer>("setOptimizer"), InstanceMethod<&NativeModel::Params>("params"),
       InstanceMethod<&NativeModel::GetParam>("getParam"), InstanceMethod<&NativeModel::SetParam>("setParam"),
       InstanceMethod<&NativeModel::Memory>("memory"), InstanceMethod<&NativeModel::Config>("config"),
       InstanceMethod<&NativeModel::State>("state"), InstanceMethod<&NativeModel::Dispose>("dispose")});
}

NativeModel::NativeModel(const Napi::CallbackInfo& info) : Napi::ObjectWrap<NativeModel>(info) {
  Napi::Env env = info.Env();
  const sppo::ModelConfig config = parse_model_config(env, info[0]);
  const CreateOptions o = parse_create_options(env, info[2]);
  const sppo::MemoryPlan plan = o.applied_to(parse_memory_plan(info[1]));
  model_ = or_range_error(env, [&]() -> std::unique_ptr<ModelApi> {
    std::unique_ptr<ModelApi> m;
    if (o.cuda())
      m = std::make_unique<sppo::Model<sppo::bf16>>(config, plan, sppo::cuda::make_ops(0), o.initialize, o.lora);
    else
      m = std::make_unique<sppo::Model<float>>(config, plan, std::make_unique<sppo::cpu::CpuOps<float>>(), o.initialize,
                                               o.lora);
    // A caller that loads the base weights starts from fresh adapters (it may load those too).
    if (!o.initialize && o.lora.enabled()) m->initialize_adapters();
    return m;
  });
  info.This().As<Napi::Object>().TypeTag(&kNativeModelTag);
}

ModelApi& NativeModel::live(Napi::Env env) {
  if (!model_) throw Napi::Error::New(env, "the model has been disposed");
  return *model_;
}

ModelApi& NativeModel::usable(Napi::Env env) {
  ModelApi& m = live(env);
  if (busy_.load())
    throw Napi::Error::New(env, "the model is busy with another call; await it before starting the next");
  return m;
}

Napi::Value NativeModel::Forward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ModelApi& m = usable(env);
  struct Args {
    BatchArgs in;
    Array<float> logits{};  // (batch, seq, vocab_size), unless only hidden states are asked for
    Array<float> hidden{};  // (batch, seq, hidden_size), when asked for
  };
  Args a{.in = parse_batch(info, false)};
  const std::string want = info[3].As<Napi::String>();
  if (want != "logits" && want != "hidden" && want != "both")
    throw Napi::TypeError::New(env, "output must be 'logits', 'hidden' or 'both'");
  const int64_t n = a.in.batch * a.in.seq;
  if (want != "hidden") a.logits = Array<float>::make(env, n * m.config().vocab_size);
  if (want != "logits") a.hidden = Array<float>::make(env, n * m.config().hidden_size);
  return run(
      env, std::move(a),
      [&m](Args& a) { m.forward(a.in.tokens.data(), a.in.batch, a.in.seq, a.hidden.data(), a.logits.data()); },
      [](Napi::Env env, Args& a) {
        Napi::Object r = Napi::Object::New(env);
        if (!a.logits.empty()) r.Set("logits", a.logits.value());
        if (!a.hidden.empty()) r.Set("hidden", a.hidden.value());
        return r;
      });
}

Napi::Value NativeModel::EvalLoss(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ModelApi& m = usable(env);
  struct Args {
    BatchArgs in;
    double loss = 0;
    int64_t target_tokens = 0;
  };
  return run(
      env, Args{.in = parse_batch(info, true)}, [&m](Args& a) { a.loss = m.eval_loss(a.in.view(), &a.target_tokens); },
      [](Napi::Env env, Args& a) {
        Napi::Object r = Napi::Object::New(env);
        r.Set("loss", a.loss);
        r.Set("targetTokens", double(a.target_tokens));
        return r;
      });
}

Napi::Value NativeModel::TrainStep(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ModelApi& m = usable(env);
  struct Args {
    BatchArgs in;
    sppo::StepResult out{};
  };
  return run(
      env, Args{.in = parse_batch(info, true)}, [&m](Args& a) { a.out = m.train_step(a.in.view()); },
      [](Napi::Env env, Args& a) { return step_to_js(env, a.out); });
}

Napi::Value NativeModel::SequenceLogprobs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ModelApi& m = usable(env);
  struct Args {
    BatchArgs in;
    Array<double> sum{};        // (batch)
    Array<double> per_token{};  // (batch, seq), when asked for
  };
  Args a{.in = parse_batch(info, true)};
  a.sum = Array<double>::make(env, a.in.batch);
  if (info[4].As<Napi::Boolean>().Value()) a.per_token = Array<double>::make(env, a.in.batch * a.in.seq);
  return run(
      env, std::move(a), [&m](Args& a) { m.sequence_logprobs(a.in.view(), a.sum.data(), a.per_token.data()); },
      [](Napi::Env env, Args& a) {
        Napi::Object r = Napi::Object::New(env);
        r.Set("sum", a.sum.value());
        if (!a.per_token.empty()) r.Set("perToken", a.per_token.value());
        return r;
      });
}

Napi::Value NativeModel::PreferenceCall(const Napi::CallbackInfo& info, bool train) {
  Napi::Env env = info.Env();
  ModelApi& m = usable(env);
  struct Args {
    PreferenceArgs in;
    Array<double> logps{};  // (batch) the policy's sequence log-probs
    sppo::PreferenceStepResult out{};
  };
  Args a{.in = parse_preference(info)};
  a.logps = Array<double>::make(env, a.in.seqs.batch);
  return run(
      env, std::move(a),
      [&m, train](Args& a) {
        if (train)
          a.out = m.preference_step(a.in.view(), a.logps.data());
        else
          a.out.metrics = m.eval_preference(a.in.view(), a.logps.data());
      },
      [train](Napi::Env env, Args& a) {
        Napi::Object r = train ? step_to_js(env, a.out.step) : Napi::Object::New(env);
        r.Set("metrics", metrics_to_js(env, a.out.metrics));
        r.Set("logps", a.logps.value());
        return r;
      });
}

Napi::Value NativeModel::SetOptimizer(const Napi::CallbackInfo& info) {
  ModelApi& m = usable(info.Env());
  m.set_optimizer(parse_optimizer(info.Env(), info[0]));
  return info.Env().Undefined();
}

Napi::Value NativeModel::Params(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const auto& ps = live(env).params();
  Napi::Array arr = Napi::Array::New(env, ps.size());
  for (size_t i = 0; i < ps.size(); ++i) {
    Napi::Object o = Napi::Object::New(env);
    o.Set("name", ps[i].name);
    Napi::Array shape = Napi::Array::New(env, ps[i].shape.size());
    for (size_t d = 0; d < ps[i].shape.size(); ++d) shape.Set(uint32_t(d), double(ps[i].shape[d]));
    o.Set("shape", shape);
    o.Set("trainable", ps[i].trainable);
    o.Set("adapter", ps[i].adapter);
    arr.Set(uint32_t(i), o);
  }
  return arr;
}

Napi::Value NativeModel::GetParam(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ModelApi& m = usable(env);
  const std::string name = info[0].As<Napi::String>();
  return or_range_error(env, [&] {
    const sppo::ParamInfo& p = m.param(name);
    Napi::Float32Array out = Napi::Float32Array::New(env, size_t(p.size));
    m.get_param(p.name, out.Data());
    return out;
  });
}

Napi::Value NativeModel::SetParam(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ModelApi& m = usable(env);
  const std::string name = info[0].As<Napi::String>();
  const Array<float> values = Array<float>::read(info[1], "parameter values");
  or_range_error(env, [&] { m.set_param(name, values.data(), values.size()); });
  return env.Undefined();
}

Napi::Value NativeModel::Memory(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return memory_report_to_js(env, live(env).memory());
}

Napi::Value NativeModel::Config(const Napi::CallbackInfo& info) {
  return config_to_js(info.Env(), live(info.Env()).config());
}

Napi::Value NativeModel::State(const Napi::CallbackInfo& info) {
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

Napi::Value NativeModel::Dispose(const Napi::CallbackInfo& info) {
  if (busy_.load())
    throw Napi::Error::New(info.Env(), "cannot dispose the model while a call is running; await it first");
  model_.reset();
  return info.Env().Undefined();
}

}  // namespace sppo::addon
