//! `pulses rerate`: re-rating jobs from the command line (see [`crate::billing::rerating`]).


use anyhow::Context;
use clap::Args;

use super::CommonArgs;
use crate::billing::rerating;
use crate::billing::BillingError;
use crate::rerating::{Job, Status};

/// The long `--help` text of the command.
pub const LONG_ABOUT: &str = "\
    Re-rates whole billing periods with a price book and shows what would change. A job's scope is \
    [--from, --to) (first instants of UTC months) and one tenant or all. The job is accepted by the \
    jobs' decider (the holder of the transactional id `<application_id>-rerating-jobs`, over the \
    one-partition log `<application_id>.rerating-jobs`) only if no queued or running job overlaps \
    its scope: otherwise it is refused with `rerating_in_progress` naming that job, wherever the \
    other was started (another `pulses rerate`, or `POST /v1/rerating-jobs` on any `pulses serve`).\n\n\
    The job replays the scope's pulses with the live code into its own topic \
    (`<application_id>.rerating.<job_id>.aggregated`), rates the final aggregates of --window with \
    the price book and a fresh ledger into `<application_id>.rerating.<job_id>.charges`, and \
    compares them with the live charges of the same scope: per tenant, period, sku and unit, the \
    billed and re-rated quantity and amount and their difference. The live topics are never \
    written.\n\n\
    Applying is a second, explicit step (--apply JOB_ID): per tenant and period with a difference, \
    a credit or debit note referencing its invoice (periods not invoiced yet are listed, not \
    billed). --status JOB_ID prints a job as the log has it.\n\n\
    Exit status: 0 when the job is done (or applied, or shown); 1 when it failed or was refused.";

#[derive(Debug, Args)]
pub struct RerateArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// First instant of the first period re-rated (RFC 3339, e.g. 2026-11-01T00:00:00Z)
    #[arg(long, value_name = "T0", required_unless_present_any = ["status", "apply"])]
    from: Option<String>,
    /// End of the scope, exclusive: the first instant of a period (RFC 3339)
    #[arg(long, value_name = "T1", required_unless_present_any = ["status", "apply"])]
    to: Option<String>,
    /// Only this tenant [default: every tenant]
    #[arg(long, value_name = "TENANT_ID")]
    tenant: Option<String>,
    /// Price book to re-rate with: a file, or a name (topology/<NAME>.toml)
    /// [default: topology/price-book.toml]
    #[arg(long, value_name = "FILE_OR_NAME")]
    price_book: Option<String>,
    /// Window size whose final aggregates are rated (as `pulses rate --window`)
    #[arg(long, value_name = "NAME", default_value = "minute")]
    window: String,
    /// Print the job JOB_ID and exit
    #[arg(long, value_name = "JOB_ID", conflicts_with_all = ["from", "to", "apply"])]
    status: Option<String>,
    /// Apply the diff of the done job JOB_ID: issue its credit and debit notes
    #[arg(long, value_name = "JOB_ID", conflicts_with_all = ["from", "to"])]
    apply: Option<String>,
}

pub fn run(args: RerateArgs) -> anyhow::Result<()> {
    let cfg = args.common.load()?;
    cfg.check()?;
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let shutdown = super::shutdown_on_signal(&rt);
    super::connect(&cfg, &|_| {})?;
    let job = if let Some(id) = &args.status {
        rerating::get(&cfg, id)?.with_context(|| format!("no re-rating job {id:?}"))?
    } else if let Some(id) = &args.apply {
        refused(rerating::apply(&cfg, id))?
    } else {
        let (from, to) = (args.from.as_deref().unwrap_or_default(), args.to.as_deref().unwrap_or_default());
        let req = rerating::JobRequest::parse(&cfg, from, to, args.tenant.clone(), args.price_book.as_deref(), Some(args.window.clone()))?;
        let job = refused(rerating::submit(&cfg, &req))?;
        eprintln!("rerate: job {} accepted; replaying and rating", job.job_id);
        rerating::run(&cfg, job, &shutdown)?
    };
    print(&job);
    if job.status == Status::Failed {
        anyhow::bail!("job {} failed: {}", job.job_id, job.reason.as_deref().unwrap_or("no reason recorded"));
    }
    Ok(())
}

/// A refusal (409 over HTTP) as the error the user reads.
fn refused(result: Result<Job, BillingError>) -> anyhow::Result<Job> {
    result.map_err(|e| match e {
        BillingError::Conflict { code, detail, .. } => anyhow::anyhow!("{code}: {detail}"),
        other => other.into(),
    })
}

fn print(job: &Job) {
    println!("job\t{}\t{:?}\t{}", job.job_id, job.status, job.reason.as_deref().unwrap_or(""));
    for l in job.diff.iter().flatten() {
        println!(
            "diff\t{}\t{}\t{}\t{}\tbilled {} for {}\trerated {} for {}\tdifference {} {}",
            l.tenant_id, l.period, l.product_sku, l.use_unit, l.billed_quantity, l.billed_amount, l.rerated_quantity,
            l.rerated_amount, l.difference, l.currency
        );
    }
    for n in &job.notes {
        println!("note\t{n}");
    }
    for p in &job.not_invoiced {
        println!("not_invoiced\t{p}");
    }
}
