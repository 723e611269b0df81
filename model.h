/*
The Mix-LN LLaMA model: its configuration, its buffers and one training step's worth of
orchestration (forward, backward, update). The layers themselves live in layers/, one file each.

Architecture (LLaMA, no biases, untied LM head):
    x = embed_tokens[tokens]
    for each of L decoder layers: attention sublayer, then SwiGLU MLP sublayer, with the norm N
    placed as that layer's kind says (norm_layers, one kind per layer):
        pre       h = x + Attn(N1(x))              y = h + MLP(N2(h))
        post      h = N1(x + Attn(x))              y = N2(h + MLP(h))
        peri      h = x + N1o(Attn(N1(x)))         y = h + N2o(MLP(N2(h)))     (Sandwich / Peri-LN)
        deepnorm  h = N1(a*x + Attn(x))            y = N2(a*h + MLP(h))        a = (2L)^(1/4)
        lns       as pre, each norm's output times 1/sqrt(l+1)                 (LayerNorm Scaling)
        hybrid    h = x + Attn_qkv(x)              y = N2(h + MLP(h))          (HybridNorm)
                  Attn_qkv normalises q, k and v each (Nq, Nk, Nv, over C) before RoPE
        preqkv    h = x + Attn_qkv(N1(x))          y = h + MLP(N2(h))          (HybridNorm*'s first layer)
    logits = lm_head(final_norm(x)); loss = mean cross-entropy
Mix-LN is the list post x floor(alpha*L), then pre: alpha = 0 is pure Pre-LN, 1 pure Post-LN,
0.25 the paper's best. N is RMSNorm (the paper's) or LayerNorm with a bias (norm_type). The
final norm is applied in every mode (a pure Post-LN model normalises twice at the end, as the
paper's code does).

The five kinds before hybrid come in two shapes, and the code below follows them:
  - the norm after the residual add (post, deepnorm): the stream itself is normalised, and the
    residual is scaled by a (1 for post) before the add;
  - the norm on the branch (pre, lns, peri): the stream passes by untouched; the sublayer's input
    is normalised (and scaled by 1/sqrt(l+1) for lns), and for peri its output is normalised too.
hybrid takes the first shape's MLP sublayer, and an attention sublayer with no norm on the stream
at all: the norms sit on q, k and v (qkv_norm_forward). preqkv is pre with hybrid's norms on q, k
and v added (has_qkv_norm): the first layer of HybridNorm* (--norm hybridstar).

Memory, as in llm.c: all parameters live in one flat buffer with a struct of pointers into it; the
gradients and the two AdamW moments are flat buffers of the same layout; every activation the
backward pass needs, plus the backward pass's scratch, lives in one more buffer sized once from
(B, T, config). Nothing is allocated during a step.

Precision (Precision, below): the buffers hold fp32, or under --precision bf16 the activations
and a bf16 copy of the weights are bf16 (fp32 master weights, gradients and AdamW moments), or
under bf16-pure everything is bf16. The forward and backward passes are templates on the storage
types (floatX: activations and the weights the kernels read; gradX: the weight gradients);
model_forward and model_backward pick the instantiation. Every kernel computes in fp32.

A training micro-step is model_forward_backward: the same two passes, except that the forward
pass's cross-entropy also writes the logits' gradient over them, so the backward pass starts from
it and the (B, T, V) logits are read once less. model_forward alone (evaluation, tests) leaves the
logits in place.

Gradient convention: the backward functions in layers/ accumulate (+=) into the gradients they
write, so a residual connection's gradient reaches both of its inputs by both branches
accumulating into one buffer (see model_backward). The exceptions write (=) gradients that have
one producer, where accumulating would only mean zeroing a buffer and reading the zeros back:
the attention backward's dqkv, swiglu_backward's dgate_up, a matmul's input gradient when its
dinp_scale is 0, and a norm's input gradient when the norm's input reaches the loss through it
alone (norm_backward with accumulate false: Post-LN's norms, Peri-LN's output norms, the final
norm). No activation gradient is ever zeroed. The weight gradients of the projections and the LM head, nearly all of the
gradient memory, are written the same way by the first backward pass after model_zero_grad
(matmul_backward's dweight_scale 0), which therefore zeroes only the rest (model_zero_grad).

Two backends, one orchestration: the model's buffers live either in host memory (the CPU
reference kernels, name_cpu(...)) or on the GPU (the CUDA launchers, name(..., stream)), and every
layer call below goes through LAYER(name, args...), which picks one. The CUDA backend exists in
nvcc builds and in the emulated test build (cuda_common.h); a g++ build is CPU-only.
*/
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "common.h"
#include "layers/adamw.cuh"
#include "layers/attention.cuh"
#include "layers/crossentropy.cuh"
#include "layers/embedding.cuh"
#include "layers/global_norm.cuh"
#include "layers/layernorm.cuh"
#include "layers/matmul.cuh"
#include "layers/residual.cuh"
#include "layers/rmsnorm.cuh"
#include "layers/rope.cuh"
#include "layers/swiglu.cuh"

#if defined(__CUDACC__) || defined(MIXLN_CUDA_EMULATION)
#define MIXLN_CUDA 1
#endif

// ----------------------------------------------------------------------------
// configuration

// Where a layer's norms sit (see the top of this file).
enum NormKind { NORM_PRE, NORM_POST, NORM_PERI, NORM_DEEPNORM, NORM_LNS, NORM_HYBRID, NORM_PREQKV };
constexpr int NUM_NORM_KINDS = 7;
inline const char* norm_kind_name(NormKind kind) {
    static const char* names[NUM_NORM_KINDS] = {"pre", "post", "peri", "deepnorm", "lns", "hybrid", "preqkv"};
    return names[kind];
}

enum NormType { NORM_RMSNORM, NORM_LAYERNORM };
inline const char* norm_type_name(NormType type) { return type == NORM_LAYERNORM ? "layernorm" : "rmsnorm"; }

// How the model's numbers are stored (the --precision flag). The kernels always compute in fp32.
//   fp32       everything fp32
//   bf16       activations, activation gradients and a copy of the weights that the kernels
//              read are bf16; the master weights, their gradients and the AdamW moments fp32
//              (the copy is refreshed from the master weights after every update)
//   bf16-pure  as bf16, and the weights themselves, their gradients and the AdamW moments are
//              bf16 too (no fp32 copy anywhere): how the paper trained (model.to(bfloat16))
// Every bf16 value is rounded to nearest even from the fp32 it was computed as, but for what
// bf16-pure's AdamW stores under --rounding stochastic (Rounding in common.h, model_update).
enum Precision { PRECISION_FP32, PRECISION_BF16, PRECISION_BF16_PURE };
inline const char* precision_name(Precision precision) {
    return precision == PRECISION_BF16 ? "bf16" : precision == PRECISION_BF16_PURE ? "bf16-pure" : "fp32";
}

struct ModelConfig {
    int vocab_size = 0;       // V
    int channels = 0;         // C, Hugging Face hidden_size
    int num_layers = 0;       // L
    int num_heads = 0;        // NH; head size hs = C / NH
    int ffn_channels = 0;     // F, Hugging Face intermediate_size
    int max_seq_len = 0;      // T at most (max_position_embeddings)
    std::vector<NormKind> norm_layers;     // (L) the norm placement of each layer
    NormType norm_type = NORM_RMSNORM;
    float mixln_alpha = 0;    // the alpha a Mix-LN list came from, recorded in config.json
    float rms_norm_eps = 1e-6f;   // eps of every norm, RMSNorm or LayerNorm
    float rope_theta = 10000.0f;
};

// floor(alpha * L). The 1e-6 keeps float error from losing a layer (0.29 * 100 = 28.999...).
inline int post_ln_layers_for(float alpha, int num_layers) {
    return (int)floor((double)alpha * num_layers + 1e-6);
}

// Mix-LN: post_ln_layers Post-LN layers, then Pre-LN.
inline std::vector<NormKind> mixln_norm_layers(int post_ln_layers, int num_layers) {
    std::vector<NormKind> kinds;
    for (int l = 0; l < num_layers; l++) kinds.push_back(l < post_ln_layers ? NORM_POST : NORM_PRE);
    return kinds;
}

// The number of leading Post-LN layers when the list has the Mix-LN form (posts, then only
// pres), else -1.
inline int mixln_post_ln_layers(const std::vector<NormKind>& kinds) {
    int posts = 0;
    while (posts < (int)kinds.size() && kinds[posts] == NORM_POST) posts++;
    for (size_t l = posts; l < kinds.size(); l++) {
        if (kinds[l] != NORM_PRE) return -1;
    }
    return posts;
}

// "post,post,pre,..." -> kinds; `what` names the source in messages. The length is checked
// against the model by model_config_check.
inline std::vector<NormKind> parse_norm_layers(const std::string& text, const char* what) {
    std::vector<NormKind> kinds;
    size_t start = 0;
    while (true) {
        size_t end = text.find(',', start);
        std::string word = text.substr(start, end == std::string::npos ? std::string::npos : end - start);
        int found = -1;
        for (int k = 0; k < NUM_NORM_KINDS; k++) {
            if (word == norm_kind_name((NormKind)k)) found = k;
        }
        if (found < 0) {
            fail("%s: unknown norm placement '%s' in layer %zu (kinds: pre, post, peri, deepnorm, lns, hybrid, preqkv)", what,
                 word.c_str(), kinds.size());
        }
        kinds.push_back((NormKind)found);
        if (end == std::string::npos) break;
        start = end + 1;
    }
    return kinds;
}

inline std::string norm_layers_text(const std::vector<NormKind>& kinds) {
    std::string text;
    for (size_t l = 0; l < kinds.size(); l++) text += (l ? "," : "") + std::string(norm_kind_name(kinds[l]));
    return text;
}

// The two shapes a layer can have (see the top of this file); hybrid has the first one's MLP
// sublayer and neither one's attention sublayer.
inline bool norm_after_residual(NormKind kind) { return kind == NORM_POST || kind == NORM_DEEPNORM; }

// Whether layer kind's attention sublayer reads the stream as it comes, unnormalised: post and
// deepnorm (their norm comes after the add), and hybrid (its norms are on q, k and v).
inline bool attention_takes_stream(NormKind kind) { return norm_after_residual(kind) || kind == NORM_HYBRID; }

// DeepNorm's residual scale a = (2L)^(1/4): the stream is multiplied by a before each add.
inline float deepnorm_residual_scale(int num_layers) { return (float)pow(2.0 * num_layers, 0.25); }

// What multiplies a branch norm's output: 1/sqrt(l+1) in an lns layer, else 1.
inline float norm_output_scale(const ModelConfig& c, int l) {
    return c.norm_layers[l] == NORM_LNS ? (float)(1.0 / sqrt(l + 1.0)) : 1.0f;
}

// What multiplies the stream before a residual add: a in a deepnorm layer, else 1.
inline float residual_scale(const ModelConfig& c, int l) {
    return c.norm_layers[l] == NORM_DEEPNORM ? deepnorm_residual_scale(c.num_layers) : 1.0f;
}

// Peri-LN layers own two more norms (on the sublayer outputs); those live in tensors with one
// row per peri layer. This is layer l's row among them (the peri layers before it).
inline int peri_index(const ModelConfig& c, int l) {
    int index = 0;
    for (int i = 0; i < l; i++) index += c.norm_layers[i] == NORM_PERI;
    return index;
}
inline int num_peri_layers(const ModelConfig& c) { return peri_index(c, c.num_layers); }

// Likewise the layers with norms on q, k and v (QKV-Norm: hybrid, and preqkv) own three more norms,
// one (3, C) row per such layer (and their activations one slot per such layer).
inline bool has_qkv_norm(NormKind kind) { return kind == NORM_HYBRID || kind == NORM_PREQKV; }
inline int qkv_norm_index(const ModelConfig& c, int l) {
    int index = 0;
    for (int i = 0; i < l; i++) index += has_qkv_norm(c.norm_layers[i]);
    return index;
}
inline int num_qkv_norm_layers(const ModelConfig& c) { return qkv_norm_index(c, c.num_layers); }

// Refuses configurations the kernels cannot run, with a message naming the problem.
inline void model_config_check(const ModelConfig& c) {
    if (c.vocab_size < 1 || c.channels < 1 || c.num_layers < 1 || c.num_heads < 1 ||
        c.ffn_channels < 1 || c.max_seq_len < 1) {
        fail("model sizes must be positive (vocab %d, dim %d, layers %d, heads %d, ffn %d, seq-len %d)",
             c.vocab_size, c.channels, c.num_layers, c.num_heads, c.ffn_channels, c.max_seq_len);
    }
    if (c.channels % c.num_heads != 0) {
        fail("the number of heads (%d) does not divide the width (dim %d)", c.num_heads, c.channels);
    }
    if ((c.channels / c.num_heads) % 2 != 0) {
        fail("RoPE needs an even head size, but dim %d / heads %d = %d", c.channels, c.num_heads,
             c.channels / c.num_heads);
    }
    if (!(c.mixln_alpha >= 0.0f && c.mixln_alpha <= 1.0f)) {
        fail("alpha must be in [0, 1], got %g", c.mixln_alpha);
    }
    if ((int)c.norm_layers.size() != c.num_layers) {
        fail("the norm placement lists %zu layers but the model has %d", c.norm_layers.size(), c.num_layers);
    }
    for (NormKind kind : c.norm_layers) {
        if ((int)kind < 0 || (int)kind >= NUM_NORM_KINDS) fail("unknown norm placement %d", (int)kind);
    }
    if (c.norm_type != NORM_RMSNORM && c.norm_type != NORM_LAYERNORM) fail("unknown norm type %d", (int)c.norm_type);
    if (!(c.rms_norm_eps > 0.0f) || !(c.rope_theta > 0.0f)) {
        fail("rms_norm_eps and rope_theta must be positive");
    }
}

