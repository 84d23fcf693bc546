// Write-behind through the C++ wrapper: an enqueued change is read at once
// from several threads, drain reports a timeout as false and success as
// true, a full backlog throws CACHEASIDE_BACKLOG_FULL, and the counters
// show what the workers did.
// Run by tests/c_abi.rs with CACHEASIDE_TEST_TABLE / _NAMESPACE / _OUTBOX set.
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include "cacheaside.hpp"
#include "test_support.hpp"

namespace {

using test_support::env;

cacheaside::Config config() {
    using namespace std::chrono_literals;
    cacheaside::Config config;
    config.users_table(env("CACHEASIDE_TEST_TABLE"))
        .namespace_(env("CACHEASIDE_TEST_NAMESPACE"))
        .outbox_table(env("CACHEASIDE_TEST_OUTBOX"))
        .cache_timeout(2000ms)
        .lease_ttl(6000ms)
        .lock_ttl(6000ms)
        .write_behind_claim(1000ms)
        .write_behind_retries(3, 20ms)
        .write_behind_backlog(3);
    return config;
}

}  // namespace

int main() {
    using namespace std::chrono_literals;
    try {
        cacheaside::Client client(config());
        client.install_schema();
        client.seed_demo_users();
        EXPECT(client.relay_sync(30s));

        EXPECT(!client.update_user_plan_write_behind(999999, "pro"));
        EXPECT(client.update_user_plan_write_behind(1, "cpp-1"));
        EXPECT(client.update_user_plan_write_behind(1, "cpp-2"));
        EXPECT(client.update_user_plan_write_behind(2, "cpp-3"));
        EXPECT_ERROR(client.update_user_plan_write_behind(3, "refused"), CACHEASIDE_BACKLOG_FULL);
        EXPECT(client.write_behind_pending() == 3);

        // Read at once, from any thread, before any worker runs.
        std::vector<std::thread> readers;
        std::vector<std::string> plans(4);
        for (int i = 0; i < 4; i++) {
            readers.emplace_back([&, i] { plans[i] = client.get_user_profile(1)->plan; });
        }
        for (auto &t : readers) t.join();
        for (const auto &plan : plans) EXPECT(plan == "cpp-2");
        EXPECT(client.get_user_profile(3)->plan == "enterprise");  // the refused one

        EXPECT(!client.write_behind_drain(100ms));  // no worker yet
        client.write_behind_start(2);
        EXPECT_ERROR(client.write_behind_start(1), CACHEASIDE_INVALID_ARGUMENT);
        EXPECT(client.write_behind_drain(30s));
        EXPECT(client.write_behind_pending() == 0);
        std::uint64_t before = client.query_count();
        auto ada = client.get_user_profile(1);  // loaded from PostgreSQL
        EXPECT(client.query_count() == before + 1);
        EXPECT(ada && ada->plan == "cpp-2" && ada->version > 1000000);

        cacheaside_stats stats = client.stats();
        EXPECT(stats.write_behind_enqueued == 3);
        EXPECT(stats.write_behind_applied + stats.write_behind_coalesced == 3);
        EXPECT(stats.write_behind_dead_lettered == 0);

        client.write_behind_stop();
        client.write_behind_stop();  // a no-op
        client.drop_schema();
    } catch (const cacheaside::Error &e) {
        std::cerr << "unexpected error " << e.status() << ": " << e.what() << "\n";
        return EXIT_FAILURE;
    }
    std::cout << "cpp write_behind: ok\n";
    return EXIT_SUCCESS;
}
