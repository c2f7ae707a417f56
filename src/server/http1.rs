//! One client connection spoken as HTTP/1.x, by our own loop rather than
//! hyper's: read a head (`h1::request`), hand the request to the stack, feed
//! its body from the socket only while the stack asks for it, write the
//! response (`h1::response`) and its body, and go round again while the
//! connection persists. One task does all of it, so nothing is buffered
//! beyond a read buffer that exists only while a request is being read:
//! a connection waiting for its next request holds no buffer at all
//! (hyper's held about 20 KiB per idle connection).
//!
//! Every wait is bounded: the head by `header_read_timeout` (from the first
//! byte, or from the connection's start for its first request), the body by
//! `client_body_timeout` (in `body::ClientBody`), writes by
//! `client_send_timeout` (`conn::SendTimeoutIo`), an idle connection by the
//! accept loop's `idle_timeout`. Whatever is not parsed as one request is
//! never handed on: a refused head gets its status and the connection closes,
//! and a request whose body was not read to its end is the connection's last.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{Method, StatusCode};
use http_body::{Body, Frame};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::connection::Activity;
use super::stack::{ActivityBody, ForConnection};
use crate::body::{BodyFeeder, ClientRequestBody, Demand, FedBody};
use crate::client::http1::codec::{chunk_prefix, Chunk, ChunkedDecoder};
use crate::conn::{ClientUpgrade, RewoundClient, SendTimeoutIo};
use crate::h1::request::{parse_request_head, BodyFraming, RequestHead};
use crate::h1::response::{self, Answering, BodyLength, ResponseFraming};
use crate::tls::ClientStream;

pub(super) type ClientIo = SendTimeoutIo<ClientStream>;

/// The HTTP/2 connection preface, which a prior-knowledge h2c client starts with.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// A read for a head reads at most this much; a body's reads take up to `MAX_BODY_READ`.
const HEAD_READ: usize = 4096;
const MAX_BODY_READ: usize = 64 * 1024;
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// How the connection ended, when it did not end outright.
pub(super) enum Ended {
    Closed,
    /// The client sent the HTTP/2 preface: hyper's HTTP/2 server takes the
    /// connection with the bytes read so far.
    Http2(ClientIo, BytesMut),
}

/// What one connection needs besides its socket.
pub(super) struct Http1Settings {
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
}

/// Serves requests on `io` until the client or the proxy ends the connection.
pub(super) async fn serve(
    mut io: ClientIo,
    mut service: ForConnection,
    settings: Http1Settings,
    activity: Arc<Activity>,
) -> Ended {
    let mut conn = Conn { buf: BytesMut::new(), out: Vec::new(), registered: None };
    let mut first = true;
    loop {
        let head = match conn.read_head(&mut io, &settings, &activity, first).await {
            Head::Request(head) => head,
            Head::Http2 => return Ended::Http2(io, std::mem::take(&mut conn.buf)),
            Head::End => return Ended::Closed,
            Head::Refused(status) => {
                refuse(&mut io, &mut conn.out, status).await;
                return Ended::Closed;
            }
        };
        first = false;
        if head.framing == BodyFraming::Chunked && !chunks_so_far_are_well_formed(&conn.buf) {
            tracing::debug!("request refused: malformed chunked body");
            refuse(&mut io, &mut conn.out, StatusCode::BAD_REQUEST).await;
            return Ended::Closed;
        }
        match conn.exchange(&mut io, head, &mut service, &activity).await {
            After::KeepAlive if !activity.close_asked() => {}
            After::KeepAlive | After::Close => {
                let _ = shutdown(&mut io).await;
                return Ended::Closed;
            }
            After::Upgraded(upgrade) => {
                let upgraded = RewoundClient::new(io, conn.buf.split().freeze());
                // The proxy's side dropped its end: the tunnel was given up.
                let _ = upgrade.send(upgraded);
                return Ended::Closed;
            }
            After::Gone => return Ended::Closed,
        }
        // A waiting connection keeps no buffer; bytes of a pipelined request stay.
        if conn.buf.is_empty() {
            conn.buf = BytesMut::new();
        }
        if conn.out.capacity() > 1024 {
            conn.out = Vec::new();
        }
    }
}

