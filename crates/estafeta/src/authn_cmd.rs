//! The commands of email authentication: `estafeta dkim generate`, `estafeta dns-records`
//! and the inbound checks of `estafeta explain --message`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use estafeta_config::{Config, DkimAlgorithm};
use estafeta_mailauth::records::{self, Status};
use estafeta_mailauth::verify::Checker;
use estafeta_mailauth::{keys, sign::Signer};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime builds")
}

/// The default selector: `s` and the year and month, e.g. `s202612`; a new key next month gets
/// a new selector, which is what a rotation needs.
fn default_selector() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let date = estafeta_proto::trace::rfc5322_date(now);
    // "Wed, 2 Dec 2026 13:52:37 +0000"
    let parts: Vec<&str> = date.split_whitespace().collect();
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| Some(m) == parts.get(2))
    .map_or(1, |i| i + 1);
    format!("s{}{month:02}", parts.get(3).unwrap_or(&"2026"))
}

/// `estafeta dkim generate DOMAIN [--selector S] [--algorithm ed25519|rsa] [--output FILE]`:
/// writes a new private key (mode 0600; owned by the configured `user` when run as root) and
/// prints the TXT record to publish and the `[[dkim]]` to add.
pub fn dkim_generate(
    cfg: &Config,
    domain: &str,
    selector: Option<String>,
    algorithm: DkimAlgorithm,
    output: Option<PathBuf>,
) -> ExitCode {
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    let selector = selector.unwrap_or_else(default_selector);
    // Where: --output, else the file a [[dkim]] of this domain and selector names, else
    // data_dir/dkim/DOMAIN.SELECTOR.key.
    let configured = cfg
        .dkim
        .iter()
        .find(|k| k.domain == domain && k.selector == selector);
    let path = output
        .or_else(|| configured.map(|k| k.private_key.clone()))
        .unwrap_or_else(|| {
            cfg.data_dir
                .join("dkim")
                .join(format!("{domain}.{selector}.key"))
        });
    if let Some(k) = configured
        && k.algorithm != algorithm
    {
        eprintln!(
            "error: the configuration has selector {selector} of {domain} as {}, not {}: use --algorithm {} or another --selector",
            k.algorithm.name(),
            algorithm.name(),
            k.algorithm.name()
        );
        return ExitCode::FAILURE;
    }
    if path.exists() {
        eprintln!(
            "error: {} exists: a key is never overwritten (a published selector keeps its key); choose a new --selector to rotate",
            path.display()
        );
        return ExitCode::FAILURE;
    }
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
        && let Err(e) = create_dir_700(parent)
    {
        eprintln!("error: cannot create {}: {e}", parent.display());
        return ExitCode::FAILURE;
    }
    let (pem, public) = match keys::generate(algorithm) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("error: cannot generate the key: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = keys::write_new(&path, &pem) {
        eprintln!("error: cannot write {}: {e}", path.display());
        return ExitCode::FAILURE;
    }
    // Run as root for a server that drops to `user`: the key is the user's (its only reader).
    if crate::privileges::euid() == 0
        && let Some(user) = &cfg.user
    {
        match crate::privileges::lookup(user, cfg.group.as_deref()) {
            Ok(account) => {
                if let Err(e) = crate::privileges::give_file(&path, &account) {
                    eprintln!("warning: {e}");
                }
            }
            Err(e) => eprintln!("warning: the key stays root's: {e}"),
        }
    }
    let record = keys::txt_record(algorithm, &public);
    println!(
        "Wrote the {} key of {domain}, selector {selector}, to {} (mode 0600).",
        algorithm.name(),
        path.display()
    );
    println!();
    println!("Publish this TXT record:");
    println!();
    println!(
        "{selector}._domainkey.{domain}. 3600 IN TXT {}",
        records::quote_txt(&record)
    );
    println!();
    if configured.is_none() {
        println!("and add to the configuration:");
        println!();
        println!("[[dkim]]");
        println!("domain = \"{domain}\"");
        println!("selector = \"{selector}\"");
        println!("algorithm = \"{}\"", algorithm.name());
        println!("private_key = \"{}\"", path.display());
        println!();
    }
    println!(
        "Then `estafeta dns-records {domain} --check` says when the record is visible, and `estafeta reload` puts the key in service."
    );
    ExitCode::SUCCESS
}

fn create_dir_700(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// This host's public addresses: the specific addresses of the listeners, else those of its
/// interfaces, leaving out loopback, link-local and private ranges.
fn public_addresses(cfg: &Config) -> Vec<IpAddr> {
    fn add(out: &mut Vec<IpAddr>, ip: IpAddr) {
        let ip = ip.to_canonical();
        if is_public(ip) && !out.contains(&ip) {
            out.push(ip);
        }
    }
    let mut out: Vec<IpAddr> = Vec::new();
    for l in &cfg.listeners {
        for a in &l.addresses {
            add(&mut out, a.ip());
        }
    }
    if out.is_empty() {
        for ip in interface_addresses() {
            add(&mut out, ip);
        }
    }
    out
}

fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            !(v4.is_unspecified()
                || v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_documentation()
                || v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64)
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            !(v6.is_unspecified()
                || v6.is_loopback()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || first == 0x2001 && v6.segments()[1] == 0xdb8)
        }
    }
}

