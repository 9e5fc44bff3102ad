//! The queue's round trips: enqueue (one and bulk) and jobs through a worker.

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use serde::{Deserialize, Serialize};
use tokio::runtime::Runtime;
use voxqueue::{JobContext, JobError, Queue, Worker, handler_fn};

#[derive(Serialize, Deserialize)]
struct Job {
    text: String,
}

fn url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A fresh prefix per bench, deleted afterwards.
fn prefix() -> String {
    format!("vqbench-{}", std::process::id())
}

fn cleanup(prefix: &str) {
    if let Ok(mut conn) = redis::Client::open(url()).and_then(|c| c.get_connection()) {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}:*"))
            .query(&mut conn)
            .unwrap_or_default();
        for key in keys {
            let _: Result<i64, _> = redis::cmd("DEL").arg(key).query(&mut conn);
        }
    }
}

async fn queue(name: &str) -> Queue<Job> {
    Queue::builder(name)
        .url(url())
        .prefix(prefix())
        .connect()
        .await
        .expect("Redis for benches")
}

fn job() -> Job {
    Job {
        text: "The quick brown fox jumps over the lazy dog.".into(),
    }
}

fn enqueue(c: &mut Criterion) {
    let rt = Runtime::new().unwrap();
    let q = rt.block_on(queue("enqueue"));
    let mut g = c.benchmark_group("enqueue/redis-local");
    g.throughput(Throughput::Elements(1));
    g.bench_function("one", |b| {
        b.to_async(&rt)
            .iter(|| async { q.enqueue(job()).await.unwrap() })
    });
    g.throughput(Throughput::Elements(500));
    g.bench_function("bulk-500", |b| {
        b.to_async(&rt)
            .iter(|| async { q.enqueue_bulk((0..500).map(|_| job())).await.unwrap() })
    });
    g.finish();
    cleanup(&prefix());
}

/// Jobs per second from enqueue to completion through one worker, by concurrency.
fn through_worker(c: &mut Criterion) {
    let rt = Runtime::new().unwrap();
    let mut g = c.benchmark_group("worker/redis-local");
    g.sample_size(10);
    const JOBS: u64 = 2000;
    g.throughput(Throughput::Elements(JOBS));
    for concurrency in [1usize, 8, 32] {
        g.bench_with_input(
            BenchmarkId::new("noop-jobs", concurrency),
            &concurrency,
            |b, &n| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let q = queue(&format!("through-{n}")).await;
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            let ids = q.enqueue_bulk((0..JOBS).map(|_| job())).await.unwrap();
                            let last = ids.last().unwrap().id.clone();
                            let handler = handler_fn(|j: Job, _ctx: JobContext| async move {
                                Ok::<_, JobError>(j.text.len())
                            });
                            let worker = Worker::builder(q.clone()).concurrency(n).build(handler);
                            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
                            let start = Instant::now();
                            let running = tokio::spawn(worker.run_until(async {
                                let _ = stopped.await;
                            }));
                            // FIFO: when the last is done, all are.
                            q.wait(&last, Duration::from_secs(120)).await.unwrap();
                            total += start.elapsed();
                            let _ = stop.send(());
                            running.await.unwrap().unwrap();
                        }
                        total
                    })
                })
            },
        );
    }
    g.finish();
    cleanup(&prefix());
}

criterion_group!(benches, enqueue, through_worker);
criterion_group!(queue_figures, figures);

/// The figures of issue #8, printed as `FIGURE <name> <value> <unit>` lines for
/// `scripts/bench-queue`, which measures Redis's own LPUSH rate against the same server
/// right before and prints the ratios. Runs only with `VOXQUEUE_FIGURES=1` (it is not
/// a criterion measurement: each figure is one timed run of a fixed size).
fn figures(_c: &mut Criterion) {
    // `VOXQUEUE_FIGURES=1` runs all; a comma-separated list of names runs those.
    let Ok(wanted) = std::env::var("VOXQUEUE_FIGURES") else {
        return;
    };
    let on = |name: &str| wanted == "1" || wanted.split(',').any(|w| name.starts_with(w));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        if on("enqueue-bulk") {
            figure("enqueue-bulk", bulk_enqueue_rate().await, "jobs/s");
        }
        if on("enqueue-one") {
            figure("enqueue-one", one_by_one_enqueue_rate().await, "jobs/s");
        }
        for concurrency in [1usize, 50] {
            let name = format!("noop-c{concurrency}");
            if on(&name) {
                figure(&name, end_to_end_rate(concurrency, true).await, "jobs/s");
            }
        }
        // The documented throughput profile for bulk work: step events off.
        if on("profile-c100") {
            figure("profile-c100", end_to_end_rate(100, false).await, "jobs/s");
        }
        if on("pickup") {
            let (p50, p99) = idle_pickup().await;
            figure("pickup-p50", p50, "ms");
            figure("pickup-p99", p99, "ms");
        }
        if on("memory") {
            let (per_job, payload) = memory_per_job().await;
            figure("memory-per-job", per_job, "B");
            figure("memory-beyond-payload", per_job - payload, "B");
        }
    });
    cleanup(&prefix());
}

