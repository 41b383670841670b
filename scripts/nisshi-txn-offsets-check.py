#!/usr/bin/env python3
"""Checks whether transactional offset commits from several producers of one consumer
group all become visible, as pulses' stage 1 makes them (one transactional producer per
input partition, each writing to every output partition, committed one after another).

A probe for a Nisshi 0.7.0-pre.2 (memory storage) problem seen in pulses' tests: one
stage-1 transaction stays open (its record invisible to read_committed readers, its
offset not committed) although no client error was reported. This probe has NOT
reproduced it yet (0 of 150 rounds); it records what was tried.

    python3 -m venv /tmp/v && /tmp/v/bin/pip install confluent-kafka
    /tmp/v/bin/python scripts/nisshi-txn-offsets-check.py [127.0.0.1:9092] [ROUNDS]

Exit 0 if every round's offsets are visible, 1 if not.
"""
import sys
import time
import uuid

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

BS = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:9092"
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 150
N = 3


def main() -> int:
    u = uuid.uuid4().hex[:8]
    src, out, group = f"txo-{u}.src", f"txo-{u}.out", f"txo-{u}.grp"
    admin = AdminClient({"bootstrap.servers": BS})
    for f in admin.create_topics([NewTopic(src, N, 1), NewTopic(out, N, 1)]).values():
        f.result()
    member = Consumer({"bootstrap.servers": BS, "group.id": group, "enable.auto.commit": False})
    member.subscribe([src])
    member.poll(8)  # join the group: real group metadata for the transactions
    producers = []
    for i in range(N):
        p = Producer({"bootstrap.servers": BS, "transactional.id": f"txo-{u}-{i}"})
        p.init_transactions(30)
        producers.append(p)
    check = Consumer({"bootstrap.servers": BS, "group.id": group, "enable.auto.commit": False})
    lost = []
    for n in range(1, ROUNDS + 1):
        for i, p in enumerate(producers):
            p.begin_transaction()
            for j in range(N):
                p.produce(out, b"x", partition=j)
            p.send_offsets_to_transaction([TopicPartition(src, i, n)], member.consumer_group_metadata(), 30)
            p.commit_transaction(30)
        want = {i: n for i in range(N)}
        deadline = time.time() + 2
        while True:
            got = {tp.partition: tp.offset for tp in check.committed([TopicPartition(src, i) for i in range(N)], 10)}
            if got == want or time.time() > deadline:
                break
            time.sleep(0.1)
        if got != want:
            lost.append((n, got))
    print(f"{'BROKEN' if lost else 'OK'}: {len(lost)} of {ROUNDS} rounds lost a transactional offset commit; first {lost[:3]}")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
