// The op interface: everything the model needs from a backend. The model (native/model) is
// written once against it; native/cpu implements it for float and double, native/cuda for bf16
// on NVIDIA GPUs.
//
// Conventions: row-major; N = tokens (batch * seq); "+=" outputs accumulate, the others
// overwrite. Every op is deterministic for a fixed thread count (CPU) or device (CUDA).
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "core/bf16.h"
#include "core/error.h"

namespace sppo {

// Shape of one attention call. Q, K and V live inside one fused (N, qkv_stride) row per token:
// q heads at column q_off, k heads at k_off, v heads at v_off (head h at +h*head_dim).
struct AttentionShape {
  int64_t batch, seq, heads, kv_heads, head_dim;
  int64_t qkv_stride, q_off, k_off, v_off;
  int64_t out_stride;  // row stride of the (N, heads*head_dim) output
  double scale;        // 1/sqrt(head_dim)
};

// A paged KV cache (model/generate.cpp plans it): a layer's keys, and its values, live in a pool
// of `blocks` fixed-size blocks, each (kv_heads, block_size, head_dim), so a head's keys within a
// block are contiguous. Position p of block-table row r lies at offset p % block_size of block
// tables[r * max_blocks + p / block_size]. Blocks may be shared between table rows (a prompt's
// prefix), so a block's contents never depend on which row reads them.
struct KvBlocks {
  const int32_t* tables = nullptr;  // (table rows, max_blocks), backend memory
  int64_t blocks = 0;               // blocks in the pool
  int64_t block_size = 0;           // positions per block
  int64_t max_blocks = 0;           // entries per table row
};

struct SamplingOptions;  // sppo/generate.h

// T is the storage type of parameters and activations: float or double on the CPU (the double
// build is the gradient-check reference), bf16 on CUDA (and float for CUDA's encoder op set). Master = master_t<T> (core/bf16.h) is the
// precision of everything that accumulates or must not round: master weights, gradients,
// optimizer state, RMSNorm statistics, attention log-sum-exps, logits; it is T itself for float
// and double, float for bf16.
//
// Where memory lives: every tensor pointer, and the int32 index arrays (ids, positions, targets,
// rows, slots) and the double per-row arrays of the head ops, are backend memory (host memory on
// the CPU, device memory on CUDA), allocated with alloc_bytes. Host memory appears only where a
// parameter says so: the sources and destinations of upload / download, and sample()'s draws and
// results. Calls run in order on the backend; download and sample return once their results are
// on the host.
//
// EncoderOps is the part of the interface the encoder (model/encoder.cpp, inference only) uses:
// memory, transfers, GEMM, bias, row gathers and the encoder's own ops. Ops extends it with what
// the decoder model, its training and its sampling need. A backend may implement EncoderOps
// alone: CUDA's fp32 encoder op set does (cuda/cuda_backend.h), so PairRM can run fp32 on a GPU
// without a full fp32 CUDA backend.
template <class T>
class EncoderOps {
 public:
  using Master = master_t<T>;
  virtual ~EncoderOps() = default;
  virtual const char* name() const = 0;

  // Memory: zeroed backend storage of `bytes` bytes, 64-byte aligned. Failure throws sppo::Error
  // naming the size (out of memory included).
  virtual void* alloc_bytes(size_t bytes) = 0;
  virtual void free_bytes(void* p) = 0;
  // Byte copies host -> backend and backend -> host.
  virtual void upload_bytes(void* dst, const void* src, size_t bytes) = 0;
  virtual void download_bytes(void* dst, const void* src, size_t bytes) = 0;
  // Host Master values -> backend T (rounded), and backend T -> host Master.
  virtual void upload(T* dst, const Master* src, int64_t n) = 0;
  virtual void download(Master* dst, const T* src, int64_t n) = 0;

  // C(M,N) = alpha*op(A)*op(B) + beta*C (row-major; see cpu/gemm.h for the layout contract).
  virtual void gemm(bool transA, bool transB, int64_t M, int64_t N, int64_t K, double alpha, const T* A, int64_t lda,
                    const T* B, int64_t ldb, double beta, T* C, int64_t ldc) = 0;
  // x(N,C) += bias(C) on each row (row stride ld).
  virtual void add_bias(T* x, const T* bias, int64_t N, int64_t C, int64_t ld) = 0;
  // dst(n,C) = src[rows[i]] (gather; the embedding lookup too).
  virtual void gather_rows(T* dst, const T* src, const int32_t* rows, int64_t n, int64_t C) = 0;

