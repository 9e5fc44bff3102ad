//! Coalesced reports: the outcomes of all of a worker's slots for one queue go to
//! Redis together, one script call per batch, and the same call claims the next jobs
//! for the slots that want one.
//!
//! No timer: a batch leaves as soon as a call is free, carrying every report that
//! arrived meanwhile (at most [`MAX_BATCH`]). A lone report goes out at once with no
//! added wait; at concurrency 50 it is one call for many jobs, which is what Redis's
//! single thread needs. A worker with several slots keeps two calls in flight, so
//! Redis runs one batch while the worker reads the answer to the other and runs its
//! jobs (with one, Redis idled for a third of a no-op run at concurrency 50). A
//! one-slot worker keeps one: its reports then reach Redis in the order its attempts
//! ended, which keeps a priority level first in, first out while it holds jobs ahead
//! (two calls could race and hand the slot its jobs out of order).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use redis::Value;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::claim::{ClaimArgs, Claimed, backoff, parse_claim};
use crate::error::{Error, JobError};
use crate::job::{JobId, safe_ms};
use crate::redis::Shared;

/// Reports per script call, at most.
pub(crate) const MAX_BATCH: usize = 256;

/// The longest error message stored with a job (bytes, cut at a character boundary):
/// a handler that fails with a whole log must not grow the record without bound.
pub(crate) const MESSAGE_MAX: usize = 2_000;

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

/// What Redis did with a report, and the next jobs it handed over, if asked.
#[derive(Debug)]
pub(crate) struct Acked {
    pub(crate) outcome: String,
    /// At most as many as the report asked for (fewer when the queue ran short).
    pub(crate) next: Vec<Claimed>,
}

/// One report waiting for its batch.
pub(crate) struct Pending {
    id: JobId,
    token: String,
    report: Report,
    /// For a completion: the record the worker writes (see [`completion`]).
    completion: Option<Completion>,
    /// Jobs to claim for this report's slot in the same call.
    claim: usize,
    /// Set by the heartbeat when the lease is lost: then retrying is pointless.
    lost: Option<Arc<AtomicBool>>,
    reply: oneshot::Sender<Result<Acked, Error>>,
}

/// The reporter of one queue of one worker: reports meet in a batching task.
#[derive(Debug, Clone)]
pub(crate) struct Reporter(mpsc::UnboundedSender<Pending>);

impl Reporter {
    /// Starts the batching task; it ends when the last `Reporter` clone is dropped
    /// and its calls are answered. `interrupt` (the shutdown grace is over) stops
    /// retries through outages. `in_flight`: calls at once (see the module docs).
    pub(crate) fn start(
        shared: Arc<Shared>,
        queue: usize,
        args: ClaimArgs,
        interrupt: CancellationToken,
        in_flight: usize,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(batches(
            rx,
            shared,
            queue,
            args,
            interrupt,
            in_flight.max(1),
        ));
        Reporter(tx)
    }

    /// Reports one attempt: it takes its place in the batches at once (so a slot's
    /// reports, and the jobs they claim, keep the slot's order), and the future waits
    /// until Redis has it (through transient failures, for as long as the lease is not
    /// lost: a finished result, maybe an hour's work, is worth waiting out an outage
    /// for). The same call may hand over up to `claim` next jobs for this slot.
    pub(crate) fn report(
        &self,
        job: &Claimed,
        report: Report,
        claim: usize,
        lost: Option<Arc<AtomicBool>>,
    ) -> impl Future<Output = Result<(Report, Acked), Error>> + Send + use<> {
        let (reply, answer) = oneshot::channel();
        // The report itself moves into the batch; its summary (no result bytes) comes
        // back with the answer, for the caller's logs and metrics.
        let summary = summary(&report);
        let completion = match report {
            Report::Completed(_) => completion(&job.claimed),
            Report::Failed { .. } => None,
        };
        let pending = Pending {
            id: job.id.clone(),
            token: job.token.clone(),
            report,
            completion,
            claim,
            lost,
            reply,
        };
        let sent = self
            .0
            .send(pending)
            .map_err(|_| Error::Protocol("the reporter stopped".into()));
        async move {
            sent?;
            let acked = answer
                .await
                .map_err(|_| Error::Protocol("the reporter stopped".into()))??;
            Ok((summary, acked))
        }
    }
}

/// A copy of a report without its result bytes (they went to Redis).
fn summary(report: &Report) -> Report {
    match report {
        Report::Completed(_) => Report::Completed(Vec::new()),
        Report::Failed { error, retry_in } => Report::Failed {
            error: error.clone(),
            retry_in: *retry_in,
        },
    }
}

