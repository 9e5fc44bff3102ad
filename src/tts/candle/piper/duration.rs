//! The stochastic duration predictor, run in reverse: noise through inverted flows
//! (conditioned on the text encoding) becomes each phoneme's log-duration.

use crate::tts::candle::error::LoadError;
use candle_core::{Result, Tensor};

use super::error::PiperError;
use super::layers::{ChannelNorm, Conv, flip_channels, halves};
use super::onnx::Weights;
use super::spline::inverse_rq_spline;

/// VITS fixes the spline's interval.
const TAIL_BOUND: f64 = 5.0;

/// Dilated depth-separable convolutions (`DDSConv`).
#[derive(Debug, Clone)]
struct DdsConv {
    layers: Vec<(Conv, ChannelNorm, Conv, ChannelNorm)>,
}

impl DdsConv {
    fn load(w: &Weights, module: &str, channels: usize) -> std::result::Result<Self, PiperError> {
        let mut layers = Vec::new();
        while w.contains(&format!("{module}.convs_sep.{}.weight", layers.len())) {
            let i = layers.len();
            layers.push((
                Conv::load(
                    w,
                    &format!("{module}.convs_sep.{i}"),
                    channels,
                    Some(channels),
                )?,
                ChannelNorm::load(w, &format!("{module}.norms_1.{i}"), channels)?,
                Conv::load(
                    w,
                    &format!("{module}.convs_1x1.{i}"),
                    channels,
                    Some(channels),
                )?,
                ChannelNorm::load(w, &format!("{module}.norms_2.{i}"), channels)?,
            ));
        }
        if layers.is_empty() {
            return Err(LoadError::MissingTensor {
                tensor: format!("{module}.convs_sep.0.weight"),
            }
            .into());
        }
        Ok(Self { layers })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor, g: Option<&Tensor>) -> Result<Tensor> {
        let mut x = match g {
            Some(g) => (x + g)?,
            None => x.clone(),
        };
        for (sep, norm_1, conv_1x1, norm_2) in &self.layers {
            let y = sep.forward(&x.broadcast_mul(mask)?)?;
            let y = norm_1.forward(&y)?.gelu_erf()?;
            let y = conv_1x1.forward(&y)?;
            let y = norm_2.forward(&y)?.gelu_erf()?;
            x = (x + y)?;
        }
        x.broadcast_mul(mask)
    }
}

/// A coupling flow whose transform is a rational-quadratic spline (`ConvFlow`).
#[derive(Debug, Clone)]
struct ConvFlow {
    pre: Conv,
    convs: DdsConv,
    proj: Conv,
    filter: usize,
    bins: usize,
}

impl ConvFlow {
    fn load(w: &Weights, module: &str, filter: usize) -> std::result::Result<Self, PiperError> {
        let pre = Conv::load(w, &format!("{module}.pre"), 1, Some(filter))?;
        let convs = DdsConv::load(w, &format!("{module}.convs"), filter)?;
        let proj = Conv::load(w, &format!("{module}.proj"), filter, None)?;
        let out = proj.out_channels();
        if out % 3 != 2 {
            return Err(LoadError::ShapeMismatch {
                tensor: format!("{module}.proj.weight"),
                expected: vec![29, filter, 1],
                found: vec![out, filter, 1],
            }
            .into());
        }
        Ok(Self {
            pre,
            convs,
            proj,
            filter,
            bins: (out + 1) / 3,
        })
    }

