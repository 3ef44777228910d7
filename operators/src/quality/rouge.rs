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

/// The tokens ROUGE compares, as described in the module documentation.
pub fn tokenize(text: &str, stem: bool) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut word = String::new();
    let finish = |word: &mut String, tokens: &mut Vec<String>| {
        if !word.is_empty() {
            let token = std::mem::take(word);
            tokens.push(if stem && token.len() > 3 {
                porter::stem(&token)
            } else {
                token
            });
        }
    };
    for c in text.chars() {
        if is_cjk(c) {
            finish(&mut word, &mut tokens);
            tokens.push(c.to_string());
            continue;
        }
        for lower in c.to_lowercase() {
            if lower.is_ascii_lowercase() || lower.is_ascii_digit() {
                word.push(lower);
            } else {
                finish(&mut word, &mut tokens);
            }
        }
    }
    finish(&mut word, &mut tokens);
    tokens
}

/// ROUGE-N of `candidate` against `reference`, both already tokenized.
pub fn rouge_n(candidate: &[String], reference: &[String], n: usize) -> Score {
    let n = n.max(1);
    let (theirs, ours) = (ngram_counts(reference, n), ngram_counts(candidate, n));
    let matches = theirs
        .iter()
        .map(|(gram, &count)| count.min(ours.get(gram).copied().unwrap_or(0)))
        .sum();
    let total = |tokens: &[String]| (tokens.len() + 1).saturating_sub(n);
    Score::new(matches, total(candidate), total(reference))
}

fn ngram_counts(tokens: &[String], n: usize) -> HashMap<&[String], usize> {
    let mut counts = HashMap::new();
    for gram in tokens.windows(n) {
        *counts.entry(gram).or_insert(0) += 1;
    }
    counts
}

/// ROUGE-L of `candidate` against `reference`, both already tokenized.
pub fn rouge_l(candidate: &[String], reference: &[String]) -> Score {
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
fn lcs_len(a: &[String], b: &[String]) -> usize {
    let (long, short) = if a.len() >= b.len() { (a, b) } else { (b, a) };
    let mut row = vec![0usize; short.len() + 1];
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
    row[short.len()]
}

/// ROUGE-1, ROUGE-2 and ROUGE-L of one pair, tokenizing each text once.
pub fn rouge_all(candidate: &str, reference: &str, stem: bool) -> [Score; 3] {
    let candidate = tokenize(candidate, stem);
    let reference = tokenize(reference, stem);
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

    fn toks(text: &str) -> Vec<String> {
        tokenize(text, false)
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
        let r = rouge_n(&toks("the the the"), &toks("the cat"), 1);
        assert_eq!((r.precision, r.recall), (1.0 / 3.0, 0.5));
        // Empty sides score 0, even against each other.
        assert_eq!(rouge_l(&[], &[]), Score::default());
        assert_eq!(rouge_n(&[], &toks("a b"), 1), Score::default());
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
            let (ta, tb) = (toks(&a), toks(&b));
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
