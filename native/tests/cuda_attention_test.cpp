// The CUDA attention family (cuda/attention/) against the CPU backend: forward, backward,
// KV-cache write and decode on fresh random inputs rounded to bf16 first (so both backends see
// the same numbers), with outputs poisoned with NaN so an unwritten element cannot pass.
// Errors are max|gpu - cpu| / max|cpu| per output; the GPU's outputs are bf16, so 1e-2 leaves
// room for their rounding (2^-9 relative) and for fp32 summation order, and none for a wrong
// index. Log-sum-exps are fp32 on both sides: 1e-4 absolute.
// The forward and backward have three implementations: WMMA tensor-core kernels (the default for
// head_dim 32, 64, 128), mma.sync tensor-core kernels (SPPO_CUDA_ATTENTION=mma, the same head
// dims) and fp32 FMA (SPPO_CUDA_ATTENTION=fma, and every other head_dim). Each is checked against
// the CPU, and each tensor-core path against FMA.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "core/bf16.h"
#include "core/rng.h"
#include "cpu/cpu_ops.h"
#include "cuda/cuda_backend.h"
#include "tests/cuda_test_util.h"
#include "tests/harness.h"

using namespace sppo;
using namespace sppo::testutil;

namespace {

constexpr double kBf16Tol = 1e-2;  // relative (max-norm), bf16 outputs
constexpr double kLseTol = 1e-4;   // absolute, fp32 log-sum-exps
// Tensor cores against FMA: each side is within kBf16Tol of the CPU, and their bf16 roundings are
// independent, so one element may differ by an ulp of the largest binade (2^-7 relative) and more.
constexpr double kPathTol = 2e-2;

// Sets SPPO_CUDA_ATTENTION for its lifetime and restores the previous value. An op set reads the
// variable once, at its first attention call, so it must make that call inside the scope.
class AttentionPathScope {
 public:
  explicit AttentionPathScope(const char* value) {
    const char* old = std::getenv(kVar);
    had_ = old != nullptr;
    if (had_) old_ = old;
    setenv(kVar, value, 1);
  }
  ~AttentionPathScope() {
    if (had_)
      setenv(kVar, old_.c_str(), 1);
    else
      unsetenv(kVar);
  }
  AttentionPathScope(const AttentionPathScope&) = delete;
  AttentionPathScope& operator=(const AttentionPathScope&) = delete;

 private:
  static constexpr const char* kVar = "SPPO_CUDA_ATTENTION";
  bool had_ = false;
  std::string old_;
};

// A fresh op set whose attention runs the kernels SPPO_CUDA_ATTENTION=`value` selects ("mma" or
// "wmma": those tensor cores where the head dim allows, "fma": the FMA kernels).
std::unique_ptr<Ops<bf16>> ops_on_path(Ops<bf16>& gpu, const char* value) {
  AttentionPathScope scope(value);
  std::unique_ptr<Ops<bf16>> ops = gpu.fresh();
  // The op set's first attention call, even an empty one, fixes its choice.
  const AttentionShape none{0, 0, 1, 1, 64, 192, 0, 64, 128, 64, 0.125};
  ops->attention_forward(nullptr, nullptr, nullptr, none);
  return ops;
}

// n standard normals, rounded to bf16 (this file's rng stream, 7).
std::vector<float> random_values(int64_t n, uint64_t seed) { return randn_bf16(n, seed, 1.0, 7); }

// max |a - b| / max |b| over the elements `pick` selects; infinity if a is NaN where b is not.
// Unlike max_rel_error (cuda_test_util.h), which lets a NaN through and divides by max |b| alone.
// The denominator is at least kRefFloor: with unit-normal inputs real outputs are O(1), while some
// are zero in exact arithmetic (dq and dk of a one-position sequence, where P = 1) and both
// backends then hold only rounding noise, whose ratio means nothing.
constexpr double kRefFloor = 1e-2;
template <class Pick>
double max_rel_error_floored(const std::vector<float>& a, const std::vector<float>& b, Pick pick) {
  double diff = 0, ref = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    if (!pick(i)) continue;
    if (std::isnan(a[i]) && !std::isnan(b[i])) return INFINITY;
    diff = std::max(diff, double(std::fabs(a[i] - b[i])));
    ref = std::max(ref, double(std::fabs(b[i])));
  }
  return diff / std::max(ref, kRefFloor);
}

