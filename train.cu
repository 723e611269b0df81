/*
The training program: parse flags, build the model, then loop
    next batch (dataloader.h) -> forward -> backward (model.h) -> clip -> AdamW step -> log
with validation, checkpoints and evaluation around it. Each step's pieces live in model.h and
layers/; this file only wires them together and talks to the user.

The CPU backend runs everywhere; the CUDA backend in nvcc builds, and in the build under the CPU
emulation of CUDA (build/train_emu, which the CLI tests run for the bf16 precisions). --device
auto takes the GPU where one is usable (present, and the build has kernels for its architecture),
except in the emulation build, where the "GPU" is a test vehicle that only --device cuda runs.
*/
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <csignal>
#include <cstring>
#include <algorithm>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __CUDACC__
#include <cuda_runtime.h>
#endif

#include "analysis.h"
#include "checkpoint.h"
#include "common.h"
#include "dataloader.h"
#include "model.h"

// ----------------------------------------------------------------------------
// command line

struct Preset {
    const char* name;
    int layers, dim, heads, ffn, vocab, seq_len;
    const char* note;
};

// The paper's configurations (vocab 32000 for the T5 tokenizer, sequence length 256), and a
// tiny one for tests and quick runs.
static const Preset PRESETS[] = {
    {"tiny", 4, 64, 4, 172, 512, 64, "tests and quick runs"},
    {"llama-71m", 12, 512, 8, 1368, 32000, 256, "paper: 3 of 12 layers Post-LN"},
    {"llama-130m", 12, 768, 12, 2048, 32000, 256, "paper: 3 of 12 layers Post-LN"},
    {"llama-250m", 24, 768, 16, 2560, 32000, 256, "paper: 6 of 24 layers Post-LN"},
    {"llama-1b", 24, 2048, 32, 5461, 32000, 256, "paper: 6 of 24 layers Post-LN"},
    {"llama-7b", 32, 4096, 32, 11008, 32000, 256, "paper: 2 of 32 layers Post-LN (--alpha 0.0625)"},
};

struct Args {
    std::string preset = "tiny";
    int layers = 0, dim = 0, heads = 0, ffn = 0, vocab = 0, seq_len = 0;   // 0: from the preset
    std::string norm = "mix";      // a kind (pre, post, peri, ...): the same in every layer; or mix (Mix-LN), hybridstar
    float alpha = 0.25f;
    std::string norm_layers;       // one kind per layer, comma-separated (instead of --norm)
    bool lns = false;              // LayerNorm Scaling in every pre layer
    std::string norm_type = "rmsnorm";
    bool scaled_init = false;      // o_proj and down_proj std 0.02/sqrt(2L) in the branch-norm layers
    bool alpha_given = false, norm_given = false, preset_given = false, norm_type_given = false,
         embed_std_given = false, scaled_embed = false;
    std::string train_data, val_data;
    std::string data_order = "sequential";   // sequential | shuffled (dataloader.h)
    int data_seed = 1;                       // shuffled: the order's seed, apart from --seed
    int pad_id = -1;           // >= 0: the data holds one document per row, padded with this token
    int val_batches = 0;       // 0: every whole window of the validation data
    std::string val_mean = "tokens";   // tokens: every target counts alike; batches: the mean of batch means
    int val_every = 0;         // 0: validate only at the end
    int batch = 8;
    int grad_accum = 1;        // micro-batches per optimizer step
    int steps = 100;
    float lr = 1e-3f;
    int warmup = 0;
    float min_lr_ratio = 0.1f;
    std::string lr_schedule = "cosine";   // cosine | linear | constant | wsd | wsd-sqrt (model.h: learning_rate)
    float decay_frac = 0.2f;              // wsd: the share of the steps spent decaying
    float weight_decay = 0.0f;
    std::string weight_decay_on = "matrices";   // matrices | all (model.h: WeightDecayScope)
    float beta1 = 0.9f, beta2 = 0.999f;   // AdamW's moment decays (the paper's; HybridNorm used 0.9/0.95)
    float adam_eps = 1e-8f;
    float grad_clip = 0.0f;
    int seed = 1337;               // the weights' initialisation; with --rounding stochastic also its random bits
    float embed_std = 0.02f;
    std::string device = "auto";
    std::string attention = "auto";     // auto (fused on the GPU) | simple | fused
    std::string rope = "auto";          // auto (inside the tensor-core attention where it runs) | separate
    std::string precision = "fp32";
    std::string rounding = "nearest";   // nearest | stochastic (bf16-pure's AdamW stores)
    std::string init_from, out;
    bool eval_only = false;
    bool analyze = false;
    int sample = 0;                // tokens to generate (0: no sampling)
    std::string prompt_ids;        // comma-separated token ids to start from
    float temperature = 1.0f;
    int top_k = 0;                 // 0: the whole vocabulary
    int stop_id = -1;              // >= 0: generation ends once it samples this token (an end of text)
    int checkpoint_every = 0;  // 0: a checkpoint at the end only
    int keep_every = 0;        // 0: no snapshots kept along the way
    std::string keep_what = "full";   // full | weights: what a --keep-every snapshot holds
    int layer_grads_every = 0; // 0: no per-layer gradient norms in the log
    int stop_at = 0;           // 0: run all steps
    std::string resume;
    std::vector<std::string> given;   // the flags that were on the command line
    // --resume: the schedule's flags given anew, with the saved run's values (check_schedule_change)
    std::vector<std::pair<std::string, std::string>> saved_schedule;
};

