// The DeBERTa-v3 encoder and PairRM's head (sppo/encoder.h), written once against the op
// interface: one arena for the backbone's parameters laid out so that a layer's query, key and
// value projections form one fused (3C, C) matrix (and their biases one 3C vector), activations
// planned for max_batch × max_seq at construction, nothing allocated per call.
#include "sppo/encoder.h"

#include <algorithm>
#include <cmath>
#include <map>

#include "core/error.h"

namespace sppo {

void validate(const EncoderConfig& c) {
  SPPO_REQUIRE(c.vocab_size >= 1, "vocab_size must be >= 1, got ", c.vocab_size);
  SPPO_REQUIRE(c.num_layers >= 1, "num_hidden_layers must be >= 1, got ", c.num_layers);
  SPPO_REQUIRE(c.num_heads >= 1 && c.hidden_size >= 1 && c.hidden_size % c.num_heads == 0, "hidden_size (",
               c.hidden_size, ") must be a positive multiple of num_attention_heads (", c.num_heads, ")");
  SPPO_REQUIRE(c.intermediate_size >= 1, "intermediate_size must be >= 1, got ", c.intermediate_size);
  SPPO_REQUIRE(c.position_buckets >= 2 && c.position_buckets % 2 == 0,
               "position_buckets must be an even number >= 2, got ", c.position_buckets);
  SPPO_REQUIRE(c.max_relative_positions > c.position_buckets / 2 + 1, "max_relative_positions (",
               c.max_relative_positions, ") must exceed position_buckets/2 + 1 (", c.position_buckets / 2 + 1, ")");
  SPPO_REQUIRE(c.layer_norm_eps > 0, "layer_norm_eps must be > 0, got ", c.layer_norm_eps);
  SPPO_REQUIRE(c.head_hidden >= 1, "the head's hidden size must be >= 1, got ", c.head_hidden);
}

int64_t relative_bucket(int64_t r, int64_t buckets, int64_t max_position) {
  const int64_t mid = buckets / 2;
  const int64_t a = r < 0 ? -r : r;
  if (a <= mid) return r;
  const double log_pos = std::ceil(std::log(double(a) / double(mid)) /
                                   std::log(double(max_position - 1) / double(mid)) * double(mid - 1)) +
                         double(mid);
  return r < 0 ? -int64_t(log_pos) : int64_t(log_pos);
}

std::vector<int32_t> relative_index_table(int64_t seq, int64_t buckets, int64_t max_position) {
  std::vector<int32_t> t(size_t(2 * seq - 1));
  for (int64_t r = -(seq - 1); r <= seq - 1; ++r)
    t[size_t(r + seq - 1)] =
        int32_t(std::clamp<int64_t>(relative_bucket(r, buckets, max_position) + buckets, 0, 2 * buckets - 1));
  return t;
}

namespace {
const std::string kPrefix = "pretrained_model.";
bool is_head(const std::string& name) { return name.rfind("head_layer.", 0) == 0; }
}  // namespace

template <class T>
Encoder<T>::Encoder(const EncoderConfig& config, std::unique_ptr<EncoderOps<T>> ops, int64_t max_batch, int64_t max_seq)
    : config_(config), ops_(std::move(ops)), max_batch_(max_batch), max_seq_(max_seq) {
  validate(config_);
  SPPO_REQUIRE(max_batch >= 1 && max_seq >= 1, "the encoder's plan needs max_batch and max_seq >= 1, got ", max_batch,
               " and ", max_seq);
  const int64_t C = config_.hidden_size, F = config_.intermediate_size, V = config_.vocab_size, R = config_.rel_rows(),
                HH = config_.head_hidden;
  auto add = [&](const std::string& name, std::vector<int64_t> shape) { params_.push_back({name, std::move(shape)}); };
  add(kPrefix + "embeddings.word_embeddings.weight", {V, C});
  add(kPrefix + "embeddings.LayerNorm.weight", {C});
  add(kPrefix + "embeddings.LayerNorm.bias", {C});
  add(kPrefix + "encoder.rel_embeddings.weight", {R, C});
  add(kPrefix + "encoder.LayerNorm.weight", {C});
  add(kPrefix + "encoder.LayerNorm.bias", {C});
  for (int64_t l = 0; l < config_.num_layers; ++l) {
    const std::string p = kPrefix + "encoder.layer." + std::to_string(l) + ".";
    // in this order, so that q, k and v weights (and biases) are adjacent in the arena
    for (const char* m : {"query_proj", "key_proj", "value_proj"}) add(p + "attention.self." + m + ".weight", {C, C});
    for (const char* m : {"query_proj", "key_proj", "value_proj"}) add(p + "attention.self." + m + ".bias", {C});
    add(p + "attention.output.dense.weight", {C, C});
    add(p + "attention.output.dense.bias", {C});
    add(p + "attention.output.LayerNorm.weight", {C});
    add(p + "attention.output.LayerNorm.bias", {C});
    add(p + "intermediate.dense.weight", {F, C});
    add(p + "intermediate.dense.bias", {F});
    add(p + "output.dense.weight", {C, F});
    add(p + "output.dense.bias", {C});
    add(p + "output.LayerNorm.weight", {C});
    add(p + "output.LayerNorm.bias", {C});
  }
  add("head_layer.1.weight", {HH, 2 * C});
  add("head_layer.1.bias", {HH});
  add("head_layer.4.weight", {1, HH});
  add("head_layer.4.bias", {1});
  int64_t arena = 0, head = 0;
  for (const EncoderParam& p : params_) {
    int64_t n = 1;
    for (int64_t d : p.shape) n *= d;
    int64_t& at = is_head(p.name) ? head : arena;
    offsets_.push_back(at);
    at += n;
  }
  set_.assign(params_.size(), false);
  head_.assign(size_t(head), 0.0);
  const int64_t N = max_batch * max_seq;
  auto alloc = [&](int64_t n) { return static_cast<T*>(ops_->alloc_bytes(size_t(n) * sizeof(T))); };
  arena_ = alloc(arena);
  x_ = alloc(N * C);
  qkv_ = alloc(N * 3 * C);
  attn_ = alloc(N * C);
  tmp_ = alloc(N * C);
  ffn_ = alloc(N * F);
  rel_ = alloc(R * C);
  relqk_ = alloc(R * 2 * C);
  ids_ = static_cast<int32_t*>(ops_->alloc_bytes(size_t(N) * sizeof(int32_t)));
  lengths_ = static_cast<int32_t*>(ops_->alloc_bytes(size_t(max_batch) * sizeof(int32_t)));
  const std::vector<int32_t> table =
      relative_index_table(max_seq, config_.position_buckets, config_.max_relative_positions);
  rel_index_ = static_cast<int32_t*>(ops_->alloc_bytes(table.size() * sizeof(int32_t)));
  ops_->upload_bytes(rel_index_, table.data(), table.size() * sizeof(int32_t));
}

template <class T>
Encoder<T>::~Encoder() {
  for (void* p :
       {static_cast<void*>(arena_), static_cast<void*>(x_), static_cast<void*>(qkv_), static_cast<void*>(attn_),
        static_cast<void*>(tmp_), static_cast<void*>(ffn_), static_cast<void*>(rel_), static_cast<void*>(relqk_),
        static_cast<void*>(ids_), static_cast<void*>(lengths_), static_cast<void*>(rel_index_)})
    if (p) ops_->free_bytes(p);
}

template <class T>
void Encoder<T>::set_parameter(const std::string& name, const float* data, int64_t n) {
  for (size_t i = 0; i < params_.size(); ++i) {
    if (params_[i].name != name) continue;
    int64_t want = 1;
    for (int64_t d : params_[i].shape) want *= d;
    SPPO_REQUIRE(n == want, "parameter ", name, " has ", n, " values, the encoder expects ", want);
    if (is_head(name)) {
      std::copy(data, data + n, head_.begin() + offsets_[i]);
    } else {
      const std::vector<master_t<T>> master(data, data + n);
      ops_->upload(arena_ + offsets_[i], master.data(), n);
    }
    set_[i] = true;
    return;
  }
  throw Error("the encoder has no parameter named " + name);
}

template <class T>
bool Encoder<T>::complete() const {
  return std::all_of(set_.begin(), set_.end(), [](bool b) { return b; });
}

template <class T>
const T* Encoder<T>::param(const std::string& name) const {
  for (size_t i = 0; i < params_.size(); ++i)
    if (params_[i].name == name) return arena_ + offsets_[i];
  throw Error("internal: no encoder parameter " + name);
}

template <class T>
void Encoder<T>::forward(const int32_t* ids, const int32_t* lengths, int64_t batch, int64_t seq, master_t<T>* hidden) {
  for (size_t i = 0; i < params_.size(); ++i)
    SPPO_REQUIRE(set_[i], "the encoder's parameter ", params_[i].name, " was never set");
  SPPO_REQUIRE(batch >= 1 && batch <= max_batch_ && seq >= 1 && seq <= max_seq_, "a batch of ", batch, " x ", seq,
               " tokens does not fit the encoder's plan of ", max_batch_, " x ", max_seq_);
  const EncoderConfig& c = config_;
  const int64_t C = c.hidden_size, F = c.intermediate_size, R = c.rel_rows(), N = batch * seq, D = c.head_dim();
  for (int64_t i = 0; i < N; ++i)
    SPPO_REQUIRE(ids[i] >= 0 && ids[i] < c.vocab_size, "token id ", ids[i], " at row ", i / seq, ", position ", i % seq,
                 " is outside the vocabulary [0, ", c.vocab_size, ")");
  for (int64_t b = 0; b < batch; ++b)
    SPPO_REQUIRE(lengths[b] >= 1 && lengths[b] <= seq, "row ", b, " has length ", lengths[b], ", outside [1, ", seq,
                 "]");
  ops_->upload_bytes(ids_, ids, size_t(N) * sizeof(int32_t));
  ops_->upload_bytes(lengths_, lengths, size_t(batch) * sizeof(int32_t));
  const double eps = c.layer_norm_eps;
  // Embeddings. transformers then multiplies by the mask; padding rows never reach a real row
  // (their keys are masked), so that product is left out.
  ops_->gather_rows(x_, param(kPrefix + "embeddings.word_embeddings.weight"), ids_, N, C);
  ops_->layernorm_forward(x_, x_, nullptr, param(kPrefix + "embeddings.LayerNorm.weight"),
                          param(kPrefix + "embeddings.LayerNorm.bias"), N, C, eps);
  // The relative embeddings, layer-normed once for every layer.
  ops_->layernorm_forward(rel_, param(kPrefix + "encoder.rel_embeddings.weight"), nullptr,
                          param(kPrefix + "encoder.LayerNorm.weight"), param(kPrefix + "encoder.LayerNorm.bias"), R, C,
                          eps);
  const AttentionShape shape{batch,
                             seq,
                             c.num_heads,
                             c.num_heads,
                             D,
                             3 * C,
                             0,
                             C,
                             2 * C,
                             C,
                             1.0 / std::sqrt(3.0 * double(D))};  // 1 + |{c2p, p2c}| = 3
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const std::string p = kPrefix + "encoder.layer." + std::to_string(l) + ".";
    const T* wqkv = param(p + "attention.self.query_proj.weight");  // (3C, C): q, k, v
    const T* bqkv = param(p + "attention.self.query_proj.bias");    // (3C)
    ops_->gemm(false, true, N, 3 * C, C, 1.0, x_, C, wqkv, C, 0.0, qkv_, 3 * C);
    ops_->add_bias(qkv_, bqkv, N, 3 * C, 3 * C);
    // share_att_key: the relative embeddings go through this layer's query and key projections
    ops_->gemm(false, true, R, 2 * C, C, 1.0, rel_, C, wqkv, C, 0.0, relqk_, 2 * C);
    ops_->add_bias(relqk_, bqkv, R, 2 * C, 2 * C);
    ops_->disentangled_attention_forward(attn_, qkv_, relqk_, rel_index_, max_seq_ - 1, R, lengths_, shape);
    ops_->gemm(false, true, N, C, C, 1.0, attn_, C, param(p + "attention.output.dense.weight"), C, 0.0, tmp_, C);
    ops_->add_bias(tmp_, param(p + "attention.output.dense.bias"), N, C, C);
    ops_->layernorm_forward(x_, tmp_, x_, param(p + "attention.output.LayerNorm.weight"),
                            param(p + "attention.output.LayerNorm.bias"), N, C, eps);
    ops_->gemm(false, true, N, F, C, 1.0, x_, C, param(p + "intermediate.dense.weight"), C, 0.0, ffn_, F);
    ops_->add_bias(ffn_, param(p + "intermediate.dense.bias"), N, F, F);
    ops_->gelu_forward(ffn_, N * F);
    ops_->gemm(false, true, N, C, F, 1.0, ffn_, F, param(p + "output.dense.weight"), F, 0.0, tmp_, C);
    ops_->add_bias(tmp_, param(p + "output.dense.bias"), N, C, C);
    ops_->layernorm_forward(x_, tmp_, x_, param(p + "output.LayerNorm.weight"), param(p + "output.LayerNorm.bias"), N,
                            C, eps);
  }
  last_batch_ = batch;
  last_seq_ = seq;
  if (hidden) ops_->download(hidden, x_, N * C);
}

