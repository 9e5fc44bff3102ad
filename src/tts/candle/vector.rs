//! Vectorised element-wise kernels of Kokoro's generator: a per-channel affine map followed
//! by the snake activation `y + sin²(αy) / α`, with the least and greatest output found in
//! the same pass.
//!
//! Every AdaIN of the generator's residual blocks ends in a snake, over 128–256 channels
//! and tens of thousands of samples, and the next layer rounds its input through 8 bits
//! over the whole tensor's range. One sine per element through the C library was a
//! twelfth of Kokoro's CPU time, the scalar affine map around it another tenth. Here eight lanes at a time
//! (AVX2 and FMA through `pulp`, detected at run time) compute the sine by a polynomial
//! after reducing the argument by multiples of π (`sin²` is π-periodic, so the quadrant's
//! sign never matters), within a few units in the last place of the C library's. Machines
//! without AVX2 and FMA run the same arithmetic one element at a time.

#[cfg(target_arch = "x86_64")]
use pulp::{Simd, WithSimd};

/// `1 / π`.
const INV_PI: f32 = std::f32::consts::FRAC_1_PI;
/// π in three parts (Cody and Waite's reduction): their sum carries π far past an f32's
/// precision, and each `k × part` is taken inside an FMA, so `x − kπ` keeps the bits
/// that matter for the multiples an activation reaches (the tests go to |x| = 2000).
const PI_A: f32 = 3.140_625;
const PI_B: f32 = 9.675_026e-4;
const PI_C: f32 = 1.509_958e-7;
/// Adding and taking away 1.5 × 2²³ rounds a float of magnitude below 2²² to the nearest
/// whole number.
const ROUND: f32 = 12_582_912.0;
/// Odd Taylor coefficients of `sin` to `r¹³`: on `|r| ≤ π/2` the first term left out is
/// below 1e-9.
const S3: f32 = -1.0 / 6.0;
const S5: f32 = 1.0 / 120.0;
const S7: f32 = -1.0 / 5_040.0;
const S9: f32 = 1.0 / 362_880.0;
const S11: f32 = -1.0 / 39_916_800.0;
const S13: f32 = 1.0 / 6_227_020_800.0;

/// `sin²(x)` for one value, in the kernel's arithmetic.
fn sin_squared(x: f32) -> f32 {
    let k = x.mul_add(INV_PI, ROUND) - ROUND;
    let r = (-k).mul_add(PI_C, (-k).mul_add(PI_B, (-k).mul_add(PI_A, x)));
    let r2 = r * r;
    let p = r2
        .mul_add(S13, S11)
        .mul_add(r2, S9)
        .mul_add(r2, S7)
        .mul_add(r2, S5)
        .mul_add(r2, S3);
    let s = (r * r2).mul_add(p, r);
    s * s
}

/// The per-channel parameters of [`affine_snake`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct AffineSnake<'a> {
    /// Multiplies channel `c`.
    pub(crate) scale: &'a [f32],
    /// Then is added to channel `c`.
    pub(crate) shift: &'a [f32],
    /// The snake's α per channel, or none for the affine map alone.
    pub(crate) alpha: Option<&'a [f32]>,
}

