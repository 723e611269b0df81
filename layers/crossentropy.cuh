/*
The loss at the end of the LM head: softmax over the vocabulary and cross-entropy against the
next token, loss = -log softmax(logits)[target], averaged over the positions by the caller.
A position whose target is IGNORED_TARGET (-1: padding, or a row's last position when the data
holds one document per row) has loss 0 and a zero gradient row, and the caller's mean leaves it
out (PyTorch's ignore_index).

Backward overwrites the logits with their gradient, (softmax - onehot(target)) * dloss, so no
separate (B, T, V) buffer is needed: the logits are not used again after the loss.
Both directions use a max-shifted softmax: exponentials in the working precision (each is
accurate to an ulp), their sum in double on the CPU. The forward pass finds each row's maximum
and sum in one pass over the row (on the GPU an online softmax: a running maximum, the running
sum rescaled when it grows) and keeps them, (N, 2) "stats", so that backward is one more pass:
read each logit, write its gradient. At V = 32000 those passes over the logits are all these
kernels cost.

In training the loss and its gradient are wanted together, so crossentropy_forward_backward does
both in one kernel: each row's statistics and loss, then straight away its gradient over the
logits. That reads the (B, T, V) logits once from memory instead of twice (the second pass over
a row finds it in cache): 1 GB a step at LLaMA-71M, B 64, T 256 in bf16. It computes exactly what
the two kernels compute, the same values in the same order, so its results are theirs to the bit.

Storage type: the logits and their gradient are stored in T (float, double in the CPU
finite-difference build, or bf16); the per-position losses and the stats stay float (`real` on
the CPU), and all the math is in float (the CPU's sum in double, kept as a `real`). The only
rounding to T is the store of each gradient element, exp(logit - max) * (dloss / sum) computed
in float, minus dloss at the target, by the kernel and the CPU twin alike.
*/
#pragma once

#include <cmath>

#include "../common.h"

// ---- CPU reference

// losses (N) per position; stats (N, 2): each row's maximum logit and sum of exp(logit - max), kept
// for backward; logits (N, V); targets (N)
template <typename T>
inline void crossentropy_forward_cpu(real* losses, real* stats, const T* logits, const int* targets, int N, int V) {
    #pragma omp parallel for
    for (int i = 0; i < N; i++) {
        const T* row = logits + (size_t)i * V;
        real max_logit = to_real(row[0]);
        #pragma omp simd reduction(max : max_logit)
        for (int v = 1; v < V; v++) {
            real x = to_real(row[v]);
            max_logit = x > max_logit ? x : max_logit;
        }
        double sum = 0.0;
        #pragma omp simd reduction(+ : sum)
        for (int v = 0; v < V; v++) sum += exp_cpu(to_real(row[v]) - max_logit);
        // -log p[target] = log(sum) - (logit[target] - max); nothing for an ignored position
        int target = targets[i];
        losses[i] = target < 0 ? (real)0 : (real)(log(sum) - (double)(to_real(row[target]) - max_logit));
        stats[2 * i] = max_logit;
        stats[2 * i + 1] = (real)sum;
    }
}

// dlogits (N, V) = (softmax(logits) - onehot) * dloss, written over logits (they may alias);
// dloss is the gradient of the final loss with respect to each position's loss (1/N for a mean
// over N targets); stats (N, 2) from the forward pass over the same logits. An ignored position's
// row is zeros.
template <typename T>
inline void crossentropy_backward_cpu(T* dlogits, const T* logits, const real* stats, const int* targets, real dloss,
                                      int N, int V) {
    #pragma omp parallel for
    for (int i = 0; i < N; i++) {
        const T* row = logits + (size_t)i * V;
        T* drow = dlogits + (size_t)i * V;
        int target = targets[i];
        if (target < 0) {
            // an ignored position: no loss, so no gradient
            for (int v = 0; v < V; v++) drow[v] = from_real<T>((real)0);
            continue;
        }
        real max_logit = stats[2 * i], scale = (real)(1.0 / (double)stats[2 * i + 1]) * dloss;
        real target_logit = to_real(row[target]);   // read before the loop overwrites it (in place)
        // probabilities times dloss, each element read just before its own store, rounded once
        for (int v = 0; v < V; v++) drow[v] = from_real<T>(exp_cpu(to_real(row[v]) - max_logit) * scale);
        // minus the one-hot target (the target's element recomputed, so it too is rounded once)
        drow[target] = from_real<T>(exp_cpu(target_logit - max_logit) * scale - dloss);
    }
}