static void print_help() {
    Args d;
    printf("usage: ./train [flags]\n\n");
    printf("Trains a LLaMA-style decoder with Mix-LN: Post-LN in the first floor(alpha*L) layers, Pre-LN after.\n\n");
    printf("model (a preset, then any of the sizes to override it):\n");
    printf("  --model PRESET         %s (default %s); presets:\n", "model configuration", d.preset.c_str());
    for (const Preset& p : PRESETS) {
        printf("                           %-11s L=%d C=%d heads=%d F=%d V=%d T=%d  (%s)\n", p.name, p.layers, p.dim,
               p.heads, p.ffn, p.vocab, p.seq_len, p.note);
    }
    printf("  --layers L             decoder layers (default: preset)\n");
    printf("  --dim C                hidden size (default: preset)\n");
    printf("  --heads H              attention heads, must divide C (default: preset)\n");
    printf("  --ffn F                SwiGLU intermediate size (default: preset)\n");
    printf("  --vocab V              vocabulary size; every token id must be below it (default: preset)\n");
    printf("  --seq-len T            sequence length (default: preset)\n");
    printf("norm placement (per layer: pre, post, peri = Sandwich/Peri-LN, deepnorm, lns = Pre-LN with LayerNorm Scaling,\n"
           "                hybrid = HybridNorm: norms on q, k and v, Post-LN around the MLP, preqkv = pre with norms on q, k, v):\n");
    printf("  --norm KIND|mix        the same kind in every layer, or mix: Mix-LN (default %s), or hybridstar:\n"
           "                         HybridNorm* (preqkv, then hybrid)\n", d.norm.c_str());
    printf("  --alpha A              with --norm mix: floor(A*L) leading Post-LN layers, the rest Pre-LN, A in [0, 1] (default %g)\n", d.alpha);
    printf("  --norm-layers LIST     one kind per layer, e.g. post,post,pre,peri (instead of --norm)\n");
    printf("  --lns                  LayerNorm Scaling in every pre layer: each norm's output times 1/sqrt(l+1)\n");
    printf("  --norm-type T          rmsnorm (the paper's) or layernorm (with bias) (default %s)\n", d.norm_type.c_str());
    printf("initialisation (linear weights normal(0, 0.02); deepnorm layers get DeepNet's init):\n");
    printf("  --embed-std S          std of the embedding init (default %g)\n", d.embed_std);
    printf("  --scaled-embed         embedding std sqrt(2/5) = 0.632, as the paper's code once used\n");
    printf("  --scaled-init          o_proj and down_proj std 0.02/sqrt(2L) in pre, lns, peri and preqkv layers\n");
    printf("data:\n");
    printf("  --train-data PATTERN   llm.c token shards (glob), in sorted name order\n");
    printf("  --data-order O         sequential: the training batches in the shards' order, every pass alike;\n"
           "                         shuffled: every pass in an order of its own, drawn from --data-seed (default %s)\n",
           d.data_order.c_str());
    printf("  --data-seed S          with shuffled: the seed of the order, apart from --seed (default %d)\n", d.data_seed);
    printf("  --pad-id P             the data holds one document per row of T tokens, padded with token P (shards\n"
           "                         from prepare.py --rows T): no target after a row's end (default off: a stream)\n");
    printf("  --val-data PATTERN     validation shards (default: none)\n");
    printf("  --val-batches K        validate on the first K batches (default 0: every whole window)\n");
    printf("  --val-every N          also validate every N steps (default 0: only at the end)\n");
    printf("  --val-mean tokens|batches  the validation loss: the mean over every target (tokens), or the mean of\n"
           "                         each batch's mean (batches), as the paper's code reports it; the two differ only\n"
           "                         where batches hold different numbers of targets (--pad-id) (default tokens)\n");
    printf("optimisation (AdamW; a linear warmup, then the schedule):\n");
    printf("  --batch B              sequences per micro-batch (default %d)\n", d.batch);
    printf("  --grad-accum K         micro-batches per optimizer step: a global batch of K*B sequences (default %d)\n", d.grad_accum);
    printf("  --steps N              optimizer steps (default %d)\n", d.steps);
    printf("  --lr LR                peak learning rate (default %g)\n", d.lr);
    printf("  --warmup W             linear warmup steps (default %d)\n", d.warmup);
    printf("  --min-lr-ratio R       final lr as a fraction of the peak (default %g)\n", d.min_lr_ratio);
    printf("  --lr-schedule S        after the warmup: cosine|linear|constant|wsd|wsd-sqrt (default %s); cosine (the\n"
           "                         paper's) and linear fall to lr*min-lr-ratio at the end, wsd holds lr and then falls\n"
           "                         linearly over the last --decay-frac of the steps, wsd-sqrt as 1 - sqrt(progress)\n",
           d.lr_schedule.c_str());
    printf("  --decay-frac F         with wsd or wsd-sqrt: the share of --steps spent decaying, in (0, 1] (default %g)\n",
           d.decay_frac);
    printf("  --weight-decay WD      decoupled weight decay (default %g)\n", d.weight_decay);
    printf("  --weight-decay-on S    what the weight decay shrinks (default %s): matrices, the embedding, linear\n"
           "                         layers and head, not the norms' weights and biases; all: every parameter, as\n"
           "                         the Mix-LN code's AdamW does\n", d.weight_decay_on.c_str());
    printf("  --beta1 B1             AdamW's first-moment decay, in [0, 1) (default %g)\n", d.beta1);
    printf("  --beta2 B2             AdamW's second-moment decay, in [0, 1) (default %g)\n", d.beta2);
    printf("  --adam-eps E           AdamW's epsilon, added to sqrt of the second moment, positive (default %g)\n", d.adam_eps);
    printf("  --grad-clip G          clip the global gradient norm to G, 0 = off (default %g)\n", d.grad_clip);
    printf("  --seed S               initialisation seed (default %d)\n", d.seed);
    printf("run:\n");
    printf("  --device auto|cpu|cuda where to run (default %s; auto: the GPU where one is usable, else the CPU;\n"
           "                         on --resume, auto continues on the device the run trained on)\n", d.device.c_str());
    printf("  --attention auto|simple|fused  on the GPU: the fused flash-style kernels (on the tensor cores in\n"
           "                         bf16 when the head size is a multiple of 16), or the simple ones, which store\n"
           "                         the (T, T) probabilities; auto: fused on the GPU, the CPU's own on the CPU\n"
           "                         (default %s)\n", d.attention.c_str());
    printf("  --rope auto|separate   auto: the tensor-core attention applies RoPE as it loads q and k; separate:\n"
           "                         RoPE's own kernels before and after every attention. The same results to the\n"
           "                         bit, at different speeds (default %s)\n", d.rope.c_str());
    printf("  --precision fp32|bf16|bf16-pure  number format (default %s). bf16: bf16 activations and weight copy,\n"
           "                         fp32 master weights, gradients and AdamW state; bf16-pure: all bf16, as the paper\n"
           "                         trained. GPU only; every kernel computes in fp32 (model.h: Precision)\n", d.precision.c_str());
    printf("  --rounding nearest|stochastic  with bf16-pure: how AdamW rounds the bf16 weights and moments it stores;\n"
           "                         stochastic keeps updates below half a bf16 step on average (default %s)\n",
           d.rounding.c_str());
    printf("  --init-from DIR        start from a checkpoint's weights (its config.json sets the model)\n");
    printf("  --out DIR              write DIR/log.jsonl while training and the checkpoint at the end\n");
    printf("  --layer-grads-every N  log each layer's gradient norm every N steps (default 0: off)\n");
    printf("  --checkpoint-every N   also write the checkpoint and training state every N steps (default 0: at the end)\n");
    printf("  --keep-every N         also keep a snapshot every N steps in OUT/step_NNNNNN: the checkpoint, training\n"
           "                         state and log so far, to evaluate, analyze or branch from later (default 0: off)\n");
    printf("  --keep-what full|weights  what a snapshot holds (default %s): full, 16 bytes a parameter, resumes and\n"
           "                         branches; weights, the checkpoint and log in 4 bytes a parameter, evaluates,\n"
           "                         analyzes, samples and starts runs (--init-from) but cannot be resumed\n", d.keep_what.c_str());
    printf("  --stop-at S            end the run after step S with a checkpoint, as a time-limited job would (default 0: off)\n");
    printf("  --resume DIR           continue the run saved in DIR bit for bit (its settings; --out defaults to DIR).\n"
           "                         --steps, --lr-schedule, --decay-frac and --min-lr-ratio may change where the steps\n"
           "                         taken keep their lr: a wsd run's stable phase, branched with --out BRANCH --steps N\n");
    printf("                         (SIGINT or SIGTERM during a run with --out: the checkpoint after the step under\n");
    printf("                         way, then exit status 128 + the signal's number; --resume continues from there)\n");
    printf("  --eval-only            evaluate on --val-data and print {\"val_loss\": ..., \"tokens\": ...}\n");
    printf("  --analyze              on --val-data: angular distances between layers, the loss with each layer\n");
    printf("                         dropped and the hidden states' RMS at every layer boundary, written to\n");
    printf("                         analysis.json in --out (default: the --init-from directory)\n");
    printf("  --sample N             generate N tokens from the model (--init-from) and print their ids as JSON;\n");
    printf("                         dev/sample.py turns text into --prompt-ids and the ids back into text\n");
    printf("  --prompt-ids LIST      comma-separated token ids to continue (default: token 0)\n");
    printf("  --temperature X        sampling temperature (default %g)\n", d.temperature);
    printf("  --top-k K              sample among the K most likely tokens, 0 = all (default %d)\n", d.top_k);
    printf("  --stop-id ID           end the sample once it generates token ID, an end of text (default off)\n");
    printf("  --help                 this text\n");
}

static int parse_int(const char* flag, const char* text) {
    char* end = nullptr;
    errno = 0;
    long v = strtol(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0' || v < -2147483647L || v > 2147483647L) {
        fail("%s expects an integer, got '%s'", flag, text);
    }
    return (int)v;
}

// A model size or the sequence length: an integer of at least 1 (leaving the flag out is how to
// keep the preset's value, so 0 is not a way to ask for it)
static int parse_size(const char* flag, const char* text) {
    int v = parse_int(flag, text);
    if (v < 1) fail("%s must be at least 1, got %d", flag, v);
    return v;
}

static float parse_float(const char* flag, const char* text) {
    char* end = nullptr;
    errno = 0;
    float v = strtof(text, &end);
    if (errno != 0 || end == text || *end != '\0' || !std::isfinite(v)) fail("%s expects a number, got '%s'", flag, text);
    return v;
}

