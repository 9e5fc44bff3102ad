//! The normalizing flow, run in reverse: residual coupling layers (mean-only) built on
//! WaveNet-style gated convolutions turn the prior sample into the decoder's latent.

use crate::tts::candle::error::LoadError;
use crate::tts::candle::fused::{self, Epilogue};
use candle_core::{D, IndexOp, Result, Tensor};

use super::error::PiperError;
use super::layers::{Conv, flip_channels, halves};
use super::onnx::Weights;

/// `WN`: gated dilated convolutions with residual and skip outputs.
#[derive(Debug, Clone)]
struct WaveNet {
    in_layers: Vec<Conv>,
    res_skip: Vec<Conv>,
    cond: Option<Conv>,
    hidden: usize,
}

impl WaveNet {
    fn load(
        w: &Weights,
        module: &str,
        hidden: usize,
        speaker_channels: Option<usize>,
    ) -> std::result::Result<Self, PiperError> {
        let mut in_layers = Vec::new();
        let mut res_skip = Vec::new();
        while w.contains(&format!("{module}.in_layers.{}.weight", in_layers.len())) {
            let i = in_layers.len();
            in_layers.push(time_major(Conv::load(
                w,
                &format!("{module}.in_layers.{i}"),
                hidden,
                Some(2 * hidden),
            )?)?);
            res_skip.push(time_major(Conv::load(
                w,
                &format!("{module}.res_skip_layers.{i}"),
                hidden,
                None,
            )?)?);
        }
        if in_layers.is_empty() {
            return Err(LoadError::MissingTensor {
                tensor: format!("{module}.in_layers.0.weight"),
            }
            .into());
        }
        let cond = match speaker_channels {
            Some(g) => Some(Conv::load(
                w,
                &format!("{module}.cond_layer"),
                g,
                Some(2 * hidden * in_layers.len()),
            )?),
            None => None,
        };
        Ok(Self {
            in_layers,
            res_skip,
            cond,
            hidden,
        })
    }

    /// Channel-major over a batch (`[batch, hidden, frames]`), masked; `g` is the
    /// speaker embedding (`[batch, speaker, 1]`).
    fn forward(&self, x: &Tensor, mask: &Tensor, g: Option<&Tensor>) -> Result<Tensor> {
        let g = match (&self.cond, g) {
            (Some(cond), Some(g)) => Some(cond.forward(g)?),
            _ => None,
        };
        self.layers(x, Some(mask), g.as_ref(), Conv::forward)
    }

    /// One utterance, time-major (`[frames, hidden]`, every frame valid, so no mask); `g`
    /// is the speaker embedding (`[1, speaker, 1]`).
    fn forward_time_major(&self, x: &Tensor, g: Option<&Tensor>) -> Result<Tensor> {
        let g = match (&self.cond, g) {
            (Some(cond), Some(g)) => Some(cond.forward(g)?.squeeze(D::Minus1)?),
            _ => None,
        };
        self.layers(x, None, g.as_ref(), |conv, x| {
            conv.forward_time_major(x, Epilogue::None)
        })
    }

    /// The gated layers, in either layout: channels are dimension 1 in both (`[batch,
    /// channels, frames]` and `[frames, channels]`), and `g` (conditioned) broadcasts
    /// over the rest.
    fn layers(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        g: Option<&Tensor>,
        conv: impl Fn(&Conv, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let h = self.hidden;
        let masked = |t: Tensor| match mask {
            Some(m) => t.broadcast_mul(m),
            None => Ok(t),
        };
        let mut x = x.clone();
        let mut output: Option<Tensor> = None;
        let n = self.in_layers.len();
        for (i, (in_layer, res_skip)) in self.in_layers.iter().zip(&self.res_skip).enumerate() {
            let mut x_in = conv(in_layer, &x)?;
            let g = g.map(|g| g.narrow(1, i * 2 * h, 2 * h)).transpose()?;
            let acts = if x_in.rank() == 2 && fused::applies(&x_in) {
                // Time-major on the CPU: one pass instead of five over the strided halves.
                fused::gated(&x_in, g.as_ref())?
            } else {
                if let Some(g) = &g {
                    x_in = x_in.broadcast_add(g)?;
                }
                (x_in.narrow(1, 0, h)?.tanh()? * candle_nn::ops::sigmoid(&x_in.narrow(1, h, h)?)?)?
            };
            let rs = conv(res_skip, &acts)?;
            let skip = if i + 1 < n {
                x = masked((x + rs.narrow(1, 0, h)?)?)?;
                rs.narrow(1, h, h)?
            } else {
                rs
            };
            output = Some(match output {
                Some(o) => (o + skip)?,
                None => skip,
            });
        }
        match output {
            Some(o) => masked(o),
            None => Ok(x),
        }
    }
}

/// Prepares `conv` for the time-major path the CPU takes (see [`Flow::reverse`]); on a
/// GPU the flow runs channel-major and the taps would only hold memory.
fn time_major(conv: Conv) -> std::result::Result<Conv, PiperError> {
    if conv.weight().device().is_cpu() {
        conv.with_taps()
    } else {
        Ok(conv)
    }
}

/// A mean-only residual coupling layer.
#[derive(Debug, Clone)]
struct Coupling {
    pre: Conv,
    enc: WaveNet,
    post: Conv,
}

impl Coupling {
    fn reverse(&self, z: &Tensor, mask: &Tensor, g: Option<&Tensor>) -> Result<Tensor> {
        let (x0, x1) = halves(z)?;
        let h = self.pre.forward(&x0)?.broadcast_mul(mask)?;
        let h = self.enc.forward(&h, mask, g)?;
        let m = self.post.forward(&h)?.broadcast_mul(mask)?;
        let x1 = (x1 - m)?.broadcast_mul(mask)?;
        Tensor::cat(&[&x0, &x1], 1)
    }

