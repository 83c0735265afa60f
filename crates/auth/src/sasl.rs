//! SASL mechanisms for SMTP AUTH (RFC 4954): PLAIN (RFC 4616) and LOGIN (the
//! draft-murchison-sasl-login mechanism that Outlook, printers and ssmtp send). Pure functions:
//! the session feeds them the base64 text of each client line and gets names and passwords back.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// The LOGIN server challenge asking for the user name: base64 of `Username:`.
pub const LOGIN_USERNAME_CHALLENGE: &str = "VXNlcm5hbWU6";

/// The LOGIN server challenge asking for the password: base64 of `Password:`.
pub const LOGIN_PASSWORD_CHALLENGE: &str = "UGFzc3dvcmQ6";

/// Longest base64 text accepted in one step (a PLAIN message of about 3 KiB).
pub const MAX_ENCODED_LEN: usize = 4096;

/// A decoded PLAIN message: `[authzid] NUL authcid NUL passwd` (RFC 4616 §2).
#[derive(Clone, PartialEq, Eq)]
pub struct Plain {
    /// The authorization identity, when the client sent one (it then equals `authcid`: proxy
    /// authorization is not supported).
    pub authzid: Option<String>,
    /// The authentication identity: the user name (an address).
    pub authcid: String,
    /// The password.
    pub password: String,
}

impl std::fmt::Debug for Plain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plain")
            .field("authzid", &self.authzid)
            .field("authcid", &self.authcid)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Why a SASL client response was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SaslError {
    /// The client sent `*`: it cancels the exchange (RFC 4954 §4).
    #[error("authentication cancelled by the client")]
    Cancelled,
    /// Longer than [`MAX_ENCODED_LEN`].
    #[error("response too long")]
    TooLong,
    /// Not base64 (standard alphabet, with padding).
    #[error("invalid base64")]
    Base64,
    /// Decoded, but not UTF-8.
    #[error("not UTF-8")]
    Utf8,
    /// PLAIN: not `authzid NUL authcid NUL password` (wrong number of NULs).
    #[error("malformed PLAIN message")]
    Malformed,
    /// An empty user name.
    #[error("empty user name")]
    EmptyAuthcid,
    /// An empty password.
    #[error("empty password")]
    EmptyPassword,
    /// LOGIN: an empty response, or one containing NUL.
    #[error("empty or malformed response")]
    Empty,
    /// PLAIN: an authorization identity other than the authentication identity.
    #[error("proxy authorization is not supported")]
    ProxyAuthorization,
}

fn decode(b64: &str) -> Result<String, SaslError> {
    let b64 = b64.trim();
    if b64 == "*" {
        return Err(SaslError::Cancelled);
    }
    if b64.len() > MAX_ENCODED_LEN {
        return Err(SaslError::TooLong);
    }
    // RFC 4954 §4: "=" stands for an empty response.
    if b64 == "=" {
        return Ok(String::new());
    }
    let bytes = STANDARD.decode(b64).map_err(|_| SaslError::Base64)?;
    String::from_utf8(bytes).map_err(|_| SaslError::Utf8)
}

/// Decodes a PLAIN response (the initial response of `AUTH PLAIN <b64>` or the line after the
/// empty `334 ` challenge): base64 (standard alphabet, padded) of `authzid\0authcid\0password`,
/// UTF-8. Refuses an empty user name or password, and an `authzid` that differs from `authcid`.
/// RFC 4954 §4: an initial response of `=` is the empty string, which is malformed for PLAIN.
pub fn decode_plain(b64: &str) -> Result<Plain, SaslError> {
    let text = decode(b64)?;
    let mut fields = text.split('\0');
    let (Some(authzid), Some(authcid), Some(password), None) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(SaslError::Malformed);
    };
    if authcid.is_empty() {
        return Err(SaslError::EmptyAuthcid);
    }
    if password.is_empty() {
        return Err(SaslError::EmptyPassword);
    }
    // RFC 4616 §2: an authzid may be given; acting as another identity is not supported, so
    // only the authcid itself (compared as addresses are, ignoring case) is accepted.
    let authzid = if authzid.is_empty() {
        None
    } else if authzid.eq_ignore_ascii_case(authcid) {
        Some(authzid.to_string())
    } else {
        return Err(SaslError::ProxyAuthorization);
    };
    Ok(Plain {
        authzid,
        authcid: authcid.to_string(),
        password: password.to_string(),
    })
}

