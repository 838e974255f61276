// The CUDA backend's core ops (native/cuda/cuda_ops.cu, cuda_gemm.cu) against the CPU backend
// in float, on fresh random inputs. Inputs are rounded to bf16 first so both backends see the same
// values; overwritten outputs are poisoned with NaN first, "+=" outputs start from random values.
// Each check prints |out - ref| / |ref| (and the largest element error relative to max |ref|).
//
// Tolerances (relative to the norm of the reference):
//   exact copies (embedding, gather/scatter, cast, fill, upload/download)   0 (bit-identical)
//   bf16 outputs of fp32 math (rmsnorm, rope, swiglu, bias, bf16 GEMM)      1e-2 (bf16 keeps 8 bits: ~2e-3)
//   float outputs of fp32 / fp64 math (rstd, dw, dbias, optimizer state)    1e-5
//   embedding_backward (float, same summation order as the CPU)             0 (bit-identical)
//   GEMM with bf16 inputs, fp32 accumulation into fp32 C                     1e-4
//   sum_squares (double, different summation order)                          1e-10
// Skipped (not failed) where no usable CUDA device is present.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "core/bf16.h"
#include "core/rng.h"
#include "cpu/cpu_ops.h"
#include "cuda/cuda_backend.h"
#include "tests/cuda_test_util.h"
#include "tests/harness.h"

using namespace sppo;
using namespace sppo::testutil;

namespace {

// Unrounded floats (for float-only inputs: gradients, optimizer state, float accumulators).
std::vector<float> randn_f32(int64_t n, uint64_t seed, double scale = 1.0) {
  std::vector<float> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[size_t(i)] = float(scale * standard_normal(seed, 2, uint64_t(i)));
  return v;
}

// Transfers. bf16 arrays go through upload/download (float <-> bf16, the conversions under test),
// float and int32 arrays as bytes.
void put(DeviceArray<bf16>& d, const std::vector<float>& v) {
  EXPECT_TRUE(int64_t(v.size()) == d.size());
  d.ops().upload(d.data(), v.data(), d.size());
}
template <class T>
void put(DeviceArray<T>& d, const std::vector<T>& v) {
  d.put(v);
}
std::vector<float> get(const DeviceArray<bf16>& d) {
  std::vector<float> v(size_t(d.size()));
  d.ops().download(v.data(), d.data(), d.size());
  return v;
}
template <class T>
std::vector<T> get(const DeviceArray<T>& d) {
  return d.get();
}
// NaN poison, written without the ops under test.
void poison(DeviceArray<bf16>& d) {
  std::vector<uint16_t> bits(size_t(d.size()), 0x7FC0);  // bf16 quiet NaN
  d.ops().upload_bytes(d.data(), bits.data(), bits.size() * sizeof(uint16_t));
}
void poison(DeviceArray<float>& d) { put(d, std::vector<float>(size_t(d.size()), kNaN)); }

// |out - ref| / |ref| (NaN when any output is NaN), plus the largest error over max |ref|
// (max_rel_error). Unlike cuda_head_test's l2_rel_error, |out - ref| itself when ref is zero.
struct Error2 {
  double rel, max_rel;
};
Error2 compare(const std::vector<float>& out, const std::vector<float>& ref) {
  double num = 0, den = 0;
  bool nan = false;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (std::isnan(out[i]) && !std::isnan(ref[i])) nan = true;
    const double d = double(out[i]) - double(ref[i]);
    num += d * d;
    den += double(ref[i]) * double(ref[i]);
  }
  if (nan) return {kNaN, kNaN};
  return {den > 0 ? std::sqrt(num / den) : std::sqrt(num), max_rel_error(out.data(), ref.data(), int64_t(ref.size()))};
}

void expect_close(const std::string& what, const std::vector<float>& out, const std::vector<float>& ref, double tol) {
  EXPECT_TRUE(out.size() == ref.size(), what << ": " << out.size() << " values vs " << ref.size());
  const Error2 e = compare(out, ref);
  std::printf("      %-44s |out-ref|/|ref| %.3g  max %.3g  (tolerance %.0e)\n", what.c_str(), e.rel, e.max_rel, tol);
  EXPECT_TRUE(e.rel <= tol, what << ": relative error " << e.rel << " exceeds " << tol);
}

