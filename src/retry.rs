//! When to try a failed job again: a pure function of the attempt number, so a retry
//! schedule can be tested exactly and stored as data (`scheduled` in Redis).

use std::hash::{BuildHasher, RandomState};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How delays grow between attempts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Backoff {
    /// The same delay every time.
    Fixed(Duration),
    /// `base * factor^(attempt - 1)`, capped by [`RetryPolicy::max_delay`].
    Exponential {
        /// The first delay.
        base: Duration,
        /// Growth per attempt.
        factor: f64,
    },
}

/// How randomness spreads retries so failed jobs do not come back in a herd.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Jitter {
    /// Exact delays.
    None,
    /// The delay times a random factor in `[1 - f, 1 + f]`.
    Proportional(f64),
    /// A random delay between zero and the computed one ("full jitter").
    Full,
}

/// Retry policy: how many attempts a job gets and how long to wait between them.
///
/// ```
/// use std::time::Duration;
/// use voxqueue::RetryPolicy;
///
/// let policy = RetryPolicy::exponential(Duration::from_secs(2)).max_attempts(4).seed(7);
/// assert_eq!(policy.next_delay(1), Some(Duration::from_secs(2)));
/// assert_eq!(policy.next_delay(2), Some(Duration::from_secs(4)));
/// assert_eq!(policy.next_delay(3), Some(Duration::from_secs(8)));
/// assert_eq!(policy.next_delay(4), None); // the fourth attempt was the last
/// ```
///
/// A policy is plain data: a job can carry its own (see
/// [`JobOptions::retry`](crate::JobOptions::retry)), stored with it in Redis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    backoff: Backoff,
    max_attempts: u32,
    max_delay: Duration,
    jitter: Jitter,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
    #[serde(skip, default = "fresh_entropy")]
    entropy: u64,
}

fn fresh_entropy() -> u64 {
    RandomState::new().hash_one(0u8)
}

impl Default for RetryPolicy {
    /// Three attempts, exponential from one second, capped at ten minutes, ±20 % jitter.
    fn default() -> Self {
        RetryPolicy::exponential(Duration::from_secs(1))
            .max_attempts(3)
            .jitter(0.2)
    }
}

impl RetryPolicy {
    fn with_backoff(backoff: Backoff) -> Self {
        RetryPolicy {
            backoff,
            max_attempts: 3,
            max_delay: Duration::from_secs(600),
            jitter: Jitter::None,
            seed: None,
            entropy: fresh_entropy(),
        }
    }

    /// The same delay before every retry.
    pub fn fixed(delay: Duration) -> Self {
        Self::with_backoff(Backoff::Fixed(delay))
    }

    /// Doubling delays from `base`.
    pub fn exponential(base: Duration) -> Self {
        Self::with_backoff(Backoff::Exponential { base, factor: 2.0 })
    }

    /// No retries: the first failure is final.
    pub fn none() -> Self {
        Self::fixed(Duration::ZERO).max_attempts(1)
    }

    /// Growth factor of an exponential policy (ignored by a fixed one).
    pub fn factor(mut self, factor: f64) -> Self {
        if let Backoff::Exponential { base, .. } = self.backoff {
            self.backoff = Backoff::Exponential {
                base,
                factor: factor.max(1.0),
            };
        }
        self
    }

    /// Total attempts, the first included (at least 1).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// The longest delay, before jitter.
    pub fn max_delay(mut self, cap: Duration) -> Self {
        self.max_delay = cap;
        self
    }

    /// Proportional jitter: each delay is multiplied by a random factor in
    /// `[1 - fraction, 1 + fraction]` (`fraction` clamped to `0..=1`).
    pub fn jitter(mut self, fraction: f64) -> Self {
        self.jitter = if fraction > 0.0 {
            Jitter::Proportional(fraction.min(1.0))
        } else {
            Jitter::None
        };
        self
    }

    /// Full jitter: each delay is random between zero and the computed delay.
    pub fn full_jitter(mut self) -> Self {
        self.jitter = Jitter::Full;
        self
    }

    /// Makes jitter deterministic: the same seed gives the same schedule.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Attempts allowed.
    pub fn attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The delay before the attempt after `attempt` (1-based) failed, or `None` when
    /// `attempt` was the last one allowed.
    pub fn next_delay(&self, attempt: u32) -> Option<Duration> {
        if attempt >= self.max_attempts {
            return None;
        }
        Some(self.delay_for(attempt))
    }

