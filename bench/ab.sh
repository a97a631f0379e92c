#!/usr/bin/env bash
# bench/ab.sh: same-run A/B of two pushwire binaries on one bench scenario.
#
#   bench/ab.sh OLD_BINARY NEW_BINARY [bench scenario and options...]
#   RUNS=5 bench/ab.sh /tmp/pushwire-old target/release/pushwire broadcast --connections 10000 --messages 100
#
# Runs A, B, A, B, ... (RUNS of each, a fresh node per run, one private
# redis-server on a free loopback port) and prints, for a few headline
# fields of the bench's JSON line, every run, the medians and B/A. The
# JSON lines are kept in bench/raw/ab-<date>.jsonl. With LIMIT set to the
# bench's `limit` arguments, each round also runs the bare writer (L), and
# the summary gives B/L, e.g.
#   LIMIT="limit --connections 10000 --messages 100 --batch 100" bench/ab.sh A B broadcast --connections 10000 --messages 100
set -euo pipefail
cd "$(dirname "$0")/.."
A=$(realpath "$1") B=$(realpath "$2")
shift 2
RUNS=${RUNS:-5}
WORKERS=${WORKERS:-2}
BENCH=${BENCH:-target/release/pushwire-bench}
[ -x "$BENCH" ] || cargo build --release -p pushwire-bench
OUT=bench/raw/ab-$(date -u +%Y%m%dT%H%M).jsonl
PW=ab-only-pw
BENCH_TAG=ab
# shellcheck source=bench/lib.sh
. bench/lib.sh
ulimit -n "$(ulimit -Hn)"
start_redis
echo "A: $A (sha256 $(sha256sum "$A" | cut -c1-12))" >&2
echo "B: $B (sha256 $(sha256sum "$B" | cut -c1-12))" >&2
echo "bench: $BENCH $*; $(nproc) cores; load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
for run in $(seq 1 "$RUNS"); do
    for side in A B; do
        bin=$A
        [ $side = B ] && bin=$B
        port=$(free_port) admin=$(free_port)
        "$bin" --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" --redis "$REDIS" \
            --jwt-secret bench --workers "$WORKERS" --log-level warn 2>"$TMP/node.log" &
        node=$!
        for _ in $(seq 1 100); do
            curl -fs "http://127.0.0.1:$admin/readyz" >/dev/null 2>&1 && break
            sleep 0.1
        done
        "$BENCH" "$@" --url "ws://127.0.0.1:$port/ws" --server-pid "$node" \
            --admin "http://127.0.0.1:$admin" --redis "$REDIS" --json --label "ab-$side-$run" \
            2>"$TMP/bench.log" | tail -1 | sed "s#$PW#***#g" >>"$OUT" || true
        kill "$node" && wait "$node" || true
    done
    if [ -n "${LIMIT:-}" ]; then
        # shellcheck disable=SC2086
        "$BENCH" $LIMIT --redis "$REDIS" --json --label "ab-L-$run" 2>"$TMP/bench.log" \
            | tail -1 | sed "s#$PW#***#g" >>"$OUT" || true
    fi
done
jq -rs '
  def med: sort | if length == 0 then null else .[(length / 2 | floor)] end;
  def fields: ["max_rate", "deliveries_per_s", "latency.p50_ms", "broadcast_server_cpu_pct", "server_cpu_us_per_delivery", "server_write_calls", "complete_latency.p99_ms", "server_rss_after_traffic",
               "latency.p99_ms", "latency.p999_ms", "latency.max_ms", "lost"];
  (map(select(.label | startswith("ab-A"))) ) as $a |
  (map(select(.label | startswith("ab-B"))) ) as $b |
  (map(select(.label | startswith("ab-L"))) ) as $l |
  fields[] as $f | ($f | split(".")) as $p |
  [$a[] | getpath($p)] as $av | [$b[] | getpath($p)] as $bv | [$l[] | getpath($p)] as $lv |
  select(($av | map(select(. != null)) | length) > 0) |
  "\($f): A \($av) median \($av | med); B \($bv) median \($bv | med); B/A \(if ($av|med) == 0 then "-" else (($bv|med) / ($av|med) * 100 | round / 100) end)\(if ($lv|length) == 0 or ($lv|med) == null or ($lv|med) == 0 then "" else "; L \($lv) median \($lv | med); B/L \(($bv|med) / ($lv|med) * 100 | round / 100)" end)"
' "$OUT"
echo "JSON lines: $OUT" >&2
