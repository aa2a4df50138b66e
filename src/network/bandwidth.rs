//! The pod's traffic shaping from kubelet's annotations
//! `kubernetes.io/ingress-bandwidth` and `kubernetes.io/egress-bandwidth`:
//! Kubernetes resource quantities in bits per second (`10M` is 10 Mbit/s).
//!
//! As containerd (`toCNIBandWidth` in `internal/cri/server/sandbox_run.go`,
//! with kubelet's `ExtractPodBandwidthResources` and its limits of 1 kbit/s
//! to 1 Pbit/s): a direction is shaped only when its annotation is there,
//! at the quantity's value rounded up to a whole bit, with a burst of
//! `u32::MAX` bits (containerd's `math.MaxUint32`; CRI-O uses 8 times as
//! much). The result is the CNI `bandwidth` capability's runtime config, and
//! what the built-in network shapes with (see [`super::tbf`]).

use std::collections::HashMap;

use super::Bandwidth;

pub const INGRESS_ANNOTATION: &str = "kubernetes.io/ingress-bandwidth";
pub const EGRESS_ANNOTATION: &str = "kubernetes.io/egress-bandwidth";

/// kubelet's `validateBandwidthIsReasonable`: 1k and 1P (bits per second).
const MIN_BITS: u64 = 1_000;
const MAX_BITS: u64 = 1_000_000_000_000_000;
/// The burst containerd gives each direction, in bits.
pub const BURST_BITS: u64 = u32::MAX as u64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("annotation {annotation}={value:?}: {reason}")]
pub struct BandwidthError {
    pub annotation: &'static str,
    pub value: String,
    pub reason: String,
}

/// The pod's shaping from its annotations; `None` when it has neither.
pub fn from_annotations(
    annotations: &HashMap<String, String>,
) -> Result<Option<Bandwidth>, BandwidthError> {
    let ingress = rate(annotations, INGRESS_ANNOTATION)?;
    let egress = rate(annotations, EGRESS_ANNOTATION)?;
    if ingress.is_none() && egress.is_none() {
        return Ok(None);
    }
    let burst = |rate: Option<u64>| if rate.is_some() { BURST_BITS } else { 0 };
    Ok(Some(Bandwidth {
        ingress_rate: ingress.unwrap_or(0),
        ingress_burst: burst(ingress),
        egress_rate: egress.unwrap_or(0),
        egress_burst: burst(egress),
    }))
}

fn rate(
    annotations: &HashMap<String, String>,
    annotation: &'static str,
) -> Result<Option<u64>, BandwidthError> {
    let Some(value) = annotations.get(annotation) else {
        return Ok(None);
    };
    let fail = |reason: String| BandwidthError {
        annotation,
        value: value.clone(),
        reason,
    };
    let bits = quantity_value(value).map_err(fail)?;
    if bits < i128::from(MIN_BITS) {
        return Err(fail("is unreasonably small (< 1kbit)".to_string()));
    }
    if bits > i128::from(MAX_BITS) {
        return Err(fail("is unreasonably large (> 1Pbit)".to_string()));
    }
    // In range, so it fits.
    Ok(Some(u64::try_from(bits).unwrap_or(MAX_BITS)))
}

/// A value past any bandwidth berth takes: results saturate here, which
/// keeps the arithmetic in `u128` and is refused by every range check.
const CAP: u128 = 1 << 100;
/// `10^38` is the largest power of ten in a `u128`, and so the most
/// significant digits a quantity may have here (Go's parser takes any
/// number; a bandwidth annotation never needs 38 digits).
const MAX_DIGITS: usize = 38;

