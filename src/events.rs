//! Job events: every transition appends one entry to the queue's capped stream, so a
//! listener that joins late can still read what it missed, and `wait_result` is woken
//! by Redis instead of polling.

use std::time::{Duration, SystemTime};

use redis::Value;
use redis::streams::{StreamReadOptions, StreamReadReply};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::job::{JobId, ms_to_time};
use crate::redis::{Conn, Connector};

/// What happened to a job.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EventKind {
    /// Ready for a worker (enqueued, or a delay or retry came due).
    Queued,
    /// Enqueued with a delay.
    Scheduled,
    /// A worker started an attempt; `data` is the worker id.
    Active,
    /// The handler reported progress; `data` is the percentage.
    Progress,
    /// Finished with a result.
    Completed,
    /// An attempt failed and another is scheduled; `data` is the error.
    Retrying,
    /// The worker's lease ran out and the job went back to ready; `data` says why.
    Stalled,
    /// A stopping worker handed the job back.
    Released,
    /// Cancellation of an active job was requested.
    Cancelling,
    /// Cancelled.
    Cancelled,
    /// Not started within its time-to-live.
    Expired,
    /// Failed for good; `data` is the reason.
    Dead,
    /// A worker's circuit breaker changed state. For this kind, `job_id` holds the
    /// worker's id and `data` the new state (`open`, `half_open`, `closed`).
    Breaker,
    /// An operator sent a dead job back to ready (see
    /// [`DeadLetter::requeue`](crate::DeadLetter::requeue)); it will run again under
    /// the same id.
    Requeued,
    /// A dead job was deleted for good, by an operator or by the dead-letter cap
    /// (then `data` is `dead letter cap`).
    Purged,
    /// Not a job's event: this reader may have missed events (it reconnected, or
    /// fell behind a stream trimmed past where it was). Anyone waiting for a job
    /// re-reads its status on this; `job_id` is empty.
    Gap,
    /// An event this version does not know (written by a newer one).
    Other(String),
}

impl EventKind {
    /// The lowercase name written to the stream (`progress`, `completed`, ...), the
    /// inverse of how events are read: an SSE or webhook layer can pass it on as is.
    pub fn as_str(&self) -> &str {
        match self {
            EventKind::Queued => "queued",
            EventKind::Scheduled => "scheduled",
            EventKind::Active => "active",
            EventKind::Progress => "progress",
            EventKind::Completed => "completed",
            EventKind::Retrying => "retrying",
            EventKind::Stalled => "stalled",
            EventKind::Released => "released",
            EventKind::Cancelling => "cancelling",
            EventKind::Cancelled => "cancelled",
            EventKind::Expired => "expired",
            EventKind::Dead => "dead",
            EventKind::Breaker => "breaker",
            EventKind::Requeued => "requeued",
            EventKind::Purged => "purged",
            EventKind::Gap => "gap",
            EventKind::Other(name) => name,
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "queued" => EventKind::Queued,
            "scheduled" => EventKind::Scheduled,
            "active" => EventKind::Active,
            "progress" => EventKind::Progress,
            "completed" => EventKind::Completed,
            "retrying" => EventKind::Retrying,
            "stalled" => EventKind::Stalled,
            "released" => EventKind::Released,
            "cancelling" => EventKind::Cancelling,
            "cancelled" => EventKind::Cancelled,
            "expired" => EventKind::Expired,
            "dead" => EventKind::Dead,
            "breaker" => EventKind::Breaker,
            "requeued" => EventKind::Requeued,
            "purged" => EventKind::Purged,
            "gap" => EventKind::Gap,
            other => EventKind::Other(other.to_owned()),
        }
    }

    /// Whether the job reached a terminal state with this event.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            EventKind::Completed | EventKind::Cancelled | EventKind::Expired | EventKind::Dead
        )
    }
}

/// One event of a queue's event stream.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct JobEvent {
    /// The id of the stream entry that holds the event. Events one batch wrote
    /// together (a claim's `active`, a report's `completed`, a bulk enqueue's
    /// `queued`) share one entry, and so one id.
    pub stream_id: String,
    /// What happened.
    pub kind: EventKind,
    /// To which job.
    pub job_id: JobId,
    /// When.
    pub at: SystemTime,
    /// Detail that depends on the kind (worker id, progress, error message).
    pub data: Option<String>,
}

