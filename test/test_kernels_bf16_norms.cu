/*
The norm and residual kernels with bf16 storage (T = bf16) against their CPU twins with T = bf16:
RMSNorm forward and backward, the fused residual add + RMSNorm (in place, x_scale != 1),
LayerNorm forward and backward, residual, scale and residual_scaled. The weight gradients are
checked both as float (G = float, --precision bf16) and as bf16 (G = bf16, --precision bf16-pure).

Fresh random bf16 inputs, the same on both sides; outputs poisoned (NaN) beforehand; shapes that
are not multiples of the 8 rows per block, the 32 lanes or the 256 threads. bf16 outputs are
compared with check_close_bf16 at its default tolerance (see kernel_test_util.h); float outputs
(rstd, mean, G = float gradients) are computed in float from the same bf16 inputs in both twins,
so they keep the fp32 tolerances of test_kernels.cu. Built like test_kernels.cu: g++ with the CUDA
emulation, or nvcc for a GPU.

The RMSNorm kernels have a 16-byte path and a fallback (rmsnorm.cuh); the shapes here run both,
and the last RMSNorm cases run them in fp32 as well as in bf16 (the same checks at fp32's
tolerances). The last case runs both norms over rows with a stride (HybridNorm's q, k and v inside
qkv's rows), in fp32 and bf16.
*/
#include <cstring>
#include <type_traits>
#include <vector>

#include "kernel_test_util.h"
#include "../layers/layernorm.cuh"
#include "../layers/residual.cuh"
#include "../layers/rmsnorm.cuh"

// exact equality of two bf16 vectors, bit for bit
static void check_bitwise_equal_bf16(const std::vector<bf16>& ours, const std::vector<bf16>& expected,
                                     const char* what) {
    REQUIRE(ours.size() == expected.size());
    for (size_t i = 0; i < ours.size(); i++) {
        if (memcmp(&ours[i], &expected[i], sizeof(bf16)) != 0) {
            INFO(what << ": element " << i << " of " << ours.size() << ": fused " << __bfloat162float(ours[i])
                      << ", unfused " << __bfloat162float(expected[i]));
            REQUIRE(memcmp(&ours[i], &expected[i], sizeof(bf16)) == 0);
        }
    }
}

// ---- residual adds

TEST_CASE("residual, scale and residual_scaled kernels match the CPU in bf16, in place included",
          "[kernels][bf16]") {
    // The twins do the same one or two float operations on the same bf16 values and round once,
    // so they agree unless the float results differ (an fma contracted on one side only), and
    // then by one bf16 step: the default tolerance.
    for (size_t n : {1, 255, 257, 1000}) {   // around one 256-thread block
        const float scale = 0.577f, x_scale = 1.7f;
        INFO("n " << n);
        auto a = random_bf16(n, 101), b = random_bf16(n, 102);
        std::vector<bf16> sum_cpu(n), scaled_cpu(n), residual_scaled_cpu(n);
        residual_forward_cpu(sum_cpu.data(), a.data(), b.data(), n);
        scale_forward_cpu(scaled_cpu.data(), a.data(), scale, n);
        residual_scaled_forward_cpu(residual_scaled_cpu.data(), a.data(), x_scale, b.data(), n);

        DeviceArray<bf16> da(a), db(b), d_sum(n), d_scaled(n), d_residual_scaled(n);
        residual_forward(d_sum.ptr, da.ptr, db.ptr, n, 0);
        check_close_bf16(d_sum.to_host(), sum_cpu, "residual");
        scale_forward(d_scaled.ptr, da.ptr, scale, n, 0);
        check_close_bf16(d_scaled.to_host(), scaled_cpu, "scale");
        residual_scaled_forward(d_residual_scaled.ptr, da.ptr, x_scale, db.ptr, n, 0);
        check_close_bf16(d_residual_scaled.to_host(), residual_scaled_cpu, "residual_scaled");

        // in place: out aliasing each input in turn
        DeviceArray<bf16> da_sum(a), db_sum(b), da_scaled(a), da_residual_scaled(a), db_residual_scaled(b);
        residual_forward(da_sum.ptr, da_sum.ptr, db.ptr, n, 0);
        check_close_bf16(da_sum.to_host(), sum_cpu, "residual into a");
        residual_forward(db_sum.ptr, da.ptr, db_sum.ptr, n, 0);
        check_close_bf16(db_sum.to_host(), sum_cpu, "residual into b");
        scale_forward(da_scaled.ptr, da_scaled.ptr, scale, n, 0);
        check_close_bf16(da_scaled.to_host(), scaled_cpu, "scale in place");
        residual_scaled_forward(da_residual_scaled.ptr, da_residual_scaled.ptr, x_scale, db.ptr, n, 0);
        check_close_bf16(da_residual_scaled.to_host(), residual_scaled_cpu, "residual_scaled into x");
        residual_scaled_forward(db_residual_scaled.ptr, da.ptr, x_scale, db_residual_scaled.ptr, n, 0);
        check_close_bf16(db_residual_scaled.to_host(), residual_scaled_cpu, "residual_scaled into b");

        // the CPU twins in place give the same bits as out of place
        std::vector<bf16> a_in_place = a, b_in_place = b;
        residual_scaled_forward_cpu(a_in_place.data(), a_in_place.data(), x_scale, b.data(), n);
        check_bitwise_equal_bf16(a_in_place, residual_scaled_cpu, "residual_scaled_cpu into x");
        residual_forward_cpu(b_in_place.data(), a.data(), b_in_place.data(), n);
        check_bitwise_equal_bf16(b_in_place, sum_cpu, "residual_cpu into b");
    }
}

