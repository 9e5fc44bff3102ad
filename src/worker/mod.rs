//! The consumer's side: a [`Worker`] claims jobs from one or more queues, runs them
//! through a [`Handler`] under leases it renews, reports outcomes, recovers jobs of
//! dead workers, and shuts down without losing any.
//!
//! # Layout
//! - `handler`: the [`Handler`] trait and the [`JobContext`] an attempt gets
//! - `claim`: claims and reports (the worker's side of the scripts)
//! - `run`: one job's attempt: timeout, panic, cancellation, hand-back
//! - `lease`: the heartbeat thread that renews leases and recovers dead workers' jobs
//! - `report`: coalesced reports, one script call for all slots' outcomes

mod breaker;
mod claim;
mod handler;
mod lease;
mod report;
mod run;

use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use breaker::{BreakerState, CircuitBreaker};
pub use handler::{Handler, HandlerFn, JobContext, handler_fn};

use crate::error::Error;
use crate::queue::Queue;
use crate::redis::Conn;
use crate::redis::Shared;
use crate::retry::RetryPolicy;
use breaker::{Breaker, Gate};
use claim::{Claim, ClaimArgs};
use lease::{Heartbeat, Registry};
use report::Reporter;
use run::Runner;

/// How long a silent worker is remembered by default (see
/// [`WorkerBuilder::forget_silent_after`]).
const DEFAULT_FORGET_AFTER: Duration = Duration::from_secs(300);

/// The longest an idle worker blocks before looking again, whatever it was told.
const MAX_IDLE_WAIT: Duration = Duration::from_secs(5);

/// How a worker with several queues picks among them.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum QueueOrder {
    /// The first queue with a ready job wins: later queues run only when earlier ones
    /// are empty.
    Strict,
    /// Each queue gets a share of claims proportional to its weight (smooth weighted
    /// round robin: deterministic, no starvation). A queue whose last claim came up
    /// short is asked after the others for the next 50 ms, so a busy worker does not
    /// spend a round trip on an empty queue every claim (a partitioned queue's worker
    /// over mostly idle partitions, say).
    Weighted(Vec<u32>),
}

/// Worker settings.
#[derive(Debug, Clone)]
pub(crate) struct WorkerConfig {
    pub(crate) concurrency: usize,
    pub(crate) lease: Duration,
    pub(crate) heartbeat: Duration,
    pub(crate) forget_after: Duration,
    pub(crate) timeout: Option<Duration>,
    pub(crate) cancel_grace: Duration,
    pub(crate) shutdown_grace: Duration,
    pub(crate) retry: RetryPolicy,
    pub(crate) order: QueueOrder,
    pub(crate) id: String,
    pub(crate) breaker: Option<CircuitBreaker>,
    /// Partitions of one logical queue: claims are split over the queues, and, with a
    /// slot per queue at least, a slot's report claims its next job from the same
    /// queue for a while (see `SPREAD_RUN`), as a one-queue worker's does every time:
    /// one round trip per job instead of two.
    pub(crate) spread: bool,
}

/// How long a slot of a spread worker keeps taking jobs from one queue through its
/// reports before it goes back to the claim loop, which takes turns over the queues.
/// Time, not a count: fast jobs (where a claim per job costs most) run many to a
/// claim, slow ones one, and no queue waits longer than this for a slot to come back.
pub(crate) const SPREAD_RUN: Duration = Duration::from_millis(100);

/// How long a job a slot claims ahead may expect to wait for its turn: a slot of a
/// worker on one queue keeps as many jobs in hand as its last attempt's pace starts
/// within this, up to [`QUICK_AHEAD`] (sixteen no-op jobs of 2 ms). With quick jobs
/// each script call's fixed cost (keys, clock, counters, events) and the round trips,
/// not the jobs, would set the pace. With slow ones (speech) a one-slot worker still
/// keeps one ahead, so its next job starts at once, and a worker of several slots
/// none, so idle slots and workers are not starved of work another holds.
pub(crate) const AHEAD_WAIT: Duration = Duration::from_millis(32);

/// The most jobs a slot keeps in hand beyond the one it runs: sixteen share a report
/// call's fixed cost (at one slot a quarter fewer Redis instructions per no-op job
/// than four, and 1.5 × the throughput; at fifty slots 1.5 × the jobs per second of
/// none).
pub(crate) const QUICK_AHEAD: usize = 16;