// The head is moved once per request; boxing it would cost an allocation.
#[allow(clippy::large_enum_variant)]
enum Head {
    Request(RequestHead),
    Http2,
    /// The client closed, or the proxy asked a connection with no request to close.
    End,
    Refused(StatusCode),
}

/// What the connection does after an exchange.
enum After {
    KeepAlive,
    Close,
    /// The response was a 101: the connection is the tunnel's.
    Upgraded(tokio::sync::oneshot::Sender<RewoundClient>),
    /// The client left or the connection failed: nothing more to write.
    Gone,
}

struct Conn {
    buf: BytesMut,
    out: Vec<u8>,
    registered: Option<Waker>,
}

impl Conn {
    /// Waits for the next request head, bounded by `header_read_timeout`
    /// from its first byte (from now for a connection's first request).
    async fn read_head(
        &mut self,
        io: &mut ClientIo,
        settings: &Http1Settings,
        activity: &Activity,
        first: bool,
    ) -> Head {
        let mut timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
        if first || !self.buf.is_empty() {
            timer = Some(Box::pin(tokio::time::sleep(settings.header_read_timeout)));
        }
        std::future::poll_fn(|cx| loop {
            if self.buf.is_empty() {
                // Registered before the flag is read: a close asked in between still wakes us.
                if !self.registered.as_ref().is_some_and(|waker| waker.will_wake(cx.waker())) {
                    activity.register(cx.waker());
                    self.registered = Some(cx.waker().clone());
                }
                if activity.close_asked() {
                    return Poll::Ready(Head::End);
                }
            } else {
                if first && self.buf.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(&self.buf) {
                    // Not yet told apart from the HTTP/2 preface.
                } else if first && self.buf.starts_with(H2_PREFACE) {
                    return Poll::Ready(Head::Http2);
                } else {
                    match parse_request_head(&mut self.buf, settings.max_header_bytes) {
                        Ok(Some(head)) => return Poll::Ready(Head::Request(head)),
                        Ok(None) => {}
                        Err(refused) => {
                            tracing::debug!(%refused, "request refused");
                            return Poll::Ready(Head::Refused(refused.status()));
                        }
                    }
                }
            }
            if let Some(timer) = timer.as_mut() {
                if timer.as_mut().poll(cx).is_ready() {
                    tracing::debug!("request head not received within header_read_timeout; closing");
                    return Poll::Ready(Head::End);
                }
            }
            let was_empty = self.buf.is_empty();
            match ready!(poll_read_head(io, &mut self.buf, cx)) {
                Ok(0) | Err(_) => return Poll::Ready(Head::End),
                Ok(_) if was_empty && timer.is_none() => {
                    timer = Some(Box::pin(tokio::time::sleep(settings.header_read_timeout)));
                }
                Ok(_) => {}
            }
        })
        .await
    }

