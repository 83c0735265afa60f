//! TLS: certificates from files and self-signed, hot reload, error messages — with real
//! handshakes over real loopback TCP.
//!
//! Protocols older than TLS 1.2 are not implemented by rustls at all; `refuses_tls_1_1`
//! sends a hand-made TLS 1.1 ClientHello and checks the alert. The end-to-end tests are meant
//! to check the same from outside with `openssl s_client -tls1_1` (note: OpenSSL 3 at its
//! default security level refuses TLS 1.1 on the client side already; it needs
//! `-cipher DEFAULT@SECLEVEL=0` to even try).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use estafeta_listener::tls::{Tls, TlsError, TlsSettings, session_description};
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, ProtocolVersion, RootCertStore, SupportedProtocolVersion};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

/// A client that trusts exactly the certificates in `trusted` (self-signed ones included).
fn client(trusted: &[&Path], versions: &[&'static SupportedProtocolVersion]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for path in trusted {
        for cert in read_certs(path) {
            roots.add(cert).unwrap();
        }
    }
    Arc::new(
        ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

fn tls13_client(trusted: &[&Path]) -> Arc<ClientConfig> {
    client(trusted, &[&rustls::version::TLS13])
}

struct Outcome {
    /// `session_description` of the server side.
    description: String,
    /// The version the client negotiated.
    version: ProtocolVersion,
    /// The certificate the server presented.
    served: CertificateDer<'static>,
}

/// One real handshake over loopback TCP against `tls.acceptor()`, then a greeting from the
/// server to the client through the encrypted channel.
async fn handshake(tls: &Tls, config: Arc<ClientConfig>, name: &str) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tls.acceptor();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut stream = acceptor.accept(tcp).await.unwrap();
        let description = session_description(stream.get_ref().1);
        stream.write_all(b"220 ready\r\n").await.unwrap();
        stream.flush().await.unwrap();
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest).await;
        description
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from(name.to_string()).unwrap();
    let mut stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .unwrap();
    let mut greeting = [0u8; 11];
    stream.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting, b"220 ready\r\n");
    let (_, conn) = stream.get_ref();
    let version = conn.protocol_version().unwrap();
    let served = conn.peer_certificates().unwrap()[0].clone().into_owned();
    stream.shutdown().await.unwrap();
    drop(stream);
    let description = server.await.unwrap();
    Outcome {
        description,
        version,
        served,
    }
}

fn self_signed_settings(data_dir: &Path) -> TlsSettings {
    TlsSettings {
        certificate: None,
        private_key: None,
        data_dir: data_dir.to_path_buf(),
        hostname: "mx.example.test".to_string(),
    }
}

fn file_settings(cert: &Path, key: &Path) -> TlsSettings {
    TlsSettings {
        certificate: Some(cert.to_path_buf()),
        private_key: Some(key.to_path_buf()),
        data_dir: PathBuf::from("/nonexistent"),
        hostname: "unused.test".to_string(),
    }
}

/// Writes an ECDSA P-256 certificate (PKCS#8 key) for `names` into `dir` as `cert.pem` and
/// `key.pem`, each renamed into place the way ACME clients do.
fn write_ecdsa(dir: &Path, names: &[&str]) -> (PathBuf, PathBuf, CertificateDer<'static>) {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let certified = rcgen::generate_simple_self_signed(names).unwrap();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    replace(&cert, certified.cert.pem().as_bytes());
    replace(&key, certified.signing_key.serialize_pem().as_bytes());
    (cert, key, certified.cert.der().clone())
}

