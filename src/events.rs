//! Pub/sub: publish to channels, and subscriptions that deliver messages to
//! a callback on their own thread, reconnect when their connection breaks,
//! and say when messages may have been lost.
//!
//! What it guarantees, and what it cannot:
//!
//! - **At most once, in order.** Redis pub/sub keeps nothing: a message
//!   published while a subscriber is disconnected is gone. While connected,
//!   a subscription sees every message of its channels in publish order.
//!   For delivery that survives disconnects, use Redis Streams (`XADD`,
//!   `XREADGROUP`, `XACK`) instead; pub/sub is for notifications a consumer
//!   can afford to miss or can recover from the source of truth.
//! - **Losses are never silent.** When its connection breaks (server
//!   restart, `CLIENT KILL`, network failure, a keepalive `PING` that gets
//!   no answer), a subscription reconnects with exponential backoff (25 ms
//!   doubling to 5 s) and jitter, subscribes again, and only then delivers [`Event::Gap`]:
//!   messages published since the break may be missing, and everything
//!   published after the event arrives is delivered. A consumer that
//!   re-reads its state when it sees the gap therefore misses nothing (the
//!   article's subscriber neither reconnects nor knows what it lost).
//! - **Bounded shutdown.** Each subscription has a dedicated connection
//!   (not from the pool: a subscribed connection cannot run other commands)
//!   read with a short timeout, so dropping the [`Subscription`] stops it
//!   within about 50 ms, or once the callback in progress returns. (At
//!   worst it waits out one connect timeout, while reconnecting, or one I/O
//!   timeout, during a keepalive `PING`.) Dropping it from inside its own
//!   callback is safe.
//!
//! On a Redis Cluster pub/sub is sharded (Redis 7's `SPUBLISH` and
//! `SSUBSCRIBE`): a channel lives in the slot of its name, a message goes to
//! that slot's master and its subscribers only (classic `PUBLISH` is
//! carried to every node), and a subscription holds one connection per
//! slot among its channels, to the slot's master. When that connection
//! breaks, or the server unsubscribes it because the slot moved (a
//! migration, a failover), it finds the slot's master again, subscribes
//! there and reports the gap, as above. Order holds per channel. Patterns
//! do not exist in sharded pub/sub: `psubscribe` is refused on a cluster.
//!
//! Channel names are stored under the namespace, fenced by braces the way
//! keys are: `publish("orders", ..)` with namespace `app:` publishes to the
//! Redis channel `app:{orders}`, and a subscriber sees `orders` again.
//! Channels and patterns are checked like every caller-chosen name:
//! non-empty, at most 512 bytes, no `{`, `}` or control characters. Since
//! neither a name nor a namespace can hold a brace, the namespace of a
//! channel is exactly the text before its `{`: namespaces `app:` and
//! `app:v2:` never hear each other (`app:{v2:orders}` is not
//! `app:v2:{orders}`), a pattern such as `*` matches only its own
//! namespace's channels, and the empty namespace (`{orders}`) hears no
//! other namespace either.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use redis::{Connection, PubSub, PushInfo, PushKind, Value};

use crate::cache::Cache;
use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::keys::{escape_glob, slot_of_tag, validate_name};

