//! Durability and connection options, on private Redis servers: restarts with AOF,
//! credentials in the URL.

use std::time::Duration;

use voxqueue::{Error, JobContext, JobError, JobState, Queue, Worker, handler_fn};

use crate::common::{RedisServer, eventually, shutdown};
use crate::queue::Echo;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_with_aof_loses_no_job() {
    let mut server = RedisServer::start(&["--appendonly", "yes", "--appendfsync", "always"]);
    let q = Queue::<Echo>::builder("durable")
        .url(server.url())
        .connect()
        .await
        .unwrap();
    let jobs = q.enqueue_bulk((0..200).map(|n| Echo { n })).await.unwrap();
    let handler = handler_fn(|job: Echo, _ctx: JobContext| async move {
        tokio::time::sleep(Duration::from_millis(5)).await;
        Ok::<_, JobError>(job.n)
    });
    let (stop, signal) = shutdown();
    let worker = Worker::builder(q.clone())
        .concurrency(4)
        .lease(Duration::from_secs(2))
        .build(handler);
    let running = tokio::spawn(worker.run_until(signal));
    eventually(Duration::from_secs(30), "some jobs done", || async {
        let s = q.stats().await.ok()?;
        (s.totals.get("completed").copied().unwrap_or(0) >= 20).then_some(())
    })
    .await;
    // SIGKILL: no shutdown save; the AOF (fsync always) is all that survives. The new
    // server has no scripts loaded, so every script call meets NOSCRIPT first.
    server.restart();
    for job in &jobs {
        let st = eventually(
            Duration::from_secs(60),
            "job finished after restart",
            || async { q.wait(&job.id, Duration::from_secs(5)).await.ok() },
        )
        .await;
        assert_eq!(st.state, JobState::Completed, "{st:?}");
    }
    let _ = stop.send(());
    running.await.unwrap().unwrap();
    let stats = q.stats().await.unwrap();
    assert_eq!(
        (stats.queued, stats.active, stats.scheduled, stats.dead),
        (0, 0, 0, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_and_acl_users_go_in_the_url() {
    let server = RedisServer::start(&["--requirepass", "s3cret"]);
    let port = server.port;
    let mut admin = redis::Client::open(format!("redis://:s3cret@127.0.0.1:{port}"))
        .unwrap()
        .get_connection()
        .unwrap();
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "tts", "on", ">voice", "~vq:*", "+@all"][..])
        .query(&mut admin)
        .unwrap();

    let denied = Queue::<Echo>::connect(&format!("redis://127.0.0.1:{port}"), "auth").await;
    let denied = match denied {
        Err(e) => e,
        Ok(q) => q.enqueue(Echo { n: 1 }).await.unwrap_err(),
    };
    assert!(
        matches!(denied, Error::Connect(_) | Error::Redis(_)),
        "{denied}"
    );

    for url in [
        format!("redis://:s3cret@127.0.0.1:{port}"),
        format!("redis://tts:voice@127.0.0.1:{port}"),
    ] {
        let q = Queue::<Echo>::connect(&url, "auth").await.unwrap();
        let job = q.enqueue(Echo { n: 3 }).await.unwrap();
        assert_eq!(q.status(&job.id).await.unwrap().state, JobState::Queued);
    }
}
