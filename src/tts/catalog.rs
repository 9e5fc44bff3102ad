//! [`Catalog`]: the voices the live workers can speak, published in Redis.
//!
//! A producer cannot know which voices exist from its own binary: the voices are those of
//! the backends the workers loaded (eSpeak NG on one host, Parler-TTS on a GPU host, ...),
//! and they come and go with the workers. So each worker registers its backend's voices
//! while it lives ([`Catalog::keep_registered`]), refreshed well within a TTL, and an API
//! validates and routes against what is registered now ([`Catalog::voices`]). A worker that
//! dies without a word drops out when its TTL runs out, by Redis's clock.
//!
//! Routing is by **queue per backend** ([`backend_queue`]): a request for an eSpeak voice
//! goes to the queue `<queue>.espeak`, which only eSpeak workers take jobs from. The core
//! queue knows nothing of voices, so a queue per backend is the one routing that needs no
//! change to claiming, keeps every guarantee of the core (leases, retries, priorities) per
//! backend, and lets each backend scale by itself. Routing per voice would multiply queues
//! by the dozens of voices a backend has, for no gain: every worker of a backend speaks all
//! its voices.
//!
//! # Keys
//!
//! Under the hash tag of the queue the catalogue is opened on (the base queue that the
//! backend queues are named after), so every command touches one slot:
//!
//! | key | type | what |
//! | --- | --- | --- |
//! | `<prefix>:{<queue>}:catalog:worker:<id>` | string (JSON), `PX` TTL | one live worker's voices |
//! | `<prefix>:{<queue>}:catalog:workers` | set | ids that may be live (pruned on read) |
//! | `<prefix>:{<queue>}:catalog:backends` | set | every backend ever registered (to find jobs) |
//! | `<prefix>:{<queue>}:catalog:custom` | hash | name → [`CustomVoice`] JSON, kept until deleted |

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Voice;
use crate::Queue;
use crate::redis::Conn;

/// Why a catalogue operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CatalogError {
    /// Redis refused or lost the command.
    #[error("voice catalogue (Redis): {0}")]
    Redis(#[from] redis::RedisError),
    /// A stored entry is not the JSON this version writes.
    #[error("voice catalogue entry {key:?} is unreadable: {message}")]
    Corrupt {
        /// The key or field.
        key: String,
        /// The decoding error.
        message: String,
    },
    /// A name, backend or worker id that cannot be stored.
    #[error("invalid catalogue {what}: {value:?} (1 to 64 of a-z, A-Z, 0-9, '-', '_', '.')")]
    Invalid {
        /// What was named.
        what: &'static str,
        /// The value.
        value: String,
    },
}

impl CatalogError {
    /// Redis could not be reached (retry later), as opposed to a bad entry or name.
    pub fn is_connection_error(&self) -> bool {
        matches!(self, CatalogError::Redis(e) if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout())
    }
}

/// The queue that serves `backend` for requests made to the base queue `queue`:
/// `<queue>.<backend>`. Workers take jobs from it and producers enqueue into it, so both
/// must call this with the same names.
pub fn backend_queue(queue: &str, backend: &str) -> String {
    format!("{queue}.{backend}")
}

fn check_name(what: &'static str, value: &str) -> Result<(), CatalogError> {
    let ok = !value.is_empty()
        && value.len() <= 64
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(CatalogError::Invalid {
            what,
            value: value.to_owned(),
        })
    }
}

/// One voice a live worker offers: the backend's [`Voice`] (its fields appear at the top
/// level in JSON) plus what a client needs to use it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct CatalogVoice {
    /// The voice as its backend describes it; `voice.id` is what a request names.
    #[serde(flatten)]
    pub voice: Voice,
    /// The rate of the audio it makes, so a raw-PCM client knows it before the first byte.
    pub sample_rate: u32,
    /// The backend that speaks it (the `model` of the OpenAI-style API).
    pub backend: String,
}

impl CatalogVoice {
    /// A backend's voice as the catalogue lists it.
    pub fn new(voice: &Voice, backend: impl Into<String>, sample_rate: u32) -> Self {
        CatalogVoice {
            voice: voice.clone(),
            sample_rate,
            backend: backend.into(),
        }
    }

    /// The id a request names.
    pub fn id(&self) -> &str {
        &self.voice.id
    }
}

/// What one worker registers: who it is, its backend and its voices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct WorkerVoices {
    /// The worker's id (as the queue knows it).
    pub worker: String,
    /// Its backend.
    pub backend: String,
    /// Every voice it speaks.
    pub voices: Vec<CatalogVoice>,
}

impl WorkerVoices {
    /// A worker of `backend` that speaks `voices` at `sample_rate`.
    pub fn new(
        worker: impl Into<String>,
        backend: impl Into<String>,
        voices: &[Voice],
        sample_rate: u32,
    ) -> Self {
        let backend = backend.into();
        WorkerVoices {
            worker: worker.into(),
            voices: voices
                .iter()
                .map(|v| CatalogVoice::new(v, backend.clone(), sample_rate))
                .collect(),
            backend,
        }
    }
}

