/*
bf16 storage in the matmul, the AdamW update, the bf16 weight copy (cast_copy) and the global
gradient norm: each kernel with bf16 buffers against its CPU twin with the same bf16 buffers, on
fresh random inputs, several shapes (some not multiples of the block size), outputs poisoned (NaN)
beforehand.

Built like test_kernels.cu: by g++ -DMIXLN_CUDA_EMULATION (the kernels run in the CPU emulation of
CUDA) and by nvcc (a real GPU). cuBLASLt runs only on a GPU: there the bf16 matmul is checked
against the CPU twin; in emulation the bf16 CPU twin itself is checked against a naive product in
double over the same bf16 inputs.
*/
#include <catch2/catch.hpp>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernel_test_util.h"
#include "../layers/adamw.cuh"
#include "../layers/global_norm.cuh"
#include "../layers/matmul.cuh"

static uint16_t bf16_bits(bf16 x) {
    uint16_t bits;
    memcpy(&bits, &x, sizeof(bits));
    return bits;
}

static uint32_t float_bits(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof(bits));
    return bits;
}

static float float_from_bits(uint32_t bits) {
    float x;
    memcpy(&x, &bits, sizeof(x));
    return x;
}

// ---- matmul

// One bf16 step at the magnitude of x: bf16 keeps 8 significant bits, so the bf16 values in
// [2^e, 2^(e+1)) are 2^(e-7) apart.
static double bf16_ulp(double x) {
    if (x == 0) return 0;
    int e;
    frexp(x, &e);   // |x| in [2^(e-1), 2^e)
    return ldexp(1.0, e - 1 - 7);
}

// The exact product of a matmul (the products of bf16 values are exact in double, and sums of a
// few hundred of them in double are exact to ~2^-44 relative, far below anything checked here),
// and per element the sum of the absolute values of the terms, which bounds any fp32 summation
// error: a sum of n terms in fp32, in any order, is within (n - 1) * 2^-24 * sum |terms| (to
// first order) of the exact sum.
struct ExactProduct {
    std::vector<double> value, abs_sum;
};

// C (M, Ncol) = old + A (M, K) @ B (K, Ncol), with a(m, k) and b(k, n) reading the operands
template <typename ReadA, typename ReadB>
static ExactProduct exact_product(int M, int Ncol, int K, ReadA a, ReadB b, const std::vector<float>* old) {
    ExactProduct p{std::vector<double>((size_t)M * Ncol), std::vector<double>((size_t)M * Ncol)};
    for (int m = 0; m < M; m++) {
        for (int n = 0; n < Ncol; n++) {
            size_t i = (size_t)m * Ncol + n;
            double sum = old ? (double)(*old)[i] : 0.0, abs_sum = old ? fabs((double)(*old)[i]) : 0.0;
            for (int k = 0; k < K; k++) {
                double term = (double)a(m, k) * (double)b(k, n);
                sum += term;
                abs_sum += fabs(term);
            }
            p.value[i] = sum;
            p.abs_sum[i] = abs_sum;
        }
    }
    return p;
}

// Element by element, |result - reference| <= summation_ulps * 2^-24 * abs_sum (fp32 summation
// error) + one bf16 step at the larger magnitude when the values were rounded to bf16: if
// |f - g| <= d then |round(f) - round(g)| <= d + ulp/2 + ulp/2 (each rounding moves a value by at
// most half a step, and a step at |round(x)| is at least the step at |x|).
static void check_matmul(const std::vector<float>& result, const std::vector<double>& reference,
                         const std::vector<double>& abs_sum, double summation_ulps, bool bf16_rounded,
                         const char* what) {
    REQUIRE(result.size() == reference.size());
    for (size_t i = 0; i < result.size(); i++) {
        double bound = summation_ulps * ldexp(abs_sum[i], -24);
        if (bf16_rounded) bound += bf16_ulp(std::max(fabs((double)result[i]), fabs(reference[i])));
        double diff = fabs((double)result[i] - reference[i]);
        if (!(diff <= bound)) {   // also catches NaN
            INFO(what << ": element " << i << " of " << result.size() << ": " << result[i] << ", reference "
                      << reference[i] << ", bound " << bound);
            REQUIRE(diff <= bound);
        }
    }
}

// dinp = DINP_SCALE * dinp_old + dout @ weight: DeepNorm's residual scale a (here (2 * 8)^(1/4) = 2
// would be exact; 1.68 = 8^(1/4) rounded is not, so the scaled old value carries fp32 rounding)
static const float DINP_SCALE = 1.68f;

// the old dinp, scaled in fp32 as the product's start value
static std::vector<float> scaled(const std::vector<float>& v, float scale) {
    std::vector<float> out(v.size());
    for (size_t i = 0; i < v.size(); i++) out[i] = scale * v[i];
    return out;
}

static std::vector<double> to_doubles(const std::vector<float>& v) {
    return std::vector<double>(v.begin(), v.end());
}

// The backward's two products alone (no old values), exactly: dout (N, OC) @ weight (OC, IC) and
// dout^T @ inp (N, IC)
static ExactProduct exact_dinp_product(const std::vector<float>& dout, const std::vector<float>& weight, int N, int IC,
                                       int OC) {
    return exact_product(
        N, IC, OC, [&](int n, int k) { return dout[(size_t)n * OC + k]; },
        [&](int k, int ic) { return weight[(size_t)k * IC + ic]; }, nullptr);
}
static ExactProduct exact_dweight_product(const std::vector<float>& dout, const std::vector<float>& inp, int N, int IC,
                                          int OC) {
    return exact_product(
        OC, IC, N, [&](int oc, int k) { return dout[(size_t)k * OC + oc]; },
        [&](int k, int ic) { return inp[(size_t)k * IC + ic]; }, nullptr);
}

