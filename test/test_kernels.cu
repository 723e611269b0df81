/*
Every CUDA kernel against its CPU twin, on fresh random inputs at several shapes (including ones
that are not multiples of the block size), with outputs poisoned (NaN) beforehand so that an
element the kernel never writes fails the comparison.

This one source is built twice:
  - build/test_emu: g++ -DMIXLN_CUDA_EMULATION, the kernels run in the CPU emulation of CUDA
    (test/emu/cuda_emu.h); part of `make test`, so CI checks the kernels' logic on every change;
  - build/test_gpu: nvcc, the kernels run on a real GPU (dev/device_check.sh). Without a GPU it
    says so and runs nothing (see test_gpu_main.cu).
The matmul (cuBLASLt) cannot run in emulation; the README's testing section lists what is
checked only on a GPU.
*/
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <vector>

#include "../model.h"
#include "../layers/layernorm.cuh"
#include "kernel_test_util.h"

// ---- tests, one per layer

TEST_CASE("residual_forward kernel matches the CPU", "[kernels]") {
    for (size_t n : {1, 255, 257, 1000}) {   // around one 256-thread block
        INFO("n " << n);
        auto a = random_floats(n, 1), b = random_floats(n, 2);
        std::vector<float> expected(n);
        residual_forward_cpu(expected.data(), a.data(), b.data(), n);
        DeviceArray<float> da(a), db(b), out(n);
        residual_forward(out.ptr, da.ptr, db.ptr, n, 0);
        check_close(out.to_host(), expected, "residual");
    }
}

TEST_CASE("scale_forward kernel matches the CPU, in place included", "[kernels]") {
    for (size_t n : {1, 255, 257, 1000}) {   // around one 256-thread block
        INFO("n " << n);
        auto inp = random_floats(n, 37);
        const float scale = 0.57735027f;   // 1/sqrt(3): LayerNorm Scaling's factor for layer 2
        std::vector<float> expected(n);
        scale_forward_cpu(expected.data(), inp.data(), scale, n);
        DeviceArray<float> d_inp(inp), out(n);
        scale_forward(out.ptr, d_inp.ptr, scale, n, 0);
        check_close(out.to_host(), expected, "scale");
        scale_forward(d_inp.ptr, d_inp.ptr, scale, n, 0);   // out aliasing inp, as on a gradient
        check_close(d_inp.to_host(), expected, "scale in place");
    }
}

TEST_CASE("residual_scaled_forward kernel matches the CPU, in place included", "[kernels]") {
    for (size_t n : {1, 255, 257, 1000}) {
        INFO("n " << n);
        auto x = random_floats(n, 38), b = random_floats(n, 39);
        const float x_scale = 2.2134f;   // DeepNorm's a = (2N)^(1/4) for a 12-layer encoder
        std::vector<float> expected(n);
        residual_scaled_forward_cpu(expected.data(), x.data(), x_scale, b.data(), n);
        DeviceArray<float> dx(x), db(b), out(n), dx_in_place(x), db_in_place(b);
        residual_scaled_forward(out.ptr, dx.ptr, x_scale, db.ptr, n, 0);
        check_close(out.to_host(), expected, "residual_scaled");
        // out aliasing x, then out aliasing b
        residual_scaled_forward(dx_in_place.ptr, dx_in_place.ptr, x_scale, db.ptr, n, 0);
        check_close(dx_in_place.to_host(), expected, "residual_scaled into x");
        residual_scaled_forward(db_in_place.ptr, dx.ptr, x_scale, db_in_place.ptr, n, 0);
        check_close(db_in_place.to_host(), expected, "residual_scaled into b");
    }
}

