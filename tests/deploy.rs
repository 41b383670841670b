//! The deployment files agree with the binary: every YAML parses; ports, probe paths,
//! `PULSES_*` variables and their values, subcommands and flags are ones `pulses` serves
//! and reads; the ConfigMap's topology file is a valid configuration. The secured
//! variants (compose profile "secured", deploy/kubernetes/kafka-security.yaml) are valid
//! configurations too, read every password and certificate from a mounted secret, and
//! the plaintext demo stays the default. No password is written in any manifest. No
//! broker needed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use pulses::config::Config;
use pulses::ops::http::PATHS;
use serde_yaml::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every YAML document of a file, with `<<` merge keys applied (compose uses anchors).
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            let mut v = serde::Deserialize::deserialize(d).unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()));
            Value::apply_merge(&mut v).unwrap();
            v
        })
        .collect()
}

fn yaml_files() -> Vec<PathBuf> {
    let mut files = vec![root().join("docker-compose.yml")];
    let mut dirs = vec![root().join("deploy")];
    while let Some(dir) = dirs.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
                files.push(p);
            }
        }
    }
    files.sort();
    files
}

/// Every environment variable the binary reads through its flags, and the passwords
/// it reads from the variable their `…_PASSWORD_FILE` flag's help names.
fn binary_env() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut todo = vec![pulses::cli::Cli::command()];
    while let Some(c) = todo.pop() {
        for a in c.get_arguments() {
            let Some(env) = a.get_env().map(|e| e.to_string_lossy().into_owned()) else { continue };
            if let Some(password) = env.strip_suffix("_FILE").filter(|e| e.ends_with("_PASSWORD")) {
                let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
                if help.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).any(|w| w == password) {
                    out.insert(password.to_owned());
                }
            }
            out.insert(env);
        }
        todo.extend(c.get_subcommands().cloned());
    }
    out
}

/// Checks a `pulses` command line: a real subcommand, real long flags.
fn check_command(args: &[String], what: &str) {
    let cli = pulses::cli::Cli::command();
    let name = args.first().unwrap_or_else(|| panic!("{what}: no subcommand"));
    let sub = cli.get_subcommands().find(|s| s.get_name() == name).unwrap_or_else(|| panic!("{what}: `pulses {name}` does not exist"));
    let longs: BTreeSet<&str> = sub.get_arguments().chain(cli.get_arguments()).filter_map(|a| a.get_long()).collect();
    for flag in args.iter().filter_map(|a| a.strip_prefix("--")) {
        let flag = flag.split('=').next().unwrap();
        assert!(longs.contains(flag), "{what}: `pulses {name}` has no --{flag}");
    }
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("no port in {addr:?}"))
}

fn str_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => panic!("not a scalar: {other:?}"),
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence().map(|s| s.iter().map(str_of).collect()).unwrap_or_default()
}

fn check_env_names<'a>(names: impl IntoIterator<Item = &'a String>, what: &str) {
    let known = binary_env();
    for name in names {
        if name.starts_with("PULSES_") || name.starts_with("OTEL_") {
            assert!(known.contains(name), "{what}: {name} is not read by pulses (known: {known:?})");
        }
    }
}

/// Checks what a `pulses` command makes of its environment: each `PULSES_*` (and
/// `OTEL_*`) variable is one this subcommand reads, and its value is one its flag takes
/// (`sasl_ssl`, not `SASL_SSL`). `args` is the command line after `pulses`.
fn check_env_values(args: &[String], env: &BTreeMap<String, String>, what: &str) {
    let cli = pulses::cli::Cli::command();
    let sub = cli.get_subcommands().find(|s| Some(s.get_name()) == args.first().map(String::as_str))
        .unwrap_or_else(|| panic!("{what}: no subcommand in {args:?}"));
    let mut line: Vec<String> = std::iter::once("pulses".to_owned()).chain(args.iter().cloned()).collect();
    for (name, value) in env.iter().filter(|(n, _)| (n.starts_with("PULSES_") || n.starts_with("OTEL_")) && !holds_a_password(n)) {
        let arg = sub.get_arguments().chain(cli.get_arguments()).find(|a| a.get_env().is_some_and(|e| e == name.as_str()))
            .unwrap_or_else(|| panic!("{what}: `pulses {}` does not read {name}", sub.get_name()));
        let long = arg.get_long().expect("an env flag has a long name");
        if !arg.get_action().takes_values() || args.iter().any(|a| a == &format!("--{long}") || a.starts_with(&format!("--{long}="))) {
            continue;
        }
        line.push(format!("--{long}={value}"));
    }
    if let Err(e) = cli.clone().try_get_matches_from(&line) {
        panic!("{what}: `{}` (its environment as flags) is refused: {e}", line.join(" "));
    }
}

