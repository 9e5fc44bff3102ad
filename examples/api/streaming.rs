//! Streams out: a job's events (SSE) and a job's audio as it is made, relayed from the
//! worker's per-job Redis stream (`voxqueue::tts::AudioStream`).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use futures::stream::{self, BoxStream, StreamExt};
use serde::Deserialize;
use serde_json::json;
use voxqueue::tts::{self, AudioFormat, SpeechResult, StreamEvent, StreamReader, SynthesisRequest};
use voxqueue::{EventKind, EventStream, JobEvent, JobId, JobState, JobStatus, Queue};

use crate::error::{ApiError, job_id};
use crate::routes::{expired, rfc3339, status_json, stored_audio};
use crate::state::{AppState, Backend};

/// The job's events as Server-Sent Events: first an `event: state` with the job's
/// current status (a subscriber that arrives late, even after the end, is told where
/// the job is instead of waiting for an event that already happened), then each event
/// of this job by its kind (`active`, `progress`, `completed`, ...), ending after a
/// terminal one.
pub(crate) async fn events(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = job_id(&id)?;
    let (backend, _) = state.queues.find(&id).await?;
    // Subscribe before reading the state: whatever happens in between is then either
    // in the state we send or among the events that follow it.
    let subscription = backend.queue.events().await?;
    let status = backend.queue.status(&id).await?;
    let first = stream::once(std::future::ready(Ok(state_event(&status))));
    let rest: BoxStream<'static, Result<Event, Infallible>> = if status.state.is_terminal() {
        stream::empty().boxed()
    } else {
        let follow = Follow {
            queue: backend.queue.clone(),
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
            // A client too slow for the broadcast, or a reader that reconnected or fell
            // behind a trimmed stream (`Gap`), may have skipped the terminal event: the
            // job's state says whether it is over.
            let gap = event.kind == EventKind::Gap;
            if gap || self.events.missed() > self.missed {
                self.missed = self.events.missed();
                if let Ok(status) = self.queue.status(&self.id).await
                    && status.state.is_terminal()
                {
                    return Some((state_event(&status), None));
                }
            }
            if gap || event.job_id != self.id {
                continue;
            }
            let done = event.kind.is_terminal();
            return Some((job_event(&event), (!done).then_some(self)));
        }
    }
}

pub(crate) fn job_event(e: &JobEvent) -> Event {
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
// Audio as it is made

/// How audio bytes go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wire {
    /// A WAV header (lengths unknown: the streamed-WAV convention), then samples.
    Wav,
    /// Raw mono s16le samples; the rate is in `X-Sample-Rate`.
    Pcm,
    /// FLAC, sent whole once the audio is complete (a FLAC stream starts with a header
    /// that holds the total length and checksum).
    Flac,
}

impl Wire {
    fn content_type(self) -> &'static str {
        match self {
            Wire::Wav => "audio/wav",
            Wire::Pcm => "audio/pcm",
            Wire::Flac => "audio/flac",
        }
    }
}

/// How the response frames them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// A chunked binary body.
    Binary,
    /// Server-Sent Events: `speech.audio.delta` with base64 audio, then `speech.audio.done`.
    Sse,
}

/// A WAV header for 16-bit mono at `rate` whose lengths say "until the end" (the
/// placeholder streaming encoders write when they cannot seek back).
pub(crate) fn streaming_wav_header(rate: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(44);
    h.extend_from_slice(b"RIFF");
    h.extend_from_slice(&u32::MAX.to_le_bytes());
    h.extend_from_slice(b"WAVEfmt ");
    h.extend_from_slice(&16u32.to_le_bytes());
    h.extend_from_slice(&1u16.to_le_bytes()); // PCM
    h.extend_from_slice(&1u16.to_le_bytes()); // mono
    h.extend_from_slice(&rate.to_le_bytes());
    h.extend_from_slice(&(rate * 2).to_le_bytes());
    h.extend_from_slice(&2u16.to_le_bytes());
    h.extend_from_slice(&16u16.to_le_bytes());
    h.extend_from_slice(b"data");
    h.extend_from_slice(&u32::MAX.to_le_bytes());
    h
}

