//! Start-up checks of a secured connection, so a bad certificate, key or password
//! stops a command at once with an error that says which, instead of librdkafka
//! retrying a failing handshake until `startup_timeout`.
//!
//! - [`check_files`] reads the CA, certificate and key files before any client
//!   exists: missing, unreadable, not PEM, expired, a key that does not open with its
//!   password or does not belong to the certificate.
//! - [`connect`] is every Kafka-facing command's first start-up step: a metadata round
//!   trip whose client records what librdkafka reports. A refused SASL login or a
//!   failed TLS handshake is fatal; for TLS, [`diagnose_tls`] then repeats the
//!   handshake with OpenSSL itself to name the cause (librdkafka only says "certificate
//!   verify failed"). An absent or starting broker is retried as before.
//!
//! No message here contains a secret: passwords are only ever handed to OpenSSL and
//! librdkafka.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use openssl::ssl::{HandshakeError, SslConnector, SslMethod, SslVerifyMode};
use openssl::x509::{X509VerifyResult, X509};
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

use super::clients;
use super::startup::{self, Retriable};
use crate::config::{Config, KafkaSecurity};

/// Why a secured connection cannot work.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    /// A certificate, key or CA file is unusable.
    #[error("{setting} {path}: {why}")]
    File { setting: &'static str, path: String, why: String },
    /// The broker refused the SASL login.
    #[error("SASL authentication as {user:?} ({mechanism}) failed at {broker}: {detail}; check kafka_security.sasl_username, sasl_password and sasl_mechanism (the broker must hold credentials for that mechanism)")]
    Sasl { user: String, mechanism: String, broker: String, detail: String },
    /// The TLS handshake with a broker failed.
    #[error("TLS handshake with {broker} failed: {why}")]
    Tls { broker: String, why: String },
    /// librdkafka refused the client configuration.
    #[error("cannot create a Kafka client: {0}")]
    Client(String),
    /// The broker could not be asked yet (retried until `startup_timeout`).
    #[error("{0}")]
    NotReady(String),
}

impl Retriable for SecurityError {
    fn is_retriable(&self) -> bool {
        matches!(self, Self::NotReady(_))
    }
}

/// Who pulses is to the broker's authorizer, as far as its settings tell: the SASL
/// user, else the client certificate's subject (the broker's
/// `ssl.principal.mapping.rules` make the name of it), else `User:ANONYMOUS`.
pub fn principal(cfg: &Config) -> String {
    let s = &cfg.kafka_security;
    if let (true, Some(user)) = (s.protocol.uses_sasl(), &s.sasl_username) {
        return format!("User:{user}");
    }
    if let (true, Some(cert)) = (s.protocol.uses_tls(), &s.ssl_certificate_location) {
        if let Some(c) = std::fs::read(cert).ok().and_then(|pem| X509::from_pem(&pem).ok()) {
            return format!("the principal of the client certificate {}", distinguished_name(c.subject_name()));
        }
    }
    "User:ANONYMOUS".into()
}

/// An operation the broker's authorizer refused, said so that an operator can grant
/// it: who, which operation, on what. Never retried: no wait grants an ACL.
#[derive(Debug, Clone, thiserror::Error)]
#[error("not authorized: {principal} may not {operation} {resource} (the broker refused it: {detail}); `pulses acls` prints the ACLs each command needs")]
pub struct Denied {
    pub principal: String,
    pub operation: String,
    pub resource: String,
    pub detail: String,
}

impl Denied {
    pub fn new(cfg: &Config, operation: &str, resource: impl Into<String>, detail: impl Into<String>) -> Self {
        Self { principal: principal(cfg), operation: operation.to_owned(), resource: resource.into(), detail: detail.into() }
    }

