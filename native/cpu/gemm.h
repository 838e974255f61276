// Dense matrix multiply for the CPU backend: the hot path of every linear layer.
#pragma once
#include <cstdint>

namespace sppo::cpu {

// Row-major: C(M,N) = alpha * op(A) * op(B) + beta * C, where op(A) is (M,K) and op(B) is (K,N).
// transA: A is stored (K,M) with row stride lda; else (M,K). transB: B is stored (N,K); else (K,N).
// beta == 0 overwrites C without reading it (C may hold NaN). Uses the shared thread pool;
// results are bit-identical run to run for the same thread count and shapes, and a row of C
// comes out bit-identical whatever M is (batched decoding's batch invariance rests on it).
void gemm(bool transA, bool transB, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
          const float* B, int64_t ldb, float beta, float* C, int64_t ldc);
void gemm(bool transA, bool transB, int64_t M, int64_t N, int64_t K, double alpha, const double* A, int64_t lda,
          const double* B, int64_t ldb, double beta, double* C, int64_t ldc);

// Which float kernel the running machine uses: "avx512", "avx2" or "portable".
const char* gemm_kernel_name();

}  // namespace sppo::cpu
