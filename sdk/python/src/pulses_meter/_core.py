"""The batching core shared by :class:`Meter` (a thread) and :class:`AsyncMeter` (a task).

State lives here, under one lock. ``record()`` encodes a pulse and appends it to the
open batch; a batch is sealed when it holds ``batch_size`` pulses or when its first
pulse has waited ``flush_interval`` seconds. The flusher is a generator, ``steps()``,
that yields effects (``wait`` for so long, ``call`` this blocking function) to a
driver: a thread for :class:`Meter`, an asyncio task with a thread executor for
:class:`AsyncMeter`. Same decisions, same counters, two ways of waiting.

Delivery rules:

* 202: the batch is acknowledged (``sent``).
* 408/425/429/5xx, timeouts, connection errors: the same batch (same bytes, same
  pulse_ids) is retried after an exponential backoff with jitter, never sooner than
  ``Retry-After``. After ``max_retries`` retries the meter is *degraded*: batches stay
  buffered (in memory up to ``max_buffered``; in ``spill_path`` if set) and one batch
  probes the server at growing intervals (up to ``max_backoff``) until it answers.
* Any other answer (400, 401, 403, 413, ...): the batch is not retried; its pulses
  are counted as ``failed`` and handed to ``on_error``.
"""

from __future__ import annotations

import logging
import os
import random
import threading
from collections import deque
from dataclasses import dataclass
from time import monotonic
from typing import Any, Callable, Deque, Generator, List, Optional, Tuple

from ._pulse import MAX_BODY_BYTES, Encoder
from ._transport import HttpTransport, Outcome
from .errors import BufferFull, MeterClosed, MeterError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("pulses_meter")

#: Longest ``Retry-After`` honoured as such (a bogus header must not park the meter for days).
MAX_RETRY_AFTER = 600.0


@dataclass(frozen=True)
class MeterStats:
    """Counters of a meter, in pulses unless named otherwise.

    Invariant: ``recorded + recovered == sent + failed + buffered``.
    """

    #: pulses accepted by ``record()``
    recorded: int
    #: pulses acknowledged by the server (202)
    sent: int
    #: pulses given up on and reported through ``on_error``: refused by the server
    #: (4xx other than 408/425/429), or still undelivered at the ``close()`` deadline
    #: without a spill file
    failed: int
    #: pulses sent again after a failed attempt (each resend counts)
    retried: int
    #: pulses held now and not yet acknowledged: in memory plus in the spill file
    buffered: int
    #: of ``buffered``, pulses in the spill file
    spilled: int
    #: pulses found in the spill file when the meter started (left by an earlier run)
    recovered: int
    #: ``record()`` calls refused with ``BufferFull``
    overflowed: int
    #: pulses the decorator or a middleware could not record (reported to ``on_error``)
    record_errors: int
    #: HTTP requests made, every attempt included
    requests: int
    #: requests answered 202
    batches: int
    #: True while the server is unreachable after ``max_retries`` retries
    degraded: bool
    #: the last delivery problem, if any
    last_error: Optional[str]


class Batch:
    """Pulses sent in one request. Its bytes never change, so resends are identical."""

    __slots__ = ("lines", "attempts", "_body", "from_spill", "spill_end", "state", "children")

    def __init__(self, lines: List[str], from_spill: bool = False, spill_end: int = 0) -> None:
        self.lines = lines
        self.attempts = 0
        self._body: Optional[bytes] = None
        self.from_spill = from_spill
        self.spill_end = spill_end
        #: None while pending; then "sent", "failed", "spilled", "unsent" or "split"
        self.state: Optional[str] = None
        self.children: List["Batch"] = []

    def body(self) -> bytes:
        if self._body is None:
            self._body = ("[" + ",".join(self.lines) + "]").encode("utf-8")
        return self._body

    def settled(self) -> Optional[bool]:
        """None while pending, else whether every pulse was acknowledged."""
        if self.state == "split":
            results = [c.settled() for c in self.children]
            return None if None in results else all(results)
        if self.state is None:
            return None
        return self.state == "sent"


