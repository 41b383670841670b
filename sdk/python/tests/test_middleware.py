"""ASGI middleware with real FastAPI/Starlette apps, WSGI middleware with a real Flask app."""

from __future__ import annotations

from collections import Counter

import pytest

from pulses_meter import Meter, header_tenant, route_sku
from pulses_meter.asgi import MeteringMiddleware
from pulses_meter.wsgi import WSGIMeteringMiddleware

from conftest import FakeServer


@pytest.mark.parametrize("template,sku", [
    ("/", "root"),
    ("/items/{item_id}", "items.:item_id"),
    ("/files/{path:path}", "files.:path"),
    ("/v1/users/<int:user_id>/orders", "v1.users.:user_id.orders"),
    ("/a/<name>.json", "a.:name.json"),
    ("/weird path/ü", "weird_path._"),
])
def test_route_sku(template: str, sku: str) -> None:
    assert route_sku(template) == sku
    long = route_sku("/" + "/".join(["segment"] * 40))
    assert len(long) == 128


def test_fastapi_app_records_one_pulse_per_request_with_the_route_template(server: FakeServer) -> None:
    from fastapi import FastAPI, HTTPException
    from fastapi.testclient import TestClient

    meter = Meter(server.url, "secret", tenant_id=None)
    app = FastAPI()

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict:
        if item_id == 404:
            raise HTTPException(404)
        return {"id": item_id}

    @app.post("/orders")
    def order() -> dict:
        return {"ok": True}

    app.add_middleware(MeteringMiddleware, meter=meter, tenant=header_tenant("X-Tenant-Id"), sku_prefix="api.")
    client = TestClient(app)
    for i in range(30):
        assert client.get(f"/items/{i}", headers={"X-Tenant-Id": "acme"}).status_code == 200
    for _ in range(12):
        assert client.post("/orders", headers={"X-Tenant-Id": "globex"}).status_code == 200
    assert client.get("/items/404", headers={"X-Tenant-Id": "acme"}).status_code == 404
    assert client.get("/items/5").status_code == 200  # no tenant: not metered
    assert client.get("/nowhere", headers={"X-Tenant-Id": "acme"}).status_code == 404  # no route: not metered
    assert meter.flush(timeout=5.0)
    pulses = [p for r in server.snapshot() for p in r.pulses]
    assert Counter((p["tenant_id"], p["product_sku"]) for p in pulses) == {
        ("acme", "api.items.:item_id"): 31, ("globex", "api.orders"): 12,
    }
    assert all(p["use_unit"] == "request" and p["used_amount"] == "1" for p in pulses)
    statuses = Counter((p["attributes"]["method"], p["attributes"]["status"]) for p in pulses)
    assert statuses == {("GET", 200): 30, ("GET", 404): 1, ("POST", 200): 12}
    meter.close()


def test_starlette_app_and_options(server: FakeServer) -> None:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    meter = Meter(server.url, "secret", tenant_id="acme")

    async def upload(request) -> PlainTextResponse:
        body = await request.body()
        return PlainTextResponse("ok", status_code=201 if body else 400)

    async def boom(request) -> PlainTextResponse:
        raise RuntimeError("boom")

    app = Starlette(
        routes=[Route("/upload/{name}", upload, methods=["POST"]), Route("/boom", boom)],
        middleware=[Middleware(
            MeteringMiddleware, meter=meter, tenant=lambda scope: "acme", use_unit="byte",
            amount=lambda scope, status: dict(scope["headers"]).get(b"content-length", b"0").decode(),
            attributes=lambda scope, status: {"path": scope["path"]},
            record_if=lambda status: status < 500, unmatched_sku="http.unmatched",
        )],
    )
    client = TestClient(app, raise_server_exceptions=False)
    assert client.post("/upload/a.txt", content=b"12345").status_code == 201
    assert client.post("/upload/b.txt", content=b"").status_code == 400
    assert client.get("/boom").status_code == 500  # filtered out by record_if
    assert client.get("/missing").status_code == 404
    assert meter.flush(timeout=5.0)
    pulses = [p for r in server.snapshot() for p in r.pulses]
    got = [(p["product_sku"], p["use_unit"], p["used_amount"], p["attributes"]) for p in pulses]
    assert got == [
        ("upload.:name", "byte", "5", {"method": "POST", "status": 201, "path": "/upload/a.txt"}),
        ("upload.:name", "byte", "0", {"method": "POST", "status": 400, "path": "/upload/b.txt"}),
        ("http.unmatched", "byte", "0", {"method": "GET", "status": 404, "path": "/missing"}),
    ]
    meter.close()


def test_asgi_middleware_never_breaks_the_response(server: FakeServer) -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    meter = Meter(server.url, "secret", tenant_id="acme", on_error=lambda e: None)
    app = FastAPI()

    @app.get("/x")
    def x() -> dict:
        return {}

    app.add_middleware(MeteringMiddleware, meter=meter, tenant=lambda scope: 1 / 0)
    assert TestClient(app).get("/x").status_code == 200
    assert meter.stats().record_errors == 1
    meter.close()


def test_flask_app_records_the_url_rule(server: FakeServer) -> None:
    from flask import Flask, abort

    meter = Meter(server.url, "secret", tenant_id=None)
    app = Flask(__name__)

    @app.route("/items/<int:item_id>")
    def item(item_id: int):
        if item_id == 404:
            abort(404)
        return {"id": item_id}

    @app.route("/users/<name>/orders", methods=["POST"])
    def orders(name: str):
        return {"name": name}, 201

    @app.route("/stream")
    def stream():
        return app.response_class((c for c in ["a", "b", "c"]), mimetype="text/plain")

    app.wsgi_app = WSGIMeteringMiddleware(app.wsgi_app, meter=meter, tenant=header_tenant("X-Tenant-Id"))  # type: ignore[method-assign]
    client = app.test_client()
    for i in range(20):
        assert client.get(f"/items/{i}", headers={"X-Tenant-Id": "acme"}).status_code == 200
    for n in ("ann", "bob", "cid"):
        assert client.post(f"/users/{n}/orders", headers={"X-Tenant-Id": "globex"}).status_code == 201
    assert client.get("/items/404", headers={"X-Tenant-Id": "acme"}).status_code == 404
    assert client.get("/stream", headers={"X-Tenant-Id": "acme"}).data == b"abc"
    assert client.get("/items/1").status_code == 200  # no tenant
    assert client.get("/missing", headers={"X-Tenant-Id": "acme"}).status_code == 404  # no rule
    assert meter.flush(timeout=5.0)
    pulses = [p for r in server.snapshot() for p in r.pulses]
    assert Counter((p["tenant_id"], p["product_sku"]) for p in pulses) == {
        ("acme", "items.:item_id"): 21, ("globex", "users.:name.orders"): 3, ("acme", "stream"): 1,
    }
    statuses = Counter((p["attributes"]["method"], p["attributes"]["status"]) for p in pulses)
    assert statuses == {("GET", 200): 21, ("GET", 404): 1, ("POST", 201): 3}
    meter.close()
