//! VITS inference end to end: text encoder, duration predictor, expansion of the prior to
//! frames, flow and decoder, for a batch of utterances.
//!
//! Everything up to the decoder is masked, so padding a batch changes nothing for any of its
//! utterances. HiFi-GAN is not masked (its convolutions would read the padding's activations
//! near the end of a shorter utterance), so each utterance is decoded on its own: batched
//! output equals unbatched output.

use candle_core::{DType, Device, IndexOp, Result, Tensor};

use super::decoder::Decoder;
use super::duration::DurationPredictor;
use super::encoder::TextEncoder;
use super::error::PiperError;
use super::flow::Flow;
use super::layers::length_mask;
use super::onnx::Weights;
use crate::tts::candle::sample::Rng;

/// One utterance to synthesise and its knobs.
#[derive(Debug, Clone)]
pub(crate) struct Utterance {
    pub(crate) ids: Vec<u32>,
    pub(crate) noise_scale: f32,
    pub(crate) length_scale: f32,
    pub(crate) noise_w: f32,
    pub(crate) speaker: u32,
    pub(crate) seed: u64,
}

/// What one utterance produced, with the intermediate values parity checks compare.
#[derive(Debug, Clone)]
pub(crate) struct Output {
    pub(crate) samples: Vec<f32>,
    pub(crate) durations: Vec<f32>,
    pub(crate) frames: Vec<u32>,
    /// `[channels][phonemes]`.
    pub(crate) encoder: Vec<Vec<f32>>,
    pub(crate) m_p: Vec<Vec<f32>>,
}

/// A loaded Piper (VITS) voice.
#[derive(Debug, Clone)]
pub(crate) struct Vits {
    enc_p: TextEncoder,
    dp: DurationPredictor,
    flow: Flow,
    dec: Decoder,
    /// The speaker embedding of multi-speaker voices, `[speakers, channels]`.
    emb_g: Option<Tensor>,
    /// Channels of the prior (and latent).
    channels: usize,
    device: Device,
    dtype: DType,
}

impl Vits {
    pub(crate) fn load(
        w: &Weights,
        device: &Device,
        dtype: DType,
    ) -> std::result::Result<Self, PiperError> {
        let enc_p = TextEncoder::load(w)?;
        let channels = w.get("enc_p.proj.weight")?.dim(0)? / 2;
        let hidden = w.get("enc_p.emb.weight")?.dim(1)?;
        let emb_g = if w.contains("emb_g.weight") {
            Some(w.get("emb_g.weight")?)
        } else {
            None
        };
        let speaker_channels = match &emb_g {
            Some(e) => Some(e.dim(1)?),
            None => None,
        };
        Ok(Self {
            enc_p,
            dp: DurationPredictor::load(w, hidden, speaker_channels)?,
            flow: Flow::load(w, channels, speaker_channels)?,
            dec: Decoder::load(w, channels, speaker_channels)?,
            emb_g,
            channels,
            device: device.clone(),
            dtype,
        })
    }

    /// Rows of the text embedding.
    pub(crate) fn vocab(&self) -> usize {
        self.enc_p.vocab()
    }

    /// Speakers in the speaker embedding (1 for single-speaker voices).
    pub(crate) fn speakers(&self) -> usize {
        self.emb_g.as_ref().and_then(|e| e.dim(0).ok()).unwrap_or(1)
    }

    /// Samples per latent frame.
    pub(crate) fn hop(&self) -> usize {
        self.dec.hop()
    }

