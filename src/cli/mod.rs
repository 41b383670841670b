//! The command line (SPEC §5). Each subcommand lives in its own file; this one holds
//! the flags shared by the Kafka-facing commands and how they overlay the config file.

mod acls;
mod bench;
mod check;
mod invoice;
mod keys;
mod rate;
mod replay;
mod rerate;
mod run;
mod serve;
mod stub;
mod topology;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::Config;

/// pulses: a Kafka-native stream processor that meters cloud usage for billing.
///
/// Producers write usage pulses (JSON, or Avro through a schema registry) to
/// `source.pulses`; pulses validates them, re-keys them by tenant into
/// `tenant.grouped.pulses` (anything invalid goes to `source.pulses.dlq` with the reason
/// in its headers), aggregates them exactly in event-time windows kept in RocksDB and
/// emits the aggregates to `tenant.aggregated.pulses.amount`, exactly once by default.
/// `rate` turns final aggregates into charges and alerts; `replay` recomputes them for a
/// time range.
#[derive(Debug, Parser)]
#[command(name = "pulses", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,

    /// Log format on stderr: `text` for people, `json` for log pipelines. Verbosity
    /// comes from RUST_LOG (default `info`).
    #[arg(long, global = true, env = "PULSES_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,

    /// OpenTelemetry collector base URL (OTLP over HTTP, protobuf), e.g.
    /// http://127.0.0.1:4318: spans go to <URL>/v1/traces, metrics to <URL>/v1/metrics.
    /// Unset: nothing is exported
    #[arg(long, global = true, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
    otlp_endpoint: Option<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the processor: group and validate pulses (and meter CloudEvents by the
    /// configured [[meters]]), aggregate them in event-time windows.
    Run(run::RunArgs),
    /// Produce synthetic pulses to the source topic (for demos, tests, benchmarks).
    Stub(stub::StubArgs),
    /// Validate the configuration file and flags, print the effective configuration.
    Check(check::CheckArgs),
    /// Reference rating consumer: price final aggregates, keep balances, raise alerts.
    #[command(long_about = rate::LONG_ABOUT)]
    Rate(rate::RateArgs),
    /// Issue a billing period's invoices (and, on request, adjustments), exactly once.
    #[command(long_about = invoice::LONG_ABOUT)]
    Invoice(invoice::InvoiceArgs),
    /// Re-rate whole billing periods with a price book into a job's own topics, see the
    /// diff against what was billed, and apply it as credit/debit notes.
    #[command(long_about = rerate::LONG_ABOUT)]
    Rerate(rerate::RerateArgs),
    /// Re-compute aggregates from the source topic for a time range (re-rating).
    #[command(long_about = replay::LONG_ABOUT)]
    Replay(replay::ReplayArgs),
    /// Print the topology (sources, stages, stores, changelogs, sinks, windows) of the
    /// effective configuration, as text or as a Mermaid flowchart.
    Topology(topology::TopologyArgs),
    /// End-to-end benchmark against the broker: throughput, latency, CPU and RSS of
    /// both stages under exactly_once and at_least_once.
    #[command(long_about = bench::LONG_ABOUT)]
    Bench(bench::BenchArgs),
    /// HTTP API: take pulses over HTTP (POST /v1/pulses) with API keys.
    #[command(long_about = serve::LONG_ABOUT)]
    Serve(serve::ServeArgs),
    /// Print the Kafka ACLs a command needs (least privilege on a secured cluster).
    #[command(long_about = acls::LONG_ABOUT)]
    Acls(acls::AclsArgs),
    /// Create, list and revoke the API keys of `pulses serve`.
    #[command(long_about = keys::LONG_ABOUT)]
    Keys(keys::KeysArgs),
}

