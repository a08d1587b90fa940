# Shared helpers for bench/*.sh (sourced, not run). Starts `podrouter demo` in a temporary
# directory, waits for it, and stops everything it started on exit.
#
# Callers set `set -euo pipefail` first and call `bench_init NAME` before anything else.

BENCH_WORK=""
DEMO_PID=""
DEMO_DIR=""
DEMO_LOG=""
BENCH_CLEANUP_HOOKS=()

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# need TOOL HINT [TOOL HINT ...]
need() {
    while (($# >= 2)); do
        command -v "$1" >/dev/null 2>&1 || die "'$1' not found on PATH ($2)"
        shift 2
    done
}

# Free TCP ports on 127.0.0.1, one per line (all bound at once, so they are distinct).
free_ports() {
    python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
for s in socks:
    print(s.getsockname()[1])
EOF
}

# whole_numbers VAR [VAR ...]: dies unless each named variable holds a whole number.
whole_numbers() {
    local v
    for v in "$@"; do
        [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a whole number, got '${!v}'"
    done
}

# Raises the open-files limit to $1 or, failing that, to the hard limit. Prints the result.
raise_nofile() {
    local want=$1 hard
    if ! ulimit -n "$want" 2>/dev/null; then
        hard=$(ulimit -Hn)
        [[ $hard == unlimited ]] && hard=$want
        ulimit -n "$hard" 2>/dev/null || true
    fi
    ulimit -n
}

# JSON field from a file: json_get FILE 'expr on d'  (python expression, d = parsed JSON)
json_get() {
    python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$1" "$2"
}

# Waits until pid $1 is gone, up to $2 seconds. Returns 1 if it is still alive.
wait_gone() {
    local pid=$1 secs=$2 i
    for ((i = 0; i < secs * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    ! kill -0 "$pid" 2>/dev/null
}

# Stops postmasters left in the demo directory (only if the demo itself had to be killed).
stop_orphan_postmasters() {
    local pidfile pid
    for pidfile in "$DEMO_DIR"/*/postmaster.pid; do
        [[ -f $pidfile ]] || continue
        pid=$(head -n1 "$pidfile" 2>/dev/null || true)
        [[ $pid =~ ^[0-9]+$ ]] || continue
        if kill -0 "$pid" 2>/dev/null && grep -q postgres "/proc/$pid/comm" 2>/dev/null; then
            log "stopping leftover postmaster $pid ($(dirname "$pidfile"))"
            kill -INT "$pid" 2>/dev/null || true
            wait_gone "$pid" 15 || kill -KILL "$pid" 2>/dev/null || true
        fi
    done
}

bench_cleanup() {
    local rc=$? hook
    set +e
    trap - EXIT INT TERM
    for hook in "${BENCH_CLEANUP_HOOKS[@]}"; do
        "$hook"
    done
    if [[ -n $DEMO_PID ]] && kill -0 "$DEMO_PID" 2>/dev/null; then
        log "stopping podrouter demo (pid $DEMO_PID)"
        kill -TERM "$DEMO_PID" 2>/dev/null
        if ! wait_gone "$DEMO_PID" 60; then
            log "podrouter demo did not stop within 60 s of SIGTERM; killing it"
            kill -KILL "$DEMO_PID" 2>/dev/null
            wait_gone "$DEMO_PID" 10
        fi
    fi
    [[ -n $DEMO_PID ]] && wait "$DEMO_PID" 2>/dev/null
    [[ -n $DEMO_DIR ]] && stop_orphan_postmasters
    if [[ -n $BENCH_WORK ]]; then
        if [[ ${KEEP_WORK:-0} == 1 ]] || ((rc != 0 && rc != 130 && rc != 143)); then
            log "kept $BENCH_WORK (logs: $DEMO_LOG)"
        else
            rm -rf "$BENCH_WORK"
        fi
    fi
    exit "$rc"
}

bench_init() {
    local name=$1
    [[ -f Cargo.toml && -d src ]] || die "run from the podrouter repository root (bench/$name.sh)"
    PODROUTER_BIN=${PODROUTER_BIN:-target/release/podrouter}
    [[ -x $PODROUTER_BIN ]] || die "$PODROUTER_BIN not found; build it with: cargo build --release"
    need python3 "install python3" psql "install postgresql-client"
    BENCH_WORK=$(mktemp -d "${TMPDIR:-/tmp}/podrouter-$name.XXXXXX")
    chmod 755 "$BENCH_WORK"
    trap bench_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

# start_demo POOL_SIZE [extra demo args...]: starts the demo with one pod and one tenant and
# sets ROUTER_PORT, ROUTER_URL (with /tenant1), POD_PORT, POD_SUPER_URL (with /tenant1),
# POD_DEMO_URL (role demo straight to the pod).
start_demo() {
    local pool=$1 ports timeout=${DEMO_START_TIMEOUT:-240} i
    shift
    mapfile -t ports < <(free_ports 3)
    DEMO_DIR=$BENCH_WORK/demo
    DEMO_LOG=$BENCH_WORK/demo.log
    log "starting podrouter demo (pool mode transaction, pool size $pool) in $DEMO_DIR"
    "$PODROUTER_BIN" demo --dir "$DEMO_DIR" --pods "${DEMO_PODS:-1}" --tenants "${DEMO_TENANTS:-1}" \
        --pool-mode transaction --pool-size "$pool" \
        --listen "127.0.0.1:${ports[0]}" --admin-listen "127.0.0.1:${ports[1]}" \
        --http-listen "127.0.0.1:${ports[2]}" "$@" >"$DEMO_LOG" 2>&1 &
    DEMO_PID=$!
    for ((i = 0; i < timeout * 5; i++)); do
        [[ -f $DEMO_DIR/ready.json ]] && break
        if ! kill -0 "$DEMO_PID" 2>/dev/null; then
            tail -n 30 "$DEMO_LOG" >&2
            die "podrouter demo exited before it was ready (log above: $DEMO_LOG)"
        fi
        sleep 0.2
    done
    if [[ ! -f $DEMO_DIR/ready.json ]]; then
        tail -n 30 "$DEMO_LOG" >&2
        die "podrouter demo not ready within ${timeout} s (no $DEMO_DIR/ready.json)"
    fi
    local router pod
    router=$(json_get "$DEMO_DIR/ready.json" 'd["router_url"]')
    pod=$(json_get "$DEMO_DIR/ready.json" 'd["pods"][0]["url"]')
    ROUTER_PORT=${router##*:}
    ROUTER_URL="$router/tenant1"
    POD_PORT=${pod##*:}
    POD_SUPER_URL="$pod/tenant1"
    POD_DEMO_URL="postgres://demo:demo@127.0.0.1:$POD_PORT/tenant1"
    [[ $ROUTER_PORT =~ ^[0-9]+$ && $POD_PORT =~ ^[0-9]+$ ]] ||
        die "unexpected ready.json: router_url=$router pods[0].url=$pod"
    psql -XAtq "$ROUTER_URL" -c 'select 1' >/dev/null ||
        die "podrouter accepts no query at $ROUTER_URL (log: $DEMO_LOG)"
    log "demo ready: router 127.0.0.1:$ROUTER_PORT, pod 127.0.0.1:$POD_PORT, pid $DEMO_PID"
}

# One line naming the binary under test: its build time, the checkout's HEAD, and whether
# src/ changed after the build (then the binary is not HEAD: rebuild with cargo build --release).
podrouter_desc() {
    local rev built stale=""
    rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
    built=$(date -u -r "$PODROUTER_BIN" +%Y-%m-%dT%H:%MZ)
    if [[ -n $(find src Cargo.toml Cargo.lock -newer "$PODROUTER_BIN" -print -quit 2>/dev/null) ]]; then
        stale=", src/ changed since the build"
    fi
    echo "podrouter binary built $built (checkout HEAD $rev$stale)"
}
