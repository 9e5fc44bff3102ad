//! What a job is: its id, state, priority, per-job options, and the record Redis keeps.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize};

use crate::error::Error;
use crate::retry::RetryPolicy;

/// A job's id: generated (a UUID v7 written in 22 characters, so ids sort by creation
/// time) or chosen by the caller.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(String);

impl JobId {
    /// A fresh, time-ordered id.
    pub fn generate() -> Self {
        JobId(compact_uuid())
    }

    /// A caller-chosen id: 1 to 256 characters, no control characters.
    pub fn new(id: impl Into<String>) -> Result<Self, Error> {
        let id = id.into();
        if id.is_empty() || id.len() > 256 || id.chars().any(char::is_control) {
            return Err(Error::InvalidJobId(id));
        }
        Ok(JobId(id))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Internal: an id read back from Redis, which only ever stores valid ids.
    pub(crate) fn from_stored(id: String) -> Self {
        JobId(id)
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for JobId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for JobId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        JobId::new(s)
    }
}

/// The 64 digits of [`compact_uuid`]: URL-safe, in ASCII order so that text order is
/// number order, and none a shell or a command line reads as special at the start of
/// a word (an id never starts with `-`).
const DIGITS: &[u8; 64] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz~";

/// A fresh UUID v7 in 22 URL-safe characters instead of 36: every stored copy of an id
/// (the job's entry, its place in line, its lease) is 14 bytes shorter, and ids still
/// sort by creation time.
pub(crate) fn compact_uuid() -> String {
    compact(uuid::Uuid::now_v7().as_u128())
}

fn compact(n: u128) -> String {
    // 128 bits: the top two, then 21 digits of six bits each.
    (0..22)
        .map(|i| {
            let digit = if i == 0 {
                n >> 126
            } else {
                (n >> (126 - 6 * i)) & 63
            };
            char::from(DIGITS[digit as usize])
        })
        .collect()
}

/// The per-job option setters every enqueue builder (a struct with an `options:
/// JobOptions` field) offers, defined once so that a new option reaches them all.
macro_rules! option_setters {
    () => {
        /// Replaces all options at once.
        pub fn options(mut self, options: $crate::job::JobOptions) -> Self {
            self.options = options;
            self
        }

        /// Starts the job no sooner than `delay` from now.
        pub fn delay(mut self, delay: ::std::time::Duration) -> Self {
            self.options = self.options.delay(delay);
            self
        }

        /// Starts the job no sooner than `at`.
        pub fn run_at(mut self, at: ::std::time::SystemTime) -> Self {
            self.options = self.options.run_at(at);
            self
        }

        /// Attempts before the job is dead.
        pub fn max_attempts(mut self, attempts: u32) -> Self {
            self.options = self.options.max_attempts(attempts);
            self
        }

        /// How long one attempt may run.
        pub fn timeout(mut self, timeout: ::std::time::Duration) -> Self {
            self.options.timeout = Some(timeout);
            self
        }

        /// Retries this job on its own policy rather than the worker's.
        pub fn retry(mut self, policy: $crate::retry::RetryPolicy) -> Self {
            self.options.retry = Some(policy);
            self
        }

        /// A job not started within `ttl` ends `Expired`.
        pub fn ttl(mut self, ttl: ::std::time::Duration) -> Self {
            self.options.ttl = Some(ttl);
            self
        }

        /// How long the result is kept.
        pub fn result_ttl(mut self, ttl: ::std::time::Duration) -> Self {
            self.options.result_ttl = Some(ttl);
            self
        }
    };
}
pub(crate) use option_setters;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum JobState {
    /// Waiting for its run-at time (a delay or a retry).
    Scheduled,
    /// Ready for a worker.
    Queued,
    /// A worker holds its lease and runs it.
    Active,
    /// Finished with a result.
    Completed,
    /// Failed for good (permanent error, attempts spent, undecodable); in the dead letters.
    Dead,
    /// Cancelled by a caller.
    Cancelled,
    /// Not started before its time-to-live ran out.
    Expired,
}

impl JobState {
    /// Whether the job will not change state again (unless requeued from the dead letters).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Completed | JobState::Dead | JobState::Cancelled | JobState::Expired
        )
    }

    /// The lowercase name used in Redis and in events.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Scheduled => "scheduled",
            JobState::Queued => "queued",
            JobState::Active => "active",
            JobState::Completed => "completed",
            JobState::Dead => "dead",
            JobState::Cancelled => "cancelled",
            JobState::Expired => "expired",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "scheduled" => JobState::Scheduled,
            "queued" => JobState::Queued,
            "active" => JobState::Active,
            "completed" => JobState::Completed,
            "dead" => JobState::Dead,
            "cancelled" => JobState::Cancelled,
            "expired" => JobState::Expired,
            _ => return None,
        })
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Priority within a queue: strict (every high job before any normal one), FIFO within
/// a level.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Priority {
    /// Runs before everything else (interactive requests).
    High,
    /// The default.
    #[default]
    Normal,
    /// Runs when nothing else waits (batch work).
    Low,
}