// ---- RMSNorm

// random inputs stored in T: floats, or the bf16 nearest to the same floats
template <typename T>
static std::vector<T> random_stored(size_t n, uint64_t seed) {
    if constexpr (std::is_same<T, bf16>::value) {
        return random_bf16(n, seed);
    } else {
        return random_floats(n, seed);
    }
}

// a kernel's output stored in T against its CPU twin's, at the default tolerance for T
static void check_close_stored(const std::vector<float>& gpu, const std::vector<float>& cpu, const char* what) {
    check_close(gpu, cpu, what);
}
static void check_close_stored(const std::vector<bf16>& gpu, const std::vector<bf16>& cpu, const char* what) {
    check_close_bf16(gpu, cpu, what);
}

// A device array whose data starts `offset` elements into its allocation: offset 1 moves every row
// off the 16-byte boundaries that cudaMalloc's pointer gives, whatever C. From a host vector, or
// of n elements poisoned (NaN) like DeviceArray(n).
template <typename T>
struct OffsetArray {
    int offset;
    DeviceArray<T> array;
    OffsetArray(const std::vector<T>& host, int offset) : offset(offset), array(padded(host, offset)) {}
    OffsetArray(size_t n, int offset) : offset(offset), array(n + offset) {}
    T* ptr() const { return array.ptr + offset; }
    std::vector<T> to_host() const {
        auto all = array.to_host();
        return std::vector<T>(all.begin() + offset, all.end());
    }
    static std::vector<T> padded(const std::vector<T>& host, int offset) {
        std::vector<T> out(host.size() + offset, host.empty() ? T() : host[0]);
        std::copy(host.begin(), host.end(), out.begin() + offset);
        return out;
    }
};

