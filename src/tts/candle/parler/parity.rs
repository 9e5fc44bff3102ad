//! Numerical parity with the PyTorch reference (`parler-tts` 0.2.3, transformers 4.46.1).
//!
//! `tests/fixtures/parler_reference.py` loads the model written by [`write_fixture_model`] into
//! `ParlerTTSForConditionalGeneration` and stores what it computes in
//! `tests/fixtures/parler_tiny_reference.safetensors`; this test recomputes each quantity with our
//! code on the same weights and compares: the encoder, the first steps' logits, greedy codes and
//! end-to-end audio of three scenarios (plain; "eos", where every codebook ends; "early_eos",
//! where codebook 0 ends by column 5 and the audio is shorter), and DAC decoding. Regenerate
//! the fixture with (the Python packages are in `tests/fixtures/requirements.txt`, installed in
//! `../parler-venv`):
//!
//! ```text
//! PARLER_FIXTURE_DIR=/tmp/parler-tiny cargo test write_fixture_model -- --ignored
//! ../parler-venv/bin/python tests/fixtures/parler_reference.py /tmp/parler-tiny tests/fixtures/parler_tiny_reference.safetensors
//! ```
//!
//! A rerun on the same CPU reproduces the fixture bit for bit; on another CPU its floats move by
//! up to about 1e-5 (MKL and oneDNN choose kernels by CPU; the fixture's metadata names the
//! CPU) while the codes stay the same.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Module, Tensor};

use super::decoder::{StepInputs, additive_mask};
use super::generate::{GenItem, Special, generate};
use super::load::{WEIGHTS_FILE, load_dir};
use super::write_tiny_model;
use crate::tts::candle::sample::{Rng, SamplingParams};

const SEED: u64 = 7;

/// The tiny model with every bias, norm gain and snake `alpha` randomised too (the tiny
/// model fixes them to 0 / 1, which would hide a mis-mapped bias or gain).
fn write_parity_model(dir: &Path) {
    write_tiny_model(dir, SEED).unwrap();
    let path = dir.join(WEIGHTS_FILE);
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let mut names: Vec<String> = tensors.keys().cloned().collect();
    names.sort();
    let mut rng = Rng::new(SEED ^ 0xB1A5);
    let mut out = HashMap::new();
    for name in names {
        let t = tensors[&name].clone();
        let dims = t.dims().to_vec();
        let n: usize = dims.iter().product();
        let t = if name.ends_with(".bias") {
            let v: Vec<f32> = (0..n)
                .map(|_| (rng.next_f64() as f32 - 0.5) * 0.2)
                .collect();
            Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
        } else if name.ends_with("layer_norm.weight") || name.ends_with("alpha") {
            let v: Vec<f32> = (0..n).map(|_| 0.5 + rng.next_f64() as f32).collect();
            Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
        } else {
            t
        };
        out.insert(name, t);
    }
    candle_core::safetensors::save(&out, &path).unwrap();
}

/// The "eos" scenario of the reference script: row EOS of head `cb` becomes 1.2 times the
/// row of token `src` (`EOS_ROWS` in `tests/fixtures/parler_reference.py`).
const EOS_ROWS: [(usize, usize); 2] = [(1, 31), (2, 39)];
const EOS_ROW_SCALE: f32 = 1.2;

fn write_eos_model(dir: &Path, eos: usize) {
    write_eos_rows(dir, eos, &EOS_ROWS);
}

/// The parity model with row EOS of head `cb` set to `EOS_ROW_SCALE` times row `src`.
fn write_eos_rows(dir: &Path, eos: usize, edits: &[(usize, usize)]) {
    write_parity_model(dir);
    let path = dir.join(WEIGHTS_FILE);
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    for &(cb, src) in edits {
        let name = format!("decoder.lm_heads.{cb}.weight");
        let mut rows = tensors[&name].to_vec2::<f32>().unwrap();
        rows[eos] = rows[src].iter().map(|v| v * EOS_ROW_SCALE).collect();
        let (n, d) = (rows.len(), rows[0].len());
        let flat: Vec<f32> = rows.into_iter().flatten().collect();
        tensors.insert(name, Tensor::from_vec(flat, (n, d), &Device::Cpu).unwrap());
    }
    candle_core::safetensors::save(&tensors, &path).unwrap();
}

