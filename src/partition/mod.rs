//! Partitioned queues: one logical queue spread over P partitions, each an ordinary
//! [`Queue`] with its own hash tag (`{speech#0}` … `{speech#P-1}`), so a Redis Cluster
//! spreads one busy queue over its masters instead of capping it at one node.
//!
//! # What holds, and where
//! - **Placement.** A job goes to the partition of its dedup key when it has one (the
//!   same request always meets its twin: dedup and result reuse are exact), else to
//!   its caller-given id's home partition, else to its rate-limit key's partition,
//!   else round robin. Bulk enqueue groups jobs by partition: one script call per
//!   partition per 500 jobs, each atomic within its partition.
//! - **Finding a job.** Ids the logical queue generates name their partition
//!   (`<uuid>@<i>`), so status, cancel, wait and dead-letter calls go straight there.
//!   A caller-given id is stored in the partition its hash picks (found in one read),
//!   except with a dedup key, which wins: such a job is looked up in the id's home
//!   partition first and then in the others. Caller ids are unique per partition, so
//!   the same caller id enqueued with two different dedup keys may make two jobs.
//! - **Order.** Priorities and FIFO hold within a partition. Across partitions a
//!   worker takes turns (smooth round robin) and asks each partition for its best job,
//!   so a high-priority job never waits behind the low-priority jobs of its own
//!   partition but may start after a normal job of another partition.
//! - **Rate limits** live in one partition: exact for jobs placed by their rate-limit
//!   key (no dedup key, no caller id); a job placed by a dedup key or id counts against
//!   the limit in its own partition, so such a key may see up to P times its limit.
//! - **Partition count.** P is fixed when the queue is first created and stored in
//!   Redis (`<prefix>:{<name>}:partitions`); opening it with another P fails with
//!   [`Error::PartitionMismatch`]. Leave P out to open whatever is stored. To change
//!   P, drain the queue and delete that key (the old partitions' jobs are not moved).
//!
//! # Layout
//! - `place`: partition names (spread over the slot space), ids, placement keys
//! - `enqueue`: single and bulk enqueue
//! - `read`: status, results, waiting, cancellation, events, running jobs, stats
//! - `dead`: the dead letters of all partitions as one

mod dead;
mod enqueue;
mod place;
mod read;

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

pub use dead::PartitionedDeadLetter;
pub use enqueue::PartitionedEnqueue;
pub use read::PartitionedEvents;

use crate::dedup::Deduplicator;
use crate::error::Error;
use crate::job::JobId;
use crate::queue::{Queue, QueueBuilder};
use crate::redis::Connector;
use crate::worker::{QueueOrder, Worker, WorkerBuilder};

/// One logical queue of jobs of type `J` over several partitions; see the
/// [module docs](self) for what holds across them. Cheap to clone.
pub struct PartitionedQueue<J> {
    name: String,
    parts: Arc<[Queue<J>]>,
    dedup: Option<Deduplicator<J>>,
    /// Round-robin cursor for jobs with no placement key.
    next: Arc<AtomicUsize>,
}

impl<J> Clone for PartitionedQueue<J> {
    fn clone(&self) -> Self {
        PartitionedQueue {
            name: self.name.clone(),
            parts: self.parts.clone(),
            dedup: self.dedup.clone(),
            next: self.next.clone(),
        }
    }
}

impl<J> std::fmt::Debug for PartitionedQueue<J> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionedQueue")
            .field("name", &self.name)
            .field("partitions", &self.parts.len())
            .finish()
    }
}

impl<J> PartitionedQueue<J> {
    /// Connects to the logical queue `name` with `partitions` partitions on the Redis
    /// at `url`, creating it if it does not exist.
    pub async fn connect(url: &str, name: &str, partitions: u32) -> Result<Self, Error>
    where
        J: 'static,
    {
        Self::builder(name)
            .url(url)
            .partitions(partitions)
            .connect()
            .await
    }

    /// A builder for the logical queue `name`.
    pub fn builder(name: impl Into<String>) -> PartitionedBuilder<J> {
        PartitionedBuilder {
            name: name.into(),
            partitions: None,
            prefix: "vq".to_owned(),
            connector: None,
            url: None,
            result_ttl: None,
            dedup: None,
            validator: None,
            events_max: None,
            step_events: None,
            dead_cap: None,
        }
    }

