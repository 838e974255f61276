// The CPU backend: the op interface on host memory, for float (the engine) and double (the
// float64 reference that gradient checks run against).
#pragma once
#include <vector>

#include "ops/meta_ops.h"
#include "ops/ops.h"

namespace sppo::cpu {

template <class T>
class CpuOps final : public Ops<T> {
 public:
  const char* name() const override { return "cpu"; }
  std::unique_ptr<Ops<T>> fresh() const override { return std::make_unique<CpuOps<T>>(); }
  ~CpuOps() override;
  // What this backend sets aside besides the tensors asked for (plan_scratch and the head's
  // tile read it, and Model::plan through the meta op set).
  static BackendFootprint footprint();
  int64_t head_scratch_elems() const override { return footprint().head_scratch_elems; }
  // Master == T here: the CPU keeps one precision, so master weights are the parameters.
  void* alloc_bytes(size_t bytes) override;
  void free_bytes(void* p) override;
  size_t plan_scratch(int64_t max_seq, int64_t head_dim) override;
  void upload_bytes(void* dst, const void* src, size_t bytes) override { copy_bytes(dst, src, bytes); }
  void download_bytes(void* dst, const void* src, size_t bytes) override { copy_bytes(dst, src, bytes); }
  void upload(T* dst, const T* src, int64_t n) override { copy(dst, src, n); }
  void download(T* dst, const T* src, int64_t n) override { copy(dst, src, n); }
  void cast(T* dst, const T* src, int64_t n) override { copy(dst, src, n); }

