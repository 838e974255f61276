// The fp32 FMA attention kernels (attention.cuh): tiles staged as fp32 in shared memory, every
// head_dim (padded to 32, 64 or 128), the tensor cores' reference. Kernels, then their table
// (AttnKernels).
#include "cuda/attention/attention.cuh"

namespace sppo::cuda::attn {

namespace {

// In the FMA kernels a block's 256 threads are a 16 x 16 grid: thread (ty, tx) owns rows
// ty*4 .. ty*4+3 of the block's tile and columns tx, tx+16, tx+32, ... of the other (key columns
// of a score tile, or head-dim columns of an accumulator).
constexpr int kRowsPerThread = 4;    // kTile / 16
constexpr int kPStride = kTile + 4;  // score tiles: the two row groups of a warp hit disjoint banks

// Head-dim tiles: fp32 rows of DMAX + 1 floats (an odd stride), so both access patterns are free
// of bank conflicts: 16 threads reading column d of 16 different rows, and threads reading
// consecutive columns of one row.
template <int DMAX>
constexpr int row_stride() {
  return DMAX + 1;
}

// Stages rows [0, valid) of a (rows, D) block at `src` (row stride ld) into the fp32 tile dst
// (kTile, DMAX+1); rows >= valid and columns >= D become zeros, so padded lanes add nothing
// (and never NaN: a masked probability times stale shared memory could be 0 * NaN).
template <int DMAX>
__device__ __forceinline__ void stage_tile(float* __restrict__ dst, const __nv_bfloat16* __restrict__ src, int64_t ld,
                                           int valid, int D) {
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
                                                   const float* __restrict__ B, const float* __restrict__ B2, int tx,
                                                   int ty, float (&s)[kRowsPerThread][4],
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
__global__ void __launch_bounds__(kThreads, 1)
    attention_forward_kernel(__nv_bfloat16* __restrict__ out, float* __restrict__ lse,
                             const __nv_bfloat16* __restrict__ qkv, AttnParams p) {
  constexpr int LD = row_stride<DMAX>(), CPT = DMAX / 16;
  extern __shared__ float smem[];
  float* Qs = smem;             // (kTile, LD)
  float* Ks = Qs + kTile * LD;  // (kTile, LD)
  float* Vs = Ks + kTile * LD;  // (kTile, LD)
  float* Ps = Vs + kTile * LD;  // (kTile, kPStride)

  const auto [qt, b, h, kvh] = query_block(p, p.n_tiles);
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
      const float m_new = fmaxf(m[i], lanes_max<16>(mt));
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
    const float total = lanes_sum<16>(l[i]);  // every lane takes part in the shuffle, valid row or not
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
// dQ: block per (query tile, head, batch), grid n_tiles * B * H (heaviest first). For each key
// tile up to the diagonal it recomputes P = exp(S - lse) and dP = dO Vᵀ, forms
// dS = P ∘ (dP - delta) in shared memory and accumulates dQ += dS K; dQ *= scale at the end.
template <int DMAX>
__global__ void __launch_bounds__(kThreads, 1)
    attention_backward_dq_kernel(__nv_bfloat16* __restrict__ dqkv, const __nv_bfloat16* __restrict__ dout,
                                 const __nv_bfloat16* __restrict__ qkv, const float* __restrict__ lse,
                                 const float* __restrict__ delta, AttnParams p, float scale) {
  constexpr int LD = row_stride<DMAX>(), CPT = DMAX / 16;
  extern __shared__ float smem[];
  float* Qs = smem;              // (kTile, LD)
  float* dOs = Qs + kTile * LD;  // (kTile, LD)
  float* Ks = dOs + kTile * LD;  // (kTile, LD)
  float* Vs = Ks + kTile * LD;   // (kTile, LD)
  float* dSs = Vs + kTile * LD;  // (kTile, kPStride)
  float* lse2_s = dSs + kTile * kPStride;
  float* delta_s = lse2_s + kTile;

  const auto [qt, b, h, kvh] = query_block(p, p.n_tiles);
  const int q0 = qt * kTile, q_valid = min(kTile, p.T - q0);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const __nv_bfloat16* base = qkv + int64_t(b) * p.T * p.qkv_stride;

  stage_tile<DMAX>(Qs, base + int64_t(q0) * p.qkv_stride + p.q_off + int64_t(h) * p.D, p.qkv_stride, q_valid, p.D);
  stage_tile<DMAX>(dOs, dout + (int64_t(b) * p.T + q0) * p.out_stride + int64_t(h) * p.D, p.out_stride, q_valid, p.D);
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
__global__ void __launch_bounds__(kThreads, 1)
    attention_backward_dkdv_kernel(__nv_bfloat16* __restrict__ dqkv, const __nv_bfloat16* __restrict__ dout,
                                   const __nv_bfloat16* __restrict__ qkv, const float* __restrict__ lse,
                                   const float* __restrict__ delta, AttnParams p, float scale) {
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

  const auto [kt, b, kvh] = key_block(p);
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
      stage_tile<DMAX>(Qs, base + int64_t(q0) * p.qkv_stride + p.q_off + int64_t(h) * p.D, p.qkv_stride, q_valid, p.D);
      stage_tile<DMAX>(dOs, dout + (int64_t(b) * p.T + q0) * p.out_stride + int64_t(h) * p.D, p.out_stride, q_valid,
                       p.D);
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

}  // namespace

AttnKernels fma_kernels(int dmax) {
  return with_head_dim(dmax, [](auto d) -> AttnKernels {
    constexpr int DMAX = decltype(d)::value;
    return {{attention_forward_kernel<DMAX>, forward_smem<DMAX>(), kThreads},
            {attention_backward_dq_kernel<DMAX>, backward_dq_smem<DMAX>(), kThreads},
            {attention_backward_dkdv_kernel<DMAX>, backward_dkdv_smem<DMAX>(), kThreads},
            kTile,
            false};
  });
}

}  // namespace sppo::cuda::attn
