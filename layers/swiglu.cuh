/*
SwiGLU, the gated activation of the LLaMA MLP: out = silu(gate) * up, silu(g) = g * sigmoid(g).

gate and up come from one matmul against the stacked (2F, C) gate_up_proj weight, so each row
of the input holds F gate values followed by F up values.

Backward, with s = sigmoid(g):  dgate += dout * up * s * (1 + g * (1 - s)),  dup += dout * silu(g).
*/
#pragma once

#include <cmath>

#include "../common.h"

// ---- CPU reference

// out (N, F); gate_up (N, 2F): [gate | up] per row
inline void swiglu_forward_cpu(real* out, const real* gate_up, int N, int F) {
    #pragma omp parallel for
    for (int i = 0; i < N; i++) {
        const real* gate = gate_up + (size_t)i * 2 * F;
        const real* up = gate + F;
        for (int f = 0; f < F; f++) {
            real sigmoid = 1 / (1 + std::exp(-gate[f]));
            out[(size_t)i * F + f] = gate[f] * sigmoid * up[f];
        }
    }
}

// dgate_up (N, 2F) +=; dout (N, F); gate_up (N, 2F) from forward
inline void swiglu_backward_cpu(real* dgate_up, const real* dout, const real* gate_up, int N, int F) {
    #pragma omp parallel for
    for (int i = 0; i < N; i++) {
        const real* gate = gate_up + (size_t)i * 2 * F;
        const real* up = gate + F;
        real* dgate = dgate_up + (size_t)i * 2 * F;
        real* dup = dgate + F;
        for (int f = 0; f < F; f++) {
            real g = gate[f];
            real sigmoid = 1 / (1 + std::exp(-g));
            real dy = dout[(size_t)i * F + f];
            dgate[f] += dy * up[f] * sigmoid * (1 + g * (1 - sigmoid));
            dup[f] += dy * g * sigmoid;
        }
    }
}

#if defined(__CUDACC__) || defined(MIXLN_CUDA_EMULATION)
#include "../cuda_common.h"

// ---- CUDA kernels

// one thread per (row, f)
static __global__ void swiglu_forward_kernel(float* out, const float* gate_up, int N, int F) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)N * F) return;
    size_t row = idx / F, f = idx % F;
    float gate = gate_up[row * 2 * F + f];
    float up = gate_up[row * 2 * F + F + f];
    out[idx] = gate / (1.0f + expf(-gate)) * up;
}

static __global__ void swiglu_backward_kernel(float* dgate_up, const float* dout, const float* gate_up, int N, int F) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)N * F) return;
    size_t row = idx / F, f = idx % F;
    float gate = gate_up[row * 2 * F + f];
    float up = gate_up[row * 2 * F + F + f];
    float sigmoid = 1.0f / (1.0f + expf(-gate));
    float dy = dout[idx];
    dgate_up[row * 2 * F + f] += dy * up * sigmoid * (1.0f + gate * (1.0f - sigmoid));
    dgate_up[row * 2 * F + F + f] += dy * gate * sigmoid;
}

// ---- launchers

inline void swiglu_forward(float* out, const float* gate_up, int N, int F, cudaStream_t stream) {
    const int block = 256;
    size_t n = (size_t)N * F;
    LAUNCH(swiglu_forward_kernel, dim3((unsigned)((n + block - 1) / block)), dim3(block), 0, stream, out, gate_up, N, F);
}

inline void swiglu_backward(float* dgate_up, const float* dout, const float* gate_up, int N, int F, cudaStream_t stream) {
    const int block = 256;
    size_t n = (size_t)N * F;
    LAUNCH(swiglu_backward_kernel, dim3((unsigned)((n + block - 1) / block)), dim3(block), 0, stream, dgate_up, dout,
           gate_up, N, F);
}
#endif
