"""The pulses windowed aggregation written with Quix Streams (a benchmark peer).

Reads grouped pulses (JSON, keyed by tenant), re-keys them by tenant|sku|unit and
emits one final record per 10 s ("postflight") and 60 s ("minute") tumbling
event-time window: exact decimal sum, count, min and max of `used_amount`.

    python benches/peers/quix/job.py --bootstrap-servers 127.0.0.1:9092 \
        --input in.grouped --output out.agg --consumer-group peer-quix \
        --state-dir /tmp/peer-quix-state [--guarantee exactly-once|at-least-once]
"""

import argparse
from datetime import datetime, timedelta, timezone
from decimal import MAX_PREC, Context, Decimal, Inexact, InvalidOperation, Rounded

from quixstreams import Application

# Amounts are decimal strings and must add up exactly: a context that may never round
# (and raises if it ever had to) instead of the default 28 significant digits.
EXACT = Context(prec=MAX_PREC, traps=[Inexact, Rounded, InvalidOperation])
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
ONE_MS = timedelta(milliseconds=1)
GRACE_MS = 5_000
WINDOWS = {"postflight": 10_000, "minute": 60_000}


def event_time_ms(value, headers, timestamp, timestamp_type) -> int:
    # The Kafka record timestamp is when the pulse was produced, not when it was
    # used: windows must follow `event_time`. Integer arithmetic, no float rounding.
    return (datetime.fromisoformat(value["event_time"]) - EPOCH) // ONE_MS


# Window state is stored as JSON, which has no Decimal: keep the aggregate's amounts
# as exact decimal strings and parse them back on each update.
def init_window(pulse: dict) -> dict:
    amount = pulse["used_amount"]
    return {"total": amount, "count": 1, "min": amount, "max": amount}


def add_to_window(agg: dict, pulse: dict) -> dict:
    raw = pulse["used_amount"]
    amount = Decimal(raw)
    return {
        "total": str(EXACT.add(Decimal(agg["total"]), amount)),
        "count": agg["count"] + 1,
        "min": raw if amount < Decimal(agg["min"]) else agg["min"],
        "max": raw if amount > Decimal(agg["max"]) else agg["max"],
    }


def plain(amount: str) -> str:
    return format(Decimal(amount), "f")  # "6.51E-7" -> "0.000000651"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap-servers", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--consumer-group", required=True)
    parser.add_argument("--state-dir", required=True)
    parser.add_argument(
        "--guarantee",
        choices=["exactly-once", "at-least-once"],
        default="exactly-once",
    )
    args = parser.parse_args()

    # Everything else stays at Quix's defaults (commit_interval=5.0 s, changelog
    # topics on, RocksDB state).
    app = Application(
        broker_address=args.bootstrap_servers,
        consumer_group=args.consumer_group,
        state_dir=args.state_dir,
        auto_offset_reset="earliest",
        processing_guarantee=args.guarantee,
    )
    pulses = app.topic(
        args.input, key_deserializer="str", timestamp_extractor=event_time_ms
    )
    aggregates = app.topic(args.output, key_serializer="str")

    # Repartition by the aggregation key (a "repartition__…" topic Quix creates).
    grouped = app.dataframe(pulses).group_by(
        lambda p: f"{p['tenant_id']}|{p['product_sku']}|{p['use_unit']}",
        name="tenant_sku_unit",
    )

    for name, duration_ms in WINDOWS.items():

        def to_output(window: dict, key: str, timestamp, headers, name=name) -> dict:
            tenant_id, product_sku, use_unit = key.split("|", 2)
            agg = window["value"]
            return {
                "tenant_id": tenant_id,
                "product_sku": product_sku,
                "use_unit": use_unit,
                "window": name,
                "window_start_ms": window["start"],
                "window_end_ms": window["end"],
                "total_amount": plain(agg["total"]),
                "pulse_count": agg["count"],
                "min_amount": plain(agg["min"]),
                "max_amount": plain(agg["max"]),
            }

        # closing_strategy="key": a window closes when a later record of the *same*
        # key passes its end + grace. Each key's records come from one tenant, so from
        # one input partition, in event-time order, and the bench's closing records
        # (one per key, 2 min after the data) close every key's last windows.
        # "partition" would let one key's stream time close another key's windows, and
        # keys that were read from different input partitions interleave on the
        # repartition topic out of event-time order: their records could be dropped
        # as late.
        (
            grouped.tumbling_window(duration_ms, grace_ms=GRACE_MS, name=name)
            .reduce(reducer=add_to_window, initializer=init_window)
            .final(closing_strategy="key")
            .apply(to_output, metadata=True)
            .to_topic(aggregates)
        )

    print("peer-quix: RUNNING", flush=True)
    app.run()  # until SIGTERM/SIGINT: Quix commits the last checkpoint and exits


if __name__ == "__main__":
    main()