/// How often a subscription's thread wakes up, when no message arrives, to
/// see whether it was asked to stop.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// First pause before reconnecting after a failed attempt; it doubles per
/// failure, up to [`MAX_BACKOFF`], each with random jitter.
const FIRST_BACKOFF: Duration = Duration::from_millis(25);
/// Longest pause between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Publishes messages and opens subscriptions under one namespace.
///
/// Publishing uses the pooled connections of the [`Cache`]; every
/// subscription opens a dedicated connection to the Redis URL of the
/// [`Config`], with its connect and I/O timeouts.
///
/// Cheap to clone, `Send + Sync`.
///
/// ```no_run
/// use cacheaside::{Client, Config, Event};
///
/// let client = Client::open(&Config::from_env())?;
/// let events = client.events()?;
/// let subscription = events.subscribe(&["orders"], |event| match event {
///     Event::Message { channel, payload, .. } => {
///         println!("{channel}: {}", String::from_utf8_lossy(payload));
///     }
///     Event::Gap { cause, .. } => println!("reconnected after {cause}: re-read the orders"),
///     _ => {}
/// })?;
/// let receivers = events.publish("orders", r#"{"id": 7, "status": "shipped"}"#)?;
/// assert!(receivers >= 1);
/// drop(subscription); // unsubscribes and joins the thread
/// # Ok::<(), cacheaside::Error>(())
/// ```
#[derive(Clone)]
pub struct Events {
    cache: Cache,
    redis: redis::Client,
    /// On a Redis Cluster: the settings sharded subscriptions connect to
    /// each slot's master with. `None` on a single server (classic pub/sub).
    sharded: Option<Arc<Config>>,
    connect_timeout: Duration,
    io_timeout: Duration,
}

/// What a subscription's callback receives.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event<'a> {
    /// A message published to one of the subscription's channels (or to a
    /// channel matching one of its patterns).
    #[non_exhaustive]
    Message {
        /// The channel it was published to, without the namespace.
        channel: &'a str,
        /// The message, as published (any bytes).
        payload: &'a [u8],
    },
    /// The connection broke and the subscription has just been restored:
    /// messages published between the break and now may have been lost.
    /// Messages published from now on are delivered.
    #[non_exhaustive]
    Gap {
        /// Why the connection broke.
        cause: &'a Error,
    },
}

/// A live subscription: a thread delivering [`Event`]s to a callback.
///
/// Dropping it stops the thread: it unsubscribes, closes its connection and
/// is joined, so once `drop` returns the callback is not running and never
/// runs again. Dropping it *from inside its own callback* (for example a
/// callback that owns it through an `Arc<Mutex<Option<Subscription>>>`)
/// cannot join the thread it runs on; it detaches it instead: the callback
/// call in progress is the last one, and the thread ends right after it
/// returns. Do not drop a subscription from another subscription's callback
/// if that one may do the same to the first (each would wait for the other).
///
/// `Send + Sync`: it may be dropped on any thread.
pub struct Subscription {
    shared: Arc<Shared>,
    /// One thread (on a cluster, one per slot among its channels).
    threads: Vec<JoinHandle<()>>,
    name: String,
}

/// What the owner and the thread share.
struct Shared {
    /// Set once, by `Drop` (or a failed start); the thread reads it before
    /// each delivery and between reads. Never cleared.
    stop: AtomicBool,
}

