//! Kokoro's iSTFTNet decoder: from the aligned text features, F0 and energy curves and the
//! voice's timbre style (the first 128 values of its style row), 24 kHz audio.
//!
//! Four AdaIN residual blocks (the last doubling the frame rate) turn the features into 512
//! channels; the generator then upsamples ×10 and ×6 with transposed convolutions, each time
//! adding a harmonic source — sines at the F0 and its overtones (`SineGen`), merged by a
//! linear layer, taken through an STFT and convolved down to the current rate — and averaging
//! three snake-activated AdaIN resblocks. A convolution gives an 11-bin magnitude and phase
//! per hop of 5 samples, and an inverse STFT makes the waveform.
//!
//! The STFT and the inverse STFT are convolutions with a Hann-windowed Fourier basis (the
//! inverse a transposed convolution, whose overlap-add is the inverse transform's); phase is
//! `atan2(imag, real)`, computed on the host because Candle has no arctangent. The export has
//! no noise source, so the decoder is deterministic. Instance norms span a whole utterance,
//! so a batch runs item by item.

use std::f64::consts::PI;

use candle_core::{D, DType, Device, Result, Tensor};

use super::error::KokoroError;
use super::layers::{Conv, fake_quant, leaky_relu};
use super::prosody::{AdaIn, AdainResBlock};
use super::weights::Weights;
use crate::tts::candle::fused::Epilogue;
use crate::tts::candle::time_major::{self, Polyphase};

const SAMPLE_RATE: f64 = 24_000.0;
const N_FFT: usize = 20;
const HOP: usize = 5;
const BINS: usize = N_FFT / 2 + 1;
const HARMONICS: usize = 9;
/// Samples per F0 value: the generator's two upsamplings (10 × 6) times the hop.
const UPSAMPLE: usize = 300;
const SINE_AMP: f64 = 0.1;
const VOICED: f64 = 10.0;

/// The periodic Hann window of the STFT.
fn window() -> Vec<f32> {
    (0..N_FFT)
        .map(|n| (0.5 - 0.5 * (2.0 * PI * n as f64 / N_FFT as f64).cos()) as f32)
        .collect()
}

/// StyleTTS 2's `AdaINResBlock1`: three dilated convolution pairs, each input normalised by
/// AdaIN and passed through a snake activation, added back to the input.
#[derive(Debug, Clone)]
struct SnakeResBlock {
    layers: Vec<SnakeLayer>,
}

#[derive(Debug, Clone)]
struct SnakeLayer {
    adain1: AdaIn,
    adain2: AdaIn,
    conv1: Conv,
    conv2: Conv,
    alpha1: Tensor,
    alpha2: Tensor,
}

impl SnakeResBlock {
    fn load(
        weights: &Weights,
        module: &str,
        channels: usize,
        quantised: bool,
    ) -> std::result::Result<Self, KokoroError> {
        let layers = (0..3)
            .map(|j| {
                Ok(SnakeLayer {
                    adain1: AdaIn::load(
                        weights,
                        &format!("{module}.adain1.{j}"),
                        channels,
                        quantised,
                    )?,
                    adain2: AdaIn::load(
                        weights,
                        &format!("{module}.adain2.{j}"),
                        channels,
                        quantised,
                    )?,
                    conv1: Conv::load(
                        weights,
                        &format!("{module}.convs1.{j}"),
                        &format!("{module}.convs1.{j}.bias"),
                        quantised,
                    )?
                    .with_taps()?,
                    conv2: Conv::load(
                        weights,
                        &format!("{module}.convs2.{j}"),
                        &format!("{module}.convs2.{j}.bias"),
                        quantised,
                    )?
                    .with_taps()?,
                    alpha1: weights
                        .shaped(&format!("{module}.alpha1.{j}"), &[1, channels, 1])?
                        .reshape((1, channels))?,
                    alpha2: weights
                        .shaped(&format!("{module}.alpha2.{j}"), &[1, channels, 1])?
                        .reshape((1, channels))?,
                })
            })
            .collect::<std::result::Result<Vec<_>, KokoroError>>()?;
        Ok(Self { layers })
    }

