/*
AdamW, with the arithmetic in the order PyTorch's torch.optim.AdamW uses, so that 10 steps
against the PyTorch reference agree to fp32 rounding:
    p  = p * (1 - lr * weight_decay)                 decoupled weight decay
    m  = beta1 * m + (1 - beta1) * g
    v  = beta2 * v + (1 - beta2) * g^2
    p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
t counts from 1. grad_scale multiplies every gradient on the way in (global norm clipping).
Weight decay applies to every element of the call; the model calls once for the whole buffer, or
(train's --weight-decay-on matrices, the default) once per run of tensors, with weight_decay 0 for
the norms' weights and biases (model.h: model_update). The paper trains with weight decay 0.
first_index is the index of params[0] in the model's flat buffer, which only the stochastic
rounding reads: a buffer updated in pieces rounds as it would in one call.

Storage types. The parameters and both moments are P, the gradients G:
    P = float, G = float   fp32, and --precision bf16 (fp32 master weights, gradients, Adam state)
    P = bf16,  G = bf16    --precision bf16-pure (everything bf16)
    P = float, G = bf16    also instantiable (fp32 master weights and state, bf16 gradients)
Everything is computed in float (CPU: real) from the loaded values; the new m and v are computed
once, rounded once each where they are stored, and the parameter update uses the UNROUNDED new m
and v (the ones the float arithmetic produced), so with P = bf16 the three stores are
    m <- round(m'),  v <- round(v'),  p <- round(p * decay - step * (m' / (sqrt(v') / bc2 + eps)))
With P = float the rounding is the identity and the arithmetic is the same, operation for
operation, as the fp32-only version this replaced (the PyTorch comparison depends on it).
Three of the lines are written as fused multiply-adds, each rounded once, as GCC compiled the old
loop (it contracts a * b + c into an FMA where the target has one):
    m' = fma(beta1, m, (1 - beta1) * g)      v' = fma(beta2, v, ((1 - beta2) * g) * g)
    p  = fma(-step, m' / denom, p * decay)
Left as sums of products, the compiler may fuse either product, and its choice moved with the
code around it: vectorised, the update fused p * decay instead of step * (m' / denom), the same
expression with other bits. fma names the product it fuses, in the CPU twin and the GPU kernels.

On the GPU both kernels move 16-byte vectors where the pointers are 16-byte aligned (the model's
buffers are), the same expressions element by element, and take the elements past the last whole
vector one a thread.

Rounding. Stores to bf16 (bf16-pure's weights and moments) round to nearest even, as PyTorch's
bf16 training does, or, with rounding = ROUND_STOCHASTIC (--rounding stochastic), stochastically
(common.h: bf16_round_stochastic): up or down with the probabilities that make the stored value
right on average, so updates smaller than half a bf16 step are kept in expectation. Each element
draws 64 random bits from (the run's seed, t, its index in the flat buffer), 16 for each of m, v
and p, so the GPU kernels, the CPU twin and a resumed run round every value alike. fp32 stores are
exact and ignore it.

The bf16 copy of the weights. In --precision bf16 the kernels read a bf16 copy of the fp32 master
weights, each weight rounded to nearest even (__float2bfloat16_rn). The update writes it as it
goes (params_copy: each new parameter, as stored, rounded to Copy), so the step reads the master
weights once; a separate pass would read all of them again (0.28 GB a step at LLaMA-71M). Where
the weights are filled from the host, cast_copy (out = in converted element by element, rounding
to nearest even when narrowing) makes the copy. Both give the same bits, on the CPU (the _cpu
twins) and on the GPU.
*/
#pragma once

#include <cmath>
#include <type_traits>

#include "../common.h"

// ---- CPU reference

// x stored as P on the CPU: rounded to bf16 as rounding says (with random16), else as from_real
template <typename P>
inline P from_real_rounded(real x, Rounding rounding, uint32_t random16) {
#ifdef MIXLN_HAS_BF16
    if constexpr (std::is_same_v<P, bf16>) return round_to<bf16>((float)x, rounding, random16);
#endif
    (void)rounding;
    (void)random16;
    return from_real<P>(x);
}

