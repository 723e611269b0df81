/*
The attention kernels with bf16 storage (layers/attention.cuh, floatX = bf16), in the emulation
(g++ -DMIXLN_CUDA_EMULATION) and on a GPU (nvcc), like test_kernels.cu:
  - the simple attention against its CPU twin, both in bf16: they round at the same points
    (probabilities, then y from the stored probabilities, dqkv once per element), so they agree
    to the default check_close_bf16 tolerance;
  - the fused attention in bf16 against the fused attention in fp32 on the same values: the tiles
    are float either way, so bf16 adds only the roundings where out and dqkv are stored;
  - the fused attention in bf16 against the simple attention in bf16 (the CPU twin, and the
    simple kernels): the two round differently (the simple one rounds each probability before
    y = att v and uses the rounded ones in backward; the fused one never stores them), so the
    comparison allows, per element, a bound on what rounding the probabilities can change,
    computed from the data (attention_rounding_bounds);
  - the fused backward in bf16 is deterministic.
Shapes: T not a multiple of 32 (the simple kernels' warps) or 64 (the fused tiles), head sizes 8,
24, 64 and 128.
*/
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <vector>

#include "kernel_test_util.h"
#include "../layers/attention.cuh"

// (B, T, NH, hs)
static const int attention_bf16_shapes[][4] = {{1, 1, 1, 8},   {2, 9, 3, 8},   {2, 33, 2, 24},
                                               {1, 70, 2, 24}, {1, 130, 1, 64}, {1, 70, 1, 128}};
// Scores q . k / sqrt(hs) have std qkv_std^2: 1 gives flat softmax rows; 2 (scores up to ~15)
// gives peaked ones, where a probability that was computed from a score rounded to bf16 (off by
// up to 15 * 2^-8 = 0.06, so the probability by 6%) no longer fits in the tolerance.
static const float attention_bf16_qkv_stds[] = {1.0f, 2.0f};

// Part 0 (q), 1 (k) or 2 (v) of a (B, T, 3C) tensor, as (B, T, C)
template <typename X>
static std::vector<X> qkv_part(const std::vector<X>& qkv, int B, int T, int C, int part) {
    std::vector<X> out((size_t)B * T * C);
    for (size_t bt = 0; bt < (size_t)B * T; bt++)
        for (int c = 0; c < C; c++) out[bt * C + c] = qkv[bt * 3 * C + (size_t)part * C + c];
    return out;
}

static double max_abs(const std::vector<float>& v) {
    double m = 0;
    for (float x : v) m = std::max(m, (double)fabs(x));
    return m;
}

