//! Run with: `cargo run --example api -- --listen 127.0.0.1:8080`
//! (needs Redis on 127.0.0.1:6379 and `espeak-ng`; `bash .ci/setup` installs both).
//! Add `--with-worker` to run a worker with the offline voice in the same process: then
//! this one program is the whole service, API and synthesis, on one machine.
//!
//! The HTTP face of a speech queue. It only validates, enqueues and reads back: the
//! synthesis runs in workers (`examples/worker.rs`), on this host or on GPU hosts, which
//! share nothing with the API but Redis and the result store. Add API processes or
//! workers independently to scale either side.
//!
//! ```text
//! POST   /v1/speech               SynthesisRequest JSON (+ "priority") -> 202 { id, state, duplicate_of }
//!        ?wait=5                  block up to 5 s: 200 with the result if the job finished
//! GET    /v1/jobs/{id}            state, attempts, progress, timestamps, errors
//! GET    /v1/jobs/{id}/audio      the audio (409 until completed)
//! GET    /v1/jobs/{id}/captions.srt, /captions.vtt
//! GET    /v1/jobs/{id}/events     Server-Sent Events until the job ends
//! DELETE /v1/jobs/{id}            cancel
//! GET    /healthz, /metrics       unauthenticated: Redis + workers, Prometheus text
//! ```
//!
//! Every error is `{ "error": { "code": "...", "message": "..." } }` with a status code
//! that says what to do: 4xx (fix the request), 429 (wait `Retry-After` seconds), 503
//! (Redis is down; retry later).
//!
//! ```text
//! curl -s -XPOST localhost:8080/v1/speech -H 'content-type: application/json' \
//!      -d '{"text":"Hello there.","voice":"en-us"}'
//! curl -s localhost:8080/v1/jobs/$ID/audio -o hello.wav
//! ```

mod common;

use common::{StoreChoice, parse_duration, parse_store, shutdown_signal};
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use clap::Parser;
use futures::stream::{self, BoxStream, StreamExt};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use voxqueue::tts::{
    self, EspeakSynthesizer, Limits, ResultStore, SpeechResult, SynthesisRequest, Synthesizer,
    TtsHandler,
};
use voxqueue::{
    CancelOutcome, EventStream, JobEvent, JobId, JobState, JobStatus, Priority, Queue, RateLimit,
    Worker,
};

/// The longest `?wait=` honoured: a request that holds a connection longer belongs on
/// the events stream instead.
const MAX_WAIT: Duration = Duration::from_secs(60);

/// How long a finished request's audio answers an identical request without new work.
const DEDUP_TTL: Duration = Duration::from_secs(3600);

/// `/healthz` answers 503 when Redis takes longer than this.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Parser)]
#[command(about = "HTTP API for voxqueue text-to-speech jobs")]
struct Args {
    /// Redis URL (`rediss://` for TLS, credentials in the URL).
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis: String,
    /// Queue name; workers must use the same.
    #[arg(long, env = "VOXQUEUE_QUEUE", default_value = "speech")]
    queue: String,
    /// Key prefix, so several deployments can share one Redis.
    #[arg(long, env = "VOXQUEUE_PREFIX", default_value = "vq")]
    prefix: String,
    /// Address to listen on.
    #[arg(long, env = "VOXQUEUE_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Accepted bearer tokens, comma-separated. None: the API is open to anyone who can
    /// reach it.
    #[arg(
        long,
        env = "VOXQUEUE_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    api_keys: Vec<String>,
    /// New jobs allowed per API key, as `N/period`: `60/min`, `1000/hour`, `5/10s`.
    /// Identical requests are free (they create no work).
    #[arg(long, env = "VOXQUEUE_RATE_LIMIT", value_parser = parse_rate)]
    rate_limit: Option<Rate>,
    /// Also run a worker with the offline espeak-ng voice in this process.
    #[arg(long)]
    with_worker: bool,
    /// Where workers put the audio: `redis` (beside the queue, with its TTL) or
    /// `dir:<path>` (a directory every API process and worker can read).
    #[arg(long, env = "VOXQUEUE_STORE", default_value = "redis", value_parser = parse_store)]
    store: StoreChoice,
}

/// A per-key rate: `limit` new jobs per `period`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Rate {
    limit: u32,
    period: Duration,
}

/// Everything a handler needs; cheap to clone (every field is shared).
#[derive(Clone)]
struct AppState {
    queue: Queue<SynthesisRequest>,
    store: Arc<dyn ResultStore>,
    keys: Arc<ApiKeys>,
    rate: Option<Rate>,
    metrics: PrometheusHandle,
}

