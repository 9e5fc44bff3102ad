//! [`TtsHandler`]: the queue's [`Handler`] for speech. It validates the request,
//! synthesises it off the async runtime with per-sentence progress and cancellation,
//! stores the audio in a [`ResultStore`], and returns a [`SpeechResult`] that refers
//! to it.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::store::ResultStore;
use super::stream::{AudioStream, Tap};
use super::{
    AudioFormat, Caption, Limits, LongTextOptions, SynthesisRequest, Synthesizer, TtsError,
    synthesize_long, to_srt, to_vtt,
};
use crate::dedup::{Deduplicator, digest};
use crate::error::JobError;
use crate::worker::{Handler, JobContext};

/// What a speech job returns (stored as the job's result): where the audio is and
/// what it is. The audio itself is in the [`ResultStore`], once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SpeechResult {
    /// The reference to pass to [`ResultStore::get`].
    pub audio: String,
    /// The audio's encoding.
    pub format: AudioFormat,
    /// Its MIME type, for an HTTP response.
    pub mime_type: String,
    /// Samples per second.
    pub sample_rate: u32,
    /// Length of the audio in milliseconds.
    pub duration_ms: u64,
    /// Size of the encoded audio.
    pub bytes: u64,
    /// One caption per spoken chunk, timed against the audio.
    pub captions: Vec<Caption>,
}

impl SpeechResult {
    /// The captions as SubRip.
    pub fn srt(&self) -> String {
        to_srt(&self.captions)
    }

    /// The captions as WebVTT.
    pub fn vtt(&self) -> String {
        to_vtt(&self.captions)
    }

    /// The audio's length.
    pub fn duration(&self) -> Duration {
        Duration::from_millis(self.duration_ms)
    }
}

/// The deduplicator for speech: two requests are the same job when their normalised
/// text, voice and every audio parameter are the same.
pub fn deduplicator(ttl: Duration) -> Deduplicator<SynthesisRequest> {
    Deduplicator::by(ttl, SynthesisRequest::dedup_fields)
}

/// A queue validator for speech (see [`QueueBuilder::validate`](crate::QueueBuilder::validate)):
/// requests that break `limits` or name a voice outside `voices` are refused at
/// enqueue, so a bad request never reaches a worker.
pub fn validator(
    limits: Limits,
    voices: Vec<super::Voice>,
) -> impl Fn(&SynthesisRequest) -> Result<(), String> + Send + Sync + 'static {
    move |request| {
        request
            .validate(&limits, &voices)
            .map_err(|e| e.to_string())
    }
}

/// Runs speech jobs with one [`Synthesizer`] (a model loaded once per worker) and one
/// [`ResultStore`].
#[derive(Clone)]
pub struct TtsHandler {
    synthesizer: Arc<dyn Synthesizer>,
    store: Arc<dyn ResultStore>,
    limits: Limits,
    long_text: LongTextOptions,
    audio_ttl: Duration,
    stream: Option<AudioStream>,
}

impl std::fmt::Debug for TtsHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TtsHandler")
            .field("store", &self.store)
            .field("limits", &self.limits)
            .field("long_text", &self.long_text)
            .field("audio_ttl", &self.audio_ttl)
            .field("stream", &self.stream)
            .finish_non_exhaustive()
    }
}

impl TtsHandler {
    /// A handler over `synthesizer`, storing audio in `store`.
    pub fn new(synthesizer: impl Synthesizer + 'static, store: impl ResultStore + 'static) -> Self {
        Self::from_shared(Arc::new(synthesizer), Arc::new(store))
    }

    /// A handler over shared parts (one model serving several handlers).
    pub fn from_shared(synthesizer: Arc<dyn Synthesizer>, store: Arc<dyn ResultStore>) -> Self {
        TtsHandler {
            synthesizer,
            store,
            limits: Limits::default(),
            long_text: LongTextOptions::default(),
            audio_ttl: Duration::from_secs(86_400),
            stream: None,
        }
    }

    /// Publishes each job's audio chunk by chunk while it is made (see [`AudioStream`]),
    /// so a reader gets the first sentence before the job ends.
    pub fn stream(mut self, stream: AudioStream) -> Self {
        self.stream = Some(stream);
        self
    }

    /// Request bounds (checked again here: a producer may not have).
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// How long text is split, batched and joined.
    pub fn long_text(mut self, options: LongTextOptions) -> Self {
        self.long_text = options;
        self
    }