// lse (B, NH, T) = log(sum_{t2 <= t} exp(q . k[t2] / sqrt(hs))), in double from the values of qkv
static std::vector<float> attention_lse_double(const std::vector<float>& qkv, int B, int T, int NH, int hs) {
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

/*
How far the fused attention (F) may be from the simple one (S) in bf16, per element, before
either rounds its outputs. Both compute from the same bf16 inputs in float; they differ in the
probabilities: S uses P~ = round(P) (|P~ - P| <= d P, d = 2^-8 = BF16_STEP, the unit roundoff of
bf16's 8 significant bits), F the float P. And in D = sum_j P_j dP_j (dP_j = v_j . dy): S sums
P~_j dP_j, F takes dy . round(y) (attention_dsum_kernel reads out as stored). To first order in
d, per row t of a head:
    y:   |y_F - y_S|     <= d sum_j P_j |v_j|
    D:   |D_F - D_S|     <= d sum_i |dy_i y_i| + d sum_j P_j |dP_j|   =: eD
    dS:  dS = P (dP - D) (before the scale), so
         |dS_F - dS_S|   <= d P_j |dP_j - D| + P_j eD                  =: eS_j
    dq:  dq_t  = scale sum_j dS_tj k_j   ->  <= scale sum_j eS_tj |k_j|
    dk:  dk_j  = scale sum_t dS_tj q_t   ->  <= scale sum_t eS_tj |q_t|
    dv:  dv_j  = sum_t P_tj dy_t         ->  <= d sum_t P_tj |dy_t|
computed here in double from the stored probabilities of a simple run (att) and the inputs.
The second-order terms (d^2 = 1.5e-5 relative, P against P~) are covered by the factor 1.01 that
check_within_bounds applies. out_bound (B, T, C), dqkv_bound (B, T, 3C).
*/
static void attention_rounding_bounds(std::vector<double>& out_bound, std::vector<double>& dqkv_bound,
                                      const std::vector<float>& qkv, const std::vector<float>& dout,
                                      const std::vector<float>& att, int B, int T, int NH, int hs) {
    const double d = BF16_STEP;
    int C = NH * hs;
    double scale = 1 / sqrt((double)hs);
    out_bound.assign((size_t)B * T * C, 0.0);
    dqkv_bound.assign((size_t)B * T * 3 * C, 0.0);
    std::vector<double> y(hs), dP(T), eS(T);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++)
            for (int t = 0; t < T; t++) {
                const float* p = &att[(((size_t)b * NH + h) * T + t) * T];
                const float* dy = &dout[((size_t)b * T + t) * C + (size_t)h * hs];
                const float* q = &qkv[((size_t)b * T + t) * 3 * C + (size_t)h * hs];
                auto at = [&](int t2, int part) { return &qkv[((size_t)b * T + t2) * 3 * C + (size_t)part * C + (size_t)h * hs]; };
                auto bound_at = [&](int t2, int part) {
                    return &dqkv_bound[((size_t)b * T + t2) * 3 * C + (size_t)part * C + (size_t)h * hs];
                };
                // y, dP and D of the row; the bounds of y and of dv
                double D = 0, sum_p_dP = 0;
                std::fill(y.begin(), y.end(), 0.0);
                for (int t2 = 0; t2 <= t; t2++) {
                    const float* v = at(t2, 2);
                    dP[t2] = 0;
                    for (int i = 0; i < hs; i++) {
                        y[i] += p[t2] * (double)v[i];
                        dP[t2] += (double)v[i] * dy[i];
                        out_bound[((size_t)b * T + t) * C + (size_t)h * hs + i] += d * p[t2] * fabs(v[i]);
                        bound_at(t2, 2)[i] += d * p[t2] * fabs(dy[i]);
                    }
                    D += p[t2] * dP[t2];
                    sum_p_dP += p[t2] * fabs(dP[t2]);
                }
                double eD = d * sum_p_dP;
                for (int i = 0; i < hs; i++) eD += d * fabs(dy[i] * y[i]);
                // the bounds of dS, then of dq and dk
                for (int t2 = 0; t2 <= t; t2++) eS[t2] = d * p[t2] * fabs(dP[t2] - D) + p[t2] * eD;
                double* dq_bound = bound_at(t, 0);
                for (int t2 = 0; t2 <= t; t2++) {
                    const float* k = at(t2, 1);
                    double* dk_bound = bound_at(t2, 1);
                    for (int i = 0; i < hs; i++) {
                        dq_bound[i] += scale * eS[t2] * fabs(k[i]);
                        dk_bound[i] += scale * eS[t2] * fabs(q[i]);
                    }
                }
            }
}

// |a - b| <= 1.01 * bound + (2 d * 1.01 + 1e-5) * max|b| per element: the bound (first order,
// 1% for the second-order terms), each side's final rounding to bf16 (at most d of a value no
// larger than max|b|, to first order), and float arithmetic (check_close's default).
static void check_within_bounds(const std::vector<float>& a, const std::vector<float>& b,
                                const std::vector<double>& bound, const char* what) {
    REQUIRE(a.size() == b.size());
    REQUIRE(bound.size() == b.size());
    double scale = std::max(max_abs(b), 1e-30);
    double rounding = (2 * BF16_STEP * 1.01 + 1e-5) * scale;
    for (size_t i = 0; i < b.size(); i++) {
        double diff = fabs((double)a[i] - b[i]);
        if (!(diff <= 1.01 * bound[i] + rounding)) {   // also catches NaN
            INFO(what << ": element " << i << " of " << b.size() << ": " << a[i] << " against " << b[i] << ", bound "
                      << bound[i] << " + " << rounding);
            REQUIRE(diff <= 1.01 * bound[i] + rounding);
        }
    }
}

static const char* part_names[3] = {"dq", "dk", "dv"};

