// The CUDA encoder ops (cuda/cuda_encoder.cu) against the CPU backend on the same bf16-rounded
// random inputs (outputs poisoned with NaN first, so an unwritten element fails): LayerNorm with
// a residual, exact GELU, disentangled attention (padding, two lengths, log buckets and the
// clamp reached), and the whole encoder with PairRM's head (Encoder<bf16> on the GPU against
// Encoder<float> on the CPU). bf16 storage: tolerances of a few 1e-3 per op, 3e-2 end to end.
#include <cmath>
#include <string>
#include <vector>

#include "cpu/cpu_ops.h"
#include "sppo/encoder.h"
#include "tests/cuda_test_util.h"

using namespace sppo;
using namespace sppo::testutil;

SPPO_TEST(cuda_encoder_layernorm_gelu_match_cpu) {
  auto ops = cuda_or_skip();
  const int64_t N = 37, C = 1024;
  const auto x = randn_bf16(N * C, 1), r = randn_bf16(N * C, 2), w = randn_bf16(C, 3, 0.3), b = randn_bf16(C, 4, 0.3);
  std::vector<float> ref(size_t(N * C), kNaN);
  cpu::CpuOps<float> cpu;
  cpu.layernorm_forward(ref.data(), x.data(), r.data(), w.data(), b.data(), N, C, 1e-7);
  auto dx = upload(*ops, to_bf16(x)), dr = upload(*ops, to_bf16(r)), dw = upload(*ops, to_bf16(w)),
       db = upload(*ops, to_bf16(b));
  auto dout = upload(*ops, to_bf16(std::vector<float>(size_t(N * C), kNaN)));
  ops->layernorm_forward(dout.data(), dx.data(), dr.data(), dw.data(), db.data(), N, C, 1e-7);
  const auto got = to_float(dout.get());
  const double e = max_rel_error(got.data(), ref.data(), N * C);
  std::printf("  layernorm: max rel error %.3g\n", e);
  EXPECT_TRUE(e < 1e-2, "layernorm differs from the CPU by " << e);
  std::vector<float> g = x;
  cpu.gelu_forward(g.data(), N * C);
  ops->gelu_forward(dx.data(), N * C);
  const auto gg = to_float(dx.get());
  const double eg = max_rel_error(gg.data(), g.data(), N * C);
  std::printf("  gelu: max rel error %.3g\n", eg);
  EXPECT_TRUE(eg < 1e-2, "gelu differs from the CPU by " << eg);
}

SPPO_TEST(cuda_encoder_disentangled_attention_matches_cpu) {
  auto ops = cuda_or_skip();
  const int64_t B = 2, Tn = 300, H = 4, D = 64, C = H * D, buckets = 64, maxpos = 128, R = 2 * buckets;
  const std::vector<int32_t> lengths = {300, 133};
  const auto qkv = randn_bf16(B * Tn * 3 * C, 5), rel = randn_bf16(R * 2 * C, 6);
  const std::vector<int32_t> table = relative_index_table(Tn, buckets, maxpos);
  const AttentionShape s{B, Tn, H, H, D, 3 * C, 0, C, 2 * C, C, 1.0 / std::sqrt(3.0 * D)};
  std::vector<float> ref(size_t(B * Tn * C), kNaN);
  cpu::CpuOps<float> cpu;
  cpu.disentangled_attention_forward(ref.data(), qkv.data(), rel.data(), table.data(), Tn - 1, R, lengths.data(), s);
  auto dq = upload(*ops, to_bf16(qkv)), drel = upload(*ops, to_bf16(rel));
  auto dtable = upload(*ops, table), dlen = upload(*ops, lengths);
  auto dout = upload(*ops, to_bf16(std::vector<float>(size_t(B * Tn * C), kNaN)));
  ops->disentangled_attention_forward(dout.data(), dq.data(), drel.data(), dtable.data(), Tn - 1, R, dlen.data(), s);
  const auto got = to_float(dout.get());
  const double e = max_rel_error(got.data(), ref.data(), B * Tn * C);
  std::printf("  disentangled attention: max rel error %.3g\n", e);
  EXPECT_TRUE(e < 2e-2, "disentangled attention differs from the CPU by " << e);
}

SPPO_TEST(cuda_encoder_whole_matches_cpu) {
  auto ops = cuda_or_skip();
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
  Encoder<bf16> gpu(c, std::move(ops), B, Tn);
  Encoder<float> cpu(c, std::make_unique<cpu::CpuOps<float>>(), B, Tn);
  uint64_t seed = 10;
  for (const EncoderParam& p : cpu.parameters()) {
    int64_t n = 1;
    for (int64_t d : p.shape) n *= d;
    std::vector<float> v = randn_bf16(
        n, seed++, p.name.find("LayerNorm") != std::string::npos ? 0.1 : 1.0 / std::sqrt(double(p.shape.back())));
    if (p.name.find("LayerNorm.weight") != std::string::npos)
      for (float& x : v) x = round_bf16(1.f + x);
    cpu.set_parameter(p.name, v.data(), n);
    gpu.set_parameter(p.name, v.data(), n);
  }
  const auto ids = random_ids(B * Tn, int32_t(c.vocab_size), 9);
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
      e = std::max(e, std::fabs(double(hg[at]) - hc[at]));
      den = std::max(den, std::fabs(double(hc[at])));
    }
  std::printf("  encoder: hidden max rel error %.3g, logits %.4f / %.4f vs %.4f / %.4f\n", e / den, lg[0], lg[1], lc[0],
              lc[1]);
  EXPECT_TRUE(e / den < 5e-2, "hidden states differ from the CPU by " << e / den);
  for (int64_t b = 0; b < B; ++b)
    EXPECT_TRUE(std::fabs(lg[size_t(b)] - lc[size_t(b)]) < 5e-2 * (1 + std::fabs(lc[size_t(b)])),
                "row " << b << "'s logit " << lg[size_t(b)] << " vs " << lc[size_t(b)]);
}
