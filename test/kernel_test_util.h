/*
Helpers of the kernel tests (test_kernels.cu, test_kernels_bf16.cu): random inputs, device arrays
poisoned with NaN, and the comparison of a kernel's output with its CPU twin's, in fp32 and in
bf16. Built by g++ in the emulation (build/test_emu) and by nvcc (build/test_gpu).
*/
#pragma once

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../common.h"
#include "../cuda_common.h"
#include "../layers/embedding.cuh"

inline std::vector<float> random_floats(size_t n, uint64_t seed, float std = 1.0f) {
    std::vector<float> v(n);
    uint64_t state = seed;
    fill_normal(v.data(), n, std, &state);
    return v;
}

inline std::vector<int> random_tokens(size_t n, int V, uint64_t seed) {
    std::vector<int> v(n);
    uint64_t state = seed;
    for (auto& t : v) t = (int)(random_u64(&state) % (uint64_t)V);
    return v;
}

// The positions of `tokens` grouped by token (group_positions_by_token in layers/embedding.cuh),
// as the model makes them for the embedding's backward; device copies for the kernels.
struct TokenGroups {
    std::vector<int> positions, starts;
    int count = 0;
    TokenGroups(const std::vector<int>& tokens, int V) : positions(tokens.size()), starts(tokens.size() + 1) {
        std::vector<int> counts((size_t)V + 1);
        count = group_positions_by_token(positions.data(), starts.data(), counts.data(), tokens.data(),
                                         (int)tokens.size(), V);
    }
};

// A device copy of a host vector, freed at scope exit.
template <typename T>
struct DeviceArray {
    T* ptr = nullptr;
    size_t n = 0;
    explicit DeviceArray(const std::vector<T>& host) : n(host.size()) {
        CUDA_CHECK(cudaMalloc((void**)&ptr, (n ? n : 1) * sizeof(T)));
        CUDA_CHECK(cudaMemcpy(ptr, host.data(), n * sizeof(T), cudaMemcpyHostToDevice));
    }
    // n elements of 0xFF bytes: NaN as floats, so unwritten outputs fail every comparison
    explicit DeviceArray(size_t count) : n(count) {
        CUDA_CHECK(cudaMalloc((void**)&ptr, (n ? n : 1) * sizeof(T)));
        CUDA_CHECK(cudaMemset(ptr, 0xFF, n * sizeof(T)));
    }
    ~DeviceArray() { cudaFree(ptr); }
    DeviceArray(const DeviceArray&) = delete;
    DeviceArray& operator=(const DeviceArray&) = delete;
    std::vector<T> to_host() const {
        std::vector<T> host(n);
        CUDA_CHECK(cudaDeviceSynchronize());
        CUDA_CHECK(cudaMemcpy(host.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost));
        return host;
    }
};

// max |gpu - cpu| / max(|cpu|): the kernels sum in float in a different order than the CPU
// reference (which sums some reductions in double), so agreement is to a few fp32 ulps of the
// largest value; 1e-5 leaves room for reductions over up to ~1000 terms. NaN fails. scale_floor:
// the size of the terms, where the values themselves may cancel to rounding noise.
inline void check_close(const std::vector<float>& gpu, const std::vector<float>& cpu, const char* what,
                        double tolerance = 1e-5, double scale_floor = 1e-30) {
    REQUIRE(gpu.size() == cpu.size());
    double worst = 0, scale = scale_floor;
    for (size_t i = 0; i < cpu.size(); i++) scale = std::max(scale, (double)fabs(cpu[i]));
    for (size_t i = 0; i < cpu.size(); i++) {
        double diff = fabs((double)gpu[i] - cpu[i]);
        if (!(diff <= tolerance * scale)) {   // also catches NaN
            INFO(what << ": element " << i << " of " << cpu.size() << ": gpu " << gpu[i] << ", cpu " << cpu[i]);
            REQUIRE(diff <= tolerance * scale);
        }
        worst = std::max(worst, diff / scale);
    }
}

// lse (B, NH, T) = log(sum_{t2 <= t} exp(q . k[t2] / sqrt(hs))), accumulated in double from the inputs
inline std::vector<float> attention_lse_reference(const std::vector<float>& qkv, int B, int T, int NH, int hs) {
    int C = NH * hs;
    std::vector<float> lse((size_t)B * NH * T);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++)
            for (int t = 0; t < T; t++) {
                const float* q = &qkv[((size_t)b * T + t) * 3 * C + (size_t)h * hs];
                std::vector<double> scores(t + 1);
                double max_score = -INFINITY;
                for (int t2 = 0; t2 <= t; t2++) {
                    const float* k = &qkv[((size_t)b * T + t2) * 3 * C + C + (size_t)h * hs];
                    double dot = 0;
                    for (int i = 0; i < hs; i++) dot += (double)q[i] * k[i];
                    scores[t2] = dot / sqrt((double)hs);
                    max_score = std::max(max_score, scores[t2]);
                }
                double sum = 0;
                for (double s : scores) sum += exp(s - max_score);
                lse[((size_t)b * NH + h) * T + t] = (float)(max_score + log(sum));
            }
    return lse;
}

// ---- bf16

// The bf16 nearest to each value (round to nearest even).
inline std::vector<bf16> to_bf16(const std::vector<float>& v) {
    std::vector<bf16> out(v.size());
    for (size_t i = 0; i < v.size(); i++) out[i] = __float2bfloat16_rn(v[i]);
    return out;
}

inline std::vector<float> to_floats(const std::vector<bf16>& v) {
    std::vector<float> out(v.size());
    for (size_t i = 0; i < v.size(); i++) out[i] = __bfloat162float(v[i]);
    return out;
}

// random_floats as bf16 values: the inputs of a bf16 kernel and its CPU twin, exactly the same.
inline std::vector<bf16> random_bf16(size_t n, uint64_t seed, float std = 1.0f) {
    return to_bf16(random_floats(n, seed, std));
}

// bf16 keeps 8 significant bits, so the spacing of bf16 values near x (one "step") is between
// 2^-8 and 2^-7 of |x|, and rounding to nearest moves x by at most half a step, 2^-8 of |x|
// (BF16_STEP, the unit roundoff). A kernel and its CPU twin compute in float from the same bf16
// inputs and round once where they store; their float values differ by a few float ulps
// (summation order), which can put them on either side of a rounding boundary, and then the
// stored values differ by one step: at most 2^-7 of the largest value, the default tolerance
// below (2 * BF16_STEP relative to the largest value). Anything looser needs its own reason.
constexpr double BF16_STEP = 1.0 / 256;

inline void check_close_bf16(const std::vector<bf16>& gpu, const std::vector<bf16>& cpu, const char* what,
                             double tolerance = 2 * BF16_STEP) {
    check_close(to_floats(gpu), to_floats(cpu), what, tolerance);
}
