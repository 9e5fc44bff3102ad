//! End to end: the API and the worker as separate processes that share only Redis, a
//! client that speaks HTTP to the API as an OpenAI client library would, and the audio
//! that comes back, parsed.
//!
//! The worker is the worker program (`target/<profile>/examples/worker`, which `cargo
//! test` builds with every example). The API is this test binary run again with the
//! ignored test `api_process`, which hands its flags to the program's own `run` (the
//! `main` of `examples/api/main.rs` after flag parsing and logging): a test binary cannot
//! depend on another example's executable being fresh, but this one always is.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{Value, json};
use voxqueue::tts;

use super::Prefix;
use super::webdriver::send;

/// The API's flags, for the re-run of this binary.
const ARGS_VAR: &str = "VOXQUEUE_E2E_API_ARGS";

/// Children killed on drop, even when the test fails.
struct Processes(Vec<Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The worker program (built by `cargo test` beside this binary) with `args`, quiet.
fn worker_program(args: &[&str]) -> Child {
    let worker = std::env::current_exe()
        .expect("this test binary")
        .with_file_name("worker");
    assert!(
        worker.exists(),
        "{} is missing: `cargo test` builds it, or run `cargo build --example worker`",
        worker.display()
    );
    Command::new(&worker)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the worker program")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Runs the API program when the end-to-end test starts this binary for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the API process of `real_processes_speak_over_http`"]
async fn api_process() {
    let Ok(flags) = std::env::var(ARGS_VAR) else {
        return;
    };
    let args = crate::Args::parse_from(std::iter::once("api").chain(flags.split(' ')));
    crate::run(args).await.expect("the API program");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_processes_speak_over_http() {
    let prefix = Prefix(format!("vqtest-e2e-{}", uuid::Uuid::new_v4().simple()));
    let redis = super::redis_url();
    let exe = std::env::current_exe().expect("this test binary");
    let port = free_port();
    let quiet = || {
        let mut c = Command::new(&exe);
        c.stdout(Stdio::null()).stderr(Stdio::null());
        c
    };
    let mut processes = Processes(Vec::new());
    processes.0.push(worker_program(&[
        "--redis",
        &redis,
        "--prefix",
        &prefix.0,
        "--voice-ttl",
        "5s",
    ]));
    processes.0.push(
        quiet()
            .args([
                "tests::e2e::api_process",
                "--exact",
                "--ignored",
                "--nocapture",
            ])
            .env(
                ARGS_VAR,
                format!(
                    "--redis {redis} --prefix {} --listen 127.0.0.1:{port}",
                    prefix.0
                ),
            )
            .env("RUST_LOG", "warn")
            .spawn()
            .expect("the API program"),
    );

    // The API answers once it listens; the voice exists once the worker registered it.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok((_, body)) = send(port, "GET", "/v1/voices", "").await
            && let Ok(voices) = serde_json::from_slice::<Value>(&body)
            && voices["voices"]
                .as_array()
                .is_some_and(|v| v.iter().any(|v| v["id"] == "en-us"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "API and worker never came up with the en-us voice"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let request = json!({
        "model": "tts-1",
        "input": "Two processes, one Redis. The API relays what the worker speaks.",
        "voice": "en-us",
        "response_format": "wav",
    });
    let (head, body) = send(port, "POST", "/v1/audio/speech", &request.to_string())
        .await
        .expect("an answer");
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    assert!(head.contains("content-type: audio/wav"), "{head}");
    let audio = tts::decode_wav(&body).expect("a WAV stream");
    assert_eq!(audio.sample_rate, 22_050);
    assert!(
        audio.duration() > Duration::from_secs(2),
        "{:?}",
        audio.duration()
    );
    assert!(audio.rms() > 0.01, "silent: rms {}", audio.rms());
    drop(processes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_programs_cleanup_cron_purges_old_dead_letters() {
    let prefix = Prefix(format!("vqtest-e2e-{}", uuid::Uuid::new_v4().simple()));
    let redis = super::redis_url();
    let queue = voxqueue::Queue::<tts::SynthesisRequest>::builder("speech.espeak")
        .url(&redis)
        .prefix(&prefix.0)
        .connect()
        .await
        .expect("the espeak queue");
    let mut events = queue.events().await.expect("events");
    // A voice no eSpeak NG has: the worker fails the job permanently, into the dead
    // letters; the cleanup, due every second and purging any age, then deletes it.
    let doomed = queue
        .enqueue(tts::SynthesisRequest::new("Nobody speaks this.", "klingon"))
        .await
        .expect("enqueued")
        .id;
    let _processes = Processes(vec![worker_program(&[
        "--redis",
        &redis,
        "--prefix",
        &prefix.0,
        "--cleanup-cron",
        "* * * * * *",
        "--cleanup-dead-age",
        "0s",
    ])]);
    let (mut died, mut purged) = (false, false);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !purged {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = tokio::time::timeout(left, events.recv())
            .await
            .expect("the dead letter was purged in time")
            .expect("the event stream");
        if event.job_id == doomed {
            died |= event.kind == voxqueue::EventKind::Dead;
            purged = event.kind == voxqueue::EventKind::Purged;
        }
    }
    assert!(died, "purged without having died");
    assert!(matches!(
        queue.status(&doomed).await,
        Err(voxqueue::Error::NotFound(_))
    ));
    assert_eq!(queue.dead_letter().count().await.unwrap(), 0);
}
