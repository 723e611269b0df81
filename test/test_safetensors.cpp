// json.h and safetensors.h: the JSON reader on good and hostile text, and safetensors files
// written here, built by hand as Python's safetensors lays them out, and corrupted.
#include "json.h"
#include "safetensors.h"
#include "test/test_util.h"

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include <sys/resource.h>
#include <csignal>

// ---- JSON

static JsonValue parse_ok(const std::string& text) {
    JsonValue v;
    std::string error;
    INFO("text: " << text);
    bool ok = json_parse(text, &v, &error);
    INFO("error: " << error);
    REQUIRE(ok);
    return v;
}

static std::string parse_error(const std::string& text) {
    JsonValue v;
    std::string error;
    INFO("text: " << text);
    REQUIRE_FALSE(json_parse(text, &v, &error));
    REQUIRE(v.type == JsonValue::Null);
    return error;
}

TEST_CASE("JSON parser reads a nested document, keeping object members in file order", "[io]") {
    JsonValue v = parse_ok(" {\"model\": {\"layers\": [1, 2, {\"x\": null}], \"tied\": true},\n"
                           "  \"name\": \"mixln\", \"off\": false, \"empty\": {}, \"none\": []} ");
    REQUIRE(v.type == JsonValue::Object);
    REQUIRE(v.object.size() == 5);
    REQUIRE(v.object[0].first == "model");
    REQUIRE(v.object[4].first == "none");
    const JsonValue* model = v.get("model");
    REQUIRE(model != nullptr);
    const JsonValue* layers = model->get("layers");
    REQUIRE(layers != nullptr);
    REQUIRE(layers->type == JsonValue::Array);
    REQUIRE(layers->array.size() == 3);
    REQUIRE(layers->array[1].number == 2);
    REQUIRE(layers->array[2].get("x")->type == JsonValue::Null);
    REQUIRE(model->get("tied")->type == JsonValue::Bool);
    REQUIRE(model->get("tied")->boolean);
    REQUIRE(v.get("name")->string == "mixln");
    REQUIRE_FALSE(v.get("off")->boolean);
    REQUIRE(v.get("empty")->type == JsonValue::Object);
    REQUIRE(v.get("none")->array.empty());
    REQUIRE(v.get("missing") == nullptr);
    REQUIRE(layers->get("x") == nullptr);   // get on a non-object
}

TEST_CASE("JSON numbers: integers, negatives, fractions, exponents", "[io]") {
    // all of these are exactly representable, so == is the right comparison
    REQUIRE(parse_ok("0").number == 0);
    REQUIRE(parse_ok("-0").number == 0);
    REQUIRE(parse_ok("42").number == 42);
    REQUIRE(parse_ok("-17").number == -17);
    REQUIRE(parse_ok("2.5").number == 2.5);
    REQUIRE(parse_ok("-0.125").number == -0.125);
    REQUIRE(parse_ok("1e3").number == 1000);
    REQUIRE(parse_ok("1E+2").number == 100);
    REQUIRE(parse_ok("25e-2").number == 0.25);
    REQUIRE(parse_ok("-1.5e1").number == -15);
    REQUIRE(parse_ok("9007199254740992").number == 9007199254740992.0);   // 2^53
    REQUIRE(parse_ok("1e-5").number == 1e-5);   // a typical rms_norm_eps, to the nearest double
}

TEST_CASE("JSON string escapes and \\u, including a surrogate pair, decode to UTF-8", "[io]") {
    REQUIRE(parse_ok("\"a\\\"b\\\\c\\/d\\b\\f\\n\\r\\t\"").string == "a\"b\\c/d\b\f\n\r\t");
    REQUIRE(parse_ok("\"\\u0041\"").string == "A");
    REQUIRE(parse_ok("\"\\u00e9\"").string == "\xC3\xA9");                // é, 2 bytes
    REQUIRE(parse_ok("\"\\u20AC\"").string == "\xE2\x82\xAC");            // €, 3 bytes
    REQUIRE(parse_ok("\"\\uD83D\\uDE00\"").string == "\xF0\x9F\x98\x80"); // U+1F600, a pair
    REQUIRE(parse_ok("\"\\u0000\"").string == std::string(1, '\0'));
    REQUIRE(parse_ok("\"h\xC3\xA9llo\"").string == "h\xC3\xA9llo");      // raw UTF-8 passes through
}

