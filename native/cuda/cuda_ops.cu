// The CUDA backend's core: device, stream and memory; transfers; the deterministic reductions;
// and the element-wise and row-wise ops (GEMMs live in cuda_gemm.cu, attention and decoding in
// cuda_attention.cu, the LM head and sampler in cuda_head.cu). Kernels first, then the members
// that launch them. Every formula mirrors cpu/cpu_ops.cpp with fp32 math on bf16 storage; every
// reduction has a fixed summation order, so results are bit-identical run to run.
#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "core/error.h"
#include "cuda/cuda_common.cuh"
#include "cuda/cuda_ops.cuh"

namespace sppo::cuda {

// Each family's state deleter is defined in that family's file; declared here (before the
// destructor below uses them) so every use refers to those explicit specializations.
template <>
void StateDeleter<GemmState>::operator()(GemmState* s) const;
template <>
void StateDeleter<AttnState>::operator()(AttnState* s) const;
template <>
void StateDeleter<HeadState>::operator()(HeadState* s) const;

using bf = __nv_bfloat16;

namespace {

constexpr int kThreads = 256;               // threads per block everywhere in this file
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxBlocks = 1 << 16;     // grid-stride kernels cap their grid here
constexpr int kReduceBlocks = 256;          // fixed grid of the whole-array reductions (device independent)
constexpr int64_t kStagingElems = 1 << 20;  // host staging chunk of upload / download (2 MiB of bf16)

// Blocks for a grid-stride loop over n items (n > 0).
unsigned grid_for(int64_t n) { return unsigned(std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks)); }

__device__ __forceinline__ int64_t first_index() { return int64_t(blockIdx.x) * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int64_t grid_stride() { return int64_t(gridDim.x) * blockDim.x; }

// Sum of v over the block (blockDim.x == kThreads) in a fixed tree order, returned to every
// thread. `shared` holds kWarps + 1 doubles; the block may call this again right away.
__device__ double block_sum(double v, double* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? shared[lane] : 0.0;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    if (lane == 0) shared[kWarps] = v;
  }
  __syncthreads();
  const double total = shared[kWarps];
  __syncthreads();  // everyone has read it before the next call overwrites `shared`
  return total;
}

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

__global__ void cast_kernel(bf* dst, const float* src, int64_t n) {
  for (int64_t i = first_index(); i < n; i += grid_stride()) dst[i] = to_bf(src[i]);
}

__global__ void fill_kernel(uint16_t* x, uint16_t bits, int64_t n) {
  for (int64_t i = first_index(); i < n; i += grid_stride()) x[i] = bits;
}

// partials[block] = Σ x² over this block's grid-stride share, in double.
__global__ void __launch_bounds__(kThreads) sum_squares_kernel(double* partials, const float* x, int64_t n) {
  __shared__ double shared[kWarps + 1];
  double s = 0;
  for (int64_t i = first_index(); i < n; i += grid_stride()) {
    const double v = x[i];
    s += v * v;
  }
  s = block_sum(s, shared);
  if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

// partials[block] = 1 when this block's share holds a NaN or an infinity, else 0.
__global__ void __launch_bounds__(kThreads) non_finite_kernel(double* partials, const float* x, int64_t n) {
  int bad = 0;
  for (int64_t i = first_index(); i < n; i += grid_stride()) bad |= !isfinite(x[i]);
  bad = __syncthreads_or(bad);
  if (threadIdx.x == 0) partials[blockIdx.x] = bad ? 1.0 : 0.0;
}

__global__ void embedding_forward_kernel(bf* out, const bf* table, const int32_t* ids, int64_t N, int64_t C) {
  const int64_t total = N * C;
  for (int64_t k = first_index(); k < total; k += grid_stride()) {
    const int64_t i = k / C, j = k - i * C;
    out[k] = table[int64_t(ids[i]) * C + j];
  }
}

// embedding_backward, after a stable sort of the (id, token) pairs by id: each table row is one
// run of equal keys, its tokens in increasing token order. Work unit: a warp for one sorted position
// q and one chunk of kEmbChunk columns (kEmbSlices slices of 32). Only the first S = min(run length,
// kEmbSlices) positions of a run do work, so a run's columns are spread over S warps (a long run gets
// one column per lane) and every element has exactly one owner. The owner starts from dtable's value
// and adds the run's tokens one by one in sorted (= token) order: the same float additions, in the
// same order, as the CPU and as `dtable[id][c] += dout[t][c]` token after token, so bit-identical.
constexpr int kEmbSlices = 4;
constexpr int kEmbChunk = 32 * kEmbSlices;  // columns per work unit
constexpr int kEmbBack = kEmbSlices;        // the first window starts this many positions before q

// One warp adds the run of `id` into K column slices (slice0 + k * step, 32 columns each) of the
// chunk at column c_lane (this lane's column in slice 0 of the chunk). On entry the warp's window
// holds sorted positions pos + lane (key, tok, in = position inside [0, N)), the run starting at
// window lane lo.
template <int K>
__device__ __forceinline__ void embedding_run(float* dtable, const bf* dout, const uint32_t* keys, const int32_t* tokens, int64_t N,
                              int64_t C, int64_t c_lane, int slice0, int step, uint32_t id, int64_t pos, uint32_t key,
                              int32_t tok, bool in, int lo) {
  constexpr int kTok = 32 / K;  // tokens gathered per round: K * kTok = 32 loads in flight per lane
  const int lane = int(threadIdx.x % 32);
  const int64_t c0 = c_lane + int64_t(slice0) * 32;  // this lane's column in its first slice
  bool has[K];
  float sum[K];
  float* row = dtable + int64_t(id) * C + c0;
  const bf* col = dout + c0;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    has[k] = c0 + k * step * 32 < C;
    sum[k] = has[k] ? row[k * step * 32] : 0.0f;
  }
  for (;;) {
    // The run's members in this window: lanes lo, lo + 1, ... (keys are sorted, so contiguous).
    const unsigned eq = __ballot_sync(0xffffffffu, in && key == id);
    const int n = __popc(eq >> lo);
    const bool more = lo + n == 32;  // the run may go on past the window
    uint32_t next_key = 0;
    int32_t next_tok = 0;
    bool next_in = false;
    if (more) {  // prefetch the next window before this one's gathers
      const int64_t p = pos + 32 + lane;
      next_in = p < N;
      if (next_in) next_key = keys[p], next_tok = tokens[p];
    }
    for (int j0 = 0; j0 < n; j0 += kTok) {
      float v[kTok][K];
#pragma unroll
      for (int j = 0; j < kTok; ++j) {
        const int64_t t = __shfl_sync(0xffffffffu, tok, (lo + j0 + j) & 31);
#pragma unroll
        for (int k = 0; k < K; ++k) v[j][k] = j0 + j < n && has[k] ? to_f(col[t * C + k * step * 32]) : 0.0f;
      }
#pragma unroll
      for (int j = 0; j < kTok; ++j)
        if (j0 + j < n) {
#pragma unroll
          for (int k = 0; k < K; ++k) sum[k] += v[j][k];
        }
    }
    if (!more) break;
    pos += 32, key = next_key, tok = next_tok, in = next_in, lo = 0;
  }
#pragma unroll
  for (int k = 0; k < K; ++k)
    if (has[k]) row[k * step * 32] = sum[k];
}

__global__ void __launch_bounds__(kThreads) embedding_backward_kernel(float* dtable, const bf* dout,
                                                                      const uint32_t* keys, const int32_t* tokens,
                                                                      int64_t N, int64_t C, int64_t chunks) {
  const int lane = int(threadIdx.x % 32);
  const int64_t units = N * chunks, warps = int64_t(gridDim.x) * kWarps;
  for (int64_t u = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32; u < units; u += warps) {  // warp-uniform
    const int64_t q = u / chunks, chunk = u - q * chunks;
    // Window: sorted positions q - kEmbBack + lane.
    const int64_t pos = q - kEmbBack;
    const int64_t p = pos + lane;
    const bool in = p >= 0 && p < N;
    const uint32_t key = in ? keys[p] : 0u;
    const int32_t tok = in ? tokens[p] : 0;
    const uint32_t id = __shfl_sync(0xffffffffu, key, kEmbBack);
    const unsigned eq = __ballot_sync(0xffffffffu, in && key == id);
    const int o = __popc(eq & ((1u << kEmbBack) - 1));  // run members just before q (sorted: a suffix)
    if (o >= kEmbSlices) continue;                      // q is deeper in its run than any owner
    const int lo = kEmbBack - o;                        // the run's first position is window lane lo
    // Owners of this run: its first S positions (the window shows at least kEmbSlices of the run,
    // so S = min(run length, kEmbSlices) > o here: this unit is owner number o).
    const int S = min(__popc(eq >> lo), kEmbSlices);
    const int64_t c_lane = chunk * kEmbChunk + lane;
    const int K = (kEmbSlices - o + S - 1) / S;  // slices o, o + S, ... below kEmbSlices
    if (K == 4)
      embedding_run<4>(dtable, dout, keys, tokens, N, C, c_lane, o, S, id, pos, key, tok, in, lo);
    else if (K == 2)
      embedding_run<2>(dtable, dout, keys, tokens, N, C, c_lane, o, S, id, pos, key, tok, in, lo);
    else
      embedding_run<1>(dtable, dout, keys, tokens, N, C, c_lane, o, S, id, pos, key, tok, in, lo);
  }
}

__global__ void iota_kernel(int32_t* x, int64_t n) {
  for (int64_t i = first_index(); i < n; i += grid_stride()) x[i] = int32_t(i);
}

__global__ void gather_rows_kernel(bf* dst, const bf* src, const int32_t* rows, int64_t n, int64_t C) {
  const int64_t total = n * C;
  for (int64_t k = first_index(); k < total; k += grid_stride()) {
    const int64_t i = k / C, j = k - i * C;
    dst[k] = src[int64_t(rows[i]) * C + j];
  }
}

__global__ void scatter_rows_kernel(bf* dst, const bf* src, const int32_t* rows, int64_t n, int64_t C) {
  const int64_t total = n * C;
  for (int64_t k = first_index(); k < total; k += grid_stride()) {
    const int64_t i = k / C, j = k - i * C;
    dst[int64_t(rows[i]) * C + j] = src[k];
  }
}

// One block per row (grid-stride over rows; every thread of a block runs the same iterations).
__global__ void __launch_bounds__(kThreads) rmsnorm_forward_kernel(bf* out, float* rstd, const bf* x, const bf* w,
                                                                   int64_t N, int64_t C, double eps) {
  __shared__ double shared[kWarps + 1];
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const bf* xi = x + row * C;
    double ss = 0;
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
      const double v = to_f(xi[j]);
      ss += v * v;
    }
    ss = block_sum(ss, shared);
    const float r = float(1.0 / sqrt(ss / double(C) + eps));
    if (threadIdx.x == 0) rstd[row] = r;
    bf* oi = out + row * C;
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) oi[j] = to_bf(to_f(xi[j]) * r * to_f(w[j]));
  }
}

