// The Node binding: the only code that knows about JavaScript. Arguments are read on the JS
// thread (args.h), every slow call runs on a libuv worker behind a Promise (async_call.h), and
// engine errors become JS exceptions. This file holds the module's functions and its exports,
// among them the lists lib/engine checks its own against (test/native-surface.test.ts).
#include <napi.h>

#include <iterator>
#include <string>

#include "addon/args.h"
#include "addon/encoder_binding.h"
#include "addon/generator_binding.h"
#include "addon/model_binding.h"
#include "core/threadpool.h"
#include "cpu/cpu_ops.h"
#include "cpu/gemm.h"
#include "cuda/cuda_backend.h"
#include "sppo/preference.h"

namespace {

using namespace sppo::addon;

// Changes whenever the exports do; lib/engine/native.ts refuses an addon of another version.
constexpr int kAbiVersion = 5;

Napi::Value SetNumThreads(const Napi::CallbackInfo& info) {
  const int n = info[0].As<Napi::Number>().Int32Value();
  if (n < 0 || n > 1024) throw Napi::RangeError::New(info.Env(), "threads must be between 0 (all cores) and 1024");
  if (g_running_calls.load() > 0)
    throw Napi::Error::New(info.Env(), "cannot change the thread count while a model call is running; await it first");
  sppo::set_num_threads(n);
  return info.Env().Undefined();
}

Napi::Value NumThreads(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), sppo::num_threads()); }

Napi::Value PresetConfig(const Napi::CallbackInfo& info) {
  const std::string name = info[0].As<Napi::String>();
  return or_range_error(info.Env(), [&] { return config_to_js(info.Env(), sppo::preset_config(name)); });
}

// A config with the engine's defaults filled in (num_key_value_heads, head_dim), validated.
Napi::Value ResolveConfig(const Napi::CallbackInfo& info) {
  return config_to_js(info.Env(), parse_model_config(info.Env(), info[0]));
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

// (config, plan, options: CreateOptions' fields (lora included) + optimizer?: 'adamw' | 'rmsprop', generator?:
// {maxBatch, maxContext}): what a model would allocate, by category, without allocating.
Napi::Value PlanMemory(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const sppo::ModelConfig config = parse_model_config(env, info[0]);
  const PlanOptions o = parse_plan_options(env, info[2]);
  const sppo::MemoryPlan plan = o.model.applied_to(parse_memory_plan(info[1]));
  const auto* kind = o.optimizer ? &*o.optimizer : nullptr;
  const auto* gen = o.generator ? &*o.generator : nullptr;
  return or_range_error(env, [&] {
    const sppo::MemoryReport r =
        o.model.cuda()
            ? sppo::plan_memory<sppo::bf16>(config, plan, o.model.lora, sppo::cuda::footprint(), kind, gen)
            : sppo::plan_memory<float>(config, plan, o.model.lora, sppo::cpu::CpuOps<float>::footprint(), kind, gen);
    return memory_report_to_js(env, r);
  });
}

// The projections an adapter may target, in the engine's order (LoraTarget).
Napi::Array lora_targets(Napi::Env env) {
  Napi::Array names = Napi::Array::New(env, sppo::kLoraTargets);
  for (uint32_t i = 0; i < uint32_t(sppo::kLoraTargets); ++i) names.Set(i, sppo::kLoraTargetNames[i]);
  return names;
}

// The preference losses the engine implements, in its order.
Napi::Array preference_losses(Napi::Env env) {
  Napi::Array names = Napi::Array::New(env, std::size(sppo::kPreferenceLosses));
  for (uint32_t i = 0; i < std::size(sppo::kPreferenceLosses); ++i)
    names.Set(i, sppo::preference_loss_name(sppo::kPreferenceLosses[i]));
  return names;
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("NativeModel", NativeModel::Init(env));
  exports.Set("NativeGenerator", NativeGenerator::Init(env));
  exports.Set("NativeEncoder", NativeEncoder::Init(env));
  exports.Set("setNumThreads", Napi::Function::New(env, SetNumThreads));
  exports.Set("numThreads", Napi::Function::New(env, NumThreads));
  exports.Set("presetConfig", Napi::Function::New(env, PresetConfig));
  exports.Set("resolveConfig", Napi::Function::New(env, ResolveConfig));
  exports.Set("planMemory", Napi::Function::New(env, PlanMemory));
  exports.Set("cudaInfo", Napi::Function::New(env, CudaInfo));
  exports.Set("gemmKernel", Napi::String::New(env, sppo::cpu::gemm_kernel_name()));
  exports.Set("preferenceLosses", preference_losses(env));
  exports.Set("loraTargets", lora_targets(env));
  exports.Set("modelConfigFields", model_config_fields(env));
  exports.Set("abiVersion", Napi::Number::New(env, kAbiVersion));
  return exports;
}

}  // namespace

NODE_API_MODULE(sppo, Init)