TEST_CASE("JSON parser rejects malformed text with the byte offset where it stopped", "[io]") {
    REQUIRE(parse_error("{} x") == "trailing characters after the value at byte 3");
    REQUIRE(parse_error("{\"a\" 1}") == "expected ':' at byte 5");
    REQUIRE(parse_error("  \"abc") == "unterminated string starting at byte 2");
    REQUIRE(parse_error("\"abc\\") == "unterminated string starting at byte 0");
    REQUIRE(parse_error("[tru]") == "invalid literal (expected 'true') at byte 1");
    REQUIRE(parse_error("nul") == "invalid literal (expected 'null') at byte 0");
    REQUIRE(parse_error("[1,]") == "unexpected character ']' at byte 3");
    REQUIRE(parse_error("[1 2]") == "expected ',' or ']' at byte 3");
    REQUIRE(parse_error("{1:2}") == "expected a string key at byte 1");
    REQUIRE(parse_error("") == "unexpected end of input at byte 0");
    REQUIRE(parse_error("01") == "trailing characters after the value at byte 1");
    REQUIRE(parse_error("1.") == "expected a digit after '.' at byte 2");
    REQUIRE(parse_error("-") == "expected a digit in number at byte 1");
    REQUIRE(parse_error("1e999") == "number out of range at byte 0");
    REQUIRE(parse_error("\"a\\qb\"") == "invalid escape in string at byte 2");
    REQUIRE(parse_error("\"\\u12G4\"") == "invalid \\u escape at byte 1");
    REQUIRE(parse_error("\"\\uD83D\"") == "unpaired surrogate in \\u escape at byte 1");
    REQUIRE(parse_error("\"\\uDE00\"") == "unpaired surrogate in \\u escape at byte 1");
    REQUIRE(parse_error("\"a\nb\"") == "control character in string at byte 2");
    REQUIRE(parse_error(std::string("[\x01]", 3)) == "unexpected byte 0x01 at byte 1");
}

TEST_CASE("JSON nesting is capped at 64 levels so hostile input cannot overflow the stack", "[io]") {
    // 64 = JSON_MAX_DEPTH
    parse_ok(std::string(64, '[') + std::string(64, ']'));
    REQUIRE(parse_error(std::string(65, '[') + std::string(65, ']')) == "nesting deeper than 64 at byte 64");
    std::string deep_objects;
    for (int i = 0; i < 65; i++) deep_objects += "{\"a\":";
    REQUIRE(parse_error(deep_objects).find("nesting deeper than 64") != std::string::npos);
    // a million '[' must fail quickly and cleanly, not recurse a million deep
    REQUIRE(parse_error(std::string(1000000, '[')).find("nesting deeper than 64") != std::string::npos);
}

TEST_CASE("json_escape round-trips every byte through json_parse", "[io]") {
    std::string all;
    for (int c = 0; c < 256; c++) all.push_back((char)c);
    std::vector<std::string> samples = {"", "plain", "quote\" backslash\\ slash/", "tab\tnewline\n",
                                        "model.layers.0.self_attn.q_proj.weight", all};
    for (const std::string& s : samples) {
        std::string escaped = json_escape(s);
        REQUIRE(escaped.front() == '"');
        REQUIRE(escaped.back() == '"');
        JsonValue v = parse_ok(escaped);
        REQUIRE(v.type == JsonValue::String);
        REQUIRE(v.string == s);
    }
    REQUIRE(json_escape("a\"\n\x01") == "\"a\\\"\\n\\u0001\"");
}

// ---- safetensors

// A safetensors file: u64 little-endian header length, header, data.
static std::string safetensors_bytes(const std::string& header, const std::string& data) {
    std::string out;
    uint64_t n = header.size();
    for (int i = 0; i < 8; i++) out.push_back((char)(n >> (8 * i)));
    return out + header + data;
}

static void write_string(const std::string& path, const std::string& bytes) {
    write_bytes(path, bytes.data(), bytes.size());
}

static std::string read_string(const std::string& path) {
    FILE* f = fopen(path.c_str(), "rb");
    REQUIRE(f != nullptr);
    std::string out;
    char buf[4096];
    size_t n;
    while ((n = fread(buf, 1, sizeof(buf), f)) > 0) out.append(buf, n);
    fclose(f);
    return out;
}

static bool file_exists(const std::string& path) { return access(path.c_str(), F_OK) == 0; }

