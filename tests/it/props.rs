//! Properties, checked on generated inputs with bounded case counts (so CI stays fast):
//! the pure text, caption and request functions, and two that run through a real queue:
//! undecodable payloads and hostile job records end dead-lettered or valid, never lost.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use unicode_normalization::{UnicodeNormalization, is_nfc};
use voxqueue::tts::{
    AudioFormat, Caption, Limits, SynthesisRequest, deduplicator, normalize, split_sentences,
    split_sentences_max, to_srt, to_vtt,
};
use voxqueue::{JobError, JobId, JobState, Priority, Queue, Worker, handler_fn};

use crate::common::{Prefix, eventually, shutdown};

/// Characters that exercise every rule: letters of both cases, every kind of whitespace,
/// terminators, closers and openers, combining marks, controls, a BOM, CJK stops, digits,
/// and now and then any `char` at all.
fn tricky_char() -> impl Strategy<Value = char> {
    prop_oneof![
        4 => proptest::char::range('a', 'z'),
        2 => proptest::char::range('A', 'Z'),
        3 => prop::sample::select(vec![
            ' ', ' ', '.', '.', '!', '?', '…', ',', ';', ':', '\n', '\t', '\r', '\u{a0}',
            '\u{3000}', '\u{2003}', '。', '！', '，', '"', '\'', '(', ')', '«', '»', '\u{301}',
            '\u{308}', '\u{327}', '\u{7}', '\u{0}', '\u{1b}', '\u{feff}', '1', '9', 'é', 'ß',
            'İ', 'Å', '你', '好',
        ]),
        1 => any::<char>(),
    ]
}

fn text(max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(tricky_char(), 0..max).prop_map(|v| v.into_iter().collect())
}

/// What normalisation keeps of `s`, up to spacing: every character but whitespace,
/// controls and byte-order marks, composed.
fn visible(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_whitespace() && !c.is_control() && *c != '\u{feff}')
        .nfc()
        .collect()
}

/// `default` cases, or `PROPTEST_CASES` when set (for a longer run by hand).
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(512)))]

    #[test]
    fn normalize_is_idempotent_nfc_and_clean(s in text(120)) {
        let n = normalize(&s);
        prop_assert_eq!(&normalize(&n), &n);
        prop_assert!(is_nfc(&n), "not NFC: {n:?}");
        prop_assert!(!n.chars().any(|c| c.is_control() || c == '\u{feff}'), "{n:?}");
        // The only whitespace left is single spaces between words.
        prop_assert!(!n.chars().any(|c| c.is_whitespace() && c != ' '), "{n:?}");
        prop_assert!(!n.starts_with(' ') && !n.ends_with(' ') && !n.contains("  "), "{n:?}");
    }

    #[test]
    fn normalize_never_changes_case_or_drops_visible_text(s in text(120)) {
        let n = normalize(&s);
        // Same visible characters in the same order: no case change, no word lost.
        prop_assert_eq!(visible(&n), visible(&s));
    }

    #[test]
    fn splitting_keeps_all_visible_text_and_makes_no_empty_chunk(s in text(200)) {
        let chunks = split_sentences(&s);
        for c in &chunks {
            prop_assert!(!c.trim().is_empty(), "empty chunk in {chunks:?}");
            prop_assert_eq!(c.trim(), c.as_str());
        }
        prop_assert_eq!(visible(&chunks.concat()), visible(&s));
    }

    #[test]
    fn bounded_splitting_respects_the_bound(s in text(200), max in 0usize..40) {
        let n = normalize(&s);
        let chunks = split_sentences_max(&n, max);
        for c in &chunks {
            prop_assert!(!c.is_empty(), "empty chunk in {chunks:?}");
            prop_assert!(c.chars().count() <= max.max(1), "{c:?} over {max}");
        }
        prop_assert_eq!(visible(&chunks.concat()), visible(&n));
    }

    #[test]
    fn captions_are_well_formed_and_monotone(
        cues in prop::collection::vec((0u64..10_000_000, 1u64..100_000, text(40)), 0..8),
    ) {
        // Back-to-back cues, as the synthesiser makes them.
        let mut at = 0u64;
        let captions: Vec<Caption> = cues
            .iter()
            .enumerate()
            .map(|(i, (gap, len, t))| {
                let start = at + gap;
                at = start + len;
                Caption::new(i + 1, Duration::from_millis(start), Duration::from_millis(at), t.clone())
            })
            .collect();
        check_captions(&to_srt(&captions), ',', false, captions.len())?;
        check_captions(&to_vtt(&captions), '.', true, captions.len())?;
    }

    #[test]
    fn validation_never_panics_and_valid_requests_round_trip(
        t in text(80),
        voice in "[a-z]{0,6}",
        speed in prop_oneof![Just(f32::NAN), Just(f32::INFINITY), -10.0f32..10.0],
        rate in prop::option::of(0u32..100_000),
        format in prop::sample::select(vec![AudioFormat::Wav, AudioFormat::PcmI16, AudioFormat::PcmF32]),
        style in prop::option::of(text(20)),
        max_chars in 0usize..100,
    ) {
        let mut req = SynthesisRequest::new(t, voice).with_speed(speed).with_format(format);
        if let Some(rate) = rate {
            req = req.with_sample_rate(rate);
        }
        if let Some(style) = style {
            req = req.with_style(style);
        }
        let limits = Limits::default().with_max_chars(max_chars);
        if req.validate(&limits, &[]).is_ok() {
            let json = serde_json::to_string(&req).expect("a valid request serialises");
            let back: SynthesisRequest = serde_json::from_str(&json).expect("and reads back");
            prop_assert_eq!(back, req);
        }
    }

    #[test]
    fn dedup_key_is_stable_under_normalisation(t in text(80), pad in text(4)) {
        // The same request as another client might send it: decomposed, with extra
        // whitespace around and inside, and with invisible control characters.
        let noisy: String = t
            .nfd()
            .flat_map(|c| if c == ' ' { vec!['\t', ' ', '\u{a0}'] } else { vec![c] })
            .collect();
        let noisy = format!(" \u{feff}{noisy}\u{7}\n{}", pad.chars().filter(|c| c.is_whitespace()).collect::<String>());
        let dedup = deduplicator(Duration::from_secs(60));
        let a = dedup.key(&SynthesisRequest::new(t, "v")).unwrap();
        let b = dedup.key(&SynthesisRequest::new(noisy, "v")).unwrap();
        prop_assert_eq!(a, b);
    }
}

