// CPU kernels for decoding with a paged KV cache: writing new rows' keys and values into their
// blocks, and the attention of new rows against the blocks of their own table row. One task per (row, kv
// head), so a row's result never depends on which other rows share the call — what makes
// batched sampling reproducible whatever the batch holds.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/error.h"
#include "core/threadpool.h"
#include "cpu/cpu_ops.h"
#include "cpu/gemm.h"
#include "cpu/vecmath.h"

namespace sppo::cpu {

namespace {
// Below this much attention work in one call, fanning out to the pool costs more than it saves.
constexpr double kMinParallelAttentionFlops = 2e6;

// One kv head's keys (or values) of one table row: block j of the row holds positions
// j*bs .. j*bs + bs - 1, each a contiguous row of D numbers.
template <class T>
struct HeadBlocks {
  const T* pool;
  const int32_t* table;  // the row's block ids
  int64_t block_elems;   // KV * bs * D
  int64_t head_off;      // kvh * bs * D
  int64_t bs;
  const T* block(int64_t j) const { return pool + table[j] * block_elems + head_off; }
};

// out(group, D) = P(group, len) · V(len, D), one cached position at a time: a position's values
// are D contiguous numbers, so the inner loop is a vector AXPY (a gemm would first repack V).
// Each output element sums over positions in order, so the result is deterministic.
template <class T>
void weighted_values_scalar(const T* P, int64_t group, int64_t len, const HeadBlocks<T>& V, int64_t D, T* out) {
  for (int64_t g = 0; g < group; ++g) {
    T* o = out + g * D;
    std::fill(o, o + D, T(0));
    for (int64_t j0 = 0; j0 < len; j0 += V.bs) {
      const T* v = V.block(j0 / V.bs);
      const int64_t cnt = std::min(V.bs, len - j0);
      for (int64_t t = 0; t < cnt; ++t)
        for (int64_t d = 0; d < D; ++d) o[d] += P[g * len + j0 + t] * v[t * D + d];
    }
  }
}

// The same with 64 output columns at a time in four AVX-512 accumulators per query head, up to
// four heads of the group at once so each value row is loaded once for them all. Every output
// element is still one FMA chain over the positions in order: the scalar loop's result bits.
template <int G>
__attribute__((target("avx512f"))) void weighted_values_heads(const float* P, int64_t len, const HeadBlocks<float>& V,
                                                              int64_t D, float* out) {
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    __mmask16 m[4];
    for (int c = 0; c < 4; ++c) {
      const int64_t left = std::clamp<int64_t>(D - d0 - 16 * c, 0, 16);
      m[c] = static_cast<__mmask16>((1u << left) - 1);
    }
    __m512 acc[G][4];
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < 4; ++c) acc[g][c] = _mm512_setzero_ps();
    for (int64_t j0 = 0; j0 < len; j0 += V.bs) {
      const float* vb = V.block(j0 / V.bs) + d0;
      const int64_t cnt = std::min(V.bs, len - j0);
      for (int64_t t = 0; t < cnt; ++t) {
        const float* v = vb + t * D;
        __m512 vv[4];
        for (int c = 0; c < 4; ++c) vv[c] = _mm512_maskz_loadu_ps(m[c], v + 16 * c);
        for (int g = 0; g < G; ++g) {
          const __m512 w = _mm512_set1_ps(P[g * len + j0 + t]);
          for (int c = 0; c < 4; ++c) acc[g][c] = _mm512_fmadd_ps(w, vv[c], acc[g][c]);
        }
      }
    }
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < 4; ++c) _mm512_mask_storeu_ps(out + g * D + d0 + 16 * c, m[c], acc[g][c]);
  }
}

void weighted_values_avx512(const float* P, int64_t group, int64_t len, const HeadBlocks<float>& V, int64_t D,
                            float* out) {
  for (int64_t g = 0; g < group;) {
    const int64_t n = std::min<int64_t>(4, group - g);
    const float* p = P + g * len;
    float* o = out + g * D;
    if (n == 4) weighted_values_heads<4>(p, len, V, D, o);
    if (n == 3) weighted_values_heads<3>(p, len, V, D, o);
    if (n == 2) weighted_values_heads<2>(p, len, V, D, o);
    if (n == 1) weighted_values_heads<1>(p, len, V, D, o);
    g += n;
  }
}

const bool kHasAvx512 = __builtin_cpu_supports("avx512f");

void weighted_values(const float* P, int64_t group, int64_t len, const HeadBlocks<float>& V, int64_t D, float* out) {
  kHasAvx512 ? weighted_values_avx512(P, group, len, V, D, out) : weighted_values_scalar(P, group, len, V, D, out);
}
void weighted_values(const double* P, int64_t group, int64_t len, const HeadBlocks<double>& V, int64_t D, double* out) {
  weighted_values_scalar(P, group, len, V, D, out);
}

