//! The Piper voice `en_US-joe-medium` on the CPU: real-time factor for a sentence of about
//! ten seconds, with ONNX Runtime timed in the same run on the same threads when Python
//! has it (`pip install -r tests/fixtures/piper-requirements.txt`).
//!
//! Needs the voice (`.ci/fetch-voices`); without it the bench says so and measures nothing.

use criterion::{Criterion, criterion_group};
use voxqueue::tts::SynthesisRequest;
use voxqueue::tts::candle::{DeviceChoice, PiperOptions, PiperSynthesizer};

use crate::realtime::{self, TEXT};

const VOICE: &str = "en_US-joe-medium";

fn piper(c: &mut Criterion) {
    let Some(path) = realtime::fetched(&format!("{VOICE}.onnx")) else {
        eprintln!("piper/cpu: no voice; run .ci/fetch-voices to bench {VOICE}");
        return;
    };
    let options = PiperOptions::new().with_device(DeviceChoice::Cpu);
    let synth = PiperSynthesizer::load(&path, options).expect("load the Piper voice");
    let request = SynthesisRequest::new(TEXT, VOICE);
    let (seconds, ours) =
        realtime::time_voice(c, "piper/cpu", "joe-medium-10s", &synth, &request, 5);

    // Real-time factors, reported once beside ONNX Runtime's (criterion times above).
    let threads = realtime::threads();
    let ids = synth.phoneme_ids(TEXT).expect("phonemes");
    let args = vec![path.into(), threads.to_string().into(), "10".into()];
    let ort = realtime::onnx_runtime("piper_ort_timing.py", args, &ids);
    realtime::report("piper/cpu", seconds, ours, threads, ort);
}

criterion_group!(benches, piper);
