// The CUDA backend's core: device, stream and memory; transfers; the deterministic reductions;
// and the element-wise and row-wise ops (GEMMs live in cuda_gemm.cu, attention and decoding in
// attention/, the LM head and sampler in cuda_head.cu). Kernels first, then the members
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
#include <type_traits>
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

constexpr int kThreads = 256;  // threads per block everywhere in this file
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

// Sum of v over a team of kTeam threads (one warp, or the whole block of kThreads), returned to
// every thread of the team. The xor butterfly gives every lane the same bits (each step adds two
// equal-order partial sums, and a + b == b + a); the warps' sums are then added in warp order.
// `shared` holds kWarps doubles (unused for a warp team); a block team calls this once per kernel,
// as nothing keeps a second call from overwriting `shared` before every warp has read it.
template <int kTeam>
__device__ __forceinline__ double team_sum(double v, double* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if constexpr (kTeam > 32) {
    static_assert(kTeam == kThreads, "a team is a warp or the whole block");
    if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = v;
    __syncthreads();
    v = shared[0];
    for (int k = 1; k < kWarps; ++k) v += shared[k];
  }
  return v;
}

// W consecutive values at p: W = 8 is one 16-byte access for bf16 (two for float), which the
// launcher allows only where every such address is 16-byte aligned; W = 1 is a scalar access.
template <int W>
__device__ __forceinline__ void load_bf(const bf* p, float (&v)[W]) {
  if constexpr (W == 8) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {  // bf16 -> float is exact: the bits move to the top half
      v[2 * k] = __uint_as_float(words[k] << 16);
      v[2 * k + 1] = __uint_as_float(words[k] & 0xffff0000u);
    }
  } else {
#pragma unroll
    for (int k = 0; k < W; ++k) v[k] = to_f(p[k]);
  }
}
template <int W>
__device__ __forceinline__ void store_bf(bf* p, const float (&v)[W]) {
  if constexpr (W == 8) {
    uint32_t words[4];
#pragma unroll
    for (int k = 0; k < 4; ++k)
      words[k] = uint32_t(__bfloat16_as_ushort(to_bf(v[2 * k]))) | uint32_t(__bfloat16_as_ushort(to_bf(v[2 * k + 1])))
                                                                       << 16;
    *reinterpret_cast<uint4*>(p) = make_uint4(words[0], words[1], words[2], words[3]);
  } else {
#pragma unroll
    for (int k = 0; k < W; ++k) p[k] = to_bf(v[k]);
  }
}
template <int W>
__device__ __forceinline__ void load_f(const float* p, float (&v)[W]) {
  if constexpr (W == 8) {
    const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
  } else {
#pragma unroll
    for (int k = 0; k < W; ++k) v[k] = p[k];
  }
}
// Bit copy of W bf16.
template <int W>
__device__ __forceinline__ void copy_bf(bf* dst, const bf* src) {
  if constexpr (W == 8)
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
  else
    for (int k = 0; k < W; ++k) dst[k] = src[k];
}

