// The Llama-family decoder (Llama, Mistral, Qwen2 shapes), written once against the op
// interface. T is the storage type of parameters and activations: float for the CPU engine,
// double for gradient checks, bf16 on CUDA; Master = master_t<T> holds master weights, gradients,
// optimizer state and statistics (ops/ops.h). Tensors live in backend memory; the public
// methods take and return host memory unless they say otherwise.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "ops/meta_ops.h"
#include "ops/ops.h"
#include "sppo/config.h"
#include "sppo/preference.h"

namespace sppo {

// One named parameter as Hugging Face (or, for an adapter, PEFT) names it: a contiguous slice of
// the parameter arena.
struct ParamInfo {
  std::string name;
  std::vector<int64_t> shape;
  int64_t offset = 0;  // elements into the parameter arena
  int64_t size = 0;
  bool decay = false;     // matrices (adapters included) take weight decay; norms and biases do not
  bool trainable = true;  // has gradients and optimizer state (false: a base weight frozen under LoRA)
  bool adapter = false;   // a LoRA factor (model.layers.N.….q_proj.lora_A.weight, …)
};

// A batch of B rows of T tokens each (row-major). Target weights: weight[b*T + t] says how
// much token t counts as a prediction target (from position t-1); position 0 is never one.
struct Batch {
  const int32_t* tokens = nullptr;
  const uint8_t* target_mask = nullptr;  // null: every token after the first is a target
  int64_t batch = 0;
  int64_t seq = 0;
};

struct StepResult {
  double loss = 0;  // mean cross-entropy over target tokens of this micro-batch
  int64_t target_tokens = 0;
  bool stepped = false;  // the optimizer ran (gradient accumulation complete)
  int64_t step = 0;      // optimizer steps taken so far
  double lr = 0;         // learning rate used by the step (when stepped)
  double grad_norm = 0;  // global gradient norm before clipping (when stepped)
};

// A batch for a preference loss: one row per sequence (prompt + response, right-padded), with
// target_mask marking the response tokens; for pair losses rows 2k / 2k+1 are chosen / rejected.
struct PreferenceBatch {
  Batch seqs;
  const double* ref_logp = nullptr;  // (batch) log π_t(y|x) of each row's response
  const double* target = nullptr;    // (batch) win probabilities, as preference_loss reads them
  PreferenceLoss loss = PreferenceLoss::SppoPair;
  double eta = 1000;
};

struct PreferenceStepResult {
  StepResult step;  // step.loss is the preference loss
  PreferenceMetrics metrics;
};

// Bytes by what they hold, as the allocating code counts them (the bytes it asks the backend
// for; the CPU rounds each buffer up to 64 bytes, cudaMalloc to its own granularity).
// With LoRA, params holds the frozen base and the adapters, and master, grads and optimizer the
// adapters' alone.
struct MemoryReport {
  size_t params = 0;       // the working parameters (T: fp32 on the CPU, bf16 on CUDA)
  size_t master = 0;       // fp32 master weights of the trainable parameters, where T is narrower
  size_t grads = 0;        // gradients of the trainable parameters (Master)
  size_t optimizer = 0;    // optimizer state (set_optimizer allocates it)
  size_t activations = 0;  // what the forward pass keeps for the backward
  size_t scratch = 0;      // per-layer work buffers, the head's logits tile, index arrays, rotary tables
  size_t kv_cache = 0;     // a generator's KV cache and step buffers (plan_memory only)
  size_t total() const { return params + master + grads + optimizer + activations + scratch + kv_cache; }
};

struct GeneratorPlan;  // sppo/generate.h
class GeneratorApi;

// The host-facing face of Model<T>: the same for every T with the same Master type, so a caller
// (the Node addon) holds a CPU float model and a CUDA bf16 model alike. Host memory throughout.
template <class M>
class ModelApi {
 public:
  virtual ~ModelApi() = default;
  virtual const char* backend() const = 0;  // "cpu" or "cuda"
  virtual const ModelConfig& config() const = 0;
  virtual const LoraConfig& lora() const = 0;
  virtual MemoryReport memory() const = 0;
  virtual const std::vector<ParamInfo>& params() const = 0;
  virtual const ParamInfo& param(const std::string& name) const = 0;
  virtual int64_t num_params() const = 0;
  virtual void get_param(const std::string& name, M* dst) const = 0;
  virtual void set_param(const std::string& name, const M* src, int64_t n) = 0;
  virtual void initialize_adapters() = 0;
  virtual void forward(const int32_t* tokens, int64_t B, int64_t Tn, M* hidden_out, M* logits_out) = 0;
  virtual double eval_loss(const Batch& batch, int64_t* target_tokens) = 0;
  virtual void sequence_logprobs(const Batch& batch, double* seq_logp, double* token_logp) = 0;
  virtual PreferenceMetrics eval_preference(const PreferenceBatch& batch, double* seq_logp) = 0;
  virtual void set_optimizer(const OptimizerConfig& oc) = 0;
  virtual StepResult train_step(const Batch& batch) = 0;
  virtual PreferenceStepResult preference_step(const PreferenceBatch& batch, double* seq_logp) = 0;
  virtual int64_t optimizer_steps() const = 0;
  virtual int pending_micro_batches() const = 0;
  // A generator with its own KV cache and op set over this model's weights (sppo/generate.h).
  virtual std::unique_ptr<GeneratorApi> make_generator(const GeneratorPlan& plan) const = 0;
};

// Where one projection's adapter lives (elements into the parameter arena): its A is rows
// [index·rank, (index+1)·rank) of its block's fused A, its B (out × rank) at b_off, and it adds
// into output columns [col, col + out) of the block's projection.
struct LoraSlice {
  int64_t col = 0, out = 0, b_off = 0;
};
// The adapters on one of a layer's four projection GEMMs (the fused q|k|v, o, the fused gate|up,
// down): the A factors of its targeted slices stacked into one (slices·rank × in) matrix, so
// x·Aᵀ is one GEMM for all of them. No slices: no adapter there.
struct LoraBlock {
  int64_t a_off = 0, in = 0;
  std::vector<LoraSlice> slices;
};
struct LayerLora {
  LoraBlock qkv, o, gu, down;
};

template <class T>
class Model final : public ModelApi<master_t<T>> {
 public:
  using Master = master_t<T>;
  // initialize = false leaves the parameters zero, adapters included, for callers that load every
  // one of them (drawing 0.5B normals costs far more than reading a checkpoint); a caller that
  // loads only the base draws fresh adapters with initialize_adapters(). `lora` (validated here)
  // adds adapters and freezes the base.
  Model(ModelConfig config, MemoryPlan plan, std::unique_ptr<Ops<T>> ops, bool initialize = true, LoraConfig lora = {});
  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const char* backend() const override { return ops_->name(); }
  const ModelConfig& config() const override { return cfg_; }
  const LoraConfig& lora() const override { return lora_; }
  const MemoryPlan& plan() const { return plan_; }
  Ops<T>& ops() { return *ops_; }
  MemoryReport memory() const override;

