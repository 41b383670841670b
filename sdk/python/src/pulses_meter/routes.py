"""Route templates to product SKUs, and small helpers for the middlewares."""

from __future__ import annotations

import hashlib
import re
from typing import Any, Callable, Mapping, Optional

_STARLETTE_PARAM = re.compile(r"\{([^}:]+)(?::[^}]*)?\}")  # {item_id} or {path:path}
_WERKZEUG_PARAM = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")  # <item_id> or <int:item_id>
_NOT_ALLOWED = re.compile(r"[^A-Za-z0-9._:\-]")


def route_sku(template: str, prefix: str = "") -> str:
    """A product_sku for a route template, stable and within the SKU alphabet.

    Path segments are joined with ``.``; a path parameter becomes ``:name``
    (Starlette ``{name}`` and ``{name:conv}``, Flask ``<name>`` and ``<conv:name>``);
    any other character outside ``A-Z a-z 0-9 . _ : -`` becomes ``_``; ``/`` is
    ``root``. Examples: ``/items/{item_id}`` -> ``items.:item_id``,
    ``/v1/users/<int:user_id>/orders`` -> ``v1.users.:user_id.orders``. ``prefix``
    is prepended as is (``"api."`` -> ``api.items.:item_id``). SKUs longer than 128
    characters are cut and end with a hash of the template.
    """
    segments = []
    for seg in template.split("/"):
        if not seg:
            continue
        seg = _STARLETTE_PARAM.sub(r":\1", seg)
        seg = _WERKZEUG_PARAM.sub(r":\1", seg)
        segments.append(_NOT_ALLOWED.sub("_", seg))
    sku = prefix + (".".join(segments) or "root")
    if len(sku) > 128:
        digest = hashlib.sha256(template.encode("utf-8")).hexdigest()[:16]
        sku = sku[:111] + "." + digest
    return sku


def header_tenant(name: str) -> Callable[[Mapping[str, Any]], Optional[str]]:
    """A ``tenant`` callable for either middleware: the tenant is the value of a
    request header (e.g. ``header_tenant("X-Tenant-Id")``); no header, no pulse."""
    lower = name.lower().encode("latin-1")
    wsgi_key = "HTTP_" + name.upper().replace("-", "_")

    def tenant(scope_or_environ: Mapping[str, Any]) -> Optional[str]:
        if "headers" in scope_or_environ and "type" in scope_or_environ:  # ASGI scope
            for k, v in scope_or_environ["headers"]:
                if k.lower() == lower:
                    return bytes(v).decode("latin-1")
            return None
        value = scope_or_environ.get(wsgi_key)
        return value if isinstance(value, str) else None

    return tenant