// dx += r*(g - xhat*mean(g*xhat)) with g = dout*w, xhat = x*r; one block per row.
__global__ void __launch_bounds__(kThreads) rmsnorm_backward_dx_kernel(bf* dx, const bf* dout, const bf* x,
                                                                       const bf* w, const float* rstd, int64_t N,
                                                                       int64_t C) {
  __shared__ double shared[kWarps + 1];
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const bf* xi = x + row * C;
    const bf* di = dout + row * C;
    const float r = rstd[row];
    double dot = 0;
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x)
      dot += double(to_f(di[j])) * double(to_f(w[j])) * double(to_f(xi[j]));
    dot = block_sum(dot, shared);
    const float k = float(dot * double(r) / double(C));  // mean(g * xhat)
    bf* dxi = dx + row * C;
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x)
      dxi[j] = to_bf(to_f(dxi[j]) + r * (to_f(di[j]) * to_f(w[j]) - to_f(xi[j]) * r * k));
  }
}

// Terms of the column sums: rmsnorm's dw (dout * x * rstd) and the bias gradient (dout).
struct NormWeightTerm {
  const bf* dout;
  const bf* x;
  const float* rstd;
  int64_t C;
  __device__ double operator()(int64_t i, int64_t j) const {
    return double(to_f(dout[i * C + j])) * double(to_f(x[i * C + j])) * double(rstd[i]);
  }
};
struct BiasTerm {
  const bf* dout;
  int64_t ld;
  __device__ double operator()(int64_t i, int64_t j) const { return to_f(dout[i * ld + j]); }
};