fn replace(path: &Path, contents: &[u8]) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn have_openssl() -> bool {
    Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn self_signed_is_generated_once_and_reused() {
    let data = tempfile::tempdir().unwrap();
    let settings = self_signed_settings(data.path());
    let first = Tls::load(&settings).unwrap();
    assert!(first.is_self_signed());
    let cert = data.path().join("tls/cert.pem");
    let key = data.path().join("tls/key.pem");
    let cert_pem = std::fs::read(&cert).unwrap();
    let key_pem = std::fs::read(&key).unwrap();
    assert!(String::from_utf8_lossy(&key_pem).contains("BEGIN PRIVATE KEY"));
    assert!(
        first
            .describe_source()
            .contains("generated for mx.example.test")
    );

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "key file mode {mode:o}");
        let mode = std::fs::metadata(data.path().join("tls"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode & 0o077, 0, "tls directory mode {mode:o}");
    }

    let second = Tls::load(&settings).unwrap();
    assert_eq!(
        std::fs::read(&cert).unwrap(),
        cert_pem,
        "certificate regenerated"
    );
    assert_eq!(std::fs::read(&key).unwrap(), key_pem, "key regenerated");
    assert!(!second.describe_source().contains("generated"));
    assert!(
        second
            .describe_source()
            .contains(&cert.display().to_string())
    );

    // The certificate covers the host name and localhost, and is what is served.
    let expected = read_certs(&cert).remove(0);
    for name in ["mx.example.test", "localhost"] {
        let outcome = handshake(&second, tls13_client(&[&cert]), name).await;
        assert_eq!(outcome.served, expected);
    }
}

#[tokio::test]
async fn self_signed_regenerated_when_a_file_is_missing() {
    let data = tempfile::tempdir().unwrap();
    let settings = self_signed_settings(data.path());
    Tls::load(&settings).unwrap();
    let cert = data.path().join("tls/cert.pem");
    let before = std::fs::read(&cert).unwrap();
    std::fs::remove_file(data.path().join("tls/key.pem")).unwrap();
    let tls = Tls::load(&settings).unwrap();
    assert_ne!(std::fs::read(&cert).unwrap(), before);
    handshake(&tls, tls13_client(&[&cert]), "localhost").await;
}

#[tokio::test]
async fn tls13_handshake_and_session_description() {
    let data = tempfile::tempdir().unwrap();
    let tls = Tls::load(&self_signed_settings(data.path())).unwrap();
    let cert = data.path().join("tls/cert.pem");
    let outcome = handshake(&tls, tls13_client(&[&cert]), "localhost").await;
    assert_eq!(outcome.version, ProtocolVersion::TLSv1_3);
    assert!(
        outcome
            .description
            .starts_with("TLSv1.3 with cipher TLS13_"),
        "{}",
        outcome.description
    );
    // Any client (here: one offering every version) gets TLS 1.3.
    let both = client(
        &[&cert],
        &[&rustls::version::TLS13, &rustls::version::TLS12],
    );
    let outcome = handshake(&tls, both, "localhost").await;
    assert_eq!(outcome.version, ProtocolVersion::TLSv1_3);
}

#[tokio::test]
async fn tls12_client_works() {
    let data = tempfile::tempdir().unwrap();
    let tls = Tls::load(&self_signed_settings(data.path())).unwrap();
    let cert = data.path().join("tls/cert.pem");
    let outcome = handshake(
        &tls,
        client(&[&cert], &[&rustls::version::TLS12]),
        "localhost",
    )
    .await;
    assert_eq!(outcome.version, ProtocolVersion::TLSv1_2);
    assert!(
        outcome
            .description
            .starts_with("TLSv1.2 with cipher TLS_ECDHE_ECDSA_WITH_"),
        "{}",
        outcome.description
    );
}

/// rustls implements nothing older than TLS 1.2, so the server cannot negotiate it.
#[test]
fn only_tls12_and_tls13_exist() {
    let versions: Vec<ProtocolVersion> = rustls::ALL_VERSIONS.iter().map(|v| v.version).collect();
    assert_eq!(versions.len(), 2, "{versions:?}");
    assert!(versions.contains(&ProtocolVersion::TLSv1_3));
    assert!(versions.contains(&ProtocolVersion::TLSv1_2));
}

