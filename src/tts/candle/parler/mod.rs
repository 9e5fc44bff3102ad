//! Parler-TTS on Candle: a voice described in words, on CPU, CUDA or Metal.
//!
//! [Parler-TTS] turns a transcript and a free-text speaker description ("Laura's voice is
//! calm and clear ...") into DAC codec tokens with a T5 text encoder and a transformer
//! decoder over several delayed codebooks, then into 44.1 kHz audio with the DAC decoder.
//! Here it becomes a [`Synthesizer`](crate::tts::Synthesizer): a voice id picks a stored
//! description, a request's `style` replaces it, and a worker batches queued requests into
//! one generation.
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
//!
//! Candle supplies the T5 encoder, the DAC blocks and the tensor ops. Loading (typed errors
//! naming the file or tensor), the decoder (batched, per-sequence positions, cached
//! cross-attention), the generation loop (delay pattern, sampling, stopping) and the codec
//! assembly are ours, because candle's Parler decoder cannot run a batch, its `generate`
//! neither seeds per request nor stops codebooks in order, and its DAC has one fixed size.
//!
//! [`Precision::Auto`](crate::tts::candle::Precision::Auto) runs f32 on the CPU and half precision on CUDA, where memory and
//! tensor cores make it pay; parts whose numerics half precision would hurt stay in f32
//! (attention softmax, logits before sampling, the T5 encoder under f16, the samples out).
//!
//! # Layout
//!
//! - `config` — `config.json` and `generation_config.json`.
//! - `load` — weights (single or sharded safetensors) and tokenizers into a model.
//! - `decoder` — the audio-token decoder, batched with per-sequence positions.
//! - `codec` — the DAC quantizer and decoder, sized from the config.
//! - `generate` — the delayed-codebook generation loop, batched.
//! - `synthesizer` — [`ParlerSynthesizer`], [`ParlerOptions`], the voice table.
//! - `error` — [`ModelError`].
//! - `tiny` — [`write_tiny_model`], a random miniature for tests and benches.
//!
//! [Parler-TTS]: https://github.com/huggingface/parler-tts

pub(crate) mod codec;
pub(crate) mod config;
pub(crate) mod decoder;
mod error;
pub(crate) mod generate;
pub(crate) mod load;
mod synthesizer;
mod tiny;

#[cfg(test)]
mod parity;
#[cfg(test)]
mod tests;

pub use error::ModelError;
pub use synthesizer::{DEFAULT_DESCRIPTION, ParlerOptions, ParlerSynthesizer, default_voices};
pub use tiny::{TINY_HOP_LENGTH, TINY_NUM_CODEBOOKS, TINY_SAMPLE_RATE, write_tiny_model};
