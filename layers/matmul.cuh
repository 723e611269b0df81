/*
Matrix multiply for the linear layers: out = inp @ weight^T, with weight in the (out, in) layout
that Hugging Face checkpoints use. Every projection in the model goes through here: q/k/v, o,
gate/up, down and the LM head.

The CPU reference is one small blocked GEMM, C (M, N) += A (M, K) @ B (K, N), where A and B are
read through strides, so a transposed operand costs nothing extra to express. The three products
a linear layer needs are the same GEMM with different strides:
    forward       out   (N, OC)  = inp  (N, IC)  @ weight^T (IC, OC)
    backward      dinp  (N, IC)  = dinp_scale * dinp + dout (N, OC) @ weight (OC, IC)
                  dweight (OC, IC) = dweight_scale * dweight + dout^T (OC, N) @ inp  (N, IC)
The GEMM copies blocks of A and B into small contiguous panels ("packing") so that the inner
kernel reads memory in order and keeps a MR x NR tile of C in registers; this is the classic
structure of fast CPU GEMMs, kept as plain loops; only the inner kernel names its SIMD registers
(GCC's vector extension), so that its tile stays in registers on any x86 target.

Storage types. inp, weight, dout, out and dinp are T (float, double in the CPU-only fd build, or
bf16); dweight is G (float, or bf16 in --precision bf16-pure). The arithmetic is always in real
(the GPU: fp32 accumulation), and each output is rounded ONCE, where it is stored:
    out     = round(inp @ weight^T)
    dinp    = round(dinp_scale * dinp_old + dout @ weight)   (the sum of products first, then + old)
    dweight = round(dweight_scale * dweight_old + dout^T @ inp)
which is what cuBLASLt computes with fp32 compute type, alpha = 1 and beta = 0, 1 or dinp_scale:
D = round_D(alpha * sum + beta * C), in fp32 up to the final conversion to D's type. The CPU twin
converts bf16 operands to real while it packs them (the packing copies them anyway, so this costs
no extra pass), sums in real into a real buffer and rounds into the bf16 output. When the output
type is real itself the GEMM accumulates straight into the output, as it always did (the old
value is then where the sum starts rather than added at the end: a difference of fp32 rounding
only, and no copy on the fp32 path); with beta 0 the first block of K stores its sums instead of
adding them to zeros, so the output is neither zeroed nor read.

dinp_scale is 1 except where a residual stream scaled by DeepNorm's a meets its branch: there
d(h) = a * d(s) + (the branch's input gradient), and passing a here sums the two in fp32 and
rounds once (model_backward), where scaling d(s) into the buffer first would round twice.
dweight_scale is 1 (accumulate, as gradient accumulation needs) or 0: the first backward pass
after model_zero_grad writes the weight gradient and never reads the old one, so the gradients
need no zeroing pass and the product no read of the zeros (and a bf16 dweight no fp32 scratch).
With beta 0 the old value is never read, NaN or not.
*/
#pragma once

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../common.h"

// ---- CPU reference

// The inner kernel's registers. One SIMD register of real values is written with GCC's (and
// Clang's) vector extension, not intrinsics: the width the target has (-march), 16 floats where
// it has AVX-512, 8 with AVX2, 4 otherwise. The kernel keeps a tile of C of MR rows and two
// registers' width in registers: 12 accumulators, plus the 2 values of B and the broadcast A,
// fit AVX2's 16 registers (and AVX-512's 32). Plain loops over a float tile left this to the
// auto-vectoriser, which got it right only where the tile happened to fit: on an AVX2 machine a
// 6 x 32 float tile needs 24 registers, and 9 of them went to the stack and back every k
// (dev/PERF.md, CPU 2026-11-30, fourth session: the GEMM ran 1.7x slower).
#if defined(__AVX512F__)
constexpr int GEMM_VEC_BYTES = 64;
#elif defined(__AVX__)
constexpr int GEMM_VEC_BYTES = 32;
#else
constexpr int GEMM_VEC_BYTES = 16;
#endif
typedef real gemm_vec __attribute__((vector_size(GEMM_VEC_BYTES)));   // GEMM_VEC values of real
constexpr int GEMM_VEC = GEMM_VEC_BYTES / (int)sizeof(real);

