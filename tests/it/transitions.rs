//! Every way an attempt ends (the handler completes, fails, is handed back on shutdown,
//! or its worker vanishes and the lease expires), met by each thing that can happen to
//! the job meanwhile (nothing, a cancel request, a corrupt record, a record deleted
//! from under it): one test per branch of the transition scripts, so that removing any
//! state move breaks one (see scripts/mutate-lua).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use voxqueue::{
    CancelOutcome, Error, JobContext, JobError, JobId, JobState, Priority, Queue, Worker,
    handler_fn,
};

use crate::common::{Prefix, eventually};
use crate::queue::Echo;
use crate::worker::{spawn, stop};

const WAIT: Duration = Duration::from_secs(10);
/// The job the recovering worker holds so that a recovered job has to wait in line.
const BLOCKER: u32 = 99;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Meanwhile {
    Nothing,
    CancelRequested,
    Corrupted,
    Vanished,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Ending {
    Complete,
    Fail,
    Release,
    Expire,
}

/// Runs one attempt of a job with `attempts` allowed to `ending`, with `meanwhile`
/// happening while it runs; returns the queue and the job for the caller's checks.
async fn end_an_attempt(
    p: &Prefix,
    meanwhile: Meanwhile,
    ending: Ending,
    attempts: u32,
) -> (Queue<Echo>, JobId) {
    let q = p.queue::<Echo>("ends").await;
    let job = q
        .enqueue(Echo { n: 1 })
        .max_attempts(attempts)
        .await
        .unwrap();
    let (holding, ended, go) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
        Arc::new(Notify::new()),
    );
    let (h, e, g) = (holding.clone(), ended.clone(), go.clone());
    let handler = handler_fn(move |job: Echo, _ctx: JobContext| {
        let (h, e, g) = (h.clone(), e.clone(), g.clone());
        async move {
            h.store(true, Ordering::SeqCst);
            if matches!(ending, Ending::Release | Ending::Expire) {
                std::future::pending::<()>().await;
            }
            g.notified().await;
            e.store(true, Ordering::SeqCst);
            match ending {
                Ending::Fail => Err(JobError::transient("late failure")),
                _ => Ok::<_, JobError>(job.n),
            }
        }
    });
    let mut builder = Worker::builder(q.clone())
        .id("holder")
        .cancel_grace(Duration::from_secs(60))
        .shutdown_grace(Duration::from_millis(100));
    if ending == Ending::Expire {
        // Never renews: the lease lapses as if the worker had died.
        builder = builder
            .lease(Duration::from_millis(300))
            .heartbeat(Duration::from_secs(3600));
    }
    let holder = spawn(builder.build(handler));
    eventually(WAIT, "the job is held", || async {
        holding.load(Ordering::SeqCst).then_some(())
    })
    .await;

    match meanwhile {
        Meanwhile::Nothing => {}
        Meanwhile::CancelRequested => {
            assert_eq!(q.cancel(&job.id).await.unwrap(), CancelOutcome::Requested);
        }
        Meanwhile::Corrupted | Meanwhile::Vanished => {
            let key = format!("{}:{{ends}}:jobs", p.name);
            let mut cmd = if meanwhile == Meanwhile::Corrupted {
                redis::cmd("HSET")
            } else {
                redis::cmd("HDEL")
            };
            cmd.arg(&key).arg(job.id.as_str());
            if meanwhile == Meanwhile::Corrupted {
                cmd.arg("{not json");
            }
            let _: i64 = cmd.query_async(&mut conn().await).await.unwrap();
        }
    }

    match ending {
        Ending::Complete | Ending::Fail => {
            go.notify_one();
            eventually(WAIT, "the handler ended", || async {
                ended.load(Ordering::SeqCst).then_some(())
            })
            .await;
            stop(holder).await;
        }
        Ending::Release => stop(holder).await,
        Ending::Expire => {
            // A live worker's heartbeat recovers lapsed leases (the holder's own never
            // beats in time here). That worker is busy with a job of higher priority,
            // so a job that goes back to ready stays there for the checks.
            let blocker = q
                .enqueue(Echo { n: BLOCKER })
                .priority(Priority::High)
                .await
                .unwrap();
            let recoverer = handler_fn(|job: Echo, _ctx: JobContext| async move {
                if job.n == BLOCKER {
                    std::future::pending::<()>().await;
                }
                Ok::<_, JobError>(job.n)
            });
            let other = spawn(
                Worker::builder(q.clone())
                    .heartbeat(Duration::from_millis(50))
                    .shutdown_grace(Duration::from_millis(100))
                    .build(recoverer),
            );
            eventually(WAIT, "the other worker holds the blocker", || async {
                (q.status(&blocker.id).await.unwrap().state == JobState::Active).then_some(())
            })
            .await;
            let active = format!("{}:{{ends}}:active", p.name);
            eventually(WAIT, "the lapsed lease was recovered", || async {
                let score: Option<f64> = redis::cmd("ZSCORE")
                    .arg(&active)
                    .arg(job.id.as_str())
                    .query_async(&mut conn().await)
                    .await
                    .unwrap();
                score.is_none().then_some(())
            })
            .await;
            // Checked before the holder stops: its hand-back would drop a lease that
            // the recovery forgot.
            no_lease_left(p, &job.id, ending).await;
            stop(other).await;
            stop(holder).await;
        }
    }
    (q, job.id)
}

