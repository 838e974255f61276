// Vectorised exponential-based loops for the CPU kernels (softmax, attention, SwiGLU).
// float uses AVX-512 when the machine has it (chosen at run time), else the scalar loop;
// double (the float64 reference) always uses the scalar loop with std::exp.
#pragma once
#include <cstdint>

namespace sppo::cpu {

// y[i] = exp(x[i] - shift) (y may alias x); returns the sum of the y[i], accumulated in double.
double exp_shifted_sum(const float* x, float* y, int64_t n, float shift);
double exp_shifted_sum(const double* x, double* y, int64_t n, double shift);

// out[i] = silu(g[i]) * u[i], silu(g) = g * sigmoid(g).
void swiglu_rows(const float* g, const float* u, float* out, int64_t n);
void swiglu_rows(const double* g, const double* u, double* out, int64_t n);

// The SwiGLU backward: dg = d*u*s*(1 + g*(1-s)), du = d*silu(g), s = sigmoid(g).
void swiglu_grad_rows(const float* g, const float* u, const float* d, float* dg, float* du, int64_t n);
void swiglu_grad_rows(const double* g, const double* u, const double* d, double* dg, double* du, int64_t n);

}  // namespace sppo::cpu
