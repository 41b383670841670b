"""ASGI middleware (FastAPI, Starlette, any ASGI app): one pulse per HTTP request.

No framework is imported: the route template is read from ``scope["route"].path``,
which Starlette's router (and so FastAPI's) sets on the request's scope once it has
matched a route.

    app.add_middleware(MeteringMiddleware, meter=meter, tenant=header_tenant("X-Tenant-Id"))
"""

from __future__ import annotations

from time import time_ns
from typing import Any, Awaitable, Callable, Mapping, MutableMapping, Optional, Union

from ._middleware import _RequestMetering
from ._pulse import Amount
from .meter import _Recorder
from .routes import route_sku

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def starlette_route(scope: Mapping[str, Any]) -> Optional[str]:
    """The route template Starlette/FastAPI matched (``/items/{item_id}``), or None."""
    route = scope.get("route")
    path = getattr(route, "path", None) if route is not None else None
    if isinstance(path, str):
        return path
    path = scope.get("route_path_format")  # some routers store the template here
    return path if isinstance(path, str) else None


class MeteringMiddleware(_RequestMetering[ASGIApp, Scope]):
    """Records one pulse per HTTP request once the response is complete.

    * ``meter``: a :class:`Meter` or :class:`AsyncMeter` (``record()`` never blocks).
    * ``tenant(scope) -> str | None``: the tenant of the request; None records nothing.
      It is called after the app ran, so it can read what an auth layer put in
      ``scope`` (e.g. ``scope["state"]`` or ``scope["user"]``).
    * product_sku: ``sku(route_template)``, by default :func:`route_sku`
      (``/items/{item_id}`` -> ``items.:item_id``), with ``sku_prefix`` in front.
      Requests that matched no route (404) are recorded under ``unmatched_sku`` if
      given, else not recorded.
    * ``use_unit`` (default ``"request"``), ``amount`` (default 1, or a callable
      ``(scope, status) -> amount``).
    * attributes: ``{"method": ..., "status": ...}`` plus ``attributes(scope, status)``.
    * ``record_if(status) -> bool``: record only some answers (default: all).

    The pulse's timestamp is when the request arrived. A failure to record never
    breaks the response: it goes to the meter's ``on_error`` and
    ``stats().record_errors``.
    """

    _METHOD_KEY = "method"

    def __init__(
        self,
        app: ASGIApp,
        meter: _Recorder,
        tenant: Callable[[Scope], Optional[str]],
        *,
        use_unit: str = "request",
        amount: Union[Amount, Callable[[Scope, int], Amount]] = 1,
        sku: Callable[[str], str] = route_sku,
        sku_prefix: str = "",
        route: Callable[[Scope], Optional[str]] = starlette_route,
        unmatched_sku: Optional[str] = None,
        attributes: Optional[Callable[[Scope, int], Optional[Mapping[str, Any]]]] = None,
        record_if: Optional[Callable[[int], bool]] = None,
    ) -> None:
        super().__init__(
            app, meter, tenant, use_unit=use_unit, amount=amount, sku=sku, sku_prefix=sku_prefix, route=route,
            unmatched_sku=unmatched_sku, attributes=attributes, record_if=record_if,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time_ns() // 1_000_000
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self._record(scope, status, started)
