/*
 * cacheaside.hpp: a header-only C++17 wrapper over the C API in
 * cacheaside.h (Redis in front of PostgreSQL with cache-aside).
 *
 * Hand-written (unlike cacheaside.h); it adds no behaviour, only RAII and
 * C++ types. cacheaside::Engine caches tables of your own
 * (cacheaside_engine); cacheaside::Client is the lab's users table:
 *   - handles are owned by std::unique_ptr with the library's free
 *     functions as deleters, so nothing leaks when an exception unwinds;
 *   - results are std::optional<UserProfile> / std::optional<std::string>
 *     (std::nullopt is CACHEASIDE_NOT_FOUND);
 *   - every failure throws cacheaside::Error, carrying the status (and its
 *     name, in what() and status_name()) and the library's message;
 *   - a pub/sub subscription is a move-only cacheaside::Subscription whose
 *     callback may be any std::function; destroying it unsubscribes.
 *
 * Thread safety: a cacheaside::Engine or cacheaside::Client may be used
 * from many threads at once (every member function is const); a
 * cacheaside::Config may not.
 *
 * Build: c++ -std=c++17 -I include app.cpp -L target/release -lcacheaside
 *        -Wl,-rpath,$PWD/target/release -pthread
 */
#ifndef CACHEASIDE_HPP
#define CACHEASIDE_HPP

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__GLIBCXX__)
#include <cxxabi.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#define CACHEASIDE_HPP_PTHREADS 1
#endif

#include "cacheaside.h"

namespace cacheaside {

/** A failed call: the C status and the message cacheaside_last_error() gave.
 *  what() reads "<status name>: <message>", e.g.
 *  "CACHEASIDE_TIMEOUT: timed out: ...". */
class Error : public std::runtime_error {
public:
    Error(cacheaside_status status, const std::string &message)
        : std::runtime_error(std::string(cacheaside_status_str(status)) + ": " + message),
          status_(status) {}

    /** The C status, never CACHEASIDE_OK or CACHEASIDE_NOT_FOUND. */
    cacheaside_status status() const noexcept { return status_; }

    /** The status's name, e.g. "CACHEASIDE_TIMEOUT" (a static string). */
    const char *status_name() const noexcept { return cacheaside_status_str(status_); }

private:
    cacheaside_status status_;
};

namespace detail {

/** Throws unless the call succeeded; call right after the C function, on
 *  the same thread, so the message is that call's. */
inline void check(cacheaside_status status) {
    if (status != CACHEASIDE_OK) {
        throw Error(status, cacheaside_last_error());
    }
}

/** A NUL inside a std::string would silently cut the C string short. */
inline const char *c_str(const std::string &text, const char *what) {
    if (text.find('\0') != std::string::npos) {
        throw Error(CACHEASIDE_INVALID_ARGUMENT,
                    std::string("invalid argument: ") + what + " holds a NUL byte");
    }
    return text.c_str();
}

struct ConfigFree {
    void operator()(cacheaside_config *config) const noexcept { cacheaside_config_free(config); }
};

struct ClientFree {
    void operator()(cacheaside_client *client) const noexcept { cacheaside_client_free(client); }
};

/** Frees the strings of a profile that lives elsewhere (on the stack). */
struct ProfileFree {
    void operator()(cacheaside_user_profile *profile) const noexcept {
        cacheaside_user_profile_free(profile);
    }
};

/** Frees the data of a cacheaside_bytes that lives elsewhere. */
struct BytesFree {
    void operator()(cacheaside_bytes *bytes) const noexcept { cacheaside_bytes_free(bytes); }
};

struct SubscriptionFree {
    void operator()(cacheaside_subscription *subscription) const noexcept {
        cacheaside_subscription_free(subscription);
    }
};

inline uint64_t millis(std::chrono::milliseconds duration) {
    // A negative duration becomes 0, which the library rejects.
    return duration.count() < 0 ? 0 : static_cast<uint64_t>(duration.count());
}

/** Defers thread cancellation for its lifetime: a loader runs inside the
 *  library, and a cancellation (a forced unwind) must not start there. A
 *  pending cancellation is acted on at the next cancellation point after
 *  the call. */
class NoCancel {
public:
    NoCancel() noexcept {
#ifdef CACHEASIDE_HPP_PTHREADS
        pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, &old_);
#endif
    }
    ~NoCancel() {
#ifdef CACHEASIDE_HPP_PTHREADS
        int ignored;
        pthread_setcancelstate(old_, &ignored);
#endif
    }
    NoCancel(const NoCancel &) = delete;
    NoCancel &operator=(const NoCancel &) = delete;

private:
    int old_ = 0;
};

struct EngineFree {
    void operator()(cacheaside_engine *engine) const noexcept { cacheaside_engine_free(engine); }
};

/** Runs a C++ loader's body inside a C callback: no exception may cross
 *  into the library, so it is kept in `thrown` and the load fails. */
template <class Body>
int guarded(std::exception_ptr &thrown, Body &&body) {
    try {
        return body();
    }
#if defined(__GLIBCXX__)
    // A forced unwind (pthread_exit) must not be swallowed; it cannot cross
    // the library either, so it ends the process. Loaders must not call
    // pthread_exit; cancellation is deferred around the call.
    catch (abi::__forced_unwind &) {
        throw;
    }
#endif
    catch (...) {
        thrown = std::current_exception();
        return CACHEASIDE_LOADER_ERROR;
    }
}

/** A call's value: the loader's own exception when the call failed because
 *  of it, std::nullopt for CACHEASIDE_NOT_FOUND, else the bytes (or Error). */
inline std::optional<std::string> outcome(cacheaside_status status,
                                          const std::exception_ptr &thrown,
                                          const cacheaside_bytes &raw) {
    if (thrown && status == CACHEASIDE_LOADER_ERROR) {
        std::rethrow_exception(thrown);
    }
    if (status == CACHEASIDE_NOT_FOUND) {
        return std::nullopt;
    }
    check(status);
    return std::string(reinterpret_cast<const char *>(raw.data), raw.len);
}

}  // namespace detail

