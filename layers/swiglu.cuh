/*
SwiGLU, the gated activation of the LLaMA MLP: out = silu(gate) * up, silu(g) = g * sigmoid(g).

gate and up come from one matmul against the stacked (2F, C) gate_up_proj weight, so each row
of the input holds F gate values followed by F up values.

Backward, with s = sigmoid(g):  dgate = dout * up * s * (1 + g * (1 - s)),  dup = dout * silu(g).
Unlike most backward functions here it WRITES its gradient (=, not +=): dgate_up is the gradient
of the MLP's own gate_up activation, whose only consumer is this layer, so there is nothing to
accumulate into, and writing saves zeroing the (N, 2F) buffer first and reading those zeros back.

Storage type: inputs, outputs and gradients are stored in T (float, double in the CPU
finite-difference build, or bf16) and the math is in float (`real` on the CPU). Rounding points:
each output and each gradient element once, when stored.

Kernels: the work is pure memory traffic, and one thread per element with 2-byte loads left the
H200 waiting on each load (the backward at 1.5 TB/s of ~4.8). Where every chunk of
16 / sizeof(T) values (8 bf16, 4 floats) is a whole, aligned 16 bytes (F a multiple of the
chunk, every pointer 16-byte aligned), a thread takes one chunk of a row instead: one 16-byte
load per operand (the backward's gate, up and dout), all issued before any
arithmetic, the one-element kernel's expressions value by value, one 16-byte store per output.
The values are the same to the bit. Other shapes (F = 5461 of LLaMA-1B: rows off 16-byte
boundaries) take the fallback kernels, a block per row with each thread's loads 8 elements at a
time issued first; the launcher picks.
*/
#pragma once

#include <cmath>

#include "../common.h"

// ---- CPU reference

// out (N, F); gate_up (N, 2F): [gate | up] per row
template <typename T>
inline void swiglu_forward_cpu(T* out, const T* gate_up, int N, int F) {
    #pragma omp parallel for
    for (int i = 0; i < N; i++) {
        const T* gate = gate_up + (size_t)i * 2 * F;
        const T* up = gate + F;
        for (int f = 0; f < F; f++) {
            real g = to_real(gate[f]);
            real sigmoid = 1 / (1 + exp_cpu(-g));
            out[(size_t)i * F + f] = from_real<T>(g * sigmoid * to_real(up[f]));
        }
    }
}

// dgate_up (N, 2F) = (written, not accumulated); dout (N, F); gate_up (N, 2F) from forward
template <typename T>
inline void swiglu_backward_cpu(T* dgate_up, const T* dout, const T* gate_up, int N, int F) {
    #pragma omp parallel for
    for (int i = 0; i < N; i++) {
        const T* gate = gate_up + (size_t)i * 2 * F;
        const T* up = gate + F;
        T* dgate = dgate_up + (size_t)i * 2 * F;
        T* dup = dgate + F;
        for (int f = 0; f < F; f++) {
            real g = to_real(gate[f]);
            real sigmoid = 1 / (1 + exp_cpu(-g));
            real dy = to_real(dout[(size_t)i * F + f]);
            dgate[f] = from_real<T>(dy * to_real(up[f]) * sigmoid * (1 + g * (1 - sigmoid)));
            dup[f] = from_real<T>(dy * g * sigmoid);
        }
    }
}

#if defined(__CUDACC__) || defined(MIXLN_CUDA_EMULATION)
#include <cstdint>

#include "../cuda_common.h"

// ---- CUDA kernels

// Values of T in one 16-byte vector (Vector16, cuda_common.h): 8 bf16 or 4 floats, a thread's
// chunk on the vector path
template <typename T>
constexpr int SWIGLU_CHUNK = VECTOR16_SIZE<T>;

