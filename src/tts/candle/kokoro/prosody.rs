//! The prosody predictor's pitch and energy half: from the duration encoder's features spread
//! over each phoneme's frames, the F0 (pitch, Hz) and energy curves at twice the frame rate.
//!
//! A shared bidirectional LSTM feeds two stacks of three AdaIN residual blocks (instance norm
//! whose scale and shift come from the prosody style; the middle block doubles the length
//! with a depthwise transposed convolution, its shortcut by repeating samples), each ending in
//! a 1×1 convolution to one channel. Instance norm spans a whole utterance, so a batch runs
//! item by item here.

use candle_core::{D, Result, Tensor};

use super::error::KokoroError;
use super::layers::{Conv, Linear, leaky_relu};
use super::lstm::BiLstm;
use super::predictor::STYLE;
use super::weights::Weights;
use crate::tts::candle::fused;

const SLOPE: f64 = 0.2;
const EPS: f64 = 1e-5;

/// Instance norm over time whose per-channel scale (`1 + gamma`) and shift come from the
/// style through a linear layer.
#[derive(Debug, Clone)]
pub(crate) struct AdaIn {
    fc: Linear,
    channels: usize,
}

impl AdaIn {
    /// `{prefix}.fc.weight` / `.bias`.
    pub(crate) fn load(
        weights: &Weights,
        prefix: &str,
        channels: usize,
        quantised: bool,
    ) -> std::result::Result<Self, KokoroError> {
        Ok(Self {
            fc: Linear::load(
                weights,
                &format!("{prefix}.fc"),
                STYLE,
                2 * channels,
                quantised,
            )?,
            channels,
        })
    }

    /// `x` (`[1, channels, frames]`), the style already rounded when quantised.
    pub(crate) fn forward(&self, x: &Tensor, style_rounded: &Tensor) -> Result<Tensor> {
        let h = self.fc.forward_rounded(style_rounded)?.unsqueeze(2)?;
        let gamma = h.narrow(1, 0, self.channels)?;
        let beta = h.narrow(1, self.channels, self.channels)?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let centred = x.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred.broadcast_div(&(var + EPS)?.sqrt()?)?;
        normed.broadcast_mul(&(gamma + 1.0)?)?.broadcast_add(&beta)
    }

    /// [`forward`](Self::forward) on one utterance's time-major signal (`[frames, channels]`),
    /// then the snake activation `y + sin²(αy) / α` when `snake` gives its α (`[1, channels]`).
    /// On the CPU it also gives the output's least and greatest value, which the next
    /// quantised layer rounds by (see [`Conv::forward_time_major_in`]).
    ///
    /// [`Conv::forward_time_major_in`]: super::layers::Conv::forward_time_major_in
    pub(crate) fn forward_time_major(
        &self,
        x: &Tensor,
        style_rounded: &Tensor,
        snake: Option<&Tensor>,
    ) -> Result<(Tensor, Option<(f32, f32)>)> {
        let h = self.fc.forward_rounded(style_rounded)?;
        let gamma = h.narrow(1, 0, self.channels)?;
        let beta = h.narrow(1, self.channels, self.channels)?;
        instance_norm_time_major(x, &gamma, &beta, snake)
    }
}

/// Instance norm over time of `x` (`[frames, channels]`) scaled by `1 + gamma` and shifted
/// by `beta` (`[1, channels]` each), then the snake activation when `snake` gives its α;
/// on the CPU, with the result's least and greatest value.
pub(crate) fn instance_norm_time_major(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    snake: Option<&Tensor>,
) -> Result<(Tensor, Option<(f32, f32)>)> {
    if fused::applies(x) {
        // `(x − mean) / sqrt(var + ε) · (1 + γ) + β` as one scale and shift per channel.
        let (mean, var) = fused::moments(x)?;
        let gain = (gamma + 1.0)?.flatten_all()?.to_vec1::<f32>()?;
        let beta = beta.flatten_all()?.to_vec1::<f32>()?;
        let channels = mean.len();
        if gain.len() != channels || beta.len() != channels {
            candle_core::bail!("an AdaIN of {} scales for {channels} channels", gain.len())
        }
        let scale: Vec<f32> = (0..channels)
            .map(|c| gain[c] / (var[c] + EPS as f32).sqrt())
            .collect();
        let shift: Vec<f32> = (0..channels)
            .map(|c| beta[c] - mean[c] * scale[c])
            .collect();
        let (y, lo, hi) = fused::affine_snake(x, &scale, &shift, snake)?;
        return Ok((y, Some((lo, hi))));
    }
    // Means over time as a row of ones times the signal: candle reduces a leading
    // dimension one element at a time, a matrix product runs vectorised on all threads.
    let frames = x.dim(0)?;
    let ones = Tensor::ones((1, frames), x.dtype(), x.device())?;
    let mean = (ones.matmul(x)? / frames as f64)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = (ones.matmul(&centred.sqr()?)? / frames as f64)?;
    let normed = centred.broadcast_div(&(var + EPS)?.sqrt()?)?;
    let y = normed.broadcast_mul(&(gamma + 1.0)?)?.broadcast_add(beta)?;
    let y = match snake {
        Some(alpha) => {
            let s = y.broadcast_mul(alpha)?.sin()?.sqr()?;
            (y + s.broadcast_div(alpha)?)?
        }
        None => y,
    };
    Ok((y, None))
}

