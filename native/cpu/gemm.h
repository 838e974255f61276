// Dense matrix multiply for the CPU backend: the hot path of every linear layer.
#pragma once
#include <cstddef>
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

// x * W^T against a copy of W (N, K) packed once, for code that multiplies by the same weights
// many times (a generator's decode steps): the shared panel's layout over all of N, so no call
// packs or transposes W again. Each row of C comes out bit-identical to gemm(false, true, ...) on
// W itself, whatever M is (one row streams four slivers at a time: 0.95x OpenBLAS's sgemv on the
// `small` LM head, where the matrix-vector path over W reaches 0.5x). packed_weight_min_rows: the
// fewest rows a step should have for a generator to pack (below it, one call's steps do not repay
// the pass over W; bench/NOTES.md). packed_weight_floats: the copy's size
// (whatever the kernel), 64-byte aligned. pack_weight packs for the running kernel; gemm_packed_weight refuses a
// copy packed for another kernel or shape.
size_t packed_weight_floats(int64_t N, int64_t K);
int64_t packed_weight_min_rows();
void pack_weight(const float* W, int64_t ldw, int64_t N, int64_t K, float* dst);
void gemm_packed_weight(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* W,
                        int64_t ldw, const float* packed, float beta, float* C, int64_t ldc);

// Which float kernel the running machine uses: "avx512", "avx2" or "portable".
const char* gemm_kernel_name();

}  // namespace sppo::cpu