// matmul_backward with both scales 0 into poisoned (NaN) gradients, on the CPU twin or through the
// launcher (cuBLASLt on a GPU; the weight `offset` elements into its allocation): dinp (bf16),
// dweight as bf16 (bf16-pure) and as fp32 (bf16).
struct WrittenGradients {
    std::vector<bf16> dinp, dweight;
    std::vector<float> dweight_f;
};
static WrittenGradients matmul_backward_written(const std::vector<bf16>& dout, const std::vector<bf16>& inp,
                                                const std::vector<bf16>& weight, int N, int IC, int OC, bool launcher,
                                                int offset = 0) {
    WrittenGradients g = {to_bf16(std::vector<float>((size_t)N * IC, NAN)),
                          to_bf16(std::vector<float>((size_t)OC * IC, NAN)), std::vector<float>((size_t)OC * IC, NAN)};
    std::vector<bf16> dinp_again = g.dinp;
    if (!launcher) {
        matmul_backward_cpu(g.dinp.data(), g.dweight.data(), dout.data(), inp.data(), weight.data(), N, IC, OC, 0.0f, 0.0f);
        matmul_backward_cpu(dinp_again.data(), g.dweight_f.data(), dout.data(), inp.data(), weight.data(), N, IC, OC,
                            0.0f, 0.0f);
        return g;
    }
    std::vector<bf16> weight_padded(weight.size() + 1, __float2bfloat16_rn(0.0f));
    std::copy(weight.begin(), weight.end(), weight_padded.begin() + offset);
    DeviceArray<bf16> d_dout(dout), d_inp(inp), d_weight(weight_padded), d_dinp(g.dinp), d_dinp_again(g.dinp),
        d_dweight(g.dweight);
    DeviceArray<float> d_dweight_f(g.dweight_f);
    matmul_backward(d_dinp.ptr, d_dweight.ptr, d_dout.ptr, d_inp.ptr, d_weight.ptr + offset, N, IC, OC, 0.0f, 0.0f, 0);
    matmul_backward(d_dinp_again.ptr, d_dweight_f.ptr, d_dout.ptr, d_inp.ptr, d_weight.ptr + offset, N, IC, OC, 0.0f,
                    0.0f, 0);
    g.dinp = d_dinp.to_host();
    g.dweight = d_dweight.to_host();
    g.dweight_f = d_dweight_f.to_host();
    return g;
}

