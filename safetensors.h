/*
safetensors: the checkpoint format of HuggingFace models. We read it for pretrained weights and
write it for our own checkpoints, so a mixln checkpoint opens in PyTorch with
safetensors.torch.load_file and a HuggingFace model opens here without a conversion script.

Layout: u64 little-endian N, then N bytes of JSON
  {"<name>": {"dtype": "F32", "shape": [d0, d1], "data_offsets": [begin, end]}, ...,
   "__metadata__": {"key": "value"}}
with offsets relative to the first byte after the header, then the raw little-endian data.

Reading: safetensors_open reads only the header and checks every entry against the file size, so a
corrupt or truncated checkpoint stops with a message naming the file and the problem before any
buffer is allocated for it. The read functions open the file again for each tensor (the struct
holds no handle, so there is nothing to close and it copies freely) and check the bounds again,
because the file may have changed since it was opened. Tensors arrive as fp32, the engine's
storage type, whatever their width on disk.

Writing goes to "<path>.tmp", is fsync'd, then renamed over <path>: a checkpoint usually replaces
the previous good one, and a crash or a full disk halfway through must not lose both.
*/
#pragma once

#include "common.h"
#include "json.h"

#include <cmath>
#include <cstdint>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

// Tensor data is copied between disk and memory as is, which is only right on a little-endian host
// (every machine we train on).
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors.h assumes a little-endian host"
#endif

struct SafeTensor {
    std::string name;
    std::string dtype;
    std::vector<int64_t> shape;
    size_t begin;   // absolute file offsets of the data, [begin, end)
    size_t end;
};

struct SafeTensorsFile {
    std::string path;
    std::vector<SafeTensor> tensors;   // in header order
    std::vector<std::pair<std::string, std::string>> metadata;
    size_t file_size;
};

struct SafeTensorsEntry {
    std::string name;
    std::string dtype;
    std::vector<int64_t> shape;
    const void* data;   // numel * dtype size bytes, little-endian
};

// Real headers are a few hundred KB even for models with thousands of tensors; a bigger length
// field means a corrupt file, and we should not allocate it.
constexpr uint64_t SAFETENSORS_MAX_HEADER = 100u * 1000u * 1000u;

// JSON numbers are doubles, exact for integers up to 2^53, which bounds any real offset or size.
constexpr double SAFETENSORS_MAX_INTEGER = 9007199254740992.0;

// Bytes per element of a dtype name, 0 if unknown. Every dtype the format defines is known so that
// a file opens even when it holds tensors we never read (an F8 or BOOL buffer next to the weights).
inline size_t safetensors_dtype_size(const std::string& dtype) {
    static const struct { const char* name; size_t size; } dtypes[] = {
        {"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"F8_E4M3", 1}, {"F8_E5M2", 1},
        {"I64", 8}, {"I32", 4}, {"I16", 2}, {"I8", 1},
        {"U64", 8}, {"U32", 4}, {"U16", 2}, {"U8", 1}, {"BOOL", 1},
    };
    for (const auto& d : dtypes) {
        if (dtype == d.name) return d.size;
    }
    return 0;
}

inline size_t safetensor_numel(const SafeTensor* t) {
    size_t n = 1;   // a scalar, shape [], has one element
    for (int64_t d : t->shape) n *= (size_t)d;
    return n;
}

// Product of dims, saturating at UINT64_MAX instead of wrapping, so a hostile shape can only fail
// the size comparison that follows, never pass it. false if a dim is negative.
inline bool safetensors_checked_numel(const std::vector<int64_t>& shape, uint64_t* out) {
    uint64_t n = 1;
    bool saturated = false;
    for (int64_t d : shape) {
        if (d < 0) return false;
        if (d == 0) { *out = 0; return true; }   // even after a saturated product
        if (n > UINT64_MAX / (uint64_t)d) saturated = true;
        else n *= (uint64_t)d;
    }
    *out = saturated ? UINT64_MAX : n;
    return true;
}

inline uint64_t safetensors_saturating_mul(uint64_t a, uint64_t b) {
    if (a != 0 && b > UINT64_MAX / a) return UINT64_MAX;
    return a * b;
}

inline std::string safetensors_shape_string(const std::vector<int64_t>& shape) {
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); i++) {
        if (i > 0) s += ", ";
        s += std::to_string(shape[i]);
    }
    return s + "]";
}