impl Priority {
    /// All levels, highest first.
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    /// The level's rank: its ready lane (lower runs first) and the record's `pri`.
    pub(crate) fn rank(self) -> u8 {
        match self {
            Priority::High => 0,
            Priority::Normal => 1,
            Priority::Low => 2,
        }
    }

    pub(crate) fn from_rank(rank: u8) -> Self {
        match rank {
            0 => Priority::High,
            2 => Priority::Low,
            _ => Priority::Normal,
        }
    }
}

/// Options for one job, set at enqueue. Unset options take the queue's defaults.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct JobOptions {
    /// Caller-chosen id: enqueueing the same id twice yields one job.
    pub id: Option<JobId>,
    /// Priority level.
    pub priority: Priority,
    /// Earliest start (absolute). Set by `delay` or `run_at`.
    pub run_at: Option<SystemTime>,
    /// Attempts before the job is dead (1 = no retry); unset, the worker's
    /// [`RetryPolicy`] decides.
    pub max_attempts: Option<u32>,
    /// This job's own retry policy (its delays and, unless `max_attempts` is set,
    /// its attempts), instead of the worker's.
    pub retry: Option<RetryPolicy>,
    /// How long one attempt may run.
    pub timeout: Option<Duration>,
    /// A job not started within this time (from enqueue) ends `Expired`.
    pub ttl: Option<Duration>,
    /// How long the result and the finished record are kept.
    pub result_ttl: Option<Duration>,
    /// Set by `delay`: counted from the enqueue on Redis's clock, so a producer whose
    /// clock is off still delays by exactly this much. `run_at` wins when set later.
    pub(crate) delay: Option<Duration>,
}

impl JobOptions {
    /// Default options.
    pub fn new() -> Self {
        Self::default()
    }

    /// Uses a caller-chosen id.
    pub fn id(mut self, id: JobId) -> Self {
        self.id = Some(id);
        self
    }

    /// Sets the priority.
    pub fn priority(mut self, priority: Priority) -> Self {
        self.priority = priority;
        self
    }

    /// Starts the job no sooner than `delay` from now (from the enqueue, on Redis's
    /// clock; `run_at` reads the local estimate).
    pub fn delay(mut self, delay: Duration) -> Self {
        self.run_at = Some(SystemTime::now() + delay);
        self.delay = Some(delay);
        self
    }

    /// Starts the job no sooner than `at`.
    pub fn run_at(mut self, at: SystemTime) -> Self {
        self.run_at = Some(at);
        self.delay = None;
        self
    }

    /// Attempts before the job is dead (at least 1).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = Some(attempts.max(1));
        self
    }

    /// How long one attempt may run.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Retries this job on its own policy rather than the worker's.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = Some(policy);
        self
    }

    /// A job not started within `ttl` of enqueue ends `Expired` instead of running late.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// How long the result is kept after the job finishes.
    pub fn result_ttl(mut self, ttl: Duration) -> Self {
        self.result_ttl = Some(ttl);
        self
    }
}

/// One failed attempt, as stored with the job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct AttemptError {
    /// Which attempt failed (1-based).
    pub attempt: u32,
    /// When, in ms since the Unix epoch.
    pub at: u64,
    /// The error's kind (`transient`, `permanent`, `timeout`, `panic`, `stalled`, ...).
    pub kind: String,
    /// The error's message.
    pub message: String,
}

