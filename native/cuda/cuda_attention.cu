// Causal grouped-query attention on the GPU: the flash-style forward, the flash-attention-2
// backward (dQ, and dK/dV, each by its own kernel so every output has one writer and a fixed
// summation order: no float atomics), and the KV-cache write and split decode of batched sampling.
//
// Three implementations of the forward and backward: register-resident tensor-core kernels
// (mma.sync PTX, FlashAttention-2 structure) for head_dim 32, 64 and 128 (SPPO_CUDA_ATTENTION=mma,
// not yet run on a GPU); the WMMA tensor-core kernels for the same head dims, the default (checked
// on an H200) until a GPU job has checked and timed both, then one of the two goes; and fp32 FMA kernels from tiles staged as fp32,
// for every head_dim, which are also the tensor cores' reference (SPPO_CUDA_ATTENTION=fma). All
// run the softmax in the base-2 domain (scores pre-multiplied by scale*log2(e)) and save
// log-sum-exps in the natural log, as the CPU backend saves them (native/cpu/cpu_ops.cpp is the
// reference).
#include <mma.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <initializer_list>
#include <cstring>
#include <string>
#include <unordered_map>

#include "core/error.h"
#include "cuda/cuda_common.cuh"
#include "cuda/cuda_mma.cuh"
#include "cuda/cuda_ops.cuh"

namespace sppo::cuda {

namespace {

namespace wmma = nvcuda::wmma;

// ---- Tiling shared by the forward and backward kernels ----
// A block owns kTile queries (or keys) of one (batch, head) and walks kTile-row tiles of the
// other side up to the causal limit. In the FMA kernels its 256 threads are a 16 x 16 grid: thread (ty, tx) owns
// rows ty*4 .. ty*4+3 of the block's tile and columns tx, tx+16, tx+32, ... of the other
// (key columns of a score tile, or head-dim columns of an accumulator).
constexpr int kTile = 64;
constexpr int kThreads = 256;
constexpr int kRowsPerThread = 4;         // kTile / 16
constexpr int kPStride = kTile + 4;       // score tiles: the two row groups of a warp hit disjoint banks
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Head-dim tiles: fp32 rows of DMAX + 1 floats (an odd stride), so both access patterns are free
// of bank conflicts: 16 threads reading column d of 16 different rows, and threads reading
// consecutive columns of one row.
template <int DMAX>
constexpr int row_stride() {
  return DMAX + 1;
}

struct AttnParams {
  int B, T, H, KV, D, group;
  int64_t qkv_stride, q_off, k_off, v_off, out_stride;
  float scale_log2;  // scale * log2(e)
  int n_tiles;       // ceil(T / kTile)
  bool vec;          // tensor-core staging: every tile row starts 16-byte aligned (16-byte copies)
};

// Stages rows [0, valid) of a (rows, D) block at `src` (row stride ld) into the fp32 tile dst
// (kTile, DMAX+1); rows >= valid and columns >= D become zeros, so padded lanes add nothing
// (and never NaN: a masked probability times stale shared memory could be 0 * NaN).
template <int DMAX>
__device__ __forceinline__ void stage_tile(float* __restrict__ dst, const __nv_bfloat16* __restrict__ src,
                                           int64_t ld, int valid, int D) {
  constexpr int LD = row_stride<DMAX>();
  constexpr int kPerThread = kTile * DMAX / kThreads;  // 8, 16 or 32
  constexpr int kBatch = 8;                            // loads in flight per thread before the stores
  static_assert(kPerThread % kBatch == 0, "tile elements must split evenly over the threads");
#pragma unroll 1
  for (int b0 = 0; b0 < kPerThread; b0 += kBatch) {
    float v[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int e = (b0 + u) * kThreads + threadIdx.x, r = e / DMAX, c = e % DMAX;
      v[u] = (r < valid && c < D) ? to_f(src[int64_t(r) * ld + c]) : 0.f;
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int e = (b0 + u) * kThreads + threadIdx.x;
      dst[(e / DMAX) * LD + e % DMAX] = v[u];
    }
  }
}

// Sum / max over the 16 lanes of a half-warp (the 16 threads sharing ty). The butterfly leaves
// every lane with the same bits, and the order is fixed, so the result is deterministic.
__device__ __forceinline__ float sum16(float x) {
#pragma unroll
  for (int o = 8; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
__device__ __forceinline__ float max16(float x) {
#pragma unroll
  for (int o = 8; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float sum32(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
__device__ __forceinline__ float max32(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

template <int DMAX>
constexpr size_t forward_smem() {  // Q, K, V tiles + P
  return sizeof(float) * (3 * kTile * row_stride<DMAX>() + kTile * kPStride);
}
template <int DMAX>
constexpr size_t backward_dq_smem() {  // Q, dO, K, V tiles + dS + lse, delta
  return sizeof(float) * (4 * kTile * row_stride<DMAX>() + kTile * kPStride + 2 * kTile);
}
template <int DMAX>
constexpr size_t backward_dkdv_smem() {  // K, V, Q, dO tiles + P, dS + lse, delta
  return sizeof(float) * (4 * kTile * row_stride<DMAX>() + 2 * kTile * kPStride + 2 * kTile);
}

// The two products of the FMA backward's score tile, for the 4x4 register tile of thread
// (ty, tx): s[i][j] = A_r · B_c and dp[i][j] = A2_r · B2_c over DMAX, where row r = ty*4 + i
// of the row tiles (A, A2) and row c = tx + 16j of the column tiles (B, B2). The dQ pass calls it
// with (Q, dO | K, V), the dK/dV pass with (K, V | Q, dO).
template <int DMAX>
__device__ __forceinline__ void dual_tile_products(const float* __restrict__ A, const float* __restrict__ A2,
                                                   const float* __restrict__ B, const float* __restrict__ B2,
                                                   int tx, int ty, float (&s)[kRowsPerThread][4],
                                                   float (&dp)[kRowsPerThread][4]) {
  constexpr int LD = row_stride<DMAX>();
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) s[i][j] = dp[i][j] = 0.f;
#pragma unroll 4
  for (int d = 0; d < DMAX; ++d) {
    float av[kRowsPerThread], a2v[kRowsPerThread], bv[4], b2v[4];
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      av[i] = A[(ty * kRowsPerThread + i) * LD + d];
      a2v[i] = A2[(ty * kRowsPerThread + i) * LD + d];
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      bv[j] = B[(tx + 16 * j) * LD + d];
      b2v[j] = B2[(tx + 16 * j) * LD + d];
    }
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        s[i][j] = fmaf(av[i], bv[j], s[i][j]);
        dp[i][j] = fmaf(a2v[i], b2v[j], dp[i][j]);
      }
  }
}

// acc[i][c] += Σ_k A[r][k] · B[k][col] over a kTile-wide inner dimension, for the register tile
// of thread (ty, tx): rows r = ty*4 + i of A (row stride kPStride: a P or dS tile), columns
// col = tx + 16c of B (row stride row_stride<DMAX>(): a V, K, dO or Q tile). O += P·V in the
// forward, dQ += dS·K, dV += Pᵀ·dO and dK += dSᵀ·Q in the backward.
template <int DMAX, int CPT>
__device__ __forceinline__ void tile_accumulate(const float* __restrict__ A, const float* __restrict__ B, int tx,
                                                int ty, float (&acc)[kRowsPerThread][CPT]) {
  constexpr int LD = row_stride<DMAX>();
#pragma unroll 4
  for (int k = 0; k < kTile; ++k) {
    float av[kRowsPerThread], bv[CPT];
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) av[i] = A[(ty * kRowsPerThread + i) * kPStride + k];
#pragma unroll
    for (int c = 0; c < CPT; ++c) bv[c] = B[k * LD + tx + 16 * c];
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
      for (int c = 0; c < CPT; ++c) acc[i][c] = fmaf(av[i], bv[c], acc[i][c]);
  }
}

// ---- Forward ----
// Block: kTile queries of one (batch, head); grid: n_tiles * B * H, heaviest (last) query tiles
// first. For each key tile up to the diagonal: S = Q Kᵀ (4x4 scores per thread), online softmax
// per row (running max m and a thread-partial sum l, rescaled by the row-uniform alpha), then
// O += P V from the P tile in shared memory.
template <int DMAX>
__global__ void __launch_bounds__(kThreads, 1) attention_forward_kernel(__nv_bfloat16* __restrict__ out,
                                                                     float* __restrict__ lse,
                                                                     const __nv_bfloat16* __restrict__ qkv,
                                                                     AttnParams p) {
  constexpr int LD = row_stride<DMAX>(), CPT = DMAX / 16;
  extern __shared__ float smem[];
  float* Qs = smem;               // (kTile, LD)
  float* Ks = Qs + kTile * LD;    // (kTile, LD)
  float* Vs = Ks + kTile * LD;    // (kTile, LD)
  float* Ps = Vs + kTile * LD;    // (kTile, kPStride)

  const int BH = p.B * p.H;
  const int bh = int(blockIdx.x % unsigned(BH));
  const int qt = p.n_tiles - 1 - int(blockIdx.x / unsigned(BH));
  const int b = bh / p.H, h = bh % p.H, kvh = h / p.group;
  const int q0 = qt * kTile;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const __nv_bfloat16* base = qkv + int64_t(b) * p.T * p.qkv_stride;

  stage_tile<DMAX>(Qs, base + int64_t(q0) * p.qkv_stride + p.q_off + int64_t(h) * p.D, p.qkv_stride,
                   min(kTile, p.T - q0), p.D);

  float m[kRowsPerThread], l[kRowsPerThread], o[kRowsPerThread][CPT];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.f;
#pragma unroll
    for (int c = 0; c < CPT; ++c) o[i][c] = 0.f;
  }

  // Causal: key tiles 0..qt (query and key tiles are the same size). The first tile holds key 0,
  // visible to every query, so each row's running max is finite from the first tile on.
  for (int kt = 0; kt <= qt; ++kt) {
    const int k0 = kt * kTile;
    __syncthreads();  // the previous tile's P V reads are done before K, V are overwritten
    const __nv_bfloat16* kv_rows = base + int64_t(k0) * p.qkv_stride + int64_t(kvh) * p.D;
    stage_tile<DMAX>(Ks, kv_rows + p.k_off, p.qkv_stride, min(kTile, p.T - k0), p.D);
    stage_tile<DMAX>(Vs, kv_rows + p.v_off, p.qkv_stride, min(kTile, p.T - k0), p.D);
    __syncthreads();

    float s[kRowsPerThread][4];
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) s[i][j] = 0.f;
#pragma unroll 8
    for (int d = 0; d < DMAX; ++d) {
      float qv[kRowsPerThread], kv[4];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) qv[i] = Qs[(ty * kRowsPerThread + i) * LD + d];
#pragma unroll
      for (int j = 0; j < 4; ++j) kv[j] = Ks[(tx + 16 * j) * LD + d];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) s[i][j] = fmaf(qv[i], kv[j], s[i][j]);
    }

    const bool diagonal = kt == qt;
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int q = q0 + ty * kRowsPerThread + i;
      float mt = -INFINITY;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int k = k0 + tx + 16 * j;
        s[i][j] = (diagonal && k > q) ? -INFINITY : s[i][j] * p.scale_log2;
        mt = fmaxf(mt, s[i][j]);
      }
      const float m_new = fmaxf(m[i], max16(mt));
      const float alpha = exp2f(m[i] - m_new);  // 0 on the first tile (m = -inf, m_new finite)
      m[i] = m_new;
      float rs = 0.f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        s[i][j] = exp2f(s[i][j] - m_new);  // masked: exp2(-inf) = 0
        rs += s[i][j];
      }
      l[i] = l[i] * alpha + rs;
#pragma unroll
      for (int c = 0; c < CPT; ++c) o[i][c] *= alpha;
#pragma unroll
      for (int j = 0; j < 4; ++j) Ps[(ty * kRowsPerThread + i) * kPStride + tx + 16 * j] = s[i][j];
    }
    __syncthreads();

    tile_accumulate<DMAX, CPT>(Ps, Vs, tx, ty, o);
  }

#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int q = q0 + ty * kRowsPerThread + i;
    const float total = sum16(l[i]);  // every lane takes part in the shuffle, valid row or not
    if (q >= p.T) continue;
    const float inv = 1.f / total;
    __nv_bfloat16* orow = out + (int64_t(b) * p.T + q) * p.out_stride + int64_t(h) * p.D;
#pragma unroll
    for (int c = 0; c < CPT; ++c) {
      const int col = tx + 16 * c;
      if (col < p.D) orow[col] = to_bf(o[i][c] * inv);
    }
    if (tx == 0) lse[(int64_t(b) * p.H + h) * p.T + q] = (m[i] + log2f(total)) * kLn2;
  }
}

// ---- Backward ----
// delta(B, H, T) = rowsum(dO ∘ O) per (row, head): one warp each, lanes over the head dim.
__global__ void attention_delta_kernel(float* __restrict__ delta, const __nv_bfloat16* __restrict__ dout,
                                       const __nv_bfloat16* __restrict__ out, int B, int T, int H, int D,
                                       int64_t out_stride) {
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= int64_t(B) * T * H) return;  // whole warps leave together (blockDim is a multiple of 32)
  const int h = int(warp % H);
  const int64_t row = warp / H;  // b * T + t
  const int64_t at = row * out_stride + int64_t(h) * D;
  float acc = 0.f;
  for (int d = lane; d < D; d += 32) acc = fmaf(to_f(dout[at + d]), to_f(out[at + d]), acc);
  acc = sum32(acc);
  if (lane == 0) {
    const int64_t b = row / T, t = row % T;
    delta[(b * H + h) * T + t] = acc;
  }
}

// Loads a tile's log-sum-exps (as base 2) and deltas; rows past T get zeros.
__device__ __forceinline__ void stage_row_stats(float* lse2_s, float* delta_s, const float* lse, const float* delta,
                                                int64_t at, int valid) {
  for (int r = threadIdx.x; r < kTile; r += kThreads) {
    lse2_s[r] = r < valid ? lse[at + r] * kLog2e : 0.f;
    delta_s[r] = r < valid ? delta[at + r] : 0.f;
  }
}

