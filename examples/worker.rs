//! Run with: `cargo run --example worker -- --concurrency 2`
//! (needs Redis on 127.0.0.1:6379 and `espeak-ng`; `bash .ci/setup` installs both).
//!
//! The worker program: it takes speech jobs from the queue the API (`examples/api/`)
//! fills, synthesises them, and stores the audio where the API reads it. Run as many as
//! you like, on as many hosts: they coordinate only through Redis, and a worker that
//! dies mid-job loses nothing (its lease runs out and another worker takes the job).
//!
//! Each worker registers its backend's voices in the voice catalogue while it lives
//! (`voxqueue::tts::Catalog`, refreshed well within `--voice-ttl`) and takes jobs from
//! its backend's queue only (`<queue>.espeak`, `<queue>.parler`): the API routes each
//! request there by its voice. It publishes each job's audio sentence by sentence
//! (`voxqueue::tts::AudioStream`), so the API streams it before the job ends.
//!
//! With `--cleanup-cron "0 3 * * *"` the workers also run a nightly cleanup (one run per
//! tick across all of them): dead letters older than `--cleanup-dead-age` are purged and,
//! with `--store dir:...`, audio files older than `--cleanup-audio-age` are deleted.
//!
//! Backends: `--voice-backend espeak` (the offline espeak-ng voice) or
//! `--voice-backend piper --piper-voice <voice.onnx> [--batch 4]` (a Piper voice on Candle) or
//! `--voice-backend kokoro [--kokoro-model <kokoro-v1.0.int8.onnx>] [--kokoro-voices <dir>]`
//! (Kokoro-82M on Candle; default: where `.ci/fetch-voices` puts it) or
//! `--voice-backend parler --model-dir <dir> [--device cuda] [--batch 8]` (Parler-TTS on
//! Candle; with `--batch B` the worker runs B jobs at once and they share one batched
//! generation). Everything below the choice of synthesiser (queue, leases, retries,
//! result store) is the same for both.
//!
//! Ctrl-C or SIGTERM stops it gracefully: it takes no new jobs, lets running ones finish
//! within `--shutdown-grace`, and hands the rest back to the queue at once, so another
//! worker picks them up without waiting for a lease to expire.

mod common;

use common::{Neural, QueueFlags, StoreChoice, load_neural, parse_duration};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clap::{Parser, ValueEnum};
use serde::{Deserialize, Serialize};
use voxqueue::tts::{
    AudioStream, Catalog, EspeakSynthesizer, FileStore, SynthesisRequest, Synthesizer, TtsHandler,
    WorkerVoices, backend_queue,
};
use voxqueue::{
    CircuitBreaker, Handler, JobContext, JobError, Periodic, Queue, RetryPolicy, Schedule, Worker,
};

#[derive(Debug, Parser)]
#[command(about = "A voxqueue text-to-speech worker")]
struct Args {
    #[command(flatten)]
    queue: QueueFlags,
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
    /// How long stored audio is kept: at least the API's `--max-result-ttl`.
    #[arg(long, default_value = "7d", value_parser = parse_duration)]
    audio_ttl: Duration,
    /// How long this worker's voices stay in the catalogue if it dies without a word.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    voice_ttl: Duration,
    /// A cron expression (`0 3 * * *`) for the periodic cleanup; none: no cleanup.
    #[arg(long)]
    cleanup_cron: Option<String>,
    /// Dead letters older than this are purged by the cleanup.
    #[arg(long, default_value = "7d", value_parser = parse_duration)]
    cleanup_dead_age: Duration,
    /// Audio files (`--store dir:...`) older than this are deleted by the cleanup.
    #[arg(long, default_value = "7d", value_parser = parse_duration)]
    cleanup_audio_age: Duration,
    /// The synthesiser.
    #[arg(long, value_enum, default_value_t = Backend::Espeak)]
    voice_backend: Backend,
    /// Parler-TTS model directory (config.json, *.safetensors, tokenizer.json).
    #[arg(long)]
    model_dir: Option<PathBuf>,
    /// A Piper voice's `.onnx` file, its `.onnx.json` beside it (`.ci/fetch-voices`).
    #[arg(long)]
    piper_voice: Option<PathBuf>,
    /// Kokoro's `kokoro-v1.0.int8.onnx` (default: where `.ci/fetch-voices` puts it).
    #[arg(long)]
    kokoro_model: Option<PathBuf>,
    /// The directory of Kokoro voice packs (`af_heart.bin`, ...; default: `voices/` beside
    /// the model).
    #[arg(long)]
    kokoro_voices: Option<PathBuf>,
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
    /// Kokoro-82M on Candle, from `--kokoro-model` and `--kokoro-voices`.
    Kokoro,
}

impl Backend {
    /// The name in the catalogue and in the backend queue's name.
    fn name(self) -> &'static str {
        match self {
            Backend::Espeak => "espeak",
            Backend::Parler => "parler",
            Backend::Piper => "piper",
            Backend::Kokoro => "kokoro",
        }
    }
}

/// One run of the periodic cleanup; its tick is in its job id.
#[derive(Debug, Serialize, Deserialize)]
struct Cleanup {
    /// The tick, in ms since the Unix epoch.
    tick_ms: u64,
}

/// Purges old dead letters of this backend's queue and old audio files.
struct CleanupHandler {
    queue: Queue<SynthesisRequest>,
    files: Option<FileStore>,
    dead_age: Duration,
    audio_age: Duration,
}

