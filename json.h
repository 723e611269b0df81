/*
A small JSON reader and a string escaper: enough for HuggingFace config.json files and the headers
of safetensors checkpoints (safetensors.h), which is all the JSON the engine ever sees.

The reader builds a plain tree of JsonValue that callers walk with get(). Object members keep file
order, so a header read back lists tensors as they were written; lookup is a linear scan because
these objects have at most a few thousand members and are read once at startup.

A checkpoint header is untrusted input, so the reader never crashes on it: every access is checked
against the text length, nesting is capped at JSON_MAX_DEPTH so a run of '[' cannot overflow the
stack, and a failure returns a message with the byte offset where parsing stopped.
Strings are bytes: \uXXXX escapes become UTF-8 and other bytes are copied as they are (no UTF-8
validation; names are only ever compared with other names).
*/
#pragma once

#include <clocale>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

struct JsonValue {
    enum Type { Null, Bool, Number, String, Array, Object } type = Null;
    bool boolean = false;
    double number = 0;
    std::string string;
    std::vector<JsonValue> array;
    std::vector<std::pair<std::string, JsonValue>> object;   // in file order

    // Object member or nullptr (also nullptr when this is not an object). With duplicate keys the
    // first wins; callers that care (the safetensors reader) check for duplicates themselves.
    const JsonValue* get(const char* key) const {
        if (type != Object) return nullptr;
        for (const auto& member : object) {
            if (member.first == key) return &member.second;
        }
        return nullptr;
    }
};

// Deep enough for any real config or header (they nest 3 levels), shallow enough that the
// recursive descent uses a few KB of stack at most.
constexpr int JSON_MAX_DEPTH = 64;

struct JsonParser {
    const std::string& text;
    size_t pos;
    std::string error;

    explicit JsonParser(const std::string& t) : text(t), pos(0) {}

    bool failed(const std::string& what) {
        error = what + " at byte " + std::to_string(pos);
        return false;
    }

    bool at_end() const { return pos >= text.size(); }
    char peek() const { return at_end() ? '\0' : text[pos]; }

    void skip_whitespace() {
        while (!at_end()) {
            char c = text[pos];
            if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
            pos++;
        }
    }

    bool parse_value(JsonValue* out, int depth) {
        skip_whitespace();
        if (at_end()) return failed("unexpected end of input");
        char c = text[pos];
        if (c == '{') return parse_object(out, depth + 1);
        if (c == '[') return parse_array(out, depth + 1);
        if (c == '"') {
            out->type = JsonValue::String;
            return parse_string(&out->string);
        }
        if (c == 't') { out->type = JsonValue::Bool; out->boolean = true; return parse_literal("true"); }
        if (c == 'f') { out->type = JsonValue::Bool; out->boolean = false; return parse_literal("false"); }
        if (c == 'n') { out->type = JsonValue::Null; return parse_literal("null"); }
        if (c == '-' || (c >= '0' && c <= '9')) return parse_number(out);
        return failed(describe_unexpected());
    }

    // "unexpected character 'x'", or the byte in hex when it would not print.
    std::string describe_unexpected() const {
        unsigned char c = (unsigned char)text[pos];
        char buf[48];
        if (c >= 0x20 && c < 0x7f) snprintf(buf, sizeof(buf), "unexpected character '%c'", c);
        else snprintf(buf, sizeof(buf), "unexpected byte 0x%02x", c);
        return buf;
    }

    bool parse_literal(const char* word) {
        std::string w(word);
        if (text.compare(pos, w.size(), w) != 0) return failed("invalid literal (expected '" + w + "')");
        pos += w.size();
        return true;
    }

    bool parse_object(JsonValue* out, int depth) {
        if (depth > JSON_MAX_DEPTH) return failed("nesting deeper than " + std::to_string(JSON_MAX_DEPTH));
        out->type = JsonValue::Object;
        pos++;   // '{'
        skip_whitespace();
        if (peek() == '}') { pos++; return true; }
        while (true) {
            skip_whitespace();
            if (peek() != '"') return failed("expected a string key");
            std::string key;
            if (!parse_string(&key)) return false;
            skip_whitespace();
            if (peek() != ':') return failed("expected ':'");
            pos++;
            JsonValue value;
            if (!parse_value(&value, depth)) return false;
            out->object.emplace_back(std::move(key), std::move(value));
            skip_whitespace();
            if (peek() == ',') { pos++; continue; }
            if (peek() == '}') { pos++; return true; }
            return failed("expected ',' or '}'");
        }
    }

