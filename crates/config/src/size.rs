//! Sizes: `"25MB"`, `"512KiB"`, `"1G"`, `"4096"` or a bare integer, in bytes.

use crate::value::ValueError;

/// The accepted forms, for help messages.
pub(crate) const SIZE_HELP: &str =
    "use a number with an optional unit: \"25MB\", \"512KiB\", \"1G\", \"4096\"";

/// Parses a size written as a string. Units are binary and case-insensitive: `K`/`KB`/`KiB` =
/// 1024, `M`/`MB`/`MiB` = 1024², `G`/`GB`/`GiB` = 1024³; `B` or no unit = bytes. One space is
/// allowed between number and unit. So `"25MB"` is 26214400 bytes, which is what SIZE advertises.
pub(crate) fn parse_size(text: &str) -> Result<u64, ValueError> {
    let invalid = || ValueError::new(format!("invalid size {text:?}"), SIZE_HELP);
    let trimmed = text.trim();
    if trimmed.starts_with('-') {
        return Err(ValueError::new(
            format!("invalid size {text:?}: a size cannot be negative"),
            SIZE_HELP,
        ));
    }
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit() && c != '_')
        .unwrap_or(trimmed.len());
    let (number, rest) = trimmed.split_at(digits_end);
    let number: String = number.chars().filter(|&c| c != '_').collect();
    if number.is_empty() {
        return Err(invalid());
    }
    if rest.starts_with(['.', ',']) {
        return Err(ValueError::new(
            format!("invalid size {text:?}: a size must be a whole number"),
            "use a whole number with a smaller unit, e.g. \"1536KiB\" instead of \"1.5MB\"",
        ));
    }
    let unit = rest.strip_prefix(' ').unwrap_or(rest);
    let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => {
            return Err(ValueError::new(
                format!("invalid size {text:?}: unknown unit {unit:?}"),
                "units are B, K/KB/KiB, M/MB/MiB and G/GB/GiB (all powers of 1024), e.g. \"25MB\", \"512KiB\", \"1G\", \"4096\"",
            ));
        }
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .ok_or_else(|| {
            ValueError::new(
                format!("invalid size {text:?}: too large"),
                "use a size below 16 EiB, e.g. \"25MB\"",
            )
        })
}

/// Checks a size written as a bare TOML integer (bytes).
pub(crate) fn size_from_integer(value: i64) -> Result<u64, ValueError> {
    u64::try_from(value).map_err(|_| {
        ValueError::new(
            format!("invalid size {value}: a size cannot be negative"),
            SIZE_HELP,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_forms() {
        assert_eq!(parse_size("25MB"), Ok(26_214_400));
        assert_eq!(parse_size("25mb"), Ok(26_214_400));
        assert_eq!(parse_size("25 MiB"), Ok(26_214_400));
        assert_eq!(parse_size("512KiB"), Ok(524_288));
        assert_eq!(parse_size("512k"), Ok(524_288));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1gb"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4096B"), Ok(4096));
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("1_000"), Ok(1000));
    }

    #[test]
    fn rejected_forms() {
        for bad in [
            "", "MB", "25 megs", "25TB", "-1", "-5MB", "1.5MB", "25  MB", "0x10", "ten",
        ] {
            let err = parse_size(bad).unwrap_err();
            assert!(err.message.contains("invalid size"), "{bad}: {err:?}");
        }
        assert!(parse_size("1.5MB").unwrap_err().message.contains("whole"));
        assert!(parse_size("-1").unwrap_err().message.contains("negative"));
        assert!(parse_size("25 megs").unwrap_err().message.contains("unit"));
    }

    #[test]
    fn overflow() {
        assert!(parse_size("18446744073709551615").is_ok());
        assert!(
            parse_size("18446744073709551616")
                .unwrap_err()
                .message
                .contains("too large")
        );
        assert!(
            parse_size("17179869184G")
                .unwrap_err()
                .message
                .contains("too large")
        );
    }

    #[test]
    fn integers() {
        assert_eq!(size_from_integer(4096), Ok(4096));
        assert!(size_from_integer(-1).is_err());
    }
}
