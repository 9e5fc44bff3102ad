//! The inverse rational-quadratic spline of the duration predictor's flows (Durkan et al.,
//! "Neural Spline Flows"), with linear tails outside `[-bound, bound]`.
//!
//! Every position is computed at once with tensor ops, so it runs on any device: the bin
//! search is a count of knots below the input, the bin's parameters are gathered, and
//! positions outside the interval keep their input through `where_cond` (the spline's
//! arithmetic there may be NaN; `where_cond` never lets it through). Runs in f32 whatever
//! the model's precision, since the quadratic's discriminant is a difference of close values.

use candle_core::{D, DType, Result, Tensor};

use super::layers::softmax_last;

const MIN_BIN_WIDTH: f64 = 1e-3;
const MIN_BIN_HEIGHT: f64 = 1e-3;
const MIN_DERIVATIVE: f64 = 1e-3;

/// Inverts the spline for `inputs` (`[n]`) with per-position parameters `widths` and
/// `heights` (`[n, bins]`, unnormalised) and `derivatives` (`[n, bins - 1]`, the inner knots).
pub(crate) fn inverse_rq_spline(
    inputs: &Tensor,
    widths: &Tensor,
    heights: &Tensor,
    derivatives: &Tensor,
    bound: f64,
) -> Result<Tensor> {
    let dtype = inputs.dtype();
    let x = inputs.to_dtype(DType::F32)?;
    let widths = widths.to_dtype(DType::F32)?;
    let heights = heights.to_dtype(DType::F32)?;
    let derivatives = derivatives.to_dtype(DType::F32)?;
    let (n, bins) = widths.dims2()?;

    // Linear tails: the outer knots get the derivative 1 (softplus⁻¹(1 - min) + min = 1).
    let edge = ((1.0 - MIN_DERIVATIVE).exp() - 1.0).ln();
    let edge = Tensor::full(edge as f32, (n, 1), x.device())?;
    let derivatives = Tensor::cat(&[&edge, &derivatives, &edge], 1)?;
    let derivatives = (softplus(&derivatives)? + MIN_DERIVATIVE)?;

    let (cum_w, widths) = knots(&widths, bins, MIN_BIN_WIDTH, bound)?;
    let (cum_h, heights) = knots(&heights, bins, MIN_BIN_HEIGHT, bound)?;

    // Which bin each input falls in, searched on the output side (this is the inverse).
    let mut last = Tensor::zeros((n, bins + 1), DType::F32, x.device())?;
    last = last.slice_assign(
        &[0..n, bins..bins + 1],
        &Tensor::full(1e-6f32, (n, 1), x.device())?,
    )?;
    let search = (&cum_h + last)?;
    let above = x
        .unsqueeze(1)?
        .broadcast_ge(&search)?
        .to_dtype(DType::F32)?
        .sum(1)?;
    let bin = (above - 1.0)?
        .clamp(0f32, (bins - 1) as f32)?
        .to_dtype(DType::U32)?
        .unsqueeze(1)?;
    let pick = |t: &Tensor| -> Result<Tensor> { t.contiguous()?.gather(&bin, 1)?.squeeze(1) };

    let in_cum_w = pick(&cum_w)?;
    let in_width = pick(&widths)?;
    let in_cum_h = pick(&cum_h)?;
    let in_height = pick(&heights)?;
    let in_delta = (&in_height / &in_width)?;
    let d0 = pick(&derivatives.narrow(1, 0, bins)?)?;
    let d1 = pick(&derivatives.narrow(1, 1, bins)?)?;

    let dy = (&x - &in_cum_h)?;
    let slope_sum = ((&d0 + &d1)? - (&in_delta * 2.0)?)?;
    let a = ((&dy * &slope_sum)? + (&in_height * (&in_delta - &d0)?)?)?;
    let b = ((&in_height * &d0)? - (&dy * &slope_sum)?)?;
    let c = (in_delta.neg()? * &dy)?;
    let discriminant = (b.sqr()? - ((&a * &c)? * 4.0)?)?;
    let root = ((&c * 2.0)? / (b.neg()? - discriminant.sqrt()?)?)?;
    let spline = ((root * in_width)? + in_cum_w)?;

    let inside = x.ge(-bound)?.mul(&x.le(bound)?)?;
    inside.where_cond(&spline, &x)?.to_dtype(dtype)
}

/// `softplus(x) = ln(1 + e^x)`, stable for large `|x|`.
fn softplus(x: &Tensor) -> Result<Tensor> {
    let tail = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    x.relu()? + tail
}

/// Bin sizes from unnormalised logits: each bin at least `min`, the knots spanning exactly
/// `[-bound, bound]`. Returns the `bins + 1` knots and the `bins` sizes.
fn knots(logits: &Tensor, bins: usize, min: f64, bound: f64) -> Result<(Tensor, Tensor)> {
    let n = logits.dim(0)?;
    let sizes = ((softmax_last(logits)? * (1.0 - min * bins as f64))? + min)?;
    let cum = sizes.cumsum(D::Minus1)?;
    let cum = ((cum * (2.0 * bound))? - bound)?;
    let device = logits.device();
    let cum = Tensor::cat(
        &[
            &Tensor::full(-bound as f32, (n, 1), device)?,
            &cum.narrow(1, 0, bins - 1)?,
            &Tensor::full(bound as f32, (n, 1), device)?,
        ],
        1,
    )?;
    let sizes = (cum.narrow(1, 1, bins)? - cum.narrow(1, 0, bins)?)?;
    Ok((cum, sizes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Equal bins with unit slopes at every knot make the spline the identity, so its
    /// inverse is too, inside the interval and (linear tails) outside it.
    #[test]
    fn equal_bins_with_unit_slopes_invert_to_the_identity() {
        let device = Device::Cpu;
        let n = 5;
        let bins = 10;
        let x = Tensor::new(&[-6.0f32, -4.5, 0.3, 2.2, 5.5], &device).unwrap();
        let zeros = Tensor::zeros((n, bins), DType::F32, &device).unwrap();
        // softplus(d) + 1e-3 = 1  =>  d = ln(e^(1 - 1e-3) - 1).
        let unit = ((1.0f64 - MIN_DERIVATIVE).exp() - 1.0).ln() as f32;
        let derivs = Tensor::full(unit, (n, bins - 1), &device).unwrap();
        let y = inverse_rq_spline(&x, &zeros, &zeros, &derivs, 5.0).unwrap();
        let y: Vec<f32> = y.to_vec1().unwrap();
        for (got, want) in y.iter().zip([-6.0f32, -4.5, 0.3, 2.2, 5.5]) {
            assert!((got - want).abs() < 1e-5, "{y:?}");
        }
    }
}
