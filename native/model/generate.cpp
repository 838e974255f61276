// Batched sampling with a KV cache: the decoder of model.cpp run one "extend" step at a time
// over rows (slot, position, token), and the scheduler that feeds slots; the draw itself is an
// op (Ops::sample: cpu/sampler.h on the CPU).
#include "sppo/generate.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/error.h"
#include "core/rng.h"
#include "core/threadpool.h"

namespace sppo {

namespace {
// Rows per extend step beyond the one-per-slot decode rows: prompts longer than this are
// prefilled over several steps, which bounds the step buffers whatever max_context is.
constexpr int64_t kPrefillRows = 256;
}  // namespace

void SamplingOptions::validate() const {
  SPPO_REQUIRE(std::isfinite(temperature) && temperature >= 0, "temperature must be a finite number >= 0, got ",
               temperature);
  SPPO_REQUIRE(top_k >= 0, "topK must be >= 0 (0 turns it off), got ", top_k);
  SPPO_REQUIRE(top_p > 0 && top_p <= 1, "topP must be in (0, 1], got ", top_p);
  SPPO_REQUIRE(max_new_tokens == -1 || max_new_tokens >= 1, "maxNewTokens must be at least 1, got ", max_new_tokens);
}

const char* stop_reason_name(StopReason r) {
  switch (r) {
    case StopReason::StopToken:
      return "stop";
    case StopReason::MaxTokens:
      return "maxTokens";
    case StopReason::Aborted:
      return "aborted";
    case StopReason::ContextFull:
      return "contextFull";
  }
  return "unknown";
}

template <class T>
Generator<T>::Generator(const Model<T>& model, GeneratorPlan plan, std::unique_ptr<Ops<T>> ops)
    : model_(model), cfg_(model.config()), plan_(plan), ops_(std::move(ops)) {
  SPPO_REQUIRE(plan.max_batch >= 1, "generator plan.maxBatch must be at least 1, got ", plan.max_batch);
  SPPO_REQUIRE(plan.max_context >= 2,
               "generator plan.maxContext must be at least 2 (a prompt token and a new one), got ", plan.max_context);
  SPPO_REQUIRE(plan.max_context <= cfg_.max_position_embeddings, "generator plan.maxContext (", plan.max_context,
               ") exceeds the model's max_position_embeddings (", cfg_.max_position_embeddings, ")");
  const int64_t B = plan.max_batch, P = plan.max_context;
  const int64_t C = cfg_.hidden_size, V = cfg_.vocab_size, F = cfg_.intermediate_size;
  const int64_t KV = cfg_.num_key_value_heads, D = cfg_.head_dim;
  max_rows_ = B + std::min(kPrefillRows, B * P);
  const int64_t R = max_rows_;
  try {
    for (int l = 0; l < cfg_.num_hidden_layers; ++l) {
      k_cache_.push_back(alloc<T>(B * KV * P * D));
      v_cache_.push_back(alloc<T>(B * KV * P * D));
    }
    rope_cos_ = alloc<Master>(P * (D / 2));
    rope_sin_ = alloc<Master>(P * (D / 2));
    std::vector<Master> cos(P * (D / 2)), sin(P * (D / 2));
    build_rope_tables(cfg_, P, cos.data(), sin.data());
    ops_->upload_bytes(rope_cos_, cos.data(), cos.size() * sizeof(Master));
    ops_->upload_bytes(rope_sin_, sin.data(), sin.size() * sizeof(Master));
    x_ = alloc<T>(R * C);
    xn_ = alloc<T>(R * C);
    rstd_ = alloc<Master>(R);
    qkv_ = alloc<T>(R * cfg_.qkv_dim());
    att_ = alloc<T>(R * cfg_.q_dim());
    gu_ = alloc<T>(R * 2 * F);
    ffn_ = alloc<T>(R * F);
    hsel_ = alloc<T>(B * C);
    logits_ = alloc<Master>(B * V);
    step_dev_ = alloc<int32_t>(3 * R + B);
    bytes_ += ops_->plan_scratch(P, D);
  } catch (...) {
    for (void* p : owned_) ops_->free_bytes(p);
    throw;
  }
  slots_.assign(R, 0);
  positions_.assign(R, 0);
  tokens_.assign(R, 0);
  logit_rows_.assign(B, 0);
}

template <class T>
Generator<T>::~Generator() {
  for (void* p : owned_) ops_->free_bytes(p);
}

template <class T>
template <class E>
E* Generator<T>::alloc(size_t n) {
  E* p = nullptr;
  try {
    p = static_cast<E*>(ops_->alloc_bytes(n * sizeof(E)));
  } catch (const Error& e) {
    throw Error(detail::concat("cannot allocate the generator's KV cache and step buffers (plan maxBatch ",
                               plan_.max_batch, ", maxContext ", plan_.max_context, "; ", bytes_ >> 20,
                               " MiB allocated before this): ", e.what()));
  }
  owned_.push_back(p);
  bytes_ += n * sizeof(E);
  return p;
}

template <class T>
void Generator<T>::extend(int64_t N, int64_t n_logit_rows) {
  Ops<T>& o = *ops_;
  const int64_t C = cfg_.hidden_size, F = cfg_.intermediate_size, V = cfg_.vocab_size;
  const int64_t H = cfg_.num_attention_heads, KV = cfg_.num_key_value_heads, D = cfg_.head_dim;
  const int64_t QD = cfg_.q_dim(), QKV = cfg_.qkv_dim();
  const double eps = cfg_.rms_norm_eps;
  // batch/seq describe the cache: (max_batch slots, max_context positions).
  const AttentionShape shape{plan_.max_batch,           plan_.max_context, H, KV, D, QKV, 0, QD, QD + cfg_.kv_dim(), QD,
                             1.0 / std::sqrt(double(D))};
  // The step's index arrays travel in one upload (one host-device round trip per step on a GPU):
  // [slots (N) | positions (N) | tokens (N) | logit rows (n_logit_rows)].
  step_host_.resize(size_t(3 * N + n_logit_rows));
  std::copy_n(slots_.begin(), N, step_host_.begin());
  std::copy_n(positions_.begin(), N, step_host_.begin() + N);
  std::copy_n(tokens_.begin(), N, step_host_.begin() + 2 * N);
  std::copy_n(logit_rows_.begin(), n_logit_rows, step_host_.begin() + 3 * N);
  o.upload_bytes(step_dev_, step_host_.data(), step_host_.size() * sizeof(int32_t));
  const int32_t *slots_dev = step_dev_, *positions_dev = step_dev_ + N, *tokens_dev = step_dev_ + 2 * N;
  const int32_t* logit_rows_dev = step_dev_ + 3 * N;
  // The step's device work, from the embedding to the logits.
  auto run = [&] {
    o.gather_rows(x_, model_.embedding(), tokens_dev, N, C);  // the embedding lookup
    for (int l = 0; l < cfg_.num_hidden_layers; ++l) {
      const typename Model<T>::LayerWeights w = model_.layer_weights(l);
      o.rmsnorm_forward(xn_, rstd_, x_, w.attn_norm, N, C, eps);
      o.gemm(false, true, N, QKV, C, 1, xn_, C, w.wqkv, C, 0, qkv_, QKV);
      if (w.bqkv) o.add_bias(qkv_, w.bqkv, N, QKV, QKV);
      o.rope(qkv_, N, QKV, 0, H, D, positions_dev, rope_cos_, rope_sin_, false);
      o.rope(qkv_, N, QKV, QD, KV, D, positions_dev, rope_cos_, rope_sin_, false);
      // All rows' keys first: a prefill row attends to earlier rows of its own prompt.
      o.kv_cache_write(k_cache_[l], v_cache_[l], qkv_, slots_dev, positions_dev, N, shape);
      o.attention_decode(att_, qkv_, k_cache_[l], v_cache_[l], slots_dev, positions_dev, N, shape);
      o.gemm(false, true, N, C, QD, 1, att_, QD, w.wo, QD, 1, x_, C);  // residual: x += o_proj(att)
      o.rmsnorm_forward(xn_, rstd_, x_, w.mlp_norm, N, C, eps);
      o.gemm(false, true, N, 2 * F, C, 1, xn_, C, w.wgu, C, 0, gu_, 2 * F);
      o.swiglu_forward(ffn_, gu_, N, F);
      o.gemm(false, true, N, C, F, 1, ffn_, F, w.wdown, F, 1, x_, C);
    }
    o.rmsnorm_forward(xn_, rstd_, x_, model_.final_norm_weight(), N, C, eps);
    if (n_logit_rows == 0) return;
    // Only the rows that sample need the LM head (the last prompt row, and every decode row).
    o.gather_rows(hsel_, xn_, logit_rows_dev, n_logit_rows, C);
    o.gemm_master(false, true, n_logit_rows, V, C, 1, hsel_, C, model_.lm_head_weight(), C, 0, logits_, V);
  };
  // A pure decode step (every row samples) of N rows is the same launch sequence each time, its
  // inputs all in step_dev_: on backends that record graphs it runs as one recorded graph (one
  // launch instead of ~12 per layer), recorded the second time N occurs.
  const bool pure_decode = n_logit_rows == N;
  if (pure_decode && o.graph_replay(uint64_t(N))) return;
  if (pure_decode && decode_sizes_seen_.count(N) && o.graph_capture_begin(uint64_t(N))) {
    bool recorded = false;
    try {
      run();
      recorded = o.graph_capture_end(uint64_t(N));
    } catch (...) {
      o.graph_capture_end(uint64_t(N));  // ends (and drops) the failed recording; the step runs below
    }
    if (recorded && o.graph_replay(uint64_t(N))) return;
  }
  if (pure_decode) decode_sizes_seen_.insert(N);
  run();
}

template <class T>
void Generator<T>::extend_for_test(const int32_t* slots, const int32_t* positions, const int32_t* tokens, int64_t n,
                                   Master* logits_out) {
  SPPO_REQUIRE(n >= 1 && n <= max_rows_, "extend_for_test: ", n, " rows, at most ", max_rows_);
  for (int64_t i = 0; i < n; ++i) {
    SPPO_REQUIRE(slots[i] >= 0 && slots[i] < plan_.max_batch && positions[i] >= 0 && positions[i] < plan_.max_context,
                 "extend_for_test: row ", i, " is outside the cache");
    slots_[i] = slots[i], positions_[i] = positions[i], tokens_[i] = tokens[i];
  }
  extend(n, 0);
  // Through the (max_batch, V) logits buffer, max_batch rows at a time.
  const int64_t V = cfg_.vocab_size, C = cfg_.hidden_size;
  for (int64_t r0 = 0; r0 < n; r0 += plan_.max_batch) {
    const int64_t r = std::min<int64_t>(plan_.max_batch, n - r0);
    ops_->gemm_master(false, true, r, V, C, 1, xn_ + r0 * C, C, model_.lm_head_weight(), C, 0, logits_, V);
    ops_->download_bytes(logits_out + r0 * V, logits_, size_t(r * V) * sizeof(Master));
  }
}

template <class T>
void Generator<T>::validate(const std::vector<SequenceRequest>& seqs, const SamplingOptions& o) const {
  o.validate();
  const int64_t V = cfg_.vocab_size, P = plan_.max_context;
  for (size_t i = 0; i < o.stop_tokens.size(); ++i)
    SPPO_REQUIRE(o.stop_tokens[i] >= 0 && o.stop_tokens[i] < V, "stop token ", o.stop_tokens[i], " (stopTokens[", i,
                 "]) is out of range [0, ", V, ")");
  SPPO_REQUIRE(!seqs.empty(), "no prompts to generate from");
  for (size_t s = 0; s < seqs.size(); ++s) {
    const SequenceRequest& r = seqs[s];
    SPPO_REQUIRE(r.prompt_len >= 1, "prompt of sequence ", s, " is empty (generation needs at least one token)");
    if (o.max_new_tokens > 0)
      SPPO_REQUIRE(r.prompt_len + o.max_new_tokens <= P, "sequence ", s, ": prompt of ", r.prompt_len,
                   " tokens + maxNewTokens ", o.max_new_tokens, " exceeds the generator's maxContext ", P);
    else
      SPPO_REQUIRE(r.prompt_len < P, "sequence ", s, ": prompt of ", r.prompt_len,
                   " tokens leaves no room to generate within the generator's maxContext ", P);
    for (int64_t t = 0; t < r.prompt_len; ++t)
      SPPO_REQUIRE(r.prompt[t] >= 0 && r.prompt[t] < V, "token id ", r.prompt[t], " at sequence ", s, ", position ", t,
                   " is out of range [0, ", V, ")");
  }
}

template <class T>
std::vector<SequenceResult> Generator<T>::generate(const std::vector<SequenceRequest>& seqs, const SamplingOptions& o,
                                                   const std::atomic<bool>* abort,
                                                   const std::function<void(const std::vector<TokenEvent>&)>& on_step) {
  validate(seqs, o);
  const int64_t n = int64_t(seqs.size()), B = plan_.max_batch, V = cfg_.vocab_size;
  std::vector<SequenceResult> results(n);
  // A slot holds one sequence: its tokens so far (prompt + generated) and how many of them are
  // in the cache. It takes part in a step only while it has uncached tokens.
  struct Slot {
    int64_t seq = -1;
    std::vector<int32_t> text;
    int64_t cached = 0;
  };
  std::vector<Slot> slots(B);
  int64_t next_seq = 0, unfinished = n;
  std::vector<int64_t> sampling_slot(B);  // slot of each logit row
  std::vector<int32_t> sampled(B);
  std::vector<double> sampled_lp(B), draws(B);
  std::vector<TokenEvent> events;
  auto finish = [&](Slot& s, StopReason why) {
    results[s.seq].reason = why;
    s.seq = -1;
    --unfinished;
  };
  while (unfinished > 0) {
    if (abort && abort->load()) {
      for (Slot& s : slots)
        if (s.seq >= 0) finish(s, StopReason::Aborted);
      for (; next_seq < n; ++next_seq) results[next_seq].reason = StopReason::Aborted;
      break;
    }
    for (Slot& s : slots) {
      if (s.seq >= 0 || next_seq >= n) continue;
      const SequenceRequest& r = seqs[next_seq];
      s.seq = next_seq++;
      s.text.assign(r.prompt, r.prompt + r.prompt_len);
      s.cached = 0;
    }
    // Decode rows (one uncached token) first so a long prefill never delays them; prefill rows
    // fill the rest of the step. A slot samples once all its tokens are cached.
    int64_t rows = 0, n_logits = 0;
    for (int pass = 0; pass < 2; ++pass) {
      for (int64_t si = 0; si < B; ++si) {
        Slot& s = slots[si];
        if (s.seq < 0) continue;
        const int64_t pending = int64_t(s.text.size()) - s.cached;
        if ((pass == 0) != (pending == 1)) continue;
        const int64_t take = std::min(pending, max_rows_ - rows);
        for (int64_t t = 0; t < take; ++t, ++rows) {
          slots_[rows] = int32_t(si);
          positions_[rows] = int32_t(s.cached + t);
          tokens_[rows] = s.text[s.cached + t];
        }
        s.cached += take;
        if (take == pending && take > 0) {
          logit_rows_[n_logits] = int32_t(rows - 1);
          sampling_slot[n_logits++] = si;
        }
      }
    }
    extend(rows, n_logits);
    for (int64_t i = 0; i < n_logits; ++i) {
      const Slot& s = slots[sampling_slot[i]];
      const SequenceRequest& r = seqs[s.seq];
      draws[i] = uniform01(r.seed, r.stream, results[s.seq].tokens.size());
    }
    if (n_logits > 0) ops_->sample(sampled.data(), sampled_lp.data(), logits_, n_logits, V, o, draws.data());
    events.clear();
    for (int64_t i = 0; i < n_logits; ++i) {
      Slot& s = slots[sampling_slot[i]];
      SequenceResult& res = results[s.seq];
      const int32_t tok = sampled[i];
      res.tokens.push_back(tok);
      res.logprobs.push_back(sampled_lp[i]);
      s.text.push_back(tok);
      events.push_back({s.seq, tok, sampled_lp[i]});
      if (std::find(o.stop_tokens.begin(), o.stop_tokens.end(), tok) != o.stop_tokens.end())
        finish(s, StopReason::StopToken);
      else if (int64_t(res.tokens.size()) == o.max_new_tokens)
        finish(s, StopReason::MaxTokens);
      else if (int64_t(s.text.size()) >= plan_.max_context)
        finish(s, StopReason::ContextFull);
    }
    if (on_step && !events.empty()) on_step(events);
  }
  return results;
}

template <class T>
std::unique_ptr<GeneratorApi> Model<T>::make_generator(const GeneratorPlan& plan) const {
  return std::make_unique<Generator<T>>(*this, plan, ops_->fresh());
}

template class Generator<float>;
template class Generator<double>;
template class Generator<bf16>;
template std::unique_ptr<GeneratorApi> Model<float>::make_generator(const GeneratorPlan&) const;
template std::unique_ptr<GeneratorApi> Model<double>::make_generator(const GeneratorPlan&) const;
template std::unique_ptr<GeneratorApi> Model<bf16>::make_generator(const GeneratorPlan&) const;

}  // namespace sppo