// ---- reading

// One header entry, checked against the data section [data_start, file_size).
inline SafeTensor safetensors_parse_entry(const char* path, const std::string& name, const JsonValue& e,
                                          size_t data_start, size_t file_size) {
    const char* n = name.c_str();
    if (e.type != JsonValue::Object) fail("'%s': tensor '%s' is not a JSON object", path, n);

    SafeTensor t;
    t.name = name;
    const JsonValue* dtype = e.get("dtype");
    if (dtype == nullptr) fail("'%s': tensor '%s' has no dtype", path, n);
    if (dtype->type != JsonValue::String) fail("'%s': tensor '%s': dtype is not a string", path, n);
    t.dtype = dtype->string;
    size_t element_size = safetensors_dtype_size(t.dtype);
    if (element_size == 0) fail("'%s': tensor '%s' has unknown dtype '%s'", path, n, t.dtype.c_str());

    const JsonValue* shape = e.get("shape");
    if (shape == nullptr) fail("'%s': tensor '%s' has no shape", path, n);
    if (shape->type != JsonValue::Array) fail("'%s': tensor '%s': shape is not an array", path, n);
    for (const JsonValue& d : shape->array) {
        if (d.type != JsonValue::Number) fail("'%s': tensor '%s': shape holds a non-number", path, n);
        if (d.number < 0) fail("'%s': tensor '%s' has negative dimension %g", path, n, d.number);
        if (d.number != std::floor(d.number) || d.number > SAFETENSORS_MAX_INTEGER) {
            fail("'%s': tensor '%s' has dimension %g, not an integer below 2^53", path, n, d.number);
        }
        t.shape.push_back((int64_t)d.number);
    }

    const JsonValue* offsets = e.get("data_offsets");
    if (offsets == nullptr) fail("'%s': tensor '%s' has no data_offsets", path, n);
    if (offsets->type != JsonValue::Array || offsets->array.size() != 2) {
        fail("'%s': tensor '%s': data_offsets is not [begin, end]", path, n);
    }
    uint64_t rel[2];
    for (size_t i = 0; i < 2; i++) {
        const JsonValue& o = offsets->array[i];
        if (o.type != JsonValue::Number || o.number < 0 || o.number != std::floor(o.number) ||
            o.number > SAFETENSORS_MAX_INTEGER) {
            fail("'%s': tensor '%s': data_offsets is not [begin, end] of non-negative integers", path, n);
        }
        rel[i] = (uint64_t)o.number;
    }
    unsigned long long begin = rel[0], end = rel[1];
    if (begin > end) fail("'%s': tensor '%s': data_offsets [%llu, %llu] has begin > end", path, n, begin, end);

    uint64_t numel = 0;
    safetensors_checked_numel(t.shape, &numel);   // dims were checked non-negative above
    uint64_t bytes = safetensors_saturating_mul(numel, element_size);
    if (end - begin != bytes) {
        fail("'%s': tensor '%s': data_offsets [%llu, %llu] span %llu bytes but %s shape %s needs %llu",
             path, n, begin, end, end - begin, t.dtype.c_str(), safetensors_shape_string(t.shape).c_str(),
             (unsigned long long)bytes);
    }
    if (end > file_size - data_start) {
        fail("'%s' is truncated: tensor '%s' ends at byte %llu but the file has %zu bytes", path, n,
             (unsigned long long)(data_start + end), file_size);
    }
    t.begin = data_start + (size_t)begin;
    t.end = data_start + (size_t)end;
    return t;
}

