//! The report of a run: what each section contributes ([`Section`]), the
//! tables printed at the end and written to `target/bench/report.md`, the
//! same numbers in `target/bench/report.json`, the targets, the plots, and
//! the exit status.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use cacheaside::Client;
use serde_json::{Value, json};

use crate::fixture::{BENCH_CACHE_POOL, BENCH_DB_POOL, BENCH_POOL_TIMEOUT, Bench};
use crate::measure::{Series, Spread};
use crate::plan::Plan;
use crate::{BoxResult, plots};

/// What the report shows of one measured section. Every part is optional;
/// the report shows the sections in the order they were added.
pub trait Section {
    /// The section's rows of the latency table, which every section shares
    /// ("Latency and throughput", sorted by item). A row's baseline is
    /// looked up among the rows of the same section.
    fn latency(&self) -> &[Series] {
        &[]
    }

    /// The section's own tables, appended to report.md after the latency
    /// table and the sections before it.
    fn markdown(&self, _md: &mut String) {}

    /// The section's rows of the targets table.
    fn targets(&self) -> Vec<Target> {
        Vec::new()
    }

    /// The section's entry in report.json: its key and its value.
    fn json(&self) -> Option<(&'static str, Value)> {
        None
    }

    /// Draws the section's plots into `dir`; returns the files written.
    fn plot(&self, _dir: &Path) -> BoxResult<Vec<PathBuf>> {
        Ok(Vec::new())
    }
}

/// One target: what was measured against what limit. Targets are reported,
/// never asserted: a slow machine must not fail the run.
pub struct Target {
    pub name: String,
    pub value: String,
    pub limit: String,
    pub met: Option<bool>,
}

impl Target {
    /// A ratio that should be at most `limit`.
    pub fn at_most(name: &str, ratio: Option<f64>, limit: f64) -> Target {
        Target::ratio(name, ratio, limit, true)
    }

    /// A ratio that should be at least `limit`.
    pub fn at_least(name: &str, ratio: Option<f64>, limit: f64) -> Target {
        Target::ratio(name, ratio, limit, false)
    }

    /// A duration, in seconds, that should be at most `limit` (none
    /// measured: not met).
    pub fn seconds_at_most(name: &str, seconds: Option<f64>, limit: f64) -> Target {
        Target {
            name: name.to_owned(),
            value: seconds.map_or("never".into(), |s| format!("{s:.2} s")),
            limit: format!("≤ {limit:.1} s"),
            met: Some(seconds.is_some_and(|s| s <= limit)),
        }
    }

    fn ratio(name: &str, ratio: Option<f64>, limit: f64, at_most: bool) -> Target {
        Target {
            name: name.to_owned(),
            value: ratio.map_or("not measured".into(), |r| format!("{r:.3}×")),
            limit: format!("{} {limit:.2}×", if at_most { "≤" } else { "≥" }),
            met: ratio.map(|r| if at_most { r <= limit } else { r >= limit }),
        }
    }
}

/// A cell of min, median and max across repetitions: "median (min–max)".
pub fn spread_cell(s: Spread, digits: usize) -> String {
    format!("{:.d$} ({:.d$}–{:.d$})", s.median, s.min, s.max, d = digits)
}

/// The measured sections, in the order of the report.
#[derive(Default)]
pub struct Report {
    sections: Vec<Box<dyn Section>>,
}

impl Report {
    pub fn add(&mut self, section: Box<dyn Section>) {
        self.sections.push(section);
    }

