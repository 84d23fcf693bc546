/*
 * The generic engine from C: cacheaside_client_get_or_load with a C loader.
 * 50 threads on a cold key run the loader exactly once; absence and loader
 * failures are reported; values round-trip as bytes.
 */
#define _POSIX_C_SOURCE 200809L

#include <pthread.h>
#include <stdatomic.h>
#include <time.h>

#include "test_support.h"

static const cacheaside_client *client;
static pthread_barrier_t start_line;

/* What a loader does, and how often it ran. */
struct source {
    atomic_int calls;
    int status;        /* what the loader returns */
    const char *value; /* set when status is CACHEASIDE_OK (NULL: do not set) */
    size_t len;
    int slow;          /* keep the flight open for a while (a slow database) */
};

static int load(void *user_data, const char *key, cacheaside_bytes *out_value) {
    struct source *s = user_data;
    atomic_fetch_add(&s->calls, 1);
    if (key == NULL || out_value == NULL || out_value->data != NULL) {
        return 99; /* the library broke its promise: fail loudly */
    }
    if (s->slow) {
        /* Not a synchronization: a source that takes 50 ms, so the other
         * threads arrive while the load runs (the test passes either way,
         * but only proves single-flight if they do). */
        struct timespec pause = {0, 50 * 1000 * 1000};
        nanosleep(&pause, NULL);
    }
    if (s->status == CACHEASIDE_OK && s->value != NULL) {
        cacheaside_status set = cacheaside_bytes_set(out_value, s->value, s->len);
        if (set != CACHEASIDE_OK) {
            return set;
        }
    }
    return s->status;
}

struct caller {
    pthread_t thread;
    struct source *source;
    cacheaside_status status;
    cacheaside_bytes value;
};

static void *get_cold_key(void *arg) {
    struct caller *c = arg;
    pthread_barrier_wait(&start_line);
    c->status = cacheaside_client_get_or_load(client, "report:cold", 60000, load, c->source, &c->value);
    return NULL;
}

static void fifty_threads_one_load(void) {
    static struct source source = {.status = CACHEASIDE_OK, .value = "{\"total\":42}", .slow = 1};
    source.len = strlen(source.value);
    static struct caller callers[THREADS];
    EXPECT(pthread_barrier_init(&start_line, NULL, THREADS) == 0);
    for (int i = 0; i < THREADS; i++) {
        callers[i].source = &source;
        EXPECT(pthread_create(&callers[i].thread, NULL, get_cold_key, &callers[i]) == 0);
    }
    for (int i = 0; i < THREADS; i++) {
        EXPECT(pthread_join(callers[i].thread, NULL) == 0);
    }
    pthread_barrier_destroy(&start_line);

    EXPECT(atomic_load(&source.calls) == 1);
    for (int i = 0; i < THREADS; i++) {
        EXPECT(callers[i].status == CACHEASIDE_OK);
        EXPECT(callers[i].value.len == source.len);
        EXPECT(memcmp(callers[i].value.data, source.value, source.len + 1) == 0);
        cacheaside_bytes_free(&callers[i].value);
    }
    EXPECT(cacheaside_client_in_flight(client) == 0);

    /* Cached now: the loader does not run again... */
    cacheaside_bytes again = {0};
    CHECK(cacheaside_client_get_or_load(client, "report:cold", 60000, load, &source, &again));
    EXPECT(atomic_load(&source.calls) == 1);
    cacheaside_bytes_free(&again);
    /* ...until the key is invalidated. */
    CHECK(cacheaside_client_invalidate(client, "report:cold"));
    CHECK(cacheaside_client_get_or_load(client, "report:cold", 60000, load, &source, &again));
    EXPECT(atomic_load(&source.calls) == 2);
    cacheaside_bytes_free(&again);
}

static void absence_is_cached(void) {
    struct source source = {.status = CACHEASIDE_NOT_FOUND};
    cacheaside_bytes value;
    memset(&value, 0xAB, sizeof value);
    EXPECT_STATUS(cacheaside_client_get_or_load(client, "absent", 60000, load, &source, &value),
                  CACHEASIDE_NOT_FOUND);
    EXPECT(value.data == NULL && value.len == 0);
    EXPECT_STATUS(cacheaside_client_get_or_load(client, "absent", 60000, load, &source, &value),
                  CACHEASIDE_NOT_FOUND);
    EXPECT(atomic_load(&source.calls) == 1);
}

static void loader_failures_are_reported_and_not_cached(void) {
    struct source failing = {.status = 42};
    cacheaside_bytes value;
    memset(&value, 0xAB, sizeof value);
    EXPECT_STATUS(cacheaside_client_get_or_load(client, "flaky", 60000, load, &failing, &value),
                  CACHEASIDE_LOADER_ERROR);
    EXPECT(value.data == NULL && value.len == 0);
    EXPECT(strstr(cacheaside_last_error(), "42") != NULL);

    /* OK without a value is a loader bug, reported as such. */
    struct source forgetful = {.status = CACHEASIDE_OK, .value = NULL};
    EXPECT_STATUS(cacheaside_client_get_or_load(client, "flaky", 60000, load, &forgetful, &value),
                  CACHEASIDE_LOADER_ERROR);
    EXPECT(strstr(cacheaside_last_error(), "cacheaside_bytes_set") != NULL);

    /* Nothing was cached: a working loader runs next time. */
    struct source working = {.status = CACHEASIDE_OK, .value = "fine", .len = 4};
    CHECK(cacheaside_client_get_or_load(client, "flaky", 60000, load, &working, &value));
    EXPECT(atomic_load(&working.calls) == 1);
    EXPECT(value.len == 4 && strcmp((const char *)value.data, "fine") == 0);
    cacheaside_bytes_free(&value);
}

