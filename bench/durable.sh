#!/usr/bin/env bash
# bench/durable.sh: durable notices (SPEC section 8, issue 10), plain PUBLISH
# beside FCALL pushwire_publish in one run, and the reconnect storm.
#
#   bench/durable.sh                 # everything, RUNS=3 of each
#   ONLY="targeted" bench/durable.sh # only the targeted comparison (or: max, storm)
#   RUNS=5 USERS=10000 bench/durable.sh
#
# Each bench invocation gets a fresh private redis-server (no persistence) and
# fresh node(s) on free loopback ports; nothing leaves 127.0.0.1 and the shared
# Redis on 6379 is never touched. Plain and durable runs alternate (P, D, P,
# D, ...) so that both see the same machine. Node CPU comes from
# /proc/<node pid>, Redis CPU from /proc/<redis pid>.
#
#   targeted: USERS users, one connection each, 2000/s and 10000/s for SECS s,
#             plain (no since, PUBLISH) and durable (since=, FCALL)
#   max:      the same, --max from 5000/s (x1.5, then bisect), p99 < 10 ms
#   storm:    USERS durable clients on node A, one notice each, kill -9 A,
#             5 missed per user, all back to node B at once with their last
#             id; 1000 other users on B get LIVE_RATES notices/s meanwhile
#
# JSON lines in bench/raw/durable-<date>.jsonl; medians printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
USERS=${USERS:-10000}
SECS=${SECS:-5}
WORKERS=${WORKERS:-2}
ONLY=${ONLY:-"targeted max storm"}
LIVE_RATES=${LIVE_RATES:-"1000 5000"}
TARGET=${CARGO_TARGET_DIR:-target}
BENCH=$TARGET/release/pushwire-bench
NODE=$TARGET/release/pushwire
[ -x "$BENCH" ] && [ -x "$NODE" ] || cargo build --release --workspace
mkdir -p bench/raw
OUT=${OUT:-bench/raw/durable-$(date -u +%Y%m%dT%H%M).jsonl}
PW=durable-only-pw
BENCH_TAG=durable
# shellcheck source=bench/lib.sh
. bench/lib.sh
ulimit -n "$(ulimit -Hn)"

# A fresh redis-server: sets REDIS and RPID.
fresh_redis() {
    start_redis
    RPID=${PIDS[-1]}
}

# A node on free ports: sets NPORT, NADMIN, NPID.
start_node() {
    NPORT=$(free_port) NADMIN=$(free_port)
    "$NODE" --listen "127.0.0.1:$NPORT" --admin-listen "127.0.0.1:$NADMIN" --redis "$REDIS" \
        --jwt-secret bench --workers "$WORKERS" --log-level warn "$@" 2>>"$TMP/node.log" &
    NPID=$!
    PIDS+=("$NPID")
    for _ in $(seq 1 100); do
        curl -fs "http://127.0.0.1:$NADMIN/readyz" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "node did not get ready" >&2
    return 1
}

stop_all() {
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && wait "$p" 2>/dev/null || true; done
    PIDS=()
}

# one LABEL scenario-args...: a fresh Redis and node, one bench run.
one() {
    local label=$1
    shift
    fresh_redis
    start_node
    "$BENCH" "$@" --url "ws://127.0.0.1:$NPORT/ws" --server-pid "$NPID" --redis-pid "$RPID" \
        --admin "http://127.0.0.1:$NADMIN" --redis "$REDIS" --json --label "$label" \
        2>"$TMP/bench.log" | tail -1 | sed "s#$PW#***#g" >>"$OUT" || tail -5 "$TMP/bench.log" >&2
    stop_all
}

echo "bench: $BENCH; node: $NODE ($(git rev-parse --short HEAD)); $(nproc) cores; load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
for run in $(seq 1 "$RUNS"); do
    case " $ONLY " in *" targeted "*)
        for rate in 2000 10000; do
            one "plain-$rate-$run" targeted --connections "$USERS" --rate "$rate" --seconds "$SECS"
            one "durable-$rate-$run" targeted --connections "$USERS" --rate "$rate" --seconds "$SECS" --durable
        done ;;
    esac
    case " $ONLY " in *" max "*)
        one "plain-max-$run" targeted --connections "$USERS" --rate 5000 --max --seconds 3
        one "durable-max-$run" targeted --connections "$USERS" --rate 5000 --max --seconds 3 --durable ;;
    esac
    case " $ONLY " in *" storm "*)
        for live in $LIVE_RATES; do
            fresh_redis
            start_node
            A=$NPORT APID=$NPID
            start_node
            "$BENCH" storm --connections "$USERS" --missed 5 --live-users 1000 --live-rate "$live" \
                --seconds 3 --url "ws://127.0.0.1:$A/ws" --url "ws://127.0.0.1:$NPORT/ws" \
                --kill-pid "$APID" --server-pid "$NPID" --redis-pid "$RPID" --redis "$REDIS" \
                --json --label "storm-$live-$run" 2>"$TMP/bench.log" | tail -1 | sed "s#$PW#***#g" >>"$OUT" ||
                tail -5 "$TMP/bench.log" >&2
            # Node B's own account of drops and cuts during the storm.
            curl -s "http://127.0.0.1:$NADMIN/metrics" |
                grep -E '^pushwire_(notices_dropped|slow_consumer_closed|messages_delivered|recoveries)' |
                sed "s/^/  storm-$live-$run node B: /" >&2 || true
            stop_all
        done ;;
    esac
done

jq -rs '
  def med: map(select(. != null)) | sort | if length == 0 then null else .[(length / 2 | floor)] end;
  def show(f): [.[] | f] as $v | "\($v | med) \($v)";
  group_by(.label | sub("-[0-9]+$"; "")) | .[] |
  (.[0].label | sub("-[0-9]+$"; "")) as $case |
  if .[0].scenario == "storm" then
    "\($case): recovered \(show(.recovered)); last recovered ms \(show(.last_recovered_ms)); exactly once in order \([.[].exactly_once_in_order])",
    "  redis CPU % during recovery \(show(.recovery_redis_cpu_pct)); node B CPU % \(show(.recovery_node_b_cpu_pct)); redis used_memory max during storm \(show(.redis_used_memory_storm_max)) (before \(show(.redis_used_memory_before)))",
    "  live p99 ms before \(show(.live_before.latency.p99_ms)); during \(show(.live_during.latency.p99_ms)) n \(show(.live_during.latency.n)); lost during \(show(.live_during.lost))"
  elif (.[0].steps // null) != null then
    "\($case): max rate \(show(.max_rate)); p99 there \(show(.max_rate_p99_ms))"
  else
    "\($case): p99 ms \(show(.latency.p99_ms)); p50 \(show(.latency.p50_ms)); lost \(show(.lost)); out of order \(show(.out_of_order)); node us/notice \(show(.server_cpu_us_per_notice)); redis us/notice \(show(.redis_cpu_us_per_notice)); achieved \(show(.achieved_rate))"
  end
' "$OUT"
echo "JSON lines: $OUT" >&2
