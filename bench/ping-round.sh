#!/usr/bin/env bash
# bench/ping-round.sh: does the server's ping round stall deliveries?
#
# 10000 connections opened at once (a reconnect storm, as after a deploy)
# all come due for their ping in the same tick --ping-interval (25 s)
# later. 9000 of them sit in one bench process that only answers pings;
# the other 1000 are in a second bench process that receives targeted
# notices at 2000/s and measures latency, so the measuring process itself
# answers only 1000 pings (about 10 ms of its own work). A 20 s window ends
# before the ping round; a 40 s window contains it. RUNS runs of each, a
# fresh node per run; results go to bench/raw/i-ping-round-*.jsonl and
# bench/results.md (via run.sh render).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
RUNS=${RUNS:-3}
RAW=$ROOT/bench/raw
PW=b3nch-only-pw
mkdir -p "$RAW"
BENCH_TAG=ping
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

cargo build --release --workspace
cp target/release/pushwire target/release/pushwire-bench "$TMP/"
BUILD="git $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src Cargo.toml Cargo.lock || echo '+uncommitted changes'), pushwire sha256 $(sha256sum "$TMP/pushwire" | cut -c1-12)"
ulimit -n "$(ulimit -Hn)"

start_redis

F='latency p50 (ms)=.latency.p50_ms
latency p99 (ms)=.latency.p99_ms
latency p99.9 (ms)=.latency.p999_ms
latency max (ms)=.latency.max_ms
pings answered by the measuring process=.pings
delivered=.delivered
lost=.lost
whole machine busy %=.publish_machine_busy_pct'

for secs in 20 40; do
    id=i-ping-round-${secs}s
    data=$RAW/$id.jsonl
    : >"$data"
    load="load average $(cut -d' ' -f1-3 /proc/loadavg) before the runs; $(date -u '+%H:%M UTC'); $BUILD"
    for _ in $(seq 1 "$RUNS"); do
        port=$(free_port)
        admin=$(free_port)
        "$TMP/pushwire" --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" --redis "$REDIS" \
            --jwt-secret bench --workers 2 --log-level warn >/dev/null 2>&1 &
        node=$!
        PIDS+=("$node")
        for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$admin/readyz" >/dev/null && break; sleep 0.05; done
        "$TMP/pushwire-bench" idle --url "ws://127.0.0.1:$port/ws" --connections 9000 --connect-rate 0 \
            --seconds $((secs + 8)) --user-offset 100000 >/dev/null 2>&1 &
        idle=$!
        "$TMP/pushwire-bench" targeted --url "ws://127.0.0.1:$port/ws" --connections 1000 --connect-rate 0 \
            --rate 2000 --seconds "$secs" --redis "$REDIS" --server-pid "$node" --json --label "$id" 2>/dev/null |
            sed "s#$PW#***#g; s#$TMP/#target/release/#g" | tail -1 >>"$data"
        wait "$idle" || true
        kill "$node"
        wait "$node" 2>/dev/null || true
        sleep 1
    done
    {
        echo "ping round: 10000 connections opened at once (9000 idle in one bench process + 1000 measured), targeted 2000/s for $secs s ($([ $secs = 20 ] && echo 'ends before the first ping round' || echo 'contains the ping round at about 25 s'))"
        echo "target/release/pushwire --listen 127.0.0.1:PORT --admin-listen 127.0.0.1:ADMIN --redis redis://:***@127.0.0.1:REDIS --jwt-secret bench --workers 2 --log-level warn; the 9000 idle connections: pushwire-bench idle --connections 9000 --connect-rate 0 --seconds $((secs + 8)) --user-offset 100000 (see bench/ping-round.sh)"
        echo "$load"
        printf '%s\n' "$F"
    } >"$RAW/$id.meta"
done
bench/run.sh render
