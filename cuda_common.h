/*
CUDA plumbing shared by every kernel in layers/: error checks that name the file and line, one
launch helper, and dynamic shared memory.

The same kernel source is compiled two ways:
  - by nvcc, for the GPU: LAUNCH is a plain <<<grid, block, shared_bytes, stream>>> launch;
  - by g++ with -DMIXLN_CUDA_EMULATION, for tests on machines without a GPU: the kernels run on
    the CPU inside a small execution of the CUDA programming model (test/emu/cuda_emu.h), which
    interleaves each block's threads so that __syncthreads() and warp shuffles are real
    rendezvous points. That is why kernels launch through LAUNCH and declare dynamic shared
    memory with DYNAMIC_SHARED: those are the only two places where the builds differ.
*/
#pragma once

#include "common.h"

#ifdef MIXLN_CUDA_EMULATION
#include "test/emu/cuda_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#endif

inline void cuda_check(cudaError_t error, const char* file, int line) {
    if (error != cudaSuccess) fail("CUDA error at %s:%d: %s", file, line, cudaGetErrorString(error));
}
// Wraps every CUDA runtime call: CUDA_CHECK(cudaMalloc(&p, bytes));
#define CUDA_CHECK(call) cuda_check((call), __FILE__, __LINE__)

// LAUNCH(kernel, grid, block, shared_bytes, stream, args...) launches and checks the launch.
#define LAUNCH(kernel, grid, block, shared_bytes, stream, ...) \
    launch_checked(__FILE__, __LINE__, kernel, grid, block, shared_bytes, stream, __VA_ARGS__)

template <typename... KernelArgs, typename... Args>
inline void launch_checked(const char* file, int line, void (*kernel)(KernelArgs...), dim3 grid, dim3 block,
                           size_t shared_bytes, cudaStream_t stream, Args... args) {
#ifdef MIXLN_CUDA_EMULATION
    cuda_emu_launch(kernel, grid, block, shared_bytes, stream, args...);
#else
    kernel<<<grid, block, shared_bytes, stream>>>(args...);
#endif
    cuda_check(cudaGetLastError(), file, line);
}

// Inside a kernel: DYNAMIC_SHARED(float, buffer); gives `float* buffer` pointing at the block's
// dynamic shared memory (the shared_bytes of the launch), aligned to 128 bytes (WMMA needs 32-byte
// aligned tile pointers; the emulation aligns it to 16 and checks tile pointers relative to it).
#ifdef MIXLN_CUDA_EMULATION
#define DYNAMIC_SHARED(type, name) type* name = (type*)cuda_emu_dynamic_shared()
#else
#define DYNAMIC_SHARED(type, name)                                  \
    extern __shared__ __align__(128) unsigned char name##_bytes_[]; \
    type* name = (type*)name##_bytes_
#endif

inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Unrolls the loop after it in nvcc builds (g++ would warn about an unknown pragma, and unrolls
// such small constant loops itself). Loops over a chunk of loads issued before their use are
// written with it: see rmsnorm_backward_input_kernel.
#ifdef __CUDACC__
#define KERNEL_UNROLL _Pragma("unroll")
#else
#define KERNEL_UNROLL
#endif

// ---- storage types in kernels (see common.h): load with to_float, compute in float, store with
// from_float<T> (round to nearest even for bf16)
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(bf16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ bf16 from_float<bf16>(float x) { return __float2bfloat16_rn(x); }

// ---- 16-byte vectors: the vector paths of the memory-bound kernels (rmsnorm, swiglu, rope,
// crossentropy). VECTOR16_SIZE<T> values of T (8 bf16 or 4 floats) moved by one 16-byte load or
// store (load_vector16, store_vector16) and read or written value by value through .values
template <typename T>
constexpr int VECTOR16_SIZE = 16 / (int)sizeof(T);
template <typename T>
union Vector16 {
    uint4 vector;
    T values[VECTOR16_SIZE<T>];
};
// The 16 bytes at p, which must be 16-byte aligned: a GPU faults on a misaligned 16-byte access,
// the emulation stops with an error. (Under g++ a memcpy: strict aliasing would let it reorder a
// type-punned load around accesses of T.)
template <typename T>
__device__ __forceinline__ Vector16<T> load_vector16(const T* p) {
    Vector16<T> v;
#ifdef MIXLN_CUDA_EMULATION
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) fail("16-byte load from %p, not 16-byte aligned", (const void*)p);
    memcpy((void*)&v, (const void*)p, sizeof(v));
#else
    v.vector = *reinterpret_cast<const uint4*>(p);
#endif
    return v;
}
template <typename T>
__device__ __forceinline__ void store_vector16(T* p, const Vector16<T>& v) {
#ifdef MIXLN_CUDA_EMULATION
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) fail("16-byte store to %p, not 16-byte aligned", (void*)p);
    memcpy((void*)p, (const void*)&v, sizeof(v));
#else
    *reinterpret_cast<uint4*>(p) = v.vector;
#endif
}

