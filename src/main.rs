//! The `quotaflow` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use quotaflow::fingerprint::Fingerprinter;
use quotaflow::rules::Rules;
use quotaflow::settings::Settings;
use quotaflow::{logging, server};

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
    /// Validate a settings file; print every problem and exit 1 if any.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve {
        config: None,
        listen: None,
    }) {
        Command::Serve { config, listen } => serve(config, listen),
        Command::CheckConfig { file } => check_config(&file),
    }
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

fn check_config(file: &std::path::Path) -> ExitCode {
    let settings = match Settings::load_with_env(Some(file), false) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{}: {e}", file.display());
            return ExitCode::FAILURE;
        }
    };
    match Rules::compile(settings.rules(), 1, &Fingerprinter::random()) {
        Ok(rules) => {
            println!("{}: ok ({} limits)", file.display(), rules.limits.len());
            ExitCode::SUCCESS
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
            ExitCode::FAILURE
        }
    }
}
