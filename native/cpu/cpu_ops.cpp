// CPU kernels for every op except GEMM (cpu/gemm.cpp): one function per op, threads split
// rows (or columns, for reductions over rows, so each output has one writer and a fixed
// summation order — that is what keeps training bit-reproducible).
#include "cpu/cpu_ops.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <type_traits>
#include <unordered_map>

#include "core/error.h"
#include "core/threadpool.h"
#include "cpu/gemm.h"
#include "cpu/sampler.h"
#include "cpu/vecmath.h"

namespace sppo::cpu {

namespace {
// Accumulator type: double for both float and double storage (reductions are cheap next to
// the GEMMs, and wider sums keep the float path close to the float64 reference).
using Acc = double;
constexpr int64_t kColChunk = 64;  // columns per task in column-parallel reductions
}  // namespace

namespace {
// live_bytes(): every live block's requested size (allocation is never in a step loop, so a
// locked map costs nothing that matters).
std::mutex g_live_mutex;
std::unordered_map<void*, size_t> g_live_blocks;
std::atomic<size_t> g_live_bytes{0};
}  // namespace

size_t live_bytes() { return g_live_bytes.load(); }

template <class T>
CpuOps<T>::~CpuOps() {
  g_live_bytes -= scratch_.size() * sizeof(T);
}

template <class T>
void* CpuOps<T>::alloc_bytes(size_t n) {
  size_t bytes = std::max<size_t>(64, (n + 63) / 64 * 64);
  void* p = std::aligned_alloc(64, bytes);
  SPPO_REQUIRE(p != nullptr, "out of host memory allocating ", bytes, " bytes (", double(bytes) / (1 << 20), " MiB)");
  zero_bytes(p, bytes);
  {
    std::lock_guard<std::mutex> lock(g_live_mutex);
    g_live_blocks[p] = n;
  }
  g_live_bytes += n;
  return p;
}

template <class T>
void CpuOps<T>::free_bytes(void* p) {
  if (!p) return;
  {
    std::lock_guard<std::mutex> lock(g_live_mutex);
    auto it = g_live_blocks.find(p);
    if (it != g_live_blocks.end()) {
      g_live_bytes -= it->second;
      g_live_blocks.erase(it);
    }
  }
  std::free(p);
}

template <class T>
void CpuOps<T>::resize_scratch(size_t elems) {
  g_live_bytes -= scratch_.size() * sizeof(T);
  scratch_.assign(elems, T(0));
  g_live_bytes += scratch_.size() * sizeof(T);
}

template <class T>
void CpuOps<T>::copy_bytes(void* dst, const void* src, size_t bytes) {
  cpu_pool().parallel_for(int64_t(bytes), 1 << 18, [&](int64_t b, int64_t e) {
    std::memcpy(static_cast<char*>(dst) + b, static_cast<const char*>(src) + b, size_t(e - b));
  });
}

template <class T>
void CpuOps<T>::zero_bytes(void* x, size_t bytes) {
  cpu_pool().parallel_for(int64_t(bytes), 1 << 18,
                          [&](int64_t b, int64_t e) { std::memset(static_cast<char*>(x) + b, 0, size_t(e - b)); });
}

template <class T>
BackendFootprint CpuOps<T>::footprint() {
  // The head's logits tile: 16 MiB of float, cache-sized. Attention: per thread, scores for two
  // tiles of kAttnBlock query rows over max_seq positions. Packed weights: float only.
  BackendFootprint f{"cpu", int64_t(1) << 22, [](int64_t max_seq, int64_t) {
                       return size_t(2 * kAttnBlock * max_seq) * cpu_pool().size() * sizeof(T);
                     }};
  if (std::is_same_v<T, float>)
    f.packed_weight_bytes = [](int64_t n, int64_t k) { return cpu::packed_weight_floats(n, k) * sizeof(float); };
  return f;
}

template <class T>
size_t CpuOps<T>::plan_scratch(int64_t max_seq, int64_t head_dim) {
  scratch_per_thread_ = 2 * kAttnBlock * max_seq;
  resize_scratch(footprint().scratch_bytes(max_seq, head_dim) / sizeof(T));
  return scratch_.size() * sizeof(T);
}

template <class T>
void CpuOps<T>::ensure_scratch(int64_t seq) {
  SPPO_REQUIRE(2 * kAttnBlock * seq <= scratch_per_thread_, "attention over ", seq,
               " positions exceeds the planned scratch (plan_scratch was not called for this length)");
  const size_t need = size_t(scratch_per_thread_) * cpu_pool().size();
  if (scratch_.size() < need) resize_scratch(need);
}

template <class T>
void CpuOps<T>::gemm(bool transA, bool transB, int64_t M, int64_t N, int64_t K, double alpha, const T* A, int64_t lda,
                     const T* B, int64_t ldb, double beta, T* C, int64_t ldc) {
  cpu::gemm(transA, transB, M, N, K, T(alpha), A, lda, B, ldb, T(beta), C, ldc);
}

template <class T>
int64_t CpuOps<T>::packed_weight_min_rows() const {
  return cpu::packed_weight_min_rows();
}

template <class T>
void CpuOps<T>::pack_weight(void* dst, const T* W, int64_t N, int64_t K) {
  if constexpr (std::is_same_v<T, float>) {
    cpu::pack_weight(W, K, N, K, static_cast<float*>(dst));
  } else {
    Ops<T>::pack_weight(dst, W, N, K);
  }
}

template <class T>
void CpuOps<T>::gemm_packed_weight(int64_t M, int64_t N, int64_t K, const T* A, const T* W, const void* packed,
                                   double beta, T* C, int64_t ldc) {
  if constexpr (std::is_same_v<T, float>) {
    cpu::gemm_packed_weight(M, N, K, 1.0f, A, K, W, K, static_cast<const float*>(packed), float(beta), C, ldc);
  } else {
    Ops<T>::gemm_packed_weight(M, N, K, A, W, packed, beta, C, ldc);
  }
}

template <class T>
void CpuOps<T>::fill(T* x, double value, int64_t n) {
  const T v = T(value);
  cpu_pool().parallel_for(n, 1 << 16, [&](int64_t b, int64_t e) { std::fill(x + b, x + e, v); });
}

namespace {
// Σ x², accumulated in double over a partition that depends on n only, so the result is the same
// for every thread count.
template <class X>
double sum_squares_of(const X* x, int64_t n) {
  constexpr int64_t kMaxChunks = 256;
  int64_t chunks = std::clamp<int64_t>((n + 4095) / 4096, 1, kMaxChunks);
  int64_t per = (n + chunks - 1) / chunks;
  double partial[kMaxChunks] = {};
  cpu_pool().run(chunks, [&](int64_t c, int) {
    int64_t b = c * per, e = std::min(n, b + per);
    Acc s = 0;
    for (int64_t i = b; i < e; ++i) s += Acc(x[i]) * Acc(x[i]);
    partial[c] = s;
  });
  double total = 0;
  for (int64_t c = 0; c < chunks; ++c) total += partial[c];
  return total;
}
}  // namespace

template <class T>
double CpuOps<T>::sum_squares(const T* x, int64_t n) {
  return sum_squares_of(x, n);
}

template <class T>
double CpuOps<T>::sum_squares(const bf16* x, int64_t n) {
  return sum_squares_of(x, n);
}

template <class T>
bool CpuOps<T>::all_finite(const T* x, int64_t n) {
  return std::isfinite(sum_squares(x, n)) || [&] {
    // sum_squares overflows for huge-but-finite values; confirm element by element.
    for (int64_t i = 0; i < n; ++i)
      if (!std::isfinite(x[i])) return false;
    return true;
  }();
}

template <class T>
void CpuOps<T>::embedding_backward(T* dtable, const T* dout, const int32_t* ids, int64_t N, int64_t C) {
  // Column chunks: every row of the table is touched by one task per chunk, in token order.
  int64_t chunks = (C + kColChunk - 1) / kColChunk;
  cpu_pool().run(chunks, [&](int64_t c, int) {
    int64_t c0 = c * kColChunk, c1 = std::min(C, c0 + kColChunk);
    for (int64_t i = 0; i < N; ++i) {
      T* dst = dtable + int64_t(ids[i]) * C;
      const T* src = dout + i * C;
      for (int64_t j = c0; j < c1; ++j) dst[j] += src[j];
    }
  });
}

template <class T>
void CpuOps<T>::gather_rows(T* dst, const T* src, const int32_t* rows, int64_t n, int64_t C) {
  cpu_pool().parallel_for(n, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) std::memcpy(dst + i * C, src + int64_t(rows[i]) * C, C * sizeof(T));
  });
}

