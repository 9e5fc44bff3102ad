//! The router (`app`), its layers, and the routes that submit and read jobs, voices
//! and queue administration.

use std::time::{Duration, SystemTime};

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use tower::ServiceBuilder;
use tower_http::cors::{AllowOrigin, Any, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use voxqueue::tts::{CustomVoice, SpeechResult, SynthesisRequest};
use voxqueue::{CancelOutcome, Enqueued, JobId, JobState, JobStatus, Priority, RateLimit};

use crate::auth::{Caller, authenticate, metrics_auth, require_admin};
use crate::error::{ApiError, job_id, json_rejection};
use crate::state::{AppState, Backend, Recent, apply_custom, limits};
use crate::{dashboard, speech, streaming};

/// The longest `?wait=` honoured: a request that holds a connection longer belongs on
/// the events stream instead.
const MAX_WAIT: Duration = Duration::from_secs(60);

/// `/healthz` answers 503 when Redis takes longer than this.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The whole API. A plain function of its state, so tests call it without a socket.
pub(crate) fn app(state: AppState) -> Router {
    let admin = Router::new()
        .route("/v1/voices", post(create_voice))
        .route("/v1/voices/{name}", delete(delete_voice))
        .route("/v1/admin/stats", get(admin_stats))
        .route("/v1/admin/dead", get(dead_letters))
        .route("/v1/admin/dead/{id}/requeue", post(requeue))
        .route("/v1/admin/dead/{id}", delete(purge))
        .route("/v1/admin/live", get(dashboard::live))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_admin));
    let v1 = Router::new()
        .route("/v1/audio/speech", post(speech::speech))
        .route("/v1/speech", post(submit))
        .route("/v1/voices", get(voices))
        .route("/v1/models", get(models))
        .route("/v1/jobs/{id}", get(job_status).delete(cancel))
        .route("/v1/jobs/{id}/audio", get(audio))
        .route("/v1/jobs/{id}/stream", get(streaming::job_stream))
        .route("/v1/jobs/{id}/captions.srt", get(captions_srt))
        .route("/v1/jobs/{id}/captions.vtt", get(captions_vtt))
        .route("/v1/jobs/{id}/events", get(streaming::events))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    let metrics = Router::new()
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), metrics_auth));
    let config = state.config.clone();
    let cors = (!config.cors_origins.is_empty()).then(|| {
        let origins = if config.cors_origins.iter().any(|o| o == "*") {
            AllowOrigin::from(Any)
        } else {
            AllowOrigin::list(
                config
                    .cors_origins
                    .iter()
                    .filter_map(|o| HeaderValue::from_str(o).ok()),
            )
        };
        CorsLayer::new()
            .allow_origin(origins)
            .allow_methods([Method::GET, Method::POST, Method::DELETE])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
    });
    let layers = ServiceBuilder::new()
        .layer(SetRequestIdLayer::new(REQUEST_ID.clone(), MakeRequestUuid))
        .layer(
            TraceLayer::new_for_http().make_span_with(|request: &Request| {
                let id = request
                    .headers()
                    .get(&REQUEST_ID)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-");
                tracing::info_span!("request", id, method = %request.method(), uri = %request.uri().path())
            }),
        )
        .layer(PropagateRequestIdLayer::new(REQUEST_ID.clone()))
        .layer(tower::limit::ConcurrencyLimitLayer::new(config.max_concurrency))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::GATEWAY_TIMEOUT,
            config.request_timeout,
        ))
        .layer(DefaultBodyLimit::max(config.max_body))
        .option_layer(cors);
    Router::new()
        .route("/", get(dashboard::page))
        .route("/healthz", get(healthz))
        .merge(metrics)
        .merge(admin)
        .merge(v1)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .layer(layers)
        .with_state(state)
}

// ---------------------------------------------------------------------------------
// Submitting

/// How a job is queued, beside what it says: the same fields in both submit routes.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct JobParams {
    #[serde(default)]
    pub(crate) priority: Priority,
    /// A job id of the caller's choosing (as `Idempotency-Key`): the same id twice is
    /// one job.
    pub(crate) id: Option<String>,
    /// Seconds: the job is useless if not started by then.
    pub(crate) ttl: Option<f64>,
    /// Seconds to keep the result.
    pub(crate) result_ttl: Option<f64>,
}

fn seconds(what: &str, secs: Option<f64>, max: Duration) -> Result<Option<Duration>, ApiError> {
    match secs {
        None => Ok(None),
        Some(s) if s.is_finite() && s > 0.0 && s <= max.as_secs_f64() => {
            Ok(Some(Duration::from_secs_f64(s)))
        }
        Some(_) => Err(ApiError::invalid(format!(
            "{what} must be a number of seconds in (0, {}]",
            max.as_secs()
        ))),
    }
}

