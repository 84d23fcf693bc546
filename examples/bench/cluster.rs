//! (14) Redis Cluster against the single Redis, in the same run: the hit
//! (`get_user_profile`) and the raw pooled `GET` floor on a private
//! 3-master cluster beside the same on the shared Redis, at 1 thread
//! (latency) and 50 threads (throughput), as ratios cluster / single; and
//! the correctness property that 50 threads on a cold key cost exactly one
//! query on the cluster too. Then (`cluster_features`) the L1 hit and
//! write-behind's throughput on the cluster against the single Redis.
//!
//! The cluster is the run's own: three `redis-server --cluster-enabled yes`
//! on free loopback ports, joined by `redis-cli --cluster create`, killed by
//! pid when the section ends (also on an error or a panic: [`PrivateCluster`]
//! is a drop guard). If they cannot form a cluster the section is skipped,
//! with the reason: a missing cluster is not a broken property. On 2 cores
//! the cluster cannot show more capacity, only that it costs nothing.
//!
//! Its client shares the run's table; its keys live on the cluster, which
//! dies with the section. It runs no relay (the bench's client does).

use std::fmt::Write as _;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use cacheaside::{Client, Config};
use serde_json::{Value, json};

use crate::BoxResult;
use crate::cluster_features::{Features, WriteBehindRun};
use crate::fixture::{Bench, USER_ID, check_profile};
use crate::floors::Floors;
use crate::measure::{self, Baseline, Operation, Series};
use crate::report::{Section, Target};

/// How long the nodes may take to answer, and the cluster to form.
const START_WITHIN: Duration = Duration::from_secs(10);
/// Threads released together on a cold key.
const COLD_READERS: usize = 50;
/// The users read cold by the single-flight check (1 is warm already).
const COLD_USERS: [i64; 4] = [2, 3, 4, 5];

/// The section: measured, or skipped with the reason.
pub enum ClusterSection {
    Skipped(String),
    Measured {
        series: Vec<Series>,
        /// Queries sent by each cold 50-thread read (each must be 1).
        cold_queries: Vec<u64>,
        /// From the first node's spawn to `cluster_state:ok` everywhere.
        formed_in: Duration,
        /// L1 and write-behind on the cluster (14c-14e).
        features: Features,
    },
}

pub fn measure(bench: &Bench) -> BoxResult<ClusterSection> {
    let started = Instant::now();
    let cluster = match PrivateCluster::start() {
        Ok(cluster) => cluster,
        Err(reason) => {
            eprintln!("bench: cluster (14) skipped: {reason}");
            return Ok(ClusterSection::Skipped(reason.to_string()));
        }
    };
    let formed_in = started.elapsed();
    eprintln!(
        "bench: cluster of 3 masters on ports {:?}, formed in {:.1} s",
        cluster.ports,
        formed_in.as_secs_f64()
    );
    let mut config: Config = bench.config.clone();
    config.redis_url = cluster.url();
    config.invalidation_relay = false;
    let on_cluster = Client::open(&config)?;
    if !on_cluster.cache().is_cluster() {
        return Err("the cluster's client is not in cluster mode".into());
    }

    let cold_queries = cold_readers(bench, &on_cluster)?;
    // Warms the cluster's entry of USER_ID and stores its own floor key.
    let cluster_floors = Floors::prepare(&on_cluster)?;

    // A hit on the cluster never reaches Postgres either.
    let queries_before = on_cluster.db().query_count();
    for _ in 0..100 {
        check_profile(on_cluster.get_user_profile(USER_ID)?)?;
    }
    if on_cluster.db().query_count() != queries_before {
        bench.fail("cache hits on the cluster sent Postgres queries");
    }

    let client = bench.client();
    let [floor_single, _] = bench.floors.ops(client);
    let [floor_cluster, _] = cluster_floors.ops(&on_cluster);
    let ops = [
        floor_single,
        Operation {
            id: "floor_cluster",
            item: "14a",
            label: "floor: pooled redis GET + serde_json, cluster",
            baseline: Baseline::Series {
                id: "floor_redis",
                item: "(1)",
            },
            ..floor_cluster
        },
        Operation {
            id: "hit",
            item: "3",
            label: "get_user_profile (hit)",
            baseline: Baseline::Series {
                id: "floor_redis",
                item: "(1)",
            },
            call: Box::new(|| check_profile(client.get_user_profile(USER_ID)?)),
        },
        Operation {
            id: "hit_cluster",
            item: "14b",
            label: "get_user_profile (hit), cluster",
            baseline: Baseline::Series {
                id: "hit",
                item: "(3)",
            },
            call: Box::new(|| check_profile(on_cluster.get_user_profile(USER_ID)?)),
        },
    ];
    let mut series = Vec::new();
    for threads in [1, 50] {
        let active: Vec<&Operation> = ops.iter().collect();
        series.extend(measure::side_by_side(&active, threads, &bench.plan)?);
        eprintln!("bench: cluster hits at {threads} thread(s) done");
    }
    drop(ops);
    let mut features = crate::cluster_features::measure(bench, &config)?;
    series.append(&mut features.series);
    Ok(ClusterSection::Measured {
        series,
        cold_queries,
        formed_in,
        features,
    })
}