    /// Runs a batch of utterances; `Err` fails the whole batch (a tensor error is a bug or a
    /// device failure, not a property of one request).
    pub(crate) fn infer(&self, batch: &[Utterance]) -> Result<Vec<Output>> {
        let b = batch.len();
        let t = batch.iter().map(|u| u.ids.len()).max().unwrap_or(0);
        if b == 0 || t == 0 {
            return Ok(Vec::new());
        }
        let dev = &self.device;
        let lengths: Vec<usize> = batch.iter().map(|u| u.ids.len()).collect();
        let mut ids = vec![0u32; b * t];
        for (row, u) in batch.iter().enumerate() {
            ids[row * t..row * t + u.ids.len()].copy_from_slice(&u.ids);
        }
        let ids = Tensor::from_vec(ids, (b, t), dev)?;
        let x_mask = length_mask(&lengths, t, self.dtype, dev)?;
        let enc = self.enc_p.forward(&ids, &x_mask)?;

        let g = match &self.emb_g {
            Some(emb) => {
                let sids: Vec<u32> = batch.iter().map(|u| u.speaker).collect();
                let sids = Tensor::from_vec(sids, b, dev)?;
                Some(emb.index_select(&sids, 0)?.unsqueeze(2)?)
            }
            None => None,
        };

        // Each utterance draws its noise from its own seed, so batching changes nothing.
        let mut rngs: Vec<Rng> = batch.iter().map(|u| Rng::new(u.seed)).collect();
        let mut dp_noise = vec![0f32; b * 2 * t];
        for (row, (u, rng)) in batch.iter().zip(&mut rngs).enumerate() {
            if u.noise_w > 0.0 {
                for ch in 0..2 {
                    for v in &mut dp_noise[(row * 2 + ch) * t..(row * 2 + ch) * t + u.ids.len()] {
                        *v = normal(rng) * u.noise_w;
                    }
                }
            }
        }
        let dp_noise = Tensor::from_vec(dp_noise, (b, 2, t), dev)?.to_dtype(self.dtype)?;
        let logw = self
            .dp
            .reverse(&enc.hidden, &x_mask, g.as_ref(), &dp_noise)?;
        let scales: Vec<f32> = batch.iter().map(|u| u.length_scale).collect();
        let scales = Tensor::from_vec(scales, (b, 1, 1), dev)?;
        // Durations in f32 whatever the model's precision: half precision would move the
        // rounding up to whole frames, and so the length of the audio.
        let w = logw
            .to_dtype(DType::F32)?
            .exp()?
            .broadcast_mul(&x_mask.to_dtype(DType::F32)?)?
            .broadcast_mul(&scales)?;
        let durations: Vec<Vec<f32>> = w.squeeze(1)?.to_vec2()?;
        let frames: Vec<Vec<f32>> = w.ceil()?.squeeze(1)?.to_vec2()?;

        // Expand the prior: frame f of utterance b takes phoneme i's statistics for as many
        // frames as its rounded duration (VITS's monotonic path, as an index).
        let mut y_lengths = Vec::with_capacity(b);
        let mut frame_index = Vec::with_capacity(b);
        for (row, u) in batch.iter().enumerate() {
            let mut index = Vec::new();
            for (i, &f) in frames[row][..u.ids.len()].iter().enumerate() {
                index.extend(std::iter::repeat_n(i as u32, f as usize));
            }
            y_lengths.push(index.len().max(1));
            frame_index.push(index);
        }
        let t_y = y_lengths.iter().copied().max().unwrap_or(1);
        let y_mask = length_mask(&y_lengths, t_y, self.dtype, dev)?;
        let mut priors = Vec::with_capacity(b);
        for (row, (index, rng)) in frame_index.iter().zip(&mut rngs).enumerate() {
            let u = &batch[row];
            let n = index.len();
            let mut padded = index.clone();
            padded.resize(t_y, 0);
            let index = Tensor::from_vec(padded, t_y, dev)?;
            let m = enc.m_p.i(row)?.index_select(&index, 1)?;
            let logs = enc.logs_p.i(row)?.index_select(&index, 1)?;
            let mut z = m;
            if u.noise_scale > 0.0 {
                let mut noise = vec![0f32; self.channels * t_y];
                for ch in 0..self.channels {
                    for v in &mut noise[ch * t_y..ch * t_y + n] {
                        *v = normal(rng) * u.noise_scale;
                    }
                }
                let noise =
                    Tensor::from_vec(noise, (self.channels, t_y), dev)?.to_dtype(self.dtype)?;
                z = (z + (noise * logs.exp()?)?)?;
            }
            priors.push(z);
        }
        let z_p = Tensor::stack(&priors, 0)?.broadcast_mul(&y_mask)?;
        let z = self
            .flow
            .reverse(&z_p, &y_mask, &y_lengths, g.as_ref())?
            .broadcast_mul(&y_mask)?;

        let hop = self.dec.hop();
        let mut outputs = Vec::with_capacity(b);
        for (row, u) in batch.iter().enumerate() {
            let n = u.ids.len();
            let z_b = z.i(row..row + 1)?.narrow(2, 0, y_lengths[row])?;
            let g_b = match &g {
                Some(g) => Some(g.i(row..row + 1)?),
                None => None,
            };
            let audio = self.dec.forward(&z_b, g_b.as_ref())?;
            let samples = audio
                .flatten_all()?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?;
            debug_assert_eq!(samples.len(), y_lengths[row] * hop);
            let channels_of = |x: &Tensor| -> Result<Vec<Vec<f32>>> {
                x.i(row)?.narrow(1, 0, n)?.to_dtype(DType::F32)?.to_vec2()
            };
            outputs.push(Output {
                samples,
                durations: durations[row][..n].to_vec(),
                frames: frames[row][..n].iter().map(|&f| f as u32).collect(),
                encoder: channels_of(&enc.hidden)?,
                m_p: channels_of(&enc.m_p)?,
            });
        }
        Ok(outputs)
    }
}

/// A standard normal draw (Box–Muller) from the seeded generator.
fn normal(rng: &mut Rng) -> f32 {
    let u1 = rng.next_f64().max(f64::MIN_POSITIVE);
    let u2 = rng.next_f64();
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}