// Register tile of C held by the inner kernel, the depth of one packed block of K, and the
// width of the block of B kept in cache.
constexpr int GEMM_MR = 6;
constexpr int GEMM_NR = 2 * GEMM_VEC;
constexpr int GEMM_KC = 256;
constexpr int GEMM_NC = 512;   // columns of B per cache block: a (KC, NC) fp32 block is 512 KB

// The inner kernel: C tile (MR, NR) += A strip (MR, kc) @ B panel (kc, NR), or = with store.
// The B panel is stored k-major (NR values per k). The A strip is read through a stride:
//   A_ROWS_APART false: element (m, k) at a[k * a_stride + m], MR values side by side per k (a
//                       packed strip, a_stride MR, or a column-major A read in place);
//   A_ROWS_APART true:  element (m, k) at a[m * a_stride + k], MR rows of kc values (a row-major
//                       A read in place).
// rows/cols < MR/NR at the edges of C: the full tile is computed, only the valid part stored.
// Each element of C is summed over k in order, whatever the tile's shape or A's layout.
template <bool A_ROWS_APART>
inline void gemm_tile_cpu(real* C, int ldc, const real* a_strip, size_t a_stride, const real* b_panel,
                          int kc, int rows, int cols, bool store) {
    gemm_vec acc[GEMM_MR][2] = {};   // (MR, NR): row m is acc[m][0] then acc[m][1]
    for (int k = 0; k < kc; k++) {
        // row k of the B panel, NR values, into two registers
        gemm_vec b_left, b_right;
        memcpy(&b_left, b_panel + (size_t)k * GEMM_NR, sizeof(gemm_vec));
        memcpy(&b_right, b_panel + (size_t)k * GEMM_NR + GEMM_VEC, sizeof(gemm_vec));
        // each row of the tile += its A value (broadcast) times that row of B
        for (int m = 0; m < GEMM_MR; m++) {
            real a = A_ROWS_APART ? a_strip[(size_t)m * a_stride + k] : a_strip[(size_t)k * a_stride + m];
            acc[m][0] += a * b_left;
            acc[m][1] += a * b_right;
        }
    }
    // store (or add) the valid part of the tile
    for (int m = 0; m < rows; m++) {
        real* c_row = C + (size_t)m * ldc;
        real tile_row[GEMM_NR];
        memcpy(tile_row, acc[m], sizeof(tile_row));
        if (store) {
            for (int n = 0; n < cols; n++) c_row[n] = tile_row[n];
        } else {
            for (int n = 0; n < cols; n++) c_row[n] += tile_row[n];
        }
    }
}

// Copy a (rows, kc) block of a strided matrix into strips of `width` rows, each strip k-major
// (width values per k), zero-padded past `rows`. The loops run along whichever stride is 1, so
// that both plain and transposed operands are read in memory order.
// X may be stored in any type that to_real reads (float, double, bf16): it is converted here.
template <typename S>
inline void gemm_pack_cpu(real* packed, const S* X, size_t x_row, size_t x_col,
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
                    dst[i] = r < rows ? to_real(X[(size_t)r + (size_t)k * x_col]) : real(0);
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
                    dst[(size_t)k * width] = r < rows ? to_real(X[(size_t)r * x_row + (size_t)k * x_col]) : real(0);
                }
            }
        }
    }
}

// The GEMM's packing buffers: one workspace for the program, like cuBLASLt's below, grown to the
// largest product on first use, page-aligned. Allocated per call from the heap they landed
// wherever the heap had room, and that mattered: on a 2-core EPYC the same code ran a training step
// 15% faster or slower depending on the heap's layout (dev/PERF.md, 2026-11-30), page-aligned at
// the fast end every time. Not thread-safe: the model runs its products from one host thread.
struct GemmWorkspace {
    real* buffers[2] = {nullptr, nullptr};   // packed A, packed B
    size_t capacities[2] = {0, 0};           // in values
};

// Buffer `which` of the workspace, with room for at least n values.
inline real* gemm_workspace(int which, size_t n) {
    static GemmWorkspace workspace;
    if (n > workspace.capacities[which]) {
        size_t bytes = (n * sizeof(real) + 4095) / 4096 * 4096;
        free(workspace.buffers[which]);
        workspace.buffers[which] = (real*)aligned_alloc(4096, bytes);
        if (workspace.buffers[which] == nullptr) fail("out of memory allocating %zu bytes for the GEMM's packing", bytes);
        workspace.capacities[which] = bytes / sizeof(real);
    }
    return workspace.buffers[which];
}

