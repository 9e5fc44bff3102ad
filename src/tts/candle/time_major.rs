//! Convolutions on time-major signals (`[time, channels]`), shared by the HiFi-GAN style
//! decoders of Piper and Kokoro.
//!
//! Their last stages run few channels (128, 256) over tens or hundreds of thousands of
//! samples, where candle's im2col copies the signal once per kernel tap into a matrix far
//! larger than the caches. Time-major, each tap's shifted window is a contiguous block of
//! rows, so a convolution is a sum of one matrix product per tap with nothing copied. On the
//! CPU, blocks of rows copied side by side tap by tap make it one product (see
//! [`fused::conv1d_activated`]).

use candle_core::{Result, Tensor};

use super::fused::{self, Epilogue};

/// A convolution weight (`[out, in, k]`) prepared for [`conv1d`].
#[derive(Debug, Clone)]
pub(crate) struct Taps {
    /// `[k × in, out]`: the taps stacked in tap order. The fused CPU path takes it whole;
    /// the Candle ops' path takes tap `i` as its rows `i × in` to `(i + 1) × in`, a view,
    /// so the weight is held once, not twice.
    stacked: Tensor,
    /// Kernel taps.
    k: usize,
}

/// Prepares a convolution weight (`[out, in, k]`) for [`conv1d`].
pub(crate) fn taps(weight: &Tensor) -> Result<Taps> {
    let (_, _, k) = weight.dims3()?;
    let split = (0..k)
        .map(|tap| weight.narrow(2, tap, 1)?.squeeze(2)?.t()?.contiguous())
        .collect::<Result<Vec<_>>>()?;
    let stacked = Tensor::cat(&split, 0)?;
    Ok(Taps { stacked, k })
}

/// A stride-1, ungrouped convolution of `x` (`[time, in]`) with `taps` (from [`taps`]), plus
/// `bias` (`[out]`) and then `epilogue`: `[time', out]`,
/// `time' = time + 2 padding − dilation (k − 1)`.
pub(crate) fn conv1d(
    x: &Tensor,
    taps: &Taps,
    padding: usize,
    dilation: usize,
    bias: Option<&Tensor>,
    epilogue: Epilogue<'_>,
) -> Result<Tensor> {
    conv1d_activated(x, taps, padding, dilation, bias, None, epilogue)
}

/// [`conv1d`] of `leaky_relu(x, pre)` when `pre` is a slope. On the CPU the activation is
/// applied as the input is unfolded (see [`fused::conv1d_activated`]), which saves a pass
/// over the signal and a tensor of its size.
pub(crate) fn conv1d_activated(
    x: &Tensor,
    taps: &Taps,
    padding: usize,
    dilation: usize,
    bias: Option<&Tensor>,
    pre: Option<f64>,
    epilogue: Epilogue<'_>,
) -> Result<Tensor> {
    if fused::applies(x) {
        let shape = fused::Conv1dShape {
            taps: taps.k,
            padding,
            dilation,
        };
        return fused::conv1d_activated(x, &taps.stacked, shape, bias, pre, epilogue);
    }
    let activated;
    let x = match pre {
        Some(slope) => {
            activated = candle_nn::ops::leaky_relu(x, slope)?;
            &activated
        }
        None => x,
    };
    let len = x.dim(0)?;
    let padded = x.pad_with_zeros(0, padding, padding)?;
    let k = taps.k;
    let cin = taps.stacked.dim(0)? / k.max(1);
    let out_len = (len + 2 * padding).saturating_sub(dilation * k.saturating_sub(1));
    let mut y: Option<Tensor> = None;
    for i in 0..k {
        let tap = taps.stacked.narrow(0, i * cin, cin)?;
        let term = padded.narrow(0, i * dilation, out_len)?.matmul(&tap)?;
        y = Some(match y {
            Some(y) => (y + term)?,
            None => term,
        });
    }
    let mut y = y.ok_or_else(|| candle_core::Error::Msg("a convolution with no taps".into()))?;
    if let Some(b) = bias {
        y = y.broadcast_add(&b.reshape((1, ()))?)?;
    }
    match epilogue {
        Epilogue::None => Ok(y),
        Epilogue::Residual(r) => y + r,
        Epilogue::LeakyRelu(slope) => candle_nn::ops::leaky_relu(&y, slope),
    }
}

#[cfg(test)]
mod tests {
    use super::{conv1d, conv1d_activated, taps};
    use crate::tts::candle::fused::testing::{relative_difference, same, tensor};
    use crate::tts::candle::fused::{Epilogue, chain_only, leaky_relu};

