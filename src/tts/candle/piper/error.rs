//! What can go wrong while loading a Piper voice, precisely enough to fix it.
//!
//! A Piper voice is two files that must belong together (`voice.onnx` and
//! `voice.onnx.json`), so each variant names the file or the tensor at fault. The queue only
//! needs the coarse class, which [`From<PiperError> for TtsError`](TtsError) gives: every load
//! failure is [`TtsError::BackendUnavailable`], never retried on the same worker.

use std::path::PathBuf;

use crate::tts::TtsError;
use crate::tts::candle::error::LoadError;

/// Why a Piper voice could not be turned into a working synthesiser.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PiperError {
    /// A failure every Candle model family shares: a missing or unreadable file (most often
    /// the `.onnx.json` beside the model), a missing or mis-shaped tensor, an unusable device,
    /// an option out of range.
    #[error(transparent)]
    Load(#[from] LoadError),

    /// The `.onnx.json` does not parse or describes a voice this backend cannot run.
    #[error("invalid voice config {}: {reason}", path.display())]
    InvalidConfig {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// The config's sample rate is not one a VITS voice is trained at.
    #[error(
        "voice config {} says sample rate {found} Hz; Piper voices run at 8000 to 48000 Hz",
        path.display()
    )]
    SampleRate {
        /// The file at fault.
        path: PathBuf,
        /// The rate it gives.
        found: i64,
    },

    /// The `.onnx` file is not an ONNX model (truncated download, another format).
    #[error("invalid ONNX model {}: {reason}", path.display())]
    InvalidModel {
        /// The file at fault.
        path: PathBuf,
        /// What the reader said.
        reason: String,
    },

    /// Candle failed while building the model for a reason not covered above.
    #[error("building the voice failed: {0}")]
    Build(String),
}

impl PiperError {
    /// How an operator fixes this error, for [`TtsError::BackendUnavailable`]'s hint.
    fn hint(&self) -> &'static str {
        match self {
            Self::Load(LoadError::MissingFile { .. } | LoadError::Io { .. }) => {
                "put the voice's .onnx and .onnx.json side by side (`.ci/fetch-voices` fetches \
                 en_US-joe-medium)"
            }
            Self::InvalidConfig { .. } | Self::SampleRate { .. } => {
                "use the .onnx.json that was published with the voice"
            }
            Self::Load(
                LoadError::MissingTensor { .. }
                | LoadError::ShapeMismatch { .. }
                | LoadError::WrongDtype { .. },
            )
            | Self::InvalidModel { .. }
            | Self::Build(_) => {
                "use a Piper (VITS) voice exported to ONNX, e.g. from rhasspy/piper"
            }
            Self::Load(LoadError::InvalidOption { .. }) => {
                "fix the PiperOptions passed to PiperSynthesizer::load"
            }
            Self::Load(other) => other.hint(),
        }
    }
}

impl From<PiperError> for TtsError {
    fn from(err: PiperError) -> Self {
        let hint = err.hint();
        TtsError::backend_unavailable(err.to_string(), hint)
    }
}

impl From<candle_core::Error> for PiperError {
    fn from(err: candle_core::Error) -> Self {
        Self::Build(err.to_string())
    }
}
