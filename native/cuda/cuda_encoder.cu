// CUDA kernels of the encoder's ops (DeBERTa-v3, inference only; ops/ops.h's EncoderOps):
// LayerNorm with a fused residual, exact-erf GELU, and disentangled attention, each templated on
// the storage type S (bf16 for CudaOps, float for the fp32 encoder op set below), fp32 math in
// both. The attention kernel is the plain one — a block per query row, its scores in shared
// memory — the reference the faster ones will be checked against (cuda_encoder_test.cpp checks
// it against the CPU backend); its cost is a D-long dot product per (query, key) for each of the
// three terms.
//
// CudaEncoderOpsF32 is PairRM's precision 'fp32' on a GPU: an EncoderOps<float> over a CudaOps
// (its device, stream, memory, transfers and cuBLASLt handle), with fp32 GEMMs (no TF32), so
// its results match the CPU's float32 encoder to float rounding.
#include <cuda_bf16.h>

#include <cfloat>

#include "cuda/cuda_common.cuh"
#include "cuda/cuda_ops.cuh"

namespace sppo::cuda {

namespace {

using bf = __nv_bfloat16;
constexpr int kThreads = 256;

// Storage <-> fp32: bf16 rounds to nearest even on the way in, float is itself.
__device__ __forceinline__ float ld(bf v) { return __bfloat162float(v); }
__device__ __forceinline__ float ld(float v) { return v; }
template <class S>
__device__ __forceinline__ S st(float v);
template <>
__device__ __forceinline__ bf st<bf>(float v) {
  return __float2bfloat16(v);
}
template <>
__device__ __forceinline__ float st<float>(float v) {
  return v;
}

// The sum of `v` over the block (every thread gets it); `red` holds kThreads / 32 floats.
__device__ float block_sum(float v, float* red) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // red may still be read by the previous call
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float s = 0;
  for (int w = 0; w < int(blockDim.x / 32); ++w) s += red[w];
  return s;
}

__device__ float block_max(float v, float* red) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float m = -FLT_MAX;
  for (int w = 0; w < int(blockDim.x / 32); ++w) m = fmaxf(m, red[w]);
  return m;
}

// One block per row; the row (x + residual, summed in fp32: for float storage the CPU's T(x + r))
// is kept in shared memory (C floats), so out may alias x or residual.
template <class S>
__global__ void layernorm_kernel(S* out, const S* x, const S* residual, const S* w, const S* b, int64_t C, float eps) {
  extern __shared__ float row[];
  __shared__ float red[kThreads / 32];
  const int64_t i = blockIdx.x;
  float s = 0;
  for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
    float v = ld(x[i * C + j]);
    if (residual) v += ld(residual[i * C + j]);
    row[j] = v;
    s += v;
  }
  const float mean = block_sum(s, red) / float(C);
  float q = 0;
  for (int64_t j = threadIdx.x; j < C; j += blockDim.x) q += (row[j] - mean) * (row[j] - mean);
  const float rstd = rsqrtf(block_sum(q, red) / float(C) + eps);
  for (int64_t j = threadIdx.x; j < C; j += blockDim.x)
    out[i * C + j] = st<S>((row[j] - mean) * rstd * ld(w[j]) + ld(b[j]));
}

template <class S>
__global__ void gelu_kernel(S* x, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float v = ld(x[i]);
    x[i] = st<S>(0.5f * v * (1.0f + erff(v * 0.70710678118654752f)));
  }
}

