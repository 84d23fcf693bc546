/*
 * The lab's user functions through the C ABI: miss then hit, update
 * invalidates, missing user, write-through, and 50 pthreads on a cold key
 * through single-flight.
 */
#define _POSIX_C_SOURCE 200809L

#include <pthread.h>

#include "test_support.h"

static const cacheaside_client *client;
static pthread_barrier_t start_line;

struct reader {
    pthread_t thread;
    cacheaside_status status;
    cacheaside_user_profile profile;
};

static void *read_cold_key(void *arg) {
    struct reader *r = arg;
    /* Released together, so all of them miss the cold key at once. */
    pthread_barrier_wait(&start_line);
    r->status = cacheaside_get_user_profile_singleflight(client, 3, &r->profile);
    return NULL;
}

static void miss_then_hit(void) {
    cacheaside_user_profile first = {0}, second = {0};
    uint64_t before = cacheaside_client_query_count(client);
    CHECK(cacheaside_get_user_profile(client, 1, &first));
    EXPECT(cacheaside_client_query_count(client) - before == 1);
    EXPECT(first.id == 1 && first.version == 1);
    EXPECT(strcmp(first.name, "Ada Lovelace") == 0);
    EXPECT(strcmp(first.email, "ada@example.com") == 0);
    EXPECT(strcmp(first.plan, "pro") == 0);

    CHECK(cacheaside_get_user_profile(client, 1, &second));
    EXPECT(cacheaside_client_query_count(client) - before == 1); /* the hit costs +0 */
    EXPECT(profiles_equal(&first, &second));
    cacheaside_user_profile_free(&first);
    cacheaside_user_profile_free(&second);
}

static void update_invalidates(void) {
    cacheaside_user_profile p = {0};
    CHECK(cacheaside_get_user_profile(client, 2, &p)); /* cached now */
    EXPECT(strcmp(p.plan, "free") == 0);
    cacheaside_user_profile_free(&p);

    CHECK(cacheaside_update_user_plan(client, 2, "enterprise"));
    uint64_t before = cacheaside_client_query_count(client);
    CHECK(cacheaside_get_user_profile(client, 2, &p));
    EXPECT(cacheaside_client_query_count(client) - before == 1); /* a miss again */
    EXPECT(strcmp(p.plan, "enterprise") == 0);
    EXPECT(p.version == 2);
    cacheaside_user_profile_free(&p);
}

static void missing_user_is_not_found_and_zeroed(void) {
    cacheaside_user_profile p;
    memset(&p, 0xAB, sizeof p); /* garbage in, zeroes out */
    uint64_t before = cacheaside_client_query_count(client);
    EXPECT_STATUS(cacheaside_get_user_profile(client, 999999, &p), CACHEASIDE_NOT_FOUND);
    EXPECT(profile_is_zeroed(&p));
    EXPECT(cacheaside_client_query_count(client) - before == 1);

    memset(&p, 0xAB, sizeof p);
    EXPECT_STATUS(cacheaside_get_user_profile_singleflight(client, 999999, &p),
                  CACHEASIDE_NOT_FOUND);
    EXPECT(profile_is_zeroed(&p));
    EXPECT(cacheaside_client_query_count(client) - before == 1); /* absence is cached */

    EXPECT_STATUS(cacheaside_update_user_plan(client, 999999, "pro"), CACHEASIDE_NOT_FOUND);
    memset(&p, 0xAB, sizeof p);
    EXPECT_STATUS(cacheaside_update_user_plan_write_through(client, 999999, "pro", &p),
                  CACHEASIDE_NOT_FOUND);
    EXPECT(profile_is_zeroed(&p));
    cacheaside_user_profile_free(&p); /* zeroed: a no-op */
}

static void write_through_caches_the_new_row(void) {
    cacheaside_user_profile written = {0}, read = {0};
    CHECK(cacheaside_update_user_plan_write_through(client, 4, "pro", &written));
    EXPECT(written.id == 4 && written.version == 2 && strcmp(written.plan, "pro") == 0);
    uint64_t before = cacheaside_client_query_count(client);
    CHECK(cacheaside_get_user_profile(client, 4, &read));
    EXPECT(cacheaside_client_query_count(client) - before == 0); /* served from the cache */
    EXPECT(profiles_equal(&written, &read));
    cacheaside_user_profile_free(&written);
    cacheaside_user_profile_free(&read);
}

static void fifty_threads_one_query(void) {
    static struct reader readers[THREADS];
    EXPECT(pthread_barrier_init(&start_line, NULL, THREADS) == 0);
    uint64_t before = cacheaside_client_query_count(client);
    for (int i = 0; i < THREADS; i++) {
        EXPECT(pthread_create(&readers[i].thread, NULL, read_cold_key, &readers[i]) == 0);
    }
    for (int i = 0; i < THREADS; i++) {
        EXPECT(pthread_join(readers[i].thread, NULL) == 0);
    }
    pthread_barrier_destroy(&start_line);

    EXPECT(cacheaside_client_query_count(client) - before == 1);
    for (int i = 0; i < THREADS; i++) {
        EXPECT(readers[i].status == CACHEASIDE_OK);
        EXPECT(readers[i].profile.id == 3);
        EXPECT(profiles_equal(&readers[i].profile, &readers[0].profile));
    }
    EXPECT(strcmp(readers[0].profile.name, "Grace Hopper") == 0);
    EXPECT(cacheaside_client_in_flight(client) == 0);
    for (int i = 0; i < THREADS; i++) {
        cacheaside_user_profile_free(&readers[i].profile);
    }
}

int main(void) {
    cacheaside_client *owned = open_test_client();
    client = owned;
    miss_then_hit();
    update_invalidates();
    missing_user_is_not_found_and_zeroed();
    write_through_caches_the_new_row();
    fifty_threads_one_query();
    cacheaside_client_free(owned);
    puts("users: ok");
    return EXIT_SUCCESS;
}
