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

/// A transposed convolution (weight `[in, out, k]`, stride `s`) prepared for
/// [`Polyphase::forward`] on time-major signals.
///
/// It becomes a plain convolution over its input with `ceil(k / s)` taps and `s × out`
/// channels: output sample `q s + r` (phase `r`) is the sum over `m` of input row `q − m`
/// times tap `r + m s`, so one product per input row gives `s` consecutive output rows,
/// time-major, and the padding only crops rows. Candle's CPU kernels instead scatter a
/// product `k` times larger than the output, channel-major, or take one dot product per
/// output sample and channel.
#[derive(Debug, Clone)]
pub(crate) struct Polyphase {
    taps: Taps,
    /// The bias repeated once per output phase (`[s × out]`).
    bias: Option<Tensor>,
    out: usize,
    k: usize,
    stride: usize,
    padding: usize,
}

/// Prepares a transposed convolution (`weight` `[in, out, k]`, `bias` of `out` values in any
/// shape) for [`Polyphase::forward`].
pub(crate) fn polyphase(
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Polyphase> {
    let (cin, out, k) = weight.dims3()?;
    let s = stride.max(1);
    let m = k.div_ceil(s);
    // [in, out, m s] → [in, out, m, s], taps in the order the rows are unfolded (the latest
    // input row last), then [s × out, in, m]: a plain convolution's weight.
    let plain = weight
        .pad_with_zeros(2, 0, m * s - k)?
        .reshape((cin, out, m, s))?
        .flip(&[2])?
        .permute((3, 1, 0, 2))?
        .contiguous()?
        .reshape((s * out, cin, m))?;
    let bias = match bias {
        Some(b) => Some(
            b.flatten_all()?
                .unsqueeze(0)?
                .repeat((s, 1))?
                .flatten_all()?,
        ),
        None => None,
    };
    Ok(Polyphase {
        taps: taps(&plain)?,
        bias,
        out,
        k,
        stride: s,
        padding,
    })
}

impl Polyphase {
    /// The transposed convolution of `x` (`[time, in]`), or of `leaky_relu(x, pre)` when
    /// `pre` is a slope: `[(time − 1) s + k − 2 padding, out]`.
    pub(crate) fn forward(&self, x: &Tensor, pre: Option<f64>) -> Result<Tensor> {
        let (len, _) = x.dims2()?;
        let m = self.taps.k;
        let phases = conv1d_activated(
            x,
            &self.taps,
            m - 1,
            1,
            self.bias.as_ref(),
            pre,
            Epilogue::None,
        )?;
        let out_len =
            (len.saturating_sub(1) * self.stride + self.k).saturating_sub(2 * self.padding);
        phases
            .reshape(((len + m - 1) * self.stride, self.out))?
            .narrow(0, self.padding, out_len)
    }
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

/// [`conv1d`] of `x` rounded through 8 bits with one `(scale, zero point)`, as Kokoro's
/// quantised layers round their input, on the CPU (see [`fused::conv1d_rounded`]).
pub(crate) fn conv1d_rounded(
    x: &Tensor,
    taps: &Taps,
    padding: usize,
    dilation: usize,
    bias: Option<&Tensor>,
    steps: (f32, f32),
    epilogue: Epilogue<'_>,
) -> Result<Tensor> {
    let shape = fused::Conv1dShape {
        taps: taps.k,
        padding,
        dilation,
    };
    fused::conv1d_rounded(x, &taps.stacked, shape, bias, steps, epilogue)
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
    use super::{conv1d, conv1d_activated, polyphase, taps};
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

    /// The polyphase form of a transposed convolution is Candle's `conv_transpose1d` (its
    /// padding cropped) within rounding, on the direct path (output channels a multiple of
    /// 32: Kokoro's upsamplers) and the unfolding one, for kernels that are and are not a
    /// multiple of the stride.
    #[test]
    fn a_transposed_convolution_in_polyphase_form_is_candles() {
        for (cin, cout, k, stride, padding, len) in [
            (16usize, 32usize, 20usize, 10usize, 5usize, 23usize),
            (8, 64, 12, 6, 3, 301),
            (6, 5, 5, 2, 1, 9),
        ] {
            let weight = tensor(&[cin, cout, k], (cin + k) as u64, 0.5);
            let bias = tensor(&[cout], 16, 0.5);
            let x = tensor(&[len, cin], len as u64, 2.0);
            let up = polyphase(&weight, Some(&bias), stride, padding).unwrap();
            for pre in [None, Some(0.1)] {
                let input = match pre {
                    Some(slope) => leaky_relu(&x, slope).unwrap(),
                    None => x.clone(),
                };
                let full = input
                    .t()
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap()
                    .conv_transpose1d(&weight, 0, 0, stride, 1, 1)
                    .unwrap();
                let full_len = full.dim(2).unwrap();
                let candle = full
                    .narrow(2, padding, full_len - 2 * padding)
                    .unwrap()
                    .broadcast_add(&bias.reshape((1, cout, 1)).unwrap())
                    .unwrap()
                    .squeeze(0)
                    .unwrap()
                    .t()
                    .unwrap();
                let d = relative_difference(&up.forward(&x, pre).unwrap(), &candle);
                assert!(d < 1e-6, "{cin} {cout} {k} {stride} {padding} {len}: {d}");
            }
        }
    }

    /// A convolution to one channel (dilation 1: a HiFi-GAN's last layer) takes one dot
    /// product per output over its window of the padded input: within rounding of the
    /// Candle ops, for windows past either end, both epilogues and the activation while
    /// reading.
    #[test]
    fn a_convolution_to_one_channel_is_the_product_per_tap() {
        for (cin, k) in [(32usize, 7usize), (5, 3), (3, 1)] {
            let weight = tensor(&[1, cin, k], (cin + k) as u64, 0.5);
            // Not `tensor`: its first value is always an exact zero.
            let bias = candle_core::Tensor::new(&[0.37f32], &candle_core::Device::Cpu).unwrap();
            let taps = taps(&weight).unwrap();
            for (len, padding) in [(1usize, 3usize), (2, 0), (3001, 3)] {
                let out_len = (len + 2 * padding).saturating_sub(k - 1);
                if out_len == 0 {
                    continue;
                }
                let x = tensor(&[len, cin], len as u64 + 3, 2.0);
                let residual = tensor(&[out_len, 1], 18, 1.0);
                for epilogue in [
                    Epilogue::None,
                    Epilogue::Residual(&residual),
                    Epilogue::LeakyRelu(0.1),
                ] {
                    for (b, pre) in [(None, None), (Some(&bias), Some(0.01))] {
                        let run = || conv1d_activated(&x, &taps, padding, 1, b, pre, epilogue);
                        let d = relative_difference(&run().unwrap(), &chain_only(run).unwrap());
                        assert!(d < 1e-6, "{cin} {k} {len} {padding} {epilogue:?}: {d}");
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
