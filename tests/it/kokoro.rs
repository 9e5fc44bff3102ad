//! Kokoro-82M v1.0 on Candle: loading errors, real speech at 24 kHz, parity with ONNX Runtime
//! end to end (tests/fixtures/kokoro_reference.json, made by kokoro_reference.py; the stage
//! by stage comparisons are in `src/tts/candle/kokoro/tests.rs`), speed, batching and a real
//! queue and worker.
//!
//! These tests need the model and voice packs in the cache `.ci/fetch-voices` fills
//! (`$VOXQUEUE_VOICES/kokoro`, default `~/.cache/voxqueue/voices/kokoro`) and fail, naming the
//! script, when they are missing.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use voxqueue::tts::candle::{
    DeviceChoice, KOKORO_MODEL_FILE, KokoroError, KokoroOptions, KokoroSynthesizer, LoadError,
};
use voxqueue::tts::{SynthesisRequest, Synthesizer};

use crate::common::voices::{fetched, rms, speaks_through_a_batching_queue_worker};

const VOICE: &str = "af_heart";

/// Where `.ci/fetch-voices` puts the model.
fn model_path() -> PathBuf {
    fetched(
        &format!("kokoro/{KOKORO_MODEL_FILE}"),
        "Kokoro (the model from PyPI, the voice packs from npm)",
    )
}

/// Kokoro on the CPU, loaded once for all tests.
fn kokoro() -> Arc<KokoroSynthesizer> {
    static MODEL: OnceLock<Arc<KokoroSynthesizer>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let options = KokoroOptions::new().with_device(DeviceChoice::Cpu);
            Arc::new(KokoroSynthesizer::load(model_path(), options).unwrap())
        })
        .clone()
}

fn fixture() -> serde_json::Value {
    serde_json::from_str(include_str!("../fixtures/kokoro_reference.json")).unwrap()
}

