// The CUDA backend's entry points in a build without it (no nvcc, or SPPO_CUDA=OFF).
#include "core/error.h"
#include "cuda/cuda_backend.h"

namespace sppo::cuda {

DeviceInfo probe() {
  DeviceInfo d;
  d.why_not =
      "this build of the engine has no CUDA backend (nvcc was not found when it was compiled, or "
      "SPPO_CUDA=OFF); reinstall with nvcc on PATH to build it";
  return d;
}

std::unique_ptr<Ops<bf16>> make_ops(int, bool) { throw Error("CUDA is unavailable: " + probe().why_not); }

std::unique_ptr<EncoderOps<float>> make_encoder_ops_fp32(int) {
  throw Error("CUDA is unavailable: " + probe().why_not);
}

}  // namespace sppo::cuda
