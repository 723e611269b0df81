/*
Residual add: out = a + b, the skip connection around each sublayer; and two scalings for the
norm placements beyond Pre-/Post-LN:
  - scale_forward: out = scale * inp. LayerNorm Scaling multiplies a norm's output by
    1 / sqrt(l + 1) for layer l (counted from 0), so deeper Pre-LN layers add less to the residual
    stream; its backward is the same call on the gradient (a scale is its own transpose).
  - residual_scaled_forward: out = x_scale * x + b, DeepNorm's up-weighted skip connection
    a * x + F(x) (a > 1), which keeps Post-LN's updates small enough to train deep stacks.
Under RMSNorm, model.h adds with residual_rmsnorm_forward (rmsnorm.cuh) instead wherever a norm
of the sum follows, which is nearly everywhere: the add and the norm in one pass, bitwise equal
to these adds followed by rmsnorm_forward on the CPU.

There is no backward function: the gradient of a sum is the incoming gradient for both terms,
and every backward function in layers/ accumulates (+=) into its input gradient, so model.h
routes a residual's gradient by letting both branches accumulate into the same buffer. For the
scaled residual, the branch F gets dout and the skip gets x_scale * dout (scale_forward on the
gradient first).

Storage: every buffer is T (float, double in the CPU's finite-difference build, or bf16); the
arithmetic is in float (real on the CPU) from the values as stored, and each output element is
rounded once to T where stored.
*/
#pragma once

#include "../common.h"

// ---- CPU reference

// out (n) = a (n) + b (n); out may alias a or b
template <typename T>
inline void residual_forward_cpu(T* out, const T* a, const T* b, size_t n) {
    #pragma omp parallel for
    for (size_t i = 0; i < n; i++) out[i] = from_real<T>(to_real(a[i]) + to_real(b[i]));
}

// out (n) = scale * inp (n); out may alias inp
template <typename T>
inline void scale_forward_cpu(T* out, const T* inp, float scale, size_t n) {
    #pragma omp parallel for
    for (size_t i = 0; i < n; i++) out[i] = from_real<T>(scale * to_real(inp[i]));
}

// out (n) = x_scale * x (n) + b (n); out may alias x or b
template <typename T>
inline void residual_scaled_forward_cpu(T* out, const T* x, float x_scale, const T* b, size_t n) {
    #pragma omp parallel for
    for (size_t i = 0; i < n; i++) out[i] = from_real<T>(x_scale * to_real(x[i]) + to_real(b[i]));
}

#if defined(__CUDACC__) || defined(MIXLN_CUDA_EMULATION)
#include "../cuda_common.h"

// ---- CUDA kernels

// one thread per element (each reads its inputs before writing, so in-place calls are safe)
template <typename T>
static __global__ void residual_forward_kernel(T* out, const T* a, const T* b, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = from_float<T>(to_float(a[i]) + to_float(b[i]));
}

template <typename T>
static __global__ void scale_forward_kernel(T* out, const T* inp, float scale, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = from_float<T>(scale * to_float(inp[i]));
}

template <typename T>
static __global__ void residual_scaled_forward_kernel(T* out, const T* x, float x_scale, const T* b, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = from_float<T>(x_scale * to_float(x[i]) + to_float(b[i]));
}

// ---- launchers

template <typename T>
inline void residual_forward(T* out, const T* a, const T* b, size_t n, cudaStream_t stream) {
    const int block = 256;
    LAUNCH(residual_forward_kernel<T>, dim3((unsigned)((n + block - 1) / block)), dim3(block), 0, stream, out, a, b, n);
}

template <typename T>
inline void scale_forward(T* out, const T* inp, float scale, size_t n, cudaStream_t stream) {
    const int block = 256;
    LAUNCH(scale_forward_kernel<T>, dim3((unsigned)((n + block - 1) / block)), dim3(block), 0, stream, out, inp, scale,
           n);
}

template <typename T>
inline void residual_scaled_forward(T* out, const T* x, float x_scale, const T* b, size_t n, cudaStream_t stream) {
    const int block = 256;
    LAUNCH(residual_scaled_forward_kernel<T>, dim3((unsigned)((n + block - 1) / block)), dim3(block), 0, stream, out, x,
           x_scale, b, n);
}
#endif
