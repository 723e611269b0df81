/*
The `train` program end to end: the real binary ($MIXLN_TRAIN, default ./train) runs as a
subprocess, and where a claim is about agreement with PyTorch, so does dev/reference.py under
$PYTHON (default python3; make test passes an interpreter with torch). The tests run from the
repository root, as make test does.

What is covered: a 10-step run against the PyTorch fixture (weights and log), checkpoints crossing
between the two programs in both directions, the files --out writes, --help, and every kind of bad
input ending in exit status 1 with a message that names the problem.

Runs are tiny (a few thousand parameters, a few steps) so the whole file takes seconds on 2 cores;
most of that is the three Python start-ups (importing torch).
*/
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../checkpoint.h"
#include "../json.h"
#include "../safetensors.h"
#include "test_util.h"

// ---- the programs under test

static std::string env_or(const char* name, const char* fallback) {
    const char* v = getenv(name);
    return v != nullptr && *v != '\0' ? v : fallback;
}

static std::string fixture_dir(const std::string& name) {
    return env_or("MIXLN_FIXTURES", "build/fixtures") + "/" + name;
}

// A word for sh, single-quoted so that paths and glob patterns reach the program unexpanded.
static std::string quote(const std::string& s) {
    std::string out = "'";
    for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
    return out + "'";
}

// A float as a flag value, with digits enough to round-trip a float.
static std::string num(double v) {
    char buf[32];
    snprintf(buf, sizeof(buf), "%.9g", v);
    return buf;
}

struct Run {
    int exit_status;   // exit code, or 128 + signal number
    std::string out, err;
};

// Runs a shell command with stdout and stderr captured separately (stderr through a temp file).
static Run run_split(const std::string& command) {
    char err_path[] = "/tmp/mixln_stderr_XXXXXX";
    int fd = mkstemp(err_path);
    REQUIRE(fd >= 0);
    close(fd);
    // the braces keep run_command's trailing 2>&1 from undoing the redirection of the command
    ChildResult r = run_command("{ " + command + " 2>" + err_path + "; }");
    std::ifstream f(err_path, std::ios::binary);
    std::stringstream err;
    err << f.rdbuf();
    unlink(err_path);
    return {r.exit_status, r.stderr_text, err.str()};
}

// ./train exactly as given: --device auto where the arguments name no device
static Run run_train_as_given(const std::string& args) {
    return run_split(quote(env_or("MIXLN_TRAIN", "./train")) + " " + args);
}

// ./train on the CPU backend unless the arguments name a device: these tests compare runs with the
// PyTorch fixtures and with each other bit for bit, which a GPU (what --device auto takes where
// one is usable) would not match. The tests of --device itself use run_train_as_given.
static Run run_train(const std::string& args) {
    return run_train_as_given(args.find("--device") == std::string::npos ? "--device cpu " + args : args);
}

static Run run_reference(const std::string& args) {
    return run_split(quote(env_or("PYTHON", "python3")) + " dev/reference.py " + args);
}

// Runs train and requires success.
static Run train_ok(const std::string& args) {
    Run r = run_train(args);
    INFO("./train " << args << "\nstdout:\n" << r.out << "\nstderr:\n" << r.err);
    REQUIRE(r.exit_status == 0);
    return r;
}

static Run reference_ok(const std::string& args) {
    Run r = run_reference(args);
    INFO("reference.py " << args << "\nstdout:\n" << r.out << "\nstderr:\n" << r.err);
    REQUIRE(r.exit_status == 0);
    return r;
}

// Bad input must end train cleanly: exit status 1 (not success, not a crash) and a message on
// stderr containing `expected`, so the problem is named rather than just reported.
static void require_train_fails(const std::string& args, const std::string& expected) {
    Run r = run_train(args);
    INFO("./train " << args << "\nstdout:\n" << r.out << "\nstderr:\n" << r.err);
    REQUIRE(r.exit_status == 1);
    REQUIRE(r.err.find(expected) != std::string::npos);
}

// ---- files