template <typename T>
static std::string raw(const std::vector<T>& values) {
    return std::string((const char*)values.data(), values.size() * sizeof(T));
}

TEST_CASE("safetensors write then read back F32 and I32 tensors exactly, with shapes and metadata", "[io]") {
    std::string path = make_temp_dir() + "/model.safetensors";
    std::vector<float> weight = {1.0f, -2.5f, 3.25e-8f, 1e30f, -0.0f, 0.1f};
    std::vector<float> scalar = {7.0f};
    std::vector<int32_t> tokens = {0, -1, 2147483647, -2147483647 - 1, 50256};
    safetensors_write(path.c_str(),
                      {{"layers.0.weight", "F32", {2, 3}, weight.data()},
                       {"step", "F32", {}, scalar.data()},
                       {"tokens", "I32", {5}, tokens.data()},
                       {"empty", "F32", {0, 4}, nullptr}},
                      {{"format", "pt"}, {"mixln_alpha", "0.25"}});

    SafeTensorsFile file;
    safetensors_open(&file, path.c_str());
    REQUIRE(file.path == path);
    REQUIRE(file.tensors.size() == 4);
    REQUIRE(file.tensors[0].name == "layers.0.weight");   // written order kept
    REQUIRE(file.tensors[3].name == "empty");
    REQUIRE(std::string(safetensors_metadata(&file, "format")) == "pt");
    REQUIRE(std::string(safetensors_metadata(&file, "mixln_alpha")) == "0.25");
    REQUIRE(safetensors_metadata(&file, "nope") == nullptr);
    REQUIRE(safetensors_find(&file, "nope") == nullptr);

    const SafeTensor* w = safetensors_find(&file, "layers.0.weight");
    REQUIRE(w != nullptr);
    REQUIRE(w->dtype == "F32");
    REQUIRE(w->shape == std::vector<int64_t>{2, 3});
    REQUIRE(safetensor_numel(w) == 6);
    std::vector<float> w_back(6);
    safetensors_read_f32(&file, w, w_back.data());
    REQUIRE(memcmp(w_back.data(), weight.data(), 6 * sizeof(float)) == 0);   // bit-exact, -0 included

    const SafeTensor* s = safetensors_find(&file, "step");
    REQUIRE(s->shape.empty());
    REQUIRE(safetensor_numel(s) == 1);
    float s_back = 0;
    safetensors_read_f32(&file, s, &s_back);
    REQUIRE(s_back == 7.0f);

    const SafeTensor* t = safetensors_find(&file, "tokens");
    REQUIRE(t->dtype == "I32");
    std::vector<int32_t> t_back(5);
    safetensors_read_i32(&file, t, t_back.data());
    REQUIRE(t_back == tokens);

    const SafeTensor* e = safetensors_find(&file, "empty");
    REQUIRE(safetensor_numel(e) == 0);
    REQUIRE(e->begin == e->end);
    safetensors_read_f32(&file, e, nullptr);
}

TEST_CASE("safetensors reads a file laid out as Python's safetensors writes it", "[io]") {
    // Python's writer: metadata first, compact JSON, padded with spaces; a scalar has shape [].
    std::string header =
        "{\"__metadata__\":{\"format\":\"pt\"},"
        "\"bias\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
        "\"scale\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[8,12]},"
        "\"ids\":{\"dtype\":\"I64\",\"shape\":[3],\"data_offsets\":[12,36]},"
        "\"w\":{\"dtype\":\"BF16\",\"shape\":[2,2],\"data_offsets\":[36,44]}}";
    while (header.size() % 8 != 0) header += ' ';
    std::string data = raw(std::vector<float>{0.5f, -1.0f}) + raw(std::vector<float>{3.0f}) +
                       raw(std::vector<int64_t>{1, -2, 50256}) +
                       raw(std::vector<uint16_t>{0x3F80, 0xC000, 0x3E80, 0x0000});   // 1, -2, 0.25, 0
    std::string path = make_temp_dir() + "/python.safetensors";
    write_string(path, safetensors_bytes(header, data));

    SafeTensorsFile file;
    safetensors_open(&file, path.c_str());
    REQUIRE(file.tensors.size() == 4);
    REQUIRE(file.metadata.size() == 1);
    REQUIRE(std::string(safetensors_metadata(&file, "format")) == "pt");
    size_t data_start = 8 + header.size();
    REQUIRE(file.file_size == data_start + 44);

    const SafeTensor* bias = safetensors_find(&file, "bias");
    REQUIRE(bias->begin == data_start);
    REQUIRE(bias->end == data_start + 8);
    float b[2];
    safetensors_read_f32(&file, bias, b);
    REQUIRE(b[0] == 0.5f);
    REQUIRE(b[1] == -1.0f);

    const SafeTensor* scale = safetensors_find(&file, "scale");
    REQUIRE(scale->shape.empty());
    float sc = 0;
    safetensors_read_f32(&file, scale, &sc);
    REQUIRE(sc == 3.0f);

    int32_t ids[3];
    safetensors_read_i32(&file, safetensors_find(&file, "ids"), ids);
    REQUIRE(ids[0] == 1);
    REQUIRE(ids[1] == -2);
    REQUIRE(ids[2] == 50256);

    float w[4];
    safetensors_read_f32(&file, safetensors_find(&file, "w"), w);
    REQUIRE(w[0] == 1.0f);
    REQUIRE(w[1] == -2.0f);
    REQUIRE(w[2] == 0.25f);
    REQUIRE(w[3] == 0.0f);
}

