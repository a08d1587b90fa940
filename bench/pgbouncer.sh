# shellcheck shell=bash
# PgBouncer for bench/*.sh (sourced after bench/common.sh, not run).
#
#   pgbouncer_init     after bench_init: finds PgBouncer (installs the Debian package with
#                      apt-get if it is missing and we are root), sets PGB_VERSION and RUN_AS,
#                      and adds stop_pgbouncer to the cleanup hooks.
#   start_pgbouncer    after start_demo: starts PgBouncer in front of the demo's pod, configured
#                      like podrouter, and sets PGB_PID and PGB_URL (role demo, db tenant1).
#
# Environment: PGBOUNCER (/usr/sbin/pgbouncer), POOL (default_pool_size, 20),
# PGB_START_TIMEOUT (s to wait for PgBouncer to answer, 15). PGB_WRAP (an array, empty by
# default) is a prefix command: start_pgbouncer runs `[setpriv ...] "${PGB_WRAP[@]}" pgbouncer
# INI`, e.g. PGB_WRAP=(valgrind --tool=callgrind). The prefix must exec PgBouncer in the same
# process (as valgrind does), so that PGB_PID is PgBouncer's pid.

PGB_VERSION=""
RUN_AS=""
PGB_PID=""
PGB_URL=""
PGB_WRAP=()

pgbouncer_init() {
    PGBOUNCER=${PGBOUNCER:-/usr/sbin/pgbouncer}
    if [[ ! -x $PGBOUNCER ]]; then
        if command -v pgbouncer >/dev/null 2>&1; then
            PGBOUNCER=$(command -v pgbouncer)
        elif [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
            log "installing pgbouncer (apt-get install -y pgbouncer)"
            DEBIAN_FRONTEND=noninteractive apt-get install -y pgbouncer >"$BENCH_WORK/apt.log" 2>&1 ||
                { apt-get update >>"$BENCH_WORK/apt.log" 2>&1 &&
                    DEBIAN_FRONTEND=noninteractive apt-get install -y pgbouncer >>"$BENCH_WORK/apt.log" 2>&1; } ||
                die "apt-get install pgbouncer failed (see $BENCH_WORK/apt.log)"
        else
            die "pgbouncer not found; install it (apt-get install pgbouncer) or set PGBOUNCER"
        fi
    fi
    PGB_VERSION=$("$PGBOUNCER" --version | awk 'NR==1 {print $2}')
    [[ -n $PGB_VERSION ]] || die "cannot tell the version of $PGBOUNCER"
    # PgBouncer refuses to run as root.
    RUN_AS=""
    if [[ $(id -u) -eq 0 ]]; then
        if id postgres >/dev/null 2>&1; then RUN_AS=postgres; else RUN_AS=nobody; fi
        need setpriv "util-linux"
    fi
    BENCH_CLEANUP_HOOKS+=(stop_pgbouncer)
}

stop_pgbouncer() {
    local secs=10
    # Under a wrapper such as valgrind, exiting (and writing its output) takes longer.
    ((${#PGB_WRAP[@]} == 0)) || secs=60
    if [[ -n $PGB_PID ]] && kill -0 "$PGB_PID" 2>/dev/null; then
        log "stopping pgbouncer (pid $PGB_PID)"
        kill -TERM "$PGB_PID" 2>/dev/null
        wait_gone "$PGB_PID" "$secs" || kill -KILL "$PGB_PID" 2>/dev/null
        wait "$PGB_PID" 2>/dev/null
    fi
}

version_ge() { [[ $(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1) == "$2" ]]; }

start_pgbouncer() {
    local dir=$BENCH_WORK/pgbouncer verifier port i prepared="" timeout=${PGB_START_TIMEOUT:-15}
    local cmd=("${PGB_WRAP[@]}" "$PGBOUNCER" "$dir/pgbouncer.ini")
    verifier=$(psql -XAtq "$POD_SUPER_URL" -c "select rolpassword from pg_authid where rolname = 'demo'")
    [[ $verifier == SCRAM-SHA-256\$* ]] ||
        die "the pod has no SCRAM verifier for role demo (got '${verifier:0:20}...')"
    port=$(free_ports 1)
    mkdir -p "$dir"
    printf '"demo" "%s"\n' "$verifier" >"$dir/userlist.txt"
    if version_ge "$PGB_VERSION" 1.21; then
        prepared="max_prepared_statements = 200"
    else
        log "PgBouncer $PGB_VERSION < 1.21: no prepared statements in transaction mode (-M prepared through it is expected to fail)"
    fi
    cat >"$dir/pgbouncer.ini" <<EOF
[databases]
tenant1 = host=127.0.0.1 port=$POD_PORT dbname=tenant1

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $dir/userlist.txt
pool_mode = transaction
default_pool_size = ${POOL:-20}
max_client_conn = 2000
$prepared
ignore_startup_parameters = extra_float_digits
log_connections = 0
log_disconnections = 0
logfile = $dir/pgbouncer.log
pidfile = $dir/pgbouncer.pid
EOF
    if [[ -n $RUN_AS ]]; then
        chown -R "$RUN_AS" "$dir"
        chmod 700 "$dir"
        chmod 600 "$dir/userlist.txt"
        setpriv --reuid="$RUN_AS" --regid="$(id -g "$RUN_AS")" --init-groups \
            "${cmd[@]}" >"$dir/stdout.log" 2>&1 &
    else
        "${cmd[@]}" >"$dir/stdout.log" 2>&1 &
    fi
    PGB_PID=$!
    PGB_URL="postgres://demo:demo@127.0.0.1:$port/tenant1"
    for ((i = 0; i < timeout * 5; i++)); do
        if ! kill -0 "$PGB_PID" 2>/dev/null; then
            cat "$dir/stdout.log" "$dir/pgbouncer.log" >&2 2>/dev/null
            die "pgbouncer exited at start (logs above)"
        fi
        PGCONNECT_TIMEOUT=2 psql -XAtq "$PGB_URL" -c 'select 1' >/dev/null 2>&1 && break
        sleep 0.2
    done
    PGCONNECT_TIMEOUT=2 psql -XAtq "$PGB_URL" -c 'select 1' >/dev/null ||
        die "pgbouncer does not answer at 127.0.0.1:$port within $timeout s (log: $dir/pgbouncer.log)"
    log "pgbouncer $PGB_VERSION ready on 127.0.0.1:$port (pid $PGB_PID, user ${RUN_AS:-$(id -un)}${PGB_WRAP[0]:+, under ${PGB_WRAP[0]}})"
}