// partials(groups, C): partials[g*C + j] = Σ term(i, j) over rows [g*rows_per_group, ...), in
// double and row order. Grid: (ceil(C / kThreads), groups).
template <class Term>
__global__ void column_partials_kernel(double* partials, Term term, int64_t N, int64_t C, int64_t rows_per_group) {
  const int64_t j = first_index();
  if (j >= C) return;
  const int64_t g = blockIdx.y;
  const int64_t r0 = g * rows_per_group, r1 = min(N, r0 + rows_per_group);
  double acc = 0;
  for (int64_t i = r0; i < r1; ++i) acc += term(i, j);
  partials[g * C + j] = acc;
}

// out[j] += float(Σ_g partials[g*C + j]), groups in order.
__global__ void column_finish_kernel(float* out, const double* partials, int64_t groups, int64_t C) {
  const int64_t j = first_index();
  if (j >= C) return;
  double s = 0;
  for (int64_t g = 0; g < groups; ++g) s += partials[g * C + j];
  out[j] += float(s);
}

__global__ void add_bias_kernel(bf* x, const bf* bias, int64_t N, int64_t C, int64_t ld) {
  const int64_t total = N * C;
  for (int64_t k = first_index(); k < total; k += grid_stride()) {
    const int64_t i = k / C, j = k - i * C;
    bf* p = x + i * ld + j;
    *p = to_bf(to_f(*p) + to_f(bias[j]));
  }
}

// One thread per rotated pair (row i, head h, j < half): (v[j], v[j+half]) rotated by the angle
// of position positions[i] (sign = -1: by minus the angle, the transpose).
__global__ void rope_kernel(bf* x, int64_t N, int64_t ld, int64_t off, int64_t heads, int64_t head_dim,
                            const int32_t* positions, const float* cos, const float* sin, float sign) {
  const int64_t half = head_dim / 2, total = N * heads * half;
  for (int64_t k = first_index(); k < total; k += grid_stride()) {
    const int64_t j = k % half, t = k / half, h = t % heads, i = t / heads;
    const int64_t table = int64_t(positions[i]) * half + j;
    const float c = cos[table], s = sign * sin[table];
    bf* v = x + i * ld + off + h * head_dim;
    const float a = to_f(v[j]), b = to_f(v[j + half]);
    v[j] = to_bf(a * c - b * s);
    v[j + half] = to_bf(b * c + a * s);
  }
}

__global__ void swiglu_forward_kernel(bf* out, const bf* gu, int64_t N, int64_t F) {
  const int64_t total = N * F;
  for (int64_t k = first_index(); k < total; k += grid_stride()) {
    const int64_t i = k / F, j = k - i * F;
    const float g = to_f(gu[i * 2 * F + j]), u = to_f(gu[i * 2 * F + F + j]);
    out[k] = to_bf(g / (1.0f + expf(-g)) * u);
  }
}

// dg = d*u*s*(1 + g*(1-s)), du = d*g*s with s = sigmoid(g) (cpu/vecmath.h).
__global__ void swiglu_backward_kernel(bf* dgu, const bf* dout, const bf* gu, int64_t N, int64_t F) {
  const int64_t total = N * F;
  for (int64_t k = first_index(); k < total; k += grid_stride()) {
    const int64_t i = k / F, j = k - i * F;
    const float g = to_f(gu[i * 2 * F + j]), u = to_f(gu[i * 2 * F + F + j]), d = to_f(dout[k]);
    const float s = 1.0f / (1.0f + expf(-g));
    dgu[i * 2 * F + j] = to_bf(d * u * s * (1.0f + g * (1.0f - s)));
    dgu[i * 2 * F + F + j] = to_bf(d * g * s);
  }
}

// The optimizers' scalars, computed on the host exactly as cpu_ops.cpp computes them.
struct AdamScalars {
  float b1, b2, gs, keep, step_size, inv_sqrt_bc2, eps;
};
struct RmspropScalars {
  float a, gs, keep, lr, eps;
};

