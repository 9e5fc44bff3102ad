//! The dead letters: what lands there, and what an operator can do with it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use voxqueue::{
    Error, EventKind, Handler, JobContext, JobError, JobId, JobState, Queue, RetryPolicy, Worker,
    handler_fn,
};

use crate::common::{Prefix, eventually, shutdown};
use crate::queue::Echo;

const WAIT: Duration = Duration::from_secs(10);

type Running = (oneshot::Sender<()>, JoinHandle<Result<(), Error>>);

fn spawn<H: Handler<Echo>>(queue: &Queue<Echo>, handler: H) -> Running {
    let worker = Worker::builder(queue.clone())
        .retry(RetryPolicy::fixed(Duration::from_millis(10)).max_attempts(3))
        .build(handler);
    let (stop, signal) = shutdown();
    (stop, tokio::spawn(worker.run_until(signal)))
}

async fn stop(worker: Running) {
    let _ = worker.0.send(());
    worker.1.await.expect("worker task").expect("worker result");
}

/// A handler that fails every job for good, saying whether its number is odd or even.
fn rejecting() -> impl Handler<Echo, Output = u32> {
    handler_fn(|job: Echo, _ctx: JobContext| async move {
        let parity = if job.n % 2 == 1 { "odd" } else { "even" };
        Err::<u32, _>(JobError::permanent(format!("{parity} number {}", job.n)))
    })
}

/// Enqueues one job per id and waits for each to die before the next, so the deaths
/// are in the ids' order (ties in time fall back to the ids' order, which is the same).
async fn bury_in_order(queue: &Queue<Echo>, ids: &[&str]) {
    for (n, id) in ids.iter().enumerate() {
        let id = JobId::new(*id).unwrap();
        queue
            .enqueue(Echo { n: n as u32 })
            .id(id.clone())
            .await
            .unwrap();
        let status = queue.wait(&id, WAIT).await.unwrap();
        assert_eq!(status.state, JobState::Dead, "{id}");
    }
}

async fn raw_conn() -> redis::aio::MultiplexedConnection {
    crate::common::connection().await
}

fn key(p: &Prefix, queue: &str, name: &str) -> String {
    format!("{}:{{{queue}}}:{name}", p.name)
}