    /// The delay after a failed `attempt`, ignoring the attempt limit (used when a
    /// job's own `max_attempts` overrides the policy's).
    pub fn delay_for(&self, attempt: u32) -> Duration {
        let attempt = attempt.max(1);
        let raw = match self.backoff {
            Backoff::Fixed(d) => d.as_secs_f64(),
            Backoff::Exponential { base, factor } => {
                base.as_secs_f64() * factor.powi(attempt.saturating_sub(1).min(1000) as i32)
            }
        };
        let capped = raw.min(self.max_delay.as_secs_f64());
        let unit = self.unit(attempt);
        let jittered = match self.jitter {
            Jitter::None => capped,
            Jitter::Proportional(f) => capped * (1.0 - f + 2.0 * f * unit),
            Jitter::Full => capped * unit,
        };
        Duration::try_from_secs_f64(jittered.max(0.0)).unwrap_or(self.max_delay)
    }

    /// A uniform number in `[0, 1)` for this attempt: from the seed when set, else from
    /// per-policy entropy mixed with the attempt.
    fn unit(&self, attempt: u32) -> f64 {
        let seed = self.seed.unwrap_or(self.entropy);
        let mut z = seed ^ (u64::from(attempt)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        // splitmix64 finaliser: a well-mixed 64-bit value from any input.
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_delays_are_constant_until_attempts_run_out() {
        let p = RetryPolicy::fixed(Duration::from_millis(500)).max_attempts(3);
        assert_eq!(p.next_delay(1), Some(Duration::from_millis(500)));
        assert_eq!(p.next_delay(2), Some(Duration::from_millis(500)));
        assert_eq!(p.next_delay(3), None);
    }

    #[test]
    fn exponential_delays_grow_and_are_capped() {
        let p = RetryPolicy::exponential(Duration::from_secs(1))
            .factor(3.0)
            .max_attempts(10)
            .max_delay(Duration::from_secs(20));
        let delays: Vec<_> = (1..6).map(|a| p.next_delay(a).unwrap().as_secs()).collect();
        assert_eq!(delays, vec![1, 3, 9, 20, 20]);
    }

    /// Whole milliseconds of each delay from attempt 1 on.
    fn schedule(p: &RetryPolicy, attempts: u32) -> Vec<u128> {
        (1..=attempts)
            .map(|a| p.next_delay(a).unwrap().as_millis())
            .collect()
    }

    // The literals below were computed by hand from the documented formula (an
    // independent Python re-implementation of splitmix64 and the jitter factor,
    // `capped * (1 - f + 2 f u)` with `u` from the seed and the attempt), not by this code.

    #[test]
    fn seeded_proportional_jitter_gives_an_exact_exponential_schedule() {
        let p = RetryPolicy::exponential(Duration::from_secs(10))
            .max_attempts(5)
            .jitter(0.2)
            .seed(42);
        assert_eq!(schedule(&p, 4), vec![10_966, 22_793, 37_989, 75_014]);
        // To the nanosecond: every bit of the mixer counts.
        let nanos: Vec<u128> = (1..5)
            .map(|a| p.next_delay(a).unwrap().as_nanos())
            .collect();
        assert_eq!(
            nanos,
            vec![
                10_966_259_515,
                22_793_408_395,
                37_989_026_248,
                75_014_102_929
            ]
        );
        assert_eq!(p.next_delay(5), None);
        // The same seed on another policy value gives the same schedule.
        assert_eq!(schedule(&p.clone(), 4), schedule(&p, 4));
        let other = RetryPolicy::exponential(Duration::from_secs(10))
            .max_attempts(5)
            .jitter(0.2)
            .seed(43);
        assert_eq!(other.next_delay(1).unwrap().as_millis(), 8_274);
    }

    #[test]
    fn seeded_proportional_jitter_gives_an_exact_fixed_schedule() {
        let p = RetryPolicy::fixed(Duration::from_millis(500))
            .max_attempts(4)
            .jitter(0.25)
            .seed(7);
        assert_eq!(schedule(&p, 3), vec![616, 550, 601]);
    }

    #[test]
    fn the_cap_applies_before_the_jitter() {
        // 1 s doubling, capped at 5 s, then ±10 %: attempts 4 and 5 jitter around 5 s.
        let p = RetryPolicy::exponential(Duration::from_secs(1))
            .max_attempts(6)
            .max_delay(Duration::from_secs(5))
            .jitter(0.1)
            .seed(3);
        assert_eq!(schedule(&p, 5), vec![1_013, 2_165, 4_396, 4_572, 4_944]);
    }

    #[test]
    fn seeded_full_jitter_gives_an_exact_schedule_below_the_nominal_delay() {
        let p = RetryPolicy::fixed(Duration::from_secs(4))
            .max_attempts(100)
            .full_jitter()
            .seed(1);
        assert_eq!(schedule(&p, 3), vec![3_575, 2_983, 877]);
        for attempt in 1..100 {
            assert!(p.next_delay(attempt).unwrap() < Duration::from_secs(4));
        }
    }

    #[test]
    fn unseeded_jitter_still_stays_within_its_range() {
        let p = RetryPolicy::fixed(Duration::from_secs(10))
            .max_attempts(1000)
            .jitter(0.2);
        let delays: Vec<Duration> = (1..1000).map(|a| p.next_delay(a).unwrap()).collect();
        assert!(
            delays
                .iter()
                .all(|d| { *d >= Duration::from_secs(8) && *d <= Duration::from_secs(12) })
        );
        // Spread over the range, not stuck at one value.
        assert!(delays.iter().any(|d| *d < Duration::from_secs(9)));
        assert!(delays.iter().any(|d| *d > Duration::from_secs(11)));
    }

    #[test]
    fn unseeded_policies_do_not_come_back_in_a_herd() {
        // Two workers' policies built alike: without a seed each draws its own entropy,
        // so jobs failing together are retried apart.
        let a = RetryPolicy::fixed(Duration::from_secs(10))
            .max_attempts(10)
            .jitter(0.5);
        let b = RetryPolicy::fixed(Duration::from_secs(10))
            .max_attempts(10)
            .jitter(0.5);
        assert_ne!(schedule(&a, 9), schedule(&b, 9));
        // A clone (a job's stored policy) keeps its schedule.
        assert_eq!(schedule(&a.clone(), 9), schedule(&a, 9));
    }

    #[test]
    fn the_default_policy_is_three_attempts_exponential_from_one_second() {
        let p = RetryPolicy::default();
        assert_eq!(p.attempts(), 3);
        for (attempt, nominal) in [(1u32, 1.0f64), (2, 2.0)] {
            let d = p.next_delay(attempt).unwrap().as_secs_f64();
            assert!(d >= nominal * 0.8 && d <= nominal * 1.2, "{d}");
        }
        assert_eq!(p.next_delay(3), None);
    }

    #[test]
    fn factor_and_attempts_are_clamped() {
        let p = RetryPolicy::exponential(Duration::from_secs(1))
            .factor(0.5)
            .max_attempts(0);
        assert_eq!(p.attempts(), 1);
        // A factor below one would shrink delays: it is raised to one.
        assert_eq!(p.delay_for(3), Duration::from_secs(1));
        // A fixed policy ignores a factor.
        let f = RetryPolicy::fixed(Duration::from_secs(2)).factor(3.0);
        assert_eq!(f.delay_for(4), Duration::from_secs(2));
        // Jitter is clamped to 100 %: never a negative delay.
        let j = RetryPolicy::fixed(Duration::from_secs(2))
            .jitter(5.0)
            .seed(1);
        assert!(j.delay_for(1) <= Duration::from_secs(4));
        assert_eq!(
            RetryPolicy::fixed(Duration::from_secs(2))
                .jitter(0.0)
                .seed(1)
                .delay_for(1),
            Duration::from_secs(2)
        );
        // No jitter is stored as none (a job's policy travels as data).
        let stored =
            serde_json::to_value(RetryPolicy::fixed(Duration::from_secs(2)).jitter(0.0)).unwrap();
        assert_eq!(stored["jitter"], serde_json::json!("None"));
    }

    #[test]
    fn none_never_retries() {
        assert_eq!(RetryPolicy::none().next_delay(1), None);
    }
}