// adamw_update's params_copy where there is none
inline constexpr float* NO_PARAMS_COPY = nullptr;

// params (n), m (n), v (n) updated in place; params_copy (n), unless null, = the new params
// rounded to Copy; grads (n). rounding and rounding_seed: how bf16 stores round; first_index: the
// index of params[0] in the whole buffer (see the top).
template <typename P, typename Copy, typename G>
inline void adamw_update_cpu(P* params, P* m, P* v, Copy* params_copy, const G* grads, size_t n, float lr,
                             float beta1, float beta2, float eps, float weight_decay, int t, float grad_scale,
                             Rounding rounding, uint64_t rounding_seed, size_t first_index) {
    double bias_correction1 = 1.0 - pow((double)beta1, t);
    double bias_correction2_sqrt = sqrt(1.0 - pow((double)beta2, t));
    real step_size = (real)(lr / bias_correction1);
    real decay = (real)(1.0 - (double)lr * weight_decay);
    const uint64_t rounding_key = stochastic_rounding_key(rounding_seed, t);
    #pragma omp parallel for
    for (size_t i = 0; i < n; i++) {
        real g = to_real(grads[i]) * grad_scale;
        // decoupled weight decay
        real p = to_real(params[i]) * decay;
        // new moments, unrounded: the update below uses these (each a fused multiply-add: see the top)
        real m_i = std::fma(beta1, to_real(m[i]), (1 - beta1) * g);
        real v_i = std::fma(beta2, to_real(v[i]), (1 - beta2) * g * g);
        real denom = sqrt(v_i) / (real)bias_correction2_sqrt + eps;
        // three stores, each rounded once (stochastic rounding: 16 of the element's random bits each)
        uint64_t random = rounding == ROUND_STOCHASTIC ? stochastic_rounding_bits(rounding_key, first_index + i) : 0;
        m[i] = from_real_rounded<P>(m_i, rounding, (uint32_t)random);
        v[i] = from_real_rounded<P>(v_i, rounding, (uint32_t)(random >> 16));
        params[i] = from_real_rounded<P>(std::fma(-step_size, m_i / denom, p), rounding, (uint32_t)(random >> 32));
        // the copy, from the parameter as stored
        if (params_copy) params_copy[i] = from_real<Copy>(to_real(params[i]));
    }
}

// out (n) = inp (n) converted to Out, rounding to nearest even where Out is narrower
template <typename Out, typename In>
inline void cast_copy_cpu(Out* out, const In* inp, size_t n) {
    #pragma omp parallel for
    for (size_t i = 0; i < n; i++) out[i] = from_real<Out>(to_real(inp[i]));
}

#if defined(__CUDACC__) || defined(MIXLN_CUDA_EMULATION)
#include "../cuda_common.h"

// ---- CUDA kernels

// one thread per parameter; the bias corrections and the rounding key are computed once on the
// host. first_index: the index of params[0] in the whole buffer (the stochastic rounding's bits)
template <typename P, typename Copy, typename G>
__global__ void adamw_update_kernel(P* params, P* m, P* v, Copy* params_copy, const G* grads, size_t n, float decay,
                                    float beta1, float beta2, float eps, float step_size, float bias_correction2_sqrt,
                                    float grad_scale, Rounding rounding, uint64_t rounding_key, size_t first_index) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float g = to_float(grads[i]) * grad_scale;
    float p = to_float(params[i]) * decay;
    float m_i = fmaf(beta1, to_float(m[i]), (1.0f - beta1) * g);
    float v_i = fmaf(beta2, to_float(v[i]), (1.0f - beta2) * g * g);
    uint64_t random = rounding == ROUND_STOCHASTIC ? stochastic_rounding_bits(rounding_key, first_index + i) : 0;
    m[i] = round_to<P>(m_i, rounding, (uint32_t)random);
    v[i] = round_to<P>(v_i, rounding, (uint32_t)(random >> 16));
    P stored = round_to<P>(fmaf(-step_size, m_i / (sqrtf(v_i) / bias_correction2_sqrt + eps), p), rounding,
                           (uint32_t)(random >> 32));
    params[i] = stored;
    if (params_copy) params_copy[i] = from_float<Copy>(to_float(stored));
}