    /// One request and its response. What lives across its waits is kept
    /// small (`Started`, the writer, the body): the future is part of the
    /// connection's task, and so is its size while the connection waits.
    async fn exchange(
        &mut self,
        io: &mut ClientIo,
        head: RequestHead,
        service: &mut ForConnection,
        activity: &Activity,
    ) -> After {
        let mut started = start(head, service);

        // Until the response head: the stack works, the body is fed when
        // asked, and a client that leaves cancels the request.
        let response = std::future::poll_fn(|cx| {
            started.feed(io, &mut self.buf, cx);
            if let Poll::Ready(Ok(response)) = started.future.as_mut().poll(cx) {
                return Poll::Ready(Some(response));
            }
            if started.feeding.is_none() && !started.body_broken && self.buf.len() < HEAD_READ {
                // Watch for the client leaving (and keep any pipelined bytes).
                if let Poll::Ready(Ok(0) | Err(_)) = poll_read_head(io, &mut self.buf, cx) {
                    return Poll::Ready(None);
                }
            }
            Poll::Pending
        })
        .await;
        let Some(response) = response else {
            tracing::debug!("the client closed its connection before the response");
            return After::Gone;
        };
        let (mut writer, mut body) = started.respond(response, activity, &mut self.out);
        if writer.framing == ResponseFraming::Upgrade {
            if write_all(io, &self.out).await.is_err() {
                return After::Gone;
            }
            // The tunnel starts where the request ended: a body still being
            // read would reach the backend raw, after frames re-encoded.
            return match started.upgrade.take() {
                Some(upgrade) if started.method != Method::HEAD && started.body_complete => After::Upgraded(upgrade),
                _ => After::Close,
            };
        }

        // The body, while the request body goes on being fed if the backend
        // still reads it (a response may start before the request ends).
        if let Some(feeding) = started.feeding.as_mut() {
            // A final response is on its way: no 100 Continue after it, but
            // one partly written is finished before it.
            if let Some(written) = feeding.continue_owed.take().filter(|&written| written > 0) {
                self.out.splice(0..0, CONTINUE[written..].iter().copied());
            }
        }
        let written = std::future::poll_fn(|cx| {
            started.feed(io, &mut self.buf, cx);
            if let Poll::Ready(written) = writer.poll_write(io, &mut self.out, &mut body, cx) {
                return Poll::Ready(Some(written));
            }
            // A client that leaves while its response waits for the backend
            // ends the exchange now, not at the backend's next byte: the
            // backend's slot is freed with it.
            if started.feeding.is_none() && self.buf.len() < HEAD_READ {
                if let Poll::Ready(Ok(0) | Err(_)) = poll_read_head(io, &mut self.buf, cx) {
                    return Poll::Ready(None);
                }
            }
            Poll::Pending
        })
        .await;
        match written {
            Some(Ok(())) => {}
            Some(Err(error)) => {
                tracing::debug!(%error, "response not completed");
                return After::Gone;
            }
            None => {
                tracing::debug!("the client closed its connection during the response");
                return After::Gone;
            }
        }
        // Unread body bytes must never be read as a request.
        if writer.keep_alive && started.body_complete {
            After::KeepAlive
        } else {
            After::Close
        }
    }
}

/// A request handed to the stack, and what its exchange goes on with.
struct Started {
    future: Pin<Box<StackFuture>>,
    feeding: Option<Feeding>,
    upgrade: Option<tokio::sync::oneshot::Sender<RewoundClient>>,
    method: Method,
    http11: bool,
    keep_alive: bool,
    body_complete: bool,
    body_broken: bool,
}

type StackFuture = <ForConnection as tower::Service<http::Request<ClientRequestBody>>>::Future;

/// Makes the request from its head, with its body and upgrade, and calls the stack.
fn start(head: RequestHead, service: &mut ForConnection) -> Started {
    let RequestHead { request, framing, keep_alive, expect_continue, wants_upgrade } = head;
    let method = request.method().clone();
    let http11 = request.version() == http::Version::HTTP_11;
    let continue_owed = expect_continue.then_some(0);
    let (body, feeding) = match framing {
        BodyFraming::Empty => (ClientRequestBody::Empty, None),
        BodyFraming::Length(length) => {
            let (body, feeder) = FedBody::new(Some(length));
            let feeding = Feeding { feeder, decoding: Decoding::Length(length), continue_owed };
            (ClientRequestBody::Http1(body), Some(feeding))
        }
        BodyFraming::Chunked => {
            let (body, feeder) = FedBody::new(None);
            let feeding = Feeding { feeder, decoding: Decoding::Chunked(ChunkedDecoder::default()), continue_owed };
            (ClientRequestBody::Http1(body), Some(feeding))
        }
    };
    let mut request = request.map(|()| body);
    let upgrade = wants_upgrade.then(|| {
        let (sender, receiver) = tokio::sync::oneshot::channel();
        request.extensions_mut().insert(ClientUpgrade::new(receiver));
        sender
    });
    let body_complete = feeding.is_none();
    Started {
        // Boxed (about 300 bytes, from the allocator's thread cache): a
        // connection that waits for its next request has no room for it.
        future: Box::pin(tower::Service::call(service, request)),
        feeding,
        upgrade,
        method,
        http11,
        keep_alive,
        body_complete,
        body_broken: false,
    }
}

