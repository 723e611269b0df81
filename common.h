/*
Small helpers shared by every part of the engine: the numeric type of the CPU reference, and
error reporting.

Bad input (a missing file, a malformed shard, a flag out of range) ends the program with a
message that names the problem and exit status 1, in the spirit of llm.c: there is no state
worth unwinding, and a clear message beats a stack of error codes. Tests check these paths by
running the code in a child process (test/test_util.h).
*/
#pragma once

#include <cerrno>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>

// The CPU reference computes in `real`: float normally, double in the build used for the
// finite-difference gradient check (compiled with -DMIXLN_REAL_DOUBLE, g++ only). Files on disk
// (checkpoints, fixtures) are always fp32.
#ifdef MIXLN_REAL_DOUBLE
typedef double real;
#else
typedef float real;
#endif

// Print "error: <message>" to stderr and exit with status 1.
[[noreturn]] inline void fail(const char* format, ...) {
    fflush(stdout);
    fprintf(stderr, "error: ");
    va_list args;
    va_start(args, format);
    vfprintf(stderr, format, args);
    va_end(args);
    fprintf(stderr, "\n");
    exit(1);
}

// fopen that fails with the path and the system's reason.
inline FILE* fopen_or_fail(const char* path, const char* mode) {
    FILE* f = fopen(path, mode);
    if (f == nullptr) fail("cannot open '%s': %s", path, strerror(errno));
    return f;
}

// malloc that names the size it could not get.
inline void* malloc_or_fail(size_t bytes, const char* what) {
    void* p = malloc(bytes == 0 ? 1 : bytes);
    if (p == nullptr) fail("out of memory allocating %zu bytes for %s", bytes, what);
    return p;
}
