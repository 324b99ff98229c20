//! Conformance gate: the public HTTP caching test suite (cache-tests) run against Outpost.
//!
//! `cache_tests_conformance_gate` runs the current suite: a cache-tests checkout from
//! `$OUTPOST_CACHE_TESTS_DIR`, else `../shared/cache-tests-suite`, copied to
//! `target/cache-tests-suite/` (with `npm ci --omit=dev` there); without either, the pinned npm
//! package `http-cache-tests` (`conformance/package.json`). It starts the suite's origin server
//! (node, loopback only), the system under test in front of it, runs the suite's CLI through
//! it, scores the results with `tests/support/cachetests.rs` and fails when fewer required
//! tests pass than the suite's baseline records (`conformance/current/baseline.toml` for a
//! checkout, `conformance/baseline.toml` for the package). See `conformance/README.md`.
//!
//! The other tests check the scorer: synthetic cases, and cross-checks against the team's
//! reference tool (`shared/tools/cachetests_score.py`) on the published result files in
//! `shared/cache-tests/` and `shared/cache-tests-suite/results/`.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{ErrorKind, Read as _, Seek as _, SeekFrom};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::cachetests::{self, Audience, Definitions, Kind, Results, Score, Verdict};
use crate::support::proc::{BIN, listening};
use crate::support::repo;

/// The npm package that holds the pinned (fallback) suite.
const SUITE_PACKAGE: &str = "http-cache-tests";
/// A cache-tests checkout (the git layout or the npm package layout) to run instead of
/// `../shared/cache-tests-suite`.
const SUITE_DIR_ENV: &str = "OUTPOST_CACHE_TESTS_DIR";
/// `OUTPOST_CACHE_TESTS_DIR=pinned` runs the pinned npm package even when a checkout is there.
const PINNED: &str = "pinned";
/// The snapshot of the current suite beside the checkout (read-only in CI).
const SHARED_SUITE: &str = "../shared/cache-tests-suite";
/// `1`: the gate also writes `conformance/results/outpost.json` and `index.mjs`.
const WRITE_RESULTS_ENV: &str = "OUTPOST_CONFORMANCE_WRITE_RESULTS";
/// Selects the system under test: `edge` (default) or `direct`.
const TARGET_ENV: &str = "OUTPOST_CONFORMANCE_TARGET";
/// Overrides the time allowed for the suite's CLI, in seconds.
const TIMEOUT_ENV: &str = "OUTPOST_CONFORMANCE_TIMEOUT_SECS";
/// A full run takes about 20 s against a bare origin; the suite pauses 3 s between the
/// requests of some tests and runs them 100 at a time, so a slow cache could take minutes.
const DEFAULT_CLI_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// How long a freshly started server may take to say where it listens.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

// ------------------------------------------------------------------------------ the gate

#[test]
fn cache_tests_conformance_gate() {
    let root = workspace_root();
    let conformance = root.join("conformance");
    let target = Target::from_env();
    let suite = Suite::locate(&root);
    let out = out_dir(&root);
    fs::create_dir_all(&out).expect("create target/conformance");
    for stale in ["results.json", "summary.txt", "cli.stderr.log"] {
        let _ = fs::remove_file(out.join(stale));
    }

    let defs_json = node_stdout(
        &conformance,
        &[
            "--no-warnings",
            "export-tests.mjs",
            &suite.dir.display().to_string(),
            suite.layout.cli(),
        ],
    );
    fs::write(out.join("tests.json"), &defs_json).expect("write target/conformance/tests.json");
    let defs = Definitions::from_json(&defs_json)
        .unwrap_or_else(|e| panic!("definitions from conformance/export-tests.mjs: {e}"));

    // Declared before the guard, so that the processes are gone before the directory is.
    let cache_dir = tempfile::tempdir().expect("create a cache directory");
    let mut children = Children::default();

    // The suite's origin server. `npm run server` would run `node server/server.mjs &` in the
    // package directory with the package's `config` as npm_package_config_*; the explicit
    // npm_config_* variables take precedence over those in server.mjs.
    let server_log = out.join("server.log");
    let mut server_cmd = Command::new("node");
    server_cmd
        .arg("--import")
        .arg(conformance.join("bind-loopback.mjs"))
        .arg(suite.layout.server())
        .current_dir(&suite.dir)
        .env("npm_config_protocol", "http")
        // Port 0: the OS picks one, and the server prints it ("Listening on http://host:port/").
        .env("npm_config_port", "0")
        .env("npm_config_pidfile", out.join("server.pid"));
    let server = children.spawn(
        "cache-tests server",
        &mut server_cmd,
        &server_log,
        &server_log,
    );
    let suite_addr = wait_for_log(&mut children, server, &server_log, suite_listening);

    let (base_url, target_line) = match target {
        Target::Direct => (
            format!("http://{suite_addr}"),
            format!("direct: the suite's CLI talks to its own server at {suite_addr}, no cache"),
        ),
        Target::Edge => {
            let args = [
                "edge".to_owned(),
                "--origin".to_owned(),
                format!("http://{suite_addr}"),
                "--listen".to_owned(),
                "127.0.0.1:0".to_owned(),
                "--admin-listen".to_owned(),
                "127.0.0.1:0".to_owned(),
                "--cache-dir".to_owned(),
                cache_dir.path().display().to_string(),
            ];
            let mut edge_cmd = Command::new(BIN);
            edge_cmd
                .args(&args)
                .current_dir(&root)
                // The "edge listening" line names the bound addresses.
                .env("RUST_LOG", "info,hyper=warn,h2=warn");
            let edge = children.spawn(
                "outpost edge",
                &mut edge_cmd,
                &out.join("edge.stdout.log"),
                &out.join("edge.stderr.log"),
            );
            let edge_log = out.join("edge.stderr.log");
            let (edge_addr, _) = wait_for_log(&mut children, edge, &edge_log, listening);
            (
                format!("http://{edge_addr}"),
                format!("edge: outpost {}", args.join(" ")),
            )
        }
    };

    // The suite's CLI, as `npm run --silent cli --base=URL` would run it, minus the npm wrapper
    // (so that killing it on timeout kills the actual client). Empty ids select a full run.
    let results_path = out.join("results.json");
    let cli_stderr = out.join("cli.stderr.log");
    let mut cli_cmd = Command::new("node");
    cli_cmd
        .args(["--no-warnings", suite.layout.cli()])
        .current_dir(&suite.dir)
        .env("npm_config_base", &base_url)
        .env("npm_config_id", "")
        .env("npm_package_config_id", "");
    let timeout = cli_timeout();
    let started = Instant::now();
    let cli = children.spawn("cache-tests CLI", &mut cli_cmd, &results_path, &cli_stderr);
    let status = children.wait(cli, timeout).unwrap_or_else(|| {
        panic!(
            "the cache-tests CLI did not finish within {timeout:?} (raise {TIMEOUT_ENV}?); \
             its stderr:\n{}",
            tail(&cli_stderr)
        )
    });
    let elapsed = started.elapsed();
    assert!(
        status.success(),
        "the cache-tests CLI failed ({status}); its stderr:\n{}",
        tail(&cli_stderr)
    );
    let crashed: Vec<String> = children.exited();
    let raw = fs::read_to_string(&results_path).expect("read target/conformance/results.json");
    let results = Results::from_json(&raw).unwrap_or_else(|e| {
        panic!(
            "{e}\nthe CLI printed no results object (see {}); its stderr:\n{}",
            results_path.display(),
            tail(&cli_stderr)
        )
    });
    drop(children);

    let score = cachetests::score(&defs, &results, Audience::CDN)
        .unwrap_or_else(|e| panic!("scoring {}: {e}", results_path.display()));
    let files = suite.gate_files(&conformance);
    let baseline_path = files.join("baseline.toml");
    let known_path = files.join("known-failures.toml");
    let baseline = Baseline::load(&baseline_path, target);
    let known = KnownFailures::load(&known_path);

    let mut summary = String::new();
    let _ = writeln!(summary, "== cache-tests conformance gate");
    let _ = writeln!(
        summary,
        "suite:   {}: {} tests apply to a shared cache / CDN ({} defined, {} results)",
        suite.label,
        score.applicable,
        defs.len(),
        results.len()
    );
    let _ = writeln!(summary, "target:  {target_line}");
    let _ = writeln!(summary, "base:    {base_url}");
    let _ = writeln!(summary, "run:     {:.1} s", elapsed.as_secs_f64());
    for name in &crashed {
        let _ = writeln!(
            summary,
            "WARNING: {name} exited during the run; the results are mostly connection errors"
        );
    }
    let _ = writeln!(summary);
    summary.push_str(&score.report(&results));
    let _ = writeln!(summary);
    let verdict = baseline.check(&score, target, &rel(&root, &baseline_path));
    summary.push_str(&verdict.text);
    if target == Target::Edge {
        summary.push_str(&known.check(&score, &rel(&root, &known_path)));
    } else {
        let _ = writeln!(
            summary,
            "known failures: not checked for target `direct` (there is no cache under test)"
        );
    }
    let summary_path = out.join("summary.txt");
    fs::write(&summary_path, &summary).expect("write target/conformance/summary.txt");
    println!("{summary}");
    println!(
        "raw results: {}\nsummary:     {}",
        results_path.display(),
        summary_path.display()
    );
    if write_results_requested() {
        assert!(
            target == Target::Edge,
            "{WRITE_RESULTS_ENV}=1 publishes Outpost's results; it needs target `edge`"
        );
        let written = write_published_results(&conformance, &suite, &raw);
        println!("published:   {written}");
    }

    assert!(
        verdict.ok,
        "cache-tests conformance fell below {} [{}]; see {}",
        rel(&root, &baseline_path),
        target.as_str(),
        summary_path.display()
    );
}

