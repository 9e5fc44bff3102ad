//! The TTS layer through a real queue and worker: the offline voice, both result
//! stores, progress per sentence and cancellation between sentences.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use voxqueue::tts::{
    Audio, AudioFormat, AudioStream, EspeakSynthesizer, FileStore, RedisStore, ResultStore,
    SpeechResult, StreamEvent, SynthesisRequest, Synthesizer, TtsError, TtsHandler, Voice,
    decode_wav,
};
use voxqueue::{EventKind, JobId, JobState, Queue, RetryPolicy, Worker};

use crate::common::{Prefix, shutdown};

const WAIT: Duration = Duration::from_secs(30);

/// The keys matching `pattern` on the shared Redis, each with its time to live in ms.
async fn stored(pattern: &str) -> Vec<(String, i64)> {
    let mut c = crate::common::connection().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(pattern)
        .query_async(&mut c)
        .await
        .unwrap();
    let mut out = Vec::new();
    for key in keys {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(&key)
            .query_async(&mut c)
            .await
            .unwrap();
        out.push((key, ttl));
    }
    out
}

async fn speak_through(
    queue: &Queue<SynthesisRequest>,
    store: Arc<dyn ResultStore>,
    request: SynthesisRequest,
) -> (SpeechResult, Vec<u8>) {
    let synth = EspeakSynthesizer::new().expect("espeak-ng is installed by .ci/setup");
    let handler = TtsHandler::from_shared(Arc::new(synth), store.clone());
    let (stop, signal) = shutdown();
    let worker = tokio::spawn(
        Worker::builder(queue.clone())
            .build(handler)
            .run_until(signal),
    );
    let job = queue.enqueue(request).await.unwrap();
    let result: SpeechResult = queue.wait_result(&job.id, WAIT).await.unwrap();
    let _ = stop.send(());
    worker.await.unwrap().unwrap();
    let bytes = store
        .get(&result.audio)
        .await
        .unwrap()
        .expect("audio stored");
    (result, bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_offline_voice_speaks_through_the_queue_into_redis() {
    let p = Prefix::new();
    let q = p.queue::<SynthesisRequest>("speech").await;
    let store: Arc<dyn ResultStore> = Arc::new(RedisStore::new(&q));
    let request =
        SynthesisRequest::new("Hello from the queue. This is a second sentence.", "en-us")
            .with_sample_rate(16_000);
    let (result, bytes) = speak_through(&q, store, request).await;

    let audio = decode_wav(&bytes).unwrap();
    assert_eq!(audio.sample_rate, 16_000);
    assert_eq!(result.sample_rate, 16_000);
    assert_eq!(result.mime_type, "audio/wav");
    assert_eq!(result.bytes as usize, bytes.len());
    assert!(!audio.is_silent(0.01), "speech, not silence");
    let reader = hound::WavReader::new(std::io::Cursor::new(&bytes)).unwrap();
    assert_eq!(reader.spec().bits_per_sample, 16);
    assert_eq!(reader.duration() as u64, audio.samples.len() as u64);
    // Two sentences, two captions, ending with the audio.
    assert_eq!(result.captions.len(), 2);
    let end = result.captions.last().unwrap().end;
    assert!(
        end.abs_diff(audio.duration()) <= Duration::from_millis(1),
        "{end:?} vs {:?}",
        audio.duration()
    );
    assert!(result.srt().contains("Hello from the queue."));
    assert!(result.vtt().starts_with("WEBVTT"));
    assert_eq!(
        result.duration(),
        Duration::from_millis(audio.duration().as_millis() as u64)
    );
    // The audio is kept for the handler's audio TTL, a day by default.
    let stored = stored(&format!("{}*:audio:{}", p.name, result.audio)).await;
    assert_eq!(stored.len(), 1, "{stored:?}");
    let ttl = stored[0].1;
    assert!((86_000_000..=86_400_000).contains(&ttl), "{ttl} ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_store_keeps_audio_by_content_address() {
    let p = Prefix::new();
    let dir = tempfile::tempdir().unwrap();
    let q = p.queue::<SynthesisRequest>("speech-files").await;
    let store: Arc<dyn ResultStore> = Arc::new(FileStore::new(dir.path()));
    let request = SynthesisRequest::new("Files  keep   audio.", "en-gb");
    let (result, bytes) = speak_through(&q, store.clone(), request.clone()).await;
    assert!(!decode_wav(&bytes).unwrap().is_silent(0.01));
    // The same request, spelled with other whitespace, maps to the same object.
    let (again, _) = speak_through(
        &q,
        store,
        SynthesisRequest::new("Files keep audio.", "en-gb"),
    )
    .await;
    assert_eq!(again.audio, result.audio);
    let files: Vec<_> = walk(dir.path());
    assert_eq!(files.len(), 1, "{files:?}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[tokio::test]
async fn invalid_requests_are_never_enqueued() {
    let p = Prefix::new();
    let voices = EspeakSynthesizer::new().unwrap().voices();
    let q = p
        .builder::<SynthesisRequest>("speech-checked")
        .validate(voxqueue::tts::validator(
            voxqueue::tts::Limits::default(),
            voices,
        ))
        .connect()
        .await
        .unwrap();
    for bad in [
        SynthesisRequest::new("   ", "en-us"),
        SynthesisRequest::new("Hi", "klingon"),
        SynthesisRequest::new("Hi", "en-us").with_speed(9.0),
        SynthesisRequest::new("x".repeat(5001), "en-us"),
    ] {
        let err = q.enqueue(bad).await.unwrap_err();
        assert!(matches!(err, voxqueue::Error::InvalidJob(_)), "{err}");
    }
    let err = q
        .enqueue_bulk(vec![
            SynthesisRequest::new("Fine.", "en-us"),
            SynthesisRequest::new("", "en-us"),
        ])
        .await
        .unwrap_err();
    assert!(matches!(err, voxqueue::Error::InvalidJob(_)));
    assert_eq!(q.stats().await.unwrap().totals.get("enqueued"), None);
    q.enqueue(SynthesisRequest::new("Fine.", "en-us"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_request_fails_permanently_without_synthesis() {
    let p = Prefix::new();
    let q = p.queue::<SynthesisRequest>("speech-invalid").await;
    let store = RedisStore::new(&q);
    let handler = TtsHandler::new(EspeakSynthesizer::new().unwrap(), store);
    let (stop, signal) = shutdown();
    let worker = tokio::spawn(Worker::builder(q.clone()).build(handler).run_until(signal));
    let job = q
        .enqueue(SynthesisRequest::new("Hi", "klingon"))
        .await
        .unwrap();
    let st = q.wait(&job.id, WAIT).await.unwrap();
    assert_eq!((st.state, st.attempts), (JobState::Dead, 1));
    assert!(st.reason.unwrap().contains("klingon"));
    let _ = stop.send(());
    worker.await.unwrap().unwrap();
}

/// A voice that takes its time, counting the chunks it was asked for.
#[derive(Debug)]
struct Slow {
    chunks: Arc<AtomicUsize>,
}

impl Synthesizer for Slow {
    fn voices(&self) -> Vec<Voice> {
        vec![Voice::new("slow", "Slow")]
    }
    fn sample_rate(&self) -> u32 {
        8_000
    }
    fn synthesize(&self, request: &SynthesisRequest) -> Result<Audio, TtsError> {
        self.chunks.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(150));
        Ok(Audio::new(vec![0.1; 80 * request.text.len()], 8_000))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_is_reported_per_sentence_and_cancel_stops_between_sentences() {
    let p = Prefix::new();
    let q = p.queue::<SynthesisRequest>("speech-slow").await;
    let chunks = Arc::new(AtomicUsize::new(0));
    let handler = TtsHandler::new(
        Slow {
            chunks: chunks.clone(),
        },
        RedisStore::new(&q),
    );
    let (stop, signal) = shutdown();
    let worker = tokio::spawn(
        Worker::builder(q.clone())
            .heartbeat(Duration::from_millis(50))
            .build(handler)
            .run_until(signal),
    );
    let text = (1..=20)
        .map(|i| format!("Sentence number {i}."))
        .collect::<Vec<_>>()
        .join(" ");
    let mut events = q.events().await.unwrap();
    let job = q
        .enqueue(SynthesisRequest::new(text, "slow"))
        .await
        .unwrap();
    // Wait for two progress reports, then cancel. Each is 95 % (encoding and storing
    // remain) times the share of sentences done: 4.75 per sentence of 20.
    let mut sentences = Vec::new();
    while sentences.len() < 2 {
        let e = crate::common::within("an event", events.recv())
            .await
            .unwrap();
        if e.kind == EventKind::Progress && e.job_id == job.id {
            let pct: f32 = e.data.unwrap().parse().unwrap();
            let done = pct / 4.75;
            assert!(
                done.fract() == 0.0 && (1.0..20.0).contains(&done),
                "{pct} % is not a whole number of sentences"
            );
            sentences.push(done as u32);
        }
    }
    assert!(sentences[0] < sentences[1], "{sentences:?}");
    q.cancel(&job.id).await.unwrap();
    let st = q.wait(&job.id, WAIT).await.unwrap();
    assert_eq!(st.state, JobState::Cancelled);
    let _ = stop.send(());
    worker.await.unwrap().unwrap();
    let spoken = chunks.load(Ordering::SeqCst);
    // The sentences reported, then the one under way when the token fired (each takes
    // 150 ms, the heartbeat comes every 50 ms); one more only on a slow beat.
    let reported = sentences[1] as usize;
    assert!(
        (reported + 1..=reported + 2).contains(&spoken),
        "cancellation did not stop the synthesis: {spoken} chunks of 20"
    );
}

/// Audio in Redis lives beside the queue's keys, expires with the result TTL, and is
/// deleted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_store_keeps_audio_beside_the_queue_for_its_ttl() {
    let p = Prefix::new();
    let q = p.queue::<SynthesisRequest>("speech-store").await;
    let store = RedisStore::new(&q);
    let r = store
        .put("abc.wav", b"RIFF\0\xff", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(r, "abc.wav");
    assert_eq!(
        store.get(&r).await.unwrap().as_deref(),
        Some(&b"RIFF\0\xff"[..])
    );
    let stored = stored(&format!("{}*:audio:*", p.name)).await;
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert!(stored[0].0.ends_with(":audio:abc.wav"), "{stored:?}");
    let ttl = stored[0].1;
    assert!((59_000..=60_000).contains(&ttl), "{ttl} ms");
    assert!(store.delete(&r).await.unwrap());
    assert!(!store.delete(&r).await.unwrap());
    assert_eq!(store.get(&r).await.unwrap(), None);
    assert!(matches!(
        store.put("../x", b"", Duration::from_secs(1)).await,
        Err(voxqueue::tts::StoreError::InvalidKey(_))
    ));
}

/// A job's audio stream gives every reader all its entries in order, from the first,
/// and lives for its TTL after the last write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audio_stream_replays_its_entries_in_order_to_every_reader() {
    let p = Prefix::new();
    let q = p.queue::<SynthesisRequest>("speech-stream").await;
    let stream = AudioStream::new(&q).ttl(Duration::from_secs(30));
    let id = JobId::new("streamed").unwrap();
    assert!(!stream.exists(&id).await.unwrap());
    let mut early = stream.reader(&id).await.unwrap();
    assert_eq!(early.next(Duration::from_millis(10)).await.unwrap(), []);
    let audio = Audio::new(vec![0.5, -1.0, 0.25], 16_000);
    stream.start(&id, 1, 16_000).await.unwrap();
    stream.push(&id, &audio).await.unwrap();
    stream.fail(&id, "GPU fell off the bus").await.unwrap();
    stream.start(&id, 2, 24_000).await.unwrap();
    stream.finish(&id).await.unwrap();
    assert!(stream.exists(&id).await.unwrap());
    let expected = vec![
        StreamEvent::Started {
            attempt: 1,
            sample_rate: 16_000,
        },
        StreamEvent::Audio(audio.encode(AudioFormat::PcmI16).unwrap()),
        StreamEvent::Failed("GPU fell off the bus".into()),
        StreamEvent::Started {
            attempt: 2,
            sample_rate: 24_000,
        },
        StreamEvent::Done,
    ];
    assert_eq!(early.next(Duration::from_secs(5)).await.unwrap(), expected);
    // Read on from where it was: nothing new.
    assert_eq!(early.next(Duration::from_millis(10)).await.unwrap(), []);
    let mut late = stream.reader(&id).await.unwrap();
    assert_eq!(late.next(Duration::from_secs(5)).await.unwrap(), expected);
    let stored = stored(&format!("{}:{{speech-stream}}:stream:streamed", p.name)).await;
    assert_eq!(stored.len(), 1, "{stored:?}");
    let ttl = stored[0].1;
    assert!((25_000..=30_000).contains(&ttl), "{ttl} ms");
}

/// A voice whose first call fails as a backend error (a GPU out of memory, say).
#[derive(Debug, Default)]
struct FailsOnce {
    calls: AtomicUsize,
}

impl Synthesizer for FailsOnce {
    fn voices(&self) -> Vec<Voice> {
        vec![Voice::new("flaky", "Flaky")]
    }
    fn sample_rate(&self) -> u32 {
        8_000
    }
    fn synthesize(&self, _request: &SynthesisRequest) -> Result<Audio, TtsError> {
        match self.calls.fetch_add(1, Ordering::SeqCst) {
            0 => Err(TtsError::Backend("CUDA out of memory".into())),
            _ => Ok(Audio::new(vec![0.25; 800], 8_000)),
        }
    }
}

/// A backend error is transient: the job is retried and the retry's audio is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_error_is_retried() {
    let p = Prefix::new();
    let q = p.queue::<SynthesisRequest>("speech-retry").await;
    let store = RedisStore::new(&q);
    let handler = TtsHandler::new(FailsOnce::default(), store.clone());
    let (stop, signal) = shutdown();
    let worker = tokio::spawn(
        Worker::builder(q.clone())
            .retry(RetryPolicy::fixed(Duration::from_millis(10)).max_attempts(3))
            .build(handler)
            .run_until(signal),
    );
    let job = q
        .enqueue(SynthesisRequest::new("Again.", "flaky"))
        .await
        .unwrap();
    let result: SpeechResult = q.wait_result(&job.id, WAIT).await.unwrap();
    let st = q.status(&job.id).await.unwrap();
    assert_eq!((st.state, st.attempts), (JobState::Completed, 2));
    assert_eq!(st.errors.len(), 1);
    assert_eq!(st.errors[0].kind, "transient");
    assert!(
        st.errors[0].message.contains("CUDA out of memory"),
        "{:?}",
        st.errors
    );
    assert_eq!(result.duration_ms, 100);
    assert!(store.get(&result.audio).await.unwrap().is_some());
    let _ = stop.send(());
    worker.await.unwrap().unwrap();
}