/** One user (a copy: it owns its strings and outlives the client). */
struct UserProfile {
    int64_t id = 0;
    std::string name;
    std::string email;
    std::string plan;
    int64_t version = 0;

    bool operator==(const UserProfile &other) const {
        return id == other.id && name == other.name && email == other.email &&
               plan == other.plan && version == other.version;
    }
    bool operator!=(const UserProfile &other) const { return !(*this == other); }
};

/** What Client::rate_limit decided for one request. */
struct RateLimitResult {
    /** Whether the request may go ahead (only allowed requests are counted). */
    bool allowed = false;
    /** How many more requests the window allows right now. */
    uint32_t remaining = 0;
    /** Until the next request would be allowed: zero while `remaining` > 0,
     *  otherwise between 1 ms and the window. */
    std::chrono::milliseconds retry_after{0};
};

/**
 * What a subscription's callback receives. The views point into the
 * library's buffers and are valid only during the call: copy what you keep.
 */
struct Event {
    /** False: a message. True: a gap notice: the connection broke and has
     *  just been restored, messages published meanwhile may be lost (pub/sub
     *  is at-most-once), and every later message is delivered. */
    bool gap = false;
    /** The channel a message was published to, without the namespace
     *  (empty for a gap notice). */
    std::string_view channel;
    /** The message's bytes; for a gap notice, why the connection broke. */
    std::string_view payload;
};

/**
 * A live pub/sub subscription: a thread with its own Redis connection that
 * calls the callback for each Event, one at a time, in publish order.
 *
 * Move-only. Destroying it (or reset()) unsubscribes and waits for the
 * thread, so afterwards the callback is not running and never runs again.
 * Destroying or resetting it from inside its own callback is allowed: it
 * returns at once and the call in progress is the last one (the callback
 * object itself is kept alive until that call returns). The callback must
 * not throw: an exception escaping it calls std::terminate.
 */
class Subscription {
public:
    /** An empty subscription (nothing to stop). */
    Subscription() = default;
    Subscription(Subscription &&other) noexcept = default;
    Subscription &operator=(Subscription &&other) noexcept {
        if (this != &other) {
            reset();  // stop ours before its callback object can go away
            handle_ = std::move(other.handle_);
            state_ = std::move(other.state_);
        }
        return *this;
    }
    Subscription(const Subscription &) = delete;
    Subscription &operator=(const Subscription &) = delete;
    ~Subscription() { reset(); }

    /** Unsubscribes and stops the thread now; a no-op when empty. */
    void reset() noexcept {
        handle_.reset();  // first: afterwards the callback is never called
        state_.reset();
    }

    /** True until reset (or moved from). */
    explicit operator bool() const noexcept { return handle_ != nullptr; }

private:
    friend class Client;

    struct State : std::enable_shared_from_this<State> {
        explicit State(std::function<void(const Event &)> fn) : on_event(std::move(fn)) {}
        std::function<void(const Event &)> on_event;
    };

    using SubscribeFn = cacheaside_status (*)(const cacheaside_client *, const char *,
                                              cacheaside_message_cb, void *,
                                              cacheaside_subscription **);

    Subscription(const cacheaside_client *client, SubscribeFn subscribe, const char *name,
                 std::function<void(const Event &)> on_event)
        : state_(std::make_shared<State>(std::move(on_event))) {
        cacheaside_subscription *raw = nullptr;
        detail::check(subscribe(client, name, &Subscription::trampoline, state_.get(), &raw));
        handle_.reset(raw);
    }

    static void trampoline(void *user_data, const char *channel, const char *payload,
                           std::size_t len) noexcept {
        State *state = static_cast<State *>(user_data);
        // Holds the state for the length of the call: the callback may
        // destroy the Subscription that owns it.
        std::shared_ptr<State> keep = state->shared_from_this();
        Event event;
        event.gap = channel == nullptr;
        event.channel = channel == nullptr ? std::string_view() : std::string_view(channel);
        event.payload = std::string_view(payload, len);
        keep->on_event(event);
    }

    std::shared_ptr<State> state_;
    std::unique_ptr<cacheaside_subscription, detail::SubscriptionFree> handle_;
};

/** The library's version at run time, e.g. "0.1.0". */
inline std::string version() { return cacheaside_version(); }

/**
 * Settings for a Client: the defaults, with DATABASE_URL and REDIS_URL
 * from the environment; each setter validates and throws Error on a bad
 * value. Setters return *this so they chain. Not thread-safe.
 */
class Config {
public:
    Config() : handle_(cacheaside_config_new()) {
        if (!handle_) {
            throw Error(CACHEASIDE_PANIC, cacheaside_last_error());
        }
    }

