//! Periodic jobs: a [`Periodic`] enqueues a job on every tick of a [`Schedule`], and
//! any number of processes may run the same one, because each tick enqueues exactly
//! once.
//!
//! There is no leader to elect and no lock to lose: every process computes the same
//! ticks (cron times, or interval ticks aligned to the Unix epoch) and enqueues each
//! under the id `periodic:<name>:<tick ms>`. The enqueue script returns the existing
//! job for an id it already holds, so the first process to reach a tick creates its
//! job and the others' enqueues are no-ops. Run one per worker host for redundancy.
//!
//! Ticks that pass while no process runs are not back-filled: a periodic job says
//! "do this every so often from now on", and a burst of stale ticks after an outage
//! is rarely what anyone wants. The same holds for a tick missed because Redis did
//! not answer; the error is logged and the next tick is tried as usual.

use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tracing::Instrument;

use crate::error::Error;
use crate::job::{JobId, JobOptions, Priority, ms_to_time, time_to_ms};
use crate::queue::Queue;

/// When a periodic job fires: a cron expression (UTC) or a fixed interval.
///
/// ```
/// use std::time::Duration;
/// use voxqueue::Schedule;
///
/// let nightly = Schedule::cron("0 3 * * *")?;          // 03:00 UTC every day
/// let every_5s = Schedule::cron("*/5 * * * * *")?;     // with a seconds field
/// let often = Schedule::every(Duration::from_secs(30))?;
/// assert!(Schedule::cron("not cron").is_err());
/// assert!(Schedule::every(Duration::ZERO).is_err());
/// # Ok::<(), voxqueue::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Schedule {
    kind: Kind,
}

#[derive(Debug, Clone)]
enum Kind {
    // Boxed: a parsed cron schedule is large and a Schedule is moved around.
    Cron(Box<cron::Schedule>),
    EveryMs(u64),
}

impl Schedule {
    /// A cron expression, evaluated in UTC so every host agrees on the ticks.
    ///
    /// Takes the classic five fields (`min hour day-of-month month day-of-week`), or
    /// six or seven with a leading seconds field and a trailing year (the `cron`
    /// crate's syntax, which also knows `@hourly`, `@daily`, `@weekly`, ...).
    pub fn cron(expression: &str) -> Result<Self, Error> {
        let fields = expression.split_whitespace().count();
        // The cron crate wants a seconds field; classic crontab lines have none.
        let full = if fields == 5 {
            format!("0 {expression}")
        } else {
            expression.to_owned()
        };
        let parsed = cron::Schedule::from_str(&full).map_err(|e| {
            Error::InvalidConfig(format!("invalid cron expression {expression:?}: {e}"))
        })?;
        Ok(Schedule {
            kind: Kind::Cron(Box::new(parsed)),
        })
    }

    /// A tick every `interval`, aligned to the Unix epoch (so every process computes
    /// the same ticks whenever it started). Intervals are whole milliseconds, at
    /// least one: a zero interval would tick without end.
    pub fn every(interval: Duration) -> Result<Self, Error> {
        let ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
        if ms == 0 {
            return Err(Error::InvalidConfig(format!(
                "periodic interval {interval:?} is under one millisecond"
            )));
        }
        Ok(Schedule {
            kind: Kind::EveryMs(ms),
        })
    }

    /// The first tick strictly after `after`, or `None` if the schedule has no more
    /// (a cron expression whose years have passed). Public so callers can preview a
    /// schedule or find the job of an upcoming tick.
    pub fn next_after(&self, after: SystemTime) -> Option<SystemTime> {
        match &self.kind {
            Kind::EveryMs(every) => {
                let now = time_to_ms(after);
                let next = (now / every).checked_add(1)?.checked_mul(*every)?;
                Some(ms_to_time(next))
            }
            Kind::Cron(schedule) => {
                let after = chrono::DateTime::<chrono::Utc>::from(after);
                schedule.after(&after).next().map(SystemTime::from)
            }
        }
    }
}

impl FromStr for Schedule {
    type Err = Error;

    /// Parses a cron expression, as [`Schedule::cron`].
    fn from_str(s: &str) -> Result<Self, Error> {
        Schedule::cron(s)
    }
}

type MakeJob<J> = Arc<dyn Fn(SystemTime) -> J + Send + Sync>;

/// Enqueues a job on every tick of a [`Schedule`], once per tick across all the
/// processes that run a `Periodic` of the same name on the same queue.
///
/// ```no_run
/// use std::time::{Duration, SystemTime};
/// use voxqueue::{Periodic, Queue, Schedule};
///
/// # async fn demo(queue: Queue<String>) -> Result<(), voxqueue::Error> {
/// let cleanup = Periodic::new(queue, "cleanup", Schedule::cron("*/10 * * * *")?, |tick: SystemTime| {
///     format!("clean up before {tick:?}")
/// })?;
/// cleanup.run_until(std::future::pending()).await;
/// # Ok(()) }
/// ```
pub struct Periodic<J> {
    queue: Queue<J>,
    name: String,
    schedule: Schedule,
    make_job: MakeJob<J>,
    options: JobOptions,
}

