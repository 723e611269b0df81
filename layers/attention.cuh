/*
Causal multi-head self-attention on the (already rotated) queries and keys:
    att = softmax(q k^T / sqrt(hs)) with position t seeing positions 0..t,   y = att v
qkv (B, T, 3C) holds [q | k | v] per position; head h uses columns h*hs .. (h+1)*hs of each.
The softmax probabilities are kept for backward; entries above the diagonal are stored as 0.

Backward, per row t of head h (dpre is the gradient of the pre-softmax scores):
    dv[t2]   += att[t2] * dy                    for t2 <= t
    datt[t2]  = v[t2] . dy
    dpre[t2]  = att[t2] * (datt[t2] - sum_j att[j] * datt[j])
    dq       += sum_t2 dpre[t2] * k[t2] / sqrt(hs),   dk[t2] += dpre[t2] * q / sqrt(hs)
The CPU reference works head by head: all rows of one (b, h) pair write only that head's
slices of dk and dv, so (b, h) pairs run in parallel without races.
*/
#pragma once

#include <cmath>

#include "../common.h"

// ---- CPU reference

// out (B, T, C) attention output before o_proj; att (B, NH, T, T) softmax probabilities;
// qkv (B, T, 3C)
inline void attention_forward_cpu(real* out, real* att, const real* qkv, int B, int T, int NH, int head_size) {
    int C = NH * head_size;
    real scale = 1 / sqrt((real)head_size);
    #pragma omp parallel for collapse(3)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < NH; h++) {
            for (int t = 0; t < T; t++) {
                const real* q = qkv + ((size_t)b * T + t) * 3 * C + (size_t)h * head_size;
                real* att_row = att + (((size_t)b * NH + h) * T + t) * T;
                // scaled scores against keys 0..t, and their maximum for a stable softmax
                real max_score = -INFINITY;
                for (int t2 = 0; t2 <= t; t2++) {
                    const real* k = qkv + ((size_t)b * T + t2) * 3 * C + C + (size_t)h * head_size;
                    real score = 0;
                    #pragma omp simd reduction(+ : score)
                    for (int i = 0; i < head_size; i++) score += q[i] * k[i];
                    score *= scale;
                    att_row[t2] = score;
                    if (score > max_score) max_score = score;
                }
                // softmax over 0..t; the masked future gets probability 0
                real sum = 0;
                for (int t2 = 0; t2 <= t; t2++) {
                    att_row[t2] = std::exp(att_row[t2] - max_score);
                    sum += att_row[t2];
                }
                for (int t2 = 0; t2 <= t; t2++) att_row[t2] /= sum;
                for (int t2 = t + 1; t2 < T; t2++) att_row[t2] = 0;
                // weighted sum of the values
                real* y = out + ((size_t)b * T + t) * C + (size_t)h * head_size;
                for (int i = 0; i < head_size; i++) y[i] = 0;
                for (int t2 = 0; t2 <= t; t2++) {
                    const real* v = qkv + ((size_t)b * T + t2) * 3 * C + 2 * C + (size_t)h * head_size;
                    #pragma omp simd
                    for (int i = 0; i < head_size; i++) y[i] += att_row[t2] * v[i];
                }
            }
        }
    }
}

