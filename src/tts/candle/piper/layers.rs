//! Building blocks shared by the VITS parts: convolutions with the graph's own attributes,
//! channel-wise layer norm and length masks.

use crate::tts::candle::error::LoadError;
use crate::tts::candle::fused::{self, Epilogue};
use crate::tts::candle::time_major::{self, Polyphase, Taps};
use crate::tts::candle::unfold;
use candle_core::{D, DType, Device, Result, Tensor};

use super::error::PiperError;
use super::onnx::{ConvAttrs, Weights};

/// A 1-D convolution (or transposed convolution) as the exported graph runs it.
#[derive(Debug, Clone)]
pub(crate) struct Conv {
    weight: Tensor,
    /// `[1, out, 1]`, ready to broadcast.
    bias: Option<Tensor>,
    attrs: ConvAttrs,
    transposed: bool,
    /// The weight prepared for [`Conv::forward_time_major`], made on demand.
    taps: Option<Taps>,
    /// A transposed convolution prepared for [`Conv::forward_time_major`] (see
    /// [`Conv::with_taps`]).
    polyphase: Option<Polyphase>,
}

impl Conv {
    /// Loads `module.weight` (and `module.bias` if present) for a convolution from
    /// `in_channels`; `out_channels`, when known, is checked too.
    pub(crate) fn load(
        w: &Weights,
        module: &str,
        in_channels: usize,
        out_channels: Option<usize>,
    ) -> std::result::Result<Self, PiperError> {
        Self::load_inner(w, module, in_channels, out_channels, false)
    }

    /// Loads a transposed convolution (weights stored `[in, out, k]`).
    pub(crate) fn load_transposed(
        w: &Weights,
        module: &str,
        in_channels: usize,
    ) -> std::result::Result<Self, PiperError> {
        Self::load_inner(w, module, in_channels, None, true)
    }

    fn load_inner(
        w: &Weights,
        module: &str,
        in_channels: usize,
        out_channels: Option<usize>,
        transposed: bool,
    ) -> std::result::Result<Self, PiperError> {
        let name = format!("{module}.weight");
        let weight = w.get(&name)?;
        let attrs = w.conv(module);
        let mismatch = |expected: Vec<usize>| -> PiperError {
            LoadError::ShapeMismatch {
                tensor: name.clone(),
                expected,
                found: weight.dims().to_vec(),
            }
            .into()
        };
        let &[a, b, k] = weight.dims() else {
            return Err(mismatch(vec![out_channels.unwrap_or(0), in_channels, 1]));
        };
        let out = if transposed {
            if a != in_channels {
                return Err(mismatch(vec![in_channels, b, k]));
            }
            b
        } else {
            let want_out = out_channels.unwrap_or(a);
            if a != want_out || b * attrs.groups.max(1) != in_channels {
                return Err(mismatch(vec![
                    want_out,
                    in_channels / attrs.groups.max(1),
                    k,
                ]));
            }
            a
        };
        let bias_name = format!("{module}.bias");
        let bias = if w.contains(&bias_name) {
            Some(w.shaped(&bias_name, &[out])?.reshape((1, out, 1))?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            attrs,
            transposed,
            taps: None,
            polyphase: None,
        })
    }

    /// The weight as stored (`[out, in / groups, k]`; transposed: `[in, out, k]`).
    pub(crate) fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Output channels.
    pub(crate) fn out_channels(&self) -> usize {
        let dims = self.weight.dims();
        if self.transposed { dims[1] } else { dims[0] }
    }

