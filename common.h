/*
Small helpers shared by every part of the engine: the numeric type of the CPU reference, and
error reporting.

Bad input (a missing file, a malformed shard, a flag out of range) ends the program with a
message that names the problem and exit status 1, in the spirit of llm.c: there is no state
worth unwinding, and a clear message beats a stack of error codes. Tests check these paths by
running the code in a child process (test/test_util.h).
*/
#pragma once

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>

// The CPU reference computes in `real`: float normally, double in the build used for the
// finite-difference gradient check (compiled with -DMIXLN_REAL_DOUBLE, g++ only). Files on disk
// (checkpoints, fixtures) are always fp32.
#ifdef MIXLN_REAL_DOUBLE
typedef double real;
#else
typedef float real;
#endif

// ---- storage types
// The kernels store activations (and the weights they read) in a type T: float, or bf16 in the
// --precision bf16 modes. They always compute in float (the CPU reference in `real`), converting
// on load with to_real and on store with from_real<T>, which rounds to nearest even: one rounding
// per stored value, the same in a kernel and in its CPU twin. bf16 exists in the builds that have
// the CUDA backend (nvcc, and the emulation, which reads the toolkit's host-side cuda_bf16.h).
#if defined(__CUDACC__) || defined(MIXLN_CUDA_EMULATION)
#define MIXLN_HAS_BF16 1
#include <cuda_bf16.h>
typedef __nv_bfloat16 bf16;
#endif

// Functions that the CPU reference and the CUDA kernels share (host and device code under nvcc)
#ifdef __CUDACC__
#define MIXLN_HOST_DEVICE __host__ __device__
#else
#define MIXLN_HOST_DEVICE
#endif

inline real to_real(float x) { return (real)x; }
inline real to_real(double x) { return (real)x; }
template <typename T>
inline T from_real(real x) { return (T)x; }
#ifdef MIXLN_HAS_BF16
inline real to_real(bf16 x) { return (real)__bfloat162float(x); }
template <>
inline bf16 from_real<bf16>(real x) { return __float2bfloat16_rn((float)x); }
#endif

// e^x for the CPU reference's loops: the softmaxes of the attention and the cross-entropy, and
// SwiGLU's sigmoid. std::exp is a call into the library, so a loop around it runs one element at
// a time (gcc calls glibc's vector exp only under -ffast-math). exp_cpu is the textbook method in
// plain arithmetic, which the compiler vectorises with the rest of the loop:
//   x = n ln2 + r, n = rint(x / ln2), |r| <= ln2/2; ln2 in two parts (Cody and Waite), the first
//       with 9 significant bits, so that n times it is exact;
//   e^r by its Taylor series to r^7/7!: the first term left out is below 1e-8 of e^r;
//   every product and sum as one fused multiply-add (std::fma, one instruction under -march=native
//       on any x86-64 with FMA, vectorised like the rest): written out, so that the result does not
//       hang on whether the compiler contracts a * b + c (gcc does at -O2 and above, not at -O1,
//       where separate roundings took the error to 1.11 ulp);
//   e^x = e^r 2^(n/2) 2^(n - n/2), the two powers built from their exponent bits (two, so that
//       each is a normal float for every n in [-150, 128], and a subnormal result is rounded once).
// Checked over every float in [-110, 95] against the exact value: within 0.94 ulp, subnormals
// included (2026-12-01; test_layers.cpp checks a sample). x is first clamped to [-104, 89], where
// e^x rounds to 0 and overflows to inf; NaN stays NaN. The double build keeps std::exp.
inline float exp_cpu(float x) {
    x = x < -104.0f ? -104.0f : (x > 89.0f ? 89.0f : x);   // NaN passes
    float n = std::rint(x * 1.44269504f);                      // x / ln2, to the nearest integer
    float r = std::fma(n, 2.12194440e-4f, std::fma(n, -0.693359375f, x));   // x - n ln2
    float taylor = 1.0f / 5040;                                              // e^r, by Horner's rule
    taylor = std::fma(taylor, r, 1.0f / 720);
    taylor = std::fma(taylor, r, 1.0f / 120);
    taylor = std::fma(taylor, r, 1.0f / 24);
    taylor = std::fma(taylor, r, 1.0f / 6);
    taylor = std::fma(taylor, r, 1.0f / 2);
    taylor = std::fma(taylor, r, 1.0f);
    taylor = std::fma(taylor, r, 1.0f);
    int32_t n_int = n == n ? (int32_t)n : 0, n_half = n_int / 2;   // (a NaN's cast is undefined; taylor is NaN)
    uint32_t bits_a = (uint32_t)(n_half + 127) << 23, bits_b = (uint32_t)(n_int - n_half + 127) << 23;
    float power_a, power_b;   // 2^n_half, 2^(n - n_half)
    memcpy(&power_a, &bits_a, sizeof(float));
    memcpy(&power_b, &bits_b, sizeof(float));
    return taylor * power_a * power_b;
}
inline double exp_cpu(double x) { return std::exp(x); }

