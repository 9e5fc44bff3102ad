//! [`PiperSynthesizer`]: a Piper voice as the [`Synthesizer`] the queue's workers hold.

use crate::tts::candle::error::LoadError;
use std::fmt;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use super::config::VoiceConfig;
use super::error::PiperError;
use super::model::{Utterance, Vits};
use super::onnx::Weights;
use super::phonemize::Phonemizer;
use crate::tts::candle::batched::run_batched;
use crate::tts::candle::device::describe;
use crate::tts::candle::options::{CandleOptions, candle_setters};
use crate::tts::{Audio, EspeakSynthesizer, SynthesisRequest, Synthesizer, TtsError, Voice};

/// How a [`PiperSynthesizer`] loads and speaks.
///
/// The three scales left at `None` come from the voice's `.onnx.json`, as its authors tuned
/// them. Requests may override `seed`, `noise_scale` and `noise_w` per job through
/// [`SynthesisRequest::extra`]; a request's `speed` divides the length scale.
#[derive(Debug, Clone, PartialEq, Default)]
#[non_exhaustive]
pub struct PiperOptions {
    /// Device, precision and batch size (default: auto, auto, 8). The duration predictor's
    /// spline always runs in f32.
    pub candle: CandleOptions,
    /// Variation of the voice (the prior's noise); 0 is flat and deterministic.
    pub noise_scale: Option<f32>,
    /// Time per phoneme; above 1 is slower. A request's speed divides it.
    pub length_scale: Option<f32>,
    /// Variation of the rhythm (the duration predictor's noise); 0 is deterministic.
    pub noise_w: Option<f32>,
    /// Seed of each request's noise (default 0), so a request always sounds the same, which
    /// is what deduplication assumes.
    pub seed: u64,
    /// The `espeak-ng` program for phonemes (default: `ESPEAK_NG`, else `espeak-ng` on `PATH`).
    pub espeak: Option<PathBuf>,
    /// The voice id requests name (default: the model file's stem, e.g. `en_US-joe-medium`).
    pub voice_id: Option<String>,
}

impl PiperOptions {
    /// The defaults (same as [`Default`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the three scales (noise, length, duration noise) at once: `(0, 1, 0)` makes
    /// synthesis deterministic, which parity checks need.
    #[must_use]
    pub fn with_scales(mut self, scales: PiperScales) -> Self {
        self.noise_scale = Some(scales.noise_scale);
        self.length_scale = Some(scales.length_scale);
        self.noise_w = Some(scales.noise_w);
        self
    }

    /// Sets the default seed.
    #[must_use]
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Sets the `espeak-ng` program.
    #[must_use]
    pub fn with_espeak(mut self, path: impl Into<PathBuf>) -> Self {
        self.espeak = Some(path.into());
        self
    }

    /// Sets the voice id.
    #[must_use]
    pub fn with_voice_id(mut self, id: impl Into<String>) -> Self {
        self.voice_id = Some(id.into());
        self
    }
}

candle_setters!(PiperOptions);

/// Piper's three inference knobs (its `scales` input, in the same order).
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct PiperScales {
    /// The prior's noise (Piper's default 0.667).
    pub noise_scale: f32,
    /// Time per phoneme (1 = as trained).
    pub length_scale: f32,
    /// The duration predictor's noise (Piper's default 0.8).
    pub noise_w: f32,
}

impl PiperScales {
    /// Scales as given.
    pub fn new(noise_scale: f32, length_scale: f32, noise_w: f32) -> Self {
        Self {
            noise_scale,
            length_scale,
            noise_w,
        }
    }

    /// No noise at all: the same ids always give the same samples.
    pub fn deterministic(length_scale: f32) -> Self {
        Self::new(0.0, length_scale, 0.0)
    }
}