impl Shared {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// Channels or patterns, already prefixed with the namespace.
#[derive(Clone)]
enum Targets {
    Channels(Vec<String>),
    Patterns(Vec<String>),
}

/// Everything a subscription's thread needs to (re)connect.
struct Setup {
    redis: redis::Client,
    connect_timeout: Duration,
    io_timeout: Duration,
    name: String,
    targets: Targets,
    namespace: String,
    /// Sharded (cluster): the channels' slot, found anew at each connect.
    shard: Option<Shard>,
}

/// Where a sharded subscription's channels live: one slot, whose master
/// is looked up (`CLUSTER SLOTS`, through the pool) at each connect.
struct Shard {
    slot: u16,
    cache: Cache,
    config: Arc<Config>,
}

/// What a connection delivers besides replies: on a sharded one, the
/// pushes Redis sends unasked (a `sunsubscribe` when the slot moved).
type Pushes = Option<mpsc::Receiver<PushInfo>>;

type Callback = Box<dyn FnMut(Event<'_>) + Send>;

/// Silence after which a subscription checks its connection with a `PING`
/// (answered within the I/O timeout, or the connection counts as broken).
const KEEPALIVE_AFTER: Duration = Duration::from_secs(5);

impl Events {
    /// Publishing and subscribing through `cache` (for its pool and
    /// namespace), with subscriptions connecting to `config.redis_url` (on
    /// a Redis Cluster, sharded: to the master of each channel's slot, with
    /// the first node's credentials and TLS settings), each connect and
    /// command bounded by `config.cache_timeout`.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] for a Redis URL that does not parse,
    /// and for a `redis+sentinel://` URL: subscriptions do not follow a
    /// Sentinel failover yet (see `docs/cluster.md`).
    pub fn new(cache: &Cache, config: &Config) -> Result<Events> {
        if config.is_redis_sentinel() {
            return Err(Error::invalid_argument(
                "events (pub/sub) do not support Redis Sentinel yet: a subscription would \
                 stay on the old master after a failover (see docs/cluster.md)",
            ));
        }
        let node = config.redis_nodes().first().copied().unwrap_or_default();
        let redis = crate::redis_conn::single_client(config, node)?;
        Ok(Events {
            cache: cache.clone(),
            redis,
            sharded: cache.is_cluster().then(|| Arc::new(config.clone())),
            connect_timeout: config.cache_timeout,
            io_timeout: config.cache_timeout,
        })
    }

    /// Publishes `payload` on `channel` and returns how many subscribers
    /// (connections, in any process) received it; 0 means nobody was
    /// listening and the message is gone. Blocks for one round trip.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] for a bad channel name; cache errors
    /// and timeouts.
    pub fn publish(&self, channel: &str, payload: impl AsRef<[u8]>) -> Result<u64> {
        validate_name("channel", channel)?;
        let channel = fenced(self.cache.namespace(), channel);
        // On a cluster, SPUBLISH goes to the master of the channel's slot
        // (the cluster client routes it by the channel, as a key).
        let verb = if self.sharded.is_some() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        };
        let mut publish = redis::cmd(verb);
        publish.arg(&channel).arg(payload.as_ref());
        self.cache.with_connection(|conn| publish.query(conn))
    }

    /// Subscribes to `channels` and calls `on_event` for each message, on a
    /// thread of the subscription's own, until the returned
    /// [`Subscription`] is dropped.
    ///
    /// Returns once Redis has confirmed the subscription, so a message
    /// published after `subscribe` returns is delivered. The callback runs
    /// for one event at a time, in order; while it runs, later messages
    /// wait (in the socket, then in Redis's output buffer for the client,
    /// which Redis caps: a callback that is too slow for long enough gets
    /// its connection closed by the server, and then sees a gap).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] for no channels or a bad channel name;
    /// cache errors and timeouts when the first connection or subscription
    /// fails (later failures are retried, and reported as [`Event::Gap`]).
    pub fn subscribe<F>(&self, channels: &[&str], on_event: F) -> Result<Subscription>
    where
        F: FnMut(Event<'_>) + Send + 'static,
    {
        let targets = self.targets("channel", channels, |name| {
            fenced(self.cache.namespace(), name)
        })?;
        self.start(Targets::Channels(targets), Box::new(on_event))
    }

    /// [`subscribe`](Self::subscribe) to every channel matching one of
    /// `patterns` (Redis globs: `*`, `?`, `[...]`, `\` escapes), within the
    /// namespace: the namespace itself is matched literally.
    ///
    /// ```no_run
    /// # let events = cacheaside::Client::open(&cacheaside::Config::from_env())?.events()?;
    /// let all_orders = events.psubscribe(&["order:*"], |event| println!("{event:?}"))?;
    /// events.publish("order:7", "shipped")?;
    /// # Ok::<(), cacheaside::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`subscribe`](Self::subscribe); and [`ErrorKind::InvalidArgument`]
    /// on a Redis Cluster, whose sharded pub/sub has no patterns.
    pub fn psubscribe<F>(&self, patterns: &[&str], on_event: F) -> Result<Subscription>
    where
        F: FnMut(Event<'_>) + Send + 'static,
    {
        if self.sharded.is_some() {
            return Err(Error::invalid_argument(
                "pattern subscriptions are not supported on a Redis Cluster: its pub/sub \
                 is sharded (SSUBSCRIBE), which has no patterns; subscribe to channels",
            ));
        }
        let prefix = escape_glob(self.cache.namespace());
        let targets = self.targets("channel pattern", patterns, |pattern| {
            fenced(&prefix, pattern)
        })?;
        self.start(Targets::Patterns(targets), Box::new(on_event))
    }

    /// Validates names and fences them in the namespace (for patterns, the
    /// namespace escaped as a glob), with `fence`.
    fn targets(
        &self,
        what: &str,
        names: &[&str],
        fence: impl Fn(&str) -> String,
    ) -> Result<Vec<String>> {
        if names.is_empty() {
            return Err(Error::invalid_argument(format!(
                "no {what} to subscribe to"
            )));
        }
        names
            .iter()
            .map(|name| {
                validate_name(what, name)?;
                Ok(fence(name))
            })
            .collect()
    }

    fn start(&self, targets: Targets, on_event: Callback) -> Result<Subscription> {
        let name = connection_name();
        let setup = |targets: Targets, shard: Option<Shard>| Setup {
            redis: self.redis.clone(),
            connect_timeout: self.connect_timeout,
            io_timeout: self.io_timeout,
            name: name.clone(),
            targets,
            namespace: self.cache.namespace().to_owned(),
            shard,
        };
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
        });
        let mut subscription = Subscription {
            shared: Arc::clone(&shared),
            threads: Vec::new(),
            name: name.clone(),
        };
        // What each thread runs: on a cluster one per slot, calling the one
        // callback in turn.
        let mut plans: Vec<(Setup, Callback)> = Vec::new();
        match (&self.sharded, targets) {
            (Some(config), Targets::Channels(channels)) => {
                let mut by_slot: Vec<(u16, Vec<String>)> = Vec::new();
                for channel in channels {
                    let slot = slot_of_tag(unfenced(self.cache.namespace(), &channel));
                    match by_slot.iter_mut().find(|(s, _)| *s == slot) {
                        Some((_, group)) => group.push(channel),
                        None => by_slot.push((slot, vec![channel])),
                    }
                }
                let on_event = Arc::new(Mutex::new(on_event));
                for (slot, channels) in by_slot {
                    let shard = Shard {
                        slot,
                        cache: self.cache.clone(),
                        config: Arc::clone(config),
                    };
                    let one = setup(Targets::Channels(channels), Some(shard));
                    plans.push((one, in_turn(&on_event, &shared)));
                }
            }
            (_, targets) => plans.push((setup(targets, None), on_event)),
        }
        // The first connect and subscribe of every thread are bounded by
        // these timeouts; the margin is for a slow scheduler.
        let deadline =
            Instant::now() + self.connect_timeout + self.io_timeout * 4 + Duration::from_secs(5);
        let mut readies = Vec::new();
        for (setup, on_event) in plans {
            let (ready_tx, ready_rx) = mpsc::sync_channel(1);
            let thread = thread::Builder::new()
                .name("cacheaside-subscription".to_owned())
                .spawn({
                    let shared = Arc::clone(&shared);
                    move || run(&setup, &shared, on_event, ready_tx)
                })
                .map_err(|e| {
                    Error::new(ErrorKind::Cache, "could not start a subscription thread")
                        .with_source(e)
                })?;
            subscription.threads.push(thread);
            readies.push(ready_rx);
        }
        for ready_rx in readies {
            let left = deadline.saturating_duration_since(Instant::now());
            match ready_rx.recv_timeout(left) {
                Ok(Ok(())) => {}
                Ok(Err(err)) => return Err(err),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    // Stop them without waiting: one is stuck somewhere.
                    subscription.shared.stop.store(true, Ordering::SeqCst);
                    subscription.threads.clear();
                    return Err(Error::timeout("subscribing"));
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(Error::new(
                        ErrorKind::Panicked,
                        "the subscription thread panicked while subscribing",
                    ));
                }
            }
        }
        Ok(subscription)
    }
}