  // ---- The encoder's own ops (DeBERTa-v3) ----
  // Backends without them throw sppo::Error naming the op and the backend.
  // out(N,C) = LayerNorm(x + residual) * w + b over each row, statistics in Master precision;
  // residual may be null, out may alias x or residual.
  virtual void layernorm_forward(T* out, const T* x, const T* residual, const T* w, const T* b, int64_t N, int64_t C,
                                 double eps) {
    unsupported("layernorm_forward");
  }
  // x(n) = gelu(x) = x·Φ(x) with the exact erf, in place.
  virtual void gelu_forward(T* x, int64_t n) { unsupported("gelu_forward"); }
  // DeBERTa's disentangled self-attention, non-causal, one (batch, head) at a time. q, k, v are
  // fused rows as in attention_forward (heads == kv_heads); rel(rel_rows, 2*heads*head_dim) holds
  // the relative embeddings projected by the query projection (columns [0, H*D): Qr) and the key
  // projection ([H*D, 2*H*D): Kr). For query i and key j of a row, with d = rel_index[rel_center
  // + i - j] (the bucketed, clamped relative position, computed by the caller, in [0, rel_rows)):
  //   S[i,j] = scale * (q_i·k_j + q_i·Kr[d] + k_j·Qr[d])    (content, c2p, p2c)
  // Keys j >= lengths[b] are masked; query rows i >= lengths[b] get out = 0. lengths is (batch)
  // int32 backend memory, each in [1, seq]; rel_index covers i - j in [-(seq-1), seq-1].
  virtual void disentangled_attention_forward(T* out, const T* qkv, const T* rel, const int32_t* rel_index,
                                              int64_t rel_center, int64_t rel_rows, const int32_t* lengths,
                                              const AttentionShape& s) {
    unsupported("disentangled_attention_forward");
  }

 protected:
  [[noreturn]] void unsupported(const char* op) const {
    throw Error(std::string("the ") + name() + " backend has no " + op + " (the encoder's ops)");
  }
};

template <class T>
class Ops : public EncoderOps<T> {
 public:
  using Master = master_t<T>;
  // A new op set on the same backend and device, with its own scratch (and stream).
  virtual std::unique_ptr<Ops<T>> fresh() const = 0;
  // Elements of Master scratch the model should give the fused head (head_logprobs) per call:
  // the logits tile. Cache-sized on the CPU; on a GPU large enough that each tile's GEMMs fill it.
  virtual int64_t head_scratch_elems() const = 0;
  // Returns once every call made so far has finished (device work included). Needed where two
  // op sets share memory: one's writes are not ordered before the other's reads otherwise.
  virtual void synchronize() {}

  // Recorded op sequences (CUDA graphs on a GPU; the CPU records nothing). Between
  // graph_capture_begin(key) and graph_capture_end(key) the calls are recorded, not run, so they
  // must be device work only (no download, sample or other host round trip) whose scratch is
  // already allocated (run the same sequence once before recording it). graph_replay(key) runs
  // the recording, reading whatever its buffers hold then. capture_begin returns false where
  // recording is unsupported, disabled (SPPO_CUDA_GRAPHS=0) or failed before for `key`;
  // capture_end returns whether the recording is usable (a recording that failed is dropped and
  // the calls must be made again); replay returns false when there is no usable recording (one
  // whose scratch was reallocated since is dropped).
  virtual bool graph_capture_begin(uint64_t key) { return false; }
  virtual bool graph_capture_end(uint64_t key) { return false; }
  virtual bool graph_replay(uint64_t key) { return false; }

  // Weights packed once for repeated x·Wᵀ (a generator's decode steps; cpu/gemm.h pack_weight):
  // W (N, K) copied into the layout the backend's GEMM would otherwise pack it into on every call.
  // packed_weight_bytes: the copy's size, 0 where the backend has no such layout (it is then never
  // asked to pack); the plan counts it (BackendFootprint::packed_weight_bytes). A generator packs
  // at a step of packed_weight_min_rows() rows or more (below, a call's steps do not repay the
  // pass over W) and then reads the copy at every step, whatever its rows.
  // gemm_packed_weight: C(M, N) = A(M, K)·Wᵀ + beta·C, each row bit-identical to
  // gemm(false, true, M, N, K, 1, A, K, W, K, beta, C, ldc) whatever M is.
  virtual size_t packed_weight_bytes(int64_t N, int64_t K) const { return 0; }
  virtual int64_t packed_weight_min_rows() const { return 1; }
  virtual void pack_weight(void* dst, const T* W, int64_t N, int64_t K) {
    throw Error(std::string("the ") + this->name() + " backend has no packed weights");
  }
  virtual void gemm_packed_weight(int64_t M, int64_t N, int64_t K, const T* A, const T* W, const void* packed,
                                  double beta, T* C, int64_t ldc) {
    throw Error(std::string("the ") + this->name() + " backend has no packed weights");
  }

