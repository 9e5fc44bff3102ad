//! The producer's side: enqueue options, ids, status, cancel, stats, events.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use voxqueue::{CancelOutcome, Error, EventKind, JobId, JobOptions, JobState, Priority, Queue};

use crate::common::{Prefix, within};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Echo {
    pub n: u32,
}

#[tokio::test]
async fn invalid_queue_names_are_typed_errors() {
    let p = Prefix::new();
    for name in ["", "a:b", "a{b}", "sp ace"] {
        let err = p.builder::<Echo>(name).connect().await.unwrap_err();
        assert!(matches!(err, Error::InvalidQueueName(_)), "{name}: {err}");
    }
    let err = Queue::<Echo>::builder("ok")
        .url("redis://127.0.0.1:6379")
        .prefix("a{b")
        .connect()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidPrefix(_)));
}

#[tokio::test]
async fn enqueue_returns_a_queued_job_with_its_status() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("status").await;
    let job = q
        .enqueue(Echo { n: 1 })
        .priority(Priority::High)
        .await
        .unwrap();
    assert_eq!(job.state, JobState::Queued);
    assert_eq!(job.duplicate_of, None);
    let st = q.status(&job.id).await.unwrap();
    assert_eq!(st.state, JobState::Queued);
    assert_eq!(st.priority, Priority::High);
    assert_eq!(st.attempts, 0);
    assert!(st.started_at.is_none());
    assert!(matches!(
        q.status(&JobId::new("nope").unwrap()).await,
        Err(Error::NotFound(_))
    ));
}

#[tokio::test]
async fn caller_chosen_id_is_idempotent() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("ids").await;
    let id = JobId::new("order-17").unwrap();
    let first = q.enqueue(Echo { n: 1 }).id(id.clone()).await.unwrap();
    let second = q
        .enqueue(Echo { n: 2 })
        .id(id.clone())
        .priority(Priority::Low)
        .await
        .unwrap();
    assert_eq!(first.id, id);
    assert_eq!(first.duplicate_of, None);
    assert_eq!(second.id, id);
    assert_eq!(second.duplicate_of, Some(id.clone()));
    // The first enqueue's job is untouched.
    assert_eq!(q.status(&id).await.unwrap().priority, Priority::Normal);
    assert_eq!(q.stats().await.unwrap().queued, 1);
    assert!(JobId::new("").is_err());
}

#[tokio::test]
async fn delayed_jobs_are_scheduled() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("delay").await;
    let job = q
        .enqueue(Echo { n: 1 })
        .delay(Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(job.state, JobState::Scheduled);
    let stats = q.stats().await.unwrap();
    assert_eq!((stats.scheduled, stats.queued), (1, 0));
    // A worker's first claim looks for due maintenance and keeps when it is next due
    // beside the counters: a time, not a total.
    let w = crate::worker::spawn(
        voxqueue::Worker::builder(q.clone()).build(voxqueue::handler_fn(
            |job: Echo, _ctx| async move { Ok::<_, voxqueue::JobError>(job.n) },
        )),
    );
    let conn = crate::common::connection().await;
    let key = format!("{}:{{delay}}:stats", p.name);
    crate::common::eventually(Duration::from_secs(10), "a due time kept", || {
        let (mut conn, key) = (conn.clone(), key.clone());
        async move {
            let due: Option<u64> = redis::cmd("HGET")
                .arg(&key)
                .arg("due")
                .query_async(&mut conn)
                .await
                .unwrap();
            due
        }
    })
    .await;
    crate::worker::stop(w).await;
    let stats = q.stats().await.unwrap();
    assert_eq!(
        stats.totals.keys().map(String::as_str).collect::<Vec<_>>(),
        vec!["enqueued"]
    );
}

/// Jobs an older version queued sit in one sorted set, the priority rank as the
/// score's leading digit: stats count each in its own priority, beside the lanes.
#[tokio::test]
async fn stats_count_old_layout_jobs_by_the_priority_their_score_names() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("oldstats").await;
    q.enqueue(Echo { n: 0 })
        .priority(Priority::Low)
        .await
        .unwrap();
    // One high, two normal and three low jobs by score (rank × 10^13 + sequence).
    let mut pipe = redis::pipe();
    for (id, score) in [
        ("h1", 7u64),
        ("n1", 10_000_000_000_001),
        ("n2", 19_999_999_999_999),
        ("l1", 20_000_000_000_000),
        ("l2", 20_000_000_000_002),
        ("l3", 29_999_999_999_999),
    ] {
        pipe.zadd(format!("{}:{{oldstats}}:ready", p.name), id, score)
            .ignore();
    }
    let mut conn = crate::common::connection().await;
    let _: () = pipe.query_async(&mut conn).await.unwrap();
    let stats = q.stats().await.unwrap();
    assert_eq!(
        stats.queued_by_priority,
        vec![
            (Priority::High, 1),
            (Priority::Normal, 2),
            (Priority::Low, 4)
        ]
    );
    assert_eq!(stats.queued, 7);
}

