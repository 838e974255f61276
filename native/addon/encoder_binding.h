// NativeEncoder: one DeBERTa-v3 encoder with PairRM's head (sppo/encoder.h) on the CPU. Its one
// slow call, pairrm(), runs on a libuv worker behind a Promise and holds the busy flag; the
// TypeScript PairRM judge queues its calls, so the flag only refuses callers that bypass it.
#pragma once
#include <napi.h>

#include <atomic>
#include <memory>

#include "sppo/encoder.h"

namespace sppo::addon {

class NativeEncoder : public Napi::ObjectWrap<NativeEncoder> {
 public:
  static Napi::Function Init(Napi::Env env);
  // (config: {vocabSize, hiddenSize, numLayers, numHeads, intermediateSize, positionBuckets,
  //  maxRelativePositions, layerNormEps, headHidden}, plan: {maxBatch, maxSeq})
  explicit NativeEncoder(const Napi::CallbackInfo& info);

 private:
  // () => [{name, shape}]: every parameter a checkpoint must hold
  Napi::Value Parameters(const Napi::CallbackInfo& info);
  // (name, values: Float32Array)
  Napi::Value SetParameter(const Napi::CallbackInfo& info);
  // (ids: Int32Array (batch·seq), lengths: Int32Array (batch), pool: Int32Array (batch·3), batch,
  //  seq, hidden: boolean) => Promise<{logits: Float64Array, hidden?: Float32Array}>
  Napi::Value PairRM(const Napi::CallbackInfo& info);
  Napi::Value Dispose(const Napi::CallbackInfo& info);
  sppo::Encoder<float>& usable(Napi::Env env);

  std::unique_ptr<sppo::Encoder<float>> encoder_;
  std::atomic<bool> busy_{false};
};

}  // namespace sppo::addon
