//! Test-only hooks that force the interleavings the lease protocol exists
//! for. Compiled only with the `test-hooks` feature; release builds of
//! applications never contain them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use parking_lot::Mutex;

type Hook = Arc<dyn Fn(&str) + Send + Sync>;

/// Runs the hook set in `slot`, if any, outside the slot's lock (a hook
/// may block, or set another hook).
fn fire(slot: &Mutex<Option<Hook>>, key: &str) {
    let hook = slot.lock().clone();
    if let Some(hook) = hook {
        hook(key);
    }
}

/// The test hooks of one engine: [`CacheAside::hooks`](crate::CacheAside::hooks).
#[derive(Default)]
pub struct Hooks {
    after_load: Mutex<Option<Hook>>,
    after_write: Mutex<Option<Hook>>,
    after_write_behind_commit: Mutex<Option<Hook>>,
    before_local_fill: Mutex<Option<Hook>>,
    before_tracking: Mutex<Option<Hook>>,
    leases_disabled: AtomicBool,
    lost_replies: AtomicU32,
    lost_fill_replies: AtomicU32,
}

impl Hooks {
    /// Test hook: `hook(key)` runs on the reading thread once it has its
    /// answer and before anyone else sees it: right after a load returns
    /// (before the single-flight closes and before the fill), and when a
    /// single-flight leader finds the value already cached (there `key` is
    /// the full Redis key). Block in it to force an interleaving; sleep in
    /// it for a slow read path.
    pub fn set_after_load(&self, hook: impl Fn(&str) + Send + Sync + 'static) {
        *self.after_load.lock() = Some(Arc::new(hook));
    }

    /// Test hook: `hook(key)` runs after a write has committed and before
    /// it invalidates `key` ([`Client`](crate::Client) updates) or writes it
    /// through (every write-through), e.g. to kill the process there, or to
    /// let the relay go first.
    pub fn set_after_write(&self, hook: impl Fn(&str) + Send + Sync + 'static) {
        *self.after_write.lock() = Some(Arc::new(hook));
    }

    /// Test hook: `hook(key)` runs on a write-behind worker thread after the
    /// transaction that wrote `key`'s change has committed and before the
    /// change is acknowledged (e.g. to kill the process there).
    pub fn set_after_write_behind_commit(&self, hook: impl Fn(&str) + Send + Sync + 'static) {
        *self.after_write_behind_commit.lock() = Some(Arc::new(hook));
    }

    /// Test hook: `hook(key)` runs on a reading thread after its Redis `GET`
    /// hit and before it puts the value into the near cache (L1). Block in
    /// it and write the key meanwhile to force the in-flight-invalidation
    /// race.
    pub fn set_before_local_fill(&self, hook: impl Fn(&str) + Send + Sync + 'static) {
        *self.before_local_fill.lock() = Some(Arc::new(hook));
    }

    /// Test hook: `hook("")` runs on the near cache's tracker thread after
    /// it connected and before it turns tracking on (each session). Block
    /// in it to keep L1 dark while reads go to Redis.
    pub fn set_before_tracking(&self, hook: impl Fn(&str) + Send + Sync + 'static) {
        *self.before_tracking.lock() = Some(Arc::new(hook));
    }

    /// Test hook: removes the before-tracking hook.
    pub fn clear_before_tracking(&self) {
        *self.before_tracking.lock() = None;
    }

    /// Test hook: removes the before-local-fill hook.
    pub fn clear_before_local_fill(&self) {
        *self.before_local_fill.lock() = None;
    }

    /// Test hook: the replies of the next `n` lease and lock claims are lost
    /// after the claim ran on the server: the caller sees a timeout, and
    /// whatever the claim took is an orphan.
    pub fn lose_claim_replies(&self, n: u32) {
        self.lost_replies.store(n, Ordering::SeqCst);
    }

    /// Test hook: the replies of the next `n` fills are lost after the fill
    /// ran on the server: the filler sees a timeout.
    pub fn lose_fill_replies(&self, n: u32) {
        self.lost_fill_replies.store(n, Ordering::SeqCst);
    }

    /// Test hook: removes the after-load hook.
    pub fn clear_after_load(&self) {
        *self.after_load.lock() = None;
    }

    /// Test hook: `false` makes fills skip the lease check (a plain `SET`, the
    /// naive pattern), to show what the leases prevent.
    pub fn set_leases_enabled(&self, enabled: bool) {
        self.leases_disabled.store(!enabled, Ordering::SeqCst);
    }

    pub(crate) fn after_load(&self, key: &str) {
        fire(&self.after_load, key);
    }

    pub(crate) fn after_write(&self, key: &str) {
        fire(&self.after_write, key);
    }

    pub(crate) fn after_write_behind_commit(&self, key: &str) {
        fire(&self.after_write_behind_commit, key);
    }

    pub(crate) fn before_tracking(&self, key: &str) {
        fire(&self.before_tracking, key);
    }

    pub(crate) fn before_local_fill(&self, key: &str) {
        fire(&self.before_local_fill, key);
    }

    /// A reply to lose, if one is due: the claim ran on the server, and the
    /// client sees a timeout.
    pub(crate) fn lose_reply(&self) -> Option<crate::Error> {
        let due = self
            .lost_replies
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        due.then(|| crate::Error::timeout("cache command (a reply lost by a test hook)").outage())
    }

    /// A fill reply to lose, if one is due (see [`Hooks::lose_fill_replies`]).
    pub(crate) fn lose_fill_reply(&self) -> Option<crate::Error> {
        let due = self
            .lost_fill_replies
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        due.then(|| crate::Error::timeout("cache command (a reply lost by a test hook)").outage())
    }

    pub(crate) fn leases_disabled(&self) -> bool {
        self.leases_disabled.load(Ordering::SeqCst)
    }
}
