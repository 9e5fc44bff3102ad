//! The producer's side: [`Queue`] enqueues jobs and answers for them (status, results,
//! cancellation, statistics). Workers take a `Queue` too: it is the handle to one
//! queue's keys, connection and scripts.
//!
//! # Layout
//! - `builder`: [`QueueBuilder`], the queue's settings and `connect`
//! - `enqueue`: single and bulk enqueue, with dedup and rate limits
//! - `read`: status, results, waiting and cancellation
//! - `stats`: counts, live workers and recent outcomes

mod active;
mod builder;
mod enqueue;
mod read;
mod stats;

use std::sync::Arc;
use std::time::Duration;

pub use builder::QueueBuilder;
pub use enqueue::{Enqueue, Enqueued};
pub use read::CancelOutcome;
pub use stats::{QueueStats, RecentStats};

use crate::dead_letter::DeadLetter;
use crate::dedup::Deduplicator;
use crate::error::Error;
use crate::events::EventStream;
use crate::redis::{QueueConfig, Shared};

/// A handle to one named queue of jobs of type `J`. Cheap to clone.
///
/// `J` is any serde type; it is stored as JSON, so producers and workers in different
/// programs (or versions) only need to agree on its JSON form.
pub struct Queue<J> {
    shared: Arc<Shared>,
    dedup: Option<Deduplicator<J>>,
    validator: Option<Validator<J>>,
}

/// A check every enqueue runs before anything is stored.
type Validator<J> = Arc<dyn Fn(&J) -> Result<(), String> + Send + Sync>;

impl<J> Clone for Queue<J> {
    fn clone(&self) -> Self {
        Queue {
            shared: self.shared.clone(),
            dedup: self.dedup.clone(),
            validator: self.validator.clone(),
        }
    }
}

impl<J> std::fmt::Debug for Queue<J> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("name", &self.shared.name)
            .field("keys", &self.shared.keys.base())
            .finish()
    }
}

impl<J> Queue<J> {
    /// Connects to the queue `name` on the Redis at `url` with default settings.
    pub async fn connect(url: &str, name: &str) -> Result<Self, Error> {
        Self::builder(name).url(url).connect().await
    }

    /// A builder for the queue `name`.
    pub fn builder(name: impl Into<String>) -> QueueBuilder<J> {
        QueueBuilder {
            dedup: None,
            validator: None,
            name: name.into(),
            prefix: "vq".to_owned(),
            connector: None,
            url: None,
            config: QueueConfig {
                result_ttl: Duration::from_secs(86_400),
                events_max: 10_000,
                dead_cap: None,
                host_clock_skew_ms: 0,
                step_events: true,
            },
        }
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The queue's dead letters: jobs that failed for good, to inspect, requeue or purge.
    pub fn dead_letter(&self) -> DeadLetter<J> {
        DeadLetter::new(self.clone())
    }

    /// Subscribes to this queue's events from now on.
    pub async fn events(&self) -> Result<EventStream, Error> {
        Ok(self.shared.hub().await?.subscribe())
    }
}
