//! HTTP/1.1 connections to backends, pooled per worker thread and driven by
//! the request itself.
//!
//! No connection task and no channel: the request's own future writes the
//! request and reads the response head from the socket, and the response body
//! reads the rest as the client connection asks for it (Pingora's shape). A
//! request therefore never hops between tasks, and the socket's read buffer is
//! reused from one response to the next. Framing is in [`codec`].
//!
//! Each worker has its own pool (see `server::workers`), so the lock here is
//! never contended. A request takes an idle connection of its backend (the most
//! recently used, whose TCP state is warmest) or opens one. The connection goes
//! back to the pool the moment its response body has been read to the end,
//! carried by the body itself ([`Http1Body`]); a body dropped before its end
//! takes its connection with it (its state is unknown), as does a response the
//! backend marked `Connection: close` or delimited by closing. An idle
//! connection the backend closed (or sent anything on) is noticed from the
//! socket's readiness when it is taken, without a system call, and let go.

pub(crate) mod codec;

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap};
use http::{Method, Request, Response};
use http_body::{Body, Frame, SizeHint};
use tokio::io::AsyncWrite;

use self::codec::{Chunk, ChunkedDecoder, Malformed, RequestFraming, ResponseFraming};
use super::connect::ConnectError;
use super::{Connector, Destination, SendError};
use crate::body::{BoxError, ProxyBody};
use crate::tls::{BackendStream, Stream};

/// Idle connections are swept every `SWEEP`; one left idle for `MAX_IDLE_SWEEPS`
/// sweeps (30-40 s) is closed, before backends commonly close theirs (60 s+).
pub(super) const SWEEP: Duration = Duration::from_secs(10);
pub(super) const MAX_IDLE_SWEEPS: u64 = 4;

/// Reads go into at least this much free buffer space; a read that fills
/// its space doubles the next one's, up to `MAX_READ`. The cap is what one
/// socket read of a fast backend on loopback returns (64 KiB): hyper's 408 KiB
/// cap saved no time per byte here, but left every pooled connection that
/// once carried a large body holding 400 KiB (peak RSS 62 MiB for 64 clients
/// of 64 KiB bodies, 19 MiB with this cap and `release_large_buffer`).
const MIN_READ: usize = 8 * 1024;
const MAX_READ: usize = 64 * 1024;
/// Below this much free space the buffer is topped up before reading (and,
/// when no earlier response still shares it, reused from its start).
const LOW_SPACE: usize = 1024;

pub struct Http1Pool {
    me: Weak<Http1Pool>,
    /// Keyed by backend (address and TLS setting); hashed with foldhash, not
    /// SipHash: the keys come from the config, not from clients.
    idle: Mutex<HashMap<Arc<str>, Vec<Idle>, foldhash::fast::RandomState>>,
    connector: Connector,
    /// Sweeps done so far; idle connections remember the count they came back at.
    sweeps: AtomicU64,
    sweeping: AtomicBool,
}

struct Idle {
    connection: Box<Connection>,
    since_sweep: u64,
}

impl std::fmt::Debug for Http1Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http1Pool").finish_non_exhaustive()
    }
}

