//! What a caller asks for, and the limits it is checked against.
//!
//! A [`SynthesisRequest`] is the job payload: the producer validates it before enqueueing (so
//! a bad request is a typed error at the API, not a dead letter an hour later), the queue
//! hashes its [`dedup_fields`](SynthesisRequest::dedup_fields) to coalesce identical work,
//! and the worker hands it to a [`Synthesizer`](super::Synthesizer).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::error::TtsError;
use super::synthesizer::Voice;
use super::text::normalize;

/// How the finished audio is delivered.
///
/// Every format is mono. WAV is the default because it is self-describing (it carries its
/// sample rate); the raw formats exist for callers that feed a player or a further pipeline
/// directly and would only strip the header again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum AudioFormat {
    /// A RIFF/WAVE file with 16-bit signed PCM samples.
    #[default]
    Wav,
    /// Headerless 16-bit signed little-endian PCM (`s16le`).
    PcmI16,
    /// Headerless 32-bit float little-endian PCM (`f32le`), samples in -1..=1.
    PcmF32,
}

impl AudioFormat {
    /// The media type to send in `Content-Type`.
    ///
    /// The raw formats answer `application/octet-stream`: the registered `audio/L16` means
    /// *big-endian* samples (RFC 2586) and there is no registered type for float PCM, so a
    /// specific label would mislead more than it helps. Raw consumers must know the sample
    /// rate from elsewhere (the job's metadata) anyway.
    pub fn mime_type(self) -> &'static str {
        match self {
            Self::Wav => "audio/wav",
            Self::PcmI16 | Self::PcmF32 => "application/octet-stream",
        }
    }

    /// A file extension (without the dot) for stored results.
    ///
    /// The raw formats use the names ffmpeg and sox give these sample layouts, so a file can
    /// be played with e.g. `ffplay -f s16le -ar 22050 -ac 1 out.s16le`.
    pub fn extension(self) -> &'static str {
        match self {
            Self::Wav => "wav",
            Self::PcmI16 => "s16le",
            Self::PcmF32 => "f32le",
        }
    }
}

fn default_speed() -> f32 {
    1.0
}

/// One text-to-speech job: what to say, in which voice, and how to deliver it.
///
/// Fields are public because this is a plain payload that travels as JSON; build it with
/// [`SynthesisRequest::new`] and the `with_*` methods, which keep working when fields are
/// added.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SynthesisRequest {
    /// The text to speak. Normalised (see [`normalize`]) before validation, hashing and
    /// synthesis, so callers may send it as they have it.
    pub text: String,
    /// A voice id from [`Synthesizer::voices`](super::Synthesizer::voices).
    pub voice: String,
    /// A BCP 47 language tag for backends that speak several languages with one voice;
    /// `None` lets the voice decide.
    #[serde(default)]
    pub language: Option<String>,
    /// Speaking rate relative to the voice's natural pace (1.0); 2.0 is twice as fast.
    #[serde(default = "default_speed")]
    pub speed: f32,
    /// Output sample rate in Hz; `None` keeps the backend's native rate and avoids a
    /// resampling pass.
    #[serde(default)]
    pub sample_rate: Option<u32>,
    /// How the audio is encoded for delivery.
    #[serde(default)]
    pub format: AudioFormat,
    /// A free-text description of the delivery ("calm, low voice") for models that are
    /// prompted with one; others ignore it.
    #[serde(default)]
    pub style: Option<String>,
    /// Backend-specific options with no place in the common schema (seed, temperature, ...).
    /// They change the audio, so they take part in deduplication.
    #[serde(default)]
    pub extra: Map<String, Value>,
}

