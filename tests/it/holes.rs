//! The holes found in review (issue #8): each test fails on the code before its fix.
//! Claimed means run or handed back; no record strands a job; passing server states
//! and outages are waited out; one clock; waiters survive gaps; a slot is free only
//! when its work is; memory stays bounded; wake tokens match the work.

mod proxy;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;
use voxqueue::{
    Error, EventKind, Handler, JobContext, JobError, JobState, Queue, RetryPolicy, Worker,
    WorkerBuilder, handler_fn,
};

use crate::common::{Prefix, RedisServer, eventually, shutdown, within};
use proxy::{Mode, Proxy};

const WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct N {
    n: u32,
}

fn spawn<H: Handler<N>>(
    worker: Worker<N, H>,
) -> (oneshot::Sender<()>, JoinHandle<Result<(), Error>>) {
    let (stop, signal) = shutdown();
    (stop, tokio::spawn(worker.run_until(signal)))
}

async fn stop(worker: (oneshot::Sender<()>, JoinHandle<Result<(), Error>>)) {
    let _ = worker.0.send(());
    worker.1.await.expect("worker task").expect("worker result");
}

fn echo() -> impl Handler<N, Output = u32> {
    handler_fn(|job: N, _ctx: JobContext| async move { Ok::<_, JobError>(job.n) })
}

/// A handler that counts its runs and finishes when `go` is notified.
fn gated(runs: Arc<AtomicUsize>, go: Arc<Notify>) -> impl Handler<N, Output = u32> {
    handler_fn(move |job: N, _ctx: JobContext| {
        let (runs, go) = (runs.clone(), go.clone());
        async move {
            runs.fetch_add(1, Ordering::SeqCst);
            go.notified().await;
            Ok::<_, JobError>(job.n)
        }
    })
}

async fn conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// The same queue as `p.queue(name)`, reached at `url` (a proxy or the server itself).
async fn queue_at(p: &Prefix, url: &str, name: &str) -> Queue<N> {
    Queue::builder(name)
        .url(url)
        .prefix(&p.name)
        .connect()
        .await
        .unwrap()
}

async fn state_is(q: &Queue<N>, id: &voxqueue::JobId, state: JobState) -> Option<()> {
    (q.status(id).await.ok()?.state == state).then_some(())
}

// #1: a claim Redis ran while the worker was shutting down is handed back at once,
// not stranded as active until its lease runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_redis_ran_during_shutdown_is_handed_back() {
    let server = RedisServer::start(&[]);
    let p = Prefix::on(&server.url());
    // A fresh server knows no script: its first EVALSHA would fail NOSCRIPT and the
    // claim would never run. Warm the script cache with one job on another queue.
    let warm = p.queue::<N>("warm-up").await;
    let first = warm.enqueue(N { n: 0 }).await.unwrap();
    let w = spawn(Worker::builder(warm.clone()).build(echo()));
    warm.wait(&first.id, WAIT).await.unwrap();
    stop(w).await;
    let q = p.queue::<N>("shutdown-claim").await;
    let job = q.enqueue(N { n: 1 }).await.unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let worker = Worker::builder(q.clone()).build(gated(runs.clone(), Arc::new(Notify::new())));
    // Redis holds every command for 800 ms: the worker's first claim waits in there.
    let mut c = conn(&server.url()).await;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(800)
        .arg("ALL")
        .query_async(&mut c)
        .await
        .unwrap();
    let (tx, signal) = shutdown();
    let running = tokio::spawn(worker.run_until(signal));
    // Shutdown comes while the claim is in flight (sent, not yet answered).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = tx.send(());
    running.await.unwrap().unwrap();
    let st = q.status(&job.id).await.unwrap();
    assert_eq!(st.state, JobState::Queued);
    assert_eq!(st.attempts, 0);
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

