//! Classification metrics of an evaluation, as pure functions: accuracy, per-class precision,
//! recall and F1 with their support, macro averages, the confusion matrix, and percentiles.
//!
//! Conventions (the same as scikit-learn's with `zero_division=0`):
//! - an answer that names no known label (`Invalid`) or a call that failed (`Error`) is wrong:
//!   it counts in the accuracy's denominator and as a miss (false negative) of the true class,
//!   and as a prediction of no class;
//! - a class that was never predicted has precision 0; a class with no example has recall 0;
//!   F1 is 0 when precision and recall are both 0;
//! - macro precision, recall and F1 are the unweighted means over every class of the label set
//!   (macro F1 is the mean of the per-class F1s, not the F1 of the macro precision and recall).

/// What was predicted for one example.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Predicted {
    /// The index of a label of the label set.
    Label(usize),
    /// The answer named no known label, or more than one.
    Invalid,
    /// The call failed: no answer.
    Error,
}

/// Precision, recall and F1 of one class.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassScores {
    pub label: String,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Examples whose true label is this class.
    pub support: usize,
    /// Examples predicted as this class.
    pub predicted: usize,
    /// Examples of this class predicted as this class.
    pub true_positives: usize,
}

/// The scores of one run over a dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct Scores {
    pub examples: usize,
    pub correct: usize,
    /// `correct / examples`; 0 for no examples.
    pub accuracy: f64,
    /// Answers that named no known label (or more than one).
    pub invalid: usize,
    /// Calls that failed.
    pub errors: usize,
    /// One per label of the label set, in its order.
    pub classes: Vec<ClassScores>,
    pub macro_precision: f64,
    pub macro_recall: f64,
    pub macro_f1: f64,
    /// `confusion[truth][predicted]`: the columns are the labels in order, then `invalid`, then
    /// `error`.
    pub confusion: Vec<Vec<usize>>,
}

/// Scores `(truth, predicted)` pairs over the label set `labels` (truths are indexes into it).
/// A truth or a predicted label out of range is ignored as an example.
pub fn score(labels: &[String], pairs: &[(usize, Predicted)]) -> Scores {
    let n = labels.len();
    let mut confusion = vec![vec![0usize; n + 2]; n];
    let (mut examples, mut correct, mut invalid, mut errors) = (0, 0, 0, 0);
    for &(truth, predicted) in pairs {
        let column = match predicted {
            Predicted::Label(p) if p < n => p,
            Predicted::Label(_) => continue,
            Predicted::Invalid => n,
            Predicted::Error => n + 1,
        };
        let Some(row) = confusion.get_mut(truth) else { continue };
        row[column] += 1;
        examples += 1;
        match predicted {
            Predicted::Label(p) if p == truth => correct += 1,
            Predicted::Label(_) => {}
            Predicted::Invalid => invalid += 1,
            Predicted::Error => errors += 1,
        }
    }
    let classes: Vec<ClassScores> = labels
        .iter()
        .enumerate()
        .map(|(k, label)| {
            let true_positives = confusion[k][k];
            let support: usize = confusion[k].iter().sum();
            let predicted: usize = confusion.iter().map(|row| row[k]).sum();
            let precision = ratio(true_positives, predicted);
            let recall = ratio(true_positives, support);
            let f1 = if precision + recall > 0.0 { 2.0 * precision * recall / (precision + recall) } else { 0.0 };
            ClassScores { label: label.clone(), precision, recall, f1, support, predicted, true_positives }
        })
        .collect();
    let mean = |f: fn(&ClassScores) -> f64| {
        if classes.is_empty() {
            0.0
        } else {
            classes.iter().map(f).sum::<f64>() / classes.len() as f64
        }
    };
    Scores {
        examples,
        correct,
        accuracy: ratio(correct, examples),
        invalid,
        errors,
        macro_precision: mean(|c| c.precision),
        macro_recall: mean(|c| c.recall),
        macro_f1: mean(|c| c.f1),
        classes,
        confusion,
    }
}