// The update applies to master (when given) and p becomes bf16(master); without master, p's
// bf16 value is updated in place.
__global__ void adamw_kernel(bf* p, float* master, const float* g, float* m, float* v, int64_t n, AdamScalars s) {
  for (int64_t i = first_index(); i < n; i += grid_stride()) {
    const float gi = g[i] * s.gs;
    const float mi = s.b1 * m[i] + (1.0f - s.b1) * gi;
    const float vi = s.b2 * v[i] + (1.0f - s.b2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    const float wi = master ? master[i] : to_f(p[i]);
    const float updated = wi * s.keep - s.step_size * mi / (sqrtf(vi) * s.inv_sqrt_bc2 + s.eps);
    if (master) master[i] = updated;
    p[i] = to_bf(updated);
  }
}

__global__ void rmsprop_kernel(bf* p, float* master, const float* g, float* sq, int64_t n, RmspropScalars s) {
  for (int64_t i = first_index(); i < n; i += grid_stride()) {
    const float gi = g[i] * s.gs;
    const float si = s.a * sq[i] + (1.0f - s.a) * gi * gi;
    sq[i] = si;
    const float wi = master ? master[i] : to_f(p[i]);
    const float updated = wi * s.keep - s.lr * gi / (sqrtf(si) + s.eps);
    if (master) master[i] = updated;
    p[i] = to_bf(updated);
  }
}

// ---------------------------------------------------------------------------------------------
// Host helpers
// ---------------------------------------------------------------------------------------------

// "1536.0 MiB (1.50 GiB, 1610612736 bytes)": MiB always, GiB from 1 GiB up, and the exact count.
std::string format_bytes(size_t bytes) {
  char buf[128];
  const double mib = double(bytes) / double(1 << 20);
  if (bytes >= (size_t(1) << 30))
    std::snprintf(buf, sizeof buf, "%.1f MiB (%.2f GiB, %zu bytes)", mib, mib / 1024.0, bytes);
  else
    std::snprintf(buf, sizeof buf, "%.1f MiB (%zu bytes)", mib, bytes);
  return buf;
}

std::string version_text(int v) { return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10); }

// cudaMalloc that turns failure into an sppo::Error naming the size and the device's free memory.
void* device_malloc(size_t bytes, int device) {
  void* p = nullptr;
  const cudaError_t e = cudaMalloc(&p, bytes);
  if (e == cudaSuccess) return p;
  (void)cudaGetLastError();  // clear it, so the next launch check does not report this failure
  size_t free_b = 0, total_b = 0;
  const bool known = cudaMemGetInfo(&free_b, &total_b) == cudaSuccess;
  (void)cudaGetLastError();
  std::string msg = (e == cudaErrorMemoryAllocation ? "CUDA out of memory: could not allocate "
                                                    : "CUDA could not allocate ") +
                    format_bytes(bytes) + " on device " + std::to_string(device);
  if (known) {
    char buf[96];
    std::snprintf(buf, sizeof buf, " (%.2f GiB free of %.2f GiB)", double(free_b) / double(1 << 30),
                  double(total_b) / double(1 << 30));
    msg += buf;
  }
  if (e != cudaErrorMemoryAllocation) msg += std::string(": ") + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
  throw Error(msg);
}

// Column-sum partition: at most 128 row groups of at least 64 rows, a function of N alone.
struct RowGroups {
  int64_t groups, rows_per_group;
};
RowGroups row_groups(int64_t N) {
  const int64_t wanted = std::clamp<int64_t>((N + 63) / 64, 1, 128);
  const int64_t per = (N + wanted - 1) / wanted;
  return {(N + per - 1) / per, per};
}

}  // namespace

// Partial sums of the deterministic reductions: grown on demand (never per step once sized).
struct ReduceState {
  double* partials = nullptr;  // device, `capacity` doubles
  size_t capacity = 0;
  std::vector<double> host;    // the kReduceBlocks whole-array partials, read back
  // embedding_backward's stable sort of (id, token) pairs: sorted keys and tokens, the token
  // indices 0, 1, ... (written once per growth), each `sort_capacity` items; cub's temp storage.
  uint32_t* sorted_keys = nullptr;
  int32_t* sorted_tokens = nullptr;
  int32_t* iota = nullptr;
  size_t sort_capacity = 0;
  void* sort_temp = nullptr;
  size_t sort_temp_bytes = 0;
  ~ReduceState() {
    if (partials) (void)cudaFree(partials);
    if (sorted_keys) (void)cudaFree(sorted_keys);
    if (sorted_tokens) (void)cudaFree(sorted_tokens);
    if (iota) (void)cudaFree(iota);
    if (sort_temp) (void)cudaFree(sort_temp);
  }
};

template <>
void StateDeleter<ReduceState>::operator()(ReduceState* s) const {
  delete s;
}

ReduceState& CudaOps::reduce_state() {
  if (!reduce_) reduce_.reset(new ReduceState());
  return *reduce_;
}

