//! One-pass CPU kernels for the element-wise chains of the HiFi-GAN style decoders (Kokoro
//! and Piper).
//!
//! On the CPU Candle runs every element-wise op as its own single-threaded pass that reads
//! the whole tensor and writes a fresh one. The decoders' last stages hold 128–256 channels
//! over tens of thousands of samples, so a chain such as AdaIN (subtract, divide, scale,
//! shift), the snake activation (five ops) or the 8-bit input rounding (five ops) costs more
//! memory traffic than the matrix products between them. These kernels compute the same
//! floats as those chains, op for op in the same order, in one pass split by rows over
//! Candle's own thread pool (rayon). They read the tensors' host memory, so they only run on
//! the CPU with f32 tensors ([`applies`]); elsewhere the callers keep the Candle ops, which
//! CUDA and Metal run as kernels of their own.

use candle_core::{DType, Device, Result, Storage, Tensor, bail};
use rayon::prelude::*;

use super::{direct, vector};

/// Elements per parallel task: enough to outweigh the scheduling.
const TASK_ELEMENTS: usize = 32 * 1024;

/// Whether the fused kernels run on `x`: f32 on the CPU, in an optimised build (or a
/// unit test).
pub(crate) fn applies(x: &Tensor) -> bool {
    #[cfg(test)]
    if CHAIN_ONLY.with(std::cell::Cell::get) {
        return false;
    }
    // An unoptimised build keeps Candle's ops: they come optimised as a dependency, and
    // the kernels, loops of this crate, lose to them at opt-level 0 (Kokoro took a tenth
    // more CPU time, 15 % less at 3). `build.rs` sets the cfg from the profile's
    // opt-level, so the benches' dev profile at opt-level 3 runs the kernels too. Unit
    // tests run them in any build.
    (cfg!(test) || cfg!(voxqueue_optimized)) && x.device().is_cpu() && x.dtype() == DType::F32
}

#[cfg(test)]
thread_local! {
    /// Set by [`chain_only`]: the callers run their Candle ops, as on a GPU.
    static CHAIN_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with the fused kernels off on this thread, so a test can hold the Candle ops the
/// kernels replace (what CUDA and Metal run) against the kernels.
#[cfg(test)]
pub(crate) fn chain_only<R>(f: impl FnOnce() -> R) -> R {
    CHAIN_ONLY.with(|c| c.set(true));
    let r = f();
    CHAIN_ONLY.with(|c| c.set(false));
    r
}

/// Runs `f` on `x`'s elements in row-major order (made contiguous first if need be).
fn with_slice<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        bail!("a fused kernel got a tensor that is not on the CPU")
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("a fused kernel got a tensor that is not contiguous")
    };
    match cpu.as_slice::<f32>()?.get(start..end) {
        Some(values) => f(values),
        None => bail!("a fused kernel's tensor is out of its storage's bounds"),
    }
}

/// A small tensor (per-channel parameters) as a vector on the host.
fn host(x: &Tensor) -> Result<Vec<f32>> {
    x.flatten_all()?.to_vec1::<f32>()
}

/// Fills `out` (rows of `row` elements) by `f(first row, rows)` over the thread pool.
fn par_rows(out: &mut [f32], row: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    let row = row.max(1);
    let rows = (TASK_ELEMENTS / row).max(1);
    out.par_chunks_mut(rows * row)
        .enumerate()
        .for_each(|(i, chunk)| f(i * rows, chunk));
}

/// Leaky ReLU, `max(x, 0) + (min(x, 0) · slope + 0)` as Candle's `relu`, `clamp` (or
/// `maximum`, `minimum`) and `affine` compute it.
pub(crate) fn leaky_relu(x: &Tensor, slope: f64) -> Result<Tensor> {
    let slope = slope as f32;
    with_slice(x, |xs| {
        let mut out = vec![0f32; xs.len()];
        par_rows(&mut out, 1, |start, out| {
            let xs = &xs[start..start + out.len()];
            // Indexed loops: this crate's own code may be built unoptimised (the dev
            // profile), where iterator adapters cost a call per element.
            let mut i = 0;
            while i < out.len() {
                out[i] = lrelu(xs[i], slope);
                i += 1;
            }
        });
        Tensor::from_vec(out, x.shape(), &Device::Cpu)
    })
}

