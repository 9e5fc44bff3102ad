//! Fetching a checkpoint from the Hugging Face hub (feature `hub`).
//!
//! Workers usually get their model baked into an image or a volume, so loading takes a
//! local directory; this is the convenience for development machines. Files land in the
//! standard hub cache (`$HF_HOME`, honouring `HF_TOKEN`), shared with Python tools.

use std::path::PathBuf;

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Repo, RepoType};

use super::parler::ModelError;
use super::parler::load::{
    CONFIG_FILE, DESCRIPTION_TOKENIZER_FILE, GENERATION_CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE,
    WEIGHTS_INDEX_FILE,
};

/// Downloads what [`ParlerSynthesizer::load`](super::ParlerSynthesizer::load) reads from
/// `repo_id` (at `revision`, default `main`) and returns the local snapshot directory.
pub fn download_from_hub(repo_id: &str, revision: Option<&str>) -> Result<PathBuf, ModelError> {
    let failed = |e: &dyn std::fmt::Display| ModelError::Download {
        repo: repo_id.to_owned(),
        reason: e.to_string(),
    };
    let api = ApiBuilder::from_env()
        .with_progress(false)
        .build()
        .map_err(|e| failed(&e))?;
    let repo = api.repo(Repo::with_revision(
        repo_id.to_owned(),
        RepoType::Model,
        revision.unwrap_or("main").to_owned(),
    ));
    let info = repo.info().map_err(|e| failed(&e))?;
    let has = |name: &str| info.siblings.iter().any(|s| s.rfilename == name);

    let config = repo.get(CONFIG_FILE).map_err(|e| failed(&e))?;
    repo.get(TOKENIZER_FILE).map_err(|e| failed(&e))?;
    for optional in [GENERATION_CONFIG_FILE, DESCRIPTION_TOKENIZER_FILE] {
        if has(optional) {
            repo.get(optional).map_err(|e| failed(&e))?;
        }
    }
    if has(WEIGHTS_INDEX_FILE) {
        let index = repo.get(WEIGHTS_INDEX_FILE).map_err(|e| failed(&e))?;
        let text = std::fs::read_to_string(&index).map_err(|e| failed(&e))?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| failed(&e))?;
        let mut shards: Vec<&str> = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .map(|m| m.values().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        shards.sort_unstable();
        shards.dedup();
        for shard in shards {
            repo.get(shard).map_err(|e| failed(&e))?;
        }
    } else {
        repo.get(WEIGHTS_FILE).map_err(|e| failed(&e))?;
    }
    config
        .parent()
        .map(PathBuf::from)
        .ok_or_else(|| failed(&"the hub cache returned a path without a directory"))
}
