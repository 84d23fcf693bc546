//! Sessions against the real Redis: unguessable unique ids, sliding expiry
//! that never passes the absolute lifetime, delete, and bad ids.

mod common;

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cacheaside::{ErrorKind, Sessions};
use common::Fixture;
use serde::{Deserialize, Serialize};

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Login {
    user_id: i64,
    roles: Vec<String>,
}

fn pttl(fx: &Fixture, id: &str) -> i64 {
    let key = fx.client.cache().redis_key(&format!("session:{id}"));
    fx.client
        .cache()
        .with_connection(|c| redis::cmd("PTTL").arg(&key).query(c))
        .unwrap()
}

#[test]
fn ids_are_unique_across_100_000_creations() {
    let fx = Fixture::new("sess_ids");
    // Short-lived, so nothing outlives the test even if cleanup failed.
    let sessions = fx
        .client
        .sessions()
        .with_idle_ttl(Duration::from_secs(60))
        .unwrap();
    let started = Instant::now();
    let threads = 8;
    let per_thread = 12_500;
    let ids = Mutex::new(Vec::with_capacity(threads * per_thread));
    std::thread::scope(|s| {
        for t in 0..threads {
            let (sessions, ids) = (&sessions, &ids);
            s.spawn(move || {
                let mut mine = Vec::with_capacity(per_thread);
                for i in 0..per_thread {
                    mine.push(sessions.create(&(t, i)).unwrap());
                }
                ids.lock().unwrap().extend(mine);
            });
        }
    });
    let ids = ids.into_inner().unwrap();
    eprintln!("{} sessions created in {:?}", ids.len(), started.elapsed());
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), threads * per_thread, "every id is new");
    for id in &ids {
        assert_eq!(id.len(), Sessions::ID_LEN);
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "{id} is not base64url"
        );
    }
    // The ids are random, not merely distinct: across 100,000 ids of 43
    // characters each of the 64 characters turns up about 67,000 times.
    let mut seen = [0u32; 256];
    for id in &ids {
        // The last character carries only 4 random bits; skip it.
        for b in id.bytes().take(Sessions::ID_LEN - 1) {
            seen[b as usize] += 1;
        }
    }
    let expected = (ids.len() * (Sessions::ID_LEN - 1) / 64) as f64;
    for b in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_" {
        let n = seen[*b as usize] as f64;
        assert!(
            (n - expected).abs() < expected * 0.05,
            "{} appears {n} times, expected about {expected}",
            *b as char
        );
    }
    // Every one of them reads back (spot check: reading all would only
    // repeat the same script).
    for (n, id) in ids.iter().enumerate().step_by(997) {
        let data: Option<(usize, usize)> = sessions.get(id).unwrap();
        assert!(data.is_some(), "session {n} is readable");
    }
}

#[test]
fn data_round_trips_and_the_key_is_namespaced() {
    let fx = Fixture::new("sess_data");
    let sessions = fx.client.sessions();
    assert_eq!(sessions.idle_ttl(), Sessions::DEFAULT_IDLE_TTL);
    assert_eq!(sessions.max_lifetime(), Duration::from_secs(24 * 3600));
    let login = Login {
        user_id: 42,
        roles: vec!["admin".into()],
    };
    let id = sessions.create(&login).unwrap();
    assert_eq!(sessions.get::<Login>(&id).unwrap(), Some(login));
    let key = format!("{}{{session:{id}}}", fx.config.namespace);
    let exists: bool = fx
        .client
        .cache()
        .with_connection(|c| redis::cmd("EXISTS").arg(&key).query(c))
        .unwrap();
    assert!(exists, "stored as {key}");
    let ttl = pttl(&fx, &id);
    assert!(ttl > 29 * 60 * 1000 && ttl <= 30 * 60 * 1000, "{ttl}");

    // JSON text is stored as it is, and must be JSON.
    let json = r#"{"cart": [1, 2], "note": "ünïcode"}"#;
    let id = sessions.create_json(json).unwrap();
    assert_eq!(sessions.get_json(&id).unwrap().as_deref(), Some(json));
    for bad in ["", "{", "not json", "{} {}"] {
        let err = sessions.create_json(bad).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{bad:?}");
    }
    // Data that does not decode as the asked-for type is corrupt, not absent.
    let err = sessions.get::<Login>(&id).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::CorruptEntry);
}

