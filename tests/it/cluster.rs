//! Redis Cluster: queues in different slots, one worker over several of them, dedup,
//! events and stats, all through the same scripts.

use std::time::Duration;

use voxqueue::{Connector, Deduplicator, JobContext, JobError, Queue, Worker, handler_fn};

use crate::common::{RedisCluster, eventually, shutdown};
use crate::queue::Echo;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_on_a_cluster_run_jobs_across_slots() {
    let cluster = RedisCluster::start(3);
    let connector = Connector::cluster(cluster.urls()).unwrap();
    // Hash slots of the queues' tags (CRC16 of the name, worked out by hand): the
    // three masters own 0-5460, 5461-10922 and 10923-16383, so each holds a queue.
    let names = ["alpha", "bravo", "echo", "charlie"];
    let slots: [u16; 4] = [865, 8623, 14438, 1769];
    let owners: [usize; 4] = [0, 1, 2, 0];
    let mut queues = Vec::new();
    for name in names {
        queues.push(
            Queue::<Echo>::builder(name)
                .connector(connector.clone())
                .dedup(Deduplicator::new(Duration::from_secs(60)))
                .connect()
                .await
                .unwrap(),
        );
    }
    let mut jobs = Vec::new();
    for (i, q) in queues.iter().enumerate() {
        jobs.extend(
            q.enqueue_bulk((0..25).map(|n| Echo {
                n: i as u32 * 100 + n,
            }))
            .await
            .unwrap()
            .into_iter()
            .map(|e| (i, e.id)),
        );
        // A duplicate in the same slot attaches to the first job.
        let first = jobs[i * 25].1.clone();
        let dup = q.enqueue(Echo { n: i as u32 * 100 }).await.unwrap();
        assert_eq!(dup.duplicate_of, Some(first));
    }
    // Every key of a queue lives in its tag's slot, on the master that owns the slot.
    for (i, name) in names.iter().enumerate() {
        let port = cluster.nodes[owners[i]].port;
        let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .unwrap()
            .get_connection()
            .unwrap();
        for key in ["jobs", "ready:normal", "events", "stats", "dedup"] {
            let slot: u16 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(format!("vq:{{{name}}}:{key}"))
                .query(&mut conn)
                .unwrap();
            assert_eq!(slot, slots[i], "{name} {key}");
        }
        let keys: Vec<String> = redis::cmd("CLUSTER")
            .arg("GETKEYSINSLOT")
            .arg(slots[i])
            .arg(100)
            .query(&mut conn)
            .unwrap();
        assert!(
            keys.contains(&format!("vq:{{{name}}}:jobs")),
            "{name} is not on node {}: {keys:?}",
            owners[i]
        );
        // The scripts run as functions: every master was given the library.
        let libraries: Vec<redis::Value> =
            redis::cmd("FUNCTION").arg("LIST").query(&mut conn).unwrap();
        assert_eq!(libraries.len(), 1, "node {}: {libraries:?}", owners[i]);
    }
    let handler = handler_fn(|job: Echo, _ctx: JobContext| async move { Ok::<_, JobError>(job.n) });
    let mut builder = Worker::builder(queues[0].clone()).concurrency(4);
    for q in &queues[1..] {
        builder = builder.queue(q.clone());
    }
    let (stop, signal) = shutdown();
    let running = tokio::spawn(builder.build(handler).run_until(signal));
    for (i, id) in &jobs {
        let n: u32 = queues[*i]
            .wait_result(id, Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(n / 100, *i as u32);
    }
    // An idle worker blocked on a cluster still wakes for a new job.
    let late = queues[3].enqueue(Echo { n: 399 }).await.unwrap();
    assert_eq!(
        queues[3]
            .wait_result::<u32>(&late.id, Duration::from_secs(10))
            .await
            .unwrap(),
        399
    );
    // Idle again, it blocks in Redis (no polling) on every queue: one BLPOP on each
    // queue's master, since one BLPOP cannot span the slots.
    for (node, wanted) in [(0, 2), (1, 1), (2, 1)] {
        let port = cluster.nodes[node].port;
        eventually(
            Duration::from_secs(10),
            "the idle worker blocked on every queue",
            || async move {
                let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}"))
                    .ok()?
                    .get_multiplexed_async_connection()
                    .await
                    .ok()?;
                let clients: String = redis::cmd("CLIENT")
                    .arg("LIST")
                    .query_async(&mut conn)
                    .await
                    .ok()?;
                let blocked = clients
                    .lines()
                    .filter(|l| l.contains(" flags=b ") && l.contains(" cmd=blpop "))
                    .count();
                (blocked == wanted).then_some(())
            },
        )
        .await;
    }
    let _ = stop.send(());
    running.await.unwrap().unwrap();
    for (i, q) in queues.iter().enumerate() {
        let stats = q.stats().await.unwrap();
        assert_eq!((stats.queued, stats.active, stats.dead), (0, 0, 0));
        let late = u64::from(i == 3);
        assert_eq!(
            stats.totals.get("enqueued"),
            Some(&(25 + late)),
            "{}",
            names[i]
        );
        assert_eq!(
            stats.totals.get("completed"),
            Some(&(25 + late)),
            "{}",
            names[i]
        );
        assert_eq!(stats.totals.get("deduplicated"), Some(&1), "{}", names[i]);
    }
}
