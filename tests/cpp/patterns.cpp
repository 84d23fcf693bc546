// The C++ wrapper's patterns (include/cacheaside.hpp): rate limiting,
// sessions, and pub/sub with RAII subscriptions and std::function callbacks,
// including a subscription destroyed from its own callback.
// Run by tests/c_abi.rs with CACHEASIDE_TEST_TABLE / _NAMESPACE set.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "cacheaside.hpp"
#include "test_support.hpp"

namespace {

using test_support::env;

using namespace std::chrono_literals;

// Messages a callback collected, and a way to wait for them.
class Inbox {
public:
    void add(const cacheaside::Event &event) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (event.gap) {
            ++gaps_;
        } else {
            messages_.push_back(std::string(event.channel) + "=" + std::string(event.payload));
        }
        changed_.notify_all();
    }

    std::vector<std::string> wait_for(std::size_t count) {
        std::unique_lock<std::mutex> lock(mutex_);
        bool arrived =
            changed_.wait_for(lock, 60s, [&] { return messages_.size() >= count; });
        EXPECT(arrived);
        return messages_;
    }

    int gaps() {
        std::lock_guard<std::mutex> lock(mutex_);
        return gaps_;
    }

private:
    std::mutex mutex_;
    std::condition_variable changed_;
    std::vector<std::string> messages_;
    int gaps_ = 0;
};

void rate_limit(const cacheaside::Client &client) {
    for (uint32_t i = 0; i < 2; i++) {
        cacheaside::RateLimitResult r = client.rate_limit("cpp:user", 2, 60s);
        EXPECT(r.allowed && r.remaining == 1 - i);
    }
    cacheaside::RateLimitResult rejected = client.rate_limit("cpp:user", 2, 60s);
    EXPECT(!rejected.allowed && rejected.remaining == 0);
    EXPECT(rejected.retry_after >= 1ms && rejected.retry_after <= 60s);
    EXPECT_ERROR(client.rate_limit("cpp:user", 0, 60s), CACHEASIDE_INVALID_ARGUMENT);
    EXPECT_ERROR(client.rate_limit("cpp:user", 1, 0ms), CACHEASIDE_INVALID_ARGUMENT);
    EXPECT_ERROR(client.rate_limit("a{b", 1, 1s), CACHEASIDE_INVALID_ARGUMENT);
    EXPECT_ERROR(client.rate_limit(std::string("a\0b", 3), 1, 1s), CACHEASIDE_INVALID_ARGUMENT);
}

void sessions(const cacheaside::Client &client) {
    std::string id = client.session_create(R"({"user_id": 7})", 30min);
    EXPECT(id.size() == CACHEASIDE_SESSION_ID_LEN);
    EXPECT(client.session_get(id) == std::optional<std::string>(R"({"user_id": 7})"));
    EXPECT(client.session_create("[]", 30min) != id);
    EXPECT(client.session_delete(id));
    EXPECT(!client.session_get(id).has_value());
    EXPECT(!client.session_delete(id));
    EXPECT_ERROR(client.session_get(""), CACHEASIDE_INVALID_ARGUMENT);
    EXPECT_ERROR(client.session_get("not/base64url"), CACHEASIDE_INVALID_ARGUMENT);
    EXPECT_ERROR(client.session_get(std::string(129, 'a')), CACHEASIDE_INVALID_ARGUMENT);
    EXPECT_ERROR(client.session_delete("a+b"), CACHEASIDE_INVALID_ARGUMENT);
    EXPECT_ERROR(client.session_create("{oops", 30min), CACHEASIDE_INVALID_ARGUMENT);
    EXPECT_ERROR(client.session_create("1", 0ms), CACHEASIDE_INVALID_ARGUMENT);
}

void session_max_lifetime() {
    cacheaside::Client client(cacheaside::Config()
                                  .namespace_(env("CACHEASIDE_TEST_NAMESPACE"))
                                  .session_max_lifetime(300ms));
    EXPECT_ERROR(cacheaside::Config().session_max_lifetime(0ms), CACHEASIDE_INVALID_ARGUMENT);
    auto start = std::chrono::steady_clock::now();
    std::string id = client.session_create("true", 1h);
    // Read all the time with an hour of idle TTL, it still ends at 300 ms.
    while (client.session_get(id)) {
        EXPECT(std::chrono::steady_clock::now() - start < 30s);
        std::this_thread::sleep_for(20ms);
    }
    EXPECT(std::chrono::steady_clock::now() - start >= 290ms);
}

