"""``POST /v1/pulses`` over the standard library's ``http.client`` (keep-alive)."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from email.utils import parsedate_to_datetime
from datetime import datetime, timezone
from typing import Any, Dict, Optional
from urllib.parse import urlsplit

from . import __version__

#: Answers worth retrying: the request may succeed later, unchanged.
RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


class Outcome:
    """The answer to one request. ``kind`` is ``"ok"``, ``"retry"`` or ``"fatal"``."""

    __slots__ = ("kind", "status", "retry_after", "payload", "error")

    def __init__(
        self,
        kind: str,
        status: Optional[int] = None,
        retry_after: Optional[float] = None,
        payload: Optional[Dict[str, Any]] = None,
        error: Optional[str] = None,
    ) -> None:
        self.kind = kind
        self.status = status
        self.retry_after = retry_after
        self.payload = payload
        self.error = error

    def describe(self) -> str:
        if self.status is None:
            return self.error or "no answer"
        code = (self.payload or {}).get("error")
        detail = (self.payload or {}).get("detail")
        return f"HTTP {self.status}" + (f" {code}" if code else "") + (f": {detail}" if detail else "")

    def __repr__(self) -> str:
        return f"Outcome({self.kind}, {self.describe()})"


def parse_retry_after(value: Optional[str]) -> Optional[float]:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(int(value)))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


class HttpTransport:
    """Sends request bodies to ``<url>/v1/pulses``; one persistent connection.

    Not thread-safe: the meter's flusher is its only user, one request at a time.
    """

    def __init__(
        self,
        url: str,
        api_key: str,
        timeout: float = 30.0,
        ssl_context: Optional[ssl.SSLContext] = None,
        headers: Optional[Dict[str, str]] = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must be http(s)://host[:port][/prefix], not {url!r}")
        self.url = url
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        base = parts.path.rstrip("/")
        self.path = base if base.endswith("/v1/pulses") else base + "/v1/pulses"
        self.timeout = timeout
        self._ssl = ssl_context
        self._headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": f"pulses-meter/{__version__} (python)",
            "X-API-Key": api_key,
        }
        if headers:
            self._headers.update(headers)
        self._conn: Optional[http.client.HTTPConnection] = None

    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        if self._https:
            ctx = self._ssl or ssl.create_default_context()
            return http.client.HTTPSConnection(self._host, self._port, timeout=timeout, context=ctx)
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    def send(self, body: bytes, timeout: Optional[float] = None) -> Outcome:
        timeout = self.timeout if timeout is None else max(0.05, timeout)
        for _ in range(2):
            reused = self._conn is not None
            conn = self._conn or self._connect(timeout)
            self._conn = conn
            try:
                conn.timeout = timeout
                if conn.sock is not None:
                    conn.sock.settimeout(timeout)
                conn.request("POST", self.path, body=body, headers=self._headers)
                resp = conn.getresponse()
                data = resp.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as e:
                self.close()
                if reused:
                    # A keep-alive connection the server had already closed: once more,
                    # on a new one (the same pulse_ids; a duplicate is harmless).
                    continue
                return Outcome("retry", error=f"connection lost: {e!r}")
            except socket.timeout:
                self.close()
                return Outcome("retry", error=f"no answer within {timeout:.1f}s")
            except (OSError, http.client.HTTPException) as e:
                self.close()
                return Outcome("retry", error=f"connection failed: {e!r}")
            if resp.will_close:
                self.close()
            return classify(resp.status, resp.getheader("Retry-After"), data)
        return Outcome("retry", error="connection lost twice")


def classify(status: int, retry_after: Optional[str], data: bytes) -> Outcome:
    payload: Optional[Dict[str, Any]] = None
    try:
        parsed = json.loads(data) if data else None
        if isinstance(parsed, dict):
            payload = parsed
    except ValueError:
        payload = {"detail": data[:500].decode("utf-8", "replace")}
    if 200 <= status < 300:
        return Outcome("ok", status, payload=payload)
    if status in RETRYABLE_STATUSES or status >= 500:
        return Outcome("retry", status, parse_retry_after(retry_after), payload)
    return Outcome("fatal", status, payload=payload)