    Config &database_url(const std::string &url) {
        detail::check(cacheaside_config_set_database_url(get(), detail::c_str(url, "url")));
        return *this;
    }
    Config &redis_url(const std::string &url) {
        detail::check(cacheaside_config_set_redis_url(get(), detail::c_str(url, "url")));
        return *this;
    }
    Config &redis_ca_file(const std::string &path) {
        detail::check(cacheaside_config_set_redis_ca_file(get(), detail::c_str(path, "path")));
        return *this;
    }
    Config &database_ca_file(const std::string &path) {
        detail::check(cacheaside_config_set_database_ca_file(get(), detail::c_str(path, "path")));
        return *this;
    }
    Config &replica_url(const std::string &url) {
        detail::check(cacheaside_config_set_replica_url(get(), detail::c_str(url, "url")));
        return *this;
    }
    Config &replica_max_lag(std::chrono::milliseconds lag) {
        detail::check(cacheaside_config_set_replica_max_lag_ms(get(), detail::millis(lag)));
        return *this;
    }
    Config &users_table(const std::string &table) {
        detail::check(cacheaside_config_set_users_table(get(), detail::c_str(table, "table")));
        return *this;
    }
    Config &namespace_(const std::string &ns) {
        detail::check(cacheaside_config_set_namespace(get(), detail::c_str(ns, "namespace")));
        return *this;
    }
    Config &ttl(std::chrono::milliseconds ttl) {
        detail::check(cacheaside_config_set_ttl_ms(get(), detail::millis(ttl)));
        return *this;
    }
    Config &negative_ttl(std::chrono::milliseconds ttl) {
        detail::check(cacheaside_config_set_negative_ttl_ms(get(), detail::millis(ttl)));
        return *this;
    }
    Config &lease_ttl(std::chrono::milliseconds ttl) {
        detail::check(cacheaside_config_set_lease_ttl_ms(get(), detail::millis(ttl)));
        return *this;
    }
    Config &lock_ttl(std::chrono::milliseconds ttl) {
        detail::check(cacheaside_config_set_lock_ttl_ms(get(), detail::millis(ttl)));
        return *this;
    }
    Config &lock_wait(std::chrono::milliseconds wait) {
        detail::check(cacheaside_config_set_lock_wait_ms(get(), detail::millis(wait)));
        return *this;
    }
    Config &beta(double beta) {
        detail::check(cacheaside_config_set_beta(get(), beta));
        return *this;
    }
    Config &db_pool_size(uint32_t size) {
        detail::check(cacheaside_config_set_db_pool_size(get(), size));
        return *this;
    }
    Config &cache_pool_size(uint32_t size) {
        detail::check(cacheaside_config_set_cache_pool_size(get(), size));
        return *this;
    }
    Config &pool_timeout(std::chrono::milliseconds timeout) {
        detail::check(cacheaside_config_set_pool_timeout_ms(get(), detail::millis(timeout)));
        return *this;
    }
    Config &connect_timeout(std::chrono::milliseconds timeout) {
        detail::check(cacheaside_config_set_connect_timeout_ms(get(), detail::millis(timeout)));
        return *this;
    }
    Config &cache_timeout(std::chrono::milliseconds timeout) {
        detail::check(cacheaside_config_set_cache_timeout_ms(get(), detail::millis(timeout)));
        return *this;
    }
    Config &statement_timeout(std::chrono::milliseconds timeout) {
        detail::check(cacheaside_config_set_statement_timeout_ms(get(), detail::millis(timeout)));
        return *this;
    }
    Config &lock_poll(std::chrono::milliseconds poll) {
        detail::check(cacheaside_config_set_lock_poll_ms(get(), detail::millis(poll)));
        return *this;
    }
    /** Fail-safe: how long past its TTL a copy may be served when a reload
     *  fails; 0 turns it off. */
    Config &fail_safe(std::chrono::milliseconds max) {
        detail::check(cacheaside_config_set_fail_safe_max_ms(get(), detail::millis(max)));
        return *this;
    }
    Config &fail_safe_throttle(std::chrono::milliseconds throttle) {
        detail::check(cacheaside_config_set_fail_safe_throttle_ms(get(), detail::millis(throttle)));
        return *this;
    }
    Config &soft_timeout(std::chrono::milliseconds timeout) {
        detail::check(cacheaside_config_set_soft_timeout_ms(get(), detail::millis(timeout)));
        return *this;
    }
    /** Both breaker settings; the cool-off is checked first, so a throw
     *  changes nothing. */
    Config &breaker(uint32_t failures, std::chrono::milliseconds cool_off) {
        return breaker_cool_off(cool_off).breaker_failures(failures);
    }
    Config &breaker_failures(uint32_t failures) {
        detail::check(cacheaside_config_set_breaker_failures(get(), failures));
        return *this;
    }
    Config &breaker_cool_off(std::chrono::milliseconds cool_off) {
        detail::check(cacheaside_config_set_breaker_cool_off_ms(get(), detail::millis(cool_off)));
        return *this;
    }
    Config &pool_min_idle(uint32_t count) {
        detail::check(cacheaside_config_set_pool_min_idle(get(), count));
        return *this;
    }
    Config &background_threads(uint32_t threads) {
        detail::check(cacheaside_config_set_background_threads(get(), threads));
        return *this;
    }
    Config &relay_listen(bool on) {
        detail::check(cacheaside_config_set_relay_listen(get(), on));
        return *this;
    }
    Config &outbox_retention(std::chrono::milliseconds retention) {
        detail::check(cacheaside_config_set_outbox_retention_ms(get(), detail::millis(retention)));
        return *this;
    }
    Config &statement_cache_size(std::size_t size) {
        detail::check(cacheaside_config_set_statement_cache_size(get(), size));
        return *this;
    }
    Config &write_behind_batch(uint32_t batch) {
        detail::check(cacheaside_config_set_write_behind_batch(get(), batch));
        return *this;
    }
    Config &inspect_every(std::chrono::milliseconds every) {
        detail::check(cacheaside_config_set_inspect_every_ms(get(), detail::millis(every)));
        return *this;
    }
    Config &inspect_sample(uint32_t sample) {
        detail::check(cacheaside_config_set_inspect_sample(get(), sample));
        return *this;
    }
    Config &invalidation_relay(bool on) {
        detail::check(cacheaside_config_set_invalidation_relay(get(), on));
        return *this;
    }
    Config &outbox_table(const std::string &table) {
        detail::check(
            cacheaside_config_set_outbox_table(get(), detail::c_str(table, "outbox table")));
        return *this;
    }
    Config &relay_poll(std::chrono::milliseconds poll) {
        detail::check(cacheaside_config_set_relay_poll_ms(get(), detail::millis(poll)));
        return *this;
    }
    /** The longest a session lives, however often it is read (24 h by default). */
    Config &session_max_lifetime(std::chrono::milliseconds lifetime) {
        detail::check(
            cacheaside_config_set_session_max_lifetime_ms(get(), detail::millis(lifetime)));
        return *this;
    }

