//! The operator's side of failure: [`DeadLetter`] lists, inspects, requeues and purges
//! the jobs that failed for good.
//!
//! A job lands in the dead letters when its handler reports a permanent error, when it
//! spends its attempts, or when its payload does not decode. It stays there, with its
//! payload and every recorded error, until an operator decides: fix the cause and
//! [`requeue`](DeadLetter::requeue) it, or [`purge`](DeadLetter::purge) it. Nothing
//! expires on its own, but the dead letters are capped: by default at
//! [`DEFAULT_DEAD_LETTER_CAP`] jobs (the oldest go first), or as set with
//! [`QueueBuilder::dead_letter_cap`](crate::QueueBuilder::dead_letter_cap).

use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::error::Error;
use crate::job::{JobId, JobRecord, JobStatus, safe_ms, split_entry};
use crate::queue::Queue;
use crate::redis::{Conn, Keys};

/// Ids per requeue or purge script call, and dead letters read per page: big
/// operations stay many bounded calls, so none blocks Redis for long.
const BATCH: usize = 500;

/// The field of the queue's stats hash that holds the dead-letter cap, where `bury` in
/// common.lua reads it (and `Queue::stats` leaves it out of the totals).
pub(crate) const DEAD_CAP_FIELD: &str = "dead_cap";

/// How many dead jobs a queue keeps when nobody set a cap (`DEAD_CAP_DEFAULT` in
/// common.lua): a poison flood cannot fill Redis by default. Beyond it, each burial
/// deletes the oldest dead jobs for good.
pub const DEFAULT_DEAD_LETTER_CAP: u64 = 10_000;

/// Stores the queue's dead-letter cap in Redis at connect time (`0` removes it: the
/// field then holds 0, since an absent field means the default cap).
pub(crate) async fn store_dead_cap(conn: &Conn, keys: &Keys, cap: u64) -> Result<(), Error> {
    let _: () = redis::cmd("HSET")
        .arg(keys.stats())
        .arg(DEAD_CAP_FIELD)
        .arg(cap)
        .query_async(&mut conn.clone())
        .await?;
    Ok(())
}

/// The dead letters of one queue; get one with [`Queue::dead_letter`].
///
/// Cheap to clone (it shares the queue's connection). Every change is one Lua script
/// per batch, so a job is requeued or purged whole, never half.
pub struct DeadLetter<J> {
    queue: Queue<J>,
}

impl<J> Clone for DeadLetter<J> {
    fn clone(&self) -> Self {
        DeadLetter {
            queue: self.queue.clone(),
        }
    }
}

impl<J> std::fmt::Debug for DeadLetter<J> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetter")
            .field("queue", &self.queue.name())
            .finish()
    }
}

/// One dead job, inspected: its status and its payload.
///
/// The payload is given both decoded and raw, so a payload that no longer decodes as
/// `J` (the very reason some jobs die) can still be looked at and repaired by hand.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DeadJob<J> {
    /// The job's record: why it died (`reason`) and every failed attempt (`errors`).
    pub status: JobStatus,
    /// The payload decoded as `J`, or why it does not decode.
    pub job: Result<J, String>,
    /// The payload as stored (empty if it is missing).
    pub payload: Vec<u8>,
}

impl<J> DeadLetter<J> {
    pub(crate) fn new(queue: Queue<J>) -> Self {
        DeadLetter { queue }
    }

    /// How many jobs are in the dead letters.
    pub async fn count(&self) -> Result<u64, Error> {
        let shared = self.queue.shared();
        Ok(redis::cmd("ZCARD")
            .arg(shared.keys.dead())
            .query_async(&mut shared.conn.clone())
            .await?)
    }

