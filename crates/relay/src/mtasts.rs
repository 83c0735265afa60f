//! MTA-STS (RFC 8461): a recipient domain publishes, over HTTPS, which MX hosts may receive its
//! mail and that they must be reached over TLS with a certificate valid for their name; the
//! `_mta-sts` TXT record says when that policy changes.
//!
//! The parsers ([`parse_record`], [`parse_policy`], [`mx_matches`]) do no I/O. [`MtaSts`]
//! looks the record up, fetches the policy (hyper over rustls, the certificate verified against
//! the roots the relay trusts, no redirects, at most 64 KiB, bounded in time), and caches it
//! for its `max_age`:
//!
//! - the record's `id` equals the cached policy's: the cached policy (refreshed in the
//!   background once half its life is over);
//! - the `id` differs, or nothing is cached: the policy is fetched; when the fetch fails, a
//!   cached policy that has not expired is used (RFC 8461 §5.1), else there is none;
//! - no record (or a lookup that failed): a cached policy that has not expired, else none.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use rustls::RootCertStore;
use rustls_pki_types::ServerName;
use tokio::time::Instant;

use crate::resolve::{IpVersion, Resolver};

/// The most a policy may be cached (RFC 8461 §3.2: 31,557,600 s, about a year).
pub const MAX_AGE_LIMIT: u64 = 31_557_600;
/// The largest policy file read (RFC 8461 §3.3 suggests 64 KiB).
pub const MAX_POLICY_SIZE: usize = 64 * 1024;
/// The most `mx` lines a policy may have.
pub const MAX_MX: usize = 100;
/// The most domains whose policies are cached; beyond, the one expiring first goes.
pub const MAX_CACHED: usize = 10_000;
/// How long a failed fetch for a record `id` is not tried again (RFC 8461 §3.3: at least five
/// minutes).
pub const FAILED_FETCH_PAUSE: Duration = Duration::from_secs(300);
/// The bound on the `_mta-sts` lookup.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);
/// The bound on the fetch from one address of `mta-sts.DOMAIN`.
const PER_ADDRESS_TIMEOUT: Duration = Duration::from_secs(10);

/// What a policy asks of senders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Deliver only to matching MX hosts over verified TLS.
    Enforce,
    /// Deliver as usual; report what would have failed.
    Testing,
    /// No policy (the domain withdraws one).
    None,
}

impl Mode {
    /// The mode's name in the policy and in logs.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Testing => "testing",
            Mode::None => "none",
        }
    }
}

/// A parsed policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// `mode`.
    pub mode: Mode,
    /// The `mx` patterns, lower-case A-labels without a trailing dot (`*.example.net` allowed).
    pub mx: Vec<String>,
    /// `max_age` in seconds.
    pub max_age: u64,
}

impl Policy {
    /// The policy as a policy file says it.
    pub fn to_text(&self) -> String {
        let mut t = format!("version: STSv1\nmode: {}\n", self.mode.name());
        for mx in &self.mx {
            t.push_str(&format!("mx: {mx}\n"));
        }
        t.push_str(&format!("max_age: {}\n", self.max_age));
        t
    }

    /// True when `host` (an MX host name) matches one of the policy's `mx` patterns.
    pub fn allows(&self, host: &str) -> bool {
        self.mx.iter().any(|p| mx_matches(p, host))
    }
}

/// The `id` of an `_mta-sts` TXT record (`v=STSv1; id=20160831085700Z;`), or why it is not
/// one.
pub fn parse_record(txt: &str) -> Result<String, String> {
    let mut fields = txt.split(';').map(str::trim).filter(|f| !f.is_empty());
    if fields.next() != Some("v=STSv1") {
        return Err("does not start with v=STSv1".into());
    }
    let mut id = None;
    for field in fields {
        let Some((key, value)) = field.split_once('=') else {
            return Err(format!("field {field:?} is not key=value"));
        };
        if key.trim() == "id" && id.is_none() {
            let value = value.trim();
            if value.is_empty()
                || value.len() > 32
                || !value.bytes().all(|b| b.is_ascii_alphanumeric())
            {
                return Err(format!("id {value:?} is not 1 to 32 letters and digits"));
            }
            id = Some(value.to_string());
        }
    }
    id.ok_or_else(|| "no id".into())
}

