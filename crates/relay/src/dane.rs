//! DANE for SMTP (RFC 7672), with a validating resolver the operator names (`[dns] dnssec =
//! true` and `[dns] nameservers`): its AD bit says an answer is DNSSEC-secure, as Postfix's
//! `smtp_dns_support_level = dnssec` trusts the local resolver's.
//!
//! - [`SecureDns`] asks the nameservers directly (hickory-proto messages over UDP, TCP when
//!   truncated) with the AD bit set, and reads the AD bit and the answer of each reply.
//! - [`usable`] keeps the TLSA records SMTP may use (RFC 7672 §3.1.3: DANE-TA(2) and
//!   DANE-EE(3); selectors Cert(0) and SPKI(1); matching Full(0), SHA-256(1), SHA-512(2)).
//! - [`DaneVerifier`] authenticates the server's certificate chain with them: DANE-EE matches
//!   the end-entity certificate alone (no name, no expiry: §3.1.1); DANE-TA matches a
//!   certificate of the chain, which then anchors a normal validation of the chain for the MX
//!   host's name (§3.1.2, §3.2.2).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_resolver::proto::rr::rdata::TLSA;
use hickory_resolver::proto::rr::rdata::tlsa::{CertUsage, Matching, Selector};
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What a lookup answered, and whether the resolver vouched for it (AD).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer<T> {
    /// Records, DNSSEC-secure.
    Secure(Vec<T>),
    /// The name or type does not exist, securely (NXDOMAIN or NODATA with AD).
    SecureNone,
    /// Records or none, but not secure: DANE does not apply.
    Insecure,
    /// No usable answer (SERVFAIL, as a validating resolver says "bogus"; a timeout):
    /// DANE cannot be judged, the host must not be used now (RFC 7672 §2.1.1).
    Failed(String),
}

/// Queries to validating nameservers, trusting their AD bit.
#[derive(Debug, Clone)]
pub struct SecureDns {
    servers: Vec<SocketAddr>,
    timeout: Duration,
}

impl SecureDns {
    /// Queries `servers` in turn, `timeout` each.
    pub fn new(servers: Vec<SocketAddr>, timeout: Duration) -> SecureDns {
        SecureDns { servers, timeout }
    }

    /// The TLSA records of `_PORT._tcp.HOST`.
    pub async fn tlsa(&self, host: &str, port: u16) -> Answer<TLSA> {
        let name = format!("_{port}._tcp.{}.", host.trim_end_matches('.'));
        self.query(&name, RecordType::TLSA, |d| match d {
            RData::TLSA(t) => Some(t.clone()),
            _ => None,
        })
        .await
    }

    /// Whether the MX RRset of `domain` is secure (records or a secure denial).
    pub async fn mx_secure(&self, domain: &str) -> Answer<()> {
        let name = format!("{}.", domain.trim_end_matches('.'));
        self.query(&name, RecordType::MX, |d| match d {
            RData::MX(_) => Some(()),
            _ => None,
        })
        .await
    }

    async fn query<T>(
        &self,
        name: &str,
        rtype: RecordType,
        keep: impl Fn(&RData) -> Option<T>,
    ) -> Answer<T> {
        let Ok(qname) = Name::from_ascii(name) else {
            return Answer::Failed(format!("invalid name {name:?}"));
        };
        let mut last = "no nameserver".to_string();
        for server in &self.servers {
            match tokio::time::timeout(self.timeout, exchange(*server, &qname, rtype)).await {
                Ok(Ok(reply)) => {
                    let ad = reply.metadata.authentic_data;
                    return match reply.metadata.response_code {
                        ResponseCode::NoError => {
                            let found: Vec<T> = reply
                                .answers
                                .iter()
                                .filter(|r: &&Record| r.record_type() == rtype)
                                .filter_map(|r| keep(&r.data))
                                .collect();
                            match (ad, found.is_empty()) {
                                (true, false) => Answer::Secure(found),
                                (true, true) => Answer::SecureNone,
                                (false, _) => Answer::Insecure,
                            }
                        }
                        ResponseCode::NXDomain if ad => Answer::SecureNone,
                        ResponseCode::NXDomain => Answer::Insecure,
                        code => {
                            Answer::Failed(format!("{name} {rtype}: the resolver answered {code}"))
                        }
                    };
                }
                Ok(Err(e)) => last = format!("{name} {rtype} from {server}: {e}"),
                Err(_) => last = format!("{name} {rtype} from {server}: no answer (timeout)"),
            }
        }
        Answer::Failed(last)
    }
}

/// One query and its reply: UDP, then TCP when the reply is truncated.
async fn exchange(server: SocketAddr, name: &Name, rtype: RecordType) -> Result<Message, String> {
    let id: u16 = rand_id();
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    // RFC 6840 §5.7: AD in a query asks for AD in the reply.
    m.metadata.authentic_data = true;
    m.add_query(Query::query(name.clone(), rtype));
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    m.set_edns(edns);
    let bytes = m.to_vec().map_err(|e| e.to_string())?;
    let bind: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse().expect("an address")
    } else {
        "[::]:0".parse().expect("an address")
    };
    let udp = tokio::net::UdpSocket::bind(bind)
        .await
        .map_err(|e| e.to_string())?;
    udp.connect(server).await.map_err(|e| e.to_string())?;
    udp.send(&bytes).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 4096];
    let reply = loop {
        let n = udp.recv(&mut buf).await.map_err(|e| e.to_string())?;
        let Ok(reply) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        if answers(&reply, id, name, rtype) {
            break reply;
        }
    };
    if !reply.metadata.truncation {
        return Ok(reply);
    }
    let mut tcp = tokio::net::TcpStream::connect(server)
        .await
        .map_err(|e| e.to_string())?;
    let len = u16::try_from(bytes.len()).map_err(|e| e.to_string())?;
    tcp.write_all(&len.to_be_bytes())
        .await
        .map_err(|e| e.to_string())?;
    tcp.write_all(&bytes).await.map_err(|e| e.to_string())?;
    let mut len = [0u8; 2];
    tcp.read_exact(&mut len).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    tcp.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
    let reply = Message::from_vec(&buf).map_err(|e| e.to_string())?;
    if !answers(&reply, id, name, rtype) {
        return Err("a reply to another question".into());
    }
    Ok(reply)
}

