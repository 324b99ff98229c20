//! `outpost`: command-line wiring only. Parse arguments, load and validate config (no side
//! effects), install the TLS crypto provider and tracing, bind, run until a shutdown signal.
//!
//! Exit codes: 0 success, 64 bad configuration or usage (EX_USAGE), 1 any runtime failure
//! (bind, disk, a failed push or purge).

use std::path::PathBuf;
use std::process::ExitCode;

/// `println!` that does not panic when stdout is closed (`outpost demo | head`, a reader that
/// went away): what cannot be written is dropped, and the command goes on (and drains).
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

/// `eprintln!` that does not panic on a closed stderr.
macro_rules! errln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

/// `eprint!` that does not panic on a closed stderr.
macro_rules! errout {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stderr(), $($t)*);
    }};
}

mod check;
mod demo;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use outpost_config::{ConfigErrors, EXIT_CONFIG};
use tracing::{error, info};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// mimalloc: the hit path allocates a few small blocks per request on every worker thread;
/// glibc's allocator showed up in profiles with arena lock waits and consolidation. `main`
/// tunes it to return freed pages at once (`outpost_alloc::tune`), so RSS follows `--memory`.
#[global_allocator]
static GLOBAL: outpost_alloc::MiMalloc = outpost_alloc::MiMalloc;

/// `0.1.0 (commit 1a2b3c4d5e6f)`: the package version and the commit built from (build.rs).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("OUTPOST_COMMIT"),
    ")"
);

#[derive(Parser)]
#[command(
    name = "outpost",
    version = VERSION,
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
    /// Run the anycast-style node selector in front of edges.
    Selector(SelectorArgs),
    /// Run the whole demo topology on one machine: origin, shield, edges and selector.
    Demo(DemoArgs),
    /// Purge cached objects through a node's admin API (prints the receipt).
    Purge(PurgeArgs),
    /// Push files and directories into the CDN through a node's admin API.
    Push(PushArgs),
    /// Show a node's hit ratio, request rate, origin latency and tier usage.
    Stats(StatsArgs),
    /// Follow a node's requests as they are answered, filtered (like varnishlog).
    Log(LogArgs),
    /// Check a configuration file, as the role's start-up would, and report every problem
    /// (exit 0 when valid, 64 when not).
    Check(CheckArgs),
    /// Print a shell completion script, e.g. `outpost completions bash > /etc/bash_completion.d/outpost`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), e.g. `outpost man > /usr/local/share/man/man1/outpost.1`.
    Man,
}