void expect_bitwise(const std::string& what, const void* a, const void* b, size_t bytes) {
  EXPECT_TRUE(std::memcmp(a, b, bytes) == 0, what << " differs between two identical runs");
}

std::vector<float> to_bf16_values(std::vector<float> v) {
  for (float& x : v) x = round_bf16(x);
  return v;
}

}  // namespace

SPPO_TEST(cuda_probe_describes_the_device) {
  const cuda::DeviceInfo info = cuda::probe();
#ifdef SPPO_WITH_CUDA
  EXPECT_TRUE(info.built, "compiled with the CUDA backend, but probe() says it is not built");
#else
  EXPECT_TRUE(!info.built && !info.available && info.why_not.find("no CUDA backend") != std::string::npos,
              info.why_not);
#endif
  if (!info.available) throw harness::Skipped(info.why_not);
  EXPECT_TRUE(info.why_not.empty(), info.why_not);
  EXPECT_TRUE(!info.name.empty());
  EXPECT_TRUE(info.sm_major >= 8, "compute capability " << info.sm_major << "." << info.sm_minor);
  EXPECT_TRUE(info.total_memory > 0 && info.free_memory <= info.total_memory);
  EXPECT_TRUE(info.runtime_version > 0 && info.driver_version > 0);
  std::printf("      %s, sm_%d%d, %.1f GiB free of %.1f GiB, runtime %d, driver %d\n", info.name.c_str(), info.sm_major,
              info.sm_minor, double(info.free_memory) / (1 << 30), double(info.total_memory) / (1 << 30),
              info.runtime_version, info.driver_version);
}

SPPO_TEST(cuda_memory_is_zeroed_and_transfers_round_trip) {
  auto ops = cuda_or_skip();
  const int64_t n = 100003;  // odd: not a multiple of any block size
  {
    DeviceArray<float> z(*ops, n);
    for (float x : get(z)) EXPECT_TRUE(x == 0.0f);
  }
  // Bytes round trip.
  DeviceArray<float> f(*ops, n);
  const auto vf = randn_f32(n, 11);
  put(f, vf);
  expect_bitwise("upload_bytes/download_bytes", get(f).data(), vf.data(), vf.size() * sizeof(float));
  // upload rounds to nearest even exactly like bf16.h; download widens exactly.
  DeviceArray<bf16> b(*ops, n);
  ops->upload(b.data(), vf.data(), n);
  const auto back = get(b);
  EXPECT_TRUE(back == to_bf16_values(vf), "upload/download differs from bf16.h rounding");
  // cast (device float -> bf16) rounds the same way.
  poison(b);
  ops->cast(b.data(), f.data(), n);
  EXPECT_TRUE(get(b) == to_bf16_values(vf), "cast differs from bf16.h rounding");
  // Source and destination one element off 16-byte alignment (the scalar path), and n = 1.
  poison(b);
  ops->cast(b.data() + 1, f.data() + 1, n - 1);
  ops->cast(b.data(), f.data(), 1);
  EXPECT_TRUE(get(b) == to_bf16_values(vf), "cast (unaligned) differs from bf16.h rounding");
  // fill, copy, zero_bytes.
  ops->fill(b.data(), 0.3, n);
  for (float x : get(b)) EXPECT_TRUE(x == float(bf16(0.3)));
  DeviceArray<bf16> c(*ops, n);
  poison(c);
  ops->upload(b.data(), vf.data(), n);
  ops->copy(c.data(), b.data(), n);
  EXPECT_TRUE(get(c) == back);
  ops->zero_bytes(c.data(), size_t(n) * sizeof(bf16));
  for (float x : get(c)) EXPECT_TRUE(x == 0.0f);
}

SPPO_TEST(cuda_out_of_memory_names_the_size) {
  auto ops = cuda_or_skip();
  const size_t pib = size_t(1) << 50;
  EXPECT_THROWS_WITH(ops->alloc_bytes(pib), "1125899906842624 bytes");
  EXPECT_THROWS_WITH(ops->alloc_bytes(pib), "MiB");
  EXPECT_THROWS_WITH(ops->alloc_bytes(pib), "out of memory");
  // The failure leaves the device usable.
  DeviceArray<bf16> b(*ops, 1000);
  ops->fill(b.data(), 2.0, 1000);
  for (float x : get(b)) EXPECT_TRUE(x == 2.0f);
}