/// The system under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    /// `outpost edge` in front of the suite's server.
    Edge,
    /// No cache: the CLI talks to the suite's server itself. Checks the harness.
    Direct,
}

impl Target {
    fn from_env() -> Target {
        match std::env::var(TARGET_ENV) {
            Err(std::env::VarError::NotPresent) => Target::Edge,
            Ok(value) => match value.trim() {
                "" | "edge" => Target::Edge,
                "direct" => Target::Direct,
                other => panic!("{TARGET_ENV}={other:?}: expected `edge` or `direct`"),
            },
            Err(e) => panic!("{TARGET_ENV}: {e}"),
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Target::Edge => "edge",
            Target::Direct => "direct",
        }
    }
}

// ------------------------------------------------------------------------------ the suite

/// Where a suite keeps its server and CLI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// The cache-tests git repository since 2023: `test-engine/{server/server.mjs,cli.mjs}`.
    Git,
    /// The npm package `http-cache-tests` 0.4.x: `server/server.mjs`, `cli.mjs`.
    Package,
}

impl Layout {
    fn of(dir: &Path) -> Option<Layout> {
        if dir.join("test-engine/cli.mjs").is_file() {
            Some(Layout::Git)
        } else if dir.join("cli.mjs").is_file() && dir.join("server/server.mjs").is_file() {
            Some(Layout::Package)
        } else {
            None
        }
    }

    fn server(self) -> &'static str {
        match self {
            Layout::Git => "test-engine/server/server.mjs",
            Layout::Package => "server/server.mjs",
        }
    }

    fn cli(self) -> &'static str {
        match self {
            Layout::Git => "test-engine/cli.mjs",
            Layout::Package => "cli.mjs",
        }
    }
}

/// The suite the gate runs.
#[derive(Debug)]
struct Suite {
    /// Where it runs (a copy under target/ for a checkout, the package itself for npm).
    dir: PathBuf,
    layout: Layout,
    /// `current`: a checkout (`OUTPOST_CACHE_TESTS_DIR` or `../shared/cache-tests-suite`);
    /// `package`: the pinned npm package.
    source: SuiteSource,
    /// What the summary calls it.
    label: String,
    /// The suite's git commit (the `COMMIT` file or `git rev-parse`), or the package version.
    commit: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SuiteSource {
    Current,
    Package,
}

impl Suite {
    /// `$OUTPOST_CACHE_TESTS_DIR` when set (`pinned`: the npm package), else
    /// `../shared/cache-tests-suite` when present, else the pinned npm package. A checkout is copied to `target/cache-tests-suite/` and its
    /// runtime dependencies installed there (`npm ci --omit=dev`), since shared/ is read-only.
    fn locate(root: &Path) -> Suite {
        let checkout = match std::env::var_os(SUITE_DIR_ENV).filter(|v| !v.is_empty()) {
            Some(value) if value == PINNED => None,
            Some(dir) => {
                let dir = PathBuf::from(dir);
                assert!(
                    Layout::of(&dir).is_some(),
                    "{SUITE_DIR_ENV}={}: not a cache-tests checkout (no test-engine/cli.mjs, \
                     nor cli.mjs and server/server.mjs)",
                    dir.display()
                );
                Some(dir)
            }
            None => Some(root.join(SHARED_SUITE)).filter(|dir| Layout::of(dir).is_some()),
        };
        match checkout {
            Some(source) => Suite::from_checkout(root, &source),
            None => Suite::package(root),
        }
    }