// C (M, N) += A (M, K) @ B (K, N), or C = A @ B with overwrite (the old C never read: the first
// block of K stores its sums, the later ones add). C is row-major with row stride N. Element
// (m, k) of A is A[m * a_row + k * a_col]; element (k, n) of B is B[k * b_row + n * b_col]. A and B
// are stored as S (converted to real when packed); C is real.
//
// A is read where it lies, not packed, when it is stored as real with one of its strides 1 (every
// product of the model: inp and dout row-major, dout^T column-major): only its last strip, when M
// is not a multiple of MR, is packed (zero-padded). A strip of MR rows by KC values is 6 KB of
// fp32 either way, in L1 while a block of B passes it, so packing it only copied it: 10 to 15% of
// the GEMM's time where N is small (the 12 x 128 model's C = 128; dev/PERF.md, 2026-12-01).
template <typename S>
inline void gemm_accumulate_cpu(real* C, const S* A, size_t a_row, size_t a_col,
                                const S* B, size_t b_row, size_t b_col, int M, int N, int K, bool overwrite = false) {
    if (overwrite && K == 0) memset(C, 0, (size_t)M * N * sizeof(real));   // no block of K to store
    int m_strips = (M + GEMM_MR - 1) / GEMM_MR;
    int n_panels = (N + GEMM_NR - 1) / GEMM_NR;
    bool a_in_place = std::is_same_v<S, real> && (a_col == 1 || a_row == 1);
    int first_packed_strip = a_in_place ? M / GEMM_MR : 0;   // strips before it are read in place
    real* a_packed = gemm_workspace(0, (size_t)(m_strips - first_packed_strip) * GEMM_MR * GEMM_KC);   // (strips, KC, MR)
    real* b_packed = gemm_workspace(1, (size_t)n_panels * GEMM_NR * GEMM_KC);   // (n_panels, KC, NR)
    const real* a_real = nullptr;   // A itself, where it is read in place
    if constexpr (std::is_same_v<S, real>) a_real = A;
    for (int k0 = 0; k0 < K; k0 += GEMM_KC) {
        int kc = std::min(GEMM_KC, K - k0);
        // B's columns play the role of rows in its panels: B^T has strides (b_col, b_row)
        if (first_packed_strip < m_strips) {
            gemm_pack_cpu(a_packed, A + (size_t)k0 * a_col + (size_t)first_packed_strip * GEMM_MR * a_row, a_row,
                          a_col, M - first_packed_strip * GEMM_MR, kc, GEMM_MR);
        }
        gemm_pack_cpu(b_packed, B + (size_t)k0 * b_row, b_col, b_row, N, kc, GEMM_NR);
        // every (strip, panel) tile of C is independent. Panels go in blocks of GEMM_NC columns
        // so that one (kc, GEMM_NC) block of B stays in cache while every strip of A passes it.
        int panel_blocks = (n_panels + GEMM_NC / GEMM_NR - 1) / (GEMM_NC / GEMM_NR);
        #pragma omp parallel for collapse(2) schedule(static)
        for (int block = 0; block < panel_blocks; block++) {
            for (int strip = 0; strip < m_strips; strip++) {
                int rows = std::min(GEMM_MR, M - strip * GEMM_MR);
                // the strip's A: in place (row-major: rows a_row apart; column-major: MR values
                // side by side, k a_col apart), or its packed copy
                bool rows_apart = strip < first_packed_strip && a_col == 1;
                const real* a_strip;
                size_t a_stride;
                if (strip < first_packed_strip) {
                    a_strip = a_real + (size_t)k0 * a_col + (size_t)strip * GEMM_MR * a_row;
                    a_stride = rows_apart ? a_row : a_col;
                } else {
                    a_strip = a_packed + (size_t)(strip - first_packed_strip) * kc * GEMM_MR;
                    a_stride = GEMM_MR;
                }
                int p_end = std::min(n_panels, (block + 1) * (GEMM_NC / GEMM_NR));
                for (int p = block * (GEMM_NC / GEMM_NR); p < p_end; p++) {
                    int cols = std::min(GEMM_NR, N - p * GEMM_NR);
                    real* c_tile = C + (size_t)strip * GEMM_MR * N + (size_t)p * GEMM_NR;
                    const real* b_panel = b_packed + (size_t)p * kc * GEMM_NR;
                    if (rows_apart) {
                        gemm_tile_cpu<true>(c_tile, N, a_strip, a_stride, b_panel, kc, rows, cols, overwrite && k0 == 0);
                    } else {
                        gemm_tile_cpu<false>(c_tile, N, a_strip, a_stride, b_panel, kc, rows, cols, overwrite && k0 == 0);
                    }
                }
            }
        }
    }
}

