// Batched sampling tests: GEMM rows bit-identical across M (what batch invariance rests on),
// KV-cache logits against the full forward, the sampler's distribution, reproducibility whatever
// the batch, stop conditions, abort, and bad inputs; the paged cache: prefix sharing changes no
// bit, forked samples never see each other's tokens, the pool empties after every call, and a
// sequence bigger than the pool is refused.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "core/error.h"
#include "core/rng.h"
#include "cpu/cpu_ops.h"
#include "cpu/sampler.h"
#include "cpu/gemm.h"
#include "sppo/generate.h"
#include "sppo/model.h"
#include "tests/harness.h"
#include "tests/model_configs.h"
#include "tests/sampling_reference.h"

namespace sppo::cpu {
bool gemm_force_kernel(const char* name);  // test hook defined in gemm.cpp
}

using namespace sppo;
using namespace sppo::testutil;

namespace {

// GQA (4 heads on 2 kv heads), head_dim 6, q/k/v bias, untied head, llama3 rope scaling.
ModelConfig gqa_bias_config() { return gqa_llama3_config(37, 21); }

template <class T>
std::unique_ptr<Model<T>> make_model(const ModelConfig& c, int max_seq) {
  auto m = std::make_unique<Model<T>>(c, MemoryPlan{1, max_seq}, std::make_unique<cpu::CpuOps<T>>());
  // Biases start at 0 and norms at 1: perturb everything so every weight matters.
  for (size_t k = 0; k < m->params().size(); ++k) {
    const ParamInfo& p = m->params()[k];
    for (int64_t i = 0; i < p.size; ++i) m->param_data()[p.offset + i] += T(0.1 * standard_normal(77, k, i));
  }
  return m;
}

template <class T>
std::unique_ptr<Generator<T>> make_generator(const Model<T>& m, int max_batch, int max_context, int64_t kv_blocks = 0,
                                             bool share = true) {
  // A pool of kv_blocks blocks (0: the default, max_batch x max_context).
  const int64_t block_bytes = 2 * m.config().num_hidden_layers * m.config().num_key_value_heads * kKvBlockSize *
                              m.config().head_dim * int64_t(sizeof(T));
  return std::make_unique<Generator<T>>(m, GeneratorPlan{max_batch, max_context, kv_blocks * block_bytes, share},
                                        std::make_unique<cpu::CpuOps<T>>());
}

std::vector<int32_t> random_tokens(int64_t n, int vocab, uint64_t seed) {
  std::vector<int32_t> t(n);
  for (int64_t i = 0; i < n; ++i) t[i] = int32_t(uniform01(seed, 2, i) * vocab);
  return t;
}

// Reference: logits (len, V) of one sequence from the full forward.
template <class T>
std::vector<T> full_logits(Model<T>& m, const std::vector<int32_t>& tokens) {
  std::vector<T> out(tokens.size() * m.config().vocab_size);
  m.forward(tokens.data(), 1, int64_t(tokens.size()), nullptr, out.data());
  return out;
}

}  // namespace

SPPO_TEST(gemm_row_results_do_not_depend_on_M) {
  // The same row of A, computed inside gemms of M = 1 .. 300 rows, must come out bit-identical
  // (small-M path and packed path alike), for every kernel this CPU runs, with and without a
  // K tail and several K blocks.
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> d(-1.0f, 1.0f);
  for (const char* kernel : {"avx512", "avx2", "portable"}) {
    if (!cpu::gemm_force_kernel(kernel)) continue;
    for (int64_t K : {6, 37, 64, 512, 515, 1376}) {
      for (bool tB : {true, false}) {
        const int64_t N = 77, Mmax = 300;
        std::vector<float> A(Mmax * K), B(N * K);
        for (auto& x : A) x = d(rng);
        for (auto& x : B) x = d(rng);
        for (float beta : {0.0f, 1.0f}) {
          std::vector<float> C0(Mmax * N);
          for (auto& x : C0) x = d(rng);
          std::vector<float> ref = C0;
          cpu::gemm(false, tB, Mmax, N, K, 1.0f, A.data(), K, B.data(), tB ? K : N, beta, ref.data(), N);
          for (int64_t M : {1, 2, 3, 4, 5, 16, 17, 64, 299}) {
            // Rows [Mmax - M, Mmax): the last row sits at a different place in every call.
            const int64_t r0 = Mmax - M;
            std::vector<float> C(C0.begin() + r0 * N, C0.end());
            cpu::gemm(false, tB, M, N, K, 1.0f, A.data() + r0 * K, K, B.data(), tB ? K : N, beta, C.data(), N);
            EXPECT_TRUE(std::memcmp(C.data(), ref.data() + r0 * N, C.size() * sizeof(float)) == 0,
                        "kernel " << kernel << " K=" << K << " transB=" << tB << " beta=" << beta << " M=" << M);
          }
        }
      }
    }
  }
  cpu::gemm_force_kernel("auto");
}