namespace {

double* partials_for(ReduceState& r, size_t n, cudaStream_t stream, int device) {
  if (n > r.capacity) {
    SPPO_CUDA_CHECK(cudaStreamSynchronize(stream));  // queued kernels may still use the old buffer
    if (r.partials) {
      SPPO_CUDA_CHECK(cudaFree(r.partials));
      ++scratch_generation();
    }
    r.partials = nullptr;
    r.capacity = 0;
    r.partials = static_cast<double*>(device_malloc(n * sizeof(double), device));
    r.capacity = n;
  }
  return r.partials;
}

// Sizes ReduceState's sort buffers for n items and temp_bytes of cub temp storage (grown, never
// shrunk; a stream sync first, as queued kernels may still use the old buffers).
void sort_buffers_for(ReduceState& r, size_t n, size_t temp_bytes, cudaStream_t stream, int device) {
  if (n <= r.sort_capacity && temp_bytes <= r.sort_temp_bytes) return;
  SPPO_CUDA_CHECK(cudaStreamSynchronize(stream));
  ++scratch_generation();
  if (n > r.sort_capacity) {
    for (void* p : {static_cast<void*>(r.sorted_keys), static_cast<void*>(r.sorted_tokens), static_cast<void*>(r.iota)})
      if (p) SPPO_CUDA_CHECK(cudaFree(p));
    r.sorted_keys = nullptr, r.sorted_tokens = nullptr, r.iota = nullptr, r.sort_capacity = 0;
    r.sorted_keys = static_cast<uint32_t*>(device_malloc(n * sizeof(uint32_t), device));
    r.sorted_tokens = static_cast<int32_t*>(device_malloc(n * sizeof(int32_t), device));
    r.iota = static_cast<int32_t*>(device_malloc(n * sizeof(int32_t), device));
    iota_kernel<<<grid_for(int64_t(n)), kThreads, 0, stream>>>(r.iota, int64_t(n));
    SPPO_CUDA_LAUNCHED(iota_kernel);
    r.sort_capacity = n;
  }
  if (temp_bytes > r.sort_temp_bytes) {
    if (r.sort_temp) SPPO_CUDA_CHECK(cudaFree(r.sort_temp));
    r.sort_temp = nullptr, r.sort_temp_bytes = 0;
    r.sort_temp = device_malloc(std::max<size_t>(temp_bytes, 1), device);
    r.sort_temp_bytes = temp_bytes;
  }
}

// out(C) += column sums of term over N rows: row-group partials, then a fixed-order finish.
template <class Term>
void column_sums(float* out, Term term, int64_t N, int64_t C, ReduceState& r, cudaStream_t stream, int device) {
  const RowGroups rg = row_groups(N);
  double* partials = partials_for(r, size_t(rg.groups * C), stream, device);
  const unsigned col_blocks = unsigned((C + kThreads - 1) / kThreads);
  column_partials_kernel<<<dim3(col_blocks, unsigned(rg.groups)), kThreads, 0, stream>>>(partials, term, N, C,
                                                                                         rg.rows_per_group);
  SPPO_CUDA_LAUNCHED(column_partials_kernel);
  column_finish_kernel<<<col_blocks, kThreads, 0, stream>>>(out, partials, rg.groups, C);
  SPPO_CUDA_LAUNCHED(column_finish_kernel);
}

DeviceInfo probe_once() {
  DeviceInfo d;
  d.built = true;
  (void)cudaRuntimeGetVersion(&d.runtime_version);
  (void)cudaDriverGetVersion(&d.driver_version);  // 0 when no driver is installed
  int count = 0;
  cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    if (d.driver_version == 0)
      d.why_not = "no NVIDIA driver is installed (libcuda.so.1 was not found)";
    else if (e == cudaErrorInsufficientDriver)
      d.why_not = "the NVIDIA driver supports CUDA " + version_text(d.driver_version) +
                  ", older than the CUDA runtime " + version_text(d.runtime_version) +
                  " this engine was built with; update the driver";
    else if (e == cudaErrorNoDevice)
      d.why_not = "no CUDA-capable GPU was found";
    else
      d.why_not = std::string("the CUDA driver did not list devices: ") + cudaGetErrorName(e) + " (" +
                  cudaGetErrorString(e) + ")";
    return d;
  }
  if (count == 0) {
    d.why_not = "no CUDA-capable GPU was found";
    return d;
  }
  cudaDeviceProp prop{};
  if ((e = cudaGetDeviceProperties(&prop, 0)) != cudaSuccess) {
    (void)cudaGetLastError();
    d.why_not = std::string("CUDA device 0 did not answer: ") + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
    return d;
  }
  d.name = prop.name;
  d.sm_major = prop.major;
  d.sm_minor = prop.minor;
  d.total_memory = prop.totalGlobalMem;
  // The kernels exist only for the architectures the build targeted (CMAKE_CUDA_ARCHITECTURES).
  cudaFuncAttributes attr{};
  if ((e = cudaFuncGetAttributes(&attr, cast_kernel)) != cudaSuccess) {
    (void)cudaGetLastError();
    d.why_not = "this build has no kernels for " + d.name + " (compute capability " + std::to_string(prop.major) +
                "." + std::to_string(prop.minor) + "): " + cudaGetErrorName(e) +
                "; rebuild with CMAKE_CUDA_ARCHITECTURES including " + std::to_string(prop.major * 10 + prop.minor);
    return d;
  }
  if ((e = cudaMemGetInfo(&d.free_memory, &d.total_memory)) != cudaSuccess) {
    (void)cudaGetLastError();
    d.why_not = "CUDA device 0 (" + d.name + ") cannot be used: " + cudaGetErrorName(e) + " (" +
                cudaGetErrorString(e) + ")";
    return d;
  }
  std::string lt = cublaslt_load_error();
  if (!lt.empty()) {
    d.why_not = lt;
    return d;
  }
  d.available = true;
  return d;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Entry points (cuda_backend.h)
// ---------------------------------------------------------------------------------------------

DeviceInfo probe() {
  static const DeviceInfo info = [] {
    try {
      return probe_once();
    } catch (const std::exception& e) {  // e.g. bad_alloc building a message: still never throw
      DeviceInfo d;
      d.built = true;
      d.why_not = std::string("probing CUDA failed: ") + e.what();
      return d;
    }
  }();
  return info;
}

std::unique_ptr<Ops<bf16>> make_ops(int device, bool record_graphs) {
  const DeviceInfo info = probe();
  if (!info.available) throw Error("CUDA is unavailable: " + info.why_not);
  int count = 0;
  SPPO_CUDA_CHECK(cudaGetDeviceCount(&count));
  SPPO_REQUIRE(device >= 0 && device < count, "CUDA device ", device, " does not exist (this machine has ", count,
               " CUDA device", count == 1 ? "" : "s", ")");
  // The ops run on whichever thread calls them (the addon's libuv workers) and set the current
  // device only at construction; a thread's current device defaults to 0, so only device 0 is
  // safe until every entry point selects its device.
  SPPO_REQUIRE(device == 0, "CUDA device ", device, ": only device 0 is supported (set CUDA_VISIBLE_DEVICES to pick a GPU)");
  return std::make_unique<CudaOps>(device, record_graphs);
}

void CudaOps::synchronize() { SPPO_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

// ---- Recorded graphs (Ops::graph_capture_begin) ----
// Thread-local capture: another thread's op set (a model training while this one generates) may
// keep calling unsafe APIs such as cudaMalloc meanwhile.

bool CudaOps::graph_capture_begin(uint64_t key) {
  if (!record_graphs_ || graph_failed_.count(key)) return false;
  if (cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal) != cudaSuccess) {
    (void)cudaGetLastError();
    graph_failed_.insert(key);
    return false;
  }
  return true;
}

bool CudaOps::graph_capture_end(uint64_t key) {
  cudaGraph_t graph = nullptr;
  cudaError_t e = cudaStreamEndCapture(stream_, &graph);
  cudaGraphExec_t exec = nullptr;
  if (e == cudaSuccess) e = cudaGraphInstantiate(&exec, graph, 0);
  if (graph) (void)cudaGraphDestroy(graph);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();  // a failed capture is not a sticky error: the calls run eagerly instead
    graph_failed_.insert(key);
    return false;
  }
  auto it = graphs_.find(key);
  if (it != graphs_.end()) (void)cudaGraphExecDestroy(it->second.exec);
  graphs_[key] = {exec, scratch_generation().load()};
  return true;
}