// One block per (row b, head h, query i). Scores for keys j < lengths[b] in shared memory
// (seq floats), then softmax and P·V; a padding query writes zeros.
template <class S>
__global__ void disentangled_attention_kernel(S* out, const S* qkv, const S* rel, const int32_t* rel_index,
                                              int64_t rel_center, const int32_t* lengths, int64_t seq, int64_t heads,
                                              int64_t D, int64_t qkv_stride, int64_t q_off, int64_t k_off,
                                              int64_t v_off, int64_t out_stride, float scale) {
  extern __shared__ float smem[];  // q (D floats), then the scores (seq floats)
  __shared__ float red[kThreads / 32];
  const int64_t i = blockIdx.x % seq, h = (blockIdx.x / seq) % heads, b = blockIdx.x / (seq * heads);
  const int64_t len = lengths[b], HD = heads * D;
  S* o = out + (b * seq + i) * out_stride + h * D;
  if (i >= len) {
    for (int64_t k = threadIdx.x; k < D; k += blockDim.x) o[k] = st<S>(0.f);
    return;
  }
  float* q = smem;
  float* s = smem + D;
  const S* base = qkv + b * seq * qkv_stride;
  for (int64_t k = threadIdx.x; k < D; k += blockDim.x) q[k] = ld(base[i * qkv_stride + q_off + h * D + k]);
  __syncthreads();
  float mx = -FLT_MAX;
  for (int64_t j = threadIdx.x; j < len; j += blockDim.x) {
    const int32_t d = rel_index[rel_center + i - j];
    const S* kj = base + j * qkv_stride + k_off + h * D;
    const S* qr = rel + d * 2 * HD + h * D;       // Qr[d]
    const S* kr = rel + d * 2 * HD + HD + h * D;  // Kr[d]
    float acc = 0;
    for (int64_t k = 0; k < D; ++k) {
      const float kv = ld(kj[k]);
      acc += q[k] * (kv + ld(kr[k])) + kv * ld(qr[k]);
    }
    s[j] = acc * scale;
    mx = fmaxf(mx, s[j]);
  }
  mx = block_max(mx, red);
  float sum = 0;
  for (int64_t j = threadIdx.x; j < len; j += blockDim.x) sum += (s[j] = expf(s[j] - mx));
  const float inv = 1.f / block_sum(sum, red);  // block_sum's barrier also orders the s[j] writes
  for (int64_t k = threadIdx.x; k < D; k += blockDim.x) {
    float acc = 0;
    for (int64_t j = 0; j < len; ++j) acc += s[j] * ld(base[j * qkv_stride + v_off + h * D + k]);
    o[k] = st<S>(acc * inv);
  }
}

// The fp32 op set's bias and gather: plain grid-stride loops (CudaOps has vectorized bf16 ones;
// these run once per GEMM on an fp32 path that is about parity, not speed).
__global__ void add_bias_f32_kernel(float* x, const float* bias, int64_t N, int64_t C, int64_t ld) {
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < N * C; k += int64_t(gridDim.x) * blockDim.x)
    x[(k / C) * ld + k % C] += bias[k % C];
}

__global__ void gather_rows_f32_kernel(float* dst, const float* src, const int32_t* rows, int64_t n, int64_t C) {
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n * C; k += int64_t(gridDim.x) * blockDim.x)
    dst[k] = src[int64_t(rows[k / C]) * C + k % C];
}

unsigned grid_for(int64_t n) { return unsigned(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535)); }

template <class S>
void layernorm(cudaStream_t stream, S* out, const S* x, const S* residual, const S* w, const S* b, int64_t N, int64_t C,
               double eps) {
  if (N <= 0) return;
  layernorm_kernel<S>
      <<<unsigned(N), kThreads, size_t(C) * sizeof(float), stream>>>(out, x, residual, w, b, C, float(eps));
  SPPO_CUDA_LAUNCHED(layernorm_kernel);
}

template <class S>
void gelu(cudaStream_t stream, S* x, int64_t n) {
  if (n <= 0) return;
  gelu_kernel<S><<<grid_for(n), kThreads, 0, stream>>>(x, n);
  SPPO_CUDA_LAUNCHED(gelu_kernel);
}

template <class S>
void disentangled_attention(cudaStream_t stream, S* out, const S* qkv, const S* rel, const int32_t* rel_index,
                            int64_t rel_center, const int32_t* lengths, const AttentionShape& s) {
  SPPO_REQUIRE(s.heads == s.kv_heads, "disentangled attention needs heads == kv_heads, got ", s.heads, " and ",
               s.kv_heads);
  const size_t shared = size_t(s.head_dim + s.seq) * sizeof(float);
  SPPO_REQUIRE(shared <= 48 * 1024, "disentangled attention: ", s.seq, " positions need ", shared,
               " bytes of shared memory, more than 48 KiB");
  disentangled_attention_kernel<S><<<unsigned(s.batch * s.heads * s.seq), kThreads, shared, stream>>>(
      out, qkv, rel, rel_index, rel_center, lengths, s.seq, s.heads, s.head_dim, s.qkv_stride, s.q_off, s.k_off,
      s.v_off, s.out_stride, float(s.scale));
  SPPO_CUDA_LAUNCHED(disentangled_attention_kernel);
}

