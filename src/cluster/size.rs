//! Byte sizes as people type them (`--max-memory 512M`, `1.5G`) and as `cozy status` shows them (`1.5 GiB`).
//!
//! Multiples are always binary (K = 1024) whether written `K`, `KB` or `KiB`: these are memory limits,
//! compared against RSS, and reading `512MB` as 10^6-based would make it 5% smaller than `512M`, which is
//! not a difference anyone setting a limit means. Parsing is exact — `1.5G` is computed in integers, not
//! floats — and every error names the input and shows what a size looks like.

/// Display units, smallest first; parsing accepts the same multiples under several spellings.
const UNITS: [(&str, u64); 5] = [
    ("B", 1),
    ("KiB", 1 << 10),
    ("MiB", 1 << 20),
    ("GiB", 1 << 30),
    ("TiB", 1 << 40),
];

/// Parse a size such as `512`, `512B`, `64K`, `64KB`, `64KiB`, `512M`, `1.5G` or `1GiB` into bytes.
///
/// Units are case-insensitive and may be separated from the number by spaces. A fractional size is rounded
/// down to whole bytes (`0.5K` is 512), but a fractional byte count (`1.5B`) is refused, as is zero.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let expected = || format!("expected a size like 512M or 1G, got {s:?}");

    let trimmed = s.trim();
    let number_end = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(number_end);
    let multiplier: u128 = match unit.trim_start().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(expected()),
    };

    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let all_digits = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
    // Refuses no number at all, a lone `.`, and a second `.`.
    if (whole.is_empty() && fraction.is_empty()) || !all_digits(whole) || !all_digits(fraction) {
        return Err(expected());
    }
    let fraction = fraction.trim_end_matches('0');

    let too_large = || format!("size {s:?} is too large");
    // Beyond these lengths the value cannot fit in u64 bytes, or is a precision nobody means; refusing them
    // keeps the integer arithmetic below inside u128.
    if whole.trim_start_matches('0').len() > 20 {
        return Err(too_large());
    }
    if fraction.len() > 18 {
        return Err(expected());
    }
    // value = whole.fraction × multiplier, computed as (whole ‖ fraction) × multiplier / 10^len(fraction).
    let scale = 10u128.pow(fraction.len() as u32);
    let digits = format!("{whole}{fraction}");
    let mantissa: u128 = if digits.is_empty() {
        0 // `.0`
    } else {
        digits.parse().map_err(|_| expected())?
    };
    if multiplier == 1 && mantissa % scale != 0 {
        return Err(format!("a size in bytes must be a whole number, got {s:?}"));
    }
    let bytes = mantissa.checked_mul(multiplier).ok_or_else(too_large)? / scale;
    let bytes = u64::try_from(bytes).map_err(|_| too_large())?;
    if bytes == 0 {
        return Err(format!("size must be more than 0, got {s:?}"));
    }
    Ok(bytes)
}