    /// A refused topic operation, read from what librdkafka or pulses said about it
    /// (`text`): a delivery is a Write, a subscription a Read, a creation a Create, a
    /// metadata request a Describe; `fallback` (operation, resource) when it names none.
    pub fn of_topic(cfg: &Config, text: &str, fallback: (&str, &str)) -> Self {
        let named = |marker: &str, ends: &[char]| {
            let rest = &text[text.find(marker)? + marker.len()..];
            let topic: String = rest.chars().take_while(|c| !ends.contains(c)).collect();
            (!topic.is_empty()).then_some(topic)
        };
        let (operation, topic) = if let Some(t) = named("delivery to ", &[' ']) {
            ("Write", t)
        } else if let Some(t) = named("Subscribed topic not available: ", &[':', ' ']) {
            ("Read", t)
        } else if let Some(t) = named("creating topic ", &[':', ' ']) {
            ("Create", t)
        } else {
            (fallback.0, fallback.1.to_owned())
        };
        Self::new(cfg, operation, format!("topic {topic}"), text)
    }
}

/// Checks the TLS files of `[kafka_security]` and `[schema_registry]` (see the module
/// documentation). Touches no network.
pub fn check_files(cfg: &Config) -> Result<(), SecurityError> {
    let s = &cfg.kafka_security;
    if s.protocol.uses_tls() {
        if let Some(ca) = &s.ssl_ca_location {
            read_certificates("kafka_security.ssl_ca_location", ca)?;
        }
        if let (Some(cert), Some(key)) = (&s.ssl_certificate_location, &s.ssl_key_location) {
            check_client_pair(s, cert, key)?;
        }
    }
    if let Some(ca) = &cfg.schema_registry.ssl_ca_location {
        read_certificates("schema_registry.ssl_ca_location", ca)?;
    }
    Ok(())
}

fn file_error(setting: &'static str, path: &Path, why: impl Into<String>) -> SecurityError {
    SecurityError::File { setting, path: path.display().to_string(), why: why.into() }
}

fn read(setting: &'static str, path: &Path) -> Result<Vec<u8>, SecurityError> {
    std::fs::read(path).map_err(|e| file_error(setting, path, format!("cannot read it: {e}")))
}

fn read_certificates(setting: &'static str, path: &Path) -> Result<Vec<X509>, SecurityError> {
    let pem = read(setting, path)?;
    match X509::stack_from_pem(&pem) {
        Ok(certs) if !certs.is_empty() => Ok(certs),
        _ => Err(file_error(setting, path, "holds no PEM certificate")),
    }
}

/// The client certificate is current and the key opens and belongs to it.
fn check_client_pair(s: &KafkaSecurity, cert_path: &Path, key_path: &Path) -> Result<(), SecurityError> {
    const CERT: &str = "kafka_security.ssl_certificate_location";
    let cert = read_certificates(CERT, cert_path)?.swap_remove(0);
    let now = openssl::asn1::Asn1Time::days_from_now(0).map_err(|e| file_error(CERT, cert_path, e.to_string()))?;
    if cert.not_after() < now {
        return Err(file_error(CERT, cert_path, format!("the client certificate expired on {}", cert.not_after())));
    }
    if cert.not_before() > now {
        return Err(file_error(CERT, cert_path, format!("the client certificate is not valid before {}", cert.not_before())));
    }
    let key = private_key(s, key_path)?;
    let public = cert.public_key().map_err(|e| file_error(CERT, cert_path, e.to_string()))?;
    if !public.public_eq(&key) {
        return Err(file_error(KEY, key_path, format!("the private key does not belong to the certificate {}", cert_path.display())));
    }
    Ok(())
}

const KEY: &str = "kafka_security.ssl_key_location";

/// The client's private key at `path`, opened with `ssl_key_password` if there is one.
fn private_key(s: &KafkaSecurity, path: &Path) -> Result<openssl::pkey::PKey<openssl::pkey::Private>, SecurityError> {
    let pem = read(KEY, path)?;
    match &s.ssl_key_password {
        Some(pw) => openssl::pkey::PKey::private_key_from_pem_passphrase(&pem, pw.expose().as_bytes())
            .map_err(|_| file_error(KEY, path, "the private key does not open with ssl_key_password (wrong password, or not a PEM key)")),
        None => openssl::pkey::PKey::private_key_from_pem(&pem).map_err(|_| {
            file_error(KEY, path, "not a readable PEM private key (if it is encrypted, set kafka_security.ssl_key_password)")
        }),
    }
}

/// What librdkafka reported about security while [`connect`] waited.
#[derive(Default)]
struct Reported {
    first: Mutex<Option<(RDKafkaErrorCode, String)>>,
}

