//! ROUGE exactly as Google's `rouge-score` package computes it, so that figures from abridge
//! and from the Python tooling teams already use can be compared directly.
//!
//! Tokens: lowercase, then every run of `[a-z0-9]` is a token and everything else
//! separates (rouge-score's default tokenizer), except that each CJK character
//! (Han, Hiragana, Katakana) is a token of its own (the LCSTS convention): rouge-score
//! itself would drop those characters and score Chinese text as empty. Stemming, when
//! asked for, is the Porter stemmer rouge-score uses, on tokens longer than 3 characters.
//!
//! Scores: ROUGE-N from clipped n-gram overlap counts, ROUGE-L from the longest common
//! subsequence; precision over the candidate, recall over the reference, F1 their harmonic
//! mean (0 when both are 0). An empty candidate or reference scores 0, as in rouge-score.

use std::collections::HashMap;
use std::hash::BuildHasher;

use rustc_hash::{FxBuildHasher, FxHashMap};

use super::porter;

/// Precision, recall and their harmonic mean.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Score {
    /// Share of the candidate's n-grams (or tokens, for ROUGE-L) found in the reference.
    pub precision: f64,
    /// Share of the reference's n-grams (or tokens) found in the candidate.
    pub recall: f64,
    /// Harmonic mean of precision and recall.
    pub f1: f64,
}

impl Score {
    fn new(matches: usize, candidate: usize, reference: usize) -> Self {
        let precision = matches as f64 / candidate.max(1) as f64;
        let recall = matches as f64 / reference.max(1) as f64;
        let f1 = if precision + recall > 0.0 {
            2.0 * precision * recall / (precision + recall)
        } else {
            0.0
        };
        Self {
            precision,
            recall,
            f1,
        }
    }
}

/// Whether `c` is scored as a token of its own.
pub fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x3040..=0x309F        // Hiragana
        | 0x30A0..=0x30FF      // Katakana
        | 0x31F0..=0x31FF      // Katakana phonetic extensions
        | 0x3400..=0x4DBF      // CJK extension A
        | 0x4E00..=0x9FFF      // CJK unified ideographs
        | 0xF900..=0xFAFF      // CJK compatibility ideographs
        | 0x20000..=0x323AF    // CJK extensions B–H
    )
}

/// Calls `emit` with each token ROUGE compares, as described in the module documentation.
fn for_each_token(text: &str, stem: bool, mut emit: impl FnMut(&str)) {
    let mut word = String::new();
    let mut utf8 = [0u8; 4];
    let bytes = text.as_bytes();
    let mut at = 0;
    while at < bytes.len() {
        // ASCII byte by byte; other characters decoded (they start at `at`, a boundary).
        let byte = bytes[at];
        if byte.is_ascii() {
            at += 1;
            if byte.is_ascii_alphanumeric() {
                word.push(char::from(byte.to_ascii_lowercase()));
            } else {
                flush(&mut word, stem, &mut emit);
            }
            continue;
        }
        let Some(c) = text[at..].chars().next() else {
            break;
        };
        at += c.len_utf8();
        if is_cjk(c) {
            flush(&mut word, stem, &mut emit);
            emit(c.encode_utf8(&mut utf8));
        } else {
            // Some letters lowercase to ASCII (the Kelvin sign to `k`, `İ` to `i` + a dot).
            for lower in c.to_lowercase() {
                if lower.is_ascii_lowercase() || lower.is_ascii_digit() {
                    word.push(lower);
                } else {
                    flush(&mut word, stem, &mut emit);
                }
            }
        }
    }
    flush(&mut word, stem, &mut emit);
}

/// Emits the word being built, if any (stemmed when asked and longer than 3 characters,
/// as rouge-score does), and starts the next.
fn flush(word: &mut String, stem: bool, emit: &mut impl FnMut(&str)) {
    if word.is_empty() {
        return;
    }
    if stem && word.len() > 3 {
        emit(&porter::stem(word));
    } else {
        emit(word);
    }
    word.clear();
}