/// Resolves the voice (custom voices too), checks the request, and enqueues it on its
/// backend's queue with the caller's rate limit and the job parameters.
pub(crate) async fn enqueue(
    state: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    mut request: SynthesisRequest,
    params: JobParams,
) -> Result<(Backend, Enqueued, u32), ApiError> {
    let (voice, custom) = state.queues.resolve(&request.voice).await?;
    if let Some(custom) = &custom {
        apply_custom(&mut request, custom);
    }
    request
        .validate(&limits(), &[])
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    let backend = state.queues.backend(&voice.backend).await?;
    let config = &state.config;
    let ttl = seconds("ttl", params.ttl, config.max_job_ttl)?;
    let result_ttl = seconds("result_ttl", params.result_ttl, config.max_result_ttl)?;
    let key = headers
        .get("idempotency-key")
        .map(|v| v.to_str().map(str::to_owned))
        .transpose()
        .map_err(|_| ApiError::bad_request("Idempotency-Key must be ASCII"))?
        .or(params.id);
    let recent = Recent {
        id: JobId::generate(),
        backend: backend.name.clone(),
        voice: request.voice.clone(),
        text: request.text.chars().take(80).collect(),
    };
    let mut enqueue = backend
        .queue
        .enqueue(request)
        .priority(params.priority)
        .result_ttl(result_ttl.unwrap_or(config.result_ttl));
    if let Some(key) = key {
        let id = JobId::new(key).map_err(|e| ApiError::invalid(format!("job id: {e}")))?;
        enqueue = enqueue.id(id);
    }
    if let Some(ttl) = ttl {
        enqueue = enqueue.ttl(ttl);
    }
    if let Some(rate) = config.rate {
        let limit = RateLimit::new(format!("api:{}", caller.name), rate.limit, rate.period)?;
        enqueue = enqueue.rate_limit(limit);
    }
    let job = enqueue.await?;
    state.remember(Recent {
        id: job.duplicate_of.clone().unwrap_or_else(|| job.id.clone()),
        ..recent
    });
    Ok((backend, job, voice.sample_rate))
}

/// The body of `POST /v1/speech`: a [`SynthesisRequest`] with the job parameters beside
/// its fields (they change when and how long, not what).
#[derive(Debug, Deserialize)]
struct SpeechBody {
    #[serde(flatten)]
    request: SynthesisRequest,
    #[serde(flatten)]
    params: JobParams,
}

#[derive(Debug, Deserialize)]
struct SubmitQuery {
    /// Seconds to wait for the result before answering.
    wait: Option<f64>,
}

async fn submit(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    query: Result<Query<SubmitQuery>, QueryRejection>,
    body: Result<Json<SpeechBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let Json(body) = body.map_err(json_rejection)?;
    let wait = match query.wait {
        None => None,
        Some(secs) if secs.is_finite() && secs >= 0.0 => {
            Some(Duration::from_secs_f64(secs).min(MAX_WAIT))
        }
        Some(_) => {
            return Err(ApiError::bad_request(
                "wait must be a number of seconds >= 0",
            ));
        }
    };

    let (backend, job, _) = enqueue(&state, &caller, &headers, body.request, body.params).await?;
    let mut out = json!({
        "id": job.id,
        "state": job.state,
        "duplicate_of": job.duplicate_of,
        "backend": backend.name,
    });
    let location = HeaderValue::from_str(&format!("/v1/jobs/{}", job.id))
        .map_err(|e| ApiError::internal("job id is not a header value", e))?;

    let mut status = StatusCode::ACCEPTED;
    if let Some(wait) = wait {
        let queue = &backend.queue;
        match queue.wait(&job.id, wait).await {
            Ok(done) => {
                status = StatusCode::OK;
                out["state"] = json!(done.state);
                if done.state == JobState::Completed {
                    let result: Option<SpeechResult> = queue.result(&job.id).await?;
                    out["result"] = json!(result.map(|r| result_json(&job.id, &r)));
                } else {
                    out["reason"] = json!(failure_reason(&done));
                }
            }
            // Still running: say where it is now, the caller polls or subscribes.
            Err(e) if e.is_timeout() => out["state"] = json!(queue.status(&job.id).await?.state),
            Err(e) => return Err(e.into()),
        }
    }
    let mut response = (status, Json(out)).into_response();
    response.headers_mut().insert(header::LOCATION, location);
    Ok(response)
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

pub(crate) fn rfc3339(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The public view of a job. Kept here, not derived from [`JobStatus`], so the HTTP
/// contract changes only when this function does.
pub(crate) fn status_json(s: &JobStatus) -> Value {
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
        "worker": s.worker,
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
    let (backend, status) = state.queues.find(&id).await?;
    let mut out = status_json(&status);
    out["backend"] = json!(backend.name);
    Ok(Json(out))
}

/// The result of a completed job: 404 if the job or its result is gone, 409 (with the
/// state) while it is not completed.
pub(crate) async fn completed_result(
    state: &AppState,
    id: &JobId,
) -> Result<(Backend, SpeechResult), ApiError> {
    let (backend, status) = state.queues.find(id).await?;
    if status.state != JobState::Completed {
        return Err(ApiError::not_completed(id, status.state));
    }
    let result = backend.queue.result(id).await?.ok_or_else(|| expired(id))?;
    Ok((backend, result))
}

pub(crate) fn expired(id: &JobId) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "expired",
        format!("the result of job {id} has expired"),
    )
}