impl ClientContext for Reported {
    fn error(&self, error: KafkaError, reason: &str) {
        let code = match error.rdkafka_error_code() {
            Some(code @ (RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed | RDKafkaErrorCode::SSL)) => code,
            // A broker that refuses our certificate ends the connection with a TLS
            // alert, which librdkafka reports as a transport failure.
            Some(RDKafkaErrorCode::BrokerTransportFailure) if is_tls_failure(reason) => RDKafkaErrorCode::SSL,
            _ => {
                tracing::debug!("kafka client: {error}: {reason}");
                return;
            }
        };
        if let Ok(mut first) = self.first.lock() {
            first.get_or_insert((code, reason.to_owned()));
        }
    }
}

fn is_tls_failure(reason: &str) -> bool {
    reason.contains("SSL routines") || reason.contains("SSL alert") || reason.contains("SSL handshake failed")
}

impl ConsumerContext for Reported {}

/// The first start-up step of every Kafka-facing command: one metadata round trip
/// with the configured security, retried while the broker is absent or starting, and
/// stopped at once, with the cause named, when the login or handshake is refused.
pub fn connect(cfg: &Config, waiting: &dyn Fn(Option<String>)) -> Result<(), SecurityError> {
    let client: BaseConsumer<Reported> =
        clients::admin(cfg).create_with_context(Reported::default()).map_err(|e| SecurityError::Client(e.to_string()))?;
    startup::retry("connecting to Kafka", cfg.startup_timeout, waiting, || {
        let answer = client.fetch_metadata(None, Duration::from_secs(2));
        // librdkafka queues its error events; serving the queue hands them to
        // `Reported` (this consumer subscribes to nothing, so no record is taken).
        let _ = client.poll(Duration::from_millis(100));
        if let Some((code, reason)) = client.context().first.lock().ok().and_then(|f| f.clone()) {
            return Err(refused(cfg, code, &reason));
        }
        answer.map(|_| ()).map_err(|e| SecurityError::NotReady(format!("{e}")))
    })
}

/// The fatal error for what librdkafka reported.
fn refused(cfg: &Config, code: RDKafkaErrorCode, reason: &str) -> SecurityError {
    let s = &cfg.kafka_security;
    let broker = reason.split(": ").next().unwrap_or(&cfg.bootstrap_servers).to_owned();
    if code != RDKafkaErrorCode::SSL {
        return SecurityError::Sasl {
            user: s.sasl_username.clone().unwrap_or_default(),
            mechanism: s.sasl_mechanism.map(|m| m.as_str()).unwrap_or("?").to_owned(),
            broker,
            detail: reason.split(": ").skip(1).collect::<Vec<_>>().join(": "),
        };
    }
    let why = first_address(&cfg.bootstrap_servers)
        .and_then(|(host, addr)| diagnose_tls(s, &host, addr).err())
        .unwrap_or_else(|| reason.to_owned());
    SecurityError::Tls { broker, why }
}

/// The first bootstrap server's host name and a socket address of it.
fn first_address(bootstrap: &str) -> Option<(String, SocketAddr)> {
    let first = bootstrap.split(',').next()?.trim();
    let first = first.rsplit_once("://").map_or(first, |(_, rest)| rest);
    let (host, _) = first.rsplit_once(':')?;
    let addr = first.to_socket_addrs().ok()?.next()?;
    Some((host.trim_start_matches('[').trim_end_matches(']').to_owned(), addr))
}

