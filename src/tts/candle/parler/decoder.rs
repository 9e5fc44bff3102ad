//! The Parler-TTS audio-token decoder, batched.
//!
//! candle's `parler_tts::Decoder` runs one sequence at a time (it adds the position
//! embeddings without broadcasting over the batch), recomputes the cross-attention keys and
//! values of the description at every step, and takes one position offset for all
//! sequences. This is the same network, loaded from the same tensor names, with what batched
//! generation needs:
//!
//! - per-sequence position ids, so that padding never shifts a sequence's positions and a
//!   request sounds the same alone or in any batch (a stronger guarantee than the
//!   reference, whose batched positions count the padding);
//! - the description's keys and values computed once per generation;
//! - masks built in the model's dtype, and attention probabilities computed in f32, so the
//!   decoder runs in f16 or bf16 ([`Precision`](crate::tts::candle::Precision)).

use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::{Activation, Embedding, LayerNorm, Linear, VarBuilder};

use super::config::DecoderConfig;

const LAYER_NORM_EPS: f64 = 1e-5;

/// Multi-head attention with grouped key/value heads and a cache.
#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    scaling: f64,
    /// Self-attention: every key/value so far. Cross-attention: the description's.
    cache: Option<(Tensor, Tensor)>,
}

impl Attention {
    fn new(cfg: &DecoderConfig, num_kv_heads: usize, vb: VarBuilder) -> Result<Self> {
        let hidden = cfg.hidden_size;
        let head_dim = hidden / cfg.num_attention_heads;
        let kv_dim = num_kv_heads * head_dim;
        Ok(Self {
            q_proj: candle_nn::linear_no_bias(hidden, hidden, vb.pp("q_proj"))?,
            k_proj: candle_nn::linear_no_bias(hidden, kv_dim, vb.pp("k_proj"))?,
            v_proj: candle_nn::linear_no_bias(hidden, kv_dim, vb.pp("v_proj"))?,
            out_proj: candle_nn::linear_no_bias(hidden, hidden, vb.pp("out_proj"))?,
            num_heads: cfg.num_attention_heads,
            num_kv_heads,
            head_dim,
            scaling: (head_dim as f64).powf(-0.5),
            cache: None,
        })
    }

    /// `(batch, len, kv_heads * head_dim)` to `(batch, kv_heads, len, head_dim)`.
    fn split_kv(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, len, _) = xs.dims3()?;
        xs.reshape((b, len, self.num_kv_heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }

    fn project_kv(&self, source: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            self.split_kv(&self.k_proj.forward(source)?)?,
            self.split_kv(&self.v_proj.forward(source)?)?,
        ))
    }

    /// Self-attention: appends this step's keys/values to the cache.
    fn forward_self(&mut self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (k, v) = self.project_kv(xs)?;
        let (k, v) = match &self.cache {
            Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
            None => (k, v),
        };
        self.cache = Some((k.clone(), v.clone()));
        self.attend(xs, &k, &v, mask)
    }

    /// Cross-attention over the description: keys/values computed when `encoder` is given
    /// (the first step), reused from the cache afterwards.
    fn forward_cross(
        &mut self,
        xs: &Tensor,
        encoder: Option<&Tensor>,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        if let Some(encoder) = encoder {
            self.cache = Some(self.project_kv(encoder)?);
        }
        let Some((k, v)) = self.cache.clone() else {
            candle_core::bail!("cross-attention used before the description was encoded");
        };
        self.attend(xs, &k, &v, mask)
    }

    fn attend(&self, xs: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, len, _) = xs.dims3()?;
        let q = (self.q_proj.forward(xs)? * self.scaling)?
            .reshape((b, len, self.num_heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()?;
        let groups = self.num_heads / self.num_kv_heads;
        let k = candle_transformers::utils::repeat_kv(k.clone(), groups)?.contiguous()?;
        let v = candle_transformers::utils::repeat_kv(v.clone(), groups)?.contiguous()?;
        let weights = q.matmul(&k.t()?)?;
        let weights = match mask {
            Some(mask) => weights.broadcast_add(mask)?,
            None => weights,
        };
        // In f32 whatever the model's dtype: half-precision exponentials of large scores
        // lose the small probabilities, and flash/SDPA kernels do the same upcast.
        let dtype = weights.dtype();
        let weights = candle_nn::ops::softmax_last_dim(&weights.to_dtype(DType::F32)?)?;
        weights
            .to_dtype(dtype)?
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, len, ()))?
            .apply(&self.out_proj)
    }
}