// The fallback, for any F and alignment (LLaMA-1B's F = 5461 among them): a block per row, thread
// t taking f = t, t + blockDim.x, ... in chunks of SWIGLU_FALLBACK_CHUNK, all of a chunk's loads
// issued before any is used. (One element per thread, as this kernel first was, keeps one 2-byte
// load per operand in flight and waits out each in turn.) Rows past the grid: a grid-stride loop.
constexpr int SWIGLU_FALLBACK_CHUNK = 8;
template <typename T>
__global__ void swiglu_forward_kernel(T* __restrict__ out, const T* __restrict__ gate_up, int N, int F) {
    constexpr int CHUNK = SWIGLU_FALLBACK_CHUNK;
    for (int row = blockIdx.x; row < N; row += gridDim.x) {
        const T* gate = gate_up + (size_t)row * 2 * F;
        const T* up = gate + F;
        T* y = out + (size_t)row * F;
        for (int f0 = threadIdx.x; f0 < F; f0 += blockDim.x * CHUNK) {
            float gates[CHUNK], ups[CHUNK];
            KERNEL_UNROLL
            for (int u = 0; u < CHUNK; u++) {
                int f = f0 + u * blockDim.x;
                gates[u] = f < F ? to_float(gate[f]) : 0.0f;
                ups[u] = f < F ? to_float(up[f]) : 0.0f;
            }
            KERNEL_UNROLL
            for (int u = 0; u < CHUNK; u++) {
                int f = f0 + u * blockDim.x;
                if (f < F) y[f] = from_float<T>(gates[u] / (1.0f + expf(-gates[u])) * ups[u]);
            }
        }
    }
}

// one thread per chunk of SWIGLU_CHUNK<T> adjacent f in a row (F a multiple of the chunk, so no
// chunk straddles two rows; out and gate_up 16-byte aligned: swiglu_vectors_apply)
template <typename T>
__global__ void swiglu_forward_vector_kernel(T* __restrict__ out, const T* __restrict__ gate_up, int N, int F) {
    constexpr int CHUNK = SWIGLU_CHUNK<T>;
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < (size_t)N * F / CHUNK;
         idx += (size_t)gridDim.x * blockDim.x) {
        size_t e = idx * CHUNK, row = e / F, f = e % F;   // e: the chunk's first element of out (N, F)
        const T* gate_chunk = gate_up + row * 2 * F + f;
        // both loads before any arithmetic
        Vector16<T> gates, ups, outs;
        gates = load_vector16(gate_chunk);
        ups = load_vector16(gate_chunk + F);
        // the one-element kernel's expressions, value by value
        KERNEL_UNROLL
        for (int k = 0; k < CHUNK; k++) {
            float gate = to_float(gates.values[k]);
            float up = to_float(ups.values[k]);
            outs.values[k] = from_float<T>(gate / (1.0f + expf(-gate)) * up);
        }
        store_vector16(out + e, outs);
    }
}

// The fallback, as the forward's: a block per row, chunks of SWIGLU_FALLBACK_CHUNK elements per
// thread with the three loads of each (gate, up, dout) issued first; dgate_up written
template <typename T>
__global__ void swiglu_backward_kernel(T* __restrict__ dgate_up, const T* __restrict__ dout,
                                       const T* __restrict__ gate_up, int N, int F) {
    constexpr int CHUNK = SWIGLU_FALLBACK_CHUNK;
    for (int row = blockIdx.x; row < N; row += gridDim.x) {
        const T* gate = gate_up + (size_t)row * 2 * F;
        const T* up = gate + F;
        const T* dy = dout + (size_t)row * F;
        T* dgate = dgate_up + (size_t)row * 2 * F;
        T* dup = dgate + F;
        for (int f0 = threadIdx.x; f0 < F; f0 += blockDim.x * CHUNK) {
            float gates[CHUNK], ups[CHUNK], dys[CHUNK];
            KERNEL_UNROLL
            for (int u = 0; u < CHUNK; u++) {
                int f = f0 + u * blockDim.x;
                gates[u] = f < F ? to_float(gate[f]) : 0.0f;
                ups[u] = f < F ? to_float(up[f]) : 0.0f;
                dys[u] = f < F ? to_float(dy[f]) : 0.0f;
            }
            KERNEL_UNROLL
            for (int u = 0; u < CHUNK; u++) {
                int f = f0 + u * blockDim.x;
                if (f >= F) continue;
                float sigmoid = 1.0f / (1.0f + expf(-gates[u]));
                dgate[f] = from_float<T>(dys[u] * ups[u] * sigmoid * (1.0f + gates[u] * (1.0f - sigmoid)));
                dup[f] = from_float<T>(dys[u] * gates[u] * sigmoid);
            }
        }
    }
}

