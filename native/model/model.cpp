// The decoder's forward and backward passes over the op interface, with every buffer planned
// at construction for plan.max_batch x plan.max_seq tokens (nothing is allocated per step).
#include "sppo/model.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "core/error.h"
#include "core/rng.h"
#include "core/threadpool.h"

namespace sppo {

namespace {
constexpr int64_t kAlign = 16;  // elements: keeps every tensor 64-byte aligned for float
int64_t aligned(int64_t n) { return (n + kAlign - 1) / kAlign * kAlign; }
}  // namespace

ModelConfig preset_config(const std::string& name) {
  ModelConfig c;
  // Same shapes as ../shared/anchors/pytorch_cpu_baseline.py, so benchmarks compare like with like.
  if (name == "tiny") {
    c.vocab_size = 512, c.hidden_size = 256, c.num_hidden_layers = 4, c.num_attention_heads = 4;
    c.num_key_value_heads = 4, c.intermediate_size = 688;
  } else if (name == "small") {
    c.vocab_size = 8192, c.hidden_size = 512, c.num_hidden_layers = 8, c.num_attention_heads = 8;
    c.num_key_value_heads = 4, c.intermediate_size = 1376;
  } else {
    throw Error("unknown model preset '" + name + "' (known: tiny, small)");
  }
  c.max_position_embeddings = 2048;
  c.resolve_and_validate();
  return c;
}

template <class T>
Model<T>::Model(ModelConfig config, MemoryPlan plan, std::unique_ptr<Ops<T>> ops, bool init, LoraConfig lora)
    : cfg_(config), plan_(plan), ops_(std::move(ops)), lora_(std::move(lora)) {
  cfg_.resolve_and_validate();
  plan_.validate(cfg_);
  lora_.validate(cfg_);
  SPPO_REQUIRE(!(plan_.bf16_gradients && lora_.enabled()),
               "bf16 gradients are for full fine-tuning: LoRA adapters keep float32 gradients (they are small)");
  build_param_table();
  build_lora_table();
  try {
    params_arena_ = alloc_tracked<T>(n_params_, &mem_.params);
    // A frozen base needs no master copy: nothing updates it (a bf16 base is what is stored).
    if constexpr (!std::is_same_v<T, Master>) master_ = alloc_tracked<Master>(num_trainable(), &mem_.master);
    if (plan_.bf16_gradients) {
      grads16_ = alloc_tracked<bf16>(num_trainable(), &mem_.grads);
      // The stage holds the largest gradient produced at once: a layer's, or the LM head's whole
      // dW (V × C, written by one head_logprobs_backward call), which the embedding reuses.
      grad_stage_elems_ = std::max(cfg_.vocab_size * cfg_.hidden_size, cfg_.hidden_size);
      for (int l = 0; l < cfg_.num_hidden_layers; ++l) {
        const auto [mats, small] = layer_spans(l);
        grad_stage_elems_ = std::max(grad_stage_elems_, mats.n + small.n);
      }
      grad_stage_ = alloc_tracked<Master>(grad_stage_elems_, &mem_.scratch);
    } else {
      grads_arena_ = alloc_tracked<Master>(num_trainable(), &mem_.grads);
    }
    plan_buffers();
    build_rope_tables();
  } catch (...) {
    for (void* p : owned_) ops_->free_bytes(p);
    throw;
  }
  if (init) initialize();
}

template <class T>
Model<T>::~Model() {
  for (void* p : owned_) ops_->free_bytes(p);
}

template <class T>
template <class E>
E* Model<T>::alloc_tracked(size_t n, size_t* counter) {
  E* p = nullptr;
  try {
    p = static_cast<E*>(ops_->alloc_bytes(n * sizeof(E)));
  } catch (const Error& e) {
    // Name what was being allocated, in the caller's terms (out of memory is the usual cause).
    const char* what = counter == &mem_.params        ? "parameters"
                       : counter == &mem_.master      ? "master weights"
                       : counter == &mem_.grads       ? "gradients"
                       : counter == &mem_.optimizer   ? "optimizer state"
                       : counter == &mem_.activations ? "activations"
                                                      : "scratch buffers";
    throw Error(detail::concat("cannot allocate the model's ", what, " (", num_params(), " parameters, plan ",
                               plan_.max_batch, " x ", plan_.max_seq, " tokens; ", mem_.total() >> 20,
                               " MiB allocated before this): ", e.what()));
  }
  owned_.push_back(p);
  *counter += n * sizeof(E);
  return p;
}

template <class T>
MemoryReport Model<T>::memory() const {
  return mem_;
}

template <class T>
void Model<T>::build_param_table() {
  const int64_t C = cfg_.hidden_size, V = cfg_.vocab_size, F = cfg_.intermediate_size;
  const int64_t QD = cfg_.q_dim(), KD = cfg_.kv_dim(), QKV = cfg_.qkv_dim();
  // Two regions: every tensor that takes weight decay first, then the norms and biases, so the
  // optimizer updates the whole arena in one launch per region instead of one per tensor.
  // Offsets of the second region are counted from its start here and moved past the first at
  // the end.
  int64_t off[2] = {0, 0};
  auto add = [&](const std::string& name, std::vector<int64_t> shape, int64_t at, bool decay) {
    int64_t size = 1;
    for (int64_t d : shape) size *= d;
    params_.push_back({name, std::move(shape), at, size, decay});
  };
  auto reserve = [&](int64_t n, bool decay) {
    int64_t& o = off[decay ? 0 : 1];
    const int64_t at = o;
    o += aligned(n);
    return at;
  };
  embed_off_ = reserve(V * C, true);
  add("model.embed_tokens.weight", {V, C}, embed_off_, true);
  for (int l = 0; l < cfg_.num_hidden_layers; ++l) {
    LayerOffsets o{};
    const std::string p = "model.layers." + std::to_string(l) + ".";
    // q, k and v (and gate and up) are stored as one fused matrix so each takes one GEMM;
    // their Hugging Face names are contiguous row ranges of it.
    o.wqkv = reserve(QKV * C, true);
    add(p + "self_attn.q_proj.weight", {QD, C}, o.wqkv, true);
    add(p + "self_attn.k_proj.weight", {KD, C}, o.wqkv + QD * C, true);
    add(p + "self_attn.v_proj.weight", {KD, C}, o.wqkv + (QD + KD) * C, true);
    if (cfg_.attention_bias) {
      o.bqkv = reserve(QKV, false);
      add(p + "self_attn.q_proj.bias", {QD}, o.bqkv, false);
      add(p + "self_attn.k_proj.bias", {KD}, o.bqkv + QD, false);
      add(p + "self_attn.v_proj.bias", {KD}, o.bqkv + QD + KD, false);
    } else {
      o.bqkv = -1;
    }
    o.wo = reserve(C * QD, true);
    add(p + "self_attn.o_proj.weight", {C, QD}, o.wo, true);
    o.wgu = reserve(2 * F * C, true);
    add(p + "mlp.gate_proj.weight", {F, C}, o.wgu, true);
    add(p + "mlp.up_proj.weight", {F, C}, o.wgu + F * C, true);
    o.wdown = reserve(C * F, true);
    add(p + "mlp.down_proj.weight", {C, F}, o.wdown, true);
    o.attn_norm = reserve(C, false);
    add(p + "input_layernorm.weight", {C}, o.attn_norm, false);
    o.mlp_norm = reserve(C, false);
    add(p + "post_attention_layernorm.weight", {C}, o.mlp_norm, false);
    layer_off_.push_back(o);
  }
  final_norm_off_ = reserve(C, false);
  add("model.norm.weight", {C}, final_norm_off_, false);
  if (cfg_.tie_word_embeddings) {
    lm_head_off_ = embed_off_;
  } else {
    lm_head_off_ = reserve(V * C, true);
    add("lm_head.weight", {V, C}, lm_head_off_, true);
  }
  const int64_t decay_elems = off[0];
  for (ParamInfo& p : params_)
    if (!p.decay) p.offset += decay_elems;
  for (LayerOffsets& o : layer_off_) {
    o.attn_norm += decay_elems, o.mlp_norm += decay_elems;
    if (o.bqkv >= 0) o.bqkv += decay_elems;
  }
  final_norm_off_ += decay_elems;
  n_params_ = off[0] + off[1];
  train_off_ = 0;
  decay_end_ = decay_elems;
}

template <class T>
void Model<T>::build_lora_table() {
  lora_layers_.assign(size_t(cfg_.num_hidden_layers), LayerLora{});
  if (!lora_.enabled()) return;
  // The adapters follow the base in the arena and form the whole trainable region, all of it
  // taking weight decay (they are matrices, as PEFT + transformers' Trainer decay them).
  for (ParamInfo& p : params_) p.trainable = false;
  const int64_t r = lora_.rank, QD = cfg_.q_dim(), KD = cfg_.kv_dim(), F = cfg_.intermediate_size;
  int64_t at = n_params_;
  struct Part {
    LoraTarget target;
    int64_t col;  // first output column of the fused projection
  };
  for (int l = 0; l < cfg_.num_hidden_layers; ++l) {
    const std::string prefix = "model.layers." + std::to_string(l) + ".";
    auto block = [&](LoraBlock& b, std::initializer_list<Part> parts) {
      std::vector<Part> chosen;
      for (const Part& part : parts)
        if (lora_.targets_module(part.target)) chosen.push_back(part);
      if (chosen.empty()) return;
      auto name = [&](LoraTarget t, const char* factor) {
        const char* module = t <= LoraTarget::O ? "self_attn." : "mlp.";
        return prefix + module + kLoraTargetNames[int(t)] + ".lora_" + factor + ".weight";
      };
      b.in = LoraConfig::in_features(cfg_, chosen[0].target);
      b.a_off = at;
      for (size_t i = 0; i < chosen.size(); ++i)
        params_.push_back(
            {name(chosen[i].target, "A"), {r, b.in}, at + int64_t(i) * r * b.in, r * b.in, true, true, true});
      at += aligned(int64_t(chosen.size()) * r * b.in);
      for (const Part& part : chosen) {
        const int64_t out = LoraConfig::out_features(cfg_, part.target);
        b.slices.push_back({part.col, out, at});
        params_.push_back({name(part.target, "B"), {out, r}, at, out * r, true, true, true});
        at += aligned(out * r);
      }
      lora_max_slices_ = std::max(lora_max_slices_, int64_t(chosen.size()));
    };
    LayerLora& L = lora_layers_[size_t(l)];
    block(L.qkv, {{LoraTarget::Q, 0}, {LoraTarget::K, QD}, {LoraTarget::V, QD + KD}});
    block(L.o, {{LoraTarget::O, 0}});
    block(L.gu, {{LoraTarget::Gate, 0}, {LoraTarget::Up, F}});
    block(L.down, {{LoraTarget::Down, 0}});
  }
  train_off_ = n_params_;
  decay_end_ = n_params_ = at;
}

template <class T>
template <class E>
typename Model<T>::template LayerParams<E> Model<T>::layer_params(E* base, int l) const {
  const LayerOffsets& o = layer_off_[l];
  return {base + o.attn_norm, base + o.wqkv, o.bqkv >= 0 ? base + o.bqkv : nullptr, base + o.wo, base + o.mlp_norm,
          base + o.wgu,       base + o.wdown};
}

template <class T>
void Model<T>::plan_buffers() {
  const int64_t N = int64_t(plan_.max_batch) * plan_.max_seq;
  const int64_t C = cfg_.hidden_size, V = cfg_.vocab_size, F = cfg_.intermediate_size;
  const int64_t QD = cfg_.q_dim(), QKV = cfg_.qkv_dim(), H = cfg_.num_attention_heads;
  size_t* a = &mem_.activations;
  acts_.resize(cfg_.num_hidden_layers);
  for (size_t l = 0; l < acts_.size(); ++l) {
    LayerActs& L = acts_[l];
    T* input = alloc_tracked<T>(N * C, a);
    if (plan_.checkpoint_activations && l > 0) {
      L = acts_[0];  // the shared set, refilled by each layer's recompute
      L.resid_in = input;
      continue;
    }
    L.resid_in = input;
    L.rstd1 = alloc_tracked<Master>(N, a);
    L.qkv = alloc_tracked<T>(N * QKV, a);
    L.att = alloc_tracked<T>(N * QD, a);
    L.lse = alloc_tracked<Master>(N * H, a);
    L.resid_mid = alloc_tracked<T>(N * C, a);
    L.rstd2 = alloc_tracked<Master>(N, a);
    L.gu = alloc_tracked<T>(N * 2 * F, a);
  }
  resid_out_ = alloc_tracked<T>(N * C, a);
  rstd_final_ = alloc_tracked<Master>(N, a);
  hidden_ = alloc_tracked<T>(N * C, a);
  size_t* s = &mem_.scratch;
  xn_ = alloc_tracked<T>(N * C, s);
  ffn_ = alloc_tracked<T>(N * F, s);
  dresid_ = alloc_tracked<T>(N * C, s);
  dxn_ = alloc_tracked<T>(N * C, s);
  dqkv_ = alloc_tracked<T>(N * QKV, s);
  datt_ = alloc_tracked<T>(N * QD, s);
  dgu_ = alloc_tracked<T>(N * 2 * F, s);
  dffn_ = alloc_tracked<T>(N * F, s);
  if (lora_.enabled()) {
    lora_u_ = alloc_tracked<T>(N * lora_max_slices_ * lora_.rank, s);
    lora_du_ = alloc_tracked<T>(N * lora_max_slices_ * lora_.rank, s);
  }
  // At least one vocabulary row, so forward() can return logits a row block at a time.
  // Logits exist one tile at a time, of the backend's size.
  logits_elems_ = std::max<int64_t>(V, std::min<int64_t>(ops_->head_scratch_elems(), N * V));
  logits_chunk_ = alloc_tracked<Master>(logits_elems_, s);
  gathered_h_ = alloc_tracked<T>(N * C, s);
  gathered_dh_ = alloc_tracked<T>(N * C, s);
  positions_.assign(N, 0);
  row_index_.assign(N, 0);
  targets_.assign(N, 0);
  logp_.assign(N, 0.0);
  coef_.assign(N, 0.0);
  tokens_dev_ = alloc_tracked<int32_t>(N, s);
  positions_dev_ = alloc_tracked<int32_t>(N, s);
  row_index_dev_ = alloc_tracked<int32_t>(N, s);
  targets_dev_ = alloc_tracked<int32_t>(N, s);
  logp_dev_ = alloc_tracked<double>(N, s);
  lse_dev_ = alloc_tracked<double>(N, s);
  coef_dev_ = alloc_tracked<double>(N, s);
  seq_logp_.assign(plan_.max_batch, 0.0);
  seq_grad_.assign(plan_.max_batch, 0.0);
  mem_.scratch += ops_->plan_scratch(plan_.max_seq, cfg_.head_dim);
}

template <class T>
void build_rope_tables(const ModelConfig& c, int64_t n_pos, T* cos, T* sin) {
  // Frequencies and angles follow transformers' float32 arithmetic step by step (inv_freq,
  // the llama3 blend, then angle = float(pos) * inv_freq rounded to float): checkpoints were
  // trained with those angles, which at position 8k differ from exact ones by ~1e-3 rad.
  const int64_t half = c.head_dim / 2;
  std::vector<float> inv(half);
  const RopeScaling& rs = c.rope_scaling;
  const float base = float(c.rope_theta), dim = float(c.head_dim);
  for (int64_t i = 0; i < half; ++i) {
    float f = 1.0f / std::pow(base, float(2 * i) / dim);
    if (rs.kind == RopeScaling::Kind::Linear) {
      f = f / float(rs.factor);
    } else if (rs.kind == RopeScaling::Kind::Llama3) {
      // Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
      const float old_len = float(rs.original_max_position_embeddings), factor = float(rs.factor);
      const float lo = float(rs.low_freq_factor), hi = float(rs.high_freq_factor);
      const float low_wavelen = float(double(rs.original_max_position_embeddings) / rs.low_freq_factor);
      const float high_wavelen = float(double(rs.original_max_position_embeddings) / rs.high_freq_factor);
      const float wavelen = float(2 * M_PI) / f;
      const float scaled = wavelen > low_wavelen ? f / factor : f;
      if (!(wavelen < high_wavelen) && !(wavelen > low_wavelen)) {
        const float smooth = (old_len / wavelen - lo) / (hi - lo);
        f = (1 - smooth) * scaled / factor + smooth * scaled;
      } else {
        f = scaled;
      }
    }
    inv[i] = f;
  }
  for (int64_t p = 0; p < n_pos; ++p)
    for (int64_t i = 0; i < half; ++i) {
      const float angle = float(p) * inv[i];
      cos[p * half + i] = T(std::cos(double(angle)));
      sin[p * half + i] = T(std::sin(double(angle)));
    }
}
template void build_rope_tables<float>(const ModelConfig&, int64_t, float*, float*);
template void build_rope_tables<double>(const ModelConfig&, int64_t, double*, double*);

template <class T>
void Model<T>::build_rope_tables() {
  const int64_t half = cfg_.head_dim / 2, P = plan_.max_seq;
  rope_cos_ = alloc_tracked<Master>(P * half, &mem_.scratch);
  rope_sin_ = alloc_tracked<Master>(P * half, &mem_.scratch);
  std::vector<Master> cos(P * half), sin(P * half);
  sppo::build_rope_tables(cfg_, P, cos.data(), sin.data());
  ops_->upload_bytes(rope_cos_, cos.data(), cos.size() * sizeof(Master));
  ops_->upload_bytes(rope_sin_, sin.data(), sin.size() * sizeof(Master));
}

template <class T>
std::pair<typename Model<T>::Span, typename Model<T>::Span> Model<T>::layer_spans(int l) const {
  // build_param_table reserves a layer's matrices one after another (wqkv, wo, wgu, wdown) in the
  // decay region, and its bias and norms one after another in the other.
  const LayerOffsets& o = layer_off_[size_t(l)];
  const int64_t C = cfg_.hidden_size;
  const int64_t small_at = o.bqkv >= 0 ? o.bqkv : o.attn_norm;
  return {{o.wqkv, o.wdown + C * cfg_.intermediate_size - o.wqkv}, {small_at, o.mlp_norm + C - small_at}};
}

template <class T>
typename Model<T>::template LayerParams<typename Model<T>::Master> Model<T>::layer_grads(int l) {
  if (train_off_ > 0) return {};  // a frozen base
  if (!grads16_) return layer_params(grads_arena_, l);
  const auto [mats, small] = layer_spans(l);
  // The matrices' GEMMs overwrite their part of the stage (backward_blocks' weight_beta), so
  // only the norms' and bias' part, which their ops add into, is zeroed.
  ops_->zero_bytes(grad_stage_ + mats.n, size_t(small.n) * sizeof(Master));
  // The matrices at the start of the stage, the norms and biases after them.
  const auto staged = [&](int64_t off) {
    return off >= decay_end_ ? grad_stage_ + mats.n + (off - small.at) : grad_stage_ + (off - mats.at);
  };
  const LayerOffsets& o = layer_off_[size_t(l)];
  return {staged(o.attn_norm), staged(o.wqkv), o.bqkv >= 0 ? staged(o.bqkv) : nullptr, staged(o.wo), staged(o.mlp_norm),
          staged(o.wgu),       staged(o.wdown)};
}

template <class T>
void Model<T>::commit_layer_grads(int l) {
  if (!grads16_ || train_off_ > 0) return;
  const auto [mats, small] = layer_spans(l);
  // The matrices one by one: their GEMMs write only their own elements of the stage, so the
  // alignment padding between them holds whatever an earlier tensor left there.
  const LayerOffsets& o = layer_off_[size_t(l)];
  const int64_t C = cfg_.hidden_size, F = cfg_.intermediate_size;
  const Span matrices[4] = {
      {o.wqkv, cfg_.qkv_dim() * C}, {o.wo, C * cfg_.q_dim()}, {o.wgu, 2 * F * C}, {o.wdown, C * F}};
  for (const Span& m : matrices) commit_grad(m.at, m.n, m.at - mats.at);
  commit_grad(small.at, small.n, mats.n);  // zeroed whole: its padding adds 0
}

template <class T>
typename Model<T>::Master* Model<T>::stage_grad(int64_t off, int64_t n) {
  if (!grads16_ || off < train_off_) return grad_at(off);
  ops_->zero_bytes(grad_stage_, size_t(n) * sizeof(Master));
  return grad_stage_;
}

template <class T>
void Model<T>::commit_grad(int64_t off, int64_t n, int64_t stage_at) {
  if (grads16_ && off >= train_off_) ops_->add_round(grads16_ + (off - train_off_), grad_stage_ + stage_at, n);
}

template <class T>
typename Model<T>::LayerWeights Model<T>::layer_weights(int l) const {
  SPPO_REQUIRE(l >= 0 && l < cfg_.num_hidden_layers, "layer ", l, " out of range");
  LayerParams<T> p = layer_params(params_arena_, l);
  return {p.attn_norm, p.wqkv, p.bqkv, p.wo, p.mlp_norm, p.wgu, p.wdown};
}

template <class T>
void Model<T>::write_params(int64_t at, const Master* src, int64_t n) {
  if (master_ && at >= train_off_) {
    Master* m = master_ + (at - train_off_);
    ops_->upload_bytes(m, src, size_t(n) * sizeof(Master));
    ops_->cast(params_arena_ + at, m, n);
  } else {
    ops_->upload(params_arena_ + at, src, n);
  }
}

template <class T>
void Model<T>::draw_param(size_t k) {
  // Matrices ~ N(0, initializer_range) as transformers initialises Llama; norms 1; biases 0;
  // adapters as PEFT initialises them. Stream = tensor index, so each tensor's values do not
  // depend on the others or on threads. Values are drawn on the host a bounded chunk at a time
  // and written through write_params.
  constexpr int64_t kChunk = int64_t(1) << 22;
  const ParamInfo& p = params_[k];
  const bool lora_a = p.adapter && p.name.find(".lora_A.") != std::string::npos;
  const bool lora_b = p.adapter && !lora_a;
  const bool is_norm = !p.adapter && p.name.find("norm") != std::string::npos;
  const bool is_bias = p.name.size() >= 5 && p.name.compare(p.name.size() - 5, 5, ".bias") == 0;
  const uint64_t seed = cfg_.seed;
  std::vector<Master> host;
  for (int64_t c0 = 0; c0 < p.size; c0 += kChunk) {
    const int64_t len = std::min(kChunk, p.size - c0);
    host.resize(size_t(len));
    if (is_norm || is_bias || lora_b) {
      std::fill(host.begin(), host.end(), Master(is_norm ? 1 : 0));
    } else if (lora_a) {
      // kaiming_uniform_(a = √5): bound = √(2 / (1 + 5)) · √(3 / in) = 1/√in.
      const double bound = 1 / std::sqrt(double(p.shape[1]));
      cpu_pool().parallel_for(len, 1 << 14, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) host[i] = Master(bound * (2 * uniform01(seed, k, uint64_t(c0 + i)) - 1));
      });
    } else {
      const double std = cfg_.initializer_range;
      cpu_pool().parallel_for(len, 1 << 14, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) host[i] = Master(std * standard_normal(seed, k, uint64_t(c0 + i)));
      });
    }
    write_params(p.offset + c0, host.data(), len);
  }
}