#[derive(Debug, Clone)]
struct Layer {
    self_attn: Attention,
    self_attn_layer_norm: LayerNorm,
    encoder_attn: Attention,
    encoder_attn_layer_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    final_layer_norm: LayerNorm,
    activation: Activation,
}

impl Layer {
    fn new(cfg: &DecoderConfig, vb: VarBuilder) -> Result<Self> {
        let kv_heads = cfg.num_key_value_heads.unwrap_or(cfg.num_attention_heads);
        let cross_kv_heads = cfg.num_cross_attention_key_value_heads.unwrap_or(kv_heads);
        let norm = |name: &str| candle_nn::layer_norm(cfg.hidden_size, LAYER_NORM_EPS, vb.pp(name));
        Ok(Self {
            self_attn: Attention::new(cfg, kv_heads, vb.pp("self_attn"))?,
            self_attn_layer_norm: norm("self_attn_layer_norm")?,
            encoder_attn: Attention::new(cfg, cross_kv_heads, vb.pp("encoder_attn"))?,
            encoder_attn_layer_norm: norm("encoder_attn_layer_norm")?,
            fc1: candle_nn::linear_no_bias(cfg.hidden_size, cfg.ffn_dim, vb.pp("fc1"))?,
            fc2: candle_nn::linear_no_bias(cfg.ffn_dim, cfg.hidden_size, vb.pp("fc2"))?,
            final_layer_norm: norm("final_layer_norm")?,
            activation: cfg.activation_function,
        })
    }

    fn forward(&mut self, xs: &Tensor, inputs: &StepInputs<'_>) -> Result<Tensor> {
        let h = self
            .self_attn
            .forward_self(&xs.apply(&self.self_attn_layer_norm)?, inputs.self_mask)?;
        let xs = (xs + h)?;
        let h = self.encoder_attn.forward_cross(
            &xs.apply(&self.encoder_attn_layer_norm)?,
            inputs.encoder,
            inputs.encoder_mask,
        )?;
        let xs = (xs + h)?;
        let h = xs
            .apply(&self.final_layer_norm)?
            .apply(&self.fc1)?
            .apply(&self.activation)?
            .apply(&self.fc2)?;
        xs + h
    }
}

/// What one decoder step reads besides the audio tokens.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StepInputs<'a> {
    /// `(batch, prompt_len, hidden)` transcript embeddings, first step only.
    pub(crate) prompt: Option<&'a Tensor>,
    /// `(batch, len)` u32 position of every input row.
    pub(crate) positions: &'a Tensor,
    /// Additive mask broadcastable to `(batch, heads, len, cached + len)`.
    pub(crate) self_mask: Option<&'a Tensor>,
    /// `(batch, desc_len, hidden)` encoded description, first step only.
    pub(crate) encoder: Option<&'a Tensor>,
    /// Additive mask broadcastable to `(batch, heads, len, desc_len)`.
    pub(crate) encoder_mask: Option<&'a Tensor>,
}

/// The decoder with its language-model heads: one embedding and one head per codebook.
#[derive(Debug, Clone)]
pub(crate) struct ParlerDecoder {
    embed_tokens: Vec<Embedding>,
    embed_positions: Tensor,
    layers: Vec<Layer>,
    layer_norm: LayerNorm,
    lm_heads: Vec<Linear>,
    num_codebooks: usize,
    dtype: DType,
}