#[test]
#[ignore = "writes the model the reference script reads; set PARLER_FIXTURE_DIR"]
fn write_fixture_model() {
    let dir = PathBuf::from(std::env::var("PARLER_FIXTURE_DIR").expect("PARLER_FIXTURE_DIR"));
    write_parity_model(&dir);
    println!("wrote {}", dir.display());
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape");
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn ids(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::I64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| u32::try_from(v).unwrap())
        .collect()
}

#[test]
fn matches_the_pytorch_reference() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/parler_tiny_reference.safetensors");
    let reference = candle_core::safetensors::load(&fixture, &Device::Cpu).unwrap();
    let r = |name: &str| {
        reference
            .get(name)
            .unwrap_or_else(|| panic!("fixture lacks {name}"))
            .clone()
    };
    let dir = tempfile::tempdir().unwrap();
    write_parity_model(dir.path());
    let device = Device::Cpu;
    let mut loaded = load_dir(dir.path(), &device, DType::F32).unwrap();
    let model = &mut loaded.model;
    let desc_ids = ids(&r("description_ids"));
    let prompt_ids = ids(&r("prompt_ids"));

    // The tokenizer gives the ids the reference tokenizer gave.
    let text = |n: &str| String::from_utf8(ids(&r(n)).iter().map(|&b| b as u8).collect()).unwrap();
    let enc = loaded
        .prompt_tokenizer
        .encode(text("description_text"), true)
        .unwrap();
    assert_eq!(enc.get_ids(), desc_ids.as_slice(), "description tokens");
    let enc = loaded
        .prompt_tokenizer
        .encode(text("prompt_text"), true)
        .unwrap();
    assert_eq!(enc.get_ids(), prompt_ids.as_slice(), "prompt tokens");

    // (a) T5 encoder output, and after the projection to the decoder's width.
    let desc = Tensor::new(desc_ids.as_slice(), &device)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    model.text_encoder.clear_kv_cache();
    let hidden = model.text_encoder.forward(&desc).unwrap();
    let d_enc = max_abs(&hidden.squeeze(0).unwrap(), &r("encoder_hidden"));
    let projected = match &model.enc_to_dec_proj {
        Some(p) => p.forward(&hidden).unwrap(),
        None => hidden.clone(),
    };
    let d_proj = max_abs(&projected.squeeze(0).unwrap(), &r("encoder_projected"));

    // (b) decoder logits of the first steps, fed the reference's greedy columns.
    let ref_columns = r("greedy_columns"); // (K, columns) i64
    let (k, n_cols) = ref_columns.dims2().unwrap();
    let ref_logits = r("step_logits"); // (steps, K, vocab)
    let steps = ref_logits.dim(0).unwrap();
    let prompt = model
        .embed_prompts
        .forward(
            &Tensor::new(prompt_ids.as_slice(), &device)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
        )
        .unwrap();
    let p = prompt_ids.len();
    model.decoder.clear_cache();
    let mut d_logits = 0f32;
    for t in 1..=steps {
        let col: Vec<u32> = ids(&ref_columns.i((.., t - 1)).unwrap());
        let input = Tensor::from_vec(col, (1, k, 1), &device).unwrap();
        let logits = if t == 1 {
            let n = p + 1;
            let pos = Tensor::from_vec((0..n as u32).collect::<Vec<_>>(), (1, n), &device).unwrap();
            let mask = additive_mask((1, 1, n, n), DType::F32, &device, |_, i, j| j <= i).unwrap();
            model
                .decoder
                .forward(
                    &input,
                    &StepInputs {
                        prompt: Some(&prompt),
                        positions: &pos,
                        self_mask: Some(&mask),
                        encoder: Some(&projected),
                        encoder_mask: None,
                    },
                )
                .unwrap()
        } else {
            let pos = Tensor::from_vec(vec![(p + t - 1) as u32], (1, 1), &device).unwrap();
            model
                .decoder
                .forward(
                    &input,
                    &StepInputs {
                        prompt: None,
                        positions: &pos,
                        self_mask: None,
                        encoder: None,
                        encoder_mask: None,
                    },
                )
                .unwrap()
        };
        let d = max_abs(&logits.squeeze(0).unwrap(), &ref_logits.i(t - 1).unwrap());
        println!("step {t} logits max abs diff {d:e}");
        d_logits = d_logits.max(d);
    }

    // (c) greedy generation through our loop.
    let cfg = &loaded.config;
    let sp = Special::new(cfg, 0);
    let max_columns = ids(&r("max_columns"))[0] as usize;
    let item = GenItem {
        description_ids: desc_ids.clone(),
        prompt_ids: prompt_ids.clone(),
        max_columns,
        sampling: SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
        },
        seed: 0,
    };
    let ours = generate(model, &sp, &[item], &device).unwrap().remove(0);
    let theirs: Vec<Vec<u32>> = (0..k).map(|cb| ids(&ref_columns.i(cb).unwrap())).collect();
    let ours_len = ours[0].len();
    println!("greedy columns: ours {ours_len}, reference {n_cols}");
    let mismatch = (0..k)
        .flat_map(|cb| (0..ours_len.min(n_cols)).map(move |t| (cb, t)))
        .filter(|&(cb, t)| ours[cb][t] != theirs[cb][t])
        .count();
    println!("greedy code mismatches: {mismatch}");

    // (c') the reference's end-to-end audio of its greedy codes: undelay, drop frames with
    // special codes, DAC.
    let frames = super::generate::undelay(&theirs, cfg.audio_encoder.codebook_size);
    let wave = model.codec.decode(&frames, &device).unwrap();
    let n = wave.len();
    let d_gen_wave = max_abs(
        &Tensor::from_vec(wave, n, &device).unwrap(),
        &r("generated_waveform"),
    );

    // (c'') the "eos" scenario: every codebook ends and generation stops early. Codebook 0
    // ends on its own (column 13) before the others may, so the audio is the plain one; the
    // early-EOS test below covers an end that shortens it.
    let eos_dir = tempfile::tempdir().unwrap();
    write_eos_model(eos_dir.path(), cfg.decoder.eos_token_id as usize);
    let mut eos_loaded = load_dir(eos_dir.path(), &device, DType::F32).unwrap();
    let eos_rows = r("eos_rows");
    let written =
        candle_core::safetensors::load(eos_dir.path().join(WEIGHTS_FILE), &device).unwrap();
    let mine_rows: Vec<Tensor> = EOS_ROWS
        .iter()
        .map(|&(cb, _)| {
            written[&format!("decoder.lm_heads.{cb}.weight")]
                .i(cfg.decoder.eos_token_id as usize)
                .unwrap()
        })
        .collect();
    let d_rows = max_abs(&Tensor::stack(&mine_rows, 0).unwrap(), &eos_rows);
    assert_eq!(d_rows, 0.0, "the eos edit differs from the reference's");
    let item = GenItem {
        description_ids: desc_ids.clone(),
        prompt_ids: prompt_ids.clone(),
        max_columns,
        sampling: SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
        },
        seed: 0,
    };
    let eos_ours = generate(&mut eos_loaded.model, &sp, &[item], &device)
        .unwrap()
        .remove(0);
    let eos_ref = r("eos_greedy_columns");
    let eos_theirs: Vec<Vec<u32>> = (0..k).map(|cb| ids(&eos_ref.i(cb).unwrap())).collect();
    println!(
        "eos scenario columns: ours {}, reference {}",
        eos_ours[0].len(),
        eos_theirs[0].len()
    );
    let eos_frames = super::generate::undelay(&eos_ours, cfg.audio_encoder.codebook_size);
    let wave = eos_loaded.model.codec.decode(&eos_frames, &device).unwrap();
    let n = wave.len();
    let d_eos_wave = max_abs(
        &Tensor::from_vec(wave, n, &device).unwrap(),
        &r("eos_generated_waveform"),
    );

    // (d) DAC decode of a fixed code matrix.
    let codes = r("codec_codes"); // (K, frames) i64
    let frames: Vec<Vec<u32>> = (0..codes.dim(1).unwrap())
        .map(|j| ids(&codes.i((.., j)).unwrap()))
        .collect();
    let wave = model.codec.decode(&frames, &device).unwrap();
    let ref_wave = r("codec_waveform").flatten_all().unwrap();
    let n = wave.len();
    let d_wave = max_abs(&Tensor::from_vec(wave, n, &device).unwrap(), &ref_wave);

    // (d') one frame (candle's own DAC decoder panics on it; see codec.rs).
    let wave = model.codec.decode(&frames[..1], &device).unwrap();
    let n = wave.len();
    let ref_one = r("codec_waveform_1frame");
    let d_one = max_abs(&Tensor::from_vec(wave, n, &device).unwrap(), &ref_one);
    let peak = ref_one
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    println!("one-frame waveform max abs diff {d_one:e} (reference peak {peak:e})");

    println!("encoder max abs diff {d_enc:e}");
    println!("projected encoder max abs diff {d_proj:e}");
    println!("step logits max abs diff {d_logits:e}");
    println!("waveform max abs diff {d_wave:e}");
    println!("generated waveform max abs diff {d_gen_wave:e}");
    println!("eos scenario waveform max abs diff {d_eos_wave:e}");
    assert!(d_enc < 1e-5, "encoder {d_enc}");
    assert!(d_proj < 1e-5, "projection {d_proj}");
    assert!(d_logits < 1e-5, "logits {d_logits}");
    assert_eq!(ours_len, n_cols, "greedy length");
    assert_eq!(ours, theirs, "greedy codes");
    assert!(d_wave < 1e-4, "waveform {d_wave}");
    assert!(d_one < 1e-4, "one-frame waveform {d_one}");
    assert!(d_gen_wave < 1e-4, "generated waveform {d_gen_wave}");
    assert_eq!(eos_ours, eos_theirs, "eos scenario codes");
    assert!(d_eos_wave < 1e-4, "eos scenario waveform {d_eos_wave}");
}

