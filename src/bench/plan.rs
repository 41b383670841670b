//! What one `pulses bench` run does, and the names of its topics: shared by the
//! driver and the child processor.

use std::path::PathBuf;
use std::time::Duration;

use crate::config::Config;

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Bootstrap servers and `[kafka]` settings come from here.
    pub cfg: Config,
    pub pulses: u64,
    /// Pulses per second to produce at (None: as fast as the broker takes them, a burst).
    pub rate: Option<f64>,
    pub tenants: usize,
    pub skus: usize,
    pub partitions: i32,
    pub grace: Duration,
    pub idle_timeout: Duration,
    /// Longest one run may take before the bench gives up.
    pub timeout: Duration,
    pub keep_topics: bool,
    /// The broker's process id on this machine, to report its CPU time too.
    pub broker_pid: Option<u32>,
    /// The `pulses` binary to run as the processor.
    pub exe: PathBuf,
    /// Where state directories and logs of the child processes go.
    pub work_dir: PathBuf,
}

/// Names of one run's topics, all starting with the run id.
pub struct RunTopics {
    pub id: String,
    pub source: String,
    pub grouped: String,
    pub aggregated: String,
    pub dlq: String,
    pub late: String,
}

impl RunTopics {
    pub fn new(id: String) -> Self {
        let t = |s: &str| format!("{id}.{s}");
        Self { source: t("source"), grouped: t("grouped"), aggregated: t("aggregated"), dlq: t("dlq"), late: t("late"), id }
    }

    pub fn all(&self) -> Vec<String> {
        let changelog = format!("{}-windows-changelog", self.id);
        vec![self.source.clone(), self.grouped.clone(), self.aggregated.clone(), self.dlq.clone(), self.late.clone(), changelog]
    }
}