#ifdef MIXLN_CUDA_EMULATION
// cuBLASLt cannot run here (the emulated launchers ARE the CPU twin): check the bf16 twin against
// the exact product instead. The twin sums in fp32 (K products, then + old: K + 1 terms, within
// K * 2^-24 * sum |terms| of the exact value; K + 2 leaves room for the second-order terms),
// then rounds once; the reference rounds the exact value once: one bf16 step apart at most on top.
TEST_CASE("matmul bf16 CPU twin equals the exact product rounded once", "[kernels][bf16]") {
    int shapes[][3] = {{1, 1, 1}, {7, 5, 33}, {300, 257, 65}};   // (N, IC, OC); 257 and 300 > one K block (256)
    for (auto& s : shapes) {
        int N = s[0], IC = s[1], OC = s[2];
        INFO("N " << N << " IC " << IC << " OC " << OC);
        auto inp = random_bf16((size_t)N * IC, 41), weight = random_bf16((size_t)OC * IC, 42),
             dout = random_bf16((size_t)N * OC, 43), dinp = random_bf16((size_t)N * IC, 44),
             dweight = random_bf16((size_t)OC * IC, 45);
        auto dweight_f = random_floats((size_t)OC * IC, 46);
        auto inp_f = to_floats(inp), weight_f = to_floats(weight), dout_f = to_floats(dout), dinp_f = to_floats(dinp), dinp_old_scaled = scaled(dinp_f, DINP_SCALE),
             dweight_old = to_floats(dweight);

        // forward: the twin, the same twin through the (emulated) launcher, and the exact product
        std::vector<bf16> out((size_t)N * OC);
        matmul_forward_cpu(out.data(), inp.data(), weight.data(), N, IC, OC);
        DeviceArray<bf16> d_inp(inp), d_weight(weight), d_out((size_t)N * OC);
        matmul_forward(d_out.ptr, d_inp.ptr, d_weight.ptr, N, IC, OC, 0);
        auto launched = d_out.to_host();
        CHECK(memcmp(launched.data(), out.data(), out.size() * sizeof(bf16)) == 0);
        auto exact = exact_product(
            N, OC, IC, [&](int n, int k) { return inp_f[(size_t)n * IC + k]; },
            [&](int k, int oc) { return weight_f[(size_t)oc * IC + k]; }, nullptr);
        auto rounded = to_doubles(to_floats(to_bf16(std::vector<float>(exact.value.begin(), exact.value.end()))));
        check_matmul(to_floats(out), rounded, exact.abs_sum, IC + 2, true, "matmul forward");
        // the bf16 twin is the fp32 twin on the same values, rounded once: bit for bit
        std::vector<float> out_f((size_t)N * OC);
        matmul_forward_cpu(out_f.data(), inp_f.data(), weight_f.data(), N, IC, OC);
        auto out_f_rounded = to_bf16(out_f);
        CHECK(memcmp(out_f_rounded.data(), out.data(), out.size() * sizeof(bf16)) == 0);

        // backward, accumulating into bf16 dinp and into bf16 (bf16-pure) or fp32 (bf16) dweight
        std::vector<bf16> dinp_cpu = dinp, dweight_cpu = dweight, dinp_cpu2 = dinp;
        std::vector<float> dweight_cpu_f = dweight_f;
        matmul_backward_cpu(dinp_cpu.data(), dweight_cpu.data(), dout.data(), inp.data(), weight.data(), N, IC, OC, DINP_SCALE, 1.0f);
        matmul_backward_cpu(dinp_cpu2.data(), dweight_cpu_f.data(), dout.data(), inp.data(), weight.data(), N, IC, OC, DINP_SCALE, 1.0f);
        CHECK(memcmp(dinp_cpu2.data(), dinp_cpu.data(), dinp.size() * sizeof(bf16)) == 0);   // G does not touch dinp
        auto exact_dinp = exact_product(
            N, IC, OC, [&](int n, int k) { return dout_f[(size_t)n * OC + k]; },
            [&](int k, int ic) { return weight_f[(size_t)k * IC + ic]; }, &dinp_old_scaled);
        auto exact_dweight = exact_product(
            OC, IC, N, [&](int oc, int k) { return dout_f[(size_t)k * OC + oc]; },
            [&](int k, int ic) { return inp_f[(size_t)k * IC + ic]; }, &dweight_old);
        auto exact_dweight_f = exact_product(
            OC, IC, N, [&](int oc, int k) { return dout_f[(size_t)k * OC + oc]; },
            [&](int k, int ic) { return inp_f[(size_t)k * IC + ic]; }, &dweight_f);
        auto round_bf16 = [](const std::vector<double>& v) {
            return to_doubles(to_floats(to_bf16(std::vector<float>(v.begin(), v.end()))));
        };
        check_matmul(to_floats(dinp_cpu), round_bf16(exact_dinp.value), exact_dinp.abs_sum, OC + 2, true,
                     "matmul dinp");
        check_matmul(to_floats(dweight_cpu), round_bf16(exact_dweight.value), exact_dweight.abs_sum, N + 2, true,
                     "matmul dweight (bf16)");
        // fp32 dweight: rounded only by the fp32 sums
        check_matmul(dweight_cpu_f, exact_dweight_f.value, exact_dweight_f.abs_sum, N + 2, false,
                     "matmul dweight (fp32)");

        // scales 0: the gradients written over poison that is never read (the launcher, here the
        // twin), against the products alone
        auto written = matmul_backward_written(dout, inp, weight, N, IC, OC, false);
        auto exact_dinp_only = exact_dinp_product(dout_f, weight_f, N, IC, OC);
        auto exact_dweight_only = exact_dweight_product(dout_f, inp_f, N, IC, OC);
        check_matmul(to_floats(written.dinp), round_bf16(exact_dinp_only.value), exact_dinp_only.abs_sum, OC + 2, true,
                     "matmul dinp, written");
        check_matmul(to_floats(written.dweight), round_bf16(exact_dweight_only.value), exact_dweight_only.abs_sum, N + 2,
                     true, "matmul dweight (bf16), written");
        check_matmul(written.dweight_f, exact_dweight_only.value, exact_dweight_only.abs_sum, N + 2, false,
                     "matmul dweight (fp32), written");
    }
}
#else
// cuBLASLt against the CPU twin, both from the same bf16 operands. Both sum the exact bf16
// products in fp32, in different orders, then round once. The twin's fp32 value is within
// (K + 1) * 2^-24 * sum |terms| of the exact one (round to nearest); tensor cores may truncate
// instead of rounding inside their sums (an error of up to 2^-23 per addition), so cuBLASLt's is
// within 2 * (K + 1) * 2^-24 * sum |terms|: together 3 * (K + 1) * 2^-24 * sum |terms|, and 4 * (K + 1)
// for second-order terms. Then one bf16 step at the element's magnitude for the two roundings.
// The same bound without the bf16 step holds for the fp32 dweight.
TEST_CASE("matmul (cuBLASLt) with bf16 matches the CPU", "[kernels][bf16][gpu-only]") {
    // (N, IC, OC, offset): offset moves the weight pointer by one element (2 bytes) off its
    // allocation's alignment, so the heuristic has to pick an algorithm for 2-byte aligned data
    int shapes[][4] = {{1, 1, 1, 0}, {7, 5, 33, 0}, {300, 257, 65, 0}, {64, 128, 96, 0}, {64, 128, 96, 1}};
    for (auto& s : shapes) {
        int N = s[0], IC = s[1], OC = s[2], offset = s[3];
        INFO("N " << N << " IC " << IC << " OC " << OC << " weight offset " << offset);
        auto inp = random_bf16((size_t)N * IC, 41), weight = random_bf16((size_t)OC * IC, 42),
             dout = random_bf16((size_t)N * OC, 43), dinp = random_bf16((size_t)N * IC, 44),
             dweight = random_bf16((size_t)OC * IC, 45);
        auto dweight_f = random_floats((size_t)OC * IC, 46);
        auto inp_f = to_floats(inp), weight_f = to_floats(weight), dout_f = to_floats(dout), dinp_f = to_floats(dinp), dinp_old_scaled = scaled(dinp_f, DINP_SCALE),
             dweight_old = to_floats(dweight);
        std::vector<bf16> out_cpu((size_t)N * OC), dinp_cpu = dinp, dweight_cpu = dweight, dinp_cpu2 = dinp;
        std::vector<float> dweight_cpu_f = dweight_f;
        matmul_forward_cpu(out_cpu.data(), inp.data(), weight.data(), N, IC, OC);
        matmul_backward_cpu(dinp_cpu.data(), dweight_cpu.data(), dout.data(), inp.data(), weight.data(), N, IC, OC, DINP_SCALE, 1.0f);
        matmul_backward_cpu(dinp_cpu2.data(), dweight_cpu_f.data(), dout.data(), inp.data(), weight.data(), N, IC, OC, DINP_SCALE, 1.0f);

        std::vector<bf16> weight_padded(weight.size() + 1, __float2bfloat16_rn(0.0f));
        std::copy(weight.begin(), weight.end(), weight_padded.begin() + offset);
        DeviceArray<bf16> d_inp(inp), d_weight(weight_padded), d_dout(dout), d_out((size_t)N * OC), d_dinp(dinp),
            d_dweight(dweight), d_dinp2(dinp);
        DeviceArray<float> d_dweight_f(dweight_f);
        const bf16* w = d_weight.ptr + offset;
        matmul_forward(d_out.ptr, d_inp.ptr, w, N, IC, OC, 0);
        matmul_backward(d_dinp.ptr, d_dweight.ptr, d_dout.ptr, d_inp.ptr, w, N, IC, OC, DINP_SCALE, 1.0f, 0);
        matmul_backward(d_dinp2.ptr, d_dweight_f.ptr, d_dout.ptr, d_inp.ptr, w, N, IC, OC, DINP_SCALE, 1.0f, 0);

        auto exact = exact_product(
            N, OC, IC, [&](int n, int k) { return inp_f[(size_t)n * IC + k]; },
            [&](int k, int oc) { return weight_f[(size_t)oc * IC + k]; }, nullptr);
        auto exact_dinp = exact_product(
            N, IC, OC, [&](int n, int k) { return dout_f[(size_t)n * OC + k]; },
            [&](int k, int ic) { return weight_f[(size_t)k * IC + ic]; }, &dinp_old_scaled);
        auto exact_dweight = exact_product(
            OC, IC, N, [&](int oc, int k) { return dout_f[(size_t)k * OC + oc]; },
            [&](int k, int ic) { return inp_f[(size_t)k * IC + ic]; }, &dweight_old);
        auto exact_dweight_f = exact_product(
            OC, IC, N, [&](int oc, int k) { return dout_f[(size_t)k * OC + oc]; },
            [&](int k, int ic) { return inp_f[(size_t)k * IC + ic]; }, &dweight_f);
        check_matmul(to_floats(d_out.to_host()), to_doubles(to_floats(out_cpu)), exact.abs_sum, 4.0 * (IC + 1), true,
                     "matmul forward");
        check_matmul(to_floats(d_dinp.to_host()), to_doubles(to_floats(dinp_cpu)), exact_dinp.abs_sum,
                     4.0 * (OC + 1), true, "matmul dinp");
        check_matmul(to_floats(d_dinp2.to_host()), to_doubles(to_floats(dinp_cpu)), exact_dinp.abs_sum,
                     4.0 * (OC + 1), true, "matmul dinp (fp32 dweight)");
        check_matmul(to_floats(d_dweight.to_host()), to_doubles(to_floats(dweight_cpu)), exact_dweight.abs_sum,
                     4.0 * (N + 1), true, "matmul dweight (bf16)");
        check_matmul(d_dweight_f.to_host(), to_doubles(dweight_cpu_f), exact_dweight_f.abs_sum, 4.0 * (N + 1), false,
                     "matmul dweight (fp32)");

        // scales 0: the gradients written over poison that beta 0 never reads; a bf16 dweight then
        // comes straight from cuBLASLt, not through the fp32 scratch
        auto written = matmul_backward_written(dout, inp, weight, N, IC, OC, false);
        auto launched = matmul_backward_written(dout, inp, weight, N, IC, OC, true, offset);
        auto exact_dinp_only = exact_dinp_product(dout_f, weight_f, N, IC, OC);
        auto exact_dweight_only = exact_dweight_product(dout_f, inp_f, N, IC, OC);
        check_matmul(to_floats(launched.dinp), to_doubles(to_floats(written.dinp)), exact_dinp_only.abs_sum,
                     4.0 * (OC + 1), true, "matmul dinp, written");
        check_matmul(to_floats(launched.dweight), to_doubles(to_floats(written.dweight)), exact_dweight_only.abs_sum,
                     4.0 * (N + 1), true, "matmul dweight (bf16), written");
        check_matmul(launched.dweight_f, to_doubles(written.dweight_f), exact_dweight_only.abs_sum, 4.0 * (N + 1), false,
                     "matmul dweight (fp32), written");
    }
}
#endif