TEST_CASE("safetensors writer pads the header so the data starts at a multiple of 8 bytes", "[io]") {
    std::string dir = make_temp_dir();
    std::vector<float> x = {1, 2, 3};
    // names of every length mod 8, so each padding amount 0..7 is exercised
    for (int len = 1; len <= 16; len++) {
        std::string path = dir + "/pad" + std::to_string(len) + ".safetensors";
        safetensors_write(path.c_str(), {{std::string(len, 'a'), "F32", {3}, x.data()}}, {});
        std::string bytes = read_string(path);
        uint64_t n = 0;
        for (int i = 0; i < 8; i++) n |= (uint64_t)(unsigned char)bytes[i] << (8 * i);
        REQUIRE(n % 8 == 0);
        REQUIRE(bytes.size() == 8 + n + 3 * sizeof(float));
        SafeTensorsFile file;
        safetensors_open(&file, path.c_str());
        REQUIRE(file.tensors[0].begin == 8 + n);
        REQUIRE(file.tensors[0].begin % 8 == 0);
    }
}

TEST_CASE("safetensors atomic write replaces an existing file and leaves no .tmp behind", "[io]") {
    std::string path = make_temp_dir() + "/ckpt.safetensors";
    std::vector<float> old_values = {1, 2};
    std::vector<float> new_values = {3, 4, 5};
    safetensors_write(path.c_str(), {{"x", "F32", {2}, old_values.data()}}, {{"step", "1"}});
    REQUIRE_FALSE(file_exists(path + ".tmp"));
    safetensors_write(path.c_str(), {{"x", "F32", {3}, new_values.data()}}, {{"step", "2"}});
    REQUIRE_FALSE(file_exists(path + ".tmp"));

    SafeTensorsFile file;
    safetensors_open(&file, path.c_str());
    REQUIRE(std::string(safetensors_metadata(&file, "step")) == "2");
    const SafeTensor* x = safetensors_find(&file, "x");
    REQUIRE(x->shape == std::vector<int64_t>{3});
    std::vector<float> back(3);
    safetensors_read_f32(&file, x, back.data());
    REQUIRE(back == new_values);
}

TEST_CASE("safetensors write that runs out of space fails and keeps the previous file", "[io]") {
    std::string path = make_temp_dir() + "/ckpt.safetensors";
    std::vector<float> good = {1, 2, 3};
    safetensors_write(path.c_str(), {{"x", "F32", {3}, good.data()}}, {});
    std::string good_bytes = read_string(path);
    // 1M floats = 4 MB, far over the 64 KB file size limit set in the child: a full disk, in effect
    std::vector<float> big(1 << 20, 1.0f);
    REQUIRE_FAILS_WITH(path, {
        signal(SIGXFSZ, SIG_IGN);   // make the write return EFBIG instead of killing the child
        struct rlimit limit = {65536, 65536};
        setrlimit(RLIMIT_FSIZE, &limit);
        safetensors_write(path.c_str(), {{"x", "F32", {1 << 20}, big.data()}}, {});
    });
    REQUIRE(read_string(path) == good_bytes);
    REQUIRE_FALSE(file_exists(path + ".tmp"));
}

