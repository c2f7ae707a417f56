//! A real gRPC service (tonic's standard health service) through the proxy over
//! h2c: unary and server-streaming calls, with grpc-status trailers intact.

use std::time::Duration;

use tokio_stream::wrappers::TcpListenerStream;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::support::*;

#[tokio::test]
async fn grpc_unary_and_streaming_calls_pass_through_with_trailers() {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter.set_service_status("bots.Runner", tonic_health::ServingStatus::Serving).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder().add_service(service).serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let yaml = format!(
        "listeners: [{{ bind: \"127.0.0.1:0\" }}]\nroutes: [{{ upstream: grpc }}]\nupstreams:\n  grpc:\n    protocol: h2c\n    backends: [{{ address: \"{backend_addr}\" }}]\n"
    );
    let proxy = start_proxy(&yaml).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", proxy.addr))
        .unwrap()
        .connect()
        .await
        .expect("h2c connection to the proxy");
    exercise_health_calls(channel, &reporter).await;
}

/// Unary (success and an error carried only in trailers) and server-streaming
/// calls of tonic's health service through `channel`, with `reporter` driving
/// the stream.
pub async fn exercise_health_calls(
    channel: tonic::transport::Channel,
    reporter: &tonic_health::server::HealthReporter,
) {
    let mut client = HealthClient::new(channel);

    // Unary, success: the status comes in the grpc-status trailer.
    let answer = client.check(HealthCheckRequest { service: "bots.Runner".into() }).await.expect("check succeeds");
    assert_eq!(answer.into_inner().status, ServingStatus::Serving as i32);

    // Unary, error: NOT_FOUND travels only in trailers, so this proves they pass.
    let error = client.check(HealthCheckRequest { service: "no.Such".into() }).await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::NotFound);

    // Server streaming: updates arrive as the backend publishes them.
    let mut updates = client.watch(HealthCheckRequest { service: "bots.Runner".into() }).await.unwrap().into_inner();
    let first = updates.message().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);
    reporter.set_service_status("bots.Runner", tonic_health::ServingStatus::NotServing).await;
    let second = tokio::time::timeout(Duration::from_secs(10), updates.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(second.status, ServingStatus::NotServing as i32);
    reporter.set_service_status("bots.Runner", tonic_health::ServingStatus::Serving).await;
    let third = tokio::time::timeout(Duration::from_secs(10), updates.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(third.status, ServingStatus::Serving as i32);
}
