//! The producer's side: [`Queue`] enqueues jobs and answers for them (status, results,
//! cancellation, statistics). Workers take a `Queue` too: it is the handle to one
//! queue's keys, connection and scripts.

use std::collections::HashMap;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use redis::{FromRedisValue, Script, ScriptInvocation};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::OnceCell;

use crate::dead_letter::{DEAD_CAP_FIELD, DeadLetter, store_dead_cap};
use crate::dedup::{Deduplicator, RateLimit, sha256_hex};
use crate::error::Error;
use crate::events::{EventHub, EventKind, EventStream};
use crate::job::{
    JobId, JobOptions, JobRecord, JobState, JobStatus, Priority, clamp_ms, now_ms, safe_ms,
    time_to_ms,
};
use crate::metrics;
use crate::redis::{Conn, Connector, Keys, Scripts};
use crate::retry::RetryPolicy;

/// Jobs per enqueue script call: big batches stay one call each of bounded size.
const BULK_CHUNK: usize = 500;
/// A worker is counted live when it heartbeat within this window.
pub(crate) const LIVE_WINDOW: Duration = Duration::from_secs(15);

/// Settings shared by every producer and worker of one queue value.
#[derive(Debug, Clone)]
pub(crate) struct QueueConfig {
    pub(crate) result_ttl: Duration,
    pub(crate) events_max: u64,
    /// `Some(0)` removes the cap, `None` leaves whatever the queue has in Redis.
    pub(crate) dead_cap: Option<u64>,
    /// Tests only: how far this handle pretends its host's clock is off. No script
    /// ever sees it (Redis's clock is the queue's only clock); it proves exactly that.
    pub(crate) host_clock_skew_ms: i64,
    /// Whether `queued`, `scheduled` and `active` events are written.
    pub(crate) step_events: bool,
}

/// What one queue value shares with its clones and its workers.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) name: String,
    pub(crate) keys: Keys,
    pub(crate) conn: Conn,
    pub(crate) connector: Connector,
    pub(crate) scripts: Scripts,
    pub(crate) config: QueueConfig,
    hub: OnceCell<EventHub>,
}

impl Shared {
    /// A script call with the queue's keys and the stream cap already given. The
    /// first argument is empty: scripts read Redis's own clock (`TIME`), never ours.
    pub(crate) fn invocation<'a>(&self, script: &'a Script) -> ScriptInvocation<'a> {
        let mut inv = script.prepare_invoke();
        for key in self.keys.all() {
            inv.key(key);
        }
        // The cap travels negated when step events are off (see common.lua).
        let cap = i64::try_from(self.config.events_max).unwrap_or(i64::MAX);
        inv.arg("")
            .arg(if self.config.step_events { cap } else { -cap });
        inv
    }

    pub(crate) async fn invoke<T: FromRedisValue>(
        &self,
        inv: &ScriptInvocation<'_>,
    ) -> Result<T, Error> {
        Ok(inv.invoke_async(&mut self.conn.clone()).await?)
    }

    /// Redis's clock in ms since the epoch, for the few reads that compare against
    /// times the scripts stamped (stats windows, dead-letter cutoffs).
    pub(crate) async fn redis_now(&self) -> Result<u64, Error> {
        let (secs, micros): (u64, u64) = redis::cmd("TIME")
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(secs * 1000 + micros / 1000)
    }

    /// This host's clock, as far as this handle knows it (skewed in tests only).
    pub(crate) fn host_now(&self) -> u64 {
        now_ms().saturating_add_signed(self.config.host_clock_skew_ms)
    }

    async fn hub(&self) -> Result<&EventHub, Error> {
        self.hub
            .get_or_try_init(|| EventHub::start(&self.connector, self.keys.events().to_owned()))
            .await
    }
}

/// A handle to one named queue of jobs of type `J`. Cheap to clone.
///
/// `J` is any serde type; it is stored as JSON, so producers and workers in different
/// programs (or versions) only need to agree on its JSON form.
pub struct Queue<J> {
    shared: Arc<Shared>,
    dedup: Option<Deduplicator<J>>,
    validator: Option<Validator<J>>,
}

