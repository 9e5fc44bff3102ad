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