// One RMSNorm forward and backward at (N, C), activations and weight stored in T, the weight
// gradient in G, every T tensor `offset` elements past a 16-byte boundary; dinp accumulated or
// (accumulate false) written.
template <typename T, typename G>
static void check_rmsnorm(int N, int C, double dweight_tolerance, int offset = 0, bool accumulate = true) {
    const size_t n = (size_t)N * C;
    auto inp = random_stored<T>(n, 7), weight = random_stored<T>(C, 8), dout = random_stored<T>(n, 9);
    // backward accumulates: start from known non-zero values; or writes over poison it must not read
    auto dinp = random_stored<T>(n, 10);
    if (!accumulate) std::fill(dinp.begin(), dinp.end(), from_real<T>(NAN));
    std::vector<G> dweight(C);
    {
        auto start = random_floats(C, 11);
        for (int c = 0; c < C; c++) dweight[c] = from_real<G>(start[c]);
    }
    std::vector<T> out_cpu(n), dinp_cpu = dinp;
    std::vector<float> rstd_cpu(N);
    std::vector<G> dweight_cpu = dweight;
    rmsnorm_forward_cpu(out_cpu.data(), rstd_cpu.data(), inp.data(), weight.data(), N, C, C, 1e-6f);
    rmsnorm_backward_cpu(dinp_cpu.data(), dweight_cpu.data(), (float*)nullptr, dout.data(), inp.data(), weight.data(),
                         rstd_cpu.data(), N, C, C, accumulate);   // the CPU needs no scratch

    OffsetArray<T> d_inp(inp, offset), d_weight(weight, offset), d_dout(dout, offset), d_out(n, offset),
        d_dinp(dinp, offset);
    DeviceArray<float> d_rstd(N), d_scratch((size_t)RMSNORM_PARTIAL_BLOCKS * C);   // scratch poisoned like the outputs
    DeviceArray<G> d_dweight(dweight);
    rmsnorm_forward(d_out.ptr(), d_rstd.ptr, d_inp.ptr(), d_weight.ptr(), N, C, C, 1e-6f, 0);
    rmsnorm_backward(d_dinp.ptr(), d_dweight.ptr, d_scratch.ptr, d_dout.ptr(), d_inp.ptr(), d_weight.ptr(), d_rstd.ptr, N,
                     C, C, accumulate, 0);
    check_close_stored(d_out.to_host(), out_cpu, "rmsnorm out");
    check_close(d_rstd.to_host(), rstd_cpu, "rmsnorm rstd");
    check_close_stored(d_dinp.to_host(), dinp_cpu, "rmsnorm dinp");
    std::vector<float> dweight_gpu(C), dweight_ref(C);
    auto dweight_host = d_dweight.to_host();
    for (int c = 0; c < C; c++) {
        dweight_gpu[c] = (float)to_real(dweight_host[c]);
        dweight_ref[c] = (float)to_real(dweight_cpu[c]);
    }
    check_close(dweight_gpu, dweight_ref, "rmsnorm dweight", dweight_tolerance);
}

TEST_CASE("rmsnorm kernels match the CPU in bf16, weight gradient in float and in bf16", "[kernels][bf16]") {
    // (N, C): one element; rows not a multiple of the 8 per block and C not of the 32 lanes nor of
    // the 256 channels per block of the weight kernel; C 384, the width of a small model
    int shapes[][2] = {{1, 1}, {9, 33}, {130, 300}, {37, 384}};
    for (auto& s : shapes) {
        int N = s[0], C = s[1];
        INFO("N " << N << " C " << C);
        check_rmsnorm<bf16, float>(N, C, 1e-5);          // G = float: a float sum, the fp32 tolerance
        check_rmsnorm<bf16, bf16>(N, C, 2 * BF16_STEP);   // G = bf16: that sum rounded once, bf16's
    }
}