// #9: valid JSON of the wrong shape is dead-lettered with the reason; the job never
// ends outside every index, and the queue goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_of_the_wrong_shape_is_dead_lettered_with_the_reason() {
    let p = Prefix::new();
    let q = p.queue::<N>("wrong-shape").await;
    let bad_attempts = q.enqueue(N { n: 1 }).await.unwrap();
    let bad_expiry = q.enqueue(N { n: 2 }).await.unwrap();
    let fine = q.enqueue(N { n: 3 }).await.unwrap();
    let mut c = conn(&crate::common::redis_url()).await;
    let key = format!("{}:{{wrong-shape}}:jobs", p.name);
    let records = [
        (
            &bad_attempts.id,
            format!(
                r#"{{"id":"{}","state":"queued","pri":1,"seq":1,"attempts":"many","result_ttl_ms":60000}}"#,
                bad_attempts.id
            ),
        ),
        (
            &bad_expiry.id,
            r#"{"state":"queued","pri":1,"seq":2,"expires_at":"soon","result_ttl_ms":60000}"#
                .to_owned(),
        ),
    ];
    for (id, record) in records {
        let _: () = redis::cmd("HSET")
            .arg(&key)
            .arg(id.as_str())
            .arg(record)
            .query_async(&mut c)
            .await
            .unwrap();
    }
    let w = spawn(Worker::builder(q.clone()).build(echo()));
    assert_eq!(q.wait_result::<u32>(&fine.id, WAIT).await.unwrap(), 3);
    for (id, why) in [
        (&bad_attempts.id, "attempts is a string, not a number"),
        (&bad_expiry.id, "expires_at is a string, not a number"),
    ] {
        let st = eventually(WAIT, "buried", || async {
            let st = q.status(id).await.ok()?;
            (st.state == JobState::Dead).then_some(st)
        })
        .await;
        let reason = st.reason.unwrap();
        assert!(reason.contains("wrong shape"), "{reason}");
        assert!(reason.contains(why), "{reason}");
    }
    assert_eq!(q.dead_letter().count().await.unwrap(), 2);
    stop(w).await;
}

/// A worker reaching its Redis through a proxy the test can break, running one
/// gated job (see [`gated`]); `direct` reads the same queue past the proxy.
struct Proxied {
    _server: RedisServer,
    proxy: Proxy,
    _prefix: Prefix,
    direct: Queue<N>,
    runs: Arc<AtomicUsize>,
    go: Arc<Notify>,
    job: voxqueue::JobId,
    worker: (oneshot::Sender<()>, JoinHandle<Result<(), Error>>),
}

impl Proxied {
    /// Starts it and waits until the job runs.
    async fn running(name: &str) -> Self {
        Self::running_with(name, |w| w).await
    }

    /// As [`Proxied::running`], with the worker's settings changed by `settings`.
    async fn running_with(
        name: &str,
        settings: impl FnOnce(WorkerBuilder<N>) -> WorkerBuilder<N>,
    ) -> Self {
        let server = RedisServer::start(&[]);
        let proxy = Proxy::start(server.port).await;
        let prefix = Prefix::on(&server.url());
        let direct = prefix.queue::<N>(name).await;
        let q = queue_at(&prefix, &proxy.url(), name).await;
        let (runs, go) = (Arc::new(AtomicUsize::new(0)), Arc::new(Notify::new()));
        let job = q.enqueue(N { n: 4 }).await.unwrap().id;
        let worker = spawn(settings(Worker::builder(q)).build(gated(runs.clone(), go.clone())));
        eventually(WAIT, "running", || {
            state_is(&direct, &job, JobState::Active)
        })
        .await;
        // Active in Redis is not yet in the handler: the claim's reply may still be on
        // its way, and an outage that began now would drop it (the job would then wait
        // out its lease, which is not what these tests are about).
        let started = runs.clone();
        eventually(WAIT, "in the handler", || {
            let started = started.clone();
            async move { (started.load(Ordering::SeqCst) == 1).then_some(()) }
        })
        .await;
        Proxied {
            _server: server,
            proxy,
            _prefix: prefix,
            direct,
            runs,
            go,
            job,
            worker,
        }
    }

