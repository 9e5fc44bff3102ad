//! The autoregressive loop: descriptions and transcripts in, codec frames out.
//!
//! We drive the model's public parts ourselves instead of candle's `Model::generate`, which
//! has no batching, no per-request seed, no top-k and no end-of-speech staircase. The loop
//! follows the reference `ParlerTTSForConditionalGeneration.generate`:
//!
//! - The description is encoded by the T5 encoder (and projected to the decoder's width);
//!   the transcript ("prompt") is embedded and prepended to the decoder's input.
//! - Codebook `k` is delayed by `k` steps: column `t` of codebook `k` is forced to BOS while
//!   `t <= k` and to PAD in the last `num_codebooks - 1 - k` columns of the budget, so frame
//!   `j` is made of column `j + k + 1` of each codebook `k`.
//! - A codebook may end (sample EOS) only once every lower codebook has ended, advancing one
//!   codebook per step (the reference's `ParlerTTSLogitsProcessor`); after EOS it only emits
//!   PAD. A sequence stops when all its codebooks ended or its budget is spent.
//! - Afterwards the delay is undone and frames holding any code outside the codebook (PAD,
//!   BOS, unused ids) are dropped, as the reference does before decoding.
//!
//! Batches pad the transcripts on the right and the descriptions to a common length and mask
//! the padding in self- and cross-attention. Unlike the reference, whose positions count the
//! padding, every sequence keeps its own positions, and each draws from its own seeded
//! sampler, so a request sounds the same alone or in any batch (what deduplication assumes).
//! Each description is encoded alone because candle's T5 encoder takes no attention mask;
//! that is exactly what a masked batched encode computes.

use candle_core::{DType, Device, Module, Result, Tensor};

use super::config::ParlerConfig;
use super::decoder::{StepInputs, additive_mask};
use super::load::ParlerModel;
use crate::tts::candle::sample::{Rng, SamplingParams, sample};

/// One sequence to generate.
#[derive(Debug, Clone)]
pub(crate) struct GenItem {
    /// Tokens of the speaker description (for the T5 encoder).
    pub(crate) description_ids: Vec<u32>,
    /// Tokens of the transcript (for the prompt embedding).
    pub(crate) prompt_ids: Vec<u32>,
    /// Budget in decoder columns, including the start column; at least `num_codebooks + 2`.
    pub(crate) max_columns: usize,
    pub(crate) sampling: SamplingParams,
    pub(crate) seed: u64,
}

/// Token ids and sizes the loop needs, taken from the config once.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Special {
    pub(crate) num_codebooks: usize,
    pub(crate) codebook_size: usize,
    pub(crate) start: u32,
    pub(crate) bos: u32,
    pub(crate) pad: u32,
    pub(crate) eos: u32,
    pub(crate) max_positions: usize,
    /// EOS is suppressed until this many columns were generated.
    pub(crate) min_new_tokens: usize,
}

impl Special {
    pub(crate) fn new(cfg: &ParlerConfig, min_new_tokens: usize) -> Self {
        Self {
            num_codebooks: cfg.decoder.num_codebooks,
            codebook_size: cfg.audio_encoder.codebook_size,
            start: cfg.start_token(),
            bos: cfg.decoder.bos_token_id,
            pad: cfg.decoder.pad_token_id,
            eos: cfg.decoder.eos_token_id,
            max_positions: cfg.decoder.max_position_embeddings,
            min_new_tokens,
        }
    }
}

/// The token the delay pattern forces at column `t` of codebook `k`, if any.
pub(crate) fn forced_token(t: usize, k: usize, max_columns: usize, sp: &Special) -> Option<u32> {
    if t <= k {
        Some(sp.bos)
    } else if t + sp.num_codebooks >= max_columns + 1 + k {
        Some(sp.pad)
    } else {
        None
    }
}

