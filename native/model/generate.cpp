// Batched sampling with a paged KV cache: the decoder of model.cpp run one "extend" step at a
// time over rows (slot, position, token); the scheduler that admits sequences as the pool's
// blocks allow, forks the samples of one prompt from one prefill, and feeds the slots; the draw
// itself is an op (Ops::sample: cpu/sampler.h on the CPU).
#include "sppo/generate.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <type_traits>
#include <unordered_map>

#include "core/error.h"
#include "core/rng.h"
#include "core/threadpool.h"

namespace sppo {

namespace {
// Rows per extend step beyond the one-per-slot decode rows: prompts longer than this are
// prefilled over several steps, which bounds the step buffers whatever max_context is.
constexpr int64_t kPrefillRows = 256;

int64_t blocks_for(int64_t positions) { return (positions + kKvBlockSize - 1) / kKvBlockSize; }

// Tokens a sequence may hold at most: its prompt + maxNewTokens, or the whole context. The last
// sampled token is never fed back, so one fewer positions are ever cached.
int64_t max_tokens(const SequenceRequest& r, const SamplingOptions& o, int64_t max_context) {
  return o.max_new_tokens > 0 ? r.prompt_len + o.max_new_tokens : max_context;
}
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
  SPPO_REQUIRE(plan.kv_cache_bytes >= 0, "generator plan.kvCacheBytes must be >= 0 (0: maxBatch x maxContext), got ",
               plan.kv_cache_bytes);
  const int64_t B = plan.max_batch, P = plan.max_context;
  const int64_t C = cfg_.hidden_size, V = cfg_.vocab_size, F = cfg_.intermediate_size;
  const int64_t KV = cfg_.num_key_value_heads, D = cfg_.head_dim, L = cfg_.num_hidden_layers;
  max_rows_ = B + std::min(kPrefillRows, B * P);
  max_blocks_ = blocks_for(P);
  block_bytes_ = size_t(2 * L * KV * kKvBlockSize * D) * sizeof(T);
  kv_blocks_ = plan.kv_cache_bytes > 0 ? int64_t(size_t(plan.kv_cache_bytes) / block_bytes_) : B * max_blocks_;
  SPPO_REQUIRE(kv_blocks_ >= 1, "generator plan.kvCacheBytes (", plan.kv_cache_bytes,
               ") is less than one KV-cache block of ", kKvBlockSize, " positions (", block_bytes_, " bytes)");
  SPPO_REQUIRE(kv_blocks_ < INT32_MAX, "generator plan.kvCacheBytes (", plan.kv_cache_bytes, ") makes ", kv_blocks_,
               " KV-cache blocks, more than block ids can number");
  plan_.kv_cache_bytes = kv_blocks_ * int64_t(block_bytes_);
  const int64_t R = max_rows_;
  try {
    for (int l = 0; l < L; ++l) {
      k_cache_.push_back(alloc<T>(kv_blocks_ * KV * kKvBlockSize * D));
      v_cache_.push_back(alloc<T>(kv_blocks_ * KV * kKvBlockSize * D));
    }
    tables_dev_ = alloc<int32_t>(B * max_blocks_);
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
    if (plan.pack_weights && std::is_same_v<T, Master> && ops_->packed_weight_bytes(C, C) > 0) {
      const int64_t QD = cfg_.q_dim(), QKV = cfg_.qkv_dim();
      auto packed = [&](int64_t n, int64_t k) { return alloc<char>(ops_->packed_weight_bytes(n, k)); };
      for (int l = 0; l < L; ++l) packed_.push_back({packed(QKV, C), packed(C, QD), packed(2 * F, C), packed(C, F)});
      packed_head_ = packed(V, C);
    }
    // The adapters run unmerged beside the base GEMMs (a merged copy would double the weights).
    if (model.lora().enabled()) lora_u_ = alloc<T>(R * model.lora_max_slices() * model.lora().rank);
    bytes_ += ops_->plan_scratch(P, D);
  } catch (...) {
    for (void* p : owned_) ops_->free_bytes(p);
    throw;
  }
  tables_.assign(size_t(B * max_blocks_), -1);
  refs_.assign(size_t(kv_blocks_), 0);
  for (int64_t b = kv_blocks_ - 1; b >= 0; --b) free_.push_back(int32_t(b));  // block 0 is taken first
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
                               plan_.max_batch, ", maxContext ", plan_.max_context, ", a KV cache of ", kv_blocks_,
                               " blocks = ", (kv_blocks_ * block_bytes_) >> 20, " MiB; ", bytes_ >> 20,
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
  // batch/seq describe the cache: (max_batch block tables, max_context positions).
  const AttentionShape shape{plan_.max_batch,           plan_.max_context, H, KV, D, QKV, 0, QD, QD + cfg_.kv_dim(), QD,
                             1.0 / std::sqrt(double(D))};
  const KvBlocks kv{tables_dev_, kv_blocks_, kKvBlockSize, max_blocks_};
  // The tables live at one address (a recorded decode step reads them there) and travel only
  // when a slot's blocks changed.
  if (tables_dirty_) {
    o.upload_bytes(tables_dev_, tables_.data(), tables_.size() * sizeof(int32_t));
    tables_dirty_ = false;
  }
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
  // The weights are packed at the call's first decode step (a call may have few other steps, and
  // a short one at batch 1 none that would read the copy).
  if (!packed_.empty() && !packed_now_ && n_logit_rows == N && N >= o.packed_weight_min_rows()) {
    for (int l = 0; l < cfg_.num_hidden_layers; ++l) {
      const typename Model<T>::LayerWeights w = model_.layer_weights(l);
      o.pack_weight(packed_[l].wqkv, w.wqkv, QKV, C);
      o.pack_weight(packed_[l].wo, w.wo, C, QD);
      o.pack_weight(packed_[l].wgu, w.wgu, 2 * F, C);
      o.pack_weight(packed_[l].wdown, w.wdown, C, F);
    }
    o.pack_weight(packed_head_, model_.lm_head_weight(), V, C);
    packed_now_ = true;
  }
  auto packed = [&](int l) { return packed_.empty() ? PackedLayer{} : packed_[size_t(l)]; };
  // The step's device work, from the embedding to the logits.
  auto run = [&] {
    o.gather_rows(x_, model_.embedding(), tokens_dev, N, C);  // the embedding lookup
    for (int l = 0; l < cfg_.num_hidden_layers; ++l) {
      const typename Model<T>::LayerWeights w = model_.layer_weights(l);
      const LayerLora& lo = model_.layer_lora(l);
      o.rmsnorm_forward(xn_, rstd_, x_, w.attn_norm, N, C, eps);
      project(N, QKV, C, xn_, w.wqkv, packed(l).wqkv, 0, qkv_);
      model_.lora_forward(o, lo.qkv, xn_, N, qkv_, QKV, lora_u_);
      if (w.bqkv) o.add_bias(qkv_, w.bqkv, N, QKV, QKV);
      o.rope(qkv_, N, QKV, 0, H, D, positions_dev, rope_cos_, rope_sin_, false);
      o.rope(qkv_, N, QKV, QD, KV, D, positions_dev, rope_cos_, rope_sin_, false);
      // All rows' keys first: a prefill row attends to earlier rows of its own prompt.
      o.kv_cache_write(k_cache_[l], v_cache_[l], qkv_, slots_dev, positions_dev, N, shape, kv);
      o.attention_decode(att_, qkv_, k_cache_[l], v_cache_[l], slots_dev, positions_dev, N, shape, kv);
      project(N, C, QD, att_, w.wo, packed(l).wo, 1, x_);  // residual: x += o_proj(att)
      model_.lora_forward(o, lo.o, att_, N, x_, C, lora_u_);
      o.rmsnorm_forward(xn_, rstd_, x_, w.mlp_norm, N, C, eps);
      project(N, 2 * F, C, xn_, w.wgu, packed(l).wgu, 0, gu_);
      model_.lora_forward(o, lo.gu, xn_, N, gu_, 2 * F, lora_u_);
      o.swiglu_forward(ffn_, gu_, N, F);
      project(N, C, F, ffn_, w.wdown, packed(l).wdown, 1, x_);
      model_.lora_forward(o, lo.down, ffn_, N, x_, C, lora_u_);
    }
    o.rmsnorm_forward(xn_, rstd_, x_, model_.final_norm_weight(), N, C, eps);
    if (n_logit_rows == 0) return;
    // Only the rows that sample need the LM head (the last prompt row, and every decode row).
    o.gather_rows(hsel_, xn_, logit_rows_dev, n_logit_rows, C);
    project(n_logit_rows, V, C, hsel_, model_.lm_head_weight(), packed_head_, 0, logits_);
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
template <class Out>
void Generator<T>::project(int64_t N, int64_t out, int64_t in, const T* x, const T* W, const void* packed, double beta,
                           Out* C) {
  if constexpr (std::is_same_v<Out, T>) {
    // Once packed, every step reads the copy: fewer rows (a batch's last sequences) too.
    if (packed_now_ && packed) return ops_->gemm_packed_weight(N, out, in, x, W, packed, beta, C, out);
    ops_->gemm(false, true, N, out, in, 1, x, in, W, in, beta, C, out);
  } else {
    ops_->gemm_master(false, true, N, out, in, 1, x, in, W, in, beta, C, out);
  }
}

template <class T>
void Generator<T>::extend_for_test(const int32_t* slots, const int32_t* positions, const int32_t* tokens, int64_t n,
                                   Master* logits_out) {
  SPPO_REQUIRE(n >= 1 && n <= max_rows_, "extend_for_test: ", n, " rows, at most ", max_rows_);
  const int64_t B = plan_.max_batch;
  SPPO_REQUIRE(kv_blocks_ >= B * max_blocks_, "extend_for_test needs the default pool");
  packed_now_ = false;
  for (int64_t s = 0; s < B; ++s)
    for (int64_t j = 0; j < max_blocks_; ++j) tables_[s * max_blocks_ + j] = int32_t(j * B + s);
  tables_dirty_ = true;
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
    // Alone in the pool it must fit, or it would wait for ever.
    const int64_t need = blocks_for(max_tokens(r, o, P) - 1);
    if (need > kv_blocks_)
      throw Error(detail::concat(
          "sequence ", s, ": prompt of ", r.prompt_len, " tokens + ",
          o.max_new_tokens > 0 ? detail::concat("maxNewTokens ", o.max_new_tokens)
                               : detail::concat("generation up to maxContext ", P),
          " needs ", need, " KV-cache blocks of ", kKvBlockSize, " positions, more than the whole pool holds (",
          kv_blocks_, " blocks = ", kv_blocks_ * block_bytes_, " bytes, the generator's plan.kvCacheBytes)"));
  }
}

template <class T>
int32_t Generator<T>::take_block(Slot& s) {
  // Admission reserved it, so it is there: a failure here is a scheduler bug.
  SPPO_REQUIRE(s.reserved > 0 && !free_.empty(), "internal: KV-cache block taken without a reservation");
  --s.reserved, --reserved_;
  const int32_t b = free_.back();
  free_.pop_back();
  refs_[b] = 1;
  stats_.peak_blocks = std::max(stats_.peak_blocks, kv_blocks_ - int64_t(free_.size()));
  return b;
}

template <class T>
void Generator<T>::drop_block(int32_t b) {
  if (--refs_[b] == 0) free_.push_back(b);
}

template <class T>
void Generator<T>::prepare_block(std::vector<Slot>& slots, int64_t si, int64_t pos) {
  Slot& s = slots[si];
  int32_t& entry = tables_[si * max_blocks_ + pos / kKvBlockSize];
  if (entry < 0) {
    entry = take_block(s);
    tables_dirty_ = true;
  } else if (pos >= s.shared && refs_[entry] > 1) {
    // The first own position of a forked sample in the prompt's partial last block: the block
    // becomes the sample's own copy (every layer's keys and values), and the others keep theirs.
    const int32_t copy = take_block(s);
    const int64_t elems = cfg_.num_key_value_heads * kKvBlockSize * cfg_.head_dim;
    for (int l = 0; l < cfg_.num_hidden_layers; ++l) {
      ops_->copy(k_cache_[l] + copy * elems, k_cache_[l] + entry * elems, elems);
      ops_->copy(v_cache_[l] + copy * elems, v_cache_[l] + entry * elems, elems);
    }
    drop_block(entry);
    entry = copy;
    tables_dirty_ = true;
    ++stats_.copied_blocks;
  }
}

template <class T>
void Generator<T>::release_slot(Slot& s, int64_t si) {
  for (int64_t j = 0; j < max_blocks_; ++j) {
    int32_t& entry = tables_[si * max_blocks_ + j];
    if (entry >= 0) drop_block(entry);
    entry = -1;
  }
  tables_dirty_ = true;
  reserved_ -= s.reserved;
  s.reserved = 0;
  s.seq = -1;
}

template <class T>
void Generator<T>::release_prefix(PromptGroup& g) {
  if (!g.holds_prefix) return;
  for (int32_t b : g.prefix_blocks) drop_block(b);
  g.holds_prefix = false;
}

template <class T>
std::vector<SequenceResult> Generator<T>::generate(const std::vector<SequenceRequest>& seqs, const SamplingOptions& o,
                                                   const std::atomic<bool>* abort,
                                                   const std::function<void(const std::vector<TokenEvent>&)>& on_step) {
  validate(seqs, o);
  const int64_t n = int64_t(seqs.size()), B = plan_.max_batch, V = cfg_.vocab_size, P = plan_.max_context;
  std::vector<SequenceResult> results(n);
  stats_ = {};
  packed_now_ = false;  // the weights may have changed since the last call
  std::fill(tables_.begin(), tables_.end(), -1);
  tables_dirty_ = true;

  // Prompt groups, in order of their first sequence; a group's samples start one after another,
  // so at most one group holds a prefix while samples of it wait (what keeps admission from
  // deadlocking: alone in the pool, the waiting sample fits beside the prefix, validate saw to
  // that).
  std::vector<PromptGroup> groups;
  {
    std::unordered_map<std::string, int64_t> by_prompt;
    for (int64_t i = 0; i < n; ++i) {
      int64_t g = int64_t(groups.size());
      if (plan_.share_prefixes) {
        const SequenceRequest& r = seqs[i];
        std::string key(reinterpret_cast<const char*>(r.prompt), size_t(r.prompt_len) * sizeof(int32_t));
        g = by_prompt.emplace(std::move(key), g).first->second;
      }
      if (g == int64_t(groups.size())) groups.emplace_back();
      groups[g].members.push_back(i);
    }
  }
  int64_t next_group = 0, unfinished = n, in_flight = 0;
  std::vector<Slot> slots(B);
  std::vector<int64_t> sampling_slot(B);  // slot of each logit row
  std::vector<int32_t> sampled(B);
  std::vector<double> sampled_lp(B), draws(B);
  std::vector<TokenEvent> events;
  auto avail = [&] { return int64_t(free_.size()) - reserved_; };
  auto finish = [&](int64_t si, StopReason why) {
    results[slots[si].seq].reason = why;
    release_slot(slots[si], si);
    --unfinished, --in_flight;
  };
  // Starts the next samples while a slot and their blocks are free (all blocks a sample may
  // still need are reserved now, so a sample in flight never waits for one).
  auto admit = [&] {
    for (int64_t si = 0; si < B && next_group < int64_t(groups.size()); ++si) {
      if (slots[si].seq >= 0) continue;
      PromptGroup& g = groups[next_group];
      const int64_t seq = g.members[g.started];
      const SequenceRequest& r = seqs[seq];
      const int64_t last = max_tokens(r, o, P) - 2;  // the last position it may cache
      // Sharing: the prefix (prompt_len - 1 positions) once, then each sample its own blocks
      // from the one holding position prompt_len - 1 (a copy, where the prefix's last block is
      // partial) to the one holding `last`.
      const int64_t prefix = r.prompt_len - 1;
      const int64_t own = last / kKvBlockSize - prefix / kKvBlockSize + 1;
      const bool share = g.holds_prefix ||
                         (g.members.size() - g.started >= 2 && prefix >= 1 && blocks_for(prefix) + own <= kv_blocks_);
      const int64_t need = g.holds_prefix ? own : share ? blocks_for(prefix) + own : blocks_for(last + 1);
      if (need > avail()) return;  // it waits for blocks (first come, first served)
      Slot& s = slots[si];
      s.seq = seq, s.group = next_group, s.text.assign(r.prompt, r.prompt + r.prompt_len);
      s.cached = 0, s.shared = 0, s.leader = false;
      if (share) {
        if (!g.holds_prefix) {
          for (int64_t j = 0; j < blocks_for(prefix); ++j) {
            const int32_t b = free_.back();
            free_.pop_back();
            refs_[b] = 1;  // the group's hold
            g.prefix_blocks.push_back(b);
          }
          g.holds_prefix = true, g.prefix_len = prefix;
          s.leader = true;
          ++stats_.shared_prompts;
        }
        for (size_t j = 0; j < g.prefix_blocks.size(); ++j) {
          tables_[si * max_blocks_ + int64_t(j)] = g.prefix_blocks[j];
          ++refs_[g.prefix_blocks[j]];
        }
        s.shared = prefix;
        s.cached = s.leader ? 0 : prefix;
        s.reserved = own;
      } else {
        s.reserved = blocks_for(last + 1);
      }
      reserved_ += s.reserved;
      tables_dirty_ = true;
      stats_.peak_blocks = std::max(stats_.peak_blocks, kv_blocks_ - int64_t(free_.size()));
      stats_.peak_sequences = std::max(stats_.peak_sequences, ++in_flight);
      if (++g.started == g.members.size()) {
        release_prefix(g);  // its samples hold the blocks now
        ++next_group;
      }
    }
  };
  // Whatever ends the call (the last sample, an abort, an error), every block goes back.
  auto release_all = [&] {
    for (int64_t si = 0; si < B; ++si)
      if (slots[si].seq >= 0) release_slot(slots[si], si);
    for (PromptGroup& g : groups) release_prefix(g);
  };
  try {
    while (unfinished > 0) {
      if (abort && abort->load()) {
        for (int64_t si = 0; si < B; ++si)
          if (slots[si].seq >= 0) finish(si, StopReason::Aborted);
        for (; next_group < int64_t(groups.size()); ++next_group) {
          PromptGroup& g = groups[next_group];
          for (; g.started < g.members.size(); ++g.started) results[g.members[g.started]].reason = StopReason::Aborted;
        }
        break;
      }
      admit();
      // Decode rows (one uncached token) first so a long prefill never delays them; prefill rows
      // fill the rest of the step. A slot samples once all its tokens are cached. A group's
      // samples start only once its leader has cached the whole prefix.
      int64_t rows = 0, n_logits = 0;
      for (int pass = 0; pass < 2; ++pass) {
        for (int64_t si = 0; si < B; ++si) {
          Slot& s = slots[si];
          if (s.seq < 0) continue;
          const int64_t pending = int64_t(s.text.size()) - s.cached;
          const bool waits = s.shared > 0 && !groups[s.group].prefix_ready;
          const int64_t now = !waits ? pending : s.leader ? s.shared - s.cached : 0;
          if (now == 0 || (pass == 0) != (pending == 1)) continue;
          const int64_t take = std::min(now, max_rows_ - rows);
          for (int64_t t = 0; t < take; ++t, ++rows) {
            const int64_t pos = s.cached + t;
            prepare_block(slots, si, pos);
            slots_[rows] = int32_t(si);
            positions_[rows] = int32_t(pos);
            tokens_[rows] = s.text[pos];
            ++(pos < seqs[s.seq].prompt_len ? stats_.prompt_rows : stats_.generated_rows);
          }
          s.cached += take;
          if (take == pending && take > 0) {
            logit_rows_[n_logits] = int32_t(rows - 1);
            sampling_slot[n_logits++] = si;
          }
        }
      }
      SPPO_REQUIRE(rows > 0, "internal: a generate step with nothing to do (", unfinished, " sequences unfinished)");
      for (Slot& s : slots)
        if (s.seq >= 0 && s.leader && s.cached >= s.shared) groups[s.group].prefix_ready = true;
      ++stats_.steps;
      extend(rows, n_logits);
      for (int64_t i = 0; i < n_logits; ++i) {
        const Slot& s = slots[sampling_slot[i]];
        const SequenceRequest& r = seqs[s.seq];
        draws[i] = uniform01(r.seed, r.stream, results[s.seq].tokens.size());
      }
      if (n_logits > 0) ops_->sample(sampled.data(), sampled_lp.data(), logits_, n_logits, V, o, draws.data());
      events.clear();
      for (int64_t i = 0; i < n_logits; ++i) {
        const int64_t si = sampling_slot[i];
        Slot& s = slots[si];
        SequenceResult& res = results[s.seq];
        const int32_t tok = sampled[i];
        res.tokens.push_back(tok);
        res.logprobs.push_back(sampled_lp[i]);
        s.text.push_back(tok);
        events.push_back({s.seq, tok, sampled_lp[i]});
        if (std::find(o.stop_tokens.begin(), o.stop_tokens.end(), tok) != o.stop_tokens.end())
          finish(si, StopReason::StopToken);
        else if (int64_t(res.tokens.size()) == o.max_new_tokens)
          finish(si, StopReason::MaxTokens);
        else if (int64_t(s.text.size()) >= P)
          finish(si, StopReason::ContextFull);
      }
      if (on_step && !events.empty()) on_step(events);
    }
  } catch (...) {
    release_all();
    throw;
  }
  release_all();
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
