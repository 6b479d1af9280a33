//! Keyed check throughput: quotaflow's `KeyedStore` + `TokenBucket` side by
//! side with `governor`'s keyed limiter (the baseline), plus the full
//! `Limiter::check_then` request path.
//!
//! Run: `cargo bench --bench check` (about 2 minutes on 2 cores).
//! Summary of medians and ratios afterwards: `python3 scripts/bench/criterion-summary.py`.
//!
//! Quota shape, identical on both sides: a token bucket of 1e9 tokens
//! refilled at 1e9 per second (governor: `Quota::per_second(1e9)` with
//! `allow_burst(1e9)`, i.e. one token per nanosecond). Every check is allowed;
//! `sanity_check` asserts it before measuring, so both sides run their
//! "allowed" path.
//!
//! Clocks: quotaflow's algorithms take `now_ms` from the caller, governor
//! reads its own clock (quanta, TSC-based) inside `check_key`. So quotaflow
//! is measured twice:
//! - `quotaflow/counter_now`: `now_ms` from a loop counter (advances 1 ms per
//!   1024 checks), no clock read: the cost of the store and the algorithm;
//! - `quotaflow/clock_now`: `quotaflow_adapters::clock::now_ms()` (SystemTime, vDSO
//!   `clock_gettime`) read on every check, as the sidecar does: the figure
//!   to compare with governor, which also pays a clock read per check.

use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use quotaflow::settings::{Settings, StateSettings};
use quotaflow_adapters::clock::now_ms;
use quotaflow_adapters::metrics::Metrics;
use quotaflow_core::algorithms::TokenBucket;
use quotaflow_core::fingerprint::Fingerprinter;
use quotaflow_core::limiter::Limiter;
use quotaflow_core::rules::{Request, RulesDoc};
use quotaflow_core::state::{KeyedStore, Probe};
use smallvec::SmallVec;

/// Bucket capacity and refill per second, on both sides.
const BURST: u32 = 1_000_000_000;
/// Distinct keys of the `many_keys` benchmarks.
const MANY: usize = 100_000;
/// Threads of the `contended` benchmarks (the machine has 2 cores).
const THREADS: usize = 2;

fn bucket() -> TokenBucket {
    TokenBucket::new(u64::from(BURST), f64::from(BURST)).expect("valid bucket")
}

fn governor() -> DefaultKeyedRateLimiter<String> {
    let n = NonZeroU32::new(BURST).expect("non-zero");
    RateLimiter::keyed(Quota::per_second(n).allow_burst(n))
}

fn store() -> KeyedStore {
    // As the server builds it: 16 shards per core.
    KeyedStore::new(StateSettings::default().effective_shards())
}

/// State keys shaped like the ones `Limiter` builds for a per-user limit.
fn keys(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("per_user\u{1f}token_bucket\u{1f}user-{i:07}"))
        .collect()
}

/// How a quotaflow check gets its `now_ms`.
#[derive(Clone, Copy)]
enum Now {
    /// `base + i / 1024`: no clock read.
    Counter(u64),
    /// `quotaflow_adapters::clock::now_ms()` on every check.
    Clock,
}

impl Now {
    fn label(self) -> &'static str {
        match self {
            Now::Counter(_) => "quotaflow/counter_now",
            Now::Clock => "quotaflow/clock_now",
        }
    }

    #[inline(always)]
    fn at(self, i: u64) -> u64 {
        match self {
            Now::Counter(base) => base + (i >> 10),
            Now::Clock => now_ms(),
        }
    }
}

/// The secret state key ids are made with, as the limiter holds it.
static FP: std::sync::LazyLock<Fingerprinter> =
    std::sync::LazyLock::new(|| Fingerprinter::from_secret("bench"));

/// One check of a text key, as `Limiter` makes it: the key's id (a keyed
/// 128-bit hash) is part of the cost, as governor's hashing of its `String`
/// key is part of governor's.
#[inline(always)]
fn qf_check(store: &KeyedStore, tb: &TokenBucket, key: &str, now: u64) -> bool {
    let probe = Probe {
        key: FP.key_id(key.as_bytes()),
        algorithm: tb,
        enforce: true,
    };
    store.apply_one(&probe, now, 1).outcome.verdict.allowed
}

