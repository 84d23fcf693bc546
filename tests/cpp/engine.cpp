// cacheaside::Engine, the C++ face of cacheaside_engine: RAII, single-flight
// reads from many threads, versioned reads and write-through, the
// uncoalesced read, binary values, errors that carry the status name, and
// batch reads (get_or_load_many, invalidate_many).
#include <atomic>
#include <map>
#include <stdexcept>
#include <thread>
#include <vector>

#include "test_support.hpp"

using namespace std::chrono_literals;

namespace {

constexpr int kThreads = 50;

cacheaside::Config test_config() {
    cacheaside::Config config;
    config.namespace_(test_support::env("CACHEASIDE_TEST_NAMESPACE"))
        .outbox_table(test_support::env("CACHEASIDE_TEST_OUTBOX"))
        .cache_timeout(2000ms)
        .lease_ttl(6000ms)
        .lock_ttl(6000ms);
    return config;
}

void single_flight_from_many_threads(const cacheaside::Engine &engine) {
    std::atomic<int> loads{0};
    test_support::StartLine start(kThreads);
    std::vector<std::optional<std::string>> results(kThreads);
    std::vector<std::thread> threads;
    for (int i = 0; i < kThreads; i++) {
        threads.emplace_back([&, i] {
            start.arrive_and_wait();
            results[i] = engine.get_or_load("report", 1min, [&](const std::string &key) {
                loads++;
                // Not a synchronization: a slow source, so the others arrive.
                std::this_thread::sleep_for(50ms);
                return std::optional<std::string>(key + "=42");
            });
        });
    }
    for (auto &t : threads) t.join();
    EXPECT(loads == 1);
    for (const auto &r : results) EXPECT(r == std::optional<std::string>("report=42"));
    EXPECT(engine.stats().in_flight == 0);
}

void versioned_and_write_through(const cacheaside::Engine &engine) {
    // The "table": one row with a version.
    cacheaside::Versioned row{"price=100", 1};
    int loads = 0;
    auto load = [&](const std::string &) {
        loads++;
        return std::optional<cacheaside::Versioned>(row);
    };
    EXPECT(engine.get_or_load_versioned("price:1", 1min, load) ==
           std::optional<std::string>("price=100"));
    auto written = engine.write_through("price:1", 1min, [&](const std::string &) {
        row = cacheaside::Versioned{"price=120", row.version + 1};
        return std::optional<cacheaside::Versioned>(row);
    });
    EXPECT(written == std::optional<std::string>("price=120"));
    EXPECT(engine.get_or_load_versioned("price:1", 1min, load) ==
           std::optional<std::string>("price=120"));
    EXPECT(loads == 1);  // the second read was the written value, a hit
    auto none = engine.write_through("price:404", 1min, [](const std::string &) {
        return std::optional<cacheaside::Versioned>();
    });
    EXPECT(!none);

    engine.invalidate("price:1");
    engine.invalidate_tag("prices");
    EXPECT(engine.get_or_load_versioned("price:1", 1min, load) ==
           std::optional<std::string>("price=120"));
    EXPECT(loads == 2);
}

void uncoalesced_binary_and_absent(const cacheaside::Engine &engine) {
    int loads = 0;
    const std::string blob("\x00\xff\x80", 3);
    auto load = [&](const std::string &) {
        loads++;
        return std::optional<std::string>(blob);
    };
    EXPECT(engine.get_or_load_uncoalesced("blob", 1min, load) == std::optional<std::string>(blob));
    EXPECT(engine.get_or_load_uncoalesced("blob", 1min, load) == std::optional<std::string>(blob));
    EXPECT(loads == 1);
    auto absent = [](const std::string &) { return std::optional<std::string>(); };
    EXPECT(!engine.get_or_load("nothing", 1min, absent));
}

void errors_carry_the_status_name(const cacheaside::Engine &engine) {
    bool named = false;
    try {
        engine.get_or_load("", 1min, [](const std::string &) { return std::optional<std::string>(); });
    } catch (const cacheaside::Error &e) {
        named = e.status() == CACHEASIDE_INVALID_ARGUMENT &&
                std::string(e.status_name()) == "CACHEASIDE_INVALID_ARGUMENT" &&
                std::string(e.what()).rfind("CACHEASIDE_INVALID_ARGUMENT: ", 0) == 0;
    }
    EXPECT(named);
    EXPECT_ERROR(engine.capture_changes("", "p:", "id"), CACHEASIDE_INVALID_ARGUMENT);
    EXPECT_ERROR(engine.relay_sync(0ms), CACHEASIDE_INVALID_ARGUMENT);

    // A loader's own exception reaches its caller; nothing is cached.
    bool rethrown = false;
    try {
        engine.get_or_load("thrower", 1min, [](const std::string &) -> std::optional<std::string> {
            throw std::runtime_error("source down");
        });
    } catch (const std::runtime_error &e) {
        rethrown = std::string(e.what()) == "source down";
    }
    EXPECT(rethrown);
}

void batch_reads_and_invalidation(const cacheaside::Engine &engine) {
    int calls = 0;
    size_t asked = 0;
    auto load = [&](const std::vector<std::string> &missing) {
        ++calls;
        asked += missing.size();
        std::vector<std::pair<std::string, std::string>> rows;
        for (const auto &key : missing) {
            if (key != "item:9") rows.emplace_back(key, "value-" + key);  // item:9: no row
        }
        return rows;
    };
    const std::vector<std::string> keys{"item:2", "item:9", "item:1", "item:2"};
    using Values = std::vector<std::optional<std::string>>;
    const Values want{"value-item:2", std::nullopt, "value-item:1", "value-item:2"};
    EXPECT(engine.get_or_load_many(keys, 1min, load) == want);
    EXPECT(calls == 1 && asked == 3);  // item:2 asked once
    EXPECT(engine.get_or_load_many(keys, 1min, load) == want);
    EXPECT(calls == 1);  // hits, and a cached absence
    engine.invalidate_many({"item:1"});
    EXPECT(engine.get_or_load_many(keys, 1min, load) == want);
    EXPECT(calls == 2 && asked == 4);
    // A loader's exception reaches the caller; nothing is cached.
    bool rethrown = false;
    try {
        engine.get_or_load_many({"item:5"}, 1min, [](const std::vector<std::string> &)
                                    -> std::vector<std::pair<std::string, std::string>> {
            throw std::runtime_error("source down");
        });
    } catch (const std::runtime_error &e) {
        rethrown = std::string(e.what()) == "source down";
    }
    EXPECT(rethrown);
    EXPECT_ERROR(engine.get_or_load_many({"bad{key}"}, 1min, load), CACHEASIDE_INVALID_ARGUMENT);
}

}  // namespace

int main() {
    try {
        cacheaside::Engine engine(test_config());
        engine.ping();
        single_flight_from_many_threads(engine);
        versioned_and_write_through(engine);
        uncoalesced_binary_and_absent(engine);
        errors_carry_the_status_name(engine);
        batch_reads_and_invalidation(engine);
        engine.delete_namespace();
    } catch (const cacheaside::Error &e) {
        std::cerr << "unexpected error " << e.what() << "\n";
        return EXIT_FAILURE;
    }
    std::cout << "engine.cpp: ok\n";
    return EXIT_SUCCESS;
}
