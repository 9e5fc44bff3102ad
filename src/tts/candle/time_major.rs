//! Convolutions on time-major signals (`[time, channels]`), shared by the HiFi-GAN style
//! decoders of Piper and Kokoro.
//!
//! Their last stages run few channels (128, 256) over tens or hundreds of thousands of
//! samples, where candle's im2col copies the signal once per kernel tap into a matrix far
//! larger than the caches. Time-major, each tap's shifted window is a contiguous block of
//! rows, so a convolution is a sum of one matrix product per tap with nothing copied.

use candle_core::{Result, Tensor};

/// One `[in, out]` matrix per kernel tap of a convolution weight (`[out, in, k]`), as
/// [`conv1d`] takes them.
pub(crate) fn taps(weight: &Tensor) -> Result<Vec<Tensor>> {
    let (_, _, k) = weight.dims3()?;
    (0..k)
        .map(|tap| weight.narrow(2, tap, 1)?.squeeze(2)?.t()?.contiguous())
        .collect()
}

/// A stride-1, ungrouped convolution without bias of `x` (`[time, in]`) with `taps` (from
/// [`taps`]): `[time', out]`, `time' = time + 2 padding − dilation (k − 1)`.
pub(crate) fn conv1d(
    x: &Tensor,
    taps: &[Tensor],
    padding: usize,
    dilation: usize,
) -> Result<Tensor> {
    let len = x.dim(0)?;
    let padded = x.pad_with_zeros(0, padding, padding)?;
    let out_len = (len + 2 * padding).saturating_sub(dilation * taps.len().saturating_sub(1));
    let mut y: Option<Tensor> = None;
    for (i, tap) in taps.iter().enumerate() {
        let term = padded.narrow(0, i * dilation, out_len)?.matmul(tap)?;
        y = Some(match y {
            Some(y) => (y + term)?,
            None => term,
        });
    }
    y.ok_or_else(|| candle_core::Error::Msg("a convolution with no taps".into()))
}
