#include "cpu/vecmath.h"

#include <immintrin.h>

#include <cmath>

namespace sppo::cpu {

namespace {

template <class T>
double exp_shifted_sum_scalar(const T* x, T* y, int64_t n, T shift) {
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    T e = std::exp(x[i] - shift);
    y[i] = e;
    sum += double(e);
  }
  return sum;
}

template <class T>
void swiglu_scalar(const T* g, const T* u, T* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = g[i] / (T(1) + std::exp(-g[i])) * u[i];
}

template <class T>
void swiglu_grad_scalar(const T* g, const T* u, const T* d, T* dg, T* du, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    T s = T(1) / (T(1) + std::exp(-g[i]));
    du[i] = d[i] * g[i] * s;
    dg[i] = d[i] * u[i] * s * (T(1) + g[i] * (T(1) - s));
  }
}

#define SPPO_AVX512 __attribute__((target("avx512f,avx512dq,fma")))
// GCC 12's AVX-512 headers seed some intrinsics with _mm512_undefined_*, which -Wall reports
// as uninitialised wherever they inline; the values are never read.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// exp(x) for 16 floats: x = k*ln2 + r with |r| <= ln2/2, exp(r) by its degree-6 Taylor
// polynomial (relative error < 2e-7, about one float ulp), then scaled by 2^k.
SPPO_AVX512 inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.7f)), _mm512_set1_ps(-103.0f));
  __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693145751953125f), x);  // ln2 split in two
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, k);  // p * 2^k, flushing to 0 far below the normal range
}

SPPO_AVX512 double exp_shifted_sum_avx512(const float* x, float* y, int64_t n, float shift) {
  const __m512 s = _mm512_set1_ps(shift);
  __m512d acc0 = _mm512_setzero_pd(), acc1 = _mm512_setzero_pd();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(x + i), s));
    _mm512_storeu_ps(y + i, e);
    acc0 = _mm512_add_pd(acc0, _mm512_cvtps_pd(_mm512_castps512_ps256(e)));
    acc1 = _mm512_add_pd(acc1, _mm512_cvtps_pd(_mm512_extractf32x8_ps(e, 1)));
  }
  if (i < n) {
    const __mmask16 m = __mmask16((1u << (n - i)) - 1);
    __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), s));
    e = _mm512_maskz_mov_ps(m, e);
    _mm512_mask_storeu_ps(y + i, m, e);
    acc0 = _mm512_add_pd(acc0, _mm512_cvtps_pd(_mm512_castps512_ps256(e)));
    acc1 = _mm512_add_pd(acc1, _mm512_cvtps_pd(_mm512_extractf32x8_ps(e, 1)));
  }
  return _mm512_reduce_add_pd(_mm512_add_pd(acc0, acc1));
}

SPPO_AVX512 void swiglu_avx512(const float* g, const float* u, float* out, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    __m512 gv = _mm512_maskz_loadu_ps(m, g + i), uv = _mm512_maskz_loadu_ps(m, u + i);
    __m512 sig = _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
    _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(_mm512_mul_ps(gv, sig), uv));
  }
}

SPPO_AVX512 void swiglu_grad_avx512(const float* g, const float* u, const float* d, float* dg, float* du, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    __m512 gv = _mm512_maskz_loadu_ps(m, g + i), uv = _mm512_maskz_loadu_ps(m, u + i),
           dv = _mm512_maskz_loadu_ps(m, d + i);
    __m512 sig = _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
    _mm512_mask_storeu_ps(du + i, m, _mm512_mul_ps(dv, _mm512_mul_ps(gv, sig)));
    __m512 t = _mm512_fmadd_ps(gv, _mm512_sub_ps(one, sig), one);  // 1 + g(1-s)
    _mm512_mask_storeu_ps(dg + i, m, _mm512_mul_ps(_mm512_mul_ps(dv, uv), _mm512_mul_ps(sig, t)));
  }
}

#pragma GCC diagnostic pop

const bool kHasAvx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");

}  // namespace

double exp_shifted_sum(const float* x, float* y, int64_t n, float shift) {
  return kHasAvx512 ? exp_shifted_sum_avx512(x, y, n, shift) : exp_shifted_sum_scalar(x, y, n, shift);
}
double exp_shifted_sum(const double* x, double* y, int64_t n, double shift) {
  return exp_shifted_sum_scalar(x, y, n, shift);
}

void swiglu_rows(const float* g, const float* u, float* out, int64_t n) {
  kHasAvx512 ? swiglu_avx512(g, u, out, n) : swiglu_scalar(g, u, out, n);
}
void swiglu_rows(const double* g, const double* u, double* out, int64_t n) { swiglu_scalar(g, u, out, n); }

void swiglu_grad_rows(const float* g, const float* u, const float* d, float* dg, float* du, int64_t n) {
  kHasAvx512 ? swiglu_grad_avx512(g, u, d, dg, du, n) : swiglu_grad_scalar(g, u, d, dg, du, n);
}
void swiglu_grad_rows(const double* g, const double* u, const double* d, double* dg, double* du, int64_t n) {
  swiglu_grad_scalar(g, u, d, dg, du, n);
}

}  // namespace sppo::cpu
