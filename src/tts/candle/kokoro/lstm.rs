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
use crate::tts::candle::fused;

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
        if fused::applies(&gates_in) {
            let gates: Vec<f32> = gates_in.flatten_all()?.to_vec1()?;
            let recurrent: Vec<f32> = dir.recurrent_t.flatten_all()?.to_vec1()?;
            let out = recur(&gates, &recurrent, h_size, reverse, self.quantised);
            return Tensor::from_vec(out, (n, h_size), x.device());
        }
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

/// The recurrence of one direction on the host (the CPU path of [`BiLstm`]): `gates`
/// holds each step's input projection plus bias (`[n, 4h]`), `recurrent` the transposed
/// recurrent weight (`[h, 4h]`), gates in ONNX order (input, output, forget, cell).
/// Candle ran each step as some twenty small ops, each a call and an allocation, a few
/// hundred steps one after another; here a step is a matrix-vector product and one loop.
/// The same arithmetic as those ops, the product's sums aside (its order of summation is
/// its own).
fn recur(
    gates: &[f32],
    recurrent: &[f32],
    h_size: usize,
    reverse: bool,
    quantised: bool,
) -> Vec<f32> {
    let width = 4 * h_size;
    let n = gates.len() / width.max(1);
    let mut h = vec![0f32; h_size];
    let mut c = vec![0f32; h_size];
    let mut h_in = vec![0f32; h_size];
    let mut product = vec![0f32; width];
    let mut out = vec![0f32; n * h_size];
    let sigmoid = |v: f32| 1.0 / ((-v).exp() + 1.0);
    for step in 0..n {
        let t = if reverse { n - 1 - step } else { step };
        if quantised {
            round_through_eight_bits(&h, &mut h_in);
        } else {
            h_in.copy_from_slice(&h);
        }
        product.fill(0.0);
        for (&a, row) in h_in.iter().zip(recurrent.chunks_exact(width)) {
            if a != 0.0 {
                for (p, &w) in product.iter_mut().zip(row) {
                    *p += a * w;
                }
            }
        }
        let g = &gates[t * width..(t + 1) * width];
        for k in 0..h_size {
            let gate = |j: usize| g[j * h_size + k] + product[j * h_size + k];
            let (i, o, f) = (sigmoid(gate(0)), sigmoid(gate(1)), sigmoid(gate(2)));
            let cell = gate(3).tanh();
            c[k] = f * c[k] + i * cell;
            h[k] = o * c[k].tanh();
        }
        out[t * h_size..(t + 1) * h_size].copy_from_slice(&h);
    }
    out
}

/// [`fake_quant`] of one vector, as its Candle ops compute it: the range with 0 in it,
/// `scale = (hi − lo) · (1 / 255)` (1 where that is 0), the zero point
/// `clamp(round(−lo / scale), 0, 255)`, then each value rounded to its step.
fn round_through_eight_bits(x: &[f32], out: &mut [f32]) {
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for &v in x {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    let lo = lo.min(0.0);
    let hi = hi.max(0.0);
    let scale = (hi - lo) * (1.0f64 / 255.0) as f32 + 0.0;
    let scale = if scale == 0.0 { scale + 1.0 } else { scale };
    let zero = (-lo / scale).round().clamp(0.0, 255.0);
    for (o, &v) in out.iter_mut().zip(x) {
        let r = (v / scale).round().clamp(-zero, 255.0 - zero);
        *o = r * scale;
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::{BiLstm, Direction};
    use crate::tts::candle::fused::chain_only;
    use crate::tts::candle::fused::testing::{relative_difference, tensor};

    /// The host recurrence is the Candle ops' within rounding (the matrix-vector product
    /// sums in its own order), both directions, quantised or not.
    #[test]
    fn the_host_recurrence_is_the_candle_ops() {
        let (input, hidden) = (12, 8);
        let direction = |seed: u64| Direction {
            input_t: tensor(&[input, 4 * hidden], seed, 0.5),
            recurrent_t: tensor(&[hidden, 4 * hidden], seed + 1, 0.5),
            bias: tensor(&[4 * hidden], seed + 2, 0.5),
        };
        for quantised in [false, true] {
            let lstm = BiLstm {
                directions: [direction(1), direction(4)],
                hidden,
                quantised,
            };
            let x = tensor(&[2, 30, input], 7, 2.0);
            let host = lstm.forward(&x, &[30, 17]).unwrap();
            let chain = chain_only(|| lstm.forward(&x, &[30, 17])).unwrap();
            let d = relative_difference(&host, &chain);
            assert!(d < 1e-5, "quantised {quantised}: {d}");
        }
        let zeros = Tensor::zeros((1, 3, input), candle_core::DType::F32, &Device::Cpu).unwrap();
        let lstm = BiLstm {
            directions: [direction(1), direction(4)],
            hidden,
            quantised: true,
        };
        let d = relative_difference(
            &lstm.forward(&zeros, &[3]).unwrap(),
            &chain_only(|| lstm.forward(&zeros, &[3])).unwrap(),
        );
        assert!(d < 1e-5, "{d}");
    }
}
