//! The backend trait and the long-text driver built on it.
//!
//! A backend only has to turn one short piece of normalised text into audio. Everything a
//! job needs on top (sentence splitting, batching, pauses, resampling, captions, progress
//! and cancellation) lives once in [`synthesize_long`], so every backend gets it for free and
//! behaves the same.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::audio::{Audio, samples_to_duration};
use super::captions::Caption;
use super::error::TtsError;
use super::request::SynthesisRequest;
use super::text::split_sentences_max;

/// A voice a backend offers; its `id` is what [`SynthesisRequest::voice`] names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Voice {
    /// Stable identifier used in requests (and therefore in dedup hashes: never rename one).
    pub id: String,
    /// Human-readable name for voice pickers.
    pub name: String,
    /// The language it speaks (BCP 47), if it is tied to one.
    #[serde(default)]
    pub language: Option<String>,
    /// What it sounds like, for people choosing one.
    #[serde(default)]
    pub description: Option<String>,
}

impl Voice {
    /// A voice with no language or description.
    pub fn new(id: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            name: name.into(),
            language: None,
            description: None,
        }
    }

    /// Sets the language tag.
    #[must_use]
    pub fn with_language(mut self, language: impl Into<String>) -> Self {
        self.language = Some(language.into());
        self
    }

    /// Sets the description.
    #[must_use]
    pub fn with_description(mut self, description: impl Into<String>) -> Self {
        self.description = Some(description.into());
        self
    }
}

/// A text-to-speech backend.
///
/// Inference is CPU- or GPU-bound blocking work, so the trait is synchronous: a worker calls
/// it from a dedicated thread or `spawn_blocking`, never on the async runtime, and loads the
/// model once and shares it (hence `Send + Sync` and `&self`). It is object-safe so a worker
/// can pick its backend at run time and hold a `Box<dyn Synthesizer>` or `Arc<dyn
/// Synthesizer>`.
pub trait Synthesizer: Send + Sync {
    /// The voices this backend accepts; used to validate requests and list them to users.
    fn voices(&self) -> Vec<Voice>;

    /// The rate, in Hz, at which this backend produces audio. Output at any other rate costs
    /// a resampling pass, done by [`synthesize_long`] when a request asks for it.
    fn sample_rate(&self) -> u32;

    /// Speaks one chunk of text (about a sentence): `request.text` is already normalised and
    /// short enough for the model.
    ///
    /// Returns audio at the backend's native rate; `request.sample_rate` and
    /// `request.format` are the driver's business and may be ignored here.
    fn synthesize(&self, request: &SynthesisRequest) -> Result<Audio, TtsError>;

    /// Speaks several chunks, one result per request, in order.
    ///
    /// The default is a loop over [`synthesize`](Self::synthesize). Backends that can run
    /// several inputs through the model at once (padding them into one batch on a GPU)
    /// override it; that is where their throughput comes from.
    fn synthesize_batch(&self, requests: &[SynthesisRequest]) -> Vec<Result<Audio, TtsError>> {
        requests.iter().map(|r| self.synthesize(r)).collect()
    }
}

/// Keeps [`Synthesizer`] object-safe: adding a generic method breaks this line, not users.
fn _assert_object_safe(_: &dyn Synthesizer) {}

/// Smart pointers to a synthesizer are synthesizers (a model shared by handlers).
macro_rules! delegate {
    ($($ptr:ident),*) => {$(
        impl<S: Synthesizer + ?Sized> Synthesizer for $ptr<S> {
            fn voices(&self) -> Vec<Voice> {
                (**self).voices()
            }
            fn sample_rate(&self) -> u32 {
                (**self).sample_rate()
            }
            fn synthesize(&self, request: &SynthesisRequest) -> Result<Audio, TtsError> {
                (**self).synthesize(request)
            }
            fn synthesize_batch(&self, requests: &[SynthesisRequest]) -> Vec<Result<Audio, TtsError>> {
                (**self).synthesize_batch(requests)
            }
        }
    )*};
}

delegate!(Box, Arc);

