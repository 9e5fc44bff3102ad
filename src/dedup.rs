//! Deduplication: one job per distinct request.
//!
//! Two requests are the same when the canonical JSON of what determines their output is
//! the same: object keys sorted, numbers and strings as serde writes them, never the
//! raw bytes a client sent (which differ in key order and whitespace). The sha256 of
//! that form is the dedup key; the enqueue script checks it and creates the job in one
//! atomic step, so concurrent identical requests make one job.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::Error;

type KeyFn<J> = dyn Fn(&J) -> Result<Value, Error> + Send + Sync;

/// Decides which jobs are the same, and for how long a finished job's result answers
/// a duplicate.
///
/// While a job is queued, scheduled or running, every duplicate attaches to it (the
/// caller gets its id and `duplicate_of`). After it completes, duplicates get the
/// completed job, result included, for `ttl`. After it fails for good, is cancelled
/// or expires, a duplicate creates a new job.
pub struct Deduplicator<J> {
    ttl: Duration,
    key: Arc<KeyFn<J>>,
}

impl<J> Clone for Deduplicator<J> {
    fn clone(&self) -> Self {
        Deduplicator {
            ttl: self.ttl,
            key: self.key.clone(),
        }
    }
}

impl<J> fmt::Debug for Deduplicator<J> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Deduplicator")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl<J: Serialize> Deduplicator<J> {
    /// Deduplicates on the whole payload; completed results are reused for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Deduplicator {
            ttl,
            key: Arc::new(|job: &J| serde_json::to_value(job).map_err(Error::Serialize)),
        }
    }
}

impl<J> Deduplicator<J> {
    /// Deduplicates on what `key` returns: the fields that determine the output (for
    /// speech: normalised text, voice and every audio parameter, not a request id).
    pub fn by<F>(ttl: Duration, key: F) -> Self
    where
        F: Fn(&J) -> Value + Send + Sync + 'static,
    {
        Deduplicator {
            ttl,
            key: Arc::new(move |job: &J| Ok(key(job))),
        }
    }

    /// How long a completed job answers duplicates.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The dedup key of `job`: sha256 (hex) of its canonical form.
    pub fn key(&self, job: &J) -> Result<String, Error> {
        Ok(digest(&(self.key)(job)?))
    }
}

/// JSON with object keys sorted at every level and no insignificant whitespace, so
/// equal values always give equal bytes (whatever map order serde_json was built with).
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(v, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(v, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// The dedup key of a value: sha256 (hex) of its canonical form. The TTS result
/// store addresses audio by the same key, so a request's job and its audio agree.
pub(crate) fn digest(value: &Value) -> String {
    sha256_hex(canonical_json(value).as_bytes())
}

/// Lowercase hex sha256.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A per-key limit on how fast jobs may be enqueued (for example per API key),
/// enforced atomically in Redis (GCRA: `limit` jobs per `period`, bursts included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimit {
    pub(crate) key: String,
    pub(crate) limit: u32,
    pub(crate) period: Duration,
}

impl RateLimit {
    /// At most `limit` new jobs per `period` for `key`. Duplicates are free: they
    /// create no work.
    pub fn new(key: impl Into<String>, limit: u32, period: Duration) -> Result<Self, Error> {
        let key = key.into();
        if limit == 0 || period.is_zero() || key.is_empty() {
            return Err(Error::InvalidConfig(format!(
                "rate limit {key:?}: the key must be non-empty and the limit and period non-zero"
            )));
        }
        Ok(RateLimit { key, limit, period })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_form_ignores_key_order_and_whitespace() {
        let a: Value = serde_json::from_str(r#"{"b": 1, "a": {"y": [1, 2], "x": "é"}}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"a":{"x":"é","y":[1,2]},"b":1}"#).unwrap();
        assert_eq!(canonical_json(&a), canonical_json(&b));
        assert_eq!(canonical_json(&a), r#"{"a":{"x":"é","y":[1,2]},"b":1}"#);
    }

    #[test]
    fn keys_differ_when_any_field_differs() {
        let d = Deduplicator::<Value>::new(Duration::from_secs(1));
        let k1 = d.key(&json!({"text": "hi", "voice": "a"})).unwrap();
        let k2 = d.key(&json!({"voice": "a", "text": "hi"})).unwrap();
        let k3 = d.key(&json!({"text": "hi", "voice": "b"})).unwrap();
        assert_eq!(k1, k2);
        assert_ne!(k1, k3);
        assert_eq!(k1.len(), 64);
    }

    #[test]
    fn a_key_function_picks_the_fields_that_matter() {
        let d = Deduplicator::by(Duration::from_secs(1), |job: &Value| job["text"].clone());
        assert_eq!(
            d.key(&json!({"text": "x", "request_id": 1})).unwrap(),
            d.key(&json!({"text": "x", "request_id": 2})).unwrap()
        );
    }

    #[test]
    fn rate_limits_must_be_positive() {
        assert!(RateLimit::new("k", 0, Duration::from_secs(1)).is_err());
        assert!(RateLimit::new("k", 1, Duration::ZERO).is_err());
        assert!(RateLimit::new("", 1, Duration::from_secs(1)).is_err());
        assert!(RateLimit::new("k", 5, Duration::from_secs(60)).is_ok());
    }
}
