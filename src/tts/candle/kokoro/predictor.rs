//! The prosody predictor's duration half: from PL-BERT's projected output and the voice's
//! prosody style (the second 128 values of its style row), how many frames each phoneme lasts.
//!
//! The duration encoder runs three bidirectional LSTMs, each followed by an AdaLayerNorm
//! (layer norm whose scale and shift come from the style), with the style appended to every
//! position before each LSTM; one more LSTM and a linear layer give 50 logits per phoneme,
//! whose sigmoids summed (divided by the speed) are the duration in frames.

use candle_core::{D, Result, Tensor};

use super::albert::D_MODEL;
use super::error::KokoroError;
use super::layers::{Linear, fake_quant};
use super::lstm::BiLstm;
use super::weights::Weights;

/// The style's width (each half of a voice row).
pub(crate) const STYLE: usize = 128;
const LAYERS: usize = 3;
const MAX_DUR: usize = 50;
const EPS: f64 = 1e-5;

/// A layer norm without weights whose scale and shift come from the style.
#[derive(Debug, Clone)]
pub(crate) struct AdaLayerNorm {
    fc: Linear,
    channels: usize,
}

impl AdaLayerNorm {
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

    /// `x` (`[batch, len, channels]`) normalised over channels, scaled by `1 + gamma` and
    /// shifted by `beta` from the style (`[batch, 128]`, already rounded when quantised).
    pub(crate) fn forward(&self, x: &Tensor, style_rounded: &Tensor) -> Result<Tensor> {
        let h = self.fc.forward_rounded(style_rounded)?.unsqueeze(1)?;
        let gamma = h.narrow(D::Minus1, 0, self.channels)?;
        let beta = h.narrow(D::Minus1, self.channels, self.channels)?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let centred = x.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred.broadcast_div(&(var + EPS)?.sqrt()?)?;
        normed.broadcast_mul(&(gamma + 1.0)?)?.broadcast_add(&beta)
    }
}

/// Durations from PL-BERT's features (`encoder.predictor` minus pitch and energy).
#[derive(Debug, Clone)]
pub(crate) struct DurationPredictor {
    blocks: Vec<(BiLstm, AdaLayerNorm)>,
    lstm: BiLstm,
    proj: Linear,
    quantised: bool,
}

/// What the duration half computes: the features the pitch and energy half and the
/// alignment need, and the durations.
#[derive(Debug, Clone)]
pub(crate) struct Durations {
    /// `[batch, len, 640]`: the duration encoder's output with the style appended.
    pub(crate) features: Tensor,
    /// `[batch, len]` in frames, before rounding, speed applied.
    pub(crate) frames: Tensor,
}

impl DurationPredictor {
    pub(crate) fn load(
        weights: &Weights,
        quantised: bool,
    ) -> std::result::Result<Self, KokoroError> {
        let p = "encoder.predictor";
        let width = D_MODEL + STYLE;
        let blocks = (0..LAYERS)
            .map(|i| {
                Ok((
                    BiLstm::load(
                        weights,
                        &format!("{p}.text_encoder.lstms.{}", 2 * i),
                        width,
                        D_MODEL / 2,
                        quantised,
                    )?,
                    AdaLayerNorm::load(
                        weights,
                        &format!("{p}.text_encoder.lstms.{}", 2 * i + 1),
                        D_MODEL,
                        quantised,
                    )?,
                ))
            })
            .collect::<std::result::Result<Vec<_>, KokoroError>>()?;
        Ok(Self {
            blocks,
            lstm: BiLstm::load(weights, &format!("{p}.lstm"), width, D_MODEL / 2, quantised)?,
            proj: Linear::load(
                weights,
                &format!("{p}.duration_proj.linear_layer"),
                D_MODEL,
                MAX_DUR,
                quantised,
            )?,
            quantised,
        })
    }

    /// `d_en` (`[batch, len, 512]`), the prosody style (`[batch, 128]`), `valid`
    /// (`[batch, len]`), the lengths and each item's speed (`[batch]`).
    pub(crate) fn forward(
        &self,
        d_en: &Tensor,
        style: &Tensor,
        valid: &Tensor,
        lengths: &[usize],
        speed: &Tensor,
    ) -> Result<Durations> {
        let (batch, len, _) = d_en.dims3()?;
        let mask = valid.unsqueeze(2)?;
        let styles = style
            .unsqueeze(1)?
            .broadcast_as((batch, len, STYLE))?
            .contiguous()?;
        let with_style = |x: &Tensor| -> Result<Tensor> {
            Tensor::cat(&[x, &styles], D::Minus1)?.broadcast_mul(&mask)
        };
        let style_rounded = if self.quantised {
            fake_quant(style, None)?
        } else {
            style.clone()
        };
        let mut x = with_style(d_en)?;
        for (lstm, norm) in &self.blocks {
            let y = lstm.forward(&x, lengths)?;
            x = with_style(&norm.forward(&y, &style_rounded)?)?;
        }
        let h = self.lstm.forward(&x, lengths)?;
        let logits = self.proj.forward(&h, Some(&mask))?;
        let frames = candle_nn::ops::sigmoid(&logits)?
            .sum(D::Minus1)?
            .broadcast_div(&speed.unsqueeze(1)?)?;
        Ok(Durations {
            features: x,
            frames,
        })
    }
}
