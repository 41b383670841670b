//! The registry's HTTP client settings (a custom CA for https://) and the start-up
//! check that the registry answers and takes pulses' credentials: a wrong password or
//! an untrusted certificate stops a command at start, naming the cause, instead of
//! every Avro record waiting out the outage budget and then going to the DLQ.

use std::time::Duration;

use super::RegistryError;
use crate::config::SchemaRegistryConfig;

/// The CA certificates of `schema_registry.ssl_ca_location` (none: the system's store).
pub fn ca_certificates(cfg: &SchemaRegistryConfig) -> Result<Vec<registry_http::Certificate>, RegistryError> {
    let Some(path) = &cfg.ssl_ca_location else { return Ok(Vec::new()) };
    let setup = |why: String| RegistryError::Setup(format!("schema_registry.ssl_ca_location {}: {why}", path.display()));
    let pem = std::fs::read(path).map_err(|e| setup(e.to_string()))?;
    registry_http::Certificate::from_pem_bundle(&pem).map_err(|e| setup(format!("not PEM certificates: {e}")))
}

/// An HTTP client trusting `ca` besides the system's CAs (OpenSSL, as librdkafka).
pub fn client_builder(ca: &[registry_http::Certificate]) -> registry_http::ClientBuilder {
    ca.iter().fold(registry_http::Client::builder().tls_backend_native(), |b, cert| b.add_root_certificate(cert.clone()))
}

/// Why the registry could not be used at start.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error(transparent)]
    Setup(#[from] RegistryError),
    /// 401: the credentials are wrong (or missing).
    #[error("the schema registry at {url} refused the credentials{user} (HTTP 401): check schema_registry.basic_auth_username and basic_auth_password")]
    Credentials { url: String, user: String },
    /// The TLS handshake failed: untrusted, expired or misnamed certificate.
    #[error("TLS to the schema registry at {url} failed: {detail} (schema_registry.ssl_ca_location names the CA its certificate must chain to)")]
    Tls { url: String, detail: String },
    /// Not reachable, or 5xx: an outage, not a refusal.
    #[error("the schema registry at {url} does not answer: {detail}")]
    NotYet { url: String, detail: String },
}

/// Asks the registry for its subjects once, with pulses' credentials. `Ok` when no
/// registry is configured, or it answers anything but 401, 5xx or nothing (a 403 for
/// the listing alone does not mean schemas cannot be read).
pub fn check(cfg: &SchemaRegistryConfig) -> Result<(), AccessError> {
    let Some(base) = cfg.url.as_deref() else { return Ok(()) };
    let url = format!("{}/subjects", base.trim_end_matches('/'));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| RegistryError::Setup(format!("async runtime: {e}")))?;
    // reqwest's client wants the runtime it will run on while it is built.
    let _entered = rt.enter();
    let client = client_builder(&ca_certificates(cfg)?)
        .timeout(cfg.request_timeout.max(Duration::from_secs(1)))
        .build()
        .map_err(|e| RegistryError::Setup(format!("HTTP client: {e}")))?;
    let mut request = client.get(&url);
    if let (Some(user), Some(password)) = (&cfg.basic_auth_username, &cfg.basic_auth_password) {
        request = request.basic_auth(user, Some(password.expose()));
    }
    let url = base.to_owned();
    match rt.block_on(request.send()) {
        Ok(r) if r.status().as_u16() == 401 => {
            let user = cfg.basic_auth_username.as_ref().map(|u| format!(" of {u:?}")).unwrap_or_default();
            Err(AccessError::Credentials { url, user })
        }
        Ok(r) if r.status().is_server_error() => Err(AccessError::NotYet { url, detail: format!("HTTP {}", r.status()) }),
        Ok(_) => Ok(()),
        Err(e) => {
            let detail = error_chain(&e);
            if is_tls(&detail) {
                Err(AccessError::Tls { url, detail })
            } else {
                Err(AccessError::NotYet { url, detail })
            }
        }
    }
}

/// An error and its causes, one line (reqwest's own message says only "error sending
/// request"; the cause names the certificate problem).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
}

fn is_tls(detail: &str) -> bool {
    ["certificate", "SSL", "ssl", "tls", "TLS", "handshake"].iter().any(|w| detail.contains(w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_registry_needs_no_check() {
        assert!(check(&SchemaRegistryConfig::default()).is_ok());
    }

    #[test]
    fn a_registry_not_listening_is_an_outage_not_a_refusal() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap();
        let cfg = SchemaRegistryConfig { url: Some(format!("http://127.0.0.1:{port}")), ..SchemaRegistryConfig::default() };
        let err = check(&cfg).unwrap_err();
        assert!(matches!(err, AccessError::NotYet { .. }), "{err}");
    }
}
