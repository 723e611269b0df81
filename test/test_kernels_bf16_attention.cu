/*
The attention kernels with bf16 storage (layers/attention.cuh, floatX = bf16), in the emulation
(g++ -DMIXLN_CUDA_EMULATION) and on a GPU (nvcc), like test_kernels.cu:
  - the simple attention against its CPU twin, both in bf16: they round at the same points (y
    once from the float probabilities, dqkv once per element; att is float), so out and dqkv agree
    to the default check_close_bf16 tolerance and att, float from the same bf16 inputs, to
    check_close's fp32 one;
  - the fused attention's CUDA-core kernels (attention_*_fused_cuda_cores; in bf16 the model uses
    them for head sizes that are not a multiple of 16) in bf16 against the same kernels in fp32
    on the same values: the tiles
    are float either way, so bf16 adds only the roundings where out and dqkv are stored;
  - the fused attention in bf16 against the simple attention in bf16 (the CPU twin, and the
    simple kernels): they round at the same points, so out and dv agree to the default tolerance;
    dq and dk also differ through D (the fused backward takes it from y as stored), which the
    comparison allows per element with a bound computed from the data (attention_dsum_bounds);
  - both attentions' backward in bf16 are deterministic;
  - the mma.sync and ldmatrix fragment layouts the tensor-core kernels rely on, alone, with exact
    integer products;
  - the tensor-core attention (what the fused attention runs in bf16 for head sizes a multiple of
    16) against its CPU twins, without and with RoPE applied inside: see the comment above its
    tests; with RoPE, bit for bit against RoPE's own kernels around it;
  - the fused attention as the model calls it (RoPE's tables passed in) on each of its paths.
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


/*
How far the fused attention (F) may be from the simple one (S) in bf16 in dq and dk, beyond the
final roundings. Both compute from the same bf16 inputs in float and use float probabilities P;
they differ in D = sum_j P_j dP_j (dP_j = v_j . dy): S sums it in float, which is dy . y with y
before its rounding, while F takes dy . round(y) (attention_dsum_kernel reads out as stored). Per
row t of a head, with y_F the fused out as stored and y computed here in double from P and v:
    D:   D_F - D_S = dy . (y_F - y)                                     =: eD_t
    dS:  dS_tj = P_tj (dP_tj - D_t) (before the scale) is linear in D: it moves by -P_tj eD_t
    dq:  dq_t = scale sum_j dS_tj k_j   moves by  -scale eD_t sum_j P_tj k_j
    dk:  dk_j = scale sum_t dS_tj q_t   moves by  -scale sum_t P_tj eD_t q_t
    dv:  no D in it
exactly (D enters linearly), up to float arithmetic on either side, which check_within_bounds's
1e-5 term and 1% cover. The bound of an element is the absolute value of its move. The move is
not negligible against a bf16 step: on the shapes here it reaches 1e-3 to 5.6e-3 of the largest
dq or dk (the default tolerance is 7.8e-3), so the default tolerance alone would have no room
left for the final roundings. dqkv_bound (B, T, 3C), att the simple run's probabilities,
fused_out (B, T, C).
*/
static void attention_dsum_bounds(std::vector<double>& dqkv_bound, const std::vector<float>& qkv,
                                  const std::vector<float>& dout, const std::vector<float>& att,
                                  const std::vector<float>& fused_out, int B, int T, int NH, int hs) {
    int C = NH * hs;
    double scale = 1 / sqrt((double)hs);
    std::vector<double> move((size_t)B * T * 3 * C, 0.0);   // signed, summed before the absolute value
    std::vector<double> y(hs);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++)
            for (int t = 0; t < T; t++) {
                const float* p = &att[(((size_t)b * NH + h) * T + t) * T];
                const float* dy = &dout[((size_t)b * T + t) * C + (size_t)h * hs];
                const float* y_fused = &fused_out[((size_t)b * T + t) * C + (size_t)h * hs];
                const float* q = &qkv[((size_t)b * T + t) * 3 * C + (size_t)h * hs];
                auto at = [&](int t2, int part) { return &qkv[((size_t)b * T + t2) * 3 * C + (size_t)part * C + (size_t)h * hs]; };
                auto move_at = [&](int t2, int part) {
                    return &move[((size_t)b * T + t2) * 3 * C + (size_t)part * C + (size_t)h * hs];
                };
                // y of the row before rounding, then eD = dy . (y_F - y)
                std::fill(y.begin(), y.end(), 0.0);
                for (int t2 = 0; t2 <= t; t2++)
                    for (int i = 0; i < hs; i++) y[i] += p[t2] * (double)at(t2, 2)[i];
                double eD = 0;
                for (int i = 0; i < hs; i++) eD += dy[i] * (y_fused[i] - y[i]);
                // the moves of dq and dk
                double* dq_move = move_at(t, 0);
                for (int t2 = 0; t2 <= t; t2++) {
                    const float* k = at(t2, 1);
                    double* dk_move = move_at(t2, 1);
                    for (int i = 0; i < hs; i++) {
                        dq_move[i] -= scale * p[t2] * eD * k[i];
                        dk_move[i] -= scale * p[t2] * eD * q[i];
                    }
                }
            }
    dqkv_bound.resize(move.size());
    for (size_t i = 0; i < move.size(); i++) dqkv_bound[i] = fabs(move[i]);
}

