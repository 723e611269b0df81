/*
Checkpoints: a directory with `config.json` and `model.safetensors`, in Hugging Face's layout, so
that a checkpoint written here loads into the PyTorch reference (dev/reference.py) and back.

config.json carries the LlamaConfig keys (hidden_size, intermediate_size, num_hidden_layers,
num_attention_heads, vocab_size, rms_norm_eps, rope_theta, max_position_embeddings, ...) plus
`post_ln_layers` and `mixln_alpha`. A config without the Mix-LN keys is a stock LLaMA: pure Pre-LN.
model.safetensors holds fp32 tensors under the names model_named_tensors() gives, linear weights
in (out, in) layout. Loading checks every tensor's presence and shape and refuses tensors it does
not expect (a Post-LN layer's norms are named differently from a Pre-LN layer's, so a checkpoint
whose placement does not match its config is caught here).

Both files are written to a temporary name and renamed into place, so an existing checkpoint
survives a crash or a full disk mid-write.
*/
#pragma once

#include <string>
#include <vector>

#include <sys/stat.h>
#include <unistd.h>

#include "common.h"
#include "json.h"
#include "model.h"
#include "safetensors.h"

// ---- config.json

inline std::string config_to_json(const ModelConfig& c) {
    char buf[2048];
    snprintf(buf, sizeof(buf),
             "{\n"
             "  \"architectures\": [\"LlamaForCausalLM\"],\n"
             "  \"model_type\": \"llama\",\n"
             "  \"hidden_size\": %d,\n"
             "  \"intermediate_size\": %d,\n"
             "  \"num_hidden_layers\": %d,\n"
             "  \"num_attention_heads\": %d,\n"
             "  \"num_key_value_heads\": %d,\n"
             "  \"vocab_size\": %d,\n"
             "  \"max_position_embeddings\": %d,\n"
             "  \"rms_norm_eps\": %.9g,\n"
             "  \"rope_theta\": %.9g,\n"
             "  \"hidden_act\": \"silu\",\n"
             "  \"attention_bias\": false,\n"
             "  \"mlp_bias\": false,\n"
             "  \"tie_word_embeddings\": false,\n"
             "  \"torch_dtype\": \"float32\",\n"
             "  \"post_ln_layers\": %d,\n"
             "  \"mixln_alpha\": %.9g\n"
             "}\n",
             c.channels, c.ffn_channels, c.num_layers, c.num_heads, c.num_heads, c.vocab_size,
             c.max_seq_len, c.rms_norm_eps, c.rope_theta, c.post_ln_layers, c.mixln_alpha);
    return buf;
}

// Writes text to path through "<path>.tmp" and a rename.
inline void write_file_atomic(const std::string& path, const std::string& text) {
    std::string tmp = path + ".tmp";
    FILE* f = fopen(tmp.c_str(), "wb");
    if (f == nullptr) fail("cannot write '%s': %s", tmp.c_str(), strerror(errno));
    bool ok = fwrite(text.data(), 1, text.size(), f) == text.size();
    ok = fflush(f) == 0 && ok;
    ok = fsync(fileno(f)) == 0 && ok;
    ok = fclose(f) == 0 && ok;
    if (!ok) {
        remove(tmp.c_str());
        fail("writing '%s' failed: %s", tmp.c_str(), strerror(errno));
    }
    if (rename(tmp.c_str(), path.c_str()) != 0) fail("cannot rename '%s' to '%s': %s", tmp.c_str(), path.c_str(), strerror(errno));
}

inline std::string read_text_file(const std::string& path) {
    FILE* f = fopen_or_fail(path.c_str(), "rb");
    std::string text;
    char buf[65536];
    size_t n;
    while ((n = fread(buf, 1, sizeof(buf), f)) > 0) text.append(buf, n);
    if (ferror(f)) fail("cannot read '%s': %s", path.c_str(), strerror(errno));
    fclose(f);
    return text;
}

// An integer member of a config object; `required` members that are missing fail.
inline int config_int(const JsonValue& root, const char* key, const std::string& path, bool required, int fallback) {
    const JsonValue* v = root.get(key);
    if (v == nullptr) {
        if (required) fail("'%s' has no \"%s\"", path.c_str(), key);
        return fallback;
    }
    if (v->type != JsonValue::Number || v->number != floor(v->number) || fabs(v->number) > 2e9) {
        fail("'%s': \"%s\" must be an integer", path.c_str(), key);
    }
    return (int)v->number;
}

inline float config_float(const JsonValue& root, const char* key, const std::string& path, float fallback) {
    const JsonValue* v = root.get(key);
    if (v == nullptr) return fallback;
    if (v->type != JsonValue::Number) fail("'%s': \"%s\" must be a number", path.c_str(), key);
    return (float)v->number;
}

