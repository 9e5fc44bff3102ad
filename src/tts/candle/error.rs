//! What can go wrong while loading a Parler-TTS model, precisely enough to fix it.
//!
//! Loading fails for reasons an operator fixes by hand (a file not downloaded, a config from
//! another checkpoint, a GPU feature not compiled in), so each variant names the file or the
//! tensor at fault. The queue only needs the coarse class, which [`From<ModelError> for
//! TtsError`](TtsError) gives: every load failure is [`TtsError::BackendUnavailable`], never
//! retried on the same worker.

use std::path::PathBuf;

use crate::tts::TtsError;

/// Why a model directory could not be turned into a working synthesiser.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A file the model needs is not in the directory.
    #[error("missing model file {}", path.display())]
    MissingFile {
        /// The path that was looked for.
        path: PathBuf,
    },

    /// A file exists but could not be read.
    #[error("cannot read {}: {reason}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        reason: String,
    },

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

    /// The config asks for a tensor the weights do not contain: config and weights come from
    /// different checkpoints, or a shard is missing.
    #[error("tensor `{tensor}` is not in the weights (does config.json match the checkpoint?)")]
    MissingTensor {
        /// The full tensor name, e.g. `decoder.model.decoder.layers.0.fc1.weight`.
        tensor: String,
    },

    /// A tensor has another shape than the config implies: config and weights do not match.
    #[error(
        "tensor `{tensor}` has shape {found:?} but config.json implies {expected:?} \
         (does config.json match the checkpoint?)"
    )]
    ShapeMismatch {
        /// The full tensor name.
        tensor: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape stored in the weights.
        found: Vec<usize>,
    },

    /// A weight is stored in a type that cannot be a model weight (integers, booleans).
    #[error("tensor `{tensor}` is stored as {found}, expected a float type (f32, f16, bf16)")]
    WrongDtype {
        /// The full tensor name.
        tensor: String,
        /// The stored type.
        found: String,
    },

    /// `tokenizer.json` does not load, or does not fit the model's embeddings.
    #[error("invalid tokenizer {}: {reason}", path.display())]
    InvalidTokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// The requested device is not compiled in or not present on this host.
    #[error("device {device} unavailable: {reason}")]
    DeviceUnavailable {
        /// The device asked for, e.g. `cuda:0`.
        device: String,
        /// Why it cannot be used, with the fix when there is one.
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

    /// A [`ParlerOptions`](super::ParlerOptions) value is out of range.
    #[error("invalid option {option}: {reason}")]
    InvalidOption {
        /// The option's field name.
        option: &'static str,
        /// What values are accepted.
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
            Self::MissingFile { .. } | Self::Io { .. } | Self::Download { .. } => {
                "download the complete Parler-TTS checkpoint (config.json, *.safetensors, \
                 tokenizer.json) into the model directory"
            }
            Self::InvalidConfig { .. }
            | Self::MissingTensor { .. }
            | Self::ShapeMismatch { .. }
            | Self::WrongDtype { .. }
            | Self::InvalidWeights { .. }
            | Self::InvalidTokenizer { .. } => {
                "use config.json, tokenizer.json and weights from the same Parler-TTS checkpoint"
            }
            Self::DeviceUnavailable { .. } => {
                "build with `--features cuda` or `--features metal`, or choose DeviceChoice::Cpu"
            }
            Self::InvalidOption { .. } => "fix the ParlerOptions passed to ParlerSynthesizer::load",
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
