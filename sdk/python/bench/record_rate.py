#!/usr/bin/env python3
"""How many pulses a single thread can ``record()`` per second.

The meter runs as in production (defaults: batches of 250, its flusher thread
sending them) against a local sink that answers 202 at once, in a separate process
so it does not compete for this process's GIL. The flusher's work (joining and
sending batches) does share the GIL with the recording thread, as it would in a
service.

    python bench/record_rate.py [--count 500000] [--amount decimal|int|str] [--url URL]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from decimal import Decimal

from pulses_meter import BufferFull, Meter

SINK = r"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall
    def log_message(self, *a): pass
    def do_POST(self):
        data = self.rfile.read(int(self.headers["Content-Length"]))
        body = b'{"accepted":%d,"pulse_ids":[]}' % data.count(b'"pulse_id"')
        self.send_response(202)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
s = ThreadingHTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=500_000)
    ap.add_argument("--amount", choices=["decimal", "int", "str"], default="decimal")
    ap.add_argument("--attributes", action="store_true", help="give every pulse a small attributes object")
    ap.add_argument("--url", help="send to this server instead of a local sink")
    ap.add_argument("--api-key", default="bench")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    sink = None
    url = args.url
    if url is None:
        sink = subprocess.Popen([sys.executable, "-c", SINK], stdout=subprocess.PIPE, text=True)
        assert sink.stdout is not None
        url = f"http://127.0.0.1:{sink.stdout.readline().strip()}"
    amount = {"decimal": Decimal("0.25"), "int": 1, "str": "0.25"}[args.amount]
    attrs = {"region": "eu-west-1"} if args.attributes else None
    try:
        rates = []
        for round_ in range(args.rounds):
            meter = Meter(url, args.api_key, tenant_id="bench", max_buffered=max(100_000, args.count))
            record = meter.record
            n = args.count
            t0 = time.perf_counter()
            for _ in range(n):
                record("vm.small", amount, "hour", attrs)
            took = time.perf_counter() - t0
            t1 = time.perf_counter()
            ok = meter.close(timeout=120)
            drained = time.perf_counter() - t1
            s = meter.stats()
            rate = n / took
            rates.append(rate)
            print(f"round {round_ + 1}: {n} record() calls in {took:.3f}s = {rate:,.0f} records/s "
                  f"(then close() drained the rest in {drained:.2f}s; sent={s.sent} requests={s.requests} ok={ok})")
        rates.sort()
        print(f"record() rate, single thread, amount={args.amount}{' +attributes' if attrs else ''}: "
              f"median {rates[len(rates) // 2]:,.0f} records/s, best {rates[-1]:,.0f}, worst {rates[0]:,.0f} "
              f"({args.rounds} rounds of {args.count})")
    except BufferFull:
        print("BufferFull: the sink is slower than recording; raise max_buffered", file=sys.stderr)
        raise
    finally:
        if sink is not None:
            sink.terminate()
            sink.wait()


if __name__ == "__main__":
    main()
