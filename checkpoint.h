/*
Checkpoints: a directory with `config.json` and `model.safetensors`, in Hugging Face's layout, so
that a checkpoint written here loads into the PyTorch reference (dev/reference.py) and back.

config.json carries the LlamaConfig keys (hidden_size, intermediate_size, num_hidden_layers,
num_attention_heads, vocab_size, rms_norm_eps, rope_theta, max_position_embeddings, ...) plus the
placement: `norm_layers` (one of pre, post, peri, deepnorm, lns, hybrid per layer) and `norm_type`
(rmsnorm or layernorm), and for a Mix-LN placement also the official code's `post_ln_layers` and
`mixln_alpha`. A config without any of these is a stock LLaMA: pure Pre-LN with RMSNorm.
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

#include <fcntl.h>
#include <sys/file.h>
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
             "  \"norm_type\": \"%s\",\n",
             c.channels, c.ffn_channels, c.num_layers, c.num_heads, c.num_heads, c.vocab_size,
             c.max_seq_len, c.rms_norm_eps, c.rope_theta, norm_type_name(c.norm_type));
    std::string text = buf;
    // the Mix-LN keys of the official code, when the placement is a Mix-LN one
    int post_ln_layers = mixln_post_ln_layers(c.norm_layers);
    if (post_ln_layers >= 0) {
        snprintf(buf, sizeof(buf), "  \"post_ln_layers\": %d,\n  \"mixln_alpha\": %.9g,\n", post_ln_layers, c.mixln_alpha);
        text += buf;
    }
    text += "  \"norm_layers\": [";
    for (int l = 0; l < c.num_layers; l++) text += std::string(l ? ", " : "") + "\"" + norm_kind_name(c.norm_layers[l]) + "\"";
    text += "]\n}\n";
    return text;
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
    if (!json_is_int(v)) fail("'%s': \"%s\" must be an integer", path.c_str(), key);
    return (int)v->number;
}

inline float config_float(const JsonValue& root, const char* key, const std::string& path, float fallback) {
    const JsonValue* v = root.get(key);
    if (v == nullptr) return fallback;
    if (v->type != JsonValue::Number) fail("'%s': \"%s\" must be a number", path.c_str(), key);
    return (float)v->number;
}

// Parses config.json text (ours or a stock Hugging Face LLaMA one) and checks it; `path` names
// it in messages.
inline ModelConfig config_from_json(const std::string& text, const std::string& path) {
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
    // three switches, each false or absent: tied embeddings, and biases in the projections
    const char* unsupported[3][2] = {{"tie_word_embeddings", "tied embeddings are not supported (the model has its own lm_head)"},
                                     {"attention_bias", "biases in the attention projections are not supported"},
                                     {"mlp_bias", "biases in the MLP projections are not supported"}};
    for (const auto& [key, why] : unsupported) {
        const JsonValue* value = root.get(key);
        if (value == nullptr) continue;
        if (value->type != JsonValue::Bool) fail("'%s': \"%s\" must be true or false", path.c_str(), key);
        if (value->boolean) fail("'%s': %s", path.c_str(), why);
    }
    const JsonValue* act = root.get("hidden_act");
    if (act != nullptr && (act->type != JsonValue::String || act->string != "silu")) {
        fail("'%s': hidden_act must be \"silu\"", path.c_str());
    }
    // The placement: norm_layers (one kind per layer) when present, else the Mix-LN keys
    // post_ln_layers (or floor(mixln_alpha * L)); without any of them the config is a stock
    // LLaMA, which is pure Pre-LN.
    const JsonValue* alpha = root.get("mixln_alpha");
    c.mixln_alpha = config_float(root, "mixln_alpha", path, 0.0f);
    int derived = post_ln_layers_for(c.mixln_alpha, c.num_layers);
    int post_ln_layers = config_int(root, "post_ln_layers", path, false, alpha ? derived : 0);
    const JsonValue* kinds = root.get("norm_layers");
    if (kinds != nullptr) {
        if (kinds->type != JsonValue::Array) fail("'%s': \"norm_layers\" must be a list of placements", path.c_str());
        std::string list;
        for (size_t l = 0; l < kinds->array.size(); l++) {
            const JsonValue& kind = kinds->array[l];
            if (kind.type != JsonValue::String) fail("'%s': \"norm_layers\" entry %zu is not a string", path.c_str(), l);
            list += (l ? "," : "") + kind.string;
        }
        if (kinds->array.empty()) fail("'%s': \"norm_layers\" is empty", path.c_str());
        c.norm_layers = parse_norm_layers(list, ("'" + path + "' norm_layers").c_str());
        if ((int)c.norm_layers.size() != c.num_layers) {
            fail("'%s': \"norm_layers\" lists %zu layers but num_hidden_layers is %d", path.c_str(), c.norm_layers.size(), c.num_layers);
        }
        int mix = mixln_post_ln_layers(c.norm_layers);
        if (root.get("post_ln_layers") != nullptr && mix >= 0 && mix != post_ln_layers) {
            fail("'%s': \"post_ln_layers\" is %d but \"norm_layers\" has %d leading Post-LN layers", path.c_str(),
                 post_ln_layers, mix);
        }
    } else {
        if (post_ln_layers < 0 || post_ln_layers > c.num_layers) {
            fail("'%s': post_ln_layers must be in [0, %d], got %d", path.c_str(), c.num_layers, post_ln_layers);
        }
        c.norm_layers = mixln_norm_layers(post_ln_layers, c.num_layers);
    }
    const JsonValue* norm_type = root.get("norm_type");
    if (norm_type != nullptr) {
        if (norm_type->type == JsonValue::String && norm_type->string == "rmsnorm") c.norm_type = NORM_RMSNORM;
        else if (norm_type->type == JsonValue::String && norm_type->string == "layernorm") c.norm_type = NORM_LAYERNORM;
        else fail("'%s': \"norm_type\" must be \"rmsnorm\" or \"layernorm\"", path.c_str());
    }
    model_config_check(c);
    return c;
}

inline ModelConfig config_read_json(const std::string& path) {
    return config_from_json(read_text_file(path), path);
}

// ---- checksums

// FNV-1a (64 bit) over bytes, continued from `hash`: enough to notice a corrupted checkpoint
// (a flipped bit, a block of zeros), not meant against tampering.
inline uint64_t fnv1a64(const void* data, size_t n, uint64_t hash = 1469598103934665603ull) {
    const unsigned char* bytes = (const unsigned char*)data;
    for (size_t i = 0; i < n; i++) {
        hash ^= bytes[i];
        hash *= 1099511628211ull;
    }
    return hash;
}

inline std::string hex64(uint64_t value) {
    char buf[17];
    snprintf(buf, sizeof(buf), "%016llx", (unsigned long long)value);
    return buf;
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

// Claims the folder a run writes into for this process: an exclusive flock on the folder itself,
// held until the process ends (the kernel lets go then, however it ends), which leaves no file
// behind. A second run writing into the same folder would interleave its log with this one's and
// race it for the checkpoint's temporary files, so it is refused. Where the file system has no
// flock (some network ones), the run goes on unguarded.
inline void claim_directory(const std::string& dir) {
    int fd = open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) fail("cannot open directory '%s': %s", dir.c_str(), strerror(errno));
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        if (errno == EWOULDBLOCK) fail("'%s' is in use by another run writing into it; give this one another --out", dir.c_str());
        close(fd);
        return;
    }
    // fd stays open: the lock lives as long as it does
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
    uint64_t checksum = fnv1a64(nullptr, 0);
    for (const NamedTensor& t : tensors) {
        entries.push_back({t.name, "F32", t.shape, data + t.offset});
        size_t numel = 1;
        for (int64_t d : t.shape) numel *= (size_t)d;
        checksum = fnv1a64(data + t.offset, numel * sizeof(float), checksum);
    }
    // "checksum": FNV-1a 64 over the tensors' bytes in file order, checked when loading
    safetensors_write((dir + "/model.safetensors").c_str(), entries, {{"format", "pt"}, {"checksum", hex64(checksum)}});
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
    // files written here carry a checksum of the tensors in file order (= the order below)
    const char* stored_checksum = prefix.empty() ? safetensors_metadata(&file, "checksum") : nullptr;
    uint64_t checksum = fnv1a64(nullptr, 0);
    for (const NamedTensor& t : expected) {
        const SafeTensor* st = safetensors_find(&file, prefix + t.name);
        if (st == nullptr) {
            fail("'%s' has no tensor '%s%s' (the config's norm placement is %s, %s)", path.c_str(), prefix.c_str(),
                 t.name.c_str(), norm_layers_text(config.norm_layers).c_str(), norm_type_name(config.norm_type));
        }
        if (st->shape != t.shape) {
            fail("'%s': tensor '%s' has shape %s but the model needs %s", path.c_str(), st->name.c_str(),
                 safetensors_shape_string(st->shape).c_str(), safetensors_shape_string(t.shape).c_str());
        }
        size_t n = safetensor_numel(st);
        staging.resize(n);
        safetensors_read_f32(&file, st, staging.data());
        if (stored_checksum) checksum = fnv1a64(staging.data(), n * sizeof(float), checksum);
        for (size_t i = 0; i < n; i++) weights[t.offset + i] = (real)staging[i];
    }
    // a tensor the config does not explain first: a placement mismatch, not corruption
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
    if (stored_checksum && hex64(checksum) != stored_checksum) {
        fail("'%s' is corrupted: its checksum is %s but its data hashes to %s", path.c_str(), stored_checksum,
             hex64(checksum).c_str());
    }
}

// Loads dir/model.safetensors into the model's parameters (through host memory when the model
// is on the GPU).
inline void checkpoint_load_weights(Model* model, const std::string& dir) {
    std::vector<real> host(model->num_parameters);
    safetensors_load_named(host.data(), model->config, dir + "/model.safetensors", "", false);
    model_from_host(model, MODEL_PARAMS, host.data());
}

// Writes the model's parameters as a checkpoint directory.
inline void checkpoint_save_model(const Model* model, const std::string& dir) {
    checkpoint_save(model->config, model_to_host(model, MODEL_PARAMS).data(), dir);
}

// ---- training state, for --resume

// Everything a run needs to continue bit for bit, besides what the model holds (parameters,
// AdamW moments and step): where it is in the schedule and in the data, and the settings it runs
// with (a JSON object, checked against the command line on resume).
struct TrainingState {
    int step = 0;               // the next optimizer step to run
    int data_epoch = 0;         // the data loader's position: passes over the data completed,
    int shard_index = 0;        // and the next visit of this one
    size_t batch_index = 0;
    std::string settings_json;
};

// DIR/training_state.safetensors, one file so that it is replaced atomically as a whole:
//   tensors   params, adam_m, adam_v: (num_parameters,) F32 each, the flat buffers of model.h
//             (bf16-pure's bf16 values are stored exactly as F32)
//   metadata  format "mixln-training-state-3"; config (config.json text); step, adam_step,
//             data_epoch, shard_index, batch_index (decimal); settings (JSON); checksum (FNV-1a 64
//             over the three tensors' bytes in that order, hex); metadata_checksum (FNV-1a 64
//             over the fields before it, below, hex)
// The metadata decides as much of a resumed run as the tensors do (its schedule, its data
// position, its settings), so it has a checksum of its own, checked before any of it is used.
// Format 1 (before 2026-11-30) had none; format 2 (before --data-order) had no data_epoch, which
// only a shuffled order needs. Both still load, with data_epoch 0.
constexpr const char* TRAINING_STATE_FORMAT = "mixln-training-state-3";
constexpr const char* TRAINING_STATE_FORMAT_2 = "mixln-training-state-2";
constexpr const char* TRAINING_STATE_FORMAT_1 = "mixln-training-state-1";
const std::vector<const char*> TRAINING_STATE_CHECKED_FIELDS = {"format",     "config",      "step",        "adam_step",
                                                                "data_epoch", "shard_index", "batch_index", "settings"};
const std::vector<const char*> TRAINING_STATE_2_CHECKED_FIELDS = {"format",      "config",      "step",    "adam_step",
                                                                  "shard_index", "batch_index", "settings"};

// FNV-1a 64 over each field in the order above: its key, a 0 byte, its value's length (8 bytes,
// little-endian) and its value. value_of(key) returns the field's text.
template <typename ValueOf>
inline std::string training_state_metadata_checksum(ValueOf value_of,
                                                     const std::vector<const char*>& fields = TRAINING_STATE_CHECKED_FIELDS) {
    uint64_t hash = fnv1a64(nullptr, 0);
    for (const char* key : fields) {
        std::string value = value_of(key);
        uint64_t length = value.size();
        hash = fnv1a64(key, strlen(key) + 1, hash);
        hash = fnv1a64(&length, sizeof(length), hash);
        hash = fnv1a64(value.data(), value.size(), hash);
    }
    return hex64(hash);
}

inline void training_state_save(const Model* model, const TrainingState& state, const std::string& dir) {
    make_directory(dir);
    int64_t n = (int64_t)model->num_parameters;
    std::vector<real> buffers[3] = {model_to_host(model, MODEL_PARAMS), model_to_host(model, MODEL_ADAM_M),
                                    model_to_host(model, MODEL_ADAM_V)};
    const char* names[3] = {"params", "adam_m", "adam_v"};
    std::vector<float> staging[3];
    std::vector<SafeTensorsEntry> entries;
    uint64_t checksum = fnv1a64(nullptr, 0);
    for (int i = 0; i < 3; i++) {
        staging[i].assign(buffers[i].begin(), buffers[i].end());
        entries.push_back({names[i], "F32", {n}, staging[i].data()});
        checksum = fnv1a64(staging[i].data(), staging[i].size() * sizeof(float), checksum);
    }
    std::vector<std::pair<std::string, std::string>> metadata = {{"format", TRAINING_STATE_FORMAT},
                                                                 {"config", config_to_json(model->config)},
                                                                 {"step", std::to_string(state.step)},
                                                                 {"adam_step", std::to_string(model->adam_step)},
                                                                 {"data_epoch", std::to_string(state.data_epoch)},
                                                                 {"shard_index", std::to_string(state.shard_index)},
                                                                 {"batch_index", std::to_string(state.batch_index)},
                                                                 {"settings", state.settings_json},
                                                                 {"checksum", hex64(checksum)}};
    std::string metadata_checksum = training_state_metadata_checksum([&](const char* key) {
        for (const auto& [name, value] : metadata)
            if (name == key) return value;
        fail("training_state_save: no metadata field '%s'", key);
    });
    metadata.push_back({"metadata_checksum", metadata_checksum});
    safetensors_write((dir + "/training_state.safetensors").c_str(), entries, metadata);
}

inline std::string training_state_path(const std::string& dir) { return dir + "/training_state.safetensors"; }

inline const char* training_state_field(const SafeTensorsFile& file, const char* key) {
    const char* value = safetensors_metadata(&file, key);
    if (value == nullptr) fail("'%s' is not a training state: it has no \"%s\"", file.path.c_str(), key);
    return value;
}

inline long long training_state_number(const SafeTensorsFile& file, const char* key) {
    const char* text = training_state_field(file, key);
    char* end = nullptr;
    long long value = strtoll(text, &end, 10);
    if (end == text || *end != '\0' || value < 0) fail("'%s': \"%s\" is not a count: '%s'", file.path.c_str(), key, text);
    return value;
}

// Opens DIR's training state and checks its format and, from format 2, its metadata checksum.
inline void training_state_open(SafeTensorsFile* file, const std::string& dir) {
    safetensors_open(file, training_state_path(dir).c_str());
    std::string format = training_state_field(*file, "format");
    if (format != TRAINING_STATE_FORMAT && format != TRAINING_STATE_FORMAT_2 && format != TRAINING_STATE_FORMAT_1) {
        fail("'%s' has an unknown format '%s'", file->path.c_str(), format.c_str());
    }
    if (format != TRAINING_STATE_FORMAT_1) {
        std::string stored = training_state_field(*file, "metadata_checksum");
        std::string computed = training_state_metadata_checksum(
            [&](const char* key) { return std::string(training_state_field(*file, key)); },
            format == TRAINING_STATE_FORMAT ? TRAINING_STATE_CHECKED_FIELDS : TRAINING_STATE_2_CHECKED_FIELDS);
        if (stored != computed) {
            fail("'%s' is corrupted: its metadata checksum is %s but its metadata hashes to %s", file->path.c_str(),
                 stored.c_str(), computed.c_str());
        }
    }
}

// The model config and the settings of a saved run, before the model exists.
inline ModelConfig training_state_config(const std::string& dir, std::string* settings_json) {
    SafeTensorsFile file;
    training_state_open(&file, dir);
    *settings_json = training_state_field(file, "settings");
    return config_from_json(training_state_field(file, "config"), file.path + " (config)");
}

// Restores parameters, AdamW moments and step into a model built with the saved config, after
// checking the checksum. Returns the schedule and data position.
inline TrainingState training_state_load(Model* model, const std::string& dir) {
    SafeTensorsFile file;
    training_state_open(&file, dir);
    const char* names[3] = {"params", "adam_m", "adam_v"};
    ModelBuffer targets[3] = {MODEL_PARAMS, MODEL_ADAM_M, MODEL_ADAM_V};
    std::vector<float> staging[3];
    uint64_t checksum = fnv1a64(nullptr, 0);
    for (int i = 0; i < 3; i++) {
        const SafeTensor* t = safetensors_find(&file, names[i]);
        if (t == nullptr) fail("'%s' has no tensor '%s'", file.path.c_str(), names[i]);
        if (t->shape != std::vector<int64_t>{(int64_t)model->num_parameters}) {
            fail("'%s': '%s' has shape %s but the model has %zu parameters", file.path.c_str(), names[i],
                 safetensors_shape_string(t->shape).c_str(), model->num_parameters);
        }
        staging[i].resize(model->num_parameters);
        safetensors_read_f32(&file, t, staging[i].data());
        checksum = fnv1a64(staging[i].data(), staging[i].size() * sizeof(float), checksum);
    }
    if (hex64(checksum) != training_state_field(file, "checksum")) {
        fail("'%s' is corrupted: its checksum is %s but its data hashes to %s", file.path.c_str(),
             training_state_field(file, "checksum"), hex64(checksum).c_str());
    }
    for (int i = 0; i < 3; i++) {
        std::vector<real> host(staging[i].begin(), staging[i].end());
        model_from_host(model, targets[i], host.data());
    }
    model->adam_step = (int)training_state_number(file, "adam_step");
    TrainingState state;
    state.step = (int)training_state_number(file, "step");
    std::string format = training_state_field(file, "format");
    state.data_epoch = format == TRAINING_STATE_FORMAT ? (int)training_state_number(file, "data_epoch") : 0;
    state.shard_index = (int)training_state_number(file, "shard_index");
    state.batch_index = (size_t)training_state_number(file, "batch_index");
    state.settings_json = training_state_field(file, "settings");
    return state;
}
