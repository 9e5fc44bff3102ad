//! Leases and heartbeats: the worker renews every lease it holds from a thread of its
//! own, so no amount of compute in a handler (or a starved async runtime) lets a live
//! job's lease lapse, and jobs of a dead worker are recovered within one lease.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::job::JobId;
use crate::redis::Conn;
use crate::redis::Shared;

/// A job this worker runs, as the heartbeat sees it.
#[derive(Debug, Clone)]
pub(crate) struct Held {
    pub(crate) token: String,
    pub(crate) cancel: CancellationToken,
    pub(crate) lost: Arc<AtomicBool>,
}

/// The jobs a worker holds, keyed by (queue index, job id).
#[derive(Debug, Clone, Default)]
pub(crate) struct Registry {
    inner: Arc<Mutex<HashMap<(usize, JobId), Held>>>,
}

impl Registry {
    /// The job's entry, made now if it has none: a job is held (its lease renewed)
    /// from the moment it is handed over, also while it waits as a one-slot worker's
    /// prefetched next job, and a cancellation that arrives meanwhile is kept.
    pub(crate) fn hold(&self, queue: usize, id: &JobId, token: &str) -> Held {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry((queue, id.clone()))
            .or_insert_with(|| Held {
                token: token.to_owned(),
                cancel: CancellationToken::new(),
                lost: Arc::new(AtomicBool::new(false)),
            })
            .clone()
    }

    pub(crate) fn remove(&self, queue: usize, id: &JobId) {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&(queue, id.clone()));
    }

    fn snapshot(&self, queue: usize) -> Vec<(JobId, Held)> {
        let map = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        map.iter()
            .filter(|((q, _), _)| *q == queue)
            .map(|((_, id), h)| (id.clone(), h.clone()))
            .collect()
    }

    /// The flag the heartbeat sets when the job's lease is lost, while it is held.
    pub(crate) fn lost_flag(&self, queue: usize, id: &JobId) -> Option<Arc<AtomicBool>> {
        self.get(queue, id).map(|h| h.lost)
    }

    fn get(&self, queue: usize, id: &JobId) -> Option<Held> {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(queue, id.clone()))
            .cloned()
    }
}

/// When the heartbeat beats and what it tells the script.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    /// Each renewal extends a lease this far.
    pub(crate) lease: Duration,
    /// Time between beats.
    pub(crate) every: Duration,
    /// Workers silent this long are forgotten.
    pub(crate) forget_after: Duration,
}

/// The heartbeat thread.
#[derive(Debug)]
pub(crate) struct Heartbeat {
    stop: CancellationToken,
    thread: Option<JoinHandle<()>>,
}

