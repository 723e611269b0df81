/*
LayerNorm with bias: y = (x - mean) * rstd * w + b, rstd = 1 / sqrt(var + eps), var the biased
variance (the mean of squared deviations), one row of C values at a time.

RMSNorm (rmsnorm.cuh) is what LLaMA and Mix-LN use; LayerNorm is here for the other norm
placements to compare against (the original Post-LN Transformer, DeepNorm), which were defined
with it. Like RMSNorm, the kernels do not know where they sit: model.h decides.

The variance is computed in two passes (the mean first, then the mean of squared deviations),
never as mean(x^2) - mean^2, which cancels catastrophically when |mean| is large next to the
spread of the row.

Backward, with xhat = (x - mean) * rstd and g = dout * w:
    dinp    += rstd * (g - mean(g) - xhat * mean(g * xhat))
    dweight += sum over rows of dout * xhat
    dbias   += sum over rows of dout
g - mean(g) is one explicit fused multiply-add in both twins, so that they round it alike
whether or not the compiler contracts: at C = 1 the exact answer is 0 (xhat is 0, mean(g) is g),
and any difference in how dout * w is rounded comes out multiplied by rstd = 1/sqrt(eps).
The CPU version is the reference the CUDA kernels are tested against.
*/
#pragma once

#include <cmath>

#include "../common.h"

// ---- CPU reference

// out (N, C), mean (N) and rstd (N) saved for backward, inp (N, C), weight (C), bias (C)
inline void layernorm_forward_cpu(real* out, real* mean, real* rstd, const real* inp, const real* weight,
                                  const real* bias, int N, int C, float eps) {
    #pragma omp parallel for
    for (int i = 0; i < N; i++) {
        const real* x = inp + (size_t)i * C;
        real* y = out + (size_t)i * C;
        // both moments accumulated in double so the reference is the accurate side
        double sum = 0.0;
        for (int c = 0; c < C; c++) sum += x[c];
        double m = sum / C;
        double sum_squares = 0.0;
        for (int c = 0; c < C; c++) sum_squares += (x[c] - m) * (x[c] - m);
        real mu = (real)m;
        real r = (real)(1.0 / sqrt(sum_squares / C + eps));
        mean[i] = mu;
        rstd[i] = r;
        for (int c = 0; c < C; c++) y[c] = (x[c] - mu) * r * weight[c] + bias[c];
    }
}

// dinp (N, C) +=, dweight (C) +=, dbias (C) +=; dout (N, C), inp (N, C), weight (C), mean (N) and
// rstd (N) from forward
inline void layernorm_backward_cpu(real* dinp, real* dweight, real* dbias, const real* dout, const real* inp,
                                   const real* weight, const real* mean, const real* rstd, int N, int C) {
    // input gradient: rows are independent
    #pragma omp parallel for
    for (int i = 0; i < N; i++) {
        const real* x = inp + (size_t)i * C;
        const real* dy = dout + (size_t)i * C;
        real* dx = dinp + (size_t)i * C;
        real mu = mean[i], r = rstd[i];
        // mean(g) is the part of the gradient along the all-ones direction (the mean subtraction),
        // mean(g * xhat) the part along xhat (the division by the standard deviation)
        double sum_g = 0.0, sum_g_xhat = 0.0;
        for (int c = 0; c < C; c++) {
            real g = dy[c] * weight[c];
            sum_g += g;
            sum_g_xhat += (double)g * ((x[c] - mu) * r);
        }
        real mean_g = (real)(sum_g / C), mean_g_xhat = (real)(sum_g_xhat / C);
        for (int c = 0; c < C; c++) {
            real xhat = (x[c] - mu) * r;
            dx[c] += r * (std::fma(dy[c], weight[c], -mean_g) - xhat * mean_g_xhat);
        }
    }
    // weight and bias gradients: sums over rows, so parallelise over channels instead
    #pragma omp parallel for
    for (int c = 0; c < C; c++) {
        double sum_dy_xhat = 0.0, sum_dy = 0.0;
        for (int i = 0; i < N; i++) {
            real dy = dout[(size_t)i * C + c];
            sum_dy_xhat += (double)dy * ((inp[(size_t)i * C + c] - mean[i]) * rstd[i]);
            sum_dy += dy;
        }
        dweight[c] += (real)sum_dy_xhat;
        dbias[c] += (real)sum_dy;
    }
}

