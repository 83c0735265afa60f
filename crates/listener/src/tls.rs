//! TLS for the listeners: the server certificate, its hot reload, and the text the
//! `Received:` header records about a TLS session.
//!
//! The certificate comes either from files the operator names (`[tls] certificate` and
//! `private_key`, PEM) or, when neither is named, from a self-signed ECDSA P-256 certificate
//! generated once into `data_dir/tls/` for development. rustls is configured with the *ring*
//! provider explicitly (no process-wide default is needed) and accepts TLS 1.2 and 1.3 only.
//!
//! [`Tls::reload`] re-reads the files when their modification time, length or inode changed,
//! so that an ACME client's renewal is picked up without a restart; broken new files leave
//! the old certificate in service.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::ServerConfig;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Where the server certificate comes from (the `[tls]` section of the configuration, plus
/// what the self-signed fallback needs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// PEM file with the certificate chain, end-entity certificate first.
    pub certificate: Option<PathBuf>,
    /// PEM file with the private key (PKCS#8, SEC1 or PKCS#1).
    pub private_key: Option<PathBuf>,
    /// The server's data directory; the self-signed certificate lives in `data_dir/tls/`.
    pub data_dir: PathBuf,
    /// The server's host name, put into the self-signed certificate.
    pub hostname: String,
}

/// Why a certificate or key could not be loaded. The messages name the file and say what is
/// wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Only one of `certificate` and `private_key` is configured.
    #[error(
        "[tls] {given} is set but {missing} is not: set both, or neither for a self-signed certificate"
    )]
    Incomplete {
        /// The setting that is present.
        given: &'static str,
        /// The setting that is missing.
        missing: &'static str,
    },
    /// A file could not be read (missing, unreadable, ...).
    #[error("cannot read {}: {cause}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        cause: io::Error,
    },
    /// A file is not well-formed PEM.
    #[error("cannot parse {}: {detail}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What the PEM parser said.
        detail: String,
    },
    /// The certificate file holds no `BEGIN CERTIFICATE` block.
    #[error("no certificate in {} (expected a PEM \"BEGIN CERTIFICATE\" block)", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The key file holds no private key block.
    #[error("no private key in {} (expected a PEM \"BEGIN PRIVATE KEY\", \"BEGIN EC PRIVATE KEY\" or \"BEGIN RSA PRIVATE KEY\" block)", path.display())]
    NoKey {
        /// The file.
        path: PathBuf,
    },
    /// The private key does not belong to the end-entity certificate.
    #[error("private key does not match the certificate: the key in {} is not the key of the first certificate in {}", key.display(), cert.display())]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// rustls refused the key (unsupported algorithm, corrupt DER, ...).
    #[error("unusable private key in {}: {cause}", path.display())]
    BadKey {
        /// The key file.
        path: PathBuf,
        /// What rustls said.
        cause: rustls::Error,
    },
    /// rustls refused the certificate (not parseable X.509, ...).
    #[error("unusable certificate in {}: {cause}", path.display())]
    BadCertificate {
        /// The certificate file.
        path: PathBuf,
        /// What rustls said.
        cause: rustls::Error,
    },
    /// Generating the self-signed certificate failed.
    #[error("cannot generate a self-signed certificate for {hostname:?}: {cause}")]
    Generate {
        /// The host name it was for.
        hostname: String,
        /// What rcgen said.
        cause: rcgen::Error,
    },
    /// Writing the self-signed certificate or its key failed.
    #[error("cannot write {}: {cause}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        cause: io::Error,
    },
}

/// What identifies one version of a file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    mtime: Option<SystemTime>,
    len: u64,
    ino: u64,
}

impl Stamp {
    /// Follows symbolic links, so that certbot's `live/` links switching to new files in
    /// `archive/` count as a change.
    fn of(path: &Path) -> Option<Stamp> {
        let meta = fs::metadata(path).ok()?;
        #[cfg(unix)]
        let ino = std::os::unix::fs::MetadataExt::ino(&meta);
        #[cfg(not(unix))]
        let ino = 0;
        Some(Stamp {
            mtime: meta.modified().ok(),
            len: meta.len(),
            ino,
        })
    }
}

/// The configuration in service and the file versions it was built from.
struct Current {
    config: Arc<ServerConfig>,
    stamps: (Option<Stamp>, Option<Stamp>),
}

