// The attention ops' entry points (attention.cuh): the launch helpers, the family's state, the
// choice of implementation per call and the launch of its kernels, and the backward's row deltas,
// which every implementation's backward reads.
#include <climits>
#include <cstdlib>
#include <cstring>

#include "cuda/attention/attention.cuh"

namespace sppo::cuda {

namespace attn {

int dmax_for(int64_t D, const char* op) {
  SPPO_REQUIRE(D >= 1 && D <= 128, op, ": head_dim ", D, " is not supported by the CUDA backend (1..128)");
  return D <= 32 ? 32 : D <= 64 ? 64 : 128;
}

void check_shape(const AttentionShape& s, const char* op) {
  SPPO_REQUIRE(s.heads > 0 && s.kv_heads > 0 && s.heads % s.kv_heads == 0, op, ": heads (", s.heads,
               ") must be a positive multiple of kv_heads (", s.kv_heads, ")");
  SPPO_REQUIRE(s.seq >= 0 && s.seq < (int64_t(1) << 30) && s.batch >= 0 && s.batch * s.heads <= INT_MAX, op,
               ": shape out of range (batch ", s.batch, ", seq ", s.seq, ", heads ", s.heads, ")");
}

AttnParams attn_params(const AttentionShape& s) {
  AttnParams p;
  p.B = int(s.batch), p.T = int(s.seq), p.H = int(s.heads), p.KV = int(s.kv_heads), p.D = int(s.head_dim);
  p.group = int(s.heads / s.kv_heads);
  p.qkv_stride = s.qkv_stride, p.q_off = s.q_off, p.k_off = s.k_off, p.v_off = s.v_off;
  p.out_stride = s.out_stride;
  p.scale_log2 = float(s.scale * 1.4426950408889634);
  p.n_tiles = int((s.seq + kTile - 1) / kTile);
  p.vec = false;
  return p;
}

bool rows_aligned16(std::initializer_list<const void*> ptrs, std::initializer_list<int64_t> elems) {
  for (const void* q : ptrs)
    if (reinterpret_cast<uintptr_t>(q) % 16 != 0) return false;
  for (int64_t e : elems)
    if (e % 8 != 0) return false;
  return true;
}

AttnPath attention_path() {
  const char* v = std::getenv("SPPO_CUDA_ATTENTION");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "wmma") == 0) return AttnPath::wmma;
  if (std::strcmp(v, "mma") == 0) return AttnPath::mma;
  SPPO_REQUIRE(std::strcmp(v, "fma") == 0, "SPPO_CUDA_ATTENTION is '", v,
               "'; expected 'wmma' (tensor cores, WMMA: the default), 'mma' (tensor cores, mma.sync) or 'fma' "
               "(fp32 FMA kernels)");
  return AttnPath::fma;
}

unsigned tile_grid(int64_t tiles, int64_t heads, int64_t batch, const char* op) {
  SPPO_REQUIRE(tiles * heads * batch <= INT_MAX, op, ": too many blocks (batch ", batch, ", heads ", heads, ")");
  return unsigned(tiles * heads * batch);
}

namespace {

// delta(B, H, T) = rowsum(dO ∘ O) per (row, head): one warp each, lanes over the head dim.
__global__ void attention_delta_kernel(float* __restrict__ delta, const __nv_bfloat16* __restrict__ dout,
                                       const __nv_bfloat16* __restrict__ out, int B, int T, int H, int D,
                                       int64_t out_stride) {
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= int64_t(B) * T * H) return;  // whole warps leave together (blockDim is a multiple of 32)
  const int h = int(warp % H);
  const int64_t row = warp / H;  // b * T + t
  const int64_t at = row * out_stride + int64_t(h) * D;
  float acc = 0.f;
  for (int d = lane; d < D; d += 32) acc = fmaf(to_f(dout[at + d]), to_f(out[at + d]), acc);
  acc = lanes_sum<32>(acc);
  if (lane == 0) {
    const int64_t b = row / T, t = row % T;
    delta[(b * H + h) * T + t] = acc;
  }
}

// The kernels this call takes: the tensor-core implementation chosen (st.path) for head dims
// 32, 64 and 128, else the FMA kernels (head_dim padded to dmax).
AttnKernels kernels_for(const AttnState& st, int64_t D, int dmax) {
  if (st.path != AttnPath::fma && (D == 32 || D == 64 || D == 128))
    return st.path == AttnPath::mma ? mma_kernels(int(D)) : wmma_kernels(int(D));
  return fma_kernels(dmax);
}