/// A caption file is cues of (number, `start --> end`, text lines) separated by blank
/// lines, with non-decreasing times, start <= end, and no blank line inside a cue.
fn check_captions(file: &str, sep: char, vtt: bool, count: usize) -> Result<(), TestCaseError> {
    let body = if vtt {
        prop_assert!(file.starts_with("WEBVTT\n"), "{file:?}");
        file["WEBVTT\n".len()..].trim_start_matches('\n')
    } else {
        file
    };
    let cues: Vec<&str> = body.split("\n\n").filter(|c| !c.is_empty()).collect();
    prop_assert_eq!(cues.len(), count, "{:?}", file);
    let mut last_end = 0u128;
    for (i, cue) in cues.iter().enumerate() {
        let mut lines = cue.lines();
        let number = (i + 1).to_string();
        prop_assert_eq!(lines.next(), Some(number.as_str()));
        let times = lines.next().unwrap_or_default();
        let (start, end) = times.split_once(" --> ").unwrap_or(("", ""));
        let (start, end) = (parse_time(start, sep)?, parse_time(end, sep)?);
        prop_assert!(
            last_end <= start && start <= end,
            "{times} after {last_end}"
        );
        last_end = end;
        for line in lines {
            prop_assert!(!line.trim().is_empty(), "blank line in cue {cue:?}");
            prop_assert!(!line.contains("-->"), "arrow in cue text {cue:?}");
            if vtt {
                prop_assert!(!line.contains('<'), "markup in cue text {cue:?}");
            }
        }
    }
    Ok(())
}

/// `HH:MM:SS<sep>mmm` (hours may have more digits) in milliseconds.
fn parse_time(s: &str, sep: char) -> Result<u128, TestCaseError> {
    let bad = || TestCaseError::fail(format!("bad timestamp {s:?}"));
    let (hms, ms) = s.split_once(sep).ok_or_else(bad)?;
    let parts: Vec<&str> = hms.split(':').collect();
    let ok = parts.len() == 3
        && parts[0].len() >= 2
        && parts[1].len() == 2
        && parts[2].len() == 2
        && ms.len() == 3;
    if !ok {
        return Err(bad());
    }
    let num = |p: &str| p.parse::<u128>().map_err(|_| bad());
    let (h, m, sec, ms) = (num(parts[0])?, num(parts[1])?, num(parts[2])?, num(ms)?);
    if m >= 60 || sec >= 60 {
        return Err(bad());
    }
    Ok(((h * 60 + m) * 60 + sec) * 1000 + ms)
}

// --- through a real queue ---

#[derive(Debug, Serialize, Deserialize)]
struct Echo {
    n: u32,
}

/// A payload a worker may meet: any bytes, any JSON, or a valid one.
fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..48),
        json().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        (0u32..1000).prop_map(|n| format!("{{\"n\":{n}}}").into_bytes()),
    ]
}

fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        "\\PC{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("[a-z_]{1,12}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// What a test writes over a job's record: bytes, any JSON, or the real record with one
/// field replaced by any JSON value or removed.
#[derive(Debug, Clone)]
enum Hostile {
    Bytes(Vec<u8>),
    Json(Value),
    Field(usize, Option<Value>),
}

fn hostile() -> impl Strategy<Value = Hostile> {
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..48).prop_map(Hostile::Bytes),
        1 => json().prop_map(Hostile::Json),
        3 => (any::<usize>(), prop::option::of(json())).prop_map(|(i, v)| Hostile::Field(i, v)),
    ]
}

impl Hostile {
    fn apply(&self, record: &[u8]) -> Vec<u8> {
        match self {
            Hostile::Bytes(b) => b.clone(),
            Hostile::Json(v) => serde_json::to_vec(v).unwrap(),
            Hostile::Field(i, v) => {
                let mut map: serde_json::Map<String, Value> =
                    serde_json::from_slice(record).expect("the queue wrote a JSON object");
                let key = map
                    .keys()
                    .nth(i % map.len().max(1))
                    .cloned()
                    .unwrap_or_default();
                match v {
                    Some(v) => map.insert(key, v.clone()),
                    None => map.remove(&key),
                };
                serde_json::to_vec(&map).unwrap()
            }
        }
    }
}

const INDEXES: [&str; 5] = ["ready", "scheduled", "active", "dead", "finished"];
const LANES: [&str; 3] = ["ready:high", "ready:normal", "ready:low"];

/// The indexes (sorted sets, and the ready lanes) that hold `id`.
async fn indexes_of(
    conn: &mut redis::aio::MultiplexedConnection,
    base: &str,
    id: &JobId,
) -> Vec<&'static str> {
    let mut found = Vec::new();
    for name in INDEXES {
        let score: Option<f64> = redis::cmd("ZSCORE")
            .arg(format!("{base}:{name}"))
            .arg(id.as_str())
            .query_async(conn)
            .await
            .unwrap();
        if score.is_some() {
            found.push(name);
        }
    }
    for name in LANES {
        let at: Option<u64> = redis::cmd("LPOS")
            .arg(format!("{base}:{name}"))
            .arg(id.as_str())
            .query_async(conn)
            .await
            .unwrap();
        if at.is_some() {
            found.push(name);
        }
    }
    found
}

async fn hset(conn: &mut redis::aio::MultiplexedConnection, key: &str, id: &JobId, v: &[u8]) {
    let _: i64 = redis::cmd("HSET")
        .arg(key)
        .arg(id.as_str())
        .arg(v)
        .query_async(conn)
        .await
        .unwrap();
}

/// Runs a worker until the `last` job completes and every job of `ids` is in a terminal
/// index (`dead` or `finished`), then stops it; panics if that does not happen in time.
async fn drain(
    q: &Queue<Echo>,
    conn: &redis::aio::MultiplexedConnection,
    base: &str,
    ids: &[JobId],
    last: &JobId,
) {
    let worker = Worker::builder(q.clone())
        .shutdown_grace(Duration::from_millis(100))
        .build(handler_fn(|job: Echo, _ctx| async move {
            Ok::<_, JobError>(job.n)
        }));
    let (stop, stopped) = shutdown();
    let running = tokio::spawn(worker.run_until(stopped));
    eventually(
        Duration::from_secs(10),
        "the valid job behind completes",
        || async { (q.status(last).await.ok()?.state == JobState::Completed).then_some(()) },
    )
    .await;
    for id in ids {
        eventually(Duration::from_secs(10), "every job ends", || {
            let mut conn = conn.clone();
            async move {
                let at = indexes_of(&mut conn, base, id).await;
                at.iter()
                    .any(|i| *i == "dead" || *i == "finished")
                    .then_some(())
            }
        })
        .await;
    }
    let _ = stop.send(());
    running
        .await
        .expect("worker task")
        .expect("the worker goes on");
}

/// A queue on the test Redis, a runtime to drive it from proptest's synchronous runner, and
/// a count of the endings met (so that neither half of a property holds vacuously).
struct Bench {
    rt: tokio::runtime::Runtime,
    _prefix: Prefix,
    q: Queue<Echo>,
    base: String,
    conn: redis::aio::MultiplexedConnection,
    dead: AtomicUsize,
    finished: AtomicUsize,
}

