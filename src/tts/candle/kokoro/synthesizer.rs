//! [`KokoroSynthesizer`]: Kokoro-82M as the [`Synthesizer`] the queue's workers hold.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use candle_core::Device;

use super::error::KokoroError;
use super::model::Kokoro;
use super::phonemize::{KokoroPhonemizer, to_ids};
use super::weights::Weights;
use crate::tts::candle::batched::run_batched;
use crate::tts::candle::device::describe;
use crate::tts::candle::error::LoadError;
use crate::tts::candle::options::{CandleOptions, candle_setters};
use crate::tts::{Audio, EspeakSynthesizer, SynthesisRequest, Synthesizer, TtsError, Voice};

/// Kokoro's output rate.
pub const KOKORO_SAMPLE_RATE: u32 = 24_000;
/// The model file `.ci/fetch-voices` puts in the Kokoro directory.
pub const KOKORO_MODEL_FILE: &str = "kokoro-v1.0.int8.onnx";
/// Rows of a voice pack: one style per phoneme count, 1 to 510.
const PACK_ROWS: usize = 510;
const STYLE_WIDTH: usize = 256;

/// How a [`KokoroSynthesizer`] loads and speaks.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct KokoroOptions {
    /// Device, precision and batch size (default: auto, auto, 8). Kokoro runs in f32
    /// whatever precision is asked: its weights are 8-bit already, and the export's 8-bit
    /// rounding of activations is reproduced in f32. A batch's utterances run one by one
    /// inside it (instance norms and LSTMs span whole utterances).
    pub candle: CandleOptions,
    /// Round every quantised layer's input through 8 bits as the int8 export does (default
    /// `true`, which reproduces ONNX Runtime's output); `false` runs the dequantised weights
    /// on unrounded activations, slightly closer to the float model.
    pub int8_activations: bool,
    /// The `espeak-ng` program for phonemes (default: `ESPEAK_NG`, else `espeak-ng` on `PATH`).
    pub espeak: Option<PathBuf>,
    /// The directory of voice packs (`*.bin`; default: `voices/` beside the model).
    pub voices_dir: Option<PathBuf>,
}

impl Default for KokoroOptions {
    fn default() -> Self {
        Self {
            candle: CandleOptions::default(),
            int8_activations: true,
            espeak: None,
            voices_dir: None,
        }
    }
}

impl KokoroOptions {
    /// The defaults (same as [`Default`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether activations are rounded through 8 bits as the export does.
    #[must_use]
    pub fn with_int8_activations(mut self, on: bool) -> Self {
        self.int8_activations = on;
        self
    }

    /// Sets the `espeak-ng` program.
    #[must_use]
    pub fn with_espeak(mut self, path: impl Into<PathBuf>) -> Self {
        self.espeak = Some(path.into());
        self
    }

    /// Sets the directory of voice packs.
    #[must_use]
    pub fn with_voices_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.voices_dir = Some(dir.into());
        self
    }
}

candle_setters!(KokoroOptions);

/// One utterance with the values a parity check compares: see [`KokoroSynthesizer::trace`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct KokoroTrace {
    /// The audio at 24 kHz.
    pub samples: Vec<f32>,
    /// Frames per id before rounding (speed applied).
    pub durations: Vec<f32>,
    /// Frames per id after rounding (at least 1); a frame is 600 samples.
    pub frames: Vec<u32>,
}

/// A voice pack: one 256-value style per phoneme count.
#[derive(Debug, Clone)]
struct Pack {
    voice: Voice,
    rows: Vec<f32>,
    british: bool,
}

impl Pack {
    /// The style for an utterance of `phonemes` phonemes (Kokoro's `pack[len - 1]`).
    fn style(&self, phonemes: usize) -> &[f32] {
        let row = phonemes.clamp(1, PACK_ROWS) - 1;
        &self.rows[row * STYLE_WIDTH..(row + 1) * STYLE_WIDTH]
    }
}

/// Kokoro-82M v1.0 running natively on Candle, from its int8 ONNX export.
///
/// Load once per worker with [`KokoroSynthesizer::load`] and share it: inference takes
/// `&self` with no lock. Voices are the voice packs found in the voices directory (`af_heart`,
/// `am_adam`, `bf_emma`, ...; `b*` voices speak British English). A request's `speed` divides
/// the durations.
///
/// Licences: Kokoro's weights and voices are Apache-2.0 (hexgrad); the ONNX export and its
/// vocabulary are MIT (kokoro-onnx).
pub struct KokoroSynthesizer {
    model: Kokoro,
    packs: BTreeMap<String, Pack>,
    us: KokoroPhonemizer,
    gb: KokoroPhonemizer,
    device: Device,
    options: KokoroOptions,
}

