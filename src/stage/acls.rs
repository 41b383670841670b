//! The least privilege each command needs on a cluster with an authorizer: which
//! operations on which topics, consumer groups and transactional ids, derived from the
//! same [`Topology`] and [`RateWiring`] the commands run (so the list cannot drift from
//! what they touch). `pulses acls` prints it as a table or as `kafka-acls` arguments.
//!
//! Kafka's rules it relies on: Read, Write, Delete and Alter imply Describe; an
//! idempotent or transactional producer needs no cluster `IdempotentWrite` on Kafka 4
//! (Write on a topic is enough); a transactional producer needs Write on its
//! transactional id and, to commit its consumer's offsets in the transaction, Read on
//! that consumer's group.

use std::fmt::Write as _;

use crate::config::{Config, Guarantee};
use crate::stage::topology::{RateWiring, Topology};

/// A Kafka ACL operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Operation {
    Read,
    Write,
    Create,
    Describe,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "Read",
            Self::Write => "Write",
            Self::Create => "Create",
            Self::Describe => "Describe",
        }
    }
}

/// A resource an ACL is on.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Resource {
    Topic(String),
    Group(String),
    /// Every transactional id starting with this (a replica's process id ends it).
    TransactionalIdPrefix(String),
    /// Every topic starting with this (a re-rating job's own topics).
    TopicPrefix(String),
}

impl Resource {
    fn kind(&self) -> &'static str {
        match self {
            Self::Topic(_) => "Topic",
            Self::Group(_) => "Group",
            Self::TransactionalIdPrefix(_) => "TransactionalId (prefixed)",
            Self::TopicPrefix(_) => "Topic (prefixed)",
        }
    }

    fn name(&self) -> &str {
        match self {
            Self::Topic(n) | Self::Group(n) | Self::TransactionalIdPrefix(n) | Self::TopicPrefix(n) => n,
        }
    }

    /// The `kafka-acls` options naming this resource.
    fn kafka_acls_options(&self) -> String {
        match self {
            Self::Topic(n) => format!("--topic {n}"),
            Self::Group(n) => format!("--group {n}"),
            Self::TransactionalIdPrefix(n) => format!("--transactional-id {n} --resource-pattern-type prefixed"),
            Self::TopicPrefix(n) => format!("--topic {n} --resource-pattern-type prefixed"),
        }
    }
}

/// Operations one command needs on one resource, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acl {
    pub resource: Resource,
    pub operations: Vec<Operation>,
    pub why: String,
}

/// The commands that talk to Kafka.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Command {
    /// `pulses run` (both stages).
    Run,
    /// `pulses run --stages group`.
    Group,
    /// `pulses run --stages aggregate`.
    Aggregate,
    Rate,
    /// `pulses invoice`, and `POST /v1/invoices` of a `serve` replica that issues.
    Invoice,
    /// `pulses rerate`, and the re-rating jobs of a `serve` replica that runs them.
    Rerate,
    Serve,
    Replay,
    Keys,
    Stub,
}

fn topic(name: &str, operations: &[Operation], why: &'static str) -> Acl {
    Acl { resource: Resource::Topic(name.to_owned()), operations: operations.to_vec(), why: why.into() }
}

fn group(name: &str, operations: &[Operation], why: &'static str) -> Acl {
    Acl { resource: Resource::Group(name.to_owned()), operations: operations.to_vec(), why: why.into() }
}

fn transactional_ids(prefix: String, why: &'static str) -> Acl {
    Acl { resource: Resource::TransactionalIdPrefix(prefix), operations: vec![Operation::Write], why: why.into() }
}

