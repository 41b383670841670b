"""pulses-meter: record usage pulses from Python services and send them to ``pulses serve``.

    from pulses_meter import Meter
    meter = Meter("http://127.0.0.1:8080", api_key="...", tenant_id="acme")
    meter.record("vm.small", Decimal("1.5"), "hour")
"""

__version__ = "0.1.0"

from ._core import MeterStats  # noqa: E402
from .aio import AsyncMeter  # noqa: E402
from .errors import BufferFull, MeterClosed, MeterError  # noqa: E402
from .meter import Meter  # noqa: E402
from .routes import header_tenant, route_sku  # noqa: E402

__all__ = [
    "AsyncMeter",
    "BufferFull",
    "Meter",
    "MeterClosed",
    "MeterError",
    "MeterStats",
    "header_tenant",
    "route_sku",
    "__version__",
]
