/*
 * The article's other patterns from C: the rate limiter, sessions and
 * pub/sub, each with its bad inputs. tests/c_abi.rs runs it normally and,
 * when valgrind is installed, once more under valgrind (leaks and invalid
 * reads fail the test).
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <pthread.h>
#include <time.h>

#include "test_support.h"

static const cacheaside_client *client;
static const char NOT_UTF8[] = {(char)0xff, (char)0xfe, 'x', 0};

#define EXPECT_INVALID(call)                                          \
    do {                                                              \
        EXPECT_STATUS(call, CACHEASIDE_INVALID_ARGUMENT);             \
        EXPECT(cacheaside_last_error()[0] != '\0');                   \
    } while (0)

static void sleep_ms(long ms) {
    struct timespec pause = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&pause, &pause) != 0 && errno == EINTR) {
    }
}

/* An absolute CLOCK_REALTIME deadline `seconds` from now, for timed waits. */
static struct timespec deadline_in(int seconds) {
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    t.tv_sec += seconds;
    return t;
}

/* ---------------------------------------------------------------- limiter */

static void rate_limit_counts_only_allowed_requests(void) {
    cacheaside_rate_limit_result r;
    for (uint32_t i = 0; i < 3; i++) {
        CHECK(cacheaside_rate_limit(client, "c:user:1", 3, 60000, &r));
        EXPECT(r.allowed && r.remaining == 2 - i);
        EXPECT((r.retry_after_ms == 0) == (i < 2)); /* the last slot says when one frees */
    }
    for (int i = 0; i < 5; i++) {
        memset(&r, 0xAB, sizeof r);
        CHECK(cacheaside_rate_limit(client, "c:user:1", 3, 60000, &r));
        EXPECT(!r.allowed && r.remaining == 0);
        EXPECT(r.retry_after_ms >= 1 && r.retry_after_ms <= 60000);
    }
    /* Another subject has its own window. */
    CHECK(cacheaside_rate_limit(client, "c:user:2", 3, 60000, &r));
    EXPECT(r.allowed && r.remaining == 2);

    /* A short window: the rejected retries above did not extend it. */
    CHECK(cacheaside_rate_limit(client, "c:short", 1, 200, &r));
    EXPECT(r.allowed);
    CHECK(cacheaside_rate_limit(client, "c:short", 1, 200, &r));
    EXPECT(!r.allowed && r.retry_after_ms >= 1 && r.retry_after_ms <= 200);
    sleep_ms((long)r.retry_after_ms);
    CHECK(cacheaside_rate_limit(client, "c:short", 1, 200, &r));
    EXPECT(r.allowed);
}

static void rate_limit_bad_input(void) {
    cacheaside_rate_limit_result r;
    char long_subject[514];
    memset(long_subject, 's', sizeof long_subject - 1);
    long_subject[sizeof long_subject - 1] = '\0';
    const char *bad_subjects[] = {"", "a{b", "a}b", "a\nb", NOT_UTF8, long_subject};
    for (size_t i = 0; i < sizeof bad_subjects / sizeof bad_subjects[0]; i++) {
        memset(&r, 0xAB, sizeof r);
        EXPECT_INVALID(cacheaside_rate_limit(client, bad_subjects[i], 10, 1000, &r));
        EXPECT(!r.allowed && r.remaining == 0 && r.retry_after_ms == 0); /* zeroed */
    }
    EXPECT_INVALID(cacheaside_rate_limit(client, "ok", 0, 1000, &r));
    EXPECT(strstr(cacheaside_last_error(), "limit") != NULL);
    EXPECT_INVALID(cacheaside_rate_limit(client, "ok", 10, 0, &r));
    EXPECT_INVALID(cacheaside_rate_limit(client, "ok", 10, UINT64_MAX, &r));
    EXPECT_INVALID(cacheaside_rate_limit(NULL, "ok", 10, 1000, &r));
    EXPECT_INVALID(cacheaside_rate_limit(client, NULL, 10, 1000, &r));
    EXPECT_INVALID(cacheaside_rate_limit(client, "ok", 10, 1000, NULL));
}

/* --------------------------------------------------------------- sessions */