/// The record Redis keeps for each job (JSON in the queue's `jobs` hash). Lua reads and
/// writes it with cjson, which is why empty lists may come back as `{}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct JobRecord {
    /// Not stored (the hash field is the id): filled in by [`JobRecord::parse`].
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) state: Option<String>,
    #[serde(default = "normal_rank", skip_serializing_if = "is_normal_rank")]
    pub(crate) pri: u8,
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub(crate) attempts: u32,
    /// 0 until set per job or by the first worker's retry policy.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub(crate) max_attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) timeout_ms: Option<u64>,
    /// Stored as JSON text inside the record: cjson would turn a large seed into a
    /// float (see [`MAX_MS`] for the numbers it does see).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "policy_text")]
    pub(crate) retry: Option<RetryPolicy>,
    #[serde(
        default,
        skip_serializing_if = "is_zero",
        deserialize_with = "ms_number_or_text"
    )]
    pub(crate) created_at: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(crate) run_at: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(crate) expires_at: u64,
    /// Sent at enqueue only: the script turns it into `expires_at` on Redis's clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) ttl_ms: Option<u64>,
    /// Sent at enqueue only: the script turns it into `run_at` on Redis's clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) delay_ms: Option<u64>,
    #[serde(
        default,
        skip_serializing_if = "is_zero",
        deserialize_with = "ms_number_or_text"
    )]
    pub(crate) started_at: u64,
    #[serde(
        default,
        skip_serializing_if = "is_zero",
        deserialize_with = "ms_number_or_text"
    )]
    pub(crate) finished_at: u64,
    /// Not stored when it is the default (`finish` in common.lua assumes it).
    #[serde(
        default = "default_result_ttl",
        skip_serializing_if = "is_default_result_ttl"
    )]
    pub(crate) result_ttl_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) dedup_ttl_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) progress: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) worker: Option<String>,
    #[serde(
        default,
        deserialize_with = "list_or_empty_object",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub(crate) errors: Vec<AttemptError>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) reason: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) cancel: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) result: bool,
}

/// The largest number of milliseconds a record holds (about 317 years). Lua's cjson
/// writes numbers with 14 significant digits, so a larger integer (a "forever"
/// timeout, `Duration::MAX`) would come back as a float and make the record
/// unreadable: every duration and time is clamped to this on the way in.
pub(crate) const MAX_MS: u64 = 10_000_000_000_000;

/// A duration in ms, clamped to what a record holds exactly.
pub(crate) fn safe_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).min(MAX_MS)
}

/// A time or duration already in ms, clamped like [`safe_ms`].
pub(crate) fn clamp_ms(ms: u64) -> u64 {
    ms.min(MAX_MS)
}

/// A retry policy as JSON text inside the record (either form reads back).
mod policy_text {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::retry::RetryPolicy;

    pub(super) fn serialize<S: Serializer>(
        policy: &Option<RetryPolicy>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match policy {
            Some(p) => serde_json::to_string(p)
                .map_err(serde::ser::Error::custom)?
                .serialize(s),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<RetryPolicy>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Stored {
            Text(String),
            Policy(RetryPolicy),
        }
        match Option::<Stored>::deserialize(d)? {
            None => Ok(None),
            Some(Stored::Policy(p)) => Ok(Some(p)),
            Some(Stored::Text(t)) => serde_json::from_str(&t)
                .map(Some)
                .map_err(serde::de::Error::custom),
        }
    }
}

fn normal_rank() -> u8 {
    Priority::Normal.rank()
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The result TTL a record without one has: 24 h, as `finish` in common.lua reads it.
const DEFAULT_RESULT_TTL_MS: u64 = 86_400_000;

fn default_result_ttl() -> u64 {
    DEFAULT_RESULT_TTL_MS
}

fn is_default_result_ttl(ms: &u64) -> bool {
    *ms == DEFAULT_RESULT_TTL_MS
}

fn is_zero_u32(n: &u32) -> bool {
    *n == 0
}

fn is_normal_rank(rank: &u8) -> bool {
    *rank == normal_rank()
}

/// A time the scripts stamp: text (what they write, so cjson never formats a number)
/// or a number (what records written before hold).
///
/// A visitor rather than an untagged enum: the enum buffered the value and built an
/// error message for the variant that did not match, a sixth of the worker's own
/// instructions per no-op job (two stamped times per claimed record).
fn ms_number_or_text<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    struct Ms;
    impl serde::de::Visitor<'_> for Ms {
        type Value = u64;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a time in ms, as a number or as text")
        }

        fn visit_u64<E: serde::de::Error>(self, ms: u64) -> Result<u64, E> {
            Ok(ms)
        }

