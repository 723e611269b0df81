/*
Causal multi-head self-attention on queries and keys rotated by RoPE (layers/rope.cuh; beforehand,
except in the tensor-core kernels at the end of this file, which rotate them as they load them):
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

Storage type. qkv, out, dout and dqkv are stored in a type floatX: float (double in the CPU
reference of the finite-difference build) or bf16. (The other layers call it T; here T is the
sequence length.) The probabilities att are fp32 whatever floatX is (`real` on the CPU, float on
the GPU), like the scores, softmax sums, gradients and the backward's scratch: the PyTorch
reference's bf16 emulation (dev/reference.py) keeps the softmax in fp32 and rounds only y.
Values are converted on load and rounded once where they are stored in floatX.
Rounding points of the simple attention (the kernels and the CPU reference alike):
  - att: not rounded. Each probability exp(score - max) / sum is computed in float and stored in
    float (the CPU stages a row of scores in a real buffer, the kernels in the float att row).
  - out: y = att v from the float probabilities, rounded once where it is stored.
  - dqkv: backward reads the float att (so dv = att^T dy and datt are the gradients of the y
    computed before its rounding); the gradients of a head are summed in float over all rows and
    written to dqkv once: dqkv = round(total). Backward WRITES dqkv (=, not += as most backward
    functions here): the gradient of the attention's own qkv activation has this one producer,
    so accumulating would only mean zeroing (B, T, 3C) first and reading the zeros back.
The fused attention (below) rounds at the same points (y once from the float probabilities, dqkv
once per element), so in bf16 the two agree to within one bf16 step of y and of dv, up to float
summation order. dq and dk differ by that step plus the one other difference: the fused
backward's D = rowsum(dy * y) is taken from y as stored (rounded), where the simple one sums
att * datt in float (see the fused section's comment for the size of that).
*/
#pragma once

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "rope.cuh"

// ---- CPU reference
//
// Both passes work on one (b, h) head at a time, and their sums over keys and channels run a
// block of ATTN_CPU_BLOCK outputs at once: the block's partial sums stay in one vector register
// (16 floats under AVX-512) for the whole sum and are stored once. (A plain loop, scores[t2] +=
// q[i] k[t2][i] for each i, or y[i] += p v[t2][i] for each t2, reads back and stores the same
// sums at every term: each term then waits for the store of the one before.) So the head's keys
// and values are first copied into per-thread tables laid out for the block's loads: transposed,
// (hs, T) (a channel's values for consecutive keys side by side), or per key, (T, hs); both padded
// with zeros to whole blocks, whose extra sums are never used. The backward pass takes dq row by
// row, as the forward takes the scores, then dk and dv column by column from the score gradients
// (kept for the whole head in the scratch) and the probabilities: each of the four is then a sum
// in registers. Every sum still runs over its terms in order. dev/bench_cpu_kernels.cpp times the
// two passes (dev/PERF.md).
constexpr int ATTN_CPU_BLOCK = 16;

inline int attn_cpu_padded(int n) { return (n + ATTN_CPU_BLOCK - 1) / ATTN_CPU_BLOCK * ATTN_CPU_BLOCK; }

// out[c] = sum over r < rows, in order, of weights[r * weight_stride] * table[r][c], for c < cols;
// table (rows, width), width a whole number of blocks. Every sum of the two passes is one of these:
// the scores (weights q, table the keys transposed), y (the probabilities, the values), datt (dy,
// the values transposed), dq (the score gradients, the keys), and dv and dk (a column of the
// probabilities or of the score gradients, the output gradients or the queries).
// Up to four blocks are summed side by side: four independent chains of vector FMAs, where one
// block alone waits out each FMA's latency before the next row's. Not inlined: inside the passes'
// large loops gcc kept the sums on the stack, loaded and stored around every FMA.
template <int BLOCKS>
__attribute__((noinline)) void attn_cpu_weighted_blocks(real* out, const real* weights, const real* table, int rows, int cols, int width,
                                     size_t weight_stride) {
    real sums[BLOCKS * ATTN_CPU_BLOCK] = {};   // BLOCKS vector registers
    for (int r = 0; r < rows; r++) {
        const real* row = &table[(size_t)r * width];
        real weight = weights[(size_t)r * weight_stride];
        #pragma omp simd
        for (int j = 0; j < BLOCKS * ATTN_CPU_BLOCK; j++) sums[j] += weight * row[j];
    }
    for (int j = 0; j < BLOCKS * ATTN_CPU_BLOCK && j < cols; j++) out[j] = sums[j];
}

inline void attn_cpu_weighted_rows(real* out, const real* weights, const real* table, int rows, int cols, int width,
                                   size_t weight_stride = 1) {
    int c0 = 0;
    for (; cols - c0 > 3 * ATTN_CPU_BLOCK; c0 += 4 * ATTN_CPU_BLOCK) {
        attn_cpu_weighted_blocks<4>(out + c0, weights, table + c0, rows, cols - c0, width, weight_stride);
    }
    int blocks_left = (cols - c0 + ATTN_CPU_BLOCK - 1) / ATTN_CPU_BLOCK;
    if (blocks_left == 3) attn_cpu_weighted_blocks<3>(out + c0, weights, table + c0, rows, cols - c0, width, weight_stride);
    if (blocks_left == 2) attn_cpu_weighted_blocks<2>(out + c0, weights, table + c0, rows, cols - c0, width, weight_stride);
    if (blocks_left == 1) attn_cpu_weighted_blocks<1>(out + c0, weights, table + c0, rows, cols - c0, width, weight_stride);
}

// table (n_pad, m_pad) zero-padded from rows of the head: table[r][c] = x[c][r] (transposed,
// rows r < m: channels, columns c < n: positions) or table[r][c] = x[r][c] (rows: positions);
// x's position p, channel i is src[p * row_stride + i]
template <typename floatX>
inline void attn_cpu_table(real* table, const floatX* src, size_t row_stride, int positions, int channels, bool transposed) {
    int width = transposed ? attn_cpu_padded(positions) : attn_cpu_padded(channels);
    int rows = transposed ? channels : positions;
    std::fill(table, table + (size_t)rows * width, (real)0);
    if (!transposed) {
        for (int p = 0; p < positions; p++) {
            for (int i = 0; i < channels; i++) table[(size_t)p * width + i] = to_real(src[p * row_stride + i]);
        }
        return;
    }
    // transposed a block of positions at a time: the block's rows of x are read once, and each
    // channel's values for the block are written side by side (one cache line), rather than every
    // value to a line of its own
    for (int p0 = 0; p0 < positions; p0 += ATTN_CPU_BLOCK) {
        int p_end = std::min(positions, p0 + ATTN_CPU_BLOCK);
        for (int i = 0; i < channels; i++) {
            for (int p = p0; p < p_end; p++) table[(size_t)i * width + p] = to_real(src[p * row_stride + i]);
        }
    }
}

// out (B, T, C) attention output before o_proj; att (B, NH, T, T) softmax probabilities (real
// whatever floatX is); qkv (B, T, 3C)
template <typename floatX>
inline void attention_forward_cpu(floatX* out, real* att, const floatX* qkv, int B, int T, int NH, int head_size) {
    const int C = NH * head_size;
    const int T_pad = attn_cpu_padded(T), hs_pad = attn_cpu_padded(head_size);
    real scale = 1 / sqrt((real)head_size);
    #pragma omp parallel
    {
        // per thread: the head's keys transposed (hs, T_pad), its values (T, hs_pad), one query, one output
        std::vector<real> keys_t((size_t)head_size * T_pad), values((size_t)T * hs_pad), q(head_size), y(head_size);
        #pragma omp for collapse(2)
        for (int b = 0; b < B; b++) {
            for (int h = 0; h < NH; h++) {
                const floatX* head = qkv + (size_t)b * T * 3 * C + (size_t)h * head_size;   // q of position 0
                attn_cpu_table(keys_t.data(), head + C, 3 * (size_t)C, T, head_size, true);
                attn_cpu_table(values.data(), head + 2 * C, 3 * (size_t)C, T, head_size, false);
                for (int t = 0; t < T; t++) {
                    for (int i = 0; i < head_size; i++) q[i] = to_real(head[(size_t)t * 3 * C + i]);
                    real* att_row = att + (((size_t)b * NH + h) * T + t) * T;   // the scores, then the probabilities
                    // scaled scores q . k against keys 0..t, and their maximum for a stable softmax
                    attn_cpu_weighted_rows(att_row, q.data(), keys_t.data(), head_size, t + 1, T_pad);
                    real max_score = -INFINITY;
                    #pragma omp simd reduction(max : max_score)
                    for (int t2 = 0; t2 <= t; t2++) {
                        att_row[t2] *= scale;
                        max_score = att_row[t2] > max_score ? att_row[t2] : max_score;
                    }
                    // softmax over 0..t in place (the exponentials, then their sum in order); the
                    // masked future gets probability 0
                    for (int t2 = 0; t2 <= t; t2++) att_row[t2] = exp_cpu(att_row[t2] - max_score);
                    real sum = 0;
                    for (int t2 = 0; t2 <= t; t2++) sum += att_row[t2];
                    for (int t2 = 0; t2 <= t; t2++) att_row[t2] = att_row[t2] / sum;
                    for (int t2 = t + 1; t2 < T; t2++) att_row[t2] = 0;
                    // weighted sum of the values, rounded once into out
                    attn_cpu_weighted_rows(y.data(), att_row, values.data(), t + 1, head_size, hs_pad);
                    floatX* out_row = out + ((size_t)b * T + t) * C + (size_t)h * head_size;
                    for (int i = 0; i < head_size; i++) out_row[i] = from_real<floatX>(y[i]);
                }
            }
        }
    }
}

// dqkv (B, T, 3C) written; scratch (B, NH, T, T) workspace (each (b, h) its own (T, T) block: the
// score gradients); dout (B, T, C); qkv (B, T, 3C) and att (B, NH, T, T, real) from forward
template <typename floatX>
inline void attention_backward_cpu(floatX* dqkv, real* scratch, const floatX* dout, const floatX* qkv,
                                   const real* att, int B, int T, int NH, int head_size) {
    const int C = NH * head_size;
    const int T_pad = attn_cpu_padded(T), hs_pad = attn_cpu_padded(head_size);
    real scale = 1 / sqrt((real)head_size);
    #pragma omp parallel
    {
        // per thread: the head's gradients (T, 3, hs), [dq | dk | dv] per position, each written
        // once and copied to dqkv at the end of the head; its values transposed (hs, T_pad), and
        // keys, queries and output gradients (T, hs_pad)
        std::vector<real> grad((size_t)T * 3 * head_size), values_t((size_t)head_size * T_pad),
            keys((size_t)T * hs_pad), queries((size_t)T * hs_pad), dys((size_t)T * hs_pad);
        #pragma omp for collapse(2)
        for (int b = 0; b < B; b++) {
            for (int h = 0; h < NH; h++) {
                real* dscores = scratch + ((size_t)b * NH + h) * T * T;   // (T, T): row t, keys t2 <= t
                const real* att_head = att + ((size_t)b * NH + h) * T * T;
                const floatX* head = qkv + (size_t)b * T * 3 * C + (size_t)h * head_size;   // q of position 0
                attn_cpu_table(values_t.data(), head + 2 * C, 3 * (size_t)C, T, head_size, true);
                attn_cpu_table(keys.data(), head + C, 3 * (size_t)C, T, head_size, false);
                attn_cpu_table(queries.data(), head, 3 * (size_t)C, T, head_size, false);
                attn_cpu_table(dys.data(), dout + (size_t)b * T * C + (size_t)h * head_size, (size_t)C, T, head_size,
                               false);
                // row by row: the gradients of the scores, and through them dq
                for (int t = 0; t < T; t++) {
                    const real* att_row = att_head + (size_t)t * T;
                    real* dscore = dscores + (size_t)t * T;
                    // through y = att v: the gradients of the probabilities, datt[t2] = v[t2] . dy
                    // (kept in dscore's row)
                    attn_cpu_weighted_rows(dscore, &dys[(size_t)t * hs_pad], values_t.data(), head_size, t + 1, T_pad);
                    // through the softmax: dscore = att (datt - sum_j att[j] datt[j]) * scale
                    real weighted = 0;
                    for (int t2 = 0; t2 <= t; t2++) weighted += att_row[t2] * dscore[t2];
                    for (int t2 = 0; t2 <= t; t2++) dscore[t2] = att_row[t2] * (dscore[t2] - weighted) * scale;
                    // then the dot products q . k: dq = sum_t2 dscore[t2] k[t2]
                    attn_cpu_weighted_rows(grad.data() + (size_t)t * 3 * head_size, dscore, keys.data(), t + 1,
                                           head_size, hs_pad);
                }
                // column by column: dk[t2] = sum over t >= t2 of dscore[t][t2] q[t], and
                // dv[t2] = sum over t >= t2 of att[t][t2] dy[t]
                for (int t2 = 0; t2 < T; t2++) {
                    real* dk = grad.data() + ((size_t)t2 * 3 + 1) * head_size;
                    real* dv = grad.data() + ((size_t)t2 * 3 + 2) * head_size;
                    attn_cpu_weighted_rows(dk, dscores + (size_t)t2 * T + t2, &queries[(size_t)t2 * hs_pad], T - t2,
                                           head_size, hs_pad, T);
                    attn_cpu_weighted_rows(dv, att_head + (size_t)t2 * T + t2, &dys[(size_t)t2 * hs_pad], T - t2,
                                           head_size, hs_pad, T);
                }
                // the head's totals into dqkv, one rounding each
                for (int t = 0; t < T; t++) {
                    for (int part = 0; part < 3; part++) {
                        floatX* d = dqkv + ((size_t)b * T + t) * 3 * C + (size_t)part * C + (size_t)h * head_size;
                        const real* g = grad.data() + ((size_t)t * 3 + part) * head_size;
                        for (int i = 0; i < head_size; i++) d[i] = from_real<floatX>(g[i]);
                    }
                }
            }
        }
    }
}