    /// [`reverse`](Self::reverse) of one utterance, time-major (`[frames, channels]`).
    fn reverse_time_major(&self, z: &Tensor, g: Option<&Tensor>) -> Result<Tensor> {
        // Channels are dimension 1 here too, so the batch path's helpers apply.
        let (x0, x1) = halves(z)?;
        let x0 = x0.contiguous()?;
        let h = self.pre.forward_time_major(&x0, Epilogue::None)?;
        let h = self.enc.forward_time_major(&h, g)?;
        let m = self.post.forward_time_major(&h, Epilogue::None)?;
        Tensor::cat(&[&x0, &(x1 - m)?], 1)
    }
}

/// `flow`: the coupling layers with a channel flip after each.
#[derive(Debug, Clone)]
pub(crate) struct Flow {
    /// In the order they run in reverse (last stored first).
    layers: Vec<Coupling>,
}

impl Flow {
    pub(crate) fn load(
        w: &Weights,
        channels: usize,
        speaker_channels: Option<usize>,
    ) -> std::result::Result<Self, PiperError> {
        let half = channels / 2;
        let mut layers = Vec::new();
        // Couplings at even indices, flips at odd ones.
        let mut i = 0;
        while w.contains(&format!("flow.flows.{i}.pre.weight")) {
            let module = format!("flow.flows.{i}");
            let pre = time_major(Conv::load(w, &format!("{module}.pre"), half, None)?)?;
            let hidden = pre.out_channels();
            layers.push(Coupling {
                enc: WaveNet::load(w, &format!("{module}.enc"), hidden, speaker_channels)?,
                post: time_major(Conv::load(
                    w,
                    &format!("{module}.post"),
                    hidden,
                    Some(half),
                )?)?,
                pre,
            });
            i += 2;
        }
        if layers.is_empty() {
            return Err(LoadError::MissingTensor {
                tensor: "flow.flows.0.pre.weight".into(),
            }
            .into());
        }
        layers.reverse();
        Ok(Self { layers })
    }

    /// The flow in reverse over a batch `z` (`[batch, channels, frames]`) whose rows hold
    /// `lengths` valid frames (`mask`, `[batch, 1, frames]`); `g` is `[batch, speaker, 1]`.
    ///
    /// On the CPU each utterance runs alone, time-major and cut to its own length: every
    /// convolution is then one matrix product over frames (see `time_major`), faster at
    /// these sizes than Candle's channel-major convolution, and a short utterance in a
    /// batch no longer pays for the longest one's frames. On a GPU the batch runs as one.
    pub(crate) fn reverse(
        &self,
        z: &Tensor,
        mask: &Tensor,
        lengths: &[usize],
        g: Option<&Tensor>,
    ) -> Result<Tensor> {
        if z.device().is_cpu() {
            self.reverse_each(z, lengths, g)
        } else {
            self.reverse_batch(z, mask, g)
        }
    }

    fn reverse_batch(&self, z: &Tensor, mask: &Tensor, g: Option<&Tensor>) -> Result<Tensor> {
        let mut z = z.clone();
        for layer in &self.layers {
            z = layer.reverse(&flip_channels(&z)?, mask, g)?;
        }
        Ok(z)
    }

