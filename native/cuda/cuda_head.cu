// The fused LM head (target log-probs and their backward, logits a tile at a time) and the
// batched token sampler, on the device. The head's GEMMs go through gemm_master (cuBLASLt); the
// kernels here do what lies between them: the online log-sum-exp across vocabulary tiles, the
// target logit, and dlogits. The sampler mirrors sample_token (native/cpu/sampler.cpp).
//
// Extra device memory (HeadState, grown on first need, kept until the CudaOps goes away):
//   head backward: 2·rows·ld bytes (bf16 dlogits tile) + 4·rows·C bytes (float dH of one row
//                  tile), rows·ld <= scratch_elems and rows <= 4096; the forward needs none.
//                  At n 8192, C 4096, V 128256 with 2^22 scratch elements: 8 + 64 MiB.
//   sampler:       20 bytes per row (draws, tokens, log-probs).
#include <cub/block/block_scan.cuh>

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
  Buffer dlogits;                // (rows, ld) bf16: the backward's dlogits tile, operand of the dH and dW GEMMs
  Buffer dh_acc;                 // (rows, C) float: dH of the current row tile, summed over vocabulary tiles
  Buffer u;                      // (n) double: the sampler's draws
  Buffer tokens;                 // (n) int32: sampled tokens
  Buffer logprob;                // (n) double: raw log-probs of the sampled tokens
  bool select_smem_set = false;  // sample_truncated_kernel may use sizeof(SelectShared) bytes

  ~HeadState() {
    for (Buffer* b : {&dlogits, &dh_acc, &u, &tokens, &logprob})
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
constexpr int64_t kMaxTileRows = 4096;  // bounds the dH accumulator to 4096·C floats

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
  SPPO_REQUIRE(elems >= std::min<int64_t>(V, 256),
               "the LM head needs at least min(vocab, 256) = ", std::min<int64_t>(V, 256),
               " elements of logits scratch, got ", elems);
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

// `red` is shared memory of Warps values; the leading barrier lets callers reuse it.
template <int Warps = kWarps>
__device__ double block_sum(double v, double* red) {
  v = warp_sum(v);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  double s = 0;
  for (int w = 0; w < Warps; ++w) s += red[w];  // the same fixed order in every thread
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

template <int Warps = kWarps>
__device__ float block_min(float v, float* red) {
  for (int o = 16; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  float m = red[0];
  for (int w = 1; w < Warps; ++w) m = fminf(m, red[w]);
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

// The block's argmax, ties to the lowest id; every thread gets it. redf, redi: Warps entries.
template <int Warps = kWarps>
__device__ void block_argmax(float& v, int& i, float* redf, int* redi) {
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int oi = __shfl_xor_sync(0xffffffffu, i, o);
    if (beats(ov, oi, v, i)) v = ov, i = oi;
  }
  __syncthreads();
  if ((threadIdx.x & 31) == 0) redf[threadIdx.x >> 5] = v, redi[threadIdx.x >> 5] = i;
  __syncthreads();
  v = redf[0], i = redi[0];
  for (int w = 1; w < Warps; ++w)
    if (beats(redf[w], redi[w], v, i)) v = redf[w], i = redi[w];
}

struct ScanHit {
  int64_t index;  // count when nothing crossed
  double cum;     // inclusive cumulative weight at index (the total when nothing crossed)
};

// Inverse CDF over positions [0, count) with weights weight(i) >= 0, summed in double: the first
// position whose inclusive cumulative weight exceeds `threshold`. Chunks of kScanChunk positions
// in order; within a chunk a block scan of per-thread sums.
template <class Weight>
__device__ ScanHit block_first_crossing(Weight weight, int64_t count, double threshold, RowShared& sh) {
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
        if (run > threshold) mine = base + k, mine_cum = run;
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

// One block per row, greedy and untruncated sampling: the argmax (lowest id on ties), the raw
// log-sum-exp, the token and its raw log-prob. Weights at temperature T are expf((x − max)·(1/T)),
// the float arithmetic of sample_token.
__global__ void __launch_bounds__(kRowThreads)
    sample_rows_kernel(const float* logits, int64_t V, bool greedy, float inv_t, const double* u, int32_t* tokens,
                       double* logprobs) {
  __shared__ RowShared sh;
  const int64_t row = blockIdx.x;
  const float* x = logits + row * V;
  float mx = -INFINITY;
  int am = -1;
  for (int64_t j = threadIdx.x; j < V; j += kRowThreads)
    if (beats(x[j], int(j), mx, am)) mx = x[j], am = int(j);
  block_argmax(mx, am, sh.redf, sh.redi);
  double s = 0;
  for (int64_t j = threadIdx.x; j < V; j += kRowThreads) s += double(expf(x[j] - mx));
  const double raw_sum = block_sum(s, sh.red);
  int tok = am;
  if (!greedy) {
    auto w = [&](int64_t j) { return expf((x[j] - mx) * inv_t); };
    const double z = inv_t == 1.0f ? raw_sum : block_first_crossing(w, V, INFINITY, sh).cum;
    const ScanHit hit = block_first_crossing(w, V, u[row] * z, sh);
    tok = hit.index < V ? int(hit.index) : int(V - 1);  // V − 1 if rounding left u·z past the end
  }
  if (threadIdx.x == 0) tokens[row] = tok, logprobs[row] = double(x[tok]) - (double(mx) + log(raw_sum));
}

// ---- Truncated sampling (top-k / top-p): radix selection, no sort ----
//
// Candidates are totally ordered by (logit desc, id asc), the ascending order of SampleRow::key.
// The k-th candidate, the top-p cutoff and the drawn token are each a selection on that order:
// the first candidate whose cumulative weight (a count for top-k) exceeds a threshold. A
// selection fixes the key kDigitBits bits at a time: a pass histograms the weights of the
// candidates whose key starts with the digits fixed so far by their next digit, and a block scan
// of the bins finds the digit where the cumulative weight crosses. The key's top digit is a
// bucket of max − logit, 4096 buckets over the row's range (at most 32·T, where weights fall
// below the fixed point's unit; fewer buckets for V > 2^19), so the first pass spreads the row
// evenly and the chosen bucket holds few candidates, near-uniform rows included. Passes re-read
// the row's logits (from L2 at decode batch sizes) until those left fit in shared memory: the
// pass that reads them copies them there, and once at most kRankMax are left each finds its
// place by comparing keys with the others. On a continuous row a call reads the row 3 times: the
// max, then top-p's first histogram (which the draw reuses) and the copy of the cutoff's bucket
// (with the draw's when the kept histogram pins it), or top-k's two passes (the second copies
// every kept candidate when they fit, for top-p and the draw). Ties cost more passes: at most
// key bits / 12 per selection.
//
// Weights are summed exactly in 64-bit fixed point: w = expf((x − max)/T) <= 1 (1 at the max) in
// units of 2^-S, S = 63 − id_bits, so V weights sum below 2^63 and integer atomics give the same
// sums in any order. A weight >= 2^-23 converts exactly (its float ulp is >= 2^-46 >= 2^-S);
// smaller ones truncate to a multiple of 2^-S, those under 2^-S (2^-45 of the max weight at V
// 152k) to 0: such a token is never drawn. sample_token (cpu/sampler.cpp) applies this same rule
// (order, fixed point, thresholds) on the CPU, so a cutoff or draw can differ from the CPU's only
// where the two exps' roundings (~2^-22·z) move top_p·z or u·z across a cumulative boundary.

constexpr int kSelectThreads = 1024;  // one block per row: many loads in flight on its SM
constexpr int kSelectWarps = kSelectThreads / 32;
constexpr int kDigitBits = 12;
constexpr int kBins = 1 << kDigitBits;
constexpr int kBinsPerThread = kBins / kSelectThreads;
constexpr int kListCap = 4096;  // candidates a selection copies to shared memory
constexpr int kRankMax = 256;   // candidates few enough to rank by comparing all pairs
constexpr int kRowLoads = 6;    // logits each thread loads before using them
static_assert(kBins % kSelectThreads == 0 && kRankMax <= kSelectThreads, "bins and ranks per thread");

// First-pass histogram of a selection: computed, computed and kept (top-p), or the kept one
// (the draw after top-p, whose first pass would histogram the same candidates by the same digit).
enum FirstHistogram : int { kCompute = 0, kComputeAndKeep = 1, kReuseKept = 2 };

struct SelectShared {
  unsigned long long mass[kBins];       // fixed-point weight of the candidates per digit value
  unsigned count[kBins];                // candidates per digit value
  unsigned long long kept_mass[kBins];  // the top-p selection's first histogram
  unsigned kept_count[kBins];
  unsigned long long list_key[kListCap];  // candidates copied from the row, in no particular order
  float list_w[kListCap];                 // their weights at temperature T
  unsigned long long rank_key[kRankMax];  // the last few candidates of a selection
  unsigned long long rank_w[kRankMax];    // their fixed-point weights (1 in count mode)
  unsigned long long warp_total[kSelectWarps];
  double red[kSelectWarps];
  float redf[kSelectWarps];
  int redi[kSelectWarps];
  unsigned long long chosen_before, chosen_mass, found_key, found_cum;
  unsigned chosen_digit, chosen_count;
  int list_n, rank_n;
};

// A selection's candidates: key <= limit, and key's bits from `shift` up equal prefix's.
struct KeyRange {
  uint64_t prefix, limit;
  int shift;
  __device__ bool holds(uint64_t key) const { return key <= limit && (key >> shift) == (prefix >> shift); }
  __device__ bool covers(const KeyRange& r) const {  // every candidate of r is one of ours
    return r.shift <= shift && (r.prefix >> shift) == (prefix >> shift) && r.limit <= limit;
  }
};

// The candidates in shared memory: when valid, every one of `range` and of `also` (if set).
struct CandidateList {
  KeyRange range, also;
  bool has_also;
  int n;
  bool valid;
  __device__ bool covers(const KeyRange& r) const { return valid && (range.covers(r) || (has_also && also.covers(r))); }
};

struct SampleRow {
  const float* x;  // (V) logits
  int64_t V;
  int id_bits, bucket_bits;  // key = bucket, order-preserving logit bits, id
  float mx, inv_t;
  float bucket_scale;  // buckets per unit of max − logit
  float unit;          // 2^S, a weight of 1 in fixed point

  __device__ int key_bits() const { return bucket_bits + 32 + id_bits; }
  __device__ float weight(float v) const { return expf((v - mx) * inv_t); }
  __device__ unsigned long long fixed(float w) const { return __float2ull_rz(w * unit); }  // exact scaling
  // The bucket of max − x, non-decreasing as x falls. fminf turns the NaN of inf·0 (x = −inf, a
  // scale of 0) or 0·inf (x = max, a scale that overflowed) into the last bucket: still so.
  __device__ unsigned bucket(float v) const {
    return unsigned(fminf((mx - v) * bucket_scale, float((1 << bucket_bits) - 1)));
  }
  // Ascending keys are the candidates' order: the bucket, then x's bits mapped to an
  // order-preserving integer and complemented (−0 ranks as +0, as sample_token compares values),
  // then the id.
  __device__ uint64_t key(float v, uint32_t id) const {
    const unsigned b = bucket(v);
    if (v == 0.0f) v = 0.0f;
    const uint32_t u = __float_as_uint(v);
    const uint32_t ord = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return (((uint64_t(b) << 32) | ~ord) << id_bits) | id;
  }
};

// f(x[j], j) for this thread's share of the row (j = threadIdx.x + i·kSelectThreads, in order),
// kRowLoads loads in flight per thread: one block per SM must cover L2's latency by itself.
template <class F>
__device__ void for_each_logit(const float* x, int64_t V, F f) {
  for (int64_t j0 = threadIdx.x; j0 < V; j0 += int64_t(kSelectThreads) * kRowLoads) {
    float v[kRowLoads];
#pragma unroll
    for (int k = 0; k < kRowLoads; ++k) {
      const int64_t j = j0 + k * kSelectThreads;
      v[k] = j < V ? x[j] : 0.0f;
    }
#pragma unroll
    for (int k = 0; k < kRowLoads; ++k)
      if (j0 + k * kSelectThreads < V) f(v[k], j0 + k * kSelectThreads);
  }
}

// The lanes of this thread's warp whose index (this lane's is i) is below n: the warp's lanes
// take consecutive indices, so only the last group of a row or list is partial.
__device__ __forceinline__ unsigned lanes_below(int64_t i, int64_t n) {
  const int64_t left = n - (i - (threadIdx.x & 31));
  return left >= 32 ? 0xffffffffu : (1u << left) - 1;
}

// Adds digit d with fixed-point weight f (and a count of 1) for each lane of `lanes` that takes
// part. Tied logits share digit and weight, so where every taking lane agrees one atomic adds
// them all: a row of equal logits would otherwise serialise on one bin. Every lane of `lanes`
// must call it.
__device__ void add_warp(bool take, unsigned d, unsigned long long f, unsigned lanes, SelectShared& sh) {
  const unsigned takers = __ballot_sync(lanes, take);
  if (!takers) return;
  const int first = __ffs(takers) - 1;
  const unsigned d0 = __shfl_sync(lanes, d, first);
  const unsigned long long f0 = __shfl_sync(lanes, f, first);
  if (__all_sync(lanes, !take || (d == d0 && f == f0))) {
    if (int(threadIdx.x & 31) == first) {
      atomicAdd(&sh.count[d0], unsigned(__popc(takers)));
      if (f0) atomicAdd(&sh.mass[d0], f0 * unsigned(__popc(takers)));
    }
  } else if (take) {
    if (f) atomicAdd(&sh.mass[d], f);
    atomicAdd(&sh.count[d], 1u);
  }
}

// One histogram pass over r's candidates: each adds its fixed-point weight (nothing in count
// mode) and 1 to the bins of its digit, key bits [dshift, r.shift). From the list when it covers
// r, else from the row: then `gather` copies the candidates into the list (valid if they fit),
// with those of `also` when has_also (a later selection's), and `raw` adds every raw softmax
// numerator expf(x − max) to raw_part (a fixed order per thread).
__device__ void histogram_pass(const SampleRow& row, const KeyRange& r, int dshift, bool count_mode, bool gather,
                               KeyRange also, bool has_also, bool raw, double& raw_part, CandidateList& list,
                               SelectShared& sh) {
  const bool from_list = list.covers(r);
  gather = gather && !from_list;
  for (int b = threadIdx.x; b < kBins; b += kSelectThreads) sh.mass[b] = 0, sh.count[b] = 0;
  if (gather && threadIdx.x == 0) sh.list_n = 0;
  __syncthreads();
  const uint64_t mask = (uint64_t(1) << (r.shift - dshift)) - 1;
  auto add_digit = [&](unsigned d, float w) {
    const unsigned long long f = count_mode ? 0 : row.fixed(w);
    if (f) atomicAdd(&sh.mass[d], f);  // most of a peaked row weighs 0: no contended atomics for it
    atomicAdd(&sh.count[d], 1u);
  };
  auto digit = [&](uint64_t key) { return unsigned((key >> dshift) & mask); };
  auto add = [&](uint64_t key, float w) { add_digit(digit(key), w); };
  // A row pass that copies nothing after the first digit finds more than kListCap candidates in
  // one bin of the last digit: ties, most likely; so does a constant row's first pass.
  const bool tied = !gather && (r.shift != row.key_bits() || row.bucket_scale == 0);
  // The first digit over the whole row: every logit is a candidate and its digit is its bucket.
  // The last bucket (32·T and more below the max, −inf) can hold most of a row at low T: each
  // thread sums its share and adds it once.
  const bool by_bucket = r.shift == row.key_bits() && r.limit == ~uint64_t(0) && row.bucket_bits == kDigitBits;
  unsigned long long tail_mass = 0;
  unsigned tail_count = 0;
  if (from_list) {
    for (int i = threadIdx.x; i < list.n; i += kSelectThreads) {
      const uint64_t key = sh.list_key[i];
      const bool take = r.holds(key);
      add_warp(take, digit(key), take && !count_mode ? row.fixed(sh.list_w[i]) : 0, lanes_below(i, list.n), sh);
    }
  } else if (tied) {
    for_each_logit(row.x, row.V, [&](float v, int64_t j) {
      if (raw) raw_part += double(expf(v - row.mx));
      const uint64_t key = row.key(v, uint32_t(j));
      const bool take = r.holds(key);
      add_warp(take, digit(key), take && !count_mode ? row.fixed(row.weight(v)) : 0, lanes_below(j, row.V), sh);
    });
  } else {
    for_each_logit(row.x, row.V, [&](float v, int64_t j) {
      if (raw) raw_part += double(expf(v - row.mx));
      if (by_bucket && !gather) {
        const unsigned b = row.bucket(v);
        const float w = count_mode ? 0.0f : row.weight(v);
        if (b != kBins - 1) return add_digit(b, w);
        ++tail_count;
        if (!count_mode) tail_mass += row.fixed(w);
        return;
      }
      const uint64_t key = row.key(v, uint32_t(j));
      const bool mine = r.holds(key);
      if (!mine && !(gather && has_also && also.holds(key))) return;
      const float w = count_mode && !gather ? 0.0f : row.weight(v);
      if (mine) add(key, w);
      if (gather) {
        const int at = atomicAdd(&sh.list_n, 1);
        if (at < kListCap) sh.list_key[at] = key, sh.list_w[at] = w;
      }
    });
    if (tail_count) atomicAdd(&sh.count[kBins - 1], tail_count);
    if (tail_mass) atomicAdd(&sh.mass[kBins - 1], tail_mass);
  }
  __syncthreads();
  if (gather) list = {r, also, has_also, min(sh.list_n, kListCap), sh.list_n <= kListCap};
}

struct Chosen {
  uint64_t before, mass;  // cumulative weight before the digit's candidates, and theirs
  unsigned digit, count;
};

// After a histogram pass: the digit at which `before` plus the cumulative weight of the digits
// (their counts in count mode) first exceeds th(total), total being the histogram's sum.
template <class Threshold>
__device__ Chosen choose_digit(const unsigned long long* mass, const unsigned* count, bool count_mode, uint64_t before,
                               Threshold th, SelectShared& sh) {
  const int b0 = threadIdx.x * kBinsPerThread, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint64_t m[kBinsPerThread], local = 0;
#pragma unroll
  for (int i = 0; i < kBinsPerThread; ++i) local += m[i] = count_mode ? count[b0 + i] : mass[b0 + i];
  uint64_t incl = local;
  for (int o = 1; o < 32; o <<= 1) {
    const uint64_t y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  if (lane == 31) sh.warp_total[warp] = incl;
  __syncthreads();
  uint64_t run = before + incl - local, total = 0;
  for (int w = 0; w < kSelectWarps; ++w) {
    if (w < warp) run += sh.warp_total[w];
    total += sh.warp_total[w];
  }
  const uint64_t t = th(total);
#pragma unroll
  for (int i = 0; i < kBinsPerThread; ++i) {
    const uint64_t start = run;
    run += m[i];
    if (start <= t && run > t)  // exactly one digit: the sums only grow
      sh.chosen_before = start, sh.chosen_mass = m[i], sh.chosen_digit = b0 + i, sh.chosen_count = count[b0 + i];
  }
  __syncthreads();
  return {sh.chosen_before, sh.chosen_mass, sh.chosen_digit, sh.chosen_count};
}

struct Selected {
  uint64_t key;  // the selected candidate
  uint64_t cum;  // cumulative weight (count) through it
};

// The selection among r's candidates, at most kRankMax and all in the list, `before` the weight
// of the candidates ahead of r: each finds the weight ahead of it within r by comparing keys.
template <class Threshold>
__device__ Selected rank_select(const SampleRow& row, const KeyRange& r, bool count_mode, uint64_t before, Threshold th,
                                const CandidateList& list, SelectShared& sh) {
  if (threadIdx.x == 0) sh.rank_n = 0;
  __syncthreads();
  for (int i = threadIdx.x; i < list.n; i += kSelectThreads)
    if (r.holds(sh.list_key[i])) {
      const int at = atomicAdd(&sh.rank_n, 1);
      sh.rank_key[at] = sh.list_key[i], sh.rank_w[at] = count_mode ? 1 : row.fixed(sh.list_w[i]);
    }
  __syncthreads();
  const int n = sh.rank_n;
  if (int(threadIdx.x) < n) {
    const uint64_t key = sh.rank_key[threadIdx.x], w = sh.rank_w[threadIdx.x];
    uint64_t ahead = before, total = 0;
    for (int j = 0; j < n; ++j) {
      total += sh.rank_w[j];
      if (sh.rank_key[j] < key) ahead += sh.rank_w[j];
    }
    const uint64_t t = th(total);
    if (ahead <= t && ahead + w > t) sh.found_key = key, sh.found_cum = ahead + w;  // exactly one
  }
  __syncthreads();
  return {sh.found_key, sh.found_cum};
}

// The first candidate (key <= limit) in key order whose cumulative weight (count in count mode)
// exceeds th(the candidates' total), th(total) < total. `gather`: whether the first pass copies
// the candidates to shared memory (when they may fit); `raw`: whether it sums the raw numerators
// (cleared once done); also(chosen, r, range): after the first digit, when the next pass reads
// the row, may name a later selection's candidates for it to copy as well.
template <class Threshold, class Also>
__device__ Selected select_candidate(const SampleRow& row, uint64_t limit, bool count_mode, Threshold th_of_total,
                                     Also also_of, FirstHistogram first_hist, bool gather, bool& raw, double& raw_part,
                                     CandidateList& list, SelectShared& sh) {
  KeyRange r{0, limit, row.key_bits()}, also{0, 0, 0};
  bool has_also = false;
  uint64_t before = 0, th = 0;
  for (bool first = true;; first = false) {
    const int dshift = r.shift > kDigitBits ? r.shift - kDigitBits : 0;
    const bool reuse = first && first_hist == kReuseKept;
    if (!reuse) {
      histogram_pass(row, r, dshift, count_mode, gather, also, has_also, raw, raw_part, list, sh);
      raw = false, has_also = false;
      if (first && first_hist == kComputeAndKeep)
        for (int b = threadIdx.x; b < kBins; b += kSelectThreads)
          sh.kept_mass[b] = sh.mass[b], sh.kept_count[b] = sh.count[b];
    }
    const Chosen c = choose_digit(
        reuse ? sh.kept_mass : sh.mass, reuse ? sh.kept_count : sh.count, count_mode, before,
        [&](uint64_t total) { return first ? th = th_of_total(total) : th; }, sh);
    before = c.before;
    r.prefix |= uint64_t(c.digit) << dshift;
    r.shift = dshift;
    if (dshift == 0) return {r.prefix, c.before + c.mass};
    if (c.count <= kRankMax && list.covers(r))
      return rank_select(
          row, r, count_mode, before, [&](uint64_t) { return th; }, list, sh);
    gather = c.count <= kListCap;
    if (first && gather && !list.covers(r)) has_also = also_of(c, r, also);
  }
}

// One block per row: top-k (every logit >= the k-th's; top_k 0: off), then the smallest prefix
// of the kept candidates whose weight reaches top_p of theirs, then the draw u; the raw log-prob
// from the row's unmodified logits. The draw runs over the top-k set with the nucleus's total:
// a threshold below that total crosses within the nucleus.
__global__ void __launch_bounds__(kSelectThreads)
    sample_truncated_kernel(const float* logits, int64_t V, int id_bits, int64_t top_k, double top_p, float inv_t,
                            const double* u, int32_t* tokens, double* logprobs) {
  extern __shared__ __align__(16) unsigned char select_smem[];
  SelectShared& sh = *reinterpret_cast<SelectShared*>(select_smem);
  const int64_t row_id = blockIdx.x;
  const float* x = logits + row_id * V;
  float mx = -INFINITY, mn = INFINITY;
  int am = -1;
  for_each_logit(x, V, [&](float v, int64_t j) {
    if (beats(v, int(j), mx, am)) mx = v, am = int(j);
    mn = fminf(mn, v);
  });
  block_argmax<kSelectWarps>(mx, am, sh.redf, sh.redi);
  mn = block_min<kSelectWarps>(mn, sh.redf);
  const int bucket_bits = min(kDigitBits, 31 - id_bits);  // keys of at most 63 bits
  const float range = fminf(mx - mn, 32.0f / inv_t);      // a constant row: 0, one bucket
  const SampleRow row{x,
                      V,
                      id_bits,
                      bucket_bits,
                      mx,
                      inv_t,
                      range > 0 ? float(1 << bucket_bits) / range : 0.0f,
                      ldexpf(1.0f, 63 - id_bits)};
  const uint64_t id_mask = (uint64_t(1) << id_bits) - 1;
  CandidateList list{{0, 0, 0}, {0, 0, 0}, false, 0, false};
  bool raw = true;
  double raw_part = 0;

  auto nothing_else = [](const Chosen&, const KeyRange&, KeyRange&) { return false; };
  uint64_t limit = ~uint64_t(0);
  if (top_k > 0) {
    auto kth = [&](uint64_t) { return uint64_t(top_k - 1); };
    // Every candidate up to the end of the k-th's first digit: the kept set, for top-p and the draw.
    auto kept_set = [&](const Chosen& c, const KeyRange& r, KeyRange& also) {
      also = {0, r.prefix | ((uint64_t(1) << r.shift) - 1), row.key_bits()};
      return c.before + c.count <= kListCap;
    };
    limit = select_candidate(row, limit, true, kth, kept_set, kCompute, V <= kListCap, raw, raw_part, list, sh).key |
            id_mask;
  }
  // Copy the kept candidates while reading them when they may fit (top-k ties can overflow).
  const bool gather_kept = top_k > 0 ? top_k <= kListCap : V <= kListCap;
  const double ud = u[row_id];
  uint64_t draw_th = 0;
  if (top_p < 1) {
    auto reach = [&](uint64_t z) {  // cum >= top_p·z  <=>  cum > ceil(top_p·z) − 1
      return min(uint64_t(ceil(top_p * double(z))) - 1, z - 1);
    };
    // The draw's threshold u·z lies between u·before and u·(before + mass) of the cutoff's first
    // digit; when both fall in one other digit of the kept histogram, the pass that copies the
    // cutoff's candidates copies the draw's too, and the draw reads no more of the row.
    auto draw_digit = [&](const Chosen& c, const KeyRange& r, KeyRange& also) {
      const uint64_t lo = uint64_t(ud * double(c.before)), hi = uint64_t(ud * double(c.before + c.mass));
      const Chosen a = choose_digit(
          sh.kept_mass, sh.kept_count, false, 0, [&](uint64_t z) { return min(lo, z - 1); }, sh);
      const Chosen b = choose_digit(
          sh.kept_mass, sh.kept_count, false, 0, [&](uint64_t z) { return min(hi, z - 1); }, sh);
      if (a.digit != b.digit || a.digit == c.digit || a.count + c.count > kListCap) return false;
      also = {uint64_t(a.digit) << r.shift, r.limit, r.shift};
      return true;
    };
    const uint64_t nucleus =
        select_candidate(row, limit, false, reach, draw_digit, kComputeAndKeep, gather_kept, raw, raw_part, list, sh)
            .cum;
    draw_th = min(uint64_t(ud * double(nucleus)), nucleus - 1);  // cum > u·z; the last one if rounding
  }
  auto draw = [&](uint64_t z) { return top_p < 1 ? draw_th : min(uint64_t(ud * double(z)), z - 1); };
  const uint64_t key = select_candidate(row, limit, false, draw, nothing_else, top_p < 1 ? kReuseKept : kCompute,
                                        gather_kept, raw, raw_part, list, sh)
                           .key;
  const double raw_sum = block_sum<kSelectWarps>(raw_part, sh.red);
  if (threadIdx.x == 0) {
    const int tok = int(key & id_mask);
    tokens[row_id] = tok;
    logprobs[row_id] = double(x[tok]) - (double(mx) + log(raw_sum));
  }
}

}  // namespace

// ---- Launchers ----

void CudaOps::head_logprobs(double* logp, double* lse, const bf16* H, const bf16* W, const int32_t* targets, int64_t n,
                            int64_t C, int64_t V, float* scratch, int64_t scratch_elems) {
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
  head_finalize_kernel<<<blocks_for(n, kWarps), kRowThreads, 0, stream_>>>(logp, lse, dev(H), dev(W), targets, n, C, V);
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
      head_dlogits_kernel<<<unsigned(R), kRowThreads, 0, stream_>>>(scratch, tile.ld, Vc, dev(dl), lse + r0, coef + r0,
                                                                    targets + r0, v0);
      SPPO_CUDA_LAUNCHED(head_dlogits_kernel);
      gemm_master(false, false, R, C, Vc, 1.0, dl, tile.ld, W + v0 * C, C, v0 == 0 ? 0.0 : 1.0, dh, C);
      if (dW) gemm_master(true, false, Vc, C, R, 1.0, dl, tile.ld, H + r0 * C, C, 1.0, dW + v0 * C, C);
    }
    const unsigned blocks = unsigned(std::min<int64_t>(blocks_for(R * C, 256), 65536));
    float_to_bf16_kernel<<<blocks, 256, 0, stream_>>>(dev(dH + r0 * C), dh, R * C);
    SPPO_CUDA_LAUNCHED(float_to_bf16_kernel);
  }
}

// Untruncated: each weight is an fp32 expf of the same fp32 argument sample_token computes,
// summed in double; the sums run in another order (block scans, not a loop) and expf differs from
// the CPU's exp by about an ulp, so a draw can differ from the CPU's only when u·z lies within
// about 1e-7 relative of a cumulative boundary. Truncated: see sample_truncated_kernel's notes.
void CudaOps::sample(int32_t* tokens, double* raw_logprobs, const float* logits, int64_t n, int64_t V,
                     const SamplingOptions& o, const double* u) {
  SPPO_REQUIRE(n >= 0 && V > 0 && V < (int64_t(1) << 31), "sample: bad shape n ", n, ", V ", V);
  SPPO_REQUIRE(n < (int64_t(1) << 31), "sample: at most 2^31 - 1 rows per call, got ", n);
  if (n == 0) return;
  SPPO_CUDA_CHECK(cudaSetDevice(device_));
  HeadState& st = head_state();
  const bool greedy = !(o.temperature > 0);
  const bool truncated = !greedy && ((o.top_k > 0 && o.top_k < V) || o.top_p < 1);
  const float inv_t = greedy ? 1.0f : float(1.0 / o.temperature);
  double* du = grow<double>(st.u, size_t(n) * sizeof(double), stream_, "the sampler's draws");
  int32_t* dtok = grow<int32_t>(st.tokens, size_t(n) * sizeof(int32_t), stream_, "the sampled tokens");
  double* dlp = grow<double>(st.logprob, size_t(n) * sizeof(double), stream_, "the sampled log-probs");
  if (!greedy) SPPO_CUDA_CHECK(cudaMemcpyAsync(du, u, size_t(n) * sizeof(double), cudaMemcpyHostToDevice, stream_));
  if (truncated) {
    int id_bits = 1;
    while ((int64_t(1) << id_bits) < V) ++id_bits;  // ids 0..V−1 fit; id_bits <= 31
    const int64_t top_k = o.top_k > 0 && o.top_k < V ? o.top_k : 0;
    if (!st.select_smem_set) {  // above the 48 KiB a kernel gets without asking
      SPPO_CUDA_CHECK(cudaFuncSetAttribute(sample_truncated_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           int(sizeof(SelectShared))));
      st.select_smem_set = true;
    }
    sample_truncated_kernel<<<unsigned(n), kSelectThreads, sizeof(SelectShared), stream_>>>(
        logits, V, id_bits, top_k, o.top_p, inv_t, du, dtok, dlp);
    SPPO_CUDA_LAUNCHED(sample_truncated_kernel);
  } else {
    sample_rows_kernel<<<unsigned(n), kRowThreads, 0, stream_>>>(logits, V, greedy, inv_t, du, dtok, dlp);
    SPPO_CUDA_LAUNCHED(sample_rows_kernel);
  }
  SPPO_CUDA_CHECK(cudaMemcpyAsync(tokens, dtok, size_t(n) * sizeof(int32_t), cudaMemcpyDeviceToHost, stream_));
  SPPO_CUDA_CHECK(cudaMemcpyAsync(raw_logprobs, dlp, size_t(n) * sizeof(double), cudaMemcpyDeviceToHost, stream_));
  SPPO_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

}  // namespace sppo::cuda