    fn from_checkout(root: &Path, source: &Path) -> Suite {
        let source = source
            .canonicalize()
            .unwrap_or_else(|e| panic!("{}: {e}", source.display()));
        let layout = Layout::of(&source).expect("checked by locate");
        let commit = checkout_commit(&source);
        let dir = target_dir(root).join("cache-tests-suite");
        let stamp = format!(
            "{}\n{}\n",
            source.display(),
            commit.as_deref().unwrap_or("?")
        );
        let stamp_path = dir.join(".outpost-copied-from");
        let fresh = commit.is_some()
            && fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp)
            && checkout_commit(&dir) == commit;
        if fresh {
            eprintln!(
                "conformance: {} is already a copy of {} at {}",
                dir.display(),
                source.display(),
                commit.as_deref().unwrap_or("?")
            );
        } else {
            if dir.exists() {
                fs::remove_dir_all(&dir)
                    .unwrap_or_else(|e| panic!("remove {}: {e}", dir.display()));
            }
            copy_tree(&source, &dir);
            if let (false, Some(commit)) = (dir.join("COMMIT").exists(), &commit) {
                fs::write(dir.join("COMMIT"), format!("{commit}\n")).expect("write COMMIT");
            }
            fs::write(&stamp_path, &stamp).expect("write the copy stamp");
            eprintln!(
                "conformance: copied {} to {}",
                source.display(),
                dir.display()
            );
        }
        if !dir.join("node_modules").is_dir() {
            eprintln!("conformance: npm ci --omit=dev in {}", dir.display());
            let output = Command::new("npm")
                .args(["ci", "--omit=dev", "--no-audit", "--no-fund"])
                .current_dir(&dir)
                .stdin(Stdio::null())
                .output()
                .unwrap_or_else(|e| {
                    panic!("cannot run npm ({e}); run `bash conformance/setup.sh` to install it")
                });
            assert!(
                output.status.success(),
                "npm ci --omit=dev in {} failed ({}):\n{}\n{}",
                dir.display(),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let commit = commit.unwrap_or_else(|| "unknown".to_owned());
        Suite {
            label: format!(
                "cache-tests {} (from {})",
                &commit[..commit.len().min(7)],
                source.display()
            ),
            dir,
            layout,
            source: SuiteSource::Current,
            commit,
        }
    }

    fn package(root: &Path) -> Suite {
        let conformance = root.join("conformance");
        let dir = conformance.join("node_modules").join(SUITE_PACKAGE);
        assert!(
            dir.join("package.json").is_file(),
            "\n\nNo cache-tests suite: {SUITE_DIR_ENV} is not set, {SHARED_SUITE} is missing, \
             and {SUITE_PACKAGE} is not installed in {}.\n\
             Run `bash conformance/setup.sh` (installs node/npm if missing, then `npm ci`) \
             before `cargo test`.\n\n",
            conformance.join("node_modules").display()
        );
        let version = package_version(&dir);
        Suite {
            label: format!("{SUITE_PACKAGE} {version} (npm package, the fallback)"),
            layout: Layout::Package,
            dir,
            source: SuiteSource::Package,
            commit: format!("{SUITE_PACKAGE}@{version}"),
        }
    }

    /// The directory holding this suite's `baseline.toml` and `known-failures.toml`.
    fn gate_files(&self, conformance: &Path) -> PathBuf {
        match self.source {
            SuiteSource::Current => conformance.join("current"),
            SuiteSource::Package => conformance.to_path_buf(),
        }
    }
}

/// The commit of a suite checkout: its `COMMIT` file, else `git rev-parse HEAD`.
fn checkout_commit(dir: &Path) -> Option<String> {
    if let Ok(text) = fs::read_to_string(dir.join("COMMIT")) {
        let commit = text.trim();
        if !commit.is_empty() {
            return Some(commit.to_owned());
        }
    }
    if !dir.join(".git").exists() {
        return None;
    }
    let output = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let commit = String::from_utf8(output.stdout).ok()?.trim().to_owned();
    Some(commit).filter(|c| !c.is_empty())
}

/// Copies a suite checkout, leaving out `.git` and `node_modules`.
fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap_or_else(|e| panic!("create {}: {e}", to.display()));
    let entries = fs::read_dir(from).unwrap_or_else(|e| panic!("read {}: {e}", from.display()));
    for entry in entries {
        let entry = entry.expect("directory entry");
        let name = entry.file_name();
        if name == ".git" || name == "node_modules" {
            continue;
        }
        let (src, dst) = (entry.path(), to.join(&name));
        let kind = entry.file_type().expect("file type");
        if kind.is_dir() {
            copy_tree(&src, &dst);
        } else if kind.is_file() || src.is_file() {
            fs::copy(&src, &dst)
                .unwrap_or_else(|e| panic!("copy {} to {}: {e}", src.display(), dst.display()));
        }
    }
}

/// `path` relative to the repository root when it is inside it, for messages.
fn rel(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .display()
        .to_string()
}

fn write_results_requested() -> bool {
    std::env::var(WRITE_RESULTS_ENV).is_ok_and(|v| v.trim() == "1")
}

/// Writes `conformance/results/outpost.json` (the CLI's results object, the format of the
/// suite's own `results/*.json`) and `conformance/results/index.mjs` (the entry the suite's
/// `results/index.mjs` would list, plus the suite commit the results belong to).
fn write_published_results(conformance: &Path, suite: &Suite, raw: &str) -> String {
    let dir = conformance.join("results");
    fs::create_dir_all(&dir).expect("create conformance/results");
    let results: serde_json::Value =
        serde_json::from_str(raw.trim_start()).expect("the CLI's results are one JSON object");
    let mut json = serde_json::to_string_pretty(&results).expect("serialize results");
    json.push('\n');
    fs::write(dir.join("outpost.json"), json).expect("write conformance/results/outpost.json");
    let entry = serde_json::json!([{
        "file": "outpost.json",
        "name": "Outpost",
        "type": "rev-proxy",
        "version": outpost_version(),
        "suite_commit": suite.commit,
    }]);
    let index = format!(
        "// Outpost's entry for the cache-tests results index (results/index.mjs), written by\n\
         // {WRITE_RESULTS_ENV}=1 cargo test --test e2e conformance::cache_tests_conformance_gate.\n\
         // suite_commit is the cache-tests commit the results were produced with.\n\
         export default {}\n",
        serde_json::to_string_pretty(&entry).expect("serialize the index entry")
    );
    fs::write(dir.join("index.mjs"), index).expect("write conformance/results/index.mjs");
    format!(
        "{} and index.mjs (suite {})",
        dir.join("outpost.json").display(),
        suite.commit
    )
}

/// `outpost --version` of the binary under test: its version and the commit it was built from.
fn outpost_version() -> String {
    let output = Command::new(BIN)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .expect("run outpost --version");
    let text = String::from_utf8_lossy(&output.stdout);
    text.trim()
        .strip_prefix("outpost ")
        .unwrap_or("unknown")
        .to_owned()
}

fn workspace_root() -> PathBuf {
    repo()
}

/// `target/conformance`, under CARGO_TARGET_DIR when that is set.
fn out_dir(root: &Path) -> PathBuf {
    target_dir(root).join("conformance")
}

/// `target`, or CARGO_TARGET_DIR when that is set.
fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|dir| {
            if dir.is_absolute() {
                dir
            } else {
                root.join(dir)
            }
        })
        .unwrap_or_else(|| root.join("target"))
}