// ---- AdamW

static const float ADAM_LR = 1e-2f, ADAM_BETA1 = 0.9f, ADAM_BETA2 = 0.999f, ADAM_EPS = 1e-8f, ADAM_DECAY = 0.1f,
                   ADAM_GRAD_SCALE = 0.5f;

// moments as a model has them after a few steps: m ~ 0.1, v = (something ~ 0.1)^2 >= 0
static std::vector<float> random_second_moment(size_t n, uint64_t seed) {
    auto v = random_floats(n, seed, 0.1f);
    for (auto& x : v) x = x * x;
    return v;
}

TEST_CASE("adamw fp32 (P = G = float): the template keeps the fp32 arithmetic, and the kernel matches",
          "[kernels][bf16]") {
    for (size_t n : {1, 257, 5000}) {
        for (int t : {1, 7}) {   // the first step and a later one: bias corrections differ
            INFO("n " << n << " t " << t);
            auto params = random_floats(n, 51), m = random_floats(n, 52, 0.1f), v = random_second_moment(n, 53),
                 grads = random_floats(n, 54);
            std::vector<float> params_cpu = params, m_cpu = m, v_cpu = v;
            adamw_update_cpu(params_cpu.data(), m_cpu.data(), v_cpu.data(), NO_PARAMS_COPY, grads.data(), n, ADAM_LR,
                             ADAM_BETA1, ADAM_BETA2, ADAM_EPS, ADAM_DECAY, t, ADAM_GRAD_SCALE, ROUND_NEAREST, 0, 0);
            // the fp32-only loop this template replaced, with the roundings gcc gave it spelled out (an
            // fma where it contracted a * b + c; left to the compiler, its choice of product moved
            // with the code around this loop): the same bits
            std::vector<float> params_old = params, m_old = m, v_old = v;
            {
                double bias_correction1 = 1.0 - pow((double)ADAM_BETA1, t);
                double bias_correction2_sqrt = sqrt(1.0 - pow((double)ADAM_BETA2, t));
                real step_size = (real)(ADAM_LR / bias_correction1);
                real decay = (real)(1.0 - (double)ADAM_LR * ADAM_DECAY);
                for (size_t i = 0; i < n; i++) {
                    real g = grads[i] * ADAM_GRAD_SCALE;
                    params_old[i] *= decay;
                    m_old[i] = std::fma(ADAM_BETA1, m_old[i], (1 - ADAM_BETA1) * g);
                    v_old[i] = std::fma(ADAM_BETA2, v_old[i], (1 - ADAM_BETA2) * g * g);
                    real denom = sqrt(v_old[i]) / (real)bias_correction2_sqrt + ADAM_EPS;
                    params_old[i] = std::fma(-step_size, m_old[i] / denom, params_old[i]);
                }
            }
            CHECK(memcmp(params_old.data(), params_cpu.data(), n * sizeof(float)) == 0);
            CHECK(memcmp(m_old.data(), m_cpu.data(), n * sizeof(float)) == 0);
            CHECK(memcmp(v_old.data(), v_cpu.data(), n * sizeof(float)) == 0);
            DeviceArray<float> d_params(params), d_m(m), d_v(v), d_grads(grads);
            adamw_update(d_params.ptr, d_m.ptr, d_v.ptr, NO_PARAMS_COPY, d_grads.ptr, n, ADAM_LR, ADAM_BETA1,
                         ADAM_BETA2, ADAM_EPS, ADAM_DECAY, t, ADAM_GRAD_SCALE, ROUND_NEAREST, 0, 0, 0);
            check_close(d_params.to_host(), params_cpu, "adamw params");
            check_close(d_m.to_host(), m_cpu, "adamw m");
            check_close(d_v.to_host(), v_cpu, "adamw v");
        }
    }
}

// Default bf16 tolerance: the kernel and the twin compute the same float expressions from the same
// bf16 values (nvcc may contract some into FMAs: a few fp32 ulps) and round once per store, so
// each stored value differs by at most one bf16 step at its own magnitude.
TEST_CASE("adamw bf16-pure (P = G = bf16) kernel matches the CPU, rounding m, v and p once", "[kernels][bf16]") {
    for (size_t n : {1, 257, 5000}) {
        for (int t : {1, 7}) {
            INFO("n " << n << " t " << t);
            auto params = random_bf16(n, 61), m = random_bf16(n, 62, 0.1f), v = to_bf16(random_second_moment(n, 63)),
                 grads = random_bf16(n, 64);
            std::vector<bf16> params_cpu = params, m_cpu = m, v_cpu = v;
            adamw_update_cpu(params_cpu.data(), m_cpu.data(), v_cpu.data(), NO_PARAMS_COPY, grads.data(), n, ADAM_LR,
                             ADAM_BETA1, ADAM_BETA2, ADAM_EPS, ADAM_DECAY, t, ADAM_GRAD_SCALE, ROUND_NEAREST, 0, 0);
            // the rounding points: the fp32 update (P = float) of the same values, then each of p, m,
            // v rounded once, is the bf16 update bit for bit. In particular p comes from the
            // unrounded new m and v: an update from the rounded ones would differ in many elements.
            auto params_f = to_floats(params), m_f = to_floats(m), v_f = to_floats(v);
            adamw_update_cpu(params_f.data(), m_f.data(), v_f.data(), NO_PARAMS_COPY, grads.data(), n, ADAM_LR,
                             ADAM_BETA1, ADAM_BETA2, ADAM_EPS, ADAM_DECAY, t, ADAM_GRAD_SCALE, ROUND_NEAREST, 0, 0);
            auto params_r = to_bf16(params_f), m_r = to_bf16(m_f), v_r = to_bf16(v_f);
            CHECK(memcmp(params_r.data(), params_cpu.data(), n * sizeof(bf16)) == 0);
            CHECK(memcmp(m_r.data(), m_cpu.data(), n * sizeof(bf16)) == 0);
            CHECK(memcmp(v_r.data(), v_cpu.data(), n * sizeof(bf16)) == 0);

            DeviceArray<bf16> d_params(params), d_m(m), d_v(v), d_grads(grads);
            adamw_update(d_params.ptr, d_m.ptr, d_v.ptr, NO_PARAMS_COPY, d_grads.ptr, n, ADAM_LR, ADAM_BETA1,
                         ADAM_BETA2, ADAM_EPS, ADAM_DECAY, t, ADAM_GRAD_SCALE, ROUND_NEAREST, 0, 0, 0);
            check_close_bf16(d_params.to_host(), params_cpu, "adamw bf16 params");
            check_close_bf16(d_m.to_host(), m_cpu, "adamw bf16 m");
            check_close_bf16(d_v.to_host(), v_cpu, "adamw bf16 v");
        }
    }
}

