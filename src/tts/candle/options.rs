//! [`CandleOptions`]: the choices every Candle backend takes the same way.

use candle_core::{DType, Device};

use super::device::{DeviceChoice, Precision, dtype_for};
use super::error::LoadError;

/// Where a Candle backend runs, in what precision, and how many utterances share one model
/// call.
///
/// Every model family ([`ParlerOptions`](super::ParlerOptions),
/// [`PiperOptions`](super::PiperOptions), [`KokoroOptions`](super::KokoroOptions)) holds one
/// as its `candle` field, so an operator's device and batch choices (a command line's
/// `--device`, `--precision`, `--batch`) are made once and handed to whichever backend is
/// loaded, with [`with_candle`](super::KokoroOptions::with_candle). The families also keep
/// `with_device`, `with_precision` and `with_max_batch` for one choice at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CandleOptions {
    /// Where to run (default [`DeviceChoice::Auto`]).
    pub device: DeviceChoice,
    /// The dtype of weights and activations (default [`Precision::Auto`]: f32 on the CPU,
    /// half precision on CUDA GPUs). A family may keep some parts in f32 (each says which);
    /// Kokoro runs in f32 whatever is asked, since its weights are 8-bit already.
    pub precision: Precision,
    /// Utterances per model call in [`Synthesizer::synthesize_batch`] (default 8; at least 1).
    ///
    /// [`Synthesizer::synthesize_batch`]: crate::tts::Synthesizer::synthesize_batch
    pub max_batch: usize,
}

impl Default for CandleOptions {
    fn default() -> Self {
        Self {
            device: DeviceChoice::Auto,
            precision: Precision::Auto,
            max_batch: 8,
        }
    }
}

impl CandleOptions {
    /// The defaults (same as [`Default`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the device.
    #[must_use]
    pub fn with_device(mut self, device: DeviceChoice) -> Self {
        self.device = device;
        self
    }

    /// Sets the precision.
    #[must_use]
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    /// Sets how many utterances share one model call.
    #[must_use]
    pub fn with_max_batch(mut self, max_batch: usize) -> Self {
        self.max_batch = max_batch;
        self
    }

    /// Checks the values before anything is read, so a bad option fails before a long load.
    pub(crate) fn check(&self) -> Result<(), LoadError> {
        if self.max_batch == 0 {
            return Err(LoadError::InvalidOption {
                option: "max_batch",
                reason: "must be at least 1".into(),
            });
        }
        Ok(())
    }

    /// Opens the device and picks the dtype [`precision`](Self::precision) means on it.
    pub(crate) fn open(&self) -> Result<(Device, DType), LoadError> {
        let device = self.device.open()?;
        let dtype = dtype_for(&device, self.precision);
        Ok((device, dtype))
    }
}

/// The setters of [`CandleOptions`] on a family's options type (which holds it as `candle`),
/// written once instead of once per family.
macro_rules! candle_setters {
    ($options:ty) => {
        impl $options {
            /// Sets the device, precision and batch size at once.
            #[must_use]
            pub fn with_candle(mut self, candle: $crate::tts::candle::CandleOptions) -> Self {
                self.candle = candle;
                self
            }

            /// Sets the device.
            #[must_use]
            pub fn with_device(mut self, device: $crate::tts::candle::DeviceChoice) -> Self {
                self.candle.device = device;
                self
            }

            /// Sets the precision.
            #[must_use]
            pub fn with_precision(mut self, precision: $crate::tts::candle::Precision) -> Self {
                self.candle.precision = precision;
                self
            }

            /// Sets how many utterances share one model call.
            #[must_use]
            pub fn with_max_batch(mut self, max_batch: usize) -> Self {
                self.candle.max_batch = max_batch;
                self
            }
        }
    };
}
pub(crate) use candle_setters;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_setters() {
        let o = CandleOptions::new();
        assert_eq!(
            (o.device, o.precision, o.max_batch),
            (DeviceChoice::Auto, Precision::Auto, 8)
        );
        let o = o
            .with_device(DeviceChoice::Cpu)
            .with_precision(Precision::F16)
            .with_max_batch(3);
        assert_eq!(
            (o.device, o.precision, o.max_batch),
            (DeviceChoice::Cpu, Precision::F16, 3)
        );
    }

    #[test]
    fn a_batch_of_zero_is_refused_before_loading() {
        let err = CandleOptions::new().with_max_batch(0).check().unwrap_err();
        assert!(
            matches!(
                err,
                LoadError::InvalidOption {
                    option: "max_batch",
                    ..
                }
            ),
            "{err}"
        );
        assert!(CandleOptions::new().with_max_batch(1).check().is_ok());
    }

    #[test]
    fn the_cpu_opens_in_f32_unless_asked() {
        let cpu = CandleOptions::new().with_device(DeviceChoice::Cpu);
        assert_eq!(cpu.open().unwrap().1, DType::F32);
        assert_eq!(
            cpu.with_precision(Precision::BF16).open().unwrap().1,
            DType::BF16
        );
    }
}