// Where q, k and v sit in a fused row. `packed` puts them side by side; the offset layout puts
// v first at an odd column, then q and k, with spare columns between and after (which the ops
// must neither read as q/k/v nor write), and pads output rows too.
struct Layout {
  int64_t stride, q_off, k_off, v_off, out_stride;
};
Layout packed_layout(int64_t H, int64_t KV, int64_t D) { return {(H + 2 * KV) * D, 0, H * D, (H + KV) * D, H * D}; }
Layout offset_layout(int64_t H, int64_t KV, int64_t D) {
  const int64_t v_off = 3, q_off = v_off + KV * D + 5, k_off = q_off + H * D;
  return {k_off + KV * D + 7, q_off, k_off, v_off, H * D + 5};
}

AttentionShape make_shape(int64_t B, int64_t T, int64_t H, int64_t KV, int64_t D, const Layout& L) {
  return {B, T, H, KV, D, L.stride, L.q_off, L.k_off, L.v_off, L.out_stride, 1.0 / std::sqrt(double(D))};
}

std::string describe(const AttentionShape& s) {
  std::ostringstream os;
  os << "(batch " << s.batch << ", seq " << s.seq << ", heads " << s.heads << "/" << s.kv_heads << ", head_dim "
     << s.head_dim << ", stride " << s.qkv_stride << ", q/k/v at " << s.q_off << "/" << s.k_off << "/" << s.v_off
     << ", out stride " << s.out_stride << ")";
  return os.str();
}

// Which column of a fused row a gradient column belongs to.
enum class Part { q, k, v, spare };
Part part_of(const AttentionShape& s, int64_t col) {
  const int64_t QD = s.heads * s.head_dim, KD = s.kv_heads * s.head_dim;
  if (col >= s.q_off && col < s.q_off + QD) return Part::q;
  if (col >= s.k_off && col < s.k_off + KD) return Part::k;
  if (col >= s.v_off && col < s.v_off + KD) return Part::v;
  return Part::spare;
}

bool same_bits(const std::vector<bf16>& a, const std::vector<bf16>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(bf16)) == 0;
}
bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// ---- Forward ----
void check_forward(Ops<bf16>& gpu, const AttentionShape& s, uint64_t seed) {
  const int64_t N = s.batch * s.seq, QD = s.heads * s.head_dim;
  const std::vector<float> qkv = random_values(N * s.qkv_stride, seed);  // spare columns random too

  cpu::CpuOps<float> cpu;
  cpu.plan_scratch(s.seq, s.head_dim);
  std::vector<float> out_ref(N * s.out_stride, kNaN), lse_ref(s.batch * s.heads * s.seq, kNaN);
  cpu.attention_forward(out_ref.data(), lse_ref.data(), qkv.data(), s);

  auto qkv_d = upload(gpu, to_bf16(qkv));
  auto out_d = upload(gpu, to_bf16(std::vector<float>(out_ref.size(), kNaN)));
  auto lse_d = upload(gpu, std::vector<float>(lse_ref.size(), kNaN));
  gpu.attention_forward(out_d.data(), lse_d.data(), qkv_d.data(), s);
  const std::vector<float> out = to_float(out_d.get());
  const std::vector<float> lse = lse_d.get();

  const double e_out = max_rel_error_floored(out, out_ref, [&](size_t i) { return int64_t(i) % s.out_stride < QD; });
  EXPECT_TRUE(e_out < kBf16Tol, "attention_forward out error " << e_out << " " << describe(s));
  double e_lse = 0;
  for (size_t i = 0; i < lse.size(); ++i)
    e_lse = std::isnan(lse[i]) ? INFINITY : std::max(e_lse, double(std::fabs(lse[i] - lse_ref[i])));
  EXPECT_TRUE(e_lse < kLseTol, "attention_forward lse error " << e_lse << " " << describe(s));
  for (size_t i = 0; i < out.size(); ++i)
    if (int64_t(i) % s.out_stride >= QD)
      EXPECT_TRUE(std::isnan(out[i]),
                  "attention_forward wrote spare output column " << int64_t(i) % s.out_stride << " " << describe(s));
}

