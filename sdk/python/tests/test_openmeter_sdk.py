"""OpenMeter's own Python SDK (``openmeter``, pinned in pyproject) against ``pulses serve``.

SPEC §10: a user switches from OpenMeter by changing the client's URL. The client here
is OpenMeter's, unchanged; the server is the real ``pulses run`` + ``pulses serve`` on
the real broker. A few thousand CloudEvents go in through ``client.events.ingest_events``
(values written as JSON integers, floats and Decimal strings, re-sent duplicates, events
for windows that closed long ago, six meters reading one event type), a few more through
kcat straight into the source topic; then every query answer of
``client.meters.query_json`` (MINUTE, HOUR, DAY; UTC and two other zones; subject,
groupBy, filterGroupBy) must equal a fold of the events computed here with Python's
Decimal and zoneinfo, compared as exact decimals parsed from the response text.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import subprocess
import time
from collections import defaultdict
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any, Dict, List, Optional, Tuple
from zoneinfo import ZoneInfo

import pytest

from pulses_stack import BOOTSTRAP, Stack, wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not os.environ.get("PULSES_BIN"), reason="PULSES_BIN is not set"),
]

openmeter = pytest.importorskip("openmeter")
from corehttp.exceptions import HttpResponseError  # noqa: E402  (openmeter's HTTP stack)

HOUR_MS = 3_600_000
MINUTE_MS = 60_000
AVG_SCALE = Decimal("1e-10")  # SPEC §10: avg is exact to 10 decimal places, half to even

CONFIG = """\
[aggregate]
grace = "2s"
retention = "7d"
idle_timeout = "2s"
max_batch_wait = "50ms"

[[windows]]
name = "minute"
size = "1m"

[[windows]]
name = "hour"
size = "1h"

[[meters]]
slug = "tokens_total"
event_type = "prompt"
aggregation = "sum"
value_property = "$.tokens"
group_by = { model = "$.model", kind = "$.kind" }

[[meters]]
slug = "prompts"
event_type = "prompt"
aggregation = "count"
group_by = { model = "$.model" }

[[meters]]
slug = "users"
event_type = "prompt"
aggregation = "unique_count"
value_property = "$.user"

[[meters]]
slug = "avg_tokens"
event_type = "prompt"
aggregation = "avg"
value_property = "$.tokens"

[[meters]]
slug = "min_latency"
event_type = "prompt"
aggregation = "min"
value_property = "$.latency.ms"

[[meters]]
slug = "max_latency"
event_type = "prompt"
aggregation = "max"
value_property = "$.latency.ms"

[[meters]]
slug = "balance"
event_type = "balance"
aggregation = "latest"
value_property = "$.amount"