/// The job's lease is gone: the job is not active, no lease entry left.
async fn no_lease_left(p: &Prefix, id: &JobId, ending: Ending) {
    let mut conn = conn().await;
    let lease: Option<String> = redis::cmd("HGET")
        .arg(format!("{}:{{ends}}:leases", p.name))
        .arg(id.as_str())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(lease, None, "{ending:?} left the lease");
    // The token lives in the record while the job is active.
    let record: Option<String> = redis::cmd("HGET")
        .arg(format!("{}:{{ends}}:jobs", p.name))
        .arg(id.as_str())
        .query_async(&mut conn)
        .await
        .unwrap();
    let record = record.unwrap_or_default();
    assert!(
        !record.contains("\"lease\""),
        "{ending:?} left the lease: {record}"
    );
    let active: Option<f64> = redis::cmd("ZSCORE")
        .arg(format!("{}:{{ends}}:active", p.name))
        .arg(id.as_str())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(active, None, "{ending:?} left the job active");
}

/// The payload the job's entry still holds (what follows the record's newline).
async fn stored_payload(p: &Prefix, id: &JobId) -> Option<String> {
    let entry: Option<String> = redis::cmd("HGET")
        .arg(format!("{}:{{ends}}:jobs", p.name))
        .arg(id.as_str())
        .query_async(&mut conn().await)
        .await
        .unwrap();
    entry.and_then(|e| e.split_once('\n').map(|(_, payload)| payload.to_owned()))
}

async fn conn() -> redis::aio::MultiplexedConnection {
    crate::common::connection().await
}

