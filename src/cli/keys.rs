//! `pulses keys`: create, list and revoke the API keys of `pulses serve` (SPEC §8).

use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};

use super::CommonArgs;
use crate::pulse::validate::identifier;
use crate::config::Config;
use crate::kafka::startup;
use crate::serve::key_table::{self, KeyTableError};
use crate::serve::keys::ApiKey;

pub const LONG_ABOUT: &str = "\
Manage the API keys of `pulses serve`. Keys live hashed (salted SHA-256 of a random
256-bit secret) in the compacted topic <application-id>.api-keys; every serve replica
sees a change within seconds. `create` prints the key as one JSON object, with its
secret: the only time the secret is shown. `list` prints one JSON object per key,
without secrets. `revoke` makes a key answer 401 from then on.";

#[derive(Debug, Args)]
pub struct KeysArgs {
    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, Subcommand)]
enum Action {
    /// Create a key for a tenant (or an admin key) and print it with its secret.
    Create {
        #[command(flatten)]
        common: CommonArgs,
        /// The tenant the key acts for (required unless --admin)
        #[arg(long, value_name = "TENANT")]
        tenant: Option<String>,
        /// An admin key: it acts for every tenant
        #[arg(long)]
        admin: bool,
        /// A name to recognise the key by in `pulses keys list`
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
    },
    /// List every key (id, tenant, admin, name, created, revoked), without secrets.
    List {
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Revoke a key: requests with it get 401 from then on.
    Revoke {
        #[command(flatten)]
        common: CommonArgs,
        /// The key id (`id` in `create`'s and `list`'s output)
        id: String,
    },
}

/// How long `list` and `revoke` may take to read the key topic.
const READ_WITHIN: Duration = Duration::from_secs(30);

pub fn run(args: KeysArgs) -> anyhow::Result<()> {
    let (Action::Create { common, .. } | Action::List { common } | Action::Revoke { common, .. }) = &args.action;
    let cfg = common.load()?;
    super::connect(&cfg, &|_| {})?;
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let now = || chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    match args.action {
        Action::Create { tenant, admin, name, .. } => {
            let tenant = match (tenant, admin) {
                (None, false) => bail!("a key needs --tenant TENANT, or --admin for one that acts for every tenant"),
                (Some(t), _) => Some(identifier("--tenant", Some(&t)).map_err(|r| anyhow::anyhow!("{}", r.detail))?),
                (None, true) => None,
            };
            let (key, new) = ApiKey::create(tenant, admin, name, now());
            rt.block_on(publish(&cfg, &key))?;
            println!("{}", serde_json::to_string(&new)?);
        }
        Action::List { .. } => {
            rt.block_on(ensure_topic(&cfg))?;
            let mut keys: Vec<ApiKey> = key_table::read_all(&cfg, READ_WITHIN)?.into_values().collect();
            keys.sort_by(|a, b| (&a.created_at, &a.id).cmp(&(&b.created_at, &b.id)));
            for key in keys {
                println!("{}", serde_json::to_string(&key.listed())?);
            }
        }
        Action::Revoke { id, .. } => {
            rt.block_on(ensure_topic(&cfg))?;
            let Some(mut key) = key_table::read_all(&cfg, READ_WITHIN)?.remove(&id) else {
                bail!("no key {id:?} in {}", key_table::topic(&cfg));
            };
            if let Some(at) = &key.revoked_at {
                eprintln!("key {id} was already revoked at {at}");
                return Ok(());
            }
            key.revoked_at = Some(now());
            rt.block_on(publish(&cfg, &key))?;
            eprintln!("key {id} revoked");
        }
    }
    Ok(())
}

/// The key topic exists, waiting for a broker still coming up (up to `startup_timeout`).
async fn ensure_topic(cfg: &Config) -> Result<String, KeyTableError> {
    startup::retry_async("creating the API key topic", cfg.startup_timeout, &|_| {}, || key_table::ensure_topic(cfg)).await
}

/// Writes `key`, waiting for a broker still coming up (up to `startup_timeout`).
async fn publish(cfg: &Config, key: &ApiKey) -> Result<(), KeyTableError> {
    startup::retry_async("writing the key", cfg.startup_timeout, &|_| {}, || key_table::publish(cfg, key)).await
}