/// Undoes the delay pattern: frame `j` is column `j + k + 1` of codebook `k`. Frames with a
/// code outside `0..codebook_size` are dropped.
pub(crate) fn undelay(columns: &[Vec<u32>], codebook_size: usize) -> Vec<Vec<u32>> {
    let k = columns.len();
    let len = columns.iter().map(Vec::len).min().unwrap_or(0);
    let limit = u32::try_from(codebook_size).unwrap_or(u32::MAX);
    (0..len.saturating_sub(k))
        .map(|j| {
            (0..k)
                .map(|cb| columns[cb][j + cb + 1])
                .collect::<Vec<u32>>()
        })
        .filter(|frame| frame.iter().all(|&c| c < limit))
        .collect()
}

/// Per-sequence progress.
struct Seq {
    /// `[codebook][column]`, column 0 being the start token.
    columns: Vec<Vec<u32>>,
    ended: Vec<bool>,
    /// Lowest codebook that has not ended: the highest allowed to end now.
    first_open: usize,
    done: bool,
    max_columns: usize,
    rng: Rng,
    sampling: SamplingParams,
}

/// Generates every item; returns each one's delayed columns (`[codebook][column]`).
pub(crate) fn generate(
    model: &mut ParlerModel,
    sp: &Special,
    items: &[GenItem],
    device: &Device,
) -> Result<Vec<Vec<Vec<u32>>>> {
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let batch = items.len();
    let k_count = sp.num_codebooks;
    let dtype = model.decoder.dtype();
    let (encoded, desc_lens) = encode_descriptions(model, items, device)?;
    let desc_len = encoded.dim(1)?;
    let encoder_mask = if desc_lens.iter().all(|&l| l == desc_len) {
        None
    } else {
        Some(additive_mask(
            (batch, 1, 1, desc_len),
            dtype,
            device,
            |b, _, j| j < desc_lens[b],
        )?)
    };
    let (prompts, prompt_lens) = embed_prompts(model, items, device)?;
    let prompt_len = prompts.dim(1)?;
    let padded_prompts = prompt_lens.iter().any(|&l| l != prompt_len);

    let mut seqs = Vec::with_capacity(batch);
    for (item, &len) in items.iter().zip(&prompt_lens) {
        // Each sequence's positions start after its own transcript.
        let room = sp.max_positions.saturating_sub(len);
        if room < k_count + 2 {
            candle_core::bail!(
                "transcript of {len} tokens leaves no room in {} decoder positions",
                sp.max_positions
            );
        }
        seqs.push(Seq {
            columns: vec![vec![sp.start]; k_count],
            ended: vec![false; k_count],
            first_open: 0,
            done: false,
            max_columns: item.max_columns.clamp(k_count + 2, room),
            rng: Rng::new(item.seed),
            sampling: item.sampling,
        });
    }
    let last_column = seqs.iter().map(|s| s.max_columns).max().unwrap_or(0);

    model.decoder.clear_cache();
    for t in 1..last_column {
        // Input: column t - 1 of every codebook of every sequence.
        let input: Vec<u32> = seqs
            .iter()
            .flat_map(|s| s.columns.iter().map(move |c| c[t - 1]))
            .collect();
        let input = Tensor::from_vec(input, (batch, k_count, 1), device)?;
        let logits = if t == 1 {
            // Transcript (padded on the right) then the start column, causally masked.
            let n = prompt_len + 1;
            let positions: Vec<u32> = prompt_lens
                .iter()
                .flat_map(|&len| {
                    (0..n).map(move |j| position(if j < prompt_len { j.min(len) } else { len }))
                })
                .collect();
            let positions = Tensor::from_vec(positions, (batch, n), device)?;
            let mask = additive_mask((batch, 1, n, n), dtype, device, |b, i, j| {
                j <= i && (j >= prompt_len || j < prompt_lens[b])
            })?;
            let inputs = StepInputs {
                prompt: Some(&prompts),
                positions: &positions,
                self_mask: Some(&mask),
                encoder: Some(&encoded),
                encoder_mask: encoder_mask.as_ref(),
            };
            model.decoder.forward(&input, &inputs)?
        } else {
            let kv_len = prompt_len + t;
            let positions: Vec<u32> = prompt_lens
                .iter()
                .map(|&len| position(len + t - 1))
                .collect();
            let positions = Tensor::from_vec(positions, (batch, 1), device)?;
            let mask = if padded_prompts {
                Some(additive_mask(
                    (batch, 1, 1, kv_len),
                    dtype,
                    device,
                    |b, _, j| j >= prompt_len || j < prompt_lens[b],
                )?)
            } else {
                None
            };
            let inputs = StepInputs {
                prompt: None,
                positions: &positions,
                self_mask: mask.as_ref(),
                encoder: None,
                encoder_mask: encoder_mask.as_ref(),
            };
            model.decoder.forward(&input, &inputs)?
        };
        // (batch, codebooks, vocab), brought to the CPU once per step.
        let logits = logits.to_dtype(DType::F32)?.to_vec3::<f32>()?;
        for (seq, seq_logits) in seqs.iter_mut().zip(logits) {
            step(seq, seq_logits, t, sp);
        }
        if seqs.iter().all(|s| s.done) {
            break;
        }
    }
    tracing::debug!(
        batch,
        columns = seqs.iter().map(|s| s.columns[0].len()).max().unwrap_or(0),
        "generated audio tokens"
    );
    Ok(seqs.into_iter().map(|s| s.columns).collect())
}

