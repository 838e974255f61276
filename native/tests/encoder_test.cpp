// The DeBERTa-v3 encoder (sppo/encoder.h) against float64 references written straight from the
// formulas: the log-bucket table at its edge points, disentangled attention, and the whole
// encoder with PairRM's head on a tiny random config (float and double builds); and its errors.
#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/rng.h"
#include "cpu/cpu_ops.h"
#include "sppo/encoder.h"
#include "tests/harness.h"

using namespace sppo;

namespace {

std::vector<double> randn(int64_t n, uint64_t seed, double scale = 1.0) {
  std::vector<double> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[size_t(i)] = scale * standard_normal(seed, 0, i);
  return v;
}

void expect(bool ok, const std::string& what) {
  if (!ok) throw harness::Failure(what);
}

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// The bucket as transformers computes it, in float32 (its torch dtype), with its association:
// sign(r)·(mid + ⌈ln(|r|/mid) / ln((maxpos−1)/mid) · (mid−1)⌉) past mid, the identity within it.
int64_t bucket_float32(int64_t r, int64_t buckets, int64_t max_position) {
  const float mid = float(buckets / 2);
  const float a = std::fabs(float(r));
  if (a <= mid) return r;
  const float v = mid + std::ceil(std::log(a / mid) / std::log(float(max_position - 1) / mid) * (mid - 1));
  return r < 0 ? -int64_t(v) : int64_t(v);
}

// Naive float64 disentangled attention of one (batch, head), straight from the formula.
void attention_reference(std::vector<double>& out, const std::vector<double>& qkv, const std::vector<double>& rel,
                         int64_t B, int64_t Tn, int64_t H, int64_t D, const std::vector<int32_t>& lengths,
                         int64_t buckets, int64_t max_position) {
  const int64_t C = H * D, R = 2 * buckets;
  const double scale = 1.0 / std::sqrt(3.0 * double(D));
  out.assign(size_t(B * Tn * C), 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < lengths[size_t(b)]; ++i) {
        const int64_t len = lengths[size_t(b)];
        std::vector<double> s(static_cast<size_t>(len));
        double mx = -1e300;
        for (int64_t j = 0; j < len; ++j) {
          // the bucket itself is checked on its own (encoder_bucket_table_edge_points)
          int64_t d = relative_bucket(i - j, buckets, max_position) + buckets;
          d = std::min<int64_t>(std::max<int64_t>(d, 0), R - 1);
          double qk = 0, c2p = 0, p2c = 0;
          for (int64_t k = 0; k < D; ++k) {
            const double q = qkv[size_t((b * Tn + i) * 3 * C + h * D + k)];
            const double kk = qkv[size_t((b * Tn + j) * 3 * C + C + h * D + k)];
            qk += q * kk;
            c2p += q * rel[size_t(d * 2 * C + C + h * D + k)];  // Kr
            p2c += kk * rel[size_t(d * 2 * C + h * D + k)];     // Qr
          }
          s[size_t(j)] = scale * (qk + c2p + p2c);
          mx = std::max(mx, s[size_t(j)]);
        }
        double sum = 0;
        for (double& v : s) sum += (v = std::exp(v - mx));
        for (int64_t k = 0; k < D; ++k) {
          double o = 0;
          for (int64_t j = 0; j < len; ++j)
            o += s[size_t(j)] / sum * qkv[size_t((b * Tn + j) * 3 * C + 2 * C + h * D + k)];
          out[size_t((b * Tn + i) * C + h * D + k)] = o;
        }
      }
}

void layernorm_reference(std::vector<double>& x, int64_t rows, int64_t C, const double* w, const double* bias,
                         double eps) {
  for (int64_t i = 0; i < rows; ++i) {
    double* r = x.data() + i * C;
    double mean = 0, var = 0;
    for (int64_t j = 0; j < C; ++j) mean += r[j];
    mean /= double(C);
    for (int64_t j = 0; j < C; ++j) var += (r[j] - mean) * (r[j] - mean);
    const double rstd = 1.0 / std::sqrt(var / double(C) + eps);
    for (int64_t j = 0; j < C; ++j) r[j] = (r[j] - mean) * rstd * w[j] + bias[j];
  }
}

// y(rows, out) = x(rows, in)·Wᵀ + b
std::vector<double> linear_reference(const std::vector<double>& x, int64_t rows, int64_t in, const double* W,
                                     const double* b, int64_t outn) {
  std::vector<double> y(size_t(rows * outn));
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t o = 0; o < outn; ++o) {
      double acc = b[o];
      for (int64_t k = 0; k < in; ++k) acc += x[size_t(i * in + k)] * W[o * in + k];
      y[size_t(i * outn + o)] = acc;
    }
  return y;
}

