#!/usr/bin/env python3
"""pulses against Kafka Streams and Quix Streams: the same windowed aggregation on the
same broker, the same input and the same guarantee (exactly-once), one after another.

Run it through `scripts/bench-peers`, which builds and installs the contenders. The
steps, for the README and for whoever changes this:

1. N pulses go to a fresh source topic once (`pulses stub --seed`, event times 1 ms
   apart from a fixed start, 10 tenants x 4 products). The expected windows (10 s
   "postflight" and 1 min "minute", exact decimal sum, count, min, max) are folded here
   from that topic, independently of every contender.
2. Each contender gets fresh topics, state and consumer groups. The stage-2 shaped
   ones (pulses-stage2, kafka-streams, quix) read a grouped topic of their own, filled
   from the source by `pulses run --stages group` before they start (the same records
   for each). pulses-pipeline reads the source topic itself, both stages in one process.
3. Drain: from the contender's ready signal until every expected window that the data
   itself closes (its end + grace at least 10 s before the last event) is visible to a
   read_committed consumer. Throughput is N over that time; CPU is the process's
   user+system time over it (and the local broker's, when its pid is known); peak
   RSS is the process's VmHWM at the end.
4. Close to final: then one record per (tenant, product) with an event time 70 s past
   the data is written live; it closes the trailing windows, and the time from that
   write until each trailing final is visible is the close-to-final latency.
5. Every final is compared with the fold: a contender with a missing, different or
   duplicated window is reported as wrong and not ranked.
"""

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

CONTENDERS = ["pulses-stage2", "kafka-streams", "quix", "pulses-pipeline"]
WINDOWS_MS = {"postflight": 10_000, "minute": 60_000}
GRACE_MS = 5_000
PARTITIONS = 6
TENANTS, SKUS = 10, 4
START = "2026-01-01T00:00:00Z"
# Windows whose end + grace is this far before the last event are closed by the data
# itself on every partition and every key (10 tenants x 4 products send every ~40 ms).
DRAIN_MARGIN_MS = 10_000
# The live closing record's event time after the last event: past the last minute
# window's end plus grace.
PUSH_AFTER_MS = 70_000

