//! Partitioned queues: one logical queue over P partitions (each its own hash tag),
//! on the shared Redis and on a private 3-master cluster.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use voxqueue::{
    CancelOutcome, Connector, Deduplicator, Error, EventKind, JobContext, JobError, JobId,
    JobOptions, JobState, PartitionedBuilder, PartitionedQueue, handler_fn,
};

use crate::common::{Prefix, RedisCluster, RedisServer, eventually, redis_url, shutdown, within};
use crate::queue::Echo;

fn builder(p: &Prefix, name: &str) -> PartitionedBuilder<Echo> {
    PartitionedQueue::<Echo>::builder(name)
        .url(redis_url())
        .prefix(&p.name)
}

async fn open(p: &Prefix, name: &str, partitions: u32) -> PartitionedQueue<Echo> {
    builder(p, name)
        .partitions(partitions)
        .connect()
        .await
        .expect("connect to test Redis")
}

/// How many ready jobs each partition holds.
async fn queued_per_partition(q: &PartitionedQueue<Echo>) -> Vec<u64> {
    let mut out = Vec::new();
    for part in q.partitions() {
        out.push(part.stats().await.unwrap().queued);
    }
    out
}

#[tokio::test]
async fn jobs_without_a_key_spread_round_robin_and_bulk_answers_in_order() {
    let p = Prefix::new();
    let q = open(&p, "spread", 3).await;
    let done = q.enqueue_bulk((0..30).map(|n| Echo { n })).await.unwrap();
    assert_eq!(done.len(), 30);
    assert_eq!(queued_per_partition(&q).await, vec![10, 10, 10]);
    // Answers line up with the input, and each id names the partition it is in.
    for (n, e) in done.iter().enumerate() {
        assert_eq!(e.state, JobState::Queued);
        let part = &q.partitions()[q.partition_of(&e.id)];
        let status = part.status(&e.id).await.unwrap();
        assert_eq!(status.state, JobState::Queued);
        assert_eq!(q.status(&e.id).await.unwrap().id, e.id, "job {n}");
    }
    let one = q.enqueue(Echo { n: 99 }).await.unwrap();
    assert_eq!(q.status(&one.id).await.unwrap().state, JobState::Queued);
    let stats = q.stats().await.unwrap();
    assert_eq!(stats.queued, 31);
    assert_eq!(stats.totals.get("enqueued"), Some(&31));
}