class CudaEncoderOpsF32 final : public EncoderOps<float> {
 public:
  explicit CudaEncoderOpsF32(std::unique_ptr<CudaOps> base) : base_(std::move(base)) {}
  const char* name() const override { return "cuda (fp32)"; }
  void* alloc_bytes(size_t bytes) override { return base_->alloc_bytes(bytes); }
  void free_bytes(void* p) override { base_->free_bytes(p); }
  void upload_bytes(void* dst, const void* src, size_t bytes) override { base_->upload_bytes(dst, src, bytes); }
  void download_bytes(void* dst, const void* src, size_t bytes) override { base_->download_bytes(dst, src, bytes); }
  void upload(float* dst, const float* src, int64_t n) override {
    if (n > 0) upload_bytes(dst, src, size_t(n) * sizeof(float));
  }
  void download(float* dst, const float* src, int64_t n) override {
    if (n > 0) download_bytes(dst, src, size_t(n) * sizeof(float));
  }
  void gemm(bool transA, bool transB, int64_t M, int64_t N, int64_t K, double alpha, const float* A, int64_t lda,
            const float* B, int64_t ldb, double beta, float* C, int64_t ldc) override {
    base_->gemm_fp32(transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
  void add_bias(float* x, const float* bias, int64_t N, int64_t C, int64_t ld) override {
    if (N <= 0 || C <= 0) return;
    add_bias_f32_kernel<<<grid_for(N * C), kThreads, 0, base_->stream()>>>(x, bias, N, C, ld);
    SPPO_CUDA_LAUNCHED(add_bias_f32_kernel);
  }
  void gather_rows(float* dst, const float* src, const int32_t* rows, int64_t n, int64_t C) override {
    if (n <= 0 || C <= 0) return;
    gather_rows_f32_kernel<<<grid_for(n * C), kThreads, 0, base_->stream()>>>(dst, src, rows, n, C);
    SPPO_CUDA_LAUNCHED(gather_rows_f32_kernel);
  }
  void layernorm_forward(float* out, const float* x, const float* residual, const float* w, const float* b, int64_t N,
                         int64_t C, double eps) override {
    layernorm(base_->stream(), out, x, residual, w, b, N, C, eps);
  }
  void gelu_forward(float* x, int64_t n) override { gelu(base_->stream(), x, n); }
  void disentangled_attention_forward(float* out, const float* qkv, const float* rel, const int32_t* rel_index,
                                      int64_t rel_center, int64_t rel_rows, const int32_t* lengths,
                                      const AttentionShape& s) override {
    (void)rel_rows;  // the caller's table keeps every index below it
    disentangled_attention(base_->stream(), out, qkv, rel, rel_index, rel_center, lengths, s);
  }

 private:
  std::unique_ptr<CudaOps> base_;
};

}  // namespace

void CudaOps::layernorm_forward(bf16* out, const bf16* x, const bf16* residual, const bf16* w, const bf16* b, int64_t N,
                                int64_t C, double eps) {
  layernorm(stream_, dev(out), dev(x), residual ? dev(residual) : nullptr, dev(w), dev(b), N, C, eps);
}

void CudaOps::gelu_forward(bf16* x, int64_t n) { gelu(stream_, dev(x), n); }

void CudaOps::disentangled_attention_forward(bf16* out, const bf16* qkv, const bf16* rel, const int32_t* rel_index,
                                             int64_t rel_center, int64_t rel_rows, const int32_t* lengths,
                                             const AttentionShape& s) {
  (void)rel_rows;  // the caller's table keeps every index below it
  disentangled_attention(stream_, dev(out), dev(qkv), dev(rel), rel_index, rel_center, lengths, s);
}

std::unique_ptr<EncoderOps<float>> make_encoder_ops_fp32(int device) {
  // make_ops checks the device and says why none is usable; what it makes is always a CudaOps.
  std::unique_ptr<Ops<bf16>> base = make_ops(device, false);
  return std::make_unique<CudaEncoderOpsF32>(std::unique_ptr<CudaOps>(static_cast<CudaOps*>(base.release())));
}

}  // namespace sppo::cuda