static Args parse_args(int argc, char** argv) {
    Args a;
    for (int i = 1; i < argc; i++) {
        std::string flag = argv[i];
        if (flag == "--help" || flag == "-h") {
            print_help();
            exit(0);
        }
        if (flag == "--eval-only") {
            a.eval_only = true;
            continue;
        }
        if (flag == "--analyze") {
            a.analyze = true;
            continue;
        }
        if (flag == "--lns" || flag == "--scaled-init" || flag == "--scaled-embed") {
            if (flag == "--lns") a.lns = true;
            if (flag == "--scaled-init") a.scaled_init = true;
            if (flag == "--scaled-embed") a.scaled_embed = true;
            a.given.push_back(flag);
            continue;
        }
        if (i + 1 >= argc) fail("%s needs a value (see --help)", flag.c_str());
        const char* v = argv[++i];
        const char* f = flag.c_str();
        a.given.push_back(flag);
        if (flag == "--model") { a.preset = v; a.preset_given = true; }
        else if (flag == "--layers") a.layers = parse_size(f, v);
        else if (flag == "--dim") a.dim = parse_size(f, v);
        else if (flag == "--heads") a.heads = parse_size(f, v);
        else if (flag == "--ffn") a.ffn = parse_size(f, v);
        else if (flag == "--vocab") a.vocab = parse_size(f, v);
        else if (flag == "--seq-len") a.seq_len = parse_size(f, v);
        else if (flag == "--norm") { a.norm = v; a.norm_given = true; }
        else if (flag == "--alpha") { a.alpha = parse_float(f, v); a.alpha_given = true; }
        else if (flag == "--norm-layers") a.norm_layers = v;
        else if (flag == "--norm-type") { a.norm_type = v; a.norm_type_given = true; }
        else if (flag == "--embed-std") { a.embed_std = parse_float(f, v); a.embed_std_given = true; }
        else if (flag == "--train-data") a.train_data = v;
        else if (flag == "--val-data") a.val_data = v;
        else if (flag == "--data-order") a.data_order = v;
        else if (flag == "--data-seed") a.data_seed = parse_int(f, v);
        else if (flag == "--pad-id") a.pad_id = parse_int(f, v);
        else if (flag == "--val-batches") a.val_batches = parse_int(f, v);
        else if (flag == "--val-every") a.val_every = parse_int(f, v);
        else if (flag == "--val-mean") a.val_mean = v;
        else if (flag == "--batch") a.batch = parse_int(f, v);
        else if (flag == "--grad-accum") a.grad_accum = parse_int(f, v);
        else if (flag == "--steps") a.steps = parse_int(f, v);
        else if (flag == "--lr") a.lr = parse_float(f, v);
        else if (flag == "--warmup") a.warmup = parse_int(f, v);
        else if (flag == "--min-lr-ratio") a.min_lr_ratio = parse_float(f, v);
        else if (flag == "--lr-schedule") a.lr_schedule = v;
        else if (flag == "--decay-frac") a.decay_frac = parse_float(f, v);
        else if (flag == "--weight-decay") a.weight_decay = parse_float(f, v);
        else if (flag == "--weight-decay-on") a.weight_decay_on = v;
        else if (flag == "--beta1") a.beta1 = parse_float(f, v);
        else if (flag == "--beta2") a.beta2 = parse_float(f, v);
        else if (flag == "--adam-eps") a.adam_eps = parse_float(f, v);
        else if (flag == "--grad-clip") a.grad_clip = parse_float(f, v);
        else if (flag == "--seed") a.seed = parse_int(f, v);
        else if (flag == "--device") a.device = v;
        else if (flag == "--precision") a.precision = v;
        else if (flag == "--rounding") a.rounding = v;
        else if (flag == "--attention") a.attention = v;
        else if (flag == "--rope") a.rope = v;
        else if (flag == "--init-from") a.init_from = v;
        else if (flag == "--out") a.out = v;
        else if (flag == "--checkpoint-every") a.checkpoint_every = parse_int(f, v);
        else if (flag == "--keep-every") a.keep_every = parse_int(f, v);
        else if (flag == "--keep-what") a.keep_what = v;
        else if (flag == "--sample") a.sample = parse_int(f, v);
        else if (flag == "--prompt-ids") a.prompt_ids = v;
        else if (flag == "--temperature") a.temperature = parse_float(f, v);
        else if (flag == "--top-k") a.top_k = parse_int(f, v);
        else if (flag == "--stop-id") a.stop_id = parse_int(f, v);
        else if (flag == "--layer-grads-every") a.layer_grads_every = parse_int(f, v);
        else if (flag == "--stop-at") a.stop_at = parse_int(f, v);
        else if (flag == "--resume") a.resume = v;
        else fail("unknown flag '%s' (see --help)", f);
    }
    // values that are wrong whatever the model
    if (a.norm != "pre" && a.norm != "post" && a.norm != "mix" && a.norm != "peri" && a.norm != "deepnorm" && a.norm != "lns" &&
        a.norm != "hybrid" && a.norm != "preqkv" && a.norm != "hybridstar") {
        fail("--norm must be pre, post, mix, peri, deepnorm, lns, hybrid, preqkv or hybridstar, got '%s'", a.norm.c_str());
    }
    if (!a.norm_layers.empty() && (a.norm_given || a.alpha_given)) fail("--norm-layers replaces --norm and --alpha: give one or the other");
    if (a.norm_layers.empty() && a.lns && a.norm != "pre" && a.norm != "mix") {
        fail("--lns scales the pre layers, but --norm %s has none", a.norm.c_str());
    }
    if (a.norm_type != "rmsnorm" && a.norm_type != "layernorm") fail("--norm-type must be rmsnorm or layernorm, got '%s'", a.norm_type.c_str());
    if (a.scaled_embed && a.embed_std_given) fail("--scaled-embed sets the embedding std: give it or --embed-std, not both");
    if (a.scaled_embed) a.embed_std = sqrtf(0.4f);
    if (a.alpha_given && a.norm != "mix") fail("--alpha applies to --norm mix only (got --norm %s)", a.norm.c_str());
    if (!(a.alpha >= 0.0f && a.alpha <= 1.0f)) fail("--alpha must be in [0, 1], got %g", a.alpha);
    if (a.data_order != "sequential" && a.data_order != "shuffled") {
        fail("--data-order must be sequential or shuffled, got '%s'", a.data_order.c_str());
    }
    if (a.data_seed < 0) fail("--data-seed must be at least 0, got %d", a.data_seed);
    bool pad_id_given = std::find(a.given.begin(), a.given.end(), "--pad-id") != a.given.end();
    if (pad_id_given && a.pad_id < 0) fail("--pad-id must be a token id (at least 0), got %d", a.pad_id);
    if (a.batch < 1) fail("--batch must be at least 1, got %d", a.batch);
    if (a.grad_accum < 1) fail("--grad-accum must be at least 1, got %d", a.grad_accum);
    if (a.steps < 0) fail("--steps must be at least 0, got %d", a.steps);
    if (a.warmup < 0) fail("--warmup must be at least 0, got %d", a.warmup);
    if (a.val_batches < 0 || a.val_every < 0) fail("--val-batches and --val-every must be at least 0");
    if (a.val_mean != "tokens" && a.val_mean != "batches") fail("--val-mean must be tokens or batches, got '%s'", a.val_mean.c_str());
    if (a.checkpoint_every < 0 || a.stop_at < 0) fail("--checkpoint-every and --stop-at must be at least 0");
    if (a.keep_every < 0) fail("--keep-every must be at least 0, got %d", a.keep_every);
    if (a.keep_what != "full" && a.keep_what != "weights") fail("--keep-what must be full or weights, got '%s'", a.keep_what.c_str());
    if (a.layer_grads_every < 0) fail("--layer-grads-every must be at least 0");
    if (a.sample < 0 || a.top_k < 0) fail("--sample and --top-k must be at least 0");
    bool stop_id_given = std::find(a.given.begin(), a.given.end(), "--stop-id") != a.given.end();
    if (stop_id_given && a.stop_id < 0) fail("--stop-id must be a token id (at least 0), got %d", a.stop_id);
    if (stop_id_given && a.sample == 0) fail("--stop-id ends a sample: it needs --sample N");
    if (!(a.temperature > 0.0f)) fail("--temperature must be positive, got %g", a.temperature);
    if (!a.resume.empty() && !a.init_from.empty()) fail("--resume and --init-from exclude each other");
    if (!(a.lr >= 0.0f)) fail("--lr must be at least 0, got %g", a.lr);
    if (!(a.min_lr_ratio >= 0.0f && a.min_lr_ratio <= 1.0f)) fail("--min-lr-ratio must be in [0, 1], got %g", a.min_lr_ratio);
    if (a.lr_schedule != "cosine" && a.lr_schedule != "linear" && a.lr_schedule != "constant" && a.lr_schedule != "wsd" &&
        a.lr_schedule != "wsd-sqrt") {
        fail("--lr-schedule must be cosine, linear, constant, wsd or wsd-sqrt, got '%s'", a.lr_schedule.c_str());
    }
    if (!(a.decay_frac > 0.0f && a.decay_frac <= 1.0f)) fail("--decay-frac must be in (0, 1], got %g", a.decay_frac);
    if (!(a.weight_decay >= 0.0f)) fail("--weight-decay must be at least 0, got %g", a.weight_decay);
    if (a.weight_decay_on != "matrices" && a.weight_decay_on != "all") {
        fail("--weight-decay-on must be matrices or all, got '%s'", a.weight_decay_on.c_str());
    }
    // beta 1 would freeze a moment at 0 and divide the bias correction by 0
    if (!(a.beta1 >= 0.0f && a.beta1 < 1.0f)) fail("--beta1 must be in [0, 1), got %g", a.beta1);
    if (!(a.beta2 >= 0.0f && a.beta2 < 1.0f)) fail("--beta2 must be in [0, 1), got %g", a.beta2);
    // eps 0 divides 0 by 0 wherever a gradient has been 0 so far
    if (!(a.adam_eps > 0.0f)) fail("--adam-eps must be positive, got %g", a.adam_eps);
    if (!(a.grad_clip >= 0.0f)) fail("--grad-clip must be at least 0, got %g", a.grad_clip);
    if (!(a.embed_std > 0.0f)) fail("--embed-std must be positive, got %g", a.embed_std);
    if (a.device != "auto" && a.device != "cpu" && a.device != "cuda") fail("--device must be auto, cpu or cuda, got '%s'", a.device.c_str());
    if (a.precision != "fp32" && a.precision != "bf16" && a.precision != "bf16-pure") {
        fail("--precision must be fp32, bf16 or bf16-pure, got '%s'", a.precision.c_str());
    }
    if (a.attention != "auto" && a.attention != "simple" && a.attention != "fused")
        fail("--attention must be auto, simple or fused, got '%s'", a.attention.c_str());
    if (a.rope != "auto" && a.rope != "separate") fail("--rope must be auto or separate, got '%s'", a.rope.c_str());
    if (a.rounding != "nearest" && a.rounding != "stochastic") {
        fail("--rounding must be nearest or stochastic, got '%s'", a.rounding.c_str());
    }
    return a;
}

// The per-layer placement the flags describe, for a model of L layers; alpha gets the Mix-LN
// alpha it stands for (0 for pure Pre-LN, 1 for pure Post-LN, 0 for other lists).
static std::vector<NormKind> norm_layers_from_flags(const Args& a, int L, float* alpha) {
    std::vector<NormKind> kinds;
    *alpha = 0.0f;
    if (!a.norm_layers.empty()) {
        kinds = parse_norm_layers(a.norm_layers, "--norm-layers");
        if ((int)kinds.size() != L) fail("--norm-layers lists %zu layers but the model has %d", kinds.size(), L);
        int post = mixln_post_ln_layers(kinds);
        if (post >= 0) *alpha = (float)post / L;
    } else if (a.norm == "mix") {
        *alpha = a.alpha;
        kinds = mixln_norm_layers(post_ln_layers_for(a.alpha, L), L);
    } else if (a.norm == "hybridstar") {
        // HybridNorm*: the first layer Pre-LN with the norms on q, k and v kept, the rest HybridNorm
        kinds.assign(L, NORM_HYBRID);
        kinds[0] = NORM_PREQKV;
    } else {
        kinds = parse_norm_layers(a.norm, "--norm");
        kinds.assign(L, kinds[0]);
        if (a.norm == "post") *alpha = 1.0f;
    }
    if (a.lns) {
        bool any = false;
        for (NormKind& kind : kinds) {
            if (kind == NORM_PRE) kind = NORM_LNS, any = true;
        }
        if (!any) fail("--lns scales the pre layers, but the placement has none");
    }
    return kinds;
}

// "post x2, pre x6" for messages
static std::string placement_summary(const std::vector<NormKind>& kinds) {
    std::string text;
    for (size_t l = 0; l < kinds.size();) {
        size_t run = l;
        while (run < kinds.size() && kinds[run] == kinds[l]) run++;
        text += (l ? ", " : "") + std::string(norm_kind_name(kinds[l])) + " x" + std::to_string(run - l);
        l = run;
    }
    return text;
}

// The model the flags describe: a preset with sizes overridden.
static ModelConfig config_from_flags(const Args& a) {
    const Preset* preset = nullptr;
    for (const Preset& p : PRESETS) {
        if (a.preset == p.name) preset = &p;
    }
    if (preset == nullptr) fail("unknown --model '%s' (see --help for the presets)", a.preset.c_str());
    ModelConfig c;
    c.num_layers = a.layers ? a.layers : preset->layers;
    c.channels = a.dim ? a.dim : preset->dim;
    c.num_heads = a.heads ? a.heads : preset->heads;
    c.ffn_channels = a.ffn ? a.ffn : preset->ffn;
    c.vocab_size = a.vocab ? a.vocab : preset->vocab;
    c.max_seq_len = a.seq_len ? a.seq_len : preset->seq_len;
    c.norm_layers = norm_layers_from_flags(a, c.num_layers, &c.mixln_alpha);
    c.norm_type = a.norm_type == "layernorm" ? NORM_LAYERNORM : NORM_RMSNORM;
    model_config_check(c);
    return c;
}