/// For each of [`COLD_USERS`]: 50 threads released together read the cold
/// key through single-flight; each read must return the user, the 50 cost
/// exactly one query, and no key is left in flight. A broken property fails
/// the run; returns the queries of each read.
fn cold_readers(bench: &Bench, on_cluster: &Client) -> BoxResult<Vec<u64>> {
    let mut counts = Vec::new();
    for id in COLD_USERS {
        let barrier = Barrier::new(COLD_READERS);
        let before = on_cluster.db().query_count();
        let wrong = thread::scope(|s| {
            let readers: Vec<_> = (0..COLD_READERS)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        on_cluster.get_user_profile_singleflight(id)
                    })
                })
                .collect();
            readers
                .into_iter()
                .map(|r| r.join().expect("cold reader panicked"))
                .filter(|r| !matches!(r, Ok(Some(p)) if p.id == id))
                .count()
        });
        let queries = on_cluster.db().query_count() - before;
        if queries != 1 {
            bench.fail(format!(
                "cluster: {COLD_READERS} cold readers of user {id} sent {queries} queries, \
                 expected exactly 1"
            ));
        }
        if wrong > 0 {
            bench.fail(format!(
                "cluster: {wrong} of {COLD_READERS} cold reads of user {id} failed or were wrong"
            ));
        }
        if on_cluster.engine().in_flight() != 0 {
            bench.fail("cluster: a single-flight key was left in flight");
        }
        counts.push(queries);
    }
    eprintln!("bench: cluster cold readers: queries {counts:?}");
    Ok(counts)
}

impl Section for ClusterSection {
    fn latency(&self) -> &[Series] {
        match self {
            ClusterSection::Skipped(_) => &[],
            ClusterSection::Measured { series, .. } => series,
        }
    }

    fn markdown(&self, md: &mut String) {
        let _ = writeln!(
            md,
            "\n### Redis Cluster (14): 3 masters against one Redis\n"
        );
        match self {
            ClusterSection::Skipped(reason) => {
                let _ = writeln!(md, "skipped: {reason}");
            }
            ClusterSection::Measured {
                cold_queries,
                formed_in,
                features,
                ..
            } => {
                let (single, cluster) = (&features.wb_single, &features.wb_cluster);
                let _ = writeln!(
                    md,
                    "\nWrite-behind (14d, 14e): {} changes over as many users, enqueued by 4 \
                     threads with no worker running, then flushed by 2 workers: enqueue {:.0}/s \
                     on the cluster against {:.0}/s on the single Redis, flush {:.0}/s against \
                     {:.0}/s (on the cluster a stream per slot, polled by every worker). \
                     (14c) is the L1 hit on the cluster (a tracker per master) against the L1 \
                     hit on the single Redis.\n",
                    cluster.changes,
                    cluster.enqueue_per_s(),
                    single.enqueue_per_s(),
                    cluster.flush_per_s(),
                    single.flush_per_s(),
                );
                let _ = writeln!(
                    md,
                    "A private cluster of 3 masters (no replicas) on loopback, formed in {:.1} s, \
                     on the same 2 cores as everything else: it can only show that a hit costs \
                     the same, not the capacity a cluster adds. (14a) and (14b) are (1) and (3) \
                     on the cluster; their ratios are cluster / single. The single Redis is the \
                     shared one, which may serve other work meanwhile; the cluster's nodes serve \
                     this run alone, which can favour the cluster. {COLD_READERS} threads \
                     on a cold key, single-flight: {} queries for users {COLD_USERS:?} \
                     (each must be 1).",
                    formed_in.as_secs_f64(),
                    cold_queries
                        .iter()
                        .map(u64::to_string)
                        .collect::<Vec<_>>()
                        .join(", "),
                );
            }
        }
    }

