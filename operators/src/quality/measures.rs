//! The summary health measures of DESIGN.md, as pure functions of one row's values, so that
//! the metrics stage, the SQL functions and `abridge eval` compute them the same way.

use serde::{Deserialize, Serialize};

use super::rouge;

/// Characters of the summary per character of the text (Unicode scalar values, so a
/// Chinese character counts one). None when the text is empty.
pub fn compression(summary: &str, text: &str) -> Option<f64> {
    let text_chars = text.chars().count();
    (text_chars > 0).then(|| summary.chars().count() as f64 / text_chars as f64)
}

/// Cosine of two vectors; None when their lengths differ or either is all zeros.
pub fn cosine(a: &[f32], b: &[f32]) -> Option<f64> {
    if a.len() != b.len() {
        return None;
    }
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    (na > 0.0 && nb > 0.0).then(|| (dot / (na * nb).sqrt()).clamp(-1.0, 1.0))
}

/// Population standard deviation of the ROUGE-L F1 of each sampled summary against
/// `reference`: how much the wording a row gets depends on the draw. None for fewer than
/// two samples.
pub fn stability(samples: &[&str], reference: &str, stem: bool) -> Option<f64> {
    if samples.len() < 2 {
        return None;
    }
    let mut vocabulary = rouge::Vocabulary::default();
    let reference = vocabulary.tokens(reference, stem);
    let scores: Vec<f64> = samples
        .iter()
        .map(|s| rouge::rouge_l(&vocabulary.tokens(s, stem), &reference).f1)
        .collect();
    // Deviations from the first score, so that identical draws give exactly 0.
    let n = scores.len() as f64;
    let (sum, squares) = scores
        .iter()
        .map(|s| s - scores[0])
        .fold((0.0, 0.0), |(sum, sq), d| (sum + d, sq + d * d));
    Some(((squares - sum * sum / n) / n).max(0.0).sqrt())
}

/// When a row's measures raise an alert (DESIGN.md's defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertThresholds {
    /// `drift` below this: the summary says something other than the text.
    pub drift_min: f64,
    /// `compression` below this: too short to carry the text.
    pub compression_min: f64,
    /// `compression` above this: barely shorter than the text.
    pub compression_max: f64,
    /// `stability` above this: summaries change from one draw to the next.
    pub stability_max: f64,
}

impl Default for AlertThresholds {
    fn default() -> Self {
        Self {
            drift_min: 0.45,
            compression_min: 0.12,
            compression_max: 0.35,
            stability_max: 0.03,
        }
    }
}

/// Names of the alerts a row can raise, as written in the `alerts` column.
pub mod alert {
    /// `drift` under `drift_min`.
    pub const DRIFT: &str = "drift";
    /// `compression` under `compression_min`.
    pub const TOO_SHORT: &str = "compression_low";
    /// `compression` over `compression_max`.
    pub const TOO_LONG: &str = "compression_high";
    /// `stability` over `stability_max`.
    pub const UNSTABLE: &str = "stability";
}

impl AlertThresholds {
    /// The alerts that the given measures raise (a measure that is None raises none).
    pub fn alerts(
        &self,
        drift: Option<f64>,
        compression: Option<f64>,
        stability: Option<f64>,
    ) -> Vec<&'static str> {
        let mut fired = Vec::new();
        if drift.is_some_and(|d| d < self.drift_min) {
            fired.push(alert::DRIFT);
        }
        if compression.is_some_and(|c| c < self.compression_min) {
            fired.push(alert::TOO_SHORT);
        }
        if compression.is_some_and(|c| c > self.compression_max) {
            fired.push(alert::TOO_LONG);
        }
        if stability.is_some_and(|s| s > self.stability_max) {
            fired.push(alert::UNSTABLE);
        }
        fired
    }

    /// Why these thresholds cannot work, if they cannot.
    pub fn validate(&self) -> Result<(), String> {
        let finite = [
            self.drift_min,
            self.compression_min,
            self.compression_max,
            self.stability_max,
        ]
        .iter()
        .all(|v| v.is_finite());
        if !finite {
            return Err("alert thresholds must be finite numbers".into());
        }
        if self.compression_min > self.compression_max {
            return Err(format!(
                "compression_min ({}) is above compression_max ({})",
                self.compression_min, self.compression_max
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn compression_counts_characters_not_bytes() {
        assert_eq!(compression("打印机", "打印机离线了"), Some(0.5));
        assert_eq!(compression("ab", "abcd"), Some(0.5));
        assert_eq!(compression("ab", ""), None);
    }

    #[test]
    fn cosine_of_known_vectors() {
        assert_eq!(cosine(&[1.0, 0.0], &[0.0, 2.0]), Some(0.0));
        assert_eq!(cosine(&[1.0, 1.0], &[2.0, 2.0]), Some(1.0));
        assert_eq!(cosine(&[1.0, 0.0], &[-3.0, 0.0]), Some(-1.0));
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), None);
        assert_eq!(cosine(&[1.0], &[1.0, 0.0]), None);
    }

    #[test]
    fn stability_is_the_spread_of_rouge_l() {
        assert_eq!(stability(&["the printer"], "the printer", false), None);
        assert_eq!(stability(&["a b", "a b", "a b"], "a b c", false), Some(0.0));
        // F1 1.0 and 0.0: mean 0.5, population std-dev 0.5.
        assert_eq!(stability(&["a b", "x y"], "a b", false), Some(0.5));
    }

    #[test]
    fn alerts_fire_past_their_thresholds() {
        let t = AlertThresholds::default();
        assert!(t.alerts(Some(0.9), Some(0.2), Some(0.0)).is_empty());
        assert_eq!(
            t.alerts(Some(0.1), Some(0.5), Some(0.2)),
            [alert::DRIFT, alert::TOO_LONG, alert::UNSTABLE]
        );
        assert_eq!(t.alerts(None, Some(0.05), None), [alert::TOO_SHORT]);
        assert!(
            AlertThresholds {
                compression_min: 0.5,
                ..t
            }
            .validate()
            .is_err()
        );
    }

    proptest! {
        #[test]
        fn measures_stay_in_range(
            a in proptest::collection::vec(-1.0f32..1.0, 1..16),
            b in proptest::collection::vec(-1.0f32..1.0, 1..16),
            s in "[a-d ]{0,20}", t in "[a-d ]{0,20}", u in "[a-d ]{0,20}",
        ) {
            let n = a.len().min(b.len());
            if let Some(c) = cosine(&a[..n], &b[..n]) {
                prop_assert!((-1.0..=1.0).contains(&c));
                prop_assert!((c - cosine(&b[..n], &a[..n]).unwrap()).abs() < 1e-12);
            }
            if a[..n].iter().any(|&x| x != 0.0) {
                prop_assert!((cosine(&a[..n], &a[..n]).unwrap() - 1.0).abs() < 1e-9);
            }
            if let Some(c) = compression(&s, &t) {
                prop_assert!(c >= 0.0);
            }
            prop_assert_eq!(compression(&t, &t).unwrap_or(1.0), 1.0);
            let spread = stability(&[&s, &t, &u], &t, false).unwrap();
            prop_assert!((0.0..=0.5).contains(&spread));
            prop_assert_eq!(stability(&[&s, &s], &t, false), Some(0.0));
        }
    }
}