    /// The job completed once, with its result, in one attempt.
    async fn completed_once(self) {
        let (q, id) = (&self.direct, &self.job);
        eventually(WAIT, "completed", || state_is(q, id, JobState::Completed)).await;
        assert_eq!(q.result::<u32>(id).await.unwrap(), Some(4));
        assert_eq!(q.status(id).await.unwrap().attempts, 1);
        assert_eq!(self.runs.load(Ordering::SeqCst), 1);
        stop(self.worker).await;
    }
}

// #10: a server answering LOADING (restarted, reading its data) is waited out; the
// finished job is reported once it is back, not run again after its lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_answered_loading_is_retried_until_redis_is_back() {
    let t = Proxied::running("loading").await;
    t.proxy.set(Mode::Loading);
    t.go.notify_one();
    // The report meets LOADING for a while (and is not abandoned).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let st = t.direct.status(&t.job).await.unwrap();
    assert_eq!(st.state, JobState::Active);
    t.proxy.set(Mode::Forward);
    t.completed_once().await;
}

// Claimed means run or handed back: a hand-back on shutdown that meets LOADING is
// retried (within about a lease) until Redis is back, not left to the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_back_answered_loading_is_retried_until_redis_is_back() {
    let t = Proxied::running_with("loading-hand-back", |w| {
        w.shutdown_grace(Duration::from_millis(100))
    })
    .await;
    t.proxy.set(Mode::Loading);
    let _ = t.worker.0.send(());
    // The grace runs out and the hand-back meets LOADING for a while.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let st = t.direct.status(&t.job).await.unwrap();
    assert_eq!(st.state, JobState::Active);
    t.proxy.set(Mode::Forward);
    // Back long before the 30 s lease could run out.
    within("the worker stops", t.worker.1)
        .await
        .unwrap()
        .unwrap();
    let st = t.direct.status(&t.job).await.unwrap();
    assert_eq!((st.state, st.attempts), (JobState::Queued, 0));
}

// A hand-back is retried for about a lease, no longer: by then the lease has run out
// and any worker's recovery does the same, so a worker never hangs on shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_back_gives_up_after_about_a_lease() {
    let t = Proxied::running_with("loading-forever", |w| {
        w.lease(Duration::from_millis(1000))
            .shutdown_grace(Duration::from_millis(100))
    })
    .await;
    t.proxy.set(Mode::Loading);
    let t0 = Instant::now();
    let _ = t.worker.0.send(());
    within("the worker stops", t.worker.1)
        .await
        .unwrap()
        .unwrap();
    // A lease (1 s) plus at most one backoff step (2 s) and the grace.
    assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
}

// A report waits out an outage only until the shutdown grace ends: then the worker
// stops, and the job (still leased, still active) runs again after its lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_stuck_in_an_outage_gives_up_when_the_shutdown_grace_ends() {
    let t = Proxied::running_with("loading-shutdown", |w| {
        w.shutdown_grace(Duration::from_millis(300))
    })
    .await;
    t.proxy.set(Mode::Loading);
    t.go.notify_one();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = t.worker.0.send(());
    within("the worker stops", t.worker.1)
        .await
        .unwrap()
        .unwrap();
    let st = t.direct.status(&t.job).await.unwrap();
    assert_eq!(st.state, JobState::Active);
    assert_eq!(t.runs.load(Ordering::SeqCst), 1);
}

// #5: a finished result is kept through a Redis outage longer than the old eight
// tries (about 7 s), while the lease is still the worker's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_result_survives_a_long_redis_outage() {
    let t = Proxied::running("outage").await;
    t.proxy.set(Mode::Down);
    t.proxy.drop_all();
    t.go.notify_one();
    tokio::time::sleep(Duration::from_secs(9)).await;
    t.proxy.set(Mode::Forward);
    t.completed_once().await;
}

