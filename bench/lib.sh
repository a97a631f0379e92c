# bench/lib.sh: shared by the bench scripts (sourced).
# Sets up TMP, PIDS and a cleanup trap; free_port; start_redis starts a
# private redis-server on a free loopback port and sets REDIS (the URL,
# password $PW). Nothing here touches the shared Redis on 6379.

TMP=$(mktemp -d "/tmp/pushwire-${BENCH_TAG:-bench}.XXXXXX")
PIDS=()
cleanup() {
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && wait "$p" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT INT TERM

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

start_redis() {
    local port
    port=$(free_port)
    redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --requirepass "$PW" \
        --rename-command SHUTDOWN '' >/dev/null 2>&1 &
    PIDS+=($!)
    REDIS="redis://:$PW@127.0.0.1:$port"
    sleep 0.5
}
