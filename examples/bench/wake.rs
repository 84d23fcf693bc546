//! The scheduler's share of a stampede: the time to wake N parked threads
//! until the last of them has run, with no Redis and no Postgres, through
//! the single-flight gate `src/singleflight.rs` used before (parking_lot's
//! condvar) and the one it uses now (a parking_lot RwLock). Once its load is
//! done, a single-flight stampede cannot end sooner than that.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::BoxResult;
use crate::measure::Spread;
use crate::stampede::STAMPEDE_STACK;

/// `parking_lot`'s condvar as a one-shot gate, which `src/singleflight.rs`
/// used before its RwLock gate: `notify_all` requeues the waiters onto the
/// mutex, and each woken thread wakes the next only when it unlocks, one
/// after the other.
#[derive(Default)]
struct CondvarGate(parking_lot::Mutex<bool>, parking_lot::Condvar);

impl CondvarGate {
    /// Parks until the gate opens (30 s at most). `parked` is bumped under
    /// the lock, which the wait releases only once the thread is parked.
    fn wait(&self, parked: &AtomicUsize) {
        let mut open = self.0.lock();
        parked.fetch_add(1, Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !*open && !self.1.wait_until(&mut open, deadline).timed_out() {}
    }

    fn open(&self) -> Instant {
        let at = {
            let mut open = self.0.lock();
            *open = true;
            Instant::now()
        };
        self.1.notify_all();
        at
    }
}

/// The scheduler's share of a stampede's wall time: `n` threads park in
/// `wait`, then `open` (run on this thread) releases them; returns the time
/// until the last of them has run. No Redis, no Postgres: once the load is
/// done, a single-flight stampede cannot end sooner than this.
fn wake_floor(
    n: usize,
    wait: &(dyn Fn(&AtomicUsize) + Sync),
    open: impl FnOnce() -> Instant,
) -> BoxResult<Duration> {
    let parked = AtomicUsize::new(0);
    thread::scope(|s| {
        let mut workers = Vec::with_capacity(n);
        for _ in 0..n {
            let worker = thread::Builder::new()
                .stack_size(STAMPEDE_STACK)
                .spawn_scoped(s, || {
                    wait(&parked);
                    Instant::now()
                });
            match worker {
                Ok(w) => workers.push(w),
                Err(err) => {
                    open();
                    return Err(format!("could not spawn a thread: {err}").into());
                }
            }
        }
        while parked.load(Ordering::Relaxed) < n {
            thread::sleep(Duration::from_millis(1));
        }
        // A waiter is counted just before it parks; give the last ones time.
        thread::sleep(Duration::from_millis(20));
        let start = open();
        let mut last = start;
        for w in workers {
            last = last.max(w.join().expect("wake-floor thread panicked"));
        }
        Ok(last - start)
    })
}

/// [`wake_floor`] with the old and the current single-flight gate, in ms:
/// (parking_lot condvar, parking_lot RwLock held for writing by the opener,
/// which unparks every waiting reader in one pass on unlock).
pub fn wake_floors(n: usize) -> BoxResult<(f64, f64)> {
    let gate = CondvarGate::default();
    let condvar = wake_floor(n, &|parked| gate.wait(parked), || gate.open())?;
    let lock = parking_lot::RwLock::new(());
    let held = lock.write();
    let wait = |parked: &AtomicUsize| {
        parked.fetch_add(1, Ordering::Relaxed);
        drop(lock.try_read_for(Duration::from_secs(30)));
    };
    let rwlock = wake_floor(n, &wait, move || {
        let at = Instant::now();
        drop(held);
        at
    })?;
    Ok((condvar.as_secs_f64() * 1e3, rwlock.as_secs_f64() * 1e3))
}

/// The stampede table's cell of wake floors: the medians across
/// repetitions, condvar / RwLock gate, in ms.
pub fn cell(wake_ms: &[(f64, f64)]) -> String {
    if wake_ms.is_empty() {
        "–".to_owned()
    } else {
        format!(
            "{:.1} / {:.1}",
            Spread::of(wake_ms.iter().map(|w| w.0)).median,
            Spread::of(wake_ms.iter().map(|w| w.1)).median
        )
    }
}

/// The wake floors of every repetition, for report.json.
pub fn json(wake_ms: &[(f64, f64)]) -> Vec<Value> {
    wake_ms
        .iter()
        .map(|(pl, std)| json!({"condvar": pl, "rwlock_gate": std}))
        .collect()
}
