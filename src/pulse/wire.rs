//! Wire-format detection (SPEC §6): one topic carries both JSON and Avro. A Confluent
//! wire-format value starts with magic byte 0 and a 4-byte big-endian schema id; a JSON
//! value never starts with a 0 byte, so the first byte decides.

use super::{RejectReason, Rejection};

/// The Confluent wire-format magic byte.
pub const MAGIC: u8 = 0;
/// Magic byte plus schema id.
pub const HEADER_LEN: usize = 5;

/// What a record value is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire<'a> {
    /// Anything not starting with the magic byte: decoded as JSON.
    Json(&'a [u8]),
    /// Confluent wire format: the registry schema id and the Avro datum after it.
    Avro { schema_id: u32, body: &'a [u8] },
}

/// Classifies a value. A magic byte with fewer than 4 id bytes after it is `invalid_avro`.
pub fn detect(bytes: &[u8]) -> Result<Wire<'_>, Rejection> {
    match bytes {
        [MAGIC, a, b, c, d, body @ ..] => Ok(Wire::Avro { schema_id: u32::from_be_bytes([*a, *b, *c, *d]), body }),
        [MAGIC, ..] => Err(Rejection::new(
            RejectReason::InvalidAvro,
            format!("Confluent wire format needs {HEADER_LEN} header bytes, the value has {}", bytes.len()),
        )),
        _ => Ok(Wire::Json(bytes)),
    }
}

/// Frames an Avro datum in the Confluent wire format.
pub fn confluent(schema_id: u32, datum: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + datum.len());
    out.push(MAGIC);
    out.extend_from_slice(&schema_id.to_be_bytes());
    out.extend_from_slice(datum);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_byte_decides() {
        assert_eq!(detect(b"{\"a\":1}").unwrap(), Wire::Json(b"{\"a\":1}"));
        assert_eq!(detect(b"").unwrap(), Wire::Json(b""));
        let framed = confluent(258, &[7, 8]);
        assert_eq!(framed, vec![0, 0, 0, 1, 2, 7, 8]);
        assert_eq!(detect(&framed).unwrap(), Wire::Avro { schema_id: 258, body: &[7, 8] });
        assert_eq!(detect(&[0, 0, 0, 1, 2]).unwrap(), Wire::Avro { schema_id: 258, body: &[] });
        assert_eq!(detect(&[0, 0, 1]).unwrap_err().reason, RejectReason::InvalidAvro);
    }
}