// One fused residual add + RMSNorm at (N, C) stored in T, into a separate sum and in place over x
// and over branch, against the CPU twin.
template <typename T>
static void check_residual_rmsnorm(int N, int C, float x_scale) {
    const size_t n = (size_t)N * C;
    auto x = random_stored<T>(n, 47), branch = random_stored<T>(n, 48), weight = random_stored<T>(C, 49);
    std::vector<T> sum_cpu(n), out_cpu(n);
    std::vector<float> rstd_cpu(N);
    residual_rmsnorm_forward_cpu(sum_cpu.data(), out_cpu.data(), rstd_cpu.data(), x.data(), x_scale, branch.data(),
                                 weight.data(), N, C, 1e-6f);

    // into a separate sum, then sum aliasing x, then sum aliasing branch; outputs poisoned
    DeviceArray<T> d_x(x), d_branch(branch), d_weight(weight), d_sum(n), d_out(n), d_x_in_place(x), d_out_x(n),
        d_branch_in_place(branch), d_out_b(n);
    DeviceArray<float> d_rstd(N), d_rstd_x(N), d_rstd_b(N);
    residual_rmsnorm_forward(d_sum.ptr, d_out.ptr, d_rstd.ptr, d_x.ptr, x_scale, d_branch.ptr, d_weight.ptr, N, C,
                             1e-6f, 0);
    residual_rmsnorm_forward(d_x_in_place.ptr, d_out_x.ptr, d_rstd_x.ptr, d_x_in_place.ptr, x_scale, d_branch.ptr,
                             d_weight.ptr, N, C, 1e-6f, 0);
    residual_rmsnorm_forward(d_branch_in_place.ptr, d_out_b.ptr, d_rstd_b.ptr, d_x.ptr, x_scale, d_branch_in_place.ptr,
                             d_weight.ptr, N, C, 1e-6f, 0);
    struct Run {
        const char* name;
        DeviceArray<T>& sum;
        DeviceArray<T>& out;
        DeviceArray<float>& rstd;
    } runs[] = {{"separate sum", d_sum, d_out, d_rstd},
                {"sum into x", d_x_in_place, d_out_x, d_rstd_x},
                {"sum into branch", d_branch_in_place, d_out_b, d_rstd_b}};
    for (auto& run : runs) {
        INFO(run.name);
        auto sum_gpu = run.sum.to_host();
        check_close_stored(sum_gpu, sum_cpu, "residual_rmsnorm sum");
        check_close_stored(run.out.to_host(), out_cpu, "residual_rmsnorm out");
        // The statistics and the output are those of the sum as the kernel stored it (what the
        // backward reads): the norm of the kernel's own rounded sum, at the fp32 tolerance for
        // rstd. This also holds where the two sums differ by a rounding step, and in bf16 it fails
        // a kernel that normalises its unrounded float sum: that sum differs from the stored one
        // by up to 2^-9 relative per element, which moves rstd by ~1e-4 at C = 384 and up to 2^-9
        // at C = 1, far above 1e-5.
        std::vector<T> out_of_sum(n);
        std::vector<float> rstd_of_sum(N);
        rmsnorm_forward_cpu(out_of_sum.data(), rstd_of_sum.data(), sum_gpu.data(), weight.data(), N, C, C, 1e-6f);
        check_close(run.rstd.to_host(), rstd_of_sum, "residual_rmsnorm rstd, of the stored sum");
        check_close_stored(run.out.to_host(), out_of_sum, "residual_rmsnorm out, of the stored sum");
    }
}

TEST_CASE("residual_rmsnorm_forward kernel matches the CPU in bf16, in place included", "[kernels][bf16]") {
    int shapes[][2] = {{1, 1}, {37, 67}, {130, 384}};
    for (auto& s : shapes) {
        for (float x_scale : {1.0f, 1.7f}) {   // a plain residual add, and DeepNorm's a for L = 4
            int N = s[0], C = s[1];
            INFO("N " << N << " C " << C << " x_scale " << x_scale);
            check_residual_rmsnorm<bf16>(N, C, x_scale);
        }
    }
}

