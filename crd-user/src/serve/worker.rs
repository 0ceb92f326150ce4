//! The freezer: one OS thread that owns the loaded harvesters and runs every harvest,
//! freeze and checkpoint, one at a time.
//!
//! Why one thread, and one job at a time:
//! - ptrace binds a tracee to the tracer *thread*: a [`crate::freeze::Frozen`] must be
//!   made, used and dropped (resuming its targets) on the thread that seized them, so
//!   freezing cannot hop between tokio's threads.
//! - a harvest is not reentrant: a loaded BPF harvester has one ring buffer and one PID
//!   filter map that its programs share, so two harvests at once would mix their
//!   records. A pool of workers would need a loaded program set each (a load costs
//!   35–70 ms and its ring's memory) for harvests that take a few milliseconds; one
//!   worker keeps one set (two: one listing every process, `match_all`, one filtered)
//!   and serializes the requests, which is what makes the service fast.
//!
//! A job that panics (a bug) is caught: its frozen targets are resumed as the panic
//! unwinds through `Frozen`, its client gets an error, and the worker goes on.
use std::{panic::AssertUnwindSafe, sync::mpsc, thread};

use tokio::sync::oneshot;

use crate::{
    commands::Harvesters,
    harvest::{LoadOptions, Source},
};

type Job = Box<dyn FnOnce(&mut Harvesters) + Send>;

/// The handle the service sends jobs through.
#[derive(Clone)]
pub struct Worker {
    jobs: mpsc::Sender<Job>,
}

/// The worker is gone (it cannot be, short of a bug), or a job panicked.
#[derive(Debug, thiserror::Error)]
#[error("the service's worker failed on this request (a bug: see the service's log)")]
pub struct WorkerFailed;

impl Worker {
    /// Starts the worker, which loads the BPF harvesters before it takes its first job
    /// (a kernel that cannot run them falls back to /proc, as `--source auto` does).
    pub fn start(load: LoadOptions) -> std::io::Result<Self> {
        let (jobs, queue) = mpsc::channel::<Job>();
        thread::Builder::new().name("crd-freezer".into()).spawn(move || {
            let mut harvesters = Harvesters::new(load);
            for match_all in [false, true] {
                if let Err(e) = harvesters.get(Source::Auto, match_all) {
                    log::warn!("cannot load the harvester now ({e}); each request will try again");
                }
            }
            for job in queue {
                if std::panic::catch_unwind(AssertUnwindSafe(|| job(&mut harvesters))).is_err() {
                    log::error!("a request panicked; its targets were resumed as it unwound");
                }
            }
        })?;
        Ok(Self { jobs })
    }

    /// Runs `job` on the worker and returns what it returns.
    pub async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce(&mut Harvesters) -> T + Send + 'static,
    ) -> Result<T, WorkerFailed> {
        let (done, result) = oneshot::channel();
        self.jobs
            .send(Box::new(move |harvesters| {
                let _ = done.send(job(harvesters));
            }))
            .map_err(|_| WorkerFailed)?;
        result.await.map_err(|_| WorkerFailed)
    }
}
