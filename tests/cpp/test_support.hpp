// Helpers shared by the C++ test programs (header-only; each program is one
// translation unit), as tests/c/test_support.h is for the C ones.
// tests/c_abi.rs compiles and runs the programs with CACHEASIDE_TEST_TABLE,
// CACHEASIDE_TEST_OUTBOX and CACHEASIDE_TEST_NAMESPACE set to a table,
// outbox and namespace of their own (dropped afterwards).
#ifndef CACHEASIDE_TEST_SUPPORT_HPP
#define CACHEASIDE_TEST_SUPPORT_HPP

#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <mutex>
#include <string>

#include "cacheaside.hpp"

namespace test_support {

[[noreturn]] inline void fail(const char *file, int line, const char *what) {
    std::cerr << file << ":" << line << ": expected " << what << "\n";
    std::exit(EXIT_FAILURE);
}

// An environment variable the harness sets; exits when it is missing.
inline std::string env(const char *name) {
    const char *value = std::getenv(name);
    if (value == nullptr || *value == '\0') {
        std::cerr << name << " is not set: run through `cargo test --test c_abi`\n";
        std::exit(EXIT_FAILURE);
    }
    return value;
}

// std::latch is C++20: a condvar-based one-shot latch for C++17, so that
// threads start together.
class StartLine {
public:
    explicit StartLine(int count) : waiting_(count) {}
    void arrive_and_wait() {
        std::unique_lock<std::mutex> lock(mutex_);
        if (--waiting_ == 0) {
            go_.notify_all();
        } else {
            go_.wait(lock, [this] { return waiting_ == 0; });
        }
    }

private:
    std::mutex mutex_;
    std::condition_variable go_;
    int waiting_;
};

}  // namespace test_support

#define EXPECT(cond)                                                \
    do {                                                            \
        if (!(cond)) test_support::fail(__FILE__, __LINE__, #cond); \
    } while (0)

// Expects `expr` to throw cacheaside::Error with status `want`.
#define EXPECT_ERROR(expr, want)                                                      \
    do {                                                                              \
        bool thrown_ = false;                                                         \
        try {                                                                         \
            (void)(expr);                                                             \
        } catch (const cacheaside::Error &e) {                                        \
            thrown_ = e.status() == (want) && std::strlen(e.what()) > 0;              \
        }                                                                             \
        if (!thrown_) test_support::fail(__FILE__, __LINE__, #expr " throws " #want); \
    } while (0)

#endif