template <class T>
void check_cache_logits(double tol) {
  ModelConfig c = gqa_bias_config();
  auto m = make_model<T>(c, 40);
  auto gen = make_generator<T>(*m, 3, 40);
  const int64_t V = c.vocab_size;
  // Three sequences in slots 2, 0, 1; prefilled out of order and in chunks, then decoded together.
  std::vector<std::vector<int32_t>> seqs = {random_tokens(13, V, 1), random_tokens(30, V, 2), random_tokens(21, V, 3)};
  const int32_t slot_of[3] = {2, 0, 1};
  std::vector<std::vector<T>> got(3);
  for (auto& g : got) g.assign(40 * V, T(0));
  std::vector<int64_t> done(3, 0);
  auto run = [&](std::vector<std::pair<int, int64_t>> plan) {  // (sequence, rows) per part of a step
    std::vector<int32_t> slots, pos, toks;
    std::vector<std::pair<int, int64_t>> where;
    for (auto [s, n] : plan)
      for (int64_t t = 0; t < n; ++t, ++done[s]) {
        slots.push_back(slot_of[s]), pos.push_back(int32_t(done[s])), toks.push_back(seqs[s][done[s]]);
        where.push_back({s, done[s]});
      }
    std::vector<T> logits(slots.size() * V);
    gen->extend_for_test(slots.data(), pos.data(), toks.data(), int64_t(slots.size()), logits.data());
    for (size_t i = 0; i < where.size(); ++i)
      std::memcpy(got[where[i].first].data() + where[i].second * V, logits.data() + i * V, V * sizeof(T));
  };
  run({{1, 10}, {0, 4}});
  run({{1, 10}, {2, 7}, {0, 1}});
  run({{1, 5}, {2, 11}, {0, 1}});
  while (done[0] < 13 || done[1] < 30 || done[2] < 21) {
    std::vector<std::pair<int, int64_t>> step;
    for (int s = 0; s < 3; ++s)
      if (done[s] < int64_t(seqs[s].size())) step.push_back({s, 1});
    run(step);
  }
  for (int s = 0; s < 3; ++s) {
    std::vector<T> ref = full_logits(*m, seqs[s]);
    for (size_t i = 0; i < ref.size(); ++i)
      EXPECT_TRUE(std::fabs(double(ref[i]) - double(got[s][i])) <= tol,
                  "sequence " << s << " position " << i / V << " token " << i % V << ": cache " << got[s][i]
                              << " vs forward " << ref[i]);
  }
}

SPPO_TEST(kv_cache_logits_match_full_forward_float) { check_cache_logits<float>(2e-5); }
SPPO_TEST(kv_cache_logits_match_full_forward_double) { check_cache_logits<double>(1e-12); }

// Chi-square goodness of fit of the sampler's draws on a fixed logit vector against
// softmax(logits/T) restricted to the top-k / top-p set, computed independently
// (sampling_reference.h).
SPPO_TEST(sampler_matches_truncated_softmax_distribution) {
  const std::vector<float> logits = {1.2f, -0.3f, 2.5f, 0.0f, 2.5f, -1.7f, 0.9f, 1.8f, -0.5f, 0.4f, 3.1f, -2.2f};
  const int64_t V = int64_t(logits.size());
  struct Cfg {
    double t;
    int64_t k;
    double p;
  };
  for (Cfg cfg : {Cfg{1.0, 0, 1.0}, Cfg{0.7, 5, 1.0}, Cfg{1.3, 0, 0.8}, Cfg{0.5, 8, 0.9}, Cfg{2.0, 3, 0.5}}) {
    const std::vector<double> expect = truncated_distribution(logits, cfg.t, cfg.k, cfg.p);

    SamplingOptions o;
    o.temperature = cfg.t, o.top_k = cfg.k, o.top_p = cfg.p;
    const int draws = 200000;
    std::vector<int64_t> count(V, 0);
    cpu::SamplerScratch<float> work;
    for (int i = 0; i < draws; ++i) {
      double lp;
      int32_t tok = cpu::sample_token(logits.data(), V, o, uniform01(1234, 0, i), &lp, work);
      EXPECT_NEAR(lp, log_softmax_at(logits.data(), V, tok), 1e-6);  // float exp
      ++count[tok];
    }
    const ChiSquare fit = chi_square(expect, count, draws);
    EXPECT_TRUE(fit.stray < 0, "token " << fit.stray << " is outside the top-k/top-p set but was drawn "
                                        << count[fit.stray] << " times (T=" << cfg.t << " k=" << cfg.k << " p=" << cfg.p
                                        << ")");
    // p > 1e-4 via the Wilson–Hilferty normal approximation: z < 3.719.
    EXPECT_TRUE(fit.z < 3.719, "chi2 " << fit.chi2 << " on " << fit.df << " df (T=" << cfg.t << " k=" << cfg.k
                                       << " p=" << cfg.p << ")");
  }
}

