#!/usr/bin/env bash
# bench/faults.sh: notices lost during Redis faults, with the default
# --canary-interval (2 s). pushwire-bench targeted, 1000 users at 1000/s for
# 12 s; the fault starts about 4 s in: none, CLIENT KILL TYPE pubsub, SIGSTOP
# for 2 s (shorter than the canary deadline), SIGSTOP for 6 s (longer).
# Private redis-server on a free port; nothing leaves 127.0.0.1.
set -u
cd "$(dirname "$0")/.."
[ -x target/release/pushwire-bench ] || cargo build --release --workspace
ulimit -n "$(ulimit -Hn)"
BENCH_TAG=faults
# shellcheck source=bench/lib.sh
. bench/lib.sh
for fault in none clientkill sigstop2 sigstop6; do
  RP=$(free_port)
  redis-server --port $RP --bind 127.0.0.1 --save '' --appendonly no >/dev/null 2>&1 &
  rpid=$!
  sleep 0.4
  P=$(free_port); A=$(free_port)
  target/release/pushwire --listen 127.0.0.1:$P --admin-listen 127.0.0.1:$A --redis redis://127.0.0.1:$RP --jwt-secret bench --log-level warn --resync-notice '{"resync":true}' 2>$TMP/fault-node.log &
  node=$!
  sleep 0.5
  target/release/pushwire-bench targeted --connections 1000 --rate 1000 --seconds 12 --url ws://127.0.0.1:$P/ws --redis redis://127.0.0.1:$RP --json 2>/dev/null > $TMP/fault-$fault.json &
  bench=$!
  # wait until the bench starts publishing (connections open)
  for _ in $(seq 1 100); do
    n=$(curl -s http://127.0.0.1:$A/metrics | awk '/^pushwire_connections /{print $2}')
    [ "${n:-0}" = 1000 ] && break; sleep 0.1; done
  sleep 4
  t0=$(date +%s%N)
  case $fault in
    clientkill) redis-cli -p $RP CLIENT KILL TYPE pubsub >/dev/null ;;
    sigstop2) kill -STOP $rpid; sleep 2; kill -CONT $rpid ;;
    sigstop6) kill -STOP $rpid; sleep 6; kill -CONT $rpid ;;
  esac
  # time until ready again
  for _ in $(seq 1 200); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:$A/readyz)" = 200 ] && break; sleep 0.05; done
  t1=$(date +%s%N)
  wait $bench
  m=$(curl -s http://127.0.0.1:$A/metrics)
  echo "$fault: ready $(( (t1-t0)/1000000 )) ms after the fault began; $(jq -c '{delivered, lost, duplicated, p99: .latency.p99_ms}' $TMP/fault-$fault.json); reconnects $(echo "$m" | awk '/^pushwire_redis_reconnects_total /{print $2}'), canary failures $(echo "$m" | awk '/^pushwire_redis_canary_failures_total /{print $2}'), resync sent $(echo "$m" | awk '/^pushwire_resync_notices_total /{print $2}')"
  kill $node; wait $node 2>/dev/null
  kill $rpid; wait $rpid 2>/dev/null
done
