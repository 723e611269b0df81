/*
RMSNorm: y = w * x / sqrt(mean(x^2) + eps), one row of C values at a time (no mean subtraction,
no bias, as in LLaMA).

Every decoder layer owns two of these and a final one sits before the LM head. Pre-LN layers
normalise the residual stream before each sublayer; Post-LN layers normalise the sum after the
residual add. The kernels are the same either way: model.h decides where they are called.

The rows need not be packed: rmsnorm_forward and rmsnorm_backward take a row stride (stride >= C;
the elements between rows are neither read nor written), so that HybridNorm's QKV-Norm (model.h)
normalises q, k and v where they lie in qkv's (B, T, 3C) rows, stride 3C, with no copies.

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
    dinp  += rstd * (g - xhat * mean(g * xhat))    (or = where accumulate is false, below)
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
    fixed order, so the result is deterministic. With accumulate false the backward writes dinp
    (dinp[i] = round(value), the old value never read): the model passes it where the norm's
    input gradient has no other term (a Post-LN layer's norms, the final norm, Peri-LN's output
    norms), so the buffer needs no zeroing first and no read of the zeros.
*/
#pragma once

#include <algorithm>
#include <cmath>

#include "../common.h"

// ---- CPU reference

// out (N, C), rstd (N) saved for backward, inp (N, C), weight (C); the rows of out and inp are
// `stride` elements apart (stride >= C; C where they are packed, 3C for one of q, k, v in qkv)
template <typename T>
inline void rmsnorm_forward_cpu(T* out, real* rstd, const T* inp, const T* weight, int N, int C, int stride, float eps) {
    #pragma omp parallel for
    for (int i = 0; i < N; i++) {
        const T* x = inp + (size_t)i * stride;
        T* y = out + (size_t)i * stride;
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

// Rows of the backward's scratch buffer: the CUDA kernel's blocks each sum the weight gradient
// over their rows into one row of it (see rmsnorm_backward_vector_kernel).
constexpr int RMSNORM_PARTIAL_BLOCKS = 512;

// dinp (N, C) += (accumulate) or =, dweight (C) +=; dout (N, C), inp (N, C), weight (C), rstd (N)
// from forward; the rows of dinp, dout and inp `stride` apart, as in the forward; scratch
// (RMSNORM_PARTIAL_BLOCKS, C) is the CUDA kernels' (this reference sums the rows directly and
// leaves it alone)
template <typename T, typename G>
inline void rmsnorm_backward_cpu(T* dinp, G* dweight, real* scratch, const T* dout, const T* inp, const T* weight,
                                 const real* rstd, int N, int C, int stride, bool accumulate) {
    (void)scratch;
    // input gradient: rows are independent
    #pragma omp parallel for
    for (int i = 0; i < N; i++) {
        const T* x = inp + (size_t)i * stride;
        const T* dy = dout + (size_t)i * stride;
        T* dx = dinp + (size_t)i * stride;
        real r = rstd[i];
        // mean over the row of g * xhat, the part of the gradient along x itself (in double, in
        // SIMD lanes: a fixed order per build)
        double dot = 0.0;
        #pragma omp simd reduction(+ : dot)
        for (int c = 0; c < C; c++) dot += (double)(to_real(dy[c]) * to_real(weight[c])) * (to_real(x[c]) * r);
        real mean_dot = (real)(dot / C);
        // accumulate: read, add in real, round once (or write: round once)
        for (int c = 0; c < C; c++) {
            real g = to_real(dy[c]) * to_real(weight[c]);
            real old = accumulate ? to_real(dx[c]) : real(0);
            dx[c] = from_real<T>(old + r * (g - to_real(x[c]) * r * mean_dot));
        }
    }
    // weight gradient: a sum over rows, so parallelise over channels instead: a thread takes a
    // block of channels and walks the rows in order, the block's sums side by side
    constexpr int CHANNELS = 32;
    #pragma omp parallel for
    for (int c0 = 0; c0 < C; c0 += CHANNELS) {
        int channels = std::min(CHANNELS, C - c0);
        double sums[CHANNELS] = {};
        for (int i = 0; i < N; i++) {
            const T* dy = dout + (size_t)i * stride + c0;
            const T* x = inp + (size_t)i * stride + c0;
            real r = rstd[i];
            #pragma omp simd
            for (int c = 0; c < channels; c++) sums[c] += (double)to_real(dy[c]) * (to_real(x[c]) * r);
        }
        for (int c = 0; c < channels; c++) dweight[c0 + c] = from_real<G>(to_real(dweight[c0 + c]) + (real)sums[c]);
    }
}

#if defined(__CUDACC__) || defined(MIXLN_CUDA_EMULATION)
#include <cstdint>
#include <cstring>

#include "../cuda_common.h"

// ---- CUDA kernels
/*
The row kernels (rmsnorm_forward, residual_rmsnorm_forward, the input gradient) give each row to
one warp and are pure memory traffic: LLaMA-71M's bf16 step normalises B*T = 16384 rows of C = 512
channels, 32 to 64 MB per call. With lanes taking channels lane, lane + 32, ... as 2-byte loads a
warp's request carries 64 bytes, and on an H200 the input gradient took ~50 us for its 64 MB
(ideal ~18) and residual_rmsnorm_forward ~32 us. So each has a 16-byte path: a lane takes whole
16-byte chunks of the row (RMSNORM_VEC: 8 bf16 or 4 floats), chunks lane, lane + 32, ..., so that
one warp load moves 512 contiguous bytes, and issues all its loads of a group of chunks before
using any.

The 16-byte path applies when the rows are whole aligned chunks: C and the row stride multiples
of RMSNORM_VEC and every row pointer 16-byte aligned (rmsnorm_vectors_apply; cudaMalloc's pointers
are, and the model's tensors, and q, k and v inside qkv, start at multiples of C from them).
Otherwise the launcher takes the original channel-strided kernel, kept as the fallback (odd C,
C = 13, a pointer into the middle of a row).
The math per element is the same on both; the row sums (of squares, of g * xhat) add each lane's
channels in a different order, so they differ from the fallback's in the last float bits.

A row is taken in groups of 32 lanes x RMSNORM_LANE_CHUNKS chunks, 512 channels: one group for
LLaMA-71M. The first pass loads and sums the groups in order and keeps the last group's values
in registers; the second pass runs the groups backwards from that one, reloading the others
(just read, so from L1 or L2). A row of one group is read from memory once.
*/

// values of T in one 16-byte chunk (Vector16, cuda_common.h): 8 bf16 or 4 floats
template <typename T>
constexpr int RMSNORM_VEC = VECTOR16_SIZE<T>;
// chunks per lane per group: a group spans 512 channels (bf16: 2 chunks, float: 4)
template <typename T>
constexpr int RMSNORM_LANE_CHUNKS = 512 / 32 / RMSNORM_VEC<T>;

// Fallback: one warp per row, lanes stride over the C channels, a shuffle reduction sums the
// squares. Rows past N belong to whole warps, which return together (no block barrier follows).
template <typename T>
static __global__ void rmsnorm_forward_kernel(T* out, float* rstd, const T* inp, const T* weight, int N, int C,
                                              int stride, float eps) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= N) return;
    const T* x = inp + (size_t)row * stride;
    float sum_squares = 0.0f;
    for (int c = lane; c < C; c += 32) {
        float xc = to_float(x[c]);
        sum_squares += xc * xc;
    }
    sum_squares = warp_reduce_sum(sum_squares);
    float r = 1.0f / sqrtf(sum_squares / C + eps);
    if (lane == 0) rstd[row] = r;
    for (int c = lane; c < C; c += 32)
        out[(size_t)row * stride + c] = from_float<T>(to_float(weight[c]) * (to_float(x[c]) * r));
}

