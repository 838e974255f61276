// The NativeGenerator class: batched sampling over a NativeModel's weights.
#pragma once
#include <napi.h>

#include <future>

#include "addon/model_binding.h"
#include "sppo/generate.h"

namespace sppo::addon {

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

}  // namespace sppo::addon