impl Started {
    /// Feeds the request body if it is being read and asked for.
    fn feed(&mut self, io: &mut ClientIo, buf: &mut BytesMut, cx: &mut Context<'_>) {
        let Some(feeding) = self.feeding.as_mut() else { return };
        match feeding.poll_feed(io, buf, cx) {
            Poll::Ready(Fed::Complete) => {
                self.body_complete = true;
                self.feeding = None;
            }
            Poll::Ready(Fed::Abandoned) => self.feeding = None,
            Poll::Ready(Fed::Broken) => {
                self.body_broken = true;
                self.feeding = None;
            }
            Poll::Pending => {}
        }
    }

    /// Writes the response head into `out`; the writer of its body, and the body.
    fn respond(
        &mut self,
        response: http::Response<ActivityBody>,
        activity: &Activity,
        out: &mut Vec<u8>,
    ) -> (BodyWriter, ActivityBody) {
        let (mut parts, body) = response.into_parts();
        if parts.status.is_informational() && parts.status != StatusCode::SWITCHING_PROTOCOLS {
            // Not a final response: the client would wait for another head.
            tracing::warn!(status = %parts.status, "an interim status as a final response; answering 502");
            parts.status = StatusCode::BAD_GATEWAY;
            self.keep_alive = false;
        }
        let length = match body.size_hint().exact() {
            Some(length) => BodyLength::Known(length),
            None if body.is_end_stream() => BodyLength::Known(0),
            None => BodyLength::Unknown,
        };
        // A body abandoned unread closes the connection after this response:
        // say so in its head, so that a pipelining client knows.
        let body_unread = self.feeding.is_none() && !self.body_complete;
        let keep_alive = self.keep_alive && !activity.close_asked() && !self.body_broken && !body_unread;
        out.clear();
        let answering = Answering { method: &self.method, http11: self.http11, keep_alive };
        let (framing, keep_alive) =
            response::encode_response_head(out, parts.status, &parts.headers, length, answering);
        let left = match framing {
            ResponseFraming::Length(length) => length,
            _ => 0,
        };
        let writer =
            BodyWriter { framing, keep_alive, left, data: Bytes::new(), tail: &[], head_written: 0, done: false };
        (writer, body)
    }
}

/// Whether the chunked body bytes that arrived with the head decode. A body
/// is streamed to the backend as it arrives, so a malformed chunk that comes
/// later ends a request the backend has started on (and it sees a request
/// cut short, never a second one); one already here is refused before any
/// backend sees the request, as hyper's server refused it.
fn chunks_so_far_are_well_formed(buf: &BytesMut) -> bool {
    if buf.is_empty() {
        return true;
    }
    let mut probe = buf.clone();
    let mut decoder = ChunkedDecoder::default();
    loop {
        match decoder.decode(&mut probe) {
            Ok(Chunk::Data(_) | Chunk::Trailers(_)) => {}
            Ok(Chunk::End | Chunk::Incomplete) => return true,
            Err(_) => return false,
        }
    }
}

/// The request body as it is read from the client.
struct Feeding {
    feeder: BodyFeeder,
    decoding: Decoding,
    /// A 100 Continue is owed before the first read of the body: how much
    /// of it is written.
    continue_owed: Option<usize>,
}

enum Decoding {
    /// Bytes still to come.
    Length(u64),
    Chunked(ChunkedDecoder),
}

enum Fed {
    Complete,
    /// The body was dropped before its end.
    Abandoned,
    /// The client sent something that is not the body it announced, or left.
    Broken,
}

