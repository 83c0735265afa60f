//! estafeta-policy: pure decisions about recipients.
//!
//! Which domains are local, which local parts exist, where a local recipient's mail goes, and
//! the verdict on each RCPT. No I/O: the same functions serve the listener and (later)
//! `estafeta explain`.

use std::collections::HashMap;

use estafeta_config::{Config, Mailboxes};
use estafeta_proto::reply::{self, Reply};
use estafeta_proto::{Domain, ForwardPath};

/// A local mailbox: the domain and the user whose Maildir receives the mail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalMailbox {
    /// The local domain, lower-case.
    pub domain: String,
    /// The user: the local part lower-cased, sub-address removed.
    pub user: String,
}

impl LocalMailbox {
    /// `user@domain`.
    pub fn address(&self) -> String {
        format!("{}@{}", self.user, self.domain)
    }
}

/// Where a recipient's mail goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Into this local mailbox.
    Local(LocalMailbox),
}

/// The decision on one RCPT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Accept; the mail goes there.
    Accept(Route),
    /// Refuse with this reply.
    Reject(Reply),
}

#[derive(Debug, Clone)]
struct LocalDomain {
    mailboxes: Mailboxes,
    /// `[domain.aliases]`: local part → targets (local parts of this domain or addresses).
    aliases: std::collections::BTreeMap<String, Vec<String>>,
}

/// Answers "is `user@domain` in the users file?" for domains whose mailboxes are its users.
pub type UserDirectory = std::sync::Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// The recipient policy built from the configuration.
#[derive(Clone)]
pub struct Policy {
    domains: HashMap<String, LocalDomain>,
    users: Option<UserDirectory>,
    /// The domain that bare `<Postmaster>` belongs to.
    postmaster_domain: Option<String>,
    subaddress_separator: Option<String>,
}

/// A local part usable as a mailbox name: what the Maildir path may hold.
fn usable_local_part(s: &str) -> bool {
    !s.is_empty() && !s.starts_with('.') && !s.contains(['/', '\0']) && s.len() <= 64
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("domains", &self.domains)
            .field("postmaster_domain", &self.postmaster_domain)
            .finish_non_exhaustive()
    }
}

impl Policy {
    /// The same policy, with the users file as the mailboxes of domains that do not list
    /// theirs (`mailboxes` absent).
    pub fn with_users(mut self, users: UserDirectory) -> Policy {
        self.users = Some(users);
        self
    }

    /// Builds the policy from a validated configuration.
    pub fn new(cfg: &Config) -> Policy {
        let domains: HashMap<String, LocalDomain> = cfg
            .domains
            .iter()
            .map(|d| {
                (
                    d.name.to_lowercase(),
                    LocalDomain {
                        mailboxes: d.mailboxes.clone(),
                        aliases: d.aliases.clone(),
                    },
                )
            })
            .collect();
        let host = cfg.hostname.to_lowercase();
        let postmaster_domain = if domains.contains_key(&host) {
            Some(host)
        } else {
            cfg.domains.first().map(|d| d.name.to_lowercase())
        };
        Policy {
            domains,
            users: None,
            postmaster_domain,
            subaddress_separator: cfg
                .delivery
                .subaddress_separator
                .clone()
                .filter(|s| !s.is_empty()),
        }
    }

    /// True when `domain` (any case) is one this server receives mail for.
    pub fn is_local_domain(&self, domain: &str) -> bool {
        self.domains
            .contains_key(domain.trim_end_matches('.').to_lowercase().as_str())
    }

    /// Resolves a recipient in a local domain to its mailbox, or None when it is not local or
    /// does not exist.
    pub fn resolve_local(&self, rcpt: &ForwardPath) -> Option<LocalMailbox> {
        let domain = if rcpt.bare_postmaster {
            self.postmaster_domain.clone()?
        } else {
            match &rcpt.mailbox.domain {
                Domain::Name(n) => n.to_lowercase(),
                Domain::Literal(_) => return None,
            }
        };
        let local = self.domains.get(&domain)?;
        let mut user = rcpt.mailbox.local.to_lowercase();
        if let Some(sep) = &self.subaddress_separator
            && let Some(i) = user.find(sep.as_str())
            && i > 0
        {
            user.truncate(i);
        }
        if !usable_local_part(&user) {
            return None;
        }
        let exists = match &local.mailboxes {
            Mailboxes::Any => true,
            Mailboxes::List(list) => list.contains(&user) || user == "postmaster",
            // The users of this domain in the users file (and postmaster).
            Mailboxes::Users => {
                user == "postmaster"
                    || self
                        .users
                        .as_ref()
                        .is_some_and(|known| known(&format!("{user}@{domain}")))
            }
        };
        exists.then_some(LocalMailbox { domain, user })
    }

    /// True when the authenticated `user` may use `from` as MAIL FROM: the null sender
    /// (notifications), the user's own address, the user's address with a sub-address
    /// (`alice+lists@…` for `alice@…`), or an alias of a local domain whose targets name the
    /// user (`[domain.aliases] postmaster = "alice"` lets alice@ send as postmaster@).
    pub fn sender_owned(&self, user: &str, from: &estafeta_proto::ReversePath) -> bool {
        let estafeta_proto::ReversePath::Mailbox(m) = from else {
            return true;
        };
        let domain = m.domain.key();
        let mut local = m.local.to_lowercase();
        let user = user.to_lowercase();
        if format!("{local}@{domain}") == user {
            return true;
        }
        if let Some(sep) = &self.subaddress_separator
            && let Some(i) = local.find(sep.as_str())
            && i > 0
        {
            local.truncate(i);
            if format!("{local}@{domain}") == user {
                return true;
            }
        }
        let Some(d) = self.domains.get(&domain) else {
            return false;
        };
        d.aliases.get(&local).is_some_and(|targets| {
            targets.iter().any(|t| {
                let t = t.to_lowercase();
                if t.contains('@') {
                    t == user
                } else {
                    format!("{t}@{domain}") == user
                }
            })
        })
    }