template <class T>
void CpuOps<T>::scatter_rows(T* dst, const T* src, const int32_t* rows, int64_t n, int64_t C) {
  cpu_pool().parallel_for(n, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) std::memcpy(dst + int64_t(rows[i]) * C, src + i * C, C * sizeof(T));
  });
}

template <class T>
void CpuOps<T>::rmsnorm_forward(T* out, T* rstd, const T* x, const T* w, int64_t N, int64_t C, double eps) {
  cpu_pool().parallel_for(N, 8, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const T* xi = x + i * C;
      Acc ss = 0;
      for (int64_t j = 0; j < C; ++j) ss += Acc(xi[j]) * Acc(xi[j]);
      T r = T(1.0 / std::sqrt(ss / Acc(C) + eps));
      rstd[i] = r;
      T* oi = out + i * C;
      for (int64_t j = 0; j < C; ++j) oi[j] = xi[j] * r * w[j];
    }
  });
}

template <class T>
void CpuOps<T>::rmsnorm_backward(T* dx, T* dw, const T* dout, const T* x, const T* w, const T* rstd, int64_t N,
                                 int64_t C) {
  // y = x*r*w with r = (mean(x^2)+eps)^-1/2:  dx = r*(g - xhat*mean(g*xhat)), g = dout*w, xhat = x*r.
  cpu_pool().parallel_for(N, 8, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const T* xi = x + i * C;
      const T* di = dout + i * C;
      Acc r = rstd[i], dot = 0;
      for (int64_t j = 0; j < C; ++j) dot += Acc(di[j]) * Acc(w[j]) * Acc(xi[j]);
      T k = T(dot * r / Acc(C));  // mean(g * xhat)
      T rr = T(r);
      T* dxi = dx + i * C;
      for (int64_t j = 0; j < C; ++j) dxi[j] += rr * (di[j] * w[j] - xi[j] * rr * k);
    }
  });
  if (!dw) return;
  int64_t chunks = (C + kColChunk - 1) / kColChunk;
  cpu_pool().run(chunks, [&](int64_t c, int) {
    int64_t c0 = c * kColChunk, c1 = std::min(C, c0 + kColChunk);
    Acc acc[kColChunk] = {};
    for (int64_t i = 0; i < N; ++i) {
      const T* xi = x + i * C;
      const T* di = dout + i * C;
      Acc r = rstd[i];
      for (int64_t j = c0; j < c1; ++j) acc[j - c0] += Acc(di[j]) * Acc(xi[j]) * r;
    }
    for (int64_t j = c0; j < c1; ++j) dw[j] += T(acc[j - c0]);
  });
}

