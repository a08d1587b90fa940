#!/usr/bin/env bash
# Memory per idle client: starts `podrouter demo` (transaction pooling), opens N idle client
# connections to it (startup + SCRAM-SHA-256 as demo/demo, from 127.0.0.2..127.0.0.50), holds
# them, and reports the router process's RSS before, while and after. See bench/README.md.
#
#   bench/idle_clients.sh            # N=10000
#   N=2000 HOLD=5 bench/idle_clients.sh
#
# Environment: N (10000), SOURCES (49 loopback source addresses from 127.0.0.2), HOLD (s to
# keep them idle after opening, 10), CONCURRENCY (handshakes in flight, 200), TIMEOUT (s for
# the whole client phase, 600), KEEP_WORK (1 keeps the temporary directory), PODROUTER_BIN.
# Target: 10,000 idle clients in <= 100 MB RSS. The markdown report goes to stdout.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=bench/common.sh
source bench/common.sh

N=${N:-10000}
SOURCES=${SOURCES:-49}
HOLD=${HOLD:-10}
CONCURRENCY=${CONCURRENCY:-200}
TIMEOUT=${TIMEOUT:-600}
whole_numbers N SOURCES HOLD CONCURRENCY TIMEOUT
((N >= 1 && N < 19000)) || die "N must be between 1 and 18999 (the router's default pool.max_clients is 20000)"

bench_init idle_clients
GIT_REV=$(podrouter_desc)
log "$GIT_REV"
# Both the router (inherits this limit) and the client process hold N sockets.
nofile=$(raise_nofile 30000)
((nofile >= N + 200)) || die "open-files limit is $nofile (hard limit $(ulimit -Hn)); N=$N needs at least $((N + 200))"

# Clients spread over 4 tenants, as in a fleet (one tenant alone stops at
# pool.max_clients_per_tenant, 5000 by default).
DEMO_TENANTS=4 start_demo 20
# One query first, so the baseline includes the tenant's pool and one server connection.
psql -XAtq "$ROUTER_URL" -c 'select count(*) from accounts' >/dev/null
sleep 1

log "opening $N idle clients to 127.0.0.1:$ROUTER_PORT (ulimit -n $nofile)"
out=$BENCH_WORK/idle.json
timeout --foreground --kill-after=10 "$TIMEOUT" python3 bench/idle_clients.py \
    --port "$ROUTER_PORT" --pid "$DEMO_PID" -n "$N" --sources "$SOURCES" \
    --concurrency "$CONCURRENCY" --hold "$HOLD" --open-timeout "$((TIMEOUT / 2))" \
    --pod-url "$POD_SUPER_URL" --probe-url "$ROUTER_URL" --database tenant1,tenant2,tenant3,tenant4 >"$out" || {
    rc=$?
    ((rc == 130 || rc == 143)) && exit "$rc"
    ((rc == 124 || rc == 137)) && die "the idle-client phase did not finish within TIMEOUT=$TIMEOUT s"
    die "the idle-client phase failed (exit $rc; see the messages above)"
}
kill -0 "$DEMO_PID" 2>/dev/null || die "podrouter demo died during the run (log: $DEMO_LOG)"
# Still serving after the clients left?
psql -XAtq "$ROUTER_URL" -c 'select 1' >/dev/null || die "podrouter no longer answers after the run (log: $DEMO_LOG)"


python3 - "$out" "$GIT_REV" "$(nproc)" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
rev, cores = sys.argv[2], sys.argv[3]
mb = lambda kib: kib / 1024.0
b, o, h, c = r["before"]["VmRSS"], r["open"]["VmRSS"], r["held"]["VmRSS"], r["closed"]["VmRSS"]
n = r["opened"]
print("%s, %s cores; %d idle clients requested, %d opened in %.1f s from %d source addresses; "
      "transaction pooling." % (rev, cores, r["requested"], n, r["open_seconds"], r["sources"]))
print()
print("| router process | VmRSS MB | VmHWM MB | threads | fds |")
print("|---|---:|---:|---:|---:|")
for label, key in (("before (1 warm-up query)", "before"), ("%d idle clients open" % n, "open"),
                   ("after holding them", "held"), ("after closing all", "closed")):
    s = r[key]
    print("| %s | %.1f | %.1f | %s | %s |" % (label, mb(s["VmRSS"]), mb(s["VmHWM"]), s.get("Threads", "?"), s.get("fds", "?")))
print()
per_k = (mb(max(o, h) - b) / n * 1000) if n else float("nan")
print("- Added RSS for %d idle clients: %.1f MB, %.2f MB per 1000 connections (%.1f KiB each)."
      % (n, mb(max(o, h) - b), per_k, (max(o, h) - b) / n if n else float("nan")))
print("- Server connections on the pod for the 4 tenants (role demo) while the clients were idle: %s" % r.get("server_conns_on_pod"))
print("- A new client's `select 1` through the router while they were idle: %s in %s ms"
      % ("ok" if r.get("probe_ok") else "FAILED " + r.get("probe_error", ""), r.get("probe_query_ms")))
print("- Connections the router closed during the %s: %d; handshake errors: %s"
      % ("hold", r["dropped_during_hold"], r["errors"] or "none"))
total = mb(max(o, h))
if n == r["requested"] and n >= 10000:
    print("- Target (10,000 idle clients in <= 100 MB RSS): total RSS %.1f MB with %d clients: %s"
          % (total, n, "met" if total <= 100 and not r["errors"] else "NOT met"))
elif n != r["requested"]:
    print("- Target: NOT met (only %d of %d clients connected)" % (n, r["requested"]))
EOF
