//! The Candle backends: neural voices that run natively on the CPU, CUDA or Metal.
//!
//! Each model family lives in its own folder over what they all share:
//!
//! - [Parler-TTS](parler) — a voice described in words ([`ParlerSynthesizer`]).
//! - [Piper](piper) — VITS voices from their ONNX files ([`PiperSynthesizer`]).
//! - [Kokoro](kokoro) — Kokoro-82M from its int8 ONNX export ([`KokoroSynthesizer`]).
//!
//! Shared by all of them:
//!
//! - `device` — [`DeviceChoice`] and [`Precision`]: the only module that knows devices.
//! - `options` — [`CandleOptions`] (device, precision, batch size), which every family's
//!   options hold, with their setters written once.
//! - `error` — [`LoadError`], the loading failures every family has (missing file, missing
//!   or mis-shaped tensor, unusable device, option out of range); each family's own error
//!   wraps it.
//! - `batched` — the request-by-request preparation and model batching every backend shares.
//! - `sample` — a seeded random source and top-k / top-p sampling.
//! - `hub` — download from the Hugging Face hub (feature `hub`).
//! - `fetched` — [`voices_dir`], where fetched weights are found by default.
//! - `onnx` — the ONNX messages a weight reader needs (Piper and Kokoro ship ONNX files).
//! - `time_major`, `fused` — the time-major convolutions and one-pass CPU kernels of the
//!   Piper and Kokoro decoders.
//!
//! The public items of every family are re-exported here, so
//! `voxqueue::tts::candle::ParlerSynthesizer` and `voxqueue::tts::candle::PiperSynthesizer`
//! keep working.
//!
//! ```no_run
//! use voxqueue::tts::candle::{DeviceChoice, ParlerOptions, ParlerSynthesizer};
//! use voxqueue::tts::{SynthesisRequest, Synthesizer};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let tts = ParlerSynthesizer::load(
//!     "models/parler-tts-mini-v1",
//!     ParlerOptions::new().with_device(DeviceChoice::Auto).with_seed(42),
//! )?;
//! let audio = tts.synthesize(&SynthesisRequest::new("Hello there.", "laura"))?;
//! assert_eq!(audio.sample_rate, tts.sample_rate());
//! # Ok(()) }
//! ```

mod batched;
mod device;
mod direct;
mod error;
mod fetched;
mod fused;
#[cfg(feature = "hub")]
mod hub;
pub mod kokoro;
mod onnx;
mod options;
pub mod parler;
pub mod piper;
mod sample;
mod time_major;
mod unfold;
mod vector;

pub use device::{DeviceChoice, Precision};
pub use error::LoadError;
pub use fetched::voices_dir;
#[cfg(feature = "hub")]
pub use hub::download_from_hub;
pub use kokoro::{
    KOKORO_MODEL_FILE, KOKORO_SAMPLE_RATE, KokoroError, KokoroOptions, KokoroSynthesizer,
    KokoroTrace,
};
pub use options::CandleOptions;
pub use parler::{
    DEFAULT_DESCRIPTION, ModelError, ParlerOptions, ParlerSynthesizer, TINY_HOP_LENGTH,
    TINY_NUM_CODEBOOKS, TINY_SAMPLE_RATE, default_voices, write_tiny_model,
};
pub use piper::{PiperError, PiperOptions, PiperScales, PiperSynthesizer, PiperTrace};