SPPO_TEST(cuda_sum_squares_and_all_finite_match_cpu_and_repeat) {
  auto ops = cuda_or_skip();
  cpu::CpuOps<float> cpu_ops;
  Ops<float>& ref = cpu_ops;
  for (int64_t n : {int64_t(1), int64_t(7), int64_t(1000003)}) {
    const auto x = randn_f32(n, 21 + uint64_t(n));
    DeviceArray<float> d(*ops, n);
    put(d, x);
    const double got = ops->sum_squares(d.data(), n), want = ref.sum_squares(x.data(), n);
    std::printf("      sum_squares n=%-8lld relative error %.3g (tolerance 1e-10)\n", (long long)n,
                std::fabs(got - want) / want);
    EXPECT_NEAR(got, want, 1e-10 * want);
    const double again = ops->sum_squares(d.data(), n);
    expect_bitwise("sum_squares", &got, &again, sizeof got);
    EXPECT_TRUE(ops->all_finite(d.data(), n));
    // One bad element anywhere (here the last) makes it false.
    for (float bad : {kNaN, std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity()}) {
      ops->upload_bytes(d.data() + (n - 1), &bad, sizeof bad);
      EXPECT_TRUE(!ops->all_finite(d.data(), n));
    }
  }
  // Finite values whose squares overflow float are still finite.
  DeviceArray<float> big(*ops, 3);
  put(big, std::vector<float>{3e38f, -3e38f, 1.0f});
  EXPECT_TRUE(ops->all_finite(big.data(), 3));
}

namespace {

void check_embeddings_and_row_moves(Ops<bf16>* ops, int64_t C) {
  cpu::CpuOps<float> cpu_ops;
  Ops<float>& ref = cpu_ops;
  const int64_t V = 97, N = 333;  // repeats in ids
  const auto table = randn_bf16(V * C, 31);
  const auto ids = random_ids(N, int32_t(V), 32);
  DeviceArray<bf16> d_table(*ops, V * C), d_out(*ops, N * C);
  DeviceArray<int32_t> d_ids(*ops, N);
  put(d_table, table);
  put(d_ids, ids);

  // The embedding lookup: gather_rows of the table by token ids (with repeats).
  poison(d_out);
  ops->gather_rows(d_out.data(), d_table.data(), d_ids.data(), N, C);
  std::vector<float> out(size_t(N * C), kNaN);
  ref.gather_rows(out.data(), table.data(), ids.data(), N, C);
  expect_close(std::string("embedding lookup (gather_rows)") + " C=" + std::to_string(C), get(d_out), out, 0.0);

  // dtable += scatter of dout (float, from random values); the CPU sums in the same order.
  const auto dout = randn_bf16(N * C, 33);
  const auto dtable0 = randn_f32(V * C, 34);
  DeviceArray<bf16> d_dout(*ops, N * C);
  DeviceArray<float> d_dtable(*ops, V * C);
  put(d_dout, dout);
  put(d_dtable, dtable0);
  ops->embedding_backward(d_dtable.data(), d_dout.data(), d_ids.data(), N, C);
  const auto got = get(d_dtable);
  std::vector<float> dtable = dtable0;
  ref.embedding_backward(dtable.data(), dout.data(), ids.data(), N, C);
  expect_close(std::string("embedding_backward (+=)") + " C=" + std::to_string(C), got, dtable, 0.0);
  EXPECT_TRUE(std::memcmp(got.data(), dtable.data(), got.size() * sizeof(float)) == 0,
              "embedding_backward is not bit-identical to the CPU");
  put(d_dtable, dtable0);
  ops->embedding_backward(d_dtable.data(), d_dout.data(), d_ids.data(), N, C);
  expect_bitwise("embedding_backward", get(d_dtable).data(), got.data(), got.size() * sizeof(float));

  // gather rows of the table; scatter them back into a random destination (other rows untouched).
  const int64_t n = 41;
  std::vector<int32_t> rows(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) rows[size_t(i)] = int32_t((i * 37 + 5) % V);  // distinct (37 is coprime to 97)
  DeviceArray<int32_t> d_rows(*ops, n);
  DeviceArray<bf16> d_g(*ops, n * C), d_dst(*ops, V * C);
  put(d_rows, rows);
  poison(d_g);
  ops->gather_rows(d_g.data(), d_table.data(), d_rows.data(), n, C);
  std::vector<float> g(size_t(n * C), kNaN);
  ref.gather_rows(g.data(), table.data(), rows.data(), n, C);
  expect_close(std::string("gather_rows") + " C=" + std::to_string(C), get(d_g), g, 0.0);
  auto dst = randn_bf16(V * C, 35);
  put(d_dst, dst);
  const auto src = randn_bf16(n * C, 36);
  put(d_g, src);
  ops->scatter_rows(d_dst.data(), d_g.data(), d_rows.data(), n, C);
  ref.scatter_rows(dst.data(), src.data(), rows.data(), n, C);
  expect_close(std::string("scatter_rows") + " C=" + std::to_string(C), get(d_dst), dst, 0.0);
}

}  // namespace

