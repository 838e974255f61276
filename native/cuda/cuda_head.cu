// The fused LM head (target log-probs and their backward, logits a tile at a time) and the
// batched token sampler, on the device. The head's GEMMs go through gemm_master (cuBLASLt); the
// kernels here do what lies between them: the online log-sum-exp across vocabulary tiles, the
// target logit, and dlogits. The sampler mirrors sample_token (native/model/generate.cpp).
//
// Extra device memory (HeadState, grown on first need, kept until the CudaOps goes away):
//   head backward: 2·rows·ld bytes (bf16 dlogits tile) + 4·rows·C bytes (float dH of one row
//                  tile), rows·ld <= scratch_elems and rows <= 4096; the forward needs none.
//                  At n 8192, C 4096, V 128256 with 2^22 scratch elements: 8 + 64 MiB.
//   sampler:       16·G·V bytes of sort keys (G = rows sorted at once: G·V <= 2^22, or G = 1
//                  when V > 2^22), the sort's small temporary and 32 bytes per row: 64 MiB + 32·n
//                  at most for V <= 2^22; only top-k / top-p sampling sorts.
#include <cub/block/block_scan.cuh>
#include <cub/device/device_segmented_radix_sort.cuh>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>

#include "core/error.h"
#include "cuda/cuda_common.cuh"
#include "cuda/cuda_ops.cuh"
#include "sppo/generate.h"

namespace sppo::cuda {

// Device buffers that only grow: a call that needs more frees the old one (after the stream
// has finished with it) and allocates the new size.
struct HeadState {
  struct Buffer {
    void* p = nullptr;
    size_t bytes = 0;
  };
  Buffer dlogits;  // (rows, ld) bf16: the backward's dlogits tile, operand of the dH and dW GEMMs
  Buffer dh_acc;   // (rows, C) float: dH of the current row tile, summed over vocabulary tiles
  Buffer u;        // (n) double: the sampler's draws
  Buffer tokens;   // (n) int32: sampled tokens
  Buffer logprob;  // (n) double: raw log-probs of the sampled tokens
  Buffer row_max;  // (n) float: max logit of each row
  Buffer raw_lse;  // (n) double: log-sum-exp of each row's unmodified logits
  Buffer keys_a, keys_b;  // (G, V) uint64: sort keys, the radix sort's double buffer
  Buffer offsets;         // (G + 1) int: segment boundaries i·V
  Buffer sort_temp;       // the radix sort's temporary storage

