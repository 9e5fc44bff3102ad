//! The dead letters of a partitioned queue: each partition keeps its own (a dead job
//! stays where it died, so a requeue is one script in one slot); this gathers them.

use std::time::Duration;

use serde::de::DeserializeOwned;

use super::PartitionedQueue;
use crate::dead_letter::{DeadJob, DeadLetter};
use crate::error::Error;
use crate::job::{JobId, JobStatus};

/// The dead letters of every partition of a [`PartitionedQueue`]; get it with
/// [`PartitionedQueue::dead_letter`]. Each call means what it means on
/// [`DeadLetter`]; calls about one job go to its partition.
pub struct PartitionedDeadLetter<J> {
    queue: PartitionedQueue<J>,
}

impl<J> Clone for PartitionedDeadLetter<J> {
    fn clone(&self) -> Self {
        PartitionedDeadLetter {
            queue: self.queue.clone(),
        }
    }
}

impl<J> std::fmt::Debug for PartitionedDeadLetter<J> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionedDeadLetter")
            .field("queue", &self.queue.name())
            .finish()
    }
}

impl<J> PartitionedDeadLetter<J> {
    pub(super) fn new(queue: PartitionedQueue<J>) -> Self {
        PartitionedDeadLetter { queue }
    }

    fn each(&self) -> impl Iterator<Item = DeadLetter<J>> + '_ {
        self.queue.parts.iter().map(|q| q.dead_letter())
    }

    /// The dead letters of the partition that holds `id`, if any does.
    async fn of(&self, id: &JobId) -> Result<Option<DeadLetter<J>>, Error> {
        match self.queue.locate(id).await {
            Ok(q) => Ok(Some(q.dead_letter())),
            Err(Error::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// How many jobs are in the dead letters of all partitions.
    pub async fn count(&self) -> Result<u64, Error> {
        let mut total = 0;
        for d in self.each() {
            total += d.count().await?;
        }
        Ok(total)
    }

    /// A page of dead jobs over all partitions, newest death first: skip `offset`,
    /// return at most `limit`. Reads `offset + limit` jobs from each partition, so
    /// deep pages cost more than on a plain queue.
    pub async fn list(&self, offset: usize, limit: usize) -> Result<Vec<JobStatus>, Error> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut all = Vec::new();
        for d in self.each() {
            all.extend(d.list(0, offset.saturating_add(limit)).await?);
        }
        all.sort_by_key(|s| std::cmp::Reverse(s.finished_at));
        Ok(all.into_iter().skip(offset).take(limit).collect())
    }

    /// One dead job with its payload; `None` if `id` is not in the dead letters.
    pub async fn get(&self, id: &JobId) -> Result<Option<DeadJob<J>>, Error>
    where
        J: DeserializeOwned,
    {
        match self.of(id).await? {
            Some(d) => d.get(id).await,
            None => Ok(None),
        }
    }

    /// Sends one dead job back to its partition; `false` if it was not dead.
    pub async fn requeue(&self, id: &JobId) -> Result<bool, Error> {
        match self.of(id).await? {
            Some(d) => d.requeue(id).await,
            None => Ok(false),
        }
    }

    /// Sends every dead job back to its partition; returns how many.
    pub async fn requeue_all(&self) -> Result<u64, Error> {
        let mut total = 0;
        for d in self.each() {
            total += d.requeue_all().await?;
        }
        Ok(total)
    }

    /// Sends back the dead jobs for which `filter` returns `true`; returns how many.
    pub async fn requeue_where(&self, filter: impl Fn(&JobStatus) -> bool) -> Result<u64, Error> {
        let mut total = 0;
        for d in self.each() {
            total += d.requeue_where(&filter).await?;
        }
        Ok(total)
    }

    /// Deletes one dead job for good; `false` if it was not dead.
    pub async fn purge(&self, id: &JobId) -> Result<bool, Error> {
        match self.of(id).await? {
            Some(d) => d.purge(id).await,
            None => Ok(false),
        }
    }

    /// Deletes every dead job of every partition for good; returns how many.
    pub async fn purge_all(&self) -> Result<u64, Error> {
        let mut total = 0;
        for d in self.each() {
            total += d.purge_all().await?;
        }
        Ok(total)
    }

    /// Deletes the jobs that died more than `age` ago; returns how many.
    pub async fn purge_older_than(&self, age: Duration) -> Result<u64, Error> {
        let mut total = 0;
        for d in self.each() {
            total += d.purge_older_than(age).await?;
        }
        Ok(total)
    }
}