/// The stored audio of a completed job.
pub(crate) async fn stored_audio(
    backend: &Backend,
    id: &JobId,
    result: &SpeechResult,
) -> Result<Vec<u8>, ApiError> {
    backend
        .store
        .get(&result.audio)
        .await
        .map_err(|e| ApiError::internal("reading the audio failed", e))?
        .ok_or_else(|| expired(id))
}

/// The audio, with an `ETag` (the store's reference is a content address, so it names
/// these exact bytes) and single `Range`s, so players can seek and caches revalidate.
async fn audio(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = job_id(&id)?;
    let (backend, result) = completed_result(&state, &id).await?;
    let etag = format!("\"{}\"", result.audio);
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"))
    {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
    }
    let bytes = stored_audio(&backend, &id, &result).await?;
    let mime = HeaderValue::from_str(&result.mime_type)
        .unwrap_or(HeaderValue::from_static("application/octet-stream"));
    let mut out = HeaderMap::new();
    out.insert(header::CONTENT_TYPE, mime);
    out.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    out.insert(
        header::ETAG,
        HeaderValue::from_str(&etag).map_err(|e| ApiError::internal("etag", e))?,
    );
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let Some(range) = range else {
        out.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        return Ok((out, bytes).into_response());
    };
    let total = bytes.len();
    match byte_range(range, total) {
        Some((start, end)) => {
            let content_range = format!("bytes {start}-{end}/{total}");
            out.insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&content_range)
                    .map_err(|e| ApiError::internal("range", e))?,
            );
            out.insert(header::CONTENT_LENGTH, HeaderValue::from(end + 1 - start));
            Ok((
                StatusCode::PARTIAL_CONTENT,
                out,
                bytes[start..=end].to_vec(),
            )
                .into_response())
        }
        None => {
            let mut response = ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range_not_satisfiable",
                format!("the audio has {total} bytes"),
            )
            .into_response();
            response.headers_mut().insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{total}"))
                    .map_err(|e| ApiError::internal("range", e))?,
            );
            Ok(response)
        }
    }
}

/// One `bytes=` range (`a-b`, `a-`, `-n`) of a body of `total` bytes, inclusive; `None`
/// if it is unsatisfiable or not one range.
pub(crate) fn byte_range(header: &str, total: usize) -> Option<(usize, usize)> {
    let spec = header.trim().strip_prefix("bytes=")?;
    if spec.contains(',') || total == 0 {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: usize = n.parse().ok()?;
            (total.checked_sub(n.min(total))?, total - 1)
        }
        (a, "") => (a.parse().ok()?, total - 1),
        (a, b) => (a.parse().ok()?, b.parse::<usize>().ok()?.min(total - 1)),
    };
    (start <= end && start < total).then_some((start, end))
}

async fn captions_srt(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (_, result) = completed_result(&state, &job_id(&id)?).await?;
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
    let (_, result) = completed_result(&state, &job_id(&id)?).await?;
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
    let (backend, _) = state.queues.find(&id).await?;
    let (outcome, job_state) = match backend.queue.cancel(&id).await? {
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
// Voices

/// The live voices (each with its backend and rate) and the custom voices.
async fn voices(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let catalog = &state.queues.catalog;
    Ok(Json(json!({
        "voices": catalog.voices().await?,
        "custom": catalog.customs().await?,
    })))
}

/// OpenAI's model list: one model per live backend.
async fn models(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let mut backends: Vec<String> = state
        .queues
        .catalog
        .voices()
        .await?
        .into_iter()
        .map(|v| v.backend)
        .collect();
    backends.sort();
    backends.dedup();
    let data: Vec<Value> = backends
        .iter()
        .map(|b| json!({ "id": b, "object": "model", "owned_by": "voxqueue" }))
        .collect();
    Ok(Json(json!({ "object": "list", "data": data })))
}

/// `POST /v1/voices`: a named custom voice over a live voice.
async fn create_voice(
    State(state): State<AppState>,
    body: Result<Json<CustomVoice>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(voice) = body.map_err(json_rejection)?;
    // The base voice must exist now, and a custom voice never shadows a real one.
    let (base, _) = state.queues.resolve(&voice.voice).await?;
    if state
        .queues
        .catalog
        .voices()
        .await?
        .iter()
        .any(|v| v.id() == voice.name)
    {
        return Err(ApiError::invalid(format!(
            "{:?} is a backend voice; choose another name",
            voice.name
        )));
    }
    let mut voice = voice;
    voice.voice = base.id().to_owned();
    state.queues.catalog.put_custom(&voice).await?;
    Ok((StatusCode::CREATED, Json(json!(voice))).into_response())
}

async fn delete_voice(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    match state.queues.catalog.delete_custom(&name).await? {
        true => Ok(StatusCode::NO_CONTENT),
        false => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no custom voice {name:?}"),
        )),
    }
}

