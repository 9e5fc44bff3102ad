//! The Piper voice `en_US-joe-medium` on the CPU: real-time factor for a sentence of about
//! ten seconds, with ONNX Runtime timed in the same run on the same threads when Python
//! has it (`pip install -r tests/fixtures/piper-requirements.txt`).
//!
//! Needs the voice (`.ci/fetch-voices`); without it the bench says so and measures nothing.

use std::path::PathBuf;

use criterion::{Criterion, criterion_group};
use voxqueue::tts::candle::{DeviceChoice, PiperOptions, PiperSynthesizer};
use voxqueue::tts::{SynthesisRequest, Synthesizer};

use crate::realtime;

const VOICE: &str = "en_US-joe-medium";

/// About ten seconds of speech.
const TEXT: &str = "The old lighthouse keeper climbed the narrow stairs every evening, \
    lit the great lamp, and watched the ships pass safely through the rocky channel \
    until the morning sun rose over the quiet harbour.";

fn voice_path() -> Option<PathBuf> {
    let dir = std::env::var_os("VOXQUEUE_VOICES")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/voxqueue/voices"))
        })?;
    let path = dir.join(format!("{VOICE}.onnx"));
    path.exists().then_some(path)
}

fn piper(c: &mut Criterion) {
    let Some(path) = voice_path() else {
        eprintln!("piper/cpu: no voice; run .ci/fetch-voices to bench {VOICE}");
        return;
    };
    let options = PiperOptions::new().with_device(DeviceChoice::Cpu);
    let synth = PiperSynthesizer::load(&path, options).expect("load the Piper voice");
    let request = SynthesisRequest::new(TEXT, VOICE);
    let audio = synth.synthesize(&request).expect("synthesis");
    let seconds = audio.samples.len() as f64 / f64::from(audio.sample_rate);

    let mut g = c.benchmark_group("piper/cpu");
    g.sample_size(10);
    g.bench_function("joe-medium-10s", |b| {
        b.iter(|| synth.synthesize(&request).expect("synthesis"))
    });
    g.finish();

    // Real-time factors, reported once beside ONNX Runtime's (criterion times above).
    let ours = realtime::mean_seconds(5, || {
        synth.synthesize(&request).expect("synthesis");
    });
    let threads = realtime::threads();
    let ids = synth.phoneme_ids(TEXT).expect("phonemes");
    let args = vec![path.into(), threads.to_string().into(), "10".into()];
    let ort = realtime::onnx_runtime("piper_ort_timing.py", args, &ids);
    realtime::report("piper/cpu", seconds, ours, threads, ort);
}

criterion_group!(benches, piper);