    /// On one utterance's time-major signal (`[samples, channels]`): few channels over many
    /// samples, where one matrix product per kernel tap beats im2col.
    fn forward(&self, x: &Tensor, style: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for l in &self.layers {
            // Each AdaIN is followed by its snake activation `x + sin²(αx) / α`.
            let (t, range) = l.adain1.forward_time_major(&x, style, Some(&l.alpha1))?;
            let t = l.conv1.forward_time_major_in(&t, range, Epilogue::None)?;
            let (t, range) = l.adain2.forward_time_major(&t, style, Some(&l.alpha2))?;
            x = l
                .conv2
                .forward_time_major_in(&t, range, Epilogue::Residual(&x))?;
        }
        Ok(x)
    }
}

/// The Fourier bases of the STFT and its inverse, on the device.
#[derive(Debug, Clone)]
struct Stft {
    /// `[2 × bins, 1, n_fft]`: windowed cos and −sin rows, for a strided convolution.
    forward: Tensor,
    /// `[2 × bins, 1, n_fft]`: the inverse real DFT's rows times the window, for a transposed
    /// convolution (overlap-add).
    inverse: Tensor,
    /// The squared window, by which the export normalises the inverse's first samples.
    window_sq: Vec<f32>,
}

impl Stft {
    fn new(device: &Device) -> Result<Self> {
        let win = window();
        let mut forward = vec![0f32; 2 * BINS * N_FFT];
        let mut inverse = vec![0f32; 2 * BINS * N_FFT];
        for k in 0..BINS {
            // Bins 0 and n/2 appear once in the inverse real DFT, the others twice.
            let weight = if k == 0 || k == BINS - 1 { 1.0 } else { 2.0 };
            for n in 0..N_FFT {
                let angle = 2.0 * PI * (k * n) as f64 / N_FFT as f64;
                let w = f64::from(win[n]);
                forward[k * N_FFT + n] = (w * angle.cos()) as f32;
                forward[(BINS + k) * N_FFT + n] = (-w * angle.sin()) as f32;
                inverse[k * N_FFT + n] = (w * weight * angle.cos() / N_FFT as f64) as f32;
                inverse[(BINS + k) * N_FFT + n] = (-w * weight * angle.sin() / N_FFT as f64) as f32;
            }
        }
        let window_sq: Vec<f32> = win.iter().map(|w| w * w).collect();
        Ok(Self {
            forward: Tensor::from_vec(forward, (2 * BINS, 1, N_FFT), device)?,
            inverse: Tensor::from_vec(inverse, (2 * BINS, 1, N_FFT), device)?,
            window_sq,
        })
    }

    /// Magnitude and phase (`[1, 2 × bins, frames]`) of `x` (`[1, 1, samples]`), centred
    /// frames (reflection padding of n_fft / 2) as `torch.stft(center=True)`.
    fn transform(&self, x: &Tensor) -> Result<Tensor> {
        let x = reflect_pad(x, N_FFT / 2, N_FFT / 2)?;
        let spec = x.conv1d(&self.forward, 0, HOP, 1, 1)?;
        let re = spec.narrow(1, 0, BINS)?;
        let im = spec.narrow(1, BINS, BINS)?;
        let magnitude = (re.sqr()? + im.sqr()?)?.sqrt()?;
        let phase = atan2(&im, &re)?;
        Tensor::cat(&[magnitude, phase], 1)
    }