  // Parameters by Hugging Face name.
  const std::vector<ParamInfo>& params() const override { return params_; }
  const ParamInfo& param(const std::string& name) const override;
  // Host copies of / into one named tensor (in Master precision: the master weights when there
  // are any). set_param validates size and finiteness first and leaves the model unchanged on error.
  void get_param(const std::string& name, Master* dst) const override;
  void set_param(const std::string& name, const Master* src, int64_t n) override;
  // The arenas themselves, in backend memory (host memory on the CPU, where tests read them). The
  // gradient arena covers the trainable parameters only: param_grad(p) is p's gradient (null for
  // a frozen p); without LoRA, grad_data()[p.offset + i] too. With plan.bf16_gradients the
  // gradients live in grad16_data() instead (same layout) and grad_data() and param_grad are null.
  T* param_data() { return params_arena_; }
  Master* grad_data() { return grads_arena_; }
  bf16* grad16_data() { return grads16_; }
  Master* param_grad(const ParamInfo& p) { return grad_at(p.offset); }
  int64_t num_params() const override { return n_params_; }
  // Elements of the trainable region, [num_params() - num_trainable(), num_params()) of the arena.
  int64_t num_trainable() const { return n_params_ - train_off_; }
  // Re-draws every parameter from config.seed (weights ~ N(0, initializer_range), norms 1, biases
  // 0; adapters as initialize_adapters draws them).
  void initialize();
  // Re-draws the adapters alone as PEFT initialises them: A ~ U(−1/√in, 1/√in) (kaiming_uniform
  // with a = √5), B = 0, so base + adapters starts as the base.
  void initialize_adapters() override;

  // Forward over tokens(B,T): final hidden states (B,T,hidden) after the last RMSNorm, and/or
  // logits (B,T,vocab), into host memory. Either output may be null.
  void forward(const int32_t* tokens, int64_t B, int64_t Tn, Master* hidden_out, Master* logits_out) override;
  // Mean next-token cross-entropy over the masked targets, without gradients.
  double eval_loss(const Batch& batch, int64_t* target_tokens = nullptr) override;
  // Forward + backward: adds scale * d(mean loss)/dθ into the gradients; returns the loss.
  double accumulate_gradients(const Batch& batch, double scale, int64_t* target_tokens = nullptr);
  void zero_grad();

