// GEMMs of the CUDA backend through cuBLASLt, loaded with dlopen on first use so the engine builds
// without cuBLAS headers and loads (falling back to the CPU) where cuBLAS is missing. bf16 A and
// B, fp32 accumulation and scale, C in bf16 (gemm) or fp32 (gemm_master); or fp32 A, B and C
// (gemm_fp32: the fp32 encoder, CUBLAS_COMPUTE_32F, which never uses TF32). One matmul descriptor,
// layout set and heuristic choice per shape, cached; one 32 MiB workspace per CudaOps.
#include <dlfcn.h>
#include <library_types.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <functional>
#include <string>
#include <type_traits>
#include <unordered_map>

#include "core/error.h"
#include "cuda/cuda_common.cuh"
#include "cuda/cuda_ops.cuh"

namespace sppo::cuda {

// ---------------------------------------------------------------------------------------------
// The subset of the cuBLASLt C API used here, declared by hand (no cuBLAS headers needed).
// Verified against NVIDIA's headers as stored in public repositories:
//  [L126] zspace/system.cuda-12.6, include/cublasLt.h (CUDA 12.6)
//  [L11]  ggerganov/llama.cpp, include/cuda/cublasLt.h (2021 copy: same values, an ABI NVIDIA keeps)
//  [B130] leomaxwell972/CU13ToolKit_Includes, include/cublas_api.h (CUBLAS_VER_MAJOR 13, 13.0.0)
// cudaDataType_t (CUDA_R_16BF = 14, CUDA_R_32F = 0) comes from the toolkit's <library_types.h>.
// ---------------------------------------------------------------------------------------------
namespace lt {

// [B130] cublasStatus_t.
enum cublasStatus_t : int {
  CUBLAS_STATUS_SUCCESS = 0,
  CUBLAS_STATUS_NOT_INITIALIZED = 1,
  CUBLAS_STATUS_ALLOC_FAILED = 3,
  CUBLAS_STATUS_INVALID_VALUE = 7,
  CUBLAS_STATUS_ARCH_MISMATCH = 8,
  CUBLAS_STATUS_MAPPING_ERROR = 11,
  CUBLAS_STATUS_EXECUTION_FAILED = 13,
  CUBLAS_STATUS_INTERNAL_ERROR = 14,
  CUBLAS_STATUS_NOT_SUPPORTED = 15,
  CUBLAS_STATUS_LICENSE_ERROR = 16,
};
// [B130] cublasOperation_t (stored as int32_t in the TRANSA / TRANSB attributes, [L126]).
enum cublasOperation_t : int { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 };
// [B130] cublasComputeType_t: CUBLAS_COMPUTE_32F = 68 ("float - default": fp32 accumulation;
// bf16 inputs run on tensor cores).
enum cublasComputeType_t : int { CUBLAS_COMPUTE_32F = 68 };
// [L126] cublasLtMatmulDescAttributes_t (the same values in [L11]).
enum cublasLtMatmulDescAttributes_t : int {
  CUBLASLT_MATMUL_DESC_COMPUTE_TYPE = 0,
  CUBLASLT_MATMUL_DESC_SCALE_TYPE = 1,
  CUBLASLT_MATMUL_DESC_POINTER_MODE = 2,
  CUBLASLT_MATMUL_DESC_TRANSA = 3,
  CUBLASLT_MATMUL_DESC_TRANSB = 4,
};
// [L126] cublasLtMatmulPreferenceAttributes_t: MAX_WORKSPACE_BYTES takes a uint64_t, the
// MIN_ALIGNMENT_*_BYTES a uint32_t (default 256: an unset value would let the heuristic pick
// kernels that need 256-byte-aligned pointers).
enum cublasLtMatmulPreferenceAttributes_t : int {
  CUBLASLT_MATMUL_PREF_SEARCH_MODE = 0,
  CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES = 1,
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES = 5,
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES = 6,
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES = 7,
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES = 8,
};

// [L126] Opaque handle and semi-opaque descriptors: "typedef struct cublasLtContext*
// cublasLtHandle_t"; the descriptors are pointers to {uint64_t data[32]} (matmul) and
// {uint64_t data[8]} (layout, preference); cublasLtMatmulAlgo_t is {uint64_t data[8]} by value.
struct cublasLtContext;
using cublasLtHandle_t = cublasLtContext*;
struct cublasLtMatmulDescOpaque_t {
  uint64_t data[32];
};
using cublasLtMatmulDesc_t = cublasLtMatmulDescOpaque_t*;
struct cublasLtMatrixLayoutOpaque_t {
  uint64_t data[8];
};
using cublasLtMatrixLayout_t = cublasLtMatrixLayoutOpaque_t*;
struct cublasLtMatmulPreferenceOpaque_t {
  uint64_t data[8];
};
using cublasLtMatmulPreference_t = cublasLtMatmulPreferenceOpaque_t*;
struct cublasLtMatmulAlgo_t {
  uint64_t data[8];
};
// [L126] and [L11]: { algo; size_t workspaceSize; cublasStatus_t state; float wavesCount; int reserved[4]; }.
struct cublasLtMatmulHeuristicResult_t {
  cublasLtMatmulAlgo_t algo;
  size_t workspaceSize;
  cublasStatus_t state;
  float wavesCount;
  int reserved[4];
};
static_assert(sizeof(cublasLtMatmulAlgo_t) == 64, "cublasLtMatmulAlgo_t layout");
static_assert(sizeof(cublasLtMatmulHeuristicResult_t) == 96, "cublasLtMatmulHeuristicResult_t layout");
static_assert(sizeof(cublasStatus_t) == 4 && sizeof(cublasComputeType_t) == 4, "enum sizes");

// [L126] function signatures.
using CreateFn = cublasStatus_t (*)(cublasLtHandle_t*);
using DestroyFn = cublasStatus_t (*)(cublasLtHandle_t);
using MatmulDescCreateFn = cublasStatus_t (*)(cublasLtMatmulDesc_t*, cublasComputeType_t, cudaDataType_t);
using MatmulDescDestroyFn = cublasStatus_t (*)(cublasLtMatmulDesc_t);
using MatmulDescSetAttributeFn = cublasStatus_t (*)(cublasLtMatmulDesc_t, cublasLtMatmulDescAttributes_t, const void*,
                                                    size_t);
using MatrixLayoutCreateFn = cublasStatus_t (*)(cublasLtMatrixLayout_t*, cudaDataType, uint64_t rows, uint64_t cols,
                                                int64_t ld);
using MatrixLayoutDestroyFn = cublasStatus_t (*)(cublasLtMatrixLayout_t);
using MatmulPreferenceCreateFn = cublasStatus_t (*)(cublasLtMatmulPreference_t*);
using MatmulPreferenceDestroyFn = cublasStatus_t (*)(cublasLtMatmulPreference_t);
using MatmulPreferenceSetAttributeFn = cublasStatus_t (*)(cublasLtMatmulPreference_t,
                                                          cublasLtMatmulPreferenceAttributes_t, const void*, size_t);
using MatmulAlgoGetHeuristicFn = cublasStatus_t (*)(cublasLtHandle_t, cublasLtMatmulDesc_t, cublasLtMatrixLayout_t A,
                                                    cublasLtMatrixLayout_t B, cublasLtMatrixLayout_t C,
                                                    cublasLtMatrixLayout_t D, cublasLtMatmulPreference_t, int requested,
                                                    cublasLtMatmulHeuristicResult_t results[], int* returned);
using MatmulFn = cublasStatus_t (*)(cublasLtHandle_t, cublasLtMatmulDesc_t, const void* alpha, const void* A,
                                    cublasLtMatrixLayout_t, const void* B, cublasLtMatrixLayout_t, const void* beta,
                                    const void* C, cublasLtMatrixLayout_t, void* D, cublasLtMatrixLayout_t,
                                    const cublasLtMatmulAlgo_t*, void* workspace, size_t workspace_bytes, cudaStream_t);

const char* status_name(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS:
      return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED:
      return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED:
      return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE:
      return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH:
      return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR:
      return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED:
      return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR:
      return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED:
      return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR:
      return "CUBLAS_STATUS_LICENSE_ERROR";
  }
  return "unknown cuBLAS status";
}

// The loaded library: every pointer set, or `error` says why not.
struct Api {
  std::string error;
  std::string path;
  CreateFn create = nullptr;
  DestroyFn destroy = nullptr;
  MatmulDescCreateFn desc_create = nullptr;
  MatmulDescDestroyFn desc_destroy = nullptr;
  MatmulDescSetAttributeFn desc_set = nullptr;
  MatrixLayoutCreateFn layout_create = nullptr;
  MatrixLayoutDestroyFn layout_destroy = nullptr;
  MatmulPreferenceCreateFn pref_create = nullptr;
  MatmulPreferenceDestroyFn pref_destroy = nullptr;
  MatmulPreferenceSetAttributeFn pref_set = nullptr;
  MatmulAlgoGetHeuristicFn heuristic = nullptr;
  MatmulFn matmul = nullptr;
};

Api load_api() {
  Api api;
  // 13 first: the runtime this engine links is 13.0; 12 keeps a CUDA 12 cuBLAS usable with a new driver.
  const char* names[] = {"libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"};
  void* lib = nullptr;
  std::string tried;
  for (const char* name : names) {
    lib = dlopen(name, RTLD_NOW | RTLD_LOCAL);
    if (lib) {
      api.path = name;
      break;
    }
    const char* why = dlerror();
    tried += std::string(tried.empty() ? "" : "; ") + (why ? why : name);
  }
  if (!lib) {
    api.error = "cuBLASLt could not be loaded (" + tried +
                "); install the CUDA 13 cuBLAS library (e.g. the libcublas-13-0 package or pip's "
                "nvidia-cublas) and make sure its lib directory is on LD_LIBRARY_PATH";
    return api;
  }
  // The library stays loaded for the life of the process (never dlclose-d).
  bool ok = true;
  auto sym = [&](auto& fn, const char* symbol) {
    void* p = dlsym(lib, symbol);
    if (!p && ok) {
      ok = false;
      api.error = "cuBLASLt (" + api.path + ") lacks " + symbol + "; it is too old, install cuBLAS 12 or 13";
    }
    fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(p);
  };
  sym(api.create, "cublasLtCreate");
  sym(api.destroy, "cublasLtDestroy");
  sym(api.desc_create, "cublasLtMatmulDescCreate");
  sym(api.desc_destroy, "cublasLtMatmulDescDestroy");
  sym(api.desc_set, "cublasLtMatmulDescSetAttribute");
  sym(api.layout_create, "cublasLtMatrixLayoutCreate");
  sym(api.layout_destroy, "cublasLtMatrixLayoutDestroy");
  sym(api.pref_create, "cublasLtMatmulPreferenceCreate");
  sym(api.pref_destroy, "cublasLtMatmulPreferenceDestroy");
  sym(api.pref_set, "cublasLtMatmulPreferenceSetAttribute");
  sym(api.heuristic, "cublasLtMatmulAlgoGetHeuristic");
  sym(api.matmul, "cublasLtMatmul");
  return api;
}

const Api& api() {
  static const Api loaded = load_api();
  return loaded;
}

}  // namespace lt

