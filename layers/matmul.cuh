/*
Matrix multiply for the linear layers: out = inp @ weight^T, with weight in the (out, in) layout
that Hugging Face checkpoints use. Every projection in the model goes through here: q/k/v, o,
gate/up, down and the LM head.

The CPU reference is one small blocked GEMM, C (M, N) += A (M, K) @ B (K, N), where A and B are
read through strides, so a transposed operand costs nothing extra to express. The three products
a linear layer needs are the same GEMM with different strides:
    forward       out   (N, OC)  = inp  (N, IC)  @ weight^T (IC, OC)
    backward      dinp  (N, IC) += dout (N, OC)  @ weight   (OC, IC)
                  dweight (OC, IC) += dout^T (OC, N) @ inp  (N, IC)
The GEMM copies blocks of A and B into small contiguous panels ("packing") so that the inner
kernel reads memory in order and keeps a MR x NR tile of C in registers; this is the classic
structure of fast CPU GEMMs, kept as plain loops that the compiler vectorises.
*/
#pragma once

#include <algorithm>
#include <cstring>
#include <vector>

#include "../common.h"

// ---- CPU reference

// Register tile of C held by the inner kernel, the depth of one packed block of K, and the
// width of the block of B kept in cache.
constexpr int GEMM_MR = 6;
constexpr int GEMM_NR = 32;
constexpr int GEMM_KC = 256;
constexpr int GEMM_NC = 512;   // columns of B per cache block: a (KC, NC) fp32 block is 512 KB

// The inner kernel: C tile (MR, NR) += A panel (MR, kc) @ B panel (kc, NR).
// A panel is stored k-major (MR values per k), B panel k-major (NR values per k).
// rows/cols < MR/NR at the edges of C: the full tile is computed, only the valid part stored.
inline void gemm_tile_cpu(real* C, int ldc, const real* a_panel, const real* b_panel,
                                 int kc, int rows, int cols) {
    real acc[GEMM_MR][GEMM_NR] = {};
    for (int k = 0; k < kc; k++) {
        const real* a = a_panel + (size_t)k * GEMM_MR;
        const real* b = b_panel + (size_t)k * GEMM_NR;
        for (int m = 0; m < GEMM_MR; m++) {
            for (int n = 0; n < GEMM_NR; n++) acc[m][n] += a[m] * b[n];
        }
    }
    for (int m = 0; m < rows; m++) {
        for (int n = 0; n < cols; n++) C[(size_t)m * ldc + n] += acc[m][n];
    }
}

// Copy a (rows, kc) block of a strided matrix into strips of `width` rows, each strip k-major
// (width values per k), zero-padded past `rows`. The loops run along whichever stride is 1, so
// that both plain and transposed operands are read in memory order.
inline void gemm_pack_cpu(real* packed, const real* X, size_t x_row, size_t x_col,
                          int rows, int kc, int width) {
    int strips = (rows + width - 1) / width;
    if (x_row == 1) {
        // columns of X are contiguous: walk k outer, rows inner
        #pragma omp parallel for
        for (int k = 0; k < kc; k++) {
            for (int s = 0; s < strips; s++) {
                real* dst = packed + ((size_t)s * kc + k) * width;
                for (int i = 0; i < width; i++) {
                    int r = s * width + i;
                    dst[i] = r < rows ? X[(size_t)r + (size_t)k * x_col] : real(0);
                }
            }
        }
    } else {
        // rows of X are contiguous (or neither is): walk rows outer, k inner
        #pragma omp parallel for
        for (int s = 0; s < strips; s++) {
            for (int i = 0; i < width; i++) {
                int r = s * width + i;
                real* dst = packed + (size_t)s * kc * width + i;
                for (int k = 0; k < kc; k++) {
                    dst[(size_t)k * width] = r < rows ? X[(size_t)r * x_row + (size_t)k * x_col] : real(0);
                }
            }
        }
    }
}

