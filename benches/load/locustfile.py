"""Locust users for the pulses HTTP API load tests (issue 34, SPEC §11).

Started by load_test.py (scripts/load-test), which sets the environment below; not meant
to be run by hand (it would have no keys).

Each user is a client service: 70% `POST /v1/pulses` (batches of 1 to 10 pulses with
unique ids; 3% of posts re-send the last accepted batch, a deliberate retry that must be
counted once), 20% `GET /v1/usage`, 10% `GET /v1/charges`. Tenants follow a Zipf law over
1,000 tenants, so a few send most of the traffic. The ten biggest read with their own
tenant keys; everything else goes through an admin key, as a gateway would.

A post answered 429 or 503 is retried after its `Retry-After` (at most 3 times, with the
same pulse ids), as the Python SDK does. What each process had acknowledged (202) is
folded per tenant, sku and unit (exact decimals, each pulse id once) and written at the
end with every request's latency, status and whether a refusal was informative
(a `Retry-After` header and a JSON `error`), for load_test.py to check and chart.

Environment: PULSES_LOAD_KEYS (a JSON file: {"admin": secret, "tenants": {tenant: secret}}),
PULSES_LOAD_OUT (directory for the per-process results), PULSES_LOAD_SCENARIO (a name in
workload.SCENARIOS), PULSES_LOAD_DURATION (seconds, for sustained and soak), PULSES_LOAD_USERS,
PULSES_LOAD_USER_RATE (requests per second per user), PULSES_LOAD_WINDOW (the usage
window asked for).
"""

import bisect
import itertools
import json
import os
import random
import time
import uuid
from datetime import datetime, timezone
from decimal import Decimal

from locust import FastHttpUser, LoadTestShape, constant_throughput, events, task

from workload import PRODUCTS, TENANTS, stages

_ZIPF = list(itertools.accumulate(1.0 / (i + 1) ** 1.1 for i in range(len(TENANTS))))
BATCH_SIZES = [1, 1, 1, 2, 3, 5, 10]
RETRY_SHARE = 0.03
MAX_RETRIES = 3

_keys = json.load(open(os.environ["PULSES_LOAD_KEYS"])) if os.environ.get("PULSES_LOAD_KEYS") else {"admin": "", "tenants": {}}
_out = os.environ.get("PULSES_LOAD_OUT", ".")
_user_rate = float(os.environ.get("PULSES_LOAD_USER_RATE", "10"))
_window = os.environ.get("PULSES_LOAD_WINDOW", "minute")
_process = {}  # pid -> tag: Locust's --processes forks after importing this file


def process_tag():
    """A tag unique to this process, the prefix of its pulse ids."""
    return _process.setdefault(os.getpid(), uuid.uuid4().hex[:8])
_ids = itertools.count()

# What this process saw: acknowledged pulses (id -> (tenant, sku, unit, amount)); pulses
# never acknowledged, refused for sure (429, 4xx: serve wrote nothing) or uncertain (503,
# a timeout, a lost connection: the broker may have them; SPEC §8 says retry); and one
# row per request.
acked = {}
refused = {}
uncertain = {}
requests = []  # (unix seconds, name, latency ms, status, informative refusal)
deliberate_retries = 0


def tenant():
    return TENANTS[bisect.bisect_left(_ZIPF, random.random() * _ZIPF[-1])]


def key_for(t):
    return _keys["tenants"].get(t) or _keys["admin"]


def amount():
    """An amount as producers write it: a decimal string (Java BigDecimal, Python
    Decimal) or a JSON number (Go, JavaScript), exact either way."""
    cents = random.randint(1, 100_000)
    d = Decimal(cents).scaleb(-3)
    return (str(d), d) if random.random() < 0.7 else (float(d), d)