// AddressSanitizer builds (make sanitize). The model's activations share one allocation, so an
// access that runs past one tensor lands in the next, unseen; in these builds each tensor is
// followed by ASAN_REDZONE_BYTES that are poisoned (with its padding to 256 bytes), and a kernel
// that reads or writes there is reported. Other builds: no redzone, nothing poisoned.
#if defined(__SANITIZE_ADDRESS__)
#define MIXLN_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define MIXLN_ASAN 1
#endif
#endif
#ifdef MIXLN_ASAN
#include <sanitizer/asan_interface.h>
constexpr size_t ASAN_REDZONE_BYTES = 256;
inline void asan_poison(void* p, size_t bytes) { ASAN_POISON_MEMORY_REGION(p, bytes); }
#else
constexpr size_t ASAN_REDZONE_BYTES = 0;
inline void asan_poison(void*, size_t) {}
#endif

// Print "error: <message>" to stderr and exit with status 1.
[[noreturn]] inline void fail(const char* format, ...) {
    fflush(stdout);
    fprintf(stderr, "error: ");
    va_list args;
    va_start(args, format);
    vfprintf(stderr, format, args);
    va_end(args);
    fprintf(stderr, "\n");
    exit(1);
}

// fopen that fails with the path and the system's reason.
inline FILE* fopen_or_fail(const char* path, const char* mode) {
    FILE* f = fopen(path, mode);
    if (f == nullptr) fail("cannot open '%s': %s", path, strerror(errno));
    return f;
}

// malloc that names the size it could not get.
inline void* malloc_or_fail(size_t bytes, const char* what) {
    void* p = malloc(bytes == 0 ? 1 : bytes);
    if (p == nullptr) fail("out of memory allocating %zu bytes for %s", bytes, what);
    return p;
}

// Bytes of memory the system can still give this process: /proc/meminfo's MemAvailable (free
// memory plus the page cache it can drop) and SwapFree, bounded by a cgroup v2 limit where one is
// set. 0 where none of it can be read (then nobody checks). Linux's malloc promises more than this
// (overcommit), and the first touch of the excess gets the process killed without a message, so
// what must fit is checked against this before it is allocated.
inline size_t host_memory_available() {
    size_t available = 0;
    FILE* f = fopen("/proc/meminfo", "r");
    if (f == nullptr) return 0;
    char line[256];
    while (fgets(line, sizeof(line), f) != nullptr) {
        unsigned long long kib = 0;
        if (sscanf(line, "MemAvailable: %llu kB", &kib) == 1 || sscanf(line, "SwapFree: %llu kB", &kib) == 1) {
            available += (size_t)kib * 1024;
        }
    }
    fclose(f);
    unsigned long long limit = 0, current = 0;
    FILE* max_file = fopen("/sys/fs/cgroup/memory.max", "r");   // "max" where there is no limit
    FILE* current_file = fopen("/sys/fs/cgroup/memory.current", "r");
    if (max_file != nullptr && current_file != nullptr && fscanf(max_file, "%llu", &limit) == 1 &&
        fscanf(current_file, "%llu", &current) == 1 && limit > current && limit - current < available) {
        available = (size_t)(limit - current);
    }
    if (max_file != nullptr) fclose(max_file);
    if (current_file != nullptr) fclose(current_file);
    return available;
}

// The target of a position that is not trained on or scored: padding after a document's end, and
// a row's last position, when the data holds one document per row (train's --pad-id). The
// cross-entropy gives it loss 0 and no gradient, and the mean loss is over the other positions.
constexpr int IGNORED_TARGET = -1;

