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
