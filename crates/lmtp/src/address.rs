//! Where the LMTP server listens: `unix:/run/dovecot/lmtp` or `inet:127.0.0.1:24`, in the
//! notation of Postfix's `mailbox_transport = lmtp:unix:…`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// The address of an LMTP server.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Address {
    /// A Unix domain socket: `unix:/run/dovecot/lmtp`. The path is absolute.
    Unix(PathBuf),
    /// A TCP address: `inet:127.0.0.1:24`, `inet:[::1]:24` or `inet:localhost:24`.
    Inet {
        /// An IP address (without brackets) or a host name.
        host: String,
        /// The TCP port.
        port: u16,
    },
}

/// Why an LMTP address does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// Neither `unix:` nor `inet:` at the start.
    #[error(
        "LMTP address {0:?} must start with unix: or inet: (unix:/run/dovecot/lmtp, inet:127.0.0.1:24)"
    )]
    Scheme(String),
    /// `unix:` with a relative or empty path.
    #[error("LMTP socket path {0:?} must be absolute (unix:/run/dovecot/lmtp)")]
    RelativePath(String),
    /// `inet:` without `:port`.
    #[error("LMTP address {0:?} has no port (inet:127.0.0.1:24)")]
    MissingPort(String),
    /// A port that is not a number from 1 to 65535.
    #[error("LMTP address {0:?} has a bad port (a number from 1 to 65535)")]
    BadPort(String),
    /// An empty host, or an IPv6 address without brackets or with unbalanced ones.
    #[error("LMTP address {0:?} has a bad host (inet:localhost:24, inet:[::1]:24)")]
    BadHost(String),
}

impl FromStr for Address {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(AddressError::RelativePath(s.to_string()));
            }
            return Ok(Address::Unix(PathBuf::from(path)));
        }
        let Some(rest) = s.strip_prefix("inet:") else {
            return Err(AddressError::Scheme(s.to_string()));
        };
        let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
            let (host, after) = bracketed
                .split_once(']')
                .ok_or_else(|| AddressError::BadHost(s.to_string()))?;
            let port = after
                .strip_prefix(':')
                .ok_or_else(|| AddressError::MissingPort(s.to_string()))?;
            if !host.contains(':') || host.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(AddressError::BadHost(s.to_string()));
            }
            (host, port)
        } else {
            let (host, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| AddressError::MissingPort(s.to_string()))?;
            // An IPv6 address must be bracketed, or its last group would read as the port.
            if host.is_empty()
                || host.contains([':', ']', '/'])
                || host.contains(char::is_whitespace)
            {
                return Err(AddressError::BadHost(s.to_string()));
            }
            (host, port)
        };
        let port: u16 = match port.parse() {
            Ok(p) if p > 0 && port.bytes().all(|b| b.is_ascii_digit()) => p,
            _ => return Err(AddressError::BadPort(s.to_string())),
        };
        Ok(Address::Inet {
            host: host.to_string(),
            port,
        })
    }
}

impl fmt::Display for Address {
    /// The form [`FromStr`] reads: `unix:/path`, `inet:host:port`, `inet:[v6]:port`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Unix(path) => write!(f, "unix:{}", path.display()),
            Address::Inet { host, port } if host.contains(':') => {
                write!(f, "inet:[{host}]:{port}")
            }
            Address::Inet { host, port } => write!(f, "inet:{host}:{port}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_back() {
        for (text, want) in [
            (
                "unix:/run/dovecot/lmtp",
                Address::Unix("/run/dovecot/lmtp".into()),
            ),
            (
                "inet:127.0.0.1:24",
                Address::Inet {
                    host: "127.0.0.1".into(),
                    port: 24,
                },
            ),
            (
                "inet:[::1]:24",
                Address::Inet {
                    host: "::1".into(),
                    port: 24,
                },
            ),
            (
                "inet:localhost:2424",
                Address::Inet {
                    host: "localhost".into(),
                    port: 2424,
                },
            ),
        ] {
            let got: Address = text.parse().unwrap();
            assert_eq!(got, want, "{text}");
            assert_eq!(got.to_string(), text);
        }
    }

    #[test]
    fn refuses_with_clear_errors() {
        use AddressError::*;
        for (text, want) in [
            ("/run/dovecot/lmtp", Scheme("/run/dovecot/lmtp".into())),
            ("lmtp:127.0.0.1:24", Scheme("lmtp:127.0.0.1:24".into())),
            ("unix:run/lmtp", RelativePath("unix:run/lmtp".into())),
            ("unix:", RelativePath("unix:".into())),
            ("inet:localhost", MissingPort("inet:localhost".into())),
            ("inet:[::1]", MissingPort("inet:[::1]".into())),
            ("inet:::1:24", BadHost("inet:::1:24".into())),
            ("inet:[::1:24", BadHost("inet:[::1:24".into())),
            ("inet:[nothost]:24", BadHost("inet:[nothost]:24".into())),
            ("inet::24", BadHost("inet::24".into())),
            ("inet:localhost:0", BadPort("inet:localhost:0".into())),
            (
                "inet:localhost:65536",
                BadPort("inet:localhost:65536".into()),
            ),
            ("inet:localhost:+24", BadPort("inet:localhost:+24".into())),
            ("inet:localhost:lmtp", BadPort("inet:localhost:lmtp".into())),
        ] {
            assert_eq!(text.parse::<Address>(), Err(want), "{text}");
        }
        let msg = "inet:localhost".parse::<Address>().unwrap_err().to_string();
        assert!(msg.contains("has no port"), "{msg}");
    }
}