TEST_CASE("embedding kernels match the CPU, repeated tokens included", "[kernels]") {
    int shapes[][3] = {{1, 1, 1}, {7, 33, 5}, {300, 130, 17}};   // (BT, C, V): few tokens repeat often
    for (auto& s : shapes) {
        int BT = s[0], C = s[1], V = s[2];
        INFO("BT " << BT << " C " << C << " V " << V);
        auto table = random_floats((size_t)V * C, 3), dout = random_floats((size_t)BT * C, 4),
             dtable = random_floats((size_t)V * C, 5);
        auto tokens = random_tokens(BT, V, 6);
        std::vector<float> out_cpu((size_t)BT * C), dtable_cpu = dtable;
        embedding_forward_cpu(out_cpu.data(), tokens.data(), table.data(), BT, C);
        TokenGroups groups(tokens, V);
        embedding_backward_cpu(dtable_cpu.data(), dout.data(), tokens.data(), groups.positions.data(),
                               groups.starts.data(), groups.count, C);
        DeviceArray<float> d_table(table), d_out((size_t)BT * C), d_dout(dout), d_dtable(dtable);
        DeviceArray<int> d_tokens(tokens), d_positions(groups.positions), d_starts(groups.starts);
        embedding_forward(d_out.ptr, d_tokens.ptr, d_table.ptr, BT, C, 0);
        embedding_backward(d_dtable.ptr, d_dout.ptr, d_tokens.ptr, d_positions.ptr, d_starts.ptr, groups.count, C, 0);
        check_close(d_out.to_host(), out_cpu, "embedding forward");
        check_close(d_dtable.to_host(), dtable_cpu, "embedding backward");
    }
}

TEST_CASE("rmsnorm kernels match the CPU", "[kernels]") {
    int shapes[][2] = {{1, 1}, {9, 33}, {130, 300}};   // rows not a multiple of the 8 per block
    for (auto& s : shapes) {
      for (bool accumulate : {true, false}) {
        int N = s[0], C = s[1];
        INFO("N " << N << " C " << C << " accumulate " << accumulate);
        auto inp = random_floats((size_t)N * C, 7), weight = random_floats(C, 8), dout = random_floats((size_t)N * C, 9);
        // dinp accumulates from known values, or is written over poison that must not be read
        auto dinp = accumulate ? random_floats((size_t)N * C, 10) : std::vector<float>((size_t)N * C, NAN);
        auto dweight = random_floats(C, 11);   // accumulates
        std::vector<float> out_cpu((size_t)N * C), rstd_cpu(N), dinp_cpu = dinp, dweight_cpu = dweight;
        rmsnorm_forward_cpu(out_cpu.data(), rstd_cpu.data(), inp.data(), weight.data(), N, C, C, 1e-6f);
        rmsnorm_backward_cpu(dinp_cpu.data(), dweight_cpu.data(), (float*)nullptr, dout.data(), inp.data(), weight.data(),
                             rstd_cpu.data(), N, C, C, accumulate);   // the CPU needs no scratch
        DeviceArray<float> d_inp(inp), d_weight(weight), d_dout(dout), d_out((size_t)N * C), d_rstd(N), d_dinp(dinp),
            d_dweight(dweight), d_scratch((size_t)RMSNORM_PARTIAL_BLOCKS * C);
        rmsnorm_forward(d_out.ptr, d_rstd.ptr, d_inp.ptr, d_weight.ptr, N, C, C, 1e-6f, 0);
        rmsnorm_backward(d_dinp.ptr, d_dweight.ptr, d_scratch.ptr, d_dout.ptr, d_inp.ptr, d_weight.ptr, d_rstd.ptr, N, C, C,
                         accumulate, 0);
        check_close(d_out.to_host(), out_cpu, "rmsnorm out");
        check_close(d_rstd.to_host(), rstd_cpu, "rmsnorm rstd");
        // at C 1 the written dinp is 0 but for rounding (xhat = +-1 cancels g): measured against
        // the size of the terms, rstd * dout * weight
        double terms = 0.0;
        for (int i = 0; i < N; i++)
            for (int c = 0; c < C; c++)
                terms = std::max(terms, fabs((double)rstd_cpu[i] * dout[(size_t)i * C + c] * weight[c]));
        check_close(d_dinp.to_host(), dinp_cpu, "rmsnorm dinp", 1e-5, terms);
        check_close(d_dweight.to_host(), dweight_cpu, "rmsnorm dweight");
      }
    }
}

