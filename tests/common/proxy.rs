//! A TCP fault proxy for failure tests: it sits between a client and one
//! upstream server on loopback and makes the link pass, lag, freeze, reset
//! or refuse, on demand and on connections that are already open.
//!
//! Fault changes are synchronous: [`FaultProxy::set`] and
//! [`FaultProxy::close_all`] return only once the acceptor and both pumps of
//! every open connection have adopted the change, so a test acts on the next
//! line without sleeping and without racing the proxy's threads.
//!
//! Threads: one acceptor, plus two pumps per connection (client to upstream
//! and back). Each looks at the fault at least every [`TICK`], because every
//! socket it blocks on has a timeout of at most that long.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use socket2::{Domain, Protocol, SockRef, Socket, Type};

/// How long any proxy thread may block before it looks at the fault again.
const TICK: Duration = Duration::from_millis(5);
/// How long `set` and `close_all` wait for every thread to adopt a change;
/// reaching it means a proxy bug, not a slow machine.
const ADOPT_WITHIN: Duration = Duration::from_secs(5);
/// How long the acceptor keeps retrying to listen again after `Refuse`.
const REBIND_WITHIN: Duration = Duration::from_secs(2);
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// A pump stops reading while this much is queued for a peer that does not
/// read, so a stuck peer costs bounded memory.
const MAX_QUEUED: usize = 4 << 20;
const CHUNK: usize = 16 * 1024;

/// What the proxy does to traffic; see [`FaultProxy::set`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forwards bytes both ways unchanged.
    Pass,
    /// Forwards every chunk, in order, once it has been held this long (both
    /// directions, so a request-reply round trip takes at least twice this).
    Delay(Duration),
    /// A frozen server whose kernel still accepts and ACKs: new connections
    /// are accepted and never answered (no upstream connection is made yet);
    /// open ones read and discard what arrives in both directions. Nothing
    /// is closed. Back on `Pass` or `Delay`, open connections forward again
    /// (what was discarded is gone) and new-born ones connect upstream then.
    Blackhole,
    /// Resets every open connection with a TCP RST, and resets each new one
    /// as soon as it is accepted.
    Reset,
    /// Stops listening, so connecting fails with "connection refused", and
    /// resets every open connection. Any other fault listens again on the
    /// same port.
    Refuse,
}

/// The fault state every thread follows. Guarded by `Shared::control`.
#[derive(Clone, Copy)]
struct Control {
    /// Bumped by every change; threads publish the one they have adopted.
    generation: u64,
    fault: Fault,
    /// Bumped by `close_all`; a connection born under an older epoch resets.
    close_epoch: u64,
    shutdown: bool,
}

struct Shared {
    /// Where new connections go ([`FaultProxy::set_upstream`] moves it).
    upstream: Mutex<SocketAddr>,
    addr: SocketAddr,
    control: Mutex<Control>,
    /// The generation the acceptor has adopted.
    acceptor_seen: AtomicU64,
    /// Open connections. Its lock is never held while taking `adopted_lock`
    /// (the waiter in `await_adoption` takes them the other way round).
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    accepted: AtomicUsize,
    /// Pump threads, pushed by the acceptor and joined by `Drop`.
    pumps: Mutex<Vec<JoinHandle<()>>>,
    /// Why the acceptor could not listen again after `Refuse`; `set` panics
    /// with it.
    bind_error: Mutex<Option<String>>,
    /// Signalled whenever a thread adopts a generation or a connection ends.
    /// The mutex guards nothing; it only makes the wait free of lost wakeups.
    adopted_lock: Mutex<()>,
    adopted: Condvar,
}

/// One proxied connection's shared flags (the sockets are owned by its two
/// pumps alone, so that the last pump to drop them is what closes them).
struct Conn {
    id: u64,
    /// `Control::close_epoch` when this connection was accepted.
    close_epoch: u64,
    /// The generation each pump has adopted; `u64::MAX` once it has exited
    /// and dropped its sockets.
    seen: [AtomicU64; 2],
    /// Each direction has delivered its peer's end-of-stream.
    finished: [AtomicBool; 2],
    /// One pump is resetting the connection; the other must follow.
    aborted: AtomicBool,
    /// Pumps still running; the last one out removes the entry.
    running: AtomicUsize,
}

const TO_UPSTREAM: usize = 0;
const TO_CLIENT: usize = 1;

impl Shared {
    fn control(&self) -> Control {
        *self.control.lock()
    }

    fn change(&self, edit: impl FnOnce(&mut Control)) -> u64 {
        let mut control = self.control.lock();
        edit(&mut control);
        control.generation += 1;
        control.generation
    }

