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

Storage: activations, their gradients and the weight are stored in T (float, double in the CPU's
finite-difference build, or bf16), the weight gradient in G (float, or bf16 in bf16-pure); rstd
stays real / float. Everything is computed in float (the CPU reference in real, its row sums in
double) from the values as stored, and rounded once where stored:
  - forward: out once per element; rstd is not rounded to T;
  - residual_rmsnorm_forward: the sum once per element, and then the statistics and the output are
    computed from the ROUNDED sum, read back as stored, so that they are exactly the norm of what
    the backward will read as its input (and the fused CPU version is still bitwise the residual
    add followed by rmsnorm_forward, for bf16 as for float);
  - backward: dinp and dweight accumulate as read, add in float, round once (dinp[i] =
    round(dinp[i] + value)); dweight's sum over rows is formed in float (double on the CPU) in a
    fixed order, so the result is deterministic.
*/
#pragma once

#include <cmath>

#include "../common.h"

// ---- CPU reference

// out (N, C), rstd (N) saved for backward, inp (N, C), weight (C)
template <typename T>
inline void rmsnorm_forward_cpu(T* out, real* rstd, const T* inp, const T* weight, int N, int C, float eps) {
    #pragma omp parallel for
    for (int i = 0; i < N; i++) {
        const T* x = inp + (size_t)i * C;
        T* y = out + (size_t)i * C;
        // mean of squares, accumulated in double so the reference is the accurate side
        double sum_squares = 0.0;
        for (int c = 0; c < C; c++) {
            real xc = to_real(x[c]);
            sum_squares += (double)xc * xc;
        }
        real r = (real)(1.0 / sqrt(sum_squares / C + eps));
        rstd[i] = r;
        // the output, rounded once to T
        for (int c = 0; c < C; c++) y[c] = from_real<T>(to_real(weight[c]) * (to_real(x[c]) * r));
    }
}

// sum (N, C) = x_scale * x + branch, out (N, C) = RMSNorm(sum), rstd (N) saved for backward;
// x (N, C), branch (N, C), weight (C). sum may alias x or branch (the model adds in place), not out.
// The same float operations in the same order as residual_forward_cpu (residual_scaled_forward_cpu
// when x_scale != 1; 1 * x + b is x + b exactly, contracted to an fma or not) followed by
// rmsnorm_forward_cpu, so the result is bitwise theirs (test_layers.cpp checks it for float,
// test_kernels_bf16_norms.cu for bf16): the sum is rounded to T as stored, and the norm reads it back.
template <typename T>
inline void residual_rmsnorm_forward_cpu(T* sum, T* out, real* rstd, const T* x, float x_scale, const T* branch,
                                         const T* weight, int N, int C, float eps) {
    #pragma omp parallel for
    for (int i = 0; i < N; i++) {
        const size_t row = (size_t)i * C;
        T* s = sum + row;
        T* y = out + row;
        double sum_squares = 0.0;
        for (int c = 0; c < C; c++) {
            // the sum, rounded to T where stored (x and branch read before s is written: in place is safe)
            s[c] = from_real<T>(x_scale * to_real(x[row + c]) + to_real(branch[row + c]));
            // its square as stored
            real sc = to_real(s[c]);
            sum_squares += (double)sc * sc;
        }
        real r = (real)(1.0 / sqrt(sum_squares / C + eps));
        rstd[i] = r;
        // the norm of the stored sum, rounded once to T
        for (int c = 0; c < C; c++) y[c] = from_real<T>(to_real(weight[c]) * (to_real(s[c]) * r));
    }
}

// dinp (N, C) +=, dweight (C) +=; dout (N, C), inp (N, C), weight (C), rstd (N) from forward
template <typename T, typename G>
inline void rmsnorm_backward_cpu(T* dinp, G* dweight, const T* dout, const T* inp, const T* weight, const real* rstd,
                                 int N, int C) {
    // input gradient: rows are independent
    #pragma omp parallel for
    for (int i = 0; i < N; i++) {
        const T* x = inp + (size_t)i * C;
        const T* dy = dout + (size_t)i * C;
        T* dx = dinp + (size_t)i * C;
        real r = rstd[i];
        // mean over the row of g * xhat, the part of the gradient along x itself
        double dot = 0.0;
        for (int c = 0; c < C; c++) dot += (double)(to_real(dy[c]) * to_real(weight[c])) * (to_real(x[c]) * r);
        real mean_dot = (real)(dot / C);
        // accumulate: read, add in real, round once
        for (int c = 0; c < C; c++) {
            real g = to_real(dy[c]) * to_real(weight[c]);
            dx[c] = from_real<T>(to_real(dx[c]) + r * (g - to_real(x[c]) * r * mean_dot));
        }
    }
    // weight gradient: a sum over rows, so parallelise over channels instead (rows in order)
    #pragma omp parallel for
    for (int c = 0; c < C; c++) {
        double sum = 0.0;
        for (int i = 0; i < N; i++)
            sum += (double)to_real(dout[(size_t)i * C + c]) * (to_real(inp[(size_t)i * C + c]) * rstd[i]);
        dweight[c] = from_real<G>(to_real(dweight[c]) + (real)sum);
    }
}

