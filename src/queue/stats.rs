//! Statistics: counts by state and priority, live workers, totals, recent outcomes.

use std::collections::HashMap;
use std::time::Duration;

use super::Queue;
use crate::dead_letter::DEAD_CAP_FIELD;
use crate::error::Error;
use crate::job::Priority;
use crate::metrics;

/// The stats hash field where the scripts keep the next time maintenance is due
/// (`due` in common.lua): a time, not a counter.
const DUE_FIELD: &str = "due";
/// A field whose long text keeps the hash a hash table (see `HASH_KEEPER` in
/// common.lua), not a counter.
const KEEPER_FIELD: &str = "\nkeeper";

/// A worker is counted live when it heartbeat within this window.
const LIVE_WINDOW: Duration = Duration::from_secs(15);

/// Counts for one queue, read from Redis.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct QueueStats {
    /// Ready to run.
    pub queued: u64,
    /// Waiting for a delay or retry.
    pub scheduled: u64,
    /// Being run.
    pub active: u64,
    /// In the dead letters.
    pub dead: u64,
    /// Ready jobs per priority, highest first.
    pub queued_by_priority: Vec<(Priority, u64)>,
    /// Workers that heartbeat recently.
    pub workers: u64,
    /// Workers whose circuit breaker is open or half-open (they claim no jobs).
    pub open_breakers: u64,
    /// Monotonic totals since the queue was created: `enqueued`, `deduplicated`,
    /// `rate_limited`, `completed`, `failed` (attempts), `retried`, `dead`, `cancelled`,
    /// `expired`, `stalled`, `requeued`, `purged`.
    pub totals: HashMap<String, u64>,
    /// Outcomes over the last minutes.
    pub recent: RecentStats,
}

/// Outcomes over a recent window (whole minutes, the current one included).
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct RecentStats {
    /// The window's length.
    pub window: Duration,
    /// Attempts that completed.
    pub completed: u64,
    /// Attempts that failed (errors, timeouts, panics, stalls).
    pub failed: u64,
    /// Mean time from start to report of attempts that ended, if any did.
    pub mean_duration: Option<Duration>,
    /// Failed attempts over all attempts that ended, if any did.
    pub error_rate: Option<f64>,
}

/// Minutes in the recent window (the ring in Redis holds 60).
const RECENT_MINUTES: u64 = 15;

fn recent_stats(fields: &HashMap<String, String>, now: u64) -> RecentStats {
    let minute = now / 60_000;
    let (mut completed, mut failed, mut total_ms) = (0u64, 0u64, 0u64);
    for (field, value) in fields {
        if !field.starts_with("w:") {
            continue;
        }
        let parts: Vec<u64> = value.split(',').filter_map(|p| p.parse().ok()).collect();
        if let [m, c, f, d] = parts[..]
            && m + RECENT_MINUTES > minute
            && m <= minute
        {
            completed += c;
            failed += f;
            total_ms += d;
        }
    }
    let ended = completed + failed;
    RecentStats {
        window: Duration::from_secs(RECENT_MINUTES * 60),
        completed,
        failed,
        mean_duration: (ended > 0).then(|| Duration::from_millis(total_ms / ended)),
        error_rate: (ended > 0).then(|| failed as f64 / ended as f64),
    }
}

impl<J> Queue<J> {
    /// Counts by state and priority, live workers and lifetime totals.
    pub async fn stats(&self) -> Result<QueueStats, Error> {
        let k = &self.shared.keys;
        let mut pipe = redis::pipe();
        // `active` holds one member that is not a job, scored +inf (see ACTIVE_KEEPER
        // in common.lua): the count leaves it out.
        pipe.zcard(k.scheduled())
            .zcount(k.active(), "-inf", "(+inf")
            .zcard(k.dead());
        // Each priority's lane, and its part of the sorted set older versions queued in
        // (claims drain it; the score's leading digit is the priority rank).
        for p in Priority::ALL {
            let lo = u64::from(p.rank()) * 10_000_000_000_000;
            pipe.llen(k.lane(p))
                .zcount(k.ready(), lo, format!("({}", lo + 10_000_000_000_000));
        }
        let now = self.shared.redis_now().await?;
        let live_since = now.saturating_sub(LIVE_WINDOW.as_millis() as u64);
        pipe.zrangebyscore(k.workers(), live_since, "+inf")
            .hkeys(k.breakers())
            .hgetall(k.stats());
        type Reply = (
            u64,
            u64,
            u64,
            u64,
            u64,
            u64,
            u64,
            u64,
            u64,
            Vec<String>,
            Vec<String>,
            HashMap<String, String>,
        );
        let (scheduled, active, dead, h, old_h, n, old_n, l, old_l, live, breakers, fields): Reply =
            pipe.query_async(&mut self.shared.conn.clone()).await?;
        let (high, normal, low) = (h + old_h, n + old_n, l + old_l);
        let queued = high + normal + low;
        let workers = live.len() as u64;
        // Only live workers' breakers count: a killed worker's entry lingers until the
        // heartbeat of another forgets it.
        let open_breakers = breakers.iter().filter(|w| live.contains(w)).count() as u64;
        let name = &self.shared.name;
        for (state, n) in [
            ("queued", queued),
            ("scheduled", scheduled),
            ("active", active),
            ("dead", dead),
        ] {
            metrics::depth(name, state, n);
        }
        metrics::workers(name, workers);
        let totals = fields
            .iter()
            .filter(|(k, _)| {
                !k.starts_with("w:")
                    && ![DEAD_CAP_FIELD, DUE_FIELD, KEEPER_FIELD].contains(&k.as_str())
            })
            .filter_map(|(k, v)| Some((k.clone(), v.parse().ok()?)))
            .collect();
        Ok(QueueStats {
            queued,
            scheduled,
            active,
            dead,
            queued_by_priority: vec![
                (Priority::High, high),
                (Priority::Normal, normal),
                (Priority::Low, low),
            ],
            workers,
            open_breakers,
            recent: recent_stats(&fields, now),
            totals,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(entries: &[(&str, &str)]) -> HashMap<String, String> {
        entries
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn recent_stats_sum_the_last_fifteen_minutes_only() {
        // Minute 1000, 30 s in.
        let now = 1000 * 60_000 + 30_000;
        let f = fields(&[
            ("w:0", "1000,3,1,400"), // this minute
            ("w:1", "986,2,2,800"),  // fourteen minutes ago: still in
            ("w:2", "985,50,50,9"),  // fifteen ago: out
            ("w:3", "1001,70,70,9"), // a minute ahead (a skewed stamp): out
            ("w:4", "1000,1"),       // malformed: skipped
            ("completed", "999"),    // a total, not a window slot
        ]);
        let recent = recent_stats(&f, now);
        assert_eq!(recent.window, Duration::from_secs(900));
        assert_eq!((recent.completed, recent.failed), (5, 3));
        assert_eq!(recent.mean_duration, Some(Duration::from_millis(150)));
        assert_eq!(recent.error_rate, Some(0.375));
    }

    #[test]
    fn recent_stats_of_an_idle_queue_have_no_mean_or_rate() {
        let recent = recent_stats(&fields(&[("w:0", "5,0,0,0")]), 5 * 60_000);
        assert_eq!((recent.completed, recent.failed), (0, 0));
        assert_eq!(recent.mean_duration, None);
        assert_eq!(recent.error_rate, None);
    }
}