// |a - b| <= 1.01 * bound + (2 d * 1.01 + 1e-5) * max|b| per element: the bound (1% for float
// arithmetic in it), each side's final rounding to bf16 (at most d of a value no larger than
// max|b|, to first order: the default check_close_bf16 tolerance 2 d, plus 1%), and float
// arithmetic (check_close's default).
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
             dqkv = std::vector<bf16>((size_t)B * T * 3 * C, __float2bfloat16_rn(NAN));   // NaN: backward writes it, never reads it
        size_t att_size = (size_t)B * NH * T * T;
        std::vector<bf16> out_cpu((size_t)B * T * C), dqkv_cpu = dqkv;
        std::vector<real> att_cpu(att_size), scratch_cpu(att_size);
        attention_forward_cpu(out_cpu.data(), att_cpu.data(), qkv.data(), B, T, NH, hs);
        attention_backward_cpu(dqkv_cpu.data(), scratch_cpu.data(), dout.data(), qkv.data(), att_cpu.data(), B, T, NH, hs);
        DeviceArray<bf16> d_qkv(qkv), d_out((size_t)B * T * C), d_dout(dout), d_dqkv(dqkv);
        DeviceArray<float> d_att(att_size), d_scratch(att_size);
        attention_forward(d_out.ptr, d_att.ptr, d_qkv.ptr, B, T, NH, hs, 0);
        attention_backward(d_dqkv.ptr, d_scratch.ptr, d_dout.ptr, d_qkv.ptr, d_att.ptr, B, T, NH, hs, 0);
        check_close_bf16(d_out.to_host(), out_cpu, "attention out");
        // float from the same bf16 inputs on both sides: the fp32 tolerance
        check_close(d_att.to_host(), att_cpu, "attention probabilities (zeros above the diagonal included)");
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
             dqkv = std::vector<bf16>((size_t)B * T * 3 * C, __float2bfloat16_rn(NAN));   // NaN: backward writes it, never reads it
        // bf16
        DeviceArray<bf16> d_qkv(qkv), d_out((size_t)B * T * C), d_dout(dout), d_dqkv(dqkv);
        DeviceArray<float> d_lse((size_t)B * NH * T), d_scratch((size_t)B * NH * T);
        attention_forward_fused_cuda_cores(d_out.ptr, d_lse.ptr, d_qkv.ptr, B, T, NH, hs, 0);
        attention_backward_fused_cuda_cores(d_dqkv.ptr, d_scratch.ptr, d_dout.ptr, d_qkv.ptr, d_out.ptr, d_lse.ptr, B, T, NH, hs, 0);
        auto out_bf16 = d_out.to_host();
        // fp32 on the same values; its backward reads the bf16 run's out (as stored, rounded: what
        // D is computed from in bf16) and lse, so the only differences left are the final roundings
        DeviceArray<float> f_qkv(to_floats(qkv)), f_out((size_t)B * T * C), f_lse((size_t)B * NH * T),
            f_dout(to_floats(dout)), f_dqkv(to_floats(dqkv)), f_scratch((size_t)B * NH * T),
            f_out_bf16(to_floats(out_bf16));
        attention_forward_fused(f_out.ptr, f_lse.ptr, f_qkv.ptr, nullptr, nullptr, B, T, NH, hs, 0);
        attention_backward_fused(f_dqkv.ptr, f_scratch.ptr, f_dout.ptr, f_qkv.ptr, f_out_bf16.ptr, d_lse.ptr, nullptr,
                                 nullptr, B, T, NH, hs, 0);
        check_close_bf16(out_bf16, to_bf16(f_out.to_host()), "fused attention out");
        check_close(d_lse.to_host(), f_lse.to_host(), "fused attention lse");   // float from the same values
        auto dqkv_bf16 = d_dqkv.to_host();
        auto dqkv_fp32 = to_bf16(f_dqkv.to_host());
        for (int part = 0; part < 3; part++)
            check_close_bf16(qkv_part(dqkv_bf16, B, T, C, part), qkv_part(dqkv_fp32, B, T, C, part), part_names[part]);
    }
}