/*
The tensor-core attention's softmax works in base 2, as FlashAttention does: a score x becomes
x log2(e) at once (the scale 1/sqrt(hs) and log2(e) in one factor) and exp(x - m) becomes
2^(x log2(e) - m log2(e)). On a GPU 2^x is one instruction, ex2.approx.ftz.f32 (relative error
about 2^-22; results below 2^-126 flush to 0), where expf is eight (nvcc's SASS: a range
reduction in five FFMA/FADD, the MUFU.EX2, and a rescaling): by the SASS (dev/sass_report.py),
a forward warp issued some 550 softmax instructions per 16x64 tile against its 64 HMMA, more
issue slots than the products take (not yet measured on a GPU: dev/PERF.md). lse stays in natural-log units for the interface (lse = (m + log2(sum)) ln 2); the
backward turns it back with one multiply per row. attention_exp2_cpu is the same function on the
CPU (exp2f with the same flush), used by the twins and by the emulated kernels, so that under
the emulation a kernel and its twin agree bit for bit; on a GPU they differ by a few float ulps
before P is rounded to bf16.
*/
constexpr float ATTN_LOG2E = 1.44269504088896341f;   // log2(e)
constexpr float ATTN_LN2 = 0.693147180559945309f;    // ln(2)
inline float attention_exp2_cpu(float x) { return x < -126.0f ? 0.0f : exp2f(x); }

#ifdef MIXLN_HAS_BF16
/*
CPU twins of the tensor-core attention (bf16 only; the kernels and their rationale are in the
last section of this file). They round where the kernels round, which is more often than the
attention above: the tensor cores multiply bf16 by bf16, so the probabilities P (forward and
backward) and the score gradients dS (backward) are rounded to bf16 before they enter a product,
as in FlashAttention. The forward keeps the kernel's 64-key tiles and its online softmax, because
P is rounded relative to the running maximum of the tiles seen so far: exp(score - m_tile), not
exp(score - m_final), and the two round differently. Within a tile the row sum of the rounded P is
taken in the kernel's order: four partial sums, the one of lane t (t = 0..3) over keys 8n + 2t and
8n + 2t + 1 for n = 0..7 in turn, then added by the kernel's butterfly, (s0 + s1) + (s2 + s3).
RoPE: the kernels rotate q and k as they load them, and dq and dk back as they write them, with the
values rounded to bf16 where rope_forward and rope_backward round them; the twins run those two on
a copy of qkv and on dqkv.
*/

// out (B, T, C) bf16; lse (B, NH, T) float; qkv (B, T, 3C) bf16; rope_cos, rope_sin (T, hs/2):
// RoPE's tables, applied to q and k first (nullptr: qkv holds them rotated already)
inline void attention_forward_tensor_core_cpu(bf16* out, float* lse, const bf16* qkv, const real* rope_cos,
                                              const real* rope_sin, int B, int T, int NH, int head_size) {
    int C = NH * head_size;
    std::vector<bf16> rotated;   // (B, T, 3C) q and k rotated, as the kernel's tiles hold them
    if (rope_cos != nullptr) {
        rotated.assign(qkv, qkv + (size_t)B * T * 3 * C);
        rope_forward_cpu(rotated.data(), rope_cos, rope_sin, B, T, NH, head_size);
        qkv = rotated.data();
    }
    float scale_log2 = 1.0f / sqrtf((float)head_size) * ATTN_LOG2E;   // scores in base 2 (above)
    #pragma omp parallel
    {
        std::vector<float> scores(64), acc(head_size);   // per thread: one tile's scores, one row's sum of P v
        #pragma omp for collapse(3)
        for (int b = 0; b < B; b++) {
            for (int h = 0; h < NH; h++) {
                for (int t = 0; t < T; t++) {
                    auto row = [&](int t2, int part) {
                        return qkv + ((size_t)b * T + t2) * 3 * C + (size_t)part * C + (size_t)h * head_size;
                    };
                    const bf16* q = row(t, 0);
                    float row_max = -INFINITY, row_sum = 0.0f;
                    std::fill(acc.begin(), acc.end(), 0.0f);
                    // the key tiles up to the query's own
                    for (int k0 = 0; k0 <= t; k0 += 64) {
                        // scaled scores of the tile (base 2), -inf for the masked future and keys past T
                        float tile_max = -INFINITY;
                        for (int c = 0; c < 64; c++) {
                            int t2 = k0 + c;
                            float score = -INFINITY;
                            if (t2 <= t && t2 < T) {
                                float dot = 0.0f;
                                for (int i = 0; i < head_size; i++) dot += to_real(q[i]) * to_real(row(t2, 1)[i]);
                                score = dot * scale_log2;
                            }
                            scores[c] = score;
                            tile_max = std::max(tile_max, score);
                        }
                        // online softmax: the new maximum, and the factor that rescales the old sums
                        float new_max = std::max(row_max, tile_max);
                        float correction = attention_exp2_cpu(row_max - new_max);
                        // P rounded to bf16 relative to the new maximum; its sum in the kernel's
                        // order (lane t of a row's four: keys 8n + 2t, 8n + 2t + 1 for n = 0..7)
                        for (int c = 0; c < 64; c++) scores[c] = to_real(from_real<bf16>(attention_exp2_cpu(scores[c] - new_max)));
                        float lane_sums[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                        for (int lane = 0; lane < 4; lane++)
                            for (int n = 0; n < 8; n++)
                                for (int i = 0; i < 2; i++) lane_sums[lane] += scores[8 * n + 2 * lane + i];
                        row_sum = row_sum * correction + ((lane_sums[0] + lane_sums[1]) + (lane_sums[2] + lane_sums[3]));
                        row_max = new_max;
                        // acc = acc * correction + P v
                        for (int i = 0; i < head_size; i++) acc[i] *= correction;
                        for (int c = 0; c < 64 && k0 + c <= t; c++) {
                            const bf16* v = row(k0 + c, 2);
                            for (int i = 0; i < head_size; i++) acc[i] += scores[c] * to_real(v[i]);
                        }
                    }
                    // out = acc / sum, rounded once; lse for backward
                    float inv_sum = 1.0f / row_sum;
                    bf16* y = out + ((size_t)b * T + t) * C + (size_t)h * head_size;
                    for (int i = 0; i < head_size; i++) y[i] = from_real<bf16>(acc[i] * inv_sum);
                    lse[((size_t)b * NH + h) * T + t] = (row_max + log2f(row_sum)) * ATTN_LN2;
                }
            }
        }
    }
}

// dqkv (B, T, 3C) written; dout, out (B, T, C) and lse (B, NH, T) as in the forward; qkv (B, T, 3C)
// and rope_cos, rope_sin as in the forward.
// P = 2^(score log2(e) - lse log2(e)), dP = dout . v, D = dout . out (out as stored), dS = P (dP - D); then
// dv = round(P)^T dout, dk = scale round(dS)^T q, dq = scale round(dS) k, each summed in float
// and rounded once into dqkv; with RoPE, dq and dk are then rotated back and rounded again.
inline void attention_backward_tensor_core_cpu(bf16* dqkv, const bf16* dout, const bf16* qkv, const bf16* out,
                                               const float* lse, const real* rope_cos, const real* rope_sin, int B,
                                               int T, int NH, int head_size) {
    int C = NH * head_size;
    std::vector<bf16> rotated;   // (B, T, 3C) q and k rotated, as in the forward
    if (rope_cos != nullptr) {
        rotated.assign(qkv, qkv + (size_t)B * T * 3 * C);
        rope_forward_cpu(rotated.data(), rope_cos, rope_sin, B, T, NH, head_size);
        qkv = rotated.data();
    }
    float scale = 1.0f / sqrtf((float)head_size), scale_log2 = scale * ATTN_LOG2E;
    #pragma omp parallel
    {
        std::vector<float> grad((size_t)T * 3 * head_size);   // per thread: one head's [dq | dk | dv] per position
        #pragma omp for collapse(2)
        for (int b = 0; b < B; b++) {
            for (int h = 0; h < NH; h++) {
                auto row = [&](int t2, int part) {
                    return qkv + ((size_t)b * T + t2) * 3 * C + (size_t)part * C + (size_t)h * head_size;
                };
                std::fill(grad.begin(), grad.end(), 0.0f);
                for (int t = 0; t < T; t++) {
                    const bf16* dy = dout + ((size_t)b * T + t) * C + (size_t)h * head_size;
                    const bf16* y = out + ((size_t)b * T + t) * C + (size_t)h * head_size;
                    float row_lse2 = lse[((size_t)b * NH + h) * T + t] * ATTN_LOG2E;   // base 2
                    // D = dout . out as stored
                    float dsum = 0.0f;
                    for (int i = 0; i < head_size; i++) dsum += to_real(dy[i]) * to_real(y[i]);
                    float* dq = grad.data() + (size_t)t * 3 * head_size;
                    for (int t2 = 0; t2 <= t; t2++) {
                        // P and dS of (t, t2) in float, then rounded to bf16 for the products
                        float dot = 0.0f, dp = 0.0f;
                        for (int i = 0; i < head_size; i++) {
                            dot += to_real(row(t, 0)[i]) * to_real(row(t2, 1)[i]);
                            dp += to_real(dy[i]) * to_real(row(t2, 2)[i]);
                        }
                        float p = attention_exp2_cpu(dot * scale_log2 - row_lse2);
                        float p_rounded = to_real(from_real<bf16>(p));
                        float ds_rounded = to_real(from_real<bf16>(p * (dp - dsum)));
                        float* dk = grad.data() + ((size_t)t2 * 3 + 1) * head_size;
                        float* dv = dk + head_size;
                        for (int i = 0; i < head_size; i++) {
                            dv[i] += p_rounded * to_real(dy[i]);
                            dk[i] += ds_rounded * to_real(row(t, 0)[i]);
                            dq[i] += ds_rounded * to_real(row(t2, 1)[i]);
                        }
                    }
                }
                // add the head's gradients to dqkv, rounding once (dq and dk carry the scale)
                for (int t = 0; t < T; t++)
                    for (int part = 0; part < 3; part++) {
                        bf16* d = dqkv + ((size_t)b * T + t) * 3 * C + (size_t)part * C + (size_t)h * head_size;
                        const float* g = grad.data() + ((size_t)t * 3 + part) * head_size;
                        float factor = part == 2 ? 1.0f : scale;
                        for (int i = 0; i < head_size; i++) d[i] = from_real<bf16>(g[i] * factor);
                    }
            }
        }
    }
    if (rope_cos != nullptr) rope_backward_cpu(dqkv, rope_cos, rope_sin, B, T, NH, head_size);
}
#endif  // MIXLN_HAS_BF16


#if defined(__CUDACC__) || defined(MIXLN_CUDA_EMULATION)
#include "../cuda_common.h"

// ---- CUDA kernels
// The simple, correct version: one warp per row (b, h, t) of the attention matrix, the
// probabilities materialised in att (B, NH, T, T) as on the CPU. A fused (flash-style) version
// that never stores att is the target for speed and sits beside this one.

// q . k / sqrt(hs) in float; q and k point at head_size channels
template <typename floatX>
static __device__ __forceinline__ float attention_score(const floatX* q, const floatX* k, int head_size, float scale) {
    float score = 0.0f;
    for (int i = 0; i < head_size; i++) score += to_float(q[i]) * to_float(k[i]);
    return score * scale;
}

template <typename floatX>
static __global__ void attention_forward_kernel(floatX* out, float* att, const floatX* qkv, int B, int T, int NH,
                                         int head_size) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;   // (b, h, t) flattened
    int lane = threadIdx.x % 32;
    if (row >= B * NH * T) return;   // whole warps
    int t = row % T, h = (row / T) % NH, b = row / (T * NH);
    int C = NH * head_size;
    float scale = 1.0f / sqrtf((float)head_size);
    const floatX* q = qkv + ((size_t)b * T + t) * 3 * C + (size_t)h * head_size;
    const floatX* keys = qkv + (size_t)b * T * 3 * C + C + (size_t)h * head_size;   // key t2 at keys + t2 * 3C
    float* att_row = att + (size_t)row * T;
    // the scores, then their exponentials, then the probabilities, staged in att_row (float)
    float max_score = -INFINITY;   // lanes striding over the keys 0..t
    for (int t2 = lane; t2 <= t; t2 += 32) {
        float score = attention_score(q, keys + (size_t)t2 * 3 * C, head_size, scale);
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
    // y = att v, lanes striding over the head's channels, rounded once into out
    for (int i = lane; i < head_size; i += 32) {
        float y = 0.0f;
        for (int t2 = 0; t2 <= t; t2++) {
            float v = to_float(qkv[((size_t)b * T + t2) * 3 * C + 2 * C + (size_t)h * head_size + i]);
            y += att_row[t2] * v;
        }
        out[((size_t)b * T + t) * C + (size_t)h * head_size + i] = from_float<floatX>(y);
    }
}

// Backward, pass 1, one warp per row (b, h, t): the gradient of the pre-softmax scores of the
// row goes to dpre (B, NH, T, T), float, and dq of position t is complete.
template <typename floatX>
static __global__ void attention_backward_query_kernel(floatX* dqkv, float* dpre, const floatX* dout, const floatX* qkv,
                                                const float* att, int B, int T, int NH, int head_size) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= B * NH * T) return;
    int t = row % T, h = (row / T) % NH, b = row / (T * NH);
    int C = NH * head_size;
    float scale = 1.0f / sqrtf((float)head_size);
    const float* att_row = att + (size_t)row * T;
    const floatX* dy = dout + ((size_t)b * T + t) * C + (size_t)h * head_size;
    float* dpre_row = dpre + (size_t)row * T;
    // datt[t2] = v[t2] . dy, kept in dpre_row for now; weighted = sum_j att[j] * datt[j]
    float weighted = 0.0f;
    for (int t2 = lane; t2 <= t; t2 += 32) {
        const floatX* v = qkv + ((size_t)b * T + t2) * 3 * C + 2 * C + (size_t)h * head_size;
        float d = 0.0f;
        for (int i = 0; i < head_size; i++) d += to_float(v[i]) * to_float(dy[i]);
        dpre_row[t2] = d;
        weighted += att_row[t2] * d;
    }
    weighted = warp_reduce_sum(weighted);
    for (int t2 = lane; t2 < T; t2 += 32)
        dpre_row[t2] = t2 <= t ? att_row[t2] * (dpre_row[t2] - weighted) * scale : 0.0f;
    __syncwarp();   // every lane reads all of dpre_row below
    for (int i = lane; i < head_size; i += 32) {
        float dq = 0.0f;
        for (int t2 = 0; t2 <= t; t2++)
            dq += dpre_row[t2] * to_float(qkv[((size_t)b * T + t2) * 3 * C + C + (size_t)h * head_size + i]);
        floatX* dq_out = dqkv + ((size_t)b * T + t) * 3 * C + (size_t)h * head_size + i;
        *dq_out = from_float<floatX>(dq);
    }
}