// ---- stochastic rounding (--rounding stochastic)

// Over all 2^16 values of its random bits, stochastic rounding goes up for exactly as many as the
// dropped half of x's bits counts, so the average of the results is x itself, exactly (in double:
// the sum of 2^16 bf16 values of one binade or two is exact). Every result is one of x's two bf16
// neighbours. Infinities and NaN keep rounding to nearest.
TEST_CASE("stochastic rounding to bf16: always a neighbour, and exactly unbiased over its random bits",
          "[kernels][bf16]") {
    const uint32_t inputs[] = {
        0x3F800000u,   // 1: a bf16 value, never moves
        0x3F80FFFFu,   // just below 1 + 2^-7: up for all but one of the 2^16 draws
        0x3F800001u,   // just above 1: up for one draw
        0x3F7FC123u,   // below 1, rounding up crosses into the next binade (1.0)
        0xC06CCCCDu,   // -3.7: the magnitude rounds, the sign stays
        0x00012345u,   // a subnormal float
        0x3A83126Fu,   // 1e-3
    };
    for (uint32_t input : inputs) {
        float x = float_from_bits(input);
        INFO("x " << x << " (bits " << std::hex << input << std::dec << ")");
        uint32_t lower = input & 0xFFFF0000u, upper = lower + 0x10000u;   // the neighbours' bits (magnitudes)
        double sum = 0;
        size_t ups = 0, not_neighbour = 0;
        for (uint32_t r = 0; r < 65536; r++) {
            uint32_t bits = (uint32_t)bf16_bits(bf16_round_stochastic(x, r)) << 16;
            if (bits != lower && bits != upper) not_neighbour++;
            ups += bits == upper && upper != lower;
            sum += float_from_bits(bits);
        }
        CHECK(not_neighbour == 0);
        CHECK(ups == (input & 0xFFFFu));
        CHECK(sum == 65536.0 * (double)x);
    }
    // the largest bf16 (0x7F7F) and above: the carry goes to infinity, as rounding to nearest would
    float above_max = float_from_bits(0x7F7F8000u);
    CHECK(bf16_bits(bf16_round_stochastic(above_max, 0)) == 0x7F7F);
    CHECK(bf16_bits(bf16_round_stochastic(above_max, 0x8000)) == 0x7F80);
    CHECK(bf16_bits(bf16_round_stochastic(INFINITY, 0xFFFF)) == 0x7F80);
    CHECK(bf16_bits(bf16_round_stochastic(-INFINITY, 0xFFFF)) == 0xFF80);
    float nan_high = float_from_bits(0x7FFFFFFFu);   // a NaN whose carry would reach the sign bit
    for (uint32_t r : {0u, 1u, 0xFFFFu}) CHECK(std::isnan(__bfloat162float(bf16_round_stochastic(nan_high, r))));
    // round_to picks the rounding
    CHECK(bf16_bits(round_to<bf16>(float_from_bits(0x3F80FFFFu), ROUND_NEAREST, 0xFFFF)) == 0x3F81);
    CHECK(bf16_bits(round_to<bf16>(float_from_bits(0x3F80FFFFu), ROUND_STOCHASTIC, 0)) == 0x3F80);
    CHECK(float_bits(round_to<float>(1.1f, ROUND_STOCHASTIC, 0xFFFF)) == float_bits(1.1f));
}

// The random bits: 16 for each of m, v and p from every element's 64. Over 2^16 elements each
// field should fill 16 buckets evenly: chi-square with 15 degrees of freedom (99.99th percentile
// 44.3). The hash is fixed, so this passes or fails the same way every time.
TEST_CASE("stochastic rounding's random bits are spread evenly, and differ by step and seed", "[kernels][bf16]") {
    const uint64_t key = stochastic_rounding_key(1337, 1);
    for (int field = 0; field < 3; field++) {
        INFO("field " << field);
        std::vector<double> buckets(16, 0.0);
        for (uint64_t i = 0; i < 65536; i++) buckets[(stochastic_rounding_bits(key, i) >> (16 * field + 12)) & 15]++;
        double chi_square = 0;
        for (double count : buckets) chi_square += (count - 4096.0) * (count - 4096.0) / 4096.0;
        CHECK(chi_square < 44.3);
    }
    CHECK(stochastic_rounding_key(1337, 1) != stochastic_rounding_key(1337, 2));
    CHECK(stochastic_rounding_key(1337, 1) != stochastic_rounding_key(1338, 1));
    CHECK(stochastic_rounding_bits(key, 0) != stochastic_rounding_bits(key, 1));
}

