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

/// Makes a CA and a server certificate for 127.0.0.1 with the openssl CLI.
fn make_certs(dir: &std::path::Path) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=voxqueue test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "san.ext",
        "-out",
        "server.crt",
    ]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_runs_over_tls() {
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let path = |f: &str| certs.path().join(f).display().to_string();
    // The TLS server listens on a free port; the plain port is disabled.
    let tls_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = std::process::Command::new("redis-server")
        .args(["--port", "0", "--bind", "127.0.0.1", "--save", ""])
        .args(["--tls-port", &tls_port.to_string()])
        .args([
            "--tls-cert-file",
            &path("server.crt"),
            "--tls-key-file",
            &path("server.key"),
        ])
        .args([
            "--tls-ca-cert-file",
            &path("ca.crt"),
            "--tls-auth-clients",
            "no",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("rediss://127.0.0.1:{tls_port}");
    let ca = std::fs::read(certs.path().join("ca.crt")).unwrap();
    let connector =
        voxqueue::Connector::single_tls(&url, voxqueue::TlsConfig::new().root_ca(ca)).unwrap();
    let q = eventually(Duration::from_secs(10), "TLS server up", || async {
        Queue::<Echo>::builder("tls")
            .connector(connector.clone())
            .connect()
            .await
            .ok()
    })
    .await;
    let handler = handler_fn(|job: Echo, _ctx: JobContext| async move { Ok::<_, JobError>(job.n) });
    let (stop, signal) = shutdown();
    let running = tokio::spawn(Worker::builder(q.clone()).build(handler).run_until(signal));
    let job = q.enqueue(Echo { n: 42 }).await.unwrap();
    assert_eq!(
        q.wait_result::<u32>(&job.id, Duration::from_secs(10))
            .await
            .unwrap(),
        42
    );
    let _ = stop.send(());
    running.await.unwrap().unwrap();
    // Without the CA, the server's certificate is refused.
    let untrusted = voxqueue::Connector::single(&url).unwrap();
    assert!(
        Queue::<Echo>::builder("tls")
            .connector(untrusted)
            .connect()
            .await
            .is_err()
    );
    let _ = child.kill();
    let _ = child.wait();
}
