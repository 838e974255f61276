// Checks the CPU gemm (every kernel this CPU can run) against a float64 reference.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <utility>
#include <vector>

#include "cpu/gemm.h"
#include "tests/harness.h"

namespace sppo::cpu {
bool gemm_force_kernel(const char* name);  // test hook defined in gemm.cpp
}

namespace {

using sppo::cpu::gemm;

struct Case {
  bool tA, tB;
  int64_t M, N, K;
  int64_t pad;  // extra elements per row on lda, ldb and ldc
  double alpha, beta;
};

template <class T>
std::vector<T> random_vec(size_t n, std::mt19937& rng) {
  // Values in +-[0.5, 1.5]: never zero, so a skipped or doubled term always shows.
  std::uniform_real_distribution<double> d(0.5, 1.5);
  std::vector<T> v(n);
  for (auto& x : v) x = static_cast<T>(rng() & 1 ? d(rng) : -d(rng));
  return v;
}

// Runs one case in precision T and returns the worst error relative to the tolerance scale
// sum_k |a||b| * |alpha| + |beta c| (so cancellation in the exact result cannot fake a failure).
template <class T>
double check_case(const Case& c, std::mt19937& rng) {
  const int64_t a_rows = c.tA ? c.K : c.M, a_cols = c.tA ? c.M : c.K;
  const int64_t b_rows = c.tB ? c.N : c.K, b_cols = c.tB ? c.K : c.N;
  const int64_t lda = a_cols + c.pad, ldb = b_cols + c.pad, ldc = c.N + c.pad;
  auto A = random_vec<T>(a_rows * lda, rng);
  auto B = random_vec<T>(b_rows * ldb, rng);
  auto C0 = random_vec<T>(c.M * ldc, rng);
  std::vector<T> C = C0;
  if (c.beta == 0.0) {
    // beta == 0 must overwrite C without reading it.
    for (auto& x : C) x = std::numeric_limits<T>::quiet_NaN();
  }
  // Padding columns of C must come back untouched.
  const T sentinel = static_cast<T>(12345.0);
  for (int64_t i = 0; i < c.M; ++i)
    for (int64_t j = c.N; j < ldc; ++j) C[i * ldc + j] = sentinel;

  gemm(c.tA, c.tB, c.M, c.N, c.K, static_cast<T>(c.alpha), A.data(), lda, B.data(), ldb, static_cast<T>(c.beta),
       C.data(), ldc);

  double worst = 0.0;
  for (int64_t i = 0; i < c.M; ++i) {
    for (int64_t j = 0; j < c.N; ++j) {
      double s = 0.0, mag = 0.0;
      for (int64_t k = 0; k < c.K; ++k) {
        double a = c.tA ? A[k * lda + i] : A[i * lda + k];
        double b = c.tB ? B[j * ldb + k] : B[k * ldb + j];
        s += a * b;
        mag += std::fabs(a * b);
      }
      double ref = c.alpha * s, scale = std::fabs(c.alpha) * mag;
      if (c.beta != 0.0) {
        ref += c.beta * double(C0[i * ldc + j]);
        scale += std::fabs(c.beta * double(C0[i * ldc + j]));
      }
      double err = std::fabs(double(C[i * ldc + j]) - ref) / scale;
      if (!(err == err)) return std::numeric_limits<double>::infinity();  // NaN leaked through
      worst = std::max(worst, err);
    }
    for (int64_t j = c.N; j < ldc; ++j)
      if (C[i * ldc + j] != sentinel) return std::numeric_limits<double>::infinity();
  }
  return worst;
}

std::vector<Case> cases() {
  const int64_t sizes[][3] = {{1, 1, 1},
                              {7, 13, 5},
                              {33, 65, 17},
                              {130, 97, 300},
                              {1, 1376, 512},
                              {5, 77, 515},
                              {16, 48, 33},
                              {64, 200, 129},
                              {300, 40, 600},
                              {29, 31, 1},
                              // M <= 4 (the matrix-vector path): odd N and K, K tails inside a
                              // 16-wide block, several K blocks, N * K large enough to split the
                              // columns over the pool.
                              {1, 17, 3},
                              {2, 15, 16},
                              {3, 33, 47},
                              {4, 129, 257},
                              {1, 515, 601},
                              {2, 700, 513},
                              {3, 1, 1377},
                              {4, 1000, 300}};
  const double ab[][2] = {{1.0, 0.0}, {1.0, 1.0}, {-0.75, 0.5}};
  std::vector<Case> v;
  int n = 0;
  for (auto& s : sizes)
    for (int t = 0; t < 4; ++t)
      for (auto& x : ab) {
        // Alternate padded / tight leading dimensions so both are covered for every shape.
        v.push_back({bool(t & 1), bool(t & 2), s[0], s[1], s[2], (n++ % 2) ? 3 : 0, x[0], x[1]});
      }
  return v;
}

// Float tolerance: each output is a K-term sum in float, so its error is at most about
// K * eps_f32 * sum|a b| (worst case), typically sqrt(K) * eps. Use 4 * sqrt(K) * eps + 2 eps,
// relative to sum|a b|, i.e. ~1e-5 at K = 300.
double f32_tol(int64_t K) { return 4.0 * std::sqrt(double(K)) * 1.2e-7 + 2.4e-7; }

void check_all_f32(const char* kernel) {
  EXPECT_TRUE(sppo::cpu::gemm_force_kernel(kernel), "kernel " << kernel);
  std::mt19937 rng(7);
  for (const Case& c : cases()) {
    double err = check_case<float>(c, rng);
    EXPECT_TRUE(err <= f32_tol(c.K), "kernel " << kernel << " tA=" << c.tA << " tB=" << c.tB << " M=" << c.M
                                               << " N=" << c.N << " K=" << c.K << " pad=" << c.pad
                                               << " alpha=" << c.alpha << " beta=" << c.beta << ": rel err " << err);
  }
  sppo::cpu::gemm_force_kernel("auto");
}

bool cpu_has(const char* name) {
  bool ok = sppo::cpu::gemm_force_kernel(name);
  sppo::cpu::gemm_force_kernel("auto");
  return ok;
}

}  // namespace

