//! The building blocks Kokoro's stages share: linear layers that round their input through
//! 8 bits as the int8 export does, convolutions likewise, and the norms and activations.
//!
//! The export quantises every activation that enters a quantised linear layer or convolution
//! to uint8 at run time, one scale and zero point per tensor (ONNX `DynamicQuantizeLinear`),
//! and multiplies in integers. Running the dequantised weights in f32 on unrounded inputs
//! gives a slightly different (not worse) model; rounding the inputs the same way
//! ([`fake_quant`]) reproduces ONNX Runtime's numbers to float rounding, which is what lets
//! the parity test hold the durations (rounded to whole frames) exactly. Each batch item gets
//! its own scale over its own valid positions, as if it ran alone.

use candle_core::{D, DType, Result, Tensor};

use super::error::KokoroError;
use super::weights::Weights;
use crate::tts::candle::fused::{self, Epilogue};
use crate::tts::candle::time_major::{self, Taps};

/// Rounds `x` (`[batch, ...]`) through uint8 per batch item, as `DynamicQuantizeLinear` then
/// dequantisation would: range `[min(0, min x), max(0, max x)]` over the item's valid
/// positions (`valid` broadcasts to `x`, 1 valid, 0 padding), 255 steps, zero point rounded.
pub(crate) fn fake_quant(x: &Tensor, valid: Option<&Tensor>) -> Result<Tensor> {
    Ok(fake_quant_scaled(x, valid)?.0)
}

/// [`fake_quant`], also giving each item's scale (`[batch]`), which a quantised convolution
/// needs to round its bias as the export does.
pub(crate) fn fake_quant_scaled(x: &Tensor, valid: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
    let batch = x.dim(0)?;
    let masked = match valid {
        Some(v) => x.broadcast_mul(v)?,
        None => x.clone(),
    };
    let flat = masked.flatten_from(1)?;
    let (lo, hi) = if fused::applies(&flat) {
        let extremes = fused::item_min_max(&flat, batch)?;
        (extremes.narrow(1, 0, 1)?, extremes.narrow(1, 1, 1)?)
    } else {
        (flat.min_keepdim(1)?, flat.max_keepdim(1)?)
    };
    let (scale, zero) = steps(&lo, &hi)?;
    if fused::applies(x) {
        let scale = scale.flatten_all()?;
        return Ok((
            fused::round_to_steps(x, &scale, &zero.flatten_all()?)?,
            scale,
        ));
    }
    let mut shape = vec![batch];
    shape.extend(std::iter::repeat_n(1, x.rank() - 1));
    let scale = scale.reshape(shape.as_slice())?;
    let zero = zero.reshape(shape.as_slice())?;
    // clamp(round(x / s) + z, 0, 255) − z without the two passes that add and take away z:
    // z and round(x / s) are whole numbers far below 2²⁴, so clamping round(x / s) to
    // [−z, 255 − z] gives the same floats.
    let out = x
        .broadcast_div(&scale)?
        .round()?
        .broadcast_maximum(&zero.neg()?)?
        .broadcast_minimum(&(255.0 - &zero)?)?
        .broadcast_mul(&scale)?;
    Ok((out, scale.flatten_all()?))
}

/// The scale and zero point (`[batch, 1]` each) of `DynamicQuantizeLinear` for items whose
/// least and greatest values are `lo` and `hi` (`[batch, 1]`).
fn steps(lo: &Tensor, hi: &Tensor) -> Result<(Tensor, Tensor)> {
    let lo = lo.clamp(f32::MIN, 0f32)?;
    let hi = hi.clamp(0f32, f32::MAX)?;
    let scale = ((hi - &lo)? / 255.0)?;
    // An all-zero item: any scale works; 1 avoids dividing by zero.
    let scale = (&scale + scale.eq(0f32)?.to_dtype(DType::F32)?)?;
    let zero = lo
        .neg()?
        .broadcast_div(&scale)?
        .round()?
        .clamp(0f32, 255f32)?;
    Ok((scale, zero))
}

/// A linear layer over the last dimension, with the export's input rounding or without.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    /// `[in, out]`, ready for `x @ w`.
    weight_t: Tensor,
    bias: Option<Tensor>,
    quantised: bool,
}

impl Linear {
    /// `{prefix}.weight` (`[out, in]`) and `{prefix}.bias` when the model has one.
    pub(crate) fn load(
        weights: &Weights,
        prefix: &str,
        input: usize,
        output: usize,
        quantised: bool,
    ) -> std::result::Result<Self, KokoroError> {
        let weight = weights.shaped(&format!("{prefix}.weight"), &[output, input])?;
        let bias = weights.shaped(&format!("{prefix}.bias"), &[output]).ok();
        Ok(Self {
            weight_t: weight.t()?.contiguous()?,
            bias,
            quantised,
        })
    }

