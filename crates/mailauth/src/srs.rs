//! Sender Rewriting Scheme (SRS), compatible with libsrs2, postsrsd and
//! `OpenSMTPD`.
//!
//! When we forward a message to another domain (an alias pointing
//! elsewhere), the next hop checks SPF against the envelope sender. The
//! original sender's domain does not authorise our IP addresses, so we
//! rewrite the sender into an address in *our* SRS domain. The rewritten
//! address carries the original sender plus a hash and a timestamp, so that
//! bounces sent to it can be verified and routed back, and so that it cannot
//! be abused as an open relay.
//!
//! # Formats
//!
//! `HHHH` is a 4-character hash, `TT` a 2-character timestamp, `ours` our SRS
//! domain.
//!
//! * **SRS0** (plain sender `alice@example.org`):
//!   `SRS0=HHHH=TT=example.org=alice@ours`.
//!   The original local part may itself contain `=`; everything after the
//!   third `=` following the `SRS0=` prefix is the local part.
//! * **SRS1** (the sender is already an SRS0 address of another forwarder,
//!   `SRS0=GGGG=TT=example.org=alice@fwd.example`):
//!   `SRS1=HHHH=fwd.example==GGGG=TT=example.org=alice@ours`.
//!   The first hop's SRS0 local part is kept opaque (only the `SRS0` tag is
//!   dropped, its separator is kept, hence `==`); bounces to it go straight
//!   back to the first hop, which alone can verify `GGGG`.
//! * An **SRS1** sender (`SRS1=XXXX=first.example==rest@fwd.example`) is
//!   re-signed: `SRS1=HHHH=first.example==rest@ours`.
//!
//! The tags `SRS0`/`SRS1` are matched case-insensitively and may be followed
//! by any of the separators `=`, `+`, `-` (as libsrs2 accepts); we always
//! emit `=`.
//!
//! # Hash and timestamp
//!
//! * Hash: HMAC-SHA1 keyed with the secret over the ASCII-lowercased
//!   concatenation of the fields (SRS0: `TT` + domain + local part; SRS1:
//!   first-hop domain + opaque rest), encoded in standard base64, first 4
//!   characters. Compared case-insensitively on reversal (mail systems may
//!   change the case of local parts), in constant time.
//! * Timestamp: days since the Unix epoch modulo 1024, as two characters of
//!   the base32 alphabet `ABCDEFGHIJKLMNOPQRSTUVWXYZ234567` (high 5 bits
//!   first). On reversal lowercase is accepted and the age is computed modulo
//!   1024; addresses older than the maximum age (default 21 days) are
//!   refused.
//!
//! # Secrets
//!
//! As in libsrs2/postsrsd the secret is used as the HMAC key byte for byte;
//! [`load_or_create_secrets`] reads postsrsd-style secret files (one secret
//! per line, the line text itself is the key). The first secret signs, all
//! of them verify, which allows key rotation.
//!
//! Known answer (postsrsd's test suite): secret `tops3cr3t`, our domain
//! `example.com`, at 2020-01-01 00:01 UTC, `test@otherdomain.com` becomes
//! `SRS0=vmyz=2W=otherdomain.com=test@example.com`.
//!
//! # Length
//!
//! RFC 5321 limits a local part to 64 octets. The SRS local part is about
//! 13 octets plus the original address, so long senders produce longer local
//! parts. Like postsrsd and Postfix we still return them; most receivers
//! accept them.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

/// Number of base64 characters of the HMAC kept in an SRS address.
const HASH_LEN: usize = 4;
/// Alphabet of the 2-character timestamp (RFC 4648 base32).
const TIME_CHARS: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
/// Number of distinct timestamps: the timestamp wraps every 1024 days.
const TIME_SLOTS: u64 = 1024;
/// Seconds per timestamp unit (one day).
const TIME_PRECISION: u64 = 86_400;
/// Default maximum age of an SRS address, in days (as libsrs2).
const DEFAULT_MAX_AGE_DAYS: u32 = 21;

/// An SRS rewriter for one SRS domain: signs with the first secret, verifies
/// with all of them.
#[derive(Clone, Debug)]
pub struct Srs {
    /// Our SRS domain: rewritten senders are `…@domain`.
    domain: String,
    /// HMAC-SHA1 keys, one per secret; `keys[0]` signs.
    keys: Vec<hmac::Key>,
    /// Maximum accepted age of an SRS address, in days.
    max_age_days: u32,
}