impl Feeding {
    fn poll_feed(&mut self, io: &mut ClientIo, buf: &mut BytesMut, cx: &mut Context<'_>) -> Poll<Fed> {
        loop {
            match self.feeder.demand(cx) {
                Demand::Abandoned => return Poll::Ready(Fed::Abandoned),
                Demand::Nothing => return Poll::Pending,
                Demand::Frame => {}
            }
            if let Some(written) = self.continue_owed.as_mut() {
                // Unless the client sent its body without waiting for it.
                if buf.is_empty() {
                    if let Err(error) = ready!(poll_write_all(io, CONTINUE, written, cx)) {
                        return Poll::Ready(self.broken(&format!("writing 100 Continue failed: {error}")));
                    }
                }
                self.continue_owed = None;
            }
            match &mut self.decoding {
                Decoding::Length(0) => {
                    self.feeder.finish(None);
                    return Poll::Ready(Fed::Complete);
                }
                Decoding::Length(left) if !buf.is_empty() => {
                    let take = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
                    *left -= take as u64;
                    self.feeder.send(Frame::data(buf.split_to(take).freeze()));
                    if *left == 0 {
                        // Ended with its last frame: a holder that knows the
                        // length (the body says so) does not ask again.
                        self.feeder.finish(None);
                        return Poll::Ready(Fed::Complete);
                    }
                    continue;
                }
                Decoding::Length(_) => {}
                Decoding::Chunked(decoder) => match decoder.decode(buf) {
                    Ok(Chunk::Data(data)) => {
                        self.feeder.send(Frame::data(data));
                        continue;
                    }
                    Ok(Chunk::Trailers(trailers)) => {
                        self.feeder.send(Frame::trailers(trailers));
                        continue;
                    }
                    Ok(Chunk::End) => {
                        self.feeder.finish(None);
                        return Poll::Ready(Fed::Complete);
                    }
                    Ok(Chunk::Incomplete) => {}
                    Err(error) => return Poll::Ready(self.broken(&format!("malformed chunked body: {error}"))),
                },
            }
            match ready!(poll_read_body(io, buf, cx)) {
                Ok(0) => return Poll::Ready(self.broken("the client closed its connection mid-body")),
                Ok(_) => {}
                Err(error) => return Poll::Ready(self.broken(&format!("reading the body failed: {error}"))),
            }
        }
    }

    fn broken(&self, why: &str) -> Fed {
        self.feeder.finish(Some(why.to_owned().into()));
        Fed::Broken
    }
}

/// The response body on its way out, framed.
struct BodyWriter {
    framing: ResponseFraming,
    /// The connection stays open after this response, as its head says.
    keep_alive: bool,
    /// Bytes still owed under a `Content-Length`.
    left: u64,
    /// The frame being written, after `out` (the head or a chunk's prefix).
    data: Bytes,
    /// Written after `data`: a chunk's CRLF.
    tail: &'static [u8],
    /// How much of `out` is written.
    head_written: usize,
    done: bool,
}