    /// Several layers that read the same input as one (their outputs side by side, in the
    /// order given): one matrix product instead of one each. All must round their input
    /// alike.
    pub(crate) fn side_by_side(layers: &[Linear]) -> std::result::Result<Self, KokoroError> {
        let weights: Vec<&Tensor> = layers.iter().map(|l| &l.weight_t).collect();
        let biases: Option<Vec<&Tensor>> = layers.iter().map(|l| l.bias.as_ref()).collect();
        let quantised = layers.first().is_some_and(|l| l.quantised);
        debug_assert!(layers.iter().all(|l| l.quantised == quantised));
        Ok(Self {
            weight_t: Tensor::cat(&weights, 1)?,
            bias: biases.map(|b| Tensor::cat(&b, 0)).transpose()?,
            quantised,
        })
    }

    /// `x` (`[batch, len, in]`) through the layer; `valid` (`[batch, len, 1]`) bounds the
    /// rounding range to real positions.
    pub(crate) fn forward(&self, x: &Tensor, valid: Option<&Tensor>) -> Result<Tensor> {
        let x = if self.quantised {
            fake_quant(x, valid)?
        } else {
            x.clone()
        };
        self.forward_rounded(&x)
    }

    /// The layer on an input already rounded (several layers reading one rounded input).
    pub(crate) fn forward_rounded(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.broadcast_matmul(&self.weight_t)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// Whether the input is rounded through 8 bits first.
    pub(crate) fn quantised(&self) -> bool {
        self.quantised
    }
}

/// Layer norm over the last dimension.
#[derive(Debug, Clone)]
pub(crate) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    pub(crate) fn load(
        weights: &Weights,
        prefix: &str,
        size: usize,
        eps: f32,
    ) -> std::result::Result<Self, KokoroError> {
        Ok(Self {
            weight: weights.shaped(&format!("{prefix}.weight"), &[size])?,
            bias: weights.shaped(&format!("{prefix}.bias"), &[size])?,
            eps,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let centred = x.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred.broadcast_div(&(var + f64::from(self.eps))?.sqrt()?)?;
        normed
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

/// A 1-D convolution of the export, optionally rounding its input through 8 bits and its
/// bias to a multiple of `input scale × weight scale` (rounded down), as `ConvInteger` with
/// its integer bias computes.
#[derive(Debug, Clone)]
pub(crate) struct Conv {
    weight: Tensor,
    bias: Option<Tensor>,
    /// The weight's per-tensor scale when the convolution is quantised.
    weight_scale: Option<f64>,
    padding: usize,
    dilation: usize,
    stride: usize,
    groups: usize,
    /// The weight prepared for [`Conv::forward_time_major`], made on demand.
    taps: Option<Taps>,
}

impl Conv {
    /// `weight` and `bias` by their names; the attributes from the graph's node `module`
    /// (padding `(k - 1) / 2` when the graph has none).
    pub(crate) fn load(
        weights: &Weights,
        module: &str,
        bias: &str,
        quantised: bool,
    ) -> std::result::Result<Self, KokoroError> {
        let weight = weights.get(&format!("{module}.weight"))?;
        let kernel = weight.dim(2)?;
        let attrs = weights.conv(module);
        let weight_scale = if quantised {
            weights.scale(&format!("{module}.weight"))
        } else {
            None
        };
        Ok(Self {
            weight,
            bias: weights.get(bias).ok(),
            weight_scale,
            padding: attrs.map_or((kernel - 1) / 2, |a| a.padding),
            dilation: attrs.map_or(1, |a| a.dilation),
            stride: attrs.map_or(1, |a| a.stride),
            groups: attrs.map_or(1, |a| a.groups),
            taps: None,
        })
    }

    /// Prepares [`forward_time_major`](Self::forward_time_major).
    pub(crate) fn with_taps(mut self) -> std::result::Result<Self, KokoroError> {
        self.taps = Some(time_major::taps(&self.weight)?);
        Ok(self)
    }

    /// The bias (`[out]`) rounded down to a multiple of `input scale × weight scale`, as
    /// `ConvInteger`'s integer bias is, for one item's input `scale` (`[1]`).
    fn rounded_bias(&self, scale: &Tensor, weight_scale: f64) -> Result<Option<Tensor>> {
        let Some(b) = &self.bias else {
            return Ok(None);
        };
        let s = (scale * weight_scale)?;
        Ok(Some(
            b.flatten_all()?
                .broadcast_div(&s)?
                .floor()?
                .broadcast_mul(&s)?,
        ))
    }

    /// The input rounded through 8 bits when quantised, and the bias (`[out]`) rounded as
    /// `ConvInteger`'s integer bias: one utterance (`x` is `[1, ...]`), no padding.
    fn round_input(&self, x: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        match self.weight_scale {
            Some(ws) => {
                let (xq, scale) = fake_quant_scaled(x, None)?;
                Ok((xq, self.rounded_bias(&scale, ws)?))
            }
            None => Ok((
                x.clone(),
                self.bias.as_ref().map(Tensor::flatten_all).transpose()?,
            )),
        }
    }

    /// The convolution on one utterance's time-major signal (`[time, in]`), giving
    /// `[time, out]`, then `epilogue`: the same numbers as [`forward`](Self::forward) on the
    /// transpose, without im2col (see [`time_major`]). Falls back to `forward` when there are
    /// no taps or the convolution is strided or grouped.
    pub(crate) fn forward_time_major(&self, x: &Tensor, epilogue: Epilogue<'_>) -> Result<Tensor> {
        let Some(taps) = self
            .taps
            .as_ref()
            .filter(|_| self.stride == 1 && self.groups == 1)
        else {
            let y = self.forward(&x.t()?.unsqueeze(0)?.contiguous()?, None)?;
            let y = y.squeeze(0)?.t()?.contiguous()?;
            return match epilogue {
                Epilogue::None => Ok(y),
                Epilogue::Residual(r) => y + r,
                Epilogue::LeakyRelu(slope) => leaky_relu(&y, slope),
            };
        };
        let (x, bias) = self.round_input(&x.unsqueeze(0)?)?;
        time_major::conv1d(
            &x.squeeze(0)?,
            taps,
            self.padding,
            self.dilation,
            bias.as_ref(),
            epilogue,
        )
    }

    /// [`forward_time_major`](Self::forward_time_major) of an `x` whose least and greatest
    /// values are known (`range`, as [`AdaIn::forward_time_major`] finds them on the CPU):
    /// a quantised convolution then takes its rounding from them instead of a pass over
    /// `x`, and applies it as it reads `x` (see [`time_major::conv1d_rounded`]).
    ///
    /// [`AdaIn::forward_time_major`]: super::prosody::AdaIn::forward_time_major
    pub(crate) fn forward_time_major_in(
        &self,
        x: &Tensor,
        range: Option<(f32, f32)>,
        epilogue: Epilogue<'_>,
    ) -> Result<Tensor> {
        let (Some(ws), Some((lo, hi)), Some(taps)) = (self.weight_scale, range, &self.taps) else {
            return self.forward_time_major(x, epilogue);
        };
        if self.stride != 1 || self.groups != 1 || !fused::applies(x) {
            return self.forward_time_major(x, epilogue);
        }
        // The same scale, zero point and rounded bias as `round_input`, from the known range.
        let extreme = |v: f32| Tensor::new(&[[v]], x.device());
        let (scale, zero) = steps(&extreme(lo)?, &extreme(hi)?)?;
        let bias = self.rounded_bias(&scale.flatten_all()?, ws)?;
        let host = |t: Tensor| t.flatten_all()?.to_vec1::<f32>();
        let (Some(&scale), Some(&zero)) = (host(scale)?.first(), host(zero)?.first()) else {
            candle_core::bail!("an 8-bit rounding without a scale")
        };
        time_major::conv1d_rounded(
            x,
            taps,
            self.padding,
            self.dilation,
            bias.as_ref(),
            (scale, zero),
            epilogue,
        )
    }

    /// `x` (`[batch, channels, len]`); `valid` (`[batch, 1, len]`) bounds the rounding range.
    pub(crate) fn forward(&self, x: &Tensor, valid: Option<&Tensor>) -> Result<Tensor> {
        let (x, bias) = match self.weight_scale {
            Some(ws) => {
                let (xq, scale) = fake_quant_scaled(x, valid)?;
                let bias = match &self.bias {
                    // floor(b / s) * s with s = input scale × weight scale, per item.
                    Some(b) => {
                        let s = (scale * ws)?.reshape(((), 1, 1))?;
                        let b = b.reshape((1, (), 1))?;
                        Some(b.broadcast_div(&s)?.floor()?.broadcast_mul(&s)?)
                    }
                    None => None,
                };
                (xq, bias)
            }
            None => (
                x.clone(),
                match &self.bias {
                    Some(b) => Some(b.reshape((1, (), 1))?),
                    None => None,
                },
            ),
        };
        let y = x.conv1d(
            &self.weight,
            self.padding,
            self.stride,
            self.dilation,
            self.groups,
        )?;
        match bias {
            Some(b) => y.broadcast_add(&b),
            None => Ok(y),
        }
    }
}

/// Layer norm over the channels of `[batch, channels, len]` (StyleTTS 2's `LayerNorm`).
pub(crate) fn channel_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(1)?;
    let normed = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed
        .broadcast_mul(&gamma.reshape((1, (), 1))?)?
        .broadcast_add(&beta.reshape((1, (), 1))?)
}

/// Leaky ReLU with the given negative slope.
pub(crate) fn leaky_relu(x: &Tensor, slope: f64) -> Result<Tensor> {
    if fused::applies(x) {
        return fused::leaky_relu(x, slope);
    }
    let negative = x.clamp(f32::MIN, 0f32)?;
    x.relu()? + (negative * slope)?
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::{Conv, Linear, fake_quant_scaled, leaky_relu};
    use crate::tts::candle::fused::Epilogue;
    use crate::tts::candle::fused::chain_only;
    use crate::tts::candle::fused::testing::{same, tensor, values};

    #[test]
    fn leaky_relu_is_the_candle_ops_bit_for_bit() {
        let x = tensor(&[37, 129], 1, 4.0);
        for slope in [0.1, 0.2, 0.01] {
            same(
                &leaky_relu(&x, slope).unwrap(),
                &chain_only(|| leaky_relu(&x, slope)).unwrap(),
            );
        }
    }

    /// Layers side by side give each layer's output in its columns, within rounding (one
    /// product sums in its own order).
    #[test]
    fn layers_side_by_side_are_the_layers_one_by_one() {
        use crate::tts::candle::fused::testing::relative_difference;
        let layer = |seed: u64, out: usize| Linear {
            weight_t: tensor(&[16, out], seed, 0.5),
            bias: Some(tensor(&[out], seed + 1, 0.5)),
            quantised: true,
        };
        let layers = [layer(1, 8), layer(3, 5), layer(5, 8)];
        let joined = Linear::side_by_side(&layers).unwrap();
        let x = tensor(&[2, 7, 16], 9, 2.0);
        let y = joined.forward_rounded(&x).unwrap();
        let mut at = 0;
        for l in &layers {
            let width = l.weight_t.dim(1).unwrap();
            let d = relative_difference(
                &y.narrow(2, at, width).unwrap().contiguous().unwrap(),
                &l.forward_rounded(&x).unwrap(),
            );
            assert!(d < 1e-6, "{at}: {d}");
            at += width;
        }
        assert_eq!(at, y.dim(2).unwrap());
        assert!(joined.quantised());
    }

    /// A quantised convolution told its input's range rounds by it as it would by a pass
    /// of its own, on the direct path (32 output channels) and the unfolding one (8): the
    /// same floats, with a residual or without, with a bias or without.
    #[test]
    fn a_convolution_told_its_inputs_range_rounds_as_one_that_reads_it() {
        for (cout, bias) in [(32usize, true), (32, false), (8, true)] {
            let conv = Conv {
                weight: tensor(&[cout, 16, 3], cout as u64, 0.5),
                bias: bias.then(|| tensor(&[cout], 5, 0.5)),
                weight_scale: Some(0.004),
                padding: 3,
                dilation: 3,
                stride: 1,
                groups: 1,
                taps: None,
            }
            .with_taps()
            .unwrap();
            let x = tensor(&[300, 16], 6, 2.0);
            let v = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let lo = v.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let residual = tensor(&[300, cout], 7, 1.0);
            for epilogue in [Epilogue::None, Epilogue::Residual(&residual)] {
                same(
                    &conv
                        .forward_time_major_in(&x, Some((lo, hi)), epilogue)
                        .unwrap(),
                    &conv.forward_time_major(&x, epilogue).unwrap(),
                );
            }
        }
    }

    #[test]
    fn eight_bit_rounding_is_the_candle_ops_bit_for_bit() {
        // Items of different ranges: one all positive (zero point 0), one all zero.
        let mut v = values(3 * 4 * 500, 2, 3.0);
        v[2000..4000].iter_mut().for_each(|x| *x = x.abs() + 0.5);
        v[4000..].iter_mut().for_each(|x| *x = 0.0);
        let x = Tensor::from_vec(v, (3, 4, 500), &Device::Cpu).unwrap();
        let valid = tensor(&[3, 1, 500], 3, 1.0).ge(0f32).unwrap();
        let valid = valid.to_dtype(DType::F32).unwrap();
        for mask in [None, Some(&valid)] {
            let (fused, fused_scale) = fake_quant_scaled(&x, mask).unwrap();
            let (chain, chain_scale) = chain_only(|| fake_quant_scaled(&x, mask)).unwrap();
            same(&fused, &chain);
            same(&fused_scale, &chain_scale);
        }
    }
}