TEST_CASE("fused attention in bf16 matches the simple attention in bf16", "[kernels][bf16]") {
    for (float qkv_std : attention_bf16_qkv_stds)
    for (auto& s : attention_bf16_shapes) {
        int B = s[0], T = s[1], NH = s[2], hs = s[3], C = NH * hs;
        INFO("B " << B << " T " << T << " NH " << NH << " hs " << hs << " qkv std " << qkv_std);
        auto qkv = random_bf16((size_t)B * T * 3 * C, 47, qkv_std), dout = random_bf16((size_t)B * T * C, 48),
             dqkv = std::vector<bf16>((size_t)B * T * 3 * C, __float2bfloat16_rn(NAN));   // NaN: backward writes it, never reads it
        size_t att_size = (size_t)B * NH * T * T;
        // the CPU twin (simple)
        std::vector<bf16> out_cpu((size_t)B * T * C), dqkv_cpu = dqkv;
        std::vector<real> att_cpu(att_size), scratch_cpu(att_size);
        attention_forward_cpu(out_cpu.data(), att_cpu.data(), qkv.data(), B, T, NH, hs);
        attention_backward_cpu(dqkv_cpu.data(), scratch_cpu.data(), dout.data(), qkv.data(), att_cpu.data(), B, T, NH, hs);
        // the simple kernels
        DeviceArray<bf16> d_qkv(qkv), d_out((size_t)B * T * C), d_dout(dout), d_dqkv(dqkv);
        DeviceArray<float> d_att(att_size), d_scratch(att_size);
        attention_forward(d_out.ptr, d_att.ptr, d_qkv.ptr, B, T, NH, hs, 0);
        attention_backward(d_dqkv.ptr, d_scratch.ptr, d_dout.ptr, d_qkv.ptr, d_att.ptr, B, T, NH, hs, 0);
        // the fused kernels
        DeviceArray<bf16> f_out((size_t)B * T * C), f_dqkv(dqkv);
        DeviceArray<float> f_lse((size_t)B * NH * T), f_scratch((size_t)B * NH * T);
        attention_forward_fused_cuda_cores(f_out.ptr, f_lse.ptr, d_qkv.ptr, B, T, NH, hs, 0);
        attention_backward_fused_cuda_cores(f_dqkv.ptr, f_scratch.ptr, d_dout.ptr, d_qkv.ptr, f_out.ptr, f_lse.ptr, B, T, NH, hs, 0);
        auto fused_out = f_out.to_host();
        auto fused_dqkv = f_dqkv.to_host();
        auto fused_dqkv_f = to_floats(fused_dqkv);
        auto qkv_f = to_floats(qkv), dout_f = to_floats(dout);
        check_close(f_lse.to_host(), attention_lse_reference(qkv_f, B, T, NH, hs), "fused attention lse");
        // against each simple version
        struct Simple {
            const char* name;
            std::vector<bf16> out, dqkv;
            std::vector<float> att;
        } simples[] = {{"CPU twin", out_cpu, dqkv_cpu, std::vector<float>(att_cpu.begin(), att_cpu.end())},
                       {"simple kernels", d_out.to_host(), d_dqkv.to_host(), d_att.to_host()}};
        for (auto& simple : simples) {
            INFO("fused against the " << simple.name);
            // y from the same float probabilities (to float rounding), rounded once on each side
            check_close_bf16(fused_out, simple.out, "out");
            // dv = att^T dy has no D in it: the default tolerance as well
            check_close_bf16(qkv_part(fused_dqkv, B, T, C, 2), qkv_part(simple.dqkv, B, T, C, 2), "dv");
            // dq and dk: the default tolerance plus what D's rounding moves them by
            std::vector<double> dqkv_bound;
            attention_dsum_bounds(dqkv_bound, qkv_f, dout_f, simple.att, to_floats(fused_out), B, T, NH, hs);
            auto simple_dqkv = to_floats(simple.dqkv);
            for (int part = 0; part < 2; part++)
                check_within_bounds(qkv_part(fused_dqkv_f, B, T, C, part), qkv_part(simple_dqkv, B, T, C, part),
                                    qkv_part(dqkv_bound, B, T, C, part), part_names[part]);
        }
    }
}

TEST_CASE("simple attention in bf16 is deterministic", "[kernels][bf16]") {
    int B = 2, T = 70, NH = 2, hs = 24, C = NH * hs;   // T past two warps of keys
    auto qkv = random_bf16((size_t)B * T * 3 * C, 53), dout = random_bf16((size_t)B * T * C, 54),
         dqkv = std::vector<bf16>((size_t)B * T * 3 * C, __float2bfloat16_rn(NAN));   // NaN: backward writes it, never reads it
    size_t att_size = (size_t)B * NH * T * T;
    DeviceArray<bf16> d_qkv(qkv), d_out_first((size_t)B * T * C), d_out_second((size_t)B * T * C), d_dout(dout),
        d_dqkv_first(dqkv), d_dqkv_second(dqkv);
    DeviceArray<float> d_att_first(att_size), d_att_second(att_size), d_scratch(att_size);
    attention_forward(d_out_first.ptr, d_att_first.ptr, d_qkv.ptr, B, T, NH, hs, 0);
    attention_forward(d_out_second.ptr, d_att_second.ptr, d_qkv.ptr, B, T, NH, hs, 0);
    attention_backward(d_dqkv_first.ptr, d_scratch.ptr, d_dout.ptr, d_qkv.ptr, d_att_first.ptr, B, T, NH, hs, 0);
    attention_backward(d_dqkv_second.ptr, d_scratch.ptr, d_dout.ptr, d_qkv.ptr, d_att_first.ptr, B, T, NH, hs, 0);
    auto out_first = d_out_first.to_host(), out_second = d_out_second.to_host();
    auto att_first = d_att_first.to_host(), att_second = d_att_second.to_host();
    auto first = d_dqkv_first.to_host(), second = d_dqkv_second.to_host();
    REQUIRE(first.size() == second.size());
    CHECK(memcmp(out_first.data(), out_second.data(), out_first.size() * sizeof(bf16)) == 0);   // bitwise
    CHECK(memcmp(att_first.data(), att_second.data(), att_first.size() * sizeof(float)) == 0);
    CHECK(memcmp(first.data(), second.data(), first.size() * sizeof(bf16)) == 0);
}