fn lrelu(v: f32, slope: f32) -> f32 {
    let positive = if v < 0.0 { 0.0 } else { v };
    let negative = if v > 0.0 { 0.0 } else { v };
    positive + (negative * slope + 0.0)
}

/// Each channel's mean and variance over time of a time-major `x` (`[time, channels]`): an
/// instance norm's statistics in two passes over the signal that write nothing (the
/// centred squares are summed as they are made), split by rows over the pool.
pub(crate) fn moments(x: &Tensor) -> Result<(Vec<f32>, Vec<f32>)> {
    let (rows, channels) = x.dims2()?;
    if rows == 0 || channels == 0 {
        bail!("moments: an empty signal ({rows} × {channels})")
    }
    let block = (TASK_ELEMENTS / channels).max(1) * channels;
    // The blocks' sums are added in block order, not as the pool's work-stealing
    // happens to join them, so the statistics (and an item batched or alone) come out
    // the same floats every run.
    let add = |blocks: Vec<Vec<f32>>| {
        let mut total = vec![0f32; channels];
        for block in blocks {
            for (t, b) in total.iter_mut().zip(&block) {
                *t += b;
            }
        }
        total
    };
    with_slice(x, |xs| {
        let sums = xs
            .par_chunks(block)
            .map(|chunk| {
                let mut acc = vec![0f32; channels];
                for row in chunk.chunks_exact(channels) {
                    for (a, &v) in acc.iter_mut().zip(row) {
                        *a += v;
                    }
                }
                acc
            })
            .collect::<Vec<_>>();
        let sums = add(sums);
        let mean: Vec<f32> = sums.iter().map(|s| s / rows as f32).collect();
        let squares = xs
            .par_chunks(block)
            .map(|chunk| {
                let mut acc = vec![0f32; channels];
                for row in chunk.chunks_exact(channels) {
                    for ((a, &v), &m) in acc.iter_mut().zip(row).zip(&mean) {
                        let d = v - m;
                        *a += d * d;
                    }
                }
                acc
            })
            .collect::<Vec<_>>();
        let squares = add(squares);
        let var = squares.iter().map(|s| s / rows as f32).collect();
        Ok((mean, var))
    })
}

/// `snake(x · scale + shift)` per channel of a time-major `x` (`[time, channels]`; the
/// snake `y + sin²(αy) / α` with `alpha`'s α per channel, or none), and the least and
/// greatest value of the result: an instance norm with a style's scale and shift folded
/// into `scale` and `shift` (AdaIN), the activation that follows it in Kokoro's
/// generator, and the range the next layer's 8-bit rounding reads, in one vectorised pass
/// split by rows over the pool (see [`vector`]).
pub(crate) fn affine_snake(
    x: &Tensor,
    scale: &[f32],
    shift: &[f32],
    alpha: Option<&Tensor>,
) -> Result<(Tensor, f32, f32)> {
    let (_, channels) = x.dims2()?;
    let alpha = alpha.map(host).transpose()?;
    if scale.len() != channels
        || shift.len() != channels
        || alpha.as_ref().is_some_and(|a| a.len() != channels)
    {
        bail!("affine_snake: parameters of the wrong length for {channels} channels")
    }
    let p = vector::AffineSnake {
        scale,
        shift,
        alpha: alpha.as_deref(),
    };
    let block = (TASK_ELEMENTS / channels.max(1)).max(1) * channels;
    with_slice(x, |xs| {
        let mut out = vec![0f32; xs.len()];
        let (lo, hi) = out
            .par_chunks_mut(block)
            .zip(xs.par_chunks(block))
            .map(|(o, x)| vector::affine_snake(x, o, p))
            .reduce(
                || Some((f32::INFINITY, f32::NEG_INFINITY)),
                |a, b| Some((a?.0.min(b?.0), a?.1.max(b?.1))),
            )
            .ok_or_else(|| {
                candle_core::Error::Msg("affine_snake: rows of the wrong length".into())
            })?;
        Ok((Tensor::from_vec(out, x.shape(), &Device::Cpu)?, lo, hi))
    })
}

