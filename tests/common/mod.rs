//! Test harness: a real Apache Kafka broker (started by `scripts/broker`), the real
//! `pulses` binary as a child process, and polling helpers with deadlines.
#![allow(dead_code)]

pub mod agg;
pub mod browser;
pub mod collector;
pub mod http;
pub mod own_broker;
pub mod rating;
pub mod registry;
pub mod replicas;
pub mod secure;
pub mod serve;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

/// Generous: bounds a whole pipeline catching up, several replicas and rebalances
/// included, on a loaded 2-core machine.
pub const DEADLINE: Duration = Duration::from_secs(180);

pub fn bootstrap() -> String {
    std::env::var("PULSES_TEST_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// The settings every client of the test itself starts from: the broker, and on a
/// secured broker the test's own credentials (`PULSES_TEST_KAFKA_PROPS`, lines of
/// `key=value`, set by [`secure::SecureBroker`]).
pub fn kafka_client() -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap());
    for line in std::env::var("PULSES_TEST_KAFKA_PROPS").unwrap_or_default().lines() {
        if let Some((k, v)) = line.split_once('=') {
            c.set(k.trim(), v.trim());
        }
    }
    c
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A name unique to this test run, so tests share one broker without interfering.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis();
    format!("{prefix}-{}-{t}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// Polls `f` until it returns Some, or panics with `what` at the deadline.
pub fn wait_for<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    wait_until(what, deadline, || f().ok_or("not yet"))
}

/// Polls `f` until it returns Ok, or panics with `what` and the last Err (what was
/// seen instead) at the deadline.
pub fn wait_until<T, E: std::fmt::Display>(what: &str, deadline: Duration, mut f: impl FnMut() -> Result<T, E>) -> T {
    let start = Instant::now();
    loop {
        match f() {
            Ok(v) => return v,
            Err(seen) => assert!(start.elapsed() < deadline, "timed out after {deadline:?} waiting for {what}: {seen}"),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn create_topics(topics: &[(&str, i32)]) {
    let admin: AdminClient<DefaultClientContext> =
        kafka_client().create().expect("admin client");
    let new: Vec<NewTopic<'_>> = topics.iter().map(|(n, p)| NewTopic::new(n, *p, TopicReplication::Fixed(1))).collect();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let results = rt.block_on(admin.create_topics(&new, &AdminOptions::new())).expect("create topics");
    for r in results {
        r.expect("topic created");
    }
}

/// Partitions of each topic a test creates, unless it needs fewer: 6 per stage input,
/// as users run it.
pub const PARTITIONS: i32 = 6;

/// Topic names of one test, all unique.
#[derive(Clone, Debug)]
pub struct Topics {
    pub source: String,
    pub grouped: String,
    pub aggregated: String,
    pub dlq: String,
    pub late: String,
    pub app: String,
}

impl Topics {
    /// Creates all five topics: `source_partitions` for the source (a test that needs
    /// the source's order kept uses one), [`PARTITIONS`] for the rest, as users run it.
    pub fn create(name: &str, source_partitions: i32) -> Self {
        Self::create_with(name, source_partitions, PARTITIONS)
    }

    /// Fresh names for the five topics (and the application id), none created.
    pub fn named(name: &str) -> Self {
        let u = unique(name);
        Topics {
            source: format!("{u}.source"),
            grouped: format!("{u}.grouped"),
            aggregated: format!("{u}.aggregated"),
            dlq: format!("{u}.dlq"),
            late: format!("{u}.late"),
            app: u,
        }
    }

    /// Creates all five topics: `source_partitions` for the source, `partitions` for
    /// the rest.
    pub fn create_with(name: &str, source_partitions: i32, partitions: i32) -> Self {
        let t = Self::named(name);
        let n = partitions;
        create_topics(&[(&t.source, source_partitions), (&t.grouped, n), (&t.aggregated, n), (&t.dlq, n), (&t.late, n)]);
        t
    }

    /// The common flags pointing a pulses command at these topics.
    pub fn flags(&self) -> Vec<String> {
        [
            ("--bootstrap-servers", bootstrap()),
            ("--application-id", self.app.clone()),
            ("--source-topic", self.source.clone()),
            ("--grouped-topic", self.grouped.clone()),
            ("--aggregated-topic", self.aggregated.clone()),
            ("--dlq-topic", self.dlq.clone()),
            ("--late-topic", self.late.clone()),
        ]
        .into_iter()
        .flat_map(|(k, v)| [k.to_string(), v])
        .collect()
    }
}

pub fn pulses_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pulses"))
}

/// A running `pulses` child process; killed if the test ends without stopping it.
pub struct Proc {
    pub child: Child,
    pub state_dir: tempfile::TempDir,
    /// Where this life's lines start in the log (a restart appends to it).
    log_start: usize,
}

impl Proc {
    /// Starts `pulses run` with `extra` args, a fresh state dir and the given config.
    pub fn run(topics: &Topics, config_toml: &str, extra: &[&str]) -> Proc {
        let state_dir = tempfile::tempdir().expect("tempdir");
        Self::run_in(topics, config_toml, extra, state_dir)
    }

    pub fn run_in(topics: &Topics, config_toml: &str, extra: &[&str], state_dir: tempfile::TempDir) -> Proc {
        Self::start("run", topics, config_toml, extra, state_dir)
    }

    /// Starts `pulses <command>` (run, rate, ...) like [`Proc::run_in`].
    pub fn start(command: &str, topics: &Topics, config_toml: &str, extra: &[&str], state_dir: tempfile::TempDir) -> Proc {
        Self::start_with_kafka(command, topics, config_toml, &[], extra, state_dir)
    }

    /// [`Proc::start`] with more settings in the `[kafka]` table.
    pub fn start_with_kafka(
        command: &str,
        topics: &Topics,
        config_toml: &str,
        kafka: &[(&str, &str)],
        extra: &[&str],
        state_dir: tempfile::TempDir,
    ) -> Proc {
        let config = state_dir.path().join("pulses.toml");
        // Test setup only: a killed replica's partitions move once the broker's group
        // coordinator misses its heartbeats for the session timeout; 6 s (the broker's
        // minimum) instead of pulses' 30 s keeps the crash tests short.
        let mut config_toml = format!("{config_toml}\n[kafka]\n\"session.timeout.ms\" = \"6000\"\n");
        for (k, v) in kafka {
            config_toml.push_str(&format!("{k:?} = {v:?}\n"));
        }
        std::fs::write(&config, config_toml).expect("write config");
        // Appends, so a restarted replica's log follows its first life's.
        let log = std::fs::OpenOptions::new().create(true).append(true).open(state_dir.path().join("pulses.log"))
            .expect("open log");
        let log_start = log.metadata().map_or(0, |m| m.len() as usize);
        let child = Command::new(pulses_bin())
            .arg(command)
            .args(topics.flags())
            .arg("--config")
            .arg(&config)
            .arg("--state-dir")
            .arg(state_dir.path().join("state"))
            // Many replicas run at once: each HTTP endpoint on a free port (see `http_addr`).
            .args(["--http-addr", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start pulses {command}: {e}"));
        Proc { child, state_dir, log_start }
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let ok = Command::new("kill").args(["-TERM", &pid]).status().expect("kill").success();
        assert!(ok, "kill -TERM failed");
        wait_for("pulses to exit after SIGTERM", within, || self.child.try_wait().expect("try_wait"))
    }

    /// What the process logged so far (stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.state_dir.path().join("pulses.log")).unwrap_or_default()
    }

    /// The address the HTTP endpoint is bound to, from the startup log line of this
    /// life (a restarted replica's log still holds its earlier lives' addresses).
    pub fn http_addr(&self) -> String {
        wait_for("the HTTP endpoint's address in the log", DEADLINE, || {
            let log = self.log();
            let rest = log.get(self.log_start..)?.split("listening on http://").nth(1)?;
            Some(rest.split(|c: char| c.is_whitespace() || c == '"' || c == ' ').next()?.trim_end_matches(',').to_owned())
        })
    }

    /// Waits until `/readyz` answers 200 (every stage joined its group and restored);
    /// returns the endpoint's address.
    pub fn wait_ready(&self) -> String {
        let addr = self.http_addr();
        wait_for("/readyz to answer 200", DEADLINE, || (http::get(&addr, "/readyz")?.0 == 200).then_some(()));
        addr
    }

    /// Sends `signal` (e.g. "STOP", "CONT") to the process.
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill").args([&format!("-{signal}"), &self.child.id().to_string()]).status().expect("kill").success();
        assert!(ok, "kill -{signal} failed");
    }

    /// Kills the process with SIGKILL: no flush, no commit, no goodbye.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Takes the state dir away (to restart a replica with the same state).
    pub fn into_state(mut self) -> tempfile::TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let dir = tempfile::tempdir().expect("tempdir");
        std::mem::replace(&mut self.state_dir, dir)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log();
            // The state dir goes with the test: keep the whole log for a post-mortem.
            let kept = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
                .join(format!("{}.log", self.state_dir.path().file_name().unwrap_or_default().to_string_lossy()));
            let _ = std::fs::write(&kept, &log);
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("---- last lines of pulses log (whole log: {}) ----", kept.display());
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// Counts failed deliveries, so a test never mistakes a record the broker refused for
/// one the processor lost.
#[derive(Default)]
pub struct CheckedDelivery {
    failed: std::sync::Mutex<Vec<String>>,
}

impl rdkafka::ClientContext for CheckedDelivery {}

impl rdkafka::producer::ProducerContext for CheckedDelivery {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &rdkafka::message::DeliveryResult<'_>, _: ()) {
        match result {
            Ok(m) => {
                let mut produced = PRODUCED.lock().unwrap();
                let end = produced.entry(m.topic().to_owned()).or_default().entry(m.partition()).or_insert(0);
                *end = (*end).max(m.offset() + 1);
            }
            Err((e, m)) => self.failed.lock().unwrap().push(format!("{}[{}]: {e}", m.topic(), m.partition())),
        }
    }
}

/// Per topic and partition, the offset after the last record this test process
/// produced and the broker acknowledged: a lower bound of the log end that does not
/// depend on reading the topic back.
static PRODUCED: std::sync::LazyLock<std::sync::Mutex<HashMap<String, HashMap<i32, i64>>>> =
    std::sync::LazyLock::new(Default::default);

pub type TestProducer = BaseProducer<CheckedDelivery>;

pub fn producer() -> TestProducer {
    kafka_client()
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create_with_context(CheckedDelivery::default())
        .expect("producer")
}

/// Waits until every record sent through `p` is acknowledged; panics if any delivery
/// failed.
pub fn flush(p: &TestProducer) {
    p.flush(Duration::from_secs(60)).expect("flush");
    assert_eq!(p.in_flight_count(), 0);
    let failed = p.context().failed.lock().unwrap();
    assert!(failed.is_empty(), "{} records were not delivered, e.g. {}", failed.len(), failed[0]);
}

/// Produces (key, value) records in order and waits until all are acknowledged.
pub fn produce(topic: &str, records: &[(Option<Vec<u8>>, Vec<u8>)]) {
    let p = producer();
    for (key, value) in records {
        let mut r = BaseRecord::<[u8], [u8]>::to(topic).payload(value.as_slice());
        if let Some(k) = key {
            r = r.key(k.as_slice());
        }
        send(&p, r);
    }
    flush(&p);
}

/// Enqueues one record, waiting while the producer's queue is full.
pub fn send(p: &TestProducer, mut r: BaseRecord<'_, [u8], [u8]>) {
    loop {
        match p.send(r) {
            Ok(()) => break,
            Err((_, back)) => {
                r = back;
                p.poll(Duration::from_millis(50));
            }
        }
    }
    p.poll(Duration::ZERO);
}

/// One record read back.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: HashMap<String, String>,
}

impl Record {
    pub fn key_str(&self) -> String {
        String::from_utf8_lossy(self.key.as_deref().unwrap_or_default()).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.value).expect("JSON value")
    }
}

fn reader(isolation: &str) -> BaseConsumer {
    kafka_client()
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", isolation)
        // End of partition as the fetch path sees it (see `read_to_end`).
        .set("enable.partition.eof", "true")
        .create()
        .expect("consumer")
}

/// Retries a broker request that timed out, up to [`DEADLINE`]: on a 2-core machine
/// writing back gigabytes (right after a cold build) the broker's KRaft controller
/// stalled for 8 s on an fsync, and a test that gave up after one 10 s request failed
/// for that alone.
fn retrying<T>(what: &str, mut request: impl FnMut() -> rdkafka::error::KafkaResult<T>) -> T {
    wait_until(what, DEADLINE, || request().map_err(|e| e.to_string()))
}

pub fn partitions(topic: &str) -> Vec<i32> {
    let c = reader("read_committed");
    let md = retrying(&format!("metadata of {topic}"), || c.fetch_metadata(Some(topic), Duration::from_secs(30)));
    md.topics()[0].partitions().iter().map(|p| p.id()).collect()
}

/// Reads every record of `topic` (assign, no group, `read_committed`) until each
/// partition reports its end, and returns them with the end offset of each partition.
pub fn read_to_end(topic: &str) -> (Vec<Record>, HashMap<i32, i64>) {
    read_to_end_as(topic, "read_committed")
}

/// Every record of `topic` a `read_uncommitted` reader gets: committed ones plus those
/// of aborted and still open transactions.
pub fn read_uncommitted(topic: &str) -> Vec<Record> {
    read_to_end_as(topic, "read_uncommitted").0
}

/// [`read_to_end`] with the given `isolation.level`. The end of a partition is where
/// the fetch path reports it (for `read_committed`, the last stable offset).
fn read_to_end_as(topic: &str, isolation: &str) -> (Vec<Record>, HashMap<i32, i64>) {
    let parts = partitions(topic);
    let c = reader(isolation);
    let mut tpl = TopicPartitionList::new();
    for p in &parts {
        tpl.add_partition_offset(topic, *p, Offset::Beginning).expect("tpl");
    }
    c.assign(&tpl).expect("assign");
    let mut ends: HashMap<i32, i64> = HashMap::new();
    let mut next: HashMap<i32, i64> = parts.iter().map(|p| (*p, 0)).collect();
    let mut out = Vec::new();
    let start = Instant::now();
    while ends.len() < parts.len() {
        assert!(start.elapsed() < DEADLINE, "reading {topic} timed out");
        match c.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => {
                next.insert(m.partition(), m.offset() + 1);
                ends.remove(&m.partition());
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|x| (x.key.to_string(), String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned()))
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(Record {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(|k| k.to_vec()),
                    value: m.payload().unwrap_or_default().to_vec(),
                    headers,
                });
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                let pos = c.position().ok().and_then(|tpl| match tpl.find_partition(topic, p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => Some(o),
                    _ => None,
                });
                ends.insert(p, pos.unwrap_or(next[&p]).max(next[&p]));
            }
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            None => {}
        }
    }
    (out, ends)
}

