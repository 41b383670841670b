//! `[kafka_security]`: how every Kafka client pulses creates authenticates and
//! encrypts (TLS, SASL, mutual TLS), and [`Secret`], a password or key that is never
//! printed. The settings become librdkafka properties in [`crate::kafka::clients`];
//! the `[kafka]` table can still override any of them.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A password read from the configuration, a file or an environment variable. Its
/// `Debug` and `Display` print `***` (with where it came from), so `pulses check`, logs
/// and errors never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    value: String,
    from: SecretSource,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum SecretSource {
    Config,
    File(PathBuf),
    Env(String),
}

impl Secret {
    /// A secret given as text (the configuration file, a `PULSES_*` variable's value).
    pub fn literal(value: impl Into<String>) -> Self {
        Self { value: value.into(), from: SecretSource::Config }
    }

    /// The contents of `path`, without a trailing newline (files written by `echo`
    /// and Kubernetes secrets alike).
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read the secret file {}: {e}", path.display()))?;
        let value = text.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t)).unwrap_or(&text);
        Ok(Self { value: value.to_owned(), from: SecretSource::File(path.to_owned()) })
    }

    /// The value of environment variable `name`.
    pub fn from_env(name: &str) -> Result<Self, String> {
        let value = std::env::var(name).map_err(|_| format!("environment variable {name} (named as a secret's source) is not set"))?;
        Ok(Self { value, from: SecretSource::Env(name.to_owned()) })
    }

    /// The secret itself: only for handing it to a client library.
    pub fn expose(&self) -> &str {
        &self.value
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.from {
            SecretSource::Config => f.write_str("***"),
            SecretSource::File(p) => write!(f, "*** (from file {})", p.display()),
            SecretSource::Env(v) => write!(f, "*** (from ${v})"),
        }
    }
}

/// How a secret is written in the configuration file: `"text"`, `{ file = "path" }` or
/// `{ env = "VARIABLE" }`. Files and variables are read when the configuration is loaded.
impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged, deny_unknown_fields)]
        enum Written {
            Text(String),
            File { file: PathBuf },
            Env { env: String },
        }
        match Written::deserialize(d)? {
            Written::Text(t) => Ok(Secret::literal(t)),
            Written::File { file } => Secret::from_file(&file).map_err(serde::de::Error::custom),
            Written::Env { env } => Secret::from_env(&env).map_err(serde::de::Error::custom),
        }
    }
}

/// librdkafka's `security.protocol`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum SecurityProtocol {
    #[default]
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl SecurityProtocol {
    pub fn as_librdkafka(self) -> &'static str {
        match self {
            Self::Plaintext => "plaintext",
            Self::Ssl => "ssl",
            Self::SaslPlaintext => "sasl_plaintext",
            Self::SaslSsl => "sasl_ssl",
        }
    }

    pub fn uses_tls(self) -> bool {
        matches!(self, Self::Ssl | Self::SaslSsl)
    }

    pub fn uses_sasl(self) -> bool {
        matches!(self, Self::SaslPlaintext | Self::SaslSsl)
    }
}

/// The SASL mechanisms this build supports (librdkafka with OpenSSL, without Cyrus SASL:
/// no GSSAPI/Kerberos).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, clap::ValueEnum)]
pub enum SaslMechanism {
    #[serde(rename = "PLAIN")]
    #[value(name = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    #[value(name = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    #[value(name = "SCRAM-SHA-512")]
    ScramSha512,
    /// OAuth bearer tokens; the token settings (`sasl.oauthbearer.*`) go in `[kafka]`.
    #[serde(rename = "OAUTHBEARER")]
    #[value(name = "OAUTHBEARER")]
    OauthBearer,
}

impl SaslMechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plain => "PLAIN",
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::ScramSha512 => "SCRAM-SHA-512",
            Self::OauthBearer => "OAUTHBEARER",
        }
    }
}

/// `[kafka_security]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaSecurity {
    /// `plaintext` (default), `ssl`, `sasl_plaintext` or `sasl_ssl`.
    pub protocol: SecurityProtocol,
    /// Needed for the `sasl_*` protocols.
    pub sasl_mechanism: Option<SaslMechanism>,
    pub sasl_username: Option<String>,
    pub sasl_password: Option<Secret>,
    /// CA certificates (PEM) the broker's certificate must chain to; unset: the
    /// system's CA store.
    pub ssl_ca_location: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS, with its private key.
    pub ssl_certificate_location: Option<PathBuf>,
    pub ssl_key_location: Option<PathBuf>,
    /// Password of an encrypted private key.
    pub ssl_key_password: Option<Secret>,
    /// Check that the broker's certificate names the host connected to (librdkafka's
    /// `ssl.endpoint.identification.algorithm=https`). On by default; turning it off
    /// lets anyone with a certificate from the CA impersonate a broker.
    pub ssl_endpoint_identification: bool,
}

