//! The voice's `.onnx.json`: sample rate, phoneme alphabet, eSpeak NG voice and the
//! synthesis defaults its authors chose.

use crate::tts::candle::error::LoadError;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::Deserialize;

use super::error::PiperError;

/// What voxqueue uses of a Piper voice config.
#[derive(Debug, Clone)]
pub(crate) struct VoiceConfig {
    pub(crate) sample_rate: u32,
    /// The eSpeak NG voice that phonemizes for it, e.g. `en-us`.
    pub(crate) espeak_voice: String,
    pub(crate) noise_scale: f32,
    pub(crate) length_scale: f32,
    pub(crate) noise_w: f32,
    /// Each phoneme (one Unicode scalar) and the ids it becomes.
    pub(crate) phoneme_ids: HashMap<char, Vec<u32>>,
    pub(crate) num_speakers: usize,
    /// Speaker names of a multi-speaker voice, by id.
    pub(crate) speakers: BTreeMap<String, u32>,
    /// BCP 47 language tag, e.g. `en-US`.
    pub(crate) language: Option<String>,
    /// The dataset (speaker) name, e.g. `joe`.
    pub(crate) dataset: Option<String>,
    /// `low`, `medium`, `high`.
    pub(crate) quality: Option<String>,
}

#[derive(Deserialize)]
struct Raw {
    audio: RawAudio,
    #[serde(default)]
    espeak: Option<RawEspeak>,
    #[serde(default)]
    inference: RawInference,
    #[serde(default)]
    phoneme_type: Option<String>,
    phoneme_id_map: HashMap<String, Vec<i64>>,
    #[serde(default)]
    num_speakers: Option<usize>,
    #[serde(default)]
    speaker_id_map: BTreeMap<String, u32>,
    #[serde(default)]
    language: Option<RawLanguage>,
    #[serde(default)]
    dataset: Option<String>,
}

#[derive(Deserialize)]
struct RawAudio {
    sample_rate: i64,
    #[serde(default)]
    quality: Option<String>,
}

#[derive(Deserialize)]
struct RawEspeak {
    voice: String,
}

#[derive(Deserialize)]
struct RawInference {
    #[serde(default = "default_noise_scale")]
    noise_scale: f32,
    #[serde(default = "default_length_scale")]
    length_scale: f32,
    #[serde(default = "default_noise_w")]
    noise_w: f32,
}

impl Default for RawInference {
    fn default() -> Self {
        Self {
            noise_scale: default_noise_scale(),
            length_scale: default_length_scale(),
            noise_w: default_noise_w(),
        }
    }
}

// Piper's own defaults, used when a config leaves `inference` out.
fn default_noise_scale() -> f32 {
    0.667
}
fn default_length_scale() -> f32 {
    1.0
}
fn default_noise_w() -> f32 {
    0.8
}

#[derive(Deserialize)]
struct RawLanguage {
    code: String,
}

impl VoiceConfig {
    /// Reads and checks a voice config.
    pub(crate) fn read(path: &Path) -> Result<Self, PiperError> {
        let text = std::fs::read_to_string(path).map_err(|e| LoadError::read(path, &e))?;
        Self::parse(path, &text)
    }