// The row kernels' 2-D grid (see row_launch): x walks the W-wide items of one row, y the rows
// (looping when there are more than gridDim.y * blockDim.y), so no element index is divided.
__device__ __forceinline__ int64_t row_item() { return int64_t(blockIdx.x) * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int64_t first_row() { return int64_t(blockIdx.y) * blockDim.y + threadIdx.y; }
__device__ __forceinline__ int64_t row_stride() { return int64_t(gridDim.y) * blockDim.y; }

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

// dst(n) = bf16(src(n)), W per thread; the last n % W elements go to the first threads.
template <int W>
__global__ void cast_kernel(bf* dst, const float* src, int64_t n) {
  const int64_t vecs = n / W;
  for (int64_t v = first_index(); v < vecs; v += grid_stride()) {
    float f[W];
    load_f<W>(src + v * W, f);
    store_bf<W>(dst + v * W, f);
  }
  const int64_t tail = vecs * W + first_index();
  if (tail < n) dst[tail] = to_bf(src[tail]);
}

__global__ void fill_kernel(uint16_t* x, uint16_t bits, int64_t n) {
  for (int64_t i = first_index(); i < n; i += grid_stride()) x[i] = bits;
}

// A gradient element as float: fp32 gradients as they are, bf16 ones (MemoryPlan::bf16_gradients) widened.
__device__ __forceinline__ float grad_f(float g) { return g; }
__device__ __forceinline__ float grad_f(bf g) { return to_f(g); }

// partials[block] = Σ x² over this block's grid-stride share, in double.
template <class X>
__global__ void __launch_bounds__(kThreads) sum_squares_kernel(double* partials, const X* x, int64_t n) {
  __shared__ double shared[kWarps + 1];
  double s = 0;
  for (int64_t i = first_index(); i < n; i += grid_stride()) {
    const double v = grad_f(x[i]);
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

// Row i of src (row src_rows[i], or i without src_rows) to row dst_rows[i] (or i) of dst, for n
// rows of C columns: gather_rows (the embedding lookup too) indexes the source, scatter_rows the destination.
template <int W>
__global__ void copy_rows_kernel(bf* dst, const int32_t* dst_rows, const bf* src, const int32_t* src_rows, int64_t n,
                                 int64_t C) {
  const int64_t j = row_item() * W;
  if (j >= C) return;
  for (int64_t i = first_row(); i < n; i += row_stride()) {
    const int64_t d = dst_rows ? int64_t(dst_rows[i]) : i, s = src_rows ? int64_t(src_rows[i]) : i;
    copy_bf<W>(dst + d * C + j, src + s * C + j);
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
__device__ __forceinline__ void embedding_run(float* dtable, const bf* dout, const uint32_t* keys,
                                              const int32_t* tokens, int64_t N, int64_t C, int64_t c_lane, int slice0,
                                              int step, uint32_t id, int64_t pos, uint32_t key, int32_t tok, bool in,
                                              int lo) {
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

__global__ void __launch_bounds__(kThreads)
    embedding_backward_kernel(float* dtable, const bf* dout, const uint32_t* keys, const int32_t* tokens, int64_t N,
                              int64_t C, int64_t chunks) {
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

// RMSNorm of any row length: one block per row (grid-stride over rows; every thread of a block
// runs the same iterations), reading the row twice. The launcher uses it where the row-in-registers
// kernels below do not apply (C not a multiple of 8, unaligned rows, C > kMaxRowVecs * 8).
__global__ void __launch_bounds__(kThreads)
    rmsnorm_forward_kernel(bf* out, float* rstd, const bf* x, const bf* w, int64_t N, int64_t C, double eps) {
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

// dx += r*(g - xhat*mean(g*xhat)) with g = dout*w, xhat = x*r; one block per row, any C.
__global__ void __launch_bounds__(kThreads) rmsnorm_backward_dx_kernel(bf* dx, const bf* dout, const bf* x, const bf* w,
                                                                       const float* rstd, int64_t N, int64_t C) {
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

// Row-in-registers RMSNorm for C % 8 == 0 with 16-byte aligned rows: a team of kTeam threads (a
// warp, or the whole block) per row, each holding kVec 8-column vectors of the row as packed bf16;
// vector v of team thread t covers columns (v * kTeam + t) * 8 ... + 7, so every step of the team
// reads consecutive 16-byte chunks. Memory traffic is one read of x (and of the L2-resident w) and
// one write of out; the same fp32 / fp64 formulas as the kernel above, with the squares summed per
// thread in column order and then across the team in a fixed order.
constexpr int kMaxRowVecs = 4 * kThreads;  // C <= 8192: four vectors per thread of a block team

template <int kTeam, int kVec>
__global__ void __launch_bounds__(kThreads)
    rmsnorm_forward_rows_kernel(bf* out, float* rstd, const bf* x, const bf* w, int64_t N, int64_t C, double eps) {
  __shared__ double shared[kWarps];
  const int t = int(threadIdx.x) % kTeam;
  const int64_t row = int64_t(blockIdx.x) * (kThreads / kTeam) + threadIdx.x / kTeam;
  if (row >= N) return;  // whole teams only: a block team always has its row (grid = N)
  const int64_t vecs = C / 8;
  const bf* xi = x + row * C;
  uint4 held[kVec];
  double ss = 0;
#pragma unroll
  for (int v = 0; v < kVec; ++v) {
    const int64_t q = int64_t(v) * kTeam + t;
    if (q < vecs) held[v] = *reinterpret_cast<const uint4*>(xi + q * 8);
  }
#pragma unroll
  for (int v = 0; v < kVec; ++v) {
    if (int64_t(v) * kTeam + t >= vecs) break;
    float f[8];
    load_bf<8>(reinterpret_cast<const bf*>(&held[v]), f);
#pragma unroll
    for (int k = 0; k < 8; ++k) ss += double(f[k]) * double(f[k]);
  }
  ss = team_sum<kTeam>(ss, shared);
  const float r = float(1.0 / sqrt(ss / double(C) + eps));
  if (t == 0) rstd[row] = r;
  bf* oi = out + row * C;
#pragma unroll
  for (int v = 0; v < kVec; ++v) {
    const int64_t q = int64_t(v) * kTeam + t;
    if (q >= vecs) break;
    float f[8], wf[8], o[8];
    load_bf<8>(reinterpret_cast<const bf*>(&held[v]), f);
    load_bf<8>(w + q * 8, wf);
#pragma unroll
    for (int k = 0; k < 8; ++k) o[k] = f[k] * r * wf[k];
    store_bf<8>(oi + q * 8, o);
  }
}

// The backward's dx in the row-in-registers layout above, a block per row (2048 < C <= 8192; the
// fused kernel below takes smaller rows): x and dout held, w and dx read in the second pass (w from
// L1/L2). Traffic: reads of x, dout, dx and a write of dx; dw is a separate column sum.
template <int kVec>
__global__ void __launch_bounds__(kThreads)
    rmsnorm_backward_dx_rows_kernel(bf* dx, const bf* dout, const bf* x, const bf* w, const float* rstd, int64_t N,
                                    int64_t C) {
  constexpr int kTeam = kThreads;
  __shared__ double shared[kWarps];
  const int t = int(threadIdx.x);
  const int64_t row = blockIdx.x;
  const int64_t vecs = C / 8;
  const bf* xi = x + row * C;
  const bf* di = dout + row * C;
  const float r = rstd[row];
  uint4 held_x[kVec], held_d[kVec];
#pragma unroll
  for (int v = 0; v < kVec; ++v) {
    const int64_t q = int64_t(v) * kTeam + t;
    if (q < vecs) {
      held_x[v] = *reinterpret_cast<const uint4*>(xi + q * 8);
      held_d[v] = *reinterpret_cast<const uint4*>(di + q * 8);
    }
  }
  double dot = 0;
#pragma unroll
  for (int v = 0; v < kVec; ++v) {
    const int64_t q = int64_t(v) * kTeam + t;
    if (q >= vecs) break;
    float xf[8], df[8], wf[8];
    load_bf<8>(reinterpret_cast<const bf*>(&held_x[v]), xf);
    load_bf<8>(reinterpret_cast<const bf*>(&held_d[v]), df);
    load_bf<8>(w + q * 8, wf);
#pragma unroll
    for (int k = 0; k < 8; ++k) dot += double(df[k]) * double(wf[k]) * double(xf[k]);
  }
  dot = team_sum<kTeam>(dot, shared);
  const float k_mean = float(dot * double(r) / double(C));  // mean(g * xhat)
  bf* dxi = dx + row * C;
#pragma unroll
  for (int v = 0; v < kVec; ++v) {
    const int64_t q = int64_t(v) * kTeam + t;
    if (q >= vecs) break;
    float xf[8], df[8], wf[8], g[8];
    load_bf<8>(reinterpret_cast<const bf*>(&held_x[v]), xf);
    load_bf<8>(reinterpret_cast<const bf*>(&held_d[v]), df);
    load_bf<8>(w + q * 8, wf);
    load_bf<8>(dxi + q * 8, g);
#pragma unroll
    for (int k = 0; k < 8; ++k) g[k] = g[k] + r * (df[k] * wf[k] - xf[k] * r * k_mean);
    store_bf<8>(dxi + q * 8, g);
  }
}

// The backward for warp teams (C <= 2048) with the weight gradient fused in: block g takes rows
// [g * rows_per_group, ...), its warp w the rows w, w + kRowWarps, ... of them in order, and each
// lane adds dout * x * rstd of its columns into this warp's shared accumulators (in double, laid
// out lane-fastest: no bank conflicts). The warps' sums are then added in warp order into
// partials[g*C + j], which column_finish_kernel adds up in group order: a fixed order, so
// bit-identical run to run. dout and x are read once for dx and dw together.
template <int kVec, int kRowWarps>
__global__ void __launch_bounds__(32 * kRowWarps)
    rmsnorm_backward_fused_kernel(bf* dx, double* partials, const bf* dout, const bf* x, const bf* w, const float* rstd,
                                  int64_t N, int64_t C, int64_t rows_per_group) {
  __shared__ double dw_acc[kRowWarps][kVec * 8][32];  // [warp][v * 8 + k][lane]: column (v*32 + lane)*8 + k
  const int lane = int(threadIdx.x % 32), warp = int(threadIdx.x / 32);
  const int64_t vecs = C / 8;
#pragma unroll
  for (int e = 0; e < kVec * 8; ++e) dw_acc[warp][e][lane] = 0.0;
  const int64_t r0 = int64_t(blockIdx.x) * rows_per_group, r1 = min(N, r0 + rows_per_group);
  for (int64_t row = r0 + warp; row < r1; row += kRowWarps) {
    const bf* xi = x + row * C;
    const bf* di = dout + row * C;
    const float r = rstd[row];
    uint4 held_x[kVec], held_d[kVec];
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      const int64_t q = int64_t(v) * 32 + lane;
      if (q < vecs) {
        held_x[v] = *reinterpret_cast<const uint4*>(xi + q * 8);
        held_d[v] = *reinterpret_cast<const uint4*>(di + q * 8);
      }
    }
    double dot = 0;
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      const int64_t q = int64_t(v) * 32 + lane;
      if (q >= vecs) break;
      float xf[8], df[8], wf[8];
      load_bf<8>(reinterpret_cast<const bf*>(&held_x[v]), xf);
      load_bf<8>(reinterpret_cast<const bf*>(&held_d[v]), df);
      load_bf<8>(w + q * 8, wf);
#pragma unroll
      for (int k = 0; k < 8; ++k) dot += double(df[k]) * double(wf[k]) * double(xf[k]);
    }
    dot = team_sum<32>(dot, nullptr);
    const float k_mean = float(dot * double(r) / double(C));  // mean(g * xhat)
    bf* dxi = dx + row * C;
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      const int64_t q = int64_t(v) * 32 + lane;
      if (q >= vecs) break;
      float xf[8], df[8], wf[8], g[8];
      load_bf<8>(reinterpret_cast<const bf*>(&held_x[v]), xf);
      load_bf<8>(reinterpret_cast<const bf*>(&held_d[v]), df);
      load_bf<8>(w + q * 8, wf);
      load_bf<8>(dxi + q * 8, g);
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        g[k] = g[k] + r * (df[k] * wf[k] - xf[k] * r * k_mean);
        dw_acc[warp][v * 8 + k][lane] += double(df[k]) * double(xf[k]) * double(r);
      }
      store_bf<8>(dxi + q * 8, g);
    }
  }
  __syncthreads();
  for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
    const int64_t q = j / 8;
    const int e = int(q / 32) * 8 + int(j % 8), l = int(q % 32);
    double s = dw_acc[0][e][l];
    for (int k = 1; k < kRowWarps; ++k) s += dw_acc[k][e][l];
    partials[int64_t(blockIdx.x) * C + j] = s;
  }
}

// Terms of the column sums, W consecutive columns at a time: rmsnorm's dw (dout * x * rstd) and
// the bias gradient (dout), each added in double.
struct NormWeightTerm {
  const bf* dout;
  const bf* x;
  const float* rstd;
  int64_t C;
  template <int W>
  __device__ void add(int64_t i, int64_t j, double (&acc)[W]) const {
    float d[W], xv[W];
    load_bf<W>(dout + i * C + j, d);
    load_bf<W>(x + i * C + j, xv);
    const double r = rstd[i];
#pragma unroll
    for (int k = 0; k < W; ++k) acc[k] += double(d[k]) * double(xv[k]) * r;
  }
};
struct BiasTerm {
  const bf* dout;
  int64_t ld;
  template <int W>
  __device__ void add(int64_t i, int64_t j, double (&acc)[W]) const {
    float d[W];
    load_bf<W>(dout + i * ld + j, d);
#pragma unroll
    for (int k = 0; k < W; ++k) acc[k] += d[k];
  }
};

// partials(groups, C): partials[g*C + j] = Σ term(i, j) over the rows of group g, in double.
// Grid: (ceil(C / (32 W)) column tiles, groups). Lane l of warp s owns columns l*W ... of the tile
// and sums rows r0 + s, r0 + s + kWarps, ... in row order; the warps' sums are then added in warp
// order (a fixed order: bit-identical run to run). A warp reads 32 W consecutive columns per row.
template <int W, class Term>
__global__ void __launch_bounds__(kThreads)
    column_partials_kernel(double* partials, Term term, int64_t N, int64_t C, int64_t rows_per_group) {
  __shared__ double slice_sums[kWarps][32 * W];
  const int lane = int(threadIdx.x % 32), slice = int(threadIdx.x / 32);
  const int64_t tile = int64_t(blockIdx.x) * 32 * W, j = tile + int64_t(lane) * W;
  const int64_t g = blockIdx.y, r0 = g * rows_per_group, r1 = min(N, r0 + rows_per_group);
  double acc[W] = {};
  if (j < C)
#pragma unroll 4  // loads in flight: the adds stay in row order
    for (int64_t i = r0 + slice; i < r1; i += kWarps) term.template add<W>(i, j, acc);
#pragma unroll
  for (int k = 0; k < W; ++k) slice_sums[slice][lane * W + k] = acc[k];
  __syncthreads();
  for (int c = int(threadIdx.x); c < 32 * W; c += kThreads) {
    if (tile + c >= C) break;
    double s = slice_sums[0][c];
    for (int k = 1; k < kWarps; ++k) s += slice_sums[k][c];
    partials[g * C + tile + c] = s;
  }
}

// out[j] += float(Σ_g partials[g*C + j]). Lane l of warp s sums column 32*block + l over groups
// s, s + kWarps, ... in order; the warps' sums are then added in warp order.
__global__ void __launch_bounds__(kThreads)
    column_finish_kernel(float* out, const double* partials, int64_t groups, int64_t C) {
  __shared__ double slice_sums[kWarps][32];
  const int lane = int(threadIdx.x % 32), slice = int(threadIdx.x / 32);
  const int64_t j = int64_t(blockIdx.x) * 32 + lane;
  double s = 0;
  if (j < C)
#pragma unroll 8  // loads in flight: the adds stay in group order
    for (int64_t g = slice; g < groups; g += kWarps) s += partials[g * C + j];
  slice_sums[slice][lane] = s;
  __syncthreads();
  if (slice == 0 && j < C) {
    double total = slice_sums[0][lane];
    for (int k = 1; k < kWarps; ++k) total += slice_sums[k][lane];
    out[j] += float(total);
  }
}

// x(N, C; row stride ld) += bias, W columns per thread (its bias held across rows).
template <int W>
__global__ void add_bias_kernel(bf* x, const bf* bias, int64_t N, int64_t C, int64_t ld) {
  const int64_t j = row_item() * W;
  if (j >= C) return;
  float b[W];
  load_bf<W>(bias + j, b);
  for (int64_t i = first_row(); i < N; i += row_stride()) {
    float v[W];
    load_bf<W>(x + i * ld + j, v);
#pragma unroll
    for (int k = 0; k < W; ++k) v[k] = v[k] + b[k];
    store_bf<W>(x + i * ld + j, v);
  }
}

// One thread per W rotated pairs (row i, head h, j ... j + W - 1 < half): (v[j], v[j+half])
// rotated by the angle of position positions[i] (sign = -1: by minus the angle, the transpose).
// Row items: heads * (half / W), head-major.
template <int W>
__global__ void rope_kernel(bf* x, int64_t N, int64_t ld, int64_t off, int heads, int head_dim,
                            const int32_t* positions, const float* cos, const float* sin, float sign) {
  const int half = head_dim / 2, per_head = half / W;
  const int64_t item = row_item();
  if (item >= int64_t(heads) * per_head) return;
  const int h = int(item) / per_head, j = (int(item) - h * per_head) * W;
  for (int64_t i = first_row(); i < N; i += row_stride()) {
    const int64_t table = int64_t(positions[i]) * half + j;
    float c[W], s[W], a[W], b[W];
    load_f<W>(cos + table, c);
    load_f<W>(sin + table, s);
    bf* v = x + i * ld + off + int64_t(h) * head_dim + j;
    load_bf<W>(v, a);
    load_bf<W>(v + half, b);
    float ra[W], rb[W];
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const float sk = sign * s[k];
      ra[k] = a[k] * c[k] - b[k] * sk;
      rb[k] = b[k] * c[k] + a[k] * sk;
    }
    store_bf<W>(v, ra);
    store_bf<W>(v + half, rb);
  }
}

// out(N, F) = silu(gate) * up with gu(N, 2F) = [gate | up], W columns per thread.
template <int W>
__global__ void swiglu_forward_kernel(bf* out, const bf* gu, int64_t N, int64_t F) {
  const int64_t j = row_item() * W;
  if (j >= F) return;
  for (int64_t i = first_row(); i < N; i += row_stride()) {
    float g[W], u[W], o[W];
    load_bf<W>(gu + i * 2 * F + j, g);
    load_bf<W>(gu + i * 2 * F + F + j, u);
#pragma unroll
    for (int k = 0; k < W; ++k) o[k] = g[k] / (1.0f + expf(-g[k])) * u[k];
    store_bf<W>(out + i * F + j, o);
  }
}

// dg = d*u*s*(1 + g*(1-s)), du = d*g*s with s = sigmoid(g) (cpu/vecmath.h).
template <int W>
__global__ void swiglu_backward_kernel(bf* dgu, const bf* dout, const bf* gu, int64_t N, int64_t F) {
  const int64_t j = row_item() * W;
  if (j >= F) return;
  for (int64_t i = first_row(); i < N; i += row_stride()) {
    float g[W], u[W], d[W], dg[W], du[W];
    load_bf<W>(gu + i * 2 * F + j, g);
    load_bf<W>(gu + i * 2 * F + F + j, u);
    load_bf<W>(dout + i * F + j, d);
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const float s = 1.0f / (1.0f + expf(-g[k]));
      dg[k] = d[k] * u[k] * s * (1.0f + g[k] * (1.0f - s));
      du[k] = d[k] * g[k] * s;
    }
    store_bf<W>(dgu + i * 2 * F + j, dg);
    store_bf<W>(dgu + i * 2 * F + F + j, du);
  }
}

// The optimizers' scalars, computed on the host exactly as cpu_ops.cpp computes them.
struct AdamScalars {
  float b1, b2, gs, keep, step_size, inv_sqrt_bc2, eps;
};
struct RmspropScalars {
  float a, gs, keep, lr, eps;
};

// One element of each update, shared by the update kernels and their dry runs so that both
// compute the same values: the moments in place, the updated weight returned.
__device__ __forceinline__ float adamw_element(const AdamScalars& s, float g, float& m, float& v, float w) {
  const float gi = g * s.gs;
  m = s.b1 * m + (1.0f - s.b1) * gi;
  v = s.b2 * v + (1.0f - s.b2) * gi * gi;
  return w * s.keep - s.step_size * m / (sqrtf(v) * s.inv_sqrt_bc2 + s.eps);
}

__device__ __forceinline__ float rmsprop_element(const RmspropScalars& s, float g, float& sq, float w) {
  const float gi = g * s.gs;
  sq = s.a * sq + (1.0f - s.a) * gi * gi;
  return w * s.keep - s.lr * gi / (sqrtf(sq) + s.eps);
}

// The update applies to master (when given) and p becomes bf16(master); without master, p's
// bf16 value is updated in place.
template <class G>
__global__ void adamw_kernel(bf* p, float* master, const G* g, float* m, float* v, int64_t n, AdamScalars s) {
  for (int64_t i = first_index(); i < n; i += grid_stride()) {
    float mi = m[i], vi = v[i];
    const float updated = adamw_element(s, grad_f(g[i]), mi, vi, master ? master[i] : to_f(p[i]));
    m[i] = mi;
    v[i] = vi;
    if (master) master[i] = updated;
    p[i] = to_bf(updated);
  }
}

template <class G>
__global__ void rmsprop_kernel(bf* p, float* master, const G* g, float* sq, int64_t n, RmspropScalars s) {
  for (int64_t i = first_index(); i < n; i += grid_stride()) {
    float si = sq[i];
    const float updated = rmsprop_element(s, grad_f(g[i]), si, master ? master[i] : to_f(p[i]));
    sq[i] = si;
    if (master) master[i] = updated;
    p[i] = to_bf(updated);
  }
}

// The dry runs: partials[block] = 1 when an element of this block's share would be written
// non-finite (a moment, or the weight as bf16, which overflows wherever its float does), else 0.
template <class G>
__global__ void __launch_bounds__(kThreads)
    adamw_finite_kernel(double* partials, const bf* p, const float* master, const G* g, const float* m, const float* v,
                        int64_t n, AdamScalars s) {
  int bad = 0;
  for (int64_t i = first_index(); i < n; i += grid_stride()) {
    float mi = m[i], vi = v[i];
    const float updated = adamw_element(s, grad_f(g[i]), mi, vi, master ? master[i] : to_f(p[i]));
    bad |= !isfinite(mi) || !isfinite(vi) || !isfinite(to_f(to_bf(updated)));
  }
  bad = __syncthreads_or(bad);
  if (threadIdx.x == 0) partials[blockIdx.x] = bad ? 1.0 : 0.0;
}

template <class G>
__global__ void __launch_bounds__(kThreads)
    rmsprop_finite_kernel(double* partials, const bf* p, const float* master, const G* g, const float* sq, int64_t n,
                          RmspropScalars s) {
  int bad = 0;
  for (int64_t i = first_index(); i < n; i += grid_stride()) {
    float si = sq[i];
    const float updated = rmsprop_element(s, grad_f(g[i]), si, master ? master[i] : to_f(p[i]));
    bad |= !isfinite(si) || !isfinite(to_f(to_bf(updated)));
  }
  bad = __syncthreads_or(bad);
  if (threadIdx.x == 0) partials[blockIdx.x] = bad ? 1.0 : 0.0;
}

// g = bf16(float(g) + x): a micro-batch's fp32 gradient added into the bf16 buffer (the float sum,
// rounded to bf16).
__global__ void add_round_kernel(bf* g, const float* x, int64_t n) {
  for (int64_t i = first_index(); i < n; i += grid_stride()) g[i] = to_bf(to_f(g[i]) + x[i]);
}

AdamScalars adam_scalars(double lr, double beta1, double beta2, double eps, double decay, double gscale, int64_t step) {
  return AdamScalars{float(beta1),
                     float(beta2),
                     float(gscale),
                     float(1.0 - decay),
                     float(lr / (1.0 - std::pow(beta1, double(step)))),
                     float(1.0 / std::sqrt(1.0 - std::pow(beta2, double(step)))),
                     float(eps)};
}

RmspropScalars rmsprop_scalars(double lr, double alpha, double eps, double decay, double gscale) {
  return RmspropScalars{float(alpha), float(gscale), float(1.0 - decay), float(lr), float(eps)};
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
  std::string msg =
      (e == cudaErrorMemoryAllocation ? "CUDA out of memory: could not allocate " : "CUDA could not allocate ") +
      format_bytes(bytes) + " on device " + std::to_string(device);
  if (known) {
    char buf[96];
    std::snprintf(buf, sizeof buf, " (%.2f GiB free of %.2f GiB)", double(free_b) / double(1 << 30),
                  double(total_b) / double(1 << 30));
    msg += buf;
  }
  if (e != cudaErrorMemoryAllocation)
    msg += std::string(": ") + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
  throw Error(msg);
}

// Column-sum partition: at most 256 row groups of at least 64 rows (8 per warp of a block), a
// function of N alone. At N = 16384 and C = 768 that is 768 blocks of partials, and 1.5 MB of them.
struct RowGroups {
  int64_t groups, rows_per_group;
};
RowGroups row_groups(int64_t N) {
  const int64_t wanted = std::clamp<int64_t>((N + 63) / 64, 1, 256);
  const int64_t per = (N + wanted - 1) / wanted;
  return {(N + per - 1) / per, per};
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// W: whether a pointer and a row length in elements (bf16: 8 per 16 bytes) allow 8-wide accesses.
bool vec8(const void* p, int64_t elems) { return aligned16(p) && elems % 8 == 0; }

// Launch shape of the row kernels (row_item / first_row): blockDim.x threads, a multiple of 32 up
// to kThreads, cover a row's `items` in gridDim.x blocks; the rest of the kThreads threads take
// more rows (blockDim.y per block), and gridDim.y is capped (the kernels loop over further rows).
struct RowLaunch {
  dim3 grid, block;
};
RowLaunch row_launch(int64_t items, int64_t rows) {
  const int64_t bx = std::min<int64_t>(kThreads, (items + 31) / 32 * 32), by = kThreads / bx;
  return {dim3(unsigned((items + bx - 1) / bx), unsigned(std::min<int64_t>((rows + by - 1) / by, 65535))),
          dim3(unsigned(bx), unsigned(by))};
}

}  // namespace

// Partial sums of the deterministic reductions: grown on demand (never per step once sized).
struct ReduceState {
  double* partials = nullptr;  // device, `capacity` doubles
  size_t capacity = 0;
  std::vector<double> host;  // the kReduceBlocks whole-array partials, read back
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

// Whether no block of a flag reduction (partials[block] = 1 where its share holds a flagged
// element) raised its flag: reads the kReduceBlocks partials back.
bool no_block_flagged(CudaOps& ops, ReduceState& r, const double* partials) {
  r.host.resize(kReduceBlocks);
  ops.download_bytes(r.host.data(), partials, kReduceBlocks * sizeof(double));
  for (int b = 0; b < kReduceBlocks; ++b)
    if (r.host[b] != 0.0) return false;
  return true;
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

// Rows of C bf16 from src (rows src_rows[i], or i) to dst (rows dst_rows[i], or i).
void copy_rows(bf* dst, const int32_t* dst_rows, const bf* src, const int32_t* src_rows, int64_t n, int64_t C,
               cudaStream_t stream) {
  if (vec8(dst, C) && vec8(src, C)) {
    const RowLaunch l = row_launch(C / 8, n);
    copy_rows_kernel<8><<<l.grid, l.block, 0, stream>>>(dst, dst_rows, src, src_rows, n, C);
  } else {
    const RowLaunch l = row_launch(C, n);
    copy_rows_kernel<1><<<l.grid, l.block, 0, stream>>>(dst, dst_rows, src, src_rows, n, C);
  }
  SPPO_CUDA_LAUNCHED(copy_rows_kernel);
}

// out(C) += column sums of term over N rows: row-group partials, then a fixed-order finish.
// `vec`: every row of the term's arrays starts 16-byte aligned and C % 8 == 0 (8 columns a lane).
template <class Term>
void column_sums(float* out, Term term, bool vec, int64_t N, int64_t C, ReduceState& r, cudaStream_t stream,
                 int device) {
  const RowGroups rg = row_groups(N);
  double* partials = partials_for(r, size_t(rg.groups * C), stream, device);
  const int W = vec ? 8 : 1;
  const dim3 grid(unsigned((C + 32 * W - 1) / (32 * W)), unsigned(rg.groups));
  if (vec)
    column_partials_kernel<8><<<grid, kThreads, 0, stream>>>(partials, term, N, C, rg.rows_per_group);
  else
    column_partials_kernel<1><<<grid, kThreads, 0, stream>>>(partials, term, N, C, rg.rows_per_group);
  SPPO_CUDA_LAUNCHED(column_partials_kernel);
  column_finish_kernel<<<unsigned((C + 31) / 32), kThreads, 0, stream>>>(out, partials, rg.groups, C);
  SPPO_CUDA_LAUNCHED(column_finish_kernel);
}

// The row-in-registers RMSNorm kernels' vectors per thread (kVec, as std::integral_constant) for
// a row of `vecs` 8-column vectors: with_warp_vecs for a warp team (vecs <= 256: 1, 2, 4 or 8),
// with_block_vecs for a block team (vecs <= kMaxRowVecs: 2 or 4).
template <class F>
void with_warp_vecs(int64_t vecs, F&& f) {
  using std::integral_constant;
  if (vecs <= 32)
    f(integral_constant<int, 1>());
  else if (vecs <= 64)
    f(integral_constant<int, 2>());
  else if (vecs <= 128)
    f(integral_constant<int, 4>());
  else
    f(integral_constant<int, 8>());
}
template <class F>
void with_block_vecs(int64_t vecs, F&& f) {
  if (vecs <= 2 * kThreads)
    f(std::integral_constant<int, 2>());
  else
    f(std::integral_constant<int, 4>());
}

// rmsnorm_backward with dw fused (C % 8 == 0, C <= 2048, aligned rows): four warps a block up to
// C = 1024, two up to 2048 (32 KB of shared accumulators either way), 8 rows a warp; then the
// fixed-order finish of the column partials.
void rmsnorm_backward_fused(bf* dx, float* dw, const bf* dout, const bf* x, const bf* w, const float* rstd, int64_t N,
                            int64_t C, ReduceState& r, cudaStream_t stream, int device) {
  with_warp_vecs(C / 8, [&](auto vec) {
    constexpr int kVec = decltype(vec)::value, kRowWarps = kVec == 8 ? 2 : 4;
    const int64_t rows_per_group = 8 * kRowWarps, groups = (N + rows_per_group - 1) / rows_per_group;
    double* partials = partials_for(r, size_t(groups * C), stream, device);
    rmsnorm_backward_fused_kernel<kVec, kRowWarps>
        <<<unsigned(groups), 32 * kRowWarps, 0, stream>>>(dx, partials, dout, x, w, rstd, N, C, rows_per_group);
    SPPO_CUDA_LAUNCHED(rmsnorm_backward_fused_kernel);
    column_finish_kernel<<<unsigned((C + 31) / 32), kThreads, 0, stream>>>(dw, partials, groups, C);
    SPPO_CUDA_LAUNCHED(column_finish_kernel);
  });
}

// rmsnorm_forward in the row-in-registers kernels (C % 8 == 0, C / 8 <= kMaxRowVecs, aligned
// rows): a warp per row up to C = 2048 (8 vectors a lane), a block per row above, so a thread
// holds at most 8 vectors (no spills). Blocks hold kThreads / kTeam rows.
void rmsnorm_forward_rows(bf* out, float* rstd, const bf* x, const bf* w, int64_t N, int64_t C, double eps,
                          cudaStream_t stream) {
  const auto run = [&](auto team, auto vec) {
    constexpr int kTeam = decltype(team)::value, kVec = decltype(vec)::value;
    const int64_t rows_per_block = kThreads / kTeam;
    rmsnorm_forward_rows_kernel<kTeam, kVec>
        <<<unsigned((N + rows_per_block - 1) / rows_per_block), kThreads, 0, stream>>>(out, rstd, x, w, N, C, eps);
    SPPO_CUDA_LAUNCHED(rmsnorm_forward_rows_kernel);
  };
  const int64_t vecs = C / 8;
  if (vecs <= 256)
    with_warp_vecs(vecs, [&](auto vec) { run(std::integral_constant<int, 32>(), vec); });
  else
    with_block_vecs(vecs, [&](auto vec) { run(std::integral_constant<int, kThreads>(), vec); });
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
    d.why_not =
        std::string("CUDA device 0 did not answer: ") + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
    return d;
  }
  d.name = prop.name;
  d.sm_major = prop.major;
  d.sm_minor = prop.minor;
  d.total_memory = prop.totalGlobalMem;
  // The kernels exist only for the architectures the build targeted (CMAKE_CUDA_ARCHITECTURES).
  cudaFuncAttributes attr{};
  if ((e = cudaFuncGetAttributes(&attr, cast_kernel<1>)) != cudaSuccess) {
    (void)cudaGetLastError();
    d.why_not = "this build has no kernels for " + d.name + " (compute capability " + std::to_string(prop.major) + "." +
                std::to_string(prop.minor) + "): " + cudaGetErrorName(e) +
                "; rebuild with CMAKE_CUDA_ARCHITECTURES including " + std::to_string(prop.major * 10 + prop.minor);
    return d;
  }
  if ((e = cudaMemGetInfo(&d.free_memory, &d.total_memory)) != cudaSuccess) {
    (void)cudaGetLastError();
    d.why_not =
        "CUDA device 0 (" + d.name + ") cannot be used: " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
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
  SPPO_REQUIRE(device == 0, "CUDA device ", device,
               ": only device 0 is supported (set CUDA_VISIBLE_DEVICES to pick a GPU)");
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

size_t CudaOps::plan_scratch(int64_t max_seq, int64_t head_dim) { return footprint().scratch_bytes(max_seq, head_dim); }

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
  if (aligned16(dst) && aligned16(src))
    cast_kernel<8><<<grid_for((n + 7) / 8), kThreads, 0, stream_>>>(dev(dst), src, n);
  else
    cast_kernel<1><<<grid_for(n), kThreads, 0, stream_>>>(dev(dst), src, n);
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

template <class X>
const std::vector<double>& CudaOps::reduce_blocks(void (*kernel)(double*, const X*, int64_t), const X* x, int64_t n) {
  ReduceState& r = reduce_state();
  double* partials = partials_for(r, kReduceBlocks, stream_, device_);
  kernel<<<kReduceBlocks, kThreads, 0, stream_>>>(partials, x, n);
  SPPO_CUDA_LAUNCHED(kernel);
  r.host.resize(kReduceBlocks);
  download_bytes(r.host.data(), partials, kReduceBlocks * sizeof(double));
  return r.host;
}

double CudaOps::sum_squares(const float* x, int64_t n) {
  if (n <= 0) return 0.0;
  double total = 0;
  for (double partial : reduce_blocks(sum_squares_kernel<float>, x, n)) total += partial;
  return total;
}

double CudaOps::sum_squares(const bf16* x, int64_t n) {
  if (n <= 0) return 0.0;
  double total = 0;
  for (double partial : reduce_blocks(sum_squares_kernel<bf>, dev(x), n)) total += partial;
  return total;
}

bool CudaOps::all_finite(const float* x, int64_t n) {
  if (n <= 0) return true;
  for (double partial : reduce_blocks(non_finite_kernel, x, n))
    if (partial != 0.0) return false;
  return true;
}

// ---------------------------------------------------------------------------------------------
// Embeddings and row moves
// ---------------------------------------------------------------------------------------------

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
                                                  static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr),
                                                  n, 0, 32, stream_));
  sort_buffers_for(r, size_t(N), temp_bytes, stream_, device_);
  SPPO_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(r.sort_temp, temp_bytes, keys_in, r.sorted_keys, r.iota,
                                                  r.sorted_tokens, n, 0, 32, stream_));
  SPPO_CUDA_LAUNCHED(cub::DeviceRadixSort::SortPairs);
  const int64_t chunks = (C + kEmbChunk - 1) / kEmbChunk;
  const unsigned blocks = unsigned(std::min<int64_t>((N * chunks + kWarps - 1) / kWarps, kMaxBlocks));
  embedding_backward_kernel<<<blocks, kThreads, 0, stream_>>>(dtable, dev(dout), r.sorted_keys, r.sorted_tokens, N, C,
                                                              chunks);
  SPPO_CUDA_LAUNCHED(embedding_backward_kernel);
}

