//! Byte counts with unit suffixes, as people type them on a command line (`800MiB`, `1GiB`,
//! `64KiB`, `1MB`, `1.5G`), and back into short human text for reports.

/// Parses a byte count: a number (decimals allowed) and an optional unit. `KiB`/`MiB`/`GiB`/`TiB`
/// are powers of 1024, `kB`/`MB`/`GB`/`TB` powers of 1000, and a bare `K`/`M`/`G`/`T` is binary as
/// in `head -c 1M`. Units are case-insensitive; a trailing `B` alone means bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: String = number.chars().filter(|&c| c != '_').collect();
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?} (use B, KiB, MiB, GiB, TiB, kB, MB, GB, TB)"
            ))
        }
    };
    if number.is_empty() {
        return Err(format!("{text:?} has no number"));
    }
    if let Ok(whole) = number.parse::<u64>() {
        return whole
            .checked_mul(multiplier)
            .ok_or_else(|| format!("{text:?} is too large"));
    }
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size like 800MiB, 1GiB, 64KiB or 1MB"))?;
    let bytes = (value * multiplier as f64).round();
    if !(0.0..=u64::MAX as f64).contains(&bytes) {
        return Err(format!("{text:?} is too large"));
    }
    Ok(bytes as u64)
}

/// Short binary-unit text for a byte count: `800 MiB`, `1.50 GiB`, `65 B`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (name, unit) in UNITS {
        if bytes >= unit {
            return if bytes.is_multiple_of(unit) {
                format!("{} {name}", bytes / unit)
            } else {
                format!("{:.2} {name}", bytes as f64 / unit as f64)
            };
        }
    }
    format!("{bytes} B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_usual_spellings() {
        assert_eq!(parse_size("800MiB"), Ok(800 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("1MB"), Ok(1_000_000));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("12345"), Ok(12345));
        assert_eq!(parse_size("1.5 GiB"), Ok(3 << 29));
        assert_eq!(parse_size("0"), Ok(0));
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("99999999999TiB").is_err());
    }

    #[test]
    fn formats_round_and_fractional_sizes() {
        assert_eq!(format_bytes(800 << 20), "800 MiB");
        assert_eq!(format_bytes(3 << 29), "1.50 GiB");
        assert_eq!(format_bytes(100), "100 B");
    }
}