/// Accepted API keys, by sha256 digest. Looking a key up by its digest takes the same
/// time whichever byte differs, and the digest (not the key) names the caller in Redis
/// rate-limit keys and logs.
#[derive(Debug, Default)]
struct ApiKeys {
    by_digest: HashMap<[u8; 32], String>,
}

impl ApiKeys {
    fn new(keys: &[String]) -> Self {
        let by_digest = keys
            .iter()
            .map(|k| k.trim())
            .filter(|k| !k.is_empty())
            .map(|k| {
                let digest: [u8; 32] = Sha256::digest(k.as_bytes()).into();
                let name = format!("key-{}", hex(&digest[..6]));
                (digest, name)
            })
            .collect();
        ApiKeys { by_digest }
    }

    fn is_open(&self) -> bool {
        self.by_digest.is_empty()
    }

    /// The caller's name if `token` is an accepted key.
    fn check(&self, token: &str) -> Option<&str> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.by_digest.get(&digest).map(String::as_str)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Who made a request: the API key's name, or `anonymous` on an open API.
#[derive(Debug, Clone)]
struct Caller(String);

/// The whole API. A plain function of its state, so tests call it without a socket.
fn app(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/v1/speech", post(submit))
        .route("/v1/jobs/{id}", get(job_status).delete(cancel))
        .route("/v1/jobs/{id}/audio", get(audio))
        .route("/v1/jobs/{id}/captions.srt", get(captions_srt))
        .route("/v1/jobs/{id}/captions.vtt", get(captions_vtt))
        .route("/v1/jobs/{id}/events", get(events))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .merge(v1)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .with_state(state)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        .init();
    let args = Args::parse();

    // The recorder must exist before the first enqueue so no count is lost. No HTTP
    // listener of its own: `/metrics` is one more route of this server.
    let metrics = PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| format!("installing the Prometheus recorder: {e}"))?;

    // The voice catalogue validates requests here, before they are stored; espeak-ng is
    // the only backend so far, so the API host needs it installed too.
    let voice = EspeakSynthesizer::new().map_err(|e| format!("the espeak-ng voice: {e}"))?;
    let queue = Queue::<SynthesisRequest>::builder(args.queue.as_str())
        .url(&args.redis)
        .prefix(args.prefix.as_str())
        .dedup(tts::deduplicator(DEDUP_TTL))
        .validate(tts::validator(Limits::default(), voice.voices()))
        .connect()
        .await
        .map_err(|e| format!("queue {:?} on {}: {e}", args.queue, args.redis))?;
    let store = args.store.open(&queue);

    let keys = ApiKeys::new(&args.api_keys);
    if keys.is_open() {
        tracing::warn!("no --api-keys given: the API is open to anyone who can reach it");
    }
    let state = AppState {
        queue: queue.clone(),
        store: store.clone(),
        keys: Arc::new(keys),
        rate: args.rate_limit,
        metrics,
    };

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
    let worker = args.with_worker.then(|| {
        let handler = TtsHandler::from_shared(Arc::new(voice), store);
        let worker = Worker::builder(queue).build(handler);
        tracing::info!(
            worker = worker.id(),
            "running an in-process worker (espeak-ng)"
        );
        tokio::spawn(worker.run_until(shutdown.clone().cancelled_owned()))
    });

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("listening on {}: {e}", args.listen))?;
    tracing::info!(listen = %args.listen, queue = %args.queue, "serving");
    axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await?;
    // The server can also end on its own (a listener error): stop the worker then too.
    shutdown.cancel();
    if let Some(worker) = worker {
        worker.await??;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// Errors

/// An error response: `{ "error": { "code", "message" } }`, plus `state` where the
/// job's state is the answer (409) and `Retry-After` on 429. Codes are stable; messages
/// are for people.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    state: Option<JobState>,
    retry_after: Option<Duration>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            state: None,
            retry_after: None,
        }
    }

    fn not_found(id: &JobId) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", format!("no job {id}"))
    }

    fn internal(what: &str, error: impl std::fmt::Display) -> Self {
        // The detail goes to the log, not to the caller.
        tracing::error!(error = %error, "{what}");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", what)
    }
}

impl From<voxqueue::Error> for ApiError {
    fn from(e: voxqueue::Error) -> Self {
        use voxqueue::Error as E;
        match e {
            E::InvalidJob(message) => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message)
            }
            E::NotFound(id) => Self::not_found(&id),
            E::RateLimited { retry_after, .. } => ApiError {
                retry_after: Some(retry_after),
                ..Self::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    "too many new jobs for this API key; retry later",
                )
            },
            e if e.is_connection_error() => {
                tracing::warn!(error = %e, "Redis unavailable");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "the queue is unavailable; retry later",
                )
            }
            e => Self::internal("queue error", e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = json!({ "code": self.code, "message": self.message });
        if let Some(state) = self.state {
            error["state"] = json!(state);
        }
        let mut response = (self.status, Json(json!({ "error": error }))).into_response();
        if let Some(after) = self.retry_after {
            // Whole seconds, rounded up: retrying on the dot of a rounded-down value
            // would be refused again.
            let secs = after.as_millis().div_ceil(1000).max(1);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs as u64));
        }
        response
    }
}

