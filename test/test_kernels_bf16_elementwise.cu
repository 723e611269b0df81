/*
The embedding, RoPE, SwiGLU, cross-entropy and QKV-planes kernels with bf16 storage (T = bf16) against their
CPU twins with T = bf16, on fresh random bf16 inputs at several shapes (including ones that are
not multiples of the block size), with outputs poisoned (NaN) beforehand. SwiGLU and RoPE are also
run on pointers off 16-byte boundaries, where their launchers must not take the vector kernels. The
embedding's weight gradient is tested with G = float (--precision bf16) and G = bf16 (bf16-pure),
against an independent serial reference of the documented summation order, with repeated tokens.

Built like test_kernels.cu: g++ -DMIXLN_CUDA_EMULATION (the kernels run in the CPU emulation of
CUDA) or nvcc (a real GPU).
*/
#include <catch2/catch.hpp>

#include <algorithm>
#include <vector>

#include "kernel_test_util.h"
#include "../layers/crossentropy.cuh"
#include "../layers/embedding.cuh"
#include "../layers/rope.cuh"
#include "../layers/swiglu.cuh"

// The embedding backward's documented order, written out serially: each row's gradient summed in
// float from its stored value over the positions holding the token in increasing order, and
// stored (rounded to G) once at the end. Rows no position holds are left as they are.
template <typename G>
static std::vector<G> embedding_backward_serial(const std::vector<G>& dtable, const std::vector<bf16>& dout,
                                                const std::vector<int>& tokens, int C) {
    std::vector<float> sums(dtable.size());
    for (size_t k = 0; k < dtable.size(); k++) sums[k] = (float)to_real(dtable[k]);
    for (size_t i = 0; i < tokens.size(); i++) {
        for (int c = 0; c < C; c++) sums[(size_t)tokens[i] * C + c] += __bfloat162float(dout[i * C + c]);
    }
    std::vector<G> out(dtable.size());
    for (size_t k = 0; k < out.size(); k++) out[k] = from_real<G>(sums[k]);
    return out;
}

static std::vector<float> as_floats(const std::vector<float>& v) { return v; }
static std::vector<float> as_floats(const std::vector<bf16>& v) { return to_floats(v); }

// Exact comparison: used where the kernel and the CPU do the same float operations in the same
// order (a copy, or sums in a fixed order with no multiplications an FMA could fuse), so the
// results must agree to the bit.
template <typename V>
static void check_equal(const V& gpu, const V& cpu, const char* what) {
    check_close(as_floats(gpu), as_floats(cpu), what, 0.0);
}

template <typename G>
static void embedding_backward_case(int BT, int C, int V, uint64_t seed) {
    auto dout = random_bf16((size_t)BT * C, seed);
    auto tokens = random_tokens(BT, V, seed + 1);
    std::vector<G> dtable((size_t)V * C);
    {
        auto values = random_floats((size_t)V * C, seed + 2);
        for (size_t k = 0; k < dtable.size(); k++) dtable[k] = from_real<G>(values[k]);
    }
    std::vector<G> dtable_cpu = dtable;
    TokenGroups groups(tokens, V);
    embedding_backward_cpu(dtable_cpu.data(), dout.data(), tokens.data(), groups.positions.data(), groups.starts.data(),
                           groups.count, C);
    check_equal(dtable_cpu, embedding_backward_serial(dtable, dout, tokens, C), "embedding backward cpu vs serial");
    DeviceArray<G> d_dtable(dtable);
    DeviceArray<bf16> d_dout(dout);
    DeviceArray<int> d_tokens(tokens), d_positions(groups.positions), d_starts(groups.starts);
    embedding_backward(d_dtable.ptr, d_dout.ptr, d_tokens.ptr, d_positions.ptr, d_starts.ptr, groups.count, C, 0);
    check_equal(d_dtable.to_host(), dtable_cpu, "embedding backward");
}

// (BT, C, V): one position; a few tokens repeating often; C above the 128-channel strip of the
// backward kernel, not a multiple of it
static const int embedding_shapes[][3] = {{1, 1, 1}, {7, 33, 5}, {300, 130, 17}, {600, 300, 40}};

