// Batched sampling with a paged KV cache over a trained Model's weights: prefill and decode are
// one "extend" step over a flat list of rows (one new token of some cached sequence each), so
// prompts of any lengths share a step without padding, and finished sequences stop costing
// compute. The cache is a pool of fixed-size blocks; each sequence in flight has a block table
// that grows as it does, and the samples of one prompt share the prompt's blocks (prefilled
// once, then forked, copy-on-write), as vLLM's block manager does.
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

// What the generator plans memory for. max_batch bounds the sequences in flight (the rows of a
// decode step and their logits); the KV cache is a pool of kv_cache_bytes, cut into blocks of
// kKvBlockSize positions (all layers' keys and values). The pool, not max_batch x max_context,
// decides how many sequences fit at once: a sequence is admitted when the blocks it may need
// (its prompt + maxNewTokens, or up to max_context) are free, and waits otherwise.
struct GeneratorPlan {
  int max_batch = 0;
  int max_context = 0;
  // 0: room for max_batch sequences of max_context tokens each (the pool a slot-per-sequence
  // cache would hold); otherwise the budget, rounded down to whole blocks.
  int64_t kv_cache_bytes = 0;
  // Sequences of one generate call with identical prompts share the prompt's blocks (one
  // prefill per distinct prompt). Off: every sequence prefills and holds its own prompt.
  bool share_prefixes = true;
  // Where the backend has a packed weight layout (the CPU's float GEMM), the generator keeps a
  // packed copy of every projection and the LM head (the weights' size again, in its memory and
  // its plan), packed once per generate call at its first decode step of enough rows; the decode
  // steps then skip packing W, ~20% of a step's time. Rows are bit-identical either way.
  bool pack_weights = true;
};

constexpr int64_t kKvBlockSize = 16;  // positions per KV-cache block

// The pool's state: blocks in all, free, and promised to sequences in flight (admitted
// sequences reserve the blocks they may still need, so a sequence in flight never waits).
struct KvPoolState {
  int64_t blocks = 0, free = 0, reserved = 0;
};

// What the last generate call did (for tests and benchmarks).
struct GenerateStats {
  int64_t steps = 0;
  int64_t prompt_rows = 0;     // rows that cached prompt tokens (the prefill's work)
  int64_t generated_rows = 0;  // rows that cached sampled tokens
  int64_t shared_prompts = 0;  // prompt prefixes prefilled once for several sequences
  int64_t copied_blocks = 0;   // copy-on-write copies of a shared prompt's last block
  int64_t peak_blocks = 0;     // most blocks in use at once
  int64_t peak_sequences = 0;  // most sequences in flight at once
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
  virtual const GeneratorPlan& plan() const = 0;  // kv_cache_bytes as planned: whole blocks
  virtual size_t memory_bytes() const = 0;
  virtual int64_t kv_blocks() const = 0;
  virtual size_t kv_block_bytes() const = 0;  // one block: every layer's keys and values
  virtual KvPoolState pool_state() const = 0;
  virtual const GenerateStats& last_stats() const = 0;
  // Throws sppo::Error naming the sequence, position and value of the first bad input, or the
  // sequence that alone needs more blocks than the pool holds.
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
  int64_t kv_blocks() const override { return kv_blocks_; }
  size_t kv_block_bytes() const override { return block_bytes_; }
  KvPoolState pool_state() const override { return {kv_blocks_, int64_t(free_.size()), reserved_}; }
  const GenerateStats& last_stats() const override { return stats_; }
  void validate(const std::vector<SequenceRequest>& seqs, const SamplingOptions& o) const override;
  std::vector<SequenceResult> generate(
      const std::vector<SequenceRequest>& seqs, const SamplingOptions& o, const std::atomic<bool>* abort = nullptr,
      const std::function<void(const std::vector<TokenEvent>&)>& on_step = {}) override;

  // For tests: one extend step over n rows (slot, position, token), writing every row's
  // logits (n, V) to host memory. n is at most max_batch + 256. Slot s's block j is block
  // j * max_batch + s of the pool (interleaved, so a slot's blocks are far apart); needs the
  // default pool.
  void extend_for_test(const int32_t* slots, const int32_t* positions, const int32_t* tokens, int64_t n,
                       Master* logits_out);

