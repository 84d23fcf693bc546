//! (15) Failover timeline: a master killed under 4 readers of one hot key,
//! on a Redis Cluster (3 masters + 3 replicas; the bench promotes the dead
//! master's replica at once with `CLUSTER FAILOVER TAKEOVER`) and behind
//! Redis Sentinel (a master, a replica and three sentinels with
//! `down-after-milliseconds` 500, which promote the replica themselves).
//! From the kill to the first hit, and where every read was served
//! meanwhile: Redis (hits), Postgres (reads around an open breaker, and
//! misses), a fail-safe copy, or an error (none may fail: a failed or wrong
//! read fails the run).
//!
//! The servers are the run's own, on free loopback ports, direct children
//! killed by pid when the section ends (also on an error). If they cannot
//! start, the scenario is skipped with the reason. Each client shares the
//! run's table, with a relay of its own (the breaker waits for one of its
//! rounds before it closes, as in production).

use std::fmt::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use cacheaside::{Client, Config, Stats};
use serde_json::{Value, json};

use crate::BoxResult;
use crate::fixture::{Bench, USER_ID, check_profile};
use crate::plots;
use crate::report::{Section, Target};

/// How long a server may take to answer, and a topology to settle.
const START_WITHIN: Duration = Duration::from_secs(15);
/// Reader threads on the hot key.
const READERS: usize = 4;
/// Width of one row of the timeline.
const BIN: Duration = Duration::from_millis(250);
/// Reads before the kill, on the healthy master.
const BEFORE: Duration = Duration::from_millis(500);
/// The breaker's cool-off in this section.
const COOL_OFF: Duration = Duration::from_millis(500);
const MASTER_NAME: &str = "cacheaside-bench";

/// One row of a timeline: what the reads of one bin got.
#[derive(Clone, Copy, Default)]
pub struct Bin {
    /// Start of the bin, in seconds from the kill (negative: before).
    pub at_s: f64,
    pub reads: u64,
    pub hits: u64,
    /// Reads that went to Postgres (around an open breaker, or misses).
    pub postgres: u64,
    pub fail_safe: u64,
    pub errors: u64,
}

/// One scenario's timeline, or why it was skipped.
pub enum Timeline {
    Skipped(String),
    Measured {
        bins: Vec<Bin>,
        /// From the kill to the moment the topology named a new master.
        promoted_s: f64,
        /// From the kill to the first hit after the outage began.
        first_hit_s: Option<f64>,
        breaker_opened: u64,
        breaker_closed: u64,
    },
}

pub struct FailoverSection {
    pub cluster: Timeline,
    pub sentinel: Timeline,
}

pub fn measure(bench: &Bench) -> BoxResult<FailoverSection> {
    let after = if bench.plan.quick {
        Duration::from_secs(4)
    } else {
        Duration::from_secs(8)
    };
    let cluster = match ClusterRig::start() {
        Ok(mut rig) => run(bench, &mut rig, after)?,
        Err(reason) => {
            eprintln!("bench: failover (15) on a cluster skipped: {reason}");
            Timeline::Skipped(reason.to_string())
        }
    };
    let sentinel = match SentinelRig::start() {
        Ok(mut rig) => run(bench, &mut rig, after)?,
        Err(reason) => {
            eprintln!("bench: failover (15) through Sentinel skipped: {reason}");
            Timeline::Skipped(reason.to_string())
        }
    };
    Ok(FailoverSection { cluster, sentinel })
}

/// A topology whose master of the hot key can be killed.
trait Rig {
    fn name(&self) -> &'static str;
    fn url(&self) -> String;
    /// Kills the master of `redis_key`'s slot.
    fn kill_master(&mut self, redis_key: &str) -> BoxResult<()>;
    /// True once a new master serves it (promoting one, if that is the
    /// rig's part).
    fn promoted(&mut self) -> bool;
}