/// A voice under a name of one's own: a backend voice with a fixed style prompt (a
/// Parler-TTS description) or speaker (a multi-speaker model's id). Requests name it like
/// any voice; the API replaces it by its base voice and settings before enqueueing, so
/// workers never see custom names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct CustomVoice {
    /// The name requests use.
    pub name: String,
    /// The backend voice it speaks with.
    pub voice: String,
    /// The style prompt sent as [`SynthesisRequest::style`](super::SynthesisRequest::style).
    #[serde(default)]
    pub style: Option<String>,
    /// A speaker id, sent as the request's `extra.speaker`.
    #[serde(default)]
    pub speaker: Option<String>,
    /// What it sounds like, for people.
    #[serde(default)]
    pub description: Option<String>,
}

impl CustomVoice {
    /// `name` speaking with the backend voice `voice`.
    pub fn new(name: impl Into<String>, voice: impl Into<String>) -> Self {
        CustomVoice {
            name: name.into(),
            voice: voice.into(),
            style: None,
            speaker: None,
            description: None,
        }
    }

    /// Sets the style prompt.
    #[must_use]
    pub fn with_style(mut self, style: impl Into<String>) -> Self {
        self.style = Some(style.into());
        self
    }

    /// Sets the speaker id.
    #[must_use]
    pub fn with_speaker(mut self, speaker: impl Into<String>) -> Self {
        self.speaker = Some(speaker.into());
        self
    }

    /// Sets the description.
    #[must_use]
    pub fn with_description(mut self, description: impl Into<String>) -> Self {
        self.description = Some(description.into());
        self
    }
}

/// The live voice catalogue of one deployment (see the module docs). Cheap to clone.
#[derive(Clone)]
pub struct Catalog {
    conn: Conn,
    base: String,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog").field("base", &self.base).finish()
    }
}

