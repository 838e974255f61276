// What the attention family's files share (native/cuda/attention/): causal grouped-query
// attention on the GPU, with the flash-style forward, the flash-attention-2 backward (dQ, and
// dK/dV, each by its own kernel so every output has one writer and a fixed summation order: no
// float atomics), and the KV-cache write and split decode of batched sampling.
//
// Three implementations of the forward and backward: register-resident tensor-core kernels
// (mma.sync PTX, FlashAttention-2 structure) for head_dim 32, 64 and 128 (mma.cu,
// SPPO_CUDA_ATTENTION=mma, not yet run on a GPU); the WMMA tensor-core kernels for the same head
// dims (wmma.cu), the default (checked on an H200) until a GPU job has checked and timed both,
// then one of the two goes; and fp32 FMA kernels from tiles staged as fp32 (fma.cu), for every
// head_dim, which are also the tensor cores' reference (SPPO_CUDA_ATTENTION=fma). All run the
// softmax in the base-2 domain (scores pre-multiplied by scale*log2(e)) and save log-sum-exps in
// the natural log, as the CPU backend saves them (native/cpu/cpu_ops.cpp is the reference).
// dispatch.cu picks the implementation and holds the op entry points; decode.cu the KV cache.
//
// Two sections: the tiling and device helpers the kernels share, then the host side: the
// family's state, the launch helpers and each implementation's kernel table (AttnKernels).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <type_traits>
#include <unordered_map>

#include "core/error.h"
#include "cuda/cuda_common.cuh"
#include "cuda/cuda_ops.cuh"

