// The profiled CUDA op set and the breakdown table (cuda_profile.h).
#include "bench/cuda_profile.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <utility>

#include "core/error.h"
#include "cuda/cuda_ops.cuh"

namespace sppo::bench {

namespace {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw Error(detail::concat("profiler: ", what, ": ", cudaGetErrorString(e)));
}

// Which projection a GEMM belongs to, from the weight's (rows, cols) as the model stores it.
std::string gemm_role(const ModelConfig& c, int64_t rows, int64_t cols) {
  const int64_t C = c.hidden_size, F = c.intermediate_size;
  if (rows == c.qkv_dim() && cols == C) return "qkv";
  if (rows == 2 * F && cols == C) return "gate_up";
  if (rows == C && cols == F) return "down";
  if (rows == C && cols == c.q_dim()) return "o_proj";
  if (rows == c.vocab_size && cols == C) return "lm_head";
  return "other";
}

class ProfiledOps final : public Ops<bf16> {
 public:
  ProfiledOps(std::unique_ptr<Ops<bf16>> inner, const ModelConfig& cfg, std::shared_ptr<OpProfile> profile)
      : inner_(std::move(inner)),
        stream_(dynamic_cast<cuda::CudaOps&>(*inner_).stream()),
        cfg_(cfg),
        profile_(std::move(profile)) {}

