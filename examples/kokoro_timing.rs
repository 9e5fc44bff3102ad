//! Times Kokoro-82M (or, with `piper`, the Piper voice `en_US-joe-medium`) on the CPU: loads
//! the model once, then synthesises one fixed sentence (about 4 s of speech) a few times and
//! prints the wall and CPU time of each run, so a change to the network can be compared with
//! the build before it in alternating runs.
//!
//! ```sh
//! cargo run --example kokoro_timing -- [runs] [kokoro|piper]   # needs .ci/fetch-voices
//! ```

use std::time::Instant;

use voxqueue::tts::candle::{
    DeviceChoice, KOKORO_MODEL_FILE, KokoroOptions, KokoroSynthesizer, PiperOptions,
    PiperSynthesizer, voices_dir,
};
use voxqueue::tts::{SynthesisRequest, Synthesizer};

/// About four seconds of speech.
const TEXT: &str = "The old lighthouse keeper climbed the narrow stairs every evening.";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let runs: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(3);
    let voices = voices_dir().ok_or("no HOME to find the voices under")?;
    let start = Instant::now();
    let (synth, voice): (Box<dyn Synthesizer>, &str) = match std::env::args().nth(2).as_deref() {
        Some("piper") => (
            Box::new(PiperSynthesizer::load(
                voices.join("en_US-joe-medium.onnx"),
                PiperOptions::new().with_device(DeviceChoice::Cpu),
            )?),
            "en_US-joe-medium",
        ),
        None | Some("kokoro") => (
            Box::new(KokoroSynthesizer::load(
                voices.join("kokoro").join(KOKORO_MODEL_FILE),
                KokoroOptions::new().with_device(DeviceChoice::Cpu),
            )?),
            "af_heart",
        ),
        Some(other) => return Err(format!("no voice `{other}`: kokoro or piper").into()),
    };
    println!("load {} ms", start.elapsed().as_millis());
    let request = SynthesisRequest::new(TEXT, voice);
    for run in 0..runs {
        let start = Instant::now();
        let cpu = cpu_ms();
        let audio = synth.synthesize(&request)?;
        let seconds = audio.samples.len() as f64 / f64::from(audio.sample_rate);
        println!(
            "run {run}: {} ms wall, {} ms CPU for {seconds:.2} s of audio",
            start.elapsed().as_millis(),
            cpu_ms().saturating_sub(cpu)
        );
    }
    Ok(())
}

/// This process's user and system CPU time so far (Linux, 100 ticks a second; 0 elsewhere):
/// on a shared machine it moves less with the other load than the wall time does.
fn cpu_ms() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let ticks: u64 = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse::<u64>().ok())
        .sum();
    ticks * 10
}