/// The server's TLS configuration, reloadable while connections are being served.
/// `Send + Sync`: share it behind an `Arc`.
pub struct Tls {
    cert_path: PathBuf,
    key_path: PathBuf,
    /// The self-signed certificate was generated for this host name (None: operator's files,
    /// or a self-signed certificate generated on an earlier start).
    generated_for: Option<String>,
    self_signed: bool,
    current: RwLock<Current>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("certificate", &self.cert_path)
            .field("private_key", &self.key_path)
            .field("self_signed", &self.self_signed)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Loads the certificate and key.
    ///
    /// Files given: loads the PEM chain (`CertificateDer::pem_file_iter`, end-entity
    /// certificate first) and the key (`PrivateKeyDer::from_pem_file`; PKCS#8, SEC1/ECDSA and
    /// RSA/PKCS#1 all work), and checks that the key belongs to the certificate.
    ///
    /// Neither given: uses `data_dir/tls/cert.pem` and `key.pem`, generating a self-signed
    /// ECDSA P-256 certificate for `hostname` and `localhost` on first start (the key file
    /// with mode 0600, and a log line at info level saying that clients will not trust it).
    /// Later starts reuse the files, even if `hostname` changed; delete them to regenerate.
    pub fn load(settings: &TlsSettings) -> Result<Tls, TlsError> {
        let (cert_path, key_path, self_signed, generated_for) = match (
            &settings.certificate,
            &settings.private_key,
        ) {
            (Some(c), Some(k)) => (c.clone(), k.clone(), false, None),
            (Some(_), None) => {
                return Err(TlsError::Incomplete {
                    given: "certificate",
                    missing: "private_key",
                });
            }
            (None, Some(_)) => {
                return Err(TlsError::Incomplete {
                    given: "private_key",
                    missing: "certificate",
                });
            }
            (None, None) => {
                let dir = settings.data_dir.join("tls");
                let cert = dir.join("cert.pem");
                let key = dir.join("key.pem");
                let generated = if cert.exists() && key.exists() {
                    None
                } else {
                    generate_self_signed(&dir, &cert, &key, &settings.hostname)?;
                    tracing::info!(
                        "generated a self-signed certificate in {}; clients will not trust it — configure [tls] certificate and private_key for production",
                        dir.display()
                    );
                    Some(settings.hostname.clone())
                };
                (cert, key, true, generated)
            }
        };
        if !self_signed {
            warn_if_world_readable(&key_path);
        }
        let stamps = (Stamp::of(&cert_path), Stamp::of(&key_path));
        let config = build_config(&cert_path, &key_path)?;
        Ok(Tls {
            cert_path,
            key_path,
            generated_for,
            self_signed,
            current: RwLock::new(Current { config, stamps }),
        })
    }

    /// A tokio-rustls acceptor with the current configuration (cheap: clones an `Arc`).
    /// Connections already established keep the configuration they started with.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config())
    }

    /// The current rustls server configuration.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .config
            .clone()
    }

    /// Re-reads the files if their modification time, length or inode changed.
    ///
    /// `Ok(true)` if it reloaded, `Ok(false)` if nothing changed. When the new files are
    /// broken (half-written, key and certificate out of step, garbage) it keeps the old
    /// configuration and returns the error; the next call tries again, so a renewal that
    /// writes the certificate and the key one after the other is picked up once both are in
    /// place. Blocking file I/O: call it from a blocking context (as the watcher does).
    pub fn reload(&self) -> Result<bool, TlsError> {
        let stamps = (Stamp::of(&self.cert_path), Stamp::of(&self.key_path));
        if self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .stamps
            == stamps
        {
            return Ok(false);
        }
        let config = build_config(&self.cert_path, &self.key_path)?;
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        *current = Current { config, stamps };
        Ok(true)
    }

    /// Spawns a task on `tracker` that calls [`Tls::reload`] every `every` until `shutdown`
    /// is cancelled, logging reloads (info) and failures (warn; a failure that repeats is
    /// logged once, and its end is logged too). ACME clients renew certificates about every
    /// 60 days; checking every minute or so costs two `stat` calls.
    pub fn spawn_watcher(
        self: &Arc<Self>,
        every: Duration,
        shutdown: CancellationToken,
        tracker: &TaskTracker,
    ) {
        let tls = self.clone();
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await; // the first tick is immediate; the files were just loaded
            let mut last_error: Option<String> = None;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let t = tls.clone();
                let result = match tokio::task::spawn_blocking(move || t.reload()).await {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(error = %e, "TLS certificate reload task failed");
                        continue;
                    }
                };
                match result {
                    Ok(true) => {
                        tracing::info!(source = %tls.describe_source(), "reloaded the TLS certificate");
                        last_error = None;
                    }
                    Ok(false) => {}
                    Err(e) => {
                        let msg = e.to_string();
                        if last_error.as_deref() != Some(msg.as_str()) {
                            tracing::warn!(error = %msg, "cannot reload the TLS certificate; still serving the previous one");
                            last_error = Some(msg);
                        }
                    }
                }
            }
            tracing::debug!("TLS certificate watcher stopped");
        });
    }

    /// The certificate files in use, for logs: `"certificate /etc/x/cert.pem, key
    /// /etc/x/key.pem"`, or the same prefixed with `self-signed`.
    pub fn describe_source(&self) -> String {
        let mut s = String::new();
        if self.self_signed {
            s.push_str("self-signed ");
        }
        s.push_str(&format!(
            "certificate {}, key {}",
            self.cert_path.display(),
            self.key_path.display()
        ));
        if let Some(h) = &self.generated_for {
            s.push_str(&format!(" (generated for {h} at this start)"));
        }
        s
    }

    /// Whether the certificate is the self-signed development one (no files configured).
    pub fn is_self_signed(&self) -> bool {
        self.self_signed
    }
}