// Backward, pass 2, one warp per key position (b, h, t2): dk and dv sum over the queries t >= t2
// in order, so no atomics are needed and the result is deterministic.
template <typename floatX>
static __global__ void attention_backward_key_value_kernel(floatX* dqkv, const float* dpre, const floatX* dout,
                                                    const floatX* qkv, const float* att, int B, int T, int NH,
                                                    int head_size) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= B * NH * T) return;
    int t2 = row % T, h = (row / T) % NH, b = row / (T * NH);
    int C = NH * head_size;
    size_t head_rows = ((size_t)b * NH + h) * T;   // first row of this (b, h) in att and dpre
    for (int i = lane; i < head_size; i += 32) {
        float dk = 0.0f, dv = 0.0f;
        for (int t = t2; t < T; t++) {
            float q = to_float(qkv[((size_t)b * T + t) * 3 * C + (size_t)h * head_size + i]);
            float dy = to_float(dout[((size_t)b * T + t) * C + (size_t)h * head_size + i]);
            dk += dpre[(head_rows + t) * T + t2] * q;
            dv += att[(head_rows + t) * T + t2] * dy;
        }
        floatX* dk_out = dqkv + ((size_t)b * T + t2) * 3 * C + C + (size_t)h * head_size + i;
        floatX* dv_out = dk_out + C;
        *dk_out = from_float<floatX>(dk);
        *dv_out = from_float<floatX>(dv);
    }
}

// ---- launchers

template <typename floatX>
inline void attention_forward(floatX* out, float* att, const floatX* qkv, int B, int T, int NH, int head_size,
                              cudaStream_t stream) {
    const int block = 256;   // 8 rows per block
    LAUNCH(attention_forward_kernel<floatX>, dim3(ceil_div(B * NH * T, block / 32)), dim3(block), 0, stream, out, att,
           qkv, B, T, NH, head_size);
}

// scratch: (B, NH, T, T) floats, the gradient of the pre-softmax scores
template <typename floatX>
inline void attention_backward(floatX* dqkv, float* scratch, const floatX* dout, const floatX* qkv, const float* att,
                               int B, int T, int NH, int head_size, cudaStream_t stream) {
    const int block = 256;
    dim3 grid(ceil_div(B * NH * T, block / 32));
    LAUNCH(attention_backward_query_kernel<floatX>, grid, dim3(block), 0, stream, dqkv, scratch, dout, qkv, att, B, T,
           NH, head_size);
    LAUNCH(attention_backward_key_value_kernel<floatX>, grid, dim3(block), 0, stream, dqkv, (const float*)scratch, dout,
           qkv, att, B, T, NH, head_size);
}

// ---- fused (flash-style) CUDA kernels
/*
The same attention without the (T, T) matrix, whose memory and traffic grow as T^2 (fp32 at
T = 4096, 16 heads, B = 8: 8 GiB per layer) while q, k, v and out grow as T.

Forward (the FlashAttention-2 algorithm): one thread block per (b, h, tile of 64 queries). The q
tile stays in shared memory while the key tiles 0 .. the query tile's own stream through it. For
each key tile the block computes the 64x64 scaled scores and, per query row, updates a running
maximum m and a running sum l of exp(score - m), rescaling l and the output accumulator by
exp(m_old - m_new) when the maximum grows (the online softmax); after the last tile out = acc / l
is softmax(scores) v, and no score ever leaves the block. Causal: key tiles after the query tile
are never loaded, and the diagonal tile masks key > query. Saved for backward: lse = m + log(l),
(B, NH, T), so that backward recomputes each probability as exp(score - lse) with no max or sum.

Backward: with P = exp(S - lse), dP = dO V^T, D = rowsum(dO * O) (equal to sum_j P[j] dP[j], the
CPU version's `weighted`) and dS = P * (dP - D), the gradient of the scaled scores:
    dV = P^T dO,    dK = scale * dS^T Q,    dQ = scale * dS K
  pre-pass: D into scratch, one warp per row.
  pass 1:   one block per (b, h, key tile): its k and v tiles stay in shared memory while the query
            tiles from the diagonal on stream through; dK and dV accumulate in registers.
  pass 2:   one block per (b, h, query tile): q and dout stay, the key tiles up to the diagonal
            stream through, and S, P, dP are computed a second time (the price of having no
            atomics); dQ accumulates in registers.
Deterministic: each element of dq, dk and dv belongs to one thread of one block, which sums its
terms in a fixed order (tiles in order, rows in order, 16-lane reductions by a fixed butterfly) and
writes the total to dqkv once. No atomics, so the result does not depend on which blocks run first.

Tiling, shared by the three main kernels: 64x64 tiles and 256 threads seen as 16 x 16
(ty = thread / 16, tx = thread % 16). Of a 64x64 score tile, thread (ty, tx) owns rows
ty*4 .. ty*4+3 and columns tx, tx+16, tx+32, tx+48. The rows are contiguous so that one float4 of a
transposed P or dS tile gives a thread all four; the columns are strided so that the lanes of a
quarter warp read float4s from 8 different rows of the other operand (different banks, see the
stride). A row's 64 scores lie in the 16 lanes of one half warp, so row maxima and sums are 16-lane
butterflies. Of a (64, hs) accumulator the thread owns the same 4 rows and channels
4*(tx + 16*jj) .. +3 for jj = 0, 1, hence head_size <= 128.

Shared memory per block (dynamic; s is the tile row stride, 68 floats for hs 64, 132 for hs 128):
  forward: q, k, v tiles (64, s), P^T (64 keys, 68)                   64 * (3s + 68) floats
           = 68 KB at hs 64, 116 KB at hs 128
  pass 1:  k, v, q, dout tiles (64, s), P then dS (64 queries, 68),
           lse and D of the query tile (64 each)                      64 * (4s + 70) floats
           = 85.5 KB at hs 64, 149.5 KB at hs 128
  pass 2:  q, dout, k, v tiles (64, s), dS^T (64 keys, 68)            64 * (4s + 68) floats
           = 85 KB at hs 64, 149 KB at hs 128
Above the default 48 KB, so the launchers raise the limit with cudaFuncSetAttribute (sm_80 allows
163 KB, sm_90 227 KB). Pass 1 reuses one buffer for P and dS, at the cost of two more barriers per
query tile, to stay under sm_80's limit at hs 128.
Tile rows hold head_size channels rounded up to a float4, zeroed past head_size; rows past T are
zeroed as well, so masked entries (probability 0) never multiply a NaN.

Scratch of attention_backward_fused: (B, NH, T) floats, for D.

Storage type: qkv, out, dout and dqkv are floatX (float or bf16), lse and the scratch float. The
tiles in shared memory are float whatever floatX is: attention_load_tile converts each element
when it copies a tile from global memory, so the inner loops and the shared-memory layout above
are the same for every floatX. Rounding points: out is rounded once from acc / l; D is computed
from out AS STORED (rounded), as FlashAttention does in bf16; dq, dk and dv are summed in float
and written to dqkv once, dqkv = round(total). The simple attention rounds at
the same points (its att is float), so in bf16 out agrees with it to within one step of y (float
summation order can put the two on either side of a rounding boundary), and so does dv. In
backward the one other difference is D: the simple attention sums att * datt in float, which is
dy . y before y's rounding (as the fp32 PyTorch reference does), so the two D differ by
eD = dy . (round(y) - y), at most 2^-8 sum_i |dy_i y_i|; dS_j = P_j (dP_j - D) moves by -P_j eD,
dq by -scale eD sum_j P_j k_j and dk_j by -scale sum_t P_tj eD_t q_t. In the bf16 kernel tests
that move is up to about 0.7 of a bf16 step of the largest dq or dk, on top of the final roundings.
*/

#ifdef __CUDACC__
#define ATTN_UNROLL _Pragma("unroll")
#else
#define ATTN_UNROLL   // g++ would warn about an unknown pragma; it unrolls these small loops itself
#endif

constexpr int ATTN_TILE = 64;                 // queries per block, keys per shared-memory tile
constexpr int ATTN_THREADS = 256;             // 16 x 16, each owning a 4x4 piece of a score tile
constexpr int ATTN_MAX_HEAD_SIZE = 128;       // 16 lanes x 2 float4s of channels
constexpr int ATTN_P_STRIDE = ATTN_TILE + 4;  // row stride of the P / dS tiles: float4 aligned, rows 4 banks apart

// channels per tile row: head_size rounded up to a float4
__host__ __device__ inline int attention_fused_channels(int head_size) { return (head_size + 3) / 4 * 4; }
// Row stride of the q, k, v and dout tiles: the channels rounded up to 4 more than a multiple of 32,
// so that 8 lanes reading float4s from 8 consecutive rows (one shared-memory wavefront) hit 8
// different groups of 4 banks.
__host__ __device__ inline int attention_fused_stride(int head_size) {
    return (attention_fused_channels(head_size) + 27) / 32 * 32 + 4;
}

// Rows t0 .. t0+63 of one head's slice of a (B, T, row_stride) tensor, src pointing at (b, 0, slice),
// into a (64, stride) float tile; channels past head_size and rows past T become 0.
template <typename floatX>
static __device__ void attention_load_tile(float* tile, const floatX* src, int row_stride, int t0, int T,
                                           int head_size) {
    int channels = attention_fused_channels(head_size), stride = attention_fused_stride(head_size);
    for (int idx = threadIdx.x; idx < ATTN_TILE * channels; idx += blockDim.x) {
        int r = idx / channels, e = idx % channels;   // consecutive threads read consecutive channels: coalesced
        tile[r * stride + e] = t0 + r < T && e < head_size ? to_float(src[(size_t)(t0 + r) * row_stride + e]) : 0.0f;
    }
}

// acc[i][j] += a[ty*4 + i] . b[tx + 16*j] over the channels, a and b (64, stride) tiles
static __device__ __forceinline__ void attention_tile_dots(float acc[4][4], const float* a, const float* b, int channels,
                                                           int stride, int ty, int tx) {
    for (int e = 0; e < channels; e += 4) {
        float4 a4[4], b4[4];
        ATTN_UNROLL
        for (int i = 0; i < 4; i++) a4[i] = *reinterpret_cast<const float4*>(a + (ty * 4 + i) * stride + e);   // broadcast
        ATTN_UNROLL
        for (int j = 0; j < 4; j++) b4[j] = *reinterpret_cast<const float4*>(b + (tx + 16 * j) * stride + e);
        ATTN_UNROLL
        for (int i = 0; i < 4; i++) {
            ATTN_UNROLL
            for (int j = 0; j < 4; j++)
                acc[i][j] += a4[i].x * b4[j].x + a4[i].y * b4[j].y + a4[i].z * b4[j].z + a4[i].w * b4[j].w;
        }
    }
}

// acc[i][4*jj + k] += w_i * row[4*(tx + 16*jj) + k]: one row of a (64, stride) tile, weighted per
// accumulator row by w (the thread's 4 rows' entries of a P or dS column)
static __device__ __forceinline__ void attention_accumulate_row(float acc[4][8], float4 w, const float* row, int channels,
                                                                int tx) {
    float wi[4] = {w.x, w.y, w.z, w.w};
    ATTN_UNROLL
    for (int jj = 0; jj < 2; jj++) {
        int e = 4 * (tx + 16 * jj);
        if (e < channels) {
            float4 x = *reinterpret_cast<const float4*>(row + e);
            ATTN_UNROLL
            for (int i = 0; i < 4; i++) {
                acc[i][4 * jj + 0] += wi[i] * x.x;
                acc[i][4 * jj + 1] += wi[i] * x.y;
                acc[i][4 * jj + 2] += wi[i] * x.z;
                acc[i][4 * jj + 3] += wi[i] * x.w;
            }
        }
    }
}

// Store column j of the thread's 4x4 piece (rows ty*4 .. +3) as row tx + 16*j of a transposed
// (64, ATTN_P_STRIDE) tile: one float4 per j.
static __device__ __forceinline__ void attention_store_transposed(float* tile, const float piece[4][4], int ty, int tx) {
    ATTN_UNROLL
    for (int j = 0; j < 4; j++) {
        float4 column = {piece[0][j], piece[1][j], piece[2][j], piece[3][j]};
        *reinterpret_cast<float4*>(tile + (tx + 16 * j) * ATTN_P_STRIDE + ty * 4) = column;
    }
}

