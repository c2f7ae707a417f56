//! The PROXY protocol (HAProxy's, v1 text and v2 binary) on listeners with
//! `proxy_protocol: true`: an L4 balancer in front (AWS NLB, HAProxy in TCP
//! mode, a Kubernetes load balancer) opens each connection with a header that
//! names the client, which becomes the connection's client address.
//!
//! The header is parsed by the `proxy-header` crate. It is read with
//! `MSG_PEEK` until complete, then exactly its bytes are taken off the
//! socket, so whatever follows (a TLS handshake, an HTTP request) stays in
//! the socket for the next reader and needs no buffer carried along. A peek
//! that finds the header incomplete clears the socket's readiness (tokio's
//! `try_io`), so a client that sends it slowly is waited for, not spun on.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::Duration;

use proxy_header::{ParseConfig, ProxyHeader};
use tokio::io::{AsyncReadExt, Interest};
use tokio::net::TcpStream;

/// Larger than any header a balancer sends (a v2 header with the TLVs AWS,
/// GCP or HAProxy's `send-proxy-v2-ssl-cn` add is a few hundred bytes); a
/// longer one is refused.
const MAX_HEADER: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("no complete PROXY protocol header within {0:?}")]
    Timeout(Duration),
    #[error("the connection closed before its PROXY protocol header was complete")]
    Closed,
    #[error("not a valid PROXY protocol header: {0}")]
    Invalid(proxy_header::Error),
    #[error("reading the PROXY protocol header failed: {0}")]
    Io(#[from] io::Error),
}

/// Reads the PROXY header that starts `stream`, within `timeout`. The client
/// it names, or `None` for a connection the balancer made itself (v2
/// `LOCAL`, v1 `UNKNOWN`: its health checks), whose peer address stands.
pub async fn read_header(stream: &mut TcpStream, timeout: Duration) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    match tokio::time::timeout(timeout, read(stream)).await {
        Ok(result) => result,
        Err(_) => Err(ProxyHeaderError::Timeout(timeout)),
    }
}

async fn read(stream: &mut TcpStream) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let config = ParseConfig { include_tlvs: false, allow_v1: true, allow_v2: true };
    // On the heap: an array here would sit in every connection's future,
    // PROXY listener or not, for the connection's whole life.
    let mut buf = vec![0u8; MAX_HEADER];
    loop {
        let ready = stream.ready(Interest::READABLE).await?;
        // A client that sent part of a header and then shut its side: the
        // socket stays readable (at its end) however often it is peeked, so
        // without this the loop would never wait, and never let the
        // worker's other connections run.
        let closing = ready.is_read_closed();
        let peeked = stream.try_io(Interest::READABLE, || {
            let seen = peek(stream, &mut buf)?;
            if seen == 0 {
                return Ok(Err(ProxyHeaderError::Closed));
            }
            match ProxyHeader::parse(&buf[..seen], config) {
                Ok((header, length)) => Ok(Ok((header.proxied_address().map(|a| a.source), length))),
                Err(proxy_header::Error::BufferTooShort) if closing => Ok(Err(ProxyHeaderError::Closed)),
                // More is on its way: wait for it (the readiness is cleared).
                Err(proxy_header::Error::BufferTooShort) if seen < MAX_HEADER => Err(io::ErrorKind::WouldBlock.into()),
                Err(error) => Ok(Err(ProxyHeaderError::Invalid(error))),
            }
        });
        let (client, length) = match peeked {
            Ok(parsed) => parsed?,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
            Err(error) => return Err(error.into()),
        };
        // The header's bytes are in the socket already: this read does not wait.
        stream.read_exact(&mut buf[..length]).await?;
        return Ok(client);
    }
}

/// `recv(MSG_PEEK)`: what the socket holds, left in it.
fn peek(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of its length, and the descriptor is
    // the open socket `stream` owns for the duration of the call.
    let read = unsafe { libc::recv(stream.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_PEEK) };
    usize::try_from(read).map_err(|_| io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        (client, listener.accept().await.unwrap().0)
    }

    #[tokio::test]
    async fn a_v1_header_sent_in_pieces_names_the_client_and_leaves_the_request() {
        let (mut client, mut server) = pair().await;
        let reading = tokio::spawn(async move {
            let client = read_header(&mut server, Duration::from_secs(10)).await.unwrap();
            let mut rest = vec![0u8; 14];
            server.read_exact(&mut rest).await.unwrap();
            (client, rest)
        });
        for piece in [&b"PROXY TCP4 203.0.1"[..], b"13.9 10.0.0.1 4711 80\r", b"\nGET / HTTP/1.1"] {
            client.write_all(piece).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (named, rest) = reading.await.unwrap();
        assert_eq!(named, Some("203.0.113.9:4711".parse().unwrap()));
        assert_eq!(rest, b"GET / HTTP/1.1");
    }

    #[tokio::test]
    async fn a_v2_header_names_the_client_and_local_names_none() {
        for (address, expected) in [
            (
                Some(proxy_header::ProxiedAddress::stream(
                    "[2001:db8::7]:5555".parse().unwrap(),
                    "[::1]:80".parse().unwrap(),
                )),
                Some("[2001:db8::7]:5555"),
            ),
            (None, None),
        ] {
            let header = match address {
                Some(address) => ProxyHeader::with_address(address),
                None => ProxyHeader::with_local(),
            };
            let mut wire = Vec::new();
            header.encode_v2(&mut wire).unwrap();
            wire.extend_from_slice(b"after");
            let (mut client, mut server) = pair().await;
            client.write_all(&wire).await.unwrap();
            let named = read_header(&mut server, Duration::from_secs(10)).await.unwrap();
            assert_eq!(named, expected.map(|e| e.parse().unwrap()));
            let mut rest = [0u8; 5];
            server.read_exact(&mut rest).await.unwrap();
            assert_eq!(&rest, b"after");
        }
    }

    /// The reader runs on a thread of its own and is waited for from this
    /// one with a deadline: a reader that spins never yields to any timer of
    /// its runtime, so only another thread can tell.
    #[test]
    fn a_client_that_shuts_its_side_mid_header_is_refused_at_once() {
        for partial in [&b"PROXY TCP4 1"[..], &b"\r\n\r\n\0\r\nQUIT\n\x21"[..]] {
            let (done, result) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                let outcome = runtime.block_on(async {
                    let (mut client, mut server) = pair().await;
                    client.write_all(partial).await.unwrap();
                    client.shutdown().await.unwrap();
                    read_header(&mut server, Duration::from_secs(60)).await
                });
                let _ = done.send(format!("{outcome:?}"));
            });
            let outcome = result.recv_timeout(Duration::from_secs(20)).expect("the reader returns instead of spinning");
            assert!(outcome.starts_with("Err(Closed"), "{outcome}");
        }
    }

    #[tokio::test]
    async fn no_header_or_a_silent_client_is_refused() {
        let (mut client, mut server) = pair().await;
        client.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        assert!(matches!(read_header(&mut server, Duration::from_secs(10)).await, Err(ProxyHeaderError::Invalid(_))));
        let (_client, mut server) = pair().await;
        let silent = read_header(&mut server, Duration::from_millis(50)).await;
        assert!(matches!(silent, Err(ProxyHeaderError::Timeout(_))), "{silent:?}");
    }
}