  ~HeadState() {
    for (Buffer* b : {&dlogits, &dh_acc, &u, &tokens, &logprob, &row_max, &raw_lse, &keys_a, &keys_b, &offsets,
                      &sort_temp})
      if (b->p) cudaFree(b->p);  // errors ignored: nothing to report them to from a destructor
  }
};

template <>
void StateDeleter<HeadState>::operator()(HeadState* s) const {
  delete s;
}

HeadState& CudaOps::head_state() {
  if (!head_) head_.reset(new HeadState());
  return *head_;
}

namespace {

constexpr int kRowThreads = 256;  // threads of every one-block-per-row kernel
constexpr int kWarps = kRowThreads / 32;
constexpr int kScanItems = 8;  // consecutive items per thread in the block-wide scans
constexpr int64_t kScanChunk = int64_t(kRowThreads) * kScanItems;
constexpr int64_t kMaxTileRows = 4096;      // bounds the dH accumulator to 4096·C floats
constexpr int64_t kSortKeys = int64_t(1) << 22;  // keys sorted at once by the sampler (32 MiB)

enum SampleMode : int { kGreedy = 0, kUntruncated = 1, kTruncated = 2 };

// Returns b->p holding at least `bytes`, reallocating (contents lost) when it is smaller.
template <class T>
T* grow(HeadState::Buffer& b, size_t bytes, cudaStream_t stream, const char* what) {
  bytes = std::max<size_t>(bytes, 256);
  if (b.bytes < bytes) {
    if (b.p) {
      SPPO_CUDA_CHECK(cudaStreamSynchronize(stream));  // earlier work may still use it
      SPPO_CUDA_CHECK(cudaFree(b.p));
      b.p = nullptr, b.bytes = 0;
      ++scratch_generation();
    }
    const cudaError_t e = cudaMalloc(&b.p, bytes);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();  // clear it: out of memory is not a sticky error
      b.p = nullptr;
      throw Error(std::string("CUDA could not allocate ") + std::to_string(bytes) + " bytes for " + what + ": " +
                  cudaGetErrorString(e));
    }
    b.bytes = bytes;
  }
  return static_cast<T*>(b.p);
}

// Tiles of the (n, V) logits that fit the scratch: as CpuOps does, up to 4096 rows by at least
// 256 vocabulary entries, the vocabulary tile a multiple of 64 (so W + v0·C and dW + v0·C stay
// aligned) and the row stride ld padded to 8 (16-byte aligned bf16 rows) where the scratch allows.
struct HeadTiles {
  int64_t rows, vocab, ld;
};
HeadTiles head_tiles(int64_t n, int64_t V, int64_t elems) {
  SPPO_REQUIRE(elems >= std::min<int64_t>(V, 256), "the LM head needs at least min(vocab, 256) = ",
               std::min<int64_t>(V, 256), " elements of logits scratch, got ", elems);
  int64_t vocab = std::min(V, std::max<int64_t>(256, elems / std::min(n, kMaxTileRows)));
  if (vocab < V) vocab = vocab / 64 * 64;  // still >= 256
  int64_t ld = (vocab + 7) / 8 * 8;
  if (ld > elems) ld = vocab;  // a single tile of nearly all the scratch: no room to pad
  int64_t rows = std::min({n, kMaxTileRows, elems / ld});
  if (rows < n && rows >= 8) rows = rows / 8 * 8;  // keeps H + r0·C 16-byte aligned when C % 8 == 0
  return {rows, vocab, ld};
}

// ---- Block-wide reductions (blockDim.x == kRowThreads; every thread gets the result) ----

__device__ __forceinline__ double warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// `red` is shared memory of kWarps values; the leading barrier lets callers reuse it.
__device__ double block_sum(double v, double* red) {
  v = warp_sum(v);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  double s = 0;
  for (int w = 0; w < kWarps; ++w) s += red[w];  // the same fixed order in every thread
  return s;
}

__device__ float block_max(float v, float* red) {
  v = warp_max(v);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  float m = red[0];
  for (int w = 1; w < kWarps; ++w) m = fmaxf(m, red[w]);
  return m;
}

// ---- Head kernels ----

// Running statistics start empty: lse holds the running max, logp the running Σexp(x − max).
__global__ void head_init_kernel(double* lse, double* logp, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) lse[i] = -INFINITY, logp[i] = 0;
}

// One block per tile row: folds the tile's columns [0, cols) into the row's running max (fp32
// within the tile, every max a float value) and running Σexp (fp32 exps summed in double).
__global__ void __launch_bounds__(kRowThreads)
    head_tile_stats_kernel(const float* tile, int64_t ld, int64_t cols, double* run_max, double* run_sum) {
  __shared__ double red[kWarps];
  __shared__ float redf[kWarps];
  const int64_t r = blockIdx.x;
  const float* x = tile + r * ld;
  float cm = -INFINITY;
  for (int64_t j = threadIdx.x; j < cols; j += kRowThreads) cm = fmaxf(cm, x[j]);
  cm = block_max(cm, redf);
  const double m = run_max[r];
  const float shift = fmaxf(float(m), cm);
  double s = 0;
  for (int64_t j = threadIdx.x; j < cols; j += kRowThreads) s += double(expf(x[j] - shift));
  s = block_sum(s, red);
  if (threadIdx.x == 0) {
    run_sum[r] = run_sum[r] * exp(m - double(shift)) + s;
    run_max[r] = double(shift);
  }
}