EncoderConfig tiny_config() {
  EncoderConfig c;
  c.vocab_size = 50;
  c.hidden_size = 16;
  c.num_layers = 2;
  c.num_heads = 2;
  c.intermediate_size = 24;
  c.position_buckets = 8;  // mid 4: log buckets from |r| = 5, clamped past 15
  c.max_relative_positions = 16;
  c.head_hidden = 8;
  return c;
}

// Random parameters by name: weights ~ N(0, 0.3²), LayerNorm weights near 1.
std::map<std::string, std::vector<double>> random_parameters(const std::vector<EncoderParam>& params) {
  std::map<std::string, std::vector<double>> out;
  uint64_t seed = 100;
  for (const EncoderParam& p : params) {
    int64_t n = 1;
    for (int64_t d : p.shape) n *= d;
    std::vector<double> v = randn(n, seed++, 0.3);
    if (p.name.find("LayerNorm.weight") != std::string::npos)
      for (double& x : v) x = 1.0 + 0.5 * x;
    out[p.name] = v;
  }
  return out;
}

// The whole encoder in float64, layer by layer as sppo/encoder.h describes it: hidden(B, T, C).
std::vector<double> encoder_reference(const EncoderConfig& c, std::map<std::string, std::vector<double>>& P,
                                      const std::vector<int32_t>& ids, const std::vector<int32_t>& lengths, int64_t B,
                                      int64_t Tn) {
  const int64_t C = c.hidden_size, F = c.intermediate_size, N = B * Tn, R = c.rel_rows(), D = c.head_dim();
  const std::string pre = "pretrained_model.";
  std::vector<double> x(size_t(N * C));
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < C; ++j)
      x[size_t(i * C + j)] = P[pre + "embeddings.word_embeddings.weight"][size_t(ids[size_t(i)] * C + j)];
  layernorm_reference(x, N, C, P[pre + "embeddings.LayerNorm.weight"].data(),
                      P[pre + "embeddings.LayerNorm.bias"].data(), c.layer_norm_eps);
  std::vector<double> rel = P[pre + "encoder.rel_embeddings.weight"];
  layernorm_reference(rel, R, C, P[pre + "encoder.LayerNorm.weight"].data(), P[pre + "encoder.LayerNorm.bias"].data(),
                      c.layer_norm_eps);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const std::string p = pre + "encoder.layer." + std::to_string(l) + ".";
    auto proj = [&](const std::vector<double>& in, int64_t rows, const char* m) {
      return linear_reference(in, rows, C, P[p + "attention.self." + m + ".weight"].data(),
                              P[p + "attention.self." + m + ".bias"].data(), C);
    };
    const auto q = proj(x, N, "query_proj"), k = proj(x, N, "key_proj"), v = proj(x, N, "value_proj");
    const auto qr = proj(rel, R, "query_proj"), kr = proj(rel, R, "key_proj");
    std::vector<double> qkv(size_t(N * 3 * C)), relqk(size_t(R * 2 * C));
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = 0; j < C; ++j) {
        qkv[size_t(i * 3 * C + j)] = q[size_t(i * C + j)];
        qkv[size_t(i * 3 * C + C + j)] = k[size_t(i * C + j)];
        qkv[size_t(i * 3 * C + 2 * C + j)] = v[size_t(i * C + j)];
      }
    for (int64_t i = 0; i < R; ++i)
      for (int64_t j = 0; j < C; ++j) {
        relqk[size_t(i * 2 * C + j)] = qr[size_t(i * C + j)];
        relqk[size_t(i * 2 * C + C + j)] = kr[size_t(i * C + j)];
      }
    std::vector<double> att;
    attention_reference(att, qkv, relqk, B, Tn, c.num_heads, D, lengths, c.position_buckets, c.max_relative_positions);
    auto o = linear_reference(att, N, C, P[p + "attention.output.dense.weight"].data(),
                              P[p + "attention.output.dense.bias"].data(), C);
    for (size_t i = 0; i < o.size(); ++i) o[i] += x[i];
    layernorm_reference(o, N, C, P[p + "attention.output.LayerNorm.weight"].data(),
                        P[p + "attention.output.LayerNorm.bias"].data(), c.layer_norm_eps);
    x = o;
    auto h = linear_reference(x, N, C, P[p + "intermediate.dense.weight"].data(),
                              P[p + "intermediate.dense.bias"].data(), F);
    for (double& e : h) e = 0.5 * e * (1.0 + std::erf(e / std::sqrt(2.0)));
    auto y = linear_reference(h, N, F, P[p + "output.dense.weight"].data(), P[p + "output.dense.bias"].data(), C);
    for (size_t i = 0; i < y.size(); ++i) y[i] += x[i];
    layernorm_reference(y, N, C, P[p + "output.LayerNorm.weight"].data(), P[p + "output.LayerNorm.bias"].data(),
                        c.layer_norm_eps);
    x = y;
  }
  return x;
}

