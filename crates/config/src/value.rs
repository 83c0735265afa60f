//! Parsers and checks for single values: socket addresses, IP networks, domain names, enums.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

/// Why a value was rejected: a message and a help line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ValueError {
    /// What is wrong.
    pub message: String,
    /// What to change.
    pub help: String,
}

impl ValueError {
    pub(crate) fn new(message: impl Into<String>, help: impl Into<String>) -> Self {
        ValueError {
            message: message.into(),
            help: help.into(),
        }
    }
}

/// Parses `"127.0.0.1:2525"` or `"[::1]:25"`. Host names are not accepted (a listener binds an
/// address), and the port is required.
pub(crate) fn parse_socket_addr(text: &str, example_port: u16) -> Result<SocketAddr, ValueError> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let trimmed = text.trim();
    if trimmed != text && trimmed.parse::<SocketAddr>().is_ok() {
        return Err(ValueError::new(
            format!("invalid socket address {text:?}: it has spaces around it"),
            format!("remove the spaces: {trimmed:?}"),
        ));
    }
    let bracketless = trimmed.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bracketless.parse::<IpAddr>() {
        let example = SocketAddr::new(ip, example_port);
        return Err(ValueError::new(
            format!("invalid socket address {text:?}: no port"),
            format!("add a port, e.g. \"{example}\""),
        ));
    }
    if let Some((host, port)) = trimmed.rsplit_once(':') {
        if host.contains(':') && !host.starts_with('[') {
            if let Ok(ip) = trimmed.parse::<IpAddr>() {
                let example = SocketAddr::new(ip, example_port);
                return Err(ValueError::new(
                    format!("invalid socket address {text:?}: no port"),
                    format!("add a port, e.g. \"{example}\""),
                ));
            }
            return Err(ValueError::new(
                format!("invalid socket address {text:?}"),
                "write IPv6 addresses in brackets with a port, e.g. \"[::1]:25\"",
            ));
        }
        if port.parse::<u16>().is_err() {
            return Err(ValueError::new(
                format!("invalid socket address {text:?}: invalid port {port:?}"),
                "use a port number from 0 to 65535, e.g. \"127.0.0.1:25\"",
            ));
        }
        if !host.is_empty() && host.parse::<IpAddr>().is_err() && !host.starts_with('[') {
            return Err(ValueError::new(
                format!("invalid socket address {text:?}: {host:?} is not an IP address"),
                format!(
                    "use an IP address and a port, e.g. \"127.0.0.1:{port}\" or \"[::]:{port}\" (host names are not resolved here)"
                ),
            ));
        }
    }
    Err(ValueError::new(
        format!("invalid socket address {text:?}"),
        "use an IP address and a port, e.g. \"127.0.0.1:25\" or \"[::]:25\"",
    ))
}

/// Parses a network `"192.0.2.0/24"`, `"2001:db8::/32"`, or a single address (taken as /32 or
/// /128).
pub(crate) fn parse_ip_net(text: &str) -> Result<IpNet, ValueError> {
    if let Ok(net) = text.parse::<IpNet>() {
        return Ok(net);
    }
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    Err(ValueError::new(
        format!("invalid network {text:?}"),
        "use an address with a prefix length, e.g. \"192.0.2.0/24\" or \"2001:db8::/32\", or a single address",
    ))
}

/// Checks a domain name as used in `hostname`, `[[domain]] name` and route keys: ASCII letters,
/// digits and hyphens in dot-separated labels of 1 to 63 characters, no hyphen at either end of
/// a label, 253 characters at most. A single label (`localhost`) is accepted. The caller strips
/// one trailing dot first.
pub(crate) fn check_domain(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty".to_owned());
    }
    if !name.is_ascii() {
        return Err("contains non-ASCII characters; write internationalized names in their ASCII (\"xn--\") form".to_owned());
    }
    if name.len() > 253 {
        return Err("is longer than 253 characters".to_owned());
    }
    if name.parse::<IpAddr>().is_ok() {
        return Err("is an IP address, not a domain name".to_owned());
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("has an empty label (two dots in a row, or a leading dot)".to_owned());
        }
        if label.len() > 63 {
            return Err(format!("has a label longer than 63 characters ({label:?})"));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !c.is_ascii_alphanumeric() && *c != '-')
        {
            return Err(format!(
                "contains {c:?}; only letters, digits, hyphens and dots are allowed"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!(
                "has a label that starts or ends with a hyphen ({label:?})"
            ));
        }
    }
    Ok(())
}

