//! Test support: a unique key prefix per test on the shared Redis (deleted on drop),
//! private `redis-server`s for tests that restart or kill one, and polling helpers.

#![allow(dead_code)]

#[cfg(feature = "candle")]
pub(crate) mod voices;

use std::future::Future;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use voxqueue::{Queue, QueueBuilder};

/// The shared Redis every machine runs.
pub(crate) fn redis_url() -> String {
    std::env::var("VOXQUEUE_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A plain connection to the shared Redis, for looking at keys behind the library.
pub(crate) async fn connection() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_url())
        .expect("test Redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to test Redis")
}

/// A key prefix only this test uses; every key under it is deleted on drop.
pub(crate) struct Prefix {
    pub(crate) name: String,
    url: String,
}

impl Prefix {
    pub(crate) fn new() -> Self {
        Self::on(&redis_url())
    }

    pub(crate) fn on(url: &str) -> Self {
        Prefix {
            name: format!("vqtest-{}", uuid::Uuid::new_v4().simple()),
            url: url.to_owned(),
        }
    }

    pub(crate) fn builder<J>(&self, queue: &str) -> QueueBuilder<J> {
        Queue::<J>::builder(queue).url(&self.url).prefix(&self.name)
    }

    pub(crate) async fn queue<J>(&self, queue: &str) -> Queue<J> {
        self.builder(queue)
            .connect()
            .await
            .expect("connect to test Redis")
    }
}

impl Drop for Prefix {
    fn drop(&mut self) {
        let Ok(client) = redis::Client::open(self.url.as_str()) else {
            return;
        };
        let Ok(mut conn) = client.get_connection() else {
            return;
        };
        let keys: Vec<String> = match redis::cmd("KEYS")
            .arg(format!("{}:*", self.name))
            .query(&mut conn)
        {
            Ok(k) => k,
            Err(_) => return,
        };
        for key in keys {
            let _: Result<i64, _> = redis::cmd("DEL").arg(key).query(&mut conn);
        }
    }
}

/// Polls `check` until it returns `Some` or `timeout` passes.
pub(crate) async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A shutdown signal a test fires by hand.
pub(crate) fn shutdown() -> (
    tokio::sync::oneshot::Sender<()>,
    impl Future<Output = ()> + Send,
) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    (tx, async move {
        let _ = rx.await;
    })
}

/// A private `redis-server` on a free port in a temp dir, killed on drop.
pub(crate) struct RedisServer {
    pub(crate) port: u16,
    pub(crate) dir: tempfile::TempDir,
    child: Option<Child>,
    args: Vec<String>,
    /// The port speaks TLS only (`--tls-port`; the plain port is off).
    tls: bool,
}

