//! Run with: `cargo run --example worker -- --concurrency 2`
//! (needs Redis on 127.0.0.1:6379 and `espeak-ng`; `bash .ci/setup` installs both).
//!
//! The worker program: it takes speech jobs from the queue the API (`examples/api.rs`)
//! fills, synthesises them, and stores the audio where the API reads it. Run as many as
//! you like, on as many hosts: they coordinate only through Redis, and a worker that
//! dies mid-job loses nothing (its lease runs out and another worker takes the job).
//!
//! Backends: `--voice-backend espeak` (the offline espeak-ng voice) or
//! `--voice-backend piper --piper-voice <voice.onnx> [--batch 4]` (a Piper voice on Candle) or
//! `--voice-backend parler --model-dir <dir> [--device cuda] [--batch 8]` (Parler-TTS on
//! Candle; with `--batch B` the worker runs B jobs at once and they share one batched
//! generation). Everything below the choice of synthesiser (queue, leases, retries,
//! result store) is the same for both.
//!
//! Ctrl-C or SIGTERM stops it gracefully: it takes no new jobs, lets running ones finish
//! within `--shutdown-grace`, and hands the rest back to the queue at once, so another
//! worker picks them up without waiting for a lease to expire.

mod common;

use common::{Neural, StoreChoice, load_neural, parse_duration, parse_store};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use voxqueue::tts::{EspeakSynthesizer, SynthesisRequest, Synthesizer, TtsHandler};
use voxqueue::{CircuitBreaker, Queue, RetryPolicy, Worker};

#[derive(Debug, Parser)]
#[command(about = "A voxqueue text-to-speech worker")]
struct Args {
    /// Redis URL (`rediss://` for TLS, credentials in the URL).
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis: String,
    /// Queue to take jobs from; the API must use the same.
    #[arg(long, env = "VOXQUEUE_QUEUE", default_value = "speech")]
    queue: String,
    /// Key prefix, as the API's.
    #[arg(long, env = "VOXQUEUE_PREFIX", default_value = "vq")]
    prefix: String,
    /// Jobs synthesised at once. Keep 1 on a GPU that one model fills; espeak-ng is a
    /// process per sentence, so CPU workers can take about one per core.
    #[arg(long, env = "VOXQUEUE_CONCURRENCY", default_value_t = 1)]
    concurrency: usize,
    /// Lease on a running job, renewed while it runs: if this worker dies, its jobs
    /// run elsewhere after about this long.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    lease: Duration,
    /// Time limit of one attempt (jobs may set their own).
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    timeout: Duration,
    /// After Ctrl-C/SIGTERM, how long running jobs may finish before they are handed
    /// back to the queue.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    shutdown_grace: Duration,
    /// Where the audio goes: `redis` (beside the queue, with its TTL) or `dir:<path>`
    /// (a directory the API processes can read). Must match the API's `--store`.
    #[arg(long, env = "VOXQUEUE_STORE", default_value = "redis", value_parser = parse_store)]
    store: StoreChoice,
    /// The synthesiser.
    #[arg(long, value_enum, default_value_t = Backend::Espeak)]
    voice_backend: Backend,
    /// Parler-TTS model directory (config.json, *.safetensors, tokenizer.json).
    #[arg(long)]
    model_dir: Option<PathBuf>,
    /// A Piper voice's `.onnx` file, its `.onnx.json` beside it (`.ci/fetch-voices`).
    #[arg(long)]
    piper_voice: Option<PathBuf>,
    /// Device for the Candle backends: auto, cpu, cuda[:N] or metal[:N].
    #[arg(long, default_value = "auto")]
    device: String,
    /// Precision for the Candle backends: auto, f32, f16 or bf16.
    #[arg(long, default_value = "auto")]
    precision: String,
    /// Jobs per batched model call (Candle backends): sets the concurrency too.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// How long a batch waits for more jobs after its first.
    #[arg(long, default_value = "20ms", value_parser = parse_duration)]
    batch_wait: Duration,
    /// Attempts per job before it goes to the dead letters (1 = no retry).
    #[arg(long, default_value_t = 4)]
    max_attempts: u32,
    /// First retry delay; each further one doubles, with ±20 % jitter so failed jobs
    /// do not return in a herd.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    retry_delay: Duration,
    /// Longest retry delay.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    retry_max_delay: Duration,
    /// Transient failures in a row that open the circuit breaker (stop claiming, so a
    /// broken backend does not burn every queued job's retries); 0 disables it.
    #[arg(long, default_value_t = 5)]
    breaker_threshold: u32,
    /// How long an open breaker waits before trying one job.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    breaker_cooldown: Duration,
    /// This worker's id in Redis (default: a fresh random one).
    #[arg(long, env = "VOXQUEUE_WORKER_ID")]
    id: Option<String>,
}

