//! The consumer's side: ordering, timing, failures, concurrency, leases, shutdown.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;
use voxqueue::{
    Error, Handler, JobContext, JobError, JobState, Priority, Queue, QueueOrder, RetryPolicy,
    Worker, handler_fn,
};

use crate::common::{Prefix, RedisServer, eventually, shutdown};
use crate::queue::Echo;

const WAIT: Duration = Duration::from_secs(10);

/// A worker running in the background, and the sender that stops it.
pub(crate) type Running = (oneshot::Sender<()>, JoinHandle<Result<(), Error>>);

/// Runs a worker in the background; dropping the sender stops it.
pub(crate) fn spawn<J, H>(worker: Worker<J, H>) -> Running
where
    J: serde::de::DeserializeOwned + Send + 'static,
    H: Handler<J>,
{
    let (stop, signal) = shutdown();
    (stop, tokio::spawn(worker.run_until(signal)))
}

pub(crate) async fn stop(worker: Running) {
    let _ = worker.0.send(());
    worker.1.await.expect("worker task").expect("worker result");
}

fn echo() -> impl Handler<Echo, Output = u32> {
    handler_fn(|job: Echo, _ctx: JobContext| async move { Ok::<_, JobError>(job.n) })
}

/// A handler that records the order in which jobs run.
fn recorder(log: Arc<Mutex<Vec<u32>>>) -> impl Handler<Echo, Output = u32> {
    handler_fn(move |job: Echo, _ctx: JobContext| {
        let log = log.clone();
        async move {
            log.lock().unwrap().push(job.n);
            Ok::<_, JobError>(job.n)
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priority_runs_first_and_fifo_within_a_level() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("prio").await;
    let plan = [
        (1, Priority::Low),
        (2, Priority::Normal),
        (3, Priority::High),
        (4, Priority::Low),
        (5, Priority::High),
        (6, Priority::Normal),
    ];
    for (n, pri) in plan {
        q.enqueue(Echo { n }).priority(pri).await.unwrap();
    }
    let log = Arc::new(Mutex::new(Vec::new()));
    let w = spawn(Worker::builder(q.clone()).build(recorder(log.clone())));
    eventually(WAIT, "all six ran", || async {
        (log.lock().unwrap().len() == 6).then_some(())
    })
    .await;
    stop(w).await;
    assert_eq!(*log.lock().unwrap(), vec![3, 5, 2, 6, 1, 4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_round_trips_with_status_transitions_and_wait_result() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("roundtrip").await;
    let gate = Arc::new(Notify::new());
    let g = gate.clone();
    let handler = handler_fn(move |job: Echo, ctx: JobContext| {
        let g = g.clone();
        async move {
            ctx.progress(50.0).await.map_err(JobError::transient)?;
            g.notified().await;
            Ok::<_, JobError>(job.n * 2)
        }
    });
    let job = q.enqueue(Echo { n: 21 }).await.unwrap();
    let w = spawn(Worker::builder(q.clone()).build(handler));
    let st = eventually(WAIT, "active with progress", || async {
        let st = q.status(&job.id).await.unwrap();
        (st.state == JobState::Active && st.progress == Some(50.0)).then_some(st)
    })
    .await;
    assert_eq!(st.attempts, 1);
    assert!(st.started_at.is_some() && st.worker.is_some());
    let waiter = {
        let q = q.clone();
        let id = job.id.clone();
        tokio::spawn(async move { q.wait_result::<u32>(&id, WAIT).await })
    };
    gate.notify_one();
    assert_eq!(waiter.await.unwrap().unwrap(), 42);
    let st = q.status(&job.id).await.unwrap();
    assert_eq!(st.state, JobState::Completed);
    assert!(st.finished_at.is_some() && st.has_result);
    // The progress reported meanwhile changed the record; the completion still ends it.
    assert_eq!((st.progress, st.attempts), (Some(100.0), 1));
    assert!(st.started_at.is_some() && st.worker.is_some());
    stop(w).await;
    let stats = q.stats().await.unwrap();
    assert_eq!(stats.totals.get("completed"), Some(&1));
    assert_eq!(stats.active, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_job_runs_on_time_and_not_before() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("delayed").await;
    let started = Arc::new(Mutex::new(None));
    let s = started.clone();
    let handler = handler_fn(move |job: Echo, _ctx: JobContext| {
        let s = s.clone();
        async move {
            *s.lock().unwrap() = Some(SystemTime::now());
            Ok::<_, JobError>(job.n)
        }
    });
    let w = spawn(Worker::builder(q.clone()).build(handler));
    let run_at = SystemTime::now() + Duration::from_millis(700);
    let job = q.enqueue(Echo { n: 1 }).run_at(run_at).await.unwrap();
    assert_eq!(job.state, JobState::Scheduled);
    q.wait_result::<u32>(&job.id, WAIT).await.unwrap();
    let ran = started.lock().unwrap().expect("ran");
    assert!(
        ran >= run_at,
        "ran {:?} early",
        run_at.duration_since(ran).unwrap_or_default()
    );
    // Woken by its due time, not by a slow poll.
    assert!(ran.duration_since(run_at).unwrap() < Duration::from_millis(1500));
    stop(w).await;
}

/// A claim no longer reads the scheduled, active and finished sets every time: it waits
/// for a due time the scripts keep. A job that comes due while the lanes are full must
/// still be promoted by the next claim, so every script that writes a due time brings
/// the cached one forward; if enqueue did not, the high-priority job would wait for the
/// lanes to run dry and run last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_comes_due_while_the_lanes_are_full_jumps_the_line() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("due-full").await;
    for n in 1..=20 {
        q.enqueue(Echo { n }).await.unwrap();
    }
    let gate = Arc::new(Notify::new());
    let log = Arc::new(Mutex::new(Vec::new()));
    let (g, l) = (gate.clone(), log.clone());
    let handler = handler_fn(move |job: Echo, _ctx: JobContext| {
        let (g, l) = (g.clone(), l.clone());
        async move {
            if job.n == 1 {
                g.notified().await;
            }
            l.lock().unwrap().push(job.n);
            Ok::<_, JobError>(job.n)
        }
    });
    let w = spawn(Worker::builder(q.clone()).concurrency(1).build(handler));
    eventually(WAIT, "job 1 runs", || async {
        (q.stats().await.unwrap().active >= 1).then_some(())
    })
    .await;
    q.enqueue(Echo { n: 100 })
        .priority(Priority::High)
        .delay(Duration::from_millis(20))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    gate.notify_one();
    eventually(WAIT, "all 21 ran", || async {
        (log.lock().unwrap().len() == 21).then_some(())
    })
    .await;
    stop(w).await;
    let log = log.lock().unwrap().clone();
    let at = log.iter().position(|&n| n == 100).unwrap();
    // Behind the jobs already in hand (up to five) and those the first claims after
    // the gate took, well before the lanes run dry.
    assert!(at < 12, "the due job ran in place {at}: {log:?}");
}

/// Lets the running worker `w` find `q` empty and block, then enqueues one job on `q`:
/// it runs far sooner than the worker's longest idle wait (5 s), so the enqueue woke it.
async fn woken_by_an_enqueue(w: Running, q: &Queue<Echo>) {
    eventually(WAIT, "worker registered", || async {
        (q.stats().await.unwrap().workers == 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t0 = Instant::now();
    let job = q.enqueue(Echo { n: 5 }).await.unwrap();
    assert_eq!(q.wait_result::<u32>(&job.id, WAIT).await.unwrap(), 5);
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t0.elapsed()
    );
    stop(w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_is_woken_by_enqueue() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("wake").await;
    woken_by_an_enqueue(spawn(Worker::builder(q.clone()).build(echo())), &q).await;
}

/// The last of a worker's queues wakes it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_of_several_queues_is_woken_by_any_of_them() {
    let p = Prefix::new();
    let a = p.queue::<Echo>("wake-a").await;
    let b = p.queue::<Echo>("wake-b").await;
    let w = spawn(Worker::builder(a.clone()).queue(b.clone()).build(echo()));
    woken_by_an_enqueue(w, &b).await;
}

/// Calls a private server has had so far from clients (scripts' own commands not
/// counted): script calls and blocking pops, the only commands a worker sends idle.
pub(crate) async fn client_calls(c: &mut redis::aio::MultiplexedConnection) -> u64 {
    calls_of(c, &["fcall", "evalsha", "blpop"]).await
}

/// Script calls a private server has had so far.
pub(crate) async fn script_calls(c: &mut redis::aio::MultiplexedConnection) -> u64 {
    calls_of(c, &["fcall", "evalsha"]).await
}

/// Calls of the given commands a server has had so far (`INFO commandstats`).
async fn calls_of(c: &mut redis::aio::MultiplexedConnection, commands: &[&str]) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(c)
        .await
        .unwrap();
    info.lines()
        .filter(|l| {
            commands.iter().any(|c| {
                l.strip_prefix("cmdstat_")
                    .and_then(|l| l.strip_prefix(c))
                    .is_some_and(|l| l.starts_with(':'))
            })
        })
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_sends_only_its_heartbeats() {
    let server = RedisServer::start(&[]);
    let p = Prefix::on(&server.url());
    let q = p.queue::<Echo>("quiet").await;
    let mut c = server.connection().await;
    let w = spawn(
        Worker::builder(q.clone())
            .heartbeat(Duration::from_millis(500))
            .build(echo()),
    );
    eventually(WAIT, "worker registered", || async {
        (q.stats().await.unwrap().workers == 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = client_calls(&mut c).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sent = client_calls(&mut c).await - before;
    // Four heartbeats in 2 s, and at most a claim and a BLPOP if the idle wait (5 s)
    // ran out in between: no loop polls Redis.
    assert!(
        sent <= 6,
        "{sent} script calls and pops in 2 s from an idle worker"
    );
    stop(w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_limit_is_never_exceeded() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("conc").await;
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (r, m) = (running.clone(), peak.clone());
    let handler = handler_fn(move |job: Echo, _ctx: JobContext| {
        let (r, m) = (r.clone(), m.clone());
        async move {
            let now = r.fetch_add(1, Ordering::SeqCst) + 1;
            m.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(30)).await;
            r.fetch_sub(1, Ordering::SeqCst);
            Ok::<_, JobError>(job.n)
        }
    });
    let jobs = q.enqueue_bulk((0..24).map(|n| Echo { n })).await.unwrap();
    let w = spawn(Worker::builder(q.clone()).concurrency(3).build(handler));
    for job in &jobs {
        q.wait_result::<u32>(&job.id, WAIT).await.unwrap();
    }
    stop(w).await;
    let peak = peak.load(Ordering::SeqCst);
    assert!(peak <= 3, "peak {peak}");
    assert!(peak >= 2, "never ran in parallel: peak {peak}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_fails_the_attempt_and_the_worker_goes_on() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("panic").await;
    let handler = handler_fn(|job: Echo, _ctx: JobContext| async move {
        if job.n == 0 {
            panic!("boom at zero");
        }
        Ok::<_, JobError>(job.n)
    });
    let bad = q.enqueue(Echo { n: 0 }).max_attempts(1).await.unwrap();
    let good = q.enqueue(Echo { n: 7 }).await.unwrap();
    let w = spawn(Worker::builder(q.clone()).build(handler));
    let st = q.wait(&bad.id, WAIT).await.unwrap();
    assert_eq!(st.state, JobState::Dead);
    let err = st.last_error().unwrap();
    assert_eq!(err.kind, "panic");
    assert!(err.message.contains("boom at zero"), "{}", err.message);
    assert_eq!(q.wait_result::<u32>(&good.id, WAIT).await.unwrap(), 7);
    stop(w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_that_outlives_its_timeout_fails_with_timeout() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("timeout").await;
    // Ignores its token: the worker must drop it after the grace.
    let handler = handler_fn(|job: Echo, _ctx: JobContext| async move {
        tokio::time::sleep(Duration::from_secs(60)).await;
        Ok::<_, JobError>(job.n)
    });
    let job = q
        .enqueue(Echo { n: 1 })
        .timeout(Duration::from_millis(200))
        .max_attempts(1)
        .await
        .unwrap();
    let w = spawn(
        Worker::builder(q.clone())
            .cancel_grace(Duration::from_millis(100))
            .build(handler),
    );
    let st = q.wait(&job.id, WAIT).await.unwrap();
    assert_eq!(st.state, JobState::Dead);
    assert_eq!(st.last_error().unwrap().kind, "timeout");
    stop(w).await;
}

/// A job that sets no time limit gets the worker's; one that sets its own keeps it. A
/// handler that stops when its time is up, even with a result, fails with timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workers_timeout_limits_jobs_that_set_none_and_a_jobs_own_wins() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("worker-timeout").await;
    // Job n takes n ms unless asked to stop first; then it returns 0 at once.
    let handler = handler_fn(|job: Echo, ctx: JobContext| async move {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(job.n.into())) => Ok::<_, JobError>(job.n),
            _ = ctx.cancelled() => Ok(0),
        }
    });
    let unlimited = q.enqueue(Echo { n: 60_000 }).max_attempts(1).await.unwrap();
    let own = q
        .enqueue(Echo { n: 600 })
        .timeout(Duration::from_secs(30))
        .max_attempts(1)
        .await
        .unwrap();
    let w = spawn(
        Worker::builder(q.clone())
            .concurrency(2)
            .timeout(Duration::from_millis(200))
            .cancel_grace(Duration::from_secs(60))
            .build(handler),
    );
    let st = q.wait(&unlimited.id, WAIT).await.unwrap();
    assert_eq!(st.state, JobState::Dead);
    assert_eq!(st.last_error().unwrap().kind, "timeout");
    assert_eq!(q.wait_result::<u32>(&own.id, WAIT).await.unwrap(), 600);
    stop(w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_that_does_not_decode_is_dead_lettered_without_retries() {
    let p = Prefix::new();
    let raw = p.queue::<serde_json::Value>("decode").await;
    let job = raw
        .enqueue(serde_json::json!({"not": "an echo"}))
        .max_attempts(5)
        .await
        .unwrap();
    let q = p.queue::<Echo>("decode").await;
    let w = spawn(Worker::builder(q.clone()).build(echo()));
    let st = q.wait(&job.id, WAIT).await.unwrap();
    assert_eq!(st.state, JobState::Dead);
    assert_eq!(st.attempts, 1);
    assert_eq!(st.last_error().unwrap().kind, "decode");
    assert!(st.reason.unwrap().contains("missing field"));
    stop(w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_errors_retry_with_the_policy_and_permanent_ones_do_not() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("retry").await;
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let handler = handler_fn(move |job: Echo, ctx: JobContext| {
        let c = c.clone();
        async move {
            c.fetch_add(1, Ordering::SeqCst);
            match job.n {
                0 if ctx.attempt() < 3 => {
                    Err(JobError::transient(format!("flaky {}", ctx.attempt())))
                }
                1 => Err(JobError::permanent("bad input")),
                n => Ok(n),
            }
        }
    });
    let flaky = q.enqueue(Echo { n: 0 }).await.unwrap();
    let broken = q.enqueue(Echo { n: 1 }).await.unwrap();
    let policy = RetryPolicy::fixed(Duration::from_millis(20)).max_attempts(4);
    let w = spawn(Worker::builder(q.clone()).retry(policy).build(handler));
    assert_eq!(q.wait_result::<u32>(&flaky.id, WAIT).await.unwrap(), 0);
    let st = q.status(&flaky.id).await.unwrap();
    assert_eq!(st.attempts, 3);
    assert_eq!(st.max_attempts, Some(4));
    let kinds: Vec<_> = st
        .errors
        .iter()
        .map(|e| (e.attempt, e.message.as_str()))
        .collect();
    assert_eq!(kinds, vec![(1, "flaky 1"), (2, "flaky 2")]);
    let st = q.wait(&broken.id, WAIT).await.unwrap();
    assert_eq!((st.state, st.attempts), (JobState::Dead, 1));
    assert_eq!(st.reason.as_deref(), Some("bad input"));
    stop(w).await;
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_an_active_job_fires_its_token_and_ends_cancelled() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("cancel-active").await;
    let handler = handler_fn(|_job: Echo, ctx: JobContext| async move {
        ctx.cancelled().await;
        Err::<u32, _>(JobError::Cancelled)
    });
    let job = q.enqueue(Echo { n: 1 }).await.unwrap();
    let w = spawn(
        Worker::builder(q.clone())
            .heartbeat(Duration::from_millis(50))
            .build(handler),
    );
    eventually(WAIT, "active", || async {
        (q.status(&job.id).await.unwrap().state == JobState::Active).then_some(())
    })
    .await;
    assert_eq!(
        q.cancel(&job.id).await.unwrap(),
        voxqueue::CancelOutcome::Requested
    );
    let st = q.wait(&job.id, WAIT).await.unwrap();
    assert_eq!(st.state, JobState::Cancelled);
    stop(w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_is_recovered_by_another_worker_and_the_stale_ack_is_refused() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("lease").await;
    // Worker A never renews (its heartbeat runs once an hour) and blocks until told.
    let release_a = Arc::new(Notify::new());
    let r = release_a.clone();
    let a = handler_fn(move |_job: Echo, _ctx: JobContext| {
        let r = r.clone();
        async move {
            r.notified().await;
            Ok::<_, JobError>(1u32)
        }
    });
    let job = q.enqueue(Echo { n: 1 }).await.unwrap();
    let wa = spawn(
        Worker::builder(q.clone())
            .id("worker-a")
            .lease(Duration::from_millis(300))
            .heartbeat(Duration::from_secs(3600))
            .build(a),
    );
    eventually(WAIT, "A holds the job", || async {
        let st = q.status(&job.id).await.unwrap();
        (st.state == JobState::Active && st.worker.as_deref() == Some("worker-a")).then_some(())
    })
    .await;
    // Worker B recovers it once the lease has run out, and completes it.
    let b = handler_fn(|_job: Echo, _ctx: JobContext| async move { Ok::<_, JobError>(2u32) });
    let wb = spawn(Worker::builder(q.clone()).id("worker-b").build(b));
    assert_eq!(q.wait_result::<u32>(&job.id, WAIT).await.unwrap(), 2);
    let st = q.status(&job.id).await.unwrap();
    assert_eq!(st.worker.as_deref(), Some("worker-b"));
    assert_eq!(st.attempts, 2);
    assert_eq!(st.errors[0].kind, "stalled");
    // A finishes late: its report is refused and changes nothing.
    release_a.notify_one();
    stop(wa).await;
    assert_eq!(q.result::<u32>(&job.id).await.unwrap(), Some(2));
    assert_eq!(q.status(&job.id).await.unwrap().state, JobState::Completed);
    stop(wb).await;
}

/// What a stale worker tries once another claim has taken its job over.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Stale {
    Complete,
    Transient,
    Permanent,
    Progress,
    Release,
}

/// The job's second claim, by a worker with the SAME id as the first (so a check on
/// the worker id alone cannot pass): it reports progress 10, then holds the job until
/// `finish` is notified and returns 2.
fn second_claim(
    started: Arc<AtomicUsize>,
    finish: Arc<Notify>,
) -> impl Handler<Echo, Output = u32> {
    handler_fn(move |_job: Echo, ctx: JobContext| {
        let (started, finish) = (started.clone(), finish.clone());
        async move {
            assert!(ctx.progress(10.0).await.unwrap());
            started.fetch_add(1, Ordering::SeqCst);
            finish.notified().await;
            Ok::<_, JobError>(2u32)
        }
    })
}

/// Worker `first` claims `job`; once its lease has lapsed a second worker with the same
/// id takes the job over (see `second_claim`). Returns both workers and the notifier
/// that lets the second claim finish.
async fn take_over<H: Handler<Echo>>(
    q: &Queue<Echo>,
    job: &voxqueue::JobId,
    first: Worker<Echo, H>,
) -> (Running, Running, Arc<Notify>) {
    let wa = spawn(first);
    eventually(WAIT, "the first claim holds the job", || async {
        let st = q.status(job).await.unwrap();
        (st.state == JobState::Active && st.attempts == 1).then_some(())
    })
    .await;
    let started = Arc::new(AtomicUsize::new(0));
    let finish = Arc::new(Notify::new());
    let wb = spawn(
        Worker::builder(q.clone())
            .id("fencer")
            .build(second_claim(started.clone(), finish.clone())),
    );
    eventually(WAIT, "the second claim took over", || async {
        (started.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    (wa, wb, finish)
}

/// Every key as `before` had it, and no new one.
fn assert_unchanged(
    before: &std::collections::BTreeMap<String, String>,
    after: &std::collections::BTreeMap<String, String>,
    what: &str,
) {
    for (key, value) in before {
        assert_eq!(after.get(key), Some(value), "{what} changed {key}");
    }
    assert_eq!(after.len(), before.len(), "{what} added keys");
}

/// Runs one stale transition and checks that Redis refused it: every key of the
/// queue is as the second claim left it, and the second claim still completes.
async fn a_stale_worker_changes_nothing(action: Stale) {
    let p = Prefix::new();
    let q = p.queue::<Echo>("fence").await;
    let job = q.enqueue(Echo { n: 1 }).max_attempts(5).await.unwrap();
    // The first claim never renews its lease (hourly heartbeat) and acts when told.
    let go = Arc::new(Notify::new());
    let acted = Arc::new(Mutex::new(None::<Result<bool, String>>));
    let (g, a) = (go.clone(), acted.clone());
    let first = handler_fn(move |_job: Echo, ctx: JobContext| {
        let (g, a) = (g.clone(), a.clone());
        async move {
            if action == Stale::Release {
                // Never ends: the shutdown hands it back with the stale token.
                *a.lock().unwrap() = Some(Ok(true));
                std::future::pending::<()>().await;
            }
            g.notified().await;
            let result = match action {
                Stale::Complete => Ok(100u32),
                Stale::Transient => Err(JobError::transient("stale transient")),
                Stale::Permanent => Err(JobError::permanent("stale permanent")),
                Stale::Progress => match ctx.progress(77.0).await {
                    Ok(owned) => {
                        *a.lock().unwrap() = Some(Ok(owned));
                        return Ok(100u32);
                    }
                    Err(e) => Err(JobError::permanent(e.to_string())),
                },
                Stale::Release => unreachable!(),
            };
            *a.lock().unwrap() = Some(Ok(true));
            result
        }
    });
    let first = Worker::builder(q.clone())
        .id("fencer")
        .lease(Duration::from_millis(300))
        .heartbeat(Duration::from_secs(3600))
        .shutdown_grace(Duration::from_millis(100))
        .build(first);
    let (wa, wb, finish) = take_over(&q, &job.id, first).await;
    let before = p.snapshot().await;
    let st = q.status(&job.id).await.unwrap();
    assert_eq!(
        (st.state, st.attempts, st.progress),
        (JobState::Active, 2, Some(10.0))
    );
    assert_eq!(st.errors.len(), 1);
    assert_eq!(st.errors[0].kind, "stalled");

    go.notify_one();
    let _ = eventually(WAIT, "the stale worker acted", || async {
        acted.lock().unwrap().clone()
    })
    .await;
    // Stopping waits for its report (or, for Release, its hand-back) to be answered.
    stop(wa).await;
    if action == Stale::Progress {
        assert_eq!(
            acted.lock().unwrap().clone(),
            Some(Ok(false)),
            "stale progress accepted"
        );
    }
    assert_unchanged(&before, &p.snapshot().await, &format!("{action:?}"));

    finish.notify_one();
    assert_eq!(q.wait_result::<u32>(&job.id, WAIT).await.unwrap(), 2);
    let st = q.status(&job.id).await.unwrap();
    assert_eq!(
        (st.state, st.attempts, st.progress),
        (JobState::Completed, 2, Some(100.0))
    );
    assert_eq!(st.errors.len(), 1);
    stop(wb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_complete_is_refused_and_changes_nothing() {
    a_stale_worker_changes_nothing(Stale::Complete).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_transient_failure_is_refused_and_changes_nothing() {
    a_stale_worker_changes_nothing(Stale::Transient).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_permanent_failure_is_refused_and_changes_nothing() {
    a_stale_worker_changes_nothing(Stale::Permanent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_progress_report_is_refused_and_changes_nothing() {
    a_stale_worker_changes_nothing(Stale::Progress).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_release_is_refused_and_changes_nothing() {
    a_stale_worker_changes_nothing(Stale::Release).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_heartbeat_is_refused_and_fires_the_stale_handlers_token() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("fence-beat").await;
    let job = q.enqueue(Echo { n: 1 }).max_attempts(5).await.unwrap();
    // The first claim's lease (300 ms) lapses between its heartbeats (every second):
    // the next beat after the takeover must be refused and fire its token.
    let fired = Arc::new(AtomicUsize::new(0));
    let f = fired.clone();
    let first = handler_fn(move |_job: Echo, ctx: JobContext| {
        let f = f.clone();
        async move {
            ctx.cancelled().await;
            f.fetch_add(1, Ordering::SeqCst);
            Err::<u32, _>(JobError::Cancelled)
        }
    });
    let first = Worker::builder(q.clone())
        .id("fencer")
        .lease(Duration::from_millis(300))
        .heartbeat(Duration::from_secs(1))
        .cancel_grace(Duration::from_secs(60))
        .build(first);
    let (wa, wb, finish) = take_over(&q, &job.id, first).await;
    let before = p.snapshot().await;
    eventually(WAIT, "the stale handler's token fired", || async {
        (fired.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    stop(wa).await;
    assert_unchanged(&before, &p.snapshot().await, "the stale heartbeat");
    let st = q.status(&job.id).await.unwrap();
    assert_eq!(
        (st.state, st.attempts, st.progress),
        (JobState::Active, 2, Some(10.0))
    );
    finish.notify_one();
    assert_eq!(q.wait_result::<u32>(&job.id, WAIT).await.unwrap(), 2);
    stop(wb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_lets_short_jobs_finish_and_hands_long_ones_back() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("shutdown").await;
    let handler = handler_fn(|job: Echo, _ctx: JobContext| async move {
        // n = 0 finishes inside the grace period, n = 1 never does.
        let d = if job.n == 0 {
            Duration::from_millis(100)
        } else {
            Duration::from_secs(3600)
        };
        tokio::time::sleep(d).await;
        Ok::<_, JobError>(job.n)
    });
    let short = q.enqueue(Echo { n: 0 }).await.unwrap();
    let long = q.enqueue(Echo { n: 1 }).await.unwrap();
    let w = spawn(
        Worker::builder(q.clone())
            .concurrency(2)
            .shutdown_grace(Duration::from_millis(500))
            .build(handler),
    );
    eventually(WAIT, "both active", || async {
        (q.stats().await.unwrap().active == 2).then_some(())
    })
    .await;
    let t0 = Instant::now();
    stop(w).await;
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(
        q.status(&short.id).await.unwrap().state,
        JobState::Completed
    );
    // Handed back at once, not after a lease timeout, with the attempt not counted.
    let st = q.status(&long.id).await.unwrap();
    assert_eq!((st.state, st.attempts), (JobState::Queued, 0));
    assert_eq!(q.stats().await.unwrap().workers, 0);
    // Another worker picks it up.
    let w = spawn(Worker::builder(q.clone()).build(echo()));
    assert_eq!(q.wait_result::<u32>(&long.id, WAIT).await.unwrap(), 1);
    stop(w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_jobs_do_not_run() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("ttl").await;
    let job = q
        .enqueue(Echo { n: 1 })
        .ttl(Duration::from_millis(50))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(120)).await; // let the TTL pass before any worker exists
    let w = spawn(Worker::builder(q.clone()).build(echo()));
    let st = q.wait(&job.id, WAIT).await.unwrap();
    assert_eq!((st.state, st.attempts), (JobState::Expired, 0));
    stop(w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_order_drains_the_first_queue_first() {
    let p = Prefix::new();
    let urgent = p.queue::<Echo>("urgent").await;
    let bulk = p.queue::<Echo>("bulk").await;
    bulk.enqueue_bulk((100..103).map(|n| Echo { n }))
        .await
        .unwrap();
    urgent
        .enqueue_bulk((0..3).map(|n| Echo { n }))
        .await
        .unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let w = spawn(
        Worker::builder(urgent.clone())
            .queue(bulk.clone())
            .order(QueueOrder::Strict)
            .build(recorder(log.clone())),
    );
    eventually(WAIT, "all ran", || async {
        (log.lock().unwrap().len() == 6).then_some(())
    })
    .await;
    stop(w).await;
    assert_eq!(*log.lock().unwrap(), vec![0, 1, 2, 100, 101, 102]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_order_serves_every_queue() {
    let p = Prefix::new();
    let a = p.queue::<Echo>("wa").await;
    let b = p.queue::<Echo>("wb").await;
    a.enqueue_bulk((0..6).map(|n| Echo { n })).await.unwrap();
    b.enqueue_bulk((100..106).map(|n| Echo { n }))
        .await
        .unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let w = spawn(
        Worker::builder(a.clone())
            .queue(b.clone())
            .order(QueueOrder::Weighted(vec![2, 1]))
            .build(recorder(log.clone())),
    );
    eventually(WAIT, "all ran", || async {
        (log.lock().unwrap().len() == 12).then_some(())
    })
    .await;
    stop(w).await;
    let log = log.lock().unwrap().clone();
    // The lighter queue is not starved while the heavier one has work.
    let first_b = log.iter().position(|&n| n >= 100).unwrap();
    assert!(first_b < 4, "{log:?}");
    let bad = Worker::builder(a.clone())
        .order(QueueOrder::Weighted(vec![1, 2]))
        .build(echo());
    assert!(matches!(
        bad.run_until(async {}).await,
        Err(Error::InvalidConfig(_))
    ));
    // A weight for each queue, but none to share: nothing would ever be claimed.
    let idle = Worker::builder(a.clone())
        .queue(b.clone())
        .order(QueueOrder::Weighted(vec![0, 0]))
        .build(echo());
    assert!(matches!(
        idle.run_until(async {}).await,
        Err(Error::InvalidConfig(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_waiters_share_one_event_reader() {
    let p = Prefix::new();
    let q: Queue<Echo> = p.queue("waiters").await;
    let jobs = q.enqueue_bulk((0..50).map(|n| Echo { n })).await.unwrap();
    let waiters: Vec<_> = jobs
        .iter()
        .map(|j| {
            let (q, id) = (q.clone(), j.id.clone());
            tokio::spawn(async move { q.wait_result::<u32>(&id, WAIT).await })
        })
        .collect();
    let w = spawn(Worker::builder(q.clone()).concurrency(4).build(echo()));
    for (n, waiter) in waiters.into_iter().enumerate() {
        assert_eq!(waiter.await.unwrap().unwrap(), n as u32);
    }
    stop(w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_circuit_breaker_opens_holds_jobs_untouched_and_closes() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("breaker").await;
    let mut events = q.events().await.unwrap();
    let broken = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let calls = Arc::new(AtomicUsize::new(0));
    let (b, c) = (broken.clone(), calls.clone());
    let handler = handler_fn(move |job: Echo, _ctx: JobContext| {
        let (b, c) = (b.clone(), c.clone());
        async move {
            c.fetch_add(1, Ordering::SeqCst);
            if b.load(Ordering::SeqCst) {
                return Err(JobError::transient("GPU fell off the bus"));
            }
            Ok(job.n)
        }
    });
    let jobs = q.enqueue_bulk((0..8).map(|n| Echo { n })).await.unwrap();
    let w = spawn(
        Worker::builder(q.clone())
            .id("flaky-gpu")
            .retry(RetryPolicy::fixed(Duration::from_millis(10)).max_attempts(20))
            // A cool-down long enough that no probe runs before the test mends the
            // GPU, even on a loaded machine (500 ms once let a failing probe in).
            .circuit_breaker(voxqueue::CircuitBreaker::new(3, Duration::from_secs(2)))
            .build(handler),
    );
    // The breaker's state reaches Redis on its own task, so the jobs the slot held
    // (a one-slot worker keeps some in hand) may still be on their way back.
    let stats = eventually(WAIT, "breaker open, jobs handed back", || async {
        let stats = q.stats().await.unwrap();
        (stats.open_breakers == 1 && stats.active == 0).then_some(stats)
    })
    .await;
    // Open: three attempts burned, every other job waits untouched.
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(stats.queued + stats.scheduled, 8);
    broken.store(false, Ordering::SeqCst);
    for job in &jobs {
        q.wait_result::<u32>(&job.id, WAIT).await.unwrap();
    }
    assert_eq!(q.stats().await.unwrap().open_breakers, 0);
    // The probe after the cool-down succeeded, so nothing else failed.
    assert_eq!(calls.load(Ordering::SeqCst), 3 + 8);
    let mut states = Vec::new();
    while states.len() < 3 {
        let e = crate::common::within("an event", events.recv())
            .await
            .unwrap();
        if e.kind == voxqueue::EventKind::Breaker {
            assert_eq!(e.job_id.as_str(), "flaky-gpu");
            states.push(e.data.unwrap());
        }
    }
    assert_eq!(states, vec!["open", "half_open", "closed"]);
    stop(w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_follow_the_seeded_schedule_exactly_and_a_job_may_bring_its_own_policy() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("schedule").await;
    let always_failing = handler_fn(|_job: Echo, ctx: JobContext| async move {
        Err::<u32, _>(JobError::transient(format!("attempt {}", ctx.attempt())))
    });
    // The worker's policy would wait an hour; this job brings its own.
    let own = RetryPolicy::exponential(Duration::from_millis(200))
        .max_attempts(3)
        .jitter(0.5)
        .seed(99);
    let job = q.enqueue(Echo { n: 1 }).retry(own).await.unwrap();
    let w = spawn(
        Worker::builder(q.clone())
            .retry(RetryPolicy::fixed(Duration::from_secs(3600)).max_attempts(10))
            .build(always_failing),
    );
    // After each failure the job waits in `scheduled` exactly the policy's delay.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let st = eventually(WAIT, "dead after three attempts", || {
        let (q, id, seen) = (q.clone(), job.id.clone(), seen.clone());
        async move {
            let st = q.status(&id).await.unwrap();
            let mut seen = seen.lock().unwrap();
            if st.state == JobState::Scheduled && !seen.iter().any(|(a, _)| *a == st.attempts) {
                let failed_at = st.last_error().unwrap().at;
                let run_at = st
                    .run_at
                    .unwrap()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_millis() as u64;
                seen.push((st.attempts, run_at - failed_at));
            }
            (st.state == JobState::Dead).then_some(st)
        }
    })
    .await;
    assert_eq!(st.attempts, 3);
    assert_eq!(st.errors.len(), 3);
    // 200 ms doubling, ±50 % jitter from seed 99: 200 * 0.810 and 400 * 1.238, worked
    // out by hand from the documented formula (see src/retry.rs's tests).
    assert_eq!(*seen.lock().unwrap(), vec![(1, 162), (2, 495)]);
    stop(w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_record_is_dead_lettered_with_the_reason_and_the_queue_goes_on() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("corrupt").await;
    let broken = q.enqueue(Echo { n: 1 }).await.unwrap();
    let fine = q.enqueue(Echo { n: 2 }).await.unwrap();
    // Something outside voxqueue scribbled over the record.
    let mut conn = crate::common::connection().await;
    let key = format!("{}:{{corrupt}}:jobs", p.name);
    let _: () = redis::cmd("HSET")
        .arg(&key)
        .arg(broken.id.as_str())
        .arg("{not json")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(matches!(
        q.status(&broken.id).await,
        Err(Error::Corrupt { .. })
    ));
    let w = spawn(Worker::builder(q.clone()).build(echo()));
    assert_eq!(q.wait_result::<u32>(&fine.id, WAIT).await.unwrap(), 2);
    let st = eventually(WAIT, "buried", || async {
        let st = q.status(&broken.id).await.ok()?;
        (st.state == JobState::Dead).then_some(st)
    })
    .await;
    assert!(st.reason.unwrap().contains("corrupt job record"));
    assert_eq!(q.dead_letter().count().await.unwrap(), 1);
    stop(w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_retry_survives_a_restart_of_every_worker() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("retry-restart").await;
    let fail_once = handler_fn(|job: Echo, ctx: JobContext| async move {
        if ctx.attempt() == 1 {
            return Err(JobError::retry_after("busy", Duration::from_millis(300)));
        }
        Ok::<_, JobError>(job.n)
    });
    let job = q.enqueue(Echo { n: 5 }).await.unwrap();
    let w = spawn(Worker::builder(q.clone()).build(fail_once));
    eventually(WAIT, "retry scheduled", || async {
        let st = q.status(&job.id).await.unwrap();
        (st.state == JobState::Scheduled && st.attempts == 1).then_some(())
    })
    .await;
    stop(w).await; // no worker left: the retry lives in Redis only
    let w = spawn(Worker::builder(q.clone()).build(echo()));
    assert_eq!(q.wait_result::<u32>(&job.id, WAIT).await.unwrap(), 5);
    assert_eq!(q.status(&job.id).await.unwrap().attempts, 2);
    stop(w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_are_swept_after_their_result_ttl() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("sweep").await;
    let w = spawn(Worker::builder(q.clone()).build(echo()));
    let job = q
        .enqueue(Echo { n: 1 })
        .result_ttl(Duration::from_millis(100))
        .await
        .unwrap();
    q.wait_result::<u32>(&job.id, WAIT).await.unwrap();
    // Sweeps ride on other transitions: keep the queue busy until the record is gone.
    eventually(WAIT, "record swept", || async {
        q.enqueue(Echo { n: 2 }).await.unwrap();
        matches!(q.status(&job.id).await, Err(Error::NotFound(_))).then_some(())
    })
    .await;
    assert_eq!(q.result_bytes(&job.id).await.unwrap(), None);
    stop(w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_that_finds_no_job_or_fails_permanently_does_not_wedge_the_breaker() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("breaker-probe").await;
    let mut events = q.events().await.unwrap();
    // 0: the transient failure that opens the breaker; 1: a permanent failure (neither
    // success nor transient); anything else succeeds.
    let handler = handler_fn(|job: Echo, _ctx: JobContext| async move {
        match job.n {
            0 => Err(JobError::transient("GPU fell off the bus")),
            1 => Err(JobError::permanent("bad input")),
            n => Ok(n),
        }
    });
    let w = spawn(
        Worker::builder(q.clone())
            .id("prober")
            .retry(RetryPolicy::none())
            .circuit_breaker(voxqueue::CircuitBreaker::new(1, Duration::from_millis(200)))
            .build(handler),
    );
    let opener = q.enqueue(Echo { n: 0 }).await.unwrap();
    assert_eq!(
        q.wait(&opener.id, WAIT).await.unwrap().state,
        JobState::Dead
    );
    // The cool-down ends with nothing queued: the probe claims nothing.
    loop {
        let e = crate::common::within("half-open", events.recv())
            .await
            .unwrap();
        if e.kind == voxqueue::EventKind::Breaker && e.data.as_deref() == Some("half_open") {
            break;
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await; // let the empty probe return
    // The next job is the probe; it fails permanently, which proves nothing either way.
    let neutral = q.enqueue(Echo { n: 1 }).await.unwrap();
    assert_eq!(
        q.wait(&neutral.id, WAIT).await.unwrap().state,
        JobState::Dead
    );
    // So the one after is probed too, and closes the breaker.
    let good = q.enqueue(Echo { n: 2 }).await.unwrap();
    assert_eq!(q.wait_result::<u32>(&good.id, WAIT).await.unwrap(), 2);
    assert_eq!(q.stats().await.unwrap().open_breakers, 0);
    stop(w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_jobs_name_what_each_worker_runs_now() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("active-list").await;
    let go = Arc::new(Notify::new());
    let g = go.clone();
    let handler = handler_fn(move |job: Echo, _ctx: JobContext| {
        let g = g.clone();
        async move {
            g.notified().await;
            Ok::<_, JobError>(job.n)
        }
    });
    let a = q.enqueue(Echo { n: 1 }).await.unwrap();
    let b = q.enqueue(Echo { n: 2 }).await.unwrap();
    let queued = q.enqueue(Echo { n: 3 }).await.unwrap();
    assert!(q.active_jobs(10).await.unwrap().is_empty());
    let w = spawn(
        Worker::builder(q.clone())
            .id("lister")
            .concurrency(2)
            .build(handler),
    );
    let running = eventually(WAIT, "two jobs running", || async {
        let jobs = q.active_jobs(10).await.unwrap();
        (jobs.len() == 2).then_some(jobs)
    })
    .await;
    let mut ids: Vec<_> = running.iter().map(|s| s.id.clone()).collect();
    ids.sort();
    let mut want = vec![a.id.clone(), b.id.clone()];
    want.sort();
    assert_eq!(ids, want);
    assert!(
        running
            .iter()
            .all(|s| s.worker.as_deref() == Some("lister"))
    );
    assert!(!ids.contains(&queued.id));
    assert_eq!(q.active_jobs(1).await.unwrap().len(), 1);
    assert!(q.active_jobs(0).await.unwrap().is_empty());
    // Release the handlers (each poll wakes whoever waits by then) until all three ran.
    eventually(WAIT, "all done", || async {
        go.notify_waiters();
        let mut done = true;
        for job in [&a, &b, &queued] {
            done &= q.status(&job.id).await.unwrap().state == JobState::Completed;
        }
        done.then_some(())
    })
    .await;
    assert!(q.active_jobs(10).await.unwrap().is_empty());
    stop(w).await;
}

/// A one-slot worker with several jobs in hand and several reports on their way still
/// runs a priority level in the order it was enqueued: each report takes its place in
/// line when the attempt ends, so the jobs it claims come back in that order too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_slot_worker_keeps_fifo_order_with_jobs_in_hand() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("fifo-ahead").await;
    let jobs: Vec<Echo> = (0..1000).map(|n| Echo { n }).collect();
    q.enqueue_bulk(jobs).await.unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let w = spawn(
        Worker::builder(q.clone())
            .concurrency(1)
            .build(recorder(log.clone())),
    );
    eventually(WAIT, "all ran", || async {
        (log.lock().unwrap().len() == 1000).then_some(())
    })
    .await;
    stop(w).await;
    assert_eq!(*log.lock().unwrap(), (0..1000).collect::<Vec<u32>>());
}

/// How many jobs a worker of `slots` slots holds (running and in hand), sampled until
/// `n` jobs ran, with each job taking `each`; job `gate_at` (if any) waits for `gate`.
async fn most_held(
    q: &Queue<Echo>,
    slots: usize,
    n: u32,
    each: Duration,
    gate_at: Option<(u32, Arc<Notify>)>,
) -> u64 {
    for i in 0..n {
        q.enqueue(Echo { n: i }).await.unwrap();
    }
    let ran = Arc::new(AtomicUsize::new(0));
    let r = ran.clone();
    let handler = handler_fn(move |job: Echo, _ctx: JobContext| {
        let (r, gate) = (r.clone(), gate_at.clone());
        async move {
            if let Some((at, gate)) = gate
                && job.n == at
            {
                gate.notified().await;
            }
            tokio::time::sleep(each).await;
            r.fetch_add(1, Ordering::SeqCst);
            Ok::<_, JobError>(job.n)
        }
    });
    let w = spawn(Worker::builder(q.clone()).concurrency(slots).build(handler));
    let mut most = 0;
    let started = Instant::now();
    while ran.load(Ordering::SeqCst) < n as usize && started.elapsed() < WAIT {
        most = most.max(q.stats().await.unwrap().active);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    stop(w).await;
    most
}

/// [`most_held`] with quick attempts, where job 5 waits until the worker holds three
/// jobs (one or two slots hold that many only with jobs in hand ahead of them).
async fn most_held_past_a_waiting_job(q: &Queue<Echo>, slots: usize, n: u32) -> u64 {
    let gate = Arc::new(Notify::new());
    let (watched, g) = (q.clone(), gate.clone());
    let opener = tokio::spawn(async move {
        eventually(WAIT, "three jobs held", || async {
            (watched.stats().await.unwrap().active >= 3).then_some(())
        })
        .await;
        g.notify_one();
    });
    let most = most_held(q, slots, n, Duration::ZERO, Some((5, gate))).await;
    opener.await.unwrap();
    most
}

/// Quick attempts: a one-slot worker keeps up to sixteen jobs in hand, so round trips,
/// not Redis, stop setting its pace; slow attempts (speech): one, so the jobs it does
/// not run yet stay free for other workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_slot_worker_holds_more_jobs_only_while_attempts_are_quick() {
    let p = Prefix::new();
    let quick = p.queue::<Echo>("quick-ahead").await;
    // Job 5 waits, after five quick ones: jobs behind it are in hand by then (sixteen,
    // or fewer where a busy machine made the last attempts before it slow).
    let most = most_held_past_a_waiting_job(&quick, 1, 30).await;
    assert!((3..=17).contains(&most), "held {most}");

    let slow = p.queue::<Echo>("slow-ahead").await;
    let most = most_held(&slow, 1, 6, Duration::from_millis(30), None).await;
    assert_eq!(most, 2, "a slow worker holds the running job and one more");
}

/// Quick attempts: every slot of a worker on one queue keeps jobs in hand (up to
/// sixteen each), so round trips stop setting its pace; slow ones: a worker of several
/// slots holds only the jobs it runs, leaving the rest to idle slots and workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_of_several_slots_holds_jobs_ahead_only_while_attempts_are_quick() {
    let p = Prefix::new();
    let quick = p.queue::<Echo>("quick-ahead-2").await;
    // Job 5 waits while the slots go on: without jobs ahead two slots hold two jobs.
    let most = most_held_past_a_waiting_job(&quick, 2, 60).await;
    assert!((3..=34).contains(&most), "held {most}");

    let slow = p.queue::<Echo>("slow-ahead-2").await;
    let most = most_held(&slow, 2, 8, Duration::from_millis(40), None).await;
    assert_eq!(
        most, 2,
        "slow workers of two slots hold the two jobs they run"
    );
}

/// A slow attempt after quick ones: the slot keeps the jobs it would claim now (its
/// next one, and one ahead for a one-slot worker) and hands back the rest, which it
/// would not start soon, in order, to the head of the lane: their attempts
/// uncounted, no job running out of turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_slow_attempt_a_slot_hands_back_in_order_what_it_holds_beyond_its_next_jobs() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("hand-back-slow").await;
    let jobs = q.enqueue_bulk((0..30).map(|n| Echo { n })).await.unwrap();
    let mut events = q.events().await.unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let (open, go) = tokio::sync::watch::channel(false);
    let w = spawn(
        Worker::builder(q.clone())
            .concurrency(1)
            .build(gated(log.clone(), &[5], go)),
    );
    // Job 5 runs with more than its two in hand, and takes long enough (beyond
    // HAND_BACK_WAIT) that the slot would not start the jobs after those soon.
    eventually(WAIT, "job 5 running, three or more held ahead", || async {
        (log.lock().unwrap().contains(&5) && q.stats().await.unwrap().active >= 4).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    open.send_replace(true);
    for job in &jobs {
        q.wait_result::<u32>(&job.id, WAIT).await.unwrap();
    }
    stop(w).await;
    assert_eq!(*log.lock().unwrap(), (0..30).collect::<Vec<_>>());
    for job in &jobs {
        assert_eq!(q.status(&job.id).await.unwrap().attempts, 1, "{:?}", job.id);
    }
    let mut released = 0;
    while let Ok(Some(event)) =
        tokio::time::timeout(Duration::from_millis(200), events.recv()).await
    {
        released += usize::from(event.kind == voxqueue::EventKind::Released);
    }
    assert!(released >= 1, "nothing was handed back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_slot_worker_holds_its_next_job_renewed_and_hands_it_back_unrun_on_shutdown() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("prefetch").await;
    let ran = Arc::new(Mutex::new(Vec::new()));
    let r = ran.clone();
    let handler = handler_fn(move |job: Echo, _ctx: JobContext| {
        let r = r.clone();
        async move {
            r.lock().unwrap().push(job.n);
            if job.n > 0 {
                std::future::pending::<()>().await;
            }
            Ok::<_, JobError>(job.n)
        }
    });
    // The first job's report claims the second and one more to hold ahead.
    let done = q.enqueue(Echo { n: 0 }).await.unwrap();
    let first = q.enqueue(Echo { n: 1 }).await.unwrap();
    let next = q.enqueue(Echo { n: 2 }).await.unwrap();
    let w = spawn(
        Worker::builder(q.clone())
            .id("one-slot")
            .concurrency(1)
            .lease(Duration::from_millis(300))
            .heartbeat(Duration::from_millis(100))
            .shutdown_grace(Duration::from_millis(100))
            .build(handler),
    );
    // The job ahead is claimed while the second one runs: held by this worker.
    eventually(WAIT, "the next job held ahead", || async {
        let st = q.status(&next.id).await.unwrap();
        (st.state == JobState::Active && st.worker.as_deref() == Some("one-slot")).then_some(())
    })
    .await;
    // Five leases later it is still held, renewed: never recovered as stalled.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let st = q.status(&next.id).await.unwrap();
    assert_eq!(
        (st.state, st.worker.as_deref()),
        (JobState::Active, Some("one-slot"))
    );
    assert!(st.errors.is_empty(), "{:?}", st.errors);
    assert_eq!(*ran.lock().unwrap(), vec![0, 1]);
    assert_eq!(q.status(&done.id).await.unwrap().state, JobState::Completed);
    // On shutdown both go back at once, attempts uncounted; the held one never ran.
    stop(w).await;
    for job in [&first, &next] {
        let st = q.status(&job.id).await.unwrap();
        assert_eq!(
            (st.state, st.attempts),
            (JobState::Queued, 0),
            "{:?}",
            job.id
        );
    }
    assert_eq!(*ran.lock().unwrap(), vec![0, 1]);
}

/// A handler that logs each job as it starts and holds the jobs in `held` until `go`
/// turns true; the others return at once.
fn gated(
    log: Arc<Mutex<Vec<u32>>>,
    held: &'static [u32],
    go: tokio::sync::watch::Receiver<bool>,
) -> impl Handler<Echo, Output = u32> {
    slow_gated(log, held, go, Duration::ZERO)
}

/// [`gated`], with every attempt taking at least `each` (attempts of more than 32 ms
/// keep a one-slot worker at one job ahead, a worker of several slots at none).
fn slow_gated(
    log: Arc<Mutex<Vec<u32>>>,
    held: &'static [u32],
    go: tokio::sync::watch::Receiver<bool>,
    each: Duration,
) -> impl Handler<Echo, Output = u32> {
    handler_fn(move |job: Echo, _ctx: JobContext| {
        let (log, mut go) = (log.clone(), go.clone());
        async move {
            log.lock().unwrap().push(job.n);
            if held.contains(&job.n) {
                let _ = go.wait_for(|&open| open).await;
            }
            tokio::time::sleep(each).await;
            Ok::<_, JobError>(job.n)
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_of_several_slots_with_slow_attempts_holds_no_job_it_cannot_start() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("no-hoard").await;
    let jobs = q.enqueue_bulk((0..4).map(|n| Echo { n })).await.unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let (open, go) = tokio::sync::watch::channel(false);
    let w = spawn(Worker::builder(q.clone()).concurrency(2).build(slow_gated(
        log.clone(),
        &[1, 2],
        go,
        Duration::from_millis(40),
    )));
    // Job 0's report claims job 2 for its slot, and nothing more: both slots are busy.
    eventually(WAIT, "jobs 1 and 2 running", || async {
        let log = log.lock().unwrap();
        (log.contains(&1) && log.contains(&2)).then_some(())
    })
    .await;
    let st = q.status(&jobs[3].id).await.unwrap();
    assert_eq!((st.state, st.worker), (JobState::Queued, None));
    open.send_replace(true);
    for job in &jobs {
        q.wait_result::<u32>(&job.id, WAIT).await.unwrap();
    }
    stop(w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_failure_does_not_open_the_circuit_breaker() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("breaker-permanent").await;
    let handler = handler_fn(|job: Echo, _ctx: JobContext| async move {
        match job.n {
            0 => Err(JobError::permanent("bad input")),
            n => Ok(n),
        }
    });
    // One transient failure would open it for an hour.
    let w = spawn(
        Worker::builder(q.clone())
            .retry(RetryPolicy::none())
            .circuit_breaker(voxqueue::CircuitBreaker::new(1, Duration::from_secs(3600)))
            .build(handler),
    );
    let bad = q.enqueue(Echo { n: 0 }).await.unwrap();
    assert_eq!(q.wait(&bad.id, WAIT).await.unwrap().state, JobState::Dead);
    let good = q.enqueue(Echo { n: 1 }).await.unwrap();
    assert_eq!(q.wait_result::<u32>(&good.id, WAIT).await.unwrap(), 1);
    assert_eq!(q.stats().await.unwrap().open_breakers, 0);
    stop(w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_order_holds_between_the_jobs_of_one_slot() {
    let p = Prefix::new();
    let urgent = p.queue::<Echo>("urgent-between").await;
    let bulk = p.queue::<Echo>("bulk-between").await;
    bulk.enqueue_bulk((100..103).map(|n| Echo { n }))
        .await
        .unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let (open, go) = tokio::sync::watch::channel(false);
    // Job 100 enqueues an urgent job before it ends; 101 holds the other slot.
    let (l, u) = (log.clone(), urgent.clone());
    let handler = handler_fn(move |job: Echo, _ctx: JobContext| {
        let (l, u, mut go) = (l.clone(), u.clone(), go.clone());
        async move {
            l.lock().unwrap().push(job.n);
            match job.n {
                100 => {
                    u.enqueue(Echo { n: 0 })
                        .await
                        .map_err(JobError::permanent)?;
                }
                101 => {
                    let _ = go.wait_for(|&open| open).await;
                }
                _ => {}
            }
            Ok::<_, JobError>(job.n)
        }
    });
    let w = spawn(
        Worker::builder(urgent.clone())
            .queue(bulk.clone())
            .order(QueueOrder::Strict)
            .concurrency(2)
            .build(handler),
    );
    let log = eventually(WAIT, "all ran", || async {
        let log = log.lock().unwrap();
        (log.len() == 4).then(|| log.clone())
    })
    .await;
    open.send_replace(true);
    stop(w).await;
    // The slot that ran 100 takes the urgent job next, not the next bulk one.
    assert_eq!(log[2..], [0, 102], "{log:?}");
}

// Current-thread runtime: when the shutdown signal resolves, the worker has begun
// stopping before this test's next step runs.
#[tokio::test(flavor = "current_thread")]
async fn a_one_slot_worker_holds_one_job_ahead_and_a_stopping_one_claims_no_more() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("ahead-stop").await;
    let jobs = q.enqueue_bulk((0..5).map(|n| Echo { n })).await.unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let (open, go) = tokio::sync::watch::channel(false);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (seen_tx, seen_rx) = oneshot::channel::<()>();
    // Attempts of 20 ms: one job ahead (a one-slot worker's least), not sixteen.
    let worker = Worker::builder(q.clone()).id("one-ahead").build(slow_gated(
        log.clone(),
        &[2],
        go,
        Duration::from_millis(20),
    ));
    assert_eq!(worker.id(), "one-ahead");
    let w = tokio::spawn(worker.run_until(async move {
        let _ = stop_rx.await;
        let _ = seen_tx.send(());
    }));
    // 0's report claims 1 and 2; 1's claims 3, held ahead while 2 runs; 4 waits.
    eventually(WAIT, "job 2 running, job 3 held", || async {
        let st = q.status(&jobs[3].id).await.unwrap();
        (log.lock().unwrap().contains(&2) && st.state == JobState::Active).then_some(())
    })
    .await;
    let st = q.status(&jobs[4].id).await.unwrap();
    assert_eq!((st.state, st.worker), (JobState::Queued, None));
    // Shutdown, then job 2 ends within the grace: its report claims nothing and the
    // held job goes back unrun.
    stop_tx.send(()).unwrap();
    seen_rx.await.unwrap();
    open.send_replace(true);
    w.await.unwrap().unwrap();
    assert_eq!(*log.lock().unwrap(), vec![0, 1, 2]);
    assert_eq!(
        q.status(&jobs[2].id).await.unwrap().state,
        JobState::Completed
    );
    for job in &jobs[3..] {
        let st = q.status(&job.id).await.unwrap();
        assert_eq!(
            (st.state, st.attempts),
            (JobState::Queued, 0),
            "{:?}",
            job.id
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_breaker_lets_one_job_through_whatever_the_free_slots() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("breaker-probe-one").await;
    let mut events = q.events().await.unwrap();
    let down = handler_fn(|_job: Echo, _ctx: JobContext| async move {
        Err::<u32, _>(JobError::transient("model server down"))
    });
    q.enqueue_bulk((0..8).map(|n| Echo { n })).await.unwrap();
    // Three slots claim three jobs; the first failure opens the breaker. After the
    // cool-down one probe runs, fails and opens it again for another two seconds.
    let w = spawn(
        Worker::builder(q.clone())
            .concurrency(3)
            .retry(RetryPolicy::none())
            .circuit_breaker(voxqueue::CircuitBreaker::new(1, Duration::from_secs(2)))
            .build(down),
    );
    let mut states = Vec::new();
    while states != ["open", "half_open", "open"] {
        let e = crate::common::within("a breaker event", events.recv())
            .await
            .unwrap();
        if e.kind == voxqueue::EventKind::Breaker {
            states.push(e.data.unwrap());
        }
        assert!(states.len() <= 3, "{states:?}");
    }
    let stats = eventually(WAIT, "every report in", || async {
        let stats = q.stats().await.unwrap();
        (stats.active == 0 && stats.dead >= 4).then_some(stats)
    })
    .await;
    assert_eq!((stats.dead, stats.queued), (4, 4));
    stop(w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_redis_refuses_for_good_is_not_retried_and_the_job_runs_again_later() {
    let server = RedisServer::start(&[]);
    let p = Prefix::on(&server.url());
    let q = p.queue::<Echo>("refused").await;
    let log = Arc::new(Mutex::new(Vec::new()));
    let (open, go) = tokio::sync::watch::channel(false);
    let job = q.enqueue(Echo { n: 1 }).await.unwrap();
    let w = spawn(
        Worker::builder(q.clone())
            .lease(Duration::from_secs(1))
            .shutdown_grace(Duration::from_millis(200))
            .build(gated(log.clone(), &[1], go)),
    );
    eventually(WAIT, "the job running", || async {
        log.lock().unwrap().contains(&1).then_some(())
    })
    .await;
    // Out of memory: every script that writes is refused, and that is no passing state.
    let mut conn = server.connection().await;
    let config = |value: &'static str| {
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory")
            .arg(value)
            .clone()
    };
    let _: () = config("1").query_async(&mut conn).await.unwrap();
    open.send_replace(true);
    // The refused report is not retried, so the worker stops within its grace.
    crate::common::within("the worker stops", stop(w)).await;
    let _: () = config("0").query_async(&mut conn).await.unwrap();
    // The job, still active, comes back when its lease runs out and runs again.
    let w = spawn(Worker::builder(q.clone()).build(echo()));
    assert_eq!(q.wait_result::<u32>(&job.id, WAIT).await.unwrap(), 1);
    let st = q.status(&job.id).await.unwrap();
    assert_eq!((st.attempts, st.errors[0].kind.as_str()), (2, "stalled"));
    stop(w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_jobs_leave_out_a_job_that_ended_after_the_index_was_read() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("active-ended").await;
    let job = q.enqueue(Echo { n: 1 }).await.unwrap();
    let w = spawn(Worker::builder(q.clone()).build(echo()));
    assert_eq!(q.wait_result::<u32>(&job.id, WAIT).await.unwrap(), 1);
    stop(w).await;
    // As if the index was read just before the job ended: its id is still there.
    let mut conn = crate::common::connection().await;
    let _: () = redis::cmd("ZADD")
        .arg(format!("{}:{{active-ended}}:active", p.name))
        .arg(1)
        .arg(job.id.as_str())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(q.active_jobs(10).await.unwrap().is_empty());
}

/// How many commands a server refused for memory (`INFO errorstats`).
async fn refused_for_memory(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("errorstats")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("errorstat_OOM:count="))
        .map_or(0, |n| n.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_whose_claim_fails_does_not_wedge_the_breaker() {
    let server = RedisServer::start(&[]);
    let p = Prefix::on(&server.url());
    let q = p.queue::<Echo>("probe-claim-fails").await;
    let mut events = q.events().await.unwrap();
    let handler = handler_fn(|job: Echo, _ctx: JobContext| async move {
        match job.n {
            0 => Err(JobError::transient("GPU fell off the bus")),
            n => Ok(n),
        }
    });
    // An hourly heartbeat: the claims are the only writes once the breaker is open.
    let w = spawn(
        Worker::builder(q.clone())
            .retry(RetryPolicy::none())
            .heartbeat(Duration::from_secs(3600))
            .circuit_breaker(voxqueue::CircuitBreaker::new(1, Duration::from_secs(2)))
            .build(handler),
    );
    let opener = q.enqueue(Echo { n: 0 }).await.unwrap();
    assert_eq!(
        q.wait(&opener.id, WAIT).await.unwrap().state,
        JobState::Dead
    );
    loop {
        let e = crate::common::within("open", events.recv()).await.unwrap();
        if e.kind == voxqueue::EventKind::Breaker && e.data.as_deref() == Some("open") {
            break;
        }
    }
    let good = q.enqueue(Echo { n: 1 }).await.unwrap();
    // Out of memory: after the cool-down, the half-open event and the probe's claim
    // (scripts that write) are refused.
    let mut conn = server.connection().await;
    let maxmemory = |v: &'static str| {
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory")
            .arg(v)
            .clone()
    };
    let _: () = maxmemory("1").query_async(&mut conn).await.unwrap();
    eventually(WAIT, "the probe's claim refused", || {
        let mut conn = conn.clone();
        async move { (refused_for_memory(&mut conn).await >= 2).then_some(()) }
    })
    .await;
    let _: () = maxmemory("0").query_async(&mut conn).await.unwrap();
    // The failed claim did not use up the probe: the next one runs the job.
    assert_eq!(q.wait_result::<u32>(&good.id, WAIT).await.unwrap(), 1);
    stop(w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_run_by_the_same_worker_is_renewed_under_its_new_lease() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("retry-same-worker").await;
    let cancelled = Arc::new(AtomicUsize::new(0));
    let c = cancelled.clone();
    // Attempt 1 fails at once; attempt 2 works for about five leases.
    let handler = handler_fn(move |job: Echo, ctx: JobContext| {
        let c = c.clone();
        async move {
            if ctx.attempt() == 1 {
                return Err(JobError::transient("busy"));
            }
            tokio::select! {
                _ = ctx.cancelled() => {
                    c.fetch_add(1, Ordering::SeqCst);
                    Err(JobError::Cancelled)
                }
                _ = tokio::time::sleep(Duration::from_millis(1500)) => Ok::<_, JobError>(job.n),
            }
        }
    });
    let job = q.enqueue(Echo { n: 7 }).await.unwrap();
    let w = spawn(
        Worker::builder(q.clone())
            .lease(Duration::from_millis(300))
            .heartbeat(Duration::from_millis(50))
            .retry(RetryPolicy::fixed(Duration::from_millis(10)).max_attempts(3))
            .build(handler),
    );
    assert_eq!(q.wait_result::<u32>(&job.id, WAIT).await.unwrap(), 7);
    let st = q.status(&job.id).await.unwrap();
    assert_eq!(st.attempts, 2);
    let kinds: Vec<&str> = st.errors.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["transient"]);
    assert_eq!(cancelled.load(Ordering::SeqCst), 0);
    stop(w).await;
}

/// A handler that counts the jobs started and holds each until `go` turns true.
pub(crate) fn held(
    started: Arc<AtomicUsize>,
    go: tokio::sync::watch::Receiver<bool>,
) -> impl Handler<Echo, Output = u32> {
    handler_fn(move |job: Echo, _ctx: JobContext| {
        let (started, mut go) = (started.clone(), go.clone());
        async move {
            started.fetch_add(1, Ordering::SeqCst);
            let _ = go.wait_for(|&open| open).await;
            Ok::<_, JobError>(job.n)
        }
    })
}

/// Free slots are filled by one claim, not one round trip per slot: eight jobs
/// arrive at an idle worker with eight slots and all start after a single script
/// call besides the enqueue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn free_slots_are_filled_by_one_claim() {
    let server = RedisServer::start(&[]);
    let p = Prefix::on(&server.url());
    let q = p.queue::<Echo>("one-claim").await;
    let mut c = server.connection().await;
    let started = Arc::new(AtomicUsize::new(0));
    let (go, gate) = tokio::sync::watch::channel(false);
    let w = spawn(
        Worker::builder(q.clone())
            .concurrency(8)
            .heartbeat(Duration::from_secs(3600))
            .build(held(started.clone(), gate)),
    );
    eventually(WAIT, "worker registered", || async {
        (q.stats().await.unwrap().workers == 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = script_calls(&mut c).await;
    q.enqueue_bulk((0..8).map(|n| Echo { n })).await.unwrap();
    eventually(WAIT, "all eight started", || async {
        (started.load(Ordering::SeqCst) == 8).then_some(())
    })
    .await;
    let sent = script_calls(&mut c).await - before;
    assert_eq!(sent, 2, "script calls for one bulk enqueue and the claim");
    go.send_replace(true);
    stop(w).await;
}

/// A worker whose claims fail backs off, doubling its pause: an outage is not met
/// with a tight loop of refused calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_claims_back_off() {
    let server = RedisServer::start(&[]);
    let p = Prefix::on(&server.url());
    let q = p.queue::<Echo>("claim-backoff").await;
    let mut c = server.connection().await;
    // An hourly heartbeat: once the worker is idle, claims are its only writes.
    let w = spawn(
        Worker::builder(q.clone())
            .heartbeat(Duration::from_secs(3600))
            .build(echo()),
    );
    eventually(WAIT, "worker registered", || async {
        (q.stats().await.unwrap().workers == 1).then_some(())
    })
    .await;
    let blocked = waiting_in_blpop(&c).await;
    // Out of memory, then the worker's wait is cut short: its claims are refused.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("1")
        .query_async(&mut c)
        .await
        .unwrap();
    let _: i64 = redis::cmd("CLIENT")
        .arg("UNBLOCK")
        .arg(&blocked)
        .query_async(&mut c)
        .await
        .unwrap();
    eventually(WAIT, "a claim refused", || {
        let mut c = c.clone();
        async move { (refused_for_memory(&mut c).await >= 1).then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let refused = refused_for_memory(&mut c).await;
    // Pauses of 50, 100, 200, 400 and 800 ms: five or six refusals in about 2 s.
    assert!(
        (4..=7).contains(&refused),
        "{refused} claims refused in 2 s"
    );
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("0")
        .query_async(&mut c)
        .await
        .unwrap();
    stop(w).await;
}

/// The connections a server has, one `CLIENT LIST` line each.
async fn clients(c: &mut redis::aio::MultiplexedConnection) -> Vec<String> {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(c)
        .await
        .unwrap();
    list.lines().map(str::to_owned).collect()
}

/// Waits for a client blocked in BLPOP (an idle worker) and gives its client id.
pub(crate) async fn waiting_in_blpop(c: &redis::aio::MultiplexedConnection) -> String {
    eventually(WAIT, "the worker waiting in BLPOP", || {
        let mut c = c.clone();
        async move {
            clients(&mut c)
                .await
                .iter()
                .find(|l| l.contains(" cmd=blpop "))
                .and_then(|l| l.split_whitespace().find_map(|f| f.strip_prefix("id=")))
                .map(str::to_owned)
        }
    })
    .await
}

/// An idle worker on one node blocks on a single connection for all its queues,
/// besides its heartbeat's: idle workers cost Redis no spare connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_waits_on_one_connection() {
    let server = RedisServer::start(&[]);
    let p = Prefix::on(&server.url());
    let a = p.queue::<Echo>("conns-a").await;
    let b = p.queue::<Echo>("conns-b").await;
    let mut c = server.connection().await;
    let before = clients(&mut c).await.len();
    let w = spawn(
        Worker::builder(a.clone())
            .queue(b.clone())
            .heartbeat(Duration::from_secs(3600))
            .build(echo()),
    );
    waiting_in_blpop(&c).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let during = clients(&mut c).await;
    let blocked = during.iter().filter(|l| l.contains(" cmd=blpop ")).count();
    stop(w).await;
    assert_eq!(blocked, 1, "one BLPOP over both queues");
    // The heartbeat thread's connection per queue, and the one it blocks on.
    assert_eq!(during.len() - before, 3, "the worker's own connections");
}

/// The `active` index holds one member that is not a job (it keeps the index a skip
/// list, where a lease costs O(log n) to add): no count, listing or wake-up sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_active_index_is_a_skip_list_whose_keeper_is_never_a_job() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("keeper").await;
    let a = q.enqueue(Echo { n: 1 }).await.unwrap();
    let b = q.enqueue(Echo { n: 2 }).await.unwrap();
    let (open_tx, go) = tokio::sync::watch::channel(false);
    let log = Arc::new(Mutex::new(Vec::new()));
    let w = spawn(
        Worker::builder(q.clone())
            .concurrency(2)
            .build(gated(log, &[1, 2], go)),
    );
    eventually(WAIT, "both jobs running", || async {
        (q.active_jobs(10).await.unwrap().len() == 2).then_some(())
    })
    .await;
    assert_eq!(q.stats().await.unwrap().active, 2);
    assert_eq!(q.active_jobs(1).await.unwrap().len(), 1);
    let mut conn = crate::common::connection().await;
    let encoding: String = redis::cmd("OBJECT")
        .arg("ENCODING")
        .arg(format!("{}:{{keeper}}:active", p.name))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(encoding, "skiplist");

    open_tx.send_replace(true);
    for id in [&a.id, &b.id] {
        let st = q.wait(id, WAIT).await.unwrap();
        assert_eq!(st.state, JobState::Completed);
    }
    assert_eq!(q.stats().await.unwrap().active, 0);
    assert!(q.active_jobs(10).await.unwrap().is_empty());
    // With only the keeper left, the idle worker still sleeps until new work and
    // takes it at once.
    let c = q.enqueue(Echo { n: 3 }).await.unwrap();
    let st = q.wait(&c.id, WAIT).await.unwrap();
    assert_eq!(st.state, JobState::Completed);
    stop(w).await;
}