  const char* name() const override { return inner_->name(); }
  std::unique_ptr<Ops<bf16>> fresh() const override {
    return std::make_unique<ProfiledOps>(inner_->fresh(), cfg_, profile_);
  }
  int64_t head_scratch_elems() const override { return inner_->head_scratch_elems(); }
  void synchronize() override {
    timed("host<->device copies, syncs", 0, 0, [&] { inner_->synchronize(); });
  }
  void* alloc_bytes(size_t bytes) override { return inner_->alloc_bytes(bytes); }
  void free_bytes(void* p) override { inner_->free_bytes(p); }
  size_t plan_scratch(int64_t max_seq, int64_t head_dim) override { return inner_->plan_scratch(max_seq, head_dim); }
  void upload_bytes(void* dst, const void* src, size_t bytes) override {
    timed("host<->device copies, syncs", 0, double(bytes), [&] { inner_->upload_bytes(dst, src, bytes); });
  }
  void download_bytes(void* dst, const void* src, size_t bytes) override {
    timed("host<->device copies, syncs", 0, double(bytes), [&] { inner_->download_bytes(dst, src, bytes); });
  }
  void upload(bf16* dst, const float* src, int64_t n) override {
    timed("host<->device copies, syncs", 0, 6.0 * n, [&] { inner_->upload(dst, src, n); });
  }
  void download(float* dst, const bf16* src, int64_t n) override {
    timed("host<->device copies, syncs", 0, 6.0 * n, [&] { inner_->download(dst, src, n); });
  }
  void cast(bf16* dst, const float* src, int64_t n) override {
    timed("cast", 0, 6.0 * n, [&] { inner_->cast(dst, src, n); });
  }
  void gemm(bool tA, bool tB, int64_t M, int64_t N, int64_t K, double alpha, const bf16* A, int64_t lda, const bf16* B,
            int64_t ldb, double beta, bf16* C, int64_t ldc) override {
    timed(gemm_phase(tA, tB, M, N, K), 2.0 * M * N * K, gemm_bytes(M, N, K, 2, beta),
          [&] { inner_->gemm(tA, tB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc); });
  }
  void gemm_master(bool tA, bool tB, int64_t M, int64_t N, int64_t K, double alpha, const bf16* A, int64_t lda,
                   const bf16* B, int64_t ldb, double beta, float* C, int64_t ldc) override {
    timed(gemm_phase(tA, tB, M, N, K), 2.0 * M * N * K, gemm_bytes(M, N, K, 4, beta),
          [&] { inner_->gemm_master(tA, tB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc); });
  }
  void fill(bf16* x, double value, int64_t n) override {
    timed("fill, zero, copy", 0, 2.0 * n, [&] { inner_->fill(x, value, n); });
  }
  void zero_bytes(void* x, size_t bytes) override {
    timed("fill, zero, copy", 0, double(bytes), [&] { inner_->zero_bytes(x, bytes); });
  }
  void copy(bf16* dst, const bf16* src, int64_t n) override {
    timed("fill, zero, copy", 0, 4.0 * n, [&] { inner_->copy(dst, src, n); });
  }
  double sum_squares(const float* x, int64_t n) override {
    double r = 0;
    timed("gradient norm (sum of squares)", 0, 4.0 * n, [&] { r = inner_->sum_squares(x, n); });
    return r;
  }
  bool all_finite(const float* x, int64_t n) override {
    bool r = false;
    timed("finiteness checks", 0, 4.0 * n, [&] { r = inner_->all_finite(x, n); });
    return r;
  }
  void embedding_backward(float* dtable, const bf16* dout, const int32_t* ids, int64_t N, int64_t C) override {
    timed("embedding backward", 0, 10.0 * N * C, [&] { inner_->embedding_backward(dtable, dout, ids, N, C); });
  }
  void gather_rows(bf16* dst, const bf16* src, const int32_t* rows, int64_t n, int64_t C) override {
    timed(src == profile_->embedding_table ? "embedding forward" : "gather/scatter rows", 0, 4.0 * n * C,
          [&] { inner_->gather_rows(dst, src, rows, n, C); });
  }
  void scatter_rows(bf16* dst, const bf16* src, const int32_t* rows, int64_t n, int64_t C) override {
    timed("gather/scatter rows", 0, 4.0 * n * C, [&] { inner_->scatter_rows(dst, src, rows, n, C); });
  }
  void rmsnorm_forward(bf16* out, float* rstd, const bf16* x, const bf16* w, int64_t N, int64_t C,
                       double eps) override {
    timed("rmsnorm forward", 0, 4.0 * N * C + 4.0 * N, [&] { inner_->rmsnorm_forward(out, rstd, x, w, N, C, eps); });
  }
  void rmsnorm_backward(bf16* dx, float* dw, const bf16* dout, const bf16* x, const bf16* w, const float* rstd,
                        int64_t N, int64_t C) override {
    // dout and x read, dx read and written (it accumulates)
    timed("rmsnorm backward", 0, 8.0 * N * C + 4.0 * N,
          [&] { inner_->rmsnorm_backward(dx, dw, dout, x, w, rstd, N, C); });
  }
  void add_bias(bf16* x, const bf16* bias, int64_t N, int64_t C, int64_t ld) override {
    timed("bias", 0, 4.0 * N * C, [&] { inner_->add_bias(x, bias, N, C, ld); });
  }
  void bias_backward(float* dbias, const bf16* dout, int64_t N, int64_t C, int64_t ld) override {
    timed("bias", 0, 2.0 * N * C, [&] { inner_->bias_backward(dbias, dout, N, C, ld); });
  }
  void rope(bf16* x, int64_t N, int64_t ld, int64_t off, int64_t heads, int64_t head_dim, const int32_t* positions,
            const float* cos, const float* sin, bool inverse) override {
    timed("rope", 0, 4.0 * N * heads * head_dim,
          [&] { inner_->rope(x, N, ld, off, heads, head_dim, positions, cos, sin, inverse); });
  }
  void attention_forward(bf16* out, float* lse, const bf16* qkv, const AttentionShape& s) override {
    timed("attention forward", attention_flops(s), 0, [&] { inner_->attention_forward(out, lse, qkv, s); });
  }
  void attention_backward(bf16* dqkv, const bf16* dout, const bf16* qkv, const bf16* out, const float* lse,
                          const AttentionShape& s) override {
    // The FlashAttention papers' convention: the backward is 2.5x the forward's matmul work.
    timed("attention backward", 2.5 * attention_flops(s), 0,
          [&] { inner_->attention_backward(dqkv, dout, qkv, out, lse, s); });
  }
  void swiglu_forward(bf16* out, const bf16* gu, int64_t N, int64_t F) override {
    timed("swiglu forward", 0, 6.0 * N * F, [&] { inner_->swiglu_forward(out, gu, N, F); });
  }
  void swiglu_backward(bf16* dgu, const bf16* dout, const bf16* gu, int64_t N, int64_t F) override {
    timed("swiglu backward", 0, 10.0 * N * F, [&] { inner_->swiglu_backward(dgu, dout, gu, N, F); });
  }
  void head_logprobs(double* logp, double* lse, const bf16* H, const bf16* W, const int32_t* targets, int64_t n,
                     int64_t C, int64_t V, float* scratch, int64_t scratch_elems) override {
    timed("lm head + loss forward", 2.0 * n * V * C, 0,
          [&] { inner_->head_logprobs(logp, lse, H, W, targets, n, C, V, scratch, scratch_elems); });
  }
  void head_logprobs_backward(bf16* dH, float* dW, const bf16* H, const bf16* W, const int32_t* targets,
                              const double* lse, const double* coef, int64_t n, int64_t C, int64_t V, float* scratch,
                              int64_t scratch_elems) override {
    // Three GEMMs: the recomputed logits, dH and dW.
    timed("lm head + loss backward", 6.0 * n * V * C, 0,
          [&] { inner_->head_logprobs_backward(dH, dW, H, W, targets, lse, coef, n, C, V, scratch, scratch_elems); });
  }
  void adamw_update(bf16* p, float* master, const float* g, float* m, float* v, int64_t n, double lr, double beta1,
                    double beta2, double eps, double decay, double gscale, int64_t step) override {
    // p written; master, m, v read and written; g read.
    timed("optimizer", 0, 30.0 * n,
          [&] { inner_->adamw_update(p, master, g, m, v, n, lr, beta1, beta2, eps, decay, gscale, step); });
  }
  void rmsprop_update(bf16* p, float* master, const float* g, float* sq, int64_t n, double lr, double alpha, double eps,
                      double decay, double gscale) override {
    timed("optimizer", 0, 22.0 * n,
          [&] { inner_->rmsprop_update(p, master, g, sq, n, lr, alpha, eps, decay, gscale); });
  }
  bool adamw_update_finite(const bf16* p, const float* master, const float* g, const float* m, const float* v,
                           int64_t n, double lr, double beta1, double beta2, double eps, double decay, double gscale,
                           int64_t step) override {
    bool r = true;
    timed("optimizer dry run", 0, 18.0 * n,
          [&] { r = inner_->adamw_update_finite(p, master, g, m, v, n, lr, beta1, beta2, eps, decay, gscale, step); });
    return r;
  }
  bool rmsprop_update_finite(const bf16* p, const float* master, const float* g, const float* sq, int64_t n, double lr,
                             double alpha, double eps, double decay, double gscale) override {
    bool r = true;
    timed("optimizer dry run", 0, 14.0 * n,
          [&] { r = inner_->rmsprop_update_finite(p, master, g, sq, n, lr, alpha, eps, decay, gscale); });
    return r;
  }
  // The same with bf16 gradients (MemoryPlan::bf16_gradients): two bytes less read per element.
  void add_round(bf16* g, const float* x, int64_t n) override {
    timed("bf16 gradient accumulation", 0, 8.0 * n, [&] { inner_->add_round(g, x, n); });
  }
  double sum_squares(const bf16* x, int64_t n) override {
    double r = 0;
    timed("gradient norm (sum of squares)", 0, 2.0 * n, [&] { r = inner_->sum_squares(x, n); });
    return r;
  }
  void adamw_update(bf16* p, float* master, const bf16* g, float* m, float* v, int64_t n, double lr, double beta1,
                    double beta2, double eps, double decay, double gscale, int64_t step) override {
    timed("optimizer", 0, 28.0 * n,
          [&] { inner_->adamw_update(p, master, g, m, v, n, lr, beta1, beta2, eps, decay, gscale, step); });
  }
  void rmsprop_update(bf16* p, float* master, const bf16* g, float* sq, int64_t n, double lr, double alpha, double eps,
                      double decay, double gscale) override {
    timed("optimizer", 0, 20.0 * n,
          [&] { inner_->rmsprop_update(p, master, g, sq, n, lr, alpha, eps, decay, gscale); });
  }
  bool adamw_update_finite(const bf16* p, const float* master, const bf16* g, const float* m, const float* v, int64_t n,
                           double lr, double beta1, double beta2, double eps, double decay, double gscale,
                           int64_t step) override {
    bool r = true;
    timed("optimizer dry run", 0, 16.0 * n,
          [&] { r = inner_->adamw_update_finite(p, master, g, m, v, n, lr, beta1, beta2, eps, decay, gscale, step); });
    return r;
  }
  bool rmsprop_update_finite(const bf16* p, const float* master, const bf16* g, const float* sq, int64_t n, double lr,
                             double alpha, double eps, double decay, double gscale) override {
    bool r = true;
    timed("optimizer dry run", 0, 12.0 * n,
          [&] { r = inner_->rmsprop_update_finite(p, master, g, sq, n, lr, alpha, eps, decay, gscale); });
    return r;
  }
  void kv_cache_write(bf16* k_cache, bf16* v_cache, const bf16* qkv, const int32_t* slots, const int32_t* positions,
                      int64_t n, const AttentionShape& s, const KvBlocks& kv) override {
    timed("kv cache write", 0, 8.0 * n * s.kv_heads * s.head_dim,
          [&] { inner_->kv_cache_write(k_cache, v_cache, qkv, slots, positions, n, s, kv); });
  }
  void attention_decode(bf16* out, const bf16* qkv, const bf16* k_cache, const bf16* v_cache, const int32_t* slots,
                        const int32_t* positions, int64_t n, const AttentionShape& s, const KvBlocks& kv) override {
    // The positions are device memory, so the keys read are not known here: time only.
    timed("attention decode", 0, 0,
          [&] { inner_->attention_decode(out, qkv, k_cache, v_cache, slots, positions, n, s, kv); });
  }
  void sample(int32_t* tokens, double* raw_logprobs, const float* logits, int64_t n, int64_t V,
              const SamplingOptions& o, const double* u) override {
    timed("sampler (incl. token download)", 0, 4.0 * n * V,
          [&] { inner_->sample(tokens, raw_logprobs, logits, n, V, o, u); });
  }