impl JobEvent {
    /// The events of one stream entry. A batch (a claim, a report, a bulk enqueue)
    /// writes consecutive events of one kind with the same detail as one entry, their
    /// job ids joined by newlines (ids have no control characters), so they share
    /// the entry's stream id. A malformed entry gives none.
    fn from_entry(stream_id: String, map: &std::collections::HashMap<String, Value>) -> Vec<Self> {
        let text = |k: &str| {
            map.get(k)
                .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
        };
        let (Some(kind), Some(ids)) = (text("type"), text("id")) else {
            return Vec::new();
        };
        let kind = EventKind::parse(&kind);
        let at = ms_to_time(text("at").and_then(|s| s.parse().ok()).unwrap_or(0));
        let data = text("data");
        ids.split('\n')
            .map(|id| JobEvent {
                stream_id: stream_id.clone(),
                kind: kind.clone(),
                job_id: JobId::from_stored(id.to_owned()),
                at,
                data: data.clone(),
            })
            .collect()
    }
}

/// A live subscription to a queue's events.
///
/// Events are fanned out from one stream reader per [`Queue`](crate::Queue) value, so
/// a thousand waiting API requests cost one Redis connection, not a thousand.
#[derive(Debug)]
pub struct EventStream {
    rx: broadcast::Receiver<JobEvent>,
    missed: u64,
}

