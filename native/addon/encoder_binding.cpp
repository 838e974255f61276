// The encoder's binding (encoder_binding.h): arguments read and checked on the JS thread, the
// forward pass and head on a worker.
#include "addon/encoder_binding.h"

#include <string>
#include <type_traits>

#include "addon/args.h"
#include "addon/async_call.h"
#include "addon/model_binding.h"
#include "cpu/cpu_ops.h"
#include "cuda/cuda_backend.h"

namespace sppo::addon {

namespace {

int64_t int_field(Napi::Object o, const char* key) {
  const Napi::Value v = o.Get(key);
  if (!v.IsNumber()) throw Napi::TypeError::New(o.Env(), std::string("encoder config: ") + key + " must be a number");
  const double d = v.As<Napi::Number>().DoubleValue();
  if (d != double(int64_t(d)) || d < 0)
    throw Napi::RangeError::New(o.Env(), std::string("encoder config: ") + key + " must be a non-negative integer");
  return int64_t(d);
}

template <class T>
class EncoderOn final : public EncoderHost {
 public:
  template <class... A>
  explicit EncoderOn(A&&... a) : e_(std::forward<A>(a)...) {}
  const std::vector<sppo::EncoderParam>& parameters() const override { return e_.parameters(); }
  void set_parameter(const std::string& name, const float* data, int64_t n) override {
    e_.set_parameter(name, data, n);
  }
  void forward(const int32_t* ids, const int32_t* lengths, int64_t batch, int64_t seq, float* hidden) override {
    e_.forward(ids, lengths, batch, seq, hidden);
  }
  void pairrm_logits(const int32_t* pool, int64_t batch, int64_t seq, double* logits) override {
    e_.pairrm_logits(pool, batch, seq, logits);
  }
  int64_t max_batch() const override { return e_.max_batch(); }
  int64_t max_seq() const override { return e_.max_seq(); }
  int64_t hidden_size() const override { return e_.config().hidden_size; }
  const char* precision() const override { return std::is_same_v<T, float> ? "fp32" : "bf16"; }

