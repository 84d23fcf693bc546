//! What the library tells the world besides [`stats`](crate::CacheAside::stats):
//! events, spans and metrics.
//!
//! Guarantees:
//! - Every event the library reports goes through [`report!`]: to `tracing`
//!   with the `tracing` feature, to `log` without it (which is what the C
//!   log callback, `cacheaside_log_set_callback`, receives).
//! - With `tracing`: a read that misses runs inside one `cacheaside.miss`
//!   span (fields `key`, `mode`, `bypass`, `outcome`, `load_ms`); dropped
//!   fills, lock waits, breaker transitions and early refreshes are events
//!   with structured fields, children of that span when a caller's read
//!   caused them.
//! - With `metrics`: every [`Stats`] field is a counter
//!   `cacheaside_<field>_total` (or, for a level such as
//!   `write_behind_lag_ms`, a gauge `cacheaside_<field>`), and load time and lock wait are
//!   histograms `cacheaside_load_seconds` and `cacheaside_lock_wait_seconds`,
//!   all labelled with the engine's `namespace`. Handles are taken when the
//!   engine opens: install the recorder (the exporter) before that.
//! - With neither feature the hit path costs what it did: one relaxed
//!   atomic add per counter, no span, no allocation.
//! - Reporting never fails or delays a call beyond the cost of the
//!   subscriber or recorder the application installed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Reports an event at a level (`error`, `warn`, `info`, `debug`), with
/// `format!` arguments: to `tracing` with that feature, else to `log`.
macro_rules! report {
    ($level:ident, $($arg:tt)+) => {{
        #[cfg(feature = "tracing")]
        ::tracing::$level!($($arg)+);
        #[cfg(not(feature = "tracing"))]
        ::log::$level!($($arg)+);
    }};
}
pub(crate) use report;

/// What an engine has done since it opened; see [`CacheAside::stats`](crate::CacheAside::stats).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Reads answered from the cache (values and cached absences).
    pub hits: u64,
    /// Reads that found no usable entry in the cache.
    pub misses: u64,
    /// Reads that did not touch the cache because the circuit breaker was
    /// open (each went to the source).
    pub bypassed: u64,
    /// Hits that XFetch picked to reload ahead of expiry, and that did.
    pub early_refreshes: u64,
    /// Fills refused because their lease was revoked by a write (or taken
    /// over): each is a stale row that was *not* cached.
    pub fills_dropped: u64,
    /// Loads whose row could not be cached because Redis failed or refused
    /// the claim or the fill (unreachable, out of memory): the row was
    /// returned, not cached.
    pub fills_failed: u64,
    /// Entries that did not decode (or were not the expected type, or not a
    /// string at all); each was treated as a miss and deleted.
    pub corrupt_entries: u64,
    /// Fail-safe copies served because a reload failed or was too slow.
    pub stale_served: u64,
    /// Redis calls that failed because Redis was unavailable.
    pub cache_errors: u64,
    /// Times the circuit breaker opened.
    pub breaker_opened: u64,
    /// Times the circuit breaker closed again.
    pub breaker_closed: u64,
    /// Invalidations that could not reach Redis (each left to the relay, or
    /// reported to the caller when no relay runs).
    pub invalidations_failed: u64,
    /// Invalidations the relay applied from the outbox.
    pub relay_invalidations: u64,
    /// Relay rounds that read the outbox to the end.
    pub relay_rounds: u64,
    /// Relay rounds that failed (Postgres or Redis unreachable); each is
    /// retried.
    pub relay_errors: u64,
    /// Times the relay found itself away longer than the outbox retention
    /// and emptied its namespace.
    pub relay_resets: u64,
    /// Write-behind changes this process enqueued.
    pub write_behind_enqueued: u64,
    /// Write-behind changes this process's workers committed to Postgres:
    /// the newest change of each key in a batch.
    pub write_behind_applied: u64,
    /// Write-behind changes that needed no write of their own: a newer
    /// change of the same key was written in their place, or a synchronous
    /// write superseded them.
    pub write_behind_coalesced: u64,
    /// Write-behind writes put off for a retry: Postgres was unreachable,
    /// or refused the write (which counts towards
    /// [`Config::write_behind_attempts`](crate::Config::write_behind_attempts)).
    pub write_behind_retried: u64,
    /// Write-behind changes this process's workers moved to the dead-letter
    /// stream (unparseable, or refused on every attempt).
    pub write_behind_dead_lettered: u64,
    /// Write-behind changes this process's workers claimed from another
    /// worker (dead, or slower than [`Config::write_behind_claim_after`](crate::Config::write_behind_claim_after)).
    pub write_behind_claimed: u64,
    /// How long the oldest change of the last batch this process's workers
    /// committed had waited, from enqueue to commit, in milliseconds
    /// (Redis's clock at the enqueue against this machine's at the commit).
    pub write_behind_lag_ms: u64,
    /// Reads answered from the near cache (L1) in process memory, with no
    /// network call ([`Config::local_cache`](crate::Config::local_cache)); not counted in `hits`.
    pub local_hits: u64,
    /// Reads that L1, being on, could not answer (not held, expired, or L1
    /// dark because its tracking connection is not confirmed).
    pub local_misses: u64,
    /// L1 entries evicted because Redis said their key changed.
    pub local_invalidations: u64,
    /// Times L1 was emptied because its tracking connection broke or
    /// stopped answering.
    pub local_clears: u64,
    /// Cached entries the inspector compared with their rows
    /// ([`CacheAside::inspect`](crate::CacheAside::inspect)).
    pub inspected: u64,
    /// Stale entries the inspector found (each also a `warn` event).
    pub inspect_stale: u64,
    /// Loads the read replica answered ([`Config::replica_url`](crate::Config::replica_url)).
    pub replica_loads: u64,
    /// Loads the replica could not answer because its key's fence was
    /// closed or above the row it returned (a write it had not replayed):
    /// each read the primary instead.
    pub replica_fenced: u64,
    /// Loads that read the primary because the fence could not be read
    /// (Redis unreachable, the breaker open), the replica was measured as
    /// far behind as a fence lives (or not measured yet), or it failed.
    pub replica_skipped: u64,
}

