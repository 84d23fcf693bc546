/*
 * Write-behind through the C ABI: an enqueued plan change is read at once
 * and reaches PostgreSQL once drained; a worker process (forked before any
 * library call) is SIGKILLed while it flushes a stream of changes, and the
 * workers started here afterwards claim what it held: nothing is lost. A
 * full backlog returns CACHEASIDE_BACKLOG_FULL and drops nothing.
 */
#define _POSIX_C_SOURCE 200809L

#include <signal.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "test_support.h"

#define USERS 5
#define CHANGES 3000
#define KILL_AT 1000

/* A config on this program's table and namespace; a dead worker's changes
 * are claimed after 500 ms. */
static cacheaside_config *wb_config(void) {
    cacheaside_config *config = cacheaside_config_new();
    EXPECT(config != NULL);
    CHECK(cacheaside_config_set_users_table(config, test_env("CACHEASIDE_TEST_TABLE")));
    CHECK(cacheaside_config_set_namespace(config, test_env("CACHEASIDE_TEST_NAMESPACE")));
    CHECK(cacheaside_config_set_outbox_table(config, test_env("CACHEASIDE_TEST_OUTBOX")));
    CHECK(cacheaside_config_set_cache_timeout_ms(config, 2000));
    CHECK(cacheaside_config_set_lease_ttl_ms(config, 6000));
    CHECK(cacheaside_config_set_lock_ttl_ms(config, 6000));
    CHECK(cacheaside_config_set_write_behind_claim_after_ms(config, 500));
    CHECK(cacheaside_config_set_write_behind_attempts(config, 3));
    CHECK(cacheaside_config_set_write_behind_retry_backoff_ms(config, 20));
    return config;
}

static void sleep_ms(long ms) {
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&t, NULL);
}

/* The worker process: waits for the word, runs two workers until it is
 * killed (or its parent is gone). */
static void worker_process(int go, int ready, pid_t parent) {
    char byte;
    if (read(go, &byte, 1) != 1) {
        _exit(0); /* the parent died first */
    }
    cacheaside_config *config = wb_config();
    CHECK(cacheaside_config_set_invalidation_relay(config, false));
    cacheaside_client *client = NULL;
    CHECK(cacheaside_client_open(config, &client));
    cacheaside_config_free(config);
    CHECK(cacheaside_write_behind_start(client, 2));
    EXPECT(write(ready, "r", 1) == 1);
    while (getppid() == parent) {
        sleep_ms(50);
    }
    _exit(0);
}

static void expect_plan(cacheaside_client *client, int64_t id, const char *plan) {
    cacheaside_user_profile p = {0};
    CHECK(cacheaside_get_user_profile(client, id, &p));
    if (strcmp(p.plan, plan) != 0) {
        fprintf(stderr, "user %lld: plan %s, expected %s\n", (long long)id, p.plan, plan);
        exit(EXIT_FAILURE);
    }
    cacheaside_user_profile_free(&p);
}

static uint64_t pending(cacheaside_client *client) {
    uint64_t n = 99;
    CHECK(cacheaside_write_behind_pending(client, &n));
    return n;
}

