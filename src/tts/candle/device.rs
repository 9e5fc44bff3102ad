//! Where the model runs: the one module that knows about devices.
//!
//! Candle compiles stub backends when the `cuda` or `metal` feature is off, so the rest of the
//! backend is device-agnostic and only this module asks which devices were compiled in and
//! which are present at run time.

use std::fmt;

use candle_core::{DType, Device};

use super::error::ModelError;

/// Which device a model is loaded on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum DeviceChoice {
    /// The fastest device present: CUDA GPU 0, then Metal GPU 0, then the CPU. A GPU backend
    /// that is compiled in but finds no GPU falls through to the next choice, so one binary
    /// serves both GPU and CPU hosts.
    #[default]
    Auto,
    /// The CPU, always available.
    Cpu,
    /// The CUDA GPU with this ordinal (needs the `cuda` feature).
    Cuda(usize),
    /// The Metal GPU with this ordinal (needs the `metal` feature).
    Metal(usize),
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(i) => write!(f, "cuda:{i}"),
            Self::Metal(i) => write!(f, "metal:{i}"),
        }
    }
}

/// Parses what a command line or a config file says: `auto`, `cpu`, `cuda`, `cuda:1`,
/// `metal`, `metal:0`.
impl std::str::FromStr for DeviceChoice {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, ModelError> {
        let bad = || ModelError::InvalidOption {
            option: "device",
            reason: format!("{s:?} is not one of auto, cpu, cuda[:N], metal[:N]"),
        };
        let (kind, ordinal) = match s.trim().split_once(':') {
            Some((kind, n)) => (kind, n.parse::<usize>().map_err(|_| bad())?),
            None => (s.trim(), 0),
        };
        match kind.to_ascii_lowercase().as_str() {
            "auto" if !s.contains(':') => Ok(Self::Auto),
            "cpu" if !s.contains(':') => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(ordinal)),
            "metal" => Ok(Self::Metal(ordinal)),
            _ => Err(bad()),
        }
    }
}

impl DeviceChoice {
    /// Opens the device, or says precisely why it cannot be used.
    pub(crate) fn open(self) -> Result<Device, ModelError> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(ordinal) => open_cuda(ordinal),
            Self::Metal(ordinal) => open_metal(ordinal),
            Self::Auto => {
                if candle_core::utils::cuda_is_available() {
                    match open_cuda(0) {
                        Ok(device) => return Ok(device),
                        Err(err) => tracing::warn!(%err, "CUDA compiled in but unusable"),
                    }
                }
                if candle_core::utils::metal_is_available() {
                    match open_metal(0) {
                        Ok(device) => return Ok(device),
                        Err(err) => tracing::warn!(%err, "Metal compiled in but unusable"),
                    }
                }
                Ok(Device::Cpu)
            }
        }
    }
}

/// The dtype weights are held in on `device`.
///
/// Always f32 for now: candle's Parler decoder builds its attention mask in f32 and fails in
/// f16/bf16, so half precision on GPUs waits for a decoder that builds masks in the model's
/// dtype.
pub(crate) fn dtype_for(_device: &Device) -> DType {
    DType::F32
}

/// A short name for logs.
pub(crate) fn describe(device: &Device) -> &'static str {
    if device.is_cuda() {
        "cuda"
    } else if device.is_metal() {
        "metal"
    } else {
        "cpu"
    }
}

fn open_cuda(ordinal: usize) -> Result<Device, ModelError> {
    if !candle_core::utils::cuda_is_available() {
        return Err(ModelError::DeviceUnavailable {
            device: DeviceChoice::Cuda(ordinal).to_string(),
            reason: "CUDA support is not compiled in; rebuild with `--features cuda`".into(),
        });
    }
    Device::new_cuda(ordinal).map_err(|e| ModelError::DeviceUnavailable {
        device: DeviceChoice::Cuda(ordinal).to_string(),
        reason: e.to_string(),
    })
}

fn open_metal(ordinal: usize) -> Result<Device, ModelError> {
    if !candle_core::utils::metal_is_available() {
        return Err(ModelError::DeviceUnavailable {
            device: DeviceChoice::Metal(ordinal).to_string(),
            reason: "Metal support is not compiled in; rebuild with `--features metal`".into(),
        });
    }
    Device::new_metal(ordinal).map_err(|e| ModelError::DeviceUnavailable {
        device: DeviceChoice::Metal(ordinal).to_string(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {

    #[test]
    fn device_names_parse_and_round_trip() {
        for (text, choice) in [
            ("auto", DeviceChoice::Auto),
            ("cpu", DeviceChoice::Cpu),
            ("cuda", DeviceChoice::Cuda(0)),
            ("cuda:1", DeviceChoice::Cuda(1)),
            ("Metal:0", DeviceChoice::Metal(0)),
        ] {
            assert_eq!(text.parse::<DeviceChoice>().unwrap(), choice, "{text}");
        }
        assert_eq!(
            DeviceChoice::Cuda(2)
                .to_string()
                .parse::<DeviceChoice>()
                .unwrap(),
            DeviceChoice::Cuda(2)
        );
        for bad in ["gpu", "cuda:x", "cpu:1", ""] {
            assert!(bad.parse::<DeviceChoice>().is_err(), "{bad}");
        }
    }

    use super::*;

    #[test]
    fn cpu_always_opens_and_auto_falls_back_to_it() {
        assert!(DeviceChoice::Cpu.open().unwrap().is_cpu());
        let auto = DeviceChoice::Auto.open().unwrap();
        if !candle_core::utils::cuda_is_available() && !candle_core::utils::metal_is_available() {
            assert!(auto.is_cpu());
        }
        assert_eq!(dtype_for(&auto), DType::F32);
    }

    #[test]
    fn gpu_not_compiled_in_is_a_typed_error() {
        if !candle_core::utils::cuda_is_available() {
            let err = DeviceChoice::Cuda(0).open().unwrap_err();
            assert!(
                matches!(&err, ModelError::DeviceUnavailable { device, reason }
                    if device == "cuda:0" && reason.contains("--features cuda")),
                "{err}"
            );
        }
        if !candle_core::utils::metal_is_available() {
            let err = DeviceChoice::Metal(1).open().unwrap_err();
            assert!(
                matches!(&err, ModelError::DeviceUnavailable { device, .. } if device == "metal:1"),
                "{err}"
            );
        }
    }
}
