//! A real `nats-server -js` on loopback for the fleet tests, with its store in a temp dir.
//! `scripts/test.sh` installs Debian's nats-server when it is missing; without it the fleet
//! tests skip, loudly.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::ports::free_demo_base;

pub struct Nats {
    child: Option<Child>,
    pub port: u16,
    /// The JetStream store, removed with the server.
    store: tempfile::TempDir,
}

/// The nats-server binary, if installed.
pub fn binary() -> Option<PathBuf> {
    outpost_fleet::nats_server_binary()
}

impl Nats {
    /// Starts a JetStream server on a free port, storing in a temp dir. `None` (after saying
    /// so) when nats-server is not installed.
    pub async fn start() -> Option<Nats> {
        let Some(_) = binary() else {
            eprintln!(
                "SKIPPED: nats-server is not installed (scripts/test.sh installs it as root)"
            );
            return None;
        };
        let mut nats = Nats {
            child: None,
            port: free_demo_base(&[0]),
            store: tempfile::tempdir().expect("a temp dir for the JetStream store"),
        };
        nats.restart().await;
        Some(nats)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server again (same port, same store) after [`Nats::stop`].
    pub async fn restart(&mut self) {
        let child = Command::new(binary().expect("nats-server"))
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        self.child = Some(child);
        super::eventually("nats-server accepts connections", async || {
            tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
        })
        .await;
    }

    /// Kills the server (its store stays).
    pub async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
