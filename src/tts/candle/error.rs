//! Loading failures every Candle model family shares, precisely enough to fix them.
//!
//! Parler, Piper and Kokoro all read files into named tensors on a device, so they fail in the
//! same ways: a file is missing or unreadable, a tensor is missing or has another shape or
//! type, the device is not there, an option is out of range. [`LoadError`] says those once;
//! each family's own error ([`ModelError`](super::ModelError),
//! [`PiperError`](super::PiperError), [`KokoroError`](super::KokoroError)) wraps it beside
//! the failures only that family has (a config that does not parse, a tokenizer, ...), and
//! adds the hint that tells an operator which files to fetch.

use std::path::{Path, PathBuf};

/// Why files could not be turned into tensors on a device, whatever the model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// A file the model needs does not exist.
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

    /// The weights lack a tensor the model needs: they belong to another model or checkpoint.
    #[error("tensor `{tensor}` is not in the weights")]
    MissingTensor {
        /// The full tensor name, e.g. `dec.conv_pre.weight`.
        tensor: String,
    },

    /// A tensor has another shape than the config or the other weights imply.
    #[error("tensor `{tensor}` has shape {found:?} but the model implies {expected:?}")]
    ShapeMismatch {
        /// The full tensor name.
        tensor: String,
        /// The shape the config or the other weights imply.
        expected: Vec<usize>,
        /// The shape stored in the weights.
        found: Vec<usize>,
    },

    /// A weight is stored in a type that cannot be a model weight (booleans, strings).
    #[error("tensor `{tensor}` is stored as {found}, expected a float type")]
    WrongDtype {
        /// The full tensor name.
        tensor: String,
        /// The stored type, as the file names it.
        found: String,
    },

    /// The requested device is not compiled in or not present on this host.
    #[error("device {device} unavailable: {reason}")]
    DeviceUnavailable {
        /// The device asked for, e.g. `cuda:0`.
        device: String,
        /// Why it cannot be used, with the fix when there is one.
        reason: String,
    },

    /// An option passed to a loader is out of range.
    #[error("invalid option {option}: {reason}")]
    InvalidOption {
        /// The option's field name.
        option: &'static str,
        /// What values are accepted.
        reason: String,
    },
}

impl LoadError {
    /// A failed read of `path`: [`MissingFile`](Self::MissingFile) when it is not there,
    /// [`Io`](Self::Io) otherwise.
    pub(crate) fn read(path: &Path, err: &std::io::Error) -> Self {
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

    /// The general fix for this error; each family's error replaces the file-related ones
    /// with its own (which files, fetched how).
    pub(crate) fn hint(&self) -> &'static str {
        match self {
            Self::MissingFile { .. } | Self::Io { .. } => "fetch the model's files completely",
            Self::MissingTensor { .. } | Self::ShapeMismatch { .. } | Self::WrongDtype { .. } => {
                "use weights and config published together for this model family"
            }
            Self::DeviceUnavailable { .. } => {
                "build with `--features cuda` or `--features metal`, or choose DeviceChoice::Cpu"
            }
            Self::InvalidOption { .. } => "fix the options passed to the loader",
        }
    }
}