  // Per-thread scratch the ops need for at most `max_seq` positions; called once at planning.
  // Returns the bytes it set aside.
  virtual size_t plan_scratch(int64_t max_seq, int64_t head_dim) = 0;
  // dst(n) = T(src(n)), both backend memory: refreshes working weights from master weights.
  virtual void cast(T* dst, const Master* src, int64_t n) = 0;

  // The same with C in Master precision (weight gradients accumulate in it, logits land in it).
  virtual void gemm_master(bool transA, bool transB, int64_t M, int64_t N, int64_t K, double alpha, const T* A,
                           int64_t lda, const T* B, int64_t ldb, double beta, Master* C, int64_t ldc) = 0;

  virtual void fill(T* x, double value, int64_t n) = 0;
  virtual void zero_bytes(void* x, size_t bytes) = 0;
  virtual void copy(T* dst, const T* src, int64_t n) = 0;
  // Sum of squares, accumulated in double in a fixed order (so it is the same run to run).
  virtual double sum_squares(const Master* x, int64_t n) = 0;
  // True when every element is finite.
  virtual bool all_finite(const Master* x, int64_t n) = 0;

  // dtable(V,C) += scatter of dout by ids: the backward of the embedding lookup, which is
  // gather_rows(out, table, ids, N, C).
  virtual void embedding_backward(Master* dtable, const T* dout, const int32_t* ids, int64_t N, int64_t C) = 0;
  // dst[rows[i]] = src(n,C): the scatter of gather_rows (other rows of dst untouched).
  virtual void scatter_rows(T* dst, const T* src, const int32_t* rows, int64_t n, int64_t C) = 0;

  // out = x * rstd * w with rstd = 1/sqrt(mean(x^2) + eps), rstd(N) saved for backward.
  virtual void rmsnorm_forward(T* out, Master* rstd, const T* x, const T* w, int64_t N, int64_t C, double eps) = 0;
  // dx(N,C) += dL/dx; dw(C) += dL/dw, unless dw is null (a frozen weight: dx alone).
  virtual void rmsnorm_backward(T* dx, Master* dw, const T* dout, const T* x, const T* w, const Master* rstd, int64_t N,
                                int64_t C) = 0;

  // dbias(C) += column sums of dout(N,C) (row stride ld): the backward of add_bias.
  virtual void bias_backward(Master* dbias, const T* dout, int64_t N, int64_t C, int64_t ld) = 0;

  // Rotary embedding (Hugging Face rotate-half) in place on `heads` heads of each row of x,
  // starting at column `off` (row stride ld). Token i has position positions[i]; cos/sin are
  // (max_pos, head_dim/2) tables. inverse=true applies the transpose (the backward pass).
  virtual void rope(T* x, int64_t N, int64_t ld, int64_t off, int64_t heads, int64_t head_dim, const int32_t* positions,
                    const Master* cos, const Master* sin, bool inverse) = 0;

  // Causal grouped-query attention over fused qkv rows; out(N, heads*head_dim), lse(B,H,T) saved.
  virtual void attention_forward(T* out, Master* lse, const T* qkv, const AttentionShape& s) = 0;
  // dqkv(N, qkv_stride) = gradients for q, k, v (overwritten; other columns untouched).
  virtual void attention_backward(T* dqkv, const T* dout, const T* qkv, const T* out, const Master* lse,
                                  const AttentionShape& s) = 0;

  // gu(N, 2F) holds [gate | up]; out(N,F) = silu(gate) * up; dgu from dout.
  virtual void swiglu_forward(T* out, const T* gu, int64_t N, int64_t F) = 0;
  virtual void swiglu_backward(T* dgu, const T* dout, const T* gu, int64_t N, int64_t F) = 0;

  // The fused LM head: for n hidden rows H(n,C) and the output embedding W(V,C), the target
  // log-probabilities logp[i] = log softmax(H_i Wᵀ)[targets[i]] (double), and lse[i] saved for
  // the backward. Logits exist only a tile at a time, in `scratch_elems` elements of scratch;
  // the log-sum-exp runs online across vocabulary tiles.
  virtual void head_logprobs(double* logp, double* lse, const T* H, const T* W, const int32_t* targets, int64_t n,
                             int64_t C, int64_t V, Master* scratch, int64_t scratch_elems) = 0;
  // Its backward for per-row coefficients coef[i] = dL/dlogp[i]: dlogits = coef·(onehot − softmax),
  // recomputed chunk by chunk from lse; dH(n,C) = dlogits·W (overwritten), dW(V,C) += dlogitsᵀ·H
  // unless dW is null (a frozen head: no dW GEMM).
  virtual void head_logprobs_backward(T* dH, Master* dW, const T* H, const T* W, const int32_t* targets,
                                      const double* lse, const double* coef, int64_t n, int64_t C, int64_t V,
                                      Master* scratch, int64_t scratch_elems) = 0;

