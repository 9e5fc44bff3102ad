//! The Parler-TTS backend on the tiny test model, on the CPU: decoder steps per second,
//! real-time factor, and what batching buys (the same eight requests as eight batches
//! of one, two of four, one of eight).

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use voxqueue::tts::candle::{ParlerOptions, ParlerSynthesizer, TINY_HOP_LENGTH, write_tiny_model};
use voxqueue::tts::{SynthesisRequest, Synthesizer};

fn model() -> (tempfile::TempDir, ParlerSynthesizer) {
    let dir = tempfile::tempdir().expect("temp dir");
    write_tiny_model(dir.path(), 7).expect("tiny model");
    // A fixed number of steps per request, so every variant does the same work.
    let options = ParlerOptions::new()
        .with_seed(1)
        .with_max_steps(64)
        .with_min_new_tokens(64)
        .with_max_batch(8);
    let synth = ParlerSynthesizer::load(dir.path(), options).expect("load");
    (dir, synth)
}

fn requests(synth: &ParlerSynthesizer) -> Vec<SynthesisRequest> {
    let voice = synth.voices()[0].id.clone();
    (0..8)
        .map(|i| SynthesisRequest::new(format!("Request number {i} is short."), voice.clone()))
        .collect()
}

fn candle(c: &mut Criterion) {
    let (_dir, synth) = model();
    let all = requests(&synth);
    let mut g = c.benchmark_group("candle/cpu/tiny");
    g.sample_size(10);
    g.throughput(Throughput::Elements(all.len() as u64));
    for batch in [1usize, 4, 8] {
        g.bench_with_input(
            BenchmarkId::new("8-requests-batch", batch),
            &batch,
            |b, &batch| {
                b.iter(|| {
                    for chunk in all.chunks(batch) {
                        for audio in synth.synthesize_batch(chunk) {
                            audio.expect("synthesis");
                        }
                    }
                })
            },
        );
    }
    g.finish();

    // Steps per second and real-time factor, reported once (criterion times above).
    let start = Instant::now();
    let audio = synth.synthesize(&all[0]).expect("synthesis");
    let took = start.elapsed();
    let frames = audio.samples.len() / TINY_HOP_LENGTH;
    eprintln!(
        "candle/cpu/tiny: {frames} frames in {took:?} = {:.0} decoder steps/s, real-time factor {:.3}",
        frames as f64 / took.as_secs_f64().max(1e-9),
        took.as_secs_f64() / audio.duration().max(Duration::from_millis(1)).as_secs_f64()
    );
}

criterion_group!(benches, candle);
