//! DKIM in process, no network: our signatures verified by mail-auth's verifier with the public
//! keys handed over as if looked up (a TXT cache), both algorithms; RFC 8463's ed25519 example
//! message verified with its published key; a changed message failing.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Instant;

use estafeta_config::{DkimAlgorithm, DkimKeyConfig};
use estafeta_mailauth::keys::{self, LoadedKey};
use estafeta_mailauth::sign::Signer;
use mail_auth::common::parse::TxtRecordParser;
use mail_auth::common::verify::DomainKey;
use mail_auth::{
    AuthenticatedMessage, DkimResult, MessageAuthenticator, Parameters, ResolverCache, Txt,
};

/// Published keys: `selector._domainkey.domain.` → the parsed record.
#[derive(Default)]
struct Published(HashMap<Box<str>, Txt>);

impl Published {
    fn add(&mut self, name: &str, record: &str) {
        let key = DomainKey::parse(record.as_bytes()).expect("a DKIM key record");
        self.0
            .insert(format!("{name}.").into(), Txt::DomainKey(Arc::new(key)));
    }
}

impl ResolverCache<Box<str>, Txt> for Published {
    fn get<Q>(&self, name: &Q) -> Option<Txt>
    where
        Box<str>: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.get(name).cloned()
    }

    fn insert(&self, _key: Box<str>, _value: Txt, _valid_until: Instant) {}

    fn remove<Q>(&self, _name: &Q) -> Option<Txt>
    where
        Box<str>: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        None
    }
}

fn verify(published: &Published, message: &[u8]) -> Vec<DkimResult> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Never asked: every key is in the cache.
    let auth = MessageAuthenticator::new(
        mail_auth::hickory_resolver::config::ResolverConfig::default(),
        Default::default(),
    )
    .unwrap();
    let parsed = AuthenticatedMessage::parse(message).expect("a message");
    rt.block_on(async {
        auth.verify_dkim(Parameters::new(&parsed).with_txt_cache(published))
            .await
            .into_iter()
            .map(|o| o.result().clone())
            .collect()
    })
}

fn key(algorithm: DkimAlgorithm, selector: &str) -> LoadedKey {
    let (pem, _) = keys::generate(algorithm).unwrap();
    let (key, public) = keys::parse(pem.as_bytes(), algorithm).unwrap();
    LoadedKey {
        config: DkimKeyConfig {
            domain: "example.org".into(),
            selector: selector.into(),
            algorithm,
            private_key: "unused".into(),
        },
        key,
        public,
    }
}

const MESSAGE: &str = "From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: round trip\r\nDate: Wed, 2 Dec 2026 12:00:00 +0000\r\nMessage-ID: <1@example.org>\r\n\r\nHello  world \r\n\r\n";

#[test]
fn our_signatures_verify_and_a_change_breaks_them() {
    let ed = key(DkimAlgorithm::Ed25519, "ed");
    let rsa = key(DkimAlgorithm::Rsa, "rsa");
    let mut published = Published::default();
    published.add(
        "ed._domainkey.example.org",
        &keys::txt_record(DkimAlgorithm::Ed25519, &ed.public),
    );
    published.add(
        "rsa._domainkey.example.org",
        &keys::txt_record(DkimAlgorithm::Rsa, &rsa.public),
    );
    let signer = Signer::new(vec![ed, rsa]);
    let signed = signer.sign(MESSAGE.as_bytes()).unwrap().unwrap();
    assert_eq!(signed.selectors, ["example.org/ed", "example.org/rsa"]);
    let message = format!("{}{MESSAGE}", signed.fields);
    assert_eq!(
        verify(&published, message.as_bytes()),
        [DkimResult::Pass, DkimResult::Pass]
    );

    // Whitespace changes pass (relaxed); content changes do not; an added From: does not
    // (over-signed).
    let relaxed = message.replace("Subject: round trip", "Subject:   round  trip");
    assert_eq!(
        verify(&published, relaxed.as_bytes()),
        [DkimResult::Pass, DkimResult::Pass]
    );
    for changed in [
        message.replace("Hello", "Hallo"),
        message.replace("Subject: round trip", "Subject: round trap"),
        message.replace("To: bob", "From: mallory@example.org\r\nTo: bob"),
        message.replace("To: bob", "Cc: carol@example.net\r\nTo: bob"),
    ] {
        let results = verify(&published, changed.as_bytes());
        assert!(
            // A body hash mismatch is neutral, a bad header signature a fail: never a pass.
            results.len() == 2 && results.iter().all(|r| *r != DkimResult::Pass),
            "{results:?} for {changed}"
        );
    }
}