/// How [`synthesize_long`] cuts and joins long text.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LongTextOptions {
    /// Longest chunk handed to the backend, in characters (default 400). Models lose
    /// prosody and memory grows with input length, so long sentences are cut further.
    pub max_chunk_chars: usize,
    /// Chunks per [`Synthesizer::synthesize_batch`] call (default 1). Raise it for a backend
    /// that batches; progress is then reported per batch. 0 is treated as 1.
    pub batch_size: usize,
    /// Silence between sentences (default 250 ms), because backends trim their output and
    /// back-to-back sentences sound rushed.
    pub pause: Duration,
}

impl Default for LongTextOptions {
    fn default() -> Self {
        Self {
            max_chunk_chars: 400,
            batch_size: 1,
            pause: Duration::from_millis(250),
        }
    }
}

impl LongTextOptions {
    /// The defaults (same as [`Default`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the longest chunk, in characters.
    #[must_use]
    pub fn with_max_chunk_chars(mut self, max_chunk_chars: usize) -> Self {
        self.max_chunk_chars = max_chunk_chars;
        self
    }

    /// Sets how many chunks go to the backend per call.
    #[must_use]
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size;
        self
    }

    /// Sets the silence between sentences.
    #[must_use]
    pub fn with_pause(mut self, pause: Duration) -> Self {
        self.pause = pause;
        self
    }
}

/// The result of [`synthesize_long`]: the joined audio and a caption per chunk.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Synthesis {
    /// All chunks with pauses between them, at the requested (or native) rate.
    pub audio: Audio,
    /// One caption per chunk, numbered from 1, covering exactly that chunk's audio; the gap
    /// between two captions is the pause.
    pub captions: Vec<Caption>,
}

impl Synthesis {
    /// Pairs audio with its captions.
    pub fn new(audio: Audio, captions: Vec<Caption>) -> Self {
        Self { audio, captions }
    }
}

