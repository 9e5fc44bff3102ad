//! Durability and connection options, on private Redis servers: restarts with AOF,
//! credentials in the URL.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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
    // The first 20 jobs finish; jobs from 20 on then hold the worker's four slots (and
    // the jobs its slots took ahead while attempts were quick) until Redis has been
    // killed, so the kill meets work both queued and active.
    let restarted = Arc::new(AtomicBool::new(false));
    let r = restarted.clone();
    let handler = handler_fn(move |job: Echo, _ctx: JobContext| {
        let r = r.clone();
        async move {
            while job.n >= 20 && !r.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok::<_, JobError>(job.n)
        }
    });
    let (stop, signal) = shutdown();
    let worker = Worker::builder(q.clone())
        .concurrency(4)
        .lease(Duration::from_secs(2))
        .build(handler);
    let running = tokio::spawn(worker.run_until(signal));
    eventually(
        Duration::from_secs(30),
        "20 done, the rest queued or held",
        || async {
            let s = q.stats().await.ok()?;
            (s.totals.get("completed") == Some(&20) && s.active >= 4 && s.queued + s.active == 180)
                .then_some(())
        },
    )
    .await;
    // SIGKILL: no shutdown save; the AOF (fsync always) is all that survives. The new
    // server has no scripts loaded, so every script call meets NOSCRIPT first.
    server.restart();
    restarted.store(true, Ordering::SeqCst);
    // One deadline for the lot, then every job's own result.
    eventually(Duration::from_secs(60), "every job completed", || async {
        let s = q.stats().await.ok()?;
        (s.totals.get("completed").copied().unwrap_or(0) >= 200).then_some(())
    })
    .await;
    for (expected, job) in jobs.iter().enumerate() {
        let st = q.status(&job.id).await.unwrap();
        assert_eq!(st.state, JobState::Completed, "{st:?}");
        assert_eq!(
            q.result::<u32>(&job.id).await.unwrap(),
            Some(expected as u32)
        );
    }
    let _ = stop.send(());
    running.await.unwrap().unwrap();
    let stats = q.stats().await.unwrap();
    assert_eq!(
        (stats.queued, stats.active, stats.scheduled, stats.dead),
        (0, 0, 0, 0)
    );
    // Every job completed exactly once: none lost, none run to completion twice.
    assert_eq!(stats.totals.get("completed"), Some(&200));
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

/// Makes a CA, a server certificate for 127.0.0.1 and a client certificate, all with
/// the openssl CLI, plus a second CA that signed nothing here.
fn make_certs(dir: &std::path::Path) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl must be installed (see .ci/setup)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    for (ca, cn) in [("ca", "voxqueue test CA"), ("other-ca", "another CA")] {
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            &format!("/CN={cn}"),
            "-keyout",
            &format!("{ca}.key"),
            "-out",
            &format!("{ca}.crt"),
        ]);
    }
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for (name, cn, ext) in [
        ("server", "127.0.0.1", "san.ext"),
        ("client", "voxqueue worker", "client.ext"),
    ] {
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &format!("/CN={cn}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ]);
        run(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            ext,
            "-out",
            &format!("{name}.crt"),
        ]);
    }
}

/// Fresh certificates (see `make_certs`) and a TLS-only Redis using them, with its
/// `rediss://` URL; `mutual` makes it demand a client certificate. The server is killed
/// on drop, also when the test panics.
fn tls_server(mutual: bool) -> (tempfile::TempDir, RedisServer, String) {
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let path = |f: &str| certs.path().join(f).display().to_string();
    let server = RedisServer::start_tls(&[
        "--tls-cert-file",
        &path("server.crt"),
        "--tls-key-file",
        &path("server.key"),
        "--tls-ca-cert-file",
        &path("ca.crt"),
        "--tls-auth-clients",
        if mutual { "yes" } else { "no" },
    ]);
    let url = format!("rediss://127.0.0.1:{}", server.port);
    (certs, server, url)
}

/// The error and all its sources, for matching the TLS cause.
fn chain(e: &Error) -> String {
    let mut out = format!("{e:?}");
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        out.push_str(&format!(" <- {s:?}"));
        source = s.source();
    }
    out
}