// max and sum over the 16 lanes of a half warp (the lanes sharing ty); every lane gets the result
static __device__ __forceinline__ float attention_reduce16_max(float value) {
    for (int offset = 8; offset > 0; offset /= 2) value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, offset));
    return value;
}
static __device__ __forceinline__ float attention_reduce16_sum(float value) {
    for (int offset = 8; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
    return value;
}

// Forward. grid (B * NH, query tiles); out (B, T, C), lse (B, NH, T), qkv (B, T, 3C)
template <typename floatX>
static __global__ void __launch_bounds__(ATTN_THREADS)
    attention_forward_fused_kernel(floatX* out, float* lse, const floatX* qkv, int T, int NH, int head_size) {
    DYNAMIC_SHARED(float, shared);
    const int channels = attention_fused_channels(head_size), stride = attention_fused_stride(head_size);
    float* q_tile = shared;                       // (64 queries, stride)
    float* k_tile = q_tile + ATTN_TILE * stride;  // (64 keys, stride)
    float* v_tile = k_tile + ATTN_TILE * stride;  // (64 keys, stride)
    float* pt_tile = v_tile + ATTN_TILE * stride; // (64 keys, ATTN_P_STRIDE): P^T, one key's 64 queries per row
    int b = blockIdx.x / NH, h = blockIdx.x % NH;
    int query_tile = gridDim.y - 1 - blockIdx.y;  // longest rows first, so the short diagonal blocks fill the tail
    int q0 = query_tile * ATTN_TILE;
    int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    int C = NH * head_size;
    float scale = 1.0f / sqrtf((float)head_size);
    const floatX* q_head = qkv + (size_t)b * T * 3 * C + (size_t)h * head_size;   // (T, 3C) rows, this head's q

    attention_load_tile(q_tile, q_head, 3 * C, q0, T, head_size);
    float acc[4][8] = {};   // rows ty*4+i, channels 4*(tx+16jj)+k: sum of exp(score - row_max) * v
    float row_max[4], row_sum[4];
    for (int i = 0; i < 4; i++) row_max[i] = -INFINITY, row_sum[i] = 0.0f;
    for (int key_tile = 0; key_tile <= query_tile; key_tile++) {
        int k0 = key_tile * ATTN_TILE;
        __syncthreads();   // the previous tile's k, v and P^T are no longer read (and the q tile is complete)
        attention_load_tile(k_tile, q_head + C, 3 * C, k0, T, head_size);
        attention_load_tile(v_tile, q_head + 2 * C, 3 * C, k0, T, head_size);
        __syncthreads();
        float score[4][4] = {};   // [query ty*4+i][key tx+16j]
        attention_tile_dots(score, q_tile, k_tile, channels, stride, ty, tx);
        ATTN_UNROLL
        for (int i = 0; i < 4; i++) {
            int t = q0 + ty * 4 + i;
            float tile_max = -INFINITY;
            ATTN_UNROLL
            for (int j = 0; j < 4; j++) {
                int t2 = k0 + tx + 16 * j;
                score[i][j] = t2 <= t ? score[i][j] * scale : -INFINITY;
                tile_max = fmaxf(tile_max, score[i][j]);
            }
            // finite: key k0 <= q0 <= t is never masked, so every row has a score in every tile
            float new_max = fmaxf(row_max[i], attention_reduce16_max(tile_max));
            float correction = expf(row_max[i] - new_max);   // 0 on the first tile, where row_max is -inf
            float tile_sum = 0.0f;
            ATTN_UNROLL
            for (int j = 0; j < 4; j++) {
                score[i][j] = expf(score[i][j] - new_max);   // now the unnormalised probability; 0 where masked
                tile_sum += score[i][j];
            }
            row_sum[i] = row_sum[i] * correction + attention_reduce16_sum(tile_sum);
            row_max[i] = new_max;
            ATTN_UNROLL
            for (int k = 0; k < 8; k++) acc[i][k] *= correction;
        }
        attention_store_transposed(pt_tile, score, ty, tx);
        __syncthreads();
        int keys = min(ATTN_TILE, T - k0);   // the zero rows of v past T add nothing
        for (int c = 0; c < keys; c++)
            attention_accumulate_row(acc, *reinterpret_cast<const float4*>(pt_tile + c * ATTN_P_STRIDE + ty * 4),
                                     v_tile + c * stride, channels, tx);
    }
    ATTN_UNROLL
    for (int i = 0; i < 4; i++) {
        int t = q0 + ty * 4 + i;
        if (t >= T) continue;
        float inv_sum = 1.0f / row_sum[i];
        floatX* y = out + ((size_t)b * T + t) * C + (size_t)h * head_size;
        ATTN_UNROLL
        for (int k = 0; k < 8; k++) {
            int e = 4 * (tx + 16 * (k / 4)) + k % 4;
            if (e < head_size) y[e] = from_float<floatX>(acc[i][k] * inv_sum);
        }
        if (tx == 0) lse[((size_t)b * NH + h) * T + t] = row_max[i] + logf(row_sum[i]);
    }
}

// Backward pre-pass, one warp per row (b, h, t): dsum (B, NH, T) = rowsum(dout * out) of the head,
// out as stored
template <typename floatX>
static __global__ void attention_dsum_kernel(float* dsum, const floatX* dout, const floatX* out, int B, int T, int NH,
                                      int head_size) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;   // (b, h, t) flattened
    int lane = threadIdx.x % 32;
    if (row >= B * NH * T) return;   // whole warps
    int t = row % T, h = (row / T) % NH, b = row / (T * NH);
    size_t offset = ((size_t)b * T + t) * NH * head_size + (size_t)h * head_size;
    float sum = 0.0f;
    for (int i = lane; i < head_size; i += 32) sum += to_float(dout[offset + i]) * to_float(out[offset + i]);
    sum = warp_reduce_sum(sum);
    if (lane == 0) dsum[row] = sum;
}

// The same with 16-byte loads, where a row is a power of two of whole aligned chunks up to 32
// (attention_dsum_vectors_apply): lane group of `chunks` lanes per row, 32 / chunks rows per warp,
// each lane one chunk of dout and of out (its products summed in order), then a butterfly over
// the group. One 2-byte load of each per lane at a time kept too little in flight.
template <typename floatX>
static __global__ void attention_dsum_vector_kernel(float* dsum, const floatX* dout, const floatX* out, int B, int T,
                                                    int NH, int head_size) {
    constexpr int VEC = VECTOR16_SIZE<floatX>;
    int chunks = head_size / VEC, rows_per_warp = 32 / chunks, lane = threadIdx.x % 32;
    int row = (blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32) * rows_per_warp + lane / chunks;
    if (row >= B * NH * T) return;   // whole lane groups, and the butterfly stays inside a group
    int t = row % T, h = (row / T) % NH, b = row / (T * NH), chunk = lane % chunks;
    size_t offset = ((size_t)b * T + t) * NH * head_size + (size_t)h * head_size + (size_t)chunk * VEC;
    Vector16<floatX> dys = load_vector16(dout + offset), ys = load_vector16(out + offset);
    float sum = 0.0f;
    for (int e = 0; e < VEC; e++) sum += to_float(dys.values[e]) * to_float(ys.values[e]);
    unsigned group = (chunks == 32 ? 0xffffffffu : ((1u << chunks) - 1u) << (lane / chunks * chunks));
    for (int offset_lanes = chunks / 2; offset_lanes > 0; offset_lanes /= 2)
        sum += __shfl_xor_sync(group, sum, offset_lanes);
    if (chunk == 0) dsum[row] = sum;
}

// Whether the 16-byte D kernel applies: whole chunks per row, a power of two of them up to 32,
// and dout and out 16-byte aligned (then every row is, the rows being a whole number of chunks)
template <typename floatX>
inline bool attention_dsum_vectors_apply(const floatX* dout, const floatX* out, int head_size) {
    constexpr int VEC = VECTOR16_SIZE<floatX>;
    int chunks = head_size / VEC;
    bool power_of_two = chunks > 0 && (chunks & (chunks - 1)) == 0;
    uintptr_t addresses = reinterpret_cast<uintptr_t>(dout) | reinterpret_cast<uintptr_t>(out);
    return head_size % VEC == 0 && power_of_two && chunks <= 32 && addresses % 16 == 0;
}

// dsum (B, NH, T) = rowsum(dout * out) per head, out as stored: the backward's pre-pass
template <typename floatX>
inline void attention_dsum(float* dsum, const floatX* dout, const floatX* out, int B, int T, int NH, int head_size,
                           cudaStream_t stream) {
    const int block = 256;   // 8 warps
    int rows = B * NH * T;
    if (attention_dsum_vectors_apply(dout, out, head_size)) {
        int rows_per_block = block / 32 * (32 / (head_size / VECTOR16_SIZE<floatX>));
        LAUNCH(attention_dsum_vector_kernel<floatX>, dim3(ceil_div(rows, rows_per_block)), dim3(block), 0, stream,
               dsum, dout, out, B, T, NH, head_size);
    } else {
        LAUNCH(attention_dsum_kernel<floatX>, dim3(ceil_div(rows, block / 32)), dim3(block), 0, stream, dsum, dout, out,
               B, T, NH, head_size);
    }
}

// Backward pass 1, dk and dv. grid (B * NH, key tiles); dqkv (B, T, 3C) written, dout (B, T, C),
// qkv (B, T, 3C), lse and dsum (B, NH, T)
template <typename floatX>
static __global__ void __launch_bounds__(ATTN_THREADS)
    attention_backward_key_value_fused_kernel(floatX* dqkv, const floatX* dout, const floatX* qkv, const float* lse,
                                              const float* dsum, int T, int NH, int head_size) {
    DYNAMIC_SHARED(float, shared);
    const int channels = attention_fused_channels(head_size), stride = attention_fused_stride(head_size);
    float* k_tile = shared;                          // (64 keys, stride)
    float* v_tile = k_tile + ATTN_TILE * stride;     // (64 keys, stride)
    float* q_tile = v_tile + ATTN_TILE * stride;     // (64 queries, stride)
    float* dout_tile = q_tile + ATTN_TILE * stride;  // (64 queries, stride)
    float* w_tile = dout_tile + ATTN_TILE * stride;  // (64 queries, ATTN_P_STRIDE): P, then dS
    float* lse_tile = w_tile + ATTN_TILE * ATTN_P_STRIDE;   // (64 queries)
    float* dsum_tile = lse_tile + ATTN_TILE;                // (64 queries)
    int b = blockIdx.x / NH, h = blockIdx.x % NH;
    int key_tile = blockIdx.y;   // the first key tiles are seen by the most queries: they go first
    int k0 = key_tile * ATTN_TILE;
    int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    int C = NH * head_size;
    float scale = 1.0f / sqrtf((float)head_size);
    const floatX* q_head = qkv + (size_t)b * T * 3 * C + (size_t)h * head_size;   // (T, 3C) rows
    const floatX* dout_head = dout + (size_t)b * T * C + (size_t)h * head_size;   // (T, C) rows
    const float* lse_head = lse + ((size_t)b * NH + h) * T;
    const float* dsum_head = dsum + ((size_t)b * NH + h) * T;

    attention_load_tile(k_tile, q_head + C, 3 * C, k0, T, head_size);
    attention_load_tile(v_tile, q_head + 2 * C, 3 * C, k0, T, head_size);
    float dk[4][8] = {}, dv[4][8] = {};   // keys ty*4+i, channels 4*(tx+16jj)+k
    for (int query_tile = key_tile; query_tile < (int)gridDim.y; query_tile++) {
        int q0 = query_tile * ATTN_TILE;
        __syncthreads();   // the previous tile's q, dout, dS, lse and dsum are no longer read
        attention_load_tile(q_tile, q_head, 3 * C, q0, T, head_size);
        attention_load_tile(dout_tile, dout_head, C, q0, T, head_size);
        for (int r = threadIdx.x; r < ATTN_TILE; r += blockDim.x) {
            lse_tile[r] = q0 + r < T ? lse_head[q0 + r] : 0.0f;
            dsum_tile[r] = q0 + r < T ? dsum_head[q0 + r] : 0.0f;
        }
        __syncthreads();
        float p[4][4] = {}, ds[4][4] = {};   // [key ty*4+i][query tx+16j]: scores and dP first
        attention_tile_dots(p, k_tile, q_tile, channels, stride, ty, tx);
        attention_tile_dots(ds, v_tile, dout_tile, channels, stride, ty, tx);
        ATTN_UNROLL
        for (int i = 0; i < 4; i++) {
            int t2 = k0 + ty * 4 + i;
            ATTN_UNROLL
            for (int j = 0; j < 4; j++) {
                int r = tx + 16 * j, t = q0 + r;
                // rows past T have no lse: masked with the future
                p[i][j] = t < T && t2 <= t ? expf(p[i][j] * scale - lse_tile[r]) : 0.0f;
                ds[i][j] = p[i][j] * (ds[i][j] - dsum_tile[r]);
            }
        }
        int queries = min(ATTN_TILE, T - q0);   // the masked rows past T add nothing
        attention_store_transposed(w_tile, p, ty, tx);
        __syncthreads();
        for (int r = 0; r < queries; r++)
            attention_accumulate_row(dv, *reinterpret_cast<const float4*>(w_tile + r * ATTN_P_STRIDE + ty * 4),
                                     dout_tile + r * stride, channels, tx);
        __syncthreads();   // P is read by all before dS replaces it
        attention_store_transposed(w_tile, ds, ty, tx);
        __syncthreads();
        for (int r = 0; r < queries; r++)
            attention_accumulate_row(dk, *reinterpret_cast<const float4*>(w_tile + r * ATTN_P_STRIDE + ty * 4),
                                     q_tile + r * stride, channels, tx);
    }
    ATTN_UNROLL
    for (int i = 0; i < 4; i++) {
        int t2 = k0 + ty * 4 + i;
        if (t2 >= T) continue;
        floatX* dk_row = dqkv + ((size_t)b * T + t2) * 3 * C + C + (size_t)h * head_size;
        floatX* dv_row = dk_row + C;
        ATTN_UNROLL
        for (int k = 0; k < 8; k++) {
            int e = 4 * (tx + 16 * (k / 4)) + k % 4;
            if (e < head_size) {
                dk_row[e] = from_float<floatX>(dk[i][k] * scale);
                dv_row[e] = from_float<floatX>(dv[i][k]);
            }
        }
    }
}

