//! pulses on a secured cluster, as production clusters are: a broker of this binary's
//! own (`scripts/broker --secure`) with a SASL_SSL listener (SCRAM-SHA-512), a
//! mutual-TLS listener, and the StandardAuthorizer denying whatever no ACL allows.
//! pulses runs as the principal `User:pulses` with exactly the ACLs `pulses acls`
//! prints, nothing more:
//!
//! - a wrong password, an untrusted broker certificate, a hostname mismatch, an expired
//!   broker or client certificate, a refused client certificate and a missing key file
//!   each stop `pulses run` within seconds, naming the cause, without the secret;
//! - over SASL_SSL, `run`, `rate`, `serve` and `keys` (started as users start them)
//!   count, charge and answer exactly, and `replay` reproduces the live windows;
//! - Avro pulses are decoded through a schema registry served over HTTPS with basic
//!   auth (the registry double, certificate from the test CA); a wrong registry
//!   password or an untrusted registry certificate stops `pulses run` at start;
//! - with any one of the ACLs `pulses acls` lists missing, `run`, `rate`, `serve`,
//!   `keys` and `replay` each stop within seconds, naming the principal, the operation
//!   refused and the resource;
//! - over mutual TLS, `pulses run` killed with SIGKILL mid-stream and restarted counts
//!   every pulse exactly once.
//!
//! Port: `PULSES_TEST_SECURE_PORT` (default 9192; the listeners use it to +3). It is
//! the only test of this binary: it sets the environment its pulses processes inherit.

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::agg::*;
use common::rating::{wait_charged, BOOK};
use common::registry::{avro, RegistryDouble};
use common::secure::{Login, SecureBroker};
use common::serve::{batch, create_key, post};
use common::*;
use rust_decimal::Decimal;

#[test]
fn pulses_works_on_a_secured_cluster_with_least_privilege_and_stops_clearly_on_bad_credentials() {
    let broker = SecureBroker::start_for_this_binary();
    broker.use_for_pulses(Login::Scram);
    bad_settings_stop_the_command_at_once_naming_the_cause(&broker);
    run_rate_serve_keys_and_replay_over_sasl_ssl(&broker);
    avro_through_an_https_registry_with_basic_auth(&broker);
    each_missing_acl_stops_the_command_naming_it(&broker);
    exactly_once_over_mutual_tls_through_a_kill9(&broker);
}