/// A TLS 1.1 ClientHello (no supported_versions extension, client_version 3.2) gets a fatal
/// protocol_version alert, not a ServerHello.
#[tokio::test]
async fn refuses_tls_1_1() {
    let data = tempfile::tempdir().unwrap();
    let tls = Tls::load(&self_signed_settings(data.path())).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tls.acceptor();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        acceptor.accept(tcp).await.is_ok()
    });

    let mut body = vec![0x03, 0x02]; // client_version TLS 1.1
    body.extend_from_slice(&[0x11; 32]); // random
    body.push(0); // no session id
    let suites: [u16; 4] = [0xc009, 0xc013, 0x002f, 0x0035]; // ECDHE-ECDSA/RSA, RSA AES-CBC-SHA
    body.extend_from_slice(&((suites.len() * 2) as u16).to_be_bytes());
    for s in suites {
        body.extend_from_slice(&s.to_be_bytes());
    }
    body.extend_from_slice(&[1, 0]); // compression: null
    // signature_algorithms (ecdsa_secp256r1_sha256, rsa_pkcs1_sha256): without it rustls
    // answers handshake_failure before it looks at the version.
    let sig_algs = [0x00, 0x0d, 0x00, 0x06, 0x00, 0x04, 0x04, 0x03, 0x04, 0x01];
    body.extend_from_slice(&(sig_algs.len() as u16).to_be_bytes());
    body.extend_from_slice(&sig_algs);
    let mut handshake = vec![1]; // client_hello
    handshake.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend_from_slice(&body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend_from_slice(&handshake);

    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(&record).await.unwrap();
    let mut reply = Vec::new();
    tcp.read_to_end(&mut reply).await.unwrap();
    assert!(reply.len() >= 7, "reply {reply:02x?}");
    assert_eq!(reply[0], 0x15, "not an alert record: {reply:02x?}");
    assert_eq!(reply[5], 2, "alert not fatal: {reply:02x?}");
    assert_eq!(reply[6], 70, "not protocol_version: {reply:02x?}");
    assert!(
        !server.await.unwrap(),
        "the server completed a TLS 1.1 handshake"
    );
}

#[tokio::test]
async fn ecdsa_files_pkcs8_and_sec1() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, der) = write_ecdsa(dir.path(), &["ecdsa.test"]);
    let tls = Tls::load(&file_settings(&cert, &key)).unwrap();
    assert!(!tls.is_self_signed());
    assert_eq!(
        tls.describe_source(),
        format!("certificate {}, key {}", cert.display(), key.display())
    );
    let outcome = handshake(&tls, tls13_client(&[&cert]), "ecdsa.test").await;
    assert_eq!(outcome.served, der);

    if !have_openssl() {
        eprintln!("openssl not found: SEC1 key not tested");
        return;
    }
    openssl(dir.path(), &["ec", "-in", "key.pem", "-out", "sec1.pem"]);
    let sec1 = dir.path().join("sec1.pem");
    assert!(
        std::fs::read_to_string(&sec1)
            .unwrap()
            .contains("BEGIN EC PRIVATE KEY")
    );
    let tls = Tls::load(&file_settings(&cert, &sec1)).unwrap();
    let outcome = handshake(&tls, tls13_client(&[&cert]), "ecdsa.test").await;
    assert_eq!(outcome.served, der);
}

