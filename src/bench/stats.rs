//! Pure statistics of the bench: medians, nearest-rank percentiles, ratios
//! and the way durations, sizes and ratios are printed.

use std::time::Duration;

/// Summary of one operation's timings on one endpoint.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub median: Duration,
    pub p99: Duration,
    pub min: Duration,
    pub max: Duration,
    pub mean: Duration,
}

impl Summary {
    /// `None` for no samples.
    pub fn of(samples: &[Duration]) -> Option<Summary> {
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        let n = sorted.len();
        let total: Duration = sorted.iter().sum();
        Some(Summary {
            n,
            median: median(&sorted)?,
            p99: nearest_rank(&sorted, 99.0)?,
            min: *sorted.first()?,
            max: *sorted.last()?,
            mean: total / u32::try_from(n).unwrap_or(u32::MAX),
        })
    }
}

/// The median of sorted samples: the middle one, or the mean of the two
/// middle ones for an even count.
pub fn median(sorted: &[Duration]) -> Option<Duration> {
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2),
    }
}

/// The `p`th percentile of sorted samples by the nearest-rank method: the
/// smallest sample with at least p% of the samples at or below it. It is
/// always one of the samples (with fewer than 100 samples, p99 is the
/// maximum), so it never invents a value between two runs.
pub fn nearest_rank(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() || !(p > 0.0 && p <= 100.0) {
        return None;
    }
    let n = sorted.len();
    // ceil(p/100 * n), computed in integers where p is whole to avoid 99.0/100
    // rounding up a rank that is exact.
    let rank = if p.fract() == 0.0 {
        // p is whole, 1..=100: the exact ceiling of p*n/100.
        let p = p as usize;
        (p * n).div_ceil(100)
    } else {
        (p / 100.0 * n as f64).ceil() as usize
    };
    Some(sorted[rank.clamp(1, n) - 1])
}

/// `a / b`, or `None` when `b` is zero.
pub fn ratio(a: f64, b: f64) -> Option<f64> {
    (b != 0.0 && a.is_finite() && b.is_finite()).then(|| a / b)
}

/// The ratio of two durations, `a / b`.
pub fn duration_ratio(a: Duration, b: Duration) -> Option<f64> {
    ratio(a.as_secs_f64(), b.as_secs_f64())
}

/// A ratio as printed in the tables: two significant digits below 10,
/// `0.0012x` stays readable, `-` when there is none.
pub fn format_ratio(r: Option<f64>) -> String {
    match r {
        None => "-".to_string(),
        Some(r) if !r.is_finite() => "-".to_string(),
        Some(r) if r >= 100.0 => format!("{r:.0}x"),
        Some(r) if r >= 10.0 => format!("{r:.1}x"),
        Some(r) if r >= 0.1 => format!("{r:.2}x"),
        Some(r) if r >= 0.01 => format!("{r:.3}x"),
        Some(r) if r > 0.0 => format!("{r:.1e}x"),
        Some(_) => "0x".to_string(),
    }
}

/// A duration in the unit that suits it: `850us`, `12.3ms`, `1.25s`.
pub fn format_duration(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.0}us")
    } else if us < 10_000.0 {
        format!("{:.2}ms", us / 1000.0)
    } else if us < 1_000_000.0 {
        format!("{:.1}ms", us / 1000.0)
    } else {
        format!("{:.2}s", us / 1e6)
    }
}

/// A size given in KiB, in MiB with one decimal (`12.3MiB`), or KiB below 1 MiB.
pub fn format_kib(kib: f64) -> String {
    if kib.abs() < 1024.0 {
        format!("{kib:.0}KiB")
    } else {
        format!("{:.1}MiB", kib / 1024.0)
    }
}