impl Handler<Cleanup> for CleanupHandler {
    type Output = serde_json::Value;

    async fn handle(&self, _: Cleanup, _: JobContext) -> Result<serde_json::Value, JobError> {
        let dead = self
            .queue
            .dead_letter()
            .purge_older_than(self.dead_age)
            .await
            .map_err(JobError::transient)?;
        let files = match &self.files {
            Some(store) => store
                .cleanup_older_than(self.audio_age)
                .await
                .map_err(JobError::transient)?,
            None => 0,
        };
        tracing::info!(dead, files, "cleanup done");
        Ok(serde_json::json!({ "dead_purged": dead, "files_deleted": files }))
    }
}

/// Loads the chosen Candle backend once for this worker.
fn neural(args: &Args) -> Result<Arc<dyn Synthesizer>, Box<dyn std::error::Error>> {
    let kokoro = args
        .kokoro_model
        .clone()
        .unwrap_or_else(common::fetched_kokoro_model);
    let which = match args.voice_backend {
        Backend::Kokoro => Neural::Kokoro(&kokoro, args.kokoro_voices.as_deref()),
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
        Backend::Parler | Backend::Piper | Backend::Kokoro => neural(&args)?,
    };
    let mut args = args;
    if args.batch > 1 {
        // B jobs at once, so B requests are there to batch.
        args.concurrency = args.concurrency.max(args.batch);
    }

    // No validator or deduplicator here: those act on enqueue, and the handler checks
    // each request again anyway. Jobs come from this backend's queue only.
    let flags = &args.queue;
    let name = backend_queue(&flags.queue, args.voice_backend.name());
    let connect = |name: String| async move {
        flags
            .builder::<SynthesisRequest>(&name)
            .connect()
            .await
            .map_err(|e| format!("queue {name:?} on {}: {e}", flags.redis))
    };
    let queue = connect(name.clone()).await?;
    let catalog = Catalog::new(&connect(flags.queue.clone()).await?);
    let store = flags.store.open(&queue);

    let retry = RetryPolicy::exponential(args.retry_delay)
        .max_attempts(args.max_attempts.max(1))
        .max_delay(args.retry_max_delay)
        .jitter(0.2);
    let mut builder = Worker::builder(queue.clone())
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
    if let Some(id) = &args.id {
        builder = builder.id(id.clone());
    }
    let handler = TtsHandler::from_shared(synthesizer.clone(), store)
        .audio_ttl(args.audio_ttl)
        .stream(AudioStream::new(&queue));
    let worker = builder.build(handler);
    let voices = WorkerVoices::new(
        worker.id(),
        args.voice_backend.name(),
        &synthesizer.voices(),
        synthesizer.sample_rate(),
    );
    tracing::info!(
        worker = worker.id(),
        queue = %name,
        concurrency = args.concurrency,
        voices = voices.voices.len(),
        "waiting for jobs"
    );

    // One signal stops the worker, the voice registration and the cleanup together.
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn({
        let stop = stop.clone();
        async move {
            shutdown_signal().await;
            stop.cancel();
        }
    });
    let registration = tokio::spawn(catalog.keep_registered(
        voices,
        args.voice_ttl,
        stop.clone().cancelled_owned(),
    ));
    let cleanup = match &args.cleanup_cron {
        Some(cron) => Some(cleanup(&args, &queue, cron, stop.clone()).await?),
        None => None,
    };
    worker.run_until(stop.clone().cancelled_owned()).await?;
    stop.cancel();
    let _ = registration.await;
    if let Some(cleanup) = cleanup {
        let _ = cleanup.await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// The periodic cleanup: a tick enqueues one `Cleanup` job on `<queue>.cleanup` (one per
/// tick across all workers: the tick is in the job id), and a worker of that queue runs it.
async fn cleanup(
    args: &Args,
    queue: &Queue<SynthesisRequest>,
    cron: &str,
    stop: tokio_util::sync::CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, Box<dyn std::error::Error>> {
    let name = format!("{}.cleanup", queue.name());
    let jobs = args
        .queue
        .builder::<Cleanup>(&name)
        .connect()
        .await
        .map_err(|e| format!("queue {name:?}: {e}"))?;
    let schedule = Schedule::cron(cron).map_err(|e| format!("--cleanup-cron {cron:?}: {e}"))?;
    let ticks = Periodic::new(jobs.clone(), "cleanup", schedule, |tick: SystemTime| {
        Cleanup {
            tick_ms: tick
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        }
    })?;
    let files = match &args.queue.store {
        StoreChoice::Dir(dir) => Some(FileStore::new(dir)),
        StoreChoice::Redis => None,
    };
    let worker = Worker::builder(jobs).build(CleanupHandler {
        queue: queue.clone(),
        files,
        dead_age: args.cleanup_dead_age,
        audio_age: args.cleanup_audio_age,
    });
    tracing::info!(cron, "periodic cleanup on");
    Ok(tokio::spawn(async move {
        let run = worker.run_until(stop.clone().cancelled_owned());
        let (result, ()) = tokio::join!(run, ticks.run_until(stop.cancelled_owned()));
        if let Err(e) = result {
            tracing::error!(error = %e, "cleanup worker");
        }
    }))
}

/// The shared signal, announced: running jobs now get their grace period.
async fn shutdown_signal() {
    common::shutdown_signal().await;
    tracing::info!("shutting down: finishing running jobs");
}
