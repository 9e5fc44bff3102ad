//! Direct time-major convolution on x86-64 CPUs with AVX2 and FMA: the output tile stays
//! in registers while the taps and input channels stream past it.
//!
//! The decoders' last stages convolve few channels (32, 64) over tens of thousands of
//! samples. Unfolded for a matrix product (see [`fused::conv1d_activated`]), every input
//! row is copied once per kernel tap, and the product packs the copy again: for 32
//! output channels that is a few memory passes per 64 floating-point operations, and the
//! product ran at a quarter of what it reaches on data in the caches. Here each block of
//! three output rows by 32 channels (twelve AVX2 registers) takes the weights of one tap
//! and channel (four loads) and the three input values (broadcasts) at a time: the input
//! is read in place, and only the weights (a few tens of kilobytes) are rearranged, once
//! per call. The sum runs in the order of the unfolded product (tap, then input channel,
//! then the bias), so it differs from it only where the product splits its sum in blocks.
//!
//! The vector code is `pulp`'s (safe SIMD with run-time detection); on machines without
//! AVX2 and FMA, or for output channels that are not a multiple of 32, callers keep the
//! unfolded product.
//!
//! [`fused::conv1d_activated`]: super::fused::conv1d_activated

#[cfg(target_arch = "x86_64")]
use pulp::{Simd, WithSimd};

/// Output channels per tile: four vectors of eight floats.
const TILE: usize = 32;
/// Output rows per tile: with four vectors per row, twelve accumulators.
#[cfg(target_arch = "x86_64")]
const ROWS: usize = 3;

/// Whether [`conv`] runs for `out_channels` on this machine.
pub(crate) fn applies(out_channels: usize) -> bool {
    out_channels > 0 && out_channels.is_multiple_of(TILE) && v3().is_some()
}

#[cfg(target_arch = "x86_64")]
fn v3() -> Option<pulp::x86::V3> {
    pulp::x86::V3::try_new()
}

#[cfg(not(target_arch = "x86_64"))]
fn v3() -> Option<std::convert::Infallible> {
    None
}

/// The weights of a `[taps × in, out]` matrix regrouped by tiles of [`TILE`] output
/// channels: tile `j` holds rows `taps × in` of its `TILE` columns, contiguous.
pub(crate) fn tiles(stacked: &[f32], out_channels: usize) -> Vec<f32> {
    let depth = stacked.len() / out_channels.max(1);
    let mut tiled = Vec::with_capacity(stacked.len());
    for tile in 0..out_channels / TILE {
        for row in 0..depth {
            let at = row * out_channels + tile * TILE;
            tiled.extend_from_slice(&stacked[at..at + TILE]);
        }
    }
    tiled
}

/// One convolution's operands.
#[derive(Clone, Copy)]
pub(crate) struct Operands<'a> {
    /// The padded input, `[rows, in]` row-major: output row `t` reads rows
    /// `t + tap × dilation`.
    pub(crate) input: &'a [f32],
    /// The weights from [`tiles`].
    pub(crate) tiled: &'a [f32],
    /// `[out]`, or none.
    pub(crate) bias: Option<&'a [f32]>,
    pub(crate) in_channels: usize,
    pub(crate) out_channels: usize,
    pub(crate) taps: usize,
    pub(crate) dilation: usize,
}

/// Fills `out` (output rows from `first`, `[rows, out]` row-major) with the convolution's
/// sums and bias. Returns false, leaving `out` as it was, where [`applies`] would not hold
/// or the operands do not fit together.
pub(crate) fn conv(ops: Operands<'_>, first: usize, out: &mut [f32]) -> bool {
    let (cin, cout, taps) = (ops.in_channels, ops.out_channels, ops.taps);
    if !applies(cout) || cin == 0 || taps == 0 || !out.len().is_multiple_of(cout) {
        return false;
    }
    let rows = out.len() / cout;
    let reach = (first + rows + (taps - 1) * ops.dilation) * cin;
    if ops.input.len() < reach
        || ops.tiled.len() != taps * cin * cout
        || ops.bias.is_some_and(|b| b.len() != cout)
    {
        return false;
    }
    let Some(simd) = v3() else {
        return false;
    };
    #[cfg(target_arch = "x86_64")]
    Simd::vectorize(simd, Kernel { ops, first, out });
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (simd, first, out);
    true
}

#[cfg(target_arch = "x86_64")]
struct Kernel<'a, 'b> {
    ops: Operands<'a>,
    first: usize,
    out: &'b mut [f32],
}

