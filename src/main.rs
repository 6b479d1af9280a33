//! The `quotaflow` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use anyhow::Context as _;
use quotaflow::settings::Settings;
use quotaflow::simulate::{self, Generated, Plan};
use quotaflow::{import_envoy, logging, server};
use quotaflow_core::fingerprint::Fingerprinter;
use quotaflow_core::rules::Rules;

/// mimalloc instead of glibc malloc: the sidecar allocates per request
/// (body, response, headers), and glibc's malloc/free were a fifth of its CPU
/// profile; mimalloc cut server CPU per request by 18–24% (docs/benchmarks.md).
/// The crate's `override` feature also hands it librdkafka's `malloc`/`free`:
/// librdkafka allocates every consumed record on its broker thread and frees
/// it on the worker's, which under glibc contended on an arena lock.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "quotaflow",
    version,
    about = "Rate limiting and quota enforcement"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the limiter and its HTTP sidecar (the default command).
    Serve {
        /// Settings file (TOML or JSON); the embedded config/default.toml when absent.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Address to listen on, overriding server.listen.
        #[arg(long, short)]
        listen: Option<SocketAddr>,
    },
    /// Generate request events: into the embedded pipeline (default, prints
    /// decisions and alerts as they flow) or, with --kafka, to a real Kafka.
    Simulate {
        /// Settings file; the embedded default when absent.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Publish Avro events to this Kafka (bootstrap servers) instead.
        #[arg(long)]
        kafka: Option<String>,
        /// Topic to publish to (with --kafka), overriding kafka.requests_topic.
        #[arg(long)]
        topic: Option<String>,
        #[command(flatten)]
        plan: Plan,
    },
    /// Decide a time range of the recorded requests topic again under a
    /// candidate config and the running one, and report what the candidate
    /// would have blocked (docs/backtest.md). Reads only: no commits, no
    /// outputs, no Redis.
    Backtest(quotaflow::backtest::Args),
    /// Validate a settings file; print every problem and exit 1 if any.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
    /// Convert envoyproxy/ratelimit config files (one domain each) into a
    /// quotaflow config on stdout; what it cannot express goes to stderr.
    /// Exit status 0: everything expressed; 2: some parts not (the config
    /// holds the rest); 1: unreadable or invalid input (docs/envoy-import.md).
    ImportEnvoy {
        /// envoy ratelimit YAML files, or directories of them (their
        /// `*.yaml` and `*.yml` files).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// A descriptor key and the quotaflow dimension carrying its value
        /// (user_id, api_key, client_ip, method, path; `none` unmaps a
        /// default key), e.g. `--map x-tenant-user=user_id`; repeatable.
        #[arg(long = "map", value_name = "KEY=DIMENSION")]
        map: Vec<String>,
        /// `toml`: a settings file for `serve --config` and `check-config`;
        /// `json`: the body of `POST /rate_limit/config`.
        #[arg(long, default_value = "toml", value_parser = ["toml", "json"])]
        format: String,
    },
    /// Print every metric this binary exports (name, type, help, labels)
    /// as JSON: labelled metrics appear on /metrics only once they have a
    /// sample; this lists them all.
    Metrics,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve {
        config: None,
        listen: None,
    }) {
        Command::Serve { config, listen } => serve(config, listen),
        Command::CheckConfig { file } => check_config(&file),
        Command::Backtest(args) => match quotaflow::backtest::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("quotaflow backtest: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::ImportEnvoy { files, map, format } => match import_envoy(&files, &map, &format) {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                eprintln!("quotaflow import-envoy: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Metrics => match quotaflow_adapters::metrics::Metrics::new() {
            Ok(m) => match serde_json::to_string_pretty(m.catalog()) {
                Ok(json) => {
                    println!("{json}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("quotaflow metrics: {e}");
                    ExitCode::FAILURE
                }
            },
            Err(e) => {
                eprintln!("quotaflow metrics: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Simulate {
            config,
            kafka,
            topic,
            plan,
        } => match simulate(config, kafka, topic, &plan) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("quotaflow simulate: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn simulate(
    config: Option<PathBuf>,
    kafka: Option<String>,
    topic: Option<String>,
    plan: &Plan,
) -> anyhow::Result<()> {
    let mut settings = Settings::load(config.as_deref())?;
    if let Some(t) = topic {
        settings.kafka.requests_topic = t;
    }
    logging::init(&settings.log);
    if let Some(bootstrap) = kafka {
        settings.kafka.bootstrap_servers = bootstrap;
        let sent = simulate::to_kafka(&settings, plan)?;
        println!(
            "{}",
            serde_json::json!({"published": sent, "topic": settings.kafka.requests_topic, "bootstrap_servers": settings.kafka.bootstrap_servers})
        );
        return Ok(());
    }
    settings.kafka.bootstrap_servers.clear();
    let mut state = server::build_state(&settings, None)?;
    let pipeline = server::start_pipeline(&settings, &mut state)?;
    let embedded = state
        .embedded
        .clone()
        .context("embedded pipeline did not start")?;
    let sent = simulate::pace(plan, |g| {
        match g {
            Generated::Event(e) => {
                embedded.bus.publish(&e)?;
            }
            Generated::Poison(bytes) => {
                embedded.bus.publish_raw(Some(b"poison"), bytes);
            }
        }
        Ok(())
    })?;
    pipeline.stop();
    let count = |action: &str| {
        embedded
            .sink
            .decisions
            .lock()
            .iter()
            .filter(|d| format!("{:?}", d.action).eq_ignore_ascii_case(action))
            .count()
    };
    println!(
        "{}",
        serde_json::json!({
            "events": sent,
            "blocks": count("block"),
            "unblocks": count("unblock"),
            "alerts": embedded.sink.alerts.lock().len(),
            "dead_letters": embedded.sink.dead_letters.lock().len(),
            "note": "decisions, alerts and dead letters are logged above as they happened (last 1000 of each counted)"
        })
    );
    Ok(())
}

fn serve(config: Option<PathBuf>, listen: Option<SocketAddr>) -> ExitCode {
    let mut settings = match Settings::load(config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("quotaflow: cannot load settings: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(addr) = listen {
        settings.server.listen = addr;
    }
    logging::init(&settings.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("quotaflow: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let token = std::env::var(server::ADMIN_TOKEN_ENV).ok();
    match runtime.block_on(server::serve(settings, token, server::shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(
                event = "fatal",
                error = format!("{e:#}"),
                "quotaflow failed"
            );
            eprintln!("quotaflow: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Prints the converted config and the report; returns the exit status.
fn import_envoy(paths: &[PathBuf], map: &[String], format: &str) -> anyhow::Result<u8> {
    let mut mapping = import_envoy::Mapping::default();
    for spec in map {
        mapping.add(spec)?;
    }
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut inner: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("{}", path.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
                .collect();
            inner.sort();
            anyhow::ensure!(
                !inner.is_empty(),
                "{}: no *.yaml or *.yml files",
                path.display()
            );
            files.extend(inner);
        } else {
            files.push(path.clone());
        }
    }
    let mut sources = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).map_err(|e| import_envoy::ImportError::Read {
            path: f.display().to_string(),
            source: e,
        })?;
        sources.push((f.display().to_string(), text));
    }
    let imported = import_envoy::import(&sources, &mapping)?;
    let out = if format == "json" {
        imported.to_json()
    } else {
        imported.to_toml()?
    };
    // A closed pipe (`… | head`) is the reader's choice, not an error.
    if let Err(e) = std::io::Write::write_all(&mut std::io::stdout().lock(), out.as_bytes()) {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(anyhow::Error::new(e).context("writing the config to stdout"));
        }
    }
    for item in &imported.report.items {
        eprintln!("{item}");
    }
    let missing = imported.report.missing().count();
    eprintln!(
        "quotaflow import-envoy: {} limit(s); {}",
        imported.doc.limits.len(),
        if missing == 0 {
            "everything expressed".to_owned()
        } else {
            format!("{missing} part(s) not expressed (exit status 2)")
        }
    );
    Ok(imported.exit_code())
}

fn check_config(file: &std::path::Path) -> ExitCode {
    let settings = match Settings::load_with_env(Some(file), false) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{}: {e}", file.display());
            return ExitCode::FAILURE;
        }
    };
    let mut ok = check_rules(file, settings.rules());
    // The shadow config is read at start as well: a broken one stops serve.
    if let Some(shadow) = &settings.shadow.config {
        ok &= match quotaflow::settings::load_rules(shadow) {
            Ok(f) => check_rules(shadow, f.doc),
            Err(e) => {
                eprintln!("{}: {e}", shadow.display());
                false
            }
        };
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn check_rules(file: &std::path::Path, doc: quotaflow_core::rules::RulesDoc) -> bool {
    match Rules::compile(doc, 1, &Fingerprinter::random()) {
        Ok(rules) => {
            println!("{}: ok ({} limits)", file.display(), rules.limits.len());
            true
        }
        Err(invalid) => {
            for e in &invalid.0 {
                eprintln!("{}: {e}", file.display());
            }
            eprintln!(
                "{}: {} error(s); config refused",
                file.display(),
                invalid.0.len()
            );
            false
        }
    }
}