async fn batches(
    mut rx: mpsc::UnboundedReceiver<Pending>,
    shared: Arc<Shared>,
    queue: usize,
    args: ClaimArgs,
    interrupt: CancellationToken,
    in_flight: usize,
) {
    let mut sending = FuturesUnordered::new();
    let mut open = true;
    while open || !sending.is_empty() {
        tokio::select! {
            // A call answered: room for the next batch.
            Some(()) = sending.next(), if !sending.is_empty() => {}
            got = rx.recv(), if open && sending.len() < in_flight => match got {
                Some(first) => {
                    let mut batch = vec![first];
                    while batch.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(p) => batch.push(p),
                            Err(_) => break,
                        }
                    }
                    sending.push(send(&shared, queue, &args, &interrupt, batch));
                }
                None => open = false,
            },
        }
    }
}

/// Sends one batch, retrying transient failures for the reports whose lease is not
/// known lost, and answers every report.
async fn send(
    shared: &Arc<Shared>,
    queue: usize,
    args: &ClaimArgs,
    interrupt: &CancellationToken,
    mut batch: Vec<Pending>,
) {
    let mut delays = backon::BackoffBuilder::build(backoff());
    loop {
        let reply = invoke(shared, queue, args, &batch).await;
        match reply {
            Ok((outcomes, next)) => {
                let mut next = next.jobs.into_iter();
                for (pending, outcome) in batch.into_iter().zip(outcomes) {
                    let jobs = next.by_ref().take(pending.claim).collect();
                    let acked = Acked {
                        outcome,
                        next: jobs,
                    };
                    if let Err(Ok(unwanted)) = pending.reply.send(Ok(acked)) {
                        for job in unwanted.next {
                            hand_back(shared, args, job);
                        }
                    }
                }
                // More jobs than asked for cannot happen; never strand one if it did.
                for job in next {
                    hand_back(shared, args, job);
                }
                return;
            }
            Err(e) if e.is_transient() && !interrupt.is_cancelled() => {
                // Reports whose lease is gone stop here; the others wait it out.
                let (gone, kept): (Vec<_>, Vec<_>) = batch
                    .into_iter()
                    .partition(|p| p.lost.as_ref().is_some_and(|l| l.load(Ordering::SeqCst)));
                for pending in gone {
                    let _ = pending.reply.send(Err(Error::Protocol(format!(
                        "lease lost while the report failed: {e}"
                    ))));
                }
                if kept.is_empty() {
                    return;
                }
                batch = kept;
                let after = delays.next().unwrap_or(Duration::from_secs(2));
                tracing::warn!(error = %e, reports = batch.len(), ?after, "report failed; retrying");
                tokio::select! {
                    _ = interrupt.cancelled() => {}
                    _ = tokio::time::sleep(after) => {}
                }
            }
            Err(e) => {
                for pending in batch {
                    let _ = pending.reply.send(Err(clone_error(&e)));
                }
                return;
            }
        }
    }
}

fn clone_error(e: &Error) -> Error {
    match e {
        Error::Redis(r) => Error::Redis(r.clone()),
        other => Error::Protocol(other.to_string()),
    }
}

/// A job handed over for a slot that no longer waits: back to ready at once, since
/// claimed means run or handed back.
fn hand_back(shared: &Arc<Shared>, args: &ClaimArgs, job: Claimed) {
    let shared = shared.clone();
    let lease = args.lease;
    tokio::spawn(async move {
        if let Err(e) = super::claim::release(&shared, &job, lease).await {
            tracing::warn!(job = %job.id, error = %e, "hand-back failed; the lease will expire");
        }
    });
}

async fn invoke(
    shared: &Shared,
    queue: usize,
    args: &ClaimArgs,
    batch: &[Pending],
) -> Result<(Vec<String>, super::claim::Claim), Error> {
    let wanted: usize = batch.iter().map(|p| p.claim).sum();
    let mut inv = shared.invocation(shared.scripts.report);
    inv.arg(&args.worker_id)
        .arg(wanted)
        .arg(safe_ms(args.lease))
        .arg(args.default_attempts)
        .arg(batch.len());
    for p in batch {
        match &p.report {
            Report::Completed(result) => {
                let (template, extras) = p
                    .completion
                    .as_ref()
                    .map_or(("", ""), |c| (c.template.as_str(), c.extras.as_str()));
                inv.arg("c")
                    .arg(p.id.as_str())
                    .arg(&p.token)
                    .arg(result.as_slice())
                    .arg(template)
                    .arg(extras);
            }
            Report::Failed { error, retry_in } => {
                inv.arg("f")
                    .arg(p.id.as_str())
                    .arg(&p.token)
                    .arg(error.kind())
                    .arg(capped(error.to_string()))
                    .arg(retry_in.map(|d| safe_ms(d).to_string()).unwrap_or_default());
            }
        }
    }
    // One flat list: an outcome per report, then the claim's reply.
    let mut reply: Vec<Value> = shared.invoke(&inv).await?;
    if reply.len() <= batch.len() {
        return Err(Error::Protocol(format!(
            "report answered {} items for {} reports",
            reply.len(),
            batch.len()
        )));
    }
    let next = reply.split_off(batch.len());
    let outcomes = reply
        .into_iter()
        .map(|v| {
            redis::from_redis_value(v).map_err(|e| Error::Protocol(format!("report outcome: {e}")))
        })
        .collect::<Result<Vec<String>, _>>()?;
    Ok((outcomes, parse_claim(queue, Value::Array(next))?))
}