#[tokio::test]
async fn bulk_enqueue_stores_every_job_in_order() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("bulk").await;
    let jobs = q.enqueue_bulk((0..1200).map(|n| Echo { n })).await.unwrap();
    assert_eq!(jobs.len(), 1200);
    assert!(
        jobs.iter()
            .all(|j| j.state == JobState::Queued && j.duplicate_of.is_none())
    );
    let stats = q.stats().await.unwrap();
    assert_eq!(stats.queued, 1200);
    assert_eq!(stats.queued_by_priority[1], (Priority::Normal, 1200));
    assert_eq!(stats.totals.get("enqueued"), Some(&1200));
    // In line in the order given, each with its own payload.
    let mut conn = crate::common::connection().await;
    let ready: Vec<String> = redis::cmd("LRANGE")
        .arg(format!("{}:{{bulk}}:ready:normal", p.name))
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    let ids: Vec<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(ready, ids);
    // One entry per job: the record, a newline, the payload (no payloads hash).
    let entries: Vec<Vec<u8>> = redis::cmd("HMGET")
        .arg(format!("{}:{{bulk}}:jobs", p.name))
        .arg(&ids)
        .query_async(&mut conn)
        .await
        .unwrap();
    for (n, entry) in entries.iter().enumerate() {
        let at = entry.iter().position(|&b| b == b'\n').unwrap();
        let record: serde_json::Value = serde_json::from_slice(&entry[..at]).unwrap();
        assert_eq!(record["state"], "queued");
        let echo: Echo = serde_json::from_slice(&entry[at + 1..]).unwrap();
        assert_eq!(echo.n, n as u32);
    }
    let exists: u32 = redis::cmd("EXISTS")
        .arg(format!("{}:{{bulk}}:payloads", p.name))
        .arg(format!("{}:{{bulk}}:ready", p.name))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(exists, 0);

    let mixed = q
        .enqueue_bulk_with(vec![
            (Echo { n: 1 }, JobOptions::new().priority(Priority::High)),
            (
                Echo { n: 2 },
                JobOptions::new().delay(Duration::from_secs(30)),
            ),
        ])
        .await
        .unwrap();
    assert_eq!(mixed[0].state, JobState::Queued);
    assert_eq!(mixed[1].state, JobState::Scheduled);
}

#[tokio::test]
async fn cancelling_a_waiting_job_is_immediate() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("cancel").await;
    let queued = q.enqueue(Echo { n: 1 }).await.unwrap();
    let scheduled = q
        .enqueue(Echo { n: 2 })
        .delay(Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        q.cancel(&queued.id).await.unwrap(),
        CancelOutcome::Cancelled
    );
    assert_eq!(
        q.cancel(&scheduled.id).await.unwrap(),
        CancelOutcome::Cancelled
    );
    for id in [&queued.id, &scheduled.id] {
        let st = q.status(id).await.unwrap();
        assert_eq!(st.state, JobState::Cancelled);
        assert!(st.finished_at.is_some());
        assert_eq!(
            q.cancel(id).await.unwrap(),
            CancelOutcome::AlreadyFinished(JobState::Cancelled)
        );
    }
    assert_eq!(q.stats().await.unwrap().totals.get("cancelled"), Some(&2));
    let stats = q.stats().await.unwrap();
    assert_eq!((stats.queued, stats.scheduled), (0, 0));
    assert!(matches!(
        q.cancel(&JobId::new("ghost").unwrap()).await,
        Err(Error::NotFound(_))
    ));
    // A cancelled job's waiter learns it at once.
    let err = q
        .wait_result::<u32>(&queued.id, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::JobFailed {
                state: JobState::Cancelled,
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn events_are_published_for_transitions() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("events").await;
    let mut events = q.events().await.unwrap();
    let job = q.enqueue(Echo { n: 1 }).await.unwrap();
    q.cancel(&job.id).await.unwrap();
    let first = crate::common::within("queued event", events.recv())
        .await
        .unwrap();
    assert_eq!((first.kind, &first.job_id), (EventKind::Queued, &job.id));
    let second = crate::common::within("cancelled event", events.recv())
        .await
        .unwrap();
    assert_eq!(
        (second.kind, &second.job_id),
        (EventKind::Cancelled, &job.id)
    );
}

/// The stream reader lives as long as the queue value: dropping the last clone stops it
/// (and frees its connection), and subscribers then see the end of the stream.
#[tokio::test]
async fn dropping_the_queue_ends_its_event_streams() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("events-end").await;
    let mut events = q.events().await.unwrap();
    let job = q.enqueue(Echo { n: 1 }).await.unwrap();
    let first = crate::common::within("queued event", events.recv())
        .await
        .unwrap();
    assert_eq!(first.job_id, job.id);
    drop(q);
    assert_eq!(
        crate::common::within("the end of the stream", events.recv()).await,
        None
    );
}

