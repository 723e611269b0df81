/*
CPU kernel microbenchmark: the three kernels that the CPU backend's step time hangs on, timed
alone, so that a change to one of them can be measured without the noise of a whole step.
    - the GEMM (matmul_forward_cpu, then matmul_backward_cpu's two products) at the linear layers'
      shapes of the small config of dev/bench_cpu.py (B8 T128), of LLaMA-71M (B2 T256) and of the
      12 x 128 model of EXPERIMENTS.md (B16 T128), in GFLOP/s (6 N IC OC flops per shape: the three products);
    - AdamW over 71M fp32 parameters, in GB/s (28 bytes moved per parameter: p, m, v and the
      gradient read, p, m, v written);
    - the global gradient norm over 71M fp32 values, in GB/s;
    - the attention (attention_forward_cpu, then attention_backward_cpu) at the shapes of the
      12 x 128 model of EXPERIMENTS.md (B16 T128, 4 heads of 32) and of LLaMA-71M (B2 T256, 8 heads
      of 64), in ms per layer;
    - the RMSNorm backward at both models' rows, in ms;
    - the cross-entropy (loss and logits' gradient) and SwiGLU (forward and backward) at both
      models' shapes, in ms: most of their time is e^x.
Each number is the best of several repetitions (the least disturbed by the rest of the machine),
with OMP_NUM_THREADS threads. The checksum lines let two builds be compared for equal results.

Build and run (repository root):
    make build/bench_cpu_kernels && OMP_NUM_THREADS=2 ./build/bench_cpu_kernels
*/
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

#include "../layers/adamw.cuh"
#include "../layers/attention.cuh"
#include "../layers/crossentropy.cuh"
#include "../layers/global_norm.cuh"
#include "../layers/matmul.cuh"
#include "../layers/rmsnorm.cuh"
#include "../layers/swiglu.cuh"

// milliseconds since start
static double elapsed_ms(std::chrono::steady_clock::time_point start) {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
}

// n values from a fixed linear congruential sequence, uniform in [-scale, scale)
static std::vector<float> fixed_values(size_t n, uint32_t seed, float scale) {
    std::vector<float> values(n);
    uint32_t state = seed;
    for (size_t i = 0; i < n; i++) {
        state = state * 1664525u + 1013904223u;
        values[i] = scale * ((float)(state >> 8) / (float)(1u << 24) * 2.0f - 1.0f);
    }
    return values;
}