bool CudaOps::graph_replay(uint64_t key) {
  const auto it = graphs_.find(key);
  if (it == graphs_.end()) return false;
  if (it->second.scratch_generation != scratch_generation().load()) {
    drop_graphs();  // some scratch a recording points into has been reallocated
    return false;
  }
  SPPO_CUDA_CHECK(cudaGraphLaunch(it->second.exec, stream_));
  return true;
}

void CudaOps::drop_graphs() {
  for (auto& [key, g] : graphs_) (void)cudaGraphExecDestroy(g.exec);
  graphs_.clear();
}

// ---------------------------------------------------------------------------------------------
// CudaOps: lifetime, memory, transfers
// ---------------------------------------------------------------------------------------------

CudaOps::CudaOps(int device, bool record_graphs) : device_(device) {
  const char* env = std::getenv("SPPO_CUDA_GRAPHS");
  record_graphs_ = record_graphs && !(env && std::strcmp(env, "0") == 0);
  SPPO_CUDA_CHECK(cudaSetDevice(device));
  SPPO_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
}

CudaOps::~CudaOps() {
  // No throwing here: a failed call means the context is already broken, and that error was (or
  // will be) reported by the call that hit it.
  (void)cudaSetDevice(device_);
  if (stream_) (void)cudaStreamSynchronize(stream_);
  drop_graphs();
  // Free the family states while the stream they may use still exists.
  head_.reset();
  attn_.reset();
  reduce_.reset();
  gemm_.reset();
  if (stream_) (void)cudaStreamDestroy(stream_);
  (void)cudaGetLastError();
}

void* CudaOps::alloc_bytes(size_t bytes) {
  SPPO_REQUIRE(bytes <= SIZE_MAX - 63, "cannot allocate ", bytes, " bytes");
  const size_t rounded = std::max<size_t>(64, (bytes + 63) / 64 * 64);
  void* p = device_malloc(rounded, device_);  // cudaMalloc aligns to at least 256 bytes
  const cudaError_t e = cudaMemsetAsync(p, 0, rounded, stream_);
  if (e != cudaSuccess) {
    (void)cudaFree(p);
    fail("cudaMemsetAsync(zero new allocation)", e, __FILE__, __LINE__);
  }
  return p;
}

void CudaOps::free_bytes(void* p) {
  // Deliberately unchecked: this runs in destructors, also while an earlier sppo::Error unwinds;
  // a sticky context error surfaces at the next checked call instead of terminating here.
  if (p) (void)cudaFree(p);
}

size_t CudaOps::plan_scratch(int64_t, int64_t) { return 0; }

void CudaOps::upload_bytes(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return;
  SPPO_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_));
  SPPO_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void CudaOps::download_bytes(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return;
  SPPO_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_));
  SPPO_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

// Rounded on the host (bf16.h rounds to nearest even, as __float2bfloat16_rn does), a chunk at a time.
void CudaOps::upload(bf16* dst, const float* src, int64_t n) {
  if (n <= 0) return;
  std::vector<bf16> staging(size_t(std::min(n, kStagingElems)));
  for (int64_t b = 0; b < n; b += kStagingElems) {
    const int64_t e = std::min(n, b + kStagingElems);
    for (int64_t i = b; i < e; ++i) staging[size_t(i - b)] = bf16(src[i]);
    upload_bytes(dst + b, staging.data(), size_t(e - b) * sizeof(bf16));
  }
}

