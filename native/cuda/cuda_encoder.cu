// CUDA kernels of the encoder's ops (DeBERTa-v3, inference only; ops/ops.h): LayerNorm with a
// fused residual, exact-erf GELU, and disentangled attention. bf16 storage, fp32 math. The
// attention kernel is the plain one — a block per query row, its scores in shared memory — the
// reference the faster ones will be checked against (cuda_encoder_test.cpp checks it against
// the CPU backend); its cost is a D-long dot product per (query, key) for each of the three terms.
#include <cuda_bf16.h>

#include <cfloat>

#include "cuda/cuda_common.cuh"
#include "cuda/cuda_ops.cuh"

namespace sppo::cuda {

namespace {

using bf = __nv_bfloat16;
constexpr int kThreads = 256;

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

// One block per row; the row (x + residual) is kept in fp32 in shared memory (C floats), so out
// may alias x or residual.
__global__ void layernorm_kernel(bf* out, const bf* x, const bf* residual, const bf* w, const bf* b, int64_t C,
                                 float eps) {
  extern __shared__ float row[];
  __shared__ float red[kThreads / 32];
  const int64_t i = blockIdx.x;
  float s = 0;
  for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
    float v = __bfloat162float(x[i * C + j]);
    if (residual) v += __bfloat162float(residual[i * C + j]);
    row[j] = v;
    s += v;
  }
  const float mean = block_sum(s, red) / float(C);
  float q = 0;
  for (int64_t j = threadIdx.x; j < C; j += blockDim.x) q += (row[j] - mean) * (row[j] - mean);
  const float rstd = rsqrtf(block_sum(q, red) / float(C) + eps);
  for (int64_t j = threadIdx.x; j < C; j += blockDim.x)
    out[i * C + j] = __float2bfloat16((row[j] - mean) * rstd * __bfloat162float(w[j]) + __bfloat162float(b[j]));
}

__global__ void gelu_kernel(bf* x, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float v = __bfloat162float(x[i]);
    x[i] = __float2bfloat16(0.5f * v * (1.0f + erff(v * 0.70710678118654752f)));
  }
}

// One block per (row b, head h, query i). Scores for keys j < lengths[b] in shared memory
// (seq floats), then softmax and P·V; a padding query writes zeros.
__global__ void disentangled_attention_kernel(bf* out, const bf* qkv, const bf* rel, const int32_t* rel_index,
                                              int64_t rel_center, const int32_t* lengths, int64_t seq, int64_t heads,
                                              int64_t D, int64_t qkv_stride, int64_t q_off, int64_t k_off,
                                              int64_t v_off, int64_t out_stride, float scale) {
  extern __shared__ float smem[];  // q (D floats), then the scores (seq floats)
  __shared__ float red[kThreads / 32];
  const int64_t i = blockIdx.x % seq, h = (blockIdx.x / seq) % heads, b = blockIdx.x / (seq * heads);
  const int64_t len = lengths[b], HD = heads * D;
  bf* o = out + (b * seq + i) * out_stride + h * D;
  if (i >= len) {
    for (int64_t k = threadIdx.x; k < D; k += blockDim.x) o[k] = __float2bfloat16(0.f);
    return;
  }
  float* q = smem;
  float* s = smem + D;
  const bf* base = qkv + b * seq * qkv_stride;
  for (int64_t k = threadIdx.x; k < D; k += blockDim.x)
    q[k] = __bfloat162float(base[i * qkv_stride + q_off + h * D + k]);
  __syncthreads();
  float mx = -FLT_MAX;
  for (int64_t j = threadIdx.x; j < len; j += blockDim.x) {
    const int32_t d = rel_index[rel_center + i - j];
    const bf* kj = base + j * qkv_stride + k_off + h * D;
    const bf* qr = rel + d * 2 * HD + h * D;       // Qr[d]
    const bf* kr = rel + d * 2 * HD + HD + h * D;  // Kr[d]
    float acc = 0;
    for (int64_t k = 0; k < D; ++k) {
      const float kv = __bfloat162float(kj[k]);
      acc += q[k] * (kv + __bfloat162float(kr[k])) + kv * __bfloat162float(qr[k]);
    }
    s[j] = acc * scale;
    mx = fmaxf(mx, s[j]);
  }
  mx = block_max(mx, red);
  float sum = 0;
  for (int64_t j = threadIdx.x; j < len; j += blockDim.x) sum += (s[j] = __expf(s[j] - mx));
  const float inv = 1.f / block_sum(sum, red);  // block_sum's barrier also orders the s[j] writes
  for (int64_t k = threadIdx.x; k < D; k += blockDim.x) {
    float acc = 0;
    for (int64_t j = 0; j < len; ++j) acc += s[j] * __bfloat162float(base[j * qkv_stride + v_off + h * D + k]);
    o[k] = __float2bfloat16(acc * inv);
  }
}

}  // namespace

void CudaOps::layernorm_forward(bf16* out, const bf16* x, const bf16* residual, const bf16* w, const bf16* b, int64_t N,
                                int64_t C, double eps) {
  if (N <= 0) return;
  layernorm_kernel<<<unsigned(N), kThreads, size_t(C) * sizeof(float), stream_>>>(
      dev(out), dev(x), residual ? dev(residual) : nullptr, dev(w), dev(b), C, float(eps));
  SPPO_CUDA_LAUNCHED(layernorm_kernel);
}

void CudaOps::gelu_forward(bf16* x, int64_t n) {
  if (n <= 0) return;
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, 65535);
  gelu_kernel<<<unsigned(blocks), kThreads, 0, stream_>>>(dev(x), n);
  SPPO_CUDA_LAUNCHED(gelu_kernel);
}

void CudaOps::disentangled_attention_forward(bf16* out, const bf16* qkv, const bf16* rel, const int32_t* rel_index,
                                             int64_t rel_center, int64_t rel_rows, const int32_t* lengths,
                                             const AttentionShape& s) {
  SPPO_REQUIRE(s.heads == s.kv_heads, "disentangled attention needs heads == kv_heads, got ", s.heads, " and ",
               s.kv_heads);
  const size_t shared = size_t(s.head_dim + s.seq) * sizeof(float);
  SPPO_REQUIRE(shared <= 48 * 1024, "disentangled attention: ", s.seq, " positions need ", shared,
               " bytes of shared memory, more than 48 KiB");
  (void)rel_rows;  // the caller's table keeps every index below it
  disentangled_attention_kernel<<<unsigned(s.batch * s.heads * s.seq), kThreads, shared, stream_>>>(
      dev(out), dev(qkv), dev(rel), rel_index, rel_center, lengths, s.seq, s.heads, s.head_dim, s.qkv_stride, s.q_off,
      s.k_off, s.v_off, s.out_stride, float(s.scale));
  SPPO_CUDA_LAUNCHED(disentangled_attention_kernel);
}

}  // namespace sppo::cuda
