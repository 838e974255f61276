// Batched sampling's attention (attention.cuh): the KV-cache write and the split decode over
// the paged cache (ops.h KvBlocks: positions reached through each row's block table). Kernels,
// then launchers and the two ops.
#include <algorithm>
#include <climits>

#include "cuda/attention/attention.cuh"

namespace sppo::cuda {

namespace attn {
namespace {

// ---- Decoding with a KV cache ----
// Split decode: a row's cached positions are cut into chunks of kDecodeChunk; block (row, kv
// head, chunk) computes, for the group's query heads, the chunk's max m, sum l and unnormalised
// P V, and a second kernel merges a row's chunks in chunk order. The chunking depends only on the
// row's own length, so a row's result is the same whatever else the call holds.
constexpr int kDecodeChunk = 256;
constexpr int kDecodeThreads = 128;
constexpr int kDecodeWarps = kDecodeThreads / 32;

// Where the cache holds kv head h of position `pos` of a table row: (blocks, KV, bs, D).
struct PagedCache {
  const int32_t* tables;  // (rows, max_blocks)
  int blocks, bs, max_blocks, KV, D;
  // A table entry outside the pool is a caller bug (the generator fills every entry it reads):
  // the write skips it and the decode reads block 0 instead, never memory outside the pool.
  __device__ bool valid(int row, int pos) const {
    return unsigned(tables[int64_t(row) * max_blocks + pos / bs]) < unsigned(blocks);
  }
  __device__ int64_t at(int row, int h, int pos) const {
    const int b = valid(row, pos) ? tables[int64_t(row) * max_blocks + pos / bs] : 0;
    return ((int64_t(b) * KV + h) * bs + pos % bs) * D;
  }
};

__global__ void kv_cache_write_kernel(__nv_bfloat16* __restrict__ k_cache, __nv_bfloat16* __restrict__ v_cache,
                                      const __nv_bfloat16* __restrict__ qkv, const int32_t* __restrict__ slots,
                                      const int32_t* __restrict__ positions, int64_t n, PagedCache pc, int ctx,
                                      int n_slots, int64_t qkv_stride, int64_t k_off, int64_t v_off) {
  const int KV = pc.KV, D = pc.D;
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= n * KV * D) return;
  const int d = int(e % D);
  const int h = int((e / D) % KV);
  const int64_t i = e / (int64_t(D) * KV);
  // A row outside the cache is a caller bug (the generator validates first); never write past it.
  if (unsigned(positions[i]) >= unsigned(ctx) || unsigned(slots[i]) >= unsigned(n_slots)) return;
  if (!pc.valid(slots[i], positions[i])) return;
  const int64_t at = pc.at(slots[i], h, positions[i]) + d;
  const int64_t src = i * qkv_stride + int64_t(h) * D + d;
  k_cache[at] = qkv[src + k_off];
  v_cache[at] = qkv[src + v_off];
}

struct DecodeParams {
  int H, KV, D, group, ctx, n_chunks;  // n_chunks = ceil(ctx / kDecodeChunk): the partials' stride
  int64_t qkv_stride, q_off, out_stride;
  float scale_log2;
};

// Block (row r of this launch, kv head, chunk). Shared: q (group, D) pre-scaled, scores (group,
// kDecodeChunk), P V partials (kDecodeWarps, group, D). Partials: o (rows, H, n_chunks, D) and (m, l) (rows, H, n_chunks, 2).
template <int DMAX>
__global__ void __launch_bounds__(kDecodeThreads)
    attention_decode_chunk_kernel(float* __restrict__ part_o, float* __restrict__ part_ml,
                                  const __nv_bfloat16* __restrict__ qkv, const __nv_bfloat16* __restrict__ k_cache,
                                  const __nv_bfloat16* __restrict__ v_cache, const int32_t* __restrict__ slots,
                                  const int32_t* __restrict__ positions, int64_t row0, DecodeParams p, PagedCache pc) {
  extern __shared__ float smem[];
  const int G = p.group, D = p.D;
  float* qs = smem;        // (G, D)
  float* ps = qs + G * D;  // (G, kDecodeChunk)
  const int64_t r = blockIdx.x, i = row0 + r;
  const int kvh = blockIdx.y, chunk = blockIdx.z;
  // Positions past the cache would index outside it: clamp (a caller bug, not a valid request).
  const int len = int(min(int64_t(positions[i]) + 1, int64_t(p.ctx)));
  const int p0 = chunk * kDecodeChunk;
  if (p0 >= len) return;  // the whole block leaves before any barrier
  const int cnt = min(kDecodeChunk, len - p0);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  const __nv_bfloat16* q = qkv + i * p.qkv_stride + p.q_off + int64_t(kvh) * G * D;  // (G, D), rows D apart
  for (int e = threadIdx.x; e < G * D; e += kDecodeThreads) qs[e] = to_f(q[e]) * p.scale_log2;
  __syncthreads();

  // Position p0 + t's keys and values: D contiguous numbers in its block (entries of the table
  // past the row's length are never read).
  const int slot = slots[i];
  // Scores: a warp per position, lanes over the head dim.
  constexpr int U = DMAX / 32;
  for (int t = warp; t < cnt; t += kDecodeWarps) {
    const __nv_bfloat16* K = k_cache + pc.at(slot, kvh, p0 + t);
    float kr[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int d = lane + 32 * u;
      kr[u] = d < D ? to_f(K[d]) : 0.f;
    }
    for (int g = 0; g < G; ++g) {
      float acc = 0.f;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int d = lane + 32 * u;
        if (d < D) acc = fmaf(qs[g * D + d], kr[u], acc);
      }
      acc = lanes_sum<32>(acc);
      if (lane == 0) ps[g * kDecodeChunk + t] = acc;
    }
  }
  __syncthreads();

