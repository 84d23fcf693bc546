//! Connection pools that fail fast and heal fast: r2d2 underneath, plus what
//! r2d2 does not do for a server that is down.
//!
//! Guarantees:
//! - Building a pool never waits for a server: a client opens while Redis or
//!   Postgres is down, and its calls then fail (or degrade) one by one.
//! - A server that refused (or failed) its last connect costs a checkout one
//!   connect attempt of its own, which reports the real cause (connection
//!   refused, authentication failed, no such database) within the connect
//!   timeout, instead of waiting the whole checkout timeout while r2d2
//!   retries in the background and then saying only "timed out".
//! - Recovery is prompt: while the pool holds no connection, checkouts
//!   connect on their own, so the first call after the server answers again
//!   succeeds, whatever r2d2's retry back-off is.
//! - After a server restart every pooled connection is dead, but only one
//!   caller needs to find out: [`Pool::discard_all`] moves the pool to a new
//!   generation, and connections of an older one are dropped at checkout and
//!   check-in instead of being handed out.
//!
//! We skip r2d2's `test_on_check_out` on purpose: it costs a round trip per
//! checkout, which would double the cost of a cache hit. A broken connection
//! fails its one command instead, and the generation and `has_broken` keep
//! it (and its siblings) out of the pool afterwards.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use r2d2::ManageConnection;

use crate::error::{Error, Result};

/// Opens connections of one kind; the pool does the rest.
pub(crate) trait Connector: Send + Sync + 'static {
    type Conn: Send + 'static;
    /// Opens one connection, bounded by the connect timeout, with an error
    /// that says why it failed.
    fn connect(&self) -> Result<Self::Conn>;
    /// True when the connection cannot serve another call.
    fn is_broken(&self, conn: &mut Self::Conn) -> bool;
}

/// How long r2d2's background connect attempts wait between tries at most
/// (it doubles the delay from 200 ms up to half its connection timeout).
const RETRY_CAP: Duration = Duration::from_secs(1);

/// How often a checkout that waits for a busy pool looks up from r2d2's
/// queue to see whether the server went down meanwhile.
const WAIT_SLICE: Duration = Duration::from_millis(25);

/// A pool of connections from `C`. Cheap to clone; clones share the pool.
pub(crate) struct Pool<C: Connector> {
    r2d2: r2d2::Pool<Manager<C>>,
    shared: Arc<Shared<C>>,
    checkout_timeout: Duration,
}

impl<C: Connector> Clone for Pool<C> {
    fn clone(&self) -> Self {
        Pool {
            r2d2: self.r2d2.clone(),
            shared: Arc::clone(&self.shared),
            checkout_timeout: self.checkout_timeout,
        }
    }
}

struct Shared<C> {
    connector: C,
    /// Connections born before the current generation are dead.
    generation: AtomicU64,
    /// The last connect attempt failed (and with what), until one succeeds.
    down: AtomicBool,
    last_error: Mutex<Option<Error>>,
}

/// A connection with the generation it was born in.
pub(crate) struct Tagged<T> {
    conn: T,
    generation: u64,
    /// A call gave up on it mid-reply (a timeout): its protocol state is
    /// unknown, so it is closed instead of handed to the next caller.
    discarded: bool,
}

pub(crate) struct Manager<C>(Arc<Shared<C>>);

impl<C: Connector> ManageConnection for Manager<C> {
    type Connection = Tagged<C::Conn>;
    type Error = Error;

    fn connect(&self) -> Result<Tagged<C::Conn>> {
        self.0.connect()
    }

    fn is_valid(&self, _: &mut Tagged<C::Conn>) -> Result<()> {
        // Only called with test_on_check_out, which we leave off.
        Ok(())
    }

    fn has_broken(&self, conn: &mut Tagged<C::Conn>) -> bool {
        conn.discarded || self.0.is_stale(conn) || self.0.connector.is_broken(&mut conn.conn)
    }
}