void pubsub(const cacheaside::Client &client) {
    Inbox plain, pattern;
    cacheaside::Subscription a =
        client.subscribe("cpp-news", [&](const cacheaside::Event &e) { plain.add(e); });
    cacheaside::Subscription b =
        client.psubscribe("cpp-*", [&](const cacheaside::Event &e) { pattern.add(e); });
    EXPECT(a && b);
    const int count = 200;
    for (int i = 0; i < count; i++) {
        EXPECT(client.publish("cpp-news", std::to_string(i)) == 2);
    }
    for (Inbox *inbox : {&plain, &pattern}) {
        std::vector<std::string> got = inbox->wait_for(count);
        EXPECT(got.size() == static_cast<std::size_t>(count));
        for (int i = 0; i < count; i++) {
            EXPECT(got[static_cast<std::size_t>(i)] == "cpp-news=" + std::to_string(i));
        }
        EXPECT(inbox->gaps() == 0);
    }
    // Binary payloads pass through.
    Inbox bytes;
    cacheaside::Subscription c =
        client.subscribe("bytes-cpp", [&](const cacheaside::Event &e) { bytes.add(e); });
    EXPECT(client.publish("bytes-cpp", std::string("a\0b", 3)) == 1);
    EXPECT(bytes.wait_for(1)[0] == std::string("bytes-cpp=a\0b", 13));

    // Moving keeps it alive; reset (or destruction) unsubscribes at once.
    cacheaside::Subscription moved = std::move(a);
    EXPECT(!a && moved);
    EXPECT(client.publish("cpp-news", "x") == 2);
    moved.reset();
    b = cacheaside::Subscription();
    c.reset();
    EXPECT(client.publish("cpp-news", "y") == 0);

    EXPECT_ERROR(client.subscribe("", [](const cacheaside::Event &) {}),
                 CACHEASIDE_INVALID_ARGUMENT);
    EXPECT_ERROR(client.psubscribe("a}b", [](const cacheaside::Event &) {}),
                 CACHEASIDE_INVALID_ARGUMENT);
    EXPECT_ERROR(client.publish("a{b", "x"), CACHEASIDE_INVALID_ARGUMENT);
}

void reset_from_own_callback(const cacheaside::Client &client) {
    std::mutex mutex;
    std::condition_variable changed;
    int calls = 0;
    bool returned = false;
    cacheaside::Subscription self;
    {
        // The callback cannot run before `self` holds the subscription.
        std::lock_guard<std::mutex> lock(mutex);
        self = client.subscribe("cpp-once", [&](const cacheaside::Event &) {
            std::unique_lock<std::mutex> lock(mutex);
            ++calls;
            self.reset();  // detaches: this call is the last
            returned = true;
            changed.notify_all();
        });
    }
    EXPECT(client.publish("cpp-once", "bye") == 1);
    {
        std::unique_lock<std::mutex> lock(mutex);
        EXPECT(changed.wait_for(lock, 60s, [&] { return returned; }));
    }
    auto deadline = std::chrono::steady_clock::now() + 60s;
    while (client.publish("cpp-once", "again") != 0) {
        EXPECT(std::chrono::steady_clock::now() < deadline);
        std::this_thread::sleep_for(10ms);
    }
    std::lock_guard<std::mutex> lock(mutex);
    EXPECT(calls == 1 && !self);
}

}  // namespace

int main() {
    try {
        cacheaside::Client client(cacheaside::Config()
                                      .users_table(env("CACHEASIDE_TEST_TABLE"))
                                      .namespace_(env("CACHEASIDE_TEST_NAMESPACE")));
        rate_limit(client);
        sessions(client);
        session_max_lifetime();
        pubsub(client);
        reset_from_own_callback(client);
    } catch (const cacheaside::Error &e) {
        std::cerr << "unexpected error " << e.status() << ": " << e.what() << "\n";
        return EXIT_FAILURE;
    }
    std::cout << "patterns (C++): ok\n";
    return EXIT_SUCCESS;
}