// Reads a config.json (ours or a stock Hugging Face LLaMA one) and checks it.
inline ModelConfig config_read_json(const std::string& path) {
    std::string text = read_text_file(path);
    JsonValue root;
    std::string error;
    if (!json_parse(text, &root, &error)) fail("'%s' is not valid JSON: %s", path.c_str(), error.c_str());
    if (root.type != JsonValue::Object) fail("'%s' must hold a JSON object", path.c_str());
    ModelConfig c;
    c.channels = config_int(root, "hidden_size", path, true, 0);
    c.ffn_channels = config_int(root, "intermediate_size", path, true, 0);
    c.num_layers = config_int(root, "num_hidden_layers", path, true, 0);
    c.num_heads = config_int(root, "num_attention_heads", path, true, 0);
    c.vocab_size = config_int(root, "vocab_size", path, true, 0);
    c.max_seq_len = config_int(root, "max_position_embeddings", path, false, 2048);
    c.rms_norm_eps = config_float(root, "rms_norm_eps", path, 1e-6f);
    c.rope_theta = config_float(root, "rope_theta", path, 10000.0f);
    // what this engine does not implement is refused rather than silently ignored
    if (config_int(root, "num_key_value_heads", path, false, c.num_heads) != c.num_heads) {
        fail("'%s': grouped-query attention (num_key_value_heads != num_attention_heads) is not supported", path.c_str());
    }
    const JsonValue* tie = root.get("tie_word_embeddings");
    if (tie != nullptr && tie->type == JsonValue::Bool && tie->boolean) {
        fail("'%s': tied embeddings are not supported (the model has its own lm_head)", path.c_str());
    }
    const JsonValue* act = root.get("hidden_act");
    if (act != nullptr && (act->type != JsonValue::String || act->string != "silu")) {
        fail("'%s': hidden_act must be \"silu\"", path.c_str());
    }
    // Mix-LN keys: post_ln_layers is what the model runs; alpha is recorded alongside it.
    // Without them the config is a stock LLaMA, which is pure Pre-LN.
    const JsonValue* alpha = root.get("mixln_alpha");
    c.mixln_alpha = config_float(root, "mixln_alpha", path, 0.0f);
    int derived = post_ln_layers_for(c.mixln_alpha, c.num_layers);
    c.post_ln_layers = config_int(root, "post_ln_layers", path, false, alpha ? derived : 0);
    model_config_check(c);
    return c;
}

// ---- the checkpoint directory

inline void make_directory(const std::string& dir) {
    // create each missing component, like mkdir -p
    for (size_t i = 1; i <= dir.size(); i++) {
        if (i == dir.size() || dir[i] == '/') {
            std::string part = dir.substr(0, i);
            if (mkdir(part.c_str(), 0755) != 0 && errno != EEXIST) {
                fail("cannot create directory '%s': %s", part.c_str(), strerror(errno));
            }
        }
    }
    struct stat st;
    if (stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) fail("'%s' is not a directory", dir.c_str());
}

// Writes dir/model.safetensors (fp32) and dir/config.json. weights is a flat parameter buffer
// of the model's layout (the parameters, or for tests the gradients).
inline void checkpoint_save(const ModelConfig& config, const real* weights, const std::string& dir) {
    make_directory(dir);
    std::vector<NamedTensor> tensors = model_named_tensors(config);
    // files are fp32; in the fp64 test build the weights are rounded on the way out
    std::vector<float> staging;
    size_t n = num_parameters(config);
    const float* data = (const float*)(const void*)weights;
    if (sizeof(real) != sizeof(float)) {
        staging.resize(n);
        for (size_t i = 0; i < n; i++) staging[i] = (float)weights[i];
        data = staging.data();
    }
    std::vector<SafeTensorsEntry> entries;
    for (const NamedTensor& t : tensors) entries.push_back({t.name, "F32", t.shape, data + t.offset});
    safetensors_write((dir + "/model.safetensors").c_str(), entries, {{"format", "pt"}});
    write_file_atomic(dir + "/config.json", config_to_json(config));
}

inline ModelConfig checkpoint_read_config(const std::string& dir) {
    return config_read_json(dir + "/config.json");
}

// Reads the tensors of dir/model.safetensors named `prefix + name` into a flat buffer of the
// config's layout. Every expected tensor must be there with its exact shape; with
// allow_extra false, any other tensor is an error too.
inline void safetensors_load_named(real* weights, const ModelConfig& config, const std::string& path,
                                   const std::string& prefix, bool allow_extra) {
    SafeTensorsFile file;
    safetensors_open(&file, path.c_str());
    std::vector<NamedTensor> expected = model_named_tensors(config);
    std::vector<float> staging;
    for (const NamedTensor& t : expected) {
        const SafeTensor* st = safetensors_find(&file, prefix + t.name);
        if (st == nullptr) {
            fail("'%s' has no tensor '%s%s' (the config has %d Post-LN layers of %d)", path.c_str(), prefix.c_str(),
                 t.name.c_str(), config.post_ln_layers, config.num_layers);
        }
        if (st->shape != t.shape) {
            fail("'%s': tensor '%s' has shape %s but the model needs %s", path.c_str(), st->name.c_str(),
                 safetensors_shape_string(st->shape).c_str(), safetensors_shape_string(t.shape).c_str());
        }
        size_t n = safetensor_numel(st);
        staging.resize(n);
        safetensors_read_f32(&file, st, staging.data());
        for (size_t i = 0; i < n; i++) weights[t.offset + i] = (real)staging[i];
    }
    if (!allow_extra) {
        for (const SafeTensor& st : file.tensors) {
            bool known = false;
            for (const NamedTensor& t : expected) known = known || prefix + t.name == st.name;
            if (!known) {
                fail("'%s' has an unexpected tensor '%s' (does the norm placement match config.json?)",
                     path.c_str(), st.name.c_str());
            }
        }
    }
}

// Loads dir/model.safetensors into the model's parameters (through host memory when the model
// is on the GPU).
inline void checkpoint_load_weights(Model* model, const std::string& dir) {
    std::vector<real> host(model->num_parameters);
    safetensors_load_named(host.data(), model->config, dir + "/model.safetensors", "", false);
    model_copy_in(model, model->params_memory, host.data(), host.size() * sizeof(real));
}

// Writes the model's parameters as a checkpoint directory.
inline void checkpoint_save_model(const Model* model, const std::string& dir) {
    checkpoint_save(model->config, model_to_host(model, model->params_memory).data(), dir);
}
