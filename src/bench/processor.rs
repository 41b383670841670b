//! The processor under test: a child `pulses run`, its `/metrics`, and its CPU time
//! and peak RSS from `/proc`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

use super::plan::{Plan, RunTopics};
use super::stats;
use crate::config::Guarantee;

/// The child `pulses run` process; killed if the bench stops early.
pub struct Processor {
    child: Child,
    http: String,
    pub log: PathBuf,
}

impl Processor {
    pub fn start(plan: &Plan, t: &RunTopics, guarantee: Guarantee, dir: &Path) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let http = format!("127.0.0.1:{port}");
        let config = dir.join("bench.toml");
        write_private(&config, &child_config(plan)?).context("writing the bench config")?;
        let log = dir.join("pulses-run.log");
        let mut cmd = Command::new(&plan.exe);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("PULSES_") {
                cmd.env_remove(k);
            }
        }
        let a = |s: &str| s.to_owned();
        cmd.args([a("run"), a("--config"), config.display().to_string()])
            .args(["--bootstrap-servers", &plan.cfg.bootstrap_servers, "--application-id", &t.id])
            .args(["--state-dir", &dir.join("state").display().to_string(), "--http-addr", &http])
            .args(["--source-topic", &t.source, "--grouped-topic", &t.grouped, "--aggregated-topic", &t.aggregated])
            .args(["--dlq-topic", &t.dlq, "--late-topic", &t.late, "--processing-guarantee", guarantee.as_str()])
            .args(["--default-partitions", &plan.partitions.to_string(), "--stages", "group,aggregate"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).context("creating the processor log")?);
        let child = cmd.spawn().with_context(|| format!("starting {}", plan.exe.display()))?;
        Ok(Self { child, http, log })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn exited(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            bail!("pulses run exited with {status}; last log lines:\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
        Ok(())
    }

    pub fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            self.exited()?;
            if http_get(&self.http, "/readyz").is_some_and(|(status, _)| status == 200) {
                return Ok(());
            }
            if started.elapsed() > timeout {
                bail!("pulses run not ready after {timeout:?} (log: {})", self.log.display());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn metrics(&self) -> anyhow::Result<Vec<stats::Sample>> {
        match http_get(&self.http, "/metrics") {
            Some((200, body)) => Ok(stats::parse_exposition(&body)),
            other => bail!("/metrics answered {:?}", other.map(|(s, _)| s)),
        }
    }

    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        cpu_seconds_of(self.pid())
    }

    pub fn peak_rss_mib(&self) -> anyhow::Result<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).context("reading /proc/<pid>/status")?;
        let bytes = stats::peak_rss_bytes(&status).ok_or_else(|| anyhow!("no VmHWM in /proc status"))?;
        Ok(bytes as f64 / (1024.0 * 1024.0))
    }

    /// SIGTERM, then SIGKILL if it has not stopped within 30 s.
    pub fn stop(mut self) {
        // SAFETY: signals our own child by its pid.
        unsafe { libc::kill(self.pid() as libc::pid_t, libc::SIGTERM) };
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Processor {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Writes `text` to a new file only its owner may read (it may hold passwords).
fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(text.as_bytes())
}

/// The child's configuration: the user's security settings and `[kafka]` table (as
/// librdkafka properties: the file holds secrets, so it is written readable by its
/// owner only), the bench's grace and idle timeout, and the 1 s and 10 s windows.
fn child_config(plan: &Plan) -> anyhow::Result<String> {
    let mut kafka = toml::Table::new();
    for (k, v) in plan.cfg.kafka_security.librdkafka_properties() {
        kafka.insert(k.into(), v.into());
    }
    for (k, v) in &plan.cfg.kafka {
        kafka.insert(k.clone(), v.clone().into());
    }
    let mut doc = toml::Table::new();
    doc.insert("kafka".into(), kafka.into());
    let text = toml::to_string(&doc)?;
    Ok(format!(
        "{text}\n[aggregate]\ngrace = \"{}ms\"\nidle_timeout = \"{}ms\"\nmax_batch_wait = \"50ms\"\n\n\
         [[windows]]\nname = \"inflight\"\nsize = \"1s\"\n\n[[windows]]\nname = \"postflight\"\nsize = \"10s\"\n",
        plan.grace.as_millis(),
        plan.idle_timeout.as_millis()
    ))
}

/// User + system CPU seconds process `pid` has used so far.
pub fn cpu_seconds_of(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("reading /proc/{pid}/stat"))?;
    // SAFETY: sysconf only reads a constant of the system.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    stats::proc_cpu_seconds(&stat, if ticks > 0 { ticks as f64 } else { 100.0 }).ok_or_else(|| anyhow!("unreadable /proc/{pid}/stat"))
}

/// GET `path` from `addr` with a plain HTTP/1.1 request, as a scraper or a kubelet
/// would: (status code, body), or None if nothing answers (yet).
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    Some((head.split_whitespace().nth(1)?.parse().ok()?, body.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn child_config_keeps_the_users_kafka_settings() {
        let mut cfg = Config::default();
        cfg.kafka.insert("security.protocol".into(), "SASL_SSL".into());
        let plan = Plan {
            cfg,
            pulses: 1,
            rate: None,
            broker_pid: None,
            tenants: 1,
            skus: 1,
            partitions: 1,
            grace: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            keep_topics: false,
            exe: PathBuf::new(),
            work_dir: PathBuf::new(),
        };
        let text = child_config(&plan).unwrap();
        let parsed = Config::from_toml(&text).unwrap();
        assert_eq!(parsed.kafka["security.protocol"], "SASL_SSL");
        assert_eq!(parsed.aggregate.grace, Duration::from_secs(1));
        assert_eq!(parsed.windows.iter().map(|w| w.name.as_str()).collect::<Vec<_>>(), ["inflight", "postflight"]);
    }
}