/// A stored WAV as s16le samples at `rate`: its own samples when it is 16-bit mono at
/// that rate (decoding to float and back would move loud samples by one step).
fn wav_to_pcm(wav: &[u8], rate: u32) -> Result<Vec<u8>, ApiError> {
    if let Ok(reader) = hound::WavReader::new(std::io::Cursor::new(wav)) {
        let spec = reader.spec();
        let len = reader.len() as usize * 2;
        if spec.channels == 1
            && spec.bits_per_sample == 16
            && spec.sample_format == hound::SampleFormat::Int
            && spec.sample_rate == rate
            && let Some(data) = data_chunk(wav).filter(|d| d.len() >= len)
        {
            // The samples are already s16le: the bytes after the header are the answer.
            return Ok(data[..len].to_vec());
        }
    }
    let audio = tts::decode_wav(wav).map_err(|e| ApiError::internal("stored audio", e))?;
    let audio = if audio.sample_rate == rate {
        audio
    } else {
        audio.resample(rate)
    };
    audio
        .encode(AudioFormat::PcmI16)
        .map_err(|e| ApiError::internal("encoding", e))
}

/// s16le mono samples as a FLAC file (pure-Rust `flacenc`).
pub(crate) fn encode_flac(pcm: &[u8], rate: u32) -> Result<Vec<u8>, String> {
    use flacenc::component::BitRepr;
    use flacenc::error::Verify;
    let samples: Vec<i32> = pcm
        .chunks_exact(2)
        .map(|b| i32::from(i16::from_le_bytes([b[0], b[1]])))
        .collect();
    let config = flacenc::config::Encoder::default()
        .into_verified()
        .map_err(|(_, e)| format!("FLAC settings: {e:?}"))?;
    let source = flacenc::source::MemSource::from_samples(&samples, 1, 16, rate as usize);
    let stream = flacenc::encode_with_fixed_block_size(&config, source, config.block_size)
        .map_err(|e| format!("FLAC encoding: {e:?}"))?;
    let mut sink = flacenc::bitsink::ByteSink::new();
    stream
        .write(&mut sink)
        .map_err(|e| format!("FLAC encoding: {e:?}"))?;
    Ok(sink.as_slice().to_vec())
}

/// The payload of a RIFF/WAVE file's `data` chunk.
fn data_chunk(wav: &[u8]) -> Option<&[u8]> {
    let mut at = 12;
    while at + 8 <= wav.len() {
        let id = &wav[at..at + 4];
        let size = u32::from_le_bytes(wav[at + 4..at + 8].try_into().ok()?) as usize;
        if id == b"data" {
            return wav.get(at + 8..);
        }
        at += 8 + size + size % 2;
    }
    None
}

/// One `speech.audio.delta` event: base64 audio, as OpenAI's streaming speech sends it.
fn delta(bytes: &[u8]) -> Event {
    let audio = base64::engine::general_purpose::STANDARD.encode(bytes);
    Event::default()
        .event("speech.audio.delta")
        .data(json!({ "type": "speech.audio.delta", "audio": audio }).to_string())
}

/// What the relay produces, before framing.
enum Piece {
    Audio(Vec<u8>),
    Failed(String),
}

/// Follows a job's stream; at its end (or if the stream is gone) asks the queue.
struct Relay {
    reader: StreamReader,
    backlog: Vec<StreamEvent>,
    backend: Backend,
    id: JobId,
    rate: u32,
    sent_audio: bool,
    over: bool,
}