// The same update, a 16-byte chunk of each tensor per thread (P and G of one size, so that a chunk
// holds the same elements of all four; the first n / VEC chunks, the launcher passes the rest to
// the kernel above). The expressions are the one-element kernel's, element by element. One
// 4-byte load of each tensor per thread kept too few bytes in flight to stream 16 bytes a
// parameter at the memory's rate.
// The copy, when there is one, is stored element by element (a bf16 copy of 4 floats is 8 bytes):
// a warp's stores still cover whole contiguous sectors.
template <typename P, typename Copy, typename G>
__global__ void adamw_update_vector_kernel(P* params, P* m, P* v, Copy* params_copy, const G* grads, size_t chunks,
                                           float decay, float beta1, float beta2, float eps, float step_size,
                                           float bias_correction2_sqrt, float grad_scale, Rounding rounding,
                                           uint64_t rounding_key, size_t first_index) {
    constexpr int VEC = VECTOR16_SIZE<P>;
    static_assert(VECTOR16_SIZE<G> == VEC, "adamw_update_vector_kernel: P and G of one size");
    size_t chunk = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (chunk >= chunks) return;
    size_t i = chunk * VEC;
    Vector16<P> ps = load_vector16(params + i), ms = load_vector16(m + i), vs = load_vector16(v + i);
    Vector16<G> gs = load_vector16(grads + i);
    for (int e = 0; e < VEC; e++) {
        float g = to_float(gs.values[e]) * grad_scale;
        float p = to_float(ps.values[e]) * decay;
        float m_i = fmaf(beta1, to_float(ms.values[e]), (1.0f - beta1) * g);
        float v_i = fmaf(beta2, to_float(vs.values[e]), (1.0f - beta2) * g * g);
        uint64_t random = rounding == ROUND_STOCHASTIC ? stochastic_rounding_bits(rounding_key, first_index + i + e) : 0;
        ms.values[e] = round_to<P>(m_i, rounding, (uint32_t)random);
        vs.values[e] = round_to<P>(v_i, rounding, (uint32_t)(random >> 16));
        ps.values[e] = round_to<P>(fmaf(-step_size, m_i / (sqrtf(v_i) / bias_correction2_sqrt + eps), p), rounding,
                                   (uint32_t)(random >> 32));
    }
    store_vector16(m + i, ms);
    store_vector16(v + i, vs);
    store_vector16(params + i, ps);
    if (params_copy)
        for (int e = 0; e < VEC; e++) params_copy[i + e] = from_float<Copy>(to_float(ps.values[e]));
}

// one thread per element
template <typename Out, typename In>
__global__ void cast_copy_kernel(Out* out, const In* inp, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = from_float<Out>(to_float(inp[i]));
}

// The same, CHUNK elements a thread: 16 bytes of the narrower type, so whole 16-byte vectors of
// both (float -> bf16: two loads of 4, one store of 8); the first chunks * CHUNK elements
template <typename Out, typename In>
__global__ void cast_copy_vector_kernel(Out* out, const In* inp, size_t chunks) {
    constexpr int IN_VEC = VECTOR16_SIZE<In>, OUT_VEC = VECTOR16_SIZE<Out>;
    constexpr int CHUNK = IN_VEC > OUT_VEC ? IN_VEC : OUT_VEC;
    size_t chunk = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (chunk >= chunks) return;
    size_t i = chunk * CHUNK;
    Vector16<In> ins[CHUNK / IN_VEC];
    for (int k = 0; k < CHUNK / IN_VEC; k++) ins[k] = load_vector16(inp + i + k * IN_VEC);
    Vector16<Out> outs[CHUNK / OUT_VEC];
    for (int e = 0; e < CHUNK; e++) outs[e / OUT_VEC].values[e % OUT_VEC] = from_float<Out>(to_float(ins[e / IN_VEC].values[e % IN_VEC]));
    for (int k = 0; k < CHUNK / OUT_VEC; k++) store_vector16(out + i + k * OUT_VEC, outs[k]);
}