template <class T>
void Model<T>::initialize() {
  for (size_t k = 0; k < params_.size(); ++k) draw_param(k);
  zero_grad();
  ops_->synchronize();
}

template <class T>
void Model<T>::initialize_adapters() {
  for (size_t k = 0; k < params_.size(); ++k)
    if (params_[k].adapter) draw_param(k);
  ops_->synchronize();  // a generator (its own op set) may read the weights next
}

template <class T>
const ParamInfo& Model<T>::param(const std::string& name) const {
  for (const auto& p : params_)
    if (p.name == name) return p;
  std::string hint = cfg_.tie_word_embeddings && name == "lm_head.weight"
                         ? " (the output embedding is tied to model.embed_tokens.weight)"
                         : "";
  throw Error("no parameter named '" + name + "'" + hint);
}

template <class T>
void Model<T>::get_param(const std::string& name, Master* dst) const {
  const ParamInfo& p = param(name);
  if (master_ && p.offset >= train_off_)
    ops_->download_bytes(dst, master_ + (p.offset - train_off_), size_t(p.size) * sizeof(Master));
  else
    ops_->download(dst, params_arena_ + p.offset, p.size);
}

template <class T>
void Model<T>::set_param(const std::string& name, const Master* src, int64_t n) {
  const ParamInfo& p = param(name);
  SPPO_REQUIRE(n == p.size, "parameter '", name, "' has ", p.size, " elements, got ", n);
  for (int64_t i = 0; i < n; ++i)
    SPPO_REQUIRE(std::isfinite(double(src[i])), "parameter '", name, "' value at index ", i, " is not finite (",
                 double(src[i]), "); the model was left unchanged");
  write_params(p.offset, src, n);
  ops_->synchronize();  // a generator (its own op set) may read the weights next
}