/// A check every enqueue runs before anything is stored.
type Validator<J> = Arc<dyn Fn(&J) -> Result<(), String> + Send + Sync>;

impl<J> Clone for Queue<J> {
    fn clone(&self) -> Self {
        Queue {
            shared: self.shared.clone(),
            dedup: self.dedup.clone(),
            validator: self.validator.clone(),
        }
    }
}

impl<J> std::fmt::Debug for Queue<J> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("name", &self.shared.name)
            .field("keys", &self.shared.keys.base())
            .finish()
    }
}

/// Builds a [`Queue`] with non-default settings.
pub struct QueueBuilder<J> {
    dedup: Option<Deduplicator<J>>,
    validator: Option<Validator<J>>,
    name: String,
    prefix: String,
    connector: Option<Connector>,
    url: Option<String>,
    config: QueueConfig,
}

impl<J> std::fmt::Debug for QueueBuilder<J> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueBuilder")
            .field("name", &self.name)
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl<J> QueueBuilder<J> {
    /// The Redis server, by URL (`redis://`, `rediss://` for TLS, credentials in the URL).
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.url = Some(url.into());
        self
    }

    /// The Redis deployment (single node or cluster), already configured.
    pub fn connector(mut self, connector: Connector) -> Self {
        self.connector = Some(connector);
        self
    }

    /// The key prefix (default `vq`), so several applications can share one Redis.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long results and finished records are kept by default (default 24 h).
    pub fn result_ttl(mut self, ttl: Duration) -> Self {
        self.config.result_ttl = ttl;
        self
    }

    /// Deduplicates every enqueue on this queue value: identical requests (by the
    /// deduplicator's key) share one job. Without it, every enqueue is a new job
    /// unless it names an existing id.
    pub fn dedup(mut self, dedup: Deduplicator<J>) -> Self {
        self.dedup = Some(dedup);
        self
    }

    /// Checks every job before it is enqueued: a job `check` refuses is never stored,
    /// and the enqueue fails with [`Error::InvalidJob`] (bulk: the whole call).
    pub fn validate<F>(mut self, check: F) -> Self
    where
        F: Fn(&J) -> Result<(), String> + Send + Sync + 'static,
    {
        self.validator = Some(Arc::new(check));
        self
    }

    /// Approximate cap on the event stream's length (default 10 000).
    pub fn events_max(mut self, len: u64) -> Self {
        self.config.events_max = len.max(1);
        self
    }

    /// Whether to write the events of every job's ordinary steps — `queued`,
    /// `scheduled` and `active` — to the event stream (default yes). Off, the stream
    /// keeps what waiters and operators act on (completed, retrying, dead, cancelled,
    /// expired, stalled, progress, ...), and each job costs Redis two stream writes
    /// fewer: the throughput profile for bulk work. `wait` and `wait_result` work
    /// either way. Set it on the handles that enqueue and on the workers' handles.
    pub fn step_events(mut self, on: bool) -> Self {
        self.config.step_events = on;
        self
    }

    /// Keeps at most `cap` jobs in the dead letters (default
    /// [`DEFAULT_DEAD_LETTER_CAP`](crate::DEFAULT_DEAD_LETTER_CAP)): each burial
    /// beyond it deletes the oldest dead jobs for good, so a poison flood cannot fill
    /// Redis. `0` removes the cap.
    ///
    /// The cap belongs to the queue, not to this process: `connect` stores it in Redis,
    /// where every worker's scripts read it, so a queue built without this setting
    /// keeps the cap that another process set.
    pub fn dead_letter_cap(mut self, cap: u64) -> Self {
        self.config.dead_cap = Some(cap);
        self
    }

    /// Tests only: pretends this host's clock is off by `skew_ms`. Nothing the queue
    /// does depends on it, since every script runs on Redis's clock; tests use it to
    /// prove that hosts with skewed clocks neither re-run live jobs nor stretch limits.
    #[doc(hidden)]
    pub fn host_clock_skew_for_tests(mut self, skew_ms: i64) -> Self {
        self.config.host_clock_skew_ms = skew_ms;
        self
    }

    /// Connects. Fails on a bad name or URL, or if Redis does not answer.
    pub async fn connect(self) -> Result<Queue<J>, Error> {
        let keys = Keys::new(&self.prefix, &self.name)?;
        let connector = match (self.connector, self.url) {
            (Some(c), _) => c,
            (None, Some(url)) => Connector::single(&url)?,
            (None, None) => {
                return Err(Error::InvalidConfig(
                    "no Redis URL or connector given".into(),
                ));
            }
        };
        let conn = connector.connect().await?;
        if let Some(cap) = self.config.dead_cap {
            store_dead_cap(&conn, &keys, cap).await?;
        }
        Ok(Queue {
            shared: Arc::new(Shared {
                name: self.name,
                keys,
                conn,
                connector,
                scripts: Scripts::get(),
                config: self.config,
                hub: OnceCell::new(),
            }),
            dedup: self.dedup,
            validator: self.validator,
        })
    }
}

