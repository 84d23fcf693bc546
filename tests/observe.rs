//! With the `tracing` feature, the engine reports a miss as a span and a
//! dropped fill and a lock wait as events, with the fields the README
//! promises. Run with `cargo test --features tracing --test observe`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use cacheaside::{CacheAside, Config, Mode};
use parking_lot::Mutex;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

const TTL: Duration = Duration::from_secs(60);

/// What the capture saw: spans (name and fields, updated as they are
/// recorded) and events (message, fields, and the span they happened in).
#[derive(Default)]
struct Seen {
    spans: Vec<Captured>,
    events: Vec<Captured>,
}

#[derive(Clone, Debug, Default)]
struct Captured {
    name: String,
    fields: Vec<(String, String)>,
    parent: Option<String>,
}

impl Captured {
    fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

impl Visit for Captured {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.fields
            .push((field.name().to_owned(), format!("{value:?}")));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.fields
            .push((field.name().to_owned(), value.to_owned()));
    }
}

/// Index of a span in `Seen::spans`, kept in the span's extensions.
struct Slot(usize);

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Seen>>);

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut span = Captured {
            name: attrs.metadata().name().to_owned(),
            ..Captured::default()
        };
        attrs.record(&mut span);
        let mut seen = self.0.lock();
        seen.spans.push(span);
        let slot = seen.spans.len() - 1;
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(Slot(slot));
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let Some(&Slot(slot)) = span.extensions().get::<Slot>() else {
            return;
        };
        values.record(&mut self.0.lock().spans[slot]);
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut captured = Captured {
            name: event.metadata().name().to_owned(),
            parent: ctx.event_span(event).map(|s| s.name().to_owned()),
            ..Captured::default()
        };
        event.record(&mut captured);
        self.0.lock().events.push(captured);
    }
}

/// Runs `f` with the capture as this thread's subscriber; returns what it
/// saw.
fn capture(f: impl FnOnce()) -> Seen {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::registry().with(capture.clone());
    tracing::subscriber::with_default(subscriber, f);
    std::mem::take(&mut *capture.0.lock())
}

/// An engine on a namespace of its own (no table: the loads are constant
/// queries), its keys deleted when it drops.
struct Engine(CacheAside);

impl Engine {
    fn open(config: &Config) -> Engine {
        Engine(CacheAside::open(config).expect("open (are the services up?)"))
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.0.cache().delete_namespace();
    }
}

fn config() -> Config {
    let mut config = common::test_config("observe");
    config.invalidation_relay = false;
    config
}

fn message(e: &Captured) -> &str {
    e.field("message").unwrap_or_default()
}

#[test]
fn a_miss_is_one_span_with_key_mode_outcome_and_load_time() {
    let engine = Engine::open(&config());
    let db = engine.0.db().clone();
    let seen = capture(|| {
        let n: Option<i64> = engine
            .0
            .get_or_load("answer", TTL, || {
                Ok(db.query_opt("SELECT 42::bigint", &[])?.map(|r| r.get(0)))
            })
            .unwrap();
        assert_eq!(n, Some(42));
        // A hit: no span.
        let n: Option<i64> = engine
            .0
            .get_or_load("answer", TTL, || panic!("a hit must not load"))
            .unwrap();
        assert_eq!(n, Some(42));
    });
    let misses: Vec<_> = seen
        .spans
        .iter()
        .filter(|s| s.name == "cacheaside.miss")
        .collect();
    assert_eq!(
        misses.len(),
        1,
        "one span for the miss, none for the hit: {misses:?}"
    );
    let span = misses[0];
    assert_eq!(span.field("key"), Some("answer"));
    assert_eq!(span.field("mode"), Some("single_flight"));
    assert_eq!(span.field("bypass"), Some("false"));
    assert_eq!(span.field("outcome"), Some("value"));
    let load_ms: f64 = span
        .field("load_ms")
        .expect("the load time is recorded")
        .parse()
        .unwrap();
    assert!(load_ms > 0.0, "{load_ms}");
}

