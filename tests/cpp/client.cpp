// The C++ wrapper (include/cacheaside.hpp): RAII, std::optional results,
// cacheaside::Error, and 50 std::threads on a cold key through single-flight.
// Run by tests/c_abi.rs with CACHEASIDE_TEST_TABLE / _NAMESPACE set.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "cacheaside.hpp"
#include "test_support.hpp"

namespace {

using test_support::env;
using test_support::StartLine;

constexpr int kThreads = 50;

void miss_hit_update(const cacheaside::Client &client) {
    std::uint64_t before = client.query_count();
    auto ada = client.get_user_profile(1);
    EXPECT(ada.has_value());
    EXPECT(ada->name == "Ada Lovelace" && ada->email == "ada@example.com");
    EXPECT(ada->plan == "pro" && ada->version == 1);
    EXPECT(client.query_count() - before == 1);
    EXPECT(client.get_user_profile(1) == ada);
    EXPECT(client.query_count() - before == 1);  // the hit costs +0

    EXPECT(client.update_user_plan(1, "enterprise"));
    auto fresh = client.get_user_profile(1);
    EXPECT(fresh && fresh->plan == "enterprise" && fresh->version == 2);
    EXPECT(client.query_count() - before == 3);

    auto written = client.update_user_plan_write_through(2, "pro");
    EXPECT(written && written->plan == "pro" && written->version == 2);
    before = client.query_count();
    EXPECT(client.get_user_profile(2) == written);
    EXPECT(client.query_count() == before);
}

void missing_user(const cacheaside::Client &client) {
    EXPECT(!client.get_user_profile(999999).has_value());
    EXPECT(!client.get_user_profile_singleflight(999999).has_value());
    EXPECT(!client.update_user_plan(999999, "pro"));
    EXPECT(!client.update_user_plan_write_through(999999, "pro").has_value());
}

void fifty_threads_one_query(const cacheaside::Client &client) {
    StartLine start(kThreads);
    std::vector<std::optional<cacheaside::UserProfile>> results(kThreads);
    std::vector<std::thread> threads;
    std::uint64_t before = client.query_count();
    for (int i = 0; i < kThreads; i++) {
        threads.emplace_back([&, i] {
            start.arrive_and_wait();
            results[i] = client.get_user_profile_singleflight(3);
        });
    }
    for (auto &t : threads) t.join();
    EXPECT(client.query_count() - before == 1);
    for (const auto &r : results) {
        EXPECT(r.has_value() && *r == *results[0]);
    }
    EXPECT(results[0]->name == "Grace Hopper");
    EXPECT(client.in_flight() == 0);
}

void fifty_threads_one_load(const cacheaside::Client &client) {
    StartLine start(kThreads);
    std::atomic<int> calls{0};
    std::vector<std::optional<std::string>> results(kThreads);
    std::vector<std::thread> threads;
    for (int i = 0; i < kThreads; i++) {
        threads.emplace_back([&, i] {
            start.arrive_and_wait();
            results[i] = client.get_or_load(
                "greeting", std::chrono::minutes(1), [&](const std::string &key) {
                    calls++;
                    // A slow source (not a synchronization): the others
                    // arrive while it runs.
                    std::this_thread::sleep_for(std::chrono::milliseconds(50));
                    return std::optional<std::string>("hello from " + key);
                });
        });
    }
    for (auto &t : threads) t.join();
    EXPECT(calls == 1);
    for (const auto &r : results) {
        EXPECT(r == std::optional<std::string>("hello from greeting"));
    }
    EXPECT(client.in_flight() == 0);

    auto absent = [](const std::string &) { return std::optional<std::string>(); };
    EXPECT(!client.get_or_load("nothing", std::chrono::minutes(1), absent).has_value());

    // A loader's exception reaches its own caller, and nothing is cached.
    bool rethrown = false;
    try {
        client.get_or_load("thrower", std::chrono::minutes(1),
                           [](const std::string &) -> std::optional<std::string> {
                               throw std::runtime_error("source down");
                           });
    } catch (const std::runtime_error &e) {
        rethrown = std::string(e.what()) == "source down";
    }
    EXPECT(rethrown);
    auto ok = client.get_or_load("thrower", std::chrono::minutes(1), [](const std::string &) {
        return std::optional<std::string>("recovered");
    });
    EXPECT(ok == std::optional<std::string>("recovered"));

    // Not UTF-8: a value too, byte for byte.
    auto binary = client.get_or_load("binary", std::chrono::minutes(1), [](const std::string &) {
        return std::optional<std::string>("\xff\xfe");
    });
    EXPECT(binary == std::optional<std::string>("\xff\xfe"));
}

void bad_input(const cacheaside::Client &client) {
    EXPECT_ERROR(cacheaside::Config().users_table("users; drop table users"),
                 CACHEASIDE_INVALID_ARGUMENT);
    EXPECT_ERROR(cacheaside::Config().users_table(std::string("us\0ers", 6)),
                 CACHEASIDE_INVALID_ARGUMENT);
    EXPECT_ERROR(cacheaside::Config().namespace_("a{b"), CACHEASIDE_INVALID_ARGUMENT);
    EXPECT_ERROR(cacheaside::Config().ttl(std::chrono::milliseconds(0)),
                 CACHEASIDE_INVALID_ARGUMENT);
    EXPECT_ERROR(cacheaside::Config().beta(-1.0), CACHEASIDE_INVALID_ARGUMENT);
    EXPECT_ERROR(cacheaside::Config().local_cache(100, std::chrono::milliseconds(0)),
                 CACHEASIDE_INVALID_ARGUMENT);
    EXPECT_ERROR(cacheaside::Client(cacheaside::Config().database_url("not a url")),
                 CACHEASIDE_INVALID_ARGUMENT);
    EXPECT_ERROR(client.update_user_plan(1, ""), CACHEASIDE_INVALID_ARGUMENT);
    EXPECT_ERROR(client.update_user_plan(1, "\xff"), CACHEASIDE_INVALID_ARGUMENT);
    EXPECT_ERROR(client.update_user_plan_write_through(1, " "), CACHEASIDE_INVALID_ARGUMENT);
    EXPECT_ERROR(client.get_or_load("", std::chrono::minutes(1),
                                    [](const std::string &) {
                                        return std::optional<std::string>("x");
                                    }),
                 CACHEASIDE_INVALID_ARGUMENT);
    EXPECT_ERROR(client.invalidate(""), CACHEASIDE_INVALID_ARGUMENT);
    EXPECT(cacheaside::version() == CACHEASIDE_VERSION);
}

void a_hit_never_throws_when_its_early_refresh_does() {
    // Early refresh (XFetch) runs the caller's loader on a hit; if it throws,
    // the call still returns the cached value. The wrapper used to rethrow
    // it: a hit threw.
    cacheaside::Client client(cacheaside::Config()
                                  .users_table(env("CACHEASIDE_TEST_TABLE"))
                                  .namespace_(env("CACHEASIDE_TEST_NAMESPACE"))
                                  .outbox_table(env("CACHEASIDE_TEST_OUTBOX"))
                                  .beta(1e9));  // every hit of a 2 ms load is due
    auto slow = [](const std::string &) -> std::optional<std::string> {
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
        return std::string("cached");
    };
    EXPECT(client.get_or_load("refreshed", std::chrono::seconds(60), slow) == "cached");
    int thrown = 0;
    auto throwing = [&](const std::string &) -> std::optional<std::string> {
        thrown++;
        throw std::runtime_error("the database is down");
    };
    auto hit = client.get_or_load("refreshed", std::chrono::seconds(60), throwing);
    EXPECT(thrown == 1);  // the refresh ran, and threw
    EXPECT(hit == "cached");
    // A miss whose loader throws still rethrows to its caller.
    bool rethrown = false;
    try {
        client.get_or_load("never-cached", std::chrono::seconds(60), throwing);
    } catch (const std::runtime_error &) {
        rethrown = true;
    }
    EXPECT(rethrown);
}

void near_cache_hits_and_stats() {
    // L1 on: once its tracking connection is up, a repeated read is answered
    // from process memory, with no query, and the counters show it.
    cacheaside::Client client(cacheaside::Config()
                                  .users_table(env("CACHEASIDE_TEST_TABLE"))
                                  .namespace_(env("CACHEASIDE_TEST_NAMESPACE"))
                                  .outbox_table(env("CACHEASIDE_TEST_OUTBOX"))
                                  .invalidation_relay(false)
                                  .local_cache(1000, std::chrono::seconds(60)));
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (client.stats().local_hits == 0) {
        EXPECT(std::chrono::steady_clock::now() < deadline);
        EXPECT(client.get_user_profile(5).has_value());
    }
    uint64_t queries = client.query_count();
    auto before = client.stats();
    for (int i = 0; i < 100; i++) {
        EXPECT(client.get_user_profile(5)->id == 5);
    }
    auto after = client.stats();
    EXPECT(client.query_count() == queries);
    EXPECT(after.local_hits + after.local_misses - before.local_hits - before.local_misses == 100);
}

}  // namespace

int main() {
    try {
        cacheaside::Client client(cacheaside::Config()
                                      .users_table(env("CACHEASIDE_TEST_TABLE"))
                                      .namespace_(env("CACHEASIDE_TEST_NAMESPACE"))
                                      .outbox_table(env("CACHEASIDE_TEST_OUTBOX")));
        client.install_schema();
        client.seed_demo_users();
        // The relay's invalidations of the seeding must not land mid-test.
        EXPECT(client.relay_sync(std::chrono::seconds(30)));
        miss_hit_update(client);
        missing_user(client);
        fifty_threads_one_query(client);
        fifty_threads_one_load(client);
        bad_input(client);
        a_hit_never_throws_when_its_early_refresh_does();
        near_cache_hits_and_stats();
    } catch (const cacheaside::Error &e) {
        std::cerr << "unexpected cacheaside::Error " << e.status() << ": " << e.what() << "\n";
        return EXIT_FAILURE;
    }
    std::cout << "client: ok\n";
    return EXIT_SUCCESS;
}