/// What `enqueue` did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Enqueued {
    /// The job that will produce the result.
    pub id: JobId,
    /// `Some` when no job was created because one already existed (same caller-chosen
    /// id): the id of that job.
    pub duplicate_of: Option<JobId>,
    /// The job's state after the call.
    pub state: JobState,
}

/// How a cancel request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CancelOutcome {
    /// The job was waiting and is now `Cancelled`.
    Cancelled,
    /// The job is running; its handler's token fires on the worker's next heartbeat
    /// and the job ends `Cancelled`.
    Requested,
    /// The job had already finished in this state; nothing changed.
    AlreadyFinished(JobState),
}

/// Counts for one queue, read from Redis.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct QueueStats {
    /// Ready to run.
    pub queued: u64,
    /// Waiting for a delay or retry.
    pub scheduled: u64,
    /// Being run.
    pub active: u64,
    /// In the dead letters.
    pub dead: u64,
    /// Ready jobs per priority, highest first.
    pub queued_by_priority: Vec<(Priority, u64)>,
    /// Workers that heartbeat recently.
    pub workers: u64,
    /// Workers whose circuit breaker is open or half-open (they claim no jobs).
    pub open_breakers: u64,
    /// Monotonic totals since the queue was created: `enqueued`, `deduplicated`,
    /// `rate_limited`, `completed`, `failed` (attempts), `retried`, `dead`, `cancelled`,
    /// `expired`, `stalled`, `requeued`, `purged`.
    pub totals: HashMap<String, u64>,
    /// Outcomes over the last minutes.
    pub recent: RecentStats,
}

/// Outcomes over a recent window (whole minutes, the current one included).
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct RecentStats {
    /// The window's length.
    pub window: Duration,
    /// Attempts that completed.
    pub completed: u64,
    /// Attempts that failed (errors, timeouts, panics, stalls).
    pub failed: u64,
    /// Mean time from start to report of attempts that ended, if any did.
    pub mean_duration: Option<Duration>,
    /// Failed attempts over all attempts that ended, if any did.
    pub error_rate: Option<f64>,
}

/// Minutes in the recent window (the ring in Redis holds 60).
const RECENT_MINUTES: u64 = 15;

fn recent_stats(fields: &HashMap<String, String>, now: u64) -> RecentStats {
    let minute = now / 60_000;
    let (mut completed, mut failed, mut total_ms) = (0u64, 0u64, 0u64);
    for (field, value) in fields {
        if !field.starts_with("w:") {
            continue;
        }
        let parts: Vec<u64> = value.split(',').filter_map(|p| p.parse().ok()).collect();
        if let [m, c, f, d] = parts[..]
            && m + RECENT_MINUTES > minute
            && m <= minute
        {
            completed += c;
            failed += f;
            total_ms += d;
        }
    }
    let ended = completed + failed;
    RecentStats {
        window: Duration::from_secs(RECENT_MINUTES * 60),
        completed,
        failed,
        mean_duration: (ended > 0).then(|| Duration::from_millis(total_ms / ended)),
        error_rate: (ended > 0).then(|| failed as f64 / ended as f64),
    }
}

