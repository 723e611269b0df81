/*
LayerNorm with bias: y = (x - mean) * rstd * w + b, rstd = 1 / sqrt(var + eps), var the biased
variance (the mean of squared deviations), one row of C values at a time.

RMSNorm (rmsnorm.cuh) is what LLaMA and Mix-LN use; LayerNorm is here for the other norm
placements to compare against (the original Post-LN Transformer, DeepNorm), which were defined
with it. Like RMSNorm, the kernels do not know where they sit: model.h decides. Like RMSNorm's,
they take a row stride (rows of C values `stride` apart, the elements between untouched), for
HybridNorm's norms on q, k and v inside qkv's rows.

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

Storage: activations, their gradients, the weight and the bias are stored in T (float, double in
the CPU's finite-difference build, or bf16), the weight and bias gradients in G (float, or bf16 in
bf16-pure); mean and rstd stay real / float. Everything is computed in float (the CPU reference in
real, its row sums in double) from the values as stored, and rounded once where stored: out once
per element; dinp, dweight and dbias accumulate as read, add in float, round once (dinp[i] =
round(dinp[i] + value)). The weight and bias gradients sum over rows in a fixed order, so they
are deterministic.
*/
#pragma once

#include <algorithm>

#include <cmath>

#include "../common.h"

// ---- CPU reference

// out (N, C), mean (N) and rstd (N) saved for backward, inp (N, C), weight (C), bias (C); the
// rows of out and inp `stride` elements apart (stride >= C)
template <typename T>
inline void layernorm_forward_cpu(T* out, real* mean, real* rstd, const T* inp, const T* weight, const T* bias, int N,
                                  int C, int stride, float eps) {
    #pragma omp parallel for
    for (int i = 0; i < N; i++) {
        const T* x = inp + (size_t)i * stride;
        T* y = out + (size_t)i * stride;
        // both moments accumulated in double so the reference is the accurate side
        double sum = 0.0;
        for (int c = 0; c < C; c++) sum += to_real(x[c]);
        double m = sum / C;
        double sum_squares = 0.0;
        for (int c = 0; c < C; c++) {
            real xc = to_real(x[c]);
            sum_squares += (xc - m) * (xc - m);
        }
        real mu = (real)m;
        real r = (real)(1.0 / sqrt(sum_squares / C + eps));
        mean[i] = mu;
        rstd[i] = r;
        // the output, rounded once to T
        for (int c = 0; c < C; c++)
            y[c] = from_real<T>((to_real(x[c]) - mu) * r * to_real(weight[c]) + to_real(bias[c]));
    }
}

// dinp (N, C) += (accumulate) or = (the old value never read, as in rmsnorm.cuh), dweight (C) +=,
// dbias (C) +=; dout (N, C), inp (N, C), weight (C), mean (N) and rstd (N) from forward; rows
// `stride` apart in dinp, dout and inp
template <typename T, typename G>
inline void layernorm_backward_cpu(T* dinp, G* dweight, G* dbias, const T* dout, const T* inp, const T* weight,
                                   const real* mean, const real* rstd, int N, int C, int stride, bool accumulate) {
    // input gradient: rows are independent
    #pragma omp parallel for
    for (int i = 0; i < N; i++) {
        const T* x = inp + (size_t)i * stride;
        const T* dy = dout + (size_t)i * stride;
        T* dx = dinp + (size_t)i * stride;
        real mu = mean[i], r = rstd[i];
        // mean(g) is the part of the gradient along the all-ones direction (the mean subtraction),
        // mean(g * xhat) the part along xhat (the division by the standard deviation); in double,
        // in SIMD lanes (a fixed order per build)
        double sum_g = 0.0, sum_g_xhat = 0.0;
        #pragma omp simd reduction(+ : sum_g, sum_g_xhat)
        for (int c = 0; c < C; c++) {
            real g = to_real(dy[c]) * to_real(weight[c]);
            sum_g += g;
            sum_g_xhat += (double)g * ((to_real(x[c]) - mu) * r);
        }
        real mean_g = (real)(sum_g / C), mean_g_xhat = (real)(sum_g_xhat / C);
        // accumulate: read, add in real, round once (or write: round once)
        for (int c = 0; c < C; c++) {
            real xhat = (to_real(x[c]) - mu) * r;
            real grad = r * (std::fma(to_real(dy[c]), to_real(weight[c]), -mean_g) - xhat * mean_g_xhat);
            real old = accumulate ? to_real(dx[c]) : real(0);
            dx[c] = from_real<T>(old + grad);
        }
    }
    // weight and bias gradients: sums over rows, so parallelise over channels instead: a thread
    // takes a block of channels and walks the rows in order, the block's sums side by side
    constexpr int CHANNELS = 32;
    #pragma omp parallel for
    for (int c0 = 0; c0 < C; c0 += CHANNELS) {
        int channels = std::min(CHANNELS, C - c0);
        double sums_dy_xhat[CHANNELS] = {}, sums_dy[CHANNELS] = {};
        for (int i = 0; i < N; i++) {
            const T* dy = dout + (size_t)i * stride + c0;
            const T* x = inp + (size_t)i * stride + c0;
            real mu = mean[i], r = rstd[i];
            #pragma omp simd
            for (int c = 0; c < channels; c++) {
                sums_dy_xhat[c] += (double)to_real(dy[c]) * ((to_real(x[c]) - mu) * r);
                sums_dy[c] += to_real(dy[c]);
            }
        }
        for (int c = 0; c < channels; c++) {
            dweight[c0 + c] = from_real<G>(to_real(dweight[c0 + c]) + (real)sums_dy_xhat[c]);
            dbias[c0 + c] = from_real<G>(to_real(dbias[c0 + c]) + (real)sums_dy[c]);
        }
    }
}