    /** Most write-behind changes that may wait for PostgreSQL before an
     *  enqueue throws Error with CACHEASIDE_BACKLOG_FULL (100000 by default). */
    Config &write_behind_backlog(uint64_t max_backlog) {
        detail::check(cacheaside_config_set_write_behind_max_backlog(get(), max_backlog));
        return *this;
    }
    /** How long a dead worker's changes wait before another worker claims
     *  them (30 s by default). */
    Config &write_behind_claim(std::chrono::milliseconds after) {
        detail::check(cacheaside_config_set_write_behind_claim_after_ms(get(), detail::millis(after)));
        return *this;
    }
    /** Attempts of a write PostgreSQL refuses before it is dead-lettered,
     *  and the first retry's wait (5 and 100 ms by default). */
    Config &write_behind_retries(uint32_t attempts, std::chrono::milliseconds backoff) {
        if (attempts == 0) {  // checked first, so a throw changes nothing
            detail::check(cacheaside_config_set_write_behind_attempts(get(), attempts));
        }
        return write_behind_retry_backoff(backoff).write_behind_attempts(attempts);
    }
    Config &write_behind_attempts(uint32_t attempts) {
        detail::check(cacheaside_config_set_write_behind_attempts(get(), attempts));
        return *this;
    }
    Config &write_behind_retry_backoff(std::chrono::milliseconds backoff) {
        detail::check(
            cacheaside_config_set_write_behind_retry_backoff_ms(get(), detail::millis(backoff)));
        return *this;
    }
    /** The near cache (L1) in process memory: up to `max_entries` (0 turns
     *  it off, the default), each served at most `max_staleness`; kept
     *  coherent by Redis (see docs/near-cache.md). */
    Config &local_cache(uint64_t max_entries, std::chrono::milliseconds max_staleness) {
        detail::check(
            cacheaside_config_set_local_cache(get(), max_entries, detail::millis(max_staleness)));
        return *this;
    }

    /** The C handle, still owned by this object. */
    cacheaside_config *get() const noexcept { return handle_.get(); }

private:
    std::unique_ptr<cacheaside_config, detail::ConfigFree> handle_;
};

/** A value with its version (any number that grows with every write of the
 *  row), as a versioned loader or a write-through's writer returns it. */
struct Versioned {
    std::string value;
    uint64_t version = 0;
};

/**
 * The cache-aside engine for tables of your own (cacheaside_engine): change
 * capture, single-flight reads, versioned reads and write-through,
 * invalidation. Move-only; share it between threads by reference. Every
 * member function blocks and may be called from many threads at once.
 *
 * Loaders run on the calling thread and return std::optional<std::string>
 * (any bytes; std::nullopt: no such row, cached as absent); versioned ones
 * and writers return std::optional<Versioned>. An exception a loader throws
 * is rethrown to the caller whose loader threw; callers that waited on it
 * get Error with CACHEASIDE_LOADER_ERROR. Thread cancellation is deferred
 * while the library runs a loader.
 *
 *     cacheaside::Engine engine(cacheaside::Config().namespace_("shop:"));
 *     engine.capture_changes("products", "product:", "id", "version");
 *     auto name = engine.get_or_load("product:7", std::chrono::minutes(1),
 *                                    [&](const std::string &key) { return load(key); });
 */
class Engine {
public:
    /** Opens as `config` says (lazily: call ping() to check the servers);
     *  the config may be destroyed afterwards. */
    explicit Engine(const Config &config) {
        cacheaside_engine *raw = nullptr;
        detail::check(cacheaside_engine_open(config.get(), &raw));
        handle_.reset(raw);
    }

    /** Checks that Redis and PostgreSQL answer; throws Error with the cause. */
    void ping() const { detail::check(cacheaside_engine_ping(get())); }

    /** Captures `table`'s changes: a write from anywhere invalidates the key
     *  `key_prefix` + `key_column` through the relay (started here). */
    void capture_changes(const std::string &table, const std::string &key_prefix,
                         const std::string &key_column,
                         const std::optional<std::string> &version_column = std::nullopt) const {
        detail::check(cacheaside_engine_capture_changes(
            get(), detail::c_str(table, "table"), detail::c_str(key_prefix, "key_prefix"),
            detail::c_str(key_column, "key_column"),
            version_column ? detail::c_str(*version_column, "version_column") : nullptr));
    }