/// One counter of [`Stats`]: an atomic the engine reads for `stats()`, and
/// with `metrics` the application's counter of the same name.
pub(crate) struct Count {
    n: AtomicU64,
    #[cfg(feature = "metrics")]
    metric: metrics::Counter,
}

impl Count {
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    fn new(name: &'static str, namespace: &str) -> Count {
        Count {
            n: AtomicU64::new(0),
            #[cfg(feature = "metrics")]
            metric: metrics::counter!(
                format!("cacheaside_{name}_total"),
                "namespace" => namespace.to_owned()
            ),
        }
    }

    /// Counts one.
    pub(crate) fn bump(&self) {
        self.add(1);
    }

    /// Counts `n`.
    pub(crate) fn add(&self, n: u64) {
        self.n.fetch_add(n, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        self.metric.increment(n);
    }

    pub(crate) fn get(&self) -> u64 {
        self.n.load(Ordering::Relaxed)
    }
}

/// A [`Stats`] field that is a level, not a count (the last value set);
/// with `metrics`, the application's gauge `cacheaside_<name>`.
pub(crate) struct Level {
    n: AtomicU64,
    #[cfg(feature = "metrics")]
    metric: metrics::Gauge,
}

impl Level {
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    fn new(name: &'static str, namespace: &str) -> Level {
        Level {
            n: AtomicU64::new(0),
            #[cfg(feature = "metrics")]
            metric: metrics::gauge!(
                format!("cacheaside_{name}"),
                "namespace" => namespace.to_owned()
            ),
        }
    }

