//! `quotaflow backtest`: a time range of the recorded requests topic
//! decided again under a candidate config and under the running one, by
//! the same partition processor, and compared (docs/backtest.md).
//!
//! It reads with a consumer of its own outside the processors' group and
//! touches nothing else: no commits, no outputs, no Redis.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use serde::Serialize;

use crate::server::{codec, processor_config};
use crate::settings::{config_document, load_rules, RulesFile, Settings};
use quotaflow_adapters::kafka::replay::{PartitionRange, TopicReader};
use quotaflow_core::fingerprint::Fingerprinter;
use quotaflow_core::limiter::Limiter;
use quotaflow_core::pipeline::backtest::{rfc3339, Backtest, LimitReport, Report};
use quotaflow_core::pipeline::records::RequestEvent;
use quotaflow_core::pipeline::Output;

/// The command line of `quotaflow backtest`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The candidate config: a settings file (TOML or JSON; its limits,
    /// whitelist and path_case_sensitive) or the JSON of GET /rate_limit/config.
    #[arg(long, short)]
    pub config: PathBuf,
    /// The running instances' settings file: Kafka, requests topic,
    /// fingerprint_key, clock skew, alerts, sweeps (environment overrides
    /// apply, as for serve); the embedded default when absent.
    #[arg(long, short)]
    pub settings: Option<PathBuf>,
    /// The running config, from a file (formats as --config). Default: the
    /// limits of --settings.
    #[arg(long, conflicts_with = "running_url")]
    pub running: Option<PathBuf>,
    /// The running config, from an instance: GET URL/rate_limit/config
    /// (with QUOTAFLOW_ADMIN_TOKEN as bearer token when set; plain http).
    #[arg(long)]
    pub running_url: Option<String>,
    /// Start: RFC 3339, `-1h` (before now), `now` or epoch milliseconds.
    /// Default: the earliest record.
    #[arg(long, allow_hyphen_values = true)]
    pub from: Option<String>,
    /// End (exclusive), as --from. Default: the latest record when it starts.
    #[arg(long, allow_hyphen_values = true)]
    pub to: Option<String>,
    /// Print the report as JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Keys listed among the top affected.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    /// Also write the candidate's would-be decision records here, one JSON
    /// object a line.
    #[arg(long)]
    pub decisions_out: Option<PathBuf>,
    /// Bound on each broker call, and on a stall while reading.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// The JSON report: where the records came from, both configs, and the
/// comparison.
#[derive(Debug, Serialize)]
pub struct BacktestReport {
    pub topic: String,
    pub from_ms: Option<i64>,
    pub from: Option<String>,
    pub to_ms: Option<i64>,
    pub to: Option<String>,
    pub partitions: Vec<PartitionRange>,
    pub running_config: Source,
    pub candidate_config: Source,
    #[serde(flatten)]
    pub report: Report,
}

/// Where a config came from.
#[derive(Debug, Serialize)]
pub struct Source {
    /// `settings`, `file` or `url`.
    pub kind: &'static str,
    pub location: String,
}

/// Run the backtest and print its report.
pub fn run(args: &Args) -> anyhow::Result<()> {
    let settings = Settings::load(args.settings.as_deref())?;
    if settings.kafka.bootstrap_servers.is_empty() {
        bail!("kafka.bootstrap_servers is empty: a backtest reads the recorded requests topic");
    }
    if settings.security.fingerprint_key.is_empty() {
        bail!(
            "security.fingerprint_key is empty: set the running instances' one, so that keys \
             (and API-key fingerprints in decisions) are those the processor made"
        );
    }
    let fp = Fingerprinter::from_secret(&settings.security.fingerprint_key);
    let shards = 16;
    let (candidate_file, candidate_source) = (
        load_rules(&args.config)
            .with_context(|| format!("reading the candidate {}", args.config.display()))?,
        Source {
            kind: "file",
            location: args.config.display().to_string(),
        },
    );
    let (running_file, running_source) = running(args, &settings)?;
    let limiter = |file: RulesFile, what: &str| -> anyhow::Result<Arc<Limiter>> {
        let l = Limiter::new(file.doc.clone(), fp.clone(), shards)
            .with_context(|| format!("the {what} config is invalid"))?;
        if let Some(v) = file.version {
            l.adopt(v, file.doc)
                .with_context(|| format!("the {what} config is invalid"))?;
        }
        Ok(Arc::new(l))
    };
    let running_limiter = limiter(running_file, "running")?;
    let candidate_limiter = limiter(candidate_file, "candidate")?;

    let now = now_ms();
    let from_ms = args
        .from
        .as_deref()
        .map(|t| parse_time(t, now))
        .transpose()?;
    let to_ms = args.to.as_deref().map(|t| parse_time(t, now)).transpose()?;
    if let (Some(f), Some(t)) = (from_ms, to_ms) {
        if t <= f {
            bail!("--to must be after --from");
        }
    }
    let reader = TopicReader::open(&settings.kafka, from_ms, to_ms, args.timeout)?;
    let partitions = reader.ranges().to_vec();
    let codec = codec(&settings)?;
    let cfg = Arc::new(processor_config(&settings, &fp));
    let mut bt = Backtest::new(cfg, running_limiter, candidate_limiter, shards);
    let mut decisions = match &args.decisions_out {
        Some(path) => Some(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        )),
        None => None,
    };
    let mut decoded = RequestEvent::default();
    let mut out = Vec::new();
    let mut written: std::io::Result<()> = Ok(());
    reader.read(|partition, r| {
        let event = codec
            .decode_request_into(r.payload, &mut decoded)
            .map(|()| &decoded)
            .map_err(|e| format!("undecodable: {e}"));
        bt.record(partition, r, event, &mut out);
        if let (Some(w), Ok(())) = (decisions.as_mut(), &written) {
            written = write_decisions(w, &out);
        }
        out.clear();
    })?;
    if let Some(mut w) = decisions {
        written
            .and_then(|()| w.flush())
            .context("writing --decisions-out")?;
    }
    let output = BacktestReport {
        topic: settings.kafka.requests_topic.clone(),
        from_ms,
        from: from_ms.map(|t| rfc3339(t.max(0) as u64)),
        to_ms,
        to: to_ms.map(|t| rfc3339(t.max(0) as u64)),
        partitions,
        running_config: running_source,
        candidate_config: candidate_source,
        report: bt.report(args.top),
    };
    let mut stdout = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut stdout, &output)?;
        writeln!(stdout)?;
    } else {
        write!(stdout, "{}", table(&output))?;
    }
    Ok(())
}