/// Runs `command` (a pulses command expected to refuse to work) to its end: its last
/// `error:` line, its whole stderr, and how long it took. Fails the test if it is
/// still running after a minute (a command that retries a refused login until
/// `startup_timeout`, 5 minutes, is what must not be) or if it succeeds.
fn refused(command: &mut Command, what: &str) -> (String, String, Duration) {
    let started = Instant::now();
    let mut child = command.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("start pulses");
    let mut stderr = String::new();
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = std::io::Read::read_to_string(child.stderr.as_mut().expect("stderr"), &mut stderr);
            panic!("{what}: still running after 60 s: {stderr}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let took = started.elapsed();
    std::io::Read::read_to_string(child.stderr.as_mut().expect("stderr"), &mut stderr).expect("read stderr");
    assert!(!status.success(), "{what}: must fail: {stderr}");
    let last = stderr.lines().rfind(|l| l.starts_with("error: ")).unwrap_or_else(|| panic!("{what}: no error line in {stderr}"));
    eprintln!("{what}: exit after {} ms: {last}", took.as_millis());
    (last.to_owned(), stderr.clone(), took)
}

/// `pulses run` at `bootstrap` with `env` over the inherited settings, refused (see
/// [`refused`]): its last error line, its stderr, how long it took.
fn run_refused(what: &str, bootstrap: &str, env: &[(&str, &str)]) -> (String, String, Duration) {
    let state = tempfile::tempdir().expect("tempdir");
    let mut command = Command::new(pulses_bin());
    if env.contains(&("PULSES_KAFKA_SECURITY_PROTOCOL", "ssl")) {
        // Mutual TLS: no SASL settings (pulses refuses SASL settings it would ignore).
        for k in ["PULSES_KAFKA_SASL_MECHANISM", "PULSES_KAFKA_SASL_USERNAME", "PULSES_KAFKA_SASL_PASSWORD_FILE"] {
            command.env_remove(k);
        }
    }
    command
        .args(["run", "--bootstrap-servers", bootstrap, "--application-id", &unique("refused")])
        .args(["--http-addr", "127.0.0.1:0"])
        .arg("--state-dir")
        .arg(state.path())
        .envs(env.iter().copied());
    refused(&mut command, what)
}

/// A TLS server presenting `cert` (a stand-in broker with a bad certificate), on a
/// free port; killed when dropped.
struct TlsServer {
    child: Child,
    addr: String,
}

impl TlsServer {
    fn start(tls: &Path, cert: &str) -> TlsServer {
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
        let child = Command::new("openssl")
            .args(["s_server", "-quiet", "-accept", &port.to_string()])
            .arg("-cert")
            .arg(tls.join(format!("{cert}.pem")))
            .arg("-key")
            .arg(tls.join(format!("{cert}.key")))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl s_server");
        let addr = format!("127.0.0.1:{port}");
        wait_for("openssl s_server to listen", Duration::from_secs(20), || std::net::TcpStream::connect(&addr).ok());
        TlsServer { child, addr }
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn bad_settings_stop_the_command_at_once_naming_the_cause(b: &SecureBroker) {
    let tls = |f: &str| b.tls.join(f).display().to_string();
    let secret_dir = tempfile::tempdir().expect("tempdir");
    let wrong = secret_dir.path().join("wrong.password");
    std::fs::write(&wrong, "not-the-password-7f3a").expect("write");
    let wrong = wrong.display().to_string();
    let real_password = b.password("pulses");
    let wrong_host = TlsServer::start(&b.tls, "wrong-host");
    let expired_broker = TlsServer::start(&b.tls, "expired-broker");
    let sasl = b.sasl_bootstrap();
    let mtls = b.mtls_bootstrap();
    let mtls_with = |cert: &str, key: &str| {
        vec![
            ("PULSES_KAFKA_SECURITY_PROTOCOL", "ssl".to_owned()),
            ("PULSES_KAFKA_SSL_CERTIFICATE_LOCATION", tls(cert)),
            ("PULSES_KAFKA_SSL_KEY_LOCATION", tls(key)),
        ]
    };
    // The stand-ins speak TLS only; SASL_SSL starts with the same handshake.
    let ssl_only: Vec<(&str, String)> = vec![];
    // (what, bootstrap, environment, expected in the error)
    type Case<'a> = (&'a str, String, Vec<(&'a str, String)>, &'a str);
    let cases: Vec<Case> = vec![
        ("wrong password", sasl.clone(), vec![("PULSES_KAFKA_SASL_PASSWORD_FILE", wrong.clone())],
            "SASL authentication as \"pulses\" (SCRAM-SHA-512) failed"),
        ("untrusted broker certificate", sasl.clone(), vec![("PULSES_KAFKA_SSL_CA_LOCATION", tls("rogue-ca.pem"))],
            "is not trusted: it is not signed by a CA in the CA file"),
        ("hostname mismatch", wrong_host.addr.clone(), ssl_only.clone(), "hostname mismatch: the broker's certificate does not name \"127.0.0.1\""),
        ("expired broker certificate", expired_broker.addr.clone(), ssl_only, "the broker's certificate has expired (not after Feb  1 00:00:00 2020 GMT)"),
        ("expired client certificate", mtls.clone(), mtls_with("expired-client.pem", "expired-client.key"),
            "the client certificate expired on Feb  1 00:00:00 2020 GMT"),
        ("client certificate of an untrusted CA", mtls.clone(), mtls_with("rogue-client.pem", "rogue-client.key"),
            "the broker refused the client certificate"),
        ("no client certificate on a mutual-TLS listener", mtls.clone(), vec![("PULSES_KAFKA_SECURITY_PROTOCOL", "ssl".to_owned())],
            "it may require a client certificate"),
        ("missing key file", mtls.clone(), mtls_with("client.pem", "no-such.key"), "kafka_security.ssl_key_location"),
        ("encrypted key without its password", mtls, mtls_with("client.pem", "client-encrypted.key"),
            "if it is encrypted, set kafka_security.ssl_key_password"),
    ];
    for (what, bootstrap, env, expected) in cases {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (last, stderr, took) = run_refused(what, &bootstrap, &env);
        assert!(last.contains(expected), "{what}: expected {expected:?} in {last}");
        assert!(took < Duration::from_secs(30), "{what}: stopped after {took:?}, not at once");
        for secret in ["not-the-password-7f3a", real_password.as_str()] {
            assert!(!stderr.contains(secret), "{what}: a password in the output: {stderr}");
        }
    }
}

/// Grants `User:pulses` what `pulses acls` prints for `commands` with `config`;
/// returns those `kafka-acls` lines.
fn grant(b: &SecureBroker, t: &Topics, config: &str, commands: &str) -> Vec<String> {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), config).expect("write config");
    let mut args = t.flags();
    args.extend(["--config".to_owned(), file.path().display().to_string()]);
    let lines = b.grant("User:pulses", commands, &args);
    eprintln!("granted User:pulses ({commands}):\n{lines}");
    lines.lines().map(str::to_owned).collect()
}

/// The resource a `kafka-acls` line is on: the value after `--topic`, `--group` or
/// `--transactional-id`.
fn resource_of(line: &str) -> &str {
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| matches!(*w, "--topic" | "--group" | "--transactional-id")).expect("a resource option");
    words[at + 1]
}