// ---- tensor-core products with known fragment layouts
// d (16x8, float) += a (16x16, bf16) b (16x8, bf16), one warp, with the fragment layouts the PTX ISA
// documents for mma.sync.aligned.m16n8k16 ("Matrix Fragments for mma.m16n8k16 with floating point
// type"). Lane l, with g = l / 4 and t = l % 4, holds two bf16 per register (the lower column or
// row index in the low 16 bits):
//   a[0] = A(g, 2t..2t+1)   a[1] = A(g+8, 2t..2t+1)   a[2] = A(g, 2t+8..2t+9)   a[3] = A(g+8, 2t+8..2t+9)
//   b[0] = B(2t..2t+1, g)   b[1] = B(2t+8..2t+9, g)
//   d[0], d[1] = D(g, 2t), D(g, 2t+1)                 d[2], d[3] = D(g+8, 2t), D(g+8, 2t+1)
// Because D's layout matches A's (two adjacent 16x8 results are one 16x16 A operand), a product's
// result can feed the next product from registers. The emulation implements the same layouts.
__device__ __forceinline__ void mma_bf16_16x8x16(float d[4], const uint32_t a[4], const uint32_t b[2]) {
#ifdef MIXLN_CUDA_EMULATION
    cuda_emu::mma_m16n8k16_bf16(d, a, b);
#else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}
// Four 8x8 bf16 matrices from shared memory, one register of each per lane, in the layouts of
// mma_bf16_16x8x16's operands: lane 8j + r passes the address of row r of matrix j (8 values, 16
// bytes, 16-byte aligned); lane l (g = l / 4, t = l % 4) gets in r[j] the values (g, 2t) and
// (g, 2t+1) of matrix j, or with _trans (2t, g) and (2t+1, g) (the lower index in the low half).
// PTX ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16: one instruction where four 4-byte loads
// would be needed, and _trans delivers the B operand of a tile stored with k along its rows.
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const bf16* row) {
#ifdef MIXLN_CUDA_EMULATION
    cuda_emu::ldmatrix_m8n8_b16(r, row, 4, false);
#else
    unsigned address = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
#endif
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const bf16* row) {
#ifdef MIXLN_CUDA_EMULATION
    cuda_emu::ldmatrix_m8n8_b16(r, row, 4, true);
#else
    unsigned address = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
#endif
}
// round lo and hi to bf16 (to nearest even) and pack them into one register, lo in the low half:
// one F2FP.PACK_AB instruction on sm_80 and later, where two scalar conversions and the shifts
// and or to combine them take five
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    __nv_bfloat162 pair = __floats2bfloat162_rn(lo, hi);   // .x (the low half) = lo
    uint32_t bits;
    memcpy(&bits, &pair, sizeof(bits));
    return bits;
}
// a packed pair to p[0] (the low half) and p[1], p 4-byte aligned: one 4-byte store
__device__ __forceinline__ void store_bf16x2(bf16* p, uint32_t pair) {
#ifdef MIXLN_CUDA_EMULATION
    if (reinterpret_cast<uintptr_t>(p) % 4 != 0) fail("4-byte store to %p, not 4-byte aligned", (void*)p);
    memcpy((void*)p, &pair, sizeof(pair));
#else
    *reinterpret_cast<uint32_t*>(p) = pair;
#endif
}
// the two bf16 of a packed pair as floats (exact): one shift or mask each
__device__ __forceinline__ float bf16x2_low(uint32_t pair) { return __uint_as_float(pair << 16); }
__device__ __forceinline__ float bf16x2_high(uint32_t pair) { return __uint_as_float(pair & 0xffff0000u); }

// ---- reductions shared by the kernels

// Sum or max over the 32 lanes of a warp; every lane gets the result.
__device__ __forceinline__ float warp_reduce_sum(float value) {
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
    return value;
}
__device__ __forceinline__ float warp_reduce_max(float value) {
    for (int offset = 16; offset > 0; offset /= 2) value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, offset));
    return value;
}

// Sum over a whole block (blockDim.x a multiple of 32, at most 1024); every thread gets the
// result. `shared` holds 32 floats. Ends with a barrier, so `shared` can be reused at once.
__device__ __forceinline__ float block_reduce_sum(float value, float* shared) {
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    value = warp_reduce_sum(value);
    if (lane == 0) shared[warp] = value;
    __syncthreads();
    value = lane < warps ? shared[lane] : 0.0f;
    value = warp_reduce_sum(value);
    __syncthreads();
    return value;
}
__device__ __forceinline__ float block_reduce_max(float value, float* shared) {
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    value = warp_reduce_max(value);
    if (lane == 0) shared[warp] = value;
    __syncthreads();
    value = lane < warps ? shared[lane] : -INFINITY;
    value = warp_reduce_max(value);
    __syncthreads();
    return value;
}

// ---- sums over the rows of an (N, C) tensor, per channel: the norms' weight gradients
// One block of COLUMN_THREADS (1024) threads owns COLUMN_CHANNELS (16) adjacent channels. Thread t
// takes channel t % 16 and row group t / 16: rows g, g + 64, g + 128, ... in order, so a warp
// reads 16 channels of 2 rows at a time (whole 32-byte sectors in bf16) and the C / 16 blocks each
// walk all N rows with 64 warps' worth of loads in flight. (One thread per channel summing all N
// rows, as the CPU does, gives a GPU only C threads: 2 blocks for C = 512, each thread walking
// 16384 rows at B = 64, T = 256.) column_reduce then adds the 64 groups' partial sums in group
// order: deterministic, no atomics.
constexpr int COLUMN_CHANNELS = 16;
constexpr int COLUMN_ROW_GROUPS = 64;
constexpr int COLUMN_THREADS = COLUMN_CHANNELS * COLUMN_ROW_GROUPS;

// The sum of `value` over the row groups of the calling thread's channel, valid in the threads of
// row group 0 (threadIdx.x < COLUMN_CHANNELS). Every thread of the block must call it. `shared`
// holds COLUMN_THREADS floats; ends with a barrier, so it can be reused at once.
__device__ __forceinline__ float column_reduce(float value, float* shared) {
    int channel = threadIdx.x % COLUMN_CHANNELS, group = threadIdx.x / COLUMN_CHANNELS;
    shared[group * COLUMN_CHANNELS + channel] = value;
    __syncthreads();
    float total = 0.0f;
    if (group == 0)
        for (int g = 0; g < COLUMN_ROW_GROUPS; g++) total += shared[g * COLUMN_CHANNELS + channel];
    __syncthreads();
    return total;
}