  // Σ over each row's target tokens of log π(token | prefix), in double: seq_logp (batch);
  // token_logp (batch, seq), when not null, gets each target token's log-prob (0 elsewhere).
  void sequence_logprobs(const Batch& batch, double* seq_logp, double* token_logp) override;
  // The preference loss of a batch without gradients; seq_logp (batch) receives log π_θ(y|x).
  PreferenceMetrics eval_preference(const PreferenceBatch& batch, double* seq_logp) override;
  // Forward, fused head + preference loss, backward: adds scale * dloss/dθ into the gradients.
  PreferenceMetrics accumulate_preference_gradients(const PreferenceBatch& batch, double scale, double* seq_logp);

  // Optimizer (created by set_optimizer; resets its state and step count).
  void set_optimizer(const OptimizerConfig& oc) override;
  const OptimizerConfig& optimizer_config() const { return opt_; }
  // One training call: accumulate_gradients with scale 1/grad_accum_steps, then an optimizer
  // step when grad_accum_steps micro-batches have been accumulated.
  StepResult train_step(const Batch& batch) override;
  // The same for a preference batch (SPPO, DPO, IPO ...); seq_logp (batch) may be null.
  PreferenceStepResult preference_step(const PreferenceBatch& batch, double* seq_logp = nullptr) override;
  // Applies the optimizer to the gradients accumulated so far (clipped by the global norm) and
  // zeroes them; train_step and preference_step call it once grad_accum_steps micro-batches are
  // in. A step that would write a non-finite value (a NaN gradient norm, or an lr so large that
  // the update overflows) throws instead, leaving the parameters, master weights, optimizer state
  // and step count as they were (the gradients are discarded). Public for callers that accumulate gradients themselves (tests compare backends on
  // identical gradients through it).
  StepResult optimizer_step();
  int64_t optimizer_steps() const override { return step_; }
  int pending_micro_batches() const override { return micro_; }
  std::unique_ptr<GeneratorApi> make_generator(const GeneratorPlan& plan) const override;  // generate.cpp

  // Read-only views of the weights, for code that runs the same network another way (the
  // KV-cache decoder). Fused blocks: wqkv (q_dim+2*kv_dim, C), wgu (2F, C) = [gate; up].
  struct LayerWeights {
    const T *attn_norm, *wqkv, *bqkv /* null without attention_bias */, *wo, *mlp_norm, *wgu, *wdown;
  };  // backend memory
  LayerWeights layer_weights(int l) const;
  // Layer l's adapters (empty blocks without LoRA), and the forward of one block: y(N, ·) (row
  // stride ldy) += scale·(x·Aᵀ)·Bᵀ for each slice, with u (N, slices·rank) scratch, on the op set
  // `o` (the model's own, or a generator's).
  const LayerLora& layer_lora(int l) const { return lora_layers_[size_t(l)]; }
  void lora_forward(Ops<T>& o, const LoraBlock& b, const T* x, int64_t N, T* y, int64_t ldy, T* u) const;
  // The most adapters any block stacks (u's columns are this × rank).
  int64_t lora_max_slices() const { return lora_max_slices_; }
  const T* embedding() const { return params_arena_ + embed_off_; }
  const T* final_norm_weight() const { return params_arena_ + final_norm_off_; }
  const T* lm_head_weight() const { return params_arena_ + lm_head_off_; }

  // Validates a batch against the vocabulary and the memory plan (throws sppo::Error).
  void validate_batch(const Batch& batch, bool need_targets) const;
  // The rotary tables (plan.max_seq, head_dim/2) in backend memory, for tests.
  const Master* rope_cos() const { return rope_cos_; }
  const Master* rope_sin() const { return rope_sin_; }

 private:
  // One layer's tensors inside a parameter-shaped arena (parameters: T, gradients: Master).
  template <class E>
  struct LayerParams {
    E *attn_norm, *wqkv, *bqkv, *wo, *mlp_norm, *wgu, *wdown;
  };
  struct LayerActs {
    T* resid_in;    // (N, C) residual stream entering the layer
    Master* rstd1;  // (N)
    T* qkv;         // (N, QKV) after bias and rotary
    T* att;         // (N, H*D) attention output before o_proj
    Master* lse;    // (B, H, T)
    T* resid_mid;   // (N, C) after the attention residual
    Master* rstd2;  // (N)
    T* gu;          // (N, 2F) gate|up pre-activations
  };