/// Why an exchange over HTTP/1.1 failed after the connection was made.
#[derive(Debug, thiserror::Error)]
pub enum Http1Error {
    #[error("the backend closed the connection before the response was complete")]
    Closed,
    #[error("the backend's response is not valid HTTP/1.1: {0}")]
    Malformed(#[from] Malformed),
    #[error("the connection to the backend failed: {0}")]
    Io(#[source] std::io::Error),
    #[error("the request body failed: {0}")]
    RequestBody(#[source] BoxError),
    #[error("the request body's length differs from its Content-Length")]
    RequestBodyLength,
}

impl Http1Pool {
    pub fn new(connector: Connector) -> Arc<Http1Pool> {
        Arc::new_cyclic(|me| Http1Pool {
            me: me.clone(),
            idle: Mutex::default(),
            connector,
            sweeps: AtomicU64::new(0),
            sweeping: AtomicBool::new(false),
        })
    }

    /// Sends `request` (origin-form target, `Host` set) to `to`, on a
    /// pooled connection or a new one.
    ///
    /// The head is written into the connection's buffer before the future is
    /// made, and the request's header map let go: only the bytes, the method
    /// and the body wait for the backend (a smaller future, and less memory
    /// per request in flight).
    pub fn send<'a>(
        &'a self,
        to: Destination<'a>,
        request: Request<ProxyBody>,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, SendError>> + Send + 'a {
        let key = to.key;
        let (parts, body) = request.into_parts();
        let declared = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok());
        let framing = RequestFraming::choose(&parts.method, declared, body.is_end_stream(), body.size_hint().exact());
        let mut writer = BodyWriter::new(body, framing);
        let mut pooled = self.checkout(key);
        // A new connection takes this buffer as its own.
        let mut request_head =
            pooled.as_mut().map_or_else(|| Vec::with_capacity(512), |c| std::mem::take(&mut c.write_buf));
        request_head.clear();
        let target = parts.uri.path_and_query().map_or("/", |target| target.as_str());
        codec::encode_request_head(&mut request_head, &parts.method, target, &parts.headers, framing);
        let method = parts.method;
        async move {
            let mut request_head = Some(request_head);
            loop {
                let (mut connection, was_pooled) = match pooled.take() {
                    Some(connection) => (connection, true),
                    // Boxed: connecting is the rare path, and its state would
                    // otherwise make every request's future kilobytes larger.
                    None => (Box::pin(self.connect(to)).await.map_err(|e| SendError::Connect(Arc::new(e)))?, false),
                };
                connection.write_buf = request_head.take().expect("the head goes with one connection at a time");
                let mut exchange = Exchange { connection, writer, written: 0, started: false, sent: false, interim: 0 };
                match poll_fn(|cx| exchange.poll_head(cx, &method)).await {
                    Ok(head) => {
                        let Exchange { connection, sent, .. } = exchange;
                        let home = self.me.upgrade();
                        let reusable = head.keep_alive && sent;
                        let body = Http1Body::new(connection, head.framing, reusable, home);
                        let mut response = Response::new(UpstreamBody { inner: Inner::Http1(body) });
                        *response.status_mut() = head.status;
                        *response.version_mut() = head.version;
                        *response.headers_mut() = head.headers;
                        return Ok(response);
                    }
                    // A pooled connection that failed before any byte of the
                    // request left: nothing reached the backend, so the request
                    // (its head and any body framing queued, untouched) goes
                    // out again on another connection.
                    Err(Http1Error::Io(_)) if was_pooled && !exchange.started => {
                        request_head = Some(std::mem::take(&mut exchange.connection.write_buf));
                        writer = exchange.writer;
                        pooled = self.checkout(key);
                    }
                    Err(error) => return Err(SendError::Request(Box::new(error))),
                }
            }
        }
    }

    /// Whether `key` has an idle connection the next request would take (one
    /// the backend has not closed while it sat in the pool).
    pub fn has_idle(&self, key: &str) -> bool {
        let idle = self.idle.lock().expect("never poisoned");
        idle.get(key).is_some_and(|idle| idle.iter().any(|idle| !idle.connection.disturbed_while_idle()))
    }

    /// Closes `key`'s idle connections: the next request opens a new one.
    pub fn forget(&self, key: &str) {
        self.idle.lock().expect("never poisoned").remove(key);
    }

    fn checkout(&self, backend: &str) -> Option<Box<Connection>> {
        let mut idle = self.idle.lock().expect("never poisoned");
        let connections = idle.get_mut(backend)?;
        while let Some(idle) = connections.pop() {
            if !idle.connection.disturbed_while_idle() {
                return Some(idle.connection);
            }
        }
        None
    }

    fn put(&self, connection: Box<Connection>) {
        let since_sweep = self.sweeps.load(Ordering::Relaxed);
        let mut idle = self.idle.lock().expect("never poisoned");
        // Looked up by reference: cloning the key would touch a count that
        // every worker's requests to this backend share.
        match idle.get_mut(&*connection.backend) {
            Some(connections) => connections.push(Idle { connection, since_sweep }),
            None => {
                let backend = Arc::clone(&connection.backend);
                idle.insert(backend, vec![Idle { connection, since_sweep }]);
            }
        }
    }

    async fn connect(&self, to: Destination<'_>) -> Result<Box<Connection>, ConnectError> {
        let stream = self.connector.connect(to.authority, to.tls).await?;
        if !self.sweeping.swap(true, Ordering::Relaxed) {
            tokio::spawn(sweep(self.me.clone()));
        }
        Ok(Box::new(Connection {
            io: stream,
            backend: Arc::clone(to.key),
            read_buf: BytesMut::new(),
            write_buf: Vec::new(),
            read_size: MIN_READ,
        }))
    }
}

/// Closes connections idle too long, while the pool lives.
async fn sweep(pool: Weak<Http1Pool>) {
    loop {
        tokio::time::sleep(SWEEP).await;
        let Some(pool) = pool.upgrade() else { return };
        let now = pool.sweeps.fetch_add(1, Ordering::Relaxed) + 1;
        let mut idle = pool.idle.lock().expect("never poisoned");
        idle.retain(|_, connections| {
            connections.retain_mut(|c| {
                c.connection.release_large_buffer();
                now - c.since_sweep < MAX_IDLE_SWEEPS && !c.connection.disturbed_while_idle()
            });
            !connections.is_empty()
        });
    }
}

/// One connection to a backend with its buffers, which live as long as it.
struct Connection {
    io: BackendStream,
    /// The pool key of its backend (address and TLS setting).
    backend: Arc<str>,
    read_buf: BytesMut,
    /// The request head, then chunk framing; reused for every request.
    write_buf: Vec<u8>,
    read_size: usize,
}

impl Connection {
    /// Whether the backend closed the connection, or sent something nobody
    /// asked for, while it sat in the pool. Read readiness says so without a
    /// system call: the last read before the connection went idle was short,
    /// which clears it.
    fn disturbed_while_idle(&self) -> bool {
        let tcp = match &self.io {
            Stream::Plain(tcp) => tcp,
            Stream::Tls(tls) => tls.get_ref().0,
        };
        tcp.poll_read_ready(&mut Context::from_waker(Waker::noop())).is_ready()
    }

