//! The real `outpost` binary (`CARGO_BIN_EXE_outpost`): a node as a child process, and the
//! CLI.
//!
//! A node is started on `127.0.0.1:0` (data and admin) and the harness reads the addresses it
//! bound from its "edge listening" log line (text or JSON logs), so no port is probed first.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};

use super::{Listening, WAIT, client, poll};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_outpost");

/// The default log filter of the binary; set explicitly so that the "edge listening" line is
/// written whatever `RUST_LOG` the tests run with.
const DEFAULT_LOG: &str = "info,hyper=warn,h2=warn";

/// A running `outpost` node (its addresses through [`Listening`]) with its stdout and stderr
/// in a log file; dropping it kills the process.
pub struct NodeProc {
    child: Child,
    listening: Listening,
    log: PathBuf,
}

/// A node to start: `outpost <args>` with this environment.
pub struct Spawn<'a> {
    args: Vec<String>,
    env: Vec<(&'a str, &'a str)>,
    env_remove: Vec<&'a str>,
}

impl<'a> Spawn<'a> {
    pub fn new<S: AsRef<str>>(args: impl IntoIterator<Item = S>) -> Spawn<'a> {
        Spawn {
            args: args.into_iter().map(|a| a.as_ref().to_string()).collect(),
            env: Vec::new(),
            env_remove: Vec::new(),
        }
    }

    /// `outpost edge --origin <origin> --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0`, plus
    /// `extra` arguments.
    pub fn edge(origin: &str, extra: &[&str]) -> Spawn<'a> {
        let mut args = vec![
            "edge",
            "--origin",
            origin,
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(extra);
        Spawn::new(args)
    }

    pub fn env(mut self, key: &'a str, value: &'a str) -> Spawn<'a> {
        self.env.push((key, value));
        self
    }

    pub fn env_remove(mut self, key: &'a str) -> Spawn<'a> {
        self.env_remove.push(key);
        self
    }

    /// Starts the node with its output in `log`, and waits (bounded) until it has logged its
    /// addresses and answers on them: the data port accepts and the admin port, if any, says
    /// `/healthz` 200.
    pub async fn start(self, log: &Path) -> NodeProc {
        let out = std::fs::File::create(log).expect("create the node's log");
        let mut cmd = Command::new(BIN);
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log handle"))
            .stderr(out);
        if !self.env.iter().any(|(k, _)| *k == "RUST_LOG") {
            cmd.env("RUST_LOG", DEFAULT_LOG);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        for k in &self.env_remove {
            cmd.env_remove(k);
        }
        let child = cmd.spawn().expect("spawn outpost");
        let mut p = NodeProc {
            child,
            listening: Listening {
                addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                admin: None,
            },
            log: log.to_path_buf(),
        };
        let (addr, admin) = poll(
            WAIT,
            async || {
                p.assert_running("while starting");
                listening(&p.log_text())
            },
            || format!("outpost did not log \"edge listening\":\n{}", read_log(log)),
        )
        .await;
        p.listening = Listening { addr, admin };
        let c = client();
        poll(
            WAIT,
            async || {
                p.assert_running("while starting");
                let admin_up = match admin {
                    Some(admin) => c
                        .get(format!("http://{admin}/healthz"))
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success()),
                    None => true,
                };
                (admin_up && tokio::net::TcpStream::connect(addr).await.is_ok()).then_some(())
            },
            || format!("outpost did not come up:\n{}", read_log(log)),
        )
        .await;
        p
    }
}

impl NodeProc {
    pub fn pid(&self) -> String {
        self.child.id().to_string()
    }

    pub fn log_text(&self) -> String {
        read_log(&self.log)
    }

