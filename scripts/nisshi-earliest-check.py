#!/usr/bin/env python3
"""Checks whether the local broker answers "earliest offset" correctly after concurrent
transactional producers wrote the first batches of a partition.

Reproduction of a Nisshi 0.7.0-pre.2 (memory storage) bug found by the test suite:
three transactional producers each write 20 records to a new one-partition topic at
the same time and commit; all 60 records are readable from offset 0, yet ListOffsets
(earliest) sometimes answers a higher offset (e.g. 20), so a new consumer group with
auto.offset.reset=earliest, or a reader from "beginning", silently skips records. It
shows up in roughly 1 of 15 rounds. pulses' tests start their groups at offset 0
(tests/common `start_group_at_zero`); Apache Kafka answers 0.

    python3 -m venv /tmp/v && /tmp/v/bin/pip install confluent-kafka
    /tmp/v/bin/python scripts/nisshi-earliest-check.py [127.0.0.1:9092] [ROUNDS]

Exit 0 if every round's earliest offset is 0, 1 if not.
"""
import sys
import threading
import time
import uuid

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

BOOTSTRAP = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:9092"
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 30
PRODUCERS, PER_PRODUCER = 3, 20
admin = AdminClient({"bootstrap.servers": BOOTSTRAP})


def readable_from_zero(topic):
    c = Consumer({"bootstrap.servers": BOOTSTRAP, "group.id": "check-" + uuid.uuid4().hex,
                  "enable.auto.commit": False, "enable.partition.eof": True})
    c.assign([TopicPartition(topic, 0, 0)])
    n, started = 0, time.time()
    while time.time() - started < 20:
        m = c.poll(0.5)
        if m is None:
            continue
        if m.error():
            if m.error().code() == KafkaError._PARTITION_EOF:
                break
            continue
        n += 1
    earliest, _ = c.get_watermark_offsets(TopicPartition(topic, 0), cached=False, timeout=5)
    c.close()
    return n, earliest


def write_concurrently(topic):
    producers = []
    for _ in range(PRODUCERS):
        p = Producer({"bootstrap.servers": BOOTSTRAP, "transactional.id": "check-" + uuid.uuid4().hex, "linger.ms": 0})
        p.init_transactions(30)
        producers.append(p)

    def write(p, i):
        p.begin_transaction()
        for j in range(PER_PRODUCER):
            p.produce(topic, value=f"{i}-{j}".encode())
            p.poll(0)
        p.commit_transaction(30)

    threads = [threading.Thread(target=write, args=(p, i)) for i, p in enumerate(producers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


broken = 0
for r in range(ROUNDS):
    topic = "earliest-check-" + uuid.uuid4().hex[:8]
    for f in admin.create_topics([NewTopic(topic, 1, 1)]).values():
        f.result()
    write_concurrently(topic)
    n, earliest = readable_from_zero(topic)
    if earliest != 0:
        broken += 1
        print(f"round {r}: {n} of {PRODUCERS * PER_PRODUCER} records readable from offset 0, "
              f"but the broker says the earliest offset is {earliest}")
print(f"{'BROKEN' if broken else 'OK'}: earliest offset wrong in {broken} of {ROUNDS} rounds")
sys.exit(1 if broken else 0)
