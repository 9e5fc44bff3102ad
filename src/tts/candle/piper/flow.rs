//! The normalizing flow, run in reverse: residual coupling layers (mean-only) built on
//! WaveNet-style gated convolutions turn the prior sample into the decoder's latent.

use crate::tts::candle::error::LoadError;
use candle_core::{Result, Tensor};

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
            in_layers.push(Conv::load(
                w,
                &format!("{module}.in_layers.{i}"),
                hidden,
                Some(2 * hidden),
            )?);
            res_skip.push(Conv::load(
                w,
                &format!("{module}.res_skip_layers.{i}"),
                hidden,
                None,
            )?);
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

    fn forward(&self, x: &Tensor, mask: &Tensor, g: Option<&Tensor>) -> Result<Tensor> {
        let h = self.hidden;
        let g = match (&self.cond, g) {
            (Some(cond), Some(g)) => Some(cond.forward(g)?),
            _ => None,
        };
        let mut x = x.clone();
        let mut output: Option<Tensor> = None;
        let n = self.in_layers.len();
        for (i, (in_layer, res_skip)) in self.in_layers.iter().zip(&self.res_skip).enumerate() {
            let mut x_in = in_layer.forward(&x)?;
            if let Some(g) = &g {
                x_in = x_in.broadcast_add(&g.narrow(1, i * 2 * h, 2 * h)?)?;
            }
            let acts =
                (x_in.narrow(1, 0, h)?.tanh()? * candle_nn::ops::sigmoid(&x_in.narrow(1, h, h)?)?)?;
            let rs = res_skip.forward(&acts)?;
            let skip = if i + 1 < n {
                x = (x + rs.narrow(1, 0, h)?)?.broadcast_mul(mask)?;
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
            Some(o) => o.broadcast_mul(mask),
            None => Ok(x),
        }
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
            let pre = Conv::load(w, &format!("{module}.pre"), half, None)?;
            let hidden = pre.out_channels();
            layers.push(Coupling {
                enc: WaveNet::load(w, &format!("{module}.enc"), hidden, speaker_channels)?,
                post: Conv::load(w, &format!("{module}.post"), hidden, Some(half))?,
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

    pub(crate) fn reverse(&self, z: &Tensor, mask: &Tensor, g: Option<&Tensor>) -> Result<Tensor> {
        let mut z = z.clone();
        for layer in &self.layers {
            z = layer.reverse(&flip_channels(&z)?, mask, g)?;
        }
        Ok(z)
    }
}