// Pass 2 of the forward row kernels' 16-byte path, for one lane of the row's warp: y = weight *
// (x * r), group by group from the last, whose chunks of x and weight are still in xs and ws from
// pass 1, back to the first, reloading those (just read: from L1 or L2).
template <typename T>
__device__ __forceinline__ void rmsnorm_vector_output(T* y, const T* x, const T* weight,
                                                      Vector16<T> (&xs)[RMSNORM_LANE_CHUNKS<T>],
                                                      Vector16<T> (&ws)[RMSNORM_LANE_CHUNKS<T>], float r, int chunks,
                                                      int groups, int lane) {
    constexpr int VEC = RMSNORM_VEC<T>, U = RMSNORM_LANE_CHUNKS<T>;
    for (int g = groups - 1; g >= 0; g--) {
        KERNEL_UNROLL
        for (int u = 0; u < U; u++) {
            int k = (g * U + u) * 32 + lane;
            if (g < groups - 1 && k < chunks) {
                xs[u] = load_vector16(x + k * VEC);
                ws[u] = load_vector16(weight + k * VEC);
            }
        }
        KERNEL_UNROLL
        for (int u = 0; u < U; u++) {
            int k = (g * U + u) * 32 + lane;
            if (k >= chunks) continue;
            Vector16<T> ys;
            KERNEL_UNROLL
            for (int e = 0; e < VEC; e++)
                ys.values[e] = from_float<T>(to_float(ws[u].values[e]) * (to_float(xs[u].values[e]) * r));
            store_vector16(y + k * VEC, ys);
        }
    }
}

