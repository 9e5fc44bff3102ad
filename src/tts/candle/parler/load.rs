//! Turning a model directory into a model on a device.
//!
//! A directory holds `config.json`, the weights (`model.safetensors`, or shards listed in
//! `model.safetensors.index.json`), `tokenizer.json` (used for both the description and the
//! transcript, as Parler does), optionally `description_tokenizer.json` and
//! `generation_config.json`.
//!
//! Weights are read through our own [`SimpleBackend`] instead of candle's, for two reasons:
//! it reports a missing tensor, a shape mismatch or an integer dtype as a typed
//! [`ModelError`] naming the tensor (candle's errors are strings), and it reads files into
//! memory rather than memory-mapping them, which needs `unsafe` that this crate forbids.

use crate::tts::candle::error::LoadError;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::safetensors::BufferedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Embedding, Linear, VarBuilder};
use candle_transformers::models::t5;
use tokenizers::Tokenizer;

use super::codec::Codec;
use super::config::{GenerationConfig, ParlerConfig, io_error, read_text};
use super::decoder::ParlerDecoder;
use super::error::ModelError;

/// `config.json`.
pub(crate) const CONFIG_FILE: &str = "config.json";
/// Single-file weights.
pub(crate) const WEIGHTS_FILE: &str = "model.safetensors";
/// Index of sharded weights.
pub(crate) const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";
/// The tokenizer for the transcript (and the description unless the next one exists).
pub(crate) const TOKENIZER_FILE: &str = "tokenizer.json";
/// Optional separate tokenizer for the speaker description.
pub(crate) const DESCRIPTION_TOKENIZER_FILE: &str = "description_tokenizer.json";
/// Optional sampling defaults.
pub(crate) const GENERATION_CONFIG_FILE: &str = "generation_config.json";

/// The network's parts, each used separately by our own generation loop.
#[derive(Debug, Clone)]
pub(crate) struct ParlerModel {
    pub(crate) text_encoder: t5::T5EncoderModel,
    /// Present when the text encoder's width differs from the decoder's.
    pub(crate) enc_to_dec_proj: Option<Linear>,
    pub(crate) embed_prompts: Embedding,
    pub(crate) decoder: ParlerDecoder,
    pub(crate) codec: Codec,
}

impl ParlerModel {
    /// Builds every part from `vb`, under the tensor names of Hugging Face checkpoints.
    ///
    /// Any `VarBuilder` works, which is how the test helper learns the tensor names and
    /// shapes it must write.
    pub(crate) fn new(cfg: &ParlerConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let encoder_vb = vb
            .pp("text_encoder")
            .set_dtype(text_encoder_dtype(vb.dtype()));
        let text_encoder = t5::T5EncoderModel::load(encoder_vb, &cfg.text_encoder)?;
        let decoder = ParlerDecoder::new(&cfg.decoder, vb.pp("decoder"))?;
        let embed_prompts = candle_nn::embedding(
            cfg.vocab_size,
            cfg.decoder.hidden_size,
            vb.pp("embed_prompts"),
        )?;
        let enc_to_dec_proj = if cfg.text_encoder.d_model == cfg.decoder.hidden_size {
            None
        } else {
            Some(candle_nn::linear_b(
                cfg.text_encoder.d_model,
                cfg.decoder.hidden_size,
                true,
                vb.pp("enc_to_dec_proj"),
            )?)
        };
        let codec = Codec::new(
            &cfg.audio_encoder,
            cfg.decoder.num_codebooks,
            vb.pp("audio_encoder"),
        )?;
        Ok(Self {
            text_encoder,
            enc_to_dec_proj,
            embed_prompts,
            decoder,
            codec,
        })
    }
}

/// The dtype of the T5 text encoder when the rest of the model is in `dtype`.
///
/// T5's feed-forward activations exceed f16's largest value (65504) in released checkpoints,
/// which Hugging Face works around by keeping parts of T5 in f32 and clamping; candle's T5
/// does neither, so under f16 the encoder stays in f32. It runs once per request, so this
/// costs memory, not speed. bf16 has f32's range and needs no such care.
pub(crate) fn text_encoder_dtype(dtype: DType) -> DType {
    if dtype == DType::F16 {
        DType::F32
    } else {
        dtype
    }
}

/// Everything [`load_dir`] reads.
#[derive(Debug)]
pub(crate) struct Loaded {
    pub(crate) config: ParlerConfig,
    pub(crate) generation: GenerationConfig,
    pub(crate) model: ParlerModel,
    pub(crate) prompt_tokenizer: Tokenizer,
    /// `None`: the prompt tokenizer also tokenizes descriptions.
    pub(crate) description_tokenizer: Option<Tokenizer>,
}

/// Loads a model directory onto `device` in `dtype`, checking every file before the slow
/// part.
pub(crate) fn load_dir(dir: &Path, device: &Device, dtype: DType) -> Result<Loaded, ModelError> {
    let config = ParlerConfig::load(&dir.join(CONFIG_FILE))?;
    let generation = GenerationConfig::load_optional(&dir.join(GENERATION_CONFIG_FILE))?;
    let prompt_tokenizer = load_tokenizer(&dir.join(TOKENIZER_FILE), config.vocab_size, "prompt")?;
    let description_path = dir.join(DESCRIPTION_TOKENIZER_FILE);
    let description_tokenizer = if description_path.exists() {
        Some(load_tokenizer(
            &description_path,
            config.text_encoder.vocab_size,
            "text encoder",
        )?)
    } else {
        check_vocab(
            &prompt_tokenizer,
            &dir.join(TOKENIZER_FILE),
            config.text_encoder.vocab_size,
            "text encoder",
        )?;
        None
    };
    let files = weight_files(dir)?;
    let backend = Weights::read(&files)?;
    let failure = Arc::clone(&backend.failure);
    let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
    let model = ParlerModel::new(&config, vb).map_err(|err| {
        let recorded = failure.lock().ok().and_then(|mut f| f.take());
        recorded.unwrap_or_else(|| ModelError::Build(err.to_string()))
    })?;
    Ok(Loaded {
        config,
        generation,
        model,
        prompt_tokenizer,
        description_tokenizer,
    })
}