// one thread per chunk of SWIGLU_CHUNK<T> adjacent f in a row, as the forward vector kernel
template <typename T>
__global__ void swiglu_backward_vector_kernel(T* __restrict__ dgate_up, const T* __restrict__ dout,
                                              const T* __restrict__ gate_up, int N, int F) {
    constexpr int CHUNK = SWIGLU_CHUNK<T>;
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < (size_t)N * F / CHUNK;
         idx += (size_t)gridDim.x * blockDim.x) {
        size_t e = idx * CHUNK, row = e / F, f = e % F;   // e: the chunk's first element of dout (N, F)
        const T* gate_chunk = gate_up + row * 2 * F + f;
        T* dgate_chunk = dgate_up + row * 2 * F + f;
        // all three loads (gate, up, dout) before any arithmetic
        Vector16<T> gates, ups, dys, dgates, dups;
        gates = load_vector16(gate_chunk);
        ups = load_vector16(gate_chunk + F);
        dys = load_vector16(dout + e);
        // the one-element kernel's expressions, value by value, each gradient rounded once
        KERNEL_UNROLL
        for (int k = 0; k < CHUNK; k++) {
            float gate = to_float(gates.values[k]);
            float up = to_float(ups.values[k]);
            float sigmoid = 1.0f / (1.0f + expf(-gate));
            float dy = to_float(dys.values[k]);
            dgates.values[k] = from_float<T>(dy * up * sigmoid * (1.0f + gate * (1.0f - sigmoid)));
            dups.values[k] = from_float<T>(dy * gate * sigmoid);
        }
        store_vector16(dgate_chunk, dgates);
        store_vector16(dgate_chunk + F, dups);
    }
}

// ---- launchers

// The vector kernels apply when every chunk is a whole aligned 16 bytes: F a multiple of the
// chunk (rows of F and 2F values then keep every chunk on a 16-byte boundary) and every pointer
// 16-byte aligned (cudaMalloc's are; a pointer into the middle of a buffer may not be).
template <typename T>
inline bool swiglu_vectors_apply(int F, const void* a, const void* b, const void* c = nullptr) {
    uintptr_t addresses = reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b) |
                          reinterpret_cast<uintptr_t>(c);
    return F % SWIGLU_CHUNK<T> == 0 && addresses % 16 == 0;
}

// blocks of `block` threads for `threads` threads, capped at the grid's 2^31 - 1 (the kernels'
// grid-stride loops take any rest; no tensor that fits in a GPU's memory reaches the cap)
inline dim3 swiglu_grid(size_t threads, int block) {
    size_t blocks = (threads + block - 1) / block;
    return dim3((unsigned)(blocks < 0x7fffffffu ? blocks : 0x7fffffffu));
}

template <typename T>
inline void swiglu_forward(T* out, const T* gate_up, int N, int F, cudaStream_t stream) {
    const int block = 256;
    size_t n = (size_t)N * F;
    if (swiglu_vectors_apply<T>(F, out, gate_up))
        LAUNCH(swiglu_forward_vector_kernel<T>, swiglu_grid(n / SWIGLU_CHUNK<T>, block), dim3(block), 0, stream, out,
               gate_up, N, F);
    else
        LAUNCH(swiglu_forward_kernel<T>, dim3(N), dim3(block), 0, stream, out, gate_up, N, F);   // a block per row
}

template <typename T>
inline void swiglu_backward(T* dgate_up, const T* dout, const T* gate_up, int N, int F, cudaStream_t stream) {
    const int block = 256;
    size_t n = (size_t)N * F;
    if (swiglu_vectors_apply<T>(F, dgate_up, dout, gate_up))
        LAUNCH(swiglu_backward_vector_kernel<T>, swiglu_grid(n / SWIGLU_CHUNK<T>, block), dim3(block), 0, stream,
               dgate_up, dout, gate_up, N, F);
    else
        LAUNCH(swiglu_backward_kernel<T>, dim3(N), dim3(block), 0, stream, dgate_up, dout, gate_up, N, F);
}
#endif
