//! Run with: `cargo run --example api -- --listen 127.0.0.1:8080 --with-worker`
//! (needs Redis on 127.0.0.1:6379 and `espeak-ng`; `bash .ci/setup` installs both).
//! `--with-worker` runs a worker with the offline voice in the same process: then this one
//! program is the whole service, API and synthesis, on one machine. Without it, run
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
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use metrics_exporter_prometheus::PrometheusBuilder;
use tokio_util::sync::CancellationToken;
use voxqueue::tts::EspeakSynthesizer;

use auth::ApiKeys;
use common::{QueueFlags, parse_duration, shutdown_signal};
use state::{AppState, Config, Queues, Rate, parse_rate};

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
    /// Also run workers in this process: the offline espeak-ng voice, and the Piper
    /// voice on Candle when its file is there (`--piper-voice`).
    #[arg(long)]
    with_worker: bool,
    /// The Piper voice (`.onnx` beside its `.onnx.json`) `--with-worker` speaks with;
    /// default: where `.ci/fetch-voices` puts `en_US-joe-medium`. Missing: eSpeak NG only.
    #[arg(long, env = "VOXQUEUE_PIPER_VOICE")]
    piper_voice: Option<std::path::PathBuf>,
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
    let mut workers = Vec::new();
    if args.with_worker {
        let voice = EspeakSynthesizer::new().map_err(|e| format!("the espeak-ng voice: {e}"))?;
        workers.push((
            "espeak-ng",
            state::espeak_worker(&state.queues, voice)
                .await
                .map_err(|e| e.message)?,
        ));
        if let Some(piper) = piper_worker(&state, args.piper_voice.clone()).await? {
            workers.push(("piper", piper));
        }
    }
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

/// The Piper worker `--with-worker` adds when the voice is there: the best voice this
/// machine has offline. Without the file (or the `candle` feature) it says why and the
/// service speaks with eSpeak NG alone.
async fn piper_worker(
    state: &AppState,
    path: Option<std::path::PathBuf>,
) -> Result<Option<state::WorkerRun>, Box<dyn std::error::Error>> {
    let explicit = path.is_some();
    let path = path.unwrap_or_else(common::fetched_piper_voice);
    if !explicit && !path.exists() {
        tracing::warn!(
            path = %path.display(),
            "no Piper voice (run .ci/fetch-voices): speaking with eSpeak NG only"
        );
        return Ok(None);
    }
    let voice = common::load_piper(&path, "auto", "auto", 1, Duration::from_millis(5))?;
    Ok(Some(
        state::backend_worker(&state.queues, "piper", voice)
            .await
            .map_err(|e| e.message)?,
    ))
}
