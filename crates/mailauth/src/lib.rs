//! Email authentication for estafeta: DKIM signing of our users' mail, the inbound checks
//! (SPF, DKIM, DMARC, ARC → one `Authentication-Results:` field, and the verdict), the
//! client's forward-confirmed reverse DNS name, the Sender Rewriting Scheme for forwarded mail,
//! and the DNS records a domain must publish.
//!
//! SPF, DKIM, DMARC and ARC are the mail-auth crate's; this crate decides what is checked,
//! when, and what a result means for the SMTP reply. It returns values (a header to add, a
//! reply to give); it never calls back into the listener.

pub mod headers;
pub mod keys;
pub mod records;
pub mod sign;
pub mod srs;
pub mod verify;

use estafeta_config::Config;

/// Everything the sessions need for email authentication, built from one configuration.
pub struct MailAuth {
    /// The inbound checks and the reverse DNS lookups; `None` when no resolver could be set
    /// up (no `/etc/resolv.conf` and no `[dns] nameservers`).
    pub checker: Option<verify::Checker>,
    /// The DKIM keys.
    pub signer: sign::Signer,
    /// Sender rewriting, when `[srs]` is configured.
    pub srs: Option<srs::Srs>,
    /// Our hostname: the authserv-id of our `Authentication-Results:`.
    pub hostname: String,
    /// DNS blocklists checked at connect (`[antispam] dnsbl`) and the score that refuses.
    pub dnsbl: Vec<estafeta_config::DnsblZone>,
    pub dnsbl_threshold: i32,
}

impl std::fmt::Debug for MailAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MailAuth")
            .field("verify", &self.checker.as_ref().map(|c| c.mode()))
            .field("dkim_keys", &self.signer.keys().count())
            .field("srs", &self.srs.is_some())
            .finish()
    }
}

impl MailAuth {
    /// Loads the DKIM keys (refusing a key file others may read), reads or creates the SRS
    /// secret, and sets up the resolver. Errors name the file and what to do.
    pub fn build(cfg: &Config) -> Result<MailAuth, String> {
        let mut keys = Vec::new();
        for k in &cfg.dkim {
            keys.push(keys::load(k).map_err(|e| e.to_string())?);
        }
        let srs = match &cfg.srs {
            None => None,
            Some(s) => {
                let secrets = srs::load_or_create_secrets(&s.secret_file).map_err(|e| {
                    format!(
                        "SRS secret file {}: {e}; check that the server's user may read it (and create it, the first time)",
                        s.secret_file.display()
                    )
                })?;
                Some(srs::Srs::new(&s.domain, secrets))
            }
        };
        let checker = match verify::Checker::new(&cfg.hostname, &cfg.dns, cfg.verify) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(error = %e, "no DNS resolver: inbound SPF/DKIM/DMARC/ARC checks and reverse DNS names are off; set [dns] nameservers");
                None
            }
        };
        Ok(MailAuth {
            checker,
            signer: sign::Signer::new(keys),
            srs,
            hostname: cfg.hostname.clone(),
            dnsbl: cfg.antispam.dnsbl.clone(),
            dnsbl_threshold: cfg.antispam.dnsbl_threshold,
        })
    }

    /// Nothing configured and no resolver: for tests of other things.
    pub fn none(hostname: &str) -> MailAuth {
        MailAuth {
            checker: None,
            signer: sign::Signer::default(),
            srs: None,
            hostname: hostname.to_string(),
            dnsbl: Vec::new(),
            dnsbl_threshold: 1,
        }
    }
}