// Both in one call, as training takes them: losses (N) and stats (N, 2) as crossentropy_forward_cpu
// gives them, and dlogits (N, V), which may be logits, as crossentropy_backward_cpu then gives them
template <typename T>
inline void crossentropy_forward_backward_cpu(T* dlogits, real* losses, real* stats, const T* logits,
                                              const int* targets, real dloss, int N, int V) {
    crossentropy_forward_cpu(losses, stats, logits, targets, N, V);
    crossentropy_backward_cpu(dlogits, logits, stats, targets, dloss, N, V);
}

#if defined(__CUDACC__) || defined(MIXLN_CUDA_EMULATION)
#include "../cuda_common.h"

// ---- CUDA kernels

// Two parts' softmax statistics (maximum m, sum s of exp(x - m)) merged into the first:
// m = max(m_a, m_b), s = s_a exp(m_a - m) + s_b exp(m_b - m). A part with no elements has
// m = -inf and s = 0, and adds nothing.
__device__ __forceinline__ void softmax_stats_merge(float* max_a, float* sum_a, float max_b, float sum_b) {
    float m = fmaxf(*max_a, max_b);
    if (m == -INFINITY) return;   // both parts empty
    *sum_a = *sum_a * expf(*max_a - m) + sum_b * expf(max_b - m);
    *max_a = m;
}

// Rows whose elements can be read 16 bytes at a time (Vector16; V a multiple of 16 / sizeof(T)
// and the buffer 16-byte aligned, so every row is: LLaMA's V = 32000 in bf16 or float) are; other rows
// go one element per load. Either way a thread's loads for a chunk are all issued before any is
// used (the lesson of rmsnorm_backward_input_kernel, dev/PERF.md): CROSSENTROPY_CHUNK elements
// of the plain path, or CROSSENTROPY_VECTORS vectors.
constexpr int CROSSENTROPY_CHUNK = 8;
constexpr int CROSSENTROPY_VECTORS = 2;
template <typename T>
__device__ __forceinline__ bool crossentropy_vectors_fit(const T* buffer, int V) {
    return V % VECTOR16_SIZE<T> == 0 && reinterpret_cast<uintptr_t>(buffer) % 16 == 0;
}

// A thread's chunk of the vector path, loads first: x[u * E + e] = row[v0 + u * blockDim.x * E + e]
// for its CROSSENTROPY_VECTORS vectors of E = VECTOR16_SIZE<T> values, `past_end` for vectors past V
template <typename T>
__device__ __forceinline__ void crossentropy_load_vectors(float* x, const T* row, int v0, int V, float past_end) {
    constexpr int E = VECTOR16_SIZE<T>;
    Vector16<T> values[CROSSENTROPY_VECTORS] = {};
    KERNEL_UNROLL
    for (int u = 0; u < CROSSENTROPY_VECTORS; u++) {
        int v = v0 + u * blockDim.x * E;
        if (v < V) values[u] = load_vector16(row + v);
    }
    KERNEL_UNROLL
    for (int u = 0; u < CROSSENTROPY_VECTORS; u++) {
        bool inside = v0 + u * (int)blockDim.x * E < V;
        KERNEL_UNROLL
        for (int e = 0; e < E; e++) x[u * E + e] = inside ? to_float(values[u].values[e]) : past_end;
    }
}

// The same for the fallback: x[u] = row[v0 + u * blockDim.x], CROSSENTROPY_CHUNK elements, loads
// first, `past_end` for elements past V
template <typename T>
__device__ __forceinline__ void crossentropy_load_chunk(float* x, const T* row, int v0, int V, float past_end) {
    KERNEL_UNROLL
    for (int u = 0; u < CROSSENTROPY_CHUNK; u++) {
        int v = v0 + u * blockDim.x;
        x[u] = v < V ? to_float(row[v]) : past_end;
    }
}

// A thread's running statistics take in a chunk of n elements x (past the row's end: -inf):
// the chunk's maximum (finite: the chunk's first element is in the row), the sum rescaled to it
template <int n>
__device__ __forceinline__ void softmax_stats_add_chunk(float* max_logit, float* sum, const float* x) {
    float chunk_max = x[0];
    KERNEL_UNROLL
    for (int u = 1; u < n; u++) chunk_max = fmaxf(chunk_max, x[u]);
    if (chunk_max > *max_logit) {
        *sum *= expf(*max_logit - chunk_max);   // 0 * exp(-inf) = 0 for the first chunk
        *max_logit = chunk_max;
    }
    KERNEL_UNROLL
    for (int u = 0; u < n; u++) *sum += expf(x[u] - *max_logit);   // 0 past the row's end
}

