"""A fresh pulses pipeline for one integration test: topics, `pulses run`, `pulses serve`, keys.

Everything gets new names (application id ``sdk-<uuid8>``), so tests never see each
other's pulses, windows or watermarks. Needs ``PULSES_BIN`` and a Kafka broker at
``PULSES_BOOTSTRAP_SERVERS`` (default 127.0.0.1:9092); topics are created with Kafka's
own TopicCommand (``PULSES_KAFKA_LIBS``, default the broker's classpath cache).
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections import defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Dict, List, Optional, Tuple

BIN = os.environ.get("PULSES_BIN", "")
BOOTSTRAP = os.environ.get("PULSES_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
KAFKA_LIBS = os.environ.get("PULSES_KAFKA_LIBS", os.path.expanduser("~/.cache/pulses/kafka-4.1.1/libs"))

CONFIG = """\
[aggregate]
grace = "5s"
retention = "1h"
idle_timeout = "1h"
max_batch_wait = "50ms"

[[windows]]
name = "minute"
size = "1m"

[serve]
ack_timeout = "3s"
"""

Key = Tuple[str, str, str]  # tenant, sku, unit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, timeout: float, probe, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class Proc:
    def __init__(self, name: str, args: List[str], log_path: Path, cwd: Path) -> None:
        self.name = name
        self.args = args
        self.log_path = log_path
        self.cwd = cwd
        self.popen: Optional[subprocess.Popen] = None
        self.start()

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(self.args, stdout=log, stderr=log, cwd=self.cwd,
                                      env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "info")})
        log.close()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def http_addr(self, since: int = 0) -> str:
        def probe() -> Optional[str]:
            if self.popen is not None and self.popen.poll() is not None:
                raise RuntimeError(f"pulses {self.name} exited with {self.popen.returncode}:\n{self.log()[-3000:]}")
            m = re.search(r"listening on http://([0-9.]+:[0-9]+)", self.log()[since:])
            return m.group(1) if m else None

        return wait_for(f"pulses {self.name} to log its address", 60, probe)

    def kill9(self) -> None:
        assert self.popen is not None
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(30)

    def terminate(self, timeout: float = 60) -> Optional[int]:
        p = self.popen
        if p is None or p.poll() is not None:
            return p.returncode if p else None
        p.send_signal(signal.SIGTERM)
        try:
            return p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)
            return None


class Stack:
    """Topics + ``pulses run`` + ``pulses serve`` under a fresh application id."""

    def __init__(self, tmp: Path, serve_port: Optional[int] = None, config: str = CONFIG) -> None:
        if not BIN or not os.access(BIN, os.X_OK):
            raise RuntimeError(f"PULSES_BIN={BIN!r} is not an executable")
        self.tmp = tmp
        self.app = f"sdk-{uuid.uuid4().hex[:8]}"
        self.topics = {k: f"{self.app}.{k}" for k in ("source", "grouped", "aggregated", "dlq", "late")}
        self.config = tmp / "pulses.toml"
        self.config.write_text(config)
        self.procs: List[Proc] = []
        self.serve_port = serve_port or free_port()
        create_topic(self.topics["source"], 6)
        self.run = self._proc("run", [
            "--state-dir", str(tmp / "run"), "--http-addr", "127.0.0.1:0",
        ])
        self.run_addr = self.run.http_addr()
        self.serve = self._proc("serve", [
            "--state-dir", str(tmp / "serve"), "--http-addr", f"127.0.0.1:{self.serve_port}",
        ])
        self.url = f"http://{self.serve.http_addr()}"
        self.wait_ready()

    def common(self) -> List[str]:
        t = self.topics
        return [
            "--config", str(self.config), "--bootstrap-servers", BOOTSTRAP, "--application-id", self.app,
            "--source-topic", t["source"], "--grouped-topic", t["grouped"], "--aggregated-topic", t["aggregated"],
            "--dlq-topic", t["dlq"], "--late-topic", t["late"],
        ]

    def _proc(self, command: str, extra: List[str]) -> Proc:
        p = Proc(command, [BIN, command, *self.common(), *extra], self.tmp / f"{command}.log", self.tmp)
        self.procs.append(p)
        return p

    def wait_ready(self, timeout: float = 90) -> None:
        def ready() -> bool:
            if self.serve.popen is not None and self.serve.popen.poll() is not None:
                raise RuntimeError(f"pulses serve exited:\n{self.serve.log()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_for("pulses serve /readyz", timeout, ready)

    def restart_serve(self) -> None:
        """After a kill: the same arguments, the same port."""
        since = len(self.serve.log())
        self.serve.start()
        self.serve.http_addr(since)
        self.wait_ready()

    def create_key(self, tenant: Optional[str] = None) -> str:
        args = ["--admin"] if tenant is None else ["--tenant", tenant]
        out = subprocess.run([BIN, "keys", "create", *self.common(), *args], cwd=self.tmp,
                             capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"pulses keys create failed: {out.stderr[-2000:]}")
        secret = json.loads(out.stdout.strip().splitlines()[-1])["secret"]
        # A new key reaches serve within 5 s: wait until it is accepted (an empty
        # array is refused as invalid_json, after authentication: 400, not 401).
        def known() -> bool:
            req = urllib.request.Request(self.url + "/v1/pulses", data=b"[]", method="POST",
                                         headers={"X-API-Key": secret, "Content-Type": "application/json"})
            try:
                urllib.request.urlopen(req, timeout=5)
                return True
            except urllib.error.HTTPError as e:
                return e.code != 401
            except OSError:
                return False

        wait_for("the new API key to reach serve", 30, known, interval=0.3)
        return secret

    def aggregates(self) -> List[dict]:
        out = subprocess.run(
            ["kcat", "-C", "-b", BOOTSTRAP, "-t", self.topics["aggregated"], "-o", "beginning", "-e", "-q",
             "-X", "isolation.level=read_committed", "-f", "%s\n"],
            capture_output=True, text=True, timeout=120,
        )
        if out.returncode != 0:
            raise RuntimeError(f"kcat failed: {out.stderr}")
        return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]

    def final_totals(self, before_ms: int) -> Dict[Key, Tuple[Decimal, int]]:
        """Sum of the latest revision of every final aggregate, per (tenant, sku, unit),
        over windows that start before ``before_ms``."""
        latest: Dict[str, dict] = {}
        for a in self.aggregates():
            if not a.get("final"):
                continue
            prev = latest.get(a["aggregate_id"])
            if prev is None or a["revision"] > prev["revision"]:
                latest[a["aggregate_id"]] = a
        totals: Dict[Key, List] = defaultdict(lambda: [Decimal(0), 0])
        for a in latest.values():
            if parse_ms(a["window_start"]) >= before_ms or a["product_sku"] == "push":
                continue
            t = totals[(a["tenant_id"], a["product_sku"], a["use_unit"])]
            t[0] += Decimal(a["total_amount"])
            t[1] += int(a["pulse_count"])
        return {k: (v[0], v[1]) for k, v in totals.items()}

    def wait_for_totals(self, expected: Dict[Key, Tuple[Decimal, int]], before_ms: int, timeout: float = 180) -> Dict[Key, Tuple[Decimal, int]]:
        last: Dict[Key, Tuple[Decimal, int]] = {}

        def probe() -> bool:
            nonlocal last
            last = self.final_totals(before_ms)
            return last == expected

        try:
            wait_for("the final aggregates to equal what was sent", timeout, probe, interval=2.0)
        except TimeoutError:
            pass
        return last

    def dlq_count(self) -> int:
        out = subprocess.run(["kcat", "-C", "-b", BOOTSTRAP, "-t", self.topics["dlq"], "-o", "beginning", "-e", "-q",
                              "-f", "%s\n"], capture_output=True, text=True, timeout=60)
        return len([line for line in out.stdout.splitlines() if line.strip()])

    def stop(self) -> Dict[str, Optional[int]]:
        codes = {}
        for p in reversed(self.procs):
            codes[p.name] = p.terminate()
        return codes


def parse_ms(text: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


def create_topic(name: str, partitions: int) -> None:
    java = shutil.which("java")
    libs = glob.glob(os.path.join(KAFKA_LIBS, "*.jar"))
    if java is None or not libs:
        raise RuntimeError(f"creating topics needs java and Kafka's jars in PULSES_KAFKA_LIBS ({KAFKA_LIBS})")
    cmd = [java, "-Xmx256m", "-cp", os.path.join(KAFKA_LIBS, "*")]
    log4j = glob.glob(os.path.expanduser("~/.cache/pulses/run/kafka-*/log4j2-tools.xml"))
    if log4j:
        cmd.append(f"-Dlog4j2.configurationFile={log4j[0]}")
    cmd += ["org.apache.kafka.tools.TopicCommand", "--bootstrap-server", BOOTSTRAP, "--create", "--if-not-exists",
            "--topic", name, "--partitions", str(partitions), "--replication-factor", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"creating topic {name} failed: {out.stdout}\n{out.stderr}")
