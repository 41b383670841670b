//! A `read_committed` reader implemented by the test, from the log itself.
//!
//! Test setup only. Nisshi 0.7.0-pre.2 (memory storage) writes transaction markers into
//! the log but answers Fetch with no aborted-transactions list and a last stable offset
//! equal to the high watermark (`scripts/nisshi-txn-check.py` reproduces it), so
//! librdkafka hands aborted records to `read_committed` consumers. To check what a
//! real `read_committed` reader would see, this reader fetches the raw record batches
//! (Fetch v4) and keeps a transactional batch only once its producer's COMMIT marker
//! follows it, which is what `read_committed` means in Kafka's protocol.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;

use super::{bootstrap, partitions};

/// One committed data record.
#[derive(Debug, Clone)]
pub struct CommittedRecord {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
}

impl CommittedRecord {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(self.value.as_deref().unwrap_or_default()).expect("JSON value")
    }
}

/// What the log held, split by transaction outcome.
#[derive(Debug, Default)]
pub struct LogContents {
    pub committed: Vec<CommittedRecord>,
    /// Records of aborted transactions (that a broken broker would hand out).
    pub aborted: usize,
    /// Records of transactions with no marker yet.
    pub open: usize,
}

/// Every record of `topic` a correct `read_committed` reader would deliver.
pub fn read_log(topic: &str) -> LogContents {
    let mut out = LogContents::default();
    let mut conn = TcpStream::connect(bootstrap()).expect("connect to the broker");
    for partition in partitions(topic) {
        let mut pending: HashMap<i64, Vec<CommittedRecord>> = HashMap::new();
        let mut offset = 0i64;
        loop {
            let (high_watermark, batches) = fetch(&mut conn, topic, partition, offset);
            if batches.is_empty() {
                assert!(offset >= high_watermark, "{topic}[{partition}]: no batch at {offset} below {high_watermark}");
                break;
            }
            for b in batches {
                offset = b.last_offset + 1;
                match (b.control, b.transactional) {
                    (Some(commit), _) => {
                        let records = pending.remove(&b.producer_id).unwrap_or_default();
                        if commit {
                            out.committed.extend(records);
                        } else {
                            out.aborted += records.len();
                        }
                    }
                    (None, true) => pending.entry(b.producer_id).or_default().extend(b.records),
                    (None, false) => out.committed.extend(b.records),
                }
            }
        }
        out.open += pending.values().map(Vec::len).sum::<usize>();
    }
    out
}

struct Batch {
    last_offset: i64,
    producer_id: i64,
    transactional: bool,
    /// For a control batch: Some(true) commit, Some(false) abort.
    control: Option<bool>,
    records: Vec<CommittedRecord>,
}

/// One Fetch v4 round trip (isolation read_uncommitted: the reader decides itself).
fn fetch(conn: &mut TcpStream, topic: &str, partition: i32, offset: i64) -> (i64, Vec<Batch>) {
    let mut req = Vec::new();
    req.extend(1i16.to_be_bytes()); // api key: Fetch
    req.extend(4i16.to_be_bytes()); // version
    req.extend(1i32.to_be_bytes()); // correlation id
    put_str(&mut req, "pulses-test-committed-reader");
    req.extend((-1i32).to_be_bytes()); // replica id
    req.extend(100i32.to_be_bytes()); // max wait ms
    req.extend(1i32.to_be_bytes()); // min bytes
    req.extend((16i32 << 20).to_be_bytes()); // max bytes
    req.push(0); // isolation level: read_uncommitted
    req.extend(1i32.to_be_bytes());
    put_str(&mut req, topic);
    req.extend(1i32.to_be_bytes());
    req.extend(partition.to_be_bytes());
    req.extend(offset.to_be_bytes());
    req.extend((8i32 << 20).to_be_bytes());
    conn.write_all(&(req.len() as i32).to_be_bytes()).expect("send");
    conn.write_all(&req).expect("send");
    let mut len = [0u8; 4];
    conn.read_exact(&mut len).expect("receive");
    let mut resp = vec![0u8; i32::from_be_bytes(len) as usize];
    conn.read_exact(&mut resp).expect("receive");

    let mut r = Cursor { buf: &resp, pos: 0 };
    r.i32(); // correlation id
    r.i32(); // throttle
    assert_eq!(r.i32(), 1, "one topic");
    let name_len = r.i16() as usize;
    r.take(name_len);
    assert_eq!(r.i32(), 1, "one partition");
    assert_eq!(r.i32(), partition);
    let error = r.i16();
    assert_eq!(error, 0, "fetch {topic}[{partition}] at {offset}: error {error}");
    let high_watermark = r.i64();
    r.i64(); // last stable offset
    let aborted = r.i32();
    for _ in 0..aborted.max(0) {
        r.i64();
        r.i64();
    }
    let size = r.i32();
    let records = if size > 0 { r.take(size as usize) } else { &[] };
    (high_watermark, parse_batches(records, partition, offset))
}

fn parse_batches(buf: &[u8], partition: i32, from: i64) -> Vec<Batch> {
    let mut out = Vec::new();
    let mut r = Cursor { buf, pos: 0 };
    while r.left() >= 61 {
        let base = r.i64();
        let length = r.i32() as usize;
        if r.left() < length {
            break; // a partial batch at the end of the response
        }
        let end = r.pos + length;
        r.i32(); // partition leader epoch
        assert_eq!(r.take(1)[0], 2, "record batch v2");
        r.i32(); // crc
        let attributes = r.i16();
        assert_eq!(attributes & 7, 0, "the test reader reads uncompressed batches only");
        let last_offset = base + r.i32() as i64;
        r.i64(); // first timestamp
        r.i64(); // max timestamp
        let producer_id = r.i64();
        r.i16(); // producer epoch
        r.i32(); // base sequence
        let count = r.i32();
        let mut records = Vec::new();
        let mut control = None;
        for _ in 0..count {
            r.varint(); // record length
            r.take(1); // attributes
            r.varint(); // timestamp delta
            let offset = base + r.varint();
            let key = r.bytes();
            let value = r.bytes();
            for _ in 0..r.varint() {
                r.bytes();
                r.bytes();
            }
            if attributes & 0x20 != 0 {
                // Control record key: version (int16), type (0 abort, 1 commit).
                let k = key.expect("control record key");
                control = Some(i16::from_be_bytes([k[2], k[3]]) == 1);
            } else if offset >= from {
                records.push(CommittedRecord { partition, offset, key, value });
            }
        }
        r.pos = end;
        out.push(Batch { last_offset, producer_id, transactional: attributes & 0x10 != 0, control, records });
    }
    out
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend((s.len() as i16).to_be_bytes());
    buf.extend(s.as_bytes());
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn left(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn take(&mut self, n: usize) -> &'a [u8] {
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        s
    }
    fn i16(&mut self) -> i16 {
        i16::from_be_bytes(self.take(2).try_into().unwrap())
    }
    fn i32(&mut self) -> i32 {
        i32::from_be_bytes(self.take(4).try_into().unwrap())
    }
    fn i64(&mut self) -> i64 {
        i64::from_be_bytes(self.take(8).try_into().unwrap())
    }
    /// A zigzag varint (Kafka's record fields).
    fn varint(&mut self) -> i64 {
        let mut v = 0u64;
        let mut shift = 0;
        loop {
            let b = self.take(1)[0];
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                break;
            }
            shift += 7;
        }
        ((v >> 1) as i64) ^ -((v & 1) as i64)
    }
    fn bytes(&mut self) -> Option<Vec<u8>> {
        let n = self.varint();
        (n >= 0).then(|| self.take(n as usize).to_vec())
    }
}