    /** capture_changes() of a table whose rows carry a tag: a write also
     *  invalidates the tag `tag_prefix` + `tag_column` (old and new). */
    void capture_changes_tagged(const std::string &table, const std::string &key_prefix,
                                const std::string &key_column,
                                const std::optional<std::string> &version_column,
                                const std::string &tag_prefix,
                                const std::string &tag_column) const {
        detail::check(cacheaside_engine_capture_changes_tagged(
            get(), detail::c_str(table, "table"), detail::c_str(key_prefix, "key_prefix"),
            detail::c_str(key_column, "key_column"),
            version_column ? detail::c_str(*version_column, "version_column") : nullptr,
            detail::c_str(tag_prefix, "tag_prefix"), detail::c_str(tag_column, "tag_column")));
    }

    /** Starts the invalidation relay, for tables another process captured. */
    void start_relay() const { detail::check(cacheaside_engine_start_relay(get())); }

    /** Single-flight read: one `load(key)` however many threads miss. */
    template <class Load>
    std::optional<std::string> get_or_load(const std::string &key, std::chrono::milliseconds ttl,
                                           Load &&load) const {
        return plain(cacheaside_engine_get_or_load, key, ttl, load);
    }

    /** Every caller that misses runs its own `load(key)`. */
    template <class Load>
    std::optional<std::string> get_or_load_uncoalesced(const std::string &key,
                                                       std::chrono::milliseconds ttl,
                                                       Load &&load) const {
        return plain(cacheaside_engine_get_or_load_uncoalesced, key, ttl, load);
    }

    /** Single-flight read of a key also written through: `load(key)`
     *  returns std::optional<Versioned>. */
    template <class Load>
    std::optional<std::string> get_or_load_versioned(const std::string &key,
                                                     std::chrono::milliseconds ttl,
                                                     Load &&load) const {
        return versioned(cacheaside_engine_get_or_load_versioned, key, ttl, load);
    }

    /** Runs `write(key)` (an UPDATE ... RETURNING, giving
     *  std::optional<Versioned>) and caches what it wrote unless a newer
     *  write has; std::nullopt when it found no row. */
    template <class Write>
    std::optional<std::string> write_through(const std::string &key, std::chrono::milliseconds ttl,
                                             Write &&write) const {
        return versioned(cacheaside_engine_write_through, key, ttl, write);
    }

    /** Removes a key's cached value and revokes readers' leases on it. */
    void invalidate(const std::string &key) const {
        detail::check(cacheaside_engine_invalidate(get(), detail::c_str(key, "key")));
    }

    /** Makes every entry carrying `tag` a miss, in every process: one Redis
     *  command (entries are tagged by the Rust API's `get_or_load_tagged`). */
    void invalidate_tag(const std::string &tag) const {
        detail::check(cacheaside_engine_invalidate_tag(get(), detail::c_str(tag, "tag")));
    }

    /** Many keys at once (cacheaside_engine_get_or_load_many): the hits in
     *  one round trip, and one `load(missing)` call for every missing key.
     *  `load` gets a std::vector<std::string> of the missing keys and
     *  returns the rows it found as a container of
     *  std::pair<std::string, std::string> (key, value); a key it does not
     *  return (or one it was not asked for) is cached as absent. Returns one
     *  answer per key, in the order of `keys`. */
    template <class Load>
    std::vector<std::optional<std::string>> get_or_load_many(const std::vector<std::string> &keys,
                                                             std::chrono::milliseconds ttl,
                                                             Load &&load) const {
        struct Context {
            std::remove_reference_t<Load> *load;
            std::exception_ptr thrown;
        } context{&load, nullptr};
        cacheaside_batch_loader trampoline = [](void *user_data, const char *const *c_keys,
                                                size_t n_keys,
                                                cacheaside_batch_rows *rows) -> int {
            Context *context = static_cast<Context *>(user_data);
            return detail::guarded(context->thrown, [&]() -> int {
                std::vector<std::string> missing(c_keys, c_keys + n_keys);
                for (const auto &row : (*context->load)(missing)) {
                    for (size_t i = 0; i < n_keys; ++i) {
                        if (missing[i] == row.first) {
                            detail::check(cacheaside_batch_rows_set(
                                rows, i, row.second.data(), row.second.size(), 0));
                            break;
                        }
                    }
                }
                return CACHEASIDE_OK;
            });
        };
        std::vector<const char *> c_keys;
        c_keys.reserve(keys.size());
        for (const auto &key : keys) {
            c_keys.push_back(detail::c_str(key, "key"));
        }
        std::vector<cacheaside_bytes> raw(keys.size());
        cacheaside_status status;
        {
            detail::NoCancel no_cancel;
            status = cacheaside_engine_get_or_load_many(get(), c_keys.data(), c_keys.size(),
                                                        detail::millis(ttl), trampoline,
                                                        &context, raw.data());
        }
        std::vector<std::optional<std::string>> values;
        values.reserve(raw.size());
        for (auto &bytes : raw) {
            if (bytes.data != nullptr) {
                values.emplace_back(
                    std::string(reinterpret_cast<const char *>(bytes.data), bytes.len));
            } else {
                values.emplace_back(std::nullopt);
            }
            cacheaside_bytes_free(&bytes);
        }
        if (context.thrown && status == CACHEASIDE_LOADER_ERROR) {
            std::rethrow_exception(context.thrown);
        }
        detail::check(status);
        return values;
    }

