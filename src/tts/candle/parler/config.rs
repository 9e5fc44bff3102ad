//! `config.json` and `generation_config.json` of a Parler-TTS checkpoint.
//!
//! The structs mirror the Hugging Face files rather than candle's config types, because
//! checkpoints omit fields that candle requires (`rope_theta`, `tie_word_embeddings`, ...) and
//! because the codec's layer sizes are not in the file at all: they are fixed by the 44.1 kHz
//! DAC that every released checkpoint uses. We default them to that DAC and accept three
//! optional extra fields (`codebook_dim`, `decoder_dim`, `decoder_rates`) so that tests can
//! build a small codec of the same architecture.

use crate::tts::candle::error::LoadError;
use std::path::Path;

use candle_nn::Activation;
use candle_transformers::models::t5;
use serde::Deserialize;

use super::error::ModelError;

/// The whole model: text encoder, decoder, prompt embedding and codec.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct ParlerConfig {
    /// Token that starts every codebook's sequence; defaults to the decoder's BOS.
    #[serde(default)]
    pub(crate) decoder_start_token_id: Option<u32>,
    /// Rows of the prompt (transcript) embedding: the tokenizer's vocabulary.
    pub(crate) vocab_size: usize,
    /// Whether the transcript goes through cross-attention instead of being prepended to
    /// the decoder's input; released checkpoints prepend it.
    #[serde(default)]
    pub(crate) prompt_cross_attention: bool,
    pub(crate) decoder: DecoderConfig,
    pub(crate) text_encoder: t5::Config,
    pub(crate) audio_encoder: CodecConfig,
}

fn default_activation() -> Activation {
    Activation::Gelu
}

/// The audio-token decoder (`decoder` in config.json).
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct DecoderConfig {
    /// Logits per codebook; ids at or above the codec's codebook size are special tokens.
    pub(crate) vocab_size: usize,
    pub(crate) max_position_embeddings: usize,
    pub(crate) num_hidden_layers: usize,
    pub(crate) ffn_dim: usize,
    pub(crate) num_attention_heads: usize,
    #[serde(default)]
    pub(crate) num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub(crate) num_cross_attention_key_value_heads: Option<usize>,
    #[serde(default = "default_activation")]
    pub(crate) activation_function: Activation,
    pub(crate) hidden_size: usize,
    #[serde(default)]
    pub(crate) scale_embedding: bool,
    pub(crate) num_codebooks: usize,
    pub(crate) pad_token_id: u32,
    pub(crate) bos_token_id: u32,
    pub(crate) eos_token_id: u32,
    #[serde(default)]
    pub(crate) tie_word_embeddings: bool,
    #[serde(default)]
    pub(crate) rope_embeddings: bool,
}

fn default_codebook_dim() -> usize {
    8
}

fn default_decoder_dim() -> usize {
    1536
}

fn default_decoder_rates() -> Vec<usize> {
    vec![8, 8, 4, 2]
}

/// The DAC codec (`audio_encoder` in config.json).
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct CodecConfig {
    pub(crate) num_codebooks: usize,
    pub(crate) codebook_size: usize,
    pub(crate) latent_dim: usize,
    /// Codec frames per second; only used to size the generation budget.
    pub(crate) frame_rate: f64,
    pub(crate) sampling_rate: u32,
    /// Extension: width of each codebook's vectors (8 in DAC).
    #[serde(default = "default_codebook_dim")]
    pub(crate) codebook_dim: usize,
    /// Extension: channels of the codec decoder's first layer (1536 in DAC 44 kHz).
    #[serde(default = "default_decoder_dim")]
    pub(crate) decoder_dim: usize,
    /// Extension: upsampling factor of each decoder block (`[8, 8, 4, 2]` in DAC 44 kHz).
    #[serde(default = "default_decoder_rates")]
    pub(crate) decoder_rates: Vec<usize>,
}

impl CodecConfig {
    /// Audio samples per codec frame.
    pub(crate) fn hop_length(&self) -> usize {
        self.decoder_rates.iter().product()
    }
}