/// The policy of the `_mta-sts` records at a name: the one record whose first field is
/// `v=STSv1` (others, `v=STSv10;` too, are ignored); none, several, or an invalid one mean no policy (RFC 8461 §3.1).
pub fn record_id(records: &[String]) -> Result<String, String> {
    let sts: Vec<&String> = records
        .iter()
        .filter(|r| r.split(';').next().map(str::trim) == Some("v=STSv1"))
        .collect();
    match sts[..] {
        [] => Err("no v=STSv1 record".into()),
        [one] => parse_record(one),
        _ => Err(format!("{} v=STSv1 records", sts.len())),
    }
}

/// Parses a policy file (RFC 8461 §3.2): `key: value` lines ending in LF or CRLF; `version:
/// STSv1`, `mode`, `max_age` and (but for `mode: none`) at least one `mx` are required; other
/// keys are ignored; of a repeated key other than `mx`, the first counts.
pub fn parse_policy(text: &str) -> Result<Policy, String> {
    let mut version = None;
    let mut mode = None;
    let mut max_age = None;
    let mut mx = Vec::new();
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            continue;
        }
        let Some((key, value)) = line.split_once(':') else {
            return Err(format!("line {line:?} is not \"key: value\""));
        };
        let value = value.trim();
        match key.trim() {
            "version" if version.is_none() => version = Some(value.to_string()),
            "mode" if mode.is_none() => {
                mode = Some(match value {
                    "enforce" => Mode::Enforce,
                    "testing" => Mode::Testing,
                    "none" => Mode::None,
                    other => return Err(format!("unknown mode {other:?}")),
                })
            }
            "max_age" if max_age.is_none() => {
                let n: u64 = value
                    .parse()
                    .ok()
                    .filter(|_| value.len() <= 10 && value.bytes().all(|b| b.is_ascii_digit()))
                    .ok_or_else(|| format!("max_age {value:?} is not a number of seconds"))?;
                max_age = Some(n.min(MAX_AGE_LIMIT));
            }
            "mx" if mx.len() >= MAX_MX => return Err(format!("more than {MAX_MX} mx")),
            "mx" => mx.push(normalize_pattern(value)?),
            _ => {}
        }
    }
    if version.as_deref() != Some("STSv1") {
        return Err("no \"version: STSv1\"".into());
    }
    let mode = mode.ok_or("no mode")?;
    let max_age = max_age.ok_or("no max_age")?;
    if mx.is_empty() && mode != Mode::None {
        return Err("no mx".into());
    }
    Ok(Policy { mode, mx, max_age })
}

/// An `mx` pattern as compared: lower-case A-labels, no trailing dot.
fn normalize_pattern(value: &str) -> Result<String, String> {
    let (wild, rest) = match value.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, value),
    };
    let ascii = idna::domain_to_ascii(rest.trim_end_matches('.'))
        .map_err(|_| format!("mx {value:?} is not a domain name"))?;
    if ascii.is_empty() || ascii.contains('*') {
        return Err(format!("mx {value:?} is not a domain name"));
    }
    Ok(if wild { format!("*.{ascii}") } else { ascii })
}

/// True when `host` matches `pattern` (RFC 8461 §4.1): the same name, or for `*.example.net`
/// a name with exactly one more label on the left. Compared as lower-case A-labels.
pub fn mx_matches(pattern: &str, host: &str) -> bool {
    let host = host.trim_end_matches('.');
    let host = idna::domain_to_ascii(host).unwrap_or_else(|_| host.to_ascii_lowercase());
    let pattern = pattern.to_ascii_lowercase();
    match pattern.strip_prefix("*.") {
        Some(base) => host
            .split_once('.')
            .is_some_and(|(first, rest)| !first.is_empty() && rest == base),
        None => host == pattern,
    }
}

