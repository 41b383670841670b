"""The load, stress, spike and soak tests of `pulses serve` (issue 34, SPEC §11).

Run through scripts/load-test, which builds pulses (release), makes the venv and starts
the broker. This driver:

1. starts a real stack on fresh topics: `pulses run`, `pulses rate` and `pulses serve`
   (their logs go to the output directory), and makes an admin key and tenant keys for
   the ten biggest tenants with `pulses keys create`;
2. runs Locust headless (locustfile.py, two worker processes by default) with the
   scenario's user curve (workload.py), while a sampler records every second the serve
   process's RSS, open file descriptors and CPU, the CPU of run, rate, the broker and
   Locust, the machine's, and serve's own latency histogram and requests in flight
   from its /metrics (so a stage's client-side p99 can be told apart from serve's);
3. checks **nothing lost**: it reads the final `minute` aggregates from the aggregates
   topic with its own read_committed consumer as they come, until they equal an
   independent fold of what the clients sent and were answered 202 for (count and
   exact sum per tenant, sku and unit), with deliberate retries counted once and refused
   pulses not at all (or until --settle seconds pass: then it reports what differs);
4. writes a JSON report (figures per endpoint, per-second series, the checks) and a PNG
   chart, prints the verdict, and exits 1 if a check failed.

Targets (SPEC §11, §9): POST /v1/pulses p50 < 50 ms and p99 < 200 ms, GET /v1/usage and
GET /v1/charges p99 < 100 ms, errors < 0.1%, at the scenario's target rate; past capacity
only 429/503 with Retry-After and a JSON reason; p99 back under target within 30 s after
the load drops.
"""

import argparse
import bisect
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from decimal import Decimal
from pathlib import Path

import psutil

# Not locustfile: importing Locust monkey-patches this process for gevent, and the
# driver's threads and subprocesses then stall in gevent's hub.
from workload import PRODUCTS, SCENARIOS, TENANTS, stages

HERE = Path(__file__).resolve().parent
TARGETS = {  # route -> (p50 ms or None, p99 ms)
    "POST /v1/pulses": (50.0, 200.0),
    "GET /v1/usage": (None, 100.0),
    "GET /v1/charges": (None, 100.0),
}
MAX_ERROR_RATE = 0.001
RECOVERY_S = 30
CHART_BUCKET_S = 5
# Windows of the stack: "minute" is what the check folds; a short grace and idle timeout
# let the last windows close soon after the load stops.
CONFIG = """
[aggregate]
grace = "2s"
retention = "2h"
idle_timeout = "2s"

[[windows]]
name = "inflight"
size = "1s"

[[windows]]
name = "minute"
size = "1m"

[topics]
source = "{app}.source"
grouped = "{app}.grouped"
aggregated = "{app}.aggregated"
dlq = "{app}.dlq"
late = "{app}.late"
charges = "{app}.charges"
alerts = "{app}.alerts"
replay = "{app}.replay"
"""
PRICE_BOOK = """
currency = "USD"
rounding = {{ scale = 2, mode = "half_even" }}
{prices}
"""


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def percentile(sorted_values, q):
    """Nearest-rank percentile of an already sorted list (q in 0..100)."""
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