/// The column whose codebook-0 token lends its head row to EOS in the early-EOS case
/// (`EARLY_COLUMN` in `tests/fixtures/parler_reference.py`).
const EARLY_COLUMN: usize = 5;

/// An EOS case whose audio differs from the plain one, against the reference's "early_eos"
/// scenario. The "eos" scenario leaves codebook 0 alone, and codebook 0 ends (column 13)
/// before the others may, so its waveform is the plain one. Here codebook 0's EOS row also
/// becomes 1.2 times the row of the token the plain greedy run picked at column 5, so
/// codebook 0 ends by then: the staircase, the stop rule and the dropping of frames that
/// hold a special code (EOS, PAD, and a BOS that codebook 2 samples at column 6) then decide
/// a shorter audio, which must be PyTorch's.
#[test]
fn an_early_eos_shortens_the_audio_and_keeps_the_reference_codes_before_it() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/parler_tiny_reference.safetensors");
    let reference = candle_core::safetensors::load(&fixture, &Device::Cpu).unwrap();
    let r = |name: &str| {
        reference
            .get(name)
            .unwrap_or_else(|| panic!("fixture lacks {name}"))
            .clone()
    };
    let columns = |name: &str| -> Vec<Vec<u32>> {
        let t = r(name);
        (0..t.dim(0).unwrap())
            .map(|cb| ids(&t.i(cb).unwrap()))
            .collect()
    };
    let device = Device::Cpu;
    let plain = columns("greedy_columns");
    let theirs = columns("early_eos_greedy_columns");
    let k = plain.len();

    let dir = tempfile::tempdir().unwrap();
    write_parity_model(dir.path());
    let cfg = load_dir(dir.path(), &device, DType::F32).unwrap().config;
    let eos = cfg.decoder.eos_token_id;
    let mut edits = vec![(0, plain[0][EARLY_COLUMN] as usize)];
    edits.extend(EOS_ROWS);
    write_eos_rows(dir.path(), eos as usize, &edits);
    let written = candle_core::safetensors::load(dir.path().join(WEIGHTS_FILE), &device).unwrap();
    let rows: Vec<Tensor> = edits
        .iter()
        .map(|&(cb, _)| {
            written[&format!("decoder.lm_heads.{cb}.weight")]
                .i(eos as usize)
                .unwrap()
        })
        .collect();
    let d_rows = max_abs(&Tensor::stack(&rows, 0).unwrap(), &r("early_eos_rows"));
    assert_eq!(
        d_rows, 0.0,
        "the early-eos edit differs from the reference's"
    );

    let mut loaded = load_dir(dir.path(), &device, DType::F32).unwrap();
    let item = GenItem {
        description_ids: ids(&r("description_ids")),
        prompt_ids: ids(&r("prompt_ids")),
        max_columns: ids(&r("max_columns"))[0] as usize,
        sampling: SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
        },
        seed: 0,
    };
    let ours = generate(&mut loaded.model, &Special::new(&cfg, 0), &[item], &device)
        .unwrap()
        .remove(0);
    println!(
        "early eos columns: ours {}, reference {}, plain reference {}",
        ours[0].len(),
        theirs[0].len(),
        plain[0].len()
    );
    assert_eq!(ours, theirs, "early eos codes");

    // The reference's own run: codebook 0 ends by column 5, and before its EOS every code is
    // the plain run's (nothing else changed until EOS is fed back).
    let ended = theirs[0]
        .iter()
        .position(|&t| t == eos)
        .expect("codebook 0 ends");
    println!("early eos: codebook 0 ends at column {ended}");
    assert!(ended <= EARLY_COLUMN, "codebook 0 ended at {ended}");
    for cb in 0..k {
        assert_eq!(theirs[cb][..ended], plain[cb][..ended], "codebook {cb}");
        if cb > 0 {
            assert_eq!(theirs[cb][ended], plain[cb][ended], "codebook {cb}");
        }
    }

    // Our audio of our codes is the reference's end-to-end audio, and shorter than the plain
    // run's: frame j reads columns j + 1, j + 2 and j + 3, so frames from column `ended` of
    // codebook 0 on are gone and the first `ended - 2` are the plain run's.
    let size = cfg.audio_encoder.codebook_size;
    let early = super::generate::undelay(&ours, size);
    let plain_frames = super::generate::undelay(&plain, size);
    assert!(
        (ended - 2..ended).contains(&early.len()),
        "{} frames",
        early.len()
    );
    assert_eq!(early[..ended - 2], plain_frames[..ended - 2]);
    let wave = loaded.model.codec.decode(&early, &device).unwrap();
    let n = wave.len();
    let ref_wave = r("early_eos_generated_waveform");
    let d_wave = max_abs(&Tensor::from_vec(wave, n, &device).unwrap(), &ref_wave);
    println!("early eos waveform max abs diff {d_wave:e} ({n} samples)");
    assert!(d_wave < 1e-4, "early eos waveform {d_wave}");
    let plain_len = r("generated_waveform").elem_count();
    assert!(
        0 < n && n < plain_len,
        "early eos audio has {n} samples, the plain one {plain_len}"
    );
}
