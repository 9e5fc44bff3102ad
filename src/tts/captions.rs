//! Captions: when each sentence is spoken, as SubRip (SRT) and WebVTT.
//!
//! The long-text driver knows exactly where each sentence's audio starts and ends (it
//! concatenated them), so captions come for free and are sample-accurate; these functions
//! only print them. SRT is what video editors import; WebVTT is what the HTML `<track>`
//! element plays, which is why both exist.

use std::fmt::Write as _;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One caption cue: a piece of text and the span of audio that speaks it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Caption {
    /// The cue number written in the file; 1-based by SRT convention.
    pub index: usize,
    /// When the text starts being spoken, from the start of the audio.
    pub start: Duration,
    /// When it stops being spoken.
    pub end: Duration,
    /// The text spoken in that span.
    pub text: String,
}

impl Caption {
    /// A cue numbered `index` covering `start..end`.
    pub fn new(index: usize, start: Duration, end: Duration, text: impl Into<String>) -> Self {
        Self {
            index,
            start,
            end,
            text: text.into(),
        }
    }
}

/// Renders captions as a SubRip (`.srt`) file: numbered cues with `HH:MM:SS,mmm` times,
/// separated by blank lines.
///
/// Times are rounded *down* to the millisecond so a cue never claims audio past its end.
/// Blank lines inside a cue's text would end the cue early in every SRT parser, so line
/// breaks in the text are kept but empty lines dropped.
pub fn to_srt(captions: &[Caption]) -> String {
    let mut out = String::new();
    for (i, c) in captions.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let _ = writeln!(
            out,
            "{}\n{} --> {}",
            c.index,
            timestamp(c.start, ','),
            timestamp(c.end, ',')
        );
        for line in text_lines(&c.text) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Renders captions as a WebVTT (`.vtt`) file: the `WEBVTT` header, then cues with
/// `HH:MM:SS.mmm` times.
///
/// Cue text is escaped (`&`, `<`, `>`) because WebVTT parses it for markup, and `-->` cannot
/// appear in it; the cue number is kept as the cue identifier so players and the SRT agree.
pub fn to_vtt(captions: &[Caption]) -> String {
    let mut out = String::from("WEBVTT\n");
    for c in captions {
        let _ = writeln!(
            out,
            "\n{}\n{} --> {}",
            c.index,
            timestamp(c.start, '.'),
            timestamp(c.end, '.')
        );
        for line in text_lines(&c.text) {
            out.push_str(&escape_vtt(line));
            out.push('\n');
        }
    }
    out
}

fn text_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines().map(str::trim).filter(|l| !l.is_empty())
}

fn escape_vtt(line: &str) -> String {
    line.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// `HH:MM:SS<sep>mmm`; hours grow past two digits rather than wrap.
fn timestamp(d: Duration, sep: char) -> String {
    let ms = d.as_millis();
    let (h, rest) = (ms / 3_600_000, ms % 3_600_000);
    let (m, rest) = (rest / 60_000, rest % 60_000);
    let (s, ms) = (rest / 1000, rest % 1000);
    format!("{h:02}:{m:02}:{s:02}{sep}{ms:03}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn sample() -> Vec<Caption> {
        vec![
            Caption::new(1, ms(0), ms(1500), "Hello world."),
            Caption::new(
                2,
                ms(1750),
                Duration::from_secs(3723) + ms(4),
                "How are you?",
            ),
        ]
    }

    #[test]
    fn srt_exact() {
        assert_eq!(
            to_srt(&sample()),
            "1\n00:00:00,000 --> 00:00:01,500\nHello world.\n\n\
             2\n00:00:01,750 --> 01:02:03,004\nHow are you?\n"
        );
    }

    #[test]
    fn vtt_exact() {
        assert_eq!(
            to_vtt(&sample()),
            "WEBVTT\n\n\
             1\n00:00:00.000 --> 00:00:01.500\nHello world.\n\n\
             2\n00:00:01.750 --> 01:02:03.004\nHow are you?\n"
        );
    }

    #[test]
    fn empty_inputs() {
        assert_eq!(to_srt(&[]), "");
        assert_eq!(to_vtt(&[]), "WEBVTT\n");
    }

    #[test]
    fn times_round_down_to_the_millisecond() {
        let c = [Caption::new(
            1,
            Duration::from_nanos(999_999),
            Duration::from_nanos(1_999_999_999),
            "x",
        )];
        assert_eq!(to_srt(&c), "1\n00:00:00,000 --> 00:00:01,999\nx\n");
    }

    #[test]
    fn hours_do_not_wrap() {
        let c = [Caption::new(
            7,
            Duration::from_secs(100 * 3600),
            Duration::from_secs(100 * 3600 + 1),
            "late",
        )];
        assert_eq!(
            to_vtt(&c),
            "WEBVTT\n\n7\n100:00:00.000 --> 100:00:01.000\nlate\n"
        );
    }

    #[test]
    fn vtt_escapes_markup_and_arrows() {
        let c = [Caption::new(1, ms(0), ms(10), "a < b && c --> d")];
        assert_eq!(
            to_vtt(&c),
            "WEBVTT\n\n1\n00:00:00.000 --> 00:00:00.010\na &lt; b &amp;&amp; c --&gt; d\n"
        );
    }

    #[test]
    fn blank_lines_in_text_cannot_end_a_cue() {
        let c = [Caption::new(1, ms(0), ms(10), "one\n\n two \r\nthree")];
        assert_eq!(
            to_srt(&c),
            "1\n00:00:00,000 --> 00:00:00,010\none\ntwo\nthree\n"
        );
    }

    #[test]
    fn serde_round_trip() {
        let c = sample();
        let json = serde_json::to_string(&c).unwrap();
        let back: Vec<Caption> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, c);
    }
}
