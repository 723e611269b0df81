/*
Tests of the CPU execution of the CUDA programming model (test/emu/cuda_emu.h): the kernels below
are plain CUDA, launched with LAUNCH, and the claims are the ones layer kernels rely on: barriers
and warp shuffles are real rendezvous points, so a missing __syncthreads() or a wrong shuffle
offset gives a wrong answer every run; shared memory is per block; atomics are atomic; bad
launches and deadlocks fail with a message instead of passing or hanging.

Build (no GPU needed):
  g++ -std=c++17 -O2 -Wall -Wextra -Werror -fopenmp -DMIXLN_CUDA_EMULATION -I. -I/usr/local/cuda/include \
      test/test_cuda_emu.cpp build/test_main.o -o build/test_cuda_emu
*/
// The Makefile's test_cpu build compiles every test/*.cpp without the emulation (and without the
// CUDA include path); this file only means something in the emulation build.
#ifdef MIXLN_CUDA_EMULATION

#include "cuda_common.h"
#include "test/test_util.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

// ---- host helpers
template <typename T>
static T* to_device(const std::vector<T>& host) {
    T* dev = nullptr;
    CUDA_CHECK(cudaMalloc((void**)&dev, host.size() * sizeof(T)));
    CUDA_CHECK(cudaMemcpy(dev, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
    return dev;
}
template <typename T>
static T* device_zeros(size_t n) {
    T* dev = nullptr;
    CUDA_CHECK(cudaMalloc((void**)&dev, n * sizeof(T)));
    CUDA_CHECK(cudaMemset(dev, 0, n * sizeof(T)));
    return dev;
}
template <typename T>
static std::vector<T> from_device(const T* dev, size_t n) {
    std::vector<T> host(n);
    CUDA_CHECK(cudaMemcpy(host.data(), dev, n * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
}
// whole numbers in [1, 100]: every sum of up to 1024 of them is exact in float, in any order
static std::vector<float> small_integers(size_t n, unsigned seed) {
    std::vector<float> v(n);
    for (size_t i = 0; i < n; i++) {
        seed = seed * 1664525u + 1013904223u;
        v[i] = (float)(1 + (seed >> 16) % 100);
    }
    return v;
}
static std::vector<float> block_sums(const std::vector<float>& x, int block_size) {
    std::vector<float> sums(x.size() / block_size, 0.0f);
    for (size_t i = 0; i < x.size(); i++) sums[i / block_size] += x[i];
    return sums;
}

// ---- block-wide sums: a shared-memory tree, blockDim.x a power of two
// out (gridDim.x), inp (gridDim.x * blockDim.x)
__global__ void block_sum_kernel(float* out, const float* inp) {
    __shared__ float partial[1024];
    int tid = threadIdx.x;
    partial[tid] = inp[blockIdx.x * blockDim.x + tid];
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (tid < s) partial[tid] += partial[tid + s];
        __syncthreads();
    }
    if (tid == 0) out[blockIdx.x] = partial[0];
}

// planted bug: no barrier between the steps of the tree
__global__ void block_sum_missing_loop_barrier_kernel(float* out, const float* inp) {
    __shared__ float partial[1024];
    int tid = threadIdx.x;
    partial[tid] = inp[blockIdx.x * blockDim.x + tid];
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (tid < s) partial[tid] += partial[tid + s];
    }
    if (tid == 0) out[blockIdx.x] = partial[0];
}

// the same tree in dynamic shared memory (blockDim.x floats)
__global__ void block_sum_dynamic_kernel(float* out, const float* inp) {
    DYNAMIC_SHARED(float, partial);
    int tid = threadIdx.x;
    partial[tid] = inp[blockIdx.x * blockDim.x + tid];
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (tid < s) partial[tid] += partial[tid + s];
        __syncthreads();
    }
    if (tid == 0) out[blockIdx.x] = partial[0];
}

// planted bug: no barrier between the loads and the tree
__global__ void block_sum_dynamic_missing_load_barrier_kernel(float* out, const float* inp) {
    DYNAMIC_SHARED(float, partial);
    int tid = threadIdx.x;
    partial[tid] = inp[blockIdx.x * blockDim.x + tid];
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (tid < s) partial[tid] += partial[tid + s];
        __syncthreads();
    }
    if (tid == 0) out[blockIdx.x] = partial[0];
}

typedef void (*SumKernel)(float*, const float*);
static std::vector<float> run_block_sum(SumKernel kernel, const std::vector<float>& x, int block_size, bool dynamic) {
    int blocks = (int)x.size() / block_size;
    float* d_x = to_device(x);
    float* d_out = device_zeros<float>(blocks);
    LAUNCH(kernel, blocks, block_size, dynamic ? block_size * sizeof(float) : 0, 0, d_out, d_x);
    std::vector<float> out = from_device(d_out, blocks);
    CUDA_CHECK(cudaFree(d_x));
    CUDA_CHECK(cudaFree(d_out));
    return out;
}

TEST_CASE("a shared-memory tree sum over a block is exact", "[emu]") {
    for (int block_size : {32, 64, 256, 1024}) {
        for (unsigned seed : {1u, 2u}) {
            std::vector<float> x = small_integers((size_t)8 * block_size, seed);
            std::vector<float> expected = block_sums(x, block_size);
            INFO("block " << block_size << ", seed " << seed);
            REQUIRE(run_block_sum(block_sum_kernel, x, block_size, false) == expected);
            REQUIRE(run_block_sum(block_sum_dynamic_kernel, x, block_size, true) == expected);
        }
    }
}

TEST_CASE("a tree sum missing one __syncthreads() is wrong in every block, every run", "[emu]") {
    for (int block_size : {32, 64, 256, 1024}) {
        for (unsigned seed : {1u, 2u, 3u}) {
            std::vector<float> x = small_integers((size_t)8 * block_size, seed);
            std::vector<float> expected = block_sums(x, block_size);
            INFO("block " << block_size << ", seed " << seed);
            for (int run = 0; run < 3; run++) {
                // missing loop barrier: a thread reads a partner's slot before the partner added its
                // subtree, so positive inputs give a sum that is too small
                std::vector<float> loop = run_block_sum(block_sum_missing_loop_barrier_kernel, x, block_size, false);
                // missing load barrier: a thread reads a slot nobody wrote yet: poisoned NaN
                std::vector<float> load =
                    run_block_sum(block_sum_dynamic_missing_load_barrier_kernel, x, block_size, true);
                for (size_t b = 0; b < expected.size(); b++) {
                    INFO("run " << run << ", block " << b << ": expected " << expected[b] << ", got " << loop[b]
                                << " and " << load[b]);
                    REQUIRE(loop[b] < expected[b]);
                    REQUIRE(std::isnan(load[b]));
                }
            }
        }
    }
}

// ---- warp reductions
// every lane gets the sum over its warp
__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}
// out, inp (gridDim.x * blockDim.x)
__global__ void __launch_bounds__(128) warp_sum_xor_kernel(float* __restrict__ out, const float* __restrict__ inp) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    out[i] = warp_sum(inp[i]);
}
// planted bug: offsets 16, 8, 4, 2, never 1
__global__ void warp_sum_xor_skipping_1_kernel(float* out, const float* inp) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    float v = inp[i];
    for (int offset = 16; offset > 1; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    out[i] = v;
}
// lane 0 gets its warp's sum; out (number of warps)
__global__ void warp_sum_down_kernel(float* out, const float* inp) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    float v = inp[i];
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (threadIdx.x % warpSize == 0) out[i / warpSize] = v;
}

