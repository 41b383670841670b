#!/usr/bin/env python3
"""End-to-end pulses/s through one Meter to a real ``pulses serve``: from the first
``record()`` until ``close()`` returns with every pulse acknowledged (202).

Either against a running serve:

    python bench/e2e_rate.py --url http://127.0.0.1:8080 --api-key SECRET --tenant acme

or, with ``PULSES_BIN`` set (and a broker at ``PULSES_BOOTSTRAP_SERVERS``), against a
fresh ``pulses run`` + ``pulses serve`` it starts and stops itself:

    PULSES_BIN=.../pulses python bench/e2e_rate.py --count 100000 --batch-size 250 1000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from pulses_meter import Meter


def run(url: str, key: str, tenant: str, count: int, batch_size: int) -> None:
    meter = Meter(url, key, tenant_id=tenant, batch_size=batch_size, max_buffered=max(100_000, count))
    t0 = time.perf_counter()
    for _ in range(count):
        meter.record("bench.call", 1, "request")
    recorded = time.perf_counter() - t0
    ok = meter.close(timeout=600)
    took = time.perf_counter() - t0
    s = meter.stats()
    print(f"batch_size={batch_size}: {count} pulses recorded in {recorded:.2f}s, all acknowledged after {took:.2f}s "
          f"-> {count / took:,.0f} pulses/s end to end ({s.requests} requests, {took / max(1, s.requests) * 1000:.1f} ms "
          f"each, retried={s.retried}, failed={s.failed}, ok={ok})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url")
    ap.add_argument("--api-key")
    ap.add_argument("--tenant", default="bench")
    ap.add_argument("--count", type=int, default=100_000)
    ap.add_argument("--batch-size", type=int, nargs="+", default=[250])
    args = ap.parse_args()
    if args.url:
        for b in args.batch_size:
            run(args.url, args.api_key, args.tenant, args.count, b)
        return
    if not os.environ.get("PULSES_BIN"):
        sys.exit("give --url and --api-key, or set PULSES_BIN to start a pipeline")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from pulses_stack import Stack

    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(Path(tmp))
        try:
            key = stack.create_key(args.tenant)
            for b in args.batch_size:
                run(stack.url, key, args.tenant, args.count, b)
        finally:
            stack.stop()


if __name__ == "__main__":
    main()