template <class T>
void Model<T>::zero_grad() {
  if (grads16_)
    ops_->zero_bytes(grads16_, size_t(num_trainable()) * sizeof(bf16));
  else
    ops_->zero_bytes(grads_arena_, size_t(num_trainable()) * sizeof(Master));
}

template <class T>
void Model<T>::upload_tokens(const int32_t* tokens, int64_t B, int64_t Tn) {
  const int64_t N = B * Tn;
  for (int64_t i = 0; i < N; ++i) positions_[i] = int32_t(i % Tn);
  ops_->upload_bytes(tokens_dev_, tokens, size_t(N) * sizeof(int32_t));
  ops_->upload_bytes(positions_dev_, positions_.data(), size_t(N) * sizeof(int32_t));
}

template <class T>
void Model<T>::validate_batch(const Batch& b, bool need_targets) const {
  SPPO_REQUIRE(b.batch >= 1, "batch is empty (0 sequences)");
  SPPO_REQUIRE(b.seq >= 1, "sequences are empty (length 0)");
  SPPO_REQUIRE(b.batch <= plan_.max_batch, "batch has ", b.batch, " sequences; the model was planned for at most ",
               plan_.max_batch, " (plan.maxBatch)");
  SPPO_REQUIRE(b.seq <= plan_.max_seq, "sequence length ", b.seq, " exceeds the planned maximum ", plan_.max_seq,
               " (plan.maxSeq)");
  if (need_targets) SPPO_REQUIRE(b.seq >= 2, "a next-token loss needs sequences of at least 2 tokens, got ", b.seq);
  const int64_t n = b.batch * b.seq;
  for (int64_t i = 0; i < n; ++i) {
    const int32_t id = b.tokens[i];
    SPPO_REQUIRE(id >= 0 && id < cfg_.vocab_size, "token id ", id, " at sequence ", i / b.seq, ", position ", i % b.seq,
                 " is out of range [0, ", cfg_.vocab_size, ")");
  }
}

