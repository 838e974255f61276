// The CUDA backend: the op interface for bf16 storage on one NVIDIA GPU (fp32 math and fp32
// Master precision; see ops/ops.h). Its members are implemented across native/cuda/*.cu, one
// file per family (core + element-wise + GEMM, LM head + sampler) or folder (attention/: its
// implementations, decode and dispatch); each family keeps its private state in its own struct
// behind a unique_ptr, so the families do not share more than this declaration and
// cuda_common.cuh.
#pragma once
#include <cuda_runtime.h>

#include <memory>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "cuda/cuda_backend.h"
#include "ops/ops.h"

namespace sppo::cuda {

struct GemmState;    // cuda_gemm.cu: the cuBLASLt handle (loaded with dlopen), workspace
struct ReduceState;  // cuda_ops.cu: partial-sum buffers of the deterministic reductions
struct AttnState;    // attention/attention.cuh: row deltas, decode partials, the kernel choice
struct HeadState;    // cuda_head.cu: per-row buffers of the fused head and the sampler
// Each family's .cu file defines StateDeleter<ItsState>::operator() (where the type is complete).
template <class S>
struct StateDeleter {
  void operator()(S* s) const;
};
template <class S>
using StatePtr = std::unique_ptr<S, StateDeleter<S>>;

class CudaOps final : public Ops<bf16> {
 public:
  explicit CudaOps(int device, bool record_graphs = true);
  ~CudaOps() override;
  const char* name() const override { return "cuda"; }
  std::unique_ptr<Ops<bf16>> fresh() const override { return std::make_unique<CudaOps>(device_, record_graphs_); }
  cudaStream_t stream() const { return stream_; }
  int device() const { return device_; }

  void synchronize() override;
  bool graph_capture_begin(uint64_t key) override;  // cuda_ops.cu
  bool graph_capture_end(uint64_t key) override;
  bool graph_replay(uint64_t key) override;
  int64_t head_scratch_elems() const override { return footprint().head_scratch_elems; }  // cuda_backend.h
  void* alloc_bytes(size_t bytes) override;
  void free_bytes(void* p) override;
  size_t plan_scratch(int64_t max_seq, int64_t head_dim) override;
  void upload_bytes(void* dst, const void* src, size_t bytes) override;
  void download_bytes(void* dst, const void* src, size_t bytes) override;
  void upload(bf16* dst, const float* src, int64_t n) override;
  void download(float* dst, const bf16* src, int64_t n) override;
  void cast(bf16* dst, const float* src, int64_t n) override;

  void gemm(bool transA, bool transB, int64_t M, int64_t N, int64_t K, double alpha, const bf16* A, int64_t lda,
            const bf16* B, int64_t ldb, double beta, bf16* C, int64_t ldc) override;
  void gemm_master(bool transA, bool transB, int64_t M, int64_t N, int64_t K, double alpha, const bf16* A, int64_t lda,
                   const bf16* B, int64_t ldb, double beta, float* C, int64_t ldc) override;
  // The same contract with fp32 A, B and C and full fp32 math (no TF32): the GEMM of the fp32
  // encoder op set (cuda_encoder.cu), on this op set's stream and cuBLASLt handle.
  void gemm_fp32(bool transA, bool transB, int64_t M, int64_t N, int64_t K, double alpha, const float* A, int64_t lda,
                 const float* B, int64_t ldb, double beta, float* C, int64_t ldc);

  void fill(bf16* x, double value, int64_t n) override;
  void zero_bytes(void* x, size_t bytes) override;
  void copy(bf16* dst, const bf16* src, int64_t n) override;
  double sum_squares(const float* x, int64_t n) override;
  bool all_finite(const float* x, int64_t n) override;

  void embedding_backward(float* dtable, const bf16* dout, const int32_t* ids, int64_t N, int64_t C) override;
  void gather_rows(bf16* dst, const bf16* src, const int32_t* rows, int64_t n, int64_t C) override;
  void scatter_rows(bf16* dst, const bf16* src, const int32_t* rows, int64_t n, int64_t C) override;

  void rmsnorm_forward(bf16* out, float* rstd, const bf16* x, const bf16* w, int64_t N, int64_t C, double eps) override;
  void rmsnorm_backward(bf16* dx, float* dw, const bf16* dout, const bf16* x, const bf16* w, const float* rstd,
                        int64_t N, int64_t C) override;
  void add_bias(bf16* x, const bf16* bias, int64_t N, int64_t C, int64_t ld) override;
  void bias_backward(float* dbias, const bf16* dout, int64_t N, int64_t C, int64_t ld) override;
  void rope(bf16* x, int64_t N, int64_t ld, int64_t off, int64_t heads, int64_t head_dim, const int32_t* positions,
            const float* cos, const float* sin, bool inverse) override;

  void attention_forward(bf16* out, float* lse, const bf16* qkv, const AttentionShape& s) override;
  void attention_backward(bf16* dqkv, const bf16* dout, const bf16* qkv, const bf16* out, const float* lse,
                          const AttentionShape& s) override;

  void swiglu_forward(bf16* out, const bf16* gu, int64_t N, int64_t F) override;
  void swiglu_backward(bf16* dgu, const bf16* dout, const bf16* gu, int64_t N, int64_t F) override;