#[derive(Args)]
struct LogArgs {
    /// The node's admin URL, e.g. http://127.0.0.1:9080 (or 127.0.0.1:9080).
    #[arg(long)]
    admin: String,
    /// Admin token with the read scope (default: $OUTPOST_ADMIN_TOKEN).
    #[arg(long, env = "OUTPOST_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Only these statuses: a class (5xx) or a code (404).
    #[arg(long)]
    status: Option<String>,
    /// Only this cache result: HIT, MISS, STALE, REVALIDATED, PASS or ERROR.
    #[arg(long)]
    cache: Option<String>,
    /// Only URLs whose path starts with this, e.g. /assets/.
    #[arg(long)]
    url_prefix: Option<String>,
    /// Print the JSON lines the node sends (the access log's JSON fields).
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct CheckArgs {
    /// The TOML file to check.
    #[arg(long, short)]
    config: PathBuf,
    /// What the file configures; guessed from its keys when not given.
    #[arg(long, value_enum)]
    role: Option<check::Role>,
}

#[derive(Args)]
struct EdgeArgs {
    /// TOML config file (see configs/edge.toml); flags override its values.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Address for client traffic, e.g. 127.0.0.1:8080 [required here or as `listen` in the file].
    #[arg(long)]
    listen: Option<String>,
    /// Address for the admin API (/healthz, /readyz, /metrics, purge), e.g. 127.0.0.1:9080
    /// [default: none, no admin API].
    #[arg(long)]
    admin_listen: Option<String>,
    /// Origin URL, e.g. http://127.0.0.1:9000 [required here or as `origin` in the file].
    #[arg(long)]
    origin: Option<String>,
    /// Directory of the disk tier (kept across restarts) [default: none, memory only].
    #[arg(long)]
    cache_dir: Option<String>,
    /// Memory for the cache, e.g. 512MiB [default: 256MiB].
    #[arg(long)]
    memory: Option<String>,
    /// Disk tier size, e.g. 50GiB [default: 10GiB].
    #[arg(long)]
    disk: Option<String>,
    /// Address of the HTTPS listener, e.g. 127.0.0.1:8443 (needs --tls-cert and --tls-key, or
    /// [[tls.certs]] in the config).
    #[arg(long)]
    tls_listen: Option<String>,
    /// PEM certificate chain (leaf first) for the HTTPS listener; replaces [[tls.certs]].
    #[arg(long)]
    tls_cert: Option<String>,
    /// PEM private key of --tls-cert.
    #[arg(long)]
    tls_key: Option<String>,
    /// This node's name (Via, Cache-Status, the fleet), e.g. edge-fra-1 [default: outpost].
    #[arg(long)]
    name: Option<String>,
    /// Join a fleet: NATS server URLs, comma-separated, e.g. nats://10.0.0.1:4222 (the rest of
    /// [fleet] from the config file, or its defaults).
    #[arg(long)]
    fleet_servers: Option<String>,
}

#[derive(Args)]
struct OriginArgs {
    /// TOML config file (see configs/origin.toml); flags override its values.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Directory to serve [required here or as `root` in the file].
    #[arg(long)]
    root: Option<String>,
    /// Address to listen on [default: 127.0.0.1:9000].
    #[arg(long)]
    listen: Option<String>,
    /// Rules file mapping path globs to Cache-Control and Surrogate-Key (see
    /// configs/origin-rules.toml) [default: none, every file gets `public, max-age=60`].
    #[arg(long)]
    rules: Option<String>,
}

#[derive(Args)]
struct SelectorArgs {
    /// TOML config file (see configs/selector.toml); flags override its values.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Address clients connect to, e.g. 127.0.0.1:8080 [required here or as `listen` in the file].
    #[arg(long)]
    listen: Option<String>,
    /// Address for /metrics and /nodes, e.g. 127.0.0.1:9090 [default: none, no admin port].
    #[arg(long)]
    admin_listen: Option<String>,
}

#[derive(Args)]
struct DemoArgs {
    /// Number of edges.
    #[arg(long, default_value_t = 2)]
    edges: u16,
    /// Ports: selector P, origin P+1, shield P+2, edges P+3…; admin ports are data + 1000.
    #[arg(long, default_value_t = 8080)]
    base_port: u16,
    /// The static site the origin serves.
    #[arg(long, default_value = "site")]
    site: PathBuf,
    /// Where the nodes keep their disk tiers.
    #[arg(long, default_value = "var/demo")]
    cache_dir: PathBuf,
    /// Also serve HTTPS: a CA and a certificate for localhost / 127.0.0.1 are generated under
    /// <cache-dir>/tls; each edge and the shield get a TLS listener on their data port + 2000,
    /// and the edges reach the shield over https.
    #[arg(long)]
    tls: bool,
    /// Fleet mode: start a local nats-server (JetStream, port P+900; Debian's nats-server
    /// package) and have every node join it, so purges and pushes reach all of them through
    /// NATS.
    #[arg(long)]
    fleet: bool,
}

#[derive(Args)]
struct StatsArgs {
    /// The node's admin URL, e.g. http://127.0.0.1:9080 (or 127.0.0.1:9080).
    #[arg(long)]
    admin: String,
    /// Admin token, when the node wants one for reading (`public_metrics = false`)
    /// (default: $OUTPOST_ADMIN_TOKEN).
    #[arg(long, env = "OUTPOST_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Refresh every second.
    #[arg(long)]
    watch: bool,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("what").required(true).multiple(true).args(["urls", "prefix", "tag", "all"])))]
struct PurgeArgs {
    /// The node's admin URL, e.g. http://127.0.0.1:9080 (or 127.0.0.1:9080).
    #[arg(long)]
    admin: String,
    /// Admin token (default: $OUTPOST_ADMIN_TOKEN).
    #[arg(long, env = "OUTPOST_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Mark objects stale (served while revalidating) instead of removing them.
    #[arg(long)]
    soft: bool,
    /// URLs or paths to purge exactly (with every Vary and encoded variant).
    urls: Vec<String>,
    /// Purge every object whose path (or host/path) starts with this prefix.
    #[arg(long = "prefix")]
    prefix: Vec<String>,
    /// Purge every object carrying this tag (Surrogate-Key / Cache-Tag).
    #[arg(long = "tag")]
    tag: Vec<String>,
    /// Purge everything.
    #[arg(long)]
    all: bool,
    /// Fleet mode: wait up to this long (e.g. 5s, at most 1m) for every node to confirm; exit
    /// non-zero if one has not. Default: the node's fleet.receipt_wait.
    #[arg(long, value_parser = humantime::parse_duration)]
    wait: Option<std::time::Duration>,
}

