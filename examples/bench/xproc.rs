//! The cross-process part of the stampede (6): 4 processes × 50 threads on
//! one cold key through the Redis rebuild lock, each process this binary in
//! its hidden `--child-stampede` mode; and its correctness properties: one
//! query in all, no read failed, no key left in flight in any child.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cacheaside::CacheAside;
use serde_json::{Value, json};

use crate::fixture::{Bench, bench_config, expected_profile};
use crate::measure::Spread;
use crate::stampede::SLOW_LOAD_SQL;
use crate::{BoxResult, wake};

/// Threads of each process in the cross-process stampede, and processes.
pub const XPROC_THREADS: usize = 50;
pub const XPROC_PROCESSES: usize = 4;

/// The cross-process stampede: its repetitions.
pub struct CrossProcess {
    pub queries: Vec<u64>,
    pub wall_ms: Vec<f64>,
    /// Per repetition and child, in ms from the parent's "go": when the
    /// child read "go", when its first thread returned (the value reached
    /// this process), when its last did; and its queries.
    children: Vec<Vec<(f64, f64, f64, u64)>>,
    /// [`wake::wake_floors`] of all the processes' threads, in one process.
    pub wake_ms: Vec<(f64, f64)>,
}

/// P processes × 50 threads on one cold key through the Redis rebuild lock.
/// Children print "ready" when their threads wait at their barrier; the
/// parent writes "go" to all of them at once.
pub fn measure(bench: &Bench) -> BoxResult<CrossProcess> {
    let namespace = bench.namespace.as_str();
    let exe = std::env::current_exe()?;
    let mut out = CrossProcess {
        queries: Vec::new(),
        wall_ms: Vec::new(),
        children: Vec::new(),
        wake_ms: Vec::new(),
    };
    for rep in 0..bench.plan.xproc_reps {
        let key = format!("stampede:xproc:{rep}");
        let mut children: Vec<(Child, ChildStdin, BufReader<ChildStdout>)> = Vec::new();
        for _ in 0..XPROC_PROCESSES {
            let mut child = Command::new(&exe)
                .args([
                    "--child-stampede",
                    namespace,
                    &key,
                    &XPROC_THREADS.to_string(),
                ])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()?;
            let stdin = child.stdin.take().ok_or("child has no stdin")?;
            let stdout = BufReader::new(child.stdout.take().ok_or("child has no stdout")?);
            children.push((child, stdin, stdout));
        }
        for (_, _, stdout) in &mut children {
            let line = read_line(stdout)?;
            if line != "ready" {
                return Err(format!("stampede child said {line:?} instead of ready").into());
            }
        }
        let go_us = epoch_us();
        for (_, stdin, _) in &mut children {
            stdin.write_all(b"go\n")?;
            stdin.flush()?;
        }
        let mut queries = 0;
        let mut last_end_us = go_us;
        let mut details = Vec::new();
        for (child, _, stdout) in &mut children {
            let line = read_line(stdout)?;
            let result: Value = serde_json::from_str(
                line.strip_prefix("result ")
                    .ok_or_else(|| format!("stampede child said {line:?}"))?,
            )?;
            let child_queries = result["queries"].as_u64().ok_or("no queries")?;
            let end_us = result["end_us"].as_u64().ok_or("no end_us")?;
            let child_go_us = result["go_us"].as_u64().ok_or("no go_us")?;
            let first_us = result["first_end_us"].as_u64().ok_or("no first_end_us")?;
            let since_go = |us: u64| us.saturating_sub(go_us) as f64 / 1e3;
            details.push((
                since_go(child_go_us),
                since_go(first_us),
                since_go(end_us),
                child_queries,
            ));
            queries += child_queries;
            last_end_us = last_end_us.max(end_us);
            let errors = result["errors"].as_u64().unwrap_or(u64::MAX);
            if errors != 0 {
                bench.fail(format!(
                    "cross-process stampede: {errors} reads failed in a child"
                ));
            }
            if result["in_flight"].as_u64() != Some(0) {
                bench.fail("cross-process stampede: a child left keys in flight");
            }
            let status = child.wait()?;
            if !status.success() {
                bench.fail(format!("cross-process stampede child exited with {status}"));
            }
        }
        if queries != 1 {
            bench.fail(format!(
                "cross-process stampede ({XPROC_PROCESSES} × {XPROC_THREADS}) sent {queries} queries, expected exactly 1"
            ));
        }
        out.queries.push(queries);
        out.wall_ms
            .push((last_end_us.saturating_sub(go_us)) as f64 / 1e3);
        out.children.push(details);
        out.wake_ms
            .push(wake::wake_floors(XPROC_PROCESSES * XPROC_THREADS)?);
    }
    eprintln!(
        "bench: cross-process stampede: queries {:?}, wall ms {:?}, per child (go read, first done, last done, queries) {:?}",
        out.queries, out.wall_ms, out.children
    );
    Ok(out)
}

