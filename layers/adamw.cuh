/*
AdamW, with the arithmetic in the order PyTorch's torch.optim.AdamW uses, so that 10 steps
against the PyTorch reference agree to fp32 rounding:
    p  = p * (1 - lr * weight_decay)                 decoupled weight decay
    m  = beta1 * m + (1 - beta1) * g
    v  = beta2 * v + (1 - beta2) * g^2
    p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
t counts from 1. grad_scale multiplies every gradient on the way in (global norm clipping).
Weight decay applies to every parameter; the paper trains with 0.
*/
#pragma once

#include <cmath>

#include "../common.h"

// ---- CPU reference

// params (n), m (n), v (n) updated in place; grads (n)
inline void adamw_update_cpu(real* params, real* m, real* v, const real* grads, size_t n, float lr,
                      float beta1, float beta2, float eps, float weight_decay, int t,
                      float grad_scale) {
    double bias_correction1 = 1.0 - pow((double)beta1, t);
    double bias_correction2_sqrt = sqrt(1.0 - pow((double)beta2, t));
    real step_size = (real)(lr / bias_correction1);
    real decay = (real)(1.0 - (double)lr * weight_decay);
    #pragma omp parallel for
    for (size_t i = 0; i < n; i++) {
        real g = grads[i] * grad_scale;
        params[i] *= decay;
        m[i] = beta1 * m[i] + (1 - beta1) * g;
        v[i] = beta2 * v[i] + (1 - beta2) * g * g;
        real denom = sqrt(v[i]) / (real)bias_correction2_sqrt + eps;
        params[i] -= step_size * (m[i] / denom);
    }
}

#if defined(__CUDACC__) || defined(MIXLN_CUDA_EMULATION)
#include "../cuda_common.h"

// ---- CUDA kernels

// one thread per parameter; the bias corrections are computed once on the host
static __global__ void adamw_update_kernel(float* params, float* m, float* v, const float* grads, size_t n, float decay,
                                    float beta1, float beta2, float eps, float step_size,
                                    float bias_correction2_sqrt, float grad_scale) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float g = grads[i] * grad_scale;
    float p = params[i] * decay;
    float m_i = beta1 * m[i] + (1.0f - beta1) * g;
    float v_i = beta2 * v[i] + (1.0f - beta2) * g * g;
    m[i] = m_i;
    v[i] = v_i;
    params[i] = p - step_size * (m_i / (sqrtf(v_i) / bias_correction2_sqrt + eps));
}

// ---- launchers

inline void adamw_update(float* params, float* m, float* v, const float* grads, size_t n, float lr, float beta1,
                         float beta2, float eps, float weight_decay, int t, float grad_scale, cudaStream_t stream) {
    double bias_correction1 = 1.0 - pow((double)beta1, t);
    double bias_correction2_sqrt = sqrt(1.0 - pow((double)beta2, t));
    const int block = 256;
    LAUNCH(adamw_update_kernel, dim3((unsigned)((n + block - 1) / block)), dim3(block), 0, stream, params, m, v, grads, n,
           (float)(1.0 - (double)lr * weight_decay), beta1, beta2, eps, (float)(lr / bias_correction1),
           (float)bias_correction2_sqrt, grad_scale);
}
#endif