impl fmt::Debug for KokoroSynthesizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KokoroSynthesizer")
            .field("device", &describe(&self.device))
            .field("voices", &self.packs.len())
            .finish_non_exhaustive()
    }
}

/// A prepared request: ids, style row, speed.
#[derive(Debug, Clone)]
struct Prepared {
    ids: Vec<u32>,
    style: Vec<f32>,
    speed: f32,
}

impl KokoroSynthesizer {
    /// Loads Kokoro: `model` is `kokoro-v1.0.int8.onnx`; the voice packs are the `*.bin` in
    /// [`KokoroOptions::voices_dir`] (default `voices/` beside the model).
    ///
    /// Every failure names the file or tensor at fault; [`KokoroError`] converts into
    /// [`TtsError::BackendUnavailable`]. Also checks that `espeak-ng` runs.
    pub fn load(model: impl AsRef<Path>, options: KokoroOptions) -> Result<Self, KokoroError> {
        let model_path = model.as_ref();
        options.candle.check()?;
        let voices_dir = options.voices_dir.clone().unwrap_or_else(|| {
            model_path
                .parent()
                .unwrap_or_else(|| Path::new("."))
                .join("voices")
        });
        let packs = read_packs(&voices_dir)?;
        let espeak = match &options.espeak {
            Some(path) => EspeakSynthesizer::with_binary(path),
            None => EspeakSynthesizer::new(),
        }
        .map_err(|e| LoadError::InvalidOption {
            option: "espeak",
            reason: e.to_string(),
        })?;
        let device = options.candle.device.open()?;
        let weights = Weights::read(model_path, &device)?;
        let model = Kokoro::load(&weights, &device, options.int8_activations)?;
        tracing::info!(
            model = %weights.path().display(),
            device = describe(&device),
            voices = packs.len(),
            "loaded Kokoro"
        );
        Ok(Self {
            model,
            packs,
            us: KokoroPhonemizer::new(espeak.binary(), false),
            gb: KokoroPhonemizer::new(espeak.binary(), true),
            device,
            options,
        })
    }

    /// Kokoro's phoneme string for `text` in `voice`'s accent.
    pub fn phonemes(&self, text: &str, voice: &str) -> Result<String, TtsError> {
        let pack = self.pack(voice)?;
        self.phonemizer(pack).phonemes(text)
    }

    /// The ids the model reads for `text` in `voice`'s accent, framed by the pad id, as
    /// [`trace`](Self::trace) and a reference runtime take them.
    pub fn phoneme_ids(&self, text: &str, voice: &str) -> Result<Vec<u32>, TtsError> {
        Ok(to_ids(&self.phonemes(text, voice)?))
    }

    /// Runs the model on given ids (pads included) with `voice`'s style and returns the
    /// audio with the durations, for comparison with a reference implementation
    /// (`tests/fixtures/kokoro_reference.py`).
    pub fn trace(&self, ids: &[u32], voice: &str, speed: f32) -> Result<KokoroTrace, TtsError> {
        let pack = self.pack(voice)?;
        self.check_ids(ids)?;
        let style = pack.style(ids.len().saturating_sub(2));
        let out = self
            .model
            .infer(ids, style, speed)
            .map_err(|e| TtsError::Backend(format!("Kokoro inference failed: {e}")))?;
        Ok(KokoroTrace {
            samples: out.audio,
            durations: out.durations,
            frames: out.frames,
        })
    }

    fn pack(&self, voice: &str) -> Result<&Pack, TtsError> {
        self.packs.get(voice).ok_or_else(|| TtsError::UnknownVoice {
            voice: voice.to_owned(),
            available: self.packs.keys().cloned().collect(),
        })
    }

    fn phonemizer(&self, pack: &Pack) -> &KokoroPhonemizer {
        if pack.british { &self.gb } else { &self.us }
    }