def new_batch():
    """Pulses stamped now, as RFC 3339 text or epoch milliseconds (both in SPEC §3)."""
    now_ms = int(time.time() * 1000)
    rfc3339 = datetime.fromtimestamp(now_ms / 1000, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    batch = []
    for _ in range(random.choice(BATCH_SIZES)):
        t = tenant()
        sku, unit = random.choice(PRODUCTS)
        wire, exact = amount()
        batch.append(({"pulse_id": f"{process_tag()}-{next(_ids)}", "tenant_id": t, "product_sku": sku, "use_unit": unit,
                       "used_amount": wire, "timestamp": rfc3339 if random.random() < 0.5 else now_ms}, exact))
    return batch


@events.request.add_listener
def _record(request_type, name, response_time, response_length, response=None, exception=None, **_):
    status = getattr(response, "status_code", 0) or 0
    informative = True
    if status in (429, 503):
        headers = getattr(response, "headers", {}) or {}
        try:
            informative = bool(headers.get("Retry-After")) and bool(json.loads(response.text or "{}").get("error"))
        except ValueError:
            informative = False
    requests.append((round(time.time(), 3), name, round(response_time, 2), status, informative))


@events.test_stop.add_listener
def _dump(environment, **_):
    if not requests and not acked:
        return  # the master of several processes runs no users
    # Written aside and renamed: the driver reads every process-*.json it sees, and
    # Locust's master may exit before a worker has finished writing.
    path = os.path.join(_out, f"process-{process_tag()}.json")
    with open(path + ".part", "w") as f:
        f.write(json.dumps({
            "acked": [[i, t, s, u, str(a)] for i, (t, s, u, a) in acked.items()],
            "refused": [[i, t, s, u, str(a)] for i, (t, s, u, a) in refused.items() if i not in acked],
            "uncertain": [[i, t, s, u, str(a)] for i, (t, s, u, a) in uncertain.items() if i not in acked],
            "requests": requests,
            "deliberate_retries": deliberate_retries,
        }))  # one-shot dumps: json.dump writes a million small chunks
    os.replace(path + ".part", path)


class PulsesClient(FastHttpUser):
    wait_time = constant_throughput(_user_rate)
    # A refused or slow request is a finding, not a crash of the generator.
    network_timeout = 30.0
    connection_timeout = 10.0

    def on_start(self):
        self.last_accepted = None

    @task(70)
    def post_pulses(self):
        global deliberate_retries
        if self.last_accepted and random.random() < RETRY_SHARE:
            batch, deliberate = self.last_accepted, True
            deliberate_retries += 1
        else:
            batch, deliberate = new_batch(), False
        body = json.dumps([p for p, _ in batch])
        headers = {"X-API-Key": _keys["admin"], "Content-Type": "application/json"}
        ambiguous = False
        for attempt in range(MAX_RETRIES + 1):
            with self.client.post("/v1/pulses", data=body, headers=headers, name="POST /v1/pulses",
                                  catch_response=True) as r:
                if r.status_code == 202:
                    r.success()
                    for p, exact in batch:
                        acked[p["pulse_id"]] = (p["tenant_id"], p["product_sku"], p["use_unit"], exact)
                    self.last_accepted = batch
                    return
                r.failure(f"{r.status_code}: {(r.text or '')[:200]}")
                ambiguous |= r.status_code in (0, 503)
                if r.status_code not in (0, 429, 503):
                    break
                retry_after = float(r.headers.get("Retry-After") or 1) if r.headers else 1.0
            if attempt < MAX_RETRIES:
                time.sleep(min(retry_after, 5.0))
        if not deliberate:
            (uncertain if ambiguous else refused).update(
                (p["pulse_id"], (p["tenant_id"], p["product_sku"], p["use_unit"], exact)) for p, exact in batch)

    @task(20)
    def get_usage(self):
        self._read("/v1/usage", f"window={_window}&")

    @task(10)
    def get_charges(self):
        self._read("/v1/charges", "")

    def _read(self, path, params):
        """A read of a random tenant's last hour, with its own key if it has one."""
        t = tenant()
        since = datetime.fromtimestamp(time.time() - 3600, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
        with self.client.get(f"{path}?{params}tenant_id={t}&from={since}", headers={"X-API-Key": key_for(t)},
                             name=f"GET {path}", catch_response=True) as r:
            r.success() if r.status_code == 200 else r.failure(f"{r.status_code}: {(r.text or '')[:200]}")

class Scenario(LoadTestShape):
    """The user count over time of PULSES_LOAD_SCENARIO."""

    def __init__(self):
        super().__init__()
        self.steps = stages(os.environ.get("PULSES_LOAD_SCENARIO", "sustained"),
                             int(os.environ.get("PULSES_LOAD_USERS", "100")),
                             float(os.environ.get("PULSES_LOAD_DURATION", "600")))

    def tick(self):
        t = self.get_run_time()
        for end, users, rate in self.steps:
            if t < end:
                return users, rate
        return None