TEST_CASE("residual_rmsnorm_forward kernel matches the CPU, in place included", "[kernels]") {
    // (N, C): one element; rows not a multiple of the 8 per block and C not of the 32 lanes; C 384,
    // the width of a small model
    int shapes[][2] = {{1, 1}, {37, 67}, {130, 384}};
    for (auto& s : shapes) {
        for (float x_scale : {1.0f, 1.7f}) {   // a plain residual add, and DeepNorm's a for L = 4 (8^(1/4) = 1.68)
            int N = s[0], C = s[1];
            INFO("N " << N << " C " << C << " x_scale " << x_scale);
            auto x = random_floats((size_t)N * C, 47), branch = random_floats((size_t)N * C, 48), weight = random_floats(C, 49);
            std::vector<float> sum_cpu((size_t)N * C), out_cpu((size_t)N * C), rstd_cpu(N);
            residual_rmsnorm_forward_cpu(sum_cpu.data(), out_cpu.data(), rstd_cpu.data(), x.data(), x_scale, branch.data(),
                                         weight.data(), N, C, 1e-6f);
            // outputs poisoned (NaN) by DeviceArray(count); then sum aliasing x, and sum aliasing branch
            DeviceArray<float> d_x(x), d_branch(branch), d_weight(weight), d_sum((size_t)N * C), d_out((size_t)N * C),
                d_rstd(N);
            residual_rmsnorm_forward(d_sum.ptr, d_out.ptr, d_rstd.ptr, d_x.ptr, x_scale, d_branch.ptr, d_weight.ptr, N, C,
                                     1e-6f, 0);
            check_close(d_sum.to_host(), sum_cpu, "residual_rmsnorm sum");
            check_close(d_out.to_host(), out_cpu, "residual_rmsnorm out");
            check_close(d_rstd.to_host(), rstd_cpu, "residual_rmsnorm rstd");
            DeviceArray<float> d_x_in_place(x), d_out_x((size_t)N * C), d_rstd_x(N);
            residual_rmsnorm_forward(d_x_in_place.ptr, d_out_x.ptr, d_rstd_x.ptr, d_x_in_place.ptr, x_scale, d_branch.ptr,
                                     d_weight.ptr, N, C, 1e-6f, 0);
            check_close(d_x_in_place.to_host(), sum_cpu, "residual_rmsnorm sum into x");
            check_close(d_out_x.to_host(), out_cpu, "residual_rmsnorm out, sum into x");
            check_close(d_rstd_x.to_host(), rstd_cpu, "residual_rmsnorm rstd, sum into x");
            DeviceArray<float> d_branch_in_place(branch), d_out_b((size_t)N * C), d_rstd_b(N);
            residual_rmsnorm_forward(d_branch_in_place.ptr, d_out_b.ptr, d_rstd_b.ptr, d_x.ptr, x_scale,
                                     d_branch_in_place.ptr, d_weight.ptr, N, C, 1e-6f, 0);
            check_close(d_branch_in_place.to_host(), sum_cpu, "residual_rmsnorm sum into branch");
            check_close(d_out_b.to_host(), out_cpu, "residual_rmsnorm out, sum into branch");
            check_close(d_rstd_b.to_host(), rstd_cpu, "residual_rmsnorm rstd, sum into branch");
        }
    }
}