#[test]
fn a_session_read_keeps_living_but_never_past_its_maximum() {
    let fx = Fixture::new("sess_slide");
    let idle = Duration::from_millis(1000);
    let max = Duration::from_millis(2500);
    let sessions = Sessions::new(fx.client.cache(), idle, max).unwrap();
    let before = Instant::now();
    let id = sessions.create(&"alive").unwrap();
    let after = Instant::now();
    // The deadline was set on the server between `before` and `after`.
    let (mut reads, mut clamped) = (0, 0);
    loop {
        let sent = Instant::now();
        let got: Option<String> = sessions.get(&id).unwrap();
        let received = Instant::now();
        if received < before + max {
            // Before the deadline, and read less than `idle` after the last
            // read: alive, although the idle TTL has passed twice over.
            assert_eq!(got.as_deref(), Some("alive"), "read at {:?}", sent - before);
            reads += 1;
            // The renewed TTL never reaches past the deadline.
            let ttl = Duration::from_millis(pttl(&fx, &id) as u64);
            let left = (after + max).saturating_duration_since(sent);
            assert!(
                ttl <= idle && ttl <= left + Duration::from_millis(1),
                "{ttl:?} > {left:?}"
            );
            if ttl < idle - Duration::from_millis(50) {
                clamped += 1;
            }
        } else if sent > after + max {
            assert_eq!(got, None, "read {:?} after creation", sent - after);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("{reads} reads kept it alive; the last {clamped} renewals were clamped");
    assert!(reads >= 10, "the reads spanned the lifetime");
    assert!(clamped >= 3, "renewals near the deadline were clamped");
}

#[test]
fn a_session_not_read_expires_after_its_idle_ttl() {
    let fx = Fixture::new("sess_idle");
    let idle = Duration::from_millis(300);
    let sessions = fx.client.sessions().with_idle_ttl(idle).unwrap();
    let id = sessions.create(&1).unwrap();
    std::thread::sleep(Duration::from_millis(150));
    let before_read = pttl(&fx, &id);
    assert!(before_read <= 150, "{before_read}");
    assert_eq!(sessions.get::<i32>(&id).unwrap(), Some(1));
    let after_read = pttl(&fx, &id);
    assert!(
        after_read > before_read,
        "the read renewed it: {after_read} ms"
    );
    std::thread::sleep(idle + Duration::from_millis(20));
    assert_eq!(sessions.get::<i32>(&id).unwrap(), None);
}

#[test]
fn an_idle_ttl_longer_than_the_lifetime_is_clamped() {
    let fx = Fixture::new("sess_clamp");
    let sessions = Sessions::new(
        fx.client.cache(),
        Duration::from_secs(3600),
        Duration::from_millis(500),
    )
    .unwrap();
    let id = sessions.create(&"short").unwrap();
    let ttl = pttl(&fx, &id);
    assert!(ttl > 0 && ttl <= 500, "{ttl}");
    assert!(sessions.get::<String>(&id).unwrap().is_some());
    assert!(pttl(&fx, &id) <= 500);
}

#[test]
fn a_deleted_session_is_not_found() {
    let fx = Fixture::new("sess_delete");
    let sessions = fx.client.sessions();
    let id = sessions.create(&"bye").unwrap();
    assert!(sessions.delete(&id).unwrap());
    assert_eq!(sessions.get::<String>(&id).unwrap(), None);
    assert!(!sessions.delete(&id).unwrap(), "already gone");
    // An id that was never issued reads the same way.
    let unknown = "A".repeat(Sessions::ID_LEN);
    assert_eq!(sessions.get_json(&unknown).unwrap(), None);
}

#[test]
fn a_key_that_is_not_a_session_is_corrupt() {
    let fx = Fixture::new("sess_corrupt");
    fx.put_raw("session:forged", b"{\"user_id\": 1}");
    let err = fx.client.sessions().get_json("forged").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::CorruptEntry, "{err:?}");
}

#[test]
fn bad_ids_and_settings_are_invalid() {
    let fx = Fixture::new("sess_bad");
    let sessions = fx.client.sessions();
    let long = "a".repeat(129);
    for bad in [
        "",
        "a/b",
        "a+b",
        "abc=",
        "a b",
        "é",
        "a\nb",
        "{x}",
        long.as_str(),
    ] {
        let err = sessions.get_json(bad).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "get {bad:?}");
        let err = sessions.delete(bad).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "delete {bad:?}");
    }
    assert_eq!(sessions.get_json(&"a".repeat(128)).unwrap(), None);
    let cache = fx.client.cache();
    for (idle, max) in [
        (Duration::ZERO, Duration::from_secs(1)),
        (Duration::from_secs(1), Duration::ZERO),
        (
            Duration::from_secs(1),
            Sessions::MAX_LIFETIME + Duration::from_secs(1),
        ),
    ] {
        let err = Sessions::new(cache, idle, max).err().unwrap();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    }
    let err = sessions.with_idle_ttl(Duration::ZERO).err().unwrap();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
}

