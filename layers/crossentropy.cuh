/*
The loss at the end of the LM head: softmax over the vocabulary and cross-entropy against the
next token, loss = -log softmax(logits)[target], averaged over all B*T positions by the caller.

Backward overwrites the logits with their gradient, (softmax - onehot(target)) * dloss, so no
separate (B, T, V) buffer is needed: the logits are not used again after the loss.
Both directions use a max-shifted softmax: exponentials in the working precision (each is
accurate to an ulp), their sum in double.
*/
#pragma once

#include <cmath>

#include "../common.h"

// ---- CPU reference

// losses (N) per position; logits (N, V); targets (N)
inline void crossentropy_forward_cpu(real* losses, const real* logits, const int* targets, int N, int V) {
    #pragma omp parallel for
    for (int i = 0; i < N; i++) {
        const real* row = logits + (size_t)i * V;
        real max_logit = row[0];
        for (int v = 1; v < V; v++) max_logit = row[v] > max_logit ? row[v] : max_logit;
        double sum = 0.0;
        #pragma omp simd reduction(+ : sum)
        for (int v = 0; v < V; v++) sum += std::exp(row[v] - max_logit);
        // -log p[target] = log(sum) - (logit[target] - max)
        losses[i] = (real)(log(sum) - (double)(row[targets[i]] - max_logit));
    }
}

// dlogits (N, V) = (softmax(logits) - onehot) * dloss, written over logits (they may alias);
// dloss is the gradient of the final loss with respect to each position's loss (1/N for a mean)
inline void crossentropy_backward_cpu(real* dlogits, const real* logits, const int* targets,
                               real dloss, int N, int V) {
    #pragma omp parallel for
    for (int i = 0; i < N; i++) {
        const real* row = logits + (size_t)i * V;
        real* drow = dlogits + (size_t)i * V;
        real max_logit = row[0];
        for (int v = 1; v < V; v++) max_logit = row[v] > max_logit ? row[v] : max_logit;
        // the exponentials go into drow first (row and drow may be the same memory: each element
        // is read before it is overwritten), then become probabilities minus the one-hot target
        double sum = 0.0;
        for (int v = 0; v < V; v++) {
            real e = std::exp(row[v] - max_logit);
            drow[v] = e;
            sum += e;
        }
        real scale = (real)(1.0 / sum) * dloss;
        for (int v = 0; v < V; v++) drow[v] *= scale;
        drow[targets[i]] -= dloss;
    }
}

#if defined(__CUDACC__) || defined(MIXLN_CUDA_EMULATION)
#include "../cuda_common.h"

// ---- CUDA kernels

// The softmax statistics of one row, for a whole block: its maximum and sum of exp(x - max).
__device__ __forceinline__ void row_softmax_stats(float* max_out, float* sum_out, const float* row, int V) {
    __shared__ float shared[32];
    float max_logit = -INFINITY;
    for (int v = threadIdx.x; v < V; v += blockDim.x) max_logit = fmaxf(max_logit, row[v]);
    max_logit = block_reduce_max(max_logit, shared);
    float sum = 0.0f;
    for (int v = threadIdx.x; v < V; v += blockDim.x) sum += expf(row[v] - max_logit);
    *sum_out = block_reduce_sum(sum, shared);
    *max_out = max_logit;
}

// one block per row (the grid has N blocks)
static __global__ void crossentropy_forward_kernel(float* losses, const float* logits, const int* targets, int V) {
    const float* row = logits + (size_t)blockIdx.x * V;
    float max_logit, sum;
    row_softmax_stats(&max_logit, &sum, row, V);
    if (threadIdx.x == 0) losses[blockIdx.x] = logf(sum) - (row[targets[blockIdx.x]] - max_logit);
}

// One block per row, in place: every thread reads the row during the two reductions, whose
// barriers complete before any thread overwrites its elements with their gradient.
static __global__ void crossentropy_backward_kernel(float* dlogits, const float* logits, const int* targets, float dloss,
                                                    int V) {
    const float* row = logits + (size_t)blockIdx.x * V;
    float* drow = dlogits + (size_t)blockIdx.x * V;
    float max_logit, sum;
    row_softmax_stats(&max_logit, &sum, row, V);
    float scale = dloss / sum;
    int target = targets[blockIdx.x];
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        drow[v] = expf(row[v] - max_logit) * scale - (v == target ? dloss : 0.0f);
    }
}

// ---- launchers

inline void crossentropy_forward(float* losses, const float* logits, const int* targets, int N, int V, cudaStream_t stream) {
    LAUNCH(crossentropy_forward_kernel, dim3(N), dim3(256), 0, stream, losses, logits, targets, V);
}

inline void crossentropy_backward(float* dlogits, const float* logits, const int* targets, float dloss, int N, int V,
                                  cudaStream_t stream) {
    LAUNCH(crossentropy_backward_kernel, dim3(N), dim3(256), 0, stream, dlogits, logits, targets, dloss, V);
}
#endif