[serve]
ack_timeout = "5s"
"""

SUBJECTS = ["acme", "globex", "initech"]
MODELS = ["gpt-4", "mini", "o3"]


class Ev:
    """One event as sent, and what the fold needs of it."""

    def __init__(self, body: Dict[str, Any], at_ms: int, wire_values: Dict[str, Any]) -> None:
        self.body = body
        self.at_ms = at_ms
        self.subject = body["subject"]
        self.type = body["type"]
        self.id = body["id"]
        self.key = (body["source"], body["id"])
        self.data = body["data"]
        self.wire = wire_values


def iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def as_decimal(v: Any) -> Decimal:
    """A value as pulses reads it: the JSON text Python writes for it, exactly."""
    if isinstance(v, str):
        return Decimal(v)
    return Decimal(json.dumps(v))


def make_events(rng: random.Random, base: int, span_ms: int, n: int, source: str) -> List[Ev]:
    out = []
    for i in range(n):
        at = base + rng.randrange(span_ms)
        subject = rng.choices(SUBJECTS, weights=[6, 3, 1])[0]
        if rng.random() < 0.12:
            # Balances: a few share a millisecond, so `latest` breaks ties by id.
            at = base + (rng.randrange(span_ms) // 1000) * 1000
            amount = rng.choice([rng.randrange(0, 10_000), f"{rng.randrange(0, 10**6)}.{rng.randrange(0, 100):02d}"])
            body = {"specversion": "1.0", "id": f"{source}-b{i:05d}", "source": source, "type": "balance",
                    "subject": subject, "time": iso(at), "data": {"amount": amount}}
        else:
            tokens = rng.choice([
                rng.randrange(1, 5000),                       # Go / JavaScript integers
                rng.randrange(1, 10**6) / 100,                # JavaScript floats (repr is exact text)
                f"{rng.randrange(1, 10**7)}E-{rng.randrange(1, 9)}",  # Java BigDecimal.toString()
                str(Decimal(rng.randrange(1, 10**5)) / Decimal(1000)),  # Python Decimal
            ])
            latency = rng.choice([rng.randrange(1, 900), f"{rng.randrange(1, 90000)}.5"])
            data = {"tokens": tokens, "model": rng.choice(MODELS), "user": f"u{rng.randrange(40)}", "latency": {"ms": latency}}
            if rng.random() < 0.7:
                data["kind"] = rng.choice(["input", "output"])
            body = {"specversion": "1.0", "id": f"{source}-p{i:05d}", "source": source, "type": "prompt",
                    "subject": subject, "time": iso(at), "data": data}
        out.append(Ev(body, at, {}))
        if body["type"] == "balance" and i % 3 == 0:
            # A twin in the same millisecond with the greater id: it is the latest
            # value, whether it is sent before or after the event.
            twin = {**body, "id": body["id"] + "-twin", "data": {"amount": f"{rng.randrange(10**6)}.5"}}
            out.insert(len(out) - (i % 2), Ev(twin, at, {}))
    return out


def window_start(ms: int, size: Optional[str], tz: ZoneInfo, whole: Tuple[int, int]) -> int:
    if size is None:
        return whole[0]
    local = dt.datetime.fromtimestamp(ms / 1000, tz)
    if size == "MINUTE":
        local = local.replace(second=0, microsecond=0)
    elif size == "HOUR":
        local = local.replace(minute=0, second=0, microsecond=0)
    else:
        local = dt.datetime(local.year, local.month, local.day, tzinfo=tz)
    return int(local.timestamp() * 1000)


def fold(events: List[Ev], slug: str, *, frm: int, to: int, size: Optional[str] = None, tz: str = "UTC",
         subjects: Optional[List[str]] = None, group_by: Optional[List[str]] = None,
         filters: Optional[Dict[str, str]] = None) -> Dict[Tuple, Decimal]:
    """The answer computed from the events: {(windowStart ms or None, subject, groups...): value}."""
    meter = METERS[slug]
    zone = ZoneInfo(tz)
    group_by = group_by or []
    by_subject = bool(subjects) or "subject" in group_by
    names = [g for g in group_by if g != "subject"]
    rows: Dict[Tuple, List[Ev]] = defaultdict(list)
    for e in events:
        if e.type != meter["type"] or not (frm <= e.at_ms < to):
            continue
        if subjects and e.subject not in subjects:
            continue
        groups = {name: e.data.get(path) for name, path in meter["group_by"].items()}
        if filters and any(groups.get(k) != v for k, v in filters.items()):
            continue
        start = window_start(e.at_ms, size, zone, (frm, to)) if size else None
        rows[(start, e.subject if by_subject else None, *[groups.get(n) for n in names])].append(e)
    out = {}
    for k, evs in rows.items():
        agg = meter["aggregation"]
        values = [as_decimal(meter["value"](e.data)) for e in evs] if agg not in ("count", "unique_count") else []
        if agg == "sum":
            v = sum(values, Decimal(0))
        elif agg == "count":
            v = Decimal(len(evs))
        elif agg == "avg":
            v = (sum(values, Decimal(0)) / Decimal(len(values))).quantize(AVG_SCALE, rounding=ROUND_HALF_EVEN)
        elif agg == "min":
            v = min(values)
        elif agg == "max":
            v = max(values)
        elif agg == "unique_count":
            v = Decimal(len({e.data["user"] for e in evs}))
        else:  # latest: greatest time, then greatest id
            last = max(evs, key=lambda e: (e.at_ms, e.id))
            v = as_decimal(last.data["amount"])
        out[k] = v
    return out


METERS = {
    "tokens_total": {"type": "prompt", "aggregation": "sum", "value": lambda d: d["tokens"], "group_by": {"model": "model", "kind": "kind"}},
    "prompts": {"type": "prompt", "aggregation": "count", "value": None, "group_by": {"model": "model"}},
    "users": {"type": "prompt", "aggregation": "unique_count", "value": None, "group_by": {}},
    "avg_tokens": {"type": "prompt", "aggregation": "avg", "value": lambda d: d["tokens"], "group_by": {}},
    "min_latency": {"type": "prompt", "aggregation": "min", "value": lambda d: d["latency"]["ms"], "group_by": {}},
    "max_latency": {"type": "prompt", "aggregation": "max", "value": lambda d: d["latency"]["ms"], "group_by": {}},
    "balance": {"type": "balance", "aggregation": "latest", "value": lambda d: d["amount"], "group_by": {}},
}


def raw(pipeline_response, deserialized, headers) -> str:
    """``cls`` for the SDK's calls: the response text, so numbers stay exact."""
    return pipeline_response.http_response.text()


