//! Work done for every request before it is enqueued: normalisation, splitting, the
//! dedup key.

use criterion::{Criterion, Throughput, criterion_group};
use voxqueue::tts::{SynthesisRequest, normalize, split_sentences_max};

fn long_text() -> String {
    let sentence = "Dr. Smith paid $3.50 for the U.S. edition, i.e. the one with 1,000 pages.  ";
    sentence.repeat(5000 / sentence.len() + 1)
}

fn text(c: &mut Criterion) {
    let text = long_text();
    let mut g = c.benchmark_group("text/cpu");
    g.throughput(Throughput::Bytes(text.len() as u64));
    g.bench_function("normalize-5k", |b| b.iter(|| normalize(&text)));
    let normal = normalize(&text);
    g.bench_function("split-5k", |b| b.iter(|| split_sentences_max(&normal, 400)));
    let request = SynthesisRequest::new(text.clone(), "en-us");
    let dedup = voxqueue::tts::deduplicator(std::time::Duration::from_secs(60));
    g.bench_function("dedup-key-5k", |b| b.iter(|| dedup.key(&request).unwrap()));
    g.finish();
}

criterion_group!(benches, text);
