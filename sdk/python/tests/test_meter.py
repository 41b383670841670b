"""Meter against a local counting HTTP server: batching, timing, retries, errors, bounds."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
import time
import tracemalloc
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import List

import pytest

from pulses_meter import BufferFull, Meter, MeterClosed, MeterError

from conftest import FakeServer, Request, accept


def new_meter(server: FakeServer, **kw) -> Meter:
    kw.setdefault("tenant_id", "acme")
    return Meter(server.url, "secret", **kw)


# --------------------------------------------------------------------- batching


def test_1000_records_in_one_second_make_exactly_4_requests_of_250(server: FakeServer) -> None:
    meter = new_meter(server)  # the defaults: 250 pulses or 5 s
    started = time.monotonic()
    ids = []
    for i in range(10):  # 1,000 records spread over ~1 s
        ids += [meter.record("vm.small", Decimal("0.25"), "hour") for _ in range(100)]
        time.sleep(0.1)
    assert time.monotonic() - started < 2.0
    assert server.wait_for(lambda rs: len(rs) >= 4, timeout=3.0)
    time.sleep(0.5)  # nothing else may follow
    requests = server.snapshot()
    assert [len(r.pulses) for r in requests] == [250, 250, 250, 250]
    assert [pid for r in requests for pid in r.pulse_ids] == ids  # in order, each once
    assert len(set(ids)) == 1000
    s = meter.stats()
    assert (s.recorded, s.sent, s.requests, s.batches, s.buffered, s.retried) == (1000, 1000, 4, 4, 0, 0)
    assert meter.close() is True
    assert len(server.snapshot()) == 4  # close had nothing left to send
    first = requests[0]
    assert first.headers["x-api-key"] == "secret"
    assert first.headers["content-type"] == "application/json"
    p = first.pulses[0]
    assert p["tenant_id"] == "acme" and p["product_sku"] == "vm.small" and p["use_unit"] == "hour"
    assert p["used_amount"] == "0.25"  # a JSON string: exact
    assert isinstance(p["timestamp"], int)


def test_10_records_make_one_request_after_the_flush_interval(server: FakeServer) -> None:
    meter = new_meter(server)
    started = time.monotonic()
    for _ in range(10):
        meter.record("vm.small", 1, "hour")
    # Poll: nothing before 4.5 s, one request of 10 by ~5 s.
    seen_at = None
    while time.monotonic() - started < 8.0:
        if server.snapshot():
            seen_at = time.monotonic() - started
            break
        time.sleep(0.02)
    assert seen_at is not None, "no request within 8 s"
    assert 4.5 <= seen_at <= 6.0, f"flushed after {seen_at:.2f}s, want ~5s"
    requests = server.snapshot()
    assert [len(r.pulses) for r in requests] == [10]
    assert meter.close() is True
    assert len(server.snapshot()) == 1


def test_the_interval_counts_from_the_oldest_waiting_pulse(server: FakeServer) -> None:
    meter = new_meter(server, flush_interval=1.0)
    time.sleep(1.5)  # an idle meter sends nothing, and its clock does not run
    assert server.snapshot() == []
    t0 = time.monotonic()
    meter.record("vm.small", 1, "hour")
    time.sleep(0.5)
    meter.record("vm.small", 1, "hour")
    assert server.wait_for(lambda rs: len(rs) == 1, timeout=3.0)
    assert 0.9 <= server.snapshot()[0].at - t0 <= 1.4
    assert len(server.snapshot()[0].pulses) == 2
    meter.close()


def test_close_flushes_the_rest_at_once(server: FakeServer) -> None:
    meter = new_meter(server)
    ids = [meter.record("vm.small", 1, "hour") for _ in range(260)]
    assert server.wait_for(lambda rs: len(rs) == 1, timeout=3.0)
    t0 = time.monotonic()
    assert meter.close() is True
    assert time.monotonic() - t0 < 1.0  # did not wait for the 5 s timer
    assert [len(r.pulses) for r in server.snapshot()] == [250, 10]
    assert server.accepted_ids() == ids
    assert meter.stats().buffered == 0
    with pytest.raises(MeterClosed):
        meter.record("vm.small", 1, "hour")
    assert meter.close() is True  # idempotent


def test_context_manager_and_flush_on_demand(server: FakeServer) -> None:
    with new_meter(server) as meter:
        meter.record("vm.small", 1, "hour")
        assert meter.flush(timeout=3.0) is True
        assert len(server.snapshot()) == 1
        meter.record("vm.small", 2, "hour")
        meter.record("vm.small", 3, "hour")
    assert [len(r.pulses) for r in server.snapshot()] == [1, 2]
    assert meter.closed


def test_exit_without_close_flushes_at_interpreter_exit(server: FakeServer) -> None:
    script = textwrap.dedent(f"""
        from pulses_meter import Meter
        m = Meter({server.url!r}, "secret", tenant_id="acme")
        for i in range(7):
            m.record("vm.small", i, "hour")
        print("recorded", flush=True)
    """)
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - t0 < 4.0  # the atexit hook sent them at once
    assert [len(r.pulses) for r in server.snapshot()] == [7]


# --------------------------------------------------------------------- retries


def test_503_with_retry_after_then_success_resends_the_same_pulse_ids(server: FakeServer) -> None:
    answers = [503, 503]

    def respond(req: Request):
        if answers:
            return answers.pop(0), {"Retry-After": "1"}, {"error": "unavailable", "detail": "broker slow"}
        return accept(req)

    server.respond = respond
    meter = new_meter(server, batch_size=10, backoff=0.05)
    ids = [meter.record("vm.small", Decimal("1.5"), "hour") for _ in range(10)]
    assert meter.flush(timeout=10.0) is True
    requests = server.snapshot()
    assert [r.status for r in requests] == [503, 503, 202]
    assert requests[0].body == requests[1].body == requests[2].body  # byte for byte
    assert all(r.pulse_ids == ids for r in requests)
    gaps = [b.at - a.at for a, b in zip(requests, requests[1:])]
    assert all(g >= 0.95 for g in gaps), f"Retry-After: 1 not honoured: {gaps}"
    s = meter.stats()
    assert (s.sent, s.retried, s.requests, s.batches, s.failed, s.buffered) == (10, 20, 3, 1, 0, 0)
    assert meter.close()


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_transient_statuses_are_retried(server: FakeServer, status: int) -> None:
    answers = [status]
    server.respond = lambda req: (answers.pop(), {}, {"error": "x"}) if answers else accept(req)
    meter = new_meter(server, batch_size=5, backoff=0.01)
    ids = [meter.record("vm.small", 1, "hour") for _ in range(5)]
    assert meter.flush(timeout=5.0)
    assert [r.status for r in server.snapshot()] == [status, 202]
    assert server.accepted_ids() == ids
    meter.close()


def test_a_timeout_is_retried_with_the_same_pulse_ids(server: FakeServer) -> None:
    server.delay = 1.0  # the first answer comes after the client's timeout
    meter = new_meter(server, batch_size=3, backoff=0.01, timeout=0.3)
    ids = [meter.record("vm.small", 1, "hour") for _ in range(3)]
    time.sleep(0.5)
    server.delay = 0.0
    assert meter.flush(timeout=10.0)
    assert server.wait_for(lambda rs: len(rs) >= 2, timeout=3.0)  # the slow first answer is logged late
    requests = server.snapshot()
    assert all(r.pulse_ids == ids for r in requests)  # the late answer too: a duplicate the server de-duplicates
    s = meter.stats()
    assert s.sent == 3 and s.retried >= 3 and s.failed == 0
    meter.close()


def test_connection_refused_then_the_server_comes_up() -> None:
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    meter = Meter(f"http://127.0.0.1:{port}", "secret", tenant_id="acme", batch_size=4, backoff=0.2, max_backoff=0.5)
    ids = [meter.record("vm.small", 1, "hour") for _ in range(4)]
    time.sleep(1.0)
    assert meter.stats().sent == 0 and meter.stats().requests >= 2
    late = FakeServer(port)
    try:
        assert meter.flush(timeout=10.0)
        assert meter.close(timeout=5.0)
        assert late.accepted_ids() == ids
        s = meter.stats()
        assert s.sent == 4 and s.failed == 0 and s.retried >= 4
    finally:
        late.stop()


# --------------------------------------------------------------------- refusals


def test_400_invalid_pulse_goes_to_on_error_and_is_not_retried(server: FakeServer) -> None:
    errors: List[MeterError] = []
    server.respond = lambda req: (400, {}, {
        "error": "invalid_pulse", "detail": "1 pulse is invalid",
        "errors": [{"index": 3, "reason": "negative_amount", "detail": "used_amount -1 is negative"}],
    })
    meter = new_meter(server, batch_size=10, backoff=0.01, on_error=errors.append)
    ids = [meter.record("vm.small", 1, "hour") for _ in range(10)]
    assert meter.flush(timeout=5.0) is False
    time.sleep(1.0)
    assert len(server.snapshot()) == 1  # not retried
    assert len(errors) == 1
    e = errors[0]
    assert (e.kind, e.status, e.code, e.count) == ("rejected", 400, "invalid_pulse", 10)
    assert e.errors == [{"index": 3, "reason": "negative_amount", "detail": "used_amount -1 is negative"}]
    assert e.pulse_ids == ids  # nothing silently lost: the caller has them
    s = meter.stats()
    assert (s.failed, s.sent, s.buffered, s.retried, s.requests) == (10, 0, 0, 0, 1)
    assert "invalid_pulse" in (s.last_error or "")
    meter.close()
    assert len(server.snapshot()) == 1


@pytest.mark.parametrize("status,code", [(401, "unauthorized"), (403, "forbidden_tenant"), (413, "body_too_large")])
def test_other_refusals_are_reported_and_not_retried(server: FakeServer, status: int, code: str) -> None:
    errors: List[MeterError] = []
    server.respond = lambda req: (status, {}, {"error": code, "detail": "no"})
    meter = new_meter(server, batch_size=2, backoff=0.01, on_error=errors.append)
    meter.record("vm.small", 1, "hour")
    meter.record("vm.small", 1, "hour")
    assert meter.flush(timeout=5.0) is False
    time.sleep(0.3)
    assert len(server.snapshot()) == 1
    assert [(e.kind, e.status, e.code) for e in errors] == [("rejected", status, code)]
    assert meter.stats().failed == 2
    meter.close()


def test_a_refused_batch_does_not_hold_up_the_next(server: FakeServer) -> None:
    n = {"i": 0}

    def respond(req: Request):
        n["i"] += 1
        return (400, {}, {"error": "invalid_pulse"}) if n["i"] == 1 else accept(req)

    server.respond = respond
    meter = new_meter(server, batch_size=2, on_error=lambda e: None)
    for _ in range(4):
        meter.record("vm.small", 1, "hour")
    meter.close()
    s = meter.stats()
    assert (s.failed, s.sent) == (2, 2)


# --------------------------------------------------------------------- bounds


def test_buffer_bound_holds_while_the_server_answers_503_forever(server: FakeServer) -> None:
    server.respond = lambda req: (503, {"Retry-After": "0"}, {"error": "unavailable"})
    meter = new_meter(server, batch_size=100, max_buffered=1000, max_retries=1, backoff=0.01, max_backoff=0.05)
    accepted = []
    with pytest.raises(BufferFull):
        while True:
            accepted.append(meter.record("vm.small", 1, "hour"))
    # Exactly max_buffered pulses were taken, and memory stays there however long we push.
    assert len(accepted) == 1000
    gc.collect()
    tracemalloc.start()
    mine = [tracemalloc.Filter(True, "*pulses_meter*")]
    before = tracemalloc.take_snapshot().filter_traces(mine)
    refused = 0
    for _ in range(20_000):
        try:
            meter.record("vm.small", 1, "hour")
        except BufferFull:
            refused += 1
    gc.collect()
    after = tracemalloc.take_snapshot().filter_traces(mine)
    tracemalloc.stop()
    grown = sum(d.size_diff for d in after.compare_to(before, "filename"))
    s = meter.stats()
    assert refused == 20_000
    assert s.buffered == 1000 and s.recorded == 1000 and s.overflowed == refused + 1
    assert s.degraded and s.sent == 0 and s.failed == 0
    assert grown < 256 * 1024, f"the meter memory grew by {grown} bytes while refusing {refused} records"
    assert server.wait_for(lambda rs: len(rs) >= 3, timeout=5.0)  # it keeps probing
    # The API comes back: everything buffered is delivered, each pulse once.
    server.respond = accept
    assert meter.flush(timeout=30.0) or meter.flush(timeout=30.0)
    assert sorted(server.accepted_ids()) == sorted(accepted)
    s = meter.stats()
    assert (s.sent, s.buffered, s.degraded) == (1000, 0, False)
    meter.record("vm.small", 1, "hour")  # accepting again
    assert meter.close()


def test_close_deadline_with_the_api_down_reports_what_is_unsent(server: FakeServer) -> None:
    server.respond = lambda req: (503, {}, {"error": "unavailable"})
    errors: List[MeterError] = []
    meter = new_meter(server, batch_size=10, backoff=0.05, max_backoff=0.1, on_error=errors.append)
    ids = [meter.record("vm.small", 1, "hour") for _ in range(25)]
    t0 = time.monotonic()
    assert meter.close(timeout=1.0) is False
    assert time.monotonic() - t0 < 3.0
    unsent = [e for e in errors if e.kind == "unsent"]
    assert len(unsent) == 1 and sorted(unsent[0].pulse_ids) == sorted(ids)
    s = meter.stats()
    assert (s.failed, s.buffered, s.sent) == (25, 0, 0)


def test_spill_file_keeps_memory_bounded_and_a_later_meter_sends_it(server: FakeServer, tmp_path) -> None:
    spill = str(tmp_path / "meter.spill")
    server.respond = lambda req: (503, {}, {"error": "unavailable"})
    meter = new_meter(server, batch_size=50, max_buffered=200, max_retries=0, backoff=0.01, max_backoff=0.05,
                      spill_path=spill)
    ids = []
    for i in range(2000):  # 10x max_buffered: the overflow goes to disk, not to BufferFull
        while True:
            try:
                ids.append(meter.record("vm.small", 1, "hour", attributes={"i": i}))
                break
            except BufferFull:
                time.sleep(0.01)  # the flusher is writing the spill file
        assert meter._core.mem <= 200
    s = meter.stats()
    assert s.recorded == 2000 and s.spilled > 0 and s.sent == 0
    assert meter.close(timeout=0.5) is False  # the rest goes to the file too
    s = meter.stats()
    assert (s.spilled, s.buffered, s.failed) == (2000, 2000, 0)
    with open(spill) as f:
        lines = [json.loads(line) for line in f]
    assert sorted(p["pulse_id"] for p in lines) == sorted(ids)
    # A new process (here: a new meter) finds the file and sends it.
    server.respond = accept
    again = new_meter(server, batch_size=50, spill_path=spill)
    assert again.stats().recovered == 2000
    assert again.flush(timeout=30.0) is True
    assert again.close() is True
    accepted = server.accepted_ids()
    assert sorted(accepted) == sorted(ids) and len(accepted) == len(set(accepted))
    assert os.path.getsize(spill) == 0
    s = again.stats()
    assert (s.recovered, s.sent, s.buffered) == (2000, 2000, 0)


def test_a_batch_over_5_mib_is_split(server: FakeServer) -> None:
    meter = new_meter(server, batch_size=60)
    big = "x" * 100_000
    for i in range(60):
        meter.record("vm.small", 1, "hour", attributes={"blob": big, "i": i})
    assert meter.flush(timeout=10.0)
    sizes = [len(r.pulses) for r in server.snapshot()]
    assert sum(sizes) == 60 and len(sizes) == 2
    assert all(len(r.body) <= 5 * 1024 * 1024 for r in server.snapshot())
    meter.close()


# --------------------------------------------------------------------- values


def test_float_amounts_are_refused(server: FakeServer) -> None:
    meter = new_meter(server)
    with pytest.raises(TypeError, match="float"):
        meter.record("vm.small", 1.5, "hour")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        meter.record("vm.small", True, "hour")  # type: ignore[arg-type]
    assert meter.stats().recorded == 0
    meter.close()


@pytest.mark.parametrize("amount,sent", [
    (Decimal("1.50"), "1.50"), (7, "7"), ("0.000000651", "0.000000651"), (Decimal("6.51E-7"), "0.000000651"),
    (" 12.5 ", "12.5"), (Decimal("-0"), "0"), ("1E+3", "1000"), (Decimal("1.0000000000000000000000000000000"), "1"),
])
def test_amounts_are_sent_exactly(server: FakeServer, amount, sent) -> None:
    meter = new_meter(server, batch_size=1)
    meter.record("vm.small", amount, "hour")
    assert meter.flush(timeout=3.0)
    assert server.snapshot()[0].pulses[0]["used_amount"] == sent
    meter.close()


@pytest.mark.parametrize("kwargs,error", [
    (dict(amount=-1), ValueError), (dict(amount=Decimal("NaN")), ValueError), (dict(amount="abc"), ValueError),
    (dict(amount=Decimal("1E-29")), ValueError), (dict(amount=2**96), ValueError),
    (dict(product_sku="vm small"), ValueError), (dict(product_sku=""), ValueError), (dict(use_unit="x" * 129), ValueError),
    (dict(tenant_id="a/b"), ValueError), (dict(pulse_id=""), ValueError), (dict(pulse_id="p" * 257), ValueError),
    (dict(timestamp=datetime(2026, 1, 1)), ValueError), (dict(timestamp=1.5), TypeError), (dict(timestamp="yesterday"), ValueError),
    (dict(attributes={"x": float("nan")}), ValueError), (dict(attributes=[1]), TypeError),
])
def test_invalid_pulses_are_refused_at_record_time(server: FakeServer, kwargs, error) -> None:
    meter = new_meter(server)
    args = dict(product_sku="vm.small", amount=1, use_unit="hour")
    args.update(kwargs)
    with pytest.raises(error):
        meter.record(**args)
    assert meter.stats().recorded == 0
    meter.close()
    assert server.snapshot() == []


def test_pulse_fields(server: FakeServer) -> None:
    meter = Meter(server.url, "k", tenant_id=None, batch_size=4)
    with pytest.raises(ValueError, match="tenant_id"):
        meter.record("vm.small", 1, "hour")
    when = datetime(2026, 12, 3, 10, 0, 0, 123000, tzinfo=timezone.utc)
    meter.record("vm.small", 1, "hour", tenant_id="t1", timestamp=when, attributes={"region": "eu", "n": 1})
    meter.record("vm.small", 1, "hour", tenant_id="t2", timestamp="2026-12-03T11:00:00.5+01:00", pulse_id='my "id"')
    meter.record("vm.small", 1, "hour", tenant_id="t3", timestamp=1796292000123)
    meter.record("vm.small", 1, "hour", tenant_id="t4", timestamp=when + timedelta(hours=1))
    assert meter.flush(timeout=3.0)
    p = server.snapshot()[0].pulses
    assert [x["tenant_id"] for x in p] == ["t1", "t2", "t3", "t4"]
    assert [x["timestamp"] for x in p] == [1796292000123, 1796292000500, 1796292000123, 1796295600123]
    assert p[0]["attributes"] == {"region": "eu", "n": 1} and "attributes" not in p[1]
    assert p[1]["pulse_id"] == 'my "id"'
    meter.close()


# --------------------------------------------------------------------- decorator


def test_metered_sync_and_async_functions(server: FakeServer) -> None:
    import asyncio

    errors: List[MeterError] = []
    meter = new_meter(server, on_error=errors.append)

    @meter.metered(product_sku="report.render", use_unit="call")
    def render(n: int) -> str:
        return "x" * n

    @meter.metered(product_sku="report.bytes", use_unit="byte", amount=len, attributes=lambda r: {"size": len(r)})
    def render_bytes(n: int) -> str:
        return "x" * n

    @meter.metered(product_sku="llm.tokens", use_unit="token", amount=lambda r: r["tokens"])
    async def complete(prompt: str) -> dict:
        await asyncio.sleep(0)
        return {"tokens": Decimal(len(prompt))}

    @meter.metered(product_sku="failing", use_unit="call")
    def fails() -> None:
        raise RuntimeError("boom")

    @meter.metered(product_sku="bad", use_unit="call", amount=lambda r: 0.5)
    def float_amount() -> int:
        return 42

    assert render.__name__ == "render"
    assert render(3) == "xxx" and render(1) == "x"
    assert render_bytes(5) == "xxxxx"
    assert asyncio.run(complete("hello")) == {"tokens": Decimal(5)}
    assert asyncio.iscoroutinefunction(complete)
    with pytest.raises(RuntimeError):
        fails()
    assert float_amount() == 42  # the caller still gets its result
    assert meter.flush(timeout=3.0)
    pulses = [p for r in server.snapshot() for p in r.pulses]
    got = [(p["product_sku"], p["use_unit"], p["used_amount"], p.get("attributes")) for p in pulses]
    assert got == [
        ("report.render", "call", "1", None),
        ("report.render", "call", "1", None),
        ("report.bytes", "byte", "5", {"size": 5}),
        ("llm.tokens", "token", "5", None),
    ]
    assert meter.stats().record_errors == 1
    assert [e.kind for e in errors] == ["record"] and isinstance(errors[0].cause, TypeError)
    with pytest.raises(TypeError):
        meter.metered(product_sku="x", use_unit="y", amount=0.5)  # type: ignore[arg-type]
    meter.close()


def test_many_threads_record_concurrently(server: FakeServer) -> None:
    import threading

    meter = new_meter(server, batch_size=100)
    ids: List[List[str]] = [[] for _ in range(8)]

    def work(k: int) -> None:
        for _ in range(1000):
            ids[k].append(meter.record("vm.small", 1, "hour"))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert meter.close(timeout=10.0)
    every = [i for part in ids for i in part]
    accepted = server.accepted_ids()
    assert len(accepted) == 8000 and set(accepted) == set(every)
    assert all(len(r.pulses) == 100 for r in server.snapshot())


def test_frameworks_are_not_imported() -> None:
    code = (
        "import sys, pulses_meter, pulses_meter.asgi, pulses_meter.wsgi, pulses_meter.aio\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('starlette', 'fastapi', 'flask', 'werkzeug', 'httpx', 'requests')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------- edges


def test_close_while_a_request_hangs_reports_what_may_be_undelivered(server: FakeServer) -> None:
    server.delay = 2.5
    errors: List[MeterError] = []
    meter = new_meter(server, batch_size=5, on_error=errors.append)  # request timeout 30 s
    ids = [meter.record("vm.small", 1, "hour") for _ in range(5)]
    time.sleep(0.2)  # the request is in flight
    t0 = time.monotonic()
    assert meter.close(timeout=0.1) is False
    assert time.monotonic() - t0 < 3.0
    assert [e.kind for e in errors] == ["unsent"] and errors[0].pulse_ids == ids
    # The request was not lost: it completes, and the counters say so.
    assert server.wait_for(lambda rs: len(rs) == 1, timeout=5.0)
    deadline = time.monotonic() + 5
    while meter.stats().sent < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert meter.stats().sent == 5


def test_flush_returns_false_when_the_server_stays_down(server: FakeServer) -> None:
    server.respond = lambda req: (503, {}, {"error": "unavailable"})
    meter = new_meter(server, batch_size=5, max_retries=2, backoff=0.01, on_error=lambda e: None)
    for _ in range(5):
        meter.record("vm.small", 1, "hour")
    t0 = time.monotonic()
    assert meter.flush(timeout=10.0) is False
    assert time.monotonic() - t0 < 2.0
    s = meter.stats()
    assert s.degraded and s.buffered == 5 and s.requests == 3 and s.retried == 10
    meter.close(timeout=0.2)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_starts_empty_and_sends_its_own(server: FakeServer) -> None:
    import warnings

    meter = new_meter(server, batch_size=100)
    parent_ids = [meter.record("vm.small", 1, "hour") for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            ok = meter.stats().buffered == 0
            child_ids = [meter.record("vm.small", 2, "hour") for _ in range(2)]
            ok = meter.close(timeout=5.0) and ok and len(set(child_ids) & set(parent_ids)) == 0
            code = 0 if ok else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert meter.close(timeout=5.0)
    pulses = [p for r in server.snapshot() for p in r.pulses]
    assert sorted(p["used_amount"] for p in pulses) == ["1", "1", "1", "2", "2"]
    assert len({p["pulse_id"] for p in pulses}) == 5


def test_spill_path_pid_placeholder_and_lock(server: FakeServer, tmp_path) -> None:
    path = str(tmp_path / "spill-{pid}.jsonl")
    meter = new_meter(server, spill_path=path)
    assert os.path.exists(str(tmp_path / f"spill-{os.getpid()}.jsonl"))
    with pytest.raises(RuntimeError, match="in use"):
        new_meter(server, spill_path=path)
    assert meter.close()


def test_record_from_threads_into_an_async_meter(server: FakeServer) -> None:
    import asyncio
    import threading

    from pulses_meter import AsyncMeter

    async def main() -> None:
        async with AsyncMeter(server.url, "secret", tenant_id="acme", batch_size=50, flush_interval=0.5) as meter:
            def work() -> None:
                for _ in range(120):
                    meter.record("vm.small", 1, "hour")

            threads = [threading.Thread(target=work) for _ in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert await meter.flush(timeout=5.0)

    asyncio.run(main())
    assert len(server.accepted_ids()) == 360