template <class T>
void CpuOps<T>::add_bias(T* x, const T* bias, int64_t N, int64_t C, int64_t ld) {
  cpu_pool().parallel_for(N, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      for (int64_t j = 0; j < C; ++j) x[i * ld + j] += bias[j];
  });
}

template <class T>
void CpuOps<T>::bias_backward(T* dbias, const T* dout, int64_t N, int64_t C, int64_t ld) {
  int64_t chunks = (C + kColChunk - 1) / kColChunk;
  cpu_pool().run(chunks, [&](int64_t c, int) {
    int64_t c0 = c * kColChunk, c1 = std::min(C, c0 + kColChunk);
    Acc acc[kColChunk] = {};
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = c0; j < c1; ++j) acc[j - c0] += Acc(dout[i * ld + j]);
    for (int64_t j = c0; j < c1; ++j) dbias[j] += T(acc[j - c0]);
  });
}

template <class T>
void CpuOps<T>::rope(T* x, int64_t N, int64_t ld, int64_t off, int64_t heads, int64_t head_dim,
                     const int32_t* positions, const T* cos, const T* sin, bool inverse) {
  const int64_t half = head_dim / 2;
  // The inverse rotation (by -angle) is the transpose, i.e. the backward pass.
  const T sign = inverse ? T(-1) : T(1);
  cpu_pool().parallel_for(N, 8, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const T* c = cos + int64_t(positions[i]) * half;
      const T* s = sin + int64_t(positions[i]) * half;
      for (int64_t h = 0; h < heads; ++h) {
        T* v = x + i * ld + off + h * head_dim;
        for (int64_t j = 0; j < half; ++j) {
          T a = v[j], bb = v[j + half], sj = sign * s[j];
          v[j] = a * c[j] - bb * sj;
          v[j + half] = bb * c[j] + a * sj;
        }
      }
    }
  });
}

