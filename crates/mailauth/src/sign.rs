//! DKIM signing (RFC 6376, RFC 8463) of mail our users send: every key configured for the
//! domain of the `From:` address signs, relaxed/relaxed, over the usual header set, with the
//! fields a forger would add or replace over-signed.

use estafeta_config::DkimKeyConfig;
use mail_auth::common::crypto::{Algorithm, DkimKey, Sha256, SigningKey};
use mail_auth::common::headers::{HeaderWriter, Writable};
use mail_auth::dkim::{Canonicalization, DkimSigner};

use crate::headers::{from_domain, has_header};
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
pub const OVERSIGNED: &[&str] = &[
    "From",
    "To",
    "Cc",
    "Reply-To",
    "Subject",
    "Date",
    "Message-ID",
];

/// The signing keys of every configured domain.
#[derive(Default)]
pub struct Signer {
    keys: Vec<LoadedKey>,
}

/// A key lent to one signature: the signer builder takes its key by value, and the header list
/// differs from message to message.
struct Lent<'a>(&'a DkimKey);

impl SigningKey for Lent<'_> {
    type Hasher = Sha256;

    fn sign(&self, input: impl Writable) -> mail_auth::Result<Vec<u8>> {
        self.0.sign(input)
    }

    fn algorithm(&self) -> Algorithm {
        self.0.algorithm()
    }
}

impl Signer {
    /// A signer with these keys (in configuration order: with two keys for one domain, both
    /// sign, in this order).
    pub fn new(keys: Vec<LoadedKey>) -> Signer {
        Signer { keys }
    }

    /// True when no key is configured.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Each key's configuration and public key (`p=`).
    pub fn keys(&self) -> impl Iterator<Item = (&DkimKeyConfig, &str)> {
        self.keys.iter().map(|k| (&k.config, k.public.as_str()))
    }

    /// The `DKIM-Signature:` fields (each ending in CRLF, to be put before the message) for a
    /// message whose author domain has keys; `None` when it has none. Errors are the signing
    /// library's (a message without any of the signed fields).
    pub fn sign(&self, message: &[u8]) -> Option<Result<Signed, String>> {
        self.sign_input(message, None)
    }

    /// [`Signer::sign`] for a message given in two parts: `fields`, its header fields, then
    /// `rest`, the empty line that ends them and the body. A large message's body, mapped
    /// from its file, is not copied behind its edited header section.
    pub fn sign_parts(&self, fields: &[u8], rest: &[u8]) -> Option<Result<Signed, String>> {
        self.sign_input(fields, Some(rest))
    }

    fn sign_input(&self, message: &[u8], rest: Option<&[u8]>) -> Option<Result<Signed, String>> {
        // No key at all (most servers until they set DKIM up): not even the header is read.
        if self.keys.is_empty() {
            return None;
        }
        let domain = from_domain(message)?;
        // The fields present, once each (every instance of a name is signed), and the
        // over-signed names once more: an instance added later breaks the signature. Absent
        // fields outside OVERSIGNED stay unsigned, so a mailing list may still add List-Id.
        let mut headers: Vec<&str> = SIGNED
            .iter()
            .copied()
            .filter(|h| has_header(message, h))
            .collect();
        headers.extend(OVERSIGNED.iter().copied());
        let mut out = Signed {
            fields: String::new(),
            selectors: Vec::new(),
        };
        for k in self.keys.iter().filter(|k| k.config.domain == domain) {
            let signature = DkimSigner::from_key(Lent(&k.key))
                .domain(k.config.domain.clone())
                .selector(k.config.selector.clone())
                .headers(headers.iter().copied())
                .header_canonicalization(Canonicalization::Relaxed)
                .body_canonicalization(Canonicalization::Relaxed);
            // Chained, the library reads the header fields of each part in turn and the body
            // of the last: the fields, then a part whose header section is empty.
            let signature = match rest {
                None => signature.sign(message),
                Some(rest) => signature.sign_chained([message, rest]),
            };
            match signature {
                Ok(s) => {
                    out.fields.push_str(&s.to_header());
                    out.selectors
                        .push(format!("{}/{}", k.config.domain, k.config.selector));
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