TEST_CASE("warp sums with __shfl_xor_sync and __shfl_down_sync are exact; a skipped offset is wrong", "[emu]") {
    const int block = 128, blocks = 4, n = block * blocks;  // 16 warps
    for (unsigned seed : {1u, 2u, 3u}) {
        std::vector<float> x = small_integers(n, seed);
        std::vector<float> warp_sums = block_sums(x, 32);
        float* d_x = to_device(x);
        float* d_out = device_zeros<float>(n);
        LAUNCH(warp_sum_xor_kernel, blocks, block, 0, 0, d_out, d_x);
        std::vector<float> all_lanes = from_device(d_out, n);
        for (int i = 0; i < n; i++) REQUIRE(all_lanes[i] == warp_sums[i / 32]);

        LAUNCH(warp_sum_down_kernel, blocks, block, 0, 0, d_out, d_x);
        std::vector<float> lane0 = from_device(d_out, n / 32);
        REQUIRE(lane0 == warp_sums);

        // each lane sums only the lanes of its own parity: too small for positive inputs
        LAUNCH(warp_sum_xor_skipping_1_kernel, blocks, block, 0, 0, d_out, d_x);
        std::vector<float> skipped = from_device(d_out, n);
        for (int i = 0; i < n; i++) REQUIRE(skipped[i] < warp_sums[i / 32]);
        CUDA_CHECK(cudaFree(d_x));
        CUDA_CHECK(cudaFree(d_out));
    }
}

// ---- shuffle rules: one warp, out (32) per case
__global__ void shuffle_rules_kernel(float* out) {
    int lane = threadIdx.x;
    float v = 100.0f + lane;
    out[0 * 32 + lane] = __shfl_down_sync(0xffffffffu, v, 4);          // lanes 28..31: own value
    out[1 * 32 + lane] = __shfl_up_sync(0xffffffffu, v, 3);            // lanes 0..2: own value
    out[2 * 32 + lane] = __shfl_sync(0xffffffffu, v, 2, 8);            // lane 2 of each group of 8
    out[3 * 32 + lane] = __shfl_down_sync(0xffffffffu, v, 1, 8);       // last lane of each 8: own
    out[4 * 32 + lane] = __shfl_xor_sync(0xffffffffu, v, 16, 16);      // upper half reads lower half
    out[5 * 32 + lane] = __shfl_sync(0xffffffffu, v, lane + 32);       // source lane uses 5 bits
    if (lane < 16) out[6 * 32 + lane] = __shfl_xor_sync(0x0000ffffu, v, 1);   // a 16-lane mask
    if (lane < 16) out[7 * 32 + lane] = __shfl_down_sync(0x0000ffffu, v, 8);  // lanes 8..15 read 16..23: not in mask
}

TEST_CASE("shuffles follow CUDA's rules for width, offsets and lanes outside the mask", "[emu]") {
    float* d_out = device_zeros<float>(8 * 32);
    LAUNCH(shuffle_rules_kernel, 1, 32, 0, 0, d_out);
    std::vector<float> out = from_device(d_out, 8 * 32);
    for (int lane = 0; lane < 32; lane++) {
        INFO("lane " << lane);
        float own = 100.0f + lane;
        REQUIRE(out[0 * 32 + lane] == (lane + 4 < 32 ? own + 4 : own));
        REQUIRE(out[1 * 32 + lane] == (lane >= 3 ? own - 3 : own));
        REQUIRE(out[2 * 32 + lane] == 100.0f + (lane / 8) * 8 + 2);
        REQUIRE(out[3 * 32 + lane] == (lane % 8 == 7 ? own : own + 1));
        REQUIRE(out[4 * 32 + lane] == (lane >= 16 ? own - 16 : own));
        REQUIRE(out[5 * 32 + lane] == own);
        if (lane < 16) REQUIRE(out[6 * 32 + lane] == 100.0f + (lane ^ 1));
        if (lane < 8) REQUIRE(out[7 * 32 + lane] == own + 8);
        // CUDA leaves a source lane outside the mask undefined; the emulation returns NaN
        if (lane >= 8 && lane < 16) REQUIRE(std::isnan(out[7 * 32 + lane]));
    }
    CUDA_CHECK(cudaFree(d_out));
}

struct Pair {
    int index;
    float value;
};
// votes and shuffles of other types; one warp, out (32) per case
__global__ void warp_votes_and_types_kernel(unsigned* votes, double* doubles, float* bf16s, int* pairs) {
    int lane = threadIdx.x;
    votes[0 * 32 + lane] = __ballot_sync(0xffffffffu, lane % 3 == 0);
    votes[1 * 32 + lane] = (unsigned)__any_sync(0xffffffffu, lane == 17);
    votes[2 * 32 + lane] = (unsigned)__all_sync(0xffffffffu, lane < 31);
    votes[3 * 32 + lane] = (unsigned)__all_sync(0xffffffffu, lane < 32);
    votes[4 * 32 + lane] = __activemask();
    votes[5 * 32 + lane] = (unsigned)__reduce_add_sync(0xffffffffu, lane);
    votes[6 * 32 + lane] = (unsigned)__reduce_max_sync(0xffffffffu, 5 - lane);
    votes[7 * 32 + lane] = (unsigned)__syncthreads_count(lane % 4 == 0);
    doubles[lane] = __shfl_xor_sync(0xffffffffu, 0.5 + lane, 1);
    bf16s[lane] = __bfloat162float(__shfl_sync(0xffffffffu, __float2bfloat16((float)lane), 31 - lane));
    Pair p = {lane, 0.25f * lane};
    Pair q = __shfl_up_sync(0xffffffffu, p, 1);
    pairs[lane] = q.index * 1000 + (int)(q.value * 4);
}

TEST_CASE("warp votes, reductions and shuffles of 8-byte, 2-byte and struct values", "[emu]") {
    unsigned* d_votes = device_zeros<unsigned>(8 * 32);
    double* d_doubles = device_zeros<double>(32);
    float* d_bf16s = device_zeros<float>(32);
    int* d_pairs = device_zeros<int>(32);
    LAUNCH(warp_votes_and_types_kernel, 1, 32, 0, 0, d_votes, d_doubles, d_bf16s, d_pairs);
    std::vector<unsigned> votes = from_device(d_votes, 8 * 32);
    std::vector<double> doubles = from_device(d_doubles, 32);
    std::vector<float> bf16s = from_device(d_bf16s, 32);
    std::vector<int> pairs = from_device(d_pairs, 32);
    unsigned every_third = 0;
    for (int l = 0; l < 32; l += 3) every_third |= 1u << l;
    for (int lane = 0; lane < 32; lane++) {
        INFO("lane " << lane);
        REQUIRE(votes[0 * 32 + lane] == every_third);
        REQUIRE(votes[1 * 32 + lane] == 1);
        REQUIRE(votes[2 * 32 + lane] == 0);
        REQUIRE(votes[3 * 32 + lane] == 1);
        REQUIRE(votes[4 * 32 + lane] == 0xffffffffu);
        REQUIRE(votes[5 * 32 + lane] == 31 * 32 / 2);
        REQUIRE(votes[6 * 32 + lane] == 5);
        REQUIRE(votes[7 * 32 + lane] == 8);
        REQUIRE(doubles[lane] == 0.5 + (lane ^ 1));
        REQUIRE(bf16s[lane] == (float)(31 - lane));
        int src = lane == 0 ? 0 : lane - 1;
        REQUIRE(pairs[lane] == src * 1000 + src);
    }
    CUDA_CHECK(cudaFree(d_votes));
    CUDA_CHECK(cudaFree(d_doubles));
    CUDA_CHECK(cudaFree(d_bf16s));
    CUDA_CHECK(cudaFree(d_pairs));
}

// lanes exchange through shared memory: out[i] = the value of the next lane in the warp
__global__ void warp_rotate_kernel(int* out, int with_syncwarp) {
    DYNAMIC_SHARED(int, buffer);
    int lane = threadIdx.x % 32, warp_base = threadIdx.x - lane;
    buffer[threadIdx.x] = 1000 * blockIdx.x + threadIdx.x;
    if (with_syncwarp) __syncwarp();
    out[blockIdx.x * blockDim.x + threadIdx.x] = buffer[warp_base + (lane + 1) % 32];
}

TEST_CASE("a warp exchanging through shared memory needs __syncwarp()", "[emu]") {
    const int block = 64, blocks = 4, n = block * blocks;
    int* d_out = device_zeros<int>(n);
    LAUNCH(warp_rotate_kernel, blocks, block, block * sizeof(int), 0, d_out, 1);
    std::vector<int> synced = from_device(d_out, n);
    LAUNCH(warp_rotate_kernel, blocks, block, block * sizeof(int), 0, d_out, 0);
    std::vector<int> unsynced = from_device(d_out, n);
    int wrong = 0;
    for (int i = 0; i < n; i++) {
        int b = i / block, t = i % block, lane = t % 32;
        int expected = 1000 * b + (t - lane) + (lane + 1) % 32;
        REQUIRE(synced[i] == expected);
        wrong += unsynced[i] != expected;
    }
    // a lane that runs before its neighbour stored reads poison; about half of them do
    REQUIRE(wrong > n / 4);
    CUDA_CHECK(cudaFree(d_out));
}