// ---- Backward ----
struct BackwardInputs {
  std::vector<float> qkv, dout, out, lse, dqkv0;  // dqkv0: NaN in q/k/v columns, random spare columns
};

// Random qkv and dout, and the forward's out (rounded to bf16, as the GPU stores it) and lse from
// the CPU: both backends run their backward on identical inputs.
BackwardInputs backward_inputs(const AttentionShape& s, uint64_t seed) {
  const int64_t N = s.batch * s.seq;
  BackwardInputs in;
  in.qkv = random_values(N * s.qkv_stride, seed);
  in.dout = random_values(N * s.out_stride, seed + 1);
  cpu::CpuOps<float> cpu;
  cpu.plan_scratch(s.seq, s.head_dim);
  in.out.assign(N * s.out_stride, 0.f);
  in.lse.assign(s.batch * s.heads * s.seq, 0.f);
  cpu.attention_forward(in.out.data(), in.lse.data(), in.qkv.data(), s);
  for (float& x : in.out) x = round_bf16(x);
  in.dqkv0 = random_values(N * s.qkv_stride, seed + 2);
  for (size_t i = 0; i < in.dqkv0.size(); ++i)
    if (part_of(s, int64_t(i) % s.qkv_stride) != Part::spare) in.dqkv0[i] = kNaN;
  return in;
}

std::vector<bf16> gpu_backward(Ops<bf16>& gpu, const AttentionShape& s, const BackwardInputs& in) {
  auto qkv_d = upload(gpu, to_bf16(in.qkv));
  auto dout_d = upload(gpu, to_bf16(in.dout));
  auto out_d = upload(gpu, to_bf16(in.out));
  auto lse_d = upload(gpu, in.lse);
  auto dqkv_d = upload(gpu, to_bf16(in.dqkv0));
  gpu.attention_backward(dqkv_d.data(), dout_d.data(), qkv_d.data(), out_d.data(), lse_d.data(), s);
  return dqkv_d.get();
}

void check_backward(Ops<bf16>& gpu, const AttentionShape& s, uint64_t seed) {
  const BackwardInputs in = backward_inputs(s, seed);
  cpu::CpuOps<float> cpu;
  cpu.plan_scratch(s.seq, s.head_dim);
  std::vector<float> ref = in.dqkv0;
  cpu.attention_backward(ref.data(), in.dout.data(), in.qkv.data(), in.out.data(), in.lse.data(), s);

  const std::vector<bf16> got_bits = gpu_backward(gpu, s, in);
  const std::vector<float> got = to_float(got_bits);
  const char* names[] = {"dq", "dk", "dv"};
  const Part parts[] = {Part::q, Part::k, Part::v};
  for (int w = 0; w < 3; ++w) {
    const double e =
        max_rel_error_floored(got, ref, [&](size_t i) { return part_of(s, int64_t(i) % s.qkv_stride) == parts[w]; });
    EXPECT_TRUE(e < kBf16Tol, "attention_backward " << names[w] << " error " << e << " " << describe(s));
  }
  const std::vector<bf16> spare = to_bf16(in.dqkv0);
  for (size_t i = 0; i < got_bits.size(); ++i)
    if (part_of(s, int64_t(i) % s.qkv_stride) == Part::spare)
      EXPECT_TRUE(got_bits[i].bits == spare[i].bits,
                  "attention_backward changed spare column " << int64_t(i) % s.qkv_stride << " " << describe(s));
}

// Sequence lengths at and around the tiles (64 and 128 rows: 1, 15, 64, 127, 128, 129, 300 and
// 1024), head dims 32/64/128, GQA groups 1, 2 and 4; each once packed (16-byte tile loads on the
// tensor-core paths) and once in the offset layout (element loads) with a larger batch.
// check(shape, seed).
template <class Check>
void for_each_shape(Check check) {
  uint64_t seed = 100;
  for (int64_t T : {1, 15, 64, 127, 128, 129, 300, 1024})
    for (int64_t D : {32, 64, 128})
      for (auto [H, KV] : {std::pair<int64_t, int64_t>{4, 4}, {4, 2}, {8, 2}}) {
        const int64_t B = T < 1024 ? 3 : 2;  // the CPU reference's time grows with T^2
        check(make_shape(1, T, H, KV, D, packed_layout(H, KV, D)), seed += 10);
        check(make_shape(B, T, H, KV, D, offset_layout(H, KV, D)), seed += 10);
      }
}

