//! Test-only hooks that force the interleavings the lease protocol exists
//! for. Compiled only with the `test-hooks` feature; release builds of
//! applications never contain them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use crate::aside::CacheAside;
use crate::cache::{Cache, Keys};
use crate::error::Result;

type Hook = Arc<dyn Fn(&str) + Send + Sync>;

#[derive(Default)]
pub(crate) struct Hooks {
    before_fill: Mutex<Option<Hook>>,
    leases_disabled: AtomicBool,
}

impl Hooks {
    /// Runs the before-fill hook; with leases disabled, also stores the entry
    /// unconditionally (the naive pattern) and returns the verdict.
    pub(crate) fn before_fill(&self, key: &str, cache: &Cache, keys: &Keys, raw: &[u8], ttl: Duration) -> Option<Result<bool>> {
        let hook = self.before_fill.lock().clone();
        if let Some(hook) = hook {
            hook(key);
        }
        if self.leases_disabled.load(Ordering::SeqCst) {
            return Some(cache.set_raw(&keys.value, raw, ttl).map(|()| true));
        }
        None
    }
}

impl CacheAside {
    /// Test hook: `hook(key)` runs after every load and before its fill, on
    /// the loading thread (block in it to force an interleaving).
    pub fn set_before_fill_hook(&self, hook: impl Fn(&str) + Send + Sync + 'static) {
        *self.hooks().before_fill.lock() = Some(Arc::new(hook));
    }

    /// Test hook: removes the before-fill hook.
    pub fn clear_before_fill_hook(&self) {
        *self.hooks().before_fill.lock() = None;
    }

    /// Test hook: `false` makes fills skip the lease check (plain `SET`), to
    /// show what the leases prevent.
    pub fn set_leases_enabled(&self, enabled: bool) {
        self.hooks().leases_disabled.store(!enabled, Ordering::SeqCst);
    }
}