// C (M, N) = beta * C + A @ B for C stored as Out (beta 0: C = A @ B, the old C never read).
// Out = real: straight into C (scaled first when beta is not 0 or 1). Otherwise the product goes
// into a zeroed real buffer and each element is rounded once: C = round(beta * C_old + product).
template <typename Out, typename S>
inline void gemm_store_cpu(Out* C, real beta, const S* A, size_t a_row, size_t a_col,
                           const S* B, size_t b_row, size_t b_col, int M, int N, int K) {
    size_t count = (size_t)M * N;
    if constexpr (std::is_same_v<Out, real>) {
        if (beta != 0 && beta != 1) {
            #pragma omp parallel for
            for (size_t i = 0; i < count; i++) C[i] *= beta;
        }
        gemm_accumulate_cpu(C, A, a_row, a_col, B, b_row, b_col, M, N, K, beta == 0);   // beta 0: stored
    } else {
        std::vector<real> product(count);   // (M, N)
        gemm_accumulate_cpu(product.data(), A, a_row, a_col, B, b_row, b_col, M, N, K, true);
        // round once into the output, after adding the old value in real
        #pragma omp parallel for
        for (size_t i = 0; i < count; i++) {
            C[i] = from_real<Out>(beta != 0 ? beta * to_real(C[i]) + product[i] : product[i]);
        }
    }
}

// out (N, OC) = inp (N, IC) @ weight^T, weight (OC, IC)
template <typename T>
inline void matmul_forward_cpu(T* out, const T* inp, const T* weight, int N, int IC, int OC) {
    gemm_store_cpu(out, real(0), inp, IC, 1, weight, 1, IC, N, OC, IC);
}

// dinp (N, IC) = dinp_scale * dinp + dout (N, OC) @ weight (OC, IC);
// dweight (OC, IC) = dweight_scale * dweight + dout^T @ inp (N, IC)   (dweight_scale 0 or 1)
template <typename T, typename G>
inline void matmul_backward_cpu(T* dinp, G* dweight, const T* dout, const T* inp, const T* weight,
                                int N, int IC, int OC, float dinp_scale, float dweight_scale) {
    gemm_store_cpu(dinp, (real)dinp_scale, dout, OC, 1, weight, IC, 1, N, IC, OC);
    gemm_store_cpu(dweight, (real)dweight_scale, dout, 1, OC, inp, IC, 1, OC, IC, N);
}

#if defined(__CUDACC__) || defined(MIXLN_CUDA_EMULATION)
#include "../cuda_common.h"

#ifdef MIXLN_CUDA_EMULATION
// ---- launchers, emulated build: cuBLASLt cannot run on the CPU, so the launchers call the CPU
// twin on the (host) memory the emulation hands out. The matmul is checked against the CPU twin
// only on a GPU; in emulation the bf16 twin is checked against a naive product in double.

template <typename T>
inline void matmul_forward(T* out, const T* inp, const T* weight, int N, int IC, int OC, cudaStream_t) {
    matmul_forward_cpu(out, inp, weight, N, IC, OC);
}

template <typename T, typename G>
inline void matmul_backward(T* dinp, G* dweight, const T* dout, const T* inp, const T* weight,
                            int N, int IC, int OC, float dinp_scale, float dweight_scale, cudaStream_t) {
    // the cuBLASLt build's restriction (see below), so that the emulated build rejects it too
    static_assert(!(std::is_same_v<T, float> && std::is_same_v<G, bf16>),
                  "cuBLASLt has no fp32 x fp32 -> bf16 product: with fp32 activations, G must be float");
    matmul_backward_cpu(dinp, dweight, dout, inp, weight, N, IC, OC, dinp_scale, dweight_scale);
}

