"""WSGI middleware (Flask, any WSGI app): one pulse per HTTP request.

No framework is imported. With Flask the route template is ``request.url_rule.rule``:
Werkzeug keeps the request object in ``environ["werkzeug.request"]`` while Flask
handles the request, and the middleware reads it when the app calls
``start_response`` (Flask clears it afterwards).

    app.wsgi_app = WSGIMeteringMiddleware(app.wsgi_app, meter=meter, tenant=header_tenant("X-Tenant-Id"))
"""

from __future__ import annotations

from time import time_ns
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

from ._pulse import Amount
from .errors import MeterError
from .meter import _Recorder
from .routes import route_sku

Environ = Dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]


def flask_route(environ: Mapping[str, Any]) -> Optional[str]:
    """The Flask/Werkzeug URL rule matched for this request (``/items/<int:id>``), or None."""
    request = environ.get("werkzeug.request")
    rule = getattr(request, "url_rule", None) if request is not None else None
    template = getattr(rule, "rule", None)
    return template if isinstance(template, str) else None


class WSGIMeteringMiddleware:
    """Records one pulse per request when the app calls ``start_response`` (the
    status is known then, and Flask still holds the matched rule), or with status
    500 if the app raises before. Same options as
    :class:`pulses_meter.asgi.MeteringMiddleware`, with the WSGI ``environ`` in place
    of the ASGI scope; ``route(environ)`` defaults to :func:`flask_route`.
    """

    def __init__(
        self,
        app: WSGIApp,
        meter: _Recorder,
        tenant: Callable[[Environ], Optional[str]],
        *,
        use_unit: str = "request",
        amount: Union[Amount, Callable[[Environ, int], Amount]] = 1,
        sku: Callable[[str], str] = route_sku,
        sku_prefix: str = "",
        route: Callable[[Environ], Optional[str]] = flask_route,
        unmatched_sku: Optional[str] = None,
        attributes: Optional[Callable[[Environ, int], Optional[Mapping[str, Any]]]] = None,
        record_if: Optional[Callable[[int], bool]] = None,
    ) -> None:
        self.app = app
        self.meter = meter
        self.tenant = tenant
        self.use_unit = use_unit
        self.amount = amount
        self.sku = sku
        self.sku_prefix = sku_prefix
        self.route = route
        self.unmatched_sku = unmatched_sku
        self.attributes = attributes
        self.record_if = record_if
        self._skus: Dict[str, str] = {}

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        started = time_ns() // 1_000_000
        recorded = False

        def start_wrapper(status: str, headers: List[Tuple[str, str]], exc_info: Any = None) -> Any:
            nonlocal recorded
            if not recorded:
                recorded = True
                try:
                    code = int(status.split(" ", 1)[0])
                except ValueError:
                    code = 500
                self._record(environ, code, started)
            if exc_info is not None:
                return start_response(status, headers, exc_info)
            return start_response(status, headers)

        try:
            return self.app(environ, start_wrapper)
        except BaseException:
            if not recorded:
                recorded = True
                self._record(environ, 500, started)
            raise

    def _record(self, environ: Environ, status: int, started: int) -> None:
        try:
            if self.record_if is not None and not self.record_if(status):
                return
            template = self.route(environ)
            if template is None:
                if self.unmatched_sku is None:
                    return
                sku = self.unmatched_sku
            else:
                cached = self._skus.get(template)
                if cached is None:
                    cached = self.sku_prefix + self.sku(template)
                    if len(self._skus) < 10_000:
                        self._skus[template] = cached
                sku = cached
            tenant = self.tenant(environ)
            if tenant is None:
                return
            amount = self.amount(environ, status) if callable(self.amount) else self.amount
            attrs: Dict[str, Any] = {"method": environ.get("REQUEST_METHOD"), "status": status}
            if self.attributes is not None:
                attrs.update(self.attributes(environ, status) or {})
            self.meter.record(sku, amount, self.use_unit, attributes=attrs, timestamp=started, tenant_id=tenant)
        except Exception as e:
            self.meter._core.record_error(MeterError("record", f"could not record a request: {e!r}", cause=e))
