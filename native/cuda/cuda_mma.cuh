// Warp-level tensor-core and async-copy primitives (sm_80 and later), one PTX instruction each,
// for the attention kernels that keep scores and probabilities in registers. Each function is
// small and self-contained so the fragment layouts below (those of the PTX ISA) are the whole
// contract between the kernels and the hardware.
//
// Fragment layouts, with g = lane / 4 and t = lane % 4 (PTX ISA, "Matrix Fragments for
// mma.m16n8k16" with .bf16, and "ldmatrix"):
//   A (16x16, row-major), four .b32 registers of two bf16 (low half first):
//     a0 = A[g][2t, 2t+1]   a1 = A[g+8][2t, 2t+1]   a2 = A[g][2t+8, 2t+9]   a3 = A[g+8][2t+8, 2t+9]
//   B (16x8, k x n), two registers:   b0 = B[2t, 2t+1][g]   b1 = B[2t+8, 2t+9][g]
//   C, D (16x8 fp32):   c0, c1 = C[g][2t, 2t+1]   c2, c3 = C[g+8][2t, 2t+1]
//   ldmatrix .x4: lanes 8j .. 8j+7 give the row addresses of 8x8 matrix j (rows 16-byte
//     aligned); register j of every lane receives M_j[g][2t, 2t+1], or with .trans
//     M_j[2t][g] and M_j[2t+1][g].
// So an accumulator tile pair (C of n-tiles 2c and 2c+1) is, packed to bf16, the A fragment of
// the 16-column chunk c: the FlashAttention-2 register reuse of S/P as the next product's A.
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

namespace sppo::cuda {

// d += a · b for one 16x8 tile (k = 16), bf16 inputs, fp32 accumulators.
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t smem_address(const void* p) { return uint32_t(__cvta_generic_to_shared(p)); }

// Four 8x8 bf16 matrices from shared memory; `row` is this lane's row address (see above).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row))
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row))
               : "memory");
}

// 16 bytes global -> shared, asynchronously (visible to this thread after cp_async_wait, to the
// block after a barrier that follows it). !valid writes 16 zero bytes and reads nothing.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(dst)), "l"(src), "r"(valid ? 16 : 0)
               : "memory");
}
// Closes the group of copies issued since the last commit (an empty group is allowed).
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most `Pending` of this thread's most recent groups are still in flight.
template <int Pending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending) : "memory");
}

// 2^x, one MUFU.EX2 (ex2.approx.ftz: about 2 ulp; denormal results flush to zero, exp2(-inf) = 0).
// exp2f without fast-math adds the denormal scaling around it, which a probability below 2^-126
// does not need.
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Two floats as a bf16 pair (round to nearest even), `lo` in the low half: an A-fragment register.
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

}  // namespace sppo::cuda