template <class T>
void Model<T>::forward_blocks(const int32_t* tokens, int64_t B, int64_t Tn) {
  Ops<T>& o = *ops_;
  const int64_t N = B * Tn, C = cfg_.hidden_size;
  const int64_t H = cfg_.num_attention_heads, KV = cfg_.num_key_value_heads, D = cfg_.head_dim;
  const int64_t QD = cfg_.q_dim(), QKV = cfg_.qkv_dim();
  const double eps = cfg_.rms_norm_eps;
  upload_tokens(tokens, B, Tn);
  const AttentionShape shape{B, Tn, H, KV, D, QKV, 0, QD, QD + cfg_.kv_dim(), QD, 1.0 / std::sqrt(double(D))};
  o.gather_rows(acts_[0].resid_in, params_arena_ + embed_off_, tokens_dev_, N, C);  // the embedding lookup
  for (int l = 0; l < cfg_.num_hidden_layers; ++l) layer_forward(l, shape, N, true);
  o.rmsnorm_forward(hidden_, rstd_final_, resid_out_, params_arena_ + final_norm_off_, N, C, eps);
}

template <class T>
void Model<T>::layer_forward(int l, const AttentionShape& shape, int64_t N, bool output) {
  Ops<T>& o = *ops_;
  const int64_t C = cfg_.hidden_size, F = cfg_.intermediate_size;
  const int64_t H = cfg_.num_attention_heads, KV = cfg_.num_key_value_heads, D = cfg_.head_dim;
  const int64_t QD = cfg_.q_dim(), QKV = cfg_.qkv_dim();
  const double eps = cfg_.rms_norm_eps;
  LayerActs& a = acts_[l];
  LayerParams<T> p = layer_params(params_arena_, l);
  o.rmsnorm_forward(xn_, a.rstd1, a.resid_in, p.attn_norm, N, C, eps);
  const LayerLora& lo = lora_layers_[size_t(l)];
  o.gemm(false, true, N, QKV, C, 1, xn_, C, p.wqkv, C, 0, a.qkv, QKV);
  lora_forward(o, lo.qkv, xn_, N, a.qkv, QKV, lora_u_);  // before the bias and rotary, as PEFT's q/k/v
  if (p.bqkv) o.add_bias(a.qkv, p.bqkv, N, QKV, QKV);
  o.rope(a.qkv, N, QKV, 0, H, D, positions_dev_, rope_cos_, rope_sin_, false);
  o.rope(a.qkv, N, QKV, QD, KV, D, positions_dev_, rope_cos_, rope_sin_, false);
  o.attention_forward(a.att, a.lse, a.qkv, shape);
  o.copy(a.resid_mid, a.resid_in, N * C);
  o.gemm(false, true, N, C, QD, 1, a.att, QD, p.wo, QD, 1, a.resid_mid, C);
  lora_forward(o, lo.o, a.att, N, a.resid_mid, C, lora_u_);
  o.rmsnorm_forward(xn_, a.rstd2, a.resid_mid, p.mlp_norm, N, C, eps);
  o.gemm(false, true, N, 2 * F, C, 1, xn_, C, p.wgu, C, 0, a.gu, 2 * F);
  lora_forward(o, lo.gu, xn_, N, a.gu, 2 * F, lora_u_);
  // The backward recomputes the swiglu output and the down projection's input from gu itself.
  if (!output) return;
  o.swiglu_forward(ffn_, a.gu, N, F);
  T* next = l + 1 < cfg_.num_hidden_layers ? acts_[l + 1].resid_in : resid_out_;
  o.copy(next, a.resid_mid, N * C);
  o.gemm(false, true, N, C, F, 1, ffn_, F, p.wdown, F, 1, next, C);
  lora_forward(o, lo.down, ffn_, N, next, C, lora_u_);
}