/// The record a completion writes, made by the worker from the record it claimed so
/// that Redis need not decode and re-encode it (see `complete_claimed` in
/// common.lua, which uses it only while the stored record is still the claimed one).
#[derive(Debug)]
struct Completion {
    /// The completed record without its closing brace: Redis appends `finished_at`.
    template: String,
    /// "started_at result_ttl_ms dedup_ttl_ms dedup-key" of the record (each may be
    /// empty; the key, last, may hold spaces).
    extras: String,
}

/// The completion of a claimed record: every field kept as stored (fields this version
/// does not know included), the state `completed`, a result, progress 100, and no
/// lease, cancel request or finish time. `None` when the record is not a JSON object
/// of plain keys or its fields are not what the script can use: the report then takes
/// the general path.
///
/// Values are copied as their raw JSON text, not parsed into a tree: building a
/// `serde_json::Value` map cost the worker more per no-op job than the rest of its
/// report.
fn completion(claimed: &[u8]) -> Option<Completion> {
    use serde_json::value::RawValue;
    // Borrowed keys: a key written with an escape fails here, and so needs none.
    let record: std::collections::BTreeMap<&str, &RawValue> =
        serde_json::from_slice(claimed).ok()?;
    // A time or count as the scripts stamp it (text) or as a client wrote it.
    let number = |field: &str| -> Option<&str> {
        let Some(raw) = record.get(field) else {
            return Some("");
        };
        let text = raw.get();
        let digits = text
            .strip_prefix('"')
            .and_then(|t| t.strip_suffix('"'))
            .unwrap_or(text);
        (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())).then_some(digits)
    };
    let dedup = match record.get("dedup") {
        None => String::new(),
        Some(raw) => serde_json::from_str::<String>(raw.get()).ok()?,
    };
    let extras = format!(
        "{} {} {} {dedup}",
        number("started_at")?,
        number("result_ttl_ms")?,
        number("dedup_ttl_ms")?,
    );
    let mut template = String::with_capacity(claimed.len() + 48);
    template.push('{');
    for (key, value) in &record {
        if matches!(
            *key,
            "lease" | "cancel" | "finished_at" | "state" | "result" | "progress"
        ) {
            continue;
        }
        template.push('"');
        template.push_str(key);
        template.push_str("\":");
        template.push_str(value.get());
        template.push(',');
    }
    // No closing brace: the script writes `,"finished_at":"…"}` after it.
    template.push_str(r#""state":"completed","result":true,"progress":100"#);
    Some(Completion { template, extras })
}

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

#[cfg(test)]
mod tests {
    use super::super::claim::tests::{args, drop_queue, next_token, strip_lease, unit_queue};
    use super::*;
    use crate::job::JobRecord;