// ---- shared memory is per block
// every thread of a block reports the value thread 0 of its block stored
__global__ void static_shared_kernel(int* out) {
    __shared__ int block_value;
    if (threadIdx.x == 0) block_value = 7 * blockIdx.x + 1;
    __syncthreads();
    out[blockIdx.x * blockDim.x + threadIdx.x] = block_value;
}

// ok (gridDim.x * blockDim.x): 1 when the block's dynamic shared memory was poisoned and aligned,
// and when the values the block's threads wrote come back
__global__ void dynamic_shared_kernel(int* ok, int shared_bytes) {
    DYNAMIC_SHARED(unsigned char, bytes);
    int tid = threadIdx.x, n = blockDim.x;
    int good = ((uintptr_t)bytes % 16) == 0;
    for (int i = tid; i < shared_bytes; i += n) good &= bytes[i] == 0xFF;
    __syncthreads();
    for (int i = tid; i < shared_bytes; i += n) bytes[i] = (unsigned char)(blockIdx.x + i);
    __syncthreads();
    for (int i = n - 1 - tid; i < shared_bytes; i += n) good &= bytes[i] == (unsigned char)(blockIdx.x + i);
    ok[blockIdx.x * n + tid] = good;
}

TEST_CASE("static __shared__ and dynamic shared memory are per block", "[emu]") {
    // 3 warps, not a power of two; more blocks than OS threads, so threads run several blocks
    const int block = 96, blocks = 37;
    int* d_out = device_zeros<int>(block * blocks);
    LAUNCH(static_shared_kernel, blocks, block, 0, 0, d_out);
    std::vector<int> out = from_device(d_out, block * blocks);
    for (int i = 0; i < block * blocks; i++) REQUIRE(out[i] == 7 * (i / block) + 1);

    // sizes: not a multiple of 16, the 48 KB default limit, and above it after opting in
    CUDA_CHECK(cudaFuncSetAttribute(dynamic_shared_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 100 * 1024));
    for (int bytes : {1000, 48 * 1024, 100 * 1024}) {
        INFO(bytes << " bytes");
        LAUNCH(dynamic_shared_kernel, blocks, block, bytes, 0, d_out, bytes);
        out = from_device(d_out, block * blocks);
        REQUIRE(std::count(out.begin(), out.end(), 1) == block * blocks);
    }
    CUDA_CHECK(cudaFree(d_out));
}

// ---- errors that must stop a test instead of hanging it
__global__ void early_return_kernel(float* out) {
    if (threadIdx.x >= 32) return;
    out[threadIdx.x] = 1.0f;
    __syncthreads();
}
__global__ void divergent_barriers_kernel(float* out) {
    if (threadIdx.x % 2 == 0) {
        out[threadIdx.x] = 1.0f;
        __syncthreads();
    } else {
        __syncthreads();
    }
}
__global__ void shuffle_with_exited_lane_kernel(float* out) {
    if (threadIdx.x == 5) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}
__global__ void full_mask_in_partial_warp_kernel(float* out) {
    out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.0f, 1);
}
__global__ void mismatched_masks_kernel(float* out) {
    unsigned mask = threadIdx.x == 0 ? 0x3u : 0xffffffffu;
    out[threadIdx.x] = __shfl_xor_sync(mask, 1.0f, 1);
}
__global__ void different_primitives_kernel(float* out) {
    if (threadIdx.x < 16)
        out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
    else
        out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.0f, 1);
}

#ifdef MIXLN_ASAN
// Under AddressSanitizer (`make sanitize`): a kernel's access outside its allocation is reported,
// on the fibers' stacks as on cudaMalloc memory. Each kernel reads or writes one element too far.
__global__ void read_past_end_kernel(float* out, const float* inp, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) out[i % n] = inp[i];   // i == n reads one float past the end
}
__global__ void write_before_start_kernel(float* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i - 1] = 1.0f;   // thread 0 writes the float before the allocation
}
__global__ void local_array_overrun_kernel(float* out, int index) {
    float local[8];
    for (int i = 0; i < 8; i++) local[i] = (float)(i + threadIdx.x);
    const float* through_pointer = local;
    __asm__("" : "+r"(through_pointer));   // hides the array from UBSan's bounds checks: ASan's turn
    out[threadIdx.x] = through_pointer[index];   // index 8: past the array, on the fiber's stack
}

TEST_CASE("under AddressSanitizer a kernel's access outside its memory is reported", "[emu][asan]") {
    const int n = 100;   // 400 bytes: not a multiple of 256, so the end is inside a rounded-up block
    float* d_inp = device_zeros<float>(n);
    float* d_out = device_zeros<float>(n);
    // in bounds: clean
    LAUNCH(read_past_end_kernel, 1, 64, 0, 0, d_out, d_inp, 63);
    LAUNCH(local_array_overrun_kernel, 1, 32, 0, 0, d_out, 7);
    REQUIRE_FAILS_WITH("heap-buffer-overflow", LAUNCH(read_past_end_kernel, 2, 64, 0, 0, d_out, d_inp, n));
    REQUIRE_FAILS_WITH("read_past_end_kernel", LAUNCH(read_past_end_kernel, 2, 64, 0, 0, d_out, d_inp, n));
    REQUIRE_FAILS_WITH("heap-buffer-overflow", LAUNCH(write_before_start_kernel, 2, 64, 0, 0, d_out, n));
    REQUIRE_FAILS_WITH("stack-buffer-overflow", LAUNCH(local_array_overrun_kernel, 1, 32, 0, 0, d_out, 8));
    CUDA_CHECK(cudaFree(d_inp));
    CUDA_CHECK(cudaFree(d_out));
}
#endif

TEST_CASE("barriers and warp primitives that cannot complete fail with the line instead of hanging", "[emu]") {
    float* d_out = device_zeros<float>(64);
    std::string file = __FILE__;
    REQUIRE_FAILS_WITH("__syncthreads() at " + file + ":", LAUNCH(early_return_kernel, 2, 64, 0, 0, d_out));
    REQUIRE_FAILS_WITH("reached by 32 of 64 threads of block (0,0,0); 32 exited without reaching it",
                       LAUNCH(early_return_kernel, 2, 64, 0, 0, d_out));
    REQUIRE_FAILS_WITH("wait at different __syncthreads()", LAUNCH(divergent_barriers_kernel, 1, 64, 0, 0, d_out));
    REQUIRE_FAILS_WITH("which has exited", LAUNCH(shuffle_with_exited_lane_kernel, 1, 32, 0, 0, d_out));
    REQUIRE_FAILS_WITH("the block's last warp has only 16 threads",
                       LAUNCH(full_mask_in_partial_warp_kernel, 1, 48, 0, 0, d_out));
    REQUIRE_FAILS_WITH("__shfl_xor_sync at " + file + ":", LAUNCH(mismatched_masks_kernel, 1, 32, 0, 0, d_out));
    REQUIRE_FAILS_WITH("different warp primitives", LAUNCH(different_primitives_kernel, 1, 32, 0, 0, d_out));
    // outside a kernel there is no block to synchronise
    REQUIRE_FAILS_WITH("__syncthreads() called outside an emulated kernel", __syncthreads());
    CUDA_CHECK(cudaFree(d_out));
}

// ---- atomics
__global__ void atomics_kernel(int* count, float* sum, unsigned long long* big, double* dsum, int* max_min) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    atomicAdd(count, 1);
    atomicAdd(sum, 0.5f);
    atomicAdd(big, 1ull << 33);
    atomicAdd(dsum, 0.25);
    atomicMax(&max_min[0], i);
    atomicMin(&max_min[1], -i);
    // exactly one thread swaps the flag from 0 to its id + 1
    if (atomicCAS(&max_min[2], 0, i + 1) == 0) atomicAdd(&max_min[3], 1);
}