// Reads and validates the header; fails (exit 1) with the path and the problem on any bad input.
inline void safetensors_open(SafeTensorsFile* file, const char* path) {
    FILE* f = fopen_or_fail(path, "rb");
    struct stat st;
    if (fstat(fileno(f), &st) != 0) fail("cannot stat '%s': %s", path, strerror(errno));
    // fopen succeeds on a directory; its st_size is not a file length
    if (!S_ISREG(st.st_mode)) fail("'%s' is not a regular file", path);
    size_t file_size = (size_t)st.st_size;
    if (file_size < 8) fail("'%s' is %zu bytes, shorter than the 8-byte safetensors header length", path, file_size);

    unsigned char length_bytes[8];
    if (fread(length_bytes, 1, 8, f) != 8) fail("cannot read the header length of '%s'", path);
    uint64_t header_length = 0;
    for (int i = 0; i < 8; i++) header_length |= (uint64_t)length_bytes[i] << (8 * i);
    unsigned long long hl = header_length;
    if (header_length > SAFETENSORS_MAX_HEADER) {
        fail("'%s': header length %llu is absurdly large (over 100 MB); not a safetensors file?", path, hl);
    }
    if (header_length > file_size - 8) {
        fail("'%s': header length %llu is larger than the file (%zu bytes)", path, hl, file_size);
    }
    std::string header((size_t)header_length, '\0');
    if (header_length > 0 && fread(&header[0], 1, header.size(), f) != header.size()) {
        fail("short read of the header of '%s' (file changed while reading?)", path);
    }
    fclose(f);

    JsonValue root;
    std::string error;
    if (!json_parse(header, &root, &error)) fail("'%s': header is not valid JSON: %s", path, error.c_str());
    if (root.type != JsonValue::Object) fail("'%s': header is not a JSON object", path);

    size_t data_start = 8 + (size_t)header_length;
    file->path = path;
    file->tensors.clear();
    file->metadata.clear();
    file->file_size = file_size;
    std::set<std::string> seen;   // duplicate keys are legal JSON but would make find() ambiguous
    for (const auto& member : root.object) {
        const std::string& key = member.first;
        if (!seen.insert(key).second) fail("'%s': '%s' appears twice in the header", path, key.c_str());
        if (key == "__metadata__") {
            if (member.second.type != JsonValue::Object) fail("'%s': __metadata__ is not a JSON object", path);
            for (const auto& kv : member.second.object) {
                if (kv.second.type != JsonValue::String) {
                    fail("'%s': __metadata__ value of '%s' is not a string", path, kv.first.c_str());
                }
                file->metadata.emplace_back(kv.first, kv.second.string);
            }
            continue;
        }
        file->tensors.push_back(safetensors_parse_entry(path, key, member.second, data_start, file_size));
    }
}

inline const SafeTensor* safetensors_find(const SafeTensorsFile* file, const std::string& name) {
    for (const SafeTensor& t : file->tensors) {
        if (t.name == name) return &t;
    }
    return nullptr;
}

inline const char* safetensors_metadata(const SafeTensorsFile* file, const std::string& key) {
    for (const auto& kv : file->metadata) {
        if (kv.first == key) return kv.second.c_str();
    }
    return nullptr;
}

// Opens the file positioned at t's data, after checking again that the data is still all there and
// that t agrees with its own shape (it may not come from safetensors_open).
inline FILE* safetensors_open_data(const SafeTensorsFile* file, const SafeTensor* t) {
    const char* path = file->path.c_str();
    size_t element_size = safetensors_dtype_size(t->dtype);
    uint64_t numel = 0;
    if (element_size == 0 || !safetensors_checked_numel(t->shape, &numel) || t->begin > t->end ||
        t->end - t->begin != safetensors_saturating_mul(numel, element_size)) {
        fail("'%s': tensor '%s' (%s, shape %s) does not match its data range", path, t->name.c_str(),
             t->dtype.c_str(), safetensors_shape_string(t->shape).c_str());
    }
    FILE* f = fopen_or_fail(path, "rb");
    struct stat st;
    if (fstat(fileno(f), &st) != 0) fail("cannot stat '%s': %s", path, strerror(errno));
    if ((size_t)st.st_size < t->end) {
        fail("'%s' is truncated: tensor '%s' ends at byte %zu but the file now has %zu bytes "
             "(changed since it was opened?)", path, t->name.c_str(), t->end, (size_t)st.st_size);
    }
    if (fseeko(f, (off_t)t->begin, SEEK_SET) != 0) fail("cannot seek in '%s': %s", path, strerror(errno));
    return f;
}

inline void safetensors_read_exact(void* dst, size_t bytes, FILE* f, const SafeTensorsFile* file,
                                   const SafeTensor* t) {
    if (fread(dst, 1, bytes, f) != bytes) {
        fail("short read of tensor '%s' from '%s' (file changed since it was opened?)", t->name.c_str(),
             file->path.c_str());
    }
}

