#!/usr/bin/env python3
"""Reproduces a Nisshi 0.7.0-pre.2 (memory storage) transaction bug that pulses' tests
meet: a committed transaction stays pending for good (its records invisible to
read_committed readers, its consumer offsets not committed, never aborted), although
commit_transaction() returned success.

Nisshi's EndTxn commits a transaction only together with every transaction whose
records overlap it (same partition, later offsets), and only once all of those are
prepared; otherwise it answers success and leaves the commit to a later EndTxn. That
later EndTxn only looks at its own direct overlaps, so a chain leaves the first one
behind (nisshi-storage src/dynostore.rs, txn_end, the `all(... is_prepared())` check):

    A writes p0; B writes p0 and p1      (both open)
    A commits                            -> pending: B, which overlaps it, is open
    C writes p1
    B commits                            -> pending: C is open
    C commits                            -> C and B commit; A, not C's overlap, stays pending

Pulses runs one transactional producer per input partition, all writing to the same
output partitions and all open at once, then commits them one after another: the
chain above. A producer's next transaction rescues its pending one, so only the last
transaction of a run gets stuck (a test waiting for it times out).

    python3 -m venv /tmp/v && /tmp/v/bin/pip install confluent-kafka
    /tmp/v/bin/python scripts/nisshi-txn-offsets-check.py [127.0.0.1:9092]
    /tmp/v/bin/python scripts/nisshi-txn-offsets-check.py 127.0.0.1:9092 PRODUCERS PARTITIONS TRIALS

Exit 0 if A's record and offset become visible (the broker is fine), 1 if not. With
PRODUCERS PARTITIONS TRIALS it runs random trials the way pulses commits instead: each
of 5 rounds opens a transaction on most producers, writes random output partitions,
then commits them one after another; it counts trials whose last offsets stay
uncommitted (3 producers, 3 partitions: 3 of 12; 2 producers: 0 of 16).
"""
import random
import sys
import time
import uuid

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

BS = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:9092"


def main() -> int:
    u = uuid.uuid4().hex[:8]
    src, out, group = f"txc-{u}.src", f"txc-{u}.out", f"txc-{u}.grp"
    admin = AdminClient({"bootstrap.servers": BS})
    for f in admin.create_topics([NewTopic(src, 3, 1), NewTopic(out, 2, 1)]).values():
        f.result()
    member = Consumer({"bootstrap.servers": BS, "group.id": group, "enable.auto.commit": False})
    member.subscribe([src])
    member.poll(8)  # join the group: real group metadata for the transactions
    meta = member.consumer_group_metadata()
    a, b, c = (Producer({"bootstrap.servers": BS, "transactional.id": f"txc-{u}-{n}"}) for n in "abc")
    for p in (a, b, c):
        p.init_transactions(30)

    def write(p, *partitions):
        for part in partitions:
            p.produce(out, f"{part}".encode(), partition=part)
        p.flush(10)

    def commit(p, src_partition):
        p.send_offsets_to_transaction([TopicPartition(src, src_partition, 1)], meta, 30)
        p.commit_transaction(30)

    a.begin_transaction(); write(a, 0)
    b.begin_transaction(); write(b, 0, 1)
    commit(a, 0)
    c.begin_transaction(); write(c, 1)
    commit(b, 1)
    commit(c, 2)
    print("all three commit_transaction() calls returned success")

    check = Consumer({"bootstrap.servers": BS, "group.id": group, "enable.auto.commit": False})
    reader = Consumer({"bootstrap.servers": BS, "group.id": f"{group}.r", "isolation.level": "read_committed",
                       "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    reader.assign([TopicPartition(out, 0, 0), TopicPartition(out, 1, 0)])
    seen = 0
    deadline = time.time() + 10
    got = {}
    while time.time() < deadline:
        m = reader.poll(0.2)
        if m is not None and m.error() is None:
            seen += 1
        got = {tp.partition: tp.offset for tp in check.committed([TopicPartition(src, i) for i in range(3)], 10)}
        if seen == 4 and got == {0: 1, 1: 1, 2: 1}:
            break
    ok = seen == 4 and got == {0: 1, 1: 1, 2: 1}
    print(f"{'OK' if ok else 'BROKEN'} after 10 s: read_committed saw {seen} of 4 committed records; "
          f"committed offsets {got} (want {{0: 1, 1: 1, 2: 1}}; -1001 = none)")
    return 0 if ok else 1


def trial(nprod: int, nparts: int, rounds: int, rng: random.Random) -> bool:
    u = uuid.uuid4().hex[:8]
    src, out, group = f"txr-{u}.src", f"txr-{u}.out", f"txr-{u}.grp"
    admin = AdminClient({"bootstrap.servers": BS})
    for f in admin.create_topics([NewTopic(src, nprod, 1), NewTopic(out, nparts, 1)]).values():
        f.result()
    member = Consumer({"bootstrap.servers": BS, "group.id": group, "enable.auto.commit": False})
    member.subscribe([src])
    member.poll(8)
    meta = member.consumer_group_metadata()
    ps = [Producer({"bootstrap.servers": BS, "transactional.id": f"txr-{u}-{n}"}) for n in range(nprod)]
    for p in ps:
        p.init_transactions(30)
    last = {}
    for r in range(rounds):
        active = [i for i in range(nprod) if rng.random() < 0.8] or [0]
        for i in active:
            ps[i].begin_transaction()
            for part in rng.sample(range(nparts), rng.randint(1, nparts)):
                ps[i].produce(out, b"v", partition=part)
            ps[i].flush(10)
        for i in active:
            last[i] = r + 1
            ps[i].send_offsets_to_transaction([TopicPartition(src, i, r + 1)], meta, 30)
            ps[i].commit_transaction(30)
    check = Consumer({"bootstrap.servers": BS, "group.id": group, "enable.auto.commit": False})
    deadline = time.time() + 5
    while time.time() < deadline:
        got = {tp.partition: tp.offset for tp in check.committed([TopicPartition(src, i) for i in range(nprod)], 10)}
        if all(got[i] == last[i] for i in last):
            return True
        time.sleep(0.2)
    print(f"  stuck: want {last}, committed {got}")
    return False


def trials(nprod: int, nparts: int, n: int) -> int:
    rng = random.Random(1)
    stuck = sum(0 if trial(nprod, nparts, 5, rng) else 1 for _ in range(n))
    print(f"{nprod} producers, {nparts} output partitions: {stuck} of {n} trials left a committed transaction pending")
    return 1 if stuck else 0


if __name__ == "__main__":
    if len(sys.argv) == 5:
        sys.exit(trials(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
    sys.exit(main())
