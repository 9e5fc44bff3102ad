//! Run with: `cargo run --example api -- --listen 127.0.0.1:8080 --with-worker`
//! (needs Redis on 127.0.0.1:6379 and `espeak-ng`; `bash .ci/setup` installs both).
//! `--with-worker` runs workers in the same process: the offline voice, and the Piper and
//! Kokoro voices on Candle where `.ci/fetch-voices` put them (or `--piper-voice`,
//! `--kokoro-model` say); then this one program is the whole service, API and synthesis,
//! on one machine. Without it, run
//! `examples/worker.rs` processes (on this host or on GPU hosts): they share nothing with
//! the API but Redis and the result store.
//!
//! ```text
//! POST   /v1/audio/speech          OpenAI-compatible: audio (or SSE deltas) as it is made
//! POST   /v1/speech                SynthesisRequest JSON (+ priority, id, ttl, result_ttl)
//!                                  -> 202 { id, state, duplicate_of }; ?wait=5 blocks up to 5 s
//! GET    /v1/voices, /v1/models    what the live workers speak (and custom voices)
//! GET    /v1/jobs/{id}             state, attempts, progress, timestamps, errors
//! GET    /v1/jobs/{id}/audio       the audio (409 until completed; ETag and Range)
//! GET    /v1/jobs/{id}/stream      the audio as it is made (?format=wav|pcm)
//! GET    /v1/jobs/{id}/captions.srt, /captions.vtt
//! GET    /v1/jobs/{id}/events      Server-Sent Events until the job ends
//! DELETE /v1/jobs/{id}             cancel
//! admin: POST /v1/voices, DELETE /v1/voices/{name}, GET /v1/admin/stats,
//!        GET /v1/admin/dead, POST /v1/admin/dead/{id}/requeue, DELETE /v1/admin/dead/{id},
//!        GET /v1/admin/live (the dashboard's SSE), GET / (the dashboard)
//! GET    /healthz (open), /metrics (its own token when keys are set)
//! ```
//!
//! Voices come from the workers: each registers its backend's voices in Redis while it
//! lives (`voxqueue::tts::Catalog`), and a request goes to the queue of the backend that
//! speaks its voice (`<queue>.<backend>`), so an eSpeak job never lands on a Parler worker.
//!
//! Every error is `{ "error": { "code": "...", "message": "..." } }` with a status code
//! that says what to do: 4xx (fix the request), 429 (wait `Retry-After` seconds), 503
//! (Redis is down; retry later).

#[path = "../common/mod.rs"]
mod common;

mod auth;
mod dashboard;
mod error;
mod routes;
mod speech;
mod state;
mod streaming;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use metrics_exporter_prometheus::PrometheusBuilder;
use tokio_util::sync::CancellationToken;
use voxqueue::tts::EspeakSynthesizer;

use auth::ApiKeys;
use common::{QueueFlags, parse_duration, shutdown_signal};
use state::{AppState, Config, Queues, Rate, WorkerRun, parse_rate};