static void session_lifecycle(void) {
    const char *data = "{\"user_id\":42,\"roles\":[\"admin\"]}";
    cacheaside_bytes id = {0}, read = {0};
    CHECK(cacheaside_session_create(client, data, strlen(data), 60000, &id));
    EXPECT(id.len == CACHEASIDE_SESSION_ID_LEN && strlen((const char *)id.data) == id.len);
    for (size_t i = 0; i < id.len; i++) {
        char c = (char)id.data[i];
        EXPECT((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
               c == '-' || c == '_');
    }
    const char *sid = (const char *)id.data;
    CHECK(cacheaside_session_get(client, sid, &read));
    EXPECT(read.len == strlen(data) && memcmp(read.data, data, read.len + 1) == 0);
    cacheaside_bytes_free(&read);

    /* Two sessions never share an id. */
    cacheaside_bytes other = {0};
    CHECK(cacheaside_session_create(client, "null", 4, 60000, &other));
    EXPECT(strcmp((const char *)other.data, sid) != 0);

    CHECK(cacheaside_session_delete(client, sid));
    memset(&read, 0xAB, sizeof read);
    EXPECT_STATUS(cacheaside_session_get(client, sid, &read), CACHEASIDE_NOT_FOUND);
    EXPECT(read.data == NULL && read.len == 0);
    EXPECT_STATUS(cacheaside_session_delete(client, sid), CACHEASIDE_NOT_FOUND);
    cacheaside_bytes_free(&id);
    cacheaside_bytes_free(&id); /* twice is fine */
    CHECK(cacheaside_session_delete(client, (const char *)other.data));
    cacheaside_bytes_free(&other);
}

static void session_max_lifetime_caps_the_ttl(void) {
    cacheaside_config *config = cacheaside_config_new();
    EXPECT(config != NULL);
    EXPECT_INVALID(cacheaside_config_set_session_max_lifetime_ms(config, 0));
    EXPECT_INVALID(cacheaside_config_set_session_max_lifetime_ms(NULL, 1000));
    CHECK(cacheaside_config_set_namespace(config, test_env("CACHEASIDE_TEST_NAMESPACE")));
    CHECK(cacheaside_config_set_session_max_lifetime_ms(config, 500));
    cacheaside_client *short_lived = NULL;
    CHECK(cacheaside_client_open(config, &short_lived));
    cacheaside_config_free(config);

    /* An idle TTL of a minute, read all the time, still ends at 500 ms. */
    cacheaside_bytes id = {0}, read = {0};
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start); /* before the server sets the deadline */
    CHECK(cacheaside_session_create(short_lived, "1", 1, 60000, &id));
    for (;;) {
        cacheaside_status s = cacheaside_session_get(short_lived, (const char *)id.data, &read);
        cacheaside_bytes_free(&read);
        clock_gettime(CLOCK_MONOTONIC, &now);
        long elapsed_ms =
            (now.tv_sec - start.tv_sec) * 1000 + (now.tv_nsec - start.tv_nsec) / 1000000;
        if (s == CACHEASIDE_NOT_FOUND) {
            EXPECT(elapsed_ms >= 490); /* not before its time (10 ms for two clocks) */
            break;
        }
        EXPECT(s == CACHEASIDE_OK);
        EXPECT(elapsed_ms < 30000); /* ...and not never */
        sleep_ms(50);
    }
    cacheaside_bytes_free(&id);
    cacheaside_client_free(short_lived);
}

static void session_bad_input(void) {
    cacheaside_bytes out;
    char long_id[130];
    memset(long_id, 'a', sizeof long_id - 1);
    long_id[sizeof long_id - 1] = '\0';
    const char *bad_ids[] = {"", "a/b", "a+b", "abc=", "a b", NOT_UTF8, long_id};
    for (size_t i = 0; i < sizeof bad_ids / sizeof bad_ids[0]; i++) {
        memset(&out, 0xAB, sizeof out);
        EXPECT_INVALID(cacheaside_session_get(client, bad_ids[i], &out));
        EXPECT(out.data == NULL && out.len == 0);
        EXPECT_INVALID(cacheaside_session_delete(client, bad_ids[i]));
    }
    EXPECT_INVALID(cacheaside_session_get(NULL, "abc", &out));
    EXPECT_INVALID(cacheaside_session_get(client, NULL, &out));
    EXPECT_INVALID(cacheaside_session_get(client, "abc", NULL));
    EXPECT_INVALID(cacheaside_session_delete(NULL, "abc"));
    EXPECT_INVALID(cacheaside_session_delete(client, NULL));

    EXPECT_INVALID(cacheaside_session_create(client, "{", 1, 1000, &out));
    EXPECT(strstr(cacheaside_last_error(), "JSON") != NULL);
    EXPECT_INVALID(cacheaside_session_create(client, "", 0, 1000, &out));
    EXPECT_INVALID(cacheaside_session_create(client, NULL, 0, 1000, &out));
    EXPECT_INVALID(cacheaside_session_create(client, NULL, 5, 1000, &out));
    EXPECT_INVALID(cacheaside_session_create(client, NOT_UTF8, 3, 1000, &out));
    EXPECT_INVALID(cacheaside_session_create(client, "1", 1, 0, &out));
    EXPECT_INVALID(cacheaside_session_create(NULL, "1", 1, 1000, &out));
    EXPECT_INVALID(cacheaside_session_create(client, "1", 1, 1000, NULL));
    EXPECT(out.data == NULL);
}