inline float safetensors_bf16_to_f32(uint16_t h) {
    // bf16 is the top half of an fp32, so the conversion is exact
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof(f));
    return f;
}

inline float safetensors_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exponent = (h >> 10) & 0x1F;
    uint32_t mantissa = h & 0x3FF;
    uint32_t bits;
    if (exponent == 0) {
        // zero or subnormal: mantissa * 2^-24, exact in fp32
        float v = (float)mantissa * 5.9604644775390625e-8f;
        return sign ? -v : v;
    } else if (exponent == 31) {
        bits = sign | 0x7F800000u | (mantissa << 13);   // inf or nan, payload kept
    } else {
        bits = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof(f));
    return f;
}

// Reads a tensor as fp32 into dst (numel floats). F32 is read as is; BF16 and F16 are converted.
// Any other dtype fails.
inline void safetensors_read_f32(const SafeTensorsFile* file, const SafeTensor* t, float* dst) {
    bool is_bf16 = t->dtype == "BF16", is_f16 = t->dtype == "F16";
    if (t->dtype != "F32" && !is_bf16 && !is_f16) {
        fail("'%s': tensor '%s' has dtype %s; expected F32, BF16 or F16", file->path.c_str(),
             t->name.c_str(), t->dtype.c_str());
    }
    FILE* f = safetensors_open_data(file, t);
    size_t numel = safetensor_numel(t);
    if (!is_bf16 && !is_f16) {
        safetensors_read_exact(dst, numel * sizeof(float), f, file, t);
    } else {
        // converted in chunks so a large tensor needs no second full-size buffer
        std::vector<uint16_t> chunk(numel < 65536 ? numel : 65536);
        for (size_t i = 0; i < numel; i += chunk.size()) {
            size_t n = numel - i < chunk.size() ? numel - i : chunk.size();
            safetensors_read_exact(chunk.data(), n * sizeof(uint16_t), f, file, t);
            for (size_t j = 0; j < n; j++) {
                dst[i + j] = is_bf16 ? safetensors_bf16_to_f32(chunk[j]) : safetensors_f16_to_f32(chunk[j]);
            }
        }
    }
    fclose(f);
}

// Reads an I32 tensor into dst (numel ints); I64 is converted, failing on a value out of range.
inline void safetensors_read_i32(const SafeTensorsFile* file, const SafeTensor* t, int32_t* dst) {
    if (t->dtype != "I32" && t->dtype != "I64") {
        fail("'%s': tensor '%s' has dtype %s; expected I32 or I64", file->path.c_str(), t->name.c_str(),
             t->dtype.c_str());
    }
    FILE* f = safetensors_open_data(file, t);
    size_t numel = safetensor_numel(t);
    if (t->dtype == "I32") {
        safetensors_read_exact(dst, numel * sizeof(int32_t), f, file, t);
    } else {
        std::vector<int64_t> chunk(numel < 65536 ? numel : 65536);
        for (size_t i = 0; i < numel; i += chunk.size()) {
            size_t n = numel - i < chunk.size() ? numel - i : chunk.size();
            safetensors_read_exact(chunk.data(), n * sizeof(int64_t), f, file, t);
            for (size_t j = 0; j < n; j++) {
                int64_t v = chunk[j];
                if (v < INT32_MIN || v > INT32_MAX) {
                    fail("'%s': tensor '%s' element %zu is %lld, out of int32 range", file->path.c_str(),
                         t->name.c_str(), i + j, (long long)v);
                }
                dst[i + j] = (int32_t)v;
            }
        }
    }
    fclose(f);
}

// ---- writing