namespace sppo::cuda::attn {

// ---- Tiling shared by the forward and backward kernels ----
// A block owns kTile queries (or keys) of one (batch, head) and walks kTile-row tiles of the
// other side up to the causal limit (the mma.sync kernels: kFaRows and kFaCols, mma.cu).
constexpr int kTile = 64;
constexpr int kThreads = 256;  // the FMA kernels' block (fma.cu)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

struct AttnParams {
  int B, T, H, KV, D, group;
  int64_t qkv_stride, q_off, k_off, v_off, out_stride;
  float scale_log2;  // scale * log2(e)
  int n_tiles;       // ceil(T / kTile)
  bool vec;          // tensor-core staging: every tile row starts 16-byte aligned (16-byte copies)
};

// Sum / max over each group of `Lanes` consecutive lanes: 32, the warp (the delta and decode
// kernels), or 16, a half-warp (the FMA kernels' threads sharing a row). The butterfly leaves every
// lane of a group with the same bits, and the order is fixed, so the result is deterministic.
template <int Lanes>
__device__ __forceinline__ float lanes_sum(float x) {
#pragma unroll
  for (int o = Lanes / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
template <int Lanes>
__device__ __forceinline__ float lanes_max(float x) {
#pragma unroll
  for (int o = Lanes / 2; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// The tensor-core kernels' fallback staging (a tile row not 16-byte aligned): rows [0, valid) of
// a (ROWS, D) bf16 block at src (row stride ld) into dst (row stride LDS) one element at a time,
// by the THREADS threads of the block; rows past `valid` become zeros.
template <int D, int ROWS, int LDS, int THREADS>
__device__ __forceinline__ void copy_tile_elements(__nv_bfloat16* __restrict__ dst,
                                                   const __nv_bfloat16* __restrict__ src, int64_t ld, int valid) {
  const __nv_bfloat16 zero = to_bf(0.f);
#pragma unroll 4
  for (int e = threadIdx.x; e < ROWS * D; e += THREADS) {
    const int r = e / D, c = e % D;
    dst[r * LDS + c] = r < valid ? src[int64_t(r) * ld + c] : zero;
  }
}

// Where a block of a query-side kernel (forward, dQ) works: query block qb (of n_blocks per
// head, the heaviest, last ones first) of batch b and head h, whose kv head is kvh.
struct QueryBlock {
  int qb, b, h, kvh;
};
__device__ __forceinline__ QueryBlock query_block(const AttnParams& p, int n_blocks) {
  const int BH = p.B * p.H;
  const int bh = int(blockIdx.x % unsigned(BH));
  const int qb = n_blocks - 1 - int(blockIdx.x / unsigned(BH));
  const int b = bh / p.H, h = bh % p.H, kvh = h / p.group;
  return {qb, b, h, kvh};
}
// Where a block of a key-side kernel (dK/dV) works: key block kb (in key order, so the heaviest
// first) of batch b and kv head kvh.
struct KeyBlock {
  int kb, b, kvh;
};
__device__ __forceinline__ KeyBlock key_block(const AttnParams& p) {
  const int BKV = p.B * p.KV;
  const int bkv = int(blockIdx.x % unsigned(BKV));
  const int kb = int(blockIdx.x / unsigned(BKV));
  const int b = bkv / p.KV, kvh = bkv % p.KV;
  return {kb, b, kvh};
}

// Loads a tile's log-sum-exps (as base 2) and deltas; rows past T get zeros.
__device__ __forceinline__ void stage_row_stats(float* lse2_s, float* delta_s, const float* lse, const float* delta,
                                                int64_t at, int valid) {
  for (int r = threadIdx.x; r < kTile; r += kThreads) {
    lse2_s[r] = r < valid ? lse[at + r] * kLog2e : 0.f;
    delta_s[r] = r < valid ? delta[at + r] : 0.f;
  }
}

// ---- Host side ----
// Which forward/backward kernels run (SPPO_CUDA_ATTENTION, read once per op set): "wmma" (or
// unset) the WMMA kernels, "mma" the register-resident mma.sync kernels (both for head_dim 32,
// 64, 128; other head dims take the FMA kernels), "fma" the fp32 FMA kernels everywhere. WMMA
// stays the default until a GPU job has run the mma.sync kernels: they were checked only under a
// CPU emulation whose fragment layouts come from the same reading of the PTX manual as the
// kernels, which a real GPU can contradict (bench/NOTES.md, issue 12).
enum class AttnPath { mma, wmma, fma };
AttnPath attention_path();

// The launch helpers (dispatch.cu).
int dmax_for(int64_t D, const char* op);
void check_shape(const AttentionShape& s, const char* op);
AttnParams attn_params(const AttentionShape& s);
// Whether 16-byte copies of tile rows are aligned: every base pointer 16-byte aligned and every
// stride and offset (in bf16 elements) a multiple of 8. D is 32, 64 or 128 on this path.
bool rows_aligned16(std::initializer_list<const void*> ptrs, std::initializer_list<int64_t> elems);
// One block per (tile, batch, head): a 1-D grid (its x dimension allows 2^31 - 1 blocks).
unsigned tile_grid(int64_t tiles, int64_t heads, int64_t batch, const char* op);

}  // namespace sppo::cuda::attn

namespace sppo::cuda {

// The family's state: the delta buffer of the backward, the decode partials, which kernels were
// granted more than 48 KiB of dynamic shared memory, and the kernel choice (SPPO_CUDA_ATTENTION,
// read once, when an op set makes its first attention call). Buffers grow to the largest shape seen.
struct AttnState {
  const attn::AttnPath path = attn::attention_path();
  float* delta = nullptr;  // (B, H, T)
  size_t delta_elems = 0;
  float* partials = nullptr;  // decode: o (rows, H, chunks, D) then (m, l) (rows, H, chunks, 2)
  size_t partial_elems = 0;
  int max_smem_optin = 0;
  std::unordered_map<const void*, size_t> smem_granted;

  ~AttnState() {
    // Errors are ignored here: this runs from destructors, possibly after the context is gone.
    if (delta) (void)cudaFree(delta);
    if (partials) (void)cudaFree(partials);
  }

  float* grow(float*& buf, size_t& have, size_t need, cudaStream_t stream, const char* what) {
    if (need <= have) return buf;
    if (buf) {
      SPPO_CUDA_CHECK(cudaStreamSynchronize(stream));  // earlier kernels may still use the old buffer
      SPPO_CUDA_CHECK(cudaFree(buf));
      buf = nullptr, have = 0;
      ++scratch_generation();
    }
    const cudaError_t e = cudaMalloc(reinterpret_cast<void**>(&buf), need * sizeof(float));
    if (e != cudaSuccess) {
      buf = nullptr;
      (void)cudaGetLastError();  // else the next launch check reports this allocation's error
      throw Error(std::string("CUDA attention: cannot allocate ") + std::to_string(need * sizeof(float)) +
                  " bytes for " + what + ": " + cudaGetErrorString(e));
    }
    have = need;
    return buf;
  }

  // Lets `kernel` launch with `bytes` of dynamic shared memory (opting in past 48 KiB).
  void allow_smem(const void* kernel, size_t bytes, int device, const char* op) {
    if (bytes <= 48 * 1024) return;
    if (max_smem_optin == 0)
      SPPO_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    SPPO_REQUIRE(bytes <= size_t(max_smem_optin), op, " needs ", bytes,
                 " bytes of shared memory per block; this GPU allows ", max_smem_optin);
    size_t& granted = smem_granted[kernel];
    if (granted >= bytes) return;
    SPPO_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
    granted = bytes;
  }
};

}  // namespace sppo::cuda

namespace sppo::cuda::attn {

// Calls f(std::integral_constant<int, N>()) with N = d for d = 32 or 64, else 128, and returns
// what it returns: the bridge from a run-time head dim to the kernels' template argument.
template <class F>
decltype(auto) with_head_dim(int d, F&& f) {
  switch (d) {
    case 32:
      return f(std::integral_constant<int, 32>());
    case 64:
      return f(std::integral_constant<int, 64>());
    default:
      return f(std::integral_constant<int, 128>());
  }
}

// Each implementation's kernels for one head dim, and how they launch (dispatch.cu launches
// them): the forward writes out and lse, the backward's dQ and dK/dV kernels dqkv from the row
// deltas. Each kernel runs `threads` threads a block with `smem` bytes of dynamic shared memory.
// A block of the forward and dQ kernels owns `rows` queries, one of the dK/dV kernel `rows` keys
// (a 1-D grid, tile_grid). `vec_rows`: the kernels copy 16 bytes at a time where every tile row
// is 16-byte aligned (AttnParams::vec, rows_aligned16).
using ForwardKernel = void (*)(__nv_bfloat16*, float*, const __nv_bfloat16*, AttnParams);
using BackwardKernel = void (*)(__nv_bfloat16*, const __nv_bfloat16*, const __nv_bfloat16*, const float*, const float*,
                                AttnParams, float);
template <class Kernel>
struct KernelLaunch {
  Kernel kernel;
  size_t smem;
  int threads;
};
struct AttnKernels {
  KernelLaunch<ForwardKernel> forward;
  KernelLaunch<BackwardKernel> dq, dkdv;
  int rows;
  bool vec_rows;
};
// fma.cu: head_dim padded to dmax (dmax_for: 32, 64 or 128). wmma.cu and mma.cu: head_dim D
// exactly 32, 64 or 128.
AttnKernels fma_kernels(int dmax);
AttnKernels wmma_kernels(int head_dim);
AttnKernels mma_kernels(int head_dim);

}  // namespace sppo::cuda::attn
