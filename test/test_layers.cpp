/*
Layer-level checks of the CPU kernels that have edge cases the model-level parity tests might
not reach: the blocked GEMM at shapes that are not multiples of its tiles (MR = 6 rows,
NR = 32 columns, KC = 256 deep), against plain triple loops in double; LayerNorm, against a plain
double computation and finite differences; the fused residual add + RMSNorm, bitwise against
the unfused pair it replaces in the model; the cross-entropy's ignored targets (padding); exp_cpu (the CPU's vectorisable e^x) against
the exact value; and the learning-rate schedules at their boundaries.
*/
#include <catch2/catch.hpp>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../model.h"
#include "../layers/layernorm.cuh"

static std::vector<real> random_vector(size_t n, uint64_t seed) {
    std::vector<real> v(n);
    uint64_t state = seed;
    fill_normal(v.data(), n, 1.0f, &state);
    return v;
}

static double max_relative_error(const std::vector<real>& ours, const std::vector<double>& expected) {
    double diff = 0, norm = 0;
    for (size_t i = 0; i < ours.size(); i++) {
        if (!std::isfinite(ours[i])) return INFINITY;   // a NaN would slip through std::max
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
        // backward accumulates: start from known values and check they are kept (dinp scaled by
        // dinp_scale first, as DeepNorm's residual needs)
        std::vector<real> dinp((size_t)N * IC, 0.5f), dweight((size_t)OC * IC, -0.25f);
        matmul_backward_cpu(dinp.data(), dweight.data(), dout.data(), inp.data(), weight.data(), N, IC, OC, 1.75f, 1.0f);

        std::vector<double> out_ref((size_t)N * OC, 0.0), dinp_ref((size_t)N * IC, 0.5 * 1.75), dweight_ref((size_t)OC * IC, -0.25);
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

        // scales 0: both gradients written, the old values never read (poisoned: 0 * NaN is NaN)
        std::vector<real> dinp_written((size_t)N * IC, NAN), dweight_written((size_t)OC * IC, NAN);
        matmul_backward_cpu(dinp_written.data(), dweight_written.data(), dout.data(), inp.data(), weight.data(), N, IC,
                            OC, 0.0f, 0.0f);
        for (double& v : dinp_ref) v -= 0.5 * 1.75;
        for (double& v : dweight_ref) v -= -0.25;
        CHECK(max_relative_error(dinp_written, dinp_ref) < 1e-5);
        CHECK(max_relative_error(dweight_written, dweight_ref) < 1e-5);
    }
}

TEST_CASE("exp_cpu is within one ulp of e^x, through overflow, underflow and subnormals", "[layers][cpu]") {
    // the float sample: every 1021st bit pattern between -110 and 95 (both signs, every binade:
    // about 2.2 million values), then the special values
    std::vector<float> xs;
    for (uint64_t bits = 0; bits <= 0xFFFFFFFFull; bits += 1021) {
        float x;
        uint32_t b32 = (uint32_t)bits;
        memcpy(&x, &b32, sizeof(float));
        if (x >= -110.0f && x <= 95.0f) xs.push_back(x);
    }
    REQUIRE(xs.size() > 2000000);
    std::vector<float> ys(xs.size());
    for (size_t i = 0; i < xs.size(); i++) ys[i] = exp_cpu(xs[i]);   // the loop vectorised, as the layers' are
    double worst_ulps = 0;
    float worst_x = 0;
    for (size_t i = 0; i < xs.size(); i++) {
        double exact = std::exp((double)xs[i]);
        float rounded = (float)exact;
        if (std::isinf(rounded)) {
            CHECK(ys[i] == INFINITY);   // overflow
            continue;
        }
        // the spacing of floats at the exact value (the subnormals' below FLT_MIN)
        double ulp = rounded < FLT_MIN ? (double)std::numeric_limits<float>::denorm_min()
                                       : (double)std::nextafter(rounded, INFINITY) - rounded;
        double ulps = std::fabs((double)ys[i] - exact) / ulp;
        if (!(ulps <= worst_ulps)) {
            worst_ulps = ulps;
            worst_x = xs[i];
        }
    }
    INFO("worst " << worst_ulps << " ulp at x = " << worst_x);
    CHECK(worst_ulps <= 1.0);
    // special values
    CHECK(exp_cpu(0.0f) == 1.0f);
    CHECK(exp_cpu(-INFINITY) == 0.0f);
    CHECK(exp_cpu(INFINITY) == INFINITY);
    CHECK(exp_cpu(-1e30f) == 0.0f);
    CHECK(exp_cpu(1e30f) == INFINITY);
    CHECK(std::isnan(exp_cpu(NAN)));
    CHECK(exp_cpu(-103.0f) > 0.0f);   // a subnormal, not flushed
    CHECK(exp_cpu(88.7f) < INFINITY);
}