    /// Every JSON log line written so far (with `--log-format json`).
    pub fn events(&self) -> Vec<serde_json::Value> {
        self.log_text()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// How many JSON log lines carry this message.
    pub fn count(&self, message: &str) -> usize {
        self.events()
            .iter()
            .filter(|e| e["fields"]["message"] == message)
            .count()
    }

    /// Panics, with the log, if the process has exited.
    pub fn assert_running(&mut self, when: &str) {
        if let Some(status) = self.child.try_wait().expect("try_wait") {
            panic!("outpost exited {when} ({status}):\n{}", self.log_text());
        }
    }

    /// Waits (bounded) until a JSON log line with this message appears `n` times.
    pub async fn wait_for_message(&mut self, message: &str, n: usize) {
        let when = format!("while waiting for {message:?}");
        let log = self.log.clone();
        poll(
            WAIT,
            async || {
                self.assert_running(&when);
                (self.count(message) >= n).then_some(())
            },
            || {
                format!(
                    "no {message:?} log line (#{n}) within {WAIT:?}:\n{}",
                    read_log(&log)
                )
            },
        )
        .await;
    }

    /// The body of a GET of `path` on the admin port.
    pub async fn admin_text(&self, path: &str) -> String {
        client()
            .get(self.admin_url(path))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
            .text()
            .await
            .unwrap_or_else(|e| panic!("{path} body: {e}"))
    }

    /// Objects counted as stored on disk (`disk_admissions.stored` of the admin port's
    /// `/stats`): durable, so a restart after a `kill -9` finds them (objects the disk tier
    /// merely shows may still be undone by one).
    pub async fn disk_stored(&self) -> u64 {
        let stats: serde_json::Value =
            serde_json::from_str(&self.admin_text("/stats").await).expect("/stats JSON");
        stats["disk_admissions"]["stored"].as_u64().unwrap_or(0)
    }

    /// Waits (bounded) until at least `n` objects are counted as stored on disk.
    pub async fn wait_disk_stored(&self, n: u64) {
        poll(
            WAIT,
            async || (self.disk_stored().await >= n).then_some(()),
            || {
                format!(
                    "never {n} object(s) counted as stored on disk; log:\n{}",
                    self.log_text()
                )
            },
        )
        .await;
    }

    /// Sends a signal with the `kill` command.
    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .args([format!("-{sig}"), self.pid()])
            .status()
            .expect("run kill");
        assert!(st.success(), "kill -{sig} {}", self.pid());
    }

    /// Waits (bounded) for the process to exit.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        let log = self.log.clone();
        poll(
            WAIT,
            async || self.child.try_wait().expect("try_wait"),
            || format!("outpost did not exit; log:\n{}", read_log(&log)),
        )
        .await
    }

    /// SIGTERM, then waits (bounded) for the exit.
    pub async fn terminate(mut self) -> ExitStatus {
        self.signal("TERM");
        self.wait_exit().await
    }

    /// SIGKILL, and reaps the process.
    pub fn kill9(mut self) {
        self.child.kill().expect("kill -9 the node");
        self.child.wait().expect("reap the node");
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The data and admin addresses of an "edge listening" line in a node's log, text or JSON.
pub fn listening(log: &str) -> Option<(SocketAddr, Option<SocketAddr>)> {
    let line = strip_ansi(log.lines().find(|l| l.contains("edge listening"))?);
    let value = |key: &str| -> Option<String> {
        let at = line
            .find(&format!("\"{key}\":\""))
            .map(|i| i + key.len() + 4)
            .or_else(|| line.find(&format!(" {key}=")).map(|i| i + key.len() + 2))?;
        let rest = &line[at..];
        let end = rest.find(['"', ' ']).unwrap_or(rest.len());
        Some(rest[..end].to_string())
    };
    let addr = value("listen")?.parse().ok()?;
    let admin = value("admin")?;
    let admin = match admin
        .strip_prefix("Some(")
        .and_then(|a| a.strip_suffix(')'))
    {
        Some(a) => Some(a.parse().ok()?),
        None => None,
    };
    Some((addr, admin))
}

/// `text` without ANSI colour sequences (the text log colours field names).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Runs `outpost <args>` to the end, stdin closed, in the test's environment.
pub fn outpost(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run outpost")
}

/// Runs the CLI `outpost <args>` without `OUTPOST_ADMIN_TOKEN` (bounded by twice [`WAIT`]);
/// async, so that nodes in this process keep serving meanwhile.
pub async fn cli(args: &[&str]) -> Output {
    cli_with_env(args, &[]).await
}

/// [`cli`] with these variables set.
pub async fn cli_with_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(args)
        .env_remove("OUTPOST_ADMIN_TOKEN")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    tokio::time::timeout(WAIT * 2, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("outpost {args:?} did not finish"))
        .expect("run outpost")
}

impl std::ops::Deref for NodeProc {
    type Target = Listening;
    fn deref(&self) -> &Listening {
        &self.listening
    }
}
