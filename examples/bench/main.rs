//! The benchmark of issue 5: how close a cache hit gets to a raw Redis round
//! trip, and what a stampede costs, side by side in one run.
//!
//! ```text
//! cargo run --release --example bench            # full run, < 3 minutes
//! cargo run --release --example bench -- --quick # ~20 s smoke run (CI)
//! ```
//!
//! It prints a markdown table and writes `target/bench/report.json` and
//! `target/bench/report.md`; the full run also draws `docs/bench-latency.png`
//! and `docs/bench-stampede.png`.
//!
//! Targets are reported as met or not met, never asserted: a slow machine
//! must not fail CI. What does fail the run (exit status 1) is a broken
//! correctness property: a single-flight stampede that sends more than one
//! query, a single-flight key left in flight, or a read that returns a wrong
//! value or an error.
//!
//! Every run owns a users table `bench_users_<pid>` and a Redis namespace
//! `bench:<pid>:`, and removes both when it ends, also after an error.
//!
//! One module per section, measured in the order [`SECTIONS`] lists them; each
//! hands the report a [`Section`](report::Section) that says what to show of
//! it. Adding a section is one module and one entry in [`SECTIONS`]. The sections
//! share [`fixture`] (the client, table, namespace and floors) and
//! [`measure`] (timing loops, repetitions, percentiles, paired ratios).
//!
//! Three hidden modes (`--child-stampede`, `--child-memory`,
//! `--child-near-memory`) are this binary run as a child process: the
//! cross-process stampede needs several processes, and memory is only
//! meaningful in a fresh one.

mod batch;
mod c_abi;
mod capture;
mod cluster;
mod cluster_features;
mod consistency;
mod failover;
mod faults;
mod fixture;
mod floors;
mod hits;
mod measure;
mod memory;
mod misses;
mod near;
mod near_store;
mod plan;
mod plots;
mod relay;
mod replica;
mod report;
mod stampede;
mod steady;
mod tags;
mod wake;
mod write_behind;
mod xproc;

use std::error::Error as StdError;

use fixture::Bench;
use plan::Plan;
use report::{Report, Section};

type BoxError = Box<dyn StdError + Send + Sync>;
type BoxResult<T> = Result<T, BoxError>;

const USAGE: &str = "usage: bench [--quick [--plots]] [--only SECTION]
  (no flag)  the full run (< 3 min): report in target/bench/, plots in docs/
  --quick    a ~20 s smoke run (CI): report in target/bench/, no plots
  --plots    with --quick: also draw the plots, into target/bench/ (docs/ keeps the full run's)
  --only S   measure section S alone (hits, misses, stampede, memory, faults, relay,
             steady, write_behind, near, cluster, failover, capture, consistency,
             replica, tags, batch; batch also runs tags): for work on one section";

/// The hidden modes: this binary run as a child process by a section.
type ChildMode = fn(&[String]) -> BoxResult<()>;
const CHILD_MODES: [(&str, ChildMode); 3] = [
    ("--child-stampede", xproc::child),
    ("--child-memory", memory::child),
    ("--child-near-memory", near::child),
];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let child = args
        .first()
        .and_then(|flag| CHILD_MODES.iter().find(|(mode, _)| mode == flag));
    let outcome = match (child, args.first().map(String::as_str)) {
        (Some((_, child)), _) => child(&args[1..]).map(|()| 0),
        (None, Some("-h" | "--help")) => {
            println!("{USAGE}");
            Ok(0)
        }
        (None, _) => {
            let (mut quick, mut plots, mut only) = (false, false, None);
            let mut rest = args.iter();
            while let Some(arg) = rest.next() {
                match arg.as_str() {
                    "--quick" => quick = true,
                    "--plots" => plots = true,
                    "--only" => match rest.next() {
                        Some(name) if SECTIONS.iter().any(|(n, _)| n == name) => {
                            only = Some(name.as_str())
                        }
                        other => {
                            eprintln!("bench: --only needs a section, not {other:?}\n{USAGE}");
                            std::process::exit(2);
                        }
                    },
                    other => {
                        eprintln!("bench: unknown argument {other:?}\n{USAGE}");
                        std::process::exit(2);
                    }
                }
            }
            run(Plan::new(quick), quick && plots, only)
        }
    };
    match outcome {
        Ok(code) => std::process::exit(code),
        Err(err) => {
            eprintln!("bench: error: {err}");
            let mut source = err.source();
            while let Some(cause) = source {
                eprintln!("  caused by: {cause}");
                source = cause.source();
            }
            std::process::exit(1);
        }
    }
}

/// Measures one section.
type Measure = fn(&Bench) -> BoxResult<Box<dyn Section>>;

/// The sections in order, by the name `--only` takes.
const SECTIONS: [(&str, Measure); 16] = [
    // (1)-(4), (7): hits against the floors
    ("hits", |b| Ok(Box::new(hits::measure(b)?))),
    // (5): misses against both floors
    ("misses", |b| Ok(Box::new(misses::measure(b)?))),
    // (6): stampedes, in and across processes
    ("stampede", |b| Ok(Box::new(stampede::measure(b)?))),
    // (8): memory, in a fresh process
    ("memory", |b| Ok(Box::new(memory::measure(b)?))),
    // (9): Redis out and back, Postgres down
    ("faults", |b| Ok(Box::new(faults::measure(b)?))),
    // (10): the invalidation relay, the trigger's cost
    ("relay", |b| Ok(Box::new(relay::measure(b)?))),
    // (11): single-flight under steady writes
    ("steady", |b| Ok(Box::new(steady::measure(b)?))),
    // (12): write-behind enqueue, flush, lag
    ("write_behind", |b| Ok(Box::new(write_behind::measure(b)?))),
    // (13): the near cache (L1) against the floor
    ("near", |b| Ok(Box::new(near::measure(b)?))),
    // (14): Redis Cluster against one Redis
    ("cluster", |b| Ok(Box::new(cluster::measure(b)?))),
    // (15): a master killed, on a cluster and behind Sentinel
    ("failover", |b| Ok(Box::new(failover::measure(b)?))),
    // (16): capture under writers: TPS, commit-to-invalidation, relay work
    ("capture", |b| Ok(Box::new(capture::measure(b)?))),
    // (17): every write path at once, each write checked after d
    ("consistency", |b| Ok(Box::new(consistency::measure(b)?))),
    // (18): loads from a lagging read replica, fenced
    ("replica", |b| Ok(Box::new(replica::measure(b)?))),
    // (19): tagged hits, invalidate_tag, conditional refresh's bytes
    ("tags", |b| Ok(Box::new(tags::measure(b)?))),
    // (20): batch reads: 100 hits against one GET, a cold page's cost
    ("batch", |b| Ok(Box::new(batch::measure(b)?))),
];

/// The sections in order (or only the one named), then the report;
/// returns the exit status.
fn run(plan: Plan, quick_plots: bool, only: Option<&str>) -> BoxResult<i32> {
    let bench = Bench::open(plan)?;
    let mut report = Report::default();
    for (name, measure) in SECTIONS {
        // `--only batch` also runs tags (19): one page of keys, one group of
        // entries, conditional refresh: the targets of one piece of work.
        if only.is_none_or(|o| o == name || (o, name) == ("batch", "tags")) {
            report.add(measure(&bench)?);
        }
    }
    report.finish(bench, quick_plots)
}