impl ParlerConfig {
    /// Reads and checks `config.json`.
    pub(crate) fn load(path: &Path) -> Result<Self, ModelError> {
        let text = read_text(path)?;
        let cfg: Self = serde_json::from_str(&text).map_err(|e| ModelError::InvalidConfig {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        cfg.validate().map_err(|reason| ModelError::InvalidConfig {
            path: path.to_owned(),
            reason,
        })?;
        Ok(cfg)
    }

    /// The token every codebook starts from.
    pub(crate) fn start_token(&self) -> u32 {
        self.decoder_start_token_id
            .unwrap_or(self.decoder.bos_token_id)
    }

    /// Rejects what candle's layers would mis-run or panic on, with the field to fix.
    fn validate(&self) -> Result<(), String> {
        let d = &self.decoder;
        let c = &self.audio_encoder;
        if self.prompt_cross_attention {
            return Err("prompt_cross_attention = true is not supported".into());
        }
        if d.rope_embeddings {
            return Err("decoder.rope_embeddings = true is not supported".into());
        }
        if d.tie_word_embeddings {
            return Err("decoder.tie_word_embeddings = true is not supported".into());
        }
        if d.scale_embedding {
            return Err("decoder.scale_embedding = true is not supported".into());
        }
        if d.num_attention_heads == 0 || !d.hidden_size.is_multiple_of(d.num_attention_heads) {
            return Err(format!(
                "decoder.hidden_size {} is not a multiple of num_attention_heads {}",
                d.hidden_size, d.num_attention_heads
            ));
        }
        for kv in [d.num_key_value_heads, d.num_cross_attention_key_value_heads]
            .into_iter()
            .flatten()
        {
            if kv == 0 || !d.num_attention_heads.is_multiple_of(kv) {
                return Err(format!(
                    "decoder key/value heads {kv} do not divide num_attention_heads {}",
                    d.num_attention_heads
                ));
            }
        }
        if d.num_codebooks == 0 || d.num_codebooks > c.num_codebooks {
            return Err(format!(
                "decoder.num_codebooks {} must be between 1 and audio_encoder.num_codebooks {}",
                d.num_codebooks, c.num_codebooks
            ));
        }
        if c.codebook_size == 0 || c.codebook_size >= d.vocab_size {
            return Err(format!(
                "audio_encoder.codebook_size {} must be below decoder.vocab_size {}",
                c.codebook_size, d.vocab_size
            ));
        }
        let vocab = d.vocab_size as u64;
        if u64::from(d.eos_token_id) >= vocab || u64::from(d.pad_token_id) >= vocab {
            return Err(format!(
                "decoder eos ({}) and pad ({}) ids must be below decoder.vocab_size {}",
                d.eos_token_id, d.pad_token_id, d.vocab_size
            ));
        }
        // The codebook embeddings have vocab_size + 1 rows, the last one for BOS.
        for (name, id) in [
            ("bos_token_id", d.bos_token_id),
            ("decoder_start_token_id", self.start_token()),
        ] {
            if u64::from(id) > vocab {
                return Err(format!(
                    "{name} {id} is outside the decoder's embeddings (vocab_size {})",
                    d.vocab_size
                ));
            }
        }
        if d.max_position_embeddings < 2 * d.num_codebooks + 2 {
            return Err(format!(
                "decoder.max_position_embeddings {} leaves no room for {} delayed codebooks",
                d.max_position_embeddings, d.num_codebooks
            ));
        }
        if c.sampling_rate == 0 || c.frame_rate.is_nan() || c.frame_rate <= 0.0 {
            return Err("audio_encoder.sampling_rate and frame_rate must be positive".into());
        }
        if c.decoder_rates.is_empty() || c.decoder_rates.iter().any(|&r| r == 0 || r % 2 != 0) {
            return Err(format!(
                "audio_encoder.decoder_rates {:?} must be non-empty even factors",
                c.decoder_rates
            ));
        }
        let halvings = u32::try_from(c.decoder_rates.len()).unwrap_or(u32::MAX);
        let divisor = 2_usize.checked_pow(halvings).unwrap_or(usize::MAX);
        if c.decoder_dim == 0 || !c.decoder_dim.is_multiple_of(divisor) {
            return Err(format!(
                "audio_encoder.decoder_dim {} must be divisible by 2^{}",
                c.decoder_dim, halvings
            ));
        }
        Ok(())
    }
}

/// Sampling defaults shipped with a checkpoint (`generation_config.json`, optional).
///
/// Only the fields that change what we generate are read; every one is optional, and
/// [`ParlerOptions`](super::ParlerOptions) overrides them.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct GenerationConfig {
    #[serde(default)]
    pub(crate) do_sample: Option<bool>,
    #[serde(default)]
    pub(crate) temperature: Option<f64>,
    #[serde(default)]
    pub(crate) top_k: Option<usize>,
    #[serde(default)]
    pub(crate) top_p: Option<f64>,
    #[serde(default)]
    pub(crate) max_length: Option<usize>,
    #[serde(default)]
    pub(crate) min_new_tokens: Option<usize>,
}

impl GenerationConfig {
    /// Reads `path` if it exists; a checkpoint without one uses the Hugging Face defaults.
    pub(crate) fn load_optional(path: &Path) -> Result<Self, ModelError> {
        if !path.exists() {
            return Ok(Self::default());
        }
        let text = read_text(path)?;
        serde_json::from_str(&text).map_err(|e| ModelError::InvalidConfig {
            path: path.to_owned(),
            reason: e.to_string(),
        })
    }
}

/// Reads a whole text file, naming it in the error.
pub(crate) fn read_text(path: &Path) -> Result<String, ModelError> {
    std::fs::read_to_string(path).map_err(|e| io_error(path, &e))
}

/// A failed read: [`LoadError::MissingFile`] when the file is not there, [`LoadError::Io`]
/// otherwise.
pub(crate) fn io_error(path: &Path, err: &std::io::Error) -> ModelError {
    LoadError::read(path, err).into()
}
