#!/usr/bin/env bash
# bench/failover.sh: failover under load (issue 11), beside bench/faults.sh.
# A master, a replica and three Sentinels of the script's own on loopback
# (down-after-milliseconds 1000, failover-timeout 10000, as in
# tests/integration/sentinel.rs), two nodes on the redis+sentinel:// URL,
# pushwire-bench targeted: CONNS clients over the two nodes, RATE notices/s
# for SECS s published to whichever Redis the Sentinels name master
# (--redis-sentinel), the fault FAULT_AT s after publishing begins:
#   failover  SENTINEL FAILOVER (forced)
#   kill      SIGKILL of the master
# plain (PUBLISH) and --durable (FCALL pushwire_publish), RUNS runs each; a
# fresh cluster per run. Per run: the longest pause in deliveries at the
# clients (time until delivery resumes), notices lost (published and
# acknowledged by Redis, never delivered), refused (the publish failed: the
# publisher knows), client reconnects (bench-side dropped connections and
# the nodes' pushwire_connections_accepted_total after the connect phase).
# JSON lines in bench/raw/failover-<date>.jsonl. Nothing leaves 127.0.0.1.
set -uo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
CONNS=${CONNS:-10000}
RATE=${RATE:-1000}
SECS=${SECS:-15}
FAULT_AT=${FAULT_AT:-5}
FAULTS=${FAULTS:-"failover kill"}
MODES=${MODES:-"plain durable"}
EXTRA=${EXTRA:-}   # more pushwire-bench options, e.g. "--drain 10"
TARGET=${CARGO_TARGET_DIR:-target}
BENCH=$TARGET/release/pushwire-bench
NODE=$TARGET/release/pushwire
[ -x "$BENCH" ] && [ -x "$NODE" ] || cargo build --release --workspace
mkdir -p bench/raw
OUT=${OUT:-bench/raw/failover-$(date -u +%Y%m%dT%H%M).jsonl}
NAME=fomaster
BENCH_TAG=failover
# shellcheck source=bench/lib.sh
. bench/lib.sh
ulimit -n "$(ulimit -Hn)"

metric() { curl -s "http://127.0.0.1:$1/metrics" | awk -v m="$2" '$1==m{print $2}'; }
wait_for() { # tries cmd...: 0.1 s apart
    local n=$1; shift
    for _ in $(seq 1 "$n"); do "$@" && return 0; sleep 0.1; done
    return 1
}
stop_all() {
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && wait "$p" 2>/dev/null || true; done
    PIDS=()
}

# Sets MP (master port), MPID, RP, SP1..3, SURL.
cluster() {
    local d=$TMP/c; rm -rf "$d"; mkdir -p "$d"
    MP=$(free_port); RP=$(free_port)
    redis-server --port "$MP" --bind 127.0.0.1 --save '' --appendonly no --dir "$d" --dbfilename m.rdb >/dev/null 2>&1 &
    MPID=$!; PIDS+=("$MPID")
    wait_for 50 redis-cli -p "$MP" PING >/dev/null
    redis-server --port "$RP" --bind 127.0.0.1 --save '' --appendonly no --dir "$d" --dbfilename r.rdb --replicaof 127.0.0.1 "$MP" >/dev/null 2>&1 &
    PIDS+=($!)
    wait_for 100 sh -c "redis-cli -p $RP INFO replication | grep -q master_link_status:up"
    SP=()
    for i in 1 2 3; do
        local p; p=$(free_port); SP+=("$p")
        printf 'port %s\nbind 127.0.0.1\ndir %s\nsentinel monitor %s 127.0.0.1 %s 2\nsentinel down-after-milliseconds %s 1000\nsentinel failover-timeout %s 10000\nsentinel parallel-syncs %s 1\n' \
            "$p" "$d" "$NAME" "$MP" "$NAME" "$NAME" "$NAME" >"$d/s$i.conf"
        redis-server "$d/s$i.conf" --sentinel >/dev/null 2>&1 &
        PIDS+=($!)
    done
    SURL="127.0.0.1:${SP[0]},127.0.0.1:${SP[1]},127.0.0.1:${SP[2]}/$NAME"
    settled() {
        for p in "${SP[@]}"; do
            redis-cli -p "$p" SENTINEL CKQUORUM "$NAME" 2>/dev/null | grep -q '3 usable' || return 1
            redis-cli -p "$p" SENTINEL REPLICAS "$NAME" 2>/dev/null | grep -q "^$RP\$" || return 1
        done
    }
    wait_for 300 settled || { echo "Sentinels did not settle" >&2; return 1; }
}