static bool file_exists(const std::string& path) {
    struct stat st;
    return stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

static std::string read_file(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    INFO("reading " << path);
    REQUIRE(f.good());
    std::stringstream text;
    text << f.rdbuf();
    return text.str();
}

static void write_file(const std::string& path, const std::string& bytes) {
    write_bytes(path, bytes.data(), bytes.size());
}

// An llm.c token shard of uint16 tokens: 256 int32 header [magic, version, count, 0...], then the
// tokens. count < 0 writes the true count. (Little-endian host, as safetensors.h also assumes.)
static void write_shard(const std::string& path, const std::vector<uint16_t>& tokens, int magic = 20240520,
                        int version = 1, long count = -1) {
    std::vector<int32_t> header(256, 0);
    header[0] = magic;
    header[1] = version;
    header[2] = (int32_t)(count < 0 ? (long)tokens.size() : count);
    std::string bytes((const char*)header.data(), header.size() * sizeof(int32_t));
    bytes.append((const char*)tokens.data(), tokens.size() * sizeof(uint16_t));
    write_file(path, bytes);
}

static std::vector<uint16_t> random_tokens(size_t n, int vocab, unsigned seed) {
    std::mt19937 gen(seed);
    std::uniform_int_distribution<int> dist(0, vocab - 1);
    std::vector<uint16_t> tokens(n);
    for (uint16_t& t : tokens) t = (uint16_t)dist(gen);
    return tokens;
}

// ---- JSON

static JsonValue parse_json(const std::string& text) {
    JsonValue v;
    std::string error;
    INFO("JSON text: " << text);
    REQUIRE(json_parse(text, &v, &error));
    return v;
}

// The last non-empty line of a program's stdout, where eval results go.
static JsonValue last_line_json(const std::string& out) {
    std::vector<std::string> lines;
    std::stringstream in(out);
    std::string line;
    while (std::getline(in, line)) {
        if (!line.empty()) lines.push_back(line);
    }
    REQUIRE(!lines.empty());
    return parse_json(lines.back());
}

static std::vector<JsonValue> read_jsonl(const std::string& path) {
    std::vector<JsonValue> rows;
    std::stringstream in(read_file(path));
    std::string line;
    while (std::getline(in, line)) {
        if (!line.empty()) rows.push_back(parse_json(line));
    }
    return rows;
}

static double number(const JsonValue& object, const char* key) {
    const JsonValue* v = object.get(key);
    INFO("JSON key " << key);
    REQUIRE(v != nullptr);
    REQUIRE(v->type == JsonValue::Number);
    return v->number;
}

static std::vector<float> read_tensor(const SafeTensorsFile& file, const std::string& name) {
    const SafeTensor* t = safetensors_find(&file, name);
    INFO("tensor " << name << " in " << file.path);
    REQUIRE(t != nullptr);
    std::vector<float> out(safetensor_numel(t));
    safetensors_read_f32(&file, t, out.data());
    return out;
}

// ---- shared settings

// A model small enough that a run takes milliseconds: 2 layers, width 32 (4 heads of 8, even as
// RoPE needs), SwiGLU 72, vocabulary 61, 16 positions.
static const std::string SMALL_MODEL = "--layers 2 --dim 32 --heads 4 --ffn 72 --vocab 61 --seq-len 16";
static const int SMALL_VOCAB = 61;
// Batches of 2x16: one window is B*T+1 = 33 tokens.
static const std::string SMALL_BATCH = "--batch 2 --seq-len 16";
// 200 tokens: (200-1)/32 = 6 whole batches.
static const size_t SHARD_TOKENS = 200;

// A freshly initialised small checkpoint in `dir`, written by train itself.
static void write_small_checkpoint(const std::string& dir, const std::string& extra = "") {
    train_ok("--steps 0 --out " + quote(dir) + " " + SMALL_MODEL + " " + extra);
}

// Mean loss of a checkpoint on a shard, by train --eval-only and by the reference. Both evaluate
// every whole 2x16 window; they must agree on the loss and on how many tokens that is.
static void require_evals_agree(const std::string& ckpt, const std::string& shard) {
    JsonValue ours = last_line_json(
        train_ok("--eval-only --init-from " + quote(ckpt) + " --val-data " + quote(shard) + " " + SMALL_BATCH).out);
    JsonValue theirs = last_line_json(
        reference_ok("eval --ckpt " + quote(ckpt) + " --data " + quote(shard) + " " + SMALL_BATCH).out);
    double loss = number(ours, "val_loss"), reference_loss = number(theirs, "val_loss");
    CAPTURE(loss, reference_loss);
    // A forward pass agrees with PyTorch to ~2e-7 (test_model.cpp's logits); train prints the loss
    // with 6 decimals (1e-7 relative at loss ~4). 1e-5 sits well above both.
    CHECK(std::fabs(loss - reference_loss) <= 1e-5 * std::fabs(reference_loss));
    CHECK(number(ours, "tokens") == number(theirs, "tokens"));
    CHECK(number(ours, "tokens") == 6 * 2 * 16);   // SHARD_TOKENS holds 6 whole windows of 2x16
}

// The tensors a checkpoint holds, to ask which norms a placement wrote.
struct CheckpointTensors {
    SafeTensorsFile file;
    explicit CheckpointTensors(const std::string& ckpt) { safetensors_open(&file, (ckpt + "/model.safetensors").c_str()); }
    bool has(const std::string& name) const { return safetensors_find(&file, name) != nullptr; }
};

// A checkpoint the PyTorch reference initialised with its own code (the small model's sizes, the
// given layers and extra reference flags): train loads it and agrees with the reference on its
// loss over the shard.
static void require_reference_checkpoint_agrees(const std::string& dir, int layers, const std::string& reference_flags,
                                               const std::string& shard) {
    reference_ok("init --out " + quote(dir) + " --vocab 61 --dim 32 --heads 4 --ffn 72 --seq-len 16 --layers " +
                 std::to_string(layers) + " " + reference_flags);
    require_evals_agree(dir, shard);
}

// ---- agreement with PyTorch

// train with the settings of a fixture case (extra: flags the case needs beyond them) ends where
// the reference's 10 steps did, step by step and weight by weight
static void require_reproduces_fixture_run(const std::string& name, const std::string& extra) {
    std::string dir = fixture_dir(name);
    INFO("fixture case " << name << " in " << dir);
    JsonValue hp = parse_json(read_file(dir + "/train.json"));
    int steps = (int)number(hp, "steps");
    std::string out = make_temp_dir() + "/run";
    std::string args = "--init-from " + quote(dir) + " --train-data " + quote(dir + "/train.bin") +
                       " --batch " + std::to_string((int)number(hp, "batch")) +
                       " --seq-len " + std::to_string((int)number(hp, "seq_len")) +
                       " --steps " + std::to_string(steps) + " --lr " + num(number(hp, "lr")) +
                       " --warmup " + std::to_string((int)number(hp, "warmup")) +
                       " --min-lr-ratio " + num(number(hp, "min_lr_ratio")) +
                       " --weight-decay " + num(number(hp, "weight_decay")) +
                       " --weight-decay-on " + hp.get("weight_decay_on")->string +
                       " --grad-clip " + num(number(hp, "grad_clip")) + " --out " + quote(out) + extra;
    train_ok(args);

    // the weights after the run, tensor by tensor
    ModelConfig config = checkpoint_read_config(dir);
    ModelConfig written = checkpoint_read_config(out);
    CHECK(written.num_layers == config.num_layers);
    CHECK(written.channels == config.channels);
    CHECK(written.norm_layers == config.norm_layers);
    CHECK(written.norm_type == config.norm_type);
    size_t n = num_parameters(config);
    std::vector<real> ours(n), reference(n);
    safetensors_load_named(ours.data(), config, out + "/model.safetensors", "", false);
    safetensors_load_named(reference.data(), config, dir + "/fixture.safetensors", "final.", true);
    for (const NamedTensor& t : model_named_tensors(config)) {
        size_t count = 1;
        for (int64_t d : t.shape) count *= (size_t)d;
        double diff = 0, norm = 0;
        for (size_t i = t.offset; i < t.offset + count; i++) {
            double d = (double)ours[i] - reference[i];
            diff += d * d;
            norm += (double)reference[i] * reference[i];
        }
        double error = std::sqrt(diff) / (std::sqrt(norm) + 1e-30);
        INFO("parameter " << t.name << " after " << steps << " steps: relative error " << error);
        // test_model.cpp's bound for the Mix-LN cases: measured 4e-7 to 7e-7 after 10 AdamW steps,
        // where Adam's division by sqrt(v) amplifies rounding differences
        CHECK(error < 5e-6);
    }

    // the log, step by step
    SafeTensorsFile fixture;
    safetensors_open(&fixture, (dir + "/fixture.safetensors").c_str());
    std::vector<float> ref_loss = read_tensor(fixture, "train_loss");
    std::vector<float> ref_lr = read_tensor(fixture, "lr");
    std::vector<float> ref_norm = read_tensor(fixture, "grad_norm");
    REQUIRE((int)ref_loss.size() == steps);
    std::vector<JsonValue> rows = read_jsonl(out + "/log.jsonl");
    REQUIRE((int)rows.size() == steps);   // no --val-data, so only the training rows
    // 1e-5 relative: test_model.cpp's per-step loss bound. On top of it, the log's rounding:
    // train_loss and grad_norm are printed with 6 decimals (half a unit: 5e-7), lr with %.6e
    // (7 significant digits: at most 5e-7 relative).
    const double relative = 1e-5;
    for (int s = 0; s < steps; s++) {
        const JsonValue& row = rows[s];
        INFO("log row " << s);
        CHECK(number(row, "step") == s);
        double loss = number(row, "train_loss"), lr = number(row, "lr"), norm = number(row, "grad_norm");
        CAPTURE(loss, ref_loss[s], lr, ref_lr[s], norm, ref_norm[s]);
        CHECK(std::fabs(loss - ref_loss[s]) <= relative * std::fabs(ref_loss[s]) + 5e-7);
        CHECK(std::fabs(lr - ref_lr[s]) <= (relative + 5e-7) * std::fabs(ref_lr[s]));
        CHECK(std::fabs(norm - ref_norm[s]) <= relative * std::fabs(ref_norm[s]) + 5e-7);
    }
}

TEST_CASE("train reproduces the PyTorch reference's 10 steps end to end", "[cli]") {
    require_reproduces_fixture_run("mix", "");
}

// One document per row, padded (the paper's data): the loader's ignored targets and the loss's
// mean over the rest, through the whole program, against the reference; and --eval-only's loss
// and token count (the targets that count) against the reference's eval.
TEST_CASE("train --pad-id reproduces the reference on padded rows, and evaluates them as it does", "[cli][rows]") {
    require_reproduces_fixture_run("mix_rows", " --pad-id 0");
    std::string dir = fixture_dir("mix_rows");
    const std::string data = " --batch 3 --seq-len 24 --pad-id 0";
    JsonValue ours = last_line_json(
        train_ok("--eval-only --init-from " + quote(dir) + " --val-data " + quote(dir + "/train.bin") + data).out);
    JsonValue theirs = last_line_json(
        reference_ok("eval --ckpt " + quote(dir) + " --data " + quote(dir + "/train.bin") + data).out);
    double loss = number(ours, "val_loss"), reference_loss = number(theirs, "val_loss");
    CAPTURE(loss, reference_loss);
    CHECK(std::fabs(loss - reference_loss) <= 1e-5 * std::fabs(reference_loss));
    CHECK(number(ours, "tokens") == number(theirs, "tokens"));
    CHECK(number(ours, "tokens") < 6 * 3 * 23);   // 18 rows of 24, fewer targets than 23 a row
    // read as a stream, the same shard gives another loss: the flag matters
    JsonValue stream = last_line_json(
        train_ok("--eval-only --init-from " + quote(dir) + " --val-data " + quote(dir + "/train.bin") +
                 " --batch 3 --seq-len 24").out);
    CHECK(std::fabs(number(stream, "val_loss") - loss) > 1e-2);
}

// --val-mean batches: the mean of the batches' means, as the paper's code reports its validation
// loss, against the reference's; on rows the batches hold different numbers of targets, so it
// differs from the token mean. The validation during training uses it too, and a resumed run
// keeps it.
TEST_CASE("--val-mean batches averages the batches' means, as the reference does", "[cli][rows]") {
    std::string dir = fixture_dir("mix_rows"), tmp = make_temp_dir();
    const std::string data = " --val-data " + quote(dir + "/train.bin") + " --batch 3 --seq-len 24 --pad-id 0";
    JsonValue tokens = last_line_json(train_ok("--eval-only --init-from " + quote(dir) + data).out);
    JsonValue batches = last_line_json(train_ok("--eval-only --init-from " + quote(dir) + data + " --val-mean batches").out);
    JsonValue theirs = last_line_json(reference_ok("eval --ckpt " + quote(dir) + " --data " + quote(dir + "/train.bin") +
                                                   " --batch 3 --seq-len 24 --pad-id 0 --val-mean batches").out);
    double loss = number(batches, "val_loss"), reference_loss = number(theirs, "val_loss");
    CAPTURE(loss, reference_loss, number(tokens, "val_loss"));
    CHECK(std::fabs(loss - reference_loss) <= 1e-5 * std::fabs(reference_loss));
    CHECK(std::fabs(loss - number(tokens, "val_loss")) > 1e-4);
    CHECK(number(batches, "tokens") == number(tokens, "tokens"));
    // in training: the logged validation loss is the same mean, and --resume keeps the setting
    train_ok("--init-from " + quote(dir) + " --steps 2 --stop-at 1 --lr 0 --train-data " + quote(dir + "/train.bin") +
             data + " --val-every 1 --val-mean batches --out " + quote(tmp + "/run"));
    train_ok("--resume " + quote(tmp + "/run"));
    std::vector<double> logged;
    for (const JsonValue& entry : read_jsonl(tmp + "/run/log.jsonl")) {
        if (entry.get("val_loss") != nullptr) logged.push_back(entry.get("val_loss")->number);
    }
    REQUIRE(logged.size() == 2);   // steps 1 (before the stop) and 2 (the end, after the resume)
    for (double v : logged) CHECK(std::fabs(v - loss) <= 1e-6 * std::fabs(loss));   // lr 0: the weights stay
    require_train_fails("--steps 0 --val-mean rows", "--val-mean must be tokens or batches, got 'rows'");
}

// What the shards hold must be what the run reads them as: prepare.py's meta.json beside them says
// (rows and pad_id for one document per row), and a run that reads them otherwise is refused.
TEST_CASE("--pad-id: the meta.json beside the shards must agree, and bad values are refused", "[cli][rows]") {
    std::string tmp = make_temp_dir(), rows_dir = fixture_dir("mix_rows");
    const std::string model = " --init-from " + quote(rows_dir) + " --batch 3 --seq-len 24 --steps 1";
    REQUIRE(system(("cp " + quote(rows_dir + "/train.bin") + " " + quote(tmp + "/train_000000.bin")).c_str()) == 0);
    const std::string data = " --train-data " + quote(tmp + "/train_*.bin");
    write_file(tmp + "/meta.json", "{\"vocab_size\": 97, \"rows\": 24, \"pad_id\": 0}\n");
    require_train_fails(model + data, "--train-data: '" + tmp + "/meta.json' says the shards hold one document per row of "
                                      "24 tokens padded with token 0: give --pad-id 0 (and --seq-len 24)");
    require_train_fails(model + data + " --pad-id 5", "--train-data: --pad-id 5, but '" + tmp + "/meta.json' says the "
                                                      "shards are padded with token 0");
    require_train_fails("--init-from " + quote(rows_dir) + " --batch 3 --seq-len 12 --steps 1 --pad-id 0" + data,
                        "--train-data: the sequence length is 12, but '" + tmp + "/meta.json' says the shards hold rows "
                        "of 24 tokens (--seq-len 24)");
    require_train_fails(model + " --eval-only --val-data " + quote(tmp + "/train_000000.bin"), "--val-data: '" + tmp +
                        "/meta.json' says the shards hold one document per row");
    train_ok(model + data + " --pad-id 0");
    // a stream's meta.json: --pad-id would read it wrong
    write_file(tmp + "/meta.json", "{\"vocab_size\": 97, \"tokens\": {\"train\": 432}}\n");
    require_train_fails(model + data + " --pad-id 0", "--train-data: '" + tmp + "/meta.json' says the shards are a "
                                                      "stream of documents, but --pad-id reads one document per row");
    train_ok(model + data);
    write_file(tmp + "/meta.json", "{\"rows\": ");
    require_train_fails(model + data, "--train-data: cannot read '" + tmp + "/meta.json' beside the shards");
    for (const char* rows : {"1e300", "24.5", "0", "-24"}) {
        write_file(tmp + "/meta.json", std::string("{\"rows\": ") + rows + ", \"pad_id\": 0}");
        require_train_fails(model + data + " --pad-id 0",
                            "--train-data: '" + tmp + "/meta.json' has a \"rows\" that is not a positive integer");
    }
    // the values themselves
    require_train_fails("--steps 0 --pad-id -2", "--pad-id must be a token id (at least 0), got -2");
    require_train_fails(model + " --train-data " + quote(rows_dir + "/train.bin") + " --pad-id 97",
                        "--pad-id 97 is outside the vocabulary [0, 97)");
    // a shard of rows of another length, without a meta.json, fails in the loader
    require_train_fails("--init-from " + quote(rows_dir) + " --batch 3 --seq-len 20 --steps 1 --pad-id 0 --train-data " +
                        quote(rows_dir + "/train.bin"), "432 tokens are not whole rows of T = 20 tokens");
    // a saved run keeps its setting: resumed, it reads rows; told otherwise, it refuses
    train_ok(model + " --steps 2 --stop-at 1 --pad-id 0 --train-data " + quote(rows_dir + "/train.bin") + " --out " +
             quote(tmp + "/run"));
    require_train_fails("--resume " + quote(tmp + "/run") + " --pad-id 3", "--pad-id 3 differs from the saved run's 0");
    train_ok("--resume " + quote(tmp + "/run"));
}

// ||ours - theirs|| / ||theirs|| over every weight of two checkpoints of the model in config_dir.
static double weights_relative_difference(const std::string& config_dir, const std::string& ours, const std::string& theirs) {
    ModelConfig config = checkpoint_read_config(config_dir);
    size_t n = num_parameters(config);
    std::vector<real> weights(n), reference(n);
    safetensors_load_named(weights.data(), config, ours + "/model.safetensors", "", false);
    safetensors_load_named(reference.data(), config, theirs + "/model.safetensors", "", false);
    double diff = 0, norm = 0;
    for (size_t i = 0; i < n; i++) {
        diff += ((double)weights[i] - reference[i]) * ((double)weights[i] - reference[i]);
        norm += (double)reference[i] * reference[i];
    }
    return std::sqrt(diff / norm);   // (CHECK(... < bound) prints the value)
}

// HybridNorm's AdamW setting (betas 0.9/0.95) with a first beta and an eps of our own, so that each
// flag changes the run: the reference's train subcommand and ./train, from the same checkpoint.
TEST_CASE("AdamW with --beta1 --beta2 --adam-eps: train follows the PyTorch reference with the same settings", "[cli]") {
    std::string dir = fixture_dir("mix");
    std::string tmp = make_temp_dir();
    const std::string data = "--batch 3 --seq-len 24 --steps 8 --lr 0.01 --warmup 2 --weight-decay 0.1";
    const std::string adam = "--beta1 0.8 --beta2 0.95 --adam-eps 1e-6";
    train_ok("--init-from " + quote(dir) + " --train-data " + quote(dir + "/train.bin") + " " + data + " " + adam +
             " --out " + quote(tmp + "/ours"));
    train_ok("--init-from " + quote(dir) + " --train-data " + quote(dir + "/train.bin") + " " + data +
             " --out " + quote(tmp + "/defaults"));
    reference_ok("train --ckpt " + quote(dir) + " --data " + quote(dir + "/train.bin") + " " + data + " " + adam +
                 " --out " + quote(tmp + "/theirs"));
    std::vector<JsonValue> ours = read_jsonl(tmp + "/ours/log.jsonl"), theirs = read_jsonl(tmp + "/theirs/log.jsonl"),
                           defaults = read_jsonl(tmp + "/defaults/log.jsonl");
    REQUIRE(ours.size() == 8);
    REQUIRE(theirs.size() == 8);
    REQUIRE(defaults.size() == 8);
    double largest_change = 0;
    for (int s = 0; s < 8; s++) {
        double loss = number(ours[s], "train_loss"), reference_loss = number(theirs[s], "train_loss");
        INFO("step " << s);
        CAPTURE(loss, reference_loss, number(defaults[s], "train_loss"));
        // the 10-step test's bound: 1e-5 relative, plus the log's 6 decimals
        CHECK(std::fabs(loss - reference_loss) <= 1e-5 * std::fabs(reference_loss) + 1e-6);
        largest_change = std::max(largest_change, std::fabs(number(defaults[s], "train_loss") - reference_loss));
    }
    // the flags took effect: with the default betas the losses part from these by far more than the bound
    CHECK(largest_change > 1e-3);
    // and the weights after the run: the 10-step test's per-tensor bound, over all weights
    CHECK(weights_relative_difference(dir, tmp + "/ours", tmp + "/theirs") < 5e-6);
}

// --weight-decay-on matrices (the default) and all against the reference's train with the same
// setting: the losses and the weights after. The two differ where they should: the norms' weights
// and biases (a LayerNorm fixture has both) end at other values.
TEST_CASE("--weight-decay-on matrices and all: train follows the PyTorch reference with each", "[cli][decay]") {
    std::string dir = fixture_dir("zoo");
    std::string tmp = make_temp_dir();
    const std::string data = "--batch 3 --seq-len 24 --steps 8 --lr 0.01 --warmup 2 --weight-decay 0.5";
    for (const char* scope : {"matrices", "all"}) {
        INFO(scope);
        const std::string flags = data + " --weight-decay-on " + scope;
        train_ok("--init-from " + quote(dir) + " --train-data " + quote(dir + "/train.bin") + " " + flags + " --out " +
                 quote(tmp + "/ours_" + scope));
        reference_ok("train --ckpt " + quote(dir) + " --data " + quote(dir + "/train.bin") + " " + flags + " --out " +
                     quote(tmp + "/theirs_" + scope));
        std::vector<JsonValue> ours = read_jsonl(tmp + "/ours_" + scope + "/log.jsonl"),
                               theirs = read_jsonl(tmp + "/theirs_" + scope + "/log.jsonl");
        REQUIRE(ours.size() == 8);
        REQUIRE(theirs.size() == 8);
        for (int s = 0; s < 8; s++) {
            double loss = number(ours[s], "train_loss"), reference_loss = number(theirs[s], "train_loss");
            INFO("step " << s);
            CHECK(std::fabs(loss - reference_loss) <= 1e-5 * std::fabs(reference_loss) + 1e-6);
        }
        CHECK(weights_relative_difference(dir, tmp + "/ours_" + scope, tmp + "/theirs_" + scope) < 5e-6);
    }
    // the norms' weights and biases: decayed under all only; each tensor's largest difference
    // between the two runs was 3.7e-3 (a bias) to 2.6e-2 (a weight), measured 2026-11-30
    ModelConfig config = checkpoint_read_config(dir);
    std::vector<real> matrices(num_parameters(config)), all(num_parameters(config));
    safetensors_load_named(matrices.data(), config, tmp + "/ours_matrices/model.safetensors", "", false);
    safetensors_load_named(all.data(), config, tmp + "/ours_all/model.safetensors", "", false);
    for (const NamedTensor& t : model_named_tensors(config)) {
        if (t.shape.size() != 1) continue;
        double largest = 0;
        for (size_t i = t.offset; i < t.offset + (size_t)t.shape[0]; i++) largest = std::max(largest, std::fabs((double)matrices[i] - all[i]));
        INFO(t.name);
        CHECK(largest > 1e-3);
    }
    require_train_fails("--steps 0 --weight-decay-on norms", "--weight-decay-on must be matrices or all, got 'norms'");
}

// Each schedule besides the cosine (which the 10-step test covers), with a warmup, against the
// reference's train: the lr of every step, the losses and the weights after. wsd and wsd-sqrt at
// --decay-frac 0.3 of 10 steps decay over the last 3.
TEST_CASE("--lr-schedule linear, constant, wsd and wsd-sqrt: train follows the PyTorch reference's schedule", "[cli][schedule]") {
    std::string dir = fixture_dir("mix");
    const std::string data = "--batch 3 --seq-len 24 --steps 10 --lr 0.01 --warmup 2 --min-lr-ratio 0.2";
    for (const std::string schedule : {"linear", "constant", "wsd", "wsd-sqrt"}) {
        INFO("--lr-schedule " << schedule);
        std::string tmp = make_temp_dir();
        std::string flags = "--lr-schedule " + schedule + (schedule.rfind("wsd", 0) == 0 ? " --decay-frac 0.3" : "");
        train_ok("--init-from " + quote(dir) + " --train-data " + quote(dir + "/train.bin") + " " + data + " " + flags +
                 " --out " + quote(tmp + "/ours"));
        reference_ok("train --ckpt " + quote(dir) + " --data " + quote(dir + "/train.bin") + " " + data + " " + flags +
                     " --out " + quote(tmp + "/theirs"));
        std::vector<JsonValue> ours = read_jsonl(tmp + "/ours/log.jsonl"), theirs = read_jsonl(tmp + "/theirs/log.jsonl");
        REQUIRE(ours.size() == 10);
        REQUIRE(theirs.size() == 10);
        for (int s = 0; s < 10; s++) {
            INFO("step " << s);
            double lr = number(ours[s], "lr"), reference_lr = number(theirs[s], "lr");
            double loss = number(ours[s], "train_loss"), reference_loss = number(theirs[s], "train_loss");
            CAPTURE(lr, reference_lr, loss, reference_loss);
            // the log's lr is a float printed to 6 significant digits
            CHECK(std::fabs(lr - reference_lr) <= 1e-6 * reference_lr + 1e-12);
            CHECK(std::fabs(loss - reference_loss) <= 1e-5 * std::fabs(reference_loss) + 1e-6);
        }
        // the shape itself, beyond agreeing: the peak after the warmup, then per schedule
        CHECK(number(ours[0], "lr") == 0.0);
        CHECK(number(ours[2], "lr") == Approx(0.01));
        if (schedule == "constant") CHECK(number(ours[9], "lr") == Approx(0.01));
        if (schedule == "linear") CHECK(number(ours[9], "lr") == Approx(0.01 * (0.2 + 0.8 / 8)));
        if (schedule == "wsd") {
            CHECK(number(ours[6], "lr") == Approx(0.01));   // the stable phase ends at step 10 - 3
            CHECK(number(ours[7], "lr") == Approx(0.01));   // the decay's first step, progress 0
            CHECK(number(ours[8], "lr") == Approx(0.01 * (0.2 + 0.8 * 2 / 3)));
            CHECK(number(ours[9], "lr") == Approx(0.01 * (0.2 + 0.8 / 3)));
        }
        if (schedule == "wsd-sqrt") {
            CHECK(number(ours[7], "lr") == Approx(0.01));
            CHECK(number(ours[8], "lr") == Approx(0.01 * (0.2 + 0.8 * (1 - std::sqrt(1.0 / 3)))));
            CHECK(number(ours[9], "lr") == Approx(0.01 * (0.2 + 0.8 * (1 - std::sqrt(2.0 / 3)))));
        }
        CHECK(weights_relative_difference(dir, tmp + "/ours", tmp + "/theirs") < 5e-6);
    }
}

TEST_CASE("a checkpoint written by train loads into the PyTorch reference with the same loss", "[cli]") {
    std::string tmp = make_temp_dir();
    std::string ckpt = tmp + "/ckpt";
    // 3 layers with alpha 0.34: floor(0.34*3) = 1 Post-LN layer, then 2 Pre-LN ones
    train_ok("--steps 0 --out " + quote(ckpt) +
             " --layers 3 --dim 32 --heads 4 --ffn 72 --vocab 61 --seq-len 16 --norm mix --alpha 0.34 --seed 7");
    std::string shard = tmp + "/val.bin";
    write_shard(shard, random_tokens(SHARD_TOKENS, SMALL_VOCAB, 1));
    require_evals_agree(ckpt, shard);

    JsonValue config = parse_json(read_file(ckpt + "/config.json"));
    CHECK(number(config, "post_ln_layers") == 1);
    CHECK(number(config, "num_hidden_layers") == 3);
    // a layer's norms are named after where they sit (model.h, model_named_tensors)
    CheckpointTensors tensors(ckpt);
    CHECK(tensors.has("model.layers.0.post_attention_layernorm.weight"));    // Post-LN: after attention
    CHECK(tensors.has("model.layers.0.post_feedforward_layernorm.weight"));  // Post-LN: after the MLP
    CHECK(!tensors.has("model.layers.0.input_layernorm.weight"));
    CHECK(tensors.has("model.layers.1.input_layernorm.weight"));             // Pre-LN: before attention
    CHECK(tensors.has("model.layers.1.post_attention_layernorm.weight"));    // Pre-LN: before the MLP
    CHECK(!tensors.has("model.layers.1.post_feedforward_layernorm.weight"));
}

TEST_CASE("a checkpoint written by the PyTorch reference loads into train", "[cli]") {
    std::string tmp = make_temp_dir();
    std::string ckpt = tmp + "/ckpt";
    // pure Post-LN: alpha 1 makes both layers Post-LN
    std::string shard = tmp + "/val.bin";
    write_shard(shard, random_tokens(SHARD_TOKENS, SMALL_VOCAB, 2));
    require_reference_checkpoint_agrees(ckpt, 2, "--alpha 1 --seed 11", shard);
    // and train reads the placement from config.json, which --norm post agrees with
    Run r = train_ok("--steps 0 --norm post --init-from " + quote(ckpt));
    CHECK(r.out.find("post x2, rmsnorm") != std::string::npos);
}

// ---- the files --out writes

TEST_CASE("--steps 0 --out writes the freshly initialised model", "[cli]") {
    std::string tmp = make_temp_dir();
    write_small_checkpoint(tmp + "/a", "--seed 5");
    CHECK(file_exists(tmp + "/a/config.json"));
    CHECK(file_exists(tmp + "/a/model.safetensors"));

    // it loads back and evaluates; an embedding of std 0.02 gives nearly uniform predictions, so
    // the loss is close to ln(V) = ln(61) = 4.11 (measured 4.12; 0.1 leaves room for other seeds)
    std::string shard = tmp + "/val.bin";
    write_shard(shard, random_tokens(SHARD_TOKENS, SMALL_VOCAB, 3));
    JsonValue eval = last_line_json(
        train_ok("--eval-only --init-from " + quote(tmp + "/a") + " --val-data " + quote(shard) + " " + SMALL_BATCH).out);
    CHECK(std::fabs(number(eval, "val_loss") - std::log(61.0)) < 0.1);

    // loading and writing again changes nothing
    train_ok("--steps 0 --init-from " + quote(tmp + "/a") + " --out " + quote(tmp + "/copy"));
    CHECK(read_file(tmp + "/copy/model.safetensors") == read_file(tmp + "/a/model.safetensors"));

    // the seed alone decides the weights
    write_small_checkpoint(tmp + "/b", "--seed 5");
    write_small_checkpoint(tmp + "/c", "--seed 6");
    std::string a = read_file(tmp + "/a/model.safetensors");
    CHECK(a == read_file(tmp + "/b/model.safetensors"));
    std::string c = read_file(tmp + "/c/model.safetensors");
    CHECK(a.size() == c.size());
    CHECK(a != c);
}

TEST_CASE("log.jsonl has one object per step with step, train_loss, lr, grad_norm and a val_loss object when validation runs", "[cli]") {
    std::string tmp = make_temp_dir();
    write_shard(tmp + "/train.bin", random_tokens(SHARD_TOKENS, SMALL_VOCAB, 4));
    write_shard(tmp + "/val.bin", random_tokens(SHARD_TOKENS, SMALL_VOCAB, 5));
    train_ok("--steps 5 --val-every 2 --train-data " + quote(tmp + "/train.bin") + " --val-data " +
             quote(tmp + "/val.bin") + " --out " + quote(tmp + "/run") + " " + SMALL_MODEL + " " + SMALL_BATCH);
    std::vector<JsonValue> rows = read_jsonl(tmp + "/run/log.jsonl");
    // 5 training steps (rows 0..4); validation after steps 2 and 4 (--val-every 2) and at the end, 5
    const struct { bool val; int step; } expected[] = {
        {false, 0}, {false, 1}, {true, 2}, {false, 2}, {false, 3}, {true, 4}, {false, 4}, {true, 5},
    };
    REQUIRE(rows.size() == sizeof(expected) / sizeof(expected[0]));
    for (size_t i = 0; i < rows.size(); i++) {
        INFO("log row " << i);
        CHECK(number(rows[i], "step") == expected[i].step);
        if (expected[i].val) {
            CHECK(number(rows[i], "val_loss") > 0);
            CHECK(number(rows[i], "tokens") == 6 * 2 * 16);   // every whole 2x16 window of the shard
            CHECK(rows[i].get("train_loss") == nullptr);
        } else {
            CHECK(number(rows[i], "train_loss") > 0);
            CHECK(number(rows[i], "lr") > 0);   // no warmup, so even step 0 has a learning rate
            CHECK(number(rows[i], "grad_norm") > 0);
            CHECK(rows[i].get("val_loss") == nullptr);
        }
    }
}

TEST_CASE("--help lists every flag with its default", "[cli]") {
    Run r = train_ok("--help");
    const char* flags[] = {
        "--model", "--layers", "--dim", "--heads", "--ffn", "--vocab", "--seq-len", "--norm", "--alpha",
        "--train-data", "--data-order", "--data-seed", "--pad-id", "--val-data", "--val-batches", "--val-every", "--val-mean",
        "--batch", "--steps",
        "--lr", "--warmup",
        "--min-lr-ratio", "--lr-schedule", "--decay-frac", "--weight-decay", "--weight-decay-on", "--beta1", "--beta2",
        "--adam-eps", "--grad-clip", "--seed", "--device", "--attention", "--rope", "--precision",
        "--init-from", "--out", "--eval-only", "--embed-std", "--checkpoint-every", "--keep-every", "--keep-what", "--stop-at",
        "--stop-id",
        "--resume",
    };
    for (const char* flag : flags) {
        INFO("flag " << flag);
        CHECK(r.out.find(std::string("  ") + flag + " ") != std::string::npos);
    }
    // a few defaults, as Args in train.cu sets them, on their flag's line
    const char* defaults[][2] = {
        {"--model", "(default tiny)"}, {"--norm", "(default mix)"}, {"--alpha", "(default 0.25)"},
        {"--batch", "(default 8)"}, {"--steps", "(default 100)"}, {"--lr", "(default 0.001)"},
        {"--seed", "(default 1337)"}, {"--device", "(default auto"}, {"--precision", "(default fp32"},
        {"--beta1", "(default 0.9)"}, {"--beta2", "(default 0.999)"}, {"--adam-eps", "(default 1e-08)"},
        {"--lr-schedule", "(default cosine)"}, {"--decay-frac", "(default 0.2)"}, {"--data-seed", "(default 1)"},
        {"--weight-decay-on", "(default matrices)"}, {"--keep-what", "(default full)"},
    };
    std::stringstream in(r.out);
    std::string line;
    std::vector<std::string> lines;
    while (std::getline(in, line)) lines.push_back(line);
    for (const auto& d : defaults) {
        INFO("flag " << d[0] << " should say " << d[1]);
        bool found = false;
        for (const std::string& l : lines) {
            if (l.rfind(std::string("  ") + d[0] + " ", 0) == 0) found = l.find(d[1]) != std::string::npos;
        }
        CHECK(found);
    }
}

// ---- bad input: exit status 1 and a message naming the problem

TEST_CASE("a missing train data file is refused", "[cli]") {
    std::string tmp = make_temp_dir();
    require_train_fails("--steps 1 --train-data " + quote(tmp + "/missing_*.bin") + " " + SMALL_MODEL,
                        "no files match");
}

TEST_CASE("a directory matched by the train data pattern is refused as unreadable", "[cli]") {
    std::string tmp = make_temp_dir();
    REQUIRE(mkdir((tmp + "/shard_0.bin").c_str(), 0755) == 0);
    require_train_fails("--steps 1 --train-data " + quote(tmp + "/shard_*.bin") + " " + SMALL_MODEL,
                        "Is a directory");
}

TEST_CASE("a broken symlink as train data is refused as unreadable", "[cli]") {
    // tests run as root, where chmod 000 does not stop a read; a dangling link does
    std::string tmp = make_temp_dir();
    REQUIRE(symlink((tmp + "/nowhere.bin").c_str(), (tmp + "/shard.bin").c_str()) == 0);
    require_train_fails("--steps 1 --train-data " + quote(tmp + "/shard.bin") + " " + SMALL_MODEL, "cannot open");
}

TEST_CASE("a shard with the wrong magic number is refused", "[cli]") {
    std::string tmp = make_temp_dir();
    write_shard(tmp + "/train.bin", random_tokens(SHARD_TOKENS, SMALL_VOCAB, 6), 12345);
    require_train_fails("--steps 1 --train-data " + quote(tmp + "/train.bin") + " " + SMALL_MODEL + " " + SMALL_BATCH,
                        "bad magic number 12345");
}

TEST_CASE("a shard with the wrong version is refused", "[cli]") {
    std::string tmp = make_temp_dir();
    // version 7 belongs to the uint32 magic, not the uint16 one
    write_shard(tmp + "/train.bin", random_tokens(SHARD_TOKENS, SMALL_VOCAB, 6), 20240520, 7);
    require_train_fails("--steps 1 --train-data " + quote(tmp + "/train.bin") + " " + SMALL_MODEL + " " + SMALL_BATCH,
                        "expects version 1, but the header says version 7");
}

TEST_CASE("a shard shorter than its header says is refused", "[cli]") {
    std::string tmp = make_temp_dir();
    write_shard(tmp + "/train.bin", random_tokens(SHARD_TOKENS, SMALL_VOCAB, 6), 20240520, 1, SHARD_TOKENS + 10);
    require_train_fails("--steps 1 --train-data " + quote(tmp + "/train.bin") + " " + SMALL_MODEL + " " + SMALL_BATCH,
                        "truncated: header says 210 tokens");
}

TEST_CASE("a shard with fewer than B*T+1 tokens is refused", "[cli]") {
    std::string tmp = make_temp_dir();
    write_shard(tmp + "/train.bin", random_tokens(32, SMALL_VOCAB, 6));   // 2x16 needs 33
    require_train_fails("--steps 1 --train-data " + quote(tmp + "/train.bin") + " " + SMALL_MODEL + " " + SMALL_BATCH,
                        "fewer than the B*T+1 = 33");
}

TEST_CASE("a token id not below the vocabulary size is refused", "[cli]") {
    std::string tmp = make_temp_dir();
    std::vector<uint16_t> tokens = random_tokens(SHARD_TOKENS, SMALL_VOCAB, 6);
    tokens[10] = SMALL_VOCAB;   // in the first window, so step 0 reads it
    write_shard(tmp + "/train.bin", tokens);
    require_train_fails("--steps 1 --train-data " + quote(tmp + "/train.bin") + " " + SMALL_MODEL + " " + SMALL_BATCH,
                        "token at position 10 is 61, not below vocab_size 61");
}

TEST_CASE("a heads count that does not divide the width is refused", "[cli]") {
    require_train_fails("--steps 0 --dim 30 --heads 4", "does not divide the width");
}

TEST_CASE("a model size or sequence length below 1 is refused, not taken as the preset's", "[cli]") {
    for (const char* flag : {"--layers", "--dim", "--heads", "--ffn", "--vocab", "--seq-len"}) {
        require_train_fails(std::string("--steps 0 ") + flag + " 0", std::string(flag) + " must be at least 1, got 0");
        require_train_fails(std::string("--steps 0 ") + flag + " -2", std::string(flag) + " must be at least 1, got -2");
    }
}

// Each of its buffers alone would be refused by malloc too, but with another message: this one
// names the total, its parts and what the machine has. (A model whose buffers are each within
// Linux's overcommit but together past the memory was killed while its weights were drawn.)
TEST_CASE("a model larger than the machine's memory is refused before anything is allocated", "[cli]") {
    require_train_fails("--steps 0 --layers 1000 --dim 8192 --heads 64 --ffn 22016",
                        "GiB of host memory (parameters, gradients and AdamW state ");
    require_train_fails("--steps 0 --layers 1000 --dim 8192 --heads 64 --ffn 22016", "but this machine has ");
}

TEST_CASE("alpha below 0 is refused", "[cli]") {
    require_train_fails("--steps 0 --alpha -0.1", "--alpha must be in [0, 1]");
}

TEST_CASE("alpha above 1 is refused", "[cli]") {
    require_train_fails("--steps 0 --alpha 1.5", "--alpha must be in [0, 1]");
}

TEST_CASE("a checkpoint whose shapes do not match the flags is refused", "[cli]") {
    std::string ckpt = make_temp_dir() + "/ckpt";
    write_small_checkpoint(ckpt);
    require_train_fails("--steps 0 --dim 48 --init-from " + quote(ckpt), "--dim 48, but its hidden_size is 32");
}

TEST_CASE("a checkpoint whose norm placement does not match the flags is refused", "[cli]") {
    std::string ckpt = make_temp_dir() + "/ckpt";
    // 4 layers at the default alpha 0.25: 1 Post-LN layer
    train_ok("--steps 0 --out " + quote(ckpt) + " --layers 4 --dim 32 --heads 4 --ffn 72 --vocab 61 --seq-len 16");
    require_train_fails("--steps 0 --norm pre --init-from " + quote(ckpt),
                        "they give the norm placement pre,pre,pre,pre, but its norm_layers is post,pre,pre,pre");
}

TEST_CASE("a truncated model.safetensors is refused", "[cli]") {
    std::string tmp = make_temp_dir();
    write_small_checkpoint(tmp + "/good");
    std::string weights = read_file(tmp + "/good/model.safetensors");
    REQUIRE(mkdir((tmp + "/cut").c_str(), 0755) == 0);
    write_file(tmp + "/cut/config.json", read_file(tmp + "/good/config.json"));
    write_file(tmp + "/cut/model.safetensors", weights.substr(0, weights.size() - 16));   // the last 4 floats
    require_train_fails("--steps 0 --init-from " + quote(tmp + "/cut"), "is truncated");
}

TEST_CASE("a corrupt config.json is refused", "[cli]") {
    std::string tmp = make_temp_dir();
    write_small_checkpoint(tmp + "/good");
    REQUIRE(mkdir((tmp + "/bad").c_str(), 0755) == 0);
    std::string config = read_file(tmp + "/good/config.json");
    write_file(tmp + "/bad/config.json", config.substr(0, config.size() / 2));   // cut mid-object
    write_file(tmp + "/bad/model.safetensors", read_file(tmp + "/good/model.safetensors"));
    require_train_fails("--steps 0 --init-from " + quote(tmp + "/bad"), "is not valid JSON");
}

// ---- damaged files, at random

// One seeded mutation of a file's bytes: a few bytes overwritten (with random values, or with the
// characters JSON is made of), a cut, a span deleted or doubled. header_bytes > 0 aims most
// changes at the first header_bytes (a safetensors file's length and JSON header, a shard's
// 1 KB header), where they reach the parsers rather than the values.
static std::string damage(const std::string& bytes, std::mt19937_64& gen, size_t header_bytes) {
    std::string out = bytes;
    auto below = [&](size_t n) { return n == 0 ? (size_t)0 : (size_t)(gen() % n); };
    auto position = [&]() {
        bool in_header = header_bytes > 0 && gen() % 5 != 0;
        return below(in_header ? std::min(header_bytes, out.size()) : out.size());
    };
    static const char json_chars[] = "{}[]\",:0123456789-.eE \\ntfu";
    switch (gen() % 5) {
    case 0:   // 1 to 4 bytes overwritten with random values
        for (int i = 0, n = 1 + (int)below(4); i < n && !out.empty(); i++) out[position()] = (char)(gen() & 0xFF);
        break;
    case 1:   // 1 to 4 bytes overwritten with JSON's characters
        for (int i = 0, n = 1 + (int)below(4); i < n && !out.empty(); i++)
            out[position()] = json_chars[below(sizeof(json_chars) - 1)];
        break;
    case 2:   // cut short
        out.resize(below(out.size()));
        break;
    case 3: {  // 1 to 16 bytes deleted
        size_t at = position();
        out.erase(at, std::min(out.size() - at, 1 + below(16)));
        break;
    }
    default: {  // 1 to 16 bytes doubled
        size_t at = position();
        out.insert(at, out.substr(at, 1 + below(16)));
        break;
    }
    }
    return out;
}

// A safetensors file's header: its 8-byte length, then that many bytes of JSON.
static size_t safetensors_header_bytes(const std::string& bytes) {
    uint64_t n = 0;
    REQUIRE(bytes.size() >= 8);
    memcpy(&n, bytes.data(), 8);
    return 8 + (size_t)n;
}

// Whatever the damage, train ends well: success, or exit status 1 with a message; never a crash,
// a hang (the time limit), or a report from the sanitizers (make sanitize runs this test against
// a train built with AddressSanitizer and UBSan, which see the reads a parser is led into).
static void require_clean_outcome(const Run& r, const std::string& what) {
    INFO(what << "\nexit status " << r.exit_status << "\nstdout:\n" << r.out << "\nstderr:\n" << r.err);
    CHECK(r.err.find("Sanitizer") == std::string::npos);
    CHECK(r.err.find("runtime error:") == std::string::npos);
    REQUIRE((r.exit_status == 0 || r.exit_status == 1));
    if (r.exit_status == 1) REQUIRE(r.err.find("error: ") != std::string::npos);
}

// Each round damages one file and runs train on it: a checkpoint's config.json or
// model.safetensors (--init-from, which reads both), a stopped run's training_state.safetensors or
// log.jsonl (--resume, for at most 2 more steps), or the training shard (2 steps on it). 60 rounds
// per file, seeded: the same damage every run.
TEST_CASE("randomly damaged checkpoints, training states, logs and shards end in success or a clear error", "[cli][damage]") {
    std::string tmp = make_temp_dir();
    std::string shard = tmp + "/train.bin";
    write_shard(shard, random_tokens(SHARD_TOKENS, SMALL_VOCAB, 5));
    const std::string data = SMALL_BATCH + " --train-data " + quote(shard);
    train_ok("--steps 6 --lr 0.003 --warmup 2 " + SMALL_MODEL + " " + data + " --stop-at 4 --out " + quote(tmp + "/run"));
    const std::string train = "timeout 60 " + quote(env_or("MIXLN_TRAIN", "./train")) + " --device cpu ";
    const std::string copy = tmp + "/damaged";
    struct Target {
        const char* file;
        std::string command;
    };
    const Target targets[] = {
        {"config.json", train + "--init-from " + quote(copy) + " --steps 2 " + data},
        {"model.safetensors", train + "--init-from " + quote(copy) + " --steps 2 " + data},
        {"training_state.safetensors", train + "--resume " + quote(copy) + " --stop-at 6"},
        {"log.jsonl", train + "--resume " + quote(copy) + " --stop-at 6"},
    };
    std::mt19937_64 gen(20261201);
    std::map<std::string, int> refused, ran;
    for (const Target& target : targets) {
        std::string original = read_file(tmp + "/run/" + target.file);
        size_t header = std::string(target.file).find(".safetensors") != std::string::npos ? safetensors_header_bytes(original) : 0;
        for (int round = 0; round < 60; round++) {
            REQUIRE(run_command("rm -rf " + quote(copy) + " && cp -r " + quote(tmp + "/run") + " " + quote(copy)).exit_status == 0);
            write_file(copy + "/" + target.file, damage(original, gen, header));
            Run r = run_split(target.command);
            require_clean_outcome(r, std::string(target.file) + ", round " + std::to_string(round));
            (r.exit_status == 0 ? ran : refused)[target.file]++;
        }
    }
    std::string shard_bytes = read_file(shard);
    for (int round = 0; round < 60; round++) {
        write_file(tmp + "/damaged.bin", damage(shard_bytes, gen, 256 * sizeof(int32_t)));
        Run r = run_split(train + "--steps 2 " + SMALL_MODEL + " " + SMALL_BATCH + " --train-data " + quote(tmp + "/damaged.bin"));
        require_clean_outcome(r, "train.bin, round " + std::to_string(round));
        (r.exit_status == 0 ? ran : refused)["train.bin"]++;
    }
    for (const char* file : {"config.json", "model.safetensors", "training_state.safetensors", "log.jsonl", "train.bin"})
        WARN(file << ": " << refused[file] << " damaged copies refused with a message, " << ran[file] << " ran");
    // the damage reaches the checks: the files with checksums or strict parsers refuse most rounds
    // (a changed weight or token is harmless; a damaged log line is dropped, as a torn one is)
    CHECK(refused["config.json"] >= 30);
    CHECK(refused["model.safetensors"] >= 30);
    CHECK(refused["training_state.safetensors"] >= 50);
    CHECK(refused["train.bin"] >= 30);
}

// What the engine does not implement is refused, as dev/reference.py refuses it, rather than
// loaded as if it were not there.
TEST_CASE("a config.json asking for biases or tied embeddings is refused", "[cli]") {
    std::string tmp = make_temp_dir();
    write_small_checkpoint(tmp + "/good");
    const std::string config = read_file(tmp + "/good/config.json");
    const std::string weights = read_file(tmp + "/good/model.safetensors");
    struct Case {
        const char* from;
        const char* to;
        const char* expected;
    };
    const Case cases[] = {
        {"\"attention_bias\": false", "\"attention_bias\": true", "biases in the attention projections are not supported"},
        {"\"mlp_bias\": false", "\"mlp_bias\": true", "biases in the MLP projections are not supported"},
        {"\"tie_word_embeddings\": false", "\"tie_word_embeddings\": true", "tied embeddings are not supported"},
        {"\"mlp_bias\": false", "\"mlp_bias\": \"false\"", "\"mlp_bias\" must be true or false"},
        // sizes that are not integers, or beyond int's range, never reach a cast to int
        {"\"num_key_value_heads\": ", "\"num_key_value_heads\": 0.5, \"x\": ", "\"num_key_value_heads\" must be an integer"},
        {"\"num_key_value_heads\": ", "\"num_key_value_heads\": 3e9, \"x\": ", "\"num_key_value_heads\" must be an integer"},
    };
    int n = 0;
    for (const Case& c : cases) {
        size_t at = config.find(c.from);
        REQUIRE(at != std::string::npos);
        std::string dir = tmp + "/bad" + std::to_string(n++);
        REQUIRE(mkdir(dir.c_str(), 0755) == 0);
        write_file(dir + "/config.json", config.substr(0, at) + c.to + config.substr(at + strlen(c.from)));
        write_file(dir + "/model.safetensors", weights);
        require_train_fails("--steps 0 --init-from " + quote(dir), c.expected);
    }
}

TEST_CASE("an unknown flag is refused", "[cli]") {
    require_train_fails("--steps 0 --bogus 1", "unknown flag '--bogus'");
}

TEST_CASE("a flag missing its value is refused", "[cli]") {
    require_train_fails("--steps 0 --batch", "--batch needs a value");
}

TEST_CASE("a non-numeric --batch is refused", "[cli]") {
    require_train_fails("--steps 0 --batch eight", "--batch expects an integer, got 'eight'");
}

TEST_CASE("--device cuda is refused without a usable GPU", "[cli]") {
    // CI and the development machines have no GPU; an nvcc build says no GPU was found, a g++
    // build that it has no CUDA backend
    Run r = run_train("--steps 0 --device cuda");
    INFO(r.err);
    REQUIRE(r.exit_status == 1);
    REQUIRE((r.err.find("--device cuda: no usable GPU: ") != std::string::npos ||
             r.err.find("--device cuda: this build has no CUDA backend") != std::string::npos));
}

TEST_CASE("--device auto takes the GPU where one is usable, else the CPU, and says why", "[cli]") {
    Run r = run_train_as_given("--steps 0");
    INFO(r.out << r.err);
    REQUIRE(r.exit_status == 0);
    if (r.out.find("device: cuda, ") != std::string::npos) return;   // a machine with a usable GPU
    // CI and the development machines: the reason is printed (a g++ build; or no GPU, no driver,
    // or a GPU this build has no kernels for)
    REQUIRE(r.out.find("device: cpu, ") != std::string::npos);
    CHECK((r.out.find(" threads (a g++ build: no CUDA backend)\n") != std::string::npos ||
           r.out.find(" threads (no usable GPU: ") != std::string::npos));
}

TEST_CASE("--precision bf16 and bf16-pure are refused on the CPU, a bad precision anywhere", "[cli]") {
    require_train_fails("--steps 0 --device cpu --precision bf16", "--precision bf16 runs on the GPU only");
    require_train_fails("--steps 0 --device cpu --precision bf16-pure", "--precision bf16-pure runs on the GPU only");
    require_train_fails("--steps 0 --precision fp16", "--precision must be fp32, bf16 or bf16-pure, got 'fp16'");
}

TEST_CASE("a failed run leaves an existing checkpoint intact", "[cli]") {
    std::string tmp = make_temp_dir();
    std::string ckpt = tmp + "/ckpt";
    write_small_checkpoint(ckpt);
    std::string weights = read_file(ckpt + "/model.safetensors");
    std::string config = read_file(ckpt + "/config.json");
    // a bad token in the second window only: step 0 trains, then step 1 fails, with the weights
    // in memory already changed
    std::vector<uint16_t> tokens = random_tokens(SHARD_TOKENS, SMALL_VOCAB, 7);
    tokens[2 * 16 + 5] = SMALL_VOCAB;   // window 1 starts at B*T = 32; window 0 ends at token 32
    write_shard(tmp + "/train.bin", tokens);
    require_train_fails("--steps 3 --init-from " + quote(ckpt) + " --out " + quote(ckpt) + " --train-data " +
                            quote(tmp + "/train.bin") + " " + SMALL_BATCH,
                        "not below vocab_size 61");
    CHECK(read_file(ckpt + "/model.safetensors") == weights);
    CHECK(read_file(ckpt + "/config.json") == config);
}

// A full disk, played by a file size limit of 1 KiB (with SIGXFSZ ignored, a write past it fails
// with EFBIG): the log reaches it after some 8 steps of 30, and the run stops there, naming the
// log, rather than training on with its lines lost (and failing only at the checkpoint).
TEST_CASE("a log that cannot be written stops the run, naming the file", "[cli]") {
    std::string tmp = make_temp_dir();
    write_shard(tmp + "/train.bin", random_tokens(SHARD_TOKENS, SMALL_VOCAB, 3));
    std::string train = quote(env_or("MIXLN_TRAIN", "./train"));
    Run r = run_split("trap '' XFSZ; ulimit -f 1; " + train + " --device cpu --steps 30 " + SMALL_MODEL + " " +
                      SMALL_BATCH + " --train-data " + quote(tmp + "/train.bin") + " --out " + quote(tmp + "/run"));
    INFO(r.out << r.err);
    CHECK(r.exit_status == 1);
    CHECK(r.err.find("cannot write '" + tmp + "/run/log.jsonl'") != std::string::npos);
    CHECK(r.out.find("step 30/30") == std::string::npos);
}

// The lock is an flock on the folder: this test holds it as another run would.
TEST_CASE("a second run writing into a folder that a run is writing into is refused", "[cli]") {
    std::string tmp = make_temp_dir();
    write_shard(tmp + "/train.bin", random_tokens(SHARD_TOKENS, SMALL_VOCAB, 5));
    const std::string args = "--steps 2 " + SMALL_MODEL + " " + SMALL_BATCH + " --train-data " + quote(tmp + "/train.bin") +
                             " --out " + quote(tmp + "/run");
    train_ok(args);
    const std::string weights = read_file(tmp + "/run/model.safetensors"), log = read_file(tmp + "/run/log.jsonl");
    int fd = open((tmp + "/run").c_str(), O_RDONLY | O_DIRECTORY);
    REQUIRE(fd >= 0);
    REQUIRE(flock(fd, LOCK_EX | LOCK_NB) == 0);
    require_train_fails(args, "'" + tmp + "/run' is in use by another run writing into it");
    CHECK(read_file(tmp + "/run/model.safetensors") == weights);   // nothing of the first run touched
    CHECK(read_file(tmp + "/run/log.jsonl") == log);
    close(fd);   // the first run ends: the folder is free again
    train_ok(args);
}

TEST_CASE("--grad-accum below 1 is refused", "[cli]") {
    require_train_fails("--steps 0 --grad-accum 0", "--grad-accum must be at least 1, got 0");
}

// ---- checkpoints with training state, and --resume

// The fixture "mix" run (its checkpoint, data and settings) for 20 steps, with extra flags.
static std::string mix_run_args(int steps) {
    std::string dir = fixture_dir("mix");
    return "--init-from " + quote(dir) + " --train-data " + quote(dir + "/train.bin") +
           " --batch 3 --seq-len 24 --lr 0.01 --warmup 3 --grad-clip 0.5 --steps " + std::to_string(steps);
}

static std::vector<std::string> train_loss_lines(const std::string& log_path) {
    std::vector<std::string> lines;
    std::stringstream text(read_file(log_path));
    std::string line;
    while (std::getline(text, line)) {
        // the timing fields differ between runs; the rest must not
        if (line.find("\"train_loss\"") != std::string::npos) lines.push_back(line.substr(0, line.find(", \"ms\"")));
    }
    return lines;
}

TEST_CASE("10 steps, then --resume for 10 more, is bitwise identical to 20 steps straight", "[cli][resume]") {
    std::string tmp = make_temp_dir();
    train_ok(mix_run_args(20) + " --out " + quote(tmp + "/straight"));
    Run stopped = train_ok(mix_run_args(20) + " --out " + quote(tmp + "/resumed") + " --stop-at 10");
    CHECK(stopped.out.find("checkpoint written to " + tmp + "/resumed (step 10)") != std::string::npos);
    CHECK(train_loss_lines(tmp + "/resumed/log.jsonl").size() == 10);
    Run resumed = train_ok("--resume " + quote(tmp + "/resumed"));
    CHECK(resumed.out.find("at step 10 of 20") != std::string::npos);
    CHECK(read_file(tmp + "/straight/model.safetensors") == read_file(tmp + "/resumed/model.safetensors"));
    CHECK(read_file(tmp + "/straight/training_state.safetensors") == read_file(tmp + "/resumed/training_state.safetensors"));
    CHECK(train_loss_lines(tmp + "/straight/log.jsonl") == train_loss_lines(tmp + "/resumed/log.jsonl"));
}

TEST_CASE("--resume leaves out a damaged log's lines that are not entries, with a warning that counts them", "[cli][resume]") {
    std::string tmp = make_temp_dir();
    train_ok(mix_run_args(6) + " --out " + quote(tmp + "/run") + " --stop-at 4");
    std::string log = read_file(tmp + "/run/log.jsonl");
    size_t first_line_end = log.find('\n') + 1;
    write_file(tmp + "/run/log.jsonl", log.substr(0, first_line_end) + "not json\n{\"step\": 1e300}\n" + log.substr(first_line_end));
    Run r = train_ok("--resume " + quote(tmp + "/run"));
    CHECK(r.err.find("warning: 2 lines of '" + tmp + "/run/log.jsonl' are not a log entry, left out of the resumed log") !=
          std::string::npos);
    std::string resumed = read_file(tmp + "/run/log.jsonl");
    CHECK(resumed.find("not json") == std::string::npos);
    CHECK(resumed.find("1e300") == std::string::npos);
    CHECK(train_loss_lines(tmp + "/run/log.jsonl").size() == 6);
}

// The signal arrives once the log shows 3 steps (of 4000 small ones: a second or more of run
// left), from a shell that started the run in the background; the run's exit status comes back
// in its last line.
TEST_CASE("SIGINT or SIGTERM during a run: the checkpoint after the step under way, and --resume ends where a straight run does",
          "[cli][resume]") {
    std::string tmp = make_temp_dir();
    write_shard(tmp + "/train.bin", random_tokens(SHARD_TOKENS, SMALL_VOCAB, 9));
    const std::string args = "--device cpu --steps 4000 --lr 0.003 --warmup 10 " + SMALL_MODEL + " " + SMALL_BATCH +
                             " --train-data " + quote(tmp + "/train.bin") + " --out ";
    train_ok(args + quote(tmp + "/straight"));
    const std::string train = quote(env_or("MIXLN_TRAIN", "./train"));
    for (const char* signal_name : {"INT", "TERM"}) {
        std::string run = tmp + "/" + signal_name, log = run + "/log.jsonl";
        std::string script = train + " " + args + quote(run) + " & pid=$!; i=0; " +
                             "while [ \"$(cat " + quote(log) + " 2>/dev/null | grep -c train_loss)\" -lt 3 ] && [ $i -lt 600 ]; " +
                             "do sleep 0.05; i=$((i+1)); done; kill -" + signal_name + " $pid; wait $pid; echo \"exit status $?\"";
        Run r = run_split(script);
        INFO(signal_name << "\n" << r.out << r.err);
        CHECK(r.out.find(std::string("exit status ") + (std::string(signal_name) == "INT" ? "130" : "143")) != std::string::npos);
        size_t at = r.out.find(std::string("stopped by SIG") + signal_name + " after step ");
        REQUIRE(at != std::string::npos);
        int stopped_after = atoi(r.out.c_str() + at + strlen("stopped by SIG after step ") + strlen(signal_name));
        CHECK(stopped_after >= 3);
        CHECK(stopped_after < 4000);
        // the state is at the step the run stopped after, and the log holds as many steps
        SafeTensorsFile state;
        safetensors_open(&state, (run + "/training_state.safetensors").c_str());
        CHECK(std::string(safetensors_metadata(&state, "step")) == std::to_string(stopped_after));
        CHECK((int)train_loss_lines(log).size() == stopped_after);
        Run resumed = train_ok("--resume " + quote(run));
        CHECK(resumed.out.find("at step " + std::to_string(stopped_after) + " of 4000") != std::string::npos);
        CHECK(read_file(tmp + "/straight/model.safetensors") == read_file(run + "/model.safetensors"));
        CHECK(train_loss_lines(tmp + "/straight/log.jsonl") == train_loss_lines(log));
    }
}

TEST_CASE("--checkpoint-every writes a training state that resumes", "[cli][resume]") {
    std::string tmp = make_temp_dir();
    std::string val = quote(fixture_dir("mix") + "/train.bin");
    train_ok(mix_run_args(6) + " --out " + quote(tmp + "/run") + " --checkpoint-every 2 --stop-at 5 --val-data " + val);
    // stopped after step 5: the last checkpoint is the one at the stop, the log has 5 steps
    Run resumed = train_ok("--resume " + quote(tmp + "/run"));
    CHECK(resumed.out.find("at step 5 of 6") != std::string::npos);
    // the watching settings come back too: the resumed run validates at its end
    CHECK(resumed.out.find("step 6 | val loss") != std::string::npos);
    CHECK(train_loss_lines(tmp + "/run/log.jsonl").size() == 6);
}

TEST_CASE("--resume refuses a setting that differs from the saved run", "[cli][resume]") {
    std::string tmp = make_temp_dir();
    train_ok(mix_run_args(4) + " --out " + quote(tmp + "/run") + " --stop-at 2");
    require_train_fails("--resume " + quote(tmp + "/run") + " --lr 0.02", "--lr 0.02 differs from the saved run's 0.01");
    // the precision is part of the run: an fp32 run does not resume in bf16
    require_train_fails("--resume " + quote(tmp + "/run") + " --precision bf16",
                        "--precision bf16 differs from the saved run's fp32");
    // and so is the attention (on the GPU, simple and fused round differently)
    require_train_fails("--resume " + quote(tmp + "/run") + " --attention simple",
                        "--attention simple differs from the saved run's auto");
    // and AdamW's settings
    require_train_fails("--resume " + quote(tmp + "/run") + " --beta2 0.95", "--beta2 0.95 differs from the saved run's 0.999");
    require_train_fails("--resume " + quote(tmp + "/run") + " --weight-decay-on all",
                        "--weight-decay-on all differs from the saved run's matrices");
}

TEST_CASE("--resume keeps AdamW's betas and eps: stopped and resumed equals straight", "[cli][resume]") {
    std::string tmp = make_temp_dir();
    const std::string adam = " --beta1 0.85 --beta2 0.95 --adam-eps 1e-7";
    train_ok(mix_run_args(6) + adam + " --out " + quote(tmp + "/straight"));
    train_ok(mix_run_args(6) + adam + " --out " + quote(tmp + "/resumed") + " --stop-at 3");
    train_ok("--resume " + quote(tmp + "/resumed"));   // not given again: the saved ones hold
    CHECK(read_file(tmp + "/straight/model.safetensors") == read_file(tmp + "/resumed/model.safetensors"));
    CHECK(train_loss_lines(tmp + "/straight/log.jsonl") == train_loss_lines(tmp + "/resumed/log.jsonl"));
    // given again, the same values are accepted
    train_ok(mix_run_args(6) + adam + " --out " + quote(tmp + "/again") + " --stop-at 3");
    train_ok("--resume " + quote(tmp + "/again") + adam);
    CHECK(read_file(tmp + "/straight/model.safetensors") == read_file(tmp + "/again/model.safetensors"));
}

TEST_CASE("--resume keeps the schedule: a wsd run stopped inside its decay and resumed equals straight",
          "[cli][resume][schedule]") {
    std::string tmp = make_temp_dir();
    // warmup 3 (mix_run_args), 8 steps, decay-frac 0.5: the peak at step 3, the decay steps 4 to 7
    const std::string schedule = " --lr-schedule wsd --decay-frac 0.5";
    train_ok(mix_run_args(8) + schedule + " --out " + quote(tmp + "/straight"));
    train_ok(mix_run_args(8) + schedule + " --out " + quote(tmp + "/resumed") + " --stop-at 5");
    train_ok("--resume " + quote(tmp + "/resumed"));
    CHECK(read_file(tmp + "/straight/model.safetensors") == read_file(tmp + "/resumed/model.safetensors"));
    CHECK(train_loss_lines(tmp + "/straight/log.jsonl") == train_loss_lines(tmp + "/resumed/log.jsonl"));
    // a schedule that would give a step already taken (0 to 4) another lr is refused: the cosine
    // and a decay over the last 5 steps both start decaying at step 4, where the run had its peak
    train_ok(mix_run_args(8) + schedule + " --out " + quote(tmp + "/again") + " --stop-at 5");
    require_train_fails("--resume " + quote(tmp + "/again") + " --lr-schedule cosine",
                        "with the new --lr-schedule, step 4 (of the 5 already taken) would have lr 0.00914058 instead of "
                        "the 0.01 it trained with");
    require_train_fails("--resume " + quote(tmp + "/again") + " --decay-frac 0.625",
                        "with the new --decay-frac, step 4 (of the 5 already taken) would have lr");
    // so is a cosine run made longer after it began to decay
    train_ok(mix_run_args(8) + " --out " + quote(tmp + "/cosine") + " --stop-at 5");
    require_train_fails("--resume " + quote(tmp + "/cosine") + " --steps 12", "with the new --steps, step 4");
    // and the other settings still may not change at all
    require_train_fails("--resume " + quote(tmp + "/again") + " --warmup 2", "--warmup 2 differs from the saved run's 3");
}

TEST_CASE("a wsd run's stable phase, branched into a decay of its own, is the straight run of the branch's length",
          "[cli][resume][schedule]") {
    std::string tmp = make_temp_dir();
    // the straight run: 8 steps, the peak from step 3, decaying over steps 6 and 7
    const std::string short_run = " --lr-schedule wsd --steps 8 --decay-frac 0.25";
    train_ok(mix_run_args(8) + short_run + " --out " + quote(tmp + "/straight"));
    // a 16-step wsd run (decay over steps 12 to 15) and a constant one, each stopped after step 5
    // of their stable phase, then branched into the short run's decay in folders of their own
    train_ok(mix_run_args(16) + " --lr-schedule wsd --decay-frac 0.25 --out " + quote(tmp + "/long") + " --stop-at 6");
    train_ok(mix_run_args(40) + " --lr-schedule constant --out " + quote(tmp + "/constant") + " --stop-at 6");
    std::string long_model = read_file(tmp + "/long/model.safetensors"), long_log = read_file(tmp + "/long/log.jsonl");
    std::string long_state = read_file(tmp + "/long/training_state.safetensors");
    Run branch = train_ok("--resume " + quote(tmp + "/long") + " --out " + quote(tmp + "/branch") + " --steps 8");
    CHECK(branch.out.find("at step 6 of 8") != std::string::npos);
    train_ok("--resume " + quote(tmp + "/constant") + " --out " + quote(tmp + "/from_constant") + short_run);
    for (const char* run : {"/branch", "/from_constant"}) {
        INFO(run);
        CHECK(read_file(tmp + run + "/model.safetensors") == read_file(tmp + "/straight/model.safetensors"));
        // the branch's log holds the steps it inherited, then its own
        CHECK(train_loss_lines(tmp + run + "/log.jsonl") == train_loss_lines(tmp + "/straight/log.jsonl"));
    }
    // the run branched from is left as it was, and still continues to its own end
    CHECK(read_file(tmp + "/long/model.safetensors") == long_model);
    CHECK(read_file(tmp + "/long/log.jsonl") == long_log);
    CHECK(read_file(tmp + "/long/training_state.safetensors") == long_state);
    train_ok("--resume " + quote(tmp + "/long"));
    CHECK(train_loss_lines(tmp + "/long/log.jsonl").size() == 16);
}

// A snapshot's weights load as any checkpoint's: --eval-only on them gives the validation loss
// its log holds for its step (val: the run's --val-data flags)
static void require_snapshot_evaluates_as_logged(const std::string& snapshot, int step, const std::string& val) {
    Run eval = train_ok("--eval-only --init-from " + quote(snapshot) + val + " --batch 3 --seq-len 24");
    std::string log = read_file(snapshot + "/log.jsonl");
    const std::string entry = "{\"step\": " + std::to_string(step) + ", \"val_loss\": ";
    size_t at = log.find(entry);
    REQUIRE(at != std::string::npos);
    double logged = atof(log.c_str() + at + entry.size());
    size_t eval_at = eval.out.find("\"val_loss\": ");
    REQUIRE(eval_at != std::string::npos);
    CHECK(std::fabs(atof(eval.out.c_str() + eval_at + strlen("\"val_loss\": ")) - logged) < 1e-6);
}

TEST_CASE("--keep-every keeps snapshots that are the run at their step: they resume, branch and continue the run",
          "[cli][resume][keep]") {
    std::string tmp = make_temp_dir();
    const std::string val = " --val-data " + quote(fixture_dir("mix") + "/train.bin") + " --val-batches 2 --val-every 3";
    const std::string keep = " --keep-every 3" + val;
    Run run = train_ok(mix_run_args(8) + keep + " --out " + quote(tmp + "/run"));
    CHECK(run.out.find("keeping a snapshot every 3 steps in " + tmp + "/run/step_NNNNNN") != std::string::npos);
    // steps 3 and 6; 8 is no multiple of 3
    const std::string snap3 = tmp + "/run/step_000003", snap6 = tmp + "/run/step_000006";
    for (const std::string& snap : {snap3, snap6}) {
        for (const char* file : {"/model.safetensors", "/config.json", "/training_state.safetensors", "/log.jsonl"}) {
            CHECK(file_exists(snap + file));
        }
    }
    CHECK(!file_exists(tmp + "/run/step_000008/model.safetensors"));
    // a snapshot is the checkpoint a run stopped at its step writes, to the byte
    train_ok(mix_run_args(8) + keep + " --out " + quote(tmp + "/stopped") + " --stop-at 3");
    for (const char* file : {"/model.safetensors", "/config.json", "/training_state.safetensors"}) {
        INFO(file);
        CHECK(read_file(snap3 + file) == read_file(tmp + "/stopped" + file));
    }
    // its log is the run's up to the step: 3 steps, then the validation at step 3
    std::vector<std::string> run_lines = train_loss_lines(tmp + "/run/log.jsonl");
    REQUIRE(run_lines.size() == 8);
    CHECK(train_loss_lines(snap3 + "/log.jsonl") == std::vector<std::string>(run_lines.begin(), run_lines.begin() + 3));
    std::string snap3_log = read_file(snap3 + "/log.jsonl"), run_log = read_file(tmp + "/run/log.jsonl");
    size_t val3 = run_log.find("{\"step\": 3, \"val_loss\"");
    REQUIRE(val3 != std::string::npos);
    std::string val3_line = run_log.substr(val3, run_log.find('\n', val3) + 1 - val3);
    CHECK(snap3_log.size() > val3_line.size());
    CHECK(snap3_log.substr(snap3_log.size() - val3_line.size()) == val3_line);

    // resumed in place it would stop being what it was: refused, and left as it was
    const std::string snap3_state = read_file(snap3 + "/training_state.safetensors");
    require_train_fails("--resume " + quote(snap3 + "/"), "that is a snapshot kept by --keep-every; give the resumed run a "
                                                           "folder of its own with --out");
    // branched into a folder of its own it ends where the run did, and keeps its own snapshots
    Run branch = train_ok("--resume " + quote(snap3) + " --out " + quote(tmp + "/branch"));
    CHECK(branch.out.find("at step 3 of 8") != std::string::npos);
    CHECK(read_file(tmp + "/branch/model.safetensors") == read_file(tmp + "/run/model.safetensors"));
    CHECK(train_loss_lines(tmp + "/branch/log.jsonl") == run_lines);
    CHECK(read_file(tmp + "/branch/step_000006/training_state.safetensors") == read_file(snap6 + "/training_state.safetensors"));
    CHECK(!file_exists(tmp + "/branch/step_000003/model.safetensors"));
    CHECK(read_file(snap3 + "/training_state.safetensors") == snap3_state);

    // a run that lost its last state (killed outright) continues from a snapshot in its own
    // folder, replacing the snapshots after it: the same run again
    const std::string run_model = read_file(tmp + "/run/model.safetensors"), snap6_state = read_file(snap6 + "/training_state.safetensors");
    REQUIRE(unlink((tmp + "/run/training_state.safetensors").c_str()) == 0);
    REQUIRE(unlink((tmp + "/run/model.safetensors").c_str()) == 0);
    write_file(snap6 + "/training_state.safetensors", "not a training state");
    train_ok("--resume " + quote(snap3) + " --out " + quote(tmp + "/run"));
    CHECK(read_file(tmp + "/run/model.safetensors") == run_model);
    CHECK(read_file(snap6 + "/training_state.safetensors") == snap6_state);
    CHECK(train_loss_lines(tmp + "/run/log.jsonl") == run_lines);

    // the snapshot's weights load as any checkpoint's: the loss of the run's validation at step 6
    require_snapshot_evaluates_as_logged(snap6, 6, val);

    require_train_fails("--steps 0 --keep-every -1", "--keep-every must be at least 0, got -1");
    require_train_fails(mix_run_args(4) + " --keep-every 2", "--keep-every keeps its snapshots in the run's folder: give --out DIR");
}

// The fixture's shard holds 10 batches of 3 x 24: 14 steps are an epoch and 4 visits of the next.
TEST_CASE("--data-order shuffled: train reads the batches in the PyTorch reference's shuffled order", "[cli][shuffle]") {
    std::string dir = fixture_dir("mix");
    std::string tmp = make_temp_dir();
    const std::string data = "--batch 3 --seq-len 24 --steps 14 --lr 0.01 --warmup 2";
    const std::string order = " --data-order shuffled --data-seed 5";
    train_ok("--init-from " + quote(dir) + " --train-data " + quote(dir + "/train.bin") + " " + data + order +
             " --out " + quote(tmp + "/ours"));
    train_ok("--init-from " + quote(dir) + " --train-data " + quote(dir + "/train.bin") + " " + data +
             " --out " + quote(tmp + "/sequential"));
    reference_ok("train --ckpt " + quote(dir) + " --data " + quote(dir + "/train.bin") + " " + data + order +
                 " --out " + quote(tmp + "/theirs"));
    std::vector<JsonValue> ours = read_jsonl(tmp + "/ours/log.jsonl"), theirs = read_jsonl(tmp + "/theirs/log.jsonl"),
                           sequential = read_jsonl(tmp + "/sequential/log.jsonl");
    REQUIRE(ours.size() == 14);
    REQUIRE(theirs.size() == 14);
    int steps_unlike_sequential = 0;
    for (int s = 0; s < 14; s++) {
        INFO("step " << s);
        double loss = number(ours[s], "train_loss"), reference_loss = number(theirs[s], "train_loss");
        CAPTURE(loss, reference_loss, number(sequential[s], "train_loss"));
        CHECK(std::fabs(loss - reference_loss) <= 1e-5 * std::fabs(reference_loss) + 1e-6);
        steps_unlike_sequential += std::fabs(number(sequential[s], "train_loss") - reference_loss) > 1e-3;
    }
    // another batch from the first step on: step 0's loss already differs unless the shuffle put
    // batch 0 first (1 in 10), so most steps must
    CHECK(steps_unlike_sequential >= 10);
    CHECK(weights_relative_difference(dir, tmp + "/ours", tmp + "/theirs") < 5e-6);
}

TEST_CASE("--data-order shuffled: a run stopped in its second epoch and resumed equals straight", "[cli][resume][shuffle]") {
    std::string tmp = make_temp_dir();
    const std::string order = " --data-order shuffled --data-seed 3";
    train_ok(mix_run_args(16) + order + " --out " + quote(tmp + "/straight"));
    train_ok(mix_run_args(16) + order + " --out " + quote(tmp + "/resumed") + " --stop-at 13");
    SafeTensorsFile file;
    safetensors_open(&file, (tmp + "/resumed/training_state.safetensors").c_str());
    CHECK(std::string(safetensors_metadata(&file, "data_epoch")) == "1");   // 10 batches an epoch
    CHECK(std::string(safetensors_metadata(&file, "batch_index")) == "3");
    train_ok("--resume " + quote(tmp + "/resumed"));
    CHECK(read_file(tmp + "/straight/model.safetensors") == read_file(tmp + "/resumed/model.safetensors"));
    CHECK(train_loss_lines(tmp + "/straight/log.jsonl") == train_loss_lines(tmp + "/resumed/log.jsonl"));
    // the order is part of the run
    require_train_fails("--resume " + quote(tmp + "/resumed") + " --data-seed 4", "--data-seed 4 differs from the saved run's 3");
    require_train_fails("--resume " + quote(tmp + "/resumed") + " --data-order sequential",
                        "--data-order sequential differs from the saved run's shuffled");
}

TEST_CASE("an unknown data order, a negative data seed and a data seed without shuffling are refused", "[cli][shuffle]") {
    require_train_fails("--steps 0 --data-order random", "--data-order must be sequential or shuffled, got 'random'");
    require_train_fails("--steps 0 --data-order shuffled --data-seed -1", "--data-seed must be at least 0, got -1");
    require_train_fails("--steps 0 --data-seed 2", "--data-seed applies to --data-order shuffled only");
}

TEST_CASE("a corrupted training state is refused and left as it was", "[cli][resume]") {
    std::string tmp = make_temp_dir();
    train_ok(mix_run_args(4) + " --out " + quote(tmp + "/run") + " --stop-at 2");
    std::string path = tmp + "/run/training_state.safetensors";
    std::string bytes = read_file(path);
    bytes[bytes.size() - 100] ^= 0x10;   // one flipped bit in the AdamW second moment
    write_file(path, bytes);
    require_train_fails("--resume " + quote(tmp + "/run"), "is corrupted: its checksum is");
    CHECK(read_file(path) == bytes);
}

// Rewrites a run's training state through the engine's own writer: its tensors as they are, its
// metadata as edit leaves the saved fields (in file order).
template <typename Edit>
static void rewrite_training_state(const std::string& run_dir, Edit edit) {
    std::string path = run_dir + "/training_state.safetensors";
    SafeTensorsFile file;
    safetensors_open(&file, path.c_str());
    std::vector<std::vector<float>> values;
    std::vector<SafeTensorsEntry> entries;
    for (const SafeTensor& t : file.tensors) values.push_back(read_tensor(file, t.name));
    for (size_t i = 0; i < file.tensors.size(); i++)
        entries.push_back({file.tensors[i].name, "F32", file.tensors[i].shape, values[i].data()});
    std::vector<std::pair<std::string, std::string>> metadata = file.metadata;
    edit(metadata);
    safetensors_write(path.c_str(), entries, metadata);
}

static std::string& metadata_field(std::vector<std::pair<std::string, std::string>>& metadata, const std::string& key) {
    for (auto& [name, value] : metadata)
        if (name == key) return value;
    FAIL("no metadata field " << key);
    return metadata[0].second;
}

// The step, the data position and the settings decide as much of the continued run as the
// tensors do: a change to any of them, which still parses, must not go unnoticed.
TEST_CASE("a training state whose metadata was altered is refused", "[cli][resume]") {
    std::string tmp = make_temp_dir();
    train_ok(mix_run_args(4) + " --out " + quote(tmp + "/run") + " --stop-at 2");
    const std::string path = tmp + "/run/training_state.safetensors", original = read_file(path);
    struct Change {
        const char* key;
        const char* from;
        const char* to;
    };
    for (const Change& change : {Change{"step", "2", "3"}, Change{"batch_index", "2", "1"}, Change{"data_epoch", "0", "1"},
                                 Change{"settings", "\"--lr\": \"0.00999999978\"", "\"--lr\": \"0.0199999996\""},
                                 Change{"settings", "\"--val-every\"", "\"--val-evexy\""}}) {
        INFO(change.key << ": " << change.from << " -> " << change.to);
        write_file(path, original);
        rewrite_training_state(tmp + "/run", [&](std::vector<std::pair<std::string, std::string>>& metadata) {
            std::string& value = metadata_field(metadata, change.key);
            size_t at = value.find(change.from);
            REQUIRE(at != std::string::npos);
            value.replace(at, strlen(change.from), change.to);
        });
        require_train_fails("--resume " + quote(tmp + "/run"), "is corrupted: its metadata checksum is");
    }
}

// --keep-what weights: the snapshots hold what --init-from reads (the same bytes as a full
// snapshot's checkpoint) and the log, a quarter of the bytes, and --resume of one is refused with
// the way to use it instead.
TEST_CASE("--keep-what weights keeps the checkpoint and log of each snapshot, not the training state", "[cli][resume][keep]") {
    std::string tmp = make_temp_dir();
    const std::string val = " --val-data " + quote(fixture_dir("mix") + "/train.bin") + " --val-batches 2 --val-every 3";
    const std::string keep = " --keep-every 3" + val;
    Run run = train_ok(mix_run_args(8) + keep + " --keep-what weights --stop-at 4 --out " + quote(tmp + "/run"));
    CHECK(run.out.find("keeping a snapshot every 3 steps in " + tmp + "/run/step_NNNNNN (weights and log, ") != std::string::npos);
    const std::string snap3 = tmp + "/run/step_000003", snap6 = tmp + "/run/step_000006";
    for (const char* file : {"/model.safetensors", "/config.json", "/log.jsonl"}) CHECK(file_exists(snap3 + file));
    CHECK(!file_exists(snap3 + "/training_state.safetensors"));
    // the run's own folder keeps its whole state
    CHECK(file_exists(tmp + "/run/training_state.safetensors"));
    // the weights are a full snapshot's, to the byte
    Run full = train_ok(mix_run_args(8) + keep + " --stop-at 3 --out " + quote(tmp + "/full"));
    CHECK(full.out.find("(weights, training state and log, ") != std::string::npos);
    for (const char* file : {"/model.safetensors", "/config.json"}) {
        INFO(file);
        CHECK(read_file(snap3 + file) == read_file(tmp + "/full/step_000003" + file));
    }
    CHECK(train_loss_lines(snap3 + "/log.jsonl") == train_loss_lines(tmp + "/full/step_000003/log.jsonl"));
    // nothing to resume: refused either way, naming what to do, and the snapshot left as it was
    const std::string snap3_model = read_file(snap3 + "/model.safetensors");
    for (const std::string& out : {std::string(""), " --out " + quote(tmp + "/branch")}) {
        require_train_fails("--resume " + quote(snap3) + out,
                            "it holds a model's weights but no training state (training_state.safetensors), so no run to "
                            "continue (a snapshot kept with --keep-what weights?); --init-from '" + snap3 + "' starts a new "
                            "run from its weights");
    }
    CHECK(read_file(snap3 + "/model.safetensors") == snap3_model);
    CHECK(!file_exists(tmp + "/branch/log.jsonl"));
    // the setting is kept on --resume: the run's snapshot at 6 holds weights only too
    train_ok("--resume " + quote(tmp + "/run"));
    CHECK(file_exists(snap6 + "/model.safetensors"));
    CHECK(!file_exists(snap6 + "/training_state.safetensors"));
    // and its weights evaluate as the run did at step 6
    require_snapshot_evaluates_as_logged(snap6, 6, val);
    // it may change on --resume (it only watches the run): the full run goes on keeping weights
    train_ok("--resume " + quote(tmp + "/full") + " --keep-what weights");
    CHECK(file_exists(tmp + "/full/step_000006/model.safetensors"));
    CHECK(!file_exists(tmp + "/full/step_000006/training_state.safetensors"));
    CHECK(file_exists(tmp + "/full/step_000003/training_state.safetensors"));
    CHECK(read_file(tmp + "/full/model.safetensors") == read_file(tmp + "/run/model.safetensors"));

    require_train_fails("--steps 0 --keep-what optimizer", "--keep-what must be full or weights, got 'optimizer'");
}

// States of format 1 (no metadata checksum, no --rounding or --seed, before 2026-11-30) and 2 (no
// data_epoch, before --data-order) resume as format 3 does; a setting this version does not know
// is refused even where the checksum holds.
TEST_CASE("format-1 and format-2 training states still resume, and an unknown setting is refused", "[cli][resume]") {
    std::string tmp = make_temp_dir();
    train_ok(mix_run_args(4) + " --out " + quote(tmp + "/straight"));
    train_ok(mix_run_args(4) + " --out " + quote(tmp + "/old") + " --stop-at 2");
    REQUIRE(system(("cp -r " + quote(tmp + "/old") + " " + quote(tmp + "/newer")).c_str()) == 0);
    REQUIRE(system(("cp -r " + quote(tmp + "/old") + " " + quote(tmp + "/format2")).c_str()) == 0);
    // what the settings of each format lacked: format 2 the data order (added 2026-11-30 with
    // --data-order); format 1 also the rounding and the seed (added with --rounding), AdamW's
    // betas and eps (with their flags) and the schedule (with --lr-schedule)
    // (format 3 lacked --keep-every and --weight-decay-on until they came, the same day, and
    // --keep-what and --pad-id until 2026-12-01; a state without --weight-decay-on decayed every parameter,
    // which at weight decay 0 is no difference)
    const std::vector<const char*> format2_lacks = {"\"--data-order\": \"sequential\", ", "\"--data-seed\": \"1\", ",
                                                    "\"--pad-id\": \"-1\", ", "\"--keep-every\": \"0\", ", "\"--keep-what\": \"full\", ",
                                                    "\"--weight-decay-on\": \"matrices\", "};
    std::vector<const char*> format1_lacks = {"\"--rounding\": \"nearest\", ", "\"--seed\": \"1337\", ",
                                              "\"--beta1\": \"0.899999976\", ", "\"--beta2\": \"0.999000013\", ",
                                              "\"--adam-eps\": \"9.99999994e-09\", ", "\"--lr-schedule\": \"cosine\", ",
                                              "\"--decay-frac\": \"0.200000003\", "};
    format1_lacks.insert(format1_lacks.end(), format2_lacks.begin(), format2_lacks.end());
    auto erase = [](std::vector<std::pair<std::string, std::string>>& metadata, const std::vector<const char*>& lacks) {
        std::string& settings = metadata_field(metadata, "settings");
        for (const char* saved : lacks) {
            size_t at = settings.find(saved);
            REQUIRE(at != std::string::npos);
            settings.erase(at, strlen(saved));
        }
        metadata.erase(std::remove_if(metadata.begin(), metadata.end(),
                                      [](const auto& field) {
                                          return field.first == "metadata_checksum" || field.first == "data_epoch";
                                      }),
                       metadata.end());
    };
    rewrite_training_state(tmp + "/old", [&](std::vector<std::pair<std::string, std::string>>& metadata) {
        metadata_field(metadata, "format") = "mixln-training-state-1";
        erase(metadata, format1_lacks);
    });
    rewrite_training_state(tmp + "/format2", [&](std::vector<std::pair<std::string, std::string>>& metadata) {
        metadata_field(metadata, "format") = "mixln-training-state-2";
        erase(metadata, format2_lacks);
        metadata.push_back({"metadata_checksum", training_state_metadata_checksum(
                                                     [&](const char* key) { return metadata_field(metadata, key); },
                                                     TRAINING_STATE_2_CHECKED_FIELDS)});
    });
    for (const char* run : {"/old", "/format2"}) {
        INFO(run);
        train_ok("--resume " + quote(tmp + run));
        CHECK(read_file(tmp + "/straight/model.safetensors") == read_file(tmp + run + "/model.safetensors"));
        // the resumed run writes format 3
        SafeTensorsFile file;
        safetensors_open(&file, (tmp + run + "/training_state.safetensors").c_str());
        CHECK(std::string(safetensors_metadata(&file, "format")) == "mixln-training-state-3");
    }

    rewrite_training_state(tmp + "/newer", [](std::vector<std::pair<std::string, std::string>>& metadata) {
        std::string& settings = metadata_field(metadata, "settings");
        settings.insert(settings.size() - 1, ", \"--new-flag\": \"1\"");
        metadata_field(metadata, "metadata_checksum") = training_state_metadata_checksum(
            [&](const char* key) { return metadata_field(metadata, key); });
    });
    require_train_fails("--resume " + quote(tmp + "/newer"), "has a setting '--new-flag' that this program does not know");
}

// Until 2026-11-30 a run given no --seq-len saved 0 for it (the model's length), which --resume
// then refused as a sequence length below 1: such runs could not be resumed.
TEST_CASE("a run given no --seq-len resumes, and so does a state that saved 0 for it", "[cli][resume]") {
    std::string tmp = make_temp_dir();
    std::string dir = fixture_dir("mix");
    const std::string args = "--init-from " + quote(dir) + " --train-data " + quote(dir + "/train.bin") +
                             " --batch 3 --lr 0.01 --warmup 3 --grad-clip 0.5 --steps 4 --out ";   // mix_run_args but the length: the fixture's 24
    train_ok(mix_run_args(4) + " --out " + quote(tmp + "/straight"));
    train_ok(args + quote(tmp + "/resumed") + " --stop-at 2");
    train_ok(args + quote(tmp + "/old") + " --stop-at 2");
    rewrite_training_state(tmp + "/old", [](std::vector<std::pair<std::string, std::string>>& metadata) {
        std::string& settings = metadata_field(metadata, "settings");
        size_t at = settings.find("\"--seq-len\": \"24\"");
        REQUIRE(at != std::string::npos);
        settings.replace(at, strlen("\"--seq-len\": \"24\""), "\"--seq-len\": \"0\"");
        metadata_field(metadata, "metadata_checksum") = training_state_metadata_checksum(
            [&](const char* key) { return metadata_field(metadata, key); });
    });
    for (const char* run : {"/resumed", "/old"}) {
        INFO(run);
        train_ok("--resume " + quote(tmp + run));
        CHECK(read_file(tmp + run + "/model.safetensors") == read_file(tmp + "/straight/model.safetensors"));
    }
}

TEST_CASE("a truncated training state is refused", "[cli][resume]") {
    std::string tmp = make_temp_dir();
    train_ok(mix_run_args(4) + " --out " + quote(tmp + "/run") + " --stop-at 2");
    std::string path = tmp + "/run/training_state.safetensors";
    std::string bytes = read_file(path);
    write_file(path, bytes.substr(0, bytes.size() - 5000));
    require_train_fails("--resume " + quote(tmp + "/run"), "truncated");
}

TEST_CASE("a corrupted model.safetensors is refused by --init-from", "[cli]") {
    std::string tmp = make_temp_dir();
    train_ok(mix_run_args(1) + " --out " + quote(tmp + "/run"));
    std::string path = tmp + "/run/model.safetensors";
    std::string bytes = read_file(path);
    bytes[bytes.size() / 2] ^= 0x01;
    write_file(path, bytes);
    require_train_fails("--init-from " + quote(tmp + "/run") + " --steps 0", "is corrupted: its checksum is");
}

TEST_CASE("a non-finite loss stops the run, naming the step, and the last checkpoint survives", "[cli][resume]") {
    std::string tmp = make_temp_dir();
    train_ok(mix_run_args(2) + " --out " + quote(tmp + "/run"));
    std::string weights = read_file(tmp + "/run/model.safetensors");
    // an absurd learning rate sends the weights to infinity after the first update
    require_train_fails(mix_run_args(5) + " --lr 1e30 --warmup 0 --out " + quote(tmp + "/run"),
                        "the loss is not finite at step 1; stopping");
    CHECK(read_file(tmp + "/run/model.safetensors") == weights);
    train_ok("--init-from " + quote(tmp + "/run") + " --steps 0");
}

TEST_CASE("--layer-grads-every logs one gradient norm per layer on those steps", "[cli]") {
    std::string tmp = make_temp_dir();
    train_ok(mix_run_args(3) + " --layer-grads-every 2 --out " + quote(tmp + "/run"));
    std::stringstream text(read_file(tmp + "/run/log.jsonl"));
    std::string line;
    int step = 0;
    while (std::getline(text, line)) {
        JsonValue entry;
        std::string error;
        REQUIRE(json_parse(line, &entry, &error));
        if (entry.get("train_loss") == nullptr) continue;
        const JsonValue* norms = entry.get("layer_grad_norms");
        INFO("step " << step << ": " << line);
        if (step % 2 == 0) {
            REQUIRE(norms != nullptr);
            CHECK(norms->array.size() == 4);   // the mix fixture has 4 layers
        } else {
            CHECK(norms == nullptr);
        }
        step++;
    }
    CHECK(step == 3);
}

// ---- --analyze

static JsonValue read_json_file(const std::string& path) {
    JsonValue value;
    std::string error;
    INFO("parsing " << path << ": " << error);
    REQUIRE(json_parse(read_file(path), &value, &error));
    return value;
}

// train --analyze and the reference's analyze on a fixture case of L layers (extra: flags both
// take), compared number by number; returns ours
static JsonValue require_analysis_agrees(const std::string& name, size_t L, const std::string& extra) {
    std::string tmp = make_temp_dir();
    std::string dir = fixture_dir(name);
    INFO("fixture case " << name);
    train_ok("--init-from " + quote(dir) + " --analyze --val-data " + quote(dir + "/train.bin") +
             " --batch 3 --seq-len 24 --out " + quote(tmp) + extra);
    reference_ok("analyze --ckpt " + quote(dir) + " --data " + quote(dir + "/train.bin") +
                 " --batch 3 --seq-len 24 --out " + quote(tmp + "/reference.json") + extra);
    JsonValue ours = read_json_file(tmp + "/analysis.json"), theirs = read_json_file(tmp + "/reference.json");
    CHECK(ours.get("tokens")->number == theirs.get("tokens")->number);
    // losses: fp32 forward passes on both sides, as in the parity tests (measured 7e-8 apart)
    CHECK(fabs(ours.get("val_loss")->number - theirs.get("val_loss")->number) < 1e-6);
    const JsonValue& ours_angular = *ours.get("angular_distance");
    const JsonValue& theirs_angular = *theirs.get("angular_distance");
    REQUIRE(ours_angular.array.size() == L);
    REQUIRE(theirs_angular.array.size() == L);
    for (size_t l = 0; l < L; l++) {
        REQUIRE(ours_angular.array[l].array.size() == L - l);
        REQUIRE(theirs_angular.array[l].array.size() == L - l);
        for (size_t n = 0; n < L - l; n++) {
            INFO("angular distance [" << l << "][" << n << "]");
            // measured 1.2e-9 apart (distances of 1.5e-3 to 5e-2). arccos amplifies rounding near
            // cos = 1 (d acos/dx ~ 1/sqrt(1 - x^2)), hence a bound well above that
            CHECK(fabs(ours_angular.array[l].array[n].number - theirs_angular.array[l].array[n].number) < 1e-6);
        }
    }
    const JsonValue& ours_drop = *ours.get("layer_drop");
    const JsonValue& theirs_drop = *theirs.get("layer_drop");
    REQUIRE(ours_drop.array.size() == L);
    REQUIRE(theirs_drop.array.size() == L);
    for (size_t l = 0; l < L; l++) {
        INFO("layer " << l << " dropped");
        CHECK(ours_drop.array[l].get("layer")->number == l);
        CHECK(fabs(ours_drop.array[l].get("val_loss")->number - theirs_drop.array[l].get("val_loss")->number) < 1e-6);
    }
    const JsonValue& ours_rms = *ours.get("hidden_rms");
    const JsonValue& theirs_rms = *theirs.get("hidden_rms");
    REQUIRE(ours_rms.array.size() == L + 1);   // h_0 .. h_L
    REQUIRE(theirs_rms.array.size() == L + 1);
    for (size_t l = 0; l <= L; l++) {
        INFO("hidden-state RMS at boundary " << l);
        double rms = ours_rms.array[l].number, reference_rms = theirs_rms.array[l].number;
        CAPTURE(rms, reference_rms);
        // the hidden states agree to ~1e-7 relative (the parity tests' activations); their RMS,
        // summed in double on both sides, to as much: 1e-6 leaves room
        CHECK(fabs(rms - reference_rms) <= 1e-6 * reference_rms);
    }
    return ours;
}

TEST_CASE("--analyze gives the PyTorch reference's angular distances, layer-drop losses and hidden-state RMS",
          "[cli][analyze]") {
    JsonValue ours = require_analysis_agrees("mix_half", 6, "");   // 6 layers, 3 of them Post-LN
    // the first three layers are Post-LN: their outputs are their norms', of the scale of the norm
    // weights (the fixture's are 1 + noise of std 0.1, so RMS near 1), where the Pre-LN layers pass
    // on the embeddings' scale (std 0.02) plus their branches
    CHECK(fabs(ours.get("hidden_rms")->array[1].number - 1.0) < 0.2);
    CHECK(ours.get("hidden_rms")->array[0].number < 0.1);
}

// On padded rows each sequence's last token is its document's last, the RMS is over the tokens
// that are not padding, and the losses over the targets: the reference computes the same. Read as
// a stream (last position, every position) the distances and the RMS come out otherwise.
TEST_CASE("--analyze on padded rows (--pad-id) agrees with the reference's", "[cli][analyze][rows]") {
    JsonValue rows = require_analysis_agrees("mix_rows", 4, " --pad-id 0");
    // the losses as the means of the batches' means (--val-mean batches), against the reference's
    JsonValue by_batch = require_analysis_agrees("mix_rows", 4, " --pad-id 0 --val-mean batches");
    CHECK(fabs(by_batch.get("val_loss")->number - rows.get("val_loss")->number) > 1e-4);
    std::string tmp = make_temp_dir(), dir = fixture_dir("mix_rows");
    train_ok("--init-from " + quote(dir) + " --analyze --val-data " + quote(dir + "/train.bin") +
             " --batch 3 --seq-len 24 --out " + quote(tmp));
    JsonValue stream = read_json_file(tmp + "/analysis.json");
    CHECK(rows.get("tokens")->number < stream.get("tokens")->number);
    CHECK(fabs(rows.get("hidden_rms")->array[2].number - stream.get("hidden_rms")->array[2].number) > 1e-4);
    double distance_change = 0;   // over the triangle (distances 2e-3 to 4e-2; measured 3e-3 in all)
    for (size_t l = 0; l < 4; l++) {
        for (size_t n = 0; n < 4 - l; n++) {
            distance_change += fabs(rows.get("angular_distance")->array[l].array[n].number -
                                    stream.get("angular_distance")->array[l].array[n].number);
        }
    }
    CHECK(distance_change > 1e-3);
}

TEST_CASE("--analyze without --val-data is refused", "[cli][analyze]") {
    require_train_fails("--steps 0 --analyze", "--analyze needs --val-data");
}

// ---- --sample

static std::vector<double> sampled_ids(const Run& r) {
    std::string last = r.out.substr(r.out.rfind('{'));
    JsonValue v;
    std::string error;
    INFO(last);
    REQUIRE(json_parse(last.substr(0, last.find('\n')), &v, &error));
    std::vector<double> ids;
    for (const JsonValue& id : v.get("ids")->array) ids.push_back(id.number);
    return ids;
}

TEST_CASE("--sample generates N in-vocabulary tokens, the same ones for the same seed", "[cli][sample]") {
    std::string dir = fixture_dir("mix");   // vocab 97, seq-len 24: 30 tokens slide the window
    std::string args = "--init-from " + quote(dir) + " --sample 30 --prompt-ids 5,6,7 --temperature 0.9 --top-k 10";
    std::vector<double> first = sampled_ids(train_ok(args + " --seed 3"));
    std::vector<double> again = sampled_ids(train_ok(args + " --seed 3"));
    std::vector<double> other = sampled_ids(train_ok(args + " --seed 4"));
    REQUIRE(first.size() == 30);
    for (double id : first) CHECK((id >= 0 && id < 97));
    CHECK(first == again);
    CHECK(first != other);
    // top-k 1 is greedy decoding: the seed no longer matters
    std::string greedy = "--init-from " + quote(dir) + " --sample 10 --prompt-ids 5 --top-k 1";
    CHECK(sampled_ids(train_ok(greedy + " --seed 1")) == sampled_ids(train_ok(greedy + " --seed 2")));
}

// --stop-id: the sample ends at the first token it names (an end of text), kept, and is otherwise
// the same sample: the tokens before it are the ones a run without it draws
TEST_CASE("--sample --stop-id ends the sample at that token", "[cli][sample]") {
    std::string dir = fixture_dir("mix");
    std::string args = "--init-from " + quote(dir) + " --sample 30 --prompt-ids 5,6,7 --temperature 0.9 --top-k 10 --seed 3";
    std::vector<double> full = sampled_ids(train_ok(args));
    REQUIRE(full.size() == 30);
    // stop at the 5th token's id: the sample ends at its first occurrence, at or before the 5th
    int stop = (int)full[4];
    size_t first = std::find(full.begin(), full.end(), (double)stop) - full.begin();
    std::vector<double> stopped = sampled_ids(train_ok(args + " --stop-id " + std::to_string(stop)));
    CHECK(stopped == std::vector<double>(full.begin(), full.begin() + first + 1));
    // a token it never draws: the whole sample
    int never = 0;
    while (std::find(full.begin(), full.end(), (double)never) != full.end()) never++;
    CHECK(sampled_ids(train_ok(args + " --stop-id " + std::to_string(never))) == full);
}

TEST_CASE("--sample refuses a prompt id outside the vocabulary and a temperature of 0", "[cli][sample]") {
    std::string dir = quote(fixture_dir("mix"));
    require_train_fails("--init-from " + dir + " --sample 5 --prompt-ids 3,97", "--prompt-ids: token 97 is outside the vocabulary [0, 97)");
    require_train_fails("--init-from " + dir + " --sample 5 --temperature 0", "--temperature must be positive, got 0");
    require_train_fails("--init-from " + dir + " --sample 5 --stop-id 97", "--stop-id 97 is outside the vocabulary [0, 97)");
    require_train_fails("--init-from " + dir + " --sample 5 --stop-id -1", "--stop-id must be a token id (at least 0), got -1");
    require_train_fails("--init-from " + dir + " --eval-only --stop-id 3", "--stop-id ends a sample: it needs --sample N");
}

TEST_CASE("--attention fused is refused on the CPU, and an unknown attention or RoPE placement too", "[cli]") {
    require_train_fails("--steps 0 --attention fused", "--attention fused needs --device cuda");
    require_train_fails("--steps 0 --attention flash", "--attention must be auto, simple or fused, got 'flash'");
    require_train_fails("--steps 0 --rope inline", "--rope must be auto or separate, got 'inline'");
}

TEST_CASE("--resume of a directory without a training state is refused, naming the file", "[cli][resume]") {
    std::string tmp = make_temp_dir();
    require_train_fails("--resume " + quote(tmp), "cannot open '" + tmp + "/training_state.safetensors'");
}

TEST_CASE("negative counts for the new run flags are refused", "[cli]") {
    require_train_fails("--steps 0 --checkpoint-every -1", "--checkpoint-every and --stop-at must be at least 0");
    require_train_fails("--steps 0 --stop-at -3", "--checkpoint-every and --stop-at must be at least 0");
    require_train_fails("--steps 0 --layer-grads-every -1", "--layer-grads-every must be at least 0");
    require_train_fails("--steps 0 --sample -2", "--sample and --top-k must be at least 0");
    require_train_fails("--steps 0 --top-k -1", "--sample and --top-k must be at least 0");
}

TEST_CASE("an unknown schedule, a decay fraction outside (0, 1] and a wsd decay that does not fit are refused",
          "[cli][schedule]") {
    require_train_fails("--steps 0 --lr-schedule step", "--lr-schedule must be cosine, linear, constant, wsd or wsd-sqrt, got 'step'");
    require_train_fails("--steps 0 --lr-schedule wsd --decay-frac 0", "--decay-frac must be in (0, 1], got 0");
    require_train_fails("--steps 0 --lr-schedule wsd --decay-frac 1.5", "--decay-frac must be in (0, 1], got 1.5");
    require_train_fails("--steps 0 --lr-schedule wsd --decay-frac x", "--decay-frac expects a number, got 'x'");
    // the fraction means nothing to the other schedules
    require_train_fails("--steps 0 --decay-frac 0.3", "--decay-frac applies to --lr-schedule wsd and wsd-sqrt only (got cosine)");
    require_train_fails("--steps 0 --lr-schedule linear --decay-frac 0.3",
                        "--decay-frac applies to --lr-schedule wsd and wsd-sqrt only (got linear)");
    // with training data: 0.01 of 10 steps rounds to no step; a decay of 8 after a warmup of 3 needs 11
    std::string dir = fixture_dir("mix");
    std::string data = "--init-from " + quote(dir) + " --train-data " + quote(dir + "/train.bin") + " --batch 3 --seq-len 24";
    require_train_fails(data + " --steps 10 --lr-schedule wsd --decay-frac 0.01", "--decay-frac 0.01 of 10 steps leaves no step to decay in");
    require_train_fails(data + " --steps 10 --warmup 3 --lr-schedule wsd --decay-frac 0.8",
                        "--lr-schedule wsd: the warmup (3 steps) and the decay (8, --decay-frac 0.8) do not fit in --steps 10");
}

TEST_CASE("AdamW betas outside [0, 1) and an eps that is not positive are refused", "[cli]") {
    require_train_fails("--steps 0 --beta1 1", "--beta1 must be in [0, 1), got 1");
    require_train_fails("--steps 0 --beta1 -0.1", "--beta1 must be in [0, 1), got -0.1");
    require_train_fails("--steps 0 --beta2 1.5", "--beta2 must be in [0, 1), got 1.5");
    require_train_fails("--steps 0 --beta2 nan", "--beta2 expects a number, got 'nan'");
    require_train_fails("--steps 0 --adam-eps 0", "--adam-eps must be positive, got 0");
    require_train_fails("--steps 0 --adam-eps -1e-8", "--adam-eps must be positive, got -1e-08");
    require_train_fails("--steps 0 --adam-eps x", "--adam-eps expects a number, got 'x'");
}

// ---- norm placements beyond Mix-LN

static const char* PLACEMENT_MODEL = "--dim 32 --heads 4 --ffn 72 --vocab 61 --seq-len 16";

static std::vector<std::string> config_norm_layers(const std::string& ckpt) {
    JsonValue config = parse_json(read_file(ckpt + "/config.json"));
    const JsonValue* list = config.get("norm_layers");
    REQUIRE(list != nullptr);
    std::vector<std::string> kinds;
    for (const JsonValue& v : list->array) kinds.push_back(v.string);
    return kinds;
}

TEST_CASE("a layer of every kind under LayerNorm: Gemma-2 norm names, biases, and the reference's loss", "[cli][placement]") {
    std::string tmp = make_temp_dir();
    std::string ckpt = tmp + "/ckpt";
    train_ok("--steps 0 --out " + quote(ckpt) + " --layers 5 " + PLACEMENT_MODEL +
             " --norm-layers post,deepnorm,peri,lns,pre --norm-type layernorm --seed 3");
    std::string shard = tmp + "/val.bin";
    write_shard(shard, random_tokens(SHARD_TOKENS, SMALL_VOCAB, 4));
    require_evals_agree(ckpt, shard);

    JsonValue config = parse_json(read_file(ckpt + "/config.json"));
    CHECK(config_norm_layers(ckpt) == std::vector<std::string>{"post", "deepnorm", "peri", "lns", "pre"});
    REQUIRE(config.get("norm_type") != nullptr);
    CHECK(config.get("norm_type")->string == "layernorm");
    CHECK(config.get("post_ln_layers") == nullptr);   // not a Mix-LN list: the shorthand would mislead
    CheckpointTensors tensors(ckpt);
    // the peri layer: four norms, Gemma-2 names
    for (const char* norm : {"input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                             "post_feedforward_layernorm"}) {
        CHECK(tensors.has(std::string("model.layers.2.") + norm + ".weight"));
        CHECK(tensors.has(std::string("model.layers.2.") + norm + ".bias"));
    }
    // deepnorm is named as post, lns as pre
    CHECK(tensors.has("model.layers.1.post_attention_layernorm.weight"));
    CHECK(tensors.has("model.layers.1.post_feedforward_layernorm.bias"));
    CHECK(!tensors.has("model.layers.1.input_layernorm.weight"));
    CHECK(tensors.has("model.layers.3.input_layernorm.weight"));
    CHECK(tensors.has("model.layers.3.post_attention_layernorm.bias"));
    CHECK(!tensors.has("model.layers.3.pre_feedforward_layernorm.weight"));
    CHECK(tensors.has("model.norm.bias"));
}

// HybridNorm: QKV-Norm under OLMo-2's names, the MLP's norm as post's N2, no N1
TEST_CASE("HybridNorm layers: q/k/v norm names, no N1, and the reference's loss, both ways", "[cli][placement]") {
    std::string tmp = make_temp_dir();
    std::string ckpt = tmp + "/ckpt";
    train_ok("--steps 0 --out " + quote(ckpt) + " --layers 3 " + PLACEMENT_MODEL +
             " --norm-layers hybrid,pre,hybrid --norm-type layernorm --seed 5");
    std::string shard = tmp + "/val.bin";
    write_shard(shard, random_tokens(SHARD_TOKENS, SMALL_VOCAB, 6));
    require_evals_agree(ckpt, shard);
    CHECK(config_norm_layers(ckpt) == std::vector<std::string>{"hybrid", "pre", "hybrid"});
    CheckpointTensors tensors(ckpt);
    for (const char* layer : {"model.layers.0.", "model.layers.2."}) {
        for (const char* norm : {"self_attn.q_norm", "self_attn.k_norm", "self_attn.v_norm", "post_feedforward_layernorm"}) {
            CHECK(tensors.has(std::string(layer) + norm + ".weight"));
            CHECK(tensors.has(std::string(layer) + norm + ".bias"));
        }
        CHECK(!tensors.has(std::string(layer) + "input_layernorm.weight"));
        CHECK(!tensors.has(std::string(layer) + "post_attention_layernorm.weight"));
    }
    CHECK(tensors.has("model.layers.1.input_layernorm.weight"));
    CHECK(!tensors.has("model.layers.1.self_attn.q_norm.weight"));
    // a checkpoint the reference wrote (its own init) loads, and the two agree on its loss
    require_reference_checkpoint_agrees(tmp + "/from_reference", 3, "--alpha 0 --norm-layers hybrid,hybrid,post --seed 13",
                                        shard);
}

// HybridNorm* (--norm hybridstar): a preqkv layer first, pre's N1 and N2 names and the q/k/v norms,
// then hybrid layers
TEST_CASE("--norm hybridstar: a preqkv layer, then hybrid ones, and the reference's loss, both ways", "[cli][placement]") {
    std::string tmp = make_temp_dir();
    std::string ckpt = tmp + "/ckpt";
    Run r = train_ok("--steps 0 --out " + quote(ckpt) + " --layers 3 " + PLACEMENT_MODEL + " --norm hybridstar --seed 7");
    CHECK(r.out.find("preqkv x1, hybrid x2") != std::string::npos);
    CHECK(config_norm_layers(ckpt) == std::vector<std::string>{"preqkv", "hybrid", "hybrid"});
    std::string shard = tmp + "/val.bin";
    write_shard(shard, random_tokens(SHARD_TOKENS, SMALL_VOCAB, 8));
    require_evals_agree(ckpt, shard);
    CheckpointTensors tensors(ckpt);
    for (const char* norm : {"input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm",
                             "self_attn.v_norm"}) {
        CHECK(tensors.has(std::string("model.layers.0.") + norm + ".weight"));
    }
    CHECK(!tensors.has("model.layers.0.post_feedforward_layernorm.weight"));
    CHECK(!tensors.has("model.layers.1.input_layernorm.weight"));
    CHECK(tensors.has("model.layers.1.self_attn.q_norm.weight"));
    // the reference's own preqkv checkpoint, under LayerNorm, loads and agrees
    require_reference_checkpoint_agrees(tmp + "/from_reference", 3,
                                        "--alpha 0 --norm-layers preqkv,hybrid,preqkv --norm-type layernorm --seed 14", shard);
}

TEST_CASE("a Peri-LN checkpoint written by the PyTorch reference loads into train", "[cli][placement]") {
    std::string tmp = make_temp_dir();
    std::string ckpt = tmp + "/ckpt";
    std::string shard = tmp + "/val.bin";
    write_shard(shard, random_tokens(SHARD_TOKENS, SMALL_VOCAB, 5));
    require_reference_checkpoint_agrees(ckpt, 3, "--alpha 0 --norm-layers peri,deepnorm,lns --seed 12", shard);
    Run r = train_ok("--steps 0 --norm-layers peri,deepnorm,lns --init-from " + quote(ckpt));
    CHECK(r.out.find("peri x1, deepnorm x1, lns x1, rmsnorm") != std::string::npos);
}

TEST_CASE("--norm KIND puts that kind in every layer, and --lns turns the pre layers into lns", "[cli][placement]") {
    std::string tmp = make_temp_dir();
    for (const char* kind : {"peri", "deepnorm", "lns", "pre", "post", "hybrid", "preqkv"}) {
        train_ok("--steps 0 --out " + quote(tmp + "/" + kind) + " --layers 3 " + PLACEMENT_MODEL + " --norm " + kind);
        CHECK(config_norm_layers(tmp + "/" + kind) == std::vector<std::string>(3, kind));
    }
    train_ok("--steps 0 --out " + quote(tmp + "/mixlns") + " --layers 4 " + PLACEMENT_MODEL + " --norm mix --alpha 0.25 --lns");
    CHECK(config_norm_layers(tmp + "/mixlns") == std::vector<std::string>{"post", "lns", "lns", "lns"});
    JsonValue mix = parse_json(read_file(tmp + "/post/config.json"));
    CHECK(number(mix, "post_ln_layers") == 3);   // a Mix-LN list keeps the official code's keys
}

TEST_CASE("bad norm placements are refused, naming the problem", "[cli][placement]") {
    std::string model = std::string(" --layers 3 ") + PLACEMENT_MODEL;
    require_train_fails("--steps 0" + model + " --norm-layers pre,post", "--norm-layers lists 2 layers but the model has 3");
    require_train_fails("--steps 0" + model + " --norm-layers pre,sandwich,post", "unknown norm placement 'sandwich' in layer 1");
    require_train_fails("--steps 0" + model + " --norm-layers pre,,post", "unknown norm placement '' in layer 1");
    require_train_fails("--steps 0" + model + " --norm pre --norm-layers pre,pre,pre", "--norm-layers replaces --norm and --alpha");
    require_train_fails("--steps 0" + model + " --norm sandwich",
                        "--norm must be pre, post, mix, peri, deepnorm, lns, hybrid, preqkv or hybridstar");
    require_train_fails("--steps 0" + model + " --norm post --lns", "--lns scales the pre layers, but --norm post has none");
    // HybridNorm* has no pre layer for --lns to scale (preqkv is not pre), and no alpha
    require_train_fails("--steps 0" + model + " --norm hybridstar --lns", "--lns scales the pre layers, but --norm hybridstar has none");
    require_train_fails("--steps 0" + model + " --norm hybridstar --alpha 0.5", "--alpha applies to --norm mix only (got --norm hybridstar)");
    require_train_fails("--steps 0" + model + " --norm-layers post,peri,post --lns", "--lns scales the pre layers, but the placement has none");
    require_train_fails("--steps 0" + model + " --norm-type batchnorm", "--norm-type must be rmsnorm or layernorm");
    require_train_fails("--steps 0" + model + " --scaled-embed --embed-std 0.1", "give it or --embed-std, not both");
}

TEST_CASE("a config.json with a bad norm_layers or norm_type is refused", "[cli][placement]") {
    std::string ckpt = make_temp_dir() + "/ckpt";
    train_ok("--steps 0 --out " + quote(ckpt) + " --layers 2 " + PLACEMENT_MODEL + " --norm-layers peri,pre");
    std::string good = read_file(ckpt + "/config.json");
    auto with = [&](const std::string& from, const std::string& to) {
        std::string text = good;
        size_t at = text.find(from);
        REQUIRE(at != std::string::npos);
        std::ofstream(ckpt + "/config.json", std::ios::binary) << text.replace(at, from.size(), to);
    };
    with("\"norm_layers\": [\"peri\", \"pre\"]", "\"norm_layers\": [\"peri\", \"middle\"]");
    require_train_fails("--steps 0 --init-from " + quote(ckpt), "unknown norm placement 'middle' in layer 1");
    with("\"norm_layers\": [\"peri\", \"pre\"]", "\"norm_layers\": [\"peri\"]");
    require_train_fails("--steps 0 --init-from " + quote(ckpt), "\"norm_layers\" lists 1 layers but num_hidden_layers is 2");
    with("\"norm_type\": \"rmsnorm\"", "\"norm_type\": \"groupnorm\"");
    require_train_fails("--steps 0 --init-from " + quote(ckpt), "\"norm_type\" must be \"rmsnorm\" or \"layernorm\"");
    // a Peri-LN checkpoint read as Pre-LN would miss tensors: the placement must match the file
    with("\"norm_layers\": [\"peri\", \"pre\"]", "\"norm_layers\": [\"pre\", \"pre\"]");
    require_train_fails("--steps 0 --init-from " + quote(ckpt), "unexpected tensor");
}

TEST_CASE("--scaled-embed draws the embedding with std sqrt(2/5)", "[cli][placement]") {
    std::string ckpt = make_temp_dir() + "/ckpt";
    train_ok("--steps 0 --out " + quote(ckpt) + " --layers 2 --dim 64 --heads 4 --ffn 72 --vocab 500 --seq-len 16 --scaled-embed");
    SafeTensorsFile file;
    safetensors_open(&file, (ckpt + "/model.safetensors").c_str());
    const SafeTensor* t = safetensors_find(&file, "model.embed_tokens.weight");
    REQUIRE(t != nullptr);
    std::vector<float> values(safetensor_numel(t));
    safetensors_read_f32(&file, t, values.data());
    double sum_squares = 0;
    for (float v : values) sum_squares += (double)v * v;
    double std = sqrt(sum_squares / values.size());
    // 32000 samples: the sample std is within 1% of the true one with overwhelming odds
    CHECK(fabs(std - sqrt(0.4)) < 0.02 * sqrt(0.4));
}

// ---- --device cuda and the bf16 precisions, through ./train built on the CPU emulation of CUDA
//
// $MIXLN_TRAIN_EMU (make test: build/train_emu) is train.cu compiled with the CUDA backend running
// on the CPU (test/emu/cuda_emu.h), so the program's own bf16 paths (flags, memory report,
// checkpoints and training states of bf16 and bf16-pure runs, --resume, --sample and --analyze on
// bf16 activations) run here. The kernels and the model are checked in test_kernels*.cu and
// test_model.cpp; these tests are about the program around them.

static bool have_train_emu() {
    if (getenv("MIXLN_TRAIN_EMU") != nullptr) return true;
    WARN("MIXLN_TRAIN_EMU is not set (make test sets it to build/train_emu): test not run");
    return false;
}

static Run train_emu_ok(const std::string& args) {
    Run r = run_split(quote(env_or("MIXLN_TRAIN_EMU", "build/train_emu")) + " --device cuda " + args);
    INFO("train_emu " << args << "\n" << r.out << r.err);
    REQUIRE(r.exit_status == 0);
    return r;
}

// The same check on the GPU, against its free memory (the emulation's is the host's)
TEST_CASE("a model larger than the GPU's free memory is refused before anything is allocated", "[cli][bf16]") {
    if (!have_train_emu()) return;
    const std::string big = " --steps 0 --layers 1000 --dim 8192 --heads 64 --ffn 22016";
    for (const char* precision : {"fp32", "bf16", "bf16-pure"}) {
        Run r = run_split(quote(env_or("MIXLN_TRAIN_EMU", "build/train_emu")) + " --device cuda --precision " +
                          precision + big);
        INFO("train_emu --precision " << precision << big << "\n" << r.out << r.err);
        REQUIRE(r.exit_status == 1);
        REQUIRE(r.err.find("GiB of GPU memory (parameters, gradients and AdamW state") != std::string::npos);
        REQUIRE(r.err.find("but the GPU has ") != std::string::npos);
        // bf16 keeps a bf16 copy of the weights beside the fp32 ones, and says so
        REQUIRE((r.err.find("with the bf16 weight copy") != std::string::npos) == (std::string(precision) == "bf16"));
    }
}

static std::vector<double> logged_train_losses(const std::string& log_path) {
    std::vector<double> losses;
    for (const JsonValue& entry : read_jsonl(log_path)) {
        if (entry.get("train_loss")) losses.push_back(number(entry, "train_loss"));
    }
    return losses;
}

TEST_CASE("--precision bf16 and bf16-pure train on the CUDA backend, close to the fp32 run", "[cli][bf16]") {
    if (!have_train_emu()) return;
    std::string tmp = make_temp_dir();
    train_ok(mix_run_args(6) + " --out " + quote(tmp + "/fp32"));
    std::vector<double> fp32 = logged_train_losses(tmp + "/fp32/log.jsonl");
    REQUIRE(fp32.size() == 6);
    for (const char* precision : {"bf16", "bf16-pure"}) {
        INFO(precision);
        std::string out = tmp + "/" + precision;
        Run r = train_emu_ok(mix_run_args(6) + " --precision " + precision + " --out " + quote(out));
        CHECK(r.out.find("device: cuda") != std::string::npos);
        CHECK(r.out.find(std::string("rmsnorm, ") + precision + " |") != std::string::npos);
        bool copy = std::string(precision) == "bf16";   // the fp32 weights' bf16 copy exists in bf16 only
        CHECK((r.out.find("+ bf16 weight copy") != std::string::npos) == copy);
        std::vector<double> losses = logged_train_losses(out + "/log.jsonl");
        REQUIRE(losses.size() == fp32.size());
        for (size_t i = 0; i < losses.size(); i++) {
            // the reference's bf16 emulation moves this run's step losses by at most 5.3e-5
            // relative (dev/make_fixtures.py, mix_bf16 and mix_bf16_pure); 20x that
            CHECK(fabs(losses[i] - fp32[i]) <= 1e-3 * fp32[i]);
        }
        // the checkpoint is fp32 on disk and loads into the CPU backend
        train_ok("--init-from " + quote(out) + " --eval-only --val-data " + quote(fixture_dir("mix") + "/train.bin") +
                 " --batch 3 --seq-len 24");
    }
}

TEST_CASE("--resume continues on the device the run trained on, or says it cannot", "[cli][resume]") {
    if (!have_train_emu()) return;
    std::string tmp = make_temp_dir();
    // a run saved on the CPU resumes there under --device auto, GPU or not, without a note
    train_ok(mix_run_args(4) + " --out " + quote(tmp + "/cpu") + " --stop-at 2");
    Run on_cpu = run_train_as_given("--resume " + quote(tmp + "/cpu"));
    INFO(on_cpu.out << on_cpu.err);
    REQUIRE(on_cpu.exit_status == 0);
    CHECK(on_cpu.out.find("device: cpu, ") != std::string::npos);
    CHECK(on_cpu.out.find("note: the saved run trained on") == std::string::npos);
    // a run saved on the (emulated) GPU: --device auto wants the GPU again; without one it says
    // so, and --device cpu continues on the CPU with a note
    train_emu_ok(mix_run_args(4) + " --out " + quote(tmp + "/gpu") + " --stop-at 2");
    Run probe = run_train_as_given("--steps 0");
    if (probe.out.find("device: cpu, ") != std::string::npos) {
        require_train_fails("--device auto --resume " + quote(tmp + "/gpu"),
                            "the saved run trained on the GPU, which is not available here");
    }
    Run moved = train_ok("--device cpu --resume " + quote(tmp + "/gpu"));
    CHECK(moved.out.find("note: the saved run trained on cuda and continues on cpu: not bit for bit") !=
          std::string::npos);
    CHECK(moved.out.find("at step 2 of 4") != std::string::npos);
}

TEST_CASE("a bf16-pure run stopped and resumed ends bitwise where a straight run does", "[cli][bf16][resume]") {
    if (!have_train_emu()) return;
    std::string tmp = make_temp_dir();
    std::string args = mix_run_args(6) + " --precision bf16-pure --out ";
    train_emu_ok(args + quote(tmp + "/straight"));
    train_emu_ok(args + quote(tmp + "/resumed") + " --stop-at 3");
    Run resumed = train_emu_ok("--resume " + quote(tmp + "/resumed"));
    CHECK(resumed.out.find("bf16-pure") != std::string::npos);   // the run's precision came back with it
    CHECK(read_file(tmp + "/straight/model.safetensors") == read_file(tmp + "/resumed/model.safetensors"));
    CHECK(read_file(tmp + "/straight/training_state.safetensors") == read_file(tmp + "/resumed/training_state.safetensors"));
    // every saved weight and moment is a bf16 value (bf16-pure keeps no fp32 copy)
    SafeTensorsFile file;
    safetensors_open(&file, (tmp + "/resumed/training_state.safetensors").c_str());
    for (const char* name : {"params", "adam_m", "adam_v"}) {
        std::vector<float> values = read_tensor(file, name);
        size_t not_bf16 = 0;
        for (float v : values) {   // a bf16 value is a float whose low 16 bits are zero
            uint32_t bits;
            memcpy(&bits, &v, sizeof(bits));
            not_bf16 += (bits & 0xFFFFu) != 0;
        }
        INFO(name);
        CHECK(not_bf16 == 0);
    }
}

// --rounding stochastic: bf16-pure's weights and moments rounded stochastically by AdamW. The
// kernels are checked in test_kernels_bf16_update.cu; here the program: the flag, what it refuses,
// a run that differs from rounding to nearest, the same bits on a second run, and a resume that
// draws the same random bits as a straight run (they come from the seed, which the state saves).
TEST_CASE("--rounding stochastic trains bf16-pure, deterministically, and resumes bit for bit", "[cli][bf16][resume]") {
    require_train_fails("--steps 0 --rounding up", "--rounding must be nearest or stochastic, got 'up'");
    require_train_fails(mix_run_args(1) + " --rounding stochastic",
                        "--rounding stochastic rounds bf16-pure's bf16 weights and AdamW moments; --precision fp32 "
                        "keeps them in fp32");
    if (!have_train_emu()) return;
    Run bf16 = run_split(quote(env_or("MIXLN_TRAIN_EMU", "build/train_emu")) + " --device cuda " + mix_run_args(1) +
                         " --precision bf16 --rounding stochastic");
    CHECK(bf16.exit_status == 1);
    CHECK(bf16.err.find("--precision bf16 keeps them in fp32") != std::string::npos);

    std::string tmp = make_temp_dir();
    std::string args = mix_run_args(6) + " --precision bf16-pure --seed 7 --out ";
    train_emu_ok(args + quote(tmp + "/nearest"));
    Run straight = train_emu_ok(args + quote(tmp + "/straight") + " --rounding stochastic");
    CHECK(straight.out.find("bf16-pure (stochastic rounding)") != std::string::npos);
    train_emu_ok(args + quote(tmp + "/again") + " --rounding stochastic");
    CHECK(read_file(tmp + "/straight/model.safetensors") == read_file(tmp + "/again/model.safetensors"));
    // the first loss comes before any update; the later ones follow weights rounded otherwise
    std::vector<double> nearest = logged_train_losses(tmp + "/nearest/log.jsonl"),
                        stochastic = logged_train_losses(tmp + "/straight/log.jsonl");
    REQUIRE(nearest.size() == 6);
    REQUIRE(stochastic.size() == 6);
    CHECK(nearest[0] == stochastic[0]);
    CHECK(nearest[5] != stochastic[5]);
    CHECK(read_file(tmp + "/straight/model.safetensors") != read_file(tmp + "/nearest/model.safetensors"));
    // another seed draws other bits
    train_emu_ok(mix_run_args(6) + " --precision bf16-pure --seed 8 --rounding stochastic --out " + quote(tmp + "/seed8"));
    CHECK(read_file(tmp + "/straight/model.safetensors") != read_file(tmp + "/seed8/model.safetensors"));

    // stopped and resumed with no flags: the rounding and its seed come back with the state
    train_emu_ok(args + quote(tmp + "/resumed") + " --rounding stochastic --stop-at 3");
    Run resumed = train_emu_ok("--resume " + quote(tmp + "/resumed"));
    CHECK(resumed.out.find("(stochastic rounding)") != std::string::npos);
    CHECK(read_file(tmp + "/straight/model.safetensors") == read_file(tmp + "/resumed/model.safetensors"));
    CHECK(read_file(tmp + "/straight/training_state.safetensors") ==
          read_file(tmp + "/resumed/training_state.safetensors"));
    // a resumed run keeps its settings: another seed or rounding is refused, not silently ignored
    train_emu_ok(args + quote(tmp + "/refused") + " --rounding stochastic --stop-at 3");
    Run other_seed = run_split(quote(env_or("MIXLN_TRAIN_EMU", "build/train_emu")) + " --device cuda --resume " +
                               quote(tmp + "/refused") + " --seed 8");
    CHECK(other_seed.exit_status == 1);
    CHECK(other_seed.err.find("--seed 8 differs from the saved run's 7") != std::string::npos);
    Run other_rounding = run_split(quote(env_or("MIXLN_TRAIN_EMU", "build/train_emu")) + " --device cuda --resume " +
                                   quote(tmp + "/refused") + " --rounding nearest");
    CHECK(other_rounding.exit_status == 1);
    CHECK(other_rounding.err.find("--rounding nearest differs from the saved run's stochastic") != std::string::npos);
}

TEST_CASE("--sample and --analyze run on bf16 activations", "[cli][bf16]") {
    if (!have_train_emu()) return;
    std::string tmp = make_temp_dir();
    std::string dir = fixture_dir("mix"), data = quote(dir + "/train.bin");
    std::vector<double> ids = sampled_ids(
        train_emu_ok("--init-from " + quote(dir) + " --precision bf16 --sample 12 --prompt-ids 5,6 --seed 3"));
    REQUIRE(ids.size() == 12);
    for (double id : ids) CHECK((id >= 0 && id < 97));
    std::string common = "--init-from " + quote(dir) + " --analyze --val-data " + data + " --batch 3 --seq-len 24 --out ";
    train_ok(common + quote(tmp + "/fp32"));
    train_emu_ok(common + quote(tmp + "/bf16") + " --precision bf16");
    JsonValue fp32 = read_json_file(tmp + "/fp32/analysis.json"), bf16 = read_json_file(tmp + "/bf16/analysis.json");
    // bf16 moves this model's loss by 1e-6 relative in the reference's emulation (mix_bf16); 1e-3
    CHECK(fabs(number(bf16, "val_loss") - number(fp32, "val_loss")) <= 1e-3 * number(fp32, "val_loss"));
    REQUIRE(bf16.get("layer_drop")->array.size() == 4);
    for (size_t l = 0; l < 4; l++) {
        double a = number(bf16.get("layer_drop")->array[l], "val_loss"), b = number(fp32.get("layer_drop")->array[l], "val_loss");
        CHECK(fabs(a - b) <= 1e-3 * b);
    }
    REQUIRE(bf16.get("hidden_rms")->array.size() == 5);
    for (size_t l = 0; l < 5; l++) {
        double a = bf16.get("hidden_rms")->array[l].number, b = fp32.get("hidden_rms")->array[l].number;
        INFO("hidden-state RMS at boundary " << l << ": bf16 " << a << ", fp32 " << b);
        // every bf16 hidden state is its fp32 value (itself a little off after bf16 layers) rounded
        // to 8 bits: within 2^-9 relative each, so the RMS too; 2^-8 for the drift of the layers before
        CHECK(fabs(a - b) <= b / 256);
    }
}