        fn visit_str<E: serde::de::Error>(self, t: &str) -> Result<u64, E> {
            t.parse()
                .map_err(|_| E::custom(format!("not a time in ms: {t:?}")))
        }
    }
    d.deserialize_any(Ms)
}

/// cjson has one empty table, which it writes as `{}`: accept it as an empty list.
fn list_or_empty_object<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<AttemptError>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrMap {
        List(Vec<AttemptError>),
        Map(serde_json::Map<String, serde_json::Value>),
    }
    match ListOrMap::deserialize(d)? {
        ListOrMap::List(list) => Ok(list),
        ListOrMap::Map(map) if map.is_empty() => Ok(Vec::new()),
        ListOrMap::Map(_) => Err(serde::de::Error::custom("errors: expected a list")),
    }
}

/// Splits a job's stored entry into its record and payload: the record (JSON, which
/// never holds a raw newline), a newline, then the payload. An entry written before
/// the payload moved into it is the record alone (`None`: the payload is kept apart).
pub(crate) fn split_entry(raw: &[u8]) -> (&[u8], Option<&[u8]>) {
    match raw.iter().position(|&b| b == b'\n') {
        Some(at) => (&raw[..at], Some(&raw[at + 1..])),
        None => (raw, None),
    }
}

impl JobRecord {
    /// Reads a job's stored entry (see [`split_entry`]); the payload is not decoded.
    pub(crate) fn parse(id: &str, raw: &[u8]) -> Result<Self, Error> {
        let (raw, _) = split_entry(raw);
        let mut record: Self = serde_json::from_slice(raw).map_err(|e| Error::Corrupt {
            id: JobId::from_stored(id.to_owned()),
            reason: e.to_string(),
        })?;
        id.clone_into(&mut record.id);
        Ok(record)
    }

    pub(crate) fn status(&self) -> Result<JobStatus, Error> {
        let state = self
            .state
            .as_deref()
            .and_then(JobState::parse)
            .ok_or_else(|| Error::Corrupt {
                id: JobId::from_stored(self.id.clone()),
                reason: format!("unknown state {:?}", self.state),
            })?;
        Ok(JobStatus {
            id: JobId::from_stored(self.id.clone()),
            state,
            priority: Priority::from_rank(self.pri),
            attempts: self.attempts,
            max_attempts: (self.max_attempts > 0).then_some(self.max_attempts),
            progress: self.progress,
            created_at: ms_to_time(self.created_at),
            run_at: opt_time(self.run_at),
            started_at: opt_time(self.started_at),
            finished_at: opt_time(self.finished_at),
            expires_at: opt_time(self.expires_at),
            worker: self.worker.clone(),
            errors: self.errors.clone(),
            reason: self.reason.clone(),
            cancel_requested: self.cancel,
            has_result: self.result,
        })
    }
}

/// A snapshot of one job, as `Queue::status` returns it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct JobStatus {
    /// The job.
    pub id: JobId,
    /// Its state.
    pub state: JobState,
    /// Its priority.
    pub priority: Priority,
    /// Attempts started so far.
    pub attempts: u32,
    /// Attempts allowed: set per job, or by the retry policy of the first worker that
    /// claimed it (`None` until then).
    pub max_attempts: Option<u32>,
    /// Progress the handler reported, 0 to 100.
    pub progress: Option<f32>,
    /// When it was enqueued.
    pub created_at: SystemTime,
    /// When it may start (delayed jobs and retries).
    pub run_at: Option<SystemTime>,
    /// When its latest attempt started.
    pub started_at: Option<SystemTime>,
    /// When it reached a terminal state.
    pub finished_at: Option<SystemTime>,
    /// When it expires if not started.
    pub expires_at: Option<SystemTime>,
    /// The worker of its latest attempt.
    pub worker: Option<String>,
    /// Every failed attempt, oldest first.
    pub errors: Vec<AttemptError>,
    /// Why it is dead, when it is.
    pub reason: Option<String>,
    /// A cancellation was requested while it ran.
    pub cancel_requested: bool,
    /// A result is stored.
    pub has_result: bool,
}

impl JobStatus {
    /// The most recent error, if any attempt failed.
    pub fn last_error(&self) -> Option<&AttemptError> {
        self.errors.last()
    }
}

