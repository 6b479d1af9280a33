//! Memory per tracked key: insert 1,000,000 distinct realistic state keys
//! into a `KeyedStore` sized as the server sizes it, and report the growth
//! per key. governor's keyed limiter (DashMap) holding the same keys is
//! measured in a child process as the baseline.
//!
//! Run: `cargo bench --bench memory` (a few seconds). Under `cargo test`
//! (no `--bench` argument) it runs a 10,000-key smoke version instead.
//! `QUOTAFLOW_MEMBENCH_KEYS=N` measures N keys instead of 1,000,000.
//!
//! The target is "at most 150 bytes a key beyond the key's own bytes". The
//! store keeps a 128-bit id per key instead of its text, so the verdict is
//! taken on the whole growth per key, key bytes included (stricter); the
//! figure beyond the key bytes is printed for governor, which keeps the text.
//!
//! Two measures, both after minus before, divided by the key count:
//! - RSS: `VmRSS` from `/proc/self/status`: what the process really costs,
//!   including malloc's own headers and rounding, after asking mimalloc (the
//!   allocator the `quotaflow` binary ships with, used here too) to return
//!   memory freed during the inserts;
//! - heap: bytes live per a counting global allocator: what the data
//!   structures ask for, without malloc's overhead.

use std::alloc::{GlobalAlloc, Layout};

use mimalloc::MiMalloc;
use std::fmt::Write as _;
use std::hint::black_box;
use std::num::NonZeroU32;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use quotaflow::settings::StateSettings;
use quotaflow_core::algorithms::TokenBucket;
use quotaflow_core::fingerprint::Fingerprinter;
use quotaflow_core::state::{KeyedStore, Probe};