/// Flags common to the Kafka-facing commands. Each overrides the config file; each
/// can also be set by its `PULSES_*` environment variable (the flag wins).
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// TOML configuration file [default: topology/pulses.toml when it exists]
    #[arg(long, env = "PULSES_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Kafka bootstrap servers, host:port[,host:port] [config default: 127.0.0.1:9092]
    #[arg(long, env = "PULSES_BOOTSTRAP_SERVERS", value_name = "HOSTS")]
    pub bootstrap_servers: Option<String>,
    /// Application id: prefix of consumer-group ids, transactional ids and internal
    /// topics [config default: pulses]
    #[arg(long, env = "PULSES_APPLICATION_ID", value_name = "ID")]
    pub application_id: Option<String>,
    /// Consumer-group id prefix (stage 1 joins `<GROUP_ID>.group`) [default: the
    /// application id]
    #[arg(long, env = "PULSES_GROUP_ID", value_name = "ID")]
    pub group_id: Option<String>,
    /// Directory for RocksDB state and checkpoints [config default: state]
    #[arg(long, env = "PULSES_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Listen address of the HTTP endpoint; port 0 picks a free one. `run`: /metrics,
    /// /healthz, /readyz [config: http_addr, default 127.0.0.1:9464]; `serve`: the API
    /// and those [config: serve.http_addr, default 127.0.0.1:8080]
    #[arg(long, env = "PULSES_HTTP_ADDR", value_name = "ADDR")]
    pub http_addr: Option<String>,
    /// Topic producers write pulses to [config default: source.pulses]
    #[arg(long, env = "PULSES_SOURCE_TOPIC", value_name = "TOPIC")]
    pub source_topic: Option<String>,
    /// Topic of validated pulses keyed by tenant_id [config default: tenant.grouped.pulses]
    #[arg(long, env = "PULSES_GROUPED_TOPIC", value_name = "TOPIC")]
    pub grouped_topic: Option<String>,
    /// Topic of window aggregates [config default: tenant.aggregated.pulses.amount]
    #[arg(long, env = "PULSES_AGGREGATED_TOPIC", value_name = "TOPIC")]
    pub aggregated_topic: Option<String>,
    /// Dead-letter topic for invalid pulses [config default: source.pulses.dlq]
    #[arg(long, env = "PULSES_DLQ_TOPIC", value_name = "TOPIC")]
    pub dlq_topic: Option<String>,
    /// Topic for pulses too late even for a correction [config default: tenant.late.pulses]
    #[arg(long, env = "PULSES_LATE_TOPIC", value_name = "TOPIC")]
    pub late_topic: Option<String>,
    /// Confluent Schema Registry base URL (http://host:port) for Avro input and output
    /// [config: schema_registry.url; default: none, Avro input then goes to the DLQ]
    #[arg(long, env = "PULSES_SCHEMA_REGISTRY_URL", value_name = "URL")]
    pub schema_registry_url: Option<String>,
    /// Value format of the grouped and aggregated topics; avro needs a schema registry
    /// [config default: json]
    #[arg(long, env = "PULSES_OUTPUT_FORMAT", value_name = "FORMAT")]
    pub output_format: Option<crate::config::OutputFormat>,
    #[command(flatten)]
    pub security: SecurityArgs,
}