impl CrossProcess {
    /// The cross-process stampede in report.json.
    pub fn json(&self) -> Value {
        json!({
            "processes": XPROC_PROCESSES,
            "threads_per_process": XPROC_THREADS,
            "queries": self.queries,
            "wall_ms": self.wall_ms,
            "wall_ms_spread": Spread::of(self.wall_ms.iter().copied()).json(),
            "wake_floor_ms": wake::json(&self.wake_ms),
            "children": self.children.iter().map(|rep| rep.iter().map(|(go, first, last, q)| json!({
                "go_read_ms": go, "first_done_ms": first, "last_done_ms": last, "queries": q,
            })).collect::<Vec<_>>()).collect::<Vec<_>>(),
        })
    }
}

fn read_line(reader: &mut impl BufRead) -> BoxResult<String> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err("a child process exited early (see its error above)".into());
    }
    Ok(line.trim_end().to_owned())
}

fn epoch_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// `--child-stampede NAMESPACE KEY THREADS`: one process of the
/// cross-process stampede. Prints `ready`, waits for `go` on stdin, then
/// prints `result {json}`.
pub fn child(args: &[String]) -> BoxResult<()> {
    let [namespace, key, threads] = args else {
        return Err("usage: --child-stampede NAMESPACE KEY THREADS".into());
    };
    let threads: usize = threads.parse()?;
    let mut config = bench_config(namespace)?;
    // Only a leader queries; followers wait on the condvar. Every connection
    // is opened before "ready" (r2d2's build waits for min_idle), as in a
    // warmed-up service: otherwise the 50 threads' first GETs would wait
    // for new Redis connections inside the timed window.
    config.db_pool_size = 2;
    config.cache_pool_size = 8;
    config.pool_min_idle = 8;
    let engine = CacheAside::open(&config)?;
    let db = engine.db();
    db.query_opt("SELECT 1", &[])?; // connect before the clock starts
    let expected = expected_profile();
    let barrier = Barrier::new(threads + 1);
    // Set when no "go" came (the parent gave up): the threads leave the
    // barrier without reading.
    let abort = AtomicBool::new(false);
    let (go_us, results) = thread::scope(|s| -> BoxResult<_> {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    if abort.load(Ordering::Relaxed) {
                        return (false, epoch_us());
                    }
                    let got = engine.get_or_load(key, Duration::from_secs(60), || {
                        db.query_opt(SLOW_LOAD_SQL, &[])?;
                        Ok(Some(expected.clone()))
                    });
                    if let Err(err) = &got {
                        eprintln!("bench child: read failed: {}", err.chain());
                    }
                    (matches!(&got, Ok(Some(p)) if *p == expected), epoch_us())
                })
            })
            .collect();
        let go = (|| -> BoxResult<()> {
            println!("ready");
            std::io::stdout().flush()?;
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
            if line.trim() != "go" {
                return Err(format!("expected go, got {line:?}").into());
            }
            Ok(())
        })();
        let go_us = epoch_us();
        abort.store(go.is_err(), Ordering::Relaxed);
        // Whatever happened, every thread leaves the barrier.
        barrier.wait();
        let results: Vec<(bool, u64)> = workers
            .into_iter()
            .map(|w| w.join().expect("child thread panicked"))
            .collect();
        go?;
        Ok((go_us, results))
    })?;
    let result = json!({
        "queries": db.query_count() - 1,
        "errors": results.iter().filter(|(ok, _)| !ok).count(),
        "go_us": go_us,
        "end_us": results.iter().map(|(_, end)| *end).max().unwrap_or(go_us),
        "first_end_us": results.iter().map(|(_, end)| *end).min().unwrap_or(go_us),
        "in_flight": engine.in_flight(),
    });
    println!("result {result}");
    Ok(())
}
