#!/usr/bin/env bash
# Switchyard against HAProxy and nginx on this machine, configured alike:
# three backends (one nginx serving three ports), round robin, upstream
# keep-alive, access logs off, active health checks every 2 s where the proxy
# has them. Each target is driven by wrk (64 and 256 connections, HTTP/1.1)
# and h2load (h2c, 16 connections x 16 streams), targets interleaved round by
# round; the table gives medians, and each figure's ratio to HAProxy's in the
# same run. CPU time per request is the proxy's own (all its processes and
# threads, from /proc), not the load tool's or the backends'.
#
# Usage: benches/load/compare.sh            (ROUNDS=3 DURATION=10 by default)
#        ROUNDS=5 DURATION=15 benches/load/compare.sh
#        TARGETS="switchyard haproxy" benches/load/compare.sh
#        PERF=1 benches/load/compare.sh   (adds context switches and system calls
#                                          per request, every thread, from perf stat)
#        FEATURES=1 benches/load/compare.sh  (Switchyard alone, plain and with one
#                                          feature each: access log, retries, breaker,
#                                          least_loaded, consistent_hash, queue, allow
#                                          (an address list), rate_limit (keyed by client,
#                                          never reached), jwt (an RS256 token checked
#                                          against a JWKS file, the same token every request,
#                                          as a client sends it; every target's load then
#                                          carries that Authorization header), tracing
#                                          at a ratio of 0.01 and of 1 (the backends' nginx
#                                          takes the spans); c64)
#        TLS=1 benches/load/compare.sh      (TLS on the proxies' listeners: keep-alive c64,
#                                          HTTP/2 over TLS as h2c's load (tls-h2), and a new
#                                          connection and full handshake per request;
#                                          ECDSA P-256 certificate, TLS 1.3)
#        ALT_BIN=/path/to/switchyard TARGETS="switchyard switchyard@alt haproxy" ...
#                                         (`switchyard@alt` is the plain config run by
#                                          another build, e.g. other release settings)
#        SCENARIOS="c64 4k 64k" benches/load/compare.sh
#                                         (4k and 64k: c64 for 4 KiB and 64 KiB bodies,
#                                          where copies and buffer sizes matter)
#        IDLE=1 benches/load/compare.sh     (memory per idle keep-alive client: IDLE_CLIENTS=5000
#                                          clients each make one request and stay connected;
#                                          the proxy's RSS before, with them, per client, and
#                                          after they close; no load runs)
#        INSTRUCTIONS=1 ALT_BIN=... benches/load/compare.sh
#                                         (Switchyard builds only, under valgrind's
#                                          callgrind: user-space instructions per request
#                                          over N=20000 requests, HTTP/1.1 c16 and h2c;
#                                          repeatable to ~1%, for changes too small for
#                                          the timings' noise; CALLGRIND_KEEP=DIR keeps
#                                          the dumps there, for callgrind_annotate)
# Installs haproxy, nginx, wrk and h2load (Debian packages) when missing.
# Never run it beside a build or another benchmark.
set -euo pipefail
cd "$(dirname "$0")/../.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
FEATURES=${FEATURES:-0}
if [ "$FEATURES" = 1 ]; then
  TARGETS=${TARGETS:-"switchyard switchyard+access switchyard+retry switchyard+breaker switchyard+least_loaded switchyard+consistent_hash switchyard+queue switchyard+allow switchyard+rate_limit switchyard+jwt switchyard+tracing switchyard+tracing_all"}
  SCENARIOS=${SCENARIOS:-c64}
fi
TLS=${TLS:-0}
[ "$TLS" = 1 ] && SCENARIOS=${SCENARIOS:-"tls-c64 tls-h2 tls-new"}
INSTRUCTIONS=${INSTRUCTIONS:-0}
if [ "$INSTRUCTIONS" = 1 ]; then
  TARGETS=${TARGETS:-"switchyard${ALT_BIN:+ switchyard@alt}"}
  SCENARIOS=${SCENARIOS:-"c16 h2c"}
  REQUESTS=${REQUESTS:-20000}
fi
TARGETS=${TARGETS:-"haproxy nginx switchyard"}
SCENARIOS=${SCENARIOS:-"c64 c256 h2c"}

