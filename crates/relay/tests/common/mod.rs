//! What the relay's test files share: the skip rule, test certificates made by openssl, and a
//! TLS acceptor for the peers that present them.

#![allow(dead_code)] // each test file uses some of these

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// Skips a test with a note, or fails it where nothing may be skipped (`ESTAFETA_NO_SKIP`, as
/// `.ci/run` sets).
pub fn skip(why: &str) {
    if std::env::var_os("ESTAFETA_NO_SKIP").is_some() {
        panic!("would skip, but ESTAFETA_NO_SKIP is set: {why}");
    }
    eprintln!("SKIPPED: {why}");
}

/// A self-signed end-entity certificate for `names` (the first is its CN), made by openssl
/// into `dir/TAG.pem` and `dir/TAG.key`; None (after [`skip`]) when openssl is missing.
pub fn certificate(
    dir: &Path,
    tag: &str,
    names: &[&str],
) -> Option<(CertificateDer<'static>, PrivateKeyDer<'static>)> {
    let cert = dir.join(format!("{tag}.pem"));
    let key = dir.join(format!("{tag}.key"));
    let san = names
        .iter()
        .map(|n| format!("DNS:{n}"))
        .collect::<Vec<_>>()
        .join(",");
    let ok = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:P-256", "-nodes", "-days", "2"])
        .args(["-subj", &format!("/CN={}", names[0])])
        .args(["-addext", &format!("subjectAltName={san}")])
        // An end-entity certificate (webpki refuses a CA certificate as the server's).
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        skip("openssl is not available: TLS test skipped");
        return None;
    }
    Some((
        CertificateDer::from_pem_file(&cert).unwrap(),
        PrivateKeyDer::from_pem_file(&key).unwrap(),
    ))
}

/// A TLS acceptor presenting `cert`.
pub fn acceptor(cert: &CertificateDer<'static>, key: &PrivateKeyDer<'static>) -> TlsAcceptor {
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.clone()], key.clone_key())
    .unwrap();
    TlsAcceptor::from(Arc::new(config))
}