class Stack:
    """`pulses run`, `rate` and `serve` on fresh topics of application `app`."""

    def __init__(self, pulses_bin, bootstrap, out):
        self.bin, self.bootstrap, self.out = pulses_bin, bootstrap, out
        self.app = f"load-{int(time.time())}"
        self.dir = Path(tempfile.mkdtemp(prefix="pulses-load-"))
        self.config = self.dir / "pulses.toml"
        self.config.write_text(CONFIG.format(app=self.app))
        prices = "".join(f'\n[[prices]]\nproduct_sku = "{s}"\nuse_unit = "{u}"\nmodel = "flat"\nunit_price = "0.0001"\n'
                         for s, u in PRODUCTS)
        self.book = self.dir / "price-book.toml"
        self.book.write_text(PRICE_BOOK.format(prices=prices))
        self.procs = {}

    def common(self):
        return ["--config", str(self.config), "--bootstrap-servers", self.bootstrap, "--application-id", self.app]

    def start(self, name, args):
        logf = open(self.out / f"{name}.log", "w")
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info"))
        # A profiler around serve (e.g. PULSES_LOAD_SERVE_WRAPPER="heaptrack -o /tmp/serve"):
        # its samples are then of the wrapper's process, so the memory verdict does not hold.
        wrapper = os.environ.get("PULSES_LOAD_SERVE_WRAPPER", "").split() if name == "serve" else []
        p = subprocess.Popen([*wrapper, str(self.bin), *args, *self.common(), "--state-dir", str(self.dir / f"state-{name}")],
                             stdout=logf, stderr=subprocess.STDOUT, env=env)
        self.procs[name] = p
        return p

    def up(self):
        self.start("run", ["run", "--http-addr", "127.0.0.1:0"])
        self.start("rate", ["rate", "--price-book", str(self.book), "--http-addr", "127.0.0.1:0"])
        self.keys = {"admin": self.key(["--admin"]), "tenants": {}}
        for t in TENANTS[:10]:
            self.keys["tenants"][t] = self.key(["--tenant", t])
        port = free_port()
        self.addr = f"127.0.0.1:{port}"
        self.start("serve", ["serve", "--http-addr", self.addr])
        deadline = time.time() + 120
        while time.time() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise SystemExit(f"pulses {name} exited with {p.returncode} at start; see {self.out / (name + '.log')}")
            try:
                with urllib.request.urlopen(f"http://{self.addr}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.2)
        else:
            raise SystemExit(f"pulses serve not ready within 120 s; see {self.out / 'serve.log'}")
        keys_file = self.dir / "keys.json"
        keys_file.write_text(json.dumps(self.keys))
        return keys_file

    def key(self, args):
        out = subprocess.run([str(self.bin), "keys", "create", *args, *self.common()], capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise SystemExit(f"pulses keys create {' '.join(args)}: {out.stderr.strip()}")
        return json.loads(out.stdout)["secret"]

    def down(self):
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        # State dirs, config and keys: hundreds of MiB a run; the logs stay in `out`.
        shutil.rmtree(self.dir, ignore_errors=True)


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sampler(threading.Thread):
    """Every second: serve's RSS, FDs and CPU; run, rate, broker and Locust CPU; the machine's."""

    def __init__(self, stack, broker_pid):
        super().__init__(daemon=True)
        self.stack, self.samples, self.stopping = stack, [], threading.Event()
        self.procs = {name: psutil.Process(p.pid) for name, p in stack.procs.items()}
        if broker_pid:
            self.procs["broker"] = psutil.Process(broker_pid)
        self.locust = None  # set by run_locust once Locust is started
        self._locust_procs = {}  # pid -> psutil.Process, primed for cpu_percent

    def cpu_of(self, p):
        try:
            return p.cpu_percent(None)
        except psutil.Error:
            return None

    def run(self):
        for p in self.procs.values():
            self.cpu_of(p)
        psutil.cpu_percent(None)
        while not self.stopping.wait(1.0):
            s = {"t": round(time.time(), 3), "machine_cpu": psutil.cpu_percent(None)}
            for name, p in self.procs.items():
                s[f"{name}_cpu"] = self.cpu_of(p)
            if self.locust:
                total = 0.0
                for p in self.locust_tree():
                    total += self.cpu_of(p) or 0.0
                s["locust_cpu"] = total
            s.update(self.scrape())
            try:
                serve = self.procs["serve"]
                s["serve_rss_mb"] = serve.memory_info().rss / 2**20
                s["serve_fds"] = serve.num_fds()
            except psutil.Error:
                s["serve_alive"] = False
            self.samples.append(s)

    def scrape(self):
        """serve's own view of its latency (cumulative histogram buckets per route) and
        its requests in flight, from /metrics: what the generator's figures include on
        top of it is the generator's and the network's."""
        try:
            with urllib.request.urlopen(f"http://{self.stack.addr}/metrics", timeout=1) as r:
                text = r.read().decode()
        except OSError:
            return {}
        buckets, in_flight, views = defaultdict(list), None, 0.0
        for line in text.splitlines():
            if line.startswith("pulses_view_memory_bytes{"):
                # What serve's RocksDB views hold (memtables, block caches, table readers).
                views += float(line.rsplit(" ", 1)[1])
            if line.startswith("pulses_http_request_duration_seconds_bucket{"):
                labels, value = line[len("pulses_http_request_duration_seconds_bucket{"):].rsplit("} ", 1)
                fields = dict(f.split("=", 1) for f in labels.split(","))
                le = fields["le"].strip('"')
                buckets[fields["route"].strip('"')].append((float("inf") if le == "+Inf" else float(le), float(value)))
            elif line.startswith("pulses_http_requests_in_flight "):
                in_flight = float(line.split()[1])
        return {"server_buckets": dict(buckets), "serve_in_flight": in_flight, "serve_views_mb": views / 2**20}

    def locust_tree(self):
        try:
            root = psutil.Process(self.locust.pid)
            for p in [root, *root.children(recursive=True)]:
                if p.pid not in self._locust_procs:
                    self._locust_procs[p.pid] = p
                    p.cpu_percent(None)
        except psutil.Error:
            pass
        return list(self._locust_procs.values())


def run_locust(args, stack, keys_file, results, sampler):
    env = dict(os.environ, PULSES_LOAD_KEYS=str(keys_file), PULSES_LOAD_OUT=str(results), PULSES_LOAD_SCENARIO=args.scenario,
               PULSES_LOAD_DURATION=str(args.duration), PULSES_LOAD_USERS=str(args.users),
               PULSES_LOAD_USER_RATE=str(args.rate / args.users), PYTHONPATH=str(HERE))
    cmd = [sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless", "--host", f"http://{stack.addr}",
           "--only-summary", "--stop-timeout", "10", "--loglevel", "WARNING", "--exit-code-on-error", "0"]
    if args.processes > 1:
        cmd += ["--processes", str(args.processes)]
    log(f"locust: scenario {args.scenario}, {args.users} users at {args.rate / args.users:g} requests/s each"
        f" ({args.rate:g}/s), {args.processes} process(es)")
    with open(args.out_dir / "locust.log", "w") as logf:
        p = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, cwd=HERE)
        sampler.locust = p
        p.wait()
    if p.returncode not in (0, 1):
        raise SystemExit(f"locust exited with {p.returncode}; see {args.out_dir / 'locust.log'}")


def merge(results, processes):
    """What every Locust worker process wrote, once all of them have (up to 120 s)."""
    deadline = time.time() + 120
    while len(list(results.glob("process-*.json"))) < processes and time.time() < deadline:
        time.sleep(0.5)
    files = sorted(results.glob("process-*.json"))
    if len(files) < processes:
        raise SystemExit(f"{len(files)} of {processes} Locust processes wrote their results to {results}")
    acked, refused, uncertain, requests, retries = {}, {}, {}, [], 0
    for f in files:
        d = json.loads(f.read_text())
        for into, rows in ((acked, d["acked"]), (refused, d["refused"]), (uncertain, d["uncertain"])):
            for i, t, s, u, a in rows:
                into[i] = (t, s, u, Decimal(a))
        requests += d["requests"]
        retries += d["deliberate_retries"]
    for i in acked:
        refused.pop(i, None)
        uncertain.pop(i, None)
    requests.sort()
    return acked, refused, uncertain, requests, retries


def fold(pulses):
    out = defaultdict(lambda: [Decimal(0), 0])
    for t, s, u, a in pulses.values():
        out[(t, s, u)][0] += a
        out[(t, s, u)][1] += 1
    return out


class FinalMinutes:
    """The aggregates topic read with a read_committed consumer of its own, kept open:
    the latest revision of every `minute` aggregate so far."""

    def __init__(self, bootstrap, topic):
        from confluent_kafka import Consumer, TopicPartition
        self.topic = topic
        self.c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"load-check-{time.time()}", "enable.auto.commit": False,
                           "isolation.level": "read_committed", "enable.partition.eof": True})
        self.partitions = list(self.c.list_topics(topic, timeout=10).topics[topic].partitions)
        self.c.assign([TopicPartition(topic, p, 0) for p in self.partitions])
        self.latest = {}

    def catch_up(self):
        """Reads until every partition is at its end."""
        from confluent_kafka import KafkaError
        pending = set(self.partitions)
        while pending:
            m = self.c.poll(5)
            if m is None:
                continue
            if m.error():
                if m.error().code() == KafkaError._PARTITION_EOF:
                    pending.discard(m.partition())
                    continue
                raise SystemExit(f"reading {self.topic}: {m.error()}")
            pending.add(m.partition())
            a = json.loads(m.value())
            if a["window"] != "minute":
                continue
            held = self.latest.get(a["aggregate_id"])
            if held is None or a["revision"] >= held["revision"]:
                self.latest[a["aggregate_id"]] = a

    def totals(self):
        """{(tenant, sku, unit): [sum, count]} of the final ones, and how many are not final."""
        out, not_final = defaultdict(lambda: [Decimal(0), 0]), 0
        for a in self.latest.values():
            if not a["final"]:
                not_final += 1
                continue
            k = (a["tenant_id"], a["product_sku"], a["use_unit"])
            out[k][0] += Decimal(a["total_amount"])
            out[k][1] += a["pulse_count"]
        return out, not_final

    def close(self):
        self.c.close()