// C = 200 takes 16-byte row copies, C = 203 (not a multiple of 8) the scalar ones.
SPPO_TEST(cuda_embeddings_and_row_moves_match_cpu) {
  auto ops = cuda_or_skip();
  for (int64_t C : {int64_t(200), int64_t(203)}) check_embeddings_and_row_moves(ops.get(), C);
}

// embedding_backward sorts the (id, token) pairs and sums each table row's tokens in token order:
// bit-identical to the CPU (and to adding token after token) however the ids repeat. Ids here:
// the largest id on a quarter of the tokens (a run far longer than a warp's window), ids 1..97 on
// another quarter (~23 tokens each), id 0 on 2%, the rest random over the vocabulary (mostly
// once, some twice); C = 300 leaves a partial column chunk. Called with N tokens, then fewer
// (buffers reused), then more (buffers grown), each twice (+=) and checked bitwise.
SPPO_TEST(cuda_embedding_backward_bit_identical_to_cpu) {
  auto ops = cuda_or_skip();
  cpu::CpuOps<float> cpu_ops;
  Ops<float>& ref = cpu_ops;
  const int64_t V = 32000, C = 300, N_max = 9000;
  std::vector<int32_t> ids = random_ids(N_max, int32_t(V), 71);
  const auto pick = random_ids(N_max, 1000, 72);
  for (int64_t i = 0; i < N_max; ++i) {
    const int32_t r = pick[size_t(i)];
    if (r < 250)
      ids[size_t(i)] = int32_t(V - 1);
    else if (r < 500)
      ids[size_t(i)] = 1 + r % 97;
    else if (r < 520)
      ids[size_t(i)] = 0;
  }
  const auto dout = randn_bf16(N_max * C, 73);
  const auto dtable0 = randn_f32(V * C, 74);
  DeviceArray<bf16> d_dout(*ops, N_max * C);
  DeviceArray<int32_t> d_ids(*ops, N_max);
  DeviceArray<float> d_dtable(*ops, V * C);
  put(d_dout, dout);
  put(d_ids, ids);
  for (int64_t N : {int64_t(4097), int64_t(37), N_max}) {
    put(d_dtable, dtable0);
    ops->embedding_backward(d_dtable.data(), d_dout.data(), d_ids.data(), N, C);
    ops->embedding_backward(d_dtable.data(), d_dout.data(), d_ids.data(), N, C);  // += twice
    const auto got = get(d_dtable);
    std::vector<float> want = dtable0;
    ref.embedding_backward(want.data(), dout.data(), ids.data(), N, C);
    ref.embedding_backward(want.data(), dout.data(), ids.data(), N, C);
    const std::string what = "embedding_backward N=" + std::to_string(N);
    expect_close(what, got, want, 0.0);
    EXPECT_TRUE(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)) == 0,
                what << " is not bit-identical to the CPU");
  }
  EXPECT_TRUE(get(d_ids) == ids, "embedding_backward modified the ids");
}

// Shapes for every kernel variant: a warp per row holding 1, 2, 4 (C = 768 uses 3) and 8 vectors
// a lane, a block per row holding 2 and 4, C > 8192, C not a multiple of 8, N = 1, many row groups
// of the fused backward (N = 600, 100); `shift` moves every array one element off 16-byte
// alignment (the scalar kernels).
struct NormCase {
  int64_t N, C, shift;
};