/// How to reach a secured cluster and registry (README "Security"); each overrides
/// `[kafka_security]` or `[schema_registry]`. Passwords are read from files or from
/// environment variables only, never from a flag's value (it would show in `ps`).
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Kafka and registry security")]
pub struct SecurityArgs {
    /// Kafka security protocol [config: kafka_security.protocol, default plaintext]
    #[arg(long, env = "PULSES_KAFKA_SECURITY_PROTOCOL", value_name = "PROTOCOL")]
    pub kafka_security_protocol: Option<crate::config::SecurityProtocol>,
    /// SASL mechanism for the sasl_* protocols [config: kafka_security.sasl_mechanism]
    #[arg(long, env = "PULSES_KAFKA_SASL_MECHANISM", value_name = "MECHANISM")]
    pub kafka_sasl_mechanism: Option<crate::config::SaslMechanism>,
    /// SASL user name [config: kafka_security.sasl_username]
    #[arg(long, env = "PULSES_KAFKA_SASL_USERNAME", value_name = "USER")]
    pub kafka_sasl_username: Option<String>,
    /// File holding the SASL password; or put the password itself in
    /// PULSES_KAFKA_SASL_PASSWORD [config: kafka_security.sasl_password]
    #[arg(long, env = "PULSES_KAFKA_SASL_PASSWORD_FILE", value_name = "FILE")]
    pub kafka_sasl_password_file: Option<PathBuf>,
    /// CA certificates (PEM) the brokers' certificates must chain to [config:
    /// kafka_security.ssl_ca_location; default: the system's CA store]
    #[arg(long, env = "PULSES_KAFKA_SSL_CA_LOCATION", value_name = "FILE")]
    pub kafka_ssl_ca_location: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS [config: kafka_security.ssl_certificate_location]
    #[arg(long, env = "PULSES_KAFKA_SSL_CERTIFICATE_LOCATION", value_name = "FILE")]
    pub kafka_ssl_certificate_location: Option<PathBuf>,
    /// The client certificate's private key (PEM) [config: kafka_security.ssl_key_location]
    #[arg(long, env = "PULSES_KAFKA_SSL_KEY_LOCATION", value_name = "FILE")]
    pub kafka_ssl_key_location: Option<PathBuf>,
    /// File holding the private key's password; or put the password itself in
    /// PULSES_KAFKA_SSL_KEY_PASSWORD [config: kafka_security.ssl_key_password]
    #[arg(long, env = "PULSES_KAFKA_SSL_KEY_PASSWORD_FILE", value_name = "FILE")]
    pub kafka_ssl_key_password_file: Option<PathBuf>,
    /// Schema registry basic-auth user [config: schema_registry.basic_auth_username]
    #[arg(long, env = "PULSES_SCHEMA_REGISTRY_USERNAME", value_name = "USER")]
    pub schema_registry_username: Option<String>,
    /// File holding the schema registry password; or put the password itself in
    /// PULSES_SCHEMA_REGISTRY_PASSWORD [config: schema_registry.basic_auth_password]
    #[arg(long, env = "PULSES_SCHEMA_REGISTRY_PASSWORD_FILE", value_name = "FILE")]
    pub schema_registry_password_file: Option<PathBuf>,
    /// CA certificates (PEM) for an https:// schema registry [config:
    /// schema_registry.ssl_ca_location; default: the system's CA store]
    #[arg(long, env = "PULSES_SCHEMA_REGISTRY_SSL_CA_LOCATION", value_name = "FILE")]
    pub schema_registry_ssl_ca_location: Option<PathBuf>,
}

/// A secret from a file flag, else from the environment variable holding it.
fn secret_from(file: &Option<PathBuf>, env: &str) -> anyhow::Result<Option<crate::config::Secret>> {
    use crate::config::Secret;
    Ok(match file {
        Some(path) => Some(Secret::from_file(path).map_err(anyhow::Error::msg)?),
        None if std::env::var_os(env).is_some() => Some(Secret::from_env(env).map_err(anyhow::Error::msg)?),
        None => None,
    })
}

/// Sets `target` to the flag's value, if the flag (or its variable) was given.
fn overlay<T: Clone>(flag: &Option<T>, target: &mut Option<T>) {
    if let Some(v) = flag {
        *target = Some(v.clone());
    }
}

impl SecurityArgs {
    fn apply(&self, cfg: &mut Config) -> anyhow::Result<()> {
        let s = &mut cfg.kafka_security;
        if let Some(p) = self.kafka_security_protocol {
            s.protocol = p;
        }
        overlay(&self.kafka_sasl_mechanism, &mut s.sasl_mechanism);
        overlay(&self.kafka_sasl_username, &mut s.sasl_username);
        overlay(&secret_from(&self.kafka_sasl_password_file, "PULSES_KAFKA_SASL_PASSWORD")?, &mut s.sasl_password);
        overlay(&self.kafka_ssl_ca_location, &mut s.ssl_ca_location);
        overlay(&self.kafka_ssl_certificate_location, &mut s.ssl_certificate_location);
        overlay(&self.kafka_ssl_key_location, &mut s.ssl_key_location);
        overlay(&secret_from(&self.kafka_ssl_key_password_file, "PULSES_KAFKA_SSL_KEY_PASSWORD")?, &mut s.ssl_key_password);
        let r = &mut cfg.schema_registry;
        overlay(&self.schema_registry_username, &mut r.basic_auth_username);
        overlay(&secret_from(&self.schema_registry_password_file, "PULSES_SCHEMA_REGISTRY_PASSWORD")?, &mut r.basic_auth_password);
        overlay(&self.schema_registry_ssl_ca_location, &mut r.ssl_ca_location);
        Ok(())
    }
}

