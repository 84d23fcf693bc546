//! # cacheaside
//!
//! Redis in front of PostgreSQL with the cache-aside (lazy-loading) pattern,
//! for synchronous Rust programs (and, through a C ABI, C and C++ ones).
//!
//! - Reads check Redis first; a miss loads from Postgres and caches the
//!   result (or its absence) with a TTL. A hit never touches Postgres.
//! - Writes go to Postgres, then invalidate (or write through to) the cache.
//!   Readers hold a *lease* while they load, so a read that raced a write can
//!   never put the pre-write row back into the cache.
//! - A hot key that misses costs one load however many threads and processes
//!   ask at once: single-flight in process, a Redis rebuild lock across
//!   processes, and XFetch early refresh before the key expires.
//! - Write-behind: a change is cached at once and queued on a Redis Stream
//!   in one script; worker threads (in any process) write it to Postgres in
//!   batches, acknowledging only after the commit, so nothing is lost and a
//!   per-key sequence number makes redelivery harmless
//!   ([`Client::update_user_plan_write_behind`],
//!   [`CacheAside::write_behind`]).
//!
//! Every call blocks: from async code, run it in
//! `tokio::task::spawn_blocking` (called from an async task, a call that
//! reaches Postgres returns [`ErrorKind::InvalidArgument`] saying so).
//!
//! [`CacheAside`] is the engine, for your own tables and any key, value
//! and loader; `examples/products.rs` caches a products table end to end.
//! [`Client`] is the teaching lab (a users table) built on it.
//!
//! ```no_run
//! use std::time::Duration;
//! use cacheaside::{CacheAside, Config, Mode, Versioned};
//!
//! let engine = CacheAside::open(&Config::builder().urls_from_env().build()?)?;
//! // Writes from anywhere (psql, other services) reach the cache.
//! engine.capture_changes("products", "product:", "id", Some("version"))?;
//! let sql = "SELECT name, version FROM products WHERE id = $1";
//! let name: Option<String> =
//!     engine.get_or_load_versioned("product:7", Duration::from_secs(300), Mode::SingleFlight, || {
//!         let row = engine.db().query_opt(sql, &[&7_i64])?;
//!         Ok(row.map(|r| Versioned::new(r.get(0), r.get::<_, i64>(1) as u64)))
//!     })?;
//! println!("{name:?}, {:?}", engine.stats());
//! # Ok::<(), cacheaside::Error>(())
//! ```
//!
//! ## Cargo features
//!
//! - `capi` (default): the C ABI (module `ffi`), exported as `cacheaside_*`
//!   symbols from `libcacheaside.so` and `libcacheaside.a`, with the
//!   header build.rs generates (`docs/install.md` installs both). Without
//!   it (`default-features = false`) no C symbol is exported and cbindgen
//!   is not built.
//! - `tracing`: a `cacheaside.miss` span per read that misses (key, mode,
//!   outcome, load time) and events for dropped fills, lock waits, breaker
//!   transitions and early refreshes. Without it the same events go to the
//!   `log` facade (which the C log callback receives).
//! - `metrics`: counters mirroring [`Stats`] and histograms of load time and
//!   lock wait through the `metrics` facade (`examples/metrics.rs` wires a
//!   Prometheus exporter).
//! - `test-hooks`: forced race interleavings for this crate's tests; never
//!   in production.
#![warn(missing_docs)]

// Layers point one way: each module imports only from the layers above it
// in this list (and from its own).

// Ground: errors, settings, key layout, entry format, observability.
mod config; // settings, validation and every timing budget
mod entry; // the cached entry format, XFetch's decision
mod error; // the one Error type and its kinds
#[cfg(feature = "test-hooks")]
pub mod hooks; // forced interleavings for tests
mod keys; // the Redis key layout and the one rule for names in a hash tag
mod observe; // Stats, and the counters, log, tracing and metrics behind it

// Transport: Postgres (pool -> pg -> db) and Redis (redis_conn -> cache).
mod cache; // the public Redis API: pool, namespaced keys, JSON values
mod db; // Postgres: pool, statements, query counter
mod pg; // one blocking Postgres connection with deadlines
mod pool; // pools that fail fast and heal fast
mod redis_conn; // one Redis connection: single server or cluster, TLS, errors
mod server_watch; // which Redis server process we reach, and when it changes

// Protocol: what the engine is built from.
mod background; // the engine's small pool of background threads
mod breaker; // the circuit breaker in front of Redis
mod fence; // loads from a read replica, fenced by committed versions
mod keeper; // the thread that renews live loads' leases and deletes orphans
mod lease; // the lease protocol: Lua scripts and their wrappers
mod miss_ahead; // a mostly-missing engine's plain miss: claim with the GET, fill behind
mod near; // the near cache (L1) in process memory, kept coherent by Redis
mod singleflight; // in-process single-flight
mod tags; // tags: stamps per tag, checked on read, replaced to invalidate

// Engine: the read/write algorithm, and what runs on it.
mod batch; // many keys at once: get_or_load_many, invalidate_many
mod engine; // reads, fills, fail-safe, invalidation, write-through
mod inspect; // the inspector: cached entries against their rows
mod refresh; // conditional refresh: a loader may find the row unchanged
mod relay; // invalidation from Postgres: outbox, trigger, relay
mod write_behind; // durable write-behind: stream, workers, appliers

// Face: the public types, and the patterns beside them.
mod aside; // CacheAside: the engine's public face
mod events; // pub/sub that tells a subscriber what it may have missed
mod ratelimit; // an exact sliding-window rate limiter
mod sessions; // sessions with sliding expiry and an absolute lifetime
mod users; // the lab: users table and its functions

#[cfg(feature = "capi")]
// The C ABI keeps calling the Rust names it was written against until its
// own rename (cacheaside_<object>_<verb>) lands: they stay a release as
// deprecated aliases.
#[allow(deprecated)]
pub mod ffi; // the C ABI

pub use aside::CacheAside;
pub use cache::Cache;
pub use config::{Config, ConfigBuilder, EntryOptions, LocalCache, MAX_TTL, redact_url};
pub use db::{Db, Transaction};
pub use engine::Mode;
pub use entry::Versioned;
pub use error::{Error, ErrorKind, Result};
pub use events::{Event, Events, Subscription};
pub use inspect::{InspectReport, StaleEntry};
pub use observe::Stats;
pub use pg::Params;
pub use ratelimit::{RateLimitDecision, RateLimiter};
pub use redis_conn::RedisConnection;
pub use refresh::Refresh;
pub use sessions::Sessions;
pub use users::{Client, DEMO_USERS, UserProfile};
pub use write_behind::{DeadLetter, MAX_WRITE_BEHIND_WORKERS, ReplayReport, WriteBehindChange};

/// The README's Rust code compiles as doctests, so the front door stays
/// true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

/// Re-exported so callers of [`Db`] can name rows and parameter types.
pub use tokio_postgres::{Row, types::ToSql};