// #2: one clock. A host whose clock runs an hour ahead claims on the same queue; it
// must not take the live job of a worker whose clock is right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_whose_clocks_differ_never_rerun_a_live_job() {
    let p = Prefix::new();
    let q = p.queue::<N>("clocks").await;
    let ahead = p
        .builder::<N>("clocks")
        .host_clock_skew_for_tests(3_600_000)
        .connect()
        .await
        .unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let slow = handler_fn(move |job: N, _ctx: JobContext| {
        let r = r.clone();
        async move {
            if job.n == 0 {
                r.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(1500)).await;
            }
            Ok::<_, JobError>(job.n)
        }
    });
    let long = q.enqueue(N { n: 0 }).await.unwrap();
    let a = spawn(
        Worker::builder(q.clone())
            .lease(Duration::from_millis(600))
            .build(slow),
    );
    eventually(WAIT, "A runs it", || {
        state_is(&q, &long.id, JobState::Active)
    })
    .await;
    let b = spawn(Worker::builder(ahead.clone()).concurrency(4).build(echo()));
    // B claims (and maintains the queue) again and again while A's job runs.
    let mut last = None;
    for n in 1..=30 {
        last = Some(ahead.enqueue(N { n }).await.unwrap().id);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ahead
        .wait_result::<u32>(&last.unwrap(), WAIT)
        .await
        .unwrap();
    q.wait_result::<u32>(&long.id, WAIT).await.unwrap();
    let st = q.status(&long.id).await.unwrap();
    assert_eq!(st.attempts, 1);
    assert!(st.errors.is_empty(), "{:?}", st.errors);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    stop(a).await;
    stop(b).await;
}

/// A queue on a private server whose event stream keeps about five entries: `direct`
/// writes to it, `proxied` is the same queue reached through `proxy`.
struct Trimmed {
    _server: RedisServer,
    _prefix: Prefix,
    proxy: Proxy,
    direct: Queue<N>,
    proxied: Queue<N>,
}

impl Trimmed {
    async fn start(name: &str) -> Self {
        let server = RedisServer::start(&[]);
        let proxy = Proxy::start(server.port).await;
        let p = Prefix::on(&server.url());
        let direct = p
            .builder::<N>(name)
            .url(server.url())
            .events_max(5)
            .connect()
            .await
            .unwrap();
        let proxied = queue_at(&p, &proxy.url(), name).await;
        Self {
            _server: server,
            _prefix: p,
            proxy,
            direct,
            proxied,
        }
    }
}

// #3: a waiter whose event reader missed the job's terminal event (it reconnected
// after the stream was trimmed past it) notices the gap and re-reads the status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_never_hangs_on_a_job_that_finished_in_a_gap() {
    let Trimmed {
        _server,
        _prefix,
        proxy,
        direct,
        proxied: waiter,
    } = Trimmed::start("gap").await;
    let job = direct.enqueue(N { n: 6 }).await.unwrap();
    let _events = waiter.events().await.unwrap(); // the reader runs through the proxy
    let w8 = waiter.clone();
    let id = job.id.clone();
    let waiting = tokio::spawn(async move { w8.wait(&id, Duration::from_secs(8)).await });
    // Let the waiter read the status and block on events, then stall every reply.
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.set(Mode::Stall);
    let w = spawn(Worker::builder(direct.clone()).build(echo()));
    direct.wait(&job.id, WAIT).await.unwrap();
    stop(w).await;
    // Enough events to trim the terminal one away (MAXLEN ~ trims whole nodes).
    direct
        .enqueue_bulk((0..400).map(|n| N { n }))
        .await
        .unwrap();
    proxy.drop_all();
    proxy.set(Mode::Forward);
    let st = waiting.await.unwrap().unwrap();
    assert_eq!(st.state, JobState::Completed);
}