/// A size for people: the largest binary unit that keeps the number at least 1, with at most one decimal
/// (`12 B`, `900 KiB`, `512 MiB`, `1.5 GiB`). The result parses back with [`parse_size`].
pub fn format_size(bytes: u64) -> String {
    let mut unit = UNITS
        .iter()
        .rposition(|&(_, size)| bytes >= size)
        .unwrap_or(0);
    if unit == 0 {
        return format!("{bytes} B");
    }
    let tenths_of = |size: u64| (u128::from(bytes) * 10 + u128::from(size) / 2) / u128::from(size);
    let mut tenths = tenths_of(UNITS[unit].1);
    // 1023.96 KiB would round to "1024 KiB"; say "1 MiB" instead.
    if tenths >= 10_240 && unit + 1 < UNITS.len() {
        unit += 1;
        tenths = tenths_of(UNITS[unit].1);
    }
    let name = UNITS[unit].0;
    match tenths % 10 {
        0 => format!("{} {name}", tenths / 10),
        decimal => format!("{}.{decimal} {name}", tenths / 10),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: u64 = 1 << 10;
    const M: u64 = 1 << 20;
    const G: u64 = 1 << 30;

    #[test]
    fn plain_numbers_and_b_are_bytes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("512b"), Ok(512));
        assert_eq!(parse_size(" 512 "), Ok(512));
    }

    #[test]
    fn every_spelling_of_a_unit_is_a_binary_multiple() {
        for s in ["64K", "64KB", "64KiB", "64k", "64kb", "64kib", "64 KiB"] {
            assert_eq!(parse_size(s), Ok(64 * K), "{s}");
        }
        for s in ["512M", "512MB", "512MiB", "512m", "512mib"] {
            assert_eq!(parse_size(s), Ok(512 * M), "{s}");
        }
        for s in ["1G", "1GB", "1GiB", "1g", "1gib"] {
            assert_eq!(parse_size(s), Ok(G), "{s}");
        }
        assert_eq!(parse_size("2T"), Ok(2 << 40));
    }

    #[test]
    fn fractions_are_exact_and_round_down_to_whole_bytes() {
        assert_eq!(parse_size("1.5G"), Ok(G + G / 2));
        assert_eq!(parse_size("1.50G"), Ok(G + G / 2));
        assert_eq!(parse_size("0.5K"), Ok(512));
        assert_eq!(parse_size(".5K"), Ok(512));
        assert_eq!(parse_size("2.K"), Ok(2048));
        assert_eq!(parse_size("0.1K"), Ok(102)); // 102.4 bytes
        assert_eq!(parse_size("1.0B"), Ok(1));
    }

    #[test]
    fn unknown_units_and_garbage_say_what_a_size_looks_like() {
        assert_eq!(
            parse_size("12X"),
            Err(r#"expected a size like 512M or 1G, got "12X""#.to_string())
        );
        for s in [
            "", " ", "M", "-1G", "1..5G", "1.2.3K", ".", "1 G B", "G1", "1e9", "+5M", "0x10",
        ] {
            let err = parse_size(s).unwrap_err();
            assert!(
                err.starts_with("expected a size like 512M or 1G"),
                "{s:?}: {err}"
            );
            assert!(err.contains(&format!("{s:?}")), "{s:?}: {err}");
        }
    }

    #[test]
    fn zero_is_refused() {
        for s in ["0", "0B", "0M", "0.0G", ".0K", "000K", "0.0001B"] {
            let err = parse_size(s).unwrap_err();
            assert!(
                err.contains("must be more than 0") || err.contains("whole number"),
                "{s:?}: {err}"
            );
        }
        assert_eq!(
            parse_size("0M"),
            Err(r#"size must be more than 0, got "0M""#.to_string())
        );
        // A fraction that rounds down to no bytes at all.
        assert!(parse_size("0.0001K")
            .unwrap_err()
            .contains("must be more than 0"));
    }

    #[test]
    fn fractional_bytes_are_refused() {
        assert_eq!(
            parse_size("1.5B"),
            Err(r#"a size in bytes must be a whole number, got "1.5B""#.to_string())
        );
    }

    #[test]
    fn sizes_beyond_u64_are_refused() {
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
        for s in [
            "18446744073709551616",
            "16777216T",
            "99999999999999999999999G",
        ] {
            assert!(parse_size(s).unwrap_err().contains("too large"), "{s}");
        }
    }

    #[test]
    fn formatting_picks_the_largest_unit_with_one_decimal_at_most() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(12), "12 B");
        assert_eq!(format_size(1023), "1023 B");
        assert_eq!(format_size(K), "1 KiB");
        assert_eq!(format_size(900 * K), "900 KiB");
        assert_eq!(format_size(512 * M), "512 MiB");
        assert_eq!(format_size(G + G / 2), "1.5 GiB");
        assert_eq!(format_size(G + G / 4), "1.3 GiB"); // 1.25 rounds half up
        assert_eq!(format_size(3 << 40), "3 TiB");
        assert_eq!(format_size(u64::MAX), "16777216 TiB");
    }

    #[test]
    fn formatting_never_shows_1024_of_a_unit() {
        assert_eq!(format_size(M - 1), "1 MiB");
        assert_eq!(format_size(G - 1), "1 GiB");
        assert_eq!(format_size(M - 100 * K), "924 KiB");
    }

    #[test]
    fn formatted_sizes_parse_back() {
        for bytes in [12, 900 * K, 512 * M, G + G / 2, 3 << 40] {
            assert_eq!(parse_size(&format_size(bytes)), Ok(bytes), "{bytes}");
        }
    }
}