/// `"TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384"`, for the `Received:` header comment
/// (RFC 3848 style), from a server connection whose handshake has finished. Before the
/// handshake it returns just `"TLS"`.
pub fn session_description(conn: &rustls::ServerConnection) -> String {
    let version = version_name(conn);
    match cipher_name(conn) {
        Some(cipher) => format!("{version} with cipher {cipher}"),
        None => version,
    }
}

/// The protocol version of a finished handshake: `"TLSv1.3"` or `"TLSv1.2"` (the two this
/// server offers); `"TLS"` before the handshake.
pub fn version_name(conn: &rustls::ServerConnection) -> String {
    match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
        Some(v) => format!("{v:?}"),
        None => "TLS".to_string(),
    }
}

/// The negotiated cipher suite's name (`"TLS13_AES_256_GCM_SHA384"`), once negotiated.
pub fn cipher_name(conn: &rustls::ServerConnection) -> Option<String> {
    conn.negotiated_cipher_suite().map(|suite| {
        let s = suite.suite();
        match s.as_str() {
            Some(name) => name.to_string(),
            None => format!("{s:?}"),
        }
    })
}

/// Reads the files and builds a rustls server configuration: ring, TLS 1.2 and 1.3, no
/// client certificates.
fn build_config(cert_path: &Path, key_path: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = read_chain(cert_path)?;
    let key = read_key(key_path)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default protocol versions")
        .with_no_client_auth();
    match builder.with_single_cert(chain, key) {
        Ok(config) => Ok(Arc::new(config)),
        Err(rustls::Error::InconsistentKeys(_)) => Err(TlsError::KeyMismatch {
            cert: cert_path.to_path_buf(),
            key: key_path.to_path_buf(),
        }),
        Err(e @ rustls::Error::InvalidCertificate(_)) => Err(TlsError::BadCertificate {
            path: cert_path.to_path_buf(),
            cause: e,
        }),
        Err(e) => Err(TlsError::BadKey {
            path: key_path.to_path_buf(),
            cause: e,
        }),
    }
}

fn pem_error(path: &Path, e: pem::Error) -> TlsError {
    match e {
        pem::Error::Io(source) => TlsError::Read {
            path: path.to_path_buf(),
            cause: source,
        },
        other => TlsError::Pem {
            path: path.to_path_buf(),
            detail: other.to_string(),
        },
    }
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    // Open it ourselves first: pem_file_iter's error for a missing file does not say which.
    fs::metadata(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        cause: source,
    })?;
    let chain = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(chain)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    fs::metadata(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        cause: source,
    })?;
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::NoKey {
            path: path.to_path_buf(),
        },
        other => pem_error(path, other),
    })
}

/// A private key anyone on the machine can read deserves a word in the log.
fn warn_if_world_readable(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = fs::metadata(path)
            && meta.permissions().mode() & 0o004 != 0
        {
            tracing::warn!(
                "the TLS private key {} is readable by every user of this machine; chmod o-r it",
                path.display()
            );
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

/// Generates `key.pem` (mode 0600) and `cert.pem` in `dir`. The key is written first and
/// each file is renamed into place after an fsync, so a crash leaves either both files or a
/// state that [`Tls::load`] regenerates from.
fn generate_self_signed(
    dir: &Path,
    cert_path: &Path,
    key_path: &Path,
    hostname: &str,
) -> Result<(), TlsError> {
    let gen_err = |source| TlsError::Generate {
        hostname: hostname.to_string(),
        cause: source,
    };
    let mut names = vec![hostname.to_string()];
    if !hostname.eq_ignore_ascii_case("localhost") {
        names.push("localhost".to_string());
    }
    let mut params = rcgen::CertificateParams::new(names).map_err(gen_err)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, hostname);
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "estafeta self-signed");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen_err)?;
    let cert = params.self_signed(&key).map_err(gen_err)?;

    create_private_dir(dir)?;
    write_atomically(key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_atomically(cert_path, cert.pem().as_bytes(), 0o644)?;
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn create_private_dir(dir: &Path) -> Result<(), TlsError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(|source| TlsError::Write {
        path: dir.to_path_buf(),
        cause: source,
    })
}

fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    let err = |source| TlsError::Write {
        path: path.to_path_buf(),
        cause: source,
    };
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let _ = fs::remove_file(&tmp);
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(&tmp).map_err(err)?;
    file.write_all(contents).map_err(err)?;
    file.sync_all().map_err(err)?;
    drop(file);
    fs::rename(&tmp, path).map_err(err)
}
