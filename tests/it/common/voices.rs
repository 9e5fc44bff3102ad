//! What the tests of the real neural voices (Piper, Kokoro) share: where
//! `.ci/fetch-voices` puts the weights, loudness, and a voice speaking through a real
//! queue and worker.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use voxqueue::Worker;
use voxqueue::tts::{
    BatchingSynthesizer, RedisStore, ResultStore, SpeechResult, SynthesisRequest, Synthesizer,
    TtsHandler, decode_wav,
};

use super::{Prefix, shutdown};

/// `$VOXQUEUE_VOICES/<relative>` (default `~/.cache/voxqueue/voices`), which must exist:
/// a missing voice fails the test naming the script that fetches it, never skips it.
pub(crate) fn fetched(relative: &str, what: &str) -> PathBuf {
    let path = voxqueue::tts::candle::voices_dir()
        .expect("HOME is set")
        .join(relative);
    assert!(
        path.exists(),
        "{what} is missing ({}): run `.ci/fetch-voices`",
        path.display()
    );
    path
}

pub(crate) fn rms(samples: &[f32]) -> f64 {
    let sum: f64 = samples.iter().map(|&s| f64::from(s) * f64::from(s)).sum();
    (sum / samples.len().max(1) as f64).sqrt()
}

/// Two requests (one of two sentences) through a batching synthesiser, a worker of two
/// slots and the Redis result store: each comes back audible, at `rate`, with one
/// caption per sentence.
pub(crate) async fn speaks_through_a_batching_queue_worker(
    model: Arc<dyn Synthesizer>,
    voice: &str,
    rate: u32,
    wait: Duration,
) {
    let batcher = BatchingSynthesizer::new(model, 2, Duration::from_millis(50)).unwrap();
    let p = Prefix::new();
    let q = p.queue::<SynthesisRequest>("voice").await;
    let store: Arc<dyn ResultStore> = Arc::new(RedisStore::new(&q));
    let handler = TtsHandler::from_shared(Arc::new(batcher), store.clone());
    let texts = ["Good morning. How are you?", "Fine, thanks."];
    let jobs = q
        .enqueue_bulk(texts.iter().map(|t| SynthesisRequest::new(*t, voice)))
        .await
        .unwrap();
    let (stop, signal) = shutdown();
    let worker = tokio::spawn(
        Worker::builder(q.clone())
            .concurrency(2)
            .build(handler)
            .run_until(signal),
    );
    for (job, text) in jobs.iter().zip(texts) {
        let result: SpeechResult = q.wait_result(&job.id, wait).await.unwrap();
        assert_eq!(result.sample_rate, rate);
        let audio = decode_wav(&store.get(&result.audio).await.unwrap().unwrap()).unwrap();
        assert_eq!(audio.sample_rate, rate);
        assert!(rms(&audio.samples) > 0.02, "{text}: silent");
        let sentences = text.matches(['.', '?']).count();
        assert_eq!(result.captions.len(), sentences, "{text}");
    }
    let _ = stop.send(());
    worker.await.unwrap().unwrap();
}
