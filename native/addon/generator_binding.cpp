// NativeGenerator's calls: generate runs on a worker through the model's `run`, streaming each
// step's tokens to a JS callback.
#include "addon/generator_binding.h"

#include <future>
#include <optional>
#include <vector>

#include "addon/args.h"

namespace sppo::addon {

namespace {

// One step's sampled tokens on their way to the JS callback; `delivered` is set once it has run.
struct StepTokens {
  std::vector<sppo::TokenEvent> events;
  std::promise<void> delivered;
};

// Each step's tokens go to the JS callback through a thread-safe function, and the worker
// waits until the callback has run: tokens reach JS in step order before the promise
// settles, and an abort raised inside the callback takes effect at the very next step.
void deliver_step(Napi::ThreadSafeFunction& tsfn, const std::vector<sppo::TokenEvent>& events) {
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
  if (tsfn.BlockingCall(&step, deliver) == napi_ok) done.wait();
}

// The sequences' tokens and log-probs concatenated, with each one's count and stop reason.
Napi::Object results_to_js(Napi::Env env, const std::vector<sppo::SequenceResult>& out) {
  size_t total = 0;
  for (const auto& r : out) total += r.tokens.size();
  Napi::Int32Array toks = Napi::Int32Array::New(env, total);
  Napi::Float64Array lps = Napi::Float64Array::New(env, total);
  Napi::Int32Array counts = Napi::Int32Array::New(env, out.size());
  Napi::Array reasons = Napi::Array::New(env, out.size());
  size_t k = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    const sppo::SequenceResult& r = out[i];
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
}

}  // namespace

Napi::Function NativeGenerator::Init(Napi::Env env) {
  return DefineClass(
      env, "NativeGenerator",
      {InstanceMethod<&NativeGenerator::Generate>("generate"), InstanceMethod<&NativeGenerator::Abort>("abort"),
       InstanceMethod<&NativeGenerator::Memory>("memory"), InstanceMethod<&NativeGenerator::KvCache>("kvCache"),
       InstanceMethod<&NativeGenerator::Stats>("stats"), InstanceMethod<&NativeGenerator::Dispose>("dispose")});
}

NativeGenerator::NativeGenerator(const Napi::CallbackInfo& info) : Napi::ObjectWrap<NativeGenerator>(info) {
  Napi::Env env = info.Env();
  // Unwrapping any other wrapped object as a NativeModel would misread its memory.
  if (!info[0].IsObject() || !info[0].As<Napi::Object>().CheckTypeTag(&kNativeModelTag))
    throw Napi::TypeError::New(env, "a generator needs the model it samples from");
  owner_ = NativeModel::Unwrap(info[0].As<Napi::Object>());
  model_ref_ = Napi::Persistent(info[0].As<Napi::Object>());
  ModelApi& model = owner_->live(env);
  const sppo::GeneratorPlan plan = parse_generator_plan(info[1]);
  gen_ = or_range_error(env, [&] { return model.make_generator(plan); });
}

sppo::GeneratorApi& NativeGenerator::live(Napi::Env env) const {
  if (!gen_) throw Napi::Error::New(env, "the generator has been disposed");
  return *gen_;
}

Napi::Value NativeGenerator::Generate(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  live(env);
  owner_->usable(env);
  struct Args {
    GenerateArgs in;
    Napi::ObjectReference self;  // the generator outlives its call
    std::optional<Napi::ThreadSafeFunction> on_step{};
    std::vector<sppo::SequenceResult> out{};
  };
  Args a{.in = parse_generate(info, *gen_), .self = Napi::Persistent(Value())};
  if (info[5].IsFunction())
    a.on_step = Napi::ThreadSafeFunction::New(env, info[5].As<Napi::Function>(), "sppo generate onStep", 0, 1);
  abort_.store(false);
  return owner_->run(
      env, std::move(a),
      [gen = gen_.get(), abort = &abort_](Args& a) {
        std::function<void(const std::vector<sppo::TokenEvent>&)> on_step;
        if (a.on_step)
          on_step = [&a](const std::vector<sppo::TokenEvent>& events) { deliver_step(*a.on_step, events); };
        try {
          a.out = gen->generate(a.in.sequences, a.in.options, abort, on_step);
        } catch (...) {
          if (a.on_step) a.on_step->Release();
          throw;
        }
        if (a.on_step) a.on_step->Release();
      },
      [](Napi::Env env, Args& a) { return results_to_js(env, a.out); });
}

Napi::Value NativeGenerator::Abort(const Napi::CallbackInfo& info) {
  abort_.store(true);
  return info.Env().Undefined();
}

Napi::Value NativeGenerator::Memory(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), double(live(info.Env()).memory_bytes()));
}

Napi::Value NativeGenerator::KvCache(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const sppo::KvPoolState st = live(env).pool_state();
  Napi::Object o = Napi::Object::New(env);
  o.Set("blocks", double(st.blocks));
  o.Set("blockSize", double(sppo::kKvBlockSize));
  o.Set("blockBytes", double(gen_->kv_block_bytes()));
  o.Set("freeBlocks", double(st.free));
  o.Set("reservedBlocks", double(st.reserved));
  return o;
}

Napi::Value NativeGenerator::Stats(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const sppo::GenerateStats& st = live(env).last_stats();
  Napi::Object o = Napi::Object::New(env);
  o.Set("steps", double(st.steps));
  o.Set("promptRows", double(st.prompt_rows));
  o.Set("generatedRows", double(st.generated_rows));
  o.Set("sharedPrompts", double(st.shared_prompts));
  o.Set("copiedBlocks", double(st.copied_blocks));
  o.Set("peakBlocks", double(st.peak_blocks));
  o.Set("peakSequences", double(st.peak_sequences));
  return o;
}

Napi::Value NativeGenerator::Dispose(const Napi::CallbackInfo& info) {
  if (owner_->busy())
    throw Napi::Error::New(info.Env(), "cannot dispose the generator while its model runs a call; await it first");
  gen_.reset();
  return info.Env().Undefined();
}

}  // namespace sppo::addon