// dQ: block per (query tile, head, batch), grid n_tiles * B * H (heaviest first). For each key
// tile up to the diagonal it recomputes P = exp(S - lse) and dP = dO Vᵀ, forms
// dS = P ∘ (dP - delta) in shared memory and accumulates dQ += dS K; dQ *= scale at the end.
template <int DMAX>
__global__ void __launch_bounds__(kThreads, 1) attention_backward_dq_kernel(
    __nv_bfloat16* __restrict__ dqkv, const __nv_bfloat16* __restrict__ dout, const __nv_bfloat16* __restrict__ qkv,
    const float* __restrict__ lse, const float* __restrict__ delta, AttnParams p, float scale) {
  constexpr int LD = row_stride<DMAX>(), CPT = DMAX / 16;
  extern __shared__ float smem[];
  float* Qs = smem;                   // (kTile, LD)
  float* dOs = Qs + kTile * LD;       // (kTile, LD)
  float* Ks = dOs + kTile * LD;       // (kTile, LD)
  float* Vs = Ks + kTile * LD;        // (kTile, LD)
  float* dSs = Vs + kTile * LD;       // (kTile, kPStride)
  float* lse2_s = dSs + kTile * kPStride;
  float* delta_s = lse2_s + kTile;

  const int BH = p.B * p.H;
  const int bh = int(blockIdx.x % unsigned(BH));
  const int qt = p.n_tiles - 1 - int(blockIdx.x / unsigned(BH));
  const int b = bh / p.H, h = bh % p.H, kvh = h / p.group;
  const int q0 = qt * kTile, q_valid = min(kTile, p.T - q0);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const __nv_bfloat16* base = qkv + int64_t(b) * p.T * p.qkv_stride;

  stage_tile<DMAX>(Qs, base + int64_t(q0) * p.qkv_stride + p.q_off + int64_t(h) * p.D, p.qkv_stride, q_valid, p.D);
  stage_tile<DMAX>(dOs, dout + (int64_t(b) * p.T + q0) * p.out_stride + int64_t(h) * p.D, p.out_stride, q_valid,
                   p.D);
  stage_row_stats(lse2_s, delta_s, lse, delta, (int64_t(b) * p.H + h) * p.T + q0, q_valid);

  float dq[kRowsPerThread][CPT];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
    for (int c = 0; c < CPT; ++c) dq[i][c] = 0.f;

  for (int kt = 0; kt <= qt; ++kt) {
    const int k0 = kt * kTile;
    __syncthreads();  // previous tile's dS K reads are done (and Q, dO, stats staged on the first)
    const __nv_bfloat16* kv_rows = base + int64_t(k0) * p.qkv_stride + int64_t(kvh) * p.D;
    stage_tile<DMAX>(Ks, kv_rows + p.k_off, p.qkv_stride, min(kTile, p.T - k0), p.D);
    stage_tile<DMAX>(Vs, kv_rows + p.v_off, p.qkv_stride, min(kTile, p.T - k0), p.D);
    __syncthreads();

    float s[kRowsPerThread][4], dp[kRowsPerThread][4];  // [query ty*4+i][key tx+16j]
    dual_tile_products<DMAX>(Qs, dOs, Ks, Vs, tx, ty, s, dp);
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int r = ty * kRowsPerThread + i, q = q0 + r;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int k = k0 + tx + 16 * j;
        // A select, not a product: exp2 of a masked score may overflow, and inf * 0 is NaN.
        const float pr = (k <= q && q < p.T) ? exp2f(s[i][j] * p.scale_log2 - lse2_s[r]) : 0.f;
        dSs[r * kPStride + tx + 16 * j] = pr * (dp[i][j] - delta_s[r]);
      }
    }
    __syncthreads();

    tile_accumulate<DMAX, CPT>(dSs, Ks, tx, ty, dq);
  }

#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int q = q0 + ty * kRowsPerThread + i;
    if (q >= p.T) continue;
    __nv_bfloat16* row = dqkv + (int64_t(b) * p.T + q) * p.qkv_stride + p.q_off + int64_t(h) * p.D;
#pragma unroll
    for (int c = 0; c < CPT; ++c) {
      const int col = tx + 16 * c;
      if (col < p.D) row[col] = to_bf(dq[i][c] * scale);
    }
  }
}

// dK, dV: block per (key tile, kv head, batch), grid n_tiles * B * KV (heaviest, first key
// tiles first). Thread (ty, tx) owns keys ty*4.. and, in the score tiles, queries tx+16j. The
// block walks the group's query heads in order and, for each, the query tiles from the diagonal
// on: Pᵀ and dSᵀ go to shared memory, then dV += Pᵀ dO and dK += dSᵀ Q; dK *= scale at the end.
template <int DMAX>
__global__ void __launch_bounds__(kThreads, 1) attention_backward_dkdv_kernel(
    __nv_bfloat16* __restrict__ dqkv, const __nv_bfloat16* __restrict__ dout, const __nv_bfloat16* __restrict__ qkv,
    const float* __restrict__ lse, const float* __restrict__ delta, AttnParams p, float scale) {
  constexpr int LD = row_stride<DMAX>(), CPT = DMAX / 16;
  extern __shared__ float smem[];
  float* Ks = smem;                    // (kTile, LD)
  float* Vs = Ks + kTile * LD;         // (kTile, LD)
  float* Qs = Vs + kTile * LD;         // (kTile, LD)
  float* dOs = Qs + kTile * LD;        // (kTile, LD)
  float* Pt = dOs + kTile * LD;        // (kTile keys, kPStride)
  float* dSt = Pt + kTile * kPStride;  // (kTile keys, kPStride)
  float* lse2_s = dSt + kTile * kPStride;
  float* delta_s = lse2_s + kTile;

  const int BKV = p.B * p.KV;
  const int bkv = int(blockIdx.x % unsigned(BKV));
  const int kt = int(blockIdx.x / unsigned(BKV));
  const int b = bkv / p.KV, kvh = bkv % p.KV;
  const int k0 = kt * kTile, k_valid = min(kTile, p.T - k0);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const __nv_bfloat16* base = qkv + int64_t(b) * p.T * p.qkv_stride;

  const __nv_bfloat16* kv_rows = base + int64_t(k0) * p.qkv_stride + int64_t(kvh) * p.D;
  stage_tile<DMAX>(Ks, kv_rows + p.k_off, p.qkv_stride, k_valid, p.D);
  stage_tile<DMAX>(Vs, kv_rows + p.v_off, p.qkv_stride, k_valid, p.D);

  float dk[kRowsPerThread][CPT], dv[kRowsPerThread][CPT];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
    for (int c = 0; c < CPT; ++c) dk[i][c] = dv[i][c] = 0.f;

  for (int g = 0; g < p.group; ++g) {
    const int h = kvh * p.group + g;
    for (int qt = kt; qt < p.n_tiles; ++qt) {
      const int q0 = qt * kTile, q_valid = min(kTile, p.T - q0);
      __syncthreads();  // previous tile's accumulation reads of Q, dO, Pᵀ, dSᵀ are done
      stage_tile<DMAX>(Qs, base + int64_t(q0) * p.qkv_stride + p.q_off + int64_t(h) * p.D, p.qkv_stride, q_valid,
                       p.D);
      stage_tile<DMAX>(dOs, dout + (int64_t(b) * p.T + q0) * p.out_stride + int64_t(h) * p.D, p.out_stride,
                       q_valid, p.D);
      stage_row_stats(lse2_s, delta_s, lse, delta, (int64_t(b) * p.H + h) * p.T + q0, q_valid);
      __syncthreads();

      float s[kRowsPerThread][4], dp[kRowsPerThread][4];  // [key ty*4+i][query tx+16j]
      dual_tile_products<DMAX>(Ks, Vs, Qs, dOs, tx, ty, s, dp);
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
        const int kr = ty * kRowsPerThread + i, k = k0 + kr;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int qr = tx + 16 * j, q = q0 + qr;
          const float pr = (k <= q && q < p.T) ? exp2f(s[i][j] * p.scale_log2 - lse2_s[qr]) : 0.f;
          Pt[kr * kPStride + qr] = pr;
          dSt[kr * kPStride + qr] = pr * (dp[i][j] - delta_s[qr]);
        }
      }
      __syncthreads();

      tile_accumulate<DMAX, CPT>(Pt, dOs, tx, ty, dv);
      tile_accumulate<DMAX, CPT>(dSt, Qs, tx, ty, dk);
    }
  }

#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int k = k0 + ty * kRowsPerThread + i;
    if (k >= p.T) continue;
    __nv_bfloat16* row = dqkv + (int64_t(b) * p.T + k) * p.qkv_stride + int64_t(kvh) * p.D;
#pragma unroll
    for (int c = 0; c < CPT; ++c) {
      const int col = tx + 16 * c;
      if (col < p.D) {
        row[p.k_off + col] = to_bf(dk[i][c] * scale);
        row[p.v_off + col] = to_bf(dv[i][c]);
      }
    }
  }
}

// ---- Tensor-core kernels (WMMA bf16 16x16x16, fp32 accumulate) ----
// The same algorithms as the FMA kernels above, for head_dim 32, 64 and 128, the default
// (SPPO_CUDA_ATTENTION unset or "wmma"; other head dims take the FMA kernels). Tiles are staged as bf16 in shared memory;
// products go through WMMA fragments, and every per-element step (mask, softmax, rescale,
// dS) runs on plain threads from shared memory after store_matrix_sync, since which lane holds
// which element of a fragment is implementation-defined. A block is 4 warps; warp w owns rows
// 16w .. 16w+15 of the block's 64-row tile (queries in the forward and dQ, keys in dK/dV), so the
// softmax of a row never leaves its warp: between the block-wide barriers around tile staging,
// a warp only synchronises with itself (__syncwarp). Within a row, lanes 2r and 2r+1 split the
// columns. Probabilities (P, dS) are rounded to bf16 for the products, as FlashAttention does;
// the running max, sums, log-sum-exps and all accumulators stay fp32. Each output element is
// written once by its owner lane, and every accumulation runs in a fixed order: deterministic.
//
// Expected on an H100 (to measure; bench/NOTES.md): these are mma.sync-class tensor cores
// (not wgmma), fed from shared memory without cp.async double-buffering, with the forward's O
// and all scores making a round trip through shared memory per key tile, at few warps per SM
// (shared memory bound: forward 12 at head_dim 64, 8 at 128; backward 8 at 64, 4 at 128). FlashAttention-2, the same algorithm with register-resident O and pipelined loads, reaches
// ~330 TFLOP/s forward on an H100; these kernels should reach roughly a third of that: ~100-150
// TFLOP/s forward and ~60-100 backward at T = 1024 (vs ~30 for the FMA kernels). For the 134M
// step (B16 T1024, 12 layers of 12 heads x 64) attention is ~1.1 TFLOP (0.31 forward, 0.77
// backward): ~10-12 ms instead of ~36 ms, which puts the step near 40 ms, ~400k tok/s, close
// to torch.compile's 421k. Next steps if it falls short: cp.async double-buffered K/V, O kept in
// registers via mma.sync PTX (known fragment layout), 128-query blocks for the forward.
constexpr int kTcWarps = 4;
constexpr int kTcThreads = 32 * kTcWarps;  // warp w owns tile rows 16w .. 16w+15
constexpr int kSLd = kTile + 4;            // fp32 score tiles (a multiple of 4 floats, as WMMA needs)
constexpr int kPLd = kTile + 8;            // bf16 probability tiles (a multiple of 8 elements)
static_assert(kTile == 16 * kTcWarps, "each warp owns one 16-row strip of the tile");
template <int D>
constexpr int tc_ld() {  // bf16 Q/K/V/dO tile rows: padded by 16 bytes against bank conflicts
  return D + 8;
}
template <int D>
constexpr int acc_ld() {  // fp32 accumulator rows (the forward's O, the backward's outputs)
  return D + 4;
}
template <int D>
constexpr size_t tc_tile_bytes() {
  return sizeof(__nv_bfloat16) * kTile * tc_ld<D>();
}
constexpr size_t kProbBytes = sizeof(__nv_bfloat16) * kTile * kPLd;
constexpr size_t kScoreBytes = sizeof(float) * kTile * kSLd;  // (64 rows, kSLd): S, or a warp's S and dP
constexpr size_t kStatBytes = sizeof(float) * 2 * kTile;       // lse (base 2) and delta per row
// Regions follow each other in this order; every size is a multiple of 128 bytes, so every
// fragment pointer below is 32-byte aligned as load/store_matrix_sync require.
template <int D>
constexpr size_t tc_forward_smem() {  // Q, K, V, P, S, O
  return 3 * tc_tile_bytes<D>() + kProbBytes + kScoreBytes + sizeof(float) * kTile * acc_ld<D>();
}
template <int D>
constexpr size_t tc_backward_dq_smem() {  // Q, dO, K, V, dS, per-warp S and dP, stats
  return 4 * tc_tile_bytes<D>() + kProbBytes + 2 * kScoreBytes + kStatBytes;
}
template <int D>
constexpr size_t tc_backward_dkdv_smem() {  // K, V, Q, dO, Pᵀ, dSᵀ, per-warp Sᵀ and dPᵀ, stats
  return 4 * tc_tile_bytes<D>() + 2 * kProbBytes + 2 * kScoreBytes + kStatBytes;
}
static_assert(tc_tile_bytes<32>() % 128 == 0 && kProbBytes % 128 == 0 && kScoreBytes % 128 == 0 &&
                  kStatBytes % 128 == 0 && sizeof(float) * kTile * acc_ld<32>() % 128 == 0,
              "shared-memory regions must keep 128-byte alignment");
static_assert(acc_ld<128>() <= 2 * kSLd, "a warp's output rows fit its S and dP scratch");

using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major>;
using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major>;
using FragBt = wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major>;  // a row-major tile, transposed
using FragAcc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// The tensor-core backward's two score products for one 16x16 chunk: S = A·Bᵀ and dP = A2·B2ᵀ
// over D, where A/A2 are the warp's 16 rows and B/B2 16 rows of the other tiles (row stride
// tc_ld<D>()), stored row-major into the warp's fp32 tiles at S and dP (row stride kSLd).
// The dQ pass calls it with (Q, dO | K, V), the dK/dV pass with (K, V | Q, dO).
template <int D>
__device__ __forceinline__ void dual_wmma_products(const __nv_bfloat16* A, const __nv_bfloat16* A2,
                                                   const __nv_bfloat16* B, const __nv_bfloat16* B2, float* S,
                                                   float* dP) {
  constexpr int LDB = tc_ld<D>(), KD = D / 16;
  FragAcc s, dp;
  wmma::fill_fragment(s, 0.f);
  wmma::fill_fragment(dp, 0.f);
#pragma unroll
  for (int kk = 0; kk < KD; ++kk) {
    FragA a;
    FragBt bt;
    wmma::load_matrix_sync(a, A + 16 * kk, LDB);
    wmma::load_matrix_sync(bt, B + 16 * kk, LDB);
    wmma::mma_sync(s, a, bt, s);
    wmma::load_matrix_sync(a, A2 + 16 * kk, LDB);
    wmma::load_matrix_sync(bt, B2 + 16 * kk, LDB);
    wmma::mma_sync(dp, a, bt, dp);
  }
  wmma::store_matrix_sync(S, s, kSLd, wmma::mem_row_major);
  wmma::store_matrix_sync(dP, dp, kSLd, wmma::mem_row_major);
}

