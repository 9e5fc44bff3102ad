//! Metrics through the [`metrics`] facade: install any exporter (Prometheus, StatsD,
//! ...) in the program and these appear, labelled by queue. Without a recorder they
//! cost next to nothing.
//!
//! | name | kind | what |
//! | --- | --- | --- |
//! | `voxqueue_jobs_enqueued_total` | counter | jobs created |
//! | `voxqueue_jobs_deduplicated_total` | counter | enqueues answered by an existing job |
//! | `voxqueue_jobs_rate_limited_total` | counter | enqueues refused by a rate limit |
//! | `voxqueue_jobs_completed_total` | counter | attempts that completed |
//! | `voxqueue_jobs_failed_total` | counter | attempts that failed (label `kind`) |
//! | `voxqueue_jobs_retried_total` | counter | failed attempts scheduled again |
//! | `voxqueue_jobs_dead_total` | counter | jobs sent to the dead letters by a worker |
//! | `voxqueue_jobs_cancelled_total` | counter | jobs that ended cancelled in a worker |
//! | `voxqueue_job_duration_seconds` | histogram | handler time of one attempt |
//! | `voxqueue_job_wait_seconds` | histogram | from ready (enqueue or run-at) to start |
//! | `voxqueue_queue_jobs` | gauge | jobs by `state`, set by `Queue::stats` |
//! | `voxqueue_workers` | gauge | live workers, set by `Queue::stats` |

use std::time::Duration;

use metrics::{counter, gauge, histogram};

/// Jobs created.
pub const ENQUEUED: &str = "voxqueue_jobs_enqueued_total";
/// Enqueues answered by an existing job.
pub const DEDUPLICATED: &str = "voxqueue_jobs_deduplicated_total";
/// Enqueues refused by a rate limit.
pub const RATE_LIMITED: &str = "voxqueue_jobs_rate_limited_total";
/// Attempts that completed.
pub const COMPLETED: &str = "voxqueue_jobs_completed_total";
/// Attempts that failed.
pub const FAILED: &str = "voxqueue_jobs_failed_total";
/// Failed attempts scheduled again.
pub const RETRIED: &str = "voxqueue_jobs_retried_total";
/// Jobs a worker sent to the dead letters.
pub const DEAD: &str = "voxqueue_jobs_dead_total";
/// Jobs that ended cancelled in a worker.
pub const CANCELLED: &str = "voxqueue_jobs_cancelled_total";
/// Handler time of one attempt, in seconds.
pub const DURATION: &str = "voxqueue_job_duration_seconds";
/// Time from ready to start, in seconds.
pub const WAIT: &str = "voxqueue_job_wait_seconds";
/// Jobs by state.
pub const QUEUE_JOBS: &str = "voxqueue_queue_jobs";
/// Live workers.
pub const WORKERS: &str = "voxqueue_workers";

pub(crate) fn count(name: &'static str, queue: &str, n: u64) {
    if n > 0 {
        counter!(name, "queue" => queue.to_owned()).increment(n);
    }
}

pub(crate) fn failed(queue: &str, kind: &'static str) {
    counter!(FAILED, "queue" => queue.to_owned(), "kind" => kind).increment(1);
}

pub(crate) fn duration(queue: &str, took: Duration) {
    histogram!(DURATION, "queue" => queue.to_owned()).record(took.as_secs_f64());
}

pub(crate) fn waited(queue: &str, waited: Duration) {
    histogram!(WAIT, "queue" => queue.to_owned()).record(waited.as_secs_f64());
}

pub(crate) fn depth(queue: &str, state: &'static str, n: u64) {
    gauge!(QUEUE_JOBS, "queue" => queue.to_owned(), "state" => state).set(n as f64);
}

pub(crate) fn workers(queue: &str, n: u64) {
    gauge!(WORKERS, "queue" => queue.to_owned()).set(n as f64);
}
