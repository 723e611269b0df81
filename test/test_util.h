/*
Helpers the tests share: running code that is expected to fail in a child process, and small
temporary files.

Bad input ends the engine with fail() (common.h): a message on stderr and exit status 1. To test
that without ending the test binary, the code runs in a forked child; the parent collects its exit
status and what it wrote to stderr.
*/
#pragma once

#include <catch2/catch.hpp>

#include <functional>
#include <string>
#include <vector>

#include <sys/wait.h>
#include <unistd.h>

struct ChildResult {
    int exit_status;     // the child's exit code, or 128 + signal number if it was killed
    std::string stderr_text;
};

// Run fn in a forked child with stderr captured; fn returning normally counts as exit 0.
inline ChildResult run_in_child(const std::function<void()>& fn) {
    int fds[2];
    REQUIRE(pipe(fds) == 0);
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
        close(fds[0]);
        dup2(fds[1], 2);
        fn();
        fflush(stdout);
        fflush(stderr);
        _exit(0);
    }
    close(fds[1]);
    std::string text;
    char buf[4096];
    ssize_t n;
    while ((n = read(fds[0], buf, sizeof(buf))) > 0) text.append(buf, (size_t)n);
    close(fds[0]);
    int status = 0;
    waitpid(pid, &status, 0);
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    return {code, text};
}

// Run a shell command, capturing stdout and stderr together.
inline ChildResult run_command(const std::string& command) {
    std::string full = command + " 2>&1";
    FILE* p = popen(full.c_str(), "r");
    REQUIRE(p != nullptr);
    std::string text;
    char buf[4096];
    size_t n;
    while ((n = fread(buf, 1, sizeof(buf), p)) > 0) text.append(buf, n);
    int status = pclose(p);
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    return {code, text};
}

// Check that fn fails cleanly: exit status 1 (not a crash, not success) and a message
// containing `expected` (so the problem is named, not just reported).
#define REQUIRE_FAILS_WITH(expected, ...)                                     \
    do {                                                                      \
        ChildResult result_ = run_in_child([&]() { __VA_ARGS__; });           \
        INFO("child stderr: " << result_.stderr_text);                        \
        REQUIRE(result_.exit_status == 1);                                    \
        REQUIRE(result_.stderr_text.find(expected) != std::string::npos);     \
    } while (0)

// A fresh temporary directory for one test (left behind under /tmp for inspection).
inline std::string make_temp_dir() {
    char tmpl[] = "/tmp/mixln_test_XXXXXX";
    char* dir = mkdtemp(tmpl);
    REQUIRE(dir != nullptr);
    return std::string(dir);
}

inline void write_bytes(const std::string& path, const void* data, size_t n) {
    FILE* f = fopen(path.c_str(), "wb");
    REQUIRE(f != nullptr);
    REQUIRE(fwrite(data, 1, n, f) == n);
    fclose(f);
}