// Stages rows [0, valid) of a (rows, D) bf16 block at src (row stride ld) into dst (kTile,
// tc_ld<D>); rows past `valid` become zeros. `vec`: src and ld are 8-element aligned, so the
// copy goes 16 bytes at a time.
template <int D>
__device__ __forceinline__ void stage_tile_bf16(__nv_bfloat16* __restrict__ dst, const __nv_bfloat16* __restrict__ src,
                                                int64_t ld, int valid, bool vec) {
  constexpr int LDB = tc_ld<D>();
  if (vec) {
    constexpr int kPieces = kTile * D / 8, kPerThread = kPieces / kTcThreads;
    static_assert(kPieces % kTcThreads == 0, "tile pieces must split evenly over the threads");
    uint4 v[kPerThread];
#pragma unroll
    for (int u = 0; u < kPerThread; ++u) {
      const int e = u * kTcThreads + threadIdx.x, r = e / (D / 8), c = e % (D / 8) * 8;
      v[u] = r < valid ? *reinterpret_cast<const uint4*>(src + int64_t(r) * ld + c) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kPerThread; ++u) {
      const int e = u * kTcThreads + threadIdx.x, r = e / (D / 8), c = e % (D / 8) * 8;
      *reinterpret_cast<uint4*>(dst + r * LDB + c) = v[u];
    }
  } else {
    const __nv_bfloat16 zero = to_bf(0.f);
#pragma unroll 4
    for (int e = threadIdx.x; e < kTile * D; e += kTcThreads) {
      const int r = e / D, c = e % D;
      dst[r * LDB + c] = r < valid ? src[int64_t(r) * ld + c] : zero;
    }
  }
}

// The columns lane pair (2r, 2r+1) splits in a row of `width` columns: the lane with `half` h
// takes the 4-column groups 16h + 32a + 4g (a < width/32, g < 4). With row strides of 4 mod 32
// floats, the 8 lanes of a 128-bit access phase then hit 8 distinct 4-bank groups.
__device__ __forceinline__ int pair_col(int half, int a, int g) { return 16 * half + 32 * a + 4 * g; }

// Forward. Block: 64 queries of one (batch, head), grid n_tiles * B * H, heaviest first. Per key
// tile up to the diagonal, warp w: S = Q Kᵀ for its 16 rows (to shared memory), online softmax
// by lane pairs (P to shared memory as bf16, its O rows rescaled in place), then O += P V with O
// loaded from and stored back to shared memory.
template <int D>
__global__ void __launch_bounds__(kTcThreads, 1) attention_forward_tc_kernel(__nv_bfloat16* __restrict__ out,
                                                                       float* __restrict__ lse,
                                                                       const __nv_bfloat16* __restrict__ qkv,
                                                                       AttnParams p) {
  constexpr int LDB = tc_ld<D>(), LDO = acc_ld<D>(), KD = D / 16;
  extern __shared__ __align__(128) unsigned char tc_smem[];
  __nv_bfloat16* Qs = reinterpret_cast<__nv_bfloat16*>(tc_smem);  // (kTile, LDB)
  __nv_bfloat16* Ks = Qs + kTile * LDB;                            // (kTile, LDB)
  __nv_bfloat16* Vs = Ks + kTile * LDB;                            // (kTile, LDB)
  __nv_bfloat16* Ps = Vs + kTile * LDB;                            // (kTile, kPLd)
  float* Ss = reinterpret_cast<float*>(Ps + kTile * kPLd);         // (kTile, kSLd)
  float* Os = Ss + kTile * kSLd;                                   // (kTile, LDO)

  const int BH = p.B * p.H;
  const int bh = int(blockIdx.x % unsigned(BH));
  const int qt = p.n_tiles - 1 - int(blockIdx.x / unsigned(BH));
  const int b = bh / p.H, h = bh % p.H, kvh = h / p.group;
  const int q0 = qt * kTile;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, wr = 16 * warp;
  const int r = wr + lane / 2, half = lane % 2, q = q0 + r;  // this lane's row (shared with its pair)
  const __nv_bfloat16* base = qkv + int64_t(b) * p.T * p.qkv_stride;

  stage_tile_bf16<D>(Qs, base + int64_t(q0) * p.qkv_stride + p.q_off + int64_t(h) * p.D, p.qkv_stride,
                     min(kTile, p.T - q0), p.vec);
#pragma unroll
  for (int a = 0; a < D / 32; ++a)
#pragma unroll
    for (int g = 0; g < 4; ++g)
      *reinterpret_cast<float4*>(Os + r * LDO + pair_col(half, a, g)) = make_float4(0.f, 0.f, 0.f, 0.f);
  __syncthreads();
  FragA qf[KD];
#pragma unroll
  for (int kk = 0; kk < KD; ++kk) wmma::load_matrix_sync(qf[kk], Qs + wr * LDB + 16 * kk, LDB);

  float m = -INFINITY, l = 0.f;  // the row's running max (base 2) and sum, the same in both lanes
  for (int kt = 0; kt <= qt; ++kt) {
    const int k0 = kt * kTile;
    __syncthreads();  // every warp's P V reads of the previous K, V tiles are done
    const __nv_bfloat16* kv_rows = base + int64_t(k0) * p.qkv_stride + int64_t(kvh) * p.D;
    stage_tile_bf16<D>(Ks, kv_rows + p.k_off, p.qkv_stride, min(kTile, p.T - k0), p.vec);
    stage_tile_bf16<D>(Vs, kv_rows + p.v_off, p.qkv_stride, min(kTile, p.T - k0), p.vec);
    __syncthreads();

    // On the diagonal tile, key chunks past the warp's rows are fully masked: skipped.
    const bool diagonal = kt == qt;
    const int chunks = diagonal ? warp + 1 : 4;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (j >= chunks) break;
      FragAcc s;
      wmma::fill_fragment(s, 0.f);
#pragma unroll
      for (int kk = 0; kk < KD; ++kk) {
        FragBt kf;
        wmma::load_matrix_sync(kf, Ks + 16 * j * LDB + 16 * kk, LDB);
        wmma::mma_sync(s, qf[kk], kf, s);
      }
      wmma::store_matrix_sync(Ss + wr * kSLd + 16 * j, s, kSLd, wmma::mem_row_major);
    }
    __syncwarp();

    // Online softmax of row r (masked keys, the skipped chunks included, are -inf: selected,
    // never computed from the stale scores there). Key 0 is in the first tile and visible to
    // every row, so m is finite from the first tile on.
    float sv[32];
    float mt = -INFINITY;
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int g = 0; g < 4; ++g) {
        const int c = pair_col(half, a, g);
        const float4 v = *reinterpret_cast<const float4*>(Ss + r * kSLd + c);
        const float v4[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float& s = sv[(a * 4 + g) * 4 + e];
          s = (diagonal && k0 + c + e > q) ? -INFINITY : v4[e] * p.scale_log2;
          mt = fmaxf(mt, s);
        }
      }
    const float m_new = fmaxf(m, fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, 1)));
    const float alpha = exp2f(m - m_new);  // 0 on the first tile (m = -inf, m_new finite)
    m = m_new;
    float rs = 0.f;
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int g = 0; g < 4; ++g) {
        __nv_bfloat16* prow = Ps + r * kPLd + pair_col(half, a, g);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float& s = sv[(a * 4 + g) * 4 + e];
          s = exp2f(s - m_new);  // masked: exp2(-inf) = 0
          rs += s;
          prow[e] = to_bf(s);
        }
      }
    l = l * alpha + (rs + __shfl_xor_sync(0xffffffffu, rs, 1));  // a + b == b + a: both lanes agree
    if (alpha != 1.f) {
#pragma unroll
      for (int a = 0; a < D / 32; ++a)
#pragma unroll
        for (int g = 0; g < 4; ++g) {
          float4* o = reinterpret_cast<float4*>(Os + r * LDO + pair_col(half, a, g));
          float4 v = *o;
          v.x *= alpha, v.y *= alpha, v.z *= alpha, v.w *= alpha;
          *o = v;
        }
    }
    __syncwarp();

    // O += P V, a 16-column chunk of O at a time (through shared memory: it was rescaled by row).
    FragA pf[4];
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (j < chunks) wmma::load_matrix_sync(pf[j], Ps + wr * kPLd + 16 * j, kPLd);
#pragma unroll
    for (int c = 0; c < KD; ++c) {
      FragAcc o;
      wmma::load_matrix_sync(o, Os + wr * LDO + 16 * c, LDO, wmma::mem_row_major);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (j >= chunks) break;
        FragB vf;
        wmma::load_matrix_sync(vf, Vs + 16 * j * LDB + 16 * c, LDB);
        wmma::mma_sync(o, pf[j], vf, o);
      }
      wmma::store_matrix_sync(Os + wr * LDO + 16 * c, o, LDO, wmma::mem_row_major);
    }
    __syncwarp();  // O stored before its rows are rescaled (next tile) or read (below)
  }

  if (q >= p.T) return;  // padding rows (no barrier follows)
  const float inv = 1.f / l;
  __nv_bfloat16* orow = out + (int64_t(b) * p.T + q) * p.out_stride + int64_t(h) * p.D;
#pragma unroll
  for (int a = 0; a < D / 32; ++a)
#pragma unroll
    for (int g = 0; g < 4; ++g) {
      const int c = pair_col(half, a, g);
      const float4 v = *reinterpret_cast<const float4*>(Os + r * LDO + c);
      orow[c] = to_bf(v.x * inv), orow[c + 1] = to_bf(v.y * inv), orow[c + 2] = to_bf(v.z * inv),
      orow[c + 3] = to_bf(v.w * inv);
    }
  if (half == 0) lse[(int64_t(b) * p.H + h) * p.T + q] = (m + log2f(l)) * kLn2;
}

// Writes a warp's 16 output rows held in fragments (through its scratch) as bf16 times `mul`:
// rows (k0 + wr + i) of `dst` (row stride ld), those before `T` only.
template <int D>
__device__ __forceinline__ void write_rows_tc(float* __restrict__ Ow, const FragAcc (&acc)[D / 16],
                                              __nv_bfloat16* __restrict__ dst, int64_t ld, int row0, int T,
                                              float mul) {
  constexpr int LDO = acc_ld<D>();
  const int lane = threadIdx.x % 32, rw = lane / 2, half = lane % 2;
  __syncwarp();  // the lanes' earlier reads of Ow are done
#pragma unroll
  for (int c = 0; c < D / 16; ++c) wmma::store_matrix_sync(Ow + 16 * c, acc[c], LDO, wmma::mem_row_major);
  __syncwarp();
  if (row0 + rw >= T) return;
  __nv_bfloat16* row = dst + int64_t(row0 + rw) * ld;
#pragma unroll
  for (int a = 0; a < D / 32; ++a)
#pragma unroll
    for (int g = 0; g < 4; ++g) {
      const int c = pair_col(half, a, g);
      const float4 v = *reinterpret_cast<const float4*>(Ow + rw * LDO + c);
      row[c] = to_bf(v.x * mul), row[c + 1] = to_bf(v.y * mul), row[c + 2] = to_bf(v.z * mul),
      row[c + 3] = to_bf(v.w * mul);
    }
}

// dQ. Block: 64 queries of one (batch, head), grid n_tiles * B * H, heaviest first. Per key tile
// up to the diagonal, warp w: S = Q Kᵀ and dP = dO Vᵀ for its rows (to its scratch), then lane
// pairs form dS = P ∘ (dP - delta) with P = exp2(S scale log2(e) - lse2) (bf16, to shared
// memory), and dQ += dS K in fragments (no rescaling here, so dQ stays in registers). dQ *= scale
// on the way out.
template <int D>
__global__ void __launch_bounds__(kTcThreads, 1) attention_backward_dq_tc_kernel(
    __nv_bfloat16* __restrict__ dqkv, const __nv_bfloat16* __restrict__ dout, const __nv_bfloat16* __restrict__ qkv,
    const float* __restrict__ lse, const float* __restrict__ delta, AttnParams p, float scale) {
  constexpr int LDB = tc_ld<D>(), KD = D / 16;
  extern __shared__ __align__(128) unsigned char tc_smem[];
  __nv_bfloat16* Qs = reinterpret_cast<__nv_bfloat16*>(tc_smem);  // (kTile, LDB)
  __nv_bfloat16* dOs = Qs + kTile * LDB;                           // (kTile, LDB)
  __nv_bfloat16* Ks = dOs + kTile * LDB;                           // (kTile, LDB)
  __nv_bfloat16* Vs = Ks + kTile * LDB;                            // (kTile, LDB)
  __nv_bfloat16* dSs = Vs + kTile * LDB;                           // (kTile, kPLd)
  float* scratch = reinterpret_cast<float*>(dSs + kTile * kPLd);   // per warp: S, dP (16, kSLd) each
  float* lse2_s = scratch + 2 * kTile * kSLd;
  float* delta_s = lse2_s + kTile;

  const int BH = p.B * p.H;
  const int bh = int(blockIdx.x % unsigned(BH));
  const int qt = p.n_tiles - 1 - int(blockIdx.x / unsigned(BH));
  const int b = bh / p.H, h = bh % p.H, kvh = h / p.group;
  const int q0 = qt * kTile, q_valid = min(kTile, p.T - q0);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, wr = 16 * warp;
  const int rw = lane / 2, r = wr + rw, half = lane % 2, q = q0 + r;  // row within the warp / tile
  float* Sw = scratch + warp * 2 * 16 * kSLd;                         // (16, kSLd)
  float* dPw = Sw + 16 * kSLd;                                        // (16, kSLd)
  const __nv_bfloat16* base = qkv + int64_t(b) * p.T * p.qkv_stride;

  stage_tile_bf16<D>(Qs, base + int64_t(q0) * p.qkv_stride + p.q_off + int64_t(h) * p.D, p.qkv_stride, q_valid,
                     p.vec);
  stage_tile_bf16<D>(dOs, dout + (int64_t(b) * p.T + q0) * p.out_stride + int64_t(h) * p.D, p.out_stride, q_valid,
                     p.vec);
  stage_row_stats(lse2_s, delta_s, lse, delta, (int64_t(b) * p.H + h) * p.T + q0, q_valid);

  FragAcc dq[KD];
#pragma unroll
  for (int c = 0; c < KD; ++c) wmma::fill_fragment(dq[c], 0.f);

  for (int kt = 0; kt <= qt; ++kt) {
    const int k0 = kt * kTile;
    __syncthreads();  // the previous K tile's dS K reads are done (and Q, dO, stats staged on the first)
    const __nv_bfloat16* kv_rows = base + int64_t(k0) * p.qkv_stride + int64_t(kvh) * p.D;
    stage_tile_bf16<D>(Ks, kv_rows + p.k_off, p.qkv_stride, min(kTile, p.T - k0), p.vec);
    stage_tile_bf16<D>(Vs, kv_rows + p.v_off, p.qkv_stride, min(kTile, p.T - k0), p.vec);
    __syncthreads();

    const bool diagonal = kt == qt;
    const int chunks = diagonal ? warp + 1 : 4;  // key chunks with a key visible to the warp's rows
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (j >= chunks) break;
      dual_wmma_products<D>(Qs + wr * LDB, dOs + wr * LDB, Ks + 16 * j * LDB, Vs + 16 * j * LDB, Sw + 16 * j,
                            dPw + 16 * j);
    }
    __syncwarp();

    const float lse2 = lse2_s[r], dl = delta_s[r];
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int g = 0; g < 4; ++g) {
        const int c = pair_col(half, a, g);
        const float4 s4 = *reinterpret_cast<const float4*>(Sw + rw * kSLd + c);
        const float4 d4 = *reinterpret_cast<const float4*>(dPw + rw * kSLd + c);
        const float sv[4] = {s4.x, s4.y, s4.z, s4.w}, dv[4] = {d4.x, d4.y, d4.z, d4.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float pr = (diagonal && k0 + c + e > q) ? 0.f : exp2f(sv[e] * p.scale_log2 - lse2);
          dSs[r * kPLd + c + e] = to_bf(pr * (dv[e] - dl));
        }
      }
    __syncwarp();