/// Compose's interpolation with the variables unset: `${NAME:-default}` is the default,
/// `${NAME}` empty, `$$` a `$`.
fn compose_value(v: &str) -> String {
    let mut out = String::new();
    let mut rest = v;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        if let Some(r) = rest.strip_prefix("$$") {
            out.push('$');
            rest = r;
        } else if let Some(r) = rest.strip_prefix("${") {
            let end = r.find('}').unwrap_or_else(|| panic!("unclosed ${{ in {v:?}"));
            let inner = &r[..end];
            if let Some((_, default)) = inner.split_once(":-").or_else(|| inner.split_once('-')) {
                out.push_str(default);
            }
            rest = &r[end + 1..];
        } else {
            out.push('$');
            rest = &rest[1..];
        }
    }
    out + rest
}

/// The configuration a `pulses` process runs with: `toml` (its configuration file) with
/// the settings `env` overrides, as the flags' variables say them. A password (or its
/// file) is on the pod, not here: a stand-in password takes its place.
fn config_with_env(toml: &str, env: &BTreeMap<String, String>) -> Config {
    let mut table: toml::Table = toml.parse().expect("the configuration file is TOML");
    for (name, value) in env {
        let (section, key, value) = match name.as_str() {
            "PULSES_BOOTSTRAP_SERVERS" => (None, "bootstrap_servers", value.clone()),
            "PULSES_SCHEMA_REGISTRY_URL" => (Some("schema_registry"), "url", value.clone()),
            "PULSES_SCHEMA_REGISTRY_USERNAME" => (Some("schema_registry"), "basic_auth_username", value.clone()),
            "PULSES_SCHEMA_REGISTRY_PASSWORD_FILE" | "PULSES_SCHEMA_REGISTRY_PASSWORD" => {
                (Some("schema_registry"), "basic_auth_password", "stand-in".into())
            }
            "PULSES_SCHEMA_REGISTRY_SSL_CA_LOCATION" => (Some("schema_registry"), "ssl_ca_location", value.clone()),
            "PULSES_KAFKA_SECURITY_PROTOCOL" => (Some("kafka_security"), "protocol", value.clone()),
            "PULSES_KAFKA_SASL_MECHANISM" => (Some("kafka_security"), "sasl_mechanism", value.clone()),
            "PULSES_KAFKA_SASL_USERNAME" => (Some("kafka_security"), "sasl_username", value.clone()),
            "PULSES_KAFKA_SASL_PASSWORD_FILE" | "PULSES_KAFKA_SASL_PASSWORD" => (Some("kafka_security"), "sasl_password", "stand-in".into()),
            "PULSES_KAFKA_SSL_CA_LOCATION" => (Some("kafka_security"), "ssl_ca_location", value.clone()),
            "PULSES_KAFKA_SSL_CERTIFICATE_LOCATION" => (Some("kafka_security"), "ssl_certificate_location", value.clone()),
            "PULSES_KAFKA_SSL_KEY_LOCATION" => (Some("kafka_security"), "ssl_key_location", value.clone()),
            "PULSES_KAFKA_SSL_KEY_PASSWORD_FILE" | "PULSES_KAFKA_SSL_KEY_PASSWORD" => {
                (Some("kafka_security"), "ssl_key_password", "stand-in".into())
            }
            n if n.starts_with("PULSES_KAFKA_") || n.starts_with("PULSES_SCHEMA_REGISTRY_") => {
                panic!("{n}: add its configuration key to config_with_env")
            }
            _ => continue,
        };
        let target = match section {
            None => &mut table,
            Some(s) => table.entry(s).or_insert_with(|| toml::Value::Table(toml::Table::new())).as_table_mut().unwrap(),
        };
        target.insert(key.to_owned(), toml::Value::String(value));
    }
    Config::from_toml(&toml::to_string(&table).unwrap()).unwrap_or_else(|e| panic!("{env:?} over the configuration: {e}"))
}

