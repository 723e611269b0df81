/*
CUDA on the CPU: a small execution of the CUDA programming model, so that the kernels in layers/
compile with g++ (-DMIXLN_CUDA_EMULATION, see cuda_common.h) and run in tests on machines without
a GPU. It is a header only: include it through cuda_common.h; nothing else to compile or link
(build with -I/usr/local/cuda/include for the toolkit's cuda_bf16.h).

What it emulates
  - Kernels written in plain CUDA: __global__, __device__, __host__, __forceinline__, __restrict__,
    __launch_bounds__(...) compile unchanged. threadIdx, blockIdx (uint3), blockDim, gridDim
    (dim3), warpSize (32).
  - Launches: cuda_emu_launch(kernel, grid, block, shared_bytes, stream, args...) (what LAUNCH
    calls). It checks the configuration as a GPU does (dims >= 1; block <= 1024 threads and
    (1024, 1024, 64); grid <= (2^31-1, 65535, 65535); dynamic shared memory <= 48 KB, or <= 227 KB
    after cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes)). A bad
    configuration runs nothing and sets the error that the next cudaGetLastError() returns, so
    LAUNCH / CUDA_CHECK fail with the launch's file:line. Launches are synchronous; streams and
    events are tags.
  - Threads: every thread of a block is a cooperative fiber on its own stack (256 KB, with 256 KB
    of unmapped guard below it, so an overflow crashes with a message instead of corrupting another
    thread's stack; stacks are mapped once per OS thread and reused). A fiber runs until it reaches
    a synchronisation point (__syncthreads, a warp primitive, __nanosleep) or returns; then the
    next ready fiber runs. All fibers of a block run on one OS thread, so `__shared__` is defined
    as `static thread_local` and is per block.
  - Scheduling order: NOT thread-id order. A block starts its threads in a pseudo-random
    permutation, and every time a barrier or a warp rendezvous releases its threads they are
    re-queued in a fresh pseudo-random permutation. The generator is seeded from the block's linear
    index only, so a run is deterministic and reproducible: a missing __syncthreads() or
    __syncwarp() gives the same wrong answer every run, instead of a right one by luck (in
    thread-id order, or in reverse order, many missing barriers are invisible).
  - __syncthreads() (and _count/_and/_or): a block-wide barrier. Every thread must reach the same
    __syncthreads() (file:line); threads waiting at different ones, a barrier that some threads
    can never reach because they returned, and any other deadlock stop the test with
    fail("emulated kernel ...: __syncthreads() at FILE:LINE reached by N of M threads of block
    (x,y,z); ...") instead of hanging.
  - Warp primitives, with Volta's independent thread scheduling: __syncwarp(mask), __shfl_sync,
    __shfl_up_sync, __shfl_down_sync, __shfl_xor_sync (any trivially copyable type of <= 8 bytes:
    int, unsigned, float, double, long long, __nv_bfloat16, ...), __ballot_sync, __any_sync,
    __all_sync, __reduce_{add,min,max}_sync (int, unsigned), __reduce_{and,or,xor}_sync
    (unsigned). A warp is 32 consecutive linear thread ids. Each call is a rendezvous of the lanes
    in mask: every lane deposits its value and waits until all lanes of the mask wait in a warp
    primitive with the same mask, then each lane gets its result. Source lanes follow PTX's
    shfl.sync rules: lane/offset arguments use their low 5 bits; width must be a power of two in
    [1, 32]; __shfl_up/__shfl_down/__shfl_xor whose source lies outside the caller's segment of
    `width` lanes (below it for up, above it for down and xor) return the caller's own value; a
    source lane that is inside the range but not in mask (CUDA: undefined) returns all bits set,
    i.e. NaN for float. Errors, not hangs: a mask without the caller's own lane; lanes of one
    rendezvous in different primitives (CUDA: "all non-exited threads named in mask must execute
    the same intrinsic with the same mask"; the same primitive at different lines is fine, as on
    Volta and later); masks that never match; and a mask naming a lane that has exited or does not
    exist (a partial last warp). CUDA runs that last case and leaves what is read from such a lane
    undefined; here it is an error, because a full-mask reduction after `if (i >= N) return;` is
    almost always a bug. __activemask() returns the lanes of the warp that have not exited
    (divergence is not tracked).
  - Tensor cores: the 16x16x16 bf16 subset of WMMA (nvcuda::wmma from <mma.h>), so a kernel
    written against it compiles unchanged: fragment<matrix_a | matrix_b, 16, 16, 16,
    __nv_bfloat16, row_major | col_major> and fragment<accumulator, 16, 16, 16, float> (anything
    else fails a static_assert), each with num_elements = 8 and x[8] as on the GPU (256 elements
    over 32 lanes); fill_fragment, load_matrix_sync (matrix_a/b with ldm; accumulator with ldm and
    mem_row_major/mem_col_major), store_matrix_sync (accumulator), and mma_sync(d, a, b, c): d = a *
    b + c in float, summed over k in order then added to c (bf16 products are exact in float); d
    may be c. Element (r, c) of a tile (row-major index e = 16 r + c of the logical matrix) is
    x[slot] of lane `lane` where e = ((32 slot + lane) * 5) % 256: deliberately unlike any GPU
    layout, so a kernel may only treat x[] uniformly (scale it all, convert it all); one that
    assumes positions gets a wrong answer. load_matrix_sync and store_matrix_sync are NOT
    rendezvous: each lane reads or writes its own 8 elements at once, so a tile that the warp wrote
    element by element must be published with __syncwarp() (or __syncthreads()) before
    load_matrix_sync, or the load reads stale values under the scrambled order. They check what the
    GPU requires, as errors naming the call's file:line: a full warp, a tile pointer 32-byte
    (256-bit) aligned (into the dynamic shared memory: relative to its start, which the GPU build
    aligns to 128 bytes; elsewhere: the address), and ldm a multiple of 16 bytes (8 bf16 or 4
    floats). mma_sync is a rendezvous of all 32 lanes (a collective warp operation, named
    "wmma::mma_sync" in errors), with the full-mask checks of the warp primitives.
  - Tensor cores with known layouts: cuda_emu::mma_m16n8k16_bf16(d, a, b), what cuda_common.h's
    mma_bf16_16x8x16 calls here (on the GPU: PTX mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32).
    Unlike WMMA's, these fragment layouts are documented (PTX ISA, "Matrix Fragments for
    mma.m16n8k16 with floating point type") and kernels rely on them, so the emulation uses exactly
    those: lane l, g = l / 4, t = l % 4, holds A (16x16) elements (g, 2t..2t+1) in a[0], (g+8, 2t..)
    in a[1], (g, 2t+8..) in a[2], (g+8, 2t+8..) in a[3]; B (16x8) elements (2t..2t+1, g) in b[0] and
    (2t+8..2t+9, g) in b[1] (two bf16 per 32-bit register, the lower index in the low 16 bits); and
    D (16x8, float) elements (g, 2t..2t+1) in d[0..1], (g+8, 2t..2t+1) in d[2..3]. d += a * b, summed
    over k in order and then added to d. A rendezvous of all 32 lanes, like wmma::mma_sync.
  - Matrix loads with the same layouts: cuda_emu::ldmatrix_m8n8_b16(out, row, count, transpose), what
    cuda_common.h's ldmatrix_x4 / ldmatrix_x4_trans call here (on the GPU: PTX
    ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16). Lane 8j + r names row r (16 bytes: 8
    values of 16 bits) of matrix j; lane l = 4g + t then gets, for each matrix j, the values (g, 2t)
    and (g, 2t+1) in register j (the first in the low half), or with transpose (2t, g) and (2t+1, g).
    A rendezvous of all 32 lanes; a row outside the block's dynamic shared memory, or not 16-byte
    aligned within it, is an error (a GPU would read garbage or fault).
  - Memory: dynamic shared memory (DYNAMIC_SHARED, cuda_emu_dynamic_shared()) is a per-block
    buffer of the launch's shared_bytes, 16-byte aligned, filled with 0xFF bytes (NaN floats) at
    the start of every block, and ending (to within 15 bytes) at an unmapped guard page, so
    reading past its end crashes. cudaMalloc returns 256-byte aligned memory filled with 0xFF bytes
    (NaN floats); cudaMemcpy/cudaMemset(+Async) check that the device side lies inside one
    cudaMalloc allocation (else cudaErrorInvalidValue and a note on stderr); cudaFree of a pointer
    that cudaMalloc did not return is cudaErrorInvalidValue.
  - Atomics: atomicAdd (int, unsigned, unsigned long long, float, double, __nv_bfloat16), atomicSub,
    atomicMax/atomicMin (int, unsigned, long long, unsigned long long), atomicCAS (int, unsigned,
    unsigned long long, unsigned short), atomicExch (int, unsigned, unsigned long long, float),
    atomicAnd/Or/Xor, atomicInc/atomicDec. All are real atomics (GCC __atomic builtins; floats by
    compare-and-swap), because blocks may run in parallel.
  - Math and intrinsics: <cmath>'s float functions, rsqrtf, __expf, __logf, __powf, __sinf, ...,
    __fdividef, __frcp_rn, __fadd_rn/__fsub_rn/__fmul_rn (never contracted into an FMA),
    __fmaf_rn, __saturatef, __float2int_rn (ties to even, NaN -> 0, saturating), conversions and
    bit casts, __popc, __clz, __ffs, __brev, CUDA's max/min overloads (global functions, so
    std::max and std::min are untouched), __ldg/__ldcs/__stcs and friends, __threadfence.
    bf16 comes from the CUDA toolkit's host-side cuda_bf16.h.
  - Runtime API with CUDA's own declarations (from cuda_runtime_api.h): cudaMalloc, cudaFree,
    cudaMallocHost, cudaFreeHost, cudaMemcpy(+Async), cudaMemset(+Async), cudaMemGetInfo,
    cudaStreamCreate(+WithFlags)/Destroy/Synchronize, cudaEvent*, cudaDeviceSynchronize,
    cudaDeviceReset, cudaGetLastError, cudaPeekAtLastError, cudaGetErrorString/Name,
    cudaGetDeviceCount (1), cudaSetDevice/cudaGetDevice, cudaGetDeviceProperties ("CPU
    emulation", sm 9.0), cudaDeviceGetAttribute (the multiprocessor count and thread limit),
    cudaOccupancyMaxActiveBlocksPerMultiprocessor (by threads and dynamic shared memory: there are
    no registers to count), cudaFuncSetAttribute.
  - Blocks: with OpenMP (-fopenmp) blocks run in parallel on up to 16 OS threads (a limit that
    keeps the fiber stacks' memory mappings well below the kernel's map count limit), otherwise
    sequentially; MIXLN_EMU_THREADS=N sets the number (1: sequential, fully deterministic even
    for float atomics). A fiber never moves between OS threads. A process forked from the test
    binary (REQUIRE_FAILS_WITH) runs blocks sequentially: libgomp cannot start threads after fork.

What it does NOT emulate
  - Out-of-bounds global memory accesses (except under AddressSanitizer, below), races between
    blocks, and shared-memory races inside one synchronisation phase (a fiber runs a whole phase
    at once) are not detected; static __shared__ variables keep their values from block to block
    (they cannot be poisoned) and do not count toward the shared-memory limit (only the launch's
    dynamic bytes do).
  - __CUDA_ARCH__ is not defined, so code under #ifdef __CUDA_ARCH__ is not what runs here.
    No texture/surface memory, __constant__ is plain memory, no cooperative groups, no dynamic
    parallelism, no clusters, no inline PTX, no WMMA beyond the subset above, no warp-divergence
    tracking for __activemask(), no spin-waiting on other blocks (a block runs to completion
    before its OS thread takes another; spin-waiting inside a block works if the loop calls
    __nanosleep).
  - Floating-point results are the CPU's: __expf is expf, not the GPU's fast approximation, and
    there are no denormal flush modes.
  - C++ exceptions cannot leave a kernel (they stop the test with an error), so Catch2's REQUIRE
    does not work inside kernels: write results to memory and check them on the host.
  - valgrind does not understand the hand-rolled stack switching. AddressSanitizer does: under
    -fsanitize=address every switch is announced to it (`make sanitize` builds the tests so), and
    cudaMalloc then allocates exactly the bytes asked for (not rounded up to 256), so a kernel's
    read or write past the end of an allocation, or before its start, is reported with the
    kernel's source line. The model's activations share one allocation; in these builds it puts
    a poisoned redzone after each tensor (model.h, point_activations), and cudaFree unpoisons
    before it poisons the memory with 0xFF. An access that lands inside another allocation, or
    inside another tensor of the flat parameter buffers, is not seen.
  - g++ 12 cannot silence -Wunknown-pragmas from a header, so `#pragma unroll` in a kernel breaks a
    -Werror build unless the emulation build adds -Wno-unknown-pragmas.

Speed: the x86-64 fiber switch is hand-written (it saves only the callee-saved registers and the
floating-point control words); other architectures, or -DMIXLN_EMU_UCONTEXT, use ucontext's
swapcontext, which makes a system call per switch (so does a build with -fcf-protection, whose
shadow stacks only swapcontext maintains). A 1024-block, 256-thread launch whose threads
each pass 4 __syncthreads() barriers (about 1.6 M fiber switches: start, 4 barriers, exit) takes
40-60 ms on one core of the 2-core AMD EPYC VM this was written on (some 30 ns per switch,
scheduler bookkeeping and cache misses on 256 stacks included), 20-35 ms with blocks spread over
both cores, and about 290 ms on one core with ucontext. The "timing" test in
test/test_cuda_emu.cpp prints the figure for the machine it runs on. Memory: each OS thread that
runs blocks reserves 512 KB of address space per emulated thread (stack and guard), of which only
the touched pages are used.
*/
#pragma once