// With --init-from the checkpoint's config.json sets the model; any size or placement also
// given on the command line (a --model preset counts as giving its sizes) must agree with it.
static void check_flags_match_checkpoint(const Args& a, const ModelConfig& c, const std::string& dir) {
    Args sizes = a;
    if (a.preset_given) {
        ModelConfig preset = config_from_flags(a);   // the preset with any overrides applied
        sizes.layers = preset.num_layers;
        sizes.dim = preset.channels;
        sizes.heads = preset.num_heads;
        sizes.ffn = preset.ffn_channels;
        sizes.vocab = preset.vocab_size;
    }
    auto check = [&](const char* flag, int given, int actual, const char* key) {
        if (given != 0 && given != actual) {
            fail("checkpoint '%s' does not match the flags: %s %d, but its %s is %d", dir.c_str(), flag, given, key, actual);
        }
    };
    check("--layers", sizes.layers, c.num_layers, "num_hidden_layers");
    check("--dim", sizes.dim, c.channels, "hidden_size");
    check("--heads", sizes.heads, c.num_heads, "num_attention_heads");
    check("--ffn", sizes.ffn, c.ffn_channels, "intermediate_size");
    check("--vocab", sizes.vocab, c.vocab_size, "vocab_size");
    if (a.norm_given || a.alpha_given || !a.norm_layers.empty() || a.lns) {
        float alpha;
        std::vector<NormKind> kinds = norm_layers_from_flags(a, c.num_layers, &alpha);
        if (kinds != c.norm_layers) {
            fail("checkpoint '%s' does not match the flags: they give the norm placement %s, but its norm_layers is %s",
                 dir.c_str(), norm_layers_text(kinds).c_str(), norm_layers_text(c.norm_layers).c_str());
        }
    }
    if (a.norm_type_given && a.norm_type != norm_type_name(c.norm_type)) {
        fail("checkpoint '%s' does not match the flags: --norm-type %s, but its norm_type is %s", dir.c_str(),
             a.norm_type.c_str(), norm_type_name(c.norm_type));
    }
}

// ----------------------------------------------------------------------------
// the settings that define a run, saved with its training state

struct RunSetting {
    const char* flag;
    std::string value;   // canonical text: what the flag parses to, printed back
    bool may_change;     // on --resume: a new value may be given (else it must agree)
};

static std::string number_text(double v) {
    char buf[32];
    snprintf(buf, sizeof(buf), "%.9g", v);
    return buf;
}

// for messages: a stored number as %g prints it (0.01, not 0.00999999978)
static std::string number_text_short(const std::string& text) {
    char buf[32];
    snprintf(buf, sizeof(buf), "%g", strtof(text.c_str(), nullptr));
    return buf;
}

static std::vector<RunSetting> run_settings(const Args& a) {
    // what decides the result must stay; what only watches the run may change
    return {{"--train-data", a.train_data, false},
            {"--data-order", a.data_order, false},
            {"--data-seed", std::to_string(a.data_seed), false},
            {"--pad-id", std::to_string(a.pad_id), false},
            {"--batch", std::to_string(a.batch), false},
            {"--grad-accum", std::to_string(a.grad_accum), false},
            {"--seq-len", std::to_string(a.seq_len), false},
            {"--steps", std::to_string(a.steps), false},
            {"--lr", number_text(a.lr), false},
            {"--warmup", std::to_string(a.warmup), false},
            {"--min-lr-ratio", number_text(a.min_lr_ratio), false},
            {"--lr-schedule", a.lr_schedule, false},
            {"--decay-frac", number_text(a.decay_frac), false},
            {"--weight-decay", number_text(a.weight_decay), false},
            {"--weight-decay-on", a.weight_decay_on, false},
            {"--beta1", number_text(a.beta1), false},
            {"--beta2", number_text(a.beta2), false},
            {"--adam-eps", number_text(a.adam_eps), false},
            {"--grad-clip", number_text(a.grad_clip), false},
            {"--precision", a.precision, false},
            {"--rounding", a.rounding, false},
            {"--seed", std::to_string(a.seed), false},   // the weights come from the checkpoint; the rounding's bits do not
            {"--attention", a.attention, false},
            {"--device", a.device, true},   // where it trained (cpu or cuda); see choose_device
            {"--val-data", a.val_data, true},
            {"--val-every", std::to_string(a.val_every), true},
            {"--val-batches", std::to_string(a.val_batches), true},
            {"--val-mean", a.val_mean, true},
            {"--checkpoint-every", std::to_string(a.checkpoint_every), true},
            {"--keep-every", std::to_string(a.keep_every), true},
            {"--keep-what", a.keep_what, true},
            {"--layer-grads-every", std::to_string(a.layer_grads_every), true}};
}

static std::string settings_to_json(const Args& a) {
    std::string json = "{";
    for (const RunSetting& s : run_settings(a)) {
        json += (json.size() > 1 ? ", " : "") + json_escape(s.flag) + ": " + json_escape(s.value);
    }
    return json + "}";
}

// The flags that shape the learning-rate schedule after the warmup.
static bool is_schedule_flag(const std::string& flag) {
    return flag == "--steps" || flag == "--lr-schedule" || flag == "--decay-frac" || flag == "--min-lr-ratio";
}

// wsd's decay: the last round(decay_frac * steps) steps.
static int wsd_decay_steps(const Args& a) { return (int)lround((double)a.decay_frac * a.steps); }

// The learning rate of step `step` under the flags' schedule (model.h: learning_rate).
static float schedule_lr(const Args& a, int step) {
    LrSchedule kind = a.lr_schedule == "linear" ? LR_LINEAR : a.lr_schedule == "constant" ? LR_CONSTANT
                    : a.lr_schedule == "wsd" ? LR_WSD : a.lr_schedule == "wsd-sqrt" ? LR_WSD_SQRT : LR_COSINE;
    return learning_rate(step, a.lr, a.warmup, a.steps, a.min_lr_ratio, kind, wsd_decay_steps(a));
}

// --resume with a new --steps, --lr-schedule, --decay-frac or --min-lr-ratio: allowed where every
// step already taken keeps the learning rate it trained with, so that the resumed run is the run
// the new flags would have trained from the start (a wsd or constant run's stable phase, extended
// or branched into a decay of its own). Anything else would rewrite the past, and is refused.
static void check_schedule_change(const Args& a, int steps_taken) {
    if (a.saved_schedule.empty()) return;
    Args saved = a;
    std::string changes;
    for (const auto& [flag, value] : a.saved_schedule) {
        const char* v = value.c_str();
        if (flag == "--steps") saved.steps = parse_int("--steps", v);
        else if (flag == "--lr-schedule") saved.lr_schedule = value;
        else if (flag == "--decay-frac") saved.decay_frac = parse_float("--decay-frac", v);
        else if (flag == "--min-lr-ratio") saved.min_lr_ratio = parse_float("--min-lr-ratio", v);
        changes += (changes.empty() ? "" : ", ") + flag;
    }
    for (int step = 0; step < steps_taken; step++) {
        float trained = schedule_lr(saved, step), now = schedule_lr(a, step);
        if (trained != now) {
            fail("--resume '%s': with the new %s, step %d (of the %d already taken) would have lr %g instead of the %g it "
                 "trained with; a resumed run may change the schedule only where the steps taken keep theirs (a wsd "
                 "or constant run's stable phase)", a.resume.c_str(), changes.c_str(), step, steps_taken, now, trained);
        }
    }
}