template <class T>
void CpuOps<T>::attention_forward(T* out, T* lse, const T* qkv, const AttentionShape& s) {
  // Flash-style over query tiles: scores for one tile of kAttnBlock queries against the keys
  // it may see, softmax, then P·V — never a (seq x seq) matrix, and lse kept for backward.
  const int64_t Tn = s.seq, D = s.head_dim, H = s.heads, group = s.heads / s.kv_heads;
  const int64_t n_blocks = (Tn + kAttnBlock - 1) / kAttnBlock;
  ensure_scratch(Tn);
  cpu_pool().run(s.batch * H * n_blocks, [&](int64_t task, int thread) {
    const int64_t b = task / (H * n_blocks), h = (task / n_blocks) % H, blk = task % n_blocks;
    const int64_t kvh = h / group;
    const int64_t r0 = blk * kAttnBlock, r1 = std::min(Tn, r0 + kAttnBlock), nr = r1 - r0;
    const T* base = qkv + b * Tn * s.qkv_stride;
    const T* Q = base + r0 * s.qkv_stride + s.q_off + h * D;
    const T* K = base + s.k_off + kvh * D;
    const T* V = base + s.v_off + kvh * D;
    T* S = thread_scratch(thread);  // (nr, r1)
    cpu::gemm(false, true, nr, r1, D, T(s.scale), Q, s.qkv_stride, K, s.qkv_stride, T(0), S, r1);
    T* L = lse + (b * H + h) * Tn;
    for (int64_t i = 0; i < nr; ++i) {
      T* row = S + i * r1;
      const int64_t visible = r0 + i + 1;  // causal: keys 0..r0+i
      T mx = row[0];
      for (int64_t j = 1; j < visible; ++j) mx = std::max(mx, row[j]);
      const Acc sum = exp_shifted_sum(row, row, visible, mx);
      T inv = T(1.0 / sum);
      for (int64_t j = 0; j < visible; ++j) row[j] *= inv;
      for (int64_t j = visible; j < r1; ++j) row[j] = T(0);
      L[r0 + i] = T(Acc(mx) + std::log(sum));
    }
    T* O = out + (b * Tn + r0) * s.out_stride + h * D;
    cpu::gemm(false, false, nr, D, r1, T(1), S, r1, V, s.qkv_stride, T(0), O, s.out_stride);
  });
}

