//! Text normalisation and sentence chunking.
//!
//! Normalisation runs before a request is hashed *and* before it is synthesised, so two
//! requests that differ only in invisible ways (NFD vs NFC accents, a double space, a stray
//! carriage return) share one cache entry and one job, and the backend never sees bytes it
//! might read aloud or choke on. It deliberately stops there: case, words, digits and
//! punctuation reach the backend untouched, because "US" and "us" are spoken differently and
//! expanding numbers or abbreviations is the model's job, done better per language.
//!
//! Sentence chunking exists because TTS models degrade (or run out of memory) on long
//! inputs, and because per-sentence audio gives per-sentence captions. The splitter is a
//! small rule set, not a trained model: it errs towards *not* splitting, since a missed
//! boundary only makes a chunk longer (and [`split_sentences_max`] still bounds it), while a
//! false one ("Dr. | Smith") puts an audible pause in the middle of a phrase.

use unicode_normalization::UnicodeNormalization;
use unicode_normalization::char::is_combining_mark;

/// Canonicalises text for hashing and synthesis.
///
/// Applies Unicode NFC (so "é" written as `e` + combining accent equals the precomposed
/// one), turns every Unicode whitespace character (newline, tab, no-break space, ideographic
/// space, ...) into a plain space, drops other control characters and byte-order marks,
/// collapses whitespace runs to one space and trims both ends. It never changes case, words
/// or punctuation. The result is a fixed point: `normalize(&normalize(s)) == normalize(s)`.
pub fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut pending_space = false;
    for c in text.chars() {
        if c.is_whitespace() {
            pending_space = true;
        } else if c.is_control() || c == '\u{FEFF}' {
            // Dropped without ending a word: a control character between letters is noise,
            // not a separator. (Control characters that *are* separators, like \n and \t,
            // are whitespace and were handled above.)
        } else {
            if pending_space && !out.is_empty() {
                out.push(' ');
            }
            pending_space = false;
            out.push(c);
        }
    }
    // NFC last: removing characters above can bring a base letter and a combining mark
    // together, and they must then compose like any other pair.
    out.nfc().collect()
}

/// Splits text into sentences, keeping each sentence's punctuation and closing quotes.
///
/// Boundaries are `.`, `!`, `?`, `…` (and runs such as `?!` or `...`) followed by
/// whitespace or the end, plus the CJK full stops `。！？`, which end a sentence even with no
/// space after them because CJK text has no spaces. There is no boundary
///
/// - inside numbers and versions (`3.14`, `1.000.000`, `v1.2`): no whitespace follows;
/// - after titles and Latin abbreviations that never end a sentence (`Mr.`, `Mrs.`, `Dr.`,
///   `Prof.`, `St.`, `vs.`, `e.g.`, `i.e.`, ...), after single capital initials (`J. R. R.
///   Tolkien`) and dotted initialisms (`U.S.`, `a.m.`);
/// - after `No.`, `Fig.`, `Vol.`, ... when a number follows (`No. 5`), but there is one in
///   "No. I disagree";
/// - after abbreviations that *can* end a sentence (`etc.`, `Inc.`, `Ltd.`, `Jr.`, `Sr.`,
///   `Co.`) unless the next word starts with a capital letter;
/// - before a lowercase word, after any terminator: `I was... thinking`, `"Stop!" she said`;
/// - after a list number that opens a sentence (`1. First point.`).
///
/// Whitespace inside a sentence is kept as given; pass [`normalize`]d text to get single
/// spaces. Empty or whitespace-only input gives no sentences.
pub fn split_sentences(text: &str) -> Vec<String> {
    sentence_spans(text)
}