// ----------------------------------------------------------------------------
// parameters

// Pointers into the flat parameter buffer (and, with the same layout, into the gradient buffer
// and into the bf16 copy of the weights); W is the type the buffer stores.
// q/k/v are stacked into one (3C, C) matrix per layer and gate/up into one (2F, C), so that each
// pair of projections is one matmul; every Hugging Face tensor is still one contiguous slice.
// The tensors a configuration does not use (peri norms without peri layers, biases under
// RMSNorm) have size 0; they sit at the end so that the layout of a Mix-LN model is unchanged.
template <typename W>
struct ParameterTensorsOf {
    W* embed_tokens;       // (V, C)      model.embed_tokens.weight
    W* attn_norm;          // (L, C)      N1: the norm of the attention sublayer (names: model_named_tensors)
    W* qkv_proj;           // (L, 3C, C)  self_attn.{q,k,v}_proj.weight, stacked in that order
    W* o_proj;             // (L, C, C)   self_attn.o_proj.weight
    W* mlp_norm;           // (L, C)      N2: the norm of the MLP sublayer
    W* gate_up_proj;       // (L, 2F, C)  mlp.{gate,up}_proj.weight, stacked in that order
    W* down_proj;          // (L, C, F)   mlp.down_proj.weight
    W* final_norm;         // (C)         model.norm.weight
    W* lm_head;            // (V, C)      lm_head.weight
    W* attn_out_norm;      // (P, C)      N1o of each of the P peri layers: post_attention_layernorm
    W* mlp_out_norm;       // (P, C)      N2o: post_feedforward_layernorm
    W* attn_norm_bias;     // (L, C)      LayerNorm only: N1's bias (else size 0)
    W* mlp_norm_bias;      // (L, C)      LayerNorm only
    W* attn_out_norm_bias; // (P, C)      LayerNorm only
    W* mlp_out_norm_bias;  // (P, C)      LayerNorm only
    W* final_norm_bias;    // (C)         LayerNorm only: model.norm.bias
    W* qkv_norm;           // (H, 3, C)   QKV-Norm of each of the H hybrid and preqkv layers: self_attn.{q,k,v}_norm.weight
    W* qkv_norm_bias;      // (H, 3, C)   LayerNorm only
};
// The fp32 (CPU: real) view of the parameters: init, checkpoints, analyses.
typedef ParameterTensorsOf<real> ParameterTensors;
constexpr int NUM_PARAMETER_TENSORS = 18;

inline void parameter_sizes(size_t sizes[NUM_PARAMETER_TENSORS], const ModelConfig& c) {
    size_t V = c.vocab_size, C = c.channels, L = c.num_layers, F = c.ffn_channels, P = num_peri_layers(c),
           H = num_qkv_norm_layers(c);
    size_t bias = c.norm_type == NORM_LAYERNORM ? 1 : 0;
    sizes[0] = V * C;
    sizes[1] = L * C;
    sizes[2] = L * 3 * C * C;
    sizes[3] = L * C * C;
    sizes[4] = L * C;
    sizes[5] = L * 2 * F * C;
    sizes[6] = L * C * F;
    sizes[7] = C;
    sizes[8] = V * C;
    sizes[9] = P * C;
    sizes[10] = P * C;
    sizes[11] = bias * L * C;
    sizes[12] = bias * L * C;
    sizes[13] = bias * P * C;
    sizes[14] = bias * P * C;
    sizes[15] = bias * C;
    sizes[16] = H * 3 * C;
    sizes[17] = bias * H * 3 * C;
}

// Which parameters AdamW's weight decay shrinks (train's --weight-decay-on): every one, as
// torch.optim.AdamW over model.parameters() does (the Mix-LN code), or only the matrices (the
// embedding, the linear layers and the head), leaving the norms' weights and biases alone, as
// GPT-2's and LLaMA's successors mostly train: a decayed norm weight is a decayed scale of the
// stream, which in a Post-LN layer is the stream's whole scale.
enum WeightDecayScope { DECAY_ALL, DECAY_MATRICES };

// Whether tensor i of parameter_sizes' order is a matrix (else a norm's weights or biases).
inline bool parameter_tensor_is_matrix(int i) { return i == 0 || i == 2 || i == 3 || i == 5 || i == 6 || i == 8; }

inline size_t num_parameters(const ModelConfig& c) {
    size_t sizes[NUM_PARAMETER_TENSORS];
    parameter_sizes(sizes, c);
    size_t total = 0;
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) total += sizes[i];
    return total;
}

// Points the struct's members into a flat buffer laid out as parameter_sizes says. A tensor of
// size 0 gets nullptr, so that using it by mistake fails loudly.
template <typename W>
inline void point_parameters(ParameterTensorsOf<W>* t, W* memory, const ModelConfig& c) {
    size_t sizes[NUM_PARAMETER_TENSORS];
    parameter_sizes(sizes, c);
    W** members[NUM_PARAMETER_TENSORS] = {
        &t->embed_tokens,  &t->attn_norm,     &t->qkv_proj,       &t->o_proj,         &t->mlp_norm,
        &t->gate_up_proj,  &t->down_proj,     &t->final_norm,     &t->lm_head,        &t->attn_out_norm,
        &t->mlp_out_norm,  &t->attn_norm_bias, &t->mlp_norm_bias, &t->attn_out_norm_bias,
        &t->mlp_out_norm_bias, &t->final_norm_bias, &t->qkv_norm, &t->qkv_norm_bias};
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
        *members[i] = sizes[i] ? memory : nullptr;
        memory += sizes[i];
    }
}

// One layer's slices of the parameter (or gradient) tensors; nullptr where the layer has none.
template <typename W>
struct LayerWeightsOf {
    W* attn_norm;          // (C)  all but hybrid (whose row of the tensor is unused)
    W* attn_norm_bias;     // (C)  LayerNorm, all but hybrid
    W* qkv_norm;           // (3, C)  hybrid, preqkv: the q, k and v norms' weights
    W* qkv_norm_bias;      // (3, C)  hybrid, preqkv, LayerNorm
    W* attn_out_norm;      // (C)  peri
    W* attn_out_norm_bias; // (C)  peri, LayerNorm
    W* qkv_proj;           // (3C, C)
    W* o_proj;             // (C, C)
    W* mlp_norm;           // (C)
    W* mlp_norm_bias;      // (C)  LayerNorm
    W* mlp_out_norm;       // (C)  peri
    W* mlp_out_norm_bias;  // (C)  peri, LayerNorm
    W* gate_up_proj;       // (2F, C)
    W* down_proj;          // (C, F)
};

typedef LayerWeightsOf<real> LayerWeights;

template <typename W>
inline LayerWeightsOf<W> layer_weights(const ParameterTensorsOf<W>& t, const ModelConfig& c, int l) {
    size_t C = c.channels, F = c.ffn_channels;
    bool peri = c.norm_layers[l] == NORM_PERI, hybrid = c.norm_layers[l] == NORM_HYBRID,
         qkv_norm = has_qkv_norm(c.norm_layers[l]);
    size_t p = peri ? (size_t)peri_index(c, l) : 0, h = qkv_norm ? (size_t)qkv_norm_index(c, l) : 0;
    // a slice of an optional tensor, nullptr when the tensor or the layer has none
    auto row = [](W* tensor, bool present, size_t offset) { return tensor && present ? tensor + offset : nullptr; };
    LayerWeightsOf<W> w;
    w.attn_norm = row(t.attn_norm, !hybrid, l * C);
    w.attn_norm_bias = row(t.attn_norm_bias, !hybrid, l * C);
    w.qkv_norm = row(t.qkv_norm, qkv_norm, h * 3 * C);
    w.qkv_norm_bias = row(t.qkv_norm_bias, qkv_norm, h * 3 * C);
    w.attn_out_norm = row(t.attn_out_norm, peri, p * C);
    w.attn_out_norm_bias = row(t.attn_out_norm_bias, peri, p * C);
    w.qkv_proj = t.qkv_proj + l * 3 * C * C;
    w.o_proj = t.o_proj + l * C * C;
    w.mlp_norm = t.mlp_norm + l * C;
    w.mlp_norm_bias = row(t.mlp_norm_bias, true, l * C);
    w.mlp_out_norm = row(t.mlp_out_norm, peri, p * C);
    w.mlp_out_norm_bias = row(t.mlp_out_norm_bias, peri, p * C);
    w.gate_up_proj = t.gate_up_proj + l * 2 * F * C;
    w.down_proj = t.down_proj + l * C * F;
    return w;
}

// A checkpoint tensor: its Hugging Face name, where it sits in the flat buffer, its shape.
struct NamedTensor {
    std::string name;
    size_t offset;                // into the flat parameter (or gradient) buffer
    std::vector<int64_t> shape;   // Hugging Face (out, in) layout for linear weights
};

// Every tensor of the checkpoint, in a fixed order. A layer's norms are named after where they
// sit, as in the official Mix-LN code and Gemma-2:
//   pre, lns        N1 input_layernorm            N2 post_attention_layernorm
//   post, deepnorm  N1 post_attention_layernorm   N2 post_feedforward_layernorm
//   peri            N1 input_layernorm, N1o post_attention_layernorm,
//                   N2 pre_feedforward_layernorm, N2o post_feedforward_layernorm
//   hybrid          self_attn.q_norm, k_norm, v_norm (OLMo-2's names), N2 post_feedforward_layernorm
//   preqkv          as pre, and self_attn.q_norm, k_norm, v_norm
// Under LayerNorm each norm has a ".bias" beside its ".weight". (A hybrid layer has no N1: its row
// of the N1 tensor is in no checkpoint and in no computation.)
inline std::vector<NamedTensor> model_named_tensors(const ModelConfig& c) {
    size_t sizes[NUM_PARAMETER_TENSORS];
    parameter_sizes(sizes, c);
    size_t offsets[NUM_PARAMETER_TENSORS];   // of each tensor in the flat buffer, in the order above
    size_t offset = 0;
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
        offsets[i] = offset;
        offset += sizes[i];
    }
    const bool biases = c.norm_type == NORM_LAYERNORM;
    int64_t V = c.vocab_size, C = c.channels, F = c.ffn_channels;
    std::vector<NamedTensor> tensors;
    // a norm's weight is row `row` of tensor `weight`, its bias (LayerNorm) row `row` of tensor `bias`
    auto add_norm = [&](const std::string& name, int weight, int bias, size_t row) {
        tensors.push_back({name + ".weight", offsets[weight] + row * C, {C}});
        if (biases) tensors.push_back({name + ".bias", offsets[bias] + row * C, {C}});
    };
    tensors.push_back({"model.embed_tokens.weight", offsets[0], {V, C}});
    for (int l = 0; l < c.num_layers; l++) {
        NormKind kind = c.norm_layers[l];
        size_t p = kind == NORM_PERI ? (size_t)peri_index(c, l) : 0;
        size_t h = has_qkv_norm(kind) ? (size_t)qkv_norm_index(c, l) : 0;
        std::string prefix = "model.layers." + std::to_string(l) + ".";
        const char* attn_norm_name = norm_after_residual(kind) ? "post_attention_layernorm" : "input_layernorm";
        const char* mlp_norm_name = norm_after_residual(kind) || kind == NORM_HYBRID ? "post_feedforward_layernorm"
                                    : kind == NORM_PERI       ? "pre_feedforward_layernorm"
                                                              : "post_attention_layernorm";
        size_t qkv = offsets[2] + (size_t)l * 3 * C * C;
        size_t gate_up = offsets[5] + (size_t)l * 2 * F * C;
        if (kind != NORM_HYBRID) add_norm(prefix + attn_norm_name, 1, 11, l);
        tensors.push_back({prefix + "self_attn.q_proj.weight", qkv, {C, C}});
        tensors.push_back({prefix + "self_attn.k_proj.weight", qkv + (size_t)C * C, {C, C}});
        tensors.push_back({prefix + "self_attn.v_proj.weight", qkv + (size_t)2 * C * C, {C, C}});
        tensors.push_back({prefix + "self_attn.o_proj.weight", offsets[3] + (size_t)l * C * C, {C, C}});
        if (has_qkv_norm(kind)) {   // row s of this layer's (3, C) block: q, k, v
            add_norm(prefix + "self_attn.q_norm", 16, 17, h * 3);
            add_norm(prefix + "self_attn.k_norm", 16, 17, h * 3 + 1);
            add_norm(prefix + "self_attn.v_norm", 16, 17, h * 3 + 2);
        }
        if (kind == NORM_PERI) add_norm(prefix + "post_attention_layernorm", 9, 13, p);
        add_norm(prefix + mlp_norm_name, 4, 12, l);
        tensors.push_back({prefix + "mlp.gate_proj.weight", gate_up, {F, C}});
        tensors.push_back({prefix + "mlp.up_proj.weight", gate_up + (size_t)F * C, {F, C}});
        tensors.push_back({prefix + "mlp.down_proj.weight", offsets[6] + (size_t)l * C * F, {C, F}});
        if (kind == NORM_PERI) add_norm(prefix + "post_feedforward_layernorm", 10, 14, p);
    }
    add_norm("model.norm", 7, 15, 0);
    tensors.push_back({"lm_head.weight", offsets[8], {V, C}});
    return tensors;
}

// ----------------------------------------------------------------------------
// activations