impl ParlerDecoder {
    /// Loads from `decoder.*` with the names of Hugging Face checkpoints (and of candle's
    /// `parler_tts::Decoder`).
    pub(crate) fn new(cfg: &DecoderConfig, vb: VarBuilder) -> Result<Self> {
        let vb_d = vb.pp("model").pp("decoder");
        let embed_tokens = (0..cfg.num_codebooks)
            .map(|k| {
                candle_nn::embedding(
                    cfg.vocab_size + 1,
                    cfg.hidden_size,
                    vb_d.pp("embed_tokens").pp(k),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let embed_positions = vb_d.get(
            (cfg.max_position_embeddings, cfg.hidden_size),
            "embed_positions.weights",
        )?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(cfg, vb_d.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let layer_norm =
            candle_nn::layer_norm(cfg.hidden_size, LAYER_NORM_EPS, vb_d.pp("layer_norm"))?;
        let lm_heads = (0..cfg.num_codebooks)
            .map(|k| {
                candle_nn::linear_no_bias(cfg.hidden_size, cfg.vocab_size, vb.pp("lm_heads").pp(k))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embed_tokens,
            embed_positions,
            layers,
            layer_norm,
            lm_heads,
            num_codebooks: cfg.num_codebooks,
            dtype: vb.dtype(),
        })
    }

    /// The dtype masks must have.
    pub(crate) fn dtype(&self) -> DType {
        self.dtype
    }

    /// Forgets the previous generation's caches.
    pub(crate) fn clear_cache(&mut self) {
        for layer in &mut self.layers {
            layer.self_attn.cache = None;
            layer.encoder_attn.cache = None;
        }
    }

    /// Runs one step over `tokens` (`(batch, codebooks, len)` u32) and returns the logits of
    /// the last position, `(batch, codebooks, vocab)`.
    pub(crate) fn forward(&mut self, tokens: &Tensor, inputs: &StepInputs<'_>) -> Result<Tensor> {
        let (b, k, _len) = tokens.dims3()?;
        if k != self.num_codebooks {
            candle_core::bail!("expected {} codebooks, got {k}", self.num_codebooks);
        }
        let mut xs = self.embed_tokens[0].forward(&tokens.i((.., 0))?)?;
        for (cb, embed) in self.embed_tokens.iter().enumerate().skip(1) {
            xs = (xs + embed.forward(&tokens.i((.., cb))?)?)?;
        }
        if let Some(prompt) = inputs.prompt {
            xs = Tensor::cat(&[prompt, &xs], 1)?;
        }
        let total = xs.dim(1)?;
        let positions = self
            .embed_positions
            .index_select(&inputs.positions.flatten_all()?, 0)?
            .reshape((b, total, ()))?;
        let mut xs = (xs + positions)?;
        for layer in &mut self.layers {
            xs = layer.forward(&xs, inputs)?;
        }
        let last = xs.narrow(1, total - 1, 1)?.apply(&self.layer_norm)?;
        let logits = self
            .lm_heads
            .iter()
            .map(|head| head.forward(&last))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&logits, 1)
    }
}

/// Builds an additive mask from a keep/hide predicate, in `dtype`.
pub(crate) fn additive_mask(
    shape: (usize, usize, usize, usize),
    dtype: DType,
    device: &Device,
    keep: impl Fn(usize, usize, usize) -> bool,
) -> Result<Tensor> {
    let (b, _, q, kv) = shape;
    let mut values = Vec::with_capacity(b * q * kv);
    for bi in 0..b {
        for qi in 0..q {
            for ki in 0..kv {
                values.push(if keep(bi, qi, ki) {
                    0.0_f32
                } else {
                    f32::NEG_INFINITY
                });
            }
        }
    }
    Tensor::from_vec(values, shape, device)?.to_dtype(dtype)
}
