// CPU GEMM: packed, cache-blocked matrix multiply with AVX-512 / AVX2 / portable micro-kernels.
//
// Layout (GotoBLAS/BLIS style, row-major):
//   for each column block jc of op(B) (NC wide):
//     pack op(B)[:, jc] over all of K into NR-wide slivers, shared by every thread  (parallel)
//     for each task = (row block of MC rows) x (group of B slivers)                 (parallel)
//       for each K block (KC deep), in fixed order:
//         pack op(A)[rows, kblock] into MR-row slivers (thread-local scratch)
//         for each B sliver: for each A sliver: micro-kernel on an MR x NR tile of C
// Packing absorbs both transposes, so one micro-kernel serves all four cases. Every C element
// is owned by one task and reduced over K in the same order whatever the thread count, so
// results are bit-identical run to run (and across thread counts).
// Few rows (decode) skip the shared panel: M <= 4 goes through a matrix-vector pair per kernel
// set (op(B) streamed once, unpacked), x * W^T with M <= 16 through the small-M paths; both
// reduce every element exactly as the micro-kernel does, so a row's result never depends on M.
#include "cpu/gemm.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <new>
#include <vector>

#include "core/error.h"
#include "core/threadpool.h"

namespace sppo::cpu {

namespace {

// 64-byte aligned scratch that only ever grows: the engine calls gemm with the same shapes
// every step, so after the first call no allocation happens.
struct Scratch {
  float* p = nullptr;
  size_t cap = 0;
  ~Scratch() { std::free(p); }
  float* get(size_t n) {
    if (n > cap) {
      std::free(p);
      size_t bytes = (n * sizeof(float) + 63) / 64 * 64;
      p = static_cast<float*>(std::aligned_alloc(64, bytes));
      if (!p) throw std::bad_alloc();
      cap = n;
    }
    return p;
  }
};

// Packed op(A) block of the running thread (MC x KC) and packed op(B) panel of the calling
// thread (K x NC). Thread-local rather than global so concurrent gemm calls from different
// threads never share a buffer.
thread_local Scratch tl_apack;
thread_local Scratch tl_bpack;
// One packed op(B) sliver (KC x NR) of the running thread, for the small-M path.
thread_local Scratch tl_bsliver;
// A transposed A (K, M) gathered into (M, K) by the calling thread, for the matrix-vector path.
thread_local Scratch tl_arows;

// Blocking. KC: a KC x NR B sliver (32 KiB for AVX-512) stays in the 48 KiB L1 while the
// A slivers stream past it. MC: the MC x KC A block (~256 KiB) stays in L2. NC bounds the
// shared packed-B panel to kBPanelFloats (16 MiB) whatever K is.
constexpr int64_t kKC = 256;
constexpr int64_t kMC = 256;
constexpr int64_t kBPanelFloats = int64_t(4) << 20;
// Below this much work (flops) one thread does it all: waking the pool's workers costs tens of
// microseconds on a VM (a 1 MFLOP decode gemv took 15 us alone, ~55 us with two threads).
constexpr double kMinParallelFlops = 4e6;
// Up to kMatvecMaxM rows (single-sequence decode, the K samples of one prompt), every case goes
// through the kernel set's matrix-vector pair: op(B) is streamed once, unpacked. Up to
// kDotMaxM rows, x * W^T never packs W into the shared panel: up to kRowsMaxM rows it is read
// unpacked (see avx512_rows), beyond that one sliver at a time (see gemm_f32). The sliver path
// streams W while it computes; the shared panel packs all of W first, a pass that on a decode
// step of ~30 rows took as long as the multiply (bench/NOTES.md, issue 14: kDotMaxM 16 -> 96
// took SPPO sampling from 8.2-8.7 s to 6.6-7.0 s).
constexpr int64_t kMatvecMaxM = 4;
constexpr int64_t kDotMaxM = 96;
constexpr int64_t kRowsMaxM = 8;
// The matrix-vector path reads each element of op(B) once, so it is bound by memory, not
// flops: it splits the columns over the pool from this many elements of B (1 MiB), in tasks of
// kMatvecTaskCols columns handed out by the pool's counter, so a thread that a busy machine
// deschedules holds up at most one task.
constexpr int64_t kMatvecParallelElems = int64_t(1) << 18;
constexpr int64_t kMatvecTaskCols = 64;
// How far ahead (floats along k) the transposed small-M kernel prefetches each W row.
constexpr int64_t kRowsPrefetchK = 64;

// The micro-kernel computes C[0:mr, 0:nr] (= alpha * a * b + beta * C) for one tile:
// a is mr x kc packed k-major (a[k * mr + i]), b is kc x NR packed k-major (zero-padded past
// nr). beta == 0 never reads C.
using TileFn = void (*)(int mr, int nr, int64_t kc, const float* a, const float* b, float* c, int64_t ldc, float alpha,
                        float beta);

// The small-M kernels: C[0:M, j0:j1] = alpha * A * op(B) + beta * C with A (M, K) and B stored
// (N, K) (transposed: "rows" of B) or (K, N) ("cols"). Each reduces every C element exactly as
// its kernel set's micro-kernel does (the same K blocks of depth kcb, one accumulation chain in
// k order per element, the same alpha/beta epilogue), so a row's result is bit-identical
// whatever M is and whichever path ran: batched decoding relies on that to give each sequence
// the same tokens whatever else is in the batch.
using RowsFn = void (*)(int64_t M, int64_t j0, int64_t j1, int64_t K, int64_t kcb, const float* A, int64_t lda,
                        const float* B, int64_t ldb, float* C, int64_t ldc, float alpha, float beta);

// Transposing pack (see avx512_pack_t); nullptr: plain loops.
using PackTFn = void (*)(const float* src, int64_t ld, int rows, int64_t kc, int w, float* dst);

struct KernelSet {
  const char* name;
  int mr, nr;
  TileFn tile;
  RowsFn rows;  // B transposed, M <= kRowsMaxM; nullptr: M > kMatvecMaxM goes through the packed path
  PackTFn pack_t;
  RowsFn matvec_t, matvec_n;  // M <= kMatvecMaxM, B transposed / not
};

// ---------------------------------------------------------------------------------------------
// Portable kernel: plain loops the compiler vectorises with baseline SSE2.

constexpr int kPortMR = 4, kPortNR = 16;

template <int MR>
void port_tile_fixed(int nr, int64_t kc, const float* a, const float* b, float* c, int64_t ldc, float alpha,
                     float beta) {
  float acc[MR][kPortNR] = {};
  for (int64_t k = 0; k < kc; ++k) {
    for (int i = 0; i < MR; ++i) {
      float av = a[k * MR + i];
      for (int j = 0; j < kPortNR; ++j) acc[i][j] += av * b[k * kPortNR + j];
    }
  }
  for (int i = 0; i < MR; ++i) {
    float* ci = c + i * ldc;
    if (beta == 0.0f) {
      for (int j = 0; j < nr; ++j) ci[j] = alpha * acc[i][j];
    } else {
      for (int j = 0; j < nr; ++j) ci[j] = alpha * acc[i][j] + beta * ci[j];
    }
  }
}

void port_tile(int mr, int nr, int64_t kc, const float* a, const float* b, float* c, int64_t ldc, float alpha,
               float beta) {
  switch (mr) {
    case 1:
      return port_tile_fixed<1>(nr, kc, a, b, c, ldc, alpha, beta);
    case 2:
      return port_tile_fixed<2>(nr, kc, a, b, c, ldc, alpha, beta);
    case 3:
      return port_tile_fixed<3>(nr, kc, a, b, c, ldc, alpha, beta);
    default:
      return port_tile_fixed<4>(nr, kc, a, b, c, ldc, alpha, beta);
  }
}

// Portable pair: the portable tile's arithmetic (acc += a * b, then alpha * acc + beta * c), in
// groups of kPortNR columns.
template <bool kTransB>
void port_matvec(int64_t M, int64_t j0, int64_t j1, int64_t K, int64_t kcb, const float* A, int64_t lda, const float* B,
                 int64_t ldb, float* C, int64_t ldc, float alpha, float beta) {
  for (int64_t j = j0; j < j1; j += kPortNR) {
    const int nr = static_cast<int>(std::min<int64_t>(kPortNR, j1 - j));
    for (int64_t i = 0; i < M; ++i) {
      const float* ai = A + i * lda;
      float* ci = C + i * ldc + j;
      for (int64_t p0 = 0; p0 < K; p0 += kcb) {
        const int64_t p1 = std::min(K, p0 + kcb);
        float acc[kPortNR] = {};
        for (int64_t k = p0; k < p1; ++k) {
          const float av = ai[k];
          if (kTransB) {
            for (int jj = 0; jj < nr; ++jj) acc[jj] += av * B[(j + jj) * ldb + k];
          } else {
            for (int jj = 0; jj < nr; ++jj) acc[jj] += av * B[k * ldb + j + jj];
          }
        }
        const float beta_k = p0 == 0 ? beta : 1.0f;
        if (beta_k == 0.0f) {
          for (int jj = 0; jj < nr; ++jj) ci[jj] = alpha * acc[jj];
        } else {
          for (int jj = 0; jj < nr; ++jj) ci[jj] = alpha * acc[jj] + beta_k * ci[jj];
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// AVX2 kernel: 6 x 16 tile, 12 ymm accumulators.

#define SPPO_AVX2 __attribute__((target("avx2,fma")))
constexpr int kAvx2MR = 6, kAvx2NR = 16;

template <int MR>
SPPO_AVX2 void avx2_tile_fixed(int nr, int64_t kc, const float* __restrict a, const float* __restrict b, float* c,
                               int64_t ldc, float alpha, float beta) {
  __m256 acc0[MR], acc1[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) acc0[i] = acc1[i] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      __m256 av = _mm256_broadcast_ss(a + i);
      acc0[i] = _mm256_fmadd_ps(av, b0, acc0[i]);
      acc1[i] = _mm256_fmadd_ps(av, b1, acc1[i]);
    }
    a += MR;
    b += kAvx2NR;
  }
  __m256 va = _mm256_set1_ps(alpha), vb = _mm256_set1_ps(beta);
  if (nr == kAvx2NR) {
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      float* ci = c + i * ldc;
      if (beta == 0.0f) {
        _mm256_storeu_ps(ci, _mm256_mul_ps(acc0[i], va));
        _mm256_storeu_ps(ci + 8, _mm256_mul_ps(acc1[i], va));
      } else {
        _mm256_storeu_ps(ci, _mm256_fmadd_ps(acc0[i], va, _mm256_mul_ps(vb, _mm256_loadu_ps(ci))));
        _mm256_storeu_ps(ci + 8, _mm256_fmadd_ps(acc1[i], va, _mm256_mul_ps(vb, _mm256_loadu_ps(ci + 8))));
      }
    }
    return;
  }
  // Right-edge tile: spill and finish with the same arithmetic in scalar form.
  alignas(32) float t[kAvx2NR];
  for (int i = 0; i < MR; ++i) {
    float* ci = c + i * ldc;
    _mm256_store_ps(t, acc0[i]);
    _mm256_store_ps(t + 8, acc1[i]);
    for (int j = 0; j < nr; ++j) ci[j] = beta == 0.0f ? t[j] * alpha : __builtin_fmaf(t[j], alpha, beta * ci[j]);
  }
}

SPPO_AVX2 void avx2_tile(int mr, int nr, int64_t kc, const float* a, const float* b, float* c, int64_t ldc, float alpha,
                         float beta) {
  switch (mr) {
    case 1:
      return avx2_tile_fixed<1>(nr, kc, a, b, c, ldc, alpha, beta);
    case 2:
      return avx2_tile_fixed<2>(nr, kc, a, b, c, ldc, alpha, beta);
    case 3:
      return avx2_tile_fixed<3>(nr, kc, a, b, c, ldc, alpha, beta);
    case 4:
      return avx2_tile_fixed<4>(nr, kc, a, b, c, ldc, alpha, beta);
    case 5:
      return avx2_tile_fixed<5>(nr, kc, a, b, c, ldc, alpha, beta);
    default:
      return avx2_tile_fixed<6>(nr, kc, a, b, c, ldc, alpha, beta);
  }
}

// AVX2 matrix-vector pair. Outputs are stored as the 6 x 16 tile stores them: whole vectors as
// fma(acc, alpha, beta * c), partial ones through the same scalar fmaf, so the values match.
SPPO_AVX2 inline void avx2_store_out(float* c, int n, __m256 acc, float alpha, float beta) {
  if (n == 8) {
    const __m256 va = _mm256_set1_ps(alpha);
    if (beta == 0.0f) {
      _mm256_storeu_ps(c, _mm256_mul_ps(acc, va));
    } else {
      _mm256_storeu_ps(c, _mm256_fmadd_ps(acc, va, _mm256_mul_ps(_mm256_set1_ps(beta), _mm256_loadu_ps(c))));
    }
    return;
  }
  alignas(32) float t[8];
  _mm256_store_ps(t, acc);
  for (int j = 0; j < n; ++j) c[j] = beta == 0.0f ? t[j] * alpha : __builtin_fmaf(t[j], alpha, beta * c[j]);
}

// Lanes [0, n) all ones: a mask for _mm256_maskload_ps.
SPPO_AVX2 inline __m256i avx2_lane_mask(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// 8 x 8 in-register transpose: r[i] holds row i (8 values along k); col[kk] gets column kk.
SPPO_AVX2 inline void avx2_transpose8(const __m256 (&r)[8], __m256 (&col)[8]) {
  __m256 t[8], u[8];
#pragma GCC unroll 4
  for (int g = 0; g < 2; ++g) {
    t[4 * g + 0] = _mm256_unpacklo_ps(r[4 * g], r[4 * g + 1]);
    t[4 * g + 1] = _mm256_unpackhi_ps(r[4 * g], r[4 * g + 1]);
    t[4 * g + 2] = _mm256_unpacklo_ps(r[4 * g + 2], r[4 * g + 3]);
    t[4 * g + 3] = _mm256_unpackhi_ps(r[4 * g + 2], r[4 * g + 3]);
    // u[4g+q]: rows 4g..4g+3 of column q (low half) and of column 4+q (high half).
    u[4 * g + 0] = _mm256_shuffle_ps(t[4 * g + 0], t[4 * g + 2], 0x44);
    u[4 * g + 1] = _mm256_shuffle_ps(t[4 * g + 0], t[4 * g + 2], 0xEE);
    u[4 * g + 2] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
    u[4 * g + 3] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
  }
#pragma GCC unroll 4
  for (int q = 0; q < 4; ++q) {
    col[q] = _mm256_permute2f128_ps(u[q], u[4 + q], 0x20);
    col[4 + q] = _mm256_permute2f128_ps(u[q], u[4 + q], 0x31);
  }
}

// B transposed: C[0:MB, 0:8*G] from G groups of 8 W rows (the last has nr <= 8), each 8 x 8
// block transposed in registers; G groups side by side cover the FMA latency of one group's
// chain (see avx512_rows_block).
template <int MB, int G>
SPPO_AVX2 void avx2_rows_block(int nr, int64_t K, int64_t kcb, const float* A, int64_t lda, const float* B, int64_t ldb,
                               float* C, int64_t ldc, float alpha, float beta) {
  for (int64_t p0 = 0; p0 < K; p0 += kcb) {
    const int64_t p1 = std::min(K, p0 + kcb);
    __m256 acc[G][MB];
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g)
#pragma GCC unroll 8
      for (int i = 0; i < MB; ++i) acc[g][i] = _mm256_setzero_ps();
    for (int64_t k0 = p0; k0 < p1; k0 += 8) {
      const int kn = static_cast<int>(std::min<int64_t>(8, p1 - k0));
      const __m256i load_mask = avx2_lane_mask(kn);
      __m256 col[G][8];
#pragma GCC unroll 8
      for (int g = 0; g < G; ++g) {
        const int rows = g == G - 1 ? nr : 8;
        __m256 r[8];
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i)
          r[i] = i >= rows ? _mm256_setzero_ps()
                 : kn == 8 ? _mm256_loadu_ps(B + (g * 8 + i) * ldb + k0)
                           : _mm256_maskload_ps(B + (g * 8 + i) * ldb + k0, load_mask);
        avx2_transpose8(r, col[g]);
      }
      // Only the kn real columns enter the chain, as in the packed kernel.
      for (int kk = 0; kk < kn; ++kk)
#pragma GCC unroll 8
        for (int i = 0; i < MB; ++i) {
          const __m256 a = _mm256_broadcast_ss(A + i * lda + k0 + kk);
#pragma GCC unroll 8
          for (int g = 0; g < G; ++g) acc[g][i] = _mm256_fmadd_ps(a, col[g][kk], acc[g][i]);
        }
    }
    const float beta_k = p0 == 0 ? beta : 1.0f;
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g)
#pragma GCC unroll 8
      for (int i = 0; i < MB; ++i) avx2_store_out(C + i * ldc + g * 8, g == G - 1 ? nr : 8, acc[g][i], alpha, beta_k);
  }
}

// B not transposed: C[0:MB, 0:nr] (nr <= 8 * NV), NV vectors of 8 columns per B row.
template <int MB, int NV>
SPPO_AVX2 void avx2_cols_block(int nr, int64_t K, int64_t kcb, const float* A, int64_t lda, const float* B, int64_t ldb,
                               float* C, int64_t ldc, float alpha, float beta) {
  const int last = nr - 8 * (NV - 1);  // columns of the last vector, 1..8
  const __m256i last_mask = avx2_lane_mask(last);
  for (int64_t p0 = 0; p0 < K; p0 += kcb) {
    const int64_t p1 = std::min(K, p0 + kcb);
    __m256 acc[MB][NV];
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_setzero_ps();
    for (int64_t k = p0; k < p1; ++k) {
      const float* bk = B + k * ldb;
      __m256 b[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV - 1; ++v) b[v] = _mm256_loadu_ps(bk + 8 * v);
      b[NV - 1] = last == 8 ? _mm256_loadu_ps(bk + 8 * (NV - 1)) : _mm256_maskload_ps(bk + 8 * (NV - 1), last_mask);
#pragma GCC unroll 8
      for (int i = 0; i < MB; ++i) {
        const __m256 a = _mm256_broadcast_ss(A + i * lda + k);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_fmadd_ps(a, b[v], acc[i][v]);
      }
    }
    const float beta_k = p0 == 0 ? beta : 1.0f;
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v)
        avx2_store_out(C + i * ldc + 8 * v, v == NV - 1 ? last : 8, acc[i][v], alpha, beta_k);
  }
}

template <int MB>
SPPO_AVX2 void avx2_matvec_mb(bool transB, int64_t j0, int64_t j1, int64_t K, int64_t kcb, const float* A, int64_t lda,
                              const float* B, int64_t ldb, float* C, int64_t ldc, float alpha, float beta) {
  if (transB) {
    constexpr int G = MB == 1 ? 4 : MB == 2 ? 2 : 1;
    for (int64_t j = j0; j < j1;) {
      const float* bj = B + j * ldb;
      if (G > 1 && j1 - j >= 8 * G) {
        avx2_rows_block<MB, G>(8, K, kcb, A, lda, bj, ldb, C + j, ldc, alpha, beta);
        j += 8 * G;
      } else {
        const int nr = static_cast<int>(std::min<int64_t>(8, j1 - j));
        avx2_rows_block<MB, 1>(nr, K, kcb, A, lda, bj, ldb, C + j, ldc, alpha, beta);
        j += nr;
      }
    }
    return;
  }
  // 16 ymm registers: MB * NV accumulators + NV B vectors + 1 broadcast.
  constexpr int NV = MB == 1 ? 6 : MB == 2 ? 4 : MB == 3 ? 3 : 2;
  for (int64_t j = j0; j < j1; j += 8 * NV) {
    const int64_t n = std::min<int64_t>(8 * NV, j1 - j);
    if (n == 8 * NV) {
      avx2_cols_block<MB, NV>(8 * NV, K, kcb, A, lda, B + j, ldb, C + j, ldc, alpha, beta);
      continue;
    }
    // The last, narrower run: a vector at a time, never loading past column j1.
    for (int64_t jj = j; jj < j + n; jj += 8) {
      const int nr = static_cast<int>(std::min<int64_t>(8, j + n - jj));
      avx2_cols_block<MB, 1>(nr, K, kcb, A, lda, B + jj, ldb, C + jj, ldc, alpha, beta);
    }
  }
}

template <bool kTransB>
SPPO_AVX2 void avx2_matvec(int64_t M, int64_t j0, int64_t j1, int64_t K, int64_t kcb, const float* A, int64_t lda,
                           const float* B, int64_t ldb, float* C, int64_t ldc, float alpha, float beta) {
  using Fn = void (*)(bool, int64_t, int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, float*,
                      int64_t, float, float);
  static constexpr Fn kByRows[] = {avx2_matvec_mb<1>, avx2_matvec_mb<2>, avx2_matvec_mb<3>, avx2_matvec_mb<4>};
  kByRows[M - 1](kTransB, j0, j1, K, kcb, A, lda, B, ldb, C, ldc, alpha, beta);
}

// ---------------------------------------------------------------------------------------------
// GCC 12's AVX-512 intrinsics pass _mm512_undefined_ps() (a self-initialised variable) as the
// unused merge operand, which -Wall reports as uninitialised wherever they are inlined.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// AVX-512 kernel: 14 x 32 tile, 28 zmm accumulators + 2 B vectors + 1 broadcast = 31 registers.

#define SPPO_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
constexpr int kAvx512MR = 14, kAvx512NR = 32;

template <int MR>
SPPO_AVX512 void avx512_tile_fixed(int nr, int64_t kc, const float* __restrict a, const float* __restrict b, float* c,
                                   int64_t ldc, float alpha, float beta) {
  // C rows are ldc apart (often a page or more), so hardware prefetch does not find them:
  // ask for the tile now and it arrives while the K loop runs.
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc + 16), _MM_HINT_T0);
  }
  __m512 acc0[MR], acc1[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) acc0[i] = acc1[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    __m512 b0 = _mm512_load_ps(b), b1 = _mm512_load_ps(b + 16);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      __m512 av = _mm512_set1_ps(a[i]);
      acc0[i] = _mm512_fmadd_ps(av, b0, acc0[i]);
      acc1[i] = _mm512_fmadd_ps(av, b1, acc1[i]);
    }
    a += MR;
    b += kAvx512NR;
  }
  // Masks cover the right-edge tile; masked-off lanes are neither read nor written.
  __mmask16 m0 = nr >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << nr) - 1);
  __mmask16 m1 = nr >= 32 ? __mmask16(0xFFFF) : nr <= 16 ? __mmask16(0) : __mmask16((1u << (nr - 16)) - 1);
  __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    float* ci = c + i * ldc;
    if (beta == 0.0f) {
      _mm512_mask_storeu_ps(ci, m0, _mm512_mul_ps(acc0[i], va));
      _mm512_mask_storeu_ps(ci + 16, m1, _mm512_mul_ps(acc1[i], va));
    } else {
      __m512 c0 = _mm512_maskz_loadu_ps(m0, ci), c1 = _mm512_maskz_loadu_ps(m1, ci + 16);
      _mm512_mask_storeu_ps(ci, m0, _mm512_fmadd_ps(acc0[i], va, _mm512_mul_ps(vb, c0)));
      _mm512_mask_storeu_ps(ci + 16, m1, _mm512_fmadd_ps(acc1[i], va, _mm512_mul_ps(vb, c1)));
    }
  }
}