def check_nothing_lost(args, stack, acked, refused, uncertain):
    """Reads the final aggregates as they come until they equal the fold of what was
    acknowledged (polled every 2 s, up to --settle seconds), then compares."""
    expected, maybe, never = fold(acked), fold(uncertain), fold(refused)
    reader = FinalMinutes(args.bootstrap, f"{stack.app}.aggregated")
    deadline = time.time() + args.settle
    try:
        while True:
            reader.catch_up()
            result = compare(expected, maybe, never, *reader.totals())
            if result["ok"] or time.time() > deadline:
                return result
            log(f"waiting for the pipeline: {result['counted_pulses']} of {result['acknowledged_pulses']} pulses counted, "
                f"{result['windows_not_final']} windows not final")
            time.sleep(2)
    finally:
        reader.close()


def compare(expected, maybe, refused, got, not_final):
    lost = double = 0
    wrong = []
    for k in set(expected) | set(got) | set(maybe):
        e_sum, e_n = expected.get(k, (Decimal(0), 0))
        g_sum, g_n = got.get(k, (Decimal(0), 0))
        m_sum, m_n = maybe.get(k, (Decimal(0), 0))
        extra = g_n - e_n
        if extra < 0:
            lost += -extra
        elif extra > m_n:
            double += extra - m_n
        if extra == 0 and g_sum != e_sum or extra < 0 or extra > m_n:
            wrong.append({"key": list(k), "expected_sum": str(e_sum), "expected_count": e_n, "counted_sum": str(g_sum),
                          "counted_count": g_n, "uncertain_count": m_n})
    n_expected = sum(n for _, n in expected.values())
    n_got = sum(n for _, n in got.values())
    return {
        "ok": not wrong and not_final == 0,
        "acknowledged_pulses": n_expected,
        "counted_pulses": n_got,
        "uncertain_pulses": sum(n for _, n in maybe.values()),
        "refused_pulses": sum(n for _, n in refused.values()),
        "lost": lost,
        "double_counted": double,
        "mismatched_keys": wrong[:20],
        "windows_not_final": not_final,
        "keys": len(expected),
    }