/// What a lookup found.
#[derive(Debug, Clone)]
pub enum Lookup {
    /// The domain has no policy (no record, or an invalid one).
    None,
    /// The policy that applies.
    Policy(Arc<Policy>),
    /// A record lookup or a fetch failed and nothing is cached: no policy is applied, but
    /// whether the domain has one is not known.
    Unknown(String),
}

impl Lookup {
    /// The policy, if one applies.
    pub fn policy(self) -> Option<Arc<Policy>> {
        match self {
            Lookup::Policy(p) => Some(p),
            _ => None,
        }
    }

    fn cached_or(cached: Option<Cached>, otherwise: Lookup) -> Lookup {
        match cached {
            Some(c) => Lookup::Policy(c.policy),
            None => otherwise,
        }
    }
}

/// A policy as cached, with the record `id` it was fetched for.
#[derive(Debug, Clone)]
pub struct Cached {
    /// The `_mta-sts` record's `id` when it was fetched.
    pub id: String,
    /// The policy.
    pub policy: Arc<Policy>,
    /// When it was fetched.
    pub fetched: Instant,
}

impl Cached {
    fn expires(&self) -> Instant {
        self.fetched + Duration::from_secs(self.policy.max_age)
    }
}

/// The policies fetched, and the fetches that failed lately; shared by every [`MtaSts`] made
/// with it, so that the server keeps it across reloads, and kept in a directory (one file a
/// domain) so that a restart keeps it too (RFC 8461 §5.1). Bounded ([`MAX_CACHED`]).
#[derive(Clone, Default)]
pub struct PolicyCache {
    inner: Arc<Mutex<CacheState>>,
}

#[derive(Default)]
struct CacheState {
    policies: HashMap<String, Cached>,
    /// (domain, id) → when the fetch failed.
    failed: HashMap<(String, String), Instant>,
    /// Where the policies are kept; None: in memory only.
    dir: Option<std::path::PathBuf>,
}

impl CacheState {
    /// Caches a policy: expired ones are dropped first, and when the cache is full the one
    /// expiring first goes; the file follows.
    fn insert(&mut self, domain: &str, cached: Cached) {
        let now = Instant::now();
        let expired: Vec<String> = self
            .policies
            .iter()
            .filter(|(_, c)| c.expires() <= now)
            .map(|(d, _)| d.clone())
            .collect();
        for d in expired {
            self.remove(&d);
        }
        if self.policies.len() >= MAX_CACHED && !self.policies.contains_key(domain) {
            let first = self
                .policies
                .iter()
                .min_by_key(|(_, c)| c.expires())
                .map(|(d, _)| d.clone());
            if let Some(first) = first {
                self.remove(&first);
            }
        }
        self.failed.remove(&(domain.to_string(), cached.id.clone()));
        if let Some(path) = self.file(domain) {
            let tmp = path.with_extension("tmp");
            let text = format!(
                "cache-id: {}\ncache-fetched: {}\n{}",
                cached.id,
                estafeta_queue::unix_now().saturating_sub(cached.fetched.elapsed().as_secs()),
                cached.policy.to_text()
            );
            if let Err(e) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &path)) {
                tracing::warn!(domain, error = %e, "MTA-STS: cannot keep the policy on disk");
            }
        }
        self.policies.insert(domain.to_string(), cached);
    }

    fn remove(&mut self, domain: &str) {
        self.policies.remove(domain);
        if let Some(path) = self.file(domain) {
            let _ = std::fs::remove_file(path);
        }
    }

    /// The file of `domain`'s policy: only for names of letters, digits, hyphens and dots.
    fn file(&self, domain: &str) -> Option<std::path::PathBuf> {
        let dir = self.dir.as_ref()?;
        let safe = !domain.is_empty()
            && !domain.starts_with('.')
            && domain
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        safe.then(|| dir.join(domain))
    }
}

impl std::fmt::Debug for PolicyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyCache")
            .field("domains", &self.len())
            .finish_non_exhaustive()
    }
}