/// WaveNet's gated activation `tanh(a) · sigmoid(b)` of a time-major `x` (`[time, 2h]`: `a`
/// its first `h` channels, `b` the rest), each plus its part of `shift` (`[1, 2h]`, a
/// speaker's conditioning) when there is one: `[time, h]`, the same floats as Candle's add,
/// `tanh`, `sigmoid` and product on the two strided halves, in one pass split by rows
/// over the pool.
pub(crate) fn gated(x: &Tensor, shift: Option<&Tensor>) -> Result<Tensor> {
    let (rows, width) = x.dims2()?;
    let h = width / 2;
    let shift = shift.map(host).transpose()?;
    if width % 2 != 0 || shift.as_ref().is_some_and(|s| s.len() != width) {
        bail!(
            "gated: {width} channels, a shift of {:?}",
            shift.map(|s| s.len())
        )
    }
    let shift = shift.as_deref();
    with_slice(x, |xs| {
        let mut out = vec![0f32; rows * h];
        par_rows(&mut out, h, |row, out| {
            for (r, o) in out.chunks_exact_mut(h.max(1)).enumerate() {
                let x = &xs[(row + r) * width..(row + r + 1) * width];
                for c in 0..h {
                    let (mut a, mut b) = (x[c], x[h + c]);
                    if let Some(s) = shift {
                        a += s[c];
                        b += s[h + c];
                    }
                    // Candle's `sigmoid`: `1 / (exp(−b) + 1)`.
                    o[c] = a.tanh() * (1.0 / ((-b).exp() + 1.0));
                }
            }
        });
        Tensor::from_vec(out, (rows, h), &Device::Cpu)
    })
}

/// The least and greatest of `xs`.
fn min_max(xs: &[f32]) -> (f32, f32) {
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    let mut i = 0;
    while i < xs.len() {
        let v = xs[i];
        if v < lo {
            lo = v;
        }
        if v > hi {
            hi = v;
        }
        i += 1;
    }
    (lo, hi)
}

/// The least and greatest value of each of `x`'s `items` equal slices (a batch's items),
/// `[items, 2]`, as `min_keepdim` and `max_keepdim` over each flattened item find them.
pub(crate) fn item_min_max(x: &Tensor, items: usize) -> Result<Tensor> {
    with_slice(x, |xs| {
        let per = xs.len() / items.max(1);
        let mut out = Vec::with_capacity(2 * items);
        for item in xs.chunks_exact(per.max(1)).take(items) {
            let (lo, hi) = item.par_chunks(TASK_ELEMENTS).map(min_max).reduce(
                || (f32::INFINITY, f32::NEG_INFINITY),
                |a, b| (a.0.min(b.0), a.1.max(b.1)),
            );
            out.extend([lo, hi]);
        }
        Tensor::from_vec(out, (items, 2), &Device::Cpu)
    })
}

/// `min(max(round(x / scale), −zero), 255 − zero) · scale` per item of `x`, with one scale
/// and zero point per item (`[items]` each): the 8-bit rounding of Kokoro's quantised
/// layers' inputs, op for op as its Candle chain computes it.
pub(crate) fn round_to_steps(x: &Tensor, scale: &Tensor, zero: &Tensor) -> Result<Tensor> {
    let scale = host(scale)?;
    let zero = host(zero)?;
    let items = scale.len();
    if zero.len() != items || items == 0 {
        bail!(
            "round_to_steps: {items} scales and {} zero points",
            zero.len()
        )
    }
    with_slice(x, |xs| {
        let per = xs.len() / items;
        let mut out = vec![0f32; xs.len()];
        for (item, (out, xs)) in out
            .chunks_mut(per.max(1))
            .zip(xs.chunks(per.max(1)))
            .enumerate()
        {
            let (s, lo, hi) = (scale[item], -zero[item], 255.0 - zero[item]);
            par_rows(out, 1, |start, out| {
                let xs = &xs[start..start + out.len()];
                let mut i = 0;
                while i < out.len() {
                    out[i] = step(xs[i], s, lo, hi);
                    i += 1;
                }
            });
        }
        Tensor::from_vec(out, x.shape(), &Device::Cpu)
    })
}