// Everything the forward pass keeps for backward, and the backward pass's scratch. Per-layer
// tensors have a leading L dimension (P: one row per peri layer); layer_activations() slices one
// layer out. A norm's statistics ("stats") are its rstd per row, followed under LayerNorm by its
// mean per row: S = 1 value per row for RMSNorm, 2 for LayerNorm.
// floatX is the storage type of the activations (float, or bf16 under --precision bf16); the
// statistics, the attention's log-sum-exp, the losses, the RoPE tables and the attention
// backward's scratch are always fp32 (real).
template <typename floatX>
struct ActivationTensorsOf {
    floatX* embedded;            // (B, T, C)        token embeddings, the stream entering layer 0
    floatX* attn_norm;           // (L, B, T, C)     N1 output: the attention's input (branch norm) or h (post/deepnorm)
    real*   attn_norm_stats;     // (L, S, B, T)
    floatX* qkv;                 // (L, B, T, 3C)    q, k (after RoPE, but before it on the tensor-core attention's path), v
    real*   att;                 // (L, B, NH, T, T) softmax probabilities (the simple attention; empty with the fused one)
    real*   lse;                 // (L, B, NH, T)    log-sum-exp of each score row (the fused attention)
    floatX* atty;                // (L, B, T, C)     attention output before o_proj
    floatX* attn_resid;          // (L, B, T, C)     the stream after the attention's residual add (before N1: post/deepnorm)
    floatX* mlp_norm;            // (L, B, T, C)     N2 output: the MLP's input (branch norm) or y (post/deepnorm)
    real*   mlp_norm_stats;      // (L, S, B, T)
    floatX* gate_up;             // (L, B, T, 2F)    [gate | up] projections
    floatX* swiglu;              // (L, B, T, F)     silu(gate) * up
    floatX* mlp_resid;           // (L, B, T, C)     the stream after the MLP's residual add
    floatX* attn_branch;         // (P, B, T, C)     peri: o_proj output, the input of N1o
    real*   attn_out_norm_stats; // (P, S, B, T)
    floatX* mlp_branch;          // (P, B, T, C)     peri: down_proj output, the input of N2o
    real*   mlp_out_norm_stats;  // (P, S, B, T)
    floatX* final_norm;          // (B, T, C)
    real*   final_norm_stats;    // (S, B, T)
    floatX* logits;              // (B, T, V)        overwritten by their gradient in backward
    real*   losses;              // (B, T)           per-position cross-entropy
    real*   logit_stats;         // (B, T, 2)        each position's maximum logit and sum of exp(logit - max)
    real*   rope_cos;            // (T, hs/2)
    real*   rope_sin;            // (T, hs/2)
    // backward scratch, reused by every layer
    floatX* dresidual;           // (B, T, C)        gradient of the residual stream
    floatX* dnorm;               // (B, T, C)        gradient of a norm's output (or input)
    floatX* dbranch;             // (B, T, C)        peri: gradient of a sublayer's output, before its out-norm
    floatX* datty;               // (B, T, C)
    floatX* dqkv;                // (B, T, 3C)
    real*   datt_scratch;        // (B, NH, T, T)    attention backward workspace ((B, NH, T) with the fused attention)
    real*   norm_scratch;        // (RMSNORM_PARTIAL_BLOCKS, C) RMSNorm backward: the CUDA kernel's per-block weight-gradient sums
    floatX* dgate_up;            // (B, T, 2F)
    floatX* dswiglu;             // (B, T, F)
    // QKV-Norm (H hybrid and preqkv layers; empty without them)
    floatX* qkv_normed;          // (H, B, T, 3C)    the normalised q, k, v: the attention's input (RoPE as in qkv)
    real*   qkv_norm_stats;      // (H, 3, S, B, T)  the q, k and v norms' statistics
    floatX* dqkv_normed;         // (B, T, 3C)       backward scratch: the gradient of a layer's qkv_normed
};
constexpr int NUM_ACTIVATION_TENSORS = 36;

// values per row of a norm's statistics: rstd, and the mean under LayerNorm
inline size_t norm_stats_per_row(const ModelConfig& c) { return c.norm_type == NORM_LAYERNORM ? 2 : 1; }

// fused_attention: the fused attention keeps no (T, T) probabilities (att is empty) and needs only
// (B, NH, T) of backward scratch, where the simple one needs (B, NH, T, T)
inline void activation_sizes(size_t sizes[NUM_ACTIVATION_TENSORS], const ModelConfig& c, int B, int T,
                             bool fused_attention) {
    size_t L = c.num_layers, C = c.channels, NH = c.num_heads, F = c.ffn_channels, V = c.vocab_size,
           BT = (size_t)B * T, half = c.channels / c.num_heads / 2, P = num_peri_layers(c),
           H = num_qkv_norm_layers(c), S = norm_stats_per_row(c);
    size_t s[NUM_ACTIVATION_TENSORS] = {
        BT * C,                                   // embedded
        L * BT * C, L * S * BT,                   // attn_norm, attn_norm_stats
        L * BT * 3 * C,                           // qkv
        fused_attention ? 0 : L * B * NH * T * T, // att
        L * B * NH * T,                           // lse
        L * BT * C, L * BT * C,                   // atty, attn_resid
        L * BT * C, L * S * BT,                   // mlp_norm, mlp_norm_stats
        L * BT * 2 * F, L * BT * F,               // gate_up, swiglu
        L * BT * C,                               // mlp_resid
        P * BT * C, P * S * BT,                   // attn_branch, attn_out_norm_stats
        P * BT * C, P * S * BT,                   // mlp_branch, mlp_out_norm_stats
        BT * C, S * BT,                           // final_norm, final_norm_stats
        BT * V, BT, BT * 2,                       // logits, losses, logit_stats
        T * half, T * half,                       // rope_cos, rope_sin
        BT * C, BT * C, P ? BT * C : 0,           // dresidual, dnorm, dbranch
        BT * C, BT * 3 * C,                       // datty, dqkv
        B * NH * T * (fused_attention ? 1 : T),   // datt_scratch
        c.norm_type == NORM_LAYERNORM ? 0 : (size_t)RMSNORM_PARTIAL_BLOCKS * C,   // norm_scratch
        BT * 2 * F, BT * F,                       // dgate_up, dswiglu
        H * BT * 3 * C, H * 3 * S * BT,           // qkv_normed, qkv_norm_stats
        H ? BT * 3 * C : 0,                       // dqkv_normed
    };
    for (int i = 0; i < NUM_ACTIVATION_TENSORS; i++) sizes[i] = s[i];
}

// Points the struct's members into one buffer holding the tensors in order, each of the size
// `sizes` gives in elements of its own type (floatX or real), starting on a 256-byte boundary (what
// cuBLASLt and vector loads like). Returns the buffer's size in bytes; memory == nullptr only
// measures it. In AddressSanitizer builds a redzone follows each tensor, and poison_gaps poisons
// it with the tensor's padding (common.h: ASAN_REDZONE_BYTES).
template <typename floatX>
inline size_t point_activations(ActivationTensorsOf<floatX>* a, void* memory, const size_t sizes[NUM_ACTIVATION_TENSORS],
                                bool poison_gaps = false) {
    size_t offset = 0;
    int i = 0;
    auto place = [&](auto*& member) {
        typedef std::remove_reference_t<decltype(*member)> Element;
        member = memory && sizes[i] ? (Element*)((char*)memory + offset) : nullptr;
        size_t bytes = sizes[i] * sizeof(Element);
        size_t next = offset + (bytes + 255) / 256 * 256 + ASAN_REDZONE_BYTES;
        if (poison_gaps && memory) asan_poison((char*)memory + offset + bytes, next - offset - bytes);
        offset = next;
        i++;
    };
    place(a->embedded), place(a->attn_norm), place(a->attn_norm_stats), place(a->qkv), place(a->att);
    place(a->lse), place(a->atty), place(a->attn_resid), place(a->mlp_norm), place(a->mlp_norm_stats);
    place(a->gate_up), place(a->swiglu), place(a->mlp_resid), place(a->attn_branch);
    place(a->attn_out_norm_stats), place(a->mlp_branch), place(a->mlp_out_norm_stats), place(a->final_norm);
    place(a->final_norm_stats), place(a->logits), place(a->losses), place(a->logit_stats), place(a->rope_cos);
    place(a->rope_sin);
    place(a->dresidual), place(a->dnorm), place(a->dbranch), place(a->datty), place(a->dqkv);
    place(a->datt_scratch), place(a->norm_scratch), place(a->dgate_up), place(a->dswiglu);
    place(a->qkv_normed), place(a->qkv_norm_stats), place(a->dqkv_normed);
    return offset;
}

// One layer's slices of the per-layer activations; the peri ones are nullptr in other layers.
template <typename floatX>
struct LayerActivations {
    floatX* attn_norm;           // (B, T, C)
    real*   attn_norm_stats;     // (S, B, T)
    floatX* qkv;                 // (B, T, 3C)
    real*   att;                 // (B, NH, T, T)
    real*   lse;                 // (B, NH, T)
    floatX* atty;                // (B, T, C)
    floatX* attn_resid;          // (B, T, C)
    floatX* mlp_norm;            // (B, T, C)
    real*   mlp_norm_stats;      // (S, B, T)
    floatX* gate_up;             // (B, T, 2F)
    floatX* swiglu;              // (B, T, F)
    floatX* mlp_resid;           // (B, T, C)
    floatX* attn_branch;         // (B, T, C)  peri
    real*   attn_out_norm_stats; // (S, B, T)  peri
    floatX* mlp_branch;          // (B, T, C)  peri
    real*   mlp_out_norm_stats;  // (S, B, T)  peri
    floatX* qkv_normed;          // (B, T, 3C)    hybrid, preqkv: the attention reads these instead of qkv
    real*   qkv_norm_stats;      // (3, S, B, T)  hybrid, preqkv
};

template <typename floatX>
inline LayerActivations<floatX> layer_activations(const ActivationTensorsOf<floatX>& a, const ModelConfig& c, int B, int T, int l) {
    size_t BT = (size_t)B * T, C = c.channels, F = c.ffn_channels, NH = c.num_heads, S = norm_stats_per_row(c);
    bool peri = c.norm_layers[l] == NORM_PERI, qkv_norm = has_qkv_norm(c.norm_layers[l]);
    size_t p = peri ? (size_t)peri_index(c, l) : 0, h = qkv_norm ? (size_t)qkv_norm_index(c, l) : 0;
    LayerActivations<floatX> la;
    la.attn_norm = a.attn_norm + l * BT * C;
    la.attn_norm_stats = a.attn_norm_stats + l * S * BT;
    la.qkv = a.qkv + l * BT * 3 * C;
    la.att = a.att ? a.att + l * B * NH * T * T : nullptr;   // none with the fused attention
    la.lse = a.lse + l * B * NH * T;
    la.atty = a.atty + l * BT * C;
    la.attn_resid = a.attn_resid + l * BT * C;
    la.mlp_norm = a.mlp_norm + l * BT * C;
    la.mlp_norm_stats = a.mlp_norm_stats + l * S * BT;
    la.gate_up = a.gate_up + l * BT * 2 * F;
    la.swiglu = a.swiglu + l * BT * F;
    la.mlp_resid = a.mlp_resid + l * BT * C;
    la.attn_branch = peri ? a.attn_branch + p * BT * C : nullptr;
    la.attn_out_norm_stats = peri ? a.attn_out_norm_stats + p * S * BT : nullptr;
    la.mlp_branch = peri ? a.mlp_branch + p * BT * C : nullptr;
    la.mlp_out_norm_stats = peri ? a.mlp_out_norm_stats + p * S * BT : nullptr;
    la.qkv_normed = qkv_norm ? a.qkv_normed + h * BT * 3 * C : nullptr;
    la.qkv_norm_stats = qkv_norm ? a.qkv_norm_stats + h * 3 * S * BT : nullptr;
    return la;
}

// The q, k and v the attention reads: the normalised ones in a hybrid or preqkv layer, else the projection's
template <typename floatX>
inline floatX* attention_qkv(const LayerActivations<floatX>& la) { return la.qkv_normed ? la.qkv_normed : la.qkv; }

// What layer l hands to the next layer: post, deepnorm and hybrid end on the norm N2, the
// branch-norm kinds on the residual add.
template <typename floatX>
inline const floatX* layer_output(const LayerActivations<floatX>& la, const ModelConfig& c, int l) {
    NormKind kind = c.norm_layers[l];
    return norm_after_residual(kind) || kind == NORM_HYBRID ? la.mlp_norm : la.mlp_resid;
}

// ----------------------------------------------------------------------------
// the model