impl<J> fmt::Debug for Periodic<J> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Periodic")
            .field("queue", &self.queue.name())
            .field("name", &self.name)
            .field("schedule", &self.schedule)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl<J> Periodic<J> {
    /// A periodic job called `name` on `queue`, whose job for each tick `make_job`
    /// builds from the tick's time.
    ///
    /// The name is part of every tick's job id, so processes that should share ticks
    /// must use the same name, and different periodic jobs different names. It must be
    /// 1 to 200 characters without whitespace or control characters.
    pub fn new(
        queue: Queue<J>,
        name: impl Into<String>,
        schedule: Schedule,
        make_job: impl Fn(SystemTime) -> J + Send + Sync + 'static,
    ) -> Result<Self, Error> {
        let name = name.into();
        if name.is_empty()
            || name.len() > 200
            || name.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(Error::InvalidConfig(format!(
                "invalid periodic job name {name:?}: it must be 1 to 200 characters without whitespace"
            )));
        }
        Ok(Periodic {
            queue,
            name,
            schedule,
            make_job: Arc::new(make_job),
            options: JobOptions::default(),
        })
    }

    /// The priority of every tick's job.
    pub fn priority(mut self, priority: Priority) -> Self {
        self.options.priority = priority;
        self
    }

    /// The options of every tick's job (priority, attempts, timeout, TTL, result TTL).
    /// The id and the run-at time are the tick's own and replace any set here.
    pub fn options(mut self, options: JobOptions) -> Self {
        self.options = options;
        self
    }

    /// The id of the job for `tick`: `periodic:<name>:<tick in ms since the epoch>`.
    /// Lets a caller look up or wait for a given tick's job.
    pub fn job_id(&self, tick: SystemTime) -> Result<JobId, Error> {
        JobId::new(format!("periodic:{}:{}", self.name, time_to_ms(tick)))
    }
}

impl<J: Serialize + Send + Sync + 'static> Periodic<J> {
    /// Enqueues the job of each tick until `shutdown` completes.
    ///
    /// Sleeps until the next tick, enqueues, and repeats; a tick that passed while
    /// this was not running (or busy enqueueing) is skipped, not back-filled. Redis
    /// errors are logged and the next tick is tried as usual, so this never fails.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send) {
        let span = tracing::info_span!("periodic", queue = %self.queue.name(), name = %self.name);
        self.run(shutdown).instrument(span).await;
    }

    async fn run(&self, shutdown: impl Future<Output = ()> + Send) {
        tokio::pin!(shutdown);
        let mut after = SystemTime::now();
        loop {
            let Some(tick) = self.schedule.next_after(after) else {
                tracing::info!("the schedule has no more ticks; stopping");
                return;
            };
            let wait = tick
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(wait) => {}
            }
            self.fire(tick).await;
            after = tick.max(SystemTime::now());
        }
    }

    async fn fire(&self, tick: SystemTime) {
        let tick_ms = time_to_ms(tick);
        let id = match self.job_id(tick) {
            Ok(id) => id,
            Err(error) => {
                // Cannot happen for a name `new` accepted; logged rather than panicking.
                tracing::error!(%error, tick_ms, "cannot build the tick's job id");
                return;
            }
        };
        let mut options = self.options.clone();
        options.id = Some(id);
        options.run_at = None;
        let job = (self.make_job)(tick);
        match self.queue.enqueue(job).options(options).await {
            Ok(enqueued) if enqueued.duplicate_of.is_some() => {
                tracing::debug!(job = %enqueued.id, tick_ms, "tick already enqueued by another process");
            }
            Ok(enqueued) => {
                tracing::debug!(job = %enqueued.id, tick_ms, "tick enqueued");
            }
            Err(error) => {
                tracing::warn!(%error, tick_ms, "enqueueing the tick's job failed; trying again next tick");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_ticks_are_aligned_to_the_epoch() {
        let s = Schedule::every(Duration::from_millis(200)).unwrap();
        assert_eq!(s.next_after(ms_to_time(1_000)), Some(ms_to_time(1_200)));
        assert_eq!(s.next_after(ms_to_time(1_001)), Some(ms_to_time(1_200)));
        assert_eq!(s.next_after(ms_to_time(1_199)), Some(ms_to_time(1_200)));
    }

    #[test]
    fn classic_five_field_cron_fires_on_the_minute() {
        let s = Schedule::cron("*/15 * * * *").unwrap();
        // 1_700_000_000_000 ms is 2023-11-14 22:13:20 UTC.
        let next = s.next_after(ms_to_time(1_700_000_000_000)).unwrap();
        assert_eq!(time_to_ms(next), 1_700_000_100_000); // 22:15:00
    }

    #[test]
    fn bad_schedules_are_config_errors() {
        assert!(matches!(
            Schedule::cron("61 * * * *"),
            Err(Error::InvalidConfig(_))
        ));
        assert!(matches!(
            Schedule::every(Duration::from_micros(10)),
            Err(Error::InvalidConfig(_))
        ));
    }
}
