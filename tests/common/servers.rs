//! Private Redis and PostgreSQL servers that one test owns and may kill,
//! freeze and restart. The shared servers on 6379 and 5432 are never touched.
//!
//! Every process here is a direct child of the test (signalled and reaped by
//! its own pid, never by name), so a kill is over when the call returns; the
//! server and its temp dir go away on `Drop`, also when the test panics.

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// How long a server may take to answer after it was started.
const START_WITHIN: Duration = Duration::from_secs(10);
/// How long a killed or stopped server's processes may take to disappear.
const GONE_WITHIN: Duration = Duration::from_secs(10);
/// Attempts, each on a fresh port, when another process takes ours first.
const PORT_ATTEMPTS: usize = 3;

/// A 127.0.0.1 port that was free a moment ago (bound to port 0, read and
/// released); another process may still take it before the caller binds it.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A fresh directory under the system temp dir, named for this test process.
fn temp_dir(label: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(super::unique(&format!("cacheaside-{label}")));
    fs::create_dir(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}

/// Opens `path` for appending, for a child's stdout and stderr.
fn log_file(path: &Path) -> (Stdio, Stdio) {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let err = file.try_clone().expect("clone log file handle");
    (file.into(), err.into())
}

fn read_log(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| format!("(no log at {}: {e})", path.display()))
}

/// Sends `signal` (a name such as `STOP`) to `pid` with the `kill` command.
fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// The state letter of `/proc/<pid>/stat` (`R`, `S`, `T`, `Z`, ...), or
/// `None` once the process is gone.
fn process_state(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name in parentheses may contain spaces; the state follows it.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.trim_start().chars().next()
}