// --resume: the run continues with its saved settings; a flag given again must say the same.
// Returns the device the run trained on ("cpu" or "cuda"; "" in a state saved before it was
// recorded), which choose_device weighs against --device.
static std::string apply_saved_settings(Args* a, const std::string& settings_json, const std::string& dir) {
    std::string saved_device;
    JsonValue saved;
    std::string error;
    if (!json_parse(settings_json, &saved, &error) || saved.type != JsonValue::Object) {
        fail("the training state in '%s' has unreadable settings: %s", dir.c_str(), error.c_str());
    }
    // every setting this program ever saved is in run_settings, so another one comes from a newer
    // version, whose run this one cannot continue as it was meant
    const std::vector<RunSetting> known = run_settings(*a);
    for (const auto& member : saved.object) {
        bool is_known = std::any_of(known.begin(), known.end(), [&](const RunSetting& s) { return member.first == s.flag; });
        if (!is_known) {
            fail("the training state in '%s' has a setting '%s' that this program does not know (saved by a newer "
                 "version?)", dir.c_str(), member.first.c_str());
        }
    }
    std::vector<std::string> argv_like;
    for (const RunSetting& s : run_settings(*a)) {
        const JsonValue* v = saved.get(s.flag);
        // A state saved before a setting existed trained with what the program did then: fp32
        // before --precision, the simple attention (the only one on the CPU, the default on the
        // GPU) before --attention, nearest rounding before --rounding, AdamW's betas 0.9/0.999
        // and eps 1e-8 before their flags, the cosine before --lr-schedule, the data in order
        // before --data-order, a stream before --pad-id, no snapshots before --keep-every (and
        // full ones before --keep-what), weight decay on every parameter before
        // --weight-decay-on. Those states did not save the seed, which nothing after the
        // initialisation read: the run goes on with the one given, or the default.
        static const std::pair<const char*, const char*> before_saved[] = {
            {"--precision", "fp32"}, {"--attention", "simple"}, {"--rounding", "nearest"},
            {"--beta1", "0.9"}, {"--beta2", "0.999"}, {"--adam-eps", "1e-08"},
            {"--lr-schedule", "cosine"}, {"--decay-frac", "0.2"}, {"--data-order", "sequential"}, {"--data-seed", "1"},
            {"--pad-id", "-1"},
            {"--keep-every", "0"}, {"--keep-what", "full"}, {"--weight-decay-on", "all"}};
        JsonValue old_default;
        old_default.type = JsonValue::String;
        for (const auto& entry : before_saved) {
            if (v == nullptr && std::string(s.flag) == entry.first) {
                old_default.string = entry.second;
                v = &old_default;
            }
        }
        if (v == nullptr && std::string(s.flag) == "--seed") continue;
        if (std::string(s.flag) == "--device") {
            if (v != nullptr && v->type == JsonValue::String) saved_device = v->string;
            continue;
        }
        if (v == nullptr || v->type != JsonValue::String) fail("the training state in '%s' has no setting %s", dir.c_str(), s.flag);
        bool given = std::find(a->given.begin(), a->given.end(), s.flag) != a->given.end();
        // numbers compare as the floats they parse to (the text is %.9g, which round-trips)
        if (given && s.may_change) continue;   // the new value holds
        // the schedule may change where the steps already taken keep their learning rates, which
        // main checks once it knows the saved step (check_schedule_change)
        if (given && is_schedule_flag(s.flag)) {
            a->saved_schedule.push_back({s.flag, v->string});
            continue;
        }
        // (the seed compares as text: an int past 2^24 has no exact float)
        bool numeric = std::string(s.flag) != "--train-data" && std::string(s.flag) != "--precision" &&
                       std::string(s.flag) != "--attention" && std::string(s.flag) != "--rounding" &&
                       std::string(s.flag) != "--lr-schedule" && std::string(s.flag) != "--data-order" &&
                       std::string(s.flag) != "--weight-decay-on" && std::string(s.flag) != "--keep-what" &&
                       std::string(s.flag) != "--seed" && std::string(s.flag) != "--data-seed";
        bool same = numeric ? strtof(v->string.c_str(), nullptr) == strtof(s.value.c_str(), nullptr) : v->string == s.value;
        if (given && !same) {
            fail("--resume '%s': %s %s differs from the saved run's %s (a resumed run keeps its settings)", dir.c_str(),
                 s.flag, numeric ? number_text_short(s.value).c_str() : s.value.c_str(),
                 numeric ? number_text_short(v->string).c_str() : v->string.c_str());
        }
        argv_like.push_back(s.flag);
        argv_like.push_back(v->string);
    }
    // the saved values, through the same parser as the command line
    for (size_t i = 0; i < argv_like.size(); i += 2) {
        const std::string& flag = argv_like[i];
        const char* v = argv_like[i + 1].c_str();
        if (flag == "--train-data") a->train_data = v;
        else if (flag == "--data-order") a->data_order = v;
        else if (flag == "--data-seed") a->data_seed = parse_int("--data-seed", v);
        else if (flag == "--pad-id") a->pad_id = parse_int("--pad-id", v);
        else if (flag == "--batch") a->batch = parse_int("--batch", v);
        else if (flag == "--grad-accum") a->grad_accum = parse_int("--grad-accum", v);
        // (states saved before 2026-11-30 hold 0 for a run given no --seq-len: the model's)
        else if (flag == "--seq-len") a->seq_len = argv_like[i + 1] == "0" ? 0 : parse_size("--seq-len", v);
        else if (flag == "--steps") a->steps = parse_int("--steps", v);
        else if (flag == "--lr") a->lr = parse_float("--lr", v);
        else if (flag == "--warmup") a->warmup = parse_int("--warmup", v);
        else if (flag == "--min-lr-ratio") a->min_lr_ratio = parse_float("--min-lr-ratio", v);
        else if (flag == "--lr-schedule") a->lr_schedule = v;
        else if (flag == "--decay-frac") a->decay_frac = parse_float("--decay-frac", v);
        else if (flag == "--weight-decay") a->weight_decay = parse_float("--weight-decay", v);
        else if (flag == "--weight-decay-on") a->weight_decay_on = v;
        else if (flag == "--beta1") a->beta1 = parse_float("--beta1", v);
        else if (flag == "--beta2") a->beta2 = parse_float("--beta2", v);
        else if (flag == "--adam-eps") a->adam_eps = parse_float("--adam-eps", v);
        else if (flag == "--grad-clip") a->grad_clip = parse_float("--grad-clip", v);
        else if (flag == "--precision") a->precision = v;
        else if (flag == "--rounding") a->rounding = v;
        else if (flag == "--seed") a->seed = parse_int("--seed", v);
        else if (flag == "--attention") a->attention = v;
        else if (flag == "--val-data") a->val_data = v;
        else if (flag == "--val-every") a->val_every = parse_int("--val-every", v);
        else if (flag == "--val-batches") a->val_batches = parse_int("--val-batches", v);
        else if (flag == "--val-mean") a->val_mean = v;
        else if (flag == "--checkpoint-every") a->checkpoint_every = parse_int("--checkpoint-every", v);
        else if (flag == "--keep-every") a->keep_every = parse_int("--keep-every", v);
        else if (flag == "--keep-what") a->keep_what = v;
        else if (flag == "--layer-grads-every") a->layer_grads_every = parse_int("--layer-grads-every", v);
    }
    return saved_device;
}

// Flushes the line just written to the log. A log that cannot be written (a full disk, a file
// size limit) stops the run, naming the file, instead of losing its lines unseen.
static void log_flush(FILE* log, const std::string& path) {
    if (fflush(log) != 0 || ferror(log)) fail("cannot write '%s': %s", path.c_str(), strerror(errno));
}

// A resumed run's log keeps the entries up to the saved step (an interrupted run may have logged
// steps past its last checkpoint, which are about to run again) and continues after them. They
// come from the log in resumed_from ("" when not resuming), which a branch (--out elsewhere)
// copies and leaves as it was. A torn last line (a run killed mid-write) is dropped silently;
// other lines that are not log entries (a damaged file) are dropped with a warning that counts them.
static FILE* open_log(const std::string& dir, const std::string& resumed_from, int resume_step) {
    std::string path = dir + "/log.jsonl", old_path = resumed_from + "/log.jsonl";
    std::string kept;
    int unreadable = 0;
    if (!resumed_from.empty()) {
        FILE* old = fopen(old_path.c_str(), "rb");
        if (old != nullptr) {
            fclose(old);
            std::string text = read_text_file(old_path), line;
            for (size_t i = 0; i < text.size(); i = text.find('\n', i) + 1) {
                size_t end = text.find('\n', i);
                if (end == std::string::npos) break;   // a torn last line is dropped
                line = text.substr(i, end - i);
                JsonValue entry;
                std::string error;
                int step = json_parse(line, &entry, &error) ? json_int_or(entry.get("step"), -1) : -1;
                if (step < 0) {
                    unreadable++;
                    continue;
                }
                bool is_train = entry.get("train_loss") != nullptr;
                if (is_train ? step < resume_step : step <= resume_step) kept += line + "\n";
            }
        }
    }
    if (unreadable > 0) {
        fprintf(stderr, "warning: %d line%s of '%s' %s not a log entry, left out of the resumed log\n", unreadable,
                unreadable == 1 ? "" : "s", old_path.c_str(), unreadable == 1 ? "is" : "are");
    }
    write_file_atomic(path, kept);
    return fopen_or_fail(path.c_str(), "a");
}

// --keep-every: the snapshot of step s is the folder step_<s, at least 6 digits> in the run's
// folder, which sorts in step order up to a million steps.
static std::string kept_snapshot_name(int step) {
    char name[32];
    snprintf(name, sizeof(name), "step_%06d", step);
    return name;
}

// Whether dir is a snapshot a run kept: a folder named as kept_snapshot_name names them, in a
// folder with a run's log.
static bool is_kept_snapshot(std::string dir) {
    while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
    size_t slash = dir.rfind('/');
    std::string name = slash == std::string::npos ? dir : dir.substr(slash + 1);
    std::string parent = slash == std::string::npos ? "." : slash == 0 ? "/" : dir.substr(0, slash);
    if (name.size() < 6 || name.compare(0, 5, "step_") != 0) return false;
    for (size_t i = 5; i < name.size(); i++) {
        if (name[i] < '0' || name[i] > '9') return false;
    }
    struct stat st;
    return stat((parent + "/log.jsonl").c_str(), &st) == 0;
}

// ----------------------------------------------------------------------------
// stopping on a signal
//
// SIGINT (Ctrl-C) or SIGTERM (what a cluster's scheduler sends a job some time before it kills
// it) during a run with --out: the step under way finishes, the checkpoint and training state are
// written as at --stop-at, and the program exits with status 128 + the signal's number; --resume
// continues the run bit for bit. A second signal ends the program at once (SA_RESETHAND). The flag
// is the program's one piece of global mutable state: a signal handler can reach nothing else.
static volatile sig_atomic_t stop_signal_received = 0;

static void on_stop_signal(int signal_number) { stop_signal_received = signal_number; }

static void catch_stop_signals() {
    struct sigaction action = {};
    action.sa_handler = on_stop_signal;
    action.sa_flags = SA_RESETHAND | SA_RESTART;
    sigemptyset(&action.sa_mask);
    if (sigaction(SIGINT, &action, nullptr) != 0 || sigaction(SIGTERM, &action, nullptr) != 0) {
        fail("cannot install the handlers of SIGINT and SIGTERM: %s", strerror(errno));
    }
}

// ----------------------------------------------------------------------------
// device