impl SynthesisRequest {
    /// A request with default speed (1.0), native sample rate, WAV output and no options.
    pub fn new(text: impl Into<String>, voice: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            voice: voice.into(),
            language: None,
            speed: default_speed(),
            sample_rate: None,
            format: AudioFormat::default(),
            style: None,
            extra: Map::new(),
        }
    }

    /// Sets the speaking rate (1.0 = natural).
    #[must_use]
    pub fn with_speed(mut self, speed: f32) -> Self {
        self.speed = speed;
        self
    }

    /// Asks for output at `rate` Hz instead of the backend's native rate.
    #[must_use]
    pub fn with_sample_rate(mut self, rate: u32) -> Self {
        self.sample_rate = Some(rate);
        self
    }

    /// Sets the delivery format.
    #[must_use]
    pub fn with_format(mut self, format: AudioFormat) -> Self {
        self.format = format;
        self
    }

    /// Sets the language tag (BCP 47, e.g. `en-US`).
    #[must_use]
    pub fn with_language(mut self, language: impl Into<String>) -> Self {
        self.language = Some(language.into());
        self
    }

    /// Sets the style prompt for models that take one.
    #[must_use]
    pub fn with_style(mut self, style: impl Into<String>) -> Self {
        self.style = Some(style.into());
        self
    }

    /// Adds one backend-specific option, replacing an earlier value under the same key.
    #[must_use]
    pub fn with_extra(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.extra.insert(key.into(), value.into());
        self
    }

    /// Checks the request against `limits` and, when `voices` is not empty, against the
    /// voices a backend offers.
    ///
    /// Called on enqueue so that nothing invalid reaches a worker. Text is measured after
    /// normalisation, in `char`s, since that is what the backend will get. An empty `voices`
    /// skips the voice check, for producers that do not know the workers' backend.
    pub fn validate(&self, limits: &Limits, voices: &[Voice]) -> Result<(), TtsError> {
        let text = normalize(&self.text);
        if text.is_empty() {
            return Err(TtsError::EmptyText);
        }
        let len = text.chars().count();
        if len > limits.max_chars {
            return Err(TtsError::TextTooLong {
                len,
                max: limits.max_chars,
            });
        }
        if !voices.is_empty() && !voices.iter().any(|v| v.id == self.voice) {
            return Err(TtsError::UnknownVoice {
                voice: self.voice.clone(),
                available: voices.iter().map(|v| v.id.clone()).collect(),
            });
        }
        // `contains` is false for NaN, so a NaN speed is rejected too.
        if !(limits.min_speed..=limits.max_speed).contains(&self.speed) {
            return Err(TtsError::SpeedOutOfRange {
                speed: self.speed,
                min: limits.min_speed,
                max: limits.max_speed,
            });
        }
        if let Some(rate) = self.sample_rate
            && !(limits.min_sample_rate..=limits.max_sample_rate).contains(&rate)
        {
            return Err(TtsError::SampleRateOutOfRange {
                rate,
                min: limits.min_sample_rate,
                max: limits.max_sample_rate,
            });
        }
        Ok(())
    }

    /// The same request with its text [`normalize`]d — what backends are given.
    #[must_use]
    pub fn normalized(&self) -> SynthesisRequest {
        SynthesisRequest {
            text: normalize(&self.text),
            ..self.clone()
        }
    }

    /// Everything that changes the audio, as one JSON object: the normalised text, `voice`,
    /// `language`, `speed`, `sample_rate`, `format`, `style` and `extra`.
    ///
    /// This is what makes two requests "the same": the queue hashes the canonical (sorted,
    /// compact) serialisation of this value to coalesce duplicate jobs and reuse results.
    /// Fields added to the request later must be added here only if they change the output
    /// (a callback URL, say, must not), and absent options appear as `null` so that the key
    /// set, and therefore the hash, never depends on which options were given. `None` and
    /// the native rate written explicitly count as different, since the layer cannot know a
    /// backend's native rate when the producer hashes.
    pub fn dedup_fields(&self) -> Value {
        let mut map = Map::new();
        map.insert("text".into(), Value::String(normalize(&self.text)));
        map.insert("voice".into(), Value::String(self.voice.clone()));
        map.insert("language".into(), option_string(&self.language));
        map.insert("speed".into(), Value::from(f64::from(self.speed)));
        map.insert(
            "sample_rate".into(),
            self.sample_rate.map_or(Value::Null, Value::from),
        );
        map.insert(
            "format".into(),
            serde_json::to_value(self.format).unwrap_or(Value::Null),
        );
        map.insert("style".into(), option_string(&self.style));
        map.insert("extra".into(), Value::Object(self.extra.clone()));
        Value::Object(map)
    }
}

fn option_string(value: &Option<String>) -> Value {
    value.clone().map_or(Value::Null, Value::String)
}

/// The operator's bounds on requests, checked by [`SynthesisRequest::validate`].
///
/// They protect workers: text length bounds how long one job holds a GPU, and the speed and
/// sample-rate ranges keep requests inside what backends and the resampler handle well.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Limits {
    /// Longest accepted text, in `char`s after normalisation (default 5000).
    pub max_chars: usize,
    /// Slowest accepted speed factor (default 0.25).
    pub min_speed: f32,
    /// Fastest accepted speed factor (default 4.0).
    pub max_speed: f32,
    /// Lowest accepted output sample rate in Hz (default 8000, telephone quality).
    pub min_sample_rate: u32,
    /// Highest accepted output sample rate in Hz (default 48000; more adds bytes, not sound).
    pub max_sample_rate: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_chars: 5000,
            min_speed: 0.25,
            max_speed: 4.0,
            min_sample_rate: 8000,
            max_sample_rate: 48000,
        }
    }
}