/// Like [`split_sentences`], but also cuts any sentence longer than `max_chars` characters so
/// that no chunk exceeds it.
///
/// A long sentence is cut after the last clause mark (`,` `;` `:` and their CJK forms) that
/// leaves at least half a chunk, else at the last space, else (a single huge word, or
/// unspaced CJK text) hard at `max_chars`, never between a letter and its combining marks.
/// The cut prefers clause marks because that is where a reader would breathe. A `max_chars`
/// of 0 is treated as 1.
pub fn split_sentences_max(text: &str, max_chars: usize) -> Vec<String> {
    let max = max_chars.max(1);
    sentence_spans(text)
        .into_iter()
        .flat_map(|s| split_long(&s, max))
        .collect()
}

/// Sentence terminators that need whitespace (or the end) after them.
fn is_terminator(c: char) -> bool {
    matches!(c, '.' | '!' | '?' | '…' | '‼' | '⁇' | '⁈' | '⁉')
}

/// CJK terminators: a boundary even without a following space.
fn is_cjk_terminator(c: char) -> bool {
    matches!(c, '。' | '！' | '？' | '｡')
}

/// Characters that close a quotation or parenthesis and belong to the sentence before them.
fn is_closer(c: char) -> bool {
    matches!(
        c,
        '"' | '\''
            | '”'
            | '’'
            | '»'
            | '›'
            | ')'
            | ']'
            | '}'
            | '」'
            | '』'
            | '）'
            | '】'
            | '〉'
            | '》'
    )
}

/// Characters that open a quotation or parenthesis; skipped when looking at a word.
fn is_opener(c: char) -> bool {
    matches!(
        c,
        '"' | '\''
            | '“'
            | '‘'
            | '«'
            | '‹'
            | '('
            | '['
            | '{'
            | '「'
            | '『'
            | '（'
            | '【'
            | '〈'
            | '《'
            | '¿'
            | '¡'
    )
}

/// Where a reader pauses inside a sentence; preferred cut points for over-long sentences.
fn is_clause_mark(c: char) -> bool {
    matches!(c, ',' | ';' | ':' | '，' | '、' | '；' | '：')
}

/// CJK clause marks need no space after them to be a cut point.
fn is_cjk_clause_mark(c: char) -> bool {
    matches!(c, '，' | '、' | '；' | '：')
}

/// Titles and abbreviations that never end a sentence (compared lowercase, without dot).
const NEVER_FINAL: &[&str] = &[
    "mr", "mrs", "ms", "mx", "dr", "prof", "st", "mt", "ft", "rev", "hon", "gen", "col", "capt",
    "lt", "sgt", "gov", "sen", "rep", "vs", "e.g", "i.e", "cf", "approx", "ca", "viz", "resp",
];

/// Abbreviations that stand before a number ("No. 5", "Fig. 3").
const BEFORE_NUMBER: &[&str] = &[
    "no", "nr", "nos", "fig", "figs", "vol", "p", "pp", "ch", "sec", "art", "eq", "ex",
];

/// Abbreviations that may end a sentence; a boundary only if a capitalised word follows.
const MAYBE_FINAL: &[&str] = &["etc", "inc", "ltd", "jr", "sr", "co", "corp", "al", "bros"];

fn sentence_spans(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let n = chars.len();
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < n {
        let c = chars[i];
        if is_cjk_terminator(c) {
            let mut end = i + 1;
            while end < n && (is_cjk_terminator(chars[end]) || is_terminator(chars[end])) {
                end += 1;
            }
            while end < n && is_closer(chars[end]) {
                end += 1;
            }
            push_trimmed(&mut out, &chars[start..end]);
            start = end;
            i = end;
        } else if is_terminator(c) {
            let run_start = i;
            let mut end = i + 1;
            while end < n && is_terminator(chars[end]) {
                end += 1;
            }
            let run_end = end;
            while end < n && is_closer(chars[end]) {
                end += 1;
            }
            let at_gap = end == n || chars[end].is_whitespace();
            if at_gap && !is_false_boundary(&chars, start, run_start, run_end, end) {
                push_trimmed(&mut out, &chars[start..end]);
                start = end;
            }
            i = end;
        } else {
            i += 1;
        }
    }
    push_trimmed(&mut out, &chars[start..]);
    out
}