/// Bytes per key beyond the key's own bytes that the store may use.
const TARGET: f64 = 150.0;
const SUBJECT_ENV: &str = "QUOTAFLOW_MEMBENCH_SUBJECT";

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: defers every call to `MiMalloc` (the allocator the `quotaflow`
// binary ships with), only counting sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { MiMalloc.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { MiMalloc.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { MiMalloc.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn rss_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// The realistic state key of user `i` under a per-user token bucket,
/// written into `buf` (reused, so only the store's copy stays allocated).
fn write_key(buf: &mut String, i: usize) {
    buf.clear();
    let _ = write!(buf, "per_user\u{1f}token_bucket\u{1f}user-{i:07}");
}

struct Measured {
    keys: usize,
    key_bytes: usize,
    rss: usize,
    heap: usize,
}

impl Measured {
    fn rss_per_key(&self) -> f64 {
        self.rss as f64 / self.keys as f64
    }

    fn heap_per_key(&self) -> f64 {
        self.heap as f64 / self.keys as f64
    }

    fn mean_key(&self) -> f64 {
        self.key_bytes as f64 / self.keys as f64
    }

    fn to_line(&self) -> String {
        format!(
            "{} {} {} {}",
            self.keys, self.key_bytes, self.rss, self.heap
        )
    }

    fn from_line(line: &str) -> Option<Self> {
        let v: Vec<usize> = line
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?;
        match v[..] {
            [keys, key_bytes, rss, heap] => Some(Self {
                keys,
                key_bytes,
                rss,
                heap,
            }),
            _ => None,
        }
    }
}

/// Insert `n` keys with `insert` and measure the growth.
fn measure(n: usize, mut insert: impl FnMut(&str)) -> Measured {
    let mut buf = String::with_capacity(64);
    let (rss0, heap0) = (rss_bytes(), LIVE.load(Ordering::Relaxed));
    let mut key_bytes = 0;
    for i in 0..n {
        write_key(&mut buf, i);
        key_bytes += buf.len();
        insert(&buf);
    }
    // Let mimalloc return what it keeps after frees (the tables' old arrays,
    // left behind by each doubling) so RSS is the steady-state cost, not a
    // snapshot of a purge delay.
    // SAFETY: a plain call into the allocator the binary runs on.
    unsafe { libmimalloc_sys::mi_collect(true) };
    Measured {
        keys: n,
        key_bytes,
        rss: rss_bytes().saturating_sub(rss0),
        heap: LIVE.load(Ordering::Relaxed).saturating_sub(heap0),
    }
}

fn quotaflow_store(n: usize) -> Measured {
    let store = KeyedStore::new(StateSettings::default().effective_shards());
    let tb = TokenBucket::new(1_000, 1_000.0).expect("valid bucket");
    let fp = Fingerprinter::from_secret("bench");
    let now = quotaflow_adapters::clock::now_ms();
    let m = measure(n, |key| {
        let probe = Probe {
            key: fp.key_id(key.as_bytes()),
            algorithm: &tb,
            enforce: true,
        };
        assert!(store.apply_one(&probe, now, 1).outcome.verdict.allowed);
    });
    assert_eq!(store.len(), n, "every key is tracked");
    black_box(&store);
    m
}

fn governor_store(n: usize) -> Measured {
    let q = governor::Quota::per_second(NonZeroU32::new(1_000).expect("non-zero"));
    let limiter = governor::RateLimiter::<String, _, _>::keyed(q);
    let mut owned = String::new();
    let m = measure(n, |key| {
        // governor's key type is `String`; reuse one so only its clone stays.
        owned.clear();
        owned.push_str(key);
        assert!(limiter.check_key(&owned).is_ok());
    });
    assert_eq!(limiter.len(), n, "every key is tracked");
    black_box(&limiter);
    m
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench -- FILTER`: run only when the filter names this bench.
    if let Some(f) = args.iter().find(|a| !a.starts_with('-')) {
        if !"memory".contains(f.as_str()) {
            return;
        }
    }
    let bench = args.iter().any(|a| a == "--bench");
    // QUOTAFLOW_MEMBENCH_KEYS=N measures another key count (the per-key
    // figure saw-tooths with the hash tables' power-of-two growth).
    let n = std::env::var("QUOTAFLOW_MEMBENCH_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if bench { 1_000_000 } else { 10_000 });

    if let Ok(subject) = std::env::var(SUBJECT_ENV) {
        let m = match subject.as_str() {
            "governor" => governor_store(n),
            _ => quotaflow_store(n),
        };
        println!("{}", m.to_line());
        return;
    }

    // Each subject in a fresh process of its own, so neither inherits the
    // other's freed-but-kept heap.
    let run = |subject: &str| -> Option<Measured> {
        let exe = std::env::current_exe().ok()?;
        let out = Command::new(exe)
            .args(&args)
            .env(SUBJECT_ENV, subject)
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        Measured::from_line(text.lines().last()?)
    };
    let (Some(qf), Some(gov)) = (run("quotaflow"), run("governor")) else {
        eprintln!("memory: a measuring child process failed");
        std::process::exit(1);
    };
    if !bench {
        println!(
            "memory: smoke run with {} keys, figures not meaningful; measure with `cargo bench --bench memory`",
            qf.keys
        );
        return;
    }
    let mean_key = qf.mean_key();
    let shards = StateSettings::default().effective_shards();
    println!(
        "memory: {} keys of {mean_key:.0} bytes, KeyedStore with {shards} shards",
        qf.keys
    );
    for (name, m) in [("quotaflow", &qf), ("governor (baseline)", &gov)] {
        println!(
            "memory: {name:<20} RSS +{:>7.1} MiB, heap +{:>7.1} MiB; per key: {:>6.1} B (RSS), {:>6.1} B (heap); beyond key bytes: {:>6.1} B (RSS)",
            m.rss as f64 / 1_048_576.0,
            m.heap as f64 / 1_048_576.0,
            m.rss_per_key(),
            m.heap_per_key(),
            m.rss_per_key() - m.mean_key(),
        );
    }
    let verdict = if qf.rss_per_key() <= TARGET {
        "MET"
    } else {
        "MISSED"
    };
    println!(
        "memory: quotaflow {:.1} bytes/key in all, key bytes included (RSS; target <= {TARGET:.0} beyond the key's bytes: {verdict}); governor {:.1} bytes/key in all, ratio {:.2}x",
        qf.rss_per_key(),
        gov.rss_per_key(),
        qf.rss_per_key() / gov.rss_per_key(),
    );
}