impl Default for KafkaSecurity {
    fn default() -> Self {
        Self {
            protocol: SecurityProtocol::Plaintext,
            sasl_mechanism: None,
            sasl_username: None,
            sasl_password: None,
            ssl_ca_location: None,
            ssl_certificate_location: None,
            ssl_key_location: None,
            ssl_key_password: None,
            ssl_endpoint_identification: true,
        }
    }
}

impl KafkaSecurity {
    /// The librdkafka properties these settings stand for, secrets included (for the
    /// client configuration only: never print them).
    pub fn librdkafka_properties(&self) -> Vec<(&'static str, String)> {
        let mut p = vec![("security.protocol", self.protocol.as_librdkafka().to_owned())];
        if self.protocol.uses_sasl() {
            if let Some(m) = self.sasl_mechanism {
                p.push(("sasl.mechanism", m.as_str().to_owned()));
            }
            if let Some(u) = &self.sasl_username {
                p.push(("sasl.username", u.clone()));
            }
            if let Some(s) = &self.sasl_password {
                p.push(("sasl.password", s.expose().to_owned()));
            }
        }
        if self.protocol.uses_tls() {
            let path = |p: &PathBuf| p.display().to_string();
            if let Some(ca) = &self.ssl_ca_location {
                p.push(("ssl.ca.location", path(ca)));
            }
            if let Some(c) = &self.ssl_certificate_location {
                p.push(("ssl.certificate.location", path(c)));
            }
            if let Some(k) = &self.ssl_key_location {
                p.push(("ssl.key.location", path(k)));
            }
            if let Some(s) = &self.ssl_key_password {
                p.push(("ssl.key.password", s.expose().to_owned()));
            }
            let algorithm = if self.ssl_endpoint_identification { "https" } else { "none" };
            p.push(("ssl.endpoint.identification.algorithm", algorithm.to_owned()));
        }
        p
    }

    /// Checks what serde cannot: the settings a protocol needs are there, and the
    /// ones it would ignore are not (a silently unused certificate is a surprise).
    pub fn check(&self) -> Result<(), String> {
        let proto = self.protocol.as_librdkafka();
        if self.protocol.uses_sasl() {
            let Some(m) = self.sasl_mechanism else {
                return Err(format!("kafka_security.protocol = \"{proto}\" needs sasl_mechanism (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER)"));
            };
            if m != SaslMechanism::OauthBearer && (self.sasl_username.is_none() || self.sasl_password.is_none()) {
                return Err(format!("kafka_security: SASL {} needs sasl_username and sasl_password", m.as_str()));
            }
        } else if self.sasl_mechanism.is_some() || self.sasl_username.is_some() || self.sasl_password.is_some() {
            return Err(format!("kafka_security: sasl_* settings are set but protocol = \"{proto}\" does not use SASL (use sasl_plaintext or sasl_ssl)"));
        }
        let tls_set = self.ssl_ca_location.is_some()
            || self.ssl_certificate_location.is_some()
            || self.ssl_key_location.is_some()
            || self.ssl_key_password.is_some();
        if !self.protocol.uses_tls() && tls_set {
            return Err(format!("kafka_security: ssl_* settings are set but protocol = \"{proto}\" does not use TLS (use ssl or sasl_ssl)"));
        }
        if self.ssl_certificate_location.is_some() != self.ssl_key_location.is_some() {
            return Err("kafka_security: ssl_certificate_location and ssl_key_location go together (mutual TLS needs both)".into());
        }
        if self.ssl_key_password.is_some() && self.ssl_key_location.is_none() {
            return Err("kafka_security: ssl_key_password is set without ssl_key_location".into());
        }
        Ok(())
    }
}

