//! The fault-injection helpers in `tests/common` do what failure tests rely
//! on: each proxy fault against a hand-held upstream socket and against a
//! private Redis, and the private servers' kill, restart, freeze and stop.

mod common;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use common::proxy::{Fault, FaultProxy};
use common::servers::{PrivatePostgres, PrivateRedis, free_port};

/// A bound for what must happen; only a broken helper reaches it.
const WAIT: Duration = Duration::from_secs(5);
/// How long silence must last to count as "never answered".
const SILENCE: Duration = Duration::from_millis(200);
const DELAY: Duration = Duration::from_millis(100);

/// A listener the test accepts on itself, so it holds the upstream end of
/// every proxied connection and sees exactly what reaches the server.
fn upstream() -> TcpListener {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    listener
}

fn addr_of(listener: &TcpListener) -> SocketAddr {
    listener.local_addr().unwrap()
}

fn with_timeouts(stream: TcpStream) -> TcpStream {
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.set_write_timeout(Some(WAIT)).unwrap();
    stream
}

/// The next connection the proxy makes to `listener`, if one comes in `within`.
fn accept_within(listener: &TcpListener, within: Duration) -> Option<TcpStream> {
    let deadline = Instant::now() + within;
    loop {
        match listener.accept() {
            Ok((stream, _)) => return Some(with_timeouts(stream)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("accept: {e}"),
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(2));
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    with_timeouts(TcpStream::connect(addr).unwrap())
}

/// A client connected through `proxy` (which must pass traffic) and the
/// server end it reached, checked to be the same connection by a token.
fn link(proxy: &FaultProxy, listener: &TcpListener) -> (TcpStream, TcpStream) {
    let mut client = connect(proxy.addr());
    let mut server = accept_within(listener, WAIT).expect("the proxy connects upstream on accept");
    let token = fastrand::u64(..).to_le_bytes();
    client.write_all(&token).unwrap();
    assert_eq!(
        read_n(&mut server, token.len()),
        token,
        "the upstream connection is the client's (peer {:?})",
        server.peer_addr()
    );
    (client, server)
}

fn read_n(stream: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    stream.read_exact(&mut buf).unwrap();
    buf
}

/// Asserts nothing arrives on `stream` for [`SILENCE`]: no byte, no EOF, no reset.
fn assert_silent(stream: &mut TcpStream, what: &str) {
    let deadline = Instant::now() + SILENCE;
    let mut byte = [0];
    // A read with a timeout can end early with EINTR, which is not an
    // answer: keep listening until the whole interval has passed.
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        if left.is_zero() {
            break;
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut byte) {
            Err(e) if is_timeout(&e) => {}
            other => panic!("{what}: expected silence, got {other:?}"),
        }
    }
    stream.set_read_timeout(Some(WAIT)).unwrap();
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// One read of up to one byte, retried when EINTR cuts it short.
fn read_once(stream: &mut TcpStream) -> io::Result<usize> {
    loop {
        match stream.read(&mut [0]) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            result => return result,
        }
    }
}

/// Asserts the next read on `stream` fails because the peer sent a RST.
fn assert_reset(stream: &mut TcpStream, what: &str) {
    match read_once(stream) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        other => panic!("{what}: expected a connection reset, got {other:?}"),
    }
}

fn assert_refused(addr: SocketAddr, what: &str) {
    match TcpStream::connect(addr) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
        other => panic!("{what}: expected connection refused, got {other:?}"),
    }
}

/// Sends PING and reads the reply, in raw RESP.
fn ping(stream: &mut TcpStream) -> Vec<u8> {
    stream.write_all(b"PING\r\n").unwrap();
    read_n(stream, 7)
}

