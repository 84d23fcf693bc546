/*
 * The near cache (L1) through the C ABI: the setter checks its input, a
 * repeated read is answered from process memory with no query, the L1
 * counters are visible in cacheaside_stats, and an update is seen at once
 * by the process that made it.
 */
#define _POSIX_C_SOURCE 200809L

#include <time.h>

#include "test_support.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static cacheaside_stats stats_of(const cacheaside_client *client) {
    cacheaside_stats s = {0};
    s.size = sizeof s;
    CHECK(cacheaside_client_stats(client, &s));
    EXPECT(s.size == sizeof s);
    return s;
}

static void setter_checks_its_input(void) {
    cacheaside_config *config = cacheaside_config_new();
    EXPECT(config != NULL);
    EXPECT_STATUS(cacheaside_config_set_local_cache(NULL, 100, 1000),
                  CACHEASIDE_INVALID_ARGUMENT);
    /* On, with no staleness allowed at all: refused. */
    EXPECT_STATUS(cacheaside_config_set_local_cache(config, 100, 0),
                  CACHEASIDE_INVALID_ARGUMENT);
    CHECK(cacheaside_config_set_local_cache(config, 0, 0)); /* off */
    CHECK(cacheaside_config_set_local_cache(config, 100, 1000));
    cacheaside_config_free(config);
}

int main(void) {
    setter_checks_its_input();

    cacheaside_config *config = cacheaside_config_new();
    EXPECT(config != NULL);
    CHECK(cacheaside_config_set_users_table(config, test_env("CACHEASIDE_TEST_TABLE")));
    CHECK(cacheaside_config_set_namespace(config, test_env("CACHEASIDE_TEST_NAMESPACE")));
    CHECK(cacheaside_config_set_outbox_table(config, test_env("CACHEASIDE_TEST_OUTBOX")));
    CHECK(cacheaside_config_set_cache_timeout_ms(config, 2000));
    CHECK(cacheaside_config_set_lease_ttl_ms(config, 6000));
    CHECK(cacheaside_config_set_lock_ttl_ms(config, 6000));
    CHECK(cacheaside_config_set_local_cache(config, 1000, 60000));
    cacheaside_client *client = NULL;
    CHECK(cacheaside_client_open(config, &client));
    cacheaside_config_free(config);
    CHECK(cacheaside_client_install_schema(client));
    CHECK(cacheaside_client_seed_demo_users(client));
    CHECK(cacheaside_client_relay_sync(client, 30000));

    /* The first read fills Redis, a later Redis hit fills L1 (once its
     * tracking connection is up): read until L1 answers. */
    cacheaside_user_profile p = {0};
    double deadline = now_s() + 30;
    while (stats_of(client).local_hits == 0) {
        EXPECT(now_s() < deadline);
        CHECK(cacheaside_get_user_profile(client, 1, &p));
        EXPECT(strcmp(p.plan, "pro") == 0);
        cacheaside_user_profile_free(&p);
    }
    cacheaside_stats before = stats_of(client);
    uint64_t queries = cacheaside_client_query_count(client);
    for (int i = 0; i < 100; i++) {
        CHECK(cacheaside_get_user_profile(client, 1, &p));
        EXPECT(strcmp(p.plan, "pro") == 0);
        cacheaside_user_profile_free(&p);
    }
    cacheaside_stats after = stats_of(client);
    EXPECT(cacheaside_client_query_count(client) == queries);
    EXPECT(after.local_hits + after.local_misses - before.local_hits - before.local_misses == 100);
    EXPECT(after.local_hits > before.local_hits);
    EXPECT(after.local_clears == 0);

    /* This process's own write evicts L1 before it returns. */
    CHECK(cacheaside_update_user_plan(client, 1, "team"));
    CHECK(cacheaside_get_user_profile(client, 1, &p));
    EXPECT(strcmp(p.plan, "team") == 0);
    cacheaside_user_profile_free(&p);

    cacheaside_client_free(client);
    puts("near: ok");
    return EXIT_SUCCESS;
}