int main(void) {
    /* Fork before the library starts any thread. */
    int go[2], ready[2];
    EXPECT(pipe(go) == 0 && pipe(ready) == 0);
    pid_t parent = getpid();
    pid_t worker = fork();
    EXPECT(worker >= 0);
    if (worker == 0) {
        close(go[1]);
        close(ready[0]);
        worker_process(go[0], ready[1], parent);
    }
    close(go[0]);
    close(ready[1]);

    cacheaside_config *config = wb_config();
    cacheaside_client *client = NULL;
    CHECK(cacheaside_client_open(config, &client));
    cacheaside_config_free(config);
    CHECK(cacheaside_client_install_schema(client));
    CHECK(cacheaside_client_seed_demo_users(client));
    CHECK(cacheaside_client_relay_sync(client, 30000));

    /* Enqueue: read at once, not in PostgreSQL until a worker writes it. */
    EXPECT_STATUS(cacheaside_update_user_plan_write_behind(client, 42, "x"),
                  CACHEASIDE_NOT_FOUND);
    EXPECT_STATUS(cacheaside_update_user_plan_write_behind(client, 1, NULL),
                  CACHEASIDE_INVALID_ARGUMENT);
    EXPECT_STATUS(cacheaside_update_user_plan_write_behind(client, 1, ""),
                  CACHEASIDE_INVALID_ARGUMENT);
    EXPECT_STATUS(cacheaside_write_behind_pending(client, NULL), CACHEASIDE_INVALID_ARGUMENT);
    EXPECT(pending(client) == 0);
    CHECK(cacheaside_update_user_plan_write_behind(client, 1, "behind"));
    expect_plan(client, 1, "behind");
    EXPECT(pending(client) == 1);
    EXPECT_STATUS(cacheaside_write_behind_drain(client, 100), CACHEASIDE_TIMEOUT);

    /* The worker process writes it. */
    EXPECT(write(go[1], "g", 1) == 1);
    char byte;
    EXPECT(read(ready[0], &byte, 1) == 1);
    CHECK(cacheaside_write_behind_drain(client, 30000));
    EXPECT(pending(client) == 0);
    uint64_t before = cacheaside_client_query_count(client);
    expect_plan(client, 1, "behind"); /* loaded from PostgreSQL */
    EXPECT(cacheaside_client_query_count(client) == before + 1);

    /* A stream of changes; the worker process is SIGKILLed midway. */
    char last[USERS + 1][32];
    memset(last, 0, sizeof last);
    for (int i = 0; i < CHANGES; i++) {
        int64_t id = i % USERS + 1;
        snprintf(last[id], sizeof last[id], "c-%d", i);
        CHECK(cacheaside_update_user_plan_write_behind(client, id, last[id]));
        if (i == KILL_AT) {
            EXPECT(kill(worker, SIGKILL) == 0);
            int status = 0;
            EXPECT(waitpid(worker, &status, 0) == worker);
            EXPECT(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
        }
    }
    /* Workers here take over, and claim what the dead ones held. */
    CHECK(cacheaside_write_behind_start(client, 2));
    EXPECT_STATUS(cacheaside_write_behind_start(client, 1), CACHEASIDE_INVALID_ARGUMENT);
    CHECK(cacheaside_write_behind_drain(client, 30000));
    EXPECT(pending(client) == 0);
    for (int64_t id = 1; id <= USERS; id++) {
        before = cacheaside_client_query_count(client);
        expect_plan(client, id, last[id]);
        EXPECT(cacheaside_client_query_count(client) == before + 1); /* PostgreSQL has it */
    }
    cacheaside_stats stats = {.size = sizeof stats};
    CHECK(cacheaside_client_stats(client, &stats));
    EXPECT(stats.size == sizeof stats);
    EXPECT(stats.write_behind_enqueued == 1 + CHANGES);
    EXPECT(stats.write_behind_dead_lettered == 0);
    uint64_t replayed = 99, left = 99;
    EXPECT_STATUS(cacheaside_write_behind_replay_dead_letters(client, 10, NULL, &left),
                  CACHEASIDE_INVALID_ARGUMENT);
    CHECK(cacheaside_write_behind_replay_dead_letters(client, 10, &replayed, &left));
    EXPECT(replayed == 0 && left == 0); /* nothing was dead-lettered */
    printf("write_behind: this process applied %llu, coalesced %llu, claimed %llu\n",
           (unsigned long long)stats.write_behind_applied,
           (unsigned long long)stats.write_behind_coalesced,
           (unsigned long long)stats.write_behind_claimed);

    /* A full backlog refuses, and drops nothing. */
    CHECK(cacheaside_write_behind_stop(client));
    config = wb_config();
    CHECK(cacheaside_config_set_invalidation_relay(config, false));
    CHECK(cacheaside_config_set_write_behind_max_backlog(config, 2));
    EXPECT_STATUS(cacheaside_config_set_write_behind_max_backlog(config, 0),
                  CACHEASIDE_INVALID_ARGUMENT);
    cacheaside_client *small = NULL;
    CHECK(cacheaside_client_open(config, &small));
    cacheaside_config_free(config);
    CHECK(cacheaside_update_user_plan_write_behind(small, 2, "full-1"));
    CHECK(cacheaside_update_user_plan_write_behind(small, 3, "full-2"));
    EXPECT_STATUS(cacheaside_update_user_plan_write_behind(small, 4, "refused"),
                  CACHEASIDE_BACKLOG_FULL);
    EXPECT(strstr(cacheaside_last_error(), "backlog is full") != NULL);
    EXPECT(pending(small) == 2);
    expect_plan(small, 4, last[4]);
    CHECK(cacheaside_write_behind_start(client, 1));
    CHECK(cacheaside_write_behind_drain(small, 30000));
    expect_plan(client, 2, "full-1");
    expect_plan(client, 3, "full-2");
    cacheaside_client_free(small);

    CHECK(cacheaside_client_drop_schema(client)); /* stops the workers first */
    cacheaside_client_free(client);
    puts("write_behind: ok");
    return EXIT_SUCCESS;
}
