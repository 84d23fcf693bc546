/*
 * Every bad input returns its status (and a message) without crashing;
 * every free function accepts NULL and a second call; version macros match
 * the library.
 */
#define _POSIX_C_SOURCE 200809L

#include <math.h>
#include <pthread.h>

#include "test_support.h"

static const char NOT_UTF8[] = {(char)0xff, (char)0xfe, 'x', 0};

#define EXPECT_INVALID(call)                                          \
    do {                                                              \
        EXPECT_STATUS(call, CACHEASIDE_INVALID_ARGUMENT);             \
        EXPECT(cacheaside_last_error()[0] != '\0');                   \
    } while (0)

static int never_called(void *user_data, const char *key, cacheaside_bytes *out) {
    (void)user_data;
    (void)key;
    (void)out;
    fprintf(stderr, "a loader ran for an invalid call\n");
    exit(EXIT_FAILURE);
}

static void config_setters(void) {
    cacheaside_config *config = cacheaside_config_new();
    EXPECT(config != NULL);

    EXPECT_INVALID(cacheaside_config_set_users_table(config, "users; drop table users"));
    EXPECT(strstr(cacheaside_last_error(), "not an SQL identifier") != NULL);
    EXPECT_INVALID(cacheaside_config_set_users_table(config, ""));
    EXPECT_INVALID(cacheaside_config_set_users_table(config, "a.b.c"));
    EXPECT_INVALID(cacheaside_config_set_users_table(config, NOT_UTF8));
    EXPECT(strstr(cacheaside_last_error(), "UTF-8") != NULL);
    EXPECT_INVALID(cacheaside_config_set_users_table(config, NULL));
    EXPECT(strstr(cacheaside_last_error(), "NULL") != NULL);
    EXPECT_INVALID(cacheaside_config_set_users_table(NULL, "users"));
    CHECK(cacheaside_config_set_users_table(config, "app.users_2"));

    EXPECT_INVALID(cacheaside_config_set_namespace(config, "a{b"));
    EXPECT_INVALID(cacheaside_config_set_namespace(config, "a\nb"));
    EXPECT_INVALID(cacheaside_config_set_namespace(config, NOT_UTF8));
    EXPECT_INVALID(cacheaside_config_set_namespace(config, NULL));
    EXPECT_INVALID(cacheaside_config_set_namespace(NULL, "ns:"));

    EXPECT_INVALID(cacheaside_config_set_database_url(config, NOT_UTF8));
    EXPECT_INVALID(cacheaside_config_set_database_url(config, NULL));
    EXPECT_INVALID(cacheaside_config_set_redis_url(config, NOT_UTF8));
    EXPECT_INVALID(cacheaside_config_set_redis_url(NULL, "redis://127.0.0.1/"));
    EXPECT_INVALID(cacheaside_config_set_redis_ca_file(config, NOT_UTF8));
    EXPECT_INVALID(cacheaside_config_set_redis_ca_file(config, NULL));
    EXPECT_INVALID(cacheaside_config_set_redis_ca_file(NULL, "ca.pem"));
    EXPECT_INVALID(cacheaside_config_set_database_ca_file(config, NOT_UTF8));
    EXPECT_INVALID(cacheaside_config_set_database_ca_file(config, NULL));
    EXPECT_INVALID(cacheaside_config_set_database_ca_file(NULL, "ca.pem"));

    EXPECT_INVALID(cacheaside_config_set_ttl_ms(config, 0));
    EXPECT_INVALID(cacheaside_config_set_ttl_ms(NULL, 1000));
    EXPECT_INVALID(cacheaside_config_set_negative_ttl_ms(config, 0));
    EXPECT_INVALID(cacheaside_config_set_lease_ttl_ms(config, 0));
    EXPECT_INVALID(cacheaside_config_set_lock_ttl_ms(config, 0));
    EXPECT_INVALID(cacheaside_config_set_lock_wait_ms(NULL, 0));
    EXPECT_INVALID(cacheaside_config_set_beta(config, -1.0));
    EXPECT_INVALID(cacheaside_config_set_beta(config, NAN));
    EXPECT_INVALID(cacheaside_config_set_beta(config, INFINITY));
    CHECK(cacheaside_config_set_beta(config, 0.0));
    CHECK(cacheaside_config_set_ttl_ms(config, 1));
    EXPECT_INVALID(cacheaside_config_set_ttl_ms(config, UINT64_MAX));
    EXPECT(strstr(cacheaside_last_error(), "maximum TTL") != NULL);

    EXPECT_INVALID(cacheaside_config_set_db_pool_size(config, 0));
    EXPECT_INVALID(cacheaside_config_set_db_pool_size(NULL, 4));
    CHECK(cacheaside_config_set_db_pool_size(config, 4));
    EXPECT_INVALID(cacheaside_config_set_cache_pool_size(config, 0));
    CHECK(cacheaside_config_set_cache_pool_size(config, 4));
    EXPECT_INVALID(cacheaside_config_set_pool_timeout_ms(config, 0));
    EXPECT_INVALID(cacheaside_config_set_connect_timeout_ms(config, 0));
    EXPECT_INVALID(cacheaside_config_set_cache_timeout_ms(config, 0));
    EXPECT_INVALID(cacheaside_config_set_statement_timeout_ms(config, 0));
    EXPECT_INVALID(cacheaside_config_set_lock_poll_ms(config, 0));
    EXPECT_INVALID(cacheaside_config_set_lock_poll_ms(NULL, 2));
    EXPECT_INVALID(cacheaside_config_set_fail_safe_max_ms(config, UINT64_MAX));
    CHECK(cacheaside_config_set_fail_safe_max_ms(config, 0)); /* off */
    EXPECT_INVALID(cacheaside_config_set_fail_safe_throttle_ms(NULL, 1));
    EXPECT_INVALID(cacheaside_config_set_soft_timeout_ms(NULL, 1));
    EXPECT_INVALID(cacheaside_config_set_breaker_cool_off_ms(config, 0));
    CHECK(cacheaside_config_set_breaker_failures(config, 0)); /* off */
    EXPECT_INVALID(cacheaside_config_set_pool_min_idle(config, 0));
    CHECK(cacheaside_config_set_pool_min_idle(config, 2));
    EXPECT_INVALID(cacheaside_config_set_background_threads(NULL, 2));
    CHECK(cacheaside_config_set_background_threads(config, 0));
    EXPECT_INVALID(cacheaside_config_set_relay_listen(NULL, false));
    CHECK(cacheaside_config_set_relay_listen(config, false));
    EXPECT_INVALID(cacheaside_config_set_outbox_retention_ms(config, 0));
    CHECK(cacheaside_config_set_statement_cache_size(config, 0));
    EXPECT_INVALID(cacheaside_config_set_write_behind_batch(config, 0));
    EXPECT_INVALID(cacheaside_config_set_write_behind_batch(config, 10001));
    EXPECT_INVALID(cacheaside_config_set_write_behind_attempts(config, 0));
    EXPECT_INVALID(cacheaside_config_set_write_behind_retry_backoff_ms(config, 0));
    EXPECT_INVALID(cacheaside_config_set_invalidation_relay(NULL, true));
    CHECK(cacheaside_config_set_invalidation_relay(config, false));
    EXPECT_INVALID(cacheaside_config_set_outbox_table(config, "outbox; drop table x"));
    EXPECT_INVALID(cacheaside_config_set_outbox_table(config, NULL));
    EXPECT_INVALID(cacheaside_config_set_relay_poll_ms(config, 0));
    EXPECT_INVALID(cacheaside_config_set_replica_url(config, NULL));
    EXPECT_INVALID(cacheaside_config_set_replica_url(config, "postgres://u:s3cret@h:notaport/db"));
    EXPECT(strstr(cacheaside_last_error(), "s3cret") == NULL);
    CHECK(cacheaside_config_set_replica_url(config, "postgres://u@replica:5433/db"));
    CHECK(cacheaside_config_set_replica_url(config, "")); /* off */
    EXPECT_INVALID(cacheaside_config_set_replica_max_lag_ms(config, 0));
    EXPECT_INVALID(cacheaside_config_set_replica_max_lag_ms(NULL, 1000));
    CHECK(cacheaside_config_set_replica_max_lag_ms(config, 1000));

    cacheaside_config_free(config);
    cacheaside_config_free(NULL);
}