fn nows() -> [Now; 2] {
    [Now::Counter(now_ms()), Now::Clock]
}

/// Both sides admit every check of the benchmark's quota (so neither is
/// measured on a refusal path), and agree on a tight quota.
fn sanity_check(keys: &[String]) {
    let (st, tb, gov) = (store(), bucket(), governor());
    let now = Now::Counter(now_ms());
    for i in 0..1_000_000u64 {
        let key = &keys[i as usize % keys.len()];
        assert!(qf_check(&st, &tb, key, now.at(i)), "quotaflow refused");
        assert!(gov.check_key(key).is_ok(), "governor refused");
    }
    let (st, gov) = (store(), governor_tight());
    let tight = TokenBucket::new(5, 1.0).expect("valid bucket");
    let t = now_ms();
    let qf: usize = (0..10).filter(|_| qf_check(&st, &tight, "k", t)).count();
    let gv = (0..10)
        .filter(|_| gov.check_key(&"k".into()).is_ok())
        .count();
    assert_eq!((qf, gv), (5, 5), "a 5-token bucket admits 5 of 10 at once");
}

fn governor_tight() -> DefaultKeyedRateLimiter<String> {
    RateLimiter::keyed(
        Quota::per_second(NonZeroU32::new(1).expect("1"))
            .allow_burst(NonZeroU32::new(5).expect("5")),
    )
}

fn single_key(c: &mut Criterion) {
    let mut g = c.benchmark_group("single_key");
    g.throughput(Throughput::Elements(1));
    let key = keys(1).remove(0);
    for now in nows() {
        let (st, tb) = (store(), bucket());
        let mut i = 0u64;
        g.bench_function(now.label(), |b| {
            b.iter(|| {
                i += 1;
                qf_check(&st, &tb, black_box(&key), now.at(i))
            })
        });
    }
    let gov = governor();
    g.bench_function("governor", |b| {
        b.iter(|| gov.check_key(black_box(&key)).is_ok())
    });
    g.finish();
}

fn many_keys(c: &mut Criterion) {
    let mut g = c.benchmark_group("many_keys");
    g.throughput(Throughput::Elements(1));
    let keys = keys(MANY);
    for now in nows() {
        let (st, tb) = (store(), bucket());
        let mut i = 0u64;
        g.bench_function(now.label(), |b| {
            b.iter(|| {
                i += 1;
                let key = &keys[i as usize % MANY];
                qf_check(&st, &tb, black_box(key), now.at(i))
            })
        });
    }
    let gov = governor();
    let mut i = 0usize;
    g.bench_function("governor", |b| {
        b.iter(|| {
            i += 1;
            gov.check_key(black_box(&keys[i % MANY])).is_ok()
        })
    });
    g.finish();
}

/// Runs `iters` checks in total, split over `THREADS` threads started
/// together, and returns the wall time: criterion's time per iteration is
/// then the inverse of the aggregate throughput.
fn run_threads(iters: u64, check: impl Fn(usize, u64) -> bool + Sync) -> Duration {
    let per_thread = iters.div_ceil(THREADS as u64);
    let barrier = Barrier::new(THREADS + 1);
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (check, barrier) = (&check, &barrier);
            s.spawn(move || {
                barrier.wait();
                let mut allowed = 0u64;
                for i in 0..per_thread {
                    allowed += u64::from(check(t, i));
                }
                black_box(allowed);
            });
        }
        barrier.wait();
        let start = Instant::now();
        // Leaving the scope joins every thread.
        start
    })
    .elapsed()
}