/// Why an SRS address could not be reversed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SrsError {
    /// The local part does not start with `SRS0`/`SRS1` and a separator.
    NotSrs,
    /// The address has the SRS prefix but lacks fields (hash, timestamp,
    /// domain or local part) or has an invalid timestamp.
    Malformed,
    /// The hash does not match any configured secret: forged, damaged, or
    /// signed with a secret that is no longer configured.
    BadHash,
    /// The hash is valid but the timestamp is older than the maximum age.
    Expired,
}

impl fmt::Display for SrsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SrsError::NotSrs => "not an SRS address",
            SrsError::Malformed => {
                "malformed SRS address (missing hash, timestamp, domain or local part)"
            }
            SrsError::BadHash => {
                "invalid hash in SRS address (forged, or signed with a secret that is no longer configured)"
            }
            SrsError::Expired => "SRS address has expired (timestamp older than the maximum age)",
        })
    }
}

impl std::error::Error for SrsError {}

impl Srs {
    /// Creates a rewriter for our SRS `domain`.
    ///
    /// `secrets[0]` signs; every secret is accepted when reversing (key
    /// rotation: put the new secret first, keep the old one for the maximum
    /// age). Each secret is used as the HMAC key byte for byte.
    ///
    /// # Panics
    ///
    /// Panics if `secrets` is empty ([`load_or_create_secrets`] never returns
    /// an empty list).
    #[must_use]
    pub fn new(domain: &str, secrets: Vec<Vec<u8>>) -> Srs {
        assert!(!secrets.is_empty(), "SRS needs at least one secret");
        let keys = secrets
            .iter()
            .map(|s| hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, s))
            .collect();
        Srs {
            domain: domain.to_owned(),
            keys,
            max_age_days: DEFAULT_MAX_AGE_DAYS,
        }
    }

    /// Sets the maximum age, in days, of an SRS address accepted by
    /// [`Srs::reverse`] (default 21, as libsrs2). Ages are computed modulo
    /// 1024 days, so values of 1023 or more accept any timestamp.
    #[must_use]
    pub fn with_max_age_days(mut self, days: u32) -> Srs {
        self.max_age_days = days;
        self
    }

    /// Our SRS domain.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// Rewrites an envelope sender `local@domain` for forwarding; `now` is
    /// the current time in Unix seconds.
    ///
    /// The sender is split at its last `@`. Returns `None` ("leave the
    /// sender unchanged") for the null sender (`""` or `"<>"`; bounces are
    /// never rewritten), for a sender without `@` or with an empty local
    /// part or domain, and for any sender already in our SRS domain (a local
    /// user, or one of our own SRS addresses; compared case-insensitively),
    /// as libsrs2 does. Otherwise:
    ///
    /// - a plain address: `SRS0=HHHH=TT=domain=local@ours`;
    /// - an SRS0 address of another forwarder (local part starts with
    ///   `SRS0=`, `SRS0+` or `SRS0-`, case-insensitively):
    ///   `SRS1=HHHH=forwarder==GGGG=TT=domain=local@ours` (the rest of the
    ///   SRS0 local part after the tag is kept verbatim; the new hash covers
    ///   the forwarder domain and that rest);
    /// - an SRS1 address `SRS1=XXXX=firsthop==rest@fwd`:
    ///   `SRS1=HHHH=firsthop==rest@ours` (re-signed). An SRS1 address
    ///   without a first-hop field is wrapped as a plain address.
    ///
    /// The result's local part may exceed the 64 octets RFC 5321 allows
    /// when the original sender is long; it is returned anyway (as postsrsd
    /// and Postfix do).
    #[must_use]
    pub fn forward(&self, sender: &str, now: u64) -> Option<String> {
        if sender.is_empty() || sender == "<>" {
            return None;
        }
        let (local, host) = sender.rsplit_once('@')?;
        if local.is_empty() || host.is_empty() || host.eq_ignore_ascii_case(&self.domain) {
            return None;
        }
        let ours = &self.domain;
        match srs_tag(local) {
            Some(b'1') => {
                // SRS1<sep>HASH=FIRSTHOP=REST: keep first hop and rest, re-sign.
                if let Some((first_hop, rest)) = local[5..]
                    .split_once('=')
                    .and_then(|(_hash, r)| r.split_once('='))
                    .filter(|(first_hop, _)| !first_hop.is_empty())
                {
                    let hash = self.hash(0, &[first_hop, rest]);
                    return Some(format!("SRS1={hash}={first_hop}={rest}@{ours}"));
                }
            }
            Some(_) if local.len() > 5 => {
                // SRS0<sep>…: the forwarder is `host`; the rest (with its
                // separator) stays opaque.
                let rest = &local[4..];
                let hash = self.hash(0, &[host, rest]);
                return Some(format!("SRS1={hash}={host}={rest}@{ours}"));
            }
            _ => {}
        }
        let stamp: String = timestamp(now).iter().map(|&c| char::from(c)).collect();
        let hash = self.hash(0, &[&stamp, host, local]);
        Some(format!("SRS0={hash}={stamp}={host}={local}@{ours}"))
    }

    /// Reverses an SRS address of our domain; `now` is the current time in
    /// Unix seconds.
    ///
    /// Takes the local part (`SRS0=HHHH=TT=domain=local`) or the whole
    /// address; if the input contains `@`, everything from the last `@` on
    /// is ignored: the caller must already have checked that the domain is
    /// ours. (A bare local part that itself contains `@` must therefore be
    /// passed with its domain.) The tag is case-insensitive and may be
    /// followed by `=`, `+` or `-`.
    ///
    /// - SRS0: checks the hash (case-insensitively, in constant time, against
    ///   every secret) and then the age (at most the maximum age, modulo
    ///   1024 days), and returns the original `local@domain`.
    /// - SRS1: checks the hash and returns the first hop's SRS0 address,
    ///   `SRS0=GGGG=TT=domain=local@firsthop` (that forwarder verifies its
    ///   own hash and timestamp).
    ///
    /// # Errors
    ///
    /// [`SrsError::NotSrs`] without an SRS tag, [`SrsError::Malformed`] when
    /// fields are missing or the timestamp is not base32,
    /// [`SrsError::BadHash`] when no secret produces the hash,
    /// [`SrsError::Expired`] when the (authentic) address is too old.
    pub fn reverse(&self, local_part: &str, now: u64) -> Result<String, SrsError> {
        let local_part = match local_part.rsplit_once('@') {
            Some((l, _)) => l,
            None => local_part,
        };
        let tag = srs_tag(local_part).ok_or(SrsError::NotSrs)?;
        // The tag and its separator are ASCII: byte 5 is a char boundary.
        let body = &local_part[5..];
        if tag == b'0' {
            self.reverse_srs0(body, now)
        } else {
            self.reverse_srs1(body)
        }
    }

    /// Reverses `HASH=TT=DOMAIN=LOCAL` (an SRS0 local part after its tag and
    /// separator) into `LOCAL@DOMAIN`.
    fn reverse_srs0(&self, body: &str, now: u64) -> Result<String, SrsError> {
        let mut fields = body.splitn(4, '=');
        let (Some(hash), Some(stamp), Some(host), Some(user)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err(SrsError::Malformed);
        };
        if hash.is_empty() || host.is_empty() || user.is_empty() {
            return Err(SrsError::Malformed);
        }
        let then = parse_timestamp(stamp).ok_or(SrsError::Malformed)?;
        // Hash first: only authentic addresses are reported as expired.
        self.check_hash(hash, &[stamp, host, user])?;
        let today = (now / TIME_PRECISION) % TIME_SLOTS;
        let age = (today + TIME_SLOTS - then) % TIME_SLOTS;
        if age > u64::from(self.max_age_days) {
            return Err(SrsError::Expired);
        }
        Ok(format!("{user}@{host}"))
    }

    /// Reverses `HASH=FIRSTHOP=REST` (an SRS1 local part after its tag and
    /// separator) into `SRS0REST@FIRSTHOP`.
    fn reverse_srs1(&self, body: &str) -> Result<String, SrsError> {
        let mut fields = body.splitn(3, '=');
        let (Some(hash), Some(first_hop), Some(rest)) =
            (fields.next(), fields.next(), fields.next())
        else {
            return Err(SrsError::Malformed);
        };
        if hash.is_empty() || first_hop.is_empty() || rest.is_empty() {
            return Err(SrsError::Malformed);
        }
        self.check_hash(hash, &[first_hop, rest])?;
        Ok(format!("SRS0{rest}@{first_hop}"))
    }

    /// True when the local part looks like SRS (`SRS0` or `SRS1`, any case,
    /// followed by `=`, `+` or `-`): the caller then must reverse it or
    /// refuse the RCPT. Accepts a whole address too (only the start is
    /// looked at).
    #[must_use]
    pub fn is_srs(local_part: &str) -> bool {
        srs_tag(local_part).is_some()
    }

    /// The 4-character hash of `fields` with the secret number `idx`.
    fn hash(&self, idx: usize, fields: &[&str]) -> String {
        let mut ctx = hmac::Context::with_key(&self.keys[idx]);
        for field in fields {
            ctx.update(field.to_ascii_lowercase().as_bytes());
        }
        let mut hash = BASE64.encode(ctx.sign().as_ref());
        hash.truncate(HASH_LEN);
        hash
    }

    /// Checks `hash` (its first 4 characters, case-insensitively; shorter is
    /// refused, as libsrs2 does) against every secret.
    fn check_hash(&self, hash: &str, fields: &[&str]) -> Result<(), SrsError> {
        let Some(given) = hash.as_bytes().get(..HASH_LEN) else {
            return Err(SrsError::BadHash);
        };
        let mut ok = false;
        for idx in 0..self.keys.len() {
            let expected = self.hash(idx, fields);
            ok |= eq_ignore_case_ct(given, expected.as_bytes());
        }
        if ok { Ok(()) } else { Err(SrsError::BadHash) }
    }
}