#if defined(__CUDACC__) || defined(MIXLN_CUDA_EMULATION)
#include "../cuda_common.h"

// ---- CUDA kernels

// One warp per row: lanes stride over the C channels, a shuffle reduction sums the squares.
// Rows past N belong to whole warps, which return together (no block barrier follows).
template <typename T>
static __global__ void rmsnorm_forward_kernel(T* out, float* rstd, const T* inp, const T* weight, int N, int C,
                                              float eps) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= N) return;
    const T* x = inp + (size_t)row * C;
    float sum_squares = 0.0f;
    for (int c = lane; c < C; c += 32) {
        float xc = to_float(x[c]);
        sum_squares += xc * xc;
    }
    sum_squares = warp_reduce_sum(sum_squares);
    float r = 1.0f / sqrtf(sum_squares / C + eps);
    if (lane == 0) rstd[row] = r;
    for (int c = lane; c < C; c += 32)
        out[(size_t)row * C + c] = from_float<T>(to_float(weight[c]) * (to_float(x[c]) * r));
}

// One warp per row, as above: each lane forms the sums of its strided channels, rounds and writes
// them and sums the squares of the rounded values; after the reduction it reads back the very
// elements it wrote (no other lane touches them, so no barrier is needed; likely still in cache).
// In place is safe for the same reason: each element of x or branch is read by the one thread
// that then overwrites it.
template <typename T>
static __global__ void residual_rmsnorm_forward_kernel(T* sum, T* out, float* rstd, const T* x, float x_scale,
                                                       const T* branch, const T* weight, int N, int C, float eps) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= N) return;
    const size_t offset = (size_t)row * C;
    float sum_squares = 0.0f;
    for (int c = lane; c < C; c += 32) {
        T stored = from_float<T>(x_scale * to_float(x[offset + c]) + to_float(branch[offset + c]));
        sum[offset + c] = stored;
        float s = to_float(stored);
        sum_squares += s * s;
    }
    sum_squares = warp_reduce_sum(sum_squares);
    float r = 1.0f / sqrtf(sum_squares / C + eps);
    if (lane == 0) rstd[row] = r;
    for (int c = lane; c < C; c += 32)
        out[offset + c] = from_float<T>(to_float(weight[c]) * (to_float(sum[offset + c]) * r));
}