template <class T>
void Encoder<T>::pairrm_logits(const int32_t* pool, int64_t batch, int64_t seq, double* logits) {
  SPPO_REQUIRE(batch == last_batch_ && seq == last_seq_, "pairrm_logits needs the forward pass of this batch (", batch,
               " x ", seq, ") first");
  const int64_t C = config_.hidden_size, HH = config_.head_hidden;
  std::vector<int32_t> rows(size_t(3 * batch));
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t k = 0; k < 3; ++k) {
      const int32_t at = pool[b * 3 + k];
      SPPO_REQUIRE(at >= 0 && at < seq, "row ", b, "'s pooling position ", k, " (", at, ") is outside [0, ", seq, ")");
      rows[size_t(b * 3 + k)] = int32_t(b * seq + at);
    }
  // The pooled rows are gathered into tmp_ (3·batch of its N rows) and brought to the host: the
  // head is 2·head_hidden·2C multiply-adds per comparison, nothing next to the encoder, and runs
  // in double there.
  SPPO_REQUIRE(3 * batch <= max_batch_ * max_seq_, "pooling needs 3 rows per comparison, more than the plan holds");
  ops_->upload_bytes(ids_, rows.data(), rows.size() * sizeof(int32_t));
  ops_->gather_rows(tmp_, x_, ids_, 3 * batch, C);
  std::vector<master_t<T>> e(size_t(3 * batch * C));
  ops_->download(e.data(), tmp_, 3 * batch * C);
  const double* W1 = head_.data();     // (HH, 2C)
  const double* b1 = W1 + HH * 2 * C;  // (HH)
  const double* W2 = b1 + HH;          // (1, HH)
  const double b2 = W2[HH];            // (1)
  for (int64_t b = 0; b < batch; ++b) {
    const master_t<T>* es = e.data() + (b * 3) * C;
    double g[2];
    for (int k = 0; k < 2; ++k) {
      const master_t<T>* ec = e.data() + (b * 3 + 1 + k) * C;
      double out = b2;
      for (int64_t h = 0; h < HH; ++h) {
        const double* w = W1 + h * 2 * C;
        double z = b1[h];
        for (int64_t j = 0; j < C; ++j) z += w[j] * double(es[j]) + w[C + j] * double(ec[j]);
        out += W2[h] * std::tanh(z);
      }
      g[k] = out;
    }
    logits[b] = g[0] - g[1];
  }
}

template class Encoder<float>;
template class Encoder<double>;
template class Encoder<bf16>;

}  // namespace sppo