/// `min(max(round(v / scale), lo), hi) · scale`: one value of [`round_to_steps`].
fn step(v: f32, scale: f32, lo: f32, hi: f32) -> f32 {
    let r = (v / scale).round();
    let r = if r < lo { lo } else { r };
    let r = if r > hi { hi } else { r };
    r * scale
}

/// What a time-major convolution does to its output after the bias.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Epilogue<'a> {
    /// Nothing.
    None,
    /// Adds a residual of the output's shape (`y + residual`).
    Residual(&'a Tensor),
    /// A leaky ReLU with this slope (as [`leaky_relu`]).
    LeakyRelu(f64),
}

/// Floats per block of [`conv1d_activated`]'s unfolded input: a few megabytes, so a
/// block's copy is still in the caches when the matrix product reads it.
const BLOCK_FLOATS: usize = 1 << 20;

/// The taps, padding and dilation of a [`conv1d_activated`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Conv1dShape {
    /// Kernel taps.
    pub(crate) taps: usize,
    /// Zeros on each side of the input.
    pub(crate) padding: usize,
    /// Input rows between two taps.
    pub(crate) dilation: usize,
}

/// A stride-1 convolution of a time-major `x` (`[time, in]`) with `stacked` (`[taps × in,
/// out]`: every tap's `[in, out]` matrix stacked in tap order), plus `bias` (`[out]`) and
/// then `epilogue`: `[time', out]`, `time' = time + 2 padding − dilation (taps − 1)`.
///
/// Each block of output rows copies its `taps` shifted input rows side by side (and a 1 for
/// the bias) and takes one matrix product with the stacked taps (and the bias as a last
/// row): the product per tap and the addition per tap of the Candle ops become one product
/// whose sums stay in registers, and no padded copy of the whole input is made. The copies
/// are whole rows (`memcpy`), fast whatever this crate's optimisation level.
///
/// With `pre` a slope it convolves `leaky_relu(x, pre)`: the activation before a HiFi-GAN
/// convolution is applied while the input rows are unfolded (the same floats as
/// [`leaky_relu`]), so the activated signal is never written out as a tensor of its own.
///
/// The epilogue is applied as each block's product is copied into the output, split by
/// rows over the pool: the block's sum, activation and copy are one pass.
pub(crate) fn conv1d_activated(
    x: &Tensor,
    stacked: &Tensor,
    shape: Conv1dShape,
    bias: Option<&Tensor>,
    pre: Option<f64>,
    epilogue: Epilogue<'_>,
) -> Result<Tensor> {
    let read = match pre {
        Some(slope) => Read::LeakyRelu(slope as f32),
        None => Read::Plain,
    };
    conv1d_read(x, stacked, shape, bias, read, epilogue)
}

/// [`conv1d_activated`] of `x` rounded through 8 bits first, as [`round_to_steps`] rounds
/// it with one `scale` and `zero` point (a quantised layer's input; `x` is one item): the
/// rounding is applied as the input is read, so the rounded signal is never a tensor of
/// its own.
pub(crate) fn conv1d_rounded(
    x: &Tensor,
    stacked: &Tensor,
    shape: Conv1dShape,
    bias: Option<&Tensor>,
    (scale, zero): (f32, f32),
    epilogue: Epilogue<'_>,
) -> Result<Tensor> {
    conv1d_read(
        x,
        stacked,
        shape,
        bias,
        Read::Steps { scale, zero },
        epilogue,
    )
}

