//! Bounded memory: jobs through every ending (completed, failed into the dead letters,
//! cancelled, expired, deduplicated, rate-limited) with short retentions leave, once every
//! retention has passed, only the capped dead letters and the capped event stream behind.
//! (`used_memory` is not compared: the test Redis is shared with other tests.) A worker
//! that stops unregisters; a killed one is forgotten, with its breaker state, by the
//! others' heartbeats once it has been silent for `forget_silent_after` (5 min by default;
//! the last test shortens it).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use voxqueue::{
    CancelOutcome, Deduplicator, Error, JobError, JobState, Queue, RateLimit, Worker, handler_fn,
};

use crate::common::{Prefix, eventually, shutdown};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Task {
    n: u32,
    fail: bool,
}

/// Jobs per ending.
const N: u32 = 30;
/// Long enough to check each round's endings before they are swept.
const RETENTION: Duration = Duration::from_millis(1000);
const EVENTS_MAX: u64 = 40;
const DEAD_CAP: u64 = 3;

/// Every key under the prefix with its size (entries for hashes, zsets, streams, lists).
async fn footprint(
    conn: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
) -> BTreeMap<String, u64> {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(conn)
        .await
        .unwrap();
    let mut out = BTreeMap::new();
    for key in keys {
        let kind: String = redis::cmd("TYPE")
            .arg(&key)
            .query_async(conn)
            .await
            .unwrap();
        let size_cmd = match kind.as_str() {
            "hash" => "HLEN",
            "zset" => "ZCARD",
            "stream" => "XLEN",
            "list" => "LLEN",
            "set" => "SCARD",
            _ => "STRLEN",
        };
        let size: u64 = redis::cmd(size_cmd)
            .arg(&key)
            .query_async(conn)
            .await
            .unwrap();
        let short = key.rsplit(':').next().unwrap_or_default().to_owned();
        out.insert(short, size);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_ending_leaves_only_capped_traces_after_its_retention() {
    let p = Prefix::new();
    let q: Queue<Task> = p
        .builder("mem")
        .result_ttl(RETENTION)
        .events_max(EVENTS_MAX)
        .dead_letter_cap(DEAD_CAP)
        .dedup(Deduplicator::new(RETENTION))
        .connect()
        .await
        .unwrap();
    let mut conn = crate::common::connection().await;
    let before = footprint(&mut conn, &p.name).await;

    let worker = Worker::builder(q.clone())
        .heartbeat(Duration::from_millis(100))
        .shutdown_grace(Duration::from_millis(100))
        .build(handler_fn(|t: Task, _ctx| async move {
            if t.fail {
                Err(JobError::permanent("asked to fail"))
            } else {
                Ok::<_, JobError>(t.n)
            }
        }));
    let (stop, stopped) = shutdown();
    let running = tokio::spawn(worker.run_until(stopped));

    let mut limited = 0;
    for n in 0..N {
        let mut ids = Vec::new();
        // Completed, and a duplicate of it answered by the same job.
        let done = q.enqueue(Task { n, fail: false }).await.unwrap();
        let again = q.enqueue(Task { n, fail: false }).await.unwrap();
        assert_eq!(again.id, done.id);
        ids.push((done.id, JobState::Completed));
        // Failed for good: into the dead letters.
        let failed = q
            .enqueue(Task {
                n: N + n,
                fail: true,
            })
            .await
            .unwrap();
        ids.push((failed.id, JobState::Dead));
        // Cancelled while it waits.
        let waiting = q
            .enqueue(Task {
                n: 2 * N + n,
                fail: false,
            })
            .delay(Duration::from_secs(3600))
            .await
            .unwrap();
        assert_eq!(
            q.cancel(&waiting.id).await.unwrap(),
            CancelOutcome::Cancelled
        );
        ids.push((waiting.id, JobState::Cancelled));
        // Expired: its time to live runs out before it may start.
        let late = q
            .enqueue(Task {
                n: 3 * N + n,
                fail: false,
            })
            .delay(Duration::from_millis(100))
            .ttl(Duration::from_millis(50))
            .await
            .unwrap();
        ids.push((late.id, JobState::Expired));
        // Rate-limited: one per period per key; the second is refused.
        let limit = RateLimit::new(format!("k{n}"), 1, RETENTION).unwrap();
        let first = q
            .enqueue(Task {
                n: 4 * N + n,
                fail: false,
            })
            .rate_limit(limit.clone())
            .await
            .unwrap();
        ids.push((first.id, JobState::Completed));
        match q
            .enqueue(Task {
                n: 5 * N + n,
                fail: false,
            })
            .rate_limit(limit)
            .await
        {
            Err(Error::RateLimited { .. }) => limited += 1,
            other => panic!("expected a rate-limit refusal, got {other:?}"),
        }
        // Each round's endings, checked before the dead-letter cap or a retention
        // removes them.
        for (id, want) in &ids {
            let got = eventually(Duration::from_secs(10), "every job ends", || async {
                let s = q.status(id).await.ok()?;
                s.state.is_terminal().then_some(s.state)
            })
            .await;
            assert_eq!(got, *want, "{id}");
        }
    }
    assert_eq!(limited, N);
    // Every retention passes; live workers' claims and heartbeats sweep.
    let after = eventually(Duration::from_secs(30), "the sweeps catch up", || async {
        let now = footprint(&mut conn.clone(), &p.name).await;
        // `results` and `dedup` keep one field that is no entry (see HASH_KEEPER in
        // common.lua).
        let settled = ["finished", "dedup_exp", "limits", "limits_exp"]
            .iter()
            .all(|k| !now.contains_key(*k))
            && ["results", "dedup"].iter().all(|k| now.get(*k) == Some(&1))
            && now.get("jobs") == Some(&DEAD_CAP);
        settled.then_some(now)
    })
    .await;
    let _ = stop.send(());
    running.await.unwrap().unwrap();
    let stopped = footprint(&mut conn, &p.name).await;

    eprintln!("before {before:?}\nafter {after:?}\nstopped {stopped:?}");
    // What is left: the capped dead letters (one entry each), the capped event
    // stream, the counters, the sequence, the keepers of `results` and `dedup`, and
    // the live worker (gone once it stops).
    assert_eq!(after.get("dead"), Some(&DEAD_CAP));
    assert_eq!(
        after.get("payloads"),
        None,
        "payloads live in the job entries"
    );
    // `XADD MAXLEN ~` trims whole stream nodes (100 entries each) only.
    let events = after.get("events").copied().unwrap_or_default();
    assert!(events <= EVENTS_MAX + 100, "{events} events kept");
    // Lifetime counters and the 60-slot per-minute ring, whatever the job count.
    let stats = after.get("stats").copied().unwrap_or_default();
    assert!(stats <= 80, "{stats} stats fields");
    assert!(!stopped.contains_key("workers"), "{stopped:?}");
    // `active` keeps one member that is not a job (see ACTIVE_KEEPER in common.lua).
    assert_eq!(stopped.get("active"), Some(&1), "{stopped:?}");
    let keys: Vec<&str> = stopped.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "active", "dead", "dedup", "events", "jobs", "results", "seq", "stats"
        ]
    );
    assert!(before.keys().all(|k| stopped.contains_key(k)), "{before:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_is_forgotten_with_its_breaker_after_its_silence() {
    let p = Prefix::new();
    let q: Queue<Task> = p.queue("forget").await;
    let workers = format!("{}:{{forget}}:workers", p.name);
    let breakers = format!("{}:{{forget}}:breakers", p.name);
    let mut conn = crate::common::connection().await;
    let probe = conn.clone();
    let registered = |id: &'static str| {
        let mut conn = probe.clone();
        let workers = workers.clone();
        async move {
            let score: Option<f64> = redis::cmd("ZSCORE")
                .arg(&workers)
                .arg(id)
                .query_async(&mut conn)
                .await
                .unwrap();
            score.is_some()
        }
    };

    // A worker that is killed: its task is dropped, so it never unregisters.
    let doomed = Worker::builder(q.clone())
        .id("doomed")
        .heartbeat(Duration::from_millis(100))
        .build(handler_fn(
            |t: Task, _ctx| async move { Ok::<_, JobError>(t.n) },
        ));
    let (_keep, never) = shutdown();
    let killed = tokio::spawn(doomed.run_until(never));
    eventually(
        Duration::from_secs(10),
        "the doomed worker registered",
        || {
            let check = registered("doomed");
            async move { check.await.then_some(()) }
        },
    )
    .await;
    killed.abort();
    let _ = killed.await;
    // Its breaker state, as an open breaker would have left it.
    let _: () = redis::cmd("HSET")
        .arg(&breakers)
        .arg("doomed")
        .arg("open")
        .query_async(&mut conn)
        .await
        .unwrap();

    let survivor = Worker::builder(q.clone())
        .id("survivor")
        .heartbeat(Duration::from_millis(100))
        .forget_silent_after(Duration::from_millis(800))
        .build(handler_fn(
            |t: Task, _ctx| async move { Ok::<_, JobError>(t.n) },
        ));
    let (stop, stopped) = shutdown();
    let running = tokio::spawn(survivor.run_until(stopped));
    eventually(
        Duration::from_secs(10),
        "the killed worker forgotten",
        || {
            let mut conn = conn.clone();
            let breakers = breakers.clone();
            let gone = registered("doomed");
            async move {
                let breaker: bool = redis::cmd("HEXISTS")
                    .arg(&breakers)
                    .arg("doomed")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                (!gone.await && !breaker).then_some(())
            }
        },
    )
    .await;
    assert!(registered("survivor").await, "the live worker stays");
    stop.send(()).unwrap();
    running.await.unwrap().unwrap();
    assert!(
        !registered("survivor").await,
        "a stopped worker unregisters"
    );
}