/// StyleTTS 2's `AdainResBlk1d`.
#[derive(Debug, Clone)]
pub(crate) struct AdainResBlock {
    norm1: AdaIn,
    norm2: AdaIn,
    conv1: Conv,
    conv2: Conv,
    shortcut: Option<Conv>,
    /// The depthwise transposed convolution that doubles the length (`pool`).
    pool: Option<(Tensor, Tensor)>,
}

impl AdainResBlock {
    /// `module` names the convolution nodes (`encoder.F0.1`), `params` the named parameters
    /// (`encoder.predictor.F0.1`): the exporter scoped them differently.
    pub(crate) fn load(
        weights: &Weights,
        module: &str,
        params: &str,
        dims: (usize, usize),
        upsample: bool,
        quantised: bool,
    ) -> std::result::Result<Self, KokoroError> {
        let (dim_in, dim_out) = dims;
        let pool = if upsample {
            Some((
                weights.shaped(&format!("{module}.pool.weight"), &[dim_in, 1, 3])?,
                weights.shaped(&format!("{module}.pool.bias"), &[dim_in])?,
            ))
        } else {
            None
        };
        let shortcut = if dim_in == dim_out {
            None
        } else {
            Some(Conv::load(
                weights,
                &format!("{module}.conv1x1"),
                "",
                quantised,
            )?)
        };
        Ok(Self {
            norm1: AdaIn::load(weights, &format!("{params}.norm1"), dim_in, quantised)?,
            norm2: AdaIn::load(weights, &format!("{params}.norm2"), dim_out, quantised)?,
            conv1: Conv::load(
                weights,
                &format!("{module}.conv1"),
                &format!("{params}.conv1.bias"),
                quantised,
            )?,
            conv2: Conv::load(
                weights,
                &format!("{module}.conv2"),
                &format!("{params}.conv2.bias"),
                quantised,
            )?,
            shortcut,
            pool,
        })
    }

    /// `x` (`[1, dim_in, frames]`) → `[1, dim_out, frames]` (twice the frames when upsampling).
    pub(crate) fn forward(&self, x: &Tensor, style_rounded: &Tensor) -> Result<Tensor> {
        let mut shortcut = match self.pool {
            Some(_) => {
                let frames = x.dim(2)?;
                x.upsample_nearest1d(2 * frames)?
            }
            None => x.clone(),
        };
        if let Some(conv) = &self.shortcut {
            shortcut = conv.forward(&shortcut, None)?;
        }
        let mut r = leaky_relu(&self.norm1.forward(x, style_rounded)?, SLOPE)?;
        if let Some((weight, bias)) = &self.pool {
            r = depthwise_upsample(&r, weight, bias)?;
        }
        let r = self.conv1.forward(&r, None)?;
        let r = leaky_relu(&self.norm2.forward(&r, style_rounded)?, SLOPE)?;
        let r = self.conv2.forward(&r, None)?;
        (r + shortcut)? / std::f64::consts::SQRT_2
    }
}

/// The `pool` of an upsampling block: a depthwise transposed convolution (kernel 3, stride
/// 2, padding 1, output padding 1) written out, since Candle would run it as one convolution
/// per channel: output `2t` is `w₁·x[t]`, output `2t + 1` is `w₂·x[t] + w₀·x[t + 1]`.
fn depthwise_upsample(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (batch, channels, frames) = x.dims3()?;
    let tap = |k: usize| weight.narrow(2, k, 1)?.reshape((1, channels, 1));
    let next = Tensor::cat(
        &[
            x.narrow(2, 1, frames - 1)?,
            x.narrow(2, 0, 1)?.zeros_like()?,
        ],
        2,
    )?;
    let even = x.broadcast_mul(&tap(1)?)?;
    let odd = (x.broadcast_mul(&tap(2)?)? + next.broadcast_mul(&tap(0)?)?)?;
    Tensor::stack(&[even, odd], 3)?
        .reshape((batch, channels, 2 * frames))?
        .broadcast_add(&bias.reshape((1, (), 1))?)
}