/// Polls `done` until it holds or `within` has passed; returns whether it held.
fn wait_for(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Kills `child` with SIGKILL by its pid (even when it is stopped) and reaps it.
fn kill_child(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// A redis-server of our own on a free port: no persistence, output logged
/// to a temp dir, killed and removed on `Drop`.
///
/// For kill, restart and freeze tests; set it up with [`command`](Self::command).
pub struct PrivateRedis {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// More `redis-server` arguments (say, `--cluster-enabled yes`).
    extra: Vec<String>,
    /// A config file to pass first (a sentinel needs one it can rewrite).
    conf: Option<PathBuf>,
}

impl PrivateRedis {
    /// Starts a server and returns once it answers PING.
    ///
    /// # Panics
    /// With the server's log, if it does not answer within 10 s.
    pub fn start() -> PrivateRedis {
        PrivateRedis::start_with(&[])
    }

    /// As [`start`](Self::start), with more `redis-server` arguments.
    pub fn start_with(extra: &[&str]) -> PrivateRedis {
        PrivateRedis::start_in(temp_dir("redis"), None, extra)
    }

    /// A Redis Sentinel (`redis-server <conf> --sentinel`) watching the
    /// master `name` at 127.0.0.1:`master_port` with a quorum of 2, which
    /// it takes for down after `down_after` of silence.
    pub fn start_sentinel(name: &str, master_port: u16, down_after: Duration) -> PrivateRedis {
        let dir = temp_dir("sentinel");
        let conf = dir.join("sentinel.conf");
        let ms = down_after.as_millis();
        fs::write(
            &conf,
            format!(
                "sentinel monitor {name} 127.0.0.1 {master_port} 2\n\
                 sentinel down-after-milliseconds {name} {ms}\n\
                 sentinel failover-timeout {name} {}\n",
                ms * 4
            ),
        )
        .expect("write sentinel.conf");
        PrivateRedis::start_in(dir, Some(conf), &["--sentinel"])
    }

    fn start_in(dir: PathBuf, conf: Option<PathBuf>, extra: &[&str]) -> PrivateRedis {
        let mut redis = PrivateRedis {
            port: 0,
            dir,
            child: None,
            extra: extra.iter().map(|a| a.to_string()).collect(),
            conf,
        };
        let mut failure = String::new();
        for _ in 0..PORT_ATTEMPTS {
            redis.port = free_port();
            match redis.launch() {
                Ok(()) => return redis,
                Err(log) if log.contains("Address already in use") => failure = log,
                Err(log) => panic!("redis-server did not start:\n{log}"),
            }
        }
        panic!("redis-server found no free port:\n{failure}")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("redis.log")
    }

    /// Spawns the server on `self.port` and waits until it is ours and up.
    fn launch(&mut self) -> Result<(), String> {
        let (stdout, stderr) = log_file(&self.log_path());
        let child = Command::new("redis-server")
            .args(&self.conf)
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--dir"])
            .arg(&self.dir)
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("spawn redis-server: {e}"))?;
        let pid = child.id();
        let child = self.child.insert(child);
        let addr = loopback(self.port);
        let mut exited = None;
        let up = wait_for(START_WITHIN, || {
            if let Ok(Some(status)) = child.try_wait() {
                exited = Some(status);
                return true;
            }
            is_redis_with_pid(addr, pid)
        });
        match (up, exited) {
            (true, None) => Ok(()),
            (_, exited) => {
                kill_child(child);
                self.child = None;
                Err(format!(
                    "(port {}, exit {exited:?})\n{}",
                    self.port,
                    read_log(&self.log_path())
                ))
            }
        }
    }

    /// The server's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's address, 127.0.0.1 and [`port`](Self::port).
    pub fn addr(&self) -> SocketAddr {
        loopback(self.port)
    }

    /// `redis://127.0.0.1:<port>/`, for `redis::Client::open` or a `Config`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The server's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server with SIGKILL and returns once it is reaped, so its
    /// port refuses connections; it keeps no data. No-op if not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_child(&mut child);
        }
    }

    /// Starts the server again on the same port (killing it first if it
    /// still runs) and returns once it answers PING; it starts empty.
    ///
    /// # Panics
    /// With the log, if it does not come up in 10 s (for one, if another
    /// process took the port while it was down).
    pub fn restart(&mut self) {
        self.kill();
        if let Err(log) = self.launch() {
            panic!("redis-server did not restart:\n{log}");
        }
    }

    /// Stops the server with SIGSTOP and returns once it is stopped: its
    /// kernel still accepts connections and buffers requests, nothing
    /// answers until [`thaw`](Self::thaw).
    ///
    /// # Panics
    /// If the server is not running.
    pub fn freeze(&self) {
        let pid = self.pid().expect("freeze: redis is not running");
        // kill(1) returns before the signal is acted on; wait until it is.
        signal(pid, "STOP");
        assert!(
            wait_for(GONE_WITHIN, || process_state(pid) == Some('T')),
            "redis {pid} did not stop"
        );
    }

    /// Resumes a frozen server with SIGCONT; it then answers what was
    /// buffered meanwhile.
    ///
    /// # Panics
    /// If the server is not running.
    pub fn thaw(&self) {
        let pid = self.pid().expect("thaw: redis is not running");
        signal(pid, "CONT");
        assert!(
            wait_for(GONE_WITHIN, || process_state(pid) != Some('T')),
            "redis {pid} did not resume"
        );
    }

    /// Runs `redis-cli -p <port> <args>` and returns its output, trimmed
    /// (an error reply comes back as text such as `ERR ...`, not a panic).
    ///
    /// For test setup, e.g. `command(&["CONFIG", "SET", "maxmemory", "1mb"])`.
    /// Blocks while the server is frozen.
    ///
    /// # Panics
    /// If redis-cli cannot run or exits non-zero.
    pub fn command(&self, args: &[&str]) -> String {
        let output = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli");
        assert!(
            output.status.success(),
            "redis-cli {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A certificate authority and a server certificate for 127.0.0.1, made
/// with `openssl` in a temp dir of their own (removed on `Drop`).
pub struct TestCerts {
    dir: PathBuf,
}

impl TestCerts {
    /// Makes `ca.pem` (a self-signed CA) and `server.pem` / `server.key`
    /// (signed by it, for IP 127.0.0.1).
    ///
    /// # Panics
    /// With openssl's output, if a step fails.
    pub fn new() -> TestCerts {
        let certs = TestCerts {
            dir: temp_dir("certs"),
        };
        fs::write(certs.dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n")
            .expect("write san.ext");
        let steps: [&[&str]; 3] = [
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=cacheaside test CA",
            ],
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=127.0.0.1",
            ],
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.pem",
                "-days",
                "2",
                "-extfile",
                "san.ext",
            ],
        ];
        for args in steps {
            let output = Command::new("openssl")
                .args(args)
                .current_dir(&certs.dir)
                .stdin(Stdio::null())
                .output()
                .expect("run openssl");
            assert!(
                output.status.success(),
                "openssl {args:?} failed:\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        certs
    }

    /// The CA's certificate, for `Config::redis_ca_file`.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The server's certificate and key.
    pub fn server(&self) -> (PathBuf, PathBuf) {
        (self.dir.join("server.pem"), self.dir.join("server.key"))
    }

    /// `redis-server` arguments that add a TLS port (clients need no
    /// certificate of their own).
    pub fn redis_args(&self, tls_port: u16) -> Vec<String> {
        let path = |name: &str| self.dir.join(name).display().to_string();
        vec![
            "--tls-port".into(),
            tls_port.to_string(),
            "--tls-cert-file".into(),
            path("server.pem"),
            "--tls-key-file".into(),
            path("server.key"),
            "--tls-ca-cert-file".into(),
            path("ca.pem"),
            "--tls-auth-clients".into(),
            "no".into(),
        ]
    }
}

impl Drop for TestCerts {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of our own: three masters (no replicas, or one each
/// with [`start_with_replicas`](Self::start_with_replicas)) on free loopback
/// ports, each a [`PrivateRedis`] started with `--cluster-enabled yes`,
/// joined with `redis-cli --cluster create`; killed and removed on `Drop`.
/// Its nodes are ours alone, so a test may `FLUSHALL` them.
pub struct PrivateCluster {
    pub nodes: Vec<PrivateRedis>,
}

impl PrivateCluster {
    /// Starts three nodes, creates the cluster and returns once every node
    /// reports `cluster_state:ok` and knows every slot's master.
    ///
    /// # Panics
    /// With redis-cli's output, if the cluster does not form within 10 s.
    pub fn start() -> PrivateCluster {
        PrivateCluster::launch(0)
    }

    /// As [`start`](Self::start), with one replica per master (six nodes,
    /// `--cluster-replicas 1`): returns once every replica's link to its
    /// master is up, so a failover test can kill a master and promote its
    /// replica ([`replica_of`](Self::replica_of), [`take_over`](Self::take_over)).
    pub fn start_with_replicas() -> PrivateCluster {
        PrivateCluster::launch(1)
    }

    fn launch(replicas: usize) -> PrivateCluster {
        let nodes: Vec<PrivateRedis> = (0..3 * (1 + replicas))
            .map(|_| {
                PrivateRedis::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "5000",
                    // A replica's first sync starts at once, not after the
                    // default 5 s wait for more replicas to join it.
                    "--repl-diskless-sync-delay",
                    "0",
                ])
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let output = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let cluster = PrivateCluster { nodes };
        let formed = wait_for(START_WITHIN, || {
            cluster.nodes.iter().all(|n| {
                let info = n.command(&["INFO", "REPLICATION"]);
                n.command(&["CLUSTER", "INFO"]).contains("cluster_state:ok")
                    && n.command(&["CLUSTER", "SHARDS"]).matches("master").count() == 3
                    && (info.contains("role:master") || info.contains("master_link_status:up"))
            })
        });
        assert!(
            formed,
            "the cluster did not form: {}",
            cluster.nodes[0].command(&["CLUSTER", "INFO"])
        );
        cluster
    }

    /// The `redis_url` for a `Config`: every node, separated by commas.
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port()))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The nodes still running.
    fn alive(&self) -> impl Iterator<Item = &PrivateRedis> {
        self.nodes.iter().filter(|n| n.pid().is_some())
    }

    /// The replica of `master` (a cluster from
    /// [`start_with_replicas`](Self::start_with_replicas)).
    pub fn replica_of(&self, master: &PrivateRedis) -> &PrivateRedis {
        let id = master.command(&["CLUSTER", "MYID"]);
        // The master learns its replica's role by gossip, a moment after
        // the replica's link is up: ask until it knows (bounded).
        let find = || {
            master
                .command(&["CLUSTER", "NODES"])
                .lines()
                .map(|line| line.split_whitespace().collect::<Vec<_>>())
                .find(|f| f.len() > 3 && f[2].contains("slave") && f[3] == id)
                .and_then(|f| f[1].split(['@', ':']).nth(1)?.parse::<u16>().ok())
        };
        let mut port = None;
        wait_for(START_WITHIN, || {
            port = find();
            port.is_some()
        });
        let port = port.expect("the master has a replica");
        self.nodes
            .iter()
            .find(|n| n.port() == port)
            .expect("one of ours")
    }

    /// Promotes the replica at `port` (`CLUSTER FAILOVER TAKEOVER`: no
    /// agreement of the other masters needed, as after its master died)
    /// and returns once every running node reports `cluster_state:ok` and
    /// names it a master.
    ///
    /// # Panics
    /// If that does not happen within 10 s.
    pub fn take_over(&self, port: u16) {
        let replica = self.nodes.iter().find(|n| n.port() == port).expect("ours");
        let answer = replica.command(&["CLUSTER", "FAILOVER", "TAKEOVER"]);
        assert_eq!(answer, "OK", "CLUSTER FAILOVER TAKEOVER");
        let needle = format!(":{port}@");
        let promoted = wait_for(START_WITHIN, || {
            self.alive().all(|n| {
                n.command(&["CLUSTER", "INFO"]).contains("cluster_state:ok")
                    && n.command(&["CLUSTER", "NODES"]).lines().any(|line| {
                        line.contains(&needle) && line.contains("master") && !line.contains("slave")
                    })
            })
        });
        assert!(promoted, "the replica at {port} was not promoted");
    }

    /// Moves `slot` from `from` to `to` the way `redis-cli --cluster
    /// reshard` does: IMPORTING on the target, MIGRATING on the source,
    /// then MIGRATE its keys in batches for at least `hold` (keys created on
    /// the source meanwhile follow in the next batch, and clients meet ASK
    /// and TRYAGAIN all along), then the slot is assigned to the target on
    /// every node. Returns how many keys it moved.
    pub fn migrate_slot(
        &self,
        slot: u16,
        from: &PrivateRedis,
        to: &PrivateRedis,
        hold: Duration,
    ) -> u64 {
        let slot_arg = slot.to_string();
        let from_id = from.command(&["CLUSTER", "MYID"]);
        let to_id = to.command(&["CLUSTER", "MYID"]);
        assert_eq!(
            to.command(&["CLUSTER", "SETSLOT", &slot_arg, "IMPORTING", &from_id]),
            "OK"
        );
        assert_eq!(
            from.command(&["CLUSTER", "SETSLOT", &slot_arg, "MIGRATING", &to_id]),
            "OK"
        );
        let port = to.port().to_string();
        let began = Instant::now();
        let mut moved = 0;
        loop {
            let keys = from.command(&["CLUSTER", "GETKEYSINSLOT", &slot_arg, "1000"]);
            let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
            if !keys.is_empty() {
                let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
                args.extend(&keys);
                let reply = from.command(&args);
                assert!(reply == "OK" || reply == "NOKEY", "MIGRATE: {reply}");
                moved += keys.len() as u64;
            } else if began.elapsed() >= hold {
                break;
            } else {
                // Pacing of the scenario (the slot stays MIGRATING while
                // the test runs), not a wait for a result.
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        // Every master (a replica refuses SETSLOT, and follows its master).
        for node in self.alive() {
            if node
                .command(&["INFO", "REPLICATION"])
                .contains("role:master")
            {
                assert_eq!(
                    node.command(&["CLUSTER", "SETSLOT", &slot_arg, "NODE", &to_id]),
                    "OK"
                );
            }
        }
        moved
    }

    /// The node that serves `slot` now.
    pub fn owner_of(&self, slot: u16) -> &PrivateRedis {
        let id = self
            .alive()
            .next()
            .expect("a running node")
            .command(&["CLUSTER", "NODES"]);
        for line in id.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 9 || !fields[2].contains("master") {
                continue;
            }
            let serves = fields[8..].iter().any(|range| match range.split_once('-') {
                Some((a, b)) => {
                    a.parse::<u16>().is_ok_and(|a| a <= slot)
                        && b.parse::<u16>().is_ok_and(|b| slot <= b)
                }
                None => range.parse::<u16>() == Ok(slot),
            });
            if serves {
                let port: u16 = fields[1]
                    .split(['@', ':'])
                    .nth(1)
                    .and_then(|p| p.parse().ok())
                    .expect("a node address");
                return self
                    .nodes
                    .iter()
                    .find(|n| n.port() == port)
                    .expect("one of ours");
            }
        }
        panic!("no master serves slot {slot}");
    }
}

/// A master, its replica and three sentinels of our own (free loopback
/// ports, killed and removed on `Drop`), the sentinels watching the master
/// as [`SENTINEL_MASTER`] and taking it for down after 500 ms of silence.
pub struct PrivateSentinels {
    pub master: PrivateRedis,
    pub replica: PrivateRedis,
    pub sentinels: Vec<PrivateRedis>,
}

/// The master name the sentinels of [`PrivateSentinels`] watch.
pub const SENTINEL_MASTER: &str = "cacheaside";

impl PrivateSentinels {
    /// Starts the five servers and returns once the replica is in sync and
    /// every sentinel knows the replica and the two other sentinels (so a
    /// failover can be agreed on at once).
    ///
    /// # Panics
    /// If that does not happen within 10 s.
    pub fn start() -> PrivateSentinels {
        let master = PrivateRedis::start_with(&["--repl-diskless-sync-delay", "0"]);
        let port = master.port().to_string();
        let replica = PrivateRedis::start_with(&["--replicaof", "127.0.0.1", &port]);
        let sentinels: Vec<PrivateRedis> = (0..3)
            .map(|_| {
                PrivateRedis::start_sentinel(
                    SENTINEL_MASTER,
                    master.port(),
                    Duration::from_millis(500),
                )
            })
            .collect();
        let group = PrivateSentinels {
            master,
            replica,
            sentinels,
        };
        let ready = wait_for(START_WITHIN, || {
            group
                .replica
                .command(&["INFO", "REPLICATION"])
                .contains("master_link_status:up")
                && group.sentinels.iter().all(|s| {
                    let master = s.command(&["SENTINEL", "MASTER", SENTINEL_MASTER]);
                    master.contains("num-slaves\n1") && master.contains("num-other-sentinels\n2")
                })
        });
        assert!(
            ready,
            "the sentinels did not settle: {}",
            group.sentinels[0].command(&["SENTINEL", "MASTER", SENTINEL_MASTER])
        );
        group
    }

    /// `redis+sentinel://` with every sentinel, for a `Config`.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port()))
            .collect();
        format!("redis+sentinel://{}/{SENTINEL_MASTER}", hosts.join(","))
    }

    /// The port of the master the sentinels name now.
    pub fn master_port(&self) -> Option<u16> {
        let addr =
            self.sentinels[0].command(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", SENTINEL_MASTER]);
        addr.lines().nth(1)?.trim().parse().ok()
    }
}

/// Whether the server at `addr` is a Redis whose `INFO server` reports
/// `pid`, so a server that took our port is never mistaken for ours.
fn is_redis_with_pid(addr: SocketAddr, pid: u32) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let timeout = Some(Duration::from_millis(500));
    if stream.set_read_timeout(timeout).is_err()
        || stream.set_write_timeout(timeout).is_err()
        || stream.write_all(b"INFO server\r\n").is_err()
    {
        return false;
    }
    let wanted = format!("process_id:{pid}\r\n");
    let mut reply = Vec::new();
    let mut buf = [0; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => reply.extend_from_slice(&buf[..n]),
        }
        let text = String::from_utf8_lossy(&reply);
        if text.contains(&wanted) {
            return true;
        }
        // Another server's pid, an error reply (e.g. still loading): not yet.
        if text.starts_with('-') || text.contains("\r\nrun_id:") {
            return false;
        }
    }
}

/// Whether this process runs as root (then the servers must run as
/// `postgres`, since PostgreSQL refuses to run as root).
fn is_root() -> bool {
    fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The path of a PostgreSQL server program: from `$PG_BIN`, else `PATH`,
/// else Debian's `/usr/lib/postgresql/<newest>/bin`.
fn pg_program(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("PG_BIN") {
        return PathBuf::from(dir).join(name);
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|p| p.is_file());
    if let Some(path) = on_path {
        return path;
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path())))
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, dir)) => dir.join("bin").join(name),
        None => panic!("{name} not found: set PG_BIN or put it on PATH"),
    }
}

