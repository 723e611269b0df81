/*
QKV planes: the two layouts of the attention's q, k and v, and the copies between them.

The qkv projection writes q, k and v side by side in each row, (N, 3C): row n is q[n], k[n],
v[n], each C wide, which is what the attention kernels read. HybridNorm's QKV-Norm (model.h, the
hybrid kind) normalises q, k and v each with a norm of its own over their C channels. In the
planes layout, (3, N, C), q of every row comes first, then k, then v, so each is an (N, C) block
that the model's norm kernels (rmsnorm.cuh, layernorm.cuh) take as they are, with their own
weight, statistics and fused backward paths:
    qkv_to_planes    planes (3, N, C) <- qkv (N, 3C)       planes[s][n][c] = qkv[n][s*C + c]
    qkv_from_planes  qkv (N, 3C) <- planes (3, N, C)       the inverse
Each is a permutation: no arithmetic, the same bits in any storage type, and each is the other's
backward (the gradient of a copy is the copy of the gradient, the other way).

A strided norm kernel would save the copies (4 passes over (N, 3C) per hybrid layer and step,
forward and backward together), at the price of a second variant of every norm kernel; the
copies keep the norms' one tested code path.
*/
#pragma once

#include "../common.h"

// ---- CPU reference

// planes (3, N, C) = q, k and v of qkv (N, 3C), each as an (N, C) block
template <typename T>
inline void qkv_to_planes_cpu(T* planes, const T* qkv, int N, int C) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        // row n's three C-wide pieces go to row n of planes 0, 1 and 2
        for (int s = 0; s < 3; s++) memcpy(planes + ((size_t)s * N + n) * C, qkv + ((size_t)n * 3 + s) * C, C * sizeof(T));
    }
}

// qkv (N, 3C) = planes (3, N, C) side by side again
template <typename T>
inline void qkv_from_planes_cpu(T* qkv, const T* planes, int N, int C) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        for (int s = 0; s < 3; s++) memcpy(qkv + ((size_t)n * 3 + s) * C, planes + ((size_t)s * N + n) * C, C * sizeof(T));
    }
}

#if defined(__CUDACC__) || defined(MIXLN_CUDA_EMULATION)
#include "../cuda_common.h"

// ---- CUDA kernels

// One thread per element of the (N, 3C) layout, numbered in its order, so that a warp reads (or
// writes) qkv in consecutive addresses and the planes in at most two runs of consecutive
// addresses (a run ends only where a warp crosses from q to k or from k to v).
// dst_is_planes: dst (3, N, C) <- src (N, 3C); else dst (N, 3C) <- src (3, N, C).
template <typename T>
__global__ void qkv_planes_copy_kernel(T* dst, const T* src, int N, int C, bool dst_is_planes) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;   // index into the (N, 3C) layout
    if (i >= (size_t)N * 3 * C) return;
    size_t n = i / (3 * (size_t)C), rest = i % (3 * (size_t)C), s = rest / C, c = rest % C;
    size_t p = (s * N + n) * C + c;                               // the same element in (3, N, C)
    if (dst_is_planes) {
        dst[p] = src[i];
    } else {
        dst[i] = src[p];
    }
}

// ---- launchers

template <typename T>
inline void qkv_to_planes(T* planes, const T* qkv, int N, int C, cudaStream_t stream) {
    const size_t n = (size_t)N * 3 * C;
    if (n == 0) return;
    const int block = 256;
    LAUNCH(qkv_planes_copy_kernel<T>, dim3((unsigned)((n + block - 1) / block)), dim3(block), 0, stream, planes, qkv,
           N, C, true);
}

template <typename T>
inline void qkv_from_planes(T* qkv, const T* planes, int N, int C, cudaStream_t stream) {
    const size_t n = (size_t)N * 3 * C;
    if (n == 0) return;
    const int block = 256;
    LAUNCH(qkv_planes_copy_kernel<T>, dim3((unsigned)((n + block - 1) / block)), dim3(block), 0, stream, qkv, planes,
           N, C, false);
}
#endif