/// A callback for one of a sharded subscription's threads: the shared
/// callback, called by one thread at a time (so events never overlap);
/// a thread waiting for its turn gives up once the subscription stops (it
/// may be dropped from inside the callback another thread runs).
fn in_turn(on_event: &Arc<Mutex<Callback>>, shared: &Arc<Shared>) -> Callback {
    let (on_event, shared) = (Arc::clone(on_event), Arc::clone(shared));
    Box::new(move |event| {
        while !shared.stopped() {
            if let Some(mut call) = on_event.try_lock_for(POLL_INTERVAL) {
                call(event);
                return;
            }
        }
    })
}

impl Subscription {
    /// The name its connection gives itself (`CLIENT SETNAME`), unique per
    /// subscription, e.g. `cacheaside-sub-3f9c0a12-7`: find it in
    /// `CLIENT LIST`.
    pub fn connection_name(&self) -> &str {
        &self.name
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for thread in &self.threads {
            // Wake it if it is sleeping between reconnection attempts.
            thread.thread().unpark();
        }
        for thread in self.threads.drain(..) {
            if thread.thread().id() == thread::current().id() {
                // Dropped from inside its own callback: joining would wait
                // for ourselves. The thread sees `stop` when the callback
                // returns.
                continue;
            }
            // A panic in the callback ended the thread already.
            let _ = thread.join();
        }
    }
}