// One warp per row: lse = max + log Σexp, and logp = the target's logit − lse, the logit as a
// dot product of the bf16 rows (each product exact in fp32, summed in double), as CpuOps does.
// A target outside [0, V) gives NaN.
__global__ void __launch_bounds__(kRowThreads)
    head_finalize_kernel(double* logp, double* lse, const __nv_bfloat16* H, const __nv_bfloat16* W,
                         const int32_t* targets, int64_t n, int64_t C, int64_t V) {
  const int64_t row = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= n) return;  // whole warps leave together
  const int64_t t = targets[row];
  double dot = NAN;
  if (t >= 0 && t < V) {  // uniform across the warp
    const __nv_bfloat16* h = H + row * C;
    const __nv_bfloat16* w = W + t * C;
    double acc = 0;
    for (int64_t k = lane; k < C; k += 32) acc += double(to_f(h[k]) * to_f(w[k]));
    dot = warp_sum(acc);
  }
  if (lane == 0) {
    const double l = lse[row] + log(logp[row]);
    lse[row] = l;
    logp[row] = dot - l;
  }
}

// One block per tile row: dlogits = coef·(onehot − exp(x − lse)) in fp32 (the arithmetic of
// CpuOps), stored as bf16 with the tile's row stride (columns past `cols` untouched).
__global__ void __launch_bounds__(kRowThreads)
    head_dlogits_kernel(const float* tile, int64_t ld, int64_t cols, __nv_bfloat16* dl, const double* lse,
                        const double* coef, const int32_t* targets, int64_t v0) {
  const int64_t r = blockIdx.x;
  const float shift = float(lse[r]);
  const float c = float(coef[r]), k = float(-coef[r]);
  const int64_t t = int64_t(targets[r]) - v0;
  const float* x = tile + r * ld;
  __nv_bfloat16* d = dl + r * ld;
  for (int64_t j = threadIdx.x; j < cols; j += kRowThreads) {
    float g = expf(x[j] - shift) * k;
    if (j == t) g += c;
    d[j] = to_bf(g);
  }
}

__global__ void float_to_bf16_kernel(__nv_bfloat16* dst, const float* src, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    dst[i] = to_bf(src[i]);
}

// ---- Sampler kernels ----

struct RowShared {
  typename cub::BlockScan<double, kRowThreads>::TempStorage scan;
  double red[kWarps];
  float redf[kWarps];
  int redi[kWarps];
  long long hit;
  double hit_cum;
};

// (value, id) a beats b: a higher value, or the same value and a lower id (id < 0: none).
__device__ __forceinline__ bool beats(float av, int ai, float bv, int bi) {
  return ai >= 0 && (bi < 0 || av > bv || (av == bv && ai < bi));
}

// The block's argmax, ties to the lowest id; every thread gets it.
__device__ void block_argmax(float& v, int& i, RowShared& sh) {
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int oi = __shfl_xor_sync(0xffffffffu, i, o);
    if (beats(ov, oi, v, i)) v = ov, i = oi;
  }
  __syncthreads();
  if ((threadIdx.x & 31) == 0) sh.redf[threadIdx.x >> 5] = v, sh.redi[threadIdx.x >> 5] = i;
  __syncthreads();
  v = sh.redf[0], i = sh.redi[0];
  for (int w = 1; w < kWarps; ++w)
    if (beats(sh.redf[w], sh.redi[w], v, i)) v = sh.redf[w], i = sh.redi[w];
}

struct ScanHit {
  int64_t index;  // count when nothing crossed
  double cum;     // inclusive cumulative weight at index (the total when nothing crossed)
};

