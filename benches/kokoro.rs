//! Kokoro-82M on the CPU: real-time factor for a sentence of about ten seconds, with ONNX
//! Runtime timed in the same run on the same threads when Python has it
//! (`pip install -r tests/fixtures/kokoro-requirements.txt`).
//!
//! Needs the model and voice packs (`.ci/fetch-voices`); without them the bench says so and
//! measures nothing.

use criterion::{Criterion, criterion_group};
use voxqueue::tts::SynthesisRequest;
use voxqueue::tts::candle::{DeviceChoice, KOKORO_MODEL_FILE, KokoroOptions, KokoroSynthesizer};

use crate::realtime::{self, TEXT};

const VOICE: &str = "af_heart";

fn kokoro(c: &mut Criterion) {
    let Some(path) = realtime::fetched(&format!("kokoro/{KOKORO_MODEL_FILE}")) else {
        eprintln!("kokoro/cpu: no model; run .ci/fetch-voices to bench Kokoro-82M");
        return;
    };
    let options = KokoroOptions::new().with_device(DeviceChoice::Cpu);
    let synth = KokoroSynthesizer::load(&path, options).expect("load Kokoro");
    let request = SynthesisRequest::new(TEXT, VOICE);
    let (seconds, ours) =
        realtime::time_voice(c, "kokoro/cpu", "af_heart-10s", &synth, &request, 3);

    // Real-time factors, reported once beside ONNX Runtime's (criterion times above).
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