/// Ids come from the path: one that cannot be a job id names no job.
fn job_id(raw: &str) -> Result<JobId, ApiError> {
    JobId::new(raw).map_err(|_| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no job {raw:?}"),
        )
    })
}

// ---------------------------------------------------------------------------------
// Auth

/// Checks `Authorization: Bearer <key>` and records the caller for rate limiting.
async fn authenticate(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let caller = if state.keys.is_open() {
        "anonymous".to_owned()
    } else {
        let token = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        match token.and_then(|t| state.keys.check(t)) {
            Some(name) => name.to_owned(),
            None => {
                let mut e = ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "send a valid API key as `Authorization: Bearer <key>`",
                )
                .into_response();
                e.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return Ok(e);
            }
        }
    };
    request.extensions_mut().insert(Caller(caller));
    Ok(next.run(request).await)
}

// ---------------------------------------------------------------------------------
// Submitting

/// The body of `POST /v1/speech`: a [`SynthesisRequest`] with an optional priority
/// beside its fields (not part of the request: it changes when, not what).
#[derive(Debug, Deserialize)]
struct SpeechBody {
    #[serde(flatten)]
    request: SynthesisRequest,
    #[serde(default)]
    priority: Priority,
}

#[derive(Debug, Deserialize)]
struct SubmitQuery {
    /// Seconds to wait for the result before answering.
    wait: Option<f64>,
}

async fn submit(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<SubmitQuery>, QueryRejection>,
    body: Result<Json<SpeechBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Query(query) =
        query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.body_text()))?;
    let Json(body) = body.map_err(json_rejection)?;
    let wait = match query.wait {
        None => None,
        Some(secs) if secs.is_finite() && secs >= 0.0 => {
            Some(Duration::from_secs_f64(secs).min(MAX_WAIT))
        }
        Some(_) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "wait must be a number of seconds >= 0",
            ));
        }
    };

    let mut enqueue = state.queue.enqueue(body.request).priority(body.priority);
    if let Some(rate) = state.rate {
        let limit = RateLimit::new(format!("api:{}", caller.0), rate.limit, rate.period)?;
        enqueue = enqueue.rate_limit(limit);
    }
    let job = enqueue.await?;
    let mut out = json!({
        "id": job.id,
        "state": job.state,
        "duplicate_of": job.duplicate_of,
    });
    let location = HeaderValue::from_str(&format!("/v1/jobs/{}", job.id))
        .map_err(|e| ApiError::internal("job id is not a header value", e))?;

    let mut status = StatusCode::ACCEPTED;
    if let Some(wait) = wait {
        match state.queue.wait(&job.id, wait).await {
            Ok(done) => {
                status = StatusCode::OK;
                out["state"] = json!(done.state);
                if done.state == JobState::Completed {
                    let result: Option<SpeechResult> = state.queue.result(&job.id).await?;
                    out["result"] = json!(result.map(|r| result_json(&job.id, &r)));
                } else {
                    out["reason"] = json!(failure_reason(&done));
                }
            }
            // Still running: say where it is now, the caller polls or subscribes.
            Err(e) if e.is_timeout() => {
                out["state"] = json!(state.queue.status(&job.id).await?.state)
            }
            Err(e) => return Err(e.into()),
        }
    }
    let mut response = (status, Json(out)).into_response();
    response.headers_mut().insert(header::LOCATION, location);
    Ok(response)
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    let (status, code) = match &rejection {
        JsonRejection::JsonDataError(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
        JsonRejection::MissingJsonContentType(_) => {
            (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
        }
        _ => (StatusCode::BAD_REQUEST, "bad_request"),
    };
    ApiError::new(status, code, rejection.body_text())
}

/// What a client needs of a [`SpeechResult`]: where to fetch the audio (not the store's
/// internal reference) and plain-millisecond caption timings.
fn result_json(id: &JobId, r: &SpeechResult) -> Value {
    json!({
        "audio_url": format!("/v1/jobs/{id}/audio"),
        "mime_type": r.mime_type,
        "format": r.format,
        "sample_rate": r.sample_rate,
        "duration_ms": r.duration_ms,
        "bytes": r.bytes,
        "captions": r.captions.iter().map(|c| json!({
            "index": c.index,
            "start_ms": c.start.as_millis() as u64,
            "end_ms": c.end.as_millis() as u64,
            "text": c.text,
        })).collect::<Vec<_>>(),
    })
}

fn failure_reason(status: &JobStatus) -> Option<String> {
    status
        .reason
        .clone()
        .or_else(|| status.last_error().map(|e| e.message.clone()))
}

// ---------------------------------------------------------------------------------
// Reading back

fn rfc3339(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The public view of a job. Kept here, not derived from [`JobStatus`], so the HTTP
/// contract changes only when this function does.
fn status_json(s: &JobStatus) -> Value {
    let at = |t: Option<SystemTime>| t.map(rfc3339);
    json!({
        "id": s.id,
        "state": s.state,
        "priority": s.priority,
        "attempts": s.attempts,
        "max_attempts": s.max_attempts,
        "progress": s.progress,
        "created_at": rfc3339(s.created_at),
        "run_at": at(s.run_at),
        "started_at": at(s.started_at),
        "finished_at": at(s.finished_at),
        "expires_at": at(s.expires_at),
        "errors": s.errors.iter().map(|e| json!({
            "attempt": e.attempt,
            "at": rfc3339(SystemTime::UNIX_EPOCH + Duration::from_millis(e.at)),
            "kind": e.kind,
            "message": e.message,
        })).collect::<Vec<_>>(),
        "reason": s.reason,
        "cancel_requested": s.cancel_requested,
    })
}

async fn job_status(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = job_id(&id)?;
    Ok(Json(status_json(&state.queue.status(&id).await?)))
}

/// The result of a completed job: 404 if the job or its result is gone, 409 (with the
/// state) while it is not completed.
async fn completed_result(state: &AppState, id: &JobId) -> Result<SpeechResult, ApiError> {
    let status = state.queue.status(id).await?;
    if status.state != JobState::Completed {
        return Err(ApiError {
            state: Some(status.state),
            ..ApiError::new(
                StatusCode::CONFLICT,
                "not_completed",
                format!("job {id} is {}", status.state),
            )
        });
    }
    state.queue.result(id).await?.ok_or_else(|| expired(id))
}

fn expired(id: &JobId) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "expired",
        format!("the result of job {id} has expired"),
    )
}