TEST_CASE("layernorm kernels match the CPU", "[kernels]") {
    // (N, C): one element (zero variance: out is the bias, the exact dinp is 0); rows not a multiple of
    // the 8 per block and C not of the 32 lanes; C 384, the width of a small model
    int shapes[][2] = {{1, 1}, {37, 67}, {130, 384}};
    for (auto& s : shapes) {
      for (bool accumulate : {true, false}) {
        int N = s[0], C = s[1];
        INFO("N " << N << " C " << C << " accumulate " << accumulate);
        auto inp = random_floats((size_t)N * C, 40), weight = random_floats(C, 41), bias = random_floats(C, 42),
             dout = random_floats((size_t)N * C, 43);
        for (auto& x : inp) x += 10.0f;   // mean 10, spread 1: the mean subtraction matters
        // backward accumulates: start the gradients from known non-zero values (dinp: or poison,
        // written over without being read)
        auto dinp = accumulate ? random_floats((size_t)N * C, 44) : std::vector<float>((size_t)N * C, NAN);
        auto dweight = random_floats(C, 45), dbias = random_floats(C, 46);
        std::vector<float> out_cpu((size_t)N * C), mean_cpu(N), rstd_cpu(N), dinp_cpu = dinp, dweight_cpu = dweight,
                           dbias_cpu = dbias;
        layernorm_forward_cpu(out_cpu.data(), mean_cpu.data(), rstd_cpu.data(), inp.data(), weight.data(), bias.data(),
                              N, C, C, 1e-5f);
        layernorm_backward_cpu(dinp_cpu.data(), dweight_cpu.data(), dbias_cpu.data(), dout.data(), inp.data(),
                               weight.data(), mean_cpu.data(), rstd_cpu.data(), N, C, C, accumulate);
        DeviceArray<float> d_inp(inp), d_weight(weight), d_bias(bias), d_dout(dout), d_out((size_t)N * C), d_mean(N),
            d_rstd(N), d_dinp(dinp), d_dweight(dweight), d_dbias(dbias);
        layernorm_forward(d_out.ptr, d_mean.ptr, d_rstd.ptr, d_inp.ptr, d_weight.ptr, d_bias.ptr, N, C, C, 1e-5f, 0);
        layernorm_backward(d_dinp.ptr, d_dweight.ptr, d_dbias.ptr, d_dout.ptr, d_inp.ptr, d_weight.ptr, d_mean.ptr,
                           d_rstd.ptr, N, C, C, accumulate, 0);
        check_close(d_out.to_host(), out_cpu, "layernorm out");
        check_close(d_mean.to_host(), mean_cpu, "layernorm mean");
        // rstd to 1e-6: the two-pass variance gets 1e-7 here, a one-pass mean(x^2) - mean^2 1e-5
        check_close(d_rstd.to_host(), rstd_cpu, "layernorm rstd", 1e-6);
        check_close(d_dinp.to_host(), dinp_cpu, "layernorm dinp");
        check_close(d_dweight.to_host(), dweight_cpu, "layernorm dweight");
        check_close(d_dbias.to_host(), dbias_cpu, "layernorm dbias");
      }
    }
}

TEST_CASE("rope kernels match the CPU", "[kernels]") {
    // (B, T, NH, hs): hs 2 and 6 take the one-pair kernel, hs 32 the vector kernel (hs a multiple
    // of twice its 4-float chunk)
    int shapes[][4] = {{1, 1, 1, 2}, {2, 7, 3, 6}, {3, 17, 4, 32}};
    for (auto& s : shapes) {
        int B = s[0], T = s[1], NH = s[2], hs = s[3];
        INFO("B " << B << " T " << T << " NH " << NH << " hs " << hs);
        std::vector<float> cos_table((size_t)T * hs / 2), sin_table((size_t)T * hs / 2);
        rope_tables_cpu(cos_table.data(), sin_table.data(), T, hs, 10000.0f);
        auto qkv = random_floats((size_t)B * T * 3 * NH * hs, 12);
        std::vector<float> forward_cpu = qkv, backward_cpu = qkv;
        rope_forward_cpu(forward_cpu.data(), cos_table.data(), sin_table.data(), B, T, NH, hs);
        rope_backward_cpu(backward_cpu.data(), cos_table.data(), sin_table.data(), B, T, NH, hs);
        DeviceArray<float> d_cos(cos_table), d_sin(sin_table), d_forward(qkv), d_backward(qkv);
        rope_forward(d_forward.ptr, d_cos.ptr, d_sin.ptr, B, T, NH, hs, 0);
        rope_backward(d_backward.ptr, d_cos.ptr, d_sin.ptr, B, T, NH, hs, 0);
        check_close(d_forward.to_host(), forward_cpu, "rope forward");
        check_close(d_backward.to_host(), backward_cpu, "rope backward");
    }
}