template <class T>
void Model<T>::lora_forward(Ops<T>& o, const LoraBlock& b, const T* x, int64_t N, T* y, int64_t ldy, T* u) const {
  if (b.slices.empty()) return;
  const int64_t r = lora_.rank, k = int64_t(b.slices.size()) * r;
  // u = x·Aᵀ for every slice at once, then each slice's y columns += scale·u_i·B_iᵀ.
  o.gemm(false, true, N, k, b.in, 1, x, b.in, params_arena_ + b.a_off, b.in, 0, u, k);
  for (size_t i = 0; i < b.slices.size(); ++i) {
    const LoraSlice& s = b.slices[i];
    o.gemm(false, true, N, s.out, r, lora_.scale(), u + int64_t(i) * r, k, params_arena_ + s.b_off, r, 1, y + s.col,
           ldy);
  }
}

template <class T>
void Model<T>::lora_backward(const LoraBlock& b, const T* x, const T* dy, int64_t ldy, T* dx, int64_t N) {
  if (b.slices.empty()) return;
  Ops<T>& o = *ops_;
  const int64_t r = lora_.rank, k = int64_t(b.slices.size()) * r;
  const double scale = lora_.scale();
  // u = x·Aᵀ again (rank columns: cheaper to recompute than to keep per layer).
  o.gemm(false, true, N, k, b.in, 1, x, b.in, params_arena_ + b.a_off, b.in, 0, lora_u_, k);
  for (size_t i = 0; i < b.slices.size(); ++i) {
    const LoraSlice& s = b.slices[i];
    const T* dyi = dy + s.col;
    o.gemm_master(true, false, s.out, r, N, scale, dyi, ldy, lora_u_ + int64_t(i) * r, k, 1, grad_at(s.b_off), r);
    o.gemm(false, false, N, r, s.out, scale, dyi, ldy, params_arena_ + s.b_off, r, 0, lora_du_ + int64_t(i) * r, k);
  }
  o.gemm_master(true, false, k, b.in, N, 1, lora_du_, k, x, b.in, 1, grad_at(b.a_off), b.in);    // dA += duᵀ·x
  o.gemm(false, false, N, b.in, k, 1, lora_du_, k, params_arena_ + b.a_off, b.in, 1, dx, b.in);  // dx += du·A
}

