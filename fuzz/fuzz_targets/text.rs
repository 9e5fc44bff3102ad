//! Text normalisation and sentence splitting on any UTF-8: no panic, normalisation is a
//! fixed point, and bounded splitting never makes an empty or over-long chunk.
#![no_main]

use libfuzzer_sys::fuzz_target;
use voxqueue::tts::{normalize, split_sentences, split_sentences_max};

fuzz_target!(|data: &[u8]| {
    let Some((&max, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let n = normalize(text);
    assert_eq!(normalize(&n), n);
    assert!(!n.chars().any(char::is_control));
    for chunk in split_sentences(text) {
        assert!(!chunk.trim().is_empty());
    }
    let max = usize::from(max % 64);
    for chunk in split_sentences_max(&n, max) {
        assert!(!chunk.is_empty());
        assert!(chunk.chars().count() <= max.max(1));
    }
});