    /// Gives back a read buffer grown for a large body, once it is empty: a
    /// pooled connection then holds `MIN_READ` at most, whatever it once
    /// carried. Done by the sweep, not when the connection is pooled: freeing
    /// it there and growing it again on the next large body cost a third more
    /// CPU per 64 KiB response in page faults.
    fn release_large_buffer(&mut self) {
        if self.read_buf.is_empty() && self.read_buf.capacity() > 2 * MIN_READ {
            self.read_buf = BytesMut::new();
            self.read_size = MIN_READ;
        }
    }

    /// Reads what the socket has into the buffer; `Ok(0)` is the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        if self.read_buf.capacity() - self.read_buf.len() < LOW_SPACE {
            self.read_buf.reserve(self.read_size);
        }
        let space = self.read_buf.capacity() - self.read_buf.len();
        let read = ready!(tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read_buf))?;
        if read == space && self.read_size < MAX_READ {
            // A large body: fewer, larger reads.
            self.read_size = (self.read_size * 2).min(MAX_READ);
            self.read_buf.reserve(self.read_size);
        }
        Poll::Ready(Ok(read))
    }
}

/// The request body on its way out, framed for the wire.
struct BodyWriter {
    /// `None` once the body has ended.
    body: Option<ProxyBody>,
    framing: RequestFraming,
    /// Body bytes taken so far.
    taken: u64,
    /// A frame's bytes waiting to go out after `write_buf`, then `suffix`.
    data: Bytes,
    suffix: &'static [u8],
    /// Everything is queued: nothing more to take from the body.
    complete: bool,
}

impl BodyWriter {
    fn new(body: ProxyBody, framing: RequestFraming) -> Self {
        // An ended body is never polled: `Empty` costs nothing to drop.
        let body = (!body.is_end_stream()).then_some(body);
        BodyWriter { body, framing, taken: 0, data: Bytes::new(), suffix: b"", complete: false }
    }
}

/// One request on one connection, up to the response head.
struct Exchange {
    connection: Box<Connection>,
    writer: BodyWriter,
    /// Bytes of `write_buf` already written.
    written: usize,
    /// Some of the request has been written.
    started: bool,
    /// The whole request is out.
    sent: bool,
    /// Interim (1xx) responses read so far.
    interim: u8,
}

