//! `POST /v1/audio/speech`, as OpenAI's: the body every TTS client library sends, the
//! audio (or SSE deltas) in the answer, streamed as the worker makes it.
//!
//! It goes through the queue like every job (dedup, priorities, rate limits, retries,
//! leases): the handler enqueues, then relays the job's audio stream. An identical
//! request while the job runs streams the same audio; one after it finished is served
//! from the store.
//!
//! Formats: `wav` and `pcm` (raw s16le mono, the rate in `X-Sample-Rate`) stream as they
//! are made; `flac` (pure-Rust `flacenc`, Apache-2.0) is sent whole when the audio is
//! complete. `opus`, `mp3` and `aac` are refused with a 400 naming what is supported:
//! their well-kept encoders are C libraries (and LAME is LGPL), none is linked here, so
//! transcode on the client or put a proxy with ffmpeg in front.

use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::{Extension, Json};
use serde::Deserialize;
use voxqueue::tts::SynthesisRequest;

use crate::auth::Caller;
use crate::error::{ApiError, json_rejection};
use crate::routes::{JobParams, enqueue};
use crate::state::AppState;
use crate::streaming::{Framing, Wire, relay};

/// OpenAI's limit on `input`.
pub(crate) const MAX_INPUT_CHARS: usize = 4096;

/// The names OpenAI clients send as `model`: any live backend may answer them.
const OPENAI_MODELS: [&str; 3] = ["tts-1", "tts-1-hd", "gpt-4o-mini-tts"];

#[derive(Debug, Deserialize)]
pub(crate) struct SpeechRequest {
    model: String,
    input: String,
    voice: String,
    #[serde(default)]
    instructions: Option<String>,
    #[serde(default)]
    response_format: Option<String>,
    #[serde(default)]
    speed: Option<f32>,
    #[serde(default)]
    stream_format: Option<String>,
    #[serde(flatten)]
    params: JobParams,
}

pub(crate) async fn speech(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Json<SpeechRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(json_rejection)?;
    let wire = match body.response_format.as_deref().unwrap_or("wav") {
        "wav" => Wire::Wav,
        "pcm" => Wire::Pcm,
        "flac" => Wire::Flac,
        other => {
            return Err(ApiError::bad_request(format!(
                "response_format {other:?} is not encoded here; use \"wav\", \"pcm\" (raw s16le mono, rate in X-Sample-Rate) or \"flac\""
            )));
        }
    };
    let framing = match body.stream_format.as_deref().unwrap_or("audio") {
        "audio" => Framing::Binary,
        "sse" => Framing::Sse,
        other => {
            return Err(ApiError::bad_request(format!(
                "stream_format {other:?}: use \"audio\" or \"sse\""
            )));
        }
    };
    let chars = body.input.chars().count();
    if chars > MAX_INPUT_CHARS {
        return Err(ApiError::invalid(format!(
            "input has {chars} characters; at most {MAX_INPUT_CHARS}"
        )));
    }
    let speed = body.speed.unwrap_or(1.0);
    if !(0.25..=4.0).contains(&speed) {
        return Err(ApiError::invalid(format!(
            "speed {speed} is outside 0.25 to 4"
        )));
    }
    // `model` names a backend, or is one of OpenAI's names (then the voice decides).
    let (voice, _) = state.queues.resolve(&body.voice).await?;
    if !OPENAI_MODELS.contains(&body.model.as_str()) && body.model != voice.backend {
        return Err(ApiError::invalid(format!(
            "model {:?}: voice {:?} is spoken by {:?} (or send one of {})",
            body.model,
            body.voice,
            voice.backend,
            OPENAI_MODELS.join(", ")
        )));
    }
    // Stored as WAV whatever is asked: one job (and one dedup key) serves both formats.
    let mut request = SynthesisRequest::new(body.input, body.voice).with_speed(speed);
    if let Some(instructions) = body.instructions.filter(|i| !i.trim().is_empty()) {
        request = request.with_style(instructions);
    }
    let (backend, job, rate) = enqueue(&state, &caller, &headers, request, body.params).await?;
    let id = job.duplicate_of.unwrap_or(job.id);
    relay(backend, id, Some(rate), wire, framing).await
}