// Backward pass 2, dq. grid (B * NH, query tiles); arguments as pass 1
template <typename floatX>
static __global__ void __launch_bounds__(ATTN_THREADS)
    attention_backward_query_fused_kernel(floatX* dqkv, const floatX* dout, const floatX* qkv, const float* lse,
                                          const float* dsum, int T, int NH, int head_size) {
    DYNAMIC_SHARED(float, shared);
    const int channels = attention_fused_channels(head_size), stride = attention_fused_stride(head_size);
    float* q_tile = shared;                          // (64 queries, stride)
    float* dout_tile = q_tile + ATTN_TILE * stride;  // (64 queries, stride)
    float* k_tile = dout_tile + ATTN_TILE * stride;  // (64 keys, stride)
    float* v_tile = k_tile + ATTN_TILE * stride;     // (64 keys, stride)
    float* dst_tile = v_tile + ATTN_TILE * stride;   // (64 keys, ATTN_P_STRIDE): dS^T
    int b = blockIdx.x / NH, h = blockIdx.x % NH;
    int query_tile = gridDim.y - 1 - blockIdx.y;     // longest rows first
    int q0 = query_tile * ATTN_TILE;
    int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    int C = NH * head_size;
    float scale = 1.0f / sqrtf((float)head_size);
    const floatX* q_head = qkv + (size_t)b * T * 3 * C + (size_t)h * head_size;
    const floatX* dout_head = dout + (size_t)b * T * C + (size_t)h * head_size;

    attention_load_tile(q_tile, q_head, 3 * C, q0, T, head_size);
    attention_load_tile(dout_tile, dout_head, C, q0, T, head_size);
    float row_lse[4], row_dsum[4];   // of the thread's rows ty*4+i
    for (int i = 0; i < 4; i++) {
        int t = q0 + ty * 4 + i;
        row_lse[i] = t < T ? lse[((size_t)b * NH + h) * T + t] : 0.0f;
        row_dsum[i] = t < T ? dsum[((size_t)b * NH + h) * T + t] : 0.0f;
    }
    float dq[4][8] = {};   // queries ty*4+i, channels 4*(tx+16jj)+k
    for (int key_tile = 0; key_tile <= query_tile; key_tile++) {
        int k0 = key_tile * ATTN_TILE;
        __syncthreads();   // the previous tile's k and dS^T are no longer read (and q, dout are complete)
        attention_load_tile(k_tile, q_head + C, 3 * C, k0, T, head_size);
        attention_load_tile(v_tile, q_head + 2 * C, 3 * C, k0, T, head_size);
        __syncthreads();
        float p[4][4] = {}, ds[4][4] = {};   // [query ty*4+i][key tx+16j]: scores and dP first
        attention_tile_dots(p, q_tile, k_tile, channels, stride, ty, tx);
        attention_tile_dots(ds, dout_tile, v_tile, channels, stride, ty, tx);
        ATTN_UNROLL
        for (int i = 0; i < 4; i++) {
            int t = q0 + ty * 4 + i;
            ATTN_UNROLL
            for (int j = 0; j < 4; j++) {
                int t2 = k0 + tx + 16 * j;
                p[i][j] = t < T && t2 <= t ? expf(p[i][j] * scale - row_lse[i]) : 0.0f;
                ds[i][j] = p[i][j] * (ds[i][j] - row_dsum[i]);
            }
        }
        attention_store_transposed(dst_tile, ds, ty, tx);
        __syncthreads();
        int keys = min(ATTN_TILE, T - k0);
        for (int c = 0; c < keys; c++)
            attention_accumulate_row(dq, *reinterpret_cast<const float4*>(dst_tile + c * ATTN_P_STRIDE + ty * 4),
                                     k_tile + c * stride, channels, tx);
    }
    ATTN_UNROLL
    for (int i = 0; i < 4; i++) {
        int t = q0 + ty * 4 + i;
        if (t >= T) continue;
        floatX* dq_row = dqkv + ((size_t)b * T + t) * 3 * C + (size_t)h * head_size;
        ATTN_UNROLL
        for (int k = 0; k < 8; k++) {
            int e = 4 * (tx + 16 * (k / 4)) + k % 4;
            if (e < head_size) dq_row[e] = from_float<floatX>(dq[i][k] * scale);
        }
    }
}

// ---- fused launchers

// dynamic shared memory of each kernel, in bytes (the table at the top of this section)
inline size_t attention_forward_fused_shared_bytes(int head_size) {
    return sizeof(float) * ATTN_TILE * (3 * (size_t)attention_fused_stride(head_size) + ATTN_P_STRIDE);
}
inline size_t attention_backward_key_value_fused_shared_bytes(int head_size) {
    return sizeof(float) * ATTN_TILE * (4 * (size_t)attention_fused_stride(head_size) + ATTN_P_STRIDE + 2);
}
inline size_t attention_backward_query_fused_shared_bytes(int head_size) {
    return sizeof(float) * ATTN_TILE * (4 * (size_t)attention_fused_stride(head_size) + ATTN_P_STRIDE);
}

inline void attention_fused_check_head_size(int head_size) {
    if (head_size < 1 || head_size > ATTN_MAX_HEAD_SIZE)
        fail("fused attention supports head sizes 1..%d, got %d", ATTN_MAX_HEAD_SIZE, head_size);
}

// out (B, T, C); lse (B, NH, T) saved for backward; qkv (B, T, 3C)
template <typename floatX>
inline void attention_forward_fused_cuda_cores(floatX* out, float* lse, const floatX* qkv, int B, int T, int NH, int head_size,
                                    cudaStream_t stream) {
    attention_fused_check_head_size(head_size);
    size_t shared_bytes = attention_forward_fused_shared_bytes(head_size);
    auto kernel = attention_forward_fused_kernel<floatX>;   // the attribute belongs to the instantiation launched
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)shared_bytes));
    LAUNCH(kernel, dim3(B * NH, ceil_div(T, ATTN_TILE)), dim3(ATTN_THREADS), shared_bytes, stream, out, lse, qkv, T, NH,
           head_size);
}

// dqkv (B, T, 3C) written; scratch (B, NH, T) floats; dout (B, T, C); qkv (B, T, 3C), out (B, T, C) and
// lse (B, NH, T) from attention_forward_fused
template <typename floatX>
inline void attention_backward_fused_cuda_cores(floatX* dqkv, float* scratch, const floatX* dout, const floatX* qkv,
                                     const floatX* out, const float* lse, int B, int T, int NH, int head_size,
                                     cudaStream_t stream) {
    attention_fused_check_head_size(head_size);
    float* dsum = scratch;   // (B, NH, T)
    attention_dsum(dsum, dout, out, B, T, NH, head_size, stream);
    dim3 grid(B * NH, ceil_div(T, ATTN_TILE));
    size_t key_value_bytes = attention_backward_key_value_fused_shared_bytes(head_size);
    auto key_value_kernel = attention_backward_key_value_fused_kernel<floatX>;
    CUDA_CHECK(
        cudaFuncSetAttribute(key_value_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)key_value_bytes));
    LAUNCH(key_value_kernel, grid, dim3(ATTN_THREADS), key_value_bytes, stream, dqkv, dout, qkv, lse,
           (const float*)dsum, T, NH, head_size);
    size_t query_bytes = attention_backward_query_fused_shared_bytes(head_size);
    auto query_kernel = attention_backward_query_fused_kernel<floatX>;
    CUDA_CHECK(cudaFuncSetAttribute(query_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)query_bytes));
    LAUNCH(query_kernel, grid, dim3(ATTN_THREADS), query_bytes, stream, dqkv, dout, qkv, lse, (const float*)dsum, T, NH,
           head_size);
}

// ---- fused attention on tensor cores (bf16)
/*
The fused attention above computes in float on the CUDA cores. In bf16 the same algorithm runs on
the tensor cores, which multiply bf16 tiles with float accumulation: the PTX instruction
mma.sync.m16n8k16 through mma_bf16_16x8x16 (cuda_common.h), whose fragment layouts are documented,
so that scores, probabilities and accumulators stay in registers from one product to the next, as
in FlashAttention-2. attention_forward_fused and attention_backward_fused take this path for bf16
when the head size is a multiple of 16 up to 128; fp32, and other head sizes, stay on the CUDA-core
kernels. The kernels are templates on the head size, so every register array has its exact size.

What changes against the CUDA-core kernels, and why:
  - Rounding: a tensor-core product takes bf16 operands, so P is rounded to bf16 before P V (and
    before dV = P^T dO), and dS before dK = dS^T Q and dQ = dS K, as FlashAttention does. The
    scores, dP, the softmax statistics, D and every accumulator stay float. The CPU twins
    (attention_forward_tensor_core_cpu, attention_backward_tensor_core_cpu) round at the same
    points; each rounding of P or dS moves a term by at most 2^-8 of itself (bf16's unit roundoff).
    The row sum of the softmax adds the rounded P, as the twin does.
  - Work split: 128 threads, 4 warps; warp w owns rows 16w .. 16w+15 of the block's 64-row tile
    (queries in the forward and in pass 2, keys in pass 1) and does all of their work by itself:
    the warps share only the tiles in shared memory (loaded between two __syncthreads), never a
    partial result.
  - Registers: lane l (g = l / 4, t = l % 4) holds, of every 16-row result, rows g and g + 8 and
    two adjacent columns per 8. A row's statistics (maximum, sum) are 4-lane butterflies over the
    lanes with the same g. A 16x64 block of scores is 8 results of 16x8; after the softmax, pairs
    of them are exactly the A operand of the next product (P V, dS K, ...), converted to bf16 in
    registers (the layouts of D and A match). Accumulators (O, dQ, dK, dV) are 16 x head_size per
    warp, head_size / 2 floats per lane.
  - Operands in shared memory: every tile is stored as it lies in memory, (positions, channels),
    and the operands come out of it by ldmatrix (ldmatrix_x4 in cuda_common.h): one instruction
    per A operand, or per two B operands, where 4-byte loads would take four. A B operand whose k
    runs along the tile's rows (S = Q K^T: k is the channel, and K's rows hold it contiguous)
    loads as it is; one whose k runs over positions (P V, dS K, P^T dO, dS^T Q) loads with .trans,
    so no tile is ever stored transposed.
  - The softmax in base 2 (ex2.approx, one instruction; see attention_exp2_cpu), and the
    forward's P packed straight into A operands by one conversion per pair (pack_bf16x2), its row
    sums taken from the packed values.
  - The diagonal tile: a warp skips the products whose 16 or 32 columns are all in its rows'
    future (they would be masked to 0); in the forward, only tiles that reach past a warp's first
    row (or past T) compare positions at all (attention_tc_scale_scores<true>).
  - Determinism: as before, every element of dq, dk and dv is summed by one lane in a fixed order
    and written to dqkv once; no atomics.
  - RoPE inside (given its tables): q and k are rotated as their tiles are loaded from qkv, which
    keeps them as the qkv product wrote them, and dq and dk are rotated back as they are written
    (attention_tc_load_tile_rotated, attention_tc_flush_rotated). The separate RoPE kernels read
    and wrote q and k (forward) and dq and dk (backward) once more per layer: at LLaMA-71M, B 64,
    T 256, 4 x 34 MB of traffic and 2 launches per layer. The values are rounded where those
    kernels round them (a rotated q or k to bf16 before the products; dq and dk to bf16, rotated,
    rounded again), so the results are theirs to the bit. A pair (i, i + hs/2) lives in one
    thread in both places: in a tile load, one thread takes 8 channels of each half; in a flush,
    the lane holding column i of the accumulators (result n) also holds column i + hs/2 (result
    n + hs/16). A streamed tile is rotated each time a block loads it (a key tile by every query
    tile after it): at head size 64, 109 instructions per thread and 8 pairs, some 140 more per
    tile load than the plain copy. Whether that costs less than the passes it saves depends on
    whether these kernels are bound by issue, so the model can also run RoPE's own kernels
    around them instead (Model::rope_in_attention, ./train --rope separate).
Tiles are bf16 (64, head_size + 8): 16 bytes more than a row, so that the 8 rows one ldmatrix
phase reads (16 bytes each) fall in 32 different banks for every head size here: at hs = 16m a
row is 8m + 4 words, so row r starts at bank 4 (2m + 1) r mod 32, a different one for r = 0..7.
Shared memory per block (hs: head size; r = 64 (hs + 8) bf16 elements):
  forward: q, k, v tiles (r each)                                     = 27 KB at hs 64, 51 KB at hs 128
  pass 1:  k, v, q, dout tiles (r each), lse and D of the query tile  = 36.5 KB at hs 64, 68.5 KB at hs 128
  pass 2:  q, dout, k, v tiles (r each)                               = 36 KB at hs 64, 68 KB at hs 128
all within sm_80's 163 KB.
*/

constexpr int ATTN_TC_WARPS = 4;
constexpr int ATTN_TC_THREADS = 32 * ATTN_TC_WARPS;

// 2^x for the tensor-core softmax (see attention_exp2_cpu): ex2.approx.ftz.f32 on the GPU, the CPU
// function under the emulation
static __device__ __forceinline__ float attention_exp2(float x) {
#ifdef MIXLN_CUDA_EMULATION
    return attention_exp2_cpu(x);
#else
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#endif
}

// the tensor-core path handles these head sizes
inline bool attention_tensor_core_supports(int head_size) {
    return head_size % 16 == 0 && head_size >= 16 && head_size <= ATTN_MAX_HEAD_SIZE;
}
__host__ __device__ constexpr int attention_tc_stride(int head_size) { return head_size + 8; }

// Rows t0 .. t0+63 of one head's slice of a (B, T, row_stride) bf16 tensor, src pointing at
// (b, 0, slice), into a (64, stride) bf16 tile; rows past T become 0 (the padding channels past
// head_size are never read). 16-byte copies when the rows allow them.
static __device__ void attention_tc_load_tile(bf16* tile, const bf16* src, int row_stride, int t0, int T,
                                              int head_size, int stride) {
    bool vectors = (reinterpret_cast<uintptr_t>(src) % 16 == 0) && row_stride % 8 == 0;
    if (vectors) {
        int chunks = head_size / 8;   // 8 bf16 per 16 bytes
        for (int idx = threadIdx.x; idx < ATTN_TILE * chunks; idx += blockDim.x) {
            int r = idx / chunks, e = idx % chunks * 8;
            Vector16<bf16> value = {};   // zeros
            if (t0 + r < T) value = load_vector16(src + (size_t)(t0 + r) * row_stride + e);
            store_vector16(tile + r * stride + e, value);
        }
    } else {
        for (int idx = threadIdx.x; idx < ATTN_TILE * head_size; idx += blockDim.x) {
            int r = idx / head_size, e = idx % head_size;
            tile[r * stride + e] = t0 + r < T ? src[(size_t)(t0 + r) * row_stride + e] : __float2bfloat16_rn(0.0f);
        }
    }
}