/// The ACLs `command` needs with `cfg`.
pub fn needed(command: Command, cfg: &Config) -> Vec<Acl> {
    use Operation::*;
    let topo = Topology::of(cfg);
    let (g, a) = (&topo.group, &topo.aggregate);
    let app = &cfg.application_id;
    let exactly_once = cfg.processing_guarantee == Guarantee::ExactlyOnce;
    let key_topic = cfg.api_keys_topic();
    let mut acls = Vec::new();
    match command {
        Command::Run => {
            acls.extend(needed(Command::Group, cfg));
            acls.extend(needed(Command::Aggregate, cfg));
        }
        Command::Group => {
            acls.push(topic(&g.input, &[Read], "stage 1 reads pulses"));
            acls.push(topic(&g.grouped, &[Write, Create], "stage 1 writes valid pulses; created at start if missing"));
            acls.push(topic(&g.dlq, &[Write, Create], "stage 1 writes invalid records; created at start if missing"));
            acls.push(group(&g.consumer_group, &[Read], "stage 1's consumer group (offsets commit in its transactions)"));
            if exactly_once {
                acls.push(transactional_ids(format!("{app}-{}-", g.name), "stage 1's transactional producer, one id per replica"));
            }
            // `run` creates every output topic at start, whichever stages it runs.
            acls.push(topic(&a.aggregated, &[Create], "created at start if missing"));
            acls.push(topic(&a.late, &[Create], "created at start if missing"));
        }
        Command::Aggregate => {
            acls.push(topic(&a.input, &[Read, Create], "stage 2 reads grouped pulses; created at start if missing"));
            acls.push(topic(&a.aggregated, &[Write, Create], "stage 2 writes window aggregates"));
            acls.push(topic(&a.late, &[Write, Create], "stage 2 writes pulses too late to count"));
            acls.push(topic(&a.changelog, &[Read, Write, Create], "the window stores' changelog: written, and read to restore"));
            acls.push(topic(&g.dlq, &[Create], "created at start if missing"));
            acls.push(group(&a.consumer_group, &[Read], "stage 2's consumer group (offsets commit in its transactions)"));
            acls.push(group(&g.consumer_group, &[Describe], "stage 2 reads stage 1's committed offsets to tell a quiet partition from a lagging stage 1"));
            acls.push(topic(&g.input, &[Describe], "the source partitions' ends, for the same check"));
            if exactly_once {
                acls.push(transactional_ids(format!("{app}-{}-", a.name), "stage 2's transactional producer, one id per replica"));
            }
        }
        Command::Rate => {
            let r = RateWiring::of(cfg);
            acls.push(topic(&r.input, &[Read], "final aggregates to price"));
            acls.push(topic(&r.charges, &[Write, Create], "charges; created at start if missing"));
            acls.push(topic(&r.alerts, &[Write, Create], "threshold alerts; created at start if missing"));
            acls.push(topic(&r.changelog, &[Read, Write, Create], "the ledger stores' changelog: written, and read to restore"));
            acls.push(group(&r.consumer_group, &[Read], "rate's consumer group (offsets commit in its transactions)"));
            acls.push(transactional_ids(format!("{app}-{}-", r.name), "rate's transactional producer, one id per replica"));
        }
        Command::Invoice => {
            let r = RateWiring::of(cfg);
            acls.push(topic(&a.changelog, &[Read], "stage 2's committed watermarks: is the period's every window final?"));
            acls.push(topic(&cfg.topics.grouped, &[Describe], "its partition count, to find a tenant's partition"));
            acls.push(topic(&r.input, &[Read], "the aggregated partitions' ends, and what lies between them and rate's offsets"));
            acls.push(group(&r.consumer_group, &[Describe], "rate's committed offsets: is every final aggregate charged?"));
            acls.push(topic(&r.charges, &[Read], "the period's charges"));
            acls.push(topic(&cfg.topics.invoices, &[Read, Write, Create], "invoices and adjustments: read to number them, written; created if missing"));
            acls.push(topic(&cfg.invoices_layout_topic(), &[Read, Write, Create], "the invoices topic's partition count, recorded at the first run and checked by every run"));
            acls.push(transactional_ids(format!("{app}-invoice-"), "the issuer of each invoices partition, one id per partition"));
        }
        Command::Rerate => {
            acls.extend(needed(Command::Invoice, cfg));
            acls.push(topic(&cfg.topics.source, &[Read], "the pulses of the scope, replayed"));
            acls.push(topic(&cfg.topics.aggregated, &[Read], "its partition count, for the job's topics"));
            acls.push(topic(&cfg.rerating_jobs_topic(), &[Read, Write, Create], "the jobs' log: decided, progress, diffs; created when first used"));
            acls.push(Acl {
                resource: Resource::TopicPrefix(format!("{app}.rerating.")),
                operations: vec![Read, Write, Create],
                why: "each job's own aggregates and charges topics".into(),
            });
            acls.push(Acl {
                resource: Resource::TransactionalIdPrefix(format!("{app}-rerating-jobs")),
                operations: vec![Write],
                why: "the jobs' decider".into(),
            });
        }
        Command::Serve => {
            acls.push(topic(&cfg.topics.source, &[Write], "POST /v1/pulses writes pulses"));
            acls.push(topic(&cfg.topics.invoices, &[Read, Create], "the invoices view reads invoices; created at start if missing (POST /v1/invoices also needs `--command invoice`'s ACLs)"));
            acls.push(topic(&cfg.topics.aggregated, &[Read, Create], "the usage view reads aggregates; created at start if missing"));
            acls.push(topic(&cfg.topics.charges, &[Read, Create], "the charges view reads charges; created at start if missing"));
            acls.push(topic(&key_topic, &[Read, Create], "API keys; created at start if missing"));
        }
        Command::Keys => {
            acls.push(topic(&key_topic, &[Read, Write, Create], "API keys are written there and read back"));
        }
        Command::Replay => {
            acls.push(topic(&cfg.topics.source, &[Read], "the pulses to recompute"));
            acls.push(topic(&cfg.topics.aggregated, &[Describe], "its partition count, for the replay topic"));
            acls.push(topic(&cfg.topics.replay, &[Write, Create], "recomputed aggregates; created if missing"));
        }
        Command::Stub => {
            acls.push(topic(&cfg.topics.source, &[Write], "synthetic pulses"));
        }
    }
    merge(acls)
}