SPPO_AVX512 void avx512_tile(int mr, int nr, int64_t kc, const float* a, const float* b, float* c, int64_t ldc,
                             float alpha, float beta) {
  switch (mr) {
    case 1:
      return avx512_tile_fixed<1>(nr, kc, a, b, c, ldc, alpha, beta);
    case 2:
      return avx512_tile_fixed<2>(nr, kc, a, b, c, ldc, alpha, beta);
    case 3:
      return avx512_tile_fixed<3>(nr, kc, a, b, c, ldc, alpha, beta);
    case 4:
      return avx512_tile_fixed<4>(nr, kc, a, b, c, ldc, alpha, beta);
    case 5:
      return avx512_tile_fixed<5>(nr, kc, a, b, c, ldc, alpha, beta);
    case 6:
      return avx512_tile_fixed<6>(nr, kc, a, b, c, ldc, alpha, beta);
    case 7:
      return avx512_tile_fixed<7>(nr, kc, a, b, c, ldc, alpha, beta);
    case 8:
      return avx512_tile_fixed<8>(nr, kc, a, b, c, ldc, alpha, beta);
    case 9:
      return avx512_tile_fixed<9>(nr, kc, a, b, c, ldc, alpha, beta);
    case 10:
      return avx512_tile_fixed<10>(nr, kc, a, b, c, ldc, alpha, beta);
    case 11:
      return avx512_tile_fixed<11>(nr, kc, a, b, c, ldc, alpha, beta);
    case 12:
      return avx512_tile_fixed<12>(nr, kc, a, b, c, ldc, alpha, beta);
    case 13:
      return avx512_tile_fixed<13>(nr, kc, a, b, c, ldc, alpha, beta);
    default:
      return avx512_tile_fixed<14>(nr, kc, a, b, c, ldc, alpha, beta);
  }
}