TEST_CASE("residual_rmsnorm_forward_cpu in bf16 is bitwise the residual add followed by rmsnorm_forward_cpu",
          "[kernels][bf16]") {
    int shapes[][2] = {{1, 1}, {37, 67}, {130, 384}};
    for (auto& s : shapes) {
        for (float x_scale : {1.0f, 1.7f}) {   // residual_forward, and residual_scaled_forward (DeepNorm's a)
            int N = s[0], C = s[1];
            const size_t n = (size_t)N * C;
            INFO("N " << N << " C " << C << " x_scale " << x_scale);
            auto x = random_bf16(n, 57), branch = random_bf16(n, 58), weight = random_bf16(C, 59);
            // unfused: the add (rounded to bf16 as stored), then the norm of the stored sum
            std::vector<bf16> sum_ref(n), out_ref(n);
            std::vector<float> rstd_ref(N);
            if (x_scale != 1.0f) {
                residual_scaled_forward_cpu(sum_ref.data(), x.data(), x_scale, branch.data(), n);
            } else {
                residual_forward_cpu(sum_ref.data(), x.data(), branch.data(), n);
            }
            rmsnorm_forward_cpu(out_ref.data(), rstd_ref.data(), sum_ref.data(), weight.data(), N, C, C, 1e-6f);
            // fused: into a separate sum, then in place over x and over branch
            std::vector<bf16> sum(n), out(n), x_in_place = x, branch_in_place = branch;
            std::vector<float> rstd(N);
            residual_rmsnorm_forward_cpu(sum.data(), out.data(), rstd.data(), x.data(), x_scale, branch.data(),
                                         weight.data(), N, C, 1e-6f);
            check_bitwise_equal_bf16(sum, sum_ref, "sum");
            check_bitwise_equal_bf16(out, out_ref, "out");
            REQUIRE(memcmp(rstd.data(), rstd_ref.data(), N * sizeof(float)) == 0);
            residual_rmsnorm_forward_cpu(x_in_place.data(), out.data(), rstd.data(), x_in_place.data(), x_scale,
                                         branch.data(), weight.data(), N, C, 1e-6f);
            check_bitwise_equal_bf16(x_in_place, sum_ref, "sum into x");
            check_bitwise_equal_bf16(out, out_ref, "out, sum into x");
            REQUIRE(memcmp(rstd.data(), rstd_ref.data(), N * sizeof(float)) == 0);
            residual_rmsnorm_forward_cpu(branch_in_place.data(), out.data(), rstd.data(), x.data(), x_scale,
                                         branch_in_place.data(), weight.data(), N, C, 1e-6f);
            check_bitwise_equal_bf16(branch_in_place, sum_ref, "sum into branch");
            check_bitwise_equal_bf16(out, out_ref, "out, sum into branch");
            REQUIRE(memcmp(rstd.data(), rstd_ref.data(), N * sizeof(float)) == 0);
        }
    }
}

// ---- RMSNorm on its 16-byte path and off it, in fp32 and bf16

// Shapes for both paths (rmsnorm.cuh). The 16-byte path takes C a multiple of 8 (bf16) or 4
// (float) with 16-byte aligned rows, in groups of 512 channels per row; its backward is the fused
// kernel (input and weight gradient) for 1 to 4 groups, else the input kernel and the weight kernel:
//   - C 512, LLaMA-71M's width: one group (bf16), two (float);
//   - C 776 and 1032: two groups and three (bf16 and float), the last part full;
//   - C 1544: four groups, the last holding 1 chunk (bf16) or 2 (float) of its 32 lanes' chunks;
//   - C 8: one chunk per row in bf16, two in float;
//   - N 4200, C 24: more rows than the fused kernel's 512 blocks x 8 warps, so warps take two rows
//     or one; and the second block of 16 channels of the blocks' sums holds 8;
//   - N 1100, C 2056: five groups, past the fused kernel: the input kernel for any C and the
//     weight gradient's vector kernel, which takes 2048 rows (bf16) or 1024 (float) per pass of
//     its block, so 1100 rows end in a part pass (float).
// The fallback: C 13 (odd) over 301 rows, more than one 256-row pass of the fallback weight kernel
// (64 row groups x 4 rows) with a part pass; and C 512 with every row one element past a 16-byte
// boundary (offset 1), which the launchers must send to the fallback (a misaligned 16-byte access
// stops the emulation).
struct RmsnormShape {
    int N, C, offset;
};
static const RmsnormShape RMSNORM_PATH_SHAPES[] = {{67, 512, 0}, {33, 776, 0},  {40, 1032, 0}, {21, 1544, 0},
                                                   {9, 8, 0},    {4200, 24, 0}, {1100, 2056, 0}, {301, 13, 0},
                                                   {70, 512, 1}};