// 16-byte path (see above): one warp per row, lane's chunks k = lane, lane + 32, ... (channels
// k * VEC ..), the last group's inp and weight kept from the first pass for the second.
template <typename T>
static __global__ void rmsnorm_forward_vector_kernel(T* out, float* rstd, const T* inp, const T* weight, int N, int C,
                                                     int stride, float eps) {
    constexpr int VEC = RMSNORM_VEC<T>, U = RMSNORM_LANE_CHUNKS<T>;
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= N) return;
    const T* x = inp + (size_t)row * stride;
    T* y = out + (size_t)row * stride;
    const int chunks = C / VEC, groups = (chunks + 32 * U - 1) / (32 * U);
    Vector16<T> xs[U] = {}, ws[U] = {};
    // pass 1: the sum of squares, group by group, each group's loads first (and the last group's weight)
    float sum_squares = 0.0f;
    for (int g = 0; g < groups; g++) {
        KERNEL_UNROLL
        for (int u = 0; u < U; u++) {
            int k = (g * U + u) * 32 + lane;
            if (k < chunks) {
                xs[u] = load_vector16(x + k * VEC);
                if (g == groups - 1) ws[u] = load_vector16(weight + k * VEC);
            }
        }
        KERNEL_UNROLL
        for (int u = 0; u < U; u++) {
            if ((g * U + u) * 32 + lane >= chunks) continue;
            KERNEL_UNROLL
            for (int e = 0; e < VEC; e++) {
                float xc = to_float(xs[u].values[e]);
                sum_squares += xc * xc;
            }
        }
    }
    sum_squares = warp_reduce_sum(sum_squares);
    float r = 1.0f / sqrtf(sum_squares / C + eps);
    if (lane == 0) rstd[row] = r;
    // pass 2: the output, the last group from registers, then the others reloaded
    rmsnorm_vector_output<T>(y, x, weight, xs, ws, r, chunks, groups, lane);
}

// Fallback: one warp per row, as above: each lane forms the sums of its strided channels, rounds
// and writes them and sums the squares of the rounded values; after the reduction it reads back
// the very elements it wrote (no other lane touches them, so no barrier is needed; likely still in
// cache). In place is safe for the same reason: each element of x or branch is read by the one
// thread that then overwrites it.
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

// 16-byte path (see above), one warp per row: in the first pass a lane loads a group's chunks of
// x and branch, then forms, rounds and stores their sums and sums their squares as stored; the
// last group's rounded sums (and weight) stay in registers, the other groups' are read back from
// sum by the lane that wrote them. In place is safe as in the fallback: each chunk of x or branch
// is read by the one lane that then overwrites it, after all its loads of the group.
template <typename T>
static __global__ void residual_rmsnorm_forward_vector_kernel(T* sum, T* out, float* rstd, const T* x, float x_scale,
                                                              const T* branch, const T* weight, int N, int C,
                                                              float eps) {
    constexpr int VEC = RMSNORM_VEC<T>, U = RMSNORM_LANE_CHUNKS<T>;
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= N) return;
    const size_t offset = (size_t)row * C;
    const T *xr = x + offset, *br = branch + offset;
    T *s = sum + offset, *y = out + offset;
    const int chunks = C / VEC, groups = (chunks + 32 * U - 1) / (32 * U);
    Vector16<T> xs[U] = {}, bs[U] = {}, ss[U] = {}, ws[U] = {};
    // pass 1: the sums, stored, and their squares; each group's loads first
    float sum_squares = 0.0f;
    for (int g = 0; g < groups; g++) {
        KERNEL_UNROLL
        for (int u = 0; u < U; u++) {
            int k = (g * U + u) * 32 + lane;
            if (k < chunks) {
                xs[u] = load_vector16(xr + k * VEC);
                bs[u] = load_vector16(br + k * VEC);
                if (g == groups - 1) ws[u] = load_vector16(weight + k * VEC);
            }
        }
        KERNEL_UNROLL
        for (int u = 0; u < U; u++) {
            int k = (g * U + u) * 32 + lane;
            if (k >= chunks) continue;
            KERNEL_UNROLL
            for (int e = 0; e < VEC; e++)
                ss[u].values[e] = from_float<T>(x_scale * to_float(xs[u].values[e]) + to_float(bs[u].values[e]));
            store_vector16(s + k * VEC, ss[u]);
            KERNEL_UNROLL
            for (int e = 0; e < VEC; e++) {
                float sc = to_float(ss[u].values[e]);
                sum_squares += sc * sc;
            }
        }
    }
    sum_squares = warp_reduce_sum(sum_squares);
    float r = 1.0f / sqrtf(sum_squares / C + eps);
    if (lane == 0) rstd[row] = r;
    // pass 2: the norm of the stored sums, the last group from registers, then the others read back
    rmsnorm_vector_output<T>(y, s, weight, ss, ws, r, chunks, groups, lane);
}