#[derive(Debug, Parser)]
#[command(about = "HTTP API for voxqueue text-to-speech jobs")]
struct Args {
    #[command(flatten)]
    queue: QueueFlags,
    /// Address to listen on.
    #[arg(long, env = "VOXQUEUE_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Accepted bearer tokens, comma-separated. With neither these nor admin keys the
    /// API (dashboard and admin routes included) is open to anyone who can reach it.
    #[arg(
        long,
        env = "VOXQUEUE_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    api_keys: Vec<String>,
    /// Keys for the dashboard, custom voices, dead letters and stats (they also work
    /// as API keys).
    #[arg(
        long,
        env = "VOXQUEUE_ADMIN_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    admin_keys: Vec<String>,
    /// The bearer token `/metrics` wants when keys are set (admin keys work too).
    #[arg(long, env = "VOXQUEUE_METRICS_TOKEN", hide_env_values = true)]
    metrics_token: Option<String>,
    /// New jobs allowed per API key, as `N/period`: `60/min`, `1000/hour`, `5/10s`.
    /// Identical requests are free (they create no work).
    #[arg(long, env = "VOXQUEUE_RATE_LIMIT", value_parser = parse_rate)]
    rate_limit: Option<Rate>,
    /// Reads (every GET) allowed per API key and process, as `N/period`.
    #[arg(long, env = "VOXQUEUE_READ_RATE_LIMIT", value_parser = parse_rate)]
    read_rate_limit: Option<Rate>,
    /// Also run workers in this process: the offline espeak-ng voice, and each Candle
    /// voice whose files are there: Piper (`--piper-voice`) and Kokoro (`--kokoro-model`).
    #[arg(long)]
    with_worker: bool,
    #[command(flatten)]
    voices: NeuralVoices,
    /// Longest time to the response's headers (a streamed body may run longer).
    #[arg(long, default_value = "75s", value_parser = parse_duration)]
    request_timeout: Duration,
    /// Requests served at once; more wait for a slot.
    #[arg(long, default_value_t = 512)]
    max_concurrency: usize,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 64 * 1024)]
    max_body: usize,
    /// Origins allowed by CORS, comma-separated (`*` for any); none: CORS off.
    #[arg(long, env = "VOXQUEUE_CORS_ORIGINS", value_delimiter = ',')]
    cors_origins: Vec<String>,
    /// How long a finished job's result is kept when the request does not say.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    result_ttl: Duration,
    /// The longest `result_ttl` a request may ask for.
    #[arg(long, default_value = "7d", value_parser = parse_duration)]
    max_result_ttl: Duration,
    /// The longest time-to-live (`ttl`: useless if not started by then) a request may set.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    max_job_ttl: Duration,
    /// How long a finished request's audio answers an identical request without work.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    dedup_ttl: Duration,
}

/// Where `--with-worker` finds the Candle voices. A flag left out means "where
/// `.ci/fetch-voices` puts it": absent there, that backend is left out with the reason.
/// A path given but absent is an error, since its user asked for that voice.
#[derive(Debug, Clone, Default, clap::Args)]
struct NeuralVoices {
    /// The Piper voice (`.onnx` beside its `.onnx.json`) `--with-worker` speaks with;
    /// default: where `.ci/fetch-voices` puts `en_US-joe-medium`.
    #[arg(long, env = "VOXQUEUE_PIPER_VOICE")]
    piper_voice: Option<PathBuf>,
    /// Kokoro-82M's `kokoro-v1.0.int8.onnx` `--with-worker` speaks with; default: where
    /// `.ci/fetch-voices` puts it.
    #[arg(long, env = "VOXQUEUE_KOKORO_MODEL")]
    kokoro_model: Option<PathBuf>,
    /// The directory of Kokoro's voice packs (`af_heart.bin`, ...); default: `voices/`
    /// beside the model.
    #[arg(long, env = "VOXQUEUE_KOKORO_VOICES")]
    kokoro_voices: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        .init();
    run(Args::parse()).await
}

