//! The circuit breaker: when a worker's handler fails with transient errors many times
//! in a row (a GPU gone bad, a model server down), the worker stops claiming jobs for
//! a cool-down instead of burning every queued job's retries on a broken backend, then
//! tries one job (half-open) before resuming.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Circuit-breaker settings; see [`WorkerBuilder::circuit_breaker`](super::WorkerBuilder::circuit_breaker).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitBreaker {
    threshold: u32,
    cooldown: Duration,
}

impl CircuitBreaker {
    /// Opens after `threshold` transient failures in a row (at least 1) and stays open
    /// for `cooldown` before trying one job.
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        CircuitBreaker {
            threshold: threshold.max(1),
            cooldown,
        }
    }
}

/// The breaker's state, as stored in Redis and reported in events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BreakerState {
    /// Claiming normally.
    Closed,
    /// Claiming nothing until the cool-down ends.
    Open,
    /// Running one probe job; its outcome closes or re-opens the breaker.
    HalfOpen,
}

impl BreakerState {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// What the dispatcher may do now.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Gate {
    /// Claim as many jobs as there are free slots.
    Claim,
    /// Claim exactly one job: the probe.
    Probe,
    /// Claim nothing for this long.
    Wait(Duration),
    /// A probe runs; wait for its outcome.
    Blocked,
}

/// How one attempt ended, as far as the breaker cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Success,
    TransientFailure,
    /// Permanent errors, bad payloads, cancellations: they say nothing about the backend.
    Neutral,
}

#[derive(Debug)]
enum Inner {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

/// A worker's breaker (absent when not configured: the gate is then always `Claim`).
#[derive(Debug)]
pub(crate) struct Breaker {
    config: Option<CircuitBreaker>,
    inner: Mutex<Inner>,
    changed: Notify,
}

impl Breaker {
    pub(crate) fn new(config: Option<CircuitBreaker>) -> Self {
        Breaker {
            config,
            inner: Mutex::new(Inner::Closed { failures: 0 }),
            changed: Notify::new(),
        }
    }

    /// What the dispatcher may do; moves an open breaker whose cool-down is over to
    /// half-open, returning the transition.
    pub(crate) fn gate(&self) -> (Gate, Option<BreakerState>) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        match &mut *inner {
            Inner::Closed { .. } => (Gate::Claim, None),
            Inner::Open { until } => {
                let now = Instant::now();
                if now < *until {
                    (Gate::Wait(*until - now), None)
                } else {
                    *inner = Inner::HalfOpen { probing: true };
                    (Gate::Probe, Some(BreakerState::HalfOpen))
                }
            }
            Inner::HalfOpen { probing: true } => (Gate::Blocked, None),
            Inner::HalfOpen { probing } => {
                *probing = true;
                (Gate::Probe, None)
            }
        }
    }

    /// The probe found no job to run: let the next gate probe again.
    pub(crate) fn probe_unused(&self) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if let Inner::HalfOpen { probing } = &mut *inner {
            *probing = false;
        }
    }

    /// Whether jobs may be claimed with a report (only when closed).
    pub(crate) fn is_closed(&self) -> bool {
        matches!(
            *self.inner.lock().unwrap_or_else(PoisonError::into_inner),
            Inner::Closed { .. }
        )
    }

    /// Records an attempt's outcome; returns the transition it caused, if any.
    pub(crate) fn record(&self, outcome: Outcome) -> Option<BreakerState> {
        let config = self.config?;
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let open = Inner::Open {
            until: Instant::now() + config.cooldown,
        };
        let transition = match (&mut *inner, outcome) {
            (Inner::Closed { failures }, Outcome::TransientFailure) => {
                *failures += 1;
                if *failures < config.threshold {
                    return None;
                }
                *inner = open;
                Some(BreakerState::Open)
            }
            (Inner::Closed { failures }, Outcome::Success) => {
                *failures = 0;
                None
            }
            (Inner::HalfOpen { .. }, Outcome::Success) => {
                *inner = Inner::Closed { failures: 0 };
                Some(BreakerState::Closed)
            }
            (Inner::HalfOpen { .. }, Outcome::TransientFailure) => {
                *inner = open;
                Some(BreakerState::Open)
            }
            (Inner::HalfOpen { probing }, Outcome::Neutral) => {
                *probing = false;
                None
            }
            _ => None,
        };
        drop(inner);
        self.changed.notify_waiters();
        transition
    }

    /// Resolves when the state may have changed.
    pub(crate) async fn changed(&self) {
        self.changed.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn opens_after_the_threshold_probes_after_the_cooldown_and_closes_on_success() {
        let b = Breaker::new(Some(CircuitBreaker::new(3, Duration::from_secs(10))));
        assert_eq!(b.record(Outcome::TransientFailure), None);
        assert_eq!(b.record(Outcome::Success), None); // a success resets the count
        assert_eq!(b.record(Outcome::TransientFailure), None);
        assert_eq!(b.record(Outcome::TransientFailure), None);
        assert_eq!(
            b.record(Outcome::TransientFailure),
            Some(BreakerState::Open)
        );
        assert!(matches!(b.gate().0, Gate::Wait(d) if d == Duration::from_secs(10)));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(b.gate(), (Gate::Probe, Some(BreakerState::HalfOpen)));
        assert_eq!(b.gate().0, Gate::Blocked);
        assert_eq!(
            b.record(Outcome::TransientFailure),
            Some(BreakerState::Open)
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(b.gate().0, Gate::Probe);
        assert_eq!(b.record(Outcome::Success), Some(BreakerState::Closed));
        assert_eq!(b.gate().0, Gate::Claim);
    }

    #[test]
    fn without_a_config_it_never_opens() {
        let b = Breaker::new(None);
        for _ in 0..100 {
            assert_eq!(b.record(Outcome::TransientFailure), None);
        }
        assert_eq!(b.gate().0, Gate::Claim);
    }
}
