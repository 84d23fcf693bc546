//! The client's background pool: a few threads for work no caller should
//! wait for (early refreshes, reloads that outlived the soft timeout).
//!
//! Guarantees: at most `threads` threads (started on first use) and
//! [`QUEUE`] queued jobs; when both are taken, [`Background::spawn`] hands
//! the job back, and the pool never grows. What a caller then does is its
//! own: the engine skips an early refresh it could not queue (the cached
//! value is fresh), and serves the fail-safe copy when a reload past the
//! soft timeout cannot be queued, so neither makes a caller wait for a load. Dropping the pool runs what is queued and joins
//! every thread (a job is a load plus a fill, each bounded by its timeouts).

use crate::observe::report;
use std::collections::VecDeque;
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};

/// Most jobs waiting for a thread.
pub(crate) const QUEUE: usize = 64;

pub(crate) type Job = Box<dyn FnOnce() + Send + 'static>;

pub(crate) struct Background {
    max_threads: usize,
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

struct Shared {
    /// Guarded by its mutex, never held while a job runs.
    queue: Mutex<Queue>,
    ready: Condvar,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    idle: usize,
    stop: bool,
}

impl Background {
    /// A pool of at most `threads` threads; 0 makes every `spawn` hand the
    /// job back.
    pub fn new(threads: u32) -> Background {
        Background {
            max_threads: threads as usize,
            shared: Arc::new(Shared {
                queue: Mutex::new(Queue::default()),
                ready: Condvar::new(),
            }),
            threads: Mutex::new(Vec::new()),
        }
    }

    /// True when a [`spawn`](Self::spawn) now would hand the job back
    /// because every thread is busy and the queue is full (never for a pool
    /// of 0 threads, whose callers always run their jobs themselves).
    pub fn overloaded(&self) -> bool {
        self.max_threads > 0 && {
            let queue = self.shared.queue.lock();
            queue.stop || queue.jobs.len() >= QUEUE
        }
    }

    /// True for a pool of 0 threads: callers run their jobs themselves.
    pub fn inline(&self) -> bool {
        self.max_threads == 0
    }

    /// Queues `job`, or hands it back when the pool is full.
    pub fn spawn(&self, job: Job) -> Result<(), Job> {
        if self.max_threads == 0 {
            return Err(job);
        }
        let mut queue = self.shared.queue.lock();
        if queue.stop || queue.jobs.len() >= QUEUE {
            return Err(job);
        }
        queue.jobs.push_back(job);
        let needs_thread = queue.idle < queue.jobs.len();
        drop(queue);
        if needs_thread {
            self.grow();
        }
        self.shared.ready.notify_one();
        Ok(())
    }

    fn grow(&self) {
        let mut threads = self.threads.lock();
        if threads.len() >= self.max_threads {
            return;
        }
        let shared = Arc::clone(&self.shared);
        match std::thread::Builder::new()
            .name("cacheaside-background".into())
            .spawn(move || shared.work())
        {
            Ok(thread) => threads.push(thread),
            // The job stays queued for the threads there are; with none, the
            // drop below runs it.
            Err(err) => report!(warn, "cannot start a background thread: {err}"),
        }
    }
}

impl Shared {
    fn work(&self) {
        let mut queue = self.queue.lock();
        loop {
            if let Some(job) = queue.jobs.pop_front() {
                drop(queue);
                // A panicking job must not take the thread (and the queue
                // behind it) down; its own guards have already cleaned up.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                queue = self.queue.lock();
                continue;
            }
            if queue.stop {
                return;
            }
            queue.idle += 1;
            self.ready.wait(&mut queue);
            queue.idle -= 1;
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.shared.queue.lock().stop = true;
        self.shared.ready.notify_all();
        let current = std::thread::current().id();
        for thread in self.threads.lock().drain(..) {
            // The last owner of the engine may be one of our own jobs: it
            // cannot join itself, and finishes on its own.
            if thread.thread().id() != current {
                let _ = thread.join();
            }
        }
        // Jobs no thread took (none could be started): run them here.
        let left: Vec<Job> = self.shared.queue.lock().jobs.drain(..).collect();
        for job in left {
            job();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn runs_jobs_and_hands_back_what_does_not_fit() {
        let pool = Background::new(1);
        let ran = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(std::sync::Barrier::new(2));
        // Occupy the one thread, then fill the queue.
        let (g, r) = (Arc::clone(&gate), Arc::clone(&ran));
        assert!(
            pool.spawn(Box::new(move || {
                g.wait();
                r.fetch_add(1, Ordering::SeqCst);
            }))
            .is_ok()
        );
        let mut accepted = 1;
        let mut refused = 0;
        for _ in 0..QUEUE + 5 {
            let r = Arc::clone(&ran);
            match pool.spawn(Box::new(move || {
                r.fetch_add(1, Ordering::SeqCst);
            })) {
                Ok(()) => accepted += 1,
                Err(_) => refused += 1,
            }
        }
        assert!(refused >= 4, "a full queue hands jobs back ({refused})");
        gate.wait();
        drop(pool); // runs the queue and joins
        assert_eq!(ran.load(Ordering::SeqCst), accepted);
    }

    #[test]
    fn zero_threads_hands_every_job_back() {
        let pool = Background::new(0);
        assert!(pool.spawn(Box::new(|| {})).is_err());
    }
}