SPPO_TEST(sampler_greedy_is_argmax_lowest_id_on_ties) {
  const std::vector<float> logits = {0.5f, 3.0f, -1.0f, 3.0f, 2.9f};
  SamplingOptions o;
  o.temperature = 0;
  cpu::SamplerScratch<float> work;
  for (double u : {0.01, 0.5, 0.99}) {
    double lp;
    EXPECT_TRUE(cpu::sample_token(logits.data(), 5, o, u, &lp, work) == 1);
    EXPECT_NEAR(lp, log_softmax_at(logits.data(), 5, 1), 1e-6);
  }
}

namespace {
// sampler.h's truncated rule by brute force: every id sorted by (logit desc, id asc), top-k with
// its ties, the nucleus and the draw by walking running fixed-point sums in that order. The
// weights are the sampler's own (work.weights after the call), so this checks the selection, not
// the exp; the distribution test above checks the weights.
template <class T>
int32_t truncated_by_full_sort(const std::vector<T>& x, const std::vector<T>& w, const SamplingOptions& o, double u) {
  const int64_t V = int64_t(x.size());
  std::vector<int32_t> ids(size_t(V), 0);
  for (int64_t j = 0; j < V; ++j) ids[j] = int32_t(j);
  std::sort(ids.begin(), ids.end(), [&](int32_t a, int32_t b) { return x[a] > x[b] || (x[a] == x[b] && a < b); });
  int64_t kept = V;
  if (o.top_k > 0 && o.top_k < V) {
    kept = o.top_k;
    while (kept < V && x[ids[kept]] == x[ids[o.top_k - 1]]) ++kept;
  }
  int id_bits = 1;
  while ((int64_t(1) << id_bits) < V) ++id_bits;
  auto fixed = [&](int32_t id) { return uint64_t(std::ldexp(double(w[id]), 63 - id_bits)); };
  uint64_t z = 0;
  for (int64_t i = 0; i < kept; ++i) z += fixed(ids[i]);
  if (o.top_p < 1) {  // the first prefix whose sum reaches top_p of the kept total
    const uint64_t reach = std::min(uint64_t(std::ceil(o.top_p * double(z))) - 1, z - 1);
    uint64_t cum = 0;
    int64_t m = 0;
    while (m < kept && cum <= reach) cum += fixed(ids[m++]);
    kept = m, z = cum;
  }
  const uint64_t th = std::min(uint64_t(u * double(z)), z - 1);
  uint64_t cum = 0;
  for (int64_t i = 0; i < kept; ++i)
    if ((cum += fixed(ids[i])) > th) return ids[i];
  return -1;  // the walk must cross th < z
}

template <class T>
void check_truncated_selection() {
  std::mt19937_64 rng(20261205);
  std::normal_distribution<double> normal;
  int checked = 0;
  for (int64_t V : {1, 2, 5, 97, 1000, 8192}) {
    for (int kind = 0; kind < 4; ++kind) {
      // 0: continuous, 1: near-uniform (a random-weight model), 2: few distinct values (ties),
      // 3: continuous with a tail of logits far below the max (weights that truncate to 0).
      std::vector<T> x(static_cast<size_t>(V), T(0));
      for (int64_t j = 0; j < V; ++j) {
        const double g = normal(rng);
        x[j] = T(kind == 0 ? 3 * g : kind == 1 ? 1e-3 * g : kind == 2 ? std::round(g) : (j % 3 ? 3 * g : -1e4 + g));
      }
      for (double t : {0.05, 0.7, 1.0, 8.0}) {
        for (int64_t k : {int64_t(0), int64_t(1), int64_t(3), V - 1, V}) {
          for (double p : {1e-6, 0.5, 0.9, 0.999999, 1.0}) {
            if (p >= 1 && (k == 0 || k >= V)) continue;  // untruncated: no selection
            SamplingOptions o;
            o.temperature = t, o.top_k = k, o.top_p = p;
            for (double u : {1e-12, std::uniform_real_distribution<double>(0, 1)(rng), 1 - 1e-12}) {
              cpu::SamplerScratch<T> work;
              double lp;
              const int32_t tok = cpu::sample_token(x.data(), V, o, u, &lp, work);
              const int32_t expect = truncated_by_full_sort(x, work.weights, o, u);
              EXPECT_TRUE(tok == expect, "V " << V << " kind " << kind << " T " << t << " k " << k << " p " << p
                                              << " u " << u << ": token " << tok << ", full sort " << expect);
              double mx = double(x[0]), sum = 0;
              for (T v : x) mx = std::max(mx, double(v));
              for (T v : x) sum += std::exp(double(v) - mx);
              EXPECT_NEAR(lp, double(x[tok]) - mx - std::log(sum), sizeof(T) == 4 ? 1e-5 : 1e-12);
              ++checked;
            }
          }
        }
      }
    }
  }
  EXPECT_TRUE(checked > 1000, "only " << checked << " draws checked");
}
}  // namespace