fn interface_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we free with freeifaddrs; every pointer is checked.
    unsafe {
        if libc::getifaddrs(&mut ifap) != 0 {
            return out;
        }
        let mut p = ifap;
        while !p.is_null() {
            let addr = (*p).ifa_addr;
            if !addr.is_null() {
                match i32::from((*addr).sa_family) {
                    libc::AF_INET => {
                        let sin = addr as *const libc::sockaddr_in;
                        let octets = (*sin).sin_addr.s_addr.to_ne_bytes();
                        out.push(IpAddr::from(octets));
                    }
                    libc::AF_INET6 => {
                        let sin6 = addr as *const libc::sockaddr_in6;
                        out.push(IpAddr::from((*sin6).sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            p = (*p).ifa_next;
        }
        libc::freeifaddrs(ifap);
    }
    out
}

/// Fetches `domain`'s MTA-STS policy as a sending server would (`[dns] nameservers`,
/// `[relay] ca_file`) and says whether it names this host as an MX.
async fn fetch_own_policy(cfg: &estafeta_config::Config, domain: &str) -> Result<String, String> {
    use estafeta_relay::resolve::Resolver;
    let resolver = if cfg.dns.nameservers.is_empty() {
        Resolver::system().map_err(|e| e.to_string())?
    } else {
        Resolver::with_nameservers(&cfg.dns.nameservers)
    };
    let roots = match &cfg.relay.ca_file {
        Some(path) => estafeta_relay::client::load_roots(path)?,
        None => estafeta_relay::client::system_roots()?,
    };
    let sts = estafeta_relay::mtasts::MtaSts::new(
        resolver,
        roots,
        443,
        std::time::Duration::from_secs(30),
        cfg.relay.ip_version,
        Default::default(),
    );
    let url = format!("https://mta-sts.{domain}/.well-known/mta-sts.txt");
    let policy = sts
        .fetch(domain)
        .await
        .map_err(|e| format!("the policy at {url} cannot be had: {e}"))?;
    if policy.allows(&cfg.hostname) {
        Ok(format!(
            "{url}: mode {}, mx {}, max_age {}",
            policy.mode.name(),
            policy.mx.join(" "),
            policy.max_age
        ))
    } else {
        Err(format!(
            "{url} does not list this host ({}) among its mx ({}): senders that enforce it will not deliver here",
            cfg.hostname,
            policy.mx.join(" ")
        ))
    }
}

/// `estafeta dns-records [DOMAIN] [--check] [--address IP…]`: every record each local domain
/// (or DOMAIN) needs, as zone-file lines; with `--check`, each looked up through the resolver
/// (`[dns] nameservers`) and reported ok / MISSING / WRONG. Exit 1 when one is missing or
/// wrong.
pub fn dns_records(
    cfg: &Config,
    domain: Option<String>,
    check: bool,
    addresses: Vec<IpAddr>,
) -> ExitCode {
    // Every local domain, the domains that only sign, and the SRS domain; or the one named.
    let domains: Vec<String> = match domain {
        Some(d) => vec![d.trim_end_matches('.').to_ascii_lowercase()],
        None => {
            let mut all: Vec<String> = Vec::new();
            let names = cfg
                .domains
                .iter()
                .map(|d| d.name.clone())
                .chain(cfg.dkim.iter().map(|k| k.domain.clone()))
                .chain(cfg.srs.iter().map(|s| s.domain.clone()));
            for d in names {
                if !all.contains(&d) {
                    all.push(d);
                }
            }
            all
        }
    };
    if domains.is_empty() {
        eprintln!(
            "error: no domain: the configuration has no [[domain]] and no [[dkim]]; name one: estafeta dns-records example.org"
        );
        return ExitCode::FAILURE;
    }
    let mut keys = Vec::new();
    for k in &cfg.dkim {
        match keys::load(k) {
            Ok(l) => keys.push(l),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let signer = Signer::new(keys);
    let addresses = if addresses.is_empty() {
        public_addresses(cfg)
    } else {
        addresses
    };
    let checker = if check {
        match Checker::new(&cfg.hostname, &cfg.dns, cfg.verify) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("error: no DNS resolver: {e}; set [dns] nameservers");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let rt = check.then(runtime);
    let mut bad = 0;
    let mut printed_ptr = false;
    for domain in &domains {
        let dkim: Vec<(String, DkimAlgorithm, String)> = signer
            .keys()
            .filter(|(c, _)| c.domain == *domain)
            .map(|(c, p)| (c.selector.clone(), c.algorithm, p.to_string()))
            .collect();
        println!("; {domain}");
        for r in records::needed(cfg, domain, &dkim, &addresses) {
            // The host's A/AAAA and PTR are the same for every domain: once.
            if matches!(r.kind, records::Kind::Address | records::Kind::Ptr) && printed_ptr {
                continue;
            }
            println!("; {}", r.note);
            println!("{}", r.zone_line());
            if let (Some(checker), Some(rt)) = (&checker, &rt) {
                let status = rt.block_on(records::check(checker.authenticator(), cfg, domain, &r));
                let line = match &status {
                    Status::Ok(s) => format!("  ok: {s}"),
                    Status::Missing(s) if r.optional => format!("  not published (optional): {s}"),
                    Status::Missing(s) => format!("  MISSING: {s}"),
                    Status::Wrong(s) => format!("  WRONG: {s}"),
                    Status::Unknown(s) => format!("  UNKNOWN (DNS error): {s}"),
                };
                let missing_optional = r.optional && matches!(status, Status::Missing(_));
                if !matches!(status, Status::Ok(_)) && !missing_optional {
                    bad += 1;
                }
                println!("{line}");
                // A published MTA-STS record: the policy it announces must be served and
                // must let this host receive the domain's mail.
                if r.kind == records::Kind::MtaSts && matches!(status, Status::Ok(_)) {
                    match rt.block_on(fetch_own_policy(cfg, domain)) {
                        Ok(line) => println!("  ok: {line}"),
                        Err(line) => {
                            bad += 1;
                            println!("  WRONG: {line}");
                        }
                    }
                }
            }
        }
        printed_ptr = true;
        println!(
            "; the MTA-STS policy file, to serve as https://mta-sts.{domain}/.well-known/mta-sts.txt"
        );
        println!(
            "; (Content-Type: text/plain, a certificate valid for mta-sts.{domain}); mode testing first, enforce once the reports are clean:"
        );
        for line in records::mta_sts_policy(cfg).lines() {
            println!(";   {line}");
        }
        println!();
    }
    if check {
        if bad == 0 {
            println!("all records are published");
        } else {
            println!("{bad} record(s) missing or wrong");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

/// `estafeta explain --message FILE`: the inbound checks of a message from `client` (SPF of
/// `helo` and `from`, DKIM, DMARC, ARC), the `Authentication-Results:` field they give and
/// the decision, as the smtp listener would take them for mail from outside. Only DNS
/// lookups; nothing is sent.
pub fn explain_message(
    cfg: &Config,
    client: IpAddr,
    helo: Option<&str>,
    from: &str,
    message: &Path,
) -> bool {
    let mut body = match std::fs::read(message) {
        Ok(b) => b,
        Err(e) => {
            println!("cannot read {}: {e}", message.display());
            return false;
        }
    };
    let checker = match Checker::new(&cfg.hostname, &cfg.dns, cfg.verify) {
        Ok(c) => c,
        Err(e) => {
            println!("no DNS resolver: {e}; set [dns] nameservers");
            return false;
        }
    };
    let mode = cfg.verify;
    println!(
        "inbound checks ([verify]: spf={:?} dkim={:?} dmarc={:?} arc={:?}), for mail from outside on smtp listeners:",
        mode.spf, mode.dkim, mode.dmarc, mode.arc
    );
    let from = from.trim_start_matches('<').trim_end_matches('>');
    let ip_literal = format!("[{client}]");
    let helo = helo.unwrap_or(&ip_literal);
    let rt = runtime();
    let name = rt.block_on(checker.client_name(client));
    println!(
        "  client {client}: reverse DNS {}",
        name.as_deref().unwrap_or("none (not forward-confirmed)")
    );
    let spf = rt.block_on(checker.spf(client, helo, from));
    println!(
        "  SPF: HELO {helo} → {}, MAIL FROM {} → {}",
        estafeta_mailauth::verify::spf_name(spf.helo.result()),
        if from.is_empty() { "<>" } else { from },
        estafeta_mailauth::verify::spf_name(spf.mail_from.result())
    );
    let rcpt_verdict = checker.spf_verdict(&spf, client);
    if let Err(r) = &rcpt_verdict {
        println!("  at RCPT → {r}");
        return false;
    }
    let inbound = rt.block_on(checker.check_message(
        client,
        helo,
        from,
        name.as_deref(),
        Some(spf),
        &mut body,
    ));
    println!("  results: {}", inbound.summary);
    if let Some(p) = inbound.dmarc_policy {
        println!("  DMARC failed; the domain's policy: {p}");
    }
    println!("  header added:");
    for line in inbound.header.trim_end().lines() {
        println!("    {line}");
    }
    match inbound.verdict {
        Ok(()) => {
            println!("  end of DATA → accepted");
            true
        }
        Err(r) => {
            println!("  end of DATA → {r}");
            false
        }
    }
}