TEST_CASE("fused attention backward in bf16 is deterministic", "[kernels][bf16]") {
    int B = 2, T = 130, NH = 2, hs = 24, C = NH * hs;   // three query and key tiles, partial channel groups
    auto qkv = random_bf16((size_t)B * T * 3 * C, 50), dout = random_bf16((size_t)B * T * C, 51),
         dqkv = std::vector<bf16>((size_t)B * T * 3 * C, __float2bfloat16_rn(NAN));   // NaN: backward writes it, never reads it
    DeviceArray<bf16> d_qkv(qkv), d_out((size_t)B * T * C), d_dout(dout), d_dqkv_first(dqkv), d_dqkv_second(dqkv);
    DeviceArray<float> d_lse((size_t)B * NH * T), d_scratch((size_t)B * NH * T);
    attention_forward_fused_cuda_cores(d_out.ptr, d_lse.ptr, d_qkv.ptr, B, T, NH, hs, 0);
    attention_backward_fused_cuda_cores(d_dqkv_first.ptr, d_scratch.ptr, d_dout.ptr, d_qkv.ptr, d_out.ptr, d_lse.ptr, B, T, NH, hs, 0);
    attention_backward_fused_cuda_cores(d_dqkv_second.ptr, d_scratch.ptr, d_dout.ptr, d_qkv.ptr, d_out.ptr, d_lse.ptr, B, T, NH, hs,
                             0);
    auto first = d_dqkv_first.to_host(), second = d_dqkv_second.to_host();
    REQUIRE(first.size() == second.size());
    CHECK(memcmp(first.data(), second.data(), first.size() * sizeof(bf16)) == 0);   // bitwise
}

/*
The tensor-core attention (bf16, head sizes a multiple of 16): against its CPU twins, which round
where the kernels round (P before P v and P^T dout, dS before the dq and dk products). What is
left between them is float summation order: the scores and dP come from the tensor cores' sums
and the twin's sums in channel order. Those differ by a few float ulps, which is enough to move
an occasional P or dS to the other side of a bf16 rounding boundary: one bf16 step of that
element. For out, dq, dk and dv such a flip is a step of one term of a sum, well inside the
default tolerance (2 steps of the largest value). For lse = m + log(l), a flipped P (at most 1,
so its step is at most 2^-8) moves l (at least 1: the row's maximum contributes exp(0) = 1) by at
most 2^-8 and lse by at most that: the check allows two flips in a row, 2^-7 absolute.
Shapes: T not a multiple of 64 (partial tiles, keys and queries past T masked), T = 1, several
heads and batches, head sizes 16, 32, 64 and 128; one shape reads qkv from a pointer that is only
2-byte aligned (the tile loader's element-by-element path; without RoPE, which the kernels apply
to 16-byte aligned buffers only).
*/
/*
The fragment layouts themselves, alone: the tensor-core kernels rely on the layouts that
mma_bf16_16x8x16 and ldmatrix_x4 document (cuda_common.h) and the emulation implements. One warp
stages three 16x16 bf16 matrices in shared memory with the tiles' padded row stride, loads them
with the attention's own operand loads (ldmatrix: A, B stored along n, and B2 stored along k
through .trans), adds A B to an accumulator C loaded in D's layout, then feeds the rounded result
back as the A operand of a second product with B2, as the attention does with P and dS. The
inputs are small integers, so every product, sum and rounding is exact and the results must equal
the CPU's bit for bit whatever the hardware's summation order: on a GPU, a wrong layout fails
here, by element, before it shows up as a mismatch somewhere in the attention.
*/
constexpr int MMA_TEST_STRIDE = 24;   // bf16 per staged row: 16 + 8, as attention_tc_stride pads
// d (16x16) = a b + c, then e (16x16) = round_bf16(d) b2; a row-major, bn holds B(k, n) at
// [n * 16 + k], b2 holds B2(k, n) at [k * 16 + n], c, d and e row-major
static __global__ void mma_fragment_kernel(float* d, float* e, const bf16* a, const bf16* bn, const bf16* b2,
                                           const float* c) {
    DYNAMIC_SHARED(bf16, shared);
    bf16* a_tile = shared;                              // (16, MMA_TEST_STRIDE), rows along m
    bf16* bn_tile = a_tile + 16 * MMA_TEST_STRIDE;      // rows along n
    bf16* b2_tile = bn_tile + 16 * MMA_TEST_STRIDE;     // rows along k
    int lane = threadIdx.x, g = lane / 4, t = lane % 4;
    for (int i = lane; i < 256; i += 32) {
        a_tile[i / 16 * MMA_TEST_STRIDE + i % 16] = a[i];
        bn_tile[i / 16 * MMA_TEST_STRIDE + i % 16] = bn[i];
        b2_tile[i / 16 * MMA_TEST_STRIDE + i % 16] = b2[i];
    }
    __syncthreads();
    float acc[2][4];
    for (int n = 0; n < 2; n++)
        for (int half = 0; half < 2; half++) {
            // accumulator n: D(g + 8 half, 8n + 2t .. 8n + 2t + 1) in acc[n][2 half], acc[n][2 half + 1]
            acc[n][2 * half] = c[(g + 8 * half) * 16 + 8 * n + 2 * t];
            acc[n][2 * half + 1] = c[(g + 8 * half) * 16 + 8 * n + 2 * t + 1];
        }
    uint32_t a_fragment[4], b_fragments[2][2];
    attention_tc_load_a(a_fragment, a_tile, MMA_TEST_STRIDE, 0, 0, lane);
    attention_tc_load_b_pair(b_fragments, bn_tile, MMA_TEST_STRIDE, 0, 0, lane);
    for (int n = 0; n < 2; n++) mma_bf16_16x8x16(acc[n], a_fragment, b_fragments[n]);
    for (int n = 0; n < 2; n++)
        for (int half = 0; half < 2; half++) {
            d[(g + 8 * half) * 16 + 8 * n + 2 * t] = acc[n][2 * half];
            d[(g + 8 * half) * 16 + 8 * n + 2 * t + 1] = acc[n][2 * half + 1];
        }
    // the result as the next A operand, as the attention feeds P and dS
    uint32_t chained[4];
    attention_tc_to_a(chained, acc[0], acc[1]);
    float second[2][4] = {};
    attention_tc_load_b_pair_trans(b_fragments, b2_tile, MMA_TEST_STRIDE, 0, 0, lane);
    for (int n = 0; n < 2; n++) mma_bf16_16x8x16(second[n], chained, b_fragments[n]);
    for (int n = 0; n < 2; n++)
        for (int half = 0; half < 2; half++) {
            e[(g + 8 * half) * 16 + 8 * n + 2 * t] = second[n][2 * half];
            e[(g + 8 * half) * 16 + 8 * n + 2 * t + 1] = second[n][2 * half + 1];
        }
}