    /// The verdict on one RCPT: a local recipient that exists is accepted; an unknown local
    /// one gets `550 5.1.1`; anything else `554 5.7.1 Relay access denied` (remote delivery
    /// and the relay rules come with their own issues).
    pub fn rcpt_verdict(&self, rcpt: &ForwardPath) -> Verdict {
        let addr = rcpt.to_string();
        let local_domain = rcpt.bare_postmaster
            || matches!(&rcpt.mailbox.domain, Domain::Name(n) if self.is_local_domain(n));
        if local_domain {
            match self.resolve_local(rcpt) {
                Some(mb) => Verdict::Accept(Route::Local(mb)),
                None => Verdict::Reject(reply::user_unknown(&addr)),
            }
        } else {
            Verdict::Reject(reply::relay_denied(&addr))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use estafeta_proto::address::parse_forward_path;

    fn policy() -> Policy {
        let cfg = Config::parse(
            r#"
hostname = "mx.example.org"
[[domain]]
name = "example.org"
mailboxes = ["alice", "bob"]
[domain.aliases]
postmaster = "alice"
team = ["alice", "bob", "carol@elsewhere.example"]
[[domain]]
name = "Example.Test"
mailboxes = "*"
"#,
            std::path::Path::new("t.toml"),
        )
        .unwrap();
        Policy::new(&cfg)
    }

    fn verdict(p: &Policy, addr: &str) -> String {
        let (fp, _) = parse_forward_path(addr).unwrap();
        match p.rcpt_verdict(&fp) {
            Verdict::Accept(Route::Local(mb)) => format!("local {}", mb.address()),
            Verdict::Reject(r) => r.to_string(),
        }
    }

    #[test]
    fn mailboxes_from_the_users_file() {
        let cfg = Config::parse(
            "[[domain]]\nname = \"example.net\"\n",
            std::path::Path::new("t.toml"),
        )
        .unwrap();
        let p =
            Policy::new(&cfg).with_users(std::sync::Arc::new(|a: &str| a == "carol@example.net"));
        assert_eq!(
            verdict(&p, "<Carol+x@example.net>"),
            "local carol@example.net"
        );
        assert_eq!(
            verdict(&p, "<postmaster@example.net>"),
            "local postmaster@example.net"
        );
        assert!(verdict(&p, "<dave@example.net>").starts_with("550 5.1.1"));
    }

    #[test]
    fn sender_ownership() {
        use estafeta_proto::address::parse_reverse_path;
        let p = policy();
        let owned =
            |user: &str, from: &str| p.sender_owned(user, &parse_reverse_path(from).unwrap().0);
        assert!(owned("alice@example.org", "<alice@example.org>"));
        assert!(owned("alice@example.org", "<ALICE@Example.ORG>"));
        assert!(owned("alice@example.org", "<alice+lists@example.org>"));
        assert!(owned("alice@example.org", "<>"));
        assert!(!owned("alice@example.org", "<bob@example.org>"));
        assert!(!owned("alice@example.org", "<alice@example.net>"));
        assert!(!owned("alice@example.org", "<alicex@example.org>"));
        // postmaster = "alice", team = ["alice", "bob", "carol@elsewhere.example"]
        assert!(owned("alice@example.org", "<postmaster@example.org>"));
        assert!(owned("bob@example.org", "<team@example.org>"));
        assert!(owned("carol@elsewhere.example", "<team@example.org>"));
        assert!(!owned("bob@example.org", "<postmaster@example.org>"));
    }

    #[test]
    fn table() {
        let p = policy();
        let cases = [
            ("<alice@example.org>", "local alice@example.org"),
            ("<ALICE@EXAMPLE.ORG>", "local alice@example.org"),
            ("<bob+lists@example.org>", "local bob@example.org"),
            (
                "<carol@example.org>",
                "550 5.1.1 <carol@example.org>: Recipient address rejected: User unknown",
            ),
            ("<postmaster@example.org>", "local postmaster@example.org"),
            ("<Postmaster>", "local postmaster@example.org"),
            ("<anyone@example.test>", "local anyone@example.test"),
            (
                "<\"../etc\"@example.test>",
                "550 5.1.1 <\"../etc\"@example.test>: Recipient address rejected: User unknown",
            ),
            (
                "<\"a/b\"@example.test>",
                "550 5.1.1 <a/b@example.test>: Recipient address rejected: User unknown",
            ),
            (
                "<x@elsewhere.example>",
                "554 5.7.1 <x@elsewhere.example>: Relay access denied",
            ),
            (
                "<x@[192.0.2.1]>",
                "554 5.7.1 <x@[192.0.2.1]>: Relay access denied",
            ),
            ("<+x@example.test>", "local +x@example.test"),
        ];
        for (addr, want) in cases {
            assert_eq!(verdict(&p, addr), want, "{addr}");
        }
    }
}
