//! Reading a partitioned queue: every call about one job goes to that job's
//! partition; counts and listings gather all partitions.

use std::time::Duration;

use serde::de::DeserializeOwned;

use super::{PartitionedQueue, place};
use crate::error::Error;
use crate::events::{EventStream, JobEvent};
use crate::job::{JobId, JobStatus};
use crate::queue::{CancelOutcome, Queue, QueueStats, RecentStats};

impl<J> PartitionedQueue<J> {
    /// The partition that holds `id`: the one a generated id names, at no cost; for
    /// any other id its home partition, then the others (a caller id placed by a dedup
    /// key), one read each. [`Error::NotFound`] if none holds it.
    pub(super) async fn locate(&self, id: &JobId) -> Result<&Queue<J>, Error> {
        let n = self.count();
        if let Some(p) = place::marked(id.as_str(), n) {
            return Ok(&self.parts[p as usize]);
        }
        let home = place::by_key(id.as_str(), n) as usize;
        let order = std::iter::once(home).chain((0..self.parts.len()).filter(|&p| p != home));
        for p in order {
            let shared = self.parts[p].shared();
            // HGET, not HEXISTS: the least-privilege ACL line grants the one, not the other.
            let found: Option<Vec<u8>> = redis::cmd("HGET")
                .arg(shared.keys.jobs())
                .arg(id.as_str())
                .query_async(&mut shared.conn.clone())
                .await?;
            if found.is_some() {
                return Ok(&self.parts[p]);
            }
        }
        Err(Error::NotFound(id.clone()))
    }

    /// The state of a job.
    pub async fn status(&self, id: &JobId) -> Result<JobStatus, Error> {
        let n = self.count();
        let home = &self.parts[place::home(id.as_str(), n) as usize];
        match home.status(id).await {
            // Only an unmarked id may live outside its home partition.
            Err(Error::NotFound(_)) if place::marked(id.as_str(), n).is_none() => {
                self.locate(id).await?.status(id).await
            }
            other => other,
        }
    }