std::string cublaslt_load_error() {
  try {
    return lt::api().error;
  } catch (const std::exception& e) {
    return std::string("loading cuBLASLt failed: ") + e.what();
  }
}

namespace {

constexpr size_t kWorkspaceBytes = size_t(32) << 20;

// One GEMM shape as cuBLASLt sees it, alignments included (they restrict the kernels it may pick).
struct GemmKey {
  bool transA, transB, ab_is_float, c_is_float;
  int64_t M, N, K, lda, ldb, ldc;
  uint32_t align_a, align_b, align_c;
  bool operator==(const GemmKey& o) const {
    return transA == o.transA && transB == o.transB && ab_is_float == o.ab_is_float && c_is_float == o.c_is_float &&
           M == o.M && N == o.N && K == o.K && lda == o.lda && ldb == o.ldb && ldc == o.ldc && align_a == o.align_a &&
           align_b == o.align_b && align_c == o.align_c;
  }
};

struct GemmKeyHash {
  size_t operator()(const GemmKey& k) const {
    size_t h = std::hash<int64_t>()(k.M);
    auto mix = [&h](uint64_t v) { h ^= std::hash<uint64_t>()(v) + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2); };
    mix(uint64_t(k.N));
    mix(uint64_t(k.K));
    mix(uint64_t(k.lda));
    mix(uint64_t(k.ldb));
    mix(uint64_t(k.ldc));
    mix((uint64_t(k.ab_is_float) << 3) | (uint64_t(k.transA) << 2) | (uint64_t(k.transB) << 1) |
        uint64_t(k.c_is_float));
    mix((uint64_t(k.align_a) << 40) | (uint64_t(k.align_b) << 20) | uint64_t(k.align_c));
    return h;
  }
};