// ---- Tensor cores against FMA ----
// The same inputs through both op sets: forward out and lse, then the backward's dq, dk, dv.
void check_paths_agree(Ops<bf16>& tc, Ops<bf16>& fma, const AttentionShape& s, uint64_t seed) {
  const int64_t N = s.batch * s.seq, QD = s.heads * s.head_dim;
  const std::vector<float> qkv = random_values(N * s.qkv_stride, seed);
  Ops<bf16>* sets[2] = {&tc, &fma};
  std::vector<float> out[2], lse[2];
  for (int i = 0; i < 2; ++i) {
    auto qkv_d = upload(*sets[i], to_bf16(qkv));
    auto out_d = upload(*sets[i], to_bf16(std::vector<float>(N * s.out_stride, kNaN)));
    auto lse_d = upload(*sets[i], std::vector<float>(s.batch * s.heads * s.seq, kNaN));
    sets[i]->attention_forward(out_d.data(), lse_d.data(), qkv_d.data(), s);
    out[i] = to_float(out_d.get());
    lse[i] = lse_d.get();
  }
  const double e_out = max_rel_error_floored(out[0], out[1], [&](size_t i) { return int64_t(i) % s.out_stride < QD; });
  EXPECT_TRUE(e_out < kPathTol, "attention_forward tensor cores vs FMA: out error " << e_out << " " << describe(s));
  double e_lse = 0;
  for (size_t i = 0; i < lse[0].size(); ++i)
    e_lse = std::isnan(lse[0][i]) ? INFINITY : std::max(e_lse, double(std::fabs(lse[0][i] - lse[1][i])));
  EXPECT_TRUE(e_lse < kLseTol, "attention_forward tensor cores vs FMA: lse error " << e_lse << " " << describe(s));

  const BackwardInputs in = backward_inputs(s, seed + 5);
  const std::vector<float> g_tc = to_float(gpu_backward(tc, s, in)), g_fma = to_float(gpu_backward(fma, s, in));
  const char* names[] = {"dq", "dk", "dv"};
  const Part parts[] = {Part::q, Part::k, Part::v};
  for (int w = 0; w < 3; ++w) {
    const double e =
        max_rel_error_floored(g_tc, g_fma, [&](size_t i) { return part_of(s, int64_t(i) % s.qkv_stride) == parts[w]; });
    EXPECT_TRUE(e < kPathTol,
                "attention_backward tensor cores vs FMA: " << names[w] << " error " << e << " " << describe(s));
  }
}

// ---- Decode ----
// A paged cache for the decode tests: `slots` block tables of ceil(ctx / bs) entries over a pool
// with spare blocks, the blocks handed out in a scrambled order (so a table row's blocks are
// neither adjacent nor ascending), and table rows 0 and 2 sharing their first block, as the
// samples of one prompt share its prefix.
struct Paged {
  int64_t bs, max_blocks, blocks;
  std::vector<int32_t> tables;
  int64_t elems_per_block(int64_t KV, int64_t D) const { return KV * bs * D; }
  // Offset of (table row, kv head, position) in a (blocks, KV, bs, D) pool.
  int64_t at(int64_t row, int64_t h, int64_t pos, int64_t KV, int64_t D) const {
    return ((int64_t(tables[row * max_blocks + pos / bs]) * KV + h) * bs + pos % bs) * D;
  }
};
Paged paged_cache(int64_t slots, int64_t ctx, int64_t bs, uint64_t seed) {
  Paged p{bs, (ctx + bs - 1) / bs, 0, {}};
  p.blocks = slots * p.max_blocks + 3;
  std::vector<int32_t> order(p.blocks);
  for (int64_t b = 0; b < p.blocks; ++b) order[b] = int32_t(b);
  for (int64_t b = p.blocks - 1; b > 0; --b) std::swap(order[b], order[int64_t(uniform01(seed, 9, b) * (b + 1))]);
  p.tables.assign(slots * p.max_blocks, 0);
  for (int64_t i = 0; i < slots * p.max_blocks; ++i) p.tables[i] = order[i];
  if (slots > 2) p.tables[2 * p.max_blocks] = p.tables[0];
  return p;
}

