// The Node binding: the only code that knows about JavaScript. It converts and checks
// arguments on the JS thread, runs every slow call on a libuv worker (a Promise), and turns
// engine errors into JS exceptions. Config objects use Hugging Face config.json field names.
#include <napi.h>

#include <string>

#include "addon/generator_binding.h"
#include "addon/model_binding.h"
#include "core/threadpool.h"
#include "cpu/gemm.h"
#include "cuda/cuda_backend.h"

namespace {

using namespace sppo::addon;

Napi::Value SetNumThreads(const Napi::CallbackInfo& info) {
  if (!info[0].IsNumber()) throw_type(info.Env(), "threads must be a number");
  int n = info[0].As<Napi::Number>().Int32Value();
  if (n < 0 || n > 1024) throw Napi::RangeError::New(info.Env(), "threads must be between 0 (all cores) and 1024");
  if (g_running_calls.load() > 0)
    throw Napi::Error::New(info.Env(), "cannot change the thread count while a model call is running; await it first");
  sppo::set_num_threads(n);
  return info.Env().Undefined();
}

Napi::Value NumThreads(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), sppo::num_threads()); }

Napi::Value PresetConfig(const Napi::CallbackInfo& info) {
  if (!info[0].IsString()) throw_type(info.Env(), "preset name must be a string");
  try {
    return config_to_js(info.Env(), sppo::preset_config(info[0].As<Napi::String>()));
  } catch (const sppo::Error& e) {
    throw Napi::RangeError::New(info.Env(), e.what());
  }
}

// What the CUDA backend can do here: built into this addon, a usable device, and why not.
Napi::Value CudaInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const sppo::cuda::DeviceInfo d = sppo::cuda::probe();
  Napi::Object o = Napi::Object::New(env);
  o.Set("built", d.built);
  o.Set("available", d.available);
  if (!d.available) o.Set("reason", d.why_not);
  if (d.available) {
    o.Set("name", d.name);
    o.Set("computeCapability", std::to_string(d.sm_major) + "." + std::to_string(d.sm_minor));
    o.Set("totalMemory", double(d.total_memory));
    o.Set("freeMemory", double(d.free_memory));
    o.Set("runtimeVersion", d.runtime_version);
    o.Set("driverVersion", d.driver_version);
  }
  return o;
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("NativeModel", NativeModel::Init(env));
  exports.Set("NativeGenerator", NativeGenerator::Init(env));
  exports.Set("setNumThreads", Napi::Function::New(env, SetNumThreads));
  exports.Set("numThreads", Napi::Function::New(env, NumThreads));
  exports.Set("presetConfig", Napi::Function::New(env, PresetConfig));
  exports.Set("gemmKernel", Napi::String::New(env, sppo::cpu::gemm_kernel_name()));
  exports.Set("cudaInfo", Napi::Function::New(env, CudaInfo));
  exports.Set("abiVersion", Napi::Number::New(env, 2));
  return exports;
}

}  // namespace

NODE_API_MODULE(sppo, Init)