#[test]
fn a_dropped_fill_is_an_event_inside_its_miss() {
    let engine = Engine::open(&config());
    let seen = capture(|| {
        let n: Option<i64> = engine
            .0
            .get_or_load_uncoalesced("written", TTL, || {
                // A write lands while the load runs: its fill must not be
                // cached.
                engine.0.invalidate("written")?;
                Ok(Some(1))
            })
            .unwrap();
        assert_eq!(n, Some(1));
    });
    assert_eq!(engine.0.stats().fills_dropped, 1);
    let dropped: Vec<_> = seen
        .events
        .iter()
        .filter(|e| message(e).starts_with("fill dropped"))
        .collect();
    assert_eq!(dropped.len(), 1, "{:?}", seen.events);
    let redis_key = engine.0.cache().redis_key("written");
    assert_eq!(dropped[0].field("key"), Some(redis_key.as_str()));
    assert_eq!(dropped[0].parent.as_deref(), Some("cacheaside.miss"));
    let span = seen
        .spans
        .iter()
        .find(|s| s.name == "cacheaside.miss")
        .unwrap();
    assert_eq!(span.field("mode"), Some("plain"));
    assert_eq!(span.field("outcome"), Some("value"));
}

#[test]
fn waiting_for_another_process_lock_is_an_event_with_its_wait() {
    let mut config = config();
    // The shortest lock wait the config allows: a waiter gives up on the
    // lock after the longest a load may take.
    config.pool_timeout = Duration::from_millis(500);
    config.statement_timeout = Duration::from_millis(500);
    config.cache_timeout = Duration::from_millis(250);
    config.lock_wait = config.pool_timeout + config.statement_timeout;
    let engine = Engine::open(&config);
    // Another process holds the rebuild lock (and never fills).
    let lock = format!("{}:lock", engine.0.cache().redis_key("hot"));
    engine
        .0
        .cache()
        .with_connection(|c| {
            redis::cmd("SET")
                .arg(&lock)
                .arg("another-process")
                .arg("PX")
                .arg(60_000)
                .query::<()>(c)
        })
        .unwrap();
    let db = engine.0.db().clone();
    let seen = capture(|| {
        let n: Option<i64> = engine
            .0
            .get_or_load_versioned("hot", TTL, Mode::SingleFlight, || {
                Ok(db
                    .query_opt("SELECT 7::bigint", &[])?
                    .map(|r| (r.get(0), 1)))
            })
            .unwrap();
        assert_eq!(n, Some(7));
    });
    let waits: Vec<_> = seen
        .events
        .iter()
        .filter(|e| message(e).contains("rebuild lock"))
        .collect();
    assert_eq!(waits.len(), 1, "{:?}", seen.events);
    let wait = waits[0];
    assert_eq!(wait.field("then"), Some("took the lock over"));
    let waited_ms: f64 = wait.field("waited_ms").unwrap().parse().unwrap();
    assert!(
        waited_ms >= config.lock_wait.as_millis() as f64 * 0.9,
        "gave up after {waited_ms} ms, lock_wait is {:?}",
        config.lock_wait
    );
    assert_eq!(wait.parent.as_deref(), Some("cacheaside.miss"));
}

#[test]
fn a_postgres_warning_reaches_the_log() {
    let engine = Engine::open(&config());
    let seen = capture(|| {
        engine
            .0
            .db()
            .batch_execute("DO $$ BEGIN RAISE WARNING 'stock is low'; END $$")
            .unwrap();
    });
    let warnings: Vec<_> = seen
        .events
        .iter()
        .filter(|e| message(e).starts_with("postgres warning"))
        .collect();
    assert_eq!(warnings.len(), 1, "{:?}", seen.events);
    assert_eq!(message(warnings[0]), "postgres warning 01000: stock is low");
}