/// The convolution of [`conv1d_activated`] with `read` applied to each input value as it
/// is read: by [`direct::conv`] where it applies, by one dot product per output for one
/// output channel, and by the unfolded product otherwise.
fn conv1d_read(
    x: &Tensor,
    stacked: &Tensor,
    shape: Conv1dShape,
    bias: Option<&Tensor>,
    read: Read,
    epilogue: Epilogue<'_>,
) -> Result<Tensor> {
    let Conv1dShape {
        taps,
        padding,
        dilation,
    } = shape;
    let (len, cin) = x.dims2()?;
    let (depth, out_ch) = stacked.dims2()?;
    if taps == 0 || depth != taps * cin {
        bail!("conv1d: {depth} weight rows for {taps} taps of {cin} channels")
    }
    let out_len = (len + 2 * padding).saturating_sub(dilation * (taps - 1));
    if let Epilogue::Residual(r) = epilogue
        && r.dims() != [out_len, out_ch]
    {
        bail!(
            "conv1d: a residual of shape {:?}, not [{out_len}, {out_ch}]",
            r.dims()
        )
    }
    if direct::applies(out_ch) {
        let dims = (len, cin, out_ch, out_len);
        return conv1d_direct(x, stacked, shape, dims, bias, read, epilogue);
    }
    if out_ch == 1 && dilation == 1 && out_len > 0 {
        return conv1d_dot(x, stacked, shape, (len, cin, out_len), bias, read, epilogue);
    }
    let (weights, width) = match bias {
        Some(b) => (
            Tensor::cat(&[stacked, &b.reshape((1, out_ch))?], 0)?,
            depth + 1,
        ),
        None => (stacked.clone(), depth),
    };
    let residual = match epilogue {
        Epilogue::Residual(r) => Some(r.contiguous()?),
        _ => None,
    };
    let block = (BLOCK_FLOATS / width).max(16);
    let mut out = vec![0f32; out_len * out_ch];
    with_slice(x, |xs| {
        let mut t0 = 0;
        while t0 < out_len {
            let t1 = (t0 + block).min(out_len);
            let mut unfolded = vec![0f32; (t1 - t0) * width];
            par_rows(&mut unfolded, width, |first, chunk| {
                for (r, row) in chunk.chunks_exact_mut(width).enumerate() {
                    let t = t0 + first + r;
                    for tap in 0..taps {
                        let Some(i) = (t + tap * dilation)
                            .checked_sub(padding)
                            .filter(|&i| i < len)
                        else {
                            continue;
                        };
                        let dst = &mut row[tap * cin..(tap + 1) * cin];
                        let src = &xs[i * cin..(i + 1) * cin];
                        read.apply(src, dst);
                    }
                    if width > depth {
                        row[depth] = 1.0;
                    }
                }
            });
            let y = Tensor::from_vec(unfolded, (t1 - t0, width), &Device::Cpu)?.matmul(&weights)?;
            let block_out = &mut out[t0 * out_ch..t1 * out_ch];
            with_slice(&y, |ys| match (&residual, epilogue) {
                (Some(r), _) => with_slice(r, |rs| {
                    let rs = &rs[t0 * out_ch..t1 * out_ch];
                    par_rows(block_out, out_ch, |row, o| {
                        let at = row * out_ch;
                        let (ys, rs) = (&ys[at..at + o.len()], &rs[at..at + o.len()]);
                        let mut i = 0;
                        while i < o.len() {
                            o[i] = ys[i] + rs[i];
                            i += 1;
                        }
                    });
                    Ok(())
                }),
                (None, Epilogue::LeakyRelu(slope)) => {
                    let slope = slope as f32;
                    par_rows(block_out, out_ch, |row, o| {
                        let ys = &ys[row * out_ch..row * out_ch + o.len()];
                        let mut i = 0;
                        while i < o.len() {
                            o[i] = lrelu(ys[i], slope);
                            i += 1;
                        }
                    });
                    Ok(())
                }
                (None, _) => {
                    block_out.copy_from_slice(ys);
                    Ok(())
                }
            })?;
            t0 = t1;
        }
        Ok(())
    })?;
    Tensor::from_vec(out, (out_len, out_ch), &Device::Cpu)
}