#if defined(__CUDACC__) || defined(MIXLN_CUDA_EMULATION)
#include "../cuda_common.h"

// ---- CUDA kernels

// One warp per row: lanes stride over the C channels, one shuffle reduction for the mean, a
// second for the squared deviations (the row is read three times; it is small and stays in cache).
// Rows past N belong to whole warps, which return together (no block barrier follows).
static __global__ void layernorm_forward_kernel(float* out, float* mean, float* rstd, const float* inp,
                                                const float* weight, const float* bias, int N, int C, float eps) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= N) return;
    const float* x = inp + (size_t)row * C;
    float sum = 0.0f;
    for (int c = lane; c < C; c += 32) sum += x[c];
    float mu = warp_reduce_sum(sum) / C;
    float sum_squares = 0.0f;
    for (int c = lane; c < C; c += 32) sum_squares += (x[c] - mu) * (x[c] - mu);
    float r = 1.0f / sqrtf(warp_reduce_sum(sum_squares) / C + eps);
    if (lane == 0) {
        mean[row] = mu;
        rstd[row] = r;
    }
    for (int c = lane; c < C; c += 32) out[(size_t)row * C + c] = (x[c] - mu) * r * weight[c] + bias[c];
}

// input gradient, one warp per row
static __global__ void layernorm_backward_input_kernel(float* dinp, const float* dout, const float* inp,
                                                       const float* weight, const float* mean, const float* rstd,
                                                       int N, int C) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= N) return;
    const float* x = inp + (size_t)row * C;
    const float* dy = dout + (size_t)row * C;
    float mu = mean[row], r = rstd[row];
    float sum_g = 0.0f, sum_g_xhat = 0.0f;
    for (int c = lane; c < C; c += 32) {
        float g = dy[c] * weight[c];
        sum_g += g;
        sum_g_xhat += g * ((x[c] - mu) * r);
    }
    float mean_g = warp_reduce_sum(sum_g) / C;
    float mean_g_xhat = warp_reduce_sum(sum_g_xhat) / C;
    for (int c = lane; c < C; c += 32) {
        float xhat = (x[c] - mu) * r;
        dinp[(size_t)row * C + c] += r * (fmaf(dy[c], weight[c], -mean_g) - xhat * mean_g_xhat);
    }
}

// weight and bias gradients: one thread per channel sums over the rows in order (deterministic;
// adjacent threads read adjacent channels, so the loads coalesce)
static __global__ void layernorm_backward_weight_kernel(float* dweight, float* dbias, const float* dout,
                                                        const float* inp, const float* mean, const float* rstd,
                                                        int N, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float sum_dy_xhat = 0.0f, sum_dy = 0.0f;
    for (int i = 0; i < N; i++) {
        float dy = dout[(size_t)i * C + c];
        sum_dy_xhat += dy * ((inp[(size_t)i * C + c] - mean[i]) * rstd[i]);
        sum_dy += dy;
    }
    dweight[c] += sum_dy_xhat;
    dbias[c] += sum_dy;
}

// ---- launchers

inline void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* weight,
                              const float* bias, int N, int C, float eps, cudaStream_t stream) {
    const int block = 256;   // 8 rows per block
    LAUNCH(layernorm_forward_kernel, dim3(ceil_div(N, block / 32)), dim3(block), 0, stream, out, mean, rstd, inp,
           weight, bias, N, C, eps);
}

inline void layernorm_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                               const float* weight, const float* mean, const float* rstd, int N, int C,
                               cudaStream_t stream) {
    const int block = 256;
    LAUNCH(layernorm_backward_input_kernel, dim3(ceil_div(N, block / 32)), dim3(block), 0, stream, dinp, dout, inp,
           weight, mean, rstd, N, C);
    LAUNCH(layernorm_backward_weight_kernel, dim3(ceil_div(C, block)), dim3(block), 0, stream, dweight, dbias, dout,
           inp, mean, rstd, N, C);
}
#endif