// 16 x 16 in-register transpose: on entry r[i] holds row i (16 values along k), on exit
// col[kk] holds column kk (16 rows).
SPPO_AVX512 inline void avx512_transpose16(const __m512 (&r)[16], __m512 (&col)[16]) {
  // Stage 1+2: within each 128-bit lane j, u[4g+q] holds rows 4g..4g+3 of column 4j+q.
  __m512 u[16];
#pragma GCC unroll 4
  for (int g = 0; g < 4; ++g) {
    __m512d t0 = _mm512_castps_pd(_mm512_unpacklo_ps(r[4 * g], r[4 * g + 1]));
    __m512d t1 = _mm512_castps_pd(_mm512_unpackhi_ps(r[4 * g], r[4 * g + 1]));
    __m512d t2 = _mm512_castps_pd(_mm512_unpacklo_ps(r[4 * g + 2], r[4 * g + 3]));
    __m512d t3 = _mm512_castps_pd(_mm512_unpackhi_ps(r[4 * g + 2], r[4 * g + 3]));
    u[4 * g + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
    u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
    u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
    u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
  }
  // Stage 3+4: gather lane j of the four row groups into column 4j+q.
#pragma GCC unroll 4
  for (int q = 0; q < 4; ++q) {
    __m512 x = _mm512_shuffle_f32x4(u[q], u[4 + q], 0x88);
    __m512 y = _mm512_shuffle_f32x4(u[q], u[4 + q], 0xDD);
    __m512 x2 = _mm512_shuffle_f32x4(u[8 + q], u[12 + q], 0x88);
    __m512 y2 = _mm512_shuffle_f32x4(u[8 + q], u[12 + q], 0xDD);
    col[q] = _mm512_shuffle_f32x4(x, x2, 0x88);
    col[8 + q] = _mm512_shuffle_f32x4(x, x2, 0xDD);
    col[4 + q] = _mm512_shuffle_f32x4(y, y2, 0x88);
    col[12 + q] = _mm512_shuffle_f32x4(y, y2, 0xDD);
  }
}

// The columns of a full 16 x 16 block of W (16 rows ldb apart, 16 values along k from w), as
// avx512_transpose16 gives them, at half its shuffles: the two 128-bit-lane stages are done by
// the loads (each 4 x 4 sub-block of W lands in the lane it ends up in, through masked
// broadcasts that need no shuffle unit), leaving one in-lane 4 x 4 transpose per 4 columns.
// Also prefetches each of the 16 rows `ahead` floats further on: 16 interleaved row streams
// outrun the hardware prefetcher (past a row's end the prefetch is simply wasted).
SPPO_AVX512 inline void avx512_load_transposed16(const float* w, int64_t ldb, int64_t ahead, __m512 (&col)[16]) {
  // Row 4m + a is P[a] + m * 4 * ldb: 4 pointers and 3 offsets. The empty asm keeps the compiler
  // from folding them into 16 row pointers, which do not fit the integer registers and spill.
  const int64_t o1 = 4 * ldb, o2 = 8 * ldb, o3 = 12 * ldb;
  const float* P[4];
#pragma GCC unroll 4
  for (int a = 0; a < 4; ++a) {
    P[a] = w + a * ldb;
    asm("" : "+r"(P[a]));
  }
#pragma GCC unroll 4
  for (int a = 0; a < 4; ++a) {
    _mm_prefetch(reinterpret_cast<const char*>(P[a] + ahead), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(P[a] + o1 + ahead), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(P[a] + o2 + ahead), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(P[a] + o3 + ahead), _MM_HINT_T0);
  }
#pragma GCC unroll 4
  for (int b = 0; b < 4; ++b) {
    // y[a], lane m: W row 4m + a, k 4b .. 4b+3.
    __m512 y[4];
#pragma GCC unroll 4
    for (int a = 0; a < 4; ++a) {
      const float* p = P[a] + 4 * b;
      y[a] = _mm512_castps128_ps512(_mm_loadu_ps(p));
      y[a] = _mm512_mask_broadcast_f32x4(y[a], 0x00F0, _mm_loadu_ps(p + o1));
      y[a] = _mm512_mask_broadcast_f32x4(y[a], 0x0F00, _mm_loadu_ps(p + o2));
      y[a] = _mm512_mask_broadcast_f32x4(y[a], 0xF000, _mm_loadu_ps(p + o3));
    }
    // In-lane 4 x 4 transpose: column 4b+q gets, in lane m, rows 4m .. 4m+3.
    const __m512d t0 = _mm512_castps_pd(_mm512_unpacklo_ps(y[0], y[1]));
    const __m512d t1 = _mm512_castps_pd(_mm512_unpackhi_ps(y[0], y[1]));
    const __m512d t2 = _mm512_castps_pd(_mm512_unpacklo_ps(y[2], y[3]));
    const __m512d t3 = _mm512_castps_pd(_mm512_unpackhi_ps(y[2], y[3]));
    col[4 * b + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
    col[4 * b + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
    col[4 * b + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
    col[4 * b + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
  }
}

// Transposing pack: dst[k * w + r] = src[r * ld + k] for r < rows, k < kc, and zero for
// rows <= r < w. Done as 16 x 16 register transposes, since the scalar version of this
// (A for every non-transposed A, B for every transposed B) costs ~10% of a small-N gemm.
SPPO_AVX512 void avx512_pack_t(const float* src, int64_t ld, int rows, int64_t kc, int w, float* dst) {
  for (int r0 = 0; r0 < w; r0 += 16) {
    const int cr = std::max(0, std::min(16, rows - r0));
    const int lanes = std::min(16, w - r0);
    const __mmask16 store_mask = static_cast<__mmask16>((1u << lanes) - 1);
    for (int64_t k0 = 0; k0 < kc; k0 += 16) {
      const int kn = static_cast<int>(std::min<int64_t>(16, kc - k0));
      const __mmask16 load_mask = static_cast<__mmask16>((1u << kn) - 1);
      __m512 r[16], col[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i)
        r[i] = i < cr ? _mm512_maskz_loadu_ps(load_mask, src + (r0 + i) * ld + k0) : _mm512_setzero_ps();
      avx512_transpose16(r, col);
      for (int kk = 0; kk < kn; ++kk) _mm512_mask_storeu_ps(dst + (k0 + kk) * w + r0, store_mask, col[kk]);
    }
  }
}

// Very few rows times a transposed B (decode: x * W^T with W stored (N, K)): packing W would
// cost a write and a re-read of all of it, so each 16 x 16 block of W is transposed as it is
// loaded and used at once. Every C element is accumulated exactly as the packed micro-kernel
// does it (see RowsFn). C[0:MB, j0:j0+nr], nr <= 16, MB <= 8 (MB accumulators + 16 columns
// fit the 32 registers). Bound by the transposes, not by the FMAs: M = 1 and M = 4 take about
// the same time (running two column blocks side by side, to overlap M = 1's FMA chains, did
// not measure faster).
template <int MB>
SPPO_AVX512 void avx512_rows_block(int nr, int64_t K, int64_t kcb, const float* A, int64_t lda, const float* B,
                                   int64_t ldb, float* C, int64_t ldc, float alpha, float beta) {
  const __mmask16 out_mask = static_cast<__mmask16>((1u << nr) - 1);
  const __m512 va = _mm512_set1_ps(alpha);
  for (int64_t p0 = 0; p0 < K; p0 += kcb) {
    const int64_t p1 = std::min(K, p0 + kcb);
    __m512 acc[MB];
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t k0 = p0; k0 < p1; k0 += 16) {
      const int kn = static_cast<int>(std::min<int64_t>(16, p1 - k0));
      __m512 col[16];
      if (nr == 16 && kn == 16) {
        avx512_load_transposed16(B + k0, ldb, kRowsPrefetchK, col);
      } else {
        // Edge block: masked loads, then the register transpose.
        const __mmask16 load_mask = static_cast<__mmask16>((1u << kn) - 1);
        __m512 r[16];
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i)
          r[i] = i < nr ? _mm512_maskz_loadu_ps(load_mask, B + i * ldb + k0) : _mm512_setzero_ps();
        avx512_transpose16(r, col);
      }
      if (kn == 16) {
#pragma GCC unroll 16
        for (int kk = 0; kk < 16; ++kk)
#pragma GCC unroll 8
          for (int i = 0; i < MB; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(A[i * lda + k0 + kk]), col[kk], acc[i]);
      } else {
        // K-block tail: only the kn real columns enter the chain, as in the packed kernel.
        alignas(64) float cols[16 * 16];
#pragma GCC unroll 16
        for (int kk = 0; kk < 16; ++kk) _mm512_store_ps(cols + kk * 16, col[kk]);
        for (int kk = 0; kk < kn; ++kk) {
          const __m512 c = _mm512_load_ps(cols + kk * 16);
#pragma GCC unroll 8
          for (int i = 0; i < MB; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(A[i * lda + k0 + kk]), c, acc[i]);
        }
      }
    }
    // Later K blocks add onto what the earlier ones wrote (beta 1), as in the packed path.
    const float beta_k = p0 == 0 ? beta : 1.0f;
    const __m512 vb = _mm512_set1_ps(beta_k);
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) {
      float* ci = C + i * ldc;
      if (beta_k == 0.0f) {
        _mm512_mask_storeu_ps(ci, out_mask, _mm512_mul_ps(acc[i], va));
      } else {
        __m512 c0 = _mm512_maskz_loadu_ps(out_mask, ci);
        _mm512_mask_storeu_ps(ci, out_mask, _mm512_fmadd_ps(acc[i], va, _mm512_mul_ps(vb, c0)));
      }
    }
  }
}

// C[0:MB, j0:j1] in column blocks of 16.
template <int MB>
SPPO_AVX512 void avx512_rows_mb(int64_t j0, int64_t j1, int64_t K, int64_t kcb, const float* A, int64_t lda,
                                const float* B, int64_t ldb, float* C, int64_t ldc, float alpha, float beta) {
  for (int64_t j = j0; j < j1; j += 16) {
    const int nr = static_cast<int>(std::min<int64_t>(16, j1 - j));
    const float* bj = B + j * ldb;
    // The block's own loads prefetch each row kRowsPrefetchK ahead; start the next block's
    // rows now so their first lines are in flight when it begins.
    for (int64_t r = 16; r < std::min<int64_t>(32, j1 - j); ++r)
      for (int64_t k = 0; k < std::min(K, kRowsPrefetchK); k += 16)
        _mm_prefetch(reinterpret_cast<const char*>(bj + r * ldb + k), _MM_HINT_T1);
    avx512_rows_block<MB>(nr, K, kcb, A, lda, bj, ldb, C + j, ldc, alpha, beta);
  }
}

// C[0:M, j0:j1] for M <= kRowsMaxM, B transposed, in blocks of up to 8 rows.
SPPO_AVX512 void avx512_rows(int64_t M, int64_t j0, int64_t j1, int64_t K, int64_t kcb, const float* A, int64_t lda,
                             const float* B, int64_t ldb, float* C, int64_t ldc, float alpha, float beta) {
  using Fn = void (*)(int64_t, int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t,
                      float, float);
  static constexpr Fn kByRows[] = {avx512_rows_mb<1>, avx512_rows_mb<2>, avx512_rows_mb<3>, avx512_rows_mb<4>,
                                   avx512_rows_mb<5>, avx512_rows_mb<6>, avx512_rows_mb<7>, avx512_rows_mb<8>};
  for (int64_t i = 0; i < M; i += 8)
    kByRows[std::min<int64_t>(8, M - i) - 1](j0, j1, K, kcb, A + i * lda, lda, B, ldb, C + i * ldc, ldc, alpha, beta);
}

// Few rows times B stored (K, N) (matrix-vector with W not transposed): a row of B is already
// 16 output columns per vector, so C[0:MB, j:j+16*NV] is NV vectors of FMA chains fed by one
// broadcast of A per row and k, streaming B once: the packed kernel's arithmetic exactly
// (fma(a_ik, b_kj, acc) in k order per K block, same epilogue). NV vectors side by side cover
// the FMA latency.
template <int MB, int NV>
SPPO_AVX512 void avx512_cols_block(int nr, int64_t K, int64_t kcb, const float* A, int64_t lda, const float* B,
                                   int64_t ldb, float* C, int64_t ldc, float alpha, float beta) {
  __mmask16 mask[NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    const int n = std::max(0, std::min(16, nr - 16 * v));
    mask[v] = static_cast<__mmask16>((1u << n) - 1);
  }
  const __m512 va = _mm512_set1_ps(alpha);
  for (int64_t p0 = 0; p0 < K; p0 += kcb) {
    const int64_t p1 = std::min(K, p0 + kcb);
    __m512 acc[MB][NV];
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
    for (int64_t k = p0; k < p1; ++k) {
      const float* bk = B + k * ldb;
      __m512 b[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) b[v] = _mm512_maskz_loadu_ps(mask[v], bk + 16 * v);
#pragma GCC unroll 8
      for (int i = 0; i < MB; ++i) {
        const __m512 a = _mm512_set1_ps(A[i * lda + k]);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(a, b[v], acc[i][v]);
      }
    }
    const float beta_k = p0 == 0 ? beta : 1.0f;
    const __m512 vb = _mm512_set1_ps(beta_k);
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        float* ci = C + i * ldc + 16 * v;
        if (beta_k == 0.0f) {
          _mm512_mask_storeu_ps(ci, mask[v], _mm512_mul_ps(acc[i][v], va));
        } else {
          __m512 c0 = _mm512_maskz_loadu_ps(mask[v], ci);
          _mm512_mask_storeu_ps(ci, mask[v], _mm512_fmadd_ps(acc[i][v], va, _mm512_mul_ps(vb, c0)));
        }
      }
  }
}

template <int MB>
SPPO_AVX512 void avx512_cols_mb(int64_t j0, int64_t j1, int64_t K, int64_t kcb, const float* A, int64_t lda,
                                const float* B, int64_t ldb, float* C, int64_t ldc, float alpha, float beta) {
  constexpr int NV = MB == 1 ? 8 : 4;
  for (int64_t j = j0; j < j1; j += 16 * NV) {
    const int nr = static_cast<int>(std::min<int64_t>(16 * NV, j1 - j));
    avx512_cols_block<MB, NV>(nr, K, kcb, A, lda, B + j, ldb, C + j, ldc, alpha, beta);
  }
}

// C[0:M, j0:j1] for M <= kMatvecMaxM, B not transposed.
SPPO_AVX512 void avx512_cols(int64_t M, int64_t j0, int64_t j1, int64_t K, int64_t kcb, const float* A, int64_t lda,
                             const float* B, int64_t ldb, float* C, int64_t ldc, float alpha, float beta) {
  using Fn = void (*)(int64_t, int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t,
                      float, float);
  static constexpr Fn kByRows[] = {avx512_cols_mb<1>, avx512_cols_mb<2>, avx512_cols_mb<3>, avx512_cols_mb<4>};
  kByRows[M - 1](j0, j1, K, kcb, A, lda, B, ldb, C, ldc, alpha, beta);
}

#pragma GCC diagnostic pop

// One row of x·Wᵀ over weights packed once (pack_panel_sliver's layout over all N): NS slivers
// side by side, so 2·NS FMA chains cover the FMA latency where the tile kernel at one row runs
// two. Each element is reduced exactly as avx512_tile_fixed<1> reduces it (one chain in k order
// per K block, beta 1 after the first block, the same epilogue), so the row's bits are the
// packed path's, and so every other path's.
template <int NS>
SPPO_AVX512 void avx512_packed_row_block(int64_t N, int64_t K, int64_t kcb, int64_t s, const float* a, const float* bp,
                                         float* c, float alpha, float beta) {
  const int64_t n_sl = (N + kAvx512NR - 1) / kAvx512NR;
  __mmask16 m0[NS], m1[NS];
#pragma GCC unroll 4
  for (int q = 0; q < NS; ++q) {
    const int64_t nr = std::min<int64_t>(kAvx512NR, N - (s + q) * kAvx512NR);
    m0[q] = nr >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << nr) - 1);
    m1[q] = nr >= 32 ? __mmask16(0xFFFF) : nr <= 16 ? __mmask16(0) : __mmask16((1u << (nr - 16)) - 1);
  }
  const __m512 va = _mm512_set1_ps(alpha);
  for (int64_t p0 = 0; p0 < K; p0 += kcb) {
    const int64_t kc = std::min(kcb, K - p0);
    const float* b = bp + p0 * n_sl * kAvx512NR + s * kc * kAvx512NR;
    __m512 acc0[NS], acc1[NS];
#pragma GCC unroll 4
    for (int q = 0; q < NS; ++q) acc0[q] = acc1[q] = _mm512_setzero_ps();
    for (int64_t k = 0; k < kc; ++k) {
      const __m512 av = _mm512_set1_ps(a[p0 + k]);
#pragma GCC unroll 4
      for (int q = 0; q < NS; ++q) {
        const float* bq = b + q * kc * kAvx512NR + k * kAvx512NR;
        acc0[q] = _mm512_fmadd_ps(av, _mm512_load_ps(bq), acc0[q]);
        acc1[q] = _mm512_fmadd_ps(av, _mm512_load_ps(bq + 16), acc1[q]);
      }
    }
    const float beta_k = p0 == 0 ? beta : 1.0f;
    const __m512 vb = _mm512_set1_ps(beta_k);
#pragma GCC unroll 4
    for (int q = 0; q < NS; ++q) {
      float* cq = c + (s + q) * kAvx512NR;
      if (beta_k == 0.0f) {
        _mm512_mask_storeu_ps(cq, m0[q], _mm512_mul_ps(acc0[q], va));
        _mm512_mask_storeu_ps(cq + 16, m1[q], _mm512_mul_ps(acc1[q], va));
      } else {
        const __m512 c0 = _mm512_maskz_loadu_ps(m0[q], cq), c1 = _mm512_maskz_loadu_ps(m1[q], cq + 16);
        _mm512_mask_storeu_ps(cq, m0[q], _mm512_fmadd_ps(acc0[q], va, _mm512_mul_ps(vb, c0)));
        _mm512_mask_storeu_ps(cq + 16, m1[q], _mm512_fmadd_ps(acc1[q], va, _mm512_mul_ps(vb, c1)));
      }
    }
  }
}