/// A command that runs `program` as the `postgres` user when we are root.
///
/// setpriv changes user and then execs, so the child's pid is the program's
/// own: we signal and reap it directly. (pg_ctl would leave the postmaster
/// to init, which here reaps slowly; a killed postmaster would stay a zombie
/// whose pid still "exists", and a new one would refuse the old lock file.)
fn as_postgres(program: &Path) -> Command {
    if is_root() {
        let mut command = Command::new("setpriv");
        command
            .args([
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
                "--",
            ])
            .arg(program);
        command
    } else {
        Command::new(program)
    }
}

/// A PostgreSQL server of our own: a fresh cluster in a temp dir, trust
/// auth for `postgres`, fsync off; stopped and removed on `Drop`.
///
/// For stop, crash and restart tests. Committed data survives
/// [`stop`](Self::stop) and [`kill`](Self::kill) (crash recovery replays it).
pub struct PrivatePostgres {
    port: u16,
    /// Ours: holds `data` and the log.
    dir: PathBuf,
    /// The cluster, owned by `postgres`; also the Unix socket's directory.
    data: PathBuf,
    child: Option<Child>,
}

impl PrivatePostgres {
    /// Creates a cluster (initdb) and starts it; returns once a client can
    /// connect. Takes about 2 s. Run as root, the server runs as the
    /// `postgres` user, which must be able to reach the system temp dir.
    ///
    /// # Panics
    /// With initdb's output or the server's log, if either fails or the
    /// server does not accept connections within 10 s.
    pub fn start() -> PrivatePostgres {
        let mut pg = PrivatePostgres::empty("pg");
        let output = as_postgres(&pg_program("initdb"))
            .arg("-D")
            .arg(&pg.data)
            .args(["-U", "postgres", "--auth=trust", "--no-sync"])
            .args(["--no-locale", "--encoding=UTF8", "--no-instructions"])
            .current_dir(&pg.dir)
            .stdin(Stdio::null())
            .output()
            .expect("run initdb");
        assert!(
            output.status.success(),
            "initdb failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        pg.launch_on_a_free_port();
        pg
    }

    /// A streaming replica of this server (`pg_basebackup -R`, a hot
    /// standby) that applies each commit `apply_delay` after the primary
    /// (`recovery_min_apply_delay`), started on a free port; returns once
    /// it accepts connections. Stopped and removed on `Drop` like any
    /// other. Takes about a second.
    ///
    /// # Panics
    /// With pg_basebackup's output or the replica's log, if either fails.
    pub fn start_replica(&self, apply_delay: Duration) -> PrivatePostgres {
        let mut replica = PrivatePostgres::empty("pg-replica");
        let output = as_postgres(&pg_program("pg_basebackup"))
            .arg("-D")
            .arg(&replica.data)
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "postgres", "-R", "-X", "stream"])
            .args(["--checkpoint=fast", "--no-sync"])
            .current_dir(&replica.dir)
            .stdin(Stdio::null())
            .output()
            .expect("run pg_basebackup");
        assert!(
            output.status.success(),
            "pg_basebackup failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        // -R wrote primary_conninfo there; the delay goes beside it.
        let mut conf = OpenOptions::new()
            .append(true)
            .open(replica.data.join("postgresql.auto.conf"))
            .expect("open postgresql.auto.conf");
        writeln!(
            conf,
            "recovery_min_apply_delay = '{}ms'",
            apply_delay.as_millis()
        )
        .expect("write postgresql.auto.conf");
        replica.launch_on_a_free_port();
        replica
    }

