""":class:`AsyncMeter`: the same batching core, driven by an asyncio task."""

from __future__ import annotations

import asyncio
import threading
from time import monotonic
from types import TracebackType
from typing import Any, Callable, Optional, Type

from ._core import log
from .meter import _Recorder


class AsyncMeter(_Recorder):
    """:class:`~pulses_meter.Meter` for asyncio applications. Same arguments, same
    batching, retries, overflow policy and counters.

    ``record()`` is a plain (non-async, non-blocking) method, callable from
    coroutines and from other threads. The flusher is a task on the event loop the
    meter is started in: at construction if a loop is running, else at the first
    ``record()``/``flush()`` inside one, or ``async with AsyncMeter(...)``. HTTP
    requests run in the loop's default thread executor (the standard library has
    no asyncio HTTP client), one at a time.

    Close it with ``await meter.aclose()`` (or ``async with``) before the loop
    stops, e.g. in the application's lifespan shutdown. If it is not closed, an
    interpreter-exit hook sends what is left synchronously, for at most
    ``close_timeout`` seconds.
    """

    def _start_driver(self) -> None:
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._loop_thread: Optional[int] = None
        self._task: Optional["asyncio.Task[None]"] = None
        self._event: Optional[asyncio.Event] = None
        self._progress_event: Optional[asyncio.Event] = None
        self._core.wake = self._wake
        self._core.progress = self._notify_progress
        try:
            self._start(asyncio.get_running_loop())
        except RuntimeError:
            pass  # started later, inside a running loop

    def _close_at_exit(self) -> None:
        self._close_sync(self.close_timeout)

    # ------------------------------------------------------------------ driver

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._task is not None and not self._task.done():
            if self._loop is not loop and loop is not None:
                log.warning("pulses_meter: this AsyncMeter's flusher runs on another event loop; it stays there")
            return  # one flusher at a time, on the loop that started it
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._event = asyncio.Event()
        self._progress_event = asyncio.Event()
        self._task = loop.create_task(self._run(), name="pulses-meter-flusher")

    def _ensure_started(self) -> None:
        if self._task is None or (self._task.done() and not self._core.closed):
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._start(loop)

    def _wake(self) -> None:
        task = self._task
        if task is None or task.done():
            # Not started yet, or its loop ended (asyncio.run() returned): start on
            # the running loop, if there is one. A new flusher looks at the state first.
            self._ensure_started()
            return
        loop, event = self._loop, self._event
        if event is None or loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            event.set()
        else:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the loop is closed
                pass

    def _notify_progress(self) -> None:
        if threading.get_ident() != self._loop_thread:
            loop = self._loop
            if loop is not None and loop.is_running():
                try:
                    loop.call_soon_threadsafe(self._notify_progress)
                except RuntimeError:
                    pass
            return
        ev = self._progress_event
        if ev is not None:
            ev.set()
            self._progress_event = asyncio.Event()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        gen = self._core.steps()
        reply: Any = None
        assert self._event is not None
        event = self._event
        while True:
            try:
                kind, arg = gen.send(reply)
            except StopIteration:
                break
            except Exception:  # a bug: keep the pulses flowing with a new flusher
                log.exception("pulses_meter: the flusher failed; restarting it")
                await asyncio.sleep(1.0)
                gen, reply = self._core.steps(), None
                continue
            if kind == "wait":
                if not event.is_set():
                    try:
                        await asyncio.wait_for(event.wait(), arg)
                    except asyncio.TimeoutError:
                        pass
                event.clear()
                reply = None
            else:
                reply = await loop.run_in_executor(None, _call, arg)
        await loop.run_in_executor(None, self._core.transport.close)
        self._notify_progress()

    # ------------------------------------------------------------------ API

    async def start(self) -> None:
        """Starts the flusher on the running loop (done implicitly by ``async with``)."""
        self._start(asyncio.get_running_loop())

    async def flush(self, timeout: Optional[float] = None) -> bool:
        """Async :meth:`Meter.flush`: True once everything recorded so far was acknowledged."""
        self._ensure_started()
        core = self._core
        ticket = core.begin_flush()
        deadline = None if timeout is None else monotonic() + timeout
        while True:
            result = core.flush_result(ticket)
            if result is not None:
                return result
            if self._task is None or self._task.done():
                return False
            remaining = None if deadline is None else deadline - monotonic()
            if remaining is not None and remaining <= 0:
                return False
            ev = self._progress_event
            assert ev is not None
            try:
                await asyncio.wait_for(ev.wait(), min(remaining, 1.0) if remaining is not None else 1.0)
            except asyncio.TimeoutError:
                pass

    async def aclose(self, timeout: Optional[float] = None) -> bool:
        """Async :meth:`Meter.close`: stops recording, sends what is left within
        ``timeout`` (default ``close_timeout``); True if everything was acknowledged."""
        timeout = self.close_timeout if timeout is None else timeout
        self._ensure_started()
        self._core.begin_close(timeout)
        self._unregister_at_exit()
        task = self._task
        if task is not None and not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout + 2.0)
            except asyncio.TimeoutError:
                pass
        elif task is None:
            # Never started (no loop ever ran it): drain in a thread.
            await asyncio.get_running_loop().run_in_executor(None, self._drain_sync)
        return self._core.delivered_all()

    def _close_sync(self, timeout: float) -> bool:
        """Interpreter exit without ``aclose()``: the loop is gone, drain synchronously."""
        self._core.begin_close(timeout)
        task = self._task
        if task is not None and not task.done():
            loop = self._loop
            if loop is not None and loop.is_running():
                return False  # still owned by a live loop in another thread
        self._drain_sync()
        return self._core.delivered_all()

    def _drain_sync(self) -> None:
        gen = self._core.steps()
        reply: Any = None
        while True:
            try:
                kind, arg = gen.send(reply)
            except StopIteration:
                break
            if kind == "wait":
                if arg:
                    threading.Event().wait(arg)
                reply = None
            else:
                reply = _call(arg)
        self._core.transport.close()

    async def __aenter__(self) -> "AsyncMeter":
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        await self.aclose()


def _call(fn: Callable[[], Any]) -> Any:
    try:
        return (True, fn())
    except Exception as e:
        return (False, e)
