//! Text to Piper phoneme ids through the `espeak-ng` program.
//!
//! Piper phonemizes with eSpeak NG's library, clause by clause, and writes each clause's
//! closing punctuation (`,` `;` `:` followed by a space, `.` `?` `!`) into the phoneme
//! string, so the voice hears where to pause and whether it asks. The `espeak-ng --ipa`
//! command line drops that punctuation, so this module cuts the text into clauses itself
//! (at `, ; : . ? !` followed by white space or the end), phonemizes each clause with one
//! `espeak-ng` run, and puts the punctuation back as Piper does. Like the offline voice, it
//! runs eSpeak NG (GPL-3.0-or-later) as a separate program and never links it.
//!
//! The phonemes are decomposed (Unicode NFD, as Piper does) and mapped through the voice's
//! `phoneme_id_map` with Piper's framing: start symbol, each phoneme followed by the pad
//! symbol, end symbol. Phonemes the voice does not know are skipped, as Piper skips them.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use unicode_normalization::UnicodeNormalization as _;

use super::config::{BOS, EOS, PAD, VoiceConfig};
use crate::tts::TtsError;

/// Punctuation that ends a clause, and whether Piper puts a space after it.
fn clause_end(c: char) -> Option<bool> {
    match c {
        ',' | ';' | ':' => Some(true),
        '.' | '?' | '!' => Some(false),
        _ => None,
    }
}

/// The text cut into clauses, each with the punctuation that closed it (if any).
pub(crate) fn clauses(text: &str) -> Vec<(String, Option<char>)> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        let at_break = clause_end(c).is_some() && chars.peek().is_none_or(|n| n.is_whitespace());
        if at_break {
            out.push((current.trim().to_owned(), Some(c)));
            current.clear();
        } else {
            current.push(c);
        }
    }
    if !current.trim().is_empty() {
        out.push((current.trim().to_owned(), None));
    }
    out
}

/// Runs `espeak-ng` to turn text into Piper's phonemes and ids.
#[derive(Debug, Clone)]
pub(crate) struct Phonemizer {
    binary: PathBuf,
    voice: String,
    /// The character eSpeak writes inside multi-letter phonemes (`--tie`), if any: Kokoro's
    /// mapping needs to see `a^ɪ` as one diphthong.
    tie: Option<char>,
}

impl Phonemizer {
    pub(crate) fn new(binary: &Path, voice: &str) -> Self {
        Self {
            binary: binary.to_owned(),
            voice: voice.to_owned(),
            tie: None,
        }
    }

    /// The same phonemizer, with eSpeak marking multi-letter phonemes with `tie`.
    pub(crate) fn with_tie(mut self, tie: char) -> Self {
        self.tie = Some(tie);
        self
    }

    /// Piper's phoneme string for `text`, punctuation included.
    pub(crate) fn phonemes(&self, text: &str) -> Result<String, TtsError> {
        let pieces = clauses(text);
        let mut out = String::new();
        for (i, (clause, end)) in pieces.iter().enumerate() {
            if !clause.is_empty() {
                out.push_str(&self.ipa(clause)?);
            }
            if let Some(end) = end {
                out.push(*end);
                // Piper starts each sentence anew; within one chunk, a space separates them.
                if clause_end(*end) == Some(true) || i + 1 < pieces.len() {
                    out.push(' ');
                }
            }
        }
        Ok(out.trim_end_matches(' ').nfd().collect())
    }

    /// Piper's ids for `text`; [`TtsError::EmptyText`] when nothing in it can be spoken.
    pub(crate) fn ids(&self, config: &VoiceConfig, text: &str) -> Result<Vec<u32>, TtsError> {
        let phonemes = self.phonemes(text)?;
        let ids = to_ids(config, &phonemes);
        // Start, pad, end: nothing was said.
        if ids.len() <= 3 {
            return Err(TtsError::EmptyText);
        }
        Ok(ids)
    }

    /// One clause through `espeak-ng --ipa`: its lines (eSpeak may still split a clause, at
    /// brackets for instance) joined by spaces, language-switch marks like `(fr)` removed.
    pub(crate) fn ipa(&self, clause: &str) -> Result<String, TtsError> {
        let mut command = Command::new(&self.binary);
        command.args(["-q", "--ipa", "--stdin", "-b", "1", "-v", &self.voice]);
        if let Some(tie) = self.tie {
            command.arg(format!("--tie={tie}"));
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| TtsError::Backend(format!("cannot start espeak-ng: {e}")))?;
        let mut stdin = child
            .stdin
            .take()
            .ok_or_else(|| TtsError::Backend("espeak-ng stdin was not captured".into()))?;
        // Write from another thread while this one drains stdout, so neither pipe fills up.
        let text = clause.as_bytes();
        let (written, output) = std::thread::scope(|scope| {
            let writer = scope.spawn(move || {
                let result = stdin.write_all(text);
                drop(stdin);
                result
            });
            let output = child.wait_with_output();
            (writer.join(), output)
        });
        let output = output.map_err(|e| TtsError::Backend(format!("espeak-ng: {e}")))?;
        if !output.status.success() {
            return Err(TtsError::Backend(format!(
                "espeak-ng exited with {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        if !matches!(written, Ok(Ok(()))) {
            return Err(TtsError::Backend("writing to espeak-ng failed".into()));
        }
        let text = String::from_utf8_lossy(&output.stdout);
        let joined = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        Ok(strip_language_marks(&joined))
    }
}

/// Removes eSpeak's `(en)`-style language switch marks.
fn strip_language_marks(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find('(') {
        out.push_str(&rest[..start]);
        match rest[start..].find(')') {
            Some(len) => rest = &rest[start + len + 1..],
            None => {
                rest = &rest[start..];
                break;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Piper's framing: `^ _ p1 _ p2 _ ... $`; unknown phonemes are skipped.
pub(crate) fn to_ids(config: &VoiceConfig, phonemes: &str) -> Vec<u32> {
    let map = &config.phoneme_ids;
    let pad = map.get(&PAD).cloned().unwrap_or_default();
    let mut ids = Vec::with_capacity(phonemes.len() * 2 + 3);
    ids.extend(map.get(&BOS).into_iter().flatten());
    ids.extend(&pad);
    for c in phonemes.chars() {
        match map.get(&c) {
            Some(p) => {
                ids.extend(p);
                ids.extend(&pad);
            }
            None => tracing::debug!(phoneme = %c, "phoneme not in the voice's map; skipped"),
        }
    }
    ids.extend(map.get(&EOS).into_iter().flatten());
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clauses_end_at_punctuation_before_a_space() {
        assert_eq!(
            clauses("Hello, world. It costs 3.5 dollars; fine"),
            vec![
                ("Hello".to_owned(), Some(',')),
                ("world".to_owned(), Some('.')),
                ("It costs 3.5 dollars".to_owned(), Some(';')),
                ("fine".to_owned(), None),
            ]
        );
    }

    #[test]
    fn language_marks_are_removed() {
        assert_eq!(
            strip_language_marks("ʃˈɛɹ (fr)bɔ̃ʒuʁ(en) jes"),
            "ʃˈɛɹ bɔ̃ʒuʁ jes"
        );
    }
}
