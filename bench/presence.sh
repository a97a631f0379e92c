#!/usr/bin/env bash
# bench/presence.sh: same-run A/B of the connect storm with and without
# Redis presence (issue 12), plus the Redis commands issued per connection.
#
#   bench/presence.sh OLD_BINARY NEW_BINARY [connect options...]
#   RUNS=5 bench/presence.sh /tmp/pbench-old-target/release/pushwire \
#       /tmp/pbench-target/release/pushwire --connections 19000
#
# Like ab.sh (A, B, A, B, ..., a fresh node per run, --redis on one private
# redis-server, --jwt-secret bench, JWT clients), but always the `connect`
# scenario with --barrier, so that Redis's INFO commandstats (sum of calls,
# minus this script's own INFO and AUTH) is read three times: before the
# storm (node ready), when all clients are open (+1 s for the presence
# writer to flush) and after the bench closed them (+1 s). Prints per run
# handshakes/s and commands per connection for the connect and the close
# phase, the medians, B/A and B's commands by name. commandstats also
# counts the commands run inside an FCALL, so the FCALL count is given
# apart: the round trips the node makes. JSON lines (bench's
# plus redis_connect/redis_close/redis_by_cmd fields) go to
# bench/raw/presence-<date>.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
A=$(realpath "$1") B=$(realpath "$2")
shift 2
RUNS=${RUNS:-5}
WORKERS=${WORKERS:-2}
BENCH=${BENCH:-target/release/pushwire-bench}
[ -x "$BENCH" ] || cargo build --release -p pushwire-bench
OUT=bench/raw/presence-$(date -u +%Y%m%dT%H%M).jsonl
PW=presence-only-pw
BENCH_TAG=presence
# shellcheck source=bench/lib.sh
. bench/lib.sh
ulimit -n "$(ulimit -Hn)"
start_redis
RPORT=${REDIS##*:}
# commandstats as {"cmd": calls}, without this script's own INFO/AUTH.
stats() {
    redis-cli -p "$RPORT" --no-auth-warning -a "$PW" INFO commandstats | tr -d '\r' \
        | sed -n 's/^cmdstat_\([^:]*\):calls=\([0-9]*\).*/\1 \2/p' \
        | grep -Ev '^(info|auth) ' \
        | jq -Rn '[inputs | split(" ") | {(.[0]): (.[1] | tonumber)}] | add // {}'
}
diff_sum() { jq -n --argjson a "$1" --argjson b "$2" '[$b | to_entries[] | .value - ($a[.key] // 0)] | add // 0'; }
diff_by() { jq -cn --argjson a "$1" --argjson b "$2" '$b | with_entries(.value -= ($a[.key] // 0)) | with_entries(select(.value != 0))'; }
echo "A: $A (sha256 $(sha256sum "$A" | cut -c1-12))" >&2
echo "B: $B (sha256 $(sha256sum "$B" | cut -c1-12))" >&2
echo "bench: $BENCH connect $*; $(nproc) cores; load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
for run in $(seq 1 "$RUNS"); do
    for side in A B; do
        bin=$A
        [ $side = B ] && bin=$B
        port=$(free_port) admin=$(free_port) bar=$TMP/bar-$side-$run
        "$bin" --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" --redis "$REDIS" \
            --jwt-secret bench --workers "$WORKERS" --log-level warn 2>"$TMP/node.log" &
        node=$!
        for _ in $(seq 1 100); do
            curl -fs "http://127.0.0.1:$admin/readyz" >/dev/null 2>&1 && break
            sleep 0.1
        done
        sleep 1
        s0=$(stats)
        "$BENCH" connect "$@" --auth jwt --secret bench --url "ws://127.0.0.1:$port/ws" \
            --server-pid "$node" --admin "http://127.0.0.1:$admin" --barrier "$bar" \
            --json --label "presence-$side-$run" 2>"$TMP/bench.log" >"$TMP/bench.json" &
        bench=$!
        while ! ls "$bar"/ready.* >/dev/null 2>&1; do
            kill -0 "$bench" 2>/dev/null || break
            sleep 0.05
        done
        sleep 1
        s1=$(stats)
        touch "$bar/go"
        wait "$bench" || true
        sleep 1
        s2=$(stats)
        n=$(jq -r .open "$TMP/bench.json" 2>/dev/null || echo 0)
        jq -c --argjson c "$(diff_sum "$s0" "$s1")" --argjson d "$(diff_sum "$s1" "$s2")" \
            --argjson byc "$(diff_by "$s0" "$s1")" --argjson byd "$(diff_by "$s1" "$s2")" \
            '. + {redis_connect: $c, redis_close: $d, redis_connect_by_cmd: $byc, redis_close_by_cmd: $byd,
                  redis_per_conn_connect: (if .open > 0 then $c / .open else null end),
                  redis_per_conn_close: (if .open > 0 then $d / .open else null end)}' \
            "$TMP/bench.json" | sed "s#$PW#***#g" >>"$OUT" || echo "run $side-$run: no JSON (open=$n)" >&2
        kill "$node" && wait "$node" || true
    done
done
jq -rs '
  def med: sort | if length == 0 then null else .[(length / 2 | floor)] end;
  def r2: . * 100 | round / 100;
  (map(select(.label | startswith("presence-A")))) as $a |
  (map(select(.label | startswith("presence-B")))) as $b |
  (["connect_per_s", "open", "failed", "connect_time.p50_ms", "connect_time.p99_ms", "redis_connect", "redis_close",
    "redis_per_conn_connect", "redis_per_conn_close"][] as $f | ($f | split(".")) as $p |
   [$a[] | getpath($p)] as $av | [$b[] | getpath($p)] as $bv |
   "\($f): A \($av) median \($av | med); B \($bv) median \($bv | med); B/A \(if ($av|med) == null or ($av|med) == 0 then "-" else (($bv|med) / ($av|med)) | r2 end)"),
  "B FCALLs (round trips) connect: \([$b[] | .redis_connect_by_cmd.fcall // 0]) median \([$b[] | .redis_connect_by_cmd.fcall // 0] | med); close: \([$b[] | .redis_close_by_cmd.fcall // 0]) median \([$b[] | .redis_close_by_cmd.fcall // 0] | med)",
  "B connect by command (each run): \([$b[] | .redis_connect_by_cmd])",
  "B close by command (each run): \([$b[] | .redis_close_by_cmd])",
  "A connect+close by command (each run): \([$a[] | [.redis_connect_by_cmd, .redis_close_by_cmd]])"
' "$OUT"
echo "JSON lines: $OUT" >&2
