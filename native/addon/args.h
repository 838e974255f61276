// Arguments read on the JS thread into plain structs a worker can use. The TypeScript layer
// (lib/engine) checks types, shapes and unknown fields and names the caller's mistake; this side
// keeps what memory safety and the engine need: a typed array is read only as its own type,
// every length the engine will index by agrees with the shape it is given, and numbers convert
// without undefined behaviour. A value of the wrong JS type throws node-addon-api's generic error.
#pragma once
#include <napi.h>

#include <cstdint>
#include <exception>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "sppo/config.h"
#include "sppo/generate.h"
#include "sppo/model.h"

namespace sppo::addon {

// Runs `f`, turning an engine error into a RangeError with its message (JS errors pass through).
template <class F>
decltype(auto) or_range_error(Napi::Env env, F&& f) {
  try {
    return f();
  } catch (const Napi::Error&) {
    throw;
  } catch (const std::exception& e) {
    throw Napi::RangeError::New(env, e.what());
  }
}

// A typed array a call reads or fills on a worker: its elements, and a reference that keeps it
// from being collected until the holder is destroyed (on the JS thread).
template <class T>
class Array {
 public:
  Array() = default;
  explicit Array(Napi::TypedArrayOf<T> a)
      : ref_(Napi::Persistent(Napi::Object(a))), data_(a.Data()), size_(int64_t(a.ElementLength())) {}
  // A new zero-filled array of n elements.
  static Array make(Napi::Env env, int64_t n) { return Array(Napi::TypedArrayOf<T>::New(env, size_t(n))); }
  // `v` as an array of T: a TypeError names `what` when it is another kind of value, since
  // reading another type's buffer as T would run past its end.
  static Array read(Napi::Value v, const char* what);

  T* data() const { return data_; }  // null when empty
  int64_t size() const { return size_; }
  bool empty() const { return ref_.IsEmpty(); }
  Napi::Value value() const { return ref_.Value(); }  // JS thread only

 private:
  Napi::ObjectReference ref_;
  T* data_ = nullptr;
  int64_t size_ = 0;
};

template <class T>
Array<T> Array<T>::read(Napi::Value v, const char* what) {
  constexpr auto kind = [] {
    if constexpr (std::is_same_v<T, int32_t>)
      return std::pair{napi_int32_array, "an Int32Array"};
    else if constexpr (std::is_same_v<T, uint8_t>)
      return std::pair{napi_uint8_array, "a Uint8Array"};
    else if constexpr (std::is_same_v<T, float>)
      return std::pair{napi_float32_array, "a Float32Array"};
    else
      return std::pair{napi_float64_array, "a Float64Array"};
  }();
  static_assert(std::is_same_v<T, int32_t> || std::is_same_v<T, uint8_t> || std::is_same_v<T, float> ||
                std::is_same_v<T, double>);
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != kind.first)
    throw Napi::TypeError::New(v.Env(), std::string(what) + " must be " + kind.second);
  return Array(v.As<Napi::TypedArrayOf<T>>());
}

// Refuses an array whose length is not the n elements the engine will index (`shape` says why n).
template <class T>
void require_length(Napi::Env env, const Array<T>& a, int64_t n, const char* what, const std::string& shape) {
  if (a.size() != n)
    throw Napi::RangeError::New(env, std::string(what) + " has " + std::to_string(a.size()) + " elements but " + shape);
}

// (tokens: Int32Array, batch, seq, targetMask?: Uint8Array | null) at info[0..3].
struct BatchArgs {
  Array<int32_t> tokens;  // (batch, seq)
  Array<uint8_t> mask;    // (batch, seq) or empty
  int64_t batch = 0, seq = 0;
  sppo::Batch view() const { return {tokens.data(), mask.data(), batch, seq}; }
};
BatchArgs parse_batch(const Napi::CallbackInfo& info, bool with_mask);

// A batch with mask, then (refLogp: Float64Array, target: Float64Array, loss, eta) at info[4..7].
struct PreferenceArgs {
  BatchArgs seqs;
  Array<double> ref_logp, target;  // (batch)
  sppo::PreferenceLoss loss{};
  double eta = 0;
  sppo::PreferenceBatch view() const { return {seqs.view(), ref_logp.data(), target.data(), loss, eta}; }
};
PreferenceArgs parse_preference(const Napi::CallbackInfo& info);

// Hugging Face config.json field names, as the engine's ModelConfig (validated and resolved).
sppo::ModelConfig parse_model_config(Napi::Env env, Napi::Value v);
Napi::Object config_to_js(Napi::Env env, const sppo::ModelConfig& c);
// The config fields parse_model_config reads and config_to_js writes, in that order.
Napi::Array model_config_fields(Napi::Env env);

sppo::MemoryPlan parse_memory_plan(Napi::Value v);
// NativeModel's options: whether to draw the weights, the device, whether to checkpoint
// activations and to keep gradients in bf16 (lib/engine resolves 'auto' to booleans first), and
// the adapters ({rank, alpha, targets: module names}; the Model constructor validates the values).
struct CreateOptions {
  bool initialize = true;
  std::string device = "cpu";
  bool activation_checkpointing = false;
  bool bf16_gradients = false;
  // The memory plan's switches set from these options.
  sppo::MemoryPlan applied_to(sppo::MemoryPlan plan) const;
  sppo::LoraConfig lora;
  // The backend the device names: 'auto' takes the GPU when one is usable.
  bool cuda() const;
};
CreateOptions parse_create_options(Napi::Env env, Napi::Value v);
// Model.plan's options: NativeModel's, plus the optimizer whose state to count and a generator
// plan whose KV cache to count, each optional.
struct PlanOptions {
  CreateOptions model;
  std::optional<sppo::OptimizerConfig::Kind> optimizer;
  std::optional<sppo::GeneratorPlan> generator;
};
PlanOptions parse_plan_options(Napi::Env env, Napi::Value v);
// A memory report as JavaScript sees it: {params, master, grads, optimizer, activations,
// scratch, kvCache, total} in bytes.
Napi::Object memory_report_to_js(Napi::Env env, const sppo::MemoryReport& r);
sppo::OptimizerConfig parse_optimizer(Napi::Env env, Napi::Value v);

sppo::GeneratorPlan parse_generator_plan(Napi::Value v);
// (tokens: Int32Array, lengths: Int32Array, seeds: Float64Array, samplesPerPrompt, options) at
// info[0..4]: the prompts concatenated in tokens, validated by the generator.
struct GenerateArgs {
  Array<int32_t> tokens;                         // the prompts, concatenated
  std::vector<sppo::SequenceRequest> prompts;    // one per prompt, pointing into tokens
  std::vector<sppo::SequenceRequest> sequences;  // one per sample (prompt-major)
  sppo::SamplingOptions options;
};
GenerateArgs parse_generate(const Napi::CallbackInfo& info, const sppo::GeneratorApi& gen);

}  // namespace sppo::addon
