//! The PROXY protocol v2 (HAProxy's binary header, through the `ppp` crate): the selector
//! opens each spliced connection to an edge with a header naming the client, and an edge
//! that trusts the selector's network reads it before anything else, so logs, metrics and
//! `X-Forwarded-For` see the client rather than the selector.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// The 12 bytes every v2 header starts with.
const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Signature, version and command, family and protocol, length.
const FIXED: usize = 16;
/// Longest address block accepted (IPv6 is 36 bytes; TLVs beyond this are refused).
const MAX_BLOCK: usize = 512;

/// The header for a client connection `client` that reached us at `local`. Addresses of two
/// families (an IPv4 client on an IPv6 listener) are sent as the client's, mapped.
pub fn header(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let local = match (client, local) {
        (SocketAddr::V4(_), SocketAddr::V6(l)) => l
            .ip()
            .to_ipv4_mapped()
            .map_or(SocketAddr::from(([0, 0, 0, 0], l.port())), |ip| {
                SocketAddr::from((ip, l.port()))
            }),
        (SocketAddr::V6(_), SocketAddr::V4(l)) => {
            SocketAddr::from((l.ip().to_ipv6_mapped(), l.port()))
        }
        _ => local,
    };
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (client, local),
    )
    .build()
    .expect("a v2 header of two socket addresses always builds")
}

/// Reads one v2 header within `within`: the client's address, or `None` for a `LOCAL`
/// header (a health check of the sender itself). Anything else is an error: the caller
/// closes the connection.
pub async fn read<S: AsyncRead + Unpin>(
    stream: &mut S,
    within: Duration,
) -> io::Result<Option<SocketAddr>> {
    let bad =
        |why: &str| io::Error::new(io::ErrorKind::InvalidData, format!("PROXY header: {why}"));
    let read = async {
        let mut buf = vec![0u8; FIXED];
        stream.read_exact(&mut buf).await?;
        if buf[..12] != SIGNATURE {
            return Err(bad("missing (this source must send PROXY protocol v2)"));
        }
        let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
        if len > MAX_BLOCK {
            return Err(bad("address block too long"));
        }
        buf.resize(FIXED + len, 0);
        stream.read_exact(&mut buf[FIXED..]).await?;
        let h = ppp::v2::Header::try_from(buf.as_slice()).map_err(|e| bad(&e.to_string()))?;
        Ok(match (h.command, h.addresses) {
            (ppp::v2::Command::Local, _) => None,
            (_, ppp::v2::Addresses::IPv4(a)) => {
                Some(SocketAddr::from((a.source_address, a.source_port)))
            }
            (_, ppp::v2::Addresses::IPv6(a)) => {
                Some(SocketAddr::from((a.source_address, a.source_port)))
            }
            _ => return Err(bad("not a TCP address")),
        })
    };
    tokio::time::timeout(within, read)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "PROXY header: none in time"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn headers_read_back_and_bad_ones_are_refused() {
        let client: SocketAddr = "192.0.2.7:51000".parse().unwrap();
        let h = header(client, "127.0.0.1:8080".parse().unwrap());
        let mut input = h.clone();
        input.extend_from_slice(b"GET / HTTP/1.1\r\n");
        let mut r = input.as_slice();
        assert_eq!(
            read(&mut r, Duration::from_secs(1)).await.unwrap(),
            Some(client)
        );
        assert_eq!(r, b"GET / HTTP/1.1\r\n", "exactly the header is consumed");
        let v6: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
        let h6 = header(v6, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(
            read(&mut h6.as_slice(), Duration::from_secs(1))
                .await
                .unwrap(),
            Some(v6)
        );
        let mut plain: &[u8] = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n";
        assert!(read(&mut plain, Duration::from_secs(1)).await.is_err());
    }
}
