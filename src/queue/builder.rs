//! [`QueueBuilder`]: a queue's settings, and `connect`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::OnceCell;

use super::{Queue, Validator};
use crate::dead_letter::store_dead_cap;
use crate::dedup::Deduplicator;
use crate::error::Error;
use crate::redis::{Connector, Keys, QueueConfig, Scripts, Shared};

/// Builds a [`Queue`] with non-default settings.
pub struct QueueBuilder<J> {
    pub(super) dedup: Option<Deduplicator<J>>,
    pub(super) validator: Option<Validator<J>>,
    pub(super) name: String,
    pub(super) prefix: String,
    pub(super) connector: Option<Connector>,
    pub(super) url: Option<String>,
    pub(super) config: QueueConfig,
}

impl<J> std::fmt::Debug for QueueBuilder<J> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueBuilder")
            .field("name", &self.name)
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl<J> QueueBuilder<J> {
    /// The Redis server, by URL (`redis://`, `rediss://` for TLS, credentials in the URL),
    /// or a primary behind Redis Sentinel (`redis+sentinel://host:26379,…/service`, see
    /// [`Connector::sentinel`]).
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.url = Some(url.into());
        self
    }

    /// The Redis deployment (single node or cluster), already configured.
    pub fn connector(mut self, connector: Connector) -> Self {
        self.connector = Some(connector);
        self
    }

    /// The key prefix (default `vq`), so several applications can share one Redis.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long results and finished records are kept by default (default 24 h).
    pub fn result_ttl(mut self, ttl: Duration) -> Self {
        self.config.result_ttl = ttl;
        self
    }

    /// Deduplicates every enqueue on this queue value: identical requests (by the
    /// deduplicator's key) share one job. Without it, every enqueue is a new job
    /// unless it names an existing id.
    pub fn dedup(mut self, dedup: Deduplicator<J>) -> Self {
        self.dedup = Some(dedup);
        self
    }

    /// Checks every job before it is enqueued: a job `check` refuses is never stored,
    /// and the enqueue fails with [`Error::InvalidJob`] (bulk: the whole call).
    pub fn validate<F>(mut self, check: F) -> Self
    where
        F: Fn(&J) -> Result<(), String> + Send + Sync + 'static,
    {
        self.validator = Some(Arc::new(check));
        self
    }

    /// Approximate cap on the event stream's length in entries (default 10 000). An
    /// entry holds one event, or up to 64 of one kind that a batch wrote together.
    pub fn events_max(mut self, len: u64) -> Self {
        self.config.events_max = len.max(1);
        self
    }

    /// Whether to write the events of every job's ordinary steps — `queued`,
    /// `scheduled` and `active` — to the event stream (default yes). Off, the stream
    /// keeps what waiters and operators act on (completed, retrying, dead, cancelled,
    /// expired, stalled, progress, ...), and each job costs Redis two stream writes
    /// fewer: the throughput profile for bulk work. `wait` and `wait_result` work
    /// either way. Set it on the handles that enqueue and on the workers' handles.
    pub fn step_events(mut self, on: bool) -> Self {
        self.config.step_events = on;
        self
    }

    /// Keeps at most `cap` jobs in the dead letters (default
    /// [`DEFAULT_DEAD_LETTER_CAP`](crate::DEFAULT_DEAD_LETTER_CAP)): each burial
    /// beyond it deletes the oldest dead jobs for good, so a poison flood cannot fill
    /// Redis. `0` removes the cap.
    ///
    /// The cap belongs to the queue, not to this process: `connect` stores it in Redis,
    /// where every worker's scripts read it, so a queue built without this setting
    /// keeps the cap that another process set.
    pub fn dead_letter_cap(mut self, cap: u64) -> Self {
        self.config.dead_cap = Some(cap);
        self
    }

    /// Tests only: pretends this host's clock is off by `skew_ms`. Nothing the queue
    /// does depends on it, since every script runs on Redis's clock; tests use it to
    /// prove that hosts with skewed clocks neither re-run live jobs nor stretch limits.
    #[doc(hidden)]
    pub fn host_clock_skew_for_tests(mut self, skew_ms: i64) -> Self {
        self.config.host_clock_skew_ms = skew_ms;
        self
    }

    /// Connects. Fails on a bad name or URL, or if Redis does not answer.
    pub async fn connect(self) -> Result<Queue<J>, Error> {
        let keys = Keys::new(&self.prefix, &self.name)?;
        let connector = match (self.connector, self.url) {
            (Some(c), _) => c,
            (None, Some(url)) => Connector::from_url(&url)?,
            (None, None) => {
                return Err(Error::InvalidConfig(
                    "no Redis URL or connector given".into(),
                ));
            }
        };
        let conn = connector.connect().await?;
        if let Some(cap) = self.config.dead_cap {
            store_dead_cap(&conn, &keys, cap).await?;
        }
        Ok(Queue {
            shared: Arc::new(Shared {
                name: self.name,
                keys,
                conn,
                connector,
                scripts: Scripts::get(),
                config: self.config,
                hub: OnceCell::new(),
            }),
            dedup: self.dedup,
            validator: self.validator,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_names_the_queue_but_never_the_url_and_its_password() {
        let builder = Queue::<u32>::builder("speech")
            .prefix("app")
            .url("redis://user:hunter2@db.internal:6379");
        let shown = format!("{builder:?}");
        assert!(shown.contains("\"speech\""), "{shown}");
        assert!(shown.contains("\"app\""), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("db.internal"), "{shown}");
    }
}
