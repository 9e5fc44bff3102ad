//! Text to speech on top of the job queue.
//!
//! The generic queue moves opaque jobs; this layer is what makes a job *speech*. It exists
//! so that every producer and worker agrees on one request format, one set of validation
//! rules and one notion of "the same request", and so that a backend author writes only
//! "text in, samples out" and gets long text, captions, progress and cancellation for free.
//!
//! How the pieces fit, in the order a job meets them:
//!
//! 1. A producer builds a [`SynthesisRequest`] and calls [`SynthesisRequest::validate`]
//!    against its [`Limits`] and the backend's [`Voice`]s: bad requests become a typed
//!    [`TtsError`] and are never enqueued.
//! 2. The queue hashes [`SynthesisRequest::dedup_fields`], whose text is [`normalize`]d, so
//!    requests that would sound identical become one job.
//! 3. A worker runs [`synthesize_long`] with its [`Synthesizer`] (for example the offline
//!    [`EspeakSynthesizer`]): the text is split by [`split_sentences_max`], spoken chunk by
//!    chunk (or batch by batch), joined with pauses into one [`Audio`], resampled if asked,
//!    and paired with a [`Caption`] per chunk.
//! 4. The result is encoded with [`Audio::encode`] in the requested [`AudioFormat`], and the
//!    captions with [`to_srt`] or [`to_vtt`].
//!
//! Everything up to step 4 is pure or blocking, so it is tested without a server and runs
//! wherever the worker puts blocking work. Only the last two modules meet the queue:
//! [`TtsHandler`] is a [`Handler`](crate::Handler) that runs the steps above off the async
//! runtime and keeps the audio in a [`ResultStore`]; the job's result is a
//! [`SpeechResult`] that refers to it.
//!
//! # Layout
//!
//! - `error` — [`TtsError`] and its retry/validation classifiers.
//! - `request` — [`SynthesisRequest`], [`AudioFormat`], [`Limits`], validation, dedup fields.
//! - `text` — normalisation and sentence chunking.
//! - `audio` — [`Audio`] buffers, resampling, WAV/PCM encoding, WAV decoding.
//! - `captions` — [`Caption`], SRT and WebVTT output.
//! - `synthesizer` — the [`Synthesizer`] trait, [`Voice`], and the long-text driver.
//! - `espeak` — the offline `espeak-ng` backend.
//! - `batch` — [`BatchingSynthesizer`]: concurrent jobs share one batched generation.
//! - `store` — [`ResultStore`]: audio in Redis or in a directory.
//! - `catalog` — [`Catalog`]: the voices live workers publish, routing by backend queue.
//! - `stream` — [`AudioStream`]: a job's audio in Redis chunk by chunk while it is made.
//! - `handler` — [`TtsHandler`], the queue's handler for speech, and [`SpeechResult`].
//! - `candle` — the Parler-TTS backend on Candle (feature `candle`, on by default;
//!   `cuda` and `metal` add the accelerators).

pub mod audio;
pub mod batch;
#[cfg(feature = "candle")]
pub mod candle;
pub mod captions;
pub mod catalog;
pub mod error;
pub mod espeak;
pub mod handler;
pub mod request;
pub mod store;
pub mod stream;
pub mod synthesizer;
pub mod text;

pub use audio::{Audio, decode_wav};
pub use batch::BatchingSynthesizer;
pub use captions::{Caption, to_srt, to_vtt};
pub use catalog::{Catalog, CatalogError, CatalogVoice, CustomVoice, WorkerVoices, backend_queue};
pub use error::TtsError;
pub use espeak::EspeakSynthesizer;
pub use handler::{SpeechResult, TtsHandler, deduplicator, validator};
pub use request::{AudioFormat, Limits, SynthesisRequest};
pub use store::{FileStore, RedisStore, ResultStore, StoreError};
pub use stream::{AudioStream, StreamEvent, StreamReader};
pub use synthesizer::{LongTextOptions, Synthesis, Synthesizer, Voice, synthesize_long};
pub use text::{normalize, split_sentences, split_sentences_max};