/// Numbers for tokens (equal tokens, equal numbers), so that scoring compares integers
/// rather than strings. One vocabulary serves the texts that are compared together; its
/// tokens live in one buffer, so that numbering a pair allocates nothing once warm.
#[derive(Default)]
pub struct Vocabulary {
    /// Token hash → number of the first token seen with that hash.
    by_hash: FxHashMap<u64, u32>,
    /// Number → where the token is in `text`.
    spans: Vec<(usize, usize)>,
    text: String,
    /// Tokens whose hash an earlier, different token already had (astronomically rare,
    /// but then still told apart).
    collisions: HashMap<String, u32>,
}

impl Vocabulary {
    /// The tokens of `text`, as numbers.
    pub fn tokens(&mut self, text: &str, stem: bool) -> Vec<u32> {
        let mut out = Vec::new();
        for_each_token(text, stem, |token| out.push(self.number(token)));
        out
    }

    fn number(&mut self, token: &str) -> u32 {
        // FxHash (rustc's hasher): tokens are short and not adversarial, and SipHash
        // would be a third of the scoring time.
        let hash = FxBuildHasher.hash_one(token.as_bytes());
        match self.by_hash.get(&hash) {
            None => {
                let id = self.add(token);
                self.by_hash.insert(hash, id);
                id
            }
            Some(&id) => {
                let (start, end) = self.spans[id as usize];
                if &self.text[start..end] == token {
                    id
                } else if let Some(&id) = self.collisions.get(token) {
                    id
                } else {
                    let id = self.add(token);
                    self.collisions.insert(token.to_string(), id);
                    id
                }
            }
        }
    }

    fn add(&mut self, token: &str) -> u32 {
        let start = self.text.len();
        self.text.push_str(token);
        self.spans.push((start, self.text.len()));
        (self.spans.len() - 1) as u32
    }

    /// Forgets every token (keeping the memory), for the next pair.
    pub fn clear(&mut self) {
        self.by_hash.clear();
        self.spans.clear();
        self.text.clear();
        self.collisions.clear();
    }
}

/// ROUGE-N of `candidate` against `reference`, both tokenized by one [`Vocabulary`].
pub fn rouge_n(candidate: &[u32], reference: &[u32], n: usize) -> Score {
    let n = n.max(1);
    let matches = match n {
        // Unigrams and bigrams as single integers: sorting those is what takes the time.
        1 | 2 => {
            let pack = |tokens: &[u32]| -> Vec<u64> {
                tokens
                    .windows(n)
                    .map(|g| g.iter().fold(0u64, |key, &t| (key << 32) | u64::from(t)))
                    .collect()
            };
            clipped_matches(pack(candidate), pack(reference))
        }
        _ => clipped_matches(
            candidate.windows(n).collect(),
            reference.windows(n).collect(),
        ),
    };
    let grams = |tokens: &[u32]| (tokens.len() + 1).saturating_sub(n);
    Score::new(matches, grams(candidate), grams(reference))
}

/// How many n-grams of `ours` are in `theirs`, each counted at most as often as `theirs`
/// has it (rouge-score's clipping): a merge of the two sorted lists, as they are short.
fn clipped_matches<K: Ord>(mut ours: Vec<K>, mut theirs: Vec<K>) -> usize {
    ours.sort_unstable();
    theirs.sort_unstable();
    let (mut i, mut j, mut matches) = (0, 0, 0);
    while i < ours.len() && j < theirs.len() {
        match ours[i].cmp(&theirs[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                let gram = &ours[i];
                let a = ours[i..].iter().take_while(|g| *g == gram).count();
                let b = theirs[j..].iter().take_while(|g| *g == gram).count();
                matches += a.min(b);
                i += a;
                j += b;
            }
        }
    }
    matches
}

/// ROUGE-L of `candidate` against `reference`, both tokenized by one [`Vocabulary`].
pub fn rouge_l(candidate: &[u32], reference: &[u32]) -> Score {
    if candidate.is_empty() || reference.is_empty() {
        return Score::default();
    }
    Score::new(
        lcs_len(candidate, reference),
        candidate.len(),
        reference.len(),
    )
}