// C (M, N) += A (M, K) @ B (K, N). C is row-major with row stride N. Element (m, k) of A is
// A[m * a_row + k * a_col]; element (k, n) of B is B[k * b_row + n * b_col].
inline void gemm_accumulate_cpu(real* C, const real* A, size_t a_row, size_t a_col,
                                const real* B, size_t b_row, size_t b_col, int M, int N, int K) {
    int m_strips = (M + GEMM_MR - 1) / GEMM_MR;
    int n_panels = (N + GEMM_NR - 1) / GEMM_NR;
    std::vector<real> a_packed((size_t)m_strips * GEMM_MR * GEMM_KC);   // (m_strips, KC, MR)
    std::vector<real> b_packed((size_t)n_panels * GEMM_NR * GEMM_KC);   // (n_panels, KC, NR)
    for (int k0 = 0; k0 < K; k0 += GEMM_KC) {
        int kc = std::min(GEMM_KC, K - k0);
        // B's columns play the role of rows in its panels: B^T has strides (b_col, b_row)
        gemm_pack_cpu(a_packed.data(), A + (size_t)k0 * a_col, a_row, a_col, M, kc, GEMM_MR);
        gemm_pack_cpu(b_packed.data(), B + (size_t)k0 * b_row, b_col, b_row, N, kc, GEMM_NR);
        // every (strip, panel) tile of C is independent. Panels go in blocks of GEMM_NC columns
        // so that one (kc, GEMM_NC) block of B stays in cache while every strip of A passes it.
        int panel_blocks = (n_panels + GEMM_NC / GEMM_NR - 1) / (GEMM_NC / GEMM_NR);
        #pragma omp parallel for collapse(2) schedule(static)
        for (int block = 0; block < panel_blocks; block++) {
            for (int strip = 0; strip < m_strips; strip++) {
                int rows = std::min(GEMM_MR, M - strip * GEMM_MR);
                const real* a_strip = a_packed.data() + (size_t)strip * kc * GEMM_MR;
                int p_end = std::min(n_panels, (block + 1) * (GEMM_NC / GEMM_NR));
                for (int p = block * (GEMM_NC / GEMM_NR); p < p_end; p++) {
                    int cols = std::min(GEMM_NR, N - p * GEMM_NR);
                    gemm_tile_cpu(C + (size_t)strip * GEMM_MR * N + (size_t)p * GEMM_NR, N, a_strip,
                                  b_packed.data() + (size_t)p * kc * GEMM_NR, kc, rows, cols);
                }
            }
        }
    }
}

// out (N, OC) = inp (N, IC) @ weight^T, weight (OC, IC)
inline void matmul_forward_cpu(real* out, const real* inp, const real* weight, int N, int IC, int OC) {
    memset(out, 0, (size_t)N * OC * sizeof(real));
    gemm_accumulate_cpu(out, inp, IC, 1, weight, 1, IC, N, OC, IC);
}

// dinp (N, IC) += dout (N, OC) @ weight (OC, IC); dweight (OC, IC) += dout^T @ inp (N, IC)
inline void matmul_backward_cpu(real* dinp, real* dweight, const real* dout, const real* inp,
                         const real* weight, int N, int IC, int OC) {
    gemm_accumulate_cpu(dinp, dout, OC, 1, weight, IC, 1, N, IC, OC);
    gemm_accumulate_cpu(dweight, dout, 1, OC, inp, IC, 1, OC, IC, N);
}

#if defined(__CUDACC__) || defined(MIXLN_CUDA_EMULATION)
#include "../cuda_common.h"

#ifdef MIXLN_CUDA_EMULATION
// ---- launchers, emulated build: cuBLASLt cannot run on the CPU, so the launchers call the CPU
// twin on the (host) memory the emulation hands out. The matmul is checked only on a GPU.

inline void matmul_forward(float* out, const float* inp, const float* weight, int N, int IC, int OC, cudaStream_t) {
    matmul_forward_cpu(out, inp, weight, N, IC, OC);
}

inline void matmul_backward(float* dinp, float* dweight, const float* dout, const float* inp, const float* weight,
                            int N, int IC, int OC, cudaStream_t) {
    matmul_backward_cpu(dinp, dweight, dout, inp, weight, N, IC, OC);
}

#else
// ---- cuBLASLt
// One handle and one workspace for the whole program, created on first use. cuBLASLt is
// column-major: a row-major (R, C) matrix is a column-major (C, R) one, so every product below is
// written for the transposed matrices. fp32 in, fp32 out, fp32 accumulation (no TF32).
#include <cublasLt.h>