  // Softmax pieces per query head: a warp per head; lanes stride the chunk, fixed reduction order.
  for (int g = warp; g < G; g += kDecodeWarps) {
    float* srow = ps + g * kDecodeChunk;
    float mx = -INFINITY;
    for (int t = lane; t < cnt; t += 32) mx = fmaxf(mx, srow[t]);
    mx = lanes_max<32>(mx);
    float sum = 0.f;
    for (int t = lane; t < cnt; t += 32) {
      const float e = exp2f(srow[t] - mx);
      srow[t] = e;
      sum += e;
    }
    sum = lanes_sum<32>(sum);
    if (lane == 0) {
      const int64_t at = ((r * p.H + int64_t(kvh) * G + g) * p.n_chunks + chunk) * 2;
      part_ml[at] = mx;
      part_ml[at + 1] = sum;
    }
  }
  __syncthreads();

  // Unnormalised P V. Warp w takes positions w, w + kDecodeWarps, ... in order (lanes over the head
  // dim, one coalesced V row per step), then the warps' partial sums are added in warp order: a
  // fixed order, so the result is the same run to run. (A thread per column walking every
  // position in turn left most threads idle and serialised ~cnt dependent loads: ~40 µs a call.)
  float* red = ps + G * kDecodeChunk;  // (kDecodeWarps, G, D)
  for (int g = 0; g < G; ++g) {
    const float* prow = ps + g * kDecodeChunk;
    float acc[U];
#pragma unroll
    for (int u = 0; u < U; ++u) acc[u] = 0.f;
#pragma unroll 4
    for (int t = warp; t < cnt; t += kDecodeWarps) {
      const float pt = prow[t];
      const __nv_bfloat16* V = v_cache + pc.at(slot, kvh, p0 + t);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int d = lane + 32 * u;
        if (d < D) acc[u] = fmaf(pt, to_f(V[d]), acc[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int d = lane + 32 * u;
      if (d < D) red[(warp * G + g) * D + d] = acc[u];
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < G * D; e += kDecodeThreads) {
    float acc = 0.f;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) acc += red[w * G * D + e];
    const int g = e / D, d = e % D;
    part_o[((r * p.H + int64_t(kvh) * G + g) * p.n_chunks + chunk) * D + d] = acc;
  }
}

// Merges a row's chunks in order: out = Σ o_c 2^(m_c - M) / Σ l_c 2^(m_c - M). Block per (row, head).
__global__ void __launch_bounds__(kDecodeThreads)
    attention_decode_merge_kernel(__nv_bfloat16* __restrict__ out, const float* __restrict__ part_o,
                                  const float* __restrict__ part_ml, const int32_t* __restrict__ positions,
                                  int64_t row0, DecodeParams p) {
  const int64_t r = blockIdx.x / p.H, i = row0 + r;
  const int h = int(blockIdx.x % p.H);
  const int len = int(min(int64_t(positions[i]) + 1, int64_t(p.ctx)));
  if (len <= 0) {  // a negative position (a caller bug): no keys, and no 0 * inf below
    for (int d = threadIdx.x; d < p.D; d += kDecodeThreads) out[i * p.out_stride + int64_t(h) * p.D + d] = to_bf(0.f);
    return;
  }
  const int chunks = (len + kDecodeChunk - 1) / kDecodeChunk;
  const int64_t at = (r * p.H + h) * p.n_chunks;
  float M = -INFINITY;
  for (int c = 0; c < chunks; ++c) M = fmaxf(M, part_ml[(at + c) * 2]);
  float L = 0.f;
  for (int c = 0; c < chunks; ++c) L += part_ml[(at + c) * 2 + 1] * exp2f(part_ml[(at + c) * 2] - M);
  const float inv = 1.f / L;
  for (int d = threadIdx.x; d < p.D; d += kDecodeThreads) {
    float acc = 0.f;
    for (int c = 0; c < chunks; ++c) acc = fmaf(part_o[(at + c) * p.D + d], exp2f(part_ml[(at + c) * 2] - M), acc);
    out[i * p.out_stride + int64_t(h) * p.D + d] = to_bf(acc * inv);
  }
}

template <int DMAX>
void launch_decode_chunks(AttnState& st, int device, cudaStream_t stream, float* part_o, float* part_ml,
                          const __nv_bfloat16* qkv, const __nv_bfloat16* k_cache, const __nv_bfloat16* v_cache,
                          const int32_t* slots, const int32_t* positions, int64_t row0, int64_t rows,
                          const DecodeParams& p, const PagedCache& pc) {
  // q (G, D), scores (G, kDecodeChunk), the warps' P V partial sums (kDecodeWarps, G, D)
  const size_t smem = sizeof(float) * size_t(p.group) * (p.D + kDecodeChunk + kDecodeWarps * p.D);
  st.allow_smem(reinterpret_cast<const void*>(&attention_decode_chunk_kernel<DMAX>), smem, device, "attention_decode");
  const dim3 grid(unsigned(rows), unsigned(p.KV), unsigned(p.n_chunks));
  attention_decode_chunk_kernel<DMAX>
      <<<grid, kDecodeThreads, smem, stream>>>(part_o, part_ml, qkv, k_cache, v_cache, slots, positions, row0, p, pc);
  SPPO_CUDA_LAUNCHED(attention_decode_chunk_kernel);
}

}  // namespace
}  // namespace attn

using namespace attn;

namespace {
PagedCache paged_cache(const AttentionShape& s, const KvBlocks& kv, const char* op) {
  SPPO_REQUIRE(kv.tables && kv.block_size >= 1 && kv.max_blocks * kv.block_size >= s.seq, op, ": block tables of ",
               kv.max_blocks, " blocks of ", kv.block_size, " positions cannot address ", s.seq, " positions");
  SPPO_REQUIRE(kv.blocks >= 1 && kv.blocks < INT_MAX && s.batch * kv.max_blocks < INT_MAX, op, ": a pool of ",
               kv.blocks, " blocks and ", s.batch, " tables of ", kv.max_blocks, " entries is out of range");
  return {kv.tables, int(kv.blocks), int(kv.block_size), int(kv.max_blocks), int(s.kv_heads), int(s.head_dim)};
}
}  // namespace

void CudaOps::kv_cache_write(bf16* k_cache, bf16* v_cache, const bf16* qkv, const int32_t* slots,
                             const int32_t* positions, int64_t n, const AttentionShape& s, const KvBlocks& kv) {
  check_shape(s, "kv_cache_write");
  SPPO_REQUIRE(s.head_dim >= 1 && s.seq < INT_MAX, "kv_cache_write: bad shape (head_dim ", s.head_dim, ", seq ", s.seq,
               ")");
  const PagedCache pc = paged_cache(s, kv, "kv_cache_write");
  if (n == 0) return;
  constexpr int kWriteThreads = 256;
  const int64_t total = n * s.kv_heads * s.head_dim;
  SPPO_REQUIRE(total / kWriteThreads < INT_MAX, "kv_cache_write: too many rows (", n, ")");
  kv_cache_write_kernel<<<blocks_for(total, kWriteThreads), kWriteThreads, 0, stream_>>>(
      dev(k_cache), dev(v_cache), dev(qkv), slots, positions, n, pc, int(s.seq), int(s.batch), s.qkv_stride, s.k_off,
      s.v_off);
  SPPO_CUDA_LAUNCHED(kv_cache_write_kernel);
}

void CudaOps::attention_decode(bf16* out, const bf16* qkv, const bf16* k_cache, const bf16* v_cache,
                               const int32_t* slots, const int32_t* positions, int64_t n, const AttentionShape& s,
                               const KvBlocks& kv) {
  check_shape(s, "attention_decode");
  const int dmax = dmax_for(s.head_dim, "attention_decode");
  const PagedCache pc = paged_cache(s, kv, "attention_decode");
  SPPO_REQUIRE(s.seq >= 1, "attention_decode: the cache has no positions (seq ", s.seq, ")");
  if (n == 0) return;
  AttnState& st = attn_state();
  DecodeParams p;
  p.H = int(s.heads), p.KV = int(s.kv_heads), p.D = int(s.head_dim), p.group = int(s.heads / s.kv_heads);
  p.ctx = int(s.seq);
  p.n_chunks = int((s.seq + kDecodeChunk - 1) / kDecodeChunk);
  p.qkv_stride = s.qkv_stride, p.q_off = s.q_off, p.out_stride = s.out_stride;
  p.scale_log2 = float(s.scale * 1.4426950408889634);
  SPPO_REQUIRE(p.n_chunks <= 65535 && p.KV <= 65535, "attention_decode: cache of ", s.seq, " positions and ",
               s.kv_heads, " kv heads is too large");
  // Rows go in batches whose partials fit a bounded buffer; a row's math does not depend on the
  // batching, only on its own length.
  const size_t per_row = size_t(p.H) * p.n_chunks * (p.D + 2);
  constexpr size_t kMaxPartialFloats = size_t(16) << 20;  // 64 MiB
  const int64_t batch_rows =
      std::min<int64_t>({n, std::max<int64_t>(1, int64_t(kMaxPartialFloats / per_row)), int64_t(INT_MAX / p.H)});
  float* part = st.grow(st.partials, st.partial_elems, per_row * size_t(batch_rows), stream_,
                        "the attention decode's partial results");
  float* part_o = part;
  float* part_ml = part + size_t(batch_rows) * p.H * p.n_chunks * p.D;
  for (int64_t row0 = 0; row0 < n; row0 += batch_rows) {
    const int64_t rows = std::min(batch_rows, n - row0);
    switch (dmax) {
      case 32:
        launch_decode_chunks<32>(st, device_, stream_, part_o, part_ml, dev(qkv), dev(k_cache), dev(v_cache), slots,
                                 positions, row0, rows, p, pc);
        break;
      case 64:
        launch_decode_chunks<64>(st, device_, stream_, part_o, part_ml, dev(qkv), dev(k_cache), dev(v_cache), slots,
                                 positions, row0, rows, p, pc);
        break;
      default:
        launch_decode_chunks<128>(st, device_, stream_, part_o, part_ml, dev(qkv), dev(k_cache), dev(v_cache), slots,
                                  positions, row0, rows, p, pc);
        break;
    }
    attention_decode_merge_kernel<<<unsigned(rows * p.H), kDecodeThreads, 0, stream_>>>(dev(out), part_o, part_ml,
                                                                                        positions, row0, p);
    SPPO_CUDA_LAUNCHED(attention_decode_merge_kernel);
  }
}

}  // namespace sppo::cuda
