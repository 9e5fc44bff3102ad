//! Running one claimed job: decode, call the handler under its timeout and the
//! worker's shutdown, catch panics, report, and go on with the next job Redis handed
//! over in the same round trip.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::de::DeserializeOwned;
use tokio::sync::OwnedSemaphorePermit;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::breaker::{Breaker, BreakerState, Outcome};
use super::claim::{self, ClaimArgs, Claimed};
use super::handler::{Handler, JobContext};
use super::lease::{Held, Registry};
use super::report::{Acked, Report, Reporter};
use super::{AHEAD_WAIT, HAND_BACK_WAIT, QUICK_AHEAD, WorkerConfig};
use crate::error::{Error, JobError};
use crate::metrics;
use crate::redis::Shared;

/// Reports on their way, each with the number of jobs it asked for.
type InFlight = VecDeque<(usize, JoinHandle<Vec<Claimed>>)>;

/// The jobs the reports on their way will hand over, at most.
fn coming(in_flight: &InFlight) -> usize {
    in_flight.iter().map(|(n, _)| n).sum()
}

/// Everything a job task needs, shared by all of a worker's tasks.
#[derive(Debug)]
pub(crate) struct Runner<H> {
    pub(crate) queues: Vec<Arc<Shared>>,
    pub(crate) handler: Arc<H>,
    pub(crate) config: WorkerConfig,
    pub(crate) args: ClaimArgs,
    pub(crate) registry: Registry,
    /// One per queue, in the order of `queues`.
    pub(crate) reporters: Vec<Reporter>,
    pub(crate) breaker: Breaker,
    /// Stop taking jobs (shutdown began).
    pub(crate) stopping: CancellationToken,
    /// The shutdown grace is over: interrupt handlers and hand their jobs back.
    pub(crate) interrupt: CancellationToken,
}

/// How an attempt ended, before it is reported.
enum Ending {
    Done(Result<Vec<u8>, JobError>),
    /// The worker is stopping: hand the job back untouched.
    Interrupted,
}