void CudaOps::gather_rows(bf16* dst, const bf16* src, const int32_t* rows, int64_t n, int64_t C) {
  if (n <= 0 || C <= 0) return;
  copy_rows(dev(dst), nullptr, dev(src), rows, n, C, stream_);
}

void CudaOps::scatter_rows(bf16* dst, const bf16* src, const int32_t* rows, int64_t n, int64_t C) {
  if (n <= 0 || C <= 0) return;
  copy_rows(dev(dst), rows, dev(src), nullptr, n, C, stream_);
}

// ---------------------------------------------------------------------------------------------
// RMSNorm and bias
// ---------------------------------------------------------------------------------------------

void CudaOps::rmsnorm_forward(bf16* out, float* rstd, const bf16* x, const bf16* w, int64_t N, int64_t C, double eps) {
  if (N <= 0 || C <= 0) return;
  if (vec8(x, C) && vec8(out, C) && aligned16(w) && C / 8 <= kMaxRowVecs) {
    rmsnorm_forward_rows(dev(out), rstd, dev(x), dev(w), N, C, eps, stream_);
    return;
  }
  const unsigned blocks = unsigned(std::min<int64_t>(N, kMaxBlocks));
  rmsnorm_forward_kernel<<<blocks, kThreads, 0, stream_>>>(dev(out), rstd, dev(x), dev(w), N, C, eps);
  SPPO_CUDA_LAUNCHED(rmsnorm_forward_kernel);
}