template <class T>
std::unique_ptr<Encoder<T>> encoder_with(const EncoderConfig& c, const std::map<std::string, std::vector<double>>& P,
                                         int64_t max_batch, int64_t max_seq) {
  auto enc = std::make_unique<Encoder<T>>(c, std::make_unique<cpu::CpuOps<T>>(), max_batch, max_seq);
  for (const EncoderParam& p : enc->parameters()) {
    const std::vector<double>& v = P.at(p.name);
    const std::vector<float> f(v.begin(), v.end());
    enc->set_parameter(p.name, f.data(), int64_t(f.size()));
  }
  return enc;
}

}  // namespace

SPPO_TEST(encoder_bucket_table_edge_points) {
  // PairRM's shape: 256 buckets, max_position 512. At |r| = 511 the ceiling's argument is exactly
  // 127 (ln(511/128)/ln(511/128)), so the bucket is 255, not 256.
  const std::map<int64_t, int64_t> known = {{128, 128}, {129, 129}, {200, 169}, {505, 254},
                                            {506, 255}, {511, 255}, {512, 256}, {2047, 383}};
  for (const auto& [r, want] : known) {
    expect(relative_bucket(r, 256, 512) == want, "bucket(" + std::to_string(r) +
                                                     ") = " + std::to_string(relative_bucket(r, 256, 512)) +
                                                     ", expected " + std::to_string(want));
    expect(relative_bucket(-r, 256, 512) == -want, "bucket(-" + std::to_string(r) + ") is not -bucket(r)");
  }
  // every r up to 4096 agrees with the formula in transformers' float32, which, kept in one
  // precision, lands on the same integers as the table's double
  for (int64_t r = -4096; r <= 4096; ++r)
    expect(relative_bucket(r, 256, 512) == bucket_float32(r, 256, 512),
           "bucket(" + std::to_string(r) + ") disagrees with the float32 formula");
  // the table: δ = clamp(bucket(i − j) + 256, 0, 511) at r = i − j
  const int64_t seq = 2048;
  const std::vector<int32_t> t = relative_index_table(seq, 256, 512);
  expect(int64_t(t.size()) == 2 * seq - 1, "the table covers 2·seq − 1 distances");
  const std::map<int64_t, int32_t> delta = {{0, 256},   {128, 384}, {-128, 128}, {511, 511}, {-511, 1},
                                            {512, 511}, {-512, 0},  {2047, 511}, {-2047, 0}, {200, 425},
                                            {-506, 1},  {506, 511}, {505, 510},  {129, 385}};
  for (const auto& [r, want] : delta)
    expect(t[size_t(r + seq - 1)] == want, "δ(" + std::to_string(r) + ") = " + std::to_string(t[size_t(r + seq - 1)]) +
                                               ", expected " + std::to_string(want));
}

