//! What can go wrong while loading a Piper voice, precisely enough to fix it.
//!
//! A Piper voice is two files that must belong together (`voice.onnx` and
//! `voice.onnx.json`), so each variant names the file or the tensor at fault. The queue only
//! needs the coarse class, which [`From<PiperError> for TtsError`](TtsError) gives: every load
//! failure is [`TtsError::BackendUnavailable`], never retried on the same worker.

use std::path::PathBuf;

use crate::tts::TtsError;

/// Why a Piper voice could not be turned into a working synthesiser.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PiperError {
    /// A file the voice needs does not exist (most often the `.onnx.json` beside the model).
    #[error("missing voice file {}", path.display())]
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

    /// The model lacks a weight a Piper (VITS) voice has: it is another kind of model.
    #[error("tensor `{tensor}` is not in the model (is it a Piper voice?)")]
    MissingTensor {
        /// The tensor name, e.g. `dec.conv_pre.weight`.
        tensor: String,
    },

    /// A weight has another shape than the rest of the model implies.
    #[error("tensor `{tensor}` has shape {found:?} but the model implies {expected:?}")]
    ShapeMismatch {
        /// The tensor name.
        tensor: String,
        /// The shape the other weights (or the config) imply.
        expected: Vec<usize>,
        /// The shape stored in the model.
        found: Vec<usize>,
    },

    /// A weight is stored in a type that cannot be a model weight (integers, strings).
    #[error("tensor `{tensor}` is stored as ONNX type {found}, expected a float type")]
    WrongDtype {
        /// The tensor name.
        tensor: String,
        /// The ONNX data type number.
        found: i32,
    },

    /// The requested device is not compiled in or not present on this host.
    #[error("device unavailable: {0}")]
    Device(String),

    /// A [`PiperOptions`](super::PiperOptions) value is out of range.
    #[error("invalid option {option}: {reason}")]
    InvalidOption {
        /// The option's field name.
        option: &'static str,
        /// What values are accepted.
        reason: String,
    },

    /// Candle failed while building the model for a reason not covered above.
    #[error("building the voice failed: {0}")]
    Build(String),
}

impl PiperError {
    /// A failed read of `path`: [`MissingFile`](Self::MissingFile) when it is not there.
    pub(crate) fn read(path: &std::path::Path, err: &std::io::Error) -> Self {
        match err.kind() {
            std::io::ErrorKind::NotFound => Self::MissingFile {
                path: path.to_owned(),
            },
            _ => Self::Io {
                path: path.to_owned(),
                reason: err.to_string(),
            },
        }
    }

    /// How an operator fixes this error, for [`TtsError::BackendUnavailable`]'s hint.
    fn hint(&self) -> &'static str {
        match self {
            Self::MissingFile { .. } | Self::Io { .. } => {
                "put the voice's .onnx and .onnx.json side by side (`.ci/fetch-voices` fetches \
                 en_US-joe-medium)"
            }
            Self::InvalidConfig { .. } | Self::SampleRate { .. } => {
                "use the .onnx.json that was published with the voice"
            }
            Self::InvalidModel { .. }
            | Self::MissingTensor { .. }
            | Self::ShapeMismatch { .. }
            | Self::WrongDtype { .. }
            | Self::Build(_) => {
                "use a Piper (VITS) voice exported to ONNX, e.g. from rhasspy/piper"
            }
            Self::Device(_) => {
                "build with `--features cuda` or `--features metal`, or choose DeviceChoice::Cpu"
            }
            Self::InvalidOption { .. } => "fix the PiperOptions passed to PiperSynthesizer::load",
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