// #3, the other way round: a reader that reconnects where nothing was trimmed reports no
// gap (even when the entry it read last is the stream's first) and carries on from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnected_reader_that_missed_nothing_reports_no_gap() {
    let server = RedisServer::start(&[]);
    let proxy = Proxy::start(server.port).await;
    let p = Prefix::on(&server.url());
    let direct = queue_at(&p, &server.url(), "no-gap").await;
    let reader = queue_at(&p, &proxy.url(), "no-gap").await;
    let mut events = reader.events().await.unwrap();
    let first = direct.enqueue(N { n: 1 }).await.unwrap();
    let e = within("the first event", events.recv()).await.unwrap();
    assert_eq!((e.kind, &e.job_id), (EventKind::Queued, &first.id));
    proxy.drop_all(); // the reader's blocked XREAD fails
    let second = direct.enqueue(N { n: 2 }).await.unwrap();
    let e = within("the second event", events.recv()).await.unwrap();
    assert_eq!((e.kind, &e.job_id), (EventKind::Queued, &second.id));
    assert_eq!(events.missed(), 0);
}

// #3, with no error at all: the reader's reply is late (a stalled network, a busy
// runtime) while the writers trim past what it read last. The next read starts after a
// gap with no failure to hint at it; the reader still reports the gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_reader_notices_a_gap_without_any_error() {
    let Trimmed {
        _server,
        _prefix,
        proxy,
        direct,
        proxied: reader,
    } = Trimmed::start("late").await;
    let mut events = reader.events().await.unwrap();
    let first = direct.enqueue(N { n: 0 }).await.unwrap();
    let e = within("the first event", events.recv()).await.unwrap();
    assert_eq!(e.job_id, first.id);
    // The reader's next XREAD reaches Redis and is answered; the answer is held.
    proxy.set(Mode::Stall);
    tokio::time::sleep(Duration::from_millis(100)).await;
    direct.enqueue(N { n: 1 }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Meanwhile a few hundred entries go in and the oldest are trimmed (whole nodes).
    for n in 2..400 {
        direct.enqueue(N { n }).await.unwrap();
    }
    proxy.set(Mode::Forward);
    within("a gap event", async {
        loop {
            match events.recv().await {
                Some(e) if e.kind == EventKind::Gap => return,
                Some(_) => {}
                None => panic!("the stream ended"),
            }
        }
    })
    .await;
}

// #4: a timed-out attempt's blocking work goes on; its slot stays busy until it ends,
// so no second job starts beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_job_keeps_its_slot_until_its_blocking_work_ends() {
    let p = Prefix::new();
    let q = p.queue::<N>("slot").await;
    let (running, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (r, m) = (running.clone(), most.clone());
    let handler = handler_fn(move |job: N, ctx: JobContext| {
        let (r, m) = (r.clone(), m.clone());
        async move {
            ctx.run_blocking(move || {
                let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(600));
                r.fetch_sub(1, Ordering::SeqCst);
                job.n
            })
            .await
        }
    });
    let jobs = [1, 2].map(|n| {
        voxqueue::JobOptions::new()
            .timeout(Duration::from_millis(100))
            .max_attempts(1)
            .pipe(|o| (N { n }, o))
    });
    let ids = q.enqueue_bulk_with(jobs).await.unwrap();
    let w = spawn(
        Worker::builder(q.clone())
            .cancel_grace(Duration::from_millis(50))
            .build(handler),
    );
    for e in &ids {
        let st = q.wait(&e.id, WAIT).await.unwrap();
        assert_eq!(st.state, JobState::Dead);
        assert_eq!(st.last_error().unwrap().kind, "timeout");
    }
    eventually(WAIT, "blocking work done", || async {
        (running.load(Ordering::SeqCst) == 0).then_some(())
    })
    .await;
    assert_eq!(most.load(Ordering::SeqCst), 1);
    stop(w).await;
}

trait Pipe: Sized {
    fn pipe<T>(self, f: impl FnOnce(Self) -> T) -> T {
        f(self)
    }
}
impl<T> Pipe for T {}

