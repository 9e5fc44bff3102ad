//! Redis Sentinel: a real primary, replicas and three sentinels on free ports. The
//! primary is killed (SIGKILL) while a producer enqueues and a worker completes jobs;
//! both follow the failover on their own, through one `redis+sentinel://` URL. And
//! `wait_for_replicas` (Redis `WAIT`): with it no acknowledged job is lost.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use voxqueue::{Error, JobContext, JobError, JobId, JobState, Queue, Worker, handler_fn};

use crate::common::{RedisServer, eventually, shutdown, within};
use crate::queue::Echo;

const SERVICE: &str = "vqprimary";

/// One `redis-server --sentinel` with its own config file (sentinels rewrite it), in a
/// temp dir; killed on drop, so a failed assertion leaves no process behind.
struct SentinelNode {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl SentinelNode {
    fn start(primary_port: u16) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        for _ in 0..5 {
            let port = free_port();
            let conf = dir.path().join("sentinel.conf");
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {dir}\n\
                     sentinel monitor {SERVICE} 127.0.0.1 {primary_port} 2\n\
                     sentinel down-after-milliseconds {SERVICE} 1000\n\
                     sentinel failover-timeout {SERVICE} 10000\n\
                     sentinel parallel-syncs {SERVICE} 2\n",
                    dir = dir.path().display()
                ),
            )
            .expect("write sentinel.conf");
            let mut child = Command::new("redis-server")
                .arg(&conf)
                .arg("--sentinel")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server must be installed (see .ci/setup)");
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if child.try_wait().expect("poll sentinel").is_some() {
                    break; // the port was taken: try another
                }
                if query::<String>(port, &mut redis::cmd("PING")).is_ok() {
                    return SentinelNode {
                        port,
                        child,
                        _dir: dir,
                    };
                }
                assert!(Instant::now() < deadline, "sentinel did not start");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("no sentinel would start");
    }
}

impl Drop for SentinelNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn query<T: redis::FromRedisValue>(port: u16, cmd: &mut redis::Cmd) -> redis::RedisResult<T> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    let mut conn = client.get_connection_with_timeout(Duration::from_secs(1))?;
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    cmd.query(&mut conn)
}

/// A primary, `replicas` replicas and three sentinels watching them, ready to fail over.
/// Fields drop in order: sentinels first (they would otherwise fail over on teardown).
pub(crate) struct Failover {
    sentinels: Vec<SentinelNode>,
    pub(crate) primary: RedisServer,
    /// Kept for their `Drop`: they die with the fixture.
    _replicas: Vec<RedisServer>,
}

impl Failover {
    pub(crate) fn start(replicas: usize) -> Self {
        let primary = RedisServer::start(&[]);
        let primary_port = primary.port.to_string();
        let replicas: Vec<RedisServer> = (0..replicas)
            .map(|_| RedisServer::start(&["--replicaof", "127.0.0.1", &primary_port]))
            .collect();
        for r in &replicas {
            wait_until("a replica in sync", || {
                query::<String>(r.port, redis::cmd("INFO").arg("replication"))
                    .is_ok_and(|i| i.contains("master_link_status:up"))
            });
        }
        let sentinels: Vec<SentinelNode> =
            (0..3).map(|_| SentinelNode::start(primary.port)).collect();
        // A failover needs every sentinel to know the replicas and its two peers.
        for s in &sentinels {
            wait_until("sentinels that know the replicas and each other", || {
                let known: Vec<HashMap<String, String>> =
                    query(s.port, redis::cmd("SENTINEL").arg("REPLICAS").arg(SERVICE))
                        .unwrap_or_default();
                let peers: Vec<HashMap<String, String>> =
                    query(s.port, redis::cmd("SENTINEL").arg("SENTINELS").arg(SERVICE))
                        .unwrap_or_default();
                known.len() == replicas.len() && peers.len() == 2
            });
        }
        Failover {
            sentinels,
            primary,
            _replicas: replicas,
        }
    }

    /// The URL every producer and worker uses: the sentinels, never a server.
    pub(crate) fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        format!("redis+sentinel://{}/{SERVICE}", hosts.join(","))
    }

    /// The port the sentinels name primary now.
    pub(crate) fn primary_port(&self) -> Option<u16> {
        let (_host, port): (String, String) = query(
            self.sentinels[0].port,
            redis::cmd("SENTINEL")
                .arg("GET-MASTER-ADDR-BY-NAME")
                .arg(SERVICE),
        )
        .ok()?;
        port.parse().ok()
    }
}

fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How a producer of the test enqueues one job; `Ok` means acknowledged.
type Enqueuer = fn(&Queue<Echo>, u32) -> futures::future::BoxFuture<'_, Result<(), Error>>;

fn plain(q: &Queue<Echo>, n: u32) -> futures::future::BoxFuture<'_, Result<(), Error>> {
    Box::pin(async move {
        let id = JobId::new(format!("job-{n}")).unwrap();
        q.enqueue(Echo { n }).id(id).await.map(|_| ())
    })
}

/// What a run through a failover gave: the jobs acknowledged before the kill and after
/// the failover, and the handler's runs per job (a ledger outside Redis).
struct Run {
    acked: Vec<u32>,
    acked_after_failover: Vec<u32>,
    runs: HashMap<u32, u32>,
    q: Queue<Echo>,
}

/// Starts a worker and a producer on `url`, kills the primary once `before` jobs are
/// acknowledged and some have completed, and lets the producer go on until `after`
/// more are acknowledged on the new primary. Each producer retry uses the same id, so
/// a retried enqueue never makes a second job.
async fn run_through_failover(
    cluster: &mut Failover,
    send: Enqueuer,
    before: u32,
    after: u32,
) -> Run {
    let url = cluster.url();
    let q = Queue::<Echo>::builder("failover")
        .url(&url)
        .connect()
        .await
        .unwrap();
    let runs: Arc<Mutex<HashMap<u32, u32>>> = Arc::default();
    let first_runs: Arc<Mutex<HashMap<u32, Instant>>> = Arc::default();
    let (ledger, firsts) = (runs.clone(), first_runs.clone());
    let handler = handler_fn(move |job: Echo, _ctx: JobContext| {
        let (ledger, firsts) = (ledger.clone(), firsts.clone());
        async move {
            *ledger.lock().unwrap().entry(job.n).or_default() += 1;
            firsts
                .lock()
                .unwrap()
                .entry(job.n)
                .or_insert_with(Instant::now);
            tokio::time::sleep(Duration::from_millis(2)).await;
            Ok::<_, JobError>(job.n)
        }
    });
    let worker_q = Queue::<Echo>::builder("failover")
        .url(&url)
        .connect()
        .await
        .unwrap();
    let (stop, stopped) = shutdown();
    let worker = tokio::spawn(
        Worker::builder(worker_q)
            .concurrency(4)
            .lease(Duration::from_secs(2))
            .build(handler)
            .run_until(stopped),
    );

    let old_primary = cluster.primary.port;
    let mut acked = Vec::new();
    let mut acked_after_failover = Vec::new();
    let mut killed_at = None;
    let mut producer_resumed = None;
    let mut n = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked_after_failover.len() < after as usize {
        assert!(Instant::now() < deadline, "the producer never resumed");
        if killed_at.is_none() && acked.len() == before as usize {
            // Kill the primary with work both queued and completed behind it.
            eventually(Duration::from_secs(30), "some jobs completed", || async {
                (runs.lock().unwrap().len() >= 10).then_some(())
            })
            .await;
            cluster.primary.kill();
            killed_at = Some(Instant::now());
        }
        match send(&q, n).await {
            Ok(()) => {
                // The old primary is dead (killed and reaped): only the new one acks.
                if let Some(at) = killed_at {
                    producer_resumed.get_or_insert_with(|| at.elapsed());
                    acked_after_failover.push(n);
                } else {
                    acked.push(n);
                }
                n += 1;
            }
            // Failover in progress: the same job again (same id) after a pause.
            Err(e) if e.is_transient() || matches!(e, Error::ReplicasNotAcked { .. }) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("enqueue {n} failed with a non-transient error: {e}"),
        }
    }
    assert_ne!(cluster.primary_port(), Some(old_primary), "no failover");
    // The worker, too, found the new primary: every job acknowledged after the
    // failover completes.
    for &n in &acked_after_failover {
        let id = JobId::new(format!("job-{n}")).unwrap();
        eventually(
            Duration::from_secs(30),
            "jobs after the failover",
            || async {
                let st = q.status(&id).await.ok()?;
                (st.state == JobState::Completed).then_some(())
            },
        )
        .await;
    }
    let _ = stop.send(());
    worker.await.unwrap().unwrap();
    let killed_at = killed_at.unwrap();
    let worker_resumed = acked_after_failover
        .iter()
        .filter_map(|n| first_runs.lock().unwrap().get(n).copied())
        .min()
        .map(|t| t - killed_at);
    // Measured, not asserted (it depends on the sentinels' down-after time, 1 s here,
    // and on the machine): for the README.
    eprintln!(
        "failover: producer's first acknowledged enqueue {:?} after the kill, worker's first run of a new job {:?} after",
        producer_resumed.unwrap(),
        worker_resumed.unwrap()
    );
    let runs = runs.lock().unwrap().clone();
    Run {
        acked,
        acked_after_failover,
        runs,
        q,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producers_and_workers_follow_a_sentinel_failover() {
    let mut cluster = Failover::start(1);
    let run = run_through_failover(&mut cluster, plain, 200, 50).await;
    assert_eq!(run.acked_after_failover.len(), 50);
    // Without WAIT a job acknowledged just before the kill may not have reached the
    // replica (README, "Reliability"); every one that did is completed or still
    // due, never stuck in a state no worker will move it out of.
    for n in run.acked.iter().chain(&run.acked_after_failover) {
        let id = JobId::new(format!("job-{n}")).unwrap();
        match run.q.status(&id).await {
            Ok(st) => assert!(
                matches!(
                    st.state,
                    JobState::Completed | JobState::Queued | JobState::Active
                ),
                "{st:?}"
            ),
            Err(Error::NotFound(_)) => {}
            Err(e) => panic!("status of job-{n}: {e}"),
        }
    }
    assert!(run.runs.values().all(|&r| r >= 1));
}

fn waited(q: &Queue<Echo>, n: u32) -> futures::future::BoxFuture<'_, Result<(), Error>> {
    Box::pin(async move {
        let id = JobId::new(format!("job-{n}")).unwrap();
        q.enqueue(Echo { n })
            .id(id)
            .wait_for_replicas(1, Duration::from_secs(1))
            .await
            .map(|_| ())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_job_acknowledged_with_wait_is_lost_in_a_failover() {
    // Two replicas: after the failover the new primary still has one to wait for.
    let mut cluster = Failover::start(2);
    let run = run_through_failover(&mut cluster, waited, 300, 50).await;
    let mut lost = Vec::new();
    for n in run.acked.iter().chain(&run.acked_after_failover) {
        let id = JobId::new(format!("job-{n}")).unwrap();
        let done = eventually(
            Duration::from_secs(30),
            "every acknowledged job ends",
            || async {
                match run.q.status(&id).await {
                    Ok(st) if st.state == JobState::Completed => Some(true),
                    Ok(_) => None,
                    Err(Error::NotFound(_)) => Some(false),
                    Err(e) => panic!("status of job-{n}: {e}"),
                }
            },
        )
        .await;
        if !done {
            lost.push(*n);
        }
    }
    assert_eq!(
        lost,
        Vec::<u32>::new(),
        "acknowledged jobs lost in the failover"
    );
    assert_eq!(run.acked.len(), 300);
    // Every acknowledged job ran; a second run only after a lease lapsed in the failover.
    for n in run.acked.iter().chain(&run.acked_after_failover) {
        assert!(
            run.runs.get(n).is_some_and(|&r| r >= 1),
            "job-{n} never ran"
        );
    }
}

#[tokio::test]
async fn an_enqueue_waited_for_a_replica_is_on_the_replica_when_it_returns() {
    let primary = RedisServer::start(&[]);
    let replica = RedisServer::start(&["--replicaof", "127.0.0.1", &primary.port.to_string()]);
    wait_until("the replica in sync", || {
        query::<String>(replica.port, redis::cmd("INFO").arg("replication"))
            .is_ok_and(|i| i.contains("master_link_status:up"))
    });
    let q = Queue::<Echo>::builder("waited")
        .url(primary.url())
        .connect()
        .await
        .unwrap();
    for n in 0..20 {
        let job = q
            .enqueue(Echo { n })
            .wait_for_replicas(1, Duration::from_secs(2))
            .await
            .unwrap();
        // No polling: WAIT returned, so the replica has it now.
        let on_replica: bool = query(
            replica.port,
            redis::cmd("HEXISTS")
                .arg("vq:{waited}:jobs")
                .arg(job.id.as_str()),
        )
        .unwrap();
        assert!(on_replica, "job {n} not on the replica");
    }
}

#[tokio::test]
async fn too_few_replicas_is_a_typed_error_and_the_job_is_still_stored() {
    let primary = RedisServer::start(&[]);
    let q = Queue::<Echo>::builder("lonely")
        .url(primary.url())
        .connect()
        .await
        .unwrap();
    let id = JobId::new("solo").unwrap();
    let err = q
        .enqueue(Echo { n: 1 })
        .id(id.clone())
        .wait_for_replicas(1, Duration::from_millis(100))
        .await
        .unwrap_err();
    match err {
        Error::ReplicasNotAcked {
            id: got,
            acked,
            wanted,
            timeout,
        } => {
            assert_eq!(got, id);
            assert_eq!((acked, wanted), (0, 1));
            assert_eq!(timeout, Duration::from_millis(100));
        }
        other => panic!("{other}"),
    }
    assert_eq!(q.status(&id).await.unwrap().state, JobState::Queued);
    // Asking for none is the plain enqueue.
    q.enqueue(Echo { n: 2 })
        .wait_for_replicas(0, Duration::from_millis(100))
        .await
        .unwrap();
    // The longest wait allowed is allowed (none asked for, so no wait at all).
    q.enqueue(Echo { n: 4 })
        .wait_for_replicas(0, Duration::from_secs(4))
        .await
        .unwrap();
    for bad in [Duration::ZERO, Duration::from_secs(5)] {
        let err = q
            .enqueue(Echo { n: 3 })
            .wait_for_replicas(1, bad)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidConfig(_)), "{bad:?}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_failover_moves_producers_off_the_demoted_primary() {
    let cluster = Failover::start(1);
    let q = Queue::<Echo>::builder("graceful")
        .url(cluster.url())
        .connect()
        .await
        .unwrap();
    q.enqueue(Echo { n: 0 }).await.unwrap();
    let old_primary = cluster.primary.port;
    // SENTINEL FAILOVER: the old primary stays up, demoted to a replica (Sentinel
    // also cuts its clients' connections as it reconfigures it; a connection that
    // survived would get READONLY, which the connection treats the same way).
    let _: () = query(
        cluster.sentinels[0].port,
        redis::cmd("SENTINEL").arg("FAILOVER").arg(SERVICE),
    )
    .unwrap();
    wait_until("the sentinels name the new primary", || {
        cluster.primary_port().is_some_and(|p| p != old_primary)
    });
    wait_until("the old primary is a replica", || {
        query::<String>(old_primary, redis::cmd("INFO").arg("replication"))
            .is_ok_and(|i| i.contains("role:slave"))
    });
    let id = JobId::new("after-the-switch").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match q.enqueue(Echo { n: 1 }).id(id.clone()).await {
            Ok(_) => break,
            Err(e) if e.is_transient() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
    let new_primary = cluster.primary_port().unwrap();
    let on_new: bool = query(
        new_primary,
        redis::cmd("HEXISTS")
            .arg("vq:{graceful}:jobs")
            .arg(id.as_str()),
    )
    .unwrap();
    assert!(on_new, "the job is not on the new primary");
}

/// A sentinel's address that closes its first `drop_first` connections unanswered (a
/// sentinel not up yet, or restarting) and forwards the later ones to the sentinel at
/// `to`. Counts the connections it was offered.
async fn late_sentinel(to: u16, drop_first: usize) -> (u16, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let offered = Arc::new(AtomicUsize::new(0));
    let seen = offered.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            if seen.fetch_add(1, Ordering::SeqCst) < drop_first {
                continue; // dropped: closed unanswered
            }
            tokio::spawn(async move {
                if let Ok(mut up) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                }
            });
        }
    });
    (port, offered)
}

fn total_connections(port: u16) -> u64 {
    let info: String = query(port, redis::cmd("INFO").arg("stats")).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("total_connections_received:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("total_connections_received")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_asks_again_until_the_sentinels_answer_and_keeps_the_primary_it_found() {
    let primary = RedisServer::start(&[]);
    let sentinel = SentinelNode::start(primary.port);
    let (port, offered) = late_sentinel(sentinel.port, 2).await;
    let q = within(
        "the connect",
        Queue::<Echo>::builder("late")
            .url(format!("redis+sentinel://127.0.0.1:{port}/{SERVICE}"))
            .connect(),
    )
    .await
    .unwrap();
    assert!(offered.load(Ordering::SeqCst) > 2);
    // One connection to the primary serves every command: the sentinels are not
    // asked again while it works. (The sentinel's own links may come and go.)
    let before = total_connections(primary.port);
    for n in 0..20 {
        q.enqueue(Echo { n }).await.unwrap();
    }
    let new = total_connections(primary.port) - before;
    assert!(new <= 2, "{new} new connections for 20 commands");
}

#[tokio::test]
async fn a_connect_to_sentinels_that_never_answer_fails() {
    let (port, _) = late_sentinel(free_port(), usize::MAX).await;
    let err = within(
        "the connect to give up",
        Queue::<Echo>::builder("nobody")
            .url(format!("redis+sentinel://127.0.0.1:{port}/{SERVICE}"))
            .connect(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Connect(_)), "{err:?}");
}
