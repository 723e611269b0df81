/*
Token embedding: row `token` of the (V, C) table becomes the residual stream at that position.
LLaMA adds no position embedding here; positions enter through RoPE inside attention.

Backward scatters each position's gradient into its token's row. Several positions can hold the
same token, so rows are accumulated; the CPU reference does that serially over positions and in
parallel over channels, which needs no atomics.
*/
#pragma once

#include <cstring>

#include "../common.h"

// ---- CPU reference

// out (B*T, C); tokens (B*T) ids in [0, V); embed_tokens (V, C)
inline void embedding_forward_cpu(real* out, const int* tokens, const real* embed_tokens, int BT, int C) {
    #pragma omp parallel for
    for (int i = 0; i < BT; i++) {
        memcpy(out + (size_t)i * C, embed_tokens + (size_t)tokens[i] * C, (size_t)C * sizeof(real));
    }
}

// dembed_tokens (V, C) +=; dout (B*T, C); tokens (B*T)
inline void embedding_backward_cpu(real* dembed_tokens, const real* dout, const int* tokens, int BT, int C) {
    #pragma omp parallel for
    for (int c = 0; c < C; c++) {
        for (int i = 0; i < BT; i++) {
            dembed_tokens[(size_t)tokens[i] * C + c] += dout[(size_t)i * C + c];
        }
    }
}

#if defined(__CUDACC__) || defined(MIXLN_CUDA_EMULATION)
#include "../cuda_common.h"

// ---- CUDA kernels

// one thread per (position, channel)
static __global__ void embedding_forward_kernel(float* out, const int* tokens, const float* embed_tokens, int BT, int C) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)BT * C) return;
    size_t i = idx / C, c = idx % C;
    out[idx] = embed_tokens[(size_t)tokens[i] * C + c];
}

// One thread per channel walks every position in order: no two threads touch the same element
// and the sums happen in a fixed order, so the result is deterministic (float atomics are not).
static __global__ void embedding_backward_kernel(float* dembed_tokens, const float* dout, const int* tokens, int BT, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    for (int i = 0; i < BT; i++) dembed_tokens[(size_t)tokens[i] * C + c] += dout[(size_t)i * C + c];
}

// ---- launchers

inline void embedding_forward(float* out, const int* tokens, const float* embed_tokens, int BT, int C, cudaStream_t stream) {
    const int block = 256;
    size_t n = (size_t)BT * C;
    LAUNCH(embedding_forward_kernel, dim3((unsigned)((n + block - 1) / block)), dim3(block), 0, stream, out, tokens,
           embed_tokens, BT, C);
}

inline void embedding_backward(float* dembed_tokens, const float* dout, const int* tokens, int BT, int C, cudaStream_t stream) {
    const int block = 128;
    LAUNCH(embedding_backward_kernel, dim3(ceil_div(C, block)), dim3(block), 0, stream, dembed_tokens, dout, tokens, BT, C);
}
#endif
