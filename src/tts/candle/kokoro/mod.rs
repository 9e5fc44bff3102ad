//! Kokoro-82M v1.0 on Candle, read from its int8 ONNX export.
//!
//! [Kokoro] is a StyleTTS 2 model: PL-BERT (ALBERT) and a prosody predictor (bi-LSTMs,
//! AdaLayerNorm) turn phonemes and a 256-value voice style into durations, pitch and energy;
//! an iSTFTNet decoder turns those into 24 kHz audio. The weights come from the int8 ONNX
//! export (MIT, kokoro-onnx) of the Apache-2.0 model, dequantised to f32 at load; voices are
//! style tables (`[510, 1, 256]` f32, one row per phoneme count).
//!
//! ```no_run
//! use voxqueue::tts::candle::{KokoroOptions, KokoroSynthesizer};
//! use voxqueue::tts::{SynthesisRequest, Synthesizer};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let tts = KokoroSynthesizer::load("voices/kokoro/kokoro-v1.0.int8.onnx", KokoroOptions::new())?;
//! let audio = tts.synthesize(&SynthesisRequest::new("Hello there.", "af_heart"))?;
//! assert_eq!(audio.sample_rate, 24_000);
//! # Ok(()) }
//! ```
//!
//! Every stage is compared with ONNX Runtime on the same file (`tests.rs` with
//! `tests/fixtures/kokoro_reference.py`).
//!
//! # Layout
//!
//! - `phonemize` — text to misaki phonemes through `espeak-ng`, and Kokoro's vocabulary.
//! - `weights` — the ONNX file's weights, dequantised, under PyTorch-like names.
//! - `layers` — linear layers and convolutions with the export's 8-bit input rounding,
//!   norms, masks.
//! - `albert` — PL-BERT and `bert_encoder`.
//! - `lstm` — the bidirectional LSTMs, with the export's 8-bit rounding.
//! - `text_encoder` — phoneme embedding, convolutions and LSTM.
//! - `predictor` — AdaLayerNorm and the duration predictor.
//! - `prosody` — AdaIN residual blocks, pitch (F0) and energy.
//! - `decoder` — the iSTFTNet decoder: harmonic source, STFT by convolution, generator.
//! - `model` — the stages end to end for one utterance.
//! - `synthesizer` — [`KokoroSynthesizer`], [`KokoroOptions`], [`KokoroTrace`], voice packs.
//! - `error` — [`KokoroError`].
//!
//! [Kokoro]: https://huggingface.co/hexgrad/Kokoro-82M

mod albert;
mod decoder;
mod error;
mod layers;
mod lstm;
mod model;
mod phonemize;
mod predictor;
mod prosody;
mod synthesizer;
mod text_encoder;
mod weights;

#[cfg(test)]
mod tests;

pub use error::KokoroError;
pub use synthesizer::{
    KOKORO_MODEL_FILE, KOKORO_SAMPLE_RATE, KokoroOptions, KokoroSynthesizer, KokoroTrace,
};