/// Decides whether a terminator run at `chars[run_start..run_end]` (closers up to `end`,
/// whitespace or the end after) does *not* end the sentence that began at `sentence_start`.
fn is_false_boundary(
    chars: &[char],
    sentence_start: usize,
    run_start: usize,
    run_end: usize,
    end: usize,
) -> bool {
    let next = chars[end..]
        .iter()
        .copied()
        .find(|&c| !c.is_whitespace() && !is_opener(c));
    let Some(next) = next else {
        return false; // end of text: always a boundary
    };
    if next.is_lowercase() {
        return true; // "I was... thinking", "\"Stop!\" she said", "approx. five"
    }
    if run_end - run_start != 1 || chars[run_start] != '.' {
        return false; // only a single full stop can belong to an abbreviation
    }
    // The word the full stop is attached to, without any opening brackets or quotes.
    let mut token_start = run_start;
    while token_start > 0 && !chars[token_start - 1].is_whitespace() {
        token_start -= 1;
    }
    while token_start < run_start && is_opener(chars[token_start]) {
        token_start += 1;
    }
    let token = &chars[token_start..run_start];
    if token.is_empty() {
        return false;
    }
    let lower: String = token.iter().flat_map(|c| c.to_lowercase()).collect();
    let lower = lower.as_str();
    if NEVER_FINAL.contains(&lower) {
        return true;
    }
    if BEFORE_NUMBER.contains(&lower) && next.is_numeric() {
        return true;
    }
    if MAYBE_FINAL.contains(&lower) {
        return !next.is_uppercase();
    }
    if token.len() == 1 && token[0].is_uppercase() {
        return true; // an initial: "J. R. R. Tolkien"
    }
    if is_initialism(token) {
        return true; // "U.S.", "a.m.", "J.R.R."
    }
    // A list number opening the sentence: "1. First point."
    let first_word = chars[sentence_start..]
        .iter()
        .position(|c| !c.is_whitespace())
        .map(|p| sentence_start + p);
    first_word == Some(token_start) && token.iter().all(|c| c.is_ascii_digit())
}

/// `X.Y` or `X.Y.Z` with single letters: an initialism whose last dot we are looking at.
fn is_initialism(token: &[char]) -> bool {
    token.len() >= 3
        && token.iter().enumerate().all(|(i, c)| {
            if i % 2 == 0 {
                c.is_alphabetic()
            } else {
                *c == '.'
            }
        })
        && token.len() % 2 == 1
}

fn push_trimmed(out: &mut Vec<String>, chars: &[char]) {
    let s: String = chars.iter().collect();
    let s = s.trim();
    if !s.is_empty() {
        out.push(s.to_owned());
    }
}

/// Cuts one sentence into chunks of at most `max` characters (see [`split_sentences_max`]).
fn split_long(sentence: &str, max: usize) -> Vec<String> {
    let chars: Vec<char> = sentence.chars().collect();
    if chars.len() <= max {
        return vec![sentence.to_owned()];
    }
    let mut out = Vec::new();
    let mut rest: &[char] = &chars;
    loop {
        let skip = rest.iter().take_while(|c| c.is_whitespace()).count();
        rest = &rest[skip..];
        if rest.len() <= max {
            push_trimmed(&mut out, rest);
            break;
        }
        let cut = cut_point(rest, max);
        push_trimmed(&mut out, &rest[..cut]);
        rest = &rest[cut..];
    }
    out
}