/* ---------------------------------------------------------------- pub/sub */

/* What a callback saw, guarded by `lock`. */
struct inbox {
    pthread_mutex_t lock;
    pthread_cond_t changed;
    int messages;
    int gaps;
    int out_of_order;
    char last_channel[64];
    cacheaside_subscription *self; /* set when the callback frees itself */
};

static void inbox_init(struct inbox *box) {
    memset(box, 0, sizeof *box);
    EXPECT(pthread_mutex_init(&box->lock, NULL) == 0);
    EXPECT(pthread_cond_init(&box->changed, NULL) == 0);
}

static void inbox_destroy(struct inbox *box) {
    pthread_cond_destroy(&box->changed);
    pthread_mutex_destroy(&box->lock);
}

/* Expects payloads "0", "1", ... in order; counts gap notices apart. */
static void collect(void *user_data, const char *channel, const char *payload, size_t len) {
    struct inbox *box = user_data;
    pthread_mutex_lock(&box->lock);
    if (channel == NULL) {
        box->gaps++;
    } else {
        char want[16];
        snprintf(want, sizeof want, "%d", box->messages);
        if (len != strlen(want) || strcmp(payload, want) != 0) {
            box->out_of_order++;
        }
        snprintf(box->last_channel, sizeof box->last_channel, "%s", channel);
        box->messages++;
    }
    pthread_cond_broadcast(&box->changed);
    pthread_mutex_unlock(&box->lock);
}

/* Frees its own subscription on the first message. */
static void free_myself(void *user_data, const char *channel, const char *payload, size_t len) {
    (void)channel;
    (void)payload;
    (void)len;
    struct inbox *box = user_data;
    pthread_mutex_lock(&box->lock);
    cacheaside_subscription *self = box->self;
    box->self = NULL;
    box->messages++;
    pthread_mutex_unlock(&box->lock);
    cacheaside_subscription_free(self); /* detaches: this call is the last */
    pthread_mutex_lock(&box->lock);
    box->gaps = -1; /* "returned from free" */
    pthread_cond_broadcast(&box->changed);
    pthread_mutex_unlock(&box->lock);
}

static void wait_for_messages(struct inbox *box, int count) {
    struct timespec deadline = deadline_in(60);
    pthread_mutex_lock(&box->lock);
    while (box->messages < count) {
        int rc = pthread_cond_timedwait(&box->changed, &box->lock, &deadline);
        EXPECT(rc == 0 || rc == ETIMEDOUT);
        EXPECT(rc == 0 || box->messages >= count);
    }
    pthread_mutex_unlock(&box->lock);
}

static void publish_and_subscribe(void) {
    struct inbox plain, pattern;
    inbox_init(&plain);
    inbox_init(&pattern);
    cacheaside_subscription *sub = NULL, *psub = NULL;
    CHECK(cacheaside_subscribe(client, "c-news", collect, &plain, &sub));
    CHECK(cacheaside_psubscribe(client, "c-n*", collect, &pattern, &psub));
    EXPECT(sub != NULL && psub != NULL);
    const int count = 20;
    for (int i = 0; i < count; i++) {
        char payload[16];
        int len = snprintf(payload, sizeof payload, "%d", i);
        uint64_t receivers = 99;
        CHECK(cacheaside_publish(client, "c-news", payload, (size_t)len, &receivers));
        EXPECT(receivers == 2);
    }
    wait_for_messages(&plain, count);
    wait_for_messages(&pattern, count);
    cacheaside_subscription_free(sub);
    cacheaside_subscription_free(psub);
    /* Freed from this thread: the callbacks are done and no longer called. */
    EXPECT(plain.messages == count && plain.out_of_order == 0 && plain.gaps == 0);
    EXPECT(pattern.messages == count && pattern.out_of_order == 0 && pattern.gaps == 0);
    EXPECT(strcmp(plain.last_channel, "c-news") == 0);
    EXPECT(strcmp(pattern.last_channel, "c-news") == 0);
    uint64_t receivers = 99;
    CHECK(cacheaside_publish(client, "c-news", "late", 4, &receivers));
    EXPECT(receivers == 0);
    /* An empty payload may be NULL. */
    CHECK(cacheaside_publish(client, "c-news", NULL, 0, &receivers));
    inbox_destroy(&plain);
    inbox_destroy(&pattern);
}