// Writes entries in the given order, with metadata (string values) first as Python's writer does.
// Any dtype the format defines can be written, since data is copied as given (F32, I32, BF16 are
// the ones the engine uses). Atomic: "<path>.tmp", fflush + fsync, rename over path. Every failure
// names path; on a write error the .tmp is removed and an existing file at path is left untouched.
inline void safetensors_write(const char* path, const std::vector<SafeTensorsEntry>& entries,
                              const std::vector<std::pair<std::string, std::string>>& metadata) {
    std::string header = "{";
    if (!metadata.empty()) {
        header += "\"__metadata__\":{";
        for (size_t i = 0; i < metadata.size(); i++) {
            if (i > 0) header += ",";
            header += json_escape(metadata[i].first) + ":" + json_escape(metadata[i].second);
        }
        header += "}";
    }
    std::vector<size_t> sizes;
    std::set<std::string> names;
    uint64_t offset = 0;
    for (const SafeTensorsEntry& e : entries) {
        const char* n = e.name.c_str();
        if (e.name == "__metadata__") fail("cannot write '%s': '__metadata__' is not a tensor name", path);
        if (!names.insert(e.name).second) fail("cannot write '%s': tensor '%s' appears twice", path, n);
        size_t element_size = safetensors_dtype_size(e.dtype);
        if (element_size == 0) fail("cannot write '%s': tensor '%s' has unknown dtype '%s'", path, n, e.dtype.c_str());
        uint64_t numel = 0;
        if (!safetensors_checked_numel(e.shape, &numel)) {
            fail("cannot write '%s': tensor '%s' has a negative dimension in shape %s", path, n,
                 safetensors_shape_string(e.shape).c_str());
        }
        uint64_t bytes = safetensors_saturating_mul(numel, element_size);
        if (bytes > (uint64_t)SAFETENSORS_MAX_INTEGER) fail("cannot write '%s': tensor '%s' is too large", path, n);
        if (bytes > 0 && e.data == nullptr) fail("cannot write '%s': tensor '%s' has no data", path, n);
        if (header.size() > 1) header += ",";
        header += json_escape(e.name) + ":{\"dtype\":" + json_escape(e.dtype) + ",\"shape\":[";
        for (size_t i = 0; i < e.shape.size(); i++) {
            if (i > 0) header += ",";
            header += std::to_string(e.shape[i]);
        }
        header += "],\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(offset + bytes) + "]}";
        offset += bytes;
        sizes.push_back((size_t)bytes);
    }
    header += "}";
    // 8 + N a multiple of 8 keeps every tensor's data 8-byte aligned when the file is mmap'd
    while (header.size() % 8 != 0) header += ' ';

    std::string tmp = std::string(path) + ".tmp";
    FILE* f = fopen(tmp.c_str(), "wb");
    if (f == nullptr) fail("cannot write '%s': cannot create '%s': %s", path, tmp.c_str(), strerror(errno));
    auto write_failed = [&](const char* step) {
        int err = errno;
        fclose(f);
        remove(tmp.c_str());
        fail("cannot write '%s': %s failed: %s", path, step, strerror(err));
    };
    unsigned char length_bytes[8];
    uint64_t header_length = header.size();
    for (int i = 0; i < 8; i++) length_bytes[i] = (unsigned char)(header_length >> (8 * i));
    if (fwrite(length_bytes, 1, 8, f) != 8) write_failed("write");
    if (fwrite(header.data(), 1, header.size(), f) != header.size()) write_failed("write");
    for (size_t i = 0; i < entries.size(); i++) {
        if (sizes[i] > 0 && fwrite(entries[i].data, 1, sizes[i], f) != sizes[i]) write_failed("write");
    }
    if (fflush(f) != 0) write_failed("fflush");
    if (fsync(fileno(f)) != 0) write_failed("fsync");
    if (fclose(f) != 0) {
        int err = errno;
        remove(tmp.c_str());
        fail("cannot write '%s': close failed: %s", path, strerror(err));
    }
    if (rename(tmp.c_str(), path) != 0) {
        int err = errno;
        remove(tmp.c_str());
        fail("cannot write '%s': rename from '%s' failed: %s", path, tmp.c_str(), strerror(err));
    }
    // The rename itself is durable only once the directory is synced. Best effort: some
    // filesystems refuse fsync on a directory, and the data is already safe in the file.
    std::string dir = path;
    size_t slash = dir.find_last_of('/');
    dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : dir.substr(0, slash));
    int dir_fd = open(dir.c_str(), O_RDONLY | O_DIRECTORY);
    if (dir_fd >= 0) {
        fsync(dir_fd);
        close(dir_fd);
    }
}
