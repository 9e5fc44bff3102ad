//! [`ParlerSynthesizer`]: the [`Synthesizer`] the queue's workers hold.

use crate::tts::candle::error::LoadError;
use std::fmt;
use std::path::Path;
use std::sync::{Mutex, PoisonError};

use candle_core::{DType, Device};
use tokenizers::Tokenizer;

use super::error::ModelError;
use super::generate::{GenItem, Special, generate, undelay};
use super::load::{ParlerModel, load_dir};
use crate::tts::candle::batched::run_batched;
use crate::tts::candle::device::describe;
use crate::tts::candle::options::{CandleOptions, candle_setters};
use crate::tts::candle::sample::SamplingParams;
use crate::tts::{Audio, SynthesisRequest, Synthesizer, TtsError, Voice};

/// The description used for a voice that has none (and no request style).
pub const DEFAULT_DESCRIPTION: &str = "A calm speaker delivers the words at a moderate pace, recorded close to the microphone \
     with very clear audio quality.";

/// Parler-TTS is steered by a free-text description of the speaker, and the released
/// checkpoints were trained with a few dozen named speakers; these are some of them.
const BUILT_IN_VOICES: &[(&str, &str, &str)] = &[
    (
        "laura",
        "Laura",
        "Laura's voice is calm and clear, with a moderate pace, recorded close to the mic \
         with no background noise.",
    ),
    (
        "gary",
        "Gary",
        "Gary's voice is deep and steady, speaking at a moderate pace in a quiet room with \
         very clear audio.",
    ),
    (
        "jon",
        "Jon",
        "Jon's voice is warm and expressive, delivered at a natural pace with very clear \
         audio quality.",
    ),
    (
        "lea",
        "Lea",
        "Lea's voice is bright and friendly, speaking slightly fast, recorded close to the \
         mic with no background noise.",
    ),
    (
        "rick",
        "Rick",
        "Rick's voice is low-pitched and relaxed, speaking slowly with very clear audio.",
    ),
    (
        "jenna",
        "Jenna",
        "Jenna's voice is soft and expressive, speaking at a moderate pace in a very \
         confined sounding environment with clear audio quality.",
    ),
];

/// The built-in voices: each [`Voice::description`] is the speaker description the model
/// is prompted with.
pub fn default_voices() -> Vec<Voice> {
    BUILT_IN_VOICES
        .iter()
        .map(|&(id, name, description)| {
            Voice::new(id, name)
                .with_language("en")
                .with_description(description)
        })
        .collect()
}

/// How a [`ParlerSynthesizer`] loads and samples.
///
/// Sampling options left at `None` come from the checkpoint's `generation_config.json`, and
/// from the Hugging Face defaults when it has none, so a model sounds as its authors tuned
/// it unless the operator says otherwise. Requests may override `seed`, `temperature`,
/// `top_k` and `top_p` per job through [`SynthesisRequest::extra`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ParlerOptions {
    /// Device, precision and batch size (default: auto, auto, 8): requests per generation
    /// in [`Synthesizer::synthesize_batch`]. The T5 text encoder stays in f32 under f16.
    pub candle: CandleOptions,
    /// Softmax temperature; 0 decodes greedily (default: generation config, else 1.0).
    pub temperature: Option<f64>,
    /// Sample among the k most likely tokens; 0 disables (default: generation config, else 50).
    pub top_k: Option<usize>,
    /// Nucleus sampling mass in `(0, 1]` (default: generation config, else 1.0).
    pub top_p: Option<f64>,
    /// Seed of each request's sampler (default 0), so a request always sounds the same,
    /// which is what deduplication assumes.
    pub seed: u64,
    /// Most decoder steps per request, start column included (default: the generation
    /// config's `max_length`, else 2580, about 30 s at 86 frames/s).
    pub max_steps: Option<usize>,
    /// Steps before a codebook may end (default: generation config, else 0).
    pub min_new_tokens: Option<usize>,
    /// Longest audio per character of text, in seconds (default 0.15, twice a slow
    /// speaker's pace), so a model that never says EOS stops in proportion to the text.
    /// The budget is at least one second.
    pub max_seconds_per_char: f64,
    /// The voices offered (default [`default_voices`]); a voice's description is its prompt.
    pub voices: Vec<Voice>,
}