void CudaOps::rmsnorm_backward(bf16* dx, float* dw, const bf16* dout, const bf16* x, const bf16* w, const float* rstd,
                               int64_t N, int64_t C) {
  if (N <= 0 || C <= 0) return;
  const bool vec = vec8(dout, C) && vec8(x, C);
  if (dw && vec && vec8(dx, C) && aligned16(w) && C <= 2048) {
    rmsnorm_backward_fused(dev(dx), dw, dev(dout), dev(x), dev(w), rstd, N, C, reduce_state(), stream_, device_);
    return;
  }
  if (vec && vec8(dx, C) && aligned16(w) && C / 8 <= kMaxRowVecs) {  // a block per row: C > 2048, or no dw
    with_block_vecs(C / 8, [&](auto vec) {
      rmsnorm_backward_dx_rows_kernel<decltype(vec)::value>
          <<<unsigned(N), kThreads, 0, stream_>>>(dev(dx), dev(dout), dev(x), dev(w), rstd, N, C);
    });
    SPPO_CUDA_LAUNCHED(rmsnorm_backward_dx_rows_kernel);
  } else {
    const unsigned blocks = unsigned(std::min<int64_t>(N, kMaxBlocks));
    rmsnorm_backward_dx_kernel<<<blocks, kThreads, 0, stream_>>>(dev(dx), dev(dout), dev(x), dev(w), rstd, N, C);
    SPPO_CUDA_LAUNCHED(rmsnorm_backward_dx_kernel);
  }
  if (dw) column_sums(dw, NormWeightTerm{dev(dout), dev(x), rstd, C}, vec, N, C, reduce_state(), stream_, device_);
}