struct Model {
    ModelConfig config;
    bool on_gpu = false;              // where every buffer below lives (inputs/targets: see there)
    int B = 0, T = 0;                 // batch size and sequence length the activations are sized for
    Precision precision = PRECISION_FP32;
    size_t num_parameters = 0;
    // Four flat buffers of the parameter layout (point_parameters), each of num_parameters values
    // of the type the precision gives (model_weights, model_grads and model_to_host read them):
    void* params_memory = nullptr;    // the weights: fp32 (CPU: real), bf16 in bf16-pure
    void* grads_memory = nullptr;     // their gradients: fp32, bf16 in bf16-pure
    void* adam_m = nullptr;           // AdamW first moment: fp32, bf16 in bf16-pure
    void* adam_v = nullptr;           // AdamW second moment: fp32, bf16 in bf16-pure
    void* weights_copy = nullptr;     // bf16 only: the bf16 copy of params_memory the kernels read, else nullptr
    int adam_step = 0;                // updates done so far (t - 1 of the next update)
    Rounding rounding = ROUND_NEAREST; // how AdamW's bf16 stores round (bf16-pure; layers/adamw.cuh)
    uint64_t rounding_seed = 0;       // with ROUND_STOCHASTIC: the seed of its random bits (the run's --seed)
    WeightDecayScope weight_decay_scope = DECAY_ALL;   // what AdamW's weight decay applies to (model_update)
    size_t activation_bytes = 0;
    void* acts_memory = nullptr;      // (activation_bytes) the activations (point_activations, model_activations)
    int* inputs = nullptr;            // (B, T) tokens of the last forward pass, in model memory
    int* targets = nullptr;           // (B, T) its targets, for backward
    // host_*: the host side of every copy a step makes, page-locked on the GPU (model_host_alloc)
    real* host_losses = nullptr;      // (B, T) per-position losses copied to the host
    int* host_inputs = nullptr;       // (B, T) the last forward pass's inputs, on the host
    int* host_targets = nullptr;      // (B, T) its targets, on the host
    // the inputs' positions grouped by token (group_positions_by_token), for the embedding's
    // backward; made on the host when backward starts, from the forward pass's inputs (so forward
    // passes that only evaluate do not pay for it)
    int* token_positions = nullptr;       // (B*T) in model memory
    int* token_group_starts = nullptr;    // (B*T + 1) in model memory
    int token_groups = 0;                 // groups (distinct input tokens) of the last backward pass
    int* host_token_positions = nullptr;  // (B*T)
    int* host_token_group_starts = nullptr;   // (B*T + 1)
    int* host_token_counts = nullptr;     // (V + 1) host scratch
    double mean_loss = -1.0;          // loss of the last forward pass with targets, else -1: the mean
                                      // over the positions with a target (0 where none has one)
    int target_count = 0;             // the last forward pass's positions with a target (not IGNORED_TARGET)
    bool backward_ready = false;      // a forward pass with targets ran and backward has not
    // model_zero_grad leaves the gradients of the projections and the LM head (nearly all of the
    // gradient memory) to the next backward pass, which writes them instead of adding to zeros
    // (projection_grad_scale). Until it runs they are zero in meaning only; whatever reads the
    // gradients before then zeroes them in memory first (model_settle_grads).
    mutable bool projection_grads_pending = false;
    int skip_layer = -1;              // layer left out of the forward pass (layer-drop analysis), -1: none
    int resume_layer = 0;             // the forward pass starts at this layer, from the output an earlier pass left in
                                      // the layer before's activations (layer-drop analysis; model_forward_typed), 0: from
                                      // the embedding
    bool fused_attention = false;     // on the GPU: the fused (flash-style) attention kernels (tensor cores in bf16,
                                      // head size % 16 == 0); fixed by model_build, which sizes the activations for it
    bool rope_in_attention = true;    // with the fused attention: it applies RoPE itself where it can (the tensor-core
                                      // kernels; attention.cuh); false: RoPE's own kernels before and after it. The
                                      // results are the same to the bit; only the speed differs
#ifdef MIXLN_CUDA
    cudaStream_t stream = 0;
    float* norm_partials = nullptr;   // (GLOBAL_NORM_BLOCKS) on the GPU
    float* norm_squared = nullptr;    // (1) on the GPU
    // recorded after the copies queued out of each set of host buffers (StagedCopies)
    cudaEvent_t staged_copies_done[2] = {nullptr, nullptr};
#endif
};

// ---- where the model lives: memory and kernels of one backend or the other

// LAYER(rmsnorm_forward, out, ...) is LAYER(rmsnorm_forward, out, ...) for a model in host memory,
// and the CUDA launcher rmsnorm_forward(out, ..., stream) for a model on the GPU.
#ifdef MIXLN_CUDA
#define LAYER(name, ...) (model->on_gpu ? name(__VA_ARGS__, model->stream) : name##_cpu(__VA_ARGS__))
#else
#define LAYER(name, ...) name##_cpu(__VA_ARGS__)
#endif

inline void* model_alloc(bool on_gpu, size_t bytes, const char* what) {
#ifdef MIXLN_CUDA
    if (on_gpu) {
        void* p = nullptr;
        cudaError_t error = cudaMalloc(&p, bytes == 0 ? 1 : bytes);
        if (error != cudaSuccess) fail("out of GPU memory allocating %zu bytes for %s: %s", bytes, what, cudaGetErrorString(error));
        return p;
    }
#endif
    (void)on_gpu;
    return malloc_or_fail(bytes, what);
}

inline void model_release(bool on_gpu, void* p) {
#ifdef MIXLN_CUDA
    if (on_gpu) {
        CUDA_CHECK(cudaFree(p));
        return;
    }
#endif
    (void)on_gpu;
    free(p);
}

inline void model_zero(const Model* model, void* p, size_t bytes) {
#ifdef MIXLN_CUDA
    if (model->on_gpu) {
        CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, model->stream));
        return;
    }
#endif
    (void)model;
    memset(p, 0, bytes);
}

// host memory -> model memory
inline void model_copy_in(const Model* model, void* dst, const void* src, size_t bytes) {
#ifdef MIXLN_CUDA
    if (model->on_gpu) {
        CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
        return;
    }
#endif
    (void)model;
    memcpy(dst, src, bytes);
}

// Host buffers that a step copies to the GPU (inputs, targets, token groups; StagedCopies) and
// from it (losses). On the GPU they are page-locked: a copy out of pageable memory first waits for
// all the GPU's queued work, so the host could not queue the backward pass (or the next step)
// before the forward pass (or the update) had run; from page-locked memory the copy is queued
// like a kernel and the host goes on.
inline void* model_host_alloc(bool on_gpu, size_t bytes, const char* what) {
#ifdef MIXLN_CUDA
    if (on_gpu) {
        void* p = nullptr;
        cudaError_t error = cudaMallocHost(&p, bytes == 0 ? 1 : bytes);
        if (error != cudaSuccess)
            fail("could not allocate %zu bytes of page-locked host memory for %s: %s", bytes, what, cudaGetErrorString(error));
        return p;
    }
#endif
    (void)on_gpu;
    return malloc_or_fail(bytes, what);
}

inline void model_host_release(bool on_gpu, void* p) {
#ifdef MIXLN_CUDA
    if (on_gpu) {
        CUDA_CHECK(cudaFreeHost(p));
        return;
    }
#endif
    (void)on_gpu;
    free(p);
}

// The two sets of host buffers whose copies to the model are queued (model_copy_in_queued): the
// host fills a set, queues its copies and marks them (model_queued_copies_done); before it fills
// the set again it waits for those copies (model_wait_queued_copies), which in training finished
// long before (a whole pass later).
enum StagedCopies { STAGED_INPUTS, STAGED_TOKEN_GROUPS };

inline void model_wait_queued_copies(const Model* model, StagedCopies which) {
#ifdef MIXLN_CUDA
    if (model->on_gpu) CUDA_CHECK(cudaEventSynchronize(model->staged_copies_done[which]));
#endif
    (void)model;
    (void)which;
}

// host memory from model_host_alloc -> model memory, queued on the GPU (the host must not rewrite
// src before it is done: model_wait_queued_copies)
inline void model_copy_in_queued(const Model* model, void* dst, const void* src, size_t bytes) {
#ifdef MIXLN_CUDA
    if (model->on_gpu) {
        CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, model->stream));
        return;
    }
#endif
    (void)model;
    memcpy(dst, src, bytes);
}

inline void model_queued_copies_done(const Model* model, StagedCopies which) {
#ifdef MIXLN_CUDA
    if (model->on_gpu) CUDA_CHECK(cudaEventRecord(model->staged_copies_done[which], model->stream));
#endif
    (void)model;
    (void)which;
}

// model memory -> host memory
inline void model_copy_out(const Model* model, void* dst, const void* src, size_t bytes) {
#ifdef MIXLN_CUDA
    if (model->on_gpu) {
        CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
        return;
    }
#endif
    (void)model;
    memcpy(dst, src, bytes);
}

// ---- the buffers, typed by the precision

// Bytes per value of the weights the kernels read and of the activations (floatX), and of the
// weights, gradients and moments (paramX): 2 where they are bf16.
inline size_t storage_bytes(Precision precision) { return precision == PRECISION_FP32 ? sizeof(real) : 2; }
inline size_t param_bytes(Precision precision) { return precision == PRECISION_BF16_PURE ? 2 : sizeof(real); }

// The weights as the kernels read them, as floatX (bf16: the copy; otherwise the weights).
template <typename floatX>
inline ParameterTensorsOf<floatX> model_weights(const Model* model) {
    ParameterTensorsOf<floatX> p;
    point_parameters(&p, (floatX*)(model->weights_copy ? model->weights_copy : model->params_memory), model->config);
    return p;
}

template <typename gradX>
inline ParameterTensorsOf<gradX> model_grads(const Model* model) {
    ParameterTensorsOf<gradX> g;
    point_parameters(&g, (gradX*)model->grads_memory, model->config);
    return g;
}

template <typename floatX>
inline ActivationTensorsOf<floatX> model_activations(const Model* model) {
    size_t sizes[NUM_ACTIVATION_TENSORS];
    activation_sizes(sizes, model->config, model->B, model->T, model->fused_attention);
    ActivationTensorsOf<floatX> a;
    point_activations(&a, model->acts_memory, sizes);
    return a;
}

// count values of type Value at src in model memory, as real on the host
template <typename Value>
inline std::vector<real> model_values_to_host(const Model* model, const Value* src, size_t count) {
    std::vector<Value> raw(count);
    model_copy_out(model, raw.data(), src, count * sizeof(Value));
    std::vector<real> host(count);
    for (size_t i = 0; i < count; i++) host[i] = to_real(raw[i]);
    return host;
}

// host -> count values of type Value at dst in model memory (rounded to nearest even for bf16)
template <typename Value>
inline void model_values_from_host(const Model* model, Value* dst, const real* src, size_t count) {
    std::vector<Value> raw(count);
    for (size_t i = 0; i < count; i++) raw[i] = from_real<Value>(src[i]);
    model_copy_in(model, dst, raw.data(), count * sizeof(Value));
}

// The flat parameter-layout buffers, for checkpoints, tests and analyses.
enum ModelBuffer { MODEL_PARAMS, MODEL_GRADS, MODEL_ADAM_M, MODEL_ADAM_V };

inline void* model_buffer(const Model* model, ModelBuffer which) {
    void* buffers[4] = {model->params_memory, model->grads_memory, model->adam_m, model->adam_v};
    return buffers[which];
}

inline void model_settle_grads(const Model* model);

// A host copy of one of the buffers, as real whatever its precision.
inline std::vector<real> model_to_host(const Model* model, ModelBuffer which) {
    if (which == MODEL_GRADS) model_settle_grads(model);
    const void* buffer = model_buffer(model, which);
#ifdef MIXLN_HAS_BF16
    if (model->precision == PRECISION_BF16_PURE) return model_values_to_host(model, (const bf16*)buffer, model->num_parameters);
#endif
    return model_values_to_host(model, (const real*)buffer, model->num_parameters);
}

inline void model_refresh_weights_copy(Model* model);

// Fills one of the buffers from num_parameters host values (rounded to bf16 in bf16-pure).
// Filling the weights also refreshes the bf16 copy the kernels read (bf16).
inline void model_from_host(Model* model, ModelBuffer which, const real* host) {
    void* buffer = model_buffer(model, which);
    if (which == MODEL_GRADS) model->projection_grads_pending = false;   // every gradient filled
#ifdef MIXLN_HAS_BF16
    if (model->precision == PRECISION_BF16_PURE) {
        model_values_from_host(model, (bf16*)buffer, host, model->num_parameters);
        return;
    }
#endif
    model_values_from_host(model, (real*)buffer, host, model->num_parameters);
    if (which == MODEL_PARAMS) model_refresh_weights_copy(model);
}

// count activations from src, an activation tensor's element (of the model's storage type), as
// real on the host: e.g. the logits of one position for sampling. `select` picks the tensor
// from either view of the activations (a generic lambda, [](auto& a) { return a.logits; }).
template <typename Select>
inline std::vector<real> model_activations_to_host(const Model* model, Select select, size_t offset, size_t count) {
#ifdef MIXLN_HAS_BF16
    if (model->precision != PRECISION_FP32) return model_values_to_host(model, select(model_activations<bf16>(model)) + offset, count);
#endif
    return model_values_to_host(model, select(model_activations<real>(model)) + offset, count);
}