SPPO_TEST(cuda_rmsnorm_matches_cpu) {
  auto ops = cuda_or_skip();
  cpu::CpuOps<float> cpu_ops;
  Ops<float>& ref = cpu_ops;
  for (const NormCase& c : std::vector<NormCase>{{67, 1000, 0},
                                                 {3, 37, 0},
                                                 {300, 4096, 0},
                                                 {1, 8, 0},
                                                 {5, 512, 0},
                                                 {9, 768, 0},
                                                 {20, 2048, 0},
                                                 {3, 2056, 0},
                                                 {5, 8192, 0},
                                                 {2, 9000, 0},
                                                 {1, 768, 0},
                                                 {7, 768, 1},
                                                 {600, 768, 0},
                                                 {100, 2048, 0}}) {
    const int64_t N = c.N, C = c.C, s = c.shift;
    const std::string shape = " N=" + std::to_string(N) + " C=" + std::to_string(C) + (s ? " unaligned" : "");
    const double eps = 1e-5;
    const auto x = randn_bf16(N * C, 41, 2.0), w = randn_bf16(C, 42), dout = randn_bf16(N * C, 43);
    const auto dx0 = randn_bf16(N * C, 44), dw0 = randn_f32(C, 45);
    DeviceArray<bf16> d_x(*ops, N * C + s), d_w(*ops, C + s), d_out(*ops, N * C + s), d_dout(*ops, N * C + s),
        d_dx(*ops, N * C + s);
    DeviceArray<float> d_rstd(*ops, N), d_dw(*ops, C);
    // The arrays at offset s: filled through a whole-array upload with s leading values.
    const auto put_at = [&](DeviceArray<bf16>& d, const std::vector<float>& v) {
      std::vector<float> all(size_t(s), 0.0f);
      all.insert(all.end(), v.begin(), v.end());
      put(d, all);
    };
    const auto get_at = [&](const DeviceArray<bf16>& d) {
      auto all = get(d);
      return std::vector<float>(all.begin() + s, all.end());
    };
    put_at(d_x, x);
    put_at(d_w, w);
    put_at(d_dout, dout);
    poison(d_out);
    poison(d_rstd);
    ops->rmsnorm_forward(d_out.data() + s, d_rstd.data(), d_x.data() + s, d_w.data() + s, N, C, eps);
    std::vector<float> out(size_t(N * C), kNaN), rstd(size_t(N), kNaN);
    ref.rmsnorm_forward(out.data(), rstd.data(), x.data(), w.data(), N, C, eps);
    expect_close("rmsnorm_forward out" + shape, get_at(d_out), out, 1e-2);
    expect_close("rmsnorm_forward rstd" + shape, get(d_rstd), rstd, 1e-5);

    // Backward from the CPU's rstd (so only the backward is compared), into random dx and dw.
    put(d_rstd, rstd);
    put_at(d_dx, dx0);
    put(d_dw, dw0);
    ops->rmsnorm_backward(d_dx.data() + s, d_dw.data(), d_dout.data() + s, d_x.data() + s, d_w.data() + s,
                          d_rstd.data(), N, C);
    std::vector<float> dx = dx0, dw = dw0;
    ref.rmsnorm_backward(dx.data(), dw.data(), dout.data(), x.data(), w.data(), rstd.data(), N, C);
    expect_close("rmsnorm_backward dx (+=)" + shape, get_at(d_dx), dx, 1e-2);
    const auto got_dw = get(d_dw);
    expect_close("rmsnorm_backward dw (+=)" + shape, got_dw, dw, 1e-5);
    put_at(d_dx, dx0);
    put(d_dw, dw0);
    ops->rmsnorm_backward(d_dx.data() + s, d_dw.data(), d_dout.data() + s, d_x.data() + s, d_w.data() + s,
                          d_rstd.data(), N, C);
    expect_bitwise("rmsnorm_backward dw", get(d_dw).data(), got_dw.data(), got_dw.size() * sizeof(float));
  }
}

