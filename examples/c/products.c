/*
 * Caching a table of your own from C: a `products` table (this example
 * creates it, and drops it at the end), read through libpq by your loader,
 * cached by cacheaside_engine.
 *
 *   1. capture the table's changes (a trigger + the relay);
 *   2. read a product single-flight: 8 threads miss at once, one query;
 *   3. write a price through, with the row's version;
 *   4. change the row with plain SQL: the relay invalidates the key;
 *   5. print the engine's counters.
 *
 * Build: make -C examples (needs libpq: apt-get install libpq-dev)
 * Run:   ./examples/c/build/products   (DATABASE_URL, REDIS_URL)
 */
#define _POSIX_C_SOURCE 200809L

#include <inttypes.h>
#include <libpq-fe.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cacheaside.h"

#define TABLE "cacheaside_c_products"
#define READERS 8

static PGconn *db;                                         /* your own connection */
static pthread_mutex_t db_lock = PTHREAD_MUTEX_INITIALIZER; /* guards `db` */
static atomic_int queries;                                  /* your loader's queries */
static cacheaside_engine *engine;

static void check(cacheaside_status status, const char *what) {
    if (status != CACHEASIDE_OK) {
        fprintf(stderr, "%s: %s: %s\n", what, cacheaside_status_str(status),
                cacheaside_last_error());
        exit(EXIT_FAILURE);
    }
}

static PGresult *query(const char *sql, int n, const char *const *params) {
    pthread_mutex_lock(&db_lock);
    PGresult *res = PQexecParams(db, sql, n, NULL, params, NULL, NULL, 0);
    pthread_mutex_unlock(&db_lock);
    if (PQresultStatus(res) != PGRES_COMMAND_OK && PQresultStatus(res) != PGRES_TUPLES_OK) {
        fprintf(stderr, "%s\n", PQresultErrorMessage(res));
        exit(EXIT_FAILURE);
    }
    return res;
}

/* Hands a row ("name price_cents", version) to the library. */
static int row_to_value(PGresult *res, cacheaside_bytes *out_value, uint64_t *out_version) {
    if (PQntuples(res) != 1) {
        return CACHEASIDE_NOT_FOUND; /* cached as absent for the negative TTL */
    }
    *out_version = strtoull(PQgetvalue(res, 0, 1), NULL, 10);
    return cacheaside_bytes_set(out_value, PQgetvalue(res, 0, 0), (size_t)PQgetlength(res, 0, 0));
}

/* The loader: runs on a miss, once per key however many threads miss. */
static int load_product(void *user_data, const char *key, cacheaside_bytes *out_value,
                        uint64_t *out_version) {
    (void)user_data;
    atomic_fetch_add(&queries, 1);
    const char *id = key + strlen("product:");
    PGresult *res = query("SELECT name || ' ' || price_cents, version FROM " TABLE
                          " WHERE id = $1::bigint",
                          1, &id);
    int status = row_to_value(res, out_value, out_version);
    PQclear(res);
    return status;
}

/* The writer of a write-through: the UPDATE, RETURNING the new row. */
static int set_price(void *user_data, const char *key, cacheaside_bytes *out_value,
                     uint64_t *out_version) {
    const char *params[2] = {key + strlen("product:"), user_data};
    PGresult *res = query("UPDATE " TABLE " SET price_cents = $2::bigint, version = version + 1"
                          " WHERE id = $1::bigint RETURNING name || ' ' || price_cents, version",
                          2, params);
    int status = row_to_value(res, out_value, out_version);
    PQclear(res);
    return status;
}

static void show(const char *key) {
    cacheaside_bytes value = {0};
    cacheaside_status status =
        cacheaside_engine_get_or_load_versioned(engine, key, 60000, load_product, NULL, &value);
    if (status == CACHEASIDE_NOT_FOUND) {
        printf("  %s: no such product\n", key);
        return;
    }
    check(status, "read");
    printf("  %s: %.*s\n", key, (int)value.len, (const char *)value.data);
    cacheaside_bytes_free(&value);
}

static pthread_barrier_t start_line;