static void settings_that_do_not_fit_together_fail_at_open(void) {
    /* Setters take each value alone, in any order; open checks the mix. */
    cacheaside_config *config = cacheaside_config_new();
    EXPECT(config != NULL);
    CHECK(cacheaside_config_set_pool_timeout_ms(config, 100));
    CHECK(cacheaside_config_set_cache_timeout_ms(config, 1000));
    cacheaside_client *client = (cacheaside_client *)1;
    EXPECT_INVALID(cacheaside_client_open(config, &client));
    EXPECT(client == NULL);
    EXPECT(strstr(cacheaside_last_error(), "cache_timeout") != NULL);
    EXPECT(strstr(cacheaside_last_error(), "pool_timeout") != NULL);
    cacheaside_config_free(config);
}

static void stats_fill_what_the_caller_has_room_for(const cacheaside_client *client) {
    cacheaside_stats stats;
    memset(&stats, 0xab, sizeof stats);
    stats.size = 0;
    EXPECT_INVALID(cacheaside_client_stats(client, &stats));
    EXPECT_INVALID(cacheaside_client_stats(client, NULL));
    stats.size = sizeof stats;
    EXPECT_INVALID(cacheaside_client_stats(NULL, &stats));
    CHECK(cacheaside_client_stats(client, &stats));
    EXPECT(stats.size == sizeof stats);
    /* A program built against a shorter struct (size and queries only):
     * nothing past its end is written. */
    memset(&stats, 0xab, sizeof stats);
    stats.size = 2 * sizeof(uint64_t);
    CHECK(cacheaside_client_stats(client, &stats));
    EXPECT(stats.size == 2 * sizeof(uint64_t));
    uint64_t untouched;
    memset(&untouched, 0xab, sizeof untouched);
    EXPECT(stats.hits == untouched && stats.in_flight == untouched);
}