struct DecodeCase {
  int64_t slots, ctx;
  std::vector<int32_t> slot, pos;  // per row
};

// Compares kv_cache_write (bitwise) and attention_decode against the CPU for the rows of `c`,
// starting from a pool of random earlier entries; slot 1's entries past `stale_after` are NaN.
void check_decode(Ops<bf16>& gpu, int64_t H, int64_t KV, int64_t D, const Layout& L, const DecodeCase& c,
                  int32_t stale_after, uint64_t seed) {
  const int64_t n = int64_t(c.slot.size());
  const AttentionShape s = make_shape(c.slots, c.ctx, H, KV, D, L);
  const Paged pg = paged_cache(c.slots, c.ctx, 16, seed);
  const int64_t cache_elems = pg.blocks * pg.elems_per_block(KV, D);
  std::vector<float> k_cache = random_values(cache_elems, seed), v_cache = random_values(cache_elems, seed + 1);
  for (int64_t h = 0; h < KV; ++h)
    for (int64_t t = stale_after + 1; t < c.ctx; ++t)
      for (int64_t d = 0; d < D; ++d) k_cache[pg.at(1, h, t, KV, D) + d] = v_cache[pg.at(1, h, t, KV, D) + d] = kNaN;
  const std::vector<float> qkv = random_values(n * s.qkv_stride, seed + 2);

  cpu::CpuOps<float> cpu;
  cpu.plan_scratch(c.ctx, D);
  const KvBlocks kv_host{pg.tables.data(), pg.blocks, pg.bs, pg.max_blocks};
  std::vector<float> k_ref = k_cache, v_ref = v_cache, out_ref(n * s.out_stride, kNaN);
  cpu.kv_cache_write(k_ref.data(), v_ref.data(), qkv.data(), c.slot.data(), c.pos.data(), n, s, kv_host);
  cpu.attention_decode(out_ref.data(), qkv.data(), k_ref.data(), v_ref.data(), c.slot.data(), c.pos.data(), n, s,
                       kv_host);

  auto k_d = upload(gpu, to_bf16(k_cache));
  auto v_d = upload(gpu, to_bf16(v_cache));
  auto qkv_d = upload(gpu, to_bf16(qkv));
  auto slot_d = upload(gpu, c.slot);
  auto pos_d = upload(gpu, c.pos);
  auto tables_d = upload(gpu, pg.tables);
  const KvBlocks kv{tables_d.data(), pg.blocks, pg.bs, pg.max_blocks};
  const std::vector<bf16> poison = to_bf16(std::vector<float>(out_ref.size(), kNaN));
  auto out_d = upload(gpu, poison);
  gpu.kv_cache_write(k_d.data(), v_d.data(), qkv_d.data(), slot_d.data(), pos_d.data(), n, s, kv);
  const std::string what = describe(s);
  EXPECT_TRUE(same_bits(k_d.get(), to_bf16(k_ref)), "kv_cache_write k cache " << what);
  EXPECT_TRUE(same_bits(v_d.get(), to_bf16(v_ref)), "kv_cache_write v cache " << what);

  gpu.attention_decode(out_d.data(), qkv_d.data(), k_d.data(), v_d.data(), slot_d.data(), pos_d.data(), n, s, kv);
  const std::vector<bf16> out_bits = out_d.get();
  const std::vector<float> out = to_float(out_bits);
  const double e = max_rel_error_floored(out, out_ref, [&](size_t i) { return int64_t(i) % s.out_stride < H * D; });
  EXPECT_TRUE(e < kBf16Tol, "attention_decode error " << e << " " << what);
  for (size_t i = 0; i < out.size(); ++i)
    if (int64_t(i) % s.out_stride >= H * D)
      EXPECT_TRUE(std::isnan(out[i]), "attention_decode wrote spare output column " << what);

  // The same call again gives the same bits.
  gpu.upload_bytes(out_d.data(), poison.data(), poison.size() * sizeof(bf16));
  gpu.attention_decode(out_d.data(), qkv_d.data(), k_d.data(), v_d.data(), slot_d.data(), pos_d.data(), n, s, kv);
  EXPECT_TRUE(same_bits(out_d.get(), out_bits), "attention_decode is not deterministic " << what);
}

}  // namespace