#[tokio::test]
async fn rsa_files_pkcs8_and_pkcs1() {
    if !have_openssl() {
        eprintln!("openssl not found: RSA certificate not tested");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // basicConstraints CA:FALSE: webpki (the client here) refuses a CA certificate as a
    // server certificate, and `openssl req -x509` makes CA certificates by default.
    std::fs::write(
        dir.path().join("req.cnf"),
        "[req]\ndistinguished_name = dn\nx509_extensions = ext\nprompt = no\n\
         [dn]\nCN = rsa.test\n\
         [ext]\nsubjectAltName = DNS:rsa.test\nbasicConstraints = critical,CA:FALSE\n",
    )
    .unwrap();
    openssl(
        dir.path(),
        &[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "key.pem", "-out",
            "cert.pem", "-days", "2", "-config", "req.cnf",
        ],
    );
    openssl(
        dir.path(),
        &["rsa", "-in", "key.pem", "-out", "pkcs1.pem", "-traditional"],
    );
    let cert = dir.path().join("cert.pem");
    let expected = read_certs(&cert).remove(0);
    for key in ["key.pem", "pkcs1.pem"] {
        let key = dir.path().join(key);
        let tls = Tls::load(&file_settings(&cert, &key)).unwrap();
        let outcome = handshake(&tls, tls13_client(&[&cert]), "rsa.test").await;
        assert_eq!(outcome.served, expected);
        let outcome = handshake(
            &tls,
            client(&[&cert], &[&rustls::version::TLS12]),
            "rsa.test",
        )
        .await;
        assert!(
            outcome
                .description
                .starts_with("TLSv1.2 with cipher TLS_ECDHE_RSA_WITH_"),
            "{}",
            outcome.description
        );
    }
    assert!(
        std::fs::read_to_string(dir.path().join("pkcs1.pem"))
            .unwrap()
            .contains("BEGIN RSA PRIVATE KEY")
    );
}

#[tokio::test]
async fn reload_picks_up_new_files_and_survives_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let old_dir = tempfile::tempdir().unwrap();
    let (cert, key, first) = write_ecdsa(dir.path(), &["first.test", "localhost"]);
    std::fs::copy(&cert, old_dir.path().join("cert.pem")).unwrap();
    let old_cert = old_dir.path().join("cert.pem");
    let tls = Tls::load(&file_settings(&cert, &key)).unwrap();
    assert!(!tls.reload().unwrap(), "reloaded unchanged files");
    assert_eq!(
        handshake(&tls, tls13_client(&[&cert]), "localhost")
            .await
            .served,
        first
    );

    // A renewal: new key, new certificate, different names.
    let (_, _, second) = write_ecdsa(dir.path(), &["second-renewed.test", "localhost"]);
    assert_ne!(first, second);
    assert!(tls.reload().unwrap());
    assert!(!tls.reload().unwrap());
    let second_pem = old_dir.path().join("second.pem");
    std::fs::copy(&cert, &second_pem).unwrap();
    let trust_both = tls13_client(&[&cert, &old_cert]);
    assert_eq!(
        handshake(&tls, trust_both.clone(), "localhost")
            .await
            .served,
        second
    );

    // Garbage: the error names the file, and the previous certificate stays in service.
    replace(&cert, b"this is not a certificate\n");
    let err = tls.reload().unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "no certificate in {} (expected a PEM \"BEGIN CERTIFICATE\" block)",
            cert.display()
        )
    );
    assert!(
        tls.reload().is_err(),
        "a broken state is retried, not forgotten"
    );
    let trust_second = tls13_client(&[&second_pem]);
    assert_eq!(
        handshake(&tls, trust_second.clone(), "localhost")
            .await
            .served,
        second
    );

    // A half-done renewal (new certificate, old key) is refused the same way.
    let other = tempfile::tempdir().unwrap();
    let (new_cert, _, _) = write_ecdsa(other.path(), &["third.test"]);
    replace(&cert, &std::fs::read(&new_cert).unwrap());
    let err = tls.reload().unwrap_err();
    assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");
    assert_eq!(
        handshake(&tls, trust_second, "localhost").await.served,
        second
    );

    // Fixed: picked up.
    let (_, _, fourth) = write_ecdsa(dir.path(), &["fourth.test", "localhost"]);
    assert!(tls.reload().unwrap());
    assert_eq!(
        handshake(&tls, tls13_client(&[&cert]), "localhost")
            .await
            .served,
        fourth
    );
}