TEST_CASE("safetensors converts BF16 and F16 to fp32 exactly on known values", "[io]") {
    // bit patterns and values from the IEEE binary16 and bfloat16 definitions
    std::vector<uint16_t> bf16 = {0x3F80, 0xC000, 0x4049, 0x3C00, 0x0000, 0x8000, 0x7F80, 0xFF80, 0x0001};
    std::vector<float> bf16_expected = {1.0f, -2.0f, 3.140625f, 0.0078125f, 0.0f, -0.0f, INFINITY, -INFINITY,
                                        9.18354961579912115600575419705e-41f};   // 2^-133, an fp32 subnormal
    std::vector<uint16_t> f16 = {0x3C00, 0xC000, 0x3555, 0x7BFF, 0x0400, 0x0001, 0x8000, 0x7C00, 0xFC00};
    std::vector<float> f16_expected = {1.0f, -2.0f, 0.333251953125f, 65504.0f, 6.103515625e-05f /* 2^-14 */,
                                       5.9604644775390625e-08f /* 2^-24, smallest subnormal */, -0.0f,
                                       INFINITY, -INFINITY};
    std::vector<uint16_t> nans = {0x7FC0, 0x7E00};   // a BF16 nan, an F16 nan

    std::string path = make_temp_dir() + "/half.safetensors";
    safetensors_write(path.c_str(),
                      {{"bf16", "BF16", {(int64_t)bf16.size()}, bf16.data()},
                       {"f16", "F16", {(int64_t)f16.size()}, f16.data()},
                       {"bf16_nan", "BF16", {1}, &nans[0]},
                       {"f16_nan", "F16", {1}, &nans[1]}},
                      {});
    SafeTensorsFile file;
    safetensors_open(&file, path.c_str());
    std::vector<float> got(bf16.size());
    safetensors_read_f32(&file, safetensors_find(&file, "bf16"), got.data());
    REQUIRE(memcmp(got.data(), bf16_expected.data(), got.size() * sizeof(float)) == 0);
    got.assign(f16.size(), 0.0f);
    safetensors_read_f32(&file, safetensors_find(&file, "f16"), got.data());
    REQUIRE(memcmp(got.data(), f16_expected.data(), got.size() * sizeof(float)) == 0);
    float nan_value = 0;
    safetensors_read_f32(&file, safetensors_find(&file, "bf16_nan"), &nan_value);
    REQUIRE(std::isnan(nan_value));
    safetensors_read_f32(&file, safetensors_find(&file, "f16_nan"), &nan_value);
    REQUIRE(std::isnan(nan_value));
}

TEST_CASE("safetensors BF16 conversion holds across a chunk boundary", "[io]") {
    // 65536 is the conversion chunk in safetensors_read_f32; 65536 + 3 crosses it
    const size_t n = 65536 + 3;
    std::vector<uint16_t> bits(n);
    for (size_t i = 0; i < n; i++) bits[i] = (uint16_t)(0x3F80 + (i % 128));   // [1, 2) in steps of 1/128
    std::string path = make_temp_dir() + "/big.safetensors";
    safetensors_write(path.c_str(), {{"w", "BF16", {(int64_t)n}, bits.data()}}, {});
    SafeTensorsFile file;
    safetensors_open(&file, path.c_str());
    std::vector<float> got(n);
    safetensors_read_f32(&file, &file.tensors[0], got.data());
    for (size_t i = 0; i < n; i++) {
        if (got[i] != 1.0f + (float)(i % 128) / 128.0f) FAIL("element " << i << " is " << got[i]);
    }
}

TEST_CASE("safetensors reads I64 as I32, failing on a value out of range", "[io]") {
    std::string path = make_temp_dir() + "/ids.safetensors";
    std::vector<int64_t> ok = {0, -5, 2147483647, -2147483648LL};
    std::vector<int64_t> too_big = {1, 2147483648LL};
    safetensors_write(path.c_str(), {{"ok", "I64", {4}, ok.data()}, {"too_big", "I64", {2}, too_big.data()}}, {});
    SafeTensorsFile file;
    safetensors_open(&file, path.c_str());
    std::vector<int32_t> got(4);
    safetensors_read_i32(&file, safetensors_find(&file, "ok"), got.data());
    REQUIRE(got == std::vector<int32_t>{0, -5, 2147483647, -2147483647 - 1});
    std::vector<int32_t> got2(2);
    REQUIRE_FAILS_WITH("element 1 is 2147483648, out of int32 range",
                       safetensors_read_i32(&file, safetensors_find(&file, "too_big"), got2.data()));
}

