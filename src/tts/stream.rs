//! [`AudioStream`]: a job's audio, published sentence by sentence while it is made.
//!
//! A long text takes seconds to speak, but its first sentence is ready long before the
//! last. So a worker's [`TtsHandler`](super::TtsHandler) with a stream appends each chunk's
//! samples to a per-job Redis stream as soon as the backend returns them, and an API relays
//! them to the client: the first audio leaves before the job ends. Several readers may
//! follow one job (a duplicate request of a job in flight reads the same stream from its
//! start), and a reader that arrives after the end still gets every entry until the TTL.
//!
//! # Keys and entries
//!
//! One stream per job, `<prefix>:{<queue>}:stream:<job id>`, under the job's queue hash
//! tag, its TTL renewed on every write. Entries, in order:
//!
//! - `start` (`attempt`, `rate`): an attempt began, speaking at `rate` Hz;
//! - `audio` (`pcm`): mono 16-bit little-endian samples, the pause before a sentence
//!   included, so the chunks joined are the job's audio;
//! - `done`, or `failed` (`error`): the attempt ended. A retried job appends a new `start`
//!   after a `failed`: a reader that already relayed audio of the failed attempt must end
//!   its response there, since sent bytes cannot be taken back.

use std::sync::Arc;
use std::time::Duration;

use redis::streams::{StreamReadOptions, StreamReadReply};
use redis::{FromRedisValue, Value};

use super::{Audio, SynthesisRequest, Synthesizer, TtsError, Voice};
use crate::Queue;
use crate::error::Error;
use crate::job::JobId;
use crate::redis::{Conn, Connector};

/// How long a job's stream stays after its last write, by default.
const DEFAULT_TTL: Duration = Duration::from_secs(600);

/// One entry of a job's audio stream.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum StreamEvent {
    /// An attempt began; its audio is at `sample_rate`.
    Started {
        /// The attempt, from 1.
        attempt: u32,
        /// Samples per second of the audio that follows.
        sample_rate: u32,
    },
    /// Samples: mono, 16-bit signed little-endian.
    Audio(Vec<u8>),
    /// The attempt finished: all its audio was sent.
    Done,
    /// The attempt failed with this error; the job may be retried.
    Failed(String),
}

/// Writes and reads the audio streams of one queue's jobs. Cheap to clone.
#[derive(Clone)]
pub struct AudioStream {
    conn: Conn,
    connector: Connector,
    base: String,
    ttl: Duration,
}

impl std::fmt::Debug for AudioStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AudioStream")
            .field("base", &self.base)
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl AudioStream {
    /// The streams of `queue`'s jobs, under its hash tag.
    pub fn new<J>(queue: &Queue<J>) -> Self {
        let shared = queue.shared();
        AudioStream {
            conn: shared.conn.clone(),
            connector: shared.connector.clone(),
            base: format!("{}:stream:", shared.keys.base()),
            ttl: DEFAULT_TTL,
        }
    }

    /// How long a stream stays after its last write (default 10 minutes): long enough for
    /// a slow reader to finish, short because the finished audio is in the result store.
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    fn key(&self, id: &JobId) -> String {
        format!("{}{}", self.base, id.as_str())
    }

    async fn append(&self, id: &JobId, fields: &[(&str, &[u8])]) -> Result<(), Error> {
        let key = self.key(id);
        let ms = self.ttl.as_millis().clamp(1, u128::from(u64::MAX)) as u64;
        let mut xadd = redis::cmd("XADD");
        xadd.arg(&key).arg("*");
        for (field, value) in fields {
            xadd.arg(*field).arg(*value);
        }
        let () = redis::pipe()
            .add_command(xadd)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(ms)
            .ignore()
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    /// Appends [`StreamEvent::Started`].
    pub async fn start(&self, id: &JobId, attempt: u32, sample_rate: u32) -> Result<(), Error> {
        let (attempt, rate) = (attempt.to_string(), sample_rate.to_string());
        self.append(
            id,
            &[("start", attempt.as_bytes()), ("rate", rate.as_bytes())],
        )
        .await
    }

    /// Appends audio: `audio`'s samples as 16-bit PCM.
    pub async fn push(&self, id: &JobId, audio: &Audio) -> Result<(), Error> {
        let pcm = audio.encode(super::AudioFormat::PcmI16).unwrap_or_default();
        self.append(id, &[("pcm", &pcm)]).await
    }

    /// Appends [`StreamEvent::Done`].
    pub async fn finish(&self, id: &JobId) -> Result<(), Error> {
        self.append(id, &[("done", b"1")]).await
    }

    /// Appends [`StreamEvent::Failed`].
    pub async fn fail(&self, id: &JobId, error: &str) -> Result<(), Error> {
        self.append(id, &[("failed", error.as_bytes())]).await
    }

    /// Whether a stream exists for `id` (it was written within the TTL).
    pub async fn exists(&self, id: &JobId) -> Result<bool, Error> {
        let n: i64 = redis::cmd("EXISTS")
            .arg(self.key(id))
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(n > 0)
    }

    /// A reader of `id`'s stream from its first entry, on a connection of its own (its
    /// reads block in Redis, which would stall a shared connection). The stream need not
    /// exist yet: a reader of a queued job waits for its first entry.
    pub async fn reader(&self, id: &JobId) -> Result<StreamReader, Error> {
        Ok(StreamReader {
            conn: self.connector.connect_blocking().await?,
            key: self.key(id),
            last: "0-0".to_owned(),
        })
    }
}

/// Follows one job's stream (see [`AudioStream::reader`]).
pub struct StreamReader {
    conn: Conn,
    key: String,
    last: String,
}

impl std::fmt::Debug for StreamReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamReader")
            .field("key", &self.key)
            .field("last", &self.last)
            .finish()
    }
}

