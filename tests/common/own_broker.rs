//! A broker of a test's own, for the tests that kill one (`scripts/broker` on a port
//! of their own, never the shared broker the other tests use).

use std::process::Command;

use super::repo_root;

/// A broker of this test's own, stopped (and its data removed) when dropped.
pub struct OwnBroker {
    port: String,
}

impl OwnBroker {
    pub fn script(&self, args: &[&str]) {
        let status = Command::new(repo_root().join("scripts/broker"))
            .args(args)
            .env("PULSES_BROKER_PORT", &self.port)
            .env("PULSES_BROKER_HEAP", "512m")
            .status()
            .expect("run scripts/broker");
        assert!(status.success(), "scripts/broker {args:?} failed on port {}", self.port);
    }

    pub fn start(port: &str) -> OwnBroker {
        let b = OwnBroker { port: port.to_owned() };
        b.script(&["start"]);
        b
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        // For a post-mortem with kcat: PULSES_TEST_KEEP_BROKER=1 leaves it running.
        if std::thread::panicking() && std::env::var_os("PULSES_TEST_KEEP_BROKER").is_some() {
            eprintln!("broker left running on 127.0.0.1:{} (scripts/broker stop with PULSES_BROKER_PORT)", self.port);
            return;
        }
        let _ = Command::new(repo_root().join("scripts/broker")).arg("stop").env("PULSES_BROKER_PORT", &self.port).status();
    }
}