impl Default for ParlerOptions {
    fn default() -> Self {
        Self {
            candle: CandleOptions::default(),
            temperature: None,
            top_k: None,
            top_p: None,
            seed: 0,
            max_steps: None,
            min_new_tokens: None,
            max_seconds_per_char: 0.15,
            voices: default_voices(),
        }
    }
}

impl ParlerOptions {
    /// The defaults (same as [`Default`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the temperature (0 = greedy).
    #[must_use]
    pub fn with_temperature(mut self, temperature: f64) -> Self {
        self.temperature = Some(temperature);
        self
    }

    /// Sets top-k (0 = off).
    #[must_use]
    pub fn with_top_k(mut self, top_k: usize) -> Self {
        self.top_k = Some(top_k);
        self
    }

    /// Sets top-p.
    #[must_use]
    pub fn with_top_p(mut self, top_p: f64) -> Self {
        self.top_p = Some(top_p);
        self
    }

    /// Sets the default seed.
    #[must_use]
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Caps decoder steps per request.
    #[must_use]
    pub fn with_max_steps(mut self, max_steps: usize) -> Self {
        self.max_steps = Some(max_steps);
        self
    }

    /// Sets the steps before EOS is allowed.
    #[must_use]
    pub fn with_min_new_tokens(mut self, min_new_tokens: usize) -> Self {
        self.min_new_tokens = Some(min_new_tokens);
        self
    }

    /// Sets the audio budget per character, in seconds.
    #[must_use]
    pub fn with_max_seconds_per_char(mut self, seconds: f64) -> Self {
        self.max_seconds_per_char = seconds;
        self
    }

    /// Replaces the voice table.
    #[must_use]
    pub fn with_voices(mut self, voices: Vec<Voice>) -> Self {
        self.voices = voices;
        self
    }
}

candle_setters!(ParlerOptions);

/// Options after merging with the generation config and checking ranges.
#[derive(Debug, Clone)]
struct Settings {
    sampling: SamplingParams,
    seed: u64,
    max_steps: usize,
    max_seconds_per_char: f64,
    max_batch: usize,
}

/// Parler-TTS on candle: speaks any voice that can be described in words.
///
/// Load once per worker with [`ParlerSynthesizer::load`] and share it: generation takes a
/// lock on the model (the decoder keeps a key/value cache), so concurrent calls run one
/// after the other, and [`Synthesizer::synthesize_batch`] is the way to use a GPU fully.
///
/// A request's voice picks a description ([`Voice::description`]) and its `style`, when set,
/// replaces it. Parler has no speed or language input: describe the pace in `style` (e.g.
/// "speaks quickly"); `speed` and `language` are ignored.
pub struct ParlerSynthesizer {
    model: Mutex<ParlerModel>,
    prompt_tokenizer: Tokenizer,
    description_tokenizer: Option<Tokenizer>,
    device: Device,
    /// The model's dtype, for logs.
    dtype: DType,
    special: Special,
    settings: Settings,
    voices: Vec<Voice>,
    sample_rate: u32,
    frame_rate: f64,
    /// Stands in for an empty description (the T5 end-of-sequence token).
    description_eos: u32,
}

impl fmt::Debug for ParlerSynthesizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParlerSynthesizer")
            .field("device", &describe(&self.device))
            .field("dtype", &self.dtype)
            .field("sample_rate", &self.sample_rate)
            .field("num_codebooks", &self.special.num_codebooks)
            .field("voices", &self.voices.len())
            .finish_non_exhaustive()
    }
}

