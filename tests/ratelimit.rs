//! The sliding-window rate limiter against the real Redis: exact across
//! processes (the test binary re-runs itself as child processes, see
//! `child_process_entry_point`), rejected requests do not extend a lockout,
//! `retry_after` tells the truth, and every request counts even when two
//! share a microsecond.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use cacheaside::{Client, Config, ErrorKind, RateLimitDecision, RateLimiter};
use common::Fixture;

const ROLE: &str = "CACHEASIDE_TEST_CHILD";
const NAMESPACE: &str = "CACHEASIDE_TEST_NAMESPACE";
const SUBJECT: &str = "api-key:hammered";
const PROCESSES: usize = 4;
const THREADS_PER_CHILD: usize = 8;
const LIMIT: u32 = 100;
const WINDOW: Duration = Duration::from_secs(1);
const RUN: Duration = Duration::from_secs(3);

/// One request as a child saw it.
#[derive(Clone, Copy, Debug)]
struct Record {
    server_time_us: u64,
    allowed: bool,
    retry_after_ms: u64,
}

/// Not a test of its own: when the parent runs this binary as a child, this
/// is the child's `main`. Ignored in a normal run; the parent runs it with
/// `--ignored`.
#[test]
#[ignore = "the child process of the cross-process rate-limit test, run by it"]
fn child_process_entry_point() {
    let role = std::env::var(ROLE).expect("run by the rate-limit test, which sets the role");
    assert_eq!(role, "hammer", "unknown child role {role}");
    let mut config = Config::from_env();
    config.namespace = std::env::var(NAMESPACE).unwrap();
    config.db_pool_size = 1;
    let client = Client::open(&config).unwrap();
    let limiter = RateLimiter::new(client.cache(), LIMIT, WINDOW).unwrap();
    let barrier = Barrier::new(THREADS_PER_CHILD + 1);
    let records = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..THREADS_PER_CHILD {
            s.spawn(|| {
                barrier.wait();
                let started = Instant::now();
                let mut mine = Vec::new();
                while started.elapsed() < RUN {
                    let d = limiter.check(SUBJECT).unwrap();
                    mine.push(Record {
                        server_time_us: d.server_time_us,
                        allowed: d.allowed,
                        retry_after_ms: d.retry_after.as_millis() as u64,
                    });
                    // Still about 30 times the limit from 32 threads, and it
                    // leaves Redis some room for other tests.
                    std::thread::sleep(Duration::from_millis(1));
                }
                records.lock().unwrap().extend(mine);
            });
        }
        println!("CHILD ready");
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).unwrap();
        barrier.wait();
    });
    let records = records.into_inner().unwrap();
    let mut out = std::io::stdout().lock();
    for r in &records {
        writeln!(
            out,
            "CHILD record {} {} {}",
            r.server_time_us, r.allowed as u8, r.retry_after_ms
        )
        .unwrap();
    }
    writeln!(out, "CHILD done {}", records.len()).unwrap();
}

fn spawn_child(config: &Config) -> (Child, BufReader<ChildStdout>) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_process_entry_point",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE, "hammer")
        .env(NAMESPACE, &config.namespace)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    (child, stdout)
}

/// Reads the child's lines until `marker` (which may follow libtest's
/// `test name ... ` on the same line), passing each record line to `record`.
fn read_until(out: &mut BufReader<ChildStdout>, marker: &str, mut record: impl FnMut(Record)) {
    let mut line = String::new();
    loop {
        line.clear();
        let read = out.read_line(&mut line).unwrap();
        assert!(read > 0, "child exited before {marker:?}");
        if let Some(at) = line.find("CHILD record ") {
            let f: Vec<u64> = line[at + 13..]
                .split_whitespace()
                .map(|n| n.parse().unwrap())
                .collect();
            record(Record {
                server_time_us: f[0],
                allowed: f[1] == 1,
                retry_after_ms: f[2],
            });
        } else if line.contains(marker) {
            return;
        }
    }
}