    /// The fused path sums each output in one product rather than one per tap, so the floats
    /// differ in their last bits (observed: at most 2.4e-7 of the largest output).
    #[test]
    fn time_major_convolution_is_the_product_per_tap() {
        let weight = tensor(&[8, 6, 5], 8, 0.5);
        let bias = tensor(&[8], 9, 0.5);
        let taps = taps(&weight).unwrap();
        // Shorter than the kernel's reach, around it, and longer than a block of rows.
        for (len, padding, dilation) in [(3, 4, 2), (40, 6, 3), (60_000, 2, 1)] {
            let x = tensor(&[len, 6], len as u64, 2.0);
            let out_len = len + 2 * padding - dilation * 4;
            let residual = tensor(&[out_len, 8], 10, 1.0);
            for epilogue in [
                Epilogue::None,
                Epilogue::Residual(&residual),
                Epilogue::LeakyRelu(0.1),
            ] {
                for b in [None, Some(&bias)] {
                    let run = || conv1d(&x, &taps, padding, dilation, b, epilogue);
                    let d = relative_difference(&run().unwrap(), &chain_only(run).unwrap());
                    assert!(d < 3e-7, "{len} {padding} {dilation} {epilogue:?}: {d}");
                }
            }
        }
    }

    /// With output channels in multiples of 32 the CPU runs the direct convolution (on
    /// machines with AVX2 and FMA): within rounding of the Candle ops, for every tile of
    /// rows (three, and the one or two left over), taps, dilations, padding past the
    /// signal, both epilogues and the activation while reading.
    #[test]
    fn the_direct_convolution_is_the_product_per_tap() {
        for (cin, cout, k) in [(7usize, 32usize, 3usize), (32, 64, 5), (64, 32, 1)] {
            let weight = tensor(&[cout, cin, k], (cin * cout + k) as u64, 0.5);
            let bias = tensor(&[cout], 14, 0.5);
            let taps = taps(&weight).unwrap();
            for (len, padding, dilation) in [
                (1usize, 1usize, 1usize),
                (2, 2, 3),
                (4, 6, 2),
                (5, 0, 1),
                (3001, 3, 3),
            ] {
                let out_len = (len + 2 * padding).saturating_sub(dilation * (k - 1));
                if out_len == 0 {
                    continue;
                }
                let x = tensor(&[len, cin], len as u64 + 2, 2.0);
                let residual = tensor(&[out_len, cout], 15, 1.0);
                for epilogue in [
                    Epilogue::None,
                    Epilogue::Residual(&residual),
                    Epilogue::LeakyRelu(0.1),
                ] {
                    for (b, pre) in [(None, None), (Some(&bias), Some(0.1))] {
                        let run =
                            || conv1d_activated(&x, &taps, padding, dilation, b, pre, epilogue);
                        let d = relative_difference(&run().unwrap(), &chain_only(run).unwrap());
                        assert!(
                            d < 1e-6,
                            "{cin} {cout} {k} {len} {padding} {dilation} {epilogue:?}: {d}"
                        );
                    }
                }
            }
        }
    }

    /// The activation applied while unfolding is the same floats as a leaky ReLU pass
    /// before the convolution, so the outputs are equal bit for bit.
    #[test]
    fn activation_while_unfolding_is_the_activation_before() {
        let weight = tensor(&[8, 6, 3], 11, 0.5);
        let bias = tensor(&[8], 12, 0.5);
        let taps = taps(&weight).unwrap();
        for (len, padding, dilation) in [(2, 3, 2), (50, 2, 2), (40_000, 1, 1)] {
            let x = tensor(&[len, 6], len as u64 + 1, 2.0);
            let out_len = len + 2 * padding - dilation * 2;
            let residual = tensor(&[out_len, 8], 13, 1.0);
            for epilogue in [
                Epilogue::None,
                Epilogue::Residual(&residual),
                Epilogue::LeakyRelu(0.1),
            ] {
                let run = || {
                    conv1d_activated(
                        &x,
                        &taps,
                        padding,
                        dilation,
                        Some(&bias),
                        Some(0.1),
                        epilogue,
                    )
                };
                let activated = run().unwrap();
                let before = leaky_relu(&x, 0.1).unwrap();
                let plain =
                    conv1d(&before, &taps, padding, dilation, Some(&bias), epilogue).unwrap();
                same(&activated, &plain);
                // And within rounding of the Candle ops (a leaky ReLU, then the convolution).
                let chain = chain_only(run).unwrap();
                let d = relative_difference(&activated, &chain);
                assert!(d < 3e-7, "{len} {padding} {dilation} {epilogue:?}: {d}");
            }
        }
    }
}