#[test]
fn a_cache_call_cannot_delete_a_session_or_a_rate_limit() {
    let fx = Fixture::new("sess_reserved");
    let engine = fx.client.engine();
    let cache = fx.client.cache();
    let sessions = fx.client.sessions();
    let id = sessions.create(&"alice").unwrap();
    let limiter = cacheaside::RateLimiter::new(cache, 1, Duration::from_secs(60)).unwrap();
    assert!(limiter.check("ip:1").unwrap().allowed);
    assert!(!limiter.check("ip:1").unwrap().allowed);
    let session_key = format!("session:{id}");
    let limit_key = "rate_limit:1/60000ms:ip:1";
    for key in [session_key.as_str(), limit_key] {
        let read = engine.get_or_load(key, Duration::from_secs(60), || Ok(Some(1_i64)));
        assert_eq!(
            read.unwrap_err().kind(),
            ErrorKind::InvalidArgument,
            "{key}"
        );
        let err = engine.invalidate(key).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{key}");
        assert_eq!(
            cache.delete(key).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
        // The relay, given the key by a row in the outbox, leaves it alone.
        fx.client
            .db()
            .execute(
                &format!(
                    "INSERT INTO {} (cache_key) VALUES ($1)",
                    fx.config.outbox_table
                ),
                &[&key],
            )
            .unwrap();
    }
    assert!(engine.sync_relay(common::PATIENCE));
    assert_eq!(
        sessions.get::<String>(&id).unwrap().as_deref(),
        Some("alice")
    );
    assert!(
        !limiter.check("ip:1").unwrap().allowed,
        "the limit was reset"
    );
}

#[test]
fn errors_name_neither_a_session_id_nor_a_value() {
    let fx = Fixture::new("sess_private");
    let sessions = fx.client.sessions();
    let id = sessions
        .create(&serde_json::json!({"user_id": "s3cret-name", "roles": []}))
        .unwrap();
    // Data that does not decode as the caller's type.
    let err = sessions.get::<Login>(&id).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::CorruptEntry);
    let forged = "F".repeat(Sessions::ID_LEN);
    fx.put_raw(&format!("session:{forged}"), b"s3cret-raw-bytes");
    let not_a_session = sessions.get_json(&forged).unwrap_err();
    assert_eq!(not_a_session.kind(), ErrorKind::CorruptEntry);
    // A cached value read as another type.
    let cache = fx.client.cache();
    cache
        .set_json("profile:7", &"s3cret-value", Duration::from_secs(60))
        .unwrap();
    let cached = cache.get_json::<i64>("profile:7").unwrap_err();
    assert_eq!(cached.kind(), ErrorKind::CorruptEntry);
    for err in [err, not_a_session, cached] {
        let shown = format!("{} | {} | {err:?}", err.chain(), err);
        for secret in [id.as_str(), forged.as_str(), "s3cret"] {
            assert!(!shown.contains(secret), "{secret:?} in {shown}");
        }
    }
}

/// `Cache` runs a script again when its connection drops after the server
/// ran it: creating a session must survive that.
#[cfg(feature = "test-hooks")]
#[test]
fn a_retried_session_creation_creates_one_session() {
    let fx = Fixture::new("sess_retry");
    let sessions = fx.client.sessions();
    let id = sessions
        .create_json_retried(r#"{"user_id": 7}"#)
        .expect("the retry finds its own session, not a collision");
    assert_eq!(
        sessions.get_json(&id).unwrap().as_deref(),
        Some(r#"{"user_id": 7}"#)
    );
}