// Each of the three stores is the fp32 update (the P = float twin on the same values) rounded
// stochastically with the element's own bits, bit for bit; the kernels draw the same bits for the
// same element, down the vector kernel and past it (n 263: 32 chunks of 8 and 7 elements), so
// they must agree with the CPU on all but the rare element whose fp32 value differs in its last
// bit right at its random threshold (none are expected; 1 in 1000 is allowed).
TEST_CASE("adamw bf16-pure with stochastic rounding: each store rounds the fp32 update with its element's bits",
          "[kernels][bf16]") {
    const uint64_t seed = 99;
    for (size_t n : {1, 263, 5000}) {
        for (int t : {1, 7}) {
            INFO("n " << n << " t " << t);
            auto params = random_bf16(n, 91), m = random_bf16(n, 92, 0.1f), v = to_bf16(random_second_moment(n, 93)),
                 grads = random_bf16(n, 94);
            std::vector<bf16> params_cpu = params, m_cpu = m, v_cpu = v;
            adamw_update_cpu(params_cpu.data(), m_cpu.data(), v_cpu.data(), NO_PARAMS_COPY, grads.data(), n, ADAM_LR,
                             ADAM_BETA1, ADAM_BETA2, ADAM_EPS, ADAM_DECAY, t, ADAM_GRAD_SCALE, ROUND_STOCHASTIC, seed, 0);
            auto params_f = to_floats(params), m_f = to_floats(m), v_f = to_floats(v);
            adamw_update_cpu(params_f.data(), m_f.data(), v_f.data(), NO_PARAMS_COPY, grads.data(), n, ADAM_LR,
                             ADAM_BETA1, ADAM_BETA2, ADAM_EPS, ADAM_DECAY, t, ADAM_GRAD_SCALE, ROUND_NEAREST, 0, 0);
            const uint64_t key = stochastic_rounding_key(seed, t);
            size_t wrong = 0, differs_from_nearest = 0;
            for (size_t i = 0; i < n; i++) {
                uint64_t random = stochastic_rounding_bits(key, i);
                wrong += bf16_bits(m_cpu[i]) != bf16_bits(bf16_round_stochastic(m_f[i], (uint32_t)random));
                wrong += bf16_bits(v_cpu[i]) != bf16_bits(bf16_round_stochastic(v_f[i], (uint32_t)(random >> 16)));
                wrong += bf16_bits(params_cpu[i]) !=
                         bf16_bits(bf16_round_stochastic(params_f[i], (uint32_t)(random >> 32)));
                differs_from_nearest += bf16_bits(params_cpu[i]) != bf16_bits(__float2bfloat16_rn(params_f[i]));
            }
            CHECK(wrong == 0);
            // a rounding that ignored its bits would round to nearest everywhere
            if (n >= 263) CHECK(differs_from_nearest > n / 10);

            DeviceArray<bf16> d_params(params), d_m(m), d_v(v), d_grads(grads);
            adamw_update(d_params.ptr, d_m.ptr, d_v.ptr, NO_PARAMS_COPY, d_grads.ptr, n, ADAM_LR, ADAM_BETA1,
                         ADAM_BETA2, ADAM_EPS, ADAM_DECAY, t, ADAM_GRAD_SCALE, ROUND_STOCHASTIC, seed, 0, 0);
            auto params_gpu = d_params.to_host(), m_gpu = d_m.to_host(), v_gpu = d_v.to_host();
            check_close_bf16(params_gpu, params_cpu, "adamw bf16 params, stochastic");
            check_close_bf16(m_gpu, m_cpu, "adamw bf16 m, stochastic");
            check_close_bf16(v_gpu, v_cpu, "adamw bf16 v, stochastic");
            size_t not_same = 0;
            for (size_t i = 0; i < n; i++) {
                not_same += bf16_bits(params_gpu[i]) != bf16_bits(params_cpu[i]);
                not_same += bf16_bits(m_gpu[i]) != bf16_bits(m_cpu[i]);
                not_same += bf16_bits(v_gpu[i]) != bf16_bits(v_cpu[i]);
            }
            CHECK(not_same <= 3 * n / 1000);
        }
    }
}

// The model updates its buffer in pieces where weight decay skips the norms (model.h:
// model_update), each piece with first_index, the index of its first element in the whole
// buffer, from which stochastic rounding draws its bits: the pieces must give the whole update's
// bits, on the CPU and on the GPU, through the vector kernel and, where a piece starts off a
// 16-byte boundary (1003), the one-element kernel.
TEST_CASE("adamw in pieces with first_index is the update of the whole buffer, stochastic rounding included",
          "[kernels][bf16]") {
    const size_t n = 5000;
    const size_t cuts[] = {0, 1000, 1003, 2048, n};
    const uint64_t seed = 31;
    auto params = random_bf16(n, 95), m = random_bf16(n, 96, 0.1f), v = to_bf16(random_second_moment(n, 97)),
         grads = random_bf16(n, 98);
    std::vector<bf16> whole_p = params, whole_m = m, whole_v = v, piece_p = params, piece_m = m, piece_v = v;
    adamw_update_cpu(whole_p.data(), whole_m.data(), whole_v.data(), NO_PARAMS_COPY, grads.data(), n, ADAM_LR, ADAM_BETA1,
                     ADAM_BETA2, ADAM_EPS, ADAM_DECAY, 3, ADAM_GRAD_SCALE, ROUND_STOCHASTIC, seed, 0);
    for (int k = 0; k + 1 < 5; k++) {
        size_t first = cuts[k], count = cuts[k + 1] - cuts[k];
        adamw_update_cpu(piece_p.data() + first, piece_m.data() + first, piece_v.data() + first, NO_PARAMS_COPY,
                         grads.data() + first, count, ADAM_LR, ADAM_BETA1, ADAM_BETA2, ADAM_EPS, ADAM_DECAY, 3,
                         ADAM_GRAD_SCALE, ROUND_STOCHASTIC, seed, first);
    }
    CHECK(memcmp(whole_p.data(), piece_p.data(), n * sizeof(bf16)) == 0);
    CHECK(memcmp(whole_m.data(), piece_m.data(), n * sizeof(bf16)) == 0);
    CHECK(memcmp(whole_v.data(), piece_v.data(), n * sizeof(bf16)) == 0);
    // (the index matters: the pieces each from index 0 round otherwise)
    std::vector<bf16> from_zero = params, m_zero = m, v_zero = v;
    for (int k = 0; k + 1 < 5; k++) {
        size_t first = cuts[k], count = cuts[k + 1] - cuts[k];
        adamw_update_cpu(from_zero.data() + first, m_zero.data() + first, v_zero.data() + first, NO_PARAMS_COPY,
                         grads.data() + first, count, ADAM_LR, ADAM_BETA1, ADAM_BETA2, ADAM_EPS, ADAM_DECAY, 3,
                         ADAM_GRAD_SCALE, ROUND_STOCHASTIC, seed, 0);
    }
    CHECK(memcmp(whole_p.data(), from_zero.data(), n * sizeof(bf16)) != 0);

    DeviceArray<bf16> d_whole_p(params), d_whole_m(m), d_whole_v(v), d_p(params), d_m(m), d_v(v), d_grads(grads);
    adamw_update(d_whole_p.ptr, d_whole_m.ptr, d_whole_v.ptr, NO_PARAMS_COPY, d_grads.ptr, n, ADAM_LR, ADAM_BETA1,
                 ADAM_BETA2, ADAM_EPS, ADAM_DECAY, 3, ADAM_GRAD_SCALE, ROUND_STOCHASTIC, seed, 0, 0);
    for (int k = 0; k + 1 < 5; k++) {
        size_t first = cuts[k], count = cuts[k + 1] - cuts[k];
        adamw_update(d_p.ptr + first, d_m.ptr + first, d_v.ptr + first, NO_PARAMS_COPY, d_grads.ptr + first, count,
                     ADAM_LR, ADAM_BETA1, ADAM_BETA2, ADAM_EPS, ADAM_DECAY, 3, ADAM_GRAD_SCALE, ROUND_STOCHASTIC, seed,
                     first, 0);
    }
    auto gpu_whole_p = d_whole_p.to_host(), gpu_p = d_p.to_host(), gpu_m = d_m.to_host(), gpu_whole_m = d_whole_m.to_host();
    auto gpu_v = d_v.to_host(), gpu_whole_v = d_whole_v.to_host();
    CHECK(memcmp(gpu_whole_p.data(), gpu_p.data(), n * sizeof(bf16)) == 0);
    CHECK(memcmp(gpu_whole_m.data(), gpu_m.data(), n * sizeof(bf16)) == 0);
    CHECK(memcmp(gpu_whole_v.data(), gpu_v.data(), n * sizeof(bf16)) == 0);
}