/// Waits for `done` to hold, failing the test after [`WAIT`].
fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn pass_forwards_bytes_unchanged_and_closes_cleanly() {
    let listener = upstream();
    let proxy = FaultProxy::start(addr_of(&listener));
    let (mut client, mut server) = link(&proxy, &listener);
    assert_eq!((proxy.accepted(), proxy.open_connections()), (1, 1));

    // More than socket buffers hold, so the pumps' partial writes count.
    let up: Vec<u8> = (0..300_000).map(|_| fastrand::u8(..)).collect();
    let down: Vec<u8> = (0..300_000).map(|_| fastrand::u8(..)).collect();
    thread::scope(|s| {
        s.spawn(|| client.write_all(&up).unwrap());
        assert_eq!(read_n(&mut server, up.len()), up, "client to server");
    });
    thread::scope(|s| {
        s.spawn(|| server.write_all(&down).unwrap());
        assert_eq!(read_n(&mut client, down.len()), down, "server to client");
    });

    // A close on either side reaches the other as end-of-stream, not a reset.
    drop(client);
    assert_eq!(
        read_once(&mut server).unwrap(),
        0,
        "the client's FIN is passed on"
    );
    drop(server);
    eventually("the connection is gone", || proxy.open_connections() == 0);
    assert_eq!(proxy.accepted(), 1);
}

#[test]
fn pass_serves_redis() {
    let redis = PrivateRedis::start();
    let proxy = FaultProxy::start(redis.addr());
    let client = redis::Client::open(format!("redis://{}/", proxy.addr())).unwrap();
    let mut conn = client.get_connection_with_timeout(WAIT).unwrap();
    redis::cmd("SET")
        .arg("through")
        .arg("proxy")
        .query::<()>(&mut conn)
        .unwrap();
    assert_eq!(
        redis.command(&["GET", "through"]),
        "proxy",
        "it reached our server"
    );
    let got: String = redis::cmd("GET").arg("through").query(&mut conn).unwrap();
    assert_eq!(got, "proxy");
}

#[test]
fn delay_holds_every_chunk_in_order_both_ways() {
    let listener = upstream();
    let proxy = FaultProxy::start(addr_of(&listener));
    let (mut client, mut server) = link(&proxy, &listener);
    proxy.set(Fault::Delay(DELAY));

    let sent = Instant::now();
    for chunk in [&b"one "[..], b"two ", b"three"] {
        client.write_all(chunk).unwrap();
    }
    assert_eq!(read_n(&mut server, 13), b"one two three");
    assert!(
        sent.elapsed() >= DELAY,
        "upstream after {:?}",
        sent.elapsed()
    );

    let sent = Instant::now();
    server.write_all(b"back").unwrap();
    assert_eq!(read_n(&mut client, 4), b"back");
    assert!(
        sent.elapsed() >= DELAY,
        "downstream after {:?}",
        sent.elapsed()
    );

    // A Redis round trip crosses the proxy twice.
    let redis = PrivateRedis::start();
    let proxy = FaultProxy::start(redis.addr());
    let mut conn = connect(proxy.addr());
    assert_eq!(ping(&mut conn), b"+PONG\r\n");
    proxy.set(Fault::Delay(DELAY));
    let sent = Instant::now();
    assert_eq!(ping(&mut conn), b"+PONG\r\n");
    let delayed = sent.elapsed();
    assert!(delayed >= 2 * DELAY, "round trip took {delayed:?}");

    proxy.set(Fault::Pass);
    let sent = Instant::now();
    assert_eq!(ping(&mut conn), b"+PONG\r\n");
    assert!(
        sent.elapsed() < 2 * DELAY,
        "Pass lifts the delay: {:?}",
        sent.elapsed()
    );
}

#[test]
fn blackhole_accepts_and_never_answers_until_pass() {
    let listener = upstream();
    let proxy = FaultProxy::start(addr_of(&listener));
    let (mut client, mut server) = link(&proxy, &listener);
    proxy.set(Fault::Blackhole);

    client.write_all(b"lost up").unwrap();
    assert_silent(&mut server, "open connection, client to server");
    server.write_all(b"lost down").unwrap();
    assert_silent(&mut client, "open connection, server to client");

    let mut newborn = connect(proxy.addr());
    newborn.write_all(b"lost too").unwrap();
    assert_silent(&mut newborn, "new connection");
    assert!(
        accept_within(&listener, SILENCE).is_none(),
        "a blackholed connection does not reach upstream"
    );
    assert_eq!(
        (proxy.accepted(), proxy.open_connections()),
        (2, 2),
        "nothing is closed"
    );

    // What was sent while blackholed is gone; what follows Pass flows.
    proxy.set(Fault::Pass);
    client.write_all(b"up").unwrap();
    assert_eq!(read_n(&mut server, 2), b"up");
    server.write_all(b"down").unwrap();
    assert_eq!(read_n(&mut client, 4), b"down");
    // The connection born in the blackhole connects upstream now.
    let mut late_server = accept_within(&listener, WAIT).expect("connects upstream on Pass");
    newborn.write_all(b"hello").unwrap();
    assert_eq!(read_n(&mut late_server, 5), b"hello");
    assert_silent(&mut server, "no discarded byte arrives late");
    assert_silent(&mut client, "no discarded byte arrives late");
}

