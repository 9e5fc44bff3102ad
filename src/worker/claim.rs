//! Claims and acknowledgements: the worker's side of the transition scripts.

use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use redis::Value;

use crate::error::{Error, JobError};
use crate::job::{JobId, JobRecord, safe_ms};
use crate::queue::Shared;

/// A job handed to this worker under a lease.
#[derive(Debug)]
pub(crate) struct Claimed {
    pub(crate) queue: usize,
    pub(crate) id: JobId,
    pub(crate) token: String,
    pub(crate) record: Result<JobRecord, Error>,
    pub(crate) payload: Vec<u8>,
}

/// What the worker passes with every claim.
#[derive(Debug, Clone)]
pub(crate) struct ClaimArgs {
    pub(crate) worker_id: String,
    pub(crate) lease: Duration,
    pub(crate) default_attempts: u32,
}

/// The reply of a claim: jobs, and how long until the queue next needs a look (a
/// scheduled job comes due or a lease runs out), as Redis's clock counts it.
#[derive(Debug, Default)]
pub(crate) struct Claim {
    pub(crate) jobs: Vec<Claimed>,
    pub(crate) next_wake: Option<Duration>,
}

pub(crate) async fn claim(
    shared: &Shared,
    queue: usize,
    n: usize,
    args: &ClaimArgs,
) -> Result<Claim, Error> {
    let mut inv = shared.invocation(shared.scripts.claim);
    inv.arg(&args.worker_id)
        .arg(n)
        .arg(args.lease.as_millis() as u64)
        .arg(args.default_attempts);
    let reply: Value = shared.invoke(&inv).await?;
    parse_claim(queue, reply)
}

fn bytes(v: Value) -> Result<Vec<u8>, Error> {
    redis::from_redis_value(v).map_err(|e| Error::Protocol(format!("claim reply: {e}")))
}

pub(crate) fn parse_claim(queue: usize, reply: Value) -> Result<Claim, Error> {
    let Value::Array(items) = reply else {
        return Err(Error::Protocol(format!(
            "claim reply is not a list: {reply:?}"
        )));
    };
    let mut items = items.into_iter();
    let next_wake: i64 = match items.next() {
        Some(v) => {
            redis::from_redis_value(v).map_err(|e| Error::Protocol(format!("claim reply: {e}")))?
        }
        None => return Err(Error::Protocol("empty claim reply".into())),
    };
    let mut jobs = Vec::new();
    while let Some(id) = items.next() {
        let (Some(token), Some(record), Some(payload)) = (items.next(), items.next(), items.next())
        else {
            return Err(Error::Protocol("truncated claim reply".into()));
        };
        let id = String::from_utf8_lossy(&bytes(id)?).into_owned();
        let token = String::from_utf8_lossy(&bytes(token)?).into_owned();
        let record = JobRecord::parse(&id, &bytes(record)?);
        jobs.push(Claimed {
            queue,
            id: JobId::from_stored(id),
            token,
            record,
            payload: bytes(payload)?,
        });
    }
    Ok(Claim {
        jobs,
        next_wake: (next_wake >= 0).then(|| Duration::from_millis(next_wake as u64)),
    })
}

/// How an attempt ended, as the worker reports it to Redis.
#[derive(Debug)]
pub(crate) enum Report {
    Completed(Vec<u8>),
    Failed {
        error: JobError,
        /// `None`: no retry, the job is dead.
        retry_in: Option<Duration>,
    },
}

/// What Redis did with a report, and the next jobs it handed over.
#[derive(Debug)]
pub(crate) struct Acked {
    pub(crate) outcome: String,
    pub(crate) next: Claim,
}

/// The longest error message stored with a job (bytes, cut at a character boundary):
/// a handler that fails with a whole log must not grow the record without bound.
pub(crate) const MESSAGE_MAX: usize = 2_000;

/// `message`, cut to [`MESSAGE_MAX`] bytes at a character boundary, marked when cut.
pub(crate) fn capped(message: String) -> String {
    if message.len() <= MESSAGE_MAX {
        return message;
    }
    let mut end = MESSAGE_MAX;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &message[..end])
}

/// Sends a report, retried with backoff for as long as `keep_trying` says (the worker
/// still holds the lease: a finished result, maybe an hour's work, is worth waiting
/// out a Redis outage for) while the error is transient (see [`Error::is_transient`]).
pub(crate) async fn report(
    shared: &Arc<Shared>,
    job: &Claimed,
    report: &Report,
    claim_next: usize,
    args: &ClaimArgs,
    keep_trying: impl Fn() -> bool,
) -> Result<Acked, Error> {
    let send = || async {
        let inv = match report {
            Report::Completed(result) => {
                let mut inv = shared.invocation(shared.scripts.complete);
                inv.arg(job.id.as_str())
                    .arg(&job.token)
                    .arg(result.as_slice());
                inv
            }
            Report::Failed { error, retry_in } => {
                // The delay counts from the clock reading the script records the
                // failure at (Redis's), so a seeded schedule is exact to the millisecond.
                let mut inv = shared.invocation(shared.scripts.fail);
                inv.arg(job.id.as_str())
                    .arg(&job.token)
                    .arg(error.kind())
                    .arg(capped(error.to_string()))
                    .arg(retry_in.map(|d| safe_ms(d).to_string()).unwrap_or_default());
                inv
            }
        };
        let mut inv = inv;
        inv.arg(&args.worker_id)
            .arg(claim_next)
            .arg(args.lease.as_millis() as u64)
            .arg(args.default_attempts);
        let (outcome, next): (String, Value) = shared.invoke(&inv).await?;
        Ok::<_, Error>(Acked {
            outcome,
            next: parse_claim(job.queue, next)?,
        })
    };
    send.retry(backoff())
        .when(|e| e.is_transient() && keep_trying())
        .notify(|e, after| {
            tracing::warn!(job = %job.id, error = %e, ?after, "report failed; retrying");
        })
        .await
}

/// Hands a job back to ready (shutdown), retried through passing failures for at
/// most about a lease: after that the lease has run out and recovery does the same.
pub(crate) async fn release(
    shared: &Arc<Shared>,
    job: &Claimed,
    lease: Duration,
) -> Result<String, Error> {
    let give_up = tokio::time::Instant::now() + lease;
    let send = || async {
        let mut inv = shared.invocation(shared.scripts.release);
        inv.arg(job.id.as_str()).arg(&job.token);
        shared.invoke::<String>(&inv).await
    };
    send.retry(backoff())
        .when(|e| e.is_transient() && tokio::time::Instant::now() < give_up)
        .await
}

/// Unbounded in count: callers bound retries by what they still hold (a lease).
fn backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(2))
        .without_max_times()
        .with_jitter()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_messages_are_cut_at_a_character_boundary() {
        assert_eq!(capped("short".into()), "short");
        let long = "é".repeat(1_500); // 3 000 bytes
        let cut = capped(long);
        assert_eq!(cut.chars().count(), 1_001);
        assert!(cut.ends_with('…'));
    }
}
