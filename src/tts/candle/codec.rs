//! The DAC codec's decoding half: audio codes in, PCM out.
//!
//! candle's `dac::Model` fixes every layer size to the 44.1 kHz DAC and always builds the
//! encoder too, which text-to-speech never runs. We assemble the quantizer and decoder from
//! candle's public blocks instead, sized from the config, so a real checkpoint loads the same
//! tensors while tests can run a codec a thousand times smaller.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::dac;

use super::config::CodecConfig;

/// Residual vector quantizer + convolutional decoder.
#[derive(Debug, Clone)]
pub(crate) struct Codec {
    quantizer: dac::ResidualVectorQuantizer,
    decoder: dac::Decoder,
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
        let decoder = dac::Decoder::new(
            cfg.latent_dim,
            cfg.decoder_dim,
            &cfg.decoder_rates,
            1,
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
        // candle's DAC overflows on a one-frame input; decode the frame twice and keep the
        // first half (the convolutions' receptive field makes it differ from a true
        // one-frame decode only at the edge).
        let n = frames.len();
        let t = n.max(2);
        let k = self.num_codebooks;
        let mut codes = vec![0_u32; k * t];
        for step in 0..t {
            let frame = &frames[step.min(n - 1)];
            for (cb, &code) in frame.iter().enumerate().take(k) {
                codes[cb * t + step] = code;
            }
        }
        let codes = Tensor::from_vec(codes, (1, k, t), device)?;
        let latents = self.quantizer.from_codes(&codes)?;
        // The reference DAC ends its decoder with a tanh that candle's `dac::Decoder` omits.
        let audio = self.decoder.forward(&latents)?.tanh()?;
        let mut samples = audio
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        samples.truncate(n * self.hop_length);
        Ok(samples)
    }
}
