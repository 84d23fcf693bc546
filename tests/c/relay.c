/*
 * The invalidation relay through the C ABI: a row cached, then changed by
 * plain SQL that bypasses the library (the test harness runs it when this
 * program asks), reads as changed once the relay has applied the outbox;
 * the relay's counters show it. A client with the relay off has none.
 */
#define _POSIX_C_SOURCE 200809L

#include "test_support.h"

/* Asks the harness to run `sql` on a connection of its own, and waits. */
static void run_sql_elsewhere(const char *sql) {
    printf("SQL: %s\n", sql);
    fflush(stdout);
    char answer[16];
    EXPECT(fgets(answer, sizeof answer, stdin) != NULL);
    EXPECT(strncmp(answer, "done", 4) == 0);
}

int main(void) {
    cacheaside_client *client = open_test_client();
    cacheaside_user_profile p = {0};
    CHECK(cacheaside_get_user_profile(client, 1, &p)); /* cached */
    EXPECT(strcmp(p.plan, "pro") == 0);
    cacheaside_user_profile_free(&p);

    char sql[256];
    snprintf(sql, sizeof sql, "UPDATE %s SET plan = 'from-sql' WHERE id = 1",
             test_env("CACHEASIDE_TEST_TABLE"));
    run_sql_elsewhere(sql);
    CHECK(cacheaside_client_relay_sync(client, 10000));
    CHECK(cacheaside_get_user_profile(client, 1, &p));
    EXPECT(strcmp(p.plan, "from-sql") == 0);
    EXPECT(p.version > 1000000000000000LL); /* the trigger moved it to the clock, in microseconds */
    cacheaside_user_profile_free(&p);

    cacheaside_stats stats = {.size = sizeof stats};
    CHECK(cacheaside_client_stats(client, &stats));
    EXPECT(stats.relay_invalidations >= 1);
    EXPECT(stats.relay_rounds >= 1);

    /* Without the relay, nothing applies the outbox. */
    cacheaside_config *config = cacheaside_config_new();
    CHECK(cacheaside_config_set_users_table(config, test_env("CACHEASIDE_TEST_TABLE")));
    CHECK(cacheaside_config_set_namespace(config, test_env("CACHEASIDE_TEST_NAMESPACE")));
    CHECK(cacheaside_config_set_outbox_table(config, test_env("CACHEASIDE_TEST_OUTBOX")));
    CHECK(cacheaside_config_set_invalidation_relay(config, false));
    cacheaside_client *quiet = NULL;
    CHECK(cacheaside_client_open(config, &quiet));
    cacheaside_config_free(config);
    EXPECT_STATUS(cacheaside_client_relay_sync(quiet, 100), CACHEASIDE_TIMEOUT);
    EXPECT(strstr(cacheaside_last_error(), "no invalidation relay") != NULL);
    cacheaside_client_free(quiet);

    CHECK(cacheaside_client_drop_schema(client));
    cacheaside_client_free(client);
    puts("relay: ok");
    return EXIT_SUCCESS;
}