TEST_CASE("group_positions_by_token groups the positions by token, in order", "[layers][cpu]") {
    // (BT, V): one position; every token distinct; few tokens repeating often; tokens that never occur
    int shapes[][2] = {{1, 1}, {5, 5}, {300, 7}, {50, 1000}};
    for (auto& s : shapes) {
        int BT = s[0], V = s[1];
        INFO("BT " << BT << " V " << V);
        std::vector<int> tokens(BT);
        uint64_t state = 70 + BT;
        for (int i = 0; i < BT; i++) tokens[i] = BT == V ? BT - 1 - i : (int)(random_u64(&state) % (uint64_t)V);
        std::vector<int> positions(BT, -1), starts(BT + 1, -1), counts(V + 1);
        int groups = group_positions_by_token(positions.data(), starts.data(), counts.data(), tokens.data(), BT, V);
        // what a stable sort by token gives, and its groups
        std::vector<int> expected(BT);
        for (int i = 0; i < BT; i++) expected[i] = i;
        std::stable_sort(expected.begin(), expected.end(), [&](int a, int b) { return tokens[a] < tokens[b]; });
        CHECK(positions == expected);
        std::vector<int> distinct = tokens;
        std::sort(distinct.begin(), distinct.end());
        REQUIRE(groups == (int)(std::unique(distinct.begin(), distinct.end()) - distinct.begin()));
        CHECK(starts[0] == 0);
        CHECK(starts[groups] == BT);
        for (int g = 0; g < groups; g++) {
            REQUIRE(starts[g] < starts[g + 1]);
            for (int k = starts[g]; k < starts[g + 1]; k++) CHECK(tokens[positions[k]] == distinct[g]);
        }
    }
}