#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (j >= chunks) break;
      FragA ds;
      wmma::load_matrix_sync(ds, dSs + wr * kPLd + 16 * j, kPLd);
#pragma unroll
      for (int c = 0; c < KD; ++c) {
        FragB kf;
        wmma::load_matrix_sync(kf, Ks + 16 * j * LDB + 16 * c, LDB);
        wmma::mma_sync(dq[c], ds, kf, dq[c]);
      }
    }
  }

  write_rows_tc<D>(Sw, dq, dqkv + int64_t(b) * p.T * p.qkv_stride + p.q_off + int64_t(h) * p.D, p.qkv_stride,
                   q0 + wr, p.T, scale);
}

// dK, dV. Block: 64 keys of one (batch, kv head), grid n_tiles * B * KV. Warp w owns keys 16w ..
// 16w+15. The block walks the group's query heads in order and, for each, the query tiles from
// the diagonal on: Sᵀ = K Qᵀ and dPᵀ = V dOᵀ per warp, lane pairs form Pᵀ and dSᵀ (bf16), then
// dV += Pᵀ dO and dK += dSᵀ Q in fragments; dK *= scale on the way out.
template <int D>
__global__ void __launch_bounds__(kTcThreads, 1) attention_backward_dkdv_tc_kernel(
    __nv_bfloat16* __restrict__ dqkv, const __nv_bfloat16* __restrict__ dout, const __nv_bfloat16* __restrict__ qkv,
    const float* __restrict__ lse, const float* __restrict__ delta, AttnParams p, float scale) {
  constexpr int LDB = tc_ld<D>(), KD = D / 16;
  extern __shared__ __align__(128) unsigned char tc_smem[];
  __nv_bfloat16* Ks = reinterpret_cast<__nv_bfloat16*>(tc_smem);  // (kTile, LDB)
  __nv_bfloat16* Vs = Ks + kTile * LDB;                            // (kTile, LDB)
  __nv_bfloat16* Qs = Vs + kTile * LDB;                            // (kTile, LDB)
  __nv_bfloat16* dOs = Qs + kTile * LDB;                           // (kTile, LDB)
  __nv_bfloat16* Pt = dOs + kTile * LDB;                           // (kTile keys, kPLd)
  __nv_bfloat16* dSt = Pt + kTile * kPLd;                          // (kTile keys, kPLd)
  float* scratch = reinterpret_cast<float*>(dSt + kTile * kPLd);   // per warp: Sᵀ, dPᵀ (16, kSLd) each
  float* lse2_s = scratch + 2 * kTile * kSLd;
  float* delta_s = lse2_s + kTile;

  const int BKV = p.B * p.KV;
  const int bkv = int(blockIdx.x % unsigned(BKV));
  const int kt = int(blockIdx.x / unsigned(BKV));
  const int b = bkv / p.KV, kvh = bkv % p.KV;
  const int k0 = kt * kTile, k_valid = min(kTile, p.T - k0);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, wr = 16 * warp;
  const int rw = lane / 2, r = wr + rw, half = lane % 2, k = k0 + r;  // this lane's key
  float* Sw = scratch + warp * 2 * 16 * kSLd;                         // (16 keys, kSLd)
  float* dPw = Sw + 16 * kSLd;                                        // (16 keys, kSLd)
  const __nv_bfloat16* base = qkv + int64_t(b) * p.T * p.qkv_stride;

  const __nv_bfloat16* kv_rows = base + int64_t(k0) * p.qkv_stride + int64_t(kvh) * p.D;
  stage_tile_bf16<D>(Ks, kv_rows + p.k_off, p.qkv_stride, k_valid, p.vec);
  stage_tile_bf16<D>(Vs, kv_rows + p.v_off, p.qkv_stride, k_valid, p.vec);

  FragAcc dk[KD], dv[KD];
#pragma unroll
  for (int c = 0; c < KD; ++c) wmma::fill_fragment(dk[c], 0.f), wmma::fill_fragment(dv[c], 0.f);

  for (int g = 0; g < p.group; ++g) {
    const int h = kvh * p.group + g;
    for (int qt = kt; qt < p.n_tiles; ++qt) {
      const int q0 = qt * kTile, q_valid = min(kTile, p.T - q0);
      __syncthreads();  // every warp's reads of the previous Q, dO tiles and stats are done
      stage_tile_bf16<D>(Qs, base + int64_t(q0) * p.qkv_stride + p.q_off + int64_t(h) * p.D, p.qkv_stride,
                         q_valid, p.vec);
      stage_tile_bf16<D>(dOs, dout + (int64_t(b) * p.T + q0) * p.out_stride + int64_t(h) * p.D, p.out_stride,
                         q_valid, p.vec);
      stage_row_stats(lse2_s, delta_s, lse, delta, (int64_t(b) * p.H + h) * p.T + q0, q_valid);
      __syncthreads();

      // On the diagonal tile, query chunks before the warp's keys are fully masked: skipped.
      const bool diagonal = qt == kt;
      const int first = diagonal ? warp : 0;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (j < first) continue;
        dual_wmma_products<D>(Ks + wr * LDB, Vs + wr * LDB, Qs + 16 * j * LDB, dOs + 16 * j * LDB, Sw + 16 * j,
                              dPw + 16 * j);
      }
      __syncwarp();

      // Pᵀ and dSᵀ for key k against the tile's queries (padding queries past T, and queries
      // before k, are masked: 0).
#pragma unroll
      for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int gg = 0; gg < 4; ++gg) {
          const int c = pair_col(half, a, gg);
          const float4 s4 = *reinterpret_cast<const float4*>(Sw + rw * kSLd + c);
          const float4 d4 = *reinterpret_cast<const float4*>(dPw + rw * kSLd + c);
          const float sv[4] = {s4.x, s4.y, s4.z, s4.w}, dv4[4] = {d4.x, d4.y, d4.z, d4.w};
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int qr = c + e, qq = q0 + qr;
            const float pr = (k <= qq && qq < p.T) ? exp2f(sv[e] * p.scale_log2 - lse2_s[qr]) : 0.f;
            Pt[r * kPLd + qr] = to_bf(pr);
            dSt[r * kPLd + qr] = to_bf(pr * (dv4[e] - delta_s[qr]));
          }
        }
      __syncwarp();

#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (j < first) continue;
        FragA pa, da;
        wmma::load_matrix_sync(pa, Pt + wr * kPLd + 16 * j, kPLd);
        wmma::load_matrix_sync(da, dSt + wr * kPLd + 16 * j, kPLd);
#pragma unroll
        for (int c = 0; c < KD; ++c) {
          FragB bf;
          wmma::load_matrix_sync(bf, dOs + 16 * j * LDB + 16 * c, LDB);
          wmma::mma_sync(dv[c], pa, bf, dv[c]);
          wmma::load_matrix_sync(bf, Qs + 16 * j * LDB + 16 * c, LDB);
          wmma::mma_sync(dk[c], da, bf, dk[c]);
        }
      }
    }
  }

  __nv_bfloat16* rows = dqkv + int64_t(b) * p.T * p.qkv_stride + int64_t(kvh) * p.D;
  write_rows_tc<D>(Sw, dk, rows + p.k_off, p.qkv_stride, k0 + wr, p.T, scale);
  write_rows_tc<D>(Sw, dv, rows + p.v_off, p.qkv_stride, k0 + wr, p.T, 1.f);
}

// ---- Register-resident tensor-core kernels (mma.sync m16n8k16, the FlashAttention-2 structure) ----
// For head_dim 32, 64 and 128 with SPPO_CUDA_ATTENTION=mma (the WMMA kernels are the default until a
// GPU job has checked these). Unlike the WMMA
// kernels above, fragments here have the documented layout of cuda_mma.cuh, so scores S, dP,
// probabilities P, dS and the accumulators O, dQ, dK, dV never leave registers: a score tile's
// accumulators, rounded to bf16, are directly the A operand of the next product. A block owns
// 128 rows (queries in the forward and dQ, keys in dK/dV): 32 per warp up to head_dim 64 (4
// warps), 16 at 128 (8 warps), and walks 64-row tiles of the other side, staged in shared
// memory by cp.async one tile ahead (double buffering: the copy of tile i+1 runs under the
// products of tile i). Tile rows are padded by 16 bytes (row stride D+8 bf16), so the 8 row
// addresses of an ldmatrix phase fall in 8 distinct 16-byte bank groups. Causality is exploited
// per warp: a tile wholly after a warp's last row is skipped, and only tiles that cross the
// diagonal pay for the mask. As in the other kernels: base-2 softmax, natural-log lse, P and dS
// rounded to bf16 for the products, fp32 everywhere else, one writer per output and a fixed
// summation order (deterministic).
constexpr int kFaRows = 128;  // the block's own rows
constexpr int kFaCols = 64;             // rows per tile of the other side
template <int D>
constexpr int fa_ld() {  // bf16 row stride of staged tiles
  return D + 8;
}
template <int D>
constexpr size_t fa_tile_bytes(int rows) {
  return sizeof(__nv_bfloat16) * size_t(rows) * fa_ld<D>();
}
template <int D>
constexpr size_t fa_forward_smem() {  // Q (128 rows), K and V (64 rows) twice
  return fa_tile_bytes<D>(kFaRows) + 4 * fa_tile_bytes<D>(kFaCols);
}
template <int D>
constexpr size_t fa_backward_dq_smem() {  // Q, dO (128 rows), K and V (64 rows) twice
  return 2 * fa_tile_bytes<D>(kFaRows) + 4 * fa_tile_bytes<D>(kFaCols);
}
template <int D>
constexpr size_t fa_backward_dkdv_smem() {  // K, V (128 rows), Q and dO (64 rows) twice, lse2 and delta twice
  return 2 * fa_tile_bytes<D>(kFaRows) + 4 * fa_tile_bytes<D>(kFaCols) + 2 * 2 * kFaCols * sizeof(float);
}

// Starts the copy of rows [0, valid) of a (ROWS, D) bf16 block at src (row stride ld) into dst
// (ROWS, fa_ld<D>); rows past `valid` become zeros (so a masked probability never meets stale
// shared memory: 0 * NaN). `vec` (every row 16-byte aligned): cp.async, visible after
// cp_async_wait and a barrier; otherwise element copies, visible after the barrier. THREADS: the
// block size, every thread taking part.
template <int D, int ROWS, int THREADS>
__device__ __forceinline__ void fa_load_tile(__nv_bfloat16* __restrict__ dst, const __nv_bfloat16* __restrict__ src,
                                             int64_t ld, int valid, bool vec) {
  constexpr int LDS = fa_ld<D>();
  if (vec) {
    constexpr int kPieces = ROWS * D / 8, kPerThread = (kPieces + THREADS - 1) / THREADS;
#pragma unroll
    for (int u = 0; u < kPerThread; ++u) {
      const int e = u * THREADS + threadIdx.x;
      if (kPieces % THREADS != 0 && e >= kPieces) break;
      const int r = e / (D / 8), c = e % (D / 8) * 8;
      // A zero-filled row still needs a valid address: the tile's first row.
      cp_async_16(dst + r * LDS + c, src + int64_t(r < valid ? r : 0) * ld + c, r < valid);
    }
  } else {
    const __nv_bfloat16 zero = to_bf(0.f);
#pragma unroll 4
    for (int e = threadIdx.x; e < ROWS * D; e += THREADS) {
      const int r = e / D, c = e % D;
      dst[r * LDS + c] = r < valid ? src[int64_t(r) * ld + c] : zero;
    }
  }
}

// The A fragments of a warp's 16 rows (row stride fa_ld<D>), for the D / 16 k-steps over D.
template <int D>
__device__ __forceinline__ void fa_load_a(uint32_t (&a)[D / 16][4], const __nv_bfloat16* rows) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) ldmatrix_x4(a[kk], rows + (lane & 15) * fa_ld<D>() + 16 * kk + (lane >> 4) * 8);
}

// acc[i] (16 x 16 chunk, two n-tiles) += A[i] · Bᵀ over D for the MT m-tiles of a warp, with B
// the 16 rows at `b_rows` (row stride fa_ld<D>): each B fragment is loaded once for all m-tiles.
template <int D, int MT>
__device__ __forceinline__ void fa_scores_rows(float (&acc)[MT][2][4], const uint32_t (&a)[MT][D / 16][4],
                                               const __nv_bfloat16* b_rows) {
  const int lane = threadIdx.x % 32;
  const __nv_bfloat16* row = b_rows + ((lane >> 4) * 8 + (lane & 7)) * fa_ld<D>() + ((lane >> 3) & 1) * 8;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t b[4];
    ldmatrix_x4(b, row + 16 * kk);
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      mma_m16n8k16(acc[i][0], a[i][kk], b[0], b[1]);
      mma_m16n8k16(acc[i][1], a[i][kk], b[2], b[3]);
    }
  }
}

// acc[i] (16 x D) += A[i] · B for a 16-wide inner chunk and the MT m-tiles of a warp, with B the
// 16 rows at `b_rows` (row-major, loaded transposed once for all m-tiles).
template <int D, int MT>
__device__ __forceinline__ void fa_accumulate_rows(float (&acc)[MT][D / 8][4], const uint32_t (&a)[MT][4],
                                                   const __nv_bfloat16* b_rows) {
  const int lane = threadIdx.x % 32;
  const __nv_bfloat16* row = b_rows + (((lane >> 3) & 1) * 8 + (lane & 7)) * fa_ld<D>() + (lane >> 4) * 8;
#pragma unroll
  for (int dp = 0; dp < D / 16; ++dp) {
    uint32_t b[4];
    ldmatrix_x4_trans(b, row + 16 * dp);
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      mma_m16n8k16(acc[i][2 * dp], a[i], b[0], b[1]);
      mma_m16n8k16(acc[i][2 * dp + 1], a[i], b[2], b[3]);
    }
  }
}

// Writes a warp's 16 x D accumulator rows times `mul` as bf16: this lane's rows row0 + g and
// row0 + g + 8 (those before T) of dst (row stride ld).
template <int D>
__device__ __forceinline__ void fa_write_rows(const float (&acc)[D / 8][4], __nv_bfloat16* __restrict__ dst,
                                              int64_t ld, int row0, int T, float mul) {
  const int lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = row0 + g + 8 * h;
    if (row >= T) continue;
    __nv_bfloat16* out = dst + int64_t(row) * ld + 2 * t;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      out[8 * n] = to_bf(acc[n][2 * h] * mul);
      out[8 * n + 1] = to_bf(acc[n][2 * h + 1] * mul);
    }
  }
}