/// The variables naming a file of the Kafka or registry security settings: passwords
/// (`…_FILE`), CAs, the client certificate and its key (`…_LOCATION`).
fn is_file_setting(name: &str) -> bool {
    (name.starts_with("PULSES_KAFKA_") || name.starts_with("PULSES_SCHEMA_REGISTRY_"))
        && (name.ends_with("_FILE") || name.ends_with("_LOCATION"))
}

/// A variable holding a password itself (`PULSES_KAFKA_SASL_PASSWORD`), not the file
/// holding it (`PULSES_KAFKA_SASL_PASSWORD_FILE`).
fn holds_a_password(name: &str) -> bool {
    name.starts_with("PULSES_") && name.contains("PASSWORD") && !name.ends_with("_FILE")
}

/// A secured configuration: TLS or SASL on the way to Kafka.
fn is_secured(cfg: &Config) -> bool {
    let p = cfg.kafka_security.protocol;
    p.uses_tls() || p.uses_sasl()
}

#[test]
fn every_yaml_file_parses() {
    let files = yaml_files();
    assert!(files.len() >= 6, "{files:?}");
    for f in files {
        assert!(!documents(&f).is_empty(), "{} is empty", f.display());
    }
}

#[test]
fn compose_replicas_match_the_binary() {
    let compose = documents(&root().join("docker-compose.yml")).remove(0);
    let services = compose["services"].as_mapping().unwrap();
    let default_port = port_of(&Config::default().http_addr);
    let mut replicas = Vec::new();
    for (name, svc) in services {
        let name = str_of(name);
        if svc["image"].as_str() != Some("pulses:local") {
            continue;
        }
        let command = strings(&svc["command"]);
        check_command(&command, &format!("compose service {name}"));
        let env = compose_env(svc);
        check_env_names(env.keys(), &format!("compose service {name}"));
        check_env_values(&command, &env, &format!("compose service {name}"));
        if command[0] != "run" {
            continue;
        }
        let port = env.get("PULSES_HTTP_ADDR").map_or(default_port, |a| port_of(a));
        let published = strings(&svc["ports"]);
        assert_eq!(published.len(), 1, "{name}");
        assert_eq!(port_of(&published[0]), port, "{name}: container port of {published:?}");
        let health = strings(&svc["healthcheck"]["test"]).join(" ");
        assert!(health.contains(&format!("/dev/tcp/127.0.0.1/{port}")), "{name}: {health}");
        assert!(PATHS.iter().any(|p| health.contains(&format!("GET {p} "))), "{name}: {health}");
        let state = env.get("PULSES_STATE_DIR").expect("state dir set");
        let volumes = strings(&svc["volumes"]);
        assert!(volumes.iter().any(|v| v.ends_with(&format!(":{state}"))), "{name}: {volumes:?}");
        if svc.get("profiles").is_none() {
            replicas.push((env["PULSES_APPLICATION_ID"].clone(), volumes));
        }
    }
    assert_eq!(replicas.len(), 3, "three processor replicas in the demo (services without a profile)");
    assert!(replicas.iter().all(|(app, _)| *app == replicas[0].0), "one application id: {replicas:?}");
    let volumes: BTreeSet<&Vec<String>> = replicas.iter().map(|(_, v)| v).collect();
    assert_eq!(volumes.len(), 3, "each replica has its own state volume");
    for svc in ["kafka", "schema-registry", "topics", "kcat"] {
        assert!(services.contains_key(svc), "compose lacks {svc}");
    }
    // The topic job creates every topic of the default configuration.
    let topics_job = strings(&services["topics"]["command"]).join("\n");
    let t = Config::default().topics;
    for topic in [&t.source, &t.grouped, &t.aggregated, &t.dlq, &t.late, &Config::default().changelog_topic()] {
        assert!(topics_job.contains(&format!("create {topic} ")), "topics job lacks {topic}");
    }
}

