"""Validation and JSON encoding of one pulse (SPEC §3), done at ``record()`` time.

Every rule the server applies is applied here first, so one bad pulse can never make
the server reject a whole batch of good ones (a request is all or nothing). The pulse
is encoded once, to its final JSON text, when it is recorded; a batch is those texts
joined, so a resent batch is byte for byte the same and carries the same pulse_ids.
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

Amount = Union[Decimal, int, str]
Timestamp = Union[datetime, int, str]

#: Identifier rule of the server: 1-128 characters of A-Z a-z 0-9 . _ : -
_IDENT = re.compile(r"[A-Za-z0-9._:\-]{1,128}\Z")
#: rust_decimal: a 96-bit mantissa and at most 28 decimal places.
MAX_MANTISSA = 2**96 - 1
MAX_SCALE = 28
MAX_PULSE_ID_LEN = 256
#: 9999-12-31T23:59:59.999Z, the last instant the server accepts.
MAX_TIMESTAMP_MS = 253_402_300_799_999
#: The server refuses bodies over 5 MiB.
MAX_BODY_BYTES = 5 * 1024 * 1024

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MS = timedelta(milliseconds=1)
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(?:([Zz])|([+-])(\d{2}):(\d{2}))\Z"
)

FLOAT_REFUSED = (
    "float amounts are refused: a binary float cannot hold most decimal amounts exactly "
    "(0.1 + 0.2 != 0.3) and money is involved; pass a decimal.Decimal, an int or a str "
    "such as '1.50' (Decimal(str(x)) if the value really starts as a float)"
)


def check_identifier(field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{field} must be a str, not {type(value).__name__}")
    if not _IDENT.match(value):
        if not value:
            raise ValueError(f"{field} is empty")
        if len(value) > 128:
            raise ValueError(f"{field} has {len(value)} characters, at most 128 are allowed")
        bad = next(c for c in value if not _IDENT.match(c))
        raise ValueError(f"{field} {value!r} contains {bad!r}; allowed are A-Z a-z 0-9 . _ : -")
    return value


_DIGITS = frozenset("0123456789")


def _decimal_text(d: Decimal) -> str:
    """The exact plain text of a non-negative decimal the server can hold."""
    # Fast path: str() of an ordinary amount is plain notation ("0.25"); at most 28
    # characters of digits and a point fit the server's 96 bits and 28 places. str()
    # never prints huge (it switches to exponent notation), unlike format(d, "f").
    text = str(d)
    if len(text) <= 28 and text[0] in _DIGITS and text[-1] in _DIGITS and "E" not in text:
        return text
    return _decimal_text_checked(d)


def _decimal_text_checked(d: Decimal) -> str:
    if not d.is_finite():
        raise ValueError(f"amount {d} is not a finite number")
    adjusted = d.adjusted()
    if adjusted > 28 or adjusted < -MAX_SCALE:
        # Checked before formatting: Decimal("1E+999999999") would print a billion digits.
        if d == 0:
            return "0"
        if d < 0:
            raise ValueError(f"amount {d} is negative; usage amounts are >= 0")
        if adjusted > 28:
            raise ValueError(f"amount {d} is too large (at most {MAX_MANTISSA})")
        raise ValueError(f"amount {d} has more than {MAX_SCALE} decimal places")
    text = format(d, "f")
    if text[0] == "-":
        if d != 0:
            raise ValueError(f"amount {d} is negative; usage amounts are >= 0")
        text = text[1:]
    dot = text.find(".")
    scale = 0 if dot < 0 else len(text) - dot - 1
    if scale > MAX_SCALE or (len(text) > 28 and int(text.replace(".", "")) > MAX_MANTISSA):
        sign, digits, exponent = d.as_tuple()
        if isinstance(exponent, int) and exponent < 0 and len(digits) > 1 and digits[-1] == 0:
            # Trailing zeros beyond what the server holds (1.000...0): drop them, exactly.
            while exponent < 0 and len(digits) > 1 and digits[-1] == 0:
                digits, exponent = digits[:-1], exponent + 1
            return _decimal_text_checked(Decimal((sign, digits, exponent)))
        if scale > MAX_SCALE:
            raise ValueError(f"amount {d} has more than {MAX_SCALE} decimal places")
        raise ValueError(f"amount {d} is too large (at most {MAX_MANTISSA} units of its last place)")
    return text


def amount_text(amount: Any) -> str:
    """The JSON string content for ``used_amount``: exact, plain notation."""
    t = type(amount)
    if t is int:
        if amount < 0:
            raise ValueError(f"amount {amount} is negative; usage amounts are >= 0")
        if amount > MAX_MANTISSA:
            raise ValueError(f"amount {amount} is too large (at most {MAX_MANTISSA})")
        return str(amount)
    if t is Decimal:
        return _decimal_text(amount)
    if t is str or isinstance(amount, str):
        try:
            d = Decimal(amount.strip())
        except InvalidOperation:
            raise ValueError(f"amount {amount!r} is not a decimal number") from None
        return _decimal_text(d)
    if isinstance(amount, float):
        raise TypeError(FLOAT_REFUSED)
    if isinstance(amount, bool):
        raise TypeError("amount must be a Decimal, an int or a str, not a bool")
    if isinstance(amount, int):
        return amount_text(int(amount))
    if isinstance(amount, Decimal):
        return _decimal_text(Decimal(amount))
    raise TypeError(f"amount must be a Decimal, an int or a str, not {t.__name__}")


def timestamp_ms(ts: Any) -> int:
    """Epoch milliseconds for a timezone-aware datetime, epoch ms, or RFC 3339 text."""
    if isinstance(ts, datetime):
        if ts.tzinfo is None or ts.tzinfo.utcoffset(ts) is None:
            raise ValueError("timestamp must be a timezone-aware datetime (e.g. datetime.now(timezone.utc))")
        ms = (ts - _EPOCH) // _MS
    elif isinstance(ts, bool):
        raise TypeError("timestamp must be a datetime, epoch milliseconds (int) or RFC 3339 text, not a bool")
    elif isinstance(ts, int):
        ms = int(ts)
    elif isinstance(ts, str):
        ms = _parse_text_timestamp(ts)
    elif isinstance(ts, float):
        raise TypeError("timestamp must be a datetime, epoch milliseconds (int) or RFC 3339 text; a float is ambiguous")
    else:
        raise TypeError(f"timestamp must be a datetime, epoch milliseconds (int) or RFC 3339 text, not {type(ts).__name__}")
    if not 0 <= ms <= MAX_TIMESTAMP_MS:
        raise ValueError(f"timestamp {ts!r} is outside 1970..9999")
    return ms


def _parse_text_timestamp(s: str) -> int:
    if s.isdigit() and s.isascii():
        return int(s)
    m = _RFC3339.match(s)
    if not m:
        raise ValueError(f"timestamp {s!r} is neither RFC 3339 nor epoch milliseconds")
    year, month, day, hour, minute, second, frac, z, sign, oh, om = m.groups()
    offset = timedelta(0) if z else (1 if sign == "+" else -1) * timedelta(hours=int(oh), minutes=int(om))
    try:
        dt = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), tzinfo=timezone(offset))
    except ValueError as e:
        raise ValueError(f"timestamp {s!r}: {e}") from None
    ms = (dt - _EPOCH) // _MS
    if frac:
        ms += int((frac + "00")[:3])
    return ms


def pulse_id_json(pulse_id: Any) -> str:
    if not isinstance(pulse_id, str):
        raise TypeError(f"pulse_id must be a str, not {type(pulse_id).__name__}")
    if not pulse_id:
        raise ValueError("pulse_id is empty")
    if len(pulse_id) > MAX_PULSE_ID_LEN:
        raise ValueError(f"pulse_id has {len(pulse_id)} characters, at most {MAX_PULSE_ID_LEN} are allowed")
    return json.dumps(pulse_id)


#: One encoder for all: json.dumps() with non-default options builds a new one per call.
_encode_attributes = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


def attributes_json(attributes: Any) -> str:
    if type(attributes) is not dict:
        if not isinstance(attributes, Mapping):
            raise TypeError(f"attributes must be a mapping (a JSON object), not {type(attributes).__name__}")
        attributes = dict(attributes)
    try:
        return _encode_attributes(attributes)
    except ValueError as e:  # NaN or infinity: not JSON
        raise ValueError(f"attributes are not valid JSON: {e}") from None


_VERSION_4 = bytes((x & 0x0F) | 0x40 for x in range(256))
_VARIANT_RFC4122 = bytes((x & 0x3F) | 0x80 for x in range(256))
#: Where hex digit j of a uuid goes in its 8-4-4-4-12 text.
_HEX_POS = [j + (j >= 8) + (j >= 12) + (j >= 16) + (j >= 20) for j in range(32)]


class IdSource:
    """uuid4 strings (canonical 8-4-4-4-12 form), made from ``os.urandom`` a block
    at a time with C-speed byte operations: ~10x faster than ``str(uuid.uuid4())``."""

    def __init__(self, block: int = 2048) -> None:
        self._block = block
        self._ids: List[str] = []

    def __call__(self) -> str:
        try:
            return self._ids.pop()
        except IndexError:
            self._refill()
            return self._ids.pop()

    def _refill(self) -> None:
        n = self._block
        raw = bytearray(os.urandom(16 * n))
        raw[6::16] = raw[6::16].translate(_VERSION_4)
        raw[8::16] = raw[8::16].translate(_VARIANT_RFC4122)
        hexed = raw.hex().encode("ascii")
        out = bytearray(b"-" * (37 * n))
        out[36::37] = b"\n" * n
        for j, pos in enumerate(_HEX_POS):
            out[pos::37] = hexed[j::32]
        self._ids = out[:-1].decode("ascii").split("\n")

    def reset(self) -> None:
        """Forget ids drawn before a fork: parent and child must never share one."""
        self._ids = []


PrefixKey = Tuple[Optional[str], str, str]


class Encoder:
    """What ``record()`` (in meter.py, where a pulse is encoded) needs, as fast as possible:
    the cached tenant/sku/unit prefixes, the pulse ids and the attributes step."""

    def __init__(self, default_tenant: Optional[str]) -> None:
        if default_tenant is not None:
            check_identifier("tenant_id", default_tenant)
        self.default_tenant = default_tenant
        self.prefixes: Dict[PrefixKey, str] = {}
        self.new_id: Callable[[], str] = IdSource()

    def prefix(self, key: PrefixKey) -> str:
        tenant, sku, unit = key
        if tenant is None:
            raise ValueError("tenant_id is required: pass tenant_id= to record() or to the meter")
        check_identifier("tenant_id", tenant)
        check_identifier("product_sku", sku)
        check_identifier("use_unit", unit)
        if len(self.prefixes) >= 4096:
            self.prefixes.clear()
        p = f'"tenant_id":"{tenant}","product_sku":"{sku}","use_unit":"{unit}"'
        self.prefixes[key] = p
        return p

    def with_attributes(self, pid_json: str, prefix: str, amt: str, ms: int, attributes: Any) -> str:
        attrs = attributes_json(attributes)
        line = f'{{"pulse_id":{pid_json},{prefix},"used_amount":"{amt}","timestamp":{ms},"attributes":{attrs}}}'
        if len(line) > MAX_BODY_BYTES - 2:
            raise ValueError(f"the pulse is {len(line)} bytes as JSON; a request holds at most {MAX_BODY_BYTES}")
        return line