impl Exchange {
    /// Writes the request while reading for the response head: a backend
    /// may answer (a 413, say) before it has taken the whole body.
    fn poll_head(&mut self, cx: &mut Context<'_>, method: &Method) -> Poll<Result<codec::ResponseHead, Http1Error>> {
        if !self.sent {
            match self.poll_send(cx) {
                Poll::Ready(Ok(())) => self.sent = true,
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => {}
            }
        }
        let connection = &mut *self.connection;
        loop {
            if !connection.read_buf.is_empty() {
                if let Some(head) = codec::parse_response_head(&mut connection.read_buf, method)? {
                    if head.status.is_informational() && head.framing != ResponseFraming::Upgrade {
                        // 100 Continue, 103 Early Hints: the final response follows.
                        self.interim += 1;
                        if self.interim > codec::MAX_INTERIM {
                            return Poll::Ready(Err(Malformed::TooManyInterim.into()));
                        }
                        continue;
                    }
                    return Poll::Ready(Ok(head));
                }
            }
            if ready!(connection.poll_fill(cx)).map_err(Http1Error::Io)? == 0 {
                return Poll::Ready(Err(Http1Error::Closed));
            }
        }
    }

    /// Writes out the head and the body as the body yields it. A frame the
    /// body has ready is queued behind the head, so that a small body leaves
    /// with its head in one write.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Http1Error>> {
        let connection = &mut *self.connection;
        let writer = &mut self.writer;
        loop {
            let mut waiting_for_body = false;
            if writer.data.is_empty() && writer.suffix.is_empty() && !writer.complete {
                if self.written == connection.write_buf.len() {
                    connection.write_buf.clear();
                    self.written = 0;
                }
                match writer.body.as_mut().map(|body| Pin::new(body).poll_frame(cx)) {
                    None => {
                        match writer.framing {
                            RequestFraming::Chunked => writer.suffix = b"0\r\n\r\n",
                            RequestFraming::Length { length, .. } if length != writer.taken => {
                                return Poll::Ready(Err(Http1Error::RequestBodyLength));
                            }
                            _ => {}
                        }
                        writer.complete = true;
                    }
                    Some(Poll::Pending) => waiting_for_body = true,
                    Some(Poll::Ready(None)) => {
                        writer.body = None;
                        continue;
                    }
                    Some(Poll::Ready(Some(Err(error)))) => return Poll::Ready(Err(Http1Error::RequestBody(error))),
                    Some(Poll::Ready(Some(Ok(frame)))) => {
                        writer.queue(frame, &mut connection.write_buf)?;
                        continue;
                    }
                }
            }
            let head = &connection.write_buf[self.written..];
            if !head.is_empty() || !writer.data.is_empty() || !writer.suffix.is_empty() {
                let slices = [IoSlice::new(head), IoSlice::new(&writer.data), IoSlice::new(writer.suffix)];
                let io = Pin::new(&mut connection.io);
                let wrote = if io.is_write_vectored() {
                    ready!(io.poll_write_vectored(cx, &slices))
                } else {
                    let first = slices.iter().find(|slice| !slice.is_empty()).expect("something is queued");
                    ready!(io.poll_write(cx, first))
                }
                .map_err(Http1Error::Io)?;
                if wrote == 0 {
                    return Poll::Ready(Err(Http1Error::Io(std::io::ErrorKind::WriteZero.into())));
                }
                self.started = true;
                let mut wrote = wrote;
                let from_head = wrote.min(head.len());
                self.written += from_head;
                wrote -= from_head;
                let from_data = wrote.min(writer.data.len());
                let _ = writer.data.split_to(from_data);
                wrote -= from_data;
                writer.suffix = &writer.suffix[wrote..];
                continue;
            }
            // Everything queued is written. TLS holds records until flushed,
            // and while the client's body is awaited the backend must see
            // what came before.
            ready!(Pin::new(&mut connection.io).poll_flush(cx)).map_err(Http1Error::Io)?;
            return if waiting_for_body { Poll::Pending } else { Poll::Ready(Ok(())) };
        }
    }
}