static void open_failures_leave_out_null(void) {
    cacheaside_config *config = cacheaside_config_new();
    EXPECT(config != NULL);
    EXPECT_INVALID(cacheaside_client_open(config, NULL));

    CHECK(cacheaside_config_set_database_url(config, "this is not a url"));
    cacheaside_client *client = (cacheaside_client *)config; /* any non-NULL garbage */
    EXPECT_INVALID(cacheaside_client_open(config, &client));
    EXPECT(client == NULL);

    /* A CA file that cannot be read is refused at open, naming the setting. */
    CHECK(cacheaside_config_set_database_url(config, "postgres://postgres@127.0.0.1/test"));
    CHECK(cacheaside_config_set_redis_ca_file(config, "/nonexistent/ca.pem"));
    client = (cacheaside_client *)config;
    EXPECT_INVALID(cacheaside_client_open(config, &client));
    EXPECT(client == NULL);
    EXPECT(strstr(cacheaside_last_error(), "redis_ca_file") != NULL);
    CHECK(cacheaside_config_set_redis_ca_file(config, ""));
    CHECK(cacheaside_config_set_database_ca_file(config, "/nonexistent/ca.pem"));
    client = (cacheaside_client *)config;
    EXPECT_INVALID(cacheaside_client_open(config, &client));
    EXPECT(client == NULL);
    EXPECT(strstr(cacheaside_last_error(), "database_ca_file") != NULL);
    CHECK(cacheaside_config_set_database_ca_file(config, ""));
    cacheaside_config_free(config);
}

static void client_calls(const cacheaside_client *client) {
    cacheaside_user_profile p;

    memset(&p, 0xAB, sizeof p);
    EXPECT_INVALID(cacheaside_get_user_profile(NULL, 1, &p));
    EXPECT(profile_is_zeroed(&p));
    EXPECT_INVALID(cacheaside_get_user_profile(client, 1, NULL));
    memset(&p, 0xAB, sizeof p);
    EXPECT_INVALID(cacheaside_get_user_profile_singleflight(NULL, 1, &p));
    EXPECT(profile_is_zeroed(&p));
    EXPECT_INVALID(cacheaside_get_user_profile_singleflight(client, 1, NULL));

    EXPECT_INVALID(cacheaside_update_user_plan(NULL, 1, "pro"));
    EXPECT_INVALID(cacheaside_update_user_plan(client, 1, NULL));
    EXPECT_INVALID(cacheaside_update_user_plan(client, 1, ""));
    EXPECT(strstr(cacheaside_last_error(), "plan must not be empty") != NULL);
    EXPECT_INVALID(cacheaside_update_user_plan(client, 1, "   "));
    EXPECT_INVALID(cacheaside_update_user_plan(client, 1, NOT_UTF8));

    memset(&p, 0xAB, sizeof p);
    EXPECT_INVALID(cacheaside_update_user_plan_write_through(client, 1, "", &p));
    EXPECT(profile_is_zeroed(&p));
    memset(&p, 0xAB, sizeof p);
    EXPECT_INVALID(cacheaside_update_user_plan_write_through(client, 1, NULL, &p));
    EXPECT(profile_is_zeroed(&p));
    EXPECT_INVALID(cacheaside_update_user_plan_write_through(client, 1, "pro", NULL));
    EXPECT_INVALID(cacheaside_update_user_plan_write_through(NULL, 1, "pro", &p));

    /* The rejected updates changed nothing. */
    CHECK(cacheaside_get_user_profile(client, 1, &p));
    EXPECT(strcmp(p.plan, "pro") == 0 && p.version == 1);
    cacheaside_user_profile_free(&p);

    EXPECT_INVALID(cacheaside_client_install_schema(NULL));
    EXPECT_INVALID(cacheaside_client_seed_demo_users(NULL));
    EXPECT_INVALID(cacheaside_client_delete_namespace(NULL));
    EXPECT(cacheaside_client_query_count(NULL) == 0);
    EXPECT(cacheaside_client_in_flight(NULL) == 0);

    cacheaside_bytes b;
    memset(&b, 0xAB, sizeof b);
    EXPECT_INVALID(cacheaside_client_get_or_load(NULL, "k", 1000, never_called, NULL, &b));
    EXPECT(b.data == NULL && b.len == 0);
    EXPECT_INVALID(cacheaside_client_get_or_load(client, NULL, 1000, never_called, NULL, &b));
    EXPECT_INVALID(cacheaside_client_get_or_load(client, "k", 1000, NULL, NULL, &b));
    EXPECT_INVALID(cacheaside_client_get_or_load(client, "k", 1000, never_called, NULL, NULL));
    EXPECT_INVALID(cacheaside_client_get_or_load(client, "", 1000, never_called, NULL, &b));
    EXPECT_INVALID(cacheaside_client_get_or_load(client, NOT_UTF8, 1000, never_called, NULL, &b));
    memset(&b, 0xAB, sizeof b);
    EXPECT_INVALID(cacheaside_client_get_or_load(client, "k", 0, never_called, NULL, &b));
    EXPECT(b.data == NULL && b.len == 0);

    EXPECT_INVALID(cacheaside_client_invalidate(NULL, "k"));
    EXPECT_INVALID(cacheaside_client_invalidate(client, NULL));
    EXPECT_INVALID(cacheaside_client_invalidate(client, ""));

    EXPECT_INVALID(cacheaside_bytes_set(NULL, "x", 1));
    cacheaside_bytes v = {0};
    EXPECT_INVALID(cacheaside_bytes_set(&v, NULL, 3));
    EXPECT(v.data == NULL && v.len == 0);
    CHECK(cacheaside_bytes_set(&v, NOT_UTF8, 2)); /* values are any bytes */
    EXPECT(v.len == 2 && memcmp(v.data, NOT_UTF8, 2) == 0);
    cacheaside_bytes_free(&v);
}

