"""The invoice-run benchmark (SPEC §9: 10,000 customers in under 5 minutes, under
100 ms and 1 MB per invoice), against the real stack on fresh topics.

1. `pulses run` (one window: `day`) and `pulses rate --window day` (release builds)
   start on fresh topics of the local broker.
2. One pulse per tenant, product and day of the month is produced, day by day:
   TENANTS x PRODUCTS x DAYS final day aggregates, each charged once.
3. Once `pulses rate` has committed every aggregate, `pulses invoice --period P` runs
   and is timed: wall time, its own step timings and per-document latency (from its
   report), and peak RSS (getrusage of the finished child).

Prints one JSON summary (and writes it with --out). Not a pass/fail test: the targets
are stated beside the figures.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from confluent_kafka import Consumer, Producer, TopicPartition

# Four products of topology/price-book.toml, with a daily amount each.
PRODUCTS = [
    ("api.requests", "request", "1200"),
    ("storage.standard", "GB", "35.5"),
    ("compute.vcpu", "vCPU-s", "86400"),
    ("network.egress", "GB", "0.75"),
]
NOV_2026 = 1_793_491_200_000  # 2026-11-01T00:00:00Z
DAY = 86_400_000


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rfc3339(ms):
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pulses-bin", required=True)
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--tenants", type=int, default=10_000)
    ap.add_argument("--products", type=int, default=4, choices=range(1, len(PRODUCTS) + 1))
    ap.add_argument("--days", type=int, default=30, choices=range(1, 31))
    ap.add_argument("--kill-once", action="store_true",
                    help="SIGKILL the first invoice run once its first records are written, then run it again and check "
                         "that every tenant has exactly one invoice")
    ap.add_argument("--out")
    args = ap.parse_args()

    app = f"bench-invoices-{int(time.time())}"
    work = tempfile.mkdtemp(prefix="pulses-bench-invoices-")
    topics = {k: f"{app}.{k}" for k in ["source", "grouped", "aggregated", "dlq", "late", "charges", "alerts", "invoices"]}
    cfg = os.path.join(work, "pulses.toml")
    with open(cfg, "w") as f:
        f.write(f'application_id = "{app}"\nbootstrap_servers = "{args.bootstrap}"\n')
        f.write('[aggregate]\ngrace = "5s"\nidle_timeout = "2s"\n\n[[windows]]\nname = "day"\nsize = "1d"\n\n[topics]\n')
        for k, v in topics.items():
            f.write(f'{k} = "{v}"\n')
    procs = []

    def start(name, *extra):
        out = open(os.path.join(work, f"{name}.log"), "w")
        p = subprocess.Popen([args.pulses_bin, name, "--config", cfg, "--state-dir", os.path.join(work, name),
                              "--http-addr", "127.0.0.1:0", *extra], stderr=out, stdout=out)
        procs.append(p)
        return p

    try:
        start("run")
        start("rate", "--window", "day", "--price-book", "topology/price-book.toml")
        expected = args.tenants * args.products * args.days
        log(f"producing {expected:,} pulses ({args.tenants:,} tenants x {args.products} products x {args.days} days) to {topics['source']}")
        producer = Producer({"bootstrap.servers": args.bootstrap, "linger.ms": 50, "batch.num.messages": 10000,
                             "queue.buffering.max.messages": 500000, "compression.type": "lz4"})
        t0 = time.time()
        for day in range(args.days):
            for t in range(args.tenants):
                for i, (sku, unit, amount) in enumerate(PRODUCTS[: args.products]):
                    at = NOV_2026 + day * DAY + 3_600_000 + t
                    value = (f'{{"pulse_id":"{t}-{i}-{day}","tenant_id":"tenant-{t:05d}","product_sku":"{sku}",'
                             f'"use_unit":"{unit}","used_amount":"{amount}","timestamp":"{rfc3339(at)}"}}')
                    while True:
                        try:
                            producer.produce(topics["source"], value.encode())
                            break
                        except BufferError:
                            producer.poll(0.05)
                producer.poll(0)
        left = producer.flush(120)
        if left:
            raise SystemExit(f"{left} pulses not delivered")
        log(f"produced in {time.time() - t0:.1f} s; waiting for every day aggregate to be charged")

        # Rated when the rate group has committed the aggregated topic's end.
        watcher = Consumer({"bootstrap.servers": args.bootstrap, "group.id": f"{app}.rate", "isolation.level": "read_committed",
                            "enable.auto.commit": False})
        t1 = time.time()
        charged = None
        while charged is None:
            time.sleep(2)
            md = watcher.list_topics(topics["aggregated"], timeout=10).topics.get(topics["aggregated"])
            if md is None or not md.partitions:
                continue
            parts = [TopicPartition(topics["aggregated"], p) for p in md.partitions]
            ends = [watcher.get_watermark_offsets(tp, timeout=10)[1] for tp in parts]
            done = watcher.committed(parts, timeout=10)
            records = sum(ends)
            # One transaction marker at most after the last record of each partition.
            if records >= expected and all(c.offset >= 0 and c.offset >= e - 1 for c, e in zip(done, ends)):
                charged = time.time() - t1
            elif time.time() - t1 > 3600:
                raise SystemExit("not charged within an hour")
        watcher.close()
        log(f"charged {time.time() - t0:.1f} s after the first pulse; running pulses invoice")

        killed = None
        if args.kill_once:
            killed = kill_mid_run(args, cfg, topics["invoices"], work)
            log(f"killed the first run with {killed['committed_before_restart']:,} invoices committed; running it again")
        t2 = time.time()
        out_path, err_path = os.path.join(work, "invoice.json"), os.path.join(work, "invoice.log")
        with open(out_path, "w") as out, open(err_path, "w") as err:
            child = subprocess.Popen([args.pulses_bin, "invoice", "--config", cfg, "--period", "2026-11", "--format", "json"],
                                     stdout=out, stderr=err)
            # wait4: this child's own peak RSS (getrusage would count every child ever waited for).
            _, status, usage = os.wait4(child.pid, 0)
        wall = time.time() - t2
        peak_rss_mib = usage.ru_maxrss / 1024
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            raise SystemExit(f"pulses invoice exited {code}: see {err_path}")
        with open(out_path) as f:
            report = json.load(f)
        outcomes = [o["outcome"] for o in report["outcomes"]]
        issued = outcomes.count("issued")
        sizes = [len(json.dumps(o)) for o in report["outcomes"] if o["outcome"] == "issued"]
        summary = {
            "tenants": args.tenants, "products": args.products, "days": args.days, "charges_read": report["charges_read"],
            "issued": issued, "other_outcomes": len(outcomes) - issued,
            "wall_s": round(wall, 2), "closing_ms": report["closing_ms"], "charges_ms": report["charges_ms"],
            "issue_ms": report["issue_ms"],
            "per_invoice_ms": dict(zip(["p50", "p99", "max"], report["latency_ms"])),
            "invoice_json_bytes_max": max(sizes) if sizes else 0,
            "peak_rss_mib": round(peak_rss_mib, 1),
            "killed_first_run": killed,
            # Committed records in tenant.invoices after the run: one per tenant, none twice.
            "invoice_records": committed_records(args.bootstrap, topics["invoices"]),
            "targets": {"wall_s": 300, "stretch_wall_s": 30, "per_invoice_p99_ms": 100, "per_invoice_bytes": 1_048_576},
        }
        print(json.dumps(summary, indent=2))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(summary, f, indent=2)
        before = killed["committed_before_restart"] if killed else 0
        if issued + outcomes.count("already_issued") != args.tenants or outcomes.count("already_issued") != before:
            raise SystemExit(f"{issued} issued and {outcomes.count('already_issued')} issued before for {args.tenants} tenants: see {err_path}")
        if summary["invoice_records"] != args.tenants:
            raise SystemExit(f"{summary['invoice_records']} committed invoice records for {args.tenants} tenants")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        log(f"logs in {work}")


def committed_records(bootstrap, topic):
    """Records a read_committed reader sees in `topic` (aborted transactions excluded)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-invoices-count", "isolation.level": "read_committed",
                  "enable.auto.commit": False, "enable.partition.eof": True, "auto.offset.reset": "earliest"})
    parts = [TopicPartition(topic, p, 0) for p in c.list_topics(topic, timeout=10).topics[topic].partitions]
    c.assign(parts)
    done, n = set(), 0
    while len(done) < len(parts):
        m = c.poll(1.0)
        if m is None:
            continue
        if m.error():
            if m.error().code() == -191:  # _PARTITION_EOF
                done.add(m.partition())
            continue
        n += 1
    c.close()
    return n