/// Pitch and energy (`encoder.predictor.shared`, `F0`, `N`, `F0_proj`, `N_proj`).
#[derive(Debug, Clone)]
pub(crate) struct PitchEnergy {
    shared: BiLstm,
    f0: Vec<AdainResBlock>,
    n: Vec<AdainResBlock>,
    f0_proj: Conv,
    n_proj: Conv,
    quantised: bool,
}

impl PitchEnergy {
    pub(crate) fn load(
        weights: &Weights,
        quantised: bool,
    ) -> std::result::Result<Self, KokoroError> {
        let stack = |kind: &str| -> std::result::Result<Vec<AdainResBlock>, KokoroError> {
            [((512, 512), false), ((512, 256), true), ((256, 256), false)]
                .iter()
                .enumerate()
                .map(|(i, &(dims, up))| {
                    AdainResBlock::load(
                        weights,
                        &format!("encoder.{kind}.{i}"),
                        &format!("encoder.predictor.{kind}.{i}"),
                        dims,
                        up,
                        quantised,
                    )
                })
                .collect()
        };
        Ok(Self {
            shared: BiLstm::load(weights, "encoder.shared", 640, 256, quantised)?,
            f0: stack("F0")?,
            n: stack("N")?,
            f0_proj: Conv::load(
                weights,
                "encoder.F0_proj",
                "encoder.predictor.F0_proj.bias",
                quantised,
            )?,
            n_proj: Conv::load(
                weights,
                "encoder.N_proj",
                "encoder.predictor.N_proj.bias",
                quantised,
            )?,
            quantised,
        })
    }

    /// `aligned` (`[1, frames, 640]`: the duration encoder's features, each phoneme's row
    /// repeated for its frames) and the prosody style (`[1, 128]`): F0 and energy, each
    /// `[1, 2 × frames]`.
    pub(crate) fn forward(&self, aligned: &Tensor, style: &Tensor) -> Result<(Tensor, Tensor)> {
        let frames = aligned.dim(1)?;
        let style_rounded = if self.quantised {
            super::layers::fake_quant(style, None)?
        } else {
            style.clone()
        };
        let x = self
            .shared
            .forward(aligned, &[frames])?
            .transpose(1, 2)?
            .contiguous()?;
        let run = |blocks: &[AdainResBlock], proj: &Conv| -> Result<Tensor> {
            let mut y = x.clone();
            for block in blocks {
                y = block.forward(&y, &style_rounded)?;
            }
            proj.forward(&y, None)?.squeeze(1)
        };
        Ok((run(&self.f0, &self.f0_proj)?, run(&self.n, &self.n_proj)?))
    }
}

#[cfg(test)]
mod tests {
    use super::instance_norm_time_major;
    use crate::tts::candle::fused::chain_only;
    use crate::tts::candle::fused::testing::{relative_difference, same, tensor};

    /// The statistics are summed block by block in a fixed order, whatever the pool's
    /// threads do, so an utterance gives the same floats every run (and batched or alone).
    #[test]
    fn adain_gives_the_same_floats_every_run() {
        let x = tensor(&[20_000, 64], 8, 2.0);
        let gamma = tensor(&[1, 64], 5, 0.5);
        let beta = tensor(&[1, 64], 6, 0.5);
        let first = instance_norm_time_major(&x, &gamma, &beta, None).unwrap().0;
        for _ in 0..20 {
            same(
                &instance_norm_time_major(&x, &gamma, &beta, None).unwrap().0,
                &first,
            );
        }
    }

    /// The CPU folds the norm into one scale and shift per channel and takes the sine by a
    /// polynomial (see `vector`), so it differs from the Candle ops in the last bits.
    #[test]
    fn adain_and_snake_are_the_candle_ops_within_rounding() {
        let x = tensor(&[1000, 64], 4, 2.0);
        let gamma = tensor(&[1, 64], 5, 0.5);
        let beta = tensor(&[1, 64], 6, 0.5);
        let alpha = (tensor(&[1, 64], 7, 0.9).abs().unwrap() + 0.1).unwrap();
        for snake in [None, Some(&alpha)] {
            let d = relative_difference(
                &instance_norm_time_major(&x, &gamma, &beta, snake)
                    .unwrap()
                    .0,
                &chain_only(|| instance_norm_time_major(&x, &gamma, &beta, snake))
                    .unwrap()
                    .0,
            );
            assert!(d < 1e-6, "{d}");
        }
    }
}