impl Relay {
    /// The next pieces, or `None` when the job's audio is all out.
    async fn next(&mut self) -> Option<Vec<Piece>> {
        if self.over {
            return None;
        }
        loop {
            let events = match std::mem::take(&mut self.backlog) {
                backlog if !backlog.is_empty() => backlog,
                _ => match self.reader.next(Duration::from_secs(1)).await {
                    Ok(events) => events,
                    Err(e) => return self.end(format!("reading the audio stream: {e}")),
                },
            };
            if events.is_empty() {
                // Quiet: a job that ended without a `done` (its stream expired, or it
                // was never streamed) is answered from the queue.
                match self.backend.queue.status(&self.id).await {
                    Ok(status) if status.state == JobState::Completed => {
                        return self.stored().await;
                    }
                    Ok(status) if status.state.is_terminal() => {
                        return self.end(format!("job {} is {}", self.id, status.state));
                    }
                    Ok(_) => continue,
                    Err(e) => return self.end(e.to_string()),
                }
            }
            let mut out = Vec::new();
            for event in events {
                match event {
                    StreamEvent::Audio(pcm) => {
                        self.sent_audio = true;
                        out.push(Piece::Audio(pcm));
                    }
                    StreamEvent::Done => {
                        self.over = true;
                        return Some(out);
                    }
                    // A failed attempt is retried from its start: before any audio went
                    // out the retry's audio can follow; after, it cannot be spliced in.
                    StreamEvent::Failed(error) if self.sent_audio => {
                        self.over = true;
                        out.push(Piece::Failed(error));
                        return Some(out);
                    }
                    _ => {}
                }
            }
            if !out.is_empty() {
                return Some(out);
            }
        }
    }

    fn end(&mut self, error: String) -> Option<Vec<Piece>> {
        self.over = true;
        Some(vec![Piece::Failed(error)])
    }

    async fn stored(&mut self) -> Option<Vec<Piece>> {
        self.over = true;
        if self.sent_audio {
            return Some(Vec::new());
        }
        let pcm = async {
            let result: SpeechResult = self
                .backend
                .queue
                .result(&self.id)
                .await?
                .ok_or_else(|| expired(&self.id))?;
            let wav = stored_audio(&self.backend, &self.id, &result).await?;
            wav_to_pcm(&wav, self.rate)
        };
        match pcm.await {
            Ok(pcm) => Some(vec![Piece::Audio(pcm)]),
            Err(e) => Some(vec![Piece::Failed(e.message)]),
        }
    }
}