def utc(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc)


def answered(text: str, names: List[str], with_window: bool) -> Dict[Tuple, Decimal]:
    body = json.loads(text, parse_float=Decimal, parse_int=Decimal)
    out = {}
    for row in body["data"]:
        start = int(dt.datetime.fromisoformat(row["windowStart"].replace("Z", "+00:00")).timestamp() * 1000) if with_window else None
        key = (start, row["subject"], *[row["groupBy"].get(n) for n in names])
        assert key not in out, f"two rows for {key}: {text[:500]}"
        out[key] = row["value"]
    return out


def test_openmeters_sdk_ingests_and_queries_exactly(tmp_path):
    now = int(time.time() * 1000)
    base = (now // HOUR_MS - 30) * HOUR_MS  # 30 hours ago, on the hour
    span = 28 * HOUR_MS
    stack = Stack(tmp_path, config=CONFIG)
    try:
        admin = openmeter.Client(endpoint=stack.url, token=stack.create_key())
        acme_token = stack.create_key("acme")
        rng = random.Random(20261207)

        # Meters, as configured.
        listed = admin.meters.list()
        assert sorted(m["slug"] for m in listed) == sorted(METERS)
        got = admin.meters.get("tokens_total")
        assert (got["aggregation"], got["eventType"], got["valueProperty"], got["groupBy"]) == \
            ("SUM", "prompt", "$.tokens", {"model": "$.model", "kind": "$.kind"})
        with pytest.raises(HttpResponseError) as missing:
            admin.meters.get("no_such_meter")
        assert missing.value.status_code == 404

        # A few thousand events through the SDK, in batches; 150 of them sent twice.
        events = make_events(rng, base, span, 3000, "sdk")
        for i in range(0, len(events), 500):
            admin.events.ingest_events([e.body for e in events[i:i + 500]])
        for e in rng.sample(events, 150):
            admin.events.ingest_event(e.body)

        # A few through kcat, straight into the source topic, as producers do.
        piped = make_events(rng, base, span, 60, "kcat")
        lines = "".join(json.dumps(e.body) + "\n" for e in piped)
        subprocess.run(["kcat", "-P", "-b", BOOTSTRAP, "-t", stack.topics["source"]], input=lines, text=True,
                       check=True, timeout=60)

        # Every window of the first sends has closed (idle_timeout 2 s) once the
        # balances are visible; then late events correct those windows.
        all_events = events + piped
        first = fold(all_events, "tokens_total", frm=base, to=base + span, group_by=["subject"])

        def tokens_by_subject() -> Dict[Tuple, Decimal]:
            return answered(admin.meters.query_json("tokens_total", group_by=["subject"], cls=raw), [], False)

        wait_for("the first events in the meters", 180, lambda: tokens_by_subject() == first, interval=1.0)
        late = make_events(rng, base, 10 * HOUR_MS, 200, "late")
        admin.events.ingest_events([e.body for e in late])
        all_events += late

        frm, to = base, (now // HOUR_MS + 1) * HOUR_MS
        queries = [
            ("tokens_total", dict(group_by=["subject"])),
            ("tokens_total", dict(size="HOUR", group_by=["model", "kind"])),
            ("tokens_total", dict(size="DAY", tz="Asia/Kolkata", subjects=["acme", "globex"])),
            ("tokens_total", dict(size="MINUTE", subjects=["initech"], filters={"model": "o3"})),
            ("tokens_total", dict(size="HOUR", tz="America/New_York", group_by=["model"], filters={"kind": "input"})),
            ("prompts", dict(size="DAY", group_by=["model", "subject"])),
            ("users", dict(size="DAY", tz="America/New_York")),
            ("users", dict(group_by=["subject"])),
            ("avg_tokens", dict(size="HOUR", subjects=["acme"])),
            ("min_latency", dict(size="DAY", group_by=["subject"])),
            ("max_latency", dict(group_by=["subject"])),
            ("balance", dict(size="HOUR", group_by=["subject"])),
            ("balance", dict(group_by=["subject"])),
        ]

        def ask(slug: str, q: Dict[str, Any], client=admin) -> Dict[Tuple, Decimal]:
            names = [g for g in q.get("group_by", []) if g != "subject"]
            text = client.meters.query_json(
                slug, from_parameter=utc(frm), to=utc(to), window_size=q.get("size"),
                window_time_zone=q.get("tz"), subject=q.get("subjects"), group_by=q.get("group_by"),
                filter_group_by=q.get("filters"), cls=raw)
            return answered(text, names, q.get("size") is not None)

        def expect(slug: str, q: Dict[str, Any]) -> Dict[Tuple, Decimal]:
            return fold(all_events, slug, frm=frm, to=to, size=q.get("size"), tz=q.get("tz", "UTC"),
                        subjects=q.get("subjects"), group_by=q.get("group_by"), filters=q.get("filters"))

        # The late events are in once the first query matches; then every query must.
        wait_for("the late events in the meters", 180, lambda: ask(*queries[0]) == expect(*queries[0]), interval=1.0)
        rows = 0
        for slug, q in queries:
            want = expect(slug, q)
            assert want, f"{slug} {q}: the fold is empty: the workload does not exercise it"
            assert ask(slug, q) == want, f"{slug} {q}"
            rows += len(want)
        print(f"{len(all_events)} distinct events, {len(queries)} queries, {rows} rows equal the fold")

        # Duplicates were counted once: the count equals the distinct prompt events.
        distinct = sum(1 for e in all_events if e.type == "prompt")
        total = ask("prompts", {})
        assert sum(total.values()) == distinct

        # A tenant key sees only its own subject, by default and when asked for another.
        acme = openmeter.Client(endpoint=stack.url, token=acme_token)
        own = answered(acme.meters.query_json("tokens_total", from_parameter=utc(frm), to=utc(to), cls=raw), [], False)
        assert list(own.values()) == [fold(all_events, "tokens_total", frm=frm, to=to, subjects=["acme"])[(None, "acme")]]
        with pytest.raises(HttpResponseError) as forbidden:
            acme.meters.query_json("tokens_total", subject=["globex"])
        assert forbidden.value.status_code == 403
        with pytest.raises(HttpResponseError) as other:
            acme.events.ingest_event({**events[0].body, "subject": "globex", "id": "x-1"})
        assert other.value.status_code == 403

        # What the stored windows cannot answer exactly is a 400, not an approximation.
        with pytest.raises(HttpResponseError) as inexact:
            admin.meters.query_json("tokens_total", from_parameter=utc(frm + 30_000), to=utc(to))
        assert inexact.value.status_code == 400
        # A bad event is refused with nothing written.
        with pytest.raises(HttpResponseError) as bad:
            admin.events.ingest_events([events[1].body, {**events[2].body, "id": "bad-1", "data": {"model": "mini"}}])
        assert bad.value.status_code == 400
    finally:
        codes = stack.stop()
    assert codes == {"serve": 0, "run": 0}, codes