/// The program after its flags: connect, serve until a signal, drain the worker.
async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    // The recorder must exist before the first enqueue so no count is lost. No HTTP
    // listener of its own: `/metrics` is one more route of this server.
    let metrics = PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| format!("installing the Prometheus recorder: {e}"))?;
    let config = Config {
        rate: args.rate_limit,
        read_rate: args.read_rate_limit,
        result_ttl: args.result_ttl.min(args.max_result_ttl),
        max_result_ttl: args.max_result_ttl,
        max_job_ttl: args.max_job_ttl,
        dedup_ttl: args.dedup_ttl,
        request_timeout: args.request_timeout,
        max_concurrency: args.max_concurrency.max(1),
        max_body: args.max_body,
        cors_origins: args.cors_origins.clone(),
    };
    let queues = Queues::connect(args.queue.clone(), config.dedup_ttl, config.result_ttl)
        .await
        .map_err(|e| format!("queue {:?} on {}: {e}", args.queue.queue, args.queue.redis))?;

    let keys = ApiKeys::new(
        &args.api_keys,
        &args.admin_keys,
        args.metrics_token.as_deref(),
    );
    if keys.is_open() {
        tracing::warn!("no --api-keys given: the API is open to anyone who can reach it");
    }
    let state = AppState::new(Arc::new(queues), keys, config, metrics);

    // One token stops both the server and the worker, so Ctrl-C drains the worker's
    // running job (or hands it back) instead of killing it mid-sentence.
    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            shutdown_signal().await;
            tracing::info!("shutting down");
            shutdown.cancel();
        }
    });
    let workers = if args.with_worker {
        in_process_workers(&state.queues, &args.voices).await?
    } else {
        Vec::new()
    };
    let workers: Vec<_> = workers
        .into_iter()
        .map(|(name, worker)| {
            tracing::info!("running an in-process worker ({name})");
            tokio::spawn(worker(Box::pin(shutdown.clone().cancelled_owned())))
        })
        .collect();

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("listening on {}: {e}", args.listen))?;
    tracing::info!(listen = %args.listen, queue = %args.queue.queue, "serving");
    axum::serve(listener, routes::app(state))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await?;
    // The server can also end on its own (a listener error): stop the worker then too.
    shutdown.cancel();
    for worker in workers {
        worker.await??;
    }
    Ok(())
}

/// The workers `--with-worker` runs, named: eSpeak NG always (it needs no weights), then
/// Piper and Kokoro on Candle where their files are, so `GET /v1/voices` lists every
/// backend this machine can speak with. A backend whose files were not fetched is left
/// out with a printed reason; one whose files are there but do not load is an error.
async fn in_process_workers(
    queues: &Queues,
    voices: &NeuralVoices,
) -> Result<Vec<(&'static str, WorkerRun)>, Box<dyn std::error::Error>> {
    let espeak = EspeakSynthesizer::new().map_err(|e| format!("the espeak-ng voice: {e}"))?;
    let mut workers = vec![(
        "espeak-ng",
        state::espeak_worker(queues, espeak)
            .await
            .map_err(|e| e.message)?,
    )];
    let piper = voice_file(
        voices.piper_voice.as_deref(),
        common::fetched_piper_voice(),
        "Piper",
    );
    if let Some(path) = found(piper) {
        let which = common::Neural::Piper(&path);
        workers.push(("piper", neural_worker(queues, "piper", which).await?));
    }
    let kokoro = voice_file(
        voices.kokoro_model.as_deref(),
        common::fetched_kokoro_model(),
        "Kokoro",
    );
    if let Some(path) = found(kokoro) {
        let which = common::Neural::Kokoro(&path, voices.kokoro_voices.as_deref());
        workers.push(("kokoro", neural_worker(queues, "kokoro", which).await?));
    }
    Ok(workers)
}

/// A Candle backend loaded once, as a worker on its own queue.
async fn neural_worker(
    queues: &Queues,
    name: &str,
    which: common::Neural<'_>,
) -> Result<WorkerRun, Box<dyn std::error::Error>> {
    let voice = common::load_neural(which, "auto", "auto", 1, Duration::from_millis(5))?;
    Ok(state::backend_worker(queues, name, voice)
        .await
        .map_err(|e| e.message)?)
}

/// The path, or `None` after printing why there is none.
fn found(file: Result<PathBuf, String>) -> Option<PathBuf> {
    file.map_err(|reason| tracing::warn!("{reason}: its voices are left out"))
        .ok()
}

/// The file a Candle backend loads: the one given (a missing one then fails to load,
/// naming it), else the one `.ci/fetch-voices` puts at `fetched`; `Err` says why there is
/// none (not fetched, or a build without Candle).
fn voice_file(given: Option<&Path>, fetched: PathBuf, what: &str) -> Result<PathBuf, String> {
    if let Some(path) = given {
        return Ok(path.to_owned());
    }
    if !cfg!(feature = "candle") {
        return Err(format!(
            "no {what} voice: this build has no `candle` feature"
        ));
    }
    if !fetched.exists() {
        return Err(format!(
            "no {what} voice at {} (run .ci/fetch-voices to fetch it)",
            fetched.display()
        ));
    }
    Ok(fetched)
}