/// Where to cut `rest` (longer than `max`, not starting with whitespace): returns `c` in
/// `1..=max` so that the chunk is `rest[..c]`.
fn cut_point(rest: &[char], max: usize) -> usize {
    // `rest[c]` exists for every c <= max because rest.len() > max.
    let clause = (1..=max).rev().find(|&c| {
        is_clause_mark(rest[c - 1]) && (rest[c].is_whitespace() || is_cjk_clause_mark(rest[c - 1]))
    });
    let space = (1..=max).rev().find(|&c| rest[c].is_whitespace());
    let chosen = match (clause, space) {
        (Some(c), _) if c * 2 >= max => Some(c),
        (_, Some(s)) => Some(s),
        (c, None) => c,
    };
    chosen.unwrap_or_else(|| {
        // No natural break: cut hard, but keep combining marks with their base letter.
        let mut c = max;
        while c > 1 && is_combining_mark(rest[c]) {
            c -= 1;
        }
        c
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(s: &str) -> Vec<String> {
        split_sentences(s)
    }

    // --- normalize ---

    #[test]
    fn normalize_applies_nfc() {
        let decomposed = "Cafe\u{301}";
        assert_eq!(normalize(decomposed), "Caf\u{e9}");
        assert_eq!(normalize(decomposed), normalize("Caf\u{e9}"));
    }

    #[test]
    fn normalize_collapses_all_whitespace_kinds_and_trims() {
        let s = "  Hello,\t\tworld!\r\n\nNext\u{a0}line\u{3000}here\u{2003}now  ";
        assert_eq!(normalize(s), "Hello, world! Next line here now");
    }

    #[test]
    fn normalize_removes_control_characters_but_keeps_newline_tab_as_space() {
        assert_eq!(normalize("a\u{7}b\u{0}c"), "abc");
        assert_eq!(normalize("a\nb\tc"), "a b c");
        assert_eq!(normalize("\u{feff}Hello \u{1b} world"), "Hello world");
    }

    #[test]
    fn normalize_composes_marks_brought_together_by_removal() {
        assert_eq!(normalize("e\u{7}\u{301}"), "\u{e9}");
    }

    #[test]
    fn normalize_never_changes_case_or_words() {
        assert_eq!(normalize("US"), "US");
        assert_eq!(normalize("us"), "us");
        assert_ne!(normalize("US"), normalize("us"));
        assert_eq!(normalize("Dr. Smith's 3.14 €"), "Dr. Smith's 3.14 €");
    }

    #[test]
    fn normalize_is_idempotent_and_handles_empty() {
        for s in ["", "   ", "\n\t", " a  b ", "e\u{301}\u{7} x", "你好 。"] {
            let once = normalize(s);
            assert_eq!(normalize(&once), once, "{s:?}");
        }
        assert_eq!(normalize(" \n\u{7}\t "), "");
    }

    // --- split_sentences ---

    #[test]
    fn splits_on_basic_terminators() {
        assert_eq!(
            split("Hello world. How are you? I am fine! Really?! Yes."),
            [
                "Hello world.",
                "How are you?",
                "I am fine!",
                "Really?!",
                "Yes."
            ]
        );
    }

    #[test]
    fn keeps_trailing_text_without_terminator() {
        assert_eq!(
            split("Hello. Goodbye without a stop"),
            ["Hello.", "Goodbye without a stop"]
        );
    }

    #[test]
    fn empty_and_whitespace_give_no_sentences() {
        assert!(split("").is_empty());
        assert!(split("   ").is_empty());
    }

    #[test]
    fn does_not_split_after_titles() {
        assert_eq!(
            split("Mr. Smith met Mrs. Jones and Dr. Who at St. Paul's. Prof. Xu came too."),
            [
                "Mr. Smith met Mrs. Jones and Dr. Who at St. Paul's.",
                "Prof. Xu came too."
            ]
        );
    }

    #[test]
    fn does_not_split_after_latin_abbreviations() {
        assert_eq!(
            split("Use a tool, e.g. a hammer. Or not, i.e. never. Cats vs. Dogs is a film."),
            [
                "Use a tool, e.g. a hammer.",
                "Or not, i.e. never.",
                "Cats vs. Dogs is a film."
            ]
        );
    }

    #[test]
    fn etc_inc_ltd_jr_end_a_sentence_only_before_a_capital() {
        assert_eq!(
            split("Apples, pears, etc. are fruit. Acme Inc. makes anvils. Acme Ltd. is British."),
            [
                "Apples, pears, etc. are fruit.",
                "Acme Inc. makes anvils.",
                "Acme Ltd. is British."
            ]
        );
        assert_eq!(
            split("I met John Smith Jr. He was nice."),
            ["I met John Smith Jr.", "He was nice."]
        );
    }

    #[test]
    fn no_and_fig_before_numbers() {
        assert_eq!(
            split("See No. 5 and Fig. 3 for details. No. I disagree."),
            ["See No. 5 and Fig. 3 for details.", "No.", "I disagree."]
        );
    }

    #[test]
    fn does_not_split_after_initials() {
        assert_eq!(
            split(
                "J. R. R. Tolkien wrote books. He lived in the U.K. for years. J.R.R. Martin too."
            ),
            [
                "J. R. R. Tolkien wrote books.",
                "He lived in the U.K. for years.",
                "J.R.R. Martin too."
            ]
        );
    }

    #[test]
    fn does_not_split_inside_numbers_or_versions() {
        assert_eq!(
            split("Pi is 3.14 roughly. Count to 1.000.000 now. Use v1.2 please. It costs 5. Done."),
            [
                "Pi is 3.14 roughly.",
                "Count to 1.000.000 now.",
                "Use v1.2 please.",
                "It costs 5.",
                "Done."
            ]
        );
    }

    #[test]
    fn list_numbers_stay_with_their_item() {
        assert_eq!(
            split("1. First point. 2. Second point."),
            ["1. First point.", "2. Second point."]
        );
    }

    #[test]
    fn ellipsis_before_lowercase_continues_the_sentence() {
        assert_eq!(
            split("I was... thinking about it. Then… Nothing. Wait… what? Yes."),
            [
                "I was... thinking about it.",
                "Then…",
                "Nothing.",
                "Wait… what?",
                "Yes."
            ]
        );
    }

    #[test]
    fn closing_quotes_and_brackets_stay_with_the_sentence() {
        assert_eq!(
            split("He said \"Stop!\" Then he left. (It was late.) «Fin.» “Done.” OK."),
            [
                "He said \"Stop!\"",
                "Then he left.",
                "(It was late.)",
                "«Fin.»",
                "“Done.”",
                "OK."
            ]
        );
        assert_eq!(
            split("\"Stop!\" she said. Fine."),
            ["\"Stop!\" she said.", "Fine."]
        );
    }

    #[test]
    fn splits_cjk_without_spaces() {
        assert_eq!(
            split("你好。今天天气很好！你呢？我很好"),
            ["你好。", "今天天气很好！", "你呢？", "我很好"]
        );
        assert_eq!(split("「はい。」次です。"), ["「はい。」", "次です。"]);
    }

    #[test]
    fn a_run_of_cjk_and_ascii_terminators_ends_one_sentence() {
        assert_eq!(split("真的吗？！好的。"), ["真的吗？！", "好的。"]);
        assert_eq!(split("是吗？!对。"), ["是吗？!", "对。"]);
    }

    #[test]
    fn only_a_full_stop_can_belong_to_a_title() {
        assert_eq!(split("Is it Dr? Yes."), ["Is it Dr?", "Yes."]);
        assert_eq!(split("Ask Dr! Now."), ["Ask Dr!", "Now."]);
    }

    #[test]
    fn opening_brackets_are_skipped_around_a_full_stop() {
        // The word after the stop is lowercase once its bracket is skipped: no boundary.
        assert_eq!(
            split("He stopped. (and then he left.) Fine."),
            ["He stopped. (and then he left.)", "Fine."]
        );
        // The word before the stop is a title once its bracket is skipped: no boundary.
        assert_eq!(
            split("He met (Dr. Smith) today. Fine."),
            ["He met (Dr. Smith) today.", "Fine."]
        );
    }

    #[test]
    fn keeps_inner_whitespace_as_given() {
        assert_eq!(split("A  b. C"), ["A  b.", "C"]);
    }

    // --- split_sentences_max ---

    #[test]
    fn short_sentences_are_not_cut() {
        assert_eq!(
            split_sentences_max("One. Two.", 10),
            split_sentences("One. Two.")
        );
    }

    #[test]
    fn a_letter_with_more_combining_marks_than_fit_is_cut_after_the_letter() {
        // The hard cut walks back over the marks but never to zero, which would loop.
        let text = format!("e{}", "\u{301}".repeat(8));
        let chunks = split_sentences_max(&text, 3);
        assert_eq!(chunks[0], "e");
        assert_eq!(chunks.concat(), text);
        assert!(chunks.iter().all(|c| c.chars().count() <= 3), "{chunks:?}");
    }

    #[test]
    fn a_latin_comma_inside_a_word_is_no_cut_point() {
        // "aaaa,bbbb" is one word: only the space may cut it (a CJK mark would not need one).
        assert_eq!(
            split_sentences_max("aaaa,bbbb cccc", 9),
            ["aaaa,bbbb", "cccc"]
        );
    }

    #[test]
    fn long_sentences_are_cut_at_clause_marks_first() {
        let text = "This part is long enough, and this one too; finally the end.";
        let chunks = split_sentences_max(text, 30);
        assert_eq!(
            chunks,
            [
                "This part is long enough,",
                "and this one too;",
                "finally the end."
            ]
        );
    }

    #[test]
    fn long_sentences_without_clause_marks_are_cut_at_spaces() {
        let chunks = split_sentences_max("aaa bbb ccc ddd eee fff", 8);
        assert_eq!(chunks, ["aaa bbb", "ccc ddd", "eee fff"]);
    }

    #[test]
    fn an_early_clause_mark_loses_to_a_later_space() {
        let chunks = split_sentences_max("Hi, this sentence goes on and on", 20);
        assert_eq!(chunks, ["Hi, this sentence", "goes on and on"]);
    }

    #[test]
    fn a_huge_word_is_cut_hard() {
        let chunks = split_sentences_max("abcdefghij", 4);
        assert_eq!(chunks, ["abcd", "efgh", "ij"]);
        let cjk = split_sentences_max("一二三四五六七", 3);
        assert_eq!(cjk, ["一二三", "四五六", "七"]);
        let cjk = split_sentences_max("一二三，四五六七", 5);
        assert_eq!(cjk, ["一二三，", "四五六七"]);
    }

    #[test]
    fn hard_cuts_keep_combining_marks_with_their_letter() {
        let text = "abe\u{301}\u{301}fgh"; // a b e+2 marks f g h
        let chunks = split_sentences_max(text, 3);
        assert!(chunks.iter().all(|c| c.chars().count() <= 3));
        assert_eq!(chunks.concat(), text);
        assert!(!chunks.iter().any(|c| c.starts_with('\u{301}')));
    }

    #[test]
    fn no_chunk_ever_exceeds_max_and_no_text_is_lost() {
        let text = normalize(
            "Lorem ipsum dolor sit amet, consectetur adipiscing elit; sed do eiusmod tempor \
             incididunt ut labore et dolore magna aliqua. Ut enim ad minim veniam, quis \
             nostrud exercitation ullamco laboris nisi ut aliquip ex ea commodo consequat. \
             Supercalifragilisticexpialidocious! 你好世界你好世界你好世界。",
        );
        for max in [1, 2, 5, 7, 13, 40, 400] {
            let chunks = split_sentences_max(&text, max);
            for c in &chunks {
                assert!(c.chars().count() <= max, "{max}: {c:?}");
                assert!(!c.is_empty());
                assert_eq!(c.trim(), c);
            }
            let strip = |s: &str| s.chars().filter(|c| !c.is_whitespace()).collect::<String>();
            assert_eq!(strip(&chunks.concat()), strip(&text), "max {max}");
        }
    }

    #[test]
    fn zero_max_is_treated_as_one() {
        assert_eq!(split_sentences_max("ab", 0), ["a", "b"]);
    }
}
