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

// Asks for a block's n numbers (one kv head's keys or values of one block, bs * D contiguous) to
// be brought into the cache: a row's blocks lie apart in the pool, each a new stream that the
// hardware prefetcher picks up only after its first misses.
template <class T>
void prefetch_block(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t b = 0; b < n * int64_t(sizeof(T)); b += 64) _mm_prefetch(c + b, _MM_HINT_T0);
}

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
      if (d0 == 0 && j0 + V.bs < len) prefetch_block(V.block(j0 / V.bs + 1), V.bs * D);
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
  // Rows whose tables start with the same block (the K samples of one prompt) form a unit: their
  // scores against a block they share come from one gemm of all their query heads, which loads and
  // transposes the block's keys once instead of once per row. A gemm row never depends on the
  // call's other rows (cpu/gemm.cpp), so every row gets the bits it would get alone: a batch's
  // composition, and sharing on or off, change nothing. A unit's scores (rows x group x ctx) must
  // fit the task's scratch (2 kAttnBlock x ctx).
  const int64_t unit_cap = std::max<int64_t>(1, 2 * kAttnBlock / group);
  auto first_block = [&](int64_t i) { return kv.tables[int64_t(slots[i]) * kv.max_blocks]; };
  std::vector<int32_t> order(static_cast<size_t>(n), 0);
  for (int64_t i = 0; i < n; ++i) order[i] = int32_t(i);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return first_block(a) < first_block(b); });
  std::vector<int64_t> unit_start;
  for (int64_t k = 0; k < n; ++k)
    if (k == 0 || first_block(order[k]) != first_block(order[k - 1]) || k - unit_start.back() == unit_cap)
      unit_start.push_back(k);
  const int64_t units = int64_t(unit_start.size());
  unit_start.push_back(n);
  auto one = [&](int64_t task, int thread) {
    const int64_t u = task / KV, kvh = task % KV;
    const int32_t* rows = order.data() + unit_start[u];
    const int64_t m = unit_start[u + 1] - unit_start[u];
    auto len_of = [&](int64_t k) { return int64_t(positions[rows[k]]) + 1; };  // causal: positions 0..p
    auto table_of = [&](int64_t k) { return kv.tables + int64_t(slots[rows[k]]) * kv.max_blocks; };
    auto q_of = [&](int64_t k) { return qkv + rows[k] * s.qkv_stride + s.q_off + kvh * group * D; };  // (group, D)
    T* S = thread_scratch(thread);  // row k's scores at S + k * group * ctx: (group, len)
    thread_local std::vector<T> q_rows, s_rows;
    thread_local std::vector<int64_t> with;
    thread_local std::vector<char> done;
    int64_t max_len = 0;
    for (int64_t k = 0; k < m; ++k) max_len = std::max(max_len, len_of(k));
    // Each row's first value block, wanted once its scores are done (weighted_values fetches the
    // later ones a block ahead).
    for (int64_t k = 0; k < m; ++k)
      prefetch_block(v_cache + int64_t(table_of(k)[0]) * KV * bs * D + kvh * bs * D, bs * D);
    for (int64_t j0 = 0; j0 < max_len; j0 += bs) {
      done.assign(static_cast<size_t>(m), 0);
      for (int64_t k = 0; k < m; ++k) {
        if (done[k] || len_of(k) <= j0) continue;
        const int32_t block = table_of(k)[j0 / bs];
        const int64_t cnt = std::min(bs, len_of(k) - j0);
        with.assign(1, k);
        for (int64_t k2 = k + 1; k2 < m; ++k2)
          if (!done[k2] && len_of(k2) > j0 && table_of(k2)[j0 / bs] == block && std::min(bs, len_of(k2) - j0) == cnt)
            with.push_back(k2), done[k2] = 1;
        const T* keys = k_cache + int64_t(block) * KV * bs * D + kvh * bs * D;  // (cnt, D)
        if (j0 + bs < len_of(k))
          prefetch_block(k_cache + int64_t(table_of(k)[j0 / bs + 1]) * KV * bs * D + kvh * bs * D, bs * D);
        if (with.size() == 1) {
          cpu::gemm(false, true, group, cnt, D, T(s.scale), q_of(k), D, keys, D, T(0), S + k * group * ctx + j0,
                    len_of(k));
          continue;
        }
        const int64_t M = int64_t(with.size()) * group;
        q_rows.resize(static_cast<size_t>(M * D));
        s_rows.resize(static_cast<size_t>(M * cnt));
        for (size_t w = 0; w < with.size(); ++w) std::copy_n(q_of(with[w]), group * D, q_rows.data() + w * group * D);
        cpu::gemm(false, true, M, cnt, D, T(s.scale), q_rows.data(), D, keys, D, T(0), s_rows.data(), cnt);
        for (size_t w = 0; w < with.size(); ++w)
          for (int64_t g = 0; g < group; ++g)
            std::copy_n(s_rows.data() + (int64_t(w) * group + g) * cnt, cnt,
                        S + with[w] * group * ctx + g * len_of(with[w]) + j0);
      }
    }
    for (int64_t k = 0; k < m; ++k) {
      const int64_t len = len_of(k);
      T* Sk = S + k * group * ctx;
      for (int64_t g = 0; g < group; ++g) {
        T* row = Sk + g * len;
        const T mx = *std::max_element(row, row + len);
        const T inv = T(1.0 / exp_shifted_sum(row, row, len, mx));
        for (int64_t j = 0; j < len; ++j) row[j] *= inv;
      }
      const HeadBlocks<T> V{v_cache, table_of(k), KV * bs * D, kvh * bs * D, bs};
      weighted_values(Sk, group, len, V, D, out + rows[k] * s.out_stride + kvh * group * D);  // (group, D)
    }
  };
  // Waking the pool's workers costs more than a short decode row's attention (on a VM, a
  // sleeping vCPU takes hundreds of microseconds to wake), so small calls run on this thread.
  double flops = 0;
  for (int64_t i = 0; i < n; ++i) flops += 4.0 * s.heads * D * (double(positions[i]) + 1);
  if (flops < kMinParallelAttentionFlops) {
    cpu_pool().run(1, [&](int64_t, int thread) {
      for (int64_t task = 0; task < units * KV; ++task) one(task, thread);
    });
  } else {
    cpu_pool().run(units * KV, one);
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
