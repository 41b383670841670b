//! A secured broker of the test binary's own (`scripts/broker --secure` on a port of
//! its own): SASL_SSL with SCRAM users `admin` and `pulses`, a mutual-TLS listener, the
//! StandardAuthorizer denying what no ACL allows, and the CA, certificates and
//! passwords the harness generated. The test's own clients connect as `admin` (a super
//! user); `pulses` runs as `pulses`, with exactly the ACLs `pulses acls` prints.

use std::path::PathBuf;
use std::process::Command;

use super::{pulses_bin, repo_root};

/// Which listener and credentials a pulses process uses.
#[derive(Clone, Copy, Debug)]
pub enum Login {
    /// SASL_SSL, SCRAM-SHA-512, user `pulses`.
    Scram,
    /// SSL with the client certificate CN=pulses (principal User:pulses).
    MutualTls,
}

pub struct SecureBroker {
    pub port: u16,
    pub tls: PathBuf,
    pub secrets: PathBuf,
}

impl SecureBroker {
    /// Starts this binary's secured broker (port from `PULSES_TEST_SECURE_PORT`, else
    /// 9192) with fresh storage and points the harness's own clients at it as admin.
    /// Call it first, in the binary's only test.
    pub fn start_for_this_binary() -> SecureBroker {
        let port: u16 = std::env::var("PULSES_TEST_SECURE_PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(9192);
        let b = SecureBroker::at(port);
        b.script(&["--secure", "stop"]);
        b.script(&["--secure", "start"]);
        std::env::set_var("PULSES_TEST_BOOTSTRAP", b.sasl_bootstrap());
        let props = format!(
            "security.protocol=SASL_SSL\nsasl.mechanism=SCRAM-SHA-512\nsasl.username=admin\nsasl.password={}\nssl.ca.location={}\n",
            b.password("admin"),
            b.tls.join("ca.pem").display()
        );
        std::env::set_var("PULSES_TEST_KAFKA_PROPS", props);
        b
    }

    fn at(port: u16) -> SecureBroker {
        let cache = std::env::var("PULSES_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache/pulses"));
        let run = cache.join(format!("run/kafka-{port}"));
        SecureBroker { port, tls: run.join("tls"), secrets: run.join("secrets") }
    }

    pub fn script(&self, args: &[&str]) {
        let status = Command::new(repo_root().join("scripts/broker"))
            .args(args)
            .env("PULSES_BROKER_PORT", self.port.to_string())
            .env("PULSES_BROKER_HEAP", "512m")
            .status()
            .expect("run scripts/broker");
        assert!(status.success(), "scripts/broker {args:?} failed on port {}", self.port);
    }

    /// The SASL_SSL listener.
    pub fn sasl_bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The mutual-TLS listener.
    pub fn mtls_bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port + 2)
    }

    pub fn password(&self, user: &str) -> String {
        let path = self.secrets.join(format!("{user}.password"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).trim_end().to_owned()
    }

    pub fn password_file(&self, user: &str) -> PathBuf {
        self.secrets.join(format!("{user}.password"))
    }

    /// The environment a pulses process needs to log in with `login` (the flags'
    /// variables, as a deployment would set them; the password from a file).
    pub fn env(&self, login: Login) -> Vec<(String, String)> {
        let tls = |f: &str| self.tls.join(f).display().to_string();
        let mut env = vec![("PULSES_KAFKA_SSL_CA_LOCATION".to_owned(), tls("ca.pem"))];
        match login {
            Login::Scram => {
                env.push(("PULSES_BOOTSTRAP_SERVERS".into(), self.sasl_bootstrap()));
                env.push(("PULSES_KAFKA_SECURITY_PROTOCOL".into(), "sasl_ssl".into()));
                env.push(("PULSES_KAFKA_SASL_MECHANISM".into(), "SCRAM-SHA-512".into()));
                env.push(("PULSES_KAFKA_SASL_USERNAME".into(), "pulses".into()));
                env.push(("PULSES_KAFKA_SASL_PASSWORD_FILE".into(), self.password_file("pulses").display().to_string()));
            }
            Login::MutualTls => {
                env.push(("PULSES_BOOTSTRAP_SERVERS".into(), self.mtls_bootstrap()));
                env.push(("PULSES_KAFKA_SECURITY_PROTOCOL".into(), "ssl".into()));
                env.push(("PULSES_KAFKA_SSL_CERTIFICATE_LOCATION".into(), tls("client.pem")));
                env.push(("PULSES_KAFKA_SSL_KEY_LOCATION".into(), tls("client.key")));
            }
        }
        env
    }

    /// Makes every pulses process this test binary starts log in with `login`.
    pub fn use_for_pulses(&self, login: Login) {
        for (k, v) in self.env(login) {
            std::env::set_var(k, v);
        }
        if matches!(login, Login::MutualTls) {
            for k in ["PULSES_KAFKA_SASL_MECHANISM", "PULSES_KAFKA_SASL_USERNAME", "PULSES_KAFKA_SASL_PASSWORD_FILE"] {
                std::env::remove_var(k);
            }
        }
    }

    /// Grants `principal` what `pulses acls` says `commands` need with `config_args`
    /// (topic flags and the like), through Kafka's own ACL tool as admin.
    pub fn grant(&self, principal: &str, commands: &str, config_args: &[String]) -> String {
        let out = Command::new(pulses_bin())
            .args(["acls", "--principal", principal, "--command", commands, "--format", "kafka-acls"])
            .args(config_args)
            .output()
            .expect("pulses acls");
        assert!(out.status.success(), "pulses acls: {}", String::from_utf8_lossy(&out.stderr));
        let lines = String::from_utf8(out.stdout).expect("utf-8");
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), &lines).expect("write acl batch");
        self.script(&["acl", "--batch", &file.path().display().to_string()]);
        lines
    }
}

impl SecureBroker {
    /// Runs Kafka's ACL tool with `args` (one `pulses acls --format kafka-acls` line,
    /// or the same with `--remove --force` for `--add`).
    pub fn acl(&self, args: &str) {
        let args: Vec<&str> = std::iter::once("acl").chain(args.split_whitespace()).collect();
        self.script(&args);
    }
}

impl Drop for SecureBroker {
    fn drop(&mut self) {
        if std::thread::panicking() && std::env::var_os("PULSES_TEST_KEEP_BROKER").is_some() {
            eprintln!("secure broker left running on 127.0.0.1:{}", self.port);
            return;
        }
        let _ = Command::new(repo_root().join("scripts/broker"))
            .args(["stop"])
            .env("PULSES_BROKER_PORT", self.port.to_string())
            .status();
    }
}