// The rows' table rows, positions and blocks must lie inside the cache: a bad one would read or
// write outside the pool. Checked on the calling thread before any work (n is a step's rows).
void check_rows(const int32_t* slots, const int32_t* positions, int64_t n, const AttentionShape& s, const KvBlocks& kv,
                const char* op) {
  SPPO_REQUIRE(kv.block_size >= 1 && kv.max_blocks * kv.block_size >= s.seq, op, ": block tables of ", kv.max_blocks,
               " blocks of ", kv.block_size, " positions cannot address ", s.seq, " positions");
  for (int64_t i = 0; i < n; ++i) {
    SPPO_REQUIRE(slots[i] >= 0 && slots[i] < s.batch && positions[i] >= 0 && positions[i] < s.seq, op, ": row ", i,
                 " (table row ", slots[i], ", position ", positions[i], ") is outside the cache (", s.batch, " x ",
                 s.seq, ")");
    for (int64_t j = 0; j <= positions[i] / kv.block_size; ++j) {
      const int32_t b = kv.tables[int64_t(slots[i]) * kv.max_blocks + j];
      SPPO_REQUIRE(b >= 0 && b < kv.blocks, op, ": row ", i, " (table row ", slots[i], ") points block ", j, " at ", b,
                   ", outside the pool of ", kv.blocks, " blocks");
    }
  }
}
}  // namespace

template <class T>
void CpuOps<T>::kv_cache_write(T* k_cache, T* v_cache, const T* qkv, const int32_t* slots, const int32_t* positions,
                               int64_t n, const AttentionShape& s, const KvBlocks& kv) {
  check_rows(slots, positions, n, s, kv, "kv_cache_write");
  const int64_t KV = s.kv_heads, D = s.head_dim, bs = kv.block_size;
  cpu_pool().parallel_for(n, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const T* row = qkv + i * s.qkv_stride;
      const int64_t block = kv.tables[int64_t(slots[i]) * kv.max_blocks + positions[i] / bs];
      for (int64_t h = 0; h < KV; ++h) {
        const int64_t at = ((block * KV + h) * bs + positions[i] % bs) * D;  // (blocks, KV, bs, D)
        std::memcpy(k_cache + at, row + s.k_off + h * D, D * sizeof(T));
        std::memcpy(v_cache + at, row + s.v_off + h * D, D * sizeof(T));
      }
    }
  });
}

template <class T>
void CpuOps<T>::attention_decode(T* out, const T* qkv, const T* k_cache, const T* v_cache, const int32_t* slots,
                                 const int32_t* positions, int64_t n, const AttentionShape& s, const KvBlocks& kv) {
  check_rows(slots, positions, n, s, kv, "attention_decode");
  // The query heads of one kv group are adjacent columns of the row, so the group's scores are
  // small gemms (group x block) against the row's key blocks, then one weighted sum of the values.
  const int64_t KV = s.kv_heads, D = s.head_dim, ctx = s.seq, group = s.heads / s.kv_heads, bs = kv.block_size;
  // A task's scores (group x len) use the attention tile scratch (2*kAttnBlock x ctx).
  SPPO_REQUIRE(group <= 2 * kAttnBlock, "attention_decode: ", group, " query heads per kv head exceed the scratch (",
               2 * kAttnBlock, ")");
  ensure_scratch(ctx);
  auto one = [&](int64_t task, int thread) {
    const int64_t i = task / KV, kvh = task % KV;
    const int64_t len = int64_t(positions[i]) + 1;  // causal: cached positions 0..positions[i]
    const int32_t* table = kv.tables + int64_t(slots[i]) * kv.max_blocks;
    const HeadBlocks<T> K{k_cache, table, KV * bs * D, kvh * bs * D, bs};
    const HeadBlocks<T> V{v_cache, table, KV * bs * D, kvh * bs * D, bs};
    const T* Q = qkv + i * s.qkv_stride + s.q_off + kvh * group * D;  // (group, D), rows D apart
    T* S = thread_scratch(thread);                                    // (group, len)
    for (int64_t j0 = 0; j0 < len; j0 += bs)                          // block j's keys: (min(bs, len - j0), D)
      cpu::gemm(false, true, group, std::min(bs, len - j0), D, T(s.scale), Q, D, K.block(j0 / bs), D, T(0), S + j0,
                len);
    for (int64_t g = 0; g < group; ++g) {
      T* row = S + g * len;
      const T mx = *std::max_element(row, row + len);
      const T inv = T(1.0 / exp_shifted_sum(row, row, len, mx));
      for (int64_t j = 0; j < len; ++j) row[j] *= inv;
    }
    weighted_values(S, group, len, V, D, out + i * s.out_stride + kvh * group * D);  // (group, D)
  };
  // Waking the pool's workers costs more than a short decode row's attention (on a VM, a
  // sleeping vCPU takes hundreds of microseconds to wake), so small calls run on this thread.
  double flops = 0;
  for (int64_t i = 0; i < n; ++i) flops += 4.0 * s.heads * D * (double(positions[i]) + 1);
  if (flops < kMinParallelAttentionFlops) {
    cpu_pool().run(1, [&](int64_t, int thread) {
      for (int64_t task = 0; task < n * KV; ++task) one(task, thread);
    });
  } else {
    cpu_pool().run(n * KV, one);
  }
}

template void CpuOps<float>::kv_cache_write(float*, float*, const float*, const int32_t*, const int32_t*, int64_t,
                                            const AttentionShape&, const KvBlocks&);
template void CpuOps<double>::kv_cache_write(double*, double*, const double*, const int32_t*, const int32_t*, int64_t,
                                             const AttentionShape&, const KvBlocks&);
template void CpuOps<float>::attention_decode(float*, const float*, const float*, const float*, const int32_t*,
                                              const int32_t*, int64_t, const AttentionShape&, const KvBlocks&);
template void CpuOps<double>::attention_decode(double*, const double*, const double*, const double*, const int32_t*,
                                               const int32_t*, int64_t, const AttentionShape&, const KvBlocks&);

}  // namespace sppo::cpu