impl PolicyCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, CacheState> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A cache kept in `dir` (created when missing), with the policies found there that have
    /// not expired; files that cannot be read are removed.
    pub fn open(dir: &std::path::Path) -> std::io::Result<PolicyCache> {
        std::fs::create_dir_all(dir)?;
        let mut state = CacheState {
            dir: Some(dir.to_path_buf()),
            ..CacheState::default()
        };
        let now = estafeta_queue::unix_now();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let path = entry.path();
            let Some(domain) = path
                .file_name()
                .and_then(|n| n.to_str())
                .map(str::to_string)
            else {
                continue;
            };
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let field = |key: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
            };
            let loaded = (|| {
                let id = field("cache-id:")?;
                let fetched: u64 = field("cache-fetched:")?.parse().ok()?;
                let policy = parse_policy(&text).ok()?;
                let age = now.checked_sub(fetched)?;
                (age < policy.max_age && state.file(&domain).as_ref() == Some(&path)).then(|| {
                    Cached {
                        id,
                        policy: Arc::new(policy),
                        fetched: Instant::now()
                            .checked_sub(Duration::from_secs(age))
                            .unwrap_or_else(Instant::now),
                    }
                })
            })();
            match loaded {
                Some(cached) => {
                    state.policies.insert(domain, cached);
                }
                None => {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        Ok(PolicyCache {
            inner: Arc::new(Mutex::new(state)),
        })
    }

    /// Domains with a cached policy (expired ones included until they are dropped).
    pub fn len(&self) -> usize {
        self.lock().policies.len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// MTA-STS lookups and their cache; cheap to clone (the cache is shared).
#[derive(Clone)]
pub struct MtaSts {
    inner: Arc<Inner>,
}

struct Inner {
    resolver: Resolver,
    roots: Arc<RootCertStore>,
    https_port: u16,
    timeout: Duration,
    ip_version: IpVersion,
    cache: PolicyCache,
    /// One fetch per domain at a time: the others wait for it and take its result.
    fetching: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    refreshing: Mutex<std::collections::HashSet<String>>,
    tasks: tokio_util::task::TaskTracker,
}

impl std::fmt::Debug for MtaSts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MtaSts")
            .field("https_port", &self.inner.https_port)
            .finish_non_exhaustive()
    }
}

impl MtaSts {
    /// Lookups through `resolver`; policies fetched from port 443 (tests: another), their
    /// certificates verified against `roots`; a fetch bounded by `timeout` in all (and 10 s
    /// per address), the record lookup by 10 s; policies kept in `cache`.
    pub fn new(
        resolver: Resolver,
        roots: Arc<RootCertStore>,
        https_port: u16,
        timeout: Duration,
        ip_version: IpVersion,
        cache: PolicyCache,
    ) -> MtaSts {
        MtaSts {
            inner: Arc::new(Inner {
                resolver,
                roots,
                https_port,
                timeout,
                ip_version,
                cache,
                fetching: Mutex::new(HashMap::new()),
                refreshing: Mutex::new(Default::default()),
                tasks: tokio_util::task::TaskTracker::new(),
            }),
        }
    }

    /// The policy that applies to mail for `domain` now (lower-case A-labels), if any.
    pub async fn policy(&self, domain: &str) -> Option<Arc<Policy>> {
        self.lookup(domain).await.policy()
    }