#[test]
fn blackhole_freezes_redis_and_pass_thaws_it() {
    let redis = PrivateRedis::start();
    let proxy = FaultProxy::start(redis.addr());
    let mut conn = connect(proxy.addr());
    assert_eq!(ping(&mut conn), b"+PONG\r\n");

    proxy.set(Fault::Blackhole);
    conn.write_all(b"PING\r\n").unwrap();
    assert_silent(&mut conn, "PING while blackholed");
    let mut newborn = connect(proxy.addr());
    newborn.write_all(b"PING\r\n").unwrap();
    assert_silent(&mut newborn, "PING on a new connection");

    proxy.set(Fault::Pass);
    assert_eq!(ping(&mut conn), b"+PONG\r\n");
    assert_eq!(ping(&mut newborn), b"+PONG\r\n");
    // Exactly one reply each: the blackholed PINGs never reached Redis.
    assert_silent(&mut conn, "no reply to a discarded PING");
    assert_silent(&mut newborn, "no reply to a discarded PING");
}

#[test]
fn reset_resets_open_and_new_connections() {
    let listener = upstream();
    let proxy = FaultProxy::start(addr_of(&listener));
    let (mut client, mut server) = link(&proxy, &listener);
    client.write_all(b"x").unwrap();
    assert_eq!(read_n(&mut server, 1), b"x");

    proxy.set(Fault::Reset);
    assert_eq!(proxy.open_connections(), 0);
    assert_reset(&mut client, "open connection, client side");
    assert_reset(&mut server, "open connection, upstream side");

    let mut newborn = connect(proxy.addr());
    assert_reset(&mut newborn, "new connection");
    assert_eq!(proxy.accepted(), 2, "the new one was accepted, then reset");
    assert!(
        accept_within(&listener, SILENCE).is_none(),
        "and never went upstream"
    );

    proxy.set(Fault::Pass);
    let (mut client, mut server) = link(&proxy, &listener);
    client.write_all(b"again").unwrap();
    assert_eq!(read_n(&mut server, 5), b"again");
}

#[test]
fn close_all_resets_open_connections_and_keeps_the_fault() {
    let redis = PrivateRedis::start();
    let proxy = FaultProxy::start(redis.addr());
    let mut first = connect(proxy.addr());
    let mut second = connect(proxy.addr());
    assert_eq!(ping(&mut first), b"+PONG\r\n");
    assert_eq!(ping(&mut second), b"+PONG\r\n");

    proxy.close_all();
    assert_eq!(proxy.open_connections(), 0);
    assert_reset(&mut first, "first");
    assert_reset(&mut second, "second");
    let mut after = connect(proxy.addr());
    assert_eq!(ping(&mut after), b"+PONG\r\n", "still Pass");

    proxy.set(Fault::Blackhole);
    proxy.close_all();
    assert_reset(&mut after, "reset while blackholed");
    let mut frozen = connect(proxy.addr());
    frozen.write_all(b"PING\r\n").unwrap();
    assert_silent(&mut frozen, "still Blackhole");
}

#[test]
fn refuse_refuses_then_listens_again_on_the_same_port() {
    let redis = PrivateRedis::start();
    let proxy = FaultProxy::start(redis.addr());
    let mut open = connect(proxy.addr());
    assert_eq!(ping(&mut open), b"+PONG\r\n");

    proxy.set(Fault::Refuse);
    assert_reset(&mut open, "open connection");
    assert_refused(proxy.addr(), "while refusing");
    assert_refused(proxy.addr(), "still, a second time");

    proxy.set(Fault::Pass);
    let mut conn = connect(proxy.addr());
    assert_eq!(ping(&mut conn), b"+PONG\r\n");
    assert_eq!(proxy.accepted(), 2, "refused connects were never accepted");
}

