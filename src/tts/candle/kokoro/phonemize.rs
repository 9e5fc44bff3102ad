//! Text to Kokoro's phoneme ids through the `espeak-ng` program.
//!
//! Kokoro was trained on misaki's phonemes: IPA with diphthongs as single letters (`A` for
//! eɪ, `I` for aɪ, `O` for oʊ, ...) and a few American-English simplifications. misaki falls
//! back to eSpeak NG for words it does not know and maps eSpeak's IPA to its own set; this
//! module does that mapping for every word, so a worker needs only `espeak-ng` (run as a
//! separate program, as the Piper and offline voices do: GPL stays out of the binary). Clause
//! punctuation is put back as Piper's phonemizer does (`piper::phonemize`), since Kokoro's
//! vocabulary has it and pauses at it.
//!
//! The ids are the phonemes looked up in Kokoro's vocabulary (`VOCAB`, from the MIT-licensed
//! `vocab.json` of kokoro-onnx), framed by the pad id 0 at both ends; phonemes the vocabulary
//! lacks are skipped, as Kokoro skips them.

use crate::tts::TtsError;
use crate::tts::candle::piper::phonemize::{Phonemizer, clauses};

/// Kokoro v1.0's phoneme vocabulary (`vocab.json`): symbol → id. Id 0 is the pad that frames
/// every input.
pub(crate) const VOCAB: &[(char, u32)] = &[
    (';', 1),
    (':', 2),
    (',', 3),
    ('.', 4),
    ('!', 5),
    ('?', 6),
    ('—', 9),
    ('…', 10),
    ('"', 11),
    ('(', 12),
    (')', 13),
    ('“', 14),
    ('”', 15),
    (' ', 16),
    ('\u{303}', 17),
    ('ʣ', 18),
    ('ʥ', 19),
    ('ʦ', 20),
    ('ʨ', 21),
    ('ᵝ', 22),
    ('ꭧ', 23),
    ('A', 24),
    ('I', 25),
    ('O', 31),
    ('Q', 33),
    ('S', 35),
    ('T', 36),
    ('W', 39),
    ('Y', 41),
    ('ᵊ', 42),
    ('a', 43),
    ('b', 44),
    ('c', 45),
    ('d', 46),
    ('e', 47),
    ('f', 48),
    ('h', 50),
    ('i', 51),
    ('j', 52),
    ('k', 53),
    ('l', 54),
    ('m', 55),
    ('n', 56),
    ('o', 57),
    ('p', 58),
    ('q', 59),
    ('r', 60),
    ('s', 61),
    ('t', 62),
    ('u', 63),
    ('v', 64),
    ('w', 65),
    ('x', 66),
    ('y', 67),
    ('z', 68),
    ('ɑ', 69),
    ('ɐ', 70),
    ('ɒ', 71),
    ('æ', 72),
    ('β', 75),
    ('ɔ', 76),
    ('ɕ', 77),
    ('ç', 78),
    ('ɖ', 80),
    ('ð', 81),
    ('ʤ', 82),
    ('ə', 83),
    ('ɚ', 85),
    ('ɛ', 86),
    ('ɜ', 87),
    ('ɟ', 90),
    ('ɡ', 92),
    ('ɥ', 99),
    ('ɨ', 101),
    ('ɪ', 102),
    ('ʝ', 103),
    ('ɯ', 110),
    ('ɰ', 111),
    ('ŋ', 112),
    ('ɳ', 113),
    ('ɲ', 114),
    ('ɴ', 115),
    ('ø', 116),
    ('ɸ', 118),
    ('θ', 119),
    ('œ', 120),
    ('ɹ', 123),
    ('ɾ', 125),
    ('ɻ', 126),
    ('ʁ', 128),
    ('ɽ', 129),
    ('ʂ', 130),
    ('ʃ', 131),
    ('ʈ', 132),
    ('ʧ', 133),
    ('ʊ', 135),
    ('ʋ', 136),
    ('ʌ', 138),
    ('ɣ', 139),
    ('ɤ', 140),
    ('χ', 142),
    ('ʎ', 143),
    ('ʒ', 147),
    ('ʔ', 148),
    ('ˈ', 156),
    ('ˌ', 157),
    ('ː', 158),
    ('ʰ', 162),
    ('ʲ', 164),
    ('↓', 169),
    ('→', 171),
    ('↗', 172),
    ('↘', 173),
    ('ᵻ', 177),
];

/// The pad id that starts and ends every input.
pub(crate) const PAD: u32 = 0;