fn write_decisions(w: &mut impl std::io::Write, out: &[Output]) -> std::io::Result<()> {
    for o in out {
        if let Output::Decision(d) = o {
            serde_json::to_writer(&mut *w, d)?;
            w.write_all(b"\n")?;
        }
    }
    Ok(())
}

/// The running config: --running, --running-url, or the settings' limits.
fn running(args: &Args, settings: &Settings) -> anyhow::Result<(RulesFile, Source)> {
    if let Some(path) = &args.running {
        let file = load_rules(path)
            .with_context(|| format!("reading the running config {}", path.display()))?;
        let source = Source {
            kind: "file",
            location: path.display().to_string(),
        };
        return Ok((file, source));
    }
    if let Some(url) = &args.running_url {
        let body = fetch_config(url)?;
        let file = config_document(&body)
            .with_context(|| format!("the config read from {url}"))?
            .with_context(|| format!("{url} did not answer with a rate-limit config"))?;
        let source = Source {
            kind: "url",
            location: url.clone(),
        };
        return Ok((file, source));
    }
    let file = RulesFile {
        doc: settings.rules(),
        version: None,
    };
    let location = args.settings.as_deref().map_or_else(
        || "(embedded default)".to_owned(),
        |p| p.display().to_string(),
    );
    Ok((
        file,
        Source {
            kind: "settings",
            location,
        },
    ))
}

/// `GET {base}/rate_limit/config` over plain HTTP/1.1.
fn fetch_config(base: &str) -> anyhow::Result<Vec<u8>> {
    use http_body_util::{BodyExt as _, Empty};
    use hyper::body::Bytes;

    let url = if base.ends_with("/rate_limit/config") {
        base.to_owned()
    } else {
        format!("{}/rate_limit/config", base.trim_end_matches('/'))
    };
    let uri: hyper::Uri = url.parse().with_context(|| format!("{url} is not a URL"))?;
    if uri.scheme_str() != Some("http") {
        bail!("--running-url must be a plain http:// URL (got {url})");
    }
    let authority = uri
        .authority()
        .with_context(|| format!("{url} has no host"))?
        .clone();
    let token = std::env::var(crate::server::ADMIN_TOKEN_ENV).ok();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let addr = format!(
            "{}:{}",
            authority.host(),
            authority.port_u16().unwrap_or(80)
        );
        let stream = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::net::TcpStream::connect(&addr),
        )
        .await
        .with_context(|| format!("connecting to {addr}: timed out"))?
        .with_context(|| format!("connecting to {addr}"))?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let mut req = hyper::Request::get(uri.path())
            .header(hyper::header::HOST, authority.as_str())
            .header(hyper::header::ACCEPT, "application/json");
        if let Some(t) = token.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
            // Several tokens may be listed: the first one is ours.
            let first = t.split(',').next().unwrap_or(t).trim();
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {first}"));
        }
        let answer = tokio::time::timeout(
            Duration::from_secs(10),
            send.send_request(req.body(Empty::<Bytes>::new())?),
        )
        .await
        .with_context(|| format!("GET {url}: timed out"))??;
        let status = answer.status();
        let body = answer.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            bail!(
                "GET {url}: {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(300)])
            );
        }
        Ok(body.to_vec())
    })
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// RFC 3339, `now`, `-DURATION` (before `now_ms`) or epoch milliseconds.
pub fn parse_time(text: &str, now_ms: i64) -> anyhow::Result<i64> {
    let t = text.trim();
    if t == "now" {
        return Ok(now_ms);
    }
    if let Some(ago) = t.strip_prefix('-') {
        let d = humantime::parse_duration(ago)
            .with_context(|| format!("{text}: not a duration before now (e.g. -1h, -30m)"))?;
        return Ok(now_ms.saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)));
    }
    if let Ok(ms) = t.parse::<i64>() {
        return Ok(ms);
    }
    chrono::DateTime::parse_from_rfc3339(t)
        .map(|d| d.timestamp_millis())
        .map_err(|e| {
            anyhow::anyhow!(
                "{text}: not a time ({e}; RFC 3339 such as 2024-05-01T12:00:00Z, -1h, now, or epoch ms)"
            )
        })
}