template <class T>
void CpuOps<T>::attention_backward(T* dqkv, const T* dout, const T* qkv, const T* out, const T* lse,
                                   const AttentionShape& s) {
  // One task per (batch, kv head) so the dK and dV of a kv head have a single writer; the
  // query heads of its group and their tiles run inside the task in a fixed order.
  const int64_t Tn = s.seq, D = s.head_dim, H = s.heads, group = s.heads / s.kv_heads;
  const int64_t n_blocks = (Tn + kAttnBlock - 1) / kAttnBlock;
  ensure_scratch(Tn);
  cpu_pool().run(s.batch * s.kv_heads, [&](int64_t task, int thread) {
    const int64_t b = task / s.kv_heads, kvh = task % s.kv_heads;
    const T* base = qkv + b * Tn * s.qkv_stride;
    T* dbase = dqkv + b * Tn * s.qkv_stride;
    const T* K = base + s.k_off + kvh * D;
    const T* V = base + s.v_off + kvh * D;
    T* dK = dbase + s.k_off + kvh * D;
    T* dV = dbase + s.v_off + kvh * D;
    for (int64_t t = 0; t < Tn; ++t) {
      std::fill(dK + t * s.qkv_stride, dK + t * s.qkv_stride + D, T(0));
      std::fill(dV + t * s.qkv_stride, dV + t * s.qkv_stride + D, T(0));
    }
    T* P = thread_scratch(thread);
    T* dP = P + kAttnBlock * Tn;
    for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
      const T* L = lse + (b * H + h) * Tn;
      for (int64_t blk = 0; blk < n_blocks; ++blk) {
        const int64_t r0 = blk * kAttnBlock, r1 = std::min(Tn, r0 + kAttnBlock), nr = r1 - r0;
        const T* Q = base + r0 * s.qkv_stride + s.q_off + h * D;
        T* dQ = dbase + r0 * s.qkv_stride + s.q_off + h * D;
        const T* dO = dout + (b * Tn + r0) * s.out_stride + h * D;
        const T* O = out + (b * Tn + r0) * s.out_stride + h * D;
        // Recompute probabilities from the saved log-sum-exp.
        cpu::gemm(false, true, nr, r1, D, T(s.scale), Q, s.qkv_stride, K, s.qkv_stride, T(0), P, r1);
        for (int64_t i = 0; i < nr; ++i) {
          T* row = P + i * r1;
          const int64_t visible = r0 + i + 1;
          exp_shifted_sum(row, row, visible, L[r0 + i]);
          for (int64_t j = visible; j < r1; ++j) row[j] = T(0);
        }
        cpu::gemm(true, false, r1, D, nr, T(1), P, r1, dO, s.out_stride, T(1), dV, s.qkv_stride);  // dV += Pᵀ dO
        cpu::gemm(false, true, nr, r1, D, T(1), dO, s.out_stride, V, s.qkv_stride, T(0), dP, r1);  // dP = dO Vᵀ
        for (int64_t i = 0; i < nr; ++i) {
          // dS = P ∘ (dP − rowsum(dO ∘ O)): the softmax Jacobian applied row by row.
          Acc d = 0;
          for (int64_t k = 0; k < D; ++k) d += Acc(dO[i * s.out_stride + k]) * Acc(O[i * s.out_stride + k]);
          T dd = T(d);
          T* prow = P + i * r1;
          T* drow = dP + i * r1;
          for (int64_t j = 0; j < r1; ++j) drow[j] = prow[j] * (drow[j] - dd);
        }
        cpu::gemm(false, false, nr, D, r1, T(s.scale), dP, r1, K, s.qkv_stride, T(0), dQ, s.qkv_stride);  // dQ
        cpu::gemm(true, false, r1, D, nr, T(s.scale), dP, r1, Q, s.qkv_stride, T(1), dK, s.qkv_stride);   // dK
      }
    }
  });
}

template <class T>
void CpuOps<T>::swiglu_forward(T* out, const T* gu, int64_t N, int64_t F) {
  cpu_pool().parallel_for(N, 8, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      swiglu_rows(gu + i * 2 * F, gu + i * 2 * F + F, out + i * F, F);
    }
  });
}

template <class T>
void CpuOps<T>::swiglu_backward(T* dgu, const T* dout, const T* gu, int64_t N, int64_t F) {
  cpu_pool().parallel_for(N, 8, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const T* g = gu + i * 2 * F;
      swiglu_grad_rows(g, g + F, dout + i * F, dgu + i * 2 * F, dgu + i * 2 * F + F, F);
    }
  });
}