 private:
  template <class F>
  void timed(const char* phase, double flops, double bytes, F&& f) {
    timed(std::string(phase), flops, bytes, std::forward<F>(f));
  }
  template <class F>
  void timed(std::string phase, double flops, double bytes, F&& f) {
    const int slot = profile_->take_slot();
    check(cudaEventRecord(static_cast<cudaEvent_t>(profile_->start_event(slot)), stream_), "event record");
    f();
    check(cudaEventRecord(static_cast<cudaEvent_t>(profile_->stop_event(slot)), stream_), "event record");
    profile_->add({std::move(phase), slot, flops, bytes});
  }
  std::string gemm_phase(bool tA, bool tB, int64_t M, int64_t N, int64_t K) const {
    // Forward Y = X·Wᵀ (W is N×K); data gradient dX = dY·W (W is K×N); weight gradient dW = dYᵀ·X (dW is M×N).
    if (!tA && tB) return "gemm " + gemm_role(cfg_, N, K) + " forward";
    if (!tA && !tB) return "gemm " + gemm_role(cfg_, K, N) + " data grad";
    if (tA && !tB) return "gemm " + gemm_role(cfg_, M, N) + " weight grad";
    return "gemm other";
  }
  static double gemm_bytes(int64_t M, int64_t N, int64_t K, int c_size, double beta) {
    return 2.0 * (M * K + K * N) + double(c_size) * M * N * (beta != 0 ? 2 : 1);
  }
  static double attention_flops(const AttentionShape& s) {
    // QKᵀ and PV over the causal half: 2 matmuls × 2·T·T/2·D per (batch, head).
    return 2.0 * s.batch * s.heads * double(s.seq) * double(s.seq) * s.head_dim;
  }