    fn targets(&self) -> Vec<Target> {
        let ratio = |id, threads| measure::median_ratio(self.latency(), id, threads);
        vec![
            Target::at_most(
                "cluster hit (14b) latency vs single-node hit (3), 1 thread",
                ratio("hit_cluster", 1),
                1.10,
            ),
            Target::at_least(
                "cluster hit (14b) throughput vs single-node hit (3), 50 threads",
                ratio("hit_cluster", 50),
                0.90,
            ),
            Target::at_most(
                "cluster L1 hit (14c) latency vs single-node L1 hit, 1 thread",
                ratio("local_hit_cluster", 1),
                1.10,
            ),
            Target::at_least(
                "cluster L1 hit (14c) throughput vs single-node L1 hit, 50 threads",
                ratio("local_hit_cluster", 50),
                0.90,
            ),
            Target::at_least(
                "cluster write-behind enqueue (14d) throughput vs single Redis",
                self.write_behind_ratio(WriteBehindRun::enqueue_per_s),
                0.50,
            ),
            Target::at_least(
                "cluster write-behind flush (14e) throughput vs single Redis",
                self.write_behind_ratio(WriteBehindRun::flush_per_s),
                0.50,
            ),
        ]
    }

    fn json(&self) -> Option<(&'static str, Value)> {
        let ratio = |id, threads| measure::median_ratio(self.latency(), id, threads);
        Some((
            "cluster",
            match self {
                ClusterSection::Skipped(reason) => json!({"skipped": reason}),
                ClusterSection::Measured {
                    cold_queries,
                    formed_in,
                    features,
                    ..
                } => json!({
                    "write_behind": {
                        "changes": features.wb_cluster.changes,
                        "enqueue_per_s": features.wb_cluster.enqueue_per_s(),
                        "flush_per_s": features.wb_cluster.flush_per_s(),
                        "single_enqueue_per_s": features.wb_single.enqueue_per_s(),
                        "single_flush_per_s": features.wb_single.flush_per_s(),
                    },
                    "masters": 3,
                    "formed_in_s": formed_in.as_secs_f64(),
                    "cold_readers": COLD_READERS,
                    "cold_queries": cold_queries,
                    "cluster_over_single": {
                        "hit_latency_1_thread": ratio("hit_cluster", 1),
                        "hit_throughput_50_threads": ratio("hit_cluster", 50),
                        "floor_latency_1_thread": ratio("floor_cluster", 1),
                        "floor_throughput_50_threads": ratio("floor_cluster", 50),
                        "local_hit_latency_1_thread": ratio("local_hit_cluster", 1),
                        "local_hit_throughput_50_threads": ratio("local_hit_cluster", 50),
                    },
                }),
            },
        ))
    }
}

impl ClusterSection {
    /// Cluster / single of a write-behind rate.
    fn write_behind_ratio(&self, rate: fn(&WriteBehindRun) -> f64) -> Option<f64> {
        match self {
            ClusterSection::Skipped(_) => None,
            ClusterSection::Measured { features, .. } => {
                Some(rate(&features.wb_cluster) / rate(&features.wb_single))
            }
        }
    }
}