fn load_tokenizer(path: &Path, embed_rows: usize, user: &str) -> Result<Tokenizer, ModelError> {
    if !path.exists() {
        return Err(LoadError::MissingFile {
            path: path.to_owned(),
        }
        .into());
    }
    let tokenizer = Tokenizer::from_file(path).map_err(|e| ModelError::InvalidTokenizer {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    check_vocab(&tokenizer, path, embed_rows, user)?;
    Ok(tokenizer)
}

/// A token id past the embedding would fail deep inside candle at synthesis time; say so now.
fn check_vocab(
    tokenizer: &Tokenizer,
    path: &Path,
    embed_rows: usize,
    user: &str,
) -> Result<(), ModelError> {
    let size = tokenizer.get_vocab_size(true);
    if size > embed_rows {
        return Err(ModelError::InvalidTokenizer {
            path: path.to_owned(),
            reason: format!(
                "it has {size} tokens but the {user} embeds only {embed_rows} (config.json)"
            ),
        });
    }
    Ok(())
}

/// The safetensors files of the checkpoint: the shards named by the index, or the one file.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let index_path = dir.join(WEIGHTS_INDEX_FILE);
    if !index_path.exists() {
        let single = dir.join(WEIGHTS_FILE);
        if !single.exists() {
            return Err(LoadError::MissingFile { path: single }.into());
        }
        return Ok(vec![single]);
    }
    let text = read_text(&index_path)?;
    let index: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| ModelError::InvalidConfig {
            path: index_path.clone(),
            reason: e.to_string(),
        })?;
    let Some(map) = index.get("weight_map").and_then(|m| m.as_object()) else {
        return Err(ModelError::InvalidConfig {
            path: index_path,
            reason: "no `weight_map` object".into(),
        });
    };
    let names: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
    if names.is_empty() {
        return Err(ModelError::InvalidConfig {
            path: index_path,
            reason: "`weight_map` names no files".into(),
        });
    }
    let files: Vec<PathBuf> = names.into_iter().map(|n| dir.join(n)).collect();
    if let Some(missing) = files.iter().find(|f| !f.exists()) {
        return Err(LoadError::MissingFile {
            path: missing.clone(),
        }
        .into());
    }
    Ok(files)
}

/// Safetensors files read into memory, with typed errors for what the model asks of them.
struct Weights {
    shards: Vec<BufferedSafetensors>,
    /// Tensor name to the shard that holds it.
    index: HashMap<String, usize>,
    /// The first precise failure, read back by [`load_dir`] when building fails, because
    /// candle's `VarBuilder` only passes its own error type through.
    failure: Arc<Mutex<Option<ModelError>>>,
}

impl Weights {
    fn read(files: &[PathBuf]) -> Result<Self, ModelError> {
        let mut shards = Vec::with_capacity(files.len());
        let mut index = HashMap::new();
        for (i, path) in files.iter().enumerate() {
            let bytes = std::fs::read(path).map_err(|e| io_error(path, &e))?;
            let shard =
                BufferedSafetensors::new(bytes).map_err(|e| ModelError::InvalidWeights {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            for (name, _) in shard.tensors() {
                index.insert(name, i);
            }
            shards.push(shard);
        }
        tracing::debug!(files = files.len(), tensors = index.len(), "read weights");
        Ok(Self {
            shards,
            index,
            failure: Arc::new(Mutex::new(None)),
        })
    }

    /// Remembers `err` (the first one only) and turns it into candle's error type.
    fn fail(&self, err: ModelError) -> candle_core::Error {
        let message = err.to_string();
        if let Ok(mut slot) = self.failure.lock() {
            slot.get_or_insert(err);
        }
        candle_core::Error::Msg(message)
    }

    fn shard(&self, name: &str) -> Option<&BufferedSafetensors> {
        self.index.get(name).and_then(|&i| self.shards.get(i))
    }
}

impl SimpleBackend for Weights {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _hints: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let Some(shard) = self.shard(name) else {
            return Err(self.fail(
                LoadError::MissingTensor {
                    tensor: name.to_owned(),
                }
                .into(),
            ));
        };
        let view = shard.get(name)?;
        let stored = view.dtype();
        if !DType::try_from(stored).is_ok_and(|d| d.is_float()) {
            return Err(self.fail(
                LoadError::WrongDtype {
                    tensor: name.to_owned(),
                    found: format!("{stored:?}"),
                }
                .into(),
            ));
        }
        if view.shape() != shape.dims() {
            return Err(self.fail(
                LoadError::ShapeMismatch {
                    tensor: name.to_owned(),
                    expected: shape.dims().to_vec(),
                    found: view.shape().to_vec(),
                }
                .into(),
            ));
        }
        shard.load(name, device)?.to_dtype(dtype)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        match self.shard(name) {
            Some(shard) => shard.load(name, device)?.to_dtype(dtype),
            None => Err(self.fail(
                LoadError::MissingTensor {
                    tensor: name.to_owned(),
                }
                .into(),
            )),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }
}