#if defined(__CUDACC__) || defined(MIXLN_CUDA_EMULATION)
#include "../cuda_common.h"

// ---- CUDA kernels

// One warp per row: lanes stride over the C channels, one shuffle reduction for the mean, a
// second for the squared deviations (the row is read three times; it is small and stays in cache).
// Rows past N belong to whole warps, which return together (no block barrier follows).
template <typename T>
static __global__ void layernorm_forward_kernel(T* out, float* mean, float* rstd, const T* inp, const T* weight,
                                                const T* bias, int N, int C, int stride, float eps) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= N) return;
    const T* x = inp + (size_t)row * stride;
    float sum = 0.0f;
    for (int c = lane; c < C; c += 32) sum += to_float(x[c]);
    float mu = warp_reduce_sum(sum) / C;
    float sum_squares = 0.0f;
    for (int c = lane; c < C; c += 32) {
        float xc = to_float(x[c]);
        sum_squares += (xc - mu) * (xc - mu);
    }
    float r = 1.0f / sqrtf(warp_reduce_sum(sum_squares) / C + eps);
    if (lane == 0) {
        mean[row] = mu;
        rstd[row] = r;
    }
    for (int c = lane; c < C; c += 32)
        out[(size_t)row * stride + c] = from_float<T>((to_float(x[c]) - mu) * r * to_float(weight[c]) + to_float(bias[c]));
}

// input gradient, one warp per row; dinp accumulates: read, add in float, round once (accumulate
// false: written, never read)
template <typename T>
static __global__ void layernorm_backward_input_kernel(T* dinp, const T* dout, const T* inp, const T* weight,
                                                       const float* mean, const float* rstd, int N, int C,
                                                       int stride, bool accumulate) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= N) return;
    const T* x = inp + (size_t)row * stride;
    const T* dy = dout + (size_t)row * stride;
    T* dx = dinp + (size_t)row * stride;
    float mu = mean[row], r = rstd[row];
    float sum_g = 0.0f, sum_g_xhat = 0.0f;
    for (int c = lane; c < C; c += 32) {
        float g = to_float(dy[c]) * to_float(weight[c]);
        sum_g += g;
        sum_g_xhat += g * ((to_float(x[c]) - mu) * r);
    }
    float mean_g = warp_reduce_sum(sum_g) / C;
    float mean_g_xhat = warp_reduce_sum(sum_g_xhat) / C;
    for (int c = lane; c < C; c += 32) {
        float xhat = (to_float(x[c]) - mu) * r;
        float grad = r * (fmaf(to_float(dy[c]), to_float(weight[c]), -mean_g) - xhat * mean_g_xhat);
        float old = accumulate ? to_float(dx[c]) : 0.0f;
        dx[c] = from_float<T>(old + grad);
    }
}

// weight and bias gradients: a block per 16 channels, 64 row groups each summing its rows in
// order, then the groups' sums added in order (column_reduce in cuda_common.h: deterministic) and
// the totals accumulated into dweight and dbias
template <typename T, typename G>
static __global__ void __launch_bounds__(COLUMN_THREADS)
    layernorm_backward_weight_kernel(G* dweight, G* dbias, const T* dout, const T* inp, const float* mean,
                                     const float* rstd, int N, int C, int stride) {
    __shared__ float partials[COLUMN_THREADS];
    int c = blockIdx.x * COLUMN_CHANNELS + threadIdx.x % COLUMN_CHANNELS, group = threadIdx.x / COLUMN_CHANNELS;
    float sum_dy_xhat = 0.0f, sum_dy = 0.0f;
    if (c < C)
        for (int i = group; i < N; i += COLUMN_ROW_GROUPS) {
            float dy = to_float(dout[(size_t)i * stride + c]);
            sum_dy_xhat += dy * ((to_float(inp[(size_t)i * stride + c]) - mean[i]) * rstd[i]);
            sum_dy += dy;
        }
    sum_dy_xhat = column_reduce(sum_dy_xhat, partials);
    sum_dy = column_reduce(sum_dy, partials);
    if (group == 0 && c < C) {
        dweight[c] = from_float<G>(to_float(dweight[c]) + sum_dy_xhat);
        dbias[c] = from_float<G>(to_float(dbias[c]) + sum_dy);
    }
}

// ---- launchers

// rows of C values `stride` elements apart in out and inp (stride >= C)
template <typename T>
inline void layernorm_forward(T* out, float* mean, float* rstd, const T* inp, const T* weight, const T* bias, int N,
                              int C, int stride, float eps, cudaStream_t stream) {
    const int block = 256;   // 8 rows per block
    LAUNCH(layernorm_forward_kernel<T>, dim3(ceil_div(N, block / 32)), dim3(block), 0, stream, out, mean, rstd, inp,
           weight, bias, N, C, stride, eps);
}

// rows `stride` apart in dinp, dout and inp, as in the forward
template <typename T, typename G>
inline void layernorm_backward(T* dinp, G* dweight, G* dbias, const T* dout, const T* inp, const T* weight,
                               const float* mean, const float* rstd, int N, int C, int stride, bool accumulate,
                               cudaStream_t stream) {
    const int block = 256;
    LAUNCH(layernorm_backward_input_kernel<T>, dim3(ceil_div(N, block / 32)), dim3(block), 0, stream, dinp, dout, inp,
           weight, mean, rstd, N, C, stride, accumulate);
    auto weight_kernel = layernorm_backward_weight_kernel<T, G>;
    LAUNCH(weight_kernel, dim3(ceil_div(C, COLUMN_CHANNELS)), dim3(COLUMN_THREADS), 0, stream, dweight, dbias, dout, inp,
           mean, rstd, N, C, stride);
}
#endif