static void values_round_trip_as_bytes(void) {
    /* An embedded NUL survives: lengths, not C strings. */
    struct source nul = {.status = CACHEASIDE_OK, .value = "a\0b", .len = 3};
    cacheaside_bytes value = {0};
    CHECK(cacheaside_client_get_or_load(client, "with-nul", 60000, load, &nul, &value));
    EXPECT(value.len == 3 && memcmp(value.data, "a\0b", 4) == 0);
    cacheaside_bytes_free(&value);
    CHECK(cacheaside_client_get_or_load(client, "with-nul", 60000, load, &nul, &value));
    EXPECT(atomic_load(&nul.calls) == 1 && value.len == 3 && memcmp(value.data, "a\0b", 3) == 0);
    cacheaside_bytes_free(&value);

    /* Bytes that are not UTF-8 (protobuf, say) are values too. */
    struct source binary = {.status = CACHEASIDE_OK, .value = "\xff\x00\xfe", .len = 3};
    CHECK(cacheaside_client_get_or_load(client, "binary", 60000, load, &binary, &value));
    EXPECT(value.len == 3 && memcmp(value.data, "\xff\x00\xfe", 3) == 0);
    cacheaside_bytes_free(&value);
    CHECK(cacheaside_client_get_or_load(client, "binary", 60000, load, &binary, &value));
    EXPECT(atomic_load(&binary.calls) == 1 && value.len == 3 &&
           memcmp(value.data, "\xff\x00\xfe", 3) == 0);
    cacheaside_bytes_free(&value);

    /* The empty value is a value, not an absence. */
    struct source empty = {.status = CACHEASIDE_OK, .value = "", .len = 0};
    CHECK(cacheaside_client_get_or_load(client, "empty", 60000, load, &empty, &value));
    EXPECT(value.data != NULL && value.len == 0 && value.data[0] == '\0');
    cacheaside_bytes_free(&value);
}

static void bytes_set_from_its_own_bytes(void) {
    /* It used to free *out before copying from data: here, from itself.
     * Under valgrind that was an invalid read. */
    cacheaside_bytes value = {0};
    CHECK(cacheaside_bytes_set(&value, "same bytes", 10));
    CHECK(cacheaside_bytes_set(&value, value.data, value.len));
    EXPECT(value.len == 10 && memcmp(value.data, "same bytes", 10) == 0);
    cacheaside_bytes_free(&value);
}

struct reentrant {
    cacheaside_status inner;
};

static int load_own_key(void *user_data, const char *key, cacheaside_bytes *out_value) {
    struct reentrant *r = user_data;
    cacheaside_bytes inner = {0};
    struct source never = {.status = CACHEASIDE_OK, .value = "x", .len = 1};
    r->inner = cacheaside_client_get_or_load(client, key, 60000, load, &never, &inner);
    cacheaside_bytes_free(&inner);
    return cacheaside_bytes_set(out_value, "outer", 5);
}

static void a_loader_reading_its_own_key_is_told_at_once(void) {
    struct reentrant r = {CACHEASIDE_OK};
    cacheaside_bytes value = {0};
    time_t started = time(NULL);
    CHECK(cacheaside_client_get_or_load(client, "reentrant", 60000, load_own_key, &r, &value));
    EXPECT(r.inner == CACHEASIDE_INVALID_ARGUMENT);
    EXPECT(time(NULL) - started < 5); /* not the follower deadline */
    EXPECT(value.len == 5 && memcmp(value.data, "outer", 5) == 0);
    cacheaside_bytes_free(&value);
    EXPECT(cacheaside_client_in_flight(client) == 0);
}

static void ttl_beyond_the_maximum_is_invalid(void) {
    /* UINT64_MAX ("forever") used to cache nothing, silently. */
    struct source s = {.status = CACHEASIDE_OK, .value = "v", .len = 1};
    cacheaside_bytes value = {0};
    EXPECT_STATUS(cacheaside_client_get_or_load(client, "forever", UINT64_MAX, load, &s, &value),
                  CACHEASIDE_INVALID_ARGUMENT);
    EXPECT(strstr(cacheaside_last_error(), "maximum TTL") != NULL);
    EXPECT(atomic_load(&s.calls) == 0 && value.data == NULL);
}

int main(void) {
    cacheaside_client *owned = open_test_client();
    client = owned;
    fifty_threads_one_load();
    absence_is_cached();
    loader_failures_are_reported_and_not_cached();
    values_round_trip_as_bytes();
    bytes_set_from_its_own_bytes();
    a_loader_reading_its_own_key_is_told_at_once();
    ttl_beyond_the_maximum_is_invalid();
    cacheaside_client_free(owned);
    puts("get_or_load: ok");
    return EXIT_SUCCESS;
}