namespace {
// Tiles of the (n, V) logits that fit `elems` of scratch: up to 4096 rows by at least 256
// vocabulary entries. Tall tiles keep every GEMM's inner dimension long (the dW update sums over
// the tile's rows), which matters more than tile count: dW is read and written once per tile.
struct HeadTiles {
  int64_t rows, vocab;
};
HeadTiles head_tiles(int64_t n, int64_t V, int64_t elems) {
  const int64_t vocab = std::min(V, std::max<int64_t>(256, elems / std::min<int64_t>(n, 4096)));
  return {std::max<int64_t>(1, std::min(n, elems / vocab)), vocab};
}

// The (n, V) logits H Wᵀ a head tile at a time, in `scratch_elems` of scratch: each tile's logits
// (R rows from r0, Vc vocabulary entries from v0) go to scratch (R, Vc) and on_tile(r0, R, v0, Vc);
// after the last vocabulary tile of a row tile, on_rows(r0, R).
template <class T, class OnTile, class OnRows>
void for_each_logit_tile(const T* H, const T* W, int64_t n, int64_t C, int64_t V, T* scratch, int64_t scratch_elems,
                         OnTile&& on_tile, OnRows&& on_rows) {
  const HeadTiles tile = head_tiles(n, V, scratch_elems);
  for (int64_t r0 = 0; r0 < n; r0 += tile.rows) {
    const int64_t R = std::min(tile.rows, n - r0);
    for (int64_t v0 = 0; v0 < V; v0 += tile.vocab) {
      const int64_t Vc = std::min(tile.vocab, V - v0);
      cpu::gemm(false, true, R, Vc, C, T(1), H + r0 * C, C, W + v0 * C, C, T(0), scratch, Vc);
      on_tile(r0, R, v0, Vc);
    }
    on_rows(r0, R);
  }
}
}  // namespace

template <class T>
void CpuOps<T>::head_logprobs(double* logp, double* lse, const T* H, const T* W, const int32_t* targets, int64_t n,
                              int64_t C, int64_t V, T* scratch, int64_t scratch_elems) {
  // Online log-sum-exp across vocabulary tiles: lse holds the running max m and logp the running
  // Σ exp(x − m) until the last tile has been seen.
  for_each_logit_tile(
      H, W, n, C, V, scratch, scratch_elems,
      [&](int64_t r0, int64_t R, int64_t v0, int64_t Vc) {
        if (v0 == 0)
          for (int64_t i = 0; i < R; ++i) lse[r0 + i] = -std::numeric_limits<double>::infinity(), logp[r0 + i] = 0;
        cpu_pool().parallel_for(R, 4, [&](int64_t b, int64_t e) {
          for (int64_t i = b; i < e; ++i) {
            T* x = scratch + i * Vc;
            T cm = x[0];
            for (int64_t j = 1; j < Vc; ++j) cm = std::max(cm, x[j]);
            double& m = lse[r0 + i];
            double& sum = logp[r0 + i];
            const T shift = std::max(T(m), cm);  // every max so far is a value of T
            sum = sum * std::exp(m - Acc(shift)) + exp_shifted_sum(x, x, Vc, shift);
            m = Acc(shift);
          }
        });
      },
      [&](int64_t r0, int64_t R) {
        cpu_pool().parallel_for(R, 64, [&](int64_t b, int64_t e) {
          for (int64_t i = b; i < e; ++i) {
            // The target's logit as a float64 dot product (the tiles above have been overwritten).
            const T* h = H + (r0 + i) * C;
            const T* w = W + int64_t(targets[r0 + i]) * C;
            Acc xt = 0;
            for (int64_t k = 0; k < C; ++k) xt += Acc(h[k]) * Acc(w[k]);
            lse[r0 + i] += std::log(logp[r0 + i]);
            logp[r0 + i] = xt - lse[r0 + i];
          }
        });
      });
}

template <class T>
void CpuOps<T>::head_logprobs_backward(T* dH, T* dW, const T* H, const T* W, const int32_t* targets, const double* lse,
                                       const double* coef, int64_t n, int64_t C, int64_t V, T* scratch,
                                       int64_t scratch_elems) {
  // Each tile's logits turn, in place, into dL/dlogits = coef·(onehot − p).
  for_each_logit_tile(
      H, W, n, C, V, scratch, scratch_elems,
      [&](int64_t r0, int64_t R, int64_t v0, int64_t Vc) {
        cpu_pool().parallel_for(R, 4, [&](int64_t b, int64_t e) {
          for (int64_t i = b; i < e; ++i) {
            T* x = scratch + i * Vc;
            exp_shifted_sum(x, x, Vc, T(lse[r0 + i]));
            const T k = T(-coef[r0 + i]);
            for (int64_t j = 0; j < Vc; ++j) x[j] *= k;
            const int64_t t = targets[r0 + i] - v0;
            if (t >= 0 && t < Vc) x[t] += T(coef[r0 + i]);
          }
        });
        cpu::gemm(false, false, R, C, Vc, T(1), scratch, Vc, W + v0 * C, C, T(v0 == 0 ? 0 : 1), dH + r0 * C, C);
        if (dW) cpu::gemm(true, false, Vc, C, R, T(1), scratch, Vc, H + r0 * C, C, T(1), dW + v0 * C, C);
      },
      [](int64_t, int64_t) {});
}