// #6: bounded by default — a killed worker (and its open breaker) is forgotten, and
// a job's error history and messages are capped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_workers_and_their_breakers_are_forgotten() {
    let p = Prefix::new();
    let q = p.queue::<N>("stale").await;
    let mut c = conn(&crate::common::redis_url()).await;
    let (secs, _): (u64, u64) = redis::cmd("TIME").query_async(&mut c).await.unwrap();
    let base = format!("{}:{{stale}}", p.name);
    let _: () = redis::cmd("ZADD")
        .arg(format!("{base}:workers"))
        .arg((secs - 600) * 1000)
        .arg("ghost")
        .query_async(&mut c)
        .await
        .unwrap();
    let _: () = redis::cmd("HSET")
        .arg(format!("{base}:breakers"))
        .arg("ghost")
        .arg("open")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(q.stats().await.unwrap().open_breakers, 0);
    let w = spawn(Worker::builder(q.clone()).build(echo()));
    eventually(WAIT, "ghost forgotten", || {
        let mut c = c.clone();
        let base = base.clone();
        async move {
            let score: Option<f64> = redis::cmd("ZSCORE")
                .arg(format!("{base}:workers"))
                .arg("ghost")
                .query_async(&mut c)
                .await
                .unwrap();
            let breaker: Option<String> = redis::cmd("HGET")
                .arg(format!("{base}:breakers"))
                .arg("ghost")
                .query_async(&mut c)
                .await
                .unwrap();
            (score.is_none() && breaker.is_none()).then_some(())
        }
    })
    .await;
    assert_eq!(q.stats().await.unwrap().workers, 1);
    stop(w).await;
}

/// However short a worker's forget setting, it forgets another worker only after
/// three of its own heartbeats of silence: a live peer is never dropped between beats.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_are_forgotten_no_sooner_than_three_heartbeats() {
    let p = Prefix::new();
    let q = p.queue::<N>("forget-floor").await;
    let mut c = conn(&crate::common::redis_url()).await;
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut c).await.unwrap();
    let now_ms = secs * 1000 + micros / 1000;
    let workers = format!("{}:{{forget-floor}}:workers", p.name);
    let _: () = redis::cmd("ZADD")
        .arg(&workers)
        .arg(now_ms - 1_000)
        .arg("quiet")
        .arg(now_ms - 10_000)
        .arg("gone")
        .query_async(&mut c)
        .await
        .unwrap();
    let w = spawn(
        Worker::builder(q.clone())
            .heartbeat(Duration::from_secs(1))
            .forget_silent_after(Duration::from_millis(1))
            .build(echo()),
    );
    let seen = eventually(WAIT, "the long-silent worker forgotten", || {
        let mut c = c.clone();
        let workers = workers.clone();
        async move {
            let ids: Vec<String> = redis::cmd("ZRANGE")
                .arg(&workers)
                .arg(0)
                .arg(-1)
                .query_async(&mut c)
                .await
                .unwrap();
            (!ids.iter().any(|id| id == "gone")).then_some(ids)
        }
    })
    .await;
    // Silent 1 s, under three beats of 1 s: kept by the same sweep.
    assert!(seen.iter().any(|id| id == "quiet"), "{seen:?}");
    stop(w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_history_and_messages_are_capped() {
    let p = Prefix::new();
    let q = p.queue::<N>("errors-cap").await;
    let failing = handler_fn(|_job: N, _ctx: JobContext| async move {
        Err::<u32, _>(JobError::transient("x".repeat(5_000)))
    });
    let job = q
        .enqueue(N { n: 1 })
        .retry(RetryPolicy::fixed(Duration::from_millis(1)).max_attempts(12))
        .await
        .unwrap();
    let w = spawn(Worker::builder(q.clone()).build(failing));
    let st = q.wait(&job.id, WAIT).await.unwrap();
    assert_eq!(st.state, JobState::Dead);
    assert_eq!(st.attempts, 12);
    assert_eq!(st.errors.len(), 10);
    assert_eq!(st.errors[0].attempt, 3);
    for e in &st.errors {
        assert_eq!(
            e.message.chars().count(),
            2_001,
            "cut to 2 000 bytes and marked"
        );
    }
    assert_eq!(st.reason.unwrap().chars().count(), 2_001);
    stop(w).await;
}

// #7: durations beyond what cjson keeps exact (and a large retry seed) no longer make
// the record unreadable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_durations_and_seeds_keep_the_record_readable() {
    let p = Prefix::new();
    let q = p.queue::<N>("huge").await;
    let job = q
        .enqueue(N { n: 7 })
        .timeout(Duration::from_secs(u64::MAX / 4))
        .ttl(Duration::MAX)
        .result_ttl(Duration::from_secs(1_000_000_000_000))
        .retry(
            RetryPolicy::fixed(Duration::from_millis(1))
                .max_attempts(2)
                .seed(u64::MAX - 1),
        )
        .await
        .unwrap();
    assert_eq!(q.status(&job.id).await.unwrap().state, JobState::Queued);
    let w = spawn(Worker::builder(q.clone()).build(echo()));
    assert_eq!(q.wait_result::<u32>(&job.id, WAIT).await.unwrap(), 7);
    stop(w).await;
}