fn contended(c: &mut Criterion) {
    let all = keys(MANY);
    for (group, many) in [("contended_one_key", false), ("contended_many_keys", true)] {
        let mut g = c.benchmark_group(group);
        g.throughput(Throughput::Elements(1));
        // One shared key, or each thread walking the key list from its own offset.
        let pick = |t: usize, i: u64| -> &String {
            if many {
                &all[(t * (MANY / THREADS) + i as usize) % MANY]
            } else {
                &all[0]
            }
        };
        for now in nows() {
            let (st, tb) = (store(), bucket());
            g.bench_with_input(BenchmarkId::new(now.label(), THREADS), &(), |b, ()| {
                b.iter_custom(|iters| {
                    run_threads(iters, |t, i| qf_check(&st, &tb, pick(t, i), now.at(i)))
                })
            });
        }
        let gov = governor();
        g.bench_with_input(BenchmarkId::new("governor", THREADS), &(), |b, ()| {
            b.iter_custom(|iters| run_threads(iters, |t, i| gov.check_key(pick(t, i)).is_ok()))
        });
        g.finish();
    }
}

/// Requests for the full-path benchmarks: `n` users, 1 000 API keys, 1 000
/// client addresses (documentation range: this is data, no traffic).
fn requests(n: usize) -> Vec<Request> {
    (0..n)
        .map(|i| Request {
            user_id: Some(format!("user-{i:07}")),
            api_key: Some(format!("key-{:04}", i % 1_000)),
            client_ip: Some(std::net::IpAddr::from([198, 51, 100, (i % 250) as u8 + 1])),
            method: Some("GET".into()),
            path: Some("/search/items".into()),
            cost: 1,
        })
        .collect()
}

fn limiter(doc: RulesDoc) -> Limiter {
    Limiter::new(
        doc,
        Fingerprinter::from_secret("bench"),
        StateSettings::default().effective_shards(),
    )
    .expect("valid rules")
}

/// The default config with every limit raised to 1e9 per window (shape,
/// matching and keys unchanged), so every check runs the allowed path.
fn roomy(mut doc: RulesDoc) -> RulesDoc {
    for l in &mut doc.limits {
        for field in ["capacity", "refill_per_sec", "limit"] {
            if l.params.contains_key(field) {
                l.params.insert(field.into(), BURST.into());
            }
        }
    }
    doc
}

fn request(c: &mut Criterion) {
    let mut g = c.benchmark_group("request");
    g.throughput(Throughput::Elements(1));
    let reqs = requests(MANY);
    let one = RulesDoc::from_json(
        format!(
            r#"{{"limits": [{{"name": "per_user", "key": ["user_id"],
                "capacity": {BURST}, "refill_per_sec": {BURST}}}]}}"#
        )
        .as_bytes(),
    )
    .expect("valid doc");
    let default = Settings::load_with_env(None, false)
        .expect("embedded default config")
        .rules();
    let cases = [
        ("one_user_limit", one),
        ("default_config_roomy", roomy(default.clone())),
        ("default_config", default),
    ];
    for (name, doc) in cases {
        let l = limiter(doc);
        // Allowed share over one pass, for the report.
        let allowed = reqs
            .iter()
            .filter(|r| l.check_then(r, now_ms(), |_, d| d.allowed))
            .count();
        eprintln!(
            "request/{name}: {} limits, {:.1}% of a first pass of {MANY} checks allowed",
            l.rules().limits.len(),
            100.0 * allowed as f64 / MANY as f64
        );
        let mut i = 0usize;
        g.bench_function(name, |b| {
            b.iter(|| {
                i += 1;
                let req = black_box(&reqs[i % MANY]);
                l.check_then(req, now_ms(), |_, d| d.allowed)
            })
        });
    }
    g.finish();
}

