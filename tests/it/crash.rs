//! A real crash: a worker *process* is killed with SIGKILL mid-batch; another worker
//! finishes every job and none is lost or left active.

use std::process::{Command, Stdio};
use std::time::Duration;

use voxqueue::{JobContext, JobError, JobState, Worker, handler_fn};

use crate::common::{Prefix, eventually, redis_url};
use crate::queue::Echo;

const PREFIX_VAR: &str = "VOXQUEUE_CRASH_PREFIX";

fn slow_echo() -> impl voxqueue::Handler<Echo, Output = u32> {
    handler_fn(|job: Echo, _ctx: JobContext| async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok::<_, JobError>(job.n)
    })
}

/// The worker process: this same test binary, started by the test below with the
/// prefix in the environment. Run by hand it does nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "started as a child process by sigkilled_worker_process_loses_no_job"]
async fn worker_process() {
    let Ok(prefix) = std::env::var(PREFIX_VAR) else {
        return;
    };
    let q = voxqueue::Queue::<Echo>::builder("crash")
        .url(redis_url())
        .prefix(prefix)
        .connect()
        .await
        .unwrap();
    Worker::builder(q)
        .id("doomed")
        .concurrency(4)
        .lease(Duration::from_millis(1000))
        .build(slow_echo())
        .run_until(std::future::pending())
        .await
        .unwrap();
}

/// The worker process, killed when the test ends however it ends (a failed assertion
/// before the planned kill must not leave it running).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_worker_process_loses_no_job() {
    let p = Prefix::new();
    let q = p.queue::<Echo>("crash").await;
    let jobs = q.enqueue_bulk((0..300).map(|n| Echo { n })).await.unwrap();

    let mut child = KillOnDrop(
        Command::new(std::env::current_exe().unwrap())
            .args([
                "crash::worker_process",
                "--exact",
                "--ignored",
                "--nocapture",
            ])
            .env(PREFIX_VAR, &p.name)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the worker process"),
    );
    // Kill it mid-batch, while it holds jobs.
    eventually(
        Duration::from_secs(60),
        "the child is mid-batch",
        || async {
            let s = q.stats().await.unwrap();
            (s.totals.get("completed").copied().unwrap_or(0) >= 30 && s.active > 0).then_some(())
        },
    )
    .await;
    let killed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    child.0.kill().expect("SIGKILL");
    child.0.wait().unwrap();
    let orphaned = q.stats().await.unwrap().active;
    assert!(orphaned > 0);

    let worker = Worker::builder(q.clone())
        .id("survivor")
        .concurrency(4)
        .build(slow_echo());
    let (stop, signal) = crate::common::shutdown();
    let running = tokio::spawn(worker.run_until(signal));
    // One deadline for the lot: a broken transition must fail the test, not make it
    // wait a minute per job.
    eventually(Duration::from_secs(60), "every job completed", || async {
        let s = q.stats().await.unwrap();
        (s.totals.get("completed").copied().unwrap_or(0) >= 300).then_some(())
    })
    .await;
    for (n, job) in jobs.iter().enumerate() {
        let st = q.status(&job.id).await.unwrap();
        assert_eq!(st.state, JobState::Completed, "{:?}", st);
        assert_eq!(q.result::<u32>(&job.id).await.unwrap(), Some(n as u32));
    }
    let _ = stop.send(());
    running.await.unwrap().unwrap();

    let stats = q.stats().await.unwrap();
    assert_eq!(
        (stats.queued, stats.scheduled, stats.active, stats.dead),
        (0, 0, 0, 0)
    );
    assert_eq!(stats.totals.get("completed"), Some(&300));
    // The jobs the dead worker held were recovered from their expired leases, within
    // the lease (1 s) and a second of slack after the kill, as the README promises.
    let mut recovered = 0;
    for job in &jobs {
        let st = q.status(&job.id).await.unwrap();
        if let Some(stalled) = st.errors.iter().find(|e| e.kind == "stalled") {
            assert_eq!(st.worker.as_deref(), Some("survivor"));
            assert_eq!(st.attempts, 2);
            let after = stalled.at.saturating_sub(killed_at);
            assert!(after <= 2_000, "recovered {after} ms after the kill");
            recovered += 1;
        }
    }
    assert_eq!(recovered as u64, orphaned);
}