TEST_CASE("swiglu kernels match the CPU", "[kernels]") {
    // (N, F): F 1, 33 and 2061 take the fallback kernels (2061: more than one 2048-element pass
    // of a 256-thread block's chunks of 8), F 300 the vector kernels (a multiple of their 4-float chunk)
    int shapes[][2] = {{1, 1}, {7, 33}, {65, 300}, {3, 2061}};
    for (auto& s : shapes) {
        int N = s[0], F = s[1];
        INFO("N " << N << " F " << F);
        auto gate_up = random_floats((size_t)N * 2 * F, 13), dout = random_floats((size_t)N * F, 14);
        // backward writes dgate_up without reading it: NaN before, on both sides, shows a read or a gap
        std::vector<float> dgate_up((size_t)N * 2 * F, NAN);
        std::vector<float> out_cpu((size_t)N * F), dgate_up_cpu = dgate_up;
        swiglu_forward_cpu(out_cpu.data(), gate_up.data(), N, F);
        swiglu_backward_cpu(dgate_up_cpu.data(), dout.data(), gate_up.data(), N, F);
        DeviceArray<float> d_gate_up(gate_up), d_dout(dout), d_out((size_t)N * F), d_dgate_up(dgate_up);
        swiglu_forward(d_out.ptr, d_gate_up.ptr, N, F, 0);
        swiglu_backward(d_dgate_up.ptr, d_dout.ptr, d_gate_up.ptr, N, F, 0);
        check_close(d_out.to_host(), out_cpu, "swiglu forward");
        check_close(d_dgate_up.to_host(), dgate_up_cpu, "swiglu backward");
    }
}

TEST_CASE("crossentropy kernels match the CPU", "[kernels]") {
    // (N, V): V below, around and above the 256-thread block, and over its 8-element chunks (2048)
    int shapes[][2] = {{1, 2}, {5, 97}, {33, 1000}, {3, 5000}};
    for (auto& s : shapes) {
        int N = s[0], V = s[1];
        INFO("N " << N << " V " << V);
        auto logits = random_floats((size_t)N * V, 16, 3.0f);
        auto targets = random_tokens(N, V, 17);
        for (int i = 1; i < N; i += 3) targets[i] = IGNORED_TARGET;   // padding's targets: loss 0, zero gradient
        std::vector<float> losses_cpu(N), stats_cpu(2 * N), dlogits_cpu((size_t)N * V);
        crossentropy_forward_cpu(losses_cpu.data(), stats_cpu.data(), logits.data(), targets.data(), N, V);
        crossentropy_backward_cpu(dlogits_cpu.data(), logits.data(), stats_cpu.data(), targets.data(), 1.0f / N, N, V);
        DeviceArray<float> d_logits(logits), d_losses(N), d_stats(2 * N);
        DeviceArray<int> d_targets(targets);
        crossentropy_forward(d_losses.ptr, d_stats.ptr, d_logits.ptr, d_targets.ptr, N, V, 0);
        check_close(d_losses.to_host(), losses_cpu, "crossentropy losses");
        check_close(d_stats.to_host(), stats_cpu, "crossentropy stats (max, sum)");
        // in place, as the model uses it: the logits become their gradient, from the kernel's stats
        crossentropy_backward(d_logits.ptr, d_logits.ptr, d_stats.ptr, d_targets.ptr, 1.0f / N, N, V, 0);
        check_close(d_logits.to_host(), dlogits_cpu, "crossentropy dlogits");
        // both in one kernel, in place as training runs it: the two kernels' results to the bit
        DeviceArray<float> d_fused(logits), d_fused_losses(N), d_fused_stats(2 * N);
        crossentropy_forward_backward(d_fused.ptr, d_fused_losses.ptr, d_fused_stats.ptr, d_fused.ptr, d_targets.ptr,
                                      1.0f / N, N, V, 0);
        CHECK(d_fused_losses.to_host() == d_losses.to_host());
        CHECK(d_fused_stats.to_host() == d_stats.to_host());
        CHECK(d_fused.to_host() == d_logits.to_host());
    }
}

