/*
Finite-difference check of the CPU backend's gradients, in double precision.

This file is compiled with -DMIXLN_REAL_DOUBLE (Makefile: build/test_fd), which makes the whole
CPU reference compute in double. A central difference (L(w + h) - L(w - h)) / 2h then has a
truncation error of O(h^2) ~ 1e-12 and a rounding error of ~1e-16 / h ~ 1e-11 (relative), so it
checks the analytic backward pass to ~1e-8, far tighter than the fp32 parity tests can, and
independently of PyTorch.
*/
#include <catch2/catch.hpp>

#include <cmath>
#include <string>
#include <vector>

#include "../model.h"

static_assert(sizeof(real) == sizeof(double), "build this test with -DMIXLN_REAL_DOUBLE");

// A tiny model with sizes that are not multiples of anything, and weights large enough that
// every nonlinearity (softmax, SiLU, the norms) works away from its linear regime.
static void check_gradients(const char* norm_layers, NormType norm_type = NORM_RMSNORM) {
    ModelConfig c;
    c.vocab_size = 11;
    c.channels = 12;
    c.num_layers = 3;
    c.num_heads = 3;      // head size 4
    c.ffn_channels = 10;
    c.max_seq_len = 5;
    c.norm_layers = parse_norm_layers(norm_layers, "test");
    c.norm_type = norm_type;
    const int B = 2, T = 5;
    Model model;
    model_build(&model, c, B, T);
    real* params = (real*)model.params_memory;   // (num_parameters) the CPU model's weights, in double here
    uint64_t state = 42 + std::string(norm_layers).size();
    fill_normal(params, model.num_parameters, 0.5f, &state);
    // norm weights around 1, so that a norm weight used wrongly cannot hide behind w = 1
    for (const NamedTensor& t : model_named_tensors(c)) {
        if (t.shape.size() == 1) {
            for (int64_t i = 0; i < t.shape[0]; i++) params[t.offset + i] = 1.0 + 0.5 * params[t.offset + i];
        }
    }
    std::vector<int> inputs(B * T), targets(B * T);
    for (int i = 0; i < B * T; i++) {
        inputs[i] = (int)(random_u64(&state) % c.vocab_size);
        targets[i] = (int)(random_u64(&state) % c.vocab_size);
    }

    model_forward(&model, inputs.data(), targets.data());
    model_zero_grad(&model);
    model_backward(&model);

    const double h = 3e-4;
    // central difference of the loss along element i with step size step
    auto central_difference = [&](size_t i, double step) {
        double saved = params[i];
        params[i] = saved + step;
        model_forward(&model, inputs.data(), targets.data());
        double loss_plus = model.mean_loss;
        params[i] = saved - step;
        model_forward(&model, inputs.data(), targets.data());
        double loss_minus = model.mean_loss;
        params[i] = saved;
        return (loss_plus - loss_minus) / (2 * step);
    };
    double worst = 0;
    for (const NamedTensor& t : model_named_tensors(c)) {
        size_t n = 1;
        for (int64_t d : t.shape) n *= (size_t)d;
        // a few elements of every tensor, chosen at random
        for (int sample = 0; sample < 4; sample++) {
            size_t i = t.offset + random_u64(&state) % n;
            double numeric = (4 * central_difference(i, h / 2) - central_difference(i, h)) / 3;
            double analytic = ((real*)model.grads_memory)[i];
            // relative to the gradient's size, with a floor for elements whose gradient is ~0
            double error = fabs(numeric - analytic) / std::max(fabs(analytic), 1e-3);
            worst = std::max(worst, error);
            INFO(t.name << "[" << i - t.offset << "]: analytic " << analytic << ", numeric " << numeric);
            CHECK(error < 1e-7);   // 25x above the measured 4e-9 (see the top of the file)
        }
    }
    WARN(norm_layers << " (" << norm_type_name(norm_type) << "): worst finite-difference error " << worst);
    model_free(&model);
}

TEST_CASE("Pre-LN gradients match finite differences in fp64", "[fd]") { check_gradients("pre,pre,pre"); }
TEST_CASE("Mix-LN (1 of 3 Post-LN) gradients match finite differences in fp64", "[fd]") { check_gradients("post,pre,pre"); }
TEST_CASE("Post-LN gradients match finite differences in fp64", "[fd]") { check_gradients("post,post,post"); }
TEST_CASE("Peri-LN gradients match finite differences in fp64", "[fd]") { check_gradients("peri,peri,peri"); }
TEST_CASE("DeepNorm gradients match finite differences in fp64", "[fd]") { check_gradients("deepnorm,deepnorm,deepnorm"); }
TEST_CASE("LayerNorm Scaling gradients match finite differences in fp64", "[fd]") { check_gradients("lns,lns,lns"); }
TEST_CASE("HybridNorm gradients match finite differences in fp64", "[fd]") {
    check_gradients("hybrid,hybrid,hybrid");
    check_gradients("pre,hybrid,post");   // a pre layer feeding a hybrid one, a hybrid feeding a post one
    check_gradients("hybrid,peri,hybrid", NORM_LAYERNORM);
}
TEST_CASE("HybridNorm* (preqkv, then hybrid) gradients match finite differences in fp64", "[fd]") {
    check_gradients("preqkv,hybrid,hybrid");
    check_gradients("hybrid,preqkv,pre", NORM_LAYERNORM);   // preqkv after a hybrid layer, before a pre one
}
TEST_CASE("Mixed placements with LayerNorm match finite differences in fp64", "[fd]") {
    check_gradients("peri,deepnorm,lns", NORM_LAYERNORM);
    check_gradients("post,pre,peri", NORM_LAYERNORM);
}