    /// The waveform (`[1, 1, (frames − 1) × hop]`) of magnitude and phase (`[1, bins, frames]`
    /// each): the overlap-add of the inverse real DFT's windowed frames, centre-trimmed.
    ///
    /// The export's traced inverse STFT divides by the window's overlap only where its
    /// tracing saw one frame (the first n_fft samples, by `window²`) and nowhere else; this
    /// does the same, so the waveform is ONNX Runtime's. Inside, that is 1.5 times the
    /// textbook inverse (the overlap of Hann² windows at a quarter-window hop).
    fn inverse(&self, magnitude: &Tensor, phase: &Tensor) -> Result<Tensor> {
        let frames = magnitude.dim(2)?;
        let re = (magnitude * phase.cos()?)?;
        let im = (magnitude * phase.sin()?)?;
        let spec = Tensor::cat(&[re, im], 1)?;
        let signal = spec.conv_transpose1d(&self.inverse, 0, 0, HOP, 1, 1)?;
        let total = signal.dim(2)?;
        let norm: Vec<f32> = (0..total)
            .map(|i| match self.window_sq.get(i) {
                Some(&w) if w > f32::MIN_POSITIVE => 1.0 / w,
                _ => 1.0,
            })
            .collect();
        let norm = Tensor::from_vec(norm, (1, 1, total), magnitude.device())?;
        let len = (frames - 1) * HOP;
        signal.broadcast_mul(&norm)?.narrow(2, N_FFT / 2, len)
    }
}

/// One utterance `[1, channels, len]` as a contiguous time-major `[len, channels]`.
fn channels_last(x: &Tensor) -> Result<Tensor> {
    x.squeeze(0)?.t()?.contiguous()
}

/// `atan2(y, x)` element-wise, on the host.
fn atan2(y: &Tensor, x: &Tensor) -> Result<Tensor> {
    let shape = y.dims().to_vec();
    let ys: Vec<f32> = y.flatten_all()?.to_vec1()?;
    let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let out: Vec<f32> = ys.iter().zip(&xs).map(|(y, x)| y.atan2(*x)).collect();
    Tensor::from_vec(out, shape, y.device())
}

/// Reflection padding of the last dimension (`[.., len]`), as `torch.nn.ReflectionPad1d`.
fn reflect_pad(x: &Tensor, left: usize, right: usize) -> Result<Tensor> {
    let len = x.dim(D::Minus1)?;
    let mut index: Vec<u32> = Vec::with_capacity(len + left + right);
    index.extend((1..=left).rev().map(|i| i.min(len - 1) as u32));
    index.extend((0..len).map(|i| i as u32));
    index.extend((0..right).map(|i| (len - 2 - i.min(len - 2)) as u32));
    let index = Tensor::from_vec(index, len + left + right, x.device())?;
    x.index_select(&index, x.rank() - 1)
}

/// The decoder (`decoder.decoder`).
#[derive(Debug, Clone)]
pub(crate) struct Decoder {
    f0_conv: Conv,
    n_conv: Conv,
    asr_res: Conv,
    encode: AdainResBlock,
    decode: Vec<AdainResBlock>,
    source_weight: Tensor,
    source_bias: Tensor,
    noise_convs: Vec<Conv>,
    noise_res: Vec<SnakeResBlock>,
    ups: Vec<Polyphase>,
    resblocks: Vec<SnakeResBlock>,
    conv_post: Conv,
    stft: Stft,
    quantised: bool,
}