fn run(bench: &Bench, rig: &mut dyn Rig, after: Duration) -> BoxResult<Timeline> {
    let mut config: Config = bench.config.clone();
    config.redis_url = rig.url();
    // A namespace of its own: the relay's lease is per namespace, and the
    // run's other clients (on the shared Redis) hold the run's namespace's
    // lease; a standby here would wait for progress published to the
    // shared Redis, not to this rig's.
    config.namespace = format!(
        "{}failover-{}:",
        config.namespace,
        rig.name().to_lowercase()
    );
    config.breaker_cool_off = COOL_OFF;
    config.invalidation_relay = true;
    // Four readers: a few connections, not the run's 32 (Postgres is shared).
    config.db_pool_size = 8;
    config.pool_min_idle = 1;
    let client = Client::open(&config)?;
    check_profile(client.get_user_profile(USER_ID)?)?;
    let key = client.cache().redis_key(&Client::user_key(USER_ID));
    let stop = AtomicBool::new(false);
    let (reads, errors) = (AtomicU64::new(0), AtomicU64::new(0));
    let began = Instant::now();
    let mut samples: Vec<(Duration, Stats, u64, u64)> = Vec::new();
    let mut killed_at = None;
    let mut promoted_at = None;
    thread::scope(|s| -> BoxResult<()> {
        for _ in 0..READERS {
            let (client, stop, reads, errors) = (&client, &stop, &reads, &errors);
            s.spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let read = client.get_user_profile(USER_ID);
                    if read.map_err(Into::into).and_then(check_profile).is_err() {
                        errors.fetch_add(1, Ordering::SeqCst);
                    }
                    reads.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
        let result = (|| -> BoxResult<()> {
            loop {
                let now = began.elapsed();
                samples.push((
                    now,
                    client.engine().stats(),
                    reads.load(Ordering::SeqCst),
                    errors.load(Ordering::SeqCst),
                ));
                if killed_at.is_none() && now >= BEFORE {
                    rig.kill_master(&key)?;
                    killed_at = Some(began.elapsed());
                }
                if let Some(k) = killed_at {
                    if promoted_at.is_none() && rig.promoted() {
                        promoted_at = Some(began.elapsed() - k);
                    }
                    if now >= k + after {
                        return Ok(());
                    }
                }
                thread::sleep(Duration::from_millis(10));
            }
        })();
        stop.store(true, Ordering::SeqCst);
        result
    })?;
    let killed_at = killed_at.ok_or("the master was never killed")?;
    let errors = errors.load(Ordering::SeqCst);
    if errors > 0 {
        bench.fail(format!(
            "failover ({}): {errors} reads failed or were wrong",
            rig.name()
        ));
    }
    let stats = client.engine().stats();
    let (bins, first_hit_s) = timeline(&samples, killed_at);
    let line = |b: &Bin| {
        format!(
            "{:+.2} s: {} reads, {} hits, {} Postgres",
            b.at_s, b.reads, b.hits, b.postgres
        )
    };
    eprintln!(
        "bench: failover ({}): promoted {:.2} s, first hit {:?} s after the kill; {}",
        rig.name(),
        promoted_at.unwrap_or_default().as_secs_f64(),
        first_hit_s,
        bins.iter().map(line).collect::<Vec<_>>().join("; ")
    );
    Ok(Timeline::Measured {
        bins,
        promoted_s: promoted_at.map_or(f64::NAN, |p| p.as_secs_f64()),
        first_hit_s,
        breaker_opened: stats.breaker_opened,
        breaker_closed: stats.breaker_closed,
    })
}

/// The samples, cut into [`BIN`]s from [`BEFORE`] before the kill; and
/// the first hit after the outage began (the first sample after the kill
/// that saw no hit), in seconds from the kill.
fn timeline(samples: &[(Duration, Stats, u64, u64)], killed: Duration) -> (Vec<Bin>, Option<f64>) {
    let secs = |d: Duration| d.as_secs_f64() - killed.as_secs_f64();
    let mut bins: Vec<Bin> = Vec::new();
    let mut outage = false;
    let mut first_hit = None;
    for pair in samples.windows(2) {
        let ((_, a, reads_a, err_a), (t, b, reads_b, err_b)) = (&pair[0], &pair[1]);
        let hits = b.hits - a.hits;
        if *t > killed {
            if hits == 0 && reads_b > reads_a {
                outage = true;
            } else if outage && hits > 0 && first_hit.is_none() {
                first_hit = Some(secs(*t));
            }
        }
        let index = ((t.as_secs_f64() / BIN.as_secs_f64()) as usize).min(10_000);
        while bins.len() <= index {
            bins.push(Bin {
                at_s: bins.len() as f64 * BIN.as_secs_f64() - killed.as_secs_f64(),
                ..Bin::default()
            });
        }
        let bin = &mut bins[index];
        bin.reads += reads_b - reads_a;
        bin.hits += hits;
        bin.postgres += (b.bypassed - a.bypassed) + (b.misses - a.misses);
        bin.fail_safe += b.stale_served - a.stale_served;
        bin.errors += err_b - err_a;
    }
    (bins, first_hit)
}

impl Section for FailoverSection {
    fn markdown(&self, md: &mut String) {
        let _ = writeln!(
            md,
            "\n### Failover (15): a master killed under {READERS} readers of one hot key\n"
        );
        let _ = writeln!(
            md,
            "Private servers on loopback. Cluster: 3 masters + 3 replicas, the dead master's \
             replica promoted by the bench at once (`CLUSTER FAILOVER TAKEOVER`). Sentinel: a \
             master, a replica, 3 sentinels (`down-after-milliseconds` 500) that promote it \
             themselves. Breaker cool-off {} ms; the breaker closes after a relay round. Reads \
             per {} ms from the kill (0 s), by where they were served.",
            COOL_OFF.as_millis(),
            BIN.as_millis()
        );
        for (name, timeline) in [("Cluster", &self.cluster), ("Sentinel", &self.sentinel)] {
            let _ = writeln!(md, "\n{name}: ");
            match timeline {
                Timeline::Skipped(reason) => {
                    let _ = writeln!(md, "skipped: {reason}");
                }
                Timeline::Measured {
                    bins,
                    promoted_s,
                    first_hit_s,
                    breaker_opened,
                    breaker_closed,
                } => {
                    let _ = writeln!(
                        md,
                        "new master {promoted_s:.2} s after the kill, first hit {}; breaker \
                         opened {breaker_opened}, closed {breaker_closed}.\n",
                        first_hit_s.map_or("never".to_owned(), |s| format!("{s:.2} s after it"))
                    );
                    let _ = writeln!(
                        md,
                        "| from the kill | reads | Redis (hits) | Postgres | fail-safe | errors |"
                    );
                    let _ = writeln!(md, "|---|---|---|---|---|---|");
                    for b in bins {
                        let _ = writeln!(
                            md,
                            "| {:+.2} s | {} | {} | {} | {} | {} |",
                            b.at_s, b.reads, b.hits, b.postgres, b.fail_safe, b.errors
                        );
                    }
                }
            }
        }
    }

    fn targets(&self) -> Vec<Target> {
        let mut targets = Vec::new();
        for (name, timeline, limit) in [
            ("cluster", &self.cluster, 5.0),
            ("Sentinel", &self.sentinel, 10.0),
        ] {
            if let Timeline::Measured { first_hit_s, .. } = timeline {
                targets.push(Target::seconds_at_most(
                    &format!("failover (15), {name}: kill to first hit"),
                    *first_hit_s,
                    limit,
                ));
            }
        }
        targets
    }

    fn json(&self) -> Option<(&'static str, Value)> {
        let one = |t: &Timeline| match t {
            Timeline::Skipped(reason) => json!({"skipped": reason}),
            Timeline::Measured {
                bins,
                promoted_s,
                first_hit_s,
                breaker_opened,
                breaker_closed,
            } => json!({
                "promoted_s": promoted_s,
                "first_hit_s": first_hit_s,
                "breaker_opened": breaker_opened,
                "breaker_closed": breaker_closed,
                "bin_ms": BIN.as_millis() as u64,
                "bins": bins.iter().map(|b| json!({
                    "at_s": b.at_s, "reads": b.reads, "hits": b.hits,
                    "postgres": b.postgres, "fail_safe": b.fail_safe, "errors": b.errors,
                })).collect::<Vec<_>>(),
            }),
        };
        Some((
            "failover",
            json!({"readers": READERS, "cluster": one(&self.cluster), "sentinel": one(&self.sentinel)}),
        ))
    }

    fn plot(&self, dir: &Path) -> BoxResult<Vec<PathBuf>> {
        let bins = |t: &Timeline| match t {
            Timeline::Measured { bins, .. } => bins.clone(),
            Timeline::Skipped(_) => Vec::new(),
        };
        let path = dir.join("bench-failover.png");
        plots::failover(
            &path,
            &[
                (
                    "Redis Cluster (replica promoted at once)",
                    bins(&self.cluster),
                ),
                ("Redis Sentinel (down-after 500 ms)", bins(&self.sentinel)),
            ],
        )?;
        Ok(vec![path])
    }
}

// ---- the private servers -------------------------------------------------------

/// One `redis-server` of this run: a direct child on a free loopback port,
/// killed by pid on drop. (The tags section runs one too.)
pub struct Node {
    child: Option<Child>,
    pub port: u16,
}

impl Node {
    /// Spawns `redis-server [conf] --port P ... extra` in `dir` (three tries
    /// on fresh ports) and waits until it answers as itself.
    pub fn spawn(dir: &Path, conf: Option<&Path>, extra: &[&str]) -> BoxResult<Node> {
        std::fs::create_dir_all(dir)?;
        let mut last = String::new();
        for _ in 0..3 {
            let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let log = std::fs::File::create(dir.join("redis.log"))?;
            let mut child = Command::new("redis-server")
                .args(conf)
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .args(["--repl-diskless-sync-delay", "0", "--dir"])
                .arg(dir)
                .args(extra)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .map_err(|e| format!("cannot run redis-server: {e}"))?;
            let pid = child.id();
            let mut exited = false;
            let up = wait_for(START_WITHIN, || {
                exited = matches!(child.try_wait(), Ok(Some(_)));
                exited || answers_as(port, pid)
            });
            if up && !exited {
                return Ok(Node {
                    child: Some(child),
                    port,
                });
            }
            let _ = child.kill();
            let _ = child.wait();
            last = std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default();
            if !last.contains("Address already in use") {
                break;
            }
        }
        Err(format!(
            "redis-server did not start: {}",
            last.lines().last().unwrap_or("no log")
        )
        .into())
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Child::kill signals this child's own pid; wait reaps it.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Option<T> {
        let mut conn = redis::Client::open(format!("redis://127.0.0.1:{}/", self.port))
            .ok()?
            .get_connection_with_timeout(Duration::from_millis(500))
            .ok()?;
        conn.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        cmd.query(&mut conn).ok()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A temp dir of this run's, removed on drop (after the nodes that use it:
/// declare it first).
pub struct Dir(pub PathBuf);

impl Dir {
    pub fn new(label: &str) -> BoxResult<Dir> {
        let dir =
            std::env::temp_dir().join(format!("cacheaside-bench-{label}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Dir(dir))
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct ClusterRig {
    nodes: Vec<Node>,
    /// The replica to promote, once its master is dead.
    heir: Option<usize>,
    _dir: Dir,
}

impl ClusterRig {
    fn start() -> BoxResult<ClusterRig> {
        let dir = Dir::new("failover-cluster")?;
        let mut nodes = Vec::new();
        for n in 0..6 {
            nodes.push(Node::spawn(
                &dir.0.join(format!("node{n}")),
                None,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "5000",
                ],
            )?);
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let output = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run redis-cli: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "redis-cli --cluster create failed: {}",
                String::from_utf8_lossy(&output.stdout).trim()
            )
            .into());
        }
        let rig = ClusterRig {
            nodes,
            heir: None,
            _dir: dir,
        };
        let formed = wait_for(START_WITHIN, || {
            let mut replicas = 0;
            let ok = rig.nodes.iter().all(|n| {
                let info: Option<String> = n.query(redis::cmd("CLUSTER").arg("INFO"));
                let repl: Option<String> = n.query(redis::cmd("INFO").arg("replication"));
                let repl = repl.unwrap_or_default();
                if repl.contains("master_link_status:up") {
                    replicas += 1;
                }
                // Every node must also know who replicates whom (gossip).
                let nodes: Option<String> = n.query(redis::cmd("CLUSTER").arg("NODES"));
                info.is_some_and(|i| i.contains("cluster_state:ok"))
                    && (repl.contains("role:master") || repl.contains("master_link_status:up"))
                    && nodes.is_some_and(|t| t.matches("slave").count() == 3)
            });
            ok && replicas == 3
        });
        if !formed {
            return Err("the cluster with replicas did not form".into());
        }

        Ok(rig)
    }

    /// `CLUSTER NODES` of a running node, one line's fields at a time.
    fn nodes_table(&self) -> Vec<Vec<String>> {
        let text: Option<String> = self
            .nodes
            .iter()
            .filter(|n| n.child.is_some())
            .find_map(|n| n.query(redis::cmd("CLUSTER").arg("NODES")));
        text.unwrap_or_default()
            .lines()
            .map(|l| l.split_whitespace().map(str::to_owned).collect())
            .collect()
    }
}

fn port_of(addr: &str) -> Option<u16> {
    addr.split(['@', ':']).nth(1)?.parse().ok()
}

impl Rig for ClusterRig {
    fn name(&self) -> &'static str {
        "cluster"
    }

    fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn kill_master(&mut self, redis_key: &str) -> BoxResult<()> {
        let slot: u16 = self.nodes[0]
            .query(redis::cmd("CLUSTER").arg("KEYSLOT").arg(redis_key))
            .ok_or("CLUSTER KEYSLOT")?;
        let table = self.nodes_table();
        let owner = table
            .iter()
            .find(|f| {
                f.len() > 8
                    && f[2].contains("master")
                    && f[8..].iter().any(|r| match r.split_once('-') {
                        Some((a, b)) => {
                            a.parse::<u16>().is_ok_and(|a| a <= slot)
                                && b.parse::<u16>().is_ok_and(|b| slot <= b)
                        }
                        None => r.parse::<u16>() == Ok(slot),
                    })
            })
            .ok_or("no master serves the hot key's slot")?;
        let heir = table
            .iter()
            .find(|f| f.len() > 3 && f[2].contains("slave") && f[3] == owner[0])
            .and_then(|f| port_of(&f[1]))
            .ok_or("the hot key's master has no replica")?;
        let owner_port = port_of(&owner[1]).ok_or("a node address")?;
        self.heir = self.nodes.iter().position(|n| n.port == heir);
        self.nodes
            .iter_mut()
            .find(|n| n.port == owner_port)
            .ok_or("the master is not ours")?
            .kill();
        let heir = &self.nodes[self.heir.ok_or("the replica is not ours")?];
        let _: Option<String> = heir.query(redis::cmd("CLUSTER").arg("FAILOVER").arg("TAKEOVER"));
        Ok(())
    }

    fn promoted(&mut self) -> bool {
        let Some(heir) = self.heir else { return false };
        let heir = &self.nodes[heir];
        let repl: Option<String> = heir.query(redis::cmd("INFO").arg("replication"));
        let info: Option<String> = heir.query(redis::cmd("CLUSTER").arg("INFO"));
        repl.is_some_and(|r| r.contains("role:master"))
            && info.is_some_and(|i| i.contains("cluster_state:ok"))
    }
}

struct SentinelRig {
    master: Node,
    replica: Node,
    sentinels: Vec<Node>,
    _dir: Dir,
}

impl SentinelRig {
    fn start() -> BoxResult<SentinelRig> {
        let dir = Dir::new("failover-sentinel")?;
        let master = Node::spawn(&dir.0.join("master"), None, &[])?;
        let replica = Node::spawn(
            &dir.0.join("replica"),
            None,
            &["--replicaof", "127.0.0.1", &master.port.to_string()],
        )?;
        let mut sentinels = Vec::new();
        for n in 0..3 {
            let sdir = dir.0.join(format!("sentinel{n}"));
            std::fs::create_dir_all(&sdir)?;
            let conf = sdir.join("sentinel.conf");
            std::fs::write(
                &conf,
                format!(
                    "sentinel monitor {MASTER_NAME} 127.0.0.1 {} 2\n\
                     sentinel down-after-milliseconds {MASTER_NAME} 500\n\
                     sentinel failover-timeout {MASTER_NAME} 2000\n",
                    master.port
                ),
            )?;
            sentinels.push(Node::spawn(&sdir, Some(&conf), &["--sentinel"])?);
        }
        let rig = SentinelRig {
            master,
            replica,
            sentinels,
            _dir: dir,
        };
        let settled = wait_for(START_WITHIN, || {
            rig.sentinels.iter().all(|s| {
                let fields: Option<Vec<String>> =
                    s.query(redis::cmd("SENTINEL").arg("MASTER").arg(MASTER_NAME));
                fields.is_some_and(|f| {
                    let get = |k: &str| f.iter().position(|x| x == k).and_then(|i| f.get(i + 1));
                    get("num-slaves").is_some_and(|v| v == "1")
                        && get("num-other-sentinels").is_some_and(|v| v == "2")
                })
            })
        });
        if !settled {
            return Err("the sentinels did not settle".into());
        }
        Ok(rig)
    }
}

impl Rig for SentinelRig {
    fn name(&self) -> &'static str {
        "Sentinel"
    }

    fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        format!("redis+sentinel://{}/{MASTER_NAME}", hosts.join(","))
    }

    fn kill_master(&mut self, _redis_key: &str) -> BoxResult<()> {
        self.master.kill();
        Ok(())
    }

    fn promoted(&mut self) -> bool {
        let addr: Option<(String, u16)> = self.sentinels[0].query(
            redis::cmd("SENTINEL")
                .arg("GET-MASTER-ADDR-BY-NAME")
                .arg(MASTER_NAME),
        );
        addr.is_some_and(|(_, port)| port == self.replica.port)
    }
}

/// True when the server on `port` is the process `pid`.
fn answers_as(port: u16, pid: u32) -> bool {
    let node = Node { child: None, port };
    node.query::<String>(redis::cmd("INFO").arg("server"))
        .is_some_and(|info| info.contains(&format!("process_id:{pid}\r")))
}

/// Polls `done` every 20 ms until it holds or `within` has passed.
fn wait_for(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}