  void build_param_table();
  void plan_buffers();
  void build_rope_tables();
  template <class E>
  E* alloc_tracked(size_t n, size_t* counter);
  template <class E>
  LayerParams<E> layer_params(E* base, int l) const;
  // Where the backward writes layer l's weight gradients (null where frozen): its slices of the
  // gradient arena, or with bf16 gradients the staging scratch, whose norms' and bias' part is
  // zeroed here (the matrices' GEMMs overwrite theirs); commit_layer_grads adds it into the bf16
  // arena after the layer's backward.
  LayerParams<Master> layer_grads(int l);
  void commit_layer_grads(int l);
  // A contiguous run of arena elements.
  struct Span {
    int64_t at, n;
  };
  // Layer l's parameters as two spans: its matrices (in the weight-decay region) and its norms
  // and biases (after it), padding between tensors included.
  std::pair<Span, Span> layer_spans(int l) const;
  // The gradient of arena element `off`: null for a frozen parameter (and with bf16 gradients).
  Master* grad_at(int64_t off) {
    return off < train_off_ || !grads_arena_ ? nullptr : grads_arena_ + (off - train_off_);
  }
  // Where the backward writes the gradient of the n elements from `off` (one tensor: the head,
  // the final norm, the embedding): grad_at(off), or with bf16 gradients the staging scratch,
  // zeroed; commit_grad(off, n) then adds it into the bf16 arena. Null for a frozen tensor.
  Master* stage_grad(int64_t off, int64_t n);
  void commit_grad(int64_t off, int64_t n, int64_t stage_at = 0);
  // The adapters' part of the backward of one block: dA, dB, and dx(N, in) += their contribution,
  // for the block's input x(N, in) and output gradient dy (row stride ldy).
  void lora_backward(const LoraBlock& b, const T* x, const T* dy, int64_t ldy, T* dx, int64_t N);
  void build_lora_table();
  // Draws parameter k (params_[k]) as initialize() does.
  void draw_param(size_t k);
  template <class E>
  E* lm_head(E* base) const {
    return base + lm_head_off_;
  }
  // Writes host values into parameter elements [at, at + n) (the master copy too, if any: the
  // trainable region's).
  void write_params(int64_t at, const Master* src, int64_t n);
  // Uploads tokens(B,T) and their positions for forward_blocks / backward_blocks.
  void upload_tokens(const int32_t* tokens, int64_t B, int64_t Tn);
  void forward_blocks(const int32_t* tokens, int64_t B, int64_t Tn);
  // Layer l's forward from acts_[l].resid_in: fills the activations it saves and, with
  // `output`, writes the layer's output (the next layer's input, or resid_out_). The backward
  // calls it without `output` to recompute a checkpointed layer.
  void layer_forward(int l, const AttentionShape& shape, int64_t N, bool output);
  int64_t gather_target_rows(const Batch& batch);
  void head_backward(int64_t n_rows, int64_t batch_tokens);
  // The fused head over the n gathered rows: logp_ (host) and the backend lse for the backward.
  void head_logprobs(int64_t n);
  double head_loss(const Batch& batch, double scale, bool grad, int64_t* target_tokens);
  void backward_blocks(int64_t B, int64_t Tn);
  // One micro-batch: accumulate(scale) adds gradients and returns the loss; steps the
  // optimizer when the accumulation is complete, discards the gradients on any failure.
  template <class Accumulate>
  StepResult micro_step(Accumulate&& accumulate);
  // Forward + fused head: per-sequence log-probs into seq_logp (batch); gathered rows kept for backward.
  int64_t forward_sequence_logprobs(const Batch& batch, double* seq_logp);

  ModelConfig cfg_;
  MemoryPlan plan_;
  std::unique_ptr<Ops<T>> ops_;
  OptimizerConfig opt_;

  LoraConfig lora_;
  std::vector<ParamInfo> params_;
  int64_t n_params_ = 0;
  // Arena [train_off_, n_params_) is trainable: everything without LoRA (0), the adapters with
  // it (they follow the base). Master weights, gradients and optimizer state cover it alone. Of
  // it, [train_off_, decay_end_) takes weight decay.
  int64_t train_off_ = 0, decay_end_ = 0;
  std::vector<LayerLora> lora_layers_;
  int64_t lora_max_slices_ = 0;
  // Offsets (elements) of the fused per-layer blocks inside a parameter-shaped arena.
  struct LayerOffsets {
    int64_t attn_norm, wqkv, bqkv, wo, mlp_norm, wgu, wdown;
  };
  std::vector<LayerOffsets> layer_off_;
  int64_t embed_off_ = 0, final_norm_off_ = 0, lm_head_off_ = 0;