// ---- bad input: each must end in a clean fail() naming the file and the problem

static const char* GOOD_HEADER = "{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}";

// Writes header + data to a fresh file and returns its path.
static std::string bad_file(const std::string& header, const std::string& data) {
    std::string path = make_temp_dir() + "/bad.safetensors";
    write_string(path, safetensors_bytes(header, data));
    return path;
}

static void open_only(const std::string& path) {
    SafeTensorsFile file;
    safetensors_open(&file, path.c_str());
}

TEST_CASE("safetensors_open fails on a missing file", "[io]") {
    std::string path = make_temp_dir() + "/missing.safetensors";
    REQUIRE_FAILS_WITH("cannot open '" + path + "'", open_only(path));
}

TEST_CASE("safetensors_open fails on a file shorter than the 8-byte length", "[io]") {
    std::string path = make_temp_dir() + "/tiny.safetensors";
    write_string(path, "abc");
    REQUIRE_FAILS_WITH("'" + path + "' is 3 bytes, shorter than the 8-byte", open_only(path));
}

TEST_CASE("safetensors_open fails on a header length beyond the end of the file", "[io]") {
    std::string bytes = safetensors_bytes(GOOD_HEADER, std::string(8, '\0'));
    bytes[0] = (char)0xE8;   // length 1000 (0x3E8), the file is ~70 bytes
    bytes[1] = (char)0x03;
    std::string path = make_temp_dir() + "/long.safetensors";
    write_string(path, bytes);
    REQUIRE_FAILS_WITH("header length 1000 is larger than the file", open_only(path));
}

TEST_CASE("safetensors_open fails on an absurd header length without allocating it", "[io]") {
    std::string bytes = safetensors_bytes(GOOD_HEADER, std::string(8, '\0'));
    for (int i = 0; i < 8; i++) bytes[i] = (char)0xFF;   // 2^64 - 1
    std::string path = make_temp_dir() + "/huge.safetensors";
    write_string(path, bytes);
    REQUIRE_FAILS_WITH("absurdly large", open_only(path));
}

TEST_CASE("safetensors_open fails on a header that is not valid JSON, passing on the parser's message", "[io]") {
    std::string path = bad_file("{\"x\" {}}   ", "");
    REQUIRE_FAILS_WITH("header is not valid JSON: expected ':' at byte 5", open_only(path));
}

TEST_CASE("safetensors_open fails on a header that is not a JSON object", "[io]") {
    REQUIRE_FAILS_WITH("header is not a JSON object", open_only(bad_file("[1, 2]  ", "")));
}

TEST_CASE("safetensors_open fails on an unknown dtype", "[io]") {
    std::string path = bad_file("{\"x\":{\"dtype\":\"F31\",\"shape\":[2],\"data_offsets\":[0,8]}}", std::string(8, '\0'));
    REQUIRE_FAILS_WITH("tensor 'x' has unknown dtype 'F31'", open_only(path));
}

TEST_CASE("safetensors_open fails on data_offsets that disagree with the shape", "[io]") {
    // [2, 3] F32 needs 24 bytes; the offsets give 8
    std::string path = bad_file("{\"x\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,8]}}", std::string(8, '\0'));
    REQUIRE_FAILS_WITH("data_offsets [0, 8] span 8 bytes but F32 shape [2, 3] needs 24", open_only(path));
}

TEST_CASE("safetensors_open fails on a shape whose element count overflows", "[io]") {
    // 2^32 * 2^32 wraps to 0 in 64 bits; it must not pass as an empty tensor
    std::string path = bad_file("{\"x\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,0]}}", "");
    REQUIRE_FAILS_WITH("needs 18446744073709551615", open_only(path));
}

TEST_CASE("safetensors_open fails on a file whose last bytes were cut off", "[io]") {
    std::string path = make_temp_dir() + "/cut.safetensors";
    std::vector<float> x(100, 1.0f);
    safetensors_write(path.c_str(), {{"x", "F32", {100}, x.data()}}, {});
    std::string bytes = read_string(path);
    write_string(path, bytes.substr(0, bytes.size() - 3));
    REQUIRE_FAILS_WITH("'" + path + "' is truncated: tensor 'x'", open_only(path));
}

TEST_CASE("safetensors_open fails on a negative dimension", "[io]") {
    std::string path = bad_file("{\"x\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", std::string(8, '\0'));
    REQUIRE_FAILS_WITH("tensor 'x' has negative dimension -2", open_only(path));
}

