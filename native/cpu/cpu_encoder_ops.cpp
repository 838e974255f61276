// CPU kernels of the encoder's ops (DeBERTa-v3, inference only): LayerNorm with a fused
// residual, exact-erf GELU, and disentangled attention. Threads split rows, or (for attention)
// (batch, head) pairs, so each output has one writer and a fixed summation order.
#include <algorithm>
#include <cmath>
#include <limits>

#include "core/error.h"
#include "core/threadpool.h"
#include "cpu/cpu_ops.h"
#include "cpu/gemm.h"

namespace sppo::cpu {

namespace {
using Acc = double;  // row statistics and softmax sums, as in cpu_ops.cpp
}  // namespace

template <class T>
void CpuOps<T>::layernorm_forward(T* out, const T* x, const T* residual, const T* w, const T* b, int64_t N, int64_t C,
                                  double eps) {
  cpu_pool().parallel_for(N, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      const T* xi = x + i * C;
      const T* ri = residual ? residual + i * C : nullptr;
      T* oi = out + i * C;
      // the sum first (out may alias x or residual), then two passes for a stable variance
      Acc mean = 0;
      for (int64_t j = 0; j < C; ++j) {
        const T v = ri ? T(xi[j] + ri[j]) : xi[j];
        oi[j] = v;
        mean += Acc(v);
      }
      mean /= Acc(C);
      Acc var = 0;
      for (int64_t j = 0; j < C; ++j) var += (Acc(oi[j]) - mean) * (Acc(oi[j]) - mean);
      const Acc rstd = 1.0 / std::sqrt(var / Acc(C) + eps);
      for (int64_t j = 0; j < C; ++j) oi[j] = T((Acc(oi[j]) - mean) * rstd * Acc(w[j]) + Acc(b[j]));
    }
  });
}

template <class T>
void CpuOps<T>::gelu_forward(T* x, int64_t n) {
  // torch's exact GELU: x/2 · (1 + erf(x/√2)), not the tanh approximation
  cpu_pool().parallel_for(n, 4096, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) x[i] = T(0.5 * Acc(x[i]) * (1.0 + std::erf(Acc(x[i]) * M_SQRT1_2)));
  });
}

template <class T>
void CpuOps<T>::disentangled_attention_forward(T* out, const T* qkv, const T* rel, const int32_t* rel_index,
                                               int64_t rel_center, int64_t rel_rows, const int32_t* lengths,
                                               const AttentionShape& s) {
  SPPO_REQUIRE(s.heads == s.kv_heads, "disentangled attention needs heads == kv_heads, got ", s.heads, " and ",
               s.kv_heads);
  const int64_t Tn = s.seq, D = s.head_dim, H = s.heads, R = rel_rows, HD = H * D;
  for (int64_t b = 0; b < s.batch; ++b)
    SPPO_REQUIRE(lengths[b] >= 1 && lengths[b] <= Tn, "row ", b, " has length ", lengths[b], ", outside [1, ", Tn, "]");
  // Per task: the p2c table K·Qrᵀ (Tn x R), then per query tile the c2p table Q·Krᵀ (blk x R)
  // and the scores (blk x Tn). Gathering from the two tables costs O(Tn·R·D) per head instead of
  // a D-long dot product for every (i, j).
  const int64_t per_thread = Tn * R + kAttnBlock * R + kAttnBlock * Tn;
  const auto threads = int64_t(cpu_pool().size());
  if (int64_t(encoder_scratch_.size()) < per_thread * threads) encoder_scratch_.resize(size_t(per_thread * threads));
  cpu_pool().run(s.batch * H, [&](int64_t task, int thread) {
    const int64_t b = task / H, h = task % H, len = lengths[b];
    const T* base = qkv + b * Tn * s.qkv_stride;
    const T* Q = base + s.q_off + h * D;
    const T* K = base + s.k_off + h * D;
    const T* V = base + s.v_off + h * D;
    const T* Qr = rel + h * D;
    const T* Kr = rel + HD + h * D;
    T* p2c = encoder_scratch_.data() + thread * per_thread;  // (len, R)
    T* c2p = p2c + Tn * R;                                   // (blk, R)
    T* S = c2p + kAttnBlock * R;                             // (blk, len)
    cpu::gemm(false, true, len, R, D, T(1), K, s.qkv_stride, Qr, 2 * HD, T(0), p2c, R);
    for (int64_t r0 = 0; r0 < len; r0 += kAttnBlock) {
      const int64_t nr = std::min(kAttnBlock, len - r0);
      cpu::gemm(false, true, nr, len, D, T(1), Q + r0 * s.qkv_stride, s.qkv_stride, K, s.qkv_stride, T(0), S, len);
      cpu::gemm(false, true, nr, R, D, T(1), Q + r0 * s.qkv_stride, s.qkv_stride, Kr, 2 * HD, T(0), c2p, R);
      for (int64_t i = 0; i < nr; ++i) {
        T* row = S + i * len;
        const T* c2p_i = c2p + i * R;
        const int32_t* d = rel_index + rel_center + (r0 + i);  // d[-j] is δ(r0 + i, j)
        T mx = -std::numeric_limits<T>::infinity();
        for (int64_t j = 0; j < len; ++j) {
          const int32_t dj = d[-j];
          row[j] = T(s.scale) * (row[j] + c2p_i[dj] + p2c[j * R + dj]);
          mx = std::max(mx, row[j]);
        }
        Acc sum = 0;
        for (int64_t j = 0; j < len; ++j) {
          row[j] = T(std::exp(Acc(row[j] - mx)));
          sum += Acc(row[j]);
        }
        const T inv = T(1.0 / sum);
        for (int64_t j = 0; j < len; ++j) row[j] *= inv;
      }
      T* O = out + (b * Tn + r0) * s.out_stride + h * D;
      cpu::gemm(false, false, nr, D, len, T(1), S, len, V, s.qkv_stride, T(0), O, s.out_stride);
    }
    // padding queries attend to nothing (as the 2-D mask of transformers' DeBERTa has it)
    for (int64_t i = len; i < Tn; ++i) std::fill_n(out + (b * Tn + i) * s.out_stride + h * D, D, T(0));
  });
}

template void CpuOps<float>::layernorm_forward(float*, const float*, const float*, const float*, const float*, int64_t,
                                               int64_t, double);
template void CpuOps<double>::layernorm_forward(double*, const double*, const double*, const double*, const double*,
                                                int64_t, int64_t, double);
template void CpuOps<float>::gelu_forward(float*, int64_t);
template void CpuOps<double>::gelu_forward(double*, int64_t);
template void CpuOps<float>::disentangled_attention_forward(float*, const float*, const float*, const int32_t*, int64_t,
                                                            int64_t, const int32_t*, const AttentionShape&);
template void CpuOps<double>::disentangled_attention_forward(double*, const double*, const double*, const int32_t*,
                                                             int64_t, int64_t, const int32_t*, const AttentionShape&);

}  // namespace sppo::cpu
