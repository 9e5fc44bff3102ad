//! # voxqueue
//!
//! Text-to-speech job queues on Redis: a queue that never loses a job, never runs the
//! same request twice at once, and wakes workers and waiters through Redis instead of
//! polling.
//!
//! The core is generic over any serde job type; the TTS layer is one user of it.
//!
//! # Quick start
//!
//! ```no_run
//! use std::time::Duration;
//! use serde::{Deserialize, Serialize};
//! use voxqueue::{JobError, Priority, Queue, Worker, handler_fn};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Greet { name: String }
//!
//! # async fn demo() -> Result<(), voxqueue::Error> {
//! let queue = Queue::<Greet>::connect("redis://127.0.0.1:6379", "greetings").await?;
//! let job = queue.enqueue(Greet { name: "Ada".into() }).priority(Priority::High).await?;
//!
//! let worker = Worker::builder(queue.clone())
//!     .concurrency(4)
//!     .build(handler_fn(|job: Greet, _ctx| async move {
//!         Ok::<_, JobError>(format!("hello, {}", job.name))
//!     }));
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let running = tokio::spawn(worker.run_until(async { let _ = stopped.await; }));
//!
//! let greeting: String = queue.wait_result(&job.id, Duration::from_secs(5)).await?;
//! assert_eq!(greeting, "hello, Ada");
//! let _ = stop.send(());
//! running.await.expect("worker task")?;
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - [`error`]: [`Error`] for callers, [`JobError`] for handlers
//! - [`job`]: ids, states, priorities, per-job options, status snapshots
//! - [`queue`]: [`Queue`]: builder, enqueue (single and bulk), status, wait, cancel, stats
//! - [`partition`]: [`PartitionedQueue`]: one logical queue over P partitions (hash
//!   tags), so a Redis Cluster spreads it over its masters
//! - [`worker`]: [`Worker`], [`Handler`], [`JobContext`], leases and heartbeats, shutdown
//! - [`dedup`]: [`Deduplicator`] (one job per distinct request) and [`RateLimit`]
//! - [`retry`]: [`RetryPolicy`], a pure function from attempt to delay
//! - [`dead_letter`]: [`DeadLetter`]: list, inspect (with error history), requeue, purge
//! - [`schedule`]: [`Periodic`] jobs on a cron or interval [`Schedule`], one enqueue per
//!   tick across all processes
//! - [`tts`]: speech requests, text, audio, captions, the `Synthesizer` trait, the
//!   offline espeak-ng voice, result stores and [`tts::TtsHandler`]
//! - [`events`]: the per-queue event stream and subscriptions
//! - [`metrics`]: counters, histograms and gauges through the `metrics` facade
//! - [`redis`](mod@redis): connections, key layout, script invocation, one Lua script per
//!   transition
//!
//! # Guarantees
//! Every state change is one Lua script over keys that share the queue's hash tag, so
//! a job is never in two places or in none, whatever crashes in between; a worker's
//! lease is renewed from its own thread and checked by every transition, so a worker
//! that lost a job cannot complete it. See `DESIGN.md` for the full list.

pub mod dead_letter;
pub mod dedup;
pub mod error;
pub mod events;
pub mod job;
pub mod metrics;
pub mod partition;
pub mod queue;
pub mod redis;
pub mod retry;
pub mod schedule;
pub mod tts;
pub mod worker;

pub use dead_letter::{DEFAULT_DEAD_LETTER_CAP, DeadJob, DeadLetter};
pub use dedup::{Deduplicator, RateLimit};
pub use error::{AclMissing, Error, JobError};
pub use events::{EventKind, EventStream, JobEvent};
pub use job::{AttemptError, JobId, JobOptions, JobState, JobStatus, Priority};
pub use partition::{PartitionedBuilder, PartitionedQueue};
pub use queue::{CancelOutcome, Enqueue, Enqueued, Queue, QueueBuilder, QueueStats, RecentStats};
pub use redis::{Connector, TlsConfig, acl_rules};
pub use retry::RetryPolicy;
pub use schedule::{Periodic, Schedule};
pub use worker::{
    BreakerState, CircuitBreaker, Handler, HandlerFn, JobContext, QueueOrder, Worker,
    WorkerBuilder, handler_fn,
};
