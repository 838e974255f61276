// The CUDA encoder ops (cuda/cuda_encoder.cu) against the CPU backend's float32 ops, at both of
// PairRM's GPU precisions, on fresh random inputs (outputs poisoned with NaN first, so an
// unwritten element fails): LayerNorm with a residual, exact GELU, disentangled attention
// (padding, two lengths, log buckets and the clamp reached), and the whole encoder with PairRM's
// head against Encoder<float> on the CPU.
//   - bf16 (CudaOps: bf16 storage, fp32 math), inputs rounded to bf16 so both sides see the same
//     values: a few 1e-3 per op (one bf16 rounding of each output), 5e-2 end to end.
//   - fp32 (make_encoder_ops_fp32: fp32 storage, fp32 GEMMs without TF32), inputs not rounded:
//     1e-5 per op (float sums in another order; the CPU's LayerNorm and softmax statistics are
//     double), 1e-4 end to end through two layers.
// Errors are max |gpu − cpu| / max |cpu|.
#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu/cpu_ops.h"
#include "sppo/encoder.h"
#include "tests/cuda_test_util.h"

using namespace sppo;
using namespace sppo::testutil;

namespace {

// The two GPU precisions: the storage type S, its op set, how inputs are drawn, the tolerances.
struct Bf16 {
  using S = bf16;
  static constexpr const char* name = "bf16";
  static constexpr double op_tol = 1e-2, attention_tol = 2e-2, encoder_tol = 5e-2;
  static std::unique_ptr<EncoderOps<bf16>> ops() { return cuda_or_skip(); }
  // bf16-representable values, so the CPU reference sees exactly what the GPU stores
  static std::vector<float> randn(int64_t n, uint64_t seed, double scale = 1.0) { return randn_bf16(n, seed, scale); }
};

struct Fp32 {
  using S = float;
  static constexpr const char* name = "fp32";
  static constexpr double op_tol = 1e-5, attention_tol = 1e-5, encoder_tol = 1e-4;
  static std::unique_ptr<EncoderOps<float>> ops() {
    require_cuda();
    return cuda::make_encoder_ops_fp32(0);
  }
  // full float32 values (stream 2, so they are not the bf16 tests' inputs either)
  static std::vector<float> randn(int64_t n, uint64_t seed, double scale = 1.0) {
    std::vector<float> v(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) v[size_t(i)] = float(scale * standard_normal(seed, 2, uint64_t(i)));
    return v;
  }
};

template <class S>
std::vector<S> to_storage(const std::vector<float>& v) {
  if constexpr (std::is_same_v<S, float>)
    return v;
  else
    return to_bf16(v);
}

template <class S>
std::vector<float> from_storage(const std::vector<S>& v) {
  if constexpr (std::is_same_v<S, float>)
    return v;
  else
    return to_float(v);
}

template <class P>
void layernorm_gelu_match_cpu() {
  using S = typename P::S;
  auto ops = P::ops();
  const int64_t N = 37, C = 1024;
  const auto x = P::randn(N * C, 1), r = P::randn(N * C, 2), w = P::randn(C, 3, 0.3), b = P::randn(C, 4, 0.3);
  std::vector<float> ref(size_t(N * C), kNaN);
  cpu::CpuOps<float> cpu;
  cpu.layernorm_forward(ref.data(), x.data(), r.data(), w.data(), b.data(), N, C, 1e-7);
  auto dx = upload(*ops, to_storage<S>(x)), dr = upload(*ops, to_storage<S>(r)), dw = upload(*ops, to_storage<S>(w)),
       db = upload(*ops, to_storage<S>(b));
  auto dout = upload(*ops, to_storage<S>(std::vector<float>(size_t(N * C), kNaN)));
  ops->layernorm_forward(dout.data(), dx.data(), dr.data(), dw.data(), db.data(), N, C, 1e-7);
  const auto got = from_storage(dout.get());
  const double e = max_rel_error(got.data(), ref.data(), N * C);
  std::printf("  %s layernorm: max rel error %.3g (tolerance %.0e)\n", P::name, e, P::op_tol);
  EXPECT_TRUE(e < P::op_tol, P::name << " layernorm differs from the CPU by " << e);
  std::vector<float> g = x;
  cpu.gelu_forward(g.data(), N * C);
  ops->gelu_forward(dx.data(), N * C);
  const auto gg = from_storage(dx.get());
  const double eg = max_rel_error(gg.data(), g.data(), N * C);
  std::printf("  %s gelu: max rel error %.3g (tolerance %.0e)\n", P::name, eg, P::op_tol);
  EXPECT_TRUE(eg < P::op_tol, P::name << " gelu differs from the CPU by " << eg);
}

template <class P>
void disentangled_attention_matches_cpu() {
  using S = typename P::S;
  auto ops = P::ops();
  const int64_t B = 2, Tn = 300, H = 4, D = 64, C = H * D, buckets = 64, maxpos = 128, R = 2 * buckets;
  const std::vector<int32_t> lengths = {300, 133};
  const auto qkv = P::randn(B * Tn * 3 * C, 5), rel = P::randn(R * 2 * C, 6);
  const std::vector<int32_t> table = relative_index_table(Tn, buckets, maxpos);
  const AttentionShape s{B, Tn, H, H, D, 3 * C, 0, C, 2 * C, C, 1.0 / std::sqrt(3.0 * D)};
  std::vector<float> ref(size_t(B * Tn * C), kNaN);
  cpu::CpuOps<float> cpu;
  cpu.disentangled_attention_forward(ref.data(), qkv.data(), rel.data(), table.data(), Tn - 1, R, lengths.data(), s);
  auto dq = upload(*ops, to_storage<S>(qkv)), drel = upload(*ops, to_storage<S>(rel));
  auto dtable = upload(*ops, table), dlen = upload(*ops, lengths);
  auto dout = upload(*ops, to_storage<S>(std::vector<float>(size_t(B * Tn * C), kNaN)));
  ops->disentangled_attention_forward(dout.data(), dq.data(), drel.data(), dtable.data(), Tn - 1, R, dlen.data(), s);
  const auto got = from_storage(dout.get());
  const double e = max_rel_error(got.data(), ref.data(), B * Tn * C);
  std::printf("  %s disentangled attention: max rel error %.3g (tolerance %.0e)\n", P::name, e, P::attention_tol);
  EXPECT_TRUE(e < P::attention_tol, P::name << " disentangled attention differs from the CPU by " << e);
}

template <class P>
void whole_encoder_matches_cpu(uint64_t seed) {
  using S = typename P::S;
  auto ops = P::ops();
  EncoderConfig c;
  c.vocab_size = 300;
  c.hidden_size = 256;
  c.num_layers = 2;
  c.num_heads = 4;
  c.intermediate_size = 512;
  c.position_buckets = 32;
  c.max_relative_positions = 64;
  c.head_hidden = 64;
  const int64_t B = 2, Tn = 90;
  Encoder<S> gpu(c, std::move(ops), B, Tn);
  Encoder<float> cpu(c, std::make_unique<cpu::CpuOps<float>>(), B, Tn);
  for (const EncoderParam& p : cpu.parameters()) {
    int64_t n = 1;
    for (int64_t d : p.shape) n *= d;
    std::vector<float> v = P::randn(
        n, seed++, p.name.find("LayerNorm") != std::string::npos ? 0.1 : 1.0 / std::sqrt(double(p.shape.back())));
    if (p.name.find("LayerNorm.weight") != std::string::npos)
      for (float& x : v) x = std::is_same_v<S, float> ? 1.f + x : round_bf16(1.f + x);
    cpu.set_parameter(p.name, v.data(), n);
    gpu.set_parameter(p.name, v.data(), n);
  }
  const auto ids = random_ids(B * Tn, int32_t(c.vocab_size), seed);
  const std::vector<int32_t> lengths = {90, 51}, pool = {1, 30, 60, 1, 20, 40};
  std::vector<float> hc(size_t(B * Tn * c.hidden_size)), hg(hc.size());
  std::vector<double> lc(B), lg(B);
  cpu.forward(ids.data(), lengths.data(), B, Tn, hc.data());
  cpu.pairrm_logits(pool.data(), B, Tn, lc.data());
  gpu.forward(ids.data(), lengths.data(), B, Tn, hg.data());
  gpu.pairrm_logits(pool.data(), B, Tn, lg.data());
  double e = 0, den = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < lengths[size_t(b)] * c.hidden_size; ++i) {
      const size_t at = size_t(b * Tn * c.hidden_size + i);
      e = std::isnan(hg[at]) ? INFINITY : std::max(e, std::fabs(double(hg[at]) - hc[at]));
      den = std::max(den, std::fabs(double(hc[at])));
    }
  std::printf("  %s encoder: hidden max rel error %.3g (tolerance %.0e), logits %.6f / %.6f vs %.6f / %.6f\n", P::name,
              e / den, P::encoder_tol, lg[0], lg[1], lc[0], lc[1]);
  EXPECT_TRUE(e / den < P::encoder_tol, P::name << " hidden states differ from the CPU by " << e / den);
  for (int64_t b = 0; b < B; ++b)
    EXPECT_TRUE(std::fabs(lg[size_t(b)] - lc[size_t(b)]) < P::encoder_tol * (1 + std::fabs(lc[size_t(b)])),
                P::name << " row " << b << "'s logit " << lg[size_t(b)] << " vs " << lc[size_t(b)]);
}

}  // namespace

SPPO_TEST(cuda_encoder_layernorm_gelu_match_cpu) { layernorm_gelu_match_cpu<Bf16>(); }
SPPO_TEST(cuda_encoder_fp32_layernorm_gelu_match_cpu) { layernorm_gelu_match_cpu<Fp32>(); }
SPPO_TEST(cuda_encoder_disentangled_attention_matches_cpu) { disentangled_attention_matches_cpu<Bf16>(); }
SPPO_TEST(cuda_encoder_fp32_disentangled_attention_matches_cpu) { disentangled_attention_matches_cpu<Fp32>(); }
SPPO_TEST(cuda_encoder_whole_matches_cpu) { whole_encoder_matches_cpu<Bf16>(10); }
SPPO_TEST(cuda_encoder_fp32_whole_matches_cpu) { whole_encoder_matches_cpu<Fp32>(500); }