/// A Kubernetes resource quantity (`k8s.io/apimachinery` `ParseQuantity`)
/// as `Quantity.Value()` gives it: the integer rounded up, away from zero.
/// Grammar: an optional sign, digits with an optional fraction (`1.5`, `.5`,
/// `5.`), then one suffix: none, a decimal SI prefix (`n u m k M G T P E`),
/// a binary one (`Ki Mi Gi Ti Pi Ei`) or a decimal exponent (`e3`, `E-2`).
/// Magnitudes beyond `2^100` come back as `2^100`.
pub fn quantity_value(s: &str) -> Result<i128, String> {
    let (negative, unsigned) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let int_len = unsigned.bytes().take_while(u8::is_ascii_digit).count();
    let (int_part, rest) = unsigned.split_at(int_len);
    let (frac_part, suffix) = match rest.strip_prefix('.') {
        Some(after) => after.split_at(after.bytes().take_while(u8::is_ascii_digit).count()),
        None => ("", rest),
    };
    if int_part.is_empty() && frac_part.is_empty() {
        return Err("is not a quantity: it has no number".to_string());
    }
    let scale = parse_suffix(suffix).ok_or_else(|| {
        format!(
            "is not a quantity: unknown suffix {suffix:?} (use k, M, G, T, P, E, Ki, Mi, Gi, Ti, Pi, Ei or an exponent like e6)"
        )
    })?;
    // Zeros that do not change the value do not count as digits.
    let frac_part = frac_part.trim_end_matches('0');
    let digits = format!("{int_part}{frac_part}");
    let significant = digits.trim_start_matches('0');
    if significant.len() > MAX_DIGITS {
        return Err(format!("has more than {MAX_DIGITS} significant digits"));
    }
    let number: u128 = if significant.is_empty() {
        0
    } else {
        significant
            .parse()
            .map_err(|e| format!("is not a quantity: {e}"))?
    };
    let frac_digits = u32::try_from(frac_part.len()).unwrap_or(u32::MAX);
    let magnitude = match scale {
        Scale::Decimal(e) => {
            let exponent = i64::from(e) - i64::from(frac_digits);
            match u32::try_from(exponent) {
                Ok(up) => (0..up).fold(number, |v, _| (v * 10).min(CAP)),
                Err(_) => ceil_shift_div(number, 0, exponent.unsigned_abs()),
            }
        }
        Scale::Binary(shift) => ceil_shift_div(number, shift, u64::from(frac_digits)),
    };
    // At most CAP, so it fits.
    let magnitude = i128::try_from(magnitude.min(CAP)).unwrap_or(i128::MAX);
    Ok(if negative { -magnitude } else { magnitude })
}