TEST_CASE("mma.sync and ldmatrix fragments: the attention's operand loads give exact products",
          "[kernels][bf16][tensor-core][mma]") {
    // integers in [-3, 3]: |A B + C| <= 16 * 9 + 20 = 164, exact in bf16 (integers to 256); the
    // second product's sums stay below 2^24, exact in float
    auto small_integers = [](size_t n, uint64_t seed, int range) {
        std::vector<float> v(n);
        uint64_t state = seed;
        for (float& x : v) {
            state = state * 6364136223846793005ull + 1442695040888963407ull;
            x = (float)((int)((state >> 33) % (2 * range + 1)) - range);
        }
        return v;
    };
    std::vector<float> a = small_integers(256, 1, 3), b = small_integers(256, 2, 3), b2 = small_integers(256, 3, 3),
                       c = small_integers(256, 4, 20);
    // B stored along n (as k tiles hold K for S = Q K^T), B2 along k (as v tiles hold V for P V)
    std::vector<float> bn(256);
    for (int k = 0; k < 16; k++)
        for (int n = 0; n < 16; n++) bn[n * 16 + k] = b[k * 16 + n];
    std::vector<float> d_expected(256), e_expected(256, 0.0f);
    for (int i = 0; i < 16; i++)
        for (int n = 0; n < 16; n++) {
            float sum = c[i * 16 + n];
            for (int k = 0; k < 16; k++) sum += a[i * 16 + k] * b[k * 16 + n];
            d_expected[i * 16 + n] = sum;
        }
    for (int i = 0; i < 16; i++)
        for (int n = 0; n < 16; n++)
            for (int k = 0; k < 16; k++) e_expected[i * 16 + n] += d_expected[i * 16 + k] * b2[k * 16 + n];
    DeviceArray<bf16> d_a(to_bf16(a)), d_bn(to_bf16(bn)), d_b2(to_bf16(b2));
    DeviceArray<float> d_c(c), d_d(256), d_e(256);
    LAUNCH(mma_fragment_kernel, dim3(1), dim3(32), 3 * 16 * MMA_TEST_STRIDE * sizeof(bf16), (cudaStream_t)0, d_d.ptr,
           d_e.ptr, d_a.ptr, d_bn.ptr, d_b2.ptr, d_c.ptr);
    auto d = d_d.to_host(), e = d_e.to_host();
    for (int i = 0; i < 256; i++) {
        INFO("D(" << i / 16 << ", " << i % 16 << ")");
        REQUIRE(d[i] == d_expected[i]);
    }
    for (int i = 0; i < 256; i++) {
        INFO("E(" << i / 16 << ", " << i % 16 << ")");
        REQUIRE(e[i] == e_expected[i]);
    }
}

// (B, T, NH, hs, offset of qkv in elements)
static const int attention_tensor_core_shapes[][5] = {{1, 1, 1, 16, 0},  {2, 9, 3, 16, 0},  {2, 33, 2, 32, 0},
                                                      {1, 70, 2, 64, 0}, {1, 130, 1, 64, 0}, {1, 70, 1, 128, 0},
                                                      {1, 67, 2, 32, 1}};

static void check_lse_close(const std::vector<float>& gpu, const std::vector<float>& cpu) {
    REQUIRE(gpu.size() == cpu.size());
    for (size_t i = 0; i < cpu.size(); i++) {
        double diff = fabs((double)gpu[i] - cpu[i]);
        if (!(diff <= 2 * BF16_STEP)) {
            INFO("lse element " << i << ": " << gpu[i] << " against " << cpu[i]);
            REQUIRE(diff <= 2 * BF16_STEP);
        }
    }
}

// RoPE's tables (T, hs/2), as the model makes them
static std::vector<float> rope_table(int T, int hs, bool sines) {
    std::vector<float> cos_table((size_t)T * hs / 2), sin_table((size_t)T * hs / 2);
    rope_tables_cpu(cos_table.data(), sin_table.data(), T, hs, 10000.0f);
    return sines ? sin_table : cos_table;
}

static bool same_bits(const std::vector<bf16>& a, const std::vector<bf16>& b) {
    return a.size() == b.size() && memcmp(a.data(), b.data(), a.size() * sizeof(bf16)) == 0;
}
static bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