// The softmax statistics of one row, for a whole block: its maximum and sum of exp(x - max), in
// ONE pass over the row (the rows are V = 32000 wide): each thread keeps a running maximum and rescales its running sum when the
// maximum grows (the online softmax), then the threads' statistics are merged by a fixed
// butterfly in each warp and in warp order across the block, so the result is deterministic.
// `vectors`: crossentropy_vectors_fit for the buffer holding the row.
template <typename T>
__device__ __forceinline__ void row_softmax_stats(float* max_out, float* sum_out, const T* row, int V, bool vectors) {
    __shared__ float shared_max[32], shared_sum[32];
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    float max_logit = -INFINITY, sum = 0.0f;
    if (vectors) {
        // thread i takes vectors i, i + blockDim.x, ... CROSSENTROPY_VECTORS of them at a time
        constexpr int E = VECTOR16_SIZE<T>;
        for (int v0 = threadIdx.x * E; v0 < V; v0 += blockDim.x * E * CROSSENTROPY_VECTORS) {
            float x[CROSSENTROPY_VECTORS * E];
            crossentropy_load_vectors(x, row, v0, V, -INFINITY);
            softmax_stats_add_chunk<CROSSENTROPY_VECTORS * E>(&max_logit, &sum, x);
        }
    } else {
        for (int v0 = threadIdx.x; v0 < V; v0 += blockDim.x * CROSSENTROPY_CHUNK) {
            float x[CROSSENTROPY_CHUNK];
            crossentropy_load_chunk(x, row, v0, V, -INFINITY);
            softmax_stats_add_chunk<CROSSENTROPY_CHUNK>(&max_logit, &sum, x);
        }
    }
    for (int offset = 16; offset > 0; offset /= 2) {
        float other_max = __shfl_xor_sync(0xffffffffu, max_logit, offset);
        float other_sum = __shfl_xor_sync(0xffffffffu, sum, offset);
        softmax_stats_merge(&max_logit, &sum, other_max, other_sum);
    }
    if (lane == 0) shared_max[warp] = max_logit, shared_sum[warp] = sum;
    __syncthreads();
    max_logit = shared_max[0], sum = shared_sum[0];
    for (int w = 1; w < warps; w++) softmax_stats_merge(&max_logit, &sum, shared_max[w], shared_sum[w]);
    __syncthreads();   // shared_* may be reused by a later call
    *max_out = max_logit;
    *sum_out = sum;
}

// One block per row (the grid has N blocks): the row's statistics, kept in stats (N, 2), and its loss
template <typename T>
__global__ void crossentropy_forward_kernel(float* losses, float* stats, const T* logits, const int* targets, int V) {
    const T* row = logits + (size_t)blockIdx.x * V;
    float max_logit, sum;
    row_softmax_stats(&max_logit, &sum, row, V, crossentropy_vectors_fit(logits, V));
    if (threadIdx.x == 0) {
        int target = targets[blockIdx.x];
        losses[blockIdx.x] = target < 0 ? 0.0f : logf(sum) - (to_float(row[target]) - max_logit);
        stats[2 * blockIdx.x] = max_logit;
        stats[2 * blockIdx.x + 1] = sum;
    }
}

// The gradient of one row, for a whole block, from the row's statistics (max_logit, scale = dloss /
// sum): each thread reads its elements (a chunk's loads first) and overwrites them with
// (softmax - onehot(target)) * dloss, so in place is safe. `vectors`: crossentropy_vectors_fit for
// both buffers. An ignored position (target < 0) gets a row of zeros, without reading the row.
template <typename T>
__device__ __forceinline__ void row_crossentropy_gradient(T* drow, const T* row, float max_logit, float scale,
                                                          int target, float dloss, int V, bool vectors) {
    if (target < 0) {
        if (vectors) {
            constexpr int E = VECTOR16_SIZE<T>;
            Vector16<T> zeros;
            KERNEL_UNROLL
            for (int e = 0; e < E; e++) zeros.values[e] = from_float<T>(0.0f);
            for (int v = threadIdx.x * E; v < V; v += blockDim.x * E) store_vector16(drow + v, zeros);
        } else {
            for (int v = threadIdx.x; v < V; v += blockDim.x) drow[v] = from_float<T>(0.0f);
        }
        return;
    }
    if (vectors) {
        constexpr int E = VECTOR16_SIZE<T>;
        for (int v0 = threadIdx.x * E; v0 < V; v0 += blockDim.x * E * CROSSENTROPY_VECTORS) {
            float x[CROSSENTROPY_VECTORS * E];
            crossentropy_load_vectors(x, row, v0, V, 0.0f);
            KERNEL_UNROLL
            for (int u = 0; u < CROSSENTROPY_VECTORS; u++) {
                int v = v0 + u * blockDim.x * E;
                if (v >= V) continue;
                Vector16<T> gradient;
                KERNEL_UNROLL
                for (int e = 0; e < E; e++)
                    gradient.values[e] =
                        from_float<T>(expf(x[u * E + e] - max_logit) * scale - (v + e == target ? dloss : 0.0f));
                store_vector16(drow + v, gradient);
            }
        }
    } else {
        for (int v0 = threadIdx.x; v0 < V; v0 += blockDim.x * CROSSENTROPY_CHUNK) {
            float x[CROSSENTROPY_CHUNK];
            crossentropy_load_chunk(x, row, v0, V, 0.0f);
            KERNEL_UNROLL
            for (int u = 0; u < CROSSENTROPY_CHUNK; u++) {
                int v = v0 + u * blockDim.x;
                if (v < V) drow[v] = from_float<T>(expf(x[u] - max_logit) * scale - (v == target ? dloss : 0.0f));
            }
        }
    }
}