async fn nothing_happened(ending: Ending, attempts: u32) -> (Prefix, voxqueue::JobStatus) {
    let p = Prefix::new();
    let (q, id) = end_an_attempt(&p, Meanwhile::Nothing, ending, attempts).await;
    no_lease_left(&p, &id, ending).await;
    let st = q.status(&id).await.unwrap();
    (p, st)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_attempt_stores_the_result_and_drops_the_lease() {
    let (p, st) = nothing_happened(Ending::Complete, 5).await;
    assert_eq!(
        (st.state, st.attempts, st.has_result),
        (JobState::Completed, 1, true)
    );
    // Nothing runs a completed job again: its request is not kept for the retention.
    assert_eq!(stored_payload(&p, &st.id).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_attempt_with_attempts_left_is_scheduled_without_its_lease() {
    let (p, st) = nothing_happened(Ending::Fail, 5).await;
    assert_eq!((st.state, st.attempts), (JobState::Scheduled, 1));
    assert_eq!(st.last_error().unwrap().message, "late failure");
    // The retry runs the same request.
    assert_eq!(
        stored_payload(&p, &st.id).await.as_deref(),
        Some(r#"{"n":1}"#)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handed_back_attempt_is_queued_uncounted_without_its_lease() {
    let (_p, st) = nothing_happened(Ending::Release, 5).await;
    assert_eq!((st.state, st.attempts), (JobState::Queued, 0));
    assert!(st.errors.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lapsed_lease_requeues_the_job_without_the_old_lease() {
    let (_p, st) = nothing_happened(Ending::Expire, 5).await;
    assert_eq!((st.state, st.attempts), (JobState::Queued, 1));
    assert_eq!(st.errors.len(), 1);
    assert_eq!(st.errors[0].kind, "stalled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lapsed_lease_on_the_last_attempt_buries_the_job() {
    let (p, st) = nothing_happened(Ending::Expire, 1).await;
    assert_eq!((st.state, st.attempts), (JobState::Dead, 1));
    assert_eq!(
        st.reason.as_deref(),
        Some("lease expired: worker holder stopped heartbeating")
    );
    let q = p.queue::<Echo>("ends").await;
    assert_eq!(q.dead_letter().count().await.unwrap(), 1);
    // A dead job may be requeued: it keeps its request.
    assert_eq!(
        stored_payload(&p, &st.id).await.as_deref(),
        Some(r#"{"n":1}"#)
    );
}

async fn cancel_requested(ending: Ending) {
    let p = Prefix::new();
    let (q, id) = end_an_attempt(&p, Meanwhile::CancelRequested, ending, 5).await;
    no_lease_left(&p, &id, ending).await;
    let st = q.status(&id).await.unwrap();
    assert_eq!(st.state, JobState::Cancelled, "{ending:?}");
    assert!(!st.has_result, "{ending:?}");
    assert_eq!(q.result_bytes(&id).await.unwrap(), None);
    assert_eq!(stored_payload(&p, &id).await, None, "{ending:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_request_wins_over_a_late_completion() {
    cancel_requested(Ending::Complete).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_request_wins_over_a_late_failure() {
    cancel_requested(Ending::Fail).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_request_wins_over_a_hand_back() {
    cancel_requested(Ending::Release).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_request_wins_over_a_lapsed_lease() {
    cancel_requested(Ending::Expire).await;
}

async fn corrupted(ending: Ending) {
    let p = Prefix::new();
    let (q, id) = end_an_attempt(&p, Meanwhile::Corrupted, ending, 5).await;
    no_lease_left(&p, &id, ending).await;
    let st = q.status(&id).await.unwrap();
    assert_eq!(st.state, JobState::Dead, "{ending:?}");
    assert!(
        st.reason
            .as_deref()
            .unwrap()
            .starts_with("corrupt job record"),
        "{ending:?}: {:?}",
        st.reason
    );
    assert_eq!(q.dead_letter().count().await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_corrupted_during_the_attempt_is_buried_on_completion() {
    corrupted(Ending::Complete).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_corrupted_during_the_attempt_is_buried_on_failure() {
    corrupted(Ending::Fail).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_corrupted_during_the_attempt_is_buried_on_hand_back() {
    corrupted(Ending::Release).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_corrupted_during_the_attempt_is_buried_when_the_lease_lapses() {
    corrupted(Ending::Expire).await;
}

async fn vanished(ending: Ending) {
    let p = Prefix::new();
    let (q, id) = end_an_attempt(&p, Meanwhile::Vanished, ending, 5).await;
    no_lease_left(&p, &id, ending).await;
    assert!(matches!(q.status(&id).await, Err(Error::NotFound(_))));
    assert_eq!(q.stats().await.unwrap().active, 0, "{ending:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_record_drops_its_lease_on_completion() {
    vanished(Ending::Complete).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_record_drops_its_lease_on_failure() {
    vanished(Ending::Fail).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_record_drops_its_lease_on_hand_back() {
    vanished(Ending::Release).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_record_drops_its_lease_when_the_lease_lapses() {
    vanished(Ending::Expire).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_corrupted_while_scheduled_is_buried_when_due() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("ends").await;
    let job = q
        .enqueue(Echo { n: 1 })
        .delay(Duration::from_millis(200))
        .await
        .unwrap();
    let _: i64 = redis::cmd("HSET")
        .arg(format!("{}:{{ends}}:jobs", p.name))
        .arg(job.id.as_str())
        .arg("{not json")
        .query_async(&mut conn().await)
        .await
        .unwrap();
    let echo = handler_fn(|job: Echo, _ctx: JobContext| async move { Ok::<_, JobError>(job.n) });
    let worker = spawn(Worker::builder(q.clone()).build(echo));
    let st = eventually(WAIT, "buried when due", || async {
        let st = q.status(&job.id).await.ok()?;
        (st.state == JobState::Dead).then_some(st)
    })
    .await;
    stop(worker).await;
    assert!(st.reason.unwrap().starts_with("corrupt job record"));
    assert_eq!(q.stats().await.unwrap().scheduled, 0);
    assert_eq!(q.dead_letter().count().await.unwrap(), 1);
}

/// A job claimed by a version that kept lease tokens in the `leases` hash (its record
/// has no `lease` field) is still renewed and completed under that token, and the
/// entry goes when the lease ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_held_in_the_old_leases_hash_still_counts() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("legacy").await;
    let job = q.enqueue(Echo { n: 7 }).await.unwrap();
    let (holding, go) = (Arc::new(AtomicBool::new(false)), Arc::new(Notify::new()));
    let (h, g) = (holding.clone(), go.clone());
    let handler = handler_fn(move |job: Echo, _ctx: JobContext| {
        let (h, g) = (h.clone(), g.clone());
        async move {
            h.store(true, Ordering::SeqCst);
            g.notified().await;
            Ok::<_, JobError>(job.n)
        }
    });
    let holder = spawn(
        Worker::builder(q.clone())
            .heartbeat(Duration::from_millis(20))
            .shutdown_grace(Duration::from_millis(100))
            .build(handler),
    );
    eventually(WAIT, "the job is held", || async {
        holding.load(Ordering::SeqCst).then_some(())
    })
    .await;
    // Move the token from the record to the `leases` hash, where an older version kept it.
    let (jobs, leases) = (
        format!("{}:{{legacy}}:jobs", p.name),
        format!("{}:{{legacy}}:leases", p.name),
    );
    let mut c = conn().await;
    let raw: String = redis::cmd("HGET")
        .arg(&jobs)
        .arg(job.id.as_str())
        .query_async(&mut c)
        .await
        .unwrap();
    let (raw, payload) = raw
        .split_once('\n')
        .expect("an entry holds record and payload");
    let mut record: serde_json::Value = serde_json::from_str(raw).unwrap();
    let token = record
        .as_object_mut()
        .unwrap()
        .remove("lease")
        .expect("an active record holds its lease token");
    let token = token.as_str().unwrap().to_owned();
    let _: () = redis::pipe()
        .hset(&jobs, job.id.as_str(), format!("{record}\n{payload}"))
        .ignore()
        .hset(&leases, job.id.as_str(), &token)
        .ignore()
        .query_async(&mut c)
        .await
        .unwrap();
    // Heartbeats renew it meanwhile (20 ms apart): none may call it lost.
    tokio::time::sleep(Duration::from_millis(100)).await;
    go.notify_one();
    let got: u32 = q.wait_result(&job.id, WAIT).await.unwrap();
    assert_eq!(got, 7);
    assert_eq!(q.status(&job.id).await.unwrap().attempts, 1);
    let left: Option<String> = redis::cmd("HGET")
        .arg(&leases)
        .arg(job.id.as_str())
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(left, None, "the old lease entry outlived the lease");
    stop(holder).await;
}

/// Jobs an earlier version queued (record alone in `jobs`, payload in the `payloads`
/// hash, id in the `ready` sorted set) still count as queued, run once each in their
/// priority order, and their dead letters still show the payload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_queued_in_the_old_layout_still_run() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("oldlayout").await;
    let key = |name: &str| format!("{}:{{oldlayout}}:{name}", p.name);
    let mut c = conn().await;
    // Three old jobs (low, high, normal by score), and one new job.
    let mut pipe = redis::pipe();
    for (id, rank, seq, n) in [
        ("old-low", 2u64, 1u64, 3u32),
        ("old-high", 0, 2, 1),
        ("old-normal", 1, 3, 2),
    ] {
        pipe.hset(
            key("jobs"),
            id,
            format!(r#"{{"state":"queued","seq":{seq},"pri":{rank},"created_at":1}}"#),
        )
        .ignore()
        .hset(key("payloads"), id, format!(r#"{{"n":{n}}}"#))
        .ignore()
        .zadd(key("ready"), id, rank * 10_000_000_000_000 + seq)
        .ignore();
    }
    let _: () = pipe.query_async(&mut c).await.unwrap();
    let stats = q.stats().await.unwrap();
    assert_eq!(stats.queued, 3);
    assert_eq!(
        stats.queued_by_priority,
        vec![
            (Priority::High, 1),
            (Priority::Normal, 1),
            (Priority::Low, 1)
        ]
    );
    let new = q.enqueue(Echo { n: 4 }).await.unwrap();
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let l = log.clone();
    let handler = handler_fn(move |job: Echo, _ctx: JobContext| {
        let l = l.clone();
        async move {
            l.lock().unwrap().push(job.n);
            Ok::<_, JobError>(job.n * 10)
        }
    });
    let worker = spawn(Worker::builder(q.clone()).concurrency(1).build(handler));
    for (id, n) in [("old-high", 1u32), ("old-normal", 2), ("old-low", 3)] {
        let got: u32 = q.wait_result(&JobId::new(id).unwrap(), WAIT).await.unwrap();
        assert_eq!(got, n * 10, "{id}");
    }
    assert_eq!(q.wait_result::<u32>(&new.id, WAIT).await.unwrap(), 40);
    stop(worker).await;
    // The lanes first (the new job), then the old set in its order.
    assert_eq!(*log.lock().unwrap(), vec![4, 1, 2, 3]);
    let left: u32 = redis::cmd("EXISTS")
        .arg(key("ready"))
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(left, 0, "the old ready set is drained");

    // An old dead letter: its payload comes from the payloads hash.
    let _: () = redis::pipe()
        .hset(
            key("jobs"),
            "old-dead",
            r#"{"state":"dead","reason":"r","finished_at":5}"#,
        )
        .ignore()
        .hset(key("payloads"), "old-dead", r#"{"n":9}"#)
        .ignore()
        .zadd(key("dead"), "old-dead", 5)
        .ignore()
        .query_async(&mut c)
        .await
        .unwrap();
    let dead = q
        .dead_letter()
        .get(&JobId::new("old-dead").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(dead.job.unwrap().n, 9);
}

/// Text that needs escapes in JSON (quotes, backslashes, slashes, controls, non-ASCII)
/// and the largest numbers a record holds come back from the record exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_text_and_large_numbers_round_trip_exactly() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("escapes").await;
    const MESSAGE: &str =
        "a \"quoted\" \\ back/slash,\nnew line\t tab, \u{1} control, é ü 字, {\"json\":[1]}";
    let handler = handler_fn(|_job: Echo, _ctx: JobContext| async move {
        Err::<u32, _>(JobError::permanent(MESSAGE))
    });
    // A timeout of ~3 years, and a result TTL past the cap (1e13 ms) the client
    // clamps every duration to.
    let long = Duration::from_millis(123_456_789_012_345);
    let job = q
        .enqueue(Echo { n: 1 })
        .timeout(Duration::from_millis(99_999_999_999))
        .result_ttl(long)
        .await
        .unwrap();
    let worker = spawn(Worker::builder(q.clone()).build(handler));
    let st = eventually(WAIT, "buried", || async {
        let st = q.status(&job.id).await.ok()?;
        (st.state == JobState::Dead).then_some(st)
    })
    .await;
    stop(worker).await;
    assert_eq!(st.reason.as_deref(), Some(MESSAGE));
    assert_eq!(st.last_error().unwrap().message, MESSAGE);
    let mut c = conn().await;
    let raw: String = redis::cmd("HGET")
        .arg(format!("{}:{{escapes}}:jobs", p.name))
        .arg(job.id.as_str())
        .query_async(&mut c)
        .await
        .unwrap();
    let record = raw.split_once('\n').unwrap().0;
    let value: serde_json::Value = serde_json::from_str(record).unwrap();
    assert_eq!(value["timeout_ms"], 99_999_999_999u64, "{record}");
    assert_eq!(value["result_ttl_ms"], 10_000_000_000_000u64, "{record}");
    assert_eq!(value["reason"], MESSAGE);
}