impl<J> Queue<J> {
    /// Connects to the queue `name` on the Redis at `url` with default settings.
    pub async fn connect(url: &str, name: &str) -> Result<Self, Error> {
        Self::builder(name).url(url).connect().await
    }

    /// A builder for the queue `name`.
    pub fn builder(name: impl Into<String>) -> QueueBuilder<J> {
        QueueBuilder {
            dedup: None,
            validator: None,
            name: name.into(),
            prefix: "vq".to_owned(),
            connector: None,
            url: None,
            config: QueueConfig {
                result_ttl: Duration::from_secs(86_400),
                events_max: 10_000,
                dead_cap: None,
                host_clock_skew_ms: 0,
                step_events: true,
            },
        }
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The state of a job.
    pub async fn status(&self, id: &JobId) -> Result<JobStatus, Error> {
        let raw: Option<Vec<u8>> = redis::cmd("HGET")
            .arg(self.shared.keys.jobs())
            .arg(id.as_str())
            .query_async(&mut self.shared.conn.clone())
            .await?;
        let raw = raw.ok_or_else(|| Error::NotFound(id.clone()))?;
        JobRecord::parse(id.as_str(), &raw)?.status()
    }

    /// The stored result of a completed job, as the bytes the worker wrote.
    pub async fn result_bytes(&self, id: &JobId) -> Result<Option<Vec<u8>>, Error> {
        Ok(redis::cmd("HGET")
            .arg(self.shared.keys.results())
            .arg(id.as_str())
            .query_async(&mut self.shared.conn.clone())
            .await?)
    }

    /// The result of a completed job, decoded as `R`.
    pub async fn result<R: DeserializeOwned>(&self, id: &JobId) -> Result<Option<R>, Error> {
        match self.result_bytes(id).await? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| Error::Corrupt {
                    id: id.clone(),
                    reason: format!("result: {e}"),
                }),
        }
    }

    /// Waits for the job to finish and returns its result, woken by the job's events
    /// (no polling). Fails with [`Error::JobFailed`] if it ends dead, cancelled or
    /// expired, and [`Error::WaitTimeout`] if it is still running after `timeout`.
    pub async fn wait_result<R: DeserializeOwned>(
        &self,
        id: &JobId,
        timeout: Duration,
    ) -> Result<R, Error> {
        let status = self.wait(id, timeout).await?;
        if status.state != JobState::Completed {
            return Err(Error::JobFailed {
                id: id.clone(),
                state: status.state,
                last_error: status
                    .reason
                    .clone()
                    .or_else(|| status.last_error().map(|e| e.message.clone())),
            });
        }
        self.result(id).await?.ok_or_else(|| Error::Corrupt {
            id: id.clone(),
            reason: "completed without a stored result".into(),
        })
    }

    /// Waits until the job reaches a terminal state and returns its final status.
    pub async fn wait(&self, id: &JobId, timeout: Duration) -> Result<JobStatus, Error> {
        let deadline = tokio::time::Instant::now() + timeout;
        // Subscribe before reading the state: an event that lands in between is then
        // either seen by the read or delivered to us.
        let mut events = self.events().await?;
        loop {
            let status = match self.status(id).await {
                Ok(status) => status,
                // A dropped connection (the same outage that made the reader miss
                // events, say) is waited out until the deadline.
                Err(e) if e.is_transient() && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if status.state.is_terminal() {
                return Ok(status);
            }
            loop {
                match tokio::time::timeout_at(deadline, events.raw().recv()).await {
                    Err(_) => return Err(Error::WaitTimeout(id.clone())),
                    Ok(Ok(event)) if &event.job_id == id && event.kind.is_terminal() => break,
                    // Events may have been missed: the status says what happened.
                    Ok(Ok(event)) if event.kind == EventKind::Gap => break,
                    Ok(Ok(_)) => {}
                    Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => break,
                    Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => {
                        return Err(Error::Protocol("event reader stopped".into()));
                    }
                }
            }
        }
    }

    /// The queue's dead letters: jobs that failed for good, to inspect, requeue or purge.
    pub fn dead_letter(&self) -> DeadLetter<J> {
        DeadLetter::new(self.clone())
    }

    /// Subscribes to this queue's events from now on.
    pub async fn events(&self) -> Result<EventStream, Error> {
        Ok(self.shared.hub().await?.subscribe())
    }

    /// Cancels a job: at once if it waits, through its handler's token if it runs.
    pub async fn cancel(&self, id: &JobId) -> Result<CancelOutcome, Error> {
        let mut inv = self.shared.invocation(self.shared.scripts.cancel);
        inv.arg(id.as_str());
        let outcome: String = self.shared.invoke(&inv).await?;
        match outcome.as_str() {
            "cancelled" => Ok(CancelOutcome::Cancelled),
            "requested" => Ok(CancelOutcome::Requested),
            "missing" => Err(Error::NotFound(id.clone())),
            other => other
                .strip_prefix("was:")
                .and_then(JobState::parse)
                .map(CancelOutcome::AlreadyFinished)
                .ok_or_else(|| Error::Protocol(format!("cancel answered {other:?}"))),
        }
    }

    /// Counts by state and priority, live workers and lifetime totals.
    pub async fn stats(&self) -> Result<QueueStats, Error> {
        let k = &self.shared.keys;
        let mut pipe = redis::pipe();
        pipe.zcard(k.ready())
            .zcard(k.scheduled())
            .zcard(k.active())
            .zcard(k.dead());
        for p in Priority::ALL {
            let lo = u64::from(p.rank()) * 10_000_000_000_000;
            pipe.zcount(k.ready(), lo, format!("({}", lo + 10_000_000_000_000));
        }
        let now = self.shared.redis_now().await?;
        let live_since = now.saturating_sub(LIVE_WINDOW.as_millis() as u64);
        pipe.zrangebyscore(k.workers(), live_since, "+inf")
            .hkeys(k.breakers())
            .hgetall(k.stats());
        type Reply = (
            u64,
            u64,
            u64,
            u64,
            u64,
            u64,
            u64,
            Vec<String>,
            Vec<String>,
            HashMap<String, String>,
        );
        let (queued, scheduled, active, dead, high, normal, low, live, breakers, fields): Reply =
            pipe.query_async(&mut self.shared.conn.clone()).await?;
        let workers = live.len() as u64;
        // Only live workers' breakers count: a killed worker's entry lingers until the
        // heartbeat of another forgets it.
        let open_breakers = breakers.iter().filter(|w| live.contains(w)).count() as u64;
        let name = &self.shared.name;
        for (state, n) in [
            ("queued", queued),
            ("scheduled", scheduled),
            ("active", active),
            ("dead", dead),
        ] {
            metrics::depth(name, state, n);
        }
        metrics::workers(name, workers);
        let totals = fields
            .iter()
            .filter(|(k, _)| !k.starts_with("w:") && k.as_str() != DEAD_CAP_FIELD)
            .filter_map(|(k, v)| Some((k.clone(), v.parse().ok()?)))
            .collect();
        Ok(QueueStats {
            queued,
            scheduled,
            active,
            dead,
            queued_by_priority: vec![
                (Priority::High, high),
                (Priority::Normal, normal),
                (Priority::Low, low),
            ],
            workers,
            open_breakers,
            recent: recent_stats(&fields, now),
            totals,
        })
    }
}