/// How many of the sorted `times` lie in `[from, to)`.
fn count_in(times: &[u64], from: u64, to: u64) -> usize {
    times.partition_point(|&t| t < to) - times.partition_point(|&t| t < from)
}

#[test]
fn four_processes_never_exceed_the_limit_in_any_window() {
    let fx = Fixture::new("rl_hammer");
    let mut children: Vec<_> = (0..PROCESSES).map(|_| spawn_child(&fx.config)).collect();
    for (_, out) in &mut children {
        read_until(out, "CHILD ready", |_| {});
    }
    for (child, _) in &mut children {
        child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    }
    let mut records = Vec::new();
    for (mut child, mut out) in children {
        read_until(&mut out, "CHILD done", |r| records.push(r));
        assert!(child.wait().unwrap().success());
    }
    records.sort_by_key(|r| r.server_time_us);
    let allowed: Vec<u64> = records
        .iter()
        .filter(|r| r.allowed)
        .map(|r| r.server_time_us)
        .collect();
    let window_us = WINDOW.as_micros() as u64;
    let limit = LIMIT as usize;
    let first = records.first().unwrap().server_time_us;
    let last = records.last().unwrap().server_time_us;
    let rejected = records.len() - allowed.len();
    eprintln!(
        "{} requests in {:.2} s: {} allowed, {rejected} rejected",
        records.len(),
        (last - first) as f64 / 1e6,
        allowed.len()
    );
    assert!(
        rejected > records.len() / 2,
        "demand must exceed the limit for this test to mean anything"
    );

    // At most LIMIT in any window: every window [t, t + W) starting at an
    // allowed request (the windows that can hold the most).
    for &t in &allowed {
        let n = count_in(&allowed, t, t + window_us);
        assert!(n <= limit, "{n} allowed in the window from {t}");
    }

    // Exact: replaying the requests in server-time order through an ideal
    // sliding window (allow iff fewer than LIMIT allowed in (t - W, t])
    // gives every decision the limiter made. So no request was refused
    // while a slot was free, and none was let through when the window was
    // full, whatever the scheduling. (Within one microsecond the allowed
    // requests went first: the count cannot drop within a microsecond.)
    let mut replay: Vec<&Record> = records.iter().collect();
    replay.sort_by_key(|r| (r.server_time_us, !r.allowed));
    let mut admitted: Vec<u64> = Vec::with_capacity(allowed.len());
    for r in &replay {
        let t = r.server_time_us;
        let in_window = count_in(&admitted, t + 1 - window_us, t + 1);
        assert_eq!(
            r.allowed,
            in_window < limit,
            "at {t} the window held {in_window}, yet the request was {}",
            if r.allowed { "allowed" } else { "rejected" }
        );
        if r.allowed {
            admitted.push(t);
        }
    }

    // retry_after is never 0, never more than the window, and never too
    // short: no request was allowed before it had passed.
    for r in records.iter().filter(|r| !r.allowed) {
        let t = r.server_time_us;
        assert!(
            (1..=WINDOW.as_millis() as u64).contains(&r.retry_after_ms),
            "retry_after {} ms at {t}",
            r.retry_after_ms
        );
        let too_early = count_in(&allowed, t + 1, t + 1 + (r.retry_after_ms - 1) * 1000);
        assert_eq!(
            too_early, 0,
            "allowed before retry_after ({} ms) from {t} passed",
            r.retry_after_ms
        );
    }

    // While demand exceeds the limit, the limit is used: each whole window
    // of the run, back to back from its first request, let through at
    // least LIMIT - 1. (A window anchored just anywhere can hold a few
    // less, and rightly: the slots of the first burst free again a second
    // later as fast as they were taken, so for a few milliseconds slots
    // free about as fast as requests arrive, and one that is free when the
    // window ends is no fault; the replay above shows none was refused.)
    let mut windows = 0;
    let mut from = first;
    while from + window_us <= last {
        let n = count_in(&allowed, from, from + window_us);
        assert!(
            (limit - 1..=limit).contains(&n),
            "{n} allowed in the window from {from}"
        );
        windows += 1;
        from += window_us;
    }
    assert!(windows >= 2, "the run holds whole windows");
}