/// One utterance with the values a parity check compares: see [`PiperSynthesizer::trace`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct PiperTrace {
    /// The audio at the voice's rate.
    pub samples: Vec<f32>,
    /// Frames per phoneme id before rounding up (`exp(logw) * length_scale`).
    pub durations: Vec<f32>,
    /// Frames per phoneme id after rounding up; their sum times the hop is the length.
    pub frames: Vec<u32>,
    /// The text encoder's output, `[channels][ids]`.
    pub encoder: Vec<Vec<f32>>,
    /// The prior's means, `[channels][ids]`.
    pub prior_means: Vec<Vec<f32>>,
}

/// A Piper voice (VITS) running natively on Candle.
///
/// Load once per worker with [`PiperSynthesizer::load`] and share it: inference takes
/// `&self` with no lock, so concurrent calls run in parallel, and
/// [`Synthesizer::synthesize_batch`] runs several utterances through one model call.
///
/// Licences travel with voices: check each voice's model card. The voice `.ci/fetch-voices`
/// fetches, `en_US-joe-medium`, is CC0 data in an MIT package, but it was fine-tuned from
/// Piper's `lessac` voice, whose corpus restricts commercial synthesis.
pub struct PiperSynthesizer {
    model: Vits,
    config: VoiceConfig,
    phonemizer: Phonemizer,
    device: Device,
    dtype: DType,
    options: PiperOptions,
    voices: Vec<(Voice, u32)>,
}

impl fmt::Debug for PiperSynthesizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PiperSynthesizer")
            .field("device", &describe(&self.device))
            .field("dtype", &self.dtype)
            .field("sample_rate", &self.config.sample_rate)
            .field("voices", &self.voices.len())
            .finish_non_exhaustive()
    }
}

impl PiperSynthesizer {
    /// Loads a Piper voice: `model` is the `.onnx` file, and its config is the `.onnx.json`
    /// beside it (Piper's convention, `voice.onnx` + `voice.onnx.json`).
    ///
    /// Every failure names the file or tensor at fault; [`PiperError`] converts into
    /// [`TtsError::BackendUnavailable`]. Also checks that `espeak-ng` runs, since a worker
    /// without it cannot phonemize.
    pub fn load(model: impl AsRef<Path>, options: PiperOptions) -> Result<Self, PiperError> {
        let model_path = model.as_ref();
        let mut config_path = model_path.as_os_str().to_owned();
        config_path.push(".json");
        let config_path = PathBuf::from(config_path);
        check_options(&options)?;
        let config = VoiceConfig::read(&config_path)?;
        let (device, dtype) = options.candle.open()?;
        let weights = Weights::read(model_path, &device, dtype)?;
        let model = Vits::load(&weights, &device, dtype)?;
        let vocab = model.vocab();
        if config.max_id() as usize >= vocab {
            return Err(LoadError::ShapeMismatch {
                tensor: "enc_p.emb.weight".into(),
                expected: vec![config.max_id() as usize + 1, 0],
                found: vec![vocab, 0],
            }
            .into());
        }
        if config.num_speakers != model.speakers() {
            return Err(PiperError::InvalidConfig {
                path: config_path,
                reason: format!(
                    "num_speakers {} but the model has {} speaker embeddings",
                    config.num_speakers,
                    model.speakers()
                ),
            });
        }
        let espeak = match &options.espeak {
            Some(path) => EspeakSynthesizer::with_binary(path),
            None => EspeakSynthesizer::new(),
        }
        .map_err(|e| LoadError::InvalidOption {
            option: "espeak",
            reason: e.to_string(),
        })?;
        let phonemizer = Phonemizer::new(espeak.binary(), &config.espeak_voice);
        let voices = voice_table(model_path, &config, &options);
        tracing::info!(
            model = %weights.path().display(),
            device = describe(&device),
            ?dtype,
            sample_rate = config.sample_rate,
            hop = model.hop(),
            "loaded Piper voice"
        );
        Ok(Self {
            model,
            config,
            phonemizer,
            device,
            dtype,
            options,
            voices,
        })
    }