TEST_CASE("adamw kernel matches the CPU", "[kernels]") {
    // the paper's betas and eps, and HybridNorm's betas with a larger eps (--beta1/--beta2/--adam-eps)
    const float settings[2][3] = {{0.9f, 0.999f, 1e-8f}, {0.8f, 0.95f, 1e-6f}};
    for (const auto& setting : settings)
    for (size_t n : {1, 257, 5000}) {
        for (int t : {1, 7}) {   // the first step and a later one: bias corrections differ
            const float beta1 = setting[0], beta2 = setting[1], eps = setting[2];
            INFO("n " << n << " t " << t << " beta1 " << beta1 << " beta2 " << beta2 << " eps " << eps);
            auto params = random_floats(n, 18), m = random_floats(n, 19, 0.1f), grads = random_floats(n, 21);
            auto v = random_floats(n, 20, 0.1f);
            for (auto& x : v) x = x * x;   // a second moment is non-negative
            std::vector<float> params_cpu = params, m_cpu = m, v_cpu = v;
            adamw_update_cpu(params_cpu.data(), m_cpu.data(), v_cpu.data(), NO_PARAMS_COPY, grads.data(), n, 1e-2f, beta1,
                             beta2, eps, 0.1f, t, 0.5f, ROUND_NEAREST, 0, 0);
            DeviceArray<float> d_params(params), d_m(m), d_v(v), d_grads(grads);
            adamw_update(d_params.ptr, d_m.ptr, d_v.ptr, NO_PARAMS_COPY, d_grads.ptr, n, 1e-2f, beta1, beta2, eps, 0.1f,
                         t, 0.5f, ROUND_NEAREST, 0, 0, 0);
            check_close(d_params.to_host(), params_cpu, "adamw params");
            check_close(d_m.to_host(), m_cpu, "adamw m");
            check_close(d_v.to_host(), v_cpu, "adamw v");
        }
    }
}

TEST_CASE("global norm kernel matches the CPU", "[kernels]") {
    for (size_t n : {1, 1000, 1003, 300000}) {   // fewer elements than threads, a partial last vector, many per thread
        INFO("n " << n);
        auto grads = random_floats(n, 22);
        double expected = global_norm_cpu(grads.data(), n);
        DeviceArray<float> d_grads(grads), d_out(1), d_partials(GLOBAL_NORM_BLOCKS);
        global_norm_squared(d_out.ptr, d_partials.ptr, d_grads.ptr, n, 0);
        float norm_squared = d_out.to_host()[0];
        CHECK(fabs(sqrt(norm_squared) - expected) / expected < 1e-5);   // float partial sums of ~1000 terms each
    }
}

TEST_CASE("attention kernels match the CPU", "[kernels]") {
    int shapes[][4] = {{1, 1, 1, 2}, {2, 9, 3, 8}, {2, 40, 2, 36}};   // (B, T, NH, hs): T past one warp, hs past 32
    for (auto& s : shapes) {
        int B = s[0], T = s[1], NH = s[2], hs = s[3], C = NH * hs;
        INFO("B " << B << " T " << T << " NH " << NH << " hs " << hs);
        auto qkv = random_floats((size_t)B * T * 3 * C, 23), dout = random_floats((size_t)B * T * C, 24),
             dqkv = std::vector<float>((size_t)B * T * 3 * C, NAN);   // NaN: backward writes it, never reads it
        size_t att_size = (size_t)B * NH * T * T;
        std::vector<float> out_cpu((size_t)B * T * C), att_cpu(att_size), scratch_cpu(att_size), dqkv_cpu = dqkv;
        attention_forward_cpu(out_cpu.data(), att_cpu.data(), qkv.data(), B, T, NH, hs);
        attention_backward_cpu(dqkv_cpu.data(), scratch_cpu.data(), dout.data(), qkv.data(), att_cpu.data(), B, T, NH, hs);
        DeviceArray<float> d_qkv(qkv), d_out((size_t)B * T * C), d_att(att_size), d_scratch(att_size), d_dout(dout),
            d_dqkv(dqkv);
        attention_forward(d_out.ptr, d_att.ptr, d_qkv.ptr, B, T, NH, hs, 0);
        attention_backward(d_dqkv.ptr, d_scratch.ptr, d_dout.ptr, d_qkv.ptr, d_att.ptr, B, T, NH, hs, 0);
        check_close(d_out.to_host(), out_cpu, "attention out");
        check_close(d_att.to_host(), att_cpu, "attention probabilities (zeros above the diagonal included)");
        check_close(d_dqkv.to_host(), dqkv_cpu, "attention dqkv");
    }
}