/// `out = snake(x · scale + shift)` per channel over whole rows (`x` and `out` row-major,
/// `scale.len()` channels a row; `α` from `p.alpha`), giving the least and greatest value
/// written. Returns none, leaving `out` alone, where the lengths do not fit together.
pub(crate) fn affine_snake(x: &[f32], out: &mut [f32], p: AffineSnake<'_>) -> Option<(f32, f32)> {
    let channels = p.scale.len();
    if channels == 0
        || p.shift.len() != channels
        || p.alpha.is_some_and(|a| a.len() != channels)
        || x.len() != out.len()
        || !x.len().is_multiple_of(channels)
    {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    if channels.is_multiple_of(8)
        && let Some(simd) = pulp::x86::V3::try_new()
    {
        return Some(Simd::vectorize(simd, Kernel { x, out, p }));
    }
    Some(scalar(x, out, p))
}

fn scalar(x: &[f32], out: &mut [f32], p: AffineSnake<'_>) -> (f32, f32) {
    let channels = p.scale.len();
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for (xs, os) in x.chunks_exact(channels).zip(out.chunks_exact_mut(channels)) {
        for c in 0..channels {
            let y = xs[c].mul_add(p.scale[c], p.shift[c]);
            let v = match p.alpha {
                Some(a) => (sin_squared(y * a[c]) / a[c]) + y,
                None => y,
            };
            os[c] = v;
            lo = lo.min(v);
            hi = hi.max(v);
        }
    }
    (lo, hi)
}

#[cfg(target_arch = "x86_64")]
struct Kernel<'a, 'b> {
    x: &'a [f32],
    out: &'b mut [f32],
    p: AffineSnake<'a>,
}

#[cfg(target_arch = "x86_64")]
impl WithSimd for Kernel<'_, '_> {
    type Output = (f32, f32);

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> (f32, f32) {
        let Kernel { x, out, p } = self;
        let channels = p.scale.len();
        let (scale, _) = S::as_simd_f32s(p.scale);
        let (shift, _) = S::as_simd_f32s(p.shift);
        let alpha = p.alpha.map(|a| S::as_simd_f32s(a).0);
        let splat = |v: f32| simd.splat_f32s(v);
        let (inv_pi, round) = (splat(INV_PI), splat(ROUND));
        let (pi_a, pi_b, pi_c) = (splat(-PI_A), splat(-PI_B), splat(-PI_C));
        let (s3, s5, s7) = (splat(S3), splat(S5), splat(S7));
        let (s9, s11, s13) = (splat(S9), splat(S11), splat(S13));
        let mut lo = splat(f32::INFINITY);
        let mut hi = splat(f32::NEG_INFINITY);
        for (xs, os) in x.chunks_exact(channels).zip(out.chunks_exact_mut(channels)) {
            let (xs, _) = S::as_simd_f32s(xs);
            let (os, _) = S::as_mut_simd_f32s(os);
            for (i, (o, &v)) in os.iter_mut().zip(xs).enumerate() {
                let y = simd.mul_add_e_f32s(v, scale[i], shift[i]);
                let y = match alpha {
                    Some(alpha) => {
                        let a = alpha[i];
                        let t = simd.mul_f32s(y, a);
                        let k = simd.sub_f32s(simd.mul_add_e_f32s(t, inv_pi, round), round);
                        let r = simd.mul_add_e_f32s(k, pi_a, t);
                        let r = simd.mul_add_e_f32s(k, pi_b, r);
                        let r = simd.mul_add_e_f32s(k, pi_c, r);
                        let r2 = simd.mul_f32s(r, r);
                        let q = simd.mul_add_e_f32s(r2, s13, s11);
                        let q = simd.mul_add_e_f32s(q, r2, s9);
                        let q = simd.mul_add_e_f32s(q, r2, s7);
                        let q = simd.mul_add_e_f32s(q, r2, s5);
                        let q = simd.mul_add_e_f32s(q, r2, s3);
                        let s = simd.mul_add_e_f32s(simd.mul_f32s(r, r2), q, r);
                        simd.add_f32s(simd.div_f32s(simd.mul_f32s(s, s), a), y)
                    }
                    None => y,
                };
                *o = y;
                lo = simd.min_f32s(lo, y);
                hi = simd.max_f32s(hi, y);
            }
        }
        (simd.reduce_min_f32s(lo), simd.reduce_max_f32s(hi))
    }
}

#[cfg(test)]
mod tests {
    use super::{AffineSnake, affine_snake, scalar, sin_squared};

    /// Within a few units in the last place of the C library's sine, squared, from small
    /// arguments to ones far past what an activation reaches.
    #[test]
    fn the_polynomial_sine_squared_is_the_c_librarys() {
        let mut x = -2_000f32;
        while x < 2_000.0 {
            let want = x.sin() * x.sin();
            let d = (sin_squared(x) - want).abs();
            assert!(d <= 5e-7, "{x}: {} against {want}", sin_squared(x));
            x += 0.037;
        }
        use std::f32::consts::{FRAC_PI_2, PI};
        for x in [0f32, 1e-30, -1e-7, PI, FRAC_PI_2, -FRAC_PI_2, 4.0 * PI] {
            let want = x.sin() * x.sin();
            assert!((sin_squared(x) - want).abs() <= 2e-7, "{x}");
        }
    }

    /// The vector kernel writes what the scalar one does (the same operations lane by lane)
    /// and finds the same least and greatest values; mismatched lengths write nothing.
    #[test]
    fn the_vector_kernel_is_the_scalar_one() {
        let channels = 24;
        let x: Vec<f32> = (0..channels * 101)
            .map(|i| ((i * 7919 % 1000) as f32 / 100.0) - 5.0)
            .collect();
        let scale: Vec<f32> = (0..channels).map(|c| 0.5 + c as f32 / 10.0).collect();
        let shift: Vec<f32> = (0..channels).map(|c| c as f32 / 7.0 - 1.0).collect();
        let alpha: Vec<f32> = (0..channels).map(|c| 0.2 + c as f32 / 5.0).collect();
        for a in [None, Some(&alpha[..])] {
            let p = AffineSnake {
                scale: &scale,
                shift: &shift,
                alpha: a,
            };
            let mut vector = vec![0f32; x.len()];
            let mut one_by_one = vec![0f32; x.len()];
            let range = affine_snake(&x, &mut vector, p).unwrap();
            assert_eq!(range, scalar(&x, &mut one_by_one, p));
            assert_eq!(vector, one_by_one);
            let lo = one_by_one.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = one_by_one.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(range, (lo, hi));
        }
        let mut out = vec![9f32; x.len()];
        let short = &scale[1..];
        let p = AffineSnake {
            scale: short,
            shift: &shift,
            alpha: None,
        };
        assert!(affine_snake(&x, &mut out, p).is_none());
        let whole = AffineSnake {
            scale: &scale,
            shift: &shift,
            alpha: None,
        };
        assert!(affine_snake(&x[1..], &mut out[1..], whole).is_none());
        assert!(out.iter().all(|&v| v == 9.0));
    }
}