def summarise(requests, t0, t1):
    """Per route over [t0, t1): count, errors, p50/p95/p99/max, requests/s."""
    by = defaultdict(list)
    for t, name, ms, status, informative in requests:
        if t0 <= t < t1:
            by[name].append((ms, status, informative))
    out = {}
    for name, rows in sorted(by.items()):
        lat = sorted(ms for ms, _, _ in rows)
        ok = sum(1 for _, status, _ in rows if 200 <= status < 300)
        out[name] = {
            "requests": len(rows),
            "errors": len(rows) - ok,
            "error_rate": (len(rows) - ok) / len(rows),
            "statuses": {str(s): n for s, n in sorted(count_by(st for _, st, _ in rows).items())},
            "uninformative_refusals": sum(1 for _, st, inf in rows if st in (429, 503) and not inf),
            "requests_per_s": len(rows) / max(t1 - t0, 1e-9),
            "p50_ms": percentile(lat, 50), "p95_ms": percentile(lat, 95), "p99_ms": percentile(lat, 99), "max_ms": lat[-1],
        }
    return out


def count_by(items):
    d = defaultdict(int)
    for i in items:
        d[i] += 1
    return d


def series(requests, t0, bucket):
    """Per bucket: per-route p50/p99, requests/s and errors/s."""
    rows = defaultdict(lambda: defaultdict(list))
    for t, name, ms, status, _ in requests:
        rows[int((t - t0) // bucket)][name].append((ms, status))
    out = []
    for b in sorted(rows):
        point = {"t": b * bucket, "routes": {}}
        for name, rs in rows[b].items():
            lat = sorted(ms for ms, _ in rs)
            point["routes"][name] = {"p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99), "per_s": len(rs) / bucket,
                                     "errors_per_s": sum(1 for _, st in rs if not 200 <= st < 300) / bucket}
        out.append(point)
    return out


def server_quantiles(samples, t0, t1, q=99):
    """Per route: the upper bound (ms) of serve's own latency histogram bucket that holds
    the q-th percentile of the requests it answered in [t0, t1), from the difference of
    the /metrics scrapes around that span (buckets double from 1 ms, so the figure is
    an upper bound within a factor of two)."""
    scraped = [s for s in samples if "server_buckets" in s]
    before = [s for s in scraped if s["t"] <= t0]
    after = [s for s in scraped if s["t"] <= t1]
    if not after:
        return {}
    first, last = (before[-1]["server_buckets"] if before else {}), after[-1]["server_buckets"]
    out = {}
    for route, rows in last.items():
        start = dict(first.get(route, []))
        counts = [(le, n - start.get(le, 0)) for le, n in rows]
        total = counts[-1][1]
        if total <= 0:
            continue
        le = next(le for le, n in counts if n >= total * q / 100)
        out[route] = {"requests": int(total), f"p{q}_ms_at_most": None if le == float("inf") else le * 1000}
    return out


def recovery(requests, drop_at, end):
    """Seconds after `drop_at` from which on every route's p99, over all the requests
    sent from then to the end, is under target; None if never. By send time (completion
    minus latency): a request sent into the overload and answered after the drop is
    the overload's, not the recovery's."""
    sent = defaultdict(list)
    for t, name, ms, _, _ in requests:
        if name in TARGETS:
            sent[name].append((t - ms / 1000, ms))
    for rows in sent.values():
        rows.sort()
    for s in range(0, max(int(end - drop_at), 0)):
        start = drop_at + s
        ok = True
        for name, rows in sent.items():
            lat = sorted(ms for at, ms in rows[bisect.bisect_left(rows, (start, -1.0)):])
            if lat and percentile(lat, 99) >= TARGETS[name][1]:
                ok = False
                break
        if ok:
            return s
    return None


def chart(path, requests, samples, t0, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pts = series(requests, t0, CHART_BUCKET_S)
    fig, ax = plt.subplots(4, 1, figsize=(11, 13), sharex=True)
    for route in TARGETS:
        xs = [p["t"] for p in pts if route in p["routes"]]
        ax[0].plot(xs, [p["routes"][route]["p99_ms"] for p in pts if route in p["routes"]], label=f"{route} p99")
        ax[0].plot(xs, [p["routes"][route]["p50_ms"] for p in pts if route in p["routes"]], "--", label=f"{route} p50")
        ax[1].plot(xs, [p["routes"][route]["per_s"] for p in pts if route in p["routes"]], label=f"{route}")
        ax[1].plot(xs, [p["routes"][route]["errors_per_s"] for p in pts if route in p["routes"]], ":", label=f"{route} errors")
    ax[0].axhline(200, color="grey", lw=0.6)
    ax[0].axhline(100, color="grey", lw=0.6, ls="--")
    ax[0].set_yscale("log")
    ax[0].set_ylabel("latency ms (5 s buckets)")
    ax[1].set_ylabel("requests/s")
    xs = [s["t"] - t0 for s in samples]
    ax[2].plot(xs, [s.get("serve_rss_mb") for s in samples], label="serve RSS MiB")
    ax[2].plot(xs, [s.get("serve_views_mb") for s in samples], label="of which RocksDB views MiB")
    ax2 = ax[2].twinx()
    ax2.plot(xs, [s.get("serve_fds") for s in samples], color="tab:red", label="serve open fds")
    ax2.set_ylabel("fds")
    ax[2].set_ylabel("MiB")
    for name in ("serve", "run", "rate", "broker", "locust"):
        ax[3].plot(xs, [s.get(f"{name}_cpu") for s in samples], label=f"{name} CPU %")
    ax[3].plot(xs, [s.get("machine_cpu", 0) * psutil.cpu_count() for s in samples], "k:", label="machine CPU % (of one core)")
    ax[3].set_ylabel("CPU % of one core")
    ax[3].set_xlabel("seconds")
    for a in (ax[0], ax[1], ax[2], ax[3]):
        a.legend(fontsize=7, loc="upper left")
    ax2.legend(fontsize=7, loc="upper right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def phases(args, requests, samples, t0, t1):
    """Per stage of the scenario's user curve (skipping each stage's first 5 s of
    ramping): users, requests/s, client p50/p99 and errors per route, serve's own p99
    bound, and the mean CPU of each process (% of one core)."""
    out, start = [], t0
    for end, users, _ in stages(args.scenario, args.users, args.duration):
        a, b = start + 5, min(t0 + end, t1)
        start = t0 + end
        if b <= a:
            continue
        routes = summarise(requests, a, b)
        window = [s for s in samples if a <= s["t"] < b]
        cpu = {n: round(sum(s.get(f"{n}_cpu") or 0 for s in window) / max(len(window), 1), 1)
               for n in ("serve", "run", "rate", "broker", "locust")}
        out.append({
            "from_s": round(a - t0), "to_s": round(b - t0), "users": users,
            "requests_per_s": round(sum(r["requests_per_s"] for r in routes.values()), 1),
            "routes": {n: {k: r[k] for k in ("requests_per_s", "p50_ms", "p99_ms", "max_ms", "errors", "statuses")} for n, r in routes.items()},
            "serve_p99_ms_at_most": {n: q["p99_ms_at_most"] for n, q in server_quantiles(samples, a, b).items() if n.startswith("/v1/")},
            "serve_in_flight_max": max((s.get("serve_in_flight") or 0 for s in window), default=None),
            "cpu_percent_of_one_core": cpu,
            "machine_cpu_percent": round(sum(s["machine_cpu"] for s in window) / max(len(window), 1), 1),
        })
    return out


def verdict(args, summary, nothing_lost, samples, requests, t0, t1, drops):
    checks = []

    def check(name, ok, detail):
        checks.append({"check": name, "ok": bool(ok), "detail": detail})

    steady = args.scenario in ("sustained", "soak", "ci")
    if steady:
        # The steady part: for ci its first 60 s, skipping the first 5 s of connection set-up.
        s0, s1 = t0 + 5, (t0 + 60 if args.scenario == "ci" else t1)
        steady_sum = summarise(requests, s0, s1)
        total_rate = sum(r["requests_per_s"] for r in steady_sum.values())
        check("throughput", total_rate >= 0.95 * args.rate, f"{total_rate:.0f} requests/s for a target of {args.rate:g}")
        for route, (p50, p99) in TARGETS.items():
            r = steady_sum.get(route)
            if r is None:
                check(f"{route} answered", False, "no request")
                continue
            check(f"{route} p99", r["p99_ms"] < p99, f"{r['p99_ms']:.1f} ms (target < {p99:g})")
            if p50:
                check(f"{route} p50", r["p50_ms"] < p50, f"{r['p50_ms']:.1f} ms (target < {p50:g})")
            check(f"{route} errors", r["error_rate"] < MAX_ERROR_RATE, f"{r['errors']} of {r['requests']} ({r['error_rate']:.3%})")
        window = [s for s in samples if s0 <= s["t"] < s1]
        if window:
            sut = [sum(s.get(f"{n}_cpu") or 0 for n in ("serve", "run", "rate", "broker")) / psutil.cpu_count() for s in window]
            check("CPU of the stack", sum(sut) / len(sut) < 80, f"{sum(sut) / len(sut):.0f}% of the machine on average "
                  f"(serve, run, rate and the broker; the machine {sum(s['machine_cpu'] for s in window) / len(window):.0f}%)")
            # Over minutes, not ci's one. serve's RocksDB views fill their memtables and
            # block caches first (capped by configuration) and their table readers grow with
            # the data they keep: that is data, reported beside the check. What is left of
            # RSS without them is what a leak would show in.
            rest = [s["serve_rss_mb"] - s.get("serve_views_mb", 0) for s in window if "serve_rss_mb" in s]
            views = [s["serve_views_mb"] for s in window if "serve_views_mb" in s]
            if len(rest) >= 240:
                q = len(rest) // 4
                early, late = sum(rest[q:2 * q]) / q, sum(rest[-q:]) / q
                vq = len(views) // 4
                vearly, vlate = (sum(views[vq:2 * vq]) / vq, sum(views[-vq:]) / vq) if vq else (0, 0)
                check("no memory leak", late <= early * 1.10 + 8,
                      f"serve RSS without its RocksDB views {early:.0f} MiB in the second quarter, {late:.0f} MiB in the last "
                      f"(the views {vearly:.0f} -> {vlate:.0f} MiB)")
    for route, r in summary.items():
        check(f"{route} refusals informative", r["uninformative_refusals"] == 0,
              f"{r['uninformative_refusals']} 429/503 without Retry-After and a JSON reason; statuses {r['statuses']}")
    alive = all(s.get("serve_alive", True) for s in samples)
    check("serve alive", alive, "the serve process answered to the end" if alive else "the serve process died")
    rss = [s["serve_rss_mb"] for s in samples if "serve_rss_mb" in s]
    fds = [s["serve_fds"] for s in samples if "serve_fds" in s]
    if rss:
        check("memory bounded", max(rss) < args.max_rss_mb, f"serve RSS peak {max(rss):.0f} MiB (bound {args.max_rss_mb} MiB); fds peak {max(fds)}")
    for drop in drops:
        took = recovery(requests, t0 + drop, t1)
        check(f"recovery after the drop at {drop} s", took is not None and took <= RECOVERY_S,
              f"p99 under target {took} s after the load dropped" if took is not None else "p99 never got back under target")
    check("nothing lost", nothing_lost["ok"],
          f"{nothing_lost.get('acknowledged_pulses')} pulses answered 202, {nothing_lost.get('counted_pulses')} counted; "
          f"{nothing_lost.get('lost')} lost, {nothing_lost.get('double_counted')} double-counted, "
          f"{nothing_lost.get('refused_pulses')} refused (never counted), {nothing_lost.get('uncertain_pulses')} uncertain"
          + (f"; {nothing_lost.get('detail')}" if nothing_lost.get("detail") else ""))
    return checks


DROPS = {"stress": [300], "spike": [120], "ci": [80]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", required=True, choices=SCENARIOS)
    ap.add_argument("--duration", type=float, help="seconds, for sustained (default 600) and soak (default 7200)")
    ap.add_argument("--users", type=int, help="users (default 100; soak 10)")
    ap.add_argument("--rate", type=float, help="target requests/s of all users at --users (default 1000; soak 100)")
    ap.add_argument("--processes", type=int, default=2, help="Locust worker processes (default 2: one Python process cannot drive a spike)")
    ap.add_argument("--out", type=Path, required=True, help="the JSON report; the chart and logs go beside it")
    ap.add_argument("--pulses-bin", type=Path, required=True)
    ap.add_argument("--bootstrap", default="127.0.0.1:9092")
    ap.add_argument("--broker-pid", type=int)
    ap.add_argument("--settle", type=float, default=180, help="seconds to wait for the pipeline after the load (default 180)")
    ap.add_argument("--max-rss-mb", type=int, default=512, help="the stated bound of serve's memory (default 512 MiB)")
    args = ap.parse_args()
    args.out = args.out.resolve()  # Locust runs in this directory, not the caller's
    soak = args.scenario == "soak"
    args.duration = args.duration or (7200 if soak else 600)
    args.users = args.users or (10 if soak else 100)
    args.rate = args.rate or (100 if soak else 1000)
    args.out_dir = args.out.with_suffix("")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    results = args.out_dir / "processes"
    results.mkdir(exist_ok=True)
    for f in results.glob("process-*.json*"):
        f.unlink()

    stack = Stack(args.pulses_bin, args.bootstrap, args.out_dir)
    try:
        keys_file = stack.up()
        log(f"stack up: application {stack.app}, serve on {stack.addr}")
        sampler = Sampler(stack, args.broker_pid)
        sampler.start()
        t0 = time.time()
        run_locust(args, stack, keys_file, results, sampler)
        t1 = time.time()
        sampler.stopping.set()
        sampler.join()
        acked, refused, uncertain, requests, retries = merge(results, args.processes)
        log(f"load done in {t1 - t0:.0f} s: {len(requests)} requests, {len(acked)} pulses acknowledged; checking the totals")
        nothing_lost = check_nothing_lost(args, stack, acked, refused, uncertain)
    finally:
        stack.down()
    summary = summarise(requests, t0, t1 + 1)
    checks = verdict(args, summary, nothing_lost, sampler.samples, requests, t0, t1, DROPS.get(args.scenario, []))
    stage_rows = phases(args, requests, sampler.samples, t0, t1)
    chart_path = args.out.with_suffix(".png")
    chart(chart_path, requests, sampler.samples, t0, f"pulses serve, {args.scenario}: {args.users} users, target {args.rate:g} requests/s")
    cpu = lambda n: [s.get(f"{n}_cpu") or 0 for s in sampler.samples]
    report = {
        "scenario": args.scenario, "users": args.users, "target_rate": args.rate, "duration_s": round(t1 - t0, 1),
        "locust_processes": args.processes, "application_id": stack.app, "machine_cores": psutil.cpu_count(),
        "routes": summary, "nothing_lost": nothing_lost, "deliberate_retries": retries,
        "cpu_mean_percent_of_one_core": {n: round(sum(cpu(n)) / max(len(cpu(n)), 1), 1) for n in ("serve", "run", "rate", "broker", "locust")},
        "serve_rss_mb_peak": max((s.get("serve_rss_mb", 0) for s in sampler.samples), default=None),
        "serve_fds_peak": max((s.get("serve_fds", 0) for s in sampler.samples), default=None),
        "serve_views_mb_peak": max((s.get("serve_views_mb", 0) for s in sampler.samples), default=None),
        "phases": stage_rows,
        "checks": checks, "ok": all(c["ok"] for c in checks),
        "series": series(requests, t0, CHART_BUCKET_S), "samples": sampler.samples,
        "chart": str(chart_path),
    }
    args.out.write_text(json.dumps(report, indent=1))
    print(f"\npulses load test: {args.scenario}, {args.users} users, target {args.rate:g} requests/s, {t1 - t0:.0f} s")
    for route, r in summary.items():
        print(f"  {route:<17} {r['requests']:>8} requests {r['requests_per_s']:>7.1f}/s  p50 {r['p50_ms']:>7.1f} ms  "
              f"p99 {r['p99_ms']:>7.1f} ms  max {r['max_ms']:>7.1f} ms  errors {r['errors']} {r['statuses']}")
    print(f"  CPU (% of one core, mean): {report['cpu_mean_percent_of_one_core']}")
    print("  by stage: seconds, users, requests/s; POST /v1/pulses p50/p99 ms (serve's own p99 at most); CPU % of the machine")
    for p in stage_rows:
        post = p["routes"].get("POST /v1/pulses", {})
        print(f"    {p['from_s']:>4}-{p['to_s']:<4} {p['users']:>5} users {p['requests_per_s']:>7.1f}/s  "
              f"p50 {post.get('p50_ms') or 0:>7.1f}  p99 {post.get('p99_ms') or 0:>7.1f} "
              f"(serve <= {p['serve_p99_ms_at_most'].get('/v1/pulses')})  errors {sum(r['errors'] for r in p['routes'].values())}  "
              f"machine CPU {p['machine_cpu_percent']:.0f}% (locust {p['cpu_percent_of_one_core']['locust']:.0f}% of a core)")
    for c in checks:
        print(f"  [{'ok' if c['ok'] else 'FAILED'}] {c['check']}: {c['detail']}")
    print(f"report {args.out}, chart {chart_path}, logs {args.out_dir}")
    print("verdict: " + ("all targets held" if report["ok"] else "FAILED"))
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