/// Throughput in MB/s (10^6 bytes per second) of `bytes` moved in `d`.
pub fn megabytes_per_second(bytes: u64, d: Duration) -> Option<f64> {
    ratio(bytes as f64 / 1e6, d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: &[u64]) -> Vec<Duration> {
        let mut out: Vec<Duration> = v.iter().map(|&m| Duration::from_millis(m)).collect();
        out.sort_unstable();
        out
    }

    #[test]
    fn median_of_odd_count_is_the_middle_sample() {
        assert_eq!(median(&ms(&[1, 2, 9])), Some(Duration::from_millis(2)));
    }

    #[test]
    fn median_of_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median(&ms(&[1, 2, 4, 100])), Some(Duration::from_millis(3)));
    }

    #[test]
    fn median_of_nothing_is_none() {
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn p99_of_fewer_than_100_samples_is_the_maximum() {
        let samples = ms(&(1..=20).collect::<Vec<_>>());
        assert_eq!(
            nearest_rank(&samples, 99.0),
            Some(Duration::from_millis(20))
        );
    }

    #[test]
    fn p99_of_200_samples_is_the_198th() {
        let samples = ms(&(1..=200).collect::<Vec<_>>());
        // ceil(0.99 * 200) = 198
        assert_eq!(
            nearest_rank(&samples, 99.0),
            Some(Duration::from_millis(198))
        );
    }

    #[test]
    fn p99_of_100_samples_is_the_99th_not_the_100th() {
        let samples = ms(&(1..=100).collect::<Vec<_>>());
        assert_eq!(
            nearest_rank(&samples, 99.0),
            Some(Duration::from_millis(99))
        );
    }

    #[test]
    fn nearest_rank_follows_the_textbook_example() {
        // The classic example: 15, 20, 35, 40, 50.
        let samples = ms(&[15, 20, 35, 40, 50]);
        assert_eq!(nearest_rank(&samples, 5.0), Some(Duration::from_millis(15)));
        assert_eq!(
            nearest_rank(&samples, 30.0),
            Some(Duration::from_millis(20))
        );
        assert_eq!(
            nearest_rank(&samples, 40.0),
            Some(Duration::from_millis(20))
        );
        assert_eq!(
            nearest_rank(&samples, 50.0),
            Some(Duration::from_millis(35))
        );
        assert_eq!(
            nearest_rank(&samples, 100.0),
            Some(Duration::from_millis(50))
        );
        assert_eq!(
            nearest_rank(&samples, 99.5),
            Some(Duration::from_millis(50))
        );
    }

    #[test]
    fn nearest_rank_rejects_out_of_range_percentiles() {
        let samples = ms(&[1, 2]);
        assert_eq!(nearest_rank(&samples, 0.0), None);
        assert_eq!(nearest_rank(&samples, 100.1), None);
        assert_eq!(nearest_rank(&samples, f64::NAN), None);
        assert_eq!(nearest_rank(&[], 50.0), None);
    }

    #[test]
    fn summary_sorts_its_input() {
        let s = Summary::of(&[
            Duration::from_millis(9),
            Duration::from_millis(1),
            Duration::from_millis(5),
        ])
        .expect("summary");
        assert_eq!(s.n, 3);
        assert_eq!(s.median, Duration::from_millis(5));
        assert_eq!(s.p99, Duration::from_millis(9));
        assert_eq!(s.min, Duration::from_millis(1));
        assert_eq!(s.max, Duration::from_millis(9));
        assert_eq!(s.mean, Duration::from_millis(5));
        assert_eq!(Summary::of(&[]), None);
    }

    #[test]
    fn ratios_are_printed_with_sensible_precision() {
        assert_eq!(format_ratio(ratio(1.0, 4.0)), "0.25x");
        assert_eq!(format_ratio(ratio(2.0, 1.0)), "2.00x");
        assert_eq!(format_ratio(ratio(25.0, 2.0)), "12.5x");
        assert_eq!(format_ratio(ratio(1234.0, 2.0)), "617x");
        assert_eq!(format_ratio(ratio(3.0, 100.0)), "0.030x");
        assert_eq!(format_ratio(ratio(1.0, 1000.0)), "1.0e-3x");
        assert_eq!(format_ratio(ratio(0.0, 1.0)), "0x");
        assert_eq!(format_ratio(ratio(1.0, 0.0)), "-");
        assert_eq!(format_ratio(None), "-");
    }

    #[test]
    fn duration_ratio_divides_durations() {
        let r = duration_ratio(Duration::from_millis(1), Duration::from_millis(4));
        assert_eq!(r, Some(0.25));
        assert_eq!(
            duration_ratio(Duration::from_millis(1), Duration::ZERO),
            None
        );
    }

    #[test]
    fn durations_are_printed_in_their_unit() {
        assert_eq!(format_duration(Duration::from_micros(850)), "850us");
        assert_eq!(format_duration(Duration::from_micros(1234)), "1.23ms");
        assert_eq!(format_duration(Duration::from_micros(12_345)), "12.3ms");
        assert_eq!(format_duration(Duration::from_millis(1250)), "1.25s");
    }

    #[test]
    fn sizes_are_printed_in_kib_or_mib() {
        assert_eq!(format_kib(512.0), "512KiB");
        assert_eq!(format_kib(12.3 * 1024.0), "12.3MiB");
        assert_eq!(format_kib(-2048.0), "-2.0MiB");
    }

    #[test]
    fn throughput_is_in_decimal_megabytes() {
        assert_eq!(
            megabytes_per_second(200_000_000, Duration::from_secs(2)),
            Some(100.0)
        );
        assert_eq!(megabytes_per_second(1, Duration::ZERO), None);
    }
}
