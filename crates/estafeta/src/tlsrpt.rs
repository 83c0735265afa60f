//! TLS-RPT (RFC 8460) reports, with `[relay] tls_reports = true`.
//!
//! The relay hands over the result of each TLS session to a recipient domain's MX host
//! ([`estafeta_relay::tlsrpt::TlsResult`]); [`Store`] appends it as one line to the file of
//! its UTC day in `data_dir/tls-reports/` (`YYYY-MM-DD`). Once a day is over, [`send_due`]
//! makes one report per policy domain (the JSON of RFC 8460 §4.4, gzip-compressed), looks up
//! the domain's `_smtp._tls` record and queues the report as a message (§5.3) to each
//! `mailto:` address of its `rua`; then the day's file is removed. A domain without a record
//! gets nothing; `https:` addresses are not supported (logged).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use estafeta_relay::tlsrpt::{PolicyApplied, TlsReporter, TlsResult};

/// Keeps results, one line each, in the file of their UTC day.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    open: Mutex<Option<(String, File)>>,
}

impl Store {
    /// Results kept in `dir` (created when first needed).
    pub fn new(dir: &Path) -> Store {
        Store {
            dir: dir.to_path_buf(),
            open: Mutex::new(None),
        }
    }
}

/// `YYYY-MM-DD` of a Unix time, UTC.
pub fn day_of(secs: u64) -> String {
    estafeta_proto::trace::utc_timestamp(secs)[..10].to_string()
}

fn clean(text: &str) -> String {
    text.chars()
        .map(|c| if c == '\t' || c.is_control() { ' ' } else { c })
        .collect()
}

/// One result as a line: tab-separated domain, policy type, policy string (lines joined by
/// `|`), mx patterns (`|`), receiving MX host, receiving IP, `ok` or the result type, detail.
pub fn line(r: &TlsResult) -> String {
    let (kind, text, mx) = match &r.policy {
        PolicyApplied::Sts(p) => (
            "sts",
            p.to_text().lines().collect::<Vec<_>>().join("|"),
            p.mx.join("|"),
        ),
        PolicyApplied::Tlsa(records) => ("tlsa", records.join("|"), String::new()),
        PolicyApplied::StsUnknown => ("sts", String::new(), String::new()),
        PolicyApplied::NoPolicyFound => ("no-policy-found", String::new(), String::new()),
    };
    format!(
        "{}\t{kind}\t{}\t{}\t{}\t{}\t{}\t{}\n",
        clean(&r.domain),
        clean(&text),
        clean(&mx),
        clean(&r.mx),
        r.ip.map(|ip| ip.to_string()).unwrap_or_default(),
        r.failure.unwrap_or("ok"),
        clean(r.detail.as_deref().unwrap_or(""))
    )
}

impl TlsReporter for Store {
    fn record(&self, result: TlsResult) {
        let day = day_of(estafeta_queue::unix_now());
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.as_ref().is_none_or(|(d, _)| *d != day) {
            let _ = std::fs::create_dir_all(&self.dir);
            match OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.join(&day))
            {
                Ok(f) => *open = Some((day, f)),
                Err(e) => {
                    tracing::warn!(error = %e, dir = %self.dir.display(), "TLS-RPT: cannot keep a result");
                    return;
                }
            }
        }
        if let Some((_, f)) = open.as_mut()
            && let Err(e) = f.write_all(line(&result).as_bytes())
        {
            tracing::warn!(error = %e, "TLS-RPT: cannot keep a result");
        }
    }
}