/// librdkafka properties whose values are secrets: shown as `***` wherever pulses
/// prints its configuration, whether they come from `[kafka_security]` or `[kafka]`.
pub fn is_secret_property(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.contains("password") || k.contains("secret") || k.ends_with("jaas.config") || k == "ssl.key.pem" || k == "ssl_key"
        || k.contains("token")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_print_as_stars_with_their_source_only() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "hunter2\n").unwrap();
        let s = Secret::from_file(&file).unwrap();
        assert_eq!(s.expose(), "hunter2", "one trailing newline is not part of it");
        let shown = format!("{s} {s:?} {:?}", Some(s.clone()));
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains(&format!("*** (from file {})", file.display())), "{shown}");
        assert_eq!(format!("{:?}", Secret::literal("x")), "***");
        let missing = Secret::from_file(&dir.path().join("nope")).unwrap_err();
        assert!(missing.contains("cannot read the secret file") && missing.contains("nope"), "{missing}");
    }

    #[test]
    fn secrets_are_written_as_text_file_or_env() {
        #[derive(Deserialize)]
        struct T {
            a: Secret,
            b: Secret,
        }
        std::env::set_var("PULSES_TEST_SECRET_VAR", "s3cret");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "from-file").unwrap();
        let t: T = toml::from_str(&format!("a = {{ env = \"PULSES_TEST_SECRET_VAR\" }}\nb = {{ file = {:?} }}", file)).unwrap();
        assert_eq!((t.a.expose(), t.b.expose()), ("s3cret", "from-file"));
        let err = toml::from_str::<T>("a = { env = \"PULSES_TEST_NO_SUCH_VAR\" }\nb = \"x\"").err().unwrap().to_string();
        assert!(err.contains("PULSES_TEST_NO_SUCH_VAR") && err.contains("not set"), "{err}");
    }

    #[test]
    fn protocols_need_their_settings_and_refuse_the_others() {
        let sasl = |m: Option<SaslMechanism>| KafkaSecurity {
            protocol: SecurityProtocol::SaslSsl,
            sasl_mechanism: m,
            sasl_username: Some("u".into()),
            sasl_password: Some(Secret::literal("p")),
            ..KafkaSecurity::default()
        };
        assert!(sasl(Some(SaslMechanism::ScramSha512)).check().is_ok());
        assert!(sasl(None).check().unwrap_err().contains("needs sasl_mechanism"));
        let no_password = KafkaSecurity { sasl_password: None, ..sasl(Some(SaslMechanism::Plain)) };
        assert!(no_password.check().unwrap_err().contains("needs sasl_username and sasl_password"));
        let plain_with_ca = KafkaSecurity { ssl_ca_location: Some("ca.pem".into()), ..KafkaSecurity::default() };
        assert!(plain_with_ca.check().unwrap_err().contains("does not use TLS"));
        let cert_only = KafkaSecurity {
            protocol: SecurityProtocol::Ssl,
            ssl_certificate_location: Some("c.pem".into()),
            ..KafkaSecurity::default()
        };
        assert!(cert_only.check().unwrap_err().contains("go together"));
    }

    #[test]
    fn librdkafka_properties_follow_the_protocol() {
        let s = KafkaSecurity {
            protocol: SecurityProtocol::SaslSsl,
            sasl_mechanism: Some(SaslMechanism::ScramSha512),
            sasl_username: Some("pulses".into()),
            sasl_password: Some(Secret::literal("pw")),
            ssl_ca_location: Some("/ca.pem".into()),
            ..KafkaSecurity::default()
        };
        let props: std::collections::BTreeMap<_, _> = s.librdkafka_properties().into_iter().collect();
        assert_eq!(props.get("security.protocol").map(String::as_str), Some("sasl_ssl"));
        assert_eq!(props.get("sasl.mechanism").map(String::as_str), Some("SCRAM-SHA-512"));
        assert_eq!(props.get("sasl.password").map(String::as_str), Some("pw"));
        assert_eq!(props.get("ssl.ca.location").map(String::as_str), Some("/ca.pem"));
        assert_eq!(props.get("ssl.endpoint.identification.algorithm").map(String::as_str), Some("https"));
        assert_eq!(KafkaSecurity::default().librdkafka_properties(), vec![("security.protocol", "plaintext".to_owned())]);
        for k in ["sasl.password", "ssl.key.password", "sasl.oauthbearer.client.secret", "sasl.jaas.config", "ssl.keystore.password"] {
            assert!(is_secret_property(k), "{k}");
        }
        assert!(!is_secret_property("sasl.username") && !is_secret_property("ssl.ca.location"));
    }
}
