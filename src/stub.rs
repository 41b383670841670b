//! `pulses stub`: synthetic usage pulses for demos, tests and benchmarks.
//!
//! The generator is pure and seeded: the same seed gives the same tenants, SKUs, amounts
//! and pulse_ids in the same order. Event times are "now" at production (minus a small
//! seeded jitter) unless `start_time_ms` pins them, which makes a run fully reproducible.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rust_decimal::Decimal;
use serde::Serialize;

use crate::pulse::time;

/// The catalogue stub pulses draw from: (product_sku, use_unit, max amount, decimals).
const CATALOGUE: &[(&str, &str, u64, u32)] = &[
    ("storage.standard", "GB", 500, 3),
    ("storage.standard", "GB-min", 30_000, 2),
    ("compute.vcpu", "vCPU-s", 3_600, 3),
    ("api.requests", "requests", 100, 0),
    ("network.egress", "GB", 50, 4),
    ("storage.archive", "GB-min", 90_000, 1),
];

/// What to generate.
#[derive(Debug, Clone)]
pub struct StubSpec {
    pub tenants: usize,
    /// How many (sku, unit) products; beyond the catalogue, numbered variants are used.
    pub skus: usize,
    pub seed: u64,
    /// Pulses per second, used to space pinned event times (None: 1 ms apart).
    pub rate: Option<f64>,
    /// Pin event times: pulse i gets `start + i / rate`.
    pub start_time_ms: Option<i64>,
}

/// One synthetic pulse, in the SPEC §3 input shape.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StubPulse {
    pub pulse_id: String,
    pub tenant_id: String,
    pub product_sku: String,
    #[serde(with = "rust_decimal::serde::str")]
    pub used_amount: Decimal,
    pub use_unit: String,
    #[serde(with = "time::rfc3339_ms")]
    pub timestamp: i64,
    pub attributes: Attributes,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Attributes {
    pub region: &'static str,
}

const REGIONS: &[&str] = &["eu-west-1", "us-east-1", "ap-south-1"];

/// An endless, seeded stream of pulses.
pub struct Generator {
    spec: StubSpec,
    rng: ChaCha8Rng,
    index: u64,
}

impl Generator {
    pub fn new(spec: StubSpec) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(spec.seed);
        Self { spec, rng, index: 0 }
    }

    /// The next pulse; `now_ms` is used when event times are not pinned.
    pub fn next_pulse(&mut self, now_ms: i64) -> StubPulse {
        let tenant = self.rng.gen_range(0..self.spec.tenants.max(1));
        let product = self.rng.gen_range(0..self.spec.skus.max(1));
        let (sku, unit, max, decimals) = CATALOGUE[product % CATALOGUE.len()];
        let variant = product / CATALOGUE.len();
        let product_sku = if variant == 0 { sku.to_owned() } else { format!("{sku}.v{variant}") };
        let scale = 10u64.pow(decimals);
        let used_amount = Decimal::new(self.rng.gen_range(1..=max * scale) as i64, decimals);
        let id: u128 = self.rng.gen();
        let jitter = self.rng.gen_range(0..500);
        let region = REGIONS[self.rng.gen_range(0..REGIONS.len())];
        let timestamp = match self.spec.start_time_ms {
            Some(start) => {
                let step = self.spec.rate.map(|r| 1000.0 / r).unwrap_or(1.0);
                start + (self.index as f64 * step) as i64
            }
            None => now_ms - jitter,
        };
        self.index += 1;
        StubPulse {
            pulse_id: format!("{id:032x}"),
            tenant_id: format!("tenant-{tenant:03}"),
            product_sku,
            used_amount,
            use_unit: unit.to_owned(),
            timestamp,
            attributes: Attributes { region },
        }
    }
}

impl StubPulse {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The pulse as a `schemas/pulse.avsc` record.
    pub fn to_avro(&self) -> apache_avro::types::Value {
        use apache_avro::types::Value;
        let some = |v| Value::Union(1, Box::new(v));
        Value::Record(vec![
            ("pulse_id".into(), some(Value::String(self.pulse_id.clone()))),
            ("tenant_id".into(), Value::String(self.tenant_id.clone())),
            ("product_sku".into(), Value::String(self.product_sku.clone())),
            ("use_unit".into(), Value::String(self.use_unit.clone())),
            ("used_amount".into(), Value::String(self.used_amount.to_string())),
            ("timestamp".into(), some(Value::TimestampMillis(self.timestamp))),
            ("attributes".into(), some(Value::Map([("region".to_owned(), Value::String(self.attributes.region.into()))].into()))),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(seed: u64) -> StubSpec {
        StubSpec { tenants: 5, skus: 8, seed, rate: Some(10.0), start_time_ms: Some(1_000_000) }
    }

    #[test]
    fn same_seed_same_pulses() {
        let (mut a, mut b, mut c) = (Generator::new(spec(7)), Generator::new(spec(7)), Generator::new(spec(8)));
        let xs: Vec<_> = (0..100).map(|_| a.next_pulse(0)).collect();
        let ys: Vec<_> = (0..100).map(|_| b.next_pulse(0)).collect();
        let zs: Vec<_> = (0..100).map(|_| c.next_pulse(0)).collect();
        assert_eq!(xs, ys);
        assert_ne!(xs, zs);
        assert_eq!(xs[10].timestamp, 1_001_000); // 10 pulses at 10/s = 1 s later
    }

    #[test]
    fn avro_stub_pulses_decode_to_the_json_ones() {
        use crate::codec::avro::{decode_record, pulse_from_record, write_datum, PULSE_SCHEMA};
        use crate::pulse::validate::{normalise, validate, RecordContext};
        let schema = apache_avro::Schema::parse_str(PULSE_SCHEMA).unwrap();
        let ctx = RecordContext { topic: "t", partition: 0, offset: 0, record_time_ms: None };
        let mut g = Generator::new(spec(3));
        for _ in 0..100 {
            let p = g.next_pulse(0);
            let bytes = write_datum(&schema, p.to_avro()).unwrap();
            let avro = pulse_from_record(&schema, decode_record(&schema, &bytes).unwrap()).unwrap();
            assert_eq!(normalise(avro.raw(), &ctx), validate(&p.to_json(), &ctx));
        }
    }

    #[test]
    fn stub_pulses_pass_validation() {
        use crate::pulse::validate::{validate, RecordContext};
        let mut g = Generator::new(spec(1));
        let ctx = RecordContext { topic: "t", partition: 0, offset: 0, record_time_ms: None };
        for _ in 0..1000 {
            let p = g.next_pulse(0);
            let v = validate(&p.to_json(), &ctx).expect("stub pulse is valid");
            assert_eq!((v.used_amount, v.tenant_id, v.pulse_id), (p.used_amount, p.tenant_id, p.pulse_id));
        }
    }
}
