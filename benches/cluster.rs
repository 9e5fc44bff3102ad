//! One logical queue on a Redis Cluster with P = 1 and P = 3 partitions, in the same
//! run on the same cluster: the figures of issue #9's scale-out part. Runs only with
//! `VOXQUEUE_CLUSTER` set to the nodes' URLs (comma-separated); `scripts/bench-cluster`
//! starts a private 3-master cluster and prints the ratio.

use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group};
use serde::{Deserialize, Serialize};
use voxqueue::{Connector, JobContext, JobError, PartitionedQueue, handler_fn};

criterion_group!(cluster_figures, figures);

#[derive(Serialize, Deserialize)]
struct Job {
    text: String,
}

/// A ~200 B JSON job, as the single-node figures use.
fn job200() -> Job {
    Job {
        text: "The quick brown fox jumps over the lazy dog; ".repeat(4)
            + "pack my box with five dozen jugs.",
    }
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn figures(_c: &mut Criterion) {
    let Ok(nodes) = std::env::var("VOXQUEUE_CLUSTER") else {
        return;
    };
    let nodes: Vec<String> = nodes.split(',').map(str::to_owned).collect();
    let jobs = env("VOXQUEUE_CLUSTER_JOBS", 30_000);
    let workers = env("VOXQUEUE_CLUSTER_WORKERS", 4);
    let concurrency = env("VOXQUEUE_CLUSTER_CONCURRENCY", 50);
    let rounds = env("VOXQUEUE_CLUSTER_ROUNDS", 3);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        // Alternate P = 1 and P = 3, so a change in the machine's load hits both.
        for round in 0..rounds {
            for (slot, p) in [(0, 1u32), (1, 3u32)] {
                let name = format!("bench-p{p}-r{round}-{}", std::process::id());
                let (rate, cpu, redis) =
                    drain_rate(&nodes, &name, p, jobs, workers, concurrency).await;
                let per_job = |d: Duration| d.as_secs_f64() * 1e6 / jobs as f64;
                let redis_total: Duration = redis.iter().sum();
                println!(
                    "ROUND {round} p={p} {rate:.0} jobs/s; CPU per job: client {:.1} us, \
                     Redis {:.1} us (nodes {:?} us)",
                    per_job(cpu),
                    per_job(redis_total),
                    redis
                        .iter()
                        .map(|&d| per_job(d).round())
                        .collect::<Vec<_>>()
                );
                rates[slot].push(rate);
            }
        }
        for (slot, p) in [(0, 1), (1, 3)] {
            let mut r = rates[slot].clone();
            r.sort_by(f64::total_cmp);
            println!("FIGURE cluster-p{p} {:.3} jobs/s", r[r.len() / 2]);
        }
    });
}

/// `jobs` pre-filled no-op jobs (step events off: the throughput profile) through
/// `workers` workers over all partitions, each with its own connections: jobs per
/// second from the workers' start until the last job completed, and the CPU time the
/// client and each Redis node spent over that span.
async fn drain_rate(
    nodes: &[String],
    name: &str,
    partitions: u32,
    jobs: usize,
    workers: usize,
    concurrency: usize,
) -> (f64, Duration, Vec<Duration>) {
    let open = || async {
        PartitionedQueue::<Job>::builder(name)
            .connector(Connector::cluster(nodes).expect("cluster URLs"))
            .partitions(partitions)
            .step_events(false)
            .connect()
            .await
            .expect("cluster for benches")
    };
    let q = open().await;
    let batch: Vec<Job> = (0..jobs).map(|_| job200()).collect();
    q.enqueue_bulk(batch).await.unwrap();
    let mut handles = Vec::new();
    for _ in 0..workers {
        handles.push(open().await);
    }
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let start = Instant::now();
    let cpu = process_cpu();
    let redis = nodes_cpu(nodes);
    let mut running = Vec::new();
    for h in handles {
        let handler =
            handler_fn(|j: Job, _ctx: JobContext| async move { Ok::<_, JobError>(j.text.len()) });
        let worker = h.worker().concurrency(concurrency).build(handler);
        let mut stopped = stopped.clone();
        running.push(tokio::spawn(worker.run_until(async move {
            let _ = stopped.wait_for(|s| *s).await;
        })));
    }
    loop {
        let done = q.stats().await.unwrap();
        if done.totals.get("completed").copied().unwrap_or(0) >= jobs as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = jobs as f64 / start.elapsed().as_secs_f64();
    let cpu = process_cpu() - cpu;
    let redis = nodes_cpu(nodes)
        .into_iter()
        .zip(redis)
        .map(|(after, before)| after.saturating_sub(before))
        .collect();
    let _ = stop.send(true);
    for r in running {
        r.await.unwrap().unwrap();
    }
    (rate, cpu, redis)
}

/// The CPU time (user + system) each node has used, from `INFO cpu`.
fn nodes_cpu(nodes: &[String]) -> Vec<Duration> {
    nodes
        .iter()
        .map(|url| {
            let info: String = redis::Client::open(url.as_str())
                .and_then(|c| c.get_connection())
                .and_then(|mut c| redis::cmd("INFO").arg("cpu").query(&mut c))
                .unwrap_or_default();
            let secs: f64 = info
                .lines()
                .filter_map(|l| {
                    let (k, v) = l.trim().split_once(':')?;
                    matches!(k, "used_cpu_sys" | "used_cpu_user").then(|| v.parse::<f64>().ok())?
                })
                .sum();
            Duration::from_secs_f64(secs)
        })
        .collect()
}

/// This process's CPU time (user + system), from `/proc/self/stat` (zero elsewhere).
fn process_cpu() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return Duration::ZERO;
    };
    // Fields after the command name (which may hold spaces, hence the last ')').
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the line: the 12th and 13th after the name.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}