TEST_CASE("tensor-core attention matches its CPU twin", "[kernels][bf16][tensor-core]") {
    for (bool rope : {false, true})
    for (float qkv_std : attention_bf16_qkv_stds)
    for (auto& s : attention_tensor_core_shapes) {
        int B = s[0], T = s[1], NH = s[2], hs = s[3], offset = s[4], C = NH * hs;
        if (rope && offset % 8 != 0) continue;   // the kernels apply RoPE to 16-byte aligned buffers only
        INFO("B " << B << " T " << T << " NH " << NH << " hs " << hs << " qkv offset " << offset << " qkv std "
                  << qkv_std << (rope ? ", RoPE applied by the attention" : ", q and k rotated already"));
        REQUIRE(attention_tensor_core_supports(hs));
        auto qkv = random_bf16((size_t)B * T * 3 * C, 56, qkv_std), dout = random_bf16((size_t)B * T * C, 57),
             dqkv = std::vector<bf16>((size_t)B * T * 3 * C, __float2bfloat16_rn(NAN));   // NaN: backward writes it, never reads it
        std::vector<float> cos_table = rope_table(T, hs, false), sin_table = rope_table(T, hs, true);
        DeviceArray<float> d_cos(cos_table), d_sin(sin_table);
        const float* cos_cpu = rope ? cos_table.data() : nullptr;
        const float* sin_cpu = rope ? sin_table.data() : nullptr;
        const float* cos_gpu = rope ? d_cos.ptr : nullptr;
        const float* sin_gpu = rope ? d_sin.ptr : nullptr;
        // the CPU twins
        std::vector<bf16> out_cpu((size_t)B * T * C), dqkv_cpu = dqkv;
        std::vector<float> lse_cpu((size_t)B * NH * T);
        attention_forward_tensor_core_cpu(out_cpu.data(), lse_cpu.data(), qkv.data(), cos_cpu, sin_cpu, B, T, NH, hs);
        attention_backward_tensor_core_cpu(dqkv_cpu.data(), dout.data(), qkv.data(), out_cpu.data(), lse_cpu.data(),
                                           cos_cpu, sin_cpu, B, T, NH, hs);
        // the kernels, qkv and dqkv at `offset` elements into their buffers
        std::vector<bf16> qkv_padded(offset, bf16(0.0f)), dqkv_padded(offset, bf16(0.0f));
        qkv_padded.insert(qkv_padded.end(), qkv.begin(), qkv.end());
        dqkv_padded.insert(dqkv_padded.end(), dqkv.begin(), dqkv.end());
        DeviceArray<bf16> d_qkv(qkv_padded), d_out((size_t)B * T * C), d_dout(dout), d_dqkv(dqkv_padded);
        DeviceArray<float> d_lse((size_t)B * NH * T), d_scratch((size_t)B * NH * T);
        attention_forward_tensor_core(d_out.ptr, d_lse.ptr, d_qkv.ptr + offset, cos_gpu, sin_gpu, B, T, NH, hs, 0);
        attention_backward_tensor_core(d_dqkv.ptr + offset, d_scratch.ptr, d_dout.ptr, d_qkv.ptr + offset, d_out.ptr,
                                       d_lse.ptr, cos_gpu, sin_gpu, B, T, NH, hs, 0);
        check_close_bf16(d_out.to_host(), out_cpu, "tensor-core attention out");
        check_lse_close(d_lse.to_host(), lse_cpu);
        auto dqkv_gpu = d_dqkv.to_host();
        dqkv_gpu.erase(dqkv_gpu.begin(), dqkv_gpu.begin() + offset);
        for (int part = 0; part < 3; part++)
            check_close_bf16(qkv_part(dqkv_gpu, B, T, C, part), qkv_part(dqkv_cpu, B, T, C, part), part_names[part]);
        CHECK(same_bits(d_qkv.to_host(), qkv_padded));   // qkv is read, never written
    }
}

// With RoPE's tables the tensor-core kernels rotate q and k as they load their tiles and dq and dk
// back as they write them, through rope_rotate_pair and with the values rounded where
// rope_forward and rope_backward round them: out, lse and dqkv must be those of rope_forward, the
// kernels without tables and rope_backward, to the bit. qkv is aligned (the kernels apply RoPE
// to 16-byte aligned buffers only); dqkv sits at the shape's offset, so that the odd one takes the
// flush's 2-byte stores.
TEST_CASE("tensor-core attention with RoPE gives the bits of rope_forward and rope_backward around it",
          "[kernels][bf16][tensor-core]") {
    for (auto& s : attention_tensor_core_shapes) {
        int B = s[0], T = s[1], NH = s[2], hs = s[3], offset = s[4], C = NH * hs;
        INFO("B " << B << " T " << T << " NH " << NH << " hs " << hs << " dqkv offset " << offset);
        auto qkv = random_bf16((size_t)B * T * 3 * C, 64), dout = random_bf16((size_t)B * T * C, 65);
        std::vector<bf16> dqkv_padded(offset + qkv.size(), __float2bfloat16_rn(NAN));   // NaN: backward writes it, never reads it
        DeviceArray<float> d_cos(rope_table(T, hs, false)), d_sin(rope_table(T, hs, true));
        DeviceArray<bf16> d_dout(dout);
        // RoPE's own kernels around the attention without tables
        DeviceArray<bf16> r_qkv(qkv), r_out((size_t)B * T * C), r_dqkv(dqkv_padded);
        DeviceArray<float> r_lse((size_t)B * NH * T), r_scratch((size_t)B * NH * T);
        rope_forward(r_qkv.ptr, d_cos.ptr, d_sin.ptr, B, T, NH, hs, 0);
        attention_forward_tensor_core(r_out.ptr, r_lse.ptr, r_qkv.ptr, nullptr, nullptr, B, T, NH, hs, 0);
        attention_backward_tensor_core(r_dqkv.ptr + offset, r_scratch.ptr, d_dout.ptr, r_qkv.ptr, r_out.ptr, r_lse.ptr,
                                       nullptr, nullptr, B, T, NH, hs, 0);
        rope_backward(r_dqkv.ptr + offset, d_cos.ptr, d_sin.ptr, B, T, NH, hs, 0);
        // the attention applying RoPE itself, to qkv as it came out of the product
        DeviceArray<bf16> f_qkv(qkv), f_out((size_t)B * T * C), f_dqkv(dqkv_padded);
        DeviceArray<float> f_lse((size_t)B * NH * T), f_scratch((size_t)B * NH * T);
        attention_forward_tensor_core(f_out.ptr, f_lse.ptr, f_qkv.ptr, d_cos.ptr, d_sin.ptr, B, T, NH, hs, 0);
        attention_backward_tensor_core(f_dqkv.ptr + offset, f_scratch.ptr, d_dout.ptr, f_qkv.ptr, f_out.ptr, f_lse.ptr,
                                       d_cos.ptr, d_sin.ptr, B, T, NH, hs, 0);
        CHECK(same_bits(f_out.to_host(), r_out.to_host()));
        CHECK(same_bits(f_lse.to_host(), r_lse.to_host()));
        CHECK(same_bits(f_dqkv.to_host(), r_dqkv.to_host()));
        CHECK(same_bits(f_qkv.to_host(), qkv));   // left unrotated
        if (T > 1) CHECK(!same_bits(r_qkv.to_host(), qkv));   // RoPE did rotate (position 0 stays)
    }
}

