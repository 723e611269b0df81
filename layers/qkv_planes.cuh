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

The price: five copies of (N, 3C) per hybrid layer and training step (two in the forward, three in
the backward: model.h, qkv_norm_forward and qkv_norm_backward), each reading and writing it once;
at LLaMA-71M's shapes in bf16 (B 64, T 256) 50 MB each way per copy, some 0.5 GB a layer and step.
A strided variant of every norm kernel would save them; the copies keep the norms' one tested
code path. On the GPU the copies move 16-byte vectors where C allows (qkv_planes_copy).
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

// The same copy in 16-byte vectors (VECTOR16_SIZE<T> elements: 8 bf16 or 4 floats) where C is a
// multiple of the vector and both pointers are 16-byte aligned, as the model's buffers are: a
// vector then never straddles q and k or k and v. One thread per vector of the (N, 3C) layout.
template <typename T>
__global__ void qkv_planes_copy_vector_kernel(T* dst, const T* src, int N, int C, bool dst_is_planes) {
    constexpr int VEC = VECTOR16_SIZE<T>;
    size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * VEC;   // first element, in (N, 3C)
    if (i >= (size_t)N * 3 * C) return;
    size_t n = i / (3 * (size_t)C), rest = i % (3 * (size_t)C), s = rest / C, c = rest % C;
    size_t p = (s * N + n) * C + c;
    if (dst_is_planes) {
        store_vector16(dst + p, load_vector16(src + i));
    } else {
        store_vector16(dst + i, load_vector16(src + p));
    }
}

// ---- launchers

// dst <- src in whichever direction dst_is_planes says, by vectors where the shapes and pointers
// allow
template <typename T>
inline void qkv_planes_copy(T* dst, const T* src, int N, int C, bool dst_is_planes, cudaStream_t stream) {
    const size_t n = (size_t)N * 3 * C;
    if (n == 0) return;
    const int block = 256;
    constexpr int VEC = VECTOR16_SIZE<T>;
    uintptr_t addresses = reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src);
    if (C % VEC == 0 && addresses % 16 == 0) {
        size_t vectors = n / VEC;
        LAUNCH(qkv_planes_copy_vector_kernel<T>, dim3((unsigned)((vectors + block - 1) / block)), dim3(block), 0, stream,
               dst, src, N, C, dst_is_planes);
    } else {
        LAUNCH(qkv_planes_copy_kernel<T>, dim3((unsigned)((n + block - 1) / block)), dim3(block), 0, stream, dst, src, N,
               C, dst_is_planes);
    }
}

template <typename T>
inline void qkv_to_planes(T* planes, const T* qkv, int N, int C, cudaStream_t stream) {
    qkv_planes_copy(planes, qkv, N, C, true, stream);
}

template <typename T>
inline void qkv_from_planes(T* qkv, const T* planes, int N, int C, cudaStream_t stream) {
    qkv_planes_copy(qkv, planes, N, C, false, stream);
}
#endif