  void head_logprobs(double* logp, double* lse, const bf16* H, const bf16* W, const int32_t* targets, int64_t n,
                     int64_t C, int64_t V, float* scratch, int64_t scratch_elems) override;
  void head_logprobs_backward(bf16* dH, float* dW, const bf16* H, const bf16* W, const int32_t* targets,
                              const double* lse, const double* coef, int64_t n, int64_t C, int64_t V, float* scratch,
                              int64_t scratch_elems) override;

  void adamw_update(bf16* p, float* master, const float* g, float* m, float* v, int64_t n, double lr, double beta1,
                    double beta2, double eps, double decay, double gscale, int64_t step) override;
  void rmsprop_update(bf16* p, float* master, const float* g, float* sq, int64_t n, double lr, double alpha, double eps,
                      double decay, double gscale) override;
  bool adamw_update_finite(const bf16* p, const float* master, const float* g, const float* m, const float* v,
                           int64_t n, double lr, double beta1, double beta2, double eps, double decay, double gscale,
                           int64_t step) override;
  bool rmsprop_update_finite(const bf16* p, const float* master, const float* g, const float* sq, int64_t n, double lr,
                             double alpha, double eps, double decay, double gscale) override;
  void add_round(bf16* g, const float* x, int64_t n) override;
  double sum_squares(const bf16* x, int64_t n) override;
  void adamw_update(bf16* p, float* master, const bf16* g, float* m, float* v, int64_t n, double lr, double beta1,
                    double beta2, double eps, double decay, double gscale, int64_t step) override;
  void rmsprop_update(bf16* p, float* master, const bf16* g, float* sq, int64_t n, double lr, double alpha, double eps,
                      double decay, double gscale) override;
  bool adamw_update_finite(const bf16* p, const float* master, const bf16* g, const float* m, const float* v, int64_t n,
                           double lr, double beta1, double beta2, double eps, double decay, double gscale,
                           int64_t step) override;
  bool rmsprop_update_finite(const bf16* p, const float* master, const bf16* g, const float* sq, int64_t n, double lr,
                             double alpha, double eps, double decay, double gscale) override;

  // the encoder's ops (cuda_encoder.cu)
  void layernorm_forward(bf16* out, const bf16* x, const bf16* residual, const bf16* w, const bf16* b, int64_t N,
                         int64_t C, double eps) override;
  void gelu_forward(bf16* x, int64_t n) override;
  void disentangled_attention_forward(bf16* out, const bf16* qkv, const bf16* rel, const int32_t* rel_index,
                                      int64_t rel_center, int64_t rel_rows, const int32_t* lengths,
                                      const AttentionShape& s) override;

  void kv_cache_write(bf16* k_cache, bf16* v_cache, const bf16* qkv, const int32_t* slots, const int32_t* positions,
                      int64_t n, const AttentionShape& s, const KvBlocks& kv) override;
  void attention_decode(bf16* out, const bf16* qkv, const bf16* k_cache, const bf16* v_cache, const int32_t* slots,
                        const int32_t* positions, int64_t n, const AttentionShape& s, const KvBlocks& kv) override;
  void sample(int32_t* tokens, double* raw_logprobs, const float* logits, int64_t n, int64_t V,
              const SamplingOptions& o, const double* u) override;

 private:
  int device_ = 0;
  cudaStream_t stream_ = nullptr;
  bool record_graphs_ = true;
  struct Recording {
    cudaGraphExec_t exec;
    uint64_t scratch_generation;  // scratch_generation() when recorded (cuda_common.cuh)
  };
  std::unordered_map<uint64_t, Recording> graphs_;
  std::unordered_set<uint64_t> graph_failed_;  // keys whose recording failed: never tried again
  void drop_graphs();
  StatePtr<GemmState> gemm_;
  StatePtr<ReduceState> reduce_;
  StatePtr<AttnState> attn_;
  StatePtr<HeadState> head_;
  // A whole-array reduction (cuda_ops.cu): `kernel` writes one partial per block of its fixed
  // grid; returns them, read back in block order.
  template <class X>
  const std::vector<double>& reduce_blocks(void (*kernel)(double*, const X*, int64_t), const X* x, int64_t n);
  // The optimizer updates and their dry runs, for fp32 or bf16 (__nv_bfloat16) gradients G.
  template <class G>
  void adamw_launch(bf16* p, float* master, const G* g, float* m, float* v, int64_t n, double lr, double beta1,
                    double beta2, double eps, double decay, double gscale, int64_t step);
  template <class G>
  void rmsprop_launch(bf16* p, float* master, const G* g, float* sq, int64_t n, double lr, double alpha, double eps,
                      double decay, double gscale);
  template <class G>
  bool adamw_finite_launch(const bf16* p, const float* master, const G* g, const float* m, const float* v, int64_t n,
                           double lr, double beta1, double beta2, double eps, double decay, double gscale,
                           int64_t step);
  template <class G>
  bool rmsprop_finite_launch(const bf16* p, const float* master, const G* g, const float* sq, int64_t n, double lr,
                             double alpha, double eps, double decay, double gscale);
  // Family states, created on first use (each .cu file defines its own accessor).
  GemmState& gemm_state();
  ReduceState& reduce_state();
  AttnState& attn_state();
  HeadState& head_state();
};

}  // namespace sppo::cuda