// The toolkit's host-side bf16 header comes first. For a host compiler it pulls in
// crt/host_defines.h (defines __host__, __device__, __global__, __forceinline__, __align__ and an
// empty __shared__), vector_types.h (uint3, dim3, float4, ...) and cuda_runtime_api.h (the runtime
// API's declarations, which this file gives bodies to).
#include <cuda_bf16.h>

#include "../../common.h"

#include <atomic>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <ucontext.h>  // ucontext_t: the fiber switch on other architectures, and crash reports

// The hand-written switch does not know about CET shadow stacks (-fcf-protection=return sets bit 2
// of __CET__); glibc's swapcontext does.
#if !defined(__x86_64__) || defined(MIXLN_EMU_UCONTEXT) || (defined(__CET__) && (__CET__ & 2))
#define MIXLN_EMU_USE_UCONTEXT 1
#endif

// Under AddressSanitizer (g++/clang++ -fsanitize=address: common.h defines MIXLN_ASAN) every
// switch between stacks is announced to it (__sanitizer_start_switch_fiber /
// __sanitizer_finish_switch_fiber), so that it knows which stack a thread runs on; then kernels'
// out-of-bounds accesses to cudaMalloc memory are reported.
#ifdef MIXLN_ASAN
#include <sanitizer/common_interface_defs.h>
#endif

// ---- qualifiers: host_defines.h defines most of them for a host compiler; add what is missing.
// __shared__ must be redefined: host_defines.h makes it empty, which would give every thread its
// own copy. All threads of a block run on one OS thread, so thread_local makes it per block.
#undef __shared__
#define __shared__ static thread_local
#ifndef __host__
#define __host__
#endif
#ifndef __device__
#define __device__
#endif
#ifndef __global__
#define __global__
#endif
#ifndef __forceinline__
#define __forceinline__ inline __attribute__((always_inline))
#endif
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#ifndef __align__
#define __align__(n) __attribute__((aligned(n)))
#endif

constexpr int warpSize = 32;

// Streams and events are opaque handles in the runtime API; here they are plain tags.
struct CUstream_st {
    int unused;
};
struct CUevent_st {
    std::chrono::steady_clock::time_point time;
};

