//! How much of everything a run does: the full plan, and the quick one of
//! `--quick` (the CI smoke run).

use std::time::Duration;

/// How much of everything a run does.
pub struct Plan {
    pub quick: bool,
    /// Repetitions of every latency measurement.
    pub reps: usize,
    /// How long one repetition of a hit measurement runs.
    pub rep_time: Duration,
    /// Misses per repetition of (5).
    pub misses: usize,
    /// Thread counts of the in-process stampede.
    pub stampede_ns: Vec<usize>,
    pub stampede_reps: usize,
    pub xproc_reps: usize,
    /// Distinct keys of the memory run, and its threads.
    pub memory_keys: u64,
    pub memory_threads: usize,
}

impl Plan {
    pub fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                quick,
                reps: 3,
                rep_time: Duration::from_millis(150),
                misses: 200,
                stampede_ns: vec![50, 200],
                stampede_reps: 2,
                xproc_reps: 1,
                memory_keys: 100_000,
                memory_threads: 8,
            }
        } else {
            Plan {
                quick,
                reps: 5,
                rep_time: Duration::from_millis(500),
                misses: 1000,
                stampede_ns: vec![50, 500, 1000],
                stampede_reps: 3,
                xproc_reps: 3,
                memory_keys: 1_000_000,
                memory_threads: 8,
            }
        }
    }

    /// The run's name in the report: "quick" or "full".
    pub fn mode(&self) -> &'static str {
        if self.quick { "quick" } else { "full" }
    }
}
