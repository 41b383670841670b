"""AsyncMeter: the same batching, retries and close semantics on an event loop."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from typing import List

from pulses_meter import AsyncMeter, BufferFull, MeterError

from conftest import FakeServer, Request, accept


def test_async_batches_of_250_and_close_flushes_the_rest(server: FakeServer) -> None:
    async def main() -> List[str]:
        async with AsyncMeter(server.url, "secret", tenant_id="acme") as meter:
            ids = [meter.record("vm.small", Decimal("0.5"), "hour") for _ in range(600)]
            await asyncio.sleep(0.5)
            assert [len(r.pulses) for r in server.snapshot()] == [250, 250]
        assert meter.stats().sent == 600 and meter.stats().buffered == 0
        return ids

    ids = asyncio.run(main())
    assert [len(r.pulses) for r in server.snapshot()] == [250, 250, 100]
    assert server.accepted_ids() == ids


def test_async_timer_flush_after_the_interval(server: FakeServer) -> None:
    async def main() -> float:
        meter = AsyncMeter(server.url, "secret", tenant_id="acme", flush_interval=1.0)
        t0 = time.monotonic()
        meter.record("vm.small", 1, "hour")
        while not server.snapshot():
            await asyncio.sleep(0.02)
        took = time.monotonic() - t0
        await meter.aclose()
        return took

    took = asyncio.run(main())
    assert 0.9 <= took <= 1.6


def test_async_retry_then_success_and_refusal(server: FakeServer) -> None:
    answers = [503, 400]

    def respond(req: Request):
        if answers:
            status = answers.pop(0)
            return status, {"Retry-After": "1"} if status == 503 else {}, {"error": "unavailable" if status == 503 else "invalid_pulse"}
        return accept(req)

    server.respond = respond
    errors: List[MeterError] = []

    async def main() -> None:
        meter = AsyncMeter(server.url, "secret", tenant_id="acme", batch_size=5, backoff=0.01, on_error=errors.append)
        ids = [meter.record("vm.small", 1, "hour") for _ in range(5)]
        assert await meter.flush(timeout=5.0) is False  # 503, then 400 for the same batch: refused
        reqs = server.snapshot()
        assert [r.status for r in reqs] == [503, 400]
        assert reqs[1].at - reqs[0].at >= 0.95
        assert reqs[0].pulse_ids == reqs[1].pulse_ids == ids
        more = [meter.record("vm.small", 1, "hour") for _ in range(5)]
        assert await meter.flush(timeout=5.0) is True
        assert server.accepted_ids() == more
        assert await meter.aclose() is True
        s = meter.stats()
        assert (s.recorded, s.sent, s.failed, s.retried, s.requests) == (10, 5, 5, 5, 3)

    asyncio.run(main())
    assert [e.code for e in errors] == ["invalid_pulse"]


def test_async_buffer_bound(server: FakeServer) -> None:
    server.respond = lambda req: (503, {}, {"error": "unavailable"})

    async def main() -> None:
        meter = AsyncMeter(server.url, "secret", tenant_id="acme", batch_size=10, max_buffered=50,
                           max_retries=0, backoff=0.01, max_backoff=0.02)
        n = 0
        try:
            for _ in range(1000):
                meter.record("vm.small", 1, "hour")
                n += 1
                await asyncio.sleep(0)
        except BufferFull:
            pass
        assert n == 50 and meter.stats().buffered == 50
        server.respond = accept
        assert await meter.flush(timeout=10.0) or await meter.flush(timeout=10.0)
        assert await meter.aclose()
        assert meter.stats().sent == 50

    asyncio.run(main())


def test_async_meter_not_closed_is_flushed_at_exit(server: FakeServer) -> None:
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import asyncio
        from pulses_meter import AsyncMeter
        async def main():
            m = AsyncMeter({server.url!r}, "secret", tenant_id="acme")
            for i in range(3):
                m.record("vm.small", i, "hour")
        asyncio.run(main())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert [len(r.pulses) for r in server.snapshot()] == [3]


def test_async_decorator(server: FakeServer) -> None:
    async def main() -> None:
        async with AsyncMeter(server.url, "secret", tenant_id="acme") as meter:

            @meter.metered(product_sku="llm.tokens", use_unit="token", amount=lambda r: r)
            async def tokens(n: int) -> int:
                return n

            assert await tokens(3) == 3
            assert await tokens(4) == 4

    asyncio.run(main())
    assert [p["used_amount"] for p in server.snapshot()[0].pulses] == ["3", "4"]


def test_async_meter_survives_its_first_loop(server: FakeServer) -> None:
    meter = AsyncMeter(server.url, "secret", tenant_id="acme", flush_interval=0.3)

    async def first() -> None:
        meter.record("vm.small", 1, "hour")
        assert await meter.flush(timeout=5.0)

    async def second() -> None:  # a new loop: the flusher starts again there
        meter.record("vm.small", 2, "hour")
        await asyncio.sleep(1.0)
        assert await meter.aclose()

    asyncio.run(first())
    asyncio.run(second())
    assert [p["used_amount"] for r in server.snapshot() for p in r.pulses] == ["1", "2"]
