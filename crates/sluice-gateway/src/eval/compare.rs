//! A/B comparison of two runs over the same examples: the accuracy difference with a 95 %
//! confidence interval, and McNemar's counts and exact test. Pure functions.
//!
//! The interval is the paired-difference normal (Wald) interval: each example gives
//! `d = correct_b - correct_a` in {-1, 0, 1}, the difference is their mean
//! `(only_b - only_a) / n`, and its standard error is
//! `sqrt(only_a + only_b - (only_b - only_a)² / n) / n`. Only the discordant examples (right on
//! one side, wrong on the other) move it; with none, the interval is the single point 0. The
//! p-value is McNemar's exact test: twice the binomial tail of the smaller discordant count
//! out of `only_a + only_b` at one half, capped at 1.

/// The two-sided 95 % quantile of the standard normal distribution.
pub const Z_95: f64 = 1.959_963_984_540_054;

/// How the examples split by which side got them right.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Paired {
    pub examples: usize,
    pub both_correct: usize,
    /// Right on side A only (McNemar's `b`).
    pub only_a: usize,
    /// Right on side B only (McNemar's `c`).
    pub only_b: usize,
    pub both_wrong: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    pub paired: Paired,
    pub accuracy_a: f64,
    pub accuracy_b: f64,
    /// `accuracy_b - accuracy_a`.
    pub difference: f64,
    /// The 95 % interval of the difference, within `[-1, 1]`.
    pub ci95: (f64, f64),
    /// McNemar's exact two-sided p-value; 1 when no example is discordant.
    pub p_value: f64,
}

/// Compares per-example correctness of side A and side B (the same examples, in the same
/// order; extra examples on the longer side are ignored).
pub fn compare(a: &[bool], b: &[bool]) -> Comparison {
    let mut p = Paired::default();
    for (&a, &b) in a.iter().zip(b) {
        p.examples += 1;
        match (a, b) {
            (true, true) => p.both_correct += 1,
            (true, false) => p.only_a += 1,
            (false, true) => p.only_b += 1,
            (false, false) => p.both_wrong += 1,
        }
    }
    if p.examples == 0 {
        return Comparison {
            paired: p,
            accuracy_a: 0.0,
            accuracy_b: 0.0,
            difference: 0.0,
            ci95: (0.0, 0.0),
            p_value: 1.0,
        };
    }
    let n = p.examples as f64;
    let (only_a, only_b) = (p.only_a as f64, p.only_b as f64);
    let difference = (only_b - only_a) / n;
    let se = (only_a + only_b - (only_b - only_a).powi(2) / n).max(0.0).sqrt() / n;
    Comparison {
        paired: p,
        accuracy_a: (p.both_correct + p.only_a) as f64 / n,
        accuracy_b: (p.both_correct + p.only_b) as f64 / n,
        difference,
        ci95: ((difference - Z_95 * se).max(-1.0), (difference + Z_95 * se).min(1.0)),
        p_value: mcnemar_exact(p.only_a, p.only_b),
    }
}

/// McNemar's exact two-sided p-value for discordant counts `b` and `c`.
pub fn mcnemar_exact(b: usize, c: usize) -> f64 {
    let n = b + c;
    if n == 0 {
        return 1.0;
    }
    let k = b.min(c);
    // P(X <= k) for X ~ Binomial(n, 1/2), summed in log space so a large n cannot underflow the
    // first term to zero before the others are added.
    let mut log_pmf = n as f64 * 0.5f64.ln();
    let mut tail = log_pmf.exp();
    for i in 1..=k {
        log_pmf += ((n - i + 1) as f64 / i as f64).ln();
        tail += log_pmf.exp();
    }
    (2.0 * tail).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(actual: f64, expected: f64) {
        assert!((actual - expected).abs() < 1e-6, "{actual} != {expected}");
    }

    /// Builds the two correctness vectors from the four counts.
    fn sides(both: usize, only_a: usize, only_b: usize, neither: usize) -> (Vec<bool>, Vec<bool>) {
        let mut a = Vec::new();
        let mut b = Vec::new();
        for (count, x, y) in [(both, true, true), (only_a, true, false), (only_b, false, true), (neither, false, false)]
        {
            a.extend(std::iter::repeat_n(x, count));
            b.extend(std::iter::repeat_n(y, count));
        }
        (a, b)
    }

    #[test]
    fn the_interval_and_p_value_match_hand_computed_values() {
        // n = 10: 5 both right, 1 only A, 3 only B, 1 neither.
        let (a, b) = sides(5, 1, 3, 1);
        let c = compare(&a, &b);
        assert_eq!(c.paired, Paired { examples: 10, both_correct: 5, only_a: 1, only_b: 3, both_wrong: 1 });
        close(c.accuracy_a, 0.6);
        close(c.accuracy_b, 0.8);
        close(c.difference, 0.2);
        // se = sqrt(1 + 3 - 2²/10) / 10 = sqrt(3.6) / 10 = 0.1897367; half-width 0.3718767.
        close(c.ci95.0, 0.2 - 0.371_876_7);
        close(c.ci95.1, 0.2 + 0.371_876_7);
        // P(X <= 1), X ~ Bin(4, 1/2) = 5/16; two-sided 10/16.
        close(c.p_value, 0.625);
    }

    #[test]
    fn no_discordant_example_gives_a_point_interval_at_zero() {
        let (a, b) = sides(4, 0, 0, 2);
        let c = compare(&a, &b);
        assert_eq!((c.difference, c.ci95, c.p_value), (0.0, (0.0, 0.0), 1.0));
        let c = compare(&[], &[]);
        assert_eq!((c.paired.examples, c.ci95, c.p_value), (0, (0.0, 0.0), 1.0));
    }

    #[test]
    fn the_interval_stays_within_minus_one_and_one() {
        let (a, b) = sides(0, 0, 3, 0);
        let c = compare(&a, &b);
        assert_eq!((c.difference, c.ci95), (1.0, (1.0, 1.0)));
        close(c.p_value, 0.25);
        let (a, b) = sides(0, 2, 1, 0);
        let c = compare(&a, &b);
        assert!(c.ci95.0 >= -1.0 && c.ci95.1 <= 1.0, "{c:?}");
    }

    #[test]
    fn mcnemar_handles_large_counts() {
        close(mcnemar_exact(0, 1), 1.0);
        close(mcnemar_exact(0, 5), 2.0 / 32.0);
        close(mcnemar_exact(3000, 3000), 1.0);
        assert!(mcnemar_exact(1000, 3000) < 1e-100);
    }
}