  std::unique_ptr<Ops<bf16>> inner_;
  cudaStream_t stream_;
  ModelConfig cfg_;
  std::shared_ptr<OpProfile> profile_;
};

}  // namespace

OpProfile::~OpProfile() {
  for (auto& [a, b] : events_) {
    cudaEventDestroy(static_cast<cudaEvent_t>(a));
    cudaEventDestroy(static_cast<cudaEvent_t>(b));
  }
}

void OpProfile::reset() {
  collect();
  phases_.clear();
}

int OpProfile::take_slot() {
  if (used_ == int(events_.size())) {
    cudaEvent_t a, b;
    check(cudaEventCreate(&a), "event create");
    check(cudaEventCreate(&b), "event create");
    events_.emplace_back(a, b);
  }
  return used_++;
}

void OpProfile::collect() {
  for (const Pending& p : pending_) {
    auto a = static_cast<cudaEvent_t>(events_[size_t(p.slot)].first);
    auto b = static_cast<cudaEvent_t>(events_[size_t(p.slot)].second);
    check(cudaEventSynchronize(b), "event synchronize");
    float ms = 0;
    check(cudaEventElapsedTime(&ms, a, b), "event elapsed time");
    PhaseTotals& t = phases_[p.phase];
    t.ms += ms, t.calls += 1, t.flops += p.flops, t.bytes += p.bytes;
  }
  pending_.clear();
  used_ = 0;
}