async fn tls_queue(url: &str, tls: voxqueue::TlsConfig) -> Result<Queue<Echo>, Error> {
    let connector = voxqueue::Connector::single_tls(url, tls)?;
    let q = Queue::<Echo>::builder("tls")
        .connector(connector)
        .connect()
        .await?;
    // A connection that is refused late (mutual TLS) fails on first use.
    q.stats().await?;
    Ok(q)
}

async fn round_trip(q: &Queue<Echo>) {
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_runs_over_tls_and_an_unknown_issuer_is_refused() {
    let (certs, _server, url) = tls_server(false);
    let ca = std::fs::read(certs.path().join("ca.crt")).unwrap();
    let q = tls_queue(&url, voxqueue::TlsConfig::new().root_ca(ca))
        .await
        .unwrap();
    round_trip(&q).await;
    // Trusting only the system roots, or another CA, the server's certificate is
    // refused for its issuer.
    let other = std::fs::read(certs.path().join("other-ca.crt")).unwrap();
    for tls in [
        voxqueue::TlsConfig::new(),
        voxqueue::TlsConfig::new().root_ca(other),
    ] {
        let err = tls_queue(&url, tls).await.unwrap_err();
        let text = chain(&err);
        assert!(text.contains("UnknownIssuer"), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_presents_the_client_certificate() {
    let (certs, _server, url) = tls_server(true);
    let read = |f: &str| std::fs::read(certs.path().join(f)).unwrap();
    let q = tls_queue(
        &url,
        voxqueue::TlsConfig::new()
            .root_ca(read("ca.crt"))
            .client_identity(read("client.crt"), read("client.key")),
    )
    .await
    .unwrap();
    round_trip(&q).await;
    // The server demands a certificate: without one, no queue.
    let err = tls_queue(&url, voxqueue::TlsConfig::new().root_ca(read("ca.crt")))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Connect(_) | Error::Redis(_)),
        "{}",
        chain(&err)
    );
}

/// The libraries on a server, by name (`FUNCTION LIST`).
async fn function_libraries(c: &mut redis::aio::MultiplexedConnection) -> Vec<String> {
    let list: Vec<Vec<redis::Value>> = redis::cmd("FUNCTION")
        .arg("LIST")
        .query_async(c)
        .await
        .unwrap();
    list.into_iter()
        .filter_map(|fields| {
            let at = fields.iter().position(|f| {
                redis::from_redis_value_ref::<String>(f).ok().as_deref() == Some("library_name")
            })?;
            redis::from_redis_value_ref::<String>(fields.get(at + 1)?).ok()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_lost_its_functions_is_given_them_again() {
    let server = RedisServer::start(&[]);
    let q = Queue::<Echo>::builder("functions")
        .url(server.url())
        .connect()
        .await
        .unwrap();
    let first = q.enqueue(Echo { n: 1 }).await.unwrap();
    let mut c = server.connection().await;
    // The transitions run as the functions of one library, loaded on first use.
    let libraries = function_libraries(&mut c).await;
    assert_eq!(libraries.len(), 1, "{libraries:?}");
    assert!(libraries[0].starts_with("voxqueue_"), "{libraries:?}");
    // What a restart without persistence does to functions: the next call meets
    // "Function not found", loads the library again and goes on.
    let _: () = redis::cmd("FUNCTION")
        .arg("FLUSH")
        .query_async(&mut c)
        .await
        .unwrap();
    let second = q.enqueue(Echo { n: 2 }).await.unwrap();
    assert_eq!(function_libraries(&mut c).await, libraries);
    let (stop, signal) = shutdown();
    let running = tokio::spawn(
        Worker::builder(q.clone())
            .build(handler_fn(|job: Echo, _ctx: JobContext| async move {
                Ok::<_, JobError>(job.n)
            }))
            .run_until(signal),
    );
    for (job, n) in [(&first, 1u32), (&second, 2)] {
        let got: u32 = q
            .wait_result(&job.id, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(got, n);
    }
    let _ = stop.send(());
    running.await.unwrap().unwrap();
}