    /// Like [`MtaSts::policy`], telling "no policy" apart from "could not know".
    pub async fn lookup(&self, domain: &str) -> Lookup {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let record = tokio::time::timeout(
            LOOKUP_TIMEOUT.min(self.inner.timeout),
            self.inner.resolver.txt(&format!("_mta-sts.{domain}.")),
        )
        .await
        .unwrap_or_else(|_| Err("no answer (timeout)".into()));
        let id = match record {
            Ok(records) => match record_id(&records) {
                Ok(id) => id,
                Err(why) => {
                    if !records.is_empty() {
                        tracing::info!(domain, reason = %why, "MTA-STS: ignoring the _mta-sts record");
                    }
                    return Lookup::cached_or(self.cached(&domain), Lookup::None);
                }
            },
            Err(why) => {
                tracing::info!(domain, reason = %why, "MTA-STS: the _mta-sts lookup failed");
                return Lookup::cached_or(
                    self.cached(&domain),
                    Lookup::Unknown(format!("the _mta-sts lookup failed: {why}")),
                );
            }
        };
        if let Some(c) = self.current(&domain, &id) {
            if c.fetched.elapsed() > Duration::from_secs(c.policy.max_age / 2) {
                self.refresh_in_background(&domain, &id);
            }
            return Lookup::Policy(c.policy);
        }
        // One fetch per domain at a time; who waited takes its result.
        let gate = {
            let mut fetching = self
                .inner
                .fetching
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            fetching.entry(domain.clone()).or_default().clone()
        };
        let held = gate.lock().await;
        let result = if let Some(c) = self.current(&domain, &id) {
            Lookup::Policy(c.policy)
        } else if self.failed_lately(&domain, &id) {
            Lookup::cached_or(
                self.cached(&domain),
                Lookup::Unknown("the policy could not be fetched lately".into()),
            )
        } else {
            match self.fetch(&domain).await {
                Ok(policy) => {
                    tracing::info!(
                        domain,
                        id,
                        mode = policy.mode.name(),
                        max_age = policy.max_age,
                        "MTA-STS: policy fetched"
                    );
                    let policy = Arc::new(policy);
                    self.store(&domain, id, policy.clone());
                    Lookup::Policy(policy)
                }
                Err(why) => {
                    tracing::warn!(domain, id, reason = %why, "MTA-STS: cannot fetch the policy; not tried again for this id for 5 minutes");
                    self.inner
                        .cache
                        .lock()
                        .failed
                        .insert((domain.clone(), id), Instant::now());
                    Lookup::cached_or(
                        self.cached(&domain),
                        Lookup::Unknown(format!("the policy cannot be fetched: {why}")),
                    )
                }
            }
        };
        drop(held);
        {
            let mut fetching = self
                .inner
                .fetching
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if fetching
                .get(&domain)
                .is_some_and(|g| Arc::strong_count(g) == 2)
            {
                fetching.remove(&domain);
            }
        }
        result
    }

    /// The cached policy of `domain` when it is for record `id` and has not expired.
    fn current(&self, domain: &str, id: &str) -> Option<Cached> {
        self.cached(domain).filter(|c| c.id == id)
    }

    /// True when fetching the policy of `domain` for `id` failed less than
    /// [`FAILED_FETCH_PAUSE`] ago.
    fn failed_lately(&self, domain: &str, id: &str) -> bool {
        let mut cache = self.inner.cache.lock();
        cache
            .failed
            .retain(|_, at| at.elapsed() < FAILED_FETCH_PAUSE);
        cache
            .failed
            .contains_key(&(domain.to_string(), id.to_string()))
    }

    /// The cached policy of `domain`, unless it has expired.
    pub fn cached(&self, domain: &str) -> Option<Cached> {
        let cache = self.inner.cache.lock();
        cache
            .policies
            .get(domain)
            .filter(|c| c.expires() > Instant::now())
            .cloned()
    }

    fn store(&self, domain: &str, id: String, policy: Arc<Policy>) {
        self.inner.cache.lock().insert(
            domain,
            Cached {
                id,
                policy,
                fetched: Instant::now(),
            },
        );
    }