/// A subscription's thread: connect and subscribe (reporting the first
/// outcome to `ready`), then deliver messages; on a broken connection,
/// reconnect with backoff and deliver a gap; until `stop`.
fn run(
    setup: &Setup,
    shared: &Shared,
    mut on_event: Callback,
    ready: mpsc::SyncSender<Result<()>>,
) {
    let mut ready = Some(ready);
    let mut backoff = Backoff::new();
    // Why the last connection broke, until a gap has been reported for it.
    let mut broken: Option<Error> = None;
    while !shared.stopped() {
        let (mut conn, pushes) = match setup.connect() {
            Ok(conn) => conn,
            Err(err) => {
                if let Some(ready) = ready.take() {
                    let _ = ready.send(Err(err));
                    return;
                }
                backoff.sleep(shared);
                continue;
            }
        };
        let mut pubsub = conn.as_pubsub();
        if let Err(err) = setup.subscribe(&mut pubsub) {
            if let Some(ready) = ready.take() {
                let _ = ready.send(Err(err));
                return;
            }
            drop(pubsub);
            backoff.sleep(shared);
            continue;
        }
        if let Some(ready) = ready.take() {
            let _ = ready.send(Ok(()));
        }
        if let Some(cause) = broken.take() {
            if shared.stopped() {
                let _ = pubsub.set_read_timeout(Some(setup.io_timeout));
                return;
            }
            on_event(Event::Gap { cause: &cause });
        }
        let connected_at = Instant::now();
        match setup.listen(&mut pubsub, &pushes, shared, &mut on_event) {
            None => {
                // Dropping `pubsub` unsubscribes and waits for Redis to
                // confirm, so a publish after `drop(subscription)` reaches
                // nobody; give the confirmations the full I/O timeout.
                let _ = pubsub.set_read_timeout(Some(setup.io_timeout));
                drop(pubsub);
                setup.leave_shard(&mut conn);
                return;
            }
            Some(cause) => broken = Some(cause),
        }
        // A connection that lived a while was a good one: start the backoff
        // over. One that broke at once (a server refusing us) keeps growing
        // it, so a flapping server is not hammered.
        if connected_at.elapsed() >= MAX_BACKOFF {
            backoff = Backoff::new();
        }
        drop(pubsub);
        backoff.sleep(shared);
    }
}