fn each_missing_acl_stops_the_command_naming_it(b: &SecureBroker) {
    let dir = tempfile::tempdir().expect("tempdir");
    let book = dir.path().join("price-book.toml");
    std::fs::write(&book, BOOK).expect("price book");
    let book = book.display().to_string();
    let mut cases = 0;
    for (command, args) in [
        ("run", vec!["run", "--http-addr", "127.0.0.1:0"]),
        ("rate", vec!["rate", "--price-book", &book, "--http-addr", "127.0.0.1:0"]),
        ("serve", vec!["serve", "--http-addr", "127.0.0.1:0"]),
        ("keys", vec!["keys", "list"]),
        ("replay", vec!["replay", "--from", "2026-01-01T00:00:00Z"]),
    ] {
        // Topics of their own, with what the command needs granted, nothing else; the
        // source topic (with a few pulses) and the aggregated topic made by an admin.
        let t = Topics::named(&format!("acl-{command}"));
        let cfg = format!("{}\n[topics]\ncharges = \"{app}.charges\"\nalerts = \"{app}.alerts\"\nreplay = \"{app}.replayed\"\n",
            config("1h", "2s"), app = t.app);
        let lines = grant(b, &t, &cfg, command);
        create_topics(&[(&t.source, 2), (&t.aggregated, 2)]);
        let base = now_ms() - 3_600_000;
        produce_pulses(&t.source, &(0..10).map(|i| P { id: format!("a{i}"), tenant: "t".into(), sku: "s".into(), unit: "u".into(),
            amount: Decimal::ONE, at: base + i }).collect::<Vec<_>>());
        let config_file = dir.path().join(format!("{command}.toml"));
        std::fs::write(&config_file, &cfg).expect("write config");
        for line in &lines {
            let resource = resource_of(line);
            b.acl(&line.replacen("--add", "--remove --force", 1));
            let state = tempfile::tempdir().expect("tempdir");
            let what = format!("{command} without `{line}`");
            let (last, _, took) = refused(
                Command::new(pulses_bin()).args(&args).args(t.flags()).arg("--config").arg(&config_file).arg("--state-dir").arg(state.path()),
                &what,
            );
            assert!(last.contains("not authorized: User:pulses may not") && last.contains(resource), "{what}: {last}");
            assert!(took < Duration::from_secs(30), "{command} without `{line}`: stopped after {took:?}");
            b.acl(line);
            cases += 1;
        }
    }
    eprintln!("{cases} missing ACLs, each refused by name");
}