TEST_CASE("fused attention matches the CPU", "[kernels]") {
    // (B, T, NH, hs) around the 64-query tiles: one row; one partial tile; T 130 = three tiles, the last
    // with 2 rows; hs 8, 36 (not a multiple of 32), 64 (the paper's) and 128 (the largest, the only one
    // using the second float4 of channels per lane)
    int shapes[][4] = {{1, 1, 1, 2}, {2, 9, 3, 8}, {2, 40, 2, 36}, {1, 130, 2, 64}, {1, 70, 1, 128}};
    for (auto& s : shapes) {
        int B = s[0], T = s[1], NH = s[2], hs = s[3], C = NH * hs;
        INFO("B " << B << " T " << T << " NH " << NH << " hs " << hs);
        auto qkv = random_floats((size_t)B * T * 3 * C, 31), dout = random_floats((size_t)B * T * C, 32),
             dqkv = std::vector<float>((size_t)B * T * 3 * C, NAN);   // NaN: backward writes it, never reads it
        size_t att_size = (size_t)B * NH * T * T;
        std::vector<float> out_cpu((size_t)B * T * C), att_cpu(att_size), scratch_cpu(att_size), dqkv_cpu = dqkv;
        attention_forward_cpu(out_cpu.data(), att_cpu.data(), qkv.data(), B, T, NH, hs);
        attention_backward_cpu(dqkv_cpu.data(), scratch_cpu.data(), dout.data(), qkv.data(), att_cpu.data(), B, T, NH, hs);
        auto lse_cpu = attention_lse_reference(qkv, B, T, NH, hs);
        DeviceArray<float> d_qkv(qkv), d_out((size_t)B * T * C), d_lse((size_t)B * NH * T),
            d_scratch((size_t)B * NH * T), d_dout(dout), d_dqkv(dqkv);
        attention_forward_fused(d_out.ptr, d_lse.ptr, d_qkv.ptr, nullptr, nullptr, B, T, NH, hs, 0);
        attention_backward_fused(d_dqkv.ptr, d_scratch.ptr, d_dout.ptr, d_qkv.ptr, d_out.ptr, d_lse.ptr, nullptr, nullptr,
                                 B, T, NH, hs, 0);
        check_close(d_out.to_host(), out_cpu, "fused attention out");
        check_close(d_lse.to_host(), lse_cpu, "fused attention lse");
        check_close(d_dqkv.to_host(), dqkv_cpu, "fused attention dqkv");
    }
}

TEST_CASE("fused attention backward is deterministic", "[kernels]") {
    int B = 2, T = 130, NH = 2, hs = 36, C = NH * hs;   // three query and key tiles, partial channel groups
    auto qkv = random_floats((size_t)B * T * 3 * C, 34), dout = random_floats((size_t)B * T * C, 35),
         dqkv = std::vector<float>((size_t)B * T * 3 * C, NAN);   // NaN: backward writes it, never reads it
    DeviceArray<float> d_qkv(qkv), d_out((size_t)B * T * C), d_lse((size_t)B * NH * T), d_scratch((size_t)B * NH * T),
        d_dout(dout), d_dqkv_first(dqkv), d_dqkv_second(dqkv);
    attention_forward_fused(d_out.ptr, d_lse.ptr, d_qkv.ptr, nullptr, nullptr, B, T, NH, hs, 0);
    attention_backward_fused(d_dqkv_first.ptr, d_scratch.ptr, d_dout.ptr, d_qkv.ptr, d_out.ptr, d_lse.ptr, nullptr,
                             nullptr, B, T, NH, hs, 0);
    attention_backward_fused(d_dqkv_second.ptr, d_scratch.ptr, d_dout.ptr, d_qkv.ptr, d_out.ptr, d_lse.ptr, nullptr,
                             nullptr, B, T, NH, hs, 0);
    auto first = d_dqkv_first.to_host(), second = d_dqkv_second.to_host();
    REQUIRE(first.size() == second.size());
    CHECK(memcmp(first.data(), second.data(), first.size() * sizeof(float)) == 0);   // bitwise, not within a tolerance
}

