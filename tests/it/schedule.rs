//! Periodic jobs: one enqueue per tick, however many processes run the schedule.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use voxqueue::{Error, JobId, Periodic, Schedule};

use crate::common::{Prefix, eventually, shutdown};
use crate::queue::Echo;

const TICK_MS: u64 = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_tick_enqueues_exactly_once_across_processes() {
    let p = Prefix::new();
    let made = Arc::new(AtomicUsize::new(0));
    let mut running = Vec::new();
    // Three "processes": each with its own queue value and connection.
    for _ in 0..3 {
        let q = p.queue::<Echo>("cron").await;
        let made = made.clone();
        let periodic = Periodic::new(
            q,
            "beat",
            Schedule::every(Duration::from_millis(TICK_MS)).unwrap(),
            move |tick: SystemTime| {
                made.fetch_add(1, Ordering::SeqCst);
                let ms = tick.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
                Echo {
                    n: (ms / TICK_MS % 1_000_000) as u32,
                }
            },
        )
        .unwrap();
        let (stop, signal) = shutdown();
        running.push((stop, tokio::spawn(periodic.run_until(signal))));
    }
    let q = p.queue::<Echo>("cron").await;
    eventually(Duration::from_secs(2), "three ticks enqueued", || async {
        let stats = q.stats().await.unwrap();
        (stats.totals.get("enqueued").copied().unwrap_or(0) >= 3).then_some(())
    })
    .await;
    for (stop, task) in running {
        let _ = stop.send(());
        task.await.expect("periodic task");
    }

    let mut conn = crate::common::connection().await;
    let ids: Vec<String> = redis::cmd("HKEYS")
        .arg(format!("{}:{{cron}}:jobs", p.name))
        .query_async(&mut conn)
        .await
        .unwrap();
    let ticks: BTreeSet<u64> = ids
        .iter()
        .map(|id| {
            let ms = id.strip_prefix("periodic:beat:").expect("a periodic id");
            ms.parse::<u64>().expect("tick ms")
        })
        .collect();
    let enqueued = q.stats().await.unwrap().totals["enqueued"];
    assert_eq!(enqueued, ticks.len() as u64, "one job per tick: {ids:?}");
    assert!(ticks.len() >= 3, "{ticks:?}");
    assert!(ticks.iter().all(|t| t % TICK_MS == 0), "aligned: {ticks:?}");
    // Every process built a job for the ticks it saw; all but one were duplicates.
    assert!(
        made.load(Ordering::SeqCst) > ticks.len(),
        "the processes overlapped"
    );
    let first = ticks.first().unwrap();
    let st = q
        .status(&JobId::new(format!("periodic:beat:{first}")).unwrap())
        .await
        .unwrap();
    assert_eq!(st.state, voxqueue::JobState::Queued);
}

#[test]
fn cron_expressions_parse_and_invalid_ones_are_errors() {
    for ok in [
        "*/5 * * * *",
        "0 30 9 * * Mon-Fri",
        "0 0 12 1 Jan * 2099",
        "@hourly",
    ] {
        Schedule::cron(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
    for bad in ["", "not cron", "61 * * * *", "* * *"] {
        assert!(
            matches!(Schedule::cron(bad), Err(Error::InvalidConfig(_))),
            "{bad}"
        );
    }
    assert!(matches!(
        Schedule::every(Duration::ZERO),
        Err(Error::InvalidConfig(_))
    ));
    let hourly: Schedule = "0 * * * *".parse().unwrap();
    let next = hourly.next_after(UNIX_EPOCH).unwrap();
    assert_eq!(next, UNIX_EPOCH + Duration::from_secs(3600));
}
