/*
Global gradient norm: the L2 norm of all parameter gradients taken together, logged every step
and used for clipping (scale every gradient by clip / (norm + 1e-6) when the norm exceeds clip,
as torch.nn.utils.clip_grad_norm_ does). Summed in double: it is one number over millions.
*/
#pragma once

#include <cmath>

#include "../common.h"

// ---- CPU reference

// returns sqrt(sum of grads^2) over grads (n)
inline double global_norm_cpu(const real* grads, size_t n) {
    double sum = 0.0;
    #pragma omp parallel for reduction(+ : sum)
    for (size_t i = 0; i < n; i++) sum += (double)grads[i] * grads[i];
    return sqrt(sum);
}