TEST_CASE("atomics across many blocks and threads", "[emu]") {
    const int block = 256, blocks = 64, n = block * blocks;
    int* count = device_zeros<int>(1);
    float* sum = device_zeros<float>(1);
    unsigned long long* big = device_zeros<unsigned long long>(1);
    double* dsum = device_zeros<double>(1);
    int* max_min = device_zeros<int>(4);
    LAUNCH(atomics_kernel, blocks, block, 0, 0, count, sum, big, dsum, max_min);
    REQUIRE(from_device(count, 1)[0] == n);
    // n / 2 = 8192: every partial sum of halves is exact in float
    REQUIRE(from_device(sum, 1)[0] == 0.5f * n);
    REQUIRE(from_device(big, 1)[0] == (unsigned long long)n << 33);
    REQUIRE(from_device(dsum, 1)[0] == 0.25 * n);
    std::vector<int> mm = from_device(max_min, 4);
    REQUIRE(mm[0] == n - 1);
    REQUIRE(mm[1] == -(n - 1));
    REQUIRE(mm[2] >= 1);
    REQUIRE(mm[3] == 1);
    CUDA_CHECK(cudaFree(count));
    CUDA_CHECK(cudaFree(sum));
    CUDA_CHECK(cudaFree(big));
    CUDA_CHECK(cudaFree(dsum));
    CUDA_CHECK(cudaFree(max_min));
}

// ---- indexing: every (x, y, z) of a 3D grid of 3D blocks is visited once
// hits (X*Y*Z), ids (X*Y*Z): X = gridDim.x * blockDim.x, ...
__global__ void index_3d_kernel(int* hits, int* ids) {
    int x = blockIdx.x * blockDim.x + threadIdx.x;
    int y = blockIdx.y * blockDim.y + threadIdx.y;
    int z = blockIdx.z * blockDim.z + threadIdx.z;
    int X = gridDim.x * blockDim.x, Y = gridDim.y * blockDim.y;
    int i = (z * Y + y) * X + x;
    atomicAdd(&hits[i], 1);
    int block = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    int thread = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
    ids[i] = block * 1000 + thread;
}

TEST_CASE("2D and 3D grids and blocks cover every element once", "[emu]") {
    for (auto shape : {std::make_pair(dim3(3, 4, 2), dim3(8, 4, 2)), std::make_pair(dim3(5, 3, 1), dim3(16, 2, 1))}) {
        dim3 grid = shape.first, block = shape.second;
        int X = grid.x * block.x, Y = grid.y * block.y, Z = grid.z * block.z, n = X * Y * Z;
        int* hits = device_zeros<int>(n);
        int* ids = device_zeros<int>(n);
        LAUNCH(index_3d_kernel, grid, block, 0, 0, hits, ids);
        std::vector<int> h = from_device(hits, n), id = from_device(ids, n);
        for (int z = 0; z < Z; z++)
            for (int y = 0; y < Y; y++)
                for (int x = 0; x < X; x++) {
                    int i = (z * Y + y) * X + x;
                    int b = ((z / block.z) * grid.y + y / block.y) * grid.x + x / block.x;
                    int t = ((z % block.z) * block.y + y % block.y) * block.x + x % block.x;
                    REQUIRE(h[i] == 1);
                    REQUIRE(id[i] == b * 1000 + t);
                }
        CUDA_CHECK(cudaFree(hits));
        CUDA_CHECK(cudaFree(ids));
    }
}

// order[k] = the k-th thread of the block to start running
__global__ void start_order_kernel(int* order, int* next) {
    order[atomicAdd(next, 1)] = threadIdx.x;
}

TEST_CASE("threads of a block do not run in thread-id order, nor in reverse", "[emu]") {
    const int block = 256;
    int* order = device_zeros<int>(block);
    int* next = device_zeros<int>(1);
    LAUNCH(start_order_kernel, 1, block, 0, 0, order, next);
    std::vector<int> o = from_device(order, block);
    std::vector<int> forward(block), backward(block);
    for (int i = 0; i < block; i++) forward[i] = i, backward[i] = block - 1 - i;
    REQUIRE(o != forward);
    REQUIRE(o != backward);
    std::sort(o.begin(), o.end());
    REQUIRE(o == forward);
    CUDA_CHECK(cudaFree(order));
    CUDA_CHECK(cudaFree(next));
}

// ---- launch configuration
__global__ void noop_kernel(float*) {}

TEST_CASE("a bad launch configuration fails LAUNCH with its file and line", "[emu]") {
    float* d_out = device_zeros<float>(1);
    const int launch_line = __LINE__ + 2;
    REQUIRE_FAILS_WITH("CUDA error at " + std::string(__FILE__) + ":" + std::to_string(launch_line) +
                           ": invalid configuration argument", LAUNCH(noop_kernel, 1, 2048, 0, 0, d_out));
    // as on a GPU, the error waits for the next cudaGetLastError(), which clears it
    cuda_emu_launch(noop_kernel, dim3(1), dim3(2048), 0, 0, d_out);
    REQUIRE(cudaPeekAtLastError() == cudaErrorInvalidConfiguration);
    REQUIRE(cudaGetLastError() == cudaErrorInvalidConfiguration);
    REQUIRE(cudaGetLastError() == cudaSuccess);
    cuda_emu_launch(noop_kernel, dim3(0), dim3(32), 0, 0, d_out);
    REQUIRE(cudaGetLastError() == cudaErrorInvalidConfiguration);
    cuda_emu_launch(noop_kernel, dim3(1), dim3(1, 1, 65), 0, 0, d_out);
    REQUIRE(cudaGetLastError() == cudaErrorInvalidConfiguration);
    cuda_emu_launch(noop_kernel, dim3(1, 65536), dim3(32), 0, 0, d_out);
    REQUIRE(cudaGetLastError() == cudaErrorInvalidConfiguration);
    // more than 48 KB of dynamic shared memory needs the opt-in; never more than 227 KB
    cuda_emu_launch(noop_kernel, dim3(1), dim3(32), 48 * 1024 + 1, 0, d_out);
    REQUIRE(cudaGetLastError() == cudaErrorInvalidValue);
    REQUIRE(cudaFuncSetAttribute(noop_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 228 * 1024) ==
            cudaErrorInvalidValue);
    REQUIRE(cudaGetLastError() == cudaErrorInvalidValue);
    CUDA_CHECK(cudaFuncSetAttribute(noop_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 227 * 1024));
    LAUNCH(noop_kernel, 1, 32, 227 * 1024, 0, d_out);
    CUDA_CHECK(cudaFree(d_out));
}

// ---- bf16, memory, device
TEST_CASE("bf16 conversions round to nearest even", "[emu]") {
    auto bits = [](__nv_bfloat16 b) {
        unsigned short u;
        memcpy(&u, &b, 2);
        return u;
    };
    auto from_bits = [](uint32_t u) {
        float f;
        memcpy(&f, &u, 4);
        return f;
    };
    // 0x3F808000 = 1 + 2^-8 is halfway between bf16 0x3F80 (1) and 0x3F81: ties go to the even 0x3F80
    REQUIRE(bits(__float2bfloat16(from_bits(0x3F808000u))) == 0x3F80);
    // 0x3F818000 is halfway between 0x3F81 and 0x3F82: ties go to the even 0x3F82
    REQUIRE(bits(__float2bfloat16_rn(from_bits(0x3F818000u))) == 0x3F82);
    // one float ulp above halfway rounds up, one below rounds down
    REQUIRE(bits(__float2bfloat16(from_bits(0x3F808001u))) == 0x3F81);
    REQUIRE(bits(__float2bfloat16(from_bits(0x3F817FFFu))) == 0x3F81);
    REQUIRE(bits(__float2bfloat16(-2.5f)) == 0xC020);
    REQUIRE(__bfloat162float(__float2bfloat16(3.140625f)) == 3.140625f);  // exactly representable
    REQUIRE(std::isnan(__bfloat162float(__float2bfloat16(NAN))));
    REQUIRE(std::isinf(__bfloat162float(__float2bfloat16(3.4e38f))));  // above the largest bf16
}