    /// Each utterance alone, time-major; frames past an utterance's length come back 0.
    fn reverse_each(&self, z: &Tensor, lengths: &[usize], g: Option<&Tensor>) -> Result<Tensor> {
        let frames = z.dim(2)?;
        let rows = lengths
            .iter()
            .enumerate()
            .map(|(row, &len)| {
                let g = g.map(|g| g.i(row..row + 1)).transpose()?;
                // [channels, len] -> [len, channels]
                let mut x = z.i(row)?.narrow(1, 0, len)?.t()?.contiguous()?;
                for layer in &self.layers {
                    x = layer.reverse_time_major(&flip_channels(&x)?, g.as_ref())?;
                }
                x.t()?.pad_with_zeros(1, 0, frames - len)
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::stack(&rows, 0)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{DType, Device, Tensor};

    use super::Flow;
    use crate::tts::candle::fused::testing::{relative_difference, tensor};
    use crate::tts::candle::onnx::ConvAttrs;
    use crate::tts::candle::piper::layers::length_mask;
    use crate::tts::candle::piper::onnx::Weights;

    /// A flow of random weights: two couplings over 4 channels, WaveNets of three layers
    /// with 6 hidden channels, conditioned on a 3-channel speaker embedding.
    fn flow() -> Flow {
        let mut tensors = HashMap::new();
        let mut convs = HashMap::new();
        let mut seed = 0;
        let mut conv = |module: String, shape: [usize; 3], padding: usize| {
            seed += 2;
            tensors.insert(format!("{module}.weight"), tensor(&shape, seed, 0.4));
            tensors.insert(format!("{module}.bias"), tensor(&shape[..1], seed + 1, 0.2));
            let attrs = ConvAttrs {
                padding,
                stride: 1,
                dilation: 1,
                groups: 1,
            };
            convs.insert(module, attrs);
        };
        for i in [0, 2] {
            let m = format!("flow.flows.{i}");
            conv(format!("{m}.pre"), [6, 2, 1], 0);
            for l in 0..3 {
                conv(format!("{m}.enc.in_layers.{l}"), [12, 6, 5], 2);
                let out = if l < 2 { 12 } else { 6 };
                conv(format!("{m}.enc.res_skip_layers.{l}"), [out, 6, 1], 0);
            }
            conv(format!("{m}.enc.cond_layer"), [36, 3, 1], 0);
            conv(format!("{m}.post"), [2, 6, 1], 0);
        }
        Flow::load(&Weights::for_tests(tensors, convs), 4, Some(3)).unwrap()
    }

    /// The CPU's path (each utterance alone, time-major, cut to its length) is the batched
    /// channel-major path GPUs take, up to float rounding, for the frames that count.
    /// The fused gated activation is Candle's add, `tanh`, `sigmoid` and product on the two
    /// halves, bit for bit, with a speaker's shift and without.
    #[test]
    fn the_gated_activation_is_the_candle_ops_bit_for_bit() {
        use crate::tts::candle::fused::testing::same;
        let x = tensor(&[301, 12], 21, 4.0);
        let shift = tensor(&[1, 12], 22, 1.0);
        for g in [None, Some(&shift)] {
            let x_in = match g {
                Some(g) => x.broadcast_add(g).unwrap(),
                None => x.clone(),
            };
            let chain = (x_in.narrow(1, 0, 6).unwrap().tanh().unwrap()
                * candle_nn::ops::sigmoid(&x_in.narrow(1, 6, 6).unwrap()).unwrap())
            .unwrap();
            same(&crate::tts::candle::fused::gated(&x, g).unwrap(), &chain);
        }
    }

    #[test]
    fn each_utterance_time_major_is_the_batch_channel_major() {
        let flow = flow();
        let lengths = [11, 6];
        let mask = length_mask(&lengths, 11, DType::F32, &Device::Cpu).unwrap();
        let z = tensor(&[2, 4, 11], 99, 1.0).broadcast_mul(&mask).unwrap();
        let g = tensor(&[2, 3, 1], 98, 1.0);
        let batch = flow
            .reverse_batch(&z, &mask, Some(&g))
            .unwrap()
            .broadcast_mul(&mask)
            .unwrap();
        let each = flow.reverse_each(&z, &lengths, Some(&g)).unwrap();
        let d = relative_difference(&each, &batch);
        assert!(d < 1e-5, "{d}");
        // The flow did something, and the rows differ (each took its own speaker).
        assert!(relative_difference(&each, &z) > 0.1);
        let rows: Vec<Tensor> = (0..2)
            .map(|r| each.get(r).unwrap().narrow(1, 0, 6).unwrap())
            .collect();
        assert!(relative_difference(&rows[0], &rows[1]) > 0.1);
    }
}
