/*
Global gradient norm: the L2 norm of all parameter gradients taken together, logged every step
and used for clipping (scale every gradient by clip / (norm + 1e-6) when the norm exceeds clip,
as torch.nn.utils.clip_grad_norm_ does). Summed in double: it is one number over millions.

The gradients are stored as G (float, double in the CPU-only fd build, or bf16 in
--precision bf16-pure); each is converted to float (CPU: real) on load and squared there. A bf16
value is exact in float and its square (16 significant bits) is exact too, so the only rounding is
in the sums, as for fp32 gradients. The result is never stored as G: double on the CPU, float on
the GPU.
*/
#pragma once

#include <cmath>

#include "../common.h"

// ---- CPU reference

// returns sqrt(sum of grads^2) over grads (n). The sum goes in a fixed number of chunks added in
// order (an OpenMP reduction would combine threads in whatever order they finish), so the result
// is the same bits on every run, whatever the thread count. Within a chunk the sum runs in the
// SIMD lanes (omp simd: a partial sum per lane, fixed by the target's vector width, added at the
// end); in order, one add at a time waiting for the last, it took a few percent of a CPU step.
template <typename G>
inline double global_norm_cpu(const G* grads, size_t n) {
    const int chunks = 64;
    double partial[chunks];
    #pragma omp parallel for
    for (int c = 0; c < chunks; c++) {
        size_t begin = n * c / chunks, end = n * (c + 1) / chunks;
        double sum = 0.0;
        #pragma omp simd reduction(+ : sum)
        for (size_t i = begin; i < end; i++) {
            double g = (double)to_real(grads[i]);
            sum += g * g;
        }
        partial[c] = sum;
    }
    double sum = 0.0;
    for (int c = 0; c < chunks; c++) sum += partial[c];
    return sqrt(sum);
}

#if defined(__CUDACC__) || defined(MIXLN_CUDA_EMULATION)
#include "../cuda_common.h"

// ---- CUDA kernels

// Two passes with a fixed grid, so the summation order (and the result) never changes:
// each block sums a strided share of the squares into partials[block], then one block sums those.
constexpr int GLOBAL_NORM_BLOCKS = 512;

template <typename G>
__global__ void global_norm_partials_kernel(float* partials, const G* grads, size_t n) {
    __shared__ float shared[32];
    float sum = 0.0f;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float g = to_float(grads[i]);
        sum += g * g;
    }
    sum = block_reduce_sum(sum, shared);
    if (threadIdx.x == 0) partials[blockIdx.x] = sum;
}

// The same with 16-byte loads (grads 16-byte aligned): thread i takes chunks i, i + stride, ... of
// VEC values, GLOBAL_NORM_UNROLL chunks' loads issued before their squares are summed (in chunk
// order, then value order), and thread i of block 0 also the value n - tail + i of the last
// partial chunk. One 4-byte load a thread at a time kept some 4 KB in flight per SM: a fraction
// of the memory's rate for the 284 MB of LLaMA-71M's gradients.
constexpr int GLOBAL_NORM_UNROLL = 4;
template <typename G>
__global__ void global_norm_partials_vector_kernel(float* partials, const G* grads, size_t n) {
    constexpr int VEC = VECTOR16_SIZE<G>;
    __shared__ float shared[32];
    size_t chunks = n / VEC, stride = (size_t)gridDim.x * blockDim.x;
    float sum = 0.0f;
    for (size_t c0 = (size_t)blockIdx.x * blockDim.x + threadIdx.x; c0 < chunks; c0 += stride * GLOBAL_NORM_UNROLL) {
        Vector16<G> values[GLOBAL_NORM_UNROLL] = {};   // zeros past the last chunk
        for (int u = 0; u < GLOBAL_NORM_UNROLL; u++)
            if (c0 + u * stride < chunks) values[u] = load_vector16(grads + (c0 + u * stride) * VEC);
        for (int u = 0; u < GLOBAL_NORM_UNROLL; u++)
            for (int e = 0; e < VEC; e++) {
                float g = to_float(values[u].values[e]);
                sum += g * g;
            }
    }
    if (blockIdx.x == 0 && threadIdx.x < n - chunks * VEC) {
        float g = to_float(grads[chunks * VEC + threadIdx.x]);
        sum += g * g;
    }
    sum = block_reduce_sum(sum, shared);
    if (threadIdx.x == 0) partials[blockIdx.x] = sum;
}

static __global__ void global_norm_final_kernel(float* out, const float* partials, int count) {
    __shared__ float shared[32];
    float sum = 0.0f;
    for (int i = threadIdx.x; i < count; i += blockDim.x) sum += partials[i];
    sum = block_reduce_sum(sum, shared);
    if (threadIdx.x == 0) *out = sum;
}

// ---- launchers

// out (1) on the device = sum of grads^2; partials (GLOBAL_NORM_BLOCKS) scratch
template <typename G>
inline void global_norm_squared(float* out, float* partials, const G* grads, size_t n, cudaStream_t stream) {
    if (reinterpret_cast<uintptr_t>(grads) % 16 == 0)
        LAUNCH(global_norm_partials_vector_kernel<G>, dim3(GLOBAL_NORM_BLOCKS), dim3(256), 0, stream, partials, grads, n);
    else
        LAUNCH(global_norm_partials_kernel<G>, dim3(GLOBAL_NORM_BLOCKS), dim3(256), 0, stream, partials, grads, n);
    LAUNCH(global_norm_final_kernel, dim3(1), dim3(256), 0, stream, out, partials, GLOBAL_NORM_BLOCKS);
}
#endif
