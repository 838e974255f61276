// The op interface: everything the model needs from a backend. The model (native/model) is
// written once against it; native/cpu implements it for float and double (the double build is
// the gradient-check reference), and the CUDA backend implements it for device memory.
//
// Conventions: row-major; N = tokens (batch * seq); pointers are backend memory; "+=" outputs
// accumulate, the others overwrite. Every op is deterministic for a fixed thread count.
#pragma once
#include <cstddef>
#include <cstdint>

namespace sppo {

// Shape of one attention call. Q, K and V live inside one fused (N, qkv_stride) row per token:
// q heads at column q_off, k heads at k_off, v heads at v_off (head h at +h*head_dim).
struct AttentionShape {
  int64_t batch, seq, heads, kv_heads, head_dim;
  int64_t qkv_stride, q_off, k_off, v_off;
  int64_t out_stride;  // row stride of the (N, heads*head_dim) output
  double scale;        // 1/sqrt(head_dim)
};

template <class T>
class Ops {
 public:
  virtual ~Ops() = default;
  virtual const char* name() const = 0;

  // Memory. alloc returns zeroed, 64-byte aligned storage for n elements.
  virtual T* alloc(size_t n) = 0;
  virtual void free(T* p) = 0;
  // Per-thread scratch the ops need for at most `max_seq` positions; called once at planning.
  virtual size_t plan_scratch(int64_t max_seq, int64_t head_dim) = 0;

  // C(M,N) = alpha*op(A)*op(B) + beta*C (see cpu/gemm.h for the layout contract).
  virtual void gemm(bool transA, bool transB, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
                    int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) = 0;

  virtual void fill(T* x, T value, int64_t n) = 0;
  virtual void copy(T* dst, const T* src, int64_t n) = 0;
  virtual void scale(T* x, T s, int64_t n) = 0;
  // Sum of squares, accumulated in double in a fixed order.
  virtual double sum_squares(const T* x, int64_t n) = 0;
  // True when every element is finite.
  virtual bool all_finite(const T* x, int64_t n) = 0;

  // out(N,C) = table[ids[i]]; dtable(V,C) += scatter of dout by ids.
  virtual void embedding_forward(T* out, const T* table, const int32_t* ids, int64_t N, int64_t C) = 0;
  virtual void embedding_backward(T* dtable, const T* dout, const int32_t* ids, int64_t N, int64_t C) = 0;

  // out = x * rstd * w with rstd = 1/sqrt(mean(x^2) + eps), rstd(N) saved for backward.
  virtual void rmsnorm_forward(T* out, T* rstd, const T* x, const T* w, int64_t N, int64_t C, double eps) = 0;
  // dx(N,C) += dL/dx; dw(C) += dL/dw.
  virtual void rmsnorm_backward(T* dx, T* dw, const T* dout, const T* x, const T* w, const T* rstd, int64_t N,
                                int64_t C) = 0;

  // x(N,C) += bias(C) on each row; dbias(C) += column sums of dout(N,C) (row stride ld).
  virtual void add_bias(T* x, const T* bias, int64_t N, int64_t C, int64_t ld) = 0;
  virtual void bias_backward(T* dbias, const T* dout, int64_t N, int64_t C, int64_t ld) = 0;

  // Rotary embedding (Hugging Face rotate-half) in place on `heads` heads of each row of x,
  // starting at column `off` (row stride ld). Token i has position positions[i]; cos/sin are
  // (max_pos, head_dim/2) tables. inverse=true applies the transpose (the backward pass).
  virtual void rope(T* x, int64_t N, int64_t ld, int64_t off, int64_t heads, int64_t head_dim,
                    const int32_t* positions, const T* cos, const T* sin, bool inverse) = 0;

  // Causal grouped-query attention over fused qkv rows; out(N, heads*head_dim), lse(B,H,T) saved.
  virtual void attention_forward(T* out, T* lse, const T* qkv, const AttentionShape& s) = 0;
  // dqkv(N, qkv_stride) = gradients for q, k, v (overwritten; other columns untouched).
  virtual void attention_backward(T* dqkv, const T* dout, const T* qkv, const T* out, const T* lse,
                                  const AttentionShape& s) = 0;

  // gu(N, 2F) holds [gate | up]; out(N,F) = silu(gate) * up; dgu from dout.
  virtual void swiglu_forward(T* out, const T* gu, int64_t N, int64_t F) = 0;
  virtual void swiglu_backward(T* dgu, const T* dout, const T* gu, int64_t N, int64_t F) = 0;

  // The fused LM head: for n hidden rows H(n,C) and the output embedding W(V,C), the target
  // log-probabilities logp[i] = log softmax(H_i Wᵀ)[targets[i]] (double), and lse[i] saved for
  // the backward. Logits exist only a tile at a time, in `scratch_elems` elements of scratch;
  // the log-sum-exp runs online across vocabulary tiles.
  virtual void head_logprobs(double* logp, double* lse, const T* H, const T* W, const int32_t* targets, int64_t n,
                             int64_t C, int64_t V, T* scratch, int64_t scratch_elems) = 0;
  // Its backward for per-row coefficients coef[i] = dL/dlogp[i]: dlogits = coef·(onehot − softmax),
  // recomputed chunk by chunk from lse; dH(n,C) = dlogits·W (overwritten), dW(V,C) += dlogitsᵀ·H.
  virtual void head_logprobs_backward(T* dH, T* dW, const T* H, const T* W, const int32_t* targets,
                                      const double* lse, const double* coef, int64_t n, int64_t C, int64_t V,
                                      T* scratch, int64_t scratch_elems) = 0;

  // Optimizer updates (element-wise; grad already scaled by the caller's clip factor `gscale`).
  // AdamW: m,v moments with bias correction (step is 1-based). RMSprop: PyTorch's, non-centred.
  // `decay` is the decoupled weight-decay factor lr*wd (0 for norms and biases).
  virtual void adamw_update(T* p, const T* g, T* m, T* v, int64_t n, double lr, double beta1, double beta2,
                            double eps, double decay, double gscale, int64_t step) = 0;
  virtual void rmsprop_update(T* p, const T* g, T* sq, int64_t n, double lr, double alpha, double eps,
                              double decay, double gscale) = 0;

  // ---- Decoding with a KV cache (batched sampling) ----
  // Rows are new tokens of sequences held in a KV cache: row i is fused qkv as above, belongs to
  // cache slot slots[i] and sits at position positions[i]. A layer's cache holds k and v, each
  // (s.batch slots, kv_heads, s.seq positions, head_dim): a head's keys are contiguous.
  // Writes the (already rotated) k and v heads of the n rows into their slots and positions.
  virtual void kv_cache_write(T* k_cache, T* v_cache, const T* qkv, const int32_t* slots, const int32_t* positions,
                              int64_t n, const AttentionShape& s) = 0;
  // out(n, heads*head_dim): each row's q heads attend to its slot's cached positions
  // 0..positions[i] (so causal, and blind to other slots and to stale entries past its position).
  // Every row's own k and v must be in the cache first. A row's result depends only on that row
  // and its slot's cache, never on the other rows of the call.
  virtual void attention_decode(T* out, const T* qkv, const T* k_cache, const T* v_cache, const int32_t* slots,
                                const int32_t* positions, int64_t n, const AttentionShape& s) = 0;
};

}  // namespace sppo