impl ParlerSynthesizer {
    /// Loads a Parler-TTS checkpoint from a local directory onto the chosen device.
    ///
    /// Every file is checked before the weights are read, and every failure names the file
    /// or tensor at fault; [`ModelError`] converts into [`TtsError::BackendUnavailable`].
    pub fn load(dir: impl AsRef<Path>, options: ParlerOptions) -> Result<Self, ModelError> {
        let dir = dir.as_ref();
        options.candle.check()?;
        let (device, dtype) = options.candle.open()?;
        let loaded = load_dir(dir, &device, dtype)?;
        let generation = &loaded.generation;
        let greedy_by_default = generation.do_sample == Some(false);
        let temperature = options.temperature.unwrap_or(if greedy_by_default {
            0.0
        } else {
            generation.temperature.unwrap_or(1.0)
        });
        let settings = Settings {
            sampling: SamplingParams {
                temperature,
                top_k: options.top_k.or(generation.top_k).unwrap_or(50),
                top_p: options.top_p.or(generation.top_p).unwrap_or(1.0),
            },
            seed: options.seed,
            max_steps: options.max_steps.or(generation.max_length).unwrap_or(2580),
            max_seconds_per_char: options.max_seconds_per_char,
            max_batch: options.candle.max_batch,
        };
        check_settings(&settings)?;
        let min_new_tokens = options
            .min_new_tokens
            .or(generation.min_new_tokens)
            .unwrap_or(0);
        let config = &loaded.config;
        tracing::info!(
            dir = %dir.display(),
            device = describe(&device),
            ?dtype,
            sample_rate = config.audio_encoder.sampling_rate,
            codebooks = config.decoder.num_codebooks,
            "loaded Parler-TTS"
        );
        Ok(Self {
            special: Special::new(config, min_new_tokens),
            sample_rate: config.audio_encoder.sampling_rate,
            frame_rate: config.audio_encoder.frame_rate,
            description_eos: u32::try_from(config.text_encoder.eos_token_id).unwrap_or(1),
            model: Mutex::new(loaded.model),
            prompt_tokenizer: loaded.prompt_tokenizer,
            description_tokenizer: loaded.description_tokenizer,
            device,
            dtype,
            settings,
            voices: options.voices,
        })
    }

    /// Loads a checkpoint from the Hugging Face hub (e.g. `parler-tts/parler-tts-mini-v1`),
    /// downloading it into the local hub cache first.
    #[cfg(feature = "hub")]
    pub fn from_hub(repo_id: &str, options: ParlerOptions) -> Result<Self, ModelError> {
        let dir = crate::tts::candle::hub::download_from_hub(repo_id, None)?;
        Self::load(dir, options)
    }

    /// Turns one request into the loop's input, or the request's own error.
    pub(super) fn prepare(&self, request: &SynthesisRequest) -> Result<GenItem, TtsError> {
        let text = request.text.trim();
        if text.is_empty() {
            return Err(TtsError::EmptyText);
        }
        if request.speed != 1.0 {
            tracing::debug!(speed = request.speed, "Parler-TTS ignores speed; use style");
        }
        let Some(voice) = self.voices.iter().find(|v| v.id == request.voice) else {
            return Err(TtsError::UnknownVoice {
                voice: request.voice.clone(),
                available: self.voices.iter().map(|v| v.id.clone()).collect(),
            });
        };
        let description = request
            .style
            .as_deref()
            .or(voice.description.as_deref())
            .unwrap_or(DEFAULT_DESCRIPTION);
        let description_tokenizer = self
            .description_tokenizer
            .as_ref()
            .unwrap_or(&self.prompt_tokenizer);
        let mut description_ids = encode(description_tokenizer, description)?;
        if description_ids.is_empty() {
            description_ids.push(self.description_eos);
        }
        let prompt_ids = encode(&self.prompt_tokenizer, text)?;
        if prompt_ids.is_empty() {
            return Err(TtsError::EmptyText);
        }
        let chars = text.chars().count();
        let k = self.special.num_codebooks;
        let room = self.special.max_positions.saturating_sub(prompt_ids.len());
        if room < k + 2 {
            // Roughly how many characters would have fit, for the caller to split by.
            let fit = chars * self.special.max_positions.saturating_sub(k + 2) / prompt_ids.len();
            return Err(TtsError::TextTooLong {
                len: chars,
                max: fit.max(1),
            });
        }
        let (sampling, seed) = self.request_sampling(request);
        let seconds = (chars as f64 * self.settings.max_seconds_per_char).max(1.0);
        let frames = (seconds * self.frame_rate).ceil() as usize;
        let max_columns = (frames + k + 1)
            .min(self.settings.max_steps)
            .min(room)
            .max(k + 2);
        Ok(GenItem {
            description_ids,
            prompt_ids,
            max_columns,
            sampling,
            seed,
        })
    }

