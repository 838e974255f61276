// The WMMA tensor-core attention kernels (attention.cuh), head_dim 32, 64 and 128: the default.
// Kernels, then their table (AttnKernels).
#include <mma.h>

#include "cuda/attention/attention.cuh"

namespace sppo::cuda::attn {

namespace {

namespace wmma = nvcuda::wmma;

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
constexpr size_t kStatBytes = sizeof(float) * 2 * kTile;      // lse (base 2) and delta per row
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
using FragBt =
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major>;  // a row-major tile, transposed
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
    copy_tile_elements<D, kTile, LDB, kTcThreads>(dst, src, ld, valid);
  }
}

// The columns lane pair (2r, 2r+1) splits in a row of `width` columns: the lane with `half` h
// takes the 4-column groups 16h + 32a + 4g (a < width/32, g < 4). With row strides of 4 mod 32
// floats, the 8 lanes of a 128-bit access phase then hit 8 distinct 4-bank groups.
__device__ __forceinline__ int pair_col(int half, int a, int g) { return 16 * half + 32 * a + 4 * g; }

// Writes this lane's columns (pair_col) of an fp32 row of D columns at src, times mul, as bf16
// to the row at dst.
template <int D>
__device__ __forceinline__ void write_pair_cols(__nv_bfloat16* __restrict__ dst, const float* src, int half,
                                                float mul) {
#pragma unroll
  for (int a = 0; a < D / 32; ++a)
#pragma unroll
    for (int g = 0; g < 4; ++g) {
      const int c = pair_col(half, a, g);
      const float4 v = *reinterpret_cast<const float4*>(src + c);
      dst[c] = to_bf(v.x * mul), dst[c + 1] = to_bf(v.y * mul), dst[c + 2] = to_bf(v.z * mul),
      dst[c + 3] = to_bf(v.w * mul);
    }
}

// Forward. Block: 64 queries of one (batch, head), grid n_tiles * B * H, heaviest first. Per key
// tile up to the diagonal, warp w: S = Q Kᵀ for its 16 rows (to shared memory), online softmax
// by lane pairs (P to shared memory as bf16, its O rows rescaled in place), then O += P V with O
// loaded from and stored back to shared memory.
template <int D>
__global__ void __launch_bounds__(kTcThreads, 1)
    attention_forward_tc_kernel(__nv_bfloat16* __restrict__ out, float* __restrict__ lse,
                                const __nv_bfloat16* __restrict__ qkv, AttnParams p) {
  constexpr int LDB = tc_ld<D>(), LDO = acc_ld<D>(), KD = D / 16;
  extern __shared__ __align__(128) unsigned char tc_smem[];
  __nv_bfloat16* Qs = reinterpret_cast<__nv_bfloat16*>(tc_smem);  // (kTile, LDB)
  __nv_bfloat16* Ks = Qs + kTile * LDB;                           // (kTile, LDB)
  __nv_bfloat16* Vs = Ks + kTile * LDB;                           // (kTile, LDB)
  __nv_bfloat16* Ps = Vs + kTile * LDB;                           // (kTile, kPLd)
  float* Ss = reinterpret_cast<float*>(Ps + kTile * kPLd);        // (kTile, kSLd)
  float* Os = Ss + kTile * kSLd;                                  // (kTile, LDO)

  const auto [qt, b, h, kvh] = query_block(p, p.n_tiles);
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
  write_pair_cols<D>(orow, Os + r * LDO, half, inv);
  if (half == 0) lse[(int64_t(b) * p.H + h) * p.T + q] = (m + log2f(l)) * kLn2;
}

// Writes a warp's 16 output rows held in fragments (through its scratch) as bf16 times `mul`:
// rows (k0 + wr + i) of `dst` (row stride ld), those before `T` only.
template <int D>
__device__ __forceinline__ void write_rows_tc(float* __restrict__ Ow, const FragAcc (&acc)[D / 16],
                                              __nv_bfloat16* __restrict__ dst, int64_t ld, int row0, int T, float mul) {
  constexpr int LDO = acc_ld<D>();
  const int lane = threadIdx.x % 32, rw = lane / 2, half = lane % 2;
  __syncwarp();  // the lanes' earlier reads of Ow are done
#pragma unroll
  for (int c = 0; c < D / 16; ++c) wmma::store_matrix_sync(Ow + 16 * c, acc[c], LDO, wmma::mem_row_major);
  __syncwarp();
  if (row0 + rw >= T) return;
  __nv_bfloat16* row = dst + int64_t(row0 + rw) * ld;
  write_pair_cols<D>(row, Ow + rw * LDO, half, mul);
}