#[test]
fn unreachable_upstream_resets_the_client() {
    let mut redis = PrivateRedis::start();
    let proxy = FaultProxy::start(redis.addr());
    redis.kill();
    let mut conn = connect(proxy.addr());
    assert_reset(&mut conn, "upstream refused");

    redis.restart();
    let mut conn = connect(proxy.addr());
    assert_eq!(ping(&mut conn), b"+PONG\r\n");
}

#[test]
fn dropping_the_proxy_closes_everything() {
    let listener = upstream();
    let proxy = FaultProxy::start(addr_of(&listener));
    let addr = proxy.addr();
    let (mut client, mut server) = link(&proxy, &listener);
    proxy.set(Fault::Blackhole);
    let mut frozen = connect(addr);
    eventually("both accepted", || proxy.open_connections() == 2);

    drop(proxy);
    assert_reset(&mut client, "client");
    assert_reset(&mut server, "server");
    assert_reset(&mut frozen, "blackholed client");
    assert_refused(addr, "after drop");
}

#[test]
fn private_redis_freezes_thaws_dies_and_restarts() {
    let mut redis = PrivateRedis::start();
    let port = redis.port();
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{port}/"));
    assert_eq!(redis.command(&["SET", "k", "v"]), "OK");
    let mut conn = connect(redis.addr());
    assert_eq!(ping(&mut conn), b"+PONG\r\n");

    redis.freeze();
    conn.write_all(b"PING\r\n").unwrap();
    assert_silent(&mut conn, "frozen redis");
    // The kernel still completes handshakes for a stopped process.
    let mut late = connect(redis.addr());
    late.write_all(b"PING\r\n").unwrap();
    redis.thaw();
    assert_eq!(
        read_n(&mut conn, 7),
        b"+PONG\r\n",
        "answers what it got frozen"
    );
    assert_eq!(read_n(&mut late, 7), b"+PONG\r\n");

    let pid = redis.pid().unwrap();
    redis.kill();
    assert!(!process_exists(pid), "killed and reaped");
    assert_eq!(redis.pid(), None);
    assert_refused(redis.addr(), "killed redis");
    match read_once(&mut conn) {
        Ok(0) => {}
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        other => panic!("a killed server's clients are cut off, got {other:?}"),
    }

    redis.restart();
    assert_eq!(redis.port(), port);
    assert_eq!(redis.command(&["GET", "k"]), "", "no persistence");
    assert_eq!(ping(&mut connect(redis.addr())), b"+PONG\r\n");

    let pid = redis.pid().unwrap();
    drop(redis);
    assert!(!process_exists(pid), "drop kills it");
}

#[test]
fn private_postgres_stops_crashes_and_starts_again() {
    let mut pg = PrivatePostgres::start();
    assert_eq!(
        pg.url(),
        format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port())
    );
    let connect_pg = |pg: &PrivatePostgres| {
        let mut config = cacheaside::Config::from_env();
        config.database_url = pg.url();
        config.pool_min_idle = 0;
        cacheaside::Db::connect(&config)
    };
    let client = connect_pg(&pg).unwrap();
    client
        .batch_execute("CREATE TABLE t (v int); INSERT INTO t VALUES (42)")
        .unwrap();
    let read = |client: &cacheaside::Db| -> i32 {
        client
            .query_opt("SELECT v FROM t", &[])
            .unwrap()
            .unwrap()
            .get(0)
    };

    pg.stop();
    assert_eq!(pg.pid(), None);
    assert_refused(pg.addr(), "stopped");
    assert!(
        client.query_opt("SELECT 1", &[]).is_err(),
        "old sessions are gone"
    );

    pg.start_again();
    assert_eq!(
        read(&connect_pg(&pg).unwrap()),
        42,
        "after an immediate stop"
    );

    let pid = pg.pid().unwrap();
    pg.kill();
    assert!(!process_exists(pid), "killed and reaped");
    assert_refused(pg.addr(), "killed");
    pg.start_again();
    assert_eq!(read(&connect_pg(&pg).unwrap()), 42, "after a crash");

    let pid = pg.pid().unwrap();
    drop(pg);
    assert!(!process_exists(pid), "drop stops it");
}

#[test]
fn free_port_is_bindable() {
    let port = free_port();
    assert_ne!(port, 0);
    TcpListener::bind(("127.0.0.1", port)).expect("the port is free");
}