    /// Prints the tables and writes report.md and report.json (and the
    /// plots: in docs/ after a full run, in target/bench/ with `--quick
    /// --plots`), then drops the run's table and namespace; returns the exit
    /// status: 1 if a correctness property broke, else 0.
    pub fn finish(&self, bench: Bench, quick_plots: bool) -> BoxResult<i32> {
        let plan = &bench.plan;
        let machine = machine_info(bench.client());
        let targets: Vec<Target> = self.sections.iter().flat_map(|s| s.targets()).collect();
        let markdown = self.markdown(plan, &machine, &targets, bench.started.elapsed());
        println!("{markdown}");

        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target")
            .join("bench");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("report.md"), &markdown)?;
        let failures = bench.failures();
        let json = self.json(plan, machine, &targets, &failures, bench.started.elapsed());
        std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(&json)?)?;
        eprintln!("bench: wrote {}/report.{{md,json}}", dir.display());
        if !plan.quick || quick_plots {
            let plot_dir = if plan.quick {
                dir.clone()
            } else {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("docs")
            };
            std::fs::create_dir_all(&plot_dir)?;
            match plots::draw(&plot_dir, &self.sections) {
                Ok(files) => eprintln!(
                    "bench: wrote {}",
                    files
                        .iter()
                        .map(|f| f.display().to_string())
                        .collect::<Vec<_>>()
                        .join(" and ")
                ),
                Err(err) => eprintln!("bench: plots skipped: {err}"),
            }
        }

        let started = bench.started;
        drop(bench);
        eprintln!(
            "bench: finished in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        if failures.is_empty() {
            Ok(0)
        } else {
            for f in &failures {
                eprintln!("bench: FAILED: {f}");
            }
            Ok(1)
        }
    }

    /// Every row of the latency table, with its ratio to its baseline.
    fn latency(&self) -> impl Iterator<Item = (&Series, Option<(Spread, String)>)> {
        self.sections.iter().flat_map(|section| {
            let rows = section.latency();
            rows.iter().map(move |s| (s, s.ratio(rows)))
        })
    }

    fn markdown(&self, plan: &Plan, m: &Value, targets: &[Target], elapsed: Duration) -> String {
        let mut md = String::new();
        let _ = writeln!(
            md,
            "## cacheaside benchmark ({} run, {:.0} s)\n",
            plan.mode(),
            elapsed.as_secs_f64()
        );
        let _ = writeln!(
            md,
            "Machine: {} ({} cores, {} GiB), Linux {}; PostgreSQL {}, Redis {}, {}. \
             Load average at the end: {}. \
             Pools: {BENCH_CACHE_POOL} Redis and {BENCH_DB_POOL} Postgres connections, \
             checkout timeout {} s. {} repetitions of everything. At 1 thread the operations take \
             turns call by call ({} ms per operation per repetition); at 50 threads each runs alone \
             for {} ms per repetition, in an order rotated per repetition. Each cell: the median \
             across repetitions (min–max). A ratio is paired by repetition (the operation over its \
             baseline in the same repetition, then the median (min–max) of those): at 1 thread of \
             mean latencies without the slowest 1% of calls, at 50 threads of throughputs.\n",
            m["cpu"].as_str().unwrap_or("?"),
            m["cores"],
            m["memory_gib"],
            m["kernel"].as_str().unwrap_or("?"),
            m["postgres"].as_str().unwrap_or("?"),
            m["redis"].as_str().unwrap_or("?"),
            m["servers"].as_str().unwrap_or("?"),
            m["load_average_at_end"].as_str().unwrap_or("?"),
            BENCH_POOL_TIMEOUT.as_secs(),
            plan.reps,
            plan.rep_time.as_millis(),
            plan.rep_time.as_millis(),
        );
        md.push_str("### Latency and throughput\n\n");
        md.push_str("| # | measurement | threads | median µs | p99 µs | ops/s | ratio |\n");
        md.push_str("|---|---|---:|---:|---:|---:|---|\n");
        let mut rows: Vec<_> = self.latency().collect();
        // By item number (12 after 2), then its letter.
        rows.sort_by_key(|(s, _)| {
            let digits = s
                .item
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(s.item.len());
            let number = s.item[..digits].parse::<u32>().unwrap_or(u32::MAX);
            (number, &s.item[digits..], s.threads, s.id)
        });
        for (s, ratio) in rows {
            let ratio = ratio.map_or(String::new(), |(r, what)| {
                if r.min == r.max {
                    format!("{:.3}{what}", r.median)
                } else {
                    format!("{:.3}{what} ({:.3}–{:.3})", r.median, r.min, r.max)
                }
            });
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} |",
                s.item,
                s.label,
                s.threads,
                spread_cell(s.median(), 1),
                spread_cell(s.p99(), 1),
                spread_cell(s.throughput(), 0),
                ratio
            );
        }

        for section in &self.sections {
            section.markdown(&mut md);
        }

        md.push_str("\n### Targets\n\n| target | measured | limit | met |\n|---|---|---|---|\n");
        for t in targets {
            let met = match t.met {
                Some(true) => "met",
                Some(false) => "**not met**",
                None => "not measured",
            };
            let _ = writeln!(md, "| {} | {} | {} | {met} |", t.name, t.value, t.limit);
        }
        md
    }

    fn json(
        &self,
        plan: &Plan,
        machine: Value,
        targets: &[Target],
        failures: &[String],
        elapsed: Duration,
    ) -> Value {
        let mut report = json!({
            "mode": plan.mode(),
            "elapsed_s": elapsed.as_secs_f64(),
            "machine": machine,
            "settings": {
                "repetitions": plan.reps,
                "repetition_ms": plan.rep_time.as_millis() as u64,
                "misses_per_repetition": plan.misses,
                "cache_pool_size": BENCH_CACHE_POOL,
                "db_pool_size": BENCH_DB_POOL,
                "pool_timeout_s": BENCH_POOL_TIMEOUT.as_secs(),
            },
            "latency": self.latency().map(|(s, ratio)| {
                let mut v = s.json();
                if let Some((r, what)) = ratio {
                    v["ratio"] = json!({
                        "paired_by_repetition": r.json(),
                        "to": what.trim_start_matches("× "),
                    });
                }
                v
            }).collect::<Vec<_>>(),
            "targets": targets.iter().map(|t| json!({
                "target": t.name, "measured": t.value, "limit": t.limit, "met": t.met,
            })).collect::<Vec<_>>(),
            "failures": failures,
        });
        for (key, value) in self.sections.iter().filter_map(|s| s.json()) {
            report[key] = value;
        }
        report
    }
}

// ---- machine ----------------------------------------------------------------

/// The machine and the servers, for the report's first paragraph.
fn machine_info(client: &Client) -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| (kib / 1024.0 / 1024.0 * 10.0).round() / 10.0);
    // Other work on the machine moves every number here; say how busy it was.
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let postgres = client
        .db()
        .query_opt("SHOW server_version", &[])
        .ok()
        .flatten()
        .map(|r| r.get::<_, String>(0))
        .unwrap_or_default();
    let redis = client
        .cache()
        .with_connection(|c| redis::cmd("INFO").arg("server").query::<String>(c))
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("redis_version:"))
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_default();
    json!({
        "cpu": cpu,
        "cores": cores,
        "memory_gib": mem_gib,
        "kernel": kernel,
        "load_average_at_end": load,
        "postgres": postgres,
        "redis": redis,
        "servers": "local, over TCP on 127.0.0.1",
    })
}