TEST_CASE("rmsnorm kernels match the CPU on their 16-byte path and off it, in fp32 and bf16", "[kernels][bf16]") {
    for (auto& s : RMSNORM_PATH_SHAPES) {
        INFO("N " << s.N << " C " << s.C << " offset " << s.offset);
        check_rmsnorm<float, float>(s.N, s.C, 1e-5, s.offset);          // fp32 throughout: test_kernels.cu's tolerance
        check_rmsnorm<bf16, float>(s.N, s.C, 1e-5, s.offset);           // as in the bf16 case above
        check_rmsnorm<bf16, bf16>(s.N, s.C, 2 * BF16_STEP, s.offset);
        // dinp written (accumulate false), on every path
        check_rmsnorm<float, float>(s.N, s.C, 1e-5, s.offset, false);
        check_rmsnorm<bf16, float>(s.N, s.C, 1e-5, s.offset, false);
    }
}

TEST_CASE("residual_rmsnorm_forward kernel matches the CPU on its 16-byte path and off it, in fp32 and bf16, in place "
          "included",
          "[kernels][bf16]") {
    // the row shapes above; the rows are not misaligned here (the in-place runs need the model's
    // own pointers), so C 13 is the fallback
    int shapes[][2] = {{67, 512}, {21, 1544}, {9, 8}, {37, 13}};
    for (auto& s : shapes) {
        for (float x_scale : {1.0f, 1.7f}) {
            int N = s[0], C = s[1];
            INFO("N " << N << " C " << C << " x_scale " << x_scale);
            check_residual_rmsnorm<float>(N, C, x_scale);
            check_residual_rmsnorm<bf16>(N, C, x_scale);
        }
    }
}

// ---- LayerNorm

// One LayerNorm forward and backward at (N, C) with the weight and bias gradients stored in G.
template <typename G>
static void check_layernorm_bf16(int N, int C, double gradient_tolerance, bool accumulate = true) {
    const size_t n = (size_t)N * C;
    // mean 10, spread 1: the mean subtraction matters (the +10 is rounded to bf16 with the rest)
    auto inp_float = random_floats(n, 40);
    for (auto& x : inp_float) x += 10.0f;
    auto inp = to_bf16(inp_float), weight = random_bf16(C, 41), bias = random_bf16(C, 42), dout = random_bf16(n, 43);
    // backward accumulates: start from known non-zero values; or writes over poison it must not read
    auto dinp = accumulate ? random_bf16(n, 44) : to_bf16(std::vector<float>(n, NAN));
    std::vector<G> dweight(C), dbias(C);
    {
        auto start_w = random_floats(C, 45), start_b = random_floats(C, 46);
        for (int c = 0; c < C; c++) {
            dweight[c] = from_real<G>(start_w[c]);
            dbias[c] = from_real<G>(start_b[c]);
        }
    }
    std::vector<bf16> out_cpu(n), dinp_cpu = dinp;
    std::vector<float> mean_cpu(N), rstd_cpu(N);
    std::vector<G> dweight_cpu = dweight, dbias_cpu = dbias;
    layernorm_forward_cpu(out_cpu.data(), mean_cpu.data(), rstd_cpu.data(), inp.data(), weight.data(), bias.data(), N,
                          C, C, 1e-5f);
    layernorm_backward_cpu(dinp_cpu.data(), dweight_cpu.data(), dbias_cpu.data(), dout.data(), inp.data(),
                           weight.data(), mean_cpu.data(), rstd_cpu.data(), N, C, C, accumulate);

    DeviceArray<bf16> d_inp(inp), d_weight(weight), d_bias(bias), d_dout(dout), d_out(n), d_dinp(dinp);
    DeviceArray<float> d_mean(N), d_rstd(N);
    DeviceArray<G> d_dweight(dweight), d_dbias(dbias);
    layernorm_forward(d_out.ptr, d_mean.ptr, d_rstd.ptr, d_inp.ptr, d_weight.ptr, d_bias.ptr, N, C, C, 1e-5f, 0);
    layernorm_backward(d_dinp.ptr, d_dweight.ptr, d_dbias.ptr, d_dout.ptr, d_inp.ptr, d_weight.ptr, d_mean.ptr,
                       d_rstd.ptr, N, C, C, accumulate, 0);
    check_close_bf16(d_out.to_host(), out_cpu, "layernorm out");
    check_close(d_mean.to_host(), mean_cpu, "layernorm mean");
    // rstd to 1e-6 as in the fp32 test: the two-pass variance, in float from the same inputs
    check_close(d_rstd.to_host(), rstd_cpu, "layernorm rstd", 1e-6);
    check_close_bf16(d_dinp.to_host(), dinp_cpu, "layernorm dinp");
    auto dweight_host = d_dweight.to_host(), dbias_host = d_dbias.to_host();
    std::vector<float> dweight_gpu(C), dweight_ref(C), dbias_gpu(C), dbias_ref(C);
    for (int c = 0; c < C; c++) {
        dweight_gpu[c] = (float)to_real(dweight_host[c]);
        dweight_ref[c] = (float)to_real(dweight_cpu[c]);
        dbias_gpu[c] = (float)to_real(dbias_host[c]);
        dbias_ref[c] = (float)to_real(dbias_cpu[c]);
    }
    check_close(dweight_gpu, dweight_ref, "layernorm dweight", gradient_tolerance);
    check_close(dbias_gpu, dbias_ref, "layernorm dbias", gradient_tolerance);
}