/// The audio of job `id` as it is made: from the worker's stream while it runs, from the
/// store once it is completed. `rate` is the voice's (from the catalogue) when the caller
/// knows it; else the relay waits for the attempt's start, which carries it.
pub(crate) async fn relay(
    backend: Backend,
    id: JobId,
    rate: Option<u32>,
    wire: Wire,
    framing: Framing,
) -> Result<Response, ApiError> {
    let status = backend.queue.status(&id).await?;
    let (rate, pieces): (u32, BoxStream<'static, Piece>) = if status.state == JobState::Completed {
        // Served whole from the store: the stream may be gone, the file is not.
        let result: SpeechResult = backend
            .queue
            .result(&id)
            .await?
            .ok_or_else(|| expired(&id))?;
        let rate = rate.unwrap_or(result.sample_rate);
        let wav = stored_audio(&backend, &id, &result).await?;
        (
            rate,
            stream::iter([Piece::Audio(wav_to_pcm(&wav, rate)?)]).boxed(),
        )
    } else if status.state.is_terminal() {
        return Err(ApiError::not_completed(&id, status.state));
    } else {
        let mut reader = backend.stream.reader(&id).await?;
        let mut backlog = Vec::new();
        let rate = match rate {
            Some(rate) => rate,
            None => loop {
                let events = reader.next(Duration::from_secs(1)).await?;
                let started = events.iter().find_map(|e| match e {
                    StreamEvent::Started { sample_rate, .. } => Some(*sample_rate),
                    _ => None,
                });
                backlog.extend(events);
                if let Some(rate) = started {
                    break rate;
                }
                let state = backend.queue.status(&id).await?.state;
                if state.is_terminal() {
                    // Ended while we waited: answer as for a late caller.
                    return Box::pin(relay(backend, id, None, wire, framing)).await;
                }
            },
        };
        let relay = Relay {
            reader,
            backlog,
            backend: backend.clone(),
            id: id.clone(),
            rate,
            sent_audio: false,
            over: false,
        };
        let pieces = stream::unfold(relay, |mut relay| async move {
            let pieces = relay.next().await?;
            Some((stream::iter(pieces), relay))
        })
        .flatten()
        .boxed();
        (rate, pieces)
    };
    let pieces = match wire {
        // FLAC waits for the whole audio, then goes out as one piece.
        Wire::Flac => stream::once(async move {
            let mut pieces = pieces;
            let mut pcm = Vec::new();
            while let Some(piece) = pieces.next().await {
                match piece {
                    Piece::Audio(bytes) => pcm.extend(bytes),
                    failed @ Piece::Failed(_) => return failed,
                }
            }
            encode_flac(&pcm, rate).map_or_else(Piece::Failed, Piece::Audio)
        })
        .boxed(),
        Wire::Wav | Wire::Pcm => pieces,
    };
    let header = (wire == Wire::Wav).then(|| streaming_wav_header(rate));
    let job_header = HeaderValue::from_str(id.as_str()).map_err(|e| ApiError::internal("id", e))?;
    let mut response = match framing {
        Framing::Binary => {
            let head = stream::iter(header.map(|h| Ok(Bytes::from(h))));
            let body = pieces.map(|piece| match piece {
                Piece::Audio(pcm) => Ok(Bytes::from(pcm)),
                // The status line is long gone: breaking the chunked body is how an HTTP
                // client learns the audio is incomplete.
                Piece::Failed(error) => Err(std::io::Error::other(error)),
            });
            let mut r = Body::from_stream(head.chain(body)).into_response();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(wire.content_type()),
            );
            r
        }
        Framing::Sse => {
            let head = stream::iter(header.map(|h| delta(&h)));
            // `done` only after all the audio: a failed stream ends with `error` instead.
            let failed = Arc::new(AtomicBool::new(false));
            let seen = failed.clone();
            let body = pieces.map(move |piece| match piece {
                Piece::Audio(pcm) => delta(&pcm),
                Piece::Failed(error) => {
                    seen.store(true, Ordering::SeqCst);
                    Event::default()
                        .event("error")
                        .data(json!({ "type": "error", "error": { "message": error } }).to_string())
                }
            });
            let done = stream::once(async move {
                (!failed.load(Ordering::SeqCst)).then(|| {
                    Event::default()
                        .event("speech.audio.done")
                        .data(json!({ "type": "speech.audio.done" }).to_string())
                })
            })
            .filter_map(std::future::ready);
            let events = head.chain(body).chain(done).map(Ok::<_, Infallible>);
            Sse::new(events)
                .keep_alive(KeepAlive::default())
                .into_response()
        }
    };
    let headers = response.headers_mut();
    headers.insert("x-job-id", job_header);
    headers.insert("x-sample-rate", HeaderValue::from(rate));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

#[derive(Debug, Deserialize)]
pub(crate) struct StreamQuery {
    format: Option<String>,
}

/// `GET /v1/jobs/{id}/stream?format=wav|pcm`: what an `<audio src>` can play while the
/// job runs.
pub(crate) async fn job_stream(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<StreamQuery>,
) -> Result<Response, ApiError> {
    let id = job_id(&id)?;
    let wire = match query.format.as_deref() {
        None | Some("wav") => Wire::Wav,
        Some("pcm") => Wire::Pcm,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "format {other:?}: this route streams wav or pcm"
            )));
        }
    };
    let (backend, _) = state.queues.find(&id).await?;
    relay(backend, id, None, wire, Framing::Binary).await
}