TEST_CASE("embedding_forward kernel with bf16 storage matches the CPU", "[kernels][bf16]") {
    for (auto& s : embedding_shapes) {
        int BT = s[0], C = s[1], V = s[2];
        INFO("BT " << BT << " C " << C << " V " << V);
        auto table = random_bf16((size_t)V * C, 3);
        auto tokens = random_tokens(BT, V, 6);
        std::vector<bf16> out_cpu((size_t)BT * C);
        embedding_forward_cpu(out_cpu.data(), tokens.data(), table.data(), BT, C);
        DeviceArray<bf16> d_table(table), d_out((size_t)BT * C);
        DeviceArray<int> d_tokens(tokens);
        embedding_forward(d_out.ptr, d_tokens.ptr, d_table.ptr, BT, C, 0);
        check_equal(d_out.to_host(), out_cpu, "embedding forward");   // a copy: exact
    }
}

TEST_CASE("embedding_backward kernel with bf16 storage matches the CPU, float and bf16 weight gradients",
          "[kernels][bf16]") {
    for (auto& s : embedding_shapes) {
        int BT = s[0], C = s[1], V = s[2];
        INFO("BT " << BT << " C " << C << " V " << V);
        {
            INFO("G = float");
            embedding_backward_case<float>(BT, C, V, 40);
        }
        {
            INFO("G = bf16");
            embedding_backward_case<bf16>(BT, C, V, 50);
        }
    }
}

TEST_CASE("embedding_backward into bf16 rounds each row's sum once, not after every position", "[kernels][bf16]") {
    // 64 positions of token 1, each with gradient 2^-10, into a stored 1.0. Near 1 a bf16 step is
    // 2^-7, so rounding after each addition would keep 1.0 (2^-10 is below half a step) every
    // time; the sum rounded once is 1 + 64 * 2^-10 = 1.0625, exactly representable.
    const int BT = 64, C = 3, V = 2;
    std::vector<int> tokens(BT, 1);
    std::vector<bf16> dout((size_t)BT * C, __float2bfloat16_rn(1.0f / 1024));
    std::vector<bf16> dtable((size_t)V * C, __float2bfloat16_rn(1.0f));
    std::vector<bf16> expected = dtable;
    for (int c = 0; c < C; c++) expected[C + c] = __float2bfloat16_rn(1.0625f);
    std::vector<bf16> dtable_cpu = dtable;
    TokenGroups groups(tokens, V);
    embedding_backward_cpu(dtable_cpu.data(), dout.data(), tokens.data(), groups.positions.data(), groups.starts.data(),
                           groups.count, C);
    check_equal(dtable_cpu, expected, "embedding backward cpu");
    DeviceArray<bf16> d_dtable(dtable), d_dout(dout);
    DeviceArray<int> d_tokens(tokens), d_positions(groups.positions), d_starts(groups.starts);
    embedding_backward(d_dtable.ptr, d_dout.ptr, d_tokens.ptr, d_positions.ptr, d_starts.ptr, groups.count, C, 0);
    check_equal(d_dtable.to_host(), expected, "embedding backward");
}

TEST_CASE("embedding_backward in fp32 keeps the serial order of the plain += over positions", "[kernels][bf16]") {
    // the fp32 path of the rewritten kernel and CPU twin, bit for bit against the serial loop
    const int BT = 600, C = 300, V = 40;
    auto dout = random_floats((size_t)BT * C, 60), dtable = random_floats((size_t)V * C, 61);
    auto tokens = random_tokens(BT, V, 62);
    std::vector<float> expected = dtable, dtable_cpu = dtable;
    for (int i = 0; i < BT; i++) {
        for (int c = 0; c < C; c++) expected[(size_t)tokens[i] * C + c] += dout[(size_t)i * C + c];
    }
    TokenGroups groups(tokens, V);
    embedding_backward_cpu(dtable_cpu.data(), dout.data(), tokens.data(), groups.positions.data(), groups.starts.data(),
                           groups.count, C);
    check_equal(dtable_cpu, expected, "embedding backward cpu");
    DeviceArray<float> d_dtable(dtable), d_dout(dout);
    DeviceArray<int> d_tokens(tokens), d_positions(groups.positions), d_starts(groups.starts);
    embedding_backward(d_dtable.ptr, d_dout.ptr, d_tokens.ptr, d_positions.ptr, d_starts.ptr, groups.count, C, 0);
    check_equal(d_dtable.to_host(), expected, "embedding backward");
}