// input gradient, one warp per row; dinp accumulates: read, add in float, round once.
// Each lane takes its channels lane, lane + 32, ... in chunks of RMSNORM_CHUNK, issuing all of a
// chunk's loads before using any (__restrict__ lets the compiler keep them ahead of the stores):
// on an H200 the plain one-channel-at-a-time loop waited out each load's latency in turn and moved
// its 64 MB (LLaMA-71M, B 64, T 256) at 0.2 TB/s (dev/PERF.md). The sums run over the same
// channels in the same order as before, so the result is the same to the bit.
constexpr int RMSNORM_CHUNK = 8;   // channels per lane per chunk
template <typename T>
static __global__ void rmsnorm_backward_input_kernel(T* __restrict__ dinp, const T* __restrict__ dout,
                                                     const T* __restrict__ inp, const T* __restrict__ weight,
                                                     const float* __restrict__ rstd, int N, int C) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= N) return;
    const T* x = inp + (size_t)row * C;
    const T* dy = dout + (size_t)row * C;
    T* dx = dinp + (size_t)row * C;
    float r = rstd[row];
    // mean over the channels of g * xhat, g = dout * w
    float dot = 0.0f;
    for (int c0 = lane; c0 < C; c0 += 32 * RMSNORM_CHUNK) {
        float g[RMSNORM_CHUNK], xs[RMSNORM_CHUNK];
        KERNEL_UNROLL
        for (int u = 0; u < RMSNORM_CHUNK; u++) {
            int c = c0 + 32 * u;
            g[u] = c < C ? to_float(dy[c]) * to_float(weight[c]) : 0.0f;
            xs[u] = c < C ? to_float(x[c]) : 0.0f;
        }
        KERNEL_UNROLL
        for (int u = 0; u < RMSNORM_CHUNK; u++)
            if (c0 + 32 * u < C) dot += g[u] * (xs[u] * r);
    }
    float mean_dot = warp_reduce_sum(dot) / C;
    // dinp += rstd * (g - xhat * mean_dot)
    for (int c0 = lane; c0 < C; c0 += 32 * RMSNORM_CHUNK) {
        float g[RMSNORM_CHUNK], xs[RMSNORM_CHUNK], old[RMSNORM_CHUNK];
        KERNEL_UNROLL
        for (int u = 0; u < RMSNORM_CHUNK; u++) {
            int c = c0 + 32 * u;
            g[u] = c < C ? to_float(dy[c]) * to_float(weight[c]) : 0.0f;
            xs[u] = c < C ? to_float(x[c]) : 0.0f;
            old[u] = c < C ? to_float(dx[c]) : 0.0f;
        }
        KERNEL_UNROLL
        for (int u = 0; u < RMSNORM_CHUNK; u++) {
            int c = c0 + 32 * u;
            if (c < C) dx[c] = from_float<T>(old[u] + r * (g[u] - xs[u] * r * mean_dot));
        }
    }
}

// weight gradient: a block per 16 channels, 64 row groups each summing its rows in order, then
// the groups' sums added in order (column_reduce in cuda_common.h: deterministic) and the total
// accumulated into dweight
template <typename T, typename G>
static __global__ void __launch_bounds__(COLUMN_THREADS)
    rmsnorm_backward_weight_kernel(G* dweight, const T* dout, const T* inp, const float* rstd, int N, int C) {
    __shared__ float partials[COLUMN_THREADS];
    int c = blockIdx.x * COLUMN_CHANNELS + threadIdx.x % COLUMN_CHANNELS, group = threadIdx.x / COLUMN_CHANNELS;
    float sum = 0.0f;
    if (c < C)
        for (int i = group; i < N; i += COLUMN_ROW_GROUPS)
            sum += to_float(dout[(size_t)i * C + c]) * (to_float(inp[(size_t)i * C + c]) * rstd[i]);
    sum = column_reduce(sum, partials);
    if (group == 0 && c < C) dweight[c] = from_float<G>(to_float(dweight[c]) + sum);
}

// ---- launchers

template <typename T>
inline void rmsnorm_forward(T* out, float* rstd, const T* inp, const T* weight, int N, int C, float eps,
                            cudaStream_t stream) {
    const int block = 256;   // 8 rows per block
    LAUNCH(rmsnorm_forward_kernel<T>, dim3(ceil_div(N, block / 32)), dim3(block), 0, stream, out, rstd, inp, weight, N, C,
           eps);
}

template <typename T>
inline void residual_rmsnorm_forward(T* sum, T* out, float* rstd, const T* x, float x_scale, const T* branch,
                                     const T* weight, int N, int C, float eps, cudaStream_t stream) {
    const int block = 256;   // 8 rows per block
    LAUNCH(residual_rmsnorm_forward_kernel<T>, dim3(ceil_div(N, block / 32)), dim3(block), 0, stream, sum, out, rstd, x,
           x_scale, branch, weight, N, C, eps);
}

template <typename T, typename G>
inline void rmsnorm_backward(T* dinp, G* dweight, const T* dout, const T* inp, const T* weight, const float* rstd, int N,
                             int C, cudaStream_t stream) {
    const int block = 256;
    LAUNCH(rmsnorm_backward_input_kernel<T>, dim3(ceil_div(N, block / 32)), dim3(block), 0, stream, dinp, dout, inp,
           weight, rstd, N, C);
    auto weight_kernel = rmsnorm_backward_weight_kernel<T, G>;
    LAUNCH(weight_kernel, dim3(ceil_div(C, COLUMN_CHANNELS)), dim3(COLUMN_THREADS), 0, stream, dweight, dout, inp, rstd,
           N, C);
}
#endif
