//! The circuit breaker in front of Redis.
//!
//! Guarantees:
//! - After `failures` consecutive cache failures the breaker opens, and reads
//!   stop touching Redis: they cost one Postgres round trip, not a cache
//!   timeout each. (A write still tries its invalidation: skipping it is
//!   never safe.)
//! - After `cool_off`, exactly one caller probes Redis; the others keep
//!   bypassing it. A failed probe opens the breaker for another cool-off.
//! - A probe that succeeds does not close the breaker by itself when the
//!   invalidation relay runs: writes made during the outage may have left
//!   stale entries behind (their invalidation could not reach Redis), so the
//!   breaker waits in `Recovering` until the relay has applied every change
//!   committed before recovery began, and only then closes. Without a relay
//!   it closes at once. "The relay runs" is decided when the probe succeeds,
//!   not when the engine opens: an engine whose relay was never started, or
//!   was stopped, would otherwise wait for ever (and a relay that stops
//!   while the breaker recovers closes it, having no round left to wait
//!   for).
//! - Every transition is counted (in the engine's [`Counters`]) and
//!   reported ([`crate::observe`]).
//!
//! A closed breaker costs a hit one relaxed atomic load.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::error::Error;
use crate::observe::{Counters, report};

const CLOSED: u8 = 0;
const NOT_CLOSED: u8 = 1;

/// What a caller may do with Redis now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Permit {
    /// Use Redis.
    Use,
    /// Use Redis: this call is the probe after a cool-off.
    Probe,
    /// Do not touch Redis.
    Bypass,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One caller is probing.
    Probing,
    /// The probe succeeded; waiting for the relay to catch up. `ticket`
    /// names this recovery, so a relay round that began before a later
    /// re-opening cannot close it.
    Recovering {
        ticket: u64,
    },
}

pub(crate) struct Breaker {
    /// `CLOSED` exactly when `state` is `Closed { failures: 0 }`: the fast
    /// path of every call reads only this.
    fast: AtomicU8,
    /// Guarded by its mutex; held only for bookkeeping, never across I/O.
    state: Mutex<State>,
    failures_to_open: u32,
    cool_off: Duration,
    /// A relay runs for this engine now (set by whoever starts and stops
    /// it): a successful probe then waits for one of its rounds.
    relay_runs: AtomicBool,
    tickets: AtomicU64,
    /// Where transitions are counted.
    counters: Arc<Counters>,
}

impl Breaker {
    /// `failures_to_open == 0` turns the breaker off (it never opens).
    pub fn new(failures_to_open: u32, cool_off: Duration, counters: Arc<Counters>) -> Self {
        Breaker {
            fast: AtomicU8::new(CLOSED),
            state: Mutex::new(State::Closed { failures: 0 }),
            failures_to_open,
            cool_off,
            relay_runs: AtomicBool::new(false),
            tickets: AtomicU64::new(0),
            counters,
        }
    }

    /// May this call use Redis?
    pub fn permit(&self) -> Permit {
        if self.fast.load(Ordering::Relaxed) == CLOSED {
            return Permit::Use;
        }
        let mut state = self.state.lock();
        match *state {
            State::Closed { .. } => Permit::Use,
            State::Open { until } if Instant::now() >= until => {
                *state = State::Probing;
                Permit::Probe
            }
            State::Open { .. } | State::Probing | State::Recovering { .. } => Permit::Bypass,
        }
    }

    /// True while reads must not use Redis.
    pub fn is_open(&self) -> bool {
        self.fast.load(Ordering::Relaxed) != CLOSED
            && !matches!(*self.state.lock(), State::Closed { .. })
    }

    /// A Redis call of a caller with `permit` succeeded.
    pub fn succeeded(&self, permit: Permit) {
        if permit == Permit::Use && self.fast.load(Ordering::Relaxed) == CLOSED {
            return;
        }
        let mut state = self.state.lock();
        match *state {
            State::Closed { .. } => self.close(&mut state, false),
            State::Probing if permit == Permit::Probe => {
                if self.relay_runs.load(Ordering::SeqCst) {
                    let ticket = self.tickets.fetch_add(1, Ordering::SeqCst) + 1;
                    report!(
                        info,
                        "cache circuit breaker: Redis answers again; waiting for the invalidation relay to catch up"
                    );
                    *state = State::Recovering { ticket };
                } else {
                    self.close(&mut state, true);
                }
            }
            _ => {}
        }
    }

    /// A Redis call failed with `err` (a connection failure or a timeout:
    /// what says Redis itself is unwell, not a bad command).
    pub fn failed(&self, permit: Permit, err: &Error) {
        if self.failures_to_open == 0 {
            return;
        }
        let mut state = self.state.lock();
        match *state {
            State::Closed { failures } => {
                let failures = failures + 1;
                if failures >= self.failures_to_open {
                    self.open(
                        &mut state,
                        &format!("{failures} consecutive failures, the last: {}", err.chain()),
                    );
                } else {
                    *state = State::Closed { failures };
                    self.fast.store(NOT_CLOSED, Ordering::Relaxed);
                }
            }
            State::Probing if permit == Permit::Probe => {
                self.open(&mut state, &format!("the probe failed: {}", err.chain()));
            }
            _ => {}
        }
    }

    /// Opens the breaker now, whatever its state: an invalidation could not
    /// reach Redis, so this process must not read a cached entry it may have
    /// left stale until the relay has applied the change.
    pub fn trip(&self, err: &Error) {
        self.trip_because(&format!("an invalidation failed: {}", err.chain()));
    }

    /// Opens the breaker now, whatever its state, for `why`: what Redis
    /// holds may be stale (see [`trip`](Self::trip)).
    pub fn trip_because(&self, why: &str) {
        if self.failures_to_open == 0 {
            return;
        }
        let mut state = self.state.lock();
        self.open(&mut state, why);
    }