// One element of each update, shared by the update and its dry run so that both compute the same
// values: the moments and the weight change in place.
namespace {

template <class T>
struct AdamElement {
  T b1, b2, gs, keep, step_size, inv_sqrt_bc2, e;
  AdamElement(double lr, double beta1, double beta2, double eps, double decay, double gscale, int64_t step)
      : b1(T(beta1)),
        b2(T(beta2)),
        gs(T(gscale)),
        keep(T(1.0 - decay)),
        step_size(T(lr / (1.0 - std::pow(beta1, double(step))))),
        inv_sqrt_bc2(T(1.0 / std::sqrt(1.0 - std::pow(beta2, double(step))))),
        e(T(eps)) {}
  void operator()(T g, T& m, T& v, T& w) const {
    const T gi = g * gs;
    m = b1 * m + (T(1) - b1) * gi;
    v = b2 * v + (T(1) - b2) * gi * gi;
    w = w * keep - step_size * m / (std::sqrt(v) * inv_sqrt_bc2 + e);
  }
};

template <class T>
struct RmspropElement {
  T a, gs, keep, l, e;
  RmspropElement(double lr, double alpha, double eps, double decay, double gscale)
      : a(T(alpha)), gs(T(gscale)), keep(T(1.0 - decay)), l(T(lr)), e(T(eps)) {}
  void operator()(T g, T& sq, T& w) const {
    const T gi = g * gs;
    sq = a * sq + (T(1) - a) * gi * gi;
    w = w * keep - l * gi / (std::sqrt(sq) + e);
  }
};

// The updates and their dry runs over gradients of either precision G (Master, or bf16 widened
// exactly on load).
template <class T, class G>
void adamw_pass(T* p, T* master, const G* g, T* m, T* v, int64_t n, const AdamElement<T>& update) {
  T* w = master ? master : p;  // Master == T: a master copy, when given, just mirrors into p
  cpu_pool().parallel_for(n, 1 << 14, [&](int64_t b, int64_t en) {
    for (int64_t i = b; i < en; ++i) {
      update(T(g[i]), m[i], v[i], w[i]);
      if (master) p[i] = w[i];
    }
  });
}

template <class T, class G>
void rmsprop_pass(T* p, T* master, const G* g, T* sq, int64_t n, const RmspropElement<T>& update) {
  T* w = master ? master : p;
  cpu_pool().parallel_for(n, 1 << 14, [&](int64_t b, int64_t en) {
    for (int64_t i = b; i < en; ++i) {
      update(T(g[i]), sq[i], w[i]);
      if (master) p[i] = w[i];
    }
  });
}

template <class T, class G>
bool adamw_pass_finite(const T* p, const T* master, const G* g, const T* m, const T* v, int64_t n,
                       const AdamElement<T>& update) {
  const T* w = master ? master : p;
  std::atomic<bool> finite{true};
  cpu_pool().parallel_for(n, 1 << 14, [&](int64_t b, int64_t en) {
    bool ok = true;
    for (int64_t i = b; i < en; ++i) {
      T mi = m[i], vi = v[i], wi = w[i];
      update(T(g[i]), mi, vi, wi);
      ok &= std::isfinite(mi) && std::isfinite(vi) && std::isfinite(wi);
    }
    if (!ok) finite.store(false, std::memory_order_relaxed);
  });
  return finite.load();
}

template <class T, class G>
bool rmsprop_pass_finite(const T* p, const T* master, const G* g, const T* sq, int64_t n,
                         const RmspropElement<T>& update) {
  const T* w = master ? master : p;
  std::atomic<bool> finite{true};
  cpu_pool().parallel_for(n, 1 << 14, [&](int64_t b, int64_t en) {
    bool ok = true;
    for (int64_t i = b; i < en; ++i) {
      T si = sq[i], wi = w[i];
      update(T(g[i]), si, wi);
      ok &= std::isfinite(si) && std::isfinite(wi);
    }
    if (!ok) finite.store(false, std::memory_order_relaxed);
  });
  return finite.load();
}

}  // namespace