impl Limits {
    /// The default limits (same as [`Default`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the longest accepted text, in characters.
    #[must_use]
    pub fn with_max_chars(mut self, max_chars: usize) -> Self {
        self.max_chars = max_chars;
        self
    }

    /// Sets the accepted speed range (inclusive).
    #[must_use]
    pub fn with_speed_range(mut self, min: f32, max: f32) -> Self {
        self.min_speed = min;
        self.max_speed = max;
        self
    }

    /// Sets the accepted output sample-rate range in Hz (inclusive).
    #[must_use]
    pub fn with_sample_rate_range(mut self, min: u32, max: u32) -> Self {
        self.min_sample_rate = min;
        self.max_sample_rate = max;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn voices() -> Vec<Voice> {
        vec![Voice::new("en-us", "English"), Voice::new("de", "German")]
    }

    fn ok() -> SynthesisRequest {
        SynthesisRequest::new("Hello there.", "en-us")
    }

    #[test]
    fn new_has_documented_defaults() {
        let r = ok();
        assert_eq!(r.speed, 1.0);
        assert_eq!(r.sample_rate, None);
        assert_eq!(r.format, AudioFormat::Wav);
        assert_eq!(r.language, None);
        assert_eq!(r.style, None);
        assert!(r.extra.is_empty());
    }

    #[test]
    fn builders_set_every_field() {
        let r = ok()
            .with_speed(1.5)
            .with_sample_rate(16000)
            .with_format(AudioFormat::PcmF32)
            .with_language("en-US")
            .with_style("whispering")
            .with_extra("seed", 7)
            .with_extra("seed", 8);
        assert_eq!(r.speed, 1.5);
        assert_eq!(r.sample_rate, Some(16000));
        assert_eq!(r.format, AudioFormat::PcmF32);
        assert_eq!(r.language.as_deref(), Some("en-US"));
        assert_eq!(r.style.as_deref(), Some("whispering"));
        assert_eq!(r.extra.get("seed"), Some(&json!(8)));
    }

    #[test]
    fn deserialises_minimal_json_with_defaults() {
        let r: SynthesisRequest =
            serde_json::from_value(json!({"text": "Hi", "voice": "en-us"})).unwrap();
        assert_eq!(r, SynthesisRequest::new("Hi", "en-us"));
    }

    #[test]
    fn serde_round_trips() {
        let r = ok()
            .with_format(AudioFormat::PcmI16)
            .with_sample_rate(8000)
            .with_extra("k", json!({"a": [1, 2]}));
        let s = serde_json::to_string(&r).unwrap();
        assert!(s.contains("\"format\":\"pcm_i16\""), "{s}");
        let back: SynthesisRequest = serde_json::from_str(&s).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn audio_format_labels() {
        assert_eq!(AudioFormat::Wav.mime_type(), "audio/wav");
        assert_eq!(AudioFormat::Wav.extension(), "wav");
        assert_eq!(AudioFormat::PcmI16.extension(), "s16le");
        assert_eq!(AudioFormat::PcmF32.extension(), "f32le");
        assert_eq!(AudioFormat::PcmF32.mime_type(), "application/octet-stream");
        assert_eq!(
            serde_json::to_value(AudioFormat::PcmF32).unwrap(),
            json!("pcm_f32")
        );
    }

    #[test]
    fn valid_request_passes() {
        ok().validate(&Limits::default(), &voices()).unwrap();
        ok().with_sample_rate(48000)
            .with_speed(4.0)
            .validate(&Limits::default(), &voices())
            .unwrap();
    }

    #[test]
    fn empty_or_whitespace_text_is_rejected() {
        for text in ["", "   ", "\n\t\u{7}"] {
            let err = SynthesisRequest::new(text, "en-us")
                .validate(&Limits::default(), &voices())
                .unwrap_err();
            assert!(matches!(err, TtsError::EmptyText), "{text:?}");
            assert!(err.is_invalid_request());
        }
    }

    #[test]
    fn length_is_counted_in_chars_after_normalisation() {
        let limits = Limits::new().with_max_chars(5);
        // 5 chars after collapsing whitespace, 10 bytes of UTF-8.
        SynthesisRequest::new("  ääää   ä ", "en-us")
            .validate(&limits, &[])
            .unwrap_err();
        SynthesisRequest::new("  ää   ää ", "en-us")
            .validate(&limits, &[])
            .unwrap();
        let err = SynthesisRequest::new("abcdef", "en-us")
            .validate(&limits, &[])
            .unwrap_err();
        assert!(matches!(err, TtsError::TextTooLong { len: 6, max: 5 }));
    }

    #[test]
    fn unknown_voice_lists_the_available_ones() {
        let err = SynthesisRequest::new("Hi", "klingon")
            .validate(&Limits::default(), &voices())
            .unwrap_err();
        match err {
            TtsError::UnknownVoice { voice, available } => {
                assert_eq!(voice, "klingon");
                assert_eq!(available, ["en-us", "de"]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn empty_voice_list_skips_the_voice_check() {
        SynthesisRequest::new("Hi", "anything")
            .validate(&Limits::default(), &[])
            .unwrap();
    }

    #[test]
    fn speed_out_of_range_or_nan_is_rejected() {
        for speed in [0.0, 0.24, 4.01, -1.0, f32::NAN, f32::INFINITY] {
            let err = ok()
                .with_speed(speed)
                .validate(&Limits::default(), &voices())
                .unwrap_err();
            assert!(
                matches!(
                    err,
                    TtsError::SpeedOutOfRange {
                        min: 0.25,
                        max: 4.0,
                        ..
                    }
                ),
                "{speed}"
            );
        }
        let narrow = Limits::new().with_speed_range(0.5, 2.0);
        ok().with_speed(0.5).validate(&narrow, &[]).unwrap();
        // 2.5 passes the default range; the narrower one refuses it and says its bounds.
        ok().with_speed(2.5).validate(&Limits::new(), &[]).unwrap();
        let err = ok().with_speed(2.5).validate(&narrow, &[]).unwrap_err();
        assert!(
            matches!(
                err,
                TtsError::SpeedOutOfRange {
                    min: 0.5,
                    max: 2.0,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn sample_rate_out_of_range_is_rejected() {
        for rate in [0, 7999, 48001, 96000] {
            let err = ok()
                .with_sample_rate(rate)
                .validate(&Limits::default(), &voices())
                .unwrap_err();
            assert!(
                matches!(err, TtsError::SampleRateOutOfRange { rate: r, min: 8000, max: 48000 } if r == rate)
            );
        }
        ok().with_sample_rate(96000)
            .validate(&Limits::new().with_sample_rate_range(8000, 96000), &[])
            .unwrap();
    }

    #[test]
    fn normalized_only_touches_text() {
        let r = SynthesisRequest::new("  Cafe\u{301}\n\nok ", "de").with_speed(2.0);
        let n = r.normalized();
        assert_eq!(n.text, "Caf\u{e9} ok");
        assert_eq!(n.normalized(), n);
        assert_eq!(
            SynthesisRequest {
                text: r.text.clone(),
                ..n
            },
            r
        );
    }

    #[test]
    fn dedup_fields_has_exactly_the_audio_relevant_keys() {
        let v = ok().dedup_fields();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        let mut keys = keys;
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "extra",
                "format",
                "language",
                "sample_rate",
                "speed",
                "style",
                "text",
                "voice"
            ]
        );
        assert_eq!(
            v,
            json!({
                "text": "Hello there.", "voice": "en-us", "language": null, "speed": 1.0,
                "sample_rate": null, "format": "wav", "style": null, "extra": {}
            })
        );
    }

    #[test]
    fn requests_differing_only_in_invisible_ways_dedup_equal() {
        let a = SynthesisRequest::new("Cafe\u{301}  is\topen.", "en-us");
        let b = SynthesisRequest::new(" Caf\u{e9} is open.\n", "en-us");
        assert_eq!(a.dedup_fields(), b.dedup_fields());
    }

    #[test]
    fn every_audio_relevant_change_changes_dedup_fields() {
        let base = ok();
        let variants = [
            SynthesisRequest::new("hello there.", "en-us"),
            SynthesisRequest::new("Hello there.", "de"),
            base.clone().with_language("en-GB"),
            base.clone().with_speed(1.1),
            base.clone().with_sample_rate(22050),
            base.clone().with_format(AudioFormat::PcmI16),
            base.clone().with_style("angry"),
            base.clone().with_extra("seed", 1),
        ];
        for v in variants {
            assert_ne!(v.dedup_fields(), base.dedup_fields(), "{v:?}");
        }
    }
}