impl BodyWriter {
    /// Queues one frame of the body: its data (with chunk framing), or its
    /// trailers (sent only in a chunked body; otherwise dropped).
    fn queue(&mut self, frame: Frame<Bytes>, write_buf: &mut Vec<u8>) -> Result<(), Http1Error> {
        match frame.into_data() {
            Ok(data) if data.is_empty() => {}
            Ok(data) => {
                self.taken += data.len() as u64;
                match self.framing {
                    RequestFraming::Chunked => {
                        codec::chunk_prefix(data.len(), write_buf);
                        self.suffix = b"\r\n";
                    }
                    RequestFraming::Length { length, .. } if self.taken > length => {
                        return Err(Http1Error::RequestBodyLength);
                    }
                    RequestFraming::Length { .. } => {}
                    RequestFraming::NoBody => return Err(Http1Error::RequestBodyLength),
                }
                self.data = data;
            }
            Err(frame) => {
                if let (RequestFraming::Chunked, Ok(trailers)) = (self.framing, frame.into_trailers()) {
                    encode_trailers(&trailers, write_buf);
                    self.body = None;
                    self.complete = true;
                }
            }
        }
        Ok(())
    }
}

/// The last chunk with trailers.
fn encode_trailers(trailers: &HeaderMap, out: &mut Vec<u8>) {
    out.extend_from_slice(b"0\r\n");
    for (name, value) in trailers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// A response body read from its HTTP/1.1 connection, which goes back to the
/// pool when the body has been read to its end.
pub struct Http1Body {
    connection: Option<Box<Connection>>,
    decoding: Decoding,
    reusable: bool,
    home: Option<Arc<Http1Pool>>,
}

enum Decoding {
    Length(u64),
    Chunked(ChunkedDecoder),
    UntilClose,
    /// A 101: the connection is handed to the tunnel whole.
    Upgrade,
    Done,
}

impl Http1Body {
    fn new(
        connection: Box<Connection>,
        framing: ResponseFraming,
        reusable: bool,
        home: Option<Arc<Http1Pool>>,
    ) -> Self {
        let decoding = match framing {
            ResponseFraming::Empty => Decoding::Length(0),
            ResponseFraming::Length(length) => Decoding::Length(length),
            ResponseFraming::Chunked => Decoding::Chunked(ChunkedDecoder::default()),
            ResponseFraming::UntilClose => Decoding::UntilClose,
            ResponseFraming::Upgrade => Decoding::Upgrade,
        };
        Http1Body { connection: Some(connection), decoding, reusable, home }
    }

    /// The body ended: its connection goes home if it can carry another request.
    fn finish(&mut self) {
        self.decoding = Decoding::Done;
        let Some(connection) = self.connection.take() else { return };
        // Bytes after the response were never asked for: the connection is out of step.
        if self.reusable && connection.read_buf.is_empty() {
            if let Some(pool) = self.home.take() {
                pool.put(connection);
            }
        }
    }

    fn fail(&mut self, error: Http1Error) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.decoding = Decoding::Done;
        self.connection = None;
        Poll::Ready(Some(Err(Box::new(error))))
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            let Some(connection) = self.connection.as_mut() else { return Poll::Ready(None) };
            let buf = &mut connection.read_buf;
            match &mut self.decoding {
                Decoding::Length(0) | Decoding::Done | Decoding::Upgrade => {
                    self.finish();
                    return Poll::Ready(None);
                }
                Decoding::Length(left) if !buf.is_empty() => {
                    let take = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
                    let data = buf.split_to(take).freeze();
                    *left -= take as u64;
                    if *left == 0 {
                        self.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Decoding::UntilClose if !buf.is_empty() => {
                    return Poll::Ready(Some(Ok(Frame::data(buf.split().freeze()))));
                }
                Decoding::Chunked(decoder) => match decoder.decode(buf) {
                    Ok(Chunk::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Chunk::Trailers(trailers)) => {
                        self.finish();
                        return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                    }
                    Ok(Chunk::End) => {
                        self.finish();
                        return Poll::Ready(None);
                    }
                    Ok(Chunk::Incomplete) => {}
                    Err(malformed) => return self.fail(malformed.into()),
                },
                Decoding::Length(_) | Decoding::UntilClose => {}
            }
            match ready!(connection.poll_fill(cx)) {
                Ok(0) if matches!(self.decoding, Decoding::UntilClose) => {
                    // The backend's close is this body's end; the connection is spent.
                    self.decoding = Decoding::Done;
                    self.connection = None;
                    return Poll::Ready(None);
                }
                Ok(0) => return self.fail(Http1Error::Closed),
                Ok(_) => {}
                Err(error) => return self.fail(Http1Error::Io(error)),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.decoding, Decoding::Length(0) | Decoding::Done) || self.connection.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoding {
            Decoding::Length(left) => SizeHint::with_exact(left),
            Decoding::Done | Decoding::Upgrade => SizeHint::with_exact(0),
            Decoding::Chunked(_) | Decoding::UntilClose => SizeHint::default(),
        }
    }
}

impl Drop for Http1Body {
    fn drop(&mut self) {
        // An empty body (204, 304, HEAD, `Content-Length: 0`) may never be
        // polled: it is over all the same.
        if matches!(self.decoding, Decoding::Length(0)) {
            self.finish();
        }
    }
}

/// A backend's response body, over either protocol.
pub struct UpstreamBody {
    inner: Inner,
}

enum Inner {
    Http1(Http1Body),
    /// HTTP/2 multiplexes: its connection is not pooled here.
    Http2(hyper::body::Incoming),
    /// A scripted backend's body in forwarding's unit tests.
    #[cfg(test)]
    Scripted(ProxyBody),
}

impl UpstreamBody {
    pub fn http2(body: hyper::body::Incoming) -> Self {
        UpstreamBody { inner: Inner::Http2(body) }
    }

    #[cfg(test)]
    pub fn scripted(body: ProxyBody) -> Self {
        UpstreamBody { inner: Inner::Scripted(body) }
    }

    /// After a 101 response, the backend connection for the tunnel, with any
    /// bytes the backend sent after its response head.
    pub fn take_upgrade(&mut self) -> Option<Upgraded> {
        let Inner::Http1(body) = &mut self.inner else { return None };
        if !matches!(body.decoding, Decoding::Upgrade) {
            return None;
        }
        body.decoding = Decoding::Done;
        let connection = body.connection.take()?;
        let Connection { io, mut read_buf, .. } = *connection;
        Some(Upgraded::new(io, read_buf.split().freeze()))
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().inner {
            Inner::Http1(body) => body.poll_frame(cx),
            Inner::Http2(body) => Pin::new(body).poll_frame(cx).map_err(BoxError::from),
            #[cfg(test)]
            Inner::Scripted(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Http1(body) => body.is_end_stream(),
            Inner::Http2(body) => body.is_end_stream(),
            #[cfg(test)]
            Inner::Scripted(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Http1(body) => body.size_hint(),
            Inner::Http2(body) => body.size_hint(),
            #[cfg(test)]
            Inner::Scripted(body) => body.size_hint(),
        }
    }
}

/// A backend connection after a 101: the bytes it sent after the response
/// head come first, then the connection itself.
pub type Upgraded = crate::conn::Rewound<BackendStream>;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_pooled_connection_gives_back_a_buffer_grown_for_a_large_body() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let connect = || async { tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap() };
        let connection = |tcp, read_buf: BytesMut, read_size| Connection {
            io: Stream::Plain(tcp),
            backend: Arc::from("bot"),
            read_buf,
            write_buf: Vec::new(),
            read_size,
        };
        // Grown to the cap by a large body, and empty: given back.
        let mut grown = connection(connect().await, BytesMut::with_capacity(MAX_READ), MAX_READ);
        grown.release_large_buffer();
        assert_eq!((grown.read_buf.capacity(), grown.read_size), (0, MIN_READ));
        // Still holding bytes (never the case for a pooled one, but never lost).
        let mut holding = BytesMut::with_capacity(MAX_READ);
        holding.extend_from_slice(b"HTTP/1.1");
        let mut busy = connection(connect().await, holding, MAX_READ);
        busy.release_large_buffer();
        assert_eq!(&busy.read_buf[..], b"HTTP/1.1");
        // The size small responses use is kept: no allocation for the next one.
        let mut small = connection(connect().await, BytesMut::with_capacity(MIN_READ), MIN_READ);
        small.release_large_buffer();
        assert!(small.read_buf.capacity() >= MIN_READ);
    }
}