    fn publish(&self, slot: &AtomicU64, generation: u64) {
        if slot.swap(generation, Ordering::SeqCst) != generation {
            self.wake_waiters();
        }
    }

    fn wake_waiters(&self) {
        let _guard = self.adopted_lock.lock();
        self.adopted.notify_all();
    }

    fn adopted_by_all(&self, generation: u64) -> bool {
        self.acceptor_seen.load(Ordering::SeqCst) >= generation
            && self.conns.lock().values().all(|conn| {
                conn.seen
                    .iter()
                    .all(|seen| seen.load(Ordering::SeqCst) >= generation)
            })
    }

    /// Blocks until every thread has adopted `generation` (a connection that
    /// resets instead counts once both its pumps have dropped its sockets).
    fn await_adoption(&self, generation: u64) {
        let deadline = Instant::now() + ADOPT_WITHIN;
        let mut guard = self.adopted_lock.lock();
        while !self.adopted_by_all(generation) {
            if self.adopted.wait_until(&mut guard, deadline).timed_out()
                && !self.adopted_by_all(generation)
            {
                panic!("fault proxy threads did not adopt a change within {ADOPT_WITHIN:?}");
            }
        }
        drop(guard);
        if let Some(error) = self.bind_error.lock().clone() {
            panic!("fault proxy on {}: {error}", self.addr);
        }
    }
}