// attention_tc_load_tile for q or k rows, with RoPE applied as they are loaded: pair i < hs/2 of
// the row at position t0 + r rotated by rope_cos, rope_sin (T, hs/2) through rope_rotate_pair and
// each value rounded to bf16 once, the bits rope_forward would have stored in qkv. rope_cos
// nullptr: the rows are rotated already, a plain load. A thread takes 8 pairs at a time: two
// 16-byte loads of the row and two each of the tables, so src and the tables must be 16-byte
// aligned (attention_tc_rope_fits; the launchers check it). There is no element-by-element path:
// its registers, never used in the model, made the backward passes spill.
static __device__ void attention_tc_load_tile_rotated(bf16* tile, const bf16* src, int row_stride, int t0, int T,
                                                      int head_size, int stride, const float* rope_cos,
                                                      const float* rope_sin) {
    if (rope_cos == nullptr) {
        attention_tc_load_tile(tile, src, row_stride, t0, T, head_size, stride);
        return;
    }
    int half = head_size / 2;   // a multiple of 8: head_size is a multiple of 16 here
    int chunks = half / 8;      // chunks of 8 pairs in a row
    for (int idx = threadIdx.x; idx < ATTN_TILE * chunks; idx += blockDim.x) {
        int r = idx / chunks, e = idx % chunks * 8, position = t0 + r;
        Vector16<bf16> firsts = {}, seconds = {};   // zeros past T
        if (position < T) {
            // the chunk's first halves x[e ..], second halves x[e + half ..], cos and sin: all
            // loads before any arithmetic
            const bf16* x = src + (size_t)position * row_stride + e;
            const float* cos_chunk = rope_cos + (size_t)position * half + e;
            const float* sin_chunk = rope_sin + (size_t)position * half + e;
            firsts = load_vector16(x);
            seconds = load_vector16(x + half);
            Vector16<float> coss[2] = {load_vector16(cos_chunk), load_vector16(cos_chunk + 4)};
            Vector16<float> sins[2] = {load_vector16(sin_chunk), load_vector16(sin_chunk + 4)};
            // two pairs at a time, as packed bf16x2 words (channels 2w and 2w + 1 in word w): one
            // shift or mask to unpack a value, one conversion to round and pack two
            uint32_t first_words[4] = {firsts.vector.x, firsts.vector.y, firsts.vector.z, firsts.vector.w};
            uint32_t second_words[4] = {seconds.vector.x, seconds.vector.y, seconds.vector.z, seconds.vector.w};
            ATTN_UNROLL
            for (int w = 0; w < 4; w++) {
                float x1[2] = {bf16x2_low(first_words[w]), bf16x2_high(first_words[w])};
                float x2[2] = {bf16x2_low(second_words[w]), bf16x2_high(second_words[w])};
                ATTN_UNROLL
                for (int j = 0; j < 2; j++) {
                    int k = 2 * w + j;   // the pair's channel in the chunk
                    rope_rotate_pair(&x1[j], &x2[j], coss[k / 4].values[k % 4], sins[k / 4].values[k % 4]);
                }
                first_words[w] = pack_bf16x2(x1[0], x1[1]);
                second_words[w] = pack_bf16x2(x2[0], x2[1]);
            }
            firsts.vector.x = first_words[0], firsts.vector.y = first_words[1];
            firsts.vector.z = first_words[2], firsts.vector.w = first_words[3];
            seconds.vector.x = second_words[0], seconds.vector.y = second_words[1];
            seconds.vector.z = second_words[2], seconds.vector.w = second_words[3];
        }
        store_vector16(tile + r * stride + e, firsts);
        store_vector16(tile + r * stride + e + half, seconds);
    }
}

// Operand loads from the row-major tiles in shared memory, one ldmatrix each (layouts:
// mma_bf16_16x8x16; ldmatrix_x4 names which lane passes which row). lane = threadIdx.x % 32.
// The A operand (16x16) of rows r0 .. r0+15, columns k0 .. k0+15 of a tile with row stride
// `stride`: matrices (r0, k0), (r0 + 8, k0), (r0, k0 + 8), (r0 + 8, k0 + 8) are a[0..3].
static __device__ __forceinline__ void attention_tc_load_a(uint32_t a[4], const bf16* tile, int stride, int r0, int k0,
                                                           int lane) {
    ldmatrix_x4(a, tile + (r0 + lane % 16) * stride + k0 + 8 * (lane / 16));
}
// The B operands (16x8 each) of k0 .. k0+15 and the two column blocks n0 .. n0+7 (b[0]) and
// n0+8 .. n0+15 (b[1]), from a tile whose rows run along n: B(k, n) at tile[n * stride + k] (k, v
// or q rows against channels k, as in S = Q K^T). Matrices (n0, k0), (n0, k0 + 8), (n0 + 8, k0),
// (n0 + 8, k0 + 8) are b[0][0], b[0][1], b[1][0], b[1][1].
static __device__ __forceinline__ void attention_tc_load_b_pair(uint32_t b[2][2], const bf16* tile, int stride, int n0,
                                                                int k0, int lane) {
    uint32_t r[4];
    ldmatrix_x4(r, tile + (n0 + lane % 8 + 8 * (lane / 16)) * stride + k0 + 8 * (lane / 8 % 2));
    b[0][0] = r[0], b[0][1] = r[1], b[1][0] = r[2], b[1][1] = r[3];
}
// The same B operands from a tile whose rows run along k: B(k, n) at tile[k * stride + n]
// (positions against channels, as v in P V), transposed by the load: matrices (k0, n0),
// (k0 + 8, n0), (k0, n0 + 8), (k0 + 8, n0 + 8) are b[0][0], b[0][1], b[1][0], b[1][1].
static __device__ __forceinline__ void attention_tc_load_b_pair_trans(uint32_t b[2][2], const bf16* tile, int stride,
                                                                      int k0, int n0, int lane) {
    uint32_t r[4];
    ldmatrix_x4_trans(r, tile + (k0 + lane % 16) * stride + n0 + 8 * (lane / 16));
    b[0][0] = r[0], b[0][1] = r[1], b[1][0] = r[2], b[1][1] = r[3];
}
// Results n = 2k, 2k+1 (16x8 each, float) as the A operand (16x16, bf16) of columns 16k .. 16k+15:
// the layouts match, each value is rounded to bf16
static __device__ __forceinline__ void attention_tc_to_a(uint32_t a[4], const float left[4], const float right[4]) {
    a[0] = pack_bf16x2(left[0], left[1]);
    a[1] = pack_bf16x2(left[2], left[3]);
    a[2] = pack_bf16x2(right[0], right[1]);
    a[3] = pack_bf16x2(right[2], right[3]);
}

// dst = round(acc * factor) for the warp's accumulators (16 rows x HS, see the layout above): dst
// points at row 0 of the warp, rows dst_stride apart; rows from `rows` on are not written. A
// lane's two adjacent columns go out as one 4-byte store where dst and the stride allow.
template <int HS>
static __device__ __forceinline__ void attention_tc_flush(bf16* dst, size_t dst_stride, int rows,
                                                          const float acc[HS / 8][4], float factor, int g, int t) {
    bool pairs = reinterpret_cast<uintptr_t>(dst) % 4 == 0 && dst_stride % 2 == 0;
    ATTN_UNROLL
    for (int n = 0; n < HS / 8; n++) {
        ATTN_UNROLL
        for (int half = 0; half < 2; half++) {
            int r = g + 8 * half;
            if (r >= rows) continue;
            bf16* p = dst + r * dst_stride + 8 * n + 2 * t;
            float lo = acc[n][2 * half] * factor, hi = acc[n][2 * half + 1] * factor;
            if (pairs) {
                store_bf16x2(p, pack_bf16x2(lo, hi));
            } else {
                p[0] = __float2bfloat16_rn(lo);
                p[1] = __float2bfloat16_rn(hi);
            }
        }
    }
}

// attention_tc_flush for dq or dk, with RoPE's inverse applied as they are written: each value is
// rounded to bf16 as attention_tc_flush rounds it, then its pair (columns i and i + HS/2: results
// n and n + HS/16 of the same lane) is rotated back by the angle of its row's position,
// first_position + row, through rope_rotate_pair with -sin, and rounded again: the bits of
// attention_tc_flush followed by rope_backward. rope_cos nullptr: attention_tc_flush.
template <int HS>
static __device__ __forceinline__ void attention_tc_flush_rotated(bf16* dst, size_t dst_stride, int rows,
                                                                  int first_position, const float acc[HS / 8][4],
                                                                  float factor, int g, int t, const float* rope_cos,
                                                                  const float* rope_sin) {
    if (rope_cos == nullptr) {
        attention_tc_flush<HS>(dst, dst_stride, rows, acc, factor, g, t);
        return;
    }
    constexpr int HALF = HS / 2;
    bool pairs = reinterpret_cast<uintptr_t>(dst) % 4 == 0 && dst_stride % 2 == 0;
    ATTN_UNROLL
    for (int n = 0; n < HS / 16; n++) {
        ATTN_UNROLL
        for (int half = 0; half < 2; half++) {
            int r = g + 8 * half, column = 8 * n + 2 * t;   // the lane's columns: column, column + 1
            if (r >= rows) continue;
            const float* cos_row = rope_cos + (size_t)(first_position + r) * HALF + column;
            const float* sin_row = rope_sin + (size_t)(first_position + r) * HALF + column;
            float firsts[2], seconds[2];   // columns column + j and column + j + HALF
            ATTN_UNROLL
            for (int j = 0; j < 2; j++) {
                firsts[j] = to_float(__float2bfloat16_rn(acc[n][2 * half + j] * factor));
                seconds[j] = to_float(__float2bfloat16_rn(acc[n + HS / 16][2 * half + j] * factor));
                rope_rotate_pair(&firsts[j], &seconds[j], cos_row[j], -sin_row[j]);
            }
            bf16* p = dst + r * dst_stride + column;
            if (pairs) {
                store_bf16x2(p, pack_bf16x2(firsts[0], firsts[1]));
                store_bf16x2(p + HALF, pack_bf16x2(seconds[0], seconds[1]));
            } else {
                p[0] = __float2bfloat16_rn(firsts[0]);
                p[1] = __float2bfloat16_rn(firsts[1]);
                p[HALF] = __float2bfloat16_rn(seconds[0]);
                p[HALF + 1] = __float2bfloat16_rn(seconds[1]);
            }
        }
    }
}

// The forward's scores of a 16 x 64 tile (8 results of 16 x 8, see the layout above) times
// scale_log2; with MASKED, the keys after the lane's rows or past T become -inf. A template, so
// that the tiles wholly before the diagonal (most of them) run no comparisons at all.
template <bool MASKED>
static __device__ __forceinline__ void attention_tc_scale_scores(float s[8][4], float scale_log2, int k0,
                                                                 const int row[2], int T, int t) {
    ATTN_UNROLL
    for (int n = 0; n < 8; n++) {
        ATTN_UNROLL
        for (int i = 0; i < 4; i++) {
            int key = k0 + 8 * n + 2 * t + i % 2;
            s[n][i] = MASKED && !(key <= row[i / 2] && key < T) ? -INFINITY : s[n][i] * scale_log2;
        }
    }
}

