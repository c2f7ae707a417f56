# One bot server, registered with the local Consul agent. Consul's DNS
# interface lists it in `_robot._tcp.service.consul` while its check passes;
# `weights` become the SRV record's weight, which Switchyard uses.
service {
  name = "robot"
  port = 8270
  weights {
    passing = 10
    warning = 1
  }
  check {
    http     = "http://127.0.0.1:8270/healthz"
    interval = "5s"
    timeout  = "1s"
  }
}