async fn audio(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = job_id(&id)?;
    let result = completed_result(&state, &id).await?;
    let bytes = state
        .store
        .get(&result.audio)
        .await
        .map_err(|e| ApiError::internal("reading the audio failed", e))?
        .ok_or_else(|| expired(&id))?;
    let mut headers = HeaderMap::new();
    let mime = HeaderValue::from_str(&result.mime_type)
        .unwrap_or(HeaderValue::from_static("application/octet-stream"));
    headers.insert(header::CONTENT_TYPE, mime);
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    Ok((headers, bytes).into_response())
}

async fn captions_srt(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let result = completed_result(&state, &job_id(&id)?).await?;
    Ok((
        [(header::CONTENT_TYPE, "application/x-subrip; charset=utf-8")],
        result.srt(),
    )
        .into_response())
}

async fn captions_vtt(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let result = completed_result(&state, &job_id(&id)?).await?;
    Ok((
        [(header::CONTENT_TYPE, "text/vtt; charset=utf-8")],
        result.vtt(),
    )
        .into_response())
}

async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = job_id(&id)?;
    let (outcome, job_state) = match state.queue.cancel(&id).await? {
        CancelOutcome::Cancelled => ("cancelled", JobState::Cancelled),
        // The worker's handler stops at its next heartbeat; the job then ends cancelled.
        CancelOutcome::Requested => ("requested", JobState::Active),
        CancelOutcome::AlreadyFinished(s) => ("already_finished", s),
        other => {
            return Err(ApiError::internal(
                "unknown cancel outcome",
                format!("{other:?}"),
            ));
        }
    };
    Ok(Json(
        json!({ "id": id, "outcome": outcome, "state": job_state }),
    ))
}

// ---------------------------------------------------------------------------------
// Events

/// The job's events as Server-Sent Events: first an `event: state` with the job's
/// current status (a subscriber that arrives late, even after the end, is told where
/// the job is instead of waiting for an event that already happened), then each event
/// of this job by its kind (`active`, `progress`, `completed`, ...), ending after a
/// terminal one.
async fn events(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = job_id(&id)?;
    // Subscribe before reading the state: whatever happens in between is then either
    // in the state we send or among the events that follow it.
    let subscription = state.queue.events().await?;
    let status = state.queue.status(&id).await?;
    let first = stream::once(std::future::ready(Ok(state_event(&status))));
    let rest: BoxStream<'static, Result<Event, Infallible>> = if status.state.is_terminal() {
        stream::empty().boxed()
    } else {
        let follow = Follow {
            queue: state.queue.clone(),
            id,
            events: subscription,
            missed: 0,
        };
        stream::unfold(Some(follow), |follow| async move {
            let (event, follow) = follow?.next().await?;
            Some((Ok(event), follow))
        })
        .boxed()
    };
    Ok(Sse::new(first.chain(rest))
        .keep_alive(KeepAlive::default())
        .into_response())
}