    fn check_ids(&self, ids: &[u32]) -> Result<(), TtsError> {
        let vocab = self.model.vocab();
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(TtsError::Backend(format!(
                "phoneme id {bad} is outside Kokoro's {vocab} symbols"
            )));
        }
        if ids.len() <= 2 {
            return Err(TtsError::EmptyText);
        }
        if ids.len() > self.model.max_len() {
            return Err(TtsError::TextTooLong {
                len: ids.len() - 2,
                max: self.model.max_len() - 2,
            });
        }
        Ok(())
    }

    fn prepare(&self, request: &SynthesisRequest) -> Result<Prepared, TtsError> {
        let pack = self.pack(&request.voice)?;
        let text = request.text.trim();
        if text.is_empty() {
            return Err(TtsError::EmptyText);
        }
        let speed = if request.speed.is_finite() && request.speed > 0.0 {
            request.speed
        } else {
            1.0
        };
        let phonemes = self.phonemizer(pack).phonemes(text)?;
        let ids = to_ids(&phonemes);
        self.check_ids(&ids)?;
        Ok(Prepared {
            style: pack.style(ids.len() - 2).to_vec(),
            ids,
            speed,
        })
    }

    fn run(&self, batch: &[Prepared]) -> Vec<Result<Audio, TtsError>> {
        // Instance norms and LSTMs span whole utterances: each runs on its own, so batched
        // output equals unbatched.
        batch
            .iter()
            .map(|p| {
                self.model
                    .infer(&p.ids, &p.style, p.speed)
                    .map(|o| Audio::new(o.audio, KOKORO_SAMPLE_RATE))
                    .map_err(|e| TtsError::Backend(format!("Kokoro inference failed: {e}")))
            })
            .collect()
    }
}

/// Reads every `*.bin` voice pack in `dir`, sorted by name.
fn read_packs(dir: &Path) -> Result<BTreeMap<String, Pack>, KokoroError> {
    let entries = std::fs::read_dir(dir).map_err(|e| LoadError::read(dir, &e))?;
    let mut packs = BTreeMap::new();
    for entry in entries {
        let path = entry.map_err(|e| LoadError::read(dir, &e))?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("bin") {
            continue;
        }
        let Some(id) = path.file_stem().and_then(|s| s.to_str()).map(str::to_owned) else {
            continue;
        };
        let bytes = std::fs::read(&path).map_err(|e| LoadError::read(&path, &e))?;
        if bytes.len() != PACK_ROWS * STYLE_WIDTH * 4 {
            return Err(KokoroError::InvalidVoice {
                path,
                reason: format!(
                    "{} bytes; a Kokoro voice pack is f32 [{PACK_ROWS}, 1, {STYLE_WIDTH}] ({} bytes)",
                    bytes.len(),
                    PACK_ROWS * STYLE_WIDTH * 4
                ),
            });
        }
        let rows: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        if rows.iter().any(|v| !v.is_finite()) {
            return Err(KokoroError::InvalidVoice {
                path,
                reason: "it holds values that are not finite numbers".into(),
            });
        }
        let british = id.starts_with('b');
        let language = if british { "en-GB" } else { "en-US" };
        let voice = Voice::new(id.clone(), id.clone())
            .with_language(language)
            .with_description(format!(
                "Kokoro-82M v1.0 voice `{id}` (24 kHz) on Candle; Apache-2.0 weights, MIT export"
            ));
        packs.insert(
            id,
            Pack {
                voice,
                rows,
                british,
            },
        );
    }
    if packs.is_empty() {
        return Err(LoadError::MissingFile {
            path: dir.join("af_heart.bin"),
        }
        .into());
    }
    Ok(packs)
}

impl Synthesizer for KokoroSynthesizer {
    fn voices(&self) -> Vec<Voice> {
        self.packs.values().map(|p| p.voice.clone()).collect()
    }

    fn sample_rate(&self) -> u32 {
        KOKORO_SAMPLE_RATE
    }

    fn synthesize(&self, request: &SynthesisRequest) -> Result<Audio, TtsError> {
        let prepared = self.prepare(request)?;
        self.run(std::slice::from_ref(&prepared))
            .pop()
            .unwrap_or_else(|| Err(TtsError::Backend("inference returned nothing".into())))
    }

    /// Prepares each request on its own (a failing one gets its own error) and runs them in
    /// chunks of `max_batch`; each utterance runs alone, so the audio equals what
    /// [`synthesize`](Self::synthesize) gives.
    fn synthesize_batch(&self, requests: &[SynthesisRequest]) -> Vec<Result<Audio, TtsError>> {
        run_batched(
            requests,
            self.options.candle.max_batch,
            |r| self.prepare(r),
            |batch| self.run(batch),
        )
    }
}
