#!/usr/bin/env bash
# bench/sigterm.sh: time from SIGTERM to exit with 1000 connected clients
# (release build, --dev, 3 runs). Each client gets close 1001 first.
set -u
cd "$(dirname "$0")/.."
[ -x target/release/pushwire-bench ] || cargo build --release --workspace
ulimit -n "$(ulimit -Hn)"
BENCH_TAG=sigterm
# shellcheck source=bench/lib.sh
. bench/lib.sh
for run in 1 2 3; do
  P=$(free_port)
  A=$(free_port)
  target/release/pushwire --dev --listen 127.0.0.1:$P --admin-listen 127.0.0.1:$A --log-level warn 2>/dev/null &
  node=$!
  sleep 0.3
  target/release/pushwire-bench idle --auth query --connections 1000 --seconds 20 --url ws://127.0.0.1:$P/ws --json >/dev/null 2>&1 &
  bench=$!
  for _ in $(seq 1 100); do
    n=$(curl -s http://127.0.0.1:$A/metrics | awk '/^pushwire_connections /{print $2}')
    [ "${n:-0}" = 1000 ] && break
    sleep 0.1
  done
  t0=$(date +%s%N)
  kill -TERM $node
  wait $node; rc=$?
  t1=$(date +%s%N)
  echo "run $run: $n connected, exit $rc after $(( (t1 - t0) / 1000000 )) ms"
  kill $bench 2>/dev/null; wait $bench 2>/dev/null
done
exit 0