 private:
  sppo::Encoder<T> e_;
};

struct PairRMArgs {
  Array<int32_t> ids, lengths, pool;
  int64_t batch = 0, seq = 0;
  bool want_hidden = false;
  std::vector<double> logits;
  std::vector<float> hidden;
};

}  // namespace

Napi::Function NativeEncoder::Init(Napi::Env env) {
  return DefineClass(
      env, "NativeEncoder",
      {InstanceMethod("parameters", &NativeEncoder::Parameters),
       InstanceMethod("setParameter", &NativeEncoder::SetParameter), InstanceMethod("pairrm", &NativeEncoder::PairRM),
       InstanceMethod("precision", &NativeEncoder::Precision), InstanceMethod("dispose", &NativeEncoder::Dispose)});
}

NativeEncoder::NativeEncoder(const Napi::CallbackInfo& info) : Napi::ObjectWrap<NativeEncoder>(info) {
  Napi::Env env = info.Env();
  if (!info[0].IsObject() || !info[1].IsObject())
    throw Napi::TypeError::New(env, "NativeEncoder(config, {maxBatch, maxSeq})");
  const Napi::Object c = info[0].As<Napi::Object>(), plan = info[1].As<Napi::Object>();
  sppo::EncoderConfig config;
  config.vocab_size = int_field(c, "vocabSize");
  config.hidden_size = int_field(c, "hiddenSize");
  config.num_layers = int_field(c, "numLayers");
  config.num_heads = int_field(c, "numHeads");
  config.intermediate_size = int_field(c, "intermediateSize");
  config.position_buckets = int_field(c, "positionBuckets");
  config.max_relative_positions = int_field(c, "maxRelativePositions");
  config.head_hidden = int_field(c, "headHidden");
  if (!c.Get("layerNormEps").IsNumber())
    throw Napi::TypeError::New(env, "encoder config: layerNormEps must be a number");
  config.layer_norm_eps = c.Get("layerNormEps").As<Napi::Number>().DoubleValue();
  const int64_t max_batch = int_field(plan, "maxBatch"), max_seq = int_field(plan, "maxSeq");
  if (!info[2].IsString() || !info[3].IsString())
    throw Napi::TypeError::New(env, "NativeEncoder: device and precision must be strings");
  const std::string device = info[2].As<Napi::String>().Utf8Value(), precision = info[3].As<Napi::String>().Utf8Value();
  if (device != "cpu" && device != "cuda")
    throw Napi::RangeError::New(env, "the encoder's device must be 'cpu' or 'cuda', got '" + device + "'");
  if (precision != "fp32" && precision != "bf16")
    throw Napi::RangeError::New(env, "the encoder's precision must be 'fp32' or 'bf16', got '" + precision + "'");
  if (device == "cpu" && precision == "bf16")
    throw Napi::RangeError::New(env,
                                "the encoder's precision 'bf16' needs device 'cuda': the CPU encoder stores fp32 only");
  or_range_error(env, [&] {
    // the CUDA factories name why there is no usable GPU (not built, no driver, no device)
    if (device == "cpu")
      encoder_ =
          std::make_unique<EncoderOn<float>>(config, std::make_unique<sppo::cpu::CpuOps<float>>(), max_batch, max_seq);
    else if (precision == "fp32")
      encoder_ = std::make_unique<EncoderOn<float>>(config, sppo::cuda::make_encoder_ops_fp32(0), max_batch, max_seq);
    else
      encoder_ = std::make_unique<EncoderOn<sppo::bf16>>(config, sppo::cuda::make_ops(0), max_batch, max_seq);
    return 0;
  });
}

EncoderHost& NativeEncoder::usable(Napi::Env env) {
  if (!encoder_) throw Napi::Error::New(env, "the encoder is disposed");
  if (busy_.load())
    throw Napi::Error::New(env, "the encoder is busy with another call; await it before starting the next");
  return *encoder_;
}

Napi::Value NativeEncoder::Parameters(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const auto& params = usable(env).parameters();
  Napi::Array out = Napi::Array::New(env, params.size());
  for (uint32_t i = 0; i < params.size(); ++i) {
    Napi::Object p = Napi::Object::New(env);
    p.Set("name", params[i].name);
    Napi::Array shape = Napi::Array::New(env, params[i].shape.size());
    for (uint32_t d = 0; d < params[i].shape.size(); ++d) shape.Set(d, double(params[i].shape[d]));
    p.Set("shape", shape);
    out.Set(i, p);
  }
  return out;
}

Napi::Value NativeEncoder::SetParameter(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto& enc = usable(env);
  if (!info[0].IsString()) throw Napi::TypeError::New(env, "setParameter(name, values): name must be a string");
  const std::string name = info[0].As<Napi::String>();
  const auto values = Array<float>::read(info[1], "values");
  or_range_error(env, [&] {
    enc.set_parameter(name, values.data(), values.size());
    return 0;
  });
  return env.Undefined();
}

Napi::Value NativeEncoder::PairRM(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto& enc = usable(env);
  PairRMArgs a;
  a.ids = Array<int32_t>::read(info[0], "ids");
  a.lengths = Array<int32_t>::read(info[1], "lengths");
  a.pool = Array<int32_t>::read(info[2], "pool");
  if (!info[3].IsNumber() || !info[4].IsNumber()) throw Napi::TypeError::New(env, "batch and seq must be numbers");
  a.batch = info[3].As<Napi::Number>().Int64Value();
  a.seq = info[4].As<Napi::Number>().Int64Value();
  a.want_hidden = info[5].ToBoolean();
  if (a.batch < 1 || a.batch > enc.max_batch() || a.seq < 1 || a.seq > enc.max_seq())
    throw Napi::RangeError::New(env, "a batch of " + std::to_string(a.batch) + " x " + std::to_string(a.seq) +
                                         " tokens does not fit the encoder's plan of " +
                                         std::to_string(enc.max_batch()) + " x " + std::to_string(enc.max_seq()));
  require_length(env, a.ids, a.batch * a.seq, "ids", "batch·seq");
  require_length(env, a.lengths, a.batch, "lengths", "batch");
  require_length(env, a.pool, a.batch * 3, "pool", "batch·3");
  EncoderHost* e = &enc;
  auto work = [e](PairRMArgs& a) {
    a.logits.resize(size_t(a.batch));
    if (a.want_hidden) a.hidden.resize(size_t(a.batch * a.seq * e->hidden_size()));
    e->forward(a.ids.data(), a.lengths.data(), a.batch, a.seq, a.want_hidden ? a.hidden.data() : nullptr);
    e->pairrm_logits(a.pool.data(), a.batch, a.seq, a.logits.data());
  };
  auto to_js = [](Napi::Env env, PairRMArgs& a) {
    Napi::Object o = Napi::Object::New(env);
    auto logits = Napi::Float64Array::New(env, a.logits.size());
    std::copy(a.logits.begin(), a.logits.end(), logits.Data());
    o.Set("logits", logits);
    if (a.want_hidden) {
      auto hidden = Napi::Float32Array::New(env, a.hidden.size());
      std::copy(a.hidden.begin(), a.hidden.end(), hidden.Data());
      o.Set("hidden", hidden);
    }
    return o;
  };
  auto settled = [this, self = Napi::Persistent(Value())] {
    busy_.store(false);
    g_running_calls.fetch_sub(1);
  };
  Napi::Promise promise = run_async(env, std::move(a), work, to_js, std::move(settled));
  busy_.store(true);
  g_running_calls.fetch_add(1);
  return promise;
}

Napi::Value NativeEncoder::Precision(const Napi::CallbackInfo& info) {
  return Napi::String::New(info.Env(), usable(info.Env()).precision());
}

Napi::Value NativeEncoder::Dispose(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  usable(env);
  encoder_.reset();
  return env.Undefined();
}

}  // namespace sppo::addon