/// `Some(b'0')`/`Some(b'1')` when `local` starts with `SRS0`/`SRS1` (any
/// case) followed by one of the separators `=`, `+`, `-`.
fn srs_tag(local: &str) -> Option<u8> {
    match local.as_bytes() {
        [s, r, s2, n @ (b'0' | b'1'), b'=' | b'+' | b'-', ..]
            if s.eq_ignore_ascii_case(&b'S')
                && r.eq_ignore_ascii_case(&b'R')
                && s2.eq_ignore_ascii_case(&b'S') =>
        {
            Some(*n)
        }
        _ => None,
    }
}

/// The 2-character base32 timestamp for `now` (Unix seconds).
fn timestamp(now: u64) -> [u8; 2] {
    let days = (now / TIME_PRECISION) % TIME_SLOTS;
    [
        TIME_CHARS[(days >> 5) as usize & 31],
        TIME_CHARS[days as usize & 31],
    ]
}

/// Decodes a 2-character base32 timestamp (either case) into a day slot
/// (0..1024).
fn parse_timestamp(stamp: &str) -> Option<u64> {
    let [hi, lo] = stamp.as_bytes() else {
        return None;
    };
    let digit = |c: &u8| {
        TIME_CHARS
            .iter()
            .position(|t| *t == c.to_ascii_uppercase())
            .map(|p| p as u64)
    };
    Some((digit(hi)? << 5) | digit(lo)?)
}

