//! What can go wrong while loading Kokoro, precisely enough to fix it.
//!
//! Kokoro is two kinds of file that must belong together (the ONNX model and the voice
//! packs), so each variant names the file at fault. The queue only
//! needs the coarse class, which [`From<KokoroError> for TtsError`](TtsError) gives: every
//! load failure is [`TtsError::BackendUnavailable`], never retried on the same worker.

use std::path::PathBuf;

use crate::tts::TtsError;
use crate::tts::candle::error::LoadError;

/// Why Kokoro could not be turned into a working synthesiser.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KokoroError {
    /// A failure every Candle model family shares: a missing or unreadable file, a missing
    /// or mis-shaped tensor, an unusable device, an option out of range.
    #[error(transparent)]
    Load(#[from] LoadError),

    /// The model file is not an ONNX model (truncated download, another format), or not
    /// Kokoro's int8 export.
    #[error("invalid ONNX model {}: {reason}", path.display())]
    InvalidModel {
        /// The file at fault.
        path: PathBuf,
        /// What the reader said.
        reason: String,
    },

    /// A voice pack is not Kokoro's f32 `[510, 1, 256]` style table.
    #[error("invalid voice pack {}: {reason}", path.display())]
    InvalidVoice {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// Candle failed while building the model for a reason not covered above.
    #[error("building Kokoro failed: {0}")]
    Build(String),
}

impl KokoroError {
    /// How an operator fixes this error, for [`TtsError::BackendUnavailable`]'s hint.
    fn hint(&self) -> &'static str {
        match self {
            Self::Load(LoadError::MissingFile { .. } | LoadError::Io { .. }) => {
                "fetch the model and the voice packs with `.ci/fetch-voices` \
                 (into $VOXQUEUE_VOICES/kokoro)"
            }
            Self::Load(
                LoadError::MissingTensor { .. }
                | LoadError::ShapeMismatch { .. }
                | LoadError::WrongDtype { .. },
            )
            | Self::InvalidModel { .. }
            | Self::Build(_) => "use Kokoro-82M v1.0's int8 ONNX export (kokoro-v1.0.int8.onnx)",
            Self::InvalidVoice { .. } => {
                "use Kokoro v1.0 voice packs (f32 [510, 1, 256] .bin, e.g. from kokoro-js)"
            }
            Self::Load(LoadError::InvalidOption { .. }) => {
                "fix the KokoroOptions passed to KokoroSynthesizer::load"
            }
            Self::Load(other) => other.hint(),
        }
    }
}

impl From<KokoroError> for TtsError {
    fn from(err: KokoroError) -> Self {
        let hint = err.hint();
        TtsError::backend_unavailable(err.to_string(), hint)
    }
}

impl From<candle_core::Error> for KokoroError {
    fn from(err: candle_core::Error) -> Self {
        Self::Build(err.to_string())
    }
}