SPPO_TEST(encoder_disentangled_attention_matches_float64_formula) {
  // two rows (one padded), 70 positions (a full query tile and a partial one), log buckets and
  // the clamp both reached (buckets 8, max_position 16)
  const int64_t B = 2, Tn = 70, H = 3, D = 8, C = H * D, buckets = 8, maxpos = 16, R = 2 * buckets;
  const std::vector<int32_t> lengths = {70, 37};
  const auto qkv_d = randn(B * Tn * 3 * C, 7), rel_d = randn(R * 2 * C, 8);
  std::vector<double> ref;
  attention_reference(ref, qkv_d, rel_d, B, Tn, H, D, lengths, buckets, maxpos);
  const std::vector<int32_t> table = relative_index_table(Tn, buckets, maxpos);
  const AttentionShape s{B, Tn, H, H, D, 3 * C, 0, C, 2 * C, C, 1.0 / std::sqrt(3.0 * D)};
  auto run = [&](auto zero, double tol, const char* what) {
    using T = decltype(zero);
    const std::vector<T> qkv(qkv_d.begin(), qkv_d.end()), rel(rel_d.begin(), rel_d.end());
    std::vector<T> out(size_t(B * Tn * C), T(NAN));
    cpu::CpuOps<T> ops;
    ops.disentangled_attention_forward(out.data(), qkv.data(), rel.data(), table.data(), Tn - 1, R, lengths.data(), s);
    double err = 0, norm = 0;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < Tn; ++i)
        for (int64_t k = 0; k < C; ++k) {
          const size_t at = size_t((b * Tn + i) * C + k);
          if (i >= lengths[size_t(b)]) {
            expect(out[at] == T(0), std::string(what) + ": a padding query's output is not 0");
            continue;
          }
          err += (double(out[at]) - ref[at]) * (double(out[at]) - ref[at]);
          norm += ref[at] * ref[at];
        }
    const double rel_err = std::sqrt(err / norm);
    std::printf("  %s: |out - ref| / |ref| = %.3g\n", what, rel_err);
    expect(rel_err < tol, std::string(what) + ": relative error " + std::to_string(rel_err));
  };
  run(float(0), 1e-5, "float");
  run(double(0), 1e-12, "double");
}