impl<C: Connector> Shared<C> {
    fn connect(&self) -> Result<Tagged<C::Conn>> {
        match self.connector.connect() {
            Ok(conn) => {
                if self.down.swap(false, Ordering::SeqCst) {
                    *self.last_error.lock() = None;
                }
                Ok(Tagged {
                    conn,
                    // Read after the connect: a connection opened while the
                    // generation moved on is still a live one.
                    generation: self.generation.load(Ordering::SeqCst),
                    discarded: false,
                })
            }
            Err(err) => {
                *self.last_error.lock() = Some(err.clone());
                self.down.store(true, Ordering::SeqCst);
                Err(err)
            }
        }
    }

    fn is_stale(&self, conn: &Tagged<C::Conn>) -> bool {
        conn.generation < self.generation.load(Ordering::Relaxed)
    }
}

impl<C: Connector> Pool<C> {
    /// A pool of at most `max_size` connections that keeps `min_idle` open
    /// (opened in the background; at least one) and lets a checkout wait
    /// `checkout_timeout` for a busy pool. Does not connect.
    pub fn new(connector: C, max_size: u32, min_idle: u32, checkout_timeout: Duration) -> Self {
        // With none to keep, a pool that is empty stays empty: `get` takes
        // an empty pool for one whose server just came back and opens a
        // connection of its own, outside the pool and its size limit, for
        // every call. `Config::validate` refuses 0; a `Db` or `Cache` built
        // from an unvalidated config gets 1.
        let min_idle = min_idle.max(1);
        let shared = Arc::new(Shared {
            connector,
            generation: AtomicU64::new(0),
            down: AtomicBool::new(false),
            last_error: Mutex::new(None),
        });
        let r2d2 = r2d2::Pool::builder()
            .max_size(max_size)
            .min_idle(Some(min_idle.min(max_size)))
            // Only r2d2's retry back-off reads this (capped at half of it):
            // every checkout passes its own timeout.
            .connection_timeout(RETRY_CAP * 2)
            .test_on_check_out(false)
            // Connect failures are recorded in `Shared` and reported to the
            // caller; r2d2's default handler would log one every retry.
            .error_handler(Box::new(r2d2::NopErrorHandler))
            .build_unchecked(Manager(Arc::clone(&shared)));
        Pool {
            r2d2,
            shared,
            checkout_timeout,
        }
    }

    /// A connection, waiting at most the checkout timeout for a busy pool.
    ///
    /// # Errors
    /// The connect error when the server is down (at once, not after the
    /// timeout); [`ErrorKind::Timeout`](crate::ErrorKind) when the pool
    /// stays busy.
    pub fn get(&self, side: &str) -> Result<Conn<C>> {
        let deadline = Instant::now() + self.checkout_timeout;
        loop {
            while let Some(conn) = self.r2d2.try_get() {
                if !self.shared.is_stale(&conn) {
                    return Ok(Conn::Pooled(conn));
                }
                // Dropping it checks it in, and `has_broken` discards it.
            }
            if self.shared.down.load(Ordering::SeqCst) || self.r2d2.state().connections == 0 {
                // Down, or coming back while r2d2's retries are still in
                // their back-off: do not wait for them.
                return self.fresh();
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::timeout(format!(
                    "waiting {} ms for a free {side} connection",
                    self.checkout_timeout.as_millis()
                )));
            }
            if let Ok(conn) = self.r2d2.get_timeout((deadline - now).min(WAIT_SLICE))
                && !self.shared.is_stale(&conn)
            {
                return Ok(Conn::Pooled(conn));
            }
        }
    }

    /// A new connection of its own (not from the pool, not returned to it).
    ///
    /// # Errors
    /// Why the connect failed.
    pub fn fresh(&self) -> Result<Conn<C>> {
        self.shared.connect().map(Conn::Direct)
    }

    /// A connection of its own opened by `open` (say, with other settings),
    /// outside the pool and its health record.
    pub fn fresh_with(&self, open: impl FnOnce(&C) -> Result<C::Conn>) -> Result<Conn<C>> {
        Ok(Conn::Direct(Tagged {
            conn: open(&self.shared.connector)?,
            generation: self.shared.generation.load(Ordering::SeqCst),
            discarded: false,
        }))
    }

    /// Marks every connection open now as dead (the server restarted): none
    /// is handed out again.
    pub fn discard_all(&self) {
        self.shared.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Connections open now (idle or checked out).
    pub fn open_connections(&self) -> u32 {
        self.r2d2.state().connections
    }
}