/// Milliseconds since the Unix epoch: the clock every script receives.
pub(crate) fn now_ms() -> u64 {
    time_to_ms(SystemTime::now())
}

pub(crate) fn time_to_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(crate) fn ms_to_time(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

fn opt_time(ms: u64) -> Option<SystemTime> {
    (ms > 0).then(|| ms_to_time(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// enqueue.lua reads a plain record's lane from its first field, unparsed.
    #[test]
    fn a_new_record_names_a_priority_other_than_normal_first() {
        for priority in [Priority::High, Priority::Low] {
            let record = JobRecord {
                pri: priority.rank(),
                max_attempts: 3,
                timeout_ms: Some(5),
                result_ttl_ms: 7,
                dedup_ttl_ms: Some(9),
                ..JobRecord::default()
            };
            let json = serde_json::to_string(&record).unwrap();
            assert!(
                json.starts_with(&format!("{{\"pri\":{},", priority.rank())),
                "{json}"
            );
        }
        let normal = JobRecord {
            pri: Priority::Normal.rank(),
            result_ttl_ms: default_result_ttl(),
            ..JobRecord::default()
        };
        assert_eq!(serde_json::to_string(&normal).unwrap(), "{}");
    }

    #[test]
    fn records_written_by_cjson_parse() {
        let raw = br#"{"id":"a","state":"queued","pri":1,"attempts":0,"max_attempts":3,"result_ttl_ms":1000,"errors":{},"seq":7}"#;
        let rec = JobRecord::parse("a", raw).unwrap();
        assert!(rec.errors.is_empty());
        assert_eq!(rec.status().unwrap().state, JobState::Queued);
    }

    #[test]
    fn stamped_times_read_as_text_or_as_older_records_numbers_and_nothing_else() {
        let raw = br#"{"state":"active","created_at":1700000000000,"started_at":"1700000000123"}"#;
        let rec = JobRecord::parse("a", raw).unwrap();
        assert_eq!(
            (rec.created_at, rec.started_at),
            (1_700_000_000_000, 1_700_000_000_123)
        );
        for bad in [r#""soon""#, "-1", "1.5", "true"] {
            let raw = format!(r#"{{"state":"queued","created_at":{bad}}}"#);
            let err = JobRecord::parse("a", raw.as_bytes()).unwrap_err();
            assert!(matches!(err, Error::Corrupt { .. }), "{bad}: {err:?}");
        }
        let raw = br#"{"state":"queued","created_at":"soon"}"#;
        let err = JobRecord::parse("a", raw).unwrap_err().to_string();
        assert!(err.contains("not a time in ms: \"soon\""), "{err}");
    }

    #[test]
    fn large_numbers_stay_exact_through_the_record() {
        assert_eq!(safe_ms(Duration::MAX), MAX_MS);
        assert_eq!(safe_ms(Duration::from_millis(1500)), 1500);
        let policy = RetryPolicy::fixed(Duration::from_secs(1)).seed(u64::MAX - 7);
        let rec = JobRecord {
            id: "a".into(),
            retry: Some(policy.clone()),
            ..JobRecord::default()
        };
        let raw = serde_json::to_vec(&rec).unwrap();
        let back = JobRecord::parse("a", &raw).unwrap();
        assert_eq!(
            serde_json::to_string(&back.retry.unwrap()).unwrap(),
            serde_json::to_string(&policy).unwrap()
        );
    }

    #[test]
    fn caller_ids_are_checked() {
        assert!(JobId::new("").is_err());
        assert!(JobId::new("a\nb").is_err());
        assert!(JobId::new("x".repeat(257)).is_err());
        assert_eq!(JobId::new("tts:42").unwrap().as_str(), "tts:42");
    }

    #[test]
    fn ids_show_as_their_text() {
        let id = JobId::new("tts:42").unwrap();
        assert_eq!(id.to_string(), "tts:42");
        assert_eq!(AsRef::<str>::as_ref(&id), "tts:42");
        assert_eq!("tts:42".parse::<JobId>().unwrap(), id);
    }

    #[test]
    fn states_have_fixed_names_and_exactly_four_are_terminal() {
        let all = [
            (JobState::Scheduled, "scheduled", false),
            (JobState::Queued, "queued", false),
            (JobState::Active, "active", false),
            (JobState::Completed, "completed", true),
            (JobState::Dead, "dead", true),
            (JobState::Cancelled, "cancelled", true),
            (JobState::Expired, "expired", true),
        ];
        for (state, name, terminal) in all {
            assert_eq!(state.as_str(), name);
            assert_eq!(state.to_string(), name);
            assert_eq!(JobState::parse(name), Some(state), "{name}");
            assert_eq!(state.is_terminal(), terminal, "{name}");
        }
        assert_eq!(JobState::parse("Queued"), None);
        assert_eq!(JobState::parse(""), None);
    }

    #[test]
    fn priorities_rank_high_first_and_unknown_ranks_read_as_normal() {
        assert_eq!(Priority::High.rank(), 0);
        assert_eq!(Priority::Normal.rank(), 1);
        assert_eq!(Priority::Low.rank(), 2);
        for p in Priority::ALL {
            assert_eq!(Priority::from_rank(p.rank()), p);
        }
        assert_eq!(Priority::from_rank(7), Priority::Normal);
    }

    #[test]
    fn every_option_setter_sets_its_option() {
        let id = JobId::new("x").unwrap();
        let policy = RetryPolicy::fixed(Duration::from_secs(2));
        let o = JobOptions::new()
            .id(id.clone())
            .priority(Priority::Low)
            .max_attempts(4)
            .timeout(Duration::from_secs(3))
            .retry(policy.clone())
            .ttl(Duration::from_secs(5))
            .result_ttl(Duration::from_secs(6));
        assert_eq!(o.id, Some(id));
        assert_eq!(o.priority, Priority::Low);
        assert_eq!(o.max_attempts, Some(4));
        assert_eq!(o.timeout, Some(Duration::from_secs(3)));
        assert_eq!(o.retry, Some(policy));
        assert_eq!(o.ttl, Some(Duration::from_secs(5)));
        assert_eq!(o.result_ttl, Some(Duration::from_secs(6)));
        assert_eq!(JobOptions::new().max_attempts(0).max_attempts, Some(1));

        let before = SystemTime::now();
        let delayed = JobOptions::new().delay(Duration::from_secs(3600));
        assert_eq!(delayed.delay, Some(Duration::from_secs(3600)));
        let at = delayed.run_at.unwrap();
        assert!(at >= before + Duration::from_secs(3600));
        assert!(at <= SystemTime::now() + Duration::from_secs(3600));
        // `run_at` after `delay` wins, and the delay is forgotten.
        let fixed = UNIX_EPOCH + Duration::from_secs(10);
        let o = delayed.run_at(fixed);
        assert_eq!((o.run_at, o.delay), (Some(fixed), None));
    }

    #[test]
    fn clamping_keeps_small_numbers_and_caps_large_ones() {
        assert_eq!(clamp_ms(0), 0);
        assert_eq!(clamp_ms(5), 5);
        assert_eq!(clamp_ms(MAX_MS), MAX_MS);
        assert_eq!(clamp_ms(u64::MAX), MAX_MS);
    }

    #[test]
    fn default_fields_are_left_out_of_the_record_and_read_back() {
        let lean = JobRecord {
            state: Some("queued".into()),
            pri: Priority::Normal.rank(),
            result_ttl_ms: DEFAULT_RESULT_TTL_MS,
            ..JobRecord::default()
        };
        let json = serde_json::to_value(&lean).unwrap();
        assert_eq!(json, serde_json::json!({"state": "queued"}));
        let back = JobRecord::parse("a", br#"{"state":"queued"}"#).unwrap();
        assert_eq!(back.pri, 1);
        assert_eq!(back.result_ttl_ms, 86_400_000);
        assert_eq!(
            (back.attempts, back.max_attempts, back.created_at),
            (0, 0, 0)
        );

        let full = JobRecord {
            state: Some("active".into()),
            pri: Priority::Low.rank(),
            attempts: 2,
            max_attempts: 3,
            created_at: 5,
            run_at: 6,
            expires_at: 7,
            started_at: 8,
            finished_at: 9,
            result_ttl_ms: 1000,
            ..JobRecord::default()
        };
        assert_eq!(
            serde_json::to_value(&full).unwrap(),
            serde_json::json!({
                "state": "active", "pri": 2, "attempts": 2, "max_attempts": 3,
                "created_at": 5, "run_at": 6, "expires_at": 7, "started_at": 8,
                "finished_at": 9, "result_ttl_ms": 1000
            })
        );
    }

    #[test]
    fn stamped_times_read_as_text_or_number_and_other_text_is_corrupt() {
        let text = JobRecord::parse(
            "a",
            br#"{"state":"completed","created_at":"3","started_at":"1796046881947","finished_at":9}"#,
        )
        .unwrap();
        assert_eq!(
            (text.created_at, text.started_at, text.finished_at),
            (3, 1_796_046_881_947, 9)
        );
        for bad in [r#""soon""#, r#""-1""#, r#""1.5""#, "true"] {
            let raw = format!(r#"{{"state":"active","started_at":{bad}}}"#);
            let err = JobRecord::parse("a", raw.as_bytes()).unwrap_err();
            assert!(matches!(err, Error::Corrupt { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn an_errors_field_that_is_a_non_empty_object_is_corrupt() {
        let err = JobRecord::parse("a", br#"{"state":"queued","errors":{"x":1}}"#).unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    }

    #[test]
    fn status_reads_unset_numbers_as_absent() {
        let unset = JobRecord::parse("a", br#"{"state":"queued","created_at":3}"#)
            .unwrap()
            .status()
            .unwrap();
        assert_eq!(unset.max_attempts, None);
        assert_eq!(unset.priority, Priority::Normal);
        assert_eq!(unset.created_at, UNIX_EPOCH + Duration::from_millis(3));
        assert_eq!(
            (
                unset.run_at,
                unset.started_at,
                unset.finished_at,
                unset.expires_at
            ),
            (None, None, None, None)
        );
        assert_eq!(unset.last_error(), None);

        // One line, as cjson writes it: a newline ends the record (the payload follows).
        let raw = concat!(
            r#"{"state":"dead","pri":0,"max_attempts":1,"run_at":1,"started_at":2,"#,
            r#""finished_at":4,"expires_at":5,"errors":["#,
            r#"{"attempt":1,"at":2,"kind":"transient","message":"first"},"#,
            r#"{"attempt":2,"at":3,"kind":"permanent","message":"second"}]}"#,
            "\npayload"
        );
        let set = JobRecord::parse("a", raw.as_bytes())
            .unwrap()
            .status()
            .unwrap();
        assert_eq!(set.max_attempts, Some(1));
        assert_eq!(set.priority, Priority::High);
        let t = |ms| Some(UNIX_EPOCH + Duration::from_millis(ms));
        assert_eq!(
            (set.run_at, set.started_at, set.finished_at, set.expires_at),
            (t(1), t(2), t(4), t(5))
        );
        assert_eq!(set.last_error().unwrap().message, "second");
    }

    #[test]
    fn now_is_the_wall_clock_in_ms() {
        let before = time_to_ms(SystemTime::now());
        let now = now_ms();
        assert!(now >= before && now < before + 60_000);
        assert!(before > 1_700_000_000_000, "after 2023");
    }

    #[test]
    fn generated_ids_sort_by_time() {
        let a = JobId::generate();
        let b = JobId::generate();
        assert!(a < b);
        assert_eq!(a.as_str().len(), 22);
    }

    #[test]
    fn compact_ids_keep_number_order_in_22_url_safe_characters() {
        assert_eq!(compact(0), "0".repeat(22));
        assert_eq!(compact(u128::MAX), format!("3{}", "~".repeat(21)));
        assert_eq!(compact(1), format!("{}1", "0".repeat(21)));
        assert_eq!(compact(64), format!("{}10", "0".repeat(20)));
        let mut x: u128 = 0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C834;
        let mut prev = (0u128, compact(0));
        for _ in 0..1000 {
            x = x
                .wrapping_mul(0x2545_F491_4F6C_DD1D)
                .wrapping_add(0x1405_7B7E_F767_814F);
            let text = compact(x);
            assert_eq!(text.len(), 22);
            assert!(
                text.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'~')
            );
            assert_eq!(x.cmp(&prev.0), text.cmp(&prev.1), "{x} vs {}", prev.0);
            prev = (x, text);
        }
    }

    #[test]
    fn an_entry_is_split_at_its_first_newline() {
        assert_eq!(
            split_entry(b"{\"a\":1}\npay\nload"),
            (&b"{\"a\":1}"[..], Some(&b"pay\nload"[..]))
        );
        assert_eq!(split_entry(b"{}\n"), (&b"{}"[..], Some(&b""[..])));
        assert_eq!(split_entry(b"{}"), (&b"{}"[..], None));
    }
}