template <class T>
void Model<T>::forward(const int32_t* tokens, int64_t B, int64_t Tn, Master* hidden_out, Master* logits_out) {
  validate_batch({tokens, nullptr, B, Tn}, false);
  forward_blocks(tokens, B, Tn);
  const int64_t N = B * Tn, C = cfg_.hidden_size, V = cfg_.vocab_size;
  if (hidden_out) ops_->download(hidden_out, hidden_, N * C);
  if (!logits_out) return;
  // Logits come back a row block at a time through the head's tile buffer (never N x V on the backend).
  const int64_t rows = logits_elems_ / V;
  for (int64_t r0 = 0; r0 < N; r0 += rows) {
    const int64_t r = std::min(rows, N - r0);
    ops_->gemm_master(false, true, r, V, C, 1, hidden_ + r0 * C, C, lm_head(params_arena_), C, 0, logits_chunk_, V);
    ops_->download_bytes(logits_out + r0 * V, logits_chunk_, size_t(r * V) * sizeof(Master));
  }
}

template <class T>
int64_t Model<T>::gather_target_rows(const Batch& b) {
  // Position t predicts token t+1. Only rows that have a target are gathered, so prompt and
  // padding tokens cost nothing in the LM head.
  const int64_t Tn = b.seq, C = cfg_.hidden_size;
  int64_t n = 0;
  for (int64_t r = 0; r < b.batch; ++r)
    for (int64_t t = 0; t + 1 < Tn; ++t) {
      const int64_t next = r * Tn + t + 1;
      if (b.target_mask && !b.target_mask[next]) continue;
      row_index_[n] = int32_t(r * Tn + t);
      targets_[n] = b.tokens[next];
      ++n;
    }
  SPPO_REQUIRE(n > 0, "the target mask selects no tokens to predict (positions 1.. of some sequence must be set)");
  ops_->upload_bytes(row_index_dev_, row_index_.data(), size_t(n) * sizeof(int32_t));
  ops_->upload_bytes(targets_dev_, targets_.data(), size_t(n) * sizeof(int32_t));
  ops_->gather_rows(gathered_h_, hidden_, row_index_dev_, n, C);
  return n;
}