    /// Piper's phoneme string for `text` (eSpeak NG IPA with clause punctuation).
    pub fn phonemes(&self, text: &str) -> Result<String, TtsError> {
        self.phonemizer.phonemes(text)
    }

    /// The ids the model reads for `text`.
    pub fn phoneme_ids(&self, text: &str) -> Result<Vec<u32>, TtsError> {
        self.phonemizer.ids(&self.config, text)
    }

    /// Runs the model on given ids and returns the audio with the intermediate values a
    /// reference implementation can be compared with (ONNX Runtime exposes the same ones as
    /// extra graph outputs: see `tests/fixtures/piper_reference.py`).
    pub fn trace(
        &self,
        ids: &[u32],
        scales: PiperScales,
        seed: u64,
    ) -> Result<PiperTrace, TtsError> {
        let vocab = self.model.vocab();
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(TtsError::Backend(format!(
                "phoneme id {bad} is outside the voice's {vocab} symbols"
            )));
        }
        if ids.is_empty() {
            return Err(TtsError::EmptyText);
        }
        let utterance = Utterance {
            ids: ids.to_vec(),
            noise_scale: scales.noise_scale,
            length_scale: scales.length_scale,
            noise_w: scales.noise_w,
            speaker: 0,
            seed,
        };
        let out = self
            .model
            .infer(std::slice::from_ref(&utterance))
            .map_err(|e| TtsError::Backend(format!("Piper inference failed: {e}")))?
            .pop()
            .ok_or_else(|| TtsError::Backend("Piper inference returned nothing".into()))?;
        Ok(PiperTrace {
            samples: out.samples,
            durations: out.durations,
            frames: out.frames,
            encoder: out.encoder,
            prior_means: out.m_p,
        })
    }

    /// Samples per frame of the decoder (256 for Piper's voices): audio lengths are
    /// multiples of it.
    pub fn hop_length(&self) -> usize {
        self.model.hop()
    }

    /// The scales this synthesiser uses when a request does not override them.
    pub fn scales(&self) -> PiperScales {
        PiperScales::new(
            self.options.noise_scale.unwrap_or(self.config.noise_scale),
            self.options
                .length_scale
                .unwrap_or(self.config.length_scale),
            self.options.noise_w.unwrap_or(self.config.noise_w),
        )
    }

    /// Turns one request into an utterance, or the request's own error.
    fn prepare(&self, request: &SynthesisRequest) -> Result<Utterance, TtsError> {
        let Some((_, speaker)) = self.voices.iter().find(|(v, _)| v.id == request.voice) else {
            return Err(TtsError::UnknownVoice {
                voice: request.voice.clone(),
                available: self.voices.iter().map(|(v, _)| v.id.clone()).collect(),
            });
        };
        let text = request.text.trim();
        if text.is_empty() {
            return Err(TtsError::EmptyText);
        }
        let speed = if request.speed.is_finite() && request.speed > 0.0 {
            request.speed
        } else {
            1.0
        };
        let scales = self.scales();
        let mut utterance = Utterance {
            ids: self.phoneme_ids(text)?,
            noise_scale: scales.noise_scale,
            length_scale: scales.length_scale / speed,
            noise_w: scales.noise_w,
            speaker: *speaker,
            seed: self.options.seed,
        };
        for (key, value) in &request.extra {
            let ok = match key.as_str() {
                "seed" => value.as_u64().map(|v| utterance.seed = v).is_some(),
                "noise_scale" => non_negative(value)
                    .map(|v| utterance.noise_scale = v)
                    .is_some(),
                "noise_w" => non_negative(value).map(|v| utterance.noise_w = v).is_some(),
                _ => true,
            };
            if !ok {
                tracing::warn!(key = %key, %value, "ignoring invalid Piper option in request");
            }
        }
        Ok(utterance)
    }

    fn run(&self, batch: &[Utterance]) -> Vec<Result<Audio, TtsError>> {
        match self.model.infer(batch) {
            Ok(outputs) => outputs
                .into_iter()
                .map(|o| Ok(Audio::new(o.samples, self.config.sample_rate)))
                .collect(),
            Err(err) => {
                let message = format!("Piper inference failed: {err}");
                batch
                    .iter()
                    .map(|_| Err(TtsError::Backend(message.clone())))
                    .collect()
            }
        }
    }
}