PULSES_CONFIG = """\
processing_guarantee = "exactly_once"

[aggregate]
grace = "5s"
retention = "1h"
# Windows close on event time only, like the peers' (no wall-clock idle advance).
idle_timeout = "1h"

[[windows]]
name = "postflight"
size = "10s"

[[windows]]
name = "minute"
size = "1m"
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def parse_ms(rfc3339: str) -> int:
    """Epoch milliseconds of an RFC 3339 time, in integer arithmetic."""
    return (dt.datetime.fromisoformat(rfc3339.replace("Z", "+00:00")) - EPOCH) // dt.timedelta(milliseconds=1)


def rfc3339(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


# ---------------------------------------------------------------------------- broker


class Broker:
    def __init__(self, bootstrap: str):
        self.bootstrap = bootstrap
        self.admin = AdminClient({"bootstrap.servers": bootstrap})

    def create(self, *topics: str) -> None:
        # Kept for good: the input's event times (the record timestamps) start on
        # 2026-01-01, and time-based retention (7 days by default) would delete them
        # while the bench runs.
        futures = self.admin.create_topics([NewTopic(t, PARTITIONS, 1, config={"retention.ms": "-1"}) for t in topics])
        for f in futures.values():
            f.result()

    def ends(self, topic: str) -> dict:
        c = Consumer({"bootstrap.servers": self.bootstrap, "group.id": "bench-peers-ends",
                      "isolation.level": "read_committed"})
        try:
            return {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(PARTITIONS)}
        finally:
            c.close()

    def committed(self, group: str, topic: str) -> dict | None:
        """What `group` committed on `topic`; None if the broker did not answer in time."""
        c = Consumer({"bootstrap.servers": self.bootstrap, "group.id": group, "enable.auto.commit": False})
        try:
            tps = c.committed([TopicPartition(topic, p) for p in range(PARTITIONS)], timeout=10)
            return {tp.partition: tp.offset for tp in tps}
        except KafkaException as e:
            log(f"committed offsets of {group}: {e}; asking again")
            return None
        finally:
            c.close()

    def read(self, topic: str):
        """Every committed record of `topic`, to its end."""
        ends = self.ends(topic)
        c = Consumer({"bootstrap.servers": self.bootstrap, "group.id": f"bench-peers-{uuid.uuid4()}",
                      "isolation.level": "read_committed", "enable.auto.commit": False})
        c.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
        pos = {p: 0 for p in range(PARTITIONS)}
        try:
            while any(pos[p] < ends[p] for p in pos):
                for m in c.consume(10_000, timeout=1.0):
                    if m.error():
                        continue
                    pos[m.partition()] = m.offset() + 1
                    yield m
        finally:
            c.close()


# ------------------------------------------------------------------------ expected


@dataclass
class Agg:
    total: Decimal
    count: int
    min: Decimal
    max: Decimal

    def add(self, amount: Decimal) -> None:
        self.total += amount
        self.count += 1
        self.min = min(self.min, amount)
        self.max = max(self.max, amount)

    def same(self, other: "Agg") -> bool:
        return (self.total, self.count, self.min, self.max) == (other.total, other.count, other.min, other.max)


@dataclass
class Input:
    expected: dict = field(default_factory=dict)  # (tenant, sku, unit, window, start_ms) -> Agg
    groups: set = field(default_factory=set)  # (tenant, sku, unit)
    last_ms: int = 0
    count: int = 0


def fold(broker: Broker, source: str) -> Input:
    """The expected windows, folded from the source topic as written."""
    inp = Input()
    for m in broker.read(source):
        p = json.loads(m.value())
        at = parse_ms(p["timestamp"])
        amount = Decimal(p["used_amount"])
        group = (p["tenant_id"], p["product_sku"], p["use_unit"])
        inp.groups.add(group)
        inp.last_ms = max(inp.last_ms, at)
        inp.count += 1
        for name, size in WINDOWS_MS.items():
            key = (*group, name, at - at % size)
            agg = inp.expected.get(key)
            if agg is None:
                inp.expected[key] = Agg(amount, 1, amount, amount)
            else:
                agg.add(amount)
    return inp


def closed_by_data(key, last_ms: int) -> bool:
    _, _, _, name, start = key
    return start + WINDOWS_MS[name] + GRACE_MS <= last_ms - DRAIN_MARGIN_MS


# -------------------------------------------------------------------------- output


class OutputWatch:
    """Reads a contender's output topic (read_committed) in the background: the latest
    final per window, how many finals each window got, and when each was first seen."""

    def __init__(self, broker: Broker, topic: str, pulses_format: bool):
        self.finals: dict = {}
        self.count: dict = {}
        self.first_seen: dict = {}
        self.malformed = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": f"bench-peers-{uuid.uuid4()}",
                                  "isolation.level": "read_committed", "enable.auto.commit": False,
                                  "fetch.wait.max.ms": 10})
        self.consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
        self.parse = parse_pulses if pulses_format else parse_peer
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.is_set():
            msgs = self.consumer.consume(1000, timeout=0.02)
            now = time.monotonic()
            with self.lock:
                for m in msgs:
                    if m.error():
                        continue
                    try:
                        parsed = self.parse(json.loads(m.value()))
                    except (ValueError, KeyError, TypeError, ArithmeticError):
                        self.malformed += 1
                        continue
                    if parsed is None:
                        continue
                    key, agg = parsed
                    self.finals[key] = agg
                    self.count[key] = self.count.get(key, 0) + 1
                    self.first_seen.setdefault(key, now)
        self.consumer.close()

    def has_all(self, keys) -> bool:
        with self.lock:
            return all(k in self.finals for k in keys)

    def seen_count(self, keys) -> int:
        with self.lock:
            return sum(1 for k in keys if k in self.finals)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def parse_pulses(v: dict):
    """A pulses window aggregate (SPEC §3): finals only, the start in RFC 3339."""
    if not v.get("final"):
        return None
    return window_of(v, parse_ms(v["window_start"]))


def parse_peer(v: dict):
    """A peer's final (benches/peers/*/README.md): the start in epoch milliseconds."""
    return window_of(v, int(v["window_start_ms"]))