// The truncated draw selects by bucket and sorts one bucket only; it must pick exactly the token a
// full sort's walk picks, on fresh random rows with ties, near-uniform rows, zero weights, and
// extreme temperatures, top-k, top-p and u.
SPPO_TEST(sampler_truncated_selection_matches_a_full_sort) {
  check_truncated_selection<float>();
  check_truncated_selection<double>();
}

namespace {
struct Fixture {
  ModelConfig c = gqa_bias_config();
  std::unique_ptr<Model<float>> m = make_model<float>(c, 48);
  std::vector<std::vector<int32_t>> prompts = {random_tokens(5, c.vocab_size, 10), random_tokens(17, c.vocab_size, 11),
                                               random_tokens(1, c.vocab_size, 12), random_tokens(9, c.vocab_size, 13)};
  std::vector<SequenceRequest> requests(std::vector<int> which, int samples = 1) {
    std::vector<SequenceRequest> r;
    for (int p : which)
      for (int s = 0; s < samples; ++s)
        r.push_back({prompts[p].data(), int64_t(prompts[p].size()), uint64_t(100 + p), uint64_t(s)});
    return r;
  }
};

SamplingOptions sampling(int64_t max_new) {
  SamplingOptions o;
  o.max_new_tokens = max_new, o.temperature = 0.9, o.top_k = 20, o.top_p = 0.95;
  return o;
}

void expect_same(const SequenceResult& a, const SequenceResult& b, const std::string& what) {
  EXPECT_TRUE(a.tokens == b.tokens, what);
  EXPECT_TRUE(a.logprobs.size() == b.logprobs.size() &&
                  std::memcmp(a.logprobs.data(), b.logprobs.data(), a.logprobs.size() * sizeof(double)) == 0,
              what);
  EXPECT_TRUE(a.reason == b.reason, what);
}

// Every block back in the pool, none promised.
void expect_pool_empty(const GeneratorApi& g, const std::string& what) {
  const KvPoolState st = g.pool_state();
  EXPECT_TRUE(st.free == st.blocks && st.reserved == 0, what << ": " << st.blocks - st.free << " of " << st.blocks
                                                             << " blocks in use, " << st.reserved << " reserved");
}
}  // namespace

SPPO_TEST(generate_is_invariant_to_batch_composition_and_reproducible) {
  Fixture f;
  SamplingOptions o = sampling(20);
  // Prompt 1, sample 0: alone (one row per decode step); in a batch of 20 mixed-length
  // sequences (decode steps of 20 rows, past the GEMM's small-M path); split over two calls and
  // run in waves through fewer slots than sequences.
  auto gen = make_generator(*f.m, 24, 48);
  auto alone = gen->generate(f.requests({1}), o);
  auto mixed = gen->generate(f.requests({0, 1, 2, 3}, 5), o);
  auto small = make_generator(*f.m, 3, 48);
  auto part1 = small->generate(f.requests({3, 0}, 2), o);
  auto part2 = small->generate(f.requests({2, 1}, 2), o);
  expect_same(alone[0], mixed[5], "alone vs mixed batch");
  expect_same(alone[0], part2[2], "alone vs split and waved");
  expect_same(mixed[0], part1[2], "prompt 0 in two batches");
  expect_same(mixed[16], part1[1], "prompt 3 sample 1 in two batches");
  auto again = gen->generate(f.requests({0, 1, 2, 3}, 5), o);
  for (size_t i = 0; i < mixed.size(); ++i) expect_same(mixed[i], again[i], "same call twice");
  // Different samples of one prompt differ (streams), and so do different seeds.
  EXPECT_TRUE(mixed[5].tokens != mixed[6].tokens);
  auto other_seed = f.requests({1});
  other_seed[0].seed = 999;
  EXPECT_TRUE(gen->generate(other_seed, o)[0].tokens != alone[0].tokens);
}

SPPO_TEST(generate_logprobs_are_raw_policy_log_softmax_of_full_forward) {
  Fixture f;
  SamplingOptions o = sampling(12);
  o.temperature = 1.7, o.top_k = 4;  // truncation and temperature must not leak into the log-probs
  auto gen = make_generator(*f.m, 4, 48);
  auto res = gen->generate(f.requests({0, 1, 3}), o);
  const int64_t V = f.c.vocab_size;
  for (int s = 0; s < 3; ++s) {
    const auto& prompt = f.prompts[s == 2 ? 3 : s];
    std::vector<int32_t> all = prompt;
    all.insert(all.end(), res[s].tokens.begin(), res[s].tokens.end());
    std::vector<float> ref = full_logits(*f.m, all);
    for (size_t t = 0; t < res[s].tokens.size(); ++t) {
      const int64_t pos = int64_t(prompt.size() + t) - 1;
      EXPECT_NEAR(res[s].logprobs[t], log_softmax_at(ref.data() + pos * V, V, res[s].tokens[t]), 1e-4);
    }
  }
}