// ---------------------------------------------------------------------------------
// Administration

/// Counts per backend queue.
pub(crate) async fn stats_json(state: &AppState) -> Result<Value, ApiError> {
    let mut queues = serde_json::Map::new();
    for backend in state.queues.all().await? {
        let s = backend.queue.stats().await?;
        queues.insert(
            backend.name.clone(),
            json!({
                "queued": s.queued,
                "scheduled": s.scheduled,
                "active": s.active,
                "dead": s.dead,
                "queued_by_priority": s.queued_by_priority.iter()
                    .map(|(p, n)| (json!(p).as_str().unwrap_or("?").to_owned(), json!(n)))
                    .collect::<serde_json::Map<_, _>>(),
                "workers": s.workers,
                "open_breakers": s.open_breakers,
                "totals": s.totals,
                "recent": {
                    "window_s": s.recent.window.as_secs(),
                    "completed": s.recent.completed,
                    "failed": s.recent.failed,
                    "error_rate": s.recent.error_rate,
                },
            }),
        );
    }
    Ok(Value::Object(queues))
}

async fn admin_stats(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({ "queues": stats_json(&state).await? })))
}

/// Dead letters of every backend, newest first, with their error history.
pub(crate) async fn dead_json(state: &AppState, limit: usize) -> Result<Vec<Value>, ApiError> {
    let mut out = Vec::new();
    for backend in state.queues.all().await? {
        for status in backend.queue.dead_letter().list(0, limit).await? {
            let mut job = status_json(&status);
            job["backend"] = json!(backend.name);
            out.push(job);
        }
    }
    out.sort_by(|a, b| b["finished_at"].as_str().cmp(&a["finished_at"].as_str()));
    out.truncate(limit);
    Ok(out)
}

#[derive(Debug, Deserialize)]
struct Page {
    limit: Option<usize>,
}

async fn dead_letters(
    State(state): State<AppState>,
    Query(page): Query<Page>,
) -> Result<Json<Value>, ApiError> {
    let limit = page.limit.unwrap_or(50).clamp(1, 500);
    Ok(Json(json!({ "dead": dead_json(&state, limit).await? })))
}

async fn requeue(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = job_id(&id)?;
    let (backend, _) = state.queues.find(&id).await?;
    match backend.queue.dead_letter().requeue(&id).await? {
        true => Ok(Json(json!({ "id": id, "state": JobState::Queued }))),
        false => Err(not_dead(&id)),
    }
}

async fn purge(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = job_id(&id)?;
    let (backend, _) = state.queues.find(&id).await?;
    match backend.queue.dead_letter().purge(&id).await? {
        true => Ok(StatusCode::NO_CONTENT),
        false => Err(not_dead(&id)),
    }
}

fn not_dead(id: &JobId) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "not_dead",
        format!("job {id} is not in the dead letters"),
    )
}

// ---------------------------------------------------------------------------------
// Operations

/// Liveness for load balancers: Redis answers, and how many workers heartbeat. Zero
/// workers is still 200: the API accepts jobs that will run when a worker starts.
async fn healthz(State(state): State<AppState>) -> Response {
    let count = async {
        let mut workers = 0;
        for backend in state.queues.all().await? {
            workers += backend.queue.stats().await?.workers;
        }
        Ok::<u64, ApiError>(workers)
    };
    match tokio::time::timeout(HEALTH_TIMEOUT, count).await {
        Ok(Ok(workers)) => Json(json!({ "redis": "ok", "workers": workers })).into_response(),
        Ok(Err(e)) => unhealthy(e.message),
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
    if let Err(e) = stats_json(&state).await {
        tracing::warn!(error = %e.message, "queue gauges not refreshed");
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