#[test]
fn kokoro_matches_onnx_runtime_end_to_end() {
    let fx = fixture();
    let model = kokoro();
    let text = fx["text"].as_str().unwrap();
    // Our eSpeak NG mapping gives the phonemes the reference script gave ORT.
    assert_eq!(
        model.phonemes(text, VOICE).unwrap(),
        fx["phonemes"].as_str().unwrap()
    );
    let ids: Vec<u32> = fx["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| u32::try_from(v.as_u64().unwrap()).unwrap())
        .collect();
    let trace = model.trace(&ids, VOICE, 1.0).unwrap();
    let expected: Vec<u32> = fx["pred_dur"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| u32::try_from(v.as_u64().unwrap()).unwrap())
        .collect();
    // int8: every quantised layer's input is rounded to 8 bits as ORT rounds it, but float
    // noise moves some values across a rounding step; the durations absorb most of it
    // (observed worst 0.25 frames before rounding) and after rounding are ORT's but for
    // phonemes that sit near a half frame (observed one of 47, one frame apart).
    let reference: Vec<f64> = fx["duration"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let worst = trace
        .durations
        .iter()
        .zip(&reference)
        .map(|(a, b)| (f64::from(*a) - b).abs())
        .fold(0.0, f64::max);
    assert!(worst < 0.35, "durations differ by {worst} frames");
    let off: Vec<usize> = (0..expected.len())
        .filter(|&i| trace.frames[i] != expected[i])
        .collect();
    assert!(off.len() <= 2, "{:?} vs {expected:?}", trace.frames);
    assert!(
        off.iter()
            .all(|&i| trace.frames[i].abs_diff(expected[i]) == 1)
    );
    // 600 samples a frame.
    let frames: u32 = trace.frames.iter().sum();
    assert_eq!(trace.samples.len(), frames as usize * 600);
    let reference_rms = fx["audio_rms"].as_f64().unwrap();
    let ours = rms(&trace.samples);
    eprintln!("audio rms {ours:.5}, ORT {reference_rms:.5}");
    assert!(
        (ours / reference_rms - 1.0).abs() < 0.1,
        "rms {ours} vs {reference_rms}"
    );
}

#[test]
fn kokoro_speaks_audibly_at_24_khz() {
    let model = kokoro();
    assert_eq!(model.sample_rate(), 24_000);
    let voices = model.voices();
    let heart = voices
        .iter()
        .find(|v| v.id == VOICE)
        .expect("af_heart is a voice");
    assert_eq!(heart.language.as_deref(), Some("en-US"));
    assert!(
        voices
            .iter()
            .any(|v| v.id == "bf_emma" && v.language.as_deref() == Some("en-GB"))
    );
    let audio = model
        .synthesize(&SynthesisRequest::new(
            "The quick brown fox jumps over the lazy dog.",
            VOICE,
        ))
        .unwrap();
    assert_eq!(audio.sample_rate, 24_000);
    let seconds = audio.samples.len() as f64 / 24_000.0;
    assert!((1.5..5.0).contains(&seconds), "{seconds} s");
    assert_eq!(audio.samples.len() % 600, 0);
    assert!(rms(&audio.samples) > 0.02, "rms {}", rms(&audio.samples));
    assert!(audio.samples.iter().all(|s| s.is_finite()));
}

#[test]
fn length_follows_the_speed() {
    let model = kokoro();
    let text = "A sentence of moderate length.";
    let phonemes = model.phonemes(text, VOICE).unwrap();
    assert!(!phonemes.is_empty());
    let at = |speed: f32| {
        let mut request = SynthesisRequest::new(text, VOICE);
        request.speed = speed;
        model.synthesize(&request).unwrap().samples.len() as f64
    };
    // Durations are divided by the speed, then rounded to whole frames (at least one).
    let ratio = at(1.0) / at(1.5);
    assert!(
        (1.3..1.7).contains(&ratio),
        "speed 1.5 is {ratio} times shorter"
    );
}

#[test]
fn batched_output_equals_unbatched() {
    let model = kokoro();
    let texts = ["Hi.", "A longer sentence, with a pause.", "Short one!"];
    let voices = [VOICE, "am_adam", "bf_emma"];
    let requests: Vec<SynthesisRequest> = texts
        .iter()
        .zip(voices)
        .map(|(t, v)| SynthesisRequest::new(*t, v))
        .collect();
    let batched = model.synthesize_batch(&requests);
    for (request, batched) in requests.iter().zip(batched) {
        let alone = model.synthesize(request).unwrap();
        // Each utterance runs on its own inside a batch: the very same samples.
        assert_eq!(batched.unwrap().samples, alone.samples, "{}", request.text);
    }
    // A request for an unknown voice fails alone.
    let mixed = [
        SynthesisRequest::new("Hello.", "no_such_voice"),
        SynthesisRequest::new("Hello.", VOICE),
    ];
    let results = model.synthesize_batch(&mixed);
    assert!(results[0].is_err());
    assert!(results[1].is_ok());
}

#[test]
fn loading_errors_name_what_is_wrong() {
    let real = model_path();
    let dir = tempfile::tempdir().unwrap();
    let cpu = || KokoroOptions::new().with_device(DeviceChoice::Cpu);

    // No voice packs beside the model.
    let alone = dir.path().join("alone").join(KOKORO_MODEL_FILE);
    std::fs::create_dir_all(alone.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(&real, &alone).unwrap();
    match KokoroSynthesizer::load(&alone, cpu()).unwrap_err() {
        KokoroError::Load(LoadError::MissingFile { path }) => {
            assert!(path.ends_with("voices"), "{}", path.display())
        }
        other => panic!("{other}"),
    }

    // A voice pack of the wrong size.
    let voices = dir.path().join("voices");
    std::fs::create_dir_all(&voices).unwrap();
    std::fs::write(voices.join("af_short.bin"), [0u8; 1024]).unwrap();
    match KokoroSynthesizer::load(&real, cpu().with_voices_dir(&voices)).unwrap_err() {
        KokoroError::InvalidVoice { path, .. } => assert!(path.ends_with("af_short.bin")),
        other => panic!("{other}"),
    }

    // The model file missing, with good voices.
    let good = real.parent().unwrap().join("voices");
    let missing = dir.path().join("missing.onnx");
    match KokoroSynthesizer::load(&missing, cpu().with_voices_dir(&good)).unwrap_err() {
        KokoroError::Load(LoadError::MissingFile { path }) => assert_eq!(path, missing),
        other => panic!("{other}"),
    }

    // Not ONNX at all.
    let junk = dir.path().join("junk.onnx");
    std::fs::write(&junk, b"\xff\xff\xff not a protobuf").unwrap();
    let err = KokoroSynthesizer::load(&junk, cpu().with_voices_dir(&good)).unwrap_err();
    assert!(matches!(err, KokoroError::InvalidModel { .. }), "{err}");

    // Options out of range.
    let err = KokoroSynthesizer::load(&real, cpu().with_max_batch(0)).unwrap_err();
    assert!(
        matches!(
            err,
            KokoroError::Load(LoadError::InvalidOption {
                option: "max_batch",
                ..
            })
        ),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kokoro_speaks_through_a_batching_queue_worker() {
    speaks_through_a_batching_queue_worker(kokoro(), VOICE, 24_000, Duration::from_secs(300)).await;
}
