// Shared by the CUDA sources: checked calls (every CUDA call's status becomes an sppo::Error
// naming the call and the error), bf16 <-> float on the device, and launch arithmetic.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <string>

#include "core/bf16.h"
#include "core/error.h"

namespace sppo::cuda {

[[noreturn]] inline void fail(const char* what, cudaError_t e, const char* file, int line) {
  throw Error(std::string("CUDA error in ") + what + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) +
              ") at " + file + ":" + std::to_string(line));
}

// SPPO_CUDA_CHECK(cudaMemcpyAsync(...)): throws sppo::Error with the call's text on failure.
#define SPPO_CUDA_CHECK(call)                                                           \
  do {                                                                                  \
    cudaError_t sppo_e_ = (call);                                                       \
    if (sppo_e_ != cudaSuccess) ::sppo::cuda::fail(#call, sppo_e_, __FILE__, __LINE__); \
  } while (0)
// After a kernel launch: launch-configuration errors surface here, not at the next sync.
#define SPPO_CUDA_LAUNCHED(kernel_name) SPPO_CUDA_CHECK(cudaGetLastError())

// Counts reallocations of the op sets' grow-on-demand scratch (every op set of the process):
// a recorded graph (CudaOps::graph_capture_begin) holds raw pointers into that scratch, so a
// recording made before a reallocation must not be replayed after it.
inline std::atomic<uint64_t>& scratch_generation() {
  static std::atomic<uint64_t> g{0};
  return g;
}

// The engine's host bf16 and CUDA's __nv_bfloat16 have the same layout (two bytes, same bits).
static_assert(sizeof(__nv_bfloat16) == 2, "bf16 layout");
inline __nv_bfloat16* dev(bf16* p) { return reinterpret_cast<__nv_bfloat16*>(p); }
inline const __nv_bfloat16* dev(const bf16* p) { return reinterpret_cast<const __nv_bfloat16*>(p); }

__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ __nv_bfloat16 to_bf(float x) { return __float2bfloat16_rn(x); }

inline unsigned blocks_for(int64_t n, int threads) { return unsigned((n + threads - 1) / threads); }

// Empty when cuBLASLt (libcublasLt.so.13 / .12, loaded with dlopen on first call) resolves every
// symbol the GEMMs use; otherwise why not, in words. Never throws. Defined in cuda_gemm.cu.
std::string cublaslt_load_error();

}  // namespace sppo::cuda