/// The reports of one day's lines: policy domain → its RFC 8460 §4.4 JSON.
pub fn reports(
    day: &str,
    text: &str,
    organization: &str,
    contact: &str,
) -> BTreeMap<String, serde_json::Value> {
    // domain → (policy type, string, mx) → (successes, (result, host, ip, detail) → count)
    type Failures = BTreeMap<(String, String, String, String), u64>;
    type Policies = BTreeMap<(String, String, String), (u64, Failures)>;
    let mut by_domain: BTreeMap<String, Policies> = BTreeMap::new();
    for l in text.lines() {
        let f: Vec<&str> = l.split('\t').collect();
        let [domain, kind, policy, mx, host, ip, result, detail] = f[..] else {
            continue;
        };
        let entry = by_domain
            .entry(domain.to_string())
            .or_default()
            .entry((kind.to_string(), policy.to_string(), mx.to_string()))
            .or_default();
        if result == "ok" {
            entry.0 += 1;
        } else {
            *entry
                .1
                .entry((
                    result.to_string(),
                    host.to_string(),
                    ip.to_string(),
                    detail.to_string(),
                ))
                .or_default() += 1;
        }
    }
    let list = |s: &str| -> Vec<String> {
        s.split('|')
            .filter(|x| !x.is_empty())
            .map(str::to_string)
            .collect()
    };
    by_domain
        .into_iter()
        .map(|(domain, policies)| {
            let policies: Vec<serde_json::Value> = policies
                .into_iter()
                .map(|((kind, text, mx), (ok, failures))| {
                    let mut policy = serde_json::json!({
                        "policy-type": kind,
                        "policy-domain": domain,
                    });
                    if kind == "sts" && !text.is_empty() {
                        policy["policy-string"] = list(&text).into();
                        policy["mx-host"] = list(&mx).into();
                    } else if kind == "tlsa" {
                        policy["policy-string"] = list(&text).into();
                    }
                    let failed: u64 = failures.values().sum();
                    let details: Vec<serde_json::Value> = failures
                        .into_iter()
                        .map(|((result, host, ip, detail), n)| {
                            let mut d = serde_json::json!({
                                "result-type": result,
                                "failed-session-count": n,
                            });
                            if !host.is_empty() {
                                d["receiving-mx-hostname"] = host.into();
                            }
                            if !ip.is_empty() {
                                d["receiving-ip"] = ip.into();
                            }
                            if !detail.is_empty() {
                                d["additional-information"] = detail.into();
                            }
                            d
                        })
                        .collect();
                    let mut p = serde_json::json!({
                        "policy": policy,
                        "summary": {
                            "total-successful-session-count": ok,
                            "total-failure-session-count": failed,
                        },
                    });
                    if !details.is_empty() {
                        p["failure-details"] = details.into();
                    }
                    p
                })
                .collect();
            let report = serde_json::json!({
                "organization-name": organization,
                "date-range": {
                    "start-datetime": format!("{day}T00:00:00Z"),
                    "end-datetime": format!("{day}T23:59:59Z"),
                },
                "contact-info": contact,
                "report-id": format!("{day}T00:00:00Z_{domain}@{organization}"),
                "policies": policies,
            });
            (domain, report)
        })
        .collect()
}

/// The `mailto:` addresses of a `_smtp._tls` record (`v=TLSRPTv1; rua=mailto:a@b,https://…`);
/// `https:` ones are not supported and left out.
pub fn rua(records: &[String]) -> Vec<String> {
    let Some(record) = records
        .iter()
        .find(|r| r.split(';').next().map(str::trim) == Some("v=TLSRPTv1"))
    else {
        return Vec::new();
    };
    record
        .split(';')
        .filter_map(|f| f.trim().strip_prefix("rua="))
        .flat_map(|v| v.split(','))
        .filter_map(|u| u.trim().strip_prefix("mailto:"))
        .map(|a| a.split('?').next().unwrap_or(a).to_string())
        .filter(|a| a.contains('@'))
        .collect()
}

/// The report message (RFC 8460 §5.3): `multipart/report; report-type="tlsrpt"`, the JSON
/// gzip-compressed and base64-encoded as `application/tlsrpt+gzip`.
pub fn message(
    hostname: &str,
    from_domain: &str,
    domain: &str,
    to: &str,
    day_start: u64,
    json: &serde_json::Value,
    now: u64,
) -> Vec<u8> {
    use base64::Engine;
    use flate2::write::GzEncoder;
    let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::default());
    let _ = gz.write_all(json.to_string().as_bytes());
    let gz = gz.finish().unwrap_or_default();
    let b64 = base64::engine::general_purpose::STANDARD.encode(gz);
    let mut wrapped = String::new();
    for chunk in b64.as_bytes().chunks(76) {
        wrapped.push_str(&String::from_utf8_lossy(chunk));
        wrapped.push_str("\r\n");
    }
    let report_id = json["report-id"].as_str().unwrap_or_default();
    let boundary = format!("tlsrpt-{now:x}-{day_start:x}");
    let file = format!(
        "{hostname}!{domain}!{day_start}!{}.json.gz",
        day_start + 86_399
    );
    format!(
        "From: TLS reports <postmaster@{from_domain}>\r\n\
         To: <{to}>\r\n\
         Date: {date}\r\n\
         Subject: Report Domain: {domain} Submitter: {hostname} Report-ID: <{report_id}>\r\n\
         Message-ID: <tlsrpt.{day_start}.{domain}@{hostname}>\r\n\
         TLS-Report-Domain: {domain}\r\n\
         TLS-Report-Submitter: {hostname}\r\n\
         TLS-Required: No\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=\"tlsrpt\"; boundary=\"{boundary}\"\r\n\
         \r\n\
         --{boundary}\r\n\
         Content-Type: text/plain; charset=us-ascii\r\n\
         \r\n\
         This is an aggregate TLS report (RFC 8460) from {hostname} for {domain}.\r\n\
         \r\n\
         --{boundary}\r\n\
         Content-Type: application/tlsrpt+gzip\r\n\
         Content-Transfer-Encoding: base64\r\n\
         Content-Disposition: attachment; filename=\"{file}\"\r\n\
         \r\n\
         {wrapped}\
         --{boundary}--\r\n",
        date = estafeta_proto::trace::rfc5322_date(now),
    )
    .into_bytes()
}