TEST_CASE("cudaMalloc memory is poisoned; cudaMemcpy and cudaMemset work and check their ranges", "[emu]") {
    const int n = 100;
    float* d = nullptr;
    CUDA_CHECK(cudaMalloc((void**)&d, n * sizeof(float)));
    REQUIRE((uintptr_t)d % 256 == 0);
    std::vector<float> h = from_device(d, n);
    for (float v : h) REQUIRE(std::isnan(v));
    std::vector<float> x = small_integers(n, 7);
    CUDA_CHECK(cudaMemcpy(d, x.data(), n * sizeof(float), cudaMemcpyHostToDevice));
    float* d2 = nullptr;
    CUDA_CHECK(cudaMalloc((void**)&d2, n * sizeof(float)));
    CUDA_CHECK(cudaMemcpyAsync(d2, d, n * sizeof(float), cudaMemcpyDeviceToDevice, 0));
    REQUIRE(from_device(d2, n) == x);
    CUDA_CHECK(cudaMemsetAsync(d2, 0, 10 * sizeof(float), 0));
    h = from_device(d2, n);
    for (int i = 0; i < n; i++) REQUIRE(h[i] == (i < 10 ? 0.0f : x[i]));
    // the device side must lie inside one allocation
    REQUIRE(cudaMemcpy(d, x.data(), (n + 1) * sizeof(float), cudaMemcpyHostToDevice) == cudaErrorInvalidValue);
    REQUIRE(cudaMemcpy(x.data(), x.data() + 1, sizeof(float), cudaMemcpyDeviceToHost) == cudaErrorInvalidValue);
    REQUIRE(cudaMemset(d + n, 0, 1) == cudaErrorInvalidValue);
    REQUIRE(cudaFree(x.data()) == cudaErrorInvalidValue);
    REQUIRE(cudaGetLastError() == cudaErrorInvalidValue);
    REQUIRE(std::string(cudaGetErrorString(cudaErrorInvalidValue)) == "invalid argument");
    CUDA_CHECK(cudaFree(d));
    CUDA_CHECK(cudaFree(d2));
    CUDA_CHECK(cudaFree(nullptr));

    int count = 0;
    CUDA_CHECK(cudaGetDeviceCount(&count));
    REQUIRE(count == 1);
    CUDA_CHECK(cudaSetDevice(0));
    cudaDeviceProp prop;
    CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    REQUIRE(std::string(prop.name) == "CPU emulation");
    REQUIRE(prop.major == 9);
    REQUIRE(prop.warpSize == 32);
    REQUIRE(prop.multiProcessorCount >= 1);
    REQUIRE(prop.sharedMemPerBlockOptin == 227 * 1024);
    // device attributes agree with the properties; one the emulation does not know is an error
    int multiprocessors = 0, threads_per_multiprocessor = 0, unknown = 0;
    CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, 0));
    CUDA_CHECK(cudaDeviceGetAttribute(&threads_per_multiprocessor, cudaDevAttrMaxThreadsPerMultiProcessor, 0));
    REQUIRE(multiprocessors == prop.multiProcessorCount);
    REQUIRE(threads_per_multiprocessor == prop.maxThreadsPerMultiProcessor);
    REQUIRE(cudaDeviceGetAttribute(&unknown, cudaDevAttrClockRate, 0) == cudaErrorInvalidValue);
    REQUIRE(cudaDeviceGetAttribute(&unknown, cudaDevAttrMultiProcessorCount, 1) == cudaErrorInvalidDevice);
    // resident blocks per multiprocessor, by threads and dynamic shared memory (no registers here)
    int blocks = 0;
    CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, block_sum_kernel, 256, 0));
    REQUIRE(blocks == 8);
    CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, block_sum_kernel, 32, 0));
    REQUIRE(blocks == 32);
    CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, block_sum_kernel, 128, 100 * 1024));
    REQUIRE(blocks == 2);
    REQUIRE(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, block_sum_kernel, 2048, 0) == cudaErrorInvalidValue);
    REQUIRE(cudaGetLastError() == cudaErrorInvalidValue);
    cudaStream_t stream;
    CUDA_CHECK(cudaStreamCreate(&stream));
    CUDA_CHECK(cudaStreamSynchronize(stream));
    CUDA_CHECK(cudaStreamDestroy(stream));
    CUDA_CHECK(cudaDeviceSynchronize());
}

// ---- math in kernels
__global__ void math_kernel(float* out, int* ints) {
    float x = 0.5f;
    out[0] = expf(x) - __expf(x);
    out[1] = rsqrtf(4.0f);
    out[2] = __fdividef(1.0f, 4.0f) + __frcp_rn(2.0f) + __fmul_rn(2.0f, 3.0f) + __fadd_rn(1.0f, 1.0f);
    out[3] = __saturatef(1.5f) + __saturatef(-1.0f) + __saturatef(NAN);
    out[4] = max(1.0f, 2.0f) + min(3.0f, -INFINITY);
    out[5] = tanhf(0.0f) + powf(2.0f, 3.0f) + cosf(0.0f) + sinf(0.0f) + fabsf(-1.0f) + logf(1.0f) + sqrtf(9.0f);
    ints[0] = __float2int_rn(2.5f) * 100 + __float2int_rn(3.5f);  // ties to even: 2 and 4
    ints[1] = max(3, 7) - min(3, 7) + (int)max(2u, 5u);
    ints[2] = __popc(0xF0u) + __clz(1) + __ffs(8);
    ints[3] = __float2int_rn(NAN) + __float2int_rn(1e20f) / 2;
}

TEST_CASE("CUDA math functions and intrinsics work in kernels without touching std::max", "[emu]") {
    float* d_out = device_zeros<float>(6);
    int* d_ints = device_zeros<int>(4);
    LAUNCH(math_kernel, 1, 1, 0, 0, d_out, d_ints);
    std::vector<float> out = from_device(d_out, 6);
    std::vector<int> ints = from_device(d_ints, 4);
    REQUIRE(out[0] == 0.0f);
    REQUIRE(out[1] == 0.5f);
    REQUIRE(out[2] == 0.25f + 0.5f + 6.0f + 2.0f);
    REQUIRE(out[3] == 1.0f);
    REQUIRE(out[4] == -INFINITY);
    REQUIRE(out[5] == 8.0f + 1.0f + 1.0f + 3.0f);
    REQUIRE(ints[0] == 204);
    REQUIRE(ints[1] == 9);
    REQUIRE(ints[2] == 4 + 31 + 4);
    REQUIRE(ints[3] == INT_MAX / 2);
    REQUIRE(std::max(2, 3) == 3);
    REQUIRE(std::min<size_t>(2, 3) == 2);
    CUDA_CHECK(cudaFree(d_out));
    CUDA_CHECK(cudaFree(d_ints));
}

// ---- WMMA (tensor cores): the 16x16x16 bf16 subset
namespace wmma = nvcuda::wmma;

// strides: larger than a tile's 16, and every tile starts 32-byte aligned
constexpr int kWmmaLdBf16 = 24, kWmmaLdFloat = 20;
constexpr int kWmmaTileBf16 = 16 * kWmmaLdBf16, kWmmaTileFloat = 16 * kWmmaLdFloat;

// one product per warp: D = A * B + C, for tile number (block * warps + warp) of each array;
// A and B are bf16 with the fragments' layouts, C and D float in mem_row_major or mem_col_major
template <typename LayoutA, typename LayoutB>
__global__ void wmma_product_kernel(float* d, const bf16* a, const bf16* b, const float* c, int c_col_major,
                                    int d_col_major) {
    int tile = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, LayoutA> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, LayoutB> fb;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::load_matrix_sync(fa, a + tile * kWmmaTileBf16, kWmmaLdBf16);
    wmma::load_matrix_sync(fb, b + tile * kWmmaTileBf16, kWmmaLdBf16);
    wmma::load_matrix_sync(acc, c + tile * kWmmaTileFloat, kWmmaLdFloat,
                           c_col_major ? wmma::mem_col_major : wmma::mem_row_major);
    wmma::mma_sync(acc, fa, fb, acc);  // d is c
    wmma::store_matrix_sync(d + tile * kWmmaTileFloat, acc, kWmmaLdFloat,
                            d_col_major ? wmma::mem_col_major : wmma::mem_row_major);
}