/// Every record of `topic`, up to its end.
pub fn read_all(topic: &str) -> Vec<Record> {
    read_to_end(topic).0
}

/// End offset of every partition of `topic`.
pub fn end_offsets(topic: &str) -> Vec<(i32, i64)> {
    read_to_end(topic).1.into_iter().collect()
}

/// Partitions of `topic` with a transaction open right now: their last stable offset
/// (the end a `read_committed` client is told; librdkafka asks ListOffsets with the
/// client's isolation level) is behind the log end.
pub fn open_transactions(topic: &str) -> Vec<i32> {
    let (stable, all) = (reader("read_committed"), reader("read_uncommitted"));
    let end = |c: &BaseConsumer, p: i32| retrying(&format!("end of {topic}/{p}"), || c.fetch_watermarks(topic, p, Duration::from_secs(30))).1;
    partitions(topic).into_iter().filter(|&p| end(&stable, p) < end(&all, p)).collect()
}

/// Committed offsets of `group` on `topic`, by partition (missing: none committed).
pub fn committed(group: &str, topic: &str) -> HashMap<i32, i64> {
    let c: BaseConsumer =
        kafka_client().set("group.id", group).create().expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in partitions(topic) {
        tpl.add_partition(topic, p);
    }
    let got = retrying(&format!("committed offsets of {group}"), || c.committed_offsets(tpl.clone(), Duration::from_secs(30)));
    got.elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect()
}