// The query-side kernels (forward, dQ) give each warp MT 16-row m-tiles (MT = 2 up to head_dim 64;
// 1 at 128, where O or dQ alone takes 64 registers per m-tile), so every K or V fragment loaded
// from shared memory feeds MT products: shared-memory bandwidth, not the tensor cores, bounds
// these kernels at one m-tile (one ldmatrix.x4, 512 bytes, per two m16n8k16). A block is always
// 128 queries: 4 warps at MT 2.
template <int D>
constexpr int fa_query_row_tiles() {
  return D <= 64 ? 2 : 1;
}
template <int D>
constexpr int fa_query_threads() {
  return 32 * kFaRows / (16 * fa_query_row_tiles<D>());
}

// One 64-key tile of the forward for a warp's 16 MT queries (from wq): S = Q Kᵀ, the online
// softmax update of the running max m (base 2, scaled) and lane-partial sum l of this lane's rows
// (g and g + 8 of each m-tile), and O += P V. kMasked: the tile crosses the warp's diagonal, so
// keys after a row's query (those past T included) are -inf, and 16-key chunks wholly after the
// warp's last query are skipped. Key 0 is in the first tile and visible to every row, so m is
// finite from the first tile on. Scores stay unscaled up to the exponent: exp2(s scale log2(e) -
// m) is one FFMA and an EX2 (scaling commutes with the max, the scale being positive).
template <int D, int MT, bool kMasked>
__device__ __forceinline__ void fa_forward_tile(float (&o)[MT][D / 8][4], float (&m)[MT][2], float (&l)[MT][2],
                                                const uint32_t (&qf)[MT][D / 16][4], const __nv_bfloat16* Kb,
                                                const __nv_bfloat16* Vb, int k0, int wq, float scale_log2) {
  constexpr int LDS = fa_ld<D>();
  const int lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  const int chunks = kMasked ? min(4, (wq + 16 * MT - 1 - k0) / 16 + 1) : 4;  // chunks with a key visible to the warp
  float s[MT][4][2][4];                                                       // [m-tile][chunk][n-tile][fragment]
#pragma unroll
  for (int c = 0; c < 4; ++c) {
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int n = 0; n < 2; ++n) s[i][c][n][0] = s[i][c][n][1] = s[i][c][n][2] = s[i][c][n][3] = 0.f;
    if (c >= chunks) continue;
    // S chunk c = Q Kᵀ: each K fragment (keys 16c.., 16 of D) serves the MT m-tiles. (Written out
    // rather than fa_scores_rows, whose chunk-major score layout makes ptxas spill at head_dim 64.)
    const __nv_bfloat16* row = Kb + (16 * c + (lane >> 4) * 8 + (lane & 7)) * LDS + ((lane >> 3) & 1) * 8;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t b[4];
      ldmatrix_x4(b, row + 16 * kk);
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        mma_m16n8k16(s[i][c][0], qf[i][kk], b[0], b[1]);
        mma_m16n8k16(s[i][c][1], qf[i][kk], b[2], b[3]);
      }
    }
  }
  float neg_m[MT][2];
#pragma unroll
  for (int i = 0; i < MT; ++i) {
    float mt[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int c = 0; c < 4; ++c)
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float& x = s[i][c][n][e];
          if (kMasked && k0 + 16 * c + 8 * n + 2 * t + (e & 1) > wq + 16 * i + g + 8 * (e >> 1)) x = -INFINITY;
          mt[e >> 1] = fmaxf(mt[e >> 1], x);
        }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mt[r] = fmaxf(mt[r], __shfl_xor_sync(0xffffffffu, mt[r], 1));
      mt[r] = fmaxf(mt[r], __shfl_xor_sync(0xffffffffu, mt[r], 2));
      const float m_new = fmaxf(m[i][r], mt[r] * scale_log2);
      alpha[r] = exp2_approx(m[i][r] - m_new);  // 0 on the first tile (m = -inf, m_new finite)
      m[i][r] = m_new;
      neg_m[i][r] = -m_new;
      l[i][r] *= alpha[r];
    }
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      o[i][n][0] *= alpha[0], o[i][n][1] *= alpha[0];
      o[i][n][2] *= alpha[1], o[i][n][3] *= alpha[1];
    }
  }
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    if (c >= chunks) break;
    uint32_t pa[MT][4];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int n = 0; n < 2; ++n) {
        const float* x = s[i][c][n];  // masked: exp2(-inf) = 0
        const float p0 = exp2_approx(fmaf(x[0], scale_log2, neg_m[i][0]));
        const float p1 = exp2_approx(fmaf(x[1], scale_log2, neg_m[i][0]));
        const float p2 = exp2_approx(fmaf(x[2], scale_log2, neg_m[i][1]));
        const float p3 = exp2_approx(fmaf(x[3], scale_log2, neg_m[i][1]));
        l[i][0] += p0 + p1;
        l[i][1] += p2 + p3;
        pa[i][2 * n] = pack_bf16x2(p0, p1);
        pa[i][2 * n + 1] = pack_bf16x2(p2, p3);
      }
    // O += P V over keys 16c..: each V fragment serves the MT m-tiles.
    fa_accumulate_rows<D, MT>(o, pa, Vb + 16 * c * LDS);
  }
}

// Forward. Block: 128 queries of one (batch, head), grid ceil(T/128) * B * H, heaviest (last)
// query blocks first; warp w owns queries q0 + 16 MT w .. q0 + 16 MT (w + 1) - 1. Per 64-key tile
// up to the block's last query: S = Q Kᵀ (Q in registers), online softmax per row (the max over
// the quad of lanes sharing the row; the sum stays lane-partial, rescaled by the row-uniform
// alpha, and is reduced once at the end), then O += P V with P taken from the S registers
// (fa_forward_tile).
template <int D>
__global__ void __launch_bounds__(fa_query_threads<D>(), 1)
    attention_forward_mma_kernel(__nv_bfloat16* __restrict__ out, float* __restrict__ lse,
                                 const __nv_bfloat16* __restrict__ qkv, AttnParams p) {
  constexpr int LDS = fa_ld<D>(), KD = D / 16, ND = D / 8;
  constexpr int MT = fa_query_row_tiles<D>(), WR = 16 * MT, THREADS = fa_query_threads<D>();
  extern __shared__ __align__(128) unsigned char fa_smem[];
  __nv_bfloat16* Qs = reinterpret_cast<__nv_bfloat16*>(fa_smem);  // (128, LDS)
  __nv_bfloat16* Ks = Qs + kFaRows * LDS;                          // 2 x (64, LDS)
  __nv_bfloat16* Vs = Ks + 2 * kFaCols * LDS;                      // 2 x (64, LDS)

  const int BH = p.B * p.H, n_blocks = (p.T + kFaRows - 1) / kFaRows;
  const int bh = int(blockIdx.x % unsigned(BH));
  const int qb = n_blocks - 1 - int(blockIdx.x / unsigned(BH));
  const int b = bh / p.H, h = bh % p.H, kvh = h / p.group;
  const int q0 = qb * kFaRows;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  const int wq = q0 + WR * warp;  // the warp's first query
  const int n_kt = min(p.T - 1, q0 + kFaRows - 1) / kFaCols + 1;
  const __nv_bfloat16* base = qkv + int64_t(b) * p.T * p.qkv_stride;
  const __nv_bfloat16* kv_base = base + int64_t(kvh) * p.D;

  fa_load_tile<D, kFaRows, THREADS>(Qs, base + int64_t(q0) * p.qkv_stride + p.q_off + int64_t(h) * p.D,
                                    p.qkv_stride, min(kFaRows, p.T - q0), p.vec);
  fa_load_tile<D, kFaCols, THREADS>(Ks, kv_base + p.k_off, p.qkv_stride, min(kFaCols, p.T), p.vec);
  fa_load_tile<D, kFaCols, THREADS>(Vs, kv_base + p.v_off, p.qkv_stride, min(kFaCols, p.T), p.vec);
  cp_async_commit();

  uint32_t qf[MT][KD][4];
  float o[MT][ND][4], m[MT][2], l[MT][2];  // this lane's rows: running max (base 2), lane-partial sum
#pragma unroll
  for (int i = 0; i < MT; ++i) {
#pragma unroll
    for (int n = 0; n < ND; ++n) o[i][n][0] = o[i][n][1] = o[i][n][2] = o[i][n][3] = 0.f;
    m[i][0] = m[i][1] = -INFINITY;
    l[i][0] = l[i][1] = 0.f;
  }

  for (int kt = 0; kt < n_kt; ++kt) {
    if (kt + 1 < n_kt) {  // the next tile into the other buffer, freed by the barrier ending the last iteration
      const int k1 = (kt + 1) * kFaCols, buf = (kt + 1) & 1;
      const __nv_bfloat16* rows = kv_base + int64_t(k1) * p.qkv_stride;
      fa_load_tile<D, kFaCols, THREADS>(Ks + buf * kFaCols * LDS, rows + p.k_off, p.qkv_stride,
                                        min(kFaCols, p.T - k1), p.vec);
      fa_load_tile<D, kFaCols, THREADS>(Vs + buf * kFaCols * LDS, rows + p.v_off, p.qkv_stride,
                                        min(kFaCols, p.T - k1), p.vec);
    }
    cp_async_commit();
    cp_async_wait<1>();  // everything but the copy just issued: tile kt (and Q)
    __syncthreads();
    if (kt == 0) {
#pragma unroll
      for (int i = 0; i < MT; ++i) fa_load_a<D>(qf[i], Qs + (WR * warp + 16 * i) * LDS);
    }

    const int k0 = kt * kFaCols;
    const __nv_bfloat16* Kb = Ks + (kt & 1) * kFaCols * LDS;
    const __nv_bfloat16* Vb = Vs + (kt & 1) * kFaCols * LDS;
    // Tiles wholly after the warp's queries are skipped; only those crossing its diagonal mask.
    if (k0 + kFaCols - 1 <= wq)
      fa_forward_tile<D, MT, false>(o, m, l, qf, Kb, Vb, k0, wq, p.scale_log2);
    else if (k0 <= wq + WR - 1)
      fa_forward_tile<D, MT, true>(o, m, l, qf, Kb, Vb, k0, wq, p.scale_log2);
    __syncthreads();  // every warp is done with this tile's buffers before they are refilled
  }

  float* lse_row = lse + (int64_t(b) * p.H + h) * p.T;
#pragma unroll
  for (int i = 0; i < MT; ++i) {
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      l[i][r] += __shfl_xor_sync(0xffffffffu, l[i][r], 1);
      l[i][r] += __shfl_xor_sync(0xffffffffu, l[i][r], 2);
      const int q = wq + 16 * i + g + 8 * r;
      if (t == 0 && q < p.T) lse_row[q] = (m[i][r] + log2f(l[i][r])) * kLn2;
      inv[r] = 1.f / l[i][r];
    }
#pragma unroll
    for (int n = 0; n < ND; ++n) o[i][n][0] *= inv[0], o[i][n][1] *= inv[0], o[i][n][2] *= inv[1], o[i][n][3] *= inv[1];
    fa_write_rows<D>(o[i], out + int64_t(b) * p.T * p.out_stride + int64_t(h) * p.D, p.out_stride, wq + 16 * i, p.T,
                     1.f);
  }
}

// dQ. Block: 128 queries of one (batch, head), grid ceil(T/128) * B * H, heaviest first; warp w
// owns queries q0 + 16 MT w .. q0 + 16 MT (w + 1) - 1, with Q and dO in registers and this lane's
// rows' lse (base 2) and delta in registers. Per 64-key tile up to the block's last query and per
// 16-key chunk visible to the warp: S = Q Kᵀ and dP = dO Vᵀ (one chunk), P = exp2(S scale
// log2(e) - lse2), dS = P ∘ (dP - delta) packed straight into an A fragment, dQ += dS K. dQ *=
// scale at the end.
template <int D>
__global__ void __launch_bounds__(fa_query_threads<D>(), 1) attention_backward_dq_mma_kernel(
    __nv_bfloat16* __restrict__ dqkv, const __nv_bfloat16* __restrict__ dout, const __nv_bfloat16* __restrict__ qkv,
    const float* __restrict__ lse, const float* __restrict__ delta, AttnParams p, float scale) {
  constexpr int LDS = fa_ld<D>(), KD = D / 16, ND = D / 8;
  constexpr int MT = fa_query_row_tiles<D>(), WR = 16 * MT, THREADS = fa_query_threads<D>();
  extern __shared__ __align__(128) unsigned char fa_smem[];
  __nv_bfloat16* Qs = reinterpret_cast<__nv_bfloat16*>(fa_smem);  // (128, LDS)
  __nv_bfloat16* dOs = Qs + kFaRows * LDS;                         // (128, LDS)
  __nv_bfloat16* Ks = dOs + kFaRows * LDS;                         // 2 x (64, LDS)
  __nv_bfloat16* Vs = Ks + 2 * kFaCols * LDS;                      // 2 x (64, LDS)

  const int BH = p.B * p.H, n_blocks = (p.T + kFaRows - 1) / kFaRows;
  const int bh = int(blockIdx.x % unsigned(BH));
  const int qb = n_blocks - 1 - int(blockIdx.x / unsigned(BH));
  const int b = bh / p.H, h = bh % p.H, kvh = h / p.group;
  const int q0 = qb * kFaRows, q_valid = min(kFaRows, p.T - q0);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  const int wq = q0 + WR * warp;
  const int n_kt = min(p.T - 1, q0 + kFaRows - 1) / kFaCols + 1;
  const __nv_bfloat16* base = qkv + int64_t(b) * p.T * p.qkv_stride;
  const __nv_bfloat16* kv_base = base + int64_t(kvh) * p.D;

  fa_load_tile<D, kFaRows, THREADS>(Qs, base + int64_t(q0) * p.qkv_stride + p.q_off + int64_t(h) * p.D,
                                    p.qkv_stride, q_valid, p.vec);
  fa_load_tile<D, kFaRows, THREADS>(dOs, dout + (int64_t(b) * p.T + q0) * p.out_stride + int64_t(h) * p.D,
                                    p.out_stride, q_valid, p.vec);
  fa_load_tile<D, kFaCols, THREADS>(Ks, kv_base + p.k_off, p.qkv_stride, min(kFaCols, p.T), p.vec);
  fa_load_tile<D, kFaCols, THREADS>(Vs, kv_base + p.v_off, p.qkv_stride, min(kFaCols, p.T), p.vec);
  cp_async_commit();

  // This lane's rows' log-sum-exps (base 2) and deltas: [m-tile][g, g + 8]; rows past T: zeros
  // (their dQ is never written).
  float lse2[MT][2], dl[MT][2];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int q = wq + 16 * i + g + 8 * r;
      const int64_t at = (int64_t(b) * p.H + h) * p.T + q;
      lse2[i][r] = q < p.T ? lse[at] * kLog2e : 0.f;
      dl[i][r] = q < p.T ? delta[at] : 0.f;
    }

  uint32_t qf[MT][KD][4], dof[MT][KD][4];
  float dq[MT][ND][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int n = 0; n < ND; ++n) dq[i][n][0] = dq[i][n][1] = dq[i][n][2] = dq[i][n][3] = 0.f;

  for (int kt = 0; kt < n_kt; ++kt) {
    if (kt + 1 < n_kt) {
      const int k1 = (kt + 1) * kFaCols, buf = (kt + 1) & 1;
      const __nv_bfloat16* rows = kv_base + int64_t(k1) * p.qkv_stride;
      fa_load_tile<D, kFaCols, THREADS>(Ks + buf * kFaCols * LDS, rows + p.k_off, p.qkv_stride,
                                        min(kFaCols, p.T - k1), p.vec);
      fa_load_tile<D, kFaCols, THREADS>(Vs + buf * kFaCols * LDS, rows + p.v_off, p.qkv_stride,
                                        min(kFaCols, p.T - k1), p.vec);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    if (kt == 0) {
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        fa_load_a<D>(qf[i], Qs + (WR * warp + 16 * i) * LDS);
        fa_load_a<D>(dof[i], dOs + (WR * warp + 16 * i) * LDS);
      }
    }

    const int k0 = kt * kFaCols;
    const __nv_bfloat16* Kb = Ks + (kt & 1) * kFaCols * LDS;
    const __nv_bfloat16* Vb = Vs + (kt & 1) * kFaCols * LDS;
    const bool masked = k0 + kFaCols - 1 > wq;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      if (k0 + 16 * c > wq + WR - 1) break;  // this chunk and the next are after every query of the warp
      float s[MT][2][4] = {}, dp[MT][2][4] = {};
      fa_scores_rows<D, MT>(s, qf, Kb + 16 * c * LDS);
      fa_scores_rows<D, MT>(dp, dof, Vb + 16 * c * LDS);
      uint32_t da[MT][4];
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int n = 0; n < 2; ++n) {
          float ds[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int key = k0 + 16 * c + 8 * n + 2 * t + (e & 1), r = e >> 1;
            // A select, not a product: exp2 of a masked score may overflow, and inf * 0 is NaN.
            const float pr = (masked && key > wq + 16 * i + g + 8 * r)
                                 ? 0.f
                                 : exp2_approx(s[i][n][e] * p.scale_log2 - lse2[i][r]);
            ds[e] = pr * (dp[i][n][e] - dl[i][r]);
          }
          da[i][2 * n] = pack_bf16x2(ds[0], ds[1]);
          da[i][2 * n + 1] = pack_bf16x2(ds[2], ds[3]);
        }
      fa_accumulate_rows<D, MT>(dq, da, Kb + 16 * c * LDS);
    }
    __syncthreads();
  }

  __nv_bfloat16* rows = dqkv + int64_t(b) * p.T * p.qkv_stride + p.q_off + int64_t(h) * p.D;