    fn refresh_in_background(&self, domain: &str, id: &str) {
        {
            let mut busy = self
                .inner
                .refreshing
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if !busy.insert(domain.to_string()) {
                return;
            }
        }
        let this = self.clone();
        let (domain, id) = (domain.to_string(), id.to_string());
        self.inner.tasks.spawn(async move {
            match this.fetch(&domain).await {
                Ok(policy) => {
                    tracing::debug!(domain, "MTA-STS: policy refreshed");
                    this.store(&domain, id, Arc::new(policy));
                }
                Err(why) => {
                    tracing::info!(domain, reason = %why, "MTA-STS: cannot refresh the policy; the cached one stays until it expires")
                }
            }
            this.inner
                .refreshing
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&domain);
        });
    }

    /// Fetches and parses `https://mta-sts.DOMAIN/.well-known/mta-sts.txt`.
    pub async fn fetch(&self, domain: &str) -> Result<Policy, String> {
        tokio::time::timeout(self.inner.timeout, self.fetch_unbounded(domain))
            .await
            .unwrap_or_else(|_| Err("timed out".into()))
    }

    async fn fetch_unbounded(&self, domain: &str) -> Result<Policy, String> {
        let host = format!("mta-sts.{domain}");
        let addrs = self
            .inner
            .resolver
            .host_addresses(&format!("{host}."), self.inner.ip_version)
            .await
            .map_err(|why| format!("{host}: {why}"))?;
        let mut last = format!("{host}: no address");
        for ip in addrs {
            let got = tokio::time::timeout(
                PER_ADDRESS_TIMEOUT,
                self.get(&host, SocketAddr::new(ip, self.inner.https_port)),
            )
            .await
            .unwrap_or_else(|_| Err("timed out".into()));
            match got {
                Ok(text) => return parse_policy(&text).map_err(|why| format!("policy: {why}")),
                Err(why) => last = format!("{host}[{ip}]: {why}"),
            }
        }
        Err(last)
    }

    /// One HTTPS GET of the policy file from `addr`.
    async fn get(&self, host: &str, addr: SocketAddr) -> Result<String, String> {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let config = rustls::ClientConfig::builder_with_provider(crate::client::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(self.inner.roots.clone())
            .with_no_client_auth();
        let name = ServerName::try_from(host.to_string()).map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| e.to_string())?;
        let conn = tokio::spawn(conn);
        let request = hyper::Request::get("/.well-known/mta-sts.txt")
            .header(hyper::header::HOST, host)
            .header(hyper::header::USER_AGENT, "estafeta")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let result = async {
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| e.to_string())?;
            // No redirects (RFC 8461 §3.3): anything but 200 is a failure.
            if response.status() != hyper::StatusCode::OK {
                return Err(format!("HTTP status {}", response.status()));
            }
            let media = response
                .headers()
                .get(hyper::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(|v| {
                    v.split(';')
                        .next()
                        .unwrap_or("")
                        .trim()
                        .to_ascii_lowercase()
                });
            if media.as_deref() != Some("text/plain") {
                return Err(format!("Content-Type {media:?}, not text/plain"));
            }
            let body = Limited::new(response.into_body(), MAX_POLICY_SIZE)
                .collect()
                .await
                .map_err(|e| format!("body: {e}"))?
                .to_bytes();
            String::from_utf8(body.to_vec()).map_err(|_| "the policy is not UTF-8".to_string())
        }
        .await;
        conn.abort();
        result
    }

    /// Waits for the background refreshes (tests).
    pub async fn settle(&self) {
        loop {
            if self
                .inner
                .refreshing
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RFC_EXAMPLE: &str = "version: STSv1\nmode: enforce\nmx: mail.example.com\nmx: *.example.net\nmx: backupmx.example.com\nmax_age: 604800\n";

    #[test]
    fn the_rfc_example_parses() {
        let p = parse_policy(RFC_EXAMPLE).unwrap();
        assert_eq!(p.mode, Mode::Enforce);
        assert_eq!(p.max_age, 604_800);
        assert_eq!(
            p.mx,
            ["mail.example.com", "*.example.net", "backupmx.example.com"]
        );
        let crlf = RFC_EXAMPLE.replace('\n', "\r\n");
        assert_eq!(parse_policy(&crlf).unwrap(), p);
    }

    #[test]
    fn a_policy_without_what_it_needs_is_refused() {
        for (text, why) in [
            ("mode: enforce\nmx: a.example\nmax_age: 1\n", "version"),
            (
                "version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 1\n",
                "version",
            ),
            ("version: STSv1\nmx: a.example\nmax_age: 1\n", "mode"),
            (
                "version: STSv1\nmode: strict\nmx: a.example\nmax_age: 1\n",
                "mode",
            ),
            ("version: STSv1\nmode: enforce\nmx: a.example\n", "max_age"),
            (
                "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: -1\n",
                "max_age",
            ),
            ("version: STSv1\nmode: enforce\nmax_age: 1\n", "mx"),
            ("version: STSv1\nmode enforce\n", "key: value"),
        ] {
            let e = parse_policy(text).unwrap_err();
            assert!(e.contains(why), "{text:?}: {e}");
        }
        // mode none needs no mx; unknown keys are ignored; max_age is capped at a year.
        let p =
            parse_policy("version: STSv1\nmode: none\nmax_age: 9999999999\nfoo: bar\n").unwrap();
        assert_eq!((p.mode, p.max_age), (Mode::None, MAX_AGE_LIMIT));
        let many = "version: STSv1\nmode: enforce\nmax_age: 1\n".to_string()
            + &"mx: a.example\n".repeat(MAX_MX + 1);
        assert!(parse_policy(&many).unwrap_err().contains("more than"));
    }

    #[tokio::test]
    async fn the_cache_survives_a_restart_and_forgets_what_expired() {
        let dir = tempfile::tempdir().unwrap();
        let cache = PolicyCache::open(dir.path()).unwrap();
        let long = Arc::new(parse_policy(RFC_EXAMPLE).unwrap());
        let short = Arc::new(
            parse_policy("version: STSv1\nmode: testing\nmx: a.example\nmax_age: 1\n").unwrap(),
        );
        let now = Instant::now();
        cache.lock().insert(
            "example.com",
            Cached {
                id: "a1".into(),
                policy: long.clone(),
                fetched: now,
            },
        );
        cache.lock().insert(
            "short.example",
            Cached {
                id: "b2".into(),
                policy: short,
                fetched: now,
            },
        );
        // A name that cannot be a file name is cached in memory only.
        cache.lock().insert(
            "../x",
            Cached {
                id: "c3".into(),
                policy: long.clone(),
                fetched: now,
            },
        );
        std::fs::write(dir.path().join("garbage.example"), "not a policy").unwrap();
        assert_eq!(cache.len(), 3);
        std::thread::sleep(Duration::from_millis(1_100));
        let again = PolicyCache::open(dir.path()).unwrap();
        let state = again.lock();
        assert_eq!(
            state.policies.len(),
            1,
            "{:?}",
            state.policies.keys().collect::<Vec<_>>()
        );
        let c = &state.policies["example.com"];
        assert_eq!((c.id.as_str(), &*c.policy), ("a1", &*long));
        // The expired and the unreadable files are gone.
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["example.com"]);
    }

    #[test]
    fn records() {
        assert_eq!(
            parse_record("v=STSv1; id=20160831085700Z;").unwrap(),
            "20160831085700Z"
        );
        assert_eq!(parse_record("v=STSv1;id=abc").unwrap(), "abc");
        assert!(parse_record("v=STSv1; id=has space;").is_err());
        assert!(parse_record("v=STSv1;").is_err());
        assert!(parse_record("id=abc; v=STSv1").is_err());
        assert!(parse_record(&format!("v=STSv1; id={}", "a".repeat(33))).is_err());
        let one = |r: &[&str]| record_id(&r.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(one(&["v=spf1 -all", "v=STSv1; id=x1"]).unwrap(), "x1");
        assert_eq!(
            one(&["v=STSv10; id=x9", "v=STSv1 ; id=x1 ;"]).unwrap(),
            "x1"
        );
        assert!(one(&["v=STSv1; id=x1", "v=STSv1; id=x2"]).is_err());
        assert!(one(&[]).is_err());
    }

    #[test]
    fn mx_patterns_match_one_label_and_u_labels() {
        assert!(mx_matches("mail.example.com", "MAIL.example.com."));
        assert!(!mx_matches("mail.example.com", "mail2.example.com"));
        assert!(mx_matches("*.example.net", "mx1.example.net"));
        assert!(!mx_matches("*.example.net", "example.net"));
        assert!(!mx_matches("*.example.net", "a.b.example.net"));
        assert!(!mx_matches("*.example.net", "mx1.example.network"));
        let p = parse_policy("version: STSv1\nmode: enforce\nmx: *.bücher.example\nmax_age: 60\n")
            .unwrap();
        assert_eq!(p.mx, ["*.xn--bcher-kva.example"]);
        assert!(p.allows("mx.xn--bcher-kva.example"));
        assert!(p.allows("mx.bücher.example"));
        assert!(!p.allows("mx.buecher.example"));
    }
}