namespace cuda_emu {

// ---- limits of the emulated device (an sm_90 part)
constexpr int kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxBlockDim[3] = {1024u, 1024u, 64u};
constexpr unsigned kMaxGridDim[3] = {2147483647u, 65535u, 65535u};
constexpr size_t kSharedDefault = 48 * 1024;  // dynamic shared memory without cudaFuncSetAttribute
constexpr size_t kSharedOptin = 227 * 1024;   // sharedMemPerBlockOptin of sm_90
constexpr size_t kStackBytes = 256 * 1024;    // per emulated thread: room for local arrays
constexpr size_t kStackGuardBytes = 256 * 1024;  // unmapped, below each stack: a frame that overflows
                                                 // lands there rather than in the next stack
constexpr int kMaxOsThreads = 16;             // each maps up to 1024 stacks (2 mappings each)

// ---- the built-in variables, set by the scheduler before a fiber runs
inline thread_local uint3 tls_thread_idx;
inline thread_local uint3 tls_block_idx;
inline thread_local dim3 tls_block_dim;
inline thread_local dim3 tls_grid_dim;

inline std::string strprintf(const char* format, ...) __attribute__((format(printf, 1, 2)));
inline std::string strprintf(const char* format, ...) {
    va_list args;
    va_start(args, format);
    char buf[2048];
    vsnprintf(buf, sizeof(buf), format, args);
    va_end(args);
    return std::string(buf);
}

inline std::string dims(uint3 v) { return strprintf("(%u,%u,%u)", v.x, v.y, v.z); }
inline std::string dims(dim3 v) { return strprintf("(%u,%u,%u)", v.x, v.y, v.z); }

// ---- context switching between fibers
#ifndef MIXLN_EMU_USE_UCONTEXT
// x86-64 System V: a context is its saved stack pointer; the callee-saved registers, MXCSR and
// the x87 control word are pushed on the stack being left. The functions live in a COMDAT group
// so every translation unit may include this header.
struct Context {
    void* sp = nullptr;
#ifdef MIXLN_ASAN
    const void* stack_bottom = nullptr;  // the stack it runs on, for AddressSanitizer
    size_t stack_size = 0;
#endif
};
extern "C" void cuda_emu_switch_x86_64(void** save_sp, void* load_sp);
extern "C" void cuda_emu_fiber_start_x86_64();
__asm__(
    ".pushsection .text.cuda_emu_switch_x86_64,\"axG\",@progbits,cuda_emu_switch_x86_64,comdat\n"
    ".weak cuda_emu_switch_x86_64\n"
    ".type cuda_emu_switch_x86_64,@function\n"
    "cuda_emu_switch_x86_64:\n"
    "  pushq %rbp\n"
    "  pushq %rbx\n"
    "  pushq %r12\n"
    "  pushq %r13\n"
    "  pushq %r14\n"
    "  pushq %r15\n"
    "  subq $8, %rsp\n"
    "  stmxcsr (%rsp)\n"
    "  fnstcw 4(%rsp)\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  ldmxcsr (%rsp)\n"
    "  fldcw 4(%rsp)\n"
    "  addq $8, %rsp\n"
    "  popq %r15\n"
    "  popq %r14\n"
    "  popq %r13\n"
    "  popq %r12\n"
    "  popq %rbx\n"
    "  popq %rbp\n"
    "  ret\n"
    ".size cuda_emu_switch_x86_64, .-cuda_emu_switch_x86_64\n"
    // A new fiber's first switch returns here, with the entry function in r13 and its argument
    // in r12. The entry function never returns. No return address above: backtraces end here.
    ".weak cuda_emu_fiber_start_x86_64\n"
    ".type cuda_emu_fiber_start_x86_64,@function\n"
    "cuda_emu_fiber_start_x86_64:\n"
    "  .cfi_startproc\n"
    "  .cfi_undefined rip\n"
    "  movq %r12, %rdi\n"
    "  callq *%r13\n"
    "  ud2\n"
    "  .cfi_endproc\n"
    ".size cuda_emu_fiber_start_x86_64, .-cuda_emu_fiber_start_x86_64\n"
    ".popsection\n");

inline void context_init_machine(Context& c, char* stack_lo, size_t size, void (*entry)(void*), void* arg) {
    uintptr_t top = (uintptr_t)(stack_lo + size) & ~(uintptr_t)15;
    // the return address sits at 8 (mod 16), so the entry function starts with the stack
    // alignment of an ordinary call
    void** ret = (void**)(top - 24);
    ret[0] = reinterpret_cast<void*>(&cuda_emu_fiber_start_x86_64);
    ret[-1] = nullptr;                             // rbp
    ret[-2] = nullptr;                             // rbx
    ret[-3] = arg;                                 // r12
    ret[-4] = reinterpret_cast<void*>(entry);      // r13
    ret[-5] = nullptr;                             // r14
    ret[-6] = nullptr;                             // r15
    unsigned char* control = (unsigned char*)(ret - 7);  // MXCSR, x87 control word: the current ones
    uint32_t mxcsr;
    uint16_t fpucw;
    __asm__ volatile("stmxcsr %0" : "=m"(mxcsr));
    __asm__ volatile("fnstcw %0" : "=m"(fpucw));
    memcpy(control, &mxcsr, 4);
    memcpy(control + 4, &fpucw, 2);
    c.sp = (void*)(ret - 7);
}
inline void context_switch_machine(Context& from, Context& to) { cuda_emu_switch_x86_64(&from.sp, to.sp); }
#else
struct Context {
    ucontext_t uc;
#ifdef MIXLN_ASAN
    const void* stack_bottom = nullptr;  // the stack it runs on, for AddressSanitizer
    size_t stack_size = 0;
#endif
};
inline thread_local void (*tls_fiber_entry)(void*) = nullptr;
inline thread_local void* tls_fiber_arg = nullptr;
inline void ucontext_trampoline() { tls_fiber_entry(tls_fiber_arg); }
inline void context_init_machine(Context& c, char* stack_lo, size_t size, void (*entry)(void*), void* arg) {
    // one entry and argument per OS thread: every fiber of a runner starts the same way
    tls_fiber_entry = entry;
    tls_fiber_arg = arg;
    if (getcontext(&c.uc) != 0) fail("cuda emulation: getcontext failed");
    c.uc.uc_stack.ss_sp = stack_lo;
    c.uc.uc_stack.ss_size = size;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, &ucontext_trampoline, 0);
}
inline void context_switch_machine(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// A fiber's context on a fresh stack [stack_lo, stack_lo + size), to start in entry(arg)
inline void context_init(Context& c, char* stack_lo, size_t size, void (*entry)(void*), void* arg) {
#ifdef MIXLN_ASAN
    // a stack is reused block after block, and an abandoned fiber's frames leave their redzones
    // poisoned: start clean
    ASAN_UNPOISON_MEMORY_REGION(stack_lo, size);
    c.stack_bottom = stack_lo;
    c.stack_size = size;
#endif
    context_init_machine(c, stack_lo, size, entry, arg);
}
#ifdef MIXLN_ASAN
// The context that the last switch on this OS thread left; the one it entered learns that
// context's stack bounds from AddressSanitizer (that is how the scheduler's, the OS thread's own
// stack, become known).
inline thread_local Context* tls_switched_from = nullptr;
inline void context_switch_finished(void* fake_stack) {
    const void* bottom = nullptr;
    size_t size = 0;
    __sanitizer_finish_switch_fiber(fake_stack, &bottom, &size);
    if (tls_switched_from != nullptr) {
        tls_switched_from->stack_bottom = bottom;
        tls_switched_from->stack_size = size;
    }
}
#endif
// Leave the context from (saving it) for to; returns when something switches back to from.
// A fiber entered for the first time calls context_entered() before anything else.
inline void context_switch(Context& from, Context& to) {
#ifdef MIXLN_ASAN
    void* fake_stack = nullptr;
    tls_switched_from = &from;
    __sanitizer_start_switch_fiber(&fake_stack, to.stack_bottom, to.stack_size);
    context_switch_machine(from, to);
    context_switch_finished(fake_stack);
#else
    context_switch_machine(from, to);
#endif
}
inline void context_entered() {
#ifdef MIXLN_ASAN
    context_switch_finished(nullptr);
#endif
}

// ---- errors found while running a launch: the first one wins; the launch then fails with it
struct LaunchError {
    std::mutex mutex;
    std::string message;
    std::atomic<bool> set{false};

    void record(const std::string& text) {
        std::lock_guard<std::mutex> lock(mutex);
        if (!set.load()) {
            message = text;
            set.store(true);
        }
    }
};

inline size_t page_size() { return (size_t)sysconf(_SC_PAGESIZE); }

// ---- warp primitives
enum WarpOp : uint8_t {
    kSyncwarp,
    kShflIdx, kShflUp, kShflDown, kShflXor,
    kBallot, kAny, kAll,
    kReduceAdd, kReduceMinI, kReduceMinU, kReduceMaxI, kReduceMaxU, kReduceAnd, kReduceOr, kReduceXor,
    kWmmaMma,  // collectives: one function computes every lane's result (see Runner::complete_warp_op)
    kMmaM16n8k16,
    kLdmatrix,
};
inline const char* warp_op_name(uint8_t op) {
    static const char* names[] = {"__syncwarp", "__shfl_sync", "__shfl_up_sync", "__shfl_down_sync",
                                  "__shfl_xor_sync", "__ballot_sync", "__any_sync", "__all_sync",
                                  "__reduce_add_sync", "__reduce_min_sync", "__reduce_min_sync",
                                  "__reduce_max_sync", "__reduce_max_sync", "__reduce_and_sync",
                                  "__reduce_or_sync", "__reduce_xor_sync", "wmma::mma_sync",
                                  "mma_bf16_16x8x16 (mma.sync.m16n8k16)", "ldmatrix (ldmatrix.sync.aligned.m8n8)"};
    return names[op];
}
// 0: __syncwarp, 1: shuffles, 2: votes, 3: reductions, 4: collectives
inline int warp_op_class(uint8_t op) {
    if (op == kSyncwarp) return 0;
    if (op <= kShflXor) return 1;
    if (op <= kAll) return 2;
    if (op <= kReduceXor) return 3;
    return 4;
}
// A collective warp operation: each lane of mask deposits a pointer to its own arguments (its
// Fiber's value); once all have arrived, one call sees them all (lane_args[l] for lane l of mask;
// the others are null) and writes every lane's results through those pointers.
typedef void (*CollectiveFn)(void* const* lane_args, unsigned mask);

enum class State : uint8_t { kReady, kBarrier, kWarp, kDone };

struct Fiber {
    Context ctx;
    uint3 idx;
    State state = State::kReady;
    // the warp primitive or barrier it waits in
    uint8_t op = 0;
    unsigned mask = 0;
    int param = 0, width = 0;
    uint64_t value = 0, result = 0;
    CollectiveFn collective = nullptr;  // for collectives (class 4): what computes the results
    const char* file = "";
    int line = 0;
};

inline bool same_site(const char* file_a, int line_a, const char* file_b, int line_b) {
    return line_a == line_b && (file_a == file_b || strcmp(file_a, file_b) == 0);
}

// Runs blocks on one OS thread: the fibers, their stacks, the ready queue, dynamic shared memory.
struct Runner {
    std::vector<Fiber> fibers;
    std::vector<char*> stacks;  // usable part of each stack, above its guard page
    Context scheduler;
    int n = 0;         // threads in the block
    int current = -1;  // the running fiber, -1 while the scheduler runs
    int done = 0;      // threads that returned
    bool aborted = false;
    uint64_t rng = 0;
    // ready queue: a ring of thread ids, each queued at most once
    std::vector<int> queue;
    int queue_head = 0, queue_count = 0;
    std::vector<int> scratch;
    // __syncthreads
    int barrier_waiting = 0, barrier_first = -1, barrier_true = 0, barrier_result = 0;
    const char* barrier_file = "";
    int barrier_line = 0;
    // the launch
    void (*body)(void*) = nullptr;
    void* body_arg = nullptr;
    LaunchError* error = nullptr;
    dim3 grid, block;
    uint3 block_idx;
    // dynamic shared memory: [data pages][guard page]; the block's buffer ends at the guard page
    char* shared_map = nullptr;
    size_t shared_capacity = 0;  // bytes before the guard page
    char* shared_ptr = nullptr;
    size_t shared_bytes = 0;

    Runner() : fibers(kMaxThreadsPerBlock), queue(kMaxThreadsPerBlock), scratch(kMaxThreadsPerBlock) {}
    ~Runner() {
        if (current >= 0) return;  // exit() called from inside a kernel: do not unmap the stack in use
        size_t page = page_size();
        for (char* s : stacks) munmap(s - kStackGuardBytes, kStackBytes + kStackGuardBytes);
        if (shared_map) munmap(shared_map, shared_capacity + page);
    }

    // ---- pseudo-random order (splitmix64), seeded per block
    uint64_t next_random() {
        uint64_t z = (rng += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
    void push(int t) {
        queue[(queue_head + queue_count) & (kMaxThreadsPerBlock - 1)] = t;
        queue_count++;
    }
    int pop() {
        int t = queue[queue_head];
        queue_head = (queue_head + 1) & (kMaxThreadsPerBlock - 1);
        queue_count--;
        return t;
    }
    // make ids[0..count) ready, in a fresh pseudo-random order
    void push_shuffled(int* ids, int count) {
        for (int i = count - 1; i > 0; i--) {
            int j = (int)(((next_random() >> 32) * (uint64_t)(i + 1)) >> 32);
            std::swap(ids[i], ids[j]);
        }
        for (int i = 0; i < count; i++) {
            fibers[ids[i]].state = State::kReady;
            push(ids[i]);
        }
    }

    std::string thread_name(int t) const { return dims(fibers[t].idx); }
    std::string prefix() const {
        return strprintf("emulated kernel with grid %s, block %s: ", dims(grid).c_str(), dims(block).c_str());
    }

    // ---- running fibers
    // Give the OS thread to the next ready fiber, or back to the scheduler when none is ready.
    void yield() {
        int from = current;
        if (queue_count > 0) {
            int to = pop();
            if (to == from) return;
            current = to;
            tls_thread_idx = fibers[to].idx;
            context_switch(fibers[from].ctx, fibers[to].ctx);
        } else {
            current = -1;
            context_switch(fibers[from].ctx, scheduler);
        }
    }
    // An error inside a fiber: record it and abandon the block (its fibers are never resumed).
    [[noreturn]] void fiber_error(const std::string& message) {
        error->record(prefix() + message);
        aborted = true;
        int from = current;
        current = -1;
        context_switch(fibers[from].ctx, scheduler);
        __builtin_unreachable();
    }
    [[noreturn]] void exit_current() {
        fibers[current].state = State::kDone;
        done++;
        yield();
        __builtin_unreachable();
    }
    static void fiber_main(void* arg) {
        context_entered();
        Runner* r = static_cast<Runner*>(arg);
        try {
            r->body(r->body_arg);
        } catch (...) {
            r->fiber_error(strprintf("a C++ exception left the kernel in thread %s of block %s (kernels cannot "
                                     "throw; check results on the host, not with REQUIRE in a kernel)",
                                     r->thread_name(r->current).c_str(), dims(r->block_idx).c_str()));
        }
        r->exit_current();
    }

    // bytes of memory with guard bytes of inaccessible memory below or above them
    static char* map_guarded(size_t bytes, size_t guard, bool guard_below) {
        char* m = (char*)mmap(nullptr, bytes + guard, PROT_READ | PROT_WRITE,
                              MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) fail("cuda emulation: cannot map %zu bytes: %s", bytes + guard, strerror(errno));
        char* guard_start = guard_below ? m : m + bytes;
        if (mprotect(guard_start, guard, PROT_NONE) != 0) fail("cuda emulation: mprotect failed: %s", strerror(errno));
        return guard_below ? m + guard : m;
    }
    void ensure_stacks(int count) {
        while ((int)stacks.size() < count) stacks.push_back(map_guarded(kStackBytes, kStackGuardBytes, true));
    }
    void prepare_shared(size_t bytes) {
        size_t page = page_size();
        size_t rounded = (bytes + 15) & ~(size_t)15;
        size_t need = (rounded + page - 1) / page * page;
        if (shared_map == nullptr || need > shared_capacity) {
            if (shared_map) munmap(shared_map, shared_capacity + page);
            shared_map = map_guarded(need, page, false);
            shared_capacity = need;
        }
        shared_bytes = bytes;
        shared_ptr = shared_map + shared_capacity - rounded;  // poisoned by run_block
    }

    // Did the running fiber leave its stack (its stack pointer, or the faulting address, is below it)?
    bool stack_overflowed(uintptr_t fault_address, uintptr_t sp) const {
        uintptr_t lo = (uintptr_t)stacks[current];
        return (sp != 0 && sp < lo) || (fault_address < lo && fault_address >= lo - kStackGuardBytes);
    }

    void run_block(long long b) {
        block_idx = {(unsigned)(b % grid.x), (unsigned)((b / grid.x) % grid.y), (unsigned)(b / ((long long)grid.x * grid.y))};
        tls_block_idx = block_idx;
        tls_block_dim = block;
        tls_grid_dim = grid;
        n = (int)(block.x * block.y * block.z);
        ensure_stacks(n);
        memset(shared_ptr, 0xFF, (shared_bytes + 15) & ~(size_t)15);
        rng = 0x5DEECE66Dull ^ ((uint64_t)b * 0x9E3779B97F4A7C15ull);
        done = 0;
        aborted = false;
        barrier_waiting = 0;
        queue_head = queue_count = 0;
        for (int t = 0; t < n; t++) {
            Fiber& f = fibers[t];
            f.idx = {(unsigned)t % block.x, ((unsigned)t / block.x) % block.y, (unsigned)t / (block.x * block.y)};
            f.state = State::kReady;
            context_init(f.ctx, stacks[t], kStackBytes, &Runner::fiber_main, this);
            scratch[t] = t;
        }
        push_shuffled(scratch.data(), n);
        current = pop();
        tls_thread_idx = fibers[current].idx;
        context_switch(scheduler, fibers[current].ctx);
        current = -1;
        if (!aborted && done != n) diagnose_deadlock();
    }

    // No fiber is ready but some have not returned: say why.
    void diagnose_deadlock() {
        int at_barrier = 0, in_warp = 0, exited = 0, first_warp = -1, first_exited = -1;
        for (int t = 0; t < n; t++) {
            const Fiber& f = fibers[t];
            if (f.state == State::kBarrier) at_barrier++;
            if (f.state == State::kWarp && in_warp++ == 0) first_warp = t;
            if (f.state == State::kDone && exited++ == 0) first_exited = t;
        }
        std::string block_name = dims(block_idx);
        // a warp primitive that waits for a lane which has exited
        for (int t = 0; t < n; t++) {
            const Fiber& f = fibers[t];
            if (f.state != State::kWarp) continue;
            int base = t & ~31;
            for (unsigned m = f.mask; m; m &= m - 1) {
                int u = base + __builtin_ctz(m);
                if (fibers[u].state == State::kDone) {
                    error->record(prefix() + strprintf("%s at %s:%d in thread %s of block %s waits for lane %d "
                                                             "(thread %s), which has exited (mask 0x%08x)",
                                                             warp_op_name(f.op), f.file, f.line, thread_name(t).c_str(),
                                                             block_name.c_str(), u & 31, thread_name(u).c_str(), f.mask));
                    return;
                }
            }
        }
        if (at_barrier > 0) {
            std::string message = strprintf("__syncthreads() at %s:%d reached by %d of %d threads of block %s",
                                            barrier_file, barrier_line, at_barrier, n, block_name.c_str());
            if (exited > 0)
                message += strprintf("; %d exited without reaching it (e.g. thread %s)", exited,
                                     thread_name(first_exited).c_str());
            if (in_warp > 0) {
                const Fiber& w = fibers[first_warp];
                message += strprintf("; %d wait in a warp primitive (e.g. thread %s in %s at %s:%d, mask 0x%08x)",
                                     in_warp, thread_name(first_warp).c_str(), warp_op_name(w.op), w.file, w.line,
                                     w.mask);
            }
            error->record(prefix() + message);
            return;
        }
        // only warp primitives wait: some lane of a mask is not in a primitive with that mask
        const Fiber& w = fibers[first_warp];
        int base = first_warp & ~31;
        for (unsigned m = w.mask; m; m &= m - 1) {
            int u = base + __builtin_ctz(m);
            const Fiber& g = fibers[u];
            if (g.state == State::kWarp && g.mask == w.mask) continue;
            std::string other = g.state == State::kWarp
                                    ? strprintf("waits in %s at %s:%d with mask 0x%08x", warp_op_name(g.op), g.file,
                                                g.line, g.mask)
                                    : std::string("does not reach a warp primitive");
            error->record(prefix() + strprintf("%s at %s:%d in thread %s (lane %d) of block %s cannot complete: "
                                                     "its mask 0x%08x names lane %d (thread %s), which %s",
                                                     warp_op_name(w.op), w.file, w.line,
                                                     thread_name(first_warp).c_str(), first_warp & 31,
                                                     block_name.c_str(), w.mask, u & 31, thread_name(u).c_str(),
                                                     other.c_str()));
            return;
        }
        error->record(prefix() + strprintf("threads of block %s wait forever", block_name.c_str()));
    }

    // ---- __syncthreads(): returns the number of threads that passed a non-zero predicate
    int barrier(const char* file, int line, int predicate) {
        int t = current;
        Fiber& f = fibers[t];
        if (barrier_waiting == 0) {
            barrier_file = file;
            barrier_line = line;
            barrier_first = t;
            barrier_true = 0;
        } else if (!same_site(file, line, barrier_file, barrier_line)) {
            fiber_error(strprintf("threads of block %s wait at different __syncthreads(): thread %s at %s:%d, "
                                  "thread %s at %s:%d (every thread of a block must reach the same one)",
                                  dims(block_idx).c_str(), thread_name(barrier_first).c_str(), barrier_file,
                                  barrier_line, thread_name(t).c_str(), file, line));
        }
        f.state = State::kBarrier;
        f.file = file;
        f.line = line;
        barrier_waiting++;
        barrier_true += predicate != 0;
        if (barrier_waiting == n) {
            barrier_result = barrier_true;
            barrier_waiting = 0;
            for (int i = 0; i < n; i++) scratch[i] = i;
            push_shuffled(scratch.data(), n);
        }
        yield();
        return barrier_result;  // read before any thread can reach the next barrier's release
    }

    // ---- warp primitives: a rendezvous of the lanes in mask
    // (collectives pass their per-lane argument pointer as value, and their function)
    uint64_t warp_op(const char* file, int line, uint8_t op, unsigned mask, uint64_t value, int param, int width,
                     CollectiveFn collective = nullptr) {
        int t = current;
        Fiber& f = fibers[t];
        int lane = t & 31, base = t - lane;
        const char* name = warp_op_name(op);
        if (!((mask >> lane) & 1u))
            fiber_error(strprintf("%s at %s:%d in thread %s of block %s: mask 0x%08x does not name the calling lane %d",
                                  name, file, line, thread_name(t).c_str(), dims(block_idx).c_str(), mask, lane));
        if (warp_op_class(op) == 1 && (width < 1 || width > 32 || (width & (width - 1)) != 0))
            fiber_error(strprintf("%s at %s:%d in thread %s of block %s: width %d is not a power of two in [1, 32]",
                                  name, file, line, thread_name(t).c_str(), dims(block_idx).c_str(), width));
        for (unsigned m = mask; m; m &= m - 1) {
            int u = base + __builtin_ctz(m);
            if (u >= n)
                fiber_error(strprintf("%s at %s:%d in thread %s of block %s: mask 0x%08x names lane %d, but the "
                                      "block's last warp has only %d threads",
                                      name, file, line, thread_name(t).c_str(), dims(block_idx).c_str(), mask,
                                      u & 31, n - base));
            if (fibers[u].state == State::kDone)
                fiber_error(strprintf("%s at %s:%d in thread %s of block %s: mask 0x%08x names lane %d (thread %s), "
                                      "which has exited",
                                      name, file, line, thread_name(t).c_str(), dims(block_idx).c_str(), mask,
                                      u & 31, thread_name(u).c_str()));
        }
        f.state = State::kWarp;
        f.op = op;
        f.mask = mask;
        f.value = value;
        f.param = param;
        f.width = width;
        f.collective = collective;
        f.file = file;
        f.line = line;
        bool complete = true;
        for (unsigned m = mask; m && complete; m &= m - 1) {
            const Fiber& g = fibers[base + __builtin_ctz(m)];
            complete = g.state == State::kWarp && g.mask == mask;
        }
        if (complete) complete_warp_op(base, mask);
        yield();
        return f.result;
    }

    // Every lane of mask has arrived: compute each lane's result, then release them.
    void complete_warp_op(int base, unsigned mask) {
        int count = 0;
        const Fiber& first = fibers[base + __builtin_ctz(mask)];
        unsigned ballot = 0;
        for (unsigned m = mask; m; m &= m - 1) {
            int l = __builtin_ctz(m);
            const Fiber& g = fibers[base + l];
            if (g.op != first.op)
                fiber_error(strprintf("lanes of a warp meet in different warp primitives: lane %d (thread %s) in %s "
                                      "at %s:%d, lane %d (thread %s) in %s at %s:%d (block %s)",
                                      __builtin_ctz(mask), thread_name(base + __builtin_ctz(mask)).c_str(),
                                      warp_op_name(first.op), first.file, first.line, l,
                                      thread_name(base + l).c_str(), warp_op_name(g.op), g.file, g.line,
                                      dims(block_idx).c_str()));
            if (g.value != 0) ballot |= 1u << l;
            scratch[count++] = base + l;
        }
        // a collective: one call computes every lane's results from all lanes' arguments
        if (warp_op_class(first.op) == 4) {
            void* lane_args[32] = {};
            for (unsigned m = mask; m; m &= m - 1) {
                int l = __builtin_ctz(m);
                lane_args[l] = reinterpret_cast<void*>((uintptr_t)fibers[base + l].value);
            }
            first.collective(lane_args, mask);
        }
        for (unsigned m = mask; m; m &= m - 1) {
            int lane = __builtin_ctz(m);
            Fiber& g = fibers[base + lane];
            g.result = warp_result(g, lane, base, mask, ballot);
        }
        push_shuffled(scratch.data(), count);
    }

    uint64_t warp_result(const Fiber& g, int lane, int base, unsigned mask, unsigned ballot) const {
        switch (g.op) {
            case kSyncwarp: return 0;
            case kWmmaMma: case kMmaM16n8k16: case kLdmatrix: return 0;  // the collective wrote its results already
            case kBallot: return ballot;
            case kAny: return ballot != 0;
            case kAll: return ballot == mask;
            case kShflIdx: case kShflUp: case kShflDown: case kShflXor: {
                // PTX shfl.sync: segmask = 32 - width picks the segment bits of a lane
                int seg = 32 - g.width;
                int b = g.param & 31;
                int min_lane = lane & seg, max_lane = min_lane | (31 & ~seg);
                int j = lane;
                bool valid = true;
                if (g.op == kShflIdx) j = min_lane | (b & ~seg);
                if (g.op == kShflUp) j = lane - b, valid = j >= min_lane;
                if (g.op == kShflDown) j = lane + b, valid = j <= max_lane;
                if (g.op == kShflXor) j = lane ^ b, valid = j <= max_lane;
                if (!valid) j = lane;
                if (!((mask >> j) & 1u)) return ~(uint64_t)0;  // an inactive source lane: undefined in CUDA
                return fibers[base + j].value;
            }
            default: break;
        }
        // reductions over the 32-bit values of the mask's lanes
        uint32_t acc = 0;
        bool any = false;
        for (unsigned m = mask; m; m &= m - 1) {
            uint32_t v = (uint32_t)fibers[base + __builtin_ctz(m)].value;
            if (!any) {
                acc = v;
                any = true;
                continue;
            }
            switch (g.op) {
                case kReduceAdd: acc += v; break;
                case kReduceMinI: acc = (int32_t)v < (int32_t)acc ? v : acc; break;
                case kReduceMinU: acc = v < acc ? v : acc; break;
                case kReduceMaxI: acc = (int32_t)v > (int32_t)acc ? v : acc; break;
                case kReduceMaxU: acc = v > acc ? v : acc; break;
                case kReduceAnd: acc &= v; break;
                case kReduceOr: acc |= v; break;
                case kReduceXor: acc ^= v; break;
                default: break;
            }
        }
        return acc;
    }

    // __nanosleep: let the other ready threads of the block run first
    void sleep() {
        if (queue_count == 0) return;
        push(current);
        yield();
    }

    unsigned active_mask() const {
        int lane_base = current & ~31;
        unsigned mask = 0;
        for (int l = 0; l < 32 && lane_base + l < n; l++)
            if (fibers[lane_base + l].state != State::kDone) mask |= 1u << l;
        return mask;
    }
};

inline thread_local Runner* tls_runner = nullptr;
struct RunnerOwner {
    Runner* runner = nullptr;
    ~RunnerOwner() { delete runner; }
};
inline thread_local RunnerOwner tls_runner_owner;

inline Runner& runner() {
    if (tls_runner == nullptr) {
        tls_runner = new Runner;
        tls_runner_owner.runner = tls_runner;
    }
    return *tls_runner;
}

// The runner of the calling fiber; fails when called outside a kernel.
inline Runner& in_kernel(const char* what) {
    Runner* r = tls_runner;
    if (r == nullptr || r->current < 0) fail("cuda emulation: %s called outside an emulated kernel", what);
    return *r;
}

// ---- SIGSEGV/SIGBUS while a launch runs: name the emulated thread and the likely cause, then let
// the previous handler (Catch2's, or the default) report the crash as usual.
struct CrashHandlerState {
    std::mutex mutex;
    int launches = 0;  // running launches (from any host thread); the first installs the handler
    struct sigaction saved_segv, saved_bus;
};
inline CrashHandlerState& crash_handler_state() {
    static CrashHandlerState* state = new CrashHandlerState;  // never destroyed
    return *state;
}
inline uintptr_t interrupted_stack_pointer(void* context) {
    const ucontext_t* uc = static_cast<const ucontext_t*>(context);
#if defined(__x86_64__)
    return (uintptr_t)uc->uc_mcontext.gregs[REG_RSP];
#elif defined(__aarch64__)
    return (uintptr_t)uc->uc_mcontext.sp;
#else
    (void)uc;
    return 0;
#endif
}
inline void crash_handler(int sig, siginfo_t* info, void* context) {
    Runner* r = tls_runner;
    if (r != nullptr && r->current >= 0) {
        uintptr_t a = (uintptr_t)info->si_addr;
        const char* cause = "";
        uintptr_t shared_end = (uintptr_t)(r->shared_map + r->shared_capacity);
        if (r->shared_map && a >= shared_end && a < shared_end + page_size())
            cause = " (just past the end of the block's dynamic shared memory)";
        else if (r->stack_overflowed(a, interrupted_stack_pointer(context)))
            cause = " (the thread's stack overflowed: an emulated thread has 256 KB for its local variables)";
        char buf[512];
        int len = snprintf(buf, sizeof(buf),
                           "error: emulated kernel with grid (%u,%u,%u), block (%u,%u,%u): %s at address %p in "
                           "thread (%u,%u,%u) of block (%u,%u,%u)%s\n",
                           r->grid.x, r->grid.y, r->grid.z, r->block.x, r->block.y, r->block.z,
                           sig == SIGSEGV ? "segmentation fault" : "bus error", info->si_addr,
                           r->fibers[r->current].idx.x, r->fibers[r->current].idx.y, r->fibers[r->current].idx.z,
                           r->block_idx.x, r->block_idx.y, r->block_idx.z, cause);
        if (len > 0) {
            ssize_t ignored = write(2, buf, (size_t)len < sizeof(buf) ? (size_t)len : sizeof(buf) - 1);
            (void)ignored;
        }
    }
    // returning re-runs the faulting instruction, which now reaches the previous handler
    sigaction(SIGSEGV, &crash_handler_state().saved_segv, nullptr);
    sigaction(SIGBUS, &crash_handler_state().saved_bus, nullptr);
}
struct CrashHandlerScope {
    CrashHandlerScope() {
        CrashHandlerState& state = crash_handler_state();
        std::lock_guard<std::mutex> lock(state.mutex);
        if (state.launches++ > 0) return;
        struct sigaction a;
        memset(&a, 0, sizeof(a));
        a.sa_sigaction = &crash_handler;
        a.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&a.sa_mask);
        sigaction(SIGSEGV, &a, &state.saved_segv);
        sigaction(SIGBUS, &a, &state.saved_bus);
    }
    ~CrashHandlerScope() {
        CrashHandlerState& state = crash_handler_state();
        std::lock_guard<std::mutex> lock(state.mutex);
        if (--state.launches > 0) return;
        sigaction(SIGSEGV, &state.saved_segv, nullptr);
        sigaction(SIGBUS, &state.saved_bus, nullptr);
    }
};
// A handler for a stack overflow needs a stack of its own; give one to threads that have none.
inline void ensure_signal_stack() {
    static thread_local bool checked = false;
    if (checked) return;
    checked = true;
    stack_t old;
    if (sigaltstack(nullptr, &old) != 0 || !(old.ss_flags & SS_DISABLE)) return;
    static thread_local std::vector<char> alt(64 * 1024);
    stack_t ss;
    memset(&ss, 0, sizeof(ss));
    ss.ss_sp = alt.data();
    ss.ss_size = alt.size();
    sigaltstack(&ss, nullptr);
}

// ---- the runtime's error state and device memory
inline thread_local cudaError_t tls_last_error = cudaSuccess;
inline cudaError_t record(cudaError_t e) {
    if (e != cudaSuccess) tls_last_error = e;
    return e;
}

struct Allocations {
    std::mutex mutex;
    std::map<uintptr_t, size_t> blocks;  // start -> bytes
    std::map<const void*, size_t> max_dynamic_shared;  // per kernel, from cudaFuncSetAttribute
};
inline Allocations& allocations() {
    static Allocations* a = new Allocations;  // never destroyed: cudaFree may run from static destructors
    return *a;
}
// Is [p, p + bytes) inside one cudaMalloc allocation?
inline bool is_device_range(const void* p, size_t bytes) {
    Allocations& a = allocations();
    std::lock_guard<std::mutex> lock(a.mutex);
    uintptr_t x = (uintptr_t)p;
    auto it = a.blocks.upper_bound(x);
    if (it == a.blocks.begin()) return false;
    --it;
    return x >= it->first && x + bytes <= it->first + it->second && x + bytes >= x;
}
inline bool check_device_range(const char* call, const char* side, const void* p, size_t bytes) {
    if (is_device_range(p, bytes)) return true;
    fprintf(stderr, "cuda emulation: %s: the %s [%p, +%zu bytes) is not inside one cudaMalloc allocation\n", call,
            side, p, bytes);
    return false;
}

// libgomp cannot start a parallel region in a process forked from one whose thread pool exists
// (tests run failing code in forked children), so a forked child runs its blocks sequentially.
inline const pid_t main_pid = getpid();

inline int os_threads() {
#ifdef _OPENMP
    if (getpid() != main_pid) return 1;
    static int threads = [] {
        const char* env = getenv("MIXLN_EMU_THREADS");
        int t = env ? atoi(env) : omp_get_max_threads();
        if (t < 1) t = 1;
        return t < kMaxOsThreads ? t : kMaxOsThreads;
    }();
    return threads;
#else
    return 1;
#endif
}

inline cudaError_t check_launch(const void* kernel, dim3 grid, dim3 block, size_t shared_bytes) {
    unsigned b[3] = {block.x, block.y, block.z}, g[3] = {grid.x, grid.y, grid.z};
    uint64_t threads = (uint64_t)block.x * block.y * block.z;
    bool bad = threads > (uint64_t)kMaxThreadsPerBlock;
    for (int i = 0; i < 3; i++) bad |= b[i] == 0 || g[i] == 0 || b[i] > kMaxBlockDim[i] || g[i] > kMaxGridDim[i];
    if (bad) {
        fprintf(stderr, "cuda emulation: launch with grid %s, block %s (%llu threads per block): dimensions must be "
                "at least 1 and at most grid (2147483647,65535,65535), block (1024,1024,64), and 1024 threads per "
                "block\n", dims(grid).c_str(), dims(block).c_str(), (unsigned long long)threads);
        return cudaErrorInvalidConfiguration;
    }
    size_t limit = kSharedDefault;
    {
        Allocations& a = allocations();
        std::lock_guard<std::mutex> lock(a.mutex);
        auto it = a.max_dynamic_shared.find(kernel);
        if (it != a.max_dynamic_shared.end()) limit = it->second > limit ? it->second : limit;
    }
    if (shared_bytes > limit) {
        fprintf(stderr, "cuda emulation: launch with %zu bytes of dynamic shared memory: the limit is %zu (above 48 KB "
                "it takes cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes), up to "
                "%zu)\n", shared_bytes, limit, kSharedOptin);
        return cudaErrorInvalidValue;
    }
    return cudaSuccess;
}

// Runs every block of a launch; a kernel's call with its arguments is body(arg).
inline void run_grid(dim3 grid, dim3 block, size_t shared_bytes, void (*body)(void*), void* arg) {
    if (tls_runner != nullptr && tls_runner->current >= 0)
        fail("cuda emulation: a kernel launched a kernel (dynamic parallelism is not emulated)");
    LaunchError error;
    long long nblocks = (long long)grid.x * grid.y * grid.z;
    CrashHandlerScope crash_handler_scope;
    auto setup = [&]() {
        Runner& r = runner();
        r.grid = grid;
        r.block = block;
        r.body = body;
        r.body_arg = arg;
        r.error = &error;
        r.prepare_shared(shared_bytes);
        ensure_signal_stack();
        return &r;
    };
    int threads = os_threads();
    if (threads > 1 && nblocks > 1) {
#ifdef _OPENMP
        int team = nblocks < threads ? (int)nblocks : threads;
#pragma omp parallel num_threads(team)
        {
            Runner* r = setup();
#pragma omp for schedule(dynamic, 1)
            for (long long b = 0; b < nblocks; b++)
                if (!error.set.load(std::memory_order_relaxed)) r->run_block(b);
        }
#endif
    } else {
        Runner* r = setup();
        for (long long b = 0; b < nblocks && !error.set.load(); b++) r->run_block(b);
    }
    if (error.set.load()) fail("%s", error.message.c_str());
}

// Where a synchronising call is written: __syncthreads and the warp primitives are macros that
// expand to cuda_emu::Site{__FILE__, __LINE__}.<call>, so errors name the line.
struct Site {
    const char* file;
    int line;

    int barrier(int predicate, const char* what) const {
        return in_kernel(what).barrier(file, line, predicate);
    }
    void syncthreads() const { barrier(1, "__syncthreads()"); }
    int syncthreads_count(int predicate) const { return barrier(predicate, "__syncthreads_count()"); }
    int syncthreads_and(int predicate) const {
        Runner& r = in_kernel("__syncthreads_and()");
        return r.barrier(file, line, predicate) == r.n;
    }
    int syncthreads_or(int predicate) const { return barrier(predicate, "__syncthreads_or()") != 0; }

    uint64_t op(uint8_t kind, unsigned mask, uint64_t value, int param, int width) const {
        return in_kernel(warp_op_name(kind)).warp_op(file, line, kind, mask, value, param, width);
    }
    template <typename T>
    T shuffle(uint8_t kind, unsigned mask, T var, int param, int width) const {
        static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value,
                      "warp shuffles take a trivially copyable value of at most 8 bytes");
        uint64_t bits = 0;
        memcpy(&bits, &var, sizeof(T));
        bits = op(kind, mask, bits, param, width);
        T out = var;
        memcpy((void*)&out, &bits, sizeof(T));
        return out;
    }
    void syncwarp(unsigned mask = 0xffffffffu) const { op(kSyncwarp, mask, 0, 0, 32); }
    template <typename T>
    T shfl(unsigned mask, T var, int src_lane, int width = warpSize) const {
        return shuffle(kShflIdx, mask, var, src_lane, width);
    }
    template <typename T>
    T shfl_up(unsigned mask, T var, unsigned delta, int width = warpSize) const {
        return shuffle(kShflUp, mask, var, (int)delta, width);
    }
    template <typename T>
    T shfl_down(unsigned mask, T var, unsigned delta, int width = warpSize) const {
        return shuffle(kShflDown, mask, var, (int)delta, width);
    }
    template <typename T>
    T shfl_xor(unsigned mask, T var, int lane_mask, int width = warpSize) const {
        return shuffle(kShflXor, mask, var, lane_mask, width);
    }
    unsigned ballot(unsigned mask, int predicate) const { return (unsigned)op(kBallot, mask, predicate != 0, 0, 32); }
    int any(unsigned mask, int predicate) const { return (int)op(kAny, mask, predicate != 0, 0, 32); }
    int all(unsigned mask, int predicate) const { return (int)op(kAll, mask, predicate != 0, 0, 32); }
    unsigned reduce(uint8_t kind, unsigned mask, unsigned value) const { return (unsigned)op(kind, mask, value, 0, 32); }
    unsigned reduce_add(unsigned mask, unsigned value) const { return reduce(kReduceAdd, mask, value); }
    int reduce_add(unsigned mask, int value) const { return (int)reduce(kReduceAdd, mask, (unsigned)value); }
    unsigned reduce_min(unsigned mask, unsigned value) const { return reduce(kReduceMinU, mask, value); }
    int reduce_min(unsigned mask, int value) const { return (int)reduce(kReduceMinI, mask, (unsigned)value); }
    unsigned reduce_max(unsigned mask, unsigned value) const { return reduce(kReduceMaxU, mask, value); }
    int reduce_max(unsigned mask, int value) const { return (int)reduce(kReduceMaxI, mask, (unsigned)value); }
    unsigned reduce_and(unsigned mask, unsigned value) const { return reduce(kReduceAnd, mask, value); }
    unsigned reduce_or(unsigned mask, unsigned value) const { return reduce(kReduceOr, mask, value); }
    unsigned reduce_xor(unsigned mask, unsigned value) const { return reduce(kReduceXor, mask, value); }
    unsigned activemask() const { return in_kernel("__activemask()").active_mask(); }
    void nanosleep(unsigned) const { in_kernel("__nanosleep()").sleep(); }
};

}  // namespace cuda_emu