/// Compares two byte strings of equal length ignoring ASCII case, without
/// data-dependent branches.
fn eq_ignore_case_ct(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| {
        acc | (x.to_ascii_lowercase() ^ y.to_ascii_lowercase())
    });
    diff == 0
}

/// Reads the SRS secret file at `path`, or creates it if it does not exist.
///
/// File format (as postsrsd): one secret per line; surrounding whitespace is
/// trimmed, blank lines and lines starting with `#` are ignored; the first
/// secret signs, the others only verify. Each line's text is the key, byte
/// for byte (it is not base64-decoded).
///
/// A missing file is created (`create_new`, mode 0600) with one new secret:
/// 32 random bytes from the system CSPRNG, base64 encoded, plus a newline;
/// it is fsynced (and its directory, best effort) before returning. If
/// another process creates the file first, that file is read instead. A
/// file that contains no secret is an error ([`io::ErrorKind::InvalidData`]).
///
/// # Errors
///
/// I/O errors reading or creating the file (the new file is removed if
/// writing it fails), a file that is not UTF-8 or holds no secret
/// ([`io::ErrorKind::InvalidData`]), or a failing system random generator.
pub fn load_or_create_secrets(path: &Path) -> io::Result<Vec<Vec<u8>>> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_secrets(path, &text),
        Err(e) if e.kind() == io::ErrorKind::NotFound => match create_secret_file(path) {
            Ok(secret) => Ok(vec![secret]),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                parse_secrets(path, &std::fs::read_to_string(path)?)
            }
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    }
}

/// Parses the text of a secret file (see [`load_or_create_secrets`]).
fn parse_secrets(path: &Path, text: &str) -> io::Result<Vec<Vec<u8>>> {
    let secrets: Vec<Vec<u8>> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.as_bytes().to_vec())
        .collect();
    if secrets.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("SRS secret file {} contains no secret", path.display()),
        ));
    }
    Ok(secrets)
}

