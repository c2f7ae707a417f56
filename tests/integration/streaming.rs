//! Streaming: large bodies both ways in bounded memory, and WebSocket upgrades.

use std::sync::atomic::Ordering;

use futures::{SinkExt, StreamExt};
use http::Request;
use http_body_util::BodyExt;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

const HUNDRED_MIB: u64 = 100 * 1024 * 1024;

#[tokio::test]
async fn hundred_mib_up_and_down_stream_through_in_bounded_memory() {
    let backend = Backend::start("big").await;
    let yaml = format!(
        "listeners: [{{ bind: \"127.0.0.1:{{port}}\" }}]\nlog: {{ level: error }}\nlimits: {{ max_body_bytes: 209715200 }}\nroutes: [{{ upstream: pool }}]\nupstreams:\n  pool:\n    backends: [{{ address: \"{}\" }}]\n",
        backend.addr
    );
    let proxy = ProxyProcess::start(&yaml).await;
    let client = client();
    // Warm up: connections, pools and allocator arenas exist before measuring.
    for _ in 0..20 {
        assert_eq!(get(&client, &proxy.url("/")).await.status, 200);
    }
    let small = Request::post(proxy.url("/")).body(streaming_body(4 * 1024 * 1024)).unwrap();
    assert_eq!(send(&client, small).await.status, 200);
    let baseline = proxy.memory_kib("VmRSS");
    proxy.reset_peak();

    let upload = Request::post(proxy.url("/upload")).body(streaming_body(HUNDRED_MIB)).unwrap();
    let answer = send(&client, upload).await;
    assert_eq!(answer.status, 200);
    assert_eq!(backend.stats.bytes_received.load(Ordering::SeqCst), HUNDRED_MIB + 4 * 1024 * 1024);

    let response = client
        .request(Request::get(proxy.url(&format!("/download?bytes={HUNDRED_MIB}"))).body(full("")).unwrap())
        .await
        .unwrap();
    let mut body = response.into_body();
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        received += frame.unwrap().data_ref().map_or(0, |d| d.len() as u64);
    }
    assert_eq!(received, HUNDRED_MIB);

    let peak = proxy.memory_kib("VmHWM");
    let growth_mib = peak.saturating_sub(baseline) as f64 / 1024.0;
    eprintln!("proxy RSS baseline {baseline} KiB, peak during 2 x 100 MiB {peak} KiB, growth {growth_mib:.1} MiB");
    assert!(growth_mib < 8.0, "proxy memory grew by {growth_mib:.1} MiB while streaming");
}

#[tokio::test]
async fn websocket_echo_passes_through_the_upgrade() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut socket = tokio_tungstenite::accept_async(stream).await.unwrap();
                while let Some(Ok(message)) = socket.next().await {
                    if message.is_text() || message.is_binary() {
                        socket.send(message).await.unwrap();
                    }
                }
            });
        }
    });
    let yaml = format!(
        "listeners: [{{ bind: \"127.0.0.1:0\" }}]\nroutes: [{{ upstream: ws }}]\nupstreams:\n  ws:\n    backends: [{{ address: \"{backend_addr}\" }}]\n"
    );
    let proxy = start_proxy(&yaml).await;
    let (mut socket, response) =
        tokio_tungstenite::connect_async(format!("ws://{}/echo", proxy.addr)).await.expect("upgrade through the proxy");
    assert_eq!(response.status(), 101);
    for i in 0..50 {
        let text = format!("message {i}");
        socket.send(Message::text(text.clone())).await.unwrap();
        let echoed = socket.next().await.unwrap().unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), text);
    }
    let blob = vec![7u8; 1 << 20];
    socket.send(Message::binary(blob.clone())).await.unwrap();
    assert_eq!(socket.next().await.unwrap().unwrap().into_data().as_ref(), &blob[..]);
    socket.close(None).await.unwrap();
}