fn ids(list: &[voxqueue::JobStatus]) -> Vec<&str> {
    list.iter().map(|s| s.id.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_job_is_dead_with_every_error() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("exhausted").await;
    let w = spawn(
        &q,
        handler_fn(|_job: Echo, ctx: JobContext| async move {
            Err::<u32, _>(JobError::transient(format!("flaky {}", ctx.attempt())))
        }),
    );
    let job = q.enqueue(Echo { n: 7 }).await.unwrap();
    assert_eq!(q.wait(&job.id, WAIT).await.unwrap().state, JobState::Dead);
    stop(w).await;

    let dl = q.dead_letter();
    assert_eq!(dl.count().await.unwrap(), 1);
    let dead = dl.get(&job.id).await.unwrap().expect("in the dead letters");
    assert_eq!(dead.status.state, JobState::Dead);
    assert_eq!(dead.status.attempts, 3);
    assert_eq!(dead.status.reason.as_deref(), Some("flaky 3"));
    let history: Vec<(u32, &str, &str)> = dead
        .status
        .errors
        .iter()
        .map(|e| (e.attempt, e.kind.as_str(), e.message.as_str()))
        .collect();
    assert_eq!(
        history,
        vec![
            (1, "transient", "flaky 1"),
            (2, "transient", "flaky 2"),
            (3, "transient", "flaky 3"),
        ]
    );
    assert_eq!(dead.job, Ok(Echo { n: 7 }));
    assert_eq!(dead.payload, br#"{"n":7}"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_is_newest_first_and_pages() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("pages").await;
    let w = spawn(&q, rejecting());
    bury_in_order(&q, &["d0", "d1", "d2", "d3", "d4"]).await;
    stop(w).await;

    let dl = q.dead_letter();
    assert_eq!(dl.count().await.unwrap(), 5);
    assert_eq!(ids(&dl.list(0, 2).await.unwrap()), ["d4", "d3"]);
    assert_eq!(ids(&dl.list(2, 2).await.unwrap()), ["d2", "d1"]);
    assert_eq!(ids(&dl.list(4, 2).await.unwrap()), ["d0"]);
    assert!(dl.list(5, 2).await.unwrap().is_empty());
    assert!(dl.list(0, 0).await.unwrap().is_empty());
    let all = dl.list(0, 100).await.unwrap();
    assert_eq!(all.len(), 5);
    assert!(all.iter().all(|s| s.state == JobState::Dead));
    assert_eq!(all[0].reason.as_deref(), Some("even number 4"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_skips_missing_and_corrupt_records_instead_of_failing() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("skips").await;
    let w = spawn(&q, rejecting());
    bury_in_order(&q, &["good"]).await;
    stop(w).await;
    let mut conn = raw_conn().await;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let _: () = redis::pipe()
        .zadd(
            key(&p, "skips", "dead"),
            "ghost",
            now.as_millis() as u64 + 10,
        )
        .zadd(
            key(&p, "skips", "dead"),
            "garbled",
            now.as_millis() as u64 + 20,
        )
        .hset(key(&p, "skips", "jobs"), "garbled", "{not json")
        .query_async(&mut conn)
        .await
        .unwrap();

    let dl = q.dead_letter();
    assert_eq!(dl.count().await.unwrap(), 3);
    assert_eq!(ids(&dl.list(0, 10).await.unwrap()), ["good"]);
    assert!(
        dl.get(&JobId::new("ghost").unwrap())
            .await
            .unwrap()
            .is_none()
    );
    assert!(matches!(
        dl.get(&JobId::new("garbled").unwrap()).await,
        Err(Error::Corrupt { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_returns_the_payload_and_reports_a_corrupt_one() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("payloads").await;
    let fine = q.enqueue(Echo { n: 2 }).await.unwrap();
    let broken = q.enqueue(Echo { n: 3 }).await.unwrap();
    // Corrupted before any worker sees it: the worker cannot decode it and buries it.
    // The payload follows the record and a newline in the job's entry.
    let mut conn = raw_conn().await;
    let entry: Vec<u8> = redis::cmd("HGET")
        .arg(key(&p, "payloads", "jobs"))
        .arg(broken.id.as_str())
        .query_async(&mut conn)
        .await
        .unwrap();
    let at = entry.iter().position(|&b| b == b'\n').unwrap();
    let _: () = redis::cmd("HSET")
        .arg(key(&p, "payloads", "jobs"))
        .arg(broken.id.as_str())
        .arg([&entry[..=at], &b"\xffnot json"[..]].concat())
        .query_async(&mut conn)
        .await
        .unwrap();
    let w = spawn(&q, rejecting());
    for id in [&fine.id, &broken.id] {
        assert_eq!(q.wait(id, WAIT).await.unwrap().state, JobState::Dead);
    }
    stop(w).await;

    let dl = q.dead_letter();
    let dead = dl.get(&fine.id).await.unwrap().expect("fine is dead");
    assert_eq!(dead.job, Ok(Echo { n: 2 }));
    let dead = dl.get(&broken.id).await.unwrap().expect("broken is dead");
    assert!(dead.job.is_err(), "{:?}", dead.job);
    assert_eq!(dead.payload, b"\xffnot json");
    assert_eq!(dead.status.last_error().unwrap().kind, "decode");
    assert!(
        dl.get(&JobId::new("never-enqueued").unwrap())
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requeue_runs_the_job_again_under_the_same_id() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("requeue").await;
    let fixed = Arc::new(AtomicBool::new(false));
    let handler = {
        let fixed = fixed.clone();
        move || {
            let fixed = fixed.clone();
            handler_fn(move |job: Echo, _ctx: JobContext| {
                let fixed = fixed.load(Ordering::SeqCst);
                async move {
                    if fixed {
                        Ok(job.n * 2)
                    } else {
                        Err(JobError::permanent("model not loaded"))
                    }
                }
            })
        }
    };
    let w = spawn(&q, handler());
    let job = q.enqueue(Echo { n: 21 }).await.unwrap();
    assert_eq!(q.wait(&job.id, WAIT).await.unwrap().state, JobState::Dead);
    stop(w).await;

    let dl = q.dead_letter();
    let mut events = q.events().await.unwrap();
    assert!(dl.requeue(&job.id).await.unwrap());
    assert!(!dl.requeue(&job.id).await.unwrap(), "no longer dead");
    assert_eq!(dl.count().await.unwrap(), 0);
    let st = q.status(&job.id).await.unwrap();
    assert_eq!(st.state, JobState::Queued);
    assert_eq!(st.attempts, 0);
    assert_eq!(st.reason, None);
    assert_eq!(st.errors.len(), 1, "the history is kept");
    let requeued = tokio::time::timeout(WAIT, async {
        loop {
            let event = events.recv().await.expect("event stream");
            if event.kind == EventKind::Requeued && event.job_id == job.id {
                return event;
            }
        }
    });
    requeued.await.expect("a requeued event");

    // The waiter starts before the job runs again and gets the new run's result.
    let waiter = {
        let q = q.clone();
        let id = job.id.clone();
        tokio::spawn(async move { q.wait_result::<u32>(&id, WAIT).await })
    };
    fixed.store(true, Ordering::SeqCst);
    let w = spawn(&q, handler());
    assert_eq!(waiter.await.unwrap().unwrap(), 42);
    stop(w).await;
    let st = q.status(&job.id).await.unwrap();
    assert_eq!(st.state, JobState::Completed);
    assert_eq!(st.attempts, 1);
    assert_eq!(st.errors.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requeue_where_requeues_only_the_matching_jobs() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("filter").await;
    let w = spawn(&q, rejecting());
    bury_in_order(&q, &["f0", "f1", "f2", "f3"]).await;
    stop(w).await;

    let dl = q.dead_letter();
    let odd =
        |s: &voxqueue::JobStatus| s.last_error().is_some_and(|e| e.message.starts_with("odd"));
    assert_eq!(dl.requeue_where(odd).await.unwrap(), 2);
    assert_eq!(ids(&dl.list(0, 10).await.unwrap()), ["f2", "f0"]);
    for id in ["f1", "f3"] {
        let st = q.status(&JobId::new(id).unwrap()).await.unwrap();
        assert_eq!(st.state, JobState::Queued, "{id}");
    }
    assert_eq!(dl.requeue_where(odd).await.unwrap(), 0);
    assert_eq!(dl.requeue_all().await.unwrap(), 2);
    assert_eq!(dl.count().await.unwrap(), 0);
    let stats = q.stats().await.unwrap();
    assert_eq!(stats.queued, 4);
    assert_eq!(stats.totals.get("requeued"), Some(&4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requeues_leave_the_jobs_that_die_after_they_start() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("later").await;
    let w = spawn(&q, rejecting());
    bury_in_order(&q, &["a", "b", "later"]).await;
    stop(w).await;
    // As far as the dead letters say, "later" dies a minute after both calls start
    // (by Redis's clock): a job that dies again at once cannot keep them going.
    let mut conn = raw_conn().await;
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    let _: u64 = redis::cmd("ZADD")
        .arg(key(&p, "later", "dead"))
        .arg("XX")
        .arg(secs * 1000 + micros / 1000 + 60_000)
        .arg("later")
        .query_async(&mut conn)
        .await
        .unwrap();
    let dl = q.dead_letter();
    assert_eq!(dl.requeue_where(|s| s.id.as_str() != "b").await.unwrap(), 1);
    assert_eq!(dl.requeue_all().await.unwrap(), 1);
    assert_eq!(ids(&dl.list(0, 10).await.unwrap()), ["later"]);
    for id in ["a", "b"] {
        let st = q.status(&JobId::new(id).unwrap()).await.unwrap();
        assert_eq!(st.state, JobState::Queued, "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_deletes_one_all_or_the_older_ones_and_never_a_live_job() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("purge").await;
    let w = spawn(&q, rejecting());
    bury_in_order(&q, &["p0", "p1", "p2", "p3"]).await;
    stop(w).await;
    let id = |s: &str| JobId::new(s).unwrap();

    let dl = q.dead_letter();
    assert!(dl.purge(&id("p0")).await.unwrap());
    assert!(!dl.purge(&id("p0")).await.unwrap());
    assert!(matches!(q.status(&id("p0")).await, Err(Error::NotFound(_))));

    // p1 and p2 died long ago.
    let hour_ago =
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap() - Duration::from_secs(3600);
    let mut conn = raw_conn().await;
    let _: () = redis::pipe()
        .zadd(
            key(&p, "purge", "dead"),
            "p1",
            hour_ago.as_millis() as u64 - 1,
        )
        .zadd(key(&p, "purge", "dead"), "p2", hour_ago.as_millis() as u64)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        dl.purge_older_than(Duration::from_secs(1800))
            .await
            .unwrap(),
        2
    );
    assert_eq!(ids(&dl.list(0, 10).await.unwrap()), ["p3"]);
    assert_eq!(
        records(&p, "purge").await,
        1,
        "purged jobs and their payloads are deleted"
    );

    let live = q.enqueue(Echo { n: 9 }).await.unwrap();
    assert!(!dl.purge(&live.id).await.unwrap());
    assert_eq!(dl.purge_all().await.unwrap(), 1);
    assert_eq!(dl.count().await.unwrap(), 0);
    assert!(matches!(q.status(&id("p3")).await, Err(Error::NotFound(_))));
    assert_eq!(q.status(&live.id).await.unwrap().state, JobState::Queued);
    assert_eq!(q.stats().await.unwrap().totals.get("purged"), Some(&4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cap_drops_the_oldest_dead_jobs() {
    let p = Prefix::new();
    let q = p
        .builder::<Echo>("capped")
        .dead_letter_cap(2)
        .connect()
        .await
        .unwrap();
    let w = spawn(&q, rejecting());
    bury_in_order(&q, &["c0", "c1", "c2"]).await;
    stop(w).await;

    let dl = q.dead_letter();
    assert_eq!(dl.count().await.unwrap(), 2);
    assert_eq!(ids(&dl.list(0, 10).await.unwrap()), ["c2", "c1"]);
    assert!(matches!(
        q.status(&JobId::new("c0").unwrap()).await,
        Err(Error::NotFound(_))
    ));
    let stats = q.stats().await.unwrap();
    assert_eq!(stats.totals.get("purged"), Some(&1));
    assert!(
        !stats.totals.contains_key("dead_cap"),
        "a setting, not a total"
    );
}

/// Waits until the queue holds `dead` dead jobs and nothing else.
async fn until_all_dead(q: &Queue<Echo>, dead: u64) {
    eventually(WAIT, "every job dead", || async {
        let s = q.stats().await.unwrap();
        (s.dead == dead && s.queued + s.scheduled + s.active == 0).then_some(())
    })
    .await;
}

/// How many job records the queue keeps.
async fn records(p: &Prefix, queue: &str) -> u64 {
    redis::cmd("HLEN")
        .arg(key(p, queue, "jobs"))
        .query_async(&mut raw_conn().await)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requeue_all_and_purge_all_reach_past_one_batch() {
    // 1001 dead jobs: two whole batches of 500 and one more, so a page or batch that
    // comes back exactly full must not be taken for the last.
    const JOBS: u32 = 1001;
    let p = Prefix::new();
    let q = p.queue::<Echo>("many-dead").await;
    let start = || {
        let worker = Worker::builder(q.clone())
            .concurrency(50)
            .retry(RetryPolicy::fixed(Duration::from_millis(10)).max_attempts(1))
            .build(rejecting());
        let (stop, signal) = shutdown();
        (stop, tokio::spawn(worker.run_until(signal)))
    };
    q.enqueue_bulk((0..JOBS).map(|n| Echo { n })).await.unwrap();
    let w = start();
    until_all_dead(&q, u64::from(JOBS)).await;
    stop(w).await;

    let dl = q.dead_letter();
    assert_eq!(dl.requeue_all().await.unwrap(), u64::from(JOBS));
    let s = q.stats().await.unwrap();
    assert_eq!((s.dead, s.queued), (0, u64::from(JOBS)));

    let w = start();
    until_all_dead(&q, u64::from(JOBS)).await;
    stop(w).await;
    assert_eq!(dl.purge_all().await.unwrap(), u64::from(JOBS));
    assert_eq!(dl.count().await.unwrap(), 0);
    assert_eq!(
        records(&p, "many-dead").await,
        0,
        "every purged record is gone"
    );
    let totals = q.stats().await.unwrap().totals;
    assert_eq!(totals.get("requeued"), Some(&u64::from(JOBS)));
    assert_eq!(totals.get("purged"), Some(&u64::from(JOBS)));
}