// Slivers [s0, s1) of one row, four at a time.
SPPO_AVX512 void avx512_packed_row(int64_t N, int64_t K, int64_t kcb, int64_t s0, int64_t s1, const float* a,
                                   const float* bp, float* c, float alpha, float beta) {
  using Fn = void (*)(int64_t, int64_t, int64_t, int64_t, const float*, const float*, float*, float, float);
  static constexpr Fn kBySlivers[] = {avx512_packed_row_block<1>, avx512_packed_row_block<2>,
                                      avx512_packed_row_block<3>, avx512_packed_row_block<4>};
  for (int64_t s = s0; s < s1; s += 4)
    kBySlivers[std::min<int64_t>(4, s1 - s) - 1](N, K, kcb, s, a, bp, c, alpha, beta);
}

// ---------------------------------------------------------------------------------------------
// Kernel selection.

const KernelSet kPortable{"portable", kPortMR, kPortNR,           port_tile,
                          nullptr,    nullptr, port_matvec<true>, port_matvec<false>};
const KernelSet kAvx2{"avx2", kAvx2MR, kAvx2NR, avx2_tile, nullptr, nullptr, avx2_matvec<true>, avx2_matvec<false>};
const KernelSet kAvx512{"avx512",    kAvx512MR,     kAvx512NR,   avx512_tile,
                        avx512_rows, avx512_pack_t, avx512_rows, avx512_cols};