impl Bench {
    fn new(queue: &str) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let prefix = Prefix::new();
        let q = rt.block_on(prefix.queue(queue));
        let client = redis::Client::open(crate::common::redis_url()).unwrap();
        let conn = rt
            .block_on(client.get_multiplexed_async_connection())
            .unwrap();
        Bench {
            base: format!("{}:{{{queue}}}", prefix.name),
            rt,
            _prefix: prefix,
            q,
            conn,
            dead: AtomicUsize::new(0),
            finished: AtomicUsize::new(0),
        }
    }

    /// Enqueues one job per item, overwrites one `part` of its entry (record, newline,
    /// payload) with `hostile(what was there, item)`, then runs a worker until a valid
    /// job queued behind them completes and every one of them has ended. Returns their
    /// ids.
    fn corrupt_and_drain<T>(
        &self,
        part: Part,
        items: &[T],
        hostile: impl Fn(&[u8], &T) -> Vec<u8>,
    ) -> Vec<JobId> {
        let mut conn = self.conn.clone();
        let key = format!("{}:jobs", self.base);
        self.rt.block_on(async {
            let mut ids = Vec::new();
            for item in items {
                let job = self.q.enqueue(Echo { n: 1 }).no_dedup().await.unwrap();
                let stored: Vec<u8> = redis::cmd("HGET")
                    .arg(&key)
                    .arg(job.id.as_str())
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                let at = stored
                    .iter()
                    .position(|&b| b == b'\n')
                    .expect("an entry: record, newline, payload");
                let (record, payload) = (&stored[..at], &stored[at + 1..]);
                let entry = match part {
                    Part::Record => [&hostile(record, item)[..], b"\n", payload].concat(),
                    Part::Payload => [record, b"\n", &hostile(payload, item)[..]].concat(),
                };
                hset(&mut conn, &key, &job.id, &entry).await;
                ids.push(job.id);
            }
            let last = self
                .q
                .enqueue(Echo { n: 7 })
                .priority(Priority::Low)
                .no_dedup()
                .await
                .unwrap();
            drain(&self.q, &self.conn, &self.base, &ids, &last.id).await;
            ids
        })
    }

    /// The one index that holds `id` at the end, counted.
    fn ending(&self, id: &JobId) -> Vec<&'static str> {
        let where_ = self
            .rt
            .block_on(indexes_of(&mut self.conn.clone(), &self.base, id));
        let seen = if where_ == ["dead"] {
            &self.dead
        } else {
            &self.finished
        };
        seen.fetch_add(1, Ordering::Relaxed);
        where_
    }

    fn assert_both_endings_met(self) {
        let (dead, finished) = (self.dead.into_inner(), self.finished.into_inner());
        eprintln!("{dead} dead, {finished} finished");
        assert!(dead > 0 && finished > 0, "{dead} dead, {finished} finished");
    }
}

/// The part of a job's entry a case overwrites.
#[derive(Debug, Clone, Copy)]
enum Part {
    Record,
    Payload,
}

/// `cases` cases, and no regression file (the runner has no source file to put it by).
fn runner_config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

#[test]
fn undecodable_payloads_are_dead_lettered_and_the_worker_goes_on() {
    let bench = Bench::new("payloads");
    let q = &bench.q;
    let strategy = prop::collection::vec(payload(), 1..5);
    TestRunner::new(runner_config(12))
        .run(&strategy, |payloads| {
            let ids = bench.corrupt_and_drain(Part::Payload, &payloads, |_, bytes| bytes.clone());
            for (id, bytes) in ids.iter().zip(&payloads) {
                let where_ = bench.ending(id);
                let status = bench.rt.block_on(q.status(id)).unwrap();
                match serde_json::from_slice::<Echo>(bytes) {
                    Ok(echo) => {
                        assert_eq!(status.state, JobState::Completed, "{bytes:?}");
                        let result = bench.rt.block_on(q.result::<u32>(id)).unwrap();
                        assert_eq!(result, Some(echo.n));
                        assert_eq!(where_, ["finished"], "{bytes:?}");
                    }
                    Err(_) => {
                        assert_eq!(status.state, JobState::Dead, "{bytes:?}");
                        assert!(status.reason.is_some(), "{status:?}");
                        assert_eq!(where_, ["dead"], "{bytes:?}");
                    }
                }
            }
            Ok(())
        })
        .unwrap();
    bench.assert_both_endings_met();
}

#[test]
fn hostile_records_end_dead_lettered_or_valid_never_in_no_index() {
    let bench = Bench::new("records");
    let strategy = prop::collection::vec(hostile(), 1..5);
    TestRunner::new(runner_config(16))
        .run(&strategy, |records| {
            let ids = bench.corrupt_and_drain(Part::Record, &records, |record, h| h.apply(record));
            for (id, hostile) in ids.iter().zip(&records) {
                let where_ = bench.ending(id);
                assert!(
                    where_ == ["dead"] || where_ == ["finished"],
                    "{hostile:?} left the job in {where_:?}"
                );
            }
            Ok(())
        })
        .unwrap();
    bench.assert_both_endings_met();
}
