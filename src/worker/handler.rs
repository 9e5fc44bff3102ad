//! What a worker runs: the [`Handler`] trait and the [`JobContext`] each attempt gets.

use std::future::Future;
use std::sync::Arc;

use serde::Serialize;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, JobError};
use crate::job::JobId;
use crate::redis::Shared;

/// Runs jobs of type `J`.
///
/// The worker is generic over its handler, so this trait uses a plain `async fn` shape
/// (`impl Future + Send`) rather than boxing every call. The output is serialised to
/// JSON and stored as the job's result.
pub trait Handler<J>: Send + Sync + 'static {
    /// What a successful attempt produces.
    type Output: Serialize + Send + 'static;

    /// Runs one attempt. Watch `ctx.cancelled()` in long work: it fires on
    /// cancellation, on timeout, and when the worker lost the job's lease.
    fn handle(
        &self,
        job: J,
        ctx: JobContext,
    ) -> impl Future<Output = Result<Self::Output, JobError>> + Send;
}

/// A handler made from an async closure; see [`handler_fn`].
#[derive(Debug, Clone)]
pub struct HandlerFn<F> {
    f: F,
}

/// Makes a handler from an async closure:
/// `handler_fn(|job: MyJob, ctx| async move { Ok::<_, JobError>(work(job)) })`.
pub fn handler_fn<F>(f: F) -> HandlerFn<F> {
    HandlerFn { f }
}

impl<J, F, Fut, O> Handler<J> for HandlerFn<F>
where
    F: Fn(J, JobContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<O, JobError>> + Send,
    O: Serialize + Send + 'static,
{
    type Output = O;

    fn handle(&self, job: J, ctx: JobContext) -> impl Future<Output = Result<O, JobError>> + Send {
        (self.f)(job, ctx)
    }
}

/// What a handler knows about the attempt it runs.
#[derive(Clone)]
pub struct JobContext {
    pub(crate) id: JobId,
    pub(crate) attempt: u32,
    pub(crate) max_attempts: u32,
    pub(crate) token: String,
    pub(crate) cancel: CancellationToken,
    pub(crate) queue: Arc<Shared>,
    /// The worker slot this attempt holds; blocking work started through
    /// [`JobContext::run_blocking`] keeps a share of it until that work ends.
    pub(crate) slot: Option<Arc<OwnedSemaphorePermit>>,
}

impl std::fmt::Debug for JobContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobContext")
            .field("id", &self.id)
            .field("queue", &self.queue.name)
            .field("attempt", &self.attempt)
            .field("max_attempts", &self.max_attempts)
            .field("cancelled", &self.cancel.is_cancelled())
            .finish()
    }
}

impl JobContext {
    /// The job's id: key anything the handler writes by it, so a second run of the
    /// same job (after a lost lease) overwrites rather than duplicates.
    pub fn id(&self) -> &JobId {
        &self.id
    }

    /// The queue's name.
    pub fn queue(&self) -> &str {
        &self.queue.name
    }

    /// This attempt's number, from 1.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Attempts the job has in all.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// A token that fires when the job should stop: cancelled by a caller, timed out,
    /// lease lost, or the worker's shutdown grace is over.
    pub fn cancellation(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Resolves when the job should stop (see [`JobContext::cancellation`]).
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await
    }

    /// Whether the job should stop.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Runs blocking work (inference on a GPU, a long CPU loop) on tokio's blocking
    /// pool, holding this attempt's worker slot until the work really ends.
    ///
    /// A blocking closure cannot be interrupted: when the attempt times out or is
    /// cancelled, the worker reports it at once, but the closure runs on. Started
    /// through here, it keeps the slot busy meanwhile, so the worker starts no other
    /// job on a device that is still in use. Watch [`JobContext::is_cancelled`] inside
    /// the closure to stop early. A panic in the closure fails the attempt.
    pub async fn run_blocking<F, R>(&self, work: F) -> Result<R, JobError>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let slot = self.slot.clone();
        tokio::task::spawn_blocking(move || {
            let out = work();
            drop(slot);
            out
        })
        .await
        .map_err(|e| match e.try_into_panic() {
            Ok(panic) => JobError::Panic(
                panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-string panic payload".to_owned()),
            ),
            Err(_) => JobError::Cancelled,
        })
    }

    /// Reports progress (0 to 100) to `status()` and event listeners. Returns `false`
    /// when this worker no longer owns the job (the handler should stop).
    pub async fn progress(&self, percent: f32) -> Result<bool, Error> {
        let percent = if percent.is_finite() {
            percent.clamp(0.0, 100.0)
        } else {
            0.0
        };
        let mut inv = self.queue.invocation(self.queue.scripts.progress);
        inv.arg(self.id.as_str())
            .arg(&self.token)
            .arg(format!("{percent:.2}"));
        let owned: i64 = self.queue.invoke(&inv).await?;
        Ok(owned == 1)
    }
}
