//! Piper voices: VITS text-to-speech running natively on Candle.
//!
//! [Piper] publishes hundreds of voices as ONNX files with a JSON config beside them
//! (`en_US-joe-medium.onnx` + `en_US-joe-medium.onnx.json`). This module reads the ONNX
//! file's weights and runs the VITS network itself with candle-nn, so a worker needs no
//! ONNX runtime and runs on the CPU, CUDA or Metal like the other Candle backends
//! (candle's own ONNX interpreter cannot run this graph: it lacks ConvTranspose, GatherND,
//! NonZero and RandomNormalLike).
//!
//! ```no_run
//! use voxqueue::tts::candle::{PiperOptions, PiperSynthesizer};
//! use voxqueue::tts::{SynthesisRequest, Synthesizer};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let tts = PiperSynthesizer::load("voices/en_US-joe-medium.onnx", PiperOptions::new())?;
//! let audio = tts.synthesize(&SynthesisRequest::new("Hello there.", "en_US-joe-medium"))?;
//! assert_eq!(audio.sample_rate, 22_050);
//! # Ok(()) }
//! ```
//!
//! Text becomes phonemes through the `espeak-ng` program (as Piper does through eSpeak NG's
//! library), clause punctuation included; see `phonemize`. The model is proved against ONNX
//! Runtime on the same file (`tests/it/piper.rs` with `tests/fixtures/piper_reference.py`).
//!
//! # Layout
//!
//! - `onnx` — the ONNX protobuf's weights as tensors under their PyTorch names.
//! - `config` — the voice's `.onnx.json`.
//! - `phonemize` — text to ids through `espeak-ng`.
//! - `layers` — convolutions with the graph's attributes, channel norm, masks.
//! - `encoder` — the text encoder with windowed relative attention.
//! - `spline` — the inverse rational-quadratic spline.
//! - `duration` — the stochastic duration predictor.
//! - `flow` — the residual coupling flow.
//! - `decoder` — the HiFi-GAN generator.
//! - `model` — VITS inference for a batch.
//! - `synthesizer` — [`PiperSynthesizer`], [`PiperOptions`], [`PiperScales`], [`PiperTrace`].
//! - `error` — [`PiperError`].
//!
//! [Piper]: https://github.com/rhasspy/piper

mod config;
mod decoder;
mod duration;
mod encoder;
mod error;
mod flow;
mod layers;
mod model;
mod onnx;
pub(crate) mod phonemize;
mod spline;
mod synthesizer;

pub use error::PiperError;
pub use synthesizer::{PiperOptions, PiperScales, PiperSynthesizer, PiperTrace};