#else
// ---- cuBLASLt
// One handle and one workspace for the whole program, created on first use. cuBLASLt is
// column-major: a row-major (R, C) matrix is a column-major (C, R) one, so every product below is
// written for the transposed matrices. Compute type CUBLAS_COMPUTE_32F with scale type
// CUDA_R_32F: fp32 accumulation, and for fp32 operands true fp32 (no TF32, which needs
// CUBLAS_COMPUTE_32F_FAST_TF32).
//
// Type combinations used, all in the cublasLtMatmul table of supported types for
// CUBLAS_COMPUTE_32F / CUDA_R_32F (https://docs.nvidia.com/cuda/cublas/#cublasltmatmul), where C
// and D always have the same type:
//     A, B           C, D
//     CUDA_R_32F     CUDA_R_32F      fp32 (forward, backward)
//     CUDA_R_16BF    CUDA_R_16BF     bf16 activations (forward, dinp), bf16-pure dweight
//     CUDA_R_16BF    CUDA_R_32F      bf16 activations with an fp32 dweight (--precision bf16)
// fp32 A/B with a bf16 C/D is NOT in the table; matmul_backward rejects T = float, G = bf16 at
// compile time.
//
// Alignment: the heuristic assumes by default that every pointer is 256-byte aligned
// (CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_{A,B,C,D}_BYTES, default 256) and may pick an algorithm that
// needs it. The pointers here can point into the middle of one big allocation (one weight among
// all parameters), so the actual alignment of each pointer (a power of two up to 256) is passed
// to the heuristic, which then excludes the algorithms that need more. Pointers must still be
// aligned to their element size; 16-byte aligned pointers and leading dimensions that are
// multiples of 16 bytes (8 bf16 or 4 fp32 elements) let the vectorised tensor-core algorithms
// run; anything less gets slower algorithms (the GPU test multiplies a 2-byte aligned bf16 weight
// and odd leading dimensions).
//
// Rounding with a bf16 D: split-K algorithms may reduce their partial sums "in place" in D or in
// a buffer of D's type (CUBLASLT_REDUCTION_SCHEME_INPLACE / _OUTPUT_TYPE), which would round each
// partial sum to bf16. For a bf16 D only the schemes NONE and COMPUTE_TYPE (partials in fp32 in
// the workspace) are allowed, so every output is rounded once, as in the CPU twin. fp32 outputs
// keep every scheme (their partials are fp32 either way).
// Accumulating into a bf16 D (beta != 0) is not left to cuBLASLt: on an H200 (2026-11-29) it
// returned round(C + round(A B)) for dweight += dout^T inp at N = 64, IC = 128, OC = 96, two bf16
// steps from round(C + A B) where C and A B nearly cancel (C -0.381, A B 0.615: the product was
// rounded at its own, larger magnitude). So the product goes to an fp32 scratch buffer (beta 0,
// fp32 D) and add_product_kernel stores round(beta * C + product) once per element. The scratch
// belongs to the handle and grows to the largest such product on first use (in the first step).
//
// The heuristic's choice is cached per (transposes, shape, leading dimensions, types, pointer
// alignments): everything the heuristic query sees, so a cached algorithm is exactly the one a new
// query would return. Not thread-safe: the model calls the matmuls from one host thread.
#include <cublasLt.h>

#include <array>
#include <cstdint>
#include <map>

inline void cublas_check(cublasStatus_t status, const char* file, int line) {
    if (status != CUBLAS_STATUS_SUCCESS) fail("cuBLASLt error %d at %s:%d", (int)status, file, line);
}
#define CUBLAS_CHECK(call) cublas_check((call), __FILE__, __LINE__)

typedef std::array<int64_t, 13> CublasLtAlgoKey;

struct CublasLt {
    cublasLtHandle_t handle = nullptr;
    void* workspace = nullptr;
    size_t workspace_bytes = 32u << 20;   // 32 MiB, what cuBLASLt asks for on Hopper
    std::map<CublasLtAlgoKey, cublasLtMatmulAlgo_t> algos;   // heuristic results already queried
    float* product = nullptr;             // fp32 scratch for products accumulated into bf16 (see above)
    size_t product_capacity = 0;          // its size in floats
};

