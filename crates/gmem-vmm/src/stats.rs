//! The statistics every measurement of the project uses: one median, one timer.

use std::time::Instant;

/// The median of `v` (sorted in place; the mean of the two middle values for an even count;
/// 0 for no samples).
pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The median of nanosecond samples, in microseconds.
pub fn median_ns_as_us(v: &[u64]) -> f64 {
    let mut us: Vec<f64> = v.iter().map(|&ns| ns as f64 / 1000.0).collect();
    median(&mut us)
}

/// Runs `f` and returns its wall time in microseconds, or its error.
pub fn time_us<E>(f: impl FnOnce() -> Result<(), E>) -> Result<f64, E> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed().as_secs_f64() * 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&mut []), 0.0);
        assert_eq!(median_ns_as_us(&[3000, 1000, 2000]), 2.0);
    }
}