/// The domain reports come from: the `[[dkim]]` domain that `hostname` is or belongs to (so
/// that they can be signed, RFC 8460 §3), else `hostname`.
pub fn report_domain(hostname: &str, signer: &estafeta_mailauth::sign::Signer) -> String {
    let host = hostname.trim_end_matches('.').to_ascii_lowercase();
    signer
        .keys()
        .map(|(k, _)| k.domain.to_ascii_lowercase())
        .filter(|d| host == *d || host.ends_with(&format!(".{d}")))
        .max_by_key(|d| d.len())
        .unwrap_or(host)
}

/// Sends the reports of every day before today found in `dir`, then removes the day's file.
/// Each is DKIM-signed when `signer` has a key for the report's domain.
pub async fn send_due(
    dir: &Path,
    hostname: &str,
    signer: &estafeta_mailauth::sign::Signer,
    resolver: &estafeta_relay::resolve::Resolver,
    queue: &estafeta_queue::QueueHandle,
) {
    let from_domain = report_domain(hostname, signer);
    let now = estafeta_queue::unix_now();
    let today = day_of(now);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut days: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|d| d.len() == 10 && d.as_str() < today.as_str())
        .collect();
    days.sort();
    for day in days {
        let path = dir.join(&day);
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let contact = format!("postmaster@{hostname}");
        // The day's first second: the latest midnight whose date is `day`.
        let day_start = (0..36_600)
            .map(|k| now - now % 86_400 - 86_400 * k)
            .find(|t| day_of(*t) == day)
            .unwrap_or(now - now % 86_400);
        // Domains whose report could not be made now (a DNS or queue failure): their lines
        // stay for the next run; the others are done and never sent twice.
        let mut pending: Vec<String> = Vec::new();
        for (domain, json) in reports(&day, &text, hostname, &contact) {
            let records = match resolver.txt(&format!("_smtp._tls.{domain}.")).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::info!(domain, error = %e, "TLS-RPT: cannot look up _smtp._tls; tried again later");
                    pending.push(domain);
                    continue;
                }
            };
            let to = rua(&records);
            if to.is_empty() {
                tracing::debug!(domain, "TLS-RPT: no mailto: rua; no report");
                continue;
            }
            // One message for all the addresses: queued once, or not at all.
            let rcpts: Vec<estafeta_proto::Recipient> = to
                .iter()
                .filter_map(|addr| {
                    estafeta_proto::address::parse_forward_path(&format!("<{addr}>"))
                        .ok()
                        .map(|(path, _)| estafeta_proto::Recipient {
                            path,
                            params: Default::default(),
                        })
                })
                .collect();
            if rcpts.is_empty() {
                tracing::info!(domain, "TLS-RPT: no usable address in rua; no report");
                continue;
            }
            let envelope = estafeta_proto::Envelope {
                client: estafeta_proto::ClientInfo {
                    ip: std::net::IpAddr::from([127, 0, 0, 1]),
                    port: 0,
                    helo: hostname.to_string(),
                    protocol: "TLSRPT".into(),
                    tls: None,
                    auth: None,
                    local_uid: None,
                    name: None,
                },
                from: estafeta_proto::ReversePath::Null,
                params: Default::default(),
                rcpts,
            };
            let mut bytes = message(
                hostname,
                &from_domain,
                &domain,
                &to.join(">, <"),
                day_start,
                &json,
                now,
            );
            match signer.sign(&bytes) {
                Some(Ok(signed)) => {
                    let mut out = signed.fields.into_bytes();
                    out.extend_from_slice(&bytes);
                    bytes = out;
                }
                Some(Err(e)) => {
                    tracing::warn!(domain, error = %e, "TLS-RPT: cannot sign the report")
                }
                None => {}
            }
            match queue.submit(envelope, bytes).await {
                Ok(id) => {
                    tracing::info!(target: "estafeta::maillog", id = %id, domain, to = %to.join(","), day, "TLS-RPT report queued")
                }
                Err(e) => {
                    tracing::warn!(domain, error = %e, "TLS-RPT: cannot queue the report; tried again later");
                    pending.push(domain);
                }
            }
        }
        if pending.is_empty() {
            let _ = std::fs::remove_file(&path);
        } else {
            let keep: String = text
                .lines()
                .filter(|l| {
                    l.split('\t')
                        .next()
                        .is_some_and(|d| pending.iter().any(|p| p == d))
                })
                .map(|l| format!("{l}\n"))
                .collect();
            let tmp = path.with_extension("tmp");
            if std::fs::write(&tmp, keep)
                .and_then(|()| std::fs::rename(&tmp, &path))
                .is_err()
            {
                tracing::warn!(day, "TLS-RPT: cannot keep the pending results");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_day_of_results_makes_one_report_per_domain() {
        let policy = Arc::new(
            estafeta_relay::mtasts::parse_policy(
                "version: STSv1\nmode: enforce\nmx: mx.example.net\nmax_age: 86400\n",
            )
            .unwrap(),
        );
        let ip: std::net::IpAddr = "192.0.2.7".parse().unwrap();
        let r = |domain: &str, sts: bool, failure: Option<&'static str>| TlsResult {
            domain: domain.into(),
            policy: if sts {
                PolicyApplied::Sts(policy.clone())
            } else {
                PolicyApplied::NoPolicyFound
            },
            mx: "mx.example.net".into(),
            ip: Some(ip),
            failure,
            detail: failure.map(|_| "bad\tcert\r\n".into()),
        };
        let text: String = [
            r("example.net", true, None),
            r("example.net", true, None),
            r("example.net", true, Some("certificate-host-mismatch")),
            r("other.example", false, None),
        ]
        .iter()
        .map(line)
        .collect();
        assert_eq!(text.lines().count(), 4);
        let all = reports(
            "2026-12-02",
            &text,
            "mx.local.test",
            "postmaster@mx.local.test",
        );
        assert_eq!(all.len(), 2);
        let net = &all["example.net"];
        assert_eq!(net["date-range"]["start-datetime"], "2026-12-02T00:00:00Z");
        let p = &net["policies"][0];
        assert_eq!(p["policy"]["policy-type"], "sts");
        assert_eq!(p["policy"]["mx-host"][0], "mx.example.net");
        assert_eq!(p["policy"]["policy-string"][1], "mode: enforce");
        assert_eq!(p["summary"]["total-successful-session-count"], 2);
        assert_eq!(p["summary"]["total-failure-session-count"], 1);
        assert_eq!(
            p["failure-details"][0]["result-type"],
            "certificate-host-mismatch"
        );
        assert_eq!(
            p["failure-details"][0]["additional-information"],
            "bad cert  "
        );
        // A policy that could not be fetched: policy-type sts without its text, and a failure
        // that names no host.
        let fetch = TlsResult {
            domain: "fetch.example".into(),
            policy: PolicyApplied::StsUnknown,
            mx: String::new(),
            ip: None,
            failure: Some("sts-policy-fetch-error"),
            detail: Some("HTTP status 404".into()),
        };
        let f = reports(
            "2026-12-02",
            &line(&fetch),
            "mx.local.test",
            "postmaster@mx.local.test",
        );
        let p = &f["fetch.example"]["policies"][0];
        assert_eq!(p["policy"]["policy-type"], "sts");
        assert!(p["policy"].get("policy-string").is_none(), "{p}");
        let d = &p["failure-details"][0];
        assert_eq!(d["result-type"], "sts-policy-fetch-error");
        assert!(
            d.get("receiving-ip").is_none() && d.get("receiving-mx-hostname").is_none(),
            "{d}"
        );
        let other = &all["other.example"]["policies"][0];
        assert_eq!(other["policy"]["policy-type"], "no-policy-found");
        assert!(other["policy"].get("mx-host").is_none());
        assert!(other.get("failure-details").is_none());
    }

    #[test]
    fn reports_come_from_the_signing_domain_of_the_host() {
        let none = estafeta_mailauth::sign::Signer::default();
        assert_eq!(report_domain("MX.Example.org.", &none), "mx.example.org");
    }

    #[test]
    fn rua_addresses() {
        let r = |t: &str| rua(&[t.to_string()]);
        assert_eq!(
            r("v=TLSRPTv1; rua=mailto:a@example.net,https://x.example/r, mailto:b@example.net"),
            ["a@example.net", "b@example.net"]
        );
        assert!(r("v=TLSRPTv1;").is_empty());
        assert!(r("v=spf1 -all").is_empty());
    }

    #[test]
    fn days() {
        assert_eq!(day_of(1_796_262_400), "2026-12-03");
        assert_eq!(day_of(1_796_256_000), "2026-12-03");
        assert_eq!(day_of(1_796_255_999), "2026-12-02");
    }
}
