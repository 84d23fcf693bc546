/*
 * The old names still work for one release: each forwards to its renamed
 * function (this program silences their deprecation warnings; without
 * CACHEASIDE_NO_DEPRECATION_WARNINGS each use is a warning naming the new
 * function, which tests/c_abi.rs checks).
 */
#define _POSIX_C_SOURCE 200809L
#define CACHEASIDE_NO_DEPRECATION_WARNINGS

#include "test_support.h"

static int load(void *user_data, const char *key, cacheaside_bytes *out_value) {
    (void)key;
    ++*(int *)user_data;
    return cacheaside_bytes_set(out_value, "v", 1);
}

int main(void) {
    cacheaside_config *config = cacheaside_config_new();
    EXPECT(config != NULL);
    CHECK(cacheaside_config_set_users_table(config, test_env("CACHEASIDE_TEST_TABLE")));
    CHECK(cacheaside_config_set_namespace(config, test_env("CACHEASIDE_TEST_NAMESPACE")));
    CHECK(cacheaside_config_set_outbox_table(config, test_env("CACHEASIDE_TEST_OUTBOX")));
    CHECK(cacheaside_config_set_fail_safe_ms(config, 10000));
    CHECK(cacheaside_config_set_write_behind_backlog(config, 1000));
    CHECK(cacheaside_config_set_write_behind_claim_ms(config, 5000));
    CHECK(cacheaside_config_set_write_behind_retries(config, 3, 20));
    CHECK(cacheaside_config_set_breaker(config, 3, 1000));
    /* Two-field setters change both or neither. */
    EXPECT_STATUS(cacheaside_config_set_write_behind_retries(config, 0, 20),
                  CACHEASIDE_INVALID_ARGUMENT);
    EXPECT_STATUS(cacheaside_config_set_breaker(config, 3, 0), CACHEASIDE_INVALID_ARGUMENT);
    EXPECT_STATUS(cacheaside_set_log_callback(0, NULL, NULL), CACHEASIDE_INVALID_ARGUMENT);

    cacheaside_client *client = NULL;
    CHECK(cacheaside_client_open(config, &client));
    cacheaside_config_free(config);
    CHECK(cacheaside_install_schema(client));
    CHECK(cacheaside_seed_demo_users(client));
    CHECK(cacheaside_relay_sync(client, 30000));

    int calls = 0;
    cacheaside_bytes value = {0};
    CHECK(cacheaside_get_or_load(client, "old", 60000, load, &calls, &value));
    cacheaside_bytes_free(&value);
    CHECK(cacheaside_get_or_load(client, "old", 60000, load, &calls, &value));
    cacheaside_bytes_free(&value);
    EXPECT(calls == 1);
    CHECK(cacheaside_invalidate(client, "old"));
    CHECK(cacheaside_get_or_load(client, "old", 60000, load, &calls, &value));
    cacheaside_bytes_free(&value);
    EXPECT(calls == 2);
    EXPECT(cacheaside_query_count(client) == cacheaside_client_query_count(client));
    EXPECT(cacheaside_in_flight(client) == 0);

    CHECK(cacheaside_drop_schema(client));
    CHECK(cacheaside_delete_namespace(client));
    cacheaside_client_free(client);
    puts("deprecated: ok");
    return EXIT_SUCCESS;
}
