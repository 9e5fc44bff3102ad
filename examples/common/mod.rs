//! What the example programs share: flag parsers, the result-store choice, the
//! shutdown signal and the loading of the neural backend. Each program uses a part.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use voxqueue::Queue;
use voxqueue::tts::{FileStore, RedisStore, ResultStore, Synthesizer};

/// Where the audio goes; API and workers must agree.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum StoreChoice {
    Redis,
    Dir(PathBuf),
}

impl StoreChoice {
    /// Opens the store beside `queue` (Redis) or in the directory.
    pub(crate) fn open<J>(&self, queue: &Queue<J>) -> Arc<dyn ResultStore> {
        match self {
            StoreChoice::Redis => Arc::new(RedisStore::new(queue)),
            StoreChoice::Dir(dir) => Arc::new(FileStore::new(dir)),
        }
    }
}

/// `redis` or `dir:<path>`.
pub(crate) fn parse_store(s: &str) -> Result<StoreChoice, String> {
    match s {
        "redis" => Ok(StoreChoice::Redis),
        _ => match s.strip_prefix("dir:") {
            Some(path) if !path.is_empty() => Ok(StoreChoice::Dir(PathBuf::from(path))),
            _ => Err(format!("{s:?}: expected `redis` or `dir:<path>`")),
        },
    }
}