// #8: wake tokens stand for work nobody took: after a burst that a busy worker drained
// through its reports, none is left to make idle workers spin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wake_tokens_never_outnumber_the_work_left() {
    let p = Prefix::new();
    let q = p.queue::<N>("wake").await;
    let busy = handler_fn(|job: N, _ctx: JobContext| async move {
        tokio::time::sleep(Duration::from_millis(5)).await;
        Ok::<_, JobError>(job.n)
    });
    let w = spawn(Worker::builder(q.clone()).build(busy));
    let mut last = None;
    for n in 0..60 {
        last = Some(q.enqueue(N { n }).await.unwrap().id);
    }
    q.wait(&last.unwrap(), WAIT).await.unwrap();
    let mut c = conn(&crate::common::redis_url()).await;
    let tokens: u64 = redis::cmd("LLEN")
        .arg(format!("{}:{{wake}}:wake", p.name))
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(tokens, 0);
    stop(w).await;
}

// Recovery from the heartbeat: a killed worker's job is back in the queue within its
// lease plus a second, though the only live worker is busy and never claims.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_workers_job_returns_within_a_lease_while_every_worker_is_busy() {
    let p = Prefix::new();
    let q = p.queue::<N>("heartbeat-recovery").await;
    let b_go = Arc::new(Notify::new());
    let first = q.enqueue(N { n: 1 }).await.unwrap();
    let go = b_go.clone();
    let only_first_waits = handler_fn(move |job: N, _ctx: JobContext| {
        let go = go.clone();
        async move {
            if job.n == 1 {
                go.notified().await;
            }
            Ok::<_, JobError>(job.n)
        }
    });
    let b = spawn(
        Worker::builder(q.clone())
            .id("busy")
            .build(only_first_waits),
    );
    eventually(WAIT, "B busy", || state_is(&q, &first.id, JobState::Active)).await;
    let a = spawn(
        Worker::builder(q.clone())
            .id("doomed")
            .lease(Duration::from_secs(1))
            .build(gated(Arc::default(), Arc::new(Notify::new()))),
    );
    let job = q.enqueue(N { n: 2 }).await.unwrap();
    eventually(WAIT, "A runs it", || {
        state_is(&q, &job.id, JobState::Active)
    })
    .await;
    a.1.abort(); // killed: no hand-back, no more heartbeats
    let killed = Instant::now();
    let st = eventually(WAIT, "back in the queue", || async {
        let st = q.status(&job.id).await.ok()?;
        (st.state == JobState::Queued).then_some(st)
    })
    .await;
    let took = killed.elapsed();
    assert!(took < Duration::from_millis(2_300), "took {took:?}");
    assert_eq!(st.errors[0].kind, "stalled");
    b_go.notify_one();
    stop(b).await;
}