TEST_CASE("cross-entropy: an ignored target's row has loss 0 and a zero gradient; the other rows are unchanged",
          "[layers][cpu][rows]") {
    const int N = 7, V = 50;
    std::vector<real> logits = random_vector((size_t)N * V, 90);
    std::vector<int> all(N), some(N);
    uint64_t state = 91;
    for (int i = 0; i < N; i++) all[i] = (int)(random_u64(&state) % V);
    some = all;
    some[0] = some[3] = some[6] = IGNORED_TARGET;
    std::vector<real> losses_all(N), losses_some(N, NAN), stats_all(2 * N), stats_some(2 * N);
    std::vector<real> d_all((size_t)N * V), d_some((size_t)N * V, NAN);
    crossentropy_forward_backward_cpu(d_all.data(), losses_all.data(), stats_all.data(), logits.data(), all.data(), 0.25f, N, V);
    crossentropy_forward_backward_cpu(d_some.data(), losses_some.data(), stats_some.data(), logits.data(), some.data(), 0.25f,
                                      N, V);
    for (int i = 0; i < N; i++) {
        INFO("row " << i);
        bool ignored = some[i] == IGNORED_TARGET;
        CHECK(losses_some[i] == (ignored ? 0.0f : losses_all[i]));
        CHECK(losses_all[i] > 0);
        CHECK(stats_some[2 * i] == stats_all[2 * i]);
        for (int v = 0; v < V; v++) CHECK(d_some[(size_t)i * V + v] == (ignored ? 0.0f : d_all[(size_t)i * V + v]));
    }
    // the same from the two-call form, in place as the model's backward runs it
    std::vector<real> in_place = logits, losses(N), stats(2 * N);
    crossentropy_forward_cpu(losses.data(), stats.data(), logits.data(), some.data(), N, V);
    crossentropy_backward_cpu(in_place.data(), in_place.data(), stats.data(), some.data(), 0.25f, N, V);
    CHECK(losses == losses_some);
    CHECK(in_place == d_some);
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

// LayerNorm of one row in double, written from the definition: out = (x - mean) / sqrt(var + eps) * w + b
static void layernorm_row_double(double* y, const double* x, const double* weight, const double* bias, int C,
                                 double eps, double* mean_out = nullptr, double* rstd_out = nullptr) {
    double mean = 0, var = 0;
    for (int c = 0; c < C; c++) mean += x[c] / C;
    for (int c = 0; c < C; c++) var += (x[c] - mean) * (x[c] - mean) / C;
    double rstd = 1 / sqrt(var + eps);
    for (int c = 0; c < C; c++) y[c] = (x[c] - mean) * rstd * weight[c] + bias[c];
    if (mean_out) *mean_out = mean;
    if (rstd_out) *rstd_out = rstd;
}

TEST_CASE("LayerNorm forward matches a double computation and backward matches finite differences",
          "[layers][cpu]") {
    const float eps = 1e-5f;
    // (N, C): one short row, ragged small shapes. Not C = 1 or 2: there xhat is 0 or +-1 whatever
    // the input, the input gradient is (nearly) zero and a relative error means nothing; C = 1 is
    // in the kernel test.
    int shapes[][2] = {{1, 3}, {3, 7}, {37, 67}};
    for (auto& shape : shapes) {
        int N = shape[0], C = shape[1];
        INFO("N " << N << " C " << C);
        std::vector<real> inp = random_vector((size_t)N * C, 5), weight = random_vector(C, 6), bias = random_vector(C, 7),
                          dout = random_vector((size_t)N * C, 8);
        for (auto& x : inp) x += 3.0f;   // a mean well away from zero, so its subtraction matters
        std::vector<real> out((size_t)N * C, NAN), mean(N, NAN), rstd(N, NAN);   // poisoned: every element must be written
        layernorm_forward_cpu(out.data(), mean.data(), rstd.data(), inp.data(), weight.data(), bias.data(), N, C, C, eps);

        std::vector<double> x64(inp.begin(), inp.end()), w64(weight.begin(), weight.end()),
                            b64(bias.begin(), bias.end()), out_ref((size_t)N * C), mean_ref(N), rstd_ref(N);
        for (int i = 0; i < N; i++)
            layernorm_row_double(&out_ref[(size_t)i * C], &x64[(size_t)i * C], w64.data(), b64.data(), C, eps,
                                 &mean_ref[i], &rstd_ref[i]);
        // a handful of fp32 roundings of values of order 1..10
        CHECK(max_relative_error(out, out_ref) < 1e-6);
        CHECK(max_relative_error(mean, mean_ref) < 1e-6);
        CHECK(max_relative_error(rstd, rstd_ref) < 1e-6);

        // backward accumulates: start from known values and subtract them afterwards
        std::vector<real> dinp((size_t)N * C, 0.5f), dweight(C, -0.25f), dbias(C, 0.75f);
        layernorm_backward_cpu(dinp.data(), dweight.data(), dbias.data(), dout.data(), inp.data(), weight.data(),
                               mean.data(), rstd.data(), N, C, C, true);

        // loss = sum(out * dout), so dout is its gradient with respect to out; central differences in
        // double of the plain forward above, one parameter at a time
        std::vector<double> y((size_t)N * C);
        auto loss = [&]() {
            double sum = 0;
            for (int i = 0; i < N; i++) {
                layernorm_row_double(&y[(size_t)i * C], &x64[(size_t)i * C], w64.data(), b64.data(), C, eps);
                for (int c = 0; c < C; c++) sum += y[(size_t)i * C + c] * dout[(size_t)i * C + c];
            }
            return sum;
        };
        // h = 1e-4 on unit-scale inputs: truncation error ~h^2 = 1e-8 times the third derivative (order
        // rstd^3, about 1 here), rounding error ~1e-16 * |loss| / h ~ 1e-11; both far below fp32's
        const double h = 1e-4;
        auto central_difference = [&](double& parameter) {
            double saved = parameter;
            parameter = saved + h;
            double up = loss();
            parameter = saved - h;
            double down = loss();
            parameter = saved;
            return (up - down) / (2 * h);
        };
        std::vector<double> dinp_fd((size_t)N * C), dweight_fd(C), dbias_fd(C);
        for (size_t k = 0; k < x64.size(); k++) dinp_fd[k] = central_difference(x64[k]);
        for (int c = 0; c < C; c++) dweight_fd[c] = central_difference(w64[c]);
        for (int c = 0; c < C; c++) dbias_fd[c] = central_difference(b64[c]);

        std::vector<real> dinp_ours(dinp), dweight_ours(dweight), dbias_ours(dbias);
        for (auto& v : dinp_ours) v -= 0.5f;
        for (auto& v : dweight_ours) v += 0.25f;
        for (auto& v : dbias_ours) v -= 0.75f;
        // fp32 backward against differences exact to ~1e-8: a few fp32 roundings per element plus the
        // cancellation in g - mean(g) - xhat * mean(g * xhat); measured 2e-7 of the largest gradient
        // (2026-11-28), so 1e-5 leaves a factor 50 and still catches any missing term (errors of O(1))
        CHECK(max_relative_error(dinp_ours, dinp_fd) < 1e-5);
        CHECK(max_relative_error(dweight_ours, dweight_fd) < 1e-5);
        CHECK(max_relative_error(dbias_ours, dbias_fd) < 1e-5);
    }
}

// Bitwise equality of two arrays (NaN payloads included), with the first difference in the message.
static void check_bitwise_equal(const std::vector<real>& ours, const std::vector<real>& expected, const char* what) {
    REQUIRE(ours.size() == expected.size());
    for (size_t i = 0; i < ours.size(); i++) {
        if (memcmp(&ours[i], &expected[i], sizeof(real)) != 0) {
            INFO(what << ": element " << i << " of " << ours.size() << ": fused " << ours[i] << ", unfused " << expected[i]);
            REQUIRE(memcmp(&ours[i], &expected[i], sizeof(real)) == 0);
        }
    }
}

// The norms' backward with accumulate false writes dinp where the model has nothing to add it to
// (model_backward): the values of accumulating into zeros, to the bit, over poison (NaN) that it
// must not read. The weight gradients accumulate either way.
TEST_CASE("norm backwards that write dinp give the bits of accumulating into zeros", "[layers][cpu]") {
    int shapes[][2] = {{1, 1}, {7, 33}, {40, 256}};   // (N, C)
    for (auto& shape : shapes) {
        int N = shape[0], C = shape[1];
        INFO("N " << N << " C " << C);
        std::vector<real> inp = random_vector((size_t)N * C, 61), weight = random_vector(C, 62),
                          bias = random_vector(C, 63), dout = random_vector((size_t)N * C, 64);
        std::vector<real> out((size_t)N * C), mean(N), rstd(N);
        std::vector<real> added_dinp((size_t)N * C, 0.0f), written_dinp((size_t)N * C, NAN);
        std::vector<real> added_dweight(C, 0.5f), written_dweight(C, 0.5f), added_dbias(C, 0.5f), written_dbias(C, 0.5f);
        rmsnorm_forward_cpu(out.data(), rstd.data(), inp.data(), weight.data(), N, C, C, 1e-6f);
        rmsnorm_backward_cpu(added_dinp.data(), added_dweight.data(), (real*)nullptr, dout.data(), inp.data(),
                             weight.data(), rstd.data(), N, C, C, true);
        rmsnorm_backward_cpu(written_dinp.data(), written_dweight.data(), (real*)nullptr, dout.data(), inp.data(),
                             weight.data(), rstd.data(), N, C, C, false);
        CHECK(added_dinp == written_dinp);   // element by element: NaN never equals, -0 == +0
        CHECK(added_dweight == written_dweight);

        std::fill(added_dinp.begin(), added_dinp.end(), 0.0f);
        std::fill(written_dinp.begin(), written_dinp.end(), NAN);
        layernorm_forward_cpu(out.data(), mean.data(), rstd.data(), inp.data(), weight.data(), bias.data(), N, C, C, 1e-5f);
        layernorm_backward_cpu(added_dinp.data(), added_dweight.data(), added_dbias.data(), dout.data(), inp.data(),
                               weight.data(), mean.data(), rstd.data(), N, C, C, true);
        layernorm_backward_cpu(written_dinp.data(), written_dweight.data(), written_dbias.data(), dout.data(),
                               inp.data(), weight.data(), mean.data(), rstd.data(), N, C, C, false);
        CHECK(added_dinp == written_dinp);
        CHECK(added_dweight == written_dweight);
        CHECK(added_dbias == written_dbias);
    }
}

// HybridNorm normalises q, k and v where they lie in qkv's rows: C values of every 3C. The norms
// over rows `stride` apart must give, to the bit, what they give over the same rows packed, and
// leave every element between the rows as it was (here NaN, which no comparison lets through).
TEST_CASE("norms over rows with a stride give the bits of the packed rows and touch nothing between them",
          "[layers][cpu]") {
    const int shapes[][3] = {{1, 1, 3}, {7, 33, 99}, {40, 256, 768}, {5, 16, 21}};   // (N, C, stride)
    for (auto& shape : shapes) {
        const int N = shape[0], C = shape[1], stride = shape[2];
        INFO("N " << N << " C " << C << " stride " << stride);
        const size_t n = (size_t)N * stride, packed = (size_t)N * C;
        std::vector<real> inp = random_vector(n, 71), dout = random_vector(n, 72), weight = random_vector(C, 73),
                          bias = random_vector(C, 74);
        // the packed copies of the strided rows, and the strided rows put back (NaN between them)
        auto pack = [&](const std::vector<real>& strided) {
            std::vector<real> rows(packed);
            for (int i = 0; i < N; i++)
                std::copy_n(strided.begin() + (size_t)i * stride, C, rows.begin() + (size_t)i * C);
            return rows;
        };
        auto unpack = [&](const std::vector<real>& rows) {
            std::vector<real> strided(n, NAN);
            for (int i = 0; i < N; i++)
                std::copy_n(rows.begin() + (size_t)i * C, C, strided.begin() + (size_t)i * stride);
            return strided;
        };
        const std::vector<real> inp_packed = pack(inp), dout_packed = pack(dout);
        for (bool accumulate : {true, false}) {
            INFO("accumulate " << accumulate);
            const std::vector<real> dinp_start = unpack(random_vector(packed, 75));
            std::vector<real> out(n, NAN), dinp = dinp_start, mean(N), rstd(N), dweight(C, 0.5f), dbias(C, 0.5f);
            std::vector<real> out_packed(packed), dinp_packed = pack(dinp_start), mean_packed(N), rstd_packed(N),
                dweight_packed(C, 0.5f), dbias_packed(C, 0.5f);
            rmsnorm_forward_cpu(out.data(), rstd.data(), inp.data(), weight.data(), N, C, stride, 1e-6f);
            rmsnorm_backward_cpu(dinp.data(), dweight.data(), (real*)nullptr, dout.data(), inp.data(), weight.data(),
                                 rstd.data(), N, C, stride, accumulate);
            rmsnorm_forward_cpu(out_packed.data(), rstd_packed.data(), inp_packed.data(), weight.data(), N, C, C, 1e-6f);
            rmsnorm_backward_cpu(dinp_packed.data(), dweight_packed.data(), (real*)nullptr, dout_packed.data(),
                                 inp_packed.data(), weight.data(), rstd_packed.data(), N, C, C, accumulate);
            check_bitwise_equal(out, unpack(out_packed), "rmsnorm out");
            check_bitwise_equal(rstd, rstd_packed, "rmsnorm rstd");
            check_bitwise_equal(dinp, unpack(dinp_packed), "rmsnorm dinp");
            check_bitwise_equal(dweight, dweight_packed, "rmsnorm dweight");

            std::fill(out.begin(), out.end(), NAN);
            dinp = dinp_start, dinp_packed = pack(dinp_start);
            layernorm_forward_cpu(out.data(), mean.data(), rstd.data(), inp.data(), weight.data(), bias.data(), N, C,
                                  stride, 1e-5f);
            layernorm_backward_cpu(dinp.data(), dweight.data(), dbias.data(), dout.data(), inp.data(), weight.data(),
                                   mean.data(), rstd.data(), N, C, stride, accumulate);
            layernorm_forward_cpu(out_packed.data(), mean_packed.data(), rstd_packed.data(), inp_packed.data(),
                                  weight.data(), bias.data(), N, C, C, 1e-5f);
            layernorm_backward_cpu(dinp_packed.data(), dweight_packed.data(), dbias_packed.data(), dout_packed.data(),
                                   inp_packed.data(), weight.data(), mean_packed.data(), rstd_packed.data(), N, C, C,
                                   accumulate);
            check_bitwise_equal(out, unpack(out_packed), "layernorm out");
            check_bitwise_equal(mean, mean_packed, "layernorm mean");
            check_bitwise_equal(rstd, rstd_packed, "layernorm rstd");
            check_bitwise_equal(dinp, unpack(dinp_packed), "layernorm dinp");
            check_bitwise_equal(dweight, dweight_packed, "layernorm dweight");
            check_bitwise_equal(dbias, dbias_packed, "layernorm dbias");
        }
    }
}

TEST_CASE("residual_rmsnorm_forward is bitwise the residual add followed by rmsnorm_forward, in place included",
          "[layers][cpu]") {
    // (N, C): one element; ragged rows and channels; C 384, the width of a small model
    int shapes[][2] = {{1, 1}, {37, 67}, {130, 384}};
    for (auto& shape : shapes) {
        for (float x_scale : {1.0f, 1.7f}) {   // residual_forward, and residual_scaled_forward (DeepNorm's a)
            int N = shape[0], C = shape[1];
            const size_t n = (size_t)N * C;
            INFO("N " << N << " C " << C << " x_scale " << x_scale);
            std::vector<real> x = random_vector(n, 9), branch = random_vector(n, 10), weight = random_vector(C, 11);
            // unfused, as model_forward ran it before: the add into its own buffer, then the norm of it
            std::vector<real> sum_ref(n, NAN), out_ref(n, NAN), rstd_ref(N, NAN);
            if (x_scale != 1.0f) {
                residual_scaled_forward_cpu(sum_ref.data(), x.data(), x_scale, branch.data(), n);
            } else {
                residual_forward_cpu(sum_ref.data(), x.data(), branch.data(), n);
            }
            rmsnorm_forward_cpu(out_ref.data(), rstd_ref.data(), sum_ref.data(), weight.data(), N, C, C, 1e-6f);

            // fused, into a separate sum, then in place over x and over branch; outputs poisoned
            std::vector<real> sum(n, NAN), out(n, NAN), rstd(N, NAN);
            residual_rmsnorm_forward_cpu(sum.data(), out.data(), rstd.data(), x.data(), x_scale, branch.data(),
                                         weight.data(), N, C, 1e-6f);
            check_bitwise_equal(sum, sum_ref, "sum");
            check_bitwise_equal(out, out_ref, "out");
            check_bitwise_equal(rstd, rstd_ref, "rstd");
            std::vector<real> x_in_place = x, branch_in_place = branch;
            std::fill(out.begin(), out.end(), NAN);
            std::fill(rstd.begin(), rstd.end(), NAN);
            residual_rmsnorm_forward_cpu(x_in_place.data(), out.data(), rstd.data(), x_in_place.data(), x_scale,
                                         branch.data(), weight.data(), N, C, 1e-6f);
            check_bitwise_equal(x_in_place, sum_ref, "sum into x");
            check_bitwise_equal(out, out_ref, "out, sum into x");
            check_bitwise_equal(rstd, rstd_ref, "rstd, sum into x");
            std::fill(out.begin(), out.end(), NAN);
            std::fill(rstd.begin(), rstd.end(), NAN);
            residual_rmsnorm_forward_cpu(branch_in_place.data(), out.data(), rstd.data(), x.data(), x_scale,
                                         branch_in_place.data(), weight.data(), N, C, 1e-6f);
            check_bitwise_equal(branch_in_place, sum_ref, "sum into branch");
            check_bitwise_equal(out, out_ref, "out, sum into branch");
            check_bitwise_equal(rstd, rstd_ref, "rstd, sum into branch");
        }
    }
}

TEST_CASE("learning_rate: every schedule's warmup, stable phase and decay, step by step", "[layers][cpu][schedule]") {
    // lr_max 1, warmup 2, 10 steps, down to 0.1; wsd decays over the last 4 steps
    const int warmup = 2, total = 10, wsd_decay = 4;
    const double r = 0.1f;   // the float train passes, as a double
    auto lr = [&](int step, LrSchedule schedule) { return learning_rate(step, 1.0f, warmup, total, 0.1f, schedule, wsd_decay); };
    std::vector<double> cosine, linear, constant, wsd, wsd_sqrt;
    for (int s = 0; s < total; s++) {
        // warmup: s / W for all four
        double warm = (double)s / warmup;
        // the decays run from the end of the warmup (wsd: from step total - 4) to step total
        double p = (double)(s - warmup) / (total - warmup), q = (double)(s - (total - wsd_decay)) / wsd_decay;
        cosine.push_back(s < warmup ? warm : r + (1 - r) * 0.5 * (1 + cos(M_PI * p)));
        linear.push_back(s < warmup ? warm : r + (1 - r) * (1 - p));
        constant.push_back(s < warmup ? warm : 1.0);
        wsd.push_back(s < warmup ? warm : s < total - wsd_decay ? 1.0 : r + (1 - r) * (1 - q));
        wsd_sqrt.push_back(s < warmup ? warm : s < total - wsd_decay ? 1.0 : r + (1 - r) * (1 - sqrt(q)));
    }
    for (int s = 0; s < total; s++) {
        INFO("step " << s);
        CHECK(lr(s, LR_COSINE) == Approx(cosine[s]).epsilon(1e-7).margin(1e-12));
        CHECK(lr(s, LR_LINEAR) == Approx(linear[s]).epsilon(1e-7).margin(1e-12));
        CHECK(lr(s, LR_CONSTANT) == Approx(constant[s]).epsilon(1e-7).margin(1e-12));
        CHECK(lr(s, LR_WSD) == Approx(wsd[s]).epsilon(1e-7).margin(1e-12));
        CHECK(lr(s, LR_WSD_SQRT) == Approx(wsd_sqrt[s]).epsilon(1e-7).margin(1e-12));
        // the paper's cosine is the default; wsd whose decay fills everything after the warmup is linear
        CHECK(learning_rate(s, 1.0f, warmup, total, 0.1f) == lr(s, LR_COSINE));
        CHECK(learning_rate(s, 1.0f, warmup, total, 0.1f, LR_WSD, total - warmup) == lr(s, LR_LINEAR));
    }
    // the landmarks, by hand: step 0 has lr 0; the stable phase holds the peak exactly; the last
    // step sits one step of the decay above the floor
    CHECK(lr(0, LR_WSD) == 0.0f);
    CHECK(lr(1, LR_WSD) == 0.5f);
    for (int s = warmup; s <= total - wsd_decay; s++) CHECK(lr(s, LR_WSD) == 1.0f);
    CHECK(lr(total - 1, LR_WSD) == Approx(0.1 + 0.9 / 4).epsilon(1e-7));
    CHECK(lr(total - 1, LR_WSD_SQRT) == Approx(0.1 + 0.9 * (1 - sqrt(0.75))).epsilon(1e-7));   // below wsd's
    CHECK(lr(total - 3, LR_WSD_SQRT) == Approx(0.1 + 0.9 * 0.5).epsilon(1e-7));   // a quarter in: halfway down
    CHECK(lr(total - 1, LR_LINEAR) == Approx(0.1 + 0.9 / 8).epsilon(1e-7));
    CHECK(lr(6, LR_COSINE) == Approx(0.55).epsilon(1e-7));   // halfway through the cosine
}