impl Setup {
    /// A dedicated connection with timeouts, named for `CLIENT LIST`. A
    /// sharded one goes to the master of its slot, speaks RESP3 and has
    /// sent its `SSUBSCRIBE` (confirmed by [`subscribe`](Self::subscribe));
    /// its pushes are copied to the receiver returned with it.
    fn connect(&self) -> Result<(Connection, Pushes)> {
        let client = match &self.shard {
            Some(shard) => shard.master()?,
            None => self.redis.clone(),
        };
        let mut conn = client.get_connection_with_timeout(self.connect_timeout)?;
        conn.set_write_timeout(Some(self.io_timeout))?;
        conn.set_read_timeout(Some(self.io_timeout))?;
        redis::cmd("CLIENT")
            .arg("SETNAME")
            .arg(&self.name)
            .query::<()>(&mut conn)?;
        let (Some(_), Targets::Channels(channels)) = (&self.shard, &self.targets) else {
            return Ok((conn, None));
        };
        let (tx, rx) = mpsc::channel();
        conn.set_push_sender(tx);
        let mut ssubscribe = redis::cmd("SSUBSCRIBE");
        ssubscribe.arg(channels).set_no_response(true);
        redis::ConnectionLike::req_command(&mut conn, &ssubscribe)?;
        Ok((conn, Some(rx)))
    }

    /// Subscribes and waits for Redis to confirm (the first confirmation
    /// means the whole command ran: Redis runs one command at a time). A
    /// sharded connection subscribed in [`connect`](Self::connect): the
    /// first reply after it (a confirmation, or the `PING`'s) says it ran.
    fn subscribe(&self, pubsub: &mut PubSub<'_>) -> Result<()> {
        match (&self.shard, &self.targets) {
            (Some(_), _) => {
                pubsub.set_read_timeout(Some(self.io_timeout))?;
                pubsub.ping::<Value>()?;
            }
            (None, Targets::Channels(channels)) => pubsub.subscribe(channels)?,
            (None, Targets::Patterns(patterns)) => pubsub.psubscribe(patterns)?,
        }
        pubsub.set_read_timeout(Some(POLL_INTERVAL))?;
        Ok(())
    }

    /// On stop, a sharded connection unsubscribes and waits for Redis to
    /// confirm (a reply to the `PING` after it, or the confirmation), so a
    /// publish after `drop(subscription)` reaches nobody. Best effort.
    fn leave_shard(&self, conn: &mut Connection) {
        let (Some(_), Targets::Channels(channels)) = (&self.shard, &self.targets) else {
            return;
        };
        let mut sunsubscribe = redis::cmd("SUNSUBSCRIBE");
        sunsubscribe.arg(channels).set_no_response(true);
        if redis::ConnectionLike::req_command(conn, &sunsubscribe).is_ok() {
            let _ = redis::cmd("PING").query::<Value>(conn);
        }
    }

    /// Delivers messages until asked to stop (`None`) or the connection
    /// breaks (`Some(why)`).
    ///
    /// A connection that has been silent for `KEEPALIVE_AFTER` is sent a
    /// `PING`; no answer within the I/O timeout counts as broken, so a
    /// server that vanished without closing the socket is noticed too.
    fn listen(
        &self,
        pubsub: &mut PubSub<'_>,
        pushes: &Pushes,
        shared: &Shared,
        on_event: &mut Callback,
    ) -> Option<Error> {
        let mut last_heard = Instant::now();
        loop {
            if shared.stopped() {
                return None;
            }
            if let Some(pushes) = pushes {
                // Messages come through `get_message`; what only the copy
                // shows is the server dropping us from the slot's channels.
                while let Ok(push) = pushes.try_recv() {
                    if push.kind == PushKind::SUnsubscribe {
                        return Some(Error::new(
                            ErrorKind::Cache,
                            "the server unsubscribed a sharded subscription: its slot moved",
                        ));
                    }
                }
            }
            match pubsub.get_message() {
                Ok(message) => {
                    last_heard = Instant::now();
                    if shared.stopped() {
                        return None;
                    }
                    let channel = unfenced(&self.namespace, message.get_channel_name());
                    on_event(Event::Message {
                        channel,
                        payload: message.get_payload_bytes(),
                    });
                }
                Err(err) if err.is_timeout() => {
                    if last_heard.elapsed() < KEEPALIVE_AFTER {
                        continue;
                    }
                    if let Err(err) = self.ping(pubsub) {
                        return Some(err);
                    }
                    last_heard = Instant::now();
                }
                Err(err) => return Some(err.into()),
            }
        }
    }