// Fallback input gradient, one warp per row; dinp accumulates: read, add in float, round once
// (accumulate false: written, never read).
// Each lane takes its channels lane, lane + 32, ... in chunks of RMSNORM_CHUNK, issuing all of a
// chunk's loads before using any (__restrict__ lets the compiler keep them ahead of the stores):
// on an H200 the plain one-channel-at-a-time loop waited out each load's latency in turn and moved
// its 64 MB (LLaMA-71M, B 64, T 256) at 0.2 TB/s (dev/PERF.md). The sums run over the same
// channels in the same order as before, so the result is the same to the bit.
constexpr int RMSNORM_CHUNK = 8;   // channels per lane per chunk
template <typename T>
static __global__ void rmsnorm_backward_input_kernel(T* __restrict__ dinp, const T* __restrict__ dout,
                                                     const T* __restrict__ inp, const T* __restrict__ weight,
                                                     const float* __restrict__ rstd, int N, int C, int stride,
                                                     bool accumulate) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= N) return;
    const T* x = inp + (size_t)row * stride;
    const T* dy = dout + (size_t)row * stride;
    T* dx = dinp + (size_t)row * stride;
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
            old[u] = accumulate && c < C ? to_float(dx[c]) : 0.0f;
        }
        KERNEL_UNROLL
        for (int u = 0; u < RMSNORM_CHUNK; u++) {
            int c = c0 + 32 * u;
            if (c < C) dx[c] = from_float<T>(old[u] + r * (g[u] - xs[u] * r * mean_dot));
        }
    }
}

/*
16-byte path of the backward, the input gradient and the weight gradient in one pass over the rows.
The separate weight kernel below reads dout and inp a second time (32 MB a call for LLaMA-71M,
25 calls a step) and can spread only C / 16 blocks over the SMs. But in the row kernel a lane owns
the same channels in every row (chunks lane, lane + 32, ...), so it can also sum dout * xhat over
the rows its warp takes, in registers: GROUPS x RMSNORM_LANE_CHUNKS chunks of RMSNORM_VEC floats
(16 to 64 for C up to 2048). Then:
  - the grid is as many blocks as the GPU holds at once (at most RMSNORM_PARTIAL_BLOCKS): on an
    H200, 132 multiprocessors x 2 blocks of the bf16 kernel for C = 512 (97 registers on sm_90),
    so the blocks run in one wave; a block of 8 warps takes rows b * 8 + warp, then every
    gridDim.x * 8 rows after (LLaMA-71M: 16384 rows, 7 or 8 per warp);
  - at the end its warps add their sums into shared memory in warp order, and the block writes
    its partial sums, one row of C floats of the scratch buffer (RMSNORM_PARTIAL_BLOCKS, C);
  - rmsnorm_weight_partials_kernel adds the blocks' rows in block order into dweight.
Every sum runs in a fixed order, so the result is deterministic; the order differs from the CPU's
row by row sum, so the weight gradient agrees with it to float rounding, not bitwise.

GROUPS is the number of 512-channel groups of a row as a template argument (1 to 4: C up to 2048,
every paper config), so that the accumulators are registers. GROUPS = 0 is the input gradient
alone for any C, one row per warp, with the weight gradient left to the weight kernel below.

The input gradient: the first pass loads a group's chunks of dout, weight and inp, and for the
last group also dinp (when accumulating), all before the reduction; the second pass accumulates
into (or writes) dinp, the last group from registers, the others reloaded. The same expressions
per element as the fallback.
*/
constexpr int RMSNORM_FUSED_MAX_GROUPS = 4;    // C up to 2048 takes the fused kernel
constexpr int RMSNORM_BACKWARD_WARPS = 8;      // warps (rows at a time) per block of the row kernels

