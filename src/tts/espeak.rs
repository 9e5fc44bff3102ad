//! The offline backend: real speech with no model weights and no network, via `espeak-ng`.
//!
//! It exists so that examples, integration tests and CI can run the whole pipeline end to end
//! on any machine, and so that a deployment has a robotic-but-intelligible fallback when no
//! GPU model is available.
//!
//! The backend runs the `espeak-ng` *program* as a subprocess (text on stdin, WAV on stdout)
//! instead of linking `libespeak-ng`. eSpeak NG is GPL-3.0-or-later; calling a separate
//! executable keeps GPL code out of our users' binaries, and there is no C build or `unsafe`
//! FFI in this crate. The costs are a process start per chunk (a few milliseconds, small next
//! to synthesis) and the need to install the program (`apt-get install espeak-ng`).

use std::ffi::OsString;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::audio::{Audio, decode_wav};
use super::error::TtsError;
use super::request::SynthesisRequest;
use super::synthesizer::{Synthesizer, Voice};

/// The environment variable that overrides where the `espeak-ng` program is found.
pub const ESPEAK_NG_ENV: &str = "ESPEAK_NG";

const INSTALL_HINT: &str =
    "install with `apt-get install espeak-ng`, or set ESPEAK_NG to the program's path";

/// espeak-ng's natural rate, in words per minute; speed 1.0 maps to it.
const WPM_AT_SPEED_1: f32 = 175.0;

/// espeak-ng silently raises anything slower to this rate.
const MIN_WPM: u32 = 80;

/// Our voice ids, display names, BCP 47 tags, and the espeak-ng voice (`language+variant`)
/// each maps to. A short curated list rather than all of espeak-ng's ~100 voices: ids are
/// part of the public API and of dedup hashes, so each one we offer is a promise.
const VOICES: &[(&str, &str, &str, &str)] = &[
    ("en-us", "English (US), male", "en-US", "en-us"),
    ("en-us-female", "English (US), female", "en-US", "en-us+f3"),
    ("en-gb", "English (UK), male", "en-GB", "en-gb"),
    ("en-gb-female", "English (UK), female", "en-GB", "en-gb+f3"),
    ("de", "German", "de-DE", "de"),
    ("fr", "French", "fr-FR", "fr-fr"),
    ("es", "Spanish", "es-ES", "es"),
    ("it", "Italian", "it-IT", "it"),
];

/// Speaks through the `espeak-ng` program; see the [module docs](self) for why a
/// subprocess.
#[derive(Debug, Clone)]
pub struct EspeakSynthesizer {
    binary: PathBuf,
}

impl EspeakSynthesizer {
    /// Finds `espeak-ng` (the `ESPEAK_NG` environment variable, else `espeak-ng` on `PATH`)
    /// and checks that it runs.
    ///
    /// Checking here means a misconfigured worker fails at start-up with
    /// [`TtsError::BackendUnavailable`] and an install hint, instead of taking jobs it will
    /// fail.
    pub fn new() -> Result<Self, TtsError> {
        Self::with_binary(binary_from_env(std::env::var_os(ESPEAK_NG_ENV)))
    }

    /// Uses the `espeak-ng` program at `path` (or a bare name looked up on `PATH`), after
    /// checking that it runs.
    pub fn with_binary(path: impl Into<PathBuf>) -> Result<Self, TtsError> {
        let binary = path.into();
        let output = Command::new(&binary)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| {
                TtsError::backend_unavailable(
                    format!("cannot run `{}`: {e}", binary.display()),
                    INSTALL_HINT,
                )
            })?;
        if !output.status.success() {
            return Err(TtsError::backend_unavailable(
                format!(
                    "`{} --version` failed ({}): {}",
                    binary.display(),
                    output.status,
                    String::from_utf8_lossy(&output.stderr).trim()
                ),
                INSTALL_HINT,
            ));
        }
        tracing::debug!(
            binary = %binary.display(),
            version = %String::from_utf8_lossy(&output.stdout).trim(),
            "found espeak-ng"
        );
        Ok(Self { binary })
    }

    /// The program this backend runs.
    pub fn binary(&self) -> &Path {
        &self.binary
    }
}

/// The program to run: the override if set and not empty, else `espeak-ng` from `PATH`.
fn binary_from_env(value: Option<OsString>) -> PathBuf {
    match value {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => PathBuf::from("espeak-ng"),
    }
}

