//! Medians and paired ratios: the only statistics the benchmark reports.
//!
//! The machine is shared and noisy, so every figure is a median of repetitions, and a
//! speed-up is the median of the ratios taken *within* each repetition (BPF and the
//! other harvester ran on the same processes seconds apart), not a ratio of medians
//! that may come from different moments of load.

/// The median of `samples` (the mean of the two middle ones for an even count), or
/// `None` when there are none.
pub fn median(samples: &[f64]) -> Option<f64> {
    let mut sorted: Vec<f64> = samples.iter().copied().filter(|s| s.is_finite()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len().is_multiple_of(2) { (sorted[mid - 1] + sorted[mid]) / 2.0 } else { sorted[mid] })
}

/// `numerators[i] / denominators[i]` for each repetition i measured by both; a
/// repetition with a zero denominator is dropped rather than reported as infinite.
pub fn paired_ratios(numerators: &[f64], denominators: &[f64]) -> Vec<f64> {
    numerators.iter().zip(denominators).filter(|(_, d)| **d > 0.0).map(|(n, d)| n / d).collect()
}

/// The median of the paired ratios.
pub fn median_ratio(numerators: &[f64], denominators: &[f64]) -> Option<f64> {
    median(&paired_ratios(numerators, denominators))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[7.0]), Some(7.0));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn median_ignores_non_finite_samples() {
        assert_eq!(median(&[f64::NAN, 2.0, f64::INFINITY, 4.0, 3.0]), Some(3.0));
    }

    #[test]
    fn ratios_pair_repetitions_not_medians() {
        // BPF got slower in repetition 2 exactly when procfs did (load on the machine):
        // the per-repetition ratio stays 10, the ratio of medians would not.
        let procfs = [100.0, 400.0, 110.0];
        let bpf = [10.0, 40.0, 11.0];
        assert_eq!(paired_ratios(&procfs, &bpf), vec![10.0, 10.0, 10.0]);
        assert_eq!(median_ratio(&procfs, &bpf), Some(10.0));
        let skewed_procfs = [100.0, 400.0, 400.0];
        let skewed_bpf = [10.0, 10.0, 40.0];
        assert_eq!(median_ratio(&skewed_procfs, &skewed_bpf), Some(10.0));
        assert_eq!(median(&skewed_procfs).unwrap() / median(&skewed_bpf).unwrap(), 40.0);
    }

    #[test]
    fn ratios_drop_zero_denominators_and_unpaired_tails() {
        assert_eq!(paired_ratios(&[1.0, 2.0, 3.0], &[0.0, 1.0]), vec![2.0]);
        assert_eq!(median_ratio(&[1.0], &[0.0]), None);
    }
}
