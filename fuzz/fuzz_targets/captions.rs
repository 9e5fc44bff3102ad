//! Caption writing on any cue list: no panic, cue text never carries a blank line (which
//! would end the cue early) and WebVTT text never carries markup or an arrow.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use voxqueue::tts::{Caption, to_srt, to_vtt};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Each line is one cue: "<start ms> <end ms> <text>", with `\u{1}` for a newline.
    let captions: Vec<Caption> = text
        .lines()
        .enumerate()
        .filter_map(|(i, line)| {
            let mut parts = line.splitn(3, ' ');
            let start: u64 = parts.next()?.parse().ok()?;
            let end: u64 = parts.next()?.parse().ok()?;
            let words = parts.next().unwrap_or_default().replace('\u{1}', "\n");
            Some(Caption::new(
                i + 1,
                Duration::from_millis(start),
                Duration::from_millis(end),
                words,
            ))
        })
        .collect();
    let srt = to_srt(&captions);
    assert_eq!(
        srt.split("\n\n").filter(|c| !c.is_empty()).count(),
        captions.len()
    );
    let vtt = to_vtt(&captions);
    assert!(vtt.starts_with("WEBVTT\n"));
    for cue in vtt.split("\n\n").skip(1) {
        for line in cue.lines().skip(2) {
            assert!(!line.contains('<') && !line.contains("-->"), "{line:?}");
        }
    }
});
