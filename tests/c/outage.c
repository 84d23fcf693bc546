/*
 * A Redis outage through the C ABI: a client whose Redis refuses
 * connections opens, installs its schema, seeds, reads the right rows from
 * PostgreSQL (the circuit breaker opens and reads stop trying Redis), and
 * updates (the invalidation is left to the relay); ping reports the cause.
 */
#define _POSIX_C_SOURCE 200809L

#include "test_support.h"

int main(void) {
    cacheaside_config *config = cacheaside_config_new();
    EXPECT(config != NULL);
    CHECK(cacheaside_config_set_users_table(config, test_env("CACHEASIDE_TEST_TABLE")));
    CHECK(cacheaside_config_set_namespace(config, test_env("CACHEASIDE_TEST_NAMESPACE")));
    CHECK(cacheaside_config_set_outbox_table(config, test_env("CACHEASIDE_TEST_OUTBOX")));
    CHECK(cacheaside_config_set_redis_url(config, test_env("CACHEASIDE_TEST_DOWN_REDIS")));
    CHECK(cacheaside_config_set_cache_timeout_ms(config, 200));
    cacheaside_client *client = NULL;
    CHECK(cacheaside_client_open(config, &client)); /* Redis down: opens anyway */
    cacheaside_config_free(config);
    CHECK(cacheaside_install_schema(client));
    CHECK(cacheaside_seed_demo_users(client)); /* invalidations left to the relay */

    static const char *names[] = {"Ada Lovelace", "Alan Turing", "Grace Hopper",
                                  "Edsger Dijkstra", "Barbara Liskov"};
    for (int round = 0; round < 3; round++) {
        for (int64_t id = 1; id <= 5; id++) {
            cacheaside_user_profile p = {0};
            CHECK(cacheaside_get_user_profile(client, id, &p));
            EXPECT(strcmp(p.name, names[id - 1]) == 0);
            cacheaside_user_profile_free(&p);
        }
    }
    CHECK(cacheaside_update_user_plan(client, 2, "written-in-outage"));
    cacheaside_user_profile p = {0};
    CHECK(cacheaside_get_user_profile_singleflight(client, 2, &p));
    EXPECT(strcmp(p.plan, "written-in-outage") == 0);
    cacheaside_user_profile_free(&p);

    cacheaside_stats stats = {.size = sizeof stats};
    CHECK(cacheaside_client_stats(client, &stats));
    EXPECT(stats.breaker_opened == 1);
    EXPECT(stats.bypassed >= 10);  /* most reads never tried Redis */
    EXPECT(stats.hits == 0);
    EXPECT(stats.invalidations_failed >= 1);

    EXPECT_STATUS(cacheaside_client_ping(client), CACHEASIDE_CACHE_ERROR);
    EXPECT(strstr(cacheaside_last_error(), "refused") != NULL);

    CHECK(cacheaside_drop_schema(client));
    cacheaside_client_free(client);
    puts("outage: ok");
    return EXIT_SUCCESS;
}