    bool parse_array(JsonValue* out, int depth) {
        if (depth > JSON_MAX_DEPTH) return failed("nesting deeper than " + std::to_string(JSON_MAX_DEPTH));
        out->type = JsonValue::Array;
        pos++;   // '['
        skip_whitespace();
        if (peek() == ']') { pos++; return true; }
        while (true) {
            JsonValue value;
            if (!parse_value(&value, depth)) return false;
            out->array.push_back(std::move(value));
            skip_whitespace();
            if (peek() == ',') { pos++; continue; }
            if (peek() == ']') { pos++; return true; }
            return failed("expected ',' or ']'");
        }
    }

    static int hex_digit(char c) {
        if (c >= '0' && c <= '9') return c - '0';
        if (c >= 'a' && c <= 'f') return c - 'a' + 10;
        if (c >= 'A' && c <= 'F') return c - 'A' + 10;
        return -1;
    }

    // The four hex digits starting at `at`, or false if they are not there.
    bool read_hex4(size_t at, unsigned* out) const {
        if (at + 4 > text.size()) return false;
        unsigned v = 0;
        for (size_t i = 0; i < 4; i++) {
            int d = hex_digit(text[at + i]);
            if (d < 0) return false;
            v = v * 16 + (unsigned)d;
        }
        *out = v;
        return true;
    }

    static void append_utf8(std::string* out, unsigned cp) {
        if (cp < 0x80) {
            out->push_back((char)cp);
        } else if (cp < 0x800) {
            out->push_back((char)(0xC0 | (cp >> 6)));
            out->push_back((char)(0x80 | (cp & 0x3F)));
        } else if (cp < 0x10000) {
            out->push_back((char)(0xE0 | (cp >> 12)));
            out->push_back((char)(0x80 | ((cp >> 6) & 0x3F)));
            out->push_back((char)(0x80 | (cp & 0x3F)));
        } else {
            out->push_back((char)(0xF0 | (cp >> 18)));
            out->push_back((char)(0x80 | ((cp >> 12) & 0x3F)));
            out->push_back((char)(0x80 | ((cp >> 6) & 0x3F)));
            out->push_back((char)(0x80 | (cp & 0x3F)));
        }
    }