    /// The logical queue's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The partitions, in order: ordinary queues, for what the logical queue does not
    /// offer (a partition's own stats, a worker over some of them).
    pub fn partitions(&self) -> &[Queue<J>] {
        &self.parts
    }

    /// The partition that stores (or would store) the job `id`, as an index into
    /// [`partitions`](Self::partitions): the one a generated id names, else the one the
    /// id's hash picks (see the [module docs](self) for dedup-keyed caller ids).
    pub fn partition_of(&self, id: &JobId) -> usize {
        place::home(id.as_str(), self.count()) as usize
    }

    /// A worker builder over every partition, taking turns among them (equal weights):
    /// no partition is starved, and a partition whose last claim came up short is
    /// asked after the others for a moment, so claims do not keep visiting empty
    /// partitions. A claim for several slots is split over the partitions; with at
    /// least a slot per partition, each slot then takes jobs from its partition for up
    /// to 100 ms, each claimed with the last one's report (one round trip per job, as
    /// on a plain queue), before it takes its turn again. Set concurrency, retries and
    /// the rest as for any worker.
    pub fn worker(&self) -> WorkerBuilder<J> {
        let mut builder = Worker::builder(self.parts[0].clone());
        for q in &self.parts[1..] {
            builder = builder.queue(q.clone());
        }
        builder
            .order(QueueOrder::Weighted(vec![1; self.parts.len()]))
            .spread()
    }

    /// The dead letters of every partition, as one.
    pub fn dead_letter(&self) -> PartitionedDeadLetter<J> {
        PartitionedDeadLetter::new(self.clone())
    }

    fn count(&self) -> u32 {
        self.parts.len() as u32
    }
}

/// A check every enqueue runs before anything is stored.
type Validator<J> = Arc<dyn Fn(&J) -> Result<(), String> + Send + Sync>;

/// Builds a [`PartitionedQueue`]: the settings of [`QueueBuilder`], applied to every
/// partition, and the partition count.
pub struct PartitionedBuilder<J> {
    name: String,
    partitions: Option<u32>,
    prefix: String,
    connector: Option<Connector>,
    url: Option<String>,
    result_ttl: Option<Duration>,
    dedup: Option<Deduplicator<J>>,
    validator: Option<Validator<J>>,
    events_max: Option<u64>,
    step_events: Option<bool>,
    dead_cap: Option<u64>,
}

