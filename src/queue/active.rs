//! Which jobs run now: the `active` index read back as statuses, for operators and
//! dashboards that show each worker's current jobs.

use super::Queue;
use crate::error::Error;
use crate::job::{JobId, JobState, JobStatus};

impl<J> Queue<J> {
    /// The jobs running now, the soonest lease deadline first, at most `limit`; each
    /// status names its worker ([`JobStatus::worker`]).
    ///
    /// It reads the `active` index and then each job, so a job that ends in between is
    /// left out rather than shown in a state it has already left. A record that cannot
    /// be read is an error (the next script that meets it dead-letters it).
    pub async fn active_jobs(&self, limit: usize) -> Result<Vec<JobStatus>, Error> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        // Below +inf: the index's one member that is not a job scores +inf (see
        // ACTIVE_KEEPER in common.lua).
        let ids: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.shared.keys.active())
            .arg("-inf")
            .arg("(+inf")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut self.shared.conn.clone())
            .await?;
        let mut running = Vec::with_capacity(ids.len());
        for id in ids {
            match self.status(&JobId::from_stored(id)).await {
                Ok(status) if status.state == JobState::Active => running.push(status),
                Ok(_) | Err(Error::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(running)
    }
}
