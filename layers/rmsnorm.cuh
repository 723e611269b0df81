/*
RMSNorm: y = w * x / sqrt(mean(x^2) + eps), one row of C values at a time (no mean subtraction,
no bias, as in LLaMA).

Every decoder layer owns two of these and a final one sits before the LM head. Pre-LN layers
normalise the residual stream before each sublayer; Post-LN layers normalise the sum after the
residual add. The kernels are the same either way: model.h decides where they are called.

Backward, with xhat = x * rstd and g = dout * w:
    dw    += sum over rows of dout * xhat
    dinp  += rstd * (g - xhat * mean(g * xhat))
The CPU version is the reference the CUDA kernels are tested against.
*/
#pragma once

#include <cmath>

#include "../common.h"

// ---- CPU reference

// out (N, C), rstd (N) saved for backward, inp (N, C), weight (C)
inline void rmsnorm_forward_cpu(real* out, real* rstd, const real* inp, const real* weight,
                         int N, int C, float eps) {
    #pragma omp parallel for
    for (int i = 0; i < N; i++) {
        const real* x = inp + (size_t)i * C;
        real* y = out + (size_t)i * C;
        // mean of squares, accumulated in double so the reference is the accurate side
        double sum_squares = 0.0;
        for (int c = 0; c < C; c++) sum_squares += (double)x[c] * x[c];
        real r = (real)(1.0 / sqrt(sum_squares / C + eps));
        rstd[i] = r;
        for (int c = 0; c < C; c++) y[c] = weight[c] * (x[c] * r);
    }
}

// dinp (N, C) +=, dweight (C) +=; dout (N, C), inp (N, C), weight (C), rstd (N) from forward
inline void rmsnorm_backward_cpu(real* dinp, real* dweight, const real* dout, const real* inp,
                          const real* weight, const real* rstd, int N, int C) {
    // input gradient: rows are independent
    #pragma omp parallel for
    for (int i = 0; i < N; i++) {
        const real* x = inp + (size_t)i * C;
        const real* dy = dout + (size_t)i * C;
        real* dx = dinp + (size_t)i * C;
        real r = rstd[i];
        // mean over the row of g * xhat, the part of the gradient along x itself
        double dot = 0.0;
        for (int c = 0; c < C; c++) dot += (double)(dy[c] * weight[c]) * (x[c] * r);
        real mean_dot = (real)(dot / C);
        for (int c = 0; c < C; c++) dx[c] += r * (dy[c] * weight[c] - x[c] * r * mean_dot);
    }
    // weight gradient: a sum over rows, so parallelise over channels instead
    #pragma omp parallel for
    for (int c = 0; c < C; c++) {
        double sum = 0.0;
        for (int i = 0; i < N; i++) sum += (double)dout[(size_t)i * C + c] * (inp[(size_t)i * C + c] * rstd[i]);
        dweight[c] += (real)sum;
    }
}

#if defined(__CUDACC__) || defined(MIXLN_CUDA_EMULATION)
#include "../cuda_common.h"

// ---- CUDA kernels

// One warp per row: lanes stride over the C channels, a shuffle reduction sums the squares.
// Rows past N belong to whole warps, which return together (no block barrier follows).
static __global__ void rmsnorm_forward_kernel(float* out, float* rstd, const float* inp, const float* weight,
                                       int N, int C, float eps) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= N) return;
    const float* x = inp + (size_t)row * C;
    float sum_squares = 0.0f;
    for (int c = lane; c < C; c += 32) sum_squares += x[c] * x[c];
    sum_squares = warp_reduce_sum(sum_squares);
    float r = 1.0f / sqrtf(sum_squares / C + eps);
    if (lane == 0) rstd[row] = r;
    for (int c = lane; c < C; c += 32) out[(size_t)row * C + c] = weight[c] * (x[c] * r);
}

// input gradient, one warp per row
static __global__ void rmsnorm_backward_input_kernel(float* dinp, const float* dout, const float* inp, const float* weight,
                                              const float* rstd, int N, int C) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= N) return;
    const float* x = inp + (size_t)row * C;
    const float* dy = dout + (size_t)row * C;
    float r = rstd[row];
    float dot = 0.0f;
    for (int c = lane; c < C; c += 32) dot += dy[c] * weight[c] * (x[c] * r);
    float mean_dot = warp_reduce_sum(dot) / C;
    for (int c = lane; c < C; c += 32) dinp[(size_t)row * C + c] += r * (dy[c] * weight[c] - x[c] * r * mean_dot);
}

// weight gradient: one thread per channel sums over the rows in order (deterministic; adjacent
// threads read adjacent channels, so the loads coalesce)
static __global__ void rmsnorm_backward_weight_kernel(float* dweight, const float* dout, const float* inp, const float* rstd,
                                               int N, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float sum = 0.0f;
    for (int i = 0; i < N; i++) sum += dout[(size_t)i * C + c] * (inp[(size_t)i * C + c] * rstd[i]);
    dweight[c] += sum;
}

// ---- launchers

inline void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int N, int C, float eps,
                            cudaStream_t stream) {
    const int block = 256;   // 8 rows per block
    LAUNCH(rmsnorm_forward_kernel, dim3(ceil_div(N, block / 32)), dim3(block), 0, stream, out, rstd, inp, weight, N, C, eps);
}

inline void rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp, const float* weight,
                             const float* rstd, int N, int C, cudaStream_t stream) {
    const int block = 256;
    LAUNCH(rmsnorm_backward_input_kernel, dim3(ceil_div(N, block / 32)), dim3(block), 0, stream, dinp, dout, inp, weight,
           rstd, N, C);
    LAUNCH(rmsnorm_backward_weight_kernel, dim3(ceil_div(C, block)), dim3(block), 0, stream, dweight, dout, inp, rstd, N, C);
}
#endif
