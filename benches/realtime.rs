//! What the voice benches share: the sentence, finding the fetched weights, timing a
//! voice, timing ONNX Runtime on the same ids through a fixture script, and reporting both
//! real-time factors side by side.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use criterion::Criterion;
use voxqueue::tts::candle::voices_dir;
use voxqueue::tts::{SynthesisRequest, Synthesizer};

/// Runs `tests/fixtures/<script>` with `args` and the ids; the script prints
/// `ort <median seconds> <audio seconds>`. Returns those two, or why it could not time.
pub(crate) fn onnx_runtime(
    script: &str,
    args: Vec<OsString>,
    ids: &[u32],
) -> Result<(f64, f64), String> {
    let path = format!("{}/tests/fixtures/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("python3")
        .arg(path)
        .args(args)
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

/// The threads both runtimes get: all the machine has.
pub(crate) fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// About ten seconds of speech, the sentence every voice bench speaks.
pub(crate) const TEXT: &str = "The old lighthouse keeper climbed the narrow stairs every evening, \
    lit the great lamp, and watched the ships pass safely through the rocky channel \
    until the morning sun rose over the quiet harbour.";

/// `relative` in the fetched voices' directory, if it is there.
pub(crate) fn fetched(relative: &str) -> Option<PathBuf> {
    let path = voices_dir()?.join(relative);
    path.exists().then_some(path)
}

/// Times `synth` speaking `request`: criterion's samples as `<group>/<name>`, then the
/// mean of `runs` more calls for the real-time factor. Returns the seconds of audio and
/// that mean.
pub(crate) fn time_voice(
    c: &mut Criterion,
    group: &str,
    name: &str,
    synth: &dyn Synthesizer,
    request: &SynthesisRequest,
    runs: u32,
) -> (f64, f64) {
    let audio = synth.synthesize(request).expect("synthesis");
    let seconds = audio.samples.len() as f64 / f64::from(audio.sample_rate);
    let mut g = c.benchmark_group(group);
    g.sample_size(10);
    g.bench_function(name, |b| {
        b.iter(|| synth.synthesize(request).expect("synthesis"))
    });
    g.finish();
    let start = Instant::now();
    for _ in 0..runs {
        synth.synthesize(request).expect("synthesis");
    }
    (seconds, start.elapsed().as_secs_f64() / f64::from(runs))
}

/// Prints voxqueue's real-time factor (`ours` seconds for `audio` seconds) and ONNX
/// Runtime's from the same run, and their ratio.
pub(crate) fn report(
    group: &str,
    audio: f64,
    ours: f64,
    threads: usize,
    ort: Result<(f64, f64), String>,
) {
    eprintln!(
        "{group}: {audio:.2} s of audio in {ours:.3} s = real-time factor {:.3} (voxqueue, {threads} threads)",
        ours / audio
    );
    match ort {
        Ok((ort, ort_audio)) => eprintln!(
            "{group}: ONNX Runtime {ort:.3} s for {ort_audio:.2} s = real-time factor {:.3}; voxqueue / ONNX Runtime = {:.2}",
            ort / ort_audio,
            (ours / audio) / (ort / ort_audio)
        ),
        Err(why) => eprintln!("{group}: ONNX Runtime not timed ({why})"),
    }
}