/// True when `reply` answers our query `id` for `name` `rtype`.
fn answers(reply: &Message, id: u16, name: &Name, rtype: RecordType) -> bool {
    reply.metadata.id == id
        && reply.metadata.message_type == MessageType::Response
        && reply.queries.len() == 1
        && reply.queries[0].query_type == rtype
        && reply.queries[0].name.to_lowercase() == name.to_lowercase()
}

fn rand_id() -> u16 {
    use ring::rand::SecureRandom;
    let mut id = [0u8; 2];
    let _ = ring::rand::SystemRandom::new().fill(&mut id);
    u16::from_be_bytes(id)
}

/// The TLSA records SMTP may use (RFC 7672 §3.1.3); a set with records but none usable means
/// "TLS, unauthenticated" (§2.2).
pub fn usable(records: &[TLSA]) -> Vec<TLSA> {
    records
        .iter()
        .filter(|t| matches!(t.cert_usage, CertUsage::DaneTa | CertUsage::DaneEe))
        .filter(|t| matches!(t.selector, Selector::Full | Selector::Spki))
        .filter(|t| match t.matching {
            Matching::Raw => !t.cert_data.is_empty(),
            Matching::Sha256 => t.cert_data.len() == 32,
            Matching::Sha512 => t.cert_data.len() == 64,
            _ => false,
        })
        .cloned()
        .collect()
}

/// A TLSA record as a zone file writes its data: `3 1 1 ABCD…` (for TLS-RPT's
/// `policy-string`).
pub fn record_text(t: &TLSA) -> String {
    let hex: String = t.cert_data.iter().map(|b| format!("{b:02X}")).collect();
    format!(
        "{} {} {} {hex}",
        u8::from(t.cert_usage),
        u8::from(t.selector),
        u8::from(t.matching)
    )
}

/// True when `cert` matches `t`'s selector and matching type.
fn matches(t: &TLSA, cert: &CertificateDer<'_>) -> bool {
    let selected: Vec<u8> = match t.selector {
        Selector::Full => cert.as_ref().to_vec(),
        Selector::Spki => match webpki::EndEntityCert::try_from(cert) {
            Ok(c) => c.subject_public_key_info().as_ref().to_vec(),
            Err(_) => return false,
        },
        _ => return false,
    };
    let digest = match t.matching {
        Matching::Raw => selected,
        Matching::Sha256 => ring::digest::digest(&ring::digest::SHA256, &selected)
            .as_ref()
            .to_vec(),
        Matching::Sha512 => ring::digest::digest(&ring::digest::SHA512, &selected)
            .as_ref()
            .to_vec(),
        _ => return false,
    };
    digest == t.cert_data
}

/// Authenticates a server's certificate chain with usable TLSA records.
#[derive(Debug)]
pub struct DaneVerifier {
    records: Vec<TLSA>,
    provider: Arc<CryptoProvider>,
    /// The handshake's signatures are checked as for any certificate.
    signatures: crate::client::AnyCertificate,
}

impl DaneVerifier {
    /// A verifier for these (usable) records.
    pub fn new(records: Vec<TLSA>, provider: Arc<CryptoProvider>) -> DaneVerifier {
        DaneVerifier {
            records,
            signatures: crate::client::AnyCertificate(provider.clone()),
            provider,
        }
    }

    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<(), String> {
        // DANE-EE: the end-entity certificate itself; nothing else is checked (§3.1.1).
        if self
            .records
            .iter()
            .filter(|t| t.cert_usage == CertUsage::DaneEe)
            .any(|t| matches(t, end_entity))
        {
            return Ok(());
        }
        // DANE-TA: a certificate of the chain the server sent is the trust anchor of a normal
        // validation for the MX host's name (§3.1.2, §3.2.2).
        let mut last = "no TLSA record matches the certificate chain".to_string();
        for t in self
            .records
            .iter()
            .filter(|t| t.cert_usage == CertUsage::DaneTa)
        {
            for ta in intermediates.iter().filter(|c| matches(t, c)) {
                let Ok(anchor) = webpki::anchor_from_trusted_cert(ta) else {
                    continue;
                };
                let mut roots = rustls::RootCertStore::empty();
                roots.roots.push(anchor.to_owned());
                let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
                    Arc::new(roots),
                    self.provider.clone(),
                )
                .build()
                .map_err(|e| e.to_string())?;
                match verifier.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
                {
                    Ok(_) => return Ok(()),
                    Err(e) => last = format!("DANE-TA: {e}"),
                }
            }
        }
        Err(last)
    }
}

impl ServerCertVerifier for DaneVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity, intermediates, server_name, ocsp_response, now)
            .map(|()| ServerCertVerified::assertion())
            .map_err(|why| rustls::Error::General(format!("DANE: {why}")))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.signatures.supported_verify_schemes()
    }
}