/// A checked-out connection: from the pool (returned on drop) or a direct
/// one (closed on drop).
pub(crate) enum Conn<C: Connector> {
    Pooled(r2d2::PooledConnection<Manager<C>>),
    Direct(Tagged<C::Conn>),
}

impl<C: Connector> Conn<C> {
    /// Closes this connection when it is dropped, instead of returning it to
    /// the pool (a call gave up on it mid-reply).
    pub fn discard(&mut self) {
        match self {
            Conn::Pooled(conn) => conn.discarded = true,
            Conn::Direct(conn) => conn.discarded = true,
        }
    }
}

impl<C: Connector> Deref for Conn<C> {
    type Target = C::Conn;

    fn deref(&self) -> &C::Conn {
        match self {
            Conn::Pooled(conn) => &conn.conn,
            Conn::Direct(conn) => &conn.conn,
        }
    }
}

impl<C: Connector> DerefMut for Conn<C> {
    fn deref_mut(&mut self) -> &mut C::Conn {
        match self {
            Conn::Pooled(conn) => &mut conn.conn,
            Conn::Direct(conn) => &mut conn.conn,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A connector whose server can be switched off and on.
    struct Fake {
        up: AtomicBool,
        connects: AtomicUsize,
    }

    struct FakeConn {
        broken: bool,
    }

    impl Connector for Arc<Fake> {
        type Conn = FakeConn;

        fn connect(&self) -> Result<FakeConn> {
            self.connects.fetch_add(1, Ordering::SeqCst);
            if self.up.load(Ordering::SeqCst) {
                Ok(FakeConn { broken: false })
            } else {
                Err(Error::new(crate::ErrorKind::Cache, "connection refused"))
            }
        }

        fn is_broken(&self, conn: &mut FakeConn) -> bool {
            conn.broken
        }
    }

    fn fake(up: bool) -> Arc<Fake> {
        Arc::new(Fake {
            up: AtomicBool::new(up),
            connects: AtomicUsize::new(0),
        })
    }

    #[test]
    fn a_down_server_fails_a_checkout_at_once_with_its_cause() {
        let server = fake(false);
        let pool = Pool::new(Arc::clone(&server), 4, 1, Duration::from_secs(10));
        let started = Instant::now();
        let err = pool.get("cache").err().expect("server is down");
        assert!(err.to_string().contains("connection refused"), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "not the checkout timeout"
        );
        // And it comes back with the first call after the server does.
        server.up.store(true, Ordering::SeqCst);
        assert!(pool.get("cache").is_ok());
    }

    #[test]
    fn a_pool_asked_for_no_idle_connection_still_reuses_one() {
        let server = fake(true);
        let pool = Pool::new(Arc::clone(&server), 4, 0, Duration::from_secs(10));
        drop(pool.get("cache").unwrap());
        // Polled, not slept for: the pool opens its connection in the
        // background.
        let deadline = Instant::now() + Duration::from_secs(5);
        while pool.open_connections() == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(pool.open_connections(), 1, "min_idle 0 kept none open");
        for _ in 0..20 {
            drop(pool.get("cache").unwrap());
        }
        // Pooled connections, reused: r2d2 may open a spare while one is
        // checked out, never more than the pool's size (it was a connection
        // per call).
        let connects = server.connects.load(Ordering::SeqCst);
        assert!(connects <= 4 + 1, "21 calls opened {connects} connections");
        assert!((1..=4).contains(&pool.open_connections()));
    }

    #[test]
    fn discard_all_keeps_old_connections_out() {
        let server = fake(true);
        let pool = Pool::new(Arc::clone(&server), 2, 0, Duration::from_secs(10));
        let first = pool.get("cache").unwrap();
        drop(first);
        pool.discard_all();
        let before = server.connects.load(Ordering::SeqCst);
        let conn = pool.get("cache").unwrap();
        assert!(
            server.connects.load(Ordering::SeqCst) > before,
            "a new connection was opened, the old one dropped"
        );
        drop(conn);
    }
}