// The rounding of P is real: with peaked rows (qkv std 2) the tensor-core out is not the CUDA-core
// fused out (float P) everywhere, while both stay within what one rounding of each P can move y
// by: |y_tc - y_float| <= 2^-8 sum_j P_j |v_j| <= 2^-8 max |v| of the row's keys, plus a step of y
// on each side.
TEST_CASE("tensor-core attention rounds P to bf16, within one step of each probability", "[kernels][bf16][tensor-core]") {
    int B = 1, T = 130, NH = 2, hs = 64, C = NH * hs;
    auto qkv = random_bf16((size_t)B * T * 3 * C, 59, 2.0f);
    DeviceArray<bf16> d_qkv(qkv), tc_out((size_t)B * T * C), float_out((size_t)B * T * C);
    DeviceArray<float> tc_lse((size_t)B * NH * T), float_lse((size_t)B * NH * T);
    attention_forward_tensor_core(tc_out.ptr, tc_lse.ptr, d_qkv.ptr, nullptr, nullptr, B, T, NH, hs, 0);
    attention_forward_fused_cuda_cores(float_out.ptr, float_lse.ptr, d_qkv.ptr, B, T, NH, hs, 0);
    auto tc = to_floats(tc_out.to_host()), ref = to_floats(float_out.to_host()), qkv_f = to_floats(qkv);
    int differing = 0;
    for (int t = 0; t < T; t++)
        for (int h = 0; h < NH; h++) {
            double max_v = 0;
            for (int t2 = 0; t2 <= t; t2++)
                for (int i = 0; i < hs; i++)
                    max_v = std::max(max_v, (double)fabs(qkv_f[(size_t)t2 * 3 * C + 2 * C + (size_t)h * hs + i]));
            for (int i = 0; i < hs; i++) {
                size_t e = (size_t)t * C + (size_t)h * hs + i;
                double diff = fabs((double)tc[e] - ref[e]);
                double bound = BF16_STEP * max_v + 2 * BF16_STEP * std::max(fabs((double)tc[e]), fabs((double)ref[e])) + 1e-6;
                if (!(diff <= bound)) {
                    INFO("t " << t << " h " << h << " channel " << i << ": " << tc[e] << " against " << ref[e]);
                    REQUIRE(diff <= bound);
                }
                differing += diff > 0;
            }
        }
    CHECK(differing > 0);
}

TEST_CASE("tensor-core attention is deterministic", "[kernels][bf16][tensor-core]") {
    int B = 2, T = 130, NH = 2, hs = 32, C = NH * hs;   // three query and key tiles
    auto qkv = random_bf16((size_t)B * T * 3 * C, 60), dout = random_bf16((size_t)B * T * C, 61),
         dqkv = std::vector<bf16>((size_t)B * T * 3 * C, __float2bfloat16_rn(NAN));   // NaN: backward writes it, never reads it
    DeviceArray<bf16> d_qkv(qkv), d_out_first((size_t)B * T * C), d_out_second((size_t)B * T * C), d_dout(dout),
        d_dqkv_first(dqkv), d_dqkv_second(dqkv);
    DeviceArray<float> d_lse((size_t)B * NH * T), d_lse_second((size_t)B * NH * T), d_scratch((size_t)B * NH * T);
    DeviceArray<float> d_cos(rope_table(T, hs, false)), d_sin(rope_table(T, hs, true));   // with RoPE, as the model runs it
    attention_forward_tensor_core(d_out_first.ptr, d_lse.ptr, d_qkv.ptr, d_cos.ptr, d_sin.ptr, B, T, NH, hs, 0);
    attention_forward_tensor_core(d_out_second.ptr, d_lse_second.ptr, d_qkv.ptr, d_cos.ptr, d_sin.ptr, B, T, NH, hs, 0);
    attention_backward_tensor_core(d_dqkv_first.ptr, d_scratch.ptr, d_dout.ptr, d_qkv.ptr, d_out_first.ptr, d_lse.ptr,
                                   d_cos.ptr, d_sin.ptr, B, T, NH, hs, 0);
    attention_backward_tensor_core(d_dqkv_second.ptr, d_scratch.ptr, d_dout.ptr, d_qkv.ptr, d_out_first.ptr, d_lse.ptr,
                                   d_cos.ptr, d_sin.ptr, B, T, NH, hs, 0);
    auto out_first = d_out_first.to_host(), out_second = d_out_second.to_host();
    auto first = d_dqkv_first.to_host(), second = d_dqkv_second.to_host();
    CHECK(memcmp(out_first.data(), out_second.data(), out_first.size() * sizeof(bf16)) == 0);   // bitwise
    CHECK(memcmp(first.data(), second.data(), first.size() * sizeof(bf16)) == 0);
}

