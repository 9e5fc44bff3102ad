//! Kokoro end to end for one utterance: phoneme ids and a voice's style row to audio.

use candle_core::{DType, Device, Result, Tensor};

use super::albert::Albert;
use super::decoder::Decoder;
use super::error::KokoroError;
use super::predictor::{DurationPredictor, STYLE};
use super::prosody::PitchEnergy;
use super::text_encoder::TextEncoder;
use super::weights::Weights;

/// Every stage of Kokoro, loaded.
#[derive(Debug, Clone)]
pub(crate) struct Kokoro {
    albert: Albert,
    text_encoder: TextEncoder,
    durations: DurationPredictor,
    prosody: PitchEnergy,
    decoder: Decoder,
    device: Device,
}

/// What one utterance gives: the audio and the durations behind it.
#[derive(Debug, Clone)]
pub(crate) struct Utterance {
    /// 24 kHz samples.
    pub(crate) audio: Vec<f32>,
    /// Each id's duration in frames before rounding (speed applied).
    pub(crate) durations: Vec<f32>,
    /// Each id's frames after rounding (at least 1); a frame is 600 samples.
    pub(crate) frames: Vec<u32>,
}

impl Kokoro {
    /// All stages from `weights`; `quantised` rounds layer inputs through 8 bits as the int8
    /// export does.
    pub(crate) fn load(
        weights: &Weights,
        device: &Device,
        quantised: bool,
    ) -> std::result::Result<Self, KokoroError> {
        Ok(Self {
            albert: Albert::load(weights, quantised)?,
            text_encoder: TextEncoder::load(weights, quantised)?,
            durations: DurationPredictor::load(weights, quantised)?,
            prosody: PitchEnergy::load(weights, quantised)?,
            decoder: Decoder::load(weights, device, quantised)?,
            device: device.clone(),
        })
    }

    /// How many phoneme ids the embeddings know.
    pub(crate) fn vocab(&self) -> usize {
        self.albert.vocab()
    }

    /// The longest input (pads included) PL-BERT's positions cover.
    pub(crate) fn max_len(&self) -> usize {
        self.albert.max_len()
    }

    /// `ids` (pads included), the voice's style row (256 values: timbre, then prosody) and
    /// the speed (durations are divided by it).
    pub(crate) fn infer(&self, ids: &[u32], style: &[f32], speed: f32) -> Result<Utterance> {
        self.infer_aligned(ids, style, speed, None)
    }

    /// [`infer`](Self::infer), with each id's frames given instead of predicted when
    /// `frames` is set (a parity check holds the alignment to the reference's).
    pub(crate) fn infer_aligned(
        &self,
        ids: &[u32],
        style: &[f32],
        speed: f32,
        given: Option<&[u32]>,
    ) -> Result<Utterance> {
        let len = ids.len();
        let dev = &self.device;
        let ids_t = Tensor::from_vec(ids.to_vec(), (1, len), dev)?;
        let valid = Tensor::ones((1, len), DType::F32, dev)?;
        let style = Tensor::from_vec(style.to_vec(), (1, 2 * STYLE), dev)?;
        let timbre = style.narrow(1, 0, STYLE)?;
        let prosody_style = style.narrow(1, STYLE, STYLE)?;
        let speed_t = Tensor::new(&[speed], dev)?;

        let d_en = self
            .albert
            .project(&self.albert.hidden(&ids_t, &valid)?, &valid)?;
        let predicted = self
            .durations
            .forward(&d_en, &prosody_style, &valid, &[len], &speed_t)?;
        let durations: Vec<f32> = predicted.frames.flatten_all()?.to_vec1()?;
        let frames: Vec<u32> = match given {
            Some(f) => f.to_vec(),
            None => durations
                .iter()
                .map(|d| d.round().max(1.0) as u32)
                .collect(),
        };
        let index: Vec<u32> = frames
            .iter()
            .enumerate()
            .flat_map(|(i, &n)| std::iter::repeat_n(i as u32, n as usize))
            .collect();
        let total = index.len();
        let index = Tensor::from_vec(index, total, dev)?;

        let aligned = predicted.features.index_select(&index, 1)?;
        let (f0, energy) = self.prosody.forward(&aligned, &prosody_style)?;
        let t_en = self.text_encoder.forward(&ids_t, &valid, &[len])?;
        let asr = t_en.index_select(&index, 2)?;
        let audio = self.decoder.forward(&asr, &f0, &energy, &timbre)?;
        Ok(Utterance {
            audio: audio.to_vec1()?,
            durations,
            frames,
        })
    }
}
