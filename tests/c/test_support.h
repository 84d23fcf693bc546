/*
 * Helpers shared by the C test programs (header-only; each program is one
 * translation unit). tests/c_abi.rs compiles and runs the programs with
 * CACHEASIDE_TEST_TABLE, CACHEASIDE_TEST_OUTBOX and
 * CACHEASIDE_TEST_NAMESPACE set to a table, outbox and namespace of their
 * own (dropped afterwards), and CACHEASIDE_TEST_DOWN_REDIS to a Redis URL
 * that refuses connections. A program that prints `SQL: <statement>` gets
 * the statement run by the harness on a connection of its own, and reads
 * `done` on stdin when it has.
 */
#ifndef CACHEASIDE_TEST_SUPPORT_H
#define CACHEASIDE_TEST_SUPPORT_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cacheaside.h"

#define THREADS 50

/* Fails the program, with where and the library's last message. */
#define EXPECT(cond)                                                                     \
    do {                                                                                 \
        if (!(cond)) {                                                                   \
            fprintf(stderr, "%s:%d: expected %s (last error: \"%s\")\n", __FILE__,      \
                    __LINE__, #cond, cacheaside_last_error());                           \
            exit(EXIT_FAILURE);                                                          \
        }                                                                                \
    } while (0)

/* Expects `call` to return `want`. */
#define EXPECT_STATUS(call, want)                                                        \
    do {                                                                                 \
        cacheaside_status got_ = (call);                                                 \
        if (got_ != (want)) {                                                            \
            fprintf(stderr, "%s:%d: %s returned %d, expected %s (last error: \"%s\")\n", \
                    __FILE__, __LINE__, #call, (int)got_, #want, cacheaside_last_error()); \
            exit(EXIT_FAILURE);                                                          \
        }                                                                                \
    } while (0)

#define CHECK(call) EXPECT_STATUS(call, CACHEASIDE_OK)

static inline const char *test_env(const char *name) {
    const char *value = getenv(name);
    if (value == NULL || value[0] == '\0') {
        fprintf(stderr, "%s is not set: run this program through `cargo test --test c_abi`\n",
                name);
        exit(EXIT_FAILURE);
    }
    return value;
}

/* A client on this program's own table and namespace, schema installed
 * and demo users seeded. */
static inline cacheaside_client *open_test_client(void) {
    cacheaside_config *config = cacheaside_config_new();
    EXPECT(config != NULL);
    CHECK(cacheaside_config_set_users_table(config, test_env("CACHEASIDE_TEST_TABLE")));
    CHECK(cacheaside_config_set_namespace(config, test_env("CACHEASIDE_TEST_NAMESPACE")));
    CHECK(cacheaside_config_set_outbox_table(config, test_env("CACHEASIDE_TEST_OUTBOX")));
    /* Generous: under valgrind everything is tens of times slower, and a
     * slow box is not an outage. */
    CHECK(cacheaside_config_set_cache_timeout_ms(config, 2000));
    CHECK(cacheaside_config_set_lease_ttl_ms(config, 6000));
    CHECK(cacheaside_config_set_lock_ttl_ms(config, 6000));
    cacheaside_client *client = NULL;
    CHECK(cacheaside_client_open(config, &client));
    cacheaside_config_free(config);
    CHECK(cacheaside_client_install_schema(client));
    CHECK(cacheaside_client_seed_demo_users(client));
    /* The relay's invalidations of the seeding must not land mid-test. */
    CHECK(cacheaside_client_relay_sync(client, 30000));
    return client;
}

static inline int profile_is_zeroed(const cacheaside_user_profile *p) {
    return p->id == 0 && p->name == NULL && p->email == NULL && p->plan == NULL &&
           p->version == 0;
}

static inline int profiles_equal(const cacheaside_user_profile *a,
                                 const cacheaside_user_profile *b) {
    return a->id == b->id && a->version == b->version && strcmp(a->name, b->name) == 0 &&
           strcmp(a->email, b->email) == 0 && strcmp(a->plan, b->plan) == 0;
}

#endif /* CACHEASIDE_TEST_SUPPORT_H */
