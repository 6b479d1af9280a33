//! The Avro codec on the processor's hot path, and the case for its
//! hand-written record mapping.
//!
//! `cargo bench --bench codec`. Measures, in one run:
//! - decoding a request event written with the current schema (the fast
//!   decoder) and with the v0 schema (apache-avro's schema resolution);
//! - encoding a decision, as the processor does for every block/unblock:
//!   the hand-written record -> `Value` mapping plus framing and writing
//!   (`Codec::encode_decision`), against serde's `apache_avro::to_value`
//!   plus the schema resolution it needs before anything is written (a
//!   lower bound of a serde-based encoder's cost).
//!
//! docs/benchmarks.md ("Avro codec") records the figures.

use std::hint::black_box;

use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::Schema;
use criterion::{criterion_group, criterion_main, Criterion};
use quotaflow_adapters::avro::{fingerprint, Codec, Encoding, DECISION_SCHEMA};
use quotaflow_core::pipeline::records::{Action, DecisionRecord, KeyPart, RequestEvent};

fn request() -> RequestEvent {
    RequestEvent {
        event_id: "gw-1:000042".into(),
        timestamp_ms: 1_718_000_000_123,
        user_id: Some("alice".into()),
        api_key: Some("sk_live_0123456789abcdef".into()),
        client_ip: Some("2001:db8::1".into()),
        method: Some("GET".into()),
        path: Some("/v1/orders/123".into()),
        cost: 3,
        gateway_id: Some("gw-eu-1".into()),
    }
}

fn decision() -> DecisionRecord {
    DecisionRecord {
        decision_id: "requests:3:1234567:decision:0".into(),
        action: Action::Block,
        limit: "per_user".into(),
        key: "per_user/user_id=alice".into(),
        dimensions: vec![KeyPart {
            name: "user_id".into(),
            value: "alice".into(),
        }],
        until_ms: Some(1_718_000_010_000),
        reason: "over the limit of per_user".into(),
        quota: 10,
        event_time_ms: 1_718_000_000_123,
        source_topic: "requests".into(),
        source_partition: 3,
        source_offset: 1_234_567,
        config_version: 1,
    }
}

/// A request event written with `schemas/history/request_event.v0.avsc`
/// (no `cost`, no `gateway_id`), framed as single-object.
fn request_v0(e: &RequestEvent) -> Vec<u8> {
    let v0 = Schema::parse_str(include_str!("../schemas/history/request_event.v0.avsc"))
        .expect("v0 schema");
    let opt = |s: &Option<String>| match s {
        None => Value::Union(0, Box::new(Value::Null)),
        Some(s) => Value::Union(1, Box::new(Value::String(s.clone()))),
    };
    let value = Value::Record(vec![
        ("event_id".into(), Value::String(e.event_id.clone())),
        (
            "timestamp_ms".into(),
            Value::TimestampMillis(e.timestamp_ms),
        ),
        ("user_id".into(), opt(&e.user_id)),
        ("api_key".into(), opt(&e.api_key)),
        ("client_ip".into(), opt(&e.client_ip)),
        ("method".into(), opt(&e.method)),
        ("path".into(), opt(&e.path)),
    ]);
    let mut out = vec![0xC3, 0x01];
    out.extend_from_slice(&fingerprint(&v0).to_le_bytes());
    GenericDatumWriter::builder(&v0)
        .build()
        .expect("writer")
        .write_value(&mut out, value)
        .expect("write");
    out
}

fn codec(c: &mut Criterion) {
    let codec = Codec::new(Encoding::SingleObject).expect("codec");
    let current = codec.encode_request(&request()).expect("encode");
    let old = request_v0(&request());
    let mut into = RequestEvent::default();
    let mut g = c.benchmark_group("decode_request");
    g.bench_function("current schema (fast decoder)", |b| {
        b.iter(|| {
            codec
                .decode_request_into(black_box(&current), &mut into)
                .expect("decode")
        })
    });
    g.bench_function("v0 schema (resolved by apache-avro)", |b| {
        b.iter(|| codec.decode_request(black_box(&old)).expect("decode"))
    });
    g.finish();

    let d = decision();
    let schema = Schema::parse_str(DECISION_SCHEMA).expect("decision schema");
    // The serde path must give the value the hand mapping writes.
    let via_serde = apache_avro::to_value(&d)
        .and_then(|v| v.resolve(&schema))
        .expect("serde value");
    let mut written = Vec::new();
    GenericDatumWriter::builder(&schema)
        .build()
        .expect("writer")
        .write_value(&mut written, via_serde)
        .expect("write");
    let hand = codec.encode_decision(&d).expect("encode");
    assert_eq!(&hand[10..], &written[..], "serde and hand mapping disagree");

    let mut g = c.benchmark_group("encode_decision");
    g.bench_function("hand mapping + framing + write (Codec)", |b| {
        b.iter(|| codec.encode_decision(black_box(&d)).expect("encode"))
    });
    g.bench_function("serde to_value + resolve (before any write)", |b| {
        b.iter(|| {
            apache_avro::to_value(black_box(&d))
                .and_then(|v| v.resolve(&schema))
                .expect("serde")
        })
    });
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