need=()
command -v haproxy >/dev/null || need+=(haproxy)
command -v nginx >/dev/null || need+=(nginx)
command -v wrk >/dev/null || need+=(wrk)
command -v h2load >/dev/null || need+=(nghttp2-client)
[ "$INSTRUCTIONS" = 1 ] && { command -v valgrind >/dev/null || need+=(valgrind); }
if [ ${#need[@]} -gt 0 ]; then
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  $sudo_cmd apt-get install -y -qq "${need[@]}" >/dev/null
fi

cargo build --release --locked -q
SWITCHYARD="$PWD/target/release/switchyard"

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pidfile in "$work"/*.pid; do [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 1 300); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "nothing listening on port $1" >&2
  exit 1
}

# --- backends: one nginx, three ports, a 64-byte body --------------------------
b1=$(free_port); b2=$(free_port); b3=$(free_port)
body=$(printf 'x%.0s' $(seq 1 63))
cat >"$work/backend.conf" <<EOF
worker_processes 1;
pid $work/backend.pid;
error_log $work/backend.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$b1 reuseport; listen 127.0.0.1:$b2 reuseport; listen 127.0.0.1:$b3 reuseport;
           location / { return 200 "$body\n"; }
           location = /4k { alias $work/4k.bin; }
           location = /64k { alias $work/64k.bin; }
           # The OTLP collector of the +tracing targets: takes every batch, keeps nothing.
           location = /v1/traces { return 200; } }
}
EOF
head -c 4096 /dev/urandom >"$work/4k.bin"
head -c 65536 /dev/urandom >"$work/64k.bin"
# nginx's workers run as another user: they must reach the files mktemp made private.
chmod o+x "$work"; chmod o+r "$work/4k.bin" "$work/64k.bin"
nginx -c "$work/backend.conf" -p "$work"
wait_port "$b1"; wait_port "$b2"; wait_port "$b3"

# --- the three proxies ------------------------------------------------------------
declare -A H1_PORT H2_PORT TLS_PORT
for target in $TARGETS; do H1_PORT[$target]=$(free_port); H2_PORT[$target]=$(free_port); TLS_PORT[$target]=$(free_port); done
# One certificate for every proxy's TLS listener.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=localhost \
  -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -keyout "$work/tls.key" -out "$work/tls.pem" 2>/dev/null
cat "$work/tls.pem" "$work/tls.key" >"$work/tls-combined.pem"

# A JWT route's key and token: RS256 (what most identity providers sign
# with), its public key as a JWKS file, one token every request carries.
LOAD_HEADERS=()
if [[ " $TARGETS " == *" switchyard+jwt "* ]]; then
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$work/jwt.key" 2>/dev/null
  python3 - "$work" <<'PY'
import base64, json, subprocess, sys, time
work = sys.argv[1]
b64 = lambda data: base64.urlsafe_b64encode(data).rstrip(b"=").decode()
modulus = subprocess.run(["openssl", "rsa", "-in", f"{work}/jwt.key", "-noout", "-modulus"],
                         capture_output=True, text=True, check=True).stdout.strip().split("=", 1)[1]
key = {"kty": "RSA", "kid": "bench", "alg": "RS256", "use": "sig", "n": b64(bytes.fromhex(modulus)), "e": "AQAB"}
json.dump({"keys": [key]}, open(f"{work}/jwks.json", "w"))
header = b64(json.dumps({"alg": "RS256", "typ": "JWT", "kid": "bench"}).encode())
claims = {"iss": "https://idp.bench", "aud": "bench", "sub": "load", "exp": int(time.time()) + 86400}
signed = f"{header}.{b64(json.dumps(claims).encode())}"
signature = subprocess.run(["openssl", "dgst", "-sha256", "-sign", f"{work}/jwt.key"],
                           input=signed.encode(), capture_output=True, check=True).stdout
open(f"{work}/jwt.token", "w").write(f"{signed}.{b64(signature)}")
PY
  LOAD_HEADERS=(-H "Authorization: Bearer $(cat "$work/jwt.token")")
fi

# Switchyard targets: `switchyard` is the plain config; `switchyard+FEATURE`
# adds one feature to it, to measure what each costs (FEATURES=1 runs them all).
switchyard_config() { # target
  local feature=${1#switchyard} access=false policy="{ policy: round_robin }" route="" upstream="" tls_listener="" tracing=""
  [ "$TLS" = 1 ] && tls_listener="  - { name: bench-tls, bind: \"127.0.0.1:${TLS_PORT[$1]}\", tls: { certificates: [{ cert: \"$work/tls.pem\", key: \"$work/tls.key\" }], alpn: [h2, http/1.1] } }"
  [ "$feature" = "@alt" ] && feature=""
  case $feature in
    "") ;;
    +access) access=true ;;
    +retry) route=", retry: { attempts: 3, per_try_timeout: 5s }" ;;
    +breaker) upstream="circuit_breaker: { consecutive_failures: 5, failure_rate: 0.5, min_requests: 20, window: 10s, open_for: 10s }" ;;
    +least_loaded) policy="{ policy: least_loaded }" ;;
    +consistent_hash) policy="{ policy: consistent_hash, key: path, bounded_load: 1.25 }" ;;
    +queue) upstream="queue: { max_waiting: 1000, timeout: 30s }" ;;
    +allow) route=", allow: [\"127.0.0.0/8\"], deny: [\"10.0.0.0/8\"]" ;;
    +rate_limit) route=", rate_limit: { requests: 1000000000, per: 1s }" ;;
    +jwt) route=", auth: { jwt: { jwks_file: \"$work/jwks.json\", issuers: [\"https://idp.bench\"], audiences: [bench], forward_claims: { sub: x-user } } }" ;;
    +tracing) tracing="tracing: { otlp_endpoint: \"http://127.0.0.1:$b1\", sample_ratio: 0.01 }" ;;
    +tracing_all) tracing="tracing: { otlp_endpoint: \"http://127.0.0.1:$b1\", sample_ratio: 1.0 }" ;;
    *) echo "unknown Switchyard feature: $feature" >&2; exit 2 ;;
  esac
  # Switchyard serves HTTP/1.1 and h2c on one port.
  H2_PORT[$1]=${H1_PORT[$1]}
  cat >"$work/$1.yaml" <<YAML
admin: { bind: "127.0.0.1:$(free_port)" }
log: { level: warn, access: $access }
$tracing
listeners:
  - { name: bench, bind: "127.0.0.1:${H1_PORT[$1]}" }
$tls_listener
routes: [{ name: all, upstream: pool$route }]
upstreams:
  pool:
    balance: $policy
    health: { active: { kind: http, path: /, interval: 2s, timeout: 1s } }
    $upstream
    backends:
      - { address: "127.0.0.1:$b1", max_concurrency: 100000 }
      - { address: "127.0.0.1:$b2", max_concurrency: 100000 }
      - { address: "127.0.0.1:$b3", max_concurrency: 100000 }
YAML
}
for target in $TARGETS; do
  case $target in switchyard*) switchyard_config "$target" ;; esac
done
if [[ " $TARGETS " == *" haproxy "* ]]; then
  cat >"$work/haproxy.cfg" <<EOF
global
  nbthread 2
  maxconn 8000
  pidfile $work/haproxy.pid
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  http-reuse always
frontend web
  bind 127.0.0.1:${H1_PORT[haproxy]}
  bind 127.0.0.1:${H2_PORT[haproxy]} proto h2
$([ "$TLS" = 1 ] && echo "  bind 127.0.0.1:${TLS_PORT[haproxy]} ssl crt $work/tls-combined.pem alpn h2,http/1.1")
  default_backend pool
backend pool
  balance roundrobin
  option httpchk GET /
  server b1 127.0.0.1:$b1 check inter 2s
  server b2 127.0.0.1:$b2 check inter 2s
  server b3 127.0.0.1:$b3 check inter 2s
EOF
fi
if [[ " $TARGETS " == *" nginx "* ]]; then
  cat >"$work/nginx.conf" <<EOF
worker_processes 2;
pid $work/nginx.pid;
error_log $work/nginx.err warn;
events { worker_connections 20000; }
http {
  access_log off;
  keepalive_requests 1000000;
  upstream pool { server 127.0.0.1:$b1; server 127.0.0.1:$b2; server 127.0.0.1:$b3; keepalive 256; }
  server {
    listen 127.0.0.1:${H1_PORT[nginx]};
    listen 127.0.0.1:${H2_PORT[nginx]} http2;
$([ "$TLS" = 1 ] && printf '    listen 127.0.0.1:%s ssl http2;\n    ssl_certificate %s;\n    ssl_certificate_key %s;' "${TLS_PORT[nginx]}" "$work/tls.pem" "$work/tls.key")
    location / { proxy_pass http://pool; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
EOF
fi

start_target() {
  local under=()
  [ "$INSTRUCTIONS" = 1 ] && under=(valgrind --tool=callgrind "--callgrind-out-file=$work/$1.callgrind")
  case $1 in
    # Logs (access lines with +access) go to a file, as an operator's would.
    switchyard@alt) "${under[@]}" "${ALT_BIN:?ALT_BIN names the other build}" run -c "$work/$1.yaml" 2>"$work/$1.log" & echo $! >"$work/$1.pid" ;;
    switchyard*) "${under[@]}" "$SWITCHYARD" run -c "$work/$1.yaml" 2>"$work/$1.log" & echo $! >"$work/$1.pid" ;;
    haproxy) haproxy -D -f "$work/haproxy.cfg" ;;
    nginx) nginx -c "$work/nginx.conf" -p "$work" ;;
  esac
  wait_port "${H1_PORT[$1]}"
  wait_port "${H2_PORT[$1]}"
  if [ "$TLS" = 1 ]; then wait_port "${TLS_PORT[$1]}"; fi
}

# Every process of a target: its main process and its children (nginx workers).
target_pids() {
  local main
  main=$(cat "$work/$1.pid")
  echo "$main" $(pgrep -P "$main" || true)
}
cpu_ticks() { # target [user]: utime + stime (or utime alone) of all its processes
  local total=0 fields='$12 + $13'
  [ "${2:-}" = user ] && fields='$12'
  for pid in $(target_pids "$1"); do
    # utime and stime: fields 14 and 15, counted after the command name.
    total=$((total + $(awk "{ sub(/^.*\\) /, \"\"); print $fields }" "/proc/$pid/stat")))
  done
  echo "$total"
}
peak_rss_kib() {
  local total=0
  for pid in $(target_pids "$1"); do
    total=$((total + $(awk '/^VmHWM/ { print $2 }' "/proc/$pid/status")))
  done
  echo "$total"
}

for target in $TARGETS; do start_target "$target"; done
sleep 1
ticks_per_second=$(getconf CLK_TCK)

if [ "$INSTRUCTIONS" = 1 ]; then
  # Counters zeroed, N requests, counters dumped: the dump holds those requests' instructions.
  instructions() { # target scenario
    local pid load
    pid=$(cat "$work/$1.pid")
    case $2 in
      c16) load=(h2load --h1 -c16) ;;
      h2c) load=(h2load -c16 -m16) ;;
      *) echo "INSTRUCTIONS=1 runs the c16 and h2c scenarios" >&2; exit 2 ;;
    esac
    "${load[@]}" "${LOAD_HEADERS[@]}" -n 2000 "http://127.0.0.1:${H1_PORT[$1]}/" >/dev/null
    callgrind_control -z "$pid" >/dev/null 2>&1
    "${load[@]}" "${LOAD_HEADERS[@]}" -n "$REQUESTS" "http://127.0.0.1:${H1_PORT[$1]}/" >"$work/out"
    callgrind_control -d "$pid" >/dev/null 2>&1
    local dump total
    dump=$(ls -t "$work/$1.callgrind".* | head -1)
    total=$(callgrind_annotate "$dump" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }')
    grep -q "$REQUESTS succeeded" "$work/out" || { echo "$1 $2: not every request succeeded" >&2; exit 1; }
    if [ -n "${CALLGRIND_KEEP:-}" ]; then cp "$dump" "$CALLGRIND_KEEP/$1-$2.callgrind"; fi
    echo "$((total / REQUESTS))"
  }
  echo "instructions per request (user space, callgrind), $REQUESTS requests each"
  echo "| target | scenario | instructions/request |"
  echo "|---|---|---|"
  for scenario in $SCENARIOS; do
    for target in $TARGETS; do echo "| $target | $scenario | $(instructions "$target" "$scenario") |"; done
  done
  exit 0
fi

IDLE=${IDLE:-0}
if [ "$IDLE" = 1 ]; then
  # Resident memory of all a target's processes now, in KiB.
  rss_kib() {
    local total=0
    for pid in $(target_pids "$1"); do
      total=$((total + $(awk '/^VmRSS/ { print $2 }' "/proc/$pid/status")))
    done
    echo "$total"
  }
  clients=${IDLE_CLIENTS:-5000}
  echo "memory per idle keep-alive client: $clients clients, one request each, then connected and silent"
  echo "| target | RSS before MiB | with the clients MiB | KiB per client | 5 s after they close MiB |"
  echo "|---|---|---|---|---|"
  for target in $TARGETS; do
    # A brief load first, as a proxy in service has had: pools and buffers at their size.
    wrk -t2 -c64 -d2s "http://127.0.0.1:${H1_PORT[$target]}/" >/dev/null
    sleep 1
    before=$(rss_kib "$target")
    coproc IDLE_CLIENTS_PROC { python3 benches/load/idle_clients.py "${H1_PORT[$target]}" "$clients"; }
    read -r ready <&"${IDLE_CLIENTS_PROC[0]}"
    [ "$ready" = ready ] || { echo "the idle clients did not connect: $ready" >&2; exit 1; }
    sleep 2
    held=$(rss_kib "$target")
    echo close >&"${IDLE_CLIENTS_PROC[1]}"
    wait "$IDLE_CLIENTS_PROC_PID"
    sleep 5
    after=$(rss_kib "$target")
    awk -v t="$target" -v b="$before" -v h="$held" -v a="$after" -v n="$clients" \
      'BEGIN { printf "| %s | %.1f | %.1f | %.1f | %.1f |\n", t, b / 1024, h / 1024, (h - b) / n, a / 1024 }'
  done
  exit 0
fi

# Warm-up: every target, every scenario, briefly.
for target in $TARGETS; do
  wrk -t2 -c64 -d2s "${LOAD_HEADERS[@]}" "http://127.0.0.1:${H1_PORT[$target]}/" >/dev/null
  [ "$TLS" = 1 ] && wrk -t2 -c64 -d1s "https://127.0.0.1:${TLS_PORT[$target]}/" >/dev/null
  h2load -c16 -m16 -D 2 "${LOAD_HEADERS[@]}" "http://127.0.0.1:${H2_PORT[$target]}/" >/dev/null
done

results="$work/results.tsv"
: >"$results"
PERF=${PERF:-0}
# perf stat over every thread of the target for the middle of a run: prints
# "context_switches syscalls seconds".
perf_window() {
  local seconds=$((DURATION > 4 ? DURATION - 2 : 1))
  sleep 1
  perf stat --per-thread -x, -e context-switches,raw_syscalls:sys_enter \
    -p "$(target_pids "$1" | tr ' ' ',')" -o "$work/perf.csv" -- sleep "$seconds" 2>/dev/null
  awk -F, -v s="$seconds" '$4 == "context-switches" { cs += $2 } $4 ~ /sys_enter/ { sc += $2 } END { print cs + 0, sc + 0, s }' "$work/perf.csv"
}

run() { # target scenario round
  local target=$1 scenario=$2 out="$work/out"
  local before after user_before user_after requests rps p50 p99 errors perf_pid=""
  if [ "$PERF" = 1 ]; then perf_window "$target" >"$work/perf.out" & perf_pid=$!; fi
  before=$(cpu_ticks "$target"); user_before=$(cpu_ticks "$target" user)
  case $scenario in
    c64 | c256 | 4k | 64k | tls-c64 | tls-new)
      case $scenario in
        c64 | c256) wrk -t2 "-${scenario}" -d"${DURATION}s" --latency "${LOAD_HEADERS[@]}" "http://127.0.0.1:${H1_PORT[$target]}/" >"$out" ;;
        4k | 64k) wrk -t2 -c64 -d"${DURATION}s" --latency "${LOAD_HEADERS[@]}" "http://127.0.0.1:${H1_PORT[$target]}/$scenario" >"$out" ;;
        tls-c64) wrk -t2 -c64 -d"${DURATION}s" --latency "https://127.0.0.1:${TLS_PORT[$target]}/" >"$out" ;;
        # A new connection, and a full handshake, for every request.
        tls-new) wrk -t2 -c16 -d"${DURATION}s" --latency -H "Connection: close" "https://127.0.0.1:${TLS_PORT[$target]}/" >"$out" ;;
      esac
      after=$(cpu_ticks "$target"); user_after=$(cpu_ticks "$target" user)
      requests=$(awk '/requests in/ { print $1 }' "$out")
      rps=$(awk '/^Requests\/sec/ { print $2 }' "$out")
      p50=$(awk '$1 == "50%" { print $2 }' "$out")
      p99=$(awk '$1 == "99%" { print $2 }' "$out")
      errors=$(awk '/Non-2xx/ { n += $NF } /Socket errors/ { gsub(",", ""); for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+$/) n += $i } END { print n + 0 }' "$out")
      ;;
    h2c | tls-h2)
      case $scenario in
        h2c) h2load -c16 -m16 -D "$DURATION" "${LOAD_HEADERS[@]}" "http://127.0.0.1:${H2_PORT[$target]}/" >"$out" ;;
        # HTTP/2 over TLS (ALPN h2), kept-alive connections as h2c's.
        tls-h2) h2load -c16 -m16 -D "$DURATION" "https://127.0.0.1:${TLS_PORT[$target]}/" >"$out" ;;
      esac
      after=$(cpu_ticks "$target"); user_after=$(cpu_ticks "$target" user)
      requests=$(awk '/^requests:/ { print $8 }' "$out")
      rps=$(awk '/^finished in/ { gsub(",", ""); print $4 }' "$out")
      p50=$(awk '/^time for request:/ { print $6 }' "$out")   # h2load gives the mean, not p50
      p99="-"
      errors=$(awk '/^requests:/ { print $10 + $12 }' "$out")
      ;;
  esac
  local switches="-" syscalls="-"
  if [ -n "$perf_pid" ]; then
    wait "$perf_pid"
    read -r cs sc seconds <"$work/perf.out"
    # Per request, at the run's average rate.
    switches=$(awk -v c="$cs" -v s="$seconds" -v r="$rps" 'BEGIN { printf "%.3f", c / (s * r) }')
    syscalls=$(awk -v c="$sc" -v s="$seconds" -v r="$rps" 'BEGIN { printf "%.2f", c / (s * r) }')
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$target" "$scenario" "$3" "$rps" "$p50" "$p99" "$errors" \
    "$((after - before))" "$requests" "$switches" "$syscalls" "$((user_after - user_before))" >>"$results"
  printf '  round %s %-5s %-11s %10s req/s  p50 %-9s p99 %-9s errors %s\n' "$3" "$scenario" "$target" "$rps" "$p50" "$p99" "$errors"
}

echo "targets: $TARGETS; $ROUNDS rounds of ${DURATION}s per scenario; $(nproc) cores"
for round in $(seq 1 "$ROUNDS"); do
  for scenario in $SCENARIOS; do
    for target in $TARGETS; do run "$target" "$scenario" "$round"; done
  done
done

for target in $TARGETS; do echo -e "$target\tpeak_rss_kib\t$(peak_rss_kib "$target")" >>"$work/rss.tsv"; done
python3 - "$results" "$work/rss.tsv" "$ticks_per_second" <<'EOF'
import statistics, sys
from collections import defaultdict

rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1]) if line.strip()]
rss = {line.split("\t")[0]: int(line.split("\t")[2]) for line in open(sys.argv[2]) if line.strip()}
ticks = int(sys.argv[3])

def millis(text):
    if text in ("-", ""):
        return None
    for unit, scale in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    return float(text)

cells = defaultdict(list)
def number(text):
    return None if text == "-" else float(text)

for target, scenario, _round, rps, p50, p99, errors, cpu, requests, switches, syscalls, user in rows:
    cpu_us = int(cpu) * 1e6 / ticks / max(int(requests), 1)
    user_us = int(user) * 1e6 / ticks / max(int(requests), 1)
    cells[(target, scenario)].append(
        (float(rps), millis(p50), millis(p99), int(errors), cpu_us, number(switches), number(syscalls), user_us))

targets = list(dict.fromkeys(r[0] for r in rows))
scenarios = list(dict.fromkeys(r[1] for r in rows))
def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None

summary = {key: [median(column) for column in zip(*runs)] for key, runs in cells.items()}
reference = "haproxy" if "haproxy" in targets else targets[0]
def ratio(value, base):
    return f" ({value / base:.2f}x)" if value is not None and base else ""
print()
print(f"medians of {len(rows) // max(len(cells), 1)} rounds; ratio to {reference} in the same run")
print("| target | scenario | req/s | p50 ms | p99 ms | errors | CPU us/req | of which user | ctx switches/req | syscalls/req | peak RSS MiB |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for target in targets:
    for scenario in scenarios:
        rps, p50, p99, errors, cpu, switches, syscalls, user = summary[(target, scenario)]
        base = summary.get((reference, scenario))
        fmt = lambda v, digits: "-" if v is None else f"{v:.{digits}f}"
        print(f"| {target} | {scenario} | {rps:,.0f}{ratio(rps, base[0])} | {fmt(p50, 2)}{ratio(p50, base[1])} "
              f"| {fmt(p99, 2)}{ratio(p99, base[2])} | {errors:.0f} | {cpu:.1f}{ratio(cpu, base[4])} "
              f"| {user:.1f}{ratio(user, base[7])} "
              f"| {fmt(switches, 3)} | {fmt(syscalls, 2)} "
              f"| {rss[target] / 1024:.1f}{ratio(rss[target], rss.get(reference))} |")
print("(h2c p50 is h2load's mean time per request; h2load gives no percentiles)")
EOF