#[derive(Args)]
struct PushArgs {
    /// The node's admin URL, e.g. http://127.0.0.1:9080 (or 127.0.0.1:9080).
    #[arg(long)]
    admin: String,
    /// Admin token (default: $OUTPOST_ADMIN_TOKEN).
    #[arg(long, env = "OUTPOST_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Where the objects go, e.g. /static/ (default /).
    #[arg(long, default_value = "/")]
    prefix: String,
    /// Uploads in flight at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Files and directories to push.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
}

fn main() -> ExitCode {
    outpost_alloc::tune();
    // Exactly one rustls provider in the graph (aws-lc-rs); install it before anything that
    // could build a TLS config, or rustls panics when it cannot pick one.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    outpost_edge::observe::metrics::set_build_commit(env!("OUTPOST_COMMIT"));
    match cli.command {
        Command::Edge(args) => run_edge(args),
        Command::Origin(args) => run_origin(args),
        Command::Selector(args) => run_selector(args),
        Command::Demo(args) => runtime().block_on(demo::run(
            demo::DemoArgs {
                edges: args.edges,
                base_port: args.base_port,
                site: args.site,
                cache_dir: args.cache_dir,
                tls: args.tls,
                fleet: args.fleet,
            },
            shutdown_signal(),
        )),
        Command::Purge(args) => run_purge(args),
        Command::Push(args) => run_push(args),
        Command::Log(args) => {
            let run = outpost_edge::log_client::run(outpost_edge::log_client::LogArgs {
                admin: args.admin,
                token: args.token,
                status: args.status,
                cache: args.cache,
                url_prefix: args.url_prefix,
                json: args.json,
            });
            match runtime().block_on(async {
                tokio::select! {
                    r = run => r,
                    _ = shutdown_signal() => Ok(()),
                }
            }) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    errln!("outpost log: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "outpost", &mut out);
            print_bytes(&out)
        }
        Command::Man => {
            let mut out = Vec::new();
            match clap_mangen::Man::new(Cli::command()).render(&mut out) {
                Ok(()) => print_bytes(&out),
                Err(e) => {
                    errln!("outpost man: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Check(args) => match check::check(&args.config, args.role) {
            Ok(role) => {
                outln!(
                    "outpost check: {} is a valid {role} configuration",
                    args.config.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => config_failed(&e),
        },
        Command::Stats(args) => {
            match runtime().block_on(outpost_edge::stats_client::run(
                &args.admin,
                args.token,
                args.watch,
            )) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    errln!("outpost stats: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Writes generated text to stdout; a closed stdout is not an error worth a panic.
fn print_bytes(bytes: &[u8]) -> ExitCode {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}

fn client_failed(cmd: &str, e: &outpost_purge_api::ClientError) -> ExitCode {
    errln!("outpost {cmd}: {e}");
    if e.is_usage() {
        ExitCode::from(EXIT_CONFIG as u8)
    } else {
        ExitCode::FAILURE
    }
}

fn run_purge(args: PurgeArgs) -> ExitCode {
    let req = outpost_purge_api::PurgeArgs {
        admin: args.admin,
        token: args.token,
        soft: args.soft,
        urls: args.urls,
        prefixes: args.prefix,
        tags: args.tag,
        all: args.all,
        wait: args.wait,
    };
    match runtime().block_on(outpost_purge_api::run_purge(req)) {
        Ok(receipt) => {
            outln!(
                "{}",
                serde_json::to_string_pretty(&receipt).unwrap_or_default()
            );
            if receipt.matched == Some(0) {
                // Not an error (the next request is a miss either way), but likely a typo.
                errln!(
                    "outpost purge: nothing matched: the node held no such object (check the URL: path and query as the client sends them, or the full http://host/path)"
                );
            }
            if receipt.all_ok() {
                ExitCode::SUCCESS
            } else {
                errln!("outpost purge: some nodes did not apply the purge (see nodes)");
                ExitCode::FAILURE
            }
        }
        Err(e) => client_failed("purge", &e),
    }
}

fn run_push(args: PushArgs) -> ExitCode {
    let req = outpost_purge_api::PushArgs {
        admin: args.admin,
        token: args.token,
        prefix: args.prefix,
        paths: args.paths,
        concurrency: args.concurrency,
        progress: true,
    };
    match runtime().block_on(outpost_purge_api::run_push(req)) {
        Ok(summary) => {
            outln!(
                "pushed {} files ({} new), {} bytes in {:.1}s; {} failed",
                summary.files_ok(),
                summary.created(),
                summary.bytes,
                summary.elapsed.as_secs_f64(),
                summary.failed.len()
            );
            for f in &summary.failed {
                errln!("  failed: {}: {}", f.file.display(), f.reason);
            }
            if summary.is_success() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => client_failed("push", &e),
    }
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
    errout!("{e}");
    ExitCode::from(EXIT_CONFIG as u8)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        // Disk reads and writes run on the blocking pool. tokio's default of 512 threads let a
        // burst of misses to disk start ~280 of them, each with allocator pages of its own
        // (issue 13, item 6); 32 is nginx's default thread pool for the same work.
        .max_blocking_threads(32)
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
    let overrides = outpost_edge::EdgeOverrides {
        listen: args.listen,
        admin_listen: args.admin_listen,
        origin: args.origin,
        cache_dir: args.cache_dir,
        memory: args.memory,
        disk: args.disk,
        tls_listen: args.tls_listen,
        tls_cert: args.tls_cert,
        tls_key: args.tls_key,
        name: args.name,
        fleet_servers: args.fleet_servers,
    };
    let cfg = match outpost_edge::EdgeConfig::load(args.config.as_deref(), overrides.clone()) {
        Ok(c) => c,
        Err(e) => return config_failed(&e),
    };
    runtime().block_on(async {
        match outpost_edge::EdgeServer::bind(cfg).await {
            Ok(server) => {
                // Register SIGHUP before the node announces itself: until a handler exists the
                // default action of SIGHUP is to terminate the process.
                #[cfg(unix)]
                let hup =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
                #[cfg(not(unix))]
                let hup = None::<()>;
                spawn_reload_on_sighup(hup, server.reloader(), args.config, overrides);
                #[cfg(unix)]
                spawn_reopen_on_sigusr1(server.access_log());
                server.run(shutdown_signal()).await;
                ExitCode::SUCCESS
            }
            Err(e) => {
                // Once, on stderr (a tracing line as well said it twice).
                errln!("outpost edge: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// SIGUSR1 reopens the access log file by its path (after logrotate moved it), as nginx does.
/// Handled with or without an access log: its default action would end the process.
#[cfg(unix)]
fn spawn_reopen_on_sigusr1(
    log: Option<std::sync::Arc<outpost_edge::observe::access_log::AccessLog>>,
) {
    let Ok(mut usr1) =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
    else {
        return;
    };
    tokio::spawn(async move {
        while usr1.recv().await.is_some() {
            match &log {
                Some(log) => {
                    info!("SIGUSR1: reopening the access log");
                    log.reopen();
                }
                None => info!("SIGUSR1: no [access_log] to reopen"),
            }
        }
    });
}

/// SIGHUP re-reads the config file (with the same flags on top) and applies what can change
/// live; an invalid file is rejected and the running config kept.
#[cfg(unix)]
fn spawn_reload_on_sighup(
    hup: Option<tokio::signal::unix::Signal>,
    reloader: outpost_edge::server::Reloader,
    file: Option<PathBuf>,
    overrides: outpost_edge::EdgeOverrides,
) {
    tokio::spawn(async move {
        let Some(mut hup) = hup else {
            return;
        };
        while hup.recv().await.is_some() {
            match outpost_edge::EdgeConfig::load(file.as_deref(), overrides.clone()) {
                Err(e) => error!(errors = %e, "config reload rejected; the running config is kept"),
                Ok(cfg) => match reloader.apply(cfg) {
                    Ok(kept) => {
                        for k in kept {
                            tracing::warn!("{k}");
                        }
                        info!("config reloaded");
                    }
                    Err(e) => {
                        error!(error = %e, "config reload rejected; the running config is kept")
                    }
                },
            }
        }
    });
}

#[cfg(not(unix))]
fn spawn_reload_on_sighup(
    _hup: Option<()>,
    _reloader: outpost_edge::server::Reloader,
    _file: Option<PathBuf>,
    _overrides: outpost_edge::EdgeOverrides,
) {
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
                    errln!("outpost origin: {e}");
                    ExitCode::FAILURE
                }
            },
            Err(e) => {
                errln!("outpost origin: cannot start: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

fn run_selector(args: SelectorArgs) -> ExitCode {
    let cfg = match outpost_selector::SelectorConfig::load(
        args.config.as_deref(),
        outpost_selector::SelectorOverrides {
            listen: args.listen,
            admin_listen: args.admin_listen,
        },
    ) {
        Ok(c) => c,
        Err(e) => return config_failed(&e),
    };
    runtime().block_on(async {
        match outpost_selector::Selector::bind(cfg).await {
            Ok(selector) => {
                selector.run(shutdown_signal()).await;
                ExitCode::SUCCESS
            }
            Err(e) => {
                errln!("outpost selector: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