impl<H> Runner<H> {
    /// Runs `job`, then any job handed over with its report, holding one slot.
    ///
    /// The slot is shared with the attempt's blocking work
    /// ([`JobContext::run_blocking`]): an attempt that timed out while its blocking
    /// work goes on keeps the slot busy until that work really ends, so no second job
    /// starts on a busy device.
    ///
    /// A slot of a worker on one queue prefetches: it keeps claimed jobs ahead, held
    /// (their leases renewed by the heartbeat like any other) until they run, so the
    /// next job starts while the last one's report (which claims the one after) is
    /// still on its way, and reports need not wait for each other. How many follows
    /// the pace of its attempts (see [`AHEAD_WAIT`]): up to [`QUICK_AHEAD`] for quick
    /// ones; for slow ones one on a one-slot worker and none on a worker of several
    /// slots. When slow attempts follow quick ones, what the slot holds beyond what it
    /// would start within [`HAND_BACK_WAIT`] goes back to the head of its lane, in
    /// order, its attempts uncounted, so no job waits behind slow ones for a slot when
    /// other slots or workers could run it. A job ahead that will not run (shutdown,
    /// breaker, a lingering attempt) is handed back too.
    pub(crate) async fn run<J>(self: Arc<Self>, mut job: Claimed, slot: OwnedSemaphorePermit)
    where
        J: DeserializeOwned + Send + 'static,
        H: Handler<J>,
    {
        let slot = Arc::new(slot);
        let mut ahead: VecDeque<Claimed> = VecDeque::new();
        // Reports on their way, oldest first.
        let mut in_flight = InFlight::new();
        // A spread worker's slot returns to the claim loop after a while.
        let run_ends = tokio::time::Instant::now() + self.spread_run();
        loop {
            let shared = self.queues[job.queue].clone();
            let began = tokio::time::Instant::now();
            let ending = self.attempt::<J>(&shared, &job, &slot).await;
            let took = began.elapsed();
            let (ahead_max, keep) = self.ahead(took);
            // Blocking work of this attempt still runs: the slot is not free.
            let lingering = Arc::strong_count(&slot) > 1;
            let outcome = match &ending {
                Ending::Done(Ok(_)) => Outcome::Success,
                Ending::Done(Err(e)) if e.is_retryable() => Outcome::TransientFailure,
                _ => Outcome::Neutral,
            };
            if let Some(state) = self.breaker.record(outcome) {
                self.publish_breaker(state);
            }
            let report = match ending {
                Ending::Interrupted => {
                    for (_, reporting) in in_flight.drain(..) {
                        ahead.extend(reporting.await.unwrap_or_default());
                    }
                    ahead.push_front(job);
                    self.hand_back(ahead, "handed back on shutdown").await;
                    return;
                }
                Ending::Done(Ok(bytes)) => Report::Completed(bytes),
                Ending::Done(Err(error)) => {
                    let retry_in = self.retry_in(&job, &error);
                    Report::Failed { error, retry_in }
                }
            };
            // One queue (or a spread worker's run): the report claims the next job in
            // the same round trip.
            let claim_more = (self.queues.len() == 1 || tokio::time::Instant::now() < run_ends)
                && !lingering
                && !self.stopping.is_cancelled()
                && self.breaker.is_closed();
            if !claim_more {
                for (_, reporting) in in_flight.drain(..) {
                    ahead.extend(reporting.await.unwrap_or_default());
                }
                self.hand_back(std::mem::take(&mut ahead), "not run; handed back")
                    .await;
            }
            // Reports already answered hand over their jobs without a wait.
            while in_flight.front().is_some_and(|(_, r)| r.is_finished()) {
                if let Some((_, reporting)) = in_flight.pop_front() {
                    ahead.extend(reporting.await.unwrap_or_default());
                }
            }
            if claim_more && ahead.len() + coming(&in_flight) > keep {
                // Slow attempts after quick ones: the slot holds more than it will start
                // soon. The jobs still coming are claimed already, so they are waited
                // for; the excess goes back, in order, to the head of the lane.
                for (_, reporting) in in_flight.drain(..) {
                    ahead.extend(reporting.await.unwrap_or_default());
                }
                if ahead.len() > keep {
                    let excess = ahead.split_off(keep);
                    self.hand_back(excess, "slow attempts; handed back").await;
                }
            }
            // The next job and the ones to keep ahead, less those in hand or coming.
            let coming = coming(&in_flight);
            let claim = if claim_more {
                (1 + ahead_max).saturating_sub(ahead.len() + coming)
            } else {
                0
            };
            let reporting = self.clone().report(job, report, claim);
            if ahead.is_empty() && in_flight.is_empty() {
                let mut next = reporting.await.into_iter();
                match next.next() {
                    Some(first) => {
                        job = first;
                        ahead.extend(next);
                    }
                    None => return,
                }
                continue;
            }
            // A job in hand runs while this report (and any before it) travels.
            in_flight.push_back((claim, tokio::spawn(reporting)));
            job = loop {
                if let Some(next) = ahead.pop_front() {
                    break next;
                }
                match in_flight.pop_front() {
                    Some((_, reporting)) => ahead.extend(reporting.await.unwrap_or_default()),
                    None => return,
                }
            };
        }
    }

    /// After an attempt that took `took`: how many jobs the slot keeps ahead of its
    /// next one (see [`Runner::run`]), and how many it may hold in all (the next one
    /// included) before it hands the rest back.
    fn ahead(&self, took: Duration) -> (usize, usize) {
        if self.queues.len() != 1 {
            return (0, 1);
        }
        let took = took.as_nanos().max(1);
        let floor = usize::from(self.config.concurrency == 1);
        let paced = |wait: Duration| usize::try_from(wait.as_nanos() / took).unwrap_or(usize::MAX);
        let ahead = paced(AHEAD_WAIT).clamp(floor, QUICK_AHEAD);
        (ahead, paced(HAND_BACK_WAIT).max(1 + ahead))
    }

    /// How long a slot takes jobs from one queue through its reports: a spread
    /// worker's slot (with a slot per queue at least, so every queue keeps one) for a
    /// while; otherwise each claim goes through the claim loop's turns.
    fn spread_run(&self) -> Duration {
        let spread = self.config.spread && self.config.concurrency >= self.queues.len();
        if spread {
            super::SPREAD_RUN
        } else {
            Duration::ZERO
        }
    }

    /// Reports an attempt (the job stays held until Redis has the report, so the
    /// heartbeat renews its lease while the report waits out an outage, and the
    /// retries stop only when the lease is lost or shutdown's grace ends). Returns the
    /// up to `claim` jobs handed over with it, already held.
    fn report(
        self: Arc<Self>,
        job: Claimed,
        report: Report,
        claim: usize,
    ) -> impl Future<Output = Vec<Claimed>> {
        let lost = self.registry.lost_flag(job.queue, &job.id);
        // In line now, not when the future first runs: a slot's reports (and the jobs
        // they claim) keep its order even when several travel at once.
        let acked = self.reporters[job.queue].report(&job, report, claim, lost);
        async move { self.reported(job, acked.await) }
    }