/// Speaks text of any length through a backend that handles about a sentence at a time.
///
/// The request's text is normalised and split into sentences (chunks of at most
/// `opts.max_chunk_chars`), which go to the backend in order, `opts.batch_size` per
/// [`Synthesizer::synthesize_batch`] call. The chunks are joined with `opts.pause` of
/// silence between them (none before the first or after the last), the result is resampled
/// to `request.sample_rate` if one is set, and nothing else is done to it (no gain, no
/// trimming), so what a test measures is what the backend made.
///
/// After each batch `progress(done, total)` is called with chunk counts; returning `false`
/// stops the job with [`TtsError::Cancelled`] without calling the backend again. That is how
/// a worker reports progress and honours cancellation between sentences, the finest grain
/// at which a blocking backend can be interrupted.
///
/// The first failing chunk fails the whole job with that chunk's error: a recording with a
/// sentence missing is worse than a retry.
pub fn synthesize_long(
    synth: &dyn Synthesizer,
    request: &SynthesisRequest,
    opts: &LongTextOptions,
    progress: &mut dyn FnMut(usize, usize) -> bool,
) -> Result<Synthesis, TtsError> {
    let request = request.normalized();
    let chunks = split_sentences_max(&request.text, opts.max_chunk_chars);
    if chunks.is_empty() {
        return Err(TtsError::EmptyText);
    }
    let total = chunks.len();
    let batch_size = opts.batch_size.max(1);
    tracing::debug!(
        chunks = total,
        batch_size,
        voice = %request.voice,
        "synthesising long text"
    );

    // Each chunk is the caller's request with its own text; the backend works at its native
    // rate and the driver resamples once at the end, instead of once per chunk.
    let chunk_requests: Vec<SynthesisRequest> = chunks
        .iter()
        .map(|text| SynthesisRequest {
            text: text.clone(),
            sample_rate: None,
            ..request.clone()
        })
        .collect();

    let mut audio: Option<Audio> = None;
    // Sample spans of each chunk in `audio`, at its rate.
    let mut spans: Vec<(usize, usize)> = Vec::with_capacity(total);
    let mut done = 0;
    for batch in chunk_requests.chunks(batch_size) {
        let results = synth.synthesize_batch(batch);
        if results.len() != batch.len() {
            return Err(TtsError::Backend(format!(
                "backend returned {} results for a batch of {}",
                results.len(),
                batch.len()
            )));
        }
        for result in results {
            let piece = result?;
            if piece.sample_rate == 0 {
                return Err(TtsError::Backend("backend returned audio at 0 Hz".into()));
            }
            let joined = audio.get_or_insert_with(|| Audio::new(Vec::new(), piece.sample_rate));
            if !spans.is_empty() {
                joined.append(&Audio::silence(opts.pause, joined.sample_rate));
            }
            let start = joined.samples.len();
            joined.append(&piece);
            spans.push((start, joined.samples.len()));
        }
        done += batch.len();
        if !progress(done, total) {
            tracing::debug!(done, total, "long synthesis cancelled");
            return Err(TtsError::Cancelled);
        }
    }

    let mut audio = audio.unwrap_or_else(|| Audio::new(Vec::new(), synth.sample_rate()));
    let native_rate = audio.sample_rate;
    if let Some(rate) = request.sample_rate.filter(|&r| r != native_rate) {
        audio = audio.resample(rate);
    }
    // Map sample positions to the final rate exactly as `resample` sizes its output, so the
    // last caption ends precisely at the end of the audio.
    let out_rate = audio.sample_rate;
    let to_out = |pos: usize| -> usize {
        let scaled = (pos as u128 * u128::from(out_rate) + u128::from(native_rate) / 2)
            / u128::from(native_rate);
        usize::try_from(scaled).unwrap_or(usize::MAX)
    };
    let captions = spans
        .iter()
        .zip(chunks)
        .enumerate()
        .map(|(i, (&(start, end), text))| {
            Caption::new(
                i + 1,
                samples_to_duration(to_out(start), out_rate),
                samples_to_duration(to_out(end), out_rate),
                text,
            )
        })
        .collect();
    Ok(Synthesis::new(audio, captions))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A tone whose length is proportional to the text: 10 ms per character.
    #[derive(Debug, Default)]
    struct ToneSynth {
        rate: u32,
        calls: AtomicUsize,
        batches: Mutex<Vec<usize>>,
        fail_on: Option<&'static str>,
        seen: Mutex<Vec<SynthesisRequest>>,
    }

    impl ToneSynth {
        fn new(rate: u32) -> Self {
            Self {
                rate,
                ..Self::default()
            }
        }
        fn samples_for(&self, text: &str) -> usize {
            text.chars().count() * self.rate as usize / 100
        }
    }

    impl Synthesizer for ToneSynth {
        fn voices(&self) -> Vec<Voice> {
            vec![Voice::new("tone", "Tone").with_language("xx")]
        }
        fn sample_rate(&self) -> u32 {
            self.rate
        }
        fn synthesize(&self, request: &SynthesisRequest) -> Result<Audio, TtsError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.seen.lock().unwrap().push(request.clone());
            if self.fail_on.is_some_and(|f| request.text.contains(f)) {
                return Err(TtsError::Backend("model exploded".into()));
            }
            let n = self.samples_for(&request.text);
            let samples = (0..n)
                .map(|i| 0.5 * (i as f32 * 440.0 * std::f32::consts::TAU / self.rate as f32).sin())
                .collect();
            Ok(Audio::new(samples, self.rate))
        }
        fn synthesize_batch(&self, requests: &[SynthesisRequest]) -> Vec<Result<Audio, TtsError>> {
            self.batches.lock().unwrap().push(requests.len());
            requests.iter().map(|r| self.synthesize(r)).collect()
        }
    }

    const TEXT: &str = "  First sentence here. Second one is a bit longer! Third?\n\nFourth.  ";

    fn run(
        synth: &ToneSynth,
        request: &SynthesisRequest,
        opts: &LongTextOptions,
    ) -> Result<Synthesis, TtsError> {
        synthesize_long(synth, request, opts, &mut |_, _| true)
    }

    fn within_one_sample(a: Duration, b: Duration, rate: u32) -> bool {
        a.abs_diff(b).as_secs_f64() <= 1.0 / f64::from(rate)
    }

    #[test]
    fn object_safe_and_usable_through_pointers() {
        let boxed: Box<dyn Synthesizer> = Box::new(ToneSynth::new(8000));
        _assert_object_safe(&boxed);
        let shared: Arc<dyn Synthesizer> = Arc::new(ToneSynth::new(8000));
        assert_eq!(shared.sample_rate(), 8000);
        assert_eq!(boxed.voices()[0].id, "tone");
        let out = run_dyn(&shared);
        assert_eq!(out.captions.len(), 4);
    }

    fn run_dyn(s: &dyn Synthesizer) -> Synthesis {
        synthesize_long(
            s,
            &SynthesisRequest::new(TEXT, "tone"),
            &LongTextOptions::default(),
            &mut |_, _| true,
        )
        .unwrap()
    }

    #[test]
    fn default_synthesize_batch_loops_in_order() {
        struct Plain;
        impl Synthesizer for Plain {
            fn voices(&self) -> Vec<Voice> {
                Vec::new()
            }
            fn sample_rate(&self) -> u32 {
                1000
            }
            fn synthesize(&self, r: &SynthesisRequest) -> Result<Audio, TtsError> {
                Ok(Audio::new(vec![0.0; r.text.len()], 1000))
            }
        }
        let reqs = [
            SynthesisRequest::new("a", "v"),
            SynthesisRequest::new("abc", "v"),
        ];
        let lens: Vec<usize> = Plain
            .synthesize_batch(&reqs)
            .into_iter()
            .map(|r| r.unwrap().samples.len())
            .collect();
        assert_eq!(lens, [1, 3]);
    }

    #[test]
    fn captions_cover_each_sentence_and_add_up_to_the_audio() {
        let synth = ToneSynth::new(22050);
        let opts = LongTextOptions::default();
        let out = run(&synth, &SynthesisRequest::new(TEXT, "tone"), &opts).unwrap();
        let texts: Vec<&str> = out.captions.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(
            texts,
            [
                "First sentence here.",
                "Second one is a bit longer!",
                "Third?",
                "Fourth."
            ]
        );
        let rate = out.audio.sample_rate;
        assert_eq!(rate, 22050);
        assert_eq!(out.captions[0].start, Duration::ZERO);
        assert_eq!(out.captions.last().unwrap().end, out.audio.duration());
        let pause = Audio::silence(opts.pause, rate).duration();
        let mut expected_samples = 0;
        for (i, c) in out.captions.iter().enumerate() {
            assert_eq!(c.index, i + 1);
            let speech = Audio::new(vec![0.0; synth.samples_for(&c.text)], rate).duration();
            assert!(within_one_sample(c.end - c.start, speech, rate), "{c:?}");
            if i > 0 {
                let gap = c.start - out.captions[i - 1].end;
                assert!(within_one_sample(gap, pause, rate), "gap {gap:?}");
            }
            expected_samples += synth.samples_for(&c.text);
        }
        expected_samples += 3 * Audio::silence(opts.pause, rate).samples.len();
        assert_eq!(out.audio.samples.len(), expected_samples);
        // The pauses really are silent and the speech is not.
        let (s1, e0) = (out.captions[1].start, out.captions[0].end);
        let gap = &out.audio.samples[(e0.as_secs_f64() * 22050.0).ceil() as usize
            ..(s1.as_secs_f64() * 22050.0).floor() as usize];
        assert!(gap.iter().all(|&x| x == 0.0));
        assert!(!out.audio.is_silent(0.1));
    }

    #[test]
    fn resamples_once_at_the_end_and_captions_still_add_up() {
        let synth = ToneSynth::new(22050);
        let request = SynthesisRequest::new(TEXT, "tone").with_sample_rate(16000);
        let out = run(&synth, &request, &LongTextOptions::default()).unwrap();
        assert_eq!(out.audio.sample_rate, 16000);
        assert_eq!(out.captions.last().unwrap().end, out.audio.duration());
        // Backends are asked for native audio, not the final rate.
        assert!(
            synth
                .seen
                .lock()
                .unwrap()
                .iter()
                .all(|r| r.sample_rate.is_none())
        );
        let native = run(
            &ToneSynth::new(22050),
            &SynthesisRequest::new(TEXT, "tone"),
            &LongTextOptions::default(),
        )
        .unwrap();
        assert!(within_one_sample(
            native.audio.duration(),
            out.audio.duration(),
            16000
        ));
        for (a, b) in native.captions.iter().zip(&out.captions) {
            assert!(within_one_sample(a.start, b.start, 16000));
            assert!(within_one_sample(a.end, b.end, 16000));
        }
    }

    #[test]
    fn backends_get_normalised_text_and_the_other_fields() {
        let synth = ToneSynth::new(8000);
        let request = SynthesisRequest::new("Caf\u{65}\u{301}  open.", "tone")
            .with_speed(1.5)
            .with_style("calm");
        run(&synth, &request, &LongTextOptions::default()).unwrap();
        let seen = synth.seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].text, "Caf\u{e9} open.");
        assert_eq!(seen[0].speed, 1.5);
        assert_eq!(seen[0].style.as_deref(), Some("calm"));
    }

    #[test]
    fn batches_are_used_and_progress_is_reported_per_batch() {
        let synth = ToneSynth::new(8000);
        let mut reports = Vec::new();
        let out = synthesize_long(
            &synth,
            &SynthesisRequest::new(TEXT, "tone"),
            &LongTextOptions::new().with_batch_size(3),
            &mut |done, total| {
                reports.push((done, total));
                true
            },
        )
        .unwrap();
        assert_eq!(out.captions.len(), 4);
        assert_eq!(*synth.batches.lock().unwrap(), [3, 1]);
        assert_eq!(reports, [(3, 4), (4, 4)]);
    }

    #[test]
    fn zero_batch_size_means_one() {
        let synth = ToneSynth::new(8000);
        run(
            &synth,
            &SynthesisRequest::new(TEXT, "tone"),
            &LongTextOptions::new().with_batch_size(0),
        )
        .unwrap();
        assert_eq!(*synth.batches.lock().unwrap(), [1, 1, 1, 1]);
    }

    #[test]
    fn progress_returning_false_cancels_before_the_next_chunk() {
        let synth = ToneSynth::new(8000);
        let err = synthesize_long(
            &synth,
            &SynthesisRequest::new(TEXT, "tone"),
            &LongTextOptions::default(),
            &mut |done, _| done < 2,
        )
        .unwrap_err();
        assert!(matches!(err, TtsError::Cancelled));
        assert_eq!(synth.calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn long_sentences_are_chunked_to_max_chars() {
        let synth = ToneSynth::new(8000);
        let text = "word ".repeat(100); // 499 chars, no terminator
        let out = run(
            &synth,
            &SynthesisRequest::new(text, "tone"),
            &LongTextOptions::new()
                .with_max_chunk_chars(50)
                .with_pause(Duration::ZERO),
        )
        .unwrap();
        assert_eq!(out.captions.len(), 10);
        assert!(
            synth
                .seen
                .lock()
                .unwrap()
                .iter()
                .all(|r| r.text.chars().count() <= 50)
        );
        // No pause: captions tile the audio.
        for w in out.captions.windows(2) {
            assert_eq!(w[0].end, w[1].start);
        }
    }

    #[test]
    fn a_failing_chunk_fails_the_job_with_its_error() {
        let synth = ToneSynth {
            fail_on: Some("Third"),
            ..ToneSynth::new(8000)
        };
        let err = run(
            &synth,
            &SynthesisRequest::new(TEXT, "tone"),
            &LongTextOptions::default(),
        )
        .unwrap_err();
        assert!(err.is_retryable(), "{err:?}");
        assert_eq!(synth.calls.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn empty_text_is_an_error_without_calling_the_backend() {
        let synth = ToneSynth::new(8000);
        let err = run(
            &synth,
            &SynthesisRequest::new(" \n ", "tone"),
            &LongTextOptions::default(),
        )
        .unwrap_err();
        assert!(matches!(err, TtsError::EmptyText));
        assert_eq!(synth.calls.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_backend_returning_the_wrong_number_of_results_is_a_backend_error() {
        struct Lossy;
        impl Synthesizer for Lossy {
            fn voices(&self) -> Vec<Voice> {
                Vec::new()
            }
            fn sample_rate(&self) -> u32 {
                8000
            }
            fn synthesize(&self, _: &SynthesisRequest) -> Result<Audio, TtsError> {
                Ok(Audio::new(vec![0.0; 10], 8000))
            }
            fn synthesize_batch(&self, _: &[SynthesisRequest]) -> Vec<Result<Audio, TtsError>> {
                Vec::new()
            }
        }
        let err = synthesize_long(
            &Lossy,
            &SynthesisRequest::new("One. Two.", "x"),
            &LongTextOptions::default(),
            &mut |_, _| true,
        )
        .unwrap_err();
        assert!(matches!(err, TtsError::Backend(_)));
    }

    #[test]
    fn voice_builders() {
        let v = Voice::new("en-us", "English (US)")
            .with_language("en-US")
            .with_description("neutral");
        assert_eq!(v.language.as_deref(), Some("en-US"));
        assert_eq!(v.description.as_deref(), Some("neutral"));
    }
}