void CudaOps::download(float* dst, const bf16* src, int64_t n) {
  if (n <= 0) return;
  std::vector<bf16> staging(size_t(std::min(n, kStagingElems)));
  for (int64_t b = 0; b < n; b += kStagingElems) {
    const int64_t e = std::min(n, b + kStagingElems);
    download_bytes(staging.data(), src + b, size_t(e - b) * sizeof(bf16));
    for (int64_t i = b; i < e; ++i) dst[i] = float(staging[size_t(i - b)]);
  }
}

void CudaOps::cast(bf16* dst, const float* src, int64_t n) {
  if (n <= 0) return;
  cast_kernel<<<grid_for(n), kThreads, 0, stream_>>>(dev(dst), src, n);
  SPPO_CUDA_LAUNCHED(cast_kernel);
}

void CudaOps::fill(bf16* x, double value, int64_t n) {
  if (n <= 0) return;
  // bf16(double) rounds through float exactly like the host type, so fill(x, v) == upload of v.
  fill_kernel<<<grid_for(n), kThreads, 0, stream_>>>(reinterpret_cast<uint16_t*>(x), bf16(value).bits, n);
  SPPO_CUDA_LAUNCHED(fill_kernel);
}

void CudaOps::zero_bytes(void* x, size_t bytes) {
  if (bytes == 0) return;
  SPPO_CUDA_CHECK(cudaMemsetAsync(x, 0, bytes, stream_));
}

void CudaOps::copy(bf16* dst, const bf16* src, int64_t n) {
  if (n <= 0) return;
  SPPO_CUDA_CHECK(cudaMemcpyAsync(dst, src, size_t(n) * sizeof(bf16), cudaMemcpyDeviceToDevice, stream_));
}

// ---------------------------------------------------------------------------------------------
// Reductions over whole arrays: a fixed grid of kReduceBlocks partials (double), summed on the
// host in block order.
// ---------------------------------------------------------------------------------------------

double CudaOps::sum_squares(const float* x, int64_t n) {
  if (n <= 0) return 0.0;
  ReduceState& r = reduce_state();
  double* partials = partials_for(r, kReduceBlocks, stream_, device_);
  sum_squares_kernel<<<kReduceBlocks, kThreads, 0, stream_>>>(partials, x, n);
  SPPO_CUDA_LAUNCHED(sum_squares_kernel);
  r.host.resize(kReduceBlocks);
  download_bytes(r.host.data(), partials, kReduceBlocks * sizeof(double));
  double total = 0;
  for (int b = 0; b < kReduceBlocks; ++b) total += r.host[b];
  return total;
}

bool CudaOps::all_finite(const float* x, int64_t n) {
  if (n <= 0) return true;
  ReduceState& r = reduce_state();
  double* partials = partials_for(r, kReduceBlocks, stream_, device_);
  non_finite_kernel<<<kReduceBlocks, kThreads, 0, stream_>>>(partials, x, n);
  SPPO_CUDA_LAUNCHED(non_finite_kernel);
  r.host.resize(kReduceBlocks);
  download_bytes(r.host.data(), partials, kReduceBlocks * sizeof(double));
  for (int b = 0; b < kReduceBlocks; ++b)
    if (r.host[b] != 0.0) return false;
  return true;
}

// ---------------------------------------------------------------------------------------------
// Embeddings and row moves
// ---------------------------------------------------------------------------------------------

void CudaOps::embedding_forward(bf16* out, const bf16* table, const int32_t* ids, int64_t N, int64_t C) {
  if (N <= 0 || C <= 0) return;
  embedding_forward_kernel<<<grid_for(N * C), kThreads, 0, stream_>>>(dev(out), dev(table), ids, N, C);
  SPPO_CUDA_LAUNCHED(embedding_forward_kernel);
}

// Stable radix sort of the (id, token) pairs by id (cub's radix sort is stable: equal ids keep
// increasing token order), then one pass that gives every (table row, column) one owner lane.
void CudaOps::embedding_backward(float* dtable, const bf16* dout, const int32_t* ids, int64_t N, int64_t C) {
  if (N <= 0 || C <= 0) return;
  SPPO_REQUIRE(N <= INT32_MAX, "embedding_backward: ", N, " tokens exceed the int32 token index");
  ReduceState& r = reduce_state();
  const int n = int(N);
  // Ids are non-negative int32, so their uint32 bits sort in the same order. The vocabulary size
  // is not passed, so all 32 key bits are sorted.
  const uint32_t* keys_in = reinterpret_cast<const uint32_t*>(ids);
  size_t temp_bytes = 0;
  SPPO_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, keys_in, static_cast<uint32_t*>(nullptr),
                                                  static_cast<const int32_t*>(nullptr),
                                                  static_cast<int32_t*>(nullptr), n, 0, 32, stream_));
  sort_buffers_for(r, size_t(N), temp_bytes, stream_, device_);
  SPPO_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(r.sort_temp, temp_bytes, keys_in, r.sorted_keys, r.iota,
                                                  r.sorted_tokens, n, 0, 32, stream_));
  SPPO_CUDA_LAUNCHED(cub::DeviceRadixSort::SortPairs);
  const int64_t chunks = (C + kEmbChunk - 1) / kEmbChunk;
  const unsigned blocks = unsigned(std::min<int64_t>((N * chunks + kWarps - 1) / kWarps, kMaxBlocks));
  embedding_backward_kernel<<<blocks, kThreads, 0, stream_>>>(dtable, dev(dout), r.sorted_keys, r.sorted_tokens, N,
                                                               C, chunks);
  SPPO_CUDA_LAUNCHED(embedding_backward_kernel);
}

