//! A real DNS server on loopback for the discovery tests: hickory-server's
//! UDP and TCP server, answering from records the test changes while the proxy
//! runs. It can also answer SERVFAIL, and be stopped outright.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_server::proto::op::{Metadata, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA, SRV};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use hickory_server::Server;

/// One SRV record: priority, weight, port, target name.
#[derive(Clone, Debug)]
pub struct Srv {
    pub priority: u16,
    pub weight: u16,
    pub port: u16,
    pub target: &'static str,
}

#[derive(Default)]
struct Zone {
    addresses: HashMap<Name, Vec<IpAddr>>,
    services: HashMap<Name, Vec<Srv>>,
    /// Answer every query with SERVFAIL.
    failing: bool,
    ttl: u32,
    /// Glue A records for SRV targets in the additional section.
    glue: bool,
    /// How long each answer takes.
    delay: Duration,
}

struct Handler {
    zone: Arc<Mutex<Zone>>,
    queries: Arc<Mutex<HashMap<Name, Vec<Instant>>>>,
}

pub struct DnsServer {
    pub addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    /// When each query for each name arrived.
    queries: Arc<Mutex<HashMap<Name, Vec<Instant>>>>,
    server: Option<Server<Handler>>,
}

fn name(text: &str) -> Name {
    let mut name = Name::from_ascii(text).unwrap();
    name.set_fqdn(true);
    name
}

impl DnsServer {
    /// Starts on an ephemeral UDP port, with TCP on the same port.
    pub async fn start() -> DnsServer {
        let (udp, tcp) = loop {
            let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            if let Ok(tcp) = tokio::net::TcpListener::bind(udp.local_addr().unwrap()).await {
                break (udp, tcp);
            }
        };
        let addr = udp.local_addr().unwrap();
        let zone = Arc::new(Mutex::new(Zone { glue: true, ..Zone::default() }));
        let queries = Arc::new(Mutex::new(HashMap::new()));
        let handler = Handler { zone: Arc::clone(&zone), queries: Arc::clone(&queries) };
        let mut server = Server::new(handler);
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(5), 65_535);
        DnsServer { addr, zone, queries, server: Some(server) }
    }

    /// `resolver:` for the proxy's config.
    pub fn resolver_yaml(&self) -> String {
        format!("resolver: {{ servers: [\"{}\"] }}\n", self.addr)
    }

    pub fn set_addresses(&self, host: &str, ips: &[IpAddr]) {
        self.zone.lock().unwrap().addresses.insert(name(host), ips.to_vec());
    }

    pub fn remove(&self, host: &str) {
        let mut zone = self.zone.lock().unwrap();
        zone.addresses.remove(&name(host));
        zone.services.remove(&name(host));
    }

    pub fn set_services(&self, service: &str, records: &[Srv]) {
        self.zone.lock().unwrap().services.insert(name(service), records.to_vec());
    }

    pub fn set_failing(&self, failing: bool) {
        self.zone.lock().unwrap().failing = failing;
    }

    /// Answers only after `delay`, as a slow or distant server would.
    pub fn set_delay(&self, delay: Duration) {
        self.zone.lock().unwrap().delay = delay;
    }

    pub fn set_ttl(&self, ttl: u32) {
        self.zone.lock().unwrap().ttl = ttl;
    }

    /// Leave SRV targets out of the additional section, so that the client
    /// must look each one up.
    pub fn set_glue(&self, glue: bool) {
        self.zone.lock().unwrap().glue = glue;
    }

    /// Queries answered for `host` so far.
    pub fn queries_for(&self, host: &str) -> usize {
        self.query_times(host).len()
    }

    /// When each query for `host` arrived.
    pub fn query_times(&self, host: &str) -> Vec<Instant> {
        self.queries.lock().unwrap().get(&name(host)).cloned().unwrap_or_default()
    }

    /// Stops serving and closes its sockets: queries go unanswered.
    pub async fn stop(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.shutdown_gracefully().await;
        }
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: hickory_server::net::runtime::Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let Ok(info) = request.request_info() else {
            let response = MessageResponseBuilder::from_message_request(request)
                .error_msg(&request.metadata, ResponseCode::FormErr);
            return response_handle.send_response(response).await.unwrap();
        };
        let query_name: Name = info.query.name().into();
        let query_type = info.query.query_type();
        self.queries.lock().unwrap().entry(query_name.clone()).or_default().push(Instant::now());
        let delay = self.zone.lock().unwrap().delay;
        tokio::time::sleep(delay).await;

        let (code, answers, additionals) = {
            let zone = self.zone.lock().unwrap();
            let addresses = |host: &Name, of: RecordType| -> Vec<Record> {
                zone.addresses
                    .get(host)
                    .into_iter()
                    .flatten()
                    .filter_map(|ip| match (ip, of) {
                        (IpAddr::V4(v4), RecordType::A) => Some(RData::A(A(*v4))),
                        (IpAddr::V6(v6), RecordType::AAAA) => Some(RData::AAAA(AAAA(*v6))),
                        _ => None,
                    })
                    .map(|data| Record::from_rdata(host.clone(), zone.ttl, data))
                    .collect()
            };
            let known = zone.addresses.contains_key(&query_name) || zone.services.contains_key(&query_name);
            if zone.failing {
                (ResponseCode::ServFail, Vec::new(), Vec::new())
            } else if !known {
                (ResponseCode::NXDomain, Vec::new(), Vec::new())
            } else if query_type == RecordType::SRV {
                let records = zone.services.get(&query_name).cloned().unwrap_or_default();
                let answers = records
                    .iter()
                    .map(|srv| {
                        let data = SRV::new(srv.priority, srv.weight, srv.port, name(srv.target));
                        Record::from_rdata(query_name.clone(), zone.ttl, RData::SRV(data))
                    })
                    .collect();
                let glue = if zone.glue {
                    records.iter().flat_map(|srv| addresses(&name(srv.target), RecordType::A)).collect()
                } else {
                    Vec::new()
                };
                (ResponseCode::NoError, answers, glue)
            } else {
                (ResponseCode::NoError, addresses(&query_name, query_type), Vec::new())
            }
        };
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;
        metadata.response_code = code;
        let response = MessageResponseBuilder::from_message_request(request).build(
            metadata,
            answers.iter(),
            std::iter::empty(),
            std::iter::empty(),
            additionals.iter(),
        );
        match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(error) => panic!("the test DNS server could not answer: {error}"),
        }
    }
}