/// Repeats the TLS handshake with `host` at `addr` as librdkafka would make it, and
/// says in words why it fails: the broker's certificate expired, is not trusted, does
/// not name `host`, or the broker refused the client certificate. `Ok` when it works.
pub fn diagnose_tls(s: &KafkaSecurity, host: &str, addr: SocketAddr) -> Result<(), String> {
    if !s.protocol.uses_tls() {
        return Ok(());
    }
    let mut b = SslConnector::builder(SslMethod::tls_client()).map_err(|e| e.to_string())?;
    if let Some(ca) = &s.ssl_ca_location {
        b.set_ca_file(ca).map_err(|e| format!("ssl_ca_location {}: {e}", ca.display()))?;
    }
    if let (Some(cert), Some(key)) = (&s.ssl_certificate_location, &s.ssl_key_location) {
        b.set_certificate_chain_file(cert).map_err(|e| format!("ssl_certificate_location {}: {e}", cert.display()))?;
        let key = private_key(s, key).map_err(|e| e.to_string())?;
        b.set_private_key(&key).map_err(|e| e.to_string())?;
    }
    // OpenSSL keeps no peer certificate after a failed handshake: remember the one
    // that failed verification, to name it.
    let refused: std::sync::Arc<Mutex<Option<X509>>> = Default::default();
    let seen = std::sync::Arc::clone(&refused);
    b.set_verify_callback(SslVerifyMode::PEER, move |ok, ctx| {
        if !ok {
            let leaf = ctx.chain().and_then(|chain| chain.get(0)).or(ctx.current_cert());
            if let (Ok(mut slot), Some(cert)) = (seen.lock(), leaf) {
                slot.get_or_insert_with(|| cert.to_owned());
            }
        }
        ok
    });
    let connector = b.build();
    let mut conf = connector.configure().map_err(|e| e.to_string())?;
    conf.set_verify_hostname(s.ssl_endpoint_identification);
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| format!("connecting to {addr}: {e}"))?;
    tcp.set_read_timeout(Some(Duration::from_secs(2))).map_err(|e| e.to_string())?;
    tcp.set_write_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    match conf.connect(host, tcp) {
        Ok(mut stream) => {
            // Under TLS 1.3 a broker that refuses the client certificate says so after
            // the handshake: read its alert (nothing arrives within the timeout if it
            // accepted us, since a Kafka broker waits for our first request).
            let mut byte = [0u8; 1];
            match std::io::Read::read(&mut stream, &mut byte) {
                Err(e) if e.kind() != std::io::ErrorKind::WouldBlock && e.kind() != std::io::ErrorKind::TimedOut => {
                    Err(client_refused(s, &e.to_string()))
                }
                _ => Ok(()),
            }
        }
        Err(HandshakeError::Failure(mid)) | Err(HandshakeError::WouldBlock(mid)) => {
            let verify = mid.ssl().verify_result();
            if verify != X509VerifyResult::OK {
                let cert = refused.lock().ok().and_then(|c| c.clone()).or_else(|| mid.ssl().peer_certificate());
                return Err(broker_certificate(s, host, verify, cert));
            }
            let detail = mid.error().to_string();
            if detail.contains("alert") {
                return Err(client_refused(s, &detail));
            }
            if detail.contains("wrong version number") || detail.contains("packet length too long") {
                return Err(format!("{addr} does not speak TLS (is it a PLAINTEXT or SASL_PLAINTEXT listener? check kafka_security.protocol)"));
            }
            Err(detail)
        }
        Err(HandshakeError::SetupFailure(e)) => Err(e.to_string()),
    }
}

fn broker_certificate(s: &KafkaSecurity, host: &str, verify: X509VerifyResult, peer: Option<X509>) -> String {
    // OpenSSL's X509_V_ERR_* codes.
    const CERT_NOT_YET_VALID: i32 = 9;
    const CERT_HAS_EXPIRED: i32 = 10;
    const DEPTH_ZERO_SELF_SIGNED_CERT: i32 = 18;
    const SELF_SIGNED_CERT_IN_CHAIN: i32 = 19;
    const UNABLE_TO_GET_ISSUER_CERT_LOCALLY: i32 = 20;
    const UNABLE_TO_VERIFY_LEAF_SIGNATURE: i32 = 21;
    const HOSTNAME_MISMATCH: i32 = 62;
    const IP_ADDRESS_MISMATCH: i32 = 64;
    let subject = peer.as_ref().map(|c| distinguished_name(c.subject_name())).unwrap_or_default();
    let ca = match &s.ssl_ca_location {
        Some(p) => format!("the CA file {}", p.display()),
        None => "the system's CA store (set kafka_security.ssl_ca_location)".into(),
    };
    match verify.as_raw() {
        CERT_HAS_EXPIRED => format!(
            "the broker's certificate has expired (not after {})",
            peer.map(|c| c.not_after().to_string()).unwrap_or_default()
        ),
        CERT_NOT_YET_VALID => "the broker's certificate is not valid yet (check the clocks)".into(),
        DEPTH_ZERO_SELF_SIGNED_CERT | SELF_SIGNED_CERT_IN_CHAIN | UNABLE_TO_GET_ISSUER_CERT_LOCALLY | UNABLE_TO_VERIFY_LEAF_SIGNATURE => {
            format!("the broker's certificate {subject} is not trusted: it is not signed by a CA in {ca} ({})", verify.error_string())
        }
        HOSTNAME_MISMATCH | IP_ADDRESS_MISMATCH => format!(
            "hostname mismatch: the broker's certificate does not name {host:?} (connect with a name it holds, or fix its \
             subjectAltName; kafka_security.ssl_endpoint_identification = false turns the check off)"
        ),
        _ => format!("the broker's certificate was refused: {}", verify.error_string()),
    }
}