template <typename T, int GROUPS>
static __global__ void __launch_bounds__(RMSNORM_BACKWARD_WARPS * 32)
    rmsnorm_backward_vector_kernel(T* __restrict__ dinp, float* __restrict__ dweight_partials,
                                   const T* __restrict__ dout, const T* __restrict__ inp,
                                   const T* __restrict__ weight, const float* __restrict__ rstd, int N, int C,
                                   int stride, bool accumulate) {
    constexpr int VEC = RMSNORM_VEC<T>, U = RMSNORM_LANE_CHUNKS<T>, WARPS = RMSNORM_BACKWARD_WARPS;
    constexpr bool FUSED = GROUPS > 0;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int chunks = C / VEC, groups = FUSED ? GROUPS : (chunks + 32 * U - 1) / (32 * U);
    // the weight gradient's sums over this warp's rows, of the lane's channels (chunk (g * U + u) * 32 + lane)
    float dweight_sums[FUSED ? GROUPS : 1][U][VEC] = {};
    for (int row = blockIdx.x * WARPS + warp; row < N; row += gridDim.x * WARPS) {
        const T* x = inp + (size_t)row * stride;
        const T* dy = dout + (size_t)row * stride;
        T* dx = dinp + (size_t)row * stride;
        float r = rstd[row];
        Vector16<T> dys[U] = {}, ws[U] = {}, xs[U] = {}, olds[U] = {};
        // pass 1: mean over the channels of g * xhat, g = dout * w
        float dot = 0.0f;
        for (int g = 0; g < groups; g++) {
            KERNEL_UNROLL
            for (int u = 0; u < U; u++) {
                int k = (g * U + u) * 32 + lane;
                if (k < chunks) {
                    dys[u] = load_vector16(dy + k * VEC);
                    ws[u] = load_vector16(weight + k * VEC);
                    xs[u] = load_vector16(x + k * VEC);
                    if (accumulate && g == groups - 1) olds[u] = load_vector16(dx + k * VEC);
                }
            }
            KERNEL_UNROLL
            for (int u = 0; u < U; u++) {
                if ((g * U + u) * 32 + lane >= chunks) continue;
                KERNEL_UNROLL
                for (int e = 0; e < VEC; e++) {
                    float ge = to_float(dys[u].values[e]) * to_float(ws[u].values[e]);
                    dot += ge * (to_float(xs[u].values[e]) * r);
                }
            }
        }
        float mean_dot = warp_reduce_sum(dot) / C;
        // pass 2: dinp += rstd * (g - xhat * mean_dot), the last group from registers; and the
        // weight gradient's terms dout * xhat
        KERNEL_UNROLL
        for (int g = groups - 1; g >= 0; g--) {
            KERNEL_UNROLL
            for (int u = 0; u < U; u++) {
                int k = (g * U + u) * 32 + lane;
                if (g < groups - 1 && k < chunks) {
                    dys[u] = load_vector16(dy + k * VEC);
                    ws[u] = load_vector16(weight + k * VEC);
                    xs[u] = load_vector16(x + k * VEC);
                    if (accumulate) olds[u] = load_vector16(dx + k * VEC);
                }
            }
            KERNEL_UNROLL
            for (int u = 0; u < U; u++) {
                int k = (g * U + u) * 32 + lane;
                if (k >= chunks) continue;
                Vector16<T> news;
                KERNEL_UNROLL
                for (int e = 0; e < VEC; e++) {
                    float dye = to_float(dys[u].values[e]), xe = to_float(xs[u].values[e]);
                    float ge = dye * to_float(ws[u].values[e]);
                    float old = accumulate ? to_float(olds[u].values[e]) : 0.0f;
                    news.values[e] = from_float<T>(old + r * (ge - xe * r * mean_dot));
                    if constexpr (FUSED) dweight_sums[g][u][e] += dye * (xe * r);
                }
                store_vector16(dx + k * VEC, news);
            }
        }
    }
    if constexpr (FUSED) {
        // the block's sums: its warps' added in warp order into shared memory, then one row of the scratch
        __shared__ float block_sums[GROUPS * 32 * U * VEC];
        for (int w = 0; w < WARPS; w++) {
            if (warp == w)
                KERNEL_UNROLL
                for (int g = 0; g < GROUPS; g++)
                    KERNEL_UNROLL
                    for (int u = 0; u < U; u++) {
                        int k = (g * U + u) * 32 + lane;
                        if (k >= chunks) continue;
                        KERNEL_UNROLL
                        for (int e = 0; e < VEC; e++) {
                            float* total = &block_sums[k * VEC + e];
                            *total = (w == 0 ? 0.0f : *total) + dweight_sums[g][u][e];
                        }
                    }
            __syncthreads();
        }
        for (int c = threadIdx.x; c < C; c += blockDim.x) dweight_partials[(size_t)blockIdx.x * C + c] = block_sums[c];
    }
}

// The fused backward's second step: dweight[c] += the sum of the blocks' partial sums (blocks rows
// of the scratch buffer), in block order per row group of column_reduce's scheme, then the groups
// in order.
template <typename G>
static __global__ void __launch_bounds__(COLUMN_THREADS)
    rmsnorm_weight_partials_kernel(G* dweight, const float* __restrict__ dweight_partials, int blocks, int C) {
    __shared__ float partials[COLUMN_THREADS];
    int c = blockIdx.x * COLUMN_CHANNELS + threadIdx.x % COLUMN_CHANNELS, group = threadIdx.x / COLUMN_CHANNELS;
    float sum = 0.0f;
    if (c < C)
        for (int b = group; b < blocks; b += COLUMN_ROW_GROUPS) sum += dweight_partials[(size_t)b * C + c];
    sum = column_reduce(sum, partials);
    if (group == 0 && c < C) dweight[c] = from_float<G>(to_float(dweight[c]) + sum);
}

