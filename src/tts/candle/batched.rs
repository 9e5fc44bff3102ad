//! What every Candle backend's `synthesize_batch` does around its model: requests are
//! prepared one by one, so one that fails validation gets its own error without failing
//! the others, and the prepared ones run in model batches of at most `max_batch`.

use crate::tts::{Audio, SynthesisRequest, TtsError};

/// Prepares each request, runs the prepared ones through `run` in order, at most
/// `max_batch` at a time, and puts every result at its request's index.
pub(crate) fn run_batched<T: Clone>(
    requests: &[SynthesisRequest],
    max_batch: usize,
    prepare: impl Fn(&SynthesisRequest) -> Result<T, TtsError>,
    run: impl Fn(&[T]) -> Vec<Result<Audio, TtsError>>,
) -> Vec<Result<Audio, TtsError>> {
    let mut results: Vec<Option<Result<Audio, TtsError>>> = requests.iter().map(|_| None).collect();
    let mut ready: Vec<(usize, T)> = Vec::with_capacity(requests.len());
    for (i, request) in requests.iter().enumerate() {
        match prepare(request) {
            Ok(item) => ready.push((i, item)),
            Err(err) => results[i] = Some(Err(err)),
        }
    }
    for chunk in ready.chunks(max_batch.max(1)) {
        let items: Vec<T> = chunk.iter().map(|(_, item)| item.clone()).collect();
        for ((i, _), result) in chunk.iter().zip(run(&items)) {
            results[*i] = Some(result);
        }
    }
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(TtsError::Backend("request was not run".into()))))
        .collect()
}