def window_of(v: dict, start_ms: int):
    """The fields both output formats share, keyed like the expected windows."""
    key = (v["tenant_id"], v["product_sku"], v["use_unit"], v["window"], start_ms)
    return key, Agg(Decimal(v["total_amount"]), v["pulse_count"], Decimal(v["min_amount"]), Decimal(v["max_amount"]))


# ----------------------------------------------------------------------- processes


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime, stime are fields 14 and 15 (1-based); after the ')' split they are 12, 13.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Child:
    """A contender's process: output to a log file, a ready line watched on stdout."""

    def __init__(self, argv, log_path: Path, ready_line: str | None = None):
        self.log_path = log_path
        self.log = open(log_path, "ab")
        self.ready_line = ready_line
        self.ready = threading.Event()
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.log, stdin=subprocess.DEVNULL)
        threading.Thread(target=self._stdout, daemon=True).start()

    def _stdout(self) -> None:
        for line in self.proc.stdout:
            self.log.write(line)
            self.log.flush()
            if self.ready_line and self.ready_line.encode() in line:
                self.ready.set()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 60) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def wait_until(what: str, timeout: float, cond, child: Child | None = None, step: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if child is not None and not child.alive():
            raise RuntimeError(f"{what}: the process exited ({child.proc.returncode}); log {child.log_path}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(step)


def http_ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


# ----------------------------------------------------------------------- contenders


@dataclass
class Tools:
    pulses: str
    ks_jar: str
    quix_python: str
    quix_job: str
    work: Path
    bootstrap: str


@dataclass
class Topics:
    app: str
    source: str
    grouped: str
    out: str

    @staticmethod
    def of(run: str, name: str, source: str) -> "Topics":
        app = f"{run}-{name}"
        return Topics(app, source, f"{app}.grouped", f"{app}.out")


def pulses_argv(tools: Tools, t: Topics, stages: str, state: Path, port: int, config: Path):
    return [tools.pulses, "run", "--stages", stages, "--config", str(config), "--bootstrap-servers", tools.bootstrap,
            "--application-id", t.app, "--source-topic", t.source, "--grouped-topic", t.grouped,
            "--aggregated-topic", t.out, "--dlq-topic", f"{t.app}.dlq", "--late-topic", f"{t.app}.late",
            "--state-dir", str(state), "--http-addr", f"127.0.0.1:{port}"]


def group_source(tools: Tools, broker: Broker, t: Topics, config: Path, timeout: float) -> float:
    """Fills the contender's grouped topic from the source with `pulses run --stages group`."""
    started = time.monotonic()
    state = Path(tempfile.mkdtemp(dir=tools.work))
    child = Child(pulses_argv(tools, t, "group", state, free_port(), config), tools.work / f"{t.app}-grouping.log")
    try:
        ends = broker.ends(t.source)
        wait_until(f"stage 1 of {t.app} to group the input", timeout,
                   lambda: broker.committed(f"{t.app}.group", t.source) == ends, child, step=0.5)
    finally:
        code = child.stop()
    if code != 0:
        raise RuntimeError(f"grouping exited {child.proc.returncode}; log {child.log_path}")
    return time.monotonic() - started


def start(name: str, tools: Tools, t: Topics, config: Path) -> tuple:
    """Starts contender `name`; returns the child and how to tell it is ready."""
    state = Path(tempfile.mkdtemp(dir=tools.work))
    logp = tools.work / f"{t.app}.log"
    if name.startswith("pulses-"):
        port = free_port()
        stages = "aggregate" if name == "pulses-stage2" else "group,aggregate"
        child = Child(pulses_argv(tools, t, stages, state, port, config), logp)
        return child, lambda: http_ready(port)
    if name == "kafka-streams":
        child = Child(["java", "-jar", tools.ks_jar, "--bootstrap-servers", tools.bootstrap, "--input", t.grouped,
                       "--output", t.out, "--application-id", t.app, "--state-dir", str(state)],
                      logp, "peer-kafka-streams: RUNNING")
        return child, child.ready.is_set
    if name == "quix":
        child = Child([tools.quix_python, tools.quix_job, "--bootstrap-servers", tools.bootstrap, "--input", t.grouped,
                       "--output", t.out, "--consumer-group", t.app, "--state-dir", str(state)],
                      logp, "peer-quix: RUNNING")
        return child, child.ready.is_set
    raise ValueError(name)


def push(broker: Broker, name: str, t: Topics, inp: Input) -> float:
    """One record per (tenant, product) past the data: closes the trailing windows."""
    at = inp.last_ms + PUSH_AFTER_MS
    p = Producer({"bootstrap.servers": broker.bootstrap, "partitioner": "murmur2_random", "enable.idempotence": True,
                  "linger.ms": 0})
    topic = t.source if name == "pulses-pipeline" else t.grouped
    for i, (tenant, sku, unit) in enumerate(sorted(inp.groups)):
        pid = f"bench-push-{i}"
        pulse = {"pulse_id": pid, "tenant_id": tenant, "product_sku": sku, "use_unit": unit, "used_amount": "0"}
        if topic == t.source:
            value = {**pulse, "timestamp": rfc3339(at)}
        else:  # a grouped pulse, as stage 1 writes it
            value = {"object_id": pid, **pulse, "event_time": rfc3339(at), "attributes": {},
                     "source": {"topic": t.source, "partition": 0, "offset": 0}}
        p.produce(topic, key=tenant.encode(), value=json.dumps(value).encode(), timestamp=at)
    pushed_at = time.monotonic()
    if p.flush(30) != 0:
        raise RuntimeError("the closing records were not delivered")
    return pushed_at


def percentile(values, q: float) -> float:
    s = sorted(values)
    return s[max(0, min(len(s) - 1, int(round(q * len(s) + 0.5)) - 1))]


def run_contender(name: str, tools: Tools, broker: Broker, run: str, source: str, inp: Input, config: Path,
                  timeout: float, broker_pid: int | None) -> dict:
    t = Topics.of(run, name, source)
    broker.create(t.grouped, t.out)
    result = {"name": name}
    if name != "pulses-pipeline":
        log(f"{name}: grouping the input into {t.grouped}")
        result["grouping_s"] = round(group_source(tools, broker, t, config, timeout), 1)
    drain_keys = [k for k in inp.expected if closed_by_data(k, inp.last_ms)]
    trailing = [k for k in inp.expected if not closed_by_data(k, inp.last_ms)]
    watch = OutputWatch(broker, t.out, name.startswith("pulses-"))
    spawned = time.monotonic()
    child, ready = start(name, tools, t, config)
    try:
        wait_until(f"{name} to be ready", 300, ready, child)
        ready_at = time.monotonic()
        cpu_at_ready = cpu_seconds(child.proc.pid)
        broker_cpu_at_ready = cpu_seconds(broker_pid) if broker_pid else None
        log(f"{name}: ready after {ready_at - spawned:.1f}s; draining {inp.count:,} pulses")
        wait_until(f"{name} to emit the {len(drain_keys)} windows the data closes", timeout,
                   lambda: watch.has_all(drain_keys), child, step=0.05)
        drained_at = time.monotonic()
        cpu = cpu_seconds(child.proc.pid) - cpu_at_ready
        broker_cpu = cpu_seconds(broker_pid) - broker_cpu_at_ready if broker_pid else None
        log(f"{name}: drained in {drained_at - ready_at:.1f}s; closing the trailing {len(trailing)} windows")
        pushed_at = push(broker, name, t, inp)
        wait_until(f"{name} to emit the trailing windows", 120, lambda: watch.has_all(trailing), child, step=0.005)
        latencies = [watch.first_seen[k] - pushed_at for k in trailing]
        rss = peak_rss_mib(child.proc.pid)
        exit_code = child.stop()
        # Finals after the trailing ones would be duplicates: look once more before judging.
        time.sleep(0.5)
    except (TimeoutError, RuntimeError) as e:
        log(f"{name}: {e}")
        result.update(correct=False, error=str(e), windows_seen=watch.seen_count(inp.expected))
        return result
    finally:
        # Whatever happened, no contender outlives its turn (it would skew the next).
        child.stop()
        watch.close()
    wrong = [k for k, e in inp.expected.items() if k not in watch.finals or not watch.finals[k].same(e)]
    duplicated = [k for k in inp.expected if watch.count.get(k, 0) > 1]
    drain_s = drained_at - ready_at
    result.update(
        correct=not wrong and not duplicated and watch.malformed == 0,
        pulses_per_s=round(inp.count / drain_s),
        cpu_s_per_million=round(cpu / inp.count * 1e6, 2),
        peak_rss_mib=round(rss, 1),
        close_to_final_p99_s=round(percentile(latencies, 0.99), 3),
        close_to_final_p50_s=round(percentile(latencies, 0.50), 3),
        broker_cpu_s_per_million=round(broker_cpu / inp.count * 1e6, 2) if broker_cpu is not None else None,
        drain_s=round(drain_s, 2),
        startup_s=round(ready_at - spawned, 2),
        windows=len(inp.expected),
        wrong_windows=len(wrong),
        duplicated_windows=len(duplicated),
        exit_code=exit_code,
    )
    if wrong:
        k = wrong[0]
        result["first_wrong"] = {"window": list(k), "expected": agg_json(inp.expected[k]),
                                 "got": agg_json(watch.finals[k]) if k in watch.finals else None}
    log(f"{name}: {'correct' if result['correct'] else 'WRONG'}, {result['pulses_per_s']:,} pulses/s, "
        f"{result['peak_rss_mib']} MiB, p99 close-to-final {result['close_to_final_p99_s']}s")
    return result


def agg_json(a: Agg) -> dict:
    return {"total": str(a.total), "count": a.count, "min": str(a.min), "max": str(a.max)}


# -------------------------------------------------------------------------- report


def table(report: dict) -> str:
    rows = [("contender", "correct", "pulses/s", "CPU s/M", "broker CPU s/M", "peak RSS MiB", "close→final p99 s")]
    for c in report["contenders"]:
        if "pulses_per_s" in c:
            broker_cpu = c.get("broker_cpu_s_per_million")
            rows.append((c["name"], "yes" if c["correct"] else "NO", f"{c['pulses_per_s']:,}",
                         f"{c['cpu_s_per_million']:.1f}", "-" if broker_cpu is None else f"{broker_cpu:.1f}",
                         f"{c['peak_rss_mib']:.0f}", f"{c['close_to_final_p99_s']:.3f}"))
        else:
            rows.append((c["name"], "NO", "-", "-", "-", "-", "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))) + " |"
             for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 1) + ("-" if i == 0 else ":") for i, w in enumerate(widths)) + "|")
    return "\n".join(lines)


def ratios(report: dict) -> list:
    by = {c["name"]: c for c in report["contenders"] if c.get("correct")}
    out = []
    ours = by.get("pulses-stage2")
    if ours and "kafka-streams" in by:
        ks = by["kafka-streams"]
        out.append(f"pulses-stage2 vs kafka-streams: {ours['pulses_per_s'] / ks['pulses_per_s']:.1f}x throughput "
                   f"(target >= 3x), {ours['peak_rss_mib'] / ks['peak_rss_mib']:.2f} of its peak RSS (target <= 0.33)")
    if ours and "quix" in by:
        out.append(f"pulses-stage2 vs quix: {ours['pulses_per_s'] / by['quix']['pulses_per_s']:.1f}x throughput "
                   f"(target >= 20x)")
    return out


def chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [c for c in report["contenders"] if "pulses_per_s" in c]
    names = [c["name"] + ("" if c["correct"] else "\n(WRONG)") for c in done]
    colors = ["#2b6cb0" if c["name"].startswith("pulses") else "#a0aec0" for c in done]
    panels = [("pulses_per_s", "throughput (pulses/s, higher is better)", "{:,.0f}"),
              ("peak_rss_mib", "peak RSS (MiB, lower is better)", "{:,.0f}"),
              ("cpu_s_per_million", "CPU s per million pulses (+ broker), lower is better", "{:,.1f}")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
    for ax, (key, title, fmt) in zip(axes, panels):
        values = [c[key] for c in done]
        extra = [c.get("broker_cpu_s_per_million") or 0 for c in done] if key == "cpu_s_per_million" else [0] * len(done)
        bars = ax.barh(names, values, color=colors)
        if any(extra):
            ax.barh(names, extra, left=values, color="#e2e8f0", edgecolor="#a0aec0", label="broker")
            ax.legend(loc="lower right", fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        for bar, v, e in zip(bars, values, extra):
            label = fmt.format(v) + (f" + {e:,.1f}" if e else "")
            ax.annotate(label, (v + e, bar.get_y() + bar.get_height() / 2), xytext=(3, 0),
                        textcoords="offset points", va="center", fontsize=9)
        ax.set_xlim(0, max(v + e for v, e in zip(values, extra)) * 1.35)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"{report['pulses']:,} pulses, exactly-once, same Apache Kafka {report['broker']} broker, "
                 f"{report['machine']['cores']} cores ({report['date']})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pulses", type=int, default=1_000_000, help="input size (default 1,000,000)")
    ap.add_argument("--only", default=",".join(CONTENDERS), help=f"comma-separated subset of {','.join(CONTENDERS)}")
    ap.add_argument("--out", default="benches/peers/results/peers.json", help="JSON result file")
    ap.add_argument("--chart", help="PNG bar chart (default: --out with .png)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--timeout", type=float, default=1800, help="longest drain of one contender, seconds")
    ap.add_argument("--bootstrap-servers", default=os.environ.get("PULSES_BOOTSTRAP_SERVERS", "127.0.0.1:9092"))
    ap.add_argument("--pulses-bin", required=True)
    ap.add_argument("--ks-jar", required=True)
    ap.add_argument("--quix-python", required=True)
    ap.add_argument("--broker-version", default="?")
    ap.add_argument("--broker-pid", type=int, help="the broker's pid, to report its CPU per million pulses too")
    args = ap.parse_args()
    only = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in only if n not in CONTENDERS]
    if unknown:
        ap.error(f"unknown contender(s) {', '.join(unknown)}; choose from {', '.join(CONTENDERS)}")
    if args.pulses < 50_000:
        ap.error("--pulses must be at least 50,000: 50 s of event time, so that the data itself closes windows")

    work = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    here = Path(__file__).resolve().parent
    tools = Tools(args.pulses_bin, args.ks_jar, args.quix_python, str(here / "quix" / "job.py"), work,
                  args.bootstrap_servers)
    config = work / "pulses.toml"
    config.write_text(PULSES_CONFIG)
    broker = Broker(args.bootstrap_servers)
    run = f"peers-{int(time.time())}"
    source = f"{run}.source"
    broker.create(source)
    log(f"pre-loading {args.pulses:,} pulses into {source} (logs under {work})")
    started = time.monotonic()
    with open(work / "stub.log", "wb") as stub_log:
        subprocess.run([tools.pulses, "stub", "--bootstrap-servers", args.bootstrap_servers, "--source-topic", source,
                        "--count", str(args.pulses), "--seed", str(args.seed), "--start-time", START,
                        "--tenants", str(TENANTS), "--skus", str(SKUS)], check=True, stdout=stub_log, stderr=stub_log)
    log(f"pre-loaded in {time.monotonic() - started:.1f}s; folding the expected windows")
    inp = fold(broker, source)
    if inp.count != args.pulses:
        raise SystemExit(f"the source holds {inp.count} pulses, not {args.pulses}")
    log(f"{len(inp.expected):,} expected windows over {len(inp.groups)} (tenant, product) groups")

    results = []
    for name in [n for n in CONTENDERS if n in only]:
        results.append(run_contender(name, tools, broker, run, source, inp, config, args.timeout, args.broker_pid))
    report = {
        "pulses": args.pulses,
        "guarantee": "exactly_once",
        "contenders": results,
        "broker": args.broker_version,
        "date": dt.date.today().isoformat(),
        "machine": {"cores": os.cpu_count(), "kernel": platform.release(),
                    "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30)},
        "input": {"tenants": TENANTS, "products": SKUS, "event_time_span_s": round((inp.last_ms - parse_ms(START)) / 1000),
                  "windows": len(inp.expected), "seed": args.seed},
        "command": "scripts/bench-peers " + " ".join(sys.argv[1:]),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    png = Path(args.chart) if args.chart else out.with_suffix(".png")
    chart(report, png)
    print(table(report))
    for line in ratios(report):
        print(line)
    print(f"results: {out}, chart: {png}, logs: {work}")
    shutil.rmtree(work / "state", ignore_errors=True)
    return 0 if all(c.get("correct") for c in results) else 1


if __name__ == "__main__":
    sys.exit(main())