// ---- built-in variables (read-only, like CUDA's)
#define threadIdx (static_cast<const uint3&>(cuda_emu::tls_thread_idx))
#define blockIdx (static_cast<const uint3&>(cuda_emu::tls_block_idx))
#define blockDim (static_cast<const dim3&>(cuda_emu::tls_block_dim))
#define gridDim (static_cast<const dim3&>(cuda_emu::tls_grid_dim))

// ---- synchronisation
#define __syncthreads cuda_emu::Site{__FILE__, __LINE__}.syncthreads
#define __syncthreads_count cuda_emu::Site{__FILE__, __LINE__}.syncthreads_count
#define __syncthreads_and cuda_emu::Site{__FILE__, __LINE__}.syncthreads_and
#define __syncthreads_or cuda_emu::Site{__FILE__, __LINE__}.syncthreads_or
#define __syncwarp cuda_emu::Site{__FILE__, __LINE__}.syncwarp
#define __shfl_sync cuda_emu::Site{__FILE__, __LINE__}.shfl
#define __shfl_up_sync cuda_emu::Site{__FILE__, __LINE__}.shfl_up
#define __shfl_down_sync cuda_emu::Site{__FILE__, __LINE__}.shfl_down
#define __shfl_xor_sync cuda_emu::Site{__FILE__, __LINE__}.shfl_xor
#define __ballot_sync cuda_emu::Site{__FILE__, __LINE__}.ballot
#define __any_sync cuda_emu::Site{__FILE__, __LINE__}.any
#define __all_sync cuda_emu::Site{__FILE__, __LINE__}.all
#define __reduce_add_sync cuda_emu::Site{__FILE__, __LINE__}.reduce_add
#define __reduce_min_sync cuda_emu::Site{__FILE__, __LINE__}.reduce_min
#define __reduce_max_sync cuda_emu::Site{__FILE__, __LINE__}.reduce_max
#define __reduce_and_sync cuda_emu::Site{__FILE__, __LINE__}.reduce_and
#define __reduce_or_sync cuda_emu::Site{__FILE__, __LINE__}.reduce_or
#define __reduce_xor_sync cuda_emu::Site{__FILE__, __LINE__}.reduce_xor
#define __activemask cuda_emu::Site{__FILE__, __LINE__}.activemask
#define __nanosleep cuda_emu::Site{__FILE__, __LINE__}.nanosleep

inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
[[noreturn]] inline void __trap() {
    cuda_emu::Runner& r = cuda_emu::in_kernel("__trap()");
    r.fiber_error(cuda_emu::strprintf("__trap() in thread %s of block %s", r.thread_name(r.current).c_str(),
                                      cuda_emu::dims(r.block_idx).c_str()));
}

// Dynamic shared memory of the running block (what DYNAMIC_SHARED in cuda_common.h uses).
inline void* cuda_emu_dynamic_shared() { return cuda_emu::in_kernel("DYNAMIC_SHARED").shared_ptr; }

// Launch: what LAUNCH in cuda_common.h calls. The arguments are converted to the kernel's parameter
// types once, as a GPU launch does; every thread gets its own copy.
template <typename... KernelArgs, typename... Args>
inline void cuda_emu_launch(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t shared_bytes,
                            cudaStream_t stream, Args... args) {
    static_assert(sizeof...(KernelArgs) == sizeof...(Args), "wrong number of kernel arguments");
    (void)stream;
    cudaError_t e = cuda_emu::check_launch(reinterpret_cast<const void*>(kernel), grid, block, shared_bytes);
    if (e != cudaSuccess) {
        cuda_emu::record(e);
        return;
    }
    struct Call {
        void (*kernel)(KernelArgs...);
        std::tuple<std::decay_t<KernelArgs>...> args;
        static void run(void* p) {
            Call* c = static_cast<Call*>(p);
            std::apply(c->kernel, c->args);
        }
    };
    Call call{kernel, std::tuple<std::decay_t<KernelArgs>...>(args...)};
    cuda_emu::run_grid(grid, block, shared_bytes, &Call::run, &call);
}

// ---- atomics: relaxed device-scope atomics, like CUDA's; return the old value
#define MIXLN_EMU_ATOMIC_RMW(name, builtin, type) \
    inline type name(type* address, type value) { return builtin(address, value, __ATOMIC_RELAXED); }
MIXLN_EMU_ATOMIC_RMW(atomicAdd, __atomic_fetch_add, int)
MIXLN_EMU_ATOMIC_RMW(atomicAdd, __atomic_fetch_add, unsigned int)
MIXLN_EMU_ATOMIC_RMW(atomicAdd, __atomic_fetch_add, unsigned long long)
MIXLN_EMU_ATOMIC_RMW(atomicSub, __atomic_fetch_sub, int)
MIXLN_EMU_ATOMIC_RMW(atomicSub, __atomic_fetch_sub, unsigned int)
MIXLN_EMU_ATOMIC_RMW(atomicAnd, __atomic_fetch_and, int)
MIXLN_EMU_ATOMIC_RMW(atomicAnd, __atomic_fetch_and, unsigned int)
MIXLN_EMU_ATOMIC_RMW(atomicAnd, __atomic_fetch_and, unsigned long long)
MIXLN_EMU_ATOMIC_RMW(atomicOr, __atomic_fetch_or, int)
MIXLN_EMU_ATOMIC_RMW(atomicOr, __atomic_fetch_or, unsigned int)
MIXLN_EMU_ATOMIC_RMW(atomicOr, __atomic_fetch_or, unsigned long long)
MIXLN_EMU_ATOMIC_RMW(atomicXor, __atomic_fetch_xor, int)
MIXLN_EMU_ATOMIC_RMW(atomicXor, __atomic_fetch_xor, unsigned int)
MIXLN_EMU_ATOMIC_RMW(atomicXor, __atomic_fetch_xor, unsigned long long)
MIXLN_EMU_ATOMIC_RMW(atomicExch, __atomic_exchange_n, int)
MIXLN_EMU_ATOMIC_RMW(atomicExch, __atomic_exchange_n, unsigned int)
MIXLN_EMU_ATOMIC_RMW(atomicExch, __atomic_exchange_n, unsigned long long)
#undef MIXLN_EMU_ATOMIC_RMW