    /// The recovery a relay round must complete to close the breaker, if the
    /// breaker is waiting for one. Take it before the round reads the outbox.
    pub fn recovery_ticket(&self) -> Option<u64> {
        match *self.state.lock() {
            State::Recovering { ticket } => Some(ticket),
            _ => None,
        }
    }

    /// A relay started (`true`) or stopped (`false`) for this engine. A
    /// stopped relay will complete no recovery: a breaker waiting for one
    /// closes (as it would have, had no relay run when the probe succeeded).
    pub fn set_relay_running(&self, running: bool) {
        let mut state = self.state.lock();
        self.relay_runs.store(running, Ordering::SeqCst);
        if !running && matches!(*state, State::Recovering { .. }) {
            self.close(&mut state, true);
        }
    }

    /// The relay applied every change committed before it took `ticket`.
    pub fn relay_caught_up(&self, ticket: u64) {
        let mut state = self.state.lock();
        if *state == (State::Recovering { ticket }) {
            self.close(&mut state, true);
        }
    }

    /// Opens for a cool-off. Counted (and logged as a warning) only when it
    /// was closed: a failed probe re-opens an open breaker.
    fn open(&self, state: &mut State, why: &str) {
        let was_closed = matches!(*state, State::Closed { .. });
        *state = State::Open {
            until: Instant::now() + self.cool_off,
        };
        self.fast.store(NOT_CLOSED, Ordering::Relaxed);
        if was_closed {
            self.counters.breaker_opened.bump();
            report!(
                warn,
                "cache circuit breaker opened ({why}): reads go to Postgres"
            );
        } else {
            report!(debug, "cache circuit breaker stays open ({why})");
        }
    }

    fn close(&self, state: &mut State, was_open: bool) {
        *state = State::Closed { failures: 0 };
        self.fast.store(CLOSED, Ordering::Relaxed);
        if was_open {
            self.counters.breaker_closed.bump();
            report!(info, "cache circuit breaker closed: reads use Redis again");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    fn boom() -> Error {
        Error::new(ErrorKind::Cache, "connection refused")
    }

    fn cool_off_passes(b: &Breaker) {
        let mut state = b.state.lock();
        if let State::Open { .. } = *state {
            *state = State::Open {
                until: Instant::now(),
            };
        }
    }

    #[test]
    fn opens_after_consecutive_failures_and_one_caller_probes() {
        let b = Breaker::new(3, Duration::from_secs(60), Arc::new(Counters::new("t")));
        b.failed(Permit::Use, &boom());
        b.failed(Permit::Use, &boom());
        b.succeeded(Permit::Use); // not consecutive any more
        b.failed(Permit::Use, &boom());
        b.failed(Permit::Use, &boom());
        assert_eq!(b.permit(), Permit::Use);
        b.failed(Permit::Use, &boom());
        assert_eq!(b.permit(), Permit::Bypass);
        assert_eq!(b.counters.breaker_opened.get(), 1);
        cool_off_passes(&b);
        assert_eq!(b.permit(), Permit::Probe);
        assert_eq!(b.permit(), Permit::Bypass, "one probe at a time");
        b.failed(Permit::Probe, &boom());
        assert_eq!(b.permit(), Permit::Bypass, "a failed probe reopens");
        cool_off_passes(&b);
        assert_eq!(b.permit(), Permit::Probe);
        b.succeeded(Permit::Probe);
        assert_eq!(b.permit(), Permit::Use);
        assert_eq!(b.counters.breaker_opened.get(), 1);
        assert_eq!(b.counters.breaker_closed.get(), 1);
    }

    #[test]
    fn with_a_relay_it_closes_only_after_a_round_that_began_in_recovery() {
        let b = Breaker::new(1, Duration::from_secs(60), Arc::new(Counters::new("t")));
        b.set_relay_running(true);
        b.trip(&boom());
        cool_off_passes(&b);
        assert_eq!(b.permit(), Permit::Probe);
        assert_eq!(b.recovery_ticket(), None, "no ticket before the probe");
        b.succeeded(Permit::Probe);
        assert_eq!(b.permit(), Permit::Bypass, "still recovering");
        let ticket = b.recovery_ticket().expect("recovering");
        // Reopened and recovered again: the old round's ticket is void.
        b.trip(&boom());
        cool_off_passes(&b);
        assert_eq!(b.permit(), Permit::Probe);
        b.succeeded(Permit::Probe);
        b.relay_caught_up(ticket);
        assert_eq!(b.permit(), Permit::Bypass);
        let ticket = b.recovery_ticket().expect("recovering");
        b.relay_caught_up(ticket);
        assert_eq!(b.permit(), Permit::Use);
    }

    #[test]
    fn a_relay_that_stops_while_the_breaker_recovers_closes_it() {
        let b = Breaker::new(1, Duration::from_secs(60), Arc::new(Counters::new("t")));
        b.set_relay_running(true);
        b.trip(&boom());
        cool_off_passes(&b);
        assert_eq!(b.permit(), Permit::Probe);
        b.succeeded(Permit::Probe);
        assert_eq!(b.permit(), Permit::Bypass, "recovering: waits for a round");
        b.set_relay_running(false);
        assert_eq!(b.permit(), Permit::Use, "no round will come: closed");
    }

    #[test]
    fn zero_failures_turns_it_off() {
        let b = Breaker::new(0, Duration::from_secs(60), Arc::new(Counters::new("t")));
        for _ in 0..10 {
            b.failed(Permit::Use, &boom());
        }
        b.trip(&boom());
        assert_eq!(b.permit(), Permit::Use);
    }
}