void CudaOps::add_bias(bf16* x, const bf16* bias, int64_t N, int64_t C, int64_t ld) {
  if (N <= 0 || C <= 0) return;
  if (vec8(x, ld) && vec8(bias, C)) {
    const RowLaunch l = row_launch(C / 8, N);
    add_bias_kernel<8><<<l.grid, l.block, 0, stream_>>>(dev(x), dev(bias), N, C, ld);
  } else {
    const RowLaunch l = row_launch(C, N);
    add_bias_kernel<1><<<l.grid, l.block, 0, stream_>>>(dev(x), dev(bias), N, C, ld);
  }
  SPPO_CUDA_LAUNCHED(add_bias_kernel);
}

void CudaOps::bias_backward(float* dbias, const bf16* dout, int64_t N, int64_t C, int64_t ld) {
  if (N <= 0 || C <= 0) return;
  column_sums(dbias, BiasTerm{dev(dout), ld}, vec8(dout, ld) && C % 8 == 0, N, C, reduce_state(), stream_, device_);
}

// ---------------------------------------------------------------------------------------------
// RoPE and SwiGLU
// ---------------------------------------------------------------------------------------------

void CudaOps::rope(bf16* x, int64_t N, int64_t ld, int64_t off, int64_t heads, int64_t head_dim,
                   const int32_t* positions, const float* cos, const float* sin, bool inverse) {
  const int64_t half = head_dim / 2;
  if (N <= 0 || heads <= 0 || half <= 0) return;
  SPPO_REQUIRE(heads * head_dim < INT_MAX, "rope: ", heads, " heads of ", head_dim, " exceed the int column index");
  const float sign = inverse ? -1.0f : 1.0f;
  // 8 pairs a thread where every row, head and half-head starts 16 bytes aligned (also in the tables).
  if (vec8(x, ld) && off % 8 == 0 && head_dim % 16 == 0 && aligned16(cos) && aligned16(sin)) {
    const RowLaunch l = row_launch(heads * half / 8, N);
    rope_kernel<8>
        <<<l.grid, l.block, 0, stream_>>>(dev(x), N, ld, off, int(heads), int(head_dim), positions, cos, sin, sign);
  } else {
    const RowLaunch l = row_launch(heads * half, N);
    rope_kernel<1>
        <<<l.grid, l.block, 0, stream_>>>(dev(x), N, ld, off, int(heads), int(head_dim), positions, cos, sin, sign);
  }
  SPPO_CUDA_LAUNCHED(rope_kernel);
}