/// Decodes one LOGIN response (the user name after [`LOGIN_USERNAME_CHALLENGE`], or the
/// password after [`LOGIN_PASSWORD_CHALLENGE`]; or the user name as the initial response of
/// `AUTH LOGIN <b64>`): base64 of UTF-8 text, neither empty nor containing NUL.
pub fn decode_login_step(b64: &str) -> Result<String, SaslError> {
    let text = decode(b64)?;
    if text.is_empty() || text.contains('\0') {
        return Err(SaslError::Empty);
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(authzid: Option<&str>, authcid: &str, password: &str) -> Plain {
        Plain {
            authzid: authzid.map(str::to_string),
            authcid: authcid.to_string(),
            password: password.to_string(),
        }
    }

    #[test]
    fn challenges_are_what_they_say() {
        assert_eq!(
            STANDARD.decode(LOGIN_USERNAME_CHALLENGE).unwrap(),
            b"Username:"
        );
        assert_eq!(
            STANDARD.decode(LOGIN_PASSWORD_CHALLENGE).unwrap(),
            b"Password:"
        );
    }

    #[test]
    fn plain_table() {
        use SaslError::*;
        let cases: &[(&str, Result<Plain, SaslError>)] = &[
            // Python smtplib: base64 of "\0user\0pass".
            ("AHVzZXIAcGFzcw==", Ok(plain(None, "user", "pass"))),
            // swaks -a PLAIN -au alice@example.test -ap 's3cret pw'
            (
                "AGFsaWNlQGV4YW1wbGUudGVzdABzM2NyZXQgcHc=",
                Ok(plain(None, "alice@example.test", "s3cret pw")),
            ),
            // RFC 4616 §4 example with authzid = authcid: "tim\0tim\0tanstaaftanstaaf".
            (
                "dGltAHRpbQB0YW5zdGFhZnRhbnN0YWFm",
                Ok(plain(Some("tim"), "tim", "tanstaaftanstaaf")),
            ),
            // Surrounding whitespace is tolerated.
            (" AHVzZXIAcGFzcw==\r\n", Ok(plain(None, "user", "pass"))),
            // UTF-8 password "pässwörd".
            (
                "AHVzZXIAcMOkc3N3w7ZyZA==",
                Ok(plain(None, "user", "pässwörd")),
            ),
            // RFC 4616 §4: "Ursel\0Kurt\0xipj3plmq": proxy authorization, refused.
            ("VXJzZWwAS3VydAB4aXBqM3BsbXE=", Err(ProxyAuthorization)),
            // "\0\0pass": empty authcid.
            ("AABwYXNz", Err(EmptyAuthcid)),
            // "\0user\0": empty password.
            ("AHVzZXIA", Err(EmptyPassword)),
            // "user\0pass": one NUL only.
            ("dXNlcgBwYXNz", Err(Malformed)),
            // "\0user\0pass\0x": too many NULs.
            ("AHVzZXIAcGFzcwB4", Err(Malformed)),
            // RFC 4954: "=" is an empty initial response.
            ("=", Err(Malformed)),
            ("", Err(Malformed)),
            ("*", Err(Cancelled)),
            // Unpadded.
            ("AHVzZXIAcGFzcw", Err(Base64)),
            // URL-safe alphabet.
            ("AHVzZXIAcGFzcw_-", Err(Base64)),
            ("not base64!", Err(Base64)),
            // "\0user\0\xff": not UTF-8.
            ("AHVzZXIA/w==", Err(Utf8)),
        ];
        for (input, expected) in cases {
            assert_eq!(&decode_plain(input), expected, "{input:?}");
        }
        let long = "A".repeat(MAX_ENCODED_LEN + 4);
        assert_eq!(decode_plain(&long), Err(TooLong));
    }

    #[test]
    fn login_table() {
        use SaslError::*;
        let cases: &[(&str, Result<&str, SaslError>)] = &[
            // Outlook / smtplib AUTH LOGIN: base64 of the user name, then of the password.
            ("YWxpY2VAZXhhbXBsZS50ZXN0", Ok("alice@example.test")),
            ("czNjcmV0IHB3", Ok("s3cret pw")),
            ("dXNlcg==", Ok("user")),
            ("=", Err(Empty)),
            ("", Err(Empty)),
            ("*", Err(Cancelled)),
            // "a\0b"
            ("YQBi", Err(Empty)),
            ("dXNlcg", Err(Base64)),
            ("/w==", Err(Utf8)),
        ];
        for (input, expected) in cases {
            assert_eq!(
                decode_login_step(input),
                expected.map(str::to_string),
                "{input:?}"
            );
        }
    }

    #[test]
    fn debug_hides_the_password() {
        let p = plain(None, "user", "hunter2");
        assert!(!format!("{p:?}").contains("hunter2"));
    }
}