// ld = 317 (odd) takes the scalar kernels, ld = 312 and C = 304 the 16-byte ones; columns C..ld of
// each row must stay untouched.
SPPO_TEST(cuda_bias_matches_cpu) {
  auto ops = cuda_or_skip();
  cpu::CpuOps<float> cpu_ops;
  Ops<float>& ref = cpu_ops;
  for (const auto& [N, C, ld] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{
           {129, 300, 317}, {129, 304, 312}, {1, 8, 8}, {1000, 24, 32}}) {
    const std::string shape = " N=" + std::to_string(N) + " C=" + std::to_string(C) + " ld=" + std::to_string(ld);
    auto x = randn_bf16(N * ld, 51);
    const auto bias = randn_bf16(C, 52), dbias0 = randn_f32(C, 53);
    DeviceArray<bf16> d_x(*ops, N * ld), d_bias(*ops, C);
    DeviceArray<float> d_dbias(*ops, C);
    put(d_x, x);
    put(d_bias, bias);
    put(d_dbias, dbias0);
    ops->add_bias(d_x.data(), d_bias.data(), N, C, ld);
    ops->bias_backward(d_dbias.data(), d_x.data(), N, C, ld);  // column sums of the biased x
    ref.add_bias(x.data(), bias.data(), N, C, ld);
    const auto got_x = get(d_x);
    expect_close("add_bias (+=)" + shape, got_x, x, 1e-2);
    // The reference sums the device's biased values, so only the column sums are compared.
    std::vector<float> dbias = dbias0;
    ref.bias_backward(dbias.data(), got_x.data(), N, C, ld);
    const auto got_dbias = get(d_dbias);
    expect_close("bias_backward (+=)" + shape, got_dbias, dbias, 1e-5);
    put(d_dbias, dbias0);
    ops->bias_backward(d_dbias.data(), d_x.data(), N, C, ld);
    expect_bitwise("bias_backward", get(d_dbias).data(), got_dbias.data(), got_dbias.size() * sizeof(float));
  }
}

// off = 5 (odd) takes the scalar kernel; off = 8 with ld a multiple of 8 the 8-pair one (also with
// head_dim 32, and one row); head_dim 6 (half-head 3) the scalar one.
SPPO_TEST(cuda_rope_matches_cpu_both_ways) {
  auto ops = cuda_or_skip();
  cpu::CpuOps<float> cpu_ops;
  Ops<float>& ref = cpu_ops;
  for (const auto& [N, heads, D, off] : std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>>{
           {37, 3, 64, 5}, {37, 3, 64, 8}, {1, 12, 64, 8}, {20, 4, 32, 16}, {9, 2, 6, 3}}) {
    const int64_t half = D / 2, max_pos = 50;
    const int64_t ld = (off + heads * D + 2 * D + 7) / 8 * 8 + (off % 8 ? 7 : 0);
    const std::string shape = " N=" + std::to_string(N) + " heads=" + std::to_string(heads) +
                              " D=" + std::to_string(D) + " off=" + std::to_string(off);
    std::vector<float> cos(size_t(max_pos * half)), sin(size_t(max_pos * half));
    for (int64_t p = 0; p < max_pos; ++p)
      for (int64_t j = 0; j < half; ++j) {
        const double angle = double(p) * std::pow(10000.0, -2.0 * double(j) / double(D));
        cos[size_t(p * half + j)] = float(std::cos(angle));
        sin[size_t(p * half + j)] = float(std::sin(angle));
      }
    const auto pos = random_ids(N, int32_t(max_pos), 61);
    DeviceArray<float> d_cos(*ops, max_pos * half), d_sin(*ops, max_pos * half);
    DeviceArray<int32_t> d_pos(*ops, N);
    DeviceArray<bf16> d_x(*ops, N * ld);
    put(d_cos, cos);
    put(d_sin, sin);
    put(d_pos, pos);
    for (bool inverse : {false, true}) {
      auto x = randn_bf16(N * ld, 62);
      put(d_x, x);
      ops->rope(d_x.data(), N, ld, off, heads, D, d_pos.data(), d_cos.data(), d_sin.data(), inverse);
      ref.rope(x.data(), N, ld, off, heads, D, pos.data(), cos.data(), sin.data(), inverse);
      expect_close((inverse ? "rope inverse" : "rope") + shape, get(d_x), x, 1e-2);
    }
  }
}