// Inverse CDF over positions [0, count) with weights weight(i) >= 0, summed in double: the first
// position whose inclusive cumulative weight exceeds `threshold` (or reaches it, with or_equal).
// Chunks of kScanChunk positions in order; within a chunk a block scan of per-thread sums.
template <class Weight>
__device__ ScanHit block_first_crossing(Weight weight, int64_t count, double threshold, bool or_equal,
                                        RowShared& sh) {
  double carry = 0;
  for (int64_t c0 = 0; c0 < count; c0 += kScanChunk) {
    const int64_t base = c0 + int64_t(threadIdx.x) * kScanItems;
    float w[kScanItems];
    double local = 0;
#pragma unroll
    for (int k = 0; k < kScanItems; ++k) {
      w[k] = base + k < count ? weight(base + k) : 0.0f;
      local += double(w[k]);
    }
    __syncthreads();  // every thread is done with sh from the previous chunk or call
    double prefix, total;
    cub::BlockScan<double, kRowThreads>(sh.scan).ExclusiveSum(local, prefix, total);
    if (threadIdx.x == 0) sh.hit = LLONG_MAX;
    __syncthreads();
    long long mine = -1;
    double mine_cum = 0, run = carry + prefix;
#pragma unroll
    for (int k = 0; k < kScanItems; ++k) {
      if (mine < 0 && base + k < count) {
        run += double(w[k]);
        if (run > threshold || (or_equal && run >= threshold)) mine = base + k, mine_cum = run;
      }
    }
    if (mine >= 0) atomicMin(&sh.hit, mine);
    __syncthreads();
    const long long h = sh.hit;
    if (h != LLONG_MAX) {  // the same in every thread
      if (mine == h) sh.hit_cum = mine_cum;
      __syncthreads();
      return {h, sh.hit_cum};
    }
    carry += total;
  }
  return {count, carry};
}

// The first position in [begin, end) where pred holds (end if none), scanning kRowThreads at a time.
template <class Pred>
__device__ int64_t block_first_index(int64_t begin, int64_t end, Pred pred, RowShared& sh) {
  for (int64_t c0 = begin; c0 < end; c0 += kRowThreads) {
    const int64_t i = c0 + threadIdx.x;
    const bool hit = i < end && pred(i);
    __syncthreads();
    if (threadIdx.x == 0) sh.hit = LLONG_MAX;
    if (__syncthreads_or(hit)) {
      if (hit) atomicMin(&sh.hit, (long long)i);
      __syncthreads();
      return sh.hit;
    }
  }
  return end;
}

// Sort keys whose ascending order is (logit descending, id ascending): the logit's bits mapped
// to an order-preserving unsigned integer, complemented, above `id_bits` bits of id. −0 sorts as +0.
__device__ __forceinline__ uint64_t sort_key(float x, uint32_t id, int id_bits) {
  if (x == 0.0f) x = 0.0f;
  const uint32_t u = __float_as_uint(x);
  const uint32_t ord = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (uint64_t(~ord) << id_bits) | id;
}
__device__ __forceinline__ float key_logit(uint64_t key, int id_bits) {
  const uint32_t ord = ~uint32_t(key >> id_bits);
  return __uint_as_float((ord & 0x80000000u) ? (ord ^ 0x80000000u) : ~ord);
}
__device__ __forceinline__ int key_id(uint64_t key, int id_bits) {
  return int(key & ((uint64_t(1) << id_bits) - 1));
}

// One block per row: the max and argmax (lowest id on ties), the raw log-sum-exp, and for the
// greedy and untruncated modes the token and its raw log-prob. Weights at temperature T are
// expf((x − max)·(1/T)), the float arithmetic of sample_token.
__global__ void __launch_bounds__(kRowThreads)
    sample_rows_kernel(const float* logits, int64_t V, int mode, float inv_t, const double* u, float* row_max,
                       double* raw_lse, int32_t* tokens, double* logprobs) {
  __shared__ RowShared sh;
  const int64_t row = blockIdx.x;
  const float* x = logits + row * V;
  float mx = -INFINITY;
  int am = -1;
  for (int64_t j = threadIdx.x; j < V; j += kRowThreads)
    if (beats(x[j], int(j), mx, am)) mx = x[j], am = int(j);
  block_argmax(mx, am, sh);
  double s = 0;
  for (int64_t j = threadIdx.x; j < V; j += kRowThreads) s += double(expf(x[j] - mx));
  const double raw_sum = block_sum(s, sh.red);
  const double lse = double(mx) + log(raw_sum);
  int tok = am;
  if (mode == kUntruncated) {
    auto w = [&](int64_t j) { return expf((x[j] - mx) * inv_t); };
    const double z = inv_t == 1.0f ? raw_sum : block_first_crossing(w, V, INFINITY, false, sh).cum;
    const ScanHit hit = block_first_crossing(w, V, u[row] * z, false, sh);
    tok = hit.index < V ? int(hit.index) : int(V - 1);  // V − 1 if rounding left u·z past the end
  }
  if (threadIdx.x == 0) {
    row_max[row] = mx;
    raw_lse[row] = lse;
    if (mode != kTruncated) tokens[row] = tok, logprobs[row] = double(x[tok]) - lse;
  }
}