inline CublasLt& cublaslt() {
    static CublasLt instance;
    if (instance.handle == nullptr) {
        CUBLAS_CHECK(cublasLtCreate(&instance.handle));
        CUDA_CHECK(cudaMalloc(&instance.workspace, instance.workspace_bytes));
    }
    return instance;
}

// The cuBLAS data type of a storage type.
template <typename T>
constexpr cudaDataType_t cuda_data_type() {
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, bf16>, "cuBLASLt matmul: float or bf16 only");
    return std::is_same_v<T, float> ? CUDA_R_32F : CUDA_R_16BF;
}

// The largest power of two, up to 256, that divides the address.
inline uint32_t pointer_alignment(const void* p) {
    uintptr_t address = (uintptr_t)p;
    uint32_t alignment = 1;
    while (alignment < 256 && address % (alignment * 2) == 0) alignment *= 2;
    return alignment;
}

// d (count) = round(beta * d + product), one rounding per element
static __global__ void add_product_kernel(bf16* d, const float* product, float beta, size_t count) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < count) d[i] = __float2bfloat16_rn(beta * __bfloat162float(d[i]) + product[i]);
}
// The same, 8 elements a thread in 16-byte loads and stores (count a multiple of 8, d and product
// 16-byte aligned): one 2-byte load and store a thread kept too few bytes in flight to stream the
// (B T, C) gradients of the Post-LN layers
static __global__ void add_product_vector_kernel(bf16* d, const float* product, float beta, size_t count) {
    size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (i >= count) return;
    Vector16<bf16> values = load_vector16(d + i);
    Vector16<float> products[2] = {load_vector16(product + i), load_vector16(product + i + 4)};
    for (int e = 0; e < 8; e++)
        values.values[e] = __float2bfloat16_rn(beta * __bfloat162float(values.values[e]) + products[e / 4].values[e % 4]);
    store_vector16(d + i, values);
}