/*
Weight gradient on its own, for the shapes the fused kernel above does not take (C over 2048, or
rows off the 16-byte path): dweight[c] += sum over the N rows of dout * xhat, in float, in a fixed
order (deterministic: no atomics, and no scratch buffer, so each channel belongs to one block). A block of 1024 threads owns 16 adjacent channels, 32 bytes of a
bf16 row, one 32-byte memory sector: C / 16 blocks, 32 for LLaMA-71M, so one block per SM on 32
of the H200's 132 SMs. Fewer channels per block would use more SMs but read part sectors; what
decides the speed is then the bytes each of these SMs keeps in flight (Little's law: ~4 TB/s x
~1 us of latency under load is several MB over the GPU, ~100 KB for each of 32 SMs). The first
version (column_reduce's scheme: 64 row groups of 16 threads, one 2-byte load of dout and of inp
and a 4-byte rstd at a time per thread) had ~8 KB in flight per SM and took ~53 us for 32 MB
(ideal ~10).

So, where the rows are whole aligned 16-byte chunks (rmsnorm_vectors_apply), the vector kernel:
a thread takes one 16-byte chunk (8 bf16 or 4 float channels) of rows group, group + GROUPS, ...
(GROUPS = 512 in bf16, 256 in float), and issues the loads of RMSNORM_WEIGHT_ROWS of its rows
(dout, inp, rstd) before summing them in row order: 1024 x 4 x 32 bytes = 128 KB in flight per
block, within the 64 registers a 1024-thread block allows (8 rows would take ~72; ptxas: 61 to
64 in bf16, no spills). The row groups' sums are then added in a fixed tree: a butterfly over
the lanes of a warp that hold the same channels, then the 32 warps' sums in warp order.
The fallback (other shapes) keeps column_reduce's scheme and sums, and also issues
RMSNORM_WEIGHT_ROWS rows' loads at a time, summed in the same order as before: the same bits as
the first version.
*/
constexpr int RMSNORM_WEIGHT_ROWS = 4;          // rows whose loads a thread issues before summing them
constexpr int RMSNORM_WEIGHT_CHANNELS = 16;     // channels per block of the vector kernel
constexpr int RMSNORM_WEIGHT_THREADS = 1024;    // threads per block of the vector kernel

// fallback: a block per 16 channels, 64 row groups each summing its rows in order, then the
// groups' sums added in order (column_reduce in cuda_common.h) and the total accumulated into dweight
template <typename T, typename G>
static __global__ void __launch_bounds__(COLUMN_THREADS)
    rmsnorm_backward_weight_kernel(G* dweight, const T* __restrict__ dout, const T* __restrict__ inp,
                                   const float* __restrict__ rstd, int N, int C, int stride) {
    __shared__ float partials[COLUMN_THREADS];
    int c = blockIdx.x * COLUMN_CHANNELS + threadIdx.x % COLUMN_CHANNELS, group = threadIdx.x / COLUMN_CHANNELS;
    float sum = 0.0f;
    if (c < C)
        for (int i0 = group; i0 < N; i0 += COLUMN_ROW_GROUPS * RMSNORM_WEIGHT_ROWS) {
            // rows i0, i0 + 64, ...: their loads first, then their terms in row order
            float dy[RMSNORM_WEIGHT_ROWS], x[RMSNORM_WEIGHT_ROWS], r[RMSNORM_WEIGHT_ROWS];
            KERNEL_UNROLL
            for (int u = 0; u < RMSNORM_WEIGHT_ROWS; u++) {
                int i = i0 + u * COLUMN_ROW_GROUPS;
                dy[u] = i < N ? to_float(dout[(size_t)i * stride + c]) : 0.0f;
                x[u] = i < N ? to_float(inp[(size_t)i * stride + c]) : 0.0f;
                r[u] = i < N ? rstd[i] : 0.0f;
            }
            KERNEL_UNROLL
            for (int u = 0; u < RMSNORM_WEIGHT_ROWS; u++)
                if (i0 + u * COLUMN_ROW_GROUPS < N) sum += dy[u] * (x[u] * r[u]);
        }
    sum = column_reduce(sum, partials);
    if (group == 0 && c < C) dweight[c] = from_float<G>(to_float(dweight[c]) + sum);
}