    bool parse_string(std::string* out) {
        size_t start = pos;
        pos++;   // opening quote
        while (true) {
            if (at_end()) {
                pos = start;
                return failed("unterminated string starting");
            }
            unsigned char c = (unsigned char)text[pos];
            if (c == '"') { pos++; return true; }
            if (c < 0x20) return failed("control character in string");
            if (c != '\\') { out->push_back((char)c); pos++; continue; }
            size_t escape = pos;
            pos++;
            if (at_end()) {
                pos = start;
                return failed("unterminated string starting");
            }
            char e = text[pos];
            pos++;
            switch (e) {
                case '"': out->push_back('"'); break;
                case '\\': out->push_back('\\'); break;
                case '/': out->push_back('/'); break;
                case 'b': out->push_back('\b'); break;
                case 'f': out->push_back('\f'); break;
                case 'n': out->push_back('\n'); break;
                case 'r': out->push_back('\r'); break;
                case 't': out->push_back('\t'); break;
                case 'u': {
                    unsigned cp;
                    if (!read_hex4(pos, &cp)) { pos = escape; return failed("invalid \\u escape"); }
                    pos += 4;
                    if (cp >= 0xD800 && cp <= 0xDBFF) {
                        // characters beyond the BMP arrive as a high+low surrogate pair of escapes
                        unsigned low;
                        if (pos + 6 <= text.size() && text[pos] == '\\' && text[pos + 1] == 'u' &&
                            read_hex4(pos + 2, &low) && low >= 0xDC00 && low <= 0xDFFF) {
                            cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
                            pos += 6;
                        } else {
                            pos = escape;
                            return failed("unpaired surrogate in \\u escape");
                        }
                    } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
                        pos = escape;
                        return failed("unpaired surrogate in \\u escape");
                    }
                    append_utf8(out, cp);
                    break;
                }
                default:
                    pos = escape;
                    return failed("invalid escape in string");
            }
        }
    }

    bool is_digit() const { return !at_end() && text[pos] >= '0' && text[pos] <= '9'; }

    bool parse_number(JsonValue* out) {
        // Check the strict JSON grammar first (strtod alone would accept "0x1p3", "inf", "01").
        size_t start = pos;
        if (peek() == '-') pos++;
        if (peek() == '0') {
            pos++;
        } else if (is_digit()) {
            while (is_digit()) pos++;
        } else {
            return failed("expected a digit in number");
        }
        if (peek() == '.') {
            pos++;
            if (!is_digit()) return failed("expected a digit after '.'");
            while (is_digit()) pos++;
        }
        if (peek() == 'e' || peek() == 'E') {
            pos++;
            if (peek() == '+' || peek() == '-') pos++;
            if (!is_digit()) return failed("expected a digit in exponent");
            while (is_digit()) pos++;
        }
        std::string literal = text.substr(start, pos - start);
        // strtod reads the decimal point of the current locale; JSON always uses '.'.
        char point = localeconv()->decimal_point[0];
        if (point != '.') {
            for (char& ch : literal) if (ch == '.') ch = point;
        }
        char* end = nullptr;
        double value = strtod(literal.c_str(), &end);
        if (end != literal.c_str() + literal.size()) { pos = start; return failed("invalid number"); }
        if (std::isinf(value)) { pos = start; return failed("number out of range"); }
        out->type = JsonValue::Number;
        out->number = value;
        return true;
    }
};

// Parses the whole text (trailing garbage is an error). On failure returns false, leaves *out as
// Null and sets *error (if given) to a message with the byte offset ("expected ':' at byte 17").
inline bool json_parse(const std::string& text, JsonValue* out, std::string* error) {
    JsonParser parser(text);
    JsonValue value;
    bool ok = parser.parse_value(&value, 0);
    if (ok) {
        parser.skip_whitespace();
        if (!parser.at_end()) ok = parser.failed("trailing characters after the value");
    }
    if (!ok) {
        if (error != nullptr) *error = parser.error;
        *out = JsonValue();
        return false;
    }
    *out = std::move(value);
    return true;
}

// Whether v is a number with an integer value in int's range: only then may it be cast to int
// (a cast of a larger or fractional double is not defined, and damaged files have them).
inline bool json_is_int(const JsonValue* v) {
    return v != nullptr && v->type == JsonValue::Number && v->number == std::floor(v->number) &&
           std::fabs(v->number) <= 2147483647.0;
}

// v as an int where json_is_int(v); otherwise `fallback`.
inline int json_int_or(const JsonValue* v, int fallback) {
    return json_is_int(v) ? (int)v->number : fallback;
}

// s as a quoted JSON string literal. Bytes >= 0x80 pass through, so UTF-8 stays UTF-8.
inline std::string json_escape(const std::string& s) {
    std::string out;
    out.reserve(s.size() + 2);
    out.push_back('"');
    for (char ch : s) {
        unsigned char c = (unsigned char)ch;
        switch (c) {
            case '"': out += "\\\""; break;
            case '\\': out += "\\\\"; break;
            case '\b': out += "\\b"; break;
            case '\f': out += "\\f"; break;
            case '\n': out += "\\n"; break;
            case '\r': out += "\\r"; break;
            case '\t': out += "\\t"; break;
            default:
                if (c < 0x20) {
                    char buf[8];
                    snprintf(buf, sizeof(buf), "\\u%04x", c);
                    out += buf;
                } else {
                    out.push_back((char)c);
                }
        }
    }
    out.push_back('"');
    return out;
}