/// A compose service's environment, interpolated as compose does with nothing set.
fn compose_env(svc: &Value) -> BTreeMap<String, String> {
    svc["environment"].as_mapping().map(|m| m.iter().map(|(k, v)| (str_of(k), compose_value(&str_of(v)))).collect()).unwrap_or_default()
}

/// Where a compose service's secrets are: /run/secrets/<target> for each, by the
/// top-level secret it mounts.
fn compose_secret_paths(compose: &Value, svc: &Value, what: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for s in svc["secrets"].as_sequence().into_iter().flatten() {
        let (source, target) = match s {
            Value::String(name) => (name.clone(), name.clone()),
            long => (str_of(&long["source"]), long["target"].as_str().map_or_else(|| str_of(&long["source"]), str::to_owned)),
        };
        let defined = &compose["secrets"][source.as_str()];
        assert!(defined["file"].is_string() || defined["environment"].is_string(), "{what}: secret {source} is not defined at the top level");
        let path = if target.starts_with('/') { target } else { format!("/run/secrets/{target}") };
        out.insert(path, source);
    }
    out
}

#[test]
fn compose_demo_is_plaintext_and_the_secured_profile_reads_secrets_from_files() {
    let compose = documents(&root().join("docker-compose.yml")).remove(0);
    // The configuration file the image ships (deploy/Dockerfile: COPY topology /etc/pulses).
    let shipped = std::fs::read_to_string(root().join("topology/pulses.toml")).unwrap();
    let mut secured = Vec::new();
    for (name, svc) in compose["services"].as_mapping().unwrap() {
        let name = str_of(name);
        if svc["image"].as_str() != Some("pulses:local") {
            continue;
        }
        let env = compose_env(svc);
        let cfg = config_with_env(&shipped, &env);
        cfg.check().unwrap_or_else(|e| panic!("compose service {name}: {e}"));
        let secrets = compose_secret_paths(&compose, svc, &format!("compose service {name}"));
        if svc.get("profiles").is_none() {
            // `docker compose up` runs these against the plaintext broker, and needs no
            // file that is not in the repository.
            assert!(!is_secured(&cfg), "compose service {name} is in the demo: plaintext");
            assert!(secrets.is_empty(), "compose service {name} is in the demo: no secrets");
        } else if is_secured(&cfg) {
            secured.push(name.clone());
        }
        for (var, path) in env.iter().filter(|(n, _)| is_file_setting(n)) {
            assert!(secrets.contains_key(path), "compose service {name}: {var}={path} is not one of its secrets {secrets:?}");
        }
    }
    assert!(!secured.is_empty(), "a service under a profile shows a secured cluster");
    // Every secret is a file (or a variable) of the host, none written here.
    for (name, secret) in compose["secrets"].as_mapping().expect("top-level secrets") {
        assert!(secret.get("file").is_some() || secret.get("environment").is_some(), "secret {}: file or environment", str_of(name));
    }
}

/// The Kafka version the tests, the demo and the benchmarks run (scripts/lib.sh pins it).
fn local_kafka_version() -> String {
    let lib = std::fs::read_to_string(root().join("scripts/lib.sh")).expect("scripts/lib.sh");
    let line = lib.lines().find_map(|l| l.strip_prefix("KAFKA_VERSION=")).expect("KAFKA_VERSION= in scripts/lib.sh");
    line.trim_matches('"').to_owned()
}

#[test]
fn compose_runs_the_kafka_version_the_tests_run() {
    let version = local_kafka_version();
    assert!(version.starts_with("4."), "the local broker is Kafka 4.x, not {version}");
    let compose = &documents(&root().join("docker-compose.yml"))[0];
    let mut kafka_images = 0;
    for (name, svc) in compose["services"].as_mapping().expect("services") {
        let image = svc["image"].as_str().unwrap_or_default();
        if let Some(tag) = image.strip_prefix("apache/kafka:") {
            assert_eq!(tag, version, "{}: the same Kafka version as scripts/lib.sh", str_of(name));
            kafka_images += 1;
        }
    }
    assert_eq!(kafka_images, 2, "the broker and the topic job run apache/kafka");
}