TEST_CASE("rope kernels with bf16 storage match the CPU", "[kernels][bf16]") {
    // (B, T, NH, hs); the last has 3*17*2*5*24 = 12240 pairs, not a multiple of the 256-thread block.
    // hs 2 and 6 take the one-pair kernel; hs 32 and 48 the vector kernel (multiples of twice its
    // 8-bf16 chunk; the last has 1530 chunks, not a multiple of the block either)
    int shapes[][4] = {{1, 1, 1, 2}, {2, 7, 3, 6}, {3, 17, 4, 32}, {3, 17, 5, 48}};
    for (auto& s : shapes) {
        int B = s[0], T = s[1], NH = s[2], hs = s[3];
        INFO("B " << B << " T " << T << " NH " << NH << " hs " << hs);
        std::vector<float> cos_table((size_t)T * hs / 2), sin_table((size_t)T * hs / 2);
        rope_tables_cpu(cos_table.data(), sin_table.data(), T, hs, 10000.0f);
        auto qkv = random_bf16((size_t)B * T * 3 * NH * hs, 12);
        std::vector<bf16> forward_cpu = qkv, backward_cpu = qkv;
        rope_forward_cpu(forward_cpu.data(), cos_table.data(), sin_table.data(), B, T, NH, hs);
        rope_backward_cpu(backward_cpu.data(), cos_table.data(), sin_table.data(), B, T, NH, hs);
        DeviceArray<float> d_cos(cos_table), d_sin(sin_table);
        DeviceArray<bf16> d_forward(qkv), d_backward(qkv);
        rope_forward(d_forward.ptr, d_cos.ptr, d_sin.ptr, B, T, NH, hs, 0);
        rope_backward(d_backward.ptr, d_cos.ptr, d_sin.ptr, B, T, NH, hs, 0);
        check_close_bf16(d_forward.to_host(), forward_cpu, "rope forward");
        check_close_bf16(d_backward.to_host(), backward_cpu, "rope backward");
    }
}

TEST_CASE("swiglu kernels with bf16 storage match the CPU", "[kernels][bf16]") {
    // (N, F): F 1, 33, 300 and 2061 take the fallback kernels (2061: more than one 2048-element
    // pass of a 256-thread block's chunks of 8), F 1000 the vector kernels (a multiple of their
    // 8-bf16 chunk; 375 chunks, not a multiple of the 256-thread block)
    int shapes[][2] = {{1, 1}, {7, 33}, {65, 300}, {3, 1000}, {3, 2061}};
    for (auto& s : shapes) {
        int N = s[0], F = s[1];
        INFO("N " << N << " F " << F);
        auto gate_up = random_bf16((size_t)N * 2 * F, 13), dout = random_bf16((size_t)N * F, 14);
        // backward writes dgate_up without reading it: NaN before, on both sides, shows a read or a gap
        std::vector<bf16> dgate_up((size_t)N * 2 * F, __float2bfloat16_rn(NAN));
        std::vector<bf16> out_cpu((size_t)N * F), dgate_up_cpu = dgate_up;
        swiglu_forward_cpu(out_cpu.data(), gate_up.data(), N, F);
        swiglu_backward_cpu(dgate_up_cpu.data(), dout.data(), gate_up.data(), N, F);
        DeviceArray<bf16> d_gate_up(gate_up), d_dout(dout), d_out((size_t)N * F), d_dgate_up(dgate_up);
        swiglu_forward(d_out.ptr, d_gate_up.ptr, N, F, 0);
        swiglu_backward(d_dgate_up.ptr, d_dout.ptr, d_gate_up.ptr, N, F, 0);
        check_close_bf16(d_out.to_host(), out_cpu, "swiglu forward");
        check_close_bf16(d_dgate_up.to_host(), dgate_up_cpu, "swiglu backward");
    }
}

