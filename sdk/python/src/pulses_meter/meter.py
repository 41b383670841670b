""":class:`Meter`: a buffered, batching, retrying client with a background thread."""

from __future__ import annotations

import atexit
import functools
import inspect
import logging
import os
import threading
import weakref
from decimal import Decimal
from time import monotonic, time_ns
from types import TracebackType
from typing import Any, Callable, Mapping, Optional, Type, TypeVar, Union

from ._core import Core, MeterStats
from ._pulse import MAX_MANTISSA, Amount, Timestamp, _decimal_text, amount_text, pulse_id_json, timestamp_ms
from .errors import MeterError

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("pulses_meter")

AmountSpec = Union[Decimal, int, str, Callable[[Any], Amount]]
AttributesSpec = Union[Mapping[str, Any], Callable[[Any], Optional[Mapping[str, Any]]], None]

class _Recorder:
    """What :class:`Meter` and :class:`AsyncMeter` share: the constructor (its
    arguments are documented on :class:`Meter`), record(), metered(), stats().

    A subclass drives the core: ``_start_driver()`` starts its flusher at
    construction, ``_close_at_exit()`` is what the interpreter-exit hook does.
    """

    _core: Core

    def __init__(
        self,
        url: str,
        api_key: str,
        tenant_id: Optional[str] = None,
        batch_size: int = 250,
        flush_interval: float = 5.0,
        max_retries: int = 3,
        *,
        max_buffered: int = 100_000,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        timeout: float = 30.0,
        close_timeout: float = 10.0,
        spill_path: Optional[str] = None,
        max_spill_bytes: int = 1 << 30,
        on_error: Optional[Callable[[MeterError], None]] = None,
    ) -> None:
        self._core = Core(
            url=url,
            api_key=api_key,
            tenant_id=tenant_id,
            batch_size=batch_size,
            flush_interval=flush_interval,
            max_retries=max_retries,
            max_buffered=max_buffered,
            backoff=backoff,
            max_backoff=max_backoff,
            timeout=timeout,
            spill_path=spill_path,
            max_spill_bytes=max_spill_bytes,
            on_error=on_error,
        )
        self.close_timeout = close_timeout
        self._start_driver()
        ref = weakref.ref(self)

        def at_exit() -> None:
            meter = ref()
            if meter is not None:
                meter._close_at_exit()

        self._at_exit = at_exit
        atexit.register(at_exit)

    def _start_driver(self) -> None:
        raise NotImplementedError

    def _close_at_exit(self) -> None:
        raise NotImplementedError

    def _unregister_at_exit(self) -> None:
        try:
            atexit.unregister(self._at_exit)
        except Exception:
            pass

    def record(
        self,
        product_sku: str,
        amount: Amount,
        use_unit: str,
        attributes: Optional[Mapping[str, Any]] = None,
        timestamp: Optional[Timestamp] = None,
        pulse_id: Optional[str] = None,
        tenant_id: Optional[str] = None,
    ) -> str:
        """Records one pulse and returns its pulse_id. Never blocks on the network.

        ``amount`` is a ``Decimal``, an ``int`` or a decimal ``str`` (floats raise
        ``TypeError``); it must be >= 0 and fit the server's decimals (28 places).
        ``timestamp`` is a timezone-aware ``datetime``, epoch milliseconds or RFC 3339
        text (default: now). ``pulse_id`` defaults to a fresh uuid4, fixed now, so
        every resend of the pulse is de-duplicated by the server. ``tenant_id``
        defaults to the meter's.

        Raises ``TypeError``/``ValueError`` for an invalid pulse (checked here, as the
        server checks it), ``BufferFull`` when ``max_buffered`` pulses are held, and
        ``MeterClosed`` after ``close()``.
        """
        # The hot path, inlined: this is the only place a pulse is encoded (the
        # Encoder holds the cached prefixes, the id source and the attributes step).
        core = self._core
        enc = core.encoder
        key = (enc.default_tenant if tenant_id is None else tenant_id, product_sku, use_unit)
        prefix = enc.prefixes.get(key)
        if prefix is None:
            prefix = enc.prefix(key)
        if type(amount) is int and 0 <= amount <= MAX_MANTISSA:
            amt = str(amount)
        elif type(amount) is Decimal:
            amt = _decimal_text(amount)
        else:
            amt = amount_text(amount)
        if pulse_id is None:
            pid = enc.new_id()
            pid_json = '"' + pid + '"'
        else:
            pid = pulse_id
            pid_json = pulse_id_json(pulse_id)
        ms = time_ns() // 1_000_000 if timestamp is None else timestamp_ms(timestamp)
        if attributes is None:
            line = f'{{"pulse_id":{pid_json},{prefix},"used_amount":"{amt}","timestamp":{ms}}}'
        else:
            line = enc.with_attributes(pid_json, prefix, amt, ms, attributes)
        core.add(line)
        return pid

    def stats(self) -> MeterStats:
        """A snapshot of the counters (see :class:`MeterStats`)."""
        return self._core.stats()

    @property
    def closed(self) -> bool:
        return self._core.closed

    def metered(
        self,
        product_sku: str,
        use_unit: str,
        amount: AmountSpec = 1,
        attributes: AttributesSpec = None,
        tenant_id: Optional[str] = None,
    ) -> Callable[[F], F]:
        """Decorates a function (sync or ``async``) to record one pulse per successful call.

        ``amount`` is a constant or a callable applied to the function's result;
        ``attributes`` likewise. The pulse's timestamp is the time the call started.
        A call that raises records nothing. If recording fails (say the amount
        callable returns a float, or ``BufferFull``), the function's result is still
        returned: the failure goes to ``on_error`` and ``stats().record_errors``.
        """
        if not callable(amount):
            amount_text(amount)  # a float constant is refused here, at decoration time
        if attributes is not None and not callable(attributes) and not isinstance(attributes, Mapping):
            raise TypeError("attributes must be a mapping or a callable on the result")

        def record_result(result: Any, started_ms: int) -> None:
            try:
                amt = amount(result) if callable(amount) else amount
                attrs = attributes(result) if callable(attributes) else attributes
                self.record(product_sku, amt, use_unit, attributes=attrs, timestamp=started_ms, tenant_id=tenant_id)
            except Exception as e:
                self._core.record_error(MeterError("record", f"could not record {product_sku}: {e!r}", cause=e))

        def decorate(fn: F) -> F:
            if inspect.iscoroutinefunction(fn):

                @functools.wraps(fn)
                async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                    started = time_ns() // 1_000_000
                    result = await fn(*args, **kwargs)
                    record_result(result, started)
                    return result

                return async_wrapper  # type: ignore[return-value]

            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                started = time_ns() // 1_000_000
                result = fn(*args, **kwargs)
                record_result(result, started)
                return result

            return wrapper  # type: ignore[return-value]

        return decorate


