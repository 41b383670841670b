"""The meters benchmark (issue 33, point 6): CloudEvents against today's pulse path, and
meter queries over a month of minute windows. Real stack, release build, fresh topics on
the local broker; not a pass/fail test.

1. Ingest over HTTP: EVENTS CloudEvents through `POST /api/v1/events` and as many pulses
   through `POST /v1/pulses`, batches of 100, CLIENTS keep-alive connections; events/s
   and request latency (p50/p99) for each, on one `pulses serve`.
2. End to end: a backlog of EVENTS CloudEvents (one meter, two group-by properties:
   model and region) and one of as many pulses in the source topic, each processed by a
   fresh `pulses run` (the default four windows); events/s from its start until both
   stages committed the whole backlog, and the pulses process's CPU seconds.
3. Queries: one subject with an event every minute for 30 days (43,200 minute windows),
   then QUERIES queries of each kind: windowSize=MINUTE over the month (43,200 rows), DAY
   in Asia/Kolkata (a 30-minute offset: answered from the minute windows), DAY in UTC
   (from hourly windows) and the month's total; p50/p99/max latency of each.

Prints one JSON summary (and writes it with --out).
"""

import argparse
import http.client
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

from confluent_kafka import Consumer, Producer, TopicPartition

DAY = 86_400_000
MINUTE = 60_000

METER = """
[[meters]]
slug = "tokens"
event_type = "prompt"
aggregation = "sum"
value_property = "$.tokens"
group_by = { model = "$.model", region = "$.region" }
"""

WINDOWS = """
[[windows]]
name = "inflight"
size = "1s"

[[windows]]
name = "postflight"
size = "10s"

[[windows]]
name = "minute"
size = "1m"

[[windows]]
name = "hour"
size = "1h"
"""

MODELS = ["gpt-4", "mini", "o3", "haiku", "sonnet"]
REGIONS = ["eu-west-1", "us-east-1", "ap-south-1", "sa-east-1"]


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rfc3339(ms):
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"


def pct(xs, q):
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 2) if xs else None


class Stack:
    """Fresh topics and processes under one application id."""

    def __init__(self, args, name, config):
        self.args = args
        self.app = f"bench-meters-{name}-{int(time.time())}"
        self.work = tempfile.mkdtemp(prefix=f"pulses-bench-meters-{name}-")
        self.topics = {k: f"{self.app}.{k}" for k in ["source", "grouped", "aggregated", "dlq", "late"]}
        self.cfg = os.path.join(self.work, "pulses.toml")
        with open(self.cfg, "w") as f:
            f.write(f'application_id = "{self.app}"\nbootstrap_servers = "{args.bootstrap}"\n{config}\n[topics]\n')
            for k, v in self.topics.items():
                f.write(f'{k} = "{v}"\n')
        self.procs = {}

    def start(self, name, *extra):
        out = open(os.path.join(self.work, f"{name}.log"), "w")
        p = subprocess.Popen([self.args.pulses_bin, name, "--config", self.cfg, "--state-dir", os.path.join(self.work, name),
                              *extra], stderr=out, stdout=out)
        self.procs[name] = p
        return p

    def serve(self):
        port = free_port()
        self.start("serve", "--http-addr", f"127.0.0.1:{port}")
        self.addr = f"127.0.0.1:{port}"
        out = subprocess.run([self.args.pulses_bin, "keys", "create", "--config", self.cfg, "--admin"], capture_output=True,
                             text=True, check=True)
        self.key = json.loads(out.stdout.strip().splitlines()[-1])["secret"]
        wait("serve ready and the key loaded", 120, lambda: http_get(self.addr, self.key, "/api/v1/meters")[0] == 200)

    def stop(self):
        for p in self.procs.values():
            p.terminate()
        for p in self.procs.values():
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(what, timeout, probe, every=0.2):
    t0 = time.time()
    while not probe():
        if time.time() - t0 > timeout:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(every)