#pragma unroll
  for (int i = 0; i < MT; ++i) fa_write_rows<D>(dq[i], rows, p.qkv_stride, wq + 16 * i, p.T, scale);
}

// The dK/dV pass gives each warp MT 16-key m-tiles (as the query-side kernels do with queries:
// MT = 2 up to head_dim 64, 4 warps per 128 keys), so each Q or dO fragment from shared memory
// feeds MT products. A warp's K and V rows are the A operands of every chunk: kept in registers
// where they fit (K up to head_dim 64, V up to 32: at 64, dK, dV and K of two m-tiles already take
// 160 registers), else reloaded from shared memory per chunk.
template <int D>
constexpr int fa_key_row_tiles() {
  return D <= 64 ? 2 : 1;
}
template <int D>
constexpr int fa_key_threads() {
  return 32 * kFaRows / (16 * fa_key_row_tiles<D>());
}
template <int D>
constexpr bool fa_k_in_registers() {
  return D <= 64;
}
template <int D>
constexpr bool fa_v_in_registers() {
  return D <= 32;
}

// S (MT m-tiles x 16 columns) = A · Bᵀ with A the warp's rows: from registers (`held`) when
// kHeld, else loaded from `rows` (16-row m-tiles, row stride fa_ld<D>) into scratch first.
template <int D, int MT, bool kHeld>
__device__ __forceinline__ void fa_scores_from(float (&acc)[MT][2][4], const uint32_t (&held)[MT][D / 16][4],
                                               const __nv_bfloat16* rows, const __nv_bfloat16* b_rows) {
  if constexpr (kHeld) {
    fa_scores_rows<D, MT>(acc, held, b_rows);
  } else {
    uint32_t a[MT][D / 16][4];
#pragma unroll
    for (int i = 0; i < MT; ++i) fa_load_a<D>(a[i], rows + 16 * i * fa_ld<D>());
    fa_scores_rows<D, MT>(acc, a, b_rows);
  }
}

// One 64-query tile of the dK/dV pass for a warp's 16 MT keys (from wk), 16 queries at a time:
// Sᵀ and dPᵀ, Pᵀ = exp2(Sᵀ scale log2(e) - lse2), dSᵀ = Pᵀ ∘ (dPᵀ - delta), dV += Pᵀ dO,
// dK += dSᵀ Q. K and V: the fragments kf, vf or the rows at Kw, Vw (fa_k/v_in_registers).
// kMasked: queries before a key of the warp, or past T, get P = 0, and chunks wholly so are
// skipped. lse2 (base 2) and delta are the tile's, in shared memory.
template <int D, int MT, bool kMasked>
__device__ __forceinline__ void fa_dkdv_tile(float (&dk)[MT][D / 8][4], float (&dv)[MT][D / 8][4],
                                             const uint32_t (&kf)[MT][D / 16][4], const uint32_t (&vf)[MT][D / 16][4],
                                             const __nv_bfloat16* Kw, const __nv_bfloat16* Vw,
                                             const __nv_bfloat16* Qb, const __nv_bfloat16* dOb, const float* lse2_s,
                                             const float* delta_s, int q0, int wk, int T, float scale_log2) {
  constexpr int LDS = fa_ld<D>();
  const int lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    // All before the warp's keys, or all padding.
    if (kMasked && (q0 + 16 * c + 15 < wk || q0 + 16 * c >= T)) continue;
    float st[MT][2][4] = {}, dpt[MT][2][4] = {};
    fa_scores_from<D, MT, fa_k_in_registers<D>()>(st, kf, Kw, Qb + 16 * c * LDS);
    fa_scores_from<D, MT, fa_v_in_registers<D>()>(dpt, vf, Vw, dOb + 16 * c * LDS);
    uint32_t pa[MT][4], da[MT][4];
#pragma unroll
    for (int n = 0; n < 2; ++n) {
      const int qr = 16 * c + 8 * n + 2 * t;  // this lane's two query columns: qr, qr + 1
      const float2 l2 = *reinterpret_cast<const float2*>(lse2_s + qr);
      const float2 d2 = *reinterpret_cast<const float2*>(delta_s + qr);
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        float pr[4], ds[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int q = q0 + qr + (e & 1), key = wk + 16 * i + g + 8 * (e >> 1);
          const float l2e = (e & 1) ? l2.y : l2.x, d2e = (e & 1) ? d2.y : d2.x;
          pr[e] = (kMasked && (q < key || q >= T)) ? 0.f : exp2_approx(st[i][n][e] * scale_log2 - l2e);
          ds[e] = pr[e] * (dpt[i][n][e] - d2e);
        }
        pa[i][2 * n] = pack_bf16x2(pr[0], pr[1]);
        pa[i][2 * n + 1] = pack_bf16x2(pr[2], pr[3]);
        da[i][2 * n] = pack_bf16x2(ds[0], ds[1]);
        da[i][2 * n + 1] = pack_bf16x2(ds[2], ds[3]);
      }
    }
    fa_accumulate_rows<D, MT>(dv, pa, dOb + 16 * c * LDS);
    fa_accumulate_rows<D, MT>(dk, da, Qb + 16 * c * LDS);
  }
}

// dK, dV. Block: 128 keys of one (batch, kv head), grid ceil(T/128) * B * KV, first key blocks
// (the heaviest) first; warp w owns keys k0 + 16 MT w .. k0 + 16 MT (w + 1) - 1. The block walks
// the group's query heads in order and, for each, the 64-query tiles from the block's first key
// on; per 16-query chunk not wholly before the warp's keys: Sᵀ = K Qᵀ and dPᵀ = V dOᵀ,
// Pᵀ = exp2(Sᵀ scale log2(e) - lse2) and dSᵀ = Pᵀ ∘ (dPᵀ - delta) as A fragments, dV += Pᵀ dO and
// dK += dSᵀ Q (fa_dkdv_tile). dK *= scale at the end.
template <int D>
__global__ void __launch_bounds__(fa_key_threads<D>(), 1) attention_backward_dkdv_mma_kernel(
    __nv_bfloat16* __restrict__ dqkv, const __nv_bfloat16* __restrict__ dout, const __nv_bfloat16* __restrict__ qkv,
    const float* __restrict__ lse, const float* __restrict__ delta, AttnParams p, float scale) {
  constexpr int LDS = fa_ld<D>(), KD = D / 16, ND = D / 8;
  constexpr int MT = fa_key_row_tiles<D>(), WR = 16 * MT, THREADS = fa_key_threads<D>();
  extern __shared__ __align__(128) unsigned char fa_smem[];
  __nv_bfloat16* Ks = reinterpret_cast<__nv_bfloat16*>(fa_smem);  // (128, LDS)
  __nv_bfloat16* Vs = Ks + kFaRows * LDS;                          // (128, LDS)
  __nv_bfloat16* Qs = Vs + kFaRows * LDS;                          // 2 x (64, LDS)
  __nv_bfloat16* dOs = Qs + 2 * kFaCols * LDS;                     // 2 x (64, LDS)
  float* stats = reinterpret_cast<float*>(dOs + 2 * kFaCols * LDS);  // 2 x (lse2 (64), delta (64))

  const int BKV = p.B * p.KV;
  const int bkv = int(blockIdx.x % unsigned(BKV));
  const int kb = int(blockIdx.x / unsigned(BKV));
  const int b = bkv / p.KV, kvh = bkv % p.KV;
  const int k0 = kb * kFaRows;
  const int warp = threadIdx.x / 32;
  const int wk = k0 + WR * warp;  // the warp's first key
  const int qt0 = k0 / kFaCols, n_qt = (p.T + kFaCols - 1) / kFaCols - qt0;  // query tiles per head
  const int n_it = p.group * n_qt;
  const __nv_bfloat16* base = qkv + int64_t(b) * p.T * p.qkv_stride;

  // Stages iteration i's query tile: head kvh * group + i / n_qt, tile qt0 + i % n_qt.
  auto load_queries = [&](int i, int buf) {
    const int h = kvh * p.group + i / n_qt, q1 = (qt0 + i % n_qt) * kFaCols, valid = min(kFaCols, p.T - q1);
    fa_load_tile<D, kFaCols, THREADS>(Qs + buf * kFaCols * LDS,
                                      base + int64_t(q1) * p.qkv_stride + p.q_off + int64_t(h) * p.D, p.qkv_stride,
                                      valid, p.vec);
    fa_load_tile<D, kFaCols, THREADS>(dOs + buf * kFaCols * LDS,
                                      dout + (int64_t(b) * p.T + q1) * p.out_stride + int64_t(h) * p.D,
                                      p.out_stride, valid, p.vec);
    static_assert(THREADS >= kFaCols, "a thread per query row stages the statistics");
    if (threadIdx.x < kFaCols) {  // plain stores: visible after the barrier
      const int r = threadIdx.x;
      const int64_t at = (int64_t(b) * p.H + h) * p.T + q1 + r;
      stats[buf * 2 * kFaCols + r] = r < valid ? lse[at] * kLog2e : 0.f;
      stats[buf * 2 * kFaCols + kFaCols + r] = r < valid ? delta[at] : 0.f;
    }
  };

  const __nv_bfloat16* kv_rows = base + int64_t(k0) * p.qkv_stride + int64_t(kvh) * p.D;
  fa_load_tile<D, kFaRows, THREADS>(Ks, kv_rows + p.k_off, p.qkv_stride, min(kFaRows, p.T - k0), p.vec);
  fa_load_tile<D, kFaRows, THREADS>(Vs, kv_rows + p.v_off, p.qkv_stride, min(kFaRows, p.T - k0), p.vec);
  load_queries(0, 0);
  cp_async_commit();

  uint32_t kf[MT][KD][4], vf[MT][KD][4];  // the warp's K and V rows as A fragments, where held
  float dk[MT][ND][4], dv[MT][ND][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int n = 0; n < ND; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) dk[i][n][e] = dv[i][n][e] = 0.f;

  const __nv_bfloat16 *Kw = Ks + WR * warp * LDS, *Vw = Vs + WR * warp * LDS;
  for (int it = 0; it < n_it; ++it) {
    if (it + 1 < n_it) load_queries(it + 1, (it + 1) & 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    if (it == 0) {
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        if (fa_k_in_registers<D>()) fa_load_a<D>(kf[i], Kw + 16 * i * LDS);
        if (fa_v_in_registers<D>()) fa_load_a<D>(vf[i], Vw + 16 * i * LDS);
      }
    }

    const int q0 = (qt0 + it % n_qt) * kFaCols;
    const __nv_bfloat16* Qb = Qs + (it & 1) * kFaCols * LDS;
    const __nv_bfloat16* dOb = dOs + (it & 1) * kFaCols * LDS;
    const float* lse2_s = stats + (it & 1) * 2 * kFaCols;
    const float* delta_s = lse2_s + kFaCols;
    // A tile wholly before the warp's keys (the block's first, for its later warps) is skipped;
    // only tiles holding a query before one of its keys, or padding queries past T, mask. From
    // head_dim 64 on the two versions together would spill: there every tile takes the masked one.
    if (D <= 32 && q0 >= wk + WR - 1 && q0 + kFaCols <= p.T)
      fa_dkdv_tile<D, MT, false>(dk, dv, kf, vf, Kw, Vw, Qb, dOb, lse2_s, delta_s, q0, wk, p.T, p.scale_log2);
    else if (q0 + kFaCols - 1 >= wk)
      fa_dkdv_tile<D, MT, true>(dk, dv, kf, vf, Kw, Vw, Qb, dOb, lse2_s, delta_s, q0, wk, p.T, p.scale_log2);
    __syncthreads();
  }

  __nv_bfloat16* rows = dqkv + int64_t(b) * p.T * p.qkv_stride + int64_t(kvh) * p.D;
#pragma unroll
  for (int i = 0; i < MT; ++i) {
    fa_write_rows<D>(dk[i], rows + p.k_off, p.qkv_stride, wk + 16 * i, p.T, scale);
    fa_write_rows<D>(dv[i], rows + p.v_off, p.qkv_stride, wk + 16 * i, p.T, 1.f);
  }
}

