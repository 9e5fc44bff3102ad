//! Cross-job batching: a [`BatchingSynthesizer`] gathers the chunks that concurrent
//! jobs ask for within a short window and runs them as one batched generation, so a GPU
//! serves many short requests at once.
//!
//! It sits *below* the queue: a worker with `concurrency(B)` claims up to B jobs (in
//! priority order), each job keeps its own lease, result, retries and events, and only
//! the model call is shared. Nothing in the queue core knows about batching.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::{Audio, SynthesisRequest, Synthesizer, TtsError, Voice};

/// Requests from one caller and where their results go.
struct Pending {
    requests: Vec<SynthesisRequest>,
    reply: SyncSender<Vec<Result<Audio, TtsError>>>,
}

/// A [`Synthesizer`] that batches concurrent calls into the inner one's
/// [`Synthesizer::synthesize_batch`].
pub struct BatchingSynthesizer {
    inner: Arc<dyn Synthesizer>,
    queue: Mutex<mpsc::Sender<Pending>>,
    max_batch: usize,
    max_wait: Duration,
}

impl std::fmt::Debug for BatchingSynthesizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchingSynthesizer")
            .field("max_batch", &self.max_batch)
            .field("max_wait", &self.max_wait)
            .finish_non_exhaustive()
    }
}

impl BatchingSynthesizer {
    /// Batches up to `max_batch` chunks, waiting at most `max_wait` after the first
    /// one for others to join. Give the worker `concurrency(max_batch)` so that many
    /// jobs run at once. The batching thread ends when this value is dropped.
    pub fn new(
        inner: Arc<dyn Synthesizer>,
        max_batch: usize,
        max_wait: Duration,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Pending>();
        let max_batch = max_batch.max(1);
        let model = inner.clone();
        std::thread::Builder::new()
            .name("voxqueue-batcher".into())
            .spawn(move || run(&*model, &rx, max_batch, max_wait))?;
        Ok(BatchingSynthesizer {
            inner,
            queue: Mutex::new(tx),
            max_batch,
            max_wait,
        })
    }

    fn submit(&self, requests: Vec<SynthesisRequest>) -> Vec<Result<Audio, TtsError>> {
        let n = requests.len();
        let (reply, answer) = mpsc::sync_channel(1);
        let sent = self
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .send(Pending { requests, reply });
        let gone = || {
            (0..n)
                .map(|_| Err(TtsError::Backend("the batching thread stopped".into())))
                .collect()
        };
        if sent.is_err() {
            return gone();
        }
        answer.recv().unwrap_or_else(|_| gone())
    }
}

/// The batching thread: take the first waiting call, let others join until the batch
/// is full or the window closes, run them together, hand each caller its share.
fn run(model: &dyn Synthesizer, rx: &Receiver<Pending>, max_batch: usize, max_wait: Duration) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        let mut size = batch[0].requests.len();
        let deadline = Instant::now() + max_wait;
        while size < max_batch {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(p) => {
                    size += p.requests.len();
                    batch.push(p);
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        let requests: Vec<SynthesisRequest> = batch
            .iter()
            .flat_map(|p| p.requests.iter().cloned())
            .collect();
        tracing::debug!(
            calls = batch.len(),
            chunks = requests.len(),
            "batched synthesis"
        );
        let mut results = model.synthesize_batch(&requests).into_iter();
        for pending in batch {
            let share: Vec<_> = results.by_ref().take(pending.requests.len()).collect();
            // A caller that gave up (its job was cancelled) just drops its share.
            let _ = pending.reply.send(share);
        }
    }
}

impl Synthesizer for BatchingSynthesizer {
    fn voices(&self) -> Vec<Voice> {
        self.inner.voices()
    }

    fn sample_rate(&self) -> u32 {
        self.inner.sample_rate()
    }

    fn synthesize(&self, request: &SynthesisRequest) -> Result<Audio, TtsError> {
        self.submit(vec![request.clone()])
            .pop()
            .unwrap_or_else(|| Err(TtsError::Backend("no result from the batch".into())))
    }

    fn synthesize_batch(&self, requests: &[SynthesisRequest]) -> Vec<Result<Audio, TtsError>> {
        self.submit(requests.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Records the size of every batch it runs.
    #[derive(Debug, Default)]
    struct Counting {
        batches: Mutex<Vec<usize>>,
        calls: AtomicUsize,
    }

    impl Synthesizer for Counting {
        fn voices(&self) -> Vec<Voice> {
            vec![Voice::new("v", "V")]
        }
        fn sample_rate(&self) -> u32 {
            8_000
        }
        fn synthesize(&self, request: &SynthesisRequest) -> Result<Audio, TtsError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Ok(Audio::new(vec![0.0; request.text.len()], 8_000))
        }
        fn synthesize_batch(&self, requests: &[SynthesisRequest]) -> Vec<Result<Audio, TtsError>> {
            self.batches.lock().unwrap().push(requests.len());
            requests.iter().map(|r| self.synthesize(r)).collect()
        }
    }

    #[test]
    fn concurrent_calls_share_one_batch_and_each_gets_its_own_result() {
        let inner = Arc::new(Counting::default());
        let batcher = Arc::new(
            BatchingSynthesizer::new(inner.clone(), 8, Duration::from_millis(300)).unwrap(),
        );
        let handles: Vec<_> = (1..=4)
            .map(|n| {
                let b = batcher.clone();
                std::thread::spawn(move || {
                    b.synthesize(&SynthesisRequest::new("x".repeat(n), "v"))
                        .unwrap()
                })
            })
            .collect();
        let lens: Vec<usize> = handles
            .into_iter()
            .map(|h| h.join().unwrap().samples.len())
            .collect();
        assert_eq!(lens, vec![1, 2, 3, 4]);
        let batches = inner.batches.lock().unwrap().clone();
        assert_eq!(batches.iter().sum::<usize>(), 4);
        assert!(batches.len() < 4, "no batching happened: {batches:?}");
    }

    #[test]
    fn a_call_within_the_window_joins_the_waiting_batch() {
        let inner = Arc::new(Counting::default());
        let batcher =
            Arc::new(BatchingSynthesizer::new(inner.clone(), 2, Duration::from_secs(60)).unwrap());
        assert_eq!(batcher.voices(), inner.voices());
        assert_eq!(batcher.sample_rate(), 8_000);
        let started = Instant::now();
        let b = batcher.clone();
        let first =
            std::thread::spawn(move || b.synthesize(&SynthesisRequest::new("a", "v")).unwrap());
        std::thread::sleep(Duration::from_millis(100));
        batcher
            .synthesize(&SynthesisRequest::new("bb", "v"))
            .unwrap();
        first.join().unwrap();
        assert_eq!(*inner.batches.lock().unwrap(), vec![2]);
        // Two calls of one chunk each fill it: the window's minute is not waited out.
        assert!(started.elapsed() < Duration::from_secs(30));
    }

    #[test]
    fn a_full_batch_does_not_wait_for_the_window() {
        let inner = Arc::new(Counting::default());
        let batcher = BatchingSynthesizer::new(inner.clone(), 2, Duration::from_secs(60)).unwrap();
        let started = Instant::now();
        let out = batcher.synthesize_batch(&[
            SynthesisRequest::new("a", "v"),
            SynthesisRequest::new("bb", "v"),
        ]);
        assert_eq!(out.len(), 2);
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