impl<J: Serialize> Queue<J> {
    /// Enqueues a job; chain options before awaiting:
    /// `queue.enqueue(job).priority(Priority::High).delay(d).await?`.
    pub fn enqueue(&self, job: J) -> Enqueue<'_, J> {
        Enqueue {
            queue: self,
            job,
            options: JobOptions::default(),
            dedup: DedupChoice::Queue,
            rate_limit: None,
        }
    }

    /// Enqueues many jobs with default options in one round trip per 500 jobs.
    pub async fn enqueue_bulk(
        &self,
        jobs: impl IntoIterator<Item = J>,
    ) -> Result<Vec<Enqueued>, Error> {
        self.enqueue_bulk_with(jobs.into_iter().map(|j| (j, JobOptions::default())))
            .await
    }

    /// Enqueues many jobs, each with its options, in one round trip per 500 jobs.
    /// Each chunk is atomic: all of its jobs are stored, or none.
    pub async fn enqueue_bulk_with(
        &self,
        jobs: impl IntoIterator<Item = (J, JobOptions)>,
    ) -> Result<Vec<Enqueued>, Error> {
        let prepared = jobs
            .into_iter()
            .map(|(job, opts)| self.prepare(&job, &opts, &DedupChoice::Queue))
            .collect::<Result<Vec<_>, _>>()?;
        let mut out = Vec::with_capacity(prepared.len());
        for chunk in prepared.chunks(BULK_CHUNK) {
            out.extend(self.store(chunk, None).await?);
        }
        Ok(out)
    }

    fn prepare(&self, job: &J, opts: &JobOptions, dedup: &DedupChoice) -> Result<Prepared, Error> {
        if let Some(check) = &self.validator {
            check(job).map_err(Error::InvalidJob)?;
        }
        let payload = serde_json::to_vec(job).map_err(Error::Serialize)?;
        let (dedup_key, dedup_ttl) = match (dedup, &self.dedup) {
            (DedupChoice::Off, _) | (DedupChoice::Queue, None) => (String::new(), None),
            (DedupChoice::Queue, Some(d)) => (d.key(job)?, Some(d.ttl())),
            (DedupChoice::Key(k), d) => (
                sha256_hex(k.as_bytes()),
                Some(d.as_ref().map_or(Duration::ZERO, Deduplicator::ttl)),
            ),
        };
        let id = opts.id.clone().unwrap_or_else(JobId::generate);
        let record = JobRecord {
            pri: opts.priority.rank(),
            max_attempts: opts
                .max_attempts
                .or(opts.retry.as_ref().map(RetryPolicy::attempts))
                .unwrap_or(0),
            retry: opts.retry.clone(),
            timeout_ms: opts.timeout.map(safe_ms),
            // Every start time travels as a delay from now, which the script adds to
            // Redis's clock: an absolute run-at is read against this host's clock once,
            // here, so hosts whose clocks disagree still schedule alike.
            delay_ms: match (opts.delay, opts.run_at) {
                (Some(d), _) => Some(safe_ms(d)),
                (None, Some(at)) => Some(clamp_ms(
                    time_to_ms(at).saturating_sub(self.shared.host_now()),
                )),
                (None, None) => None,
            },
            ttl_ms: opts.ttl.map(safe_ms),
            result_ttl_ms: safe_ms(opts.result_ttl.unwrap_or(self.shared.config.result_ttl)),
            dedup_ttl_ms: dedup_ttl.map(safe_ms),
            ..JobRecord::default()
        };
        let record = serde_json::to_string(&record).map_err(Error::Serialize)?;
        Ok(Prepared {
            id,
            record,
            payload,
            dedup_key,
        })
    }

    async fn store(
        &self,
        jobs: &[Prepared],
        limit: Option<&RateLimit>,
    ) -> Result<Vec<Enqueued>, Error> {
        let mut inv = self.shared.invocation(self.shared.scripts.enqueue);
        match limit {
            Some(l) => inv.arg(&l.key).arg(l.limit).arg(safe_ms(l.period)),
            None => inv.arg("").arg(0).arg(0),
        };
        inv.arg(jobs.len());
        for job in jobs {
            inv.arg(job.id.as_str())
                .arg(&job.record)
                .arg(&job.payload)
                .arg(&job.dedup_key);
        }
        let (status, reply): (String, redis::Value) = self.shared.invoke(&inv).await?;
        if status == "limited" {
            let ms: u64 = redis::from_redis_value(reply)
                .map_err(|e| Error::Protocol(format!("enqueue: {e}")))?;
            metrics::count(metrics::RATE_LIMITED, &self.shared.name, 1);
            return Err(Error::RateLimited {
                key: limit.map(|l| l.key.clone()).unwrap_or_default(),
                retry_after: Duration::from_millis(ms),
            });
        }
        let reply: Vec<(String, u8, String)> =
            redis::from_redis_value(reply).map_err(|e| Error::Protocol(format!("enqueue: {e}")))?;
        let created = reply.iter().filter(|r| r.1 == 1).count() as u64;
        metrics::count(metrics::ENQUEUED, &self.shared.name, created);
        metrics::count(
            metrics::DEDUPLICATED,
            &self.shared.name,
            reply.len() as u64 - created,
        );
        reply
            .into_iter()
            .map(|(id, created, state)| {
                let id = JobId::from_stored(id);
                let state = JobState::parse(&state)
                    .ok_or_else(|| Error::Protocol(format!("state {state:?}")))?;
                Ok(Enqueued {
                    duplicate_of: (created == 0).then(|| id.clone()),
                    id,
                    state,
                })
            })
            .collect()
    }
}