// Forward. grid (B * NH, query tiles); out (B, T, C), lse (B, NH, T), qkv (B, T, 3C); rope_cos,
// rope_sin (T, HS/2) RoPE's tables, applied to q and k as they are loaded (nullptr: qkv holds
// them rotated already)
template <int HS>
static __global__ void __launch_bounds__(ATTN_TC_THREADS)
    attention_forward_tensor_core_kernel(bf16* out, float* lse, const bf16* qkv, const float* rope_cos,
                                         const float* rope_sin, int T, int NH) {
    constexpr int stride = attention_tc_stride(HS);
    DYNAMIC_SHARED(bf16, shared);
    bf16* q_tile = shared;                                  // (64 queries, stride)
    bf16* k_tile = q_tile + ATTN_TILE * stride;             // (64 keys, stride)
    bf16* v_tile = k_tile + ATTN_TILE * stride;             // (64 keys, stride)
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    int b = blockIdx.x / NH, h = blockIdx.x % NH;
    int query_tile = gridDim.y - 1 - blockIdx.y;   // longest rows first
    int q0 = query_tile * ATTN_TILE;
    int C = NH * HS;
    float scale_log2 = 1.0f / sqrtf((float)HS) * ATTN_LOG2E;   // scores in base 2 (attention_exp2_cpu)
    const bf16* q_head = qkv + (size_t)b * T * 3 * C + (size_t)h * HS;
    // the lane's two rows: queries row[0] = q0 + 16 warp + g and row[1] = row[0] + 8
    int row[2] = {q0 + 16 * warp + g, q0 + 16 * warp + g + 8};
    int last_row = q0 + 16 * warp + 15;   // the warp's last query

    attention_tc_load_tile_rotated(q_tile, q_head, 3 * C, q0, T, HS, stride, rope_cos, rope_sin);
    __syncthreads();
    uint32_t q_frag[HS / 16][4];   // the warp's 16 queries as A operands, 16 channels each
    ATTN_UNROLL
    for (int kc = 0; kc < HS / 16; kc++) attention_tc_load_a(q_frag[kc], q_tile, stride, 16 * warp, 16 * kc, lane);
    float o[HS / 8][4] = {};   // output accumulator: 16 queries x HS channels
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};
    for (int key_tile = 0; key_tile <= query_tile; key_tile++) {
        int k0 = key_tile * ATTN_TILE;
        __syncthreads();   // the previous k and v tiles are no longer read
        attention_tc_load_tile_rotated(k_tile, q_head + C, 3 * C, k0, T, HS, stride, rope_cos, rope_sin);
        attention_tc_load_tile(v_tile, q_head + 2 * C, 3 * C, k0, T, HS, stride);
        __syncthreads();
        // S = q k^T: 16 queries x 64 keys, as 8 results of 8 keys, two at a time (pairs wholly
        // after last_row stay 0; all of them are masked below)
        float s[8][4] = {};
        ATTN_UNROLL
        for (int n = 0; n < 8; n += 2) {
            if (k0 + 8 * n > last_row) break;
            ATTN_UNROLL
            for (int kc = 0; kc < HS / 16; kc++) {
                uint32_t k_frag[2][2];
                attention_tc_load_b_pair(k_frag, k_tile, stride, 8 * n, 16 * kc, lane);
                mma_bf16_16x8x16(s[n], q_frag[kc], k_frag[0]);
                mma_bf16_16x8x16(s[n + 1], q_frag[kc], k_frag[1]);
            }
        }
        // scale (base 2) and mask, then each row's maximum over the tile (a butterfly over its 4
        // lanes). Only a tile that reaches past the warp's first row, or past T, has masked keys.
        bool masked = k0 + ATTN_TILE - 1 > q0 + 16 * warp || k0 + ATTN_TILE > T;
        if (masked) attention_tc_scale_scores<true>(s, scale_log2, k0, row, T, t);
        else attention_tc_scale_scores<false>(s, scale_log2, k0, row, T, t);
        float tile_max[2] = {-INFINITY, -INFINITY};
        ATTN_UNROLL
        for (int n = 0; n < 8; n++) {
            ATTN_UNROLL
            for (int i = 0; i < 4; i++) tile_max[i / 2] = fmaxf(tile_max[i / 2], s[n][i]);
        }
        float correction[2];
        ATTN_UNROLL
        for (int j = 0; j < 2; j++) {
            tile_max[j] = fmaxf(tile_max[j], __shfl_xor_sync(0xffffffffu, tile_max[j], 1));
            tile_max[j] = fmaxf(tile_max[j], __shfl_xor_sync(0xffffffffu, tile_max[j], 2));
            // finite: key k0 <= q0 <= row is never masked (rows past T included: k0 < T)
            float new_max = fmaxf(row_max[j], tile_max[j]);
            correction[j] = attention_exp2(row_max[j] - new_max);   // 0 on the first tile
            row_max[j] = new_max;
        }
        // P = 2^(score - max) rounded to bf16 and packed in pairs: p_frag[kc] is the A operand of
        // keys 16 kc .. 16 kc + 15 (results n = 2 kc and 2 kc + 1, as attention_tc_to_a packs
        // them). The row sums add the rounded values, key by key in the order of n.
        uint32_t p_frag[4][4];
        float tile_sum[2] = {0.0f, 0.0f};
        ATTN_UNROLL
        for (int kc = 0; kc < 4; kc++) {
            ATTN_UNROLL
            for (int half = 0; half < 2; half++) {
                ATTN_UNROLL
                for (int j = 0; j < 2; j++) {   // the lane's rows g (j = 0) and g + 8 (j = 1)
                    const float* scores = s[2 * kc + half];
                    uint32_t pair = pack_bf16x2(attention_exp2(scores[2 * j] - row_max[j]),
                                                attention_exp2(scores[2 * j + 1] - row_max[j]));
                    p_frag[kc][2 * half + j] = pair;
                    tile_sum[j] += bf16x2_low(pair);
                    tile_sum[j] += bf16x2_high(pair);
                }
            }
        }
        ATTN_UNROLL
        for (int j = 0; j < 2; j++) {
            tile_sum[j] += __shfl_xor_sync(0xffffffffu, tile_sum[j], 1);
            tile_sum[j] += __shfl_xor_sync(0xffffffffu, tile_sum[j], 2);
            row_sum[j] = row_sum[j] * correction[j] + tile_sum[j];
        }
        // O = O * correction + P v (P's columns of 16 keys wholly after last_row are 0: skipped)
        ATTN_UNROLL
        for (int n = 0; n < HS / 8; n++) {
            ATTN_UNROLL
            for (int i = 0; i < 4; i++) o[n][i] *= correction[i / 2];
        }
        ATTN_UNROLL
        for (int kc = 0; kc < 4; kc++) {
            if (k0 + 16 * kc > last_row) break;
            ATTN_UNROLL
            for (int n = 0; n < HS / 8; n += 2) {
                uint32_t v_frag[2][2];
                attention_tc_load_b_pair_trans(v_frag, v_tile, stride, 16 * kc, 8 * n, lane);
                mma_bf16_16x8x16(o[n], p_frag[kc], v_frag[0]);
                mma_bf16_16x8x16(o[n + 1], p_frag[kc], v_frag[1]);
            }
        }
    }
    // out = O / row_sum, rounded once; lse = (max + log2(sum)) ln 2, in natural-log units
    ATTN_UNROLL
    for (int j = 0; j < 2; j++) {
        if (row[j] >= T) continue;
        float inv_sum = 1.0f / row_sum[j];
        bf16* y = out + ((size_t)b * T + row[j]) * C + (size_t)h * HS;
        bool pairs = reinterpret_cast<uintptr_t>(y) % 4 == 0;   // then one 4-byte store per two columns
        ATTN_UNROLL
        for (int n = 0; n < HS / 8; n++) {
            float lo = o[n][2 * j] * inv_sum, hi = o[n][2 * j + 1] * inv_sum;
            if (pairs) {
                store_bf16x2(y + 8 * n + 2 * t, pack_bf16x2(lo, hi));
            } else {
                y[8 * n + 2 * t] = __float2bfloat16_rn(lo);
                y[8 * n + 2 * t + 1] = __float2bfloat16_rn(hi);
            }
        }
        if (t == 0) lse[((size_t)b * NH + h) * T + row[j]] = (row_max[j] + log2f(row_sum[j])) * ATTN_LN2;
    }
}

// The backward passes' two products over the head's channels, for the warp's 16 rows r0 .. r0+15
// of a1 and a2 against 32 rows c0 .. c0+31 of b1 and b2 (all tiles (64, stride)):
// x += a1 b1^T and y += a2 b2^T, 4 results of 8 columns each. Pass 1 has a = (k, v), b = (q,
// dout): S^T and dP^T; pass 2 the reverse: S and dP.
template <int HS>
static __device__ __forceinline__ void attention_tc_two_products(float x[4][4], float y[4][4], const bf16* a1_tile,
                                                                 const bf16* a2_tile, const bf16* b1_tile,
                                                                 const bf16* b2_tile, int stride, int r0, int c0,
                                                                 int lane) {
    ATTN_UNROLL
    for (int kc = 0; kc < HS / 16; kc++) {
        uint32_t a1[4], a2[4];
        attention_tc_load_a(a1, a1_tile, stride, r0, 16 * kc, lane);
        attention_tc_load_a(a2, a2_tile, stride, r0, 16 * kc, lane);
        ATTN_UNROLL
        for (int n = 0; n < 4; n += 2) {
            uint32_t b1[2][2], b2[2][2];
            attention_tc_load_b_pair(b1, b1_tile, stride, c0 + 8 * n, 16 * kc, lane);
            attention_tc_load_b_pair(b2, b2_tile, stride, c0 + 8 * n, 16 * kc, lane);
            ATTN_UNROLL
            for (int i = 0; i < 2; i++) {
                mma_bf16_16x8x16(x[n + i], a1, b1[i]);
                mma_bf16_16x8x16(y[n + i], a2, b2[i]);
            }
        }
    }
}

// Blocks of pass 1 an SM should hold at once, for its register budget: 4 (128 registers a thread)
// up to head size 64, else no bound (0). With RoPE in the query tiles' loads, the compiler left to
// itself takes 130 to 136 registers at head size 64, which fits only 3 blocks. At 128 it keeps a
// few values in local memory (make kernel-report shows the bytes): on sm_90, by the SASS, 4 local
// loads per thread and query tile (a loop bound and addresses), none among the products.
constexpr int attention_tc_key_value_blocks(int head_size) { return head_size <= 64 ? 4 : 0; }

// Backward pass 1, dk and dv. grid (B * NH, key tiles); dqkv (B, T, 3C) written, dout (B, T, C),
// qkv (B, T, 3C), lse and dsum (B, NH, T); rope_cos, rope_sin as in the forward (q and k rotated
// as they are loaded, dk rotated back as it is written)
template <int HS>
static __global__ void __launch_bounds__(ATTN_TC_THREADS, attention_tc_key_value_blocks(HS))
    attention_backward_key_value_tensor_core_kernel(bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse,
                                                    const float* dsum, const float* rope_cos, const float* rope_sin,
                                                    int T, int NH) {
    constexpr int stride = attention_tc_stride(HS);
    DYNAMIC_SHARED(bf16, shared);
    bf16* k_tile = shared;                                       // (64 keys, stride)
    bf16* v_tile = k_tile + ATTN_TILE * stride;                  // (64 keys, stride)
    bf16* q_tile = v_tile + ATTN_TILE * stride;                  // (64 queries, stride)
    bf16* dout_tile = q_tile + ATTN_TILE * stride;               // (64 queries, stride)
    float* lse_tile = (float*)(dout_tile + ATTN_TILE * stride);  // (64)
    float* dsum_tile = lse_tile + ATTN_TILE;                           // (64)
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    int b = blockIdx.x / NH, h = blockIdx.x % NH;
    int key_tile = blockIdx.y;   // the first key tiles see the most query tiles: they start first
    int k0 = key_tile * ATTN_TILE;
    int C = NH * HS;
    float scale = 1.0f / sqrtf((float)HS), scale_log2 = scale * ATTN_LOG2E;
    const bf16* q_head = qkv + (size_t)b * T * 3 * C + (size_t)h * HS;
    const bf16* dout_head = dout + (size_t)b * T * C + (size_t)h * HS;
    const float* lse_head = lse + ((size_t)b * NH + h) * T;
    const float* dsum_head = dsum + ((size_t)b * NH + h) * T;
    // the lane's two keys: key[0] = k0 + 16 warp + g and key[1] = key[0] + 8
    int key[2] = {k0 + 16 * warp + g, k0 + 16 * warp + g + 8};
    int first_key = k0 + 16 * warp;   // the warp's first key

    attention_tc_load_tile_rotated(k_tile, q_head + C, 3 * C, k0, T, HS, stride, rope_cos, rope_sin);
    attention_tc_load_tile(v_tile, q_head + 2 * C, 3 * C, k0, T, HS, stride);
    float dk[HS / 8][4] = {}, dv[HS / 8][4] = {};   // the warp's 16 keys x HS channels
    int query_tiles = (T + ATTN_TILE - 1) / ATTN_TILE;
    for (int query_tile = key_tile; query_tile < query_tiles; query_tile++) {
        int q0 = query_tile * ATTN_TILE;
        __syncthreads();   // the previous query tiles are no longer read (and k, v are complete)
        attention_tc_load_tile_rotated(q_tile, q_head, 3 * C, q0, T, HS, stride, rope_cos, rope_sin);
        attention_tc_load_tile(dout_tile, dout_head, C, q0, T, HS, stride);
        for (int i = threadIdx.x; i < ATTN_TILE; i += blockDim.x) {
            lse_tile[i] = q0 + i < T ? lse_head[q0 + i] * ATTN_LOG2E : 0.0f;   // base 2
            dsum_tile[i] = q0 + i < T ? dsum_head[q0 + i] : 0.0f;
        }
        __syncthreads();
        // the tile's queries in two halves of 32 (fewer live registers), skipping a half that lies
        // wholly before the warp's first key (all masked)
        for (int half = 0; half < 2; half++) {
            int c0 = 32 * half;   // the half's first query, in the tile
            if (q0 + c0 + 31 < first_key) continue;
            // S^T = k q^T and dP^T = v dout^T: 16 keys x 32 queries, 4 results of 8 queries each
            float st[4][4] = {}, dpt[4][4] = {};
            attention_tc_two_products<HS>(st, dpt, k_tile, v_tile, q_tile, dout_tile, stride, 16 * warp, c0, lane);
            // P^T and dS^T = P^T (dP^T - D), element by element (queries past T are masked)
            ATTN_UNROLL
            for (int n = 0; n < 4; n++) {
                ATTN_UNROLL
                for (int i = 0; i < 4; i++) {
                    int c = c0 + 8 * n + 2 * t + i % 2, query = q0 + c;
                    float p = query < T && key[i / 2] <= query ? attention_exp2(st[n][i] * scale_log2 - lse_tile[c]) : 0.0f;
                    st[n][i] = p;
                    dpt[n][i] = p * (dpt[n][i] - dsum_tile[c]);
                }
            }
            // dV += P^T dout, dK += dS^T q (P^T and dS^T rounded to bf16 as A operands)
            ATTN_UNROLL
            for (int kc = 0; kc < 2; kc++) {
                uint32_t p_frag[4], ds_frag[4];
                attention_tc_to_a(p_frag, st[2 * kc], st[2 * kc + 1]);
                attention_tc_to_a(ds_frag, dpt[2 * kc], dpt[2 * kc + 1]);
                ATTN_UNROLL
                for (int n = 0; n < HS / 8; n += 2) {
                    uint32_t dout_frag[2][2], q_frag[2][2];
                    attention_tc_load_b_pair_trans(dout_frag, dout_tile, stride, c0 + 16 * kc, 8 * n, lane);
                    attention_tc_load_b_pair_trans(q_frag, q_tile, stride, c0 + 16 * kc, 8 * n, lane);
                    ATTN_UNROLL
                    for (int i = 0; i < 2; i++) {
                        mma_bf16_16x8x16(dv[n + i], p_frag, dout_frag[i]);
                        mma_bf16_16x8x16(dk[n + i], ds_frag, q_frag[i]);
                    }
                }
            }
        }
    }
    int keys = min(16, T - first_key);   // the warp's keys before T
    bf16* dk_rows = dqkv + ((size_t)b * T + first_key) * 3 * C + C + (size_t)h * HS;
    // dv first, so that its registers are free while dk is rotated back
    attention_tc_flush<HS>(dk_rows + C, (size_t)3 * C, keys, dv, 1.0f, g, t);
    attention_tc_flush_rotated<HS>(dk_rows, (size_t)3 * C, keys, first_key, dk, scale, g, t, rope_cos, rope_sin);
}

// Blocks of pass 2 an SM should hold at once, for its register budget: 4 (128 registers a thread)
// up to head size 80, else 3 (168 registers). At 112 and 128 the shared memory holds no more
// than 3 blocks anyway (61 and 68 KB each); at 96 it would hold 4, but 128 registers made the
// pass spill (20 bytes on sm_80), and at 128 spill 88.
constexpr int attention_tc_query_blocks(int head_size) { return head_size <= 80 ? 4 : 3; }