/// A position id as the embedding lookup wants it.
fn position(p: usize) -> u32 {
    u32::try_from(p).unwrap_or(u32::MAX)
}

/// Chooses column `t` of every codebook of one sequence.
fn step(seq: &mut Seq, mut logits: Vec<Vec<f32>>, t: usize, sp: &Special) {
    let k_count = sp.num_codebooks;
    if seq.done {
        for column in &mut seq.columns {
            column.push(sp.pad);
        }
        return;
    }
    if seq.ended[seq.first_open] && seq.first_open + 1 < k_count {
        seq.first_open += 1;
    }
    let eos = sp.eos as usize;
    // As Hugging Face's MinNewTokensLengthLogitsProcessor: column t is new token t - 1.
    let eos_allowed_now = t > sp.min_new_tokens;
    for (k, row) in logits.iter_mut().enumerate().take(k_count) {
        let token = if let Some(forced) = forced_token(t, k, seq.max_columns, sp) {
            forced
        } else if seq.ended[k] {
            sp.pad
        } else {
            if (k > seq.first_open || !eos_allowed_now) && eos < row.len() {
                row[eos] = f32::NEG_INFINITY;
            }
            let token = sample(row, &seq.sampling, &mut seq.rng);
            if token == sp.eos {
                seq.ended[k] = true;
            }
            token
        };
        seq.columns[k].push(token);
    }
    if seq.ended.iter().all(|&e| e) || t + 1 >= seq.max_columns {
        seq.done = true;
    }
}

/// Encodes each description alone and pads the results to one length; returns the lengths.
fn encode_descriptions(
    model: &mut ParlerModel,
    items: &[GenItem],
    device: &Device,
) -> Result<(Tensor, Vec<usize>)> {
    let mut encoded = Vec::with_capacity(items.len());
    for item in items {
        let ids = Tensor::new(item.description_ids.as_slice(), device)?.unsqueeze(0)?;
        model.text_encoder.clear_kv_cache();
        // The encoder may run in a wider dtype than the decoder (see `text_encoder_dtype`).
        let hidden = model
            .text_encoder
            .forward(&ids)?
            .to_dtype(model.decoder.dtype())?;
        let hidden = match &model.enc_to_dec_proj {
            Some(proj) => proj.forward(&hidden)?,
            None => hidden,
        };
        encoded.push(hidden);
    }
    let lens: Vec<usize> = items.iter().map(|i| i.description_ids.len()).collect();
    let max_len = lens.iter().copied().max().unwrap_or(0);
    Ok((pad_and_cat(encoded, max_len)?, lens))
}

/// Embeds each transcript and pads on the right to one length; returns the lengths.
fn embed_prompts(
    model: &ParlerModel,
    items: &[GenItem],
    device: &Device,
) -> Result<(Tensor, Vec<usize>)> {
    let mut embedded = Vec::with_capacity(items.len());
    for item in items {
        let ids = Tensor::new(item.prompt_ids.as_slice(), device)?.unsqueeze(0)?;
        embedded.push(model.embed_prompts.forward(&ids)?);
    }
    let lens: Vec<usize> = items.iter().map(|i| i.prompt_ids.len()).collect();
    let max_len = lens.iter().copied().max().unwrap_or(0);
    Ok((pad_and_cat(embedded, max_len)?, lens))
}