  T* params_arena_ = nullptr;
  Master* master_ = nullptr;       // fp32 master weights of the trainable region when T is narrower (bf16); else null
  Master* grads_arena_ = nullptr;  // (num_trainable()); null with bf16 gradients
  bf16* grads16_ = nullptr;        // (num_trainable()) with bf16 gradients, else null
  Master* grad_stage_ = nullptr;   // with bf16 gradients: one tensor's or one layer's Master gradient
  int64_t grad_stage_elems_ = 0;
  Master* opt_m_ = nullptr;  // AdamW first moment / RMSprop square average
  Master* opt_v_ = nullptr;  // AdamW second moment
  int64_t step_ = 0;
  int micro_ = 0;
  // The largest clipped global gradient norm fed to the optimizer state since set_optimizer:
  // bounds every |g·clip| the moments have seen (sppo/optimizer_bound.h).
  double grad_peak_ = 0;

  MemoryReport mem_;
  std::vector<void*> owned_;
  // Per layer; with checkpoint_activations only resid_in is the layer's own, and every other
  // pointer is one shared set that the layer's recompute refills in the backward.
  std::vector<LayerActs> acts_;
  T* resid_out_ = nullptr;        // (N, C) residual after the last layer
  Master* rstd_final_ = nullptr;  // (N)
  T* hidden_ = nullptr;           // (N, C) final normed hidden states
  // Scratch reused by every layer.
  T* xn_ = nullptr;                 // (N, C) normed input to a projection
  T* ffn_ = nullptr;                // (N, F) swiglu output
  T* dresid_ = nullptr;             // (N, C) gradient of the residual stream
  T* dxn_ = nullptr;                // (N, C)
  T* dqkv_ = nullptr;               // (N, QKV)
  T* datt_ = nullptr;               // (N, H*D)
  T* dgu_ = nullptr;                // (N, 2F)
  T* dffn_ = nullptr;               // (N, F)
  T* lora_u_ = nullptr;             // (N, lora_max_slices_·rank) x·Aᵀ of one adapter block
  T* lora_du_ = nullptr;            // (N, lora_max_slices_·rank) its gradient
  Master* logits_chunk_ = nullptr;  // (logits_elems_) the only logits that ever exist in training
  T* gathered_h_ = nullptr;         // (N, C) final hidden rows that have a target
  T* gathered_dh_ = nullptr;        // (N, C)
  // Host side of the per-token index arrays, and their backend copies (uploaded per call).
  std::vector<int32_t> positions_;   // (N)
  std::vector<int32_t> row_index_;   // (N) token index of each gathered row
  std::vector<int32_t> targets_;     // (N) target token of each gathered row
  std::vector<double> logp_, coef_;  // (N) per gathered row
  int32_t *tokens_dev_ = nullptr, *positions_dev_ = nullptr, *row_index_dev_ = nullptr, *targets_dev_ = nullptr;
  double *logp_dev_ = nullptr, *lse_dev_ = nullptr, *coef_dev_ = nullptr;
  std::vector<double> seq_logp_, seq_grad_;  // (max_batch) per sequence
  int64_t logits_elems_ = 0;                 // size of logits_chunk_
  Master* rope_cos_ = nullptr;
  Master* rope_sin_ = nullptr;
};

// What a Model<T> of this config and plan would allocate, by category, without allocating
// anything: the model (and a generator, when `generator` is given) is built over the meta op set
// (ops/meta_ops.h) standing in for the backend `footprint` describes, so every number is the one
// its constructor counts. `optimizer` adds the state set_optimizer would allocate for that kind.
template <class T>
MemoryReport plan_memory(const ModelConfig& config, const MemoryPlan& plan, const LoraConfig& lora,
                         const BackendFootprint& footprint, const OptimizerConfig::Kind* optimizer,
                         const GeneratorPlan* generator);

// Rotary tables for positions [0, n_pos): cos/sin (n_pos, head_dim/2), with rope_scaling applied.
template <class T>
void build_rope_tables(const ModelConfig& c, int64_t n_pos, T* cos, T* sin);

// The model sizes used by tests and benchmarks (the PyTorch CPU baseline's `tiny` and `small`).
ModelConfig preset_config(const std::string& name);

}  // namespace sppo
