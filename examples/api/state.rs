//! What every handler shares: settings, the per-backend queues, keys, metrics.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::PrometheusHandle;
use voxqueue::tts::{
    self, AudioStream, Catalog, CatalogVoice, CustomVoice, EspeakSynthesizer, Limits, ResultStore,
    SynthesisRequest, Synthesizer, TtsHandler, WorkerVoices, backend_queue,
};
use voxqueue::{JobId, JobStatus, Queue, Worker};

use crate::auth::ApiKeys;
use crate::common::{QueueFlags, parse_duration};
use crate::error::ApiError;

/// A per-key rate: `limit` requests per `period`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Rate {
    pub(crate) limit: u32,
    pub(crate) period: Duration,
}

/// `60/min`, `1000/hour`, `5/10s`: a count, then a unit or a duration.
pub(crate) fn parse_rate(s: &str) -> Result<Rate, String> {
    let (limit, per) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?}: expected N/period, like 60/min"))?;
    let limit: u32 = limit
        .trim()
        .parse()
        .map_err(|e| format!("{s:?}: the count: {e}"))?;
    let period = match per.trim() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        "d" | "day" => Duration::from_secs(86_400),
        other => parse_duration(other)?,
    };
    if limit == 0 || period.is_zero() {
        return Err(format!("{s:?}: the count and the period must be non-zero"));
    }
    Ok(Rate { limit, period })
}

/// The operator's settings.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) rate: Option<Rate>,
    pub(crate) read_rate: Option<Rate>,
    pub(crate) result_ttl: Duration,
    pub(crate) max_result_ttl: Duration,
    pub(crate) max_job_ttl: Duration,
    pub(crate) dedup_ttl: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) max_concurrency: usize,
    pub(crate) max_body: usize,
    pub(crate) cors_origins: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            rate: None,
            read_rate: None,
            result_ttl: Duration::from_secs(86_400),
            max_result_ttl: Duration::from_secs(7 * 86_400),
            max_job_ttl: Duration::from_secs(86_400),
            dedup_ttl: Duration::from_secs(3600),
            request_timeout: Duration::from_secs(75),
            max_concurrency: 512,
            max_body: 64 * 1024,
            cors_origins: Vec::new(),
        }
    }
}

/// One backend's queue, with the store its workers write audio to and the streams
/// they publish it on (both under that queue's hash tag).
#[derive(Debug, Clone)]
pub(crate) struct Backend {
    pub(crate) name: String,
    pub(crate) queue: Queue<SynthesisRequest>,
    pub(crate) store: Arc<dyn ResultStore>,
    pub(crate) stream: AudioStream,
}

/// The base queue (which holds the voice catalogue) and one queue per backend, opened
/// when first needed.
#[derive(Debug)]
pub(crate) struct Queues {
    flags: QueueFlags,
    pub(crate) catalog: Catalog,
    dedup_ttl: Duration,
    result_ttl: Duration,
    backends: RwLock<HashMap<String, Backend>>,
}

impl Queues {
    pub(crate) async fn connect(
        flags: QueueFlags,
        dedup_ttl: Duration,
        result_ttl: Duration,
    ) -> Result<Self, voxqueue::Error> {
        let base = flags
            .builder::<SynthesisRequest>(&flags.queue)
            .connect()
            .await?;
        Ok(Queues {
            catalog: Catalog::new(&base),
            flags,
            dedup_ttl,
            result_ttl,
            backends: RwLock::default(),
        })
    }

    /// The queue of `backend`, connecting it on first use.
    pub(crate) async fn backend(&self, backend: &str) -> Result<Backend, ApiError> {
        if let Some(b) = self.backends.read().expect("lock").get(backend) {
            return Ok(b.clone());
        }
        // The validator checks bounds; voices were checked against the live catalogue.
        let queue = self
            .flags
            .builder::<SynthesisRequest>(&backend_queue(&self.flags.queue, backend))
            .result_ttl(self.result_ttl)
            .dedup(tts::deduplicator(self.dedup_ttl))
            .validate(tts::validator(limits(), Vec::new()))
            .connect()
            .await?;
        let b = Backend {
            name: backend.to_owned(),
            store: self.flags.store.open(&queue),
            stream: AudioStream::new(&queue),
            queue,
        };
        let mut all = self.backends.write().expect("lock");
        Ok(all.entry(backend.to_owned()).or_insert(b).clone())
    }

