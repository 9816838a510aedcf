//! Where expressions run. A decision evaluates its expressions in place under small limits
//! (a few thousand steps, a little memory and stack); one that needs more *yields*, and the rest
//! of the decision runs on a few threads of their own, off the async runtime, under the full
//! limits: steps, a wall-clock deadline, a memory account and a stack guard
//! (`sluice_core::expr::EvalLimits`). So a tenant's heavy or hostile expression holds one of these
//! threads for at most the deadline and never a runtime thread: `/healthz`, other tenants' steps
//! and SIGTERM are served meanwhile.
//!
//! The evaluation threads' stacks are sized from the memory limit
//! (`EvalLimits::thread_stack`): a value nests one level per allocation, so the deepest value the
//! memory account allows bounds what dropping or comparing it recurses over. The stacks are
//! reserved address space; only what an evaluation touches becomes memory.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_core::expr::EvalLimits;
use tokio::sync::{oneshot, Semaphore};

use crate::{Error, Result};

/// What a decision may use in place, on a runtime thread, before it moves to the evaluation
/// threads. Small enough that the deepest value it can build is dropped within a runtime
/// thread's stack; large enough that most input mappings and conditions never move.
pub(crate) const IN_PLACE: EvalLimits =
    EvalLimits { steps: 4096, stack_bytes: 128 * 1024, memory_bytes: 256 * 1024, deadline: None, yield_on_limit: true };

type Job = Box<dyn FnOnce() + Send>;

/// A fixed set of threads with large stacks that run evaluations, and a bound on how many wait.
pub(crate) struct EvalPool {
    jobs: mpsc::Sender<Job>,
    /// One permit per evaluation queued or running: callers beyond it wait (asynchronously).
    permits: Arc<Semaphore>,
    memory_bytes: usize,
    time_limit: Duration,
}

impl EvalPool {
    /// Starts `threads` evaluation threads (at least one) whose evaluations may hold
    /// `memory_bytes` each and run for `time_limit`.
    pub fn start(threads: usize, memory_bytes: usize, time_limit: Duration) -> Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let threads = threads.max(1);
        let stack = EvalLimits::engine(memory_bytes).thread_stack();
        for i in 0..threads {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("sluice-eval-{i}"))
                .stack_size(stack)
                .spawn(move || loop {
                    // The lock is held only while waiting for the next job.
                    let job = match rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    match job {
                        // A panic is the job's answer (its sender is dropped); the thread lives on.
                        Ok(job) => drop(std::panic::catch_unwind(std::panic::AssertUnwindSafe(job))),
                        Err(_) => return, // the engine is gone
                    }
                })
                .map_err(|e| Error::Internal(format!("cannot start an evaluation thread: {e}")))?;
        }
        Ok(Self { jobs: tx, permits: Arc::new(Semaphore::new(threads * 64)), memory_bytes, time_limit })
    }

    /// Runs `f` on an evaluation thread under the full limits (its deadline counted from when it
    /// starts there) and waits for its answer.
    pub async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let _permit =
            self.permits.acquire().await.map_err(|_| Error::Internal("the evaluation threads stopped".into()))?;
        let (tx, rx) = oneshot::channel();
        let memory_bytes = self.memory_bytes;
        let time_limit = self.time_limit;
        let job: Job = Box::new(move || {
            let limits = EvalLimits { deadline: Some(Instant::now() + time_limit), ..EvalLimits::engine(memory_bytes) };
            let _ = tx.send(sluice_core::expr::with_limits(limits, f));
        });
        self.jobs.send(job).map_err(|_| Error::Internal("the evaluation threads stopped".into()))?;
        rx.await.map_err(|_| Error::Internal("an expression evaluation panicked".into()))
    }
}