#[test]
fn a_message_signed_in_two_parts_verifies_whole() {
    // A large message is signed as its header section and its body apart (the body mapped
    // from its spill file): the signature is the one over the whole message.
    let ed = key(DkimAlgorithm::Ed25519, "ed");
    let mut published = Published::default();
    published.add(
        "ed._domainkey.example.org",
        &keys::txt_record(DkimAlgorithm::Ed25519, &ed.public),
    );
    let signer = Signer::new(vec![ed]);
    let big_body = "A line of a large body.\r\n".repeat(50_000);
    let fields = MESSAGE.split_once("\r\n\r\n").unwrap().0.to_string() + "\r\n";
    let rest = format!("\r\n{big_body}");
    let signed = signer
        .sign_parts(fields.as_bytes(), rest.as_bytes())
        .unwrap()
        .unwrap();
    let message = format!("{}{fields}{rest}", signed.fields);
    // The same signature as over the message whole (ed25519 is deterministic; same second).
    let whole = signer
        .sign(format!("{fields}{rest}").as_bytes())
        .unwrap()
        .unwrap();
    let bh = |f: &str| {
        f.split("bh=")
            .nth(1)
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(bh(&signed.fields), bh(&whole.fields));
    assert_eq!(verify(&published, message.as_bytes()), [DkimResult::Pass]);
    let changed = message.replace("large body.\r\nA line", "large body.\r\nA lime");
    assert_ne!(verify(&published, changed.as_bytes()), [DkimResult::Pass]);
}

#[test]
fn mail_of_other_domains_is_not_signed() {
    let signer = Signer::new(vec![key(DkimAlgorithm::Ed25519, "ed")]);
    let other = MESSAGE.replace("alice@example.org", "alice@example.com");
    assert!(signer.sign(other.as_bytes()).is_none());
    let sub = MESSAGE.replace("alice@example.org", "alice@lists.example.org");
    assert!(signer.sign(sub.as_bytes()).is_none());
}

/// RFC 8463 Appendix A: the ed25519 example message and key.
#[test]
fn rfc8463_example_verifies() {
    let mut published = Published::default();
    published.add(
        "brisbane._domainkey.football.example.com",
        "v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=",
    );
    let message = "DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed;\r\n d=football.example.com; i=@football.example.com;\r\n q=dns/txt; s=brisbane; t=1528637909; h=from : to :\r\n subject : date : message-id : from : subject : date;\r\n bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;\r\n b=/gCrinpcQOoIfuHNQIbq4pgh9kyIK3AQUdt9OdqQehSwhEIug4D11Bus\r\n Fa3bT3FY5OsU7ZbnKELq+eXdp1Q1Dw==\r\nFrom: Joe SixPack <joe@football.example.com>\r\nTo: Suzie Q <suzie@shopping.example.net>\r\nSubject: Is dinner ready?\r\nDate: Fri, 11 Jul 2003 21:00:37 -0700 (PDT)\r\nMessage-ID: <20030712040037.46341.5F8J@football.example.com>\r\n\r\nHi.\r\n\r\nWe lost the game.  Are you hungry yet?\r\n\r\nJoe.\r\n";
    assert_eq!(verify(&published, message.as_bytes()), [DkimResult::Pass]);
    let changed = message.replace("hungry", "angry");
    assert_ne!(verify(&published, changed.as_bytes()), [DkimResult::Pass]);

    // RFC 8463's private key (the seed) signs too: our signature over its message verifies
    // with the published key.
    let seed = "nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A=";
    use base64::Engine;
    let seed = base64::engine::general_purpose::STANDARD
        .decode(seed)
        .unwrap();
    let public = base64::engine::general_purpose::STANDARD
        .decode("11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=")
        .unwrap();
    let key =
        mail_auth::common::crypto::Ed25519Key::from_seed_and_public_key(&seed, &public).unwrap();
    let signer = Signer::new(vec![LoadedKey {
        config: DkimKeyConfig {
            domain: "football.example.com".into(),
            selector: "brisbane".into(),
            algorithm: DkimAlgorithm::Ed25519,
            private_key: "unused".into(),
        },
        key: mail_auth::common::crypto::DkimKey::Ed25519(key),
        public: "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=".into(),
    }]);
    let body = message
        .split_once("From: Joe")
        .map(|(_, rest)| format!("From: Joe{rest}"))
        .unwrap();
    let signed = signer.sign(body.as_bytes()).unwrap().unwrap();
    assert!(
        signed
            .fields
            .contains("bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8="),
        "{}",
        signed.fields
    );
    let ours = format!("{}{body}", signed.fields);
    assert_eq!(verify(&published, ours.as_bytes()), [DkimResult::Pass]);
}