    fn parse(path: &Path, text: &str) -> Result<Self, PiperError> {
        let invalid = |reason: String| PiperError::InvalidConfig {
            path: path.to_owned(),
            reason,
        };
        let raw: Raw = serde_json::from_str(text).map_err(|e| invalid(e.to_string()))?;
        if !(8_000..=48_000).contains(&raw.audio.sample_rate) {
            return Err(PiperError::SampleRate {
                path: path.to_owned(),
                found: raw.audio.sample_rate,
            });
        }
        let sample_rate = u32::try_from(raw.audio.sample_rate).unwrap_or(22_050);
        match raw.phoneme_type.as_deref() {
            None | Some("espeak") => {}
            Some(other) => {
                return Err(invalid(format!(
                    "phoneme_type {other:?}: only eSpeak NG phonemes are supported"
                )));
            }
        }
        let espeak_voice = raw
            .espeak
            .map(|e| e.voice)
            .ok_or_else(|| invalid("no espeak.voice to phonemize with".into()))?;
        let mut phoneme_ids = HashMap::with_capacity(raw.phoneme_id_map.len());
        for (phoneme, ids) in raw.phoneme_id_map {
            let mut chars = phoneme.chars();
            let (Some(c), None) = (chars.next(), chars.next()) else {
                return Err(invalid(format!(
                    "phoneme_id_map key {phoneme:?} is not one character"
                )));
            };
            let ids = ids
                .into_iter()
                .map(|id| {
                    u32::try_from(id)
                        .map_err(|_| invalid(format!("phoneme {phoneme:?} has id {id}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            phoneme_ids.insert(c, ids);
        }
        for required in [PAD, BOS, EOS] {
            if !phoneme_ids.contains_key(&required) {
                return Err(invalid(format!(
                    "phoneme_id_map has no {required:?} (Piper's pad, start and end symbols)"
                )));
            }
        }
        let inference = raw.inference;
        for (name, value) in [
            ("noise_scale", inference.noise_scale),
            ("length_scale", inference.length_scale),
            ("noise_w", inference.noise_w),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                return Err(invalid(format!("inference.{name} {value} is not >= 0")));
            }
        }
        if inference.length_scale <= 0.0 {
            return Err(invalid("inference.length_scale must be above 0".into()));
        }
        Ok(Self {
            sample_rate,
            espeak_voice,
            noise_scale: inference.noise_scale,
            length_scale: inference.length_scale,
            noise_w: inference.noise_w,
            phoneme_ids,
            num_speakers: raw.num_speakers.unwrap_or(1).max(1),
            speakers: raw.speaker_id_map,
            language: raw.language.map(|l| l.code.replace('_', "-")),
            dataset: raw.dataset,
            quality: raw.audio.quality,
        })
    }

    /// The largest id any phoneme maps to, to check against the model's embedding.
    pub(crate) fn max_id(&self) -> u32 {
        self.phoneme_ids
            .values()
            .flatten()
            .copied()
            .max()
            .unwrap_or(0)
    }
}

/// Piper's padding symbol, put between phonemes.
pub(crate) const PAD: char = '_';
/// Piper's start-of-utterance symbol.
pub(crate) const BOS: char = '^';
/// Piper's end-of-utterance symbol.
pub(crate) const EOS: char = '$';

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"{"audio": {"sample_rate": 22050}, "espeak": {"voice": "en-us"},
        "phoneme_id_map": {"_": [0], "^": [1], "$": [2], "a": [14]}}"#;

    #[test]
    fn a_minimal_config_gets_piper_defaults() {
        let c = VoiceConfig::parse(Path::new("v.onnx.json"), MINIMAL).unwrap();
        assert_eq!(c.sample_rate, 22050);
        assert_eq!(c.espeak_voice, "en-us");
        assert_eq!(
            (c.noise_scale, c.length_scale, c.noise_w),
            (0.667, 1.0, 0.8)
        );
        assert_eq!(c.phoneme_ids[&'a'], vec![14]);
        assert_eq!(c.max_id(), 14);
        assert_eq!(c.num_speakers, 1);
    }

    #[test]
    fn an_impossible_sample_rate_is_refused() {
        let text = MINIMAL.replace("22050", "441");
        let err = VoiceConfig::parse(Path::new("v.onnx.json"), &text).unwrap_err();
        assert!(
            matches!(err, PiperError::SampleRate { found: 441, .. }),
            "{err}"
        );
    }

    #[test]
    fn a_config_without_piper_symbols_is_refused() {
        let text = MINIMAL.replace(r#""^": [1], "#, "");
        let err = VoiceConfig::parse(Path::new("v.onnx.json"), &text).unwrap_err();
        assert!(matches!(err, PiperError::InvalidConfig { .. }), "{err}");
    }
}
