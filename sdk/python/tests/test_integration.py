"""The SDK against the real ``pulses serve`` + ``pulses run`` and a Kafka broker.

Skipped only when ``PULSES_BIN`` is not set; with it set they run (and fail loudly if
the broker, java or kcat is missing). Each test builds its own pipeline with fresh
topic names, sends a workload with timestamps it controls, then one "push" pulse per
tenant ten minutes later so that every workload window closes, and compares the sum
of the final aggregates (latest revision per aggregate_id) with what it sent, exactly.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter, defaultdict
from decimal import Decimal
from typing import Dict, Tuple

import pytest

from pulses_meter import BufferFull, Meter, header_tenant
from pulses_stack import Key, Stack

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not os.environ.get("PULSES_BIN"), reason="PULSES_BIN is not set"),
]

MINUTE_MS = 60_000


def minute_ago(minutes: int) -> int:
    now = int(time.time() * 1000)
    return (now // MINUTE_MS - minutes) * MINUTE_MS


def push_and_check(stack: Stack, key: str, expected: Dict[Key, Tuple[Decimal, int]], push_at: int) -> None:
    """Sends one late-enough pulse per tenant (closing every earlier window), then
    waits for the final aggregates and compares them with ``expected``."""
    push_at = push_at // MINUTE_MS * MINUTE_MS
    tenants = sorted({k[0] for k in expected})
    with Meter(stack.url, key, tenant_id=None, flush_interval=0.2) as m:
        for t in tenants:
            m.record("push", 1, "push", tenant_id=t, timestamp=push_at)
        assert m.flush(timeout=60)
    got = stack.wait_for_totals(expected, before_ms=push_at)
    missing = {k: (got.get(k), v) for k, v in expected.items() if got.get(k) != v}
    extra = {k: v for k, v in got.items() if k not in expected}
    assert not missing and not extra, (
        f"final aggregates differ from what was sent: (got, want) {missing}; unexpected {extra}; "
        f"dlq={stack.dlq_count()}"
    )


@pytest.fixture
def stack(tmp_path):
    s = Stack(tmp_path)
    yield s
    codes = s.stop()
    assert codes == {"serve": 0, "run": 0}, f"exit codes after SIGTERM: {codes}"


def test_fastapi_middleware_2000_requests_over_two_routes_are_counted_exactly(stack: Stack) -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from pulses_meter.asgi import MeteringMiddleware

    key = stack.create_key()  # an admin key: the tenant comes from each request
    meter = Meter(stack.url, key, tenant_id=None)
    app = FastAPI()

    @app.get("/items/{item_id}")
    def item(item_id: int) -> dict:
        return {"id": item_id}

    @app.post("/orders")
    def order() -> dict:
        return {"ok": True}

    app.add_middleware(MeteringMiddleware, meter=meter, tenant=header_tenant("X-Tenant-Id"))
    rng = random.Random(7)
    tenants = ["acme", "globex"]
    calls: Counter = Counter()
    started = int(time.time() * 1000)
    with TestClient(app) as client:
        for i in range(2000):
            tenant = rng.choice(tenants)
            if rng.random() < 0.6:
                assert client.get(f"/items/{i}", headers={"X-Tenant-Id": tenant}).status_code == 200
                calls[(tenant, "items.:item_id", "request")] += 1
            else:
                assert client.post("/orders", headers={"X-Tenant-Id": tenant}).status_code == 200
                calls[(tenant, "orders", "request")] += 1
    assert meter.close(timeout=60) is True
    s = meter.stats()
    assert (s.recorded, s.sent, s.failed, s.buffered) == (2000, 2000, 0, 0), s
    expected = {k: (Decimal(n), n) for k, n in calls.items()}
    push_and_check(stack, key, expected, push_at=started + 10 * MINUTE_MS + MINUTE_MS)
    print(f"\n[integration a] 2000 requests over 2 routes -> {dict(calls)}; requests={s.requests}")


def test_serve_killed_and_restarted_while_recording_100000_pulses_nothing_lost_nothing_doubled(tmp_path) -> None:
    stack = Stack(tmp_path)
    try:
        key = stack.create_key("acme")
        t0 = minute_ago(30)
        skus = ["vm.small", "vm.large", "storage.gb"]
        expected: Dict[Key, list] = defaultdict(lambda: [Decimal(0), 0])
        meter = Meter(stack.url, key, tenant_id="acme")
        total = 100_000
        killed_at = restarted_at = None
        overflowed = 0
        started = time.monotonic()

        def chaos() -> None:
            nonlocal killed_at, restarted_at
            stack.serve.kill9()
            killed_at = time.monotonic() - started
            time.sleep(3.0)
            stack.restart_serve()
            restarted_at = time.monotonic() - started

        chaos_thread = threading.Thread(target=chaos, daemon=True)
        sent_before_kill = 0
        for i in range(total):
            if i == 40_000:
                # In the middle of the workload: SIGKILL serve, restart it 3 s later
                # on the same port, while this thread keeps recording.
                sent_before_kill = meter.stats().sent
                chaos_thread.start()
            sku = skus[i % 3]
            amount = Decimal(i % 997) / 100  # exact: 0.00 .. 9.96
            ts = t0 + (i * 7) % (5 * MINUTE_MS)  # five minute-windows
            while True:
                try:
                    meter.record(sku, amount, "unit", timestamp=ts)
                    break
                except BufferFull:
                    overflowed += 1
                    time.sleep(0.05)
            e = expected[("acme", sku, "unit")]
            e[0] += amount
            e[1] += 1
            if i % 1000 == 999:
                time.sleep(0.08)  # paced: ~8 s of recording, so the outage falls inside it
        recorded_in = time.monotonic() - started
        assert meter.close(timeout=180) is True
        elapsed = time.monotonic() - started
        chaos_thread.join(60)
        s = meter.stats()
        assert killed_at is not None and restarted_at is not None and killed_at < recorded_in, (killed_at, recorded_in)
        assert (s.recorded, s.sent, s.failed, s.buffered) == (total, total, 0, 0), s
        assert s.retried > 0, "the kill should have made the meter retry"
        push_and_check(stack, key, {k: (v[0], v[1]) for k, v in expected.items()}, push_at=t0 + 15 * MINUTE_MS)
        print(
            f"\n[integration b] {total} pulses through one Meter; serve SIGKILLed at {killed_at:.1f}s, "
            f"back at {restarted_at:.1f}s ({sent_before_kill} acknowledged before the kill); recorded in {recorded_in:.1f}s, all acknowledged after {elapsed:.1f}s "
            f"= {total / elapsed:,.0f} pulses/s end to end (outage included); requests={s.requests} "
            f"retried={s.retried} overflowed={overflowed}; totals exact"
        )
    finally:
        codes = stack.stop()
    assert codes.get("run") == 0, codes


def test_defaults_batch_1000_records_into_4_requests_on_the_real_server(stack: Stack) -> None:
    key = stack.create_key("acme")
    t0 = minute_ago(30)
    meter = Meter(stack.url, key, tenant_id="acme")
    expected = [Decimal(0), 0]
    for i in range(1000):
        amount = Decimal(f"{i}.{i % 100:02d}")
        meter.record("vm.small", amount, "hour", timestamp=t0 + i)
        expected[0] += amount
        expected[1] += 1
    deadline = time.monotonic() + 30
    while meter.stats().sent < 1000 and time.monotonic() < deadline:
        time.sleep(0.05)
    s = meter.stats()
    assert (s.sent, s.requests, s.batches) == (1000, 4, 4), s
    assert meter.close() is True
    assert meter.stats().requests == 4
    push_and_check(stack, key, {("acme", "vm.small", "hour"): (expected[0], expected[1])}, push_at=t0 + 10 * MINUTE_MS)


def test_end_to_end_rate_through_one_meter(stack: Stack) -> None:
    """Pulses/s acknowledged by the real serve through one Meter (defaults), and exact."""
    key = stack.create_key("acme")
    t0 = minute_ago(30)
    n = 100_000
    meter = Meter(stack.url, key, tenant_id="acme")
    started = time.monotonic()
    for i in range(n):
        meter.record("api.call", 1, "request", timestamp=t0 + i % MINUTE_MS)
    recorded = time.monotonic() - started
    assert meter.close(timeout=300) is True
    elapsed = time.monotonic() - started
    s = meter.stats()
    assert (s.sent, s.failed) == (n, 0)
    push_and_check(stack, key, {("acme", "api.call", "request"): (Decimal(n), n)}, push_at=t0 + 10 * MINUTE_MS)
    print(f"\n[integration rate] {n} pulses recorded in {recorded:.2f}s, all acknowledged by pulses serve after "
          f"{elapsed:.2f}s: {n / elapsed:,.0f} pulses/s end to end through one Meter "
          f"(requests={s.requests}, retried={s.retried})")