#[tokio::test]
async fn identical_requests_share_one_job_across_partitions() {
    let p = Prefix::new();
    let q = builder(&p, "dedup")
        .partitions(4)
        .dedup(Deduplicator::new(Duration::from_secs(60)))
        .connect()
        .await
        .unwrap();
    let first = q.enqueue_bulk((0..40).map(|n| Echo { n })).await.unwrap();
    // Forty distinct requests land in more than one partition...
    let used: HashSet<usize> = first.iter().map(|e| q.partition_of(&e.id)).collect();
    assert!(used.len() > 1, "{used:?}");
    // ...and each one's twin, single or bulk, finds it there.
    for (n, e) in first.iter().enumerate().take(10) {
        let again = q.enqueue(Echo { n: n as u32 }).await.unwrap();
        assert_eq!(again.duplicate_of.as_ref(), Some(&e.id));
    }
    let bulk_again = q.enqueue_bulk((0..40).map(|n| Echo { n })).await.unwrap();
    for (a, b) in first.iter().zip(&bulk_again) {
        assert_eq!(b.duplicate_of.as_ref(), Some(&a.id));
    }
    // An explicit dedup key places by the key too.
    let k1 = q.enqueue(Echo { n: 500 }).dedup_key("k").await.unwrap();
    let k2 = q.enqueue(Echo { n: 501 }).dedup_key("k").await.unwrap();
    assert_eq!(k2.duplicate_of, Some(k1.id.clone()));
    assert_eq!(q.stats().await.unwrap().queued, 41);

    // A completed job's result is reused within the dedup TTL.
    let (stop, signal) = shutdown();
    let worker =
        q.worker()
            .concurrency(4)
            .build(handler_fn(|job: Echo, _ctx: JobContext| async move {
                Ok::<_, JobError>(job.n * 2)
            }));
    let running = tokio::spawn(worker.run_until(signal));
    let doubled: u32 = q
        .wait_result(&first[7].id, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(doubled, 14);
    let reused = q.enqueue(Echo { n: 7 }).await.unwrap();
    assert_eq!(reused.duplicate_of, Some(first[7].id.clone()));
    assert_eq!(reused.state, JobState::Completed);
    let _ = stop.send(());
    running.await.unwrap().unwrap();
}

#[tokio::test]
async fn caller_ids_are_found_in_any_partition() {
    let p = Prefix::new();
    let q = open(&p, "ids", 3).await;
    let id = JobId::new("order-17").unwrap();
    let a = q.enqueue(Echo { n: 1 }).id(id.clone()).await.unwrap();
    assert_eq!(a.id, id);
    // The same caller id again is the same job (its home partition holds it).
    let b = q.enqueue(Echo { n: 2 }).id(id.clone()).await.unwrap();
    assert_eq!(b.duplicate_of, Some(id.clone()));
    assert_eq!(q.status(&id).await.unwrap().state, JobState::Queued);
    // A caller id placed by a dedup key may live outside its home partition: find
    // one that does, and look it up anyway.
    let home_of = |s: &str| q.partition_of(&JobId::new(s).unwrap());
    let mut placed_away = None;
    for i in 0..50 {
        let name = format!("keyed-{i}");
        let e = q
            .enqueue(Echo { n: i })
            .id(JobId::new(&name).unwrap())
            .dedup_key(format!("key-{i}"))
            .await
            .unwrap();
        let mut holder = None;
        for (i, part) in q.partitions().iter().enumerate() {
            if part.status(&e.id).await.is_ok() {
                holder = Some(i);
            }
        }
        if holder != Some(home_of(&name)) {
            placed_away = Some(e.id);
            break;
        }
    }
    let away = placed_away.expect("some dedup key places its job away from the id's home");
    assert_eq!(q.status(&away).await.unwrap().state, JobState::Queued);
    assert_eq!(q.cancel(&away).await.unwrap(), CancelOutcome::Cancelled);
    assert_eq!(q.status(&away).await.unwrap().state, JobState::Cancelled);
    let missing = JobId::new("never-enqueued").unwrap();
    assert!(matches!(q.status(&missing).await, Err(Error::NotFound(_))));
    assert!(matches!(q.cancel(&missing).await, Err(Error::NotFound(_))));
}

#[tokio::test]
async fn status_cancel_wait_and_dead_letters_work_on_the_logical_queue() {
    let p = Prefix::new();
    let q = open(&p, "ops", 3).await;
    let mut events = q.events().await.unwrap();
    // A delayed job is cancelled through the logical queue.
    let later = q
        .enqueue(Echo { n: 0 })
        .delay(Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(
        q.status(&later.id).await.unwrap().state,
        JobState::Scheduled
    );
    assert_eq!(q.cancel(&later.id).await.unwrap(), CancelOutcome::Cancelled);
    assert_eq!(
        q.cancel(&later.id).await.unwrap(),
        CancelOutcome::AlreadyFinished(JobState::Cancelled)
    );
    // Odd jobs fail for good; even ones complete. Six jobs cover all three partitions.
    let jobs = q
        .enqueue_bulk_with((1..=6).map(|n| (Echo { n }, JobOptions::new().max_attempts(1))))
        .await
        .unwrap();
    let used: HashSet<usize> = jobs.iter().map(|e| q.partition_of(&e.id)).collect();
    assert_eq!(used.len(), 3);
    let (stop, signal) = shutdown();
    let worker = q
        .worker()
        .build(handler_fn(|job: Echo, _ctx: JobContext| async move {
            if job.n % 2 == 1 {
                Err(JobError::Permanent(format!("odd {}", job.n)))
            } else {
                Ok(job.n)
            }
        }));
    let running = tokio::spawn(worker.run_until(signal));
    for (i, e) in jobs.iter().enumerate() {
        let n = i as u32 + 1;
        if n.is_multiple_of(2) {
            let got: u32 = q.wait_result(&e.id, Duration::from_secs(10)).await.unwrap();
            assert_eq!(got, n);
            assert_eq!(q.result::<u32>(&e.id).await.unwrap(), Some(n));
        } else {
            let err = q
                .wait_result::<u32>(&e.id, Duration::from_secs(10))
                .await
                .unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::JobFailed {
                        state: JobState::Dead,
                        ..
                    }
                ),
                "{err}"
            );
        }
    }
    let _ = stop.send(());
    running.await.unwrap().unwrap();

    // The merged event stream carries every partition's outcomes.
    let mut completed = HashSet::new();
    while completed.len() < 3 {
        let event = within("completed events", events.recv()).await.unwrap();
        if event.kind == EventKind::Completed {
            completed.insert(event.job_id);
        }
    }
    let even: HashSet<JobId> = jobs
        .iter()
        .skip(1)
        .step_by(2)
        .map(|e| e.id.clone())
        .collect();
    assert_eq!(completed, even);

    // Dead letters of all partitions, as one.
    let dead = q.dead_letter();
    assert_eq!(dead.count().await.unwrap(), 3);
    let listed: HashSet<JobId> = dead
        .list(0, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    let odd: Vec<JobId> = jobs.iter().step_by(2).map(|e| e.id.clone()).collect();
    assert_eq!(listed, odd.iter().cloned().collect());
    assert_eq!(dead.list(1, 10).await.unwrap().len(), 2);
    let first = dead.get(&odd[0]).await.unwrap().expect("dead job");
    assert_eq!(first.job, Ok(Echo { n: 1 }));
    assert_eq!(first.status.reason.as_deref(), Some("odd 1"));
    assert!(dead.requeue(&odd[0]).await.unwrap());
    assert_eq!(q.status(&odd[0]).await.unwrap().state, JobState::Queued);
    assert!(dead.purge(&odd[1]).await.unwrap());
    assert!(matches!(q.status(&odd[1]).await, Err(Error::NotFound(_))));
    assert!(!dead.purge(&odd[1]).await.unwrap());
    assert_eq!(dead.requeue_all().await.unwrap(), 1);
    assert_eq!(dead.count().await.unwrap(), 0);

    let stats = q.stats().await.unwrap();
    assert_eq!(stats.totals.get("completed"), Some(&3));
    assert_eq!(stats.totals.get("dead"), Some(&3));
    assert_eq!(stats.totals.get("cancelled"), Some(&1));
    assert_eq!(stats.queued, 2);
}

#[tokio::test]
async fn opening_with_another_partition_count_is_refused() {
    let p = Prefix::new();
    let _q = open(&p, "fixed", 3).await;
    match builder(&p, "fixed").partitions(4).connect().await {
        Err(Error::PartitionMismatch {
            queue,
            stored,
            requested,
        }) => assert_eq!((queue.as_str(), stored, requested), ("fixed", 3, 4)),
        other => panic!("expected a mismatch, got {other:?}"),
    }
    // No count: the stored one.
    let same = builder(&p, "fixed").connect().await.unwrap();
    assert_eq!(same.partitions().len(), 3);
    // No count and nothing stored: nothing to open.
    assert!(matches!(
        builder(&p, "unknown").connect().await,
        Err(Error::InvalidConfig(_))
    ));
    for bad in [0, 257] {
        assert!(matches!(
            builder(&p, "range").partitions(bad).connect().await,
            Err(Error::InvalidConfig(_))
        ));
    }
}

/// Which partition each started job came from, in start order.
fn recorder(
    q: &PartitionedQueue<Echo>,
    pause: Duration,
) -> (
    Arc<Mutex<Vec<usize>>>,
    impl voxqueue::Handler<Echo, Output = u32> + use<>,
) {
    let started = Arc::new(Mutex::new(Vec::new()));
    let log = started.clone();
    let q = q.clone();
    let handler = handler_fn(move |job: Echo, ctx: JobContext| {
        log.lock().unwrap().push(q.partition_of(ctx.id()));
        async move {
            tokio::time::sleep(pause).await;
            Ok::<_, JobError>(job.n)
        }
    });
    (started, handler)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_takes_turns_over_the_partitions() {
    let p = Prefix::new();
    let q = open(&p, "turns", 3).await;
    // 3 × 20 jobs, pre-filled.
    q.enqueue_bulk((0..60).map(|n| Echo { n })).await.unwrap();
    let (started, handler) = recorder(&q, Duration::ZERO);
    let (stop, signal) = shutdown();
    let running = tokio::spawn(q.worker().build(handler).run_until(signal));
    eventually(Duration::from_secs(20), "all jobs run", || async {
        (q.stats().await.unwrap().totals.get("completed") == Some(&60)).then_some(())
    })
    .await;
    let _ = stop.send(());
    running.await.unwrap().unwrap();
    let order = started.lock().unwrap().clone();
    // Each stretch of three starts takes one job from each partition.
    for (i, turn) in order.chunks(3).enumerate() {
        let mut turn = turn.to_vec();
        turn.sort_unstable();
        assert_eq!(turn, vec![0, 1, 2], "turn {i} of {order:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_a_slot_per_partition_serves_them_all_at_once() {
    let p = Prefix::new();
    let q = open(&p, "slots", 3).await;
    q.enqueue_bulk((0..300).map(|n| Echo { n })).await.unwrap();
    let (started, handler) = recorder(&q, Duration::from_millis(1));
    let (stop, signal) = shutdown();
    let worker = q.worker().concurrency(3).build(handler);
    let running = tokio::spawn(worker.run_until(signal));
    eventually(Duration::from_secs(30), "all jobs run", || async {
        (q.stats().await.unwrap().totals.get("completed") == Some(&300)).then_some(())
    })
    .await;
    let _ = stop.send(());
    running.await.unwrap().unwrap();
    let order = started.lock().unwrap().clone();
    // The first claim gives each partition a slot: every partition runs from the start.
    let mut first = [0; 3];
    for &part in &order[..30] {
        first[part] += 1;
    }
    assert!(
        first.iter().all(|&n| n >= 5),
        "first 30 starts by partition: {first:?}"
    );
}

/// With a slot per partition, a slot's report claims its next job from the same
/// partition for a while (a run): about one script call per job, not a report and a
/// claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_per_partition_claims_its_next_jobs_with_its_reports() {
    let server = RedisServer::start(&[]);
    let p = Prefix::on(&server.url());
    let q = PartitionedQueue::<Echo>::builder("runs")
        .url(server.url())
        .prefix(&p.name)
        .partitions(2)
        .connect()
        .await
        .unwrap();
    let n = 200;
    q.enqueue_bulk((0..n).map(|n| Echo { n })).await.unwrap();
    let (started, handler) = recorder(&q, Duration::from_millis(1));
    let mut c = server.connection().await;
    let before = crate::worker::client_calls(&mut c).await;
    let (stop, signal) = shutdown();
    let worker = q
        .worker()
        .concurrency(2)
        .heartbeat(Duration::from_secs(10))
        .build(handler);
    let running = tokio::spawn(worker.run_until(signal));
    eventually(Duration::from_secs(20), "all jobs run", || async {
        (started.lock().unwrap().len() == n as usize).then_some(())
    })
    .await;
    let _ = stop.send(());
    running.await.unwrap().unwrap();
    let sent = crate::worker::client_calls(&mut c).await - before;
    assert_eq!(
        q.stats().await.unwrap().totals.get("completed"),
        Some(&(n as u64))
    );
    // About 215 here (a report per job, a claim per slot per run, heartbeats); a
    // claim of its own for every job would make it 400 and more.
    assert!(sent <= 300, "{sent} script calls and pops for {n} jobs");
}

/// A worker with four slots over a two-partition queue on a private server, its
/// jobs held until the returned sender says go; and the server's script calls so far.
struct SpreadWorker {
    _server: RedisServer,
    _prefix: Prefix,
    q: PartitionedQueue<Echo>,
    conn: redis::aio::MultiplexedConnection,
    started: Arc<AtomicUsize>,
    go: tokio::sync::watch::Sender<bool>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    running: Option<tokio::task::JoinHandle<Result<(), Error>>>,
}

impl SpreadWorker {
    async fn open() -> Self {
        let server = RedisServer::start(&[]);
        let prefix = Prefix::on(&server.url());
        let q = PartitionedQueue::<Echo>::builder("share")
            .url(server.url())
            .prefix(&prefix.name)
            .partitions(2)
            .connect()
            .await
            .unwrap();
        let conn = server.connection().await;
        let (go, _) = tokio::sync::watch::channel(false);
        SpreadWorker {
            _server: server,
            _prefix: prefix,
            q,
            conn,
            started: Arc::new(AtomicUsize::new(0)),
            go,
            stop: None,
            running: None,
        }
    }

    fn start(&mut self) {
        let (stop, signal) = shutdown();
        let worker = self
            .q
            .worker()
            .concurrency(4)
            .heartbeat(Duration::from_secs(3600))
            .build(crate::worker::held(
                self.started.clone(),
                self.go.subscribe(),
            ));
        self.stop = Some(stop);
        self.running = Some(tokio::spawn(worker.run_until(signal)));
    }

    async fn calls(&mut self) -> u64 {
        crate::worker::script_calls(&mut self.conn).await
    }

    /// Waits for `n` jobs started and the worker settled.
    async fn started(&self, n: usize) {
        eventually(Duration::from_secs(10), "jobs started", || async {
            (self.started.load(Ordering::SeqCst) == n).then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    async fn stop(mut self) {
        self.go.send_replace(true);
        let _ = self.stop.take().unwrap().send(());
        self.running.take().unwrap().await.unwrap().unwrap();
    }
}

/// A spread claim asks each partition for its share, then asks again only those that
/// gave it in full: jobs in one partition fill the slots, and a partition found empty
/// is not asked twice in one round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spread_claim_asks_again_only_partitions_that_gave_their_share() {
    let mut w = SpreadWorker::open().await;
    w.start();
    crate::worker::waiting_in_blpop(&w.conn).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = w.calls().await;
    w.q.partitions()[0]
        .enqueue_bulk((0..3).map(|n| Echo { n }))
        .await
        .unwrap();
    w.started(3).await;
    let sent = w.calls().await - before;
    // The enqueue; a round of 2 + 0 and 2 more from the full partition (1 came);
    // then a round of 1 + 1 for the free slot, both empty, and the worker waits.
    assert_eq!(sent, 6, "script calls");
    w.stop().await;
}

/// Once the partitions' shares fill every slot, the claim round ends: no partition is
/// asked for nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spread_claim_that_fills_every_slot_asks_no_more() {
    let mut w = SpreadWorker::open().await;
    w.q.enqueue_bulk((0..4).map(|n| Echo { n })).await.unwrap();
    let before = w.calls().await;
    w.start();
    w.started(4).await;
    let sent = w.calls().await - before;
    // Per partition: the heartbeat's first beat, and one claim of two jobs.
    assert_eq!(sent, 4, "script calls");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_that_fills_late_is_not_starved() {
    late_partition_runs_before_the_backlog_drains(1).await;
}

/// With a slot per partition, slots take runs of jobs from one partition (100 ms): a
/// run ends and the late partition gets its turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_that_fills_late_is_not_starved_by_runs_of_jobs() {
    late_partition_runs_before_the_backlog_drains(2).await;
}

async fn late_partition_runs_before_the_backlog_drains(concurrency: usize) {
    let p = Prefix::new();
    let q = open(&p, "late", 2).await;
    // Partition 0 alone has a backlog (ids that name it), so partition 1 is found
    // empty and asked last for a while.
    let backlog: Vec<(Echo, JobOptions)> = (0..200)
        .map(|n| {
            let id = JobId::new(format!("b{n}@0")).unwrap();
            (Echo { n }, JobOptions::new().id(id))
        })
        .collect();
    q.enqueue_bulk_with(backlog).await.unwrap();
    assert_eq!(queued_per_partition(&q).await, vec![200, 0]);
    let (started, handler) = recorder(&q, Duration::from_millis(5));
    let (stop, signal) = shutdown();
    let worker = q.worker().concurrency(concurrency).build(handler);
    let running = tokio::spawn(worker.run_until(signal));
    eventually(Duration::from_secs(10), "the backlog to start", || async {
        (started.lock().unwrap().len() >= 10).then_some(())
    })
    .await;
    let late = q
        .enqueue(Echo { n: 1000 })
        .id(JobId::new("late@1").unwrap())
        .await
        .unwrap();
    let n: u32 = q
        .wait_result(&late.id, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(n, 1000);
    // It ran long before the backlog drained (200 × 5 ms over the slots; a short
    // partition waits at most 50 ms, or a slot's 100 ms run, for its next turn).
    let backlog_left = q.partitions()[0].stats().await.unwrap().queued;
    assert!(
        backlog_left > 50,
        "only {backlog_left} backlog jobs were left"
    );
    let _ = stop.send(());
    running.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_land_on_different_masters_of_a_cluster() {
    let cluster = RedisCluster::start(3);
    let connector = Connector::cluster(cluster.urls()).unwrap();
    let q = PartitionedQueue::<Echo>::builder("speech")
        .connector(connector)
        .partitions(3)
        .dedup(Deduplicator::new(Duration::from_secs(60)))
        .connect()
        .await
        .unwrap();
    let done = q.enqueue_bulk((0..60).map(|n| Echo { n })).await.unwrap();
    let dup = q.enqueue(Echo { n: 5 }).await.unwrap();
    assert_eq!(dup.duplicate_of, Some(done[5].id.clone()));

    // Each partition's keys sit in its tag's slot, on its own master.
    let mut owners = Vec::new();
    for part in q.partitions() {
        let jobs_key = format!("vq:{{{}}}:jobs", part.name());
        let mut owner = None;
        for (i, node) in cluster.nodes.iter().enumerate() {
            let mut conn = redis::Client::open(node.url())
                .unwrap()
                .get_connection()
                .unwrap();
            let slot: u16 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(&jobs_key)
                .query(&mut conn)
                .unwrap();
            let keys: Vec<String> = redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(100)
                .query(&mut conn)
                .unwrap();
            if keys.contains(&jobs_key) {
                owner = Some(i);
            }
        }
        owners.push(owner.unwrap_or_else(|| panic!("{jobs_key} is on no master")));
    }
    let distinct: HashSet<usize> = owners.iter().copied().collect();
    assert_eq!(distinct.len(), 3, "partitions on masters {owners:?}");

    // One worker over all partitions runs every job; the logical queue answers.
    let (stop, signal) = shutdown();
    let worker =
        q.worker()
            .concurrency(4)
            .build(handler_fn(|job: Echo, _ctx: JobContext| async move {
                Ok::<_, JobError>(job.n)
            }));
    let running = tokio::spawn(worker.run_until(signal));
    for (n, e) in done.iter().enumerate() {
        let got: u32 = q.wait_result(&e.id, Duration::from_secs(30)).await.unwrap();
        assert_eq!(got, n as u32);
    }
    // An idle worker on a cluster wakes for a job in any partition.
    for n in 100..103 {
        let late = q.enqueue(Echo { n }).await.unwrap();
        let got: u32 = q
            .wait_result(&late.id, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(got, n);
    }
    let _ = stop.send(());
    running.await.unwrap().unwrap();
    let stats = q.stats().await.unwrap();
    assert_eq!(stats.totals.get("completed"), Some(&63));
    assert_eq!(stats.totals.get("deduplicated"), Some(&1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priorities_hold_within_a_partition() {
    let p = Prefix::new();
    let q = open(&p, "priority", 2).await;
    // Low jobs first, then a high one, all in partition 1 (their ids name it).
    for n in 0..5 {
        q.enqueue(Echo { n })
            .id(JobId::new(format!("low{n}@1")).unwrap())
            .priority(voxqueue::Priority::Low)
            .await
            .unwrap();
    }
    q.enqueue(Echo { n: 99 })
        .id(JobId::new("high@1").unwrap())
        .priority(voxqueue::Priority::High)
        .await
        .unwrap();
    assert_eq!(queued_per_partition(&q).await, vec![0, 6]);
    let started = Arc::new(Mutex::new(Vec::new()));
    let log = started.clone();
    let handler = handler_fn(move |job: Echo, _ctx: JobContext| {
        log.lock().unwrap().push(job.n);
        async move { Ok::<_, JobError>(job.n) }
    });
    let (stop, signal) = shutdown();
    let running = tokio::spawn(q.worker().build(handler).run_until(signal));
    eventually(Duration::from_secs(10), "all jobs run", || async {
        (q.stats().await.unwrap().totals.get("completed") == Some(&6)).then_some(())
    })
    .await;
    let _ = stop.send(());
    running.await.unwrap().unwrap();
    assert_eq!(*started.lock().unwrap(), vec![99, 0, 1, 2, 3, 4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_over_partitions_claims_no_more_jobs_than_it_has_slots() {
    let p = Prefix::new();
    let q = open(&p, "no-overclaim", 2).await;
    // Every job in the second partition: the first is found short, so the claim asks
    // the second again for the slots still free.
    let busy = &q.partitions()[1];
    busy.enqueue_bulk((0..6).map(|n| Echo { n })).await.unwrap();
    let running = Arc::new(Mutex::new(0));
    let (open_tx, go) = tokio::sync::watch::channel(false);
    let r = running.clone();
    let handler = handler_fn(move |job: Echo, _ctx: JobContext| {
        let (r, mut go) = (r.clone(), go.clone());
        async move {
            *r.lock().unwrap() += 1;
            let _ = go.wait_for(|&open| open).await;
            Ok::<_, JobError>(job.n)
        }
    });
    let (stop, signal) = shutdown();
    let worker = tokio::spawn(q.worker().concurrency(4).build(handler).run_until(signal));
    eventually(Duration::from_secs(10), "four jobs running", || async {
        (*running.lock().unwrap() == 4).then_some(())
    })
    .await;
    // Four slots, four jobs claimed: none taken that no slot would run.
    let stats = busy.stats().await.unwrap();
    assert_eq!((stats.active, stats.queued), (4, 2));
    open_tx.send_replace(true);
    eventually(Duration::from_secs(10), "all jobs run", || async {
        (q.stats().await.unwrap().totals.get("completed") == Some(&6)).then_some(())
    })
    .await;
    let _ = stop.send(());
    worker.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_jobs_results_and_waits_span_the_partitions() {
    let p = Prefix::new();
    let q = open(&p, "reads", 2).await;
    assert_eq!(q.name(), "reads");
    // Opening it again with the count it has is no mismatch.
    let again = builder(&p, "reads").partitions(2).connect().await.unwrap();
    assert_eq!(again.partitions().len(), 2);
    // One job in each partition (the ids name them).
    let a = q
        .enqueue(Echo { n: 7 })
        .id(JobId::new("a@0").unwrap())
        .await
        .unwrap();
    let b = q
        .enqueue(Echo { n: 8 })
        .id(JobId::new("b@1").unwrap())
        .await
        .unwrap();
    let (open_tx, go) = tokio::sync::watch::channel(false);
    let handler = handler_fn(move |job: Echo, _ctx: JobContext| {
        let mut go = go.clone();
        async move {
            let _ = go.wait_for(|&open| open).await;
            Ok::<_, JobError>(job.n)
        }
    });
    let (stop, signal) = shutdown();
    let worker = q.worker().id("spanner").concurrency(2).build(handler);
    let running = tokio::spawn(worker.run_until(signal));
    let active = eventually(Duration::from_secs(10), "both jobs running", || async {
        let jobs = q.active_jobs(10).await.unwrap();
        (jobs.len() == 2).then_some(jobs)
    })
    .await;
    let ids: HashSet<JobId> = active.iter().map(|s| s.id.clone()).collect();
    assert_eq!(ids, HashSet::from([a.id.clone(), b.id.clone()]));
    assert!(
        active
            .iter()
            .all(|s| s.state == JobState::Active && s.worker.as_deref() == Some("spanner")),
        "{active:?}"
    );
    assert_eq!(q.active_jobs(1).await.unwrap().len(), 1);
    open_tx.send_replace(true);
    for (e, n) in [(&a, b"7"), (&b, b"8")] {
        let status = q.wait(&e.id, Duration::from_secs(10)).await.unwrap();
        assert_eq!((&status.id, status.state), (&e.id, JobState::Completed));
        // The result as the worker stored it: the handler's output as JSON.
        assert_eq!(q.result_bytes(&e.id).await.unwrap(), Some(n.to_vec()));
    }
    let missing = JobId::new("never-enqueued").unwrap();
    assert_eq!(q.result_bytes(&missing).await.unwrap(), None);
    assert!(q.active_jobs(10).await.unwrap().is_empty());
    let _ = stop.send(());
    running.await.unwrap().unwrap();
}

/// Runs a worker that fails every job for good until `dead` jobs are dead.
async fn bury(q: &PartitionedQueue<Echo>, dead: u64) {
    let (stop, signal) = shutdown();
    let worker = q
        .worker()
        .build(handler_fn(|_job: Echo, _ctx: JobContext| async move {
            Err::<u32, _>(JobError::Permanent("no".into()))
        }));
    let running = tokio::spawn(worker.run_until(signal));
    let dl = q.dead_letter();
    eventually(Duration::from_secs(10), "jobs dead", || async {
        (dl.count().await.unwrap() == dead).then_some(())
    })
    .await;
    let _ = stop.send(());
    running.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_of_all_partitions_are_requeued_and_purged_with_exact_counts() {
    let p = Prefix::new();
    let q = open(&p, "graves", 3).await;
    let id = |s: &str| JobId::new(s).unwrap();
    // Eight jobs that die at once: d<i> in partition i mod 3.
    let jobs = (0..8).map(|i| {
        let options = JobOptions::new()
            .id(id(&format!("d{i}@{}", i % 3)))
            .max_attempts(1);
        (Echo { n: i }, options)
    });
    q.enqueue_bulk_with(jobs).await.unwrap();
    bury(&q, 8).await;
    let dl = q.dead_letter();
    assert!(!dl.requeue(&id("ghost")).await.unwrap());
    assert!(dl.requeue(&id("d0@0")).await.unwrap());
    assert!(!dl.requeue(&id("d0@0")).await.unwrap(), "queued, not dead");
    let in_partition_1 = |s: &voxqueue::JobStatus| s.id.as_str().ends_with("@1");
    assert_eq!(dl.requeue_where(in_partition_1).await.unwrap(), 3);
    // d3 (partition 0) and d2 (partition 2) died an hour ago.
    let hour_ago = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        - 3_600_000;
    let mut conn = crate::common::connection().await;
    for (job, part) in [("d3@0", 0), ("d2@2", 2)] {
        let dead = format!("{}:{{{}}}:dead", p.name, q.partitions()[part].name());
        let _: () = redis::cmd("ZADD")
            .arg(dead)
            .arg("XX")
            .arg(hour_ago)
            .arg(job)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    assert_eq!(
        dl.purge_older_than(Duration::from_secs(1800))
            .await
            .unwrap(),
        2
    );
    // Left: d6 (partition 0) and d5 (partition 2).
    assert_eq!(dl.requeue_all().await.unwrap(), 2);
    assert_eq!(dl.count().await.unwrap(), 0);
    // The six requeued jobs die again, and go for good.
    bury(&q, 6).await;
    assert_eq!(dl.purge_all().await.unwrap(), 6);
    assert_eq!(dl.count().await.unwrap(), 0);
    assert!(matches!(
        q.status(&id("d5@2")).await,
        Err(Error::NotFound(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_learns_how_many_events_it_missed_in_every_partition() {
    let p = Prefix::new();
    let q = open(&p, "slow", 2).await;
    let mut slow = q.events().await.unwrap();
    let mut reading = q.events().await.unwrap();
    // 4100 queued events in each partition: a subscriber keeps the last 4096 of each.
    q.enqueue_bulk((0..8200).map(|n| Echo { n })).await.unwrap();
    // Once another subscriber has seen (or skipped) every event, all were delivered.
    let mut seen = 0;
    while seen + reading.missed() < 8200 {
        within("an event", reading.recv()).await.unwrap();
        seen += 1;
    }
    let mut seen = 0;
    while seen + slow.missed() < 8200 {
        within("an event", slow.recv()).await.unwrap();
        seen += 1;
    }
    assert_eq!(slow.missed(), 8, "4 in each partition");
    assert_eq!(seen, 8192);
}