static void free_from_own_callback(void) {
    struct inbox box;
    inbox_init(&box);
    cacheaside_subscription *sub = NULL;
    pthread_mutex_lock(&box.lock); /* the callback cannot run before `self` is set */
    CHECK(cacheaside_subscribe(client, "c-once", free_myself, &box, &sub));
    box.self = sub;
    pthread_mutex_unlock(&box.lock);
    uint64_t receivers = 0;
    CHECK(cacheaside_publish(client, "c-once", "bye", 3, &receivers));
    EXPECT(receivers == 1);
    struct timespec deadline = deadline_in(60);
    pthread_mutex_lock(&box.lock);
    while (box.gaps != -1) {
        int rc = pthread_cond_timedwait(&box.changed, &box.lock, &deadline);
        EXPECT(rc == 0 || box.gaps == -1);
    }
    pthread_mutex_unlock(&box.lock);
    /* The detached thread unsubscribes on its way out. */
    for (int tries = 0;; tries++) {
        CHECK(cacheaside_publish(client, "c-once", "again", 5, &receivers));
        if (receivers == 0) {
            break;
        }
        EXPECT(tries < 3000);
        sleep_ms(10);
    }
    /* Nobody receives any more: the detached thread got past its callback
     * and unsubscribed, so `box` is ours alone again. */
    EXPECT(box.messages == 1);
    inbox_destroy(&box);
}

static void pubsub_bad_input(void) {
    cacheaside_subscription *sub = (cacheaside_subscription *)&sub; /* garbage */
    struct inbox box;
    inbox_init(&box);
    const char *bad_channels[] = {"", "a{b", "a}b", "a\nb", NOT_UTF8};
    for (size_t i = 0; i < sizeof bad_channels / sizeof bad_channels[0]; i++) {
        sub = (cacheaside_subscription *)&sub;
        EXPECT_INVALID(cacheaside_subscribe(client, bad_channels[i], collect, &box, &sub));
        EXPECT(sub == NULL);
        sub = (cacheaside_subscription *)&sub;
        EXPECT_INVALID(cacheaside_psubscribe(client, bad_channels[i], collect, &box, &sub));
        EXPECT(sub == NULL);
        uint64_t receivers = 7;
        EXPECT_INVALID(cacheaside_publish(client, bad_channels[i], "x", 1, &receivers));
        EXPECT(receivers == 0);
    }
    EXPECT_INVALID(cacheaside_subscribe(NULL, "c", collect, &box, &sub));
    EXPECT_INVALID(cacheaside_subscribe(client, NULL, collect, &box, &sub));
    EXPECT_INVALID(cacheaside_subscribe(client, "c", NULL, &box, &sub));
    EXPECT(strstr(cacheaside_last_error(), "callback") != NULL);
    EXPECT_INVALID(cacheaside_subscribe(client, "c", collect, &box, NULL));
    EXPECT_INVALID(cacheaside_psubscribe(client, "c*", NULL, &box, &sub));
    EXPECT_INVALID(cacheaside_psubscribe(client, NULL, collect, &box, &sub));
    uint64_t receivers;
    EXPECT_INVALID(cacheaside_publish(NULL, "c", "x", 1, &receivers));
    EXPECT_INVALID(cacheaside_publish(client, NULL, "x", 1, &receivers));
    EXPECT_INVALID(cacheaside_publish(client, "c", NULL, 1, &receivers));
    EXPECT_INVALID(cacheaside_publish(client, "c", "x", 1, NULL));
    cacheaside_subscription_free(NULL);
    EXPECT(box.messages == 0);
    inbox_destroy(&box);
}

int main(void) {
    cacheaside_client *owned = open_test_client();
    client = owned;
    rate_limit_counts_only_allowed_requests();
    rate_limit_bad_input();
    session_lifecycle();
    session_max_lifetime_caps_the_ttl();
    session_bad_input();
    publish_and_subscribe();
    free_from_own_callback();
    pubsub_bad_input();
    cacheaside_client_free(owned);
    puts("patterns: ok");
    return EXIT_SUCCESS;
}
