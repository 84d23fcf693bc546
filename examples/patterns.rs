//! The article's other Redis patterns (rate limiting, sessions, pub/sub),
//! each run next to the article's own version so the difference shows:
//!
//! ```text
//! cargo run --release --example patterns
//! ```
//!
//! It uses a namespace of its own and removes its keys at the end. About
//! ten seconds, most of it waiting for windows and lifetimes to pass.

use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cacheaside::{Client, Config, Event, RateLimiter, Result, Sessions};

fn main() -> Result<()> {
    let mut config = Config::from_env();
    config.set_namespace(&format!("cacheaside-patterns-{}:", std::process::id()))?;
    let client = Client::open(&config)?;
    let outcome = run(&client);
    let removed = client.cache().delete_namespace()?;
    println!("\n(removed the example's namespace: {removed} keys had not expired yet)");
    outcome
}

fn run(client: &Client) -> Result<()> {
    rate_limiting(client)?;
    sessions(client)?;
    pub_sub(client)
}

/// The article's `is_rate_limited`: ZREMRANGEBYSCORE, ZCARD, ZADD {now: now},
/// EXPIRE in one pipeline. Every attempt is added, allowed or not, with the
/// timestamp as its member.
fn article_is_rate_limited(
    client: &Client,
    key: &str,
    limit: u64,
    window: Duration,
    now: f64,
) -> bool {
    let (count,): (u64,) = client
        .cache()
        .with_connection(|c| {
            redis::pipe()
                .cmd("ZREMRANGEBYSCORE")
                .arg(key)
                .arg(0)
                .arg(now - window.as_secs_f64())
                .ignore()
                .cmd("ZCARD")
                .arg(key)
                .cmd("ZADD")
                .arg(key)
                .arg(now)
                .arg(now.to_string())
                .ignore()
                .cmd("EXPIRE")
                .arg(key)
                .arg(window.as_secs().max(1))
                .ignore()
                .query(c)
        })
        .unwrap_or((u64::MAX,));
    count >= limit
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn rate_limiting(client: &Client) -> Result<()> {
    println!("1. rate limiting: 5 requests per 1 s window");
    let window = Duration::from_secs(1);
    let limiter = RateLimiter::new(client.cache(), 5, window)?;
    let article_key = client.cache().redis_key("article:rate_limit:user:42");

    println!("   a client sends 5 requests, then retries every 100 ms for 2.5 s:");
    let started = Instant::now();
    let (mut ours_allowed, mut article_allowed) = (Vec::new(), Vec::new());
    for attempt in 0.. {
        // The first five go at once, then one attempt every 100 ms.
        if attempt >= 5 {
            std::thread::sleep(Duration::from_millis(100));
        }
        let at = started.elapsed().as_millis();
        if at >= 2500 {
            break;
        }
        if limiter.check("user:42")?.allowed {
            ours_allowed.push(at);
        }
        if !article_is_rate_limited(client, &article_key, 5, window, unix_now()) {
            article_allowed.push(at);
        }
    }
    println!("   article: allowed at {article_allowed:?} ms, then never again:");
    println!("            each rejected retry was recorded and keeps the window full");
    println!("   ours:    allowed at {ours_allowed:?} ms: rejected retries are not counted,");
    println!("            so the client gets back in as the window slides");

    // Two requests in the same microsecond.
    let article_same_us = client.cache().redis_key("article:rate_limit:same-us");
    let now = unix_now();
    article_is_rate_limited(client, &article_same_us, 100, window, now);
    article_is_rate_limited(client, &article_same_us, 100, window, now);
    let article_count: u64 = client
        .cache()
        .with_connection(|c| redis::cmd("ZCARD").arg(&article_same_us).query(c))?;
    let two = RateLimiter::new(client.cache(), 100, window)?;
    let (a, b) = (two.check("same-us")?, two.check("same-us")?);
    let members: Vec<String> = client.cache().with_connection(|c| {
        redis::cmd("ZRANGE")
            .arg(
                client
                    .cache()
                    .redis_key(&format!("rate_limit:100/{}ms:same-us", window.as_millis())),
            )
            .arg(0)
            .arg(-1)
            .query(c)
    })?;
    println!("   two requests in the same microsecond:");
    println!(
        "   article: the member is the timestamp, so the set holds {article_count} entry for 2 requests"
    );
    println!(
        "   ours:    remaining {} then {}; a member is <process token>:<counter> (scored by server time),",
        a.remaining, b.remaining
    );
    println!("            unique within one microsecond too: {members:?}");

    let refused = loop {
        let d = limiter.check("user:7")?;
        if !d.allowed {
            break d;
        }
    };
    println!(
        "   a refused request is told when to come back: retry_after = {:?} (never 0, never over the window)",
        refused.retry_after
    );
    Ok(())
}

fn sessions(client: &Client) -> Result<()> {
    println!("\n2. sessions: idle TTL 1 s, maximum lifetime 3 s, read every 500 ms");
    let sessions = Sessions::new(
        client.cache(),
        Duration::from_secs(1),
        Duration::from_secs(3),
    )?;
    let id = sessions.create(&serde_json::json!({"user_id": 42}))?;
    println!(
        "   id {id} ({} URL-safe characters, 256 bits from the OS CSPRNG)",
        id.len()
    );

    // The article's session: SETEX, then GET + EXPIRE on every read.
    let article_key = client.cache().redis_key("article:session:abc123");
    client.cache().with_connection(|c| {
        redis::cmd("SET")
            .arg(&article_key)
            .arg(r#"{"user_id": 42}"#)
            .arg("PX")
            .arg(1000)
            .query::<()>(c)
    })?;
    let started = Instant::now();
    let key = client.cache().redis_key(&format!("session:{id}"));
    while started.elapsed() < Duration::from_millis(4000) {
        std::thread::sleep(Duration::from_millis(500));
        let ours: Option<serde_json::Value> = sessions.get(&id)?;
        let ttl: i64 = client
            .cache()
            .with_connection(|c| redis::cmd("PTTL").arg(&key).query(c))?;
        let article: bool = client.cache().with_connection(|c| {
            let found: Option<String> = redis::cmd("GET").arg(&article_key).query(c)?;
            if found.is_some() {
                redis::cmd("PEXPIRE")
                    .arg(&article_key)
                    .arg(1000)
                    .query::<()>(c)?;
            }
            Ok(found.is_some())
        })?;
        println!(
            "   {:>5} ms  ours: {:<5} (ttl {:>4} ms)   article: {}",
            started.elapsed().as_millis(),
            if ours.is_some() { "alive" } else { "gone" },
            ttl.max(0),
            if article {
                "alive (two round trips)"
            } else {
                "gone"
            }
        );
    }
    println!("   ours ends at its 3 s maximum however often it is read (its TTL is clamped");
    println!("   to the time left); the article's lives as long as someone keeps reading it");
    Ok(())
}

fn pub_sub(client: &Client) -> Result<()> {
    println!("\n3. pub/sub: a subscriber whose connection is killed");
    let events = client.events()?;
    let (tx, rx) = mpsc::channel();
    let subscription = events.subscribe(&["orders"], move |event| {
        let line = match event {
            Event::Message {
                channel, payload, ..
            } => {
                format!("message on {channel}: {}", String::from_utf8_lossy(payload))
            }
            Event::Gap { cause, .. } => {
                format!("GAP: messages may have been lost ({})", cause.chain())
            }
            _ => "another kind of event".to_owned(),
        };
        let _ = tx.send(line);
    })?;
    let wait = |rx: &mpsc::Receiver<String>| {
        rx.recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| "(nothing within 30 s)".to_owned())
    };
    let n = events.publish("orders", r#"{"order_id": 1, "status": "paid"}"#)?;
    println!("   publish -> {n} receiver; subscriber got {}", wait(&rx));

    // Kill the subscriber's connection, as a server restart or a network
    // failure would. Its connection is named, so we kill only ours.
    let name = subscription.connection_name().to_owned();
    let killed: u64 = client.cache().with_connection(|c| {
        let list: String = redis::cmd("CLIENT").arg("LIST").query(c)?;
        let id = list
            .lines()
            .find(|l| l.split(' ').any(|f| f == format!("name={name}")))
            .and_then(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
            .unwrap_or("0")
            .to_owned();
        redis::cmd("CLIENT").arg("KILL").arg("ID").arg(id).query(c)
    })?;
    println!("   CLIENT KILL of the subscriber's connection ({name}): {killed} killed");
    let n = events.publish("orders", r#"{"order_id": 2, "status": "shipped"}"#)?;
    println!("   publish while it is away -> {n} receivers: lost, as pub/sub is at-most-once");
    let gap = loop {
        let line = wait(&rx);
        if line.starts_with("GAP") || line.starts_with("(nothing") {
            break line;
        }
    };
    println!("   subscriber got {gap}");
    println!("   (the article's subscriber would have stopped, or carried on none the wiser)");
    let n = events.publish("orders", r#"{"order_id": 3, "status": "delivered"}"#)?;
    println!(
        "   publish after -> {n} receiver; subscriber got {}",
        wait(&rx)
    );
    drop(subscription);
    let n = events.publish("orders", "anyone?")?;
    println!("   dropped the subscription: publish -> {n} receivers");
    println!("   for delivery that survives disconnects, use Redis Streams (XADD / XREADGROUP)");
    Ok(())
}