int main() {
    // ---- GEMM: (rows N, in IC, out OC) of q/k/v, o, gate/up, down and the LM head
    struct Shape { const char* name; int N, IC, OC; };
    const Shape shapes[] = {
        {"small qkv", 1024, 256, 768},       {"small gate_up", 1024, 256, 1376},
        {"small down", 1024, 688, 256},      {"small lm_head", 1024, 256, 8192},
        {"71m qkv", 512, 512, 1536},         {"71m o", 512, 512, 512},
        {"71m gate_up", 512, 512, 2736},     {"71m down", 512, 1368, 512},
        {"71m lm_head", 512, 512, 32000},
        {"12x128 qkv", 2048, 128, 384},      {"12x128 o", 2048, 128, 128},
        {"12x128 gate_up", 2048, 128, 688},  {"12x128 down", 2048, 344, 128},
        {"12x128 lm_head", 2048, 128, 4096},
    };
    printf("GEMM: forward + both backward products, best of 5\n");
    double total_ms = 0, total_flops = 0, checksum = 0;
    for (const Shape& s : shapes) {
        std::vector<float> inp = fixed_values((size_t)s.N * s.IC, 1, 1.0f);
        std::vector<float> weight = fixed_values((size_t)s.OC * s.IC, 2, 0.05f);
        std::vector<float> dout = fixed_values((size_t)s.N * s.OC, 3, 1.0f);
        std::vector<float> out((size_t)s.N * s.OC), dinp((size_t)s.N * s.IC), dweight((size_t)s.OC * s.IC);
        double best = 1e30, best_forward = 1e30, best_backward = 1e30;
        for (int repeat = 0; repeat < 5; repeat++) {
            auto start = std::chrono::steady_clock::now();
            matmul_forward_cpu(out.data(), inp.data(), weight.data(), s.N, s.IC, s.OC);
            double forward_ms = elapsed_ms(start);
            matmul_backward_cpu(dinp.data(), dweight.data(), dout.data(), inp.data(), weight.data(), s.N, s.IC, s.OC,
                                0.0f, 0.0f);
            double ms = elapsed_ms(start);
            best = std::min(best, ms);
            best_forward = std::min(best_forward, forward_ms);
            best_backward = std::min(best_backward, ms - forward_ms);
        }
        double flops = 6.0 * s.N * s.IC * s.OC;
        printf("  %-14s N %5d IC %5d OC %5d: %8.2f ms %7.1f GFLOP/s (forward %.1f, backward %.1f GFLOP/s)\n",
               s.name, s.N, s.IC, s.OC, best, flops / best / 1e6, flops / 3 / best_forward / 1e6,
               flops * 2 / 3 / best_backward / 1e6);
        total_ms += best;
        total_flops += flops;
        checksum += (double)out[out.size() / 3] + dinp[dinp.size() / 2] + dweight[dweight.size() / 5];
    }
    printf("  all shapes: %.1f ms, %.1f GFLOP/s (checksum %.9g)\n", total_ms, total_flops / total_ms / 1e6, checksum);

    // ---- AdamW and the gradient norm over LLaMA-71M's parameter count
    const size_t n = 71000000;
    std::vector<float> params = fixed_values(n, 4, 0.05f), m(n, 0.0f), v(n, 0.0f), grads = fixed_values(n, 5, 0.01f);
    double best_adamw = 1e30, best_norm = 1e30, norm = 0;
    for (int step = 1; step <= 5; step++) {
        auto start = std::chrono::steady_clock::now();
        adamw_update_cpu(params.data(), m.data(), v.data(), NO_PARAMS_COPY, grads.data(), n, 1e-3f, 0.9f, 0.999f,
                         1e-8f, 0.0f, step, 1.0f, ROUND_NEAREST, 0, 0);
        double ms = elapsed_ms(start);
        if (ms < best_adamw) best_adamw = ms;
        start = std::chrono::steady_clock::now();
        norm = global_norm_cpu(grads.data(), n);
        ms = elapsed_ms(start);
        if (ms < best_norm) best_norm = ms;
    }
    printf("AdamW, %zu parameters: %.1f ms, %.1f GB/s (checksum %.9g)\n", n, best_adamw, 28.0 * n / best_adamw / 1e6,
           (double)params[n / 3] + params[n / 7]);
    printf("global norm, %zu values: %.1f ms, %.1f GB/s (norm %.17g)\n", n, best_norm, 4.0 * n / best_norm / 1e6, norm);

    // ---- attention: forward and backward of one layer
    struct AttentionShape { const char* name; int B, T, NH, hs; };
    const AttentionShape attention_shapes[] = {{"12x128", 16, 128, 4, 32}, {"71m", 2, 256, 8, 64}};
    printf("attention: forward + backward of one layer, best of 5\n");
    for (const AttentionShape& s : attention_shapes) {
        const int C = s.NH * s.hs;
        std::vector<float> qkv = fixed_values((size_t)s.B * s.T * 3 * C, 6, 1.0f);
        std::vector<float> dout = fixed_values((size_t)s.B * s.T * C, 7, 1.0f);
        std::vector<float> out((size_t)s.B * s.T * C), dqkv((size_t)s.B * s.T * 3 * C);
        std::vector<float> att((size_t)s.B * s.NH * s.T * s.T), scratch(att.size());
        double best_forward = 1e30, best_backward = 1e30;
        for (int repeat = 0; repeat < 5; repeat++) {
            auto start = std::chrono::steady_clock::now();
            attention_forward_cpu(out.data(), att.data(), qkv.data(), s.B, s.T, s.NH, s.hs);
            double ms = elapsed_ms(start);
            if (ms < best_forward) best_forward = ms;
            start = std::chrono::steady_clock::now();
            attention_backward_cpu(dqkv.data(), scratch.data(), dout.data(), qkv.data(), att.data(), s.B, s.T, s.NH, s.hs);
            ms = elapsed_ms(start);
            if (ms < best_backward) best_backward = ms;
        }
        printf("  %-7s B %2d T %3d NH %d hs %2d: forward %6.2f ms, backward %6.2f ms (checksum %.9g)\n", s.name, s.B,
               s.T, s.NH, s.hs, best_forward, best_backward,
               (double)out[out.size() / 3] + dqkv[dqkv.size() / 2] + dqkv[dqkv.size() / 5 + 7]);
    }

    // ---- the RMSNorm backward (input and weight gradients) at both models' rows
    struct NormShape { const char* name; int N, C; };
    const NormShape norm_shapes[] = {{"12x128", 2048, 128}, {"71m", 512, 512}};
    printf("RMSNorm backward (input and weight gradients), best of 5\n");
    for (const NormShape& s : norm_shapes) {
        std::vector<float> inp = fixed_values((size_t)s.N * s.C, 11, 1.0f), dout = fixed_values((size_t)s.N * s.C, 12, 1.0f);
        std::vector<float> weight = fixed_values(s.C, 13, 1.0f), rstd = fixed_values(s.N, 14, 1.0f);
        std::vector<float> dinp((size_t)s.N * s.C), dweight(s.C, 0.0f);
        double best = 1e30;
        for (int repeat = 0; repeat < 5; repeat++) {
            auto start = std::chrono::steady_clock::now();
            rmsnorm_backward_cpu(dinp.data(), dweight.data(), (float*)nullptr, dout.data(), inp.data(), weight.data(),
                                 rstd.data(), s.N, s.C, s.C, false);
            best = std::min(best, elapsed_ms(start));
        }
        printf("  %-7s N %4d C %4d: %6.3f ms (checksum %.9g)\n", s.name, s.N, s.C, best,
               (double)dinp[dinp.size() / 3] + dweight[s.C / 2]);
    }

    // ---- the cross-entropy (training's one call: loss, then the logits' gradient in place) and
    // SwiGLU, forward and backward: the kernels whose time is mostly e^x
    struct RowShape { const char* name; int N, V, F; };
    const RowShape row_shapes[] = {{"12x128", 2048, 4096, 344}, {"71m", 512, 32000, 1368}};
    printf("cross-entropy (forward and backward) and SwiGLU (forward + backward), best of 5\n");
    for (const RowShape& s : row_shapes) {
        std::vector<float> logits_init = fixed_values((size_t)s.N * s.V, 8, 4.0f), logits(logits_init.size());
        std::vector<float> losses(s.N), stats(2 * (size_t)s.N);
        std::vector<int> targets(s.N);
        for (int i = 0; i < s.N; i++) targets[i] = (i * 7919) % s.V;
        std::vector<float> gate_up = fixed_values((size_t)s.N * 2 * s.F, 9, 3.0f), dgate_up(gate_up.size());
        std::vector<float> dout = fixed_values((size_t)s.N * s.F, 10, 1.0f), out(dout.size());
        double best_ce = 1e30, best_swiglu = 1e30;
        for (int repeat = 0; repeat < 5; repeat++) {
            logits = logits_init;   // the gradient is written over the logits
            auto start = std::chrono::steady_clock::now();
            crossentropy_forward_backward_cpu(logits.data(), losses.data(), stats.data(), logits.data(), targets.data(),
                                              1.0f / s.N, s.N, s.V);
            best_ce = std::min(best_ce, elapsed_ms(start));
            start = std::chrono::steady_clock::now();
            swiglu_forward_cpu(out.data(), gate_up.data(), s.N, s.F);
            swiglu_backward_cpu(dgate_up.data(), dout.data(), gate_up.data(), s.N, s.F);
            best_swiglu = std::min(best_swiglu, elapsed_ms(start));
        }
        printf("  %-7s N %4d V %5d F %4d: cross-entropy %6.2f ms, SwiGLU %6.2f ms (checksum %.9g)\n", s.name, s.N, s.V,
               s.F, best_ce, best_swiglu,
               (double)losses[s.N / 3] + logits[logits.size() / 2] + out[out.size() / 3] + dgate_up[dgate_up.size() / 5]);
    }
    return 0;
}