    /// What a report's answer leaves: the jobs it handed over, now held.
    fn reported(&self, job: Claimed, acked: Result<(Report, Acked), Error>) -> Vec<Claimed> {
        self.registry.remove(job.queue, &job.id);
        match acked {
            Ok((report, acked)) => {
                log_outcome(&job, &report, &acked.outcome);
                record_metrics(&self.queues[job.queue].name, &report, &acked.outcome);
                for next in &acked.next {
                    self.registry.hold(next.queue, &next.id, &next.token);
                }
                acked.next
            }
            Err(e) => {
                tracing::error!(job = %job.id, error = %e, "report failed; the job runs again after its lease");
                Vec::new()
            }
        }
    }

    /// Hands jobs this slot will not run back to ready (claimed means run or handed
    /// back); the attempt is not counted. `jobs` in the order they were claimed: each
    /// goes back to the head of its lane, so the last goes first and they come out
    /// in that order again.
    async fn hand_back(
        &self,
        jobs: impl IntoIterator<Item = Claimed, IntoIter: DoubleEndedIterator>,
        why: &str,
    ) {
        for job in jobs.into_iter().rev() {
            self.registry.remove(job.queue, &job.id);
            match claim::release(&self.queues[job.queue], &job, self.config.lease).await {
                Ok(outcome) => tracing::info!(job = %job.id, %outcome, "{why}"),
                Err(e) => {
                    tracing::warn!(job = %job.id, error = %e, "hand-back failed; the lease will expire")
                }
            }
        }
    }

    /// Tells Redis (stats, events) that the breaker changed state; best effort, off
    /// the job's path.
    pub(crate) fn publish_breaker(&self, state: BreakerState) {
        match state {
            BreakerState::Open => {
                tracing::warn!(worker = %self.args.worker_id, "circuit breaker open: claiming paused")
            }
            _ => {
                tracing::info!(worker = %self.args.worker_id, state = state.as_str(), "circuit breaker")
            }
        }
        for queue in &self.queues {
            let queue = queue.clone();
            let worker = self.args.worker_id.clone();
            tokio::spawn(async move {
                let mut inv = queue.invocation(queue.scripts.breaker);
                inv.arg(&worker).arg(state.as_str());
                if let Err(e) = queue.invoke::<i64>(&inv).await {
                    tracing::warn!(error = %e, "could not record the breaker state");
                }
            });
        }
    }

    /// How long until the retry, or `None` for the dead letters.
    fn retry_in(&self, job: &Claimed, error: &JobError) -> Option<Duration> {
        let record = job.record.as_ref().ok()?;
        if !error.is_retryable() || record.attempts >= record.max_attempts.max(1) {
            return None;
        }
        let policy = record.retry.as_ref().unwrap_or(&self.config.retry);
        Some(
            error
                .retry_delay()
                .unwrap_or_else(|| policy.delay_for(record.attempts)),
        )
    }

    async fn attempt<J>(
        &self,
        shared: &Arc<Shared>,
        job: &Claimed,
        slot: &Arc<OwnedSemaphorePermit>,
    ) -> Ending
    where
        J: DeserializeOwned + Send + 'static,
        H: Handler<J>,
    {
        let record = match &job.record {
            Ok(r) => r,
            Err(e) => return Ending::Done(Err(JobError::Decode(format!("job record: {e}")))),
        };
        let payload: J = match serde_json::from_slice(&job.payload) {
            Ok(p) => p,
            Err(e) => return Ending::Done(Err(JobError::Decode(e.to_string()))),
        };
        let Held { cancel, lost, .. } = self.registry.hold(job.queue, &job.id, &job.token);
        let ctx = JobContext {
            id: job.id.clone(),
            attempt: record.attempts,
            max_attempts: record.max_attempts,
            token: job.token.clone(),
            cancel: cancel.clone(),
            queue: shared.clone(),
            slot: Some(slot.clone()),
        };
        let ready_at = record.created_at.max(record.run_at);
        metrics::waited(
            &shared.name,
            Duration::from_millis(record.started_at.saturating_sub(ready_at)),
        );
        let timeout = record
            .timeout_ms
            .map(Duration::from_millis)
            .or(self.config.timeout);
        let started = std::time::Instant::now();
        let ending = self.supervise(payload, ctx, cancel, timeout).await;
        metrics::duration(&shared.name, started.elapsed());
        if lost.load(Ordering::SeqCst) {
            tracing::warn!(job = %job.id, "finished after losing its lease; Redis will refuse the report");
        }
        ending
    }