SPPO_TEST(generate_greedy_follows_full_forward_argmax) {
  Fixture f;
  SamplingOptions o;
  o.max_new_tokens = 10, o.temperature = 0;
  auto gen = make_generator(*f.m, 2, 48);
  auto res = gen->generate(f.requests({1}), o);
  std::vector<int32_t> all = f.prompts[1];
  for (int32_t tok : res[0].tokens) {
    std::vector<float> ref = full_logits(*f.m, all);
    const float* last = ref.data() + (all.size() - 1) * f.c.vocab_size;
    EXPECT_TRUE(tok == int32_t(std::max_element(last, last + f.c.vocab_size) - last));
    all.push_back(tok);
  }
}

SPPO_TEST(generate_stops_on_any_stop_token_max_tokens_and_full_context) {
  Fixture f;
  auto gen = make_generator(*f.m, 4, 24);
  SamplingOptions o = sampling(15);
  auto free_run = gen->generate(f.requests({0}), o);
  EXPECT_TRUE(free_run[0].tokens.size() == 15 && free_run[0].reason == StopReason::MaxTokens);
  // Stop on the 4th and 7th generated tokens (whichever comes first): the stop token is kept.
  o.stop_tokens = {free_run[0].tokens[6], free_run[0].tokens[3]};
  auto stopped = gen->generate(f.requests({0}), o);
  size_t first = 0;
  while (std::find(o.stop_tokens.begin(), o.stop_tokens.end(), free_run[0].tokens[first]) == o.stop_tokens.end())
    ++first;
  EXPECT_TRUE(stopped[0].reason == StopReason::StopToken);
  EXPECT_TRUE(stopped[0].tokens.size() == first + 1);
  EXPECT_TRUE(std::equal(stopped[0].tokens.begin(), stopped[0].tokens.end(), free_run[0].tokens.begin()));
  // No maxNewTokens: runs until prompt + new tokens fill the 24-token context.
  o.stop_tokens.clear();
  o.max_new_tokens = -1;
  auto full = gen->generate(f.requests({1, 2}), o);
  EXPECT_TRUE(full[0].reason == StopReason::ContextFull && full[0].tokens.size() == 24 - 17);
  EXPECT_TRUE(full[1].reason == StopReason::ContextFull && full[1].tokens.size() == 24 - 1);
}

SPPO_TEST(generate_abort_returns_what_was_generated) {
  Fixture f;
  auto gen = make_generator(*f.m, 2, 48);
  std::atomic<bool> abort{false};
  int steps = 0;
  auto res = gen->generate(f.requests({0, 1, 3}), sampling(20), &abort, [&](const std::vector<TokenEvent>&) {
    if (++steps == 3) abort.store(true);
  });
  auto whole = gen->generate(f.requests({0, 1, 3}), sampling(20));
  for (size_t s = 0; s < res.size(); ++s) {
    EXPECT_TRUE(res[s].reason == StopReason::Aborted, "sequence " << s);
    EXPECT_TRUE(std::equal(res[s].tokens.begin(), res[s].tokens.end(), whole[s].tokens.begin()));
  }
  EXPECT_TRUE(res[2].tokens.empty(), "the third sequence waits for a slot and never starts");
  EXPECT_TRUE(res[0].tokens.size() == 3);
}

SPPO_TEST(generate_rejects_bad_inputs_with_clear_errors) {
  Fixture f;
  auto gen = make_generator(*f.m, 2, 24);
  auto req = f.requests({0, 1});
  SamplingOptions o = sampling(5);
  o.temperature = -0.5;
  EXPECT_THROWS_WITH(gen->generate(req, o), "temperature must be a finite number >= 0, got -0.5");
  o = sampling(5), o.top_p = 0;
  EXPECT_THROWS_WITH(gen->generate(req, o), "topP must be in (0, 1], got 0");
  o = sampling(5), o.top_p = 1.5;
  EXPECT_THROWS_WITH(gen->generate(req, o), "topP must be in (0, 1]");
  o = sampling(5), o.top_k = -1;
  EXPECT_THROWS_WITH(gen->generate(req, o), "topK must be >= 0");
  o = sampling(5), o.stop_tokens = {3, 37};
  EXPECT_THROWS_WITH(gen->generate(req, o), "stop token 37 (stopTokens[1]) is out of range [0, 37)");
  o = sampling(8);
  EXPECT_THROWS_WITH(gen->generate(req, o),
                     "sequence 1: prompt of 17 tokens + maxNewTokens 8 exceeds the generator's maxContext 24");
  std::vector<int32_t> bad = {1, 2, 40};
  req[0] = {bad.data(), 3, 0, 0};
  EXPECT_THROWS_WITH(gen->generate(req, sampling(5)), "token id 40 at sequence 0, position 2 is out of range [0, 37)");
  req[0] = {bad.data(), 0, 0, 0};
  EXPECT_THROWS_WITH(gen->generate(req, sampling(5)), "prompt of sequence 0 is empty");
  EXPECT_THROWS_WITH(make_generator(*f.m, 2, 200),
                     "plan.maxContext (200) exceeds the model's max_position_embeddings (96)");
}