// Blocks of k.rows rows: the forward and dQ over the query rows of every (batch, head), dK/dV
// over the key rows of every (batch, kv head).
int64_t row_blocks(const AttnKernels& k, const AttentionShape& s) { return (s.seq + k.rows - 1) / k.rows; }

void launch_forward(AttnState& st, int device, cudaStream_t stream, const AttnKernels& k, __nv_bfloat16* out,
                    float* lse, const __nv_bfloat16* qkv, const AttentionShape& s) {
  AttnParams p = attn_params(s);
  if (k.vec_rows) p.vec = rows_aligned16({qkv}, {s.qkv_stride, s.q_off, s.k_off, s.v_off});
  st.allow_smem(reinterpret_cast<const void*>(k.forward.kernel), k.forward.smem, device, "attention_forward");
  k.forward.kernel<<<tile_grid(row_blocks(k, s), s.heads, s.batch, "attention_forward"), k.forward.threads,
                     k.forward.smem, stream>>>(out, lse, qkv, p);
  SPPO_CUDA_LAUNCHED(attention_forward);
}

void launch_backward(AttnState& st, int device, cudaStream_t stream, const AttnKernels& k, __nv_bfloat16* dqkv,
                     const __nv_bfloat16* dout, const __nv_bfloat16* qkv, const float* lse, const float* delta,
                     const AttentionShape& s) {
  AttnParams p = attn_params(s);
  if (k.vec_rows) p.vec = rows_aligned16({qkv, dout}, {s.qkv_stride, s.q_off, s.k_off, s.v_off, s.out_stride});
  const float scale = float(s.scale);
  st.allow_smem(reinterpret_cast<const void*>(k.dq.kernel), k.dq.smem, device, "attention_backward");
  st.allow_smem(reinterpret_cast<const void*>(k.dkdv.kernel), k.dkdv.smem, device, "attention_backward");
  k.dq.kernel<<<tile_grid(row_blocks(k, s), s.heads, s.batch, "attention_backward"), k.dq.threads, k.dq.smem, stream>>>(
      dqkv, dout, qkv, lse, delta, p, scale);
  SPPO_CUDA_LAUNCHED(attention_backward_dq);
  k.dkdv.kernel<<<tile_grid(row_blocks(k, s), s.kv_heads, s.batch, "attention_backward"), k.dkdv.threads, k.dkdv.smem,
                  stream>>>(dqkv, dout, qkv, lse, delta, p, scale);
  SPPO_CUDA_LAUNCHED(attention_backward_dkdv);
}

}  // namespace
}  // namespace attn

template <>
void StateDeleter<AttnState>::operator()(AttnState* s) const {
  delete s;
}

AttnState& CudaOps::attn_state() {
  if (!attn_) attn_.reset(new AttnState());
  return *attn_;
}

using namespace attn;

void CudaOps::attention_forward(bf16* out, float* lse, const bf16* qkv, const AttentionShape& s) {
  check_shape(s, "attention_forward");
  const int dmax = dmax_for(s.head_dim, "attention_forward");
  AttnState& st = attn_state();  // even for an empty call: the first call fixes the kernel choice
  if (s.batch == 0 || s.seq == 0) return;
  launch_forward(st, device_, stream_, kernels_for(st, s.head_dim, dmax), dev(out), lse, dev(qkv), s);
}

void CudaOps::attention_backward(bf16* dqkv, const bf16* dout, const bf16* qkv, const bf16* out, const float* lse,
                                 const AttentionShape& s) {
  check_shape(s, "attention_backward");
  const int dmax = dmax_for(s.head_dim, "attention_backward");
  AttnState& st = attn_state();
  if (s.batch == 0 || s.seq == 0) return;
  const int64_t rows = s.batch * s.seq * s.heads;
  float* delta = st.grow(st.delta, st.delta_elems, size_t(rows), stream_, "the attention backward's row deltas");
  constexpr int kDeltaThreads = 256;  // 8 warps, a (row, head) each
  const int64_t blocks = (rows + kDeltaThreads / 32 - 1) / (kDeltaThreads / 32);
  SPPO_REQUIRE(blocks <= INT_MAX, "attention_backward: too many rows (", rows, ")");
  attention_delta_kernel<<<unsigned(blocks), kDeltaThreads, 0, stream_>>>(
      delta, dev(dout), dev(out), int(s.batch), int(s.seq), int(s.heads), int(s.head_dim), s.out_stride);
  SPPO_CUDA_LAUNCHED(attention_delta_kernel);
  launch_backward(st, device_, stream_, kernels_for(st, s.head_dim, dmax), dev(dqkv), dev(dout), dev(qkv), lse, delta,
                  s);
}

}  // namespace sppo::cuda