// dQ. Block: 64 queries of one (batch, head), grid n_tiles * B * H, heaviest first. Per key tile
// up to the diagonal, warp w: S = Q Kᵀ and dP = dO Vᵀ for its rows (to its scratch), then lane
// pairs form dS = P ∘ (dP - delta) with P = exp2(S scale log2(e) - lse2) (bf16, to shared
// memory), and dQ += dS K in fragments (no rescaling here, so dQ stays in registers). dQ *= scale
// on the way out.
template <int D>
__global__ void __launch_bounds__(kTcThreads, 1)
    attention_backward_dq_tc_kernel(__nv_bfloat16* __restrict__ dqkv, const __nv_bfloat16* __restrict__ dout,
                                    const __nv_bfloat16* __restrict__ qkv, const float* __restrict__ lse,
                                    const float* __restrict__ delta, AttnParams p, float scale) {
  constexpr int LDB = tc_ld<D>(), KD = D / 16;
  extern __shared__ __align__(128) unsigned char tc_smem[];
  __nv_bfloat16* Qs = reinterpret_cast<__nv_bfloat16*>(tc_smem);  // (kTile, LDB)
  __nv_bfloat16* dOs = Qs + kTile * LDB;                          // (kTile, LDB)
  __nv_bfloat16* Ks = dOs + kTile * LDB;                          // (kTile, LDB)
  __nv_bfloat16* Vs = Ks + kTile * LDB;                           // (kTile, LDB)
  __nv_bfloat16* dSs = Vs + kTile * LDB;                          // (kTile, kPLd)
  float* scratch = reinterpret_cast<float*>(dSs + kTile * kPLd);  // per warp: S, dP (16, kSLd) each
  float* lse2_s = scratch + 2 * kTile * kSLd;
  float* delta_s = lse2_s + kTile;

  const auto [qt, b, h, kvh] = query_block(p, p.n_tiles);
  const int q0 = qt * kTile, q_valid = min(kTile, p.T - q0);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, wr = 16 * warp;
  const int rw = lane / 2, r = wr + rw, half = lane % 2, q = q0 + r;  // row within the warp / tile
  float* Sw = scratch + warp * 2 * 16 * kSLd;                         // (16, kSLd)
  float* dPw = Sw + 16 * kSLd;                                        // (16, kSLd)
  const __nv_bfloat16* base = qkv + int64_t(b) * p.T * p.qkv_stride;

  stage_tile_bf16<D>(Qs, base + int64_t(q0) * p.qkv_stride + p.q_off + int64_t(h) * p.D, p.qkv_stride, q_valid, p.vec);
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

  write_rows_tc<D>(Sw, dq, dqkv + int64_t(b) * p.T * p.qkv_stride + p.q_off + int64_t(h) * p.D, p.qkv_stride, q0 + wr,
                   p.T, scale);
}

// dK, dV. Block: 64 keys of one (batch, kv head), grid n_tiles * B * KV. Warp w owns keys 16w ..
// 16w+15. The block walks the group's query heads in order and, for each, the query tiles from
// the diagonal on: Sᵀ = K Qᵀ and dPᵀ = V dOᵀ per warp, lane pairs form Pᵀ and dSᵀ (bf16), then
// dV += Pᵀ dO and dK += dSᵀ Q in fragments; dK *= scale on the way out.
template <int D>
__global__ void __launch_bounds__(kTcThreads, 1)
    attention_backward_dkdv_tc_kernel(__nv_bfloat16* __restrict__ dqkv, const __nv_bfloat16* __restrict__ dout,
                                      const __nv_bfloat16* __restrict__ qkv, const float* __restrict__ lse,
                                      const float* __restrict__ delta, AttnParams p, float scale) {
  constexpr int LDB = tc_ld<D>(), KD = D / 16;
  extern __shared__ __align__(128) unsigned char tc_smem[];
  __nv_bfloat16* Ks = reinterpret_cast<__nv_bfloat16*>(tc_smem);  // (kTile, LDB)
  __nv_bfloat16* Vs = Ks + kTile * LDB;                           // (kTile, LDB)
  __nv_bfloat16* Qs = Vs + kTile * LDB;                           // (kTile, LDB)
  __nv_bfloat16* dOs = Qs + kTile * LDB;                          // (kTile, LDB)
  __nv_bfloat16* Pt = dOs + kTile * LDB;                          // (kTile keys, kPLd)
  __nv_bfloat16* dSt = Pt + kTile * kPLd;                         // (kTile keys, kPLd)
  float* scratch = reinterpret_cast<float*>(dSt + kTile * kPLd);  // per warp: Sᵀ, dPᵀ (16, kSLd) each
  float* lse2_s = scratch + 2 * kTile * kSLd;
  float* delta_s = lse2_s + kTile;

  const auto [kt, b, kvh] = key_block(p);
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
      stage_tile_bf16<D>(Qs, base + int64_t(q0) * p.qkv_stride + p.q_off + int64_t(h) * p.D, p.qkv_stride, q_valid,
                         p.vec);
      stage_tile_bf16<D>(dOs, dout + (int64_t(b) * p.T + q0) * p.out_stride + int64_t(h) * p.D, p.out_stride, q_valid,
                         p.vec);
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

}  // namespace

AttnKernels wmma_kernels(int head_dim) {
  return with_head_dim(head_dim, [](auto d) -> AttnKernels {
    constexpr int D = decltype(d)::value;
    return {{attention_forward_tc_kernel<D>, tc_forward_smem<D>(), kTcThreads},
            {attention_backward_dq_tc_kernel<D>, tc_backward_dq_smem<D>(), kTcThreads},
            {attention_backward_dkdv_tc_kernel<D>, tc_backward_dkdv_smem<D>(), kTcThreads},
            kTile,
            true};
  });
}

}  // namespace sppo::cuda::attn