// random 16x16 tiles: A and B exactly bf16, C float
struct WmmaTiles {
    int tiles;
    std::vector<float> a, b, c;  // tiles * 256 each, logical (row, col) at [t * 256 + row * 16 + col]
};
static WmmaTiles wmma_random_tiles(int tiles, unsigned seed) {
    WmmaTiles w{tiles, {}, {}, {}};
    auto next = [&seed]() {
        seed = seed * 1664525u + 1013904223u;
        return (float)((seed >> 8) & 0xFFFF) / 32768.0f - 1.0f;  // in [-1, 1)
    };
    for (int i = 0; i < tiles * 256; i++) {
        w.a.push_back(__bfloat162float(__float2bfloat16_rn(next())));  // exactly bf16
        w.b.push_back(__bfloat162float(__float2bfloat16_rn(next())));
        w.c.push_back(next());
    }
    return w;
}
// where logical element (r, c) of tile t lies in memory with stride ld, row- or column-major
static size_t wmma_index(int t, int r, int c, int ld, bool col_major) {
    return (size_t)t * 16 * ld + (col_major ? c * ld + r : r * ld + c);
}
// logical tiles -> memory; the padding is NaN
template <typename T>
static std::vector<T> wmma_to_memory(const std::vector<float>& logical, int tiles, int ld, bool col_major) {
    std::vector<T> out((size_t)tiles * 16 * ld, from_float<T>(NAN));
    for (int t = 0; t < tiles; t++)
        for (int r = 0; r < 16; r++)
            for (int c = 0; c < 16; c++)
                out[wmma_index(t, r, c, ld, col_major)] = from_float<T>(logical[t * 256 + r * 16 + c]);
    return out;
}
template <typename T>
static std::vector<float> wmma_from_memory(const std::vector<T>& memory, int tiles, int ld, bool col_major) {
    std::vector<float> out((size_t)tiles * 256);
    for (int t = 0; t < tiles; t++)
        for (int r = 0; r < 16; r++)
            for (int c = 0; c < 16; c++) out[t * 256 + r * 16 + c] = to_float(memory[wmma_index(t, r, c, ld, col_major)]);
    return out;
}
// Is got = A * B + C (per tile), to float summation's error? (c empty: C = 0)
static bool wmma_matches_product(const std::vector<float>& got, const std::vector<float>& a,
                                 const std::vector<float>& b, const std::vector<float>& c, int tiles) {
    for (int t = 0; t < tiles; t++)
        for (int m = 0; m < 16; m++)
            for (int n = 0; n < 16; n++) {
                double sum = c.empty() ? 0.0 : c[t * 256 + m * 16 + n], magnitude = std::fabs(sum);
                for (int k = 0; k < 16; k++) {
                    double p = (double)a[t * 256 + m * 16 + k] * b[t * 256 + k * 16 + n];
                    sum += p;
                    magnitude += std::fabs(p);
                }
                double g = got[t * 256 + m * 16 + n];
                if (!(std::fabs(g - sum) <= 1e-5 * magnitude + 1e-30)) return false;
            }
    return true;
}

template <typename LayoutA, typename LayoutB>
static void check_wmma_product(int blocks, int warps, bool c_col_major, bool d_col_major, unsigned seed) {
    bool a_col = std::is_same<LayoutA, wmma::col_major>::value, b_col = std::is_same<LayoutB, wmma::col_major>::value;
    int tiles = blocks * warps;
    WmmaTiles w = wmma_random_tiles(tiles, seed);
    bf16* d_a = to_device(wmma_to_memory<bf16>(w.a, tiles, kWmmaLdBf16, a_col));
    bf16* d_b = to_device(wmma_to_memory<bf16>(w.b, tiles, kWmmaLdBf16, b_col));
    float* d_c = to_device(wmma_to_memory<float>(w.c, tiles, kWmmaLdFloat, c_col_major));
    float* d_d = to_device(std::vector<float>((size_t)tiles * kWmmaTileFloat, -7.0f));  // -7: padding untouched
    auto kernel = wmma_product_kernel<LayoutA, LayoutB>;  // LAUNCH is a macro: no commas in its arguments
    LAUNCH(kernel, blocks, 32 * warps, 0, 0, d_d, d_a, d_b, d_c, (int)c_col_major, (int)d_col_major);
    std::vector<float> memory = from_device(d_d, (size_t)tiles * kWmmaTileFloat);
    INFO("A " << (a_col ? "col" : "row") << "_major, B " << (b_col ? "col" : "row") << "_major, C "
              << (c_col_major ? "col" : "row") << ", D " << (d_col_major ? "col" : "row") << ", " << blocks
              << " blocks of " << warps << " warps");
    REQUIRE(wmma_matches_product(wmma_from_memory(memory, tiles, kWmmaLdFloat, d_col_major), w.a, w.b, w.c, tiles));
    REQUIRE(std::count(memory.begin(), memory.end(), -7.0f) == (long)tiles * 16 * (kWmmaLdFloat - 16));
    CUDA_CHECK(cudaFree(d_a));
    CUDA_CHECK(cudaFree(d_b));
    CUDA_CHECK(cudaFree(d_c));
    CUDA_CHECK(cudaFree(d_d));
}

TEST_CASE("wmma: mma_sync computes A * B + C for every layout of A, B, C and D", "[emu][wmma]") {
    // one warp, every layout of A and B, C and D row-major
    check_wmma_product<wmma::row_major, wmma::row_major>(1, 1, false, false, 1);
    check_wmma_product<wmma::row_major, wmma::col_major>(1, 1, false, false, 2);
    check_wmma_product<wmma::col_major, wmma::row_major>(1, 1, false, false, 3);
    check_wmma_product<wmma::col_major, wmma::col_major>(1, 1, false, false, 4);
    // C loaded and D stored column-major
    check_wmma_product<wmma::row_major, wmma::col_major>(1, 1, true, false, 5);
    check_wmma_product<wmma::row_major, wmma::col_major>(1, 1, false, true, 6);
    check_wmma_product<wmma::col_major, wmma::row_major>(1, 1, true, true, 7);
}

TEST_CASE("wmma: the warps of a block multiply independently", "[emu][wmma]") {
    check_wmma_product<wmma::row_major, wmma::col_major>(1, 2, false, false, 8);  // one block of 64 threads
    check_wmma_product<wmma::col_major, wmma::row_major>(5, 2, true, false, 9);   // five of them
    check_wmma_product<wmma::row_major, wmma::row_major>(3, 4, false, true, 10);  // 128 threads
}

// D = A * B with A (16x16, row-major, ld 16) staged in dynamic shared memory by the warp, each lane
// copying 8 elements: row lane / 2, columns (lane % 2) * 8 ... + 7. Planted bug without
// with_syncwarp: load_matrix_sync reads elements other lanes have not stored yet.
__global__ void wmma_staged_kernel(float* d, const bf16* a, const bf16* b, int with_syncwarp) {
    DYNAMIC_SHARED(bf16, tile);
    int lane = threadIdx.x, row = lane / 2, col0 = (lane % 2) * 8;
    for (int i = 0; i < 8; i++) tile[row * 16 + col0 + i] = a[row * 16 + col0 + i];
    if (with_syncwarp) __syncwarp();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> fb;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::load_matrix_sync(fa, tile, 16);
    wmma::load_matrix_sync(fb, b, 16);
    wmma::fill_fragment(acc, 0.0f);
    wmma::mma_sync(acc, fa, fb, acc);
    wmma::store_matrix_sync(d, acc, 16, wmma::mem_row_major);
}