TEST_CASE("layernorm kernels match the CPU in bf16, weight gradients in float and in bf16", "[kernels][bf16]") {
    // (N, C): one element (zero variance: out is the bias, the exact dinp is 0); rows not a multiple
    // of the 8 per block and C not of the 32 lanes nor the 256 channels per block of the weight
    // kernel; C 384, the width of a small model
    int shapes[][2] = {{1, 1}, {37, 67}, {130, 300}, {29, 384}};
    for (auto& s : shapes) {
        int N = s[0], C = s[1];
        INFO("N " << N << " C " << C);
        check_layernorm_bf16<float>(N, C, 1e-5);          // G = float: float sums, the fp32 tolerance
        check_layernorm_bf16<bf16>(N, C, 2 * BF16_STEP);   // G = bf16: those sums rounded once, bf16's
        check_layernorm_bf16<float>(N, C, 1e-5, false);     // dinp written
    }
}

// ---- rows with a stride (HybridNorm's q, k and v, each C of the 3C values of a row of qkv)

// RMSNorm and LayerNorm forward and backward over N rows of C values `stride` elements apart,
// against their CPU twins given the same stride; weight gradients in float. Every tensor, out and
// dinp included, starts as random values between the rows as well as in them, so a kernel that
// writes between the rows, or leaves an element of a row unwritten, fails the comparison of the
// whole arrays.
template <typename T>
static void check_norms_strided(int N, int C, int stride, bool accumulate) {
    const size_t n = (size_t)(N - 1) * stride + C;   // the last row ends the arrays
    auto inp = random_stored<T>(n, 60), dout = random_stored<T>(n, 61), weight = random_stored<T>(C, 62);
    auto bias = random_stored<T>(C, 63), out = random_stored<T>(n, 64), dinp = random_stored<T>(n, 65);
    const std::vector<float> dweight_start = random_floats(C, 66), dbias_start = random_floats(C, 67);
    {
        INFO("rmsnorm");
        std::vector<T> out_cpu = out, dinp_cpu = dinp;
        std::vector<float> rstd_cpu(N), dweight_cpu = dweight_start;
        rmsnorm_forward_cpu(out_cpu.data(), rstd_cpu.data(), inp.data(), weight.data(), N, C, stride, 1e-6f);
        rmsnorm_backward_cpu(dinp_cpu.data(), dweight_cpu.data(), (float*)nullptr, dout.data(), inp.data(),
                             weight.data(), rstd_cpu.data(), N, C, stride, accumulate);
        DeviceArray<T> d_inp(inp), d_dout(dout), d_weight(weight), d_out(out), d_dinp(dinp);
        DeviceArray<float> d_rstd(N), d_scratch((size_t)RMSNORM_PARTIAL_BLOCKS * C), d_dweight(dweight_start);
        rmsnorm_forward(d_out.ptr, d_rstd.ptr, d_inp.ptr, d_weight.ptr, N, C, stride, 1e-6f, 0);
        rmsnorm_backward(d_dinp.ptr, d_dweight.ptr, d_scratch.ptr, d_dout.ptr, d_inp.ptr, d_weight.ptr, d_rstd.ptr, N, C,
                         stride, accumulate, 0);
        check_close_stored(d_out.to_host(), out_cpu, "strided rmsnorm out");
        check_close(d_rstd.to_host(), rstd_cpu, "strided rmsnorm rstd");
        check_close_stored(d_dinp.to_host(), dinp_cpu, "strided rmsnorm dinp");
        check_close(d_dweight.to_host(), dweight_cpu, "strided rmsnorm dweight", 1e-5);
    }
    {
        INFO("layernorm");
        std::vector<T> out_cpu = out, dinp_cpu = dinp;
        std::vector<float> mean_cpu(N), rstd_cpu(N), dweight_cpu = dweight_start, dbias_cpu = dbias_start;
        layernorm_forward_cpu(out_cpu.data(), mean_cpu.data(), rstd_cpu.data(), inp.data(), weight.data(), bias.data(),
                              N, C, stride, 1e-5f);
        layernorm_backward_cpu(dinp_cpu.data(), dweight_cpu.data(), dbias_cpu.data(), dout.data(), inp.data(),
                               weight.data(), mean_cpu.data(), rstd_cpu.data(), N, C, stride, accumulate);
        DeviceArray<T> d_inp(inp), d_dout(dout), d_weight(weight), d_bias(bias), d_out(out), d_dinp(dinp);
        DeviceArray<float> d_mean(N), d_rstd(N), d_dweight(dweight_start), d_dbias(dbias_start);
        layernorm_forward(d_out.ptr, d_mean.ptr, d_rstd.ptr, d_inp.ptr, d_weight.ptr, d_bias.ptr, N, C, stride, 1e-5f, 0);
        layernorm_backward(d_dinp.ptr, d_dweight.ptr, d_dbias.ptr, d_dout.ptr, d_inp.ptr, d_weight.ptr, d_mean.ptr,
                           d_rstd.ptr, N, C, stride, accumulate, 0);
        check_close_stored(d_out.to_host(), out_cpu, "strided layernorm out");
        check_close(d_mean.to_host(), mean_cpu, "strided layernorm mean");
        check_close(d_rstd.to_host(), rstd_cpu, "strided layernorm rstd", 1e-6);
        check_close_stored(d_dinp.to_host(), dinp_cpu, "strided layernorm dinp");
        check_close(d_dweight.to_host(), dweight_cpu, "strided layernorm dweight", 1e-5);
        check_close(d_dbias.to_host(), dbias_cpu, "strided layernorm dbias", 1e-5);
    }
}

TEST_CASE("norm kernels over rows with a stride match the CPU and leave the elements between rows alone",
          "[kernels][bf16]") {
    // (N, C, stride): q, k or v of qkv at C 512 (RMSNorm's fused 16-byte backward) and C 40 (16-byte,
    // small rows), at C 2056 (the 16-byte input gradient and weight vector kernel); the fallback at
    // odd C and where C is whole 16-byte chunks but the stride is not; and packed rows
    const int shapes[][3] = {{67, 512, 1536}, {33, 40, 120}, {21, 2056, 6168}, {37, 13, 39}, {29, 16, 21}, {9, 24, 24}};
    for (const auto& s : shapes) {
        for (bool accumulate : {true, false}) {
            INFO("N " << s[0] << " C " << s[1] << " stride " << s[2] << " accumulate " << accumulate);
            check_norms_strided<float>(s[0], s[1], s[2], accumulate);
            check_norms_strided<bf16>(s[0], s[1], s[2], accumulate);
        }
    }
}
