//! The one place that probes for free ports (for `outpost demo`), and addresses that refuse.
//!
//! `outpost demo --base-port P` lays its nodes out on fixed offsets from P (selector P, origin
//! P+1, shield P+2, edges P+3..., admin ports +1000, HTTPS ports +2000) and binds them itself,
//! so a test has to choose P before the demo starts: it binds every port of the layout, drops
//! the listeners and hands P over. Another process can take one of those ports in between (the
//! demo then fails to start). What would remove this: `outpost demo --base-port 0` binding
//! 127.0.0.1:0 for each node and printing the addresses it got in its table (the tests read
//! the table already), as every other role does with `listen = "127.0.0.1:0"`.
//!
//! Within this process, ranges handed out are never handed out again, so two demo tests
//! running at the same time never pick overlapping layouts.

use std::net::TcpListener;
use std::sync::Mutex;

/// A base port P such that P + o was free just now for every offset `o`. Bases are taken
/// below 32768, where Linux hands out no ephemeral ports (`ip_local_port_range` starts there),
/// so another test's `127.0.0.1:0` listener never lands in the range. It is still a probe, not
/// a held port: callers retry on a bind failure (see `tests/e2e/demo.rs`).
pub fn free_demo_base(offsets: &[u16]) -> u16 {
    assert!(
        offsets.iter().all(|o| *o <= 2700),
        "offsets stay below 32768"
    );
    static TAKEN: Mutex<Vec<(u16, u16)>> = Mutex::new(Vec::new());
    let span = offsets.iter().copied().max().unwrap_or(0);
    let mut taken = TAKEN.lock().unwrap_or_else(|e| e.into_inner());
    for attempt in 0..200u32 {
        let base = 20000 + ((std::process::id() * 7919 + attempt * 104729) % 10000) as u16;
        let end = base + span;
        if taken.iter().any(|&(b, e)| base <= e && b <= end) {
            continue;
        }
        if offsets
            .iter()
            .all(|o| TcpListener::bind(("127.0.0.1", base + o)).is_ok())
        {
            taken.push((base, end));
            return base;
        }
    }
    panic!("no free port range for the demo");
}

/// An address where nothing listens, held for as long as the guard lives: the port is bound
/// (so no one else gets it) but never listens, so every connection is refused.
pub struct Refused {
    pub addr: std::net::SocketAddr,
    _socket: tokio::net::TcpSocket,
}

/// A loopback address whose connections are refused.
pub fn refused_addr() -> Refused {
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket
        .bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("bind 127.0.0.1:0");
    Refused {
        addr: socket.local_addr().expect("local addr"),
        _socket: socket,
    }
}