// F = 1000 and 2048 take the 16-byte kernels, F = 1001 the scalar ones.
SPPO_TEST(cuda_swiglu_matches_cpu) {
  auto ops = cuda_or_skip();
  cpu::CpuOps<float> cpu_ops;
  Ops<float>& ref = cpu_ops;
  for (const auto& [N, F] : std::vector<std::pair<int64_t, int64_t>>{{33, 1000}, {33, 1001}, {1, 2048}, {70, 8}}) {
    const std::string shape = " N=" + std::to_string(N) + " F=" + std::to_string(F);
    const auto gu = randn_bf16(N * 2 * F, 71, 3.0), dout = randn_bf16(N * F, 72);
    DeviceArray<bf16> d_gu(*ops, N * 2 * F), d_out(*ops, N * F), d_dout(*ops, N * F), d_dgu(*ops, N * 2 * F);
    put(d_gu, gu);
    put(d_dout, dout);
    poison(d_out);
    poison(d_dgu);
    ops->swiglu_forward(d_out.data(), d_gu.data(), N, F);
    ops->swiglu_backward(d_dgu.data(), d_dout.data(), d_gu.data(), N, F);
    std::vector<float> out(size_t(N * F), kNaN), dgu(size_t(N * 2 * F), kNaN);
    ref.swiglu_forward(out.data(), gu.data(), N, F);
    ref.swiglu_backward(dgu.data(), dout.data(), gu.data(), N, F);
    expect_close("swiglu_forward" + shape, get(d_out), out, 1e-2);
    expect_close("swiglu_backward" + shape, get(d_dgu), dgu, 1e-2);
  }
}

// Several steps of each optimizer with fresh gradients. With master weights the device's float
// master must track the CPU's float parameters (fp32 math: 1e-5) and p must be their bf16; without,
// the CPU reference rounds p to bf16 after each step as the device does.
SPPO_TEST(cuda_optimizers_match_cpu_over_steps) {
  auto ops = cuda_or_skip();
  cpu::CpuOps<float> cpu_ops;
  Ops<float>& ref = cpu_ops;
  const int64_t n = 100003, steps = 5;
  const double lr = 1e-2, decay = 1e-2 * 0.1, gscale = 0.5;
  for (bool adam : {true, false}) {
    for (bool with_master : {true, false}) {
      const std::string name = std::string(adam ? "adamw" : "rmsprop") + (with_master ? " master" : " no master");
      const auto p0 = randn_bf16(n, 81);
      std::vector<float> p = p0, m(size_t(n), 0.0f), v(size_t(n), 0.0f);
      DeviceArray<bf16> d_p(*ops, n);
      DeviceArray<float> d_master(*ops, n), d_g(*ops, n), d_m(*ops, n), d_v(*ops, n);
      put(d_p, p0);
      put(d_master, p0);
      for (int64_t step = 1; step <= steps; ++step) {
        const auto g = randn_f32(n, 90 + uint64_t(step));
        put(d_g, g);
        float* master = with_master ? d_master.data() : nullptr;
        if (adam) {
          ops->adamw_update(d_p.data(), master, d_g.data(), d_m.data(), d_v.data(), n, lr, 0.9, 0.999, 1e-8, decay,
                            gscale, step);
          ref.adamw_update(p.data(), nullptr, g.data(), m.data(), v.data(), n, lr, 0.9, 0.999, 1e-8, decay, gscale,
                           step);
        } else {
          ops->rmsprop_update(d_p.data(), master, d_g.data(), d_m.data(), n, lr, 0.99, 1e-8, decay, gscale);
          ref.rmsprop_update(p.data(), nullptr, g.data(), m.data(), n, lr, 0.99, 1e-8, decay, gscale);
        }
        if (!with_master) p = to_bf16_values(p);
      }
      if (with_master) expect_close(name + " master", get(d_master), p, 1e-5);
      expect_close(name + " p (bf16)", get(d_p), to_bf16_values(p), 1e-2);
      expect_close(name + (adam ? " m" : " sq"), get(d_m), m, 1e-5);
      if (adam) expect_close(name + " v", get(d_v), v, 1e-5);
    }
  }
}