// The device's peak rate for the run's matmul arithmetic, in FLOP/s, where it is known from the
// data sheet: fp32 on CUDA cores (cuBLASLt is asked for exact fp32, no TF32), or dense bf16 on
// tensor cores; 0 elsewhere (CPUs vary too much to guess). Used for the model FLOPs utilisation
// in the progress line.
static double peak_flops(bool on_gpu, bool bf16_matmuls) {
#ifdef MIXLN_CUDA
    if (on_gpu) {
        cudaDeviceProp prop;
        CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
        std::string name = prop.name;
        if (name.find("H100") != std::string::npos || name.find("H200") != std::string::npos) return bf16_matmuls ? 989e12 : 67e12;
        if (name.find("A100") != std::string::npos) return bf16_matmuls ? 312e12 : 19.5e12;
    }
#endif
    (void)on_gpu;
    (void)bf16_matmuls;
    return 0.0;
}

// Training FLOPs per token: 6 per weight of every matmul (forward 2, backward 4), plus the
// attention scores and their use on the values, 6 * L * T * C for causal attention.
static double model_flops_per_token(const ModelConfig& c, int T) {
    double L = c.num_layers, C = c.channels, F = c.ffn_channels, V = c.vocab_size;
    double matmul_weights = L * (4 * C * C + 3 * C * F) + V * C;
    return 6 * matmul_weights + 6 * L * T * C;
}

static std::string duration_text(double seconds) {
    char buf[32];
    int s = (int)(seconds + 0.5);
    if (s >= 3600) snprintf(buf, sizeof(buf), "%dh%02dm", s / 3600, s / 60 % 60);
    else if (s >= 60) snprintf(buf, sizeof(buf), "%dm%02ds", s / 60, s % 60);
    else snprintf(buf, sizeof(buf), "%ds", s);
    return buf;
}

// Whether this build can run on a GPU here: one is present and the build has kernels for its
// architecture (CUDA_ARCHS when it was built; a kernel image for sm_80 also runs on sm_86 and
// sm_89, not on sm_75 or sm_100). If not, why says what is missing.
#if defined(MIXLN_CUDA) && !defined(MIXLN_CUDA_EMULATION)
static __global__ void device_probe_kernel() {}
#endif
static bool gpu_usable(std::string* why) {
#if !defined(MIXLN_CUDA)
    *why = "a g++ build: no CUDA backend";
    return false;
#elif defined(MIXLN_CUDA_EMULATION)
    *why = "the CUDA emulation build: --device cuda runs the emulation";
    return false;
#else
    int gpus = 0;
    cudaError_t error = cudaGetDeviceCount(&gpus);
    if (error != cudaSuccess || gpus == 0) {
        cudaGetLastError();   // clear the error a machine without a driver leaves behind
        *why = std::string("no usable GPU: ") + (error != cudaSuccess ? cudaGetErrorString(error) : "no device found");
        return false;
    }
    cudaDeviceProp prop;
    CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    cudaFuncAttributes attributes;
    error = cudaFuncGetAttributes(&attributes, device_probe_kernel);
    if (error != cudaSuccess) {
        cudaGetLastError();
        std::string arch = std::to_string(prop.major) + std::to_string(prop.minor);
        *why = "no usable GPU: " + std::string(prop.name) + " (sm_" + arch + ") has no kernels in this build (" +
               cudaGetErrorString(error) + "): rebuild with make CUDA_ARCHS=" + arch;
        return false;
    }
    return true;
#endif
}

// Decides where the run goes and says so: --device cuda needs a usable GPU, auto takes one where
// there is one. Resuming, --device auto continues on the device the saved run trained on (another
// device computes in another order: the run would go on, but not bit for bit).
static bool choose_device(const Args& a, const std::string& saved_device) {
    std::string why;
    bool usable = gpu_usable(&why);
    bool on_gpu;
    if (a.device == "cuda") {
#ifndef MIXLN_CUDA
        fail("--device cuda: this build has no CUDA backend (nvcc was not found when it was built)");
#endif
#ifndef MIXLN_CUDA_EMULATION
        if (!usable) fail("--device cuda: %s", why.c_str());
#endif
        on_gpu = true;
    } else if (a.device == "cpu") {
        on_gpu = false;
    } else if (saved_device == "cuda") {   // auto, resuming a GPU run
        if (!usable) {
            fail("--resume '%s': the saved run trained on the GPU, which is not available here (%s); --device cpu "
                 "continues it on the CPU (not bit for bit)", a.resume.c_str(), why.c_str());
        }
        on_gpu = true;
    } else if (saved_device == "cpu") {
        on_gpu = false;
    } else {
        on_gpu = usable;
    }
    if (!saved_device.empty() && saved_device != (on_gpu ? "cuda" : "cpu")) {
        printf("note: the saved run trained on %s and continues on %s: not bit for bit\n", saved_device.c_str(),
               on_gpu ? "cuda" : "cpu");
    }
#ifdef MIXLN_CUDA
    if (on_gpu) {
        cudaDeviceProp prop;
        CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
        printf("device: cuda, %s (%.1f GiB)\n", prop.name, prop.totalGlobalMem / 1073741824.0);
        return true;
    }
#endif
    int threads = 1;
#ifdef _OPENMP
    threads = omp_get_max_threads();
#endif
    if (a.device == "auto" && saved_device != "cpu") printf("device: cpu, %d threads (%s)\n", threads, why.c_str());
    else printf("device: cpu, %d threads\n", threads);
    return false;
}

// ----------------------------------------------------------------------------
// the data's layout

// A stream of documents, or one document per row (--pad-id): what the shards hold must be what the
// run reads them as. prepare.py records it in the meta.json beside the shards ("rows" and "pad_id"
// for one document per row); shards without one are taken as the flags say.
static void check_data_layout(const std::string& pattern, const char* flag, int pad_id, int T) {
    size_t slash = pattern.rfind('/');
    std::string meta_path = (slash == std::string::npos ? std::string(".") : pattern.substr(0, slash)) + "/meta.json";
    struct stat st;
    if (stat(meta_path.c_str(), &st) != 0) return;
    JsonValue meta;
    std::string error;
    if (!json_parse(read_text_file(meta_path), &meta, &error) || meta.type != JsonValue::Object) {
        fail("%s: cannot read '%s' beside the shards: %s", flag, meta_path.c_str(), error.c_str());
    }
    const JsonValue* rows = meta.get("rows");
    const JsonValue* meta_pad = meta.get("pad_id");
    if (rows == nullptr || rows->type != JsonValue::Number) {
        if (pad_id >= 0) {
            fail("%s: '%s' says the shards are a stream of documents, but --pad-id reads one document per row "
                 "(shards from prepare.py --rows T)", flag, meta_path.c_str());
        }
        return;
    }
    int meta_rows = json_int_or(rows, -1), meta_pad_id = json_int_or(meta_pad, -1);
    if (meta_rows < 1) fail("%s: '%s' has a \"rows\" that is not a positive integer", flag, meta_path.c_str());
    if (pad_id < 0) {
        fail("%s: '%s' says the shards hold one document per row of %d tokens padded with token %d: give --pad-id %d "
             "(and --seq-len %d)", flag, meta_path.c_str(), meta_rows, meta_pad_id, meta_pad_id, meta_rows);
    }
    if (pad_id != meta_pad_id) {
        fail("%s: --pad-id %d, but '%s' says the shards are padded with token %d", flag, pad_id, meta_path.c_str(), meta_pad_id);
    }
    if (T != meta_rows) {
        fail("%s: the sequence length is %d, but '%s' says the shards hold rows of %d tokens (--seq-len %d)", flag, T,
             meta_path.c_str(), meta_rows, meta_rows);
    }
}

// ----------------------------------------------------------------------------
// evaluation

struct EvalResult {
    double loss;          // mean token cross-entropy
    size_t tokens;        // target tokens evaluated
};

// Mean loss over the first max_batches whole windows of the loader's data (all of them if 0):
// over the targets (batch_means false), or the mean of the batches' means (true; a batch without
// targets left out).
static EvalResult evaluate(Model* model, DataLoader* loader, int max_batches, bool batch_means) {
    size_t batches = dataloader_num_batches(loader);
    if (max_batches > 0 && (size_t)max_batches < batches) batches = (size_t)max_batches;
    dataloader_reset(loader);
    double sum = 0.0, weights = 0.0;
    size_t tokens = 0;
    for (size_t i = 0; i < batches; i++) {
        dataloader_next_batch(loader);
        model_forward(model, loader->inputs, loader->targets);
        // each batch's mean weighted by its targets (all B*T of them, but where the data is a
        // document per row, --pad-id: then padding has none), or by 1
        double weight = validation_batch_weight(model->target_count, batch_means);
        sum += model->mean_loss * weight;
        weights += weight;
        tokens += (size_t)model->target_count;
    }
    model->backward_ready = false;
    return {weights > 0 ? sum / weights : 0.0, tokens};
}

// Generates n tokens after the prompt: each step runs the model on the last T tokens of the text
// (a window; positions restart at its start) and samples the next token from the logits at the
// last position, softened by temperature and cut to the top_k most likely. Positions after the
// text are filled with token 0; causal attention keeps them from affecting earlier ones. A
// stop_id >= 0 (an end-of-text token) ends the generation once sampled, and is kept.
static std::vector<int> generate(Model* model, std::vector<int> text, int n, float temperature, int top_k, uint64_t seed,
                                 int stop_id) {
    const int T = model->T, V = model->config.vocab_size;
    if (model->B != 1) fail("generation needs a model built for batch 1");
    uint64_t state = seed;
    std::vector<int> window(T), generated;
    std::vector<real> logits(V);
    std::vector<double> probs(V);
    std::vector<int> order(V);
    for (int i = 0; i < n; i++) {
        int start = text.size() > (size_t)T ? (int)text.size() - T : 0, length = (int)text.size() - start;
        for (int t = 0; t < T; t++) window[t] = t < length ? text[start + t] : 0;
        model_forward(model, window.data(), nullptr);
        logits = model_activations_to_host(model, [](const auto& a) { return a.logits; }, (size_t)(length - 1) * V, V);
        // softmax over the top_k largest logits at the temperature
        for (int v = 0; v < V; v++) order[v] = v;
        int k = top_k > 0 && top_k < V ? top_k : V;
        std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int a, int b) { return logits[a] > logits[b]; });
        double sum = 0.0;
        for (int j = 0; j < k; j++) {
            probs[j] = exp((double)(logits[order[j]] - logits[order[0]]) / temperature);
            sum += probs[j];
        }
        double u = (random_u64(&state) >> 11) / 9007199254740992.0 * sum;
        int next = order[k - 1];
        for (int j = 0; j < k; j++) {
            u -= probs[j];
            if (u < 0) {
                next = order[j];
                break;
            }
        }
        text.push_back(next);
        generated.push_back(next);
        if (next == stop_id) break;   // the end of the text
    }
    return generated;
}