const KernelSet* detect_kernel() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq"))
    return &kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return &kAvx2;
  return &kPortable;
}

const KernelSet*& active_kernel() {
  static const KernelSet* k = detect_kernel();
  return k;
}

// ---------------------------------------------------------------------------------------------
// Packing.

// dst[k * w + r] = src[r * ld + k] (r < rows), zero for rows <= r < w.
void pack_t(const KernelSet& ks, const float* src, int64_t ld, int rows, int64_t kc, int w, float* dst) {
  if (ks.pack_t) return ks.pack_t(src, ld, rows, kc, w, dst);
  if (rows < w) std::memset(dst, 0, sizeof(float) * kc * w);
  for (int r = 0; r < rows; ++r)
    for (int64_t k = 0; k < kc; ++k) dst[k * w + r] = src[r * ld + k];
}

// op(A) rows [i0, i0+mc) x k [p0, p0+kc) into slivers of mr rows, each stored k-major
// (dst[k * rows + i]); the last sliver holds the remaining rows, packed just as densely.
void pack_a(const KernelSet& ks, bool transA, const float* A, int64_t lda, int64_t i0, int64_t mc, int64_t p0,
            int64_t kc, int mr, float* dst) {
  for (int64_t is = 0; is < mc; is += mr) {
    int rows = static_cast<int>(std::min<int64_t>(mr, mc - is));
    if (transA) {
      // A is (K, M): each k contributes `rows` contiguous values.
      const float* src = A + p0 * lda + i0 + is;
      for (int64_t k = 0; k < kc; ++k) {
        std::memcpy(dst + k * rows, src + k * lda, rows * sizeof(float));
      }
    } else {
      pack_t(ks, A + (i0 + is) * lda + p0, lda, rows, kc, rows, dst);
    }
    dst += rows * kc;
  }
}