# Sets NP[i], NA[i].
nodes() {
    NP=(); NA=()
    for i in 0 1; do
        NP+=("$(free_port)"); NA+=("$(free_port)")
        "$NODE" --listen "127.0.0.1:${NP[$i]}" --admin-listen "127.0.0.1:${NA[$i]}" \
            --redis "redis+sentinel://127.0.0.1:${SP[0]},127.0.0.1:${SP[1]},127.0.0.1:${SP[2]}/$NAME" \
            --jwt-secret bench --log-level "${NODE_LOG_LEVEL:-warn}" 2>>"${LOGDIR:-$TMP}/node$i.log" &
        PIDS+=($!)
    done
    for i in 0 1; do
        wait_for 150 curl -fs "http://127.0.0.1:${NA[$i]}/readyz" -o /dev/null || { echo "node $i not ready" >&2; return 1; }
    done
}

one() { # FAULT MODE RUN
    local fault=$1 mode=$2 run=$3 flag=""
    [ "$mode" = durable ] && flag=--durable
    cluster && nodes || { stop_all; return 1; }
    "$BENCH" targeted --connections "$CONNS" --rate "$RATE" --seconds "$SECS" \
        --url "ws://127.0.0.1:${NP[0]}/ws" --url "ws://127.0.0.1:${NP[1]}/ws" \
        --redis-sentinel "$SURL" $flag $EXTRA --json --label "failover-$fault-$mode-$run" \
        >"$TMP/out.json" 2>"$TMP/bench.log" &
    local bench=$!
    local half=$((CONNS / 2))
    both() { [ "$(metric "${NA[0]}" pushwire_connections)" = "$half" ] && [ "$(metric "${NA[1]}" pushwire_connections)" = "$half" ]; }
    wait_for 300 both || echo "not all connected" >&2
    local acc0 acc1
    acc0=$(metric "${NA[0]}" pushwire_connections_accepted_total)
    acc1=$(metric "${NA[1]}" pushwire_connections_accepted_total)
    sleep "$FAULT_AT"
    case $fault in
        failover) redis-cli -p "${SP[0]}" SENTINEL FAILOVER "$NAME" >/dev/null ;;
        kill) kill -9 "$MPID" ;;
    esac
    wait "$bench"
    local re0 re1
    re0=$(( $(metric "${NA[0]}" pushwire_connections_accepted_total) - acc0 ))
    re1=$(( $(metric "${NA[1]}" pushwire_connections_accepted_total) - acc1 ))
    # The nodes' side of a durable loss: recoveries that could not prove
    # their history complete answer recovered:false.
    local rok=0 rmiss=0
    for a in "${NA[@]}"; do
        rok=$((rok + $(metric "$a" 'pushwire_recoveries_total{result="recovered"}')))
        rmiss=$((rmiss + $(metric "$a" 'pushwire_recoveries_total{result="missed"}')))
    done
    jq -c --arg f "$fault" --arg m "$mode" --argjson r "$run" --argjson acc "$((re0 + re1))" \
        --argjson rok "$rok" --argjson rmiss "$rmiss" \
        '. + {fault: $f, mode: $m, run: $r, node_accepted_after_connect: $acc, node_recoveries: {recovered: $rok, missed: $rmiss}}' "$TMP/out.json" >>"$OUT" \
        || tail -5 "$TMP/bench.log" >&2
    jq -r '"\(.label): gap \(.max_delivery_gap_ms) ms (ended \(.max_delivery_gap_end_s) s), sent \(.sent), delivered \(.delivered), lost \(.lost), refused \(.refused), dup \(.duplicated), out of order \(.out_of_order), dropped \(.dropped_connections), accepted after connect \(.node_accepted_after_connect), switches \(.master_switches), node recoveries \(.node_recoveries), status frames \(.status_recovered // 0)/\(.status_missed // 0), lost users \(.lost_users // 0), lost seqs \(.lost_seq_ranges // [] | .[:12])"' <(tail -1 "$OUT")
    stop_all
}

for fault in $FAULTS; do
    for mode in $MODES; do
        for run in $(seq 1 "$RUNS"); do
            one "$fault" "$mode" "$run"
        done
    done
done
echo "medians (JSON lines in $OUT):"
jq -rs 'group_by(.fault + " " + .mode)[] | . as $g
  | def med(f): ([$g[] | f] | sort | .[(length - 1) / 2 | floor]);
  "\($g[0].fault) \($g[0].mode): runs \($g | length), gap \(med(.max_delivery_gap_ms)) ms, lost \(med(.lost)), refused \(med(.refused)), dropped \(med(.dropped_connections)), accepted after connect \(med(.node_accepted_after_connect))"' "$OUT"