// ---- The paged cache ----

namespace {
// Prompts 0..3 of the fixture with 5 samples each, and prompt 1 once more as a prompt of its own
// with another seed (identical tokens: it joins prompt 1's group and still draws its own numbers).
std::vector<SequenceRequest> shared_workload(Fixture& f) {
  auto r = f.requests({0, 1, 2, 3}, 5);
  r.push_back({f.prompts[1].data(), int64_t(f.prompts[1].size()), 555, 0});
  return r;
}
}  // namespace

SPPO_TEST(generate_prefix_sharing_changes_no_token_or_logprob) {
  Fixture f;
  const SamplingOptions o = sampling(20);
  const auto req = shared_workload(f);
  auto unshared = make_generator(*f.m, 24, 48, 0, false);
  const auto ref = unshared->generate(req, o);
  const GenerateStats ref_stats = unshared->last_stats();
  // Each sequence alone through its own generator: nothing shared, nothing beside it.
  auto alone = make_generator(*f.m, 1, 48, 0, false);
  for (size_t i = 0; i < req.size(); ++i)
    expect_same(ref[i], alone->generate({req[i]}, o)[0], "sequence " + std::to_string(i) + " alone vs in a batch");
  // The prompts' lengths are 5, 17, 1 and 9; prompt 2 (one token) has no prefix to share.
  EXPECT_TRUE(ref_stats.prompt_rows == 5 * (5 + 17 + 1 + 9) + 17 && ref_stats.shared_prompts == 0);
  // Sharing, with the default pool and with pools so tight that sequences wait for blocks (a
  // sample of prompt 1 needs 3 blocks of 16 positions alone, its group's prefix 1 more).
  for (int64_t blocks : {int64_t(0), int64_t(12), int64_t(4), int64_t(3)}) {
    for (bool share : {true, false}) {
      auto gen = make_generator(*f.m, 24, 48, blocks, share);
      const auto got = gen->generate(req, o);
      const std::string what = "pool " + std::to_string(blocks) + (share ? " shared" : " unshared");
      for (size_t i = 0; i < req.size(); ++i) expect_same(ref[i], got[i], what + ", sequence " + std::to_string(i));
      const GenerateStats st = gen->last_stats();
      if (blocks > 0) EXPECT_TRUE(st.peak_blocks <= blocks, what << ": peak " << st.peak_blocks);
      if (blocks > 0 && blocks <= 4)
        EXPECT_TRUE(st.peak_sequences <= 2, what << ": " << st.peak_sequences << " in flight");
      if (blocks == 0 && share) {
        // One prefill of prompt_len - 1 rows per shared prompt (0, 1, 3), each of their samples'
        // last prompt row (prompt 1 has 6 samples), and prompt 2's single token per sample.
        EXPECT_TRUE(st.shared_prompts == 3, what << ": " << st.shared_prompts << " shared prompts");
        EXPECT_TRUE(st.prompt_rows == (4 + 16 + 8) + (5 + 6 + 5) + 5, what << ": " << st.prompt_rows << " prompt rows");
        EXPECT_TRUE(st.peak_blocks < ref_stats.peak_blocks,
                    what << ": peak " << st.peak_blocks << " blocks vs " << ref_stats.peak_blocks << " unshared");
      }
      if (!share) EXPECT_TRUE(st.prompt_rows == ref_stats.prompt_rows && st.shared_prompts == 0, what);
      expect_pool_empty(*gen, what);
    }
  }
}

// The packed copy of the weights (GeneratorPlan::pack_weights) changes no token or log-prob, is
// counted in the generator's memory, and is packed again by the call after a weight change.
SPPO_TEST(generate_packed_weights_change_nothing_and_follow_weight_changes) {
  Fixture f;
  const SamplingOptions o = sampling(20);
  const auto req = f.requests({0, 1, 2, 3}, 5);  // decode steps of up to 20 rows
  auto generator = [&](bool pack) {
    GeneratorPlan plan{24, 48};
    plan.pack_weights = pack;
    return std::make_unique<Generator<float>>(*f.m, plan, std::make_unique<cpu::CpuOps<float>>());
  };
  auto packed = generator(true), plain = generator(false);
  const ModelConfig& c = f.c;
  const int64_t C = c.hidden_size, F = c.intermediate_size;
  cpu::CpuOps<float> ops;
  size_t copy = ops.packed_weight_bytes(c.vocab_size, C);
  for (int l = 0; l < c.num_hidden_layers; ++l)
    copy += ops.packed_weight_bytes(c.qkv_dim(), C) + ops.packed_weight_bytes(C, c.q_dim()) +
            ops.packed_weight_bytes(2 * F, C) + ops.packed_weight_bytes(C, F);
  EXPECT_TRUE(
      copy > 0 && packed->memory_bytes() == plain->memory_bytes() + copy,
      "packed generator " << packed->memory_bytes() << " bytes, plain " << plain->memory_bytes() << ", copy " << copy);
  const auto before = plain->generate(req, o);
  const auto got = packed->generate(req, o);
  for (size_t i = 0; i < req.size(); ++i) expect_same(before[i], got[i], "sequence " + std::to_string(i));
  // A changed projection: both generators follow it (a stale copy would give the old tokens).
  const std::string name = "model.layers.0.mlp.down_proj.weight";
  std::vector<float> w(size_t(f.m->param(name).size));
  f.m->get_param(name, w.data());
  for (float& x : w) x *= -3.0f;
  f.m->set_param(name, w.data(), int64_t(w.size()));
  const auto after = plain->generate(req, o);
  const auto got_after = packed->generate(req, o);
  bool changed = false;
  for (size_t i = 0; i < req.size(); ++i) {
    expect_same(after[i], got_after[i], "after the change, sequence " + std::to_string(i));
    changed = changed || after[i].tokens != before[i].tokens;
  }
  EXPECT_TRUE(changed, "the weight change changed no token");
}

