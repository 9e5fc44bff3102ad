//! The DAC codec's decoding half: audio codes in, PCM out.
//!
//! candle's `dac::Model` fixes every layer size to the 44.1 kHz DAC and always builds the
//! encoder too, which text-to-speech never runs. We assemble the quantizer and decoder from
//! candle's public blocks instead, sized from the config, so a real checkpoint loads the same
//! tensors while tests can run a codec a thousand times smaller.
//!
//! The decoder's upsampling blocks are ours rather than candle's `dac::DecoderBlock`: candle
//! computes a transposed convolution's output length as `(len - 1) * stride - 2 * padding + ...`
//! in `usize`, which underflows (a panic in debug builds) on a one-frame input. We run the
//! transposed convolution unpadded and crop `padding` samples from each end, which is what
//! padding means for a transposed convolution, so one frame decodes exactly as the
//! reference decodes it. The decoder also ends with the reference's `tanh`, which candle's
//! `dac::Decoder` omits.

use candle_core::{D, DType, Device, Module, Result, Tensor};
use candle_nn::{Conv1d, Conv1dConfig, ConvTranspose1d, ConvTranspose1dConfig, VarBuilder};
use candle_transformers::models::{dac, encodec};

use super::config::CodecConfig;

/// Residual vector quantizer + convolutional decoder.
#[derive(Debug, Clone)]
pub(crate) struct Codec {
    quantizer: dac::ResidualVectorQuantizer,
    decoder: Decoder,
    hop_length: usize,
    num_codebooks: usize,
}

impl Codec {
    /// Loads the codebooks the decoder generates for (the first `num_codebooks` of the
    /// codec's) and the decoder, from `audio_encoder.model.*`.
    pub(crate) fn new(cfg: &CodecConfig, num_codebooks: usize, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("model");
        let quantizer = dac::ResidualVectorQuantizer::new(
            cfg.latent_dim,
            num_codebooks,
            cfg.codebook_size,
            cfg.codebook_dim,
            vb.pp("quantizer"),
        )?;
        let decoder = Decoder::new(
            cfg.latent_dim,
            cfg.decoder_dim,
            &cfg.decoder_rates,
            vb.pp("decoder"),
        )?;
        Ok(Self {
            quantizer,
            decoder,
            hop_length: cfg.hop_length(),
            num_codebooks,
        })
    }

    /// Audio samples per frame.
    pub(crate) fn hop_length(&self) -> usize {
        self.hop_length
    }

    /// Decodes frames (each one code per codebook, all inside the codebook range) to mono
    /// samples, `frames.len() * hop_length` of them.
    pub(crate) fn decode(&self, frames: &[Vec<u32>], device: &Device) -> Result<Vec<f32>> {
        if frames.is_empty() {
            return Ok(Vec::new());
        }
        let t = frames.len();
        let k = self.num_codebooks;
        let mut codes = vec![0_u32; k * t];
        for (step, frame) in frames.iter().enumerate() {
            for (cb, &code) in frame.iter().enumerate().take(k) {
                codes[cb * t + step] = code;
            }
        }
        let codes = Tensor::from_vec(codes, (1, k, t), device)?;
        let latents = self.quantizer.from_codes(&codes)?;
        let audio = self.decoder.forward(&latents)?;
        let mut samples = audio
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        // Even strides (checked with the config) give exactly this many; never more.
        samples.truncate(t * self.hop_length);
        Ok(samples)
    }
}

/// An upsampling block of the DAC decoder (`decoder.model.{1..=rates}`): snake, transposed
/// convolution, three dilated residual units.
#[derive(Debug, Clone)]
struct DecoderBlock {
    snake: dac::Snake1d,
    /// Built without padding; [`Self::crop`] samples are cut from each end instead.
    upsample: ConvTranspose1d,
    crop: usize,
    residuals: [dac::ResidualUnit; 3],
}

impl DecoderBlock {
    fn new(in_dim: usize, out_dim: usize, stride: usize, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("block");
        let config = ConvTranspose1dConfig {
            stride,
            padding: 0,
            ..Default::default()
        };
        Ok(Self {
            snake: dac::Snake1d::new(in_dim, vb.pp(0))?,
            upsample: encodec::conv_transpose1d_weight_norm(
                in_dim,
                out_dim,
                2 * stride,
                true,
                config,
                vb.pp(1),
            )?,
            crop: stride.div_ceil(2),
            residuals: [
                dac::ResidualUnit::new(out_dim, 1, vb.pp(2))?,
                dac::ResidualUnit::new(out_dim, 3, vb.pp(3))?,
                dac::ResidualUnit::new(out_dim, 9, vb.pp(4))?,
            ],
        })
    }
}

impl Module for DecoderBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let ys = xs.apply(&self.snake)?.apply(&self.upsample)?;
        let len = ys.dim(D::Minus1)?;
        let mut ys = ys.narrow(D::Minus1, self.crop, len - 2 * self.crop)?;
        for unit in &self.residuals {
            ys = ys.apply(unit)?;
        }
        Ok(ys)
    }
}

/// The DAC decoder (`decoder.model.*`): convolution, upsampling blocks, snake, convolution,
/// tanh; mono output.
#[derive(Debug, Clone)]
struct Decoder {
    conv_in: Conv1d,
    blocks: Vec<DecoderBlock>,
    snake: dac::Snake1d,
    conv_out: Conv1d,
}

impl Decoder {
    fn new(latent_dim: usize, channels: usize, rates: &[usize], vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("model");
        let same = Conv1dConfig {
            padding: 3,
            ..Default::default()
        };
        let conv_in = encodec::conv1d_weight_norm(latent_dim, channels, 7, same, vb.pp(0))?;
        let mut dim = channels;
        let mut blocks = Vec::with_capacity(rates.len());
        for (i, &stride) in rates.iter().enumerate() {
            blocks.push(DecoderBlock::new(dim, dim / 2, stride, vb.pp(i + 1))?);
            dim /= 2;
        }
        let snake = dac::Snake1d::new(dim, vb.pp(rates.len() + 1))?;
        let conv_out = encodec::conv1d_weight_norm(dim, 1, 7, same, vb.pp(rates.len() + 2))?;
        Ok(Self {
            conv_in,
            blocks,
            snake,
            conv_out,
        })
    }
}

impl Module for Decoder {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = xs.apply(&self.conv_in)?;
        for block in &self.blocks {
            xs = xs.apply(block)?;
        }
        xs.apply(&self.snake)?.apply(&self.conv_out)?.tanh()
    }
}
