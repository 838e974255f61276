// NativeModel: one model's calls. Slow ones run on a libuv worker behind a Promise
// (async_call.h) and hold the model's busy flag meanwhile; the TypeScript Model queues its
// calls, so the flag only refuses callers that bypass it.
#pragma once
#include <napi.h>

#include <atomic>
#include <memory>
#include <utility>

#include "addon/async_call.h"
#include "sppo/model.h"

namespace sppo::addon {

// Host-side values are float for every backend (the CPU's float model, CUDA's bf16 model with
// float master weights), so the binding holds either behind one interface.
using ModelApi = sppo::ModelApi<float>;

// Calls running on libuv workers, across all models: the thread pool cannot be rebuilt under them.
extern std::atomic<int> g_running_calls;

// Marks the JS objects that are NativeModels, so a generator is only ever made from one.
extern const napi_type_tag kNativeModelTag;

class NativeModel : public Napi::ObjectWrap<NativeModel> {
 public:
  static Napi::Function Init(Napi::Env env);
  // (config, plan: {maxBatch, maxSeq}, options?: {initialize, device})
  explicit NativeModel(const Napi::CallbackInfo& info);

  // The model, or a JS error if it has been disposed.
  ModelApi& live(Napi::Env env);
  // The model, or a JS error if it has been disposed or is busy with another call.
  ModelApi& usable(Napi::Env env);
  bool busy() const { return busy_.load(); }

  // Runs one call on a worker (async_call.h), holding the busy flag and keeping this model's
  // JS object alive until the call settles: the worker reads the model.
  template <class Args, class Work, class ToJs>
  Napi::Value run(Napi::Env env, Args args, Work work, ToJs to_js) {
    auto settled = [this, self = Napi::Persistent(Value())] {
      busy_.store(false);
      g_running_calls.fetch_sub(1);
    };
    Napi::Promise promise = run_async(env, std::move(args), std::move(work), std::move(to_js), std::move(settled));
    busy_.store(true);
    g_running_calls.fetch_add(1);
    return promise;
  }

 private:
  // (tokens: Int32Array, batch, seq, output: 'logits' | 'hidden' | 'both')
  Napi::Value Forward(const Napi::CallbackInfo& info);
  // (tokens, batch, seq, targetMask: Uint8Array | null)
  Napi::Value EvalLoss(const Napi::CallbackInfo& info);
  Napi::Value TrainStep(const Napi::CallbackInfo& info);
  // (tokens, batch, seq, targetMask, perToken: boolean)
  Napi::Value SequenceLogprobs(const Napi::CallbackInfo& info);
  // (tokens, batch, seq, targetMask, refLogp: Float64Array, target: Float64Array, loss, eta)
  Napi::Value EvalPreference(const Napi::CallbackInfo& info) { return PreferenceCall(info, false); }
  Napi::Value PreferenceStep(const Napi::CallbackInfo& info) { return PreferenceCall(info, true); }
  // The preference loss of a batch: without gradients (train = false), or one training micro-step.
  Napi::Value PreferenceCall(const Napi::CallbackInfo& info, bool train);
  Napi::Value SetOptimizer(const Napi::CallbackInfo& info);
  Napi::Value Params(const Napi::CallbackInfo& info);
  Napi::Value GetParam(const Napi::CallbackInfo& info);
  Napi::Value SetParam(const Napi::CallbackInfo& info);
  Napi::Value Memory(const Napi::CallbackInfo& info);
  Napi::Value Config(const Napi::CallbackInfo& info);
  Napi::Value State(const Napi::CallbackInfo& info);
  Napi::Value Dispose(const Napi::CallbackInfo& info);

  std::unique_ptr<ModelApi> model_;
  std::atomic<bool> busy_{false};
};

}  // namespace sppo::addon