impl Decoder {
    pub(crate) fn load(
        weights: &Weights,
        device: &Device,
        quantised: bool,
    ) -> std::result::Result<Self, KokoroError> {
        let d = "decoder.decoder";
        let g = "decoder.decoder.generator";
        let block = |name: &str, dims: (usize, usize), up: bool| {
            AdainResBlock::load(
                weights,
                &format!("{d}.{name}"),
                &format!("{d}.{name}"),
                dims,
                up,
                quantised,
            )
        };
        let conv = |module: String, bias: String| Conv::load(weights, &module, &bias, quantised);
        // The generator's upsamplers: transposed convolutions with float weights, run
        // time-major in their polyphase form.
        let up = |i: usize| -> std::result::Result<Polyphase, KokoroError> {
            let module = format!("{g}.ups.{i}");
            let attrs = weights.conv(&module);
            Ok(time_major::polyphase(
                &weights.get(&format!("{module}.weight"))?,
                Some(&weights.get(&format!("{module}.bias"))?),
                attrs.map_or(1, |a| a.stride),
                attrs.map_or(0, |a| a.padding),
            )?)
        };
        Ok(Self {
            f0_conv: conv(format!("{d}.F0_conv"), format!("{d}.F0_conv.bias"))?,
            n_conv: conv(format!("{d}.N_conv"), format!("{d}.N_conv.bias"))?,
            asr_res: conv(
                format!("{d}.asr_res.asr_res.0"),
                format!("{d}.asr_res.0.bias"),
            )?,
            encode: block("encode", (514, 1024), false)?,
            decode: vec![
                block("decode.0", (1090, 1024), false)?,
                block("decode.1", (1090, 1024), false)?,
                block("decode.2", (1090, 1024), false)?,
                block("decode.3", (1090, 512), true)?,
            ],
            source_weight: weights
                .shaped(&format!("{g}.m_source.l_linear.weight"), &[1, HARMONICS])?,
            source_bias: weights.shaped(&format!("{g}.m_source.l_linear.bias"), &[1])?,
            noise_convs: vec![
                conv(
                    format!("{g}.noise_convs.0"),
                    format!("{g}.noise_convs.0.bias"),
                )?,
                conv(
                    format!("{g}.noise_convs.1"),
                    format!("{g}.noise_convs.1.bias"),
                )?,
            ],
            noise_res: vec![
                SnakeResBlock::load(weights, &format!("{g}.noise_res.0"), 256, quantised)?,
                SnakeResBlock::load(weights, &format!("{g}.noise_res.1"), 128, quantised)?,
            ],
            ups: vec![up(0)?, up(1)?],
            resblocks: (0..6)
                .map(|i| {
                    SnakeResBlock::load(
                        weights,
                        &format!("{g}.resblocks.{i}"),
                        if i < 3 { 256 } else { 128 },
                        quantised,
                    )
                })
                .collect::<std::result::Result<Vec<_>, KokoroError>>()?,
            conv_post: Conv::load(
                weights,
                &format!("{g}.conv_post"),
                &format!("{g}.conv_post.bias"),
                false,
            )?
            .with_taps()?,
            stft: Stft::new(device)?,
            quantised,
        })
    }

    /// One utterance: `asr` (`[1, 512, frames]`, the text encoder's output spread over the
    /// frames), `f0` and `energy` (`[1, 2 × frames]`), the timbre style (`[1, 128]`): the
    /// waveform, `[600 × frames]` samples.
    pub(crate) fn forward(
        &self,
        asr: &Tensor,
        f0: &Tensor,
        energy: &Tensor,
        style: &Tensor,
    ) -> Result<Tensor> {
        let style = if self.quantised {
            fake_quant(style, None)?
        } else {
            style.clone()
        };
        let f0_down = self.f0_conv.forward(&f0.unsqueeze(1)?, None)?;
        let n_down = self.n_conv.forward(&energy.unsqueeze(1)?, None)?;
        let mut x = Tensor::cat(&[asr, &f0_down, &n_down], 1)?;
        x = self.encode.forward(&x, &style)?;
        let asr_res = self.asr_res.forward(asr, None)?;
        for block in &self.decode {
            // Every block, the last (upsampling) one included, reads the residual inputs too.
            x = Tensor::cat(&[&x, &asr_res, &f0_down, &n_down], 1)?;
            x = block.forward(&x, &style)?;
        }
        self.generate(&x, &style, f0)
    }