    /** Invalidates many keys in one round trip (cacheaside_engine_invalidate_many). */
    void invalidate_many(const std::vector<std::string> &keys) const {
        std::vector<const char *> c_keys;
        c_keys.reserve(keys.size());
        for (const auto &key : keys) {
            c_keys.push_back(detail::c_str(key, "key"));
        }
        detail::check(cacheaside_engine_invalidate_many(get(), c_keys.data(), c_keys.size()));
    }

    /** Waits until the relay has applied every change committed so far;
     *  false at the timeout or without a relay. */
    bool relay_sync(std::chrono::milliseconds timeout) const {
        cacheaside_status status = cacheaside_engine_relay_sync(get(), detail::millis(timeout));
        if (status == CACHEASIDE_TIMEOUT) {
            return false;
        }
        detail::check(status);
        return true;
    }

    /** The engine's counters (see cacheaside_stats). */
    cacheaside_stats stats() const {
        cacheaside_stats out{};
        out.size = sizeof out;
        detail::check(cacheaside_engine_stats(get(), &out));
        return out;
    }

    /** Deletes every Redis key under this engine's (non-empty) namespace. */
    void delete_namespace() const { detail::check(cacheaside_engine_delete_namespace(get())); }

    /** The C handle, still owned by this object. */
    const cacheaside_engine *get() const noexcept { return handle_.get(); }

private:
    using PlainFn = cacheaside_status (*)(const cacheaside_engine *, const char *, uint64_t,
                                          cacheaside_loader, void *, cacheaside_bytes *);
    using VersionedFn = cacheaside_status (*)(const cacheaside_engine *, const char *, uint64_t,
                                              cacheaside_versioned_loader, void *,
                                              cacheaside_bytes *);

    template <class Load>
    std::optional<std::string> plain(PlainFn fn, const std::string &key,
                                     std::chrono::milliseconds ttl, Load &load) const {
        struct Context {
            Load *load;
            std::exception_ptr thrown;
        } context{&load, nullptr};
        // Captureless, so it converts to the C function pointer.
        cacheaside_loader trampoline = [](void *user_data, const char *c_key,
                                          cacheaside_bytes *out_value) -> int {
            Context *context = static_cast<Context *>(user_data);
            return detail::guarded(context->thrown, [&]() -> int {
                std::optional<std::string> value = (*context->load)(std::string(c_key));
                if (!value) {
                    return CACHEASIDE_NOT_FOUND;
                }
                detail::check(cacheaside_bytes_set(out_value, value->data(), value->size()));
                return CACHEASIDE_OK;
            });
        };
        return call(fn, trampoline, key, ttl, context.thrown, &context);
    }

    template <class Load>
    std::optional<std::string> versioned(VersionedFn fn, const std::string &key,
                                         std::chrono::milliseconds ttl, Load &load) const {
        struct Context {
            Load *load;
            std::exception_ptr thrown;
        } context{&load, nullptr};
        cacheaside_versioned_loader trampoline = [](void *user_data, const char *c_key,
                                                    cacheaside_bytes *out_value,
                                                    uint64_t *out_version) -> int {
            Context *context = static_cast<Context *>(user_data);
            return detail::guarded(context->thrown, [&]() -> int {
                std::optional<Versioned> row = (*context->load)(std::string(c_key));
                if (!row) {
                    return CACHEASIDE_NOT_FOUND;
                }
                detail::check(
                    cacheaside_bytes_set(out_value, row->value.data(), row->value.size()));
                *out_version = row->version;
                return CACHEASIDE_OK;
            });
        };
        return call(fn, trampoline, key, ttl, context.thrown, &context);
    }

    template <class Fn, class Trampoline>
    std::optional<std::string> call(Fn fn, Trampoline trampoline, const std::string &key,
                                    std::chrono::milliseconds ttl,
                                    const std::exception_ptr &thrown, void *context) const {
        cacheaside_bytes raw{};
        std::unique_ptr<cacheaside_bytes, detail::BytesFree> owned(&raw);
        const char *c_key = detail::c_str(key, "key");
        cacheaside_status status;
        {
            detail::NoCancel no_cancel;
            status = fn(get(), c_key, detail::millis(ttl), trampoline, context, &raw);
        }
        return detail::outcome(status, thrown, raw);
    }

    std::unique_ptr<cacheaside_engine, detail::EngineFree> handle_;
};

/**
 * A connected client. Move-only; share it between threads by reference.
 * Every member function blocks and may be called from many threads at once.
 */
class Client {
public:
    /**
     * Opens with the defaults (DATABASE_URL / REDIS_URL when set). Does not
     * wait for the servers (connections open lazily): call ping() to check
     * that both answer.
     */
    Client() { open(nullptr); }

    /** Opens as `config` says (lazily, as above); the config may be destroyed afterwards. */
    explicit Client(const Config &config) { open(config.get()); }

    /** Creates the users table unless it exists. */
    void install_schema() const { detail::check(cacheaside_client_install_schema(get())); }

    /** Drops the users table, the outbox and the capture functions. */
    void drop_schema() const { detail::check(cacheaside_client_drop_schema(get())); }

    /** Inserts the five demo users where their ids are free. */
    void seed_demo_users() const { detail::check(cacheaside_client_seed_demo_users(get())); }

    /** Cache-aside read; std::nullopt when no such user exists. */
    std::optional<UserProfile> get_user_profile(int64_t user_id) const {
        return read(cacheaside_get_user_profile, user_id);
    }

    /** Stampede-safe read: one query however many threads miss at once. */
    std::optional<UserProfile> get_user_profile_singleflight(int64_t user_id) const {
        return read(cacheaside_get_user_profile_singleflight, user_id);
    }