#[cfg(target_arch = "x86_64")]
impl WithSimd for Kernel<'_, '_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Kernel { ops, first, out } = self;
        let Operands {
            input,
            tiled,
            bias,
            in_channels: cin,
            out_channels: cout,
            taps,
            dilation,
        } = ops;
        // Four vectors make a tile: `conv` dispatches to AVX2 alone, eight lanes.
        debug_assert_eq!(S::F32_LANES * 4, TILE);
        let rows = out.len() / cout;
        let depth = taps * cin;
        for (tile, weights) in tiled.chunks_exact(depth * TILE).enumerate() {
            let col = tile * TILE;
            let mut r = 0;
            while r < rows {
                let n = (rows - r).min(ROWS);
                let zero = simd.splat_f32s(0.0);
                let mut acc = [[zero; 4]; ROWS];
                for tap in 0..taps {
                    let w_tap = &weights[tap * cin * TILE..(tap + 1) * cin * TILE];
                    let at = (first + r + tap * dilation) * cin;
                    if n == ROWS {
                        let x0 = &input[at..at + cin];
                        let x1 = &input[at + cin..at + 2 * cin];
                        let x2 = &input[at + 2 * cin..at + 3 * cin];
                        for (((w, &a), &b), &c) in w_tap.chunks_exact(TILE).zip(x0).zip(x1).zip(x2)
                        {
                            let (w, _) = S::as_simd_f32s(w);
                            let (a, b, c) =
                                (simd.splat_f32s(a), simd.splat_f32s(b), simd.splat_f32s(c));
                            for v in 0..4 {
                                acc[0][v] = simd.mul_add_e_f32s(a, w[v], acc[0][v]);
                                acc[1][v] = simd.mul_add_e_f32s(b, w[v], acc[1][v]);
                                acc[2][v] = simd.mul_add_e_f32s(c, w[v], acc[2][v]);
                            }
                        }
                    } else {
                        for (i, acc) in acc.iter_mut().enumerate().take(n) {
                            let x = &input[at + i * cin..at + (i + 1) * cin];
                            for (w, &a) in w_tap.chunks_exact(TILE).zip(x) {
                                let (w, _) = S::as_simd_f32s(w);
                                let a = simd.splat_f32s(a);
                                for v in 0..4 {
                                    acc[v] = simd.mul_add_e_f32s(a, w[v], acc[v]);
                                }
                            }
                        }
                    }
                }
                let b = bias.map(|b| S::as_simd_f32s(&b[col..col + TILE]).0);
                let one = simd.splat_f32s(1.0);
                for (i, acc) in acc.iter().enumerate().take(n) {
                    let at = (r + i) * cout + col;
                    let (dst, _) = S::as_mut_simd_f32s(&mut out[at..at + TILE]);
                    for v in 0..4 {
                        // The bias last, as the unfolded product adds it (a column of ones).
                        dst[v] = match b {
                            Some(b) => simd.mul_add_e_f32s(one, b[v], acc[v]),
                            None => acc[v],
                        };
                    }
                }
                r += n;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_hold_each_tiles_columns_row_after_row() {
        // Two rows of 64 columns: the first tile's 32 columns of both rows, then the
        // second tile's.
        let stacked: Vec<f32> = (0..128).map(|i| i as f32).collect();
        let tiled = tiles(&stacked, 64);
        let expect: Vec<f32> = [(0..32), (64..96), (32..64), (96..128)]
            .into_iter()
            .flatten()
            .map(|i| i as f32)
            .collect();
        assert_eq!(tiled, expect);
    }

    #[test]
    fn operands_that_do_not_fit_leave_the_output_alone() {
        let (cin, cout, taps) = (2, 32, 3);
        let tiled = vec![1f32; taps * cin * cout];
        let input = vec![1f32; (4 + taps - 1) * cin];
        let ops = Operands {
            input: &input,
            tiled: &tiled,
            bias: None,
            in_channels: cin,
            out_channels: cout,
            taps,
            dilation: 1,
        };
        let mut out = vec![7f32; 4 * cout];
        // One row past the input; a partial row; a wrong bias; a weight short of a tap;
        // a channel count that is no multiple of a tile.
        assert!(!conv(ops, 1, &mut out));
        assert!(!conv(ops, 0, &mut out[..cout + 1]));
        let short = vec![0f32; 31];
        assert!(!conv(
            Operands {
                bias: Some(&short),
                ..ops
            },
            0,
            &mut out
        ));
        assert!(!conv(
            Operands {
                tiled: &tiled[cout..],
                ..ops
            },
            0,
            &mut out
        ));
        assert!(!conv(
            Operands {
                out_channels: 16,
                ..ops
            },
            0,
            &mut out
        ));
        assert!(out.iter().all(|&v| v == 7.0));
        if applies(cout) {
            // Every output sums three taps of two ones.
            assert!(conv(ops, 0, &mut out));
            assert!(out.iter().all(|&v| v == 6.0), "{out:?}");
        }
    }
}
