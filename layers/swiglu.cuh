/*
SwiGLU, the gated activation of the LLaMA MLP: out = silu(gate) * up, silu(g) = g * sigmoid(g).

gate and up come from one matmul against the stacked (2F, C) gate_up_proj weight, so each row
of the input holds F gate values followed by F up values.

Backward, with s = sigmoid(g):  dgate += dout * up * s * (1 + g * (1 - s)),  dup += dout * silu(g).

Storage type: inputs, outputs and gradients are stored in T (float, double in the CPU
finite-difference build, or bf16) and the math is in float (`real` on the CPU). Rounding points:
each output element once when stored; each gradient element once, after its increment is added
to the stored value in float (dgate = round(dgate + increment)).
*/
#pragma once

#include <cmath>

#include "../common.h"

// ---- CPU reference

// out (N, F); gate_up (N, 2F): [gate | up] per row
template <typename T>
inline void swiglu_forward_cpu(T* out, const T* gate_up, int N, int F) {
    #pragma omp parallel for
    for (int i = 0; i < N; i++) {
        const T* gate = gate_up + (size_t)i * 2 * F;
        const T* up = gate + F;
        for (int f = 0; f < F; f++) {
            real g = to_real(gate[f]);
            real sigmoid = 1 / (1 + std::exp(-g));
            out[(size_t)i * F + f] = from_real<T>(g * sigmoid * to_real(up[f]));
        }
    }
}

// dgate_up (N, 2F) +=; dout (N, F); gate_up (N, 2F) from forward
template <typename T>
inline void swiglu_backward_cpu(T* dgate_up, const T* dout, const T* gate_up, int N, int F) {
    #pragma omp parallel for
    for (int i = 0; i < N; i++) {
        const T* gate = gate_up + (size_t)i * 2 * F;
        const T* up = gate + F;
        T* dgate = dgate_up + (size_t)i * 2 * F;
        T* dup = dgate + F;
        for (int f = 0; f < F; f++) {
            real g = to_real(gate[f]);
            real sigmoid = 1 / (1 + std::exp(-g));
            real dy = to_real(dout[(size_t)i * F + f]);
            dgate[f] = from_real<T>(to_real(dgate[f]) + dy * to_real(up[f]) * sigmoid * (1 + g * (1 - sigmoid)));
            dup[f] = from_real<T>(to_real(dup[f]) + dy * g * sigmoid);
        }
    }
}

#if defined(__CUDACC__) || defined(MIXLN_CUDA_EMULATION)
#include "../cuda_common.h"

// ---- CUDA kernels

// one thread per (row, f)
template <typename T>
__global__ void swiglu_forward_kernel(T* out, const T* gate_up, int N, int F) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)N * F) return;
    size_t row = idx / F, f = idx % F;
    float gate = to_float(gate_up[row * 2 * F + f]);
    float up = to_float(gate_up[row * 2 * F + F + f]);
    out[idx] = from_float<T>(gate / (1.0f + expf(-gate)) * up);
}

template <typename T>
__global__ void swiglu_backward_kernel(T* dgate_up, const T* dout, const T* gate_up, int N, int F) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)N * F) return;
    size_t row = idx / F, f = idx % F;
    float gate = to_float(gate_up[row * 2 * F + f]);
    float up = to_float(gate_up[row * 2 * F + F + f]);
    float sigmoid = 1.0f / (1.0f + expf(-gate));
    float dy = to_float(dout[idx]);
    T* dgate = dgate_up + row * 2 * F + f;
    T* dup = dgate + F;
    *dgate = from_float<T>(to_float(*dgate) + dy * up * sigmoid * (1.0f + gate * (1.0f - sigmoid)));
    *dup = from_float<T>(to_float(*dup) + dy * gate * sigmoid);
}

// ---- launchers

template <typename T>
inline void swiglu_forward(T* out, const T* gate_up, int N, int F, cudaStream_t stream) {
    const int block = 256;
    size_t n = (size_t)N * F;
    LAUNCH(swiglu_forward_kernel<T>, dim3((unsigned)((n + block - 1) / block)), dim3(block), 0, stream, out, gate_up, N,
           F);
}

template <typename T>
inline void swiglu_backward(T* dgate_up, const T* dout, const T* gate_up, int N, int F, cudaStream_t stream) {
    const int block = 256;
    size_t n = (size_t)N * F;
    LAUNCH(swiglu_backward_kernel<T>, dim3((unsigned)((n + block - 1) / block)), dim3(block), 0, stream, dgate_up, dout,
           gate_up, N, F);
}
#endif