fn figure(name: &str, value: f64, unit: &str) {
    println!("FIGURE {name} {value:.3} {unit}");
}

/// A ~200 B JSON job, as the figures use.
fn job200() -> Job {
    Job {
        text: "The quick brown fox jumps over the lazy dog; ".repeat(4)
            + "pack my box with five dozen jugs.",
    }
}

/// Jobs pre-filled for the throughput figures: 20 000, or `VOXQUEUE_FIGURES_JOBS` (a
/// smaller run under `valgrind --tool=callgrind` on the server, which counts Redis's
/// instructions per job whatever else the machine does).
fn prefill() -> usize {
    std::env::var("VOXQUEUE_FIGURES_JOBS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(20_000)
}

async fn bulk_enqueue_rate() -> f64 {
    let q = queue("fig-bulk").await;
    let start = Instant::now();
    let n = prefill();
    q.enqueue_bulk((0..n).map(|_| job200())).await.unwrap();
    n as f64 / start.elapsed().as_secs_f64()
}

async fn one_by_one_enqueue_rate() -> f64 {
    let q = queue("fig-one").await;
    const N: usize = 5_000;
    let start = Instant::now();
    for _ in 0..N {
        q.enqueue(job200()).await.unwrap();
    }
    N as f64 / start.elapsed().as_secs_f64()
}

/// 20 000 pre-filled no-op jobs through one worker at `concurrency`: jobs per second
/// from the worker's start until the last one completed.
async fn end_to_end_rate(concurrency: usize, step_events: bool) -> f64 {
    let q = Queue::builder(format!("fig-noop-{concurrency}-{step_events}"))
        .url(url())
        .prefix(prefix())
        .step_events(step_events)
        .connect()
        .await
        .expect("Redis for benches");
    let n = prefill();
    q.enqueue_bulk((0..n).map(|_| job200())).await.unwrap();
    let handler =
        handler_fn(|j: Job, _ctx: JobContext| async move { Ok::<_, JobError>(j.text.len()) });
    let worker = Worker::builder(q.clone())
        .concurrency(concurrency)
        .build(handler);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let start = Instant::now();
    let running = tokio::spawn(worker.run_until(async {
        let _ = stopped.await;
    }));
    // One HGET of the completed counter per poll, not `stats()` (a dozen reads): the
    // polls are the bench's own load on Redis, not the queue's.
    let mut conn = redis::Client::open(url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let counter = format!("{}:{{{}}}:stats", prefix(), q.name());
    loop {
        // A poll that times out behind a long batch (under callgrind) just polls again.
        let done: Option<u64> = redis::cmd("HGET")
            .arg(&counter)
            .arg("completed")
            .query_async(&mut conn)
            .await
            .ok()
            .flatten();
        if done.unwrap_or(0) >= n as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    let _ = stop.send(());
    running.await.unwrap().unwrap();
    rate
}

/// Enqueue → handler start, one job at a time to an idle worker: p50 and p99 in ms.
async fn idle_pickup() -> (f64, f64) {
    let q = queue("fig-pickup").await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let handler = handler_fn(move |_j: Job, _ctx: JobContext| {
        let _ = tx.send(Instant::now());
        async move { Ok::<_, JobError>(0u8) }
    });
    let worker = Worker::builder(q.clone()).build(handler);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(worker.run_until(async {
        let _ = stopped.await;
    }));
    let mut samples = Vec::new();
    for i in 0..400 {
        // Let the worker finish the last job and block again: an idle pickup.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let sent = Instant::now();
        q.enqueue(job200()).await.unwrap();
        let started = rx.recv().await.unwrap();
        if i >= 20 {
            samples.push(started.duration_since(sent).as_secs_f64() * 1000.0);
        }
    }
    let _ = stop.send(());
    running.await.unwrap().unwrap();
    samples.sort_by(f64::total_cmp);
    let at = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
    (at(0.5), at(0.99))
}

/// Redis memory per queued job (100 000 queued, `INFO memory`), and the payload size.
async fn memory_per_job() -> (f64, f64) {
    let q = queue("fig-memory").await;
    let client = redis::Client::open(url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let used = |info: String| -> f64 {
        info.lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap()
    };
    // Warm the queue's keys (and the script cache) so their fixed cost is not counted.
    q.enqueue(job200()).await.unwrap();
    let before: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut conn)
        .await
        .unwrap();
    const N: usize = 100_000;
    q.enqueue_bulk((0..N).map(|_| job200())).await.unwrap();
    let after: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut conn)
        .await
        .unwrap();
    let payload = serde_json::to_vec(&job200()).unwrap().len() as f64;
    ((used(after) - used(before)) / N as f64, payload)
}