static void empty_namespace_is_not_deleted(void) {
    cacheaside_config *config = cacheaside_config_new();
    EXPECT(config != NULL);
    cacheaside_client *client = NULL;
    CHECK(cacheaside_client_open(config, &client)); /* namespace "" */
    cacheaside_config_free(config);
    EXPECT_INVALID(cacheaside_client_delete_namespace(client));
    cacheaside_client_free(client);
}

static void frees_accept_null_and_twice(const cacheaside_client *client) {
    cacheaside_user_profile_free(NULL);
    cacheaside_bytes_free(NULL);
    cacheaside_client_free(NULL);
    cacheaside_config_free(NULL);

    cacheaside_user_profile p = {0};
    cacheaside_user_profile_free(&p); /* zeroed */
    CHECK(cacheaside_get_user_profile(client, 5, &p));
    cacheaside_user_profile_free(&p);
    EXPECT(profile_is_zeroed(&p));
    cacheaside_user_profile_free(&p); /* twice */

    cacheaside_bytes b = {0};
    CHECK(cacheaside_bytes_set(&b, "value", 5));
    CHECK(cacheaside_bytes_set(&b, "replaced", 8)); /* frees the first copy */
    EXPECT(b.len == 8 && memcmp(b.data, "replaced", 9) == 0); /* NUL-terminated */
    cacheaside_bytes_free(&b);
    EXPECT(b.data == NULL && b.len == 0);
    cacheaside_bytes_free(&b);
}

static void *last_error_of_new_thread(void *arg) {
    *(int *)arg = cacheaside_last_error()[0] == '\0';
    return NULL;
}

static void last_error_is_per_thread(void) {
    EXPECT_INVALID(cacheaside_client_install_schema(NULL));
    int empty = 0;
    pthread_t thread;
    EXPECT(pthread_create(&thread, NULL, last_error_of_new_thread, &empty) == 0);
    EXPECT(pthread_join(thread, NULL) == 0);
    EXPECT(empty);
    EXPECT(strstr(cacheaside_last_error(), "client") != NULL);
}

static void version_matches_the_header(void) {
    char expected[64];
    snprintf(expected, sizeof expected, "%d.%d.%d", CACHEASIDE_VERSION_MAJOR,
             CACHEASIDE_VERSION_MINOR, CACHEASIDE_VERSION_PATCH);
    EXPECT(strcmp(expected, CACHEASIDE_VERSION) == 0);
    EXPECT(strcmp(cacheaside_version(), CACHEASIDE_VERSION) == 0);
}

int main(void) {
    settings_that_do_not_fit_together_fail_at_open();
    version_matches_the_header();
    config_setters();
    open_failures_leave_out_null();
    cacheaside_client *client = open_test_client();
    client_calls(client);
    stats_fill_what_the_caller_has_room_for(client);
    empty_namespace_is_not_deleted();
    frees_accept_null_and_twice(client);
    last_error_is_per_thread();
    cacheaside_client_free(client);
    puts("bad_input: ok");
    return EXIT_SUCCESS;
}