/// `CN=broker,O=...` of an X.509 name.
fn distinguished_name(name: &openssl::x509::X509NameRef) -> String {
    let parts: Vec<String> = name
        .entries()
        .map(|e| {
            let key = e.object().nid().short_name().unwrap_or("?");
            let value = String::from_utf8_lossy(e.data().as_slice());
            format!("{key}={value}")
        })
        .collect();
    format!("({})", parts.join(","))
}

fn client_refused(s: &KafkaSecurity, detail: &str) -> String {
    match &s.ssl_certificate_location {
        Some(cert) => format!(
            "the broker refused the client certificate {} ({detail}): is it signed by a CA the broker trusts, and current?",
            cert.display()
        ),
        None => format!("the broker ended the handshake ({detail}): it may require a client certificate (mutual TLS: set kafka_security.ssl_certificate_location and ssl_key_location)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SecurityProtocol;

    #[test]
    fn the_first_bootstrap_server_is_probed() {
        let (host, addr) = first_address("127.0.0.1:9093,other:9092").unwrap();
        assert_eq!((host.as_str(), addr.port()), ("127.0.0.1", 9093));
        let (host, _) = first_address("sasl_ssl://localhost:9094").unwrap();
        assert_eq!(host, "localhost");
        assert!(first_address("no-port").is_none());
    }

    #[test]
    fn a_refused_topic_operation_is_named_from_the_message() {
        let cfg = Config {
            kafka_security: KafkaSecurity {
                protocol: SecurityProtocol::SaslSsl,
                sasl_username: Some("pulses".into()),
                ..KafkaSecurity::default()
            },
            ..Config::default()
        };
        let d = Denied::of_topic(&cfg, "delivery to t.grouped failed: Message production error: TopicAuthorizationFailed", ("Read", "x"));
        assert_eq!((d.principal.as_str(), d.operation.as_str(), d.resource.as_str()), ("User:pulses", "Write", "topic t.grouped"));
        let d = Denied::of_topic(&cfg, "Subscribed topic not available: t.source: Broker: Topic authorization failed", ("Write", "x"));
        assert_eq!((d.operation.as_str(), d.resource.as_str()), ("Read", "topic t.source"));
        let d = Denied::of_topic(&cfg, "creating topic t.dlq: TopicAuthorizationFailed", ("Read", "x"));
        assert_eq!((d.operation.as_str(), d.resource.as_str()), ("Create", "topic t.dlq"));
        let d = Denied::of_topic(&Config::default(), "Broker: Topic authorization failed", ("Describe", "t.agg"));
        assert_eq!((d.principal.as_str(), d.operation.as_str(), d.resource.as_str()), ("User:ANONYMOUS", "Describe", "topic t.agg"));
        assert!(d.to_string().starts_with("not authorized: User:ANONYMOUS may not Describe topic t.agg"), "{d}");
    }

    #[test]
    fn plaintext_needs_no_tls_check() {
        let s = KafkaSecurity { protocol: SecurityProtocol::SaslPlaintext, ..KafkaSecurity::default() };
        assert_eq!(diagnose_tls(&s, "127.0.0.1", "127.0.0.1:1".parse().unwrap()), Ok(()));
    }
}
