//! Draining the data port's connections: on shutdown each connection finishes the request it
//! is serving, then closes; the node waits for all of them (bounded by its drain timeout).
//!
//! hyper-util's `GracefulShutdown` does this by polling a watch channel's `changed()` future
//! every time a connection is polled: a mutex and a waker comparison on every request
//! (~270 instructions of a ~12k-instruction memory hit, callgrind). Here a connection polls one
//! atomic flag; it hands its task's waker to the drain once (again only if the waker changes),
//! and the drain wakes every registered connection when it starts.
//!
//! The same poll runs a connection's [`Watchdog`] ([`Watcher::watch_idle`]): its [`Activity`]
//! counts the requests started and in flight and the bytes waiting on the client, and two
//! tickers (no clock read per request) shut down a connection with nothing in flight, nothing
//! waiting and no request started for the idle timeout (HTTP/2 clients that answer PINGs
//! included), and drop one whose client took nothing for the send timeout while a response
//! waited on it (see `outpost_net::Sending`), or that did not end within the grace of an idle
//! shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use hyper_util::server::graceful::GracefulConnection;
use outpost_net::{Activity, Closes, Timeouts, Watchdog};
use tokio::sync::watch;

#[derive(Default)]
struct Shared {
    draining: AtomicBool,
    /// The waker of every watched connection's task, by connection.
    wakers: Mutex<HashMap<u64, Waker>>,
    next_id: AtomicU64,
}

/// The set of connections to drain.
pub struct Drain {
    shared: Arc<Shared>,
    /// Every watched connection holds a receiver: `closed()` resolves when the last is gone.
    live: watch::Sender<()>,
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

impl Drain {
    pub fn new() -> Self {
        Self {
            shared: Arc::default(),
            live: watch::channel(()).0,
        }
    }

    /// A place in the drain for a connection still being set up (a TLS handshake, say): it
    /// counts as open from now on.
    pub fn watcher(&self) -> Watcher {
        Watcher {
            shared: self.shared.clone(),
            live: self.live.subscribe(),
        }
    }

    /// `conn`, shut down gracefully when the drain starts.
    pub fn watch<C: GracefulConnection>(&self, conn: C) -> Watched<C> {
        self.watcher().watch(conn)
    }

    /// Connections still open.
    pub fn count(&self) -> usize {
        self.live.receiver_count()
    }

    /// Tells every connection to finish its current request and close, and waits until all
    /// have.
    pub async fn shutdown(self) {
        self.shared.draining.store(true, Ordering::SeqCst);
        let wakers: Vec<Waker> = {
            let mut map = self.shared.wakers.lock().unwrap_or_else(|e| e.into_inner());
            map.drain().map(|(_, w)| w).collect()
        };
        for w in wakers {
            w.wake();
        }
        self.live.closed().await;
    }
}

/// A connection's place in a [`Drain`], before the connection is there.
pub struct Watcher {
    shared: Arc<Shared>,
    live: watch::Receiver<()>,
}

impl Watcher {
    /// `conn`, shut down gracefully when the drain starts.
    pub fn watch<C: GracefulConnection>(self, conn: C) -> Watched<C> {
        self.watch_idle(conn, None)
    }

    /// `conn`, shut down gracefully when the drain starts, or once it has been idle (no request
    /// in flight, none started, nothing waiting on the client) for the idle timeout of
    /// `bounds`; dropped by its send timeout, or by the grace of an idle shutdown (see
    /// [`Watchdog`]), each close counted in its [`Closes`].
    pub fn watch_idle<C: GracefulConnection>(
        self,
        conn: C,
        bounds: Option<(Arc<Activity>, Timeouts, Arc<Closes>)>,
    ) -> Watched<C> {
        Watched {
            bounds: bounds.map(|(activity, timeouts, closes)| {
                (activity, Watchdog::new(timeouts).counted(closes))
            }),
            conn,
            reg: Registration {
                id: self.shared.next_id.fetch_add(1, Ordering::Relaxed),
                shared: self.shared,
                waker: None,
                shutting_down: false,
                _live: self.live,
            },
        }
    }
}

pin_project_lite::pin_project! {
    /// A connection under a [`Drain`].
    pub struct Watched<C> {
        #[pin]
        conn: C,
        reg: Registration,
        bounds: Option<(Arc<Activity>, Watchdog)>,
    }
}

/// A watched connection's place in its drain.
struct Registration {
    shared: Arc<Shared>,
    id: u64,
    /// The waker registered with the drain (this connection's task's).
    waker: Option<Waker>,
    shutting_down: bool,
    _live: watch::Receiver<()>,
}

impl Registration {
    /// Registers `waker` unless it is the one registered already. True when the drain has
    /// started.
    fn draining(&mut self, waker: &Waker) -> bool {
        if !self.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
            let mut map = self.shared.wakers.lock().unwrap_or_else(|e| e.into_inner());
            // Checked under the lock: a drain that started before this either took its wakers
            // already (and this sees its flag) or waits for the lock and then wakes this one.
            if !self.shared.draining.load(Ordering::SeqCst) {
                map.insert(self.id, waker.clone());
                self.waker = Some(waker.clone());
            }
        }
        self.shared.draining.load(Ordering::Acquire)
    }
}

