/*
Token embedding: row `token` of the (V, C) table becomes the residual stream at that position.
LLaMA adds no position embedding here; positions enter through RoPE inside attention.

Backward scatters each position's gradient into its token's row. Several positions can hold the
same token, so rows are accumulated.

Storage types: the table and the activations are stored in T (float, double in the CPU
finite-difference build, or bf16); the table's gradient in G (float, or bf16 in bf16-pure).
Forward copies values, so it rounds nothing. Backward rounds once per gradient element: each
element of a row that some positions hold is
    dembed[token, c] = round_G(dembed[token, c] + dout[i1, c] + dout[i2, c] + ...)
with the sum in float (`real` on the CPU) starting from the stored value and adding the positions
i1 < i2 < ... holding that token in increasing order. The CPU twin and the kernel sum in that
same order, so they agree to the bit; in fp32 it is the order of the plain serial `+=` over
positions. Rounding to bf16 after every position instead would lose the small gradients of a
frequent token against its running sum, so the sum is never stored before it is complete.
The order is fixed and no atomics are used: the result is deterministic.
*/
#pragma once

#include <algorithm>
#include <cstring>
#include <numeric>
#include <vector>

#include "../common.h"

// ---- CPU reference

// out (B*T, C); tokens (B*T) ids in [0, V); embed_tokens (V, C)
template <typename T>
inline void embedding_forward_cpu(T* out, const int* tokens, const T* embed_tokens, int BT, int C) {
    #pragma omp parallel for
    for (int i = 0; i < BT; i++) {
        memcpy(out + (size_t)i * C, embed_tokens + (size_t)tokens[i] * C, (size_t)C * sizeof(T));
    }
}

// dembed_tokens (V, C) +=; dout (B*T, C); tokens (B*T)
template <typename T, typename G>
inline void embedding_backward_cpu(G* dembed_tokens, const T* dout, const int* tokens, int BT, int C) {
    // the positions grouped by token, increasing within a group (a stable sort by token)
    std::vector<int> order(BT);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return tokens[a] < tokens[b]; });
    // group g holds order[starts[g]] .. order[starts[g + 1] - 1]
    std::vector<int> starts;
    for (int k = 0; k < BT; k++) {
        if (k == 0 || tokens[order[k]] != tokens[order[k - 1]]) starts.push_back(k);
    }
    starts.push_back(BT);
    int groups = (int)starts.size() - 1;
    // in parallel over strips of 16 channels (one cache line of floats per row), so the work is
    // balanced however the tokens repeat
    const int strip = 16;
    #pragma omp parallel for schedule(dynamic)
    for (int c0 = 0; c0 < C; c0 += strip) {
        int width = std::min(strip, C - c0);
        real sum[strip];
        for (int g = 0; g < groups; g++) {
            G* drow = dembed_tokens + (size_t)tokens[order[starts[g]]] * C + c0;
            // start from the stored gradient, add the token's positions in order, round once
            for (int c = 0; c < width; c++) sum[c] = to_real(drow[c]);
            for (int k = starts[g]; k < starts[g + 1]; k++) {
                const T* dout_row = dout + (size_t)order[k] * C + c0;
                for (int c = 0; c < width; c++) sum[c] += to_real(dout_row[c]);
            }
            for (int c = 0; c < width; c++) drow[c] = from_real<G>(sum[c]);
        }
    }
}

#if defined(__CUDACC__) || defined(MIXLN_CUDA_EMULATION)
#include "../cuda_common.h"

// ---- CUDA kernels

// one thread per (position, channel)
template <typename T>
__global__ void embedding_forward_kernel(T* out, const int* tokens, const T* embed_tokens, int BT, int C) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)BT * C) return;
    size_t i = idx / C, c = idx % C;
    out[idx] = embed_tokens[(size_t)tokens[i] * C + c];
}

// One block per position i; blockDim a multiple of 32 (full warps for the ballot), at most 1024.
// The block of the FIRST position holding a token owns that token's row; the others exit. The
// owner walks the positions from i on in tiles of blockDim: each thread tests one position, the
// warps' ballots mark the matches, and then each thread, for one channel, adds the matching
// positions' gradients in increasing position order to a float sum that started from the stored
// row. One store per element, rounded once; no two blocks touch the same row.
template <typename T, typename G>
__global__ void embedding_backward_kernel(G* dembed_tokens, const T* dout, const int* tokens, int BT, int C) {
    __shared__ unsigned matches[32];   // per warp of the current tile: bit `lane` = that position holds the token
    int i = blockIdx.x;
    int token = tokens[i];
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    // 1. an earlier position holding the same token owns the row (block-uniform exit)
    for (int start = 0; start < i; start += blockDim.x) {
        int j = start + threadIdx.x;
        if (__syncthreads_or(j < i && tokens[j] == token)) return;
    }
    // 2. one thread per channel, in chunks of blockDim channels
    for (int c0 = 0; c0 < C; c0 += blockDim.x) {
        int c = c0 + threadIdx.x;
        float sum = c < C ? to_float(dembed_tokens[(size_t)token * C + c]) : 0.0f;
        for (int start = i; start < BT; start += blockDim.x) {
            int j = start + threadIdx.x;
            unsigned ballot = __ballot_sync(0xffffffffu, j < BT && tokens[j] == token);
            if (lane == 0) matches[warp] = ballot;
            __syncthreads();
            if (c < C) {
                // warps in order, lanes in order: positions in increasing order
                for (int w = 0; w < warps; w++) {
                    for (unsigned m = matches[w]; m != 0; m &= m - 1) {
                        int position = start + w * 32 + (__ffs((int)m) - 1);
                        sum += to_float(dout[(size_t)position * C + c]);
                    }
                }
            }
            __syncthreads();   // everyone has read matches[] before the next tile overwrites it
        }
        if (c < C) dembed_tokens[(size_t)token * C + c] = from_float<G>(sum);
    }
}

// ---- launchers

template <typename T>
inline void embedding_forward(T* out, const int* tokens, const T* embed_tokens, int BT, int C, cudaStream_t stream) {
    const int block = 256;
    size_t n = (size_t)BT * C;
    LAUNCH(embedding_forward_kernel<T>, dim3((unsigned)((n + block - 1) / block)), dim3(block), 0, stream, out, tokens,
           embed_tokens, BT, C);
}

template <typename T, typename G>
inline void embedding_backward(G* dembed_tokens, const T* dout, const int* tokens, int BT, int C, cudaStream_t stream) {
    if (BT == 0) return;
    const int block = 256;
    auto kernel = embedding_backward_kernel<T, G>;
    LAUNCH(kernel, dim3(BT), dim3(block), 0, stream, dembed_tokens, dout, tokens, BT, C);
}
#endif