__global__ void sample_keys_kernel(const float* logits, int64_t V, int id_bits, uint64_t* keys) {
  const int64_t off = int64_t(blockIdx.x) * V;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) keys[off + j] = sort_key(logits[off + j], uint32_t(j), id_bits);
}

__global__ void segment_offsets_kernel(int* offsets, int64_t segments, int64_t V) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i <= segments) offsets[i] = int(i * V);
}

// One block per row of the group, on its keys sorted by (logit desc, id asc): top-k keeping ties
// at the k-th logit (top_k 0: off), then the smallest prefix reaching top_p of the kept weight,
// then the inverse-CDF draw; the raw log-prob from the row's unmodified logits.
__global__ void __launch_bounds__(kRowThreads)
    sample_sorted_kernel(const uint64_t* sorted, const float* logits, int64_t V, int id_bits, int64_t top_k,
                         double top_p, float inv_t, const double* u, const float* row_max, const double* raw_lse,
                         int64_t row0, int32_t* tokens, double* logprobs) {
  __shared__ RowShared sh;
  const int64_t g = blockIdx.x, row = row0 + g;
  const uint64_t* keys = sorted + g * V;
  const float mx = row_max[row];
  int64_t kept = V;
  if (top_k > 0) {
    const float kth = key_logit(keys[top_k - 1], id_bits);
    kept = block_first_index(top_k, V, [&](int64_t i) { return key_logit(keys[i], id_bits) < kth; }, sh);
  }
  auto w = [&](int64_t i) { return expf((key_logit(keys[i], id_bits) - mx) * inv_t); };
  double z = block_first_crossing(w, kept, INFINITY, false, sh).cum;
  if (top_p < 1) {
    const ScanHit nucleus = block_first_crossing(w, kept, top_p * z, true, sh);
    if (nucleus.index < kept) kept = nucleus.index + 1, z = nucleus.cum;
  }
  const ScanHit hit = block_first_crossing(w, kept, u[row] * z, false, sh);
  const int tok = key_id(keys[hit.index < kept ? hit.index : kept - 1], id_bits);
  if (threadIdx.x == 0) {
    tokens[row] = tok;
    logprobs[row] = double(logits[row * V + tok]) - raw_lse[row];
  }
}

}  // namespace

// ---- Launchers ----

void CudaOps::head_logprobs(double* logp, double* lse, const bf16* H, const bf16* W, const int32_t* targets,
                            int64_t n, int64_t C, int64_t V, float* scratch, int64_t scratch_elems) {
  SPPO_REQUIRE(n >= 0 && C > 0 && V > 0, "head_logprobs: bad shape n ", n, ", C ", C, ", V ", V);
  if (n == 0) return;
  SPPO_CUDA_CHECK(cudaSetDevice(device_));
  const HeadTiles tile = head_tiles(n, V, scratch_elems);
  head_init_kernel<<<blocks_for(n, 256), 256, 0, stream_>>>(lse, logp, n);
  SPPO_CUDA_LAUNCHED(head_init_kernel);
  for (int64_t r0 = 0; r0 < n; r0 += tile.rows) {
    const int64_t R = std::min(tile.rows, n - r0);
    for (int64_t v0 = 0; v0 < V; v0 += tile.vocab) {
      const int64_t Vc = std::min(tile.vocab, V - v0);
      gemm_master(false, true, R, Vc, C, 1.0, H + r0 * C, C, W + v0 * C, C, 0.0, scratch, tile.ld);
      head_tile_stats_kernel<<<unsigned(R), kRowThreads, 0, stream_>>>(scratch, tile.ld, Vc, lse + r0, logp + r0);
      SPPO_CUDA_LAUNCHED(head_tile_stats_kernel);
    }
  }
  head_finalize_kernel<<<blocks_for(n, kWarps), kRowThreads, 0, stream_>>>(logp, lse, dev(H), dev(W), targets, n, C,
                                                                           V);
  SPPO_CUDA_LAUNCHED(head_finalize_kernel);
}

