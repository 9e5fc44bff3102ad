//! What can go wrong while loading a Parler-TTS model, precisely enough to fix it.
//!
//! Loading fails for reasons an operator fixes by hand (a file not downloaded, a config from
//! another checkpoint, a GPU feature not compiled in), so each variant names the file or the
//! tensor at fault. The queue only needs the coarse class, which [`From<ModelError> for
//! TtsError`](TtsError) gives: every load failure is [`TtsError::BackendUnavailable`], never
//! retried on the same worker.

use std::path::PathBuf;

use crate::tts::TtsError;
use crate::tts::candle::error::LoadError;

/// Why a model directory could not be turned into a working synthesiser.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A failure every Candle model family shares: a missing or unreadable file, a missing
    /// or mis-shaped tensor, an unusable device, an option out of range.
    #[error(transparent)]
    Load(#[from] LoadError),

    /// `config.json` (or another JSON file) does not parse or describes a model this backend
    /// cannot run.
    #[error("invalid model config {}: {reason}", path.display())]
    InvalidConfig {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A weights file is not valid safetensors (truncated download, wrong format).
    #[error("invalid weights file {}: {reason}", path.display())]
    InvalidWeights {
        /// The file at fault.
        path: PathBuf,
        /// What the safetensors reader said.
        reason: String,
    },

    /// `tokenizer.json` does not load, or does not fit the model's embeddings.
    #[error("invalid tokenizer {}: {reason}", path.display())]
    InvalidTokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// Downloading from the Hugging Face hub failed.
    #[error("download of {repo} failed: {reason}")]
    Download {
        /// The hub repository id.
        repo: String,
        /// What went wrong.
        reason: String,
    },

    /// Candle failed while building the model for a reason not covered above.
    #[error("building the model failed: {0}")]
    Build(String),
}

impl ModelError {
    /// How an operator fixes this error, for [`TtsError::BackendUnavailable`]'s hint.
    fn hint(&self) -> &'static str {
        match self {
            Self::Load(LoadError::MissingFile { .. } | LoadError::Io { .. })
            | Self::Download { .. } => {
                "download the complete Parler-TTS checkpoint (config.json, *.safetensors, \
                 tokenizer.json) into the model directory"
            }
            Self::Load(
                LoadError::MissingTensor { .. }
                | LoadError::ShapeMismatch { .. }
                | LoadError::WrongDtype { .. },
            )
            | Self::InvalidConfig { .. }
            | Self::InvalidWeights { .. }
            | Self::InvalidTokenizer { .. } => {
                "use config.json, tokenizer.json and weights from the same Parler-TTS checkpoint"
            }
            Self::Load(LoadError::InvalidOption { .. }) => {
                "fix the ParlerOptions passed to ParlerSynthesizer::load"
            }
            Self::Load(other) => other.hint(),
            Self::Build(_) => "check that the checkpoint is a Parler-TTS model",
        }
    }
}

impl From<ModelError> for TtsError {
    fn from(err: ModelError) -> Self {
        let hint = err.hint();
        TtsError::backend_unavailable(err.to_string(), hint)
    }
}