/// `ceil(n × 2^shift / 10^exp)`, exactly, saturating at [`CAP`]; `n` is
/// below `10^38`.
fn ceil_shift_div(n: u128, shift: u32, exp: u64) -> u128 {
    // ceil(ceil(x) / b) = ceil(x / b): divide by at most 10^38 at a time.
    let first = u32::try_from(exp.min(MAX_DIGITS as u64)).unwrap_or(38);
    let d = 10u128.pow(first);
    let (mut q, mut r) = (n / d, n % d);
    // Long division of the shifted number, one bit at a time: r < d ≤
    // 10^38 < 2^127, so doubling it never overflows.
    for _ in 0..shift {
        q = (q * 2).min(CAP);
        r *= 2;
        if r >= d {
            q = (q + 1).min(CAP);
            r -= d;
        }
    }
    let mut value = q + u128::from(r > 0);
    let mut rest = exp - u64::from(first);
    while rest > 0 && value > 1 {
        let step = u32::try_from(rest.min(MAX_DIGITS as u64)).unwrap_or(38);
        value = value.div_ceil(10u128.pow(step));
        rest -= u64::from(step);
    }
    value
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scale {
    /// Times 10 to this power.
    Decimal(i32),
    /// Times 2 to this power.
    Binary(u32),
}

fn parse_suffix(suffix: &str) -> Option<Scale> {
    let decimal = |e| Some(Scale::Decimal(e));
    match suffix {
        "" => decimal(0),
        "n" => decimal(-9),
        "u" => decimal(-6),
        "m" => decimal(-3),
        "k" => decimal(3),
        "M" => decimal(6),
        "G" => decimal(9),
        "T" => decimal(12),
        "P" => decimal(15),
        "E" => decimal(18),
        "Ki" => Some(Scale::Binary(10)),
        "Mi" => Some(Scale::Binary(20)),
        "Gi" => Some(Scale::Binary(30)),
        "Ti" => Some(Scale::Binary(40)),
        "Pi" => Some(Scale::Binary(50)),
        "Ei" => Some(Scale::Binary(60)),
        _ => {
            let exponent = suffix.strip_prefix(['e', 'E'])?;
            let digits = exponent.strip_prefix(['+', '-']).unwrap_or(exponent);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            // Past ±1000 every value is 0, 1 or saturated all the same;
            // clamping keeps the loops short.
            let e: i64 = exponent.parse().unwrap_or(if exponent.starts_with('-') {
                -1000
            } else {
                1000
            });
            Some(Scale::Decimal(e.clamp(-1000, 1000) as i32))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_round_up_as_kubernetes_value() {
        for (text, want) in [
            ("10M", 10_000_000),
            ("1k", 1_000),
            ("1Ki", 1_024),
            ("1.5M", 1_500_000),
            ("1.5Mi", 1_572_864),
            ("100", 100),
            ("+100", 100),
            ("0.5", 1),
            (".5k", 500),
            ("5.", 5),
            ("1e3", 1_000),
            ("1E6", 1_000_000),
            ("25e-1", 3),
            ("1E", 1_000_000_000_000_000_000),
            ("1P", 1_000_000_000_000_000),
            ("999m", 1),
            ("1000001m", 1_001),
            ("0", 0),
            ("-1k", -1_000),
            ("-1.5", -2),
            ("1.000000000000000000000000000001k", 1_001),
            ("0.000000000000000000000000000000000000000000001", 1),
            ("1e400", 1 << 100),
            ("0.5Ki", 512),
            ("0.001Ki", 2),
            ("1e-400", 1),
            ("0e5", 0),
            ("-0.5", -1),
        ] {
            assert_eq!(quantity_value(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn malformed_quantities_are_refused() {
        for text in [
            "",
            "M",
            ".",
            "10 M",
            "10MB",
            "1K",
            "1kk",
            "1.2.3",
            "1e",
            "1e+",
            "ten",
            "1Ki5",
            "--1",
            "123456789012345678901234567890123456789",
        ] {
            assert!(quantity_value(text).is_err(), "{text}");
        }
    }

    #[test]
    fn annotations_become_the_cni_capability_values() {
        let none = HashMap::new();
        assert_eq!(from_annotations(&none), Ok(None));
        let both: HashMap<String, String> = [
            (INGRESS_ANNOTATION.to_string(), "10M".to_string()),
            (EGRESS_ANNOTATION.to_string(), "1Mi".to_string()),
        ]
        .into();
        assert_eq!(
            from_annotations(&both),
            Ok(Some(Bandwidth {
                ingress_rate: 10_000_000,
                ingress_burst: 4_294_967_295,
                egress_rate: 1_048_576,
                egress_burst: 4_294_967_295,
            }))
        );
        let egress: HashMap<String, String> =
            [(EGRESS_ANNOTATION.to_string(), "2G".to_string())].into();
        assert_eq!(
            from_annotations(&egress),
            Ok(Some(Bandwidth {
                egress_rate: 2_000_000_000,
                egress_burst: BURST_BITS,
                ..Bandwidth::default()
            }))
        );
    }

    #[test]
    fn kubelets_limits_apply_and_errors_name_the_annotation() {
        for (value, reason) in [
            ("999", "unreasonably small"),
            ("0", "unreasonably small"),
            ("-10M", "unreasonably small"),
            ("1001T", "unreasonably large"),
            ("2P", "unreasonably large"),
            ("10MB", "unknown suffix"),
        ] {
            let annotations: HashMap<String, String> =
                [(INGRESS_ANNOTATION.to_string(), value.to_string())].into();
            let err = from_annotations(&annotations).expect_err(value);
            assert_eq!(err.annotation, INGRESS_ANNOTATION);
            let text = err.to_string();
            assert!(
                text.contains(INGRESS_ANNOTATION) && text.contains(reason),
                "{text}"
            );
        }
        let edges: HashMap<String, String> = [
            (INGRESS_ANNOTATION.to_string(), "1k".to_string()),
            (EGRESS_ANNOTATION.to_string(), "1P".to_string()),
        ]
        .into();
        assert!(from_annotations(&edges).is_ok());
    }
}