/// Words per minute for a speed factor. espeak-ng cannot go below 80 wpm (speed ≈ 0.46);
/// slower requests are clamped with a warning rather than refused, since the result is
/// still the slowest speech the backend can make.
fn words_per_minute(speed: f32) -> u32 {
    let wpm = (WPM_AT_SPEED_1 * speed).round();
    if !wpm.is_finite() || wpm < MIN_WPM as f32 {
        tracing::warn!(
            speed,
            min_wpm = MIN_WPM,
            "espeak-ng cannot speak this slowly; using its slowest rate"
        );
        return MIN_WPM;
    }
    wpm as u32
}

fn espeak_voice(id: &str) -> Option<&'static str> {
    VOICES.iter().find(|v| v.0 == id).map(|v| v.3)
}

impl Synthesizer for EspeakSynthesizer {
    fn voices(&self) -> Vec<Voice> {
        VOICES
            .iter()
            .map(|&(id, name, lang, espeak)| {
                Voice::new(id, name)
                    .with_language(lang)
                    .with_description(format!("eSpeak NG voice `{espeak}` (formant synthesis)"))
            })
            .collect()
    }

    /// espeak-ng's fixed output rate.
    fn sample_rate(&self) -> u32 {
        22050
    }

    fn synthesize(&self, request: &SynthesisRequest) -> Result<Audio, TtsError> {
        let voice = espeak_voice(&request.voice).ok_or_else(|| TtsError::UnknownVoice {
            voice: request.voice.clone(),
            available: VOICES.iter().map(|v| v.0.to_owned()).collect(),
        })?;
        let wpm = words_per_minute(request.speed);
        let mut child = Command::new(&self.binary)
            // Text on stdin, not argv: no length limit, and text starting with `-` cannot
            // be taken for an option. `-b 1`: the input is UTF-8.
            .args(["--stdout", "--stdin", "-b", "1", "-v", voice, "-s"])
            .arg(wpm.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => TtsError::backend_unavailable(
                    format!("`{}` not found: {e}", self.binary.display()),
                    INSTALL_HINT,
                ),
                _ => TtsError::Backend(format!("cannot start espeak-ng: {e}")),
            })?;
        let mut stdin = child
            .stdin
            .take()
            .ok_or_else(|| TtsError::Backend("espeak-ng stdin was not captured".into()))?;
        // Write from another thread while this one drains stdout: espeak-ng starts writing
        // audio before it has read all its input, and a full pipe each way would deadlock.
        let text = request.text.as_bytes();
        let (written, output) = std::thread::scope(|scope| {
            let writer = scope.spawn(move || {
                let result = stdin.write_all(text);
                drop(stdin); // end of input
                result
            });
            let output = child.wait_with_output();
            (writer.join(), output)
        });
        let output = output.map_err(|e| TtsError::Backend(format!("espeak-ng: {e}")))?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() {
            return Err(TtsError::Backend(format!(
                "espeak-ng exited with {}: {}",
                output.status,
                stderr.trim()
            )));
        }
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(TtsError::Backend(format!("writing to espeak-ng: {e}"))),
            Err(_) => return Err(TtsError::Backend("espeak-ng writer thread panicked".into())),
        }
        if !stderr.trim().is_empty() {
            tracing::warn!(stderr = %stderr.trim(), "espeak-ng reported problems");
        }
        decode_wav(&output.stdout)
            .map_err(|e| TtsError::Backend(format!("espeak-ng produced unreadable audio: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tts::{Limits, LongTextOptions, synthesize_long};

    /// The backend. A machine without espeak-ng fails these tests loudly rather than
    /// passing them untested: `.ci/setup` installs it.
    fn espeak() -> EspeakSynthesizer {
        EspeakSynthesizer::new()
            .unwrap_or_else(|e| panic!("espeak-ng must be installed (run .ci/setup): {e}"))
    }

    #[test]
    fn env_override_wins_unless_empty() {
        assert_eq!(binary_from_env(None), PathBuf::from("espeak-ng"));
        assert_eq!(binary_from_env(Some("".into())), PathBuf::from("espeak-ng"));
        assert_eq!(
            binary_from_env(Some("/opt/espeak/bin/espeak-ng".into())),
            PathBuf::from("/opt/espeak/bin/espeak-ng")
        );
    }

    /// The error a missing or broken espeak-ng gives: not a backend failure to retry,
    /// and it says how to install the program.
    fn assert_unavailable_with_hint(err: &TtsError) {
        assert!(
            matches!(err, TtsError::BackendUnavailable { .. }),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("apt-get install espeak-ng"),
            "{err}"
        );
    }

    #[test]
    fn missing_binary_is_backend_unavailable_with_install_hint() {
        let err = EspeakSynthesizer::with_binary("/nonexistent/espeak-ng").unwrap_err();
        assert_unavailable_with_hint(&err);
        assert!(!err.is_retryable());
    }

    #[test]
    fn a_binary_removed_after_the_check_is_backend_unavailable_at_synthesis() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("espeak-ng");
        std::fs::write(&path, "#!/bin/sh\nexit 0\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let synth = EspeakSynthesizer::with_binary(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let err = synth
            .synthesize(&SynthesisRequest::new("Hello.", "en-us"))
            .unwrap_err();
        assert_unavailable_with_hint(&err);
    }

    #[test]
    fn a_program_that_fails_is_backend_unavailable() {
        let err = EspeakSynthesizer::with_binary("false").unwrap_err();
        assert!(
            matches!(err, TtsError::BackendUnavailable { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn speed_maps_to_words_per_minute() {
        assert_eq!(words_per_minute(1.0), 175);
        assert_eq!(words_per_minute(2.0), 350);
        assert_eq!(words_per_minute(4.0), 700);
        assert_eq!(words_per_minute(0.25), MIN_WPM);
        assert_eq!(words_per_minute(f32::NAN), MIN_WPM);
    }

    #[test]
    fn voice_ids_are_unique_and_map_to_espeak_voices() {
        let mut ids: Vec<&str> = VOICES.iter().map(|v| v.0).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), VOICES.len());
        assert_eq!(espeak_voice("en-us-female"), Some("en-us+f3"));
        assert_eq!(espeak_voice("klingon"), None);
    }

    #[test]
    fn speaks_real_non_silent_audio() {
        let s = espeak();
        let audio = s
            .synthesize(&SynthesisRequest::new(
                "Hello world, this is a test.",
                "en-us",
            ))
            .unwrap();
        assert_eq!(audio.sample_rate, s.sample_rate());
        assert!(
            audio.duration().as_secs_f64() > 0.5,
            "{:?}",
            audio.duration()
        );
        assert!(!audio.is_silent(0.01), "rms {}", audio.rms());
    }

    #[test]
    fn every_offered_voice_works() {
        let s = espeak();
        for v in s.voices() {
            let audio = s
                .synthesize(&SynthesisRequest::new("Hello, one two three.", &v.id))
                .unwrap();
            assert!(!audio.is_silent(0.01), "{}", v.id);
        }
    }

    #[test]
    fn longer_text_gives_longer_audio_and_faster_speed_shorter() {
        let s = espeak();
        let short = s
            .synthesize(&SynthesisRequest::new("Hello.", "en-us"))
            .unwrap();
        let long_request = SynthesisRequest::new(
            "Hello. This sentence is a great deal longer than the first one.",
            "en-us",
        );
        let long = s.synthesize(&long_request).unwrap();
        assert!(
            long.duration() > short.duration() * 2,
            "{:?} vs {:?}",
            long.duration(),
            short.duration()
        );
        let fast = s.synthesize(&long_request.clone().with_speed(2.0)).unwrap();
        assert!(
            fast.duration() < long.duration(),
            "{:?} vs {:?}",
            fast.duration(),
            long.duration()
        );
    }

    #[test]
    fn text_that_looks_like_an_option_is_spoken_not_parsed() {
        let s = espeak();
        let audio = s
            .synthesize(&SynthesisRequest::new("-v xx --help", "en-us"))
            .unwrap();
        assert!(!audio.is_silent(0.01));
    }

    #[test]
    fn unknown_voice_is_rejected_by_validate_and_by_synthesize() {
        let s = espeak();
        let request = SynthesisRequest::new("Hello.", "klingon");
        let err = request
            .validate(&Limits::default(), &s.voices())
            .unwrap_err();
        assert!(err.is_invalid_request());
        match err {
            TtsError::UnknownVoice { available, .. } => {
                assert!(available.contains(&"en-us".into()))
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            s.synthesize(&request),
            Err(TtsError::UnknownVoice { .. })
        ));
    }

    #[test]
    fn long_text_end_to_end_with_captions_and_wav() {
        let s = espeak();
        let request = SynthesisRequest::new(
            "Dr. Smith arrived at noon. She said hello! Then everyone left.",
            "en-gb",
        )
        .with_sample_rate(16000);
        let out =
            synthesize_long(&s, &request, &LongTextOptions::default(), &mut |_, _| true).unwrap();
        assert_eq!(out.captions.len(), 3);
        assert_eq!(out.captions[0].text, "Dr. Smith arrived at noon.");
        assert_eq!(out.audio.sample_rate, 16000);
        assert_eq!(out.captions[2].end, out.audio.duration());
        let wav = out.audio.encode(request.format).unwrap();
        let back = decode_wav(&wav).unwrap();
        assert_eq!(back.samples.len(), out.audio.samples.len());
    }
}