// ---- the private cluster ------------------------------------------------------

/// Three `redis-server --cluster-enabled yes` of this run, each a direct
/// child on a free loopback port with a temp dir of its own. Dropping it
/// kills exactly those pids (SIGKILL, then reaped) and removes the dirs;
/// it never touches the shared Redis. Its nodes are ours alone.
struct PrivateCluster {
    children: Vec<Child>,
    ports: Vec<u16>,
    dir: PathBuf,
}

impl PrivateCluster {
    /// Starts three nodes, joins them with `redis-cli --cluster create`
    /// and returns once every node reports `cluster_state:ok` with all
    /// 16384 slots and 3 known nodes; an error says why not.
    fn start() -> BoxResult<PrivateCluster> {
        let dir =
            std::env::temp_dir().join(format!("cacheaside-bench-cluster-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let mut cluster = PrivateCluster {
            children: Vec::new(),
            ports: Vec::new(),
            dir,
        };
        for n in 0..3 {
            cluster.spawn_node(n)?;
        }
        let addrs: Vec<String> = cluster
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let output = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run redis-cli: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "redis-cli --cluster create failed: {}{}",
                String::from_utf8_lossy(&output.stdout).trim(),
                String::from_utf8_lossy(&output.stderr).trim()
            )
            .into());
        }
        let formed = wait_for(START_WITHIN, || {
            cluster.ports.iter().all(|&port| {
                cluster_info(port).is_some_and(|info| {
                    info.contains("cluster_state:ok")
                        && info.contains("cluster_slots_ok:16384")
                        && info.contains("cluster_known_nodes:3")
                })
            })
        });
        if !formed {
            return Err(format!(
                "the cluster did not form within {} s",
                START_WITHIN.as_secs()
            )
            .into());
        }
        Ok(cluster)
    }

    /// Spawns node `n` on a free port (three tries, since another process
    /// may take the port first) and waits until it answers as itself.
    fn spawn_node(&mut self, n: usize) -> BoxResult<()> {
        let node_dir = self.dir.join(format!("node{n}"));
        std::fs::create_dir_all(&node_dir)?;
        let mut last = String::new();
        for _ in 0..3 {
            let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let log = std::fs::File::create(node_dir.join("redis.log"))?;
            let mut child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .args(["--cluster-enabled", "yes"])
                .args(["--cluster-config-file", "nodes.conf"])
                .args(["--cluster-node-timeout", "5000", "--dir"])
                .arg(&node_dir)
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
                self.children.push(child);
                self.ports.push(port);
                return Ok(());
            }
            let _ = child.kill();
            let _ = child.wait();
            last = std::fs::read_to_string(node_dir.join("redis.log")).unwrap_or_default();
            if !last.contains("Address already in use") {
                break;
            }
        }
        Err(format!(
            "redis-server --cluster-enabled yes did not start: {}",
            last.lines().last().unwrap_or("no log")
        )
        .into())
    }

    /// The `redis_url` for a `Config`: every node, separated by commas.
    fn url(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            // Child::kill signals this child's own pid; wait reaps it.
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        if !self.ports.is_empty() {
            eprintln!("bench: cluster nodes on ports {:?} killed", self.ports);
        }
    }
}

/// A plain connection to one node, with a short timeout.
fn node(port: u16) -> Option<redis::Connection> {
    redis::Client::open(format!("redis://127.0.0.1:{port}/"))
        .ok()?
        .get_connection_with_timeout(Duration::from_millis(500))
        .ok()
}

/// True when the server on `port` is the process `pid` (not another
/// process that took the port first).
fn answers_as(port: u16, pid: u32) -> bool {
    node(port)
        .and_then(|mut c| {
            redis::cmd("INFO")
                .arg("server")
                .query::<String>(&mut c)
                .ok()
        })
        .is_some_and(|info| info.contains(&format!("process_id:{pid}\r")))
}

fn cluster_info(port: u16) -> Option<String> {
    let mut c = node(port)?;
    redis::cmd("CLUSTER").arg("INFO").query(&mut c).ok()
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