impl<C: GracefulConnection> Future for Watched<C> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let mut this = self.project();
        let mut shut_down = !this.reg.shutting_down && this.reg.draining(cx.waker());
        if let Some((activity, dog)) = this.bounds.as_mut() {
            match dog.poll(cx, activity) {
                Poll::Ready(v) if v.drops() => return Poll::Ready(Ok(())),
                Poll::Ready(_) => shut_down = true,
                Poll::Pending => {}
            }
        }
        if shut_down && !this.reg.shutting_down {
            this.reg.shutting_down = true;
            this.conn.as_mut().graceful_shutdown();
        }
        this.conn.poll(cx)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if self.waker.is_some() {
            let mut map = self.shared.wakers.lock().unwrap_or_else(|e| e.into_inner());
            map.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::time::Duration;

    use bytes::Bytes;
    use http::{Request, Response};
    use http_body_util::Full;
    use hyper::body::Incoming;
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::{Semaphore, oneshot};

    use super::*;

    const WAIT: Duration = Duration::from_secs(10);

    /// Serves every connection accepted on a loopback port under `drain`; a request waits for
    /// a permit of `gate` before it is answered.
    async fn serve(
        drain: &Drain,
        gate: Arc<Semaphore>,
    ) -> (std::net::SocketAddr, oneshot::Sender<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
        let watchers = drain.shared.clone();
        let live = drain.live.clone();
        tokio::spawn(async move {
            loop {
                let tcp = tokio::select! {
                    r = listener.accept() => r.expect("accept").0,
                    _ = &mut stop_rx => return,
                };
                let watcher = Watcher {
                    shared: watchers.clone(),
                    live: live.subscribe(),
                };
                let gate = gate.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |_req: Request<Incoming>| {
                        let gate = gate.clone();
                        async move {
                            // One request per permit.
                            gate.acquire().await.expect("gate").forget();
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                                b"done",
                            ))))
                        }
                    });
                    let builder = auto::Builder::new(TokioExecutor::new());
                    let conn = builder
                        .serve_connection(TokioIo::new(tcp), svc)
                        .into_owned();
                    let _ = watcher.watch(conn).await;
                });
            }
        });
        (addr, stop_tx)
    }

    async fn read_response(tcp: &mut TcpStream) -> String {
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.ends_with(b"done") {
            let n = tokio::time::timeout(WAIT, tcp.read(&mut buf))
                .await
                .expect("response in time")
                .expect("read");
            assert!(
                n > 0,
                "connection closed before the response: {:?}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&got).to_lowercase()
    }

    #[tokio::test]
    async fn a_drain_closes_idle_connections_and_lets_a_request_in_flight_finish() {
        let drain = Drain::new();
        let gate = Arc::new(Semaphore::new(0));
        let (addr, _stop) = serve(&drain, gate.clone()).await;
        let request = b"GET / HTTP/1.1\r\nhost: t\r\n\r\n";

        // An idle keep-alive connection: one answered request, then nothing.
        let mut idle = TcpStream::connect(addr).await.expect("connect");
        idle.write_all(request).await.expect("write");
        gate.add_permits(1);
        assert!(read_response(&mut idle).await.starts_with("http/1.1 200"));
        // A connection with a request in flight (held at the gate).
        let mut busy = TcpStream::connect(addr).await.expect("connect");
        busy.write_all(request).await.expect("write");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(drain.count(), 2);

        let mut shutdown = tokio::spawn(drain.shutdown());
        // The idle connection is closed without a request.
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(WAIT, idle.read(&mut buf))
            .await
            .expect("the idle connection is closed in time")
            .expect("read");
        assert_eq!(n, 0, "EOF on the idle connection");
        // The drain waits for the request in flight ...
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut shutdown)
                .await
                .is_err(),
            "the drain waits for the request in flight"
        );
        // ... which completes, with the connection marked for closing.
        gate.add_permits(1);
        let resp = read_response(&mut busy).await;
        assert!(resp.starts_with("http/1.1 200"), "{resp}");
        assert!(resp.contains("connection: close"), "{resp}");
        tokio::time::timeout(WAIT, shutdown)
            .await
            .expect("the drain ends once every connection is closed")
            .expect("drain task");
    }

    #[tokio::test]
    async fn a_connection_set_up_during_the_drain_is_waited_for_then_closed() {
        let drain = Drain::new();
        // Handed out before the drain (a connection in its TLS handshake, say).
        let watcher = drain.watcher();
        let shared = drain.shared.clone();
        let mut shutdown = tokio::spawn(drain.shutdown());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(shared.draining.load(Ordering::SeqCst));
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut shutdown)
                .await
                .is_err(),
            "the drain waits for the watcher it handed out"
        );

        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut client = TcpStream::connect(addr).await.expect("connect");
        let (tcp, _) = listener.accept().await.expect("accept");
        tokio::spawn(async move {
            let svc = service_fn(|_req: Request<Incoming>| async {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"done"))))
            });
            let builder = auto::Builder::new(TokioExecutor::new());
            let conn = builder
                .serve_connection(TokioIo::new(tcp), svc)
                .into_owned();
            let _ = watcher.watch(conn).await;
        });
        // Closed at once (as hyper-util's graceful shutdown does), and the drain is over.
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(WAIT, client.read(&mut buf))
            .await
            .expect("closed in time");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        tokio::time::timeout(WAIT, shutdown)
            .await
            .expect("the drain ends")
            .expect("drain task");
    }
}
