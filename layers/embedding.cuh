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

Both read the positions grouped by token, which group_positions_by_token makes on the host from
the input tokens (a stable counting sort over the vocabulary, O(B*T + V)); the model makes them
when a backward pass starts, from the inputs of the forward pass before it (model.h). With the groups
given, the kernel is one block per (token that occurs, strip of channels), each thread summing
its channel over the group's positions: B*T*C loads in all, the least there is, and no block
searches the inputs for the positions of its token.
*/
#pragma once

#include <algorithm>
#include <cstring>
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

// The positions 0..BT-1 of tokens (BT) grouped by token id, ascending, increasing within a group:
// group g is positions[starts[g]] .. positions[starts[g + 1] - 1]. positions (BT) and starts
// (BT + 1) are written; counts (V + 1) is scratch. A stable counting sort over the vocabulary.
// Returns the number of groups (distinct tokens). Token ids must be in [0, V).
inline int group_positions_by_token(int* positions, int* starts, int* counts, const int* tokens, int BT, int V) {
    // how many positions hold each token, then where each token's group begins
    std::fill(counts, counts + V + 1, 0);
    for (int i = 0; i < BT; i++) counts[tokens[i] + 1]++;
    for (int v = 0; v < V; v++) counts[v + 1] += counts[v];
    // each position into its token's group, in increasing order (counts[v] is the next free slot)
    for (int i = 0; i < BT; i++) positions[counts[tokens[i]]++] = i;
    // a group starts wherever the token changes
    int groups = 0;
    for (int k = 0; k < BT; k++) {
        if (k == 0 || tokens[positions[k]] != tokens[positions[k - 1]]) starts[groups++] = k;
    }
    starts[groups] = BT;
    return groups;
}

// dembed_tokens (V, C) +=; dout (B*T, C); tokens (B*T); positions (B*T), starts (groups + 1) and
// groups from group_positions_by_token(tokens)
template <typename T, typename G>
inline void embedding_backward_cpu(G* dembed_tokens, const T* dout, const int* tokens, const int* positions,
                                   const int* starts, int groups, int C) {
    // in parallel over strips of 16 channels (one cache line of floats per row), so the work is
    // balanced however the tokens repeat
    const int strip = 16;
    #pragma omp parallel for schedule(dynamic)
    for (int c0 = 0; c0 < C; c0 += strip) {
        int width = std::min(strip, C - c0);
        real sum[strip];
        for (int g = 0; g < groups; g++) {
            G* drow = dembed_tokens + (size_t)tokens[positions[starts[g]]] * C + c0;
            // start from the stored gradient, add the token's positions in order, round once
            for (int c = 0; c < width; c++) sum[c] = to_real(drow[c]);
            for (int k = starts[g]; k < starts[g + 1]; k++) {
                const T* dout_row = dout + (size_t)positions[k] * C + c0;
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

// One block per (group g of positions holding one token, strip of blockDim channels): each
// thread adds its channel of the group's positions, in increasing position order, to a float sum
// that started from the stored row; one store per element, rounded once. No two blocks touch the
// same element.
template <typename T, typename G>
__global__ void embedding_backward_kernel(G* dembed_tokens, const T* dout, const int* tokens, const int* positions,
                                          const int* starts, int C) {
    int g = blockIdx.x, c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= C) return;
    int begin = starts[g], end = starts[g + 1];
    G* drow = dembed_tokens + (size_t)tokens[positions[begin]] * C;
    float sum = to_float(drow[c]);
    for (int k = begin; k < end; k++) sum += to_float(dout[(size_t)positions[k] * C + c]);
    drow[c] = from_float<G>(sum);
}

// ---- launchers

template <typename T>
inline void embedding_forward(T* out, const int* tokens, const T* embed_tokens, int BT, int C, cudaStream_t stream) {
    const int block = 256;
    size_t n = (size_t)BT * C;
    LAUNCH(embedding_forward_kernel<T>, dim3((unsigned)((n + block - 1) / block)), dim3(block), 0, stream, out, tokens,
           embed_tokens, BT, C);
}

// positions, starts (model memory) and groups from group_positions_by_token
template <typename T, typename G>
inline void embedding_backward(G* dembed_tokens, const T* dout, const int* tokens, const int* positions,
                               const int* starts, int groups, int C, cudaStream_t stream) {
    if (groups == 0) return;
    const int block = 128;   // channels per block
    auto kernel = embedding_backward_kernel<T, G>;
    LAUNCH(kernel, dim3(groups, ceil_div(C, block)), dim3(block), 0, stream, dembed_tokens, dout, tokens, positions,
           starts, C);
}
#endif
