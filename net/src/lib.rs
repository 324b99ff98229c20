//! What bounds a connection, shared by every Outpost role (the edge's data, TLS and admin
//! listeners, the selector's admin port and spliced connections, the origin):
//!
//! - **Opening**: [`opening`] reads a new connection's first bytes within the header timeout
//!   and decides HTTP/1 or HTTP/2 itself. hyper-util's protocol detection has no timeout of its
//!   own and hyper's HTTP/1 header timer starts only once HTTP/1 is chosen, so a client that
//!   connects and sends nothing, or a prefix of the HTTP/2 preface ([`H2_PREFACE`]) and then
//!   stalls, would otherwise hold its slot forever. Optionally, an HTTP/1 request line longer
//!   than a limit gets 414 there (past hyper's buffer it would be a 431). The bytes read are put
//!   back in front of the stream ([`Replay`]).
//! - **Idle**: [`Activity`] counts a connection's progress (requests started, and whatever else
//!   a role counts as progress) and its requests in flight; [`Quiet`] ticks four times per idle
//!   timeout and tells when a whole timeout's worth of ticks saw no progress and nothing in
//!   flight. Each role shuts the connection down its own way (the edge's `drain::Watched`, the
//!   selector's and origin's [`serve_http`], the selector's splice).
//! - **Send**: [`Sending`] (around each response body) and [`Metered`] (around the stream)
//!   count the bytes that wait on the client; a [`Watchdog`] drops a connection whose client
//!   took nothing for the send timeout while they waited (nginx's `send_timeout`), and one
//!   that an idle shutdown could not end within its grace. Without it a client that stops
//!   reading a response holds its connection for ever: hyper waits for the write, and a
//!   graceful shutdown waits for the response.
//! - **`/metrics`** ([`exposition`]): OpenMetrics or the classic text format, as the scraper
//!   asks.
//! - **Accept failures** (EMFILE at the descriptor limit and friends) are logged by
//!   [`AcceptWarnings`] at most once per 10 s, with the count of the ones folded in.
//!
//! The count bound is each role's accept loop: it takes one of its listener's connection slots
//! (a semaphore) before it accepts, so past the cap new clients wait in the kernel's backlog.

mod accept;
pub mod exposition;
mod idle;
mod opening;
pub mod proxy_protocol;
mod send;
mod watchdog;

pub use accept::AcceptWarnings;
pub use idle::{Activity, InFlight, Quiet};
pub use opening::{H2_PREFACE, Replay, opening};
pub use send::{Metered, NOTSENT_LOWAT, SLICE, Sending, serve_socket};
pub use watchdog::{Closes, SHUTDOWN_GRACE, Timeouts, Verdict, Watchdog, serve_http};
