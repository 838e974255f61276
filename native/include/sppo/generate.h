// Batched sampling with a KV cache over a trained Model's weights: prefill and decode are one
// "extend" step over a flat list of rows (one new token of some cached sequence each), so prompts
// of any lengths share a step without padding, and finished sequences stop costing compute.
#pragma once
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <unordered_set>
#include <vector>

#include "ops/ops.h"
#include "sppo/model.h"

namespace sppo {

// What the generator plans memory for: a KV cache of max_batch sequences x max_context tokens
// (prompt + generated). More sequences than max_batch are run in waves as slots free up.
struct GeneratorPlan {
  int max_batch = 0;
  int max_context = 0;
};

struct SamplingOptions {
  int64_t max_new_tokens = -1;  // -1: until a stop token or the context is full
  double temperature = 1.0;     // 0: greedy (argmax, ties to the lowest id)
  int64_t top_k = 0;            // 0: off; ties at the k-th logit are kept, as Hugging Face does
  double top_p = 1.0;           // nucleus over the temperature-scaled distribution, after top-k
  std::vector<int32_t> stop_tokens;
  void validate() const;
};

// One sequence to generate: its prompt and where its random numbers come from. Draw t of the
// sequence is uniform01(seed, stream, t), so its tokens do not depend on the rest of the batch
// (exactly on the CPU; on CUDA up to the last-bit logit differences noted at Generator).
struct SequenceRequest {
  const int32_t* prompt = nullptr;
  int64_t prompt_len = 0;
  uint64_t seed = 0;
  uint64_t stream = 0;  // e.g. the sample index among the samples of one prompt
};

enum class StopReason { StopToken, MaxTokens, Aborted, ContextFull };
const char* stop_reason_name(StopReason r);

struct SequenceResult {
  std::vector<int32_t> tokens;   // new tokens, a stop token included as the last one
  std::vector<double> logprobs;  // log softmax of the raw logits (temperature 1, no truncation)
  StopReason reason = StopReason::MaxTokens;
};

// One sampled token, as streamed after each step.
struct TokenEvent {
  int64_t sequence;
  int32_t token;
  double logprob;
};

// The host-facing face of Generator<T>, whatever the backend (Model::make_generator makes one).
class GeneratorApi {
 public:
  virtual ~GeneratorApi() = default;
  virtual const GeneratorPlan& plan() const = 0;
  virtual size_t memory_bytes() const = 0;
  // Throws sppo::Error naming the sequence, position and value of the first bad input.
  virtual void validate(const std::vector<SequenceRequest>& seqs, const SamplingOptions& o) const = 0;
  // Generates every sequence. `abort` (may be null) is read between steps; once set, every
  // unfinished sequence ends with StopReason::Aborted and what it has so far. `on_step` (may be
  // null) receives the tokens sampled by each step.
  virtual std::vector<SequenceResult> generate(
      const std::vector<SequenceRequest>& seqs, const SamplingOptions& o, const std::atomic<bool>* abort = nullptr,
      const std::function<void(const std::vector<TokenEvent>&)>& on_step = {}) = 0;
};

template <class T>
class Generator final : public GeneratorApi {
 public:
  using Master = master_t<T>;
  // Reads the model's weights at each step (the model must outlive the generator and not train
  // during generate; the model synchronizes its op set after every weight change, so the
  // generator's op set sees finished weights). `ops` is the generator's own op set, of the
  // model's backend. On CUDA a row's logits may differ in the last bits with the number of rows
  // in the step (cuBLASLt picks kernels per shape); the CPU's do not.
  Generator(const Model<T>& model, GeneratorPlan plan, std::unique_ptr<Ops<T>> ops);
  ~Generator();
  Generator(const Generator&) = delete;
  Generator& operator=(const Generator&) = delete;

  const GeneratorPlan& plan() const override { return plan_; }
  size_t memory_bytes() const override { return bytes_; }
  void validate(const std::vector<SequenceRequest>& seqs, const SamplingOptions& o) const override;
  std::vector<SequenceResult> generate(
      const std::vector<SequenceRequest>& seqs, const SamplingOptions& o, const std::atomic<bool>* abort = nullptr,
      const std::function<void(const std::vector<TokenEvent>&)>& on_step = {}) override;

  // For tests: one extend step over n rows (slot, position, token), writing every row's
  // logits (n, V) to host memory. n is at most max_batch + 256.
  void extend_for_test(const int32_t* slots, const int32_t* positions, const int32_t* tokens, int64_t n,
                       Master* logits_out);

 private:
  // One step over the n_rows rows (slot, position, token) in slots_/positions_/tokens_: leaves
  // every row's final-normed hidden state in xn_, and logits (n_logit_rows, V) of the rows listed
  // in logit_rows_ in logits_.
  void extend(int64_t n_rows, int64_t n_logit_rows);
  template <class E>
  E* alloc(size_t n);

  const Model<T>& model_;
  ModelConfig cfg_;
  GeneratorPlan plan_;
  std::unique_ptr<Ops<T>> ops_;
  int64_t max_rows_ = 0;  // rows per extend step (long prompts are prefilled in chunks)
  size_t bytes_ = 0;
  std::vector<void*> owned_;

  std::vector<T*> k_cache_, v_cache_;  // per layer (max_batch, KV, max_context, D)
  Master* rope_cos_ = nullptr;         // (max_context, D/2)
  Master* rope_sin_ = nullptr;
  T* x_ = nullptr;                                   // (R, C) residual stream
  T* xn_ = nullptr;                                  // (R, C) normed input to a projection
  Master* rstd_ = nullptr;                           // (R)
  T* qkv_ = nullptr;                                 // (R, QKV)
  T* att_ = nullptr;                                 // (R, H*D)
  T* gu_ = nullptr;                                  // (R, 2F)
  T* ffn_ = nullptr;                                 // (R, F)
  T* hsel_ = nullptr;                                // (max_batch, C) hidden rows that need logits
  Master* logits_ = nullptr;                         // (max_batch, V)
  std::vector<int32_t> slots_, positions_, tokens_;  // (R) the rows of the current step
  std::vector<int32_t> logit_rows_;                  // (max_batch) rows whose logits are wanted
  std::vector<int32_t> step_host_;                   // the four above packed for one upload
  int32_t* step_dev_ = nullptr;                      // (3R + max_batch) their backend copy
  // Row counts of pure decode steps run so far: such a step is recorded as a graph the second
  // time its row count occurs (the first run sizes every scratch buffer it uses).
  std::unordered_set<int64_t> decode_sizes_seen_;
};

}  // namespace sppo