    /// A server not yet created: its temp dir, and an empty data dir that
    /// `postgres` owns. Owns the temp dir from here on, so a failed start
    /// removes it too.
    fn empty(label: &str) -> PrivatePostgres {
        let dir = temp_dir(label);
        let pg = PrivatePostgres {
            port: 0,
            data: dir.join("data"),
            dir,
            child: None,
        };
        // Whatever the umask, `postgres` must get through to its data dir.
        fs::set_permissions(&pg.dir, fs::Permissions::from_mode(0o755)).expect("chmod temp dir");
        fs::create_dir(&pg.data).expect("create data dir");
        fs::set_permissions(&pg.data, fs::Permissions::from_mode(0o700)).expect("chmod data dir");
        if is_root() {
            let status = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&pg.data)
                .status()
                .expect("run chown");
            assert!(status.success(), "chown postgres {}", pg.data.display());
        }
        pg
    }

    /// Starts the server on a free port (another, if one is taken first).
    fn launch_on_a_free_port(&mut self) {
        let mut failure = String::new();
        for _ in 0..PORT_ATTEMPTS {
            self.port = free_port();
            match self.launch() {
                Ok(()) => return,
                Err(log) if log.contains("Address already in use") => failure = log,
                Err(log) => panic!("postgres did not start:\n{log}"),
            }
        }
        panic!("postgres found no free port:\n{failure}")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    /// Spawns the postmaster on `self.port` and waits until it accepts a
    /// connection and reports our data directory.
    fn launch(&mut self) -> Result<(), String> {
        let (stdout, stderr) = log_file(&self.log_path());
        let child = as_postgres(&pg_program("postgres"))
            .arg("-D")
            .arg(&self.data)
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(&self.data)
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("spawn postgres: {e}"))?;
        let (url, data) = (self.url(), self.data.clone());
        let child = self.child.insert(child);
        let mut exited = None;
        let up = wait_for(START_WITHIN, || {
            if let Ok(Some(status)) = child.try_wait() {
                exited = Some(status);
                return true;
            }
            serves_data_dir(&url, &data)
        });
        match (up, exited) {
            (true, None) => Ok(()),
            (_, exited) => {
                kill_child(child);
                self.child = None;
                Err(format!(
                    "(port {}, exit {exited:?})\n{}",
                    self.port,
                    read_log(&self.log_path())
                ))
            }
        }
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`, for a `Config`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Gives `postgres` the password `password` and makes TCP logins need
    /// it (scram-sha-256 in `pg_hba.conf`, reloaded); the Unix socket stays
    /// trusted. [`url`](Self::url) then fails with "authentication failed".
    pub fn require_password(&self, password: &str) {
        let mut config = cacheaside::Config::from_env();
        config.database_url = self.url();
        let db = cacheaside::Db::connect(&config).expect("connect to the private postgres");
        db.execute(
            &format!(
                "ALTER ROLE postgres PASSWORD '{}'",
                password.replace('\'', "''")
            ),
            &[],
        )
        .expect("set the password");
        fs::write(
            self.data.join("pg_hba.conf"),
            "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n",
        )
        .expect("write pg_hba.conf");
        db.query_opt("SELECT pg_reload_conf()", &[])
            .expect("reload the configuration");
    }

    /// Turns TLS on (`ssl = on`, reloaded) with `certs`' server
    /// certificate, copied into the data directory for `postgres` to read.
    /// Clients still choose: plain connections keep working.
    pub fn enable_tls(&self, certs: &TestCerts) {
        let (cert, key) = certs.server();
        for (from, name, mode) in [(&cert, "server.crt", 0o644), (&key, "server.key", 0o600)] {
            let to = self.data.join(name);
            fs::copy(from, &to).expect("copy the server certificate");
            fs::set_permissions(&to, fs::Permissions::from_mode(mode)).expect("chmod");
            if is_root() {
                let status = Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(&to)
                    .status()
                    .expect("run chown");
                assert!(status.success(), "chown postgres {}", to.display());
            }
        }
        let mut config = cacheaside::Config::from_env();
        config.database_url = self.url();
        let db = cacheaside::Db::connect(&config).expect("connect to the private postgres");
        // One statement each: ALTER SYSTEM refuses a multi-statement batch.
        for sql in [
            "ALTER SYSTEM SET ssl_cert_file = 'server.crt'",
            "ALTER SYSTEM SET ssl_key_file = 'server.key'",
            "ALTER SYSTEM SET ssl = on",
        ] {
            db.batch_execute(sql).expect("turn TLS on");
        }
        db.query_opt("SELECT pg_reload_conf()", &[])
            .expect("reload the configuration");
        // The postmaster applies a reload when it gets to the signal: wait
        // until a new session sees TLS on.
        let on = wait_for(START_WITHIN, || {
            let Ok(fresh) = cacheaside::Db::connect(&config) else {
                return false;
            };
            matches!(
                fresh.query_opt("SHOW ssl", &[]),
                Ok(Some(row)) if row.get::<_, String>(0) == "on"
            )
        });
        assert!(on, "TLS did not come on:\n{}", read_log(&self.log_path()));
    }

    /// The server's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's address, 127.0.0.1 and [`port`](Self::port).
    pub fn addr(&self) -> SocketAddr {
        loopback(self.port)
    }

    /// The postmaster's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the server the way `pg_ctl stop -m immediate` does (SIGQUIT to
    /// the postmaster, no checkpoint, so the next start runs crash
    /// recovery) and returns once every server process has exited. No-op
    /// if not running.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        signal(child.id(), "QUIT");
        // The postmaster exits only after its children (it SIGKILLs them
        // after 5 s), so its exit means the whole server is gone.
        let exited = wait_for(GONE_WITHIN, || matches!(child.try_wait(), Ok(Some(_))));
        if !exited {
            kill_child(&mut child);
            panic!("postgres did not stop:\n{}", read_log(&self.log_path()));
        }
    }

    /// Starts the stopped or killed server again on the same port, on the
    /// same data, and returns once a client can connect.
    ///
    /// # Panics
    /// If it is running, or with the log if it does not come up in 10 s
    /// (for one, if another process took the port while it was down).
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "start_again: postgres is running");
        if let Err(log) = self.launch() {
            panic!("postgres did not start again:\n{log}");
        }
    }

    /// Crashes the server: SIGKILL to the postmaster (the pid in
    /// `postmaster.pid`, which is our child's), then returns once the
    /// postmaster is reaped and its orphaned backends have exited. No-op if
    /// not running.
    pub fn kill(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let recorded = fs::read_to_string(self.data.join("postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next()?.trim().parse::<u32>().ok());
        assert_eq!(
            recorded,
            Some(child.id()),
            "postmaster.pid does not name the postmaster we started"
        );
        kill_child(&mut child);
        // The backends notice their postmaster died and exit on their own;
        // until then they hold its shared memory and a new postmaster would
        // refuse to start. A backend's working directory is the data dir.
        let data = fs::canonicalize(&self.data).unwrap_or_else(|_| self.data.clone());
        assert!(
            wait_for(GONE_WITHIN, || processes_in(&data).is_empty()),
            "backends of the killed postmaster still run: {:?}",
            processes_in(&data)
        );
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), "QUIT");
            if !wait_for(GONE_WITHIN, || matches!(child.try_wait(), Ok(Some(_)))) {
                kill_child(&mut child);
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Whether a client can log in at `url` and the server there runs on `data`.
fn serves_data_dir(url: &str, data: &Path) -> bool {
    let mut config = cacheaside::Config::from_env();
    config.database_url = url.to_owned();
    config.connect_timeout = Duration::from_secs(1);
    config.pool_min_idle = 0;
    let Ok(db) = cacheaside::Db::connect(&config) else {
        return false;
    };
    let Ok(Some(row)) = db.query_opt("SHOW data_directory", &[]) else {
        return false;
    };
    let shown: String = row.get(0);
    fs::canonicalize(&shown).ok() == fs::canonicalize(data).ok()
}

/// Live (non-zombie) processes whose working directory is `dir`.
fn processes_in(dir: &Path) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == dir))
        .filter(|&pid| !matches!(process_state(pid), None | Some('Z')))
        .collect()
}