std::unique_ptr<Ops<bf16>> make_profiled_ops(int device, const ModelConfig& cfg, std::shared_ptr<OpProfile> profile) {
  return std::make_unique<ProfiledOps>(cuda::make_ops(device), cfg, std::move(profile));
}

void print_breakdown(const char* title, const OpProfile& p, double units, double wall_ms, double tflops_ceiling,
                     double tbs_ceiling) {
  std::vector<std::pair<std::string, PhaseTotals>> rows(p.phases().begin(), p.phases().end());
  std::sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) { return a.second.ms > b.second.ms; });
  std::printf("breakdown: %s (%.3f ms per step of wall time)\n", title, wall_ms);
  std::printf("  %-34s %9s %7s %7s %18s\n", "phase", "ms/step", "% step", "calls", "achieved (% ceiling)");
  double sum = 0;
  for (const auto& [name, t] : rows) {
    const double ms = t.ms / units;
    sum += ms;
    char rate[64] = "";
    if (t.flops > 0) {
      const double tf = t.flops / (t.ms * 1e-3) / 1e12;
      std::snprintf(rate, sizeof rate, "%.0f TFLOP/s (%.0f%%)", tf, 100 * tf / tflops_ceiling);
    } else if (t.bytes > 0) {
      const double gb = t.bytes / (t.ms * 1e-3) / 1e9;
      std::snprintf(rate, sizeof rate, "%.0f GB/s (%.0f%%)", gb, 100 * gb / (tbs_ceiling * 1e3));
    }
    std::printf("  %-34s %9.3f %6.1f%% %7.0f %18s\n", name.c_str(), ms, 100 * ms / wall_ms, t.calls / units, rate);
  }
  std::printf("  %-34s %9.3f %6.1f%%\n", "host gaps (launches, host work)", wall_ms - sum,
              100 * (wall_ms - sum) / wall_ms);
  std::fflush(stdout);
}

}  // namespace sppo::bench