    /// The request's `extra` overrides (`seed`, `temperature`, `top_k`, `top_p`); values of
    /// the wrong type or range are ignored with a warning rather than failing the job.
    fn request_sampling(&self, request: &SynthesisRequest) -> (SamplingParams, u64) {
        let mut sampling = self.settings.sampling;
        let mut seed = self.settings.seed;
        for (key, value) in &request.extra {
            let ok = match key.as_str() {
                "seed" => value.as_u64().map(|v| seed = v).is_some(),
                "temperature" => value
                    .as_f64()
                    .filter(|t| t.is_finite() && *t >= 0.0)
                    .map(|t| sampling.temperature = t)
                    .is_some(),
                "top_k" => value
                    .as_u64()
                    .and_then(|v| usize::try_from(v).ok())
                    .map(|v| sampling.top_k = v)
                    .is_some(),
                "top_p" => value
                    .as_f64()
                    .filter(|p| *p > 0.0 && *p <= 1.0)
                    .map(|p| sampling.top_p = p)
                    .is_some(),
                _ => true,
            };
            if !ok {
                tracing::warn!(key = %key, %value, "ignoring invalid Parler-TTS option in request");
            }
        }
        (sampling, seed)
    }

    /// The audio codes the model generates for `request`, before the codec: one frame
    /// per step, each with one code per codebook (delay pattern undone, frames with
    /// special codes dropped). With [`Self::decode_codes`] this is the whole of
    /// [`Synthesizer::synthesize`], split where a reference implementation can be
    /// compared: generation and codec decoding are checked apart.
    pub fn generate_codes(&self, request: &SynthesisRequest) -> Result<Vec<Vec<u32>>, TtsError> {
        let item = self.prepare(request)?;
        self.codes(std::slice::from_ref(&item))
            .pop()
            .unwrap_or_else(|| Err(TtsError::Backend("generation returned nothing".into())))
    }

    /// Decodes codes (as [`Self::generate_codes`] gives them, or a reference's) to audio
    /// at the model's sample rate. Every frame must hold one code per codebook, each
    /// below the codebook size: anything else is refused, never silently clipped.
    pub fn decode_codes(&self, frames: &[Vec<u32>]) -> Result<Audio, TtsError> {
        let model = self.model.lock().unwrap_or_else(PoisonError::into_inner);
        self.decode_with(&model, frames)
    }

    fn decode_with(&self, model: &ParlerModel, frames: &[Vec<u32>]) -> Result<Audio, TtsError> {
        if frames.is_empty() {
            return Err(TtsError::Backend(
                "Parler-TTS ended the speech before its first audio frame".into(),
            ));
        }
        let books = self.special.num_codebooks;
        let size = self.special.codebook_size;
        for (step, frame) in frames.iter().enumerate() {
            if frame.len() != books {
                return Err(TtsError::InvalidCodes(format!(
                    "frame {step} has {} codes; the model has {books} codebooks",
                    frame.len()
                )));
            }
            if let Some(code) = frame.iter().find(|&&c| c as usize >= size) {
                return Err(TtsError::InvalidCodes(format!(
                    "frame {step} holds {code}, outside the codebook (size {size})"
                )));
            }
        }
        let samples = model
            .codec
            .decode(frames, &self.device)
            .map_err(|e| TtsError::Backend(format!("DAC decoding failed: {e}")))?;
        tracing::debug!(
            frames = frames.len(),
            samples = samples.len(),
            hop = model.codec.hop_length(),
            "decoded speech"
        );
        Ok(Audio::new(samples, self.sample_rate))
    }

    /// Generates one batch of prepared requests: their frames, undelayed.
    fn codes(&self, items: &[GenItem]) -> Vec<Result<Vec<Vec<u32>>, TtsError>> {
        let mut model = self.model.lock().unwrap_or_else(PoisonError::into_inner);
        self.codes_with(&mut model, items)
    }

    fn codes_with(
        &self,
        model: &mut ParlerModel,
        items: &[GenItem],
    ) -> Vec<Result<Vec<Vec<u32>>, TtsError>> {
        match generate(model, &self.special, items, &self.device) {
            Ok(columns) => columns
                .iter()
                .map(|cols| Ok(undelay(cols, self.special.codebook_size)))
                .collect(),
            Err(err) => {
                let message = format!("Parler-TTS generation failed: {err}");
                items
                    .iter()
                    .map(|_| Err(TtsError::Backend(message.clone())))
                    .collect()
            }
        }
    }

