//! `outpost`: command-line wiring only. Parse arguments, load and validate config (no side
//! effects), install the TLS crypto provider and tracing, bind, run until a shutdown signal.
//!
//! Exit codes: 0 success, 64 bad configuration or usage (EX_USAGE), 69 a feature that is not
//! available yet (EX_UNAVAILABLE), 1 any runtime failure (bind, disk).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use outpost_config::{ConfigErrors, EXIT_CONFIG};
use tracing::{error, info};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

const EXIT_UNAVAILABLE: u8 = 69;

#[derive(Parser)]
#[command(
    name = "outpost",
    version,
    about = "CDN edge node and origin-shield caching proxy"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "OUTPOST_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run a caching edge (or shield) node in front of an origin.
    Edge(EdgeArgs),
    /// Run the static-site origin server.
    Origin(OriginArgs),
    /// Run the anycast-style node selector (not available yet).
    Selector(PendingArgs),
    /// Run the whole demo topology on one machine (not available yet).
    Demo(PendingArgs),
    /// Purge cached objects through a node's admin API (not available yet).
    Purge(PendingArgs),
    /// Push an asset into the CDN through a node's admin API (not available yet).
    Push(PendingArgs),
    /// Show a node's hit ratio and usage (not available yet).
    Stats(PendingArgs),
}

#[derive(Args)]
struct EdgeArgs {
    /// TOML config file (see configs/edge.toml); flags override its values.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Address for client traffic, e.g. 127.0.0.1:8080.
    #[arg(long)]
    listen: Option<String>,
    /// Address for the admin API (/healthz, /readyz), e.g. 127.0.0.1:9080.
    #[arg(long)]
    admin_listen: Option<String>,
    /// Origin URL, e.g. http://127.0.0.1:9000.
    #[arg(long)]
    origin: Option<String>,
    /// Directory of the disk tier (kept across restarts). Without it the node caches in memory only.
    #[arg(long)]
    cache_dir: Option<String>,
    /// Memory tier size, e.g. 256MiB.
    #[arg(long)]
    memory: Option<String>,
    /// Disk tier size, e.g. 10GiB.
    #[arg(long)]
    disk: Option<String>,
}

#[derive(Args)]
struct OriginArgs {
    /// TOML config file (see configs/origin.toml); flags override its values.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Directory to serve.
    #[arg(long)]
    root: Option<String>,
    /// Address to listen on, e.g. 127.0.0.1:9000.
    #[arg(long)]
    listen: Option<String>,
    /// Rules file mapping path globs to Cache-Control and Surrogate-Key (see configs/origin-rules.toml).
    #[arg(long)]
    rules: Option<String>,
}

#[derive(Args)]
struct PendingArgs {
    /// Arguments for a later version.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    rest: Vec<String>,
}

fn main() -> ExitCode {
    // Exactly one rustls provider in the graph (aws-lc-rs); install it before anything that
    // could build a TLS config, or rustls panics when it cannot pick one.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match cli.command {
        Command::Edge(args) => run_edge(args),
        Command::Origin(args) => run_origin(args),
        Command::Selector(_) => pending("selector", "the Topology issue"),
        Command::Demo(_) => pending("demo", "the Topology issue"),
        Command::Purge(_) => pending("purge", "the Purge and push issue"),
        Command::Push(_) => pending("push", "the Purge and push issue"),
        Command::Stats(_) => pending("stats", "the Observability issue"),
    }
}

fn pending(cmd: &str, issue: &str) -> ExitCode {
    eprintln!("outpost {cmd}: not available yet in this version (it arrives with {issue}).");
    ExitCode::from(EXIT_UNAVAILABLE)
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,hyper=warn,h2=warn"));
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .init(),
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .compact()
                    .with_writer(std::io::stderr),
            )
            .init(),
    }
}

fn config_failed(e: &ConfigErrors) -> ExitCode {
    eprint!("{e}");
    ExitCode::from(EXIT_CONFIG as u8)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    {
        let ctrl_c = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        #[cfg(unix)]
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! {
            _ = ctrl_c => {}
            _ = term => {}
        }
        info!("shutdown signal received");
    }
}

fn run_edge(args: EdgeArgs) -> ExitCode {
    let cfg = match outpost_edge::EdgeConfig::load(
        args.config.as_deref(),
        outpost_edge::EdgeOverrides {
            listen: args.listen,
            admin_listen: args.admin_listen,
            origin: args.origin,
            cache_dir: args.cache_dir,
            memory: args.memory,
            disk: args.disk,
        },
    ) {
        Ok(c) => c,
        Err(e) => return config_failed(&e),
    };
    runtime().block_on(async {
        match outpost_edge::EdgeServer::bind(cfg).await {
            Ok(server) => {
                server.run(shutdown_signal()).await;
                ExitCode::SUCCESS
            }
            Err(e) => {
                error!(error = %e, "edge failed to start");
                eprintln!("outpost edge: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

fn run_origin(args: OriginArgs) -> ExitCode {
    let cfg = match outpost_origin::OriginConfig::load(
        args.config.as_deref(),
        outpost_origin::OriginOverrides {
            listen: args.listen,
            root: args.root,
            rules: args.rules,
        },
    ) {
        Ok(c) => c,
        Err(e) => return config_failed(&e),
    };
    runtime().block_on(async {
        match outpost_origin::OriginServer::bind(cfg).await {
            Ok(server) => match server.run(shutdown_signal()).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("outpost origin: {e}");
                    ExitCode::FAILURE
                }
            },
            Err(e) => {
                eprintln!("outpost origin: cannot start: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
