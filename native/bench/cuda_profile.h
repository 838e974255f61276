// A per-phase time breakdown of the CUDA backend for the GPU benchmark (bench_cuda.cpp): an op
// set that forwards every call to a real CudaOps and brackets it with CUDA events on that op
// set's stream, so each op family's device time is measured without ncu or nsys (the GPU
// machine has no nsys, and ncu serialises kernels). GEMMs are attributed to their role (qkv,
// o_proj, gate_up, down) and direction (forward, data gradient, weight gradient) from their
// shapes and the model config. Event timing adds a few microseconds of host time per op: small
// against a training step, visible in a host-bound decode step (where that is the finding).
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "ops/ops.h"
#include "sppo/config.h"

namespace sppo::bench {

// Accumulated device time, call count and work per phase. Shared by an op set and its fresh()
// children (a model's generator), so one profile covers both.
struct PhaseTotals {
  double ms = 0;
  int64_t calls = 0;
  double flops = 0;  // tensor work (GEMM, attention, head); 0 for memory-bound phases
  double bytes = 0;  // compulsory memory traffic (each tensor read or written once)
};

class OpProfile {
 public:
  // Starts a measurement window: clears the totals.
  void reset();
  // Waits for every recorded event and folds the elapsed times into the totals.
  void collect();
  const std::map<std::string, PhaseTotals>& phases() const { return phases_; }
  // The model's embedding table (Model::embedding()), set once the model exists: a gather_rows
  // from it is the embedding lookup, timed as "embedding forward".
  const void* embedding_table = nullptr;

  // Used by the profiled op set.
  struct Pending {
    std::string phase;
    int slot;  // index of its event pair
    double flops, bytes;
  };
  int take_slot();
  void add(Pending p) { pending_.push_back(std::move(p)); }
  void* start_event(int slot) const { return events_[size_t(slot)].first; }
  void* stop_event(int slot) const { return events_[size_t(slot)].second; }
  ~OpProfile();

 private:
  std::vector<std::pair<void*, void*>> events_;  // cudaEvent_t pairs, reused across windows
  int used_ = 0;
  std::vector<Pending> pending_;
  std::map<std::string, PhaseTotals> phases_;
};

// The profiled op set over a new CudaOps on `device`.
std::unique_ptr<Ops<bf16>> make_profiled_ops(int device, const ModelConfig& cfg, std::shared_ptr<OpProfile> profile);

// Prints the table: each phase's ms per unit (a step), share of `wall_ms`, and achieved TFLOP/s or
// GB/s against the ceilings measured in the same job; the unattributed rest of the wall time is
// reported as host gaps (launch overhead, host work, synchronisation waits).
void print_breakdown(const char* title, const OpProfile& p, double units, double wall_ms, double tflops_ceiling,
                     double tbs_ceiling);

}  // namespace sppo::bench