    /// A page of dead jobs, newest death first: skip `offset`, return at most `limit`.
    ///
    /// A job whose record is missing or unreadable is left out of the page (with a
    /// warning in the log) rather than failing the whole listing, so one bad record
    /// never hides the others; such a page may hold fewer than `limit` jobs.
    pub async fn list(&self, offset: usize, limit: usize) -> Result<Vec<JobStatus>, Error> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let shared = self.queue.shared();
        let stop = offset.saturating_add(limit - 1);
        let ids: Vec<String> = redis::cmd("ZREVRANGE")
            .arg(shared.keys.dead())
            .arg(offset)
            .arg(stop)
            .query_async(&mut shared.conn.clone())
            .await?;
        Ok(self
            .records(&ids)
            .await?
            .into_iter()
            .map(|(_, status)| status)
            .collect())
    }

    /// One dead job with its payload; `None` if `id` is not in the dead letters.
    ///
    /// Fails with [`Error::Corrupt`] if the job's record cannot be read; a payload that
    /// does not decode is not an error (see [`DeadJob::job`]).
    pub async fn get(&self, id: &JobId) -> Result<Option<DeadJob<J>>, Error>
    where
        J: DeserializeOwned,
    {
        let shared = self.queue.shared();
        let keys = &shared.keys;
        // One MULTI: the entry, record and payload are read at one instant.
        let (score, record, payload): (Option<f64>, Option<Vec<u8>>, Option<Vec<u8>>) =
            redis::pipe()
                .atomic()
                .zscore(keys.dead(), id.as_str())
                .hget(keys.jobs(), id.as_str())
                .hget(keys.payloads(), id.as_str())
                .query_async(&mut shared.conn.clone())
                .await?;
        if score.is_none() {
            return Ok(None);
        }
        let Some(record) = record else {
            tracing::warn!(queue = %self.queue.name(), job = %id, "dead letter without a job record");
            return Ok(None);
        };
        let status = JobRecord::parse(id.as_str(), &record)?.status()?;
        // The payload is in the entry; an older entry's is in the payloads hash.
        let payload = match split_entry(&record) {
            (_, Some(inline)) => inline.to_vec(),
            (_, None) => payload.unwrap_or_default(),
        };
        let job = if payload.is_empty() {
            Err("payload missing".to_owned())
        } else {
            serde_json::from_slice(&payload).map_err(|e| e.to_string())
        };
        Ok(Some(DeadJob {
            status,
            job,
            payload,
        }))
    }

    /// Sends one dead job back to the queue; `false` if it was not in the dead letters.
    ///
    /// The job keeps its id, priority and error history; its attempts start again from
    /// zero and it waits behind the jobs already queued. A client that waits on its id
    /// after the requeue gets the new result.
    pub async fn requeue(&self, id: &JobId) -> Result<bool, Error> {
        Ok(self.requeue_ids(std::slice::from_ref(id)).await? == 1)
    }

    /// Sends every job in the dead letters back to the queue; returns how many.
    ///
    /// Jobs that die while this runs are left where they are, so a job that dies again
    /// at once cannot keep this call going forever.
    pub async fn requeue_all(&self) -> Result<u64, Error> {
        let cutoff = self.queue.shared().redis_now().await?;
        let mut total = 0;
        loop {
            let ids = self.dead_ids(cutoff, 0).await?;
            if ids.is_empty() {
                return Ok(total);
            }
            total += self.requeue_ids(&ids).await?;
        }
    }

    /// Sends back the dead jobs for which `filter` returns `true` (say, those whose
    /// last error mentions a bug just fixed); returns how many.
    ///
    /// The filter sees the jobs that were dead when the call started; a job whose
    /// record cannot be read is skipped with a warning.
    pub async fn requeue_where(&self, filter: impl Fn(&JobStatus) -> bool) -> Result<u64, Error> {
        let cutoff = self.queue.shared().redis_now().await?;
        let mut chosen = Vec::new();
        let mut offset = 0;
        loop {
            let ids = self.dead_ids(cutoff, offset).await?;
            if ids.is_empty() {
                break;
            }
            offset += ids.len();
            let page: Vec<String> = ids.iter().map(|id| id.as_str().to_owned()).collect();
            chosen.extend(
                self.records(&page)
                    .await?
                    .into_iter()
                    .filter(|(_, status)| filter(status))
                    .map(|(id, _)| id),
            );
        }
        // Requeued only after the scan: requeueing during it would shift the pages.
        self.requeue_ids(&chosen).await
    }

    /// Deletes one dead job for good (record, payload, result); `false` if it was not
    /// in the dead letters. Jobs that are not dead are never touched.
    pub async fn purge(&self, id: &JobId) -> Result<bool, Error> {
        let shared = self.queue.shared();
        let mut inv = shared.invocation(shared.scripts.purge);
        inv.arg("ids").arg(id.as_str());
        let purged: u64 = shared.invoke(&inv).await?;
        Ok(purged == 1)
    }

    /// Deletes every job in the dead letters for good; returns how many.
    pub async fn purge_all(&self) -> Result<u64, Error> {
        self.purge_before(String::new()).await
    }

    /// Deletes the jobs that died more than `age` ago; returns how many. Run it from a
    /// periodic job to keep the dead letters for a retention period.
    pub async fn purge_older_than(&self, age: Duration) -> Result<u64, Error> {
        self.purge_before(safe_ms(age).to_string()).await
    }

    /// Purges the jobs dead for longer than `age` ms (`""` for all), on Redis's clock.
    async fn purge_before(&self, age: String) -> Result<u64, Error> {
        let shared = self.queue.shared();
        let mut total = 0;
        loop {
            let mut inv = shared.invocation(shared.scripts.purge);
            inv.arg("before").arg(&age).arg(BATCH);
            let purged: u64 = shared.invoke(&inv).await?;
            total += purged;
            if purged < BATCH as u64 {
                return Ok(total);
            }
        }
    }

    async fn requeue_ids(&self, ids: &[JobId]) -> Result<u64, Error> {
        let shared = self.queue.shared();
        let mut total = 0;
        for chunk in ids.chunks(BATCH) {
            let mut inv = shared.invocation(shared.scripts.requeue);
            for id in chunk {
                inv.arg(id.as_str());
            }
            let requeued: u64 = shared.invoke(&inv).await?;
            total += requeued;
        }
        Ok(total)
    }

    /// A batch of ids that died at or before `cutoff`, oldest first, from `offset`.
    async fn dead_ids(&self, cutoff: u64, offset: usize) -> Result<Vec<JobId>, Error> {
        let shared = self.queue.shared();
        let ids: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(shared.keys.dead())
            .arg("-inf")
            .arg(cutoff)
            .arg("LIMIT")
            .arg(offset)
            .arg(BATCH)
            .query_async(&mut shared.conn.clone())
            .await?;
        Ok(ids.into_iter().map(JobId::from_stored).collect())
    }

    /// The readable records of `ids`, in order; the others are logged and left out.
    async fn records(&self, ids: &[String]) -> Result<Vec<(JobId, JobStatus)>, Error> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let shared = self.queue.shared();
        let raws: Vec<Option<Vec<u8>>> = redis::cmd("HMGET")
            .arg(shared.keys.jobs())
            .arg(ids)
            .query_async(&mut shared.conn.clone())
            .await?;
        let mut out = Vec::with_capacity(ids.len());
        for (id, raw) in ids.iter().zip(raws) {
            let Some(raw) = raw else {
                tracing::warn!(queue = %self.queue.name(), job = %id, "dead letter without a job record; skipped");
                continue;
            };
            match JobRecord::parse(id, &raw).and_then(|record| record.status()) {
                Ok(status) => out.push((JobId::from_stored(id.clone()), status)),
                Err(error) => {
                    tracing::warn!(queue = %self.queue.name(), job = %id, %error, "unreadable dead letter; skipped");
                }
            }
        }
        Ok(out)
    }
}
