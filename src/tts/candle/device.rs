//! Where the model runs: the one module that knows about devices.
//!
//! Candle compiles stub backends when the `cuda` or `metal` feature is off, so the rest of the
//! backend is device-agnostic and only this module asks which devices were compiled in and
//! which are present at run time.

use std::fmt;

use candle_core::{DType, Device};

use super::error::LoadError;

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
    type Err = LoadError;

    fn from_str(s: &str) -> Result<Self, LoadError> {
        let bad = || LoadError::InvalidOption {
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
    pub(crate) fn open(self) -> Result<Device, LoadError> {
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

/// The floating-point precision the model's weights and activations are held in.
///
/// Half precision halves the weights' memory and, on GPUs with tensor cores, speeds up
/// generation several times; on the CPU it is mostly slower (few CPUs multiply half floats
/// natively), which is why [`Auto`](Self::Auto) keeps f32 there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Precision {
    /// f32 on the CPU and on Metal, bf16 on CUDA GPUs that compute in it natively (compute
    /// capability 8.0 and up), f16 on older CUDA GPUs.
    ///
    /// bf16 is preferred over f16 because it keeps f32's exponent range, so activations
    /// that overflow f16 (the T5 encoder's are known to) stay finite. Metal stays in f32
    /// because its half-precision kernels are not yet exercised by anything here.
    #[default]
    Auto,
    /// 32-bit floats everywhere: the reference numerics.
    F32,
    /// IEEE half precision. The T5 text encoder stays in f32, as Hugging Face keeps T5 out
    /// of f16, because its activations overflow f16's range.
    F16,
    /// bfloat16: f32's range with 8 bits of mantissa.
    BF16,
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::BF16 => "bf16",
        })
    }
}

/// Parses what a command line or a config file says: `auto`, `f32`, `f16`, `bf16`.
impl std::str::FromStr for Precision {
    type Err = LoadError;

    fn from_str(s: &str) -> Result<Self, LoadError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            "bf16" => Ok(Self::BF16),
            _ => Err(LoadError::InvalidOption {
                option: "precision",
                reason: format!("{s:?} is not one of auto, f32, f16, bf16"),
            }),
        }
    }
}

/// The dtype the model is held in on `device` for `precision`.
///
/// The decoder builds its masks in this dtype and the generation loop reads logits back as
/// f32, so any float dtype works; what `Auto` picks is a speed/memory choice per device.
pub(crate) fn dtype_for(device: &Device, precision: Precision) -> DType {
    match precision {
        Precision::F32 => DType::F32,
        Precision::F16 => DType::F16,
        Precision::BF16 => DType::BF16,
        Precision::Auto if device.is_cuda() => {
            if cuda_computes_in_bf16(device) {
                DType::BF16
            } else {
                DType::F16
            }
        }
        Precision::Auto => DType::F32,
    }
}

/// Whether a CUDA device has native bf16 arithmetic (Ampere, compute capability 8.0, and
/// later); older GPUs emulate it slowly or lack some of candle's bf16 kernels.
#[cfg(feature = "cuda")]
fn cuda_computes_in_bf16(device: &Device) -> bool {
    match device {
        Device::Cuda(cuda) => cuda
            .cuda_stream()
            .context()
            .compute_capability()
            .is_ok_and(|(major, _)| major >= 8),
        _ => false,
    }
}

/// Without the `cuda` feature no device is a CUDA device.
#[cfg(not(feature = "cuda"))]
fn cuda_computes_in_bf16(_device: &Device) -> bool {
    false
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

fn open_cuda(ordinal: usize) -> Result<Device, LoadError> {
    if !candle_core::utils::cuda_is_available() {
        return Err(LoadError::DeviceUnavailable {
            device: DeviceChoice::Cuda(ordinal).to_string(),
            reason: "CUDA support is not compiled in; rebuild with `--features cuda`".into(),
        });
    }
    Device::new_cuda(ordinal).map_err(|e| LoadError::DeviceUnavailable {
        device: DeviceChoice::Cuda(ordinal).to_string(),
        reason: e.to_string(),
    })
}

fn open_metal(ordinal: usize) -> Result<Device, LoadError> {
    if !candle_core::utils::metal_is_available() {
        return Err(LoadError::DeviceUnavailable {
            device: DeviceChoice::Metal(ordinal).to_string(),
            reason: "Metal support is not compiled in; rebuild with `--features metal`".into(),
        });
    }
    Device::new_metal(ordinal).map_err(|e| LoadError::DeviceUnavailable {
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
        if auto.is_cpu() {
            assert_eq!(dtype_for(&auto, Precision::Auto), DType::F32);
        }
        assert_eq!(dtype_for(&Device::Cpu, Precision::Auto), DType::F32);
        assert_eq!(dtype_for(&Device::Cpu, Precision::F16), DType::F16);
        assert_eq!(dtype_for(&Device::Cpu, Precision::BF16), DType::BF16);
        assert_eq!(dtype_for(&auto, Precision::F32), DType::F32);
    }

    #[test]
    fn precision_names_parse_and_round_trip() {
        for (text, precision) in [
            ("auto", Precision::Auto),
            ("f32", Precision::F32),
            ("f16", Precision::F16),
            ("bf16", Precision::BF16),
            (" BF16 ", Precision::BF16),
        ] {
            assert_eq!(text.parse::<Precision>().unwrap(), precision, "{text}");
            assert_eq!(
                precision.to_string().parse::<Precision>().unwrap(),
                precision
            );
        }
        assert_eq!(Precision::default(), Precision::Auto);
        for bad in ["fp16", "half", "f64", ""] {
            let err = bad.parse::<Precision>().unwrap_err();
            assert!(
                matches!(
                    &err,
                    LoadError::InvalidOption {
                        option: "precision",
                        ..
                    }
                ),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn gpu_not_compiled_in_is_a_typed_error() {
        if !candle_core::utils::cuda_is_available() {
            let err = DeviceChoice::Cuda(0).open().unwrap_err();
            assert!(
                matches!(&err, LoadError::DeviceUnavailable { device, reason }
                    if device == "cuda:0" && reason.contains("--features cuda")),
                "{err}"
            );
        }
        if !candle_core::utils::metal_is_available() {
            let err = DeviceChoice::Metal(1).open().unwrap_err();
            assert!(
                matches!(&err, LoadError::DeviceUnavailable { device, .. } if device == "metal:1"),
                "{err}"
            );
        }
    }
}