  // Optimizer updates (element-wise; grad already scaled by the caller's clip factor `gscale`).
  // AdamW: m,v moments with bias correction (step is 1-based). RMSprop: PyTorch's, non-centred.
  // `decay` is the decoupled weight-decay factor lr*wd (0 for norms and biases). With master
  // weights (`master` not null) the update applies to them and p becomes T(master); without,
  // p itself is the master copy (Master == T).
  virtual void adamw_update(T* p, Master* master, const Master* g, Master* m, Master* v, int64_t n, double lr,
                            double beta1, double beta2, double eps, double decay, double gscale, int64_t step) = 0;
  virtual void rmsprop_update(T* p, Master* master, const Master* g, Master* sq, int64_t n, double lr, double alpha,
                              double eps, double decay, double gscale) = 0;
  // Dry runs of the two updates with the same arguments: whether every value the update would
  // write (m and v or sq, the master weights, p as T) is finite. They read and write nothing
  // else, and compute each element exactly as the update does, so a step they pass cannot write
  // an infinity or a NaN. The model runs them only when its bound on the step's scalars cannot
  // rule overflow out (model/optimizer.cpp, sppo/optimizer_bound.h).
  virtual bool adamw_update_finite(const T* p, const Master* master, const Master* g, const Master* m, const Master* v,
                                   int64_t n, double lr, double beta1, double beta2, double eps, double decay,
                                   double gscale, int64_t step) = 0;
  virtual bool rmsprop_update_finite(const T* p, const Master* master, const Master* g, const Master* sq, int64_t n,
                                     double lr, double alpha, double eps, double decay, double gscale) = 0;

  // ---- Gradients accumulated in bf16 (MemoryPlan::bf16_gradients) ----
  // The model computes each micro-batch's weight gradients in Master precision into scratch and
  // adds them into its bf16 gradient buffer here: g(n) = bf16(float(g) + x), the sum rounded to
  // float, then to bf16 to nearest even (one bf16 rounding per element and call; CPU and CUDA
  // give the same bits).
  virtual void add_round(bf16* g, const Master* x, int64_t n) = 0;
  // The readers of such a buffer: sum_squares and the updates and their dry runs as above, each
  // gradient element widened to Master first (exactly), then the same arithmetic. So clipping
  // divides by the norm of the very values the update applies.
  virtual double sum_squares(const bf16* x, int64_t n) = 0;
  virtual void adamw_update(T* p, Master* master, const bf16* g, Master* m, Master* v, int64_t n, double lr,
                            double beta1, double beta2, double eps, double decay, double gscale, int64_t step) = 0;
  virtual void rmsprop_update(T* p, Master* master, const bf16* g, Master* sq, int64_t n, double lr, double alpha,
                              double eps, double decay, double gscale) = 0;
  virtual bool adamw_update_finite(const T* p, const Master* master, const bf16* g, const Master* m, const Master* v,
                                   int64_t n, double lr, double beta1, double beta2, double eps, double decay,
                                   double gscale, int64_t step) = 0;
  virtual bool rmsprop_update_finite(const T* p, const Master* master, const bf16* g, const Master* sq, int64_t n,
                                     double lr, double alpha, double eps, double decay, double gscale) = 0;

  // ---- Decoding with a paged KV cache (batched sampling) ----
  // Rows are new tokens of sequences held in a paged KV cache (KvBlocks): row i is fused qkv as
  // above, belongs to block-table row slots[i] and sits at position positions[i]. s.batch is the
  // number of table rows and s.seq the positions a table row may address (at most
  // kv.max_blocks * kv.block_size).
  // Writes the (already rotated) k and v heads of the n rows into their blocks.
  virtual void kv_cache_write(T* k_cache, T* v_cache, const T* qkv, const int32_t* slots, const int32_t* positions,
                              int64_t n, const AttentionShape& s, const KvBlocks& kv) = 0;
  // out(n, heads*head_dim): each row's q heads attend to its table row's positions
  // 0..positions[i] (so causal, and blind to other table rows and to stale entries past its
  // position). Every row's own k and v must be in the cache first. A row's result depends only
  // on that row and the keys and values its table points to, never on the other rows of the call
  // nor on which blocks hold them.
  virtual void attention_decode(T* out, const T* qkv, const T* k_cache, const T* v_cache, const int32_t* slots,
                                const int32_t* positions, int64_t n, const AttentionShape& s, const KvBlocks& kv) = 0;
  // Samples one token from each row of logits(n, V) (backend) as sample_token (cpu/sampler.h)
  // specifies, row i with the uniform draw u[i] in (0,1); tokens[i] and raw_logprobs[i] (log
  // softmax of the unmodified logits at the token) are host arrays, as is u.
  virtual void sample(int32_t* tokens, double* raw_logprobs, const Master* logits, int64_t n, int64_t V,
                      const SamplingOptions& o, const double* u) = 0;
};

}  // namespace sppo
