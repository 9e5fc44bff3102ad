//! Picking the next audio token from logits: temperature, top-k, top-p, seeded.
//!
//! Sampling runs on the CPU over one codebook's logits at a time (about a thousand values),
//! with our own small generator, so a seed gives the same tokens on every device and every
//! candle version, and each request in a batch draws from its own stream.

/// How one request samples; [`temperature`](Self::temperature) 0 means greedy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct SamplingParams {
    /// Divides the logits; 0 (or less) picks the most likely token.
    pub(crate) temperature: f64,
    /// Keeps only the k most likely tokens; 0 keeps all.
    pub(crate) top_k: usize,
    /// Keeps the most likely tokens whose probabilities add up to at least this; 1 keeps all.
    pub(crate) top_p: f64,
}

/// SplitMix64: tiny, fast, and fully determined by its seed.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub(crate) fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1_u64 << 53) as f64)
    }
}

/// Index of the largest finite logit (the first on ties); 0 if none is finite.
pub(crate) fn argmax(logits: &[f32]) -> u32 {
    let mut best: Option<(usize, f32)> = None;
    for (i, &l) in logits.iter().enumerate() {
        if l.is_nan() {
            continue;
        }
        if best.is_none_or(|(_, b)| l > b) {
            best = Some((i, l));
        }
    }
    best.map_or(0, |(i, _)| u32::try_from(i).unwrap_or(u32::MAX))
}

/// Draws one token from `logits` (masked entries are `-inf`).
pub(crate) fn sample(logits: &[f32], params: &SamplingParams, rng: &mut Rng) -> u32 {
    if params.temperature <= 0.0 {
        return argmax(logits);
    }
    // (index, scaled logit), most likely first.
    let mut ranked: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .filter(|(_, l)| l.is_finite())
        .map(|(i, &l)| (i, f64::from(l) / params.temperature))
        .collect();
    if ranked.is_empty() {
        return argmax(logits);
    }
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if params.top_k > 0 && params.top_k < ranked.len() {
        // Like Hugging Face's TopKLogitsWarper, ties with the k-th value are kept.
        let kth = ranked[params.top_k - 1].1;
        ranked.retain(|&(_, l)| l >= kth);
    }
    let max = ranked[0].1;
    let mut probs: Vec<f64> = ranked.iter().map(|&(_, l)| (l - max).exp()).collect();
    let total: f64 = probs.iter().sum();
    if params.top_p < 1.0 {
        // Keep the smallest head whose mass reaches top_p (at least one token).
        let mut cumulative = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            cumulative += p / total;
            if cumulative >= params.top_p {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep.max(1));
        ranked.truncate(keep.max(1));
    }
    let total: f64 = probs.iter().sum();
    if !(total.is_finite() && total > 0.0) {
        return argmax(logits);
    }
    let mut target = rng.next_f64() * total;
    for (&(index, _), p) in ranked.iter().zip(&probs) {
        if target < *p {
            return u32::try_from(index).unwrap_or(u32::MAX);
        }
        target -= p;
    }
    ranked
        .last()
        .map_or(0, |&(i, _)| u32::try_from(i).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f64, top_k: usize, top_p: f64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
        }
    }

    #[test]
    fn zero_temperature_is_greedy_and_skips_masked_tokens() {
        let mut rng = Rng::new(1);
        let logits = [0.1, 3.0, f32::NEG_INFINITY, 2.9];
        for _ in 0..10 {
            assert_eq!(sample(&logits, &params(0.0, 0, 1.0), &mut rng), 1);
        }
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NAN, -1.0]), 2);
    }

    #[test]
    fn same_seed_same_draws_and_distribution_follows_softmax() {
        let logits = [0.0_f32, (3.0_f32).ln()]; // p = 0.25, 0.75
        let p = params(1.0, 0, 1.0);
        let draw = |seed| {
            let mut rng = Rng::new(seed);
            (0..4000)
                .map(|_| sample(&logits, &p, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        let ones = draw(7).iter().filter(|&&t| t == 1).count() as f64 / 4000.0;
        assert!((ones - 0.75).abs() < 0.03, "{ones}");
    }

    #[test]
    fn top_k_and_top_p_cut_the_tail() {
        let logits = [5.0_f32, 4.0, 0.0, -1.0];
        let mut rng = Rng::new(3);
        for _ in 0..500 {
            assert!(sample(&logits, &params(1.0, 2, 1.0), &mut rng) < 2);
            // p(0) ≈ 0.72 < 0.8, so the top-p head is tokens 0 and 1.
            assert!(sample(&logits, &params(1.0, 0, 0.8), &mut rng) < 2);
            assert_eq!(sample(&logits, &params(1.0, 0, 0.5), &mut rng), 0);
        }
    }

    #[test]
    fn never_samples_a_masked_token() {
        let logits = [f32::NEG_INFINITY, 0.0, 0.0];
        let mut rng = Rng::new(9);
        for _ in 0..500 {
            assert_ne!(sample(&logits, &params(1.5, 0, 1.0), &mut rng), 0);
        }
    }
}