def kill_mid_run(args, cfg, invoices_topic, work):
    """Starts `pulses invoice`, SIGKILLs it as soon as its first records reach the invoices
    topic (committed or not), and says how many invoices were committed by then."""
    watch = Consumer({"bootstrap.servers": args.bootstrap, "group.id": "bench-invoices-watch", "isolation.level": "read_uncommitted"})
    with open(os.path.join(work, "invoice-killed.log"), "w") as err:
        child = subprocess.Popen([args.pulses_bin, "invoice", "--config", cfg, "--period", "2026-11"],
                                 stdout=subprocess.DEVNULL, stderr=err)
        t0 = time.time()
        while True:
            try:
                md = watch.list_topics(invoices_topic, timeout=1).topics.get(invoices_topic)
                written = sum(watch.get_watermark_offsets(TopicPartition(invoices_topic, p), timeout=1)[1]
                              for p in (md.partitions if md and not md.error else {}))
            except Exception:  # the topic does not exist yet
                written = 0
            if written > 0 or child.poll() is not None or time.time() - t0 > 600:
                break
            time.sleep(0.002)
        running = child.poll() is None
        child.kill()
        child.wait()
    watch.close()
    if not running:
        raise SystemExit("the first invoice run ended before it could be killed")
    return {"after_s": round(time.time() - t0, 2), "committed_before_restart": committed_records(args.bootstrap, invoices_topic)}


if __name__ == "__main__":
    main()