class Spill:
    """Pulses that could not be delivered, one JSON object per line, oldest first.

    Only the flusher touches the file. Pulses are read back from ``offset`` in
    batches; the offset of the first pulse not yet acknowledged is kept in
    ``<path>.offset``, and the file is truncated once everything in it was sent. A
    crash can make the meter resend pulses from the file: they carry their
    pulse_ids, so the server's de-duplication counts them once.
    """

    def __init__(self, path: str, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._offset_path = path + ".offset"
        self._append = open(path, "ab")
        try:
            if fcntl is not None:
                fcntl.flock(self._append.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._append.close()
            raise RuntimeError(f"spill file {path} is in use by another process; give each process its own") from None
        self._read = open(path, "rb")
        size = os.fstat(self._append.fileno()).st_size
        # A crash in the middle of an append leaves a partial last line: drop it.
        if size:
            self._read.seek(max(0, size - 1))
            if self._read.read(1) != b"\n":
                self._read.seek(0)
                data = self._read.read()
                size = data.rfind(b"\n") + 1
                os.ftruncate(self._append.fileno(), size)
        self.size = size
        self.offset = 0
        try:
            with open(self._offset_path) as f:
                self.offset = int(f.read().strip() or 0)
        except (OSError, ValueError):
            self.offset = 0
        if not 0 <= self.offset <= self.size:
            self.offset = 0
        self.pending = 0
        self._read.seek(self.offset)
        for chunk in iter(lambda: self._read.read(1 << 20), b""):
            self.pending += chunk.count(b"\n")
        self.recovered = self.pending
        self.written_total = self.pending
        self.consumed_total = 0
        self.full = False

    def append(self, lines: List[str]) -> bool:
        data = ("\n".join(lines) + "\n").encode("utf-8")
        if self.size + len(data) > self.max_bytes:
            self.full = True
            return False
        self._append.write(data)
        self._append.flush()
        os.fsync(self._append.fileno())
        self.size += len(data)
        self.pending += len(lines)
        self.written_total += len(lines)
        return True

    def read(self, n: int) -> Optional[Batch]:
        self._read.seek(self.offset)
        lines: List[str] = []
        size = 2
        while len(lines) < n:
            pos = self._read.tell()
            raw = self._read.readline()
            if not raw:
                break
            size += len(raw)
            if lines and size > MAX_BODY_BYTES:
                self._read.seek(pos)  # the body would be too large: the rest next time
                break
            lines.append(raw.decode("utf-8").rstrip("\n"))
        if not lines:
            return None
        return Batch(lines, from_spill=True, spill_end=self._read.tell())

    def commit(self, batch: Batch) -> None:
        self.offset = batch.spill_end
        self.pending -= len(batch.lines)
        self.consumed_total += len(batch.lines)
        if self.offset >= self.size:
            os.ftruncate(self._append.fileno(), 0)
            self.size = self.offset = 0
            self.pending = 0
            self.full = False
            try:
                os.remove(self._offset_path)
            except FileNotFoundError:
                pass
        else:
            tmp = self._offset_path + ".tmp"
            with open(tmp, "w") as f:
                f.write(str(self.offset))
            os.replace(tmp, self._offset_path)

    def close(self) -> None:
        for f in (self._read, self._append):
            try:
                f.close()
            except OSError:
                pass


class FlushTicket:
    __slots__ = ("batches", "spill_target", "giveups")

    def __init__(self, batches: List[Batch], spill_target: int, giveups: int) -> None:
        self.batches = batches
        self.spill_target = spill_target
        self.giveups = giveups


Effect = Tuple[str, Any]


class Core:
    def __init__(
        self,
        *,
        url: str,
        api_key: str,
        tenant_id: Optional[str],
        batch_size: int,
        flush_interval: float,
        max_retries: int,
        max_buffered: int,
        backoff: float,
        max_backoff: float,
        timeout: float,
        spill_path: Optional[str],
        max_spill_bytes: int,
        on_error: Optional[Callable[[MeterError], None]],
        transport: Optional[HttpTransport] = None,
    ) -> None:
        if not 1 <= batch_size <= 10_000:
            raise ValueError("batch_size must be from 1 to 10000 (the server takes at most 10,000 pulses a request)")
        if flush_interval <= 0:
            raise ValueError("flush_interval must be > 0")
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if max_buffered < batch_size:
            raise ValueError("max_buffered must be at least batch_size")
        self.encoder = Encoder(tenant_id)
        self.transport = transport or HttpTransport(url, api_key, timeout=timeout)
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.max_retries = max_retries
        self.max_buffered = max_buffered
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.on_error = on_error
        self.spill_path = spill_path
        self.max_spill_bytes = max_spill_bytes
        self.spill: Optional[Spill] = Spill(spill_path.replace("{pid}", str(os.getpid())), max_spill_bytes) if spill_path else None
        self._init_state()
        # Set by the driver: wake the flusher; tell flush() waiters something settled.
        self.wake: Callable[[], None] = _nothing
        self.progress: Callable[[], None] = _nothing

    def _init_state(self) -> None:
        self.lock = threading.Lock()
        self.open: List[str] = []
        self.open_since = 0.0
        self.ready: Deque[Batch] = deque()
        self.inflight: Optional[Batch] = None
        self.spill_batch: Optional[Batch] = None
        self.mem = 0
        self.closed = False
        self.deadline: Optional[float] = None
        self.next_try = 0.0
        self.retry_after_until = 0.0
        self.degraded = False
        self.probe_failures = 0
        self.giveups = 0
        self.recorded = self.sent = self.failed = self.retried = 0
        self.overflowed = self.record_errors = self.requests = self.batches = 0
        self.last_error: Optional[str] = None
        self.spill_warned = False
        #: close() hit its deadline with pulses undelivered (spilled or reported)
        self.expired = False

    # ------------------------------------------------------------------ recording

    def add(self, line: str) -> None:
        wake = False
        with self.lock:
            if self.closed:
                raise MeterClosed("the meter is closed; record() before close()")
            if self.mem >= self.max_buffered:
                self.overflowed += 1
                raise BufferFull(
                    f"{self.mem} pulses are buffered (max_buffered={self.max_buffered}); the API is unreachable "
                    f"or slower than the recording rate ({self.last_error or 'no error yet'})"
                )
            op = self.open
            op.append(line)
            self.mem += 1
            self.recorded += 1
            n = len(op)
            if n == 1:
                self.open_since = monotonic()
                wake = True
            if n >= self.batch_size:
                self.ready.append(Batch(op))
                self.open = []
                wake = True
        if wake:
            self.wake()

    def _seal(self) -> None:
        if self.open:
            self.ready.append(Batch(self.open))
            self.open = []

    # ------------------------------------------------------------------ control

    def begin_flush(self) -> FlushTicket:
        with self.lock:
            self._seal()
            batches = list(self.ready)
            if self.inflight is not None:
                batches.append(self.inflight)
            spill = self.spill
            ticket = FlushTicket(batches, spill.written_total if spill else 0, self.giveups)
        self.wake()
        return ticket

    def flush_result(self, ticket: FlushTicket) -> Optional[bool]:
        """None while pending; True once all was acknowledged; False on a give-up."""
        with self.lock:
            results = [b.settled() for b in ticket.batches]
            spill_done = self.spill is None or self.spill.consumed_total >= ticket.spill_target
            if None not in results and spill_done:
                return all(results)
            if self.giveups > ticket.giveups:
                return False
            return None

    def begin_close(self, timeout: float) -> bool:
        """Stops recording and sets the deadline; False if it was already closing."""
        with self.lock:
            if self.closed:
                return False
            now = monotonic()
            self.closed = True
            self.deadline = now + max(0.0, timeout)
            self._seal()
            # Degraded: try once more at once (still honouring Retry-After).
            if self.degraded:
                self.next_try = max(now, self.retry_after_until)
        self.wake()
        return True

    def delivered_all(self) -> bool:
        with self.lock:
            return not self.expired and self.mem == 0 and (self.spill is None or self.spill.pending == 0)

    def stats(self) -> MeterStats:
        with self.lock:
            spill = self.spill
            spilled = spill.pending if spill else 0
            return MeterStats(
                recorded=self.recorded,
                sent=self.sent,
                failed=self.failed,
                retried=self.retried,
                buffered=self.mem + spilled,
                spilled=spilled,
                recovered=spill.recovered if spill else 0,
                overflowed=self.overflowed,
                record_errors=self.record_errors,
                requests=self.requests,
                batches=self.batches,
                degraded=self.degraded,
                last_error=self.last_error,
            )

    def report_stuck(self) -> None:
        """close() gave up waiting for a flusher stuck in a request: say what is at stake.
        The counters stay as they are: the request may still succeed."""
        with self.lock:
            lines = [line for b in ([self.inflight] if self.inflight else []) + list(self.ready) for line in b.lines]
        if lines:
            self.report(MeterError(
                "unsent",
                f"close() deadline reached while a request was still in flight; {len(lines)} pulses may be "
                "undelivered (their pulse_ids make resending them safe)",
                lines=lines,
            ))

    def record_error(self, err: MeterError) -> None:
        with self.lock:
            self.record_errors += 1
        self.report(err)

    def report(self, err: MeterError) -> None:
        if self.on_error is not None:
            try:
                self.on_error(err)
                return
            except Exception:
                log.exception("pulses_meter: on_error raised")
        log.error("pulses_meter: %s (%d pulses)", err.message, err.count)

    def after_fork(self) -> None:
        """In a forked child: the parent keeps (and sends) what was buffered."""
        self._init_state()
        self.encoder.new_id.reset()  # type: ignore[attr-defined]
        self.transport._conn = None
        if self.spill is not None:
            assert self.spill_path is not None
            if "{pid}" in self.spill_path:
                self.spill = Spill(self.spill_path.replace("{pid}", str(os.getpid())), self.max_spill_bytes)
            else:
                log.warning("pulses_meter: spilling is off in a forked child; put {pid} in spill_path to spill per process")
                self.spill = None

    # ------------------------------------------------------------------ flusher

    def _delay(self, k: int) -> float:
        """Exponential backoff with jitter: uniform in [d/2, d], d = backoff * 2^(k-1)."""
        d = float(min(self.max_backoff, self.backoff * (2 ** min(k - 1, 30))))
        return d * (0.5 + 0.5 * random.random())

    def _next_action(self) -> Effect:
        with self.lock:
            now = monotonic()
            if self.open and (self.closed or now - self.open_since >= self.flush_interval):
                self._seal()
            spill = self.spill
            if self.degraded and spill is not None and not spill.full and self.ready:
                batches = list(self.ready)
                self.ready.clear()
                return ("spill", batches)
            has_mem = bool(self.ready)
            has_spill = spill is not None and (self.spill_batch is not None or spill.pending > 0)
            if self.deadline is not None:
                if not has_mem and not has_spill:
                    return ("stop", None)
                if now >= self.deadline:
                    return ("expire", None)
            if (has_mem or has_spill) and now >= self.next_try:
                if has_mem:
                    b = self.ready.popleft()
                    self.inflight = b
                    return ("send", b)
                if self.spill_batch is not None:
                    return ("send", self.spill_batch)
                return ("load", None)
            wake = float("inf")
            if has_mem or has_spill:
                wake = self.next_try
            if self.open:
                wake = min(wake, self.open_since + self.flush_interval)
            if self.deadline is not None:
                wake = min(wake, self.deadline)
            return ("wait", None if wake == float("inf") else max(0.0, wake - now))

    def steps(self) -> Generator[Effect, Any, None]:
        """The flusher. Yields ("wait", seconds|None) and ("call", fn); a driver waits
        (waking early on ``wake()``) or runs ``fn`` and sends back (ok, value)."""
        with self.lock:
            if self.inflight is not None:  # a previous driver died mid-request
                self.ready.appendleft(self.inflight)
                self.inflight = None
        while True:
            action, arg = self._next_action()
            if action == "wait":
                yield ("wait", arg)
            elif action == "stop":
                return
            elif action == "send":
                yield from self._send(arg)
            elif action == "load":
                spill = self.spill
                assert spill is not None
                ok, value = yield ("call", lambda: spill.read(self.batch_size))
                if ok and value is not None:
                    self.spill_batch = value
                elif ok:  # the count was off: nothing left to read
                    spill.pending = 0
                elif not ok:
                    log.error("pulses_meter: reading the spill file failed: %r; spilling is off", value)
                    with self.lock:
                        self.spill = None
            elif action == "spill":
                yield from self._spill_out(arg)
            elif action == "expire":
                yield from self._expire()
                return

    def _send(self, batch: Batch) -> Generator[Effect, Any, None]:
        body = batch.body()
        if len(body) > MAX_BODY_BYTES and len(batch.lines) > 1 and not batch.from_spill:
            # Large attributes: two requests instead of one the server would refuse (413).
            half = len(batch.lines) // 2
            first, second = Batch(batch.lines[:half]), Batch(batch.lines[half:])
            with self.lock:
                batch.state, batch.children = "split", [first, second]
                self.inflight = None
                self.ready.appendleft(second)
                self.ready.appendleft(first)
            return
        with self.lock:
            self.requests += 1
            if batch.attempts:
                self.retried += len(batch.lines)
            timeout = None
            if self.deadline is not None:
                timeout = min(self.transport.timeout, max(0.05, self.deadline - monotonic()))
        ok, outcome = yield ("call", lambda: self.transport.send(body, timeout))
        if not ok:
            outcome = Outcome("retry", error=f"sending failed: {outcome!r}")
        err = self._settle(batch, outcome)
        if batch.from_spill and batch.state in ("sent", "failed"):
            ok2, e = yield ("call", lambda: self.spill.commit(batch))  # type: ignore[union-attr]
            with self.lock:
                self.spill_batch = None
                if not ok2:
                    log.error("pulses_meter: updating the spill file failed: %r; spilling is off", e)
                    self.spill = None
        if err is not None:
            self.report(err)
        self.progress()

    def _settle(self, batch: Batch, outcome: Outcome) -> Optional[MeterError]:
        n = len(batch.lines)
        with self.lock:
            now = monotonic()
            if not batch.from_spill:
                self.inflight = None
            if outcome.kind == "ok":
                accepted = (outcome.payload or {}).get("accepted")
                if accepted is not None and accepted != n:
                    log.warning("pulses_meter: sent %d pulses, the server says it accepted %s", n, accepted)
                self.sent += n
                self.batches += 1
                batch.state = "sent"
                if not batch.from_spill:
                    self.mem -= n
                if self.degraded:
                    log.warning("pulses_meter: the API answers again; sending the buffered pulses")
                self.degraded = False
                self.probe_failures = 0
                self.next_try = now
                return None
            if outcome.kind == "fatal":
                self.failed += n
                batch.state = "failed"
                if not batch.from_spill:
                    self.mem -= n
                payload = outcome.payload or {}
                self.last_error = outcome.describe()
                return MeterError(
                    "rejected",
                    f"the server refused {n} pulses: {outcome.describe()}; not retried",
                    status=outcome.status,
                    code=payload.get("error"),
                    detail=payload.get("detail"),
                    errors=payload.get("errors") if isinstance(payload.get("errors"), list) else None,
                    lines=batch.lines,
                )
            batch.attempts += 1
            self.last_error = outcome.describe()
            retry_after = outcome.retry_after
            if retry_after is not None:
                retry_after = min(retry_after, MAX_RETRY_AFTER)
                self.retry_after_until = now + retry_after
            if not self.degraded and batch.attempts <= self.max_retries:
                delay = self._delay(batch.attempts)
                log.info("pulses_meter: %s; retry %d of %d", self.last_error, batch.attempts, self.max_retries)
            else:
                if not self.degraded:
                    log.warning(
                        "pulses_meter: %s after %d retries; keeping pulses buffered and retrying later",
                        self.last_error, self.max_retries,
                    )
                self.degraded = True
                self.probe_failures += 1
                self.giveups += 1
                delay = self._delay(self.max_retries + self.probe_failures)
            if retry_after is not None:
                delay = max(delay, retry_after)
            self.next_try = now + delay
            if not batch.from_spill:
                self.ready.appendleft(batch)
            return None

    def _spill_out(self, batches: List[Batch]) -> Generator[Effect, Any, None]:
        spill = self.spill
        assert spill is not None
        written: List[Batch] = []

        def write() -> None:
            for b in batches:
                if not spill.append(b.lines):
                    return
                written.append(b)

        ok, e = yield ("call", write)
        with self.lock:
            for b in written:
                b.state = "spilled"
                self.mem -= len(b.lines)
            back = [b for b in batches if b.state is None]
            self.ready.extendleft(reversed(back))
            if not ok:
                self.spill = None
            warn = ok and bool(back) and not self.spill_warned
            if warn:
                self.spill_warned = True
        if not ok:
            log.error("pulses_meter: writing the spill file failed: %r; spilling is off", e)
        if warn:
            self.report(MeterError("spill_full", f"the spill file {spill.path} reached max_spill_bytes; keeping pulses in memory"))
        self.progress()

    def _expire(self) -> Generator[Effect, Any, None]:
        with self.lock:
            self.expired = True
            self._seal()
            batches = list(self.ready)
            self.ready.clear()
        if not batches:
            return
        if self.spill is not None and not self.spill.full:
            log.warning("pulses_meter: close() deadline reached; spilling %d pulses to %s",
                        sum(len(b.lines) for b in batches), self.spill.path)
            yield from self._spill_out(batches)
            with self.lock:
                batches = list(self.ready)
                self.ready.clear()
        lines = [line for b in batches for line in b.lines]
        if not lines:
            return
        with self.lock:
            for b in batches:
                b.state = "unsent"
            self.mem -= len(lines)
            self.failed += len(lines)
        self.report(MeterError(
            "unsent",
            f"close() deadline reached with {len(lines)} pulses undelivered ({self.last_error or 'no answer yet'}); "
            "set spill_path to keep them on disk",
            lines=lines,
        ))
        self.progress()


def _nothing() -> None:
    return None