    /// How long stores with expiry keep the audio (default 24 h; keep it at least
    /// the queue's result TTL).
    pub fn audio_ttl(mut self, ttl: Duration) -> Self {
        self.audio_ttl = ttl;
        self
    }

    /// The store the audio goes to.
    pub fn store(&self) -> &Arc<dyn ResultStore> {
        &self.store
    }
}

fn job_error(e: TtsError) -> JobError {
    match e {
        TtsError::Cancelled => JobError::Cancelled,
        e if e.is_retryable() => JobError::transient(e),
        e => JobError::permanent(e),
    }
}

/// A stream write that failed costs the listeners their live audio, not the job: the
/// result still goes to the store.
fn publish(written: Result<(), crate::Error>) {
    if let Err(e) = written {
        tracing::debug!(error = %e, "audio stream not written");
    }
}

impl Handler<SynthesisRequest> for TtsHandler {
    type Output = SpeechResult;

    async fn handle(
        &self,
        request: SynthesisRequest,
        ctx: JobContext,
    ) -> Result<SpeechResult, JobError> {
        request
            .validate(&self.limits, &self.synthesizer.voices())
            .map_err(job_error)?;
        let request = request.normalized();
        // Content-addressed: the same request always lands on the same object.
        let key = format!(
            "{}.{}",
            digest(&request.dedup_fields()),
            request.format.extension()
        );

        // Inference is blocking: it runs on the blocking pool, reporting each finished
        // sentence through a channel and stopping between sentences when cancelled.
        let (tx, mut progress) = tokio::sync::mpsc::unbounded_channel::<(usize, usize)>();
        let cancel = ctx.cancellation().clone();
        let (synthesizer, options, req) = (
            self.synthesizer.clone(),
            self.long_text.clone(),
            request.clone(),
        );
        // With a stream, a tap hands each chunk over as the backend returns it.
        let (chunk_tx, mut chunks) = tokio::sync::mpsc::unbounded_channel();
        let synthesizer: Arc<dyn Synthesizer> = match &self.stream {
            Some(stream) => {
                let rate = request.sample_rate.unwrap_or(synthesizer.sample_rate());
                publish(stream.start(ctx.id(), ctx.attempt(), rate).await);
                Arc::new(Tap {
                    inner: synthesizer,
                    sink: chunk_tx,
                    pause: options.pause,
                    rate: request.sample_rate,
                    sent: Default::default(),
                })
            }
            None => synthesizer,
        };
        // Through the context, so a timed-out job's slot stays busy until the
        // synthesis really ends: no second job starts on a device still in use.
        let work = ctx.run_blocking(move || {
            let mut report = |done: usize, total: usize| {
                let _ = tx.send((done, total));
                !cancel.is_cancelled()
            };
            synthesize_long(&*synthesizer, &req, &options, &mut report)
        });
        tokio::pin!(work);
        let synthesis = loop {
            tokio::select! {
                joined = &mut work => break joined,
                Some(chunk) = chunks.recv() => {
                    if let Some(stream) = &self.stream {
                        publish(stream.push(ctx.id(), &chunk).await);
                    }
                }
                Some((done, total)) = progress.recv() => {
                    // Encoding and storing remain: never report 100 % before they are done.
                    let percent = 95.0 * done as f32 / total.max(1) as f32;
                    if let Err(e) = ctx.progress(percent).await {
                        tracing::debug!(error = %e, "progress not recorded");
                    }
                }
            }
        };
        let synthesis = synthesis.and_then(|s| s.map_err(job_error));
        if let Some(stream) = &self.stream {
            // The chunks the tap sent before the thread ended are still in the channel.
            while let Ok(chunk) = chunks.try_recv() {
                publish(stream.push(ctx.id(), &chunk).await);
            }
            publish(match &synthesis {
                Ok(_) => stream.finish(ctx.id()).await,
                Err(e) => stream.fail(ctx.id(), &e.to_string()).await,
            });
        }
        let synthesis = synthesis?;

        let bytes = synthesis.audio.encode(request.format).map_err(job_error)?;
        let audio = self
            .store
            .put(&key, &bytes, self.audio_ttl)
            .await
            .map_err(JobError::transient)?;
        Ok(SpeechResult {
            audio,
            format: request.format,
            mime_type: request.format.mime_type().to_owned(),
            sample_rate: synthesis.audio.sample_rate,
            duration_ms: synthesis.audio.duration().as_millis() as u64,
            bytes: bytes.len() as u64,
            captions: synthesis.captions,
        })
    }
}