// ---- launchers

template <typename P, typename Copy, typename G>
inline void adamw_update(P* params, P* m, P* v, Copy* params_copy, const G* grads, size_t n, float lr, float beta1,
                         float beta2, float eps, float weight_decay, int t, float grad_scale, Rounding rounding,
                         uint64_t rounding_seed, size_t first_index, cudaStream_t stream) {
    if (n == 0) return;
    const uint64_t rounding_key = stochastic_rounding_key(rounding_seed, t);
    double bias_correction1 = 1.0 - pow((double)beta1, t);
    double bias_correction2_sqrt = sqrt(1.0 - pow((double)beta2, t));
    const int block = 256;
    float decay = (float)(1.0 - (double)lr * weight_decay), step_size = (float)(lr / bias_correction1);
    // 16-byte chunks where the four tensors allow them, the rest one element a thread
    size_t done = 0;
    if constexpr (VECTOR16_SIZE<P> == VECTOR16_SIZE<G>) {
        uintptr_t addresses = reinterpret_cast<uintptr_t>(params) | reinterpret_cast<uintptr_t>(m) |
                              reinterpret_cast<uintptr_t>(v) | reinterpret_cast<uintptr_t>(grads);
        size_t chunks = addresses % 16 == 0 ? n / VECTOR16_SIZE<P> : 0;
        if (chunks > 0) {
            auto vector_kernel = adamw_update_vector_kernel<P, Copy, G>;
            LAUNCH(vector_kernel, dim3((unsigned)((chunks + block - 1) / block)), dim3(block), 0, stream, params, m, v,
                   params_copy, grads, chunks, decay, beta1, beta2, eps, step_size, (float)bias_correction2_sqrt,
                   grad_scale, rounding, rounding_key, first_index);
            done = chunks * VECTOR16_SIZE<P>;
        }
    }
    if (done < n) {
        auto kernel = adamw_update_kernel<P, Copy, G>;
        size_t rest = n - done;
        LAUNCH(kernel, dim3((unsigned)((rest + block - 1) / block)), dim3(block), 0, stream, params + done, m + done,
               v + done, params_copy ? params_copy + done : nullptr, grads + done, rest, decay, beta1, beta2, eps,
               step_size, (float)bias_correction2_sqrt, grad_scale, rounding, rounding_key, first_index + done);
    }
}

// out (n) = inp (n) converted to Out (round to nearest even): the bf16 weights from the fp32 master copy
template <typename Out, typename In>
inline void cast_copy(Out* out, const In* inp, size_t n, cudaStream_t stream) {
    if (n == 0) return;
    const int block = 256;
    // 16-byte vectors of both types where the pointers allow, the rest one element a thread
    constexpr size_t CHUNK = VECTOR16_SIZE<In> > VECTOR16_SIZE<Out> ? VECTOR16_SIZE<In> : VECTOR16_SIZE<Out>;
    uintptr_t addresses = reinterpret_cast<uintptr_t>(out) | reinterpret_cast<uintptr_t>(inp);
    size_t chunks = addresses % 16 == 0 ? n / CHUNK : 0, done = chunks * CHUNK;
    if (chunks > 0) {
        auto vector_kernel = cast_copy_vector_kernel<Out, In>;
        LAUNCH(vector_kernel, dim3((unsigned)((chunks + block - 1) / block)), dim3(block), 0, stream, out, inp, chunks);
    }
    if (done < n) {
        auto kernel = cast_copy_kernel<Out, In>;
        size_t rest = n - done;
        LAUNCH(kernel, dim3((unsigned)((rest + block - 1) / block)), dim3(block), 0, stream, out + done, inp + done,
               rest);
    }
}
#endif
