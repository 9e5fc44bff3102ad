//! The Parler-TTS backend through a real queue and worker, on a tiny randomly
//! initialised model of the real architecture that the test writes itself.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use voxqueue::Worker;
use voxqueue::tts::candle::{ParlerOptions, ParlerSynthesizer, TINY_SAMPLE_RATE, write_tiny_model};
use voxqueue::tts::{
    Audio, LongTextOptions, RedisStore, ResultStore, SpeechResult, SynthesisRequest, Synthesizer,
    TtsError, TtsHandler, Voice, decode_wav, synthesize_long,
};

use crate::common::{Prefix, shutdown};

/// The samples a worker's handler makes for `request` on `model`, before WAV encoding.
fn solo(model: &dyn Synthesizer, request: &SynthesisRequest) -> Vec<f32> {
    synthesize_long(model, request, &LongTextOptions::new(), &mut |_, _| true)
        .unwrap()
        .audio
        .samples
}

/// The stored 16-bit WAV against the model's own samples, in steps of 16-bit PCM: the
/// WAV writer scales by 32767 and rounds, the reader divides by 32768. One step (LSB)
/// of difference is allowed, no more.
fn assert_within_one_lsb(stored: &[f32], solo: &[f32], what: &str) {
    assert_eq!(stored.len(), solo.len(), "{what}: lengths differ");
    let worst = stored
        .iter()
        .zip(solo)
        .map(|(a, b)| {
            let written = (a * 32768.0).round() as i32;
            let expected = (b.clamp(-1.0, 1.0) * 32767.0).round() as i32;
            (written - expected).abs()
        })
        .max()
        .unwrap_or(0);
    assert!(worst <= 1, "{what}: off by {worst} LSB");
}

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
    let request = SynthesisRequest::new("Hello there. Second sentence.", voice.clone());
    let first = q.enqueue(request.clone()).await.unwrap();
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
    // A fixed seed gives the same audio from a model loaded afresh from the same files:
    // what the queue stored is what a new process would say.
    let again = ParlerSynthesizer::load(dir.path(), options).unwrap();
    assert_within_one_lsb(&audio.samples, &solo(&again, &request), "reloaded model");
}

/// Passes calls through to the model, recording the size of each batch it is asked for.
struct BatchSizes {
    inner: Arc<dyn Synthesizer>,
    sizes: Mutex<Vec<usize>>,
}

impl std::fmt::Debug for BatchSizes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchSizes")
            .field("sizes", &self.sizes)
            .finish()
    }
}

impl Synthesizer for BatchSizes {
    fn voices(&self) -> Vec<Voice> {
        self.inner.voices()
    }
    fn sample_rate(&self) -> u32 {
        self.inner.sample_rate()
    }
    fn synthesize(&self, request: &SynthesisRequest) -> Result<Audio, TtsError> {
        self.sizes.lock().unwrap().push(1);
        self.inner.synthesize(request)
    }
    fn synthesize_batch(&self, requests: &[SynthesisRequest]) -> Vec<Result<Audio, TtsError>> {
        self.sizes.lock().unwrap().push(requests.len());
        self.inner.synthesize_batch(requests)
    }
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
    let recorder = Arc::new(BatchSizes {
        inner: model.clone(),
        sizes: Mutex::new(Vec::new()),
    });
    // A generous window: the four jobs' chunks must meet in one batch on a slow machine.
    let batcher =
        BatchingSynthesizer::new(recorder.clone(), 4, Duration::from_millis(500)).unwrap();

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
    let mut results = Vec::new();
    for job in &jobs {
        let result: SpeechResult = q
            .wait_result(&job.id, Duration::from_secs(60))
            .await
            .unwrap();
        results.push(result);
    }
    let _ = stop.send(());
    worker.await.unwrap().unwrap();
    // The jobs really ran together: at least one model call carried several of them.
    let sizes = recorder.sizes.lock().unwrap().clone();
    assert_eq!(sizes.iter().sum::<usize>(), 4, "{sizes:?}");
    assert!(sizes.iter().any(|&n| n > 1), "no batch formed: {sizes:?}");
    for (result, text) in results.iter().zip(texts) {
        assert_eq!(result.captions.len(), 1);
        assert_eq!(result.captions[0].text, text);
        // Each job's audio is what the model makes for that request alone.
        let request = SynthesisRequest::new(text, voice.clone());
        let stored = decode_wav(&store.get(&result.audio).await.unwrap().unwrap()).unwrap();
        assert_within_one_lsb(&stored.samples, &solo(&*model, &request), text);
    }
}
