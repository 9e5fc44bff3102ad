//! The whole router in-process (`oneshot`, no socket) against the shared Redis, under a
//! key prefix of its own per test that is deleted when the test ends.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, to_bytes};
use axum::http::{Method, Request, StatusCode, header};
use axum::response::Response;
use base64::Engine;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::{Value, json};
use tower::ServiceExt;
use voxqueue::tts::{self, EspeakSynthesizer, SynthesisRequest, Synthesizer, Voice, WorkerVoices};
use voxqueue::{JobContext, JobError, JobId, Worker, handler_fn};

use crate::auth::ApiKeys;
use crate::common::{QueueFlags, StoreChoice, parse_duration, parse_store};
use crate::routes::{app, byte_range};
use crate::state::{AppState, Config, Queues, Rate, espeak_worker, parse_rate};
use crate::streaming::streaming_wav_header;

mod browser;
mod e2e;
mod webdriver;

/// One Prometheus recorder for the whole test binary: a process has one global
/// recorder, and every test's counters land in it.
fn recorder() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .install_recorder()
                .expect("install the test recorder")
        })
        .clone()
}

fn redis_url() -> String {
    std::env::var("VOXQUEUE_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

#[derive(Default)]
struct Setup {
    keys: Vec<&'static str>,
    admin_keys: Vec<&'static str>,
    metrics_token: Option<&'static str>,
    config: Config,
    /// Run a real espeak-ng worker from the start.
    worker: bool,
    /// Register no voices (as when no worker ever ran).
    no_voices: bool,
    /// A base queue name of its own (for counters in the shared recorder).
    unique_queue: bool,
}

/// A router over a fresh key prefix. The espeak voices are registered in the catalogue
/// (as a worker that is not taking jobs would), so jobs wait until `start_worker`.
struct TestApp {
    app: Router,
    queues: Arc<Queues>,
    queue_name: String,
    worker: Option<RunningWorker>,
    // Last: keys are deleted after the worker has stopped.
    _prefix: Prefix,
}

struct RunningWorker {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), voxqueue::Error>>,
}

/// Every key under the prefix is deleted on drop, even when the test fails.
struct Prefix(String);

impl Drop for Prefix {
    fn drop(&mut self) {
        let Ok(client) = redis::Client::open(redis_url()) else {
            return;
        };
        let Ok(mut conn) = client.get_connection() else {
            return;
        };
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", self.0))
            .query(&mut conn)
            .unwrap_or_default();
        for key in keys {
            let _: Result<i64, _> = redis::cmd("DEL").arg(key).query(&mut conn);
        }
    }
}

fn espeak() -> EspeakSynthesizer {
    EspeakSynthesizer::new().expect("espeak-ng (see .ci/setup)")
}

impl TestApp {
    async fn start(setup: Setup) -> Self {
        let prefix = Prefix(format!("vqtest-api-{}", uuid::Uuid::new_v4().simple()));
        let queue_name = if setup.unique_queue {
            format!("speech-{}", uuid::Uuid::new_v4().simple())
        } else {
            "speech".to_owned()
        };
        let flags = QueueFlags {
            redis: redis_url(),
            queue: queue_name.clone(),
            prefix: prefix.0.clone(),
            store: StoreChoice::Redis,
        };
        let config = setup.config;
        let queues = Arc::new(
            Queues::connect(flags, config.dedup_ttl, config.result_ttl)
                .await
                .expect("connect to test Redis"),
        );
        if !setup.no_voices {
            let voice = espeak();
            let entry =
                WorkerVoices::new("registered", "espeak", &voice.voices(), voice.sample_rate());
            queues
                .catalog
                .register(&entry, Duration::from_secs(120))
                .await
                .expect("register voices");
        }
        let own = |keys: &[&str]| keys.iter().map(|k| k.to_string()).collect::<Vec<_>>();
        let keys = ApiKeys::new(
            &own(&setup.keys),
            &own(&setup.admin_keys),
            setup.metrics_token,
        );
        let state = AppState::new(queues.clone(), keys, config, recorder());
        let mut t = TestApp {
            app: app(state),
            queues,
            queue_name,
            worker: None,
            _prefix: prefix,
        };
        if setup.worker {
            t.start_worker().await;
        }
        t
    }

    /// A worker with the offline voice, as `--with-worker` runs it.
    async fn start_worker(&mut self) {
        let run = espeak_worker(&self.queues, espeak())
            .await
            .expect("worker setup");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(run(Box::pin(async {
            let _ = stopped.await;
        })));
        self.worker = Some(RunningWorker { stop, task });
    }

    async fn send(&self, request: Request<Body>) -> Response {
        self.app
            .clone()
            .oneshot(request)
            .await
            .expect("the router is infallible")
    }

    async fn get(&self, path: &str) -> Response {
        self.send(request(Method::GET, path, None, Body::empty()))
            .await
    }

    async fn submit(&self, body: Value) -> Response {
        self.post("/v1/speech", body).await
    }

    async fn post(&self, path: &str, body: Value) -> Response {
        self.send(request(
            Method::POST,
            path,
            None,
            Body::from(body.to_string()),
        ))
        .await
    }

    async fn submit_id(&self, body: Value) -> String {
        let response = self.submit(body).await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        json_body(response).await["id"]
            .as_str()
            .expect("an id")
            .to_owned()
    }

    /// Polls the job's status until it is `state`.
    async fn until_state(&self, id: &str, state: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let body = json_body(self.get(&format!("/v1/jobs/{id}")).await).await;
            if body["state"] == state {
                return body;
            }
            assert!(Instant::now() < deadline, "job never {state}: {body}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A job in the dead letters: its voice's backend (`ghost`) has a worker that
    /// refuses every job permanently, and stops once the job is dead. Requeued, the job
    /// then waits (no ghost worker runs any more).
    async fn dead_job(&self, text: &str) -> String {
        let ghost = WorkerVoices::new("ghost-1", "ghost", &[Voice::new("ghost", "Ghost")], 22_050);
        self.queues
            .catalog
            .register(&ghost, Duration::from_secs(60))
            .await
            .unwrap();
        let id = self
            .submit_id(json!({ "text": text, "voice": "ghost" }))
            .await;
        let queue = self.queues.backend("ghost").await.unwrap().queue;
        let refuse = handler_fn(|_: SynthesisRequest, _: JobContext| async {
            Err::<(), _>(JobError::permanent("the ghost backend refuses"))
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let worker = tokio::spawn(Worker::builder(queue).build(refuse).run_until(async {
            let _ = stopped.await;
        }));
        self.until_state(&id, "dead").await;
        let _ = stop.send(());
        worker.await.unwrap().unwrap();
        id
    }

    /// Serves the router on a local port, as the real program does.
    async fn serve(&self) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = self.app.clone();
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    async fn stop(mut self) {
        if let Some(worker) = self.worker.take() {
            let _ = worker.stop.send(());
            worker.task.await.expect("worker task").expect("worker");
        }
    }
}

fn request(method: Method, path: &str, key: Option<&str>, body: Body) -> Request<Body> {
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(key) = key {
        builder = builder.header(header::AUTHORIZATION, format!("Bearer {key}"));
    }
    builder.body(body).expect("a valid request")
}

async fn body_bytes(response: Response) -> Vec<u8> {
    to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("read body")
        .to_vec()
}

async fn json_body(response: Response) -> Value {
    serde_json::from_slice(&body_bytes(response).await).expect("a JSON body")
}

fn hello(text: &str) -> Value {
    json!({ "text": text, "voice": "en-us" })
}

fn speech(input: &str) -> Value {
    json!({ "model": "tts-1", "input": input, "voice": "en-us" })
}

#[tokio::test]
async fn submitted_speech_becomes_a_wav_with_captions() {
    let t = TestApp::start(Setup {
        worker: true,
        ..Setup::default()
    })
    .await;
    let id = t
        .submit_id(
            json!({ "text": "Hello there. This is a test.", "voice": "en-us", "priority": "high" }),
        )
        .await;
    t.until_state(&id, "completed").await;

    let response = t.get(&format!("/v1/jobs/{id}/audio")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()[header::CONTENT_TYPE], "audio/wav");
    let length: usize = response.headers()[header::CONTENT_LENGTH]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let wav = body_bytes(response).await;
    assert_eq!(wav.len(), length);
    let audio = tts::decode_wav(&wav).expect("a WAV file");
    assert!(
        audio.duration() > Duration::from_millis(500),
        "{:?}",
        audio.duration()
    );

    let srt = body_bytes(t.get(&format!("/v1/jobs/{id}/captions.srt")).await).await;
    assert!(String::from_utf8(srt).unwrap().contains(" --> "));
    let vtt = t.get(&format!("/v1/jobs/{id}/captions.vtt")).await;
    assert_eq!(
        vtt.headers()[header::CONTENT_TYPE],
        "text/vtt; charset=utf-8"
    );
    assert!(
        String::from_utf8(body_bytes(vtt).await)
            .unwrap()
            .starts_with("WEBVTT")
    );

    let status = json_body(t.get(&format!("/v1/jobs/{id}")).await).await;
    assert_eq!(status["attempts"], 1);
    assert_eq!(status["backend"], "espeak");
    assert!(status["finished_at"].as_str().unwrap().ends_with('Z'));

    // The same request again: answered by the finished job, at once, with ?wait.
    let response = t
        .post(
            "/v1/speech?wait=10",
            json!({ "text": "Hello  there. This is a test.", "voice": "en-us" }),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let again = json_body(response).await;
    assert_eq!(again["duplicate_of"], id.as_str());
    assert_eq!(again["result"]["mime_type"], "audio/wav");
    assert_eq!(again["result"]["audio_url"], format!("/v1/jobs/{id}/audio"));
    assert_eq!(again["result"]["captions"][1]["text"], "This is a test.");
    t.stop().await;
}

#[tokio::test]
async fn invalid_requests_are_refused_with_the_reason() {
    let t = TestApp::start(Setup::default()).await;
    for (body, status) in [
        (hello(""), StatusCode::UNPROCESSABLE_ENTITY),
        (
            json!({ "text": "hi", "voice": "no-such-voice" }),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({ "text": "hi", "voice": "en-us", "speed": 50.0 }),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({ "voice": "en-us" }),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({ "text": "hi", "voice": "en-us", "priority": "urgent" }),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({ "text": "hi", "voice": "en-us", "result_ttl": 1e9 }),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({ "text": "hi", "voice": "en-us", "ttl": -1 }),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
    ] {
        let response = t.submit(body.clone()).await;
        assert_eq!(response.status(), status, "{body}");
        let error = json_body(response).await;
        assert_eq!(error["error"]["code"], "invalid_request", "{error}");
        assert!(!error["error"]["message"].as_str().unwrap().is_empty());
    }
    let response = t
        .send(request(
            Method::POST,
            "/v1/speech",
            None,
            Body::from("{not json"),
        ))
        .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(json_body(response).await["error"]["code"], "bad_request");
}

#[tokio::test]
async fn unknown_jobs_are_404() {
    let t = TestApp::start(Setup::default()).await;
    // A backend queue exists (one job), so the lookup has somewhere to look.
    t.submit_id(hello("Make the queue.")).await;
    let id = JobId::generate();
    for path in [
        format!("/v1/jobs/{id}"),
        format!("/v1/jobs/{id}/audio"),
        format!("/v1/jobs/{id}/captions.srt"),
        format!("/v1/jobs/{id}/events"),
        format!("/v1/jobs/{id}/stream"),
    ] {
        let response = t.get(&path).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
        assert_eq!(json_body(response).await["error"]["code"], "not_found");
    }
    let response = t
        .send(request(
            Method::DELETE,
            &format!("/v1/jobs/{id}"),
            None,
            Body::empty(),
        ))
        .await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(t.get("/v2/nothing").await.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_wrong_or_missing_key_is_401_and_metrics_want_their_token() {
    let t = TestApp::start(Setup {
        keys: vec!["secret-one", "secret-two"],
        admin_keys: vec!["boss"],
        metrics_token: Some("scraper"),
        ..Setup::default()
    })
    .await;
    let path = format!("/v1/jobs/{}", JobId::generate());
    for key in [None, Some("wrong"), Some("")] {
        let response = t
            .send(request(Method::GET, &path, key, Body::empty()))
            .await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{key:?}");
        assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer");
        assert_eq!(json_body(response).await["error"]["code"], "unauthorized");
    }
    // A right key gets through to the route (an unknown job: 404).
    for key in ["secret-two", "boss"] {
        let response = t
            .send(request(Method::GET, &path, Some(key), Body::empty()))
            .await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{key}");
    }
    // Admin routes want an admin key.
    let stats = |key| request(Method::GET, "/v1/admin/stats", key, Body::empty());
    assert_eq!(
        t.send(stats(Some("secret-one"))).await.status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(t.send(stats(None)).await.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(t.send(stats(Some("boss"))).await.status(), StatusCode::OK);
    // Probes stay open; the scraper needs its token (or an admin key).
    assert_eq!(t.get("/healthz").await.status(), StatusCode::OK);
    let metrics = |key| request(Method::GET, "/metrics", key, Body::empty());
    assert_eq!(
        t.send(metrics(None)).await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        t.send(metrics(Some("secret-one"))).await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        t.send(metrics(Some("scraper"))).await.status(),
        StatusCode::OK
    );
    assert_eq!(t.send(metrics(Some("boss"))).await.status(), StatusCode::OK);
    // The dashboard asks for a key instead of showing the queues.
    let page = String::from_utf8(body_bytes(t.get("/").await).await).unwrap();
    assert!(page.contains("needs an admin key"), "{page}");
    let page = t
        .send(
            Request::builder()
                .uri("/")
                .header(header::COOKIE, "vq_key=boss")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    let page = String::from_utf8(body_bytes(page).await).unwrap();
    assert!(page.contains("Playground"), "{page}");
}

#[tokio::test]
async fn over_the_rate_limit_is_429_with_retry_after() {
    let t = TestApp::start(Setup {
        config: Config {
            rate: Some(Rate {
                limit: 2,
                period: Duration::from_secs(60),
            }),
            ..Config::default()
        },
        ..Setup::default()
    })
    .await;
    for n in 0..2 {
        let response = t.submit(hello(&format!("Sentence number {n}."))).await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
    }
    // A duplicate creates no work, so it is not counted.
    let response = t.submit(hello("Sentence number 0.")).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);

    let response = t.submit(hello("One too many.")).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = response.headers()[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // Two per minute is one every 30 s: the next slot is 30 s (rounded up) away.
    assert!((29..=30).contains(&retry_after), "{retry_after}");
    assert_eq!(json_body(response).await["error"]["code"], "rate_limited");
}

#[tokio::test]
async fn reads_have_their_own_rate_limit() {
    let t = TestApp::start(Setup {
        config: Config {
            read_rate: Some(Rate {
                limit: 2,
                period: Duration::from_secs(60),
            }),
            ..Config::default()
        },
        ..Setup::default()
    })
    .await;
    for _ in 0..2 {
        assert_eq!(t.get("/v1/voices").await.status(), StatusCode::OK);
    }
    let response = t.get("/v1/voices").await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()[header::RETRY_AFTER], "30");
    // Writes are not reads.
    assert_eq!(
        t.submit(hello("Still accepted.")).await.status(),
        StatusCode::ACCEPTED
    );
}

#[tokio::test]
async fn a_waiting_job_can_be_cancelled() {
    let t = TestApp::start(Setup::default()).await;
    let id = t.submit_id(hello("Never spoken.")).await;
    let delete = || {
        request(
            Method::DELETE,
            &format!("/v1/jobs/{id}"),
            None,
            Body::empty(),
        )
    };

    let response = t.send(delete()).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body = json_body(response).await;
    assert_eq!(
        (body["outcome"].as_str(), body["state"].as_str()),
        (Some("cancelled"), Some("cancelled"))
    );

    let body = json_body(t.send(delete()).await).await;
    assert_eq!(body["outcome"], "already_finished");
    let response = t.get(&format!("/v1/jobs/{id}/audio")).await;
    assert_eq!(response.status(), StatusCode::CONFLICT);
    let error = json_body(response).await;
    assert_eq!(error["error"]["state"], "cancelled", "{error}");
}

#[tokio::test]
async fn healthz_reports_redis_and_workers() {
    let t = TestApp::start(Setup::default()).await;
    let response = t.get("/healthz").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        json_body(response).await,
        json!({ "redis": "ok", "workers": 0 })
    );
}

/// `name{queue="..."} value` from Prometheus text; 0 when absent.
fn sample(text: &str, name: &str, queue: &str) -> u64 {
    let prefix = format!("{name}{{queue=\"{queue}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |v| v.trim().parse().expect("a counter value"))
}

#[tokio::test]
async fn metrics_are_prometheus_text_with_queue_counters() {
    // A queue name of its own: the recorder is shared with every other test.
    let t = TestApp::start(Setup {
        unique_queue: true,
        ..Setup::default()
    })
    .await;
    let queue = format!("{}.espeak", t.queue_name);
    let before = String::from_utf8(body_bytes(t.get("/metrics").await).await).unwrap();
    let response = t.submit(hello("Count me.")).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let response = t.get("/metrics").await;
    assert_eq!(response.status(), StatusCode::OK);
    let text = String::from_utf8(body_bytes(response).await).unwrap();
    assert_eq!(
        sample(&text, "voxqueue_jobs_enqueued_total", &queue),
        sample(&before, "voxqueue_jobs_enqueued_total", &queue) + 1,
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "voxqueue_queue_jobs{{queue=\"{queue}\",state=\"queued\"}} 1"
        )),
        "{text}"
    );
}

#[tokio::test]
async fn event_stream_ends_with_completed() {
    // No worker yet: the subscription starts while the job waits, so the stream
    // carries the live events, not only a final state.
    let mut t = TestApp::start(Setup::default()).await;
    let id = t
        .submit_id(hello("Tell me when it is done. Then stop."))
        .await;
    let response = t.get(&format!("/v1/jobs/{id}/events")).await;
    t.start_worker().await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "text/event-stream"
    );
    // The stream ends by itself after the terminal event; the timeout only guards
    // against a hang.
    let body = tokio::time::timeout(Duration::from_secs(20), body_bytes(response))
        .await
        .expect("the stream ended");
    let text = String::from_utf8(body).unwrap();
    let names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(names.first(), Some(&"state"), "{text}");
    assert!(text.contains(r#""state":"queued""#), "{text}");
    assert!(
        names.contains(&"active") && names.contains(&"progress"),
        "{text}"
    );
    assert_eq!(names.last(), Some(&"completed"), "{text}");

    // A late subscriber gets the final state and the end at once.
    let late = t.get(&format!("/v1/jobs/{id}/events")).await;
    let text = String::from_utf8(body_bytes(late).await).unwrap();
    assert!(
        text.contains("event: state") && text.contains(r#""state":"completed""#),
        "{text}"
    );
    t.stop().await;
}

#[tokio::test]
async fn voices_and_models_come_from_live_workers() {
    let t = TestApp::start(Setup::default()).await;
    let voices = json_body(t.get("/v1/voices").await).await;
    let en = voices["voices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["id"] == "en-us")
        .expect("en-us is registered");
    assert_eq!(
        (en["backend"].as_str(), en["sample_rate"].as_u64()),
        (Some("espeak"), Some(22_050))
    );
    let models = json_body(t.get("/v1/models").await).await;
    assert_eq!(
        models,
        json!({ "object": "list", "data": [{ "id": "espeak", "object": "model", "owned_by": "voxqueue" }] })
    );

    // Another backend's worker registers: its voice routes to its own queue.
    let parler = WorkerVoices::new(
        "gpu-1",
        "parler",
        &[Voice::new("parler-default", "Parler")],
        44_100,
    );
    t.queues
        .catalog
        .register(&parler, Duration::from_secs(60))
        .await
        .unwrap();
    let id = t
        .submit_id(json!({ "text": "Hi.", "voice": "parler-default" }))
        .await;
    let status = json_body(t.get(&format!("/v1/jobs/{id}")).await).await;
    assert_eq!(status["backend"], "parler");
    let stats = json_body(t.get("/v1/admin/stats").await).await;
    assert_eq!(
        (
            stats["queues"]["parler"]["queued"].as_u64(),
            stats["queues"]["espeak"]["queued"].as_u64()
        ),
        (Some(1), Some(0))
    );

    // It stops: its voice is refused, naming the ones that remain.
    t.queues.catalog.unregister("gpu-1").await.unwrap();
    let response = t
        .submit(json!({ "text": "Hi.", "voice": "parler-default" }))
        .await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let message = json_body(response).await["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        message.contains("\"parler-default\"") && message.contains("en-us"),
        "{message}"
    );
}

/// The ids of the workers the catalogue lists as live.
async fn live_workers(catalog: &tts::Catalog) -> Vec<String> {
    let workers = catalog.workers().await.unwrap();
    workers.into_iter().map(|w| w.worker).collect()
}

/// Waits (10 s at most) until the catalogue lists a live worker.
async fn until_listed(catalog: &tts::Catalog) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while live_workers(catalog).await.is_empty() {
        assert!(Instant::now() < deadline, "the worker never registered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_worker_leaves_the_catalogue_when_it_stops_or_dies() {
    let mut t = TestApp::start(Setup {
        no_voices: true,
        ..Setup::default()
    })
    .await;
    // A worker that stops gracefully unregisters at once.
    t.start_worker().await;
    until_listed(&t.queues.catalog).await;
    let worker = t.worker.take().unwrap();
    let _ = worker.stop.send(());
    worker.task.await.unwrap().unwrap();
    assert_eq!(live_workers(&t.queues.catalog).await, Vec::<String>::new());

    // One that dies without a word is gone when its TTL runs out, by Redis's clock.
    let entry = WorkerVoices::new("crashed", "espeak", &[Voice::new("en-us", "E")], 22_050);
    t.queues
        .catalog
        .register(&entry, Duration::from_millis(300))
        .await
        .unwrap();
    assert_eq!(
        live_workers(&t.queues.catalog).await,
        vec!["crashed".to_owned()]
    );
    let registered = Instant::now();
    while !live_workers(&t.queues.catalog).await.is_empty() {
        assert!(
            registered.elapsed() < Duration::from_secs(2),
            "the dead worker's voices stayed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(registered.elapsed() >= Duration::from_millis(250));
    let response = t.submit(hello("Anyone left?")).await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
}

/// A live worker stays listed past its entry's TTL because it refreshes the entry
/// every third of it, and leaves the list as soon as it stops.
#[tokio::test]
async fn a_registered_worker_refreshes_its_entry_before_it_runs_out() {
    let t = TestApp::start(Setup {
        no_voices: true,
        ..Setup::default()
    })
    .await;
    let catalog = t.queues.catalog.clone();
    let entry = WorkerVoices::new("steady", "espeak", &[Voice::new("en-us", "E")], 22_050);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(catalog.clone().keep_registered(
        entry,
        Duration::from_secs(1),
        async move {
            let _ = stopped.await;
        },
    ));
    until_listed(&catalog).await;
    // Two and a half TTLs: an entry refreshed less often than its TTL would vanish.
    let registered = Instant::now();
    while registered.elapsed() < Duration::from_millis(2_500) {
        assert_eq!(
            live_workers(&catalog).await,
            vec!["steady".to_owned()],
            "gone {:?} after registering",
            registered.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop.send(());
    task.await.unwrap();
    assert_eq!(live_workers(&catalog).await, Vec::<String>::new());
}

#[tokio::test]
async fn no_live_worker_means_no_voice() {
    let t = TestApp::start(Setup {
        no_voices: true,
        ..Setup::default()
    })
    .await;
    let response = t.submit(hello("Anyone?")).await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let error = json_body(response).await;
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no worker is running"),
        "{error}"
    );
}

/// Whether `.ci/fetch-voices` has fetched the Piper and Kokoro voices; when it has not,
/// says so and which test is skipped (a machine without them runs every other test).
fn fetched_neural_voices(test: &str) -> bool {
    if !cfg!(feature = "candle") {
        eprintln!("skipping {test}: this build has no `candle` feature");
        return false;
    }
    let missing: Vec<String> = [
        crate::common::fetched_piper_voice(),
        crate::common::fetched_kokoro_model(),
    ]
    .iter()
    .filter(|p| !p.exists())
    .map(|p| p.display().to_string())
    .collect();
    if !missing.is_empty() {
        eprintln!(
            "skipping {test}: {} missing (run .ci/fetch-voices)",
            missing.join(", ")
        );
    }
    missing.is_empty()
}

/// `--with-worker`'s workers, each running until its sender is dropped or sent to.
fn run_workers(workers: Vec<(&'static str, crate::state::WorkerRun)>) -> Vec<RunningWorker> {
    workers
        .into_iter()
        .map(|(_, run)| {
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(run(Box::pin(async {
                let _ = stopped.await;
            })));
            RunningWorker { stop, task }
        })
        .collect()
}

#[tokio::test]
async fn with_worker_lists_every_backends_voices_and_speaks_kokoro() {
    let test = "with_worker_lists_every_backends_voices_and_speaks_kokoro";
    if !fetched_neural_voices(test) {
        return;
    }
    let t = TestApp::start(Setup {
        no_voices: true,
        ..Setup::default()
    })
    .await;
    let workers = crate::in_process_workers(&t.queues, &crate::NeuralVoices::default())
        .await
        .expect("every fetched voice loads");
    let names: Vec<&str> = workers.iter().map(|(name, _)| *name).collect();
    assert_eq!(names, ["espeak-ng", "piper", "kokoro"]);
    let running = run_workers(workers);

    let deadline = Instant::now() + Duration::from_secs(20);
    let voices = loop {
        let body = json_body(t.get("/v1/voices").await).await;
        let listed = body["voices"].as_array().unwrap();
        let mut backends: Vec<&str> = listed
            .iter()
            .map(|v| v["backend"].as_str().unwrap())
            .collect();
        backends.sort_unstable();
        backends.dedup();
        if backends == ["espeak", "kokoro", "piper"] {
            break listed.clone();
        }
        assert!(
            Instant::now() < deadline,
            "not every backend registered: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let listed = |id: &str| {
        let v = voices
            .iter()
            .find(|v| v["id"] == id)
            .unwrap_or_else(|| panic!("{id} is not listed"));
        (
            v["backend"].as_str().unwrap().to_owned(),
            v["sample_rate"].as_u64().unwrap(),
            v["language"].as_str().map(str::to_owned),
        )
    };
    let us = Some("en-US".to_owned());
    let gb = Some("en-GB".to_owned());
    assert_eq!(listed("en-us").0, "espeak");
    assert_eq!(
        (listed("en_US-joe-medium").0, listed("en_US-joe-medium").1),
        ("piper".to_owned(), 22_050)
    );
    assert_eq!(
        listed("af_heart"),
        ("kokoro".to_owned(), 24_000, us.clone())
    );
    assert_eq!(listed("am_adam"), ("kokoro".to_owned(), 24_000, us));
    assert_eq!(listed("bf_emma"), ("kokoro".to_owned(), 24_000, gb));
    let mut kokoro: Vec<&str> = voices
        .iter()
        .filter(|v| v["backend"] == "kokoro")
        .map(|v| v["id"].as_str().unwrap())
        .collect();
    kokoro.sort_unstable();
    assert_eq!(
        kokoro,
        [
            "af_bella",
            "af_heart",
            "af_nicole",
            "af_sarah",
            "af_sky",
            "am_adam",
            "am_michael",
            "bf_emma",
            "bf_isabella",
            "bm_george",
            "bm_lewis"
        ],
        "the eleven packs .ci/fetch-voices fetches"
    );
    let models = json_body(t.get("/v1/models").await).await;
    let models: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(models, ["espeak", "kokoro", "piper"]);

    // A Kokoro voice speaks through the OpenAI route: 24 kHz audio that is not silence.
    let body = json!({ "model": "kokoro", "input": "Hello from Kokoro.", "voice": "af_heart" });
    let response = t.post("/v1/audio/speech", body).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-sample-rate"], "24000");
    let audio = parse_wav(&body_bytes(response).await);
    assert_eq!(audio.sample_rate, 24_000);
    assert!(
        audio.duration() > Duration::from_millis(500),
        "{:?}",
        audio.duration()
    );
    let rms =
        (audio.samples.iter().map(|s| s * s).sum::<f32>() / audio.samples.len() as f32).sqrt();
    assert!(rms > 0.01, "near-silent audio: RMS {rms}");

    for worker in running {
        let _ = worker.stop.send(());
        worker.task.await.expect("worker task").expect("worker");
    }
}

#[cfg(feature = "candle")]
#[test]
fn a_voice_not_fetched_is_left_out_with_the_reason_and_a_given_one_is_kept() {
    let nowhere = std::path::PathBuf::from("/nonexistent/voxqueue/kokoro-v1.0.int8.onnx");
    let reason = crate::voice_file(None, nowhere.clone(), "Kokoro").unwrap_err();
    assert_eq!(
        reason,
        "no Kokoro voice at /nonexistent/voxqueue/kokoro-v1.0.int8.onnx (run .ci/fetch-voices to fetch it)"
    );
    // Asked for by name, it is kept: loading it then fails, naming the file.
    let given = std::path::Path::new("/elsewhere/model.onnx");
    assert_eq!(
        crate::voice_file(Some(given), nowhere, "Kokoro"),
        Ok(given.to_owned())
    );
    // Where it was fetched, it is found.
    let fetched = tempfile::NamedTempFile::new().unwrap();
    assert_eq!(
        crate::voice_file(None, fetched.path().to_owned(), "Piper"),
        Ok(fetched.path().to_owned())
    );
}

#[cfg(feature = "candle")]
#[tokio::test]
async fn with_worker_fails_naming_a_given_voice_file_that_is_not_there() {
    let t = TestApp::start(Setup {
        no_voices: true,
        ..Setup::default()
    })
    .await;
    let voices = crate::NeuralVoices {
        piper_voice: Some("/nonexistent/voxqueue/piper.onnx".into()),
        kokoro_model: Some("/nonexistent/voxqueue/kokoro.onnx".into()),
        kokoro_voices: None,
    };
    let error = match crate::in_process_workers(&t.queues, &voices).await {
        Ok(_) => panic!("a missing voice file that was asked for must fail the start"),
        Err(e) => e.to_string(),
    };
    assert!(
        error.contains("/nonexistent/voxqueue/piper.onnx"),
        "{error}"
    );
}

#[tokio::test]
async fn custom_voices_are_named_by_an_admin_and_resolve_to_their_base() {
    let t = TestApp::start(Setup {
        keys: vec!["user"],
        admin_keys: vec!["boss"],
        ..Setup::default()
    })
    .await;
    let narrator = json!({ "name": "narrator", "voice": "en-us", "style": "calm and slow", "description": "for audiobooks" });
    let create = |key| {
        request(
            Method::POST,
            "/v1/voices",
            Some(key),
            Body::from(narrator.to_string()),
        )
    };
    assert_eq!(t.send(create("user")).await.status(), StatusCode::FORBIDDEN);
    let response = t.send(create("boss")).await;
    assert_eq!(response.status(), StatusCode::CREATED);

    let voices = t
        .send(request(
            Method::GET,
            "/v1/voices",
            Some("user"),
            Body::empty(),
        ))
        .await;
    assert_eq!(json_body(voices).await["custom"][0]["name"], "narrator");
    let response = t
        .send(request(
            Method::POST,
            "/v1/speech",
            Some("user"),
            Body::from(json!({ "text": "Once upon a time.", "voice": "narrator" }).to_string()),
        ))
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_eq!(json_body(response).await["backend"], "espeak");

    // A custom voice cannot shadow a backend voice, nor stand on a voice nobody speaks.
    for body in [
        json!({ "name": "en-us", "voice": "en-us" }),
        json!({ "name": "ghost", "voice": "nobody" }),
    ] {
        let response = t
            .send(request(
                Method::POST,
                "/v1/voices",
                Some("boss"),
                Body::from(body.to_string()),
            ))
            .await;
        assert_eq!(
            response.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "{body}"
        );
    }
    let delete = || {
        request(
            Method::DELETE,
            "/v1/voices/narrator",
            Some("boss"),
            Body::empty(),
        )
    };
    assert_eq!(t.send(delete()).await.status(), StatusCode::NO_CONTENT);
    // Gone: a second delete finds nothing.
    assert_eq!(t.send(delete()).await.status(), StatusCode::NOT_FOUND);
}

/// The same samples, or where they differ (without printing seconds of audio).
fn assert_same_samples(a: &tts::Audio, b: &tts::Audio) {
    let first = a.samples.iter().zip(&b.samples).position(|(x, y)| x != y);
    assert!(
        a.samples.len() == b.samples.len() && first.is_none(),
        "lengths {} and {}, first difference at {first:?}",
        a.samples.len(),
        b.samples.len()
    );
}

/// Parses a streamed WAV body (placeholder lengths) into audio.
fn parse_wav(bytes: &[u8]) -> tts::Audio {
    tts::decode_wav(bytes).expect("a WAV stream")
}

#[tokio::test]
async fn openai_speech_streams_wav_and_then_serves_the_same_from_the_store() {
    let t = TestApp::start(Setup {
        worker: true,
        ..Setup::default()
    })
    .await;
    let text = "The first sentence. The second one. And a third.";
    let response = t.post("/v1/audio/speech", speech(text)).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()[header::CONTENT_TYPE], "audio/wav");
    assert_eq!(response.headers()["x-sample-rate"], "22050");
    let id = response.headers()["x-job-id"].to_str().unwrap().to_owned();
    let streamed = body_bytes(response).await;
    let audio = parse_wav(&streamed);
    assert_eq!(audio.sample_rate, 22_050);
    assert!(
        audio.duration() > Duration::from_secs(1),
        "{:?}",
        audio.duration()
    );

    // Finished now: the same request is answered from the store, with the same samples.
    t.until_state(&id, "completed").await;
    let response = t.post("/v1/audio/speech", speech(text)).await;
    assert_eq!(response.headers()["x-job-id"], id.as_str());
    let again = body_bytes(response).await;
    assert_same_samples(&parse_wav(&again), &audio);
    let stored = body_bytes(t.get(&format!("/v1/jobs/{id}/audio")).await).await;
    assert_same_samples(&parse_wav(&stored), &audio);
    t.stop().await;
}

#[tokio::test]
async fn a_duplicate_of_a_job_in_flight_streams_the_same_audio() {
    let mut t = TestApp::start(Setup::default()).await;
    let text = "Two callers ask. One job answers. Both hear it.";
    // Both ask before any worker runs: the second is a duplicate of the first.
    let (a, b) = tokio::join!(
        t.post("/v1/audio/speech", speech(text)),
        t.post("/v1/audio/speech", speech(text))
    );
    assert_eq!(a.headers()["x-job-id"], b.headers()["x-job-id"]);
    t.start_worker().await;
    let (a, b) = tokio::join!(body_bytes(a), body_bytes(b));
    assert!(parse_wav(&a).duration() > Duration::from_secs(1));
    assert_eq!(a, b);
    t.stop().await;
}

#[tokio::test]
async fn openai_speech_as_sse_and_as_pcm() {
    let t = TestApp::start(Setup {
        worker: true,
        ..Setup::default()
    })
    .await;
    let body = json!({ "model": "espeak", "input": "Stream me as events. Then stop.", "voice": "en-us", "stream_format": "sse" });
    let response = t.post("/v1/audio/speech", body).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "text/event-stream"
    );
    let text = String::from_utf8(body_bytes(response).await).unwrap();
    let mut wav = Vec::new();
    let mut names = Vec::new();
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("event: ") {
            names.push(name.to_owned());
        }
        if let Some(data) = line.strip_prefix("data: ") {
            let event: Value = serde_json::from_str(data).unwrap();
            if event["type"] == "speech.audio.delta" {
                let chunk = base64::engine::general_purpose::STANDARD
                    .decode(event["audio"].as_str().unwrap())
                    .unwrap();
                wav.extend(chunk);
            }
        }
    }
    assert_eq!(
        names.last().map(String::as_str),
        Some("speech.audio.done"),
        "{text}"
    );
    assert!(
        names.iter().filter(|n| *n == "speech.audio.delta").count() >= 2,
        "{text}"
    );
    assert!(parse_wav(&wav).duration() > Duration::from_millis(500));

    let body = json!({ "model": "tts-1", "input": "Raw samples, please.", "voice": "en-us", "response_format": "pcm" });
    let response = t.post("/v1/audio/speech", body).await;
    assert_eq!(response.headers()[header::CONTENT_TYPE], "audio/pcm");
    assert_eq!(response.headers()["x-sample-rate"], "22050");
    let pcm = body_bytes(response).await;
    assert!(pcm.len() > 22_050 && pcm.len() % 2 == 0, "{}", pcm.len());

    // The same job as FLAC: one file, lossless, so its samples are the PCM's.
    let body = json!({ "model": "tts-1", "input": "Raw samples, please.", "voice": "en-us", "response_format": "flac" });
    let response = t.post("/v1/audio/speech", body).await;
    assert_eq!(response.headers()[header::CONTENT_TYPE], "audio/flac");
    let flac = body_bytes(response).await;
    assert_eq!(&flac[..4], b"fLaC");
    assert!(flac.len() < pcm.len(), "{} >= {}", flac.len(), pcm.len());
    t.stop().await;
}

#[tokio::test]
async fn openai_speech_refuses_what_it_cannot_do() {
    let t = TestApp::start(Setup::default()).await;
    for (body, status, needle) in [
        (
            json!({ "model": "tts-1", "input": "x", "voice": "en-us", "response_format": "mp3" }),
            StatusCode::BAD_REQUEST,
            "or \"flac\"",
        ),
        (
            json!({ "model": "tts-1", "input": "x", "voice": "en-us", "stream_format": "chunks" }),
            StatusCode::BAD_REQUEST,
            "\"audio\" or \"sse\"",
        ),
        (
            json!({ "model": "tts-1", "input": "x".repeat(4097), "voice": "en-us" }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "at most 4096",
        ),
        (
            json!({ "model": "tts-1", "input": "x", "voice": "en-us", "speed": 4.5 }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "0.25 to 4",
        ),
        (
            json!({ "model": "parler", "input": "x", "voice": "en-us" }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "spoken by \"espeak\"",
        ),
        (
            json!({ "model": "tts-1", "input": "x", "voice": "alloy" }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "the live workers speak",
        ),
    ] {
        let response = t.post("/v1/audio/speech", body.clone()).await;
        assert_eq!(response.status(), status, "{body}");
        let error = json_body(response).await;
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{message}");
    }
}

#[tokio::test]
async fn idempotency_key_names_the_job_and_ttls_are_kept() {
    let t = TestApp::start(Setup::default()).await;
    let send = || {
        Request::builder()
            .method(Method::POST)
            .uri("/v1/speech")
            .header(header::CONTENT_TYPE, "application/json")
            .header("idempotency-key", "order-42")
            .body(Body::from(
                json!({ "text": "Once.", "voice": "en-us", "ttl": 600 }).to_string(),
            ))
            .unwrap()
    };
    let first = json_body(t.send(send()).await).await;
    assert_eq!(first["id"], "order-42");
    let second = json_body(t.send(send()).await).await;
    assert_eq!(second["duplicate_of"], "order-42");
    let status = json_body(t.get("/v1/jobs/order-42").await).await;
    assert!(status["expires_at"].is_string(), "{status}");
    // `id` in the body does the same.
    let body = json!({ "text": "Twice.", "voice": "en-us", "id": "order-43" });
    assert_eq!(json_body(t.submit(body).await).await["id"], "order-43");
}

#[tokio::test]
async fn audio_has_an_etag_and_ranges() {
    let t = TestApp::start(Setup {
        worker: true,
        ..Setup::default()
    })
    .await;
    let id = t.submit_id(hello("Seek in me.")).await;
    t.until_state(&id, "completed").await;
    let path = format!("/v1/jobs/{id}/audio");
    let full = t.get(&path).await;
    let etag = full.headers()[header::ETAG].clone();
    let bytes = body_bytes(full).await;

    let ranged = t
        .send(
            Request::builder()
                .uri(&path)
                .header(header::RANGE, "bytes=0-43")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(ranged.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        ranged.headers()[header::CONTENT_RANGE].to_str().unwrap(),
        format!("bytes 0-43/{}", bytes.len())
    );
    assert_eq!(body_bytes(ranged).await, bytes[..44]);

    let cached = t
        .send(
            Request::builder()
                .uri(&path)
                .header(header::IF_NONE_MATCH, etag)
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(cached.status(), StatusCode::NOT_MODIFIED);
    let beyond = t
        .send(
            Request::builder()
                .uri(&path)
                .header(header::RANGE, format!("bytes={}-", bytes.len()))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(beyond.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    t.stop().await;
}

#[tokio::test]
async fn dead_letters_are_listed_with_errors_requeued_and_purged() {
    let t = TestApp::start(Setup::default()).await;
    let purged = t.dead_job("Boo.").await;
    let response = t
        .send(request(
            Method::DELETE,
            &format!("/v1/admin/dead/{purged}"),
            None,
            Body::empty(),
        ))
        .await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        t.get(&format!("/v1/jobs/{purged}")).await.status(),
        StatusCode::NOT_FOUND
    );
    let id = t.dead_job("Boo again.").await;

    let dead = json_body(t.get("/v1/admin/dead").await).await;
    let job = &dead["dead"][0];
    assert_eq!(job["id"], id.as_str());
    assert_eq!(job["backend"], "ghost");
    assert_eq!(job["errors"][0]["kind"], "permanent", "{job}");
    assert_eq!(job["errors"][0]["message"], "the ghost backend refuses");

    let response = t
        .send(request(
            Method::POST,
            &format!("/v1/admin/dead/{id}/requeue"),
            None,
            Body::empty(),
        ))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    t.until_state(&id, "queued").await;
    assert_eq!(
        json_body(t.get("/v1/admin/dead").await).await["dead"],
        json!([])
    );
    let purge = || {
        request(
            Method::DELETE,
            &format!("/v1/admin/dead/{id}"),
            None,
            Body::empty(),
        )
    };
    // Not dead any more: nothing to purge.
    assert_eq!(t.send(purge()).await.status(), StatusCode::CONFLICT);
}

#[tokio::test]
async fn the_dashboard_is_live_through_sse() {
    let t = TestApp::start(Setup::default()).await;
    t.submit_id(hello("Show me on the dashboard.")).await;
    let page = String::from_utf8(body_bytes(t.get("/").await).await).unwrap();
    assert!(page.contains("new EventSource('/v1/admin/live')"));
    let snapshot = first_snapshot(&t).await;
    assert_eq!(snapshot["queues"]["espeak"]["queued"], 1, "{snapshot}");
    assert_eq!(snapshot["recent"][0]["text"], "Show me on the dashboard.");
    assert_eq!(snapshot["workers"][0]["worker"], "registered");
}

/// The first snapshot `/v1/admin/live` sends.
async fn first_snapshot(t: &TestApp) -> Value {
    let response = t.get("/v1/admin/live").await;
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "text/event-stream"
    );
    let mut body = response.into_body().into_data_stream();
    use futures::StreamExt;
    let mut text = String::new();
    while !text.contains("\n\n") {
        let chunk = tokio::time::timeout(Duration::from_secs(10), body.next())
            .await
            .expect("a snapshot in time")
            .expect("more body")
            .unwrap();
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let data = text
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .expect("a data line");
    serde_json::from_str(data).unwrap()
}

#[tokio::test]
async fn the_dashboard_shows_each_workers_current_jobs() {
    let t = TestApp::start(Setup::default()).await;
    // Enqueued and held elsewhere (another producer, another worker): this API
    // process never saw the job, the dashboard still shows who runs it.
    let queue = t.queues.backend("espeak").await.unwrap().queue.clone();
    let id = queue
        .enqueue(SynthesisRequest::new("What runs now?", "en-us"))
        .await
        .unwrap()
        .id
        .to_string();
    let hold = voxqueue::handler_fn(|_: SynthesisRequest, _: voxqueue::JobContext| async {
        std::future::pending::<Result<u32, voxqueue::JobError>>().await
    });
    let (stop, signal) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(
        voxqueue::Worker::builder(queue)
            .id("registered")
            .shutdown_grace(Duration::from_millis(50))
            .build(hold)
            .run_until(async {
                let _ = signal.await;
            }),
    );
    t.until_state(&id, "active").await;
    let snapshot = first_snapshot(&t).await;
    assert_eq!(snapshot["workers"][0]["worker"], "registered", "{snapshot}");
    assert_eq!(snapshot["workers"][0]["current"], json!([id.as_str()]));
    let _ = stop.send(());
    worker.await.unwrap().unwrap();
}

#[tokio::test]
async fn layers_request_ids_cors_and_body_limit() {
    let t = TestApp::start(Setup::default()).await;
    let response = t.get("/healthz").await;
    assert_eq!(response.headers()["x-request-id"].len(), 36);
    assert!(
        !response
            .headers()
            .contains_key("access-control-allow-origin")
    );
    let big = json!({ "text": "x".repeat(70_000), "voice": "en-us" });
    assert_eq!(t.submit(big).await.status(), StatusCode::PAYLOAD_TOO_LARGE);

    let t = TestApp::start(Setup {
        config: Config {
            cors_origins: vec!["https://app.example".into()],
            ..Config::default()
        },
        ..Setup::default()
    })
    .await;
    let response = t
        .send(
            Request::builder()
                .uri("/v1/voices")
                .header(header::ORIGIN, "https://app.example")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "https://app.example"
    );
}

#[test]
fn cookie_keys_are_percent_decoded() {
    assert_eq!(crate::auth::percent_decode("a%2Bb%3D%3D%zz"), "a+b==%zz");
}

#[test]
fn ranges_parse() {
    assert_eq!(byte_range("bytes=0-9", 100), Some((0, 9)));
    assert_eq!(byte_range("bytes=90-", 100), Some((90, 99)));
    assert_eq!(byte_range("bytes=-10", 100), Some((90, 99)));
    assert_eq!(byte_range("bytes=50-500", 100), Some((50, 99)));
    for bad in [
        "bytes=100-",
        "bytes=5-1",
        "bytes=0-1,3-4",
        "items=0-1",
        "bytes=x-",
    ] {
        assert_eq!(byte_range(bad, 100), None, "{bad}");
    }
}

#[test]
fn the_streaming_wav_header_says_until_the_end() {
    let header = streaming_wav_header(22_050);
    assert_eq!(header.len(), 44);
    let mut wav = header.clone();
    wav.extend([0x00, 0x40, 0x00, 0xC0]);
    let audio = tts::decode_wav(&wav).unwrap();
    assert_eq!(audio.sample_rate, 22_050);
    assert_eq!(audio.samples, vec![0.5, -0.5]);
}

#[test]
fn flags_parse() {
    assert_eq!(
        parse_rate("60/min"),
        Ok(Rate {
            limit: 60,
            period: Duration::from_secs(60)
        })
    );
    assert_eq!(
        parse_rate("5/10s"),
        Ok(Rate {
            limit: 5,
            period: Duration::from_secs(10)
        })
    );
    assert!(parse_rate("0/min").is_err() && parse_rate("60").is_err());
    assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
    assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
    assert_eq!(
        parse_store("dir:/tmp/a"),
        Ok(StoreChoice::Dir("/tmp/a".into()))
    );
    assert!(parse_store("s3").is_err());
}
