//! Deduplication and rate limits at enqueue.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use voxqueue::{
    Deduplicator, Error, JobContext, JobError, JobState, Queue, RateLimit, Worker, handler_fn,
};

use crate::common::{Prefix, eventually, shutdown};
use crate::queue::Echo;

const WAIT: Duration = Duration::from_secs(10);

async fn dedup_queue(p: &Prefix, name: &str, ttl: Duration) -> Queue<Echo> {
    p.builder::<Echo>(name)
        .dedup(Deduplicator::new(ttl))
        .connect()
        .await
        .unwrap()
}

fn counting(
    calls: Arc<AtomicUsize>,
    fail_on: Option<u32>,
) -> impl voxqueue::Handler<Echo, Output = u32> {
    handler_fn(move |job: Echo, _ctx: JobContext| {
        let calls = calls.clone();
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            if Some(job.n) == fail_on {
                return Err(JobError::permanent("no"));
            }
            Ok(job.n)
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_identical_requests_make_one_job_and_one_run() {
    let p = Prefix::new();
    let q = dedup_queue(&p, "coalesce", Duration::from_secs(60)).await;
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let q = q.clone();
            tokio::spawn(async move { q.enqueue(Echo { n: 9 }).await.unwrap() })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let id = results[0].id.clone();
    assert!(results.iter().all(|r| r.id == id));
    assert_eq!(
        results.iter().filter(|r| r.duplicate_of.is_none()).count(),
        1
    );
    assert_eq!(
        results
            .iter()
            .filter(|r| r.duplicate_of.as_ref() == Some(&id))
            .count(),
        49
    );
    let stats = q.stats().await.unwrap();
    assert_eq!(stats.totals.get("enqueued"), Some(&1));
    assert_eq!(stats.totals.get("deduplicated"), Some(&49));

    let calls = Arc::new(AtomicUsize::new(0));
    let (stop, signal) = shutdown();
    let w = tokio::spawn(
        Worker::builder(q.clone())
            .build(counting(calls.clone(), None))
            .run_until(signal),
    );
    assert_eq!(q.wait_result::<u32>(&id, WAIT).await.unwrap(), 9);
    let _ = stop.send(());
    w.await.unwrap().unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_duplicate_returns_the_stored_result_without_new_work() {
    let p = Prefix::new();
    let q = dedup_queue(&p, "reuse", Duration::from_secs(60)).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let (stop, signal) = shutdown();
    let w = tokio::spawn(
        Worker::builder(q.clone())
            .build(counting(calls.clone(), None))
            .run_until(signal),
    );
    let first = q.enqueue(Echo { n: 4 }).await.unwrap();
    assert_eq!(q.wait_result::<u32>(&first.id, WAIT).await.unwrap(), 4);
    let again = q.enqueue(Echo { n: 4 }).await.unwrap();
    assert_eq!(again.id, first.id);
    assert_eq!(again.duplicate_of, Some(first.id.clone()));
    assert_eq!(again.state, JobState::Completed);
    assert_eq!(q.wait_result::<u32>(&again.id, WAIT).await.unwrap(), 4);
    // A different request is new work.
    let other = q.enqueue(Echo { n: 5 }).await.unwrap();
    assert_ne!(other.id, first.id);
    q.wait_result::<u32>(&other.id, WAIT).await.unwrap();
    let _ = stop.send(());
    w.await.unwrap().unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_permanent_failure_or_the_ttl_a_duplicate_is_a_new_job() {
    let p = Prefix::new();
    let q = dedup_queue(&p, "renew", Duration::from_millis(300)).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let (stop, signal) = shutdown();
    let w = tokio::spawn(
        Worker::builder(q.clone())
            .build(counting(calls.clone(), Some(0)))
            .run_until(signal),
    );

    let failed = q.enqueue(Echo { n: 0 }).await.unwrap();
    assert_eq!(
        q.wait(&failed.id, WAIT).await.unwrap().state,
        JobState::Dead
    );
    let retry = q.enqueue(Echo { n: 0 }).await.unwrap();
    assert_ne!(retry.id, failed.id);
    assert_eq!(retry.duplicate_of, None);

    let done = q.enqueue(Echo { n: 1 }).await.unwrap();
    q.wait_result::<u32>(&done.id, WAIT).await.unwrap();
    assert_eq!(q.enqueue(Echo { n: 1 }).await.unwrap().id, done.id);
    let fresh = eventually(WAIT, "dedup TTL passed", || async {
        let e = q.enqueue(Echo { n: 1 }).await.unwrap();
        (e.id != done.id).then_some(e)
    })
    .await;
    assert_eq!(fresh.duplicate_of, None);
    let _ = stop.send(());
    w.await.unwrap().unwrap();
}

#[tokio::test]
async fn explicit_keys_and_opt_outs_override_the_queue() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("keys").await; // no deduplicator
    let a = q
        .enqueue(Echo { n: 1 })
        .dedup_key("tenant-7:hello")
        .await
        .unwrap();
    let b = q
        .enqueue(Echo { n: 2 })
        .dedup_key("tenant-7:hello")
        .await
        .unwrap();
    assert_eq!(b.duplicate_of, Some(a.id.clone()));
    let d = dedup_queue(&p, "keys", Duration::from_secs(60)).await;
    let c = d.enqueue(Echo { n: 3 }).await.unwrap();
    let e = d.enqueue(Echo { n: 3 }).no_dedup().await.unwrap();
    assert_ne!(c.id, e.id);
    // Identical jobs in one bulk call make one job.
    let bulk = d
        .enqueue_bulk(vec![Echo { n: 8 }, Echo { n: 8 }])
        .await
        .unwrap();
    assert_eq!(bulk[0].id, bulk[1].id);
    assert_eq!(bulk[1].duplicate_of, Some(bulk[0].id.clone()));
}

#[tokio::test]
async fn the_rate_limit_rejects_the_next_job_and_recovers() {
    let p = Prefix::new();
    let q = dedup_queue(&p, "limits", Duration::from_secs(60)).await;
    let limit = RateLimit::new("api-key-1", 3, Duration::from_millis(600)).unwrap();
    let t0 = std::time::Instant::now();
    for n in 0..3 {
        q.enqueue(Echo { n })
            .rate_limit(limit.clone())
            .await
            .unwrap();
    }
    // A duplicate creates no work and is not counted.
    q.enqueue(Echo { n: 0 })
        .rate_limit(limit.clone())
        .await
        .unwrap();
    let err = q
        .enqueue(Echo { n: 3 })
        .rate_limit(limit.clone())
        .await
        .unwrap_err();
    let Error::RateLimited { key, retry_after } = err else {
        panic!("{err}")
    };
    assert_eq!(key, "api-key-1");
    // GCRA, 3 per 600 ms: each job costs 200 ms of arrival time, so the fourth fits
    // 200 ms after the first, less the time these calls took (rounded up to the ms).
    let elapsed = t0.elapsed();
    assert!(
        retry_after <= Duration::from_millis(200)
            && retry_after + elapsed + Duration::from_millis(2) >= Duration::from_millis(200),
        "{retry_after:?} after {elapsed:?}"
    );
    // Another key has its own budget.
    let other = RateLimit::new("api-key-2", 3, Duration::from_millis(600)).unwrap();
    q.enqueue(Echo { n: 3 }).rate_limit(other).await.unwrap();
    assert_eq!(q.stats().await.unwrap().queued, 4);
    tokio::time::sleep(retry_after).await; // the limiter said exactly when
    q.enqueue(Echo { n: 4 }).rate_limit(limit).await.unwrap();
}
