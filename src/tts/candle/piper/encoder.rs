//! The text encoder: phoneme embeddings through a transformer with windowed relative
//! attention, projected to the prior's means and log-scales.
//!
//! Attention has no absolute positions: each head adds a learned embedding for every offset
//! `j - i` within ±window to its keys and values (and nothing beyond). VITS implements that
//! with pad-and-reshape tricks; here the offsets are gathered directly: a `[T, T]` index
//! picks each score's offset column, and a band mask zeroes offsets outside the window.

use crate::tts::candle::error::LoadError;
use candle_core::{D, Device, Result, Tensor};

use super::error::PiperError;
use super::layers::{ChannelNorm, Conv, softmax_last};
use super::onnx::Weights;

/// Multi-head self-attention with relative position embeddings shared by the heads.
#[derive(Debug, Clone)]
struct Attention {
    q: Conv,
    k: Conv,
    v: Conv,
    o: Conv,
    /// `[2w + 1, head_dim]`.
    rel_k: Tensor,
    rel_v: Tensor,
    heads: usize,
    window: usize,
}

/// The position-wise feed-forward block: two "same"-padded convolutions with a ReLU.
#[derive(Debug, Clone)]
struct FeedForward {
    conv_1: Conv,
    conv_2: Conv,
    kernel: usize,
}

#[derive(Debug, Clone)]
struct Layer {
    attention: Attention,
    norm_1: ChannelNorm,
    ffn: FeedForward,
    norm_2: ChannelNorm,
}

/// `enc_p`: ids to hidden states and prior statistics.
#[derive(Debug, Clone)]
pub(crate) struct TextEncoder {
    embedding: Tensor,
    layers: Vec<Layer>,
    proj: Conv,
    hidden: usize,
}

/// What the encoder gives the rest of the model, all `[batch, channels, T]`.
#[derive(Debug)]
pub(crate) struct Encoded {
    pub(crate) hidden: Tensor,
    pub(crate) m_p: Tensor,
    pub(crate) logs_p: Tensor,
}

impl TextEncoder {
    pub(crate) fn load(w: &Weights) -> std::result::Result<Self, PiperError> {
        let embedding = w.get("enc_p.emb.weight")?;
        let &[_, hidden] = embedding.dims() else {
            return Err(LoadError::ShapeMismatch {
                tensor: "enc_p.emb.weight".into(),
                expected: vec![256, 192],
                found: embedding.dims().to_vec(),
            }
            .into());
        };
        let mut layers = Vec::new();
        while w.contains(&format!(
            "enc_p.encoder.attn_layers.{}.conv_q.weight",
            layers.len()
        )) {
            let i = layers.len();
            let attn = format!("enc_p.encoder.attn_layers.{i}");
            let rel_k = w.get(&format!("{attn}.emb_rel_k"))?;
            let (heads, window, head_dim) = match rel_k.dims() {
                &[1, r, d] if d > 0 && hidden % d == 0 && r % 2 == 1 => (hidden / d, r / 2, d),
                found => {
                    return Err(LoadError::ShapeMismatch {
                        tensor: format!("{attn}.emb_rel_k"),
                        expected: vec![1, 9, hidden / 2],
                        found: found.to_vec(),
                    }
                    .into());
                }
            };
            let rel_v = w.shaped(&format!("{attn}.emb_rel_v"), &[1, 2 * window + 1, head_dim])?;
            let conv = |name: &str| Conv::load(w, &format!("{attn}.{name}"), hidden, Some(hidden));
            let ffn = format!("enc_p.encoder.ffn_layers.{i}");
            let conv_1 = Conv::load(w, &format!("{ffn}.conv_1"), hidden, None)?;
            let filter = conv_1.out_channels();
            let conv_2 = Conv::load(w, &format!("{ffn}.conv_2"), filter, Some(hidden))?;
            let kernel = w.get(&format!("{ffn}.conv_1.weight"))?.dim(2)?;
            layers.push(Layer {
                attention: Attention {
                    q: conv("conv_q")?,
                    k: conv("conv_k")?,
                    v: conv("conv_v")?,
                    o: conv("conv_o")?,
                    rel_k: rel_k.squeeze(0)?,
                    rel_v: rel_v.squeeze(0)?,
                    heads,
                    window,
                },
                norm_1: ChannelNorm::load(w, &format!("enc_p.encoder.norm_layers_1.{i}"), hidden)?,
                ffn: FeedForward {
                    conv_1,
                    conv_2,
                    kernel,
                },
                norm_2: ChannelNorm::load(w, &format!("enc_p.encoder.norm_layers_2.{i}"), hidden)?,
            });
        }
        if layers.is_empty() {
            return Err(LoadError::MissingTensor {
                tensor: "enc_p.encoder.attn_layers.0.conv_q.weight".into(),
            }
            .into());
        }
        let proj = Conv::load(w, "enc_p.proj", hidden, None)?;
        Ok(Self {
            embedding,
            layers,
            proj,
            hidden,
        })
    }

    /// Rows of the embedding: ids must stay below this.
    pub(crate) fn vocab(&self) -> usize {
        self.embedding.dim(0).unwrap_or(0)
    }