// Allocates every buffer once, for batches of B sequences of T tokens, in host memory or on the
// GPU, in the given precision (bf16 and bf16-pure on the GPU only: the CPU reference is fp32).
// Parameters are zero until model_init_weights or a checkpoint fills them.
inline void model_build(Model* model, const ModelConfig& config, int B, int T, bool on_gpu = false,
                        Precision precision = PRECISION_FP32, bool fused_attention = false) {
    model_config_check(config);
    if (B < 1 || T < 1) fail("batch size and sequence length must be positive (B %d, T %d)", B, T);
    if (T > config.max_seq_len) fail("sequence length %d exceeds the model's %d", T, config.max_seq_len);
#ifndef MIXLN_CUDA
    if (on_gpu) fail("this build has no CUDA backend");
#endif
    if (precision != PRECISION_FP32 && !on_gpu) {
        fail("--precision %s runs on the GPU only; the CPU backend computes in fp32", precision_name(precision));
    }
    if (fused_attention && !on_gpu) fail("the fused attention runs on the GPU only; the CPU backend has one attention");
    model->config = config;
    model->fused_attention = fused_attention;
    model->B = B;
    model->T = T;
    model->on_gpu = on_gpu;
    model->precision = precision;
    size_t n = num_parameters(config);
    model->num_parameters = n;
    const size_t param_buffer_bytes = n * param_bytes(precision);
    size_t sizes[NUM_ACTIVATION_TENSORS];
    activation_sizes(sizes, config, B, T, fused_attention);
    ActivationTensorsOf<real> fp32_view;
    model->activation_bytes = point_activations(&fp32_view, nullptr, sizes);
#ifdef MIXLN_HAS_BF16
    ActivationTensorsOf<bf16> bf16_view;
    if (precision != PRECISION_FP32) model->activation_bytes = point_activations(&bf16_view, nullptr, sizes);
#endif
    // The whole footprint is checked before any of it is allocated, so that a model that does not
    // fit is refused with its sizes: in host memory against what the system has available
    // (host_memory_available: malloc would promise more), on the GPU against its free memory.
    size_t state_bytes = 4 * param_buffer_bytes + (precision == PRECISION_BF16 ? n * storage_bytes(precision) : 0);
    size_t available = 0;
#ifdef MIXLN_CUDA
    if (on_gpu) {
        size_t total_bytes = 0;
        CUDA_CHECK(cudaMemGetInfo(&available, &total_bytes));
    }
#endif
    if (!on_gpu) available = host_memory_available();
    if (available > 0 && state_bytes + model->activation_bytes > available) {
        fail("the model needs %.2f GiB of %s memory (parameters, gradients and AdamW state%s %.2f GiB, activations "
             "%.2f GiB at B=%d, T=%d), but %s %.2f GiB available",
             (state_bytes + model->activation_bytes) / 1073741824.0, on_gpu ? "GPU" : "host",
             precision == PRECISION_BF16 ? " with the bf16 weight copy" : "", state_bytes / 1073741824.0,
             model->activation_bytes / 1073741824.0, B, T, on_gpu ? "the GPU has" : "this machine has",
             available / 1073741824.0);
    }
    model->params_memory = model_alloc(on_gpu, param_buffer_bytes, "parameters");
    model->grads_memory = model_alloc(on_gpu, param_buffer_bytes, "gradients");
    model->adam_m = model_alloc(on_gpu, param_buffer_bytes, "AdamW first moment");
    model->adam_v = model_alloc(on_gpu, param_buffer_bytes, "AdamW second moment");
    model_zero(model, model->params_memory, param_buffer_bytes);
    model_zero(model, model->grads_memory, param_buffer_bytes);
    model_zero(model, model->adam_m, param_buffer_bytes);
    model_zero(model, model->adam_v, param_buffer_bytes);
    if (precision == PRECISION_BF16) {
        model->weights_copy = model_alloc(on_gpu, n * storage_bytes(precision), "bf16 copy of the weights");
        model_zero(model, model->weights_copy, n * storage_bytes(precision));
    }

    real* rope_cos_table = nullptr;   // where the RoPE tables go, (T, hs/2) each
    real* rope_sin_table = nullptr;
    model->acts_memory = model_alloc(on_gpu, model->activation_bytes, "activations");
    model_zero(model, model->acts_memory, model->activation_bytes);
#ifdef MIXLN_ASAN
    // the gaps between the tensors, where a kernel that overruns one would land (make sanitize)
    if (precision == PRECISION_FP32) point_activations(&fp32_view, model->acts_memory, sizes, true);
#ifdef MIXLN_HAS_BF16
    else point_activations(&bf16_view, model->acts_memory, sizes, true);
#endif
#endif
    rope_cos_table = model_activations<real>(model).rope_cos;
    rope_sin_table = model_activations<real>(model).rope_sin;
#ifdef MIXLN_HAS_BF16
    if (precision != PRECISION_FP32) {
        rope_cos_table = model_activations<bf16>(model).rope_cos;
        rope_sin_table = model_activations<bf16>(model).rope_sin;
    }
#endif
    int head_size = config.channels / config.num_heads;
    std::vector<real> rope_cos((size_t)T * head_size / 2), rope_sin((size_t)T * head_size / 2);
    rope_tables_cpu(rope_cos.data(), rope_sin.data(), T, head_size, config.rope_theta);
    model_copy_in(model, rope_cos_table, rope_cos.data(), rope_cos.size() * sizeof(real));
    model_copy_in(model, rope_sin_table, rope_sin.data(), rope_sin.size() * sizeof(real));
    model->inputs = (int*)model_alloc(on_gpu, (size_t)B * T * sizeof(int), "inputs");
    model->targets = (int*)model_alloc(on_gpu, (size_t)B * T * sizeof(int), "targets");
    model->host_losses = (real*)model_host_alloc(on_gpu, (size_t)B * T * sizeof(real), "losses");
    model->token_positions = (int*)model_alloc(on_gpu, (size_t)B * T * sizeof(int), "token positions");
    model->token_group_starts = (int*)model_alloc(on_gpu, ((size_t)B * T + 1) * sizeof(int), "token group starts");
    model->host_inputs = (int*)model_host_alloc(on_gpu, (size_t)B * T * sizeof(int), "inputs");
    model->host_targets = (int*)model_host_alloc(on_gpu, (size_t)B * T * sizeof(int), "targets");
    model->host_token_positions = (int*)model_host_alloc(on_gpu, (size_t)B * T * sizeof(int), "token positions");
    model->host_token_group_starts = (int*)model_host_alloc(on_gpu, ((size_t)B * T + 1) * sizeof(int), "token group starts");
    model->host_token_counts = (int*)malloc_or_fail(((size_t)config.vocab_size + 1) * sizeof(int), "token counts");
#ifdef MIXLN_CUDA
    if (on_gpu) {
        model->norm_partials = (float*)model_alloc(true, GLOBAL_NORM_BLOCKS * sizeof(float), "gradient norm partials");
        model->norm_squared = (float*)model_alloc(true, sizeof(float), "gradient norm");
        for (cudaEvent_t& event : model->staged_copies_done) {
            CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
            CUDA_CHECK(cudaEventRecord(event, model->stream));   // nothing queued yet: done
        }
    }
#endif
}

inline void model_free(Model* model) {
    bool on_gpu = model->on_gpu;
    model_release(on_gpu, model->params_memory);
    model_release(on_gpu, model->grads_memory);
    model_release(on_gpu, model->adam_m);
    model_release(on_gpu, model->adam_v);
    if (model->weights_copy) model_release(on_gpu, model->weights_copy);
    model_release(on_gpu, model->acts_memory);
    model_release(on_gpu, model->inputs);
    model_release(on_gpu, model->targets);
    model_release(on_gpu, model->token_positions);
    model_release(on_gpu, model->token_group_starts);
#ifdef MIXLN_CUDA
    if (on_gpu) {
        CUDA_CHECK(cudaStreamSynchronize(model->stream));   // no queued copy still reads the host buffers
        model_release(true, model->norm_partials);
        model_release(true, model->norm_squared);
        for (cudaEvent_t event : model->staged_copies_done) CUDA_CHECK(cudaEventDestroy(event));
    }
#endif
    model_host_release(on_gpu, model->host_losses);
    model_host_release(on_gpu, model->host_inputs);
    model_host_release(on_gpu, model->host_targets);
    model_host_release(on_gpu, model->host_token_positions);
    model_host_release(on_gpu, model->host_token_group_starts);
    free(model->host_token_counts);
    *model = Model();
}

// The initialisation. The official code's: every linear weight normal(0, 0.02), the embedding
// normal(0, embed_std) (0.02 by default; the paper's code once used sqrt(2/5)), norm weights 1
// and biases 0. On top of it:
//   - deepnorm layers get DeepNet's init, xavier-normal std = gain * sqrt(2 / (fan_in + fan_out)),
//     gain 1 for q and k, gain b = (8L)^(-1/4) for v, o, gate, up and down;
//   - scaled_init: o_proj and down_proj get std 0.02 / sqrt(2L) in the branch-norm layers
//     (pre, lns, peri, preqkv: scaled_init_kind), the paper's "scaled init".
// The generator is drawn tensor by tensor in layout order and layer by layer within a tensor, so a
// seed gives the same weights whatever the per-layer stds.
inline bool scaled_init_kind(NormKind kind) {
    return kind == NORM_PRE || kind == NORM_LNS || kind == NORM_PERI || kind == NORM_PREQKV;
}

inline void model_init_weights(Model* model, uint64_t seed, float embed_std, bool scaled_init = false) {
    const ModelConfig& c = model->config;
    std::vector<real> host(model->num_parameters);
    ParameterTensors p;
    point_parameters(&p, host.data(), c);
    size_t sizes[NUM_PARAMETER_TENSORS];
    parameter_sizes(sizes, c);
    const size_t C = c.channels, F = c.ffn_channels, L = c.num_layers;
    const double deepnorm_gain = pow(8.0 * L, -0.25);
    auto xavier_std = [](double gain, size_t fan_in, size_t fan_out) { return (float)(gain * sqrt(2.0 / (fan_in + fan_out))); };
    const float output_std = scaled_init ? (float)(0.02 / sqrt(2.0 * L)) : 0.02f;
    uint64_t state = seed;
    fill_normal(p.embed_tokens, sizes[0], embed_std, &state);
    for (size_t i = 0; i < sizes[1]; i++) p.attn_norm[i] = 1;
    for (size_t l = 0; l < L; l++) {   // q, k, v
        bool deepnorm = c.norm_layers[l] == NORM_DEEPNORM;
        real* qkv = p.qkv_proj + l * 3 * C * C;
        fill_normal(qkv, 2 * C * C, deepnorm ? xavier_std(1.0, C, C) : 0.02f, &state);
        fill_normal(qkv + 2 * C * C, C * C, deepnorm ? xavier_std(deepnorm_gain, C, C) : 0.02f, &state);
    }
    for (size_t l = 0; l < L; l++) {
        NormKind kind = c.norm_layers[l];
        float std = kind == NORM_DEEPNORM ? xavier_std(deepnorm_gain, C, C) : scaled_init_kind(kind) ? output_std : 0.02f;
        fill_normal(p.o_proj + l * C * C, C * C, std, &state);
    }
    for (size_t i = 0; i < sizes[4]; i++) p.mlp_norm[i] = 1;
    for (size_t l = 0; l < L; l++) {
        bool deepnorm = c.norm_layers[l] == NORM_DEEPNORM;
        fill_normal(p.gate_up_proj + l * 2 * F * C, 2 * F * C, deepnorm ? xavier_std(deepnorm_gain, C, F) : 0.02f, &state);
    }
    for (size_t l = 0; l < L; l++) {
        NormKind kind = c.norm_layers[l];
        float std = kind == NORM_DEEPNORM ? xavier_std(deepnorm_gain, F, C) : scaled_init_kind(kind) ? output_std : 0.02f;
        fill_normal(p.down_proj + l * C * F, C * F, std, &state);
    }
    for (size_t i = 0; i < sizes[7]; i++) p.final_norm[i] = 1;
    fill_normal(p.lm_head, sizes[8], 0.02f, &state);
    for (size_t i = 0; i < sizes[9]; i++) p.attn_out_norm[i] = 1;
    for (size_t i = 0; i < sizes[10]; i++) p.mlp_out_norm[i] = 1;
    // sizes[11..15] and [17]: the LayerNorm biases, 0 as the buffer already is
    for (size_t i = 0; i < sizes[16]; i++) p.qkv_norm[i] = 1;
    model_from_host(model, MODEL_PARAMS, host.data());
}

// ----------------------------------------------------------------------------
// forward

// The model's norm, RMSNorm or LayerNorm, over B*T rows of C values `stride` apart in out and inp:
// out = N(inp), with the row statistics saved into stats (S, B, T). bias is used under LayerNorm only.
template <typename floatX>
inline void norm_forward_strided(Model* model, floatX* out, real* stats, const floatX* inp, const floatX* weight,
                                 const floatX* bias, int stride) {
    const ModelConfig& c = model->config;
    const int BT = model->B * model->T, C = c.channels;
    if (c.norm_type == NORM_LAYERNORM) {
        LAYER(layernorm_forward, out, stats + BT, stats, inp, weight, bias, BT, C, stride, c.rms_norm_eps);
    } else {
        LAYER(rmsnorm_forward, out, stats, inp, weight, BT, C, stride, c.rms_norm_eps);
    }
}

// ... over the residual stream's packed (B*T, C) rows: every norm but QKV-Norm's
template <typename floatX>
inline void norm_forward(Model* model, floatX* out, real* stats, const floatX* inp, const floatX* weight, const floatX* bias) {
    norm_forward_strided(model, out, stats, inp, weight, bias, model->config.channels);
}

// The gradients of norm_forward_strided's input (dinp: accumulated, or written where accumulate is
// false; rows `stride` apart, like dout and inp) and parameters (dweight, dbias: accumulated).
template <typename floatX, typename gradX>
inline void norm_backward_strided(Model* model, floatX* dinp, gradX* dweight, gradX* dbias, const floatX* dout,
                                  const floatX* inp, const floatX* weight, const real* stats, bool accumulate, int stride) {
    const ModelConfig& c = model->config;
    const int BT = model->B * model->T, C = c.channels;
    if (c.norm_type == NORM_LAYERNORM) {
        LAYER(layernorm_backward, dinp, dweight, dbias, dout, inp, weight, stats + BT, stats, BT, C, stride, accumulate);
    } else {
        real* norm_scratch = model_activations<floatX>(model).norm_scratch;   // the CUDA kernel's partial sums
        LAYER(rmsnorm_backward, dinp, dweight, norm_scratch, dout, inp, weight, stats, BT, C, stride, accumulate);
    }
}

// ... and of norm_forward's
template <typename floatX, typename gradX>
inline void norm_backward(Model* model, floatX* dinp, gradX* dweight, gradX* dbias, const floatX* dout, const floatX* inp,
                          const floatX* weight, const real* stats, bool accumulate) {
    norm_backward_strided(model, dinp, dweight, dbias, dout, inp, weight, stats, accumulate, model->config.channels);
}

// HybridNorm's QKV-Norm: q, k and v of the layer's qkv (B, T, 3C) each through a norm of its own
// (rows 0, 1 and 2 of the layer's (3, C) weights and biases) into qkv_normed (B, T, 3C), the
// attention's input. q, k and v are the three C-wide column blocks of qkv's rows, so each is B*T
// rows of C values 3C apart, and the norm kernels take them where they lie (row stride 3C).
template <typename floatX>
inline void qkv_norm_forward(Model* model, const LayerActivations<floatX>& la, const LayerWeightsOf<floatX>& w) {
    const ModelConfig& c = model->config;
    const int BT = model->B * model->T, C = c.channels;
    const size_t stats = norm_stats_per_row(c) * BT;   // one norm's statistics
    for (int s = 0; s < 3; s++) {   // q, k, v
        norm_forward_strided(model, la.qkv_normed + s * C, la.qkv_norm_stats + s * stats, la.qkv + s * C,
                             w.qkv_norm + s * C, w.qkv_norm_bias ? w.qkv_norm_bias + s * C : nullptr, 3 * C);
    }
}

