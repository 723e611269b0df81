/*
RMSNorm: y = w * x / sqrt(mean(x^2) + eps), one row of C values at a time (no mean subtraction,
no bias, as in LLaMA).

Every decoder layer owns two of these and a final one sits before the LM head. Pre-LN layers
normalise the residual stream before each sublayer; Post-LN layers normalise the sum after the
residual add. The kernels are the same either way: model.h decides where they are called.

Backward, with xhat = x * rstd and g = dout * w:
    dw    += sum over rows of dout * xhat
    dinp  += rstd * (g - xhat * mean(g * xhat))
The CPU version is the reference the CUDA kernels are tested against.
*/
#pragma once

#include <cmath>

#include "../common.h"

// ---- CPU reference

// out (N, C), rstd (N) saved for backward, inp (N, C), weight (C)
inline void rmsnorm_forward_cpu(real* out, real* rstd, const real* inp, const real* weight,
                         int N, int C, float eps) {
    #pragma omp parallel for
    for (int i = 0; i < N; i++) {
        const real* x = inp + (size_t)i * C;
        real* y = out + (size_t)i * C;
        // mean of squares, accumulated in double so the reference is the accurate side
        double sum_squares = 0.0;
        for (int c = 0; c < C; c++) sum_squares += (double)x[c] * x[c];
        real r = (real)(1.0 / sqrt(sum_squares / C + eps));
        rstd[i] = r;
        for (int c = 0; c < C; c++) y[c] = weight[c] * (x[c] * r);
    }
}

// dinp (N, C) +=, dweight (C) +=; dout (N, C), inp (N, C), weight (C), rstd (N) from forward
inline void rmsnorm_backward_cpu(real* dinp, real* dweight, const real* dout, const real* inp,
                          const real* weight, const real* rstd, int N, int C) {
    // input gradient: rows are independent
    #pragma omp parallel for
    for (int i = 0; i < N; i++) {
        const real* x = inp + (size_t)i * C;
        const real* dy = dout + (size_t)i * C;
        real* dx = dinp + (size_t)i * C;
        real r = rstd[i];
        // mean over the row of g * xhat, the part of the gradient along x itself
        double dot = 0.0;
        for (int c = 0; c < C; c++) dot += (double)(dy[c] * weight[c]) * (x[c] * r);
        real mean_dot = (real)(dot / C);
        for (int c = 0; c < C; c++) dx[c] += r * (dy[c] * weight[c] - x[c] * r * mean_dot);
    }
    // weight gradient: a sum over rows, so parallelise over channels instead
    #pragma omp parallel for
    for (int c = 0; c < C; c++) {
        double sum = 0.0;
        for (int i = 0; i < N; i++) sum += (double)dout[(size_t)i * C + c] * (inp[(size_t)i * C + c] * rstd[i]);
        dweight[c] += (real)sum;
    }
}