void CudaOps::swiglu_forward(bf16* out, const bf16* gu, int64_t N, int64_t F) {
  if (N <= 0 || F <= 0) return;
  if (vec8(out, F) && vec8(gu, F)) {
    const RowLaunch l = row_launch(F / 8, N);
    swiglu_forward_kernel<8><<<l.grid, l.block, 0, stream_>>>(dev(out), dev(gu), N, F);
  } else {
    const RowLaunch l = row_launch(F, N);
    swiglu_forward_kernel<1><<<l.grid, l.block, 0, stream_>>>(dev(out), dev(gu), N, F);
  }
  SPPO_CUDA_LAUNCHED(swiglu_forward_kernel);
}

void CudaOps::swiglu_backward(bf16* dgu, const bf16* dout, const bf16* gu, int64_t N, int64_t F) {
  if (N <= 0 || F <= 0) return;
  if (vec8(dgu, F) && vec8(dout, F) && vec8(gu, F)) {
    const RowLaunch l = row_launch(F / 8, N);
    swiglu_backward_kernel<8><<<l.grid, l.block, 0, stream_>>>(dev(dgu), dev(dout), dev(gu), N, F);
  } else {
    const RowLaunch l = row_launch(F, N);
    swiglu_backward_kernel<1><<<l.grid, l.block, 0, stream_>>>(dev(dgu), dev(dout), dev(gu), N, F);
  }
  SPPO_CUDA_LAUNCHED(swiglu_backward_kernel);
}