// Its backward: dqkv_normed (B, T, 3C), the gradient of qkv_normed, into a.dqkv (B, T, 3C), the
// gradient of qkv (written); the norms' weight (and bias) gradients are accumulated.
template <typename floatX, typename gradX>
inline void qkv_norm_backward(Model* model, const ActivationTensorsOf<floatX>& a, const LayerActivations<floatX>& la,
                              const LayerWeightsOf<floatX>& w, const LayerWeightsOf<gradX>& g) {
    const ModelConfig& c = model->config;
    const int BT = model->B * model->T, C = c.channels;
    const size_t stats = norm_stats_per_row(c) * BT;
    for (int s = 0; s < 3; s++) {
        norm_backward_strided(model, a.dqkv + s * C, g.qkv_norm + s * C, g.qkv_norm_bias ? g.qkv_norm_bias + s * C : nullptr,
                              a.dqkv_normed + s * C, la.qkv + s * C, w.qkv_norm + s * C, la.qkv_norm_stats + s * stats,
                              false, 3 * C);   // the inputs' gradient written
    }
}

// out = x_scale * x + branch: a skip connection (x_scale is DeepNorm's a, else 1). out may alias
// x or branch.
template <typename floatX>
inline void residual_add(Model* model, floatX* out, const floatX* x, float x_scale, const floatX* branch) {
    const size_t n = (size_t)model->B * model->T * model->config.channels;
    if (x_scale != 1.0f) {
        LAYER(residual_scaled_forward, out, x, x_scale, branch, n);
    } else {
        LAYER(residual_forward, out, x, branch, n);
    }
}

// sum = x_scale * x + branch, then out = N(sum) with its statistics: one fused pass under RMSNorm
// (residual_rmsnorm_forward), the add and then norm_forward under LayerNorm. sum may alias x or
// branch, not out.
template <typename floatX>
inline void residual_norm_forward(Model* model, floatX* sum, floatX* out, real* stats, const floatX* x, float x_scale,
                                  const floatX* branch, const floatX* weight, const floatX* bias) {
    const ModelConfig& c = model->config;
    if (c.norm_type == NORM_RMSNORM) {
        LAYER(residual_rmsnorm_forward, sum, out, stats, x, x_scale, branch, weight, model->B * model->T, c.channels,
              c.rms_norm_eps);
    } else {
        residual_add(model, sum, x, x_scale, branch);
        norm_forward(model, out, stats, sum, weight, bias);
    }
}

// Where a norm writes and what it multiplies by: norm_forward's arguments other than its input.
template <typename floatX>
struct NormTarget {
    floatX* out;
    real* stats;
    const floatX* weight;
    const floatX* bias;
};

// The norm that first reads the stream y = h + MLP(...) a branch-norm layer l outputs, if one
// does: the N1 of the next layer that runs (the skipped layer, if any, is passed over) when that
// layer normalises its input, or the final norm after the last layer. A post, deepnorm or hybrid
// layer takes y as it is: false.
template <typename floatX>
inline bool next_stream_norm(const Model* model, const ActivationTensorsOf<floatX>& a, const ParameterTensorsOf<floatX>& p,
                             int l, NormTarget<floatX>* norm) {
    const ModelConfig& c = model->config;
    int next = l + 1;
    if (next == model->skip_layer) next++;
    if (next == c.num_layers) {
        *norm = {a.final_norm, a.final_norm_stats, p.final_norm, p.final_norm_bias};
        return true;
    }
    if (attention_takes_stream(c.norm_layers[next])) return false;
    LayerActivations<floatX> la = layer_activations(a, c, model->B, model->T, next);
    LayerWeightsOf<floatX> w = layer_weights(p, c, next);
    *norm = {la.attn_norm, la.attn_norm_stats, w.attn_norm, w.attn_norm_bias};
    return true;
}

// model->mean_loss from the per-position losses (B, T) in model memory (waits for the GPU): their
// mean over the positions with a target (an ignored one's loss is 0)
inline void model_read_loss(Model* model, const real* losses) {
    const int BT = model->B * model->T;
    model_copy_out(model, model->host_losses, losses, (size_t)BT * sizeof(real));
    double sum = 0.0;
    for (int i = 0; i < BT; i++) sum += model->host_losses[i];
    model->mean_loss = model->target_count > 0 ? sum / model->target_count : 0.0;
}

// The gradient of the mean loss with respect to each scored position's loss: loss_scale over the
// positions with a target (none: nothing to learn, 0)
inline double model_position_dloss(const Model* model, float loss_scale) {
    return model->target_count > 0 ? loss_scale / (double)model->target_count : 0.0;
}

// The forward pass in one storage type (model_forward below picks it).
//
// Every residual add that a norm of its sum follows runs fused with that norm
// (residual_norm_forward: one pass per row under RMSNorm), in the two shapes of the top of this
// file:
//   - norm after the residual add (post, deepnorm): s1 = a*x + attn -> h = N1(s1), and
//     s2 = a*h + mlp -> y = N2(s2), both within the layer. The norm's output is the new stream;
//     the sum (attn_resid, mlp_resid) is kept only as the norm's input for backward.
//   - norm on the branch (pre, lns, peri): h = x + attn -> N2(h) within the layer: the sum is the
//     stream, the norm's output only the MLP's input (times 1/sqrt(l+1) for lns, afterwards as
//     before). y = h + mlp is read next by the N1 of the next layer that runs if it is a
//     branch-norm layer, or by the final norm after the last layer (next_stream_norm): that norm
//     runs here, fused with the add, and the next layer (or the final norm) finds its output
//     ready (stream_normed). When the next layer is post or deepnorm, which take y as it is, the
//     add runs alone.
// Backward needs no change: the sums are saved in the same buffers as before, the statistics in
// the same places, and the residual add's own backward is nothing but each norm's backward
// accumulating into the stream's gradient, as it already does (model_backward).
// floatX: the storage type of the weights the kernels read and of the activations (model_forward).
// loss_gradient (training, with targets): the cross-entropy also writes the loss's gradient, scaled
// by loss_scale, over the logits in the same pass (model_forward_backward).
template <typename floatX>
inline void model_forward_typed(Model* model, bool with_targets, bool loss_gradient = false, float loss_scale = 1.0f) {
    const ModelConfig& c = model->config;
    const int B = model->B, T = model->T, C = c.channels, NH = c.num_heads, F = c.ffn_channels,
              V = c.vocab_size, hs = C / NH, BT = B * T;
    const size_t stream_size = (size_t)BT * C;
    const ParameterTensorsOf<floatX> p = model_weights<floatX>(model);
    const ActivationTensorsOf<floatX> a = model_activations<floatX>(model);

    // resume_layer > 0: layers 0 .. resume_layer-1 are taken as they are, from an earlier pass over
    // the same inputs (the layer-drop analysis runs the layers before a dropped one only once). The
    // pass begins with the stream the layer before left; a branch norm of it that the earlier pass
    // ran fused with its add runs alone here, to the same bits (residual_rmsnorm_forward_cpu)
    const int first_layer = model->resume_layer;
    if (first_layer < 0 || first_layer > c.num_layers || (model->skip_layer >= 0 && first_layer > model->skip_layer))
        fail("resume_layer %d: must be in [0, %d] and not after the skipped layer %d", first_layer, c.num_layers,
             model->skip_layer);
    if (first_layer == 0) LAYER(embedding_forward, a.embedded, model->inputs, p.embed_tokens, BT, C);
    const floatX* residual = first_layer == 0 ? a.embedded   // (B, T, C) the stream entering layer l
                                              : layer_output(layer_activations(a, c, B, T, first_layer - 1), c, first_layer - 1);
    bool stream_normed = false;          // its next norm (layer l's N1, or the final norm) already ran, fused with its add
    for (int l = first_layer; l < c.num_layers; l++) {
        if (l == model->skip_layer) continue;   // its input goes straight on to the next layer
        const NormKind kind = c.norm_layers[l];
        const bool after_residual = norm_after_residual(kind);
        const bool peri = kind == NORM_PERI, hybrid = kind == NORM_HYBRID, qkv_norm = has_qkv_norm(kind);
        const float output_scale = norm_output_scale(c, l), stream_scale = residual_scale(c, l);
        LayerWeightsOf<floatX> w = layer_weights(p, c, l);
        LayerActivations<floatX> la = layer_activations(a, c, B, T, l);

        // attention sublayer: a branch norm normalises its input; post/deepnorm/hybrid take the
        // stream as it is (hybrid normalises q, k and v instead)
        const floatX* attn_input = residual;
        if (!attention_takes_stream(kind)) {
            if (!stream_normed) norm_forward(model, la.attn_norm, la.attn_norm_stats, residual, w.attn_norm, w.attn_norm_bias);
            if (output_scale != 1.0f) LAYER(scale_forward, la.attn_norm, la.attn_norm, output_scale, stream_size);
            attn_input = la.attn_norm;
        }
        LAYER(matmul_forward, la.qkv, attn_input, w.qkv_proj, BT, C, 3 * C);
        if (qkv_norm) qkv_norm_forward(model, la, w);   // QKV-Norm: the attention reads qkv_normed
        floatX* qkv = attention_qkv(la);
        // RoPE on q and k, then the attention: the fused attention applies RoPE itself (the
        // tensor-core kernels as they load q and k, leaving qkv unrotated; attention.cuh) unless
        // rope_in_attention is off
#ifdef MIXLN_CUDA
        if (model->on_gpu && model->fused_attention) {
            const real* rope_cos = a.rope_cos;   // the tables the attention applies, or none
            const real* rope_sin = a.rope_sin;
            if (!model->rope_in_attention) {
                LAYER(rope_forward, qkv, a.rope_cos, a.rope_sin, B, T, NH, hs);
                rope_cos = rope_sin = nullptr;
            }
            attention_forward_fused(la.atty, la.lse, qkv, rope_cos, rope_sin, B, T, NH, hs, model->stream);
        } else
#endif
        {
            LAYER(rope_forward, qkv, a.rope_cos, a.rope_sin, B, T, NH, hs);
            LAYER(attention_forward, la.atty, la.att, qkv, B, T, NH, hs);
        }
        if (peri) {   // the attention's output is normalised before the add: N1o(o_proj(...))
            LAYER(matmul_forward, la.attn_branch, la.atty, w.o_proj, BT, C, C);
            norm_forward(model, la.attn_resid, la.attn_out_norm_stats, la.attn_branch, w.attn_out_norm, w.attn_out_norm_bias);
        } else {
            LAYER(matmul_forward, la.attn_resid, la.atty, w.o_proj, BT, C, C);
        }

        // the attention's residual add, fused with the norm of its sum. Post/deepnorm: h = N1(a*x + attn)
        // is the new stream, and the MLP adds onto it; the branch norms: the sum is h, the stream,
        // and N2(h) only the MLP's input
        const floatX* mlp_stream;   // h, what the MLP output is added to
        const floatX* mlp_input;
        if (after_residual) {
            residual_norm_forward(model, la.attn_resid, la.attn_norm, la.attn_norm_stats, residual, stream_scale,
                                  la.attn_resid, w.attn_norm, w.attn_norm_bias);
            mlp_stream = la.attn_norm;
            mlp_input = la.attn_norm;
        } else if (hybrid) {   // h = x + attn, no norm: the MLP reads the stream as it is
            residual_add(model, la.attn_resid, residual, 1.0f, la.attn_resid);
            mlp_stream = la.attn_resid;
            mlp_input = la.attn_resid;
        } else {
            residual_norm_forward(model, la.attn_resid, la.mlp_norm, la.mlp_norm_stats, residual, stream_scale,
                                  la.attn_resid, w.mlp_norm, w.mlp_norm_bias);
            if (output_scale != 1.0f) LAYER(scale_forward, la.mlp_norm, la.mlp_norm, output_scale, stream_size);
            mlp_stream = la.attn_resid;
            mlp_input = la.mlp_norm;
        }
        LAYER(matmul_forward, la.gate_up, mlp_input, w.gate_up_proj, BT, C, 2 * F);
        LAYER(swiglu_forward, la.swiglu, la.gate_up, BT, F);
        if (peri) {   // N2o(down_proj(...))
            LAYER(matmul_forward, la.mlp_branch, la.swiglu, w.down_proj, BT, F, C);
            norm_forward(model, la.mlp_resid, la.mlp_out_norm_stats, la.mlp_branch, w.mlp_out_norm, w.mlp_out_norm_bias);
        } else {
            LAYER(matmul_forward, la.mlp_resid, la.swiglu, w.down_proj, BT, F, C);
        }
        // the MLP's residual add: y = N2(a*h + mlp) for post/deepnorm/hybrid; for the branch norms
        // y = h + mlp, fused with the next norm that reads y where there is one
        NormTarget<floatX> next;
        stream_normed = false;
        if (after_residual || hybrid) {
            residual_norm_forward(model, la.mlp_resid, la.mlp_norm, la.mlp_norm_stats, mlp_stream, stream_scale,
                                  la.mlp_resid, w.mlp_norm, w.mlp_norm_bias);
        } else if (next_stream_norm(model, a, p, l, &next)) {
            residual_norm_forward(model, la.mlp_resid, next.out, next.stats, mlp_stream, stream_scale, la.mlp_resid,
                                  next.weight, next.bias);
            stream_normed = true;
        } else {
            residual_add(model, la.mlp_resid, mlp_stream, stream_scale, la.mlp_resid);
        }
        residual = layer_output(la, c, l);
    }

    if (!stream_normed) norm_forward(model, a.final_norm, a.final_norm_stats, residual, p.final_norm, p.final_norm_bias);
    LAYER(matmul_forward, a.logits, a.final_norm, p.lm_head, BT, C, V);
    model->mean_loss = -1.0;
    // a skipped layer's activations are stale, and those before a resumed pass another pass's
    model->backward_ready = with_targets && model->skip_layer < 0 && first_layer == 0;
    if (with_targets && loss_gradient) {
        // loss = mean over the positions with a target: each one's loss has gradient
        // loss_scale / target_count. The losses are read after the backward pass is queued
        // (model_backward_typed), so that the GPU never waits for the host in between.
        LAYER(crossentropy_forward_backward, a.logits, a.losses, a.logit_stats, a.logits, model->targets,
              (real)model_position_dloss(model, loss_scale), BT, V);
    } else if (with_targets) {
        LAYER(crossentropy_forward, a.losses, a.logit_stats, a.logits, model->targets, BT, V);
        model_read_loss(model, a.losses);
    }
}