impl Catalog {
    /// The catalogue under `queue`'s hash tag, on its connection. Open it on the base
    /// queue (the name given to API and workers), not on a backend queue.
    pub fn new<J>(queue: &Queue<J>) -> Self {
        let shared = queue.shared();
        Catalog {
            conn: shared.conn.clone(),
            base: format!("{}:catalog:", shared.keys.base()),
        }
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.base)
    }

    /// Registers (or refreshes) a worker's voices for `ttl`.
    pub async fn register(&self, entry: &WorkerVoices, ttl: Duration) -> Result<(), CatalogError> {
        check_name("worker id", &entry.worker)?;
        check_name("backend", &entry.backend)?;
        let json = serde_json::to_string(entry).map_err(|e| CatalogError::Corrupt {
            key: entry.worker.clone(),
            message: e.to_string(),
        })?;
        let ms = ttl.as_millis().clamp(1, u128::from(u64::MAX)) as u64;
        let () = redis::pipe()
            .atomic()
            .cmd("SET")
            .arg(self.key(&format!("worker:{}", entry.worker)))
            .arg(json)
            .arg("PX")
            .arg(ms)
            .ignore()
            .sadd(self.key("workers"), &entry.worker)
            .ignore()
            .sadd(self.key("backends"), &entry.backend)
            .ignore()
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    /// Removes a worker's voices at once (a graceful stop), instead of at its TTL.
    pub async fn unregister(&self, worker: &str) -> Result<(), CatalogError> {
        let () = redis::pipe()
            .atomic()
            .del(self.key(&format!("worker:{worker}")))
            .ignore()
            .srem(self.key("workers"), worker)
            .ignore()
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    /// Registers `entry` now and every `ttl / 3` until `shutdown` completes, then
    /// unregisters it. Redis errors are logged and retried at the next refresh: a worker
    /// keeps working while the catalogue is briefly unreachable.
    pub async fn keep_registered(
        self,
        entry: WorkerVoices,
        ttl: Duration,
        shutdown: impl Future<Output = ()> + Send,
    ) {
        let every = (ttl / 3).max(Duration::from_millis(10));
        tokio::pin!(shutdown);
        loop {
            if let Err(e) = self.register(&entry, ttl).await {
                tracing::warn!(error = %e, worker = %entry.worker, "voices not registered");
            }
            tokio::select! {
                () = &mut shutdown => break,
                () = tokio::time::sleep(every) => {}
            }
        }
        if let Err(e) = self.unregister(&entry.worker).await {
            tracing::warn!(error = %e, worker = %entry.worker, "voices not unregistered");
        }
    }

    /// The live workers and their voices, by worker id. Ids whose entry expired are
    /// pruned from the set as a side effect.
    pub async fn workers(&self) -> Result<Vec<WorkerVoices>, CatalogError> {
        let mut conn = self.conn.clone();
        let ids: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.key("workers"))
            .query_async(&mut conn)
            .await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids
            .iter()
            .map(|id| self.key(&format!("worker:{id}")))
            .collect();
        let entries: Vec<Option<String>> =
            redis::cmd("MGET").arg(&keys).query_async(&mut conn).await?;
        let mut live = Vec::new();
        let mut gone = Vec::new();
        for (id, entry) in ids.iter().zip(entries) {
            match entry {
                Some(json) => {
                    live.push(serde_json::from_str::<WorkerVoices>(&json).map_err(|e| {
                        CatalogError::Corrupt {
                            key: id.clone(),
                            message: e.to_string(),
                        }
                    })?)
                }
                None => gone.push(id.clone()),
            }
        }
        if !gone.is_empty() {
            let _: i64 = redis::cmd("SREM")
                .arg(self.key("workers"))
                .arg(&gone)
                .query_async(&mut conn)
                .await?;
        }
        live.sort_by(|a, b| a.worker.cmp(&b.worker));
        Ok(live)
    }

    /// Every voice some live worker speaks, once each, sorted by id.
    pub async fn voices(&self) -> Result<Vec<CatalogVoice>, CatalogError> {
        let mut by_id = BTreeMap::new();
        for worker in self.workers().await? {
            for voice in worker.voices {
                by_id.entry(voice.id().to_owned()).or_insert(voice);
            }
        }
        Ok(by_id.into_values().collect())
    }

    /// Every backend that ever registered, sorted: the backend queues a job may be in,
    /// even when no worker of that backend lives now.
    pub async fn backends(&self) -> Result<Vec<String>, CatalogError> {
        let mut backends: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.key("backends"))
            .query_async(&mut self.conn.clone())
            .await?;
        backends.sort();
        Ok(backends)
    }

    /// Stores (or replaces) a custom voice.
    pub async fn put_custom(&self, voice: &CustomVoice) -> Result<(), CatalogError> {
        check_name("custom voice name", &voice.name)?;
        let json = serde_json::to_string(voice).map_err(|e| CatalogError::Corrupt {
            key: voice.name.clone(),
            message: e.to_string(),
        })?;
        let _: i64 = redis::cmd("HSET")
            .arg(self.key("custom"))
            .arg(&voice.name)
            .arg(json)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    /// The custom voice `name`, if there is one.
    pub async fn custom(&self, name: &str) -> Result<Option<CustomVoice>, CatalogError> {
        let json: Option<String> = redis::cmd("HGET")
            .arg(self.key("custom"))
            .arg(name)
            .query_async(&mut self.conn.clone())
            .await?;
        json.map(|j| decode_custom(name, &j)).transpose()
    }

    /// Every custom voice, sorted by name.
    pub async fn customs(&self) -> Result<Vec<CustomVoice>, CatalogError> {
        let all: BTreeMap<String, String> = redis::cmd("HGETALL")
            .arg(self.key("custom"))
            .query_async(&mut self.conn.clone())
            .await?;
        all.iter().map(|(name, j)| decode_custom(name, j)).collect()
    }

    /// Deletes a custom voice; `true` if it existed.
    pub async fn delete_custom(&self, name: &str) -> Result<bool, CatalogError> {
        let n: i64 = redis::cmd("HDEL")
            .arg(self.key("custom"))
            .arg(name)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(n > 0)
    }
}

fn decode_custom(name: &str, json: &str) -> Result<CustomVoice, CatalogError> {
    serde_json::from_str(json).map_err(|e| CatalogError::Corrupt {
        key: name.to_owned(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_queues_are_named_after_the_base_queue() {
        assert_eq!(backend_queue("speech", "espeak"), "speech.espeak");
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("backend", "parler-tts_1.0").is_ok());
        for bad in ["", "a b", "a:b", "{x}", &"x".repeat(65)] {
            assert!(check_name("backend", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn only_an_unreachable_redis_is_a_connection_error() {
        let io = |kind| CatalogError::Redis(std::io::Error::new(kind, "gone").into());
        assert!(io(std::io::ErrorKind::ConnectionRefused).is_connection_error());
        assert!(io(std::io::ErrorKind::TimedOut).is_connection_error());
        assert!(io(std::io::ErrorKind::BrokenPipe).is_connection_error());
        let refused = redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm),
            "no",
        ));
        assert!(!CatalogError::Redis(refused).is_connection_error());
        assert!(!check_name("backend", "").unwrap_err().is_connection_error());
        let corrupt = CatalogError::Corrupt {
            key: "k".into(),
            message: "m".into(),
        };
        assert!(!corrupt.is_connection_error());
    }

    #[test]
    fn worker_voices_carry_backend_and_rate_on_each_voice() {
        let voices = [Voice::new("en-us", "English (US)").with_language("en-US")];
        let entry = WorkerVoices::new("w1", "espeak", &voices, 22_050);
        assert_eq!(
            serde_json::to_value(&entry.voices).unwrap(),
            serde_json::json!([{
                "id": "en-us",
                "name": "English (US)",
                "language": "en-US",
                "description": null,
                "sample_rate": 22_050,
                "backend": "espeak",
            }])
        );
    }
}
