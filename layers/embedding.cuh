/*
Token embedding: row `token` of the (V, C) table becomes the residual stream at that position.
LLaMA adds no position embedding here; positions enter through RoPE inside attention.

Backward scatters each position's gradient into its token's row. Several positions can hold the
same token, so rows are accumulated; the CPU reference does that serially over positions and in
parallel over channels, which needs no atomics.
*/
#pragma once

#include <cstring>

#include "../common.h"

// ---- CPU reference

// out (B*T, C); tokens (B*T) ids in [0, V); embed_tokens (V, C)
inline void embedding_forward_cpu(real* out, const int* tokens, const real* embed_tokens, int BT, int C) {
    #pragma omp parallel for
    for (int i = 0; i < BT; i++) {
        memcpy(out + (size_t)i * C, embed_tokens + (size_t)tokens[i] * C, (size_t)C * sizeof(real));
    }
}

// dembed_tokens (V, C) +=; dout (B*T, C); tokens (B*T)
inline void embedding_backward_cpu(real* dembed_tokens, const real* dout, const int* tokens, int BT, int C) {
    #pragma omp parallel for
    for (int c = 0; c < C; c++) {
        for (int i = 0; i < BT; i++) {
            dembed_tokens[(size_t)tokens[i] * C + c] += dout[(size_t)i * C + c];
        }
    }
}
