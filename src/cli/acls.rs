//! `pulses acls`: the Kafka ACLs a command needs with this configuration (least
//! privilege on a cluster with an authorizer; README "Security").

use clap::{Args, ValueEnum};

use super::CommonArgs;
use crate::stage::acls::{self, Command};

pub const LONG_ABOUT: &str = "Print the Kafka ACLs a command needs with this configuration: which operations on \
which topics, consumer groups and transactional ids, for a cluster whose authorizer denies what no ACL allows \
(allow.everyone.if.no.acl.found=false). Derived from the same topology the commands run. --format kafka-acls prints \
one line of kafka-acls.sh arguments per resource, to run against the cluster as an administrator:

  pulses acls --principal User:pulses --format kafka-acls | while read -r line; do
    kafka-acls.sh --bootstrap-server BROKER --command-config admin.properties $line
  done";

#[derive(Debug, Args)]
pub struct AclsArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// The principal the command runs as: User:<SASL user name>, or User:<name the
    /// broker's ssl.principal.mapping.rules make of the client certificate>
    #[arg(long, value_name = "PRINCIPAL", default_value = "User:pulses")]
    principal: String,
    /// Which commands (repeat or comma-separate)
    #[arg(long = "command", value_enum, value_delimiter = ',', default_value = "run")]
    commands: Vec<Command>,
    /// `table` for people, `kafka-acls` for kafka-acls.sh arguments
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    Table,
    KafkaAcls,
}

pub fn run(args: AclsArgs) -> anyhow::Result<()> {
    let cfg = args.common.load()?;
    for command in args.commands {
        let needed = acls::needed(command, &cfg);
        match args.format {
            Format::Table => println!("{}", acls::table(&args.principal, command, &needed)),
            Format::KafkaAcls => print!("{}", acls::kafka_acls_lines(&args.principal, &needed)),
        }
    }
    Ok(())
}