TEST_CASE("wmma: load_matrix_sync of a tile the warp just wrote needs __syncwarp()", "[emu][wmma]") {
    WmmaTiles w = wmma_random_tiles(1, 11);
    bf16* d_a = to_device(wmma_to_memory<bf16>(w.a, 1, 16, false));
    bf16* d_b = to_device(wmma_to_memory<bf16>(w.b, 1, 16, false));
    float* d_d = device_zeros<float>(256);
    for (int run = 0; run < 3; run++) {
        INFO("run " << run);
        LAUNCH(wmma_staged_kernel, 1, 32, 256 * sizeof(bf16), 0, d_d, d_a, d_b, 1);
        REQUIRE(wmma_matches_product(from_device(d_d, 256), w.a, w.b, {}, 1));
        // without __syncwarp: lanes read the poisoned (NaN) shared memory their neighbours had not
        // overwritten yet
        LAUNCH(wmma_staged_kernel, 1, 32, 256 * sizeof(bf16), 0, d_d, d_a, d_b, 0);
        REQUIRE_FALSE(wmma_matches_product(from_device(d_d, 256), w.a, w.b, {}, 1));
    }
    CUDA_CHECK(cudaFree(d_a));
    CUDA_CHECK(cudaFree(d_b));
    CUDA_CHECK(cudaFree(d_d));
}

// out = 2 * in (16x16, row-major): x[] scaled uniformly, which is all a kernel may do with it
__global__ void wmma_scale_kernel(float* out, const float* in) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::load_matrix_sync(acc, in, 16, wmma::mem_row_major);
    for (int i = 0; i < acc.num_elements; i++) acc.x[i] *= 2.0f;
    wmma::store_matrix_sync(out, acc, 16, wmma::mem_row_major);
}
// planted bug: out should be in (16x16, row-major), but the kernel fills the accumulator as if
// lane held row lane / 2, columns (lane % 2) * 8 + i in x[i]
__global__ void wmma_assumed_layout_kernel(float* out, const float* in) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    int lane = threadIdx.x % 32;
    for (int i = 0; i < acc.num_elements; i++) acc.x[i] = in[(lane / 2) * 16 + (lane % 2) * 8 + i];
    wmma::store_matrix_sync(out, acc, 16, wmma::mem_row_major);
}

TEST_CASE("wmma: uniform work on fragment elements is right; assuming a layout is wrong", "[emu][wmma]") {
    std::vector<float> x(256);
    for (int i = 0; i < 256; i++) x[i] = 0.5f + i;  // all different
    float* d_in = to_device(x);
    float* d_out = device_zeros<float>(256);
    LAUNCH(wmma_scale_kernel, 1, 32, 0, 0, d_out, d_in);
    std::vector<float> out = from_device(d_out, 256);
    for (int i = 0; i < 256; i++) REQUIRE(out[i] == 2.0f * x[i]);
    LAUNCH(wmma_assumed_layout_kernel, 1, 32, 0, 0, d_out, d_in);
    out = from_device(d_out, 256);
    int wrong = 0;
    for (int i = 0; i < 256; i++) wrong += out[i] != x[i];
    REQUIRE(wrong > 200);  // every element is stored once, almost all in the wrong place
    std::vector<float> sorted_out = out, sorted_x = x;
    std::sort(sorted_out.begin(), sorted_out.end());
    std::sort(sorted_x.begin(), sorted_x.end());
    REQUIRE(sorted_out == sorted_x);
    CUDA_CHECK(cudaFree(d_in));
    CUDA_CHECK(cudaFree(d_out));
}

// wrong calls, one per `which`
__global__ void wmma_bad_call_kernel(float* out, const bf16* a, int which) {
    DYNAMIC_SHARED(bf16, tile);  // 1024 bytes
    wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> fb;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(fa, __float2bfloat16(1.0f));
    wmma::fill_fragment(fb, __float2bfloat16(1.0f));
    wmma::fill_fragment(acc, 0.0f);
    if (which == 0) wmma::load_matrix_sync(fa, a + 1, 16);        // 2 bytes off a 256-byte aligned allocation
    if (which == 1) wmma::load_matrix_sync(fb, tile + 8, 16);     // 16 bytes into shared memory
    if (which == 2) wmma::load_matrix_sync(fa, a, 12);            // ldm: 24 bytes
    if (which == 3) wmma::store_matrix_sync(out, acc, 18, wmma::mem_col_major);  // ldm: 72 bytes
    if (which == 4 && threadIdx.x == 5) return;                   // mma_sync with an exited lane
    if (which == 5 && threadIdx.x < 16) __syncwarp();             // lanes in different primitives
    if (which == 6) wmma::load_matrix_sync(fa, a, 16);            // in a warp of 16 threads
    wmma::mma_sync(acc, fa, fb, acc);
    wmma::store_matrix_sync(out, acc, 16, wmma::mem_row_major);
}

TEST_CASE("wmma: misaligned tiles, bad ldm and incomplete warps fail with a message", "[emu][wmma]") {
    float* d_out = device_zeros<float>(1024);
    bf16* d_a = device_zeros<bf16>(1024);
    std::string file = __FILE__;
    auto launch = [&](int which, int threads) { LAUNCH(wmma_bad_call_kernel, 1, threads, 1024, 0, d_out, d_a, which); };
    // the call and its line, then the problem
    REQUIRE_FAILS_WITH("wmma::load_matrix_sync at " + file + ":", launch(0, 32));
    REQUIRE_FAILS_WITH("the tile pointer (address ", launch(0, 32));
    REQUIRE_FAILS_WITH("is not 32-byte (256-bit) aligned", launch(0, 32));
    REQUIRE_FAILS_WITH("the tile pointer (16 bytes into the dynamic shared memory) is not 32-byte (256-bit) aligned",
                       launch(1, 32));
    REQUIRE_FAILS_WITH("ldm 12 is not a multiple of 8 elements (16 bytes)", launch(2, 32));
    REQUIRE_FAILS_WITH("wmma::store_matrix_sync at " + file + ":", launch(3, 32));
    REQUIRE_FAILS_WITH("ldm 18 is not a multiple of 4 elements (16 bytes)", launch(3, 32));
    // mma_sync is a rendezvous of the full warp
    REQUIRE_FAILS_WITH("wmma::mma_sync at " + file + ":", launch(4, 32));
    REQUIRE_FAILS_WITH("which has exited", launch(4, 32));
    REQUIRE_FAILS_WITH("different warp primitives", launch(5, 32));
    REQUIRE_FAILS_WITH("wmma::mma_sync", launch(5, 32));
    REQUIRE_FAILS_WITH("the block's last warp has only 16 threads", launch(7, 48));  // mma_sync
    REQUIRE_FAILS_WITH("wmma::load_matrix_sync at " + file + ":", launch(6, 48));
    REQUIRE_FAILS_WITH("the block's last warp has only 16 threads (wmma operations need all 32 lanes",
                       launch(6, 48));
    // the same calls, right, pass
    launch(7, 32);
    launch(7, 64);
    CUDA_CHECK(cudaFree(d_out));
    CUDA_CHECK(cudaFree(d_a));
}

// ---- mma_bf16_16x8x16 (cuda_common.h): the documented PTX fragment layouts of mma.sync.m16n8k16
// d (warps, 16, 8) = c + a b per warp: a (warps, 16, 16) row-major, b (warps, 16, 8) stored
// transposed as (8, 16), c like d. Each lane gathers its registers by the layouts in cuda_common.h.
__global__ void mma_m16n8k16_kernel(float* d, const bf16* a, const bf16* b_transposed, const float* c) {
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const bf16* A = a + warp * 256;
    const bf16* Bt = b_transposed + warp * 128;
    auto pair = [](const bf16* p) { return pack_bf16x2(to_float(p[0]), to_float(p[1])); };   // exact: bf16 in
    uint32_t a_regs[4] = {pair(A + g * 16 + 2 * t), pair(A + (g + 8) * 16 + 2 * t), pair(A + g * 16 + 2 * t + 8),
                          pair(A + (g + 8) * 16 + 2 * t + 8)};
    uint32_t b_regs[2] = {pair(Bt + g * 16 + 2 * t), pair(Bt + g * 16 + 2 * t + 8)};
    float acc[4];
    for (int i = 0; i < 4; i++) acc[i] = c[warp * 128 + (g + 8 * (i / 2)) * 8 + 2 * t + i % 2];
    mma_bf16_16x8x16(acc, a_regs, b_regs);
    for (int i = 0; i < 4; i++) d[warp * 128 + (g + 8 * (i / 2)) * 8 + 2 * t + i % 2] = acc[i];
}