#ifndef MIXLN_CUDA_EMULATION
// cuBLASLt runs only on a GPU (in emulation the launchers are the CPU twin itself)
TEST_CASE("matmul (cuBLASLt) matches the CPU", "[kernels][gpu-only]") {
    int shapes[][3] = {{1, 1, 1}, {7, 5, 33}, {300, 257, 65}};   // (N, IC, OC)
    for (auto& s : shapes) {
        int N = s[0], IC = s[1], OC = s[2];
        INFO("N " << N << " IC " << IC << " OC " << OC);
        auto inp = random_floats((size_t)N * IC, 26), weight = random_floats((size_t)OC * IC, 27),
             dout = random_floats((size_t)N * OC, 28), dinp = random_floats((size_t)N * IC, 29),
             dweight = random_floats((size_t)OC * IC, 30);
        std::vector<float> out_cpu((size_t)N * OC), dinp_cpu = dinp, dweight_cpu = dweight;
        matmul_forward_cpu(out_cpu.data(), inp.data(), weight.data(), N, IC, OC);
        matmul_backward_cpu(dinp_cpu.data(), dweight_cpu.data(), dout.data(), inp.data(), weight.data(), N, IC, OC, 1.3f, 1.0f);
        DeviceArray<float> d_inp(inp), d_weight(weight), d_dout(dout), d_out((size_t)N * OC), d_dinp(dinp), d_dweight(dweight);
        matmul_forward(d_out.ptr, d_inp.ptr, d_weight.ptr, N, IC, OC, 0);
        matmul_backward(d_dinp.ptr, d_dweight.ptr, d_dout.ptr, d_inp.ptr, d_weight.ptr, N, IC, OC, 1.3f, 1.0f, 0);
        check_close(d_out.to_host(), out_cpu, "matmul forward");
        check_close(d_dinp.to_host(), dinp_cpu, "matmul dinp");
        check_close(d_dweight.to_host(), dweight_cpu, "matmul dweight");
        // scales 0: the gradients written over poison that beta 0 never reads
        std::vector<float> poison_dinp((size_t)N * IC, NAN), poison_dweight((size_t)OC * IC, NAN);
        std::vector<float> dinp_written = poison_dinp, dweight_written = poison_dweight;
        matmul_backward_cpu(dinp_written.data(), dweight_written.data(), dout.data(), inp.data(), weight.data(), N, IC,
                            OC, 0.0f, 0.0f);
        DeviceArray<float> d_dinp_written(poison_dinp), d_dweight_written(poison_dweight);
        matmul_backward(d_dinp_written.ptr, d_dweight_written.ptr, d_dout.ptr, d_inp.ptr, d_weight.ptr, N, IC, OC, 0.0f,
                        0.0f, 0);
        check_close(d_dinp_written.to_host(), dinp_written, "matmul dinp, written");
        check_close(d_dweight_written.to_host(), dweight_written, "matmul dweight, written");
    }
}
#endif

// Says plainly, in the test output, which kernels this build checked and where.
TEST_CASE("kernel coverage report", "[kernels]") {
#ifdef MIXLN_CUDA_EMULATION
    WARN("checked under CPU emulation of CUDA, in fp32 and bf16 (test_kernels_bf16_*.cu): residual, scale, "
         "residual_scaled, embedding, rmsnorm, residual_rmsnorm, layernorm, rope, swiglu, crossentropy, adamw, "
         "cast_copy, global_norm, attention, attention (fused). Checked only on a GPU (build/test_gpu): matmul "
         "(cuBLASLt, fp32 and bf16); in emulation its launchers are the CPU twin, checked against an exact product.");
#else
    WARN("checked on the GPU, in fp32 and bf16: residual, scale, residual_scaled, embedding, rmsnorm, residual_rmsnorm, "
         "layernorm, rope, swiglu, crossentropy, adamw, cast_copy, global_norm, attention, attention (fused), matmul "
         "(cuBLASLt).");
#endif
    SUCCEED();
}