namespace cuda_emu {
// old = *address; *address = update(old), atomically, by compare-and-swap
template <typename T, typename F>
inline T atomic_update(T* address, F update) {
    T old;
    __atomic_load(address, &old, __ATOMIC_RELAXED);
    T desired;
    do {
        desired = update(old);
    } while (!__atomic_compare_exchange(address, &old, &desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    return old;
}
}  // namespace cuda_emu

inline float atomicAdd(float* address, float value) {
    return cuda_emu::atomic_update(address, [value](float old) { return old + value; });
}
inline double atomicAdd(double* address, double value) {
    return cuda_emu::atomic_update(address, [value](double old) { return old + value; });
}
inline __nv_bfloat16 atomicAdd(__nv_bfloat16* address, __nv_bfloat16 value) {
    static_assert(sizeof(__nv_bfloat16) == sizeof(unsigned short), "bf16 is 2 bytes");
    unsigned short* bits = reinterpret_cast<unsigned short*>(address);
    unsigned short old = cuda_emu::atomic_update(bits, [value](unsigned short old_bits) {
        __nv_bfloat16 old_value;
        memcpy((void*)&old_value, &old_bits, 2);
        __nv_bfloat16 sum = __float2bfloat16_rn(__bfloat162float(old_value) + __bfloat162float(value));
        unsigned short sum_bits;
        memcpy(&sum_bits, &sum, 2);
        return sum_bits;
    });
    __nv_bfloat16 result;
    memcpy((void*)&result, &old, 2);
    return result;
}
inline float atomicExch(float* address, float value) {
    float old;
    __atomic_exchange(address, &value, &old, __ATOMIC_RELAXED);
    return old;
}
#define MIXLN_EMU_ATOMIC_MINMAX(type)                                                                   \
    inline type atomicMax(type* address, type value) {                                                 \
        return cuda_emu::atomic_update(address, [value](type old) { return old > value ? old : value; }); \
    }                                                                                                  \
    inline type atomicMin(type* address, type value) {                                                 \
        return cuda_emu::atomic_update(address, [value](type old) { return old < value ? old : value; }); \
    }
MIXLN_EMU_ATOMIC_MINMAX(int)
MIXLN_EMU_ATOMIC_MINMAX(unsigned int)
MIXLN_EMU_ATOMIC_MINMAX(long long)
MIXLN_EMU_ATOMIC_MINMAX(unsigned long long)
#undef MIXLN_EMU_ATOMIC_MINMAX
#define MIXLN_EMU_ATOMIC_CAS(type)                                                                      \
    inline type atomicCAS(type* address, type compare, type value) {                                   \
        __atomic_compare_exchange_n(address, &compare, value, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED); \
        return compare; /* the old value, whether or not it matched */                                  \
    }
MIXLN_EMU_ATOMIC_CAS(int)
MIXLN_EMU_ATOMIC_CAS(unsigned int)
MIXLN_EMU_ATOMIC_CAS(unsigned long long)
MIXLN_EMU_ATOMIC_CAS(unsigned short)
#undef MIXLN_EMU_ATOMIC_CAS
// ((old >= limit) ? 0 : old + 1) and (((old == 0) || (old > limit)) ? limit : old - 1)
inline unsigned int atomicInc(unsigned int* address, unsigned int limit) {
    return cuda_emu::atomic_update(address, [limit](unsigned int old) { return old >= limit ? 0u : old + 1; });
}
inline unsigned int atomicDec(unsigned int* address, unsigned int limit) {
    return cuda_emu::atomic_update(address,
                                   [limit](unsigned int old) { return (old == 0 || old > limit) ? limit : old - 1; });
}

// ---- math. glibc's math.h already declares __expf and friends (extern "C", noexcept) without
// defining them; these definitions match those declarations.
inline float rsqrtf(float x) noexcept { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) noexcept { return 1.0 / sqrt(x); }
inline float __expf(float x) noexcept { return expf(x); }
inline float __exp10f(float x) noexcept { return powf(10.0f, x); }
inline float __logf(float x) noexcept { return logf(x); }
inline float __log2f(float x) noexcept { return log2f(x); }
inline float __log10f(float x) noexcept { return log10f(x); }
inline float __powf(float x, float y) noexcept { return powf(x, y); }
inline float __sinf(float x) noexcept { return sinf(x); }
inline float __cosf(float x) noexcept { return cosf(x); }
inline float __tanf(float x) noexcept { return tanf(x); }
inline void __sincosf(float x, float* s, float* c) noexcept {
    *s = sinf(x);
    *c = cosf(x);
}
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
inline float __fdiv_rn(float x, float y) { return x / y; }
// a volatile result keeps the compiler from fusing the operation into an FMA, as CUDA's _rn
// intrinsics promise
inline float __fadd_rn(float x, float y) {
    volatile float r = x + y;
    return r;
}
inline float __fsub_rn(float x, float y) {
    volatile float r = x - y;
    return r;
}
inline float __fmul_rn(float x, float y) {
    volatile float r = x * y;
    return r;
}
inline float __fmaf_rn(float x, float y, float z) { return fmaf(x, y, z); }
inline float __saturatef(float x) { return x > 0.0f ? (x < 1.0f ? x : 1.0f) : 0.0f; }  // NaN -> 0
// float -> int conversions: NaN -> 0, out of range saturates, as cvt does
inline int cuda_emu_float2int(float rounded) {
    if (rounded != rounded) return 0;
    if (rounded >= 2147483648.0f) return INT_MAX;
    if (rounded < -2147483648.0f) return INT_MIN;
    return (int)rounded;
}
inline unsigned int cuda_emu_float2uint(float rounded) {
    if (rounded != rounded || rounded <= 0.0f) return 0;
    if (rounded >= 4294967296.0f) return UINT_MAX;
    return (unsigned int)rounded;
}
inline int __float2int_rn(float x) { return cuda_emu_float2int(nearbyintf(x)); }  // ties to even
inline int __float2int_rz(float x) { return cuda_emu_float2int(truncf(x)); }
inline int __float2int_rd(float x) { return cuda_emu_float2int(floorf(x)); }
inline int __float2int_ru(float x) { return cuda_emu_float2int(ceilf(x)); }
inline unsigned int __float2uint_rn(float x) { return cuda_emu_float2uint(nearbyintf(x)); }
inline unsigned int __float2uint_rz(float x) { return cuda_emu_float2uint(truncf(x)); }
inline float __int2float_rn(int x) { return (float)x; }
inline float __uint2float_rn(unsigned int x) { return (float)x; }
inline int __float_as_int(float x) {
    int i;
    memcpy(&i, &x, 4);
    return i;
}
inline unsigned int __float_as_uint(float x) {
    unsigned int i;
    memcpy(&i, &x, 4);
    return i;
}
inline float __int_as_float(int i) {
    float x;
    memcpy(&x, &i, 4);
    return x;
}
inline float __uint_as_float(unsigned int i) {
    float x;
    memcpy(&x, &i, 4);
    return x;
}
inline long long __double_as_longlong(double x) {
    long long i;
    memcpy(&i, &x, 8);
    return i;
}
inline double __longlong_as_double(long long i) {
    double x;
    memcpy(&x, &i, 8);
    return x;
}
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned int)x); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned int __brev(unsigned int x) {
    x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
    x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
    x = ((x >> 4) & 0x0F0F0F0Fu) | ((x & 0x0F0F0F0Fu) << 4);
    x = ((x >> 8) & 0x00FF00FFu) | ((x & 0x00FF00FFu) << 8);
    return (x >> 16) | (x << 16);
}

// CUDA's max/min overloads (as in its math_functions.hpp): global functions, so std::max and
// std::min are untouched, and a plain call with two ints or two floats picks these.
#define MIXLN_EMU_MINMAX(result, a_type, b_type)                                                   \
    inline result max(a_type a, b_type b) { return (result)a > (result)b ? (result)a : (result)b; } \
    inline result min(a_type a, b_type b) { return (result)a < (result)b ? (result)a : (result)b; }