    /// Generates and decodes one batch of prepared requests, under one lock.
    fn run(&self, items: &[GenItem]) -> Vec<Result<Audio, TtsError>> {
        let mut model = self.model.lock().unwrap_or_else(PoisonError::into_inner);
        self.codes_with(&mut model, items)
            .into_iter()
            .map(|frames| self.decode_with(&model, &frames?))
            .collect()
    }
}

fn check_settings(settings: &Settings) -> Result<(), ModelError> {
    let s = &settings.sampling;
    if !(s.temperature.is_finite() && s.temperature >= 0.0) {
        return Err(LoadError::InvalidOption {
            option: "temperature",
            reason: format!("{} is not a finite number >= 0", s.temperature),
        }
        .into());
    }
    if !(s.top_p > 0.0 && s.top_p <= 1.0) {
        return Err(LoadError::InvalidOption {
            option: "top_p",
            reason: format!("{} is outside (0, 1]", s.top_p),
        }
        .into());
    }
    if !(settings.max_seconds_per_char.is_finite() && settings.max_seconds_per_char > 0.0) {
        return Err(LoadError::InvalidOption {
            option: "max_seconds_per_char",
            reason: format!("{} is not a positive number", settings.max_seconds_per_char),
        }
        .into());
    }
    Ok(())
}

fn encode(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>, TtsError> {
    tokenizer
        .encode(text, true)
        .map(|e| e.get_ids().to_vec())
        .map_err(|e| TtsError::Backend(format!("tokenizing failed: {e}")))
}

impl Synthesizer for ParlerSynthesizer {
    fn voices(&self) -> Vec<Voice> {
        self.voices.clone()
    }

    fn sample_rate(&self) -> u32 {
        self.sample_rate
    }

    fn synthesize(&self, request: &SynthesisRequest) -> Result<Audio, TtsError> {
        let item = self.prepare(request)?;
        self.run(std::slice::from_ref(&item))
            .pop()
            .unwrap_or_else(|| Err(TtsError::Backend("generation returned nothing".into())))
    }

    /// Runs up to `max_batch` requests through one generation: descriptions and
    /// transcripts are padded and masked, and each request stops on its own EOS. A request
    /// that fails validation gets its own error without failing the others.
    fn synthesize_batch(&self, requests: &[SynthesisRequest]) -> Vec<Result<Audio, TtsError>> {
        run_batched(
            requests,
            self.settings.max_batch,
            |r| self.prepare(r),
            |items| self.run(items),
        )
    }
}

#[cfg(test)]
mod codes_tests {
    use super::*;
    use crate::tts::candle::{DeviceChoice, TINY_HOP_LENGTH, write_tiny_model};

    fn tiny() -> (tempfile::TempDir, ParlerSynthesizer) {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_model(dir.path(), 7).unwrap();
        let options = ParlerOptions::new()
            .with_device(DeviceChoice::Cpu)
            .with_max_steps(40)
            .with_seed(3);
        let tts = ParlerSynthesizer::load(dir.path(), options).unwrap();
        (dir, tts)
    }

    #[test]
    fn generated_codes_decode_to_exactly_the_synthesized_audio() {
        let (_dir, tts) = tiny();
        let request = SynthesisRequest::new("Hello world.", "laura");
        let codes = tts.generate_codes(&request).unwrap();
        assert!(!codes.is_empty());
        // Three codebooks of 32 codes in the tiny model.
        assert!(
            codes
                .iter()
                .all(|f| f.len() == 3 && f.iter().all(|&c| c < 32))
        );
        let audio = tts.decode_codes(&codes).unwrap();
        assert_eq!(audio.samples.len(), codes.len() * TINY_HOP_LENGTH);
        assert_eq!(audio.samples, tts.synthesize(&request).unwrap().samples);
    }

    #[test]
    fn codes_that_do_not_fit_the_model_are_refused() {
        let (_dir, tts) = tiny();
        let err = tts.decode_codes(&[vec![1, 2, 3], vec![1, 2]]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid audio codes: frame 1 has 2 codes; the model has 3 codebooks"
        );
        let err = tts.decode_codes(&[vec![1, 32, 3]]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid audio codes: frame 0 holds 32, outside the codebook (size 32)"
        );
        assert!(err.is_invalid_request());
        assert!(tts.decode_codes(&[]).is_err());
    }
}