 private:
  // One step over the n_rows rows (slot, position, token) in slots_/positions_/tokens_: leaves
  // every row's final-normed hidden state in xn_, and logits (n_logit_rows, V) of the rows listed
  // in logit_rows_ in logits_.
  void extend(int64_t n_rows, int64_t n_logit_rows);
  // x(N, in)·Wᵀ into C(N, out) (+ beta·C): through the packed copy of W once this call has packed
  // it, else the plain GEMM (the same bits either way).
  template <class Out>
  void project(int64_t N, int64_t out, int64_t in, const T* x, const T* W, const void* packed, double beta, Out* C);
  template <class E>
  E* alloc(size_t n);

  // A place for one sequence in flight: its tokens so far (prompt + generated), how many of them
  // are cached, and its block table (row `index` of tables_). A slot takes part in a step only
  // while it has uncached tokens.
  struct Slot {
    int64_t seq = -1;  // -1: free
    int64_t group = -1;
    std::vector<int32_t> text;
    int64_t cached = 0;
    int64_t shared = 0;    // leading positions it shares with its prompt group (0: none)
    bool leader = false;   // it prefills the shared positions for the group
    int64_t reserved = 0;  // blocks promised to it, not yet taken
  };
  // The sequences of one call with identical prompts. While samples remain to start, the group
  // holds its prompt's first prompt_len - 1 positions (the prefix) in prefix_blocks; each
  // sample computes the last prompt token itself (so its first logits are its own row's) and
  // copies the prefix's partial last block before writing into it.
  struct PromptGroup {
    std::vector<int64_t> members;  // sequence indices, in order
    size_t started = 0;            // members admitted so far
    std::vector<int32_t> prefix_blocks;
    int64_t prefix_len = 0;
    bool holds_prefix = false;
    bool prefix_ready = false;  // every prefix position is cached
  };
  // The pool: blocks are taken from free_ and come back when no table refers to them.
  int32_t take_block(Slot& s);
  void drop_block(int32_t b);
  // Makes position `pos` of slot `si` writable: a block for it, or a private copy of a block the
  // slot shares past its shared prefix (copy-on-write).
  void prepare_block(std::vector<Slot>& slots, int64_t si, int64_t pos);
  void release_slot(Slot& s, int64_t si);
  void release_prefix(PromptGroup& g);

  const Model<T>& model_;
  ModelConfig cfg_;
  GeneratorPlan plan_;
  std::unique_ptr<Ops<T>> ops_;
  int64_t max_rows_ = 0;  // rows per extend step (long prompts are prefilled in chunks)
  size_t bytes_ = 0;
  std::vector<void*> owned_;

  int64_t kv_blocks_ = 0;              // blocks in the pool
  int64_t max_blocks_ = 0;             // table entries per slot: ceil(max_context / kKvBlockSize)
  size_t block_bytes_ = 0;             // one block, all layers, keys and values
  std::vector<T*> k_cache_, v_cache_;  // per layer (kv_blocks, KV, kKvBlockSize, D)
  // Packed copies (Ops::pack_weight) of each layer's wqkv, wo, wgu, wdown and of the LM head;
  // empty without them. packed_now_: packed during this generate call (weights may change between
  // calls, never during one).
  struct PackedLayer {
    void *wqkv, *wo, *wgu, *wdown;
  };
  std::vector<PackedLayer> packed_;
  void* packed_head_ = nullptr;
  bool packed_now_ = false;
  std::vector<int32_t> tables_;    // (max_batch, max_blocks) each slot's blocks; -1: none yet
  int32_t* tables_dev_ = nullptr;  // their backend copy, at a fixed address (graphs read it)
  bool tables_dirty_ = true;       // tables_ changed since the last upload
  std::vector<int32_t> free_;      // free block ids (a stack)
  std::vector<int32_t> refs_;      // (kv_blocks) tables and prompt groups referring to each block
  int64_t reserved_ = 0;           // blocks promised to sequences in flight, not yet taken
  GenerateStats stats_;
  Master* rope_cos_ = nullptr;  // (max_context, D/2)
  Master* rope_sin_ = nullptr;
  T* x_ = nullptr;                                   // (R, C) residual stream
  T* xn_ = nullptr;                                  // (R, C) normed input to a projection
  Master* rstd_ = nullptr;                           // (R)
  T* qkv_ = nullptr;                                 // (R, QKV)
  T* att_ = nullptr;                                 // (R, H*D)
  T* gu_ = nullptr;                                  // (R, 2F)
  T* ffn_ = nullptr;                                 // (R, F)
  T* lora_u_ = nullptr;                              // (R, slices·rank) an adapter block's x·Aᵀ
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
