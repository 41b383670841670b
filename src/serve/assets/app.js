// The usage dashboard: asks for an API key, then every few seconds reads /v1/usage
// and /v1/quota/check and redraws. Totals are shown as the server's exact decimal
// strings; only the chart turns them into numbers.
"use strict";

const REFRESH_MS = 3000;
const $ = (id) => document.getElementById(id);
let key = sessionStorage.getItem("pulses-key");
let me = null;
let chart = null;

async function api(path, options = {}) {
  const headers = { "X-API-Key": key, "Content-Type": "application/json", ...(options.headers || {}) };
  const res = await fetch(path, { ...options, headers });
  const body = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(`${res.status} ${body.error || ""}: ${body.detail || ""}`);
  return body;
}

async function signIn(event) {
  if (event) event.preventDefault();
  key = key || $("api-key").value.trim();
  try {
    me = await api("/v1/me");
  } catch (e) {
    sessionStorage.removeItem("pulses-key");
    key = null;
    $("login-error").textContent = `That key was refused (${e.message}).`;
    return;
  }
  sessionStorage.setItem("pulses-key", key);
  $("login").hidden = true;
  $("dashboard").hidden = false;
  $("tenant-field").hidden = !me.admin;
  $("window").replaceChildren(...me.windows.map(([name]) => new Option(name, name)));
  refresh();
  setInterval(refresh, REFRESH_MS);
}

function cell(text, numeric) {
  const td = document.createElement("td");
  td.textContent = text;
  if (numeric) td.className = "num";
  return td;
}

function rows(tbody, items, columns) {
  tbody.replaceChildren(...items.map((item) => {
    const tr = document.createElement("tr");
    columns.forEach(([field, numeric]) => tr.appendChild(cell(String(item[field]), numeric)));
    return tr;
  }));
}

function drawChart(windows) {
  const starts = [...new Set(windows.map((w) => w.window_start))].sort();
  const skus = [...new Set(windows.map((w) => `${w.product_sku} (${w.use_unit})`))].sort();
  const datasets = skus.map((label) => ({
    label,
    data: starts.map((s) => {
      const w = windows.find((x) => x.window_start === s && `${x.product_sku} (${x.use_unit})` === label);
      return w ? Number(w.total_amount) : null;
    }),
    spanGaps: true,
  }));
  const labels = starts.map((s) => s.replace("T", " ").replace(".000Z", "Z"));
  if (!chart) {
    chart = new Chart($("usage-chart"), { type: "line", data: { labels, datasets }, options: { animation: false } });
  } else {
    chart.data.labels = labels;
    chart.data.datasets = datasets;
    chart.update();
  }
}

async function drawQuotas(tenant, totals) {
  const bars = [];
  for (const t of totals) {
    const q = await api("/v1/quota/check", {
      method: "POST",
      body: JSON.stringify({ tenant_id: tenant, product_sku: t.product_sku, use_unit: t.use_unit, requested: "0" }),
    });
    if (q.limit === null) continue;
    const share = Number(q.limit) > 0 ? Math.min(100, (100 * Number(q.used)) / Number(q.limit)) : 100;
    const row = document.createElement("div");
    row.className = "quota";
    row.innerHTML = `<div>${t.product_sku} (${t.use_unit}): <span class="used"></span> of <span class="limit"></span> per ${q.period}</div>`;
    row.querySelector(".used").textContent = q.used;
    row.querySelector(".limit").textContent = q.limit;
    const bar = document.createElement("div");
    bar.className = q.allowed ? "bar" : "bar over";
    bar.innerHTML = `<div style="width:${share}%"></div>`;
    row.appendChild(bar);
    bars.push(row);
  }
  if (bars.length) $("quotas").replaceChildren(...bars);
}

// The tenant's invoices, each opening its printable page (GET /v1/invoices/{id}.html,
// fetched with the key) in the frame below the list.
async function drawInvoices(tenant) {
  const list = await api(`/v1/invoices?${new URLSearchParams({ tenant_id: tenant })}`);
  $("no-invoices").hidden = list.invoices.length > 0;
  $("invoices").tBodies[0].replaceChildren(...list.invoices.map((inv) => {
    const tr = document.createElement("tr");
    tr.appendChild(cell(`${inv.issuer}-${String(inv.number).padStart(6, "0")}`));
    tr.appendChild(cell(inv.kind.replace("_", " ")));
    tr.appendChild(cell(inv.period));
    tr.appendChild(cell(`${inv.total} ${inv.currency}`, true));
    tr.appendChild(cell(inv.issued_at));
    const td = document.createElement("td");
    const open = document.createElement("a");
    open.href = "#";
    open.className = "open-invoice";
    open.dataset.id = inv.invoice_id;
    open.textContent = "open";
    open.addEventListener("click", (e) => { e.preventDefault(); showInvoice(inv.invoice_id); });
    td.appendChild(open);
    tr.appendChild(td);
    return tr;
  }));
}

async function showInvoice(id) {
  const res = await fetch(`/v1/invoices/${encodeURIComponent(id)}.html`, { headers: { "X-API-Key": key } });
  if (!res.ok) {
    $("status").textContent = `invoice ${id}: ${res.status}`;
    return;
  }
  $("invoice-frame").srcdoc = await res.text();
  $("invoice-view").hidden = false;
}

async function refresh() {
  const tenant = me.admin ? $("tenant").value.trim() : me.tenant_id;
  if (!tenant) {
    $("status").textContent = "enter a tenant";
    return;
  }
  try {
    const params = new URLSearchParams({ tenant_id: tenant, window: $("window").value });
    const usage = await api(`/v1/usage?${params}`);
    drawChart(usage.windows);
    rows($("totals").tBodies[0], usage.totals, [["product_sku"], ["use_unit"], ["total_amount", true], ["pulse_count", true]]);
    const latest = usage.windows.slice(-50).reverse();
    rows($("latest").tBodies[0], latest,
      [["window_start"], ["product_sku"], ["use_unit"], ["total_amount", true], ["pulse_count", true], ["revision", true], ["final"]]);
    await drawQuotas(tenant, usage.totals);
    await drawInvoices(tenant);
    $("status").textContent = `as of ${usage.as_of.updated_at} (lag ${usage.as_of.lag})`;
    document.body.dataset.refreshed = String(Date.now());
  } catch (e) {
    $("status").textContent = `refresh failed: ${e.message}`;
  }
}

$("login").addEventListener("submit", signIn);
$("print-invoice").addEventListener("click", () => $("invoice-frame").contentWindow.print());
$("close-invoice").addEventListener("click", () => { $("invoice-view").hidden = true; });
if (key) signIn();
