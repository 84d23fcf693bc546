/*
 * A Redis outage through the C ABI: a client whose Redis refuses
 * connections opens, installs its schema, seeds, reads the right rows from
 * PostgreSQL (the circuit breaker opens and reads stop trying Redis), and
 * updates (the invalidation is left to the relay); ping reports the cause,
 * and the log callback hears of the breaker opening.
 */
#define _POSIX_C_SOURCE 200809L

#include <stdatomic.h>

#include "test_support.h"

/* Log events seen, and whether one told of the breaker opening. */
static atomic_int logged;
static atomic_int breaker_opened_logged;

static void on_log(void *user_data, cacheaside_log_level level, const char *message) {
    (void)user_data;
    atomic_fetch_add(&logged, 1);
    if (level == CACHEASIDE_LOG_WARN && strstr(message, "circuit breaker opened") != NULL) {
        atomic_store(&breaker_opened_logged, 1);
    }
}

int main(void) {
    CHECK(cacheaside_log_set_callback(CACHEASIDE_LOG_WARN, on_log, NULL));
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
    CHECK(cacheaside_client_install_schema(client));
    CHECK(cacheaside_client_seed_demo_users(client)); /* invalidations left to the relay */

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

    EXPECT(atomic_load(&breaker_opened_logged) == 1); /* told through the log callback */
    EXPECT_STATUS(cacheaside_client_ping(client), CACHEASIDE_CACHE_ERROR);
    EXPECT(strstr(cacheaside_last_error(), "refused") != NULL);

    CHECK(cacheaside_log_set_callback(CACHEASIDE_LOG_WARN, NULL, NULL)); /* stop */
    int seen = atomic_load(&logged);
    CHECK(cacheaside_client_drop_schema(client));
    cacheaside_client_free(client);
    EXPECT(atomic_load(&logged) == seen);
    puts("outage: ok");
    return EXIT_SUCCESS;
}