// ---------------------------------------------------------------------------------------------
// Optimizers
// ---------------------------------------------------------------------------------------------

// Each update has one body for both gradient precisions (G: float, or the device's bf16).
template <class G>
void CudaOps::adamw_launch(bf16* p, float* master, const G* g, float* m, float* v, int64_t n, double lr, double beta1,
                           double beta2, double eps, double decay, double gscale, int64_t step) {
  if (n <= 0) return;
  const AdamScalars s = adam_scalars(lr, beta1, beta2, eps, decay, gscale, step);
  adamw_kernel<<<grid_for(n), kThreads, 0, stream_>>>(dev(p), master, g, m, v, n, s);
  SPPO_CUDA_LAUNCHED(adamw_kernel);
}

template <class G>
void CudaOps::rmsprop_launch(bf16* p, float* master, const G* g, float* sq, int64_t n, double lr, double alpha,
                             double eps, double decay, double gscale) {
  if (n <= 0) return;
  const RmspropScalars s = rmsprop_scalars(lr, alpha, eps, decay, gscale);
  rmsprop_kernel<<<grid_for(n), kThreads, 0, stream_>>>(dev(p), master, g, sq, n, s);
  SPPO_CUDA_LAUNCHED(rmsprop_kernel);
}

// The dry runs reduce to one flag per block, as all_finite does: a device kernel rather than a
// copy of the state to the host, so a rare check costs one read of the state at memory speed.
template <class G>
bool CudaOps::adamw_finite_launch(const bf16* p, const float* master, const G* g, const float* m, const float* v,
                                  int64_t n, double lr, double beta1, double beta2, double eps, double decay,
                                  double gscale, int64_t step) {
  if (n <= 0) return true;
  ReduceState& r = reduce_state();
  double* partials = partials_for(r, kReduceBlocks, stream_, device_);
  adamw_finite_kernel<<<kReduceBlocks, kThreads, 0, stream_>>>(
      partials, dev(p), master, g, m, v, n, adam_scalars(lr, beta1, beta2, eps, decay, gscale, step));
  SPPO_CUDA_LAUNCHED(adamw_finite_kernel);
  return no_block_flagged(*this, r, partials);
}