/// One entry per resource, operations merged (a resource named by two stages).
fn merge(acls: Vec<Acl>) -> Vec<Acl> {
    let mut out: Vec<Acl> = Vec::new();
    for acl in acls {
        match out.iter_mut().find(|o| o.resource == acl.resource) {
            Some(o) => {
                if !o.why.contains(&acl.why) {
                    o.why = format!("{}; {}", o.why, acl.why);
                }
                for op in acl.operations {
                    if !o.operations.contains(&op) {
                        o.operations.push(op);
                    }
                }
                // Describe is implied by any other operation.
                if o.operations.len() > 1 {
                    o.operations.retain(|op| *op != Operation::Describe);
                }
                o.operations.sort();
            }
            None => out.push(acl),
        }
    }
    out
}

/// A table for people.
pub fn table(principal: &str, command: Command, acls: &[Acl]) -> String {
    let mut s = format!("ACLs for {principal} to run `pulses {}`:\n", command_name(command));
    for acl in acls {
        let ops: Vec<&str> = acl.operations.iter().map(|o| o.as_str()).collect();
        let _ = writeln!(s, "  {:<28} {:<44} {:<20} {}", acl.resource.kind(), acl.resource.name(), ops.join(","), acl.why);
    }
    s
}

/// One line of `kafka-acls` arguments per resource (after `--bootstrap-server` and
/// `--command-config`), e.g. `--add --allow-principal User:pulses --operation Read --topic source.pulses`.
pub fn kafka_acls_lines(principal: &str, acls: &[Acl]) -> String {
    let mut s = String::new();
    for acl in acls {
        let ops: String = acl.operations.iter().map(|o| format!(" --operation {}", o.as_str())).collect();
        let _ = writeln!(s, "--add --allow-principal {principal}{ops} {}", acl.resource.kafka_acls_options());
    }
    s
}

pub fn command_name(command: Command) -> &'static str {
    match command {
        Command::Run => "run",
        Command::Group => "run --stages group",
        Command::Aggregate => "run --stages aggregate",
        Command::Rate => "rate",
        Command::Invoice => "invoice",
        Command::Rerate => "rerate",
        Command::Serve => "serve",
        Command::Replay => "replay",
        Command::Keys => "keys",
        Command::Stub => "stub",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_needs_both_stages_resources_once_each() {
        let cfg = Config::default();
        let acls = needed(Command::Run, &cfg);
        let find = |r: Resource| acls.iter().find(|a| a.resource == r).map(|a| a.operations.clone());
        use Operation::*;
        assert_eq!(find(Resource::Topic("source.pulses".into())), Some(vec![Read]));
        assert_eq!(find(Resource::Topic("tenant.grouped.pulses".into())), Some(vec![Read, Write, Create]));
        assert_eq!(find(Resource::Topic("tenant.aggregated.pulses.amount".into())), Some(vec![Write, Create]));
        assert_eq!(find(Resource::Group("pulses.group".into())), Some(vec![Read]));
        assert_eq!(find(Resource::TransactionalIdPrefix("pulses-aggregate-".into())), Some(vec![Write]));
        let mut resources: Vec<_> = acls.iter().map(|a| a.resource.clone()).collect();
        resources.sort();
        resources.dedup();
        assert_eq!(resources.len(), acls.len(), "one entry per resource");
    }

    #[test]
    fn at_least_once_needs_no_transactional_ids() {
        let cfg = Config { processing_guarantee: Guarantee::AtLeastOnce, ..Config::default() };
        assert!(!needed(Command::Run, &cfg).iter().any(|a| matches!(a.resource, Resource::TransactionalIdPrefix(_))));
    }

    #[test]
    fn kafka_acls_lines_name_operations_and_patterns() {
        let cfg = Config::default();
        let lines = kafka_acls_lines("User:pulses", &needed(Command::Rate, &cfg));
        assert!(lines.contains("--add --allow-principal User:pulses --operation Read --topic tenant.aggregated.pulses.amount\n"), "{lines}");
        assert!(lines.contains("--operation Write --transactional-id pulses-rate- --resource-pattern-type prefixed\n"), "{lines}");
        assert!(lines.contains("--operation Read --group pulses.rate\n"), "{lines}");
    }
}