impl BodyWriter {
    /// Writes `out` (the head), then each frame of `body`, then the end. A
    /// frame that is already there goes out in the same write as what
    /// precedes it (the head and the first frame of a small response leave
    /// in one system call and, most often, one segment).
    fn poll_write(
        &mut self,
        io: &mut ClientIo,
        out: &mut Vec<u8>,
        body: &mut ActivityBody,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            if !self.done && self.data.is_empty() && self.tail.is_empty() {
                if self.framing == ResponseFraming::Empty {
                    self.done = true;
                } else {
                    match Pin::new(&mut *body).poll_frame(cx) {
                        Poll::Ready(frame) => {
                            self.take_frame(frame, out)?;
                            continue;
                        }
                        Poll::Pending if self.head_written == out.len() => {
                            // Nothing queued: what was written reaches the client while the body waits.
                            ready!(Pin::new(&mut *io).poll_flush(cx))?;
                            return Poll::Pending;
                        }
                        Poll::Pending => {}
                    }
                }
            }
            while self.head_written < out.len() || !self.data.is_empty() || !self.tail.is_empty() {
                let slices = [
                    std::io::IoSlice::new(&out[self.head_written..]),
                    std::io::IoSlice::new(&self.data),
                    std::io::IoSlice::new(self.tail),
                ];
                let mut written = ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices))?;
                if written == 0 {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                let from_out = written.min(out.len() - self.head_written);
                self.head_written += from_out;
                written -= from_out;
                let from_data = written.min(self.data.len());
                self.data.advance(from_data);
                written -= from_data;
                self.tail = &self.tail[written..];
            }
            out.clear();
            self.head_written = 0;
            if self.done {
                return Pin::new(&mut *io).poll_flush(cx);
            }
        }
    }

    /// Queues a frame of the body (or its end) behind what `out` holds.
    fn take_frame(
        &mut self,
        frame: Option<Result<Frame<Bytes>, crate::body::BoxError>>,
        out: &mut Vec<u8>,
    ) -> std::io::Result<()> {
        match frame {
            None => {
                if self.left > 0 {
                    return Err(std::io::Error::other("the response body ended before its length"));
                }
                if self.framing == ResponseFraming::Chunked {
                    out.extend_from_slice(b"0\r\n\r\n");
                }
                self.done = true;
            }
            Some(Err(error)) => return Err(std::io::Error::other(error)),
            Some(Ok(frame)) => {
                // Trailers are not forwarded over HTTP/1.1: no response announces them.
                let Ok(data) = frame.into_data() else { return Ok(()) };
                if data.is_empty() {
                    return Ok(());
                }
                match self.framing {
                    ResponseFraming::Length(_) => {
                        if data.len() as u64 > self.left {
                            return Err(std::io::Error::other("the response body is longer than its length"));
                        }
                        self.left -= data.len() as u64;
                    }
                    ResponseFraming::Chunked => {
                        chunk_prefix(data.len(), out);
                        self.tail = b"\r\n";
                    }
                    _ => {}
                }
                self.data = data;
            }
        }
        Ok(())
    }
}

/// Reads into `buf` for a head. An empty buffer reads through the stack, so
/// that a connection waiting for its next request holds no buffer until bytes
/// arrive, and then only as many as arrived.
fn poll_read_head(io: &mut ClientIo, buf: &mut BytesMut, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
    if buf.is_empty() {
        let mut scratch = [std::mem::MaybeUninit::<u8>::uninit(); HEAD_READ];
        let mut read = ReadBuf::uninit(&mut scratch);
        ready!(Pin::new(&mut *io).poll_read(cx, &mut read))?;
        let filled = read.filled();
        if !filled.is_empty() {
            // Room for the rest of a head that did not arrive whole.
            buf.reserve(filled.len().max(1024));
            buf.extend_from_slice(filled);
        }
        return Poll::Ready(Ok(filled.len()));
    }
    buf.reserve(HEAD_READ);
    tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, buf)
}

/// Reads body bytes into `buf`, in reads of up to `MAX_BODY_READ`.
fn poll_read_body(io: &mut ClientIo, buf: &mut BytesMut, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(if buf.capacity() >= MAX_BODY_READ { MAX_BODY_READ } else { 8 * 1024 });
    }
    tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, buf)
}

fn poll_write_all(
    io: &mut ClientIo,
    bytes: &[u8],
    written: &mut usize,
    cx: &mut Context<'_>,
) -> Poll<std::io::Result<()>> {
    while *written < bytes.len() {
        let n = ready!(Pin::new(&mut *io).poll_write(cx, &bytes[*written..]))?;
        if n == 0 {
            return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
        }
        *written += n;
    }
    Pin::new(&mut *io).poll_flush(cx)
}

async fn write_all(io: &mut ClientIo, bytes: &[u8]) -> std::io::Result<()> {
    let mut written = 0;
    std::future::poll_fn(|cx| poll_write_all(io, bytes, &mut written, cx)).await
}

/// Answers a request the listener refused itself, and ends the connection.
async fn refuse(io: &mut ClientIo, out: &mut Vec<u8>, status: StatusCode) {
    out.clear();
    response::refusal(out, status);
    let _ = write_all(io, out).await;
    let _ = shutdown(io).await;
}

async fn shutdown(io: &mut ClientIo) -> std::io::Result<()> {
    std::future::poll_fn(|cx| Pin::new(&mut *io).poll_shutdown(cx)).await
}
