#!/usr/bin/env bash
# bench/callgrind.sh: CPU instructions and heap allocations per delivery,
# counted by valgrind (callgrind), so the numbers repeat whatever the load
# on the machine. Writes only under $WORK (default /tmp/pushwire-callgrind);
# bench/callgrind.md is written by hand from its summary.
#
#   bench/callgrind.sh                 # targeted + broadcast, 1000 connections
#   CASES=broadcast bench/callgrind.sh
#   T_RATES="100 200" T_SECS=20 B_MSGS="20 40" B_SECS=10 bench/callgrind.sh
#   bench/callgrind.sh report          # only re-print the summary from $WORK
#
# Method. Each run starts a fresh node (--workers 1) under callgrind with one
# output file per thread (1 main, then the replayer when history is on,
# loop-0, subscriber, admin, admin-req...: the spawn order in src/lib.rs
# with one loop; the loop thread is found by its code), connects
# $CONNS pushwire-bench clients, zeroes the counters at the bench's
# --barrier (handshakes excluded), publishes, and dumps when the bench exits
# (the window holds the publishes, the deliveries, idle ticks, canaries and
# the 1000 client closes). Two runs per case that differ only in the number
# of notices, over the same wall time (the rate doubles, not the duration),
# are subtracted: per delivery = (X_run2 - X_run1) / (deliveries_run2 -
# deliveries_run1), so closes, ticks and canaries cancel. Deliveries are the
# node's own pushwire_messages_delivered_total. Allocation calls are the
# calls=... into malloc/calloc/realloc/posix_memalign/aligned_alloc/memalign
# from outside the allocator (frees counted apart). Only user-space
# instructions are counted: the kernel side of writev/epoll/recv is not.
#
# --ping-interval 600 --idle-timeout 1200 keep server pings (and the pongs
# they cause) out of the window; nothing else differs from the defaults.
# Nothing touches 127.0.0.1:6379: a private redis-server on a free port.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
WORK=${WORK:-/tmp/pushwire-callgrind}
TARGET_DIR=${TARGET_DIR:-/tmp/pw-sym}
CONNS=${CONNS:-1000}
CASES=${CASES:-"targeted broadcast"}
T_SECS=${T_SECS:-20}
T_RATES=${T_RATES:-"100 200"}   # notices/s: 2000 vs 4000 targeted notices
B_SECS=${B_SECS:-10}
B_MSGS=${B_MSGS:-"20 40"}       # broadcasts, spread over B_SECS each run
NODE=$TARGET_DIR/release/pushwire
BENCH=$TARGET_DIR/release/pushwire-bench
mkdir -p "$WORK"

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# ------------------------------------------------------------------ analysis

report() {
    python3 - "$WORK" <<'PY'
import glob, json, os, sys
work = sys.argv[1]
ALLOC = {"malloc", "calloc", "realloc", "posix_memalign", "aligned_alloc", "memalign"}
ALLOC_ALL = ALLOC | {"free", "_int_malloc", "_int_free", "_int_realloc", "__libc_malloc"}
# Thread roots, identical to the thread total.
WRAPPERS = {"clone", "start_thread", "<std::sys::thread::unix::Thread>::new::thread_start",
            "core::ops::function::FnOnce::call_once{{vtable.shim}}"}
def tname(t, loop):
    # Threads are numbered in spawn order (src/lib.rs): main, the replayer
    # when history is on, the loop, the subscriber, admin, admin-req. The
    # loop is found by its code, the others by their place around it.
    if t == 1:
        return "main"
    if t < loop:
        return "replayer"
    return {0: "loop-0", 1: "subscriber", 2: "admin"}.get(t - loop, "admin-req")

def loop_thread(paths):
    for p in paths:
        with open(p, errors="replace") as f:
            if any(l.startswith("fn=pushwire::server::Worker::run") for l in f):
                return int(p.rsplit("-", 1)[1])
    return 2

SYSCALLS = ["writev", "recv", "read", "write", "epoll_wait", "sendto", "__libc_recv"]

def parse(path):
    """From one thread's file (--compress-strings=no --compress-pos=no):
    Ir total, allocation calls, frees, allocation calls by direct caller,
    calls by callee, and inclusive Ir by function (self cost plus the
    inclusive cost of its calls to other functions, as callgrind records
    them; a recursive call to itself is not added twice)."""
    ir = 0; allocs = 0; frees = 0; by_caller = {}; callee = {}; incl = {}
    fn = cfn = None
    in_call = False
    with open(path, errors="replace") as f:
        for line in f:
            c = line[:1]
            if c.isdigit() or c in "+-*":
                parts = line.split()
                cost = int(parts[1]) if len(parts) > 1 else 0
                if in_call:
                    in_call = False
                    if cfn == fn:
                        continue
                incl[fn] = incl.get(fn, 0) + cost
            elif line.startswith("totals:") or line.startswith("summary:"):
                ir = int(line.split()[1])
            elif line.startswith("fn="):
                fn = line[3:].strip()
            elif line.startswith("cfn="):
                cfn = line[4:].strip()
            elif line.startswith("calls="):
                in_call = True
                n = int(line[6:].split()[0])
                callee[cfn] = callee.get(cfn, 0) + n
                if fn in ALLOC_ALL:
                    continue
                if cfn in ALLOC:
                    allocs += n
                    by_caller[fn] = by_caller.get(fn, 0) + n
                elif cfn == "free":
                    frees += n
    return ir, allocs, frees, by_caller, callee, incl

runs = {}
for meta in sorted(glob.glob(os.path.join(work, "*.meta.json"))):
    m = json.load(open(meta))
    threads = {}
    paths = sorted(glob.glob(os.path.join(work, f"cg.{m['pid']}.1-*")))
    loop = loop_thread(paths)
    for p in paths:
        t = int(p.rsplit("-", 1)[1])
        ir, a, fr, byc, cal, inc = parse(p)
        d = threads.setdefault(tname(t, loop), {"ir": 0, "allocs": 0, "frees": 0, "by_caller": {}, "callee": {}, "incl": {}, "files": []})
        for k, v in inc.items():
            d["incl"][k] = d["incl"].get(k, 0) + v
        d["ir"] += ir; d["allocs"] += a; d["frees"] += fr; d["files"].append(p)
        for k, v in byc.items():
            d["by_caller"][k] = d["by_caller"].get(k, 0) + v
        for k, v in cal.items():
            d["callee"][k] = d["callee"].get(k, 0) + v
    m["threads"] = threads
    runs.setdefault(m["case"], []).append(m)

def fmt(x):
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:,.2f}"