impl<J> std::fmt::Debug for PartitionedBuilder<J> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionedBuilder")
            .field("name", &self.name)
            .field("partitions", &self.partitions)
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl<J> PartitionedBuilder<J> {
    /// How many partitions (1 to 256). The first `connect` stores it; later ones must
    /// give the same count or none (then the stored one is used).
    pub fn partitions(mut self, count: u32) -> Self {
        self.partitions = Some(count);
        self
    }

    /// The Redis server, by URL; see [`QueueBuilder::url`].
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.url = Some(url.into());
        self
    }

    /// The Redis deployment, already configured: a cluster spreads the partitions over
    /// its masters. See [`QueueBuilder::connector`].
    pub fn connector(mut self, connector: Connector) -> Self {
        self.connector = Some(connector);
        self
    }

    /// The key prefix (default `vq`); see [`QueueBuilder::prefix`].
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// See [`QueueBuilder::result_ttl`].
    pub fn result_ttl(mut self, ttl: Duration) -> Self {
        self.result_ttl = Some(ttl);
        self
    }

    /// Deduplicates every enqueue; identical requests land in one partition, so they
    /// share one job exactly as on a plain queue. See [`QueueBuilder::dedup`].
    pub fn dedup(mut self, dedup: Deduplicator<J>) -> Self {
        self.dedup = Some(dedup);
        self
    }

    /// See [`QueueBuilder::validate`].
    pub fn validate<F>(mut self, check: F) -> Self
    where
        F: Fn(&J) -> Result<(), String> + Send + Sync + 'static,
    {
        self.validator = Some(Arc::new(check));
        self
    }

    /// Cap on each partition's event stream; see [`QueueBuilder::events_max`].
    pub fn events_max(mut self, len: u64) -> Self {
        self.events_max = Some(len);
        self
    }

    /// See [`QueueBuilder::step_events`].
    pub fn step_events(mut self, on: bool) -> Self {
        self.step_events = Some(on);
        self
    }

    /// Dead letters kept per partition; see [`QueueBuilder::dead_letter_cap`].
    pub fn dead_letter_cap(mut self, cap: u64) -> Self {
        self.dead_cap = Some(cap);
        self
    }

    /// Connects every partition. Fails with [`Error::PartitionMismatch`] if the queue
    /// exists with another partition count, and with [`Error::InvalidConfig`] if no
    /// count is given and none is stored, or the count is out of range.
    pub async fn connect(self) -> Result<PartitionedQueue<J>, Error>
    where
        J: 'static,
    {
        if let Some(p) = self.partitions
            && !(1..=place::MAX_PARTITIONS).contains(&p)
        {
            return Err(Error::InvalidConfig(format!(
                "{p} partitions for queue {:?}: it takes 1 to {}",
                self.name,
                place::MAX_PARTITIONS
            )));
        }
        let connector = match (self.connector, &self.url) {
            (Some(c), _) => c,
            (None, Some(url)) => Connector::single(url)?,
            (None, None) => {
                return Err(Error::InvalidConfig(
                    "no Redis URL or connector given".into(),
                ));
            }
        };
        // The count is settled through the first partition's connection, before any
        // partition is named: the names depend on it.
        let probe: Queue<J> = Queue::builder(format!("{}#0", self.name))
            .connector(connector.clone())
            .prefix(&self.prefix)
            .connect()
            .await?;
        let meta = format!("{}:{{{}}}:partitions", self.prefix, self.name);
        let count = settle_count(&probe, &meta, &self.name, self.partitions).await?;
        let mut parts = Vec::with_capacity(count as usize);
        for name in place::partition_names(&self.name, count) {
            let mut b: QueueBuilder<J> = Queue::builder(name)
                .connector(connector.clone())
                .prefix(&self.prefix);
            if let Some(ttl) = self.result_ttl {
                b = b.result_ttl(ttl);
            }
            if let Some(d) = &self.dedup {
                b = b.dedup(d.clone());
            }
            if let Some(check) = &self.validator {
                let check = check.clone();
                b = b.validate(move |job: &J| check(job));
            }
            if let Some(len) = self.events_max {
                b = b.events_max(len);
            }
            if let Some(on) = self.step_events {
                b = b.step_events(on);
            }
            if let Some(cap) = self.dead_cap {
                b = b.dead_letter_cap(cap);
            }
            parts.push(b.connect().await?);
        }
        Ok(PartitionedQueue {
            name: self.name,
            parts: parts.into(),
            dedup: self.dedup,
            next: Arc::new(AtomicUsize::new(0)),
        })
    }
}

/// Stores `wanted` as the queue's partition count if none is stored, and returns the
/// count that holds.
async fn settle_count<J>(
    probe: &Queue<J>,
    meta: &str,
    name: &str,
    wanted: Option<u32>,
) -> Result<u32, Error> {
    let mut conn = probe.shared().conn.clone();
    if let Some(p) = wanted {
        let created: bool = redis::cmd("SET")
            .arg(meta)
            .arg(p)
            .arg("NX")
            .query_async::<Option<String>>(&mut conn)
            .await?
            .is_some();
        if created {
            return Ok(p);
        }
    }
    let stored: Option<String> = redis::cmd("GET").arg(meta).query_async(&mut conn).await?;
    let stored = match stored {
        None => {
            return Err(Error::InvalidConfig(format!(
                "queue {name:?} has no stored partition count: give one to create it"
            )));
        }
        Some(s) => s
            .parse::<u32>()
            .map_err(|_| Error::Protocol(format!("partition count of queue {name:?} is {s:?}")))?,
    };
    match wanted {
        Some(p) if p != stored => Err(Error::PartitionMismatch {
            queue: name.to_owned(),
            stored,
            requested: p,
        }),
        _ => Ok(stored),
    }
}
