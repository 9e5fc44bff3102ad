//! Claims and acknowledgements: the worker's side of the transition scripts.

use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use redis::Value;

use crate::error::Error;
use crate::job::{JobId, JobRecord};
use crate::redis::Shared;

/// A job handed to this worker under a lease.
#[derive(Debug)]
pub(crate) struct Claimed {
    pub(crate) queue: usize,
    pub(crate) id: JobId,
    pub(crate) token: String,
    pub(crate) record: Result<JobRecord, Error>,
    /// The record as Redis handed it over, for the completion the worker writes
    /// (see `report::completion`).
    pub(crate) claimed: Vec<u8>,
    pub(crate) payload: Vec<u8>,
}

/// What the worker passes with every claim.
#[derive(Debug, Clone)]
pub(crate) struct ClaimArgs {
    pub(crate) worker_id: String,
    pub(crate) lease: Duration,
    pub(crate) default_attempts: u32,
}

/// The reply of a claim: jobs, and how long until the queue next needs a look (a
/// scheduled job comes due or a lease runs out), as Redis's clock counts it.
#[derive(Debug, Default)]
pub(crate) struct Claim {
    pub(crate) jobs: Vec<Claimed>,
    pub(crate) next_wake: Option<Duration>,
}

impl Claim {
    /// Adds another queue's claim: its jobs, and the sooner of the two wake-ups.
    pub(crate) fn merge(&mut self, other: Claim) {
        self.jobs.extend(other.jobs);
        self.next_wake = match (self.next_wake, other.next_wake) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
}

pub(crate) async fn claim(
    shared: &Shared,
    queue: usize,
    n: usize,
    args: &ClaimArgs,
) -> Result<Claim, Error> {
    let mut inv = shared.invocation(shared.scripts.claim);
    inv.arg(&args.worker_id)
        .arg(n)
        .arg(args.lease.as_millis() as u64)
        .arg(args.default_attempts);
    let reply: Value = shared.invoke(&inv).await?;
    parse_claim(queue, reply)
}

fn bytes(v: Value) -> Result<Vec<u8>, Error> {
    redis::from_redis_value(v).map_err(|e| Error::Protocol(format!("claim reply: {e}")))
}

pub(crate) fn parse_claim(queue: usize, reply: Value) -> Result<Claim, Error> {
    let Value::Array(items) = reply else {
        return Err(Error::Protocol(format!(
            "claim reply is not a list: {reply:?}"
        )));
    };
    let mut items = items.into_iter();
    let next_wake: i64 = match items.next() {
        Some(v) => {
            redis::from_redis_value(v).map_err(|e| Error::Protocol(format!("claim reply: {e}")))?
        }
        None => return Err(Error::Protocol("empty claim reply".into())),
    };
    let mut jobs = Vec::new();
    while let Some(id) = items.next() {
        let (Some(token), Some(entry)) = (items.next(), items.next()) else {
            return Err(Error::Protocol("truncated claim reply".into()));
        };
        let id = String::from_utf8_lossy(&bytes(id)?).into_owned();
        let token = String::from_utf8_lossy(&bytes(token)?).into_owned();
        // The entry as stored: the record, a newline (JSON never holds a raw one), the
        // payload. One string, not two: the script makes no copy of the payload.
        let mut claimed = bytes(entry)?;
        let Some(end) = claimed.iter().position(|&b| b == b'\n') else {
            return Err(Error::Protocol(format!(
                "claim reply: the entry of {id} has no payload"
            )));
        };
        let payload = claimed.split_off(end + 1);
        claimed.truncate(end);
        let record = JobRecord::parse(&id, &claimed);
        jobs.push(Claimed {
            queue,
            id: JobId::from_stored(id),
            token,
            record,
            claimed,
            payload,
        });
    }
    Ok(Claim {
        jobs,
        next_wake: (next_wake >= 0).then(|| Duration::from_millis(next_wake as u64)),
    })
}

/// Hands a job back to ready (shutdown), retried through passing failures for at
/// most about a lease: after that the lease has run out and recovery does the same.
pub(crate) async fn release(
    shared: &Arc<Shared>,
    job: &Claimed,
    lease: Duration,
) -> Result<String, Error> {
    let give_up = tokio::time::Instant::now() + lease;
    let send = || async {
        let mut inv = shared.invocation(shared.scripts.release);
        inv.arg(job.id.as_str()).arg(&job.token);
        shared.invoke::<String>(&inv).await
    };
    send.retry(backoff())
        .when(|e| e.is_transient() && tokio::time::Instant::now() < give_up)
        .await
}

/// Unbounded in count: callers bound retries by what they still hold (a lease).
pub(crate) fn backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(2))
        .without_max_times()
        .with_jitter()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A queue of its own on the Redis every test machine runs (`REDIS_URL`, else
    /// 127.0.0.1:6379), for the scripts' batch paths that no public call can reach.
    pub(crate) async fn unit_queue(what: &str) -> crate::Queue<serde_json::Value> {
        let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        crate::Queue::builder(format!("{what}-{}", JobId::generate()))
            .url(url)
            .prefix("vqunit")
            .connect()
            .await
            .expect("a Redis on 127.0.0.1:6379")
    }

    pub(crate) fn args() -> ClaimArgs {
        ClaimArgs {
            worker_id: "w".into(),
            lease: Duration::from_secs(30),
            default_attempts: 3,
        }
    }

    /// The lease token the queue's next claim hands out.
    pub(crate) async fn next_token(shared: &Shared) -> String {
        let seq: Option<u64> = redis::cmd("GET")
            .arg(format!("{}:seq", shared.keys.base()))
            .query_async(&mut shared.conn.clone())
            .await
            .unwrap();
        (seq.unwrap_or(0) + 1).to_string()
    }

    /// Stores a claimed job's entry again without the record's lease (as a recovery would
    /// take it), its payload unchanged.
    pub(crate) async fn strip_lease(shared: &Shared, job: &Claimed) {
        let mut record: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&job.claimed).unwrap();
        record.remove("lease");
        let mut entry = serde_json::to_vec(&record).unwrap();
        entry.push(b'\n');
        entry.extend_from_slice(&job.payload);
        let _: i64 = redis::cmd("HSET")
            .arg(shared.keys.jobs())
            .arg(job.id.as_str())
            .arg(entry)
            .query_async(&mut shared.conn.clone())
            .await
            .unwrap();
    }

    /// Deletes every key of the queue.
    pub(crate) async fn drop_queue(shared: &Shared) {
        let _: () = redis::cmd("DEL")
            .arg(shared.keys.all().as_slice())
            .query_async(&mut shared.conn.clone())
            .await
            .unwrap();
    }

    // A claim's writes wait for the end of its loop (one call per kind): an id found
    // twice in the lanes must still be handed out once.
    #[tokio::test]
    async fn an_id_twice_in_a_lane_is_claimed_once() {
        let q = unit_queue("claim-twice").await;
        let job = q.enqueue(serde_json::json!({})).await.unwrap();
        let shared = q.shared();
        let _: i64 = redis::cmd("RPUSH")
            .arg(shared.keys.lane(crate::Priority::Normal))
            .arg(job.id.as_str())
            .query_async(&mut shared.conn.clone())
            .await
            .unwrap();
        let got = claim(shared, 0, 2, &args()).await.unwrap();
        let ids: Vec<&str> = got.jobs.iter().map(|j| j.id.as_str()).collect();
        assert_eq!(ids, [job.id.as_str()]);
        let status = q.status(&job.id).await.unwrap();
        assert_eq!(
            (status.state, status.attempts),
            (crate::JobState::Active, 1)
        );
        drop_queue(shared).await;
    }

    // A claim bigger than the batches its writes are held in (see `hold` in
    // common.lua) still hands out every job it pops, each once, in order.
    #[tokio::test]
    async fn a_claim_of_more_than_a_thousand_hands_out_each_job_once() {
        let q = unit_queue("claim-many").await;
        let ids: Vec<JobId> = q
            .enqueue_bulk((0..1_500).map(|n| serde_json::json!({ "n": n })))
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.id)
            .collect();
        let shared = q.shared();
        let got = claim(shared, 0, 1_600, &args()).await.unwrap();
        let claimed: Vec<&JobId> = got.jobs.iter().map(|j| &j.id).collect();
        assert_eq!(claimed, ids.iter().collect::<Vec<_>>());
        let payloads: Vec<u64> = got
            .jobs
            .iter()
            .map(|j| {
                serde_json::from_slice::<serde_json::Value>(&j.payload).unwrap()["n"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(payloads, (0..1_500).collect::<Vec<_>>());
        assert_eq!(q.stats().await.unwrap().active, 1_500);
        drop_queue(shared).await;
    }

    /// The record part of a job's stored entry.
    async fn stored_record(shared: &Shared, id: &JobId) -> String {
        let entry: Vec<u8> = redis::cmd("HGET")
            .arg(shared.keys.jobs())
            .arg(id.as_str())
            .query_async(&mut shared.conn.clone())
            .await
            .unwrap();
        let end = entry
            .iter()
            .position(|&b| b == b'\n')
            .unwrap_or(entry.len());
        String::from_utf8(entry[..end].to_vec()).unwrap()
    }

    /// The jobs the `active` index holds under a lease that has not run out, in the
    /// order their leases run out (ties by id).
    async fn active_ids(shared: &Shared) -> Vec<String> {
        redis::cmd("ZRANGEBYSCORE")
            .arg(shared.keys.active())
            .arg(crate::job::time_to_ms(std::time::SystemTime::now()))
            .arg("(+inf")
            .query_async(&mut shared.conn.clone())
            .await
            .unwrap()
    }

    /// A record as the claim wrote it, as a map (the claimed copy must be the stored one).
    async fn claimed_map(
        shared: &Shared,
        job: &Claimed,
    ) -> serde_json::Map<String, serde_json::Value> {
        let stored = stored_record(shared, &job.id).await;
        assert_eq!(stored.as_bytes(), &job.claimed[..]);
        serde_json::from_str(&stored).unwrap()
    }

    // A record as enqueue stored it is claimed as text (see `claimable_text` in
    // common.lua): the client's fields, the state with the claim's fields after it, then
    // the rest of enqueue's, an order no cjson pass would keep. The fields are the ones
    // the general path writes.
    #[tokio::test]
    async fn a_fresh_record_is_claimed_as_text_with_every_field_of_the_general_path() {
        let q = unit_queue("claim-text").await;
        let shared = q.shared();
        let plain = q.enqueue(serde_json::json!({"n": 1})).await.unwrap();
        let keyed = q
            .enqueue(serde_json::json!({"n": 2}))
            .priority(crate::Priority::High)
            .max_attempts(7)
            .timeout(Duration::from_secs(9))
            .dedup_key("k")
            .await
            .unwrap();
        let before = stored_record(shared, &keyed.id).await;
        let odd = ClaimArgs {
            worker_id: "w \"1\"\\ \u{e9}".into(),
            ..args()
        };
        let got = claim(shared, 0, 2, &odd).await.unwrap();
        assert_eq!(got.jobs.len(), 2);
        let keyed_job = &got.jobs[0];
        assert_eq!(keyed_job.id, keyed.id);
        let text = stored_record(shared, &keyed.id).await;
        let map = claimed_map(shared, keyed_job).await;
        let (client, enqueued) = before.split_once(r#""state":"queued""#).unwrap();
        let want = format!(
            r#"{client}"state":"active","attempts":1,"started_at":{},"worker":{},"lease":"{}"{enqueued}"#,
            map["started_at"],
            serde_json::to_string(&odd.worker_id).unwrap(),
            keyed_job.token
        );
        assert_eq!(text, want, "from {before}");
        assert_eq!(map["worker"], odd.worker_id.as_str());
        assert_eq!(map["lease"], keyed_job.token.as_str());
        assert_eq!(map["max_attempts"], 7);
        assert_eq!(map["pri"], 0);
        assert_eq!(map["timeout_ms"], 9_000);
        assert!(map["dedup"].as_str().unwrap().len() == 64);
        let plain_job = &got.jobs[1];
        let mut active = active_ids(shared).await;
        active.sort();
        let mut want = vec![keyed.id.to_string(), plain.id.to_string()];
        want.sort();
        assert_eq!(active, want);
        let map = claimed_map(shared, plain_job).await;
        assert_eq!(map["max_attempts"], 3, "the worker's default");
        assert_eq!(map["lease"], plain_job.token.as_str());
        for (job, want_payload) in [(keyed_job, 2), (plain_job, 1)] {
            let record = job.record.as_ref().unwrap();
            assert_eq!(
                (record.attempts, record.state.as_deref()),
                (1, Some("active"))
            );
            assert!(record.started_at >= record.created_at && record.created_at > 0);
            let payload: serde_json::Value = serde_json::from_slice(&job.payload).unwrap();
            assert_eq!(payload["n"], want_payload);
        }
        assert_eq!(plain_job.id, plain.id);
        drop_queue(shared).await;
    }

    // What the text claim cannot vouch for takes the general path: a record that was
    // claimed before (here: its lease ran out) counts its attempts on.
    #[tokio::test]
    async fn a_record_claimed_before_is_claimed_again_by_the_general_path() {
        let q = unit_queue("claim-again").await;
        let shared = q.shared();
        let job = q.enqueue(serde_json::json!({})).await.unwrap();
        let brief = ClaimArgs {
            lease: Duration::from_millis(1),
            ..args()
        };
        let first = claim(shared, 0, 1, &brief).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let second = claim(shared, 0, 1, &args()).await.unwrap();
        assert_eq!(second.jobs[0].id, job.id);
        let map = claimed_map(shared, &second.jobs[0]).await;
        assert_eq!(map["attempts"], 2);
        assert_eq!(map["state"], "active");
        assert_eq!(map["lease"], second.jobs[0].token.as_str());
        assert_ne!(second.jobs[0].token, first.jobs[0].token);
        assert_eq!(map["errors"][0]["kind"], "stalled");
        assert_eq!(active_ids(shared).await, [job.id.as_str()]);
        drop_queue(shared).await;
    }

    // Records that look like enqueue's but hold what the text claim cannot write around
    // (an attempt count, a lease, a deadline, a max attempts of 0) are claimed by the
    // general path, which reads them.
    #[tokio::test]
    async fn a_record_with_fields_the_text_claim_cannot_keep_is_claimed_by_reading_it() {
        let q = unit_queue("claim-odd").await;
        let shared = q.shared();
        let mut conn = shared.conn.clone();
        let records = [
            (
                "counted",
                r#"{"attempts":1,"state":"queued","created_at":"5"}"#,
            ),
            (
                "leased",
                r#"{"lease":"999","state":"queued","created_at":"5"}"#,
            ),
            (
                "unset",
                r#"{"max_attempts":0,"state":"queued","created_at":"5"}"#,
            ),
            (
                "overdue",
                r#"{"expires_at":1,"state":"queued","created_at":"5"}"#,
            ),
            ("broken", r#"{"state":"queued","created_at":"5"]"#),
            (
                "worked",
                r#"{"worker":"old","state":"queued","created_at":"5"}"#,
            ),
            (
                "started",
                r#"{"started_at":"4","state":"queued","created_at":"5"}"#,
            ),
        ];
        for (id, record) in records {
            let _: () = redis::cmd("HSET")
                .arg(shared.keys.jobs())
                .arg(id)
                .arg(format!("{record}\n{{}}"))
                .query_async(&mut conn)
                .await
                .unwrap();
            let _: () = redis::cmd("RPUSH")
                .arg(shared.keys.lane(crate::Priority::Normal))
                .arg(id)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
        let got = claim(shared, 0, 7, &args()).await.unwrap();
        let ids: Vec<&str> = got.jobs.iter().map(|j| j.id.as_str()).collect();
        assert_eq!(
            ids,
            ["counted", "leased", "unset", "worked", "started"],
            "the overdue one expires, the broken one is buried"
        );
        let mut maps = Vec::new();
        for job in &got.jobs {
            let map = claimed_map(shared, job).await;
            assert_eq!(map["lease"], job.token.as_str(), "{map:?}");
            assert!(job.record.is_ok(), "{map:?}");
            maps.push(map);
        }
        assert_eq!(
            active_ids(shared).await,
            ["counted", "leased", "started", "unset", "worked"]
        );
        assert_eq!(maps[0]["attempts"], 2);
        // A field the claim writes is written once, never next to an old one.
        for (job, field) in [(1, "lease"), (3, "worker"), (4, "started_at")] {
            let stored = stored_record(shared, &got.jobs[job].id).await;
            let key = format!("\"{field}\"");
            assert_eq!(stored.matches(&key).count(), 1, "{stored}");
        }
        assert_eq!(maps[2]["max_attempts"], 3);
        let overdue = q
            .status(&JobId::from_stored("overdue".into()))
            .await
            .unwrap();
        assert_eq!(overdue.state, crate::JobState::Expired);
        let broken = q
            .status(&JobId::from_stored("broken".into()))
            .await
            .unwrap();
        assert_eq!(broken.state, crate::JobState::Dead);
        drop_queue(shared).await;
    }

    // A claim that finds the lanes empty takes what maintenance readied in the same
    // call: a delayed job whose time came is claimed at once, not on the next call.
    #[tokio::test]
    async fn a_short_claim_takes_a_job_that_came_due_in_the_same_call() {
        let q = unit_queue("claim-due").await;
        let shared = q.shared();
        let job = q
            .enqueue(serde_json::json!({}))
            .delay(Duration::from_millis(5))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        let got = claim(shared, 0, 2, &args()).await.unwrap();
        let ids: Vec<&JobId> = got.jobs.iter().map(|j| &j.id).collect();
        assert_eq!(ids, [&job.id]);
        drop_queue(shared).await;
    }

    // Dedup and rate-limit retentions are not noted in `due` as they are written:
    // maintenance finds them at its next look and, while more are due than one call
    // sweeps, keeps `due` at now so that each following call sweeps on. Each kind's
    // backlog must do so on its own (the other's is swept in one call).
    #[tokio::test]
    async fn a_backlog_of_due_retentions_is_swept_call_after_call() {
        for (dedup, limits) in [(50, 5), (5, 50)] {
            let q = unit_queue("sweep-backlog").await;
            let shared = q.shared();
            let mut conn = shared.conn.clone();
            let base = shared.keys.base();
            for (name, n) in [("dedup", dedup), ("limits", limits)] {
                for i in 0..n {
                    let _: () = redis::pipe()
                        .hset(format!("{base}:{name}"), i, "gone")
                        .zadd(format!("{base}:{name}_exp"), i, 1)
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                }
            }
            for _ in 0..3 {
                assert!(claim(shared, 0, 1, &args()).await.unwrap().jobs.is_empty());
            }
            for name in ["dedup", "limits"] {
                let (left, fields): (u64, u64) = redis::pipe()
                    .zcard(format!("{base}:{name}_exp"))
                    .hlen(format!("{base}:{name}"))
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                assert_eq!((left, fields), (0, 0), "{name} of {dedup} {limits}");
            }
            drop_queue(shared).await;
        }
    }

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn waking(ms: Option<u64>) -> Claim {
        Claim {
            jobs: Vec::new(),
            next_wake: ms.map(Duration::from_millis),
        }
    }

    #[test]
    fn a_merged_claim_wakes_at_the_sooner_of_its_queues() {
        let cases = [
            (Some(30), Some(20), Some(20)),
            (Some(20), Some(30), Some(20)),
            (None, Some(30), Some(30)),
            (Some(30), None, Some(30)),
            (None, None, None),
        ];
        for (a, b, want) in cases {
            let mut claim = waking(a);
            claim.merge(waking(b));
            assert_eq!(
                claim.next_wake,
                want.map(Duration::from_millis),
                "{a:?} {b:?}"
            );
        }
    }

    #[test]
    fn a_merged_claim_keeps_every_job_in_order() {
        let mut a = parse_claim(
            0,
            Value::Array(vec![Value::Int(-1), bulk("a"), bulk("ta"), bulk("{}\n1")]),
        )
        .unwrap();
        let b = parse_claim(
            1,
            Value::Array(vec![Value::Int(-1), bulk("b"), bulk("tb"), bulk("{}\n2")]),
        )
        .unwrap();
        a.merge(b);
        let ids: Vec<(usize, &str)> = a.jobs.iter().map(|j| (j.queue, j.id.as_str())).collect();
        assert_eq!(ids, vec![(0, "a"), (1, "b")]);
    }

    #[test]
    fn a_claim_reply_gives_jobs_and_a_wake_up_unless_negative() {
        let claim = parse_claim(
            3,
            Value::Array(vec![
                Value::Int(250),
                bulk("j1"),
                bulk("tok1"),
                bulk("{\"attempts\":2}\np1"),
                bulk("j2"),
                bulk("tok2"),
                bulk("not json\np2\nmore"),
            ]),
        )
        .unwrap();
        assert_eq!(claim.next_wake, Some(Duration::from_millis(250)));
        assert_eq!(claim.jobs.len(), 2);
        let first = &claim.jobs[0];
        assert_eq!(
            (first.queue, first.id.as_str(), first.token.as_str()),
            (3, "j1", "tok1")
        );
        assert_eq!(first.record.as_ref().unwrap().attempts, 2);
        assert_eq!(first.payload, b"p1");
        // A record that does not parse still comes back, to be dead-lettered.
        assert!(matches!(claim.jobs[1].record, Err(Error::Corrupt { .. })));
        assert_eq!(claim.jobs[1].payload, b"p2\nmore");

        let now = parse_claim(0, Value::Array(vec![Value::Int(0)])).unwrap();
        assert_eq!(now.next_wake, Some(Duration::ZERO));
        assert!(now.jobs.is_empty());
        let never = parse_claim(0, Value::Array(vec![Value::Int(-1)])).unwrap();
        assert_eq!(never.next_wake, None);
    }

    #[test]
    fn malformed_claim_replies_are_protocol_errors() {
        for reply in [
            Value::Int(1),
            Value::Array(Vec::new()),
            Value::Array(vec![bulk("soon")]),
            Value::Array(vec![Value::Int(0), bulk("j1"), bulk("t")]),
            // An entry without the newline before the payload.
            Value::Array(vec![Value::Int(0), bulk("j1"), bulk("t"), bulk("{}")]),
        ] {
            assert!(
                matches!(parse_claim(0, reply.clone()), Err(Error::Protocol(_))),
                "{reply:?}"
            );
        }
    }
}