struct Prepared {
    id: JobId,
    record: String,
    payload: Vec<u8>,
    dedup_key: String,
}

/// Which dedup key an enqueue uses.
#[derive(Debug, Clone)]
enum DedupChoice {
    /// The queue's deduplicator, if it has one.
    Queue,
    /// This key (hashed), whatever the queue says.
    Key(String),
    /// None: always a new job (unless the id exists).
    Off,
}

/// A pending enqueue; set options, then `.await` it.
#[must_use = "an enqueue does nothing until awaited"]
pub struct Enqueue<'q, J> {
    queue: &'q Queue<J>,
    job: J,
    options: JobOptions,
    dedup: DedupChoice,
    rate_limit: Option<RateLimit>,
}

impl<J> std::fmt::Debug for Enqueue<'_, J> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enqueue")
            .field("queue", &self.queue.name())
            .field("options", &self.options)
            .finish()
    }
}

impl<J> Enqueue<'_, J> {
    /// Deduplicates on `key` (any string; it is hashed) instead of the queue's
    /// deduplicator: enqueues with the same key share one job while it runs, and its
    /// result for the deduplicator's TTL (none without a deduplicator).
    pub fn dedup_key(mut self, key: impl Into<String>) -> Self {
        self.dedup = DedupChoice::Key(key.into());
        self
    }

    /// Skips deduplication for this job: it is new even if an identical one runs.
    pub fn no_dedup(mut self) -> Self {
        self.dedup = DedupChoice::Off;
        self
    }

    /// Counts this job against `limit`; over it, nothing is stored and the enqueue
    /// fails with [`Error::RateLimited`], which says when to try again.
    pub fn rate_limit(mut self, limit: RateLimit) -> Self {
        self.rate_limit = Some(limit);
        self
    }

    /// Replaces all options at once.
    pub fn options(mut self, options: JobOptions) -> Self {
        self.options = options;
        self
    }

    /// Uses a caller-chosen id: a second enqueue with the same id returns the first job.
    pub fn id(mut self, id: JobId) -> Self {
        self.options.id = Some(id);
        self
    }

    /// Sets the priority.
    pub fn priority(mut self, priority: Priority) -> Self {
        self.options.priority = priority;
        self
    }

    /// Starts the job no sooner than `delay` from now.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.options = self.options.delay(delay);
        self
    }

    /// Starts the job no sooner than `at`.
    pub fn run_at(mut self, at: SystemTime) -> Self {
        self.options = self.options.run_at(at);
        self
    }

    /// Attempts before the job is dead.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.options = self.options.max_attempts(attempts);
        self
    }

    /// How long one attempt may run.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.options.timeout = Some(timeout);
        self
    }

    /// Retries this job on its own policy rather than the worker's.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.options.retry = Some(policy);
        self
    }

    /// A job not started within `ttl` ends `Expired`.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.options.ttl = Some(ttl);
        self
    }

    /// How long the result is kept.
    pub fn result_ttl(mut self, ttl: Duration) -> Self {
        self.options.result_ttl = Some(ttl);
        self
    }
}

impl<'q, J: Serialize + Send + Sync + 'q> IntoFuture for Enqueue<'q, J> {
    type Output = Result<Enqueued, Error>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send + 'q>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let prepared = self.queue.prepare(&self.job, &self.options, &self.dedup)?;
            let mut out = self
                .queue
                .store(std::slice::from_ref(&prepared), self.rate_limit.as_ref())
                .await?;
            out.pop()
                .ok_or_else(|| Error::Protocol("enqueue returned nothing".into()))
        })
    }
}