// A small deterministic generator (splitmix64) so that a seed means the same weights everywhere.
// Its state moves by one constant at every draw, so the state before the k-th draw from here is
// state + k * SPLITMIX64_STEP, without making the draws before it.
constexpr uint64_t SPLITMIX64_STEP = 0x9E3779B97F4A7C15ull;
// splitmix64's output function: 64 well-mixed bits from a state
MIXLN_HOST_DEVICE inline uint64_t splitmix64_mix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
inline uint64_t random_u64(uint64_t* state) { return splitmix64_mix(*state += SPLITMIX64_STEP); }

// normal(0, std) by Box-Muller, from two uniforms in (0, 1]: value i takes draws 2i and 2i + 1.
// The values are computed in parallel, each from its own place in the sequence, and are the same
// bits as drawing them one after another (71M values took 2.2 s of one core, so a 1B model ~40 s).
inline void fill_normal(real* out, size_t n, float std, uint64_t* state) {
    const uint64_t start = *state;
    #pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) {
        uint64_t draw_state = start + 2 * i * SPLITMIX64_STEP;   // the state before draw 2i
        double u1 = ((random_u64(&draw_state) >> 11) + 1.0) / 9007199254740992.0;
        double u2 = (random_u64(&draw_state) >> 11) / 9007199254740992.0;
        out[i] = (real)(std * sqrt(-2.0 * log(u1)) * cos(2.0 * M_PI * u2));
    }
    *state = start + 2 * n * SPLITMIX64_STEP;   // as if all 2n draws were made
}

// ---- stochastic rounding (--rounding stochastic: the weights and AdamW moments of bf16-pure)
// Rounded to nearest, a bf16 weight near 1 (bf16 values there are 2^-7 apart) ignores every update
// smaller than 2^-8, and a bf16 second moment ignores v's change of 0.1% a step at beta2 = 0.999.
// Stochastic rounding goes to the upper neighbour with probability (x - lower) / (upper - lower):
// on average the stored value is x, so small updates add up instead of vanishing. The random bits
// are a pure function of (the run's seed, the optimizer step, the element's index in the flat
// buffer), so a kernel and its CPU twin, any launch shape, and a resumed run round alike.
enum Rounding { ROUND_NEAREST, ROUND_STOCHASTIC };

// the key of optimizer step t (from 1) of a run with this seed
inline uint64_t stochastic_rounding_key(uint64_t seed, int t) {
    return splitmix64_mix(splitmix64_mix(seed ^ 0x5EED0F5A17D0C0DEull) + (uint64_t)t * SPLITMIX64_STEP);
}

// 64 random bits for element index of the step with this key: 16 for each of the update's stores
MIXLN_HOST_DEVICE inline uint64_t stochastic_rounding_bits(uint64_t key, uint64_t index) {
    return splitmix64_mix(key + (index + 1) * SPLITMIX64_STEP);
}

#ifdef MIXLN_HAS_BF16
// x to bf16, stochastically: bf16 is the upper half of a float's bits, so adding 16 uniform random
// bits to the lower half carries into the upper with probability (lower half) / 2^16, and the
// lower half is then dropped. The magnitude rounds this way for either sign, so the rounding is
// unbiased for negative values too; past the largest bf16 the carry gives infinity, as rounding
// to nearest would. Infinities and NaN are rounded to nearest (a NaN's carry could reach the sign).
MIXLN_HOST_DEVICE inline bf16 bf16_round_stochastic(float x, uint32_t random16) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof(bits));
    if ((bits & 0x7F800000u) == 0x7F800000u) return __float2bfloat16_rn(x);
    bits += random16 & 0xFFFFu;
    __nv_bfloat16_raw raw;
    raw.x = (unsigned short)(bits >> 16);
    return bf16(raw);
}
#endif

// x stored as T: a float as it is; a bf16 to nearest even, or stochastically with random16
template <typename T>
MIXLN_HOST_DEVICE inline T round_to(float x, Rounding rounding, uint32_t random16);
template <>
MIXLN_HOST_DEVICE inline float round_to<float>(float x, Rounding, uint32_t) { return x; }
#ifdef MIXLN_HAS_BF16
template <>
MIXLN_HOST_DEVICE inline bf16 round_to<bf16>(float x, Rounding rounding, uint32_t random16) {
    return rounding == ROUND_STOCHASTIC ? bf16_round_stochastic(x, random16) : __float2bfloat16_rn(x);
}
#endif