// The model calls attention_forward_fused / attention_backward_fused with RoPE's tables. In bf16
// they take the tensor cores for head sizes a multiple of 16, which rotate q and k themselves and
// leave qkv as it is (bitwise the same as calling them directly). Otherwise (hs 24 here, or qkv
// not 16-byte aligned) q and k are rotated in place first, and dq and dk back after the kernels.
TEST_CASE("fused attention in bf16 takes the tensor cores where they apply, with RoPE on either path",
          "[kernels][bf16][tensor-core]") {
    int cases[][2] = {{24, 0}, {32, 0}, {32, 1}};   // (head size, offset of qkv in elements)
    for (auto& c : cases) {
        int hs = c[0], offset = c[1], B = 1, T = 40, NH = 2, C = NH * hs;
        INFO("hs " << hs << " qkv offset " << offset);
        auto qkv = random_bf16((size_t)B * T * 3 * C, 63), dout = random_bf16((size_t)B * T * C, 66);
        std::vector<bf16> qkv_padded(offset, bf16(0.0f));
        qkv_padded.insert(qkv_padded.end(), qkv.begin(), qkv.end());
        std::vector<bf16> nans((size_t)B * T * 3 * C, __float2bfloat16_rn(NAN));
        DeviceArray<float> d_cos(rope_table(T, hs, false)), d_sin(rope_table(T, hs, true));
        DeviceArray<bf16> d_dout(dout);
        // as the model calls it
        DeviceArray<bf16> fused_qkv(qkv_padded), fused_out((size_t)B * T * C), fused_dqkv(nans);
        DeviceArray<float> fused_lse((size_t)B * NH * T), fused_scratch((size_t)B * NH * T);
        bf16* fused_q = fused_qkv.ptr + offset;
        attention_forward_fused(fused_out.ptr, fused_lse.ptr, fused_q, d_cos.ptr, d_sin.ptr, B, T, NH, hs, 0);
        attention_backward_fused(fused_dqkv.ptr, fused_scratch.ptr, d_dout.ptr, fused_q, fused_out.ptr, fused_lse.ptr,
                                 d_cos.ptr, d_sin.ptr, B, T, NH, hs, 0);
        // the path it should have taken, called directly
        DeviceArray<bf16> direct_qkv(qkv_padded), direct_out((size_t)B * T * C), direct_dqkv(nans);
        DeviceArray<float> direct_lse((size_t)B * NH * T), direct_scratch((size_t)B * NH * T);
        bf16* direct_q = direct_qkv.ptr + offset;
        bool inside = attention_tensor_core_supports(hs) && offset == 0;
        if (inside) {
            attention_forward_tensor_core(direct_out.ptr, direct_lse.ptr, direct_q, d_cos.ptr, d_sin.ptr, B, T, NH, hs,
                                          0);
            attention_backward_tensor_core(direct_dqkv.ptr, direct_scratch.ptr, d_dout.ptr, direct_q, direct_out.ptr,
                                           direct_lse.ptr, d_cos.ptr, d_sin.ptr, B, T, NH, hs, 0);
        } else {
            rope_forward(direct_q, d_cos.ptr, d_sin.ptr, B, T, NH, hs, 0);
            if (attention_tensor_core_supports(hs)) {
                attention_forward_tensor_core(direct_out.ptr, direct_lse.ptr, direct_q, nullptr, nullptr, B, T, NH, hs,
                                              0);
                attention_backward_tensor_core(direct_dqkv.ptr, direct_scratch.ptr, d_dout.ptr, direct_q,
                                               direct_out.ptr, direct_lse.ptr, nullptr, nullptr, B, T, NH, hs, 0);
            } else {
                attention_forward_fused_cuda_cores(direct_out.ptr, direct_lse.ptr, direct_q, B, T, NH, hs, 0);
                attention_backward_fused_cuda_cores(direct_dqkv.ptr, direct_scratch.ptr, d_dout.ptr, direct_q,
                                                    direct_out.ptr, direct_lse.ptr, B, T, NH, hs, 0);
            }
            rope_backward(direct_dqkv.ptr, d_cos.ptr, d_sin.ptr, B, T, NH, hs, 0);
        }
        CHECK(attention_fused_rotates_inside(fused_q, d_cos.ptr, d_sin.ptr, hs) == inside);
        CHECK(same_bits(fused_qkv.to_host(), direct_qkv.to_host()));   // rotated in place, or left as it is
        CHECK(same_bits(fused_qkv.to_host(), qkv_padded) == inside);
        CHECK(same_bits(fused_out.to_host(), direct_out.to_host()));
        CHECK(same_bits(fused_lse.to_host(), direct_lse.to_host()));
        CHECK(same_bits(fused_dqkv.to_host(), direct_dqkv.to_host()));
    }
    CHECK(!attention_tensor_core_supports(24));
    CHECK(attention_tensor_core_supports(64));
}