// Samples of one prompt that differ from their first token on: each writes its first token's keys
// and values into a copy of the prompt's partial last block, so none may see another's. Each
// must match the same sample generated alone.
SPPO_TEST(generate_forked_samples_never_see_each_other) {
  Fixture f;
  SamplingOptions o = sampling(12);
  o.temperature = 3.0, o.top_k = 0, o.top_p = 1.0;  // first tokens all over the vocabulary
  for (int64_t len : {21, 17, 33}) {
    const std::vector<int32_t> prompt = random_tokens(len, f.c.vocab_size, 40 + len);
    std::vector<SequenceRequest> req;
    for (int k = 0; k < 6; ++k) req.push_back({prompt.data(), len, 7, uint64_t(k)});
    auto gen = make_generator(*f.m, 8, 48);
    const auto got = gen->generate(req, o);
    std::vector<int32_t> firsts;
    for (const auto& r : got) firsts.push_back(r.tokens[0]);
    std::sort(firsts.begin(), firsts.end());
    EXPECT_TRUE(std::unique(firsts.begin(), firsts.end()) - firsts.begin() >= 4,
                "prompt of " << len << ": the samples should diverge at their first token");
    // Prefix len - 1 positions: partial last block for 21 and 33 (all samples copy it but the
    // last one, which owns it by then), block-aligned for 17 (each starts a fresh block).
    const int64_t copies = (len - 1) % kKvBlockSize ? 5 : 0;
    EXPECT_TRUE(gen->last_stats().copied_blocks == copies,
                "prompt of " << len << ": " << gen->last_stats().copied_blocks << " copies, expected " << copies);
    auto alone = make_generator(*f.m, 1, 48);
    for (size_t k = 0; k < req.size(); ++k)
      expect_same(got[k], alone->generate({req[k]}, o)[0],
                  "prompt of " + std::to_string(len) + ", sample " + std::to_string(k) + ": forked vs alone");
    expect_pool_empty(*gen, "forked samples");
  }
}

SPPO_TEST(generate_pool_is_empty_after_finished_aborted_and_failed_calls) {
  Fixture f;
  const auto req = shared_workload(f);
  for (int64_t blocks : {int64_t(0), int64_t(5)}) {
    auto gen = make_generator(*f.m, 6, 48, blocks);
    const std::string pool = "pool " + std::to_string(blocks) + ": ";
    gen->generate(req, sampling(20));
    expect_pool_empty(*gen, pool + "after a finished call");
    // Aborted at several points: mid-prefill of a shared prompt (samples waiting for it, the group
    // holding its prefix), and mid-decode.
    for (int at : {1, 2, 6}) {
      std::atomic<bool> abort{false};
      int steps = 0;
      const auto res = gen->generate(req, sampling(20), &abort, [&](const std::vector<TokenEvent>&) {
        if (++steps == at) abort.store(true);
      });
      EXPECT_TRUE(res.back().reason == StopReason::Aborted);
      expect_pool_empty(*gen, pool + "after an abort at step " + std::to_string(at));
    }
    // A callback that throws mid-call: the error leaves generate, the blocks come back.
    int steps = 0;
    EXPECT_THROWS_WITH(gen->generate(req, sampling(20), nullptr,
                                     [&](const std::vector<TokenEvent>&) {
                                       if (++steps == 3) throw Error("the caller's callback failed");
                                     }),
                       "the caller's callback failed");
    expect_pool_empty(*gen, pool + "after a callback threw");
    // A bad token id in the middle of the batch is refused before anything runs.
    std::vector<int32_t> bad = f.prompts[3];
    bad[4] = int32_t(f.c.vocab_size);
    auto with_bad = req;
    with_bad[11] = {bad.data(), int64_t(bad.size()), 1, 0};
    EXPECT_THROWS_WITH(gen->generate(with_bad, sampling(20)), "token id 37 at sequence 11, position 4");
    expect_pool_empty(*gen, pool + "after a refused batch");
    // And the generator still works, with the same results.
    auto again = make_generator(*f.m, 6, 48, blocks);
    const auto a = gen->generate(req, sampling(20)), b = again->generate(req, sampling(20));
    for (size_t i = 0; i < req.size(); ++i) expect_same(a[i], b[i], pool + "a used generator vs a fresh one");
  }
}

