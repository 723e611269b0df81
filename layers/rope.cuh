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
#include "../cuda_common.h"

// ---- CUDA kernels

// one thread per rotated pair: (b, t, one of the 2*NH q/k heads, i < hs/2)
template <typename Storage>
__global__ void rope_rotate_kernel(Storage* qkv, const float* rope_cos, const float* rope_sin, int B, int T, int NH,
                                   int head_size, float direction) {
    int half = head_size / 2;
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)B * T * 2 * NH * half) return;
    int i = (int)(idx % half);
    int head = (int)((idx / half) % (2 * NH));
    size_t bt = idx / half / (2 * NH);
    int t = (int)(bt % T);
    Storage* x = qkv + bt * 3 * NH * head_size + (size_t)head * head_size;
    float c = rope_cos[(size_t)t * half + i], s = direction * rope_sin[(size_t)t * half + i];
    float x1 = to_float(x[i]), x2 = to_float(x[i + half]);
    x[i] = from_float<Storage>(x1 * c - x2 * s);
    x[i + half] = from_float<Storage>(x2 * c + x1 * s);
}

// ---- launchers

template <typename Storage>
inline void rope_forward(Storage* qkv, const float* rope_cos, const float* rope_sin, int B, int T, int NH,
                         int head_size, cudaStream_t stream) {
    size_t n = (size_t)B * T * 2 * NH * (head_size / 2);
    LAUNCH(rope_rotate_kernel<Storage>, dim3((unsigned)((n + 255) / 256)), dim3(256), 0, stream, qkv, rope_cos,
           rope_sin, B, T, NH, head_size, 1.0f);
}

template <typename Storage>
inline void rope_backward(Storage* dqkv, const float* rope_cos, const float* rope_sin, int B, int T, int NH,
                          int head_size, cudaStream_t stream) {
    size_t n = (size_t)B * T * 2 * NH * (head_size / 2);
    LAUNCH(rope_rotate_kernel<Storage>, dim3((unsigned)((n + 255) / 256)), dim3(256), 0, stream, dqkv, rope_cos,
           rope_sin, B, T, NH, head_size, -1.0f);
}
#endif
