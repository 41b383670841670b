//! The deployment files agree with the binary: every YAML parses; ports, probe paths,
//! `PULSES_*` variables, subcommands and flags are ones `pulses` serves and reads; the
//! ConfigMap's topology file is a valid configuration. No broker needed.

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

/// Every environment variable the binary reads through its flags.
fn binary_env() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut todo = vec![pulses::cli::Cli::command()];
    while let Some(c) = todo.pop() {
        out.extend(c.get_arguments().filter_map(|a| a.get_env()).map(|e| e.to_string_lossy().into_owned()));
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
        let env: BTreeMap<String, String> =
            svc["environment"].as_mapping().map(|m| m.iter().map(|(k, v)| (str_of(k), str_of(v))).collect()).unwrap_or_default();
        check_env_names(env.keys(), &format!("compose service {name}"));
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
        replicas.push((env["PULSES_APPLICATION_ID"].clone(), volumes));
    }
    assert_eq!(replicas.len(), 3, "three processor replicas");
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

/// All Kubernetes objects under deploy/kubernetes, by kind.
fn kubernetes() -> BTreeMap<String, Vec<Value>> {
    let mut out: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for f in yaml_files().iter().filter(|f| f.starts_with(root().join("deploy/kubernetes"))) {
        for doc in documents(f) {
            out.entry(str_of(&doc["kind"])).or_default().push(doc);
        }
    }
    out
}

#[test]
fn kubernetes_manifests_match_the_binary() {
    let k = kubernetes();
    let sts = &k["StatefulSet"][0];
    let pod = &sts["spec"]["template"]["spec"];
    let labels = &sts["spec"]["template"]["metadata"]["labels"];
    assert_eq!(&sts["spec"]["selector"]["matchLabels"], labels);
    let c = &pod["containers"][0];
    check_command(&strings(&c["args"]), "StatefulSet args");
    let env: BTreeMap<String, String> =
        c["env"].as_sequence().unwrap().iter().map(|e| (str_of(&e["name"]), str_of(&e["value"]))).collect();
    check_env_names(env.keys(), "StatefulSet");

    // The config file: mounted where PULSES_CONFIG points, valid, only known keys.
    let cm = &k["ConfigMap"][0];
    let config_path = Path::new(&env["PULSES_CONFIG"]);
    let mount = |name: &str| -> String {
        let m = c["volumeMounts"].as_sequence().unwrap().iter().find(|m| m["name"].as_str() == Some(name));
        str_of(&m.unwrap_or_else(|| panic!("no volumeMount {name}"))["mountPath"])
    };
    let cm_volume = pod["volumes"].as_sequence().unwrap().iter().find(|v| v["configMap"]["name"] == cm["metadata"]["name"]).unwrap();
    assert_eq!(Path::new(&mount(cm_volume["name"].as_str().unwrap())), config_path.parent().unwrap());
    let key = config_path.file_name().unwrap().to_str().unwrap();
    let toml = cm["data"][key].as_str().unwrap_or_else(|| panic!("ConfigMap has no {key}"));
    let cfg = Config::from_toml(toml).expect("the ConfigMap's pulses.toml parses with only known keys");
    cfg.check().expect("and is valid");

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

    // The kustomization applies every manifest.
    let kust = &k["Kustomization"][0];
    let listed: BTreeSet<String> = strings(&kust["resources"]).into_iter().collect();
    let files: BTreeSet<String> = std::fs::read_dir(root().join("deploy/kubernetes")).unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.ends_with(".yaml") && f != "kustomization.yaml")
        .collect();
    assert_eq!(listed, files);
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