/// The offset after the last data record of each partition of `topic` (0 if empty).
/// Unlike the log end, this excludes a trailing transaction marker, which a consumer
/// never receives and so never commits past.
pub fn data_ends(topic: &str) -> HashMap<i32, i64> {
    let (records, ends) = read_to_end(topic);
    let mut out: HashMap<i32, i64> = ends.keys().map(|p| (*p, 0)).collect();
    let produced = PRODUCED.lock().unwrap().get(topic).cloned().unwrap_or_default();
    for (partition, offset) in records.iter().map(|r| (r.partition, r.offset + 1)).chain(produced) {
        let e = out.entry(partition).or_insert(0);
        *e = (*e).max(offset);
    }
    out
}

/// Waits until `group` has committed every record of `topic`.
pub fn wait_all_committed(group: &str, topic: &str) {
    let mut ends: Vec<(i32, i64)> = data_ends(topic).into_iter().collect();
    ends.sort();
    wait_until(&format!("{group} to commit all of {topic} (data ends {ends:?})"), DEADLINE, || {
        let c = committed(group, topic);
        if ends.iter().all(|(p, end)| *end == 0 || c.get(p).is_some_and(|o| o >= end)) {
            Ok(())
        } else {
            Err(format!("committed {c:?}"))
        }
    });
}

/// Runs `pulses replay` on `t` with the config file `cfg_path` and `range` flags into
/// `out`; asserts it succeeded, printed its summary and deleted its temporary state.
/// Returns its stdout (the summary) and stderr (progress lines).
pub fn run_replay(t: &Topics, cfg_path: &std::path::Path, range: &[&str], out: &str) -> (String, String) {
    let replay_state = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let run = Command::new(pulses_bin())
        .arg("replay")
        .args(t.flags())
        .arg("--config").arg(cfg_path)
        .arg("--state-dir").arg(replay_state.path())
        .args(range)
        .args(["--output-topic", out])
        .output()
        .expect("run pulses replay");
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    eprintln!("replay {range:?} took {:?}: {stdout}", started.elapsed());
    assert!(run.status.success(), "replay exited with {:?}: {}", run.status, String::from_utf8_lossy(&run.stderr));
    assert!(stdout.contains("duplicates") && stdout.contains("aggregates"), "summary printed: {stdout}");
    assert_eq!(std::fs::read_dir(replay_state.path()).unwrap().count(), 0, "temporary state deleted");
    (stdout, String::from_utf8_lossy(&run.stderr).into_owned())
}