// Backward pass 2, dq. grid (B * NH, query tiles); arguments as pass 1
template <int HS>
static __global__ void __launch_bounds__(ATTN_TC_THREADS, attention_tc_query_blocks(HS))
    attention_backward_query_tensor_core_kernel(bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse,
                                                const float* dsum, const float* rope_cos, const float* rope_sin,
                                                int T, int NH) {
    constexpr int stride = attention_tc_stride(HS);
    DYNAMIC_SHARED(bf16, shared);
    bf16* q_tile = shared;                              // (64 queries, stride)
    bf16* dout_tile = q_tile + ATTN_TILE * stride;      // (64 queries, stride)
    bf16* k_tile = dout_tile + ATTN_TILE * stride;      // (64 keys, stride)
    bf16* v_tile = k_tile + ATTN_TILE * stride;         // (64 keys, stride)
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    int b = blockIdx.x / NH, h = blockIdx.x % NH;
    int query_tile = gridDim.y - 1 - blockIdx.y;   // longest rows first
    int q0 = query_tile * ATTN_TILE;
    int C = NH * HS;
    float scale = 1.0f / sqrtf((float)HS), scale_log2 = scale * ATTN_LOG2E;
    const bf16* q_head = qkv + (size_t)b * T * 3 * C + (size_t)h * HS;
    const bf16* dout_head = dout + (size_t)b * T * C + (size_t)h * HS;
    // the lane's two queries, and their lse (base 2) and D
    int row[2] = {q0 + 16 * warp + g, q0 + 16 * warp + g + 8};
    int last_row = q0 + 16 * warp + 15;
    float row_lse[2], row_dsum[2];
    ATTN_UNROLL
    for (int j = 0; j < 2; j++) {
        row_lse[j] = row[j] < T ? lse[((size_t)b * NH + h) * T + row[j]] * ATTN_LOG2E : 0.0f;
        row_dsum[j] = row[j] < T ? dsum[((size_t)b * NH + h) * T + row[j]] : 0.0f;
    }

    attention_tc_load_tile_rotated(q_tile, q_head, 3 * C, q0, T, HS, stride, rope_cos, rope_sin);
    attention_tc_load_tile(dout_tile, dout_head, C, q0, T, HS, stride);
    float dq[HS / 8][4] = {};   // the warp's 16 queries x HS channels
    for (int key_tile = 0; key_tile <= query_tile; key_tile++) {
        int k0 = key_tile * ATTN_TILE;
        __syncthreads();   // the previous key tiles are no longer read (and q, dout are complete)
        attention_tc_load_tile_rotated(k_tile, q_head + C, 3 * C, k0, T, HS, stride, rope_cos, rope_sin);
        attention_tc_load_tile(v_tile, q_head + 2 * C, 3 * C, k0, T, HS, stride);
        __syncthreads();
        // the tile's keys in two halves of 32, skipping a half wholly after the warp's last query
        for (int half = 0; half < 2; half++) {
            int c0 = 32 * half;   // the half's first key, in the tile
            if (k0 + c0 > last_row) continue;
            // S = q k^T and dP = dout v^T: 16 queries x 32 keys, 4 results of 8 keys each
            float s[4][4] = {}, dp[4][4] = {};
            attention_tc_two_products<HS>(s, dp, q_tile, dout_tile, k_tile, v_tile, stride, 16 * warp, c0, lane);
            // dS = P (dP - D), element by element (queries past T are masked)
            ATTN_UNROLL
            for (int n = 0; n < 4; n++) {
                ATTN_UNROLL
                for (int i = 0; i < 4; i++) {
                    int j = i / 2, key = k0 + c0 + 8 * n + 2 * t + i % 2;
                    float p = row[j] < T && key <= row[j] ? attention_exp2(s[n][i] * scale_log2 - row_lse[j]) : 0.0f;
                    dp[n][i] = p * (dp[n][i] - row_dsum[j]);
                }
            }
            // dQ += dS k (dS rounded to bf16 as A operands)
            ATTN_UNROLL
            for (int kc = 0; kc < 2; kc++) {
                uint32_t ds_frag[4];
                attention_tc_to_a(ds_frag, dp[2 * kc], dp[2 * kc + 1]);
                ATTN_UNROLL
                for (int n = 0; n < HS / 8; n += 2) {
                    uint32_t k_frag[2][2];
                    attention_tc_load_b_pair_trans(k_frag, k_tile, stride, c0 + 16 * kc, 8 * n, lane);
                    mma_bf16_16x8x16(dq[n], ds_frag, k_frag[0]);
                    mma_bf16_16x8x16(dq[n + 1], ds_frag, k_frag[1]);
                }
            }
        }
    }
    int queries = min(16, T - (q0 + 16 * warp));
    bf16* dq_rows = dqkv + ((size_t)b * T + q0 + 16 * warp) * 3 * C + (size_t)h * HS;
    attention_tc_flush_rotated<HS>(dq_rows, (size_t)3 * C, queries, q0 + 16 * warp, dq, scale, g, t, rope_cos,
                                   rope_sin);
}

// ---- tensor-core launchers

// q, k and v tiles
inline size_t attention_forward_tensor_core_shared_bytes(int head_size) {
    return (size_t)3 * ATTN_TILE * attention_tc_stride(head_size) * sizeof(bf16);
}
// k, v, q and dout tiles, and the query tile's lse and D
inline size_t attention_backward_key_value_tensor_core_shared_bytes(int head_size) {
    return (size_t)4 * ATTN_TILE * attention_tc_stride(head_size) * sizeof(bf16) + 2 * ATTN_TILE * sizeof(float);
}
// q, dout, k and v tiles
inline size_t attention_backward_query_tensor_core_shared_bytes(int head_size) {
    return (size_t)4 * ATTN_TILE * attention_tc_stride(head_size) * sizeof(bf16);
}

inline void attention_tensor_core_check_head_size(int head_size) {
    if (!attention_tensor_core_supports(head_size))
        fail("the tensor-core attention supports head sizes 16, 32, .., %d, got %d", ATTN_MAX_HEAD_SIZE, head_size);
}

// Whether the kernels can apply RoPE themselves: qkv and both tables 16-byte aligned (every row
// then is: rows are 3C bf16 apart, C a multiple of 16, and table rows hs/2 floats, a multiple of 8),
// as every buffer the model makes is (attention_tc_load_tile_rotated)
inline bool attention_tc_rope_fits(const bf16* qkv, const float* rope_cos, const float* rope_sin) {
    uintptr_t addresses = reinterpret_cast<uintptr_t>(qkv) | reinterpret_cast<uintptr_t>(rope_cos) |
                          reinterpret_cast<uintptr_t>(rope_sin);
    return addresses % 16 == 0;
}
inline void attention_tc_check_rope(const bf16* qkv, const float* rope_cos, const float* rope_sin) {
    if ((rope_cos == nullptr) != (rope_sin == nullptr))
        fail("the tensor-core attention takes both RoPE tables or neither (rope_cos %p, rope_sin %p)",
             (const void*)rope_cos, (const void*)rope_sin);
    if (rope_cos != nullptr && !attention_tc_rope_fits(qkv, rope_cos, rope_sin))
        fail("the tensor-core attention applies RoPE only to a 16-byte aligned qkv with 16-byte aligned tables "
             "(qkv %p, rope_cos %p, rope_sin %p); rotate q and k first (rope_forward) and pass no tables",
             (const void*)qkv, (const void*)rope_cos, (const void*)rope_sin);
}

// Launcher<HS>::launch(args...) with the head size as a template argument (16, 32, .., 128)
template <template <int> class Launcher, typename... Args>
inline void attention_tc_dispatch(int head_size, Args... args) {
    attention_tensor_core_check_head_size(head_size);
    switch (head_size) {
        case 16: Launcher<16>::launch(args...); break;
        case 32: Launcher<32>::launch(args...); break;
        case 48: Launcher<48>::launch(args...); break;
        case 64: Launcher<64>::launch(args...); break;
        case 80: Launcher<80>::launch(args...); break;
        case 96: Launcher<96>::launch(args...); break;
        case 112: Launcher<112>::launch(args...); break;
        case 128: Launcher<128>::launch(args...); break;
    }
}

template <int HS>
struct AttentionForwardTensorCore {
    static void launch(bf16* out, float* lse, const bf16* qkv, const float* rope_cos, const float* rope_sin, int B,
                       int T, int NH, cudaStream_t stream) {
        size_t shared_bytes = attention_forward_tensor_core_shared_bytes(HS);
        CUDA_CHECK(cudaFuncSetAttribute(attention_forward_tensor_core_kernel<HS>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, (int)shared_bytes));
        LAUNCH(attention_forward_tensor_core_kernel<HS>, dim3(B * NH, ceil_div(T, ATTN_TILE)), dim3(ATTN_TC_THREADS),
               shared_bytes, stream, out, lse, qkv, rope_cos, rope_sin, T, NH);
    }
};

template <int HS>
struct AttentionBackwardTensorCore {
    static void launch(bf16* dqkv, const float* dsum, const bf16* dout, const bf16* qkv, const float* lse,
                       const float* rope_cos, const float* rope_sin, int B, int T, int NH, cudaStream_t stream) {
        dim3 grid(B * NH, ceil_div(T, ATTN_TILE));
        size_t key_value_bytes = attention_backward_key_value_tensor_core_shared_bytes(HS);
        CUDA_CHECK(cudaFuncSetAttribute(attention_backward_key_value_tensor_core_kernel<HS>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, (int)key_value_bytes));
        LAUNCH(attention_backward_key_value_tensor_core_kernel<HS>, grid, dim3(ATTN_TC_THREADS), key_value_bytes,
               stream, dqkv, dout, qkv, lse, dsum, rope_cos, rope_sin, T, NH);
        size_t query_bytes = attention_backward_query_tensor_core_shared_bytes(HS);
        CUDA_CHECK(cudaFuncSetAttribute(attention_backward_query_tensor_core_kernel<HS>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, (int)query_bytes));
        LAUNCH(attention_backward_query_tensor_core_kernel<HS>, grid, dim3(ATTN_TC_THREADS), query_bytes, stream,
               dqkv, dout, qkv, lse, dsum, rope_cos, rope_sin, T, NH);
    }
};

// out (B, T, C); lse (B, NH, T) saved for backward; qkv (B, T, 3C), left as it is; rope_cos,
// rope_sin (T, hs/2): RoPE's tables, applied to q and k as they are loaded (nullptr: qkv holds them
// rotated already)
inline void attention_forward_tensor_core(bf16* out, float* lse, const bf16* qkv, const float* rope_cos,
                                          const float* rope_sin, int B, int T, int NH, int head_size,
                                          cudaStream_t stream) {
    attention_tc_check_rope(qkv, rope_cos, rope_sin);
    attention_tc_dispatch<AttentionForwardTensorCore>(head_size, out, lse, qkv, rope_cos, rope_sin, B, T, NH, stream);
}

// dqkv (B, T, 3C) written (dq and dk rotated back by RoPE's inverse where there are tables);
// scratch (B, NH, T) floats; dout (B, T, C); qkv (B, T, 3C), out (B, T, C) and lse (B, NH, T) from a
// fused forward (either kind: both save the same lse), rope_cos and rope_sin as it had them
inline void attention_backward_tensor_core(bf16* dqkv, float* scratch, const bf16* dout, const bf16* qkv,
                                           const bf16* out, const float* lse, const float* rope_cos,
                                           const float* rope_sin, int B, int T, int NH, int head_size,
                                           cudaStream_t stream) {
    attention_tensor_core_check_head_size(head_size);
    attention_tc_check_rope(qkv, rope_cos, rope_sin);
    float* dsum = scratch;   // (B, NH, T): D, the pre-pass
    attention_dsum(dsum, dout, out, B, T, NH, head_size, stream);
    attention_tc_dispatch<AttentionBackwardTensorCore>(head_size, dqkv, (const float*)dsum, dout, qkv, lse, rope_cos,
                                                       rope_sin, B, T, NH, stream);
}

// ---- the fused attention as the model calls it, RoPE included: on the tensor cores where they
// apply (bf16, head sizes a multiple of 16 up to 128), otherwise the CUDA-core kernels.
// qkv holds q and k before RoPE; rope_cos, rope_sin (T, hs/2) are its tables. The tensor-core
// kernels rotate q and k as they load them and dq and dk back as they write them, and leave qkv as
// it is. The CUDA-core kernels (and the tensor-core ones on buffers not 16-byte aligned, which the
// model never makes) read q and k rotated in memory: on their path the forward rotates qkv in place
// first (rope_forward) and the backward rotates dq and dk back after (rope_backward). Either way
// the backward takes qkv as the forward left it. rope_cos nullptr: q and k are rotated already, and
// neither function applies RoPE.

// whether RoPE happens inside the kernels (see above)
template <typename floatX>
inline bool attention_fused_rotates_inside(const floatX* qkv, const float* rope_cos, const float* rope_sin,
                                           int head_size) {
    if constexpr (std::is_same_v<floatX, bf16>)
        return attention_tensor_core_supports(head_size) && attention_tc_rope_fits(qkv, rope_cos, rope_sin);
    return false;
}

// out (B, T, C); lse (B, NH, T) saved for backward; qkv (B, T, 3C)
template <typename floatX>
inline void attention_forward_fused(floatX* out, float* lse, floatX* qkv, const float* rope_cos, const float* rope_sin,
                                    int B, int T, int NH, int head_size, cudaStream_t stream) {
    if (rope_cos != nullptr && !attention_fused_rotates_inside(qkv, rope_cos, rope_sin, head_size)) {
        rope_forward(qkv, rope_cos, rope_sin, B, T, NH, head_size, stream);   // q and k rotated in memory
        rope_cos = rope_sin = nullptr;
    }
    if constexpr (std::is_same_v<floatX, bf16>) {
        if (attention_tensor_core_supports(head_size)) {
            attention_forward_tensor_core(out, lse, qkv, rope_cos, rope_sin, B, T, NH, head_size, stream);
            return;
        }
    }
    attention_forward_fused_cuda_cores(out, lse, qkv, B, T, NH, head_size, stream);
}

// dqkv (B, T, 3C) written, the gradient of qkv before RoPE; scratch (B, NH, T) floats; dout (B, T, C);
// qkv, out, lse, rope_cos and rope_sin as the forward had or left them
template <typename floatX>
inline void attention_backward_fused(floatX* dqkv, float* scratch, const floatX* dout, const floatX* qkv,
                                     const floatX* out, const float* lse, const float* rope_cos, const float* rope_sin,
                                     int B, int T, int NH, int head_size, cudaStream_t stream) {
    bool rotate_after = rope_cos != nullptr && !attention_fused_rotates_inside(qkv, rope_cos, rope_sin, head_size);
    bool on_tensor_cores = false;
    if constexpr (std::is_same_v<floatX, bf16>) {
        on_tensor_cores = attention_tensor_core_supports(head_size);
        if (on_tensor_cores)
            attention_backward_tensor_core(dqkv, scratch, dout, qkv, out, lse, rotate_after ? nullptr : rope_cos,
                                           rotate_after ? nullptr : rope_sin, B, T, NH, head_size, stream);
    }
    if (!on_tensor_cores)
        attention_backward_fused_cuda_cores(dqkv, scratch, dout, qkv, out, lse, B, T, NH, head_size, stream);
    if (rotate_after) rope_backward(dqkv, rope_cos, rope_sin, B, T, NH, head_size, stream);
}

#endif