def http_get(addr, key, path):
    c = http.client.HTTPConnection(addr, timeout=120)
    try:
        c.request("GET", path, headers={"Authorization": f"Bearer {key}"})
        r = c.getresponse()
        return r.status, r.read()
    except OSError:
        return 0, b""
    finally:
        c.close()


def event(i, subject, at, rng):
    return {"specversion": "1.0", "id": f"e{i}", "source": "bench", "type": "prompt", "subject": subject, "time": rfc3339(at),
            "data": {"tokens": rng.randrange(1, 5000), "model": rng.choice(MODELS), "region": rng.choice(REGIONS)}}


def pulse(i, tenant, at, rng):
    return {"pulse_id": f"p{i}", "tenant_id": tenant, "product_sku": rng.choice(MODELS), "use_unit": rng.choice(REGIONS),
            "used_amount": rng.randrange(1, 5000), "timestamp": rfc3339(at)}


def ingest(addr, key, path, content_type, bodies, clients):
    """POSTs `bodies` over `clients` keep-alive connections: (wall s, latencies ms, statuses)."""
    lat, statuses, lock = [], {}, threading.Lock()
    todo = list(enumerate(bodies))

    def worker():
        c = http.client.HTTPConnection(addr, timeout=60)
        while True:
            with lock:
                if not todo:
                    break
                _, body = todo.pop()
            t = time.perf_counter()
            c.request("POST", path, body=body, headers={"Authorization": f"Bearer {key}", "Content-Type": content_type})
            r = c.getresponse()
            r.read()
            ms = (time.perf_counter() - t) * 1000
            with lock:
                lat.append(ms)
                statuses[r.status] = statuses.get(r.status, 0) + 1
        c.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return time.perf_counter() - t0, lat, statuses


def phase_ingest(args):
    stack = Stack(args, "ingest", METER + WINDOWS + '[aggregate]\ngrace = "5s"\nidle_timeout = "2s"\n')
    try:
        stack.serve()
        rng = random.Random(7)
        now = int(time.time() * 1000)
        out = {}
        for kind, path, ctype, make in [
            ("events", "/api/v1/events", "application/cloudevents-batch+json", event),
            ("pulses", "/v1/pulses", "application/json", pulse),
        ]:
            items = [make(i, f"tenant-{i % 100:03d}", now - rng.randrange(60_000), rng) for i in range(args.events)]
            bodies = [json.dumps(items[i:i + 100]).encode() for i in range(0, len(items), 100)]
            wall, lat, statuses = ingest(stack.addr, stack.key, path, ctype, bodies, args.clients)
            out[kind] = {"per_s": round(args.events / wall), "requests": len(bodies), "wall_s": round(wall, 2),
                         "request_ms": {"p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "max": round(max(lat), 1)},
                         "statuses": statuses}
            log(f"ingest {kind}: {out[kind]}")
        return out
    finally:
        stack.stop()


def produce(bootstrap, topic, values):
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 50, "batch.num.messages": 10000,
                  "queue.buffering.max.messages": 1_000_000, "compression.type": "lz4"})
    for v in values:
        while True:
            try:
                p.produce(topic, v)
                break
            except BufferError:
                p.poll(0.05)
        p.poll(0)
    if p.flush(300):
        raise SystemExit("not every record was delivered")


