// NativeEncoder: one DeBERTa-v3 encoder with PairRM's head (sppo/encoder.h), on the CPU (fp32)
// or on CUDA (fp32, or bf16 storage with fp32 math; float on the host side either way). Its one
// slow call, pairrm(), runs on a libuv worker behind a Promise and holds the busy flag; the
// TypeScript PairRM judge queues its calls, so the flag only refuses callers that bypass it.
#pragma once
#include <napi.h>

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "sppo/encoder.h"

namespace sppo::addon {

// The encoder's host-side calls, the same for every backend (master_t is float for both).
class EncoderHost {
 public:
  virtual ~EncoderHost() = default;
  virtual const std::vector<sppo::EncoderParam>& parameters() const = 0;
  virtual void set_parameter(const std::string& name, const float* data, int64_t n) = 0;
  virtual void forward(const int32_t* ids, const int32_t* lengths, int64_t batch, int64_t seq, float* hidden) = 0;
  virtual void pairrm_logits(const int32_t* pool, int64_t batch, int64_t seq, double* logits) = 0;
  virtual int64_t max_batch() const = 0;
  virtual int64_t max_seq() const = 0;
  virtual int64_t hidden_size() const = 0;
  // the storage type: "fp32" or "bf16"
  virtual const char* precision() const = 0;
};

class NativeEncoder : public Napi::ObjectWrap<NativeEncoder> {
 public:
  static Napi::Function Init(Napi::Env env);
  // (config: {vocabSize, hiddenSize, numLayers, numHeads, intermediateSize, positionBuckets,
  //  maxRelativePositions, layerNormEps, headHidden}, plan: {maxBatch, maxSeq}, device: 'cpu' | 'cuda',
  //  precision: 'fp32' | 'bf16'); 'bf16' is CUDA's alone (the CPU encoder stores float)
  explicit NativeEncoder(const Napi::CallbackInfo& info);

 private:
  // () => [{name, shape}]: every parameter a checkpoint must hold
  Napi::Value Parameters(const Napi::CallbackInfo& info);
  // (name, values: Float32Array)
  Napi::Value SetParameter(const Napi::CallbackInfo& info);
  // (ids: Int32Array (batch·seq), lengths: Int32Array (batch), pool: Int32Array (batch·3), batch,
  //  seq, hidden: boolean) => Promise<{logits: Float64Array, hidden?: Float32Array}>
  Napi::Value PairRM(const Napi::CallbackInfo& info);
  // () => 'fp32' | 'bf16': the storage type the encoder was made with
  Napi::Value Precision(const Napi::CallbackInfo& info);
  Napi::Value Dispose(const Napi::CallbackInfo& info);
  EncoderHost& usable(Napi::Env env);

  std::unique_ptr<EncoderHost> encoder_;
  std::atomic<bool> busy_{false};
};

}  // namespace sppo::addon