// op(B) k [p0, p0+kc) x columns [j0, j0+nr) into one sliver dst[k * NR + j], zero-padded
// past the last valid column so the kernel can always load full vectors.
void pack_b_sliver(const KernelSet& ks, bool transB, const float* B, int64_t ldb, int64_t p0, int64_t kc, int64_t j0,
                   int nr, int NR, float* dst) {
  if (transB) {
    // B is (N, K): column j of op(B) is row j of B.
    pack_t(ks, B + j0 * ldb + p0, ldb, nr, kc, NR, dst);
  } else {
    for (int64_t k = 0; k < kc; ++k) {
      const float* src = B + (p0 + k) * ldb + j0;
      float* d = dst + k * NR;
      std::memcpy(d, src, nr * sizeof(float));
      for (int j = nr; j < NR; ++j) d[j] = 0.0f;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Driver.

// Task t of packing op(B)[:, jc:jc+nc] into the shared panel: layout [k block][sliver][k][NR],
// so the sliver (kb, s) starts at p0 * n_sl * NR + s * kc * NR.
void pack_panel_sliver(const KernelSet& ks, bool transB, const float* B, int64_t ldb, int64_t K, int64_t kcb,
                       int64_t jc, int64_t nc, int64_t t, float* bp) {
  const int NR = ks.nr;
  const int64_t n_sl = (nc + NR - 1) / NR;
  const int64_t kb = t / n_sl, s = t % n_sl;
  const int64_t p0 = kb * kcb, kc = std::min(kcb, K - p0);
  const int nr = static_cast<int>(std::min<int64_t>(NR, nc - s * NR));
  pack_b_sliver(ks, transB, B, ldb, p0, kc, jc + s * NR, nr, NR, bp + p0 * n_sl * NR + s * kc * NR);
}

using RunFn = std::function<void(int64_t, const std::function<void(int64_t, int)>&)>;

// C[:, jc:jc+nc] from the packed panel bp of op(B)[:, jc:jc+nc] (pack_panel_sliver's layout), with
// T threads: tasks of (row block) x (group of slivers), each reducing its tiles over the K blocks
// in order.
void multiply_panel(const KernelSet& ks, bool transA, int64_t M, int64_t N, int64_t K, int64_t kcb, float alpha,
                    const float* A, int64_t lda, const float* bp, int64_t jc, int64_t nc, float beta, float* C,
                    int64_t ldc, int T, const RunFn& run) {
  const int MR = ks.mr, NR = ks.nr;
  const int64_t n_kb = (K + kcb - 1) / kcb;
  const int64_t n_sl = (nc + NR - 1) / NR;
  // Row blocks: about kMC rows each, an equal number of MR slivers per block (to within one)
  // and, when there are several, a multiple of the thread count so the threads finish together.
  const int64_t m_sl = (M + MR - 1) / MR;
  int64_t n_mb = (m_sl + kMC / MR - 1) / (kMC / MR);
  if (n_mb > 1) n_mb = std::min(m_sl, (n_mb + T - 1) / T * T);
  // Column groups: split the B slivers too when there are too few row blocks to feed the
  // threads (small M, e.g. decode).
  int64_t n_nb = 1;
  if (n_mb < 2 * T) n_nb = std::min(n_sl, (2 * T + n_mb - 1) / n_mb);

  run(n_mb * n_nb, [&](int64_t t, int) {
    const int64_t mb = t / n_nb, nb = t % n_nb;
    const int64_t sl0 = m_sl * mb / n_mb, sl1 = m_sl * (mb + 1) / n_mb;
    const int64_t i0 = sl0 * MR, i1 = std::min(M, sl1 * MR);
    const int64_t s0 = n_sl * nb / n_nb, s1 = n_sl * (nb + 1) / n_nb;
    if (i1 <= i0 || s1 <= s0) return;
    const int64_t mc = i1 - i0;
    float* ap = tl_apack.get(static_cast<size_t>(((mc + MR - 1) / MR) * MR) * kcb);
    for (int64_t kb = 0; kb < n_kb; ++kb) {
      const int64_t p0 = kb * kcb, kc = std::min(kcb, K - p0);
      // Later K blocks add onto what the earlier ones wrote.
      const float beta_k = kb == 0 ? beta : 1.0f;
      pack_a(ks, transA, A, lda, i0, mc, p0, kc, MR, ap);
      for (int64_t s = s0; s < s1; ++s) {
        const float* bs = bp + p0 * n_sl * NR + s * kc * NR;
        const int64_t j = jc + s * NR;
        const int nr = static_cast<int>(std::min<int64_t>(NR, N - j));
        const float* as = ap;
        for (int64_t i = i0; i < i1; i += MR) {
          const int mr = static_cast<int>(std::min<int64_t>(MR, i1 - i));
          ks.tile(mr, nr, kc, as, bs, C + i * ldc + j, ldc, alpha, beta_k);
          as += mr * kc;
        }
      }
    }
  });
}

void gemm_f32(const KernelSet& ks, bool transA, bool transB, int64_t M, int64_t N, int64_t K, float alpha,
              const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0 || alpha == 0.0f) {
    // Nothing to accumulate: C = beta * C (beta == 0 overwrites without reading).
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == 0.0f ? 0.0f : beta * C[i * ldc + j];
    return;
  }
  ThreadPool& pool = cpu_pool();
  const bool parallel = 2.0 * M * N * K >= kMinParallelFlops;
  const int T = parallel ? pool.size() : 1;
  auto run = [&](int64_t n_tasks, const std::function<void(int64_t, int)>& fn) {
    if (parallel) return pool.run(n_tasks, fn);
    for (int64_t t = 0; t < n_tasks; ++t) fn(t, 0);
  };
  // K blocks of equal depth (at most kKC) rather than kKC plus a short remainder. Both paths
  // reduce over exactly these blocks, which is what makes a row's result independent of M.
  const int64_t n_kb = (K + kKC - 1) / kKC;
  const int64_t kcb = (K + n_kb - 1) / n_kb;
  const int MR = ks.mr, NR = ks.nr;
  if (M <= kMatvecMaxM) {
    // A transposed is (K, M): its M columns become M contiguous rows (M * K floats, negligible
    // beside B), so one pair of kernels serves all four cases.
    const float* a = A;
    int64_t la = lda;
    if (transA) {
      float* rows = tl_arows.get(static_cast<size_t>(M * K));
      for (int64_t k = 0; k < K; ++k)
        for (int64_t i = 0; i < M; ++i) rows[i * K + k] = A[k * lda + i];
      a = rows, la = K;
    }
    const RowsFn kernel = transB ? ks.matvec_t : ks.matvec_n;
    const int64_t units = (N + kMatvecTaskCols - 1) / kMatvecTaskCols;
    const int64_t n_tasks = N * K >= kMatvecParallelElems ? std::min<int64_t>(units, 4 * pool.size()) : 1;
    auto one = [&](int64_t t, int) {
      const int64_t j0 = units * t / n_tasks * kMatvecTaskCols;
      const int64_t j1 = std::min(N, units * (t + 1) / n_tasks * kMatvecTaskCols);
      kernel(M, j0, j1, K, kcb, a, la, B, ldb, C, ldc, alpha, beta);
    };
    if (n_tasks > 1) return pool.run(n_tasks, one);
    return one(0, 0);
  }
  if (ks.rows && transB && !transA && M <= kDotMaxM) {
    // Few rows (decode): W is never packed into the shared panel. Either way each output is
    // reduced exactly as in the packed path below, so rows come out bit-identical whatever M is.
    const int64_t groups = (N + 15) / 16;
    const int64_t n_sl = (N + NR - 1) / NR;
    const int64_t n_tasks = std::min<int64_t>(T, M <= kRowsMaxM ? groups : n_sl);
    run(n_tasks, [&](int64_t t, int) {
      // One contiguous share of W rows per thread: when the same layer runs again, each
      // thread's share is still in its own L2.
      if (M <= kRowsMaxM) {
        const int64_t j0 = groups * t / n_tasks * 16, j1 = std::min(N, groups * (t + 1) / n_tasks * 16);
        ks.rows(M, j0, j1, K, kcb, A, lda, B, ldb, C, ldc, alpha, beta);
        return;
      }
      // More rows: transposing each W block once for all of them pays, so pack one NR-wide
      // sliver for one K block into L1 and run the packed path's own micro-kernel on it.
      const int64_t s0 = n_sl * t / n_tasks, s1 = n_sl * (t + 1) / n_tasks;
      const int64_t tiles = (M + MR - 1) / MR;
      const int mr = static_cast<int>((M + tiles - 1) / tiles);
      float* ap = tl_apack.get(static_cast<size_t>(M) * kcb);     // (M, kc) in mr-row slivers
      float* bs = tl_bsliver.get(static_cast<size_t>(kcb) * NR);  // (kc, NR)
      for (int64_t kb = 0; kb < n_kb; ++kb) {
        const int64_t p0 = kb * kcb, kc = std::min(kcb, K - p0);
        const float beta_k = kb == 0 ? beta : 1.0f;
        pack_a(ks, false, A, lda, 0, M, p0, kc, mr, ap);
        for (int64_t s = s0; s < s1; ++s) {
          const int64_t j = s * NR;
          const int nr = static_cast<int>(std::min<int64_t>(NR, N - j));
          pack_b_sliver(ks, true, B, ldb, p0, kc, j, nr, NR, bs);
          if (s + 1 < s1) {
            // The next sliver's W rows are NR short streams the hardware prefetcher barely
            // catches; ask for them now so they arrive while this sliver computes.
            const int64_t jn = j + NR, rows_next = std::min<int64_t>(NR, N - jn);
            for (int64_t r = 0; r < rows_next; ++r)
              for (int64_t k = 0; k < kc; k += 16)
                _mm_prefetch(reinterpret_cast<const char*>(B + (jn + r) * ldb + p0 + k), _MM_HINT_T1);
          }
          const float* as = ap;
          for (int64_t i = 0; i < M; i += mr) {
            const int rows = static_cast<int>(std::min<int64_t>(mr, M - i));
            ks.tile(rows, nr, kc, as, bs, C + i * ldc + j, ldc, alpha, beta_k);
            as += rows * kc;
          }
        }
      }
    });
    return;
  }
  // NC: as wide as the packed-B budget allows, in whole slivers, split into equal panels.
  const int64_t nc_cap = std::max<int64_t>(NR, kBPanelFloats / K / NR * NR);
  const int64_t n_jc = (N + nc_cap - 1) / nc_cap;
  const int64_t nc_max = ((N + n_jc - 1) / n_jc + NR - 1) / NR * NR;
  for (int64_t jc = 0; jc < N; jc += nc_max) {
    const int64_t nc = std::min(nc_max, N - jc);
    const int64_t n_sl = (nc + NR - 1) / NR;
    float* bp = tl_bpack.get(static_cast<size_t>(K) * n_sl * NR);
    run(n_kb * n_sl, [&](int64_t t, int) { pack_panel_sliver(ks, transB, B, ldb, K, kcb, jc, nc, t, bp); });
    multiply_panel(ks, transA, M, N, K, kcb, alpha, A, lda, bp, jc, nc, beta, C, ldc, T, run);
  }
}

// ---------------------------------------------------------------------------------------------
// Weights packed once (pack_weight): the shared panel's layout over all N, after a header.

// The header: which kernel's sliver width and which shape the copy was packed for.
constexpr int64_t kPackedHeaderFloats = 16;  // 64 bytes: the panel stays 64-byte aligned
struct PackedHeader {
  int64_t nr, n, k;
};

}  // namespace

size_t packed_weight_floats(int64_t N, int64_t K) {
  // The widest kernel's slivers (AVX-512's 32 columns), so the size does not depend on the kernel.
  return size_t(kPackedHeaderFloats + K * ((N + kAvx512NR - 1) / kAvx512NR) * kAvx512NR);
}

int64_t packed_weight_min_rows() { return kMatvecMaxM + 1; }

void pack_weight(const float* W, int64_t ldw, int64_t N, int64_t K, float* dst) {
  const KernelSet& ks = *active_kernel();
  // The micro-kernels load the slivers with aligned loads.
  SPPO_REQUIRE(reinterpret_cast<uintptr_t>(dst) % 64 == 0, "pack_weight: the copy must be 64-byte aligned");
  const PackedHeader h{ks.nr, N, K};
  std::memcpy(dst, &h, sizeof h);
  const int64_t n_kb = (K + kKC - 1) / kKC, kcb = (K + n_kb - 1) / n_kb, n_sl = (N + ks.nr - 1) / ks.nr;
  cpu_pool().run(n_kb * n_sl, [&](int64_t t, int) {
    pack_panel_sliver(ks, true, W, ldw, K, kcb, 0, N, t, dst + kPackedHeaderFloats);
  });
}

void gemm_packed_weight(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* W,
                        int64_t ldw, const float* packed, float beta, float* C, int64_t ldc) {
  const KernelSet& ks = *active_kernel();
  PackedHeader h;
  std::memcpy(&h, packed, sizeof h);
  SPPO_REQUIRE(h.nr == ks.nr && h.n == N && h.k == K, "gemm_packed_weight: the copy was packed as ", h.n, " x ", h.k,
               " for slivers of ", h.nr, ", asked for ", N, " x ", K, " with kernel ", ks.name, " (slivers of ", ks.nr,
               ")");
  // Alpha 0 or an empty K go through gemm's own handling, which gives the bits the packed path
  // gives. Few rows stream the packed slivers too: each tile is one contiguous read of W, where the
  // matrix-vector path over W itself transposes it in registers as it goes.
  if (M <= 0 || N <= 0) return;
  if (K <= 0 || alpha == 0.0f) return gemm_f32(ks, false, true, M, N, K, alpha, A, lda, W, ldw, beta, C, ldc);
  ThreadPool& pool = cpu_pool();
  const bool parallel = 2.0 * M * N * K >= kMinParallelFlops;
  auto run = [&](int64_t n_tasks, const std::function<void(int64_t, int)>& fn) {
    if (parallel) return pool.run(n_tasks, fn);
    for (int64_t t = 0; t < n_tasks; ++t) fn(t, 0);
  };
  const int64_t n_kb = (K + kKC - 1) / kKC, kcb = (K + n_kb - 1) / n_kb;
  if (M == 1 && &ks == &kAvx512) {
    // Single-sequence decode: groups of four slivers handed out as tasks.
    const int64_t n_sl = (N + ks.nr - 1) / ks.nr, groups = (n_sl + 3) / 4;
    const int64_t n_tasks = parallel ? std::min<int64_t>(groups, 4 * pool.size()) : 1;
    return run(n_tasks, [&](int64_t t, int) {
      const int64_t s0 = groups * t / n_tasks * 4, s1 = std::min(n_sl, groups * (t + 1) / n_tasks * 4);
      avx512_packed_row(N, K, kcb, s0, s1, A, packed + kPackedHeaderFloats, C, alpha, beta);
    });
  }
  multiply_panel(ks, false, M, N, K, kcb, alpha, A, lda, packed + kPackedHeaderFloats, 0, N, beta, C, ldc,
                 parallel ? pool.size() : 1, run);
}

// Test hook (not in gemm.h): forces "avx512", "avx2" or "portable" (only on a CPU that has
// it) or, with nullptr or "auto", goes back to the detected kernel. Returns false if refused.
bool gemm_force_kernel(const char* name) {
  const KernelSet* best = detect_kernel();
  if (!name || std::strcmp(name, "auto") == 0) {
    active_kernel() = best;
    return true;
  }
  const KernelSet* order[] = {&kAvx512, &kAvx2, &kPortable};
  bool reachable = false;
  for (const KernelSet* k : order) {
    if (k == best) reachable = true;
    if (reachable && std::strcmp(k->name, name) == 0) {
      active_kernel() = k;
      return true;
    }
  }
  return false;
}

const char* gemm_kernel_name() { return active_kernel()->name; }

void gemm(bool transA, bool transB, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
          const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  gemm_f32(*active_kernel(), transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

// Float64 is only used by gradient checks: row-parallel, straightforward loops. Each row of C
// is computed by one task with a fixed k order, so it is deterministic too.
void gemm(bool transA, bool transB, int64_t M, int64_t N, int64_t K, double alpha, const double* A, int64_t lda,
          const double* B, int64_t ldb, double beta, double* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  cpu_pool().parallel_for(M, 8, [&](int64_t r0, int64_t r1) {
    thread_local std::vector<double> acc;
    acc.assign(static_cast<size_t>(N), 0.0);
    for (int64_t i = r0; i < r1; ++i) {
      std::fill(acc.begin(), acc.end(), 0.0);
      auto a = [&](int64_t k) { return transA ? A[k * lda + i] : A[i * lda + k]; };
      if (transB) {
        for (int64_t j = 0; j < N; ++j) {
          const double* bj = B + j * ldb;
          double s = 0.0;
          for (int64_t k = 0; k < K; ++k) s += a(k) * bj[k];
          acc[j] = s;
        }
      } else {
        for (int64_t k = 0; k < K; ++k) {
          const double ak = a(k);
          const double* bk = B + k * ldb;
          for (int64_t j = 0; j < N; ++j) acc[j] += ak * bk[j];
        }
      }
      double* ci = C + i * ldc;
      for (int64_t j = 0; j < N; ++j) ci[j] = beta == 0.0 ? alpha * acc[j] : alpha * acc[j] + beta * ci[j];
    }
  });
}

}  // namespace sppo::cpu
