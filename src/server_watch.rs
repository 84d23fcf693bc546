//! Which Redis server process the connections reach, and the moment that
//! changes: a restart (perhaps from an older snapshot) or a failover (to a
//! replica that may lag). Either can lose writes Redis had acknowledged,
//! invalidations among them, so what the cache held before is not to be
//! trusted until the relay has re-applied the outbox.
//!
//! Guarantees:
//! - Every new connection to a single server (or through Sentinel) asks the
//!   server its `run_id` before it is handed out; a `run_id` other than the
//!   last one seen runs every registered callback (the engines' breakers
//!   trip), and only then moves the generation on. So no command runs on a
//!   connection to the new server before the callbacks have run, and a
//!   reader that notes the generation before it takes its breaker permit
//!   and again after its command either saw the breaker tripped or sees the
//!   generation moved.
//! - The first server a process meets is not a change (nothing was cached
//!   through this process before it).
//!
//! A cluster's connections reach many nodes, opened inside the cluster
//! client: they are not watched (see docs/cluster.md).

use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use redis::Connection;

/// What runs when the server changes.
type Callback = Box<dyn Fn() + Send + Sync>;

/// Shared by a cache's connector and the engines built on that cache.
#[derive(Default)]
pub(crate) struct ServerWatch {
    /// The last `run_id` a new connection reported. Guarded by its mutex,
    /// held only to compare and set (never across I/O).
    run_id: Mutex<Option<String>>,
    /// How many times the server changed since this watch began.
    generation: AtomicU64,
    /// Run, in order, on every change, before the generation moves.
    callbacks: Mutex<Vec<Callback>>,
}

impl ServerWatch {
    /// How many server changes this process has seen.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Runs `callback` on every later change of server.
    pub(crate) fn on_change(&self, callback: Callback) {
        self.callbacks.lock().push(callback);
    }

    /// Asks a new connection which server process it reached, before
    /// anyone uses it. A server that does not say (an `INFO` an ACL
    /// refuses, a proxy) is taken as unchanged.
    pub(crate) fn observe(&self, conn: &mut Connection) {
        let info: redis::RedisResult<String> = redis::cmd("INFO").arg("server").query(conn);
        if let Some(id) = info.ok().as_deref().and_then(run_id) {
            self.seen(id);
        }
    }

    /// Records `id` as the server's; runs the callbacks if it differs from
    /// the last one.
    fn seen(&self, id: &str) {
        let changed = {
            let mut last = self.run_id.lock();
            let changed = last.as_deref().is_some_and(|last| last != id);
            if last.as_deref() != Some(id) {
                *last = Some(id.to_owned());
            }
            changed
        };
        if changed {
            for callback in self.callbacks.lock().iter() {
                callback();
            }
            self.generation.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// The `run_id` line of an `INFO server` reply.
fn run_id(info: &str) -> Option<&str> {
    info.lines()
        .find_map(|line| line.strip_prefix("run_id:"))
        .map(str::trim)
        .filter(|id| !id.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_new_run_id_trips_the_callbacks_before_the_generation_moves() {
        let watch = Arc::new(ServerWatch::default());
        let seen_at = Arc::new(AtomicU64::new(u64::MAX));
        let (w, s) = (Arc::downgrade(&watch), Arc::clone(&seen_at));
        watch.on_change(Box::new(move || {
            let generation = w.upgrade().map_or(0, |w| w.generation());
            s.store(generation, Ordering::SeqCst);
        }));
        watch.seen("a");
        assert_eq!(watch.generation(), 0, "the first server is no change");
        watch.seen("a");
        assert_eq!(watch.generation(), 0);
        watch.seen("b");
        assert_eq!(watch.generation(), 1);
        assert_eq!(seen_at.load(Ordering::SeqCst), 0, "callback ran first");
    }

    #[test]
    fn run_ids_are_read_from_info() {
        let info = "# Server\r\nredis_version:7.0.15\r\nrun_id:abc123\r\ntcp_port:6379\r\n";
        assert_eq!(run_id(info), Some("abc123"));
        assert_eq!(run_id("# Server\r\n"), None);
    }
}
