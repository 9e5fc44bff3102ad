//! The HiFi-GAN generator: upsamples the latent frames to samples with transposed
//! convolutions, each followed by a bank of residual blocks of different kernels.

use crate::tts::candle::error::LoadError;
use candle_core::{Result, Tensor};

use super::error::PiperError;
use super::layers::Conv;
use super::onnx::Weights;
use crate::tts::candle::fused::Epilogue;

/// HiFi-GAN's slope inside the network (the last activation uses PyTorch's default, 0.01).
const LRELU_SLOPE: f64 = 0.1;

/// A residual block: `ResBlock1` (pairs of convolutions) or `ResBlock2` (single ones); the
/// kernel and dilations come from the graph.
#[derive(Debug, Clone)]
enum ResBlock {
    One(Vec<(Conv, Conv)>),
    Two(Vec<Conv>),
}

impl ResBlock {
    fn load(w: &Weights, module: &str, channels: usize) -> std::result::Result<Self, PiperError> {
        let conv = |name: String| Conv::load(w, &name, channels, Some(channels))?.with_taps();
        if w.contains(&format!("{module}.convs1.0.weight")) {
            let mut pairs = Vec::new();
            while w.contains(&format!("{module}.convs1.{}.weight", pairs.len())) {
                let i = pairs.len();
                pairs.push((
                    conv(format!("{module}.convs1.{i}"))?,
                    conv(format!("{module}.convs2.{i}"))?,
                ));
            }
            return Ok(Self::One(pairs));
        }
        let mut convs = Vec::new();
        while w.contains(&format!("{module}.convs.{}.weight", convs.len())) {
            convs.push(conv(format!("{module}.convs.{}", convs.len()))?);
        }
        if convs.is_empty() {
            return Err(LoadError::MissingTensor {
                tensor: format!("{module}.convs.0.weight"),
            }
            .into());
        }
        Ok(Self::Two(convs))
    }

    /// On a time-major `[time, channels]` signal.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        match self {
            Self::One(pairs) => {
                for (c1, c2) in pairs {
                    let y = c1.forward_time_major_activated(
                        &x,
                        Some(LRELU_SLOPE),
                        Epilogue::LeakyRelu(LRELU_SLOPE),
                    )?;
                    x = c2.forward_time_major(&y, Epilogue::Residual(&x))?;
                }
            }
            Self::Two(convs) => {
                for c in convs {
                    x = c.forward_time_major_activated(
                        &x,
                        Some(LRELU_SLOPE),
                        Epilogue::Residual(&x),
                    )?;
                }
            }
        }
        Ok(x)
    }
}

/// `dec`: latent frames `[b, c, frames]` to audio `[b, 1, frames * hop]`.
#[derive(Debug, Clone)]
pub(crate) struct Decoder {
    conv_pre: Conv,
    cond: Option<Conv>,
    ups: Vec<Conv>,
    /// `ups.len()` groups of blocks (time-major), averaged within a group.
    resblocks: Vec<Vec<ResBlock>>,
    conv_post: Conv,
    hop: usize,
}

impl Decoder {
    pub(crate) fn load(
        w: &Weights,
        channels: usize,
        speaker_channels: Option<usize>,
    ) -> std::result::Result<Self, PiperError> {
        let conv_pre = Conv::load(w, "dec.conv_pre", channels, None)?;
        let mut width = conv_pre.out_channels();
        let cond = match speaker_channels {
            Some(g) => Some(Conv::load(w, "dec.cond", g, Some(width))?),
            None => None,
        };
        let mut ups = Vec::new();
        while w.contains(&format!("dec.ups.{}.weight", ups.len())) {
            let up =
                Conv::load_transposed(w, &format!("dec.ups.{}", ups.len()), width)?.with_taps()?;
            width = up.out_channels();
            ups.push(up);
        }
        let mut count = 0;
        while w.contains(&format!("dec.resblocks.{count}.convs.0.weight"))
            || w.contains(&format!("dec.resblocks.{count}.convs1.0.weight"))
        {
            count += 1;
        }
        if ups.is_empty() || count == 0 || count % ups.len() != 0 {
            return Err(LoadError::MissingTensor {
                tensor: if ups.is_empty() {
                    "dec.ups.0.weight".into()
                } else {
                    format!("dec.resblocks.{count}.convs.0.weight")
                },
            }
            .into());
        }
        let per_up = count / ups.len();
        let mut resblocks = Vec::new();
        for (i, up) in ups.iter().enumerate() {
            let group = (0..per_up)
                .map(|j| {
                    ResBlock::load(
                        w,
                        &format!("dec.resblocks.{}", i * per_up + j),
                        up.out_channels(),
                    )
                })
                .collect::<std::result::Result<Vec<_>, _>>()?;
            resblocks.push(group);
        }
        let conv_post = Conv::load(w, "dec.conv_post", width, Some(1))?.with_taps()?;
        let hop = ups.iter().map(Conv::stride).product();
        Ok(Self {
            conv_pre,
            cond,
            ups,
            resblocks,
            conv_post,
            hop,
        })
    }

    /// Samples per latent frame.
    pub(crate) fn hop(&self) -> usize {
        self.hop
    }

    /// One utterance: `z` is `[1, channels, frames]`; the residual blocks run time-major
    /// (see [`Conv::forward_time_major`]).
    pub(crate) fn forward(&self, z: &Tensor, g: Option<&Tensor>) -> Result<Tensor> {
        let mut x = self.conv_pre.forward(z)?;
        if let (Some(cond), Some(g)) = (&self.cond, g) {
            x = x.broadcast_add(&cond.forward(g)?)?;
        }
        // [1, channels, frames] -> [frames, channels]: time-major from here on.
        let mut x = x.squeeze(0)?.t()?.contiguous()?;
        for (up, group) in self.ups.iter().zip(&self.resblocks) {
            x = up.forward_time_major_activated(&x, Some(LRELU_SLOPE), Epilogue::None)?;
            let mut sum: Option<Tensor> = None;
            for block in group {
                let y = block.forward(&x)?;
                sum = Some(match sum {
                    Some(s) => (s + y)?,
                    None => y,
                });
            }
            if let Some(sum) = sum {
                x = (sum / group.len() as f64)?;
            }
        }
        // [time, 1] -> [1, 1, time]
        self.conv_post
            .forward_time_major_activated(&x, Some(0.01), Epilogue::None)?
            .tanh()?
            .t()?
            .unsqueeze(0)?
            .contiguous()
    }
}
