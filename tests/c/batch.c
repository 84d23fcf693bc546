/*
 * Batch reads on the generic engine handle:
 *   - cacheaside_engine_get_or_load_many answers in the keys' order, absent
 *     rows as zeroed values, one loader call for every missing key (a key
 *     given twice asked once), and none when everything is cached;
 *   - cacheaside_engine_invalidate_many makes exactly those keys reload;
 *   - a failing loader is CACHEASIDE_LOADER_ERROR with zeroed outputs;
 *   - NULL and bad inputs are CACHEASIDE_INVALID_ARGUMENT, outputs zeroed.
 * Item n's value is "value-n"; items 7 and 9 have no row.
 */
#include "test_support.h"

#define N 6

static int calls;        /* loader calls */
static size_t asked;     /* keys the loader was given, all calls */
static int fail_loader;  /* the loader fails when set */

static int load_items(void *user_data, const char *const *keys, size_t n_keys,
                      cacheaside_batch_rows *rows) {
    (void)user_data;
    calls++;
    asked += n_keys;
    if (fail_loader) {
        return CACHEASIDE_LOADER_ERROR;
    }
    for (size_t i = 0; i < n_keys; i++) {
        const char *id = strchr(keys[i], ':');
        EXPECT(id != NULL);
        if (strcmp(id, ":7") == 0 || strcmp(id, ":9") == 0) {
            continue; /* no such row */
        }
        char value[64];
        int len = snprintf(value, sizeof value, "value-%s", id + 1);
        CHECK(cacheaside_batch_rows_set(rows, i, value, (size_t)len, 0));
    }
    /* Past the keys it was given: refused. */
    EXPECT_STATUS(cacheaside_batch_rows_set(rows, n_keys, "x", 1, 0),
                  CACHEASIDE_INVALID_ARGUMENT);
    return CACHEASIDE_OK;
}

static void expect_values(cacheaside_bytes *values, const char *const *keys, size_t n) {
    for (size_t i = 0; i < n; i++) {
        const char *id = strchr(keys[i], ':') + 1;
        if (strcmp(id, "7") == 0 || strcmp(id, "9") == 0) {
            EXPECT(values[i].data == NULL && values[i].len == 0);
        } else {
            char want[64];
            snprintf(want, sizeof want, "value-%s", id);
            EXPECT(values[i].data != NULL);
            EXPECT(strcmp((const char *)values[i].data, want) == 0);
        }
        cacheaside_bytes_free(&values[i]);
    }
}

static void expect_zeroed(const cacheaside_bytes *values, size_t n) {
    for (size_t i = 0; i < n; i++) {
        EXPECT(values[i].data == NULL && values[i].len == 0);
    }
}

int main(void) {
    cacheaside_config *config = cacheaside_config_new();
    EXPECT(config != NULL);
    CHECK(cacheaside_config_set_namespace(config, test_env("CACHEASIDE_TEST_NAMESPACE")));
    CHECK(cacheaside_config_set_cache_timeout_ms(config, 2000));
    CHECK(cacheaside_config_set_lease_ttl_ms(config, 6000));
    CHECK(cacheaside_config_set_lock_ttl_ms(config, 6000));
    cacheaside_engine *engine = NULL;
    CHECK(cacheaside_engine_open(config, &engine));
    cacheaside_config_free(config);

    /* Item 3 twice, items 7 and 9 absent. */
    const char *keys[N] = {"item:5", "item:7", "item:3", "item:1", "item:9", "item:3"};
    cacheaside_bytes values[N];
    CHECK(cacheaside_engine_get_or_load_many(engine, keys, N, 60000, load_items, NULL, values));
    EXPECT(calls == 1);
    EXPECT(asked == 5);
    expect_values(values, keys, N);

    /* All cached, the absences too: no loader call. */
    CHECK(cacheaside_engine_get_or_load_many(engine, keys, N, 60000, load_items, NULL, values));
    EXPECT(calls == 1);
    expect_values(values, keys, N);

    /* Two keys invalidated: one call, for those two alone. */
    const char *stale[2] = {"item:1", "item:7"};
    CHECK(cacheaside_engine_invalidate_many(engine, stale, 2));
    CHECK(cacheaside_engine_get_or_load_many(engine, keys, N, 60000, load_items, NULL, values));
    EXPECT(calls == 2);
    EXPECT(asked == 7);
    expect_values(values, keys, N);

    /* A failing loader: LOADER_ERROR, outputs zeroed, nothing cached. */
    const char *cold[2] = {"item:20", "item:21"};
    fail_loader = 1;
    EXPECT_STATUS(
        cacheaside_engine_get_or_load_many(engine, cold, 2, 60000, load_items, NULL, values),
        CACHEASIDE_LOADER_ERROR);
    expect_zeroed(values, 2);
    fail_loader = 0;
    CHECK(cacheaside_engine_get_or_load_many(engine, cold, 2, 60000, load_items, NULL, values));
    EXPECT(calls == 4);
    expect_values(values, cold, 2);

    /* Bad input: a status, never a crash; outputs zeroed. */
    const char *with_null[2] = {"item:1", NULL};
    const char *braces[1] = {"item:{1}"};
    EXPECT_STATUS(cacheaside_engine_get_or_load_many(NULL, keys, N, 60000, load_items, NULL,
                                                     values),
                  CACHEASIDE_INVALID_ARGUMENT);
    expect_zeroed(values, N);
    EXPECT_STATUS(cacheaside_engine_get_or_load_many(engine, NULL, 2, 60000, load_items, NULL,
                                                     values),
                  CACHEASIDE_INVALID_ARGUMENT);
    EXPECT_STATUS(cacheaside_engine_get_or_load_many(engine, with_null, 2, 60000, load_items,
                                                     NULL, values),
                  CACHEASIDE_INVALID_ARGUMENT);
    EXPECT_STATUS(cacheaside_engine_get_or_load_many(engine, braces, 1, 60000, load_items, NULL,
                                                     values),
                  CACHEASIDE_INVALID_ARGUMENT);
    EXPECT_STATUS(
        cacheaside_engine_get_or_load_many(engine, keys, N, 60000, NULL, NULL, values),
        CACHEASIDE_INVALID_ARGUMENT);
    EXPECT_STATUS(cacheaside_engine_get_or_load_many(engine, keys, N, 0, load_items, NULL,
                                                     values),
                  CACHEASIDE_INVALID_ARGUMENT);
    EXPECT_STATUS(
        cacheaside_engine_get_or_load_many(engine, keys, N, 60000, load_items, NULL, NULL),
        CACHEASIDE_INVALID_ARGUMENT);
    expect_zeroed(values, N);
    EXPECT_STATUS(cacheaside_engine_invalidate_many(engine, with_null, 2),
                  CACHEASIDE_INVALID_ARGUMENT);
    EXPECT_STATUS(cacheaside_engine_invalidate_many(NULL, stale, 2),
                  CACHEASIDE_INVALID_ARGUMENT);
    EXPECT_STATUS(cacheaside_batch_rows_set(NULL, 0, "x", 1, 0), CACHEASIDE_INVALID_ARGUMENT);
    /* No keys: nothing to do. */
    CHECK(cacheaside_engine_get_or_load_many(engine, NULL, 0, 60000, load_items, NULL, values));
    CHECK(cacheaside_engine_invalidate_many(engine, NULL, 0));
    EXPECT(calls == 4);

    CHECK(cacheaside_engine_delete_namespace(engine));
    cacheaside_engine_free(engine);
    puts("batch: ok");
    return 0;
}