TEST_CASE("safetensors_open fails on an entry missing a field or with a field of the wrong type", "[io]") {
    std::string data(8, '\0');
    REQUIRE_FAILS_WITH("tensor 'x' has no dtype",
                       open_only(bad_file("{\"x\":{\"shape\":[2],\"data_offsets\":[0,8]}}", data)));
    REQUIRE_FAILS_WITH("tensor 'x' has no shape",
                       open_only(bad_file("{\"x\":{\"dtype\":\"F32\",\"data_offsets\":[0,8]}}", data)));
    REQUIRE_FAILS_WITH("tensor 'x' has no data_offsets",
                       open_only(bad_file("{\"x\":{\"dtype\":\"F32\",\"shape\":[2]}}", data)));
    REQUIRE_FAILS_WITH("tensor 'x': dtype is not a string",
                       open_only(bad_file("{\"x\":{\"dtype\":4,\"shape\":[2],\"data_offsets\":[0,8]}}", data)));
    REQUIRE_FAILS_WITH("tensor 'x': shape is not an array",
                       open_only(bad_file("{\"x\":{\"dtype\":\"F32\",\"shape\":2,\"data_offsets\":[0,8]}}", data)));
    REQUIRE_FAILS_WITH("tensor 'x' has dimension 1.5",
                       open_only(bad_file("{\"x\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,8]}}", data)));
    REQUIRE_FAILS_WITH("tensor 'x': data_offsets is not [begin, end]",
                       open_only(bad_file("{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8]}}", data)));
    REQUIRE_FAILS_WITH("tensor 'x' is not a JSON object", open_only(bad_file("{\"x\":[1]}", data)));
    REQUIRE_FAILS_WITH("__metadata__ value of 'k' is not a string",
                       open_only(bad_file("{\"__metadata__\":{\"k\":1}}", "")));
    std::string entry = "{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}";
    REQUIRE_FAILS_WITH("'x' appears twice", open_only(bad_file("{\"x\":" + entry + ",\"x\":" + entry + "}", data)));
}

TEST_CASE("safetensors_open fails on data_offsets with begin after end", "[io]") {
    std::string path = bad_file("{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]}}", std::string(8, '\0'));
    REQUIRE_FAILS_WITH("data_offsets [8, 0] has begin > end", open_only(path));
}

TEST_CASE("safetensors reads fail on the wrong dtype and on a file cut after it was opened", "[io]") {
    std::string path = make_temp_dir() + "/changing.safetensors";
    std::vector<int32_t> ids = {1, 2, 3, 4};
    safetensors_write(path.c_str(), {{"ids", "I32", {4}, ids.data()}}, {});
    SafeTensorsFile file;
    safetensors_open(&file, path.c_str());
    std::vector<float> f(4);
    REQUIRE_FAILS_WITH("tensor 'ids' has dtype I32; expected F32, BF16 or F16",
                       safetensors_read_f32(&file, &file.tensors[0], f.data()));
    std::string bytes = read_string(path);
    write_string(path, bytes.substr(0, bytes.size() - 1));
    std::vector<int32_t> back(4);
    REQUIRE_FAILS_WITH("truncated: tensor 'ids'", safetensors_read_i32(&file, &file.tensors[0], back.data()));
}

TEST_CASE("safetensors_write into a directory that does not exist fails naming the path", "[io]") {
    std::string path = make_temp_dir() + "/no_such_dir/model.safetensors";
    std::vector<float> x = {1};
    REQUIRE_FAILS_WITH("cannot write '" + path + "'",
                       safetensors_write(path.c_str(), {{"x", "F32", {1}, x.data()}}, {}));
}

TEST_CASE("safetensors_write refuses an unknown dtype and a negative dimension", "[io]") {
    std::string path = make_temp_dir() + "/model.safetensors";
    std::vector<float> x = {1};
    REQUIRE_FAILS_WITH("tensor 'x' has unknown dtype 'FP32'",
                       safetensors_write(path.c_str(), {{"x", "FP32", {1}, x.data()}}, {}));
    REQUIRE_FAILS_WITH("tensor 'x' has a negative dimension",
                       safetensors_write(path.c_str(), {{"x", "F32", {-1}, x.data()}}, {}));
    REQUIRE_FALSE(file_exists(path));
    REQUIRE_FALSE(file_exists(path + ".tmp"));
}