/// Pieces of the sidecar's `POST /check` beyond the limiter, to see where the
/// HTTP path spends its time: parsing the body as the handler does, and the
/// per-check metrics update (`Metrics::record`).
fn sidecar_parts(c: &mut Criterion) {
    let mut g = c.benchmark_group("sidecar_parts");
    g.throughput(Throughput::Elements(1));
    let bodies: Vec<Vec<u8>> = (0..1_000)
        .map(|i| {
            format!(r#"{{"user_id":"user-{i:05}","method":"GET","path":"/orders"}}"#).into_bytes()
        })
        .collect();
    let mut i = 0usize;
    g.bench_function("parse_body", |b| {
        b.iter(|| {
            i += 1;
            let de = &mut serde_json::Deserializer::from_slice(black_box(&bodies[i % 1_000]));
            let req: Request = serde_path_to_error::deserialize(de).expect("valid body");
            req
        })
    });
    let reqs = requests(MANY);
    let metrics = Metrics::new().expect("metrics");
    let l = limiter(
        RulesDoc::from_json(
            format!(
                r#"{{"limits": [{{"name": "per_user", "key": ["user_id"],
                    "capacity": {BURST}, "refill_per_sec": {BURST}}},
                    {{"name": "global", "algorithm": "sliding_window", "limit": {BURST}, "window": "1s"}}]}}"#
            )
            .as_bytes(),
        )
        .expect("valid doc"),
    );
    for with_metrics in [false, true] {
        let name = if with_metrics {
            "check_user_and_global+metrics_record"
        } else {
            "check_user_and_global"
        };
        let mut i = 0usize;
        g.bench_function(name, |b| {
            b.iter(|| {
                i += 1;
                let req = black_box(&reqs[i % MANY]);
                let started = Instant::now();
                l.check_then(req, now_ms(), |rules, d| {
                    if with_metrics {
                        metrics.record("check", rules, d, started.elapsed());
                    }
                    d.allowed
                })
            })
        });
    }
    g.finish();
}

/// Where the multi-limit request path spends its time: one atomic
/// `KeyedStore::apply` over 4 probes (what `Limiter` does for the default
/// config) against 4 independent `apply_one` calls on the same keys (a lower
/// bound without atomicity), and the API-key fingerprint each such request
/// computes.
fn probes(c: &mut Criterion) {
    let mut g = c.benchmark_group("probes");
    g.throughput(Throughput::Elements(1));
    let tb = bucket();
    let keys: Vec<[String; 4]> = (0..MANY)
        .map(|i| {
            [
                format!("per_user\u{1f}token_bucket\u{1f}user-{i:07}"),
                format!("per_api_key\u{1f}token_bucket\u{1f}{:032x}", i % 1_000),
                format!("trial\u{1f}token_bucket\u{1f}user-{i:07}"),
                "global\u{1f}token_bucket".to_owned(),
            ]
        })
        .collect();
    let now = now_ms();
    let st = store();
    let mut i = 0usize;
    let mut out = SmallVec::new();
    g.bench_function("apply_4_probes_atomic", |b| {
        b.iter(|| {
            i += 1;
            let k = &keys[i % MANY];
            let probes = k.each_ref().map(|key| Probe {
                key: FP.key_id(key.as_bytes()),
                algorithm: &tb,
                enforce: true,
            });
            st.apply(black_box(&probes), now + (i as u64 >> 10), 1, &mut out)
        })
    });
    let st = store();
    let mut i = 0usize;
    g.bench_function("apply_one_x4", |b| {
        b.iter(|| {
            i += 1;
            let t = now + (i as u64 >> 10);
            keys[i % MANY]
                .iter()
                .all(|key| qf_check(&st, &tb, black_box(key), t))
        })
    });
    let fp = Fingerprinter::from_secret("bench");
    let api_keys: Vec<String> = (0..1_000).map(|i| format!("key-{i:04}")).collect();
    let mut buf = String::with_capacity(64);
    let mut i = 0usize;
    g.bench_function("api_key_fingerprint_hex", |b| {
        b.iter(|| {
            i += 1;
            buf.clear();
            fp.write_hex(black_box(api_keys[i % 1_000].as_bytes()), &mut buf);
            buf.len()
        })
    });
    g.finish();
}

fn all(c: &mut Criterion) {
    sanity_check(&keys(MANY));
    single_key(c);
    many_keys(c);
    contended(c);
    request(c);
    probes(c);
    sidecar_parts(c);
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .sample_size(50)
        .noise_threshold(0.05)
}

criterion_group! {
    name = benches;
    config = config();
    targets = all
}
criterion_main!(benches);
