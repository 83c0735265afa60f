//! Durations: `"30s"`, `"5m"`, `"4h"`, `"5d"`, `"1h30m"`, `"500ms"`, `"0s"`.

use std::time::Duration;

use crate::value::ValueError;

/// The accepted forms, for help messages.
pub(crate) const DURATION_HELP: &str =
    "use a number with a unit (ms, s, m, h, d, w), e.g. \"30s\", \"5m\", \"4h\", \"5d\", \"1h30m\"";

/// Parses a duration: one or more `<whole number><unit>` parts, units `ms`, `s`, `m`, `h`, `d`
/// (24 h) and `w` (7 d), lower case, optionally separated by spaces (`"1h30m"`, `"1h 30m"`, `"10 m"`).
/// A number without a unit is rejected: `"30"` could mean anything.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, ValueError> {
    let invalid = |why: &str| {
        let message = if why.is_empty() {
            format!("invalid duration {text:?}")
        } else {
            format!("invalid duration {text:?}: {why}")
        };
        ValueError::new(message, DURATION_HELP)
    };
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(invalid("empty"));
    }
    if trimmed.starts_with('-') {
        return Err(invalid("a duration cannot be negative"));
    }
    if !trimmed.is_empty() && trimmed.chars().all(|c| c.is_ascii_digit()) {
        return Err(ValueError::new(
            format!("invalid duration {text:?}: no unit"),
            format!("add a unit, e.g. \"{trimmed}s\" (ms, s, m, h, d, w)"),
        ));
    }
    let mut total = Duration::ZERO;
    let mut rest = trimmed;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(invalid(""));
        }
        let number: u64 = rest[..digits].parse().map_err(|_| invalid("too large"))?;
        rest = rest[digits..].trim_start();
        if rest.starts_with(['.', ',']) {
            return Err(ValueError::new(
                format!("invalid duration {text:?}: use whole numbers"),
                "combine units instead of fractions, e.g. \"1h30m\" or \"1500ms\"",
            ));
        }
        let unit_len = rest
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = rest[unit_len..].trim_start();
        let seconds_per_unit: u64 = match unit {
            "ms" => {
                total = total
                    .checked_add(Duration::from_millis(number))
                    .ok_or_else(|| invalid("too large"))?;
                continue;
            }
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            "w" => 7 * 86_400,
            "" => {
                return Err(ValueError::new(
                    format!("invalid duration {text:?}: {number} has no unit"),
                    format!("add a unit, e.g. \"{number}s\" (ms, s, m, h, d, w)"),
                ));
            }
            _ => return Err(invalid(&format!("unknown unit {unit:?}"))),
        };
        let seconds = number
            .checked_mul(seconds_per_unit)
            .ok_or_else(|| invalid("too large"))?;
        total = total
            .checked_add(Duration::from_secs(seconds))
            .ok_or_else(|| invalid("too large"))?;
    }
    Ok(total)
}

/// The error for a duration written as a bare TOML integer.
pub(crate) fn duration_from_integer(value: i64) -> ValueError {
    ValueError::new(
        format!("invalid duration {value}: no unit"),
        format!("add a unit, e.g. \"{value}s\" (ms, s, m, h, d, w)"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn accepted_forms() {
        assert_eq!(parse_duration("30s"), Ok(secs(30)));
        assert_eq!(parse_duration("5m"), Ok(secs(300)));
        assert_eq!(parse_duration("4h"), Ok(secs(4 * 3600)));
        assert_eq!(parse_duration("5d"), Ok(secs(5 * 86_400)));
        assert_eq!(parse_duration("2w"), Ok(secs(14 * 86_400)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("1h30m"), Ok(secs(5400)));
        assert_eq!(parse_duration("1h 30m"), Ok(secs(5400)));
        assert_eq!(parse_duration("10 m"), Ok(secs(600)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1s500ms"), Ok(Duration::from_millis(1500)));
    }

    #[test]
    fn bare_numbers_ask_for_a_unit() {
        let err = parse_duration("30").unwrap_err();
        assert!(err.help.contains("add a unit, e.g. \"30s\""), "{err:?}");
        let err = parse_duration("1h30").unwrap_err();
        assert!(err.help.contains("add a unit, e.g. \"30s\""), "{err:?}");
        let err = duration_from_integer(30);
        assert!(err.help.contains("add a unit, e.g. \"30s\""), "{err:?}");
    }

    #[test]
    fn rejected_forms() {
        for bad in [
            "",
            "s",
            "5 minutes",
            "5 m x",
            "5M",
            "1.5h",
            "-5m",
            "5m-",
            "h5",
            "5y",
            "1e3s",
        ] {
            let err = parse_duration(bad).unwrap_err();
            assert!(err.message.contains("invalid duration"), "{bad}: {err:?}");
        }
        assert!(parse_duration("1.5h").unwrap_err().help.contains("1h30m"));
    }

    #[test]
    fn overflow() {
        assert!(parse_duration("18446744073709551615w").is_err());
        assert!(parse_duration("99999999999999999999s").is_err());
    }
}
