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

from ._middleware import _RequestMetering
from ._pulse import Amount
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


class WSGIMeteringMiddleware(_RequestMetering[WSGIApp, Environ]):
    """Records one pulse per request when the app calls ``start_response`` (the
    status is known then, and Flask still holds the matched rule), or with status
    500 if the app raises before. Same options as
    :class:`pulses_meter.asgi.MeteringMiddleware`, with the WSGI ``environ`` in place
    of the ASGI scope; ``route(environ)`` defaults to :func:`flask_route`.
    """

    _METHOD_KEY = "REQUEST_METHOD"

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
        super().__init__(
            app, meter, tenant, use_unit=use_unit, amount=amount, sku=sku, sku_prefix=sku_prefix, route=route,
            unmatched_sku=unmatched_sku, attributes=attributes, record_if=record_if,
        )

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