impl Heartbeat {
    pub(crate) fn start(
        queues: Vec<Arc<Shared>>,
        registry: Registry,
        worker_id: String,
        timing: Timing,
    ) -> std::io::Result<Self> {
        let stop = CancellationToken::new();
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new().name("voxqueue-heartbeat".into()).spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "heartbeat runtime failed to start; leases will lapse");
                    return;
                }
            };
            runtime.block_on(beat(queues, registry, worker_id, timing, stop2));
        })?;
        Ok(Heartbeat {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it, off the async runtime.
    pub(crate) async fn stop(mut self) {
        self.stop.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn beat(
    queues: Vec<Arc<Shared>>,
    registry: Registry,
    worker_id: String,
    timing: Timing,
    stop: CancellationToken,
) {
    let Timing {
        lease,
        every,
        forget_after,
    } = timing;
    // Connections of this thread's own runtime: the shared ones are driven by the
    // main runtime, which a busy handler may starve.
    let mut conns: Vec<Option<Conn>> = vec![None; queues.len()];
    let mut next_renewal = tokio::time::Instant::now();
    loop {
        // Beats renew this worker's leases every `every`. Between them, a beat comes
        // early when a queue needs a look sooner (a lease of a dead worker runs out, a
        // scheduled job comes due), so recovery does not wait for an idle worker:
        // every live worker's heartbeat does it. Early beats renew nothing.
        let now = tokio::time::Instant::now();
        let renew = now >= next_renewal;
        if renew {
            next_renewal = now + every;
        }
        let mut next = next_renewal.saturating_duration_since(now);
        for (index, queue) in queues.iter().enumerate() {
            if conns[index].is_none() {
                match queue.connector.connect().await {
                    Ok(c) => conns[index] = Some(c),
                    Err(e) => {
                        tracing::warn!(error = %e, queue = %queue.name, "heartbeat cannot connect");
                        continue;
                    }
                }
            }
            let Some(conn) = conns[index].as_mut() else {
                continue;
            };
            let held = if renew {
                registry.snapshot(index)
            } else {
                Vec::new()
            };
            let mut inv = queue.invocation(queue.scripts.heartbeat);
            inv.arg(&worker_id)
                .arg(lease.as_millis() as u64)
                .arg(forget_after.as_millis() as u64);
            for (id, h) in &held {
                inv.arg(id.as_str()).arg(&h.token);
            }
            let reply: Result<(Vec<String>, Vec<String>, i64), _> =
                queue.invoke_on(conn, &inv).await;
            match reply {
                Ok((lost, cancel, due_in)) => {
                    if let Ok(ms) = u64::try_from(due_in) {
                        // Just after the due time, at least 10 ms apart.
                        next = next.min(Duration::from_millis(ms.saturating_add(5).max(10)));
                    }
                    for id in lost {
                        let id = JobId::from_stored(id);
                        if let Some(h) = registry.get(index, &id) {
                            tracing::warn!(job = %id, queue = %queue.name, "lease lost; stopping the handler");
                            h.lost.store(true, std::sync::atomic::Ordering::SeqCst);
                            h.cancel.cancel();
                        }
                    }
                    for id in cancel {
                        if let Some(h) = registry.get(index, &JobId::from_stored(id)) {
                            h.cancel.cancel();
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, queue = %queue.name, "heartbeat failed; will retry")
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(next) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    fn id(s: &str) -> JobId {
        JobId::from_stored(s.to_owned())
    }

    #[test]
    fn a_second_hold_keeps_the_first_entry_and_its_cancellation() {
        let registry = Registry::default();
        let first = registry.hold(0, &id("a"), "t1");
        first.cancel.cancel();
        let again = registry.hold(0, &id("a"), "t2");
        assert_eq!(again.token, "t1");
        assert!(again.cancel.is_cancelled());
    }

    #[test]
    fn the_lost_flag_is_the_held_jobs_own_until_it_is_removed() {
        let registry = Registry::default();
        let held = registry.hold(1, &id("a"), "t");
        let flag = registry.lost_flag(1, &id("a")).expect("held");
        held.lost.store(true, Ordering::SeqCst);
        assert!(flag.load(Ordering::SeqCst));
        // Same id in another queue is another job.
        assert!(registry.lost_flag(0, &id("a")).is_none());
        registry.remove(1, &id("a"));
        assert!(registry.lost_flag(1, &id("a")).is_none());
        assert!(registry.snapshot(1).is_empty());
    }

    #[test]
    fn a_snapshot_holds_one_queues_jobs_with_their_tokens() {
        let registry = Registry::default();
        registry.hold(0, &id("a"), "ta");
        registry.hold(1, &id("b"), "tb");
        registry.hold(0, &id("c"), "tc");
        let mut snap: Vec<(String, String)> = registry
            .snapshot(0)
            .into_iter()
            .map(|(id, h)| (id.as_str().to_owned(), h.token))
            .collect();
        snap.sort();
        assert_eq!(
            snap,
            vec![("a".into(), "ta".into()), ("c".into(), "tc".into())]
        );
        let snap1 = registry.snapshot(1);
        assert_eq!(snap1.len(), 1);
        assert_eq!(snap1[0].0.as_str(), "b");
        assert!(registry.snapshot(2).is_empty());
    }

    /// One heartbeat call for `held` (id, token) pairs: the lost ids and those with a
    /// cancel request.
    async fn heartbeat(shared: &Shared, held: &[(&JobId, &str)]) -> (Vec<String>, Vec<String>) {
        let mut inv = shared.invocation(shared.scripts.heartbeat);
        inv.arg("w").arg(60_000u64).arg(60_000u64);
        for (id, token) in held {
            inv.arg(id.as_str()).arg(*token);
        }
        let (lost, cancel, _): (Vec<String>, Vec<String>, i64) = shared.invoke(&inv).await.unwrap();
        (lost, cancel)
    }

    async fn lease_deadline(shared: &Shared, id: &JobId) -> f64 {
        redis::cmd("ZSCORE")
            .arg(shared.keys.active())
            .arg(id.as_str())
            .query_async(&mut shared.conn.clone())
            .await
            .unwrap()
    }

    // The heartbeat reads a held record by plain search: the lease and a cancel
    // request count only in the record, never as text of the payload.
    #[tokio::test]
    async fn a_heartbeat_reads_the_lease_and_cancel_request_of_the_record_not_the_payload() {
        use super::super::claim::{
            self,
            tests::{args, drop_queue, next_token, strip_lease, unit_queue},
        };
        let q = unit_queue("heartbeat-text").await;
        let shared = q.shared();
        let next = next_token(shared).await;
        let tricky = q
            .enqueue(serde_json::json!({ "lease": next, "cancel": true }))
            .await
            .unwrap();
        let plain = q.enqueue(serde_json::json!({})).await.unwrap();
        let claimed = claim::claim(shared, 0, 2, &args()).await.unwrap().jobs;
        assert_eq!(claimed[0].token, next);
        let (t1, t2) = (claimed[0].token.as_str(), claimed[1].token.as_str());
        let before = lease_deadline(shared, &plain.id).await;

        // Held and renewed (a minute: past the claim's 30 s), with no cancel request.
        let (lost, cancel) = heartbeat(shared, &[(&tricky.id, t1), (&plain.id, t2)]).await;
        assert!(lost.is_empty() && cancel.is_empty(), "{lost:?} {cancel:?}");
        assert!(lease_deadline(shared, &plain.id).await > before + 20_000.0);
        assert!(lease_deadline(shared, &tricky.id).await > before + 20_000.0);

        // A real cancel request is the record's: the heartbeat passes it on.
        q.cancel(&plain.id).await.unwrap();
        let (lost, cancel) = heartbeat(shared, &[(&plain.id, t2)]).await;
        assert!(lost.is_empty(), "{lost:?}");
        assert_eq!(cancel, [plain.id.as_str()]);

        // The record loses its lease (as a recovery would take it); the payload keeps
        // the text: lost. So is a stale token.
        strip_lease(shared, &claimed[0]).await;
        let (lost, _) = heartbeat(shared, &[(&tricky.id, t1), (&plain.id, "0")]).await;
        assert_eq!(lost, [tricky.id.as_str(), plain.id.as_str()]);
        drop_queue(shared).await;
    }

    // Renewals go to Redis in slices (HELD_MAX arguments each): every lease of a
    // worker holding more than a slice is renewed.
    #[tokio::test]
    async fn a_heartbeat_renews_more_leases_than_one_slice_holds() {
        use super::super::claim::{
            self,
            tests::{args, drop_queue, unit_queue},
        };
        let q = unit_queue("heartbeat-many").await;
        let shared = q.shared();
        q.enqueue_bulk((0..1201).map(|n| serde_json::json!({ "n": n })))
            .await
            .unwrap();
        let claimed = claim::claim(shared, 0, 1201, &args()).await.unwrap().jobs;
        assert_eq!(claimed.len(), 1201);
        let before = lease_deadline(shared, &claimed[0].id).await;
        let held: Vec<(&JobId, &str)> = claimed.iter().map(|c| (&c.id, c.token.as_str())).collect();
        let (lost, cancel) = heartbeat(shared, &held).await;
        assert!(lost.is_empty() && cancel.is_empty());
        for c in &claimed {
            assert!(
                lease_deadline(shared, &c.id).await > before + 20_000.0,
                "{:?}",
                c.id
            );
        }
        drop_queue(shared).await;
    }
}
