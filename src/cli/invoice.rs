//! `pulses invoice`: issue a billing period's invoices (see [`crate::billing`]).

use anyhow::Context;
use clap::{Args, ValueEnum};

use super::CommonArgs;
use crate::billing::{self, Outcome, Request};
use crate::kafka::startup;

/// The long `--help` text of the command.
pub const LONG_ABOUT: &str = "\
    Issues one invoice per tenant for a billing period (a UTC calendar month), from the period's \
    charges in the charges topic, to the compacted topic `tenant.invoices` (key `tenant_id|period`).\n\n\
    A tenant's invoice is issued only once its period is closed: stage 2's committed watermark on the \
    tenant's partition has passed the period's end plus grace (every window of the period is final), \
    and `pulses rate` has charged every final aggregate. Otherwise its outcome is `period_open`, with \
    what is still open.\n\n\
    Exactly once: each partition of the invoices topic has one issuer, the holder of the \
    transactional id `<application_id>-invoice-<partition>`; two runs at once (or a run and `POST \
    /v1/invoices` on `pulses serve`) fence each other and the loser finds the winner's invoice \
    (`already_issued`). A run killed at any point and started again issues each invoice once, \
    numbered gap-free per issuer.\n\n\
    A correction that lands after an invoice was issued (a late pulse's revision) never changes it: \
    the run reports the pending adjustment, and `--adjustments` issues it as a credit or debit note \
    referencing the invoice.\n\n\
    Exit status: 0 when every tenant's invoice is issued (now or before) or it had nothing to bill; \
    2 when some tenant's period is still open; 1 when some tenant's charges could not make an \
    invoice, or the run failed.";

#[derive(Debug, Args)]
pub struct InvoiceArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Billing period, a UTC calendar month: YYYY-MM (e.g. 2026-11)
    #[arg(long, value_name = "YYYY-MM")]
    period: String,
    /// Only this tenant [default: every tenant with charges in the period]
    #[arg(long, value_name = "TENANT_ID")]
    tenant: Option<String>,
    /// Also issue credit/debit notes for corrections after an invoice was issued
    #[arg(long)]
    adjustments: bool,
    /// Topic invoices are written to [config default: tenant.invoices]
    #[arg(long, env = "PULSES_INVOICES_TOPIC", value_name = "TOPIC")]
    invoices_topic: Option<String>,
    /// Topic the charges are read from [config default: tenant.rated.charges]
    #[arg(long, env = "PULSES_CHARGES_TOPIC", value_name = "TOPIC")]
    charges_topic: Option<String>,
    /// Report format on stdout: one line per tenant (text), or the whole report (json)
    #[arg(long, value_name = "FORMAT", default_value = "text")]
    format: Format,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Json,
}

pub fn run(args: InvoiceArgs) -> anyhow::Result<()> {
    let mut cfg = args.common.load()?;
    if let Some(t) = args.invoices_topic {
        cfg.topics.invoices = t;
    }
    if let Some(t) = args.charges_topic {
        cfg.topics.charges = t;
    }
    cfg.check()?;
    crate::rate::period::bounds(&args.period).map_err(anyhow::Error::msg)?;
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let no_probe = |_| {};
    super::connect(&cfg, &no_probe)?;
    startup::retry("creating the invoices topic", cfg.startup_timeout, &no_probe, || rt.block_on(billing::ensure_invoices_topic(&cfg)))
        .context("creating the invoices topic (the charges topic must exist: is `pulses rate` running?)")?;
    let request = Request { period: args.period, tenant: args.tenant, adjustments: args.adjustments };
    let report = billing::issue(&cfg, &request)?;
    match args.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Format::Text => {
            for o in &report.outcomes {
                println!("{}\t{}", o.tenant_id, describe(&o.outcome));
            }
        }
    }
    let issued = report.count(|o| matches!(o, Outcome::Issued(_)));
    let before = report.count(|o| matches!(o, Outcome::AlreadyIssued { .. }));
    let pending = report.count(|o| matches!(o, Outcome::AlreadyIssued { adjustment_pending: Some(_), .. }));
    let open = report.count(|o| matches!(o, Outcome::PeriodOpen { .. }));
    let failed = report.count(|o| matches!(o, Outcome::Failed { .. }));
    let [p50, p99, max] = report.latency_ms;
    eprintln!(
        "invoice {}: {issued} issued, {before} issued before ({pending} with an adjustment pending), {open} period open, \
         {failed} failed; {} charges read; closing {} ms, charges {} ms, issuing {} ms; per document p50/p99/max \
         {p50:.1}/{p99:.1}/{max:.1} ms",
        report.period, report.charges_read, report.closing_ms, report.charges_ms, report.issue_ms
    );
    if failed > 0 {
        anyhow::bail!("{failed} tenant(s) could not be invoiced (see their reasons above)");
    }
    if open > 0 {
        eprintln!("{open} tenant(s)' period is still open: run again once it closes");
        std::process::exit(2);
    }
    Ok(())
}

fn describe(o: &Outcome) -> String {
    match o {
        Outcome::Issued(doc) => format!("issued\t{} {} {} {} {}", doc.kind.as_str(), doc.display_number(), doc.invoice_id, doc.total, doc.currency),
        Outcome::AlreadyIssued { invoice_id, number, adjustment_pending } => match adjustment_pending {
            Some(total) => format!("already_issued\t{number} {invoice_id} (adjustment pending: {total}; issue it with --adjustments)"),
            None => format!("already_issued\t{number} {invoice_id}"),
        },
        Outcome::PeriodOpen { reason } => format!("period_open\t{reason}"),
        Outcome::NothingToBill => "nothing_to_bill".to_owned(),
        Outcome::Failed { reason } => format!("failed\t{reason}"),
    }
}