impl EventStream {
    /// The next event; `None` once the queue is dropped. A subscriber that falls more
    /// than the buffer behind skips ahead (see [`EventStream::missed`]).
    pub async fn recv(&mut self) -> Option<JobEvent> {
        loop {
            match self.rx.recv().await {
                Ok(event) => return Some(event),
                Err(broadcast::error::RecvError::Lagged(n)) => self.missed += n,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    /// Events skipped because this subscriber was too slow.
    pub fn missed(&self) -> u64 {
        self.missed
    }

    pub(crate) fn raw(&mut self) -> &mut broadcast::Receiver<JobEvent> {
        &mut self.rx
    }
}

/// The one stream reader of a queue value.
#[derive(Debug)]
pub(crate) struct EventHub {
    tx: broadcast::Sender<JobEvent>,
    stop: CancellationToken,
}

impl Drop for EventHub {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl EventHub {
    /// Starts reading at the stream's current end. The position is fixed before this
    /// returns, so any event appended afterwards reaches every later subscriber.
    pub(crate) async fn start(connector: &Connector, key: String) -> Result<Self, Error> {
        let mut conn = connector.connect_blocking().await?;
        let last = last_id(&mut conn, &key).await?;
        let (tx, _) = broadcast::channel(4096);
        let stop = CancellationToken::new();
        tokio::spawn(read_loop(conn, key, last, tx.clone(), stop.clone()));
        Ok(EventHub { tx, stop })
    }

    pub(crate) fn subscribe(&self) -> EventStream {
        EventStream {
            rx: self.tx.subscribe(),
            missed: 0,
        }
    }
}

async fn last_id(conn: &mut Conn, key: &str) -> Result<String, Error> {
    let entries: Vec<(String, Value)> = redis::cmd("XREVRANGE")
        .arg(key)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(conn)
        .await?;
    Ok(entries
        .into_iter()
        .next()
        .map(|(id, _)| id)
        .unwrap_or_else(|| "0-0".to_owned()))
}

/// Entries per stream read.
const READ_BATCH: usize = 512;

/// Whether entries after `last` were trimmed away unread, judged by `first`, the stream's
/// first entry read right after a reply: it lies beyond `last`. (If `last` itself was
/// the one trimmed, this says "gap" once too often; a waiter then re-reads a status,
/// which costs one read.) `0-0` is where a reader of an empty stream starts: nothing
/// had been read that could go missing.
fn trimmed_past(first: Option<&str>, last: &str) -> bool {
    match first {
        Some(first) => last != "0-0" && stream_id(first) > stream_id(last),
        None => false,
    }
}

/// A stream id (`<ms>-<seq>`) as numbers, for ordering.
fn stream_id(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

fn gap_event(last: &str) -> JobEvent {
    JobEvent {
        stream_id: last.to_owned(),
        kind: EventKind::Gap,
        job_id: JobId::from_stored(String::new()),
        at: SystemTime::now(),
        data: None,
    }
}

/// One read: the entries after `last` (blocking up to two seconds for the first), and
/// the id of the stream's first entry as it stands right after them.
///
/// The two commands go in one pipeline, so Redis runs the `XRANGE` the moment the `XREAD`
/// is answered: whatever trimmed the stream past `last` (before this read, while the
/// reader was away, or while its last reply was on the wire) shows there, with no
/// failure needed to hint at it and no round trip of its own.
async fn read_after(
    conn: &mut Conn,
    opts: &StreamReadOptions,
    key: &str,
    last: &str,
) -> redis::RedisResult<(Option<StreamReadReply>, Option<String>)> {
    let mut pipe = redis::pipe();
    pipe.cmd("XREAD")
        .arg(opts)
        .arg("STREAMS")
        .arg(key)
        .arg(last)
        .cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(1);
    let (reply, first): (Option<StreamReadReply>, Vec<(String, Value)>) =
        pipe.query_async(conn).await?;
    Ok((reply, first.into_iter().next().map(|(id, _)| id)))
}

async fn read_loop(
    mut conn: Conn,
    key: String,
    mut last: String,
    tx: broadcast::Sender<JobEvent>,
    stop: CancellationToken,
) {
    let opts = StreamReadOptions::default().block(2_000).count(READ_BATCH);
    let mut backoff = Duration::from_millis(50);
    // The `last` a gap was reported after: an idle stream is not reported again every
    // read until new entries move `last` on.
    let mut reported: Option<String> = None;
    loop {
        let read = read_after(&mut conn, &opts, &key, &last);
        let reply = tokio::select! {
            _ = stop.cancelled() => return,
            reply = read => reply,
        };
        match reply {
            Ok((reply, first)) => {
                backoff = Duration::from_millis(50);
                if trimmed_past(first.as_deref(), &last) && reported.as_ref() != Some(&last) {
                    tracing::warn!(stream = %key, after = %last, "job events were trimmed before they were read");
                    let _ = tx.send(gap_event(&last));
                    reported = Some(last.clone());
                }
                for stream in reply.map(|r| r.keys).unwrap_or_default() {
                    for entry in stream.ids {
                        last.clone_from(&entry.id);
                        for event in JobEvent::from_entry(entry.id, &entry.map) {
                            // No subscriber is fine: events are also kept in Redis.
                            let _ = tx.send(event);
                        }
                    }
                }
            }
            Err(e) => {
                // The next read that succeeds tells whether the stream was trimmed past
                // `last` while the connection was down.
                tracing::warn!(error = %e, stream = %key, "reading job events failed; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_order_numerically() {
        assert!(stream_id("10-0") > stream_id("9-5"));
        assert!(stream_id("10-12") > stream_id("10-3"));
        assert_eq!(stream_id("0-0"), (0, 0));
    }

    #[test]
    fn a_gap_is_a_first_entry_beyond_the_last_one_read() {
        assert!(trimmed_past(Some("10-1"), "10-0"));
        assert!(trimmed_past(Some("11-0"), "10-5"));
        // The last one read is still there, or an older one is: nothing was lost.
        assert!(!trimmed_past(Some("10-0"), "10-0"));
        assert!(!trimmed_past(Some("9-9"), "10-0"));
        // An empty (or deleted) stream, and a reader that has read nothing yet.
        assert!(!trimmed_past(None, "10-0"));
        assert!(!trimmed_past(Some("10-0"), "0-0"));
    }

    #[test]
    fn only_completed_cancelled_expired_and_dead_end_a_job() {
        for (name, terminal) in [
            ("queued", false),
            ("scheduled", false),
            ("active", false),
            ("progress", false),
            ("completed", true),
            ("retrying", false),
            ("stalled", false),
            ("released", false),
            ("cancelling", false),
            ("cancelled", true),
            ("expired", true),
            ("dead", true),
            ("breaker", false),
            ("requeued", false),
            ("purged", false),
            ("gap", false),
            ("from-a-newer-version", false),
        ] {
            assert_eq!(EventKind::parse(name).is_terminal(), terminal, "{name}");
        }
    }

    #[test]
    fn event_names_round_trip() {
        for name in [
            "queued",
            "scheduled",
            "active",
            "progress",
            "completed",
            "retrying",
            "stalled",
            "released",
            "cancelling",
            "cancelled",
            "expired",
            "dead",
            "breaker",
            "requeued",
            "purged",
            "gap",
            "from-a-newer-version",
        ] {
            assert_eq!(EventKind::parse(name).as_str(), name);
        }
    }
}