SPPO_TEST(generate_refuses_a_sequence_bigger_than_the_pool) {
  Fixture f;
  // Prompt 1 (17 tokens) + 20 new tokens caches 36 positions: 3 blocks; a pool of 2 cannot hold
  // it, whatever waits. Prompt 0 (5 + 20 = 24 positions: 2 blocks) fits alone.
  auto gen = make_generator(*f.m, 4, 48, 2);
  EXPECT_THROWS_WITH(gen->generate(f.requests({0, 1}), sampling(20)),
                     "sequence 1: prompt of 17 tokens + maxNewTokens 20 needs 3 KV-cache blocks of 16 positions, more "
                     "than the whole pool holds (2 blocks = ");
  SamplingOptions o = sampling(20);
  o.max_new_tokens = -1;
  EXPECT_THROWS_WITH(gen->generate(f.requests({2}), o),
                     "sequence 0: prompt of 1 tokens + generation up to maxContext 48 needs 3 KV-cache blocks");
  const auto fits = gen->generate(f.requests({0}, 3), sampling(20));
  EXPECT_TRUE(fits[2].tokens.size() == 20);
  expect_pool_empty(*gen, "after the refusals");
  EXPECT_THROWS_WITH(Generator<float>(*f.m, GeneratorPlan{2, 48, 100}, std::make_unique<cpu::CpuOps<float>>()),
                     "generator plan.kvCacheBytes (100) is less than one KV-cache block of 16 positions");
  EXPECT_THROWS_WITH(Generator<float>(*f.m, GeneratorPlan{2, 48, -1}, std::make_unique<cpu::CpuOps<float>>()),
                     "generator plan.kvCacheBytes must be >= 0");
  // The plan states the pool it got: whole blocks.
  const Generator<float> g(*f.m, GeneratorPlan{2, 48, 5 * int64_t(gen->kv_block_bytes()) + 7},
                           std::make_unique<cpu::CpuOps<float>>());
  EXPECT_TRUE(g.kv_blocks() == 5 && g.plan().kv_cache_bytes == 5 * int64_t(g.kv_block_bytes()));
  EXPECT_TRUE(make_generator(*f.m, 3, 40)->kv_blocks() == 3 * 3);  // the default: 3 x ceil(40 / 16)
}

// The sampler's draws through the whole paged path (a shared prompt forked into many samples,
// admitted in waves): the first tokens of 20000 samples of one prompt against the truncated
// softmax of that prompt's last logits.
SPPO_TEST(generate_first_tokens_follow_the_truncated_softmax) {
  Fixture f;
  const std::vector<int32_t>& prompt = f.prompts[3];
  const int64_t V = f.c.vocab_size, len = int64_t(prompt.size());
  auto probe = make_generator(*f.m, 1, 48);
  std::vector<int32_t> slots(len, 0), pos(len);
  for (int64_t t = 0; t < len; ++t) pos[t] = int32_t(t);
  std::vector<float> logits(len * V);
  probe->extend_for_test(slots.data(), pos.data(), prompt.data(), len, logits.data());
  const std::vector<float> last(logits.end() - V, logits.end());
  SamplingOptions o;
  o.max_new_tokens = 1, o.temperature = 0.8, o.top_k = 12, o.top_p = 0.9;
  const std::vector<double> expect = truncated_distribution(last, o.temperature, o.top_k, o.top_p);
  const int draws = 20000;
  std::vector<SequenceRequest> req;
  for (int k = 0; k < draws; ++k) req.push_back({prompt.data(), len, 31, uint64_t(k)});
  auto gen = make_generator(*f.m, 64, 48);
  const auto res = gen->generate(req, o);
  EXPECT_TRUE(gen->last_stats().shared_prompts == 1 && gen->last_stats().prompt_rows == (len - 1) + draws);
  std::vector<int64_t> count(V, 0);
  for (const auto& r : res) {
    ++count[r.tokens[0]];
    EXPECT_NEAR(r.logprobs[0], log_softmax_at(last.data(), V, r.tokens[0]), 1e-6);
  }
  const ChiSquare fit = chi_square(expect, count, draws);
  EXPECT_TRUE(fit.stray < 0, "token " << fit.stray << " is outside the top-k/top-p set but was drawn");
  EXPECT_TRUE(fit.z < 3.719, "chi2 " << fit.chi2 << " on " << fit.df << " df");
  expect_pool_empty(*gen, "after 20000 samples");
}