// A device copy of `host` placed `offset` elements into its allocation; offset 1 puts it 2 (bf16)
// or 4 (float) bytes off the 16-byte boundary cudaMalloc gives. to_host() of the result still holds
// the `offset` leading elements: from_offset drops them.
template <typename V>
static std::vector<V> with_offset(const std::vector<V>& host, int offset) {
    std::vector<V> padded(offset + host.size());
    std::copy(host.begin(), host.end(), padded.begin() + offset);
    return padded;
}
template <typename V>
static std::vector<V> from_offset(const std::vector<V>& device_copy, int offset) {
    return std::vector<V>(device_copy.begin() + offset, device_copy.end());
}

TEST_CASE("swiglu and rope kernels with bf16 storage match the CPU off 16-byte boundaries", "[kernels][bf16]") {
    // F = 1000 and hs = 64 are multiples of the 8-bf16 chunk, so aligned pointers take the vector
    // kernels; here one pointer at a time is one element off its 16-byte boundary, and the launcher
    // must see it and take the one-element kernels (a 16-byte load from it faults on a GPU)
    SECTION("swiglu") {
        const int N = 3, F = 1000;
        auto gate_up = random_bf16((size_t)N * 2 * F, 13), dout = random_bf16((size_t)N * F, 14);
        std::vector<bf16> dgate_up((size_t)N * 2 * F, __float2bfloat16_rn(NAN));   // written, not read
        std::vector<bf16> out_cpu((size_t)N * F), dgate_up_cpu = dgate_up;
        swiglu_forward_cpu(out_cpu.data(), gate_up.data(), N, F);
        swiglu_backward_cpu(dgate_up_cpu.data(), dout.data(), gate_up.data(), N, F);
        // moved: 0 gate_up (both calls), 1 out and dout, 2 dgate_up
        for (int moved = 0; moved < 3; moved++) {
            INFO("moved pointer " << moved);
            int gate_up_offset = moved == 0, out_offset = moved == 1, dgate_up_offset = moved == 2;
            DeviceArray<bf16> d_gate_up(with_offset(gate_up, gate_up_offset)), d_dout(with_offset(dout, out_offset)),
                d_out(out_offset + (size_t)N * F), d_dgate_up(with_offset(dgate_up, dgate_up_offset));
            swiglu_forward(d_out.ptr + out_offset, d_gate_up.ptr + gate_up_offset, N, F, 0);
            swiglu_backward(d_dgate_up.ptr + dgate_up_offset, d_dout.ptr + out_offset, d_gate_up.ptr + gate_up_offset,
                            N, F, 0);
            check_close_bf16(from_offset(d_out.to_host(), out_offset), out_cpu, "swiglu forward");
            check_close_bf16(from_offset(d_dgate_up.to_host(), dgate_up_offset), dgate_up_cpu, "swiglu backward");
        }
    }
    SECTION("rope") {
        const int B = 2, T = 5, NH = 3, hs = 64;
        std::vector<float> cos_table((size_t)T * hs / 2), sin_table((size_t)T * hs / 2);
        rope_tables_cpu(cos_table.data(), sin_table.data(), T, hs, 10000.0f);
        auto qkv = random_bf16((size_t)B * T * 3 * NH * hs, 12);
        std::vector<bf16> forward_cpu = qkv, backward_cpu = qkv;
        rope_forward_cpu(forward_cpu.data(), cos_table.data(), sin_table.data(), B, T, NH, hs);
        rope_backward_cpu(backward_cpu.data(), cos_table.data(), sin_table.data(), B, T, NH, hs);
        // moved: 0 qkv, 1 the cos table, 2 the sin table
        for (int moved = 0; moved < 3; moved++) {
            INFO("moved pointer " << moved);
            int qkv_offset = moved == 0, cos_offset = moved == 1, sin_offset = moved == 2;
            DeviceArray<float> d_cos(with_offset(cos_table, cos_offset)), d_sin(with_offset(sin_table, sin_offset));
            DeviceArray<bf16> d_forward(with_offset(qkv, qkv_offset)), d_backward(with_offset(qkv, qkv_offset));
            rope_forward(d_forward.ptr + qkv_offset, d_cos.ptr + cos_offset, d_sin.ptr + sin_offset, B, T, NH, hs, 0);
            rope_backward(d_backward.ptr + qkv_offset, d_cos.ptr + cos_offset, d_sin.ptr + sin_offset, B, T, NH, hs,
                          0);
            check_close_bf16(from_offset(d_forward.to_host(), qkv_offset), forward_cpu, "rope forward");
            check_close_bf16(from_offset(d_backward.to_host(), qkv_offset), backward_cpu, "rope backward");
        }
    }
}

