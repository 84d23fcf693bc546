//! (8) peak RSS around single-flight reads of many distinct keys, in a
//! fresh process (this binary in its hidden `--child-memory` mode) so the
//! earlier sections' peaks (1000 stampede threads) do not hide it; and the
//! correctness property that no key is left in flight.

use std::fmt::Write as _;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use cacheaside::CacheAside;
use serde_json::{Value, json};

use crate::BoxResult;
use crate::fixture::{Bench, bench_config};
use crate::report::{Section, Target};

/// What the memory child reports.
pub struct Memory {
    keys: u64,
    threads: usize,
    secs: f64,
    rss_before_kib: u64,
    hwm_before_kib: u64,
    rss_after_kib: u64,
    hwm_after_kib: u64,
    in_flight: u64,
}

impl Memory {
    fn growth_kib(&self) -> u64 {
        self.hwm_after_kib.saturating_sub(self.hwm_before_kib)
    }
}

/// (8) Peak RSS around single-flight reads of many distinct keys, in a fresh
/// process so earlier sections' peaks (1000 stampede threads) do not hide it.
pub fn measure(bench: &Bench) -> BoxResult<Memory> {
    let (namespace, plan) = (bench.namespace.as_str(), &bench.plan);
    let exe = std::env::current_exe()?;
    eprintln!(
        "bench: memory: {} distinct keys on {} threads...",
        plan.memory_keys, plan.memory_threads
    );
    let output = Command::new(exe)
        .args([
            "--child-memory",
            namespace,
            &plan.memory_keys.to_string(),
            &plan.memory_threads.to_string(),
        ])
        .stderr(Stdio::inherit())
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("result "))
        .ok_or("the memory child printed no result")?;
    let r: Value = serde_json::from_str(line)?;
    let num = |k: &str| r[k].as_u64().ok_or_else(|| format!("memory child: no {k}"));
    let memory = Memory {
        keys: num("keys")?,
        threads: plan.memory_threads,
        secs: r["secs"].as_f64().unwrap_or(f64::NAN),
        rss_before_kib: num("rss_before_kib")?,
        hwm_before_kib: num("hwm_before_kib")?,
        rss_after_kib: num("rss_after_kib")?,
        hwm_after_kib: num("hwm_after_kib")?,
        in_flight: num("in_flight")?,
    };
    if !output.status.success() {
        bench.fail(format!("memory child exited with {}", output.status));
    }
    if num("errors")? != 0 {
        bench.fail(format!("memory run: {} reads failed", num("errors")?));
    }
    if memory.in_flight != 0 {
        bench.fail(format!(
            "memory run: {} keys still in flight at the end, expected 0",
            memory.in_flight
        ));
    }
    eprintln!(
        "bench: memory: {:.1} s, peak RSS {} -> {} KiB, in flight {}",
        memory.secs, memory.hwm_before_kib, memory.hwm_after_kib, memory.in_flight
    );
    Ok(memory)
}

/// `--child-memory NAMESPACE KEYS THREADS`: single-flight reads of KEYS
/// distinct keys with a trivial loader; prints `result {json}`.
pub fn child(args: &[String]) -> BoxResult<()> {
    let [namespace, keys, threads] = args else {
        return Err("usage: --child-memory NAMESPACE KEYS THREADS".into());
    };
    let (keys, threads): (u64, usize) = (keys.parse()?, threads.parse()?);
    let config = bench_config(namespace)?;
    let engine = CacheAside::open(&config)?;
    // Short-lived: these keys only have to outlive their one read, and Redis
    // then frees them itself, long before the run's clean-up scans for them.
    let ttl = Duration::from_secs(5);
    let read_all = |prefix: &str, count: u64| -> u64 {
        let next = AtomicU64::new(0);
        let errors = AtomicU64::new(0);
        thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    let mut key = String::with_capacity(32);
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= count {
                            break;
                        }
                        key.clear();
                        let _ = write!(key, "{prefix}:{i}");
                        let got = engine.get_or_load(&key, ttl, || Ok(Some(i)));
                        if !matches!(got, Ok(Some(v)) if v == i) {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        errors.into_inner()
    };
    // Warm-up: threads, pool connections, allocator arenas, script cache.
    let mut errors = read_all("mem:warm", 20_000);
    let (rss_before, hwm_before) = rss_kib()?;
    let t = Instant::now();
    errors += read_all("mem", keys);
    let secs = t.elapsed().as_secs_f64();
    let (rss_after, hwm_after) = rss_kib()?;
    let result = json!({
        "keys": keys,
        "secs": secs,
        "errors": errors,
        "rss_before_kib": rss_before,
        "hwm_before_kib": hwm_before,
        "rss_after_kib": rss_after,
        "hwm_after_kib": hwm_after,
        "in_flight": engine.in_flight(),
    });
    println!("result {result}");
    Ok(())
}

/// (VmRSS, VmHWM) of this process, in KiB.
pub fn rss_kib() -> BoxResult<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let field = |name: &str| -> BoxResult<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .ok_or_else(|| format!("no {name} in /proc/self/status"))?;
        Ok(line
            .split_whitespace()
            .nth(1)
            .ok_or("malformed /proc/self/status")?
            .parse()?)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

impl Section for Memory {
    fn markdown(&self, md: &mut String) {
        let mem = self;
        let _ = writeln!(
            md,
            "\n### Memory (8): single-flight reads of {} distinct keys ({} threads, {:.1} s, fresh process)\n",
            mem.keys, mem.threads, mem.secs
        );
        md.push_str("| | before | after | growth |\n|---|---:|---:|---:|\n");
        let mib = |kib: u64| kib as f64 / 1024.0;
        let _ = writeln!(
            md,
            "| peak RSS (VmHWM) MiB | {:.1} | {:.1} | {:.2} |",
            mib(mem.hwm_before_kib),
            mib(mem.hwm_after_kib),
            mib(mem.growth_kib())
        );
        let _ = writeln!(
            md,
            "| RSS (VmRSS) MiB | {:.1} | {:.1} | {:.2} |",
            mib(mem.rss_before_kib),
            mib(mem.rss_after_kib),
            mib(mem.rss_after_kib) - mib(mem.rss_before_kib)
        );
        let _ = writeln!(md, "| `in_flight()` at the end | | {} | |", mem.in_flight);
    }

    fn targets(&self) -> Vec<Target> {
        vec![
            Target {
                name: format!("memory: in-flight keys after {} reads", self.keys),
                value: self.in_flight.to_string(),
                limit: "= 0".into(),
                met: Some(self.in_flight == 0),
            },
            Target {
                name: format!("memory: peak RSS growth over {} keys", self.keys),
                value: format!("{:.2} MiB", self.growth_kib() as f64 / 1024.0),
                limit: "< 10 MiB".into(),
                met: Some(self.growth_kib() < 10 * 1024),
            },
        ]
    }

    fn json(&self) -> Option<(&'static str, Value)> {
        let memory = json!({
            "keys": self.keys,
            "threads": self.threads,
            "secs": self.secs,
            "rss_before_kib": self.rss_before_kib,
            "rss_after_kib": self.rss_after_kib,
            "hwm_before_kib": self.hwm_before_kib,
            "hwm_after_kib": self.hwm_after_kib,
            "peak_growth_kib": self.growth_kib(),
            "in_flight": self.in_flight,
        });
        Some(("memory", memory))
    }
}