    /** Sets a user's plan, then invalidates it; false if no such user. */
    bool update_user_plan(int64_t user_id, const std::string &plan) const {
        cacheaside_status status =
            cacheaside_update_user_plan(get(), user_id, detail::c_str(plan, "plan"));
        if (status == CACHEASIDE_NOT_FOUND) {
            return false;
        }
        detail::check(status);
        return true;
    }

    /** Sets a user's plan and writes the new row through to the cache;
     *  std::nullopt if no such user. */
    std::optional<UserProfile> update_user_plan_write_through(int64_t user_id,
                                                              const std::string &plan) const {
        cacheaside_user_profile raw{};
        std::unique_ptr<cacheaside_user_profile, detail::ProfileFree> owned(&raw);
        cacheaside_status status = cacheaside_update_user_plan_write_through(
            get(), user_id, detail::c_str(plan, "plan"), &raw);
        return profile(status, raw);
    }

    /**
     * Write-behind: sets a user's plan in the cache at once (every reader
     * sees it) and queues its write to PostgreSQL; false if no such user.
     * Throws Error with CACHEASIDE_BACKLOG_FULL when the backlog is full
     * (nothing was enqueued).
     */
    bool update_user_plan_write_behind(int64_t user_id, const std::string &plan) const {
        cacheaside_status status =
            cacheaside_update_user_plan_write_behind(get(), user_id, detail::c_str(plan, "plan"));
        if (status == CACHEASIDE_NOT_FOUND) {
            return false;
        }
        detail::check(status);
        return true;
    }

    /** Starts `workers` write-behind worker threads owned by this client. */
    void write_behind_start(uint32_t workers) const {
        detail::check(cacheaside_write_behind_start(get(), workers));
    }

    /** Stops this client's write-behind workers and joins them. */
    void write_behind_stop() const { detail::check(cacheaside_write_behind_stop(get())); }

    /** Waits until every write-behind change enqueued before the call is in
     *  PostgreSQL (or dead-lettered); false at the timeout. */
    bool write_behind_drain(std::chrono::milliseconds timeout) const {
        cacheaside_status status = cacheaside_write_behind_drain(get(), detail::millis(timeout));
        if (status == CACHEASIDE_TIMEOUT) {
            return false;
        }
        detail::check(status);
        return true;
    }

    /** Write-behind changes (of any process) not yet in PostgreSQL. */
    uint64_t write_behind_pending() const {
        uint64_t pending = 0;
        detail::check(cacheaside_write_behind_pending(get(), &pending));
        return pending;
    }

    /**
     * Generic cache-aside read with single-flight: on a miss, one caller in
     * this process runs `load(key)`, which returns std::optional<std::string>
     * (any bytes; std::nullopt caches the absence), and every caller gets
     * its result. If `load` throws, the exception is rethrown to the caller
     * whose loader threw, when its call failed because of it; callers that
     * waited on it get Error with CACHEASIDE_LOADER_ERROR. A call that still
     * answers (a hit whose early refresh threw, a fail-safe copy) returns
     * its value: a hit never throws. Thread cancellation is deferred while
     * the library runs the loader.
     */
    template <class Load>
    std::optional<std::string> get_or_load(const std::string &key, std::chrono::milliseconds ttl,
                                           Load &&load) const {
        struct Context {
            std::remove_reference_t<Load> *load;
            std::exception_ptr thrown;
        } context{&load, nullptr};
        // Captureless, so it converts to the C function pointer. No
        // exception may cross into the library: all are caught here.
        cacheaside_loader trampoline = [](void *user_data, const char *c_key,
                                          cacheaside_bytes *out_value) -> int {
            Context *context = static_cast<Context *>(user_data);
            try {
                std::optional<std::string> value = (*context->load)(std::string(c_key));
                if (!value) {
                    return CACHEASIDE_NOT_FOUND;
                }
                detail::check(cacheaside_bytes_set(out_value, value->data(), value->size()));
                return CACHEASIDE_OK;
            }
#if defined(__GLIBCXX__)
            // A forced unwind (pthread_exit) must not be swallowed; it cannot
            // cross the library either, so it ends the process. Loaders must
            // not call pthread_exit; cancellation is deferred below.
            catch (abi::__forced_unwind &) {
                throw;
            }
#endif
            catch (...) {
                context->thrown = std::current_exception();
                return CACHEASIDE_LOADER_ERROR;
            }
        };
        cacheaside_bytes raw{};
        std::unique_ptr<cacheaside_bytes, detail::BytesFree> owned(&raw);
        const char *c_key = detail::c_str(key, "key");
        cacheaside_status status;
        {
            detail::NoCancel no_cancel;
            status = cacheaside_client_get_or_load(get(), c_key, detail::millis(ttl), trampoline,
                                            &context, &raw);
        }
        if (context.thrown && status == CACHEASIDE_LOADER_ERROR) {
            std::rethrow_exception(context.thrown);
        }
        if (status == CACHEASIDE_NOT_FOUND) {
            return std::nullopt;
        }
        detail::check(status);
        return std::string(reinterpret_cast<const char *>(raw.data), raw.len);
    }

    /** Removes a key's cached value and revokes readers' leases on it. */
    void invalidate(const std::string &key) const {
        detail::check(cacheaside_client_invalidate(get(), detail::c_str(key, "key")));
    }