/// The report as tables for people.
fn table(o: &BacktestReport) -> String {
    use std::fmt::Write as _;
    let r = &o.report;
    let mut s = String::new();
    let when = |t: &Option<String>| t.clone().unwrap_or_else(|| "-".into());
    let _ = writeln!(
        s,
        "backtest of {} from {} to {} ({} partitions): {} records, {} dead letters",
        o.topic,
        o.from
            .clone()
            .unwrap_or_else(|| "the earliest record".into()),
        o.to.clone().unwrap_or_else(|| "the latest record".into()),
        o.partitions.len(),
        r.records,
        r.dead_letters
    );
    let _ = writeln!(
        s,
        "running:   {} {} (version {}, {} limits)",
        o.running_config.kind,
        o.running_config.location,
        r.running.config_version,
        r.running.limits
    );
    let _ = writeln!(
        s,
        "candidate: {} {} ({} limits)\n",
        o.candidate_config.kind, o.candidate_config.location, r.candidate.limits
    );
    let _ = writeln!(
        s,
        "{:<14} {:>16} {:>12} {:>8} {:>8}  first block",
        "", "blocked requests", "blocked keys", "blocks", "alerts"
    );
    for (name, side) in [("running", &r.running), ("candidate", &r.candidate)] {
        let _ = writeln!(
            s,
            "{name:<14} {:>16} {:>12} {:>8} {:>8}  {}",
            side.blocked_requests,
            side.blocked_keys,
            side.decisions.block,
            side.alerts,
            when(&side.first_block)
        );
    }
    let _ = writeln!(
        s,
        "{:<14} {:>16}",
        "newly blocked", r.newly_blocked_requests
    );
    let _ = writeln!(
        s,
        "{:<14} {:>16}\n",
        "newly allowed", r.newly_allowed_requests
    );

    let _ = writeln!(
        s,
        "{:<24} {:<18} {:<14} {:<20} {:>14} {:>10} {:>8}  first trip",
        "limit", "config", "algorithm", "key", "quota/window", "refused", "keys"
    );
    for l in &r.limits {
        for (i, (side, rep)) in [("running", &l.running), ("candidate", &l.candidate)]
            .into_iter()
            .enumerate()
        {
            let name = if i == 0 { l.name.as_str() } else { "" };
            let _ = match rep {
                Some(x) => writeln!(
                    s,
                    "{name:<24} {:<18} {:<14} {:<20} {:>14} {:>10} {:>8}  {}",
                    if x.shadow {
                        format!("{side} (shadow)")
                    } else {
                        side.to_owned()
                    },
                    x.algorithm,
                    key_text(x),
                    format!("{}/{}s", x.quota, x.window_secs),
                    x.refused_requests,
                    x.refused_keys,
                    when(&x.first_trip)
                ),
                None => writeln!(s, "{name:<24} {side:<18} (no such limit)"),
            };
        }
    }
    let _ = writeln!(
        s,
        "\ntop keys the candidate blocks (state key fingerprints under security.fingerprint_key, as logs' key_fp)"
    );
    let _ = writeln!(
        s,
        "{:<24} {:<20} {:<32} {:>8} {:>14}  first trip",
        "limit", "key", "key_fp", "blocked", "newly blocked"
    );
    for k in &r.top_keys {
        let _ = writeln!(
            s,
            "{:<24} {:<20} {:<32} {:>8} {:>14}  {}",
            k.limit,
            k.key.join(","),
            k.key_fp,
            k.blocked_requests,
            k.newly_blocked_requests,
            k.first_trip
        );
    }
    if r.top_keys.is_empty() {
        let _ = writeln!(s, "(none)");
    }
    s
}

fn key_text(l: &LimitReport) -> String {
    if l.key.is_empty() {
        "(global)".into()
    } else {
        l.key.join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_relative_now_or_epoch_ms() {
        let now = 1_700_000_000_000;
        assert_eq!(parse_time("now", now).unwrap(), now);
        assert_eq!(parse_time("-1h", now).unwrap(), now - 3_600_000);
        assert_eq!(parse_time("-90s", now).unwrap(), now - 90_000);
        assert_eq!(parse_time("1699999999000", now).unwrap(), 1_699_999_999_000);
        assert_eq!(
            parse_time("2023-11-14T22:13:20Z", now).unwrap(),
            1_700_000_000_000
        );
        assert_eq!(
            parse_time("2023-11-14T23:13:20.5+01:00", now).unwrap(),
            1_700_000_000_500
        );
        assert!(parse_time("yesterday", now).is_err());
        assert!(parse_time("-soon", now).is_err());
    }
}
