/*
The loss at the end of the LM head: softmax over the vocabulary and cross-entropy against the
next token, loss = -log softmax(logits)[target], averaged over all B*T positions by the caller.

Backward overwrites the logits with their gradient, (softmax - onehot(target)) * dloss, so no
separate (B, T, V) buffer is needed: the logits are not used again after the loss.
Both directions use a max-shifted softmax: exponentials in the working precision (each is
accurate to an ulp), their sum in double.

Storage type: the logits and their gradient are stored in T (float, double in the CPU
finite-difference build, or bf16); the per-position losses stay float (`real` on the CPU), and
all the math is in float (the CPU's sum in double). The only rounding to T is the store of each
gradient element. The CPU twin keeps a row's exponentials in a `real` scratch row (not in the
gradient row, as a T store would round them before they are scaled), and the kernel recomputes
them, so each gradient element is rounded once in both.
*/
#pragma once

#include <cmath>
#include <vector>

#include "../common.h"

// ---- CPU reference

// losses (N) per position; logits (N, V); targets (N)
template <typename T>
inline void crossentropy_forward_cpu(real* losses, const T* logits, const int* targets, int N, int V) {
    #pragma omp parallel for
    for (int i = 0; i < N; i++) {
        const T* row = logits + (size_t)i * V;
        real max_logit = to_real(row[0]);
        for (int v = 1; v < V; v++) {
            real x = to_real(row[v]);
            max_logit = x > max_logit ? x : max_logit;
        }
        double sum = 0.0;
        #pragma omp simd reduction(+ : sum)
        for (int v = 0; v < V; v++) sum += std::exp(to_real(row[v]) - max_logit);
        // -log p[target] = log(sum) - (logit[target] - max)
        losses[i] = (real)(log(sum) - (double)(to_real(row[targets[i]]) - max_logit));
    }
}

// dlogits (N, V) = (softmax(logits) - onehot) * dloss, written over logits (they may alias);
// dloss is the gradient of the final loss with respect to each position's loss (1/N for a mean)
template <typename T>
inline void crossentropy_backward_cpu(T* dlogits, const T* logits, const int* targets,
                               real dloss, int N, int V) {
    #pragma omp parallel
    {
        std::vector<real> exps(V);   // this thread's scratch row: exp(logit - max)
        #pragma omp for
        for (int i = 0; i < N; i++) {
            const T* row = logits + (size_t)i * V;
            T* drow = dlogits + (size_t)i * V;
            real max_logit = to_real(row[0]);
            for (int v = 1; v < V; v++) {
                real x = to_real(row[v]);
                max_logit = x > max_logit ? x : max_logit;
            }
            // the exponentials and their sum (this pass reads the whole row before the next one
            // overwrites it: row and drow may be the same memory)
            double sum = 0.0;
            for (int v = 0; v < V; v++) {
                real e = std::exp(to_real(row[v]) - max_logit);
                exps[v] = e;
                sum += e;
            }
            // probabilities minus the one-hot target, times dloss, each rounded once
            real scale = (real)(1.0 / sum) * dloss;
            for (int v = 0; v < V; v++) drow[v] = from_real<T>(exps[v] * scale);
            int target = targets[i];
            drow[target] = from_real<T>(exps[target] * scale - dloss);
        }
    }
}

#if defined(__CUDACC__) || defined(MIXLN_CUDA_EMULATION)
#include "../cuda_common.h"

// ---- CUDA kernels

// The softmax statistics of one row, for a whole block: its maximum and sum of exp(x - max).
template <typename T>
__device__ __forceinline__ void row_softmax_stats(float* max_out, float* sum_out, const T* row, int V) {
    __shared__ float shared[32];
    float max_logit = -INFINITY;
    for (int v = threadIdx.x; v < V; v += blockDim.x) max_logit = fmaxf(max_logit, to_float(row[v]));
    max_logit = block_reduce_max(max_logit, shared);
    float sum = 0.0f;
    for (int v = threadIdx.x; v < V; v += blockDim.x) sum += expf(to_float(row[v]) - max_logit);
    *sum_out = block_reduce_sum(sum, shared);
    *max_out = max_logit;
}

// one block per row (the grid has N blocks)
template <typename T>
__global__ void crossentropy_forward_kernel(float* losses, const T* logits, const int* targets, int V) {
    const T* row = logits + (size_t)blockIdx.x * V;
    float max_logit, sum;
    row_softmax_stats(&max_logit, &sum, row, V);
    if (threadIdx.x == 0) losses[blockIdx.x] = logf(sum) - (to_float(row[targets[blockIdx.x]]) - max_logit);
}

// One block per row, in place: every thread reads the row during the two reductions, whose
// barriers complete before any thread overwrites its elements with their gradient (each thread
// then reads and overwrites only its own elements).
template <typename T>
__global__ void crossentropy_backward_kernel(T* dlogits, const T* logits, const int* targets, float dloss, int V) {
    const T* row = logits + (size_t)blockIdx.x * V;
    T* drow = dlogits + (size_t)blockIdx.x * V;
    float max_logit, sum;
    row_softmax_stats(&max_logit, &sum, row, V);
    float scale = dloss / sum;
    int target = targets[blockIdx.x];
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        drow[v] = from_float<T>(expf(to_float(row[v]) - max_logit) * scale - (v == target ? dloss : 0.0f));
    }
}

// ---- launchers

template <typename T>
inline void crossentropy_forward(float* losses, const T* logits, const int* targets, int N, int V, cudaStream_t stream) {
    LAUNCH(crossentropy_forward_kernel<T>, dim3(N), dim3(256), 0, stream, losses, logits, targets, V);
}

template <typename T>
inline void crossentropy_backward(T* dlogits, const T* logits, const int* targets, float dloss, int N, int V,
                                  cudaStream_t stream) {
    LAUNCH(crossentropy_backward_kernel<T>, dim3(N), dim3(256), 0, stream, dlogits, logits, targets, dloss, V);
}
#endif