/// Creates a new secret file at `path` (which must not exist) and returns
/// the secret written to it.
fn create_secret_file(path: &Path) -> io::Result<Vec<u8>> {
    let mut raw = [0u8; 32];
    SystemRandom::new()
        .fill(&mut raw)
        .map_err(|_| io::Error::other("system random number generator failed"))?;
    let secret = BASE64.encode(raw);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    let written = file
        .write_all(format!("{secret}\n").as_bytes())
        .and_then(|()| file.sync_all());
    if let Err(e) = written {
        // Do not leave an empty or partial file behind: it would be refused
        // (or, worse, accepted truncated) on the next start.
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(secret.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2020-01-01 00:01:00 UTC, the time postsrsd's tests use.
    const T2020: u64 = 1_577_836_860;
    const DAY: u64 = 86_400;

    fn srs() -> Srs {
        Srs::new("example.com", vec![b"tops3cr3t".to_vec()])
    }

    #[test]
    fn known_answers_postsrsd() {
        let s = srs();
        assert_eq!(
            s.forward("test@otherdomain.com", T2020).as_deref(),
            Some("SRS0=vmyz=2W=otherdomain.com=test@example.com")
        );
        assert_eq!(
            s.forward("testing@otherdomain.com", T2020).as_deref(),
            Some("SRS0=rNNq=2W=otherdomain.com=testing@example.com")
        );
        assert_eq!(
            s.forward("SRS0=opaque+string@otherdomain.com", T2020)
                .as_deref(),
            Some("SRS1=chaI=otherdomain.com==opaque+string@example.com")
        );
        assert_eq!(
            s.forward(
                "SRS1=X=thirddomain.com==opaque+string@otherdomain.com",
                T2020
            )
            .as_deref(),
            Some("SRS1=JIBX=thirddomain.com==opaque+string@example.com")
        );
        assert_eq!(
            s.reverse("SRS0=XjO9=2V=otherdomain.com=test@example.com", T2020),
            Ok("test@otherdomain.com".to_owned())
        );
        assert_eq!(
            s.reverse("SRS1=JIBX=thirddomain.com==opaque+string", T2020),
            Ok("SRS0=opaque+string@thirddomain.com".to_owned())
        );
        // Upper-cased by some MTA on the way back.
        assert_eq!(
            s.reverse("SRS0=XJO9=2V=OTHERDOMAIN.COM=TEST@EXAMPLE.COM", T2020),
            Ok("TEST@OTHERDOMAIN.COM".to_owned())
        );
        // Six months old / six months in the future.
        assert_eq!(
            s.reverse("SRS0=te87=T7=otherdomain.com=test", T2020),
            Err(SrsError::Expired)
        );
        assert_eq!(
            s.reverse("SRS0=VcIb=7N=otherdomain.com=test", T2020),
            Err(SrsError::Expired)
        );
    }

    #[test]
    fn long_sender_is_still_rewritten() {
        let host = format!("{}.net", "a".repeat(503));
        let out = srs().forward(&format!("test@{host}"), T2020).unwrap();
        assert_eq!(out, format!("SRS0=G7tR=2W={host}=test@example.com"));
        let local = out.rsplit_once('@').unwrap().0;
        assert!(local.len() > 64);
        assert_eq!(srs().reverse(&out, T2020), Ok(format!("test@{host}")));
    }

    #[test]
    fn srs0_round_trip() {
        let s = Srs::new("fwd.example", vec![b"k".to_vec()]);
        let now = 1_700_000_000;
        let out = s.forward("alice@example.org", now).unwrap();
        assert!(out.starts_with("SRS0="), "{out}");
        assert!(out.ends_with("=example.org=alice@fwd.example"), "{out}");
        assert!(Srs::is_srs(&out));
        let local = out.strip_suffix("@fwd.example").unwrap();
        assert_eq!(s.reverse(local, now).unwrap(), "alice@example.org");
        assert_eq!(s.reverse(&out, now).unwrap(), "alice@example.org");
    }

    #[test]
    fn srs1_from_srs0_and_back_to_first_hop() {
        let first = Srs::new("first.example", vec![b"first".to_vec()]);
        let second = Srs::new("second.example", vec![b"second".to_vec()]);
        let now = 1_700_000_000;
        let srs0 = first.forward("alice@example.org", now).unwrap();
        let srs0_local = srs0.rsplit_once('@').unwrap().0.to_owned();
        let srs1 = second.forward(&srs0, now).unwrap();
        let expected = format!(
            "SRS1={}=first.example={}@second.example",
            &srs1[5..9],
            &srs0_local[4..]
        );
        assert_eq!(srs1, expected);
        assert!(srs1.contains("=first.example==") && Srs::is_srs(&srs1));
        // Bounce to the second hop goes back to the first hop's SRS0 ...
        let back = second.reverse(&srs1, now).unwrap();
        assert_eq!(back, srs0);
        // ... which the first hop reverses to the original sender.
        assert_eq!(first.reverse(&back, now).unwrap(), "alice@example.org");
        // A third hop re-signs the SRS1, keeping the first hop.
        let third = Srs::new("third.example", vec![b"third".to_vec()]);
        let srs1b = third.forward(&srs1, now).unwrap();
        assert!(srs1b.starts_with("SRS1="));
        assert!(srs1b.ends_with(&format!(
            "=first.example={}@third.example",
            &srs0_local[4..]
        )));
        assert_eq!(third.reverse(&srs1b, now).unwrap(), srs0);
        // Tampering with the opaque part is detected.
        let forged = srs1.replacen("first.example", "evil.example", 1);
        assert_eq!(second.reverse(&forged, now), Err(SrsError::BadHash));
    }

    #[test]
    fn srs0_other_separators_and_case() {
        let s = srs();
        let out = s
            .forward("srs0+abcd=ZZ=a.example=bob@other.example", T2020)
            .unwrap();
        assert!(out.starts_with("SRS1="));
        assert!(out.ends_with("=other.example=+abcd=ZZ=a.example=bob@example.com"));
        assert_eq!(
            s.reverse(&out, T2020).unwrap(),
            "SRS0+abcd=ZZ=a.example=bob@other.example"
        );
    }

    #[test]
    fn bad_hash_refused() {
        let s = srs();
        assert_eq!(
            s.reverse("SRS0=FAKE=2V=otherdomain.com=test", T2020),
            Err(SrsError::BadHash)
        );
        assert_eq!(
            s.reverse("SRS1=XXXX=thirddomain.com==opaque+string", T2020),
            Err(SrsError::BadHash)
        );
        // Right hash, other data.
        assert_eq!(
            s.reverse("SRS0=XjO9=2V=otherdomain.com=mallory", T2020),
            Err(SrsError::BadHash)
        );
        // Too short.
        assert_eq!(
            s.reverse("SRS0=XjO=2V=otherdomain.com=test", T2020),
            Err(SrsError::BadHash)
        );
        // Other secret.
        let other = Srs::new("example.com", vec![b"other".to_vec()]);
        assert_eq!(
            other.reverse("SRS0=XjO9=2V=otherdomain.com=test", T2020),
            Err(SrsError::BadHash)
        );
    }

    #[test]
    fn case_insensitive_hash_prefix_and_timestamp() {
        let s = srs();
        for local in [
            "srs0=xjo9=2v=otherdomain.com=test",
            "Srs0=XJO9=2v=OtherDomain.com=test",
            "SRS0+XjO9=2V=otherdomain.com=test",
            "sRs0-xJo9=2V=otherdomain.com=test",
        ] {
            // The original's case is preserved, the check ignores it.
            assert!(
                s.reverse(local, T2020)
                    .unwrap()
                    .eq_ignore_ascii_case("test@otherdomain.com"),
                "{local}"
            );
        }
        assert_eq!(
            s.reverse("srs1=jibx=thirddomain.com==opaque+string", T2020),
            Ok("SRS0=opaque+string@thirddomain.com".to_owned())
        );
    }

    #[test]
    fn malformed_and_not_srs() {
        let s = srs();
        assert_eq!(s.reverse("test", T2020), Err(SrsError::NotSrs));
        assert_eq!(s.reverse("", T2020), Err(SrsError::NotSrs));
        assert_eq!(s.reverse("SRS0", T2020), Err(SrsError::NotSrs));
        assert_eq!(s.reverse("SRS2=a=b=c=d", T2020), Err(SrsError::NotSrs));
        assert_eq!(s.reverse("SRS0_a=b=c=d", T2020), Err(SrsError::NotSrs));
        assert_eq!(
            s.reverse("some random string", T2020),
            Err(SrsError::NotSrs)
        );
        assert_eq!(
            s.reverse("SRS0=@example.com", T2020),
            Err(SrsError::Malformed)
        );
        assert_eq!(s.reverse("SRS0=XjO9", T2020), Err(SrsError::Malformed));
        assert_eq!(s.reverse("SRS0=XjO9=2V", T2020), Err(SrsError::Malformed));
        assert_eq!(
            s.reverse("SRS0=XjO9=2V=otherdomain.com", T2020),
            Err(SrsError::Malformed)
        );
        assert_eq!(
            s.reverse("SRS0=XjO9=00=otherdomain.com=test", T2020),
            Err(SrsError::Malformed)
        );
        assert_eq!(
            s.reverse("SRS0=XjO9=2VV=otherdomain.com=test", T2020),
            Err(SrsError::Malformed)
        );
        assert_eq!(
            s.reverse("SRS1-@example.com", T2020),
            Err(SrsError::Malformed)
        );
        assert_eq!(
            s.reverse("SRS1=X=thirddomain.com", T2020),
            Err(SrsError::Malformed)
        );
        assert!(Srs::is_srs("SRS0=x") && Srs::is_srs("srs1-x") && Srs::is_srs("SrS0+"));
        assert!(!Srs::is_srs("srs0") && !Srs::is_srs("xSRS0=y") && !Srs::is_srs("bob"));
        assert!(!Srs::is_srs("") && !Srs::is_srs("SRS3=x"));
    }

    #[test]
    fn expiry_and_wrap() {
        let s = srs().with_max_age_days(21);
        let sent = T2020;
        let out = s.forward("a@b.example", sent).unwrap();
        assert_eq!(s.reverse(&out, sent).unwrap(), "a@b.example");
        assert_eq!(s.reverse(&out, sent + 21 * DAY).unwrap(), "a@b.example");
        assert_eq!(s.reverse(&out, sent + 22 * DAY), Err(SrsError::Expired));
        assert_eq!(s.reverse(&out, sent + 200 * DAY), Err(SrsError::Expired));
        // From the future (clock skew of more than a day looks 1023 days old).
        assert_eq!(s.reverse(&out, sent - DAY), Err(SrsError::Expired));
        // The timestamp repeats every 1024 days.
        assert_eq!(s.reverse(&out, sent + 1024 * DAY).unwrap(), "a@b.example");

        // Across the wrap: signed on day 1023 of the cycle, reversed on day
        // 5 of the next one (7 days later).
        let day1023 = 18_431 * DAY; // 18431 % 1024 == 1023
        let out = s.forward("a@b.example", day1023 + 3600).unwrap();
        assert!(out.contains("=77=b.example="), "{out}");
        assert_eq!(s.reverse(&out, day1023 + 7 * DAY).unwrap(), "a@b.example");
        assert_eq!(s.reverse(&out, day1023 + 22 * DAY), Err(SrsError::Expired));
        let out = s.forward("a@b.example", day1023 + DAY).unwrap();
        assert!(out.contains("=AA=b.example="), "{out}");

        let short = srs().with_max_age_days(0);
        let out = short.forward("a@b.example", sent).unwrap();
        assert!(short.reverse(&out, sent).is_ok());
        assert_eq!(short.reverse(&out, sent + DAY), Err(SrsError::Expired));
    }

    #[test]
    fn timestamp_encoding() {
        assert_eq!(&timestamp(0), b"AA");
        assert_eq!(&timestamp(T2020), b"2W");
        assert_eq!(&timestamp(1023 * DAY), b"77");
        assert_eq!(&timestamp(1024 * DAY), b"AA");
        assert_eq!(parse_timestamp("2w"), Some(854));
        assert_eq!(parse_timestamp("77"), Some(1023));
        assert_eq!(parse_timestamp("A"), None);
        assert_eq!(parse_timestamp("A1"), None);
    }

    #[test]
    fn key_rotation() {
        let old = b"old secret".to_vec();
        let new = b"new secret".to_vec();
        let only_old = Srs::new("example.com", vec![old.clone()]);
        let only_new = Srs::new("example.com", vec![new.clone()]);
        let rotated = Srs::new("example.com", vec![new.clone(), old.clone()]);
        let both_old_first = Srs::new("example.com", vec![old, new]);

        // Signed with the new secret, reversed with [old, new] and [new, old].
        let by_new = only_new.forward("a@b.example", T2020).unwrap();
        assert_eq!(rotated.forward("a@b.example", T2020).unwrap(), by_new);
        assert!(both_old_first.reverse(&by_new, T2020).is_ok());
        assert!(rotated.reverse(&by_new, T2020).is_ok());
        assert_eq!(only_old.reverse(&by_new, T2020), Err(SrsError::BadHash));

        // Signed with the old secret (before the rotation), reversed after.
        let by_old = only_old.forward("a@b.example", T2020).unwrap();
        assert_ne!(by_old, by_new);
        assert_eq!(rotated.reverse(&by_old, T2020).unwrap(), "a@b.example");
        assert_eq!(only_new.reverse(&by_old, T2020), Err(SrsError::BadHash));
    }

    #[test]
    fn local_part_containing_equals() {
        let s = srs();
        let out = s.forward("a=b==c=@x.example", T2020).unwrap();
        assert!(out.ends_with("=x.example=a=b==c=@example.com"), "{out}");
        assert_eq!(s.reverse(&out, T2020).unwrap(), "a=b==c=@x.example");
    }

    #[test]
    fn null_sender_and_unrewritable() {
        let s = srs();
        assert_eq!(s.forward("", T2020), None);
        assert_eq!(s.forward("<>", T2020), None);
        assert_eq!(s.forward("foo", T2020), None);
        assert_eq!(s.forward("@x.example", T2020), None);
        assert_eq!(s.forward("test@", T2020), None);
    }

    #[test]
    fn sender_already_in_srs_domain() {
        let s = srs();
        assert_eq!(s.forward("test@example.com", T2020), None);
        assert_eq!(s.forward("Test@EXAMPLE.com", T2020), None);
        assert_eq!(
            s.forward("SRS0=vmyz=2W=otherdomain.com=test@example.com", T2020),
            None
        );
        // A subdomain is not ours.
        assert!(s.forward("test@sub.example.com", T2020).is_some());
    }

    #[test]
    fn srs1_input_without_first_hop_is_wrapped_as_srs0() {
        let s = srs();
        let out = s
            .forward("SRS1=X=thirddomain.com@otherdomain.com", T2020)
            .unwrap();
        assert!(out.starts_with("SRS0="), "{out}");
        assert_eq!(
            s.reverse(&out, T2020).unwrap(),
            "SRS1=X=thirddomain.com@otherdomain.com"
        );
    }

    #[test]
    fn error_messages() {
        for e in [
            SrsError::NotSrs,
            SrsError::Malformed,
            SrsError::BadHash,
            SrsError::Expired,
        ] {
            let msg = e.to_string();
            assert!(msg.contains("SRS"), "{msg}");
            let _: &dyn std::error::Error = &e;
        }
    }

    #[test]
    fn load_or_create_secrets_creates_once() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("srs.secret");
        let first = load_or_create_secrets(&path).unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].len(), 44); // base64 of 32 bytes
        assert_eq!(BASE64.decode(&first[0]).unwrap().len(), 32);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.as_bytes(), [first[0].as_slice(), b"\n"].concat());
        let again = load_or_create_secrets(&path).unwrap();
        assert_eq!(again, first);
        // Usable as a key.
        let s = Srs::new("example.com", again);
        let out = s.forward("a@b.example", T2020).unwrap();
        assert_eq!(s.reverse(&out, T2020).unwrap(), "a@b.example");
    }

    #[test]
    fn load_secrets_file_format() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets");
        std::fs::write(
            &path,
            "# rotated 2024\n\n  new-secret  \n#old\nold-secret\r\n",
        )
        .unwrap();
        assert_eq!(
            load_or_create_secrets(&path).unwrap(),
            vec![b"new-secret".to_vec(), b"old-secret".to_vec()]
        );
        std::fs::write(&path, "# nothing\n\n   \n").unwrap();
        let err = load_or_create_secrets(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        // postsrsd-style file: the line itself is the key.
        std::fs::write(&path, "tops3cr3t\n").unwrap();
        let s = Srs::new("example.com", load_or_create_secrets(&path).unwrap());
        assert_eq!(
            s.forward("test@otherdomain.com", T2020).as_deref(),
            Some("SRS0=vmyz=2W=otherdomain.com=test@example.com")
        );
    }

    #[test]
    #[should_panic(expected = "at least one secret")]
    fn new_without_secret_panics() {
        let _ = Srs::new("example.com", Vec::new());
    }
}