#[test]
fn rejected_requests_do_not_extend_the_lockout() {
    let fx = Fixture::new("rl_retry");
    let window = Duration::from_millis(400);
    let limiter = RateLimiter::new(fx.client.cache(), 5, window).unwrap();
    let subject = "user:retrying";
    let mut decisions: Vec<RateLimitDecision> = Vec::new();
    for _ in 0..5 {
        let d = limiter.check(subject).unwrap();
        assert!(d.allowed);
        decisions.push(d);
    }
    let window_us = window.as_micros() as u64;
    let first = decisions[0].server_time_us;
    // The client retries every 5 ms. The article's limiter records each
    // attempt, so it would stay locked out for as long as it retries; ours
    // lets the first attempt after the first request left the window through.
    let deadline = Instant::now() + Duration::from_secs(10);
    let reopened = loop {
        let d = limiter.check(subject).unwrap();
        if d.allowed {
            break d;
        }
        assert!(
            d.server_time_us < first + window_us,
            "rejected after the window slid: {d:?}"
        );
        assert!(!d.retry_after.is_zero() && d.retry_after <= window, "{d:?}");
        assert!(Instant::now() < deadline, "locked out for good");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(
        reopened.server_time_us >= first + window_us,
        "allowed before the window slid: {reopened:?}"
    );
    eprintln!(
        "allowed again {} us after the first request (window {} us)",
        reopened.server_time_us - first,
        window_us
    );
}

#[test]
fn waiting_retry_after_is_enough() {
    let fx = Fixture::new("rl_wait");
    let window = Duration::from_millis(300);
    let limiter = RateLimiter::new(fx.client.cache(), 3, window).unwrap();
    let subject = "user:patient";
    for i in 0..3 {
        let d = limiter.check(subject).unwrap();
        assert!(d.allowed);
        assert_eq!(d.remaining, 2 - i);
        // The call that takes the last slot already says when the next one
        // frees; the others have slots left.
        assert_eq!(d.retry_after.is_zero(), i < 2, "{d:?}");
    }
    for _ in 0..3 {
        // Fill the window again (on a slow machine part of it may have slid
        // by since the last round), up to the first refusal.
        let d = (0..100)
            .map(|_| limiter.check(subject).unwrap())
            .find(|d| !d.allowed)
            .expect("a full window refuses");
        assert_eq!(d.remaining, 0);
        assert!(!d.retry_after.is_zero() && d.retry_after <= window, "{d:?}");
        std::thread::sleep(d.retry_after);
        let again = limiter.check(subject).unwrap();
        assert!(
            again.allowed,
            "waited {:?} and was still refused: {again:?}",
            d.retry_after
        );
    }
}

#[test]
fn key_layout_and_expiry() {
    let fx = Fixture::new("rl_key");
    let decision = fx
        .client
        .rate_limit("user:42", 10, Duration::from_secs(2))
        .unwrap();
    assert!(decision.allowed);
    assert_eq!(decision.remaining, 9);
    let key = format!("{}{{rate_limit:10/2000ms:user:42}}", fx.config.namespace);
    assert_eq!(
        fx.client.cache().redis_key("rate_limit:10/2000ms:user:42"),
        key
    );
    let (members, pttl): (u64, i64) = fx
        .client
        .cache()
        .with_connection(|c| {
            redis::pipe()
                .cmd("ZCARD")
                .arg(&key)
                .cmd("PTTL")
                .arg(&key)
                .query(c)
        })
        .unwrap();
    assert_eq!(members, 1);
    assert!(pttl > 0 && pttl <= 2000, "{pttl}");
}

#[test]
fn a_limit_is_not_reset_by_another_limit_on_the_same_subject() {
    let fx = Fixture::new("rl_mixed");
    let login = RateLimiter::new(fx.client.cache(), 2, Duration::from_secs(60)).unwrap();
    let api = RateLimiter::new(fx.client.cache(), 100, Duration::from_millis(1)).unwrap();
    assert!(login.check("ip:203.0.113.9").unwrap().allowed);
    assert!(login.check("ip:203.0.113.9").unwrap().allowed);
    assert!(!login.check("ip:203.0.113.9").unwrap().allowed);
    // Another limit on the same subject, once the login requests are older
    // than its 1 ms window: it must not trim the 60 s window's entries, nor
    // shorten its key's life.
    std::thread::sleep(Duration::from_millis(5));
    assert!(api.check("ip:203.0.113.9").unwrap().allowed);
    let after = login.check("ip:203.0.113.9").unwrap();
    assert!(!after.allowed, "the 2-per-60 s limit was reset: {after:?}");
    assert_eq!(after.remaining, 0);
    assert!(after.retry_after > Duration::from_secs(50), "{after:?}");
}

#[cfg(feature = "test-hooks")]
#[test]
fn two_requests_in_the_same_microsecond_both_count() {
    let fx = Fixture::new("rl_same_us");
    let limiter = RateLimiter::new(fx.client.cache(), 2, Duration::from_secs(10)).unwrap();
    let (secs, micros): (u64, u64) = fx
        .client
        .cache()
        .with_connection(|c| redis::cmd("TIME").query(c))
        .unwrap();
    let now = secs * 1_000_000 + micros;
    let a = limiter.check_at("same-us", now).unwrap();
    let b = limiter.check_at("same-us", now).unwrap();
    let c = limiter.check_at("same-us", now).unwrap();
    assert_eq!((a.allowed, a.remaining), (true, 1));
    // The article's limiter uses the time as the member: this second request
    // would overwrite the first and the count would stay at 1.
    assert_eq!((b.allowed, b.remaining), (true, 0));
    assert_eq!((c.allowed, c.remaining), (false, 0));
    assert_eq!(c.retry_after, Duration::from_secs(10));
    let key = fx.client.cache().redis_key("rate_limit:2/10000ms:same-us");
    let members: u64 = fx
        .client
        .cache()
        .with_connection(|conn| redis::cmd("ZCARD").arg(&key).query(conn))
        .unwrap();
    assert_eq!(members, 2);
}

/// `Cache` runs a script again when its connection drops after the server
/// ran it: the request must still count once.
#[cfg(feature = "test-hooks")]
#[test]
fn a_retried_check_counts_its_request_once() {
    let fx = Fixture::new("rl_retry");
    let limiter = RateLimiter::new(fx.client.cache(), 3, Duration::from_secs(60)).unwrap();
    let first = limiter.check_retried("retried").unwrap();
    assert_eq!((first.allowed, first.remaining), (true, 2));
    let key = fx.client.cache().redis_key("rate_limit:3/60000ms:retried");
    let members: u64 = fx
        .client
        .cache()
        .with_connection(|conn| redis::cmd("ZCARD").arg(&key).query(conn))
        .unwrap();
    assert_eq!(members, 1, "one request, one entry");
    let second = limiter.check("retried").unwrap();
    assert_eq!((second.allowed, second.remaining), (true, 1));
}

#[test]
fn bad_arguments_are_invalid() {
    let fx = Fixture::new("rl_bad");
    let cache = fx.client.cache();
    let invalid = |result: cacheaside::Result<_>| {
        let err = result.map(|_: RateLimiter| ()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err:?}");
    };
    invalid(RateLimiter::new(cache, 0, WINDOW));
    invalid(RateLimiter::new(cache, 1, Duration::ZERO));
    invalid(RateLimiter::new(cache, 1, Duration::from_micros(999)));
    invalid(RateLimiter::new(
        cache,
        1,
        RateLimiter::MAX_WINDOW + Duration::from_millis(1),
    ));
    let limiter = RateLimiter::new(cache, 1, WINDOW).unwrap();
    let long = "s".repeat(513);
    for subject in ["", "a{b", "a}b", "line\nbreak", "nul\0", long.as_str()] {
        let err = limiter.check(subject).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{subject:?}");
    }
    let err = fx.client.rate_limit("ok", 0, WINDOW).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    // A valid subject of the longest length works.
    assert!(limiter.check(&"s".repeat(512)).unwrap().allowed);
}