    /// The stride (the upsampling factor of a transposed convolution).
    pub(crate) fn stride(&self) -> usize {
        self.attrs.stride
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let a = &self.attrs;
        let y = if self.transposed {
            // Without padding candle takes its fast col2im path; the padding of a transposed
            // convolution only crops the full output, so crop afterwards.
            let full = x.conv_transpose1d(&self.weight, 0, 0, a.stride, a.dilation, a.groups)?;
            let len = full.dim(2)?;
            full.narrow(2, a.padding, len.saturating_sub(2 * a.padding))?
        } else if a.groups > 1 && a.groups == self.weight.dim(0)? && a.stride == 1 {
            self.depthwise(x)?
        } else if a.stride == 1 && a.groups == 1 && x.device().is_cpu() {
            unfold::conv1d(x, &self.weight, a.padding, a.dilation)?
        } else {
            x.conv1d(&self.weight, a.padding, a.stride, a.dilation, a.groups)?
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

impl Conv {
    /// Prepares [`forward_time_major`](Self::forward_time_major).
    ///
    /// Prepares [`forward_time_major`](Self::forward_time_major): a transposed convolution
    /// in its polyphase form (see [`Polyphase`]).
    pub(crate) fn with_taps(mut self) -> std::result::Result<Self, PiperError> {
        if self.transposed {
            let a = &self.attrs;
            self.polyphase = Some(time_major::polyphase(
                &self.weight,
                self.bias.as_ref(),
                a.stride,
                a.padding,
            )?);
        } else {
            self.taps = Some(time_major::taps(&self.weight)?);
        }
        Ok(self)
    }

    /// The convolution on a time-major `[time, in]` signal, giving `[time, out]`, then
    /// `epilogue`.
    ///
    /// See [`time_major`] for why.
    pub(crate) fn forward_time_major(&self, x: &Tensor, epilogue: Epilogue<'_>) -> Result<Tensor> {
        self.forward_time_major_activated(x, None, epilogue)
    }

    /// [`forward_time_major`](Self::forward_time_major) of `leaky_relu(x, pre)` when `pre`
    /// is a slope: HiFi-GAN activates the input of almost every convolution, and the CPU
    /// kernel applies it while unfolding the input rather than in a pass of its own.
    pub(crate) fn forward_time_major_activated(
        &self,
        x: &Tensor,
        pre: Option<f64>,
        epilogue: Epilogue<'_>,
    ) -> Result<Tensor> {
        let a = &self.attrs;
        if let Some(polyphase) = self
            .polyphase
            .as_ref()
            .filter(|_| a.groups == 1 && a.dilation == 1)
        {
            let y = polyphase.forward(x, pre)?;
            return match epilogue {
                Epilogue::None => Ok(y),
                Epilogue::Residual(r) => y + r,
                Epilogue::LeakyRelu(slope) => leaky_relu(&y, slope),
            };
        }
        let Some(taps) = self
            .taps
            .as_ref()
            .filter(|_| !self.transposed && a.stride == 1 && a.groups == 1)
        else {
            let x = match pre {
                Some(slope) => leaky_relu(x, slope)?,
                None => x.clone(),
            };
            let y = self.forward(&x.t()?.unsqueeze(0)?.contiguous()?)?;
            let y = y.squeeze(0)?.t()?.contiguous()?;
            return match epilogue {
                Epilogue::None => Ok(y),
                Epilogue::Residual(r) => y + r,
                Epilogue::LeakyRelu(slope) => leaky_relu(&y, slope),
            };
        };
        let bias = self.bias.as_ref().map(Tensor::flatten_all).transpose()?;
        time_major::conv1d_activated(x, taps, a.padding, a.dilation, bias.as_ref(), pre, epilogue)
    }

    /// A depthwise convolution (one filter per channel, as in the duration predictor) as a
    /// sum of shifted, scaled copies: candle would run it as one convolution per channel.
    fn depthwise(&self, x: &Tensor) -> Result<Tensor> {
        let a = &self.attrs;
        let (_, _, len) = x.dims3()?;
        let (channels, _, k) = self.weight.dims3()?;
        let padded = x.pad_with_zeros(2, a.padding, a.padding)?;
        let out_len = (len + 2 * a.padding).saturating_sub(a.dilation * (k - 1));
        let mut y: Option<Tensor> = None;
        for tap in 0..k {
            let w = self.weight.narrow(2, tap, 1)?.reshape((1, channels, 1))?;
            let term = padded
                .narrow(2, tap * a.dilation, out_len)?
                .broadcast_mul(&w)?;
            y = Some(match y {
                Some(y) => (y + term)?,
                None => term,
            });
        }
        y.ok_or_else(|| candle_core::Error::Msg("a convolution with no taps".into()))
    }
}

/// VITS's `LayerNorm`: normalises over channels of a `[batch, channels, time]` tensor.
#[derive(Debug, Clone)]
pub(crate) struct ChannelNorm {
    gamma: Tensor,
    beta: Tensor,
}

impl ChannelNorm {
    pub(crate) fn load(
        w: &Weights,
        module: &str,
        channels: usize,
    ) -> std::result::Result<Self, PiperError> {
        Ok(Self {
            gamma: w.shaped(&format!("{module}.gamma"), &[channels])?,
            beta: w.shaped(&format!("{module}.beta"), &[channels])?,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let t = x.transpose(1, 2)?.contiguous()?;
        let y = candle_nn::ops::layer_norm(&t, &self.gamma, &self.beta, 1e-5)?;
        y.transpose(1, 2)?.contiguous()
    }
}

/// `[batch, 1, max_len]`: 1 where `t < lengths[b]`, else 0.
pub(crate) fn length_mask(
    lengths: &[usize],
    max_len: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let mut data = vec![0f32; lengths.len() * max_len];
    for (b, &len) in lengths.iter().enumerate() {
        for v in &mut data[b * max_len..b * max_len + len.min(max_len)] {
            *v = 1.0;
        }
    }
    Tensor::from_vec(data, (lengths.len(), 1, max_len), device)?.to_dtype(dtype)
}

/// Splits `[batch, 2c, time]` into its two channel halves.
pub(crate) fn halves(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let c = x.dim(1)? / 2;
    Ok((x.narrow(1, 0, c)?, x.narrow(1, c, c)?))
}

/// `Flip`: reverses the channel order.
pub(crate) fn flip_channels(x: &Tensor) -> Result<Tensor> {
    x.flip(&[1])
}

/// Leaky ReLU.
pub(crate) fn leaky_relu(x: &Tensor, slope: f64) -> Result<Tensor> {
    if fused::applies(x) {
        return fused::leaky_relu(x, slope);
    }
    candle_nn::ops::leaky_relu(x, slope)
}

/// Softmax over the last dimension.
pub(crate) fn softmax_last(x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::softmax(x, D::Minus1)
}

#[cfg(test)]
mod tests {
    use super::leaky_relu;
    use crate::tts::candle::fused::chain_only;
    use crate::tts::candle::fused::testing::{same, tensor};

    #[test]
    fn leaky_relu_is_the_candle_ops_bit_for_bit() {
        let x = tensor(&[37, 129], 1, 4.0);
        for slope in [0.1, 0.01] {
            same(
                &leaky_relu(&x, slope).unwrap(),
                &chain_only(|| leaky_relu(&x, slope)).unwrap(),
            );
        }
    }

    /// The polyphase form of a transposed convolution is Candle's `conv_transpose1d` (with
    /// the padding cropped) within rounding: each output sums the same products in another
    /// order.
    #[test]
    fn transposed_convolution_time_major_is_candles() {
        use super::{Conv, Epilogue};
        use crate::tts::candle::fused::testing::relative_difference;
        use crate::tts::candle::onnx::ConvAttrs;
        // Piper's upsamplers (kernel 16 stride 8 pads 4, kernel 8 stride 4 pads 2), and a
        // kernel that is not a multiple of the stride.
        for (k, stride, padding, len) in [(16, 8, 4, 37), (8, 4, 2, 1000), (5, 2, 1, 9)] {
            let conv = Conv {
                weight: tensor(&[6, 5, k], k as u64, 0.5),
                bias: Some(tensor(&[5], 3, 0.5).reshape((1, 5, 1)).unwrap()),
                attrs: ConvAttrs {
                    padding,
                    stride,
                    dilation: 1,
                    groups: 1,
                },
                transposed: true,
                taps: None,
                polyphase: None,
            }
            .with_taps()
            .unwrap();
            let x = tensor(&[len, 6], len as u64, 2.0);
            let time_major = conv
                .forward_time_major_activated(&x, Some(0.1), Epilogue::None)
                .unwrap();
            let channel_major = leaky_relu(&x, 0.1)
                .unwrap()
                .t()
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let candle = conv
                .forward(&channel_major)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .t()
                .unwrap();
            let d = relative_difference(&time_major, &candle);
            assert!(d < 3e-7, "{k} {stride} {padding} {len}: {d}");
        }
    }
}