// What stochastic rounding is for. Weights at 1 (bf16 values just below 1 are 2^-8 apart), a
// constant gradient, lr 1e-4: every update is some 1e-4, under half a step, so rounding to nearest
// keeps every weight at 1 forever, while the fp32 update moves it by 64 x 1e-4 in 64 steps.
// Stochastically rounded, the weights move on average as the fp32 one does: each store adds noise
// of at most half a step (sd <= 2^-9), so after 64 steps one weight is within some 8 x 2^-9 =
// 0.016 of its mean and the mean of 4096 weights within 0.016 / 64 = 0.00024 (sd) of the fp32
// drift, 0.0064: a bound of 0.0016 is over 6 sd. The same on the CPU twin and the kernel.
TEST_CASE("stochastic rounding keeps AdamW updates below half a bf16 step, which rounding to nearest loses",
          "[kernels][bf16]") {
    const size_t n = 4096;
    const int steps = 64;
    const float lr = 1e-4f;
    std::vector<bf16> ones = to_bf16(std::vector<float>(n, 1.0f)), zeros = to_bf16(std::vector<float>(n, 0.0f));
    std::vector<float> p_f(n, 1.0f), m_f(n, 0.0f), v_f(n, 0.0f), g_f(n, 0.5f);
    std::vector<bf16> grads = to_bf16(g_f);
    for (int t = 1; t <= steps; t++) {
        adamw_update_cpu(p_f.data(), m_f.data(), v_f.data(), NO_PARAMS_COPY, g_f.data(), n, lr, ADAM_BETA1,
                         ADAM_BETA2, ADAM_EPS, 0.0f, t, 1.0f, ROUND_NEAREST, 0, 0);
    }
    const double fp32_drift = 1.0 - p_f[0];
    REQUIRE(fabs(fp32_drift - steps * lr) < 0.1 * steps * lr);
    auto mean = [](const std::vector<bf16>& values) {
        double sum = 0;
        for (bf16 x : values) sum += __bfloat162float(x);
        return sum / values.size();
    };
    for (Rounding rounding : {ROUND_NEAREST, ROUND_STOCHASTIC}) {
        INFO((rounding == ROUND_STOCHASTIC ? "stochastic" : "nearest"));
        std::vector<bf16> p = ones, m = zeros, v = zeros;
        DeviceArray<bf16> d_p(ones), d_m(zeros), d_v(zeros), d_g(grads);
        for (int t = 1; t <= steps; t++) {
            adamw_update_cpu(p.data(), m.data(), v.data(), NO_PARAMS_COPY, grads.data(), n, lr, ADAM_BETA1, ADAM_BETA2,
                             ADAM_EPS, 0.0f, t, 1.0f, rounding, 5, 0);
            adamw_update(d_p.ptr, d_m.ptr, d_v.ptr, NO_PARAMS_COPY, d_g.ptr, n, lr, ADAM_BETA1, ADAM_BETA2, ADAM_EPS,
                         0.0f, t, 1.0f, rounding, 5, 0, 0);
        }
        for (const std::vector<bf16>& result : {p, d_p.to_host()}) {
            double drift = 1.0 - mean(result);
            INFO("mean drift " << drift << ", fp32 " << fp32_drift);
            if (rounding == ROUND_NEAREST) {
                CHECK(drift == 0.0);
            } else {
                CHECK(fabs(drift - fp32_drift) < 0.0016);
            }
        }
    }
}

// fp32 parameters and moments with bf16 gradients: a bf16 gradient is exact in float, so this is
// the fp32 update of those values (fp32 tolerance).
TEST_CASE("adamw (P = float, G = bf16) kernel matches the CPU", "[kernels][bf16]") {
    for (size_t n : {1, 257, 5000}) {
        for (int t : {1, 7}) {
            INFO("n " << n << " t " << t);
            auto params = random_floats(n, 71), m = random_floats(n, 72, 0.1f), v = random_second_moment(n, 73);
            auto grads = random_bf16(n, 74);
            std::vector<float> params_cpu = params, m_cpu = m, v_cpu = v;
            adamw_update_cpu(params_cpu.data(), m_cpu.data(), v_cpu.data(), NO_PARAMS_COPY, grads.data(), n, ADAM_LR,
                             ADAM_BETA1, ADAM_BETA2, ADAM_EPS, ADAM_DECAY, t, ADAM_GRAD_SCALE, ROUND_NEAREST, 0, 0);
            // the same as fp32 gradients holding the same values, bit for bit
            std::vector<float> params_f = params, m_f = m, v_f = v, grads_f = to_floats(grads);
            adamw_update_cpu(params_f.data(), m_f.data(), v_f.data(), NO_PARAMS_COPY, grads_f.data(), n, ADAM_LR,
                             ADAM_BETA1, ADAM_BETA2, ADAM_EPS, ADAM_DECAY, t, ADAM_GRAD_SCALE, ROUND_NEAREST, 0, 0);
            CHECK(memcmp(params_f.data(), params_cpu.data(), n * sizeof(float)) == 0);
            DeviceArray<float> d_params(params), d_m(m), d_v(v);
            DeviceArray<bf16> d_grads(grads);
            adamw_update(d_params.ptr, d_m.ptr, d_v.ptr, NO_PARAMS_COPY, d_grads.ptr, n, ADAM_LR, ADAM_BETA1,
                         ADAM_BETA2, ADAM_EPS, ADAM_DECAY, t, ADAM_GRAD_SCALE, ROUND_NEAREST, 0, 0, 0);
            check_close(d_params.to_host(), params_cpu, "adamw params");
            check_close(d_m.to_host(), m_cpu, "adamw m");
            check_close(d_v.to_host(), v_cpu, "adamw v");
        }
    }
}

