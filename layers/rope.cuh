/*
Rotary position embedding (RoPE) in the Hugging Face "rotate half" form, applied to the query
and key heads in place. For head size hs, pair i < hs/2 of a head at position t is rotated by
the angle t * theta^(-2i/hs):
    x'[i]        = x[i] * cos - x[i + hs/2] * sin
    x'[i + hs/2] = x[i + hs/2] * cos + x[i] * sin
Position t counts from 0 at the start of every sequence.

The cos/sin tables are computed in double and rounded once to fp32 (the PyTorch reference does
the same; Hugging Face computes them in fp32, which differs by ~1e-5 at large positions).

A rotation's inverse is its transpose, so backward rotates the gradient by -angle.

Storage type: q, k and their gradients are rotated in place in the activations' storage type
(float, double in the CPU finite-difference build, or bf16); the cos/sin tables stay float
(`real` on the CPU). The template parameter is named Storage, not T, because T is the sequence
length here. Each pair is loaded, rotated in float and each of its two values rounded once when
stored back, by the kernel and the CPU twin alike.

Kernel: the rotation is pure memory traffic, and one thread per pair with 2-byte loads left the
H200 waiting on each load. Where every chunk of 16 / sizeof(Storage) pairs (8 bf16, 4 floats) is
whole and aligned (head_size a multiple of twice the chunk; qkv and the tables 16-byte aligned), a
thread takes one chunk of a head instead: one 16-byte load for the chunk's first halves, one for
its second halves, and one or two each for its cos and sin values, all issued before any
arithmetic, then the one-pair kernel's rotation (rope_rotate_pair) pair by pair and two 16-byte
stores. The values are the same to the bit. Other shapes take the one-pair kernel; the launcher
picks.

In the model, these kernels serve the simple attention and the CUDA-core fused attention. The
tensor-core attention (bf16) rotates q and k itself as it loads its tiles, and dq and dk back as
it writes them, with the same rope_rotate_pair: the same bits, without these two passes over q
and k in each direction.
*/
#pragma once

#include <cmath>

#include "../common.h"

// ---- CPU reference

// rope_cos, rope_sin (T, hs/2)
inline void rope_tables_cpu(real* rope_cos, real* rope_sin, int T, int head_size, float theta) {
    int half = head_size / 2;
    for (int t = 0; t < T; t++) {
        for (int i = 0; i < half; i++) {
            double inv_freq = 1.0 / pow((double)theta, (2.0 * i) / head_size);
            double angle = t * inv_freq;
            rope_cos[(size_t)t * half + i] = (real)cos(angle);
            rope_sin[(size_t)t * half + i] = (real)sin(angle);
        }
    }
}

// Rotates q and k in place: qkv (B, T, 3C) holds [q | k | v] per position, C = NH * hs.
// direction +1 applies the rotation (forward), -1 its inverse (backward, on the gradient).
template <typename Storage>
inline void rope_rotate_cpu(Storage* qkv, const real* rope_cos, const real* rope_sin,
                            int B, int T, int NH, int head_size, int direction) {
    int C = NH * head_size;
    int half = head_size / 2;
    #pragma omp parallel for collapse(2)
    for (int b = 0; b < B; b++) {
        for (int t = 0; t < T; t++) {
            Storage* row = qkv + ((size_t)b * T + t) * 3 * C;
            const real* cos_t = rope_cos + (size_t)t * half;
            const real* sin_t = rope_sin + (size_t)t * half;
            // the q heads then the k heads: 2 * NH heads of hs values, contiguous
            for (int h = 0; h < 2 * NH; h++) {
                Storage* x = row + (size_t)h * head_size;
                for (int i = 0; i < half; i++) {
                    real s = direction * sin_t[i];
                    real x1 = to_real(x[i]), x2 = to_real(x[i + half]);
                    x[i] = from_real<Storage>(x1 * cos_t[i] - x2 * s);
                    x[i + half] = from_real<Storage>(x2 * cos_t[i] + x1 * s);
                }
            }
        }
    }
}