fn kubernetes_dir() -> PathBuf {
    root().join("deploy/kubernetes")
}

/// deploy/kubernetes/kustomization.yaml, parsed and as text (its opt-in patches are
/// commented out).
fn kustomization() -> (Value, String) {
    let path = kubernetes_dir().join("kustomization.yaml");
    (documents(&path).remove(0), std::fs::read_to_string(&path).unwrap())
}

/// The objects `kubectl apply -k deploy/kubernetes` applies (the kustomization's
/// resources) and the kustomization itself, by kind.
fn kubernetes() -> BTreeMap<String, Vec<Value>> {
    let (kust, _) = kustomization();
    let mut out: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for f in strings(&kust["resources"]) {
        for doc in documents(&kubernetes_dir().join(&f)) {
            out.entry(str_of(&doc["kind"])).or_default().push(doc);
        }
    }
    out.entry("Kustomization".into()).or_default().push(kust);
    out
}

/// The patches the kustomization names under `patches` (`- path: FILE`), whether that
/// block is on or commented out: the opt-in variants, by file name.
fn kubernetes_patches() -> Vec<(String, Value)> {
    let (_, text) = kustomization();
    text.lines()
        .filter_map(|l| l.trim_start().trim_start_matches('#').trim().strip_prefix("- path:"))
        .map(|f| {
            let f = f.trim().to_owned();
            let mut docs = documents(&kubernetes_dir().join(&f));
            assert_eq!(docs.len(), 1, "{f}: one patch");
            (f, docs.remove(0))
        })
        .collect()
}

/// `patch` over `base`, as kustomize's strategic merge does it for what these manifests
/// hold: mappings merged, lists of named items (containers, env, volumes, volumeMounts)
/// merged by name, anything else replaced.
fn merge(base: &mut Value, patch: &Value) {
    match (base, patch) {
        (Value::Mapping(b), Value::Mapping(p)) => {
            for (k, v) in p {
                match b.get_mut(k) {
                    Some(old) => merge(old, v),
                    None => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (Value::Sequence(b), Value::Sequence(p)) if p.iter().all(|i| i.get("name").is_some()) => {
            for item in p {
                match b.iter_mut().find(|x| x.get("name") == item.get("name")) {
                    Some(old) => merge(old, item),
                    None => b.push(item.clone()),
                }
            }
        }
        (b, p) => *b = p.clone(),
    }
}

/// The StatefulSet as applied by default, and with each opt-in patch of it.
fn statefulsets(k: &BTreeMap<String, Vec<Value>>) -> Vec<(String, Value)> {
    let base = k["StatefulSet"][0].clone();
    let mut out = vec![("StatefulSet".to_owned(), base.clone())];
    for (file, patch) in kubernetes_patches() {
        assert_eq!((&patch["kind"], &patch["metadata"]["name"]), (&base["kind"], &base["metadata"]["name"]), "{file} patches the StatefulSet");
        let mut patched = base.clone();
        merge(&mut patched, &patch);
        out.push((format!("StatefulSet with {file}"), patched));
    }
    out
}

/// The container's environment: the values written in the manifest, and every variable
/// with a stand-in for those a `valueFrom` sets (a Secret's key, say).
fn container_env(c: &Value) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let items = c["env"].as_sequence().unwrap();
    let all: BTreeMap<String, String> =
        items.iter().map(|e| (str_of(&e["name"]), e.get("value").map_or_else(|| "stand-in".to_owned(), str_of))).collect();
    let written = items.iter().filter(|e| e.get("value").is_some()).map(|e| (str_of(&e["name"]), str_of(&e["value"]))).collect();
    (written, all)
}

/// The configuration file the pod reads: the ConfigMap's key that PULSES_CONFIG names.
fn pod_config_file<'a>(k: &'a BTreeMap<String, Vec<Value>>, env: &BTreeMap<String, String>) -> &'a str {
    let key = Path::new(&env["PULSES_CONFIG"]).file_name().unwrap().to_str().unwrap();
    k["ConfigMap"][0]["data"][key].as_str().unwrap_or_else(|| panic!("ConfigMap has no {key}"))
}

