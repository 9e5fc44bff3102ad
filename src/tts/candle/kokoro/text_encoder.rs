//! Kokoro's text encoder: phoneme embedding, three convolution blocks (weight-normalised
//! convolution, channel layer norm, leaky ReLU) and a bidirectional LSTM. Its output, spread
//! over each phoneme's frames, is what the decoder reads as the "what is said" features.

use candle_core::{Result, Tensor};

use super::error::KokoroError;
use super::layers::{Conv, channel_norm, leaky_relu};
use super::lstm::BiLstm;
use super::weights::Weights;

const CHANNELS: usize = 512;
const BLOCKS: usize = 3;
const SLOPE: f64 = 0.2;
const EPS: f64 = 1e-5;

#[derive(Debug, Clone)]
struct Block {
    conv: Conv,
    gamma: Tensor,
    beta: Tensor,
}

/// The text encoder (`encoder.text_encoder` in the export).
#[derive(Debug, Clone)]
pub(crate) struct TextEncoder {
    embedding: Tensor,
    blocks: Vec<Block>,
    lstm: BiLstm,
}

impl TextEncoder {
    pub(crate) fn load(
        weights: &Weights,
        quantised: bool,
    ) -> std::result::Result<Self, KokoroError> {
        let p = "encoder.text_encoder";
        let embedding = weights.get(&format!("{p}.embedding.weight"))?;
        let vocab = embedding.dim(0)?;
        let embedding = weights.shaped(&format!("{p}.embedding.weight"), &[vocab, CHANNELS])?;
        let blocks = (0..BLOCKS)
            .map(|i| {
                Ok(Block {
                    // The exporter names the convolution node `cnn.{i}/cnn.{i}.0`.
                    conv: Conv::load(
                        weights,
                        &format!("{p}.cnn.{i}.cnn.{i}.0"),
                        &format!("{p}.cnn.{i}.0.bias"),
                        quantised,
                    )?,
                    gamma: weights.shaped(&format!("{p}.cnn.{i}.1.gamma"), &[CHANNELS])?,
                    beta: weights.shaped(&format!("{p}.cnn.{i}.1.beta"), &[CHANNELS])?,
                })
            })
            .collect::<std::result::Result<Vec<_>, KokoroError>>()?;
        Ok(Self {
            embedding,
            blocks,
            lstm: BiLstm::load(
                weights,
                &format!("{p}.lstm"),
                CHANNELS,
                CHANNELS / 2,
                quantised,
            )?,
        })
    }

    /// `ids` (`[batch, len]`), `valid` (`[batch, len]`, 1 real, 0 padding) and the lengths:
    /// `[batch, 512, len]`, zero at padding.
    pub(crate) fn forward(
        &self,
        ids: &Tensor,
        valid: &Tensor,
        lengths: &[usize],
    ) -> Result<Tensor> {
        let (batch, len) = ids.dims2()?;
        let mask = valid.unsqueeze(1)?;
        let mut x = self
            .embedding
            .embedding(&ids.flatten_all()?)?
            .reshape((batch, len, CHANNELS))?
            .transpose(1, 2)?
            .contiguous()?
            .broadcast_mul(&mask)?;
        for block in &self.blocks {
            let y = block.conv.forward(&x, Some(&mask))?;
            let y = channel_norm(&y, &block.gamma, &block.beta, EPS)?;
            x = leaky_relu(&y, SLOPE)?.broadcast_mul(&mask)?;
        }
        let out = self
            .lstm
            .forward(&x.transpose(1, 2)?.contiguous()?, lengths)?;
        out.transpose(1, 2)?.contiguous()?.broadcast_mul(&mask)
    }
}