// ---- Decoding with a KV cache ----
// Split decode: a row's cached positions are cut into chunks of kDecodeChunk; block (row, kv
// head, chunk) computes, for the group's query heads, the chunk's max m, sum l and unnormalised
// P V, and a second kernel merges a row's chunks in chunk order. The chunking depends only on the
// row's own length, so a row's result is the same whatever else the call holds.
constexpr int kDecodeChunk = 256;
constexpr int kDecodeThreads = 128;
constexpr int kDecodeWarps = kDecodeThreads / 32;

__global__ void kv_cache_write_kernel(__nv_bfloat16* __restrict__ k_cache, __nv_bfloat16* __restrict__ v_cache,
                                      const __nv_bfloat16* __restrict__ qkv, const int32_t* __restrict__ slots,
                                      const int32_t* __restrict__ positions, int64_t n, int KV, int D, int ctx,
                                      int n_slots, int64_t qkv_stride, int64_t k_off, int64_t v_off) {
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= n * KV * D) return;
  const int d = int(e % D);
  const int h = int((e / D) % KV);
  const int64_t i = e / (int64_t(D) * KV);
  // A row outside the cache is a caller bug (the generator validates first); never write past it.
  if (unsigned(positions[i]) >= unsigned(ctx) || unsigned(slots[i]) >= unsigned(n_slots)) return;
  const int64_t at = ((int64_t(slots[i]) * KV + h) * ctx + positions[i]) * D + d;  // (slots, KV, ctx, D)
  const int64_t src = i * qkv_stride + int64_t(h) * D + d;
  k_cache[at] = qkv[src + k_off];
  v_cache[at] = qkv[src + v_off];
}

struct DecodeParams {
  int H, KV, D, group, ctx, n_chunks;  // n_chunks = ceil(ctx / kDecodeChunk): the partials' stride
  int64_t qkv_stride, q_off, out_stride;
  float scale_log2;
};

// Block (row r of this launch, kv head, chunk). Shared: q (group, D) pre-scaled, scores (group,
// kDecodeChunk), P V partials (kDecodeWarps, group, D). Partials: o (rows, H, n_chunks, D) and (m, l) (rows, H, n_chunks, 2).
template <int DMAX>
__global__ void __launch_bounds__(kDecodeThreads) attention_decode_chunk_kernel(
    float* __restrict__ part_o, float* __restrict__ part_ml, const __nv_bfloat16* __restrict__ qkv,
    const __nv_bfloat16* __restrict__ k_cache, const __nv_bfloat16* __restrict__ v_cache,
    const int32_t* __restrict__ slots, const int32_t* __restrict__ positions, int64_t row0, DecodeParams p) {
  extern __shared__ float smem[];
  const int G = p.group, D = p.D;
  float* qs = smem;          // (G, D)
  float* ps = qs + G * D;    // (G, kDecodeChunk)
  const int64_t r = blockIdx.x, i = row0 + r;
  const int kvh = blockIdx.y, chunk = blockIdx.z;
  // Positions past the cache would index outside it: clamp (a caller bug, not a valid request).
  const int len = int(min(int64_t(positions[i]) + 1, int64_t(p.ctx)));
  const int p0 = chunk * kDecodeChunk;
  if (p0 >= len) return;  // the whole block leaves before any barrier
  const int cnt = min(kDecodeChunk, len - p0);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  const __nv_bfloat16* q = qkv + i * p.qkv_stride + p.q_off + int64_t(kvh) * G * D;  // (G, D), rows D apart
  for (int e = threadIdx.x; e < G * D; e += kDecodeThreads) qs[e] = to_f(q[e]) * p.scale_log2;
  __syncthreads();

  const int64_t cache_at = ((int64_t(slots[i]) * p.KV + kvh) * p.ctx + p0) * D;
  const __nv_bfloat16* K = k_cache + cache_at;  // (cnt, D)
  const __nv_bfloat16* V = v_cache + cache_at;  // (cnt, D)
  // Scores: a warp per position, lanes over the head dim.
  constexpr int U = DMAX / 32;
  for (int t = warp; t < cnt; t += kDecodeWarps) {
    float kr[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int d = lane + 32 * u;
      kr[u] = d < D ? to_f(K[int64_t(t) * D + d]) : 0.f;
    }
    for (int g = 0; g < G; ++g) {
      float acc = 0.f;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int d = lane + 32 * u;
        if (d < D) acc = fmaf(qs[g * D + d], kr[u], acc);
      }
      acc = sum32(acc);
      if (lane == 0) ps[g * kDecodeChunk + t] = acc;
    }
  }
  __syncthreads();

  // Softmax pieces per query head: a warp per head; lanes stride the chunk, fixed reduction order.
  for (int g = warp; g < G; g += kDecodeWarps) {
    float* srow = ps + g * kDecodeChunk;
    float mx = -INFINITY;
    for (int t = lane; t < cnt; t += 32) mx = fmaxf(mx, srow[t]);
    mx = max32(mx);
    float sum = 0.f;
    for (int t = lane; t < cnt; t += 32) {
      const float e = exp2f(srow[t] - mx);
      srow[t] = e;
      sum += e;
    }
    sum = sum32(sum);
    if (lane == 0) {
      const int64_t at = ((r * p.H + int64_t(kvh) * G + g) * p.n_chunks + chunk) * 2;
      part_ml[at] = mx;
      part_ml[at + 1] = sum;
    }
  }
  __syncthreads();

  // Unnormalised P V. Warp w takes positions w, w + kDecodeWarps, ... in order (lanes over the head
  // dim, one coalesced V row per step), then the warps' partial sums are added in warp order: a
  // fixed order, so the result is the same run to run. (A thread per column walking every
  // position in turn left most threads idle and serialised ~cnt dependent loads: ~40 µs a call.)
  float* red = ps + G * kDecodeChunk;  // (kDecodeWarps, G, D)
  for (int g = 0; g < G; ++g) {
    const float* prow = ps + g * kDecodeChunk;
    float acc[U];
#pragma unroll
    for (int u = 0; u < U; ++u) acc[u] = 0.f;
#pragma unroll 4
    for (int t = warp; t < cnt; t += kDecodeWarps) {
      const float pt = prow[t];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int d = lane + 32 * u;
        if (d < D) acc[u] = fmaf(pt, to_f(V[int64_t(t) * D + d]), acc[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int d = lane + 32 * u;
      if (d < D) red[(warp * G + g) * D + d] = acc[u];
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < G * D; e += kDecodeThreads) {
    float acc = 0.f;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) acc += red[w * G * D + e];
    const int g = e / D, d = e % D;
    part_o[((r * p.H + int64_t(kvh) * G + g) * p.n_chunks + chunk) * D + d] = acc;
  }
}

// Merges a row's chunks in order: out = Σ o_c 2^(m_c - M) / Σ l_c 2^(m_c - M). Block per (row, head).
__global__ void __launch_bounds__(kDecodeThreads) attention_decode_merge_kernel(
    __nv_bfloat16* __restrict__ out, const float* __restrict__ part_o, const float* __restrict__ part_ml,
    const int32_t* __restrict__ positions, int64_t row0, DecodeParams p) {
  const int64_t r = blockIdx.x / p.H, i = row0 + r;
  const int h = int(blockIdx.x % p.H);
  const int len = int(min(int64_t(positions[i]) + 1, int64_t(p.ctx)));
  if (len <= 0) {  // a negative position (a caller bug): no keys, and no 0 * inf below
    for (int d = threadIdx.x; d < p.D; d += kDecodeThreads) out[i * p.out_stride + int64_t(h) * p.D + d] = to_bf(0.f);
    return;
  }
  const int chunks = (len + kDecodeChunk - 1) / kDecodeChunk;
  const int64_t at = (r * p.H + h) * p.n_chunks;
  float M = -INFINITY;
  for (int c = 0; c < chunks; ++c) M = fmaxf(M, part_ml[(at + c) * 2]);
  float L = 0.f;
  for (int c = 0; c < chunks; ++c) L += part_ml[(at + c) * 2 + 1] * exp2f(part_ml[(at + c) * 2] - M);
  const float inv = 1.f / L;
  for (int d = threadIdx.x; d < p.D; d += kDecodeThreads) {
    float acc = 0.f;
    for (int c = 0; c < chunks; ++c) acc = fmaf(part_o[(at + c) * p.D + d], exp2f(part_ml[(at + c) * 2] - M), acc);
    out[i * p.out_stride + int64_t(h) * p.D + d] = to_bf(acc * inv);
  }
}

// ---- Launch helpers ----
int dmax_for(int64_t D, const char* op) {
  SPPO_REQUIRE(D >= 1 && D <= 128, op, ": head_dim ", D, " is not supported by the CUDA backend (1..128)");
  return D <= 32 ? 32 : D <= 64 ? 64 : 128;
}

void check_shape(const AttentionShape& s, const char* op) {
  SPPO_REQUIRE(s.heads > 0 && s.kv_heads > 0 && s.heads % s.kv_heads == 0, op, ": heads (", s.heads,
               ") must be a positive multiple of kv_heads (", s.kv_heads, ")");
  SPPO_REQUIRE(s.seq >= 0 && s.seq < (int64_t(1) << 30) && s.batch >= 0 && s.batch * s.heads <= INT_MAX, op,
               ": shape out of range (batch ", s.batch, ", seq ", s.seq, ", heads ", s.heads, ")");
}

AttnParams attn_params(const AttentionShape& s) {
  AttnParams p;
  p.B = int(s.batch), p.T = int(s.seq), p.H = int(s.heads), p.KV = int(s.kv_heads), p.D = int(s.head_dim);
  p.group = int(s.heads / s.kv_heads);
  p.qkv_stride = s.qkv_stride, p.q_off = s.q_off, p.k_off = s.k_off, p.v_off = s.v_off;
  p.out_stride = s.out_stride;
  p.scale_log2 = float(s.scale * 1.4426950408889634);
  p.n_tiles = int((s.seq + kTile - 1) / kTile);
  p.vec = false;
  return p;
}

// Whether 16-byte copies of tile rows are aligned: every base pointer 16-byte aligned and every
// stride and offset (in bf16 elements) a multiple of 8. D is 32, 64 or 128 on this path.
bool rows_aligned16(std::initializer_list<const void*> ptrs, std::initializer_list<int64_t> elems) {
  for (const void* q : ptrs)
    if (reinterpret_cast<uintptr_t>(q) % 16 != 0) return false;
  for (int64_t e : elems)
    if (e % 8 != 0) return false;
  return true;
}

// Which forward/backward kernels run (SPPO_CUDA_ATTENTION, read once per op set): "wmma" (or
// unset) the WMMA kernels, "mma" the register-resident mma.sync kernels (both for head_dim 32,
// 64, 128; other head dims take the FMA kernels), "fma" the fp32 FMA kernels everywhere. WMMA
// stays the default until a GPU job has run the mma.sync kernels: they were checked only under a
// CPU emulation whose fragment layouts come from the same reading of the PTX manual as the
// kernels, which a real GPU can contradict (bench/NOTES.md, issue 12).
enum class AttnPath { mma, wmma, fma };
AttnPath attention_path() {
  const char* v = std::getenv("SPPO_CUDA_ATTENTION");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "wmma") == 0) return AttnPath::wmma;
  if (std::strcmp(v, "mma") == 0) return AttnPath::mma;
  SPPO_REQUIRE(std::strcmp(v, "fma") == 0, "SPPO_CUDA_ATTENTION is '", v,
               "'; expected 'wmma' (tensor cores, WMMA: the default), 'mma' (tensor cores, mma.sync) or 'fma' "
               "(fp32 FMA kernels)");
  return AttnPath::fma;
}

// One block per (tile, batch, head): a 1-D grid (its x dimension allows 2^31 - 1 blocks).
unsigned tile_grid(int64_t tiles, int64_t heads, int64_t batch, const char* op) {
  SPPO_REQUIRE(tiles * heads * batch <= INT_MAX, op, ": too many blocks (batch ", batch, ", heads ", heads, ")");
  return unsigned(tiles * heads * batch);
}

}  // namespace

// The family's state: the delta buffer of the backward, the decode partials, which kernels were
// granted more than 48 KiB of dynamic shared memory, and the kernel choice (SPPO_CUDA_ATTENTION,
// read once, when an op set makes its first attention call). Buffers grow to the largest shape seen.
struct AttnState {
  const AttnPath path = attention_path();
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
    SPPO_REQUIRE(bytes <= size_t(max_smem_optin), op, " needs ", bytes, " bytes of shared memory per block; this GPU allows ",
                 max_smem_optin);
    size_t& granted = smem_granted[kernel];
    if (granted >= bytes) return;
    SPPO_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
    granted = bytes;
  }
};

template <>
void StateDeleter<AttnState>::operator()(AttnState* s) const {
  delete s;
}

AttnState& CudaOps::attn_state() {
  if (!attn_) attn_.reset(new AttnState());
  return *attn_;
}