/// What every variant of the StatefulSet must get right against the binary.
fn check_statefulset(k: &BTreeMap<String, Vec<Value>>, sts: &Value, what: &str) {
    let pod = &sts["spec"]["template"]["spec"];
    let labels = &sts["spec"]["template"]["metadata"]["labels"];
    assert_eq!(&sts["spec"]["selector"]["matchLabels"], labels);
    let c = &pod["containers"][0];
    let args = strings(&c["args"]);
    check_command(&args, &format!("{what} args"));
    let (env, all) = container_env(c);
    check_env_names(all.keys(), what);
    check_env_values(&args, &env, what);

    // The config file: mounted where PULSES_CONFIG points, valid, only known keys.
    let cm = &k["ConfigMap"][0];
    let config_path = Path::new(&env["PULSES_CONFIG"]);
    let mount = |name: &str| -> String {
        let m = c["volumeMounts"].as_sequence().unwrap().iter().find(|m| m["name"].as_str() == Some(name));
        str_of(&m.unwrap_or_else(|| panic!("{what}: no volumeMount {name}"))["mountPath"])
    };
    let cm_volume = pod["volumes"].as_sequence().unwrap().iter().find(|v| v["configMap"]["name"] == cm["metadata"]["name"]).unwrap();
    assert_eq!(Path::new(&mount(cm_volume["name"].as_str().unwrap())), config_path.parent().unwrap());
    let toml = pod_config_file(k, &env);
    let cfg = Config::from_toml(toml).expect("the ConfigMap's pulses.toml parses with only known keys");
    cfg.check().expect("and is valid");
    // And so is what the pod runs with: the file under its environment.
    config_with_env(toml, &all).check().unwrap_or_else(|e| panic!("{what}: the ConfigMap under its environment: {e}"));

    // The HTTP port: what the binary listens on (env over config file) is the
    // container port named http, which probes and services use.
    let port = port_of(env.get("PULSES_HTTP_ADDR").unwrap_or(&cfg.http_addr));
    assert_eq!(port, port_of(&cfg.http_addr), "config file and env agree");
    let ports = c["ports"].as_sequence().unwrap();
    let http = ports.iter().find(|p| p["name"].as_str() == Some("http")).expect("a port named http");
    assert_eq!(http["containerPort"].as_u64(), Some(u64::from(port)));
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{probe}");
        assert!(PATHS.contains(&path));
        assert!(get["port"].as_str() == Some("http") || get["port"].as_u64() == Some(u64::from(port)), "{probe} port");
    }

    // State: the claim template is mounted where the binary keeps its stores.
    let state_dir = env.get("PULSES_STATE_DIR").cloned().unwrap_or_else(|| cfg.state_dir.display().to_string());
    let claim = str_of(&sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]);
    assert_eq!(mount(&claim), state_dir);
    assert!(c["resources"]["requests"]["cpu"].as_str().is_some() && c["resources"]["requests"]["memory"].as_str().is_some());

    // Mounts do not nest: a mount point cannot be made inside another mount (the
    // ConfigMap's is read-only).
    let mounts: Vec<String> = c["volumeMounts"].as_sequence().unwrap().iter().map(|m| str_of(&m["mountPath"])).collect();
    for a in &mounts {
        for b in &mounts {
            assert!(a == b || !Path::new(b).starts_with(a), "{what}: {b} is mounted inside {a}");
        }
    }

    // Services reach the http port; scrape annotations name a served path and port.
    for svc in &k["Service"] {
        assert_eq!(&svc["spec"]["selector"], labels);
        for p in svc["spec"]["ports"].as_sequence().unwrap() {
            assert!(p["targetPort"].as_str() == Some("http") || p["targetPort"].as_u64() == Some(u64::from(port)));
        }
        let a = &svc["metadata"]["annotations"];
        if let Some(path) = a["prometheus.io/path"].as_str() {
            assert!(PATHS.contains(&path));
            assert_eq!(a["prometheus.io/port"].as_str().map(port_of_str), Some(port));
        }
    }
    assert!(k["Service"].iter().any(|s| s["spec"]["clusterIP"].as_str() == Some("None")
        && s["metadata"]["name"] == sts["spec"]["serviceName"]), "headless service of the StatefulSet");
    let pdb = &k["PodDisruptionBudget"][0];
    assert_eq!(&pdb["spec"]["selector"]["matchLabels"], labels);
}

