// The meta op set: allocates and computes nothing, so that a Model (or Generator) built over it
// runs its constructor's own allocation sequence and reports, through its memory counters, what
// it would take on the backend it stands in for (PyTorch calls this the meta device). It is how
// Model::plan sizes a model for a GPU on a machine without one: the byte counts come from the
// allocating code itself, never from a second formula that could drift from it.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "core/error.h"
#include "ops/ops.h"

namespace sppo {

// What a backend sets aside besides the tensors its callers ask for, known without its device:
// each backend states its own (cpu/cpu_ops.h, cuda/cuda_backend.h), and its op set reads the same.
struct BackendFootprint {
  const char* name;                                                        // the backend's name, as Ops::name gives it
  int64_t head_scratch_elems;                                              // Ops::head_scratch_elems
  std::function<size_t(int64_t max_seq, int64_t head_dim)> scratch_bytes;  // what plan_scratch sets aside
  // Ops::packed_weight_bytes; empty: the backend packs no weights.
  std::function<size_t(int64_t n, int64_t k)> packed_weight_bytes = {};
};

template <class T>
class MetaOps final : public Ops<T> {
 public:
  using Master = master_t<T>;
  explicit MetaOps(BackendFootprint f) : f_(std::move(f)) {}
  const char* name() const override { return f_.name; }
  std::unique_ptr<Ops<T>> fresh() const override { return std::make_unique<MetaOps<T>>(f_); }
  int64_t head_scratch_elems() const override { return f_.head_scratch_elems; }

  // Every allocation is the same dummy block: callers only keep and compare the pointers (against
  // null); the uploads and fills a constructor makes are dropped below.
  void* alloc_bytes(size_t) override { return block_; }
  void free_bytes(void*) override {}
  size_t plan_scratch(int64_t max_seq, int64_t head_dim) override { return f_.scratch_bytes(max_seq, head_dim); }
  size_t packed_weight_bytes(int64_t n, int64_t k) const override {
    return f_.packed_weight_bytes ? f_.packed_weight_bytes(n, k) : 0;
  }
  void upload_bytes(void*, const void*, size_t) override {}
  void download_bytes(void*, const void*, size_t) override { refuse(); }
  void upload(T*, const Master*, int64_t) override {}
  void download(Master*, const T*, int64_t) override { refuse(); }
  void cast(T*, const Master*, int64_t) override {}
  void fill(T*, double, int64_t) override {}
  void zero_bytes(void*, size_t) override {}
  void copy(T*, const T*, int64_t) override {}

  // Nothing below can run without data.
  void gemm(bool, bool, int64_t, int64_t, int64_t, double, const T*, int64_t, const T*, int64_t, double, T*,
            int64_t) override {
    refuse();
  }
  void gemm_master(bool, bool, int64_t, int64_t, int64_t, double, const T*, int64_t, const T*, int64_t, double, Master*,
                   int64_t) override {
    refuse();
  }
  double sum_squares(const Master*, int64_t) override { refuse(); }
  bool all_finite(const Master*, int64_t) override { refuse(); }
  void embedding_backward(Master*, const T*, const int32_t*, int64_t, int64_t) override { refuse(); }
  void gather_rows(T*, const T*, const int32_t*, int64_t, int64_t) override { refuse(); }
  void scatter_rows(T*, const T*, const int32_t*, int64_t, int64_t) override { refuse(); }
  void rmsnorm_forward(T*, Master*, const T*, const T*, int64_t, int64_t, double) override { refuse(); }
  void rmsnorm_backward(T*, Master*, const T*, const T*, const T*, const Master*, int64_t, int64_t) override {
    refuse();
  }
  void add_bias(T*, const T*, int64_t, int64_t, int64_t) override { refuse(); }
  void bias_backward(Master*, const T*, int64_t, int64_t, int64_t) override { refuse(); }
  void rope(T*, int64_t, int64_t, int64_t, int64_t, int64_t, const int32_t*, const Master*, const Master*,
            bool) override {
    refuse();
  }
  void attention_forward(T*, Master*, const T*, const AttentionShape&) override { refuse(); }
  void attention_backward(T*, const T*, const T*, const T*, const Master*, const AttentionShape&) override { refuse(); }
  void swiglu_forward(T*, const T*, int64_t, int64_t) override { refuse(); }
  void swiglu_backward(T*, const T*, const T*, int64_t, int64_t) override { refuse(); }
  void head_logprobs(double*, double*, const T*, const T*, const int32_t*, int64_t, int64_t, int64_t, Master*,
                     int64_t) override {
    refuse();
  }
  void head_logprobs_backward(T*, Master*, const T*, const T*, const int32_t*, const double*, const double*, int64_t,
                              int64_t, int64_t, Master*, int64_t) override {
    refuse();
  }
  void adamw_update(T*, Master*, const Master*, Master*, Master*, int64_t, double, double, double, double, double,
                    double, int64_t) override {
    refuse();
  }
  void rmsprop_update(T*, Master*, const Master*, Master*, int64_t, double, double, double, double, double) override {
    refuse();
  }
  bool adamw_update_finite(const T*, const Master*, const Master*, const Master*, const Master*, int64_t, double,
                           double, double, double, double, double, int64_t) override {
    refuse();
  }
  bool rmsprop_update_finite(const T*, const Master*, const Master*, const Master*, int64_t, double, double, double,
                             double, double) override {
    refuse();
  }
  void add_round(bf16*, const Master*, int64_t) override { refuse(); }
  double sum_squares(const bf16*, int64_t) override { refuse(); }
  void adamw_update(T*, Master*, const bf16*, Master*, Master*, int64_t, double, double, double, double, double, double,
                    int64_t) override {
    refuse();
  }
  void rmsprop_update(T*, Master*, const bf16*, Master*, int64_t, double, double, double, double, double) override {
    refuse();
  }
  bool adamw_update_finite(const T*, const Master*, const bf16*, const Master*, const Master*, int64_t, double, double,
                           double, double, double, double, int64_t) override {
    refuse();
  }
  bool rmsprop_update_finite(const T*, const Master*, const bf16*, const Master*, int64_t, double, double, double,
                             double, double) override {
    refuse();
  }
  void kv_cache_write(T*, T*, const T*, const int32_t*, const int32_t*, int64_t, const AttentionShape&,
                      const KvBlocks&) override {
    refuse();
  }
  void attention_decode(T*, const T*, const T*, const T*, const int32_t*, const int32_t*, int64_t,
                        const AttentionShape&, const KvBlocks&) override {
    refuse();
  }
  void sample(int32_t*, double*, const Master*, int64_t, int64_t, const SamplingOptions&, const double*) override {
    refuse();
  }

 private:
  [[noreturn]] static void refuse() { throw Error("the meta op set only plans memory; it cannot compute"); }
  BackendFootprint f_;
  alignas(64) char block_[64] = {};
};

}  // namespace sppo