MIXLN_EMU_MINMAX(int, int, int)
MIXLN_EMU_MINMAX(unsigned int, unsigned int, unsigned int)
MIXLN_EMU_MINMAX(unsigned int, int, unsigned int)
MIXLN_EMU_MINMAX(unsigned int, unsigned int, int)
MIXLN_EMU_MINMAX(long, long, long)
MIXLN_EMU_MINMAX(unsigned long, unsigned long, unsigned long)
MIXLN_EMU_MINMAX(unsigned long, long, unsigned long)
MIXLN_EMU_MINMAX(unsigned long, unsigned long, long)
MIXLN_EMU_MINMAX(long long, long long, long long)
MIXLN_EMU_MINMAX(unsigned long long, unsigned long long, unsigned long long)
MIXLN_EMU_MINMAX(unsigned long long, long long, unsigned long long)
MIXLN_EMU_MINMAX(unsigned long long, unsigned long long, long long)
#undef MIXLN_EMU_MINMAX
inline float max(float a, float b) { return fmaxf(a, b); }
inline float min(float a, float b) { return fminf(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(float a, double b) { return fmax(a, b); }
inline double min(float a, double b) { return fmin(a, b); }
inline double max(double a, float b) { return fmax(a, b); }
inline double min(double a, float b) { return fmin(a, b); }

// ---- cache-hinted loads and stores: plain memory accesses here
template <typename T> inline T __ldg(const T* p) { return *p; }
template <typename T> inline T __ldcg(const T* p) { return *p; }
template <typename T> inline T __ldca(const T* p) { return *p; }
template <typename T> inline T __ldcs(const T* p) { return *p; }
template <typename T> inline T __ldlu(const T* p) { return *p; }
template <typename T> inline T __ldcv(const T* p) { return *p; }
template <typename T> inline void __stcg(T* p, T v) { *p = v; }
template <typename T> inline void __stcs(T* p, T v) { *p = v; }
template <typename T> inline void __stwb(T* p, T v) { *p = v; }
template <typename T> inline void __stwt(T* p, T v) { *p = v; }

// ---- runtime API: bodies for the declarations in cuda_runtime_api.h
inline const char* cudaGetErrorName(cudaError_t error) {
    switch (error) {
        case cudaSuccess: return "cudaSuccess";
        case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
        case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
        case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
        case cudaErrorInvalidMemcpyDirection: return "cudaErrorInvalidMemcpyDirection";
        case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
        case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
        case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
        case cudaErrorNotSupported: return "cudaErrorNotSupported";
        default: return "cudaErrorUnknown";
    }
}
inline const char* cudaGetErrorString(cudaError_t error) {
    switch (error) {
        case cudaSuccess: return "no error";
        case cudaErrorInvalidValue: return "invalid argument";
        case cudaErrorMemoryAllocation: return "out of memory";
        case cudaErrorInvalidConfiguration: return "invalid configuration argument";
        case cudaErrorInvalidMemcpyDirection: return "invalid copy direction for memcpy";
        case cudaErrorInvalidDevice: return "invalid device ordinal";
        case cudaErrorInvalidResourceHandle: return "invalid resource handle";
        case cudaErrorLaunchFailure: return "unspecified launch failure";
        case cudaErrorNotSupported: return "operation not supported";
        default: return "unrecognized error code";
    }
}
inline cudaError_t cudaGetLastError(void) {
    cudaError_t e = cuda_emu::tls_last_error;
    cuda_emu::tls_last_error = cudaSuccess;
    return e;
}
inline cudaError_t cudaPeekAtLastError(void) { return cuda_emu::tls_last_error; }

inline cudaError_t cudaGetDeviceCount(int* count) {
    if (count == nullptr) return cuda_emu::record(cudaErrorInvalidValue);
    *count = 1;
    return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int device) {
    return device == 0 ? cudaSuccess : cuda_emu::record(cudaErrorInvalidDevice);
}
inline cudaError_t cudaGetDevice(int* device) {
    if (device == nullptr) return cuda_emu::record(cudaErrorInvalidValue);
    *device = 0;
    return cudaSuccess;
}
inline cudaError_t cudaGetDeviceProperties(struct cudaDeviceProp* prop, int device) {
    if (prop == nullptr) return cuda_emu::record(cudaErrorInvalidValue);
    if (device != 0) return cuda_emu::record(cudaErrorInvalidDevice);
    memset(prop, 0, sizeof(*prop));
    snprintf(prop->name, sizeof(prop->name), "CPU emulation");
    prop->totalGlobalMem = (size_t)sysconf(_SC_PHYS_PAGES) * cuda_emu::page_size();
    prop->sharedMemPerBlock = cuda_emu::kSharedDefault;
    prop->sharedMemPerBlockOptin = cuda_emu::kSharedOptin;
    prop->sharedMemPerMultiprocessor = 228 * 1024;
    prop->regsPerBlock = 65536;
    prop->regsPerMultiprocessor = 65536;
    prop->warpSize = warpSize;
    prop->maxThreadsPerBlock = cuda_emu::kMaxThreadsPerBlock;
    prop->maxThreadsPerMultiProcessor = 2048;
    prop->maxBlocksPerMultiProcessor = 32;
    for (int i = 0; i < 3; i++) {
        prop->maxThreadsDim[i] = (int)cuda_emu::kMaxBlockDim[i];
        prop->maxGridSize[i] = (int)cuda_emu::kMaxGridDim[i];
    }
    prop->totalConstMem = 64 * 1024;
    prop->major = 9;
    prop->minor = 0;
    prop->multiProcessorCount = cuda_emu::os_threads();
    prop->l2CacheSize = 50 * 1024 * 1024;
    prop->unifiedAddressing = 1;
    return cudaSuccess;
}
inline cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }
inline cudaError_t cudaDeviceReset(void) { return cudaSuccess; }

inline cudaError_t cudaMalloc(void** ptr, size_t size) {
    if (ptr == nullptr) return cuda_emu::record(cudaErrorInvalidValue);
    *ptr = nullptr;
    if (size == 0) return cudaSuccess;
#ifdef MIXLN_ASAN
    // exactly size bytes: AddressSanitizer reports a kernel's access past the end, as
    // compute-sanitizer's memcheck does on a GPU (which also counts bytes past size as outside)
    size_t rounded = size;
    void* p = nullptr;
    if (posix_memalign(&p, 256, size) != 0) p = nullptr;
#else
    size_t rounded = (size + 255) / 256 * 256;
    void* p = aligned_alloc(256, rounded);
#endif
    if (p == nullptr) return cuda_emu::record(cudaErrorMemoryAllocation);
    memset(p, 0xFF, rounded);  // NaN floats: reading memory nobody wrote shows up
    cuda_emu::Allocations& a = cuda_emu::allocations();
    std::lock_guard<std::mutex> lock(a.mutex);
    a.blocks[(uintptr_t)p] = size;
    *ptr = p;
    return cudaSuccess;
}
inline cudaError_t cudaFree(void* ptr) {
    if (ptr == nullptr) return cudaSuccess;
    cuda_emu::Allocations& a = cuda_emu::allocations();
    {
        std::lock_guard<std::mutex> lock(a.mutex);
        auto it = a.blocks.find((uintptr_t)ptr);
        if (it == a.blocks.end()) {
            fprintf(stderr, "cuda emulation: cudaFree(%p): not a pointer that cudaMalloc returned\n", ptr);
            return cuda_emu::record(cudaErrorInvalidValue);
        }
#ifdef MIXLN_ASAN
        ASAN_UNPOISON_MEMORY_REGION(ptr, it->second);   // the redzones a model put inside it (model.h)
#endif
        memset(ptr, 0xFF, it->second);
        a.blocks.erase(it);
    }
    free(ptr);
    return cudaSuccess;
}
inline cudaError_t cudaMallocHost(void** ptr, size_t size) {
    if (ptr == nullptr) return cuda_emu::record(cudaErrorInvalidValue);
    *ptr = malloc(size == 0 ? 1 : size);
    return *ptr ? cudaSuccess : cuda_emu::record(cudaErrorMemoryAllocation);
}
inline cudaError_t cudaFreeHost(void* ptr) {
    free(ptr);
    return cudaSuccess;
}
inline cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
    if (free_bytes == nullptr || total_bytes == nullptr) return cuda_emu::record(cudaErrorInvalidValue);
    *free_bytes = (size_t)sysconf(_SC_AVPHYS_PAGES) * cuda_emu::page_size();
    *total_bytes = (size_t)sysconf(_SC_PHYS_PAGES) * cuda_emu::page_size();
    return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void* dst, const void* src, size_t count, enum cudaMemcpyKind kind) {
    if (count == 0) return cudaSuccess;
    if ((int)kind < (int)cudaMemcpyHostToHost || (int)kind > (int)cudaMemcpyDefault)
        return cuda_emu::record(cudaErrorInvalidMemcpyDirection);
    bool dst_device = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
    bool src_device = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
    if (dst == nullptr || src == nullptr) return cuda_emu::record(cudaErrorInvalidValue);
    if (dst_device && !cuda_emu::check_device_range("cudaMemcpy", "destination", dst, count))
        return cuda_emu::record(cudaErrorInvalidValue);
    if (src_device && !cuda_emu::check_device_range("cudaMemcpy", "source", src, count))
        return cuda_emu::record(cudaErrorInvalidValue);
    memmove(dst, src, count);
    return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, enum cudaMemcpyKind kind,
                                   cudaStream_t) {
    return cudaMemcpy(dst, src, count, kind);
}
inline cudaError_t cudaMemset(void* ptr, int value, size_t count) {
    if (count == 0) return cudaSuccess;
    if (!cuda_emu::check_device_range("cudaMemset", "destination", ptr, count))
        return cuda_emu::record(cudaErrorInvalidValue);
    memset(ptr, value, count);
    return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t) {
    return cudaMemset(ptr, value, count);
}

inline cudaError_t cudaStreamCreate(cudaStream_t* stream) {
    if (stream == nullptr) return cuda_emu::record(cudaErrorInvalidValue);
    *stream = new CUstream_st();
    return cudaSuccess;
}
inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned int) { return cudaStreamCreate(stream); }
inline cudaError_t cudaStreamDestroy(cudaStream_t stream) {
    if (stream == nullptr) return cuda_emu::record(cudaErrorInvalidResourceHandle);
    delete stream;
    return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

inline cudaError_t cudaEventCreate(cudaEvent_t* event) {
    if (event == nullptr) return cuda_emu::record(cudaErrorInvalidValue);
    *event = new CUevent_st{std::chrono::steady_clock::now()};
    return cudaSuccess;
}
inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned int) { return cudaEventCreate(event); }
inline cudaError_t cudaEventDestroy(cudaEvent_t event) {
    if (event == nullptr) return cuda_emu::record(cudaErrorInvalidResourceHandle);
    delete event;
    return cudaSuccess;
}
inline cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t) {
    if (event == nullptr) return cuda_emu::record(cudaErrorInvalidResourceHandle);
    event->time = std::chrono::steady_clock::now();
    return cudaSuccess;
}
inline cudaError_t cudaEventSynchronize(cudaEvent_t event) {
    return event ? cudaSuccess : cuda_emu::record(cudaErrorInvalidResourceHandle);
}
inline cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
    if (ms == nullptr) return cuda_emu::record(cudaErrorInvalidValue);
    if (start == nullptr || end == nullptr) return cuda_emu::record(cudaErrorInvalidResourceHandle);
    *ms = std::chrono::duration<float, std::milli>(end->time - start->time).count();
    return cudaSuccess;
}

inline cudaError_t cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr, int value) {
    if (func == nullptr) return cuda_emu::record(cudaErrorInvalidValue);
    if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
        if (value < 0 || (size_t)value > cuda_emu::kSharedOptin) return cuda_emu::record(cudaErrorInvalidValue);
        cuda_emu::Allocations& a = cuda_emu::allocations();
        std::lock_guard<std::mutex> lock(a.mutex);
        a.max_dynamic_shared[func] = (size_t)value;
    }
    return cudaSuccess;
}
// cuda_runtime.h's overload for a kernel itself (the C API takes const void*)
template <typename... KernelArgs>
inline cudaError_t cudaFuncSetAttribute(void (*kernel)(KernelArgs...), enum cudaFuncAttribute attr, int value) {
    return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}

// Device attributes: the multiprocessor count (the OS threads that run blocks, as in
// cudaGetDeviceProperties) and the per-multiprocessor thread limit; any other is an error here.
inline cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int device) {
    if (value == nullptr) return cuda_emu::record(cudaErrorInvalidValue);
    if (device != 0) return cuda_emu::record(cudaErrorInvalidDevice);
    if (attr == cudaDevAttrMultiProcessorCount) *value = cuda_emu::os_threads();
    else if (attr == cudaDevAttrMaxThreadsPerMultiProcessor) *value = 2048;
    else return cuda_emu::record(cudaErrorInvalidValue);
    return cudaSuccess;
}
// Blocks of a kernel resident per multiprocessor: an emulated kernel has no register count, so
// this counts threads (2048 a multiprocessor, as on sm_80/sm_90) and dynamic shared memory
// (228 KB, as cudaGetDeviceProperties says), at most 32 blocks.
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* num_blocks, const void* func, int block_size,
                                                                 size_t dynamic_shared_bytes) {
    if (num_blocks == nullptr || func == nullptr || block_size <= 0 || block_size > cuda_emu::kMaxThreadsPerBlock)
        return cuda_emu::record(cudaErrorInvalidValue);
    size_t blocks = std::min<size_t>(32, 2048 / (size_t)block_size);
    if (dynamic_shared_bytes > 0) blocks = std::min(blocks, (size_t)228 * 1024 / dynamic_shared_bytes);
    *num_blocks = (int)blocks;
    return cudaSuccess;
}
// cuda_runtime.h's overload for a kernel itself
template <typename... KernelArgs>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* num_blocks, void (*kernel)(KernelArgs...),
                                                                 int block_size, size_t dynamic_shared_bytes) {
    return cudaOccupancyMaxActiveBlocksPerMultiprocessor(num_blocks, reinterpret_cast<const void*>(kernel), block_size,
                                                         dynamic_shared_bytes);
}