TEST_CASE("crossentropy kernels with bf16 logits match the CPU, in place", "[kernels][bf16]") {
    int shapes[][2] = {{1, 2}, {5, 97}, {33, 1000}, {4, 5000}};   // (N, V): V below, around and above the 256-thread block
    for (auto& s : shapes) {
        int N = s[0], V = s[1];
        INFO("N " << N << " V " << V);
        auto logits = random_bf16((size_t)N * V, 16, 3.0f);
        auto targets = random_tokens(N, V, 17);
        for (int i = 1; i < N; i += 3) targets[i] = IGNORED_TARGET;   // padding's targets: loss 0, zero gradient
        std::vector<float> losses_cpu(N), stats_cpu(2 * N);
        std::vector<bf16> dlogits_cpu((size_t)N * V, __float2bfloat16_rn(NAN)), in_place_cpu = logits;
        crossentropy_forward_cpu(losses_cpu.data(), stats_cpu.data(), logits.data(), targets.data(), N, V);
        crossentropy_backward_cpu(dlogits_cpu.data(), logits.data(), stats_cpu.data(), targets.data(), 1.0f / N, N, V);
        // the CPU twin in place gives the same bits as out of place
        crossentropy_backward_cpu(in_place_cpu.data(), in_place_cpu.data(), stats_cpu.data(), targets.data(), 1.0f / N,
                                  N, V);
        check_equal(in_place_cpu, dlogits_cpu, "crossentropy dlogits cpu in place");
        DeviceArray<bf16> d_logits(logits);
        DeviceArray<float> d_losses(N), d_stats(2 * N);
        DeviceArray<int> d_targets(targets);
        crossentropy_forward(d_losses.ptr, d_stats.ptr, d_logits.ptr, d_targets.ptr, N, V, 0);
        // float losses and stats from the same bf16 logits, computed in float: the fp32 tolerance
        check_close(d_losses.to_host(), losses_cpu, "crossentropy losses");
        check_close(d_stats.to_host(), stats_cpu, "crossentropy stats (max, sum)");
        // in place, as the model uses it: the logits become their gradient, from the kernel's stats
        crossentropy_backward(d_logits.ptr, d_logits.ptr, d_stats.ptr, d_targets.ptr, 1.0f / N, N, V, 0);
        check_close_bf16(d_logits.to_host(), dlogits_cpu, "crossentropy dlogits");
        // both in one kernel, in place as training runs it: the two kernels' results to the bit
        DeviceArray<bf16> d_fused(logits);
        DeviceArray<float> d_fused_losses(N), d_fused_stats(2 * N);
        crossentropy_forward_backward(d_fused.ptr, d_fused_losses.ptr, d_fused_stats.ptr, d_fused.ptr, d_targets.ptr,
                                      1.0f / N, N, V, 0);
        check_equal(d_fused_losses.to_host(), d_losses.to_host(), "crossentropy fused losses");
        check_equal(d_fused_stats.to_host(), d_stats.to_host(), "crossentropy fused stats");
        check_equal(d_fused.to_host(), d_logits.to_host(), "crossentropy fused dlogits");
    }
}
