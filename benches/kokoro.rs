//! Kokoro-82M on the CPU: real-time factor for a sentence of about ten seconds, with ONNX
//! Runtime timed in the same run on the same threads when Python has it
//! (`pip install -r tests/fixtures/kokoro-requirements.txt`).
//!
//! Needs the model and voice packs (`.ci/fetch-voices`); without them the bench says so and
//! measures nothing.

use std::path::PathBuf;

use criterion::{Criterion, criterion_group};
use voxqueue::tts::candle::{DeviceChoice, KOKORO_MODEL_FILE, KokoroOptions, KokoroSynthesizer};
use voxqueue::tts::{SynthesisRequest, Synthesizer};

use crate::realtime;

const VOICE: &str = "af_heart";

/// About ten seconds of speech (the sentence of the Piper bench).
const TEXT: &str = "The old lighthouse keeper climbed the narrow stairs every evening, \
    lit the great lamp, and watched the ships pass safely through the rocky channel \
    until the morning sun rose over the quiet harbour.";

fn model_path() -> Option<PathBuf> {
    let dir = std::env::var_os("VOXQUEUE_VOICES")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/voxqueue/voices"))
        })?;
    let path = dir.join("kokoro").join(KOKORO_MODEL_FILE);
    path.exists().then_some(path)
}

fn kokoro(c: &mut Criterion) {
    let Some(path) = model_path() else {
        eprintln!("kokoro/cpu: no model; run .ci/fetch-voices to bench Kokoro-82M");
        return;
    };
    let options = KokoroOptions::new().with_device(DeviceChoice::Cpu);
    let synth = KokoroSynthesizer::load(&path, options).expect("load Kokoro");
    let request = SynthesisRequest::new(TEXT, VOICE);
    let audio = synth.synthesize(&request).expect("synthesis");
    let seconds = audio.samples.len() as f64 / f64::from(audio.sample_rate);

    let mut g = c.benchmark_group("kokoro/cpu");
    g.sample_size(10);
    g.bench_function("af_heart-10s", |b| {
        b.iter(|| synth.synthesize(&request).expect("synthesis"))
    });
    g.finish();

    // Real-time factors, reported once beside ONNX Runtime's (criterion times above).
    let ours = realtime::mean_seconds(3, || {
        synth.synthesize(&request).expect("synthesis");
    });
    let threads = realtime::threads();
    let ids = synth.phoneme_ids(TEXT, VOICE).expect("phonemes");
    let pack = path.with_file_name("voices").join(format!("{VOICE}.bin"));
    let args = vec![
        path.into(),
        pack.into(),
        threads.to_string().into(),
        "5".into(),
    ];
    let ort = realtime::onnx_runtime("kokoro_ort_timing.py", args, &ids);
    realtime::report("kokoro/cpu", seconds, ours, threads, ort);
}

criterion_group!(benches, kokoro);