/// A TCP proxy from [`addr`](FaultProxy::addr) to one upstream address,
/// whose traffic a test controls with [`set`](FaultProxy::set).
///
/// Loopback only. Dropping it stops listening, resets every connection and
/// joins its threads. It is `Send + Sync`; share it by reference.
pub struct FaultProxy {
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts a proxy in [`Fault::Pass`] on a fresh 127.0.0.1 port that
    /// forwards to `upstream`, which must be a loopback address.
    ///
    /// The upstream is connected to once per accepted client, at accept
    /// time; if that fails, the client's connection is reset.
    pub fn start(upstream: SocketAddr) -> FaultProxy {
        assert!(
            upstream.ip().is_loopback(),
            "the fault proxy is for loopback only, not {upstream}"
        );
        let listener = listen(&SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("fault proxy: listen on 127.0.0.1:0");
        let addr = listener.local_addr().expect("fault proxy: local address");
        let shared = Arc::new(Shared {
            upstream: Mutex::new(upstream),
            addr,
            control: Mutex::new(Control {
                generation: 0,
                fault: Fault::Pass,
                close_epoch: 0,
                shutdown: false,
            }),
            acceptor_seen: AtomicU64::new(0),
            conns: Mutex::new(HashMap::new()),
            accepted: AtomicUsize::new(0),
            pumps: Mutex::new(Vec::new()),
            bind_error: Mutex::new(None),
            adopted_lock: Mutex::new(()),
            adopted: Condvar::new(),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name(format!("fault-proxy-accept-{}", addr.port()))
                .spawn(move || accept_loop(&shared, listener))
                .expect("spawn fault proxy acceptor")
        };
        FaultProxy {
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// The address clients connect to (127.0.0.1, fixed for the proxy's
    /// life, also across [`Fault::Refuse`]).
    /// Sends the connections accepted from now on to `upstream` (a
    /// failover behind one address); open ones keep theirs.
    pub fn set_upstream(&self, upstream: SocketAddr) {
        assert!(upstream.ip().is_loopback(), "loopback only, not {upstream}");
        *self.shared.upstream.lock() = upstream;
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// Switches to `fault`, for new and open connections alike, and returns
    /// once every proxy thread has adopted it (normally within a few ms).
    ///
    /// So after `set(Fault::Reset)` every connection is already reset, after
    /// `set(Fault::Refuse)` connecting is refused, and bytes sent after
    /// `set(Fault::Blackhole)` are discarded. Bytes sent while blackholed
    /// are gone even if `set(Fault::Pass)` follows at once. Bytes still in
    /// flight when a change is made may be handled under either fault.
    ///
    /// # Panics
    /// If the port cannot be bound again after `Refuse` (another process
    /// took it meanwhile), or if a proxy thread does not answer in 5 s.
    pub fn set(&self, fault: Fault) {
        let generation = self.shared.change(|c| c.fault = fault);
        self.shared.await_adoption(generation);
    }

    /// Resets every connection open now (including ones still waiting in
    /// the listen backlog) with a TCP RST, and returns once they are closed;
    /// the current fault stays, and later connections follow it.
    pub fn close_all(&self) {
        let generation = self.shared.change(|c| c.close_epoch += 1);
        self.shared.await_adoption(generation);
    }

    /// Connections accepted and not yet closed, including blackholed ones.
    pub fn open_connections(&self) -> usize {
        self.shared.conns.lock().len()
    }

    /// Connections accepted since start, including the ones reset at once.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.change(|c| c.shutdown = true);
        let mut panicked = false;
        if let Some(acceptor) = self.acceptor.take() {
            panicked |= acceptor.join().is_err();
        }
        // The acceptor has exited, so no pump can be added any more.
        let pumps = std::mem::take(&mut *self.shared.pumps.lock());
        for pump in pumps {
            panicked |= pump.join().is_err();
        }
        if panicked && !thread::panicking() {
            panic!("a fault proxy thread panicked");
        }
    }
}

/// Binds and listens with SO_REUSEADDR, with an accept timeout of one tick.
fn listen(addr: &SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&(*addr).into())?;
    socket.listen(128)?;
    // Linux honours SO_RCVTIMEO on accept(), so the acceptor blocks at most
    // one tick and needs no polling.
    socket.set_read_timeout(Some(TICK))?;
    Ok(socket.into())
}

/// Listens on `addr` again, retrying briefly: a port that was just closed can
/// still be bound for a moment by a forked child's copy of the descriptor.
fn listen_again(addr: &SocketAddr) -> Result<TcpListener, String> {
    let deadline = Instant::now() + REBIND_WITHIN;
    loop {
        match listen(addr) {
            Ok(listener) => return Ok(listener),
            Err(e) if Instant::now() >= deadline => {
                return Err(format!(
                    "could not listen again within {REBIND_WITHIN:?}: {e}"
                ));
            }
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Closes `listener` so that connecting is refused at once, which closing
/// alone does not ensure: a child process forked elsewhere in the test
/// binary holds a copy of every descriptor until it execs, and the socket
/// keeps listening until its last copy is closed. shutdown() acts on the
/// socket itself; it also resets the connections waiting in the backlog.
/// (The copy may keep the port bound a moment longer: see `listen_again`.)
fn stop_listening(listener: TcpListener) {
    let _ = SockRef::from(&listener).shutdown(Shutdown::Read);
}

/// Makes the socket's last close send a RST instead of a FIN. (A forked
/// child's copy of the descriptor can delay that close until it execs.)
fn reset_on_close(stream: &TcpStream) {
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

fn configure(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(TICK))?;
    stream.set_write_timeout(Some(TICK))
}

/// Accepts every connection already queued and resets it.
fn reset_backlog(listener: &TcpListener, shared: &Shared) {
    if listener.set_nonblocking(true).is_err() {
        return;
    }
    while let Ok((stream, _)) = listener.accept() {
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        reset_on_close(&stream);
    }
    let _ = listener.set_nonblocking(false);
}

fn accept_loop(shared: &Arc<Shared>, listener: TcpListener) {
    let mut listener = Some(listener);
    let mut adopted = 0;
    let mut close_epoch = 0;
    let mut next_id = 0;
    loop {
        let control = shared.control();
        if control.shutdown {
            if let Some(l) = listener.take() {
                stop_listening(l);
            }
            return;
        }
        if control.generation != adopted {
            match control.fault {
                Fault::Refuse => {
                    if let Some(l) = listener.take() {
                        stop_listening(l);
                    }
                }
                _ if listener.is_none() => match listen_again(&shared.addr) {
                    Ok(l) => listener = Some(l),
                    Err(e) => *shared.bind_error.lock() = Some(e),
                },
                _ => {}
            }
            // A client whose connect() returned before the change is open
            // from its side even if we have not accepted it yet.
            if let Some(l) = &listener
                && (control.fault == Fault::Reset || control.close_epoch != close_epoch)
            {
                reset_backlog(l, shared);
            }
            close_epoch = control.close_epoch;
            adopted = control.generation;
            shared.publish(&shared.acceptor_seen, adopted);
        }
        let Some(l) = &listener else {
            thread::sleep(TICK);
            continue;
        };
        match l.accept() {
            Ok((stream, _)) => {
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                if control.fault == Fault::Reset || configure(&stream).is_err() {
                    reset_on_close(&stream);
                    continue;
                }
                next_id += 1;
                spawn_pumps(shared, stream, next_id, control.close_epoch);
            }
            Err(e) if is_timeout(&e) => {}
            // ECONNABORTED, EMFILE and the like: nothing to do but go on.
            Err(_) => thread::sleep(TICK),
        }
    }
}

fn spawn_pumps(shared: &Arc<Shared>, client: TcpStream, id: u64, close_epoch: u64) {
    let conn = Arc::new(Conn {
        id,
        close_epoch,
        seen: [AtomicU64::new(0), AtomicU64::new(0)],
        finished: [AtomicBool::new(false), AtomicBool::new(false)],
        aborted: AtomicBool::new(false),
        running: AtomicUsize::new(2),
    });
    shared.conns.lock().insert(id, Arc::clone(&conn));
    let client = Arc::new(client);
    let (handoff, upstream) = mpsc::channel();
    let pumps = [
        Pump::new(
            shared,
            &conn,
            TO_UPSTREAM,
            Some(client.clone()),
            None,
            Link::Hand(handoff),
        ),
        Pump::new(
            shared,
            &conn,
            TO_CLIENT,
            None,
            Some(client),
            Link::Wait(upstream),
        ),
    ];
    let mut handles = shared.pumps.lock();
    handles.retain(|h| !h.is_finished());
    for pump in pumps {
        let name = format!("fault-proxy-{}-{id}-{}", shared.addr.port(), pump.dir);
        handles.push(
            thread::Builder::new()
                .name(name)
                .spawn(move || pump.run())
                .expect("spawn fault proxy pump"),
        );
    }
}

/// How the upstream socket, connected by the client-to-upstream pump, gets
/// to the other pump.
enum Link {
    Hand(Sender<Arc<TcpStream>>),
    Wait(Receiver<Arc<TcpStream>>),
    None,
}

/// One direction of one connection: reads `from`, queues, writes `to`.
struct Pump {
    shared: Arc<Shared>,
    conn: Arc<Conn>,
    dir: usize,
    from: Option<Arc<TcpStream>>,
    to: Option<Arc<TcpStream>>,
    link: Link,
    /// Chunks read and not yet written, with the time each arrived.
    queue: VecDeque<(Instant, Vec<u8>)>,
    queued: usize,
    /// When `from` reached end-of-stream; `to` is shut down for writing once
    /// the queue before it is delivered.
    eof_at: Option<Instant>,
    /// The fault this pump last adopted.
    fault: Fault,
}

impl Pump {
    fn new(
        shared: &Arc<Shared>,
        conn: &Arc<Conn>,
        dir: usize,
        from: Option<Arc<TcpStream>>,
        to: Option<Arc<TcpStream>>,
        link: Link,
    ) -> Pump {
        Pump {
            shared: Arc::clone(shared),
            conn: Arc::clone(conn),
            dir,
            from,
            to,
            link,
            queue: VecDeque::new(),
            queued: 0,
            eof_at: None,
            fault: Fault::Pass,
        }
    }

    fn run(mut self) {
        let graceful = self.pump();
        if !graceful {
            self.conn.aborted.store(true, Ordering::SeqCst);
            for stream in [&self.from, &self.to].into_iter().flatten() {
                reset_on_close(stream);
            }
        }
        // Drop our handles before saying we are done: the connection counts
        // as closed only once both pumps' handles are gone.
        self.from = None;
        self.to = None;
        self.link = Link::None;
        // The last pump out removes the entry before it marks itself done,
        // so a waiter never sees a finished connection still counted open.
        if self.conn.running.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.shared.conns.lock().remove(&self.conn.id);
        }
        self.conn.seen[self.dir].store(u64::MAX, Ordering::SeqCst);
        self.shared.wake_waiters();
    }

    /// Runs until the connection ends: `true` when both directions finished
    /// cleanly, `false` when it must be reset.
    fn pump(&mut self) -> bool {
        let mut buf = vec![0; CHUNK];
        loop {
            let control = self.shared.control();
            if control.shutdown
                || control.close_epoch != self.conn.close_epoch
                || self.conn.aborted.load(Ordering::SeqCst)
                || matches!(control.fault, Fault::Reset | Fault::Refuse)
            {
                return false;
            }
            let leaving_blackhole =
                self.fault == Fault::Blackhole && control.fault != Fault::Blackhole;
            self.fault = control.fault;
            let delay = match control.fault {
                Fault::Pass => Some(Duration::ZERO),
                Fault::Delay(d) => Some(d),
                _ => None,
            };
            match delay {
                None => {
                    self.queue.clear();
                    self.queued = 0;
                }
                Some(delay) => {
                    // Bytes that arrived while blackholed were sent before
                    // this change returned to its caller: they are gone.
                    if leaving_blackhole && !self.discard_pending() {
                        return false;
                    }
                    if !self.connect_upstream() || !self.deliver(delay) {
                        return false;
                    }
                }
            }
            if self.conn.finished.iter().all(|f| f.load(Ordering::SeqCst)) {
                return true;
            }
            self.shared
                .publish(&self.conn.seen[self.dir], control.generation);
            if !self.read_or_wait(delay, &mut buf) {
                return false;
            }
        }
    }

    /// Connects upstream on the client-to-upstream pump, once; `false` if
    /// the upstream cannot be reached.
    fn connect_upstream(&mut self) -> bool {
        if self.to.is_some() {
            return true;
        }
        let Link::Hand(handoff) = &self.link else {
            return true;
        };
        let upstream = *self.shared.upstream.lock();
        let connected = TcpStream::connect_timeout(&upstream, UPSTREAM_CONNECT_TIMEOUT)
            .and_then(|s| configure(&s).map(|()| Arc::new(s)));
        match connected {
            Ok(upstream) => {
                // The other pump only goes away after an abort, which this
                // pump notices on its next tick.
                let _ = handoff.send(Arc::clone(&upstream));
                self.to = Some(upstream);
                true
            }
            Err(_) => false,
        }
    }

    /// Reads and drops whatever is already readable, without waiting.
    fn discard_pending(&mut self) -> bool {
        let Some(from) = self.from.clone() else {
            return true;
        };
        if self.eof_at.is_some() || from.set_nonblocking(true).is_err() {
            return true;
        }
        let mut buf = [0; CHUNK];
        let ok = loop {
            match (&*from).read(&mut buf) {
                Ok(0) => {
                    self.eof_at = Some(Instant::now());
                    break true;
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break false,
            }
        };
        // Both pumps use this socket; the other one's writes saw WouldBlock
        // meanwhile, which it treats like its write timeout.
        ok && from.set_nonblocking(false).is_ok()
    }

    /// Writes every queued chunk that has been held `delay`, then passes on
    /// end-of-stream; `false` if the peer is gone.
    fn deliver(&mut self, delay: Duration) -> bool {
        let Some(to) = self.to.clone() else {
            return true;
        };
        let now = Instant::now();
        while let Some((at, chunk)) = self.queue.front_mut() {
            if *at + delay > now {
                return true;
            }
            match (&*to).write(chunk) {
                Ok(0) => return false,
                Ok(n) => {
                    self.queued -= n;
                    if n == chunk.len() {
                        self.queue.pop_front();
                    } else {
                        chunk.drain(..n);
                    }
                }
                // The peer is not reading: try again on the next tick.
                Err(e) if is_timeout(&e) => return true,
                Err(_) => return false,
            }
        }
        if let Some(at) = self.eof_at
            && at + delay <= now
            && !self.conn.finished[self.dir].load(Ordering::SeqCst)
        {
            if to.shutdown(Shutdown::Write).is_err() {
                return false;
            }
            self.conn.finished[self.dir].store(true, Ordering::SeqCst);
        }
        true
    }

    /// Waits up to a tick (less if a delayed chunk falls due sooner) for
    /// bytes from `from`; `false` if the peer reset.
    fn read_or_wait(&mut self, delay: Option<Duration>, buf: &mut [u8]) -> bool {
        let now = Instant::now();
        let wait = match (delay, self.queue.front()) {
            (Some(delay), Some((at, _))) => (*at + delay).saturating_duration_since(now),
            _ => TICK,
        }
        .clamp(Duration::from_millis(1), TICK);
        if self.from.is_none()
            && let Link::Wait(upstream) = &self.link
        {
            match upstream.recv_timeout(wait) {
                Ok(stream) => self.from = Some(stream),
                Err(RecvTimeoutError::Timeout) => {}
                // The other pump exited without connecting: it aborted.
                Err(RecvTimeoutError::Disconnected) => return false,
            }
            return true;
        }
        let Some(from) = self.from.clone() else {
            thread::sleep(wait);
            return true;
        };
        if self.eof_at.is_some() || self.queued >= MAX_QUEUED {
            thread::sleep(wait);
            return true;
        }
        if from.set_read_timeout(Some(wait)).is_err() {
            return false;
        }
        match (&*from).read(buf) {
            Ok(0) => self.eof_at = Some(Instant::now()),
            // Read while blackholed: discarded at once, so a switch back to
            // Pass cannot forward it.
            Ok(_) if self.fault == Fault::Blackhole => {}
            Ok(n) => {
                self.queue.push_back((Instant::now(), buf[..n].to_vec()));
                self.queued += n;
            }
            Err(e) if is_timeout(&e) => {}
            Err(_) => return false,
        }
        true
    }
}