SPPO_TEST(encoder_whole_matches_float64_reference_with_pairrm_head) {
  const EncoderConfig c = tiny_config();
  const int64_t B = 2, Tn = 23, C = c.hidden_size;
  Encoder<double> probe(c, std::make_unique<cpu::CpuOps<double>>(), 1, 1);
  auto P = random_parameters(probe.parameters());
  std::vector<int32_t> ids(size_t(B * Tn));
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = int32_t((i * 7 + 3) % c.vocab_size);
  const std::vector<int32_t> lengths = {23, 15};
  // the head's inputs: positions of <|source|>, <|candidate1|>, <|candidate2|> in each row
  const std::vector<int32_t> pool = {1, 9, 16, 1, 6, 11};
  // parameters pass through float32 (as a checkpoint stores them): round the reference's too
  for (auto& [name, v] : P)
    for (double& x : v) x = double(float(x));
  const std::vector<double> ref = encoder_reference(c, P, ids, lengths, B, Tn);
  std::vector<double> ref_logits(B);
  {
    const int64_t HH = c.head_hidden;
    const auto& W1 = P["head_layer.1.weight"];
    const auto& b1 = P["head_layer.1.bias"];
    const auto& W2 = P["head_layer.4.weight"];
    const double b2 = P["head_layer.4.bias"][0];
    for (int64_t b = 0; b < B; ++b) {
      double g[2];
      for (int k = 0; k < 2; ++k) {
        std::vector<double> cat(size_t(2 * C));
        for (int64_t j = 0; j < C; ++j) {
          cat[size_t(j)] = ref[size_t((b * Tn + pool[size_t(b * 3)]) * C + j)];
          cat[size_t(C + j)] = ref[size_t((b * Tn + pool[size_t(b * 3 + 1 + k)]) * C + j)];
        }
        double out = b2;
        for (int64_t h = 0; h < HH; ++h) {
          double z = b1[size_t(h)];
          for (int64_t j = 0; j < 2 * C; ++j) z += W1[size_t(h * 2 * C + j)] * cat[size_t(j)];
          out += W2[size_t(h)] * std::tanh(z);
        }
        g[k] = out;
      }
      ref_logits[size_t(b)] = g[0] - g[1];
    }
  }
  auto check = [&](auto zero, double tol, const char* what) {
    using T = decltype(zero);
    auto enc = encoder_with<T>(c, P, 3, 32);  // a plan larger than the batch
    std::vector<T> hidden(size_t(B * Tn * C));
    enc->forward(ids.data(), lengths.data(), B, Tn, hidden.data());
    double err = 0, norm = 0;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < lengths[size_t(b)]; ++i)
        for (int64_t j = 0; j < C; ++j) {
          const size_t at = size_t((b * Tn + i) * C + j);
          err += (double(hidden[at]) - ref[at]) * (double(hidden[at]) - ref[at]);
          norm += ref[at] * ref[at];
        }
    std::vector<double> logits(B);
    enc->pairrm_logits(pool.data(), B, Tn, logits.data());
    double lerr = 0;
    for (int64_t b = 0; b < B; ++b) lerr = std::max(lerr, std::fabs(logits[size_t(b)] - ref_logits[size_t(b)]));
    std::printf("  %s: hidden |h - ref| / |ref| = %.3g, logits max |f - ref| = %.3g (ref %.4f, %.4f)\n", what,
                std::sqrt(err / norm), lerr, ref_logits[0], ref_logits[1]);
    expect(std::sqrt(err / norm) < tol, std::string(what) + ": hidden states differ from the reference");
    expect(lerr < 10 * tol * (1 + std::fabs(ref_logits[0]) + std::fabs(ref_logits[1])),
           std::string(what) + ": PairRM logits differ from the reference");
    // padding does not change a row: row 1 alone, unpadded, gives the same hidden states
    std::vector<T> alone(size_t(lengths[1] * C));
    const int32_t len1 = lengths[1];
    enc->forward(ids.data() + Tn, &len1, 1, len1, alone.data());
    double d = 0;
    for (int64_t i = 0; i < len1 * C; ++i)
      d = std::max(d, std::fabs(double(alone[size_t(i)]) - double(hidden[size_t(Tn * C + i)])));
    expect(d < tol, std::string(what) + ": a padded row differs from the same row unpadded by " + std::to_string(d));
  };
  check(float(0), 2e-5, "float");
  check(double(0), 1e-11, "double");
}

SPPO_TEST(encoder_refuses_bad_input_by_name) {
  const EncoderConfig c = tiny_config();
  Encoder<float> enc(c, std::make_unique<cpu::CpuOps<float>>(), 2, 16);
  const std::vector<float> v(16, 0.f);
  std::string e =
      error_of([&] { enc.set_parameter("pretrained_model.encoder.layer.9.output.dense.bias", v.data(), 16); });
  expect(e.find("no parameter named pretrained_model.encoder.layer.9.output.dense.bias") != std::string::npos, e);
  e = error_of([&] { enc.set_parameter("pretrained_model.embeddings.LayerNorm.bias", v.data(), 15); });
  expect(
      e.find("pretrained_model.embeddings.LayerNorm.bias has 15 values, the encoder expects 16") != std::string::npos,
      e);
  const std::vector<int32_t> ids(4, 1), len = {4};
  e = error_of([&] { enc.forward(ids.data(), len.data(), 1, 4); });
  expect(e.find("was never set") != std::string::npos, e);
  auto P = random_parameters(enc.parameters());
  auto full = encoder_with<float>(c, P, 2, 16);
  const std::vector<int32_t> bad = {1, 2, 50, 3};
  e = error_of([&] { full->forward(bad.data(), len.data(), 1, 4); });
  expect(e.find("token id 50 at row 0, position 2 is outside the vocabulary [0, 50)") != std::string::npos, e);
  e = error_of([&] { full->forward(ids.data(), len.data(), 1, 17); });
  expect(e.find("does not fit the encoder's plan of 2 x 16") != std::string::npos, e);
  const std::vector<int32_t> zero = {0};
  e = error_of([&] { full->forward(ids.data(), zero.data(), 1, 4); });
  expect(e.find("row 0 has length 0, outside [1, 4]") != std::string::npos, e);
}
