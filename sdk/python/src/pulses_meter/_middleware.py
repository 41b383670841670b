"""What the ASGI and WSGI middlewares share: their options and recording one request.

``Req`` is the request as the middleware sees it: the ASGI ``scope`` or the WSGI
``environ``, both mappings of str. ``App`` is the wrapped application.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Generic, Mapping, Optional, TypeVar, Union

from ._pulse import Amount
from .errors import MeterError
from .meter import _Recorder

App = TypeVar("App")
Req = TypeVar("Req", bound=Mapping[str, Any])

#: At most this many route templates keep their SKU cached.
_MAX_CACHED_SKUS = 10_000


class _RequestMetering(Generic[App, Req]):
    """The options of a metering middleware (see :class:`pulses_meter.asgi.MeteringMiddleware`)
    and ``_record()``, which turns one finished request into one pulse.

    A subclass names the request field holding the HTTP method (``_METHOD_KEY``) and
    keeps its own public ``__init__`` signature (its types and default ``route``),
    passing the options on to this one.
    """

    _METHOD_KEY: str

    def __init__(
        self,
        app: App,
        meter: _Recorder,
        tenant: Callable[[Req], Optional[str]],
        *,
        use_unit: str,
        amount: Union[Amount, Callable[[Req, int], Amount]],
        sku: Callable[[str], str],
        sku_prefix: str,
        route: Callable[[Req], Optional[str]],
        unmatched_sku: Optional[str],
        attributes: Optional[Callable[[Req, int], Optional[Mapping[str, Any]]]],
        record_if: Optional[Callable[[int], bool]],
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

    def _record(self, request: Req, status: int, started: int) -> None:
        try:
            if self.record_if is not None and not self.record_if(status):
                return
            template = self.route(request)
            if template is None:
                if self.unmatched_sku is None:
                    return
                sku = self.unmatched_sku
            else:
                cached = self._skus.get(template)
                if cached is None:
                    cached = self.sku_prefix + self.sku(template)
                    if len(self._skus) < _MAX_CACHED_SKUS:
                        self._skus[template] = cached
                sku = cached
            tenant = self.tenant(request)
            if tenant is None:
                return
            amount = self.amount(request, status) if callable(self.amount) else self.amount
            attrs: Dict[str, Any] = {"method": request.get(self._METHOD_KEY), "status": status}
            if self.attributes is not None:
                attrs.update(self.attributes(request, status) or {})
            self.meter.record(sku, amount, self.use_unit, attributes=attrs, timestamp=started, tenant_id=tenant)
        except Exception as e:
            self.meter._core.record_error(MeterError("record", f"could not record a request: {e!r}", cause=e))