// dqkv (B, T, 3C) +=; scratch (B, NH, T, T) workspace (the CPU uses one row of it per (b, h),
// the CUDA version all of it); dout (B, T, C); qkv (B, T, 3C) and att (B, NH, T, T) from forward
inline void attention_backward_cpu(real* dqkv, real* scratch, const real* dout, const real* qkv,
                            const real* att, int B, int T, int NH, int head_size) {
    int C = NH * head_size;
    real scale = 1 / sqrt((real)head_size);
    #pragma omp parallel for collapse(2)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < NH; h++) {
            real* datt = scratch + ((size_t)b * NH + h) * T * T;   // (T) one row at a time
            for (int t = 0; t < T; t++) {
                const real* att_row = att + (((size_t)b * NH + h) * T + t) * T;
                const real* dy = dout + ((size_t)b * T + t) * C + (size_t)h * head_size;
                const real* q = qkv + ((size_t)b * T + t) * 3 * C + (size_t)h * head_size;
                real* dq = dqkv + ((size_t)b * T + t) * 3 * C + (size_t)h * head_size;
                // through y = att v: gradients of the probabilities and of the values
                real weighted = 0;   // sum_j att[j] * datt[j]
                for (int t2 = 0; t2 <= t; t2++) {
                    const real* v = qkv + ((size_t)b * T + t2) * 3 * C + 2 * C + (size_t)h * head_size;
                    real* dv = dqkv + ((size_t)b * T + t2) * 3 * C + 2 * C + (size_t)h * head_size;
                    real d = 0;
                    #pragma omp simd reduction(+ : d)
                    for (int i = 0; i < head_size; i++) {
                        d += v[i] * dy[i];
                        dv[i] += att_row[t2] * dy[i];
                    }
                    datt[t2] = d;
                    weighted += att_row[t2] * d;
                }
                // through the softmax, then the scaled dot products q . k
                for (int t2 = 0; t2 <= t; t2++) {
                    real dscore = att_row[t2] * (datt[t2] - weighted) * scale;
                    const real* k = qkv + ((size_t)b * T + t2) * 3 * C + C + (size_t)h * head_size;
                    real* dk = dqkv + ((size_t)b * T + t2) * 3 * C + C + (size_t)h * head_size;
                    #pragma omp simd
                    for (int i = 0; i < head_size; i++) {
                        dq[i] += dscore * k[i];
                        dk[i] += dscore * q[i];
                    }
                }
            }
        }
    }
}

#if defined(__CUDACC__) || defined(MIXLN_CUDA_EMULATION)
#include "../cuda_common.h"

// ---- CUDA kernels
// The simple, correct version: one warp per row (b, h, t) of the attention matrix, the
// probabilities materialised in att (B, NH, T, T) as on the CPU. A fused (flash-style) version
// that never stores att is the target for speed and will sit beside this one.

static __global__ void attention_forward_kernel(float* out, float* att, const float* qkv, int B, int T, int NH, int head_size) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;   // (b, h, t) flattened
    int lane = threadIdx.x % 32;
    if (row >= B * NH * T) return;   // whole warps
    int t = row % T, h = (row / T) % NH, b = row / (T * NH);
    int C = NH * head_size;
    float scale = 1.0f / sqrtf((float)head_size);
    const float* q = qkv + ((size_t)b * T + t) * 3 * C + (size_t)h * head_size;
    float* att_row = att + (size_t)row * T;
    // scaled scores against keys 0..t, lanes striding over the keys
    float max_score = -INFINITY;
    for (int t2 = lane; t2 <= t; t2 += 32) {
        const float* k = qkv + ((size_t)b * T + t2) * 3 * C + C + (size_t)h * head_size;
        float score = 0.0f;
        for (int i = 0; i < head_size; i++) score += q[i] * k[i];
        score *= scale;
        att_row[t2] = score;
        max_score = fmaxf(max_score, score);
    }
    max_score = warp_reduce_max(max_score);
    float sum = 0.0f;
    for (int t2 = lane; t2 <= t; t2 += 32) {
        float e = expf(att_row[t2] - max_score);
        att_row[t2] = e;
        sum += e;
    }
    sum = warp_reduce_sum(sum);
    for (int t2 = lane; t2 < T; t2 += 32) att_row[t2] = t2 <= t ? att_row[t2] / sum : 0.0f;
    __syncwarp();   // every lane reads all of att_row below
    // y = att v, lanes striding over the head's channels
    for (int i = lane; i < head_size; i += 32) {
        float y = 0.0f;
        for (int t2 = 0; t2 <= t; t2++) y += att_row[t2] * qkv[((size_t)b * T + t2) * 3 * C + 2 * C + (size_t)h * head_size + i];
        out[((size_t)b * T + t) * C + (size_t)h * head_size + i] = y;
    }
}