void CudaOps::gather_rows(bf16* dst, const bf16* src, const int32_t* rows, int64_t n, int64_t C) {
  if (n <= 0 || C <= 0) return;
  gather_rows_kernel<<<grid_for(n * C), kThreads, 0, stream_>>>(dev(dst), dev(src), rows, n, C);
  SPPO_CUDA_LAUNCHED(gather_rows_kernel);
}

void CudaOps::scatter_rows(bf16* dst, const bf16* src, const int32_t* rows, int64_t n, int64_t C) {
  if (n <= 0 || C <= 0) return;
  scatter_rows_kernel<<<grid_for(n * C), kThreads, 0, stream_>>>(dev(dst), dev(src), rows, n, C);
  SPPO_CUDA_LAUNCHED(scatter_rows_kernel);
}

// ---------------------------------------------------------------------------------------------
// RMSNorm and bias
// ---------------------------------------------------------------------------------------------

void CudaOps::rmsnorm_forward(bf16* out, float* rstd, const bf16* x, const bf16* w, int64_t N, int64_t C,
                              double eps) {
  if (N <= 0 || C <= 0) return;
  const unsigned blocks = unsigned(std::min<int64_t>(N, kMaxBlocks));
  rmsnorm_forward_kernel<<<blocks, kThreads, 0, stream_>>>(dev(out), rstd, dev(x), dev(w), N, C, eps);
  SPPO_CUDA_LAUNCHED(rmsnorm_forward_kernel);
}

void CudaOps::rmsnorm_backward(bf16* dx, float* dw, const bf16* dout, const bf16* x, const bf16* w,
                               const float* rstd, int64_t N, int64_t C) {
  if (N <= 0 || C <= 0) return;
  const unsigned blocks = unsigned(std::min<int64_t>(N, kMaxBlocks));
  rmsnorm_backward_dx_kernel<<<blocks, kThreads, 0, stream_>>>(dev(dx), dev(dout), dev(x), dev(w), rstd, N, C);
  SPPO_CUDA_LAUNCHED(rmsnorm_backward_dx_kernel);
  column_sums(dw, NormWeightTerm{dev(dout), dev(x), rstd, C}, N, C, reduce_state(), stream_, device_);
}

void CudaOps::add_bias(bf16* x, const bf16* bias, int64_t N, int64_t C, int64_t ld) {
  if (N <= 0 || C <= 0) return;
  add_bias_kernel<<<grid_for(N * C), kThreads, 0, stream_>>>(dev(x), dev(bias), N, C, ld);
  SPPO_CUDA_LAUNCHED(add_bias_kernel);
}

void CudaOps::bias_backward(float* dbias, const bf16* dout, int64_t N, int64_t C, int64_t ld) {
  if (N <= 0 || C <= 0) return;
  column_sums(dbias, BiasTerm{dev(dout), ld}, N, C, reduce_state(), stream_, device_);
}

// ---------------------------------------------------------------------------------------------
// RoPE and SwiGLU
// ---------------------------------------------------------------------------------------------

void CudaOps::rope(bf16* x, int64_t N, int64_t ld, int64_t off, int64_t heads, int64_t head_dim,
                   const int32_t* positions, const float* cos, const float* sin, bool inverse) {
  const int64_t pairs = N * heads * (head_dim / 2);
  if (pairs <= 0) return;
  rope_kernel<<<grid_for(pairs), kThreads, 0, stream_>>>(dev(x), N, ld, off, heads, head_dim, positions, cos, sin,
                                                          inverse ? -1.0f : 1.0f);
  SPPO_CUDA_LAUNCHED(rope_kernel);
}

void CudaOps::swiglu_forward(bf16* out, const bf16* gu, int64_t N, int64_t F) {
  if (N <= 0 || F <= 0) return;
  swiglu_forward_kernel<<<grid_for(N * F), kThreads, 0, stream_>>>(dev(out), dev(gu), N, F);
  SPPO_CUDA_LAUNCHED(swiglu_forward_kernel);
}

void CudaOps::swiglu_backward(bf16* dgu, const bf16* dout, const bf16* gu, int64_t N, int64_t F) {
  if (N <= 0 || F <= 0) return;
  swiglu_backward_kernel<<<grid_for(N * F), kThreads, 0, stream_>>>(dev(dgu), dev(dout), dev(gu), N, F);
  SPPO_CUDA_LAUNCHED(swiglu_backward_kernel);
}

// ---------------------------------------------------------------------------------------------
// Optimizers
// ---------------------------------------------------------------------------------------------

void CudaOps::adamw_update(bf16* p, float* master, const float* g, float* m, float* v, int64_t n, double lr,
                           double beta1, double beta2, double eps, double decay, double gscale, int64_t step) {
  if (n <= 0) return;
  const AdamScalars s{float(beta1),
                      float(beta2),
                      float(gscale),
                      float(1.0 - decay),
                      float(lr / (1.0 - std::pow(beta1, double(step)))),
                      float(1.0 / std::sqrt(1.0 - std::pow(beta2, double(step)))),
                      float(eps)};
  adamw_kernel<<<grid_for(n), kThreads, 0, stream_>>>(dev(p), master, g, m, v, n, s);
  SPPO_CUDA_LAUNCHED(adamw_kernel);
}

void CudaOps::rmsprop_update(bf16* p, float* master, const float* g, float* sq, int64_t n, double lr, double alpha,
                             double eps, double decay, double gscale) {
  if (n <= 0) return;
  const RmspropScalars s{float(alpha), float(gscale), float(1.0 - decay), float(lr), float(eps)};
  rmsprop_kernel<<<grid_for(n), kThreads, 0, stream_>>>(dev(p), master, g, sq, n, s);
  SPPO_CUDA_LAUNCHED(rmsprop_kernel);
}

}  // namespace sppo::cuda