/// The synthesisers this program can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Backend {
    /// espeak-ng as a subprocess: real words, no weights, no GPU.
    Espeak,
    /// Parler-TTS on Candle (CPU, CUDA or Metal), from `--model-dir`.
    Parler,
    /// A Piper (VITS) voice on Candle, from `--piper-voice`.
    Piper,
}

/// Loads the chosen Candle backend once for this worker.
fn neural(args: &Args) -> Result<Arc<dyn Synthesizer>, Box<dyn std::error::Error>> {
    let which = match args.voice_backend {
        Backend::Piper => Neural::Piper(
            args.piper_voice
                .as_deref()
                .ok_or("--voice-backend piper needs --piper-voice")?,
        ),
        _ => Neural::Parler(
            args.model_dir
                .as_deref()
                .ok_or("--voice-backend parler needs --model-dir")?,
        ),
    };
    load_neural(
        which,
        &args.device,
        &args.precision,
        args.batch,
        args.batch_wait,
    )
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        .init();
    let args = Args::parse();

    // Load the backend before connecting: a worker that cannot speak should fail at
    // start, with the reason, rather than claim jobs and fail them.
    let synthesizer: Arc<dyn Synthesizer> = match args.voice_backend {
        Backend::Espeak => {
            Arc::new(EspeakSynthesizer::new().map_err(|e| format!("the espeak-ng voice: {e}"))?)
        }
        Backend::Parler | Backend::Piper => neural(&args)?,
    };
    let mut args = args;
    if args.batch > 1 {
        // B jobs at once, so B requests are there to batch.
        args.concurrency = args.concurrency.max(args.batch);
    }

    // No validator or deduplicator here: those act on enqueue, and the handler checks
    // each request again anyway.
    let queue = Queue::<SynthesisRequest>::builder(args.queue.as_str())
        .url(&args.redis)
        .prefix(args.prefix.as_str())
        .connect()
        .await
        .map_err(|e| format!("queue {:?} on {}: {e}", args.queue, args.redis))?;
    let store = args.store.open(&queue);

    let retry = RetryPolicy::exponential(args.retry_delay)
        .max_attempts(args.max_attempts.max(1))
        .max_delay(args.retry_max_delay)
        .jitter(0.2);
    let mut builder = Worker::builder(queue)
        .concurrency(args.concurrency)
        .lease(args.lease)
        .timeout(args.timeout)
        .shutdown_grace(args.shutdown_grace)
        .retry(retry);
    if args.breaker_threshold > 0 {
        builder = builder.circuit_breaker(CircuitBreaker::new(
            args.breaker_threshold,
            args.breaker_cooldown,
        ));
    }
    if let Some(id) = args.id {
        builder = builder.id(id);
    }
    let worker = builder.build(TtsHandler::from_shared(synthesizer, store));
    tracing::info!(
        worker = worker.id(),
        queue = %args.queue,
        concurrency = args.concurrency,
        backend = ?args.voice_backend,
        "waiting for jobs"
    );
    worker.run_until(shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

/// The shared signal, announced: running jobs now get their grace period.
async fn shutdown_signal() {
    common::shutdown_signal().await;
    tracing::info!("shutting down: finishing running jobs");
}