impl CommonArgs {
    /// Loads the config file (explicit, or the default one if present) and applies
    /// the flags and environment variables over it, then checks the result.
    pub fn load(&self) -> anyhow::Result<Config> {
        let default_file = PathBuf::from("topology/pulses.toml");
        let mut cfg = match &self.config {
            Some(path) => Config::from_file(path)?,
            None if default_file.exists() => Config::from_file(&default_file)?,
            None => Config::default(),
        };
        let set = |target: &mut String, v: &Option<String>| {
            if let Some(v) = v {
                target.clone_from(v);
            }
        };
        set(&mut cfg.bootstrap_servers, &self.bootstrap_servers);
        set(&mut cfg.application_id, &self.application_id);
        set(&mut cfg.http_addr, &self.http_addr);
        set(&mut cfg.topics.source, &self.source_topic);
        set(&mut cfg.topics.grouped, &self.grouped_topic);
        set(&mut cfg.topics.aggregated, &self.aggregated_topic);
        set(&mut cfg.topics.dlq, &self.dlq_topic);
        set(&mut cfg.topics.late, &self.late_topic);
        overlay(&self.group_id, &mut cfg.group_id);
        if let Some(d) = &self.state_dir {
            cfg.state_dir.clone_from(d);
        }
        overlay(&self.schema_registry_url, &mut cfg.schema_registry.url);
        if let Some(f) = self.output_format {
            cfg.output_format = f;
        }
        self.security.apply(&mut cfg)?;
        cfg.check()?;
        crate::kafka::security::check_files(&cfg)?;
        Ok(cfg)
    }
}

/// The first start-up steps of every Kafka-facing command: the brokers take pulses'
/// credentials ([`crate::kafka::security::connect`]; an absent broker is waited for),
/// and the schema registry, if one is configured, takes its own
/// ([`crate::registry::access::check`]). Refused credentials stop the command. A
/// registry that does not answer is not waited for here: it is an outage like any
/// other (JSON pulses flow; Avro ones wait out `retry_max`, then go to the DLQ as
/// `registry_unavailable`).
fn connect(cfg: &Config, waiting: &dyn Fn(Option<String>)) -> anyhow::Result<()> {
    use crate::registry::access::{check, AccessError};
    crate::kafka::security::connect(cfg, waiting)?;
    match check(&cfg.schema_registry) {
        Err(e @ AccessError::NotYet { .. }) => tracing::warn!("{e}; going on, Avro records wait for it"),
        other => other?,
    }
    Ok(())
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let telemetry = match crate::ops::telemetry::init(matches!(cli.log_format, LogFormat::Json), cli.otlp_endpoint.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Commands that only print (to a pager, `head`, `jq`) end quietly when the reader
    // goes away, as Unix tools do, instead of panicking on the broken pipe. Not the
    // ones holding sockets: there a closed peer is an error to handle, not a signal.
    if matches!(cli.command, Command::Check(_) | Command::Topology(_) | Command::Acls(_)) {
        // SAFETY: restores the default action before any thread is started.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let result = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Stub(args) => stub::run(args),
        Command::Check(args) => check::run(args),
        Command::Rate(args) => rate::run(args),
        Command::Invoice(args) => invoice::run(args),
        Command::Rerate(args) => rerate::run(args),
        Command::Replay(args) => replay::run(args),
        Command::Topology(args) => topology::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Keys(args) => keys::run(args),
        Command::Acls(args) => acls::run(args),
    };
    let code = match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    };
    drop(telemetry); // flushes spans and metrics still buffered
    code
}

/// A flag set by SIGTERM or SIGINT (Ctrl-C), for the stage threads to poll.
pub(crate) fn shutdown_on_signal(rt: &tokio::runtime::Runtime) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let flag = std::sync::Arc::new(AtomicBool::new(false));
    let f = std::sync::Arc::clone(&flag);
    rt.spawn(async move {
        terminated().await;
        f.store(true, Ordering::Release);
    });
    flag
}

/// Resolves on SIGTERM or SIGINT (never, if the handlers cannot be installed).
pub(crate) async fn terminated() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL only");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: finishing in-flight work"),
        _ = int.recv() => tracing::info!("SIGINT: finishing in-flight work"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// `--help` is complete: every flag of every subcommand has a description.
    #[test]
    fn every_flag_is_documented() {
        let cmd = Cli::command();
        cmd.clone().debug_assert();
        let mut commands = vec![cmd.clone()];
        commands.extend(cmd.get_subcommands().cloned());
        for c in commands {
            for arg in c.get_arguments() {
                let id = arg.get_id().as_str();
                if matches!(id, "help" | "version") {
                    continue;
                }
                let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
                assert!(!help.trim().is_empty(), "{} --{id} has no help text", c.get_name());
            }
        }
    }
}