// One block per row, one pass with the forward's statistics
template <typename T>
__global__ void crossentropy_backward_kernel(T* dlogits, const T* logits, const float* stats, const int* targets,
                                             float dloss, int V) {
    const T* row = logits + (size_t)blockIdx.x * V;
    T* drow = dlogits + (size_t)blockIdx.x * V;
    bool vectors = crossentropy_vectors_fit(logits, V) && crossentropy_vectors_fit(dlogits, V);
    float max_logit = stats[2 * blockIdx.x], scale = dloss / stats[2 * blockIdx.x + 1];
    row_crossentropy_gradient(drow, row, max_logit, scale, targets[blockIdx.x], dloss, V, vectors);
}

// One block per row: the forward kernel's statistics and loss, then the backward kernel's gradient
// from those same float values, so the results are theirs to the bit. The target's logit is read
// before the statistics, whose barriers then keep every thread's reads of the row ahead of any
// thread's first store into it (in place is safe).
template <typename T>
__global__ void crossentropy_forward_backward_kernel(T* dlogits, float* losses, float* stats, const T* logits,
                                                     const int* targets, float dloss, int V) {
    const T* row = logits + (size_t)blockIdx.x * V;
    T* drow = dlogits + (size_t)blockIdx.x * V;
    // the paths the two kernels take: the statistics by the logits' alignment, the gradient by both buffers'
    bool stats_vectors = crossentropy_vectors_fit(logits, V);
    bool vectors = stats_vectors && crossentropy_vectors_fit(dlogits, V);
    int target = targets[blockIdx.x];
    float target_logit = target < 0 ? 0.0f : to_float(row[target]);   // an ignored position: no loss, zeros
    float max_logit, sum;
    row_softmax_stats(&max_logit, &sum, row, V, stats_vectors);
    if (threadIdx.x == 0) {
        losses[blockIdx.x] = target < 0 ? 0.0f : logf(sum) - (target_logit - max_logit);
        stats[2 * blockIdx.x] = max_logit;
        stats[2 * blockIdx.x + 1] = sum;
    }
    row_crossentropy_gradient(drow, row, max_logit, dloss / sum, target, dloss, V, vectors);
}

// ---- launchers

// losses (N); stats (N, 2) kept for backward; logits (N, V); targets (N), IGNORED_TARGET for none
template <typename T>
inline void crossentropy_forward(float* losses, float* stats, const T* logits, const int* targets, int N, int V,
                                 cudaStream_t stream) {
    LAUNCH(crossentropy_forward_kernel<T>, dim3(N), dim3(256), 0, stream, losses, stats, logits, targets, V);
}

// dlogits (N, V), may be logits; stats (N, 2) from crossentropy_forward over these logits
template <typename T>
inline void crossentropy_backward(T* dlogits, const T* logits, const float* stats, const int* targets, float dloss,
                                  int N, int V, cudaStream_t stream) {
    LAUNCH(crossentropy_backward_kernel<T>, dim3(N), dim3(256), 0, stream, dlogits, logits, stats, targets, dloss, V);
}
// losses (N), stats (N, 2) and dlogits (N, V), which may be logits: crossentropy_forward then
// crossentropy_backward in one kernel
template <typename T>
inline void crossentropy_forward_backward(T* dlogits, float* losses, float* stats, const T* logits, const int* targets,
                                          float dloss, int N, int V, cudaStream_t stream) {
    LAUNCH(crossentropy_forward_backward_kernel<T>, dim3(N), dim3(256), 0, stream, dlogits, losses, stats, logits,
           targets, dloss, V);
}
#endif
