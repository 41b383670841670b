"""A local counting stand-in for ``POST /v1/pulses`` (stdlib http.server, in a thread)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest

Response = Tuple[int, Dict[str, str], Any]


class Request:
    def __init__(self, at: float, headers: Dict[str, str], body: bytes) -> None:
        self.at = at
        self.headers = headers
        self.body = body
        self.pulses: List[Dict[str, Any]] = json.loads(body)
        self.status: Optional[int] = None

    @property
    def pulse_ids(self) -> List[str]:
        return [p["pulse_id"] for p in self.pulses]

    def __repr__(self) -> str:
        return f"Request({len(self.pulses)} pulses, status={self.status})"


def accept(req: Request) -> Response:
    return 202, {}, {"accepted": len(req.pulses), "pulse_ids": req.pulse_ids}


class FakeServer:
    """Records every request; ``respond(request) -> (status, headers, json body)``."""

    def __init__(self, port: int = 0) -> None:
        self.requests: List[Request] = []
        self.cond = threading.Condition()
        self.respond: Callable[[Request], Response] = accept
        self.delay = 0.0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                req = Request(time.monotonic(), {k.lower(): v for k, v in self.headers.items()}, body)
                with fake.cond:
                    respond = fake.respond
                    delay = fake.delay
                if delay:
                    time.sleep(delay)
                status, headers, payload = respond(req)
                req.status = status
                with fake.cond:
                    fake.requests.append(req)
                    fake.cond.notify_all()
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def wait_for(self, predicate: Callable[[List[Request]], bool], timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate(self.requests):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.cond.wait(remaining)
            return True

    def accepted_ids(self) -> List[str]:
        with self.cond:
            return [pid for r in self.requests if r.status == 202 for pid in r.pulse_ids]

    def snapshot(self) -> List[Request]:
        with self.cond:
            return list(self.requests)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.stop()