/// Jobs a slot holds that it would not start within this, at its last attempt's
/// pace, go back to their lane (quick attempts were followed by slow ones). Well
/// above [`AHEAD_WAIT`], so that attempts slowed by a busy machine do not send back
/// jobs that would soon run.
pub(crate) const HAND_BACK_WAIT: Duration = Duration::from_millis(250);

/// Builds a [`Worker`]; see [`Worker::builder`].
#[derive(Debug)]
pub struct WorkerBuilder<J> {
    queues: Vec<Queue<J>>,
    config: WorkerConfig,
}

impl<J> WorkerBuilder<J> {
    /// Adds a queue, after those already given (its place matters in strict order).
    pub fn queue(mut self, queue: Queue<J>) -> Self {
        self.queues.push(queue);
        self
    }

    /// How to pick among several queues (default strict).
    pub fn order(mut self, order: QueueOrder) -> Self {
        self.config.order = order;
        self
    }

    /// Jobs run at once (default 1: one GPU job at a time). Each slot of a worker on
    /// one queue also keeps claimed jobs ahead while its attempts are quick (up to
    /// sixteen, as many as it starts within 32 ms), held under lease like running
    /// ones; after slow attempts a one-slot worker keeps one and a worker of several
    /// slots none, and hands back the rest.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.config.concurrency = n.max(1);
        self
    }

    /// Lease length (default 30 s): a job whose worker dies is back in the queue
    /// within this long plus one heartbeat. Leases are renewed every `lease / 3` (at
    /// most every second) unless [`WorkerBuilder::heartbeat`] says otherwise.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.config.lease = lease.max(Duration::from_millis(100));
        self.config.heartbeat = (self.config.lease / 3).min(Duration::from_secs(1));
        self
    }

    /// How often leases are renewed, cancellations noticed and other workers' expired
    /// leases recovered (default `lease / 3`, at most 1 s).
    pub fn heartbeat(mut self, every: Duration) -> Self {
        self.config.heartbeat = every.max(Duration::from_millis(10));
        self
    }

    /// How long another worker may stay silent (no heartbeat) before this worker's
    /// heartbeat forgets it: its entry in the worker registry and its breaker state
    /// (default 5 min). A killed worker never unregisters, so this bounds what dead
    /// workers leave in Redis. Keep it well above every worker's heartbeat interval
    /// and lease: a live worker forgotten only re-registers on its next beat, but its
    /// breaker state is lost. At least three of this worker's heartbeats.
    pub fn forget_silent_after(mut self, after: Duration) -> Self {
        self.config.forget_after = after;
        self
    }

    /// Default time limit of one attempt, for jobs that set none (default none).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.config.timeout = Some(timeout);
        self
    }

    /// How long a handler asked to stop (timeout, cancel) gets before it is dropped
    /// (default 5 s).
    pub fn cancel_grace(mut self, grace: Duration) -> Self {
        self.config.cancel_grace = grace;
        self
    }

    /// How long running jobs may finish after shutdown begins before they are handed
    /// back to the queue (default 30 s).
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.config.shutdown_grace = grace;
        self
    }

    /// Retry policy for jobs that do not set their own attempts (default
    /// [`RetryPolicy::default`]).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.config.retry = policy;
        self
    }

    /// Stops claiming after repeated transient failures (default: no breaker). While
    /// open, jobs stay queued untouched for other workers or for later.
    pub fn circuit_breaker(mut self, breaker: CircuitBreaker) -> Self {
        self.config.breaker = Some(breaker);
        self
    }

    /// The worker's id in Redis (default: host-independent random id).
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.config.id = id.into();
        self
    }

    /// The queues are partitions of one logical queue (see [`WorkerConfig::spread`]).
    pub(crate) fn spread(mut self) -> Self {
        self.config.spread = true;
        self
    }

    /// Finishes the worker with its handler.
    pub fn build<H: Handler<J>>(self, handler: H) -> Worker<J, H> {
        Worker {
            queues: self.queues,
            config: self.config,
            handler: Arc::new(handler),
            _job: PhantomData,
        }
    }
}