#[test]
fn kubernetes_manifests_match_the_binary() {
    let k = kubernetes();
    for (what, sts) in statefulsets(&k) {
        check_statefulset(&k, &sts, &what);
    }

    // The kustomization applies every manifest; the other files are its opt-in patches.
    let kust = &k["Kustomization"][0];
    let listed: BTreeSet<String> = strings(&kust["resources"]).into_iter().collect();
    let patches: BTreeSet<String> = kubernetes_patches().into_iter().map(|(f, _)| f).collect();
    assert!(listed.is_disjoint(&patches), "a patch is not a resource: {patches:?}");
    let files: BTreeSet<String> = std::fs::read_dir(kubernetes_dir()).unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.ends_with(".yaml") && f != "kustomization.yaml")
        .collect();
    assert_eq!(&listed | &patches, files);
}

#[test]
fn kubernetes_secured_variant_reads_secrets_from_the_optional_secret_volume() {
    let k = kubernetes();
    let variants = statefulsets(&k);
    let (_, base) = &variants[0];
    let pod = &base["spec"]["template"]["spec"];
    let c = &pod["containers"][0];

    // The Secret's volume: optional, so the manifests apply and the pods start without
    // it; mounted read-only. Its mount path, by volume name.
    let mut secret_mounts = BTreeMap::new();
    for v in pod["volumes"].as_sequence().unwrap().iter().filter(|v| v.get("secret").is_some()) {
        let name = str_of(&v["name"]);
        assert_eq!(v["secret"]["optional"].as_bool(), Some(true), "volume {name}: optional, for a plaintext cluster without the Secret");
        assert!(v["secret"]["secretName"].is_string(), "volume {name}: a secretName");
        let m = c["volumeMounts"].as_sequence().unwrap().iter().find(|m| m["name"].as_str() == Some(&name))
            .unwrap_or_else(|| panic!("the Secret volume {name} is not mounted"));
        assert_eq!(m["readOnly"].as_bool(), Some(true), "volume {name}: read-only");
        secret_mounts.insert(name, str_of(&m["mountPath"]));
    }
    assert!(!secret_mounts.is_empty(), "the StatefulSet mounts a Secret for secured clusters");

    // By default pulses connects in plaintext (the local demo's cluster).
    let (_, env) = container_env(c);
    assert!(!is_secured(&config_with_env(pod_config_file(&k, &env), &env)), "the default StatefulSet is plaintext");

    // Each patch secures it, and every file it names is a key of the mounted Secret.
    assert!(variants.len() > 1, "an opt-in patch for a secured cluster");
    for (what, sts) in &variants[1..] {
        let (_, env) = container_env(&sts["spec"]["template"]["spec"]["containers"][0]);
        let cfg = config_with_env(pod_config_file(&k, &env), &env);
        assert!(is_secured(&cfg), "{what}: TLS or SASL");
        let files: Vec<_> = env.iter().filter(|(n, _)| is_file_setting(n)).collect();
        assert!(!files.is_empty(), "{what}: its CA and passwords come from files");
        for (name, path) in files {
            let in_secret = secret_mounts.values().any(|m| Path::new(path).parent() == Some(Path::new(m)));
            assert!(in_secret, "{what}: {name}={path} is not a key of a mounted Secret {secret_mounts:?}");
        }
    }
}