static void *reader(void *arg) {
    (void)arg;
    pthread_barrier_wait(&start_line);
    cacheaside_bytes value = {0};
    check(cacheaside_engine_get_or_load_versioned(engine, "product:1", 60000, load_product, NULL,
                                                  &value),
          "read");
    cacheaside_bytes_free(&value);
    return NULL;
}

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1000.0 + (double)t.tv_nsec / 1e6;
}

int main(void) {
    const char *url = getenv("DATABASE_URL");
    db = PQconnectdb(url != NULL ? url : "postgres://postgres@127.0.0.1:5432/test");
    if (PQstatus(db) != CONNECTION_OK) {
        fprintf(stderr, "%s", PQerrorMessage(db));
        return EXIT_FAILURE;
    }
    PQclear(query("SET client_min_messages = warning", 0, NULL));
    PQclear(query("DROP TABLE IF EXISTS " TABLE, 0, NULL));
    PQclear(query("CREATE TABLE " TABLE " (id bigint PRIMARY KEY, name text NOT NULL,"
                  " price_cents bigint NOT NULL, version bigint NOT NULL DEFAULT 1)",
                  0, NULL));
    PQclear(query("INSERT INTO " TABLE " (id, name, price_cents) VALUES"
                  " (1, 'lamp', 1200), (2, 'desk', 25000)",
                  0, NULL));

    /* The engine: a namespace and an outbox of this example's own. */
    cacheaside_config *config = cacheaside_config_new();
    check(cacheaside_config_set_namespace(config, "c-products:"), "namespace");
    check(cacheaside_config_set_outbox_table(config, TABLE "_outbox"), "outbox");
    check(cacheaside_engine_open(config, &engine), "open");
    cacheaside_config_free(config);

    puts("1. capture the table's changes: row id N is key product:N");
    check(cacheaside_engine_capture_changes(engine, TABLE, "product:", "id", "version"),
          "capture");

    puts("2. 8 threads read product:1 at once");
    pthread_t threads[READERS];
    pthread_barrier_init(&start_line, NULL, READERS);
    for (int i = 0; i < READERS; i++) {
        pthread_create(&threads[i], NULL, reader, NULL);
    }
    for (int i = 0; i < READERS; i++) {
        pthread_join(threads[i], NULL);
    }
    pthread_barrier_destroy(&start_line);
    printf("  loader queries: %d\n", atomic_load(&queries));
    show("product:1");
    printf("  after a hit, loader queries: %d\n", atomic_load(&queries));

    puts("3. write a new price through (the cache holds the written row)");
    cacheaside_bytes written = {0};
    check(cacheaside_engine_write_through(engine, "product:1", 60000, set_price, "990", &written),
          "write-through");
    printf("  wrote: %.*s\n", (int)written.len, (const char *)written.data);
    cacheaside_bytes_free(&written);
    show("product:1");

    puts("4. plain SQL, not through the library: the relay invalidates the key");
    show("product:2");
    PQclear(query("UPDATE " TABLE " SET price_cents = 19900 WHERE id = 2", 0, NULL));
    double started = now_ms();
    check(cacheaside_engine_relay_sync(engine, 5000), "relay");
    printf("  relay applied it in %.1f ms\n", now_ms() - started);
    show("product:2");
    PQclear(query("DELETE FROM " TABLE " WHERE id = 2", 0, NULL));
    check(cacheaside_engine_relay_sync(engine, 5000), "relay");
    show("product:2");

    puts("5. counters");
    cacheaside_stats stats = {.size = sizeof stats};
    check(cacheaside_engine_stats(engine, &stats), "stats");
    printf("  hits %" PRIu64 ", misses %" PRIu64 ", relay invalidations %" PRIu64
           ", loader queries %d\n",
           stats.hits, stats.misses, stats.relay_invalidations, atomic_load(&queries));

    /* Leave nothing behind: the cached keys, the table, its capture and
     * the outbox. */
    check(cacheaside_engine_delete_namespace(engine), "delete namespace");
    cacheaside_engine_free(engine);
    PQclear(query("DROP TABLE " TABLE ", " TABLE "_outbox_cursors, " TABLE "_outbox", 0, NULL));
    PQclear(query("DROP FUNCTION IF EXISTS " TABLE "_outbox_capture(), " TABLE "_outbox_bump()",
                  0, NULL));
    PQfinish(db);
    return EXIT_SUCCESS;
}
