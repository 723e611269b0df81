/*
Residual add: out = a + b, the skip connection around each sublayer.

There is no backward function: the gradient of a sum is the incoming gradient for both terms,
and every backward function in layers/ accumulates (+=) into its input gradient, so model.h
routes a residual's gradient by letting both branches accumulate into the same buffer.
*/
#pragma once

#include "../common.h"

// ---- CPU reference

// out (n) = a (n) + b (n); out may alias a or b
inline void residual_forward_cpu(real* out, const real* a, const real* b, size_t n) {
    #pragma omp parallel for
    for (size_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}
