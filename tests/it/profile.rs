//! The throughput profile: a queue without step events still tells waiters and
//! listeners every outcome.

use std::time::Duration;

use voxqueue::{EventKind, JobContext, JobError, Worker, handler_fn};

use crate::common::{Prefix, shutdown};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_step_events_only_outcomes_reach_the_stream() {
    let p = Prefix::new();
    let q = p
        .builder::<u32>("no-steps")
        .step_events(false)
        .connect()
        .await
        .unwrap();
    let mut events = q.events().await.unwrap();
    let job = q.enqueue(7).await.unwrap();
    let (stop, signal) = shutdown();
    let worker =
        Worker::builder(q.clone()).build(handler_fn(|n: u32, _ctx: JobContext| async move {
            Ok::<_, JobError>(n)
        }));
    let running = tokio::spawn(worker.run_until(signal));
    assert_eq!(
        q.wait_result::<u32>(&job.id, Duration::from_secs(10))
            .await
            .unwrap(),
        7
    );
    let first = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.kind, EventKind::Completed);
    assert_eq!(first.job_id, job.id);
    let _ = stop.send(());
    running.await.unwrap().unwrap();
}