/// What a convolution does to each input value as it reads it.
#[derive(Debug, Clone, Copy)]
enum Read {
    /// Copies it.
    Plain,
    /// A leaky ReLU with this slope (as [`leaky_relu`]).
    LeakyRelu(f32),
    /// The 8-bit rounding of [`round_to_steps`] with one scale and zero point.
    Steps { scale: f32, zero: f32 },
}

impl Read {
    /// Writes `src` read this way into `dst` (of the same length).
    fn apply(self, src: &[f32], dst: &mut [f32]) {
        match self {
            Self::Plain => dst.copy_from_slice(src),
            // Indexed loops: this crate's own code may be built unoptimised (the dev
            // profile), where iterator adapters cost a call per element.
            Self::LeakyRelu(slope) => {
                let mut c = 0;
                while c < dst.len() {
                    dst[c] = lrelu(src[c], slope);
                    c += 1;
                }
            }
            Self::Steps { scale, zero } => {
                let mut c = 0;
                while c < dst.len() {
                    dst[c] = step(src[c], scale, -zero, 255.0 - zero);
                    c += 1;
                }
            }
        }
    }
}

/// `x` (`[len, cin]`) with `padding` rows of zeros on each side, each value passed through
/// `read`: the input the direct and dot-product convolutions read in place.
fn padded_input(
    x: &Tensor,
    len: usize,
    cin: usize,
    padding: usize,
    read: Read,
) -> Result<Vec<f32>> {
    let mut input = vec![0f32; (len + 2 * padding) * cin];
    with_slice(x, |xs| {
        par_rows(&mut input, cin, |first, chunk| {
            for (r, row) in chunk.chunks_exact_mut(cin).enumerate() {
                let Some(i) = (first + r).checked_sub(padding).filter(|&i| i < len) else {
                    continue;
                };
                read.apply(&xs[i * cin..(i + 1) * cin], row);
            }
        });
        Ok(())
    })?;
    Ok(input)
}

/// A convolution to one output channel with dilation 1 (a HiFi-GAN's last layer): the
/// `taps` input rows output row `t` reads are consecutive in the padded input, so each
/// output is one dot product of `taps × in` floats with the stacked weight, read in
/// place. Unfolded for a matrix product, every input row was copied `taps` times for a
/// product one column wide.
fn conv1d_dot(
    x: &Tensor,
    stacked: &Tensor,
    shape: Conv1dShape,
    dims: (usize, usize, usize),
    bias: Option<&Tensor>,
    read: Read,
    epilogue: Epilogue<'_>,
) -> Result<Tensor> {
    let (len, cin, out_len) = dims;
    let input = padded_input(x, len, cin, shape.padding, read)?;
    let weights = host(stacked)?;
    let bias = match bias.map(host).transpose()?.as_deref() {
        Some(&[b]) => b,
        Some(b) => bail!("conv1d: {} biases for one output channel", b.len()),
        None => 0.0,
    };
    let depth = weights.len();
    if depth != shape.taps * cin || input.len() < (out_len + shape.taps - 1) * cin {
        bail!(
            "conv1d: {depth} weights for {} taps of {cin} channels",
            shape.taps
        )
    }
    let residual = match epilogue {
        Epilogue::Residual(r) => Some(host(r)?),
        _ => None,
    };
    let mut out = vec![0f32; out_len];
    par_rows(&mut out, 1, |first, chunk| {
        for (r, o) in chunk.iter_mut().enumerate() {
            let t = first + r;
            let window = &input[t * cin..t * cin + depth];
            // Eight running sums, so the loop vectorises.
            let mut sums = [0f32; 8];
            let mut w8 = weights.chunks_exact(8);
            let mut x8 = window.chunks_exact(8);
            for (w, x) in (&mut w8).zip(&mut x8) {
                for k in 0..8 {
                    sums[k] += w[k] * x[k];
                }
            }
            let mut y: f32 = sums.iter().sum();
            for (w, x) in w8.remainder().iter().zip(x8.remainder()) {
                y += w * x;
            }
            y += bias;
            *o = match (&residual, epilogue) {
                (Some(rs), _) => y + rs[t],
                (None, Epilogue::LeakyRelu(slope)) => lrelu(y, slope as f32),
                (None, _) => y,
            };
        }
    });
    Tensor::from_vec(out, (out_len, 1), &Device::Cpu)
}