// qkv (B, T, 3C): q and k rotated in place
template <typename Storage>
inline void rope_forward_cpu(Storage* qkv, const real* rope_cos, const real* rope_sin,
                      int B, int T, int NH, int head_size) {
    rope_rotate_cpu(qkv, rope_cos, rope_sin, B, T, NH, head_size, +1);
}

// dqkv (B, T, 3C): the q and k gradients rotated back in place
template <typename Storage>
inline void rope_backward_cpu(Storage* dqkv, const real* rope_cos, const real* rope_sin,
                       int B, int T, int NH, int head_size) {
    rope_rotate_cpu(dqkv, rope_cos, rope_sin, B, T, NH, head_size, -1);
}

#if defined(__CUDACC__) || defined(MIXLN_CUDA_EMULATION)
#include <cstdint>

#include "../cuda_common.h"

// ---- CUDA kernels

// Pair (x1, x2) rotated by the angle whose cosine is c and sine s (s = -sin for the inverse):
//     x1' = x1 c - x2 s,   x2' = x2 c + x1 s
// with each product and each sum rounded to float as written, never contracted into an FMA, so
// that every kernel that rotates gives the same bits: these, and the tensor-core attention, which
// rotates q and k as it loads them and dq and dk as it writes them (layers/attention.cuh). It is
// also the PyTorch reference's q * cos + rotate_half(q) * sin, operation by operation.
__device__ __forceinline__ void rope_rotate_pair(float* x1, float* x2, float c, float s) {
    float first = __fsub_rn(__fmul_rn(*x1, c), __fmul_rn(*x2, s));
    float second = __fadd_rn(__fmul_rn(*x2, c), __fmul_rn(*x1, s));
    *x1 = first;
    *x2 = second;
}

// Values of Storage in one 16-byte vector (Vector16, cuda_common.h): 8 bf16 or 4 floats, a
// thread's chunk of pairs on the vector path
template <typename Storage>
constexpr int ROPE_CHUNK = VECTOR16_SIZE<Storage>;

// one thread per rotated pair: (b, t, one of the 2*NH q/k heads, i < hs/2); a grid-stride loop
// past the grid's 2^31 - 1 blocks
template <typename Storage>
__global__ void rope_rotate_kernel(Storage* __restrict__ qkv, const float* __restrict__ rope_cos,
                                   const float* __restrict__ rope_sin, int B, int T, int NH, int head_size,
                                   float direction) {
    int half = head_size / 2;
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < (size_t)B * T * 2 * NH * half;
         idx += (size_t)gridDim.x * blockDim.x) {
        int i = (int)(idx % half);
        int head = (int)((idx / half) % (2 * NH));
        size_t bt = idx / half / (2 * NH);
        int t = (int)(bt % T);
        Storage* x = qkv + bt * 3 * NH * head_size + (size_t)head * head_size;
        float c = rope_cos[(size_t)t * half + i], s = direction * rope_sin[(size_t)t * half + i];
        float x1 = to_float(x[i]), x2 = to_float(x[i + half]);
        rope_rotate_pair(&x1, &x2, c, s);
        x[i] = from_float<Storage>(x1);
        x[i + half] = from_float<Storage>(x2);
    }
}