fn state_event(status: &JobStatus) -> Event {
    Event::default()
        .event("state")
        .data(status_json(status).to_string())
}

/// One job's share of the queue's event subscription.
struct Follow {
    queue: Queue<SynthesisRequest>,
    id: JobId,
    events: EventStream,
    missed: u64,
}

impl Follow {
    /// The next SSE event and, unless it was the last, the rest of the subscription.
    async fn next(mut self) -> Option<(Event, Option<Self>)> {
        loop {
            let event = self.events.recv().await?;
            if self.events.missed() > self.missed {
                // Too slow a client skipped events, maybe the terminal one: the job's
                // state says whether it is over.
                self.missed = self.events.missed();
                if let Ok(status) = self.queue.status(&self.id).await
                    && status.state.is_terminal()
                {
                    return Some((state_event(&status), None));
                }
            }
            if event.job_id != self.id {
                continue;
            }
            let done = event.kind.is_terminal();
            return Some((job_event(&event), (!done).then_some(self)));
        }
    }
}

fn job_event(e: &JobEvent) -> Event {
    Event::default()
        .event(e.kind.as_str())
        .id(e.stream_id.as_str())
        .data(
            json!({
                "id": e.job_id,
                "event": e.kind.as_str(),
                "at": rfc3339(e.at),
                "data": e.data,
            })
            .to_string(),
        )
}

// ---------------------------------------------------------------------------------
// Operations

/// Liveness for load balancers: Redis answers, and how many workers heartbeat. Zero
/// workers is still 200: the API accepts jobs that will run when a worker starts.
async fn healthz(State(state): State<AppState>) -> Response {
    match tokio::time::timeout(HEALTH_TIMEOUT, state.queue.stats()).await {
        Ok(Ok(stats)) => Json(json!({ "redis": "ok", "workers": stats.workers })).into_response(),
        Ok(Err(e)) => unhealthy(e.to_string()),
        Err(_) => unhealthy(format!("no answer within {HEALTH_TIMEOUT:?}")),
    }
}

fn unhealthy(error: String) -> Response {
    tracing::warn!(%error, "health check failed");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({ "redis": "error", "error": error })),
    )
        .into_response()
}

/// Prometheus text. The queue gauges are set by `Queue::stats`, so read them now:
/// depth is what Redis holds at scrape time, whichever process last changed it.
async fn metrics(State(state): State<AppState>) -> Response {
    if let Err(e) = state.queue.stats().await {
        tracing::warn!(error = %e, "queue gauges not refreshed");
    }
    // Without the exporter's own listener nothing else drains histogram buckets.
    state.metrics.run_upkeep();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

// ---------------------------------------------------------------------------------
// Flags

/// `60/min`, `1000/hour`, `5/10s`: a count, then a unit or a duration.
fn parse_rate(s: &str) -> Result<Rate, String> {
    let (limit, per) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?}: expected N/period, like 60/min"))?;
    let limit: u32 = limit
        .trim()
        .parse()
        .map_err(|e| format!("{s:?}: the count: {e}"))?;
    let period = match per.trim() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        "d" | "day" => Duration::from_secs(86_400),
        other => parse_duration(other)?,
    };
    if limit == 0 || period.is_zero() {
        return Err(format!("{s:?}: the count and the period must be non-zero"));
    }
    Ok(Rate { limit, period })
}

