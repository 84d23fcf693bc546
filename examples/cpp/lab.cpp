// The cache-aside lab in C++17 through include/cacheaside.hpp: miss, hit,
// update, fresh read, and 50 threads on a cold key through single-flight.
//
// Build and run (from the repository root):  make -C examples run
//
// Uses its own table (cacheaside_cpp_lab), outbox (cacheaside_cpp_lab_outbox)
// and Redis namespace (cpp-lab:); DATABASE_URL and REDIS_URL override the
// default servers. At the end it drops its tables and deletes its namespace
// (if it crashes first, `make -C examples clean-db` drops them).
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "cacheaside.hpp"

namespace {

constexpr int kThreads = 50;

// std::latch is C++20; this is the C++17 equivalent for one use.
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

void show(const char *step, const cacheaside::UserProfile &p, std::uint64_t queries) {
    std::cout << step << " id=" << p.id << " name=" << p.name << " plan=" << p.plan
              << " version=" << p.version << "  (queries +" << queries << ")\n";
}

}  // namespace

int main() try {
    std::cout << "cacheaside " << cacheaside::version() << " (header " << CACHEASIDE_VERSION
              << ")\n";
    cacheaside::Client client(
        cacheaside::Config()
            .users_table("cacheaside_cpp_lab")
            .namespace_("cpp-lab:")
            .outbox_table("cacheaside_cpp_lab_outbox"));
    client.drop_schema();  // a fresh table every run
    client.install_schema();
    client.seed_demo_users();
    client.delete_namespace();  // start with a cold cache
    // The seeding's invalidations, and the relay's replay of the outbox
    // that an emptied namespace sets off (its marker is gone), are behind us.
    client.relay_sync(std::chrono::seconds(10));

    std::uint64_t last = client.query_count();
    auto delta = [&] {
        std::uint64_t now = client.query_count();
        std::uint64_t d = now - last;
        last = now;
        return d;
    };

    std::optional<cacheaside::UserProfile> ada = client.get_user_profile(1);
    show("1. miss (Postgres):   ", ada.value(), delta());
    ada = client.get_user_profile(1);
    show("2. hit (Redis only):  ", ada.value(), delta());
    client.update_user_plan(1, "enterprise");
    std::cout << "3. update:             plan=enterprise, cache entry invalidated  (queries +"
              << delta() << ")\n";
    ada = client.get_user_profile(1);
    show("4. fresh read:        ", ada.value(), delta());

    StartLine start(kThreads);
    std::vector<std::optional<cacheaside::UserProfile>> results(kThreads);
    std::vector<std::thread> threads;
    for (int i = 0; i < kThreads; i++) {
        threads.emplace_back([&, i] {
            start.arrive_and_wait();  // all miss the cold key together
            results[i] = client.get_user_profile_singleflight(2);
        });
    }
    for (std::thread &t : threads) {
        t.join();
    }
    bool identical = true;
    for (const auto &r : results) {
        identical = identical && r.has_value() && *r == *results[0];
    }
    std::uint64_t queries = delta();
    std::cout << "5. " << kThreads << " threads, cold key (single-flight): " << results[0]->name
              << ", " << (identical ? "identical profiles" : "PROFILES DIFFER")
              << ", queries: " << queries << "\n";

    // Leave nothing behind.
    client.drop_schema();
    client.delete_namespace();
    return identical && queries == 1 ? EXIT_SUCCESS : EXIT_FAILURE;
} catch (const cacheaside::Error &e) {
    std::cerr << "cacheaside error (status " << e.status() << "): " << e.what() << "\n";
    return EXIT_FAILURE;
}
