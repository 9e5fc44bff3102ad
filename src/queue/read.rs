//! Reading a queue: a job's status and result, waiting for it, cancelling it.

use std::time::Duration;

use serde::de::DeserializeOwned;

use super::Queue;
use crate::error::Error;
use crate::events::EventKind;
use crate::job::{JobId, JobRecord, JobState, JobStatus};

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

impl<J> Queue<J> {
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
}