/// `500ms`, `30s`, `10m`, `2h`, `7d`; a bare number is seconds.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: f64 = number
        .parse()
        .map_err(|_| format!("{s:?}: expected a duration like 500ms, 30s, 10m or 2h"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86_400.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h, d)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

/// Ctrl-C, or SIGTERM from a process manager.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

/// Loads Parler-TTS from `dir` once, wrapped in a batcher when `batch` > 1 so that
/// concurrent jobs share one generation.
pub(crate) fn load_parler(
    dir: &std::path::Path,
    device: &str,
    precision: &str,
    batch: usize,
    batch_wait: Duration,
) -> Result<Arc<dyn Synthesizer>, Box<dyn std::error::Error>> {
    load_neural(Neural::Parler(dir), device, precision, batch, batch_wait)
}

/// Loads a Piper voice (`voice.onnx` with `voice.onnx.json` beside it) once, wrapped in a
/// batcher when `batch` > 1 so that concurrent jobs share one model call.
pub(crate) fn load_piper(
    model: &std::path::Path,
    device: &str,
    precision: &str,
    batch: usize,
    batch_wait: Duration,
) -> Result<Arc<dyn Synthesizer>, Box<dyn std::error::Error>> {
    load_neural(Neural::Piper(model), device, precision, batch, batch_wait)
}

/// Where `.ci/fetch-voices` puts the Piper voice: `en_US-joe-medium.onnx` in
/// [`voices_dir`](voxqueue::tts::candle::voices_dir).
pub(crate) fn fetched_piper_voice() -> PathBuf {
    // Without the `candle` feature there are no neural voices to look for.
    #[cfg(feature = "candle")]
    let dir = voxqueue::tts::candle::voices_dir().unwrap_or_default();
    #[cfg(not(feature = "candle"))]
    let dir = PathBuf::new();
    dir.join("en_US-joe-medium.onnx")
}

/// Where `.ci/fetch-voices` puts Kokoro: `$VOXQUEUE_VOICES/kokoro` (else
/// `~/.cache/voxqueue/voices/kokoro`), then `kokoro-v1.0.int8.onnx`; its voice packs are in
/// `voices/` beside it.
#[allow(dead_code)] // Not every program that includes this module offers Kokoro.
pub(crate) fn fetched_kokoro_model() -> PathBuf {
    fetched_piper_voice()
        .with_file_name("kokoro")
        .join("kokoro-v1.0.int8.onnx")
}

/// A Candle backend and where its weights are.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Neural<'a> {
    /// A Parler-TTS model directory.
    Parler(&'a std::path::Path),
    /// A Piper voice's `.onnx` file.
    Piper(&'a std::path::Path),
    /// Kokoro's `kokoro-v1.0.int8.onnx` and, if not `voices/` beside it, the voice packs'
    /// directory.
    Kokoro(&'a std::path::Path, Option<&'a std::path::Path>),
}

/// Loads a Candle backend on `device` in `precision`, batched when `batch` > 1.
pub(crate) fn load_neural(
    which: Neural<'_>,
    device: &str,
    precision: &str,
    batch: usize,
    batch_wait: Duration,
) -> Result<Arc<dyn Synthesizer>, Box<dyn std::error::Error>> {
    #[cfg(feature = "candle")]
    {
        use voxqueue::tts::BatchingSynthesizer;
        use voxqueue::tts::candle::{
            CandleOptions, DeviceChoice, KokoroOptions, KokoroSynthesizer, ParlerOptions,
            ParlerSynthesizer, PiperOptions, PiperSynthesizer, Precision,
        };
        // One choice of device, precision and batch for whichever backend is loaded.
        let candle = CandleOptions::new()
            .with_device(device.parse::<DeviceChoice>()?)
            .with_precision(precision.parse::<Precision>()?)
            .with_max_batch(batch.max(1));
        let model: Arc<dyn Synthesizer> = match which {
            Neural::Parler(dir) => Arc::new(
                ParlerSynthesizer::load(dir, ParlerOptions::new().with_candle(candle))
                    .map_err(|e| format!("Parler-TTS from {}: {e}", dir.display()))?,
            ),
            Neural::Piper(path) => Arc::new(
                PiperSynthesizer::load(path, PiperOptions::new().with_candle(candle))
                    .map_err(|e| format!("Piper voice {}: {e}", path.display()))?,
            ),
            Neural::Kokoro(path, voices) => {
                let mut options = KokoroOptions::new().with_candle(candle);
                if let Some(voices) = voices {
                    options = options.with_voices_dir(voices);
                }
                Arc::new(
                    KokoroSynthesizer::load(path, options)
                        .map_err(|e| format!("Kokoro {}: {e}", path.display()))?,
                )
            }
        };
        if batch > 1 {
            return Ok(Arc::new(BatchingSynthesizer::new(
                model, batch, batch_wait,
            )?));
        }
        Ok(model)
    }
    #[cfg(not(feature = "candle"))]
    {
        let _ = (which, device, precision, batch, batch_wait);
        Err("this build has no Candle backend (enable the `candle` feature)".into())
    }
}

// ---------------------------------------------------------------------------------
// Flag groups both programs take (`#[command(flatten)]`), so API and workers agree on
// where the queue is by construction.

/// Where the queue and the audio are: API and workers must give the same.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct QueueFlags {
    /// Redis URL (`rediss://` for TLS, credentials in the URL).
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub(crate) redis: String,
    /// Base queue name: jobs go to `<queue>.<backend>` (one queue per backend), and the
    /// voice catalogue lives under `<queue>`.
    #[arg(long, env = "VOXQUEUE_QUEUE", default_value = "speech")]
    pub(crate) queue: String,
    /// Key prefix, so several deployments can share one Redis.
    #[arg(long, env = "VOXQUEUE_PREFIX", default_value = "vq")]
    pub(crate) prefix: String,
    /// Where workers put the audio: `redis` (beside the queue, with its TTL) or
    /// `dir:<path>` (a directory every API process and worker can read).
    #[arg(long, env = "VOXQUEUE_STORE", default_value = "redis", value_parser = parse_store)]
    pub(crate) store: StoreChoice,
}

impl QueueFlags {
    /// A builder for the queue `name` on these flags' Redis and prefix.
    pub(crate) fn builder<J>(&self, name: &str) -> voxqueue::QueueBuilder<J> {
        Queue::<J>::builder(name)
            .url(&self.redis)
            .prefix(self.prefix.as_str())
    }
}