summary = {}
for case, rs in runs.items():
    rs.sort(key=lambda m: m["deliveries"])
    print(f"## {case}\n")
    print("| run | notices sent | deliveries | thread | Ir | allocs | frees |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for m in rs:
        for t in ("loop-0", "subscriber", "main", "replayer", "admin", "admin-req"):
            if t in m["threads"]:
                d = m["threads"][t]
                print(f"| {m['label']} | {m['sent']} | {m['deliveries']} | {t} | {d['ir']:,} | {d['allocs']:,} | {d['frees']:,} |")
    print()
    if len(rs) < 2:
        continue
    a, b = rs[0], rs[-1]
    dd = b["deliveries"] - a["deliveries"]
    dn = b["sent"] - a["sent"]
    print(f"Difference {b['label']} - {a['label']}: {dd} deliveries, {dn} notices\n")
    print("| thread | Ir / delivery | allocs / delivery | frees / delivery | Ir / notice | allocs / notice |")
    print("|---|---:|---:|---:|---:|---:|")
    tot = {"ir": 0, "allocs": 0, "frees": 0}
    for t in ("loop-0", "subscriber"):
        x = {k: b["threads"][t][k] - a["threads"][t][k] for k in ("ir", "allocs", "frees")}
        for k in tot: tot[k] += x[k]
        print(f"| {t} | {fmt(x['ir']/dd)} | {fmt(x['allocs']/dd)} | {fmt(x['frees']/dd)} | {fmt(x['ir']/dn)} | {fmt(x['allocs']/dn)} |")
        summary[(case, t)] = x
    print(f"| loop-0 + subscriber | {fmt(tot['ir']/dd)} | {fmt(tot['allocs']/dd)} | {fmt(tot['frees']/dd)} | {fmt(tot['ir']/dn)} | {fmt(tot['allocs']/dn)} |")
    print()
    for t in ("loop-0", "subscriber"):
        ca, cb = a["threads"][t]["by_caller"], b["threads"][t]["by_caller"]
        diff = sorted(((cb.get(k, 0) - ca.get(k, 0), k) for k in set(ca) | set(cb)), reverse=True)
        diff = [(n, k) for n, k in diff if n / dn >= 0.05]
        if diff:
            print(f"Allocation calls per notice by direct caller, {t}:\n")
            for n, k in diff[:8]:
                print(f"- {n/dn:.2f}  `{k[:150]}`")
            print()
    print("libc calls per delivery (difference; user-space wrappers of syscalls):\n")
    print("| thread | " + " | ".join(SYSCALLS) + " |")
    print("|---|" + "---:|" * len(SYSCALLS))
    for t in ("loop-0", "subscriber"):
        ca, cb = a["threads"][t]["callee"], b["threads"][t]["callee"]
        print(f"| {t} | " + " | ".join(f"{(cb.get(k, 0) - ca.get(k, 0)) / dd:.3f}" for k in SYSCALLS) + " |")
    print()
    for t in ("loop-0", "subscriber"):
        ia = a["threads"][t]["incl"]; ib = b["threads"][t]["incl"]
        diff = sorted(((ib.get(k, 0) - ia.get(k, 0), k) for k in set(ia) | set(ib)), reverse=True)
        diff = [(n, k) for n, k in diff if k not in WRAPPERS]
        print(f"Top 20 functions by inclusive Ir per delivery (difference of the runs), {t}:\n")
        print("| Ir / delivery | share of thread | run 2 inclusive Ir | function |")
        print("|---:|---:|---:|---|")
        tot_d = b["threads"][t]["ir"] - a["threads"][t]["ir"]
        for n, k in diff[:int(os.environ.get("TOP", "20"))]:
            print(f"| {fmt(n/dd)} | {100*n/tot_d:.1f}% | {ib.get(k, 0):,} | `{k[:140]}` |")
        print()
PY
}