template <class T>
void Model<T>::head_backward(int64_t n_rows, int64_t batch_tokens) {
  // coef_ holds dL/dlogp per gathered row; the result is dL/d(final hidden) in dxn_.
  const int64_t C = cfg_.hidden_size, V = cfg_.vocab_size;
  ops_->upload_bytes(coef_dev_, coef_.data(), size_t(n_rows) * sizeof(double));
  ops_->head_logprobs_backward(gathered_dh_, stage_grad(lm_head_off_, V * C), gathered_h_, lm_head(params_arena_),
                               targets_dev_, lse_dev_, coef_dev_, n_rows, C, V, logits_chunk_, logits_elems_);
  commit_grad(lm_head_off_, V * C);
  ops_->zero_bytes(dxn_, size_t(batch_tokens * C) * sizeof(T));
  ops_->scatter_rows(dxn_, gathered_dh_, row_index_dev_, n_rows, C);
}

template <class T>
void Model<T>::head_logprobs(int64_t n) {
  ops_->head_logprobs(logp_dev_, lse_dev_, gathered_h_, lm_head(params_arena_), targets_dev_, n, cfg_.hidden_size,
                      cfg_.vocab_size, logits_chunk_, logits_elems_);
  ops_->download_bytes(logp_.data(), logp_dev_, size_t(n) * sizeof(double));
}

template <class T>
double Model<T>::head_loss(const Batch& b, double scale, bool grad, int64_t* target_tokens) {
  const int64_t n = gather_target_rows(b);
  if (target_tokens) *target_tokens = n;
  head_logprobs(n);
  double total = 0;
  for (int64_t i = 0; i < n; ++i) total -= logp_[i];
  if (grad) {
    // Mean cross-entropy: every row's log-prob enters with weight -1/n.
    for (int64_t i = 0; i < n; ++i) coef_[i] = -scale / double(n);
    head_backward(n, b.batch * b.seq);
  }
  return total / double(n);
}

template <class T>
int64_t Model<T>::forward_sequence_logprobs(const Batch& b, double* seq_logp) {
  validate_batch(b, true);
  forward_blocks(b.tokens, b.batch, b.seq);
  const int64_t n = gather_target_rows(b);
  head_logprobs(n);
  std::fill(seq_logp, seq_logp + b.batch, 0.0);
  for (int64_t i = 0; i < n; ++i) seq_logp[row_index_[i] / b.seq] += logp_[i];  // rows ascend: fixed order
  return n;
}

template <class T>
void Model<T>::sequence_logprobs(const Batch& b, double* seq_logp, double* token_logp) {
  const int64_t n = forward_sequence_logprobs(b, seq_logp);
  if (!token_logp) return;
  std::fill(token_logp, token_logp + b.batch * b.seq, 0.0);
  for (int64_t i = 0; i < n; ++i) token_logp[row_index_[i] + 1] = logp_[i];  // row t predicts token t+1
}

template <class T>
PreferenceMetrics Model<T>::eval_preference(const PreferenceBatch& pb, double* seq_logp) {
  forward_sequence_logprobs(pb.seqs, seq_logp);
  PreferenceMetrics m;
  std::vector<double> grad(pb.seqs.batch);  // once per call, outside any step loop
  preference_loss(pb.loss, pb.eta, pb.seqs.batch, seq_logp, pb.ref_logp, pb.target, grad.data(), &m);
  return m;
}

template <class T>
PreferenceMetrics Model<T>::accumulate_preference_gradients(const PreferenceBatch& pb, double scale, double* seq_logp) {
  const Batch& b = pb.seqs;
  const int64_t n = forward_sequence_logprobs(b, seq_logp_.data());
  PreferenceMetrics m;
  preference_loss(pb.loss, pb.eta, b.batch, seq_logp_.data(), pb.ref_logp, pb.target, seq_grad_.data(), &m);
  if (seq_logp) std::copy(seq_logp_.begin(), seq_logp_.begin() + b.batch, seq_logp);
  // Every token of a sequence carries that sequence's dloss/dlogp.
  for (int64_t i = 0; i < n; ++i) coef_[i] = scale * seq_grad_[row_index_[i] / b.seq];
  head_backward(n, b.batch * b.seq);
  backward_blocks(b.batch, b.seq);
  return m;
}