// ---------------------------------------------------------------------------------
// Tests: the whole router in-process (`oneshot`, no socket) against the shared Redis,
// under a key prefix of their own that is deleted when each test ends.

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;
    use std::time::Instant;

    use axum::body::{Body, to_bytes};
    use axum::http::Method;
    use tower::ServiceExt;

    use super::*;

    /// One Prometheus recorder for the whole test binary: a process has one global
    /// recorder, and every test's counters land in it.
    fn recorder() -> PrometheusHandle {
        static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
        HANDLE
            .get_or_init(|| {
                PrometheusBuilder::new()
                    .install_recorder()
                    .expect("install the test recorder")
            })
            .clone()
    }

    fn redis_url() -> String {
        std::env::var("VOXQUEUE_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
    }

    #[derive(Default)]
    struct Setup {
        keys: Vec<&'static str>,
        rate: Option<Rate>,
        worker: bool,
    }

    /// A router over a fresh key prefix, with or without a worker.
    struct TestApp {
        app: Router,
        queue: Queue<SynthesisRequest>,
        store: Arc<dyn ResultStore>,
        worker: Option<RunningWorker>,
        // Last: keys are deleted after the worker has stopped.
        _prefix: Prefix,
    }

    struct RunningWorker {
        stop: tokio::sync::oneshot::Sender<()>,
        task: tokio::task::JoinHandle<Result<(), voxqueue::Error>>,
    }

    /// Every key under the prefix is deleted on drop, even when the test fails.
    struct Prefix(String);

    impl Drop for Prefix {
        fn drop(&mut self) {
            let Ok(client) = redis::Client::open(redis_url()) else {
                return;
            };
            let Ok(mut conn) = client.get_connection() else {
                return;
            };
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{}:*", self.0))
                .query(&mut conn)
                .unwrap_or_default();
            for key in keys {
                let _: Result<i64, _> = redis::cmd("DEL").arg(key).query(&mut conn);
            }
        }
    }

    impl TestApp {
        async fn start(setup: Setup) -> Self {
            let prefix = Prefix(format!("vqtest-api-{}", uuid::Uuid::new_v4().simple()));
            let metrics = recorder();
            let voice = EspeakSynthesizer::new().expect("espeak-ng (see .ci/setup)");
            let queue = Queue::<SynthesisRequest>::builder("speech")
                .url(redis_url())
                .prefix(prefix.0.as_str())
                .dedup(tts::deduplicator(DEDUP_TTL))
                .validate(tts::validator(Limits::default(), voice.voices()))
                .connect()
                .await
                .expect("connect to test Redis");
            let store: Arc<dyn ResultStore> = StoreChoice::Redis.open(&queue);
            let keys: Vec<String> = setup.keys.iter().map(|k| k.to_string()).collect();
            let state = AppState {
                queue: queue.clone(),
                store: store.clone(),
                keys: Arc::new(ApiKeys::new(&keys)),
                rate: setup.rate,
                metrics,
            };
            let mut t = TestApp {
                app: app(state),
                queue,
                store,
                worker: None,
                _prefix: prefix,
            };
            if setup.worker {
                t.start_worker();
            }
            t
        }

        /// A worker with the offline voice, as `--with-worker` runs it.
        fn start_worker(&mut self) {
            let voice = EspeakSynthesizer::new().expect("espeak-ng (see .ci/setup)");
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let worker = Worker::builder(self.queue.clone())
                .build(TtsHandler::from_shared(Arc::new(voice), self.store.clone()));
            let task = tokio::spawn(worker.run_until(async {
                let _ = stopped.await;
            }));
            self.worker = Some(RunningWorker { stop, task });
        }

        async fn send(&self, request: Request<Body>) -> Response {
            self.app
                .clone()
                .oneshot(request)
                .await
                .expect("the router is infallible")
        }

        async fn get(&self, path: &str) -> Response {
            self.send(request(Method::GET, path, None, Body::empty()))
                .await
        }

        async fn submit(&self, body: Value) -> Response {
            self.submit_to("/v1/speech", body).await
        }

        async fn submit_to(&self, path: &str, body: Value) -> Response {
            self.send(request(
                Method::POST,
                path,
                None,
                Body::from(body.to_string()),
            ))
            .await
        }

        /// Polls the job's status until it is `state`.
        async fn until_state(&self, id: &str, state: &str) {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let body = json_body(self.get(&format!("/v1/jobs/{id}")).await).await;
                if body["state"] == state {
                    return;
                }
                assert!(Instant::now() < deadline, "job never {state}: {body}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }

        async fn stop(mut self) {
            if let Some(worker) = self.worker.take() {
                let _ = worker.stop.send(());
                worker.task.await.expect("worker task").expect("worker");
            }
        }
    }

    fn request(method: Method, path: &str, key: Option<&str>, body: Body) -> Request<Body> {
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(key) = key {
            builder = builder.header(header::AUTHORIZATION, format!("Bearer {key}"));
        }
        builder.body(body).expect("a valid request")
    }

    async fn body_bytes(response: Response) -> Vec<u8> {
        to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("read body")
            .to_vec()
    }

    async fn json_body(response: Response) -> Value {
        serde_json::from_slice(&body_bytes(response).await).expect("a JSON body")
    }

    fn hello(text: &str) -> Value {
        json!({ "text": text, "voice": "en-us" })
    }

    #[tokio::test]
    async fn submitted_speech_becomes_a_wav_with_captions() {
        let t = TestApp::start(Setup {
            worker: true,
            ..Setup::default()
        })
        .await;
        let response = t
            .submit(json!({ "text": "Hello there. This is a test.", "voice": "en-us", "priority": "high" }))
            .await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        let id = json_body(response).await["id"]
            .as_str()
            .expect("an id")
            .to_owned();
        t.until_state(&id, "completed").await;

        let response = t.get(&format!("/v1/jobs/{id}/audio")).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "audio/wav");
        let length: usize = response.headers()[header::CONTENT_LENGTH]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let wav = body_bytes(response).await;
        assert_eq!(wav.len(), length);
        let audio = tts::decode_wav(&wav).expect("a WAV file");
        assert!(
            audio.duration() > Duration::from_millis(500),
            "{:?}",
            audio.duration()
        );

        let srt = body_bytes(t.get(&format!("/v1/jobs/{id}/captions.srt")).await).await;
        assert!(String::from_utf8(srt).unwrap().contains(" --> "));
        let vtt = t.get(&format!("/v1/jobs/{id}/captions.vtt")).await;
        assert_eq!(
            vtt.headers()[header::CONTENT_TYPE],
            "text/vtt; charset=utf-8"
        );
        assert!(
            String::from_utf8(body_bytes(vtt).await)
                .unwrap()
                .starts_with("WEBVTT")
        );

        let status = json_body(t.get(&format!("/v1/jobs/{id}")).await).await;
        assert_eq!(status["attempts"], 1);
        assert!(status["finished_at"].as_str().unwrap().ends_with('Z'));

        // The same request again: answered by the finished job, at once, with ?wait.
        let response = t
            .submit_to(
                "/v1/speech?wait=10",
                json!({ "text": "Hello  there. This is a test.", "voice": "en-us" }),
            )
            .await;
        assert_eq!(response.status(), StatusCode::OK);
        let again = json_body(response).await;
        assert_eq!(again["duplicate_of"], id.as_str());
        assert_eq!(again["result"]["mime_type"], "audio/wav");
        assert_eq!(again["result"]["audio_url"], format!("/v1/jobs/{id}/audio"));
        assert_eq!(again["result"]["captions"][1]["text"], "This is a test.");
        t.stop().await;
    }

    #[tokio::test]
    async fn invalid_requests_are_refused_with_the_reason() {
        let t = TestApp::start(Setup::default()).await;
        for (body, status) in [
            (hello(""), StatusCode::UNPROCESSABLE_ENTITY),
            (
                json!({ "text": "hi", "voice": "no-such-voice" }),
                StatusCode::UNPROCESSABLE_ENTITY,
            ),
            (
                json!({ "text": "hi", "voice": "en-us", "speed": 50.0 }),
                StatusCode::UNPROCESSABLE_ENTITY,
            ),
            (
                json!({ "voice": "en-us" }),
                StatusCode::UNPROCESSABLE_ENTITY,
            ),
            (
                json!({ "text": "hi", "voice": "en-us", "priority": "urgent" }),
                StatusCode::UNPROCESSABLE_ENTITY,
            ),
        ] {
            let response = t.submit(body.clone()).await;
            assert_eq!(response.status(), status, "{body}");
            let error = json_body(response).await;
            assert_eq!(error["error"]["code"], "invalid_request", "{error}");
            assert!(!error["error"]["message"].as_str().unwrap().is_empty());
        }
        let response = t
            .send(request(
                Method::POST,
                "/v1/speech",
                None,
                Body::from("{not json"),
            ))
            .await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_eq!(json_body(response).await["error"]["code"], "bad_request");
    }

    #[tokio::test]
    async fn unknown_jobs_are_404() {
        let t = TestApp::start(Setup::default()).await;
        let id = JobId::generate();
        for path in [
            format!("/v1/jobs/{id}"),
            format!("/v1/jobs/{id}/audio"),
            format!("/v1/jobs/{id}/captions.srt"),
            format!("/v1/jobs/{id}/events"),
        ] {
            let response = t.get(&path).await;
            assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
            assert_eq!(json_body(response).await["error"]["code"], "not_found");
        }
        let response = t
            .send(request(
                Method::DELETE,
                &format!("/v1/jobs/{id}"),
                None,
                Body::empty(),
            ))
            .await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(t.get("/v2/nothing").await.status(), StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn a_wrong_or_missing_key_is_401() {
        let t = TestApp::start(Setup {
            keys: vec!["secret-one", "secret-two"],
            ..Setup::default()
        })
        .await;
        let path = format!("/v1/jobs/{}", JobId::generate());
        for key in [None, Some("wrong"), Some("")] {
            let response = t
                .send(request(Method::GET, &path, key, Body::empty()))
                .await;
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{key:?}");
            assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer");
            assert_eq!(json_body(response).await["error"]["code"], "unauthorized");
        }
        // A right key gets through to the route (an unknown job: 404).
        let response = t
            .send(request(
                Method::GET,
                &path,
                Some("secret-two"),
                Body::empty(),
            ))
            .await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        // Operations endpoints stay open for probes and scrapers.
        assert_eq!(t.get("/healthz").await.status(), StatusCode::OK);
        assert_eq!(t.get("/metrics").await.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn over_the_rate_limit_is_429_with_retry_after() {
        let t = TestApp::start(Setup {
            rate: Some(Rate {
                limit: 2,
                period: Duration::from_secs(60),
            }),
            ..Setup::default()
        })
        .await;
        for n in 0..2 {
            let response = t.submit(hello(&format!("Sentence number {n}."))).await;
            assert_eq!(response.status(), StatusCode::ACCEPTED);
        }
        // A duplicate creates no work, so it is not counted.
        let response = t.submit(hello("Sentence number 0.")).await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);

        let response = t.submit(hello("One too many.")).await;
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        let retry_after: u64 = response.headers()[header::RETRY_AFTER]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=60).contains(&retry_after), "{retry_after}");
        assert_eq!(json_body(response).await["error"]["code"], "rate_limited");
    }

    #[tokio::test]
    async fn a_waiting_job_can_be_cancelled() {
        let t = TestApp::start(Setup::default()).await;
        let id = json_body(t.submit(hello("Never spoken.")).await).await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let delete = || {
            request(
                Method::DELETE,
                &format!("/v1/jobs/{id}"),
                None,
                Body::empty(),
            )
        };

        let response = t.send(delete()).await;
        assert_eq!(response.status(), StatusCode::OK);
        let body = json_body(response).await;
        assert_eq!(
            (body["outcome"].as_str(), body["state"].as_str()),
            (Some("cancelled"), Some("cancelled"))
        );

        let body = json_body(t.send(delete()).await).await;
        assert_eq!(body["outcome"], "already_finished");
        let response = t.get(&format!("/v1/jobs/{id}/audio")).await;
        assert_eq!(response.status(), StatusCode::CONFLICT);
        let error = json_body(response).await;
        assert_eq!(error["error"]["state"], "cancelled", "{error}");
    }

    #[tokio::test]
    async fn healthz_reports_redis_and_workers() {
        let t = TestApp::start(Setup::default()).await;
        let response = t.get("/healthz").await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            json_body(response).await,
            json!({ "redis": "ok", "workers": 0 })
        );
    }

    #[tokio::test]
    async fn metrics_are_prometheus_text_with_queue_counters() {
        let t = TestApp::start(Setup::default()).await;
        let response = t.submit(hello("Count me.")).await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        let response = t.get("/metrics").await;
        assert_eq!(response.status(), StatusCode::OK);
        let text = String::from_utf8(body_bytes(response).await).unwrap();
        assert!(text.contains("voxqueue_jobs_enqueued_total"), "{text}");
        assert!(text.contains("voxqueue_queue_jobs{"), "{text}");
    }

    #[tokio::test]
    async fn event_stream_ends_with_completed() {
        // No worker yet: the subscription starts while the job waits, so the stream
        // carries the live events, not only a final state.
        let mut t = TestApp::start(Setup::default()).await;
        let id =
            json_body(t.submit(hello("Tell me when it is done. Then stop.")).await).await["id"]
                .as_str()
                .unwrap()
                .to_owned();
        let response = t.get(&format!("/v1/jobs/{id}/events")).await;
        t.start_worker();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "text/event-stream"
        );
        // The stream ends by itself after the terminal event; the timeout only guards
        // against a hang.
        let body = tokio::time::timeout(Duration::from_secs(20), body_bytes(response))
            .await
            .expect("the stream ended");
        let text = String::from_utf8(body).unwrap();
        let names: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("event: "))
            .collect();
        assert_eq!(names.first(), Some(&"state"), "{text}");
        assert!(text.contains(r#""state":"queued""#), "{text}");
        assert!(
            names.contains(&"active") && names.contains(&"progress"),
            "{text}"
        );
        assert_eq!(names.last(), Some(&"completed"), "{text}");

        // A late subscriber gets the final state and the end at once.
        let late = t.get(&format!("/v1/jobs/{id}/events")).await;
        let text = String::from_utf8(body_bytes(late).await).unwrap();
        assert!(
            text.contains("event: state") && text.contains(r#""state":"completed""#),
            "{text}"
        );
        t.stop().await;
    }

    #[test]
    fn flags_parse() {
        assert_eq!(
            parse_rate("60/min"),
            Ok(Rate {
                limit: 60,
                period: Duration::from_secs(60)
            })
        );
        assert_eq!(
            parse_rate("5/10s"),
            Ok(Rate {
                limit: 5,
                period: Duration::from_secs(10)
            })
        );
        assert!(parse_rate("0/min").is_err() && parse_rate("60").is_err());
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(
            parse_store("dir:/tmp/a"),
            Ok(StoreChoice::Dir("/tmp/a".into()))
        );
        assert!(parse_store("s3").is_err());
    }
}
