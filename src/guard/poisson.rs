//! The count test for `unknown` denials: a one-sided Poisson upper tail.

/// The largest count that is still noise at `significance` for `X ~ Poisson(mean)`: the
/// smallest `k` with `P(X >= k) <= significance`, minus one. Counts above it are "above
/// expectation".
///
/// Sums the tail downwards from far above the mean (12 standard deviations and 30 more, where
/// the remaining tail is below 1e-30), each term in log space, so that tails far below
/// `f64::EPSILON` and means near zero stay accurate; a few dozen steps for any realistic mean.
pub fn allowance(mean: f64, significance: f64) -> u64 {
    if mean.is_nan() || mean <= 0.0 {
        return 0;
    }
    let top = (mean + 12.0 * mean.sqrt() + 30.0).ceil().min(u64::MAX as f64) as u64;
    let ln_mean = mean.ln();
    let mut ln_p = top as f64 * ln_mean - mean - ln_factorial(top);
    let mut tail = 0.0;
    let mut k = top;
    loop {
        tail += ln_p.exp();
        // tail = P(X >= k) > significance, and P(X >= k + 1) was not: k + 1 is the first
        // count that is significant.
        if tail > significance || k == 0 {
            return k;
        }
        ln_p += (k as f64).ln() - ln_mean;
        k -= 1;
    }
}

/// `ln k!`: exact sum for small `k`, Stirling's series (error below 1e-10 for k >= 20) above.
fn ln_factorial(k: u64) -> f64 {
    if k < 20 {
        return (2..=k).map(|i| (i as f64).ln()).sum();
    }
    let n = k as f64;
    n * n.ln() - n + 0.5 * (2.0 * std::f64::consts::PI * n).ln() + 1.0 / (12.0 * n) - 1.0 / (360.0 * n.powi(3))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `P(X >= k)`, summed upwards term by term (independent of the code under test).
    fn upper_tail(k: u64, mean: f64) -> f64 {
        let mut term = (-mean).exp();
        for i in 1..=k {
            term *= mean / i as f64;
        }
        let (mut sum, mut i) = (0.0, k);
        while term > 1e-300 && i < k + 10_000 {
            sum += term;
            i += 1;
            term *= mean / i as f64;
        }
        sum
    }

    #[test]
    fn the_reference_tail_matches_known_values() {
        assert!((upper_tail(1, 1.0) - (1.0 - (-1.0f64).exp())).abs() < 1e-12);
        // P(X >= 20 | 5) = 3.45214e-7 (summed independently in Python).
        assert!((upper_tail(20, 5.0) / 3.45214e-7 - 1.0).abs() < 1e-4);
    }

    #[test]
    fn allowance_is_the_last_count_consistent_with_noise() {
        for mean in [0.01, 0.25, 1.0, 5.0, 17.3, 60.0, 400.0] {
            for significance in [0.05, 1e-3, 1e-6, 1e-9] {
                let a = allowance(mean, significance);
                assert!(upper_tail(a + 1, mean) <= significance, "mean {mean}, α {significance}: {a} too low");
                assert!(upper_tail(a, mean) > significance, "mean {mean}, α {significance}: {a} too high");
            }
        }
        assert_eq!(allowance(0.0, 1e-6), 0);
        assert_eq!(allowance(f64::NAN, 1e-6), 0);
        // A mean near zero still allows nothing beyond what the tail permits.
        assert_eq!(allowance(1e-12, 1e-6), 0);
    }
}