// Backward, pass 1, one warp per row (b, h, t): the gradient of the pre-softmax scores of the
// row goes to dpre (B, NH, T, T), and dq of position t is complete.
static __global__ void attention_backward_query_kernel(float* dqkv, float* dpre, const float* dout, const float* qkv,
                                                const float* att, int B, int T, int NH, int head_size) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= B * NH * T) return;
    int t = row % T, h = (row / T) % NH, b = row / (T * NH);
    int C = NH * head_size;
    float scale = 1.0f / sqrtf((float)head_size);
    const float* att_row = att + (size_t)row * T;
    const float* dy = dout + ((size_t)b * T + t) * C + (size_t)h * head_size;
    float* dpre_row = dpre + (size_t)row * T;
    // datt[t2] = v[t2] . dy, kept in dpre_row for now; weighted = sum_j att[j] * datt[j]
    float weighted = 0.0f;
    for (int t2 = lane; t2 <= t; t2 += 32) {
        const float* v = qkv + ((size_t)b * T + t2) * 3 * C + 2 * C + (size_t)h * head_size;
        float d = 0.0f;
        for (int i = 0; i < head_size; i++) d += v[i] * dy[i];
        dpre_row[t2] = d;
        weighted += att_row[t2] * d;
    }
    weighted = warp_reduce_sum(weighted);
    for (int t2 = lane; t2 < T; t2 += 32) dpre_row[t2] = t2 <= t ? att_row[t2] * (dpre_row[t2] - weighted) * scale : 0.0f;
    __syncwarp();   // every lane reads all of dpre_row below
    for (int i = lane; i < head_size; i += 32) {
        float dq = 0.0f;
        for (int t2 = 0; t2 <= t; t2++) dq += dpre_row[t2] * qkv[((size_t)b * T + t2) * 3 * C + C + (size_t)h * head_size + i];
        dqkv[((size_t)b * T + t) * 3 * C + (size_t)h * head_size + i] += dq;
    }
}

// Backward, pass 2, one warp per key position (b, h, t2): dk and dv sum over the queries t >= t2
// in order, so no atomics are needed and the result is deterministic.
static __global__ void attention_backward_key_value_kernel(float* dqkv, const float* dpre, const float* dout, const float* qkv,
                                                    const float* att, int B, int T, int NH, int head_size) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= B * NH * T) return;
    int t2 = row % T, h = (row / T) % NH, b = row / (T * NH);
    int C = NH * head_size;
    size_t head_rows = ((size_t)b * NH + h) * T;   // first row of this (b, h) in att and dpre
    for (int i = lane; i < head_size; i += 32) {
        float dk = 0.0f, dv = 0.0f;
        for (int t = t2; t < T; t++) {
            dk += dpre[(head_rows + t) * T + t2] * qkv[((size_t)b * T + t) * 3 * C + (size_t)h * head_size + i];
            dv += att[(head_rows + t) * T + t2] * dout[((size_t)b * T + t) * C + (size_t)h * head_size + i];
        }
        dqkv[((size_t)b * T + t2) * 3 * C + C + (size_t)h * head_size + i] += dk;
        dqkv[((size_t)b * T + t2) * 3 * C + 2 * C + (size_t)h * head_size + i] += dv;
    }
}

// ---- launchers

inline void attention_forward(float* out, float* att, const float* qkv, int B, int T, int NH, int head_size,
                              cudaStream_t stream) {
    const int block = 256;   // 8 rows per block
    LAUNCH(attention_forward_kernel, dim3(ceil_div(B * NH * T, block / 32)), dim3(block), 0, stream, out, att, qkv, B, T,
           NH, head_size);
}

// scratch: (B, NH, T, T), the gradient of the pre-softmax scores
inline void attention_backward(float* dqkv, float* scratch, const float* dout, const float* qkv, const float* att,
                               int B, int T, int NH, int head_size, cudaStream_t stream) {
    const int block = 256;
    dim3 grid(ceil_div(B * NH * T, block / 32));
    LAUNCH(attention_backward_query_kernel, grid, dim3(block), 0, stream, dqkv, scratch, dout, qkv, att, B, T, NH, head_size);
    LAUNCH(attention_backward_key_value_kernel, grid, dim3(block), 0, stream, dqkv, scratch, dout, qkv, att, B, T, NH,
           head_size);
}
#endif
