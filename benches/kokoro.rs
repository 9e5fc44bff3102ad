//! Kokoro-82M on the CPU: real-time factor for a sentence of about ten seconds, with ONNX
//! Runtime timed in the same run on the same threads when Python has it
//! (`pip install -r tests/fixtures/kokoro-requirements.txt`).
//!
//! Needs the model and voice packs (`.ci/fetch-voices`); without them the bench says so and
//! measures nothing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use criterion::{Criterion, criterion_group};
use voxqueue::tts::candle::{DeviceChoice, KOKORO_MODEL_FILE, KokoroOptions, KokoroSynthesizer};
use voxqueue::tts::{SynthesisRequest, Synthesizer};

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

/// ONNX Runtime's median seconds and audio seconds for the same ids, or why it could not
/// be timed.
fn onnx_runtime(model: &Path, ids: &[u32], threads: usize) -> Result<(f64, f64), String> {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/kokoro_ort_timing.py"
    );
    let pack = model.with_file_name("voices").join(format!("{VOICE}.bin"));
    let out = Command::new("python3")
        .arg(script)
        .arg(model)
        .arg(pack)
        .arg(threads.to_string())
        .arg("5")
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
    let runs = 3;
    let start = Instant::now();
    for _ in 0..runs {
        synth.synthesize(&request).expect("synthesis");
    }
    let ours = start.elapsed().as_secs_f64() / f64::from(runs);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!(
        "kokoro/cpu: {seconds:.2} s of audio in {ours:.3} s = real-time factor {:.3} (voxqueue, {threads} threads)",
        ours / seconds
    );
    let ids = synth.phoneme_ids(TEXT, VOICE).expect("phonemes");
    match onnx_runtime(&path, &ids, threads) {
        Ok((ort, ort_audio)) => eprintln!(
            "kokoro/cpu: ONNX Runtime {ort:.3} s for {ort_audio:.2} s = real-time factor {:.3}; voxqueue / ONNX Runtime = {:.2}",
            ort / ort_audio,
            (ours / seconds) / (ort / ort_audio)
        ),
        Err(why) => eprintln!("kokoro/cpu: ONNX Runtime not timed ({why})"),
    }
}

criterion_group!(benches, kokoro);