void CudaOps::head_logprobs_backward(bf16* dH, float* dW, const bf16* H, const bf16* W, const int32_t* targets,
                                     const double* lse, const double* coef, int64_t n, int64_t C, int64_t V,
                                     float* scratch, int64_t scratch_elems) {
  SPPO_REQUIRE(n >= 0 && C > 0 && V > 0, "head_logprobs_backward: bad shape n ", n, ", C ", C, ", V ", V);
  if (n == 0) return;
  SPPO_CUDA_CHECK(cudaSetDevice(device_));
  const HeadTiles tile = head_tiles(n, V, scratch_elems);
  HeadState& st = head_state();
  bf16* dl = grow<bf16>(st.dlogits, size_t(tile.rows * tile.ld) * sizeof(bf16), stream_, "the LM head's dlogits tile");
  float* dh = grow<float>(st.dh_acc, size_t(tile.rows * C) * sizeof(float), stream_, "the LM head's dH accumulator");
  for (int64_t r0 = 0; r0 < n; r0 += tile.rows) {
    const int64_t R = std::min(tile.rows, n - r0);
    for (int64_t v0 = 0; v0 < V; v0 += tile.vocab) {
      const int64_t Vc = std::min(tile.vocab, V - v0);
      // Recompute the tile's logits, turn them into bf16 dlogits, and push them through both GEMMs.
      gemm_master(false, true, R, Vc, C, 1.0, H + r0 * C, C, W + v0 * C, C, 0.0, scratch, tile.ld);
      head_dlogits_kernel<<<unsigned(R), kRowThreads, 0, stream_>>>(scratch, tile.ld, Vc, dev(dl), lse + r0,
                                                                     coef + r0, targets + r0, v0);
      SPPO_CUDA_LAUNCHED(head_dlogits_kernel);
      gemm_master(false, false, R, C, Vc, 1.0, dl, tile.ld, W + v0 * C, C, v0 == 0 ? 0.0 : 1.0, dh, C);
      gemm_master(true, false, Vc, C, R, 1.0, dl, tile.ld, H + r0 * C, C, 1.0, dW + v0 * C, C);
    }
    const unsigned blocks = unsigned(std::min<int64_t>(blocks_for(R * C, 256), 65536));
    float_to_bf16_kernel<<<blocks, 256, 0, stream_>>>(dev(dH + r0 * C), dh, R * C);
    SPPO_CUDA_LAUNCHED(float_to_bf16_kernel);
  }
}

