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

    /// Starts this test binary's broker on the port `port_var` names (else
    /// `default_port`) and points the harness at it. Call it first, in the binary's
    /// only test: it sets the process environment before any client exists.
    pub fn start_for_this_binary(port_var: &str, default_port: &str) -> OwnBroker {
        let b = Self::not_started_for_this_binary(port_var, default_port);
        b.script(&["start"]);
        b
    }

    /// [`Self::start_for_this_binary`] without starting it: the harness points at a
    /// broker that is not there yet (a leftover of an earlier run is stopped first).
    pub fn not_started_for_this_binary(port_var: &str, default_port: &str) -> OwnBroker {
        let port = std::env::var(port_var).unwrap_or_else(|_| default_port.into());
        let b = OwnBroker { port };
        b.script(&["stop"]);
        std::env::set_var("PULSES_TEST_BOOTSTRAP", format!("127.0.0.1:{}", b.port));
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