    /**
     * Sliding-window rate limit: at most `limit` requests of `subject` in any
     * `window`, exact across processes; only allowed requests are counted.
     */
    RateLimitResult rate_limit(const std::string &subject, uint32_t limit,
                               std::chrono::milliseconds window) const {
        cacheaside_rate_limit_result raw{};
        detail::check(cacheaside_rate_limit(get(), detail::c_str(subject, "subject"), limit,
                                            detail::millis(window), &raw));
        RateLimitResult result;
        result.allowed = raw.allowed;
        result.remaining = raw.remaining;
        result.retry_after = std::chrono::milliseconds(raw.retry_after_ms);
        return result;
    }

    /**
     * Creates a session holding `json` (one JSON value); returns its id (43
     * URL-safe characters). It expires `idle_ttl` after its last read, and at
     * the latest the config's session_max_lifetime after creation.
     */
    std::string session_create(const std::string &json, std::chrono::milliseconds idle_ttl) const {
        cacheaside_bytes raw{};
        std::unique_ptr<cacheaside_bytes, detail::BytesFree> owned(&raw);
        detail::check(cacheaside_session_create(get(), json.data(), json.size(),
                                                detail::millis(idle_ttl), &raw));
        return std::string(reinterpret_cast<const char *>(raw.data), raw.len);
    }

    /** Reads a session's JSON and renews its idle TTL; std::nullopt if it
     *  does not exist (unknown, deleted or expired). */
    std::optional<std::string> session_get(const std::string &id) const {
        cacheaside_bytes raw{};
        std::unique_ptr<cacheaside_bytes, detail::BytesFree> owned(&raw);
        cacheaside_status status = cacheaside_session_get(get(), detail::c_str(id, "id"), &raw);
        if (status == CACHEASIDE_NOT_FOUND) {
            return std::nullopt;
        }
        detail::check(status);
        return std::string(reinterpret_cast<const char *>(raw.data), raw.len);
    }

    /** Ends a session; false if it did not exist. */
    bool session_delete(const std::string &id) const {
        cacheaside_status status = cacheaside_session_delete(get(), detail::c_str(id, "id"));
        if (status == CACHEASIDE_NOT_FOUND) {
            return false;
        }
        detail::check(status);
        return true;
    }

    /** Publishes `payload` (any bytes) on `channel`; returns how many
     *  subscribers received it. */
    uint64_t publish(const std::string &channel, std::string_view payload) const {
        uint64_t receivers = 0;
        detail::check(cacheaside_publish(get(), detail::c_str(channel, "channel"), payload.data(),
                                         payload.size(), &receivers));
        return receivers;
    }

    /** Subscribes to `channel`; `on_event` runs on the subscription's own
     *  thread until the returned Subscription is destroyed. */
    Subscription subscribe(const std::string &channel,
                           std::function<void(const Event &)> on_event) const {
        return Subscription(get(), cacheaside_subscribe, detail::c_str(channel, "channel"),
                            std::move(on_event));
    }

    /** Subscribes to every channel matching the Redis glob `pattern`. */
    Subscription psubscribe(const std::string &pattern,
                            std::function<void(const Event &)> on_event) const {
        return Subscription(get(), cacheaside_psubscribe, detail::c_str(pattern, "pattern"),
                            std::move(on_event));
    }

    /** Deletes every Redis key under this client's (non-empty) namespace. */
    void delete_namespace() const { detail::check(cacheaside_client_delete_namespace(get())); }

    /** Statements sent to PostgreSQL since the client opened. */
    uint64_t query_count() const noexcept { return cacheaside_client_query_count(get()); }

    /** Checks that Redis and PostgreSQL answer; throws Error with the
     *  cause (a closed port, a wrong password, a missing database). */
    void ping() const { detail::check(cacheaside_client_ping(get())); }

    /** Waits until the invalidation relay has applied every change
     *  committed so far; false at the timeout or without a relay. */
    bool relay_sync(std::chrono::milliseconds timeout) const {
        return cacheaside_client_relay_sync(get(), detail::millis(timeout)) == CACHEASIDE_OK;
    }

    /** The client's counters (see cacheaside_stats). */
    cacheaside_stats stats() const {
        cacheaside_stats out{};
        out.size = sizeof out;
        detail::check(cacheaside_client_stats(get(), &out));
        return out;
    }

    /** Keys with a single-flight load in progress in this process. */
    std::size_t in_flight() const noexcept { return cacheaside_client_in_flight(get()); }

    /** The C handle, still owned by this object. */
    const cacheaside_client *get() const noexcept { return handle_.get(); }

private:
    void open(const cacheaside_config *config) {
        cacheaside_client *raw = nullptr;
        detail::check(cacheaside_client_open(config, &raw));
        handle_.reset(raw);
    }

    using ReadFn = cacheaside_status (*)(const cacheaside_client *, int64_t,
                                         cacheaside_user_profile *);

    std::optional<UserProfile> read(ReadFn read_fn, int64_t user_id) const {
        cacheaside_user_profile raw{};
        std::unique_ptr<cacheaside_user_profile, detail::ProfileFree> owned(&raw);
        cacheaside_status status = read_fn(get(), user_id, &raw);
        return profile(status, raw);
    }

    /** Copies a filled profile out (the caller's unique_ptr frees it). */
    static std::optional<UserProfile> profile(cacheaside_status status,
                                              const cacheaside_user_profile &raw) {
        if (status == CACHEASIDE_NOT_FOUND) {
            return std::nullopt;
        }
        detail::check(status);
        return UserProfile{raw.id, raw.name, raw.email, raw.plan, raw.version};
    }

    std::unique_ptr<cacheaside_client, detail::ClientFree> handle_;
};

}  // namespace cacheaside

#endif /* CACHEASIDE_HPP */