// The default kernels: mma.sync tensor cores for these head dims.
SPPO_TEST(cuda_attention_forward_matches_cpu) {
  auto gpu = cuda_or_skip();
  auto tc = ops_on_path(*gpu, "mma");
  for_each_shape([&](const AttentionShape& s, uint64_t seed) { check_forward(*tc, s, seed); });
}

SPPO_TEST(cuda_attention_backward_matches_cpu) {
  auto gpu = cuda_or_skip();
  auto tc = ops_on_path(*gpu, "mma");
  for_each_shape([&](const AttentionShape& s, uint64_t seed) { check_backward(*tc, s, seed); });
}

SPPO_TEST(cuda_attention_wmma_kernels_match_cpu) {
  auto gpu = cuda_or_skip();
  auto wmma = ops_on_path(*gpu, "wmma");
  for_each_shape([&](const AttentionShape& s, uint64_t seed) {
    check_forward(*wmma, s, seed);
    check_backward(*wmma, s, seed);
  });
}

SPPO_TEST(cuda_attention_fma_kernels_match_cpu) {
  auto gpu = cuda_or_skip();
  auto fma = ops_on_path(*gpu, "fma");
  for_each_shape([&](const AttentionShape& s, uint64_t seed) {
    check_forward(*fma, s, seed);
    check_backward(*fma, s, seed);
  });
}

SPPO_TEST(cuda_attention_tensor_cores_match_fma) {
  auto gpu = cuda_or_skip();
  auto fma = ops_on_path(*gpu, "fma");
  for (const char* path : {"mma", "wmma"}) {
    auto tc = ops_on_path(*gpu, path);
    for_each_shape([&](const AttentionShape& s, uint64_t seed) { check_paths_agree(*tc, *fma, s, seed); });
  }
}

// Head dims the tiles do not fit exactly (padded up to 32 and to 128).
SPPO_TEST(cuda_attention_other_head_dims_match_cpu) {
  auto gpu = cuda_or_skip();
  for (auto [D, T] : {std::pair<int64_t, int64_t>{8, 65}, {80, 130}}) {
    check_forward(*gpu, make_shape(2, T, 4, 2, D, offset_layout(4, 2, D)), 900 + D);
    check_backward(*gpu, make_shape(2, T, 4, 2, D, offset_layout(4, 2, D)), 950 + D);
  }
}

SPPO_TEST(cuda_attention_is_deterministic) {
  for (const char* path : {"mma", "wmma"}) {
    auto gpu = ops_on_path(*cuda_or_skip(), path);
    const AttentionShape s = make_shape(3, 300, 8, 2, 64, offset_layout(8, 2, 64));
    const BackwardInputs in = backward_inputs(s, 77);
    auto qkv_d = upload(*gpu, to_bf16(in.qkv));
    auto out_d = upload(*gpu, std::vector<bf16>(in.out.size()));
    auto lse_d = upload(*gpu, std::vector<float>(in.lse.size()));
    std::vector<bf16> out1, out2;
    std::vector<float> lse1, lse2;
    for (int r = 0; r < 2; ++r) {
      gpu->attention_forward(out_d.data(), lse_d.data(), qkv_d.data(), s);
      (r == 0 ? out1 : out2) = out_d.get();
      (r == 0 ? lse1 : lse2) = lse_d.get();
    }
    EXPECT_TRUE(same_bits(out1, out2) && same_bits(lse1, lse2),
                path << ": attention_forward differs between two calls");
    EXPECT_TRUE(same_bits(gpu_backward(*gpu, s, in), gpu_backward(*gpu, s, in)),
                path << ": attention_backward differs between two calls");
  }
}

SPPO_TEST(cuda_attention_decode_matches_cpu) {
  auto gpu = cuda_or_skip();
  // Three slots of 300 positions (the GPU splits a row's positions in chunks of 256). Slot 0 gets
  // rows at 0, 130 and 299 in one call, as a prefill would; slot 2 rows end exactly at and one
  // past a chunk; slot 1's row sits at 40 with NaN stale entries beyond it.
  const DecodeCase c{3, 300, {0, 2, 2, 1, 0, 0}, {0, 255, 256, 40, 299, 130}};
  uint64_t seed = 500;
  for (int64_t D : {32, 64, 128})
    for (auto [H, KV] : {std::pair<int64_t, int64_t>{4, 4}, {8, 2}, {8, 1}}) {
      const Layout L = (seed / 10) % 2 ? offset_layout(H, KV, D) : packed_layout(H, KV, D);
      check_decode(*gpu, H, KV, D, L, c, 40, seed += 10);
    }
}

