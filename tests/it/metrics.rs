//! Metrics through the `metrics` facade, read back with a debugging recorder, and the
//! recent-window statistics kept in Redis.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use voxqueue::{JobContext, JobError, JobId, JobState, RetryPolicy, Worker, handler_fn};

use crate::common::{Prefix, eventually, shutdown};
use crate::queue::Echo;

/// One recorder for the whole test binary (a global can be set once). Only this
/// module takes snapshots, and it filters by its own queue's label.
fn snapshotter() -> &'static Snapshotter {
    static SNAP: OnceLock<Snapshotter> = OnceLock::new();
    SNAP.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder
            .install()
            .expect("the only metrics recorder in this binary");
        snapshotter
    })
}

/// Counter totals and histogram sample counts for one queue, by metric name (and
/// `kind` or `state` label), gauges at their last value.
///
/// A snapshot drains the recorder's counters and histograms for every queue, so what
/// each one read is kept here for all: tests that run side by side (or read twice)
/// never take each other's counts.
fn read(queue: &str) -> HashMap<String, f64> {
    static SEEN: Mutex<Option<HashMap<(String, String), f64>>> = Mutex::new(None);
    let mut guard = SEEN.lock().unwrap();
    let seen = guard.get_or_insert_with(HashMap::new);
    for (key, _, _, value) in snapshotter().snapshot().into_vec() {
        let key = key.key();
        let Some(owner) = key.labels().find(|l| l.key() == "queue") else {
            continue;
        };
        let mut name = key.name().to_owned();
        for l in key
            .labels()
            .filter(|l| l.key() == "kind" || l.key() == "state")
        {
            name = format!("{name}{{{}}}", l.value());
        }
        let slot = seen.entry((owner.value().to_owned(), name)).or_insert(0.0);
        match value {
            DebugValue::Counter(n) => *slot += n as f64,
            DebugValue::Gauge(g) => *slot = g.into_inner(),
            DebugValue::Histogram(samples) => *slot += samples.len() as f64,
        }
    }
    seen.iter()
        .filter(|((q, _), _)| q == queue)
        .map(|((_, n), v)| (n.clone(), *v))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_histograms_and_gauges_move_with_the_jobs() {
    snapshotter();
    let p = Prefix::new();
    let name = format!("metrics-{}", &p.name[7..15]);
    let q = p.queue::<Echo>(&name).await;
    let id = JobId::new("once").unwrap();
    q.enqueue(Echo { n: 1 }).id(id.clone()).await.unwrap();
    q.enqueue(Echo { n: 1 }).id(id.clone()).await.unwrap(); // a duplicate
    let bad = q.enqueue(Echo { n: 0 }).max_attempts(1).await.unwrap();
    let handler = handler_fn(|job: Echo, _ctx: JobContext| async move {
        if job.n == 0 {
            return Err(JobError::permanent("zero"));
        }
        Ok(job.n)
    });
    let (stop, signal) = shutdown();
    let w = tokio::spawn(Worker::builder(q.clone()).build(handler).run_until(signal));
    q.wait_result::<u32>(&id, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        q.wait(&bad.id, Duration::from_secs(10))
            .await
            .unwrap()
            .state,
        JobState::Dead
    );
    // Reading stats sets the gauges: one live worker now (once its heartbeat thread,
    // which registers it on a connection of its own, has beaten: on a loaded machine
    // the jobs may be done first).
    eventually(Duration::from_secs(10), "the worker registered", || async {
        (q.stats().await.ok()?.workers == 1).then_some(())
    })
    .await;
    assert_eq!(read(&name).get("voxqueue_workers"), Some(&1.0));
    let _ = stop.send(());
    w.await.unwrap().unwrap();
    let stats = q.stats().await.unwrap();

    let m = read(&name);
    assert_eq!(m.get("voxqueue_jobs_enqueued_total"), Some(&2.0), "{m:?}");
    assert_eq!(m.get("voxqueue_jobs_deduplicated_total"), Some(&1.0));
    assert_eq!(m.get("voxqueue_jobs_completed_total"), Some(&1.0));
    assert_eq!(m.get("voxqueue_jobs_failed_total{permanent}"), Some(&1.0));
    assert_eq!(m.get("voxqueue_jobs_dead_total"), Some(&1.0));
    assert_eq!(m.get("voxqueue_job_duration_seconds"), Some(&2.0));
    assert_eq!(m.get("voxqueue_job_wait_seconds"), Some(&2.0));
    assert_eq!(m.get("voxqueue_queue_jobs{dead}"), Some(&1.0));
    assert_eq!(m.get("voxqueue_queue_jobs{queued}"), Some(&0.0));
    assert_eq!(m.get("voxqueue_workers"), Some(&(stats.workers as f64)));

    // The same story from Redis, over the recent window.
    assert_eq!(stats.totals.get("deduplicated"), Some(&1));
    assert_eq!((stats.recent.completed, stats.recent.failed), (1, 1));
    assert_eq!(stats.recent.error_rate, Some(0.5));
    assert!(stats.recent.mean_duration.is_some());
}

/// A retried attempt and a cancelled one are counted under their own names: a
/// dashboard tells a flaky GPU from users cancelling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_and_cancellations_are_counted() {
    snapshotter();
    let p = Prefix::new();
    let name = format!("metrics-rc-{}", &p.name[7..15]);
    let q = p.queue::<Echo>(&name).await;
    let flaky = q.enqueue(Echo { n: 1 }).await.unwrap();
    let held = q.enqueue(Echo { n: 2 }).await.unwrap();
    let handler = handler_fn(|job: Echo, ctx: JobContext| async move {
        match (job.n, ctx.attempt()) {
            (1, 1) => Err(JobError::transient("GPU busy")),
            (2, _) => {
                ctx.cancelled().await;
                Err(JobError::Cancelled)
            }
            _ => Ok(job.n),
        }
    });
    let (stop, signal) = shutdown();
    let w = tokio::spawn(
        Worker::builder(q.clone())
            .concurrency(2)
            .heartbeat(Duration::from_millis(50))
            .retry(RetryPolicy::fixed(Duration::from_millis(10)).max_attempts(3))
            .build(handler)
            .run_until(signal),
    );
    q.wait_result::<u32>(&flaky.id, Duration::from_secs(10))
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "the held job running", || async {
        (q.status(&held.id).await.unwrap().state == JobState::Active).then_some(())
    })
    .await;
    q.cancel(&held.id).await.unwrap();
    let st = q.wait(&held.id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(st.state, JobState::Cancelled);
    let _ = stop.send(());
    w.await.unwrap().unwrap();

    let m = read(&name);
    assert_eq!(
        m.get("voxqueue_jobs_failed_total{transient}"),
        Some(&1.0),
        "{m:?}"
    );
    assert_eq!(m.get("voxqueue_jobs_retried_total"), Some(&1.0));
    assert_eq!(m.get("voxqueue_jobs_completed_total"), Some(&1.0));
    assert_eq!(m.get("voxqueue_jobs_cancelled_total"), Some(&1.0));
    assert_eq!(m.get("voxqueue_jobs_dead_total"), None);
}