    /// The harmonic source: `[1, 1, samples]`.
    fn source(&self, f0: &Tensor) -> Result<Tensor> {
        let device = f0.device();
        let frames = f0.dim(1)?;
        let harmonics: Vec<f32> = (1..=HARMONICS).map(|h| h as f32).collect();
        let harmonics = Tensor::from_vec(harmonics, (HARMONICS, 1), device)?;
        // Phase advance per sample of each harmonic, in turns, wrapped to [0, 1); constant
        // over a frame's 300 samples, so its frame-rate average is the value itself.
        let rad = (harmonics.broadcast_mul(f0)? / SAMPLE_RATE)?;
        let rad = (&rad - rad.floor()?)?;
        let phase = (rad.cumsum(1)? * (2.0 * PI * UPSAMPLE as f64))?;
        let phase = linear_upsample(&phase, UPSAMPLE)?;
        let voiced = f0
            .gt(VOICED)?
            .to_dtype(DType::F32)?
            .unsqueeze(0)?
            .upsample_nearest1d(frames * UPSAMPLE)?;
        let sines = (phase.sin()? * SINE_AMP)?.broadcast_mul(&voiced.reshape((1, ()))?)?;
        let merged = self
            .source_weight
            .matmul(&sines)?
            .broadcast_add(&self.source_bias.reshape((1, 1))?)?
            .tanh()?;
        merged.reshape((1, 1, ()))
    }

    fn generate(&self, x: &Tensor, style: &Tensor, f0: &Tensor) -> Result<Tensor> {
        let source = self.source(f0)?;
        let har = self.stft.transform(&source)?;
        // Time-major (`[samples, channels]`) from here to the last convolution: the
        // upsamplers and residual blocks all run that way; the source's strided
        // convolutions run channel-major and are turned once each.
        let mut x = channels_last(x)?;
        for (i, up) in self.ups.iter().enumerate() {
            let x_source = self.noise_convs[i].forward(&har, None)?;
            let mut y = up.forward(&x, Some(0.1))?;
            if i + 1 == self.ups.len() {
                // Reflection padding of one sample at the start: sample 1 again.
                y = Tensor::cat(&[&y.narrow(0, 1, 1)?, &y], 0)?;
            }
            let x_source = self.noise_res[i].forward(&channels_last(&x_source)?, style)?;
            let xt = (y + x_source)?;
            let mut sum: Option<Tensor> = None;
            for j in 0..3 {
                let y = self.resblocks[i * 3 + j].forward(&xt, style)?;
                sum = Some(match sum {
                    Some(s) => (s + y)?,
                    None => y,
                });
            }
            x = match sum {
                Some(s) => (s / 3.0)?,
                None => xt,
            };
        }
        let x = leaky_relu(&x, 0.01)?;
        // [samples, 2 × bins] → [1, 2 × bins, samples]
        let x = self
            .conv_post
            .forward_time_major(&x, Epilogue::None)?
            .t()?
            .contiguous()?
            .unsqueeze(0)?;
        let magnitude = x.narrow(1, 0, BINS)?.exp()?;
        let phase = x.narrow(1, BINS, BINS)?.sin()?;
        self.stft.inverse(&magnitude, &phase)?.flatten_all()
    }
}

/// Linear interpolation of `[channels, len]` to `factor ×` the length with half-pixel
/// centres (PyTorch's `interpolate(mode="linear", align_corners=False)`).
fn linear_upsample(x: &Tensor, factor: usize) -> Result<Tensor> {
    let len = x.dim(1)?;
    let out = len * factor;
    let mut lo = Vec::with_capacity(out);
    let mut hi = Vec::with_capacity(out);
    let mut w = Vec::with_capacity(out);
    for j in 0..out {
        let pos = ((j as f64 + 0.5) / factor as f64 - 0.5).clamp(0.0, (len - 1) as f64);
        let i0 = pos.floor() as usize;
        lo.push(i0 as u32);
        hi.push((i0 + 1).min(len - 1) as u32);
        w.push((pos - i0 as f64) as f32);
    }
    let device = x.device();
    let lo = Tensor::from_vec(lo, out, device)?;
    let hi = Tensor::from_vec(hi, out, device)?;
    let w = Tensor::from_vec(w, (1, out), device)?;
    let a = x.index_select(&lo, 1)?;
    let b = x.index_select(&hi, 1)?;
    a.broadcast_mul(&(w.ones_like()? - &w)?)? + b.broadcast_mul(&w)?
}