// Float vs double: each weight is an fp32 expf of the same fp32 argument sample_token computes,
// summed in double; the sums run in another order (block scans, not a loop) and expf differs from
// the CPU's exp by about an ulp, so a draw can differ from the CPU's only when u·z lies within
// about 1e-7 relative of a cumulative boundary.
void CudaOps::sample(int32_t* tokens, double* raw_logprobs, const float* logits, int64_t n, int64_t V,
                     const SamplingOptions& o, const double* u) {
  SPPO_REQUIRE(n >= 0 && V > 0 && V < (int64_t(1) << 31), "sample: bad shape n ", n, ", V ", V);
  SPPO_REQUIRE(n < (int64_t(1) << 31), "sample: at most 2^31 - 1 rows per call, got ", n);
  if (n == 0) return;
  SPPO_CUDA_CHECK(cudaSetDevice(device_));
  HeadState& st = head_state();
  const int mode = !(o.temperature > 0)                                      ? kGreedy
                   : (o.top_k == 0 || o.top_k >= V) && o.top_p >= 1 ? kUntruncated
                                                                            : kTruncated;
  const float inv_t = mode == kGreedy ? 1.0f : float(1.0 / o.temperature);
  double* du = grow<double>(st.u, size_t(n) * sizeof(double), stream_, "the sampler's draws");
  int32_t* dtok = grow<int32_t>(st.tokens, size_t(n) * sizeof(int32_t), stream_, "the sampled tokens");
  double* dlp = grow<double>(st.logprob, size_t(n) * sizeof(double), stream_, "the sampled log-probs");
  float* dmax = grow<float>(st.row_max, size_t(n) * sizeof(float), stream_, "the sampler's row maxima");
  double* dlse = grow<double>(st.raw_lse, size_t(n) * sizeof(double), stream_, "the sampler's log-sum-exps");
  if (mode != kGreedy)
    SPPO_CUDA_CHECK(cudaMemcpyAsync(du, u, size_t(n) * sizeof(double), cudaMemcpyHostToDevice, stream_));
  sample_rows_kernel<<<unsigned(n), kRowThreads, 0, stream_>>>(logits, V, mode, inv_t, du, dmax, dlse, dtok, dlp);
  SPPO_CUDA_LAUNCHED(sample_rows_kernel);

  if (mode == kTruncated) {
    int id_bits = 1;
    while ((int64_t(1) << id_bits) < V) ++id_bits;  // ids 0..V−1 fit; 32 + id_bits <= 63
    const int64_t G = std::max<int64_t>(1, std::min(n, kSortKeys / V));
    const size_t key_bytes = size_t(G * V) * sizeof(uint64_t);
    uint64_t* ka = grow<uint64_t>(st.keys_a, key_bytes, stream_, "the sampler's sort keys");
    uint64_t* kb = grow<uint64_t>(st.keys_b, key_bytes, stream_, "the sampler's sort keys");
    int* offsets = grow<int>(st.offsets, size_t(G + 1) * sizeof(int), stream_, "the sampler's segment offsets");
    segment_offsets_kernel<<<blocks_for(G + 1, 256), 256, 0, stream_>>>(offsets, G, V);
    SPPO_CUDA_LAUNCHED(segment_offsets_kernel);
    const int64_t top_k = o.top_k > 0 && o.top_k < V ? o.top_k : 0;
    for (int64_t row0 = 0; row0 < n; row0 += G) {
      const int64_t g = std::min(G, n - row0);
      sample_keys_kernel<<<unsigned(g), kRowThreads, 0, stream_>>>(logits + row0 * V, V, id_bits, ka);
      SPPO_CUDA_LAUNCHED(sample_keys_kernel);
      cub::DoubleBuffer<uint64_t> keys(ka, kb);
      size_t temp_bytes = 0;
      SPPO_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortKeys(nullptr, temp_bytes, keys, int(g * V), int(g), offsets,
                                                              offsets + 1, 0, 32 + id_bits, stream_));
      void* temp = grow<void>(st.sort_temp, temp_bytes, stream_, "the sampler's sort");
      SPPO_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortKeys(temp, temp_bytes, keys, int(g * V), int(g), offsets,
                                                              offsets + 1, 0, 32 + id_bits, stream_));
      sample_sorted_kernel<<<unsigned(g), kRowThreads, 0, stream_>>>(keys.Current(), logits, V, id_bits, top_k,
                                                                     o.top_p, inv_t, du, dmax, dlse, row0, dtok, dlp);
      SPPO_CUDA_LAUNCHED(sample_sorted_kernel);
    }
  }
  SPPO_CUDA_CHECK(cudaMemcpyAsync(tokens, dtok, size_t(n) * sizeof(int32_t), cudaMemcpyDeviceToHost, stream_));
  SPPO_CUDA_CHECK(cudaMemcpyAsync(raw_logprobs, dlp, size_t(n) * sizeof(double), cudaMemcpyDeviceToHost, stream_));
  SPPO_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

}  // namespace sppo::cuda