fn non_negative(value: &serde_json::Value) -> Option<f32> {
    value
        .as_f64()
        .filter(|v| v.is_finite() && *v >= 0.0)
        .map(|v| v as f32)
}

fn check_options(options: &PiperOptions) -> Result<(), PiperError> {
    for (option, value) in [
        ("noise_scale", options.noise_scale),
        ("noise_w", options.noise_w),
    ] {
        if let Some(v) = value.filter(|v| !(v.is_finite() && *v >= 0.0)) {
            return Err(LoadError::InvalidOption {
                option,
                reason: format!("{v} is not a finite number >= 0"),
            }
            .into());
        }
    }
    if let Some(v) = options
        .length_scale
        .filter(|v| !(v.is_finite() && *v > 0.0))
    {
        return Err(LoadError::InvalidOption {
            option: "length_scale",
            reason: format!("{v} is not a finite number > 0"),
        }
        .into());
    }
    options.candle.check()?;
    Ok(())
}

/// The voices a file offers: one per speaker, the first under the file's own id.
fn voice_table(model: &Path, config: &VoiceConfig, options: &PiperOptions) -> Vec<(Voice, u32)> {
    let stem = model
        .file_name()
        .and_then(|n| n.to_str())
        .map(|n| n.trim_end_matches(".onnx").to_owned())
        .unwrap_or_else(|| "piper".into());
    let id = options.voice_id.clone().unwrap_or(stem);
    let dataset = config.dataset.clone().unwrap_or_else(|| id.clone());
    let describe = |speaker: Option<&str>| {
        let mut d = format!(
            "Piper VITS voice `{dataset}`{} ({} quality, {} Hz) on Candle",
            speaker
                .map(|s| format!(", speaker {s}"))
                .unwrap_or_default(),
            config.quality.as_deref().unwrap_or("unknown"),
            config.sample_rate
        );
        d.push_str("; check the voice's model card for its licence");
        d
    };
    let voice = |id: String, speaker: Option<&str>| {
        let mut v = Voice::new(id, dataset.clone()).with_description(describe(speaker));
        if let Some(lang) = &config.language {
            v = v.with_language(lang.clone());
        }
        v
    };
    let mut voices = vec![(voice(id.clone(), None), 0)];
    for (name, &sid) in &config.speakers {
        voices.push((voice(format!("{id}:{name}"), Some(name)), sid));
    }
    voices
}

impl Synthesizer for PiperSynthesizer {
    fn voices(&self) -> Vec<Voice> {
        self.voices.iter().map(|(v, _)| v.clone()).collect()
    }

    fn sample_rate(&self) -> u32 {
        self.config.sample_rate
    }

    fn synthesize(&self, request: &SynthesisRequest) -> Result<Audio, TtsError> {
        let utterance = self.prepare(request)?;
        self.run(std::slice::from_ref(&utterance))
            .pop()
            .unwrap_or_else(|| Err(TtsError::Backend("inference returned nothing".into())))
    }

    /// Runs up to `max_batch` utterances per model call; each is decoded on its own, so the
    /// audio equals what [`synthesize`](Self::synthesize) gives. A request that fails
    /// (unknown voice, nothing to say) gets its own error without failing the others.
    fn synthesize_batch(&self, requests: &[SynthesisRequest]) -> Vec<Result<Audio, TtsError>> {
        run_batched(
            requests,
            self.options.candle.max_batch,
            |r| self.prepare(r),
            |batch| self.run(batch),
        )
    }
}
