//! Channel-major convolutions (`[batch, channels, len]`) as one matrix product each, for
//! the CPU.
//!
//! The weight as it is stored, `[out, in × k]`, times the input's `k` shifted copies stacked
//! channel by channel, `[batch, in × k, len']`, is the convolution, channel-major, with
//! nothing transposed. Candle's CPU path unfolds time-major, multiplies by the transposed
//! weight and transposes the product back; on the short signals of Piper's text encoder
//! and duration predictor (a hundred-odd phonemes) those copies and the product's packing
//! of a strided operand cost more than the arithmetic.
//!
//! Kokoro keeps Candle's path: its batches run these layers over padded items, and with
//! the length as the product's wide side a batched item came out different from the same
//! item alone in its last bits, where Kokoro holds its batched output to equal the
//! unbatched one exactly. (Piper's batches already differ within rounding.)

use candle_core::{Result, Tensor};

/// A stride-1, ungrouped convolution of a channel-major `x` (`[batch, in, len]`) with
/// `weight` (`[out, in, k]`), no bias: `[batch, out, len']`,
/// `len' = len + 2 padding − dilation (k − 1)`.
pub(crate) fn conv1d(
    x: &Tensor,
    weight: &Tensor,
    padding: usize,
    dilation: usize,
) -> Result<Tensor> {
    let (b, cin, len) = x.dims3()?;
    let (out, cin_w, k) = weight.dims3()?;
    if cin != cin_w {
        candle_core::bail!("conv1d: a weight for {cin_w} channels on {cin}")
    }
    let out_len = (len + 2 * padding).saturating_sub(dilation * k.saturating_sub(1));
    let w = weight.reshape((1, out, cin * k))?;
    let cols = if k == 1 && padding == 0 {
        x.clone()
    } else {
        let padded = x.pad_with_zeros(2, padding, padding)?;
        let shifted = (0..k)
            .map(|tap| padded.narrow(2, tap * dilation, out_len))
            .collect::<Result<Vec<_>>>()?;
        Tensor::stack(&shifted, 2)?.reshape((b, cin * k, out_len))?
    };
    w.broadcast_matmul(&cols.contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::conv1d;
    use crate::tts::candle::fused::testing::{relative_difference, tensor};

    /// A channel-major convolution as one product with the stored weight is Candle's
    /// `conv1d` within rounding: one tap and several, padding, dilation, a batch of two.
    #[test]
    fn a_convolution_as_one_product_is_candles() {
        for (k, padding, dilation) in [(1, 0, 1), (3, 1, 1), (5, 4, 2), (3, 0, 1)] {
            let weight = tensor(&[7, 6, k], k as u64, 0.5);
            let x = tensor(&[2, 6, 40], 9, 2.0);
            let ours = conv1d(&x, &weight, padding, dilation).unwrap();
            let candle = x.conv1d(&weight, padding, 1, dilation, 1).unwrap();
            let d = relative_difference(&ours, &candle);
            assert!(d < 1e-6, "{k} {padding} {dilation}: {d}");
        }
    }
}