    /// The stored result of a completed job, as the bytes the worker wrote.
    pub async fn result_bytes(&self, id: &JobId) -> Result<Option<Vec<u8>>, Error> {
        match self.locate(id).await {
            Ok(q) => q.result_bytes(id).await,
            Err(Error::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The result of a completed job, decoded as `R`.
    pub async fn result<R: DeserializeOwned>(&self, id: &JobId) -> Result<Option<R>, Error> {
        match self.locate(id).await {
            Ok(q) => q.result(id).await,
            Err(Error::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Waits for the job to finish and returns its result; see
    /// [`Queue::wait_result`]. Woken by its partition's events.
    pub async fn wait_result<R: DeserializeOwned>(
        &self,
        id: &JobId,
        timeout: Duration,
    ) -> Result<R, Error> {
        // Boxed: the plain queue's waiting future is deep enough that nesting it here
        // overflows rustc's layout query depth.
        let queue = self.locate(id).await?;
        Box::pin(queue.wait_result(id, timeout)).await
    }

    /// Waits until the job reaches a terminal state; see [`Queue::wait`].
    pub async fn wait(&self, id: &JobId, timeout: Duration) -> Result<JobStatus, Error> {
        self.locate(id).await?.wait(id, timeout).await
    }

    /// Cancels a job; see [`Queue::cancel`].
    pub async fn cancel(&self, id: &JobId) -> Result<CancelOutcome, Error> {
        self.locate(id).await?.cancel(id).await
    }

    /// Subscribes to the events of every partition from now on, as one stream.
    pub async fn events(&self) -> Result<PartitionedEvents, Error> {
        let mut streams = Vec::with_capacity(self.parts.len());
        for q in self.parts.iter() {
            streams.push(q.events().await?);
        }
        Ok(PartitionedEvents { streams })
    }

    /// The jobs running now in any partition, at most `limit`, the earliest started
    /// first; see [`Queue::active_jobs`].
    pub async fn active_jobs(&self, limit: usize) -> Result<Vec<JobStatus>, Error> {
        let mut all = Vec::new();
        for q in self.parts.iter() {
            all.extend(q.active_jobs(limit).await?);
        }
        all.sort_by_key(|s| s.started_at);
        all.truncate(limit);
        Ok(all)
    }

    /// Counts of the logical queue: each partition's counts and totals summed. Workers
    /// and open breakers are the most any partition counts, since a worker of a
    /// partitioned queue serves every partition.
    pub async fn stats(&self) -> Result<QueueStats, Error> {
        let calls = self.parts.iter().map(Queue::stats);
        let parts = futures::future::try_join_all(calls).await?;
        Ok(merge_stats(parts))
    }
}

/// One logical queue's stats from its partitions'.
fn merge_stats(parts: Vec<QueueStats>) -> QueueStats {
    let mut out = QueueStats::default();
    let mut recent_ms = 0u128;
    for s in parts {
        out.queued += s.queued;
        out.scheduled += s.scheduled;
        out.active += s.active;
        out.dead += s.dead;
        if out.queued_by_priority.is_empty() {
            out.queued_by_priority = s.queued_by_priority;
        } else {
            for (acc, (_, n)) in out.queued_by_priority.iter_mut().zip(s.queued_by_priority) {
                acc.1 += n;
            }
        }
        out.workers = out.workers.max(s.workers);
        out.open_breakers = out.open_breakers.max(s.open_breakers);
        for (k, v) in s.totals {
            *out.totals.entry(k).or_default() += v;
        }
        let ended = s.recent.completed + s.recent.failed;
        recent_ms += s.recent.mean_duration.unwrap_or_default().as_millis() * u128::from(ended);
        out.recent.window = s.recent.window;
        out.recent.completed += s.recent.completed;
        out.recent.failed += s.recent.failed;
    }
    let ended = out.recent.completed + out.recent.failed;
    out.recent = RecentStats {
        mean_duration: (ended > 0).then(|| {
            Duration::from_millis(
                (recent_ms / u128::from(ended))
                    .try_into()
                    .unwrap_or(u64::MAX),
            )
        }),
        error_rate: (ended > 0).then(|| out.recent.failed as f64 / ended as f64),
        ..out.recent
    };
    out
}

/// The events of every partition of a queue, merged as they arrive (order holds
/// within a partition, not across partitions).
#[derive(Debug)]
pub struct PartitionedEvents {
    streams: Vec<EventStream>,
}

impl PartitionedEvents {
    /// The next event of any partition; `None` once the queue is dropped.
    pub async fn recv(&mut self) -> Option<JobEvent> {
        while !self.streams.is_empty() {
            let waits = self.streams.iter_mut().map(|s| Box::pin(s.recv()));
            let (event, i, _) = futures::future::select_all(waits).await;
            match event {
                Some(e) => return Some(e),
                None => {
                    self.streams.remove(i);
                }
            }
        }
        None
    }

    /// Events skipped because this subscriber was too slow, over all partitions.
    pub fn missed(&self) -> u64 {
        self.streams.iter().map(EventStream::missed).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::Priority;

    fn stats(queued: u64, workers: u64, completed: u64, failed: u64, mean_ms: u64) -> QueueStats {
        QueueStats {
            queued,
            workers,
            queued_by_priority: vec![
                (Priority::High, 1),
                (Priority::Normal, queued - 1),
                (Priority::Low, 0),
            ],
            totals: [("enqueued".to_owned(), queued)].into(),
            recent: RecentStats {
                window: Duration::from_secs(900),
                completed,
                failed,
                mean_duration: Some(Duration::from_millis(mean_ms)),
                error_rate: None,
            },
            ..QueueStats::default()
        }
    }

    #[test]
    fn stats_sum_counts_and_weigh_means_by_attempts() {
        let merged = merge_stats(vec![stats(5, 2, 3, 1, 100), stats(7, 3, 0, 4, 400)]);
        assert_eq!(merged.queued, 12);
        assert_eq!(
            merged.queued_by_priority,
            vec![
                (Priority::High, 2),
                (Priority::Normal, 10),
                (Priority::Low, 0)
            ]
        );
        assert_eq!(merged.workers, 3);
        assert_eq!(merged.totals.get("enqueued"), Some(&12));
        assert_eq!(merged.recent.completed, 3);
        assert_eq!(merged.recent.failed, 5);
        // (4 × 100 + 4 × 400) / 8 attempts.
        assert_eq!(
            merged.recent.mean_duration,
            Some(Duration::from_millis(250))
        );
        assert_eq!(merged.recent.error_rate, Some(5.0 / 8.0));
        assert_eq!(merged.recent.window, Duration::from_secs(900));
    }

    #[test]
    fn stats_sum_every_state_and_take_the_most_open_breakers() {
        let merged = merge_stats(vec![
            QueueStats {
                scheduled: 2,
                active: 3,
                dead: 4,
                open_breakers: 2,
                ..stats(1, 1, 0, 0, 0)
            },
            QueueStats {
                scheduled: 5,
                active: 6,
                dead: 7,
                open_breakers: 1,
                ..stats(1, 1, 0, 0, 0)
            },
        ]);
        assert_eq!((merged.scheduled, merged.active, merged.dead), (7, 9, 11));
        assert_eq!(merged.open_breakers, 2);
    }

    #[test]
    fn stats_of_idle_partitions_have_no_mean_or_rate() {
        let merged = merge_stats(vec![stats(1, 0, 0, 0, 0), stats(1, 0, 0, 0, 0)]);
        assert_eq!((merged.recent.completed, merged.recent.failed), (0, 0));
        assert_eq!(merged.recent.mean_duration, None);
        assert_eq!(merged.recent.error_rate, None);
    }
}
