/*
Residual add: out = a + b, the skip connection around each sublayer.

There is no backward function: the gradient of a sum is the incoming gradient for both terms,
and every backward function in layers/ accumulates (+=) into its input gradient, so model.h
routes a residual's gradient by letting both branches accumulate into the same buffer.
*/
#pragma once

#include "../common.h"

// ---- CPU reference

// out (n) = a (n) + b (n); out may alias a or b
inline void residual_forward_cpu(real* out, const real* a, const real* b, size_t n) {
    #pragma omp parallel for
    for (size_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

#if defined(__CUDACC__) || defined(MIXLN_CUDA_EMULATION)
#include "../cuda_common.h"

// ---- CUDA kernels

// one thread per element
static __global__ void residual_forward_kernel(float* out, const float* a, const float* b, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = a[i] + b[i];
}

// ---- launchers

inline void residual_forward(float* out, const float* a, const float* b, size_t n, cudaStream_t stream) {
    const int block = 256;
    LAUNCH(residual_forward_kernel, dim3((unsigned)((n + block - 1) / block)), dim3(block), 0, stream, out, a, b, n);
}
#endif