  void gemm(bool transA, bool transB, int64_t M, int64_t N, int64_t K, double alpha, const T* A, int64_t lda,
            const T* B, int64_t ldb, double beta, T* C, int64_t ldc) override;
  // Packed weights: float only (cpu/gemm.h); the float64 reference packs none.
  size_t packed_weight_bytes(int64_t N, int64_t K) const override {
    return footprint().packed_weight_bytes ? footprint().packed_weight_bytes(N, K) : 0;
  }
  int64_t packed_weight_min_rows() const override;
  void pack_weight(void* dst, const T* W, int64_t N, int64_t K) override;
  void gemm_packed_weight(int64_t M, int64_t N, int64_t K, const T* A, const T* W, const void* packed, double beta,
                          T* C, int64_t ldc) override;
  void gemm_master(bool transA, bool transB, int64_t M, int64_t N, int64_t K, double alpha, const T* A, int64_t lda,
                   const T* B, int64_t ldb, double beta, T* C, int64_t ldc) override {
    gemm(transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
  void fill(T* x, double value, int64_t n) override;
  void zero_bytes(void* x, size_t bytes) override;
  void copy(T* dst, const T* src, int64_t n) override { copy_bytes(dst, src, size_t(n) * sizeof(T)); }
  double sum_squares(const T* x, int64_t n) override;
  bool all_finite(const T* x, int64_t n) override;
  void embedding_backward(T* dtable, const T* dout, const int32_t* ids, int64_t N, int64_t C) override;
  void gather_rows(T* dst, const T* src, const int32_t* rows, int64_t n, int64_t C) override;
  void scatter_rows(T* dst, const T* src, const int32_t* rows, int64_t n, int64_t C) override;
  void rmsnorm_forward(T* out, T* rstd, const T* x, const T* w, int64_t N, int64_t C, double eps) override;
  void rmsnorm_backward(T* dx, T* dw, const T* dout, const T* x, const T* w, const T* rstd, int64_t N,
                        int64_t C) override;
  void add_bias(T* x, const T* bias, int64_t N, int64_t C, int64_t ld) override;
  void bias_backward(T* dbias, const T* dout, int64_t N, int64_t C, int64_t ld) override;
  void rope(T* x, int64_t N, int64_t ld, int64_t off, int64_t heads, int64_t head_dim, const int32_t* positions,
            const T* cos, const T* sin, bool inverse) override;
  void attention_forward(T* out, T* lse, const T* qkv, const AttentionShape& s) override;
  void attention_backward(T* dqkv, const T* dout, const T* qkv, const T* out, const T* lse,
                          const AttentionShape& s) override;
  void swiglu_forward(T* out, const T* gu, int64_t N, int64_t F) override;
  void swiglu_backward(T* dgu, const T* dout, const T* gu, int64_t N, int64_t F) override;
  void head_logprobs(double* logp, double* lse, const T* H, const T* W, const int32_t* targets, int64_t n, int64_t C,
                     int64_t V, T* scratch, int64_t scratch_elems) override;
  void head_logprobs_backward(T* dH, T* dW, const T* H, const T* W, const int32_t* targets, const double* lse,
                              const double* coef, int64_t n, int64_t C, int64_t V, T* scratch,
                              int64_t scratch_elems) override;
  void adamw_update(T* p, T* master, const T* g, T* m, T* v, int64_t n, double lr, double beta1, double beta2,
                    double eps, double decay, double gscale, int64_t step) override;
  void rmsprop_update(T* p, T* master, const T* g, T* sq, int64_t n, double lr, double alpha, double eps, double decay,
                      double gscale) override;
  bool adamw_update_finite(const T* p, const T* master, const T* g, const T* m, const T* v, int64_t n, double lr,
                           double beta1, double beta2, double eps, double decay, double gscale, int64_t step) override;
  bool rmsprop_update_finite(const T* p, const T* master, const T* g, const T* sq, int64_t n, double lr, double alpha,
                             double eps, double decay, double gscale) override;
  void add_round(bf16* g, const T* x, int64_t n) override;
  double sum_squares(const bf16* x, int64_t n) override;
  void adamw_update(T* p, T* master, const bf16* g, T* m, T* v, int64_t n, double lr, double beta1, double beta2,
                    double eps, double decay, double gscale, int64_t step) override;
  void rmsprop_update(T* p, T* master, const bf16* g, T* sq, int64_t n, double lr, double alpha, double eps,
                      double decay, double gscale) override;
  bool adamw_update_finite(const T* p, const T* master, const bf16* g, const T* m, const T* v, int64_t n, double lr,
                           double beta1, double beta2, double eps, double decay, double gscale, int64_t step) override;
  bool rmsprop_update_finite(const T* p, const T* master, const bf16* g, const T* sq, int64_t n, double lr,
                             double alpha, double eps, double decay, double gscale) override;

  // ---- The encoder (cpu/cpu_encoder_ops.cpp) ----
  void layernorm_forward(T* out, const T* x, const T* residual, const T* w, const T* b, int64_t N, int64_t C,
                         double eps) override;
  void gelu_forward(T* x, int64_t n) override;
  void disentangled_attention_forward(T* out, const T* qkv, const T* rel, const int32_t* rel_index, int64_t rel_center,
                                      int64_t rel_rows, const int32_t* lengths, const AttentionShape& s) override;

  // ---- Decoding with a KV cache (batched sampling) ----
  void kv_cache_write(T* k_cache, T* v_cache, const T* qkv, const int32_t* slots, const int32_t* positions, int64_t n,
                      const AttentionShape& s, const KvBlocks& kv) override;
  void attention_decode(T* out, const T* qkv, const T* k_cache, const T* v_cache, const int32_t* slots,
                        const int32_t* positions, int64_t n, const AttentionShape& s, const KvBlocks& kv) override;
  void sample(int32_t* tokens, double* raw_logprobs, const T* logits, int64_t n, int64_t V, const SamplingOptions& o,
              const double* u) override;

 private:
  static void copy_bytes(void* dst, const void* src, size_t bytes);
  // Per-thread attention scratch: two (query block x max_seq) score tiles per thread.
  // Resizes scratch_, keeping live_bytes() current.
  void resize_scratch(size_t elems);
  std::vector<T> scratch_;
  int64_t scratch_per_thread_ = 0;
  // Grows the scratch when the pool gained threads since planning (set_num_threads); checks
  // that `seq` fits the plan. Allocates only after a thread-count change, never per step.
  void ensure_scratch(int64_t seq);
  T* thread_scratch(int thread) { return scratch_.data() + thread * scratch_per_thread_; }
  // The encoder attention's per-thread scratch (a (seq x rel_rows) p2c table and one query
  // tile's scores), grown when a longer sequence arrives, never per call otherwise.
  std::vector<T> encoder_scratch_;
};

// Bytes the CPU backend holds right now, across every op set: alloc_bytes' live blocks as
// requested (before rounding up to 64 bytes) plus the attention scratch. Tests compare it with
// what the model's memory counters and Model::plan say.
size_t live_bytes();

// Query rows per attention tile: scores for one tile are (kAttnBlock x seq).
constexpr int64_t kAttnBlock = 64;

}  // namespace sppo::cpu
