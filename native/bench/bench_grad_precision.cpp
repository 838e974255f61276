// What bf16 gradient accumulation costs in precision (docs/memory.md, "Gradients that do not cost
// a full fp32 copy"): the `small` preset's gradients over 32 micro-batches (the reference's
// global batch of 64 in micro-batches of 2) summed into a float64 reference, a float32 buffer
// (today's engine), a bf16 buffer rounded to nearest after each micro-batch (what a bf16 gradient
// GEMM with beta = 1 writes), and one rounded stochastically. Prints each sum's relative L2 error
// and its global norm's relative error (what clipping sees), beside the floor: the float64 sum
// rounded to bf16 once.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <cstdio>
#include <memory>
#include <vector>

#include "core/bf16.h"
#include "core/rng.h"
#include "cpu/cpu_ops.h"
#include "sppo/model.h"
#include "tests/harness.h"

using namespace sppo;

namespace {

// bf16 of x rounded toward or away from zero with probability proportional to the distance (its
// low 16 bits against a uniform 16-bit draw): unbiased.
float stochastic_bf16(float x, double u) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  const uint32_t low = bits & 0xffffu;
  bits &= 0xffff0000u;
  if (double(low) > u * 65536.0) bits += 0x10000u;
  float r;
  std::memcpy(&r, &bits, 4);
  return r;
}

}  // namespace

SPPO_BENCH(grad_accum_precision) {
  const ModelConfig c = preset_config("small");
  const int B = 2, Tn = 128, micro = 32;
  Model<float> m(c, MemoryPlan{B, Tn}, std::make_unique<cpu::CpuOps<float>>());
  const int64_t n = m.num_params();
  std::vector<double> ref(n, 0.0);
  std::vector<float> f32(n, 0.0f), nearest(n, 0.0f), stochastic(n, 0.0f);
  std::vector<int32_t> tokens(size_t(B) * Tn);
  for (int k = 0; k < micro; ++k) {
    for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = int32_t(uniform01(11, k, i) * c.vocab_size);
    m.zero_grad();
    m.accumulate_gradients({tokens.data(), nullptr, B, Tn}, 1.0 / micro);
    const float* g = m.grad_data();
    for (int64_t i = 0; i < n; ++i) {
      ref[i] += double(g[i]);
      f32[i] += g[i];
      nearest[i] = float(bf16(nearest[i] + g[i]));
      stochastic[i] = stochastic_bf16(stochastic[i] + g[i], uniform01(12, k, uint64_t(i)));
    }
  }
  double ref2 = 0;
  for (double x : ref) ref2 += x * x;
  auto report = [&](const char* name, auto&& value) {
    double err2 = 0, norm2 = 0;
    for (int64_t i = 0; i < n; ++i) {
      const double v = value(i);
      err2 += (v - ref[i]) * (v - ref[i]);
      norm2 += v * v;
    }
    std::printf("  %-36s relative L2 error %.2e   global norm off by %+.2e\n", name, std::sqrt(err2 / ref2),
                std::sqrt(norm2 / ref2) - 1);
  };
  std::printf("small preset (%lld parameters), %d micro-batches of %d x %d tokens:\n", (long long)n, micro, B, Tn);
  report("float32 accumulation (today)", [&](int64_t i) { return double(f32[i]); });
  report("bf16 once, at the end (the floor)", [&](int64_t i) { return double(float(bf16(float(ref[i])))); });
  report("bf16 accumulation, round to nearest", [&](int64_t i) { return double(nearest[i]); });
  report("bf16 accumulation, stochastic", [&](int64_t i) { return double(stochastic[i]); });
  std::fflush(stdout);
}
