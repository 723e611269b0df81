/*
RMSNorm: y = w * x / sqrt(mean(x^2) + eps), one row of C values at a time (no mean subtraction,
no bias, as in LLaMA).

Every decoder layer owns two of these and a final one sits before the LM head. Pre-LN layers
normalise the residual stream before each sublayer; Post-LN layers normalise the sum after the
residual add. The kernels are the same either way: model.h decides where they are called.

Fused with the residual add: residual_rmsnorm_forward computes sum = x_scale * x + branch and
out = RMSNorm(sum) in one pass over each row, instead of residual_forward writing the sum and
rmsnorm_forward reading it back. Almost every residual add in the model is followed by a norm of
the sum, in one of two shapes (model_forward):
  - norm after the residual add (post, deepnorm): s = a*x + F(x), y = N(s). The norm's output y
    is the new stream; the sum s is kept only as the norm's input for backward.
  - norm on the branch (pre, lns, peri): h = x + F(...), then N(h) feeds the next sublayer (the
    MLP's N2, or after the MLP's add the next layer's N1 or the final norm). Here the sum h is
    the stream and the norm's output only the next sublayer's input.
Both shapes write the same two things (the sum and the normalised sum), so one function serves
both; they differ only in which of the two the model carries on with. There is no fused
backward: the norm's backward reads the saved sum and accumulates into the stream's gradient,
which is all the residual add's backward would be (see residual.cuh).

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

// sum (N, C) = x_scale * x + branch, out (N, C) = RMSNorm(sum), rstd (N) saved for backward;
// x (N, C), branch (N, C), weight (C). sum may alias x or branch (the model adds in place), not out.
// The same float operations in the same order as residual_forward_cpu (residual_scaled_forward_cpu
// when x_scale != 1; 1 * x + b is x + b exactly, contracted to an fma or not) followed by
// rmsnorm_forward_cpu, so the result is bitwise theirs (test_layers.cpp checks it).
inline void residual_rmsnorm_forward_cpu(real* sum, real* out, real* rstd, const real* x, float x_scale,
                                         const real* branch, const real* weight, int N, int C, float eps) {
    #pragma omp parallel for
    for (int i = 0; i < N; i++) {
        const size_t row = (size_t)i * C;
        real* s = sum + row;
        real* y = out + row;
        double sum_squares = 0.0;
        for (int c = 0; c < C; c++) {
            s[c] = x_scale * x[row + c] + branch[row + c];   // read before written: in place is safe
            sum_squares += (double)s[c] * s[c];
        }
        real r = (real)(1.0 / sqrt(sum_squares / C + eps));
        rstd[i] = r;
        for (int c = 0; c < C; c++) y[c] = weight[c] * (s[c] * r);
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

// One warp per row, as above: each lane forms the sums of its strided channels, writes them and
// sums their squares; after the reduction it reads back the very elements it wrote (no other lane
// touches them, so no barrier is needed; likely still in cache). In place is safe for the same
// reason: each element of x or branch is read by the one thread that then overwrites it.
static __global__ void residual_rmsnorm_forward_kernel(float* sum, float* out, float* rstd, const float* x,
                                                       float x_scale, const float* branch, const float* weight,
                                                       int N, int C, float eps) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= N) return;
    const size_t offset = (size_t)row * C;
    float sum_squares = 0.0f;
    for (int c = lane; c < C; c += 32) {
        float s = x_scale * x[offset + c] + branch[offset + c];
        sum[offset + c] = s;
        sum_squares += s * s;
    }
    sum_squares = warp_reduce_sum(sum_squares);
    float r = 1.0f / sqrtf(sum_squares / C + eps);
    if (lane == 0) rstd[row] = r;
    for (int c = lane; c < C; c += 32) out[offset + c] = weight[c] * (sum[offset + c] * r);
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

inline void residual_rmsnorm_forward(float* sum, float* out, float* rstd, const float* x, float x_scale,
                                     const float* branch, const float* weight, int N, int C, float eps,
                                     cudaStream_t stream) {
    const int block = 256;   // 8 rows per block
    LAUNCH(residual_rmsnorm_forward_kernel, dim3(ceil_div(N, block / 32)), dim3(block), 0, stream, sum, out, rstd, x,
           x_scale, branch, weight, N, C, eps);
}

inline void rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp, const float* weight,
                             const float* rstd, int N, int C, cudaStream_t stream) {
    const int block = 256;
    LAUNCH(rmsnorm_backward_input_kernel, dim3(ceil_div(N, block / 32)), dim3(block), 0, stream, dinp, dout, inp, weight,
           rstd, N, C);
    LAUNCH(rmsnorm_backward_weight_kernel, dim3(ceil_div(C, block)), dim3(block), 0, stream, dweight, dout, inp, rstd, N, C);
}
#endif
