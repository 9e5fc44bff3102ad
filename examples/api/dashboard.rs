//! The dashboard at `/`: one HTML page embedded in the binary (no build step), kept live
//! by `GET /v1/admin/live`, Server-Sent Events of queue snapshots pushed when the
//! queues change (and every few seconds for the sparklines), so the page never polls.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use futures::stream::{self, StreamExt};
use serde_json::{Value, json};

use crate::auth::{Role, caller};
use crate::error::ApiError;
use crate::routes::{dead_json, stats_json, status_json};
use crate::state::AppState;

const PAGE: &str = include_str!("dashboard.html");
const LOGIN: &str = include_str!("login.html");

/// Snapshots go out at least this often (sparklines keep moving on a quiet queue)...
const TICK: Duration = Duration::from_secs(3);
/// ...and at most this often (a busy queue's events are coalesced).
const MIN_GAP: Duration = Duration::from_millis(300);

/// Running jobs listed per queue at most (a dashboard row, not a report).
const CURRENT_JOBS: usize = 100;

/// The page; a key form when keys are set and the browser has no admin key.
pub(crate) async fn page(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let page = match caller(&state, &headers) {
        Some(c) if c.role == Role::Admin => PAGE,
        _ => LOGIN,
    };
    ([(header::CACHE_CONTROL, "no-store")], Html(page)).into_response()
}

/// Everything the page shows, at one moment.
pub(crate) async fn snapshot(state: &AppState) -> Result<Value, ApiError> {
    let queues = stats_json(state).await?;
    let catalog = &state.queues.catalog;
    let recent: Vec<_> = state.recent.lock().expect("lock").iter().cloned().collect();
    let mut jobs = Vec::new();
    for r in recent {
        let Ok(backend) = state.queues.backend(&r.backend).await else {
            continue;
        };
        if let Ok(status) = backend.queue.status(&r.id).await {
            let mut job = status_json(&status);
            job["backend"] = json!(r.backend);
            job["voice"] = json!(r.voice);
            job["text"] = json!(r.text);
            jobs.push(job);
        }
    }
    // Each worker's current jobs, from the queues' `active` index: what runs now
    // anywhere, not only what this API process enqueued.
    let mut running: Vec<(String, Value)> = Vec::new();
    for backend in state.queues.all().await? {
        for status in backend.queue.active_jobs(CURRENT_JOBS).await? {
            if let Some(worker) = status.worker.clone() {
                running.push((worker, json!(status.id)));
            }
        }
    }
    let workers: Vec<Value> = catalog
        .workers()
        .await?
        .into_iter()
        .map(|w| {
            let current: Vec<&Value> = running
                .iter()
                .filter(|(worker, _)| *worker == w.worker)
                .map(|(_, id)| id)
                .collect();
            json!({
                "worker": w.worker,
                "backend": w.backend,
                "voices": w.voices.iter().map(|v| v.id()).collect::<Vec<_>>(),
                "current": current,
            })
        })
        .collect();
    Ok(json!({
        "queues": queues,
        "workers": workers,
        "voices": catalog.voices().await?,
        "custom": catalog.customs().await?,
        "recent": jobs,
        "dead": dead_json(state, 20).await?,
    }))
}

/// `GET /v1/admin/live`: a snapshot now, then one after every burst of queue events.
pub(crate) async fn live(State(state): State<AppState>) -> Result<Response, ApiError> {
    let mut subscriptions = Vec::new();
    for backend in state.queues.all().await? {
        subscriptions.push(backend.queue.events().await?);
    }
    let changes = stream::select_all(subscriptions.into_iter().map(|s| {
        stream::unfold(s, |mut s| async move { s.recv().await.map(|_| ((), s)) }).boxed()
    }));
    let ticks = stream::unfold((), |()| async {
        tokio::time::sleep(TICK).await;
        Some(((), ()))
    });
    // Whatever arrived while a snapshot was made and sent becomes one more snapshot.
    let triggers = stream::once(async {})
        .chain(stream::select(changes, ticks))
        .ready_chunks(1024);
    let events = triggers.then(move |_| {
        let state = state.clone();
        async move {
            let event = match snapshot(&state).await {
                Ok(s) => Event::default().event("snapshot").data(s.to_string()),
                Err(e) => Event::default()
                    .event("error")
                    .data(json!({ "message": e.message }).to_string()),
            };
            tokio::time::sleep(MIN_GAP).await;
            Ok::<_, Infallible>(event)
        }
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}