impl StreamReader {
    /// The entries after the last one read, waiting up to `block` for one; empty when
    /// none came in time (then the caller may check whether the job is still alive).
    pub async fn next(&mut self, block: Duration) -> Result<Vec<StreamEvent>, Error> {
        let options = StreamReadOptions::default()
            .count(64)
            .block(block.as_millis().max(1) as usize);
        let reply: Option<StreamReadReply> = redis::cmd("XREAD")
            .arg(&options)
            .arg("STREAMS")
            .arg(&self.key)
            .arg(&self.last)
            .query_async(&mut self.conn)
            .await?;
        let mut out = Vec::new();
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            for entry in key.ids {
                self.last = entry.id.clone();
                out.push(decode(&entry.map));
            }
        }
        Ok(out)
    }
}

fn bytes(map: &std::collections::HashMap<String, Value>, field: &str) -> Option<Vec<u8>> {
    map.get(field)
        .and_then(|v| Vec::<u8>::from_redis_value(v.clone()).ok())
}

fn number(map: &std::collections::HashMap<String, Value>, field: &str) -> u32 {
    bytes(map, field)
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn decode(map: &std::collections::HashMap<String, Value>) -> StreamEvent {
    if let Some(pcm) = bytes(map, "pcm") {
        StreamEvent::Audio(pcm)
    } else if map.contains_key("start") {
        StreamEvent::Started {
            attempt: number(map, "start"),
            sample_rate: number(map, "rate"),
        }
    } else if map.contains_key("done") {
        StreamEvent::Done
    } else {
        let error = bytes(map, "failed").unwrap_or_else(|| b"unknown stream entry".to_vec());
        StreamEvent::Failed(String::from_utf8_lossy(&error).into_owned())
    }
}

/// A synthesiser that hands every chunk it makes to `sink` as it makes it (with the
/// pause the long-text driver puts before every chunk but the first, and at the rate
/// the request asks for), so the handler can publish audio while the job runs.
pub(crate) struct Tap {
    pub(crate) inner: Arc<dyn Synthesizer>,
    pub(crate) sink: tokio::sync::mpsc::UnboundedSender<Audio>,
    pub(crate) pause: Duration,
    pub(crate) rate: Option<u32>,
    pub(crate) sent: std::sync::atomic::AtomicUsize,
}

impl Tap {
    fn forward(&self, piece: &Audio) {
        let first = self.sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0;
        let mut chunk = if first {
            Audio::new(Vec::new(), piece.sample_rate)
        } else {
            Audio::silence(self.pause, piece.sample_rate)
        };
        chunk.append(piece);
        if let Some(rate) = self.rate.filter(|&r| r != chunk.sample_rate) {
            chunk = chunk.resample(rate);
        }
        // The receiver is gone only when the job ended; nothing is left to tell.
        let _ = self.sink.send(chunk);
    }
}

impl Synthesizer for Tap {
    fn voices(&self) -> Vec<Voice> {
        self.inner.voices()
    }

    fn sample_rate(&self) -> u32 {
        self.inner.sample_rate()
    }

    fn synthesize(&self, request: &SynthesisRequest) -> Result<Audio, TtsError> {
        let audio = self.inner.synthesize(request)?;
        self.forward(&audio);
        Ok(audio)
    }

    fn synthesize_batch(&self, requests: &[SynthesisRequest]) -> Vec<Result<Audio, TtsError>> {
        let results = self.inner.synthesize_batch(requests);
        // Stop at the first failure: the job fails there, and audio after a gap would lie.
        for result in &results {
            match result {
                Ok(audio) => self.forward(audio),
                Err(_) => break,
            }
        }
        results
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(value: &[u8]) -> Value {
        Value::BulkString(value.to_vec())
    }

    #[test]
    fn entries_decode_to_events() {
        let map = |pairs: &[(&str, &[u8])]| {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), field(v)))
                .collect::<std::collections::HashMap<_, _>>()
        };
        assert_eq!(
            decode(&map(&[("start", b"2"), ("rate", b"22050")])),
            StreamEvent::Started {
                attempt: 2,
                sample_rate: 22_050
            }
        );
        assert_eq!(
            decode(&map(&[("pcm", &[1, 0, 255, 255])])),
            StreamEvent::Audio(vec![1, 0, 255, 255])
        );
        assert_eq!(decode(&map(&[("done", b"1")])), StreamEvent::Done);
        assert_eq!(
            decode(&map(&[("failed", b"boom")])),
            StreamEvent::Failed("boom".into())
        );
    }

    struct Fixed;

    impl Synthesizer for Fixed {
        fn voices(&self) -> Vec<Voice> {
            vec![Voice::new("v", "V")]
        }
        fn sample_rate(&self) -> u32 {
            1000
        }
        fn synthesize(&self, request: &SynthesisRequest) -> Result<Audio, TtsError> {
            if request.text == "fail" {
                return Err(TtsError::EmptyText);
            }
            Ok(Audio::new(vec![0.5; request.text.len()], 1000))
        }
    }

    fn tap(rate: Option<u32>) -> (Tap, tokio::sync::mpsc::UnboundedReceiver<Audio>) {
        let (sink, chunks) = tokio::sync::mpsc::unbounded_channel();
        let tap = Tap {
            inner: Arc::new(Fixed),
            sink,
            pause: Duration::from_millis(3),
            rate,
            sent: Default::default(),
        };
        (tap, chunks)
    }

    #[test]
    fn the_tap_sends_chunks_at_the_requested_rate() {
        let (tap, mut chunks) = tap(Some(2000));
        // What the long-text driver asks of it is the inner voice's own.
        assert_eq!(tap.voices(), Fixed.voices());
        assert_eq!(tap.sample_rate(), 1000);
        tap.synthesize(&SynthesisRequest::new("abcd", "v")).unwrap();
        let chunk = chunks.try_recv().unwrap();
        assert_eq!((chunk.sample_rate, chunk.samples.len()), (2000, 8));
    }

    #[test]
    fn the_tap_stops_at_the_first_failure_of_a_batch() {
        let (tap, mut chunks) = tap(None);
        let requests = ["ab", "fail", "abc"].map(|t| SynthesisRequest::new(t, "v"));
        let results = tap.synthesize_batch(&requests);
        assert_eq!(results.len(), 3);
        assert_eq!(chunks.try_recv().unwrap().samples, vec![0.5; 2]);
        assert!(chunks.try_recv().is_err(), "no audio after the gap");
    }

    #[test]
    fn the_tap_forwards_each_chunk_with_the_pause_before_all_but_the_first() {
        let (tap, mut chunks) = tap(None);
        tap.synthesize(&SynthesisRequest::new("abcd", "v")).unwrap();
        tap.synthesize_batch(&[SynthesisRequest::new("ab", "v")]);
        assert_eq!(chunks.try_recv().unwrap().samples, vec![0.5; 4]);
        assert_eq!(
            chunks.try_recv().unwrap().samples,
            vec![0.0, 0.0, 0.0, 0.5, 0.5]
        );
        assert!(chunks.try_recv().is_err());
    }
}