// Descriptors of one shape in cuBLASLt's column-major roles (its A is the engine's B; see gemm_lt).
struct GemmPlan {
  lt::cublasLtMatmulDesc_t desc = nullptr;
  lt::cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  lt::cublasLtMatmulAlgo_t algo{};
};

void destroy_plan(const lt::Api& api, GemmPlan& p) {
  if (p.a) api.layout_destroy(p.a);
  if (p.b) api.layout_destroy(p.b);
  if (p.c) api.layout_destroy(p.c);
  if (p.desc) api.desc_destroy(p.desc);
  p = GemmPlan{};
}

std::string describe(const GemmKey& k) {
  return "gemm(transA=" + std::to_string(k.transA) + ", transB=" + std::to_string(k.transB) +
         ", M=" + std::to_string(k.M) + ", N=" + std::to_string(k.N) + ", K=" + std::to_string(k.K) +
         ", lda=" + std::to_string(k.lda) + ", ldb=" + std::to_string(k.ldb) + ", ldc=" + std::to_string(k.ldc) +
         ", A/B " + (k.ab_is_float ? "fp32" : "bf16") + ", C " + (k.c_is_float ? "fp32" : "bf16") +
         ", alignments A/B/C " + std::to_string(k.align_a) + "/" + std::to_string(k.align_b) + "/" +
         std::to_string(k.align_c) + " bytes)";
}