// model_forward, and with loss_gradient also the loss's gradient over the logits (model_forward_backward)
inline void model_forward_with(Model* model, const int* inputs, const int* targets, bool loss_gradient,
                               float loss_scale) {
    const int BT = model->B * model->T, V = model->config.vocab_size;
    model->target_count = 0;
    for (int i = 0; i < BT; i++) {
        if (inputs[i] < 0 || inputs[i] >= V) fail("input token %d at position %d is outside the vocabulary [0, %d)", inputs[i], i, V);
        if (targets && targets[i] == IGNORED_TARGET) continue;
        if (targets && (targets[i] < 0 || targets[i] >= V)) fail("target token %d at position %d is outside the vocabulary [0, %d)", targets[i], i, V);
        if (targets) model->target_count++;
    }
    // through the page-locked host buffers, whose copies are queued (model_host_alloc); host_inputs
    // is also what backward groups by token
    model_wait_queued_copies(model, STAGED_INPUTS);
    memcpy(model->host_inputs, inputs, (size_t)BT * sizeof(int));
    model_copy_in_queued(model, model->inputs, model->host_inputs, (size_t)BT * sizeof(int));
    if (targets) {
        memcpy(model->host_targets, targets, (size_t)BT * sizeof(int));
        model_copy_in_queued(model, model->targets, model->host_targets, (size_t)BT * sizeof(int));
    }
    model_queued_copies_done(model, STAGED_INPUTS);
#ifdef MIXLN_HAS_BF16
    if (model->precision != PRECISION_FP32)
        return model_forward_typed<bf16>(model, targets != nullptr, loss_gradient, loss_scale);
#endif
    model_forward_typed<real>(model, targets != nullptr, loss_gradient, loss_scale);
}

// Runs the model on inputs (B, T); with targets (B, T) it also computes the per-position losses
// and model->mean_loss. Token ids must be in [0, V); a target may also be IGNORED_TARGET.
inline void model_forward(Model* model, const int* inputs, const int* targets) {
    model_forward_with(model, inputs, targets, false, 1.0f);
}

// ----------------------------------------------------------------------------
// backward

// The parameter tensors whose gradients a matmul_backward produces, by their index in
// point_parameters' order: qkv_proj, o_proj, gate_up_proj, down_proj, lm_head. Every backward pass
// computes each of them whole, once.
inline bool is_projection_tensor(int index) {
    return index == 2 || index == 3 || index == 5 || index == 6 || index == 8;
}

// Zeroes the gradients of the projection tensors (projections true) or of all the others.
inline void model_zero_grad_tensors(const Model* model, bool projections) {
    size_t sizes[NUM_PARAMETER_TENSORS];
    parameter_sizes(sizes, model->config);
    const size_t value_bytes = param_bytes(model->precision);
    size_t offset = 0;   // in values
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
        if (sizes[i] > 0 && is_projection_tensor(i) == projections)
            model_zero(model, (char*)model->grads_memory + offset * value_bytes, sizes[i] * value_bytes);
        offset += sizes[i];
    }
}

// Zeroes the gradients, the projections' lazily (Model::projection_grads_pending): the next
// backward pass writes those, and the zeroing here covers only the embedding's gradient (a sum
// over each token's positions, for the tokens present) and the norms' (small). At LLaMA-71M that
// is a quarter of the gradient memory; at LLaMA-1B, 5%.
inline void model_zero_grad(Model* model) {
    model_zero_grad_tensors(model, false);
    model->projection_grads_pending = true;
}

// matmul_backward's dweight_scale for the projections: 0 in the first backward pass after
// model_zero_grad (their gradients written), 1 after it (accumulated: gradient accumulation)
inline float projection_grad_scale(const Model* model) { return model->projection_grads_pending ? 0.0f : 1.0f; }

// Makes the projections' pending zeros real, for a reader of the gradients that comes before any
// backward pass (model_grad_norm, model_update, model_to_host, ...). A no-op otherwise.
inline void model_settle_grads(const Model* model) {
    if (!model->projection_grads_pending) return;
    model_zero_grad_tensors(model, true);
    model->projection_grads_pending = false;
}

// The attention sublayer's backward: dout (B, T, C) is the gradient of o_proj's output; the
// gradient of attn_input (B, T, C) goes into dinp = dinp_scale * dinp + that gradient (rounded
// once, by the last matmul). dinp may be dout itself: dout is consumed by the first step, dinp
// written by the last.
template <typename floatX, typename gradX>
inline void attention_sublayer_backward(Model* model, const ActivationTensorsOf<floatX>& a, floatX* dinp, float dinp_scale,
                                        const floatX* dout, const floatX* attn_input, const LayerWeightsOf<floatX>& w,
                                        const LayerWeightsOf<gradX>& g, const LayerActivations<floatX>& la) {
    const ModelConfig& c = model->config;
    const int B = model->B, T = model->T, C = c.channels, NH = c.num_heads, BT = B * T;
    const float dweight_scale = projection_grad_scale(model);
    LAYER(matmul_backward, a.datty, g.o_proj, dout, la.atty, w.o_proj, BT, C, C, 0.0f, dweight_scale);   // datty written
    // the gradient of the attention's input: qkv's, or with QKV-Norm qkv_normed's (QKV-Norm's backward follows)
    floatX* dqkv_attention = la.qkv_normed ? a.dqkv_normed : a.dqkv;
    // the attention's backward, then RoPE's: the fused attention does both (as in the forward)
#ifdef MIXLN_CUDA
    if (model->on_gpu && model->fused_attention) {
        bool inside = model->rope_in_attention;
        attention_backward_fused(dqkv_attention, a.datt_scratch, a.datty, attention_qkv(la), la.atty, la.lse,
                                 inside ? a.rope_cos : nullptr, inside ? a.rope_sin : nullptr, B, T, NH, C / NH,
                                 model->stream);
        if (!inside) LAYER(rope_backward, dqkv_attention, a.rope_cos, a.rope_sin, B, T, NH, C / NH);
    } else
#endif
    {
        LAYER(attention_backward, dqkv_attention, a.datt_scratch, a.datty, attention_qkv(la), la.att, B, T, NH, C / NH);
        LAYER(rope_backward, dqkv_attention, a.rope_cos, a.rope_sin, B, T, NH, C / NH);
    }
    if (la.qkv_normed) qkv_norm_backward(model, a, la, w, g);   // hybrid, preqkv: through QKV-Norm into a.dqkv
    LAYER(matmul_backward, dinp, g.qkv_proj, a.dqkv, attn_input, w.qkv_proj, BT, C, 3 * C, dinp_scale, dweight_scale);
}

// The MLP sublayer's backward: dout (B, T, C) is the gradient of down_proj's output; the gradient
// of mlp_input (B, T, C) goes into dinp = dinp_scale * dinp + that gradient (dinp may be dout, as
// above).
template <typename floatX, typename gradX>
inline void mlp_sublayer_backward(Model* model, const ActivationTensorsOf<floatX>& a, floatX* dinp, float dinp_scale,
                                  const floatX* dout, const floatX* mlp_input, const LayerWeightsOf<floatX>& w,
                                  const LayerWeightsOf<gradX>& g, const LayerActivations<floatX>& la) {
    const ModelConfig& c = model->config;
    const int BT = model->B * model->T, C = c.channels, F = c.ffn_channels;
    const float dweight_scale = projection_grad_scale(model);
    LAYER(matmul_backward, a.dswiglu, g.down_proj, dout, la.swiglu, w.down_proj, BT, F, C, 0.0f, dweight_scale);   // written
    LAYER(swiglu_backward, a.dgate_up, a.dswiglu, la.gate_up, BT, F);   // writes dgate_up
    LAYER(matmul_backward, dinp, g.gate_up_proj, a.dgate_up, mlp_input, w.gate_up_proj, BT, C, 2 * F, dinp_scale,
          dweight_scale);
}

// The backward pass in one set of storage types (model_backward below picks them).
// floatX: the storage type of the activations and of the weights the kernels read; gradX: of the
// weight gradients (model_backward below picks them).
// logits_hold_gradient: the forward pass already turned the logits into their gradient
// (model_forward_backward), so the cross-entropy's backward is done
template <typename floatX, typename gradX>
inline void model_backward_typed(Model* model, float loss_scale, bool logits_hold_gradient) {
    const ModelConfig& c = model->config;
    const int B = model->B, T = model->T, C = c.channels, V = c.vocab_size, BT = B * T;
    const ParameterTensorsOf<floatX> p = model_weights<floatX>(model);
    const ParameterTensorsOf<gradX> g = model_grads<gradX>(model);
    const ActivationTensorsOf<floatX> a = model_activations<floatX>(model);
    const size_t stream_size = (size_t)BT * C;

    // loss = mean over the positions with a target, so each one's loss has gradient
    // loss_scale / target_count; the logits turn into their gradient in place
    floatX* dlogits = a.logits;
    if (!logits_hold_gradient)
        LAYER(crossentropy_backward, dlogits, a.logits, a.logit_stats, model->targets,
              (real)model_position_dloss(model, loss_scale), BT, V);
    const floatX* last_output = layer_output(layer_activations(a, c, B, T, c.num_layers - 1), c, c.num_layers - 1);
    LAYER(matmul_backward, a.dnorm, g.lm_head, dlogits, a.final_norm, p.lm_head, BT, C, V, 0.0f,
          projection_grad_scale(model));   // dnorm written
    norm_backward(model, a.dresidual, g.final_norm, g.final_norm_bias, a.dnorm, last_output, p.final_norm,
                  a.final_norm_stats, false);   // dresidual written

    // a.dresidual holds the gradient of layer l's output; each layer turns it into the
    // gradient of its input
    for (int l = c.num_layers - 1; l >= 0; l--) {
        const NormKind kind = c.norm_layers[l];
        const bool peri = kind == NORM_PERI;
        const float output_scale = norm_output_scale(c, l), stream_scale = residual_scale(c, l);
        LayerWeightsOf<floatX> w = layer_weights(p, c, l);
        LayerWeightsOf<gradX> gw = layer_weights(g, c, l);
        LayerActivations<floatX> la = layer_activations(a, c, B, T, l);
        const floatX* layer_input = l == 0 ? a.embedded : layer_output(layer_activations(a, c, B, T, l - 1), c, l - 1);
        if (norm_after_residual(kind)) {
            // y = N2(s2), s2 = a*h + mlp(h): dnorm = d(s2) (written), then d(h) = a*d(s2) + the MLP
            // path, in place: the MLP's last product adds its input gradient to a * dnorm (one rounding)
            norm_backward(model, a.dnorm, gw.mlp_norm, gw.mlp_norm_bias, a.dresidual, la.mlp_resid, w.mlp_norm,
                          la.mlp_norm_stats, false);
            mlp_sublayer_backward(model, a, a.dnorm, stream_scale, a.dnorm, la.attn_norm, w, gw, la);
            // h = N1(s1), s1 = a*x + attn(x): likewise, dresidual = d(s1) (written) -> d(x)
            norm_backward(model, a.dresidual, gw.attn_norm, gw.attn_norm_bias, a.dnorm, la.attn_resid, w.attn_norm,
                          la.attn_norm_stats, false);
            attention_sublayer_backward(model, a, a.dresidual, stream_scale, a.dresidual, layer_input, w, gw, la);
        } else if (kind == NORM_HYBRID) {
            // y = N2(s2), s2 = h + mlp(h): dnorm = d(s2) (written), then d(h) = d(s2) + the MLP
            // path, in place, as for post
            norm_backward(model, a.dnorm, gw.mlp_norm, gw.mlp_norm_bias, a.dresidual, la.mlp_resid, w.mlp_norm,
                          la.mlp_norm_stats, false);
            mlp_sublayer_backward(model, a, a.dnorm, 1.0f, a.dnorm, la.attn_resid, w, gw, la);
            // h = x + attn(x), QKV-Norm inside: d(x) = d(h) + the attention path, in place, and
            // into dresidual for the layer below
            attention_sublayer_backward(model, a, a.dnorm, 1.0f, a.dnorm, layer_input, w, gw, la);
            LAYER(cast_copy, a.dresidual, (const floatX*)a.dnorm, stream_size);
        } else {
            // y = h + N2o(m), m = mlp(s * N2(h)): the skip passes dresidual through; the branch
            // (N2o's backward for peri, the MLP, the scale s for lns, N2) adds onto it -> d(h)
            const floatX* dmlp_out = a.dresidual;   // gradient of down_proj's output
            if (peri) {
                norm_backward(model, a.dbranch, gw.mlp_out_norm, gw.mlp_out_norm_bias, a.dresidual, la.mlp_branch,
                              w.mlp_out_norm, la.mlp_out_norm_stats, false);   // dbranch written
                dmlp_out = a.dbranch;
            }
            mlp_sublayer_backward(model, a, a.dnorm, 0.0f, dmlp_out, la.mlp_norm, w, gw, la);   // dnorm written
            if (output_scale != 1.0f) LAYER(scale_forward, a.dnorm, a.dnorm, output_scale, stream_size);
            norm_backward(model, a.dresidual, gw.mlp_norm, gw.mlp_norm_bias, a.dnorm, la.attn_resid, w.mlp_norm,
                          la.mlp_norm_stats, true);   // added onto the skip's gradient
            // h = x + N1o(o), o = attn(s * N1(x)): likewise -> d(x)
            const floatX* dattn_out = a.dresidual;   // gradient of o_proj's output
            if (peri) {
                norm_backward(model, a.dbranch, gw.attn_out_norm, gw.attn_out_norm_bias, a.dresidual, la.attn_branch,
                              w.attn_out_norm, la.attn_out_norm_stats, false);   // dbranch written
                dattn_out = a.dbranch;
            }
            attention_sublayer_backward(model, a, a.dnorm, 0.0f, dattn_out, la.attn_norm, w, gw, la);   // written
            if (output_scale != 1.0f) LAYER(scale_forward, a.dnorm, a.dnorm, output_scale, stream_size);
            norm_backward(model, a.dresidual, gw.attn_norm, gw.attn_norm_bias, a.dnorm, layer_input, w.attn_norm,
                          la.attn_norm_stats, true);
        }
    }
    LAYER(embedding_backward, g.embed_tokens, a.dresidual, model->inputs, model->token_positions,
          model->token_group_starts, model->token_groups, C);
    // the losses of model_forward_backward's forward pass, now that both passes are queued
    if (logits_hold_gradient) model_read_loss(model, a.losses);
}