class Meter(_Recorder):
    """Records usage pulses and sends them to ``POST <url>/v1/pulses`` in batches.

    A background thread sends a batch as soon as ``batch_size`` pulses are waiting,
    or when the oldest waiting pulse has waited ``flush_interval`` seconds. Failed
    requests (429, 503, other 5xx, timeouts, connection errors) are retried with the
    same pulse_ids (exponential backoff with jitter, never before ``Retry-After``);
    after ``max_retries`` retries the pulses stay buffered and are retried later.
    Answers that retrying cannot fix (400, 401, 403, 413) go to ``on_error``.

    Overflow policy: at most ``max_buffered`` pulses are held in memory; beyond that
    ``record()`` raises :class:`BufferFull` (it never blocks and never drops a pulse
    it accepted). With ``spill_path``, undeliverable batches move to that file
    (JSON lines, at most ``max_spill_bytes``) and are sent from it later, also by
    the next process that opens the same file.

    ``close()`` (also on ``with`` exit and at interpreter exit) sends everything
    left, for at most ``close_timeout`` seconds.
    """

    def _start_driver(self) -> None:
        self._start()
        if hasattr(os, "register_at_fork"):
            ref = weakref.ref(self)
            os.register_at_fork(after_in_child=lambda: _after_fork(ref))

    def _close_at_exit(self) -> None:
        if not self.closed:
            self.close()

    def _start(self) -> None:
        self._event = threading.Event()
        self._progress = threading.Condition()
        self._core.wake = self._event.set
        self._core.progress = self._notify_progress
        self._thread = threading.Thread(target=self._run, name="pulses-meter-flusher", daemon=True)
        self._thread.start()

    def _notify_progress(self) -> None:
        with self._progress:
            self._progress.notify_all()

    def _run(self) -> None:
        gen = self._core.steps()
        reply: Any = None
        event = self._event
        while True:
            try:
                kind, arg = gen.send(reply)
            except StopIteration:
                break
            except Exception:  # a bug: keep the pulses flowing with a new flusher
                log.exception("pulses_meter: the flusher failed; restarting it")
                event.wait(1.0)
                gen, reply = self._core.steps(), None
                continue
            if kind == "wait":
                event.wait(arg)
                event.clear()
                reply = None
            else:
                try:
                    reply = (True, arg())
                except Exception as e:  # handed back to the core, which decides
                    reply = (False, e)
        self._core.transport.close()
        self._notify_progress()

    @property
    def url(self) -> str:
        return self._core.transport.url

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Sends everything recorded so far now and waits for the answer.

        Returns True once all of it was acknowledged (202). Returns False if the
        server refused some of it (see ``on_error``), if a batch used up its retries
        (the pulses stay buffered and are retried later), or after ``timeout``
        seconds (None: no limit).
        """
        core = self._core
        ticket = core.begin_flush()
        deadline = None if timeout is None else monotonic() + timeout
        with self._progress:
            while True:
                result = core.flush_result(ticket)
                if result is not None:
                    return result
                if not self._thread.is_alive():
                    return False
                remaining = None if deadline is None else deadline - monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._progress.wait(remaining if remaining is not None and remaining < 1.0 else 1.0)

    def close(self, timeout: Optional[float] = None) -> bool:
        """Stops recording and sends what is buffered, for at most ``timeout`` seconds
        (default ``close_timeout``). What is still undelivered then is written to
        ``spill_path`` if set, else reported to ``on_error`` (kind ``"unsent"``) and
        counted as failed. Returns True if everything was acknowledged. Idempotent.
        """
        timeout = self.close_timeout if timeout is None else timeout
        self._core.begin_close(timeout)
        self._unregister_at_exit()
        # A request that started before close() may run up to its own timeout.
        self._thread.join(timeout + 2.0)
        if self._thread.is_alive():
            self._core.report_stuck()
        elif self._core.spill is not None:
            self._core.spill.close()
        return self._core.delivered_all()

    def __enter__(self) -> "Meter":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()


def _after_fork(ref: "weakref.ReferenceType[Meter]") -> None:
    meter = ref()
    if meter is None or meter.closed:
        return
    meter._core.after_fork()
    meter._start()