// vector kernel (see above): thread t takes the chunk `part` = t % PARTS of the block's 16
// channels (PARTS = 2 in bf16, 4 in float) in the rows of row group t / PARTS
template <typename T, typename G>
static __global__ void __launch_bounds__(RMSNORM_WEIGHT_THREADS)
    rmsnorm_backward_weight_vector_kernel(G* dweight, const T* __restrict__ dout, const T* __restrict__ inp,
                                          const float* __restrict__ rstd, int N, int C, int stride) {
    constexpr int VEC = RMSNORM_VEC<T>, PARTS = RMSNORM_WEIGHT_CHANNELS / VEC, GROUPS = RMSNORM_WEIGHT_THREADS / PARTS;
    constexpr int ROWS = RMSNORM_WEIGHT_ROWS, WARPS = RMSNORM_WEIGHT_THREADS / 32;
    __shared__ float partials[WARPS][RMSNORM_WEIGHT_CHANNELS];
    int part = threadIdx.x % PARTS, group = threadIdx.x / PARTS;
    int c0 = blockIdx.x * RMSNORM_WEIGHT_CHANNELS + part * VEC;   // the chunk's first channel
    float sum[VEC] = {};
    if (c0 < C)
        for (int i0 = group; i0 < N; i0 += GROUPS * ROWS) {
            // rows i0, i0 + GROUPS, ...: their loads first, then their terms in row order
            Vector16<T> dys[ROWS] = {}, xs[ROWS] = {};
            float r[ROWS] = {};
            KERNEL_UNROLL
            for (int u = 0; u < ROWS; u++) {
                int i = i0 + u * GROUPS;
                if (i < N) {
                    dys[u] = load_vector16(dout + (size_t)i * stride + c0);
                    xs[u] = load_vector16(inp + (size_t)i * stride + c0);
                    r[u] = rstd[i];
                }
            }
            KERNEL_UNROLL
            for (int u = 0; u < ROWS; u++) {
                if (i0 + u * GROUPS >= N) continue;
                KERNEL_UNROLL
                for (int e = 0; e < VEC; e++) sum[e] += to_float(dys[u].values[e]) * (to_float(xs[u].values[e]) * r[u]);
            }
        }
    // the warp's row groups: a butterfly over the lanes holding the same chunk (lane % PARTS),
    // which leaves every such lane the same sum
    KERNEL_UNROLL
    for (int e = 0; e < VEC; e++)
        for (int offset = PARTS; offset < 32; offset *= 2) sum[e] += __shfl_xor_sync(0xffffffffu, sum[e], offset);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane < PARTS)
        for (int e = 0; e < VEC; e++) partials[warp][part * VEC + e] = sum[e];
    __syncthreads();
    // the warps' sums in warp order, one thread per channel
    if (threadIdx.x < RMSNORM_WEIGHT_CHANNELS) {
        int c = blockIdx.x * RMSNORM_WEIGHT_CHANNELS + threadIdx.x;
        float total = 0.0f;
        for (int w = 0; w < WARPS; w++) total += partials[w][threadIdx.x];
        if (c < C) dweight[c] = from_float<G>(to_float(dweight[c]) + total);
    }
}

// ---- launchers

// Whether the 16-byte kernels apply: C and the row stride multiples of the chunk and every
// pointer 16-byte aligned, so that every row of every tensor is whole aligned chunks.
template <typename T, typename... Pointers>
inline bool rmsnorm_vectors_apply(int C, int stride, const Pointers*... pointers) {
    uintptr_t addresses = (reinterpret_cast<uintptr_t>(pointers) | ...);
    return C % RMSNORM_VEC<T> == 0 && stride % RMSNORM_VEC<T> == 0 && addresses % 16 == 0;
}

// rows of C values `stride` elements apart in out and inp (stride >= C; the elements between
// rows are neither read nor written)
template <typename T>
inline void rmsnorm_forward(T* out, float* rstd, const T* inp, const T* weight, int N, int C, int stride, float eps,
                            cudaStream_t stream) {
    const int block = 256;   // 8 rows per block
    dim3 grid(ceil_div(N, block / 32));
    if (rmsnorm_vectors_apply<T>(C, stride, out, inp, weight))
        LAUNCH(rmsnorm_forward_vector_kernel<T>, grid, dim3(block), 0, stream, out, rstd, inp, weight, N, C, stride, eps);
    else
        LAUNCH(rmsnorm_forward_kernel<T>, grid, dim3(block), 0, stream, out, rstd, inp, weight, N, C, stride, eps);
}