// Column-major D (m, n) = op(A) (m, k) @ op(B) (k, n) + beta * D, A and B of type ab_type, D of
// type cd_type (see above for the supported pairs).
inline void cublaslt_gemm(bool transpose_a, bool transpose_b, int m, int n, int k, const void* A, int lda,
                          const void* B, int ldb, void* D, int ldd, float beta, cudaDataType_t ab_type,
                          cudaDataType_t cd_type, cudaStream_t stream) {
    CublasLt& lt = cublaslt();
    if (cd_type == CUDA_R_16BF && beta != 0.0f) {
        // accumulating into bf16: the product in fp32 first, then one rounding per element (above)
        if (ldd != m) fail("cuBLASLt bf16 accumulation needs a contiguous D (ldd %d, m %d)", ldd, m);
        size_t count = (size_t)m * n;
        if (count > lt.product_capacity) {
            CUDA_CHECK(cudaFree(lt.product));   // synchronises: no product in flight uses it
            CUDA_CHECK(cudaMalloc((void**)&lt.product, count * sizeof(float)));
            lt.product_capacity = count;
        }
        cublaslt_gemm(transpose_a, transpose_b, m, n, k, A, lda, B, ldb, lt.product, m, 0.0f, ab_type, CUDA_R_32F,
                      stream);
        const int block = 256;
        if (count % 8 == 0 && pointer_alignment(D) >= 16) {
            size_t threads = count / 8;
            LAUNCH(add_product_vector_kernel, dim3((unsigned)((threads + block - 1) / block)), dim3(block), 0, stream,
                   (bf16*)D, (const float*)lt.product, beta, count);
        } else {
            LAUNCH(add_product_kernel, dim3((unsigned)((count + block - 1) / block)), dim3(block), 0, stream, (bf16*)D,
                   (const float*)lt.product, beta, count);
        }
        return;
    }
    cublasLtMatmulDesc_t desc;
    CUBLAS_CHECK(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    cublasOperation_t op_a = transpose_a ? CUBLAS_OP_T : CUBLAS_OP_N, op_b = transpose_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof(op_a)));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof(op_b)));
    // layouts describe the matrices as stored, before the transposes
    cublasLtMatrixLayout_t a_layout, b_layout, d_layout;
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&a_layout, ab_type, transpose_a ? k : m, transpose_a ? m : k, lda));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&b_layout, ab_type, transpose_b ? n : k, transpose_b ? k : n, ldb));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d_layout, cd_type, m, n, ldd));
    uint32_t align_a = pointer_alignment(A), align_b = pointer_alignment(B), align_d = pointer_alignment(D);
    CublasLtAlgoKey key = {transpose_a, transpose_b, m, n, k, lda, ldb, ldd, (int64_t)ab_type, (int64_t)cd_type,
                           align_a, align_b, align_d};
    auto cached = lt.algos.find(key);
    if (cached == lt.algos.end()) {
        cublasLtMatmulPreference_t preference;
        CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&preference));
        CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                          &lt.workspace_bytes, sizeof(lt.workspace_bytes)));
        // C is D (in place), so C's alignment is D's
        CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                                                          &align_a, sizeof(align_a)));
        CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                                                          &align_b, sizeof(align_b)));
        CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                                                          &align_d, sizeof(align_d)));
        CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                                                          &align_d, sizeof(align_d)));
        if (cd_type != CUDA_R_32F) {
            // partial sums of a split K stay in fp32: one rounding per output (see above)
            uint32_t schemes = CUBLASLT_REDUCTION_SCHEME_NONE | CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
            CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                                                              &schemes, sizeof(schemes)));
        }
        cublasLtMatmulHeuristicResult_t heuristic;
        int found = 0;
        CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(lt.handle, desc, a_layout, b_layout, d_layout, d_layout, preference,
                                                    1, &heuristic, &found));
        CUBLAS_CHECK(cublasLtMatmulPreferenceDestroy(preference));
        if (found == 0) fail("cuBLASLt found no algorithm for a (%d, %d, %d) product", m, n, k);
        cached = lt.algos.emplace(key, heuristic.algo).first;
    }
    const float alpha = 1.0f;
    CUBLAS_CHECK(cublasLtMatmul(lt.handle, desc, &alpha, A, a_layout, B, b_layout, &beta, D, d_layout, D, d_layout,
                                &cached->second, lt.workspace, lt.workspace_bytes, stream));
    CUBLAS_CHECK(cublasLtMatrixLayoutDestroy(a_layout));
    CUBLAS_CHECK(cublasLtMatrixLayoutDestroy(b_layout));
    CUBLAS_CHECK(cublasLtMatrixLayoutDestroy(d_layout));
    CUBLAS_CHECK(cublasLtMatmulDescDestroy(desc));
}

// ---- launchers

// out (N, OC) = inp (N, IC) @ weight^T: column-major out^T (OC, N) = weight^T' (OC, IC) @ inp^T (IC, N)
template <typename T>
inline void matmul_forward(T* out, const T* inp, const T* weight, int N, int IC, int OC, cudaStream_t stream) {
    cublaslt_gemm(true, false, OC, N, IC, weight, IC, inp, IC, out, OC, 0.0f, cuda_data_type<T>(),
                  cuda_data_type<T>(), stream);
}

// dinp (N, IC) = dinp_scale * dinp + dout @ weight: column-major dinp^T (IC, N) = weight^T (IC, OC)
// @ dout^T (OC, N) + beta dinp^T with beta = dinp_scale
// dweight (OC, IC) = dweight_scale * dweight + dout^T @ inp: column-major dweight^T (IC, OC) =
// inp^T (IC, N) @ dout (N, OC) + beta dweight^T with beta = dweight_scale
template <typename T, typename G>
inline void matmul_backward(T* dinp, G* dweight, const T* dout, const T* inp, const T* weight,
                            int N, int IC, int OC, float dinp_scale, float dweight_scale, cudaStream_t stream) {
    static_assert(!(std::is_same_v<T, float> && std::is_same_v<G, bf16>),
                  "cuBLASLt has no fp32 x fp32 -> bf16 product: with fp32 activations, G must be float");
    cublaslt_gemm(false, false, IC, N, OC, weight, IC, dout, OC, dinp, IC, dinp_scale, cuda_data_type<T>(),
                  cuda_data_type<T>(), stream);
    cublaslt_gemm(false, true, IC, OC, N, inp, IC, dout, OC, dweight, IC, dweight_scale, cuda_data_type<T>(),
                  cuda_data_type<G>(), stream);
}
#endif
#endif