/// Picks the variant whose name is `text` from `(name, value)` pairs.
pub(crate) fn parse_enum<T: Copy>(text: &str, variants: &[(&str, T)]) -> Result<T, ValueError> {
    if let Some((_, v)) = variants.iter().find(|(name, _)| *name == text) {
        return Ok(*v);
    }
    let names: Vec<String> = variants.iter().map(|(n, _)| format!("{n:?}")).collect();
    let message = match variants
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(text.trim()))
    {
        Some((name, _)) => {
            format!("invalid value {text:?} (did you mean {name:?}? values are lower case)")
        }
        None => format!("invalid value {text:?}"),
    };
    Err(ValueError::new(
        message,
        format!("expected one of: {}", names.join(", ")),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_addresses() {
        assert_eq!(
            parse_socket_addr("127.0.0.1:2525", 25),
            Ok("127.0.0.1:2525".parse().unwrap())
        );
        assert_eq!(
            parse_socket_addr("[::]:25", 25),
            Ok("[::]:25".parse().unwrap())
        );
        let e = parse_socket_addr("127.0.0.1", 25).unwrap_err();
        assert_eq!(e.help, "add a port, e.g. \"127.0.0.1:25\"");
        let e = parse_socket_addr("::1", 25).unwrap_err();
        assert_eq!(e.help, "add a port, e.g. \"[::1]:25\"");
        let e = parse_socket_addr("[::1]", 587).unwrap_err();
        assert_eq!(e.help, "add a port, e.g. \"[::1]:587\"");
        let e = parse_socket_addr("localhost:25", 25).unwrap_err();
        assert!(e.message.contains("not an IP address"), "{e:?}");
        let e = parse_socket_addr("127.0.0.1:99999", 25).unwrap_err();
        assert!(e.message.contains("invalid port"), "{e:?}");
        let e = parse_socket_addr(" 127.0.0.1:25", 25).unwrap_err();
        assert!(e.help.contains("remove the spaces"), "{e:?}");
        assert!(parse_socket_addr("", 25).is_err());
        assert!(parse_socket_addr("nonsense", 25).is_err());
        assert!(parse_socket_addr("::1:25", 25).is_err());
    }

    #[test]
    fn networks() {
        assert_eq!(
            parse_ip_net("10.0.0.0/8"),
            Ok("10.0.0.0/8".parse().unwrap())
        );
        assert_eq!(parse_ip_net("::1"), Ok("::1/128".parse().unwrap()));
        assert_eq!(
            parse_ip_net("192.0.2.1"),
            Ok("192.0.2.1/32".parse().unwrap())
        );
        assert!(parse_ip_net("10.0.0.0/33").is_err());
        assert!(parse_ip_net("lan").is_err());
    }

    #[test]
    fn domains() {
        for good in [
            "localhost",
            "example.org",
            "mail-1.example.org",
            "xn--bcher-kva.example",
            "a1",
        ] {
            assert_eq!(check_domain(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "exa mple.org",
            "-a.org",
            "a-.org",
            "a..org",
            ".a.org",
            "bücher.example",
            "a_b.org",
            "192.0.2.1",
            "a@b.org",
        ] {
            assert!(check_domain(bad).is_err(), "{bad}");
        }
        assert!(check_domain(&"a".repeat(64)).is_err());
        assert!(check_domain(&["a"; 130].join(".")).is_err());
    }

    #[test]
    fn enums() {
        let variants = [("text", 1), ("json", 2)];
        assert_eq!(parse_enum("json", &variants), Ok(2));
        let e = parse_enum("xml", &variants).unwrap_err();
        assert_eq!(e.message, "invalid value \"xml\"");
        assert_eq!(e.help, "expected one of: \"text\", \"json\"");
        let e = parse_enum("JSON", &variants).unwrap_err();
        assert!(e.message.contains("did you mean \"json\""), "{e:?}");
    }
}