fn run_rate_serve_keys_and_replay_over_sasl_ssl(b: &SecureBroker) {
    let t = Topics::named("secure");
    let (charges, alerts, replayed) = (format!("{}.charges", t.app), format!("{}.alerts", t.app), format!("{}.replayed", t.app));
    let cfg = format!("{}\n[topics]\ncharges = {charges:?}\nalerts = {alerts:?}\nreplay = {replayed:?}\n", config("1h", "2s"));
    grant(b, &t, &cfg, "run,rate,serve,keys,replay");
    // The source topic as a producer's administrator creates it; pulses creates the rest.
    create_topics(&[(&t.source, 3)]);
    let mut run = Proc::run(&t, &cfg, &[]);
    let rate_state = tempfile::tempdir().expect("tempdir");
    let book = rate_state.path().join("price-book.toml");
    std::fs::write(&book, BOOK).expect("price book");
    let mut rate = Proc::start("rate", &t, &cfg, &["--price-book", book.to_str().expect("utf-8")], rate_state);
    let mut serve = Proc::start("serve", &t, &cfg, &[], tempfile::tempdir().expect("tempdir"));
    let (_, secret) = create_key(&t, None);

    // 300 requests of tenant "one" to Kafka, 100 of tenant "two" over HTTP: minute
    // windows of 200 + 100 and 100 requests.
    let base = (now_ms() / 60_000 - 5) * 60_000 + 40 * SECOND;
    let request = |tenant: &str, prefix: &str, i: i64| P {
        id: format!("{prefix}{i}"),
        tenant: tenant.into(),
        sku: "api.requests".into(),
        unit: "request".into(),
        amount: Decimal::ONE,
        at: base + i * 100,
    };
    let to_kafka: Vec<P> = (0..300).map(|i| request("one", "k", i)).collect();
    produce_pulses(&t.source, &to_kafka);
    let over_http: Vec<P> = (0..100).map(|i| request("two", "h", i)).collect();
    let addr = serve.wait_ready();
    let (status, answer) = post(&common::serve::client(), &addr, &secret, batch(&over_http), &[]);
    assert_eq!(status, 202, "{answer}");
    let all: Vec<P> = to_kafka.iter().chain(&over_http).cloned().collect();
    run.wait_ready();
    wait_pipeline_done(&t);
    assert_exact(&t, &all, now_ms());

    // Charged once per final minute window: 400 × $0.001.
    wait_charged(&charges, "0.400", 3);

    // Usage over HTTP, from the aggregates serve reads over SASL_SSL.
    let want: std::collections::BTreeMap<AggKey, Expect> =
        fold(&all, WINDOWS, i64::MAX).into_iter().filter(|(k, _)| k.0 == "two" && k.3 == "minute").collect();
    wait_until("tenant two's minute usage in serve's view", DEADLINE, || {
        let res = common::serve::client()
            .get(format!("http://{addr}/v1/usage?tenant_id=two&window=minute"))
            .header("X-API-Key", &secret)
            .send()
            .map_err(|e| e.to_string())?;
        let v: serde_json::Value = res.json().map_err(|e| e.to_string())?;
        let got: std::collections::BTreeMap<AggKey, Expect> =
            v["windows"].as_array().into_iter().flatten().map(aggregate_of).collect();
        if got == want { Ok(()) } else { Err(format!("{v}")) }
    });

    // Replay from the first pulse to the end reproduces every live window.
    let cfg_path = run.state_dir.path().join("replay.toml");
    std::fs::write(&cfg_path, &cfg).expect("write config");
    run_replay(&t, &cfg_path, &["--from", &rfc3339(base - 60 * SECOND)], &replayed);
    let strip = |m: std::collections::BTreeMap<AggKey, (u32, Expect)>| -> std::collections::BTreeMap<AggKey, Expect> {
        m.into_iter().map(|(k, (_, e))| (k, e)).collect()
    };
    assert_eq!(strip(latest_finals(&replayed).0), fold(&all, WINDOWS, i64::MAX), "replay = the fold of every pulse");

    for (name, p) in [("serve", &mut serve), ("rate", &mut rate), ("run", &mut run)] {
        assert_eq!(p.terminate(Duration::from_secs(30)).code(), Some(0), "pulses {name} stops cleanly");
    }
}