TEST_CASE("simple attention kernels in bf16 match the CPU twin in bf16", "[kernels][bf16]") {
    for (float qkv_std : attention_bf16_qkv_stds)
    for (auto& s : attention_bf16_shapes) {
        int B = s[0], T = s[1], NH = s[2], hs = s[3], C = NH * hs;
        INFO("B " << B << " T " << T << " NH " << NH << " hs " << hs << " qkv std " << qkv_std);
        auto qkv = random_bf16((size_t)B * T * 3 * C, 41, qkv_std), dout = random_bf16((size_t)B * T * C, 42),
             dqkv = random_bf16((size_t)B * T * 3 * C, 43);   // random: backward accumulates
        size_t att_size = (size_t)B * NH * T * T;
        std::vector<bf16> out_cpu((size_t)B * T * C), att_cpu(att_size), dqkv_cpu = dqkv;
        std::vector<real> scratch_cpu(att_size);
        attention_forward_cpu(out_cpu.data(), att_cpu.data(), qkv.data(), B, T, NH, hs);
        attention_backward_cpu(dqkv_cpu.data(), scratch_cpu.data(), dout.data(), qkv.data(), att_cpu.data(), B, T, NH, hs);
        DeviceArray<bf16> d_qkv(qkv), d_out((size_t)B * T * C), d_att(att_size), d_dout(dout), d_dqkv(dqkv);
        DeviceArray<float> d_scratch(att_size);
        attention_forward(d_out.ptr, d_att.ptr, d_qkv.ptr, B, T, NH, hs, 0);
        attention_backward(d_dqkv.ptr, d_scratch.ptr, d_dout.ptr, d_qkv.ptr, d_att.ptr, B, T, NH, hs, 0);
        check_close_bf16(d_out.to_host(), out_cpu, "attention out");
        check_close_bf16(d_att.to_host(), att_cpu, "attention probabilities (zeros above the diagonal included)");
        auto dqkv_gpu = d_dqkv.to_host();
        for (int part = 0; part < 3; part++)   // each against its own largest value
            check_close_bf16(qkv_part(dqkv_gpu, B, T, C, part), qkv_part(dqkv_cpu, B, T, C, part), part_names[part]);
    }
}

TEST_CASE("fused attention in bf16 matches the fused attention in fp32 on the same values", "[kernels][bf16]") {
    for (float qkv_std : attention_bf16_qkv_stds)
    for (auto& s : attention_bf16_shapes) {
        int B = s[0], T = s[1], NH = s[2], hs = s[3], C = NH * hs;
        INFO("B " << B << " T " << T << " NH " << NH << " hs " << hs << " qkv std " << qkv_std);
        auto qkv = random_bf16((size_t)B * T * 3 * C, 44, qkv_std), dout = random_bf16((size_t)B * T * C, 45),
             dqkv = random_bf16((size_t)B * T * 3 * C, 46);
        // bf16
        DeviceArray<bf16> d_qkv(qkv), d_out((size_t)B * T * C), d_dout(dout), d_dqkv(dqkv);
        DeviceArray<float> d_lse((size_t)B * NH * T), d_scratch((size_t)B * NH * T);
        attention_forward_fused(d_out.ptr, d_lse.ptr, d_qkv.ptr, B, T, NH, hs, 0);
        attention_backward_fused(d_dqkv.ptr, d_scratch.ptr, d_dout.ptr, d_qkv.ptr, d_out.ptr, d_lse.ptr, B, T, NH, hs, 0);
        auto out_bf16 = d_out.to_host();
        // fp32 on the same values; its backward reads the bf16 run's out (as stored, rounded: what
        // D is computed from in bf16) and lse, so the only differences left are the final roundings
        DeviceArray<float> f_qkv(to_floats(qkv)), f_out((size_t)B * T * C), f_lse((size_t)B * NH * T),
            f_dout(to_floats(dout)), f_dqkv(to_floats(dqkv)), f_scratch((size_t)B * NH * T),
            f_out_bf16(to_floats(out_bf16));
        attention_forward_fused(f_out.ptr, f_lse.ptr, f_qkv.ptr, B, T, NH, hs, 0);
        attention_backward_fused(f_dqkv.ptr, f_scratch.ptr, f_dout.ptr, f_qkv.ptr, f_out_bf16.ptr, d_lse.ptr, B, T, NH, hs,
                                 0);
        check_close_bf16(out_bf16, to_bf16(f_out.to_host()), "fused attention out");
        check_close(d_lse.to_host(), f_lse.to_host(), "fused attention lse");   // float from the same values
        auto dqkv_bf16 = d_dqkv.to_host();
        auto dqkv_fp32 = to_bf16(f_dqkv.to_host());
        for (int part = 0; part < 3; part++)
            check_close_bf16(qkv_part(dqkv_bf16, B, T, C, part), qkv_part(dqkv_fp32, B, T, C, part), part_names[part]);
    }
}