/// `a / b`, and 0 when `b` is 0.
pub fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// The `p`-th percentile (0 < p <= 100) of `sorted` (ascending) by the nearest-rank method:
/// the smallest value with at least `p` % of the values at or below it. `None` when empty.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::Predicted::{Error, Invalid, Label};
    use super::*;

    fn labels() -> Vec<String> {
        ["a", "b", "c"].iter().map(|s| s.to_string()).collect()
    }

    fn close(actual: f64, expected: f64) {
        assert!((actual - expected).abs() < 1e-9, "{actual} != {expected}");
    }

    #[test]
    fn scores_match_hand_computed_values_with_a_class_never_predicted() {
        // a (support 4): a a a invalid | b (support 3): b a error | c (support 2): a b
        let pairs = [
            (0, Label(0)),
            (0, Label(0)),
            (0, Label(0)),
            (0, Invalid),
            (1, Label(1)),
            (1, Label(0)),
            (1, Error),
            (2, Label(0)),
            (2, Label(1)),
        ];
        let s = score(&labels(), &pairs);
        assert_eq!((s.examples, s.correct, s.invalid, s.errors), (9, 4, 1, 1));
        close(s.accuracy, 4.0 / 9.0);
        // a: predicted 5 times, 3 right: precision 3/5, recall 3/4, F1 2·0.6·0.75/1.35 = 2/3.
        let a = &s.classes[0];
        assert_eq!((a.support, a.predicted, a.true_positives), (4, 5, 3));
        close(a.precision, 0.6);
        close(a.recall, 0.75);
        close(a.f1, 2.0 / 3.0);
        // b: predicted twice, once right: precision 1/2, recall 1/3, F1 (1/3)/(5/6) = 0.4.
        let b = &s.classes[1];
        assert_eq!((b.support, b.predicted, b.true_positives), (3, 2, 1));
        close(b.precision, 0.5);
        close(b.recall, 1.0 / 3.0);
        close(b.f1, 0.4);
        // c: never predicted: precision 0 by convention, recall 0/2, F1 0.
        let c = &s.classes[2];
        assert_eq!((c.support, c.predicted, c.true_positives), (2, 0, 0));
        assert_eq!((c.precision, c.recall, c.f1), (0.0, 0.0, 0.0));
        close(s.macro_precision, (0.6 + 0.5 + 0.0) / 3.0);
        close(s.macro_recall, (0.75 + 1.0 / 3.0 + 0.0) / 3.0);
        close(s.macro_f1, (2.0 / 3.0 + 0.4 + 0.0) / 3.0);
        assert_eq!(s.confusion, vec![vec![3, 0, 0, 1, 0], vec![1, 1, 0, 0, 1], vec![1, 1, 0, 0, 0]]);
    }

    #[test]
    fn a_perfect_run_scores_one_and_a_class_without_examples_has_recall_zero() {
        let s = score(&labels(), &[(0, Label(0)), (1, Label(1))]);
        close(s.accuracy, 1.0);
        assert_eq!((s.classes[0].f1, s.classes[1].f1), (1.0, 1.0));
        assert_eq!((s.classes[2].support, s.classes[2].recall, s.classes[2].f1), (0, 0.0, 0.0));
        close(s.macro_f1, 2.0 / 3.0);
    }

    #[test]
    fn nothing_to_score_is_all_zeros() {
        let s = score(&labels(), &[]);
        assert_eq!((s.examples, s.accuracy, s.macro_f1), (0, 0.0, 0.0));
        let s = score(&[], &[(0, Label(0))]);
        assert_eq!((s.examples, s.classes.len(), s.macro_precision), (0, 0, 0.0));
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let ten: Vec<f64> = (1..=10).map(f64::from).collect();
        for (p, expect) in [(50.0, 5.0), (95.0, 10.0), (90.0, 9.0), (10.0, 1.0), (100.0, 10.0), (1.0, 1.0)] {
            assert_eq!(percentile(&ten, p), Some(expect), "p{p}");
        }
        assert_eq!(percentile(&[1.0, 2.0, 3.0], 50.0), Some(2.0));
        assert_eq!(percentile(&[7.0], 95.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
    }
}
