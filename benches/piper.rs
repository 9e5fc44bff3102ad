//! The Piper voice `en_US-joe-medium` on the CPU: real-time factor for a sentence of about
//! ten seconds, with ONNX Runtime timed in the same run on the same threads when Python
//! has it (`pip install -r tests/fixtures/piper-requirements.txt`).
//!
//! Needs the voice (`.ci/fetch-voices`); without it the bench says so and measures nothing.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use criterion::{Criterion, criterion_group};
use voxqueue::tts::candle::{DeviceChoice, PiperOptions, PiperSynthesizer};
use voxqueue::tts::{SynthesisRequest, Synthesizer};

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

/// ONNX Runtime's median seconds for the same ids, or why it could not be timed.
fn onnx_runtime(path: &PathBuf, ids: &[u32], threads: usize) -> Result<(f64, f64), String> {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/piper_ort_timing.py"
    );
    let out = Command::new("python3")
        .arg(script)
        .arg(path)
        .arg(threads.to_string())
        .arg("10")
        .args(ids.iter().map(u32::to_string))
        .output()
        .map_err(|e| format!("python3: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let fields: Vec<&str> = text.split_whitespace().collect();
    match fields.as_slice() {
        ["ort", secs, audio] => Ok((
            secs.parse().map_err(|_| text.to_string())?,
            audio.parse().map_err(|_| text.to_string())?,
        )),
        _ => Err(String::from_utf8_lossy(&out.stderr)
            .lines()
            .last()
            .unwrap_or("no output")
            .to_owned()),
    }
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
    let runs = 5;
    let start = Instant::now();
    for _ in 0..runs {
        synth.synthesize(&request).expect("synthesis");
    }
    let ours = start.elapsed().as_secs_f64() / f64::from(runs);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!(
        "piper/cpu: {seconds:.2} s of audio in {ours:.3} s = real-time factor {:.3} (voxqueue, {threads} threads)",
        ours / seconds
    );
    let ids = synth.phoneme_ids(TEXT).expect("phonemes");
    match onnx_runtime(&path, &ids, threads) {
        Ok((ort, ort_audio)) => eprintln!(
            "piper/cpu: ONNX Runtime {ort:.3} s for {ort_audio:.2} s = real-time factor {:.3}; voxqueue / ONNX Runtime = {:.2}",
            ort / ort_audio,
            (ours / seconds) / (ort / ort_audio)
        ),
        Err(why) => eprintln!("piper/cpu: ONNX Runtime not timed ({why})"),
    }
}

criterion_group!(benches, piper);
