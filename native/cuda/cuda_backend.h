// What the rest of the engine sees of the CUDA backend: a probe and a factory. This header and
// its implementation exist in every build; without a CUDA compiler (or with SPPO_CUDA=OFF) the
// probe says so and the factory refuses, so callers need no #ifdefs.
#pragma once
#include <cstddef>
#include <memory>
#include <string>

#include "ops/meta_ops.h"
#include "ops/ops.h"

namespace sppo::cuda {

struct DeviceInfo {
  bool built = false;      // the addon was compiled with the CUDA backend
  bool available = false;  // a usable device is present (driver loaded, device 0 answers)
  std::string why_not;     // when !available: why, in words (no driver, no device, no cuBLASLt ...)
  std::string name;        // e.g. "NVIDIA H100 80GB HBM3"
  int sm_major = 0, sm_minor = 0;
  size_t total_memory = 0, free_memory = 0;
  int runtime_version = 0, driver_version = 0;
};

// What the CUDA op set sets aside besides the tensors asked for, known without a device: CudaOps
// reads it, and Model::plan plans a GPU model from it on any machine. The head's tile is 256 MiB
// of fp32 logits: at V = 128256 that is ~520 rows, so its GEMMs are not starved (the CPU's
// 4 Mi-element tile would give 32-row GEMMs). Attention needs no planned scratch.
inline BackendFootprint footprint() {
  return {"cuda", int64_t(1) << 26, [](int64_t, int64_t) { return size_t(0); }};
}

// Never throws; cheap after the first call.
DeviceInfo probe();

// The bf16 op set on device `device` (its own stream and cuBLASLt handle). Throws sppo::Error
// saying why when no device is usable.
// record_graphs = false makes graph_capture_begin always refuse (Ops::graph_capture_begin), as
// SPPO_CUDA_GRAPHS=0 does for every op set: tests compare recorded steps with eager ones so.
std::unique_ptr<Ops<bf16>> make_ops(int device = 0, bool record_graphs = true);

// The fp32 encoder op set on device `device`: fp32 storage and math, GEMMs without TF32, for
// PairRM's precision 'fp32' on a GPU (parity with the float32 reference). Only the encoder's
// ops (EncoderOps); throws as make_ops does when no device is usable.
std::unique_ptr<EncoderOps<float>> make_encoder_ops_fp32(int device = 0);

}  // namespace sppo::cuda