// model_backward, from logits that hold their gradient already (model_forward_backward) or not
inline void model_backward_with(Model* model, float loss_scale, bool logits_hold_gradient) {
    if (!model->backward_ready) fail("model_backward needs a forward pass with targets (and no skipped layer) first");
    // for the embedding's backward: the forward pass's positions grouped by token
    const int BT = model->B * model->T;
    model_wait_queued_copies(model, STAGED_TOKEN_GROUPS);
    model->token_groups = group_positions_by_token(model->host_token_positions, model->host_token_group_starts,
                                                   model->host_token_counts, model->host_inputs, BT,
                                                   model->config.vocab_size);
    model_copy_in_queued(model, model->token_positions, model->host_token_positions, (size_t)BT * sizeof(int));
    model_copy_in_queued(model, model->token_group_starts, model->host_token_group_starts,
                         ((size_t)model->token_groups + 1) * sizeof(int));
    model_queued_copies_done(model, STAGED_TOKEN_GROUPS);
#ifdef MIXLN_HAS_BF16
    if (model->precision == PRECISION_BF16) model_backward_typed<bf16, float>(model, loss_scale, logits_hold_gradient);
    if (model->precision == PRECISION_BF16_PURE)
        model_backward_typed<bf16, bf16>(model, loss_scale, logits_hold_gradient);
#endif
    if (model->precision == PRECISION_FP32) model_backward_typed<real, real>(model, loss_scale, logits_hold_gradient);
    model->backward_ready = false;   // the logits now hold their gradient: backward cannot run twice
    model->projection_grads_pending = false;   // written by this pass: the next one accumulates
}

// Accumulates loss_scale times the gradient of the mean loss of the last forward pass (which
// must have had targets) into the model's gradients. Call model_zero_grad first unless
// accumulating: with K micro-batches per step, each one's backward with loss_scale 1/K sums to
// the gradient of the mean loss over all K*B*T positions. (After model_zero_grad the first
// backward writes the projections' gradients rather than adding: the same values.)
inline void model_backward(Model* model, float loss_scale = 1.0f) { model_backward_with(model, loss_scale, false); }

// One training micro-step, model_forward with targets and then model_backward(loss_scale), with
// the loss's gradient written over the logits by the cross-entropy in the forward pass: one pass
// over the (B, T, V) logits fewer. The same results as the two calls, to the bit. On the GPU the
// host waits for the losses only once both passes are queued: the embedding backward's token
// grouping runs on the host while the forward pass runs.
inline void model_forward_backward(Model* model, const int* inputs, const int* targets, float loss_scale = 1.0f) {
    if (targets == nullptr) fail("model_forward_backward needs targets");
    model_forward_with(model, inputs, targets, true, loss_scale);
    model_backward_with(model, loss_scale, true);
}

// ----------------------------------------------------------------------------
// update

// The squared L2 norm of n gradient values at grads (model memory): summed in float on the GPU
// (global_norm.cuh), in double on the CPU.
template <typename gradX>
inline double grads_norm_squared(const Model* model, const gradX* grads, size_t n) {
#ifdef MIXLN_CUDA
    if (model->on_gpu) {
        global_norm_squared(model->norm_squared, model->norm_partials, grads, n, model->stream);
        float norm_squared = 0.0f;
        model_copy_out(model, &norm_squared, model->norm_squared, sizeof(float));
        return (double)norm_squared;
    }
#endif
    (void)model;
    double norm = global_norm_cpu(grads, n);
    return norm * norm;
}

// L2 norm of all gradients together.
inline double model_grad_norm(const Model* model) {
    model_settle_grads(model);
#ifdef MIXLN_HAS_BF16
    if (model->precision == PRECISION_BF16_PURE) {
        return sqrt(grads_norm_squared(model, (const bf16*)model->grads_memory, model->num_parameters));
    }
#endif
    if (!model->on_gpu) return global_norm_cpu((const real*)model->grads_memory, model->num_parameters);
    return sqrt(grads_norm_squared(model, (const real*)model->grads_memory, model->num_parameters));
}

// L2 norm of the gradient of each decoder layer's parameters taken together (its norms, QKV-Norm's
// in a hybrid or preqkv layer, and six projections), the paper's per-layer gradient diagnostic. (L) values.
template <typename gradX>
inline std::vector<double> model_layer_grad_norms_typed(const Model* model) {
    model_settle_grads(model);
    const ModelConfig& c = model->config;
    size_t C = c.channels, F = c.ffn_channels;
    const ParameterTensorsOf<gradX> grads = model_grads<gradX>(model);
    std::vector<double> norms;
    for (int l = 0; l < c.num_layers; l++) {
        LayerWeightsOf<gradX> g = layer_weights(grads, c, l);
        const gradX* slices[14] = {g.attn_norm,    g.attn_norm_bias, g.attn_out_norm,    g.attn_out_norm_bias,
                                   g.qkv_proj,     g.o_proj,         g.mlp_norm,         g.mlp_norm_bias,
                                   g.mlp_out_norm, g.mlp_out_norm_bias, g.gate_up_proj,  g.down_proj,
                                   g.qkv_norm,     g.qkv_norm_bias};
        size_t sizes[14] = {C, C, C, C, 3 * C * C, C * C, C, C, C, C, 2 * F * C, C * F, 3 * C, 3 * C};
        double sum_squares = 0.0;
        for (int i = 0; i < 14; i++) {
            if (slices[i] == nullptr) continue;   // a norm or bias this layer does not have
            sum_squares += grads_norm_squared(model, slices[i], sizes[i]);
        }
        norms.push_back(sqrt(sum_squares));
    }
    return norms;
}

inline std::vector<double> model_layer_grad_norms(const Model* model) {
#ifdef MIXLN_HAS_BF16
    if (model->precision == PRECISION_BF16_PURE) return model_layer_grad_norms_typed<bf16>(model);
#endif
    return model_layer_grad_norms_typed<real>(model);
}

// The factor clipping multiplies the gradients by: clip / (norm + 1e-6) when the norm exceeds
// clip (torch.nn.utils.clip_grad_norm_'s rule), else 1. clip <= 0 turns clipping off.
inline float grad_clip_scale(double grad_norm, float clip) {
    if (clip <= 0.0f) return 1.0f;
    double scale = clip / (grad_norm + 1e-6);
    return scale < 1.0 ? (float)scale : 1.0f;
}

// bf16: the kernels read a bf16 copy of the fp32 weights; this makes it anew whenever the weights
// are filled from the host (the update writes it as it goes). A no-op in the other precisions.
inline void model_refresh_weights_copy(Model* model) {
#ifdef MIXLN_HAS_BF16
    if (model->precision == PRECISION_BF16) {
        LAYER(cast_copy, (bf16*)model->weights_copy, (const float*)model->params_memory, model->num_parameters);
    }
#else
    (void)model;
#endif
}

// One AdamW step over every parameter with the gradients multiplied by grad_scale: on the fp32
// weights and moments (under bf16 writing the bf16 copy the kernels read in the same pass), or on
// bf16 weights and moments under bf16-pure, computed in fp32 and rounded once per stored value
// (model->rounding: to nearest, or stochastically). Weight decay applies as
// model->weight_decay_scope says: with DECAY_MATRICES one update per run of matrices or of norm
// tensors in the flat buffer (the norms' with weight decay 0), which is the same arithmetic
// element by element, the stochastic rounding's bits included (first_index).
inline void model_update(Model* model, float lr, float beta1, float beta2, float eps,
                         float weight_decay, float grad_scale) {
    model_settle_grads(model);
    model->adam_step += 1;
    // elements [first, first + n) of the four buffers, with their weight decay
    auto update = [&](size_t first, size_t n, float decay) {
#ifdef MIXLN_HAS_BF16
        if (model->precision == PRECISION_BF16_PURE) {
            LAYER(adamw_update, (bf16*)model->params_memory + first, (bf16*)model->adam_m + first,
                  (bf16*)model->adam_v + first, NO_PARAMS_COPY, (const bf16*)model->grads_memory + first, n, lr, beta1,
                  beta2, eps, decay, model->adam_step, grad_scale, model->rounding, model->rounding_seed, first);
            return;
        }
        if (model->precision == PRECISION_BF16) {
            LAYER(adamw_update, (real*)model->params_memory + first, (real*)model->adam_m + first,
                  (real*)model->adam_v + first, (bf16*)model->weights_copy + first,
                  (const real*)model->grads_memory + first, n, lr, beta1, beta2, eps, decay, model->adam_step,
                  grad_scale, model->rounding, model->rounding_seed, first);
            return;
        }
#endif
        LAYER(adamw_update, (real*)model->params_memory + first, (real*)model->adam_m + first,
              (real*)model->adam_v + first, NO_PARAMS_COPY, (const real*)model->grads_memory + first, n, lr, beta1,
              beta2, eps, decay, model->adam_step, grad_scale, model->rounding, model->rounding_seed, first);
    };
    if (weight_decay == 0.0f || model->weight_decay_scope == DECAY_ALL) {
        update(0, model->num_parameters, weight_decay);
        return;
    }
    // runs of neighbouring tensors of one kind, in buffer order
    size_t sizes[NUM_PARAMETER_TENSORS];
    parameter_sizes(sizes, model->config);
    size_t run_start = 0, offset = 0;
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
        offset += sizes[i];
        bool run_ends = i + 1 == NUM_PARAMETER_TENSORS || parameter_tensor_is_matrix(i + 1) != parameter_tensor_is_matrix(i);
        if (run_ends && offset > run_start) {
            update(run_start, offset - run_start, parameter_tensor_is_matrix(i) ? weight_decay : 0.0f);
            run_start = offset;
        }
    }
}

// The learning-rate schedules (train's --lr-schedule). Every one starts with a linear warmup from 0
// over `warmup` steps (so with warmup > 0 step 0 has lr 0), then:
//   cosine    the paper's (GaLore's): cosine from lr_max down to lr_max * min_lr_ratio
//   linear    a straight line from lr_max down to lr_max * min_lr_ratio
//   constant  lr_max to the end (min_lr_ratio unused)
//   wsd       warmup-stable-decay: lr_max until the last decay_steps steps, then a straight line
//             down to lr_max * min_lr_ratio
//   wsd-sqrt  as wsd, its decay 1 - sqrt(progress) of the way down (Hagele et al., 2024: a
//             cooldown that leaves the peak faster and lands more gently)
// The decays reach lr_max * min_lr_ratio at step total_steps, one after the last step (GaLore's
// convention), so the last step's lr is a little above it. step counts from 0.
enum LrSchedule { LR_COSINE, LR_LINEAR, LR_CONSTANT, LR_WSD, LR_WSD_SQRT };

inline float learning_rate(int step, float lr_max, int warmup, int total_steps, float min_lr_ratio,
                           LrSchedule schedule = LR_COSINE, int decay_steps = 0) {
    bool is_wsd = schedule == LR_WSD || schedule == LR_WSD_SQRT;
    double f;
    if (step < warmup) {
        // warmup: s / W
        f = (double)step / (warmup > 1 ? warmup : 1);
    } else if (schedule == LR_CONSTANT || (is_wsd && step < total_steps - decay_steps)) {
        // constant, or wsd's stable phase
        f = 1.0;
    } else {
        // the decay starts after the warmup, or (wsd) decay_steps before the end
        int decay_start = is_wsd && total_steps - decay_steps > warmup ? total_steps - decay_steps : warmup;
        int decay_length = total_steps - decay_start;
        // progress through the decay, 0 at its start and 1 at step total_steps
        double progress = (double)(step - decay_start) / (decay_length > 1 ? decay_length : 1);
        double remaining = schedule == LR_COSINE     ? 0.5 * (1.0 + cos(M_PI * progress))
                           : schedule == LR_WSD_SQRT ? 1.0 - sqrt(progress)
                                                     : 1.0 - progress;
        f = min_lr_ratio + (1.0 - min_lr_ratio) * remaining;
    }
    return (float)(lr_max * f);
}