template <typename T>
inline void residual_rmsnorm_forward(T* sum, T* out, float* rstd, const T* x, float x_scale, const T* branch,
                                     const T* weight, int N, int C, float eps, cudaStream_t stream) {
    const int block = 256;   // 8 rows per block
    dim3 grid(ceil_div(N, block / 32));
    if (rmsnorm_vectors_apply<T>(C, C, sum, out, x, branch, weight))
        LAUNCH(residual_rmsnorm_forward_vector_kernel<T>, grid, dim3(block), 0, stream, sum, out, rstd, x, x_scale,
               branch, weight, N, C, eps);
    else
        LAUNCH(residual_rmsnorm_forward_kernel<T>, grid, dim3(block), 0, stream, sum, out, rstd, x, x_scale, branch,
               weight, N, C, eps);
}

// scratch (RMSNORM_PARTIAL_BLOCKS, C): the fused kernel's partial sums of the weight gradient;
// accumulate: dinp += (true) or = (false); rows `stride` apart in dinp, dout and inp, as in the forward
template <typename T, typename G>
inline void rmsnorm_backward(T* dinp, G* dweight, float* scratch, const T* dout, const T* inp, const T* weight,
                             const float* rstd, int N, int C, int stride, bool accumulate, cudaStream_t stream) {
    const int block = RMSNORM_BACKWARD_WARPS * 32, row_blocks = ceil_div(N, RMSNORM_BACKWARD_WARPS);
    const bool vectors = rmsnorm_vectors_apply<T>(C, stride, dinp, dout, inp, weight);
    const int groups = ceil_div(C / RMSNORM_VEC<T>, 32 * RMSNORM_LANE_CHUNKS<T>);
    if (vectors && groups >= 1 && groups <= RMSNORM_FUSED_MAX_GROUPS) {
        // the fused kernel (up to RMSNORM_PARTIAL_BLOCKS blocks, each walking its rows), then the blocks' sums
        static_assert(RMSNORM_FUSED_MAX_GROUPS == 4, "one kernel per number of groups below");
        decltype(&rmsnorm_backward_vector_kernel<T, 1>) fused_kernels[] = {
            rmsnorm_backward_vector_kernel<T, 1>, rmsnorm_backward_vector_kernel<T, 2>,
            rmsnorm_backward_vector_kernel<T, 3>, rmsnorm_backward_vector_kernel<T, 4>};
        // as many blocks as fit on the GPU at once, each walking its rows: one wave, no tail of
        // blocks running on a few multiprocessors (the count depends on the device, not on the data,
        // so results are deterministic on a given GPU)
        int device = 0, multiprocessors = 0, blocks_per_multiprocessor = 0;
        CUDA_CHECK(cudaGetDevice(&device));
        CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device));
        CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_multiprocessor, fused_kernels[groups - 1],
                                                                 block, 0));
        const int blocks = std::min({row_blocks, std::max(multiprocessors * blocks_per_multiprocessor, 1),
                                     RMSNORM_PARTIAL_BLOCKS});
        LAUNCH(fused_kernels[groups - 1], dim3(blocks), dim3(block), 0, stream, dinp, scratch, dout, inp, weight, rstd,
               N, C, stride, accumulate);
        LAUNCH(rmsnorm_weight_partials_kernel<G>, dim3(ceil_div(C, COLUMN_CHANNELS)), dim3(COLUMN_THREADS), 0, stream,
               dweight, (const float*)scratch, blocks, C);
        return;
    }
    // otherwise the input gradient (16-byte path for any C, or the fallback), then the weight kernel
    if (vectors)
        LAUNCH(rmsnorm_backward_vector_kernel<T, 0>, dim3(row_blocks), dim3(block), 0, stream, dinp, (float*)nullptr,
               dout, inp, weight, rstd, N, C, stride, accumulate);
    else
        LAUNCH(rmsnorm_backward_input_kernel<T>, dim3(row_blocks), dim3(block), 0, stream, dinp, dout, inp, weight, rstd,
               N, C, stride, accumulate);
    if (rmsnorm_vectors_apply<T>(C, stride, dout, inp)) {
        auto weight_kernel = rmsnorm_backward_weight_vector_kernel<T, G>;
        LAUNCH(weight_kernel, dim3(ceil_div(C, RMSNORM_WEIGHT_CHANNELS)), dim3(RMSNORM_WEIGHT_THREADS), 0, stream,
               dweight, dout, inp, rstd, N, C, stride);
    } else {
        auto weight_kernel = rmsnorm_backward_weight_kernel<T, G>;
        LAUNCH(weight_kernel, dim3(ceil_div(C, COLUMN_CHANNELS)), dim3(COLUMN_THREADS), 0, stream, dweight, dout, inp,
               rstd, N, C, stride);
    }
}
#endif
