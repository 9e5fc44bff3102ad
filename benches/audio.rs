//! Audio out: resampling and encoding ten seconds of speech-rate audio.

use criterion::{Criterion, Throughput, criterion_group};
use voxqueue::tts::{Audio, AudioFormat};

fn ten_seconds() -> Audio {
    let rate = 22_050;
    let samples = (0..rate * 10)
        .map(|i| (i as f32 * 0.05).sin() * 0.5)
        .collect();
    Audio::new(samples, rate)
}

fn audio(c: &mut Criterion) {
    let audio = ten_seconds();
    let mut g = c.benchmark_group("audio/cpu");
    g.throughput(Throughput::Elements(audio.samples.len() as u64));
    g.bench_function("resample-10s-22050-to-48000", |b| {
        b.iter(|| audio.resample(48_000))
    });
    g.bench_function("encode-wav-10s", |b| {
        b.iter(|| audio.encode(AudioFormat::Wav).unwrap())
    });
    g.finish();
}

criterion_group!(benches, audio);