TEST_CASE("fused attention in bf16 matches the simple attention in bf16 within the rounding of att",
          "[kernels][bf16]") {
    for (float qkv_std : attention_bf16_qkv_stds)
    for (auto& s : attention_bf16_shapes) {
        int B = s[0], T = s[1], NH = s[2], hs = s[3], C = NH * hs;
        INFO("B " << B << " T " << T << " NH " << NH << " hs " << hs << " qkv std " << qkv_std);
        auto qkv = random_bf16((size_t)B * T * 3 * C, 47, qkv_std), dout = random_bf16((size_t)B * T * C, 48),
             dqkv = random_bf16((size_t)B * T * 3 * C, 49);
        size_t att_size = (size_t)B * NH * T * T;
        // the CPU twin (simple)
        std::vector<bf16> out_cpu((size_t)B * T * C), att_cpu(att_size), dqkv_cpu = dqkv;
        std::vector<real> scratch_cpu(att_size);
        attention_forward_cpu(out_cpu.data(), att_cpu.data(), qkv.data(), B, T, NH, hs);
        attention_backward_cpu(dqkv_cpu.data(), scratch_cpu.data(), dout.data(), qkv.data(), att_cpu.data(), B, T, NH, hs);
        // the simple kernels
        DeviceArray<bf16> d_qkv(qkv), d_out((size_t)B * T * C), d_att(att_size), d_dout(dout), d_dqkv(dqkv);
        DeviceArray<float> d_scratch(att_size);
        attention_forward(d_out.ptr, d_att.ptr, d_qkv.ptr, B, T, NH, hs, 0);
        attention_backward(d_dqkv.ptr, d_scratch.ptr, d_dout.ptr, d_qkv.ptr, d_att.ptr, B, T, NH, hs, 0);
        // the fused kernels
        DeviceArray<bf16> f_out((size_t)B * T * C), f_dqkv(dqkv);
        DeviceArray<float> f_lse((size_t)B * NH * T), f_scratch((size_t)B * NH * T);
        attention_forward_fused(f_out.ptr, f_lse.ptr, d_qkv.ptr, B, T, NH, hs, 0);
        attention_backward_fused(f_dqkv.ptr, f_scratch.ptr, d_dout.ptr, d_qkv.ptr, f_out.ptr, f_lse.ptr, B, T, NH, hs, 0);
        auto fused_out = to_floats(f_out.to_host()), fused_dqkv = to_floats(f_dqkv.to_host());
        auto qkv_f = to_floats(qkv), dout_f = to_floats(dout);
        check_close(f_lse.to_host(), attention_lse_double(qkv_f, B, T, NH, hs), "fused attention lse");
        // against each simple version, with the bounds from that version's probabilities
        struct Simple {
            const char* name;
            std::vector<float> out, att, dqkv;
        } simples[] = {{"CPU twin", to_floats(out_cpu), to_floats(att_cpu), to_floats(dqkv_cpu)},
                       {"simple kernels", to_floats(d_out.to_host()), to_floats(d_att.to_host()),
                        to_floats(d_dqkv.to_host())}};
        for (auto& simple : simples) {
            INFO("fused against the " << simple.name);
            std::vector<double> out_bound, dqkv_bound;
            attention_rounding_bounds(out_bound, dqkv_bound, qkv_f, dout_f, simple.att, B, T, NH, hs);
            check_within_bounds(fused_out, simple.out, out_bound, "out");
            for (int part = 0; part < 3; part++)
                check_within_bounds(qkv_part(fused_dqkv, B, T, C, part), qkv_part(simple.dqkv, B, T, C, part),
                                    qkv_part(dqkv_bound, B, T, C, part), part_names[part]);
        }
    }
}

TEST_CASE("fused attention backward in bf16 is deterministic", "[kernels][bf16]") {
    int B = 2, T = 130, NH = 2, hs = 24, C = NH * hs;   // three query and key tiles, partial channel groups
    auto qkv = random_bf16((size_t)B * T * 3 * C, 50), dout = random_bf16((size_t)B * T * C, 51),
         dqkv = random_bf16((size_t)B * T * 3 * C, 52);
    DeviceArray<bf16> d_qkv(qkv), d_out((size_t)B * T * C), d_dout(dout), d_dqkv_first(dqkv), d_dqkv_second(dqkv);
    DeviceArray<float> d_lse((size_t)B * NH * T), d_scratch((size_t)B * NH * T);
    attention_forward_fused(d_out.ptr, d_lse.ptr, d_qkv.ptr, B, T, NH, hs, 0);
    attention_backward_fused(d_dqkv_first.ptr, d_scratch.ptr, d_dout.ptr, d_qkv.ptr, d_out.ptr, d_lse.ptr, B, T, NH, hs, 0);
    attention_backward_fused(d_dqkv_second.ptr, d_scratch.ptr, d_dout.ptr, d_qkv.ptr, d_out.ptr, d_lse.ptr, B, T, NH, hs,
                             0);
    auto first = d_dqkv_first.to_host(), second = d_dqkv_second.to_host();
    REQUIRE(first.size() == second.size());
    CHECK(memcmp(first.data(), second.data(), first.size() * sizeof(bf16)) == 0);   // bitwise
}
