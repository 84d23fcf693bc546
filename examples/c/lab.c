/*
 * The cache-aside lab in C: miss, hit, update, fresh read, and 50 threads
 * on a cold key through single-flight.
 *
 * Build and run (from the repository root):  make -C examples run
 *
 * Uses its own table (cacheaside_c_lab), outbox (cacheaside_c_lab_outbox)
 * and Redis namespace (c-lab:); DATABASE_URL and REDIS_URL override the
 * default servers. At the end it drops its tables and deletes its
 * namespace (if it crashes first, `make -C examples clean-db` drops them).
 */
#define _POSIX_C_SOURCE 200809L

#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cacheaside.h"

#define THREADS 50

/* Stops the program with the library's message when a call fails. */
#define CHECK(call)                                                              \
    do {                                                                         \
        cacheaside_status status_ = (call);                                      \
        if (status_ != CACHEASIDE_OK) {                                          \
            fprintf(stderr, "%s failed with status %d: %s\n", #call, (int)status_, \
                    cacheaside_last_error());                                    \
            exit(EXIT_FAILURE);                                                  \
        }                                                                        \
    } while (0)

static const cacheaside_client *client;
static pthread_barrier_t start_line;
static cacheaside_user_profile results[THREADS];

static void show(const char *step, const cacheaside_user_profile *p, uint64_t *last) {
    uint64_t now = cacheaside_client_query_count(client);
    printf("%-22s id=%" PRId64 " name=%s plan=%s version=%" PRId64 "  (queries +%" PRIu64 ")\n",
           step, p->id, p->name, p->plan, p->version, now - *last);
    *last = now;
}

static void *reader(void *arg) {
    cacheaside_user_profile *out = arg;
    /* Release all threads at once, so they miss the cold key together. */
    pthread_barrier_wait(&start_line);
    CHECK(cacheaside_get_user_profile_singleflight(client, 2, out));
    return NULL;
}

int main(void) {
    printf("cacheaside %s (header %s)\n", cacheaside_version(), CACHEASIDE_VERSION);

    cacheaside_config *config = cacheaside_config_new();
    if (config == NULL) {
        fprintf(stderr, "cacheaside_config_new failed: %s\n", cacheaside_last_error());
        return EXIT_FAILURE;
    }
    CHECK(cacheaside_config_set_users_table(config, "cacheaside_c_lab"));
    CHECK(cacheaside_config_set_namespace(config, "c-lab:"));
    CHECK(cacheaside_config_set_outbox_table(config, "cacheaside_c_lab_outbox"));
    cacheaside_client *owned = NULL;
    CHECK(cacheaside_client_open(config, &owned));
    cacheaside_config_free(config); /* the client keeps its own copy */
    client = owned;

    CHECK(cacheaside_client_drop_schema(client)); /* a fresh table every run */
    CHECK(cacheaside_client_install_schema(client));
    CHECK(cacheaside_client_seed_demo_users(client));
    CHECK(cacheaside_client_delete_namespace(client)); /* start with a cold cache */
    /* The relay's invalidations of the seeding must not land mid-demo; nor
     * its replay of the outbox, which an emptied namespace (its progress
     * marker gone, as after a Redis restart) sets off: sync after both. */
    CHECK(cacheaside_client_relay_sync(client, 10000));

    uint64_t last = cacheaside_client_query_count(client);
    cacheaside_user_profile profile = {0};

    CHECK(cacheaside_get_user_profile(client, 1, &profile));
    show("1. miss (Postgres):", &profile, &last);
    cacheaside_user_profile_free(&profile);

    CHECK(cacheaside_get_user_profile(client, 1, &profile));
    show("2. hit (Redis only):", &profile, &last);
    cacheaside_user_profile_free(&profile);

    CHECK(cacheaside_update_user_plan(client, 1, "enterprise"));
    uint64_t now = cacheaside_client_query_count(client);
    printf("%-22s plan=enterprise, cache entry invalidated  (queries +%" PRIu64 ")\n",
           "3. update:", now - last);
    last = now;

    CHECK(cacheaside_get_user_profile(client, 1, &profile));
    show("4. fresh read:", &profile, &last);
    cacheaside_user_profile_free(&profile);

    pthread_t threads[THREADS];
    pthread_barrier_init(&start_line, NULL, THREADS);
    for (int i = 0; i < THREADS; i++) {
        if (pthread_create(&threads[i], NULL, reader, &results[i]) != 0) {
            fprintf(stderr, "pthread_create failed\n");
            return EXIT_FAILURE;
        }
    }
    for (int i = 0; i < THREADS; i++) {
        pthread_join(threads[i], NULL);
    }
    pthread_barrier_destroy(&start_line);
    int identical = 1;
    for (int i = 0; i < THREADS; i++) {
        identical &= results[i].id == results[0].id && results[i].version == results[0].version &&
                     strcmp(results[i].plan, results[0].plan) == 0;
    }
    now = cacheaside_client_query_count(client);
    printf("5. %d threads, cold key (single-flight): %s, %s, queries: %" PRIu64 "\n", THREADS,
           results[0].name, identical ? "identical profiles" : "PROFILES DIFFER", now - last);
    for (int i = 0; i < THREADS; i++) {
        cacheaside_user_profile_free(&results[i]);
    }

    /* Leave nothing behind. */
    CHECK(cacheaside_client_drop_schema(client));
    CHECK(cacheaside_client_delete_namespace(client));
    cacheaside_client_free(owned);
    return identical && now - last == 1 ? EXIT_SUCCESS : EXIT_FAILURE;
}