static double seconds_since(std::chrono::steady_clock::time_point start) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// ----------------------------------------------------------------------------
// main

int main(int argc, char** argv) {
    Args args = parse_args(argc, argv);

    // the model: from a saved run, from a checkpoint, or from the flags
    ModelConfig config;
    bool resuming = !args.resume.empty();
    std::string saved_device;
    if (resuming) {
        // a folder with weights but no training state (a --keep-what weights snapshot, a
        // checkpoint from elsewhere) cannot continue a run, but can start one
        struct stat st;
        if (stat(training_state_path(args.resume).c_str(), &st) != 0 && stat((args.resume + "/model.safetensors").c_str(), &st) == 0) {
            fail("--resume '%s': it holds a model's weights but no training state (training_state.safetensors), so no "
                 "run to continue%s; --init-from '%s' starts a new run from its weights", args.resume.c_str(),
                 is_kept_snapshot(args.resume) ? " (a snapshot kept with --keep-what weights?)" : "", args.resume.c_str());
        }
        std::string settings;
        config = training_state_config(args.resume, &settings);
        check_flags_match_checkpoint(args, config, args.resume);
        saved_device = apply_saved_settings(&args, settings, args.resume);
        // a snapshot is kept as it was: the run resumed from it goes elsewhere, even back into
        // the run's own folder (--out RUN, after a crash that left no training state there)
        if (args.out.empty() && is_kept_snapshot(args.resume)) {
            fail("--resume '%s': that is a snapshot kept by --keep-every; give the resumed run a folder of its own with "
                 "--out (a branch, or the run's folder to continue the run itself)", args.resume.c_str());
        }
        if (args.out.empty()) args.out = args.resume;
    } else if (!args.init_from.empty()) {
        config = checkpoint_read_config(args.init_from);
        check_flags_match_checkpoint(args, config, args.init_from);
    } else {
        config = config_from_flags(args);
    }
    bool on_gpu = choose_device(args, saved_device);
    args.device = on_gpu ? "cuda" : "cpu";   // what the training state records
    int T = args.seq_len ? args.seq_len : config.max_seq_len;
    if (T < 1) fail("--seq-len must be at least 1, got %d", T);
    if (T > config.max_seq_len) fail("--seq-len %d exceeds the checkpoint's max_position_embeddings %d", T, config.max_seq_len);
    args.seq_len = T;   // what the training state records
    int B = args.batch;

    // the data, checked before any big allocation so that bad input fails fast
    if (args.analyze && args.val_data.empty()) fail("--analyze needs --val-data");
    std::vector<int> prompt;
    if (args.sample > 0) {
        // generation: one sequence, no training data
        std::string list = args.prompt_ids.empty() ? "0" : args.prompt_ids;
        for (size_t i = 0; i <= list.size();) {
            size_t end = list.find(',', i);
            if (end == std::string::npos) end = list.size();
            int id = parse_int("--prompt-ids", list.substr(i, end - i).c_str());
            if (id < 0 || id >= config.vocab_size) fail("--prompt-ids: token %d is outside the vocabulary [0, %d)", id, config.vocab_size);
            prompt.push_back(id);
            i = end + 1;
        }
        if (args.stop_id >= config.vocab_size) fail("--stop-id %d is outside the vocabulary [0, %d)", args.stop_id, config.vocab_size);
        args.eval_only = true;
        B = 1;
    }
    if (args.analyze) args.eval_only = true;   // no training either
    bool training = !args.eval_only;
    if (training && args.steps > 0 && args.train_data.empty()) fail("--train-data is required to train (or use --eval-only)");
    if (training && args.keep_every > 0 && args.out.empty()) fail("--keep-every keeps its snapshots in the run's folder: give --out DIR");
    bool data_seed_given = std::find(args.given.begin(), args.given.end(), "--data-seed") != args.given.end();
    if (data_seed_given && args.data_order != "shuffled") fail("--data-seed applies to --data-order shuffled only");
    // the schedule: wsd's decay is a whole number of steps after the warmup
    bool decay_frac_given = std::find(args.given.begin(), args.given.end(), "--decay-frac") != args.given.end();
    bool wsd = args.lr_schedule == "wsd" || args.lr_schedule == "wsd-sqrt";
    if (decay_frac_given && !wsd) fail("--decay-frac applies to --lr-schedule wsd and wsd-sqrt only (got %s)", args.lr_schedule.c_str());
    if (wsd && training && args.steps > 0) {
        int decay_steps = wsd_decay_steps(args);
        if (decay_steps < 1) fail("--decay-frac %g of %d steps leaves no step to decay in", args.decay_frac, args.steps);
        if (args.warmup + decay_steps > args.steps) {
            fail("--lr-schedule wsd: the warmup (%d steps) and the decay (%d, --decay-frac %g) do not fit in --steps %d",
                 args.warmup, decay_steps, args.decay_frac, args.steps);
        }
    }
    if (args.eval_only && args.val_data.empty() && args.sample == 0) fail("--eval-only needs --val-data");
    DataLoader train_loader, val_loader;
    bool have_train = training && args.steps > 0;
    bool have_val = !args.val_data.empty();
    if (args.pad_id >= config.vocab_size) fail("--pad-id %d is outside the vocabulary [0, %d)", args.pad_id, config.vocab_size);
    if (have_train) {
        check_data_layout(args.train_data, "--train-data", args.pad_id, T);
        dataloader_init(&train_loader, args.train_data.c_str(), B, T, config.vocab_size, args.pad_id);
        train_loader.shuffled = args.data_order == "shuffled";
        train_loader.shuffle_seed = (uint64_t)args.data_seed;
    }
    if (have_val) {
        check_data_layout(args.val_data, "--val-data", args.pad_id, T);
        dataloader_init(&val_loader, args.val_data.c_str(), B, T, config.vocab_size, args.pad_id);
    }

    Model model;
    Precision precision = args.precision == "bf16" ? PRECISION_BF16 : args.precision == "bf16-pure" ? PRECISION_BF16_PURE : PRECISION_FP32;
    if (precision != PRECISION_FP32 && !on_gpu) {
        fail("--precision %s runs on the GPU only (--device cuda); the CPU backend computes in fp32", args.precision.c_str());
    }
    if (args.attention == "fused" && !on_gpu) fail("--attention fused needs --device cuda (the CPU has one attention)");
    if (args.rounding == "stochastic" && precision != PRECISION_BF16_PURE) {
        fail("--rounding stochastic rounds bf16-pure's bf16 weights and AdamW moments; --precision %s keeps them in fp32",
             args.precision.c_str());
    }
    bool fused_attention = on_gpu && args.attention != "simple";   // auto: fused on the GPU
    model_build(&model, config, B, T, on_gpu, precision, fused_attention);
    model.rope_in_attention = args.rope == "auto";
    model.rounding = args.rounding == "stochastic" ? ROUND_STOCHASTIC : ROUND_NEAREST;
    model.rounding_seed = (uint64_t)args.seed;
    model.weight_decay_scope = args.weight_decay_on == "all" ? DECAY_ALL : DECAY_MATRICES;
    TrainingState state;
    if (resuming) {
        state = training_state_load(&model, args.resume);
        if (state.step > args.steps) fail("the saved run in '%s' is at step %d, past its %d steps", args.resume.c_str(), state.step, args.steps);
        check_schedule_change(args, state.step);
        if (have_train) {
            if (state.shard_index >= (int)train_loader.shard_paths.size()) fail("the saved data position is past the shards of %s", args.train_data.c_str());
            train_loader.shard_index = state.shard_index;
            train_loader.batch_index = state.batch_index;
            train_loader.epoch = state.data_epoch;
        }
        printf("resuming %s at step %d of %d\n", args.resume.c_str(), state.step, args.steps);
    } else if (!args.init_from.empty()) {
        checkpoint_load_weights(&model, args.init_from);
    } else {
        model_init_weights(&model, args.seed, args.embed_std, args.scaled_init);
    }
    int post_ln_layers = mixln_post_ln_layers(config.norm_layers);
    std::string placement = placement_summary(config.norm_layers);
    if (post_ln_layers > 0 && post_ln_layers < config.num_layers) {
        placement = "Mix-LN " + placement + " (alpha " + number_text_short(number_text(config.mixln_alpha)) + ")";
    }
    printf("model: L=%d C=%d heads=%d F=%d V=%d | %s, %s, %s%s | %.2fM parameters\n", config.num_layers,
           config.channels, config.num_heads, config.ffn_channels, config.vocab_size, placement.c_str(),
           norm_type_name(config.norm_type), precision_name(precision),
           model.rounding == ROUND_STOCHASTIC ? " (stochastic rounding)" : "", model.num_parameters / 1e6);
    int head_size = config.channels / config.num_heads;
    if (!on_gpu) {
        printf("attention: the CPU's (probabilities stored)\n");
    } else if (!model.fused_attention) {
        printf("attention: simple (probabilities stored)\n");
    } else {
#ifdef MIXLN_CUDA
        bool tensor_cores = precision != PRECISION_FP32 && attention_tensor_core_supports(head_size);
#else
        bool tensor_cores = false;
#endif
        // RoPE inside where the tensor-core kernels run on aligned buffers, which the model's are
        printf("attention: fused, %s (head size %d), RoPE %s\n", tensor_cores ? "tensor cores" : "CUDA cores",
               head_size, tensor_cores && model.rope_in_attention ? "applied inside" : "in its own kernels");
    }
    double parameter_state_bytes = 4.0 * model.num_parameters * param_bytes(precision) +
                                   (model.weights_copy ? model.num_parameters * storage_bytes(precision) : 0.0);
    printf("memory: parameters + gradients + AdamW%s %.1f MiB, activations %.1f MiB (B=%d, T=%d)\n",
           model.weights_copy ? " + bf16 weight copy" : "", parameter_state_bytes / 1048576.0,
           model.activation_bytes / 1048576.0, B, T);

    if (args.sample > 0) {
        std::vector<int> ids = generate(&model, prompt, args.sample, args.temperature, args.top_k, args.seed, args.stop_id);
        std::string json = "{\"prompt_ids\": [";
        for (size_t i = 0; i < prompt.size(); i++) json += (i ? ", " : "") + std::to_string(prompt[i]);
        json += "], \"ids\": [";
        for (size_t i = 0; i < ids.size(); i++) json += (i ? ", " : "") + std::to_string(ids[i]);
        printf("%s]}\n", json.c_str());
        model_free(&model);
        return 0;
    }
    if (args.analyze) {
        std::string dir = !args.out.empty() ? args.out : !args.init_from.empty() ? args.init_from : ".";
        make_directory(dir);
        Analysis analysis = model_analyze(&model, &val_loader, args.val_batches, args.val_mean == "batches");
        write_file_atomic(dir + "/analysis.json", analysis_to_json(analysis));
        printf("val loss %.4f over %zu tokens; with one layer dropped:", analysis.val_loss, analysis.tokens);
        for (double loss : analysis.layer_drop_loss) printf(" %.4f", loss);
        printf("\nhidden-state RMS at the layer boundaries (embeddings first):");
        for (double rms : analysis.hidden_rms) printf(" %.4g", rms);
        printf("\nanalysis written to %s/analysis.json\n", dir.c_str());
        dataloader_free(&val_loader);
        model_free(&model);
        return 0;
    }
    if (args.eval_only) {
        EvalResult r = evaluate(&model, &val_loader, args.val_batches, args.val_mean == "batches");
        printf("{\"val_loss\": %.6f, \"perplexity\": %.4f, \"tokens\": %zu}\n", r.loss, exp(r.loss), r.tokens);
        dataloader_free(&val_loader);
        model_free(&model);
        return 0;
    }

    FILE* log = nullptr;
    const std::string log_path = args.out + "/log.jsonl";
    if (!args.out.empty()) {
        make_directory(args.out);
        claim_directory(args.out);
        log = open_log(args.out, resuming ? args.resume : "", state.step);
    }
    // the checkpoint: weights and config for users and other tools, and the training state
    auto write_checkpoint = [&](const std::string& dir, int next_step) {
        checkpoint_save_model(&model, dir);
        TrainingState now;
        now.step = next_step;
        now.data_epoch = have_train ? train_loader.epoch : 0;
        now.shard_index = have_train ? train_loader.shard_index : 0;
        now.batch_index = have_train ? train_loader.batch_index : 0;
        now.settings_json = settings_to_json(args);
        training_state_save(&model, now, dir);
    };
    auto save_checkpoint = [&](int next_step) {
        if (args.out.empty()) return;
        write_checkpoint(args.out, next_step);
        printf("checkpoint written to %s (step %d)\n", args.out.c_str(), next_step);
    };
    // --keep-every: a snapshot is a run folder of its own (checkpoint, training state and the log
    // so far), which --init-from, --eval-only, --analyze and --resume --out take as they take the
    // run's. One left by an earlier pass over the same step (a run resumed from before it) is
    // replaced, its training state first: a snapshot cut short leaves no state to resume from
    // beside weights of another step. With --keep-what weights a snapshot is the checkpoint and
    // the log only (a quarter of the bytes), for everything but --resume.
    int kept_step = -1;
    const bool keep_weights_only = args.keep_what == "weights";
    if (training && args.keep_every > 0) {
        printf("keeping a snapshot every %d steps in %s/step_NNNNNN (%s, %.1f MiB each)\n", args.keep_every, args.out.c_str(),
               keep_weights_only ? "weights and log" : "weights, training state and log",
               (keep_weights_only ? 4.0 : 16.0) * model.num_parameters / 1048576.0);
    }
    auto keep_snapshot = [&](int next_step) {
        if (args.keep_every <= 0 || next_step % args.keep_every != 0 || next_step == kept_step) return;
        std::string dir = args.out + "/" + kept_snapshot_name(next_step);
        make_directory(dir);
        std::string old_state = dir + "/training_state.safetensors";
        if (unlink(old_state.c_str()) != 0 && errno != ENOENT) fail("cannot remove '%s': %s", old_state.c_str(), strerror(errno));
        write_file_atomic(dir + "/log.jsonl", read_text_file(log_path));
        if (keep_weights_only) checkpoint_save_model(&model, dir);
        else write_checkpoint(dir, next_step);
        kept_step = next_step;
        printf("snapshot kept in %s (step %d)\n", dir.c_str(), next_step);
    };
    auto validate = [&](int step) {
        EvalResult r = evaluate(&model, &val_loader, args.val_batches, args.val_mean == "batches");
        printf("step %d | val loss %.4f | perplexity %.2f | %zu tokens\n", step, r.loss, exp(r.loss), r.tokens);
        if (log) {
            fprintf(log, "{\"step\": %d, \"val_loss\": %.6f, \"tokens\": %zu}\n", step, r.loss, r.tokens);
            log_flush(log, log_path);
        }
    };

    // the training loop; step s uses the schedule's lr(s), so with warmup step 0 has lr 0
    const int K = args.grad_accum;
    int last_step = args.stop_at > 0 && args.stop_at < args.steps ? args.stop_at : args.steps;
    const double peak = peak_flops(on_gpu, args.precision != "fp32"), flops_per_token = model_flops_per_token(config, T);
    double run_seconds = 0.0;   // for the time left
    int stopped_by = 0;   // the signal that ended the run early, if one did
    if (log) catch_stop_signals();   // with somewhere to write the checkpoint
    for (int step = state.step; step < last_step; step++) {
        auto start = std::chrono::steady_clock::now();
        // K micro-batches, each contributing 1/K of the gradient of the mean loss
        model_zero_grad(&model);
        double train_loss = 0.0;
        for (int micro = 0; micro < K; micro++) {
            dataloader_next_batch(&train_loader);
            model_forward_backward(&model, train_loader.inputs, train_loader.targets, 1.0f / K);
            if (!std::isfinite(model.mean_loss)) fail("the loss is not finite at step %d; stopping", step);
            train_loss += model.mean_loss / K;
        }
        double grad_norm = model_grad_norm(&model);
        std::string layer_grads;   // ", \"layer_grad_norms\": [...]" on the steps that log them
        if (args.layer_grads_every > 0 && step % args.layer_grads_every == 0) {
            for (double norm : model_layer_grad_norms(&model)) layer_grads += (layer_grads.empty() ? "" : ", ") + number_text(norm);
            layer_grads = ", \"layer_grad_norms\": [" + layer_grads + "]";
        }
        if (!std::isfinite(grad_norm)) fail("the gradient norm is not finite at step %d; stopping", step);
        float lr = schedule_lr(args, step);
        model_update(&model, lr, args.beta1, args.beta2, args.adam_eps, args.weight_decay,
                     grad_clip_scale(grad_norm, args.grad_clip));
        double seconds = seconds_since(start);
        double tokens_per_second = (double)K * B * T / seconds;
        run_seconds += seconds;
        std::string mfu;
        if (peak > 0) {
            char buf[32];
            snprintf(buf, sizeof(buf), " | MFU %.1f%%", 100.0 * tokens_per_second * flops_per_token / peak);
            mfu = buf;
        }
        int done = step + 1 - state.step;
        printf("step %d/%d | loss %.4f | lr %.3e | grad norm %.4f | %.1f ms | %.0f tok/s%s | %s left\n", step + 1,
               args.steps, train_loss, lr, grad_norm, seconds * 1000, tokens_per_second, mfu.c_str(),
               duration_text(run_seconds / done * (last_step - step - 1)).c_str());
        if (log) {
            fprintf(log, "{\"step\": %d, \"train_loss\": %.6f, \"lr\": %.6e, \"grad_norm\": %.6f, \"ms\": %.3f, \"tokens_per_second\": %.1f%s}\n",
                    step, train_loss, lr, grad_norm, seconds * 1000, tokens_per_second, layer_grads.c_str());
            log_flush(log, log_path);
        }
        if (have_val && args.val_every > 0 && (step + 1) % args.val_every == 0 && step + 1 < args.steps) validate(step + 1);
        if (args.checkpoint_every > 0 && (step + 1) % args.checkpoint_every == 0 && step + 1 < last_step) save_checkpoint(step + 1);
        if (step + 1 < last_step) keep_snapshot(step + 1);
        // a stop signal ends the run here as --stop-at would
        if (stop_signal_received != 0 && step + 1 < last_step) {
            stopped_by = stop_signal_received;
            last_step = step + 1;
        }
    }
    if (have_val && last_step == args.steps) validate(args.steps);
    save_checkpoint(last_step);
    if (last_step > state.step) keep_snapshot(last_step);   // with the last validation in its log
    if (stopped_by != 0) {
        printf("stopped by %s after step %d of %d; --resume %s continues the run\n",
               stopped_by == SIGINT ? "SIGINT" : "SIGTERM", last_step, args.steps, args.out.c_str());
    }
    if (log && fclose(log) != 0) fail("cannot write '%s': %s", log_path.c_str(), strerror(errno));
    if (have_train) dataloader_free(&train_loader);
    if (have_val) dataloader_free(&val_loader);
    model_free(&model);
    return stopped_by != 0 ? 128 + stopped_by : 0;
}