// ---- WMMA (tensor cores): the 16x16x16 bf16 subset of nvcuda::wmma from <mma.h>
// A fragment holds a 16x16 tile spread over the 32 lanes of a warp, 8 elements per lane. Which
// lane holds which element is deliberately unlike any natural layout (see wmma_element), so a
// kernel that assumes one gets a wrong answer in tests. Loads and stores are per lane and
// immediate (no rendezvous); mma_sync is a collective of all 32 lanes.
namespace cuda_emu {

// Element e = r * 16 + c of the tile (row r, column c of the logical matrix, whatever the memory
// layout) is x[slot] of lane `lane` where e = ((slot * 32 + lane) * 5) % 256: 5 is odd, so this
// is a bijection of the 256 (lane, slot) pairs onto the 256 elements.
inline int wmma_element(int lane, int slot) { return ((slot * 32 + lane) * 5) % 256; }

// What load_matrix_sync and store_matrix_sync check (as the GPU requires): a full warp, a 256-bit
// aligned tile pointer, and ldm a multiple of 16 bytes. Returns the calling lane.
inline int wmma_check(const char* what, const char* file, int line, const void* ptr, unsigned ldm,
                      size_t element_bytes) {
    Runner& r = in_kernel(what);
    int t = r.current, lane = t & 31, base = t - lane;
    // the call and the thread, for messages (built only when there is an error: loads are hot)
    auto where = [&]() {
        return strprintf("%s at %s:%d in thread %s of block %s", what, file, line, r.thread_name(t).c_str(),
                         dims(r.block_idx).c_str());
    };
    if (base + 32 > r.n)
        r.fiber_error(strprintf("%s: the block's last warp has only %d threads (wmma operations need all 32 lanes "
                                "of a warp)", where().c_str(), r.n - base));
    // a pointer into the dynamic shared memory is checked relative to its start: the GPU build
    // aligns that buffer to 128 bytes (DYNAMIC_SHARED), the emulation only to 16
    uintptr_t p = (uintptr_t)ptr, shared = (uintptr_t)r.shared_ptr;
    bool in_shared = r.shared_bytes > 0 && p >= shared && p < shared + r.shared_bytes;
    uintptr_t offset = in_shared ? p - shared : p;
    if (offset % 32 != 0) {
        std::string at = in_shared ? strprintf("%llu bytes into the dynamic shared memory", (unsigned long long)offset)
                                   : strprintf("address %p", ptr);
        r.fiber_error(strprintf("%s: the tile pointer (%s) is not 32-byte (256-bit) aligned", where().c_str(),
                                at.c_str()));
    }
    if ((ldm * element_bytes) % 16 != 0)
        r.fiber_error(strprintf("%s: ldm %u is not a multiple of %zu elements (16 bytes)", where().c_str(), ldm,
                                16 / element_bytes));
    return lane;
}

// memory offset of element (row, col) of a tile with leading dimension ldm
inline size_t wmma_offset(int row, int col, unsigned ldm, bool row_major) {
    return row_major ? (size_t)row * ldm + col : (size_t)col * ldm + row;
}

// One lane's arguments to mma_sync: its own slots of A, B, C and D
struct WmmaMmaArgs {
    const __nv_bfloat16* a;
    const __nv_bfloat16* b;
    const float* c;
    float* d;
};
// The collective of mma_sync: D = A * B + C over the whole warp
inline void wmma_mma_collective(void* const* lane_args, unsigned mask) {
    (void)mask;  // always the full warp
    // gather all of A, B and C first: d may be the same fragment as c
    float a[256], b[256], c[256];
    for (int lane = 0; lane < 32; lane++) {
        const WmmaMmaArgs* args = static_cast<const WmmaMmaArgs*>(lane_args[lane]);
        for (int slot = 0; slot < 8; slot++) {
            int e = wmma_element(lane, slot);
            a[e] = __bfloat162float(args->a[slot]);
            b[e] = __bfloat162float(args->b[slot]);
            c[e] = args->c[slot];
        }
    }
    // D[m][n] = sum over k, in order, of A[m][k] * B[k][n] (bf16 products are exact in float),
    // then plus C[m][n]
    float d[256];
    for (int m = 0; m < 16; m++)
        for (int n = 0; n < 16; n++) {
            float sum = 0.0f;
            for (int k = 0; k < 16; k++) sum += a[m * 16 + k] * b[k * 16 + n];
            d[m * 16 + n] = sum + c[m * 16 + n];
        }
    // scatter D to every lane's slots
    for (int lane = 0; lane < 32; lane++) {
        const WmmaMmaArgs* args = static_cast<const WmmaMmaArgs*>(lane_args[lane]);
        for (int slot = 0; slot < 8; slot++) args->d[slot] = d[wmma_element(lane, slot)];
    }
}

// ---- mma.sync.m16n8k16 (bf16 inputs, float accumulators), with the PTX fragment layouts above

// One lane's arguments: its registers of A and B, and its accumulators (read and written)
struct MmaM16n8k16Args {
    const uint32_t* a;   // [4]
    const uint32_t* b;   // [2]
    float* d;            // [4]
};
// the bf16 in the low (half 0) or high (half 1) 16 bits of a register, as a float
inline float mma_half(uint32_t reg, int half) {
    uint32_t bits = half ? (reg & 0xffff0000u) : (reg << 16);
    float value;
    memcpy(&value, &bits, sizeof(value));
    return value;
}
// The collective: D (16x8) += A (16x16) * B (16x8) over the whole warp
inline void mma_m16n8k16_collective(void* const* lane_args, unsigned mask) {
    (void)mask;  // always the full warp
    float a[16][16], b[16][8], d[16][8];
    for (int lane = 0; lane < 32; lane++) {
        const MmaM16n8k16Args* args = static_cast<const MmaM16n8k16Args*>(lane_args[lane]);
        int g = lane / 4, t = lane % 4;
        for (int half = 0; half < 2; half++) {
            int k = 2 * t + half;
            a[g][k] = mma_half(args->a[0], half);
            a[g + 8][k] = mma_half(args->a[1], half);
            a[g][k + 8] = mma_half(args->a[2], half);
            a[g + 8][k + 8] = mma_half(args->a[3], half);
            b[k][g] = mma_half(args->b[0], half);
            b[k + 8][g] = mma_half(args->b[1], half);
            d[g][k] = args->d[half];
            d[g + 8][k] = args->d[2 + half];
        }
    }
    // D[m][n] += the sum over k, in order, of A[m][k] * B[k][n] (bf16 products are exact in float)
    for (int lane = 0; lane < 32; lane++) {
        MmaM16n8k16Args* args = static_cast<MmaM16n8k16Args*>(lane_args[lane]);
        int g = lane / 4, t = lane % 4;
        for (int i = 0; i < 4; i++) {
            int m = g + 8 * (i / 2), n = 2 * t + i % 2;
            float sum = 0.0f;
            for (int k = 0; k < 16; k++) sum += a[m][k] * b[k][n];
            args->d[i] = sum + d[m][n];
        }
    }
}
// d (4 floats) += a (4 registers) * b (2 registers) for the calling lane's part of the warp's tiles
inline void mma_m16n8k16_bf16(float* d, const uint32_t* a, const uint32_t* b, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
    MmaM16n8k16Args args{a, b, d};
    in_kernel("mma_bf16_16x8x16").warp_op(file, line, kMmaM16n8k16, 0xffffffffu, (uint64_t)(uintptr_t)&args, 0, 32,
                                          &mma_m16n8k16_collective);
}

// ---- ldmatrix.sync.aligned.m8n8.{x1,x2,x4}{,.trans}.shared.b16, with the PTX layouts above

// One lane's arguments: the row it names, where its registers go, and the form
struct LdmatrixArgs {
    const void* row;   // lanes 8j .. 8j + 7 name rows 0 .. 7 of matrix j (j < count); the others' are unused
    uint32_t* out;     // [count]
    int count;         // 1, 2 or 4 matrices
    bool transpose;
};
// The collective: every lane's register j from matrix j, once all rows are read
inline void ldmatrix_collective(void* const* lane_args, unsigned mask) {
    (void)mask;  // always the full warp
    const LdmatrixArgs* lane0 = static_cast<const LdmatrixArgs*>(lane_args[0]);
    for (int lane = 1; lane < 32; lane++) {
        const LdmatrixArgs* args = static_cast<const LdmatrixArgs*>(lane_args[lane]);
        if (args->count != lane0->count || args->transpose != lane0->transpose)
            in_kernel("ldmatrix").fiber_error(strprintf(
                "ldmatrix: lanes of a warp ask for different forms: lane 0 .x%d%s, lane %d .x%d%s", lane0->count,
                lane0->transpose ? ".trans" : "", lane, args->count, args->transpose ? ".trans" : ""));
    }
    uint16_t m[4][8][8];
    for (int j = 0; j < lane0->count; j++)
        for (int r = 0; r < 8; r++) memcpy(m[j][r], static_cast<const LdmatrixArgs*>(lane_args[8 * j + r])->row, 16);
    for (int lane = 0; lane < 32; lane++) {
        const LdmatrixArgs* args = static_cast<const LdmatrixArgs*>(lane_args[lane]);
        int g = lane / 4, t = lane % 4;
        for (int j = 0; j < lane0->count; j++) {
            uint32_t lo = lane0->transpose ? m[j][2 * t][g] : m[j][g][2 * t];
            uint32_t hi = lane0->transpose ? m[j][2 * t + 1][g] : m[j][g][2 * t + 1];
            args->out[j] = lo | (hi << 16);
        }
    }
}
// The calling lane's part: out (count registers); row, for lanes below 8 * count, the 16 bytes of
// its row, which must lie in the block's dynamic shared memory, 16-byte aligned (relative to the
// buffer's start, as wmma_check). A GPU also takes static __shared__ rows; the emulation insists
// on the dynamic buffer, where it can check the bounds.
inline void ldmatrix_m8n8_b16(uint32_t* out, const void* row, int count, bool transpose,
                              const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    Runner& r = in_kernel("ldmatrix");
    int t = r.current, lane = t & 31, base = t - lane;
    auto where = [&]() {
        return strprintf("ldmatrix at %s:%d in thread %s of block %s", file, line, r.thread_name(t).c_str(),
                         dims(r.block_idx).c_str());
    };
    if (count != 1 && count != 2 && count != 4) r.fiber_error(strprintf("%s: .x%d is not x1, x2 or x4", where().c_str(), count));
    if (base + 32 > r.n)
        r.fiber_error(strprintf("%s: the block's last warp has only %d threads (ldmatrix needs all 32 lanes)",
                                where().c_str(), r.n - base));
    if (lane < 8 * count) {
        uintptr_t p = (uintptr_t)row, shared = (uintptr_t)r.shared_ptr;
        if (r.shared_bytes < 16 || p < shared || p > shared + r.shared_bytes - 16)
            r.fiber_error(strprintf("%s: row address %p (lane %d) is not 16 bytes inside the block's dynamic shared "
                                    "memory", where().c_str(), row, lane));
        if ((p - shared) % 16 != 0)
            r.fiber_error(strprintf("%s: row address %p (lane %d), %llu bytes into the dynamic shared memory, is not "
                                    "16-byte aligned", where().c_str(), row, lane, (unsigned long long)(p - shared)));
    }
    LdmatrixArgs args{row, out, count, transpose};
    r.warp_op(file, line, kLdmatrix, 0xffffffffu, (uint64_t)(uintptr_t)&args, 0, 32, &ldmatrix_collective);
}

}  // namespace cuda_emu

namespace nvcuda {
namespace wmma {

// tags, as in <mma.h>
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

// 16x16x16 only: matrix_a (M x K) and matrix_b (K x N) of __nv_bfloat16 with a row_major or
// col_major layout, and a float accumulator (M x N) without one. 8 elements per lane, as on the GPU.
template <typename Use, int m, int n, int k, typename T, typename Layout = void>
struct fragment {
    static_assert(m == 16 && n == 16 && k == 16, "cuda emulation: only 16x16x16 wmma fragments are emulated");
    static_assert(std::is_same<Use, matrix_a>::value || std::is_same<Use, matrix_b>::value ||
                      std::is_same<Use, accumulator>::value,
                  "cuda emulation: a wmma fragment is a matrix_a, matrix_b or accumulator");
    static_assert(!std::is_same<Use, accumulator>::value ||
                      (std::is_same<T, float>::value && std::is_same<Layout, void>::value),
                  "cuda emulation: only float wmma accumulators (without a layout) are emulated");
    static_assert(std::is_same<Use, accumulator>::value ||
                      (std::is_same<T, __nv_bfloat16>::value &&
                       (std::is_same<Layout, row_major>::value || std::is_same<Layout, col_major>::value)),
                  "cuda emulation: only __nv_bfloat16 matrix_a/matrix_b wmma fragments, with a row_major or "
                  "col_major layout, are emulated");
    using element_type = T;
    using storage_element_type = T;
    static constexpr int num_elements = 8;
    T x[8];
};

// the value type of fill_fragment, not deduced from the argument (so fill_fragment(acc, 0) works)
template <typename T>
struct wmma_value_type {
    using type = T;
};

// every element of the fragment = value
template <typename Use, int m, int n, int k, typename T, typename Layout>
inline void fill_fragment(fragment<Use, m, n, k, T, Layout>& f, const typename wmma_value_type<T>::type& value) {
    for (int i = 0; i < f.num_elements; i++) f.x[i] = value;
}

// matrix_a or matrix_b from memory: element (r, c) at ptr[r * ldm + c] (row_major) or
// ptr[c * ldm + r] (col_major). The calling lane reads its own 8 elements, at once: other lanes'
// stores to the tile must be made visible first (__syncwarp() or __syncthreads()).
template <typename Use, int m, int n, int k, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, m, n, k, T, Layout>& f, const T* ptr, unsigned ldm,
                             const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    static_assert(!std::is_same<Use, accumulator>::value,
                  "wmma::load_matrix_sync of an accumulator takes a layout (mem_row_major or mem_col_major)");
    int lane = cuda_emu::wmma_check("wmma::load_matrix_sync", file, line, ptr, ldm, sizeof(T));
    bool row = std::is_same<Layout, row_major>::value;
    for (int slot = 0; slot < 8; slot++) {
        int e = cuda_emu::wmma_element(lane, slot);
        f.x[slot] = ptr[cuda_emu::wmma_offset(e / 16, e % 16, ldm, row)];
    }
}

// an accumulator from memory, element (r, c) at ptr[r * ldm + c] (mem_row_major) or ptr[c * ldm + r]
template <int m, int n, int k>
inline void load_matrix_sync(fragment<accumulator, m, n, k, float>& f, const float* ptr, unsigned ldm, layout_t layout,
                             const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    int lane = cuda_emu::wmma_check("wmma::load_matrix_sync", file, line, ptr, ldm, sizeof(float));
    for (int slot = 0; slot < 8; slot++) {
        int e = cuda_emu::wmma_element(lane, slot);
        f.x[slot] = ptr[cuda_emu::wmma_offset(e / 16, e % 16, ldm, layout == mem_row_major)];
    }
}

// an accumulator to memory: the calling lane writes its own 8 elements, at once
template <int m, int n, int k>
inline void store_matrix_sync(float* ptr, const fragment<accumulator, m, n, k, float>& f, unsigned ldm,
                              layout_t layout, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    int lane = cuda_emu::wmma_check("wmma::store_matrix_sync", file, line, ptr, ldm, sizeof(float));
    for (int slot = 0; slot < 8; slot++) {
        int e = cuda_emu::wmma_element(lane, slot);
        ptr[cuda_emu::wmma_offset(e / 16, e % 16, ldm, layout == mem_row_major)] = f.x[slot];
    }
}

// d = a * b + c, in float; a rendezvous of all 32 lanes of the warp (d may be c)
template <typename LayoutA, typename LayoutB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
                     const fragment<matrix_a, 16, 16, 16, __nv_bfloat16, LayoutA>& a,
                     const fragment<matrix_b, 16, 16, 16, __nv_bfloat16, LayoutB>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c, const char* file = __builtin_FILE(),
                     int line = __builtin_LINE()) {
    cuda_emu::WmmaMmaArgs args{a.x, b.x, c.x, d.x};
    cuda_emu::in_kernel("wmma::mma_sync")
        .warp_op(file, line, cuda_emu::kWmmaMma, 0xffffffffu, (uint64_t)(uintptr_t)&args, 0, 32,
                 &cuda_emu::wmma_mma_collective);
}

}  // namespace wmma
}  // namespace nvcuda