inline void cublas_check(cublasStatus_t status, const char* file, int line) {
    if (status != CUBLAS_STATUS_SUCCESS) fail("cuBLASLt error %d at %s:%d", (int)status, file, line);
}
#define CUBLAS_CHECK(call) cublas_check((call), __FILE__, __LINE__)

struct CublasLt {
    cublasLtHandle_t handle = nullptr;
    void* workspace = nullptr;
    size_t workspace_bytes = 32u << 20;   // 32 MiB, what cuBLASLt asks for on Hopper
};

inline CublasLt& cublaslt() {
    static CublasLt instance;
    if (instance.handle == nullptr) {
        CUBLAS_CHECK(cublasLtCreate(&instance.handle));
        CUDA_CHECK(cudaMalloc(&instance.workspace, instance.workspace_bytes));
    }
    return instance;
}

// Column-major D (m, n) = op(A) (m, k) @ op(B) (k, n) + beta * D.
inline void cublaslt_gemm(bool transpose_a, bool transpose_b, int m, int n, int k, const float* A, int lda,
                          const float* B, int ldb, float* D, int ldd, float beta, cudaStream_t stream) {
    CublasLt& lt = cublaslt();
    cublasLtMatmulDesc_t desc;
    CUBLAS_CHECK(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    cublasOperation_t op_a = transpose_a ? CUBLAS_OP_T : CUBLAS_OP_N, op_b = transpose_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof(op_a)));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof(op_b)));
    // layouts describe the matrices as stored, before the transposes
    cublasLtMatrixLayout_t a_layout, b_layout, d_layout;
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&a_layout, CUDA_R_32F, transpose_a ? k : m, transpose_a ? m : k, lda));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&b_layout, CUDA_R_32F, transpose_b ? n : k, transpose_b ? k : n, ldb));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d_layout, CUDA_R_32F, m, n, ldd));
    cublasLtMatmulPreference_t preference;
    CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&preference));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                      &lt.workspace_bytes, sizeof(lt.workspace_bytes)));
    cublasLtMatmulHeuristicResult_t heuristic;
    int found = 0;
    CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(lt.handle, desc, a_layout, b_layout, d_layout, d_layout, preference, 1,
                                                &heuristic, &found));
    if (found == 0) fail("cuBLASLt found no algorithm for a (%d, %d, %d) product", m, n, k);
    const float alpha = 1.0f;
    CUBLAS_CHECK(cublasLtMatmul(lt.handle, desc, &alpha, A, a_layout, B, b_layout, &beta, D, d_layout, D, d_layout,
                                &heuristic.algo, lt.workspace, lt.workspace_bytes, stream));
    CUBLAS_CHECK(cublasLtMatmulPreferenceDestroy(preference));
    CUBLAS_CHECK(cublasLtMatrixLayoutDestroy(a_layout));
    CUBLAS_CHECK(cublasLtMatrixLayoutDestroy(b_layout));
    CUBLAS_CHECK(cublasLtMatrixLayoutDestroy(d_layout));
    CUBLAS_CHECK(cublasLtMatmulDescDestroy(desc));
}

// ---- launchers

// out (N, OC) = inp (N, IC) @ weight^T: column-major out^T (OC, N) = weight^T' (OC, IC) @ inp^T (IC, N)
inline void matmul_forward(float* out, const float* inp, const float* weight, int N, int IC, int OC, cudaStream_t stream) {
    cublaslt_gemm(true, false, OC, N, IC, weight, IC, inp, IC, out, OC, 0.0f, stream);
}

// dinp (N, IC) += dout @ weight: column-major dinp^T (IC, N) += weight^T (IC, OC) @ dout^T (OC, N)
// dweight (OC, IC) += dout^T @ inp: column-major dweight^T (IC, OC) += inp^T (IC, N) @ dout (N, OC)
inline void matmul_backward(float* dinp, float* dweight, const float* dout, const float* inp, const float* weight,
                            int N, int IC, int OC, cudaStream_t stream) {
    cublaslt_gemm(false, false, IC, N, OC, weight, IC, dout, OC, dinp, IC, 1.0f, stream);
    cublaslt_gemm(false, true, IC, OC, N, inp, IC, dout, OC, dweight, IC, 1.0f, stream);
}
#endif
#endif
