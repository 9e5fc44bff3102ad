//! The chaos suite: several worker *processes* (this test binary run again, as in
//! `crash.rs`) work through thousands of jobs while a driver injects faults, and a
//! ledger outside the queue's Redis (one append-only file per worker process) counts
//! every handler run. Each scenario prints one row of the README's "Reliability" table:
//!
//! ```text
//! cargo test --no-default-features --test it chaos -- --nocapture --test-threads 1
//! VOXQUEUE_CHAOS_JOBS=10000 VOXQUEUE_CHAOS_FILLER_MB=256 cargo test ... (bigger)
//! ```
//!
//! Scenarios: workers SIGKILLed and restarted at random; Redis SIGKILLed and restarted
//! twice (AOF, `appendfsync always`); `CLIENT PAUSE` then `CLIENT KILL` of every
//! client; a worker frozen with SIGSTOP past its lease, then resumed. Every scenario
//! asserts that no acknowledged job is lost or stuck; the other figures are measured
//! and printed, never asserted (they depend on the machine's load).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use voxqueue::{
    Error, JobContext, JobError, JobId, JobState, Queue, RetryPolicy, Worker, handler_fn,
};

use crate::common::RedisServer;
use crate::queue::Echo;

const URL_VAR: &str = "VOXQUEUE_CHAOS_URL";
const LEDGER_VAR: &str = "VOXQUEUE_CHAOS_LEDGER";
const INSTANCE_VAR: &str = "VOXQUEUE_CHAOS_INSTANCE";
const QUEUE: &str = "chaos";
/// Short, so recovery is quick to watch; the claim is recovery within lease + 1 s.
const LEASE: Duration = Duration::from_secs(1);
/// What one handler run takes: long enough that a fault finds jobs in flight.
const WORK: Duration = Duration::from_millis(20);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A worker process: this binary with the queue's URL, a ledger file and its instance
/// name in the environment. Run by hand it does nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "started as a child process by the chaos scenarios"]
async fn chaos_worker_process() {
    let (Ok(url), Ok(ledger), Ok(instance)) = (
        std::env::var(URL_VAR),
        std::env::var(LEDGER_VAR),
        std::env::var(INSTANCE_VAR),
    ) else {
        return;
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(Path::new(&ledger).join(format!("{instance}.log")))
        .unwrap();
    let file = Arc::new(Mutex::new(file));
    loop {
        // Redis may be down (restarting) when this process starts: try again.
        let q = match Queue::<Echo>::builder(QUEUE).url(&url).connect().await {
            Ok(q) => q,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let file = file.clone();
        let handler = handler_fn(move |job: Echo, _ctx: JobContext| {
            let file = file.clone();
            async move {
                // One write(2) per line on an O_APPEND file: whole lines even if killed.
                let line = format!("S {} {}\n", job.n, now_ms());
                file.lock().unwrap().write_all(line.as_bytes()).unwrap();
                tokio::time::sleep(WORK).await;
                let line = format!("E {} {}\n", job.n, now_ms());
                file.lock().unwrap().write_all(line.as_bytes()).unwrap();
                Ok::<_, JobError>(job.n)
            }
        });
        let _ = Worker::builder(q)
            .id(instance.clone())
            .concurrency(4)
            .lease(LEASE)
            // Faults cost attempts (a stalled job counts one): allow plenty.
            .retry(RetryPolicy::fixed(Duration::from_millis(50)).max_attempts(50))
            .build(handler)
            .run_until(std::future::pending())
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The worker processes, killed (SIGKILL, which also ends a stopped one) on drop.
struct Workers {
    url: String,
    ledger: PathBuf,
    procs: Vec<(String, Child)>,
    started: u32,
}

impl Workers {
    fn spawn(&mut self) {
        self.started += 1;
        let instance = format!("w{}", self.started);
        let child = Command::new(std::env::current_exe().unwrap())
            .args([
                "chaos::chaos_worker_process",
                "--exact",
                "--ignored",
                "--nocapture",
            ])
            .env(URL_VAR, &self.url)
            .env(LEDGER_VAR, &self.ledger)
            .env(INSTANCE_VAR, &instance)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start a worker process");
        self.procs.push((instance, child));
    }

    /// SIGKILLs worker `i`; returns its instance name.
    fn kill(&mut self, i: usize) -> String {
        let (instance, mut child) = self.procs.remove(i);
        let _ = child.kill();
        let _ = child.wait();
        instance
    }

    fn signal(&self, i: usize, signal: &str) {
        let pid = self.procs[i].1.id().to_string();
        let status = Command::new("kill").args([signal, &pid]).status().unwrap();
        assert!(status.success(), "kill {signal} {pid}");
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for (_, child) in &mut self.procs {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One injected fault: what, when (ms since the epoch), until when it lasted, which
/// worker instance it hit (none: it hit Redis or every client), and the jobs that
/// were active on what it hit (Redis's `active` index read just before or after).
#[derive(Debug, Clone)]
struct Fault {
    kind: &'static str,
    at: u64,
    end: u64,
    instance: Option<String>,
    held: Vec<u32>,
}

/// What the producer saw: each job acknowledged, and when.
#[derive(Debug, Default)]
struct Produced {
    acked: Vec<(u32, u64)>,
}

/// Enqueues `jobs` jobs evenly over `over`, each with its own id; a failed enqueue is
/// tried again with the same id (so a retry never makes a second job).
async fn produce(url: String, jobs: u32, over: Duration) -> Produced {
    let q = loop {
        match Queue::<Echo>::builder(QUEUE).url(&url).connect().await {
            Ok(q) => break q,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let start = Instant::now();
    let mut out = Produced::default();
    for n in 0..jobs {
        let due = start + over.mul_f64(f64::from(n) / f64::from(jobs));
        tokio::time::sleep_until(due.into()).await;
        let id = JobId::new(format!("c-{n}")).unwrap();
        loop {
            match q.enqueue(Echo { n }).id(id.clone()).await {
                Ok(_) => break,
                Err(e) if e.is_transient() => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("enqueue c-{n}: {e}"),
            }
        }
        out.acked.push((n, now_ms()));
    }
    out
}

/// One handler run, from the ledger.
#[derive(Debug, Clone)]
struct RunRecord {
    instance: String,
    start: u64,
    end: Option<u64>,
}

fn read_ledger(dir: &Path) -> HashMap<u32, Vec<RunRecord>> {
    let mut runs: HashMap<u32, Vec<RunRecord>> = HashMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let instance = path.file_stem().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        // Open runs of this process by job: a job runs at most once at a time here.
        let mut open: HashMap<u32, usize> = HashMap::new();
        for line in text.lines() {
            let mut parts = line.split(' ');
            let (Some(kind), Some(n), Some(t)) = (parts.next(), parts.next(), parts.next()) else {
                continue;
            };
            let (Ok(n), Ok(t)) = (n.parse::<u32>(), t.parse::<u64>()) else {
                continue;
            };
            let list = runs.entry(n).or_default();
            match kind {
                "S" => {
                    list.push(RunRecord {
                        instance: instance.clone(),
                        start: t,
                        end: None,
                    });
                    open.insert(n, list.len() - 1);
                }
                "E" => {
                    if let Some(i) = open.remove(&n) {
                        list[i].end = Some(t);
                    }
                }
                _ => {}
            }
        }
    }
    for list in runs.values_mut() {
        list.sort_by_key(|r| r.start);
    }
    runs
}

/// The figures of one scenario: one row of the README table.
#[derive(Debug)]
struct Figures {
    scenario: &'static str,
    jobs: u32,
    workers: usize,
    faults: usize,
    lost: usize,
    stuck: usize,
    extra_runs: usize,
    unexplained: usize,
    /// Worker faults: the longest time from the fault to the re-run of a job the
    /// faulty worker held (its lease had to run out first). Redis faults: the longest
    /// time from Redis answering again to the completion of a job active at the kill.
    recovery_ms: Option<u64>,
    /// Redis faults: the longest time from the kill to Redis answering again.
    restart_ms: Option<u64>,
    producer_resume_ms: Option<u64>,
    worker_resume_ms: Option<u64>,
    wall: Duration,
}

impl Figures {
    fn row(&self) -> String {
        let ms = |v: Option<u64>| v.map_or("–".to_owned(), |v| format!("{v} ms"));
        format!(
            "| {} | {} | {} | {} | {} | {} | {} ({} unexplained) | {} | {} | {} | {} | {:.1} s |",
            self.scenario,
            self.jobs,
            self.workers,
            self.faults,
            self.lost,
            self.stuck,
            self.extra_runs,
            self.unexplained,
            ms(self.recovery_ms),
            ms(self.restart_ms),
            ms(self.producer_resume_ms),
            ms(self.worker_resume_ms),
            self.wall.as_secs_f64(),
        )
    }
}

/// A second run is explained by a fault when the run before it was cut by one (its
/// worker was killed or frozen after it started; Redis, or every client, was hit
/// between its start and the new run's), or when the new run is a frozen worker's,
/// started after it resumed on a job it had claimed before the freeze (its lease
/// lapsed meanwhile and another worker ran the job).
fn explained(prev: &RunRecord, next: &RunRecord, faults: &[Fault]) -> bool {
    faults.iter().any(|f| match &f.instance {
        Some(instance) => {
            (*instance == prev.instance && f.at + 50 >= prev.start)
                || (*instance == next.instance && next.start >= f.at)
        }
        None => f.at + 50 >= prev.start && f.at <= next.start,
    })
}

/// The scenarios' shared frame: a private Redis with AOF (`appendfsync always`),
/// `workers` worker processes, a producer spreading `jobs` over `produce_for`, and
/// the faults `inject` causes while it runs. Then every acknowledged job must end
/// completed.
struct Chaos {
    server: RedisServer,
    workers: Workers,
    faults: Vec<Fault>,
    _ledger: tempfile::TempDir,
    started: Instant,
}

impl Chaos {
    fn start(workers: usize) -> Self {
        let server = RedisServer::start(&["--appendonly", "yes", "--appendfsync", "always"]);
        let ledger = tempfile::tempdir().unwrap();
        let mut w = Workers {
            url: server.url(),
            ledger: ledger.path().to_owned(),
            procs: Vec::new(),
            started: 0,
        };
        for _ in 0..workers {
            w.spawn();
        }
        Chaos {
            server,
            workers: w,
            faults: Vec::new(),
            _ledger: ledger,
            started: Instant::now(),
        }
    }

    fn admin(&self) -> redis::Connection {
        redis::Client::open(self.server.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    /// Kills Redis with SIGKILL and starts it again on its AOF; returns when it
    /// answers PING (not LOADING).
    async fn restart_redis(&mut self) {
        let held = self.held(None).await;
        let at = now_ms();
        tokio::task::block_in_place(|| {
            self.server.restart();
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                let ok = redis::Client::open(self.server.url())
                    .and_then(|c| c.get_connection())
                    .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
                if ok.is_ok() {
                    break;
                }
                assert!(Instant::now() < deadline, "Redis did not come back");
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        self.faults.push(Fault {
            kind: "redis-kill",
            at,
            end: now_ms(),
            instance: None,
            held,
        });
    }

    /// The jobs active now (on `instance` only, if given), by number.
    async fn held(&self, instance: Option<&str>) -> Vec<u32> {
        let Ok(q) = Queue::<Echo>::builder(QUEUE)
            .url(self.server.url())
            .connect()
            .await
        else {
            return Vec::new();
        };
        q.active_jobs(10_000)
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|st| instance.is_none() || st.worker.as_deref() == instance)
            .filter_map(|st| st.id.as_str().strip_prefix("c-")?.parse().ok())
            .collect()
    }

    /// Writes about `mb` MiB of other data into Redis, so a restart has a real AOF to
    /// load before it answers.
    fn fill(&self, mb: u64) {
        let mut conn = self.admin();
        let value = vec![b'x'; 64 * 1024];
        for chunk in (0..mb * 16).collect::<Vec<_>>().chunks(64) {
            let mut pipe = redis::pipe();
            for i in chunk {
                pipe.cmd("SET")
                    .arg(format!("filler:{i}"))
                    .arg(&value)
                    .ignore();
            }
            let _: () = pipe.query(&mut conn).unwrap();
        }
    }

    /// Waits until every acknowledged job is completed (or the deadline), then
    /// reads the ledger and works out the figures.
    async fn finish(self, scenario: &'static str, produced: Produced) -> Figures {
        let q = Queue::<Echo>::builder(QUEUE)
            .url(self.server.url())
            .connect()
            .await
            .unwrap();
        let jobs = produced.acked.len() as u32;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut pending: Vec<u32> = produced.acked.iter().map(|(n, _)| *n).collect();
        let mut lost = 0;
        while !pending.is_empty() && Instant::now() < deadline {
            let mut still = Vec::new();
            for n in pending {
                let id = JobId::new(format!("c-{n}")).unwrap();
                match q.status(&id).await {
                    Ok(st) if st.state == JobState::Completed => {}
                    Ok(st) if st.state.is_terminal() => {
                        panic!("job c-{n} ended {:?}: {:?}", st.state, st.errors)
                    }
                    Ok(_) => still.push(n),
                    Err(Error::NotFound(_)) => lost += 1,
                    Err(e) => panic!("status c-{n}: {e}"),
                }
            }
            pending = still;
            if !pending.is_empty() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let stuck = pending.len();
        let wall = self.started.elapsed();
        let runs = read_ledger(self.workers.ledger.as_path());
        let mut extra_runs = 0;
        let mut unexplained = 0;
        for (n, list) in &runs {
            for pair in list.windows(2) {
                extra_runs += 1;
                if !explained(&pair[0], &pair[1], &self.faults) {
                    unexplained += 1;
                    eprintln!("unexplained second run of c-{n}: {pair:?}");
                }
            }
        }
        let all_runs: Vec<&RunRecord> = runs.values().flatten().collect();
        let mut recovery_ms = None;
        let mut restart_ms = None;
        let mut producer_resume_ms = None;
        let mut worker_resume_ms = None;
        for f in &self.faults {
            if let Some(instance) = &f.instance {
                // Jobs the faulty worker held: the first run of each elsewhere after.
                for n in &f.held {
                    let rerun = runs
                        .get(n)
                        .into_iter()
                        .flatten()
                        .filter(|r| r.instance != *instance && r.start >= f.at)
                        .map(|r| r.start)
                        .min();
                    if let Some(t) = rerun {
                        recovery_ms = Some(recovery_ms.unwrap_or(0).max(t - f.at));
                    }
                }
            } else {
                // Jobs active at a Redis kill: completed after it came back.
                for n in &f.held {
                    let id = JobId::new(format!("c-{n}")).unwrap();
                    let done = q.status(&id).await.ok().and_then(|st| st.finished_at);
                    if let Some(done) = done {
                        let done = done.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
                        recovery_ms =
                            Some(recovery_ms.unwrap_or(0).max(done.saturating_sub(f.end)));
                    }
                }
                if f.kind == "redis-kill" {
                    restart_ms = Some(restart_ms.unwrap_or(0).max(f.end - f.at));
                }
                let producer = produced
                    .acked
                    .iter()
                    .map(|(_, t)| *t)
                    .filter(|t| *t >= f.end)
                    .min();
                if let Some(t) = producer {
                    producer_resume_ms = Some(producer_resume_ms.unwrap_or(0).max(t - f.end));
                }
                let worker = all_runs
                    .iter()
                    .map(|r| r.start)
                    .filter(|t| *t >= f.end)
                    .min();
                if let Some(t) = worker {
                    worker_resume_ms = Some(worker_resume_ms.unwrap_or(0).max(t - f.end));
                }
            }
        }
        let figures = Figures {
            scenario,
            jobs,
            workers: self.workers.procs.len(),
            faults: self.faults.len(),
            lost,
            stuck,
            extra_runs,
            unexplained,
            recovery_ms,
            restart_ms,
            producer_resume_ms,
            worker_resume_ms,
            wall,
        };
        eprintln!("{}", figures.row());
        figures
    }
}

fn jobs() -> u32 {
    env_or("VOXQUEUE_CHAOS_JOBS", 600) as u32
}

fn workers() -> usize {
    env_or("VOXQUEUE_CHAOS_WORKERS", 3) as usize
}

/// How long the producer runs: about 250 jobs a second.
fn produce_for(jobs: u32) -> Duration {
    Duration::from_millis(u64::from(jobs) * 4).max(Duration::from_secs(3))
}

/// A small seedable generator (xorshift), so a run's choices can be replayed.
struct Rng(u64);

impl Rng {
    fn seeded() -> Self {
        let seed = env_or("VOXQUEUE_CHAOS_SEED", now_ms()) | 1;
        eprintln!("chaos seed: VOXQUEUE_CHAOS_SEED={seed}");
        Rng(seed)
    }

    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

fn assert_sound(f: &Figures) {
    assert_eq!((f.lost, f.stuck), (0, 0), "{}", f.row());
    assert_eq!(f.jobs, jobs(), "{}", f.row());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_worker_kills() {
    let jobs = jobs();
    let over = produce_for(jobs);
    let mut chaos = Chaos::start(workers());
    let producer = tokio::spawn(produce(chaos.server.url(), jobs, over));
    let kills = env_or("VOXQUEUE_CHAOS_KILLS", 4) as usize;
    let mut rng = Rng::seeded();
    for _ in 0..kills {
        tokio::time::sleep(over / (kills as u32 + 1)).await;
        let i = rng.below(chaos.workers.procs.len());
        let at = now_ms();
        let instance = chaos.workers.kill(i);
        let held = chaos.held(Some(&instance)).await;
        chaos.faults.push(Fault {
            kind: "worker-kill",
            at,
            end: at,
            instance: Some(instance),
            held,
        });
        chaos.workers.spawn();
    }
    let produced = producer.await.unwrap();
    let f = chaos
        .finish("workers SIGKILLed and restarted", produced)
        .await;
    assert_sound(&f);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_redis_kills() {
    let jobs = jobs();
    let over = produce_for(jobs);
    let mut chaos = Chaos::start(workers());
    chaos.fill(env_or("VOXQUEUE_CHAOS_FILLER_MB", 16));
    let producer = tokio::spawn(produce(chaos.server.url(), jobs, over));
    for _ in 0..2 {
        tokio::time::sleep(over / 3).await;
        chaos.restart_redis().await;
    }
    let produced = producer.await.unwrap();
    let f = chaos
        .finish("Redis SIGKILLed and restarted (AOF)", produced)
        .await;
    assert_sound(&f);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_client_pause_and_kill() {
    let jobs = jobs();
    let over = produce_for(jobs);
    let mut chaos = Chaos::start(workers());
    let producer = tokio::spawn(produce(chaos.server.url(), jobs, over));
    tokio::time::sleep(over / 3).await;
    // Every client's commands wait 1.5 s (longer than a lease).
    let at = now_ms();
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(1500)
        .arg("ALL")
        .query(&mut chaos.admin())
        .unwrap();
    chaos.faults.push(Fault {
        kind: "client-pause",
        at,
        end: at + 1500,
        instance: None,
        held: Vec::new(),
    });
    tokio::time::sleep(over / 3).await;
    // Every connection but this one cut at once.
    let at = now_ms();
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .arg("SKIPME")
        .arg("yes")
        .query(&mut chaos.admin())
        .unwrap();
    assert!(killed > 0);
    chaos.faults.push(Fault {
        kind: "client-kill",
        at,
        end: at,
        instance: None,
        held: Vec::new(),
    });
    let produced = producer.await.unwrap();
    let f = chaos
        .finish("CLIENT PAUSE 1.5 s, then CLIENT KILL", produced)
        .await;
    assert_sound(&f);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_worker_frozen_past_its_lease() {
    let jobs = jobs();
    let over = produce_for(jobs);
    let mut chaos = Chaos::start(workers());
    let producer = tokio::spawn(produce(chaos.server.url(), jobs, over));
    tokio::time::sleep(over / 3).await;
    let at = now_ms();
    chaos.workers.signal(0, "-STOP");
    let instance = chaos.workers.procs[0].0.clone();
    let held = chaos.held(Some(&instance)).await;
    tokio::time::sleep(LEASE * 2 + Duration::from_millis(500)).await;
    chaos.workers.signal(0, "-CONT");
    chaos.faults.push(Fault {
        kind: "worker-sigstop",
        at,
        end: now_ms(),
        instance: Some(instance),
        held,
    });
    let produced = producer.await.unwrap();
    let f = chaos
        .finish("a worker SIGSTOPped past its lease, then resumed", produced)
        .await;
    assert_sound(&f);
}