    /// Every backend a job may be in: those ever registered and those opened here.
    pub(crate) async fn all(&self) -> Result<Vec<Backend>, ApiError> {
        let mut names = self.catalog.backends().await?;
        names.extend(self.backends.read().expect("lock").keys().cloned());
        names.sort();
        names.dedup();
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            out.push(self.backend(&name).await?);
        }
        Ok(out)
    }

    /// The job `id`, in whichever backend queue holds it.
    pub(crate) async fn find(&self, id: &JobId) -> Result<(Backend, JobStatus), ApiError> {
        for backend in self.all().await? {
            match backend.queue.status(id).await {
                Ok(status) => return Ok((backend, status)),
                Err(voxqueue::Error::NotFound(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ApiError::not_found(id))
    }

    /// The live voice `name` (or the custom voice of that name, resolved to its base
    /// voice): a clear 422 naming the voices that exist when no live worker speaks it.
    pub(crate) async fn resolve(
        &self,
        name: &str,
    ) -> Result<(CatalogVoice, Option<CustomVoice>), ApiError> {
        let voices = self.catalog.voices().await?;
        let custom = match voices.iter().any(|v| v.id() == name) {
            true => None,
            false => self.catalog.custom(name).await?,
        };
        let id = custom.as_ref().map_or(name, |c| c.voice.as_str());
        match voices.iter().find(|v| v.id() == id) {
            Some(voice) => Ok((voice.clone(), custom)),
            None => {
                let known: Vec<&str> = voices.iter().map(|v| v.id()).collect();
                let message = if known.is_empty() {
                    format!(
                        "unknown voice {name:?}: no worker is running, so no voice is available"
                    )
                } else {
                    format!(
                        "unknown voice {name:?}: the live workers speak {}",
                        known.join(", ")
                    )
                };
                Err(ApiError::invalid(message))
            }
        }
    }
}

/// Bounds every request is checked against.
pub(crate) fn limits() -> Limits {
    Limits::default()
}

/// Applies a custom voice to a request: its base voice, style and speaker.
pub(crate) fn apply_custom(request: &mut SynthesisRequest, custom: &CustomVoice) {
    request.voice = custom.voice.clone();
    if request.style.is_none() {
        request.style = custom.style.clone();
    }
    if let Some(speaker) = &custom.speaker {
        request
            .extra
            .insert("speaker".into(), speaker.clone().into());
    }
}

/// A job this process enqueued, for the dashboard's recent list.
#[derive(Debug, Clone)]
pub(crate) struct Recent {
    pub(crate) id: JobId,
    pub(crate) backend: String,
    pub(crate) voice: String,
    pub(crate) text: String,
}

/// Reads allowed per caller in this process: a token bucket each.
#[derive(Debug, Default)]
pub(crate) struct ReadLimiter {
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl ReadLimiter {
    /// `Ok` if `caller` may read now, else how long to wait.
    pub(crate) fn check(&self, caller: &str, rate: Rate) -> Result<(), Duration> {
        let per_sec = f64::from(rate.limit) / rate.period.as_secs_f64();
        let now = Instant::now();
        let mut buckets = self.buckets.lock().expect("lock");
        let (tokens, at) = buckets
            .entry(caller.to_owned())
            .or_insert((f64::from(rate.limit), now));
        *tokens =
            (*tokens + now.duration_since(*at).as_secs_f64() * per_sec).min(f64::from(rate.limit));
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / per_sec))
        }
    }
}

/// Everything a handler needs; cheap to clone (every field is shared).
#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) queues: Arc<Queues>,
    pub(crate) keys: Arc<ApiKeys>,
    pub(crate) config: Arc<Config>,
    pub(crate) metrics: PrometheusHandle,
    pub(crate) reads: Arc<ReadLimiter>,
    pub(crate) recent: Arc<Mutex<VecDeque<Recent>>>,
}

/// How many recent jobs the dashboard lists.
pub(crate) const RECENT: usize = 20;

impl AppState {
    pub(crate) fn new(
        queues: Arc<Queues>,
        keys: ApiKeys,
        config: Config,
        metrics: PrometheusHandle,
    ) -> Self {
        AppState {
            queues,
            keys: Arc::new(keys),
            config: Arc::new(config),
            metrics,
            reads: Arc::default(),
            recent: Arc::default(),
        }
    }

    pub(crate) fn remember(&self, job: Recent) {
        let mut recent = self.recent.lock().expect("lock");
        recent.retain(|r| r.id != job.id);
        recent.push_front(job);
        recent.truncate(RECENT);
    }
}

/// A worker future: runs until its shutdown future completes.
pub(crate) type WorkerRun = Box<
    dyn FnOnce(
            Pin<Box<dyn Future<Output = ()> + Send>>,
        ) -> Pin<Box<dyn Future<Output = Result<(), voxqueue::Error>> + Send>>
        + Send,
>;

/// An espeak-ng worker on the `espeak` backend queue that streams its audio and keeps
/// its voices registered while it runs, as `--with-worker` and the tests run it.
pub(crate) async fn espeak_worker(
    queues: &Queues,
    voice: EspeakSynthesizer,
) -> Result<WorkerRun, ApiError> {
    backend_worker(queues, "espeak", Arc::new(voice)).await
}

/// A worker on `backend`'s queue that streams its audio and keeps its voices
/// registered while it runs.
pub(crate) async fn backend_worker(
    queues: &Queues,
    name: &str,
    voice: Arc<dyn Synthesizer>,
) -> Result<WorkerRun, ApiError> {
    let backend = queues.backend(name).await?;
    let worker = Worker::builder(backend.queue.clone()).build(
        TtsHandler::from_shared(voice.clone(), backend.store.clone())
            .stream(backend.stream.clone()),
    );
    let entry = WorkerVoices::new(worker.id(), name, &voice.voices(), voice.sample_rate());
    let catalog = queues.catalog.clone();
    Ok(Box::new(move |shutdown| {
        Box::pin(async move {
            let (stop, stopped) = tokio::sync::watch::channel(false);
            let registered =
                tokio::spawn(
                    catalog.keep_registered(entry, Duration::from_secs(15), async move {
                        let mut stopped = stopped;
                        let _ = stopped.wait_for(|s| *s).await;
                    }),
                );
            let result = worker.run_until(shutdown).await;
            let _ = stop.send(true);
            let _ = registered.await;
            result
        })
    }))
}