void check_lt(lt::cublasStatus_t s, const char* call, const GemmKey& k) {
  if (s != lt::CUBLAS_STATUS_SUCCESS)
    throw Error(std::string("cuBLASLt ") + call + " failed with " + lt::status_name(s) + " (" + std::to_string(int(s)) +
                ") for " + describe(k));
}

// The largest power of two (up to 256) dividing the address.
uint32_t alignment_of(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  uint32_t al = 256;
  while (al > 1 && a % al != 0) al >>= 1;
  return al;
}

// C = beta*C for K == 0 (no product terms); beta == 0 writes zeros without reading C.
template <class T>
__global__ void scale_rows_kernel(T* C, int64_t M, int64_t N, int64_t ldc, float beta) {
  const int64_t total = M * N;
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < total; k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = k / N, j = k - i * N;
    T* p = C + i * ldc + j;
    if constexpr (std::is_same_v<T, float>)
      *p = beta == 0.0f ? 0.0f : beta * *p;
    else
      *p = to_bf(beta == 0.0f ? 0.0f : beta * to_f(*p));
  }
}

}  // namespace

// The cuBLASLt handle, the workspace and the per-shape plans of one CudaOps.
struct GemmState {
  const lt::Api* api = nullptr;
  lt::cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;
  std::unordered_map<GemmKey, GemmPlan, GemmKeyHash> plans;
  ~GemmState() {
    for (auto& kv : plans) destroy_plan(*api, kv.second);
    if (handle) api->destroy(handle);
    if (workspace) (void)cudaFree(workspace);
  }
};

template <>
void StateDeleter<GemmState>::operator()(GemmState* s) const {
  delete s;
}

GemmState& CudaOps::gemm_state() {
  if (gemm_) return *gemm_;
  const lt::Api& api = lt::api();
  if (!api.error.empty()) throw Error(api.error);
  StatePtr<GemmState> s(new GemmState());
  s->api = &api;
  const lt::cublasStatus_t st = api.create(&s->handle);
  if (st != lt::CUBLAS_STATUS_SUCCESS)
    throw Error(std::string("cublasLtCreate failed with ") + lt::status_name(st) + " (" + std::to_string(int(st)) +
                ") using " + api.path);
  const cudaError_t e = cudaMalloc(&s->workspace, kWorkspaceBytes);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    s->workspace = nullptr;
    throw Error(std::string("CUDA could not allocate the 32 MiB cuBLASLt workspace: ") + cudaGetErrorName(e) + " (" +
                cudaGetErrorString(e) + ")");
  }
  gemm_ = std::move(s);
  return *gemm_;
}