    pub(crate) fn set(&self, n: u64) {
        self.n.store(n, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        self.metric.set(n as f64);
    }

    pub(crate) fn get(&self) -> u64 {
        self.n.load(Ordering::Relaxed)
    }
}

/// Declares the counters and levels, one per [`Stats`] field, so the two
/// cannot drift apart (a field missing here fails to compile in `stats`).
macro_rules! counters {
    (counts: [$($name:ident),* $(,)?], levels: [$($level:ident),* $(,)?] $(,)?) => {
        /// What an engine has counted, and its histograms.
        pub(crate) struct Counters {
            $(pub(crate) $name: Count,)*
            $(pub(crate) $level: Level,)*
            #[cfg(feature = "metrics")]
            load_time: metrics::Histogram,
            #[cfg(feature = "metrics")]
            lock_wait: metrics::Histogram,
        }

        impl Counters {
            /// Counters for the engine whose keys start with `namespace`.
            pub(crate) fn new(namespace: &str) -> Counters {
                Counters {
                    $($name: Count::new(stringify!($name), namespace),)*
                    $($level: Level::new(stringify!($level), namespace),)*
                    #[cfg(feature = "metrics")]
                    load_time: metrics::histogram!(
                        "cacheaside_load_seconds",
                        "namespace" => namespace.to_owned()
                    ),
                    #[cfg(feature = "metrics")]
                    lock_wait: metrics::histogram!(
                        "cacheaside_lock_wait_seconds",
                        "namespace" => namespace.to_owned()
                    ),
                }
            }

            /// The counts now (read one by one, not as one snapshot).
            pub(crate) fn stats(&self) -> Stats {
                Stats {
                    $($name: self.$name.get(),)*
                    $($level: self.$level.get(),)*
                }
            }
        }
    };
}

counters!(
    counts: [
        hits,
        misses,
        bypassed,
        early_refreshes,
        fills_dropped,
        fills_failed,
        corrupt_entries,
        stale_served,
        cache_errors,
        breaker_opened,
        breaker_closed,
        invalidations_failed,
        relay_invalidations,
        relay_rounds,
        relay_errors,
        relay_resets,
        write_behind_enqueued,
        write_behind_applied,
        write_behind_coalesced,
        write_behind_retried,
        write_behind_dead_lettered,
        write_behind_claimed,
        local_hits,
        local_misses,
        local_invalidations,
        local_clears,
        inspected,
        inspect_stale,
        replica_loads,
        replica_fenced,
        replica_skipped,
    ],
    levels: [write_behind_lag_ms],
);

impl Counters {
    /// A load took `took` (recorded in the current miss span too).
    pub(crate) fn loaded(&self, took: Duration) {
        #[cfg(feature = "metrics")]
        self.load_time.record(took.as_secs_f64());
        #[cfg(feature = "tracing")]
        tracing::Span::current().record("load_ms", took.as_secs_f64() * 1e3);
        #[cfg(not(any(feature = "metrics", feature = "tracing")))]
        let _ = took;
    }

    /// A fill was refused because a write revoked its lease.
    pub(crate) fn fill_dropped(&self, redis_key: &str) {
        self.fills_dropped.bump();
        #[cfg(feature = "tracing")]
        tracing::debug!(
            key = redis_key,
            "fill dropped: a write revoked the lease while the load ran"
        );
        #[cfg(not(feature = "tracing"))]
        log::debug!("fill of {redis_key:?} dropped: a write revoked the lease while the load ran");
    }

    /// A leader waited `waited` for another process's rebuild lock, and
    /// then `then` (took the value it cached, took the lock over, ...).
    pub(crate) fn lock_waited(&self, redis_key: &str, waited: Duration, then: &'static str) {
        #[cfg(feature = "metrics")]
        self.lock_wait.record(waited.as_secs_f64());
        #[cfg(feature = "tracing")]
        tracing::debug!(
            key = redis_key,
            waited_ms = waited.as_secs_f64() * 1e3,
            then,
            "waited for another process's rebuild lock"
        );
        #[cfg(not(feature = "tracing"))]
        log::debug!("waited {waited:?} for the rebuild lock of {redis_key:?}, then {then}");
    }

    /// XFetch refreshed a hit ahead of its expiry.
    pub(crate) fn refreshed_early(&self, key: &str) {
        self.early_refreshes.bump();
        #[cfg(feature = "tracing")]
        tracing::debug!(key, "refreshed ahead of expiry");
        #[cfg(not(feature = "tracing"))]
        log::debug!("{key:?} refreshed ahead of expiry");
    }
}

/// The span of one read that missed: entered on the caller's thread for the
/// whole miss, closed with its outcome.
pub(crate) struct MissSpan {
    #[cfg(feature = "tracing")]
    span: tracing::span::EnteredSpan,
}

impl MissSpan {
    #[cfg_attr(not(feature = "tracing"), allow(unused_variables))]
    pub(crate) fn enter(key: &str, mode: &'static str, bypass: bool) -> MissSpan {
        MissSpan {
            #[cfg(feature = "tracing")]
            span: tracing::info_span!(
                "cacheaside.miss",
                key,
                mode,
                bypass,
                outcome = tracing::field::Empty,
                load_ms = tracing::field::Empty,
            )
            .entered(),
        }
    }

    /// Closes the span with how the read ended: `value`, `absent`, `stale`
    /// (a fail-safe copy) or the error's kind.
    #[cfg_attr(not(feature = "tracing"), allow(unused_variables))]
    pub(crate) fn close(self, outcome: &str) {
        #[cfg(feature = "tracing")]
        self.span.record("outcome", outcome);
    }
}
