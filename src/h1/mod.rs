//! HTTP/1.x messages as the listeners read and write them, without I/O: a
//! client's request head parsed and judged (`request`), and the head of the
//! response written back with its body's framing (`response`). The I/O, the
//! connection's life and the body in both directions are `server::http1`'s;
//! chunked bodies are read with the backend client's decoder
//! (`client::http1::codec`), the one reading of chunks in the proxy.

pub mod request;
pub mod response;
