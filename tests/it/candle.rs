//! The Parler-TTS backend through a real queue and worker, on a tiny randomly
//! initialised model of the real architecture that the test writes itself.

use std::sync::Arc;
use std::time::Duration;

use voxqueue::Worker;
use voxqueue::tts::candle::{ParlerOptions, ParlerSynthesizer, TINY_SAMPLE_RATE, write_tiny_model};
use voxqueue::tts::{
    RedisStore, ResultStore, SpeechResult, SynthesisRequest, Synthesizer, TtsHandler, decode_wav,
};

use crate::common::{Prefix, shutdown};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_parler_model_speaks_through_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), 7).unwrap();
    let options = ParlerOptions::new().with_seed(42).with_max_steps(40);
    let synth = ParlerSynthesizer::load(dir.path(), options.clone()).unwrap();
    let voice = synth.voices()[0].id.clone();

    let p = Prefix::new();
    let q = p.queue::<SynthesisRequest>("neural").await;
    let store: Arc<dyn ResultStore> = Arc::new(RedisStore::new(&q));
    let handler = TtsHandler::from_shared(Arc::new(synth), store.clone());
    let (stop, signal) = shutdown();
    let worker = tokio::spawn(Worker::builder(q.clone()).build(handler).run_until(signal));
    let first = q
        .enqueue(SynthesisRequest::new(
            "Hello there. Second sentence.",
            voice.clone(),
        ))
        .await
        .unwrap();
    let result: SpeechResult = q
        .wait_result(&first.id, Duration::from_secs(60))
        .await
        .unwrap();
    let _ = stop.send(());
    worker.await.unwrap().unwrap();

    assert_eq!(result.sample_rate, TINY_SAMPLE_RATE);
    assert_eq!(result.captions.len(), 2);
    let audio = decode_wav(&store.get(&result.audio).await.unwrap().unwrap()).unwrap();
    assert_eq!(audio.sample_rate, TINY_SAMPLE_RATE);
    assert!(!audio.samples.is_empty());
    assert!(audio.samples.iter().all(|s| s.is_finite()));
    // A fixed seed gives the same audio from a freshly loaded model.
    let again = ParlerSynthesizer::load(dir.path(), options).unwrap();
    let one = again
        .synthesize(&SynthesisRequest::new("Hello there.", voice.clone()))
        .unwrap();
    let two = again
        .synthesize(&SynthesisRequest::new("Hello there.", voice))
        .unwrap();
    assert_eq!(one.samples, two.samples);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_jobs_keep_their_own_results() {
    use voxqueue::tts::BatchingSynthesizer;
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), 11).unwrap();
    let options = ParlerOptions::new()
        .with_seed(3)
        .with_max_steps(30)
        .with_max_batch(4);
    let model: Arc<dyn Synthesizer> =
        Arc::new(ParlerSynthesizer::load(dir.path(), options).unwrap());
    let voice = model.voices()[0].id.clone();
    let batcher = BatchingSynthesizer::new(model.clone(), 4, Duration::from_millis(50)).unwrap();

    let p = Prefix::new();
    let q = p.queue::<SynthesisRequest>("neural-batch").await;
    let store: Arc<dyn ResultStore> = Arc::new(RedisStore::new(&q));
    let handler = TtsHandler::from_shared(Arc::new(batcher), store.clone());
    let texts = [
        "One.",
        "Two words.",
        "Three small words.",
        "Four words in here.",
    ];
    let jobs = q
        .enqueue_bulk(
            texts
                .iter()
                .map(|t| SynthesisRequest::new(*t, voice.clone())),
        )
        .await
        .unwrap();
    let (stop, signal) = shutdown();
    let worker = tokio::spawn(
        Worker::builder(q.clone())
            .concurrency(4)
            .build(handler)
            .run_until(signal),
    );
    for (job, text) in jobs.iter().zip(texts) {
        let result: SpeechResult = q
            .wait_result(&job.id, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(result.captions[0].text, text);
        // Each job's audio is what the model makes for that request alone.
        let alone = model
            .synthesize(&SynthesisRequest::new(text, voice.clone()))
            .unwrap();
        let stored = decode_wav(&store.get(&result.audio).await.unwrap().unwrap()).unwrap();
        assert_eq!(stored.samples.len(), alone.samples.len(), "{text}");
    }
    let _ = stop.send(());
    worker.await.unwrap().unwrap();
}
