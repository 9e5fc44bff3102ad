//! Run with: `cargo run --example speak -- "Hello from voxqueue." --out out/`
//! (needs Redis on 127.0.0.1:6379 and `espeak-ng`; `bash .ci/setup` installs both).
//! With `--voice-backend piper --piper-voice <voice.onnx>` it speaks with a Piper voice on
//! Candle (`.ci/fetch-voices` fetches `en_US-joe-medium`); with `--voice-backend kokoro
//! [--voice af_heart]` with Kokoro-82M on Candle (from where `.ci/fetch-voices` puts it, or
//! `--kokoro-model`); with `--model-dir <parler-tts dir> [--device cuda]` with Parler-TTS.
//!
//! The main job in one program: a producer enqueues a sentence, a worker with the
//! offline voice synthesises it, and the audio and its captions are written to files.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use voxqueue::tts::{
    self, AudioFormat, EspeakSynthesizer, Limits, RedisStore, ResultStore, SpeechResult,
    SynthesisRequest, Synthesizer, TtsHandler,
};
use voxqueue::{Queue, Worker};

#[derive(Debug, Parser)]
#[command(about = "Speak a text through a voxqueue queue and write WAV + captions")]
struct Args {
    /// What to say.
    #[arg(default_value = "Hello from voxqueue. Every job is spoken once, and never lost.")]
    text: String,
    /// Voice id (see --list-voices; default: the backend's first voice).
    #[arg(long)]
    voice: Option<String>,
    /// A Parler-TTS model directory (config.json, *.safetensors, tokenizer.json): speak
    /// with the neural backend instead of the offline voice.
    #[cfg(feature = "candle")]
    #[arg(long)]
    model_dir: Option<PathBuf>,
    /// The synthesiser: `espeak` (the offline voice), `piper` (needs --piper-voice),
    /// `kokoro` (Kokoro-82M) or `parler` (needs --model-dir). Default: parler if
    /// --model-dir is given, else piper if --piper-voice is, else kokoro if
    /// --kokoro-model is, else espeak.
    #[arg(long)]
    voice_backend: Option<String>,
    /// A Piper voice's `.onnx` file (its `.onnx.json` beside it).
    #[cfg(feature = "candle")]
    #[arg(long)]
    piper_voice: Option<PathBuf>,
    /// Kokoro's `kokoro-v1.0.int8.onnx` (default: where `.ci/fetch-voices` puts it).
    #[cfg(feature = "candle")]
    #[arg(long)]
    kokoro_model: Option<PathBuf>,
    /// The directory of Kokoro voice packs (default: `voices/` beside the model).
    #[cfg(feature = "candle")]
    #[arg(long)]
    kokoro_voices: Option<PathBuf>,
    /// Device for the neural backend: auto, cpu, cuda[:N] or metal[:N].
    #[cfg(feature = "candle")]
    #[arg(long, default_value = "auto")]
    device: String,
    /// Precision for the neural backend: auto, f32, f16 or bf16.
    #[cfg(feature = "candle")]
    #[arg(long, default_value = "auto")]
    precision: String,
    /// Speaking rate, 1.0 is normal.
    #[arg(long, default_value_t = 1.0)]
    speed: f32,
    /// Output sample rate (default: the voice's own).
    #[arg(long)]
    sample_rate: Option<u32>,
    /// Where to write speech.wav, speech.srt and speech.vtt.
    #[arg(long, default_value = "out")]
    out: PathBuf,
    /// Redis URL.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis: String,
    /// Print the voices and exit.
    #[arg(long)]
    list_voices: bool,
    /// How long to wait for the audio (a neural voice on a busy CPU can take minutes).
    #[arg(long, default_value = "10m", value_parser = common::parse_duration)]
    wait: Duration,
}

/// The offline voice, a Piper voice (`--piper-voice`), Kokoro or Parler-TTS (`--model-dir`).
fn backend(args: &Args) -> Result<Arc<dyn Synthesizer>, Box<dyn std::error::Error>> {
    #[cfg(feature = "candle")]
    {
        let chosen = args
            .voice_backend
            .as_deref()
            .unwrap_or(if args.model_dir.is_some() {
                "parler"
            } else if args.piper_voice.is_some() {
                "piper"
            } else if args.kokoro_model.is_some() {
                "kokoro"
            } else {
                "espeak"
            });
        match chosen {
            "parler" => {
                let dir = args.model_dir.as_ref().ok_or("parler needs --model-dir")?;
                return common::load_parler(dir, &args.device, &args.precision, 1, Duration::ZERO);
            }
            "piper" => {
                let voice = args
                    .piper_voice
                    .as_ref()
                    .ok_or("piper needs --piper-voice")?;
                return common::load_piper(voice, &args.device, &args.precision, 1, Duration::ZERO);
            }
            "kokoro" => {
                let model = args
                    .kokoro_model
                    .clone()
                    .unwrap_or_else(common::fetched_kokoro_model);
                let which = common::Neural::Kokoro(&model, args.kokoro_voices.as_deref());
                return common::load_neural(
                    which,
                    &args.device,
                    &args.precision,
                    1,
                    Duration::ZERO,
                );
            }
            "espeak" => {}
            other => return Err(format!("unknown --voice-backend {other:?}").into()),
        }
    }
    #[cfg(not(feature = "candle"))]
    if let Some(other) = args.voice_backend.as_deref().filter(|b| *b != "espeak") {
        return Err(format!("--voice-backend {other} needs the `candle` feature").into());
    }
    Ok(Arc::new(EspeakSynthesizer::new()?))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        .init();
    let args = Args::parse();
    let voice = backend(&args)?;
    if args.list_voices {
        for v in voice.voices() {
            println!("{:14} {}", v.id, v.name);
        }
        return Ok(());
    }

    // Invalid requests are refused at enqueue, before anything is stored.
    let queue = Queue::<SynthesisRequest>::builder("speak")
        .url(&args.redis)
        .dedup(tts::deduplicator(Duration::from_secs(3600)))
        .validate(tts::validator(Limits::default(), voice.voices()))
        .connect()
        .await?;
    let voice_id = match args.voice.clone() {
        Some(v) => v,
        None => voice
            .voices()
            .first()
            .map(|v| v.id.clone())
            .ok_or("the backend offers no voice")?,
    };
    let mut request = SynthesisRequest::new(args.text, voice_id)
        .with_speed(args.speed)
        .with_format(AudioFormat::Wav);
    if let Some(rate) = args.sample_rate {
        request = request.with_sample_rate(rate);
    }

    let store = RedisStore::new(&queue);
    let worker = Worker::builder(queue.clone())
        .build(TtsHandler::from_shared(voice, Arc::new(store.clone())));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(worker.run_until(async {
        let _ = stopped.await;
    }));

    let job = queue.enqueue(request).await?;
    if job.duplicate_of.is_some() {
        tracing::info!(job = %job.id, "same request as an earlier job: reusing its audio");
    }
    let result: SpeechResult = queue.wait_result(&job.id, args.wait).await?;
    let audio = store.get(&result.audio).await?.ok_or("audio expired")?;

    std::fs::create_dir_all(&args.out)?;
    std::fs::write(args.out.join("speech.wav"), &audio)?;
    std::fs::write(args.out.join("speech.srt"), result.srt())?;
    std::fs::write(args.out.join("speech.vtt"), result.vtt())?;
    println!(
        "wrote speech.wav ({:.2} s at {} Hz, {} captions) to {}",
        result.duration().as_secs_f64(),
        result.sample_rate,
        result.captions.len(),
        args.out.display()
    );

    let _ = stop.send(());
    running.await??;
    Ok(())
}