// one thread per chunk of ROPE_CHUNK pairs: (b, t, one of the 2*NH q/k heads, i0 .. i0 + CHUNK - 1),
// i0 a multiple of the chunk (head_size a multiple of twice the chunk, qkv and the tables 16-byte
// aligned: rope_vectors_apply)
template <typename Storage>
__global__ void rope_rotate_vector_kernel(Storage* __restrict__ qkv, const float* __restrict__ rope_cos,
                                          const float* __restrict__ rope_sin, int B, int T, int NH, int head_size,
                                          float direction) {
    constexpr int CHUNK = ROPE_CHUNK<Storage>;
    int half = head_size / 2, head_chunks = half / CHUNK;
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < (size_t)B * T * 2 * NH * head_chunks;
         idx += (size_t)gridDim.x * blockDim.x) {
        int i0 = (int)(idx % head_chunks) * CHUNK;
        int head = (int)((idx / head_chunks) % (2 * NH));
        size_t bt = idx / head_chunks / (2 * NH);
        int t = (int)(bt % T);
        Storage* x = qkv + bt * 3 * NH * head_size + (size_t)head * head_size + i0;
        const float* cos_chunk = rope_cos + (size_t)t * half + i0;
        const float* sin_chunk = rope_sin + (size_t)t * half + i0;
        // the chunk's first halves x[i], second halves x[i + half], cos and sin: all loads before
        // any arithmetic
        // (the cos and sin values are floats: CHUNK of them are one or two 16-byte vectors of 4)
        constexpr int TABLE_VECTORS = CHUNK / VECTOR16_SIZE<float>;
        Vector16<Storage> firsts = load_vector16(x), seconds = load_vector16(x + half);
        Vector16<float> coss[TABLE_VECTORS], sins[TABLE_VECTORS];
        KERNEL_UNROLL
        for (int v = 0; v < TABLE_VECTORS; v++) {
            coss[v] = load_vector16(cos_chunk + 4 * v);
            sins[v] = load_vector16(sin_chunk + 4 * v);
        }
        // the one-pair kernel's rotation, pair by pair (pair k is read before it is overwritten)
        KERNEL_UNROLL
        for (int k = 0; k < CHUNK; k++) {
            float c = coss[k / 4].values[k % 4], s = direction * sins[k / 4].values[k % 4];
            float x1 = to_float(firsts.values[k]), x2 = to_float(seconds.values[k]);
            rope_rotate_pair(&x1, &x2, c, s);
            firsts.values[k] = from_float<Storage>(x1);
            seconds.values[k] = from_float<Storage>(x2);
        }
        store_vector16(x, firsts);
        store_vector16(x + half, seconds);
    }
}

// ---- launchers

// The vector kernel applies when every chunk is a whole aligned 16 bytes: head_size a multiple of
// twice the chunk (so hs/2 is a multiple of it, and heads, rows and table rows all start on
// chunk boundaries) and qkv and both tables 16-byte aligned (cudaMalloc's are).
template <typename Storage>
inline bool rope_vectors_apply(const Storage* qkv, const float* rope_cos, const float* rope_sin, int head_size) {
    uintptr_t addresses = reinterpret_cast<uintptr_t>(qkv) | reinterpret_cast<uintptr_t>(rope_cos) |
                          reinterpret_cast<uintptr_t>(rope_sin);
    return head_size % (2 * ROPE_CHUNK<Storage>) == 0 && addresses % 16 == 0;
}

// both directions: the vector kernel where it applies, else one thread per pair; the grid capped
// at 2^31 - 1 blocks of 256 (the kernels' grid-stride loops take any rest; no tensor that fits in
// a GPU's memory reaches the cap)
template <typename Storage>
inline void rope_rotate(Storage* qkv, const float* rope_cos, const float* rope_sin, int B, int T, int NH,
                        int head_size, float direction, cudaStream_t stream) {
    const int block = 256;
    bool vectors = rope_vectors_apply(qkv, rope_cos, rope_sin, head_size);
    size_t threads = (size_t)B * T * 2 * NH * (head_size / 2) / (vectors ? ROPE_CHUNK<Storage> : 1);
    size_t blocks = (threads + block - 1) / block;
    dim3 grid((unsigned)(blocks < 0x7fffffffu ? blocks : 0x7fffffffu));
    if (vectors)
        LAUNCH(rope_rotate_vector_kernel<Storage>, grid, dim3(block), 0, stream, qkv, rope_cos, rope_sin, B, T, NH,
               head_size, direction);
    else
        LAUNCH(rope_rotate_kernel<Storage>, grid, dim3(block), 0, stream, qkv, rope_cos, rope_sin, B, T, NH, head_size,
               direction);
}

template <typename Storage>
inline void rope_forward(Storage* qkv, const float* rope_cos, const float* rope_sin, int B, int T, int NH,
                         int head_size, cudaStream_t stream) {
    rope_rotate(qkv, rope_cos, rope_sin, B, T, NH, head_size, 1.0f, stream);
}

template <typename Storage>
inline void rope_backward(Storage* dqkv, const float* rope_cos, const float* rope_sin, int B, int T, int NH,
                          int head_size, cudaStream_t stream) {
    rope_rotate(dqkv, rope_cos, rope_sin, B, T, NH, head_size, -1.0f, stream);
}
#endif
