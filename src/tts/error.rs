//! The one error type of the TTS layer.
//!
//! The queue decides what to do with a failed job (reject, retry, dead-letter) by asking the
//! error's *class* through [`TtsError::is_invalid_request`] and [`TtsError::is_retryable`],
//! never by matching message text, so a new variant only has to be classified here once.

/// Everything that can go wrong between a [`SynthesisRequest`](super::SynthesisRequest)
/// arriving and its audio being encoded.
///
/// Validation variants carry the offending value *and* the allowed range or choices, because
/// they end up in an API response and the caller should be able to fix the request without
/// reading our source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TtsError {
    /// The text was empty, or became empty once whitespace and control characters were
    /// removed; synthesising it would produce a silent file nobody asked for.
    #[error("text is empty after normalisation")]
    EmptyText,

    /// The text is longer than the configured limit; long jobs hold a worker (and a GPU) for
    /// minutes, so the operator caps them.
    #[error("text is {len} characters long, more than the limit of {max}")]
    TextTooLong {
        /// Length of the normalised text, in Unicode scalar values (`char`s).
        len: usize,
        /// The configured maximum, from [`Limits::max_chars`](super::Limits::max_chars).
        max: usize,
    },

    /// The requested voice is not offered by the backend.
    #[error("unknown voice `{voice}`; available voices: {}", available.join(", "))]
    UnknownVoice {
        /// The voice id the caller asked for.
        voice: String,
        /// The ids that would have been accepted, so the caller can pick one.
        available: Vec<String>,
    },

    /// The speed factor is outside what the layer accepts (or is not a finite number).
    #[error("speed {speed} is outside the allowed range {min}..={max}")]
    SpeedOutOfRange {
        /// The requested speed factor.
        speed: f32,
        /// Smallest accepted factor.
        min: f32,
        /// Largest accepted factor.
        max: f32,
    },

    /// The requested output sample rate is outside what the layer accepts.
    #[error("sample rate {rate} Hz is outside the allowed range {min}..={max} Hz")]
    SampleRateOutOfRange {
        /// The requested rate in Hz.
        rate: u32,
        /// Smallest accepted rate in Hz.
        min: u32,
        /// Largest accepted rate in Hz.
        max: u32,
    },

    /// The backend tried and failed (a crashed subprocess, an out-of-memory GPU, a model that
    /// returned garbage). Such failures are often transient, so the job may be retried.
    #[error("synthesis backend failed: {0}")]
    Backend(String),

    /// The backend cannot run at all on this host (a missing program or model). Retrying on
    /// the same worker cannot help; the operator has to install something.
    #[error("synthesis backend unavailable: {message} ({hint})")]
    BackendUnavailable {
        /// What is missing.
        message: String,
        /// How to fix it, e.g. "install with `apt-get install espeak-ng`".
        hint: String,
    },

    /// Audio could not be encoded or decoded (an invalid WAV, an unsupported sample layout).
    /// The same input fails the same way every time, so this is not retried.
    #[error("audio encoding failed: {0}")]
    Audio(String),

    /// Audio codes handed to a neural codec do not fit the model (a frame with the wrong
    /// number of codebooks, a code outside a codebook). The same codes fail every time.
    #[error("invalid audio codes: {0}")]
    InvalidCodes(String),

    /// The caller (or the job's cancellation) asked to stop before synthesis finished.
    #[error("synthesis cancelled")]
    Cancelled,
}

impl TtsError {
    /// True when the request itself is at fault (the caller must change it).
    ///
    /// The producer answers these with a client error and enqueues nothing; a worker that
    /// meets one fails the job permanently, since every retry would fail the same way.
    pub fn is_invalid_request(&self) -> bool {
        matches!(
            self,
            Self::EmptyText
                | Self::TextTooLong { .. }
                | Self::UnknownVoice { .. }
                | Self::SpeedOutOfRange { .. }
                | Self::SampleRateOutOfRange { .. }
                | Self::InvalidCodes(_)
        )
    }

    /// True when running the same request again may succeed.
    ///
    /// Only [`TtsError::Backend`] qualifies: a missing backend, bad audio or an invalid request
    /// fail identically on every attempt, and a cancelled job must stay cancelled, so retrying
    /// them would only burn attempts and delay the dead letter.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Backend(_))
    }

    /// The error for a missing or broken backend, with the hint that fixes it.
    pub fn backend_unavailable(message: impl Into<String>, hint: impl Into<String>) -> Self {
        Self::BackendUnavailable {
            message: message.into(),
            hint: hint.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<TtsError> {
        vec![
            TtsError::EmptyText,
            TtsError::TextTooLong { len: 10, max: 5 },
            TtsError::UnknownVoice {
                voice: "x".into(),
                available: vec!["a".into(), "b".into()],
            },
            TtsError::SpeedOutOfRange {
                speed: 9.0,
                min: 0.25,
                max: 4.0,
            },
            TtsError::SampleRateOutOfRange {
                rate: 1,
                min: 8000,
                max: 48000,
            },
            TtsError::Backend("boom".into()),
            TtsError::backend_unavailable("espeak-ng not found", "install it"),
            TtsError::Audio("bad wav".into()),
            TtsError::InvalidCodes("frame 0 has 3 codes".into()),
            TtsError::Cancelled,
        ]
    }

    #[test]
    fn validation_errors_are_invalid_requests_and_never_retryable() {
        for e in all() {
            if e.is_invalid_request() {
                assert!(!e.is_retryable(), "{e:?}");
            }
        }
        assert_eq!(all().iter().filter(|e| e.is_invalid_request()).count(), 6);
    }

    #[test]
    fn only_backend_failures_are_retryable() {
        let retryable: Vec<_> = all().into_iter().filter(|e| e.is_retryable()).collect();
        assert_eq!(retryable.len(), 1);
        assert!(matches!(retryable[0], TtsError::Backend(_)));
        assert!(!TtsError::Cancelled.is_retryable());
        assert!(!TtsError::backend_unavailable("m", "h").is_retryable());
    }

    #[test]
    fn messages_name_the_allowed_values() {
        let e = TtsError::UnknownVoice {
            voice: "zz".into(),
            available: vec!["en-us".into(), "de".into()],
        };
        assert_eq!(
            e.to_string(),
            "unknown voice `zz`; available voices: en-us, de"
        );
        let e = TtsError::TextTooLong {
            len: 6000,
            max: 5000,
        };
        assert_eq!(
            e.to_string(),
            "text is 6000 characters long, more than the limit of 5000"
        );
        let e = TtsError::backend_unavailable(
            "espeak-ng not found",
            "install with `apt-get install espeak-ng`",
        );
        assert!(e.to_string().contains("apt-get install espeak-ng"));
    }

    #[test]
    fn error_is_send_sync_static() {
        fn check<T: std::error::Error + Send + Sync + 'static>() {}
        check::<TtsError>();
    }
}