SPPO_TEST(gemm_f32_matches_f64_reference) { check_all_f32("auto"); }

SPPO_TEST(gemm_f32_avx512_kernel) {
  if (cpu_has("avx512")) check_all_f32("avx512");
}

SPPO_TEST(gemm_f32_avx2_kernel) {
  if (cpu_has("avx2")) check_all_f32("avx2");
}

SPPO_TEST(gemm_f32_portable_kernel) { check_all_f32("portable"); }

SPPO_TEST(gemm_f64_matches_reference) {
  std::mt19937 rng(11);
  for (const Case& c : cases()) {
    double err = check_case<double>(c, rng);
    EXPECT_TRUE(err <= 1e-12,
                "tA=" << c.tA << " tB=" << c.tB << " M=" << c.M << " N=" << c.N << " K=" << c.K << ": rel err " << err);
  }
}

SPPO_TEST(gemm_kernel_name_is_known) {
  std::string n = sppo::cpu::gemm_kernel_name();
  EXPECT_TRUE(n == "avx512" || n == "avx2" || n == "portable", n);
}

// Same inputs twice -> bit-identical outputs, on shapes large enough to use several tasks,
// several K blocks and the small-M path.
SPPO_TEST(gemm_f32_deterministic) {
  std::mt19937 rng(3);
  const int64_t shapes[][3] = {{515, 333, 1100}, {9, 700, 900}, {64, 256, 4096}};
  for (auto& s : shapes) {
    const int64_t M = s[0], N = s[1], K = s[2];
    for (int t = 0; t < 4; ++t) {
      bool tA = t & 1, tB = t & 2;
      auto A = random_vec<float>(M * K, rng), B = random_vec<float>(K * N, rng);
      std::vector<float> C1(M * N), C2(M * N);
      auto C0 = random_vec<float>(M * N, rng);
      for (float beta : {0.0f, 1.0f}) {
        C1 = C0;
        C2 = C0;
        gemm(tA, tB, M, N, K, 1.0f, A.data(), tA ? M : K, B.data(), tB ? K : N, beta, C1.data(), N);
        gemm(tA, tB, M, N, K, 1.0f, A.data(), tA ? M : K, B.data(), tB ? K : N, beta, C2.data(), N);
        EXPECT_TRUE(std::memcmp(C1.data(), C2.data(), C1.size() * sizeof(float)) == 0,
                    "M=" << M << " N=" << N << " K=" << K << " t=" << t << " beta=" << beta);
      }
    }
  }
}