fn cli_timeout() -> Duration {
    match std::env::var(TIMEOUT_ENV) {
        Ok(secs) => Duration::from_secs(
            secs.trim()
                .parse()
                .unwrap_or_else(|_| panic!("{TIMEOUT_ENV}={secs:?}: expected seconds")),
        ),
        Err(_) => DEFAULT_CLI_TIMEOUT,
    }
}

fn package_version(package: &Path) -> String {
    let text = fs::read_to_string(package.join("package.json")).expect("read package.json");
    let json: serde_json::Value = serde_json::from_str(&text).expect("package.json is JSON");
    json["version"].as_str().unwrap_or("?").to_owned()
}

/// Runs node in `dir` and returns its stdout, or fails with its stderr.
fn node_stdout(dir: &Path, args: &[&str]) -> String {
    let output = Command::new("node")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run node ({e}); run `bash conformance/setup.sh` to install it")
        });
    assert!(
        output.status.success(),
        "node {} failed ({}):\n{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("node printed UTF-8")
}

/// The address in the suite server's "Listening on http://<host>:<port>/" line.
fn suite_listening(log: &str) -> Option<SocketAddr> {
    let line = log.lines().find(|l| l.starts_with("Listening on "))?;
    let host_port = line
        .strip_prefix("Listening on ")?
        .split("://")
        .nth(1)?
        .trim_end_matches('/');
    let port: u16 = host_port.rsplit(':').next()?.parse().ok()?;
    Some(SocketAddr::from(([127, 0, 0, 1], port)))
}