template <class T>
void CpuOps<T>::adamw_update(T* p, T* master, const T* g, T* m, T* v, int64_t n, double lr, double beta1, double beta2,
                             double eps, double decay, double gscale, int64_t step) {
  adamw_pass(p, master, g, m, v, n, AdamElement<T>(lr, beta1, beta2, eps, decay, gscale, step));
}

template <class T>
void CpuOps<T>::adamw_update(T* p, T* master, const bf16* g, T* m, T* v, int64_t n, double lr, double beta1,
                             double beta2, double eps, double decay, double gscale, int64_t step) {
  adamw_pass(p, master, g, m, v, n, AdamElement<T>(lr, beta1, beta2, eps, decay, gscale, step));
}

template <class T>
void CpuOps<T>::rmsprop_update(T* p, T* master, const T* g, T* sq, int64_t n, double lr, double alpha, double eps,
                               double decay, double gscale) {
  rmsprop_pass(p, master, g, sq, n, RmspropElement<T>(lr, alpha, eps, decay, gscale));
}

template <class T>
void CpuOps<T>::rmsprop_update(T* p, T* master, const bf16* g, T* sq, int64_t n, double lr, double alpha, double eps,
                               double decay, double gscale) {
  rmsprop_pass(p, master, g, sq, n, RmspropElement<T>(lr, alpha, eps, decay, gscale));
}

template <class T>
bool CpuOps<T>::adamw_update_finite(const T* p, const T* master, const T* g, const T* m, const T* v, int64_t n,
                                    double lr, double beta1, double beta2, double eps, double decay, double gscale,
                                    int64_t step) {
  return adamw_pass_finite(p, master, g, m, v, n, AdamElement<T>(lr, beta1, beta2, eps, decay, gscale, step));
}

template <class T>
bool CpuOps<T>::adamw_update_finite(const T* p, const T* master, const bf16* g, const T* m, const T* v, int64_t n,
                                    double lr, double beta1, double beta2, double eps, double decay, double gscale,
                                    int64_t step) {
  return adamw_pass_finite(p, master, g, m, v, n, AdamElement<T>(lr, beta1, beta2, eps, decay, gscale, step));
}

template <class T>
bool CpuOps<T>::rmsprop_update_finite(const T* p, const T* master, const T* g, const T* sq, int64_t n, double lr,
                                      double alpha, double eps, double decay, double gscale) {
  return rmsprop_pass_finite(p, master, g, sq, n, RmspropElement<T>(lr, alpha, eps, decay, gscale));
}

template <class T>
bool CpuOps<T>::rmsprop_update_finite(const T* p, const T* master, const bf16* g, const T* sq, int64_t n, double lr,
                                      double alpha, double eps, double decay, double gscale) {
  return rmsprop_pass_finite(p, master, g, sq, n, RmspropElement<T>(lr, alpha, eps, decay, gscale));
}

template <class T>
void CpuOps<T>::add_round(bf16* g, const T* x, int64_t n) {
  // The sum in float, then one rounding to bf16: what CUDA's __float2bfloat16_rn(g + x) gives.
  cpu_pool().parallel_for(n, 1 << 14, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) g[i] = bf16(float(g[i]) + float(x[i]));
  });
}

template <class T>
void CpuOps<T>::sample(int32_t* tokens, double* raw_logprobs, const T* logits, int64_t n, int64_t V,
                       const SamplingOptions& o, const double* u) {
  cpu_pool().parallel_for(n, 1, [&](int64_t b, int64_t e) {
    thread_local SamplerScratch<T> scratch;
    for (int64_t i = b; i < e; ++i) tokens[i] = sample_token(logits + i * V, V, o, u[i], &raw_logprobs[i], scratch);
  });
}

template class CpuOps<float>;
template class CpuOps<double>;

}  // namespace sppo::cpu