/// Length of the longest common subsequence, in one row of the dynamic-programming table
/// (the shorter sequence's length), so that very long texts cost time but not memory.
fn lcs_len<T: Eq>(a: &[T], b: &[T]) -> usize {
    let (long, short) = if a.len() >= b.len() { (a, b) } else { (b, a) };
    let mut row = vec![0u32; short.len() + 1];
    for x in long {
        let mut diagonal = 0;
        for (j, y) in short.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = if x == y {
                diagonal + 1
            } else {
                above.max(row[j])
            };
            diagonal = above;
        }
    }
    row[short.len()] as usize
}

/// ROUGE-1, ROUGE-2 and ROUGE-L of one pair, tokenizing each text once.
pub fn rouge_all(candidate: &str, reference: &str, stem: bool) -> [Score; 3] {
    let mut vocabulary = Vocabulary::default();
    let candidate = vocabulary.tokens(candidate, stem);
    let reference = vocabulary.tokens(reference, stem);
    [
        rouge_n(&candidate, &reference, 1),
        rouge_n(&candidate, &reference, 2),
        rouge_l(&candidate, &reference),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The tokens ROUGE compares, as text.
    fn tokenize(text: &str, stem: bool) -> Vec<String> {
        let mut tokens = Vec::new();
        for_each_token(text, stem, |t| tokens.push(t.to_string()));
        tokens
    }

    fn toks(text: &str) -> Vec<String> {
        tokenize(text, false)
    }

    /// Both texts' tokens, numbered by one vocabulary.
    fn pair(a: &str, b: &str) -> (Vec<u32>, Vec<u32>) {
        let mut vocabulary = Vocabulary::default();
        (vocabulary.tokens(a, false), vocabulary.tokens(b, false))
    }

    #[test]
    fn tokenizes_as_rouge_score_with_cjk_characters_apart() {
        assert_eq!(
            toks("The VPN-client crashed (twice) at 9:30!"),
            ["the", "vpn", "client", "crashed", "twice", "at", "9", "30"]
        );
        assert_eq!(
            toks("打印机离线 printer"),
            ["打", "印", "机", "离", "线", "printer"]
        );
        assert_eq!(toks("Outlook无法同步"), ["outlook", "无", "法", "同", "步"]);
        assert_eq!(toks("カタカナ"), ["カ", "タ", "カ", "ナ"]);
        // Accented and full-width letters are not [a-z]: they separate, as in rouge-score.
        assert_eq!(toks("café ＡＢＣ naïve"), ["caf", "na", "ve"]);
        assert!(toks(" ,.;\n\t ").is_empty());
    }

    #[test]
    fn stemming_applies_to_tokens_longer_than_three_characters() {
        assert_eq!(
            tokenize("printers are running", true),
            ["printer", "are", "run"]
        );
    }

    #[test]
    fn known_scores() {
        // rouge-score: RougeScorer(['rouge1','rouge2','rougeL']).score(
        //   'the cat sat on the mat', 'the cat lay on the mat')
        let [r1, r2, rl] = rouge_all("the cat lay on the mat", "the cat sat on the mat", false);
        assert!((r1.f1 - 5.0 / 6.0).abs() < 1e-12);
        assert!((r2.f1 - 3.0 / 5.0).abs() < 1e-12);
        assert!((rl.f1 - 5.0 / 6.0).abs() < 1e-12);
        // Clipped counts: "the the the" against "the cat" matches one "the".
        let (ours, theirs) = pair("the the the", "the cat");
        let r = rouge_n(&ours, &theirs, 1);
        assert_eq!((r.precision, r.recall), (1.0 / 3.0, 0.5));
        // Empty sides score 0, even against each other.
        assert_eq!(rouge_l(&[], &[]), Score::default());
        assert_eq!(rouge_n(&[], &theirs, 1), Score::default());
    }

    /// Every pair of scripts/make-rouge-fixture.py scores as rouge-score scored it.
    #[test]
    fn matches_rouge_score_on_the_fixture() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/rouge-score-pairs.json");
        let text = std::fs::read_to_string(&path).expect("the ROUGE fixture");
        let pairs: Vec<serde_json::Value> = serde_json::from_str(&text).expect("fixture JSON");
        assert!(pairs.len() >= 1000, "{} pairs", pairs.len());
        let mut worst = 0f64;
        for pair in &pairs {
            let field = |name: &str| pair[name].as_str().expect("text field");
            let (candidate, reference) = (field("candidate"), field("reference"));
            let stem = pair["stem"].as_bool().expect("stem flag");
            let ours = rouge_all(candidate, reference, stem);
            for (name, score) in ["rouge1", "rouge2", "rougeL"].iter().zip(ours) {
                let theirs: Vec<f64> = pair[*name]
                    .as_array()
                    .expect("scores")
                    .iter()
                    .map(|v| v.as_f64().expect("score"))
                    .collect();
                for (mine, expected) in [score.precision, score.recall, score.f1]
                    .iter()
                    .zip(&theirs)
                {
                    worst = worst.max((mine - expected).abs());
                    assert!(
                        (mine - expected).abs() <= 1e-6,
                        "{name} (stem {stem}) of {candidate:?} vs {reference:?}: {score:?}, rouge-score {theirs:?}"
                    );
                }
            }
        }
        assert!(worst <= 1e-6);
    }

    proptest! {
        #[test]
        fn scores_are_bounded_and_identical_texts_score_one(
            a in "[a-c 印机]{0,30}", b in "[a-c 印机]{0,30}", n in 1usize..4
        ) {
            let (ta, tb) = pair(&a, &b);
            for s in [rouge_n(&ta, &tb, n), rouge_l(&ta, &tb)] {
                for v in [s.precision, s.recall, s.f1] {
                    prop_assert!((0.0..=1.0).contains(&v));
                }
                prop_assert!(s.f1 <= s.precision.max(s.recall) + 1e-12);
            }
            // Swapping the sides swaps precision and recall and keeps F1.
            let (ab, ba) = (rouge_l(&ta, &tb), rouge_l(&tb, &ta));
            prop_assert_eq!((ab.precision, ab.recall), (ba.recall, ba.precision));
            prop_assert!((ab.f1 - ba.f1).abs() < 1e-12);
            if ta.len() >= n {
                prop_assert_eq!(rouge_n(&ta, &ta, n).f1, 1.0);
                prop_assert_eq!(rouge_l(&ta, &ta).f1, 1.0);
            }
        }

        #[test]
        fn ngram_matches_agree_with_plain_counting(
            a in "[a-c ]{0,40}", b in "[a-c ]{0,40}", n in 1usize..5
        ) {
            let (ta, tb) = pair(&a, &b);
            let counts = |t: &[u32]| {
                let mut c = HashMap::new();
                for g in t.windows(n) {
                    *c.entry(g.to_vec()).or_insert(0usize) += 1;
                }
                c
            };
            let (ca, cb) = (counts(&ta), counts(&tb));
            let expected: usize = cb.iter().map(|(g, k)| (*k).min(ca.get(g).copied().unwrap_or(0))).sum();
            let s = rouge_n(&ta, &tb, n);
            let candidate_grams = (ta.len() + 1).saturating_sub(n);
            prop_assert!((s.precision * candidate_grams.max(1) as f64 - expected as f64).abs() < 1e-9);
        }

        #[test]
        fn lcs_agrees_with_the_full_table(a in "[ab]{0,12}", b in "[ab]{0,12}") {
            let (ta, tb): (Vec<String>, Vec<String>) = (
                a.chars().map(String::from).collect(),
                b.chars().map(String::from).collect(),
            );
            let mut table = vec![vec![0usize; tb.len() + 1]; ta.len() + 1];
            for i in 1..=ta.len() {
                for j in 1..=tb.len() {
                    table[i][j] = if ta[i - 1] == tb[j - 1] {
                        table[i - 1][j - 1] + 1
                    } else {
                        table[i - 1][j].max(table[i][j - 1])
                    };
                }
            }
            prop_assert_eq!(lcs_len(&ta, &tb), table[ta.len()][tb.len()]);
        }
    }
}
