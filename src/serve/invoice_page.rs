//! The printable page of an invoice or adjustment (`GET /v1/invoices/{id}.html`): one
//! self-contained HTML document (styles inline, print-friendly), every value from the
//! issued record and escaped.

use std::fmt::Write;

use html_escape::encode_text as esc;

use crate::invoice::{Invoice, Kind};
use crate::pulse::time::format_ms;

/// The page of `doc`.
pub fn render(doc: &Invoice) -> String {
    let title = match doc.kind {
        Kind::Invoice => "Invoice",
        Kind::CreditNote => "Credit note",
        Kind::DebitNote => "Debit note",
    };
    let number = doc.display_number();
    let mut lines = String::new();
    for l in &doc.lines {
        let tiers: Vec<String> = l.tiers.iter().map(|t| format!("tier {}: {} × {}", t.tier, t.quantity, t.unit_price)).collect();
        let _ = write!(
            lines,
            "<tr class=\"line\"><td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"tiers\">{}</td><td class=\"num amount\">{}</td></tr>",
            esc(&l.product_sku),
            esc(&l.use_unit),
            esc(&l.quantity.to_string()),
            esc(&tiers.join("; ")),
            esc(&l.amount.to_string()),
        );
    }
    let adjusts = match &doc.adjusts {
        Some(original) => format!("<p>Adjusts invoice <code>{}</code> (adjustment {}).</p>", esc(original), doc.adjustment.unwrap_or(0)),
        None => String::new(),
    };
    format!(
        r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title} {number}</title>
<style>
  body {{ font: 14px/1.5 system-ui, sans-serif; color: #1d2330; margin: 32px auto; max-width: 820px; }}
  h1 {{ font-size: 22px; margin: 0 0 4px; }}
  table {{ border-collapse: collapse; width: 100%; margin-top: 16px; }}
  th, td {{ text-align: left; padding: 6px 8px; border-bottom: 1px solid #d8dbe0; vertical-align: top; }}
  td.num, th.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
  td.tiers {{ font-size: 12px; color: #4b5563; }}
  tfoot td {{ font-weight: 600; border-bottom: none; }}
  .meta {{ color: #4b5563; }}
  @media print {{ body {{ margin: 0; }} }}
</style>
</head>
<body>
<h1>{title} <span id="number">{number}</span></h1>
<p class="meta">Tenant <strong id="tenant">{tenant}</strong> · period <span id="period">{period}</span> ({start} to {end}) · issued {issued}</p>
<p class="meta">Id <code id="invoice-id">{id}</code> · {count} charges, the last <code>{last}</code></p>
{adjusts}
<table>
<thead><tr><th>product</th><th>unit</th><th class="num">quantity</th><th>tiers (unit prices)</th><th class="num">amount</th></tr></thead>
<tbody>{lines}</tbody>
<tfoot>
<tr><td colspan="4">Subtotal</td><td class="num" id="subtotal">{subtotal}</td></tr>
<tr><td colspan="4">Total ({currency})</td><td class="num" id="total">{total}</td></tr>
</tfoot>
</table>
</body>
</html>
"#,
        number = esc(&number),
        tenant = esc(&doc.tenant_id),
        period = esc(&doc.period),
        start = esc(&format_ms(doc.period_start)),
        end = esc(&format_ms(doc.period_end)),
        issued = esc(&format_ms(doc.issued_at)),
        id = esc(&doc.invoice_id),
        count = doc.charges.count,
        last = esc(&doc.charges.last_charge_id),
        subtotal = esc(&doc.subtotal.to_string()),
        total = esc(&doc.total.to_string()),
        currency = esc(&doc.currency),
    )
}