// --precision bf16: the update writes the bf16 copy of the weights as it goes. The copy must be
// what cast_copy makes of the updated fp32 weights, bit for bit, on the CPU and on the GPU (from
// each side's own weights), both down the vector kernel and past it (n 257: 64 chunks of 4 and one
// element).
TEST_CASE("adamw writes the bf16 weight copy that cast_copy would make, bit for bit", "[kernels][bf16]") {
    for (size_t n : {1, 257, 5000}) {
        INFO("n " << n);
        auto params = random_floats(n, 81), m = random_floats(n, 82, 0.1f), v = random_second_moment(n, 83),
             grads = random_floats(n, 84);
        std::vector<float> params_cpu = params, m_cpu = m, v_cpu = v;
        std::vector<bf16> copy_cpu(n), expected_cpu(n);
        adamw_update_cpu(params_cpu.data(), m_cpu.data(), v_cpu.data(), copy_cpu.data(), grads.data(), n, ADAM_LR,
                         ADAM_BETA1, ADAM_BETA2, ADAM_EPS, ADAM_DECAY, 3, ADAM_GRAD_SCALE, ROUND_NEAREST, 0, 0);
        cast_copy_cpu(expected_cpu.data(), params_cpu.data(), n);
        CHECK(memcmp(copy_cpu.data(), expected_cpu.data(), n * sizeof(bf16)) == 0);

        DeviceArray<float> d_params(params), d_m(m), d_v(v), d_grads(grads);
        DeviceArray<bf16> d_copy(n);   // poisoned: an element left unwritten fails
        adamw_update(d_params.ptr, d_m.ptr, d_v.ptr, d_copy.ptr, d_grads.ptr, n, ADAM_LR, ADAM_BETA1, ADAM_BETA2,
                     ADAM_EPS, ADAM_DECAY, 3, ADAM_GRAD_SCALE, ROUND_NEAREST, 0, 0, 0);
        auto params_gpu = d_params.to_host(), copy_gpu_floats = to_floats(d_copy.to_host());
        check_close(params_gpu, params_cpu, "adamw params");
        std::vector<bf16> expected_gpu(n);
        cast_copy_cpu(expected_gpu.data(), params_gpu.data(), n);
        auto expected_gpu_floats = to_floats(expected_gpu);
        CHECK(memcmp(copy_gpu_floats.data(), expected_gpu_floats.data(), n * sizeof(float)) == 0);
    }
}

// ---- cast_copy

// Rounding is exact arithmetic on bits, the same everywhere: kernel, CPU twin and
// __float2bfloat16_rn must agree bit for bit (NaN: any NaN, its payload is not specified).
TEST_CASE("cast_copy float -> bf16 rounds to nearest even, bit for bit", "[kernels][bf16]") {
    // values whose rounding is known: ties go to the even neighbour; past the largest bf16 is inf
    struct Known {
        uint32_t input;
        uint16_t expected;
    };
    const Known known[] = {
        {0x3F800000u, 0x3F80},   // 1
        {0x3F808000u, 0x3F80},   // 1 + 2^-8: tie between 1 and 1 + 2^-7, even is 1
        {0x3F818000u, 0x3F82},   // 1 + 3 * 2^-8: tie between 1 + 2^-7 and 1 + 2^-6, even is 1 + 2^-6
        {0x3F808001u, 0x3F81},   // just above the tie: up
        {0x3F807FFFu, 0x3F80},   // just below the tie: down
        {0xBF818000u, 0xBF82},   // -(1 + 3 * 2^-8): ties to even on the negative side too
        {0x00000000u, 0x0000},   // +0
        {0x80000000u, 0x8000},   // -0
        {0x7F7FFFFFu, 0x7F80},   // FLT_MAX: rounds past the largest bf16, to +inf
        {0x7F7F0000u, 0x7F7F},   // the largest bf16, exact
        {0x7F800000u, 0x7F80},   // +inf
        {0xFF800000u, 0xFF80},   // -inf
        {0x00008000u, 0x0000},   // subnormal 2^-134, tie between 0 and 2^-133: even is 0
        {0x00018000u, 0x0002},   // subnormal 3 * 2^-134: tie between 2^-133 and 2^-132, even is 2^-132
    };
    for (size_t n : {1, 255, 257, 100003}) {
        INFO("n " << n);
        auto inp = random_floats(n, 81);
        for (size_t i = 0; i < n; i++) inp[i] = ldexp(inp[i], (int)(i % 61) - 30);   // many binades
        for (size_t i = 0; i < n && i < sizeof(known) / sizeof(known[0]); i++) inp[i] = float_from_bits(known[i].input);
        if (n > 20) inp[n - 1] = NAN;
        std::vector<bf16> out_cpu(n);
        cast_copy_cpu(out_cpu.data(), inp.data(), n);
        DeviceArray<float> d_inp(inp);
        DeviceArray<bf16> d_out(n);
        cast_copy(d_out.ptr, d_inp.ptr, n, 0);
        auto out_gpu = d_out.to_host();
        for (size_t i = 0; i < n; i++) {
            if (std::isnan(inp[i])) {
                CHECK(std::isnan(__bfloat162float(out_cpu[i])));
                CHECK(std::isnan(__bfloat162float(out_gpu[i])));
                continue;
            }
            uint16_t expected = bf16_bits(__float2bfloat16_rn(inp[i]));
            if (i < sizeof(known) / sizeof(known[0])) REQUIRE(expected == known[i].expected);
            if (bf16_bits(out_cpu[i]) != expected || bf16_bits(out_gpu[i]) != expected) {
                INFO("element " << i << ": input bits " << float_bits(inp[i]) << ", expected " << expected << ", cpu "
                                << bf16_bits(out_cpu[i]) << ", gpu " << bf16_bits(out_gpu[i]));
                REQUIRE(bf16_bits(out_cpu[i]) == expected);
                REQUIRE(bf16_bits(out_gpu[i]) == expected);
            }
        }
    }
}

TEST_CASE("cast_copy bf16 -> float is exact", "[kernels][bf16]") {
    for (size_t n : {1, 257, 5000}) {
        INFO("n " << n);
        auto inp = random_bf16(n, 82);
        std::vector<float> out_cpu(n);
        cast_copy_cpu(out_cpu.data(), inp.data(), n);
        DeviceArray<bf16> d_inp(inp);
        DeviceArray<float> d_out(n);
        cast_copy(d_out.ptr, d_inp.ptr, n, 0);
        auto expected = to_floats(inp);
        CHECK(memcmp(out_cpu.data(), expected.data(), n * sizeof(float)) == 0);
        auto out_gpu = d_out.to_host();
        CHECK(memcmp(out_gpu.data(), expected.data(), n * sizeof(float)) == 0);
    }
}

// ---- global norm

TEST_CASE("global norm of bf16 gradients: kernel matches the CPU", "[kernels][bf16]") {
    for (size_t n : {1, 1000, 1003, 300000}) {   // fewer elements than threads, a partial last vector, many per thread
        INFO("n " << n);
        auto grads = random_bf16(n, 91);
        double expected = global_norm_cpu(grads.data(), n);
        // bf16 values and their squares are exact in float and double: the same sum as fp32 gradients holding them
        auto grads_f = to_floats(grads);
        CHECK(expected == global_norm_cpu(grads_f.data(), n));
        DeviceArray<bf16> d_grads(grads);
        DeviceArray<float> d_out(1), d_partials(GLOBAL_NORM_BLOCKS);
        global_norm_squared(d_out.ptr, d_partials.ptr, d_grads.ptr, n, 0);
        float norm_squared = d_out.to_host()[0];
        CHECK(fabs(sqrt(norm_squared) - expected) / expected < 1e-5);   // float partial sums of ~1000 terms each
    }
}