/// Every environment variable a manifest sets: (name, Some(value written there)) for
/// compose's `KEY: value` and `KEY=value` and Kubernetes' `{name, value}`; (name, None)
/// for `{name, valueFrom}`.
fn env_settings(v: &Value, out: &mut Vec<(String, Option<String>)>) {
    match v {
        Value::Mapping(m) => {
            if let (Some(Value::String(name)), true) = (m.get("name"), m.contains_key("value") || m.contains_key("valueFrom")) {
                out.push((name.clone(), m.get("value").map(str_of)));
            }
            for (k, v) in m {
                if let (Value::String(k), Value::String(_) | Value::Number(_) | Value::Bool(_)) = (k, v) {
                    out.push((k.clone(), Some(str_of(v))));
                }
                env_settings(v, out);
            }
        }
        Value::Sequence(s) => {
            for item in s {
                if let Some((k, v)) = item.as_str().and_then(|i| i.split_once('=')) {
                    out.push((k.to_owned(), Some(v.to_owned())));
                }
                env_settings(item, out);
            }
        }
        _ => {}
    }
}

#[test]
fn no_password_is_written_in_any_manifest() {
    // Variables: the password's file, never the password (a `valueFrom` a Secret would do:
    // pulses reads these, see binary_env).
    let known = binary_env();
    for v in ["PULSES_KAFKA_SASL_PASSWORD", "PULSES_KAFKA_SSL_KEY_PASSWORD", "PULSES_SCHEMA_REGISTRY_PASSWORD"] {
        assert!(known.contains(v), "{v} is read by pulses");
    }
    for f in yaml_files() {
        for doc in documents(&f) {
            let mut settings = Vec::new();
            env_settings(&doc, &mut settings);
            for (name, value) in settings {
                assert!(!(holds_a_password(&name) && value.is_some()), "{}: {name} holds a password; use {name}_FILE", f.display());
            }
        }
    }
    let dockerfile = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    assert!(!dockerfile.split_whitespace().any(|w| holds_a_password(w.split('=').next().unwrap())), "a password in deploy/Dockerfile");

    // Configuration files: passwords as { file = … } or { env = … }, not as text.
    let mut tomls = vec![("topology/pulses.toml".to_owned(), std::fs::read_to_string(root().join("topology/pulses.toml")).unwrap())];
    for cm in &kubernetes()["ConfigMap"] {
        for (key, text) in cm["data"].as_mapping().into_iter().flatten() {
            tomls.push((format!("ConfigMap {}", str_of(key)), str_of(text)));
        }
    }
    for (what, text) in tomls.iter().filter(|(w, _)| w.ends_with(".toml")) {
        let t: toml::Table = text.parse().unwrap_or_else(|e| panic!("{what}: {e}"));
        for (section, key) in [("kafka_security", "sasl_password"), ("kafka_security", "ssl_key_password"), ("schema_registry", "basic_auth_password")] {
            assert!(!t.get(section).and_then(|s| s.get(key)).is_some_and(toml::Value::is_str), "{what}: {section}.{key} written as text");
        }
        for key in t.get("kafka").and_then(toml::Value::as_table).into_iter().flat_map(|k| k.keys()) {
            assert!(!pulses::config::is_secret_property(key), "{what}: [kafka] {key} is a secret; use [kafka_security]");
        }
    }
}

fn port_of_str(s: &str) -> u16 {
    s.parse().unwrap()
}

#[test]
fn dockerfile_matches_the_binary() {
    let text = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    assert!(text.matches("\nFROM ").count() + usize::from(text.starts_with("FROM ")) >= 2, "multi-stage");
    let env_line: String = text.split("\nENV ").nth(1).unwrap().split("\n\n").next().unwrap().lines()
        .take_while(|l| !l.starts_with(|c: char| c.is_ascii_uppercase()) || l.contains('='))
        .collect::<Vec<_>>().join(" ");
    let env: BTreeMap<String, String> = env_line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    check_env_names(env.keys(), "Dockerfile");
    let expose: u16 = text.split("\nEXPOSE ").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();
    assert_eq!(expose, port_of(&env["PULSES_HTTP_ADDR"]));
    assert_eq!(env["PULSES_CONFIG"], "/etc/pulses/pulses.toml");
    assert!(root().join("topology/pulses.toml").exists(), "COPY topology /etc/pulses ships it");
}