    fn reverse(&self, z: &Tensor, mask: &Tensor, cond: &Tensor) -> Result<Tensor> {
        let (x0, x1) = halves(z)?;
        let (b, _, t) = x0.dims3()?;
        let h = self.pre.forward(&x0)?;
        let h = self.convs.forward(&h, mask, Some(cond))?;
        let h = self.proj.forward(&h)?.broadcast_mul(mask)?;
        // [b, 3k - 1, t] -> [b * t, 3k - 1]: one set of spline parameters per position.
        let h = h
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b * t, 3 * self.bins - 1))?;
        let scale = (self.filter as f64).sqrt();
        let widths = (h.narrow(1, 0, self.bins)? / scale)?;
        let heights = (h.narrow(1, self.bins, self.bins)? / scale)?;
        let derivatives = h.narrow(1, 2 * self.bins, self.bins - 1)?;
        let x1 = inverse_rq_spline(
            &x1.reshape(b * t)?,
            &widths,
            &heights,
            &derivatives,
            TAIL_BOUND,
        )?
        .reshape((b, 1, t))?;
        Tensor::cat(&[&x0, &x1], 1)?.broadcast_mul(mask)
    }
}

/// `dp`: the stochastic duration predictor.
#[derive(Debug, Clone)]
pub(crate) struct DurationPredictor {
    pre: Conv,
    cond: Option<Conv>,
    convs: DdsConv,
    proj: Conv,
    /// The inverted flows, in the order they run (VITS drops the first `ConvFlow`, unused in
    /// reverse).
    flows: Vec<ConvFlow>,
    /// The affine flow's `m` (`[1, 2, 1]`) and `exp(-logs)`.
    affine_m: Tensor,
    affine_scale: Tensor,
}

impl DurationPredictor {
    pub(crate) fn load(
        w: &Weights,
        hidden: usize,
        speaker_channels: Option<usize>,
    ) -> std::result::Result<Self, PiperError> {
        let pre = Conv::load(w, "dp.pre", hidden, None)?;
        let filter = pre.out_channels();
        let cond = match speaker_channels {
            Some(g) => Some(Conv::load(w, "dp.cond", g, Some(filter))?),
            None => None,
        };
        let convs = DdsConv::load(w, "dp.convs", filter)?;
        let proj = Conv::load(w, "dp.proj", filter, Some(filter))?;
        // Flows are stored at odd indices (1, 3, 5, ...) with flips between them.
        let mut last = 1;
        while w.contains(&format!("dp.flows.{}.pre.weight", last + 2)) {
            last += 2;
        }
        let mut flows = Vec::new();
        for i in (3..=last).rev().step_by(2) {
            flows.push(ConvFlow::load(w, &format!("dp.flows.{i}"), filter)?);
        }
        if flows.is_empty() {
            return Err(LoadError::MissingTensor {
                tensor: "dp.flows.3.pre.weight".into(),
            }
            .into());
        }
        let affine_m = w.shaped("dp.flows.0.m", &[2, 1])?.reshape((1, 2, 1))?;
        let affine_scale = if w.contains("dp.flows.0.logs") {
            w.shaped("dp.flows.0.logs", &[2, 1])?.neg()?.exp()?
        } else {
            w.shaped("dp.flows.0.exp_neg_logs", &[2, 1])?
        }
        .reshape((1, 2, 1))?;
        Ok(Self {
            pre,
            cond,
            convs,
            proj,
            flows,
            affine_m,
            affine_scale,
        })
    }

    /// Log-durations `[b, 1, t]` from the encoder's hidden states and `noise` (`[b, 2, t]`,
    /// already scaled by `noise_w`).
    pub(crate) fn reverse(
        &self,
        x: &Tensor,
        mask: &Tensor,
        g: Option<&Tensor>,
        noise: &Tensor,
    ) -> Result<Tensor> {
        let mut x = self.pre.forward(x)?;
        if let (Some(cond), Some(g)) = (&self.cond, g) {
            x = x.broadcast_add(&cond.forward(g)?)?;
        }
        let x = self.convs.forward(&x, mask, None)?;
        let x = self.proj.forward(&x)?.broadcast_mul(mask)?;
        let mut z = noise.clone();
        for flow in &self.flows {
            z = flow.reverse(&flip_channels(&z)?, mask, &x)?;
        }
        z = flip_channels(&z)?;
        z = z
            .broadcast_sub(&self.affine_m)?
            .broadcast_mul(&self.affine_scale)?
            .broadcast_mul(mask)?;
        z.narrow(1, 0, 1)
    }
}