template <class G>
bool CudaOps::rmsprop_finite_launch(const bf16* p, const float* master, const G* g, const float* sq, int64_t n,
                                    double lr, double alpha, double eps, double decay, double gscale) {
  if (n <= 0) return true;
  ReduceState& r = reduce_state();
  double* partials = partials_for(r, kReduceBlocks, stream_, device_);
  rmsprop_finite_kernel<<<kReduceBlocks, kThreads, 0, stream_>>>(partials, dev(p), master, g, sq, n,
                                                                 rmsprop_scalars(lr, alpha, eps, decay, gscale));
  SPPO_CUDA_LAUNCHED(rmsprop_finite_kernel);
  return no_block_flagged(*this, r, partials);
}

void CudaOps::adamw_update(bf16* p, float* master, const float* g, float* m, float* v, int64_t n, double lr,
                           double beta1, double beta2, double eps, double decay, double gscale, int64_t step) {
  adamw_launch(p, master, g, m, v, n, lr, beta1, beta2, eps, decay, gscale, step);
}

void CudaOps::adamw_update(bf16* p, float* master, const bf16* g, float* m, float* v, int64_t n, double lr,
                           double beta1, double beta2, double eps, double decay, double gscale, int64_t step) {
  adamw_launch(p, master, dev(g), m, v, n, lr, beta1, beta2, eps, decay, gscale, step);
}

void CudaOps::rmsprop_update(bf16* p, float* master, const float* g, float* sq, int64_t n, double lr, double alpha,
                             double eps, double decay, double gscale) {
  rmsprop_launch(p, master, g, sq, n, lr, alpha, eps, decay, gscale);
}

void CudaOps::rmsprop_update(bf16* p, float* master, const bf16* g, float* sq, int64_t n, double lr, double alpha,
                             double eps, double decay, double gscale) {
  rmsprop_launch(p, master, dev(g), sq, n, lr, alpha, eps, decay, gscale);
}

bool CudaOps::adamw_update_finite(const bf16* p, const float* master, const float* g, const float* m, const float* v,
                                  int64_t n, double lr, double beta1, double beta2, double eps, double decay,
                                  double gscale, int64_t step) {
  return adamw_finite_launch(p, master, g, m, v, n, lr, beta1, beta2, eps, decay, gscale, step);
}

bool CudaOps::adamw_update_finite(const bf16* p, const float* master, const bf16* g, const float* m, const float* v,
                                  int64_t n, double lr, double beta1, double beta2, double eps, double decay,
                                  double gscale, int64_t step) {
  return adamw_finite_launch(p, master, dev(g), m, v, n, lr, beta1, beta2, eps, decay, gscale, step);
}

bool CudaOps::rmsprop_update_finite(const bf16* p, const float* master, const float* g, const float* sq, int64_t n,
                                    double lr, double alpha, double eps, double decay, double gscale) {
  return rmsprop_finite_launch(p, master, g, sq, n, lr, alpha, eps, decay, gscale);
}

bool CudaOps::rmsprop_update_finite(const bf16* p, const float* master, const bf16* g, const float* sq, int64_t n,
                                    double lr, double alpha, double eps, double decay, double gscale) {
  return rmsprop_finite_launch(p, master, dev(g), sq, n, lr, alpha, eps, decay, gscale);
}

void CudaOps::add_round(bf16* g, const float* x, int64_t n) {
  if (n <= 0) return;
  add_round_kernel<<<grid_for(n), kThreads, 0, stream_>>>(dev(g), x, n);
  SPPO_CUDA_LAUNCHED(add_round_kernel);
}

}  // namespace sppo::cuda