/// [`conv1d_activated`] by [`direct::conv`]: the input is activated and padded once,
/// then each task of rows computes its outputs and applies the epilogue while they are
/// in the caches.
///
/// `dims`: the input's length and channels, and the output's channels and length (as
/// [`conv1d_activated`] checked them).
fn conv1d_direct(
    x: &Tensor,
    stacked: &Tensor,
    shape: Conv1dShape,
    dims: (usize, usize, usize, usize),
    bias: Option<&Tensor>,
    read: Read,
    epilogue: Epilogue<'_>,
) -> Result<Tensor> {
    let (len, cin, out_ch, out_len) = dims;
    let input = padded_input(x, len, cin, shape.padding, read)?;
    let tiled = with_slice(stacked, |w| Ok(direct::tiles(w, out_ch)))?;
    let bias = bias.map(host).transpose()?;
    let ops = direct::Operands {
        input: &input,
        tiled: &tiled,
        bias: bias.as_deref(),
        in_channels: cin,
        out_channels: out_ch,
        taps: shape.taps,
        dilation: shape.dilation,
    };
    let mut out = vec![0f32; out_len * out_ch];
    let run = |residual: Option<&[f32]>, out: &mut [f32]| -> Result<()> {
        let failed = std::sync::atomic::AtomicBool::new(false);
        par_rows(out, out_ch, |first, chunk| {
            if !direct::conv(ops, first, chunk) {
                failed.store(true, std::sync::atomic::Ordering::Relaxed);
                return;
            }
            match (residual, epilogue) {
                (Some(rs), _) => {
                    let (at, n) = (first * out_ch, chunk.len());
                    for (o, r) in chunk.iter_mut().zip(&rs[at..at + n]) {
                        *o += *r;
                    }
                }
                (None, Epilogue::LeakyRelu(slope)) => {
                    let slope = slope as f32;
                    for o in chunk.iter_mut() {
                        *o = lrelu(*o, slope);
                    }
                }
                (None, _) => {}
            }
        });
        if failed.load(std::sync::atomic::Ordering::Relaxed) {
            bail!("conv1d: the direct convolution's operands do not fit together")
        }
        Ok(())
    };
    match epilogue {
        Epilogue::Residual(r) => with_slice(&r.contiguous()?, |rs| run(Some(rs), &mut out))?,
        _ => run(None, &mut out)?,
    }
    Tensor::from_vec(out, (out_len, out_ch), &Device::Cpu)
}

/// Inputs and comparisons for the tests that hold each kernel against its Candle ops.
#[cfg(test)]
pub(crate) mod testing {
    use candle_core::{Device, Tensor};

    /// `n` values in [−scale, scale) from a fixed xorshift sequence, a few exact zeros among
    /// them (the leaky ReLU's and the rounding's edge).
    pub(crate) fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                if i % 97 == 0 {
                    0.0
                } else {
                    ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
                }
            })
            .collect()
    }

    /// A CPU tensor of [`values`].
    pub(crate) fn tensor(shape: &[usize], seed: u64, scale: f32) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_vec(values(n, seed, scale), shape, &Device::Cpu).unwrap()
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(f32::to_bits)
            .collect()
    }

    /// The largest difference between `a` and `b` relative to `b`'s largest magnitude.
    pub(crate) fn relative_difference(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = a
            .iter()
            .zip(&b)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        worst / scale.max(f32::MIN_POSITIVE)
    }

    /// The same shape and bits from a kernel as from the Candle ops it replaces.
    pub(crate) fn same(fused: &Tensor, chain: &Tensor) {
        assert_eq!(fused.dims(), chain.dims());
        let (a, b) = (bits(fused), bits(chain));
        let differ = a.iter().zip(&b).filter(|(a, b)| a != b).count();
        assert_eq!(differ, 0, "{differ} of {} values differ", a.len());
    }
}