if [ "${1:-}" = report ]; then
    report
    exit 0
fi

# ------------------------------------------------------------------ runs

CARGO_PROFILE_RELEASE_STRIP=false CARGO_PROFILE_RELEASE_DEBUG=1 \
    cargo build --release --workspace --target-dir "$TARGET_DIR"
command -v valgrind >/dev/null && command -v callgrind_control >/dev/null
rm -f "$WORK"/cg.* "$WORK"/*.meta.json "$WORK"/*.json "$WORK"/*.err "$WORK"/*.log

PIDS=()
cleanup() {
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM

REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
    >"$WORK/redis.log" 2>&1 &
REDIS_PID=$!
PIDS+=("$REDIS_PID")
for _ in $(seq 1 50); do
    redis-cli -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG && break
    sleep 0.1
done
REDIS_URL=redis://127.0.0.1:$REDIS_PORT

delivered() {
    curl -sf "http://127.0.0.1:$1/metrics" | awk '$1=="pushwire_messages_delivered_total"{print $2}'
}

# run_one CASE LABEL BENCH-ARGS...
run_one() {
    local case=$1 label=$2
    shift 2
    local port admin vpid bpid bar=$WORK/bar.$label
    port=$(free_port)
    admin=$(free_port)
    rm -rf "$bar"
    valgrind --tool=callgrind --separate-threads=yes --compress-strings=no \
        --compress-pos=no --callgrind-out-file="$WORK/cg.%p" \
        "$NODE" --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" \
        --redis "$REDIS_URL" --jwt-secret bench --workers 1 --log-level warn \
        --ping-interval 600 --idle-timeout 1200 >"$WORK/$label.node.log" 2>&1 &
    vpid=$!
    PIDS+=("$vpid")
    for _ in $(seq 1 300); do
        curl -sf "http://127.0.0.1:$admin/readyz" >/dev/null 2>&1 && break
        sleep 0.2
    done
    "$BENCH" "$case" --url "ws://127.0.0.1:$port/ws" --redis "$REDIS_URL" \
        --connections "$CONNS" --connect-rate 200 --timeout 120 --drain 30 \
        --barrier "$bar" --json --label "$label" "$@" \
        >"$WORK/$label.json" 2>"$WORK/$label.err" &
    bpid=$!
    PIDS+=("$bpid")
    while ! ls "$bar"/ready.* >/dev/null 2>&1; do
        kill -0 "$bpid" 2>/dev/null || { cat "$WORK/$label.err" >&2; exit 1; }
        sleep 0.2
    done
    local d0 d1
    d0=$(delivered "$admin")
    callgrind_control -z "$vpid" >/dev/null
    touch "$bar/go"
    wait "$bpid"
    d1=$(delivered "$admin")
    callgrind_control -d "$vpid" >/dev/null
    kill -TERM "$vpid"
    wait "$vpid" || true
    local sent
    sent=$(jq -r '.sent // .messages' "$WORK/$label.json")
    printf '{"case":"%s","label":"%s","pid":%s,"sent":%s,"deliveries":%s,"bench":%s}\n' \
        "$case" "$label" "$vpid" "$sent" "$((d1 - d0))" "$(cat "$WORK/$label.json")" \
        >"$WORK/$label.meta.json"
    echo "$label: node pid $vpid, $sent notices, $((d1 - d0)) deliveries" >&2
}

for c in $CASES; do
    case $c in
    targeted)
        for r in $T_RATES; do
            run_one targeted "targeted-r$r" --rate "$r" --seconds "$T_SECS"
        done
        ;;
    broadcast)
        for m in $B_MSGS; do
            rate=$(python3 -c "print($m / $B_SECS)")
            run_one broadcast "broadcast-m$m" --messages "$m" --rate "$rate" --seconds 30
        done
        ;;
    esac
done
report | tee "$WORK/summary.md"