// A sequence written to the cache and decoded row by row (all rows in one call, as a prefill
// does) gives what attention_forward gives for it; the last row decoded alone gives the same bits
// as in the full call (a row's result does not depend on the other rows).
SPPO_TEST(cuda_attention_decode_matches_forward) {
  auto gpu = cuda_or_skip();
  const int64_t Tn = 300, ctx = 320, slots = 2;
  for (auto [H, KV, D] : {std::tuple<int64_t, int64_t, int64_t>{4, 4, 64}, {8, 2, 128}, {8, 1, 32}}) {
    const Layout L = offset_layout(H, KV, D);
    const AttentionShape fwd = make_shape(1, Tn, H, KV, D, L), dec = make_shape(slots, ctx, H, KV, D, L);
    const std::string what = describe(fwd);
    const std::vector<float> qkv = random_values(Tn * L.stride, 700 + D + H);
    auto qkv_d = upload(*gpu, to_bf16(qkv));
    const std::vector<bf16> poison = to_bf16(std::vector<float>(Tn * L.out_stride, kNaN));
    auto out_f = upload(*gpu, poison);
    auto out_dec = upload(*gpu, poison);
    auto lse_d = upload(*gpu, std::vector<float>(H * Tn));
    gpu->attention_forward(out_f.data(), lse_d.data(), qkv_d.data(), fwd);

    std::vector<int32_t> slot(Tn, 1), pos(Tn);
    for (int64_t t = 0; t < Tn; ++t) pos[t] = int32_t(t);
    auto slot_d = upload(*gpu, slot);
    auto pos_d = upload(*gpu, pos);
    const Paged pg = paged_cache(slots, ctx, 16, 40 + D);
    auto tables_d = upload(*gpu, pg.tables);
    const KvBlocks kv{tables_d.data(), pg.blocks, pg.bs, pg.max_blocks};
    auto k_d = upload(*gpu, to_bf16(random_values(pg.blocks * pg.elems_per_block(KV, D), 31)));
    auto v_d = upload(*gpu, to_bf16(random_values(pg.blocks * pg.elems_per_block(KV, D), 32)));
    gpu->kv_cache_write(k_d.data(), v_d.data(), qkv_d.data(), slot_d.data(), pos_d.data(), Tn, dec, kv);
    gpu->attention_decode(out_dec.data(), qkv_d.data(), k_d.data(), v_d.data(), slot_d.data(), pos_d.data(), Tn, dec,
                          kv);
    const std::vector<bf16> f_bits = out_f.get();
    const std::vector<bf16> d_bits = out_dec.get();
    const double e = max_rel_error_floored(to_float(d_bits), to_float(f_bits),
                                           [&](size_t i) { return int64_t(i) % L.out_stride < H * D; });
    EXPECT_TRUE(e < kBf16Tol, "decode vs forward error " << e << " " << what);

    // The last row alone: its own qkv row, slot and position.
    const int64_t last = Tn - 1;
    const std::vector<float> row(qkv.begin() + last * L.stride, qkv.begin() + (last + 1) * L.stride);
    auto row_d = upload(*gpu, to_bf16(row));
    auto one_slot = upload(*gpu, std::vector<int32_t>{1});
    auto one_pos = upload(*gpu, std::vector<int32_t>{int32_t(last)});
    auto out_one = upload(*gpu, std::vector<bf16>(poison.begin(), poison.begin() + L.out_stride));
    gpu->attention_decode(out_one.data(), row_d.data(), k_d.data(), v_d.data(), one_slot.data(), one_pos.data(), 1, dec,
                          kv);
    const std::vector<bf16> one = out_one.get();
    EXPECT_TRUE(std::memcmp(one.data(), d_bits.data() + last * L.out_stride, H * D * sizeof(bf16)) == 0,
                "a decode row alone differs from the same row in a larger call " << what);
  }
}
