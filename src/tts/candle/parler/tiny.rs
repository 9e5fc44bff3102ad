//! A tiny, randomly initialised Parler-TTS of the real architecture, for tests and benches.
//!
//! No test can download a checkpoint, yet loading, generation, batching and decoding should
//! be exercised through exactly the code a real model goes through. So this writes a model
//! directory in the real layout (`config.json`, `model.safetensors`, `tokenizer.json`) whose
//! sizes are tiny: a one-layer T5 encoder, a two-layer decoder over three codebooks, and a
//! DAC-style codec a few thousand parameters large. The tensor names and shapes are not
//! listed here: they are recorded by building the real model against a recording
//! `VarBuilder`, so they cannot drift from what [`ParlerSynthesizer::load`] asks for.
//!
//! [`ParlerSynthesizer::load`]: super::ParlerSynthesizer::load

use crate::tts::candle::error::LoadError;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;
use serde_json::{Value, json};

use super::config::ParlerConfig;
use super::error::ModelError;
use super::load::{CONFIG_FILE, ParlerModel, TOKENIZER_FILE, WEIGHTS_FILE};
use crate::tts::candle::sample::Rng;

/// The words the tiny tokenizer knows; anything else is `<unk>`.
const WORDS: &[&str] = &[
    ".",
    ",",
    "!",
    "?",
    "'",
    "s",
    "hello",
    "world",
    "the",
    "a",
    "voice",
    "is",
    "calm",
    "and",
    "clear",
    "speaker",
    "speaks",
    "with",
    "very",
    "audio",
    "quality",
    "recorded",
    "close",
    "to",
    "mic",
    "no",
    "background",
    "noise",
    "laura",
    "gary",
    "moderate",
    "pace",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "good",
    "morning",
    "how",
    "are",
    "you",
    "this",
];

/// Special tokens, with the ids T5 gives them.
const SPECIALS: &[&str] = &["<pad>", "</s>", "<unk>"];

/// Sample rate of the tiny codec, in Hz.
pub const TINY_SAMPLE_RATE: u32 = 16_000;

/// Audio samples per codec frame of the tiny codec.
pub const TINY_HOP_LENGTH: usize = 64;

/// Codebooks the tiny decoder generates.
pub const TINY_NUM_CODEBOOKS: usize = 3;

/// Writes a tiny random Parler-TTS into `dir` (created if needed); the same `seed` writes
/// the same weights.
///
/// The model speaks noise, not words, but has every part and every special token of a
/// real checkpoint, with sizes chosen so a synthesis takes milliseconds.
pub fn write_tiny_model(dir: &Path, seed: u64) -> Result<(), ModelError> {
    std::fs::create_dir_all(dir).map_err(|e| LoadError::Io {
        path: dir.to_owned(),
        reason: e.to_string(),
    })?;
    let vocab = SPECIALS.len() + WORDS.len();
    write_json(&dir.join(CONFIG_FILE), &tiny_config(vocab))?;
    write_json(&dir.join(TOKENIZER_FILE), &tiny_tokenizer())?;
    let config = ParlerConfig::load(&dir.join(CONFIG_FILE))?;
    let tensors = random_weights(&config, seed)?;
    let path = dir.join(WEIGHTS_FILE);
    candle_core::safetensors::save(&tensors, &path).map_err(|e| {
        LoadError::Io {
            path,
            reason: e.to_string(),
        }
        .into()
    })
}

fn tiny_config(vocab: usize) -> Value {
    let hop: usize = 8 * 8;
    debug_assert_eq!(hop, TINY_HOP_LENGTH);
    json!({
        "architectures": ["ParlerTTSForConditionalGeneration"],
        "model_type": "parler_tts",
        "decoder_start_token_id": 33,
        "pad_token_id": 32,
        "vocab_size": vocab,
        "decoder": {
            "model_type": "parler_tts_decoder",
            "vocab_size": 40,
            "max_position_embeddings": 512,
            "num_hidden_layers": 2,
            "ffn_dim": 32,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "num_cross_attention_key_value_heads": 2,
            "activation_function": "gelu",
            "hidden_size": 16,
            "scale_embedding": false,
            "num_codebooks": TINY_NUM_CODEBOOKS,
            "pad_token_id": 32,
            "bos_token_id": 33,
            "eos_token_id": 32,
            "tie_word_embeddings": false,
            "rope_embeddings": false,
            "rope_theta": 10000.0
        },
        "text_encoder": {
            "model_type": "t5",
            "vocab_size": vocab,
            "d_model": 24,
            "d_kv": 6,
            "d_ff": 32,
            "num_layers": 1,
            "num_heads": 4,
            "relative_attention_num_buckets": 8,
            "relative_attention_max_distance": 16,
            "dropout_rate": 0.0,
            "layer_norm_epsilon": 1e-6,
            "initializer_factor": 1.0,
            "feed_forward_proj": "gated-gelu",
            "tie_word_embeddings": false,
            "is_encoder_decoder": true,
            "pad_token_id": 0,
            "eos_token_id": 1,
            "decoder_start_token_id": 0
        },
        "audio_encoder": {
            "model_type": "dac_on_codec",
            "num_codebooks": 4,
            "model_bitrate": 8,
            "codebook_size": 32,
            "latent_dim": 8,
            "codebook_dim": 4,
            "decoder_dim": 16,
            "decoder_rates": [8, 8],
            "frame_rate": f64::from(TINY_SAMPLE_RATE) / hop as f64,
            "sampling_rate": TINY_SAMPLE_RATE
        }
    })
}