// M <= 4 runs its own matrix-vector kernels, and x * W^T up to kDotMaxM (96) rows the small-M
// paths (W unpacked, or packed a sliver at a time); each must reduce exactly as the packed path
// does (batch-invariant decoding rests on that), for every transpose case, alpha and beta, on
// every kernel this CPU runs: rows [0, m) computed alone must equal the same rows of an M = 120
// gemm, which takes the shared-panel packed path.
SPPO_TEST(gemm_small_m_rows_match_the_packed_path_bitwise) {
  std::mt19937 rng(9);
  const int64_t Mref = 120;
  for (const char* kernel : {"avx512", "avx2", "portable"}) {
    if (!sppo::cpu::gemm_force_kernel(kernel)) continue;
    for (int64_t K : {5, 16, 47, 515}) {
      for (int64_t N : {1, 37, 700}) {
        for (int t = 0; t < 4; ++t) {
          const bool tA = t & 1, tB = t & 2;
          auto A = random_vec<float>(Mref * K, rng), B = random_vec<float>(N * K, rng);
          auto C0 = random_vec<float>(Mref * N, rng);
          const int64_t lda = tA ? Mref : K, ldb = tB ? K : N;
          for (const auto& ab : {std::pair{1.0f, 0.0f}, std::pair{-0.75f, 0.5f}}) {
            std::vector<float> ref = C0;
            gemm(tA, tB, Mref, N, K, ab.first, A.data(), lda, B.data(), ldb, ab.second, ref.data(), N);
            for (int64_t m : {1, 2, 3, 4, 5, 8, 9, 16, 17, 30, 96}) {
              std::vector<float> C(C0.begin(), C0.begin() + m * N);
              gemm(tA, tB, m, N, K, ab.first, A.data(), lda, B.data(), ldb, ab.second, C.data(), N);
              EXPECT_TRUE(std::memcmp(C.data(), ref.data(), C.size() * sizeof(float)) == 0,
                          "kernel " << kernel << " tA=" << tA << " tB=" << tB << " M=" << m << " N=" << N << " K=" << K
                                    << " alpha=" << ab.first << " beta=" << ab.second);
            }
          }
        }
      }
    }
  }
  sppo::cpu::gemm_force_kernel("auto");
}

// A 64-byte aligned float buffer, as pack_weight needs.
struct AlignedFloats {
  explicit AlignedFloats(size_t n) : n_(n), p_(static_cast<float*>(std::aligned_alloc(64, (n * 4 + 63) / 64 * 64))) {}
  ~AlignedFloats() { std::free(p_); }
  float* data() { return p_; }
  size_t size() const { return n_; }
  size_t n_;
  float* p_;
};

// x * W^T against W packed once (a generator's decode steps): every row bit-identical to gemm on W
// itself, for every row count (the matrix-vector rows read W; the rest the packed copy), with a
// row stride wider than K; a copy packed for another kernel or shape is refused.
SPPO_TEST(gemm_packed_weight_matches_gemm_bitwise) {
  std::mt19937 rng(11);
  for (const char* kernel : {"avx512", "avx2", "portable"}) {
    if (!sppo::cpu::gemm_force_kernel(kernel)) continue;
    for (int64_t K : {5, 47, 515}) {
      for (int64_t N : {1, 37, 700}) {
        const int64_t ldw = K + 3, Mmax = 300;
        auto W = random_vec<float>(N * ldw, rng), A = random_vec<float>(Mmax * K, rng);
        auto C0 = random_vec<float>(Mmax * N, rng);
        AlignedFloats packed(sppo::cpu::packed_weight_floats(N, K));
        std::fill_n(packed.data(), packed.size(), std::nanf(""));
        sppo::cpu::pack_weight(W.data(), ldw, N, K, packed.data());
        for (int64_t m : {1, 4, 5, 9, 30, 64, 96, 97, 300})
          for (const auto& ab : {std::pair{1.0f, 0.0f}, std::pair{-0.75f, 0.5f}}) {
            std::vector<float> ref(C0.begin(), C0.begin() + m * N), C = ref;
            gemm(false, true, m, N, K, ab.first, A.data(), K, W.data(), ldw, ab.second, ref.data(), N);
            sppo::cpu::gemm_packed_weight(m, N, K, ab.first, A.data(), K, W.data(), ldw, packed.data(), ab.second,
                                          C.data(), N);
            EXPECT_TRUE(std::memcmp(C.data(), ref.data(), C.size() * sizeof(float)) == 0,
                        "kernel " << kernel << " M=" << m << " N=" << N << " K=" << K << " alpha=" << ab.first);
          }
        std::vector<float> C(size_t(8 * N));
        EXPECT_THROWS_WITH(sppo::cpu::gemm_packed_weight(8, N, K + 1, 1.0f, A.data(), K + 1, W.data(), ldw,
                                                         packed.data(), 0.0f, C.data(), N),
                           "packed as");
      }
    }
  }
  // AVX-512's slivers are 32 columns wide, the others' 16 (the same layout for AVX2 and portable).
  if (sppo::cpu::gemm_force_kernel("avx512")) {
    const int64_t N = 40, K = 20;
    auto W = random_vec<float>(N * K, rng), A = random_vec<float>(8 * K, rng);
    AlignedFloats packed(sppo::cpu::packed_weight_floats(N, K));
    std::vector<float> C(8 * N);
    sppo::cpu::pack_weight(W.data(), K, N, K, packed.data());
    sppo::cpu::gemm_force_kernel("avx2");
    EXPECT_THROWS_WITH(
        sppo::cpu::gemm_packed_weight(8, N, K, 1.0f, A.data(), K, W.data(), K, packed.data(), 0.0f, C.data(), N),
        "slivers of 32");
  }
  sppo::cpu::gemm_force_kernel("auto");
}
