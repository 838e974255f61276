// NativeGenerator: batched sampling with its own KV cache over a NativeModel's weights. Its
// calls hold the model's busy flag, so no training step changes the weights mid-generation.
#pragma once
#include <napi.h>

#include <atomic>
#include <memory>

#include "addon/model_binding.h"
#include "sppo/generate.h"

namespace sppo::addon {

class NativeGenerator : public Napi::ObjectWrap<NativeGenerator> {
 public:
  static Napi::Function Init(Napi::Env env);
  // (model: NativeModel, plan: {maxBatch, maxContext, kvCacheBytes?, sharePrefixes?, packWeights?})
  explicit NativeGenerator(const Napi::CallbackInfo& info);

 private:
  // (tokens: Int32Array, lengths: Int32Array, seeds: Float64Array, samplesPerPrompt, options,
  //  onStep: ((sequences, tokens, logprobs) => void) | null): prompts are concatenated in tokens.
  Napi::Value Generate(const Napi::CallbackInfo& info);
  // Ends the running generate after its current step (a no-op when none runs).
  Napi::Value Abort(const Napi::CallbackInfo& info);
  Napi::Value Memory(const Napi::CallbackInfo& info);
  // {blocks, blockSize, blockBytes, freeBlocks, reservedBlocks}: the KV-cache pool now.
  Napi::Value KvCache(const Napi::CallbackInfo& info);
  // What the last generate did (sppo::GenerateStats, camelCase).
  Napi::Value Stats(const Napi::CallbackInfo& info);
  Napi::Value Dispose(const Napi::CallbackInfo& info);

  // The generator, or a JS error once disposed.
  sppo::GeneratorApi& live(Napi::Env env) const;

  NativeModel* owner_ = nullptr;
  Napi::ObjectReference model_ref_;  // keeps the model (and its weights) alive
  std::unique_ptr<sppo::GeneratorApi> gen_;
  std::atomic<bool> abort_{false};
};

}  // namespace sppo::addon