/// A worker: claims jobs and runs them through its handler until told to stop.
pub struct Worker<J, H> {
    queues: Vec<Queue<J>>,
    config: WorkerConfig,
    handler: Arc<H>,
    _job: PhantomData<fn(J)>,
}

impl<J, H> std::fmt::Debug for Worker<J, H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("queues", &self.queues)
            .field("config", &self.config)
            .finish()
    }
}

impl<J> Worker<J, ()> {
    /// A builder over `queue`; add more with [`WorkerBuilder::queue`].
    pub fn builder(queue: Queue<J>) -> WorkerBuilder<J> {
        WorkerBuilder {
            queues: vec![queue],
            config: WorkerConfig::default(),
        }
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            concurrency: 1,
            lease: Duration::from_secs(30),
            heartbeat: Duration::from_secs(1),
            forget_after: DEFAULT_FORGET_AFTER,
            timeout: None,
            cancel_grace: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(30),
            retry: RetryPolicy::default(),
            order: QueueOrder::Strict,
            id: format!("worker-{}", uuid::Uuid::now_v7().simple()),
            breaker: None,
            spread: false,
        }
    }
}

impl<J, H> Worker<J, H>
where
    J: DeserializeOwned + Send + 'static,
    H: Handler<J>,
{
    /// The worker's id, as stored in Redis.
    pub fn id(&self) -> &str {
        &self.config.id
    }

    /// Runs until `shutdown` resolves, then stops taking jobs, lets running ones
    /// finish within the shutdown grace, and hands the rest back to the queue at once.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), Error> {
        if let QueueOrder::Weighted(w) = &self.config.order
            && (w.len() != self.queues.len() || w.iter().all(|&x| x == 0))
        {
            return Err(Error::InvalidConfig(format!(
                "{} weights for {} queues (and at least one must be non-zero)",
                w.len(),
                self.queues.len()
            )));
        }
        let shared: Vec<Arc<Shared>> = self.queues.iter().map(|q| q.shared().clone()).collect();
        let registry = Registry::default();
        let heartbeat = Heartbeat::start(
            shared.clone(),
            registry.clone(),
            self.config.id.clone(),
            lease::Timing {
                lease: self.config.lease,
                every: self.config.heartbeat,
                forget_after: self.config.forget_after.max(self.config.heartbeat * 3),
            },
        )
        .map_err(|e| Error::InvalidConfig(format!("cannot start the heartbeat thread: {e}")))?;
        let args = ClaimArgs {
            worker_id: self.config.id.clone(),
            lease: self.config.lease,
            default_attempts: self.config.retry.attempts(),
        };
        let interrupt = CancellationToken::new();
        // One call at a time keeps a one-slot worker's reports in order (see
        // worker/report.rs); more slots keep two in flight.
        let in_flight = if self.config.concurrency > 1 { 2 } else { 1 };
        let reporters = shared
            .iter()
            .enumerate()
            .map(|(i, s)| Reporter::start(s.clone(), i, args.clone(), interrupt.clone(), in_flight))
            .collect();
        let runner = Arc::new(Runner {
            queues: shared.clone(),
            handler: self.handler.clone(),
            args,
            reporters,
            config: self.config.clone(),
            registry,
            breaker: Breaker::new(self.config.breaker),
            stopping: CancellationToken::new(),
            interrupt,
        });
        tracing::info!(worker = %self.config.id, queues = ?shared.iter().map(|s| &s.name).collect::<Vec<_>>(), "worker started");

        let mut tasks = JoinSet::new();
        self.dispatch(&runner, &mut tasks, shutdown).await;

        runner.stopping.cancel();
        let grace = tokio::time::sleep(self.config.shutdown_grace);
        tokio::pin!(grace);
        loop {
            tokio::select! {
                joined = tasks.join_next() => match joined {
                    Some(_) => continue,
                    None => break,
                },
                _ = &mut grace, if !runner.interrupt.is_cancelled() => {
                    tracing::info!(running = tasks.len(), "shutdown grace over; handing jobs back");
                    runner.interrupt.cancel();
                }
            }
        }
        heartbeat.stop().await;
        for queue in &shared {
            let mut inv = queue.invocation(queue.scripts.unregister);
            inv.arg(&self.config.id);
            if let Err(e) = queue.invoke::<i64>(&inv).await {
                tracing::warn!(error = %e, "could not unregister the worker");
            }
        }
        tracing::info!(worker = %self.config.id, "worker stopped");
        Ok(())
    }

    /// The claim loop: runs until `shutdown` resolves.
    async fn dispatch(
        &self,
        runner: &Arc<Runner<H>>,
        tasks: &mut JoinSet<()>,
        shutdown: impl Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let slots = Arc::new(Semaphore::new(self.config.concurrency));
        let mut picker = Picker::new(&self.config.order, self.queues.len());
        let mut waiter = Waiter::default();
        let mut backoff = Duration::from_millis(50);
        loop {
            let first = tokio::select! {
                biased;
                _ = &mut shutdown => return,
                permit = slots.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            // The gate is read with a slot in hand: a job that just finished may
            // have opened the breaker.
            let (gate, transition) = runner.breaker.gate();
            if let Some(state) = transition {
                runner.publish_breaker(state);
            }
            let most = match gate {
                Gate::Claim => usize::MAX,
                Gate::Probe => 1,
                Gate::Wait(pause) => {
                    drop(first);
                    tokio::select! {
                        _ = &mut shutdown => return,
                        _ = tokio::time::sleep(pause) => {}
                    }
                    continue;
                }
                Gate::Blocked => {
                    drop(first);
                    // The probe's outcome wakes us; the timer covers a missed wake-up.
                    tokio::select! {
                        _ = &mut shutdown => return,
                        _ = runner.breaker.changed() => {}
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                    continue;
                }
            };
            let mut permits = vec![first];
            while permits.len() < most
                && let Ok(p) = slots.clone().try_acquire_owned()
            {
                permits.push(p);
            }
            while tasks.try_join_next().is_some() {}

            // A claim in flight is never dropped: Redis may already have run it, and
            // jobs it handed over are run or handed back, never stranded until their
            // lease runs out. Shutdown during the claim hands them back at once.
            let claiming = self.claim(runner, &mut picker, permits.len());
            tokio::pin!(claiming);
            let mut stop_now = false;
            let claimed = tokio::select! {
                biased;
                claimed = &mut claiming => claimed,
                _ = &mut shutdown => {
                    stop_now = true;
                    claiming.await
                }
            };
            if stop_now {
                if let Ok(claim) = claimed {
                    for job in claim.jobs {
                        let runner = runner.clone();
                        tasks.spawn(async move {
                            let shared = runner.queues[job.queue].clone();
                            match claim::release(&shared, &job, runner.config.lease).await {
                                Ok(outcome) => tracing::info!(job = %job.id, %outcome, "claimed during shutdown; handed back"),
                                Err(e) => tracing::warn!(job = %job.id, error = %e, "hand-back failed; the lease will expire"),
                            }
                        });
                    }
                }
                return;
            }
            let claim = match claimed {
                Ok(c) => {
                    backoff = Duration::from_millis(50);
                    c
                }
                Err(e) => {
                    tracing::warn!(error = %e, "claim failed; retrying");
                    drop(permits);
                    if gate == Gate::Probe {
                        runner.breaker.probe_unused();
                    }
                    tokio::select! {
                        _ = &mut shutdown => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            if claim.jobs.is_empty() {
                drop(permits);
                if gate == Gate::Probe {
                    runner.breaker.probe_unused();
                }
                let wait = claim
                    .next_wake
                    .unwrap_or(MAX_IDLE_WAIT)
                    .clamp(Duration::from_millis(1), MAX_IDLE_WAIT);
                tokio::select! {
                    _ = &mut shutdown => return,
                    woken = waiter.wait(&self.queues, wait) => if let Err(e) = woken {
                        tracing::warn!(error = %e, "waiting for jobs failed");
                        tokio::select! {
                            _ = &mut shutdown => return,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    },
                }
                continue;
            }
            for (job, permit) in claim.jobs.into_iter().zip(permits) {
                tasks.spawn(runner.clone().run::<J>(job, permit));
            }
        }
    }

    /// Claims up to `n` jobs across the queues, in the order the picker gives.
    async fn claim(
        &self,
        runner: &Runner<H>,
        picker: &mut Picker,
        n: usize,
    ) -> Result<Claim, Error> {
        let mut out = Claim::default();
        let order = picker.order();
        // Spread: each queue is asked for its share first, then those that gave it in
        // full for the rest, so a big claim does not put every slot on one partition.
        let share = if self.config.spread {
            n.div_ceil(order.len().max(1))
        } else {
            n
        };
        let mut full = Vec::new();
        for index in order {
            let want = share.min(n - out.jobs.len());
            if want == 0 {
                break;
            }
            let got = claim::claim(&runner.queues[index], index, want, &runner.args).await?;
            let short = got.jobs.len() < want;
            picker.claimed(index, short);
            if !short {
                full.push(index);
            }
            out.merge(got);
        }
        for index in full {
            let want = n - out.jobs.len();
            if want == 0 || share == n {
                break;
            }
            let got = claim::claim(&runner.queues[index], index, want, &runner.args).await?;
            picker.claimed(index, got.jobs.len() < want);
            out.merge(got);
        }
        Ok(out)
    }
}

/// How long a queue that came up short is asked after the others (weighted order).
const SHORT_BACKOFF: Duration = Duration::from_millis(50);

/// Queue order per claim.
#[derive(Debug)]
struct Picker {
    weights: Option<Vec<i64>>,
    current: Vec<i64>,
    /// Weighted order: until when each queue, found short, goes last.
    short_until: Vec<Option<std::time::Instant>>,
}

impl Picker {
    fn new(order: &QueueOrder, n: usize) -> Self {
        match order {
            QueueOrder::Strict => Picker {
                weights: None,
                current: vec![0; n],
                short_until: vec![None; n],
            },
            QueueOrder::Weighted(w) => Picker {
                weights: Some(w.iter().map(|&x| i64::from(x)).collect()),
                current: vec![0; n],
                short_until: vec![None; n],
            },
        }
    }

    /// Strict: as given. Weighted: smooth weighted round robin picks the first queue,
    /// the rest follow by their current credit, so an empty favourite never idles a
    /// worker while another queue has work.
    fn order(&mut self) -> Vec<usize> {
        let n = self.current.len();
        let Some(weights) = &self.weights else {
            return (0..n).collect();
        };
        let total: i64 = weights.iter().sum();
        for (c, w) in self.current.iter_mut().zip(weights) {
            *c += w;
        }
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| (std::cmp::Reverse(self.current[i]), i));
        self.current[order[0]] -= total;
        // Queues lately found short go last (still asked when the others fall short,
        // so nothing is missed; only the wasted round trips go).
        let now = std::time::Instant::now();
        order.sort_by_key(|&i| self.short_until[i].is_some_and(|t| t > now));
        order
    }

    /// Notes how a claim from queue `index` went: short (it gave fewer jobs than
    /// asked, so it is drained for now) or full. Strict order ignores it.
    fn claimed(&mut self, index: usize, short: bool) {
        if self.weights.is_some() {
            self.short_until[index] = short.then(|| std::time::Instant::now() + SHORT_BACKOFF);
        }
    }
}

/// Blocks an idle worker in Redis until an enqueue pushes a wake token or `wait`
/// passes (the next scheduled job or lease deadline): no polling loop.
#[derive(Debug, Default)]
struct Waiter {
    conns: Vec<Conn>,
}

impl Waiter {
    async fn wait<J>(&mut self, queues: &[Queue<J>], wait: Duration) -> Result<(), Error> {
        let Some(first) = queues.first() else {
            return Ok(());
        };
        let connector = &first.shared().connector;
        // One BLPOP over every queue's wake list works on one node; on a cluster the
        // lists live in different slots, so each gets its own connection.
        let wanted = if connector.is_cluster() {
            queues.len()
        } else {
            1
        };
        while self.conns.len() < wanted {
            self.conns.push(connector.connect_blocking().await?);
        }
        let secs = format!("{:.3}", wait.as_secs_f64());
        if wanted == 1 {
            let mut cmd = redis::cmd("BLPOP");
            for q in queues {
                cmd.arg(q.shared().keys.wake());
            }
            cmd.arg(&secs);
            let _: Option<(String, String)> = cmd.query_async(&mut self.conns[0]).await?;
            return Ok(());
        }
        let waits = self.conns.iter_mut().zip(queues).map(|(conn, q)| {
            let mut cmd = redis::cmd("BLPOP");
            cmd.arg(q.shared().keys.wake()).arg(&secs);
            Box::pin(async move { cmd.query_async::<Option<(String, String)>>(conn).await })
        });
        let (first, _, _) = futures::future::select_all(waits).await;
        // The other waits were dropped mid-command; their connections are not reused.
        self.conns.clear();
        first.map(|_| ()).map_err(Error::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_order_shares_first_place_by_weight() {
        let mut p = Picker::new(&QueueOrder::Weighted(vec![3, 1]), 2);
        let firsts: Vec<usize> = (0..8).map(|_| p.order()[0]).collect();
        assert_eq!(firsts.iter().filter(|&&i| i == 0).count(), 6);
        assert_eq!(firsts.iter().filter(|&&i| i == 1).count(), 2);
    }

    #[test]
    fn weighted_order_interleaves_rather_than_bunching() {
        // Smooth weighted round robin: the heavy queue's turns are spread out.
        let mut p = Picker::new(&QueueOrder::Weighted(vec![5, 1, 1]), 3);
        let firsts: Vec<usize> = (0..14).map(|_| p.order()[0]).collect();
        assert_eq!(firsts, vec![0, 0, 1, 0, 2, 0, 0, 0, 0, 1, 0, 2, 0, 0]);
        let mut p = Picker::new(&QueueOrder::Weighted(vec![3, 1]), 2);
        let firsts: Vec<usize> = (0..8).map(|_| p.order()[0]).collect();
        assert_eq!(firsts, vec![0, 0, 1, 0, 0, 0, 1, 0]);
    }

    #[test]
    fn weighted_order_asks_queues_found_short_last() {
        let mut p = Picker::new(&QueueOrder::Weighted(vec![1, 1, 1]), 3);
        p.claimed(0, true);
        p.claimed(1, false);
        // Queue 0 would lead (ties go to the lowest index) but was found short.
        assert_eq!(p.order(), vec![1, 2, 0]);
        // Found full again, it takes its turns as before.
        p.claimed(0, false);
        assert_eq!(p.order(), vec![1, 2, 0]);
        assert_eq!(p.order(), vec![2, 0, 1]);
    }

    #[test]
    fn strict_order_ignores_short_queues() {
        let mut p = Picker::new(&QueueOrder::Strict, 2);
        p.claimed(0, true);
        assert_eq!(p.order(), vec![0, 1]);
    }

    fn builder() -> WorkerBuilder<()> {
        WorkerBuilder {
            queues: Vec::new(),
            config: WorkerConfig::default(),
        }
    }

    #[test]
    fn a_worker_has_at_least_one_slot() {
        assert_eq!(builder().concurrency(0).config.concurrency, 1);
        assert_eq!(builder().concurrency(4).config.concurrency, 4);
    }

    #[test]
    fn leases_are_renewed_three_times_a_lease_at_most_every_second() {
        let c = builder().lease(Duration::from_millis(1500)).config;
        assert_eq!(c.lease, Duration::from_millis(1500));
        assert_eq!(c.heartbeat, Duration::from_millis(500));
        let c = builder().lease(Duration::from_secs(60)).config;
        assert_eq!(c.heartbeat, Duration::from_secs(1));
        // A lease too short to renew in time is lengthened.
        let c = builder().lease(Duration::from_millis(1)).config;
        assert_eq!(c.lease, Duration::from_millis(100));
        assert_eq!(c.heartbeat, Duration::from_nanos(33_333_333));
        // An explicit heartbeat wins over the lease's, down to 10 ms.
        let c = builder()
            .lease(Duration::from_secs(9))
            .heartbeat(Duration::from_millis(250))
            .config;
        assert_eq!(c.heartbeat, Duration::from_millis(250));
        let c = builder().heartbeat(Duration::from_millis(1)).config;
        assert_eq!(c.heartbeat, Duration::from_millis(10));
    }

    #[test]
    fn strict_order_is_as_given() {
        let mut p = Picker::new(&QueueOrder::Strict, 3);
        assert_eq!(p.order(), vec![0, 1, 2]);
    }
}