/// A WordLevel tokenizer in the `tokenizers` JSON format, T5-like: lowercase, split on
/// whitespace and punctuation, `</s>` appended.
fn tiny_tokenizer() -> Value {
    let vocab: serde_json::Map<String, Value> = SPECIALS
        .iter()
        .chain(WORDS)
        .enumerate()
        .map(|(id, word)| ((*word).to_owned(), json!(id)))
        .collect();
    let added: Vec<Value> = SPECIALS
        .iter()
        .enumerate()
        .map(|(id, token)| {
            json!({
                "id": id, "content": token, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true
            })
        })
        .collect();
    let seq = |id: &str| json!({"Sequence": {"id": id, "type_id": 0}});
    let eos = json!({"SpecialToken": {"id": "</s>", "type_id": 0}});
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [seq("A"), eos.clone()],
            "pair": [seq("A"), eos.clone(), seq("B"), eos],
            "special_tokens": {"</s>": {"id": "</s>", "ids": [1], "tokens": ["</s>"]}}
        },
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    })
}

fn write_json(path: &Path, value: &Value) -> Result<(), ModelError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| LoadError::Io {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    std::fs::write(path, text).map_err(|e| {
        LoadError::Io {
            path: path.to_owned(),
            reason: e.to_string(),
        }
        .into()
    })
}

/// Records the name and shape of every tensor the model asks for, handing out zeros.
#[derive(Default)]
struct Recorder {
    shapes: Arc<Mutex<BTreeMap<String, Vec<usize>>>>,
}

impl SimpleBackend for Recorder {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _hints: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.shapes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_owned(), shape.dims().to_vec());
        Tensor::zeros(shape, dtype, device)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("the recorder cannot guess the shape of `{name}`")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        false
    }
}

/// Random weights for every tensor the model reads, scaled like a trained network's so
/// activations stay finite, and fixed where randomness would break the math (sinusoidal
/// positions, norm gains, snake `alpha`).
fn random_weights(config: &ParlerConfig, seed: u64) -> Result<HashMap<String, Tensor>, ModelError> {
    let recorder = Recorder::default();
    let shapes = Arc::clone(&recorder.shapes);
    let vb = VarBuilder::from_backend(Box::new(recorder), DType::F32, Device::Cpu);
    ParlerModel::new(config, vb).map_err(|e| ModelError::Build(e.to_string()))?;
    let shapes = std::mem::take(&mut *shapes.lock().unwrap_or_else(PoisonError::into_inner));
    let mut rng = Rng::new(seed);
    let mut tensors = HashMap::with_capacity(shapes.len());
    for (name, dims) in shapes {
        let count: usize = dims.iter().product();
        let values: Vec<f32> = if name.ends_with("embed_positions.weights") {
            sinusoidal(dims[0], dims[1])
        } else if name.ends_with("alpha") || name.ends_with("layer_norm.weight") {
            vec![1.0; count]
        } else if name.ends_with(".bias") {
            vec![0.0; count]
        } else if name.ends_with("weight_g") {
            (0..count).map(|_| 0.5 + rng.next_f64() as f32).collect()
        } else {
            let fan_in: usize = dims.iter().skip(1).product::<usize>().max(1);
            let bound = (3.0 / fan_in as f64).sqrt();
            (0..count)
                .map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32)
                .collect()
        };
        let tensor = Tensor::from_vec(values, dims, &Device::Cpu)
            .map_err(|e| ModelError::Build(e.to_string()))?;
        tensors.insert(name, tensor);
    }
    Ok(tensors)
}

/// The reference `ParlerTTSSinusoidalPositionalEmbedding.get_embedding`: cosines, then sines.
fn sinusoidal(positions: usize, dim: usize) -> Vec<f32> {
    let half = dim / 2;
    let scale = (10_000_f64).ln() / (half.max(2) - 1) as f64;
    let mut out = Vec::with_capacity(positions * dim);
    for p in 0..positions {
        let angles: Vec<f64> = (0..half)
            .map(|i| p as f64 * (-(i as f64) * scale).exp())
            .collect();
        out.extend(angles.iter().map(|a| a.cos() as f32));
        out.extend(angles.iter().map(|a| a.sin() as f32));
        if dim % 2 == 1 {
            out.push(0.0);
        }
    }
    out
}