fn avro_through_an_https_registry_with_basic_auth(b: &SecureBroker) {
    let password = "sr-secret-9c1e";
    let reg = RegistryDouble::start_https(&b.tls, "sr-user", password);
    let dir = tempfile::tempdir().expect("tempdir");
    let (good, wrong) = (dir.path().join("sr.password"), dir.path().join("sr-wrong.password"));
    std::fs::write(&good, password).expect("write");
    std::fs::write(&wrong, "sr-not-it-4d2b").expect("write");
    let ca = b.tls.join("ca.pem").display().to_string();
    let registry = |password_file: &Path, ca: Option<&str>| {
        let mut env = vec![
            ("PULSES_SCHEMA_REGISTRY_URL", reg.url.clone()),
            ("PULSES_SCHEMA_REGISTRY_USERNAME", "sr-user".to_owned()),
            ("PULSES_SCHEMA_REGISTRY_PASSWORD_FILE", password_file.display().to_string()),
        ];
        env.extend(ca.map(|ca| ("PULSES_SCHEMA_REGISTRY_SSL_CA_LOCATION", ca.to_owned())));
        env
    };
    for (what, env, expected) in [
        ("wrong registry password", registry(&wrong, Some(&ca)), "refused the credentials of \"sr-user\" (HTTP 401)"),
        ("registry certificate from an unknown CA", registry(&good, None), "TLS to the schema registry at https://127.0.0.1:"),
    ] {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (last, stderr, took) = run_refused(what, &b.sasl_bootstrap(), &env);
        assert!(last.contains(expected), "{what}: expected {expected:?} in {last}");
        assert!(took < Duration::from_secs(30), "{what}: stopped after {took:?}");
        assert!(!stderr.contains(password) && !stderr.contains("sr-not-it-4d2b"), "{what}: a password in the output: {stderr}");
    }
    let refused_before = reg.counters.unauthorized.load(std::sync::atomic::Ordering::Relaxed);
    assert!(refused_before >= 1, "the wrong password was sent and refused");

    // 1,000 Avro pulses through the registry over HTTPS, counted exactly.
    let t = Topics::named("secure-avro");
    let cfg = config("1h", "2s");
    grant(b, &t, &cfg, "run");
    create_topics(&[(&t.source, 3)]);
    let id = reg.register(&format!("{}-value", t.source), &avro::schema_text("pulse.avsc"));
    let schema = avro::parse(&avro::schema_text("pulse.avsc"));
    let pulses = vcpu_pulses("a", 4, 250, (now_ms() / 60_000 - 30) * 60_000, 600);
    let records: Vec<(Option<Vec<u8>>, Vec<u8>)> =
        pulses.iter().map(|p| (Some(p.tenant.clone().into_bytes()), avro::pulse(&schema, id, p))).collect();
    produce(&t.source, &records);
    for (k, v) in registry(&good, Some(&ca)) {
        std::env::set_var(k, v);
    }
    let mut run = Proc::run(&t, &cfg, &[]);
    wait_pipeline_done(&t);
    assert_exact(&t, &pulses, now_ms());
    assert_eq!(read_all(&t.dlq).len(), 0, "no pulse sent to the DLQ");
    assert_eq!(reg.counters.unauthorized.load(std::sync::atomic::Ordering::Relaxed), refused_before, "every request of the run authorized");
    assert!(reg.counters.by_id.load(std::sync::atomic::Ordering::Relaxed) >= 1, "the schema fetched over HTTPS");
    assert_eq!(run.terminate(Duration::from_secs(30)).code(), Some(0));
    for (k, _) in registry(&good, Some(&ca)) {
        std::env::remove_var(k);
    }
}

fn exactly_once_over_mutual_tls_through_a_kill9(b: &SecureBroker) {
    let t = Topics::named("secure-mtls");
    let cfg = config("1h", "2s");
    grant(b, &t, &cfg, "run");
    create_topics(&[(&t.source, 3)]);
    b.use_for_pulses(Login::MutualTls);
    // 3,000 pulses of 6 tenants over 10 minutes of event time, all in Kafka at once.
    let pulses = vcpu_pulses("m", 6, 500, (now_ms() / 60_000 - 20) * 60_000, 1200);
    produce_pulses(&t.source, &pulses);
    let mtls = |f: Box<dyn FnOnce() -> Proc + '_>| {
        // The pulses processes dial the mutual-TLS listener; the test's own clients
        // stay on SASL_SSL as admin.
        let sasl = bootstrap();
        std::env::set_var("PULSES_TEST_BOOTSTRAP", b.mtls_bootstrap());
        let p = f();
        std::env::set_var("PULSES_TEST_BOOTSTRAP", sasl);
        p
    };
    let mut first = mtls(Box::new(|| Proc::run(&t, &cfg, &[])));
    // Killed once stage 2 has committed some of the grouped pulses, not all.
    let group = format!("{}.aggregate", t.app);
    wait_for("stage 2 to commit part of the input", DEADLINE, || {
        let done: i64 = committed(&group, &t.grouped).values().sum();
        (done > 0).then_some(done)
    });
    first.kill9();
    let state = first.into_state();
    let mut second = mtls(Box::new(|| Proc::run_in(&t, &cfg, &[], state)));
    wait_pipeline_done(&t);
    // Every window final, each exactly the fold of its pulses, no final emitted twice.
    assert_exact(&t, &pulses, now_ms());
    assert_eq!(second.terminate(Duration::from_secs(30)).code(), Some(0));
}