namespace {

struct GemmCase {
  bool tA, tB;
  int64_t M, N, K, pad;  // pad: extra elements per row on lda, ldb and ldc
  double alpha, beta;
};

// One case for gemm (bf16 C) or gemm_master (float C) against the CPU's float GEMM on the same
// bf16 inputs; padding columns of C must come back untouched, and a second run bit-identical.
void check_gemm(Ops<bf16>& ops, Ops<float>& ref, const GemmCase& c, bool master, uint64_t seed) {
  const int64_t a_rows = c.tA ? c.K : c.M, a_cols = c.tA ? c.M : c.K;
  const int64_t b_rows = c.tB ? c.N : c.K, b_cols = c.tB ? c.K : c.N;
  const int64_t lda = a_cols + c.pad, ldb = b_cols + c.pad, ldc = c.N + c.pad;
  const auto A = randn_bf16(a_rows * lda, seed), B = randn_bf16(b_rows * ldb, seed + 1);
  auto C0 = randn_bf16(c.M * ldc, seed + 2);
  if (c.beta == 0.0)  // beta == 0 must not read C: poison the part it writes
    for (int64_t i = 0; i < c.M; ++i)
      for (int64_t j = 0; j < c.N; ++j) C0[size_t(i * ldc + j)] = kNaN;
  std::vector<float> C = C0;
  if (c.beta == 0.0)
    for (int64_t i = 0; i < c.M; ++i)
      for (int64_t j = 0; j < c.N; ++j) C[size_t(i * ldc + j)] = 0.0f;  // the CPU reference reads it
  ref.gemm(c.tA, c.tB, c.M, c.N, c.K, c.alpha, A.data(), lda, B.data(), ldb, c.beta, C.data(), ldc);

  DeviceArray<bf16> d_A(ops, a_rows * lda), d_B(ops, b_rows * ldb);
  put(d_A, A);
  put(d_B, B);
  std::vector<float> got, again;
  if (master) {
    DeviceArray<float> d_C(ops, c.M * ldc);
    for (auto* out : {&got, &again}) {
      put(d_C, C0);
      ops.gemm_master(c.tA, c.tB, c.M, c.N, c.K, c.alpha, d_A.data(), lda, d_B.data(), ldb, c.beta, d_C.data(), ldc);
      *out = get(d_C);
    }
  } else {
    DeviceArray<bf16> d_C(ops, c.M * ldc);
    for (auto* out : {&got, &again}) {
      put(d_C, C0);  // NaN stays NaN through bf16
      ops.gemm(c.tA, c.tB, c.M, c.N, c.K, c.alpha, d_A.data(), lda, d_B.data(), ldb, c.beta, d_C.data(), ldc);
      *out = get(d_C);
    }
  }
  std::vector<float> got_inner, ref_inner;
  for (int64_t i = 0; i < c.M; ++i)
    for (int64_t j = 0; j < ldc; ++j) {
      const size_t k = size_t(i * ldc + j);
      if (j < c.N) {
        got_inner.push_back(got[k]);
        ref_inner.push_back(C[k]);
      } else {
        EXPECT_TRUE(std::memcmp(&got[k], &C0[k], sizeof(float)) == 0,
                    "padding column " << j << " of row " << i << " was written");
      }
    }
  char name[128];
  std::snprintf(name, sizeof name, "%s tA=%d tB=%d %lldx%lldx%lld pad=%lld beta=%g", master ? "gemm_master" : "gemm",
                int(c.tA), int(c.tB), (long long)c.M, (long long)c.N, (long long)c.K, (long long)c.pad, c.beta);
  expect_close(name, got_inner, ref_inner, master ? 1e-4 : 1e-2);
  expect_bitwise(name, got.data(), again.data(), got.size() * sizeof(float));
}

}  // namespace

SPPO_TEST(cuda_gemm_matches_cpu_in_every_layout) {
  auto ops = cuda_or_skip();
  cpu::CpuOps<float> cpu_ops;
  uint64_t seed = 100;
  for (bool master : {false, true})
    for (bool tA : {false, true})
      for (bool tB : {false, true})
        for (double beta : {0.0, 1.0}) {
          // Odd sizes with odd padding (only 2-byte-aligned rows), then an aligned tensor-core size.
          check_gemm(*ops, cpu_ops, {tA, tB, 67, 45, 129, 3, 0.75, beta}, master, seed += 3);
          check_gemm(*ops, cpu_ops, {tA, tB, 256, 384, 1024, 8, 1.0, beta}, master, seed += 3);
        }
  // Other scalings, a single row / column, and K = 0 (C = beta*C).
  check_gemm(*ops, cpu_ops, {false, true, 1, 300, 64, 0, -1.5, 0.5}, true, seed += 3);
  check_gemm(*ops, cpu_ops, {true, false, 300, 1, 64, 0, 2.0, -1.0}, false, seed += 3);
  const int64_t M = 5, N = 7;
  const auto C0 = randn_bf16(M * N, 999);
  DeviceArray<float> d_C(*ops, M * N);
  put(d_C, C0);
  ops->gemm_master(false, false, M, N, 0, 1.0, nullptr, 1, nullptr, N, 0.5, d_C.data(), N);
  std::vector<float> half = C0;
  for (float& x : half) x *= 0.5f;
  expect_close("gemm_master K=0 beta=0.5", get(d_C), half, 0.0);
}