/// Pads each `(1, len, hidden)` tensor with zeros to `(1, max_len, hidden)` and stacks them.
fn pad_and_cat(parts: Vec<Tensor>, max_len: usize) -> Result<Tensor> {
    let padded = parts
        .into_iter()
        .map(|p| {
            let len = p.dim(1)?;
            if len == max_len {
                Ok(p)
            } else {
                p.pad_with_zeros(1, 0, max_len - len)
            }
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&padded, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tts::candle::parler::load::{Loaded, load_dir};
    use crate::tts::candle::parler::write_tiny_model;

    fn special(k: usize) -> Special {
        Special {
            num_codebooks: k,
            codebook_size: 10,
            start: 11,
            bos: 11,
            pad: 10,
            eos: 10,
            max_positions: 100,
            min_new_tokens: 0,
        }
    }

    #[test]
    fn delay_pattern_matches_the_reference_picture() {
        // The docstring of the reference build_delay_pattern_mask, 4 codebooks, 8 columns:
        // [B, -1, -1, -1, -1, P, P, P] / [B, B, -1, -1, -1, -1, P, P] / ...
        let sp = special(4);
        let render = |k: usize| -> String {
            (0..8)
                .map(|t| match forced_token(t, k, 8, &sp) {
                    Some(11) => 'B',
                    Some(10) => 'P',
                    Some(_) => '?',
                    None => '-',
                })
                .collect()
        };
        assert_eq!(render(0), "B----PPP");
        assert_eq!(render(1), "BB----PP");
        assert_eq!(render(2), "BBB----P");
        assert_eq!(render(3), "BBBB----");
    }

    #[test]
    fn undelay_realigns_codebooks_and_drops_special_frames() {
        // Frame j of codebook k sits at column j + k + 1.
        let columns = vec![
            vec![11, 1, 2, 3, 10, 10],
            vec![11, 11, 4, 5, 6, 10],
            vec![11, 11, 11, 7, 8, 9],
        ];
        assert_eq!(
            undelay(&columns, 10),
            vec![vec![1, 4, 7], vec![2, 5, 8], vec![3, 6, 9]]
        );
        // A code past the codebook (here 10 = PAD) drops the whole frame.
        let columns = vec![vec![11, 1, 10, 10], vec![11, 11, 4, 10]];
        assert_eq!(undelay(&columns, 10), vec![vec![1, 4]]);
        assert!(undelay(&[vec![11], vec![11]], 10).is_empty());
    }

    fn greedy() -> SamplingParams {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
        }
    }

    fn fresh_seq(k: usize) -> Seq {
        Seq {
            columns: vec![vec![11]; k],
            ended: vec![false; k],
            first_open: 0,
            done: false,
            max_columns: 50,
            rng: Rng::new(0),
            sampling: greedy(),
        }
    }

    #[test]
    fn codebooks_end_in_order_and_then_pad() {
        let sp = special(3);
        let mut seq = fresh_seq(3);
        // Logits that always prefer EOS (id 10).
        let eager = || vec![vec![0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 5.0, 0.0]; 3];
        for t in 1..10 {
            step(&mut seq, eager(), t, &sp);
            if seq.done {
                break;
            }
        }
        // Codebook 0 ends at column 1; codebook 1 (BOS at 1) may end from column 2 on,
        // codebook 2 from column 3 on: the staircase of the reference.
        assert_eq!(seq.columns[0], [11, 10, 10, 10]);
        assert_eq!(seq.columns[1], [11, 11, 10, 10]);
        assert_eq!(seq.columns[2], [11, 11, 11, 10]);
        assert!(seq.done);
    }

    #[test]
    fn eos_waits_until_min_new_tokens_were_generated() {
        // As MinNewTokensLengthLogitsProcessor: with 3 required, columns 1..=3 (new tokens
        // 0..=2) may not end; column 4 may.
        let sp = Special {
            min_new_tokens: 3,
            ..special(1)
        };
        let mut seq = fresh_seq(1);
        // EOS (10) has the top logit, token 9 the next.
        let eager = || {
            vec![vec![
                0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 5.0, 0.0,
            ]]
        };
        for t in 1..10 {
            step(&mut seq, eager(), t, &sp);
            if seq.done {
                break;
            }
        }
        assert_eq!(seq.columns[0], [11, 9, 9, 9, 10]);
        assert!(seq.done);
    }

    #[test]
    fn logits_without_an_eos_entry_are_sampled_as_they_are() {
        // EOS id 12 lies past these 12 logits: while EOS is suppressed (min_new_tokens)
        // there is nothing to mask, and no index past the row.
        let sp = Special {
            eos: 12,
            pad: 10,
            min_new_tokens: usize::MAX,
            ..special(1)
        };
        let mut seq = fresh_seq(1);
        let row = vec![vec![
            0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0,
        ]];
        step(&mut seq, row, 1, &sp);
        assert_eq!(seq.columns[0], [11, 3]);
        assert!(!seq.ended[0]);
    }

    #[test]
    fn a_sequence_is_done_with_the_last_column_of_its_budget() {
        // A batch stops once every sequence is done: one that ran out of budget must say so
        // at its last column, not one (padding) step later.
        let sp = Special {
            min_new_tokens: usize::MAX,
            ..special(1)
        };
        let mut seq = Seq {
            max_columns: 5,
            ..fresh_seq(1)
        };
        let row = || {
            vec![vec![
                0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0,
            ]]
        };
        let mut last = 0;
        for t in 1..10 {
            step(&mut seq, row(), t, &sp);
            if seq.done {
                last = t;
                break;
            }
        }
        assert_eq!(last, 4);
        assert_eq!(seq.columns[0], [11, 3, 3, 3, 3]);
    }

    /// The tiny model (512 decoder positions, 3 codebooks) and its generation constants,
    /// EOS suppressed so only the budget ends a sequence.
    fn tiny() -> (tempfile::TempDir, Loaded, Special) {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_model(dir.path(), 7).unwrap();
        let loaded = load_dir(dir.path(), &Device::Cpu, DType::F32).unwrap();
        let sp = Special::new(&loaded.config, usize::MAX);
        (dir, loaded, sp)
    }

    fn item(prompt_len: usize, max_columns: usize) -> GenItem {
        GenItem {
            description_ids: vec![7, 8, 1],
            prompt_ids: vec![9; prompt_len],
            max_columns,
            sampling: greedy(),
            seed: 0,
        }
    }

    #[test]
    fn a_budget_below_the_minimum_is_raised_to_num_codebooks_plus_two_columns() {
        let (_dir, mut loaded, sp) = tiny();
        assert_eq!(sp.num_codebooks, 3);
        for budget in [0, 1, 4] {
            let columns = generate(&mut loaded.model, &sp, &[item(4, budget)], &Device::Cpu)
                .unwrap()
                .remove(0);
            // num_codebooks + 2 columns: the start column, the delay, and two frames.
            let lens: Vec<usize> = columns.iter().map(Vec::len).collect();
            assert_eq!(lens, [5, 5, 5], "budget {budget}");
        }
    }

    #[test]
    fn a_transcript_must_leave_room_for_the_minimum_budget() {
        let (_dir, mut loaded, sp) = tiny();
        assert_eq!((sp.max_positions, sp.num_codebooks), (512, 3));
        // 507 tokens leave 5 positions: exactly num_codebooks + 2 columns.
        let columns = generate(&mut loaded.model, &sp, &[item(507, 100)], &Device::Cpu)
            .unwrap()
            .remove(0);
        assert!(columns.iter().all(|c| c.len() == 5));
        // One token more is an error, not a panic.
        let err = generate(&mut loaded.model, &sp, &[item(508, 100)], &Device::Cpu).unwrap_err();
        assert!(
            err.to_string()
                .contains("transcript of 508 tokens leaves no room in 512 decoder positions"),
            "{err}"
        );
    }
}