    fn ping(&self, pubsub: &mut PubSub<'_>) -> Result<()> {
        pubsub.set_read_timeout(Some(self.io_timeout))?;
        pubsub.ping::<redis::Value>()?;
        pubsub.set_read_timeout(Some(POLL_INTERVAL))?;
        Ok(())
    }
}

impl Shard {
    /// A client for the master that serves the slot now.
    fn master(&self) -> Result<redis::Client> {
        let map = self.cache.slot_map()?;
        match map
            .iter()
            .find(|(a, b, _, _)| (*a..=*b).contains(&self.slot))
        {
            Some((_, _, host, port)) => {
                crate::redis_conn::node_client(&self.config, host, *port, true)
            }
            None => Err(Error::new(
                ErrorKind::Cache,
                format!("no master serves slot {} (CLUSTER SLOTS)", self.slot),
            )),
        }
    }
}

/// The Redis channel of `name` in `namespace`: `namespace{name}`. Names and
/// namespaces hold no braces, so the `{` marks where the namespace ends and
/// no namespace's channel or pattern reaches into another's.
fn fenced(namespace: &str, name: &str) -> String {
    format!("{namespace}{{{name}}}")
}

/// The name inside a channel of `namespace` (the channel as it is, if it is
/// not one of ours: a pattern cannot match one, but Redis sends what it
/// sends).
fn unfenced<'a>(namespace: &str, channel: &'a str) -> &'a str {
    channel
        .strip_prefix(namespace)
        .and_then(|rest| rest.strip_prefix('{'))
        .and_then(|rest| rest.strip_suffix('}'))
        .unwrap_or(channel)
}

/// Exponential backoff with jitter between reconnection attempts.
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff {
            next: FIRST_BACKOFF,
        }
    }

    /// Sleeps for a random time in `[next / 2, next]` (so many subscribers
    /// that lost the same server do not reconnect in lockstep), then
    /// doubles `next`. Returns early when asked to stop: `Drop` unparks us.
    fn sleep(&mut self, shared: &Shared) {
        let half = self.next / 2;
        let pause = half + half.mul_f64(fastrand::f64());
        self.next = (self.next * 2).min(MAX_BACKOFF);
        let deadline = Instant::now() + pause;
        while !shared.stopped() {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            thread::park_timeout(deadline - now);
        }
    }
}

/// `cacheaside-sub-<random>-<n>`: unique per subscription across processes.
fn connection_name() -> String {
    static PROCESS: once_cell::sync::Lazy<u32> = once_cell::sync::Lazy::new(|| fastrand::u32(..));
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "cacheaside-sub-{:08x}-{}-{}",
        *PROCESS,
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let shared = Shared {
            stop: AtomicBool::new(true), // so sleep returns at once
        };
        let mut backoff = Backoff::new();
        for _ in 0..20 {
            backoff.sleep(&shared);
        }
        assert_eq!(backoff.next, MAX_BACKOFF);
    }

    #[test]
    fn channels_are_fenced_by_braces() {
        assert_eq!(fenced("app:", "v2:orders"), "app:{v2:orders}");
        assert_eq!(fenced("app:v2:", "orders"), "app:v2:{orders}");
        assert_eq!(fenced("", "orders"), "{orders}");
        assert_eq!(unfenced("app:", "app:{v2:orders}"), "v2:orders");
        assert_eq!(unfenced("", "{orders}"), "orders");
        assert_eq!(unfenced("app:", "other"), "other");
    }

    #[test]
    fn connection_names_are_unique_and_valid() {
        let a = connection_name();
        let b = connection_name();
        assert_ne!(a, b);
        // CLIENT SETNAME refuses spaces and newlines.
        assert!(a.chars().all(|c| c.is_ascii_graphic()));
    }
}