impl RedisServer {
    pub(crate) fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let mut server = RedisServer {
            port,
            dir,
            child: None,
            args: extra.iter().map(|s| s.to_string()).collect(),
            tls: false,
        };
        server.spawn(true);
        server
    }

    /// A server whose only port speaks TLS; `extra` names its certificates.
    pub(crate) fn start_tls(extra: &[&str]) -> Self {
        let mut server = RedisServer {
            port: free_port(),
            dir: tempfile::tempdir().expect("temp dir"),
            child: None,
            args: extra.iter().map(|s| s.to_string()).collect(),
            tls: true,
        };
        server.spawn(true);
        server
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A plain connection of the test's own, for reading the server's counters and
    /// changing its configuration behind the code under test.
    pub(crate) async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("server url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to the private server")
    }

    /// Starts the server; `may_move` lets it take another free port if this one is
    /// taken (not on restart, whose clients know the port).
    fn spawn(&mut self, may_move: bool) {
        for _ in 0..5 {
            let port = self.port.to_string();
            let ports: [&str; 4] = if self.tls {
                ["--port", "0", "--tls-port", &port]
            } else {
                ["--port", &port, "--port", &port]
            };
            let mut child = Command::new("redis-server")
                .args(ports)
                .arg("--bind")
                .arg("127.0.0.1")
                .arg("--dir")
                .arg(self.dir.path())
                .arg("--save")
                .arg("")
                .args(&self.args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server must be installed (see .ci/setup)");
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                // A server that could not bind exits: then the port is someone else's.
                if child.try_wait().expect("poll redis-server").is_some() {
                    break;
                }
                let up = if self.tls {
                    std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                } else {
                    answers_ping(self.port)
                };
                if up {
                    self.child = Some(child);
                    return;
                }
                assert!(Instant::now() < deadline, "redis-server did not start");
                std::thread::sleep(Duration::from_millis(10));
            }
            if may_move {
                self.port = free_port();
            } else {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        panic!("redis-server would not start on port {}", self.port);
    }

    /// Kills the server (SIGKILL: no final save) and starts it again on the same port
    /// and directory.
    pub(crate) fn restart(&mut self) {
        self.kill();
        self.spawn(false);
    }

    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub(crate) fn path(&self) -> PathBuf {
        self.dir.path().to_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether a Redis protocol answer comes back (`+PONG`, or `-NOAUTH` with a password).
fn answers_ping(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(stream.read(&mut buf), Ok(n) if n > 0 && (buf[0] == b'+' || buf[0] == b'-'))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A private Redis Cluster of `n` masters (no replicas), each a `RedisServer`.
pub(crate) struct RedisCluster {
    pub(crate) nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub(crate) fn start(n: usize) -> Self {
        let nodes: Vec<RedisServer> = (0..n)
            .map(|_| {
                RedisServer::start(&["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])
            })
            .collect();
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for node in &nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        let out = create
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli must be installed (see .ci/setup)");
        assert!(
            out.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        for node in &nodes {
            loop {
                let info = Command::new("redis-cli")
                    .args(["-p", &node.port.to_string(), "cluster", "info"])
                    .output()
                    .expect("redis-cli");
                if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < deadline, "cluster did not converge");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        RedisCluster { nodes }
    }

    pub(crate) fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }
}

impl Prefix {
    /// Every key under this prefix with its contents, for "changed nothing" claims.
    /// Left out: what live workers rewrite on their own (lease deadlines, the scores of
    /// `active`; the `workers` liveness set, which a stopping worker leaves; and the
    /// `wake` tokens idle workers pop).
    pub(crate) async fn snapshot(&self) -> std::collections::BTreeMap<String, String> {
        use redis::AsyncCommands;
        let client = redis::Client::open(self.url.as_str()).expect("test Redis URL");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect to test Redis");
        let mut keys: Vec<String> = conn.keys(format!("{}:*", self.name)).await.unwrap();
        keys.sort();
        let mut out = std::collections::BTreeMap::new();
        for key in keys {
            let kind: String = redis::cmd("TYPE")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap();
            let value = match kind.as_str() {
                "string" => {
                    let v: Vec<u8> = conn.get(&key).await.unwrap();
                    format!("{v:?}")
                }
                "hash" => {
                    let mut h: std::collections::BTreeMap<String, Vec<u8>> =
                        conn.hgetall(&key).await.unwrap();
                    if key.ends_with(":stats") {
                        // When maintenance is next due: a clock that moves with time,
                        // like the heartbeat times and lease deadlines left out here.
                        h.remove("due");
                    }
                    format!("{h:?}")
                }
                "zset" if key.ends_with(":workers") => continue,
                "zset" if key.ends_with(":active") => {
                    let mut m: Vec<String> = conn.zrange(&key, 0, -1).await.unwrap();
                    m.sort();
                    format!("{m:?}")
                }
                "zset" => {
                    let m: Vec<(String, f64)> = conn.zrange_withscores(&key, 0, -1).await.unwrap();
                    format!("{m:?}")
                }
                "list" if key.ends_with(":wake") => continue,
                "list" => {
                    let v: Vec<Vec<u8>> = conn.lrange(&key, 0, -1).await.unwrap();
                    format!("{v:?}")
                }
                "stream" => {
                    let v: redis::Value = redis::cmd("XRANGE")
                        .arg(&key)
                        .arg("-")
                        .arg("+")
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                    format!("{v:?}")
                }
                other => format!("<{other}>"),
            };
            out.insert(key, value);
        }
        out
    }
}

/// Awaits `fut` for at most ten seconds: a test that waits on an event must fail, not
/// hang, when the event never comes.
pub(crate) async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for: {what}"))
}