    /// Runs the handler in a task of its own, so a panic is caught as that task's
    /// failure and a handler that ignores its token can still be dropped.
    async fn supervise<J>(
        &self,
        payload: J,
        ctx: JobContext,
        cancel: CancellationToken,
        timeout: Option<Duration>,
    ) -> Ending
    where
        J: Send + 'static,
        H: Handler<J>,
    {
        let handler = self.handler.clone();
        let mut task = tokio::spawn(async move {
            let output = handler.handle(payload, ctx).await?;
            serde_json::to_vec(&output)
                .map_err(|e| JobError::permanent(format!("cannot serialise the output: {e}")))
        });
        let expired = async {
            match timeout {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending().await,
            }
        };
        // Why the handler is asked to stop, if it is.
        let stop_reason = tokio::select! {
            joined = &mut task => return Ending::Done(joined_result(joined)),
            _ = expired => timeout.map(JobError::Timeout),
            _ = cancel.cancelled() => None,
            _ = self.interrupt.cancelled() => {
                cancel.cancel();
                task.abort();
                let _ = task.await;
                return Ending::Interrupted;
            }
        };
        cancel.cancel();
        tokio::select! {
            joined = &mut task => match stop_reason {
                Some(error) => Ending::Done(Err(error)),
                None => Ending::Done(joined_result(joined)),
            },
            _ = tokio::time::sleep(self.config.cancel_grace) => {
                // Dropped (its context with it, so only blocking work it started
                // through the context still holds the slot).
                task.abort();
                let _ = task.await;
                Ending::Done(Err(stop_reason.unwrap_or(JobError::Cancelled)))
            }
            _ = self.interrupt.cancelled() => {
                task.abort();
                let _ = task.await;
                Ending::Interrupted
            }
        }
    }
}

fn joined_result(
    joined: Result<Result<Vec<u8>, JobError>, tokio::task::JoinError>,
) -> Result<Vec<u8>, JobError> {
    match joined {
        Ok(result) => result,
        Err(e) if e.is_panic() => {
            let panic = e.into_panic();
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".to_owned());
            Err(JobError::Panic(message))
        }
        Err(_) => Err(JobError::Cancelled),
    }
}

fn record_metrics(queue: &str, report: &Report, outcome: &str) {
    if let Report::Failed { error, .. } = report
        && outcome != "lost"
    {
        metrics::failed(queue, error.kind());
    }
    let name = match outcome {
        "completed" => metrics::COMPLETED,
        "retrying" => metrics::RETRIED,
        "dead" => metrics::DEAD,
        "cancelled" => metrics::CANCELLED,
        _ => return,
    };
    metrics::count(name, queue, 1);
}

fn log_outcome(job: &Claimed, report: &Report, outcome: &str) {
    match (report, outcome) {
        (_, "lost") => tracing::warn!(job = %job.id, "lease was lost; Redis refused the report"),
        (Report::Failed { error, .. }, _) => {
            tracing::info!(job = %job.id, %error, %outcome, "attempt failed")
        }
        _ => tracing::debug!(job = %job.id, %outcome, "job finished"),
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;

    use super::*;

    async fn joined<F>(work: F) -> Result<Vec<u8>, JobError>
    where
        F: Future<Output = Result<Vec<u8>, JobError>> + Send + 'static,
    {
        joined_result(tokio::spawn(work).await)
    }

    #[tokio::test]
    async fn a_handlers_panic_fails_the_attempt_with_its_message() {
        assert_eq!(
            joined(async { panic!("static text") }).await,
            Err(JobError::Panic("static text".into()))
        );
        let n = 7;
        assert_eq!(
            joined(async move { panic!("formatted {n}") }).await,
            Err(JobError::Panic("formatted 7".into()))
        );
        assert_eq!(
            joined(async { std::panic::panic_any(42_u8) }).await,
            Err(JobError::Panic("non-string panic payload".into()))
        );
    }

    #[tokio::test]
    async fn a_finished_handler_gives_its_own_result_and_a_dropped_one_is_cancelled() {
        assert_eq!(joined(async { Ok(vec![1]) }).await, Ok(vec![1]));
        assert_eq!(
            joined(async { Err(JobError::permanent("bad")) }).await,
            Err(JobError::permanent("bad"))
        );
        let task = tokio::spawn(std::future::pending::<Result<Vec<u8>, JobError>>());
        task.abort();
        assert_eq!(joined_result(task.await), Err(JobError::Cancelled));
    }
}
