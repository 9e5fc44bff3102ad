//! PL-BERT: the ALBERT encoder that gives Kokoro each phoneme's context, and the projection of
//! its output to the prosody predictor's width (`bert_encoder`).
//!
//! ALBERT shares one transformer layer across all twelve passes, so the model holds one set
//! of weights (`albert_layer_groups.0.albert_layers.0`) and runs it twelve times. Embeddings
//! are 128 wide and mapped to 768 before the layers; attention has 12 heads of 64; the feed-
//! forward is 2048 wide with the tanh GELU (`gelu_new`); layer norms use eps 1e-12.

use candle_core::{D, DType, Result, Tensor};

use super::error::KokoroError;
use super::layers::{LayerNorm, Linear, fake_quant};
use super::weights::Weights;

const EMBED: usize = 128;
const HIDDEN: usize = 768;
const HEADS: usize = 12;
const FFN: usize = 2048;
const PASSES: usize = 12;
const EPS: f32 = 1e-12;
/// The prosody predictor's width, `bert_encoder`'s output.
pub(crate) const D_MODEL: usize = 512;

/// PL-BERT and `bert_encoder`.
#[derive(Debug, Clone)]
pub(crate) struct Albert {
    words: Tensor,
    positions: Tensor,
    token_type: Tensor,
    embed_norm: LayerNorm,
    map_in: Linear,
    /// The query, key and value layers side by side: `[.., 3 × hidden]`.
    qkv: Linear,
    dense: Linear,
    attn_norm: LayerNorm,
    ffn: Linear,
    ffn_out: Linear,
    full_norm: LayerNorm,
    project: Linear,
}

impl Albert {
    pub(crate) fn load(
        weights: &Weights,
        quantised: bool,
    ) -> std::result::Result<Self, KokoroError> {
        let emb = "encoder.bert.embeddings";
        let words = weights.get(&format!("{emb}.word_embeddings.weight"))?;
        let vocab = words.dim(0)?;
        let words = weights.shaped(&format!("{emb}.word_embeddings.weight"), &[vocab, EMBED])?;
        let positions = weights.get(&format!("{emb}.position_embeddings.weight"))?;
        let max_len = positions.dim(0)?;
        let positions = weights.shaped(
            &format!("{emb}.position_embeddings.weight"),
            &[max_len, EMBED],
        )?;
        let token_type = weights
            .get(&format!("{emb}.token_type_embeddings.weight"))?
            .get(0)?
            .reshape((1, 1, EMBED))?;
        let layer = "encoder.bert.encoder.albert_layer_groups.0.albert_layers.0";
        let lin = |name: &str, i: usize, o: usize| Linear::load(weights, name, i, o, quantised);
        Ok(Self {
            words,
            positions,
            token_type,
            embed_norm: LayerNorm::load(weights, &format!("{emb}.LayerNorm"), EMBED, EPS)?,
            map_in: lin(
                "encoder.bert.encoder.embedding_hidden_mapping_in",
                EMBED,
                HIDDEN,
            )?,
            qkv: Linear::side_by_side(&[
                lin(&format!("{layer}.attention.query"), HIDDEN, HIDDEN)?,
                lin(&format!("{layer}.attention.key"), HIDDEN, HIDDEN)?,
                lin(&format!("{layer}.attention.value"), HIDDEN, HIDDEN)?,
            ])?,
            dense: lin(&format!("{layer}.attention.dense"), HIDDEN, HIDDEN)?,
            attn_norm: LayerNorm::load(
                weights,
                &format!("{layer}.attention.LayerNorm"),
                HIDDEN,
                EPS,
            )?,
            ffn: lin(&format!("{layer}.ffn"), HIDDEN, FFN)?,
            ffn_out: lin(&format!("{layer}.ffn_output"), FFN, HIDDEN)?,
            full_norm: LayerNorm::load(
                weights,
                &format!("{layer}.full_layer_layer_norm"),
                HIDDEN,
                EPS,
            )?,
            project: lin("encoder.bert_encoder", HIDDEN, D_MODEL)?,
        })
    }

    /// How many phoneme ids the embedding knows.
    pub(crate) fn vocab(&self) -> usize {
        self.words.dim(0).unwrap_or(0)
    }

    /// The longest input the position table covers.
    pub(crate) fn max_len(&self) -> usize {
        self.positions.dim(0).unwrap_or(0)
    }

    /// ALBERT's last hidden state (`[batch, len, 768]`) for `ids` (`[batch, len]`, u32),
    /// `valid` (`[batch, len]`, f32: 1 for real tokens, 0 for padding).
    pub(crate) fn hidden(&self, ids: &Tensor, valid: &Tensor) -> Result<Tensor> {
        let (batch, len) = ids.dims2()?;
        let words = self
            .words
            .embedding(&ids.flatten_all()?)?
            .reshape((batch, len, EMBED))?;
        let positions = self.positions.narrow(0, 0, len)?.unsqueeze(0)?;
        let x = words
            .broadcast_add(&positions)?
            .broadcast_add(&self.token_type)?;
        let x = self.embed_norm.forward(&x)?;
        let valid3 = valid.unsqueeze(2)?;
        let mut h = self.map_in.forward(&x, Some(&valid3))?;
        // Padding keys get a large negative score, as HF's extended attention mask does.
        let mask = ((valid.to_dtype(DType::F32)? - 1.0)? * 1e9)?.reshape((batch, 1, 1, len))?;
        let head = HIDDEN / HEADS;
        #[allow(clippy::cast_precision_loss)]
        let scale = 1.0 / (head as f64).sqrt();
        for _ in 0..PASSES {
            let rounded = if self.qkv.quantised() {
                fake_quant(&h, Some(&valid3))?
            } else {
                h.clone()
            };
            let split = |t: Tensor| -> Result<Tensor> {
                t.reshape((batch, len, HEADS, head))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let qkv = self.qkv.forward_rounded(&rounded)?;
            let q = split(qkv.narrow(2, 0, HIDDEN)?)?;
            let k = split(qkv.narrow(2, HIDDEN, HIDDEN)?)?;
            let v = split(qkv.narrow(2, 2 * HIDDEN, HIDDEN)?)?;
            let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&mask)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let context = probs
                .matmul(&v)?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((batch, len, HIDDEN))?;
            let attended = self.dense.forward(&context, Some(&valid3))?;
            let h1 = self.attn_norm.forward(&(attended + &h)?)?;
            let inner = self.ffn.forward(&h1, Some(&valid3))?.gelu()?;
            let out = self.ffn_out.forward(&inner, Some(&valid3))?;
            h = self.full_norm.forward(&(out + h1)?)?;
        }
        Ok(h)
    }

    /// `bert_encoder` of the hidden state: `[batch, len, 512]`.
    pub(crate) fn project(&self, hidden: &Tensor, valid: &Tensor) -> Result<Tensor> {
        self.project
            .forward(hidden, Some(&valid.unsqueeze(D::Minus1)?))
    }
}
