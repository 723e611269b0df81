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

// dqkv (B, T, 3C) +=; scratch (B, NH, T) workspace; dout (B, T, C); qkv (B, T, 3C) and
// att (B, NH, T, T) from forward
inline void attention_backward_cpu(real* dqkv, real* scratch, const real* dout, const real* qkv,
                            const real* att, int B, int T, int NH, int head_size) {
    int C = NH * head_size;
    real scale = 1 / sqrt((real)head_size);
    #pragma omp parallel for collapse(2)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < NH; h++) {
            real* datt = scratch + ((size_t)b * NH + h) * T;   // (T) one row at a time
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
