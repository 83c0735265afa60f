//! DKIM signing (RFC 6376, RFC 8463) of mail our users send: every key configured for the
//! domain of the `From:` address signs, relaxed/relaxed, over the usual header set, with the
//! fields a forger would add or replace over-signed.

use estafeta_config::DkimKeyConfig;
use mail_auth::common::crypto::DkimKey;
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{Canonicalization, DkimSigner, Done};

use crate::headers::from_domain;
use crate::keys::LoadedKey;

/// The header fields signed when present. Those in [`OVERSIGNED`] are listed once more, so that
/// a second instance added on the way breaks the signature (RFC 6376 §8.15).
pub const SIGNED: &[&str] = &[
    "From",
    "Reply-To",
    "Subject",
    "Date",
    "To",
    "Cc",
    "Message-ID",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "Content-Disposition",
    "Sender",
    "List-Id",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
];

/// Signed one more time than they occur.
pub const OVERSIGNED: &[&str] = &["From", "To", "Cc", "Reply-To", "Subject", "Date", "Message-ID"];

/// The signing keys of every configured domain.
#[derive(Default)]
pub struct Signer {
    keys: Vec<(DkimKeyConfig, String, DkimSigner<DkimKey, Done>)>,
}

impl Signer {
    /// A signer with these keys (in configuration order: with two keys for one domain, both
    /// sign, in this order).
    pub fn new(keys: Vec<LoadedKey>) -> Signer {
        let mut headers: Vec<String> = SIGNED.iter().map(|s| s.to_string()).collect();
        // A name listed twice is signed once more than it occurs: the crate marks only the first
        // listing as found and appends the others as absent fields.
        headers.extend(OVERSIGNED.iter().map(|s| s.to_string()));
        let keys = keys
            .into_iter()
            .map(|k| {
                let signer = DkimSigner::from_key(k.key)
                    .domain(k.config.domain.clone())
                    .selector(k.config.selector.clone())
                    .headers(headers.clone())
                    .header_canonicalization(Canonicalization::Relaxed)
                    .body_canonicalization(Canonicalization::Relaxed);
                (k.config, k.public, signer)
            })
            .collect();
        Signer { keys }
    }

    /// True when no key is configured.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Each key's configuration and public key (`p=`).
    pub fn keys(&self) -> impl Iterator<Item = (&DkimKeyConfig, &str)> {
        self.keys.iter().map(|(c, p, _)| (c, p.as_str()))
    }

    /// The `DKIM-Signature:` fields (each ending in CRLF, to be put before the message) for a
    /// message whose author domain has keys; `None` when it has none. Errors are the signing
    /// library's (a message without any of the signed fields).
    pub fn sign(&self, message: &[u8]) -> Option<Result<Signed, String>> {
        let domain = from_domain(message)?;
        let mut out = Signed {
            fields: String::new(),
            selectors: Vec::new(),
        };
        for (config, _, signer) in self.keys.iter().filter(|(c, _, _)| c.domain == domain) {
            match signer.sign(message) {
                Ok(s) => {
                    out.fields.push_str(&s.to_header());
                    out.selectors
                        .push(format!("{}/{}", config.domain, config.selector));
                }
                Err(e) => return Some(Err(e.to_string())),
            }
        }
        if out.selectors.is_empty() {
            return None;
        }
        Some(Ok(out))
    }
}

/// The signatures made for one message.
#[derive(Debug, Clone)]
pub struct Signed {
    /// The `DKIM-Signature:` fields, CRLF-terminated, to put before the message.
    pub fields: String,
    /// `domain/selector` of each signature, for the log.
    pub selectors: Vec<String>,
}
