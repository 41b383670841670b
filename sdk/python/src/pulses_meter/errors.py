"""Exceptions and the error report handed to ``on_error``."""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Sequence


class BufferFull(Exception):
    """``record()`` refused a pulse because ``max_buffered`` pulses are already held.

    This is the overflow policy: the meter never blocks the caller and never drops a
    pulse it accepted. While the API is unreachable, pulses accumulate up to
    ``max_buffered`` (in memory); beyond that, ``record()`` raises ``BufferFull`` and
    the caller decides (fail the request, log, retry later). With ``spill_path`` set,
    batches that cannot be delivered are moved to that file, so memory only fills
    when the disk budget (``max_spill_bytes``) is used up too.
    """


class MeterClosed(RuntimeError):
    """``record()`` (or ``flush()``) was called on a meter that is closed."""


class MeterError(Exception):
    """What ``on_error`` receives: pulses the meter gave up on, or a failed record.

    ``kind`` is one of

    * ``"rejected"``: the server refused the batch with a non-retryable answer (400
      ``invalid_pulse`` / ``invalid_json``, 401, 403 ``forbidden_tenant``, 413, other
      4xx). The batch is not retried; ``status``, ``code``, ``detail`` and ``errors``
      (per pulse: ``index``, ``reason``, ``detail``) say why, ``pulses`` holds them.
    * ``"unsent"``: ``close()`` reached its deadline with these pulses still
      undelivered and no ``spill_path`` to keep them in.
    * ``"spill_full"``: informational; the spill file reached ``max_spill_bytes``,
      so batches stay in memory (and ``record()`` may raise ``BufferFull``).
    * ``"record"``: the decorator or a middleware could not record a pulse (for
      instance an amount callable returned a float); ``cause`` is the exception.
    """

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        status: Optional[int] = None,
        code: Optional[str] = None,
        detail: Optional[str] = None,
        errors: Optional[List[Dict[str, Any]]] = None,
        lines: Sequence[str] = (),
        cause: Optional[BaseException] = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status
        self.code = code
        self.detail = detail
        self.errors: List[Dict[str, Any]] = list(errors or [])
        self.cause = cause
        self._lines = list(lines)

    @property
    def count(self) -> int:
        """How many pulses this error is about."""
        return len(self._lines)

    @property
    def pulses(self) -> List[Dict[str, Any]]:
        """The pulses concerned, as the JSON objects that were (or would have been) sent."""
        return [json.loads(line) for line in self._lines]

    @property
    def pulse_ids(self) -> List[str]:
        return [p["pulse_id"] for p in self.pulses]

    @property
    def raw_lines(self) -> List[str]:
        """The pulses as JSON text, one per element (e.g. to append to a JSON-lines file)."""
        return list(self._lines)

    def __repr__(self) -> str:
        return f"MeterError(kind={self.kind!r}, status={self.status!r}, code={self.code!r}, count={self.count}, message={self.message!r})"
