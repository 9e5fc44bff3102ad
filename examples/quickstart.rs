//! Run with: `cargo run --example quickstart` (needs a Redis on 127.0.0.1:6379, or set
//! `REDIS_URL`).
//!
//! The core queue on its own: a producer enqueues jobs with priorities and a delay, a
//! worker in the same process runs them, and the producer waits for each result.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use voxqueue::{Error, JobContext, JobError, Priority, Queue, RetryPolicy, Worker, handler_fn};

#[derive(Debug, Serialize, Deserialize)]
struct Resize {
    image: String,
    width: u32,
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        .init();
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let queue = Queue::<Resize>::builder("quickstart")
        .url(url)
        .connect()
        .await?;

    let handler = handler_fn(|job: Resize, ctx: JobContext| async move {
        ctx.progress(50.0).await.map_err(JobError::transient)?;
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok::<_, JobError>(format!(
            "{} resized to {} px (attempt {})",
            job.image,
            job.width,
            ctx.attempt()
        ))
    });
    let worker = Worker::builder(queue.clone())
        .concurrency(2)
        .retry(
            RetryPolicy::exponential(Duration::from_millis(200))
                .max_attempts(3)
                .jitter(0.2),
        )
        .timeout(Duration::from_secs(30))
        .build(handler);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(worker.run_until(async {
        let _ = stopped.await;
    }));

    let low = queue
        .enqueue(Resize {
            image: "archive.png".into(),
            width: 64,
        })
        .priority(Priority::Low)
        .await?;
    let high = queue
        .enqueue(Resize {
            image: "avatar.png".into(),
            width: 128,
        })
        .priority(Priority::High)
        .await?;
    let later = queue
        .enqueue(Resize {
            image: "banner.png".into(),
            width: 1024,
        })
        .delay(Duration::from_millis(300))
        .await?;
    for job in [high, low, later] {
        let result: String = queue.wait_result(&job.id, Duration::from_secs(10)).await?;
        tracing::info!(job = %job.id, %result, "done");
    }
    tracing::info!(stats = ?queue.stats().await?, "queue");

    let _ = stop.send(());
    running.await.expect("worker task")
}
