#!/usr/bin/env python3
"""Checks whether the local broker hides aborted transactions from read_committed readers.

Reproduction of a Nisshi 0.7.0-pre.2 (memory storage) limitation that blocks the
exactly-once crash tests: it writes the transaction markers into the log, but its Fetch
response carries no aborted-transactions list and its last stable offset is the high
watermark, so librdkafka (and every other client) delivers aborted records to
read_committed consumers. pulses itself is correct on Apache Kafka; see README.

    python3 -m venv /tmp/v && /tmp/v/bin/pip install confluent-kafka
    /tmp/v/bin/python scripts/nisshi-txn-check.py [127.0.0.1:9092]

Exit 0 if read_committed hides the aborted record, 1 if not.
"""
import socket
import struct
import sys
import time
import uuid

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

BOOTSTRAP = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:9092"
topic = "txn-check-" + uuid.uuid4().hex[:8]
admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
for f in admin.create_topics([NewTopic(topic, 1, 1)]).values():
    f.result()

p = Producer({"bootstrap.servers": BOOTSTRAP, "transactional.id": topic})
p.init_transactions(30)
p.begin_transaction(); p.produce(topic, b"committed"); p.commit_transaction(30)
p.begin_transaction(); p.produce(topic, b"aborted"); p.flush(); p.abort_transaction(30)

c = Consumer({"bootstrap.servers": BOOTSTRAP, "group.id": topic, "isolation.level": "read_committed",
              "enable.partition.eof": True, "auto.offset.reset": "earliest"})
c.assign([TopicPartition(topic, 0, 0)])
seen, deadline = [], time.time() + 20
while time.time() < deadline:
    m = c.poll(1)
    if m is None:
        continue
    if m.error():
        break  # partition EOF
    seen.append(m.value().decode())
c.close()
print("read_committed consumer received:", seen)

# The raw Fetch (v4, read_committed): what the broker itself reports.
def s16(s):
    b = s.encode()
    return struct.pack(">h", len(b)) + b

req = struct.pack(">hhi", 1, 4, 1) + s16("txn-check") + struct.pack(">iiiib", -1, 100, 1, 1 << 20, 1)
req += struct.pack(">i", 1) + s16(topic) + struct.pack(">iiqi", 1, 0, 0, 1 << 20)
host, port = BOOTSTRAP.rsplit(":", 1)
sock = socket.create_connection((host, int(port)))
sock.sendall(struct.pack(">i", len(req)) + req)
def recv(n):
    b = b""
    while len(b) < n:
        b += sock.recv(n - len(b))
    return b
resp = recv(struct.unpack(">i", recv(4))[0])
pos = 8 + 4 + 2 + len(topic) + 4  # correlation, throttle, topics[1], name, partitions[1]
part, err, hw, lso, n_aborted = struct.unpack_from(">ihqqi", resp, pos)
pos += 26
aborted = [struct.unpack_from(">qq", resp, pos + 16 * i) for i in range(max(n_aborted, 0))]
pos += 16 * max(n_aborted, 0)
(size,) = struct.unpack_from(">i", resp, pos)
records, q, batches = resp[pos + 4:pos + 4 + size], 0, []
while q + 61 <= len(records):
    base, length = struct.unpack_from(">qi", records, q)
    (attrs,) = struct.unpack_from(">h", records, q + 21)
    # A control record: length, attributes, timestamp and offset deltas, key length
    # (one byte each here), then the key: version (int16), type (0 abort, 1 commit).
    kind = "control" if attrs & 0x20 else "data"
    if attrs & 0x20:
        kind += " (commit)" if struct.unpack_from(">h", records, q + 61 + 7)[0] == 1 else " (abort)"
    batches.append(f"{base}:{kind}")
    q += 12 + length
print(f"broker: high watermark {hw}, last stable offset {lso}, aborted transactions {aborted}")
print("log batches:", ", ".join(batches))
ok = "aborted" not in seen
print("OK: aborted records are hidden" if ok else "BROKEN: read_committed delivers aborted records")
sys.exit(0 if ok else 1)