#[test]
fn missing_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, _) = write_ecdsa(dir.path(), &["x.test"]);
    let missing = dir.path().join("nope.pem");
    let err = Tls::load(&file_settings(&missing, &key)).unwrap_err();
    assert!(matches!(err, TlsError::Read { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!("cannot read {}: ", missing.display())),
        "{msg}"
    );
    let err = Tls::load(&file_settings(&cert, &missing)).unwrap_err();
    assert!(
        err.to_string()
            .starts_with(&format!("cannot read {}: ", missing.display())),
        "{err}"
    );
}

#[test]
fn mismatched_key_is_named() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let (cert, _, _) = write_ecdsa(a.path(), &["a.test"]);
    let (_, key, _) = write_ecdsa(b.path(), &["b.test"]);
    let err = Tls::load(&file_settings(&cert, &key)).unwrap_err();
    assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.starts_with("private key does not match the certificate"),
        "{msg}"
    );
    assert!(msg.contains(&cert.display().to_string()), "{msg}");
    assert!(msg.contains(&key.display().to_string()), "{msg}");
}

#[test]
fn empty_and_swapped_pem_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, _) = write_ecdsa(dir.path(), &["x.test"]);
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, b"").unwrap();

    let err = Tls::load(&file_settings(&empty, &key)).unwrap_err();
    assert!(matches!(err, TlsError::NoCertificate { .. }), "{err:?}");
    assert!(
        err.to_string()
            .starts_with(&format!("no certificate in {}", empty.display())),
        "{err}"
    );

    let err = Tls::load(&file_settings(&cert, &empty)).unwrap_err();
    assert!(matches!(err, TlsError::NoKey { .. }), "{err:?}");
    assert!(
        err.to_string()
            .starts_with(&format!("no private key in {}", empty.display())),
        "{err}"
    );

    // Certificate and key the wrong way round.
    let err = Tls::load(&file_settings(&key, &cert)).unwrap_err();
    assert!(
        err.to_string()
            .starts_with(&format!("no certificate in {}", key.display())),
        "{err}"
    );

    // A truncated PEM block.
    let truncated = dir.path().join("truncated.pem");
    let text = std::fs::read_to_string(&cert).unwrap();
    std::fs::write(&truncated, &text[..text.len() / 2]).unwrap();
    let err = Tls::load(&file_settings(&truncated, &key)).unwrap_err();
    assert!(
        err.to_string()
            .starts_with(&format!("cannot parse {}: ", truncated.display())),
        "{err}"
    );
}

#[test]
fn only_one_of_certificate_and_key() {
    let mut settings = file_settings(Path::new("/c.pem"), Path::new("/k.pem"));
    settings.private_key = None;
    let err = Tls::load(&settings).unwrap_err();
    assert!(
        err.to_string()
            .contains("certificate is set but private_key is not"),
        "{err}"
    );
}

#[tokio::test]
async fn watcher_reloads_and_stops() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, _) = write_ecdsa(dir.path(), &["localhost"]);
    let tls = Arc::new(Tls::load(&file_settings(&cert, &key)).unwrap());
    let old = dir.path().join("old.pem");
    std::fs::copy(&cert, &old).unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let tracker = tokio_util::task::TaskTracker::new();
    tls.spawn_watcher(
        std::time::Duration::from_millis(20),
        shutdown.clone(),
        &tracker,
    );
    let (_, _, renewed) = write_ecdsa(dir.path(), &["localhost", "renewed.test"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let served = handshake(&tls, tls13_client(&[&cert, &old]), "localhost")
            .await
            .served;
        if served == renewed {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the watcher did not reload"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    tracker.close();
    tokio::time::timeout(std::time::Duration::from_secs(5), tracker.wait())
        .await
        .expect("the watcher did not stop");
}
