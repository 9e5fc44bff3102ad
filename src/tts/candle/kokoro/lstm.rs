//! The bidirectional LSTMs of Kokoro's text encoder and prosody predictor, with the int8
//! export's rounding.
//!
//! ONNX Runtime's `DynamicQuantizeLSTM` rounds the whole input sequence through 8 bits once per
//! direction, and the hidden state at every step, before multiplying by the 8-bit weights;
//! [`BiLstm`] rounds the same values the same way ([`fake_quant`]), which reproduces ONNX
//! Runtime's output to float rounding. Each batch item runs over its own length (PyTorch's
//! packed sequences): the backward direction starts at the item's last real step, and padding
//! steps stay zero.

use candle_core::{D, IndexOp, Result, Tensor};

use super::error::KokoroError;
use super::layers::fake_quant;
use super::weights::Weights;

/// One direction's weights: input `[4H, in]`, recurrent `[4H, H]` (gates i, o, f, c) and the
/// two biases summed.
#[derive(Debug, Clone)]
struct Direction {
    input_t: Tensor,
    recurrent_t: Tensor,
    bias: Tensor,
}

/// A bidirectional single-layer LSTM from the graph's `DynamicQuantizeLSTM` node.
#[derive(Debug, Clone)]
pub(crate) struct BiLstm {
    directions: [Direction; 2],
    hidden: usize,
    quantised: bool,
}

impl BiLstm {
    /// `{module}.W` `[2, 4H, in]`, `{module}.R` `[2, 4H, H]`, `{module}.B` `[2, 8H]`.
    pub(crate) fn load(
        weights: &Weights,
        module: &str,
        input: usize,
        hidden: usize,
        quantised: bool,
    ) -> std::result::Result<Self, KokoroError> {
        let w = weights.shaped(&format!("{module}.W"), &[2, 4 * hidden, input])?;
        let r = weights.shaped(&format!("{module}.R"), &[2, 4 * hidden, hidden])?;
        let b = weights.shaped(&format!("{module}.B"), &[2, 8 * hidden])?;
        let direction = |d: usize| -> std::result::Result<Direction, KokoroError> {
            let bias = (b.i((d, 0..4 * hidden))? + b.i((d, 4 * hidden..8 * hidden))?)?;
            Ok(Direction {
                input_t: w.i(d)?.t()?.contiguous()?,
                recurrent_t: r.i(d)?.t()?.contiguous()?,
                bias,
            })
        };
        Ok(Self {
            directions: [direction(0)?, direction(1)?],
            hidden,
            quantised,
        })
    }

    /// `x` (`[batch, len, in]`) with each item's real length: `[batch, len, 2H]`, forward
    /// states then backward states, zero after each item's length.
    pub(crate) fn forward(&self, x: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let (_, len, _) = x.dims3()?;
        let mut items = Vec::with_capacity(lengths.len());
        for (b, &n) in lengths.iter().enumerate() {
            let item = x.i(b)?.narrow(0, 0, n)?;
            let forward = self.run(&self.directions[0], &item, false)?;
            let backward = self.run(&self.directions[1], &item, true)?;
            let mut out = Tensor::cat(&[forward, backward], 1)?;
            if n < len {
                let pad = out
                    .zeros_like()?
                    .narrow(0, 0, 1)?
                    .broadcast_as((len - n, 2 * self.hidden))?;
                out = Tensor::cat(&[out, pad.contiguous()?], 0)?;
            }
            items.push(out);
        }
        Tensor::stack(&items, 0)
    }

    /// One direction over one item's real steps (`[n, in]`): `[n, H]` in time order.
    fn run(&self, dir: &Direction, x: &Tensor, reverse: bool) -> Result<Tensor> {
        let n = x.dim(0)?;
        let h_size = self.hidden;
        let x = if self.quantised {
            fake_quant(&x.unsqueeze(0)?, None)?.squeeze(0)?
        } else {
            x.clone()
        };
        let gates_in = x.matmul(&dir.input_t)?.broadcast_add(&dir.bias)?;
        let mut h = Tensor::zeros((1, h_size), x.dtype(), x.device())?;
        let mut c = h.clone();
        let mut outputs = vec![None; n];
        for step in 0..n {
            let t = if reverse { n - 1 - step } else { step };
            let h_in = if self.quantised {
                fake_quant(&h, None)?
            } else {
                h.clone()
            };
            let g = (gates_in.narrow(0, t, 1)? + h_in.matmul(&dir.recurrent_t)?)?;
            let i = candle_nn::ops::sigmoid(&g.narrow(D::Minus1, 0, h_size)?)?;
            let o = candle_nn::ops::sigmoid(&g.narrow(D::Minus1, h_size, h_size)?)?;
            let f = candle_nn::ops::sigmoid(&g.narrow(D::Minus1, 2 * h_size, h_size)?)?;
            let cell = g.narrow(D::Minus1, 3 * h_size, h_size)?.tanh()?;
            c = ((f * &c)? + (i * cell)?)?;
            h = (o * c.tanh()?)?;
            outputs[t] = Some(h.clone());
        }
        let outputs: Vec<Tensor> = outputs.into_iter().flatten().collect();
        Tensor::cat(&outputs, 0)
    }
}
