// The DeBERTa-v3 encoder (transformers' DebertaV2Model in the shape DeBERTa-v3 and PairRM use)
// and PairRM's pairwise head, inference only, written once against the op interface (EncoderOps):
//   - embeddings: LayerNorm(word_embeddings[ids]), no absolute positions or token types;
//   - each layer, post-LayerNorm (eps 1e-7, biases everywhere): x = LN(x + Wo·attn(x)),
//     x = LN(x + W2·gelu(W1·x)) with the exact-erf GELU;
//   - disentangled attention (c2p + p2c, share_att_key): the relative embeddings are
//     layer-normed once and projected by each layer's own query and key projections;
//     S[i,j] = (q_i·k_j + q_i·Kr[δ] + k_j·Qr[δ]) / sqrt(3·head_dim), δ = clamp(bucket(i−j) +
//     buckets, 0, 2·buckets − 1), non-causal, padding keys masked;
//   - PairRM's head g = Linear(1024→1) ∘ tanh ∘ Linear(2C→1024) on [e_source; e_candidate],
//     f(x, y1, y2) = g([e_s; e_1]) − g([e_s; e_2]) (positive: y1 is better).
// Parameters carry the Hugging Face names of a PairRM checkpoint (pretrained_model.* and
// head_layer.*). Tensors live in backend memory; the public methods take host memory. T is the
// storage type (ops/ops.h's EncoderOps): float on the CPU or on CUDA (PairRM's precision 'fp32'),
// bf16 on CUDA ('bf16': fp32 math, every op's output rounded to bf16), double for the tests'
// reference.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "ops/ops.h"

namespace sppo {

struct EncoderConfig {
  int64_t vocab_size = 128005;
  int64_t hidden_size = 1024;
  int64_t num_layers = 24;
  int64_t num_heads = 16;
  int64_t intermediate_size = 4096;
  int64_t position_buckets = 256;        // log buckets; 2·position_buckets relative embeddings
  int64_t max_relative_positions = 512;  // the buckets' max_position (transformers' −1 means this)
  double layer_norm_eps = 1e-7;
  int64_t head_hidden = 1024;  // PairRM's head: Linear(2·hidden → head_hidden), tanh, Linear(→ 1)
  int64_t head_dim() const { return hidden_size / num_heads; }
  int64_t rel_rows() const { return 2 * position_buckets; }
};

// Throws sppo::Error naming the first field that is not usable.
void validate(const EncoderConfig& c);

// transformers' make_log_bucket_position for one relative position r = i − j: the identity for
// |r| ≤ buckets/2, else sign(r)·(mid + ⌈(mid − 1)·ln(|r|/mid) / ln((max_position − 1)/mid)⌉),
// mid = buckets/2. Computed in double throughout, the precision of the one host table: at
// |r| = 511 the ceiling's argument is exactly 127, and mixing float32 with float64 flips it.
int64_t relative_bucket(int64_t r, int64_t buckets, int64_t max_position);
// The table rel_index[r + seq − 1] = clamp(bucket(r) + buckets, 0, 2·buckets − 1) for r in
// [−(seq − 1), seq − 1]: the row of the relative embeddings a (query, key) pair at distance r reads.
std::vector<int32_t> relative_index_table(int64_t seq, int64_t buckets, int64_t max_position);

struct EncoderParam {
  std::string name;
  std::vector<int64_t> shape;
};

template <class T>
class Encoder {
 public:
  // Plans every buffer for up to max_batch rows of max_seq tokens on `ops`.
  Encoder(const EncoderConfig& config, std::unique_ptr<EncoderOps<T>> ops, int64_t max_batch, int64_t max_seq);
  ~Encoder();
  Encoder(const Encoder&) = delete;
  Encoder& operator=(const Encoder&) = delete;

  const EncoderConfig& config() const { return config_; }
  int64_t max_batch() const { return max_batch_; }
  int64_t max_seq() const { return max_seq_; }
  // Every parameter a checkpoint must hold, by its Hugging Face name, with its shape.
  const std::vector<EncoderParam>& parameters() const { return params_; }
  // Copies one parameter in (row-major float32, as the checkpoint stores it); the name and the
  // element count must match parameters().
  void set_parameter(const std::string& name, const float* data, int64_t n);
  // Whether every parameter has been set (forward refuses to run before).
  bool complete() const;

  // Final hidden states of `batch` rows of `seq` tokens (ids row-major, each row's first
  // lengths[b] tokens real, the rest padding): hidden(batch, seq, hidden) on the host if given
  // (padding rows hold whatever the model computes there).
  void forward(const int32_t* ids, const int32_t* lengths, int64_t batch, int64_t seq, master_t<T>* hidden = nullptr);
  // PairRM's f(x, y1, y2) for each row after forward: pool(batch, 3) holds the positions of
  // <|source|>, <|candidate1|> and <|candidate2|> in that row; logits(batch) gets
  // g([e_s; e_1]) − g([e_s; e_2]), computed in double.
  void pairrm_logits(const int32_t* pool, int64_t batch, int64_t seq, double* logits);

 private:
  struct Layer;
  EncoderConfig config_;
  std::unique_ptr<EncoderOps<T>> ops_;
  int64_t max_batch_, max_seq_;
  std::vector<EncoderParam> params_;
  std::vector<int64_t> offsets_;  // each parameter's element offset in the arena (head: in head_)
  std::vector<bool> set_;
  T* arena_ = nullptr;        // every backbone parameter
  std::vector<double> head_;  // head_layer.{1,4}.{weight,bias}, on the host
  // activations: x (N, C), qkv (N, 3C), attn (N, C), ffn (N, F), rel (R, C), relqk (R, 2C)
  T *x_ = nullptr, *qkv_ = nullptr, *attn_ = nullptr, *tmp_ = nullptr, *ffn_ = nullptr, *rel_ = nullptr,
    *relqk_ = nullptr;
  int32_t *ids_ = nullptr, *lengths_ = nullptr, *rel_index_ = nullptr;
  int64_t last_batch_ = 0, last_seq_ = 0;
  const T* param(const std::string& name) const;
};

}  // namespace sppo