/// eSpeak NG's IPA (with `^` ties) to misaki's phonemes, longest first, as misaki's
/// `EspeakFallback.E2M` orders them.
const E2M: &[(&str, &str)] = &[
    ("ʔˌn\u{329}", "ʔn"),
    ("ʔn\u{329}", "ʔn"),
    ("a^ɪ", "I"),
    ("a^ʊ", "W"),
    ("d^ʒ", "ʤ"),
    ("e^ɪ", "A"),
    ("t^ʃ", "ʧ"),
    ("ɔ^ɪ", "Y"),
    ("ə^l", "ᵊl"),
    ("ʲo", "jo"),
    ("ʲə", "jə"),
    ("e", "A"),
    ("ʲ", ""),
    ("ɚ", "əɹ"),
    ("r", "ɹ"),
    ("x", "k"),
    ("ç", "k"),
    ("ɐ", "ə"),
    ("ɬ", "l"),
    ("\u{303}", ""),
];

/// Maps one clause of eSpeak IPA (American or British English) to misaki's phonemes.
pub(crate) fn to_misaki(ipa: &str, british: bool) -> String {
    let mut s = ipa.to_owned();
    for (from, to) in E2M {
        s = s.replace(from, to);
    }
    // A syllabic consonant (`n̩`) becomes a schwa before it (`ᵊn`).
    let mut out = String::with_capacity(s.len());
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if i + 1 < chars.len() && chars[i + 1] == '\u{329}' && !chars[i].is_whitespace() {
            out.push('ᵊ');
            out.push(chars[i]);
            i += 2;
        } else {
            if chars[i] != '\u{329}' {
                out.push(chars[i]);
            }
            i += 1;
        }
    }
    let mut s = out;
    if british {
        s = s
            .replace("e^ə", "ɛː")
            .replace("iə", "ɪə")
            .replace("ə^ʊ", "Q");
    } else {
        s = s
            .replace("o^ʊ", "O")
            .replace("ɜːɹ", "ɜɹ")
            .replace("ɜː", "ɜɹ")
            .replace("ɪə", "iə")
            .replace('ː', "");
    }
    // misaki: "for espeak < 1.52", and Kokoro v1.0's flap and glottal stop.
    s.replace('o', "ɔ")
        .replace('ɾ', "T")
        .replace('ʔ', "t")
        .replace('^', "")
}

/// Kokoro's phonemizer: `espeak-ng` per clause, mapped to misaki's phonemes.
#[derive(Debug, Clone)]
pub(crate) struct KokoroPhonemizer {
    espeak: Phonemizer,
    british: bool,
}

impl KokoroPhonemizer {
    /// `binary` is the `espeak-ng` program; British English when `british`.
    pub(crate) fn new(binary: &std::path::Path, british: bool) -> Self {
        let voice = if british { "en-gb" } else { "en-us" };
        Self {
            espeak: Phonemizer::new(binary, voice).with_tie('^'),
            british,
        }
    }

    /// Kokoro's phoneme string for `text`, clause punctuation included.
    pub(crate) fn phonemes(&self, text: &str) -> Result<String, TtsError> {
        let mut out = String::new();
        for (clause, end) in clauses(text) {
            if !clause.is_empty() {
                out.push_str(&to_misaki(&self.espeak.ipa(&clause)?, self.british));
            }
            if let Some(end) = end {
                out.push(end);
                out.push(' ');
            }
        }
        Ok(out.trim().to_owned())
    }
}

/// `phonemes` as Kokoro's ids, framed by [`PAD`]; unknown symbols are skipped.
pub(crate) fn to_ids(phonemes: &str) -> Vec<u32> {
    let mut ids = Vec::with_capacity(phonemes.chars().count() + 2);
    ids.push(PAD);
    for c in phonemes.chars() {
        match VOCAB.iter().find(|(symbol, _)| *symbol == c) {
            Some((_, id)) => ids.push(*id),
            None => tracing::debug!(phoneme = %c, "phoneme not in Kokoro's vocabulary; skipped"),
        }
    }
    ids.push(PAD);
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn espeak_diphthongs_become_misaki_letters() {
        assert_eq!(to_misaki("həlˈo^ʊ ðˈɛ^ɹ", false), "həlˈO ðˈɛɹ");
        assert_eq!(to_misaki("ðɪs ɪz ɐ tˈɛst", false), "ðɪs ɪz ə tˈɛst");
        assert_eq!(to_misaki("kəkˈoːɹo^ʊ vˈɔ^ɪs", false), "kəkˈɔɹO vˈYs");
        assert_eq!(to_misaki("bˈʌʔn\u{329}", false), "bˈʌtn");
        assert_eq!(to_misaki("lˈɪʔl\u{329}", false), "lˈɪtᵊl");
    }

    #[test]
    fn ids_come_from_the_vocabulary_framed_by_pads() {
        assert_eq!(to_ids("hˈO."), vec![0, 50, 156, 31, 4, 0]);
        // Unknown symbols are skipped.
        assert_eq!(to_ids("h☃"), vec![0, 50, 0]);
        assert_eq!(VOCAB.len(), 114);
    }
}