/// A batch writes consecutive events of one kind as shared stream entries (at most 64
/// ids each); every job still gets its own event, in order.
#[tokio::test]
async fn a_batch_shares_event_entries_and_every_job_gets_its_event() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("batch-events").await;
    let mut events = q.events().await.unwrap();
    let jobs = q.enqueue_bulk((0..130).map(|n| Echo { n })).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < jobs.len() {
        let e = crate::common::within("queued events", events.recv())
            .await
            .unwrap();
        assert_eq!(e.kind, EventKind::Queued, "{e:?}");
        seen.push(e);
    }
    let ids: Vec<_> = seen.iter().map(|e| e.job_id.clone()).collect();
    let want: Vec<_> = jobs.iter().map(|j| j.id.clone()).collect();
    assert_eq!(ids, want);
    // 64 + 64 + 2: three entries, and the events of one entry share its id.
    let mut entries: Vec<&str> = seen.iter().map(|e| e.stream_id.as_str()).collect();
    entries.dedup();
    assert_eq!(entries.len(), 3, "{entries:?}");
    assert_eq!(seen[0].stream_id, seen[63].stream_id);
    assert_ne!(seen[63].stream_id, seen[64].stream_id);
    assert_eq!(seen[128].stream_id, seen[129].stream_id);
}

#[tokio::test]
async fn wait_times_out_on_a_job_nobody_runs() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("waits").await;
    let job = q.enqueue(Echo { n: 1 }).await.unwrap();
    let err = q
        .wait_result::<u32>(&job.id, Duration::from_millis(100))
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    // A job that does not exist is an error at once, not a wait until the timeout.
    let t0 = std::time::Instant::now();
    let missing = JobId::new("never-enqueued").unwrap();
    let err = within(
        "wait on a missing job",
        q.wait(&missing, Duration::from_secs(30)),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
}

#[tokio::test]
async fn the_event_stream_is_capped() {
    let p = Prefix::new();
    let q = p
        .builder::<Echo>("capped")
        .events_max(50)
        .connect()
        .await
        .unwrap();
    // One entry per enqueue (a bulk enqueue's events share entries, up to 64 each).
    for n in 0..300 {
        q.enqueue(Echo { n }).await.unwrap();
    }
    let mut conn = crate::common::connection().await;
    let len: u64 = redis::cmd("XLEN")
        .arg(format!("{}:{{capped}}:events", p.name))
        .query_async(&mut conn)
        .await
        .unwrap();
    // MAXLEN ~ 50 trims whole stream nodes (100 entries by default): at least 50 are
    // kept, and less than one node more.
    assert!((50..150).contains(&len), "{len} events kept");
}

#[tokio::test]
async fn one_bulk_call_with_a_repeated_caller_id_makes_one_job() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("bulk-ids").await;
    let id = JobId::new("same").unwrap();
    let out = q
        .enqueue_bulk_with(vec![
            (Echo { n: 1 }, JobOptions::new().id(id.clone())),
            (Echo { n: 2 }, JobOptions::new().id(id.clone())),
        ])
        .await
        .unwrap();
    assert_eq!(out[0].duplicate_of, None);
    assert_eq!(out[1].duplicate_of, Some(id.clone()));
    assert_eq!(q.stats().await.unwrap().queued, 1);
}
