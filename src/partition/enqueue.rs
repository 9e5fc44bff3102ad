//! Enqueueing on a partitioned queue: pick the partition, then enqueue there.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::atomic::Ordering;

use serde::Serialize;

use super::{PartitionedQueue, place};
use crate::dedup::{RateLimit, sha256_hex};
use crate::error::Error;
use crate::job::{JobId, JobOptions, Priority};
use crate::queue::Enqueued;

/// One partition's share of a bulk enqueue: each job's place in the input, and the jobs.
type Group<J> = (Vec<usize>, Vec<(J, JobOptions)>);

/// Which dedup key an enqueue uses (as on a plain queue).
#[derive(Debug, Clone)]
enum DedupChoice {
    Queue,
    Key(String),
    Off,
}

impl<J: Serialize> PartitionedQueue<J> {
    /// Enqueues a job; chain options before awaiting, as on [`Queue::enqueue`](crate::Queue::enqueue).
    pub fn enqueue(&self, job: J) -> PartitionedEnqueue<'_, J> {
        PartitionedEnqueue {
            queue: self,
            job,
            options: JobOptions::default(),
            dedup: DedupChoice::Queue,
            rate_limit: None,
        }
    }

    /// Enqueues many jobs with default options: one round trip per partition per 500
    /// jobs, the partitions in parallel.
    pub async fn enqueue_bulk(
        &self,
        jobs: impl IntoIterator<Item = J>,
    ) -> Result<Vec<Enqueued>, Error> {
        self.enqueue_bulk_with(jobs.into_iter().map(|j| (j, JobOptions::default())))
            .await
    }

    /// Enqueues many jobs, each with its options, grouped by partition; the answers
    /// come back in the order of `jobs`. Each partition's share is stored in atomic
    /// chunks of 500; a failure may leave other partitions' shares stored.
    pub async fn enqueue_bulk_with(
        &self,
        jobs: impl IntoIterator<Item = (J, JobOptions)>,
    ) -> Result<Vec<Enqueued>, Error> {
        let mut groups: Vec<Group<J>> = (0..self.parts.len()).map(|_| Default::default()).collect();
        let mut total = 0;
        for (i, (job, mut opts)) in jobs.into_iter().enumerate() {
            let p = self.place(&job, &opts, &DedupChoice::Queue, None)?;
            if opts.id.is_none() {
                opts.id = Some(JobId::from_stored(place::generate_id(p)));
            }
            groups[p as usize].0.push(i);
            groups[p as usize].1.push((job, opts));
            total += 1;
        }
        let calls = groups
            .into_iter()
            .enumerate()
            .filter(|(_, (at, _))| !at.is_empty())
            .map(|(p, (at, jobs))| async move {
                let done = self.parts[p].enqueue_bulk_with(jobs).await?;
                Ok::<_, Error>((at, done))
            });
        let mut out: Vec<Option<Enqueued>> = vec![None; total];
        for (at, done) in futures::future::try_join_all(calls).await? {
            for (i, e) in at.into_iter().zip(done) {
                out[i] = Some(e);
            }
        }
        out.into_iter()
            .map(|e| e.ok_or_else(|| Error::Protocol("bulk enqueue answered short".into())))
            .collect()
    }

    /// The partition a job goes to: by dedup key, else caller id, else rate-limit
    /// key, else round robin (see the module docs for why in this order).
    fn place(
        &self,
        job: &J,
        opts: &JobOptions,
        dedup: &DedupChoice,
        limit: Option<&RateLimit>,
    ) -> Result<u32, Error> {
        let n = self.count();
        let key = match (dedup, &self.dedup) {
            (DedupChoice::Key(k), _) => Some(sha256_hex(k.as_bytes())),
            (DedupChoice::Queue, Some(d)) => Some(d.key(job)?),
            (DedupChoice::Queue, None) | (DedupChoice::Off, _) => None,
        };
        Ok(match (key, &opts.id, limit) {
            (Some(k), _, _) => place::by_key(&k, n),
            (None, Some(id), _) => place::home(id.as_str(), n),
            (None, None, Some(l)) => place::by_key(&l.key, n),
            (None, None, None) => {
                (self.next.fetch_add(1, Ordering::Relaxed) % self.parts.len()) as u32
            }
        })
    }
}

/// A pending enqueue on a partitioned queue; set options, then `.await` it. The
/// options mean what they mean on [`Enqueue`](crate::Enqueue).
#[must_use = "an enqueue does nothing until awaited"]
pub struct PartitionedEnqueue<'q, J> {
    queue: &'q PartitionedQueue<J>,
    job: J,
    options: JobOptions,
    dedup: DedupChoice,
    rate_limit: Option<RateLimit>,
}

impl<J> std::fmt::Debug for PartitionedEnqueue<'_, J> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionedEnqueue")
            .field("queue", &self.queue.name())
            .field("options", &self.options)
            .finish()
    }
}

impl<J> PartitionedEnqueue<'_, J> {
    /// Deduplicates (and places) on `key`; see [`Enqueue::dedup_key`](crate::Enqueue::dedup_key).
    pub fn dedup_key(mut self, key: impl Into<String>) -> Self {
        self.dedup = DedupChoice::Key(key.into());
        self
    }

    /// Skips deduplication for this job.
    pub fn no_dedup(mut self) -> Self {
        self.dedup = DedupChoice::Off;
        self
    }

    /// Counts this job against `limit` (in one partition: see the module docs).
    pub fn rate_limit(mut self, limit: RateLimit) -> Self {
        self.rate_limit = Some(limit);
        self
    }

    /// Uses a caller-chosen id (stored in its home partition unless a dedup key
    /// places the job).
    pub fn id(mut self, id: JobId) -> Self {
        self.options.id = Some(id);
        self
    }

    /// Sets the priority (it orders jobs within their partition).
    pub fn priority(mut self, priority: Priority) -> Self {
        self.options.priority = priority;
        self
    }

    // options, delay, run_at, max_attempts, timeout, retry, ttl, result_ttl: one
    // definition for every enqueue builder.
    crate::job::option_setters!();
}

impl<'q, J: Serialize + Send + Sync + 'q> IntoFuture for PartitionedEnqueue<'q, J> {
    type Output = Result<Enqueued, Error>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send + 'q>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let PartitionedEnqueue {
                queue,
                job,
                mut options,
                dedup,
                rate_limit,
            } = self;
            let p = queue.place(&job, &options, &dedup, rate_limit.as_ref())?;
            if options.id.is_none() {
                options.id = Some(JobId::from_stored(place::generate_id(p)));
            }
            let mut enqueue = queue.parts[p as usize].enqueue(job).options(options);
            enqueue = match dedup {
                DedupChoice::Queue => enqueue,
                DedupChoice::Key(k) => enqueue.dedup_key(k),
                DedupChoice::Off => enqueue.no_dedup(),
            };
            if let Some(limit) = rate_limit {
                enqueue = enqueue.rate_limit(limit);
            }
            enqueue.await
        })
    }
}