def committed_through(bootstrap, group, topic):
    """Whether `group` has committed every partition of `topic` to its end (a transaction
    marker at most after the last record)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        md = c.list_topics(topic, timeout=10).topics.get(topic)
        if md is None or md.error or not md.partitions:
            return False
        parts = [TopicPartition(topic, p) for p in md.partitions]
        ends = [c.get_watermark_offsets(tp, timeout=10)[1] for tp in parts]
        done = c.committed(parts, timeout=10)
        return all(e == 0 or (d.offset >= 0 and d.offset >= e - 1) for d, e in zip(done, ends))
    finally:
        c.close()


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def phase_end_to_end(args):
    out = {}
    rng = random.Random(11)
    now = int(time.time() * 1000)
    # One hour of event time, in order, so nothing is late: the same shape for both.
    for kind, make in [("events", event), ("pulses", pulse)]:
        stack = Stack(args, f"e2e-{kind}", METER + WINDOWS + '[aggregate]\ngrace = "5s"\nidle_timeout = "2s"\nretention = "2h"\n')
        try:
            base = now - 3_600_000
            values = [json.dumps(make(i, f"tenant-{i % 100:03d}", base + i * 3_600_000 // args.events, rng)).encode()
                      for i in range(args.events)]
            produce(args.bootstrap, stack.topics["source"], values)
            log(f"end to end {kind}: {len(values):,} records in {stack.topics['source']}; starting pulses run")
            t0 = time.time()
            run = stack.start("run", "--http-addr", "127.0.0.1:0")
            wait(f"{kind}: both stages through the backlog", 1800,
                 lambda: committed_through(args.bootstrap, f"{stack.app}.group", stack.topics["source"])
                 and committed_through(args.bootstrap, f"{stack.app}.aggregate", stack.topics["grouped"]), every=0.5)
            wall = time.time() - t0
            cpu = cpu_seconds(run.pid)
            out[kind] = {"per_s": round(args.events / wall), "wall_s": round(wall, 2),
                         "cpu_s_per_million": round(cpu / args.events * 1e6, 1)}
            log(f"end to end {kind}: {out[kind]}")
        finally:
            stack.stop()
    return out


def phase_queries(args):
    stack = Stack(args, "month", METER + WINDOWS + '[aggregate]\ngrace = "5s"\nidle_timeout = "2s"\nretention = "35d"\n')
    try:
        rng = random.Random(13)
        month_start = (int(time.time() * 1000) // DAY - 31) * DAY
        n = args.days * 1440
        values = [json.dumps(event(i, "month", month_start + i * MINUTE + rng.randrange(MINUTE), rng)).encode() for i in range(n)]
        produce(args.bootstrap, stack.topics["source"], values)
        stack.start("run", "--http-addr", "127.0.0.1:0")
        stack.serve()
        frm, to = rfc3339(month_start), rfc3339(month_start + args.days * DAY)
        base = f"/api/v1/meters/tokens/query?subject=month&from={urllib.parse.quote(frm)}&to={urllib.parse.quote(to)}"

        def rows(q):
            status, body = http_get(stack.addr, stack.key, base + q)
            return len(json.loads(body)["data"]) if status == 200 else -1

        log(f"{n:,} events of one subject over {args.days} days; waiting until every minute window is in serve's view")
        wait("a month of minute windows in the view", 1800, lambda: rows("&windowSize=MINUTE") == n, every=2)
        out = {"minute_windows": n}
        for name, q in [("MINUTE", "&windowSize=MINUTE"), ("DAY Asia/Kolkata", "&windowSize=DAY&windowTimeZone=Asia%2FKolkata"),
                        ("DAY UTC", "&windowSize=DAY"), ("total", "")]:
            lat, count = [], None
            for _ in range(args.queries):
                t = time.perf_counter()
                status, body = http_get(stack.addr, stack.key, base + q)
                lat.append((time.perf_counter() - t) * 1000)
                if status != 200:
                    raise SystemExit(f"{name}: {status} {body[:300]}")
                count = len(json.loads(body)["data"])
            out[name] = {"rows": count, "ms": {"p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "max": round(max(lat), 1)}}
            log(f"query {name}: {out[name]}")
        return out
    finally:
        stack.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pulses-bin", required=True)
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--events", type=int, default=200_000, help="events (and pulses) per ingest and end-to-end run")
    ap.add_argument("--clients", type=int, default=8, help="HTTP connections for the ingest runs")
    ap.add_argument("--queries", type=int, default=50, help="queries of each kind")
    ap.add_argument("--days", type=int, default=30, help="days of minute windows for the query runs")
    ap.add_argument("--out")
    args = ap.parse_args()
    summary = {"ingest": phase_ingest(args), "end_to_end": phase_end_to_end(args), "queries": phase_queries(args),
               "events": args.events, "clients": args.clients, "cpus": os.cpu_count()}
    print(json.dumps(summary, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
