/*
Layer-level checks of the CPU kernels that have edge cases the model-level parity tests might
not reach: the blocked GEMM at shapes that are not multiples of its tiles (MR = 6 rows,
NR = 32 columns, KC = 256 deep), against plain triple loops in double.
*/
#include <catch2/catch.hpp>

#include <cmath>
#include <vector>

#include "../model.h"

static std::vector<real> random_vector(size_t n, uint64_t seed) {
    std::vector<real> v(n);
    uint64_t state = seed;
    fill_normal(v.data(), n, 1.0f, &state);
    return v;
}

static double max_relative_error(const std::vector<real>& ours, const std::vector<double>& expected) {
    double diff = 0, norm = 0;
    for (size_t i = 0; i < ours.size(); i++) {
        diff = std::max(diff, fabs(ours[i] - expected[i]));
        norm = std::max(norm, fabs(expected[i]));
    }
    return diff / norm;
}

TEST_CASE("matmul forward and backward match plain loops at ragged shapes", "[layers][cpu]") {
    // (N, IC, OC): tile remainders in every dimension, and IC/N deeper than one KC block of 256
    int shapes[][3] = {{1, 1, 1}, {7, 5, 33}, {13, 300, 31}, {37, 64, 65}, {300, 257, 7}};
    for (auto& shape : shapes) {
        int N = shape[0], IC = shape[1], OC = shape[2];
        INFO("N " << N << " IC " << IC << " OC " << OC);
        std::vector<real> inp = random_vector((size_t)N * IC, 1), weight = random_vector((size_t)OC * IC, 2),
                          dout = random_vector((size_t)N * OC, 3);
        // outputs poisoned, so an element the kernel never writes cannot pass
        std::vector<real> out((size_t)N * OC, NAN);
        matmul_forward_cpu(out.data(), inp.data(), weight.data(), N, IC, OC);
        // backward accumulates: start from known values and check they are kept
        std::vector<real> dinp((size_t)N * IC, 0.5f), dweight((size_t)OC * IC, -0.25f);
        matmul_backward_cpu(dinp.data(), dweight.data(), dout.data(), inp.data(), weight.data(), N, IC, OC);

        std::vector<double> out_ref((size_t)N * OC, 0.0), dinp_ref((size_t)N * IC, 0.5), dweight_ref((size_t)OC * IC, -0.25);
        for (int n = 0; n < N; n++) {
            for (int o = 0; o < OC; o++) {
                for (int i = 0; i < IC; i++) {
                    out_ref[(size_t)n * OC + o] += (double)inp[(size_t)n * IC + i] * weight[(size_t)o * IC + i];
                    dinp_ref[(size_t)n * IC + i] += (double)dout[(size_t)n * OC + o] * weight[(size_t)o * IC + i];
                    dweight_ref[(size_t)o * IC + i] += (double)dout[(size_t)n * OC + o] * inp[(size_t)n * IC + i];
                }
            }
        }
        // fp32 sums of up to 300 unit-scale products: ~1e-6 of the largest value
        CHECK(max_relative_error(out, out_ref) < 1e-5);
        CHECK(max_relative_error(dinp, dinp_ref) < 1e-5);
        CHECK(max_relative_error(dweight, dweight_ref) < 1e-5);
    }
}

TEST_CASE("RoPE backward is the inverse rotation of forward", "[layers][cpu]") {
    int B = 2, T = 7, NH = 3, hs = 6, C = NH * hs;
    std::vector<real> cos_table((size_t)T * hs / 2), sin_table((size_t)T * hs / 2);
    rope_tables_cpu(cos_table.data(), sin_table.data(), T, hs, 10000.0f);
    std::vector<real> qkv = random_vector((size_t)B * T * 3 * C, 4), original = qkv;
    rope_forward_cpu(qkv.data(), cos_table.data(), sin_table.data(), B, T, NH, hs);
    // position 0 is not rotated, later positions are; v is never touched
    CHECK(qkv[0] == original[0]);
    CHECK(qkv[(size_t)3 * C] != original[(size_t)3 * C]);
    CHECK(qkv[2 * C] == original[2 * C]);
    rope_backward_cpu(qkv.data(), cos_table.data(), sin_table.data(), B, T, NH, hs);
    double worst = 0;
    for (size_t i = 0; i < qkv.size(); i++) worst = std::max(worst, (double)fabs(qkv[i] - original[i]));
    CHECK(worst < 1e-5);   // a rotation and its inverse, each a few fp32 roundings of unit values
}