namespace {

template <int DMAX>
void launch_forward(AttnState& st, int device, cudaStream_t stream, __nv_bfloat16* out, float* lse,
                    const __nv_bfloat16* qkv, const AttentionShape& s) {
  const AttnParams p = attn_params(s);
  const size_t smem = forward_smem<DMAX>();
  st.allow_smem(reinterpret_cast<const void*>(&attention_forward_kernel<DMAX>), smem, device, "attention_forward");
  attention_forward_kernel<DMAX><<<tile_grid(p.n_tiles, s.heads, s.batch, "attention_forward"), kThreads, smem,
                                   stream>>>(out, lse, qkv, p);
  SPPO_CUDA_LAUNCHED(attention_forward_kernel);
}

template <int DMAX>
void launch_backward(AttnState& st, int device, cudaStream_t stream, __nv_bfloat16* dqkv, const __nv_bfloat16* dout,
                     const __nv_bfloat16* qkv, const float* lse, const float* delta, const AttentionShape& s) {
  const AttnParams p = attn_params(s);
  const float scale = float(s.scale);
  const size_t smem_dq = backward_dq_smem<DMAX>(), smem_dkdv = backward_dkdv_smem<DMAX>();
  st.allow_smem(reinterpret_cast<const void*>(&attention_backward_dq_kernel<DMAX>), smem_dq, device,
                "attention_backward");
  st.allow_smem(reinterpret_cast<const void*>(&attention_backward_dkdv_kernel<DMAX>), smem_dkdv, device,
                "attention_backward");
  attention_backward_dq_kernel<DMAX><<<tile_grid(p.n_tiles, s.heads, s.batch, "attention_backward"), kThreads,
                                       smem_dq, stream>>>(dqkv, dout, qkv, lse, delta, p, scale);
  SPPO_CUDA_LAUNCHED(attention_backward_dq_kernel);
  attention_backward_dkdv_kernel<DMAX><<<tile_grid(p.n_tiles, s.kv_heads, s.batch, "attention_backward"), kThreads,
                                         smem_dkdv, stream>>>(dqkv, dout, qkv, lse, delta, p, scale);
  SPPO_CUDA_LAUNCHED(attention_backward_dkdv_kernel);
}

template <int D>
void launch_forward_tc(AttnState& st, int device, cudaStream_t stream, __nv_bfloat16* out, float* lse,
                       const __nv_bfloat16* qkv, const AttentionShape& s) {
  AttnParams p = attn_params(s);
  p.vec = rows_aligned16({qkv}, {s.qkv_stride, s.q_off, s.k_off, s.v_off});
  const size_t smem = tc_forward_smem<D>();
  st.allow_smem(reinterpret_cast<const void*>(&attention_forward_tc_kernel<D>), smem, device, "attention_forward");
  attention_forward_tc_kernel<D><<<tile_grid(p.n_tiles, s.heads, s.batch, "attention_forward"), kTcThreads, smem,
                                   stream>>>(out, lse, qkv, p);
  SPPO_CUDA_LAUNCHED(attention_forward_tc_kernel);
}

template <int D>
void launch_backward_tc(AttnState& st, int device, cudaStream_t stream, __nv_bfloat16* dqkv,
                        const __nv_bfloat16* dout, const __nv_bfloat16* qkv, const float* lse, const float* delta,
                        const AttentionShape& s) {
  AttnParams p = attn_params(s);
  p.vec = rows_aligned16({qkv, dout}, {s.qkv_stride, s.q_off, s.k_off, s.v_off, s.out_stride});
  const float scale = float(s.scale);
  const size_t smem_dq = tc_backward_dq_smem<D>(), smem_dkdv = tc_backward_dkdv_smem<D>();
  st.allow_smem(reinterpret_cast<const void*>(&attention_backward_dq_tc_kernel<D>), smem_dq, device,
                "attention_backward");
  st.allow_smem(reinterpret_cast<const void*>(&attention_backward_dkdv_tc_kernel<D>), smem_dkdv, device,
                "attention_backward");
  attention_backward_dq_tc_kernel<D><<<tile_grid(p.n_tiles, s.heads, s.batch, "attention_backward"), kTcThreads,
                                       smem_dq, stream>>>(dqkv, dout, qkv, lse, delta, p, scale);
  SPPO_CUDA_LAUNCHED(attention_backward_dq_tc_kernel);
  attention_backward_dkdv_tc_kernel<D><<<tile_grid(p.n_tiles, s.kv_heads, s.batch, "attention_backward"),
                                         kTcThreads, smem_dkdv, stream>>>(dqkv, dout, qkv, lse, delta, p, scale);
  SPPO_CUDA_LAUNCHED(attention_backward_dkdv_tc_kernel);
}

template <int D>
void launch_forward_mma(AttnState& st, int device, cudaStream_t stream, __nv_bfloat16* out, float* lse,
                        const __nv_bfloat16* qkv, const AttentionShape& s) {
  AttnParams p = attn_params(s);
  p.vec = rows_aligned16({qkv}, {s.qkv_stride, s.q_off, s.k_off, s.v_off});
  const size_t smem = fa_forward_smem<D>();
  st.allow_smem(reinterpret_cast<const void*>(&attention_forward_mma_kernel<D>), smem, device, "attention_forward");
  const int64_t blocks = (s.seq + kFaRows - 1) / kFaRows;
  attention_forward_mma_kernel<D><<<tile_grid(blocks, s.heads, s.batch, "attention_forward"), fa_query_threads<D>(),
                                    smem, stream>>>(out, lse, qkv, p);
  SPPO_CUDA_LAUNCHED(attention_forward_mma_kernel);
}

template <int D>
void launch_backward_mma(AttnState& st, int device, cudaStream_t stream, __nv_bfloat16* dqkv,
                         const __nv_bfloat16* dout, const __nv_bfloat16* qkv, const float* lse, const float* delta,
                         const AttentionShape& s) {
  AttnParams p = attn_params(s);
  p.vec = rows_aligned16({qkv, dout}, {s.qkv_stride, s.q_off, s.k_off, s.v_off, s.out_stride});
  const float scale = float(s.scale);
  const size_t smem_dq = fa_backward_dq_smem<D>(), smem_dkdv = fa_backward_dkdv_smem<D>();
  st.allow_smem(reinterpret_cast<const void*>(&attention_backward_dq_mma_kernel<D>), smem_dq, device,
                "attention_backward");
  st.allow_smem(reinterpret_cast<const void*>(&attention_backward_dkdv_mma_kernel<D>), smem_dkdv, device,
                "attention_backward");
  const int64_t blocks = (s.seq + kFaRows - 1) / kFaRows;
  attention_backward_dq_mma_kernel<D><<<tile_grid(blocks, s.heads, s.batch, "attention_backward"),
                                        fa_query_threads<D>(), smem_dq, stream>>>(dqkv, dout, qkv, lse, delta, p,
                                                                                  scale);
  SPPO_CUDA_LAUNCHED(attention_backward_dq_mma_kernel);
  attention_backward_dkdv_mma_kernel<D><<<tile_grid(blocks, s.kv_heads, s.batch, "attention_backward"),
                                          fa_key_threads<D>(), smem_dkdv, stream>>>(dqkv, dout, qkv, lse, delta, p,
                                                                                    scale);
  SPPO_CUDA_LAUNCHED(attention_backward_dkdv_mma_kernel);
}

// The tensor-core head dim for this call, or 0 for the FMA kernels.
int tc_head_dim(const AttnState& st, int64_t D) {
  return st.path != AttnPath::fma && (D == 32 || D == 64 || D == 128) ? int(D) : 0;
}

template <int DMAX>
void launch_decode_chunks(AttnState& st, int device, cudaStream_t stream, float* part_o, float* part_ml,
                          const __nv_bfloat16* qkv, const __nv_bfloat16* k_cache, const __nv_bfloat16* v_cache,
                          const int32_t* slots, const int32_t* positions, int64_t row0, int64_t rows,
                          const DecodeParams& p) {
  // q (G, D), scores (G, kDecodeChunk), the warps' P V partial sums (kDecodeWarps, G, D)
  const size_t smem = sizeof(float) * size_t(p.group) * (p.D + kDecodeChunk + kDecodeWarps * p.D);
  st.allow_smem(reinterpret_cast<const void*>(&attention_decode_chunk_kernel<DMAX>), smem, device,
                "attention_decode");
  const dim3 grid(unsigned(rows), unsigned(p.KV), unsigned(p.n_chunks));
  attention_decode_chunk_kernel<DMAX><<<grid, kDecodeThreads, smem, stream>>>(part_o, part_ml, qkv, k_cache, v_cache,
                                                                              slots, positions, row0, p);
  SPPO_CUDA_LAUNCHED(attention_decode_chunk_kernel);
}

}  // namespace

void CudaOps::attention_forward(bf16* out, float* lse, const bf16* qkv, const AttentionShape& s) {
  check_shape(s, "attention_forward");
  const int dmax = dmax_for(s.head_dim, "attention_forward");
  AttnState& st = attn_state();  // even for an empty call: the first call fixes the kernel choice
  if (s.batch == 0 || s.seq == 0) return;
  const bool mma = st.path == AttnPath::mma;
  switch (tc_head_dim(st, s.head_dim)) {
    case 32:
      return mma ? launch_forward_mma<32>(st, device_, stream_, dev(out), lse, dev(qkv), s)
                 : launch_forward_tc<32>(st, device_, stream_, dev(out), lse, dev(qkv), s);
    case 64:
      return mma ? launch_forward_mma<64>(st, device_, stream_, dev(out), lse, dev(qkv), s)
                 : launch_forward_tc<64>(st, device_, stream_, dev(out), lse, dev(qkv), s);
    case 128:
      return mma ? launch_forward_mma<128>(st, device_, stream_, dev(out), lse, dev(qkv), s)
                 : launch_forward_tc<128>(st, device_, stream_, dev(out), lse, dev(qkv), s);
    default: break;
  }
  switch (dmax) {
    case 32: launch_forward<32>(st, device_, stream_, dev(out), lse, dev(qkv), s); break;
    case 64: launch_forward<64>(st, device_, stream_, dev(out), lse, dev(qkv), s); break;
    default: launch_forward<128>(st, device_, stream_, dev(out), lse, dev(qkv), s); break;
  }
}

void CudaOps::attention_backward(bf16* dqkv, const bf16* dout, const bf16* qkv, const bf16* out, const float* lse,
                                 const AttentionShape& s) {
  check_shape(s, "attention_backward");
  const int dmax = dmax_for(s.head_dim, "attention_backward");
  AttnState& st = attn_state();
  if (s.batch == 0 || s.seq == 0) return;
  const int64_t rows = s.batch * s.seq * s.heads;
  float* delta = st.grow(st.delta, st.delta_elems, size_t(rows), stream_, "the attention backward's row deltas");
  constexpr int kDeltaThreads = 256;  // 8 warps, a (row, head) each
  const int64_t blocks = (rows + kDeltaThreads / 32 - 1) / (kDeltaThreads / 32);
  SPPO_REQUIRE(blocks <= INT_MAX, "attention_backward: too many rows (", rows, ")");
  attention_delta_kernel<<<unsigned(blocks), kDeltaThreads, 0, stream_>>>(
      delta, dev(dout), dev(out), int(s.batch), int(s.seq), int(s.heads), int(s.head_dim), s.out_stride);
  SPPO_CUDA_LAUNCHED(attention_delta_kernel);
  const bool mma = st.path == AttnPath::mma;
  switch (tc_head_dim(st, s.head_dim)) {
    case 32:
      return mma ? launch_backward_mma<32>(st, device_, stream_, dev(dqkv), dev(dout), dev(qkv), lse, delta, s)
                 : launch_backward_tc<32>(st, device_, stream_, dev(dqkv), dev(dout), dev(qkv), lse, delta, s);
    case 64:
      return mma ? launch_backward_mma<64>(st, device_, stream_, dev(dqkv), dev(dout), dev(qkv), lse, delta, s)
                 : launch_backward_tc<64>(st, device_, stream_, dev(dqkv), dev(dout), dev(qkv), lse, delta, s);
    case 128:
      return mma ? launch_backward_mma<128>(st, device_, stream_, dev(dqkv), dev(dout), dev(qkv), lse, delta, s)
                 : launch_backward_tc<128>(st, device_, stream_, dev(dqkv), dev(dout), dev(qkv), lse, delta, s);
    default: break;
  }
  switch (dmax) {
    case 32: launch_backward<32>(st, device_, stream_, dev(dqkv), dev(dout), dev(qkv), lse, delta, s); break;
    case 64: launch_backward<64>(st, device_, stream_, dev(dqkv), dev(dout), dev(qkv), lse, delta, s); break;
    default: launch_backward<128>(st, device_, stream_, dev(dqkv), dev(dout), dev(qkv), lse, delta, s); break;
  }
}

void CudaOps::kv_cache_write(bf16* k_cache, bf16* v_cache, const bf16* qkv, const int32_t* slots,
                             const int32_t* positions, int64_t n, const AttentionShape& s) {
  check_shape(s, "kv_cache_write");
  SPPO_REQUIRE(s.head_dim >= 1 && s.seq < INT_MAX, "kv_cache_write: bad shape (head_dim ", s.head_dim, ", seq ",
               s.seq, ")");
  if (n == 0) return;
  constexpr int kWriteThreads = 256;
  const int64_t total = n * s.kv_heads * s.head_dim;
  SPPO_REQUIRE(total / kWriteThreads < INT_MAX, "kv_cache_write: too many rows (", n, ")");
  kv_cache_write_kernel<<<blocks_for(total, kWriteThreads), kWriteThreads, 0, stream_>>>(
      dev(k_cache), dev(v_cache), dev(qkv), slots, positions, n, int(s.kv_heads), int(s.head_dim), int(s.seq),
      int(s.batch), s.qkv_stride, s.k_off, s.v_off);
  SPPO_CUDA_LAUNCHED(kv_cache_write_kernel);
}

void CudaOps::attention_decode(bf16* out, const bf16* qkv, const bf16* k_cache, const bf16* v_cache,
                               const int32_t* slots, const int32_t* positions, int64_t n, const AttentionShape& s) {
  check_shape(s, "attention_decode");
  const int dmax = dmax_for(s.head_dim, "attention_decode");
  SPPO_REQUIRE(s.seq >= 1, "attention_decode: the cache has no positions (seq ", s.seq, ")");
  if (n == 0) return;
  AttnState& st = attn_state();
  DecodeParams p;
  p.H = int(s.heads), p.KV = int(s.kv_heads), p.D = int(s.head_dim), p.group = int(s.heads / s.kv_heads);
  p.ctx = int(s.seq);
  p.n_chunks = int((s.seq + kDecodeChunk - 1) / kDecodeChunk);
  p.qkv_stride = s.qkv_stride, p.q_off = s.q_off, p.out_stride = s.out_stride;
  p.scale_log2 = float(s.scale * 1.4426950408889634);
  SPPO_REQUIRE(p.n_chunks <= 65535 && p.KV <= 65535, "attention_decode: cache of ", s.seq, " positions and ",
               s.kv_heads, " kv heads is too large");
  // Rows go in batches whose partials fit a bounded buffer; a row's math does not depend on the
  // batching, only on its own length.
  const size_t per_row = size_t(p.H) * p.n_chunks * (p.D + 2);
  constexpr size_t kMaxPartialFloats = size_t(16) << 20;  // 64 MiB
  const int64_t batch_rows =
      std::min<int64_t>({n, std::max<int64_t>(1, int64_t(kMaxPartialFloats / per_row)), int64_t(INT_MAX / p.H)});
  float* part = st.grow(st.partials, st.partial_elems, per_row * size_t(batch_rows), stream_,
                        "the attention decode's partial results");
  float* part_o = part;
  float* part_ml = part + size_t(batch_rows) * p.H * p.n_chunks * p.D;
  for (int64_t row0 = 0; row0 < n; row0 += batch_rows) {
    const int64_t rows = std::min(batch_rows, n - row0);
    switch (dmax) {
      case 32:
        launch_decode_chunks<32>(st, device_, stream_, part_o, part_ml, dev(qkv), dev(k_cache), dev(v_cache), slots,
                                 positions, row0, rows, p);
        break;
      case 64:
        launch_decode_chunks<64>(st, device_, stream_, part_o, part_ml, dev(qkv), dev(k_cache), dev(v_cache), slots,
                                 positions, row0, rows, p);
        break;
      default:
        launch_decode_chunks<128>(st, device_, stream_, part_o, part_ml, dev(qkv), dev(k_cache), dev(v_cache), slots,
                                  positions, row0, rows, p);
        break;
    }
    attention_decode_merge_kernel<<<unsigned(rows * p.H), kDecodeThreads, 0, stream_>>>(dev(out), part_o, part_ml,
                                                                                        positions, row0, p);
    SPPO_CUDA_LAUNCHED(attention_decode_merge_kernel);
  }
}

}  // namespace sppo::cuda