    #[test]
    fn long_messages_are_cut_at_a_character_boundary() {
        assert_eq!(capped("short".into()), "short");
        let long = "é".repeat(1_500); // 3 000 bytes
        let cut = capped(long);
        assert_eq!(cut.chars().count(), 1_001);
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn a_message_of_exactly_the_cap_is_kept_whole_and_one_byte_more_is_cut() {
        let at_cap = "x".repeat(MESSAGE_MAX);
        assert_eq!(capped(at_cap.clone()), at_cap);
        let over = "x".repeat(MESSAGE_MAX + 1);
        assert_eq!(capped(over), format!("{at_cap}…"));
        // A two-byte letter across the cap is dropped whole, not split.
        let across = format!("{}é", "x".repeat(MESSAGE_MAX - 1));
        assert_eq!(capped(across), format!("{}…", "x".repeat(MESSAGE_MAX - 1)));
    }

    #[test]
    fn a_summary_drops_the_result_bytes_and_keeps_the_failure() {
        assert!(matches!(
            summary(&Report::Completed(vec![1, 2, 3])),
            Report::Completed(bytes) if bytes.is_empty()
        ));
        let failed = Report::Failed {
            error: JobError::transient("gpu busy"),
            retry_in: Some(Duration::from_millis(1500)),
        };
        match summary(&failed) {
            Report::Failed { error, retry_in } => {
                assert_eq!(error, JobError::transient("gpu busy"));
                assert_eq!(retry_in, Some(Duration::from_millis(1500)));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_completion_keeps_every_claimed_field_and_ends_the_attempt() {
        let claimed = br#"{"max_attempts":3,"created_at":"1796137157044","state":"active","started_at":"1796137157050","lease":"7","worker":"w","attempts":1,"dedup":"ab 12","dedup_ttl_ms":60000,"seq":4,"later":{"x":[1,2]},"errors":{},"progress":40}"#;
        let c = completion(claimed).unwrap();
        assert_eq!(c.extras, "1796137157050  60000 ab 12");
        let written = format!(r#"{},"finished_at":"1796137158000"}}"#, c.template);
        let mut record: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&written).unwrap();
        assert_eq!(
            record.remove("later").unwrap(),
            serde_json::json!({"x": [1, 2]})
        );
        assert_eq!(record.remove("seq").unwrap(), 4);
        assert_eq!(record.remove("dedup").unwrap(), "ab 12");
        assert!(!record.contains_key("lease"));
        let record = JobRecord::parse("a", written.as_bytes()).unwrap();
        let st = record.status().unwrap();
        assert_eq!(st.state, crate::JobState::Completed);
        assert!(st.has_result);
        assert_eq!(st.progress, Some(100.0));
        assert_eq!((st.attempts, st.max_attempts), (1, Some(3)));
        assert_eq!(record.finished_at, 1_796_137_158_000);
        assert_eq!(record.worker.as_deref(), Some("w"));
    }

    #[test]
    fn a_record_the_script_cannot_complete_from_takes_the_general_path() {
        for claimed in [
            &b"{not json"[..],
            br#"["state","active"]"#,
            br#"{"state":"active","started_at":"soon"}"#,
            br#"{"state":"active","result_ttl_ms":-1}"#,
            br#"{"state":"active","dedup":7}"#,
        ] {
            assert!(
                completion(claimed).is_none(),
                "{}",
                String::from_utf8_lossy(claimed)
            );
        }
        // Nothing stamped yet: empty extras, still a completion.
        let c = completion(br#"{"state":"active","lease":"1"}"#).unwrap();
        assert_eq!(c.extras, "   ");
    }

    // The stats, results and dedup hashes hold a keeper (see HASH_KEEPER in
    // common.lua), so their fields are found in a hash table, not walked for in a
    // packed list, from their first entries on; the keeper is never counted, and never
    // read as a job's result.
    #[tokio::test]
    async fn small_hashes_are_hash_tables_whose_keeper_is_never_an_entry() {
        let q = unit_queue("keeper").await;
        let job = q
            .enqueue(serde_json::json!({}))
            .dedup_key("k")
            .await
            .unwrap();
        let args = args();
        let shared = q.shared();
        let claimed = super::super::claim::claim(shared, 0, 1, &args)
            .await
            .unwrap();
        let done = Pending {
            id: job.id.clone(),
            token: claimed.jobs[0].token.clone(),
            report: Report::Completed(b"7".to_vec()),
            completion: completion(&claimed.jobs[0].claimed),
            claim: 0,
            lost: None,
            reply: oneshot::channel().0,
        };
        let (outcomes, _) = invoke(shared, 0, &args, &[done]).await.unwrap();
        assert_eq!(outcomes, ["completed"]);
        for key in [
            shared.keys.stats(),
            shared.keys.results(),
            shared.keys.dedup(),
        ] {
            let encoding: String = redis::cmd("OBJECT")
                .arg("ENCODING")
                .arg(key)
                .query_async(&mut shared.conn.clone())
                .await
                .unwrap();
            assert_eq!(encoding, "hashtable", "{key}");
        }
        let stats = q.stats().await.unwrap();
        assert!(
            stats.totals.keys().all(|k| !k.contains("keeper")),
            "{:?}",
            stats.totals
        );
        assert_eq!(stats.totals.get("enqueued"), Some(&1));
        assert_eq!(q.result::<u32>(&job.id).await.unwrap(), Some(7));
        drop_queue(shared).await;
    }

    /// A report batch that names one job twice, against the Redis every test machine
    /// runs (`REDIS_URL`, else 127.0.0.1:6379).
    async fn twice_in_one_call(first_token: Option<&str>) -> (Vec<String>, JobRecord) {
        let q = unit_queue("report-twice").await;
        let job = q.enqueue(serde_json::json!({})).await.unwrap();
        let args = args();
        let shared = q.shared();
        let claimed = super::super::claim::claim(shared, 0, 1, &args)
            .await
            .unwrap();
        let token = claimed.jobs[0].token.clone();
        let pending = |token: &str, result: &[u8]| Pending {
            id: job.id.clone(),
            token: token.to_owned(),
            report: Report::Completed(result.to_vec()),
            completion: completion(&claimed.jobs[0].claimed),
            claim: 0,
            lost: None,
            reply: oneshot::channel().0,
        };
        let batch = [
            pending(first_token.unwrap_or(&token), b"1"),
            pending(&token, b"2"),
        ];
        let (outcomes, _) = invoke(shared, 0, &args, &batch).await.unwrap();
        let (raw, result): (Vec<u8>, Vec<u8>) = redis::pipe()
            .hget(shared.keys.jobs(), job.id.as_str())
            .hget(shared.keys.results(), job.id.as_str())
            .query_async(&mut shared.conn.clone())
            .await
            .unwrap();
        let expected: &[u8] = if first_token.is_some() { b"2" } else { b"1" };
        assert_eq!(result, expected);
        // The worker wrote the record (no cjson in Redis): its template, stamped.
        let template = completion(&claimed.jobs[0].claimed).unwrap().template;
        assert!(
            raw.starts_with(template.as_bytes()),
            "{}",
            String::from_utf8_lossy(&raw)
        );
        assert!(raw.ends_with(b"\"}"));
        drop_queue(shared).await;
        (outcomes, JobRecord::parse(job.id.as_str(), &raw).unwrap())
    }

    // The completion's lease search reads the record, never the payload after it: a
    // payload may hold the same text.
    #[tokio::test]
    async fn a_lease_named_only_by_the_payload_is_not_the_records() {
        let q = unit_queue("report-payload-lease").await;
        let shared = q.shared();
        let next = next_token(shared).await;
        let job = q
            .enqueue(serde_json::json!({ "lease": next }))
            .await
            .unwrap();
        let args = args();
        let claimed = super::super::claim::claim(shared, 0, 1, &args)
            .await
            .unwrap();
        let claimed = &claimed.jobs[0];
        assert_eq!(claimed.token, next);
        // The record loses its lease (as a recovery would take it); the payload keeps
        // the text.
        strip_lease(shared, claimed).await;
        let text = format!(r#""lease":"{next}""#);
        assert!(
            claimed
                .payload
                .windows(text.len())
                .any(|w| w == text.as_bytes())
        );
        let batch = [Pending {
            id: job.id.clone(),
            token: claimed.token.clone(),
            report: Report::Completed(b"1".to_vec()),
            completion: completion(&claimed.claimed),
            claim: 0,
            lost: None,
            reply: oneshot::channel().0,
        }];
        let (outcomes, _) = invoke(shared, 0, &args, &batch).await.unwrap();
        assert_eq!(outcomes, ["lost"]);
        drop_queue(shared).await;
    }

    // A completion's writes wait for the end of the reports (one call per kind): a
    // second report of the job must still find the lease ended, and a stale one must
    // not hide the live one behind it.
    #[tokio::test]
    async fn a_job_completed_earlier_in_the_same_call_is_lost_to_a_second_report() {
        let (outcomes, record) = twice_in_one_call(None).await;
        assert_eq!(outcomes, ["completed", "lost"]);
        assert_eq!(record.state.as_deref(), Some("completed"));
        assert_eq!(record.attempts, 1);
    }

    #[tokio::test]
    async fn a_stale_report_before_the_live_one_in_the_same_call_changes_nothing() {
        let (outcomes, record) = twice_in_one_call(Some("no-such-token")).await;
        assert_eq!(outcomes, ["lost", "completed"]);
        assert_eq!(record.state.as_deref(), Some("completed"));
    }

    #[test]
    fn a_copied_error_keeps_its_redis_kind_so_it_stays_transient() {
        let loading = Error::Redis(redis::make_extension_error("LOADING".to_owned(), None));
        let copy = clone_error(&loading);
        assert!(copy.is_transient());
        assert!(matches!(copy, Error::Redis(_)));
        let other = clone_error(&Error::Protocol("odd reply".into()));
        assert!(matches!(other, Error::Protocol(m) if m.contains("odd reply")));
    }
}
