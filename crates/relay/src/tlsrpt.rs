//! TLS-RPT (RFC 8460): what each TLS session towards a recipient domain's MX got, handed to a
//! [`TlsReporter`] (the server keeps them and sends each domain a daily report). The relay
//! only says what happened; how results are kept and reported is the reporter's business.

use std::sync::Arc;

use crate::mtasts::Policy;

/// The policy a session was held to (RFC 8460 §4.4 `policy`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyApplied {
    /// An MTA-STS policy (`policy-type: sts`).
    Sts(Arc<Policy>),
    /// DANE TLSA records (`policy-type: tlsa`), as presentation text.
    Tlsa(Vec<String>),
    /// An MTA-STS policy announced by its record but not had (`policy-type: sts`, no
    /// `policy-string`): its fetch failed.
    StsUnknown,
    /// None was found (`no-policy-found`).
    NoPolicyFound,
}

/// One TLS session attempt towards an MX host of `domain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsResult {
    /// The recipient domain (the policy domain), lower-case.
    pub domain: String,
    /// The policy the session was held to.
    pub policy: PolicyApplied,
    /// The MX host's name (empty for a policy failure, which concerns no host).
    pub mx: String,
    /// The address connected to (none for a policy failure).
    pub ip: Option<std::net::IpAddr>,
    /// `None`: a TLS session was established (and verified where the policy asked it);
    /// `Some(result-type)`: it failed (RFC 8460 §4.3).
    pub failure: Option<&'static str>,
    /// For a failure: what was seen (`additional-information`).
    pub detail: Option<String>,
}

/// Where results go.
pub trait TlsReporter: Send + Sync + std::fmt::Debug {
    /// Takes one result; must not block for long (it runs on the delivery's task).
    fn record(&self, result: TlsResult);
}

/// The RFC 8460 §4.3.2 result type of a failed MTA-STS policy fetch, from its reason.
pub fn classify_fetch(text: &str) -> &'static str {
    if text.contains("policy: ") {
        "sts-policy-invalid"
    } else if text.contains("TLS: ") {
        "sts-webpki-invalid"
    } else {
        "sts-policy-fetch-error"
    }
}

/// The RFC 8460 §4.3 result type of a failed session, from the failure's text (rustls's
/// certificate errors, our own replies), or None when the failure was not about TLS (a
/// refused connection, a timeout before STARTTLS).
pub fn classify(text: &str) -> Option<&'static str> {
    if text.contains("DANE:") {
        Some("tlsa-invalid")
    } else if text.contains("TLS is required, but was not offered") {
        Some("starttls-not-supported")
    } else if text.contains("NotValidForName") || text.contains("not valid for name") {
        Some("certificate-host-mismatch")
    } else if text.contains("Expired") || text.contains("certificate expired") {
        Some("certificate-expired")
    } else if text.contains("UnknownIssuer") || text.contains("BadSignature") {
        Some("certificate-not-trusted")
    } else if text.contains("Cannot start TLS") {
        Some("validation-failure")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn result_types() {
        use super::classify;
        assert_eq!(
            classify("451 4.7.4 TLS is required, but was not offered by host x"),
            Some("starttls-not-supported")
        );
        assert_eq!(
            classify("451 4.7.5 Cannot start TLS with x: invalid peer certificate: UnknownIssuer"),
            Some("certificate-not-trusted")
        );
        assert_eq!(
            classify(
                "451 4.7.5 Cannot start TLS with x: invalid peer certificate: NotValidForName"
            ),
            Some("certificate-host-mismatch")
        );
        assert_eq!(
            classify("451 4.7.5 Cannot start TLS with x: invalid peer certificate: Expired"),
            Some("certificate-expired")
        );
        assert_eq!(
            classify("451 4.7.5 Cannot start TLS with x: handshake timed out"),
            Some("validation-failure")
        );
        assert_eq!(classify("451 4.4.1 connection refused"), None);
        assert_eq!(
            classify("451 4.7.5 Cannot start TLS with x: DANE: no TLSA record matches"),
            Some("tlsa-invalid")
        );
    }
}
