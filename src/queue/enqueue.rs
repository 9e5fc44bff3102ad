//! Enqueueing: one job (with options, a dedup key or a rate limit) or many in bulk.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use serde::Serialize;

use super::Queue;
use crate::dedup::{Deduplicator, RateLimit, sha256_hex};
use crate::error::Error;
use crate::job::{JobId, JobOptions, JobRecord, JobState, Priority, clamp_ms, safe_ms, time_to_ms};
use crate::metrics;
use crate::retry::RetryPolicy;

/// Jobs per enqueue script call: big batches stay one call each of bounded size.
const BULK_CHUNK: usize = 500;

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
            replicas: None,
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
    /// Each chunk is atomic: all of its jobs are stored, or none. Two chunks travel at
    /// once, in order on one connection, so this side builds and reads one while Redis
    /// runs the other; after an error, the chunk that failed is not stored and the
    /// one sent after it may be.
    pub async fn enqueue_bulk_with(
        &self,
        jobs: impl IntoIterator<Item = (J, JobOptions)>,
    ) -> Result<Vec<Enqueued>, Error> {
        let prepared = jobs
            .into_iter()
            .map(|(job, opts)| self.prepare(&job, &opts, &DedupChoice::Queue))
            .collect::<Result<Vec<_>, _>>()?;
        let stored: Vec<Vec<Enqueued>> = futures::stream::iter(prepared.chunks(BULK_CHUNK))
            .map(|chunk| self.store(chunk, None, None))
            .buffered(2)
            .try_collect()
            .await?;
        Ok(stored.into_iter().flatten().collect())
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
        let plain = record.ttl_ms.is_none() && record.delay_ms.is_none();
        let record = serde_json::to_string(&record).map_err(Error::Serialize)?;
        Ok(Prepared {
            id,
            record,
            plain,
            payload,
            dedup_key,
        })
    }

    async fn store(
        &self,
        jobs: &[Prepared],
        limit: Option<&RateLimit>,
        replicas: Option<(u32, Duration)>,
    ) -> Result<Vec<Enqueued>, Error> {
        let mut inv = self.shared.invocation(self.shared.scripts.enqueue);
        match limit {
            Some(l) => inv.arg(&l.key).arg(l.limit).arg(safe_ms(l.period)),
            None => inv.arg("").arg(0).arg(0),
        };
        inv.arg(jobs.len());
        // Plain records are stored as written here, with the script's fields appended
        // as text (no cjson pass inside Redis); see enqueue.lua.
        inv.arg(if jobs.iter().all(|j| j.plain) {
            "1"
        } else {
            ""
        });
        for job in jobs {
            inv.arg(job.id.as_str())
                .arg(&job.record)
                .arg(&job.payload)
                .arg(&job.dedup_key);
        }
        let (reply, acked): (Vec<redis::Value>, u32) = match replicas {
            None => (self.shared.invoke(&inv).await?, 0),
            Some((n, timeout)) => self.shared.invoke_and_wait(&inv, n, timeout).await?,
        };
        // Flat: the status, then its details.
        let mut items = reply.into_iter();
        let status: String = match items.next() {
            Some(v) => {
                redis::from_redis_value(v).map_err(|e| Error::Protocol(format!("enqueue: {e}")))?
            }
            None => return Err(Error::Protocol("enqueue: an empty reply".into())),
        };
        if status == "limited" {
            let ms: u64 = items
                .next()
                .map(redis::from_redis_value)
                .transpose()
                .map_err(|e| Error::Protocol(format!("enqueue: {e}")))?
                .ok_or_else(|| Error::Protocol("enqueue: limited, without a wait".into()))?;
            metrics::count(metrics::RATE_LIMITED, &self.shared.name, 1);
            return Err(Error::RateLimited {
                key: limit.map(|l| l.key.clone()).unwrap_or_default(),
                retry_after: Duration::from_millis(ms),
            });
        }
        // Three items per job: id, created (1) or existing (0), state.
        if status != "ok" || items.len() != jobs.len() * 3 {
            return Err(Error::Protocol(format!(
                "enqueue answered {status:?} with {} items for {} jobs",
                items.len(),
                jobs.len()
            )));
        }
        let mut reply: Vec<(String, u8, String)> = Vec::with_capacity(jobs.len());
        while let (Some(id), Some(created), Some(state)) =
            (items.next(), items.next(), items.next())
        {
            let protocol = |e: redis::ParsingError| Error::Protocol(format!("enqueue: {e}"));
            reply.push((
                redis::from_redis_value(id).map_err(protocol)?,
                redis::from_redis_value(created).map_err(protocol)?,
                redis::from_redis_value(state).map_err(protocol)?,
            ));
        }
        if let (Some((wanted, timeout)), Some(job)) = (replicas, jobs.first())
            && acked < wanted
        {
            return Err(Error::ReplicasNotAcked {
                id: job.id.clone(),
                acked,
                wanted,
                timeout,
            });
        }
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
    /// The record's JSON object. `pri` comes first when it is not normal (the field
    /// order of [`JobRecord`]): the script reads a plain record's lane from its start.
    record: String,
    /// No time-to-live or delay: the script needs nothing from the record but `pri`.
    plain: bool,
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
    replicas: Option<(u32, Duration)>,
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

    /// Returns only once `replicas` replicas have the job (Redis `WAIT`, sent right
    /// after the enqueue on the same connection), waiting at most `timeout` (more than
    /// zero, at most 4 s).
    ///
    /// Why: Redis replicates asynchronously, so a job acknowledged by the primary may
    /// not have reached any replica when the primary dies; Sentinel then promotes a
    /// replica without it. With this option an `Ok` means the job is on the primary
    /// *and* on `replicas` replicas, so a failover to one of them keeps it (the README's
    /// "Sentinel, replication and `WAIT`" says what `WAIT` does not cover).
    ///
    /// Fewer replicas within `timeout` gives [`Error::ReplicasNotAcked`]: the job
    /// **is stored** on the primary and will run; only its survival of a failover is
    /// unconfirmed. Enqueueing again with the same [`id`](Self::id) is safe and waits
    /// again. The wait holds the queue handle's shared connection: other calls on this
    /// handle and its clones queue behind it, so give waited enqueues a separately
    /// connected handle if that matters. The ACL user needs `+wait`. Not offered on a
    /// cluster ([`Error::InvalidConfig`]).
    pub fn wait_for_replicas(mut self, replicas: u32, timeout: Duration) -> Self {
        self.replicas = Some((replicas, timeout));
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

    // options, delay, run_at, max_attempts, timeout, retry, ttl, result_ttl: one
    // definition for every enqueue builder.
    crate::job::option_setters!();
}

impl<'q, J: Serialize + Send + Sync + 'q> IntoFuture for Enqueue<'q, J> {
    type Output = Result<Enqueued, Error>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send + 'q>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let prepared = self.queue.prepare(&self.job, &self.options, &self.dedup)?;
            let mut out = self
                .queue
                .store(
                    std::slice::from_ref(&prepared),
                    self.rate_limit.as_ref(),
                    self.replicas,
                )
                .await?;
            out.pop()
                .ok_or_else(|| Error::Protocol("enqueue returned nothing".into()))
        })
    }
}
