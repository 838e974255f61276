// The register-resident mma.sync attention kernels (attention.cuh, cuda_mma.cuh), head_dim 32,
// 64 and 128, with SPPO_CUDA_ATTENTION=mma. Kernels, then their table (AttnKernels).
#include "cuda/attention/attention.cuh"
#include "cuda/cuda_mma.cuh"

namespace sppo::cuda::attn {

namespace {

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
constexpr int kFaCols = 64;   // rows per tile of the other side
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
    copy_tile_elements<D, ROWS, LDS, THREADS>(dst, src, ld, valid);
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
__device__ __forceinline__ void fa_write_rows(const float (&acc)[D / 8][4], __nv_bfloat16* __restrict__ dst, int64_t ld,
                                              int row0, int T, float mul) {
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
  __nv_bfloat16* Ks = Qs + kFaRows * LDS;                         // 2 x (64, LDS)
  __nv_bfloat16* Vs = Ks + 2 * kFaCols * LDS;                     // 2 x (64, LDS)

  const auto [qb, b, h, kvh] = query_block(p, (p.T + kFaRows - 1) / kFaRows);
  const int q0 = qb * kFaRows;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  const int wq = q0 + WR * warp;  // the warp's first query
  const int n_kt = min(p.T - 1, q0 + kFaRows - 1) / kFaCols + 1;
  const __nv_bfloat16* base = qkv + int64_t(b) * p.T * p.qkv_stride;
  const __nv_bfloat16* kv_base = base + int64_t(kvh) * p.D;

  fa_load_tile<D, kFaRows, THREADS>(Qs, base + int64_t(q0) * p.qkv_stride + p.q_off + int64_t(h) * p.D, p.qkv_stride,
                                    min(kFaRows, p.T - q0), p.vec);
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
      fa_load_tile<D, kFaCols, THREADS>(Ks + buf * kFaCols * LDS, rows + p.k_off, p.qkv_stride, min(kFaCols, p.T - k1),
                                        p.vec);
      fa_load_tile<D, kFaCols, THREADS>(Vs + buf * kFaCols * LDS, rows + p.v_off, p.qkv_stride, min(kFaCols, p.T - k1),
                                        p.vec);
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
__global__ void __launch_bounds__(fa_query_threads<D>(), 1)
    attention_backward_dq_mma_kernel(__nv_bfloat16* __restrict__ dqkv, const __nv_bfloat16* __restrict__ dout,
                                     const __nv_bfloat16* __restrict__ qkv, const float* __restrict__ lse,
                                     const float* __restrict__ delta, AttnParams p, float scale) {
  constexpr int LDS = fa_ld<D>(), KD = D / 16, ND = D / 8;
  constexpr int MT = fa_query_row_tiles<D>(), WR = 16 * MT, THREADS = fa_query_threads<D>();
  extern __shared__ __align__(128) unsigned char fa_smem[];
  __nv_bfloat16* Qs = reinterpret_cast<__nv_bfloat16*>(fa_smem);  // (128, LDS)
  __nv_bfloat16* dOs = Qs + kFaRows * LDS;                        // (128, LDS)
  __nv_bfloat16* Ks = dOs + kFaRows * LDS;                        // 2 x (64, LDS)
  __nv_bfloat16* Vs = Ks + 2 * kFaCols * LDS;                     // 2 x (64, LDS)

  const auto [qb, b, h, kvh] = query_block(p, (p.T + kFaRows - 1) / kFaRows);
  const int q0 = qb * kFaRows, q_valid = min(kFaRows, p.T - q0);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  const int wq = q0 + WR * warp;
  const int n_kt = min(p.T - 1, q0 + kFaRows - 1) / kFaCols + 1;
  const __nv_bfloat16* base = qkv + int64_t(b) * p.T * p.qkv_stride;
  const __nv_bfloat16* kv_base = base + int64_t(kvh) * p.D;

  fa_load_tile<D, kFaRows, THREADS>(Qs, base + int64_t(q0) * p.qkv_stride + p.q_off + int64_t(h) * p.D, p.qkv_stride,
                                    q_valid, p.vec);
  fa_load_tile<D, kFaRows, THREADS>(dOs, dout + (int64_t(b) * p.T + q0) * p.out_stride + int64_t(h) * p.D, p.out_stride,
                                    q_valid, p.vec);
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
      fa_load_tile<D, kFaCols, THREADS>(Ks + buf * kFaCols * LDS, rows + p.k_off, p.qkv_stride, min(kFaCols, p.T - k1),
                                        p.vec);
      fa_load_tile<D, kFaCols, THREADS>(Vs + buf * kFaCols * LDS, rows + p.v_off, p.qkv_stride, min(kFaCols, p.T - k1),
                                        p.vec);
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
            const float pr =
                (masked && key > wq + 16 * i + g + 8 * r) ? 0.f : exp2_approx(s[i][n][e] * p.scale_log2 - lse2[i][r]);
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
                                             const __nv_bfloat16* Kw, const __nv_bfloat16* Vw, const __nv_bfloat16* Qb,
                                             const __nv_bfloat16* dOb, const float* lse2_s, const float* delta_s,
                                             int q0, int wk, int T, float scale_log2) {
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
__global__ void __launch_bounds__(fa_key_threads<D>(), 1)
    attention_backward_dkdv_mma_kernel(__nv_bfloat16* __restrict__ dqkv, const __nv_bfloat16* __restrict__ dout,
                                       const __nv_bfloat16* __restrict__ qkv, const float* __restrict__ lse,
                                       const float* __restrict__ delta, AttnParams p, float scale) {
  constexpr int LDS = fa_ld<D>(), KD = D / 16, ND = D / 8;
  constexpr int MT = fa_key_row_tiles<D>(), WR = 16 * MT, THREADS = fa_key_threads<D>();
  extern __shared__ __align__(128) unsigned char fa_smem[];
  __nv_bfloat16* Ks = reinterpret_cast<__nv_bfloat16*>(fa_smem);     // (128, LDS)
  __nv_bfloat16* Vs = Ks + kFaRows * LDS;                            // (128, LDS)
  __nv_bfloat16* Qs = Vs + kFaRows * LDS;                            // 2 x (64, LDS)
  __nv_bfloat16* dOs = Qs + 2 * kFaCols * LDS;                       // 2 x (64, LDS)
  float* stats = reinterpret_cast<float*>(dOs + 2 * kFaCols * LDS);  // 2 x (lse2 (64), delta (64))

  const KeyBlock blk = key_block(p);  // a lambda below captures b and kvh
  const int kb = blk.kb, b = blk.b, kvh = blk.kvh;
  const int k0 = kb * kFaRows;
  const int warp = threadIdx.x / 32;
  const int wk = k0 + WR * warp;                                             // the warp's first key
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
                                      dout + (int64_t(b) * p.T + q1) * p.out_stride + int64_t(h) * p.D, p.out_stride,
                                      valid, p.vec);
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

}  // namespace

AttnKernels mma_kernels(int head_dim) {
  return with_head_dim(head_dim, [](auto d) -> AttnKernels {
    constexpr int D = decltype(d)::value;
    return {{attention_forward_mma_kernel<D>, fa_forward_smem<D>(), fa_query_threads<D>()},
            {attention_backward_dq_mma_kernel<D>, fa_backward_dq_smem<D>(), fa_query_threads<D>()},
            {attention_backward_dkdv_mma_kernel<D>, fa_backward_dkdv_smem<D>(), fa_key_threads<D>()},
            kFaRows,
            true};
  });
}

}  // namespace sppo::cuda::attn