namespace {

// Row-major C(M,N) = alpha*op(A)*op(B) + beta*C (cpu/gemm.h) on cuBLASLt, which is column-major.
// A row-major (R x S) matrix with row stride ld is the column-major (S x R) matrix with leading
// dimension ld, i.e. its transpose. So the engine's C is cuBLASLt's Cᵀ (N x M, ld ldc), and we
// compute Cᵀ = op(B)ᵀ·op(A)ᵀ: cuBLASLt's "A" is the engine's B, its "B" is the engine's A, with
// m = N, n = M, k = K.
//  - engine B not transposed: stored (K,N) row-major = column-major (N,K) = op(B)ᵀ   -> OP_N, N x K, ldb
//  - engine B transposed:     stored (N,K) row-major = column-major (K,N) = op(B)    -> OP_T, K x N, ldb
//  - engine A not transposed: stored (M,K) row-major = column-major (K,M) = op(A)ᵀ   -> OP_N, K x M, lda
//  - engine A transposed:     stored (K,M) row-major = column-major (M,K) = op(A)    -> OP_T, M x K, lda
// Layouts describe the stored matrices (rows x cols before the op), as cuBLASLt expects.
GemmPlan make_plan(GemmState& st, const GemmKey& k) {
  const lt::Api& api = *st.api;
  GemmPlan p;
  lt::cublasLtMatmulPreference_t pref = nullptr;
  try {
    const cudaDataType_t c_type = k.c_is_float ? CUDA_R_32F : CUDA_R_16BF;
    const cudaDataType_t ab_type = k.ab_is_float ? CUDA_R_32F : CUDA_R_16BF;
    check_lt(api.desc_create(&p.desc, lt::CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate", k);
    const int32_t op_a = k.transB ? lt::CUBLAS_OP_T : lt::CUBLAS_OP_N;  // cuBLASLt's A = engine's B
    const int32_t op_b = k.transA ? lt::CUBLAS_OP_T : lt::CUBLAS_OP_N;  // cuBLASLt's B = engine's A
    check_lt(api.desc_set(p.desc, lt::CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof op_a), "set TRANSA", k);
    check_lt(api.desc_set(p.desc, lt::CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof op_b), "set TRANSB", k);
    check_lt(k.transB ? api.layout_create(&p.a, ab_type, uint64_t(k.K), uint64_t(k.N), k.ldb)
                      : api.layout_create(&p.a, ab_type, uint64_t(k.N), uint64_t(k.K), k.ldb),
             "cublasLtMatrixLayoutCreate(B)", k);
    check_lt(k.transA ? api.layout_create(&p.b, ab_type, uint64_t(k.M), uint64_t(k.K), k.lda)
                      : api.layout_create(&p.b, ab_type, uint64_t(k.K), uint64_t(k.M), k.lda),
             "cublasLtMatrixLayoutCreate(A)", k);
    check_lt(api.layout_create(&p.c, c_type, uint64_t(k.N), uint64_t(k.M), k.ldc), "cublasLtMatrixLayoutCreate(C)", k);

    check_lt(api.pref_create(&pref), "cublasLtMatmulPreferenceCreate", k);
    const uint64_t workspace = kWorkspaceBytes;
    check_lt(api.pref_set(pref, lt::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace, sizeof workspace),
             "set MAX_WORKSPACE_BYTES", k);
    // cuBLASLt's A is the engine's B (and vice versa); C and D are the same buffer.
    check_lt(api.pref_set(pref, lt::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &k.align_b, sizeof k.align_b),
             "set MIN_ALIGNMENT_A_BYTES", k);
    check_lt(api.pref_set(pref, lt::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &k.align_a, sizeof k.align_a),
             "set MIN_ALIGNMENT_B_BYTES", k);
    check_lt(api.pref_set(pref, lt::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &k.align_c, sizeof k.align_c),
             "set MIN_ALIGNMENT_C_BYTES", k);
    check_lt(api.pref_set(pref, lt::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &k.align_c, sizeof k.align_c),
             "set MIN_ALIGNMENT_D_BYTES", k);

    lt::cublasLtMatmulHeuristicResult_t result{};
    int returned = 0;
    check_lt(api.heuristic(st.handle, p.desc, p.a, p.b, p.c, p.c, pref, 1, &result, &returned),
             "cublasLtMatmulAlgoGetHeuristic", k);
    if (returned < 1) throw Error("cuBLASLt has no algorithm for " + describe(k));
    check_lt(result.state, "cublasLtMatmulAlgoGetHeuristic (result state)", k);
    p.algo = result.algo;
    api.pref_destroy(pref);
    return p;
  } catch (...) {
    if (pref) api.pref_destroy(pref);
    destroy_plan(api, p);
    throw;
  }
}

void gemm_lt(CudaOps& ops, GemmState& st, bool transA, bool transB, int64_t M, int64_t N, int64_t K, double alpha,
             const void* A, int64_t lda, const void* B, int64_t ldb, double beta, void* C, bool ab_is_float,
             bool c_is_float, int64_t ldc) {
  const GemmKey key{transA, transB,          ab_is_float,     c_is_float,     M, N, K, lda, ldb,
                    ldc,    alignment_of(A), alignment_of(B), alignment_of(C)};
  SPPO_REQUIRE(M >= 0 && N >= 0 && K >= 0, "negative GEMM size in ", describe(key));
  if (M == 0 || N == 0) return;
  SPPO_REQUIRE(ldc >= N && (K == 0 || (lda >= (transA ? M : K) && ldb >= (transB ? K : N))),
               "a leading dimension is smaller than the row it strides over in ", describe(key));
  SPPO_REQUIRE(
      M <= INT32_MAX && N <= INT32_MAX && K <= INT32_MAX && lda <= INT32_MAX && ldb <= INT32_MAX && ldc <= INT32_MAX,
      "GEMM dimensions beyond int32 are not supported by cuBLASLt: ", describe(key));
  const float a = float(alpha), b = float(beta);
  if (K == 0) {  // no products: C = beta*C (cuBLASLt does not take k = 0)
    const unsigned blocks = unsigned(std::min<int64_t>((M * N + 255) / 256, 1 << 16));
    if (c_is_float)
      scale_rows_kernel<<<blocks, 256, 0, ops.stream()>>>(static_cast<float*>(C), M, N, ldc, b);
    else
      scale_rows_kernel<<<blocks, 256, 0, ops.stream()>>>(static_cast<__nv_bfloat16*>(C), M, N, ldc, b);
    SPPO_CUDA_LAUNCHED(scale_rows_kernel);
    return;
  }
  auto it = st.plans.find(key);
  if (it == st.plans.end()) it = st.plans.emplace(key, make_plan(st, key)).first;
  const GemmPlan& p = it->second;
  // beta == 0: C is not read (so it may hold NaN), per BLAS convention.
  check_lt(st.api->matmul(st.handle, p.desc, &a, B, p.a, A, p.b, &b, C, p.c, C, p.c, &p.algo, st.workspace,
                          kWorkspaceBytes, ops.stream()),
           "cublasLtMatmul", key);
}

}  // namespace

void CudaOps::gemm(bool transA, bool transB, int64_t M, int64_t N, int64_t K, double alpha, const bf16* A, int64_t lda,
                   const bf16* B, int64_t ldb, double beta, bf16* C, int64_t ldc) {
  gemm_lt(*this, gemm_state(), transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, false, false, ldc);
}

void CudaOps::gemm_master(bool transA, bool transB, int64_t M, int64_t N, int64_t K, double alpha, const bf16* A,
                          int64_t lda, const bf16* B, int64_t ldb, double beta, float* C, int64_t ldc) {
  gemm_lt(*this, gemm_state(), transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, false, true, ldc);
}

void CudaOps::gemm_fp32(bool transA, bool transB, int64_t M, int64_t N, int64_t K, double alpha, const float* A,
                        int64_t lda, const float* B, int64_t ldb, double beta, float* C, int64_t ldc) {
  gemm_lt(*this, gemm_state(), transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, true, true, ldc);
}

}  // namespace sppo::cuda