    /// `ids`: `[batch, T]` u32, padded with anything; `mask`: `[batch, 1, T]`.
    pub(crate) fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Encoded> {
        let (b, t) = ids.dims2()?;
        let x = self.embedding.index_select(&ids.flatten_all()?, 0)?;
        let x = (x.reshape((b, t, self.hidden))? * (self.hidden as f64).sqrt())?;
        let mut x = x.transpose(1, 2)?.contiguous()?.broadcast_mul(mask)?;
        // [b, 1, T, T]: which query/key pairs are both real phonemes.
        let pair_mask = mask
            .transpose(1, 2)?
            .broadcast_mul(mask)?
            .unsqueeze(1)?
            .ne(0f64)?;
        let offsets = Offsets::new(t, self.layers[0].attention.window, x.device())?;
        for layer in &self.layers {
            let y = layer.attention.forward(&x, &pair_mask, &offsets)?;
            x = layer.norm_1.forward(&(x + y)?)?;
            let y = layer.ffn.forward(&x, mask)?;
            x = layer.norm_2.forward(&(x + y)?)?;
        }
        let hidden = x.broadcast_mul(mask)?;
        let stats = self.proj.forward(&hidden)?.broadcast_mul(mask)?;
        let half = stats.dim(1)? / 2;
        Ok(Encoded {
            m_p: stats.narrow(1, 0, half)?,
            logs_p: stats.narrow(1, half, half)?,
            hidden,
        })
    }
}

/// Index tensors that map between absolute key positions and relative offsets.
struct Offsets {
    /// `[T, T]` u32: the offset column `j - i + w` of each (query i, key j), clamped.
    key_index: Tensor,
    /// `[T, T]`: 1 where `|j - i| <= w`.
    key_band: Tensor,
    /// `[T, 2w + 1]` u32: the key `i + r - w` of each (query i, offset r), clamped.
    value_index: Tensor,
    /// `[T, 2w + 1]`: 1 where that key exists.
    value_band: Tensor,
}

impl Offsets {
    fn new(t: usize, w: usize, device: &Device) -> Result<Self> {
        let r = 2 * w + 1;
        let mut key_index = Vec::with_capacity(t * t);
        let mut key_band = Vec::with_capacity(t * t);
        for i in 0..t {
            for j in 0..t {
                let offset = j as i64 - i as i64 + w as i64;
                key_index.push(offset.clamp(0, r as i64 - 1) as u32);
                key_band.push(f32::from(u8::from((0..r as i64).contains(&offset))));
            }
        }
        let mut value_index = Vec::with_capacity(t * r);
        let mut value_band = Vec::with_capacity(t * r);
        for i in 0..t {
            for k in 0..r {
                let j = i as i64 + k as i64 - w as i64;
                value_index.push(j.clamp(0, t as i64 - 1) as u32);
                value_band.push(f32::from(u8::from((0..t as i64).contains(&j))));
            }
        }
        Ok(Self {
            key_index: Tensor::from_vec(key_index, (t, t), device)?,
            key_band: Tensor::from_vec(key_band, (t, t), device)?,
            value_index: Tensor::from_vec(value_index, (t, r), device)?,
            value_band: Tensor::from_vec(value_band, (t, r), device)?,
        })
    }
}

impl Attention {
    fn forward(&self, x: &Tensor, pair_mask: &Tensor, offsets: &Offsets) -> Result<Tensor> {
        let (b, c, t) = x.dims3()?;
        let (h, d) = (self.heads, c / self.heads);
        let r = 2 * self.window + 1;
        let split = |y: Tensor| -> Result<Tensor> {
            y.reshape((b, h, d, t))?.transpose(2, 3)?.contiguous()
        };
        let q = (split(self.q.forward(x)?)? / (d as f64).sqrt())?;
        let k = split(self.k.forward(x)?)?;
        let v = split(self.v.forward(x)?)?;
        let dtype = q.dtype();

        let mut scores = q.matmul(&k.transpose(2, 3)?)?;
        // Relative keys: [b, h, T, r] logits, moved to their absolute columns.
        let rel = q
            .reshape((b * h * t, d))?
            .matmul(&self.rel_k.t()?)?
            .reshape((b, h, t, r))?;
        let index = offsets.key_index.broadcast_as((b, h, t, t))?.contiguous()?;
        let local = rel
            .gather(&index, D::Minus1)?
            .broadcast_mul(&offsets.key_band.to_dtype(dtype)?)?;
        scores = (scores + local)?;
        let fill = Tensor::new(-1e4f32, x.device())?
            .to_dtype(dtype)?
            .broadcast_as(scores.shape())?;
        let scores = pair_mask
            .broadcast_as(scores.shape())?
            .where_cond(&scores, &fill)?;
        let p = softmax_last(&scores)?;
        let mut out = p.matmul(&v)?;
        // Relative values: the weight each query gives each offset, times its embedding.
        let index = offsets
            .value_index
            .broadcast_as((b, h, t, r))?
            .contiguous()?;
        let weights = p
            .gather(&index, D::Minus1)?
            .broadcast_mul(&offsets.value_band.to_dtype(dtype)?)?;
        let rel_out = weights
            .reshape((b * h * t, r))?
            .matmul(&self.rel_v)?
            .reshape((b, h, t, d))?;
        out = (out + rel_out)?;
        let out = out.transpose(2, 3)?.contiguous()?.reshape((b, c, t))?;
        self.o.forward(&out)
    }
}

impl FeedForward {
    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (left, right) = ((self.kernel - 1) / 2, self.kernel / 2);
        let y = x.broadcast_mul(mask)?.pad_with_zeros(2, left, right)?;
        let y = self.conv_1.forward(&y)?.relu()?;
        let y = y.broadcast_mul(mask)?.pad_with_zeros(2, left, right)?;
        self.conv_2.forward(&y)?.broadcast_mul(mask)
    }
}