TEST_CASE("mma_bf16_16x8x16 computes C + A * B with the PTX fragment layouts, per warp", "[emu][mma]") {
    const int warps = 3;
    std::mt19937 rng(21);
    std::uniform_int_distribution<int> small(-8, 8);
    std::vector<bf16> a(warps * 256), bt(warps * 128);
    std::vector<float> c(warps * 128);
    for (auto& x : a) x = __float2bfloat16_rn(small(rng) / 4.0f);
    for (auto& x : bt) x = __float2bfloat16_rn(small(rng) / 8.0f);
    for (auto& x : c) x = small(rng) / 2.0f;
    bf16* d_a = to_device(a);
    bf16* d_bt = to_device(bt);
    float* d_c = to_device(c);
    float* d_d = device_zeros<float>(warps * 128);
    LAUNCH(mma_m16n8k16_kernel, 1, 32 * warps, 0, 0, d_d, d_a, d_bt, d_c);
    std::vector<float> d = from_device(d_d, warps * 128);
    // small multiples of powers of two: every sum is exact, so the comparison is exact
    for (int w = 0; w < warps; w++)
        for (int m = 0; m < 16; m++)
            for (int n = 0; n < 8; n++) {
                float expected = c[w * 128 + m * 8 + n];
                for (int k = 0; k < 16; k++)
                    expected += to_float(a[w * 256 + m * 16 + k]) * to_float(bt[w * 128 + n * 16 + k]);
                INFO("warp " << w << " row " << m << " column " << n);
                REQUIRE(d[w * 128 + m * 8 + n] == expected);
            }
    // a rendezvous of the full warp: a partial last warp fails with a message
    REQUIRE_FAILS_WITH("the block's last warp has only 16 threads",
                       LAUNCH(mma_m16n8k16_kernel, 1, 48, 0, 0, d_d, d_a, d_bt, d_c));
    CUDA_CHECK(cudaFree(d_a));
    CUDA_CHECK(cudaFree(d_bt));
    CUDA_CHECK(cudaFree(d_c));
    CUDA_CHECK(cudaFree(d_d));
}

// ---- ldmatrix_x4 / ldmatrix_x4_trans (cuda_common.h): the PTX ldmatrix.m8n8 layouts
// The block stages a (32, 24) tile of distinct 16-bit patterns in dynamic shared memory; lane l
// names row l of it, at column 8 * (l / 8 % 2), so matrix j is rows 8j .. 8j+7 at that column.
// out (32 lanes, 8): each lane's 4 registers without, then with, .trans. mode 1: lane 5's row is
// 2 bytes off; mode 2: lane 9 names global memory instead.
constexpr int LDMATRIX_TEST_STRIDE = 24;
__global__ void ldmatrix_kernel(uint32_t* out, const bf16* tile, int mode) {
    DYNAMIC_SHARED(bf16, shared);
    int lane = threadIdx.x % 32;
    for (int i = threadIdx.x; i < 32 * LDMATRIX_TEST_STRIDE; i += blockDim.x) shared[i] = tile[i];
    __syncthreads();
    const bf16* row = shared + lane * LDMATRIX_TEST_STRIDE + 8 * (lane / 8 % 2);
    if (mode == 1 && lane == 5) row += 1;
    if (mode == 2 && lane == 9) row = tile + lane * LDMATRIX_TEST_STRIDE;
    uint32_t plain[4], transposed[4];
    ldmatrix_x4(plain, row);
    ldmatrix_x4_trans(transposed, row);
    for (int j = 0; j < 4; j++) {
        out[threadIdx.x * 8 + j] = plain[j];
        out[threadIdx.x * 8 + 4 + j] = transposed[j];
    }
}

TEST_CASE("ldmatrix_x4 and ldmatrix_x4_trans deliver the PTX fragment layouts from shared memory", "[emu][mma]") {
    std::vector<bf16> tile(32 * LDMATRIX_TEST_STRIDE);
    for (size_t i = 0; i < tile.size(); i++) tile[i] = __ushort_as_bfloat16((unsigned short)(i + 1));
    bf16* d_tile = to_device(tile);
    uint32_t* d_out = device_zeros<uint32_t>(32 * 8);
    const size_t shared_bytes = tile.size() * sizeof(bf16);
    LAUNCH(ldmatrix_kernel, 1, 32, shared_bytes, 0, d_out, d_tile, 0);
    std::vector<uint32_t> out = from_device(d_out, 32 * 8);
    // element (r, c) of matrix j, as the bits staged
    auto element = [&](int j, int r, int c) {
        return (uint32_t)__bfloat16_as_ushort(tile[(8 * j + r) * LDMATRIX_TEST_STRIDE + 8 * (j % 2) + c]);
    };
    for (int lane = 0; lane < 32; lane++) {
        int g = lane / 4, t = lane % 4;
        for (int j = 0; j < 4; j++) {
            INFO("lane " << lane << " matrix " << j);
            REQUIRE(out[lane * 8 + j] == (element(j, g, 2 * t) | element(j, g, 2 * t + 1) << 16));
            REQUIRE(out[lane * 8 + 4 + j] == (element(j, 2 * t, g) | element(j, 2 * t + 1, g) << 16));
        }
    }
    // what a GPU would not load right fails with a message
    // (the message names the wrapper's line in cuda_common.h, and the thread)
    REQUIRE_FAILS_WITH("ldmatrix at ", LAUNCH(ldmatrix_kernel, 1, 32, shared_bytes, 0, d_out, d_tile, 1));
    REQUIRE_FAILS_WITH("in thread (5,0,0) of block (0,0,0)",
                       LAUNCH(ldmatrix_kernel, 1, 32, shared_bytes, 0, d_out, d_tile, 1));
    REQUIRE_FAILS_WITH("(lane 5), 242 bytes into the dynamic shared memory, is not 16-byte aligned",
                       LAUNCH(ldmatrix_kernel, 1, 32, shared_bytes, 0, d_out, d_tile, 1));
    REQUIRE_FAILS_WITH("(lane 9) is not 16 bytes inside the block's dynamic shared memory",
                       LAUNCH(ldmatrix_kernel, 1, 32, shared_bytes, 0, d_out, d_tile, 2));
    REQUIRE_FAILS_WITH("the block's last warp has only 16 threads (ldmatrix needs all 32 lanes)",
                       LAUNCH(ldmatrix_kernel, 1, 48, shared_bytes, 0, d_out, d_tile, 0));
    CUDA_CHECK(cudaFree(d_tile));
    CUDA_CHECK(cudaFree(d_out));
}

// ---- speed: the cost of the fibers themselves
// out (gridDim.x): four barrier-separated phases through shared memory
__global__ void four_barriers_kernel(float* out, const float* inp) {
    __shared__ float a[256];
    int tid = threadIdx.x, n = blockDim.x;
    a[tid] = inp[blockIdx.x * n + tid];
    __syncthreads();
    float left = a[(tid + n - 1) % n];
    __syncthreads();
    a[tid] = left;
    __syncthreads();
    float v = a[(tid + 1) % n];  // back to the thread's own input
    __syncthreads();
    if (tid == 0) a[0] = 0.0f;
    atomicAdd(&out[blockIdx.x], v);
}

TEST_CASE("a 1024-block, 256-thread launch with 4 barriers takes well under a second", "[emu][timing]") {
    const int blocks = 1024, block = 256;
    std::vector<float> x = small_integers((size_t)blocks * block, 3);
    float* d_x = to_device(x);
    float* d_out = device_zeros<float>(blocks);
    auto start = std::chrono::steady_clock::now();
    LAUNCH(four_barriers_kernel, blocks, block, 0, 0, d_out, d_x);
    double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    REQUIRE(from_device(d_out, blocks) == block_sums(x, block));
    printf("emulation timing: 1024 blocks x 256 threads x 4 barriers: %.1f ms on %d OS threads\n", ms,
           cuda_emu::os_threads());
    // 40-60 ms on one core where this was written: the bound only catches a pathological slowdown
    REQUIRE(ms < 10000);
    CUDA_CHECK(cudaFree(d_x));
    CUDA_CHECK(cudaFree(d_out));
}

#endif  // MIXLN_CUDA_EMULATION