template <class T>
void Model<T>::backward_blocks(int64_t B, int64_t Tn) {
  // Expects dxn_ = dL/d(final hidden), and the tokens of the forward pass still uploaded. Recomputes normed inputs and swiglu outputs from the
  // saved residuals instead of storing them (cheap next to the GEMMs, saves 3 (N,C|F) per layer).
  Ops<T>& o = *ops_;
  const int64_t N = B * Tn, C = cfg_.hidden_size, F = cfg_.intermediate_size;
  const int64_t H = cfg_.num_attention_heads, KV = cfg_.num_key_value_heads, D = cfg_.head_dim;
  const int64_t QD = cfg_.q_dim(), QKV = cfg_.qkv_dim();
  const double eps = cfg_.rms_norm_eps;
  const AttentionShape shape{B, Tn, H, KV, D, QKV, 0, QD, QD + cfg_.kv_dim(), QD, 1.0 / std::sqrt(double(D))};
  // With LoRA every base gradient pointer is null: the ops skip those weight gradients (and the
  // GEMMs that would produce them) and compute the input gradients alone.
  // The weight-gradient GEMMs accumulate into the gradient arena, or with bf16 gradients
  // overwrite the stage (each matrix's gradient is one GEMM): that saves zeroing the stage and
  // reading it back, 8 of the staging's 20 bytes an element. Same kernel, same bits.
  const double weight_beta = grads16_ ? 0.0 : 1.0;
  o.zero_bytes(dresid_, size_t(N * C) * sizeof(T));
  o.rmsnorm_backward(dresid_, stage_grad(final_norm_off_, C), dxn_, resid_out_, params_arena_ + final_norm_off_,
                     rstd_final_, N, C);
  commit_grad(final_norm_off_, C);
  for (int l = cfg_.num_hidden_layers - 1; l >= 0; --l) {
    // A checkpointed layer's activations are recomputed from its saved input by the same ops
    // in the same order as the forward pass, so they (and the gradients) are bitwise the same.
    // (The last layer's are still there from the forward pass.)
    if (plan_.checkpoint_activations && l + 1 < cfg_.num_hidden_layers) layer_forward(l, shape, N, false);
    LayerActs& a = acts_[l];
    LayerParams<T> p = layer_params(params_arena_, l);
    LayerParams<Master> g = layer_grads(l);
    const LayerLora& lo = lora_layers_[size_t(l)];
    // MLP: resid_out = resid_mid + down(swiglu(gu(norm2(resid_mid)))).
    o.rmsnorm_forward(xn_, a.rstd2, a.resid_mid, p.mlp_norm, N, C, eps);
    o.swiglu_forward(ffn_, a.gu, N, F);
    if (g.wdown) o.gemm_master(true, false, C, F, N, 1, dresid_, C, ffn_, F, weight_beta, g.wdown, F);
    o.gemm(false, false, N, F, C, 1, dresid_, C, p.wdown, F, 0, dffn_, F);
    lora_backward(lo.down, ffn_, dresid_, C, dffn_, N);
    o.swiglu_backward(dgu_, dffn_, a.gu, N, F);
    if (g.wgu) o.gemm_master(true, false, 2 * F, C, N, 1, dgu_, 2 * F, xn_, C, weight_beta, g.wgu, C);
    o.gemm(false, false, N, C, 2 * F, 1, dgu_, 2 * F, p.wgu, C, 0, dxn_, C);
    lora_backward(lo.gu, xn_, dgu_, 2 * F, dxn_, N);
    o.rmsnorm_backward(dresid_, g.mlp_norm, dxn_, a.resid_mid, p.mlp_norm, a.rstd2, N, C);
    // Attention: resid_mid = resid_in + o_proj(attn(rope(qkv(norm1(resid_in))))).
    if (g.wo) o.gemm_master(true, false, C, QD, N, 1, dresid_, C, a.att, QD, weight_beta, g.wo, QD);
    o.gemm(false, false, N, QD, C, 1, dresid_, C, p.wo, QD, 0, datt_, QD);
    lora_backward(lo.o, a.att, dresid_, C, datt_, N);
    o.attention_backward(dqkv_, datt_, a.qkv, a.att, a.lse, shape);
    o.rope(dqkv_, N, QKV, 0, H, D, positions_dev_, rope_cos_, rope_sin_, true);
    o.rope(dqkv_, N, QKV, QD, KV, D, positions_dev_, rope_cos_, rope_sin_, true);
    if (g.bqkv) o.bias_backward(g.bqkv, dqkv_, N, QKV, QKV);
    o.rmsnorm_forward(xn_, a.rstd1, a.resid_in, p.attn_norm, N, C, eps);
    if (g.wqkv) o.gemm_master(true, false, QKV, C, N, 1, dqkv_, QKV, xn_, C, weight_beta, g.wqkv, C);
    o.gemm(false, false, N, C, QKV, 1, dqkv_, QKV, p.wqkv, C, 0, dxn_, C);
    lora_backward(lo.qkv, xn_, dqkv_, QKV, dxn_, N);
    o.rmsnorm_backward(dresid_, g.attn_norm, dxn_, a.resid_in, p.attn_norm, a.rstd1, N, C);
    commit_layer_grads(l);
  }
  // With bf16 gradients the embedding's staged rows are the whole table: rows of tokens absent
  // from the batch add an exact zero.
  if (Master* g = stage_grad(embed_off_, cfg_.vocab_size * C)) {
    o.embedding_backward(g, dresid_, tokens_dev_, N, C);
    commit_grad(embed_off_, cfg_.vocab_size * C);
  }
}

template <class T>
double Model<T>::eval_loss(const Batch& b, int64_t* target_tokens) {
  validate_batch(b, true);
  forward_blocks(b.tokens, b.batch, b.seq);
  return head_loss(b, 1.0, false, target_tokens);
}

template <class T>
double Model<T>::accumulate_gradients(const Batch& b, double scale, int64_t* target_tokens) {
  validate_batch(b, true);
  forward_blocks(b.tokens, b.batch, b.seq);
  const double loss = head_loss(b, scale, true, target_tokens);
  backward_blocks(b.batch, b.seq);
  return loss;
}

template class Model<float>;
template class Model<double>;
template class Model<bf16>;

}  // namespace sppo