/// Waits until `found` reads what it needs from the child's log (where it listens); fails
/// early, with the log, if the process exits.
fn wait_for_log<T>(
    children: &mut Children,
    child: usize,
    log: &Path,
    found: impl Fn(&str) -> Option<T>,
) -> T {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        if let Some(t) = found(&fs::read_to_string(log).unwrap_or_default()) {
            return t;
        }
        let name = children.name(child).to_owned();
        if let Some(status) = children.try_wait(child) {
            panic!(
                "{name} exited ({status}) before saying where it listens; {}:\n{}",
                log.display(),
                tail(log)
            );
        }
        assert!(
            Instant::now() < deadline,
            "{name} did not say where it listens within {STARTUP_TIMEOUT:?}; {}:\n{}",
            log.display(),
            tail(log)
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// The last few kilobytes of a log file.
fn tail(path: &Path) -> String {
    const MAX: u64 = 8 * 1024;
    let Ok(mut file) = File::open(path) else {
        return format!("({} is missing)", path.display());
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(MAX)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes).into_owned();
    if text.trim().is_empty() {
        "(empty)".to_owned()
    } else {
        text
    }
}

/// The processes the gate started. Dropping the guard kills whichever are still running, on
/// every way out of the test, panics included.
#[derive(Default)]
struct Children {
    procs: Vec<(String, Child)>,
}

impl Children {
    /// Starts `cmd` with stdin closed and its output going to the given files.
    fn spawn(&mut self, name: &str, cmd: &mut Command, stdout: &Path, stderr: &Path) -> usize {
        let out =
            File::create(stdout).unwrap_or_else(|e| panic!("create {}: {e}", stdout.display()));
        let err = if stderr == stdout {
            out.try_clone().expect("clone a log file handle")
        } else {
            File::create(stderr).unwrap_or_else(|e| panic!("create {}: {e}", stderr.display()))
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| {
                let hint = if e.kind() == ErrorKind::NotFound {
                    "; run `bash conformance/setup.sh` to install node"
                } else {
                    ""
                };
                panic!("cannot start {name} ({:?}): {e}{hint}", cmd.get_program())
            });
        self.procs.push((name.to_owned(), child));
        self.procs.len() - 1
    }

    fn name(&self, child: usize) -> &str {
        &self.procs[child].0
    }

    fn try_wait(&mut self, child: usize) -> Option<ExitStatus> {
        self.procs[child].1.try_wait().ok().flatten()
    }

    /// Waits up to `timeout` for a child to exit; `None` if it is still running (it is left
    /// to the guard).
    fn wait(&mut self, child: usize, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait(child) {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Names of the processes that have exited (the servers should not have).
    fn exited(&mut self) -> Vec<String> {
        let mut names = Vec::new();
        for (name, child) in &mut self.procs {
            if matches!(child.try_wait(), Ok(Some(_))) && !name.ends_with("CLI") {
                names.push(name.clone());
            }
        }
        names
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for (_, child) in self.procs.iter_mut().rev() {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

// ------------------------------------------------------------------------------ gate files

/// `conformance/baseline.toml`: the least a target must score.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Baseline {
    required_passing: usize,
    optimal_passing: Option<usize>,
}

/// The outcome of comparing a run with its baseline.
struct BaselineVerdict {
    ok: bool,
    text: String,
}

impl Baseline {
    fn load(path: &Path, target: Target) -> Baseline {
        let text =
            fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        Baseline::parse(&text, target).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn parse(text: &str, target: Target) -> Result<Baseline, String> {
        let tables = parse_toml_subset(text)?;
        let table = tables
            .get(target.as_str())
            .ok_or_else(|| format!("no [{}] table", target.as_str()))?;
        let count = |key: &str| -> Result<Option<usize>, String> {
            match table.get(key) {
                None => Ok(None),
                Some(TomlValue::Integer(n)) => usize::try_from(*n).map(Some).map_err(|_| {
                    format!("[{}] {key} = {n}: must not be negative", target.as_str())
                }),
                Some(other) => Err(format!(
                    "[{}] {key} = {other:?}: expected an integer",
                    target.as_str()
                )),
            }
        };
        for key in table.keys() {
            if key != "required_passing" && key != "optimal_passing" {
                return Err(format!("[{}] unknown key {key}", target.as_str()));
            }
        }
        Ok(Baseline {
            required_passing: count("required_passing")?
                .ok_or_else(|| format!("[{}] has no required_passing", target.as_str()))?,
            optimal_passing: count("optimal_passing")?,
        })
    }

    fn check(&self, score: &Score, target: Target, file: &str) -> BaselineVerdict {
        let mut text = String::new();
        let mut ok = true;
        let rows = [
            (
                "required_passing",
                score.kind(Kind::Required).passed(),
                Some(self.required_passing),
            ),
            (
                "optimal_passing",
                score.kind(Kind::Optimal).passed(),
                self.optimal_passing,
            ),
        ];
        for (key, got, want) in rows {
            let Some(want) = want else { continue };
            let state = if got < want {
                ok = false;
                "BELOW BASELINE"
            } else if got > want {
                "ok; above the baseline, raise it"
            } else {
                "ok"
            };
            let _ = writeln!(
                text,
                "baseline {file} [{}] {key} = {want}: got {got}: {state}",
                target.as_str()
            );
        }
        BaselineVerdict { ok, text }
    }
}

/// `conformance/known-failures.toml`: required tests the edge is allowed to fail, with reasons.
#[derive(Debug, Default)]
struct KnownFailures {
    reasons: BTreeMap<String, String>,
}

impl KnownFailures {
    fn load(path: &Path) -> KnownFailures {
        let text =
            fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        KnownFailures::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn parse(text: &str) -> Result<KnownFailures, String> {
        let mut tables = parse_toml_subset(text)?;
        if let Some((name, _)) = tables
            .iter()
            .find(|(name, t)| *name != "edge" && !t.is_empty())
        {
            return Err(format!(
                "entries outside the [edge] table ({})",
                if name.is_empty() { "top level" } else { name }
            ));
        }
        let mut reasons = BTreeMap::new();
        for (id, value) in tables.remove("edge").unwrap_or_default() {
            match value {
                TomlValue::String(reason) if !reason.trim().is_empty() => {
                    reasons.insert(id, reason);
                }
                _ => return Err(format!("{id}: the value must be a non-empty reason string")),
            }
        }
        Ok(KnownFailures { reasons })
    }

    /// Warnings (never failures) for required tests that fail without being listed, and notes
    /// for listed tests that no longer fail or that the suite does not have.
    fn check(&self, score: &Score, file: &str) -> String {
        let mut text = String::new();
        let unlisted: Vec<_> = score
            .own_failures(Kind::Required)
            .filter(|t| !self.reasons.contains_key(&t.id))
            .collect();
        let _ = writeln!(
            text,
            "known failures: {} listed in {file}, {} failing required tests not listed",
            self.reasons.len(),
            unlisted.len()
        );
        for t in unlisted {
            let _ = writeln!(
                text,
                "WARNING: required test {} fails ({}) and is not in {file}",
                t.id,
                t.verdict.as_str()
            );
        }
        for id in self.reasons.keys() {
            match score.per_test.iter().find(|t| &t.id == id) {
                None => {
                    let _ = writeln!(text, "note: known failure {id} is not an applicable test");
                }
                Some(t) if t.verdict == Verdict::Pass => {
                    let _ = writeln!(
                        text,
                        "note: known failure {id} passes now; remove it from the list"
                    );
                }
                Some(_) => {}
            }
        }
        text
    }
}

/// A value of the TOML subset the gate files use.
#[derive(Debug, Clone, PartialEq, Eq)]
enum TomlValue {
    Integer(i64),
    String(String),
}

/// Tables by name (`""` for the top level), then keys.
type TomlTables = BTreeMap<String, BTreeMap<String, TomlValue>>;

/// Parses the part of TOML that `baseline.toml` and `known-failures.toml` need: comments,
/// `[table]` headers, and `key = value` lines whose key is bare or a "basic string" and whose
/// value is an integer or a "basic string". Anything else is an error that names the line,
/// rather than being misread. (The root package has no TOML parser among its dev-dependencies.)
fn parse_toml_subset(text: &str) -> Result<TomlTables, String> {
    let mut tables = TomlTables::new();
    tables.insert(String::new(), BTreeMap::new());
    let mut current = String::new();
    for (n, raw) in text.lines().enumerate() {
        let at = |msg: &str| format!("line {}: {msg}: {raw}", n + 1);
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix('[') {
            if rest.starts_with('[') {
                return Err(at("arrays of tables are not supported"));
            }
            let (name, after) = rest.split_once(']').ok_or_else(|| at("unclosed ["))?;
            let name = name.trim();
            if name.is_empty() || !name.chars().all(is_bare_key_char) {
                return Err(at("table names must be bare keys"));
            }
            if !is_end_of_line(after) {
                return Err(at("unexpected text after the table header"));
            }
            if tables.insert(name.to_owned(), BTreeMap::new()).is_some() {
                return Err(at("table defined twice"));
            }
            current = name.to_owned();
            continue;
        }
        let (key, rest) = if line.starts_with('"') {
            parse_basic_string(line).map_err(|e| at(&e))?
        } else {
            let end = line
                .find(|c: char| !is_bare_key_char(c))
                .unwrap_or(line.len());
            (line[..end].to_owned(), &line[end..])
        };
        if key.is_empty() {
            return Err(at("expected a key"));
        }
        let rest = rest
            .trim_start()
            .strip_prefix('=')
            .ok_or_else(|| at("expected `key = value` (dotted keys are not supported)"))?
            .trim_start();
        let (value, rest) = if rest.starts_with('"') {
            let (s, rest) = parse_basic_string(rest).map_err(|e| at(&e))?;
            (TomlValue::String(s), rest)
        } else {
            let end = rest
                .find(|c: char| c.is_whitespace() || c == '#')
                .unwrap_or(rest.len());
            let digits = rest[..end].replace('_', "");
            let n = digits
                .parse::<i64>()
                .map_err(|_| at("values must be integers or \"strings\""))?;
            (TomlValue::Integer(n), &rest[end..])
        };
        if !is_end_of_line(rest) {
            return Err(at("unexpected text after the value"));
        }
        let table = tables.get_mut(&current).expect("current table exists");
        if table.insert(key, value).is_some() {
            return Err(at("key defined twice"));
        }
    }
    Ok(tables)
}

fn is_bare_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

fn is_end_of_line(rest: &str) -> bool {
    let rest = rest.trim();
    rest.is_empty() || rest.starts_with('#')
}

/// Parses a TOML basic string at the start of `s` (which starts with `"`); returns it and the
/// text after the closing quote.
fn parse_basic_string(s: &str) -> Result<(String, &str), String> {
    let mut out = String::new();
    let mut chars = s.char_indices().skip(1);
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((out, &s[i + 1..])),
            '\\' => {
                let (_, esc) = chars.next().ok_or("unterminated string")?;
                let simple = match esc {
                    'b' => Some('\u{8}'),
                    't' => Some('\t'),
                    'n' => Some('\n'),
                    'f' => Some('\u{c}'),
                    'r' => Some('\r'),
                    '"' => Some('"'),
                    '\\' => Some('\\'),
                    _ => None,
                };
                if let Some(ch) = simple {
                    out.push(ch);
                    continue;
                }
                let len = match esc {
                    'u' => 4,
                    'U' => 8,
                    other => return Err(format!("unknown escape \\{other}")),
                };
                let hex: String = (0..len)
                    .filter_map(|_| chars.next().map(|(_, h)| h))
                    .collect();
                let ch = u32::from_str_radix(&hex, 16)
                    .ok()
                    .filter(|_| hex.len() == len)
                    .and_then(char::from_u32)
                    .ok_or_else(|| format!("bad escape \\{esc}{hex}"))?;
                out.push(ch);
            }
            c if c.is_control() && c != '\t' => return Err("control character in string".into()),
            c => out.push(c),
        }
    }
    Err("unterminated string".to_owned())
}

#[test]
fn committed_gate_files_parse() {
    let conformance = workspace_root().join("conformance");
    for files in [conformance.clone(), conformance.join("current")] {
        for target in [Target::Direct, Target::Edge] {
            Baseline::load(&files.join("baseline.toml"), target);
        }
        KnownFailures::load(&files.join("known-failures.toml"));
    }
}

#[test]
fn toml_subset_reads_the_gate_formats() {
    let tables = parse_toml_subset(
        "# header\n\n[direct]\nrequired_passing = 49 # measured\n[edge]\nrequired_passing = 1_2\n\
         \"stale-close-s-maxage=2\" = \"no \\\"stale\\\" \\u00e9\"\n",
    )
    .unwrap();
    assert_eq!(tables["direct"]["required_passing"], TomlValue::Integer(49));
    assert_eq!(tables["edge"]["required_passing"], TomlValue::Integer(12));
    assert_eq!(
        tables["edge"]["stale-close-s-maxage=2"],
        TomlValue::String("no \"stale\" \u{e9}".to_owned())
    );
    for bad in [
        "[[edge]]\n",
        "[edge]\na.b = 1\n",
        "a = [1]\n",
        "a = \"x\n",
        "a = 1\na = 2\n",
        "[a]\n[a]\n",
        "a = 1 2\n",
        "a = true\n",
    ] {
        assert!(parse_toml_subset(bad).is_err(), "accepted {bad:?}");
    }
}

#[test]
fn baseline_and_known_failures_parse() {
    let text =
        "[direct]\nrequired_passing = 49\n[edge]\nrequired_passing = 0\noptimal_passing = 3\n";
    assert_eq!(
        Baseline::parse(text, Target::Direct).unwrap(),
        Baseline {
            required_passing: 49,
            optimal_passing: None
        }
    );
    assert_eq!(
        Baseline::parse(text, Target::Edge).unwrap(),
        Baseline {
            required_passing: 0,
            optimal_passing: Some(3)
        }
    );
    assert!(Baseline::parse("[edge]\nrequired_passing = -1\n", Target::Edge).is_err());
    assert!(Baseline::parse("[edge]\nrequired = 1\n", Target::Edge).is_err());
    assert!(Baseline::parse("[direct]\nrequired_passing = 1\n", Target::Edge).is_err());

    let known = KnownFailures::parse("# none yet\n[edge]\n\"a=b\" = \"why\"\n").unwrap();
    assert_eq!(known.reasons["a=b"], "why");
    assert!(KnownFailures::parse("[edge]\nx = \"\"\n").is_err());
    assert!(KnownFailures::parse("x = \"top level\"\n").is_err());
    assert!(KnownFailures::parse("[edge]\n").unwrap().reasons.is_empty());
}

// ------------------------------------------------------------------------------ the scorer

/// Definitions for the synthetic scorer tests: one suite, tests given as JSON objects.
fn synthetic_defs(tests: &str) -> Definitions {
    Definitions::from_json(&format!(
        r#"[{{"id": "s", "name": "S", "tests": [{tests}]}}]"#
    ))
    .unwrap()
}

fn verdict_of(score: &Score, id: &str) -> Verdict {
    score
        .per_test
        .iter()
        .find(|t| t.id == id)
        .unwrap_or_else(|| panic!("{id} not scored"))
        .verdict
}

#[test]
fn scorer_classifies_own_results() {
    let defs = synthetic_defs(
        r#"{"id": "req-pass"}, {"id": "req-fail"}, {"id": "req-setup"}, {"id": "req-retry"},
           {"id": "req-abort"}, {"id": "req-false"}, {"id": "req-missing"}, {"id": "req-null"},
           {"id": "opt-pass", "kind": "optimal"}, {"id": "opt-fail", "kind": "optimal"},
           {"id": "chk-yes", "kind": "check"}, {"id": "chk-no", "kind": "check"},
           {"id": "chk-setup", "kind": "check"}"#,
    );
    let results = Results::from_json(
        r#"{"req-pass": true, "req-fail": ["Assertion", "Response 2 comes from cache"],
            "req-setup": ["Setup", "PUT config resulted in 502"], "req-retry": ["Setup", "retry"],
            "req-abort": ["AbortError", "aborted"], "req-false": false, "req-null": null,
            "opt-pass": true, "opt-fail": ["FetchError", "socket hang up"],
            "chk-yes": true, "chk-no": ["Assertion", "no"], "chk-setup": ["Setup", "x"],
            "not-defined": true}"#,
    )
    .unwrap();
    let score = cachetests::score(&defs, &results, Audience::CDN).unwrap();
    let expected = [
        ("req-pass", Verdict::Pass),
        ("req-fail", Verdict::Fail),
        ("req-setup", Verdict::SetupFail),
        ("req-retry", Verdict::Retry),
        ("req-abort", Verdict::HarnessFail),
        ("req-false", Verdict::HarnessFail),
        ("req-missing", Verdict::Untested),
        ("req-null", Verdict::Untested),
        ("opt-pass", Verdict::Pass),
        ("opt-fail", Verdict::OptFail),
        ("chk-yes", Verdict::Yes),
        ("chk-no", Verdict::No),
        ("chk-setup", Verdict::SetupFail),
    ];
    for (id, verdict) in expected {
        assert_eq!(verdict_of(&score, id), verdict, "{id}");
    }
    assert_eq!(score.applicable, 13);
    assert_eq!(score.raw_passed, 3);
    assert_eq!(score.kind(Kind::Required).passed(), 1);
    assert_eq!(score.kind(Kind::Required).total, 8);
    assert_eq!(score.kind(Kind::Optimal).passed(), 1);
    assert_eq!(score.kind(Kind::Check).passed(), 1);
    assert_eq!(score.setup_failures(), 3);
    assert_eq!(score.harness_failures(), 4);
    assert_eq!(score.unknown_ids, ["not-defined"]);
    let failing: Vec<_> = score
        .own_failures(Kind::Required)
        .map(|t| t.id.as_str())
        .collect();
    assert_eq!(
        failing,
        [
            "req-fail",
            "req-setup",
            "req-retry",
            "req-abort",
            "req-false",
            "req-missing",
            "req-null"
        ]
    );
    let report = score.report(&results);
    assert!(
        report.contains("required (conformance): passed 1 of 8"),
        "{report}"
    );
    assert!(
        report.contains("Assertion: Response 2 comes from cache"),
        "{report}"
    );
}

#[test]
fn scorer_honours_dependencies() {
    let defs = synthetic_defs(
        r#"{"id": "base", "kind": "check"},
           {"id": "needs-base", "depends_on": ["base"]},
           {"id": "needs-needs-base", "kind": "optimal", "depends_on": ["needs-base"]},
           {"id": "good", "kind": "optimal"},
           {"id": "needs-good", "depends_on": ["good"]},
           {"id": "needs-untested", "depends_on": ["untested"]},
           {"id": "untested"},
           {"id": "cycle-a", "depends_on": ["cycle-b"]},
           {"id": "cycle-b", "depends_on": ["cycle-a"]},
           {"id": "self", "depends_on": ["self"]}"#,
    );
    let results = Results::from_json(
        r#"{"base": ["Assertion", "no"], "needs-base": true, "needs-needs-base": true,
            "good": true, "needs-good": true, "needs-untested": true,
            "cycle-a": true, "cycle-b": true, "self": true}"#,
    )
    .unwrap();
    let score = cachetests::score(&defs, &results, Audience::CDN).unwrap();
    assert_eq!(verdict_of(&score, "base"), Verdict::No);
    assert_eq!(verdict_of(&score, "needs-base"), Verdict::DepFail);
    assert_eq!(verdict_of(&score, "needs-needs-base"), Verdict::DepFail);
    assert_eq!(verdict_of(&score, "needs-good"), Verdict::Pass);
    assert_eq!(verdict_of(&score, "needs-untested"), Verdict::DepFail);
    assert_eq!(verdict_of(&score, "cycle-a"), Verdict::Pass);
    assert_eq!(verdict_of(&score, "cycle-b"), Verdict::Pass);
    assert_eq!(verdict_of(&score, "self"), Verdict::Pass);
    // A dependency failure is neither a pass nor the test's own failure, but its raw result
    // still counts in the suite's own tally.
    assert_eq!(score.raw_passed, 8);
    assert_eq!(score.kind(Kind::Required).passed(), 4);
    assert_eq!(score.dependency_failures(), 3);
    let dep: Vec<_> = score
        .dependency_failed(Kind::Required)
        .map(|t| (t.id.as_str(), t.failed_dependency.as_deref()))
        .collect();
    assert_eq!(
        dep,
        [
            ("needs-base", Some("base")),
            ("needs-untested", Some("untested"))
        ]
    );
    assert!(
        score
            .own_failures(Kind::Required)
            .all(|t| t.id == "untested")
    );
}

#[test]
fn scorer_selects_tests_for_the_audience() {
    let defs = synthetic_defs(
        r#"{"id": "all"}, {"id": "browser", "browser_only": true},
           {"id": "cdn", "cdn_only": true}, {"id": "shared", "browser_skip": true}"#,
    );
    let results = Results::from_json("{}").unwrap();
    let ids = |audience| -> Vec<String> {
        cachetests::score(&defs, &results, audience)
            .unwrap()
            .per_test
            .into_iter()
            .map(|t| t.id)
            .collect()
    };
    assert_eq!(ids(Audience::CDN), ["all", "cdn", "shared"]);
    assert_eq!(
        ids(Audience::SharedCache {
            include_cdn_only: false
        }),
        ["all", "shared"]
    );
    assert_eq!(ids(Audience::Browser), ["all", "browser"]);
}

#[test]
fn scorer_rejects_bad_definitions_and_reads_npm_banners() {
    assert!(
        Definitions::from_json(r#"[{"id": "s", "tests": [{"id": "a", "kind": "x"}]}]"#).is_err()
    );
    assert!(
        Definitions::from_json(r#"[{"id": "s", "tests": [{"id": "a"}, {"id": "a"}]}]"#).is_err()
    );
    assert!(Definitions::from_json(r#"{"id": "s"}"#).is_err());
    let defs = synthetic_defs(r#"{"id": "a", "depends_on": ["nope"]}"#);
    let results = Results::from_json(r#"{"a": true}"#).unwrap();
    assert!(cachetests::score(&defs, &results, Audience::CDN).is_err());

    let banner = "\n> http-cache-tests@0.4.5 cli\n> node --no-warnings cli.mjs\n\n{\"a\": true}\n";
    let results = Results::from_json(banner).unwrap();
    assert_eq!(results.get("a"), Some(&serde_json::Value::Bool(true)));
    let defs = Definitions::from_json("> export\n[{\"id\": \"s\", \"tests\": []}]").unwrap();
    assert!(defs.is_empty());
}

// --------------------------------------------------- cross-checks with the reference tool

/// Test definitions the published result files were produced with.
const SHARED_DEFINITIONS: &str = "tests-b55b8bd.json";

/// `shared/cache-tests` beside the checkout, or `None` (after saying so loudly).
fn shared_cache_tests() -> Option<PathBuf> {
    let dir = workspace_root().join("../shared/cache-tests");
    if dir.join(SHARED_DEFINITIONS).is_file() {
        return Some(dir);
    }
    eprintln!(
        "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
         !!! SKIPPED: {} not found; the scorer is not cross-checked against\n\
         !!! shared/tools/cachetests_score.py (needs shared/ beside the checkout).\n\
         !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n",
        dir.join(SHARED_DEFINITIONS).display()
    );
    None
}

fn shared_result_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .expect("read shared/cache-tests")
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("local-") && n.ends_with(".json"))
        })
        .collect();
    files.sort();
    files
}

fn load_shared(dir: &Path, file: &str) -> (Definitions, Results) {
    let defs =
        Definitions::from_json(&fs::read_to_string(dir.join(SHARED_DEFINITIONS)).unwrap()).unwrap();
    let results = Results::from_json(&fs::read_to_string(dir.join(file)).unwrap()).unwrap();
    (defs, results)
}

/// The columns of the reference tool's `--table`, from `passed` on.
fn table_row(score: &Score) -> [String; 9] {
    let req = score.kind(Kind::Required);
    let opt = score.kind(Kind::Optimal);
    let chk = score.kind(Kind::Check);
    [
        format!("{}/{}", score.raw_passed, score.applicable),
        format!("{}/{}", req.count(Verdict::Pass), req.total),
        req.count(Verdict::Fail).to_string(),
        format!("{}/{}", opt.count(Verdict::Pass), opt.total),
        opt.count(Verdict::OptFail).to_string(),
        format!("{}/{}", chk.count(Verdict::Yes), chk.total),
        score.setup_failures().to_string(),
        score.dependency_failures().to_string(),
        score.harness_failures().to_string(),
    ]
}

/// Output of `python3 shared/tools/cachetests_score.py --tests
/// shared/cache-tests/tests-b55b8bd.json --table shared/cache-tests/local-*.json`.
#[test]
fn scorer_matches_reference_table() {
    let Some(dir) = shared_cache_tests() else {
        return;
    };
    const REFERENCE: &str = "\
name                          version  type   passed   req_pass  req_fail  opt_pass  opt_fail  check_yes  setup  dep  other
local-haproxy-2.6.12                   local  202/365  89/160    15        39/105    51        33/100     7      94   0
local-httpd-2.4.71                     local  257/365  131/160   12        68/105    27        44/100     12     33   0
local-nginx-1.22.1                     local  202/365  100/160   33        58/105    34        18/100     4      64   0
local-no-cache-direct-origin           local  121/365  22/160    6         0/105     25        5/100      3      282  0
local-squid-5.7                        local  262/365  121/160   18        58/105    40        64/100     6      34   0
local-varnish-7.1.1                    local  218/365  119/160   16        45/105    44        27/100     14     54   0
";
    for line in REFERENCE.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let (name, expected) = (cols[0], &cols[2..]);
        let (defs, results) = load_shared(&dir, &format!("{name}.json"));
        let score = cachetests::score(&defs, &results, Audience::CDN).unwrap();
        assert_eq!(table_row(&score), expected, "{name}");
    }
}

/// Runs the reference tool itself (when python3 is there) on every published result file and
/// compares every count and every test's verdict.
#[test]
fn scorer_matches_reference_tool() {
    let Some(dir) = shared_cache_tests() else {
        return;
    };
    let files = shared_result_files(&dir);
    assert!(!files.is_empty(), "no local-*.json in {}", dir.display());
    let defs =
        Definitions::from_json(&fs::read_to_string(dir.join(SHARED_DEFINITIONS)).unwrap()).unwrap();
    let definitions = [
        OsString::from("--tests"),
        dir.join(SHARED_DEFINITIONS).into(),
    ];
    compare_with_reference_tool(&definitions, &defs, &files);
}

/// The same on the current suite (`../shared/cache-tests-suite`): its published `results/*.json`
/// and Outpost's `conformance/results/outpost.json`, the definitions read the gate's way
/// (`conformance/export-tests.mjs`) and the tool's way (`--suite DIR`).
#[test]
fn scorer_matches_reference_tool_on_current_suite() {
    let suite = workspace_root().join(SHARED_SUITE);
    if Layout::of(&suite).is_none() {
        eprintln!(
            "\n!!! SKIPPED: {} not found; the scorer is not cross-checked on the current suite\n",
            suite.display()
        );
        return;
    }
    let suite = suite.canonicalize().unwrap();
    let json = node_stdout(
        &workspace_root().join("conformance"),
        &["--no-warnings", "export-tests.mjs", suite.to_str().unwrap()],
    );
    let defs = Definitions::from_json(&json).unwrap();
    let mut files: Vec<PathBuf> = fs::read_dir(suite.join("results"))
        .expect("read the suite's results/")
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no results/*.json in {}",
        suite.display()
    );
    let ours = workspace_root().join("conformance/results/outpost.json");
    if ours.is_file() {
        files.push(ours);
    }
    let definitions = [OsString::from("--suite"), suite.into()];
    compare_with_reference_tool(&definitions, &defs, &files);
}

/// Runs `shared/tools/cachetests_score.py DEFINITIONS --json FILES` (skips when python3 is
/// missing) and compares every count and verdict with the Rust scorer's on `defs`.
fn compare_with_reference_tool(definitions: &[OsString], defs: &Definitions, files: &[PathBuf]) {
    let tool = workspace_root().join("../shared/tools/cachetests_score.py");
    let output = match Command::new("python3")
        .arg(&tool)
        .args(definitions)
        .arg("--json")
        .args(files)
        .output()
    {
        Ok(output) => output,
        Err(e) => {
            eprintln!(
                "\n!!! SKIPPED: cannot run python3 {} ({e})\n",
                tool.display()
            );
            return;
        }
    };
    assert!(
        output.status.success(),
        "{}: {}",
        tool.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let reference: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let reference = reference.as_array().unwrap();
    assert_eq!(reference.len(), files.len());
    for (file, want) in files.iter().zip(reference) {
        let name = file.display().to_string();
        let results = Results::from_json(&fs::read_to_string(file).unwrap()).unwrap();
        let score = cachetests::score(defs, &results, Audience::CDN).unwrap();
        assert_eq!(want["passed"], score.raw_passed, "{name}: passed");
        assert_eq!(want["applicable"], score.applicable, "{name}: applicable");
        for kind in Kind::ALL {
            let counts = score.kind(kind);
            let mut got = serde_json::Map::new();
            got.insert("total".into(), counts.total.into());
            got.insert("raw_true".into(), counts.raw_true.into());
            for (verdict, n) in counts.verdicts() {
                got.insert(verdict.as_str().into(), n.into());
            }
            let want_counts = want["per_kind"][kind.as_str()].as_object().unwrap();
            // The reference omits a zero raw_true.
            got.retain(|k, v| want_counts.contains_key(k) || v != 0);
            assert_eq!(&got, want_counts, "{name}: {}", kind.as_str());
        }
        let want_tests = want["per_test"].as_object().unwrap();
        assert_eq!(want_tests.len(), score.per_test.len(), "{name}: per_test");
        for t in &score.per_test {
            assert_eq!(
                want_tests[&t.id].as_str().and_then(Verdict::parse),
                Some(t.verdict),
                "{name}: {}",
                t.id
            );
        }
        let want_unknown: Vec<&str> = want["unknown_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(want_unknown, score.unknown_ids, "{name}: unknown ids");
    }
}
