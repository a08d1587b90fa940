#!/usr/bin/env bash
# Where the machine's CPU goes per transaction: direct vs. PgBouncer vs. podrouter, interleaved,
# the same pgbench load each time. For each run it reports tps and CPU microseconds per
# transaction of the proxy (user, system), of the pod's Postgres processes, of pgbench, of the
# rest of the busy time (kernel work charged to no process), and the idle time. On a machine
# whose cores Postgres, pgbench and the proxy share, this says how much a proxy can gain or lose
# against another: see bench/README.md and RESULTS.md.
#
#   bench/cpu.sh | tee /tmp/cpu.md          # about 2 min
#
# Environment: DURATION (s per run, 8), CLIENTS (50), JOBS (pgbench -j, 2), POOL (20),
# SCALE (5), ROUNDS (3), PROTOCOL (pgbench -M: simple), KEEP_WORK (1 keeps the temporary
# directory), PODROUTER_BIN (target/release/podrouter), PGBOUNCER (/usr/sbin/pgbouncer).
# The markdown report goes to stdout, progress to stderr.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=bench/common.sh
source bench/common.sh
# shellcheck source=bench/pgbouncer.sh
source bench/pgbouncer.sh

DURATION=${DURATION:-8}
CLIENTS=${CLIENTS:-50}
JOBS=${JOBS:-2}
POOL=${POOL:-20}
SCALE=${SCALE:-5}
ROUNDS=${ROUNDS:-3}
PROTOCOL=${PROTOCOL:-simple}
whole_numbers DURATION CLIENTS JOBS POOL SCALE ROUNDS
((DURATION > 0 && CLIENTS > 0 && JOBS > 0 && POOL > 0 && SCALE > 0 && ROUNDS > 0)) ||
    die "DURATION, CLIENTS, JOBS, POOL, SCALE and ROUNDS must be positive"
case $PROTOCOL in simple | extended | prepared) ;; *) die "PROTOCOL must be simple, extended or prepared" ;; esac

bench_init cpu
need pgbench "apt-get install postgresql-client"
GIT_REV=$(podrouter_desc)
log "$GIT_REV"
pgbouncer_init
start_demo "$POOL"
start_pgbouncer

# The pod's postmaster: the demo cluster whose postmaster.pid names the pod's port.
POSTMASTER=""
for pidfile in "$DEMO_DIR"/*/postmaster.pid; do
    if [[ $(sed -n 4p "$pidfile") == "$POD_PORT" ]]; then
        POSTMASTER=$(head -n1 "$pidfile")
    fi
done
[[ $POSTMASTER =~ ^[0-9]+$ ]] || die "no postmaster.pid for the pod's port $POD_PORT under $DEMO_DIR"

log "loading pgbench -i -s $SCALE into the pod"
pgbench -i -q -s "$SCALE" "$POD_DEMO_URL" >"$BENCH_WORK/init.log" 2>&1 ||
    die "pgbench -i failed (see $BENCH_WORK/init.log)"

RESULTS=$BENCH_WORK/results.jsonl
: >"$RESULTS"
declare -A URL=([direct]=$POD_DEMO_URL [pgbouncer]=$PGB_URL [podrouter]=$ROUTER_URL)
declare -A PROXY=([direct]="" [pgbouncer]=$PGB_PID [podrouter]=$DEMO_PID)
# A warm-up through each target, not recorded (new server connections, caches).
for target in direct pgbouncer podrouter; do
    pgbench -n -S -M "$PROTOCOL" -c "$CLIENTS" -j "$JOBS" -T 2 "${URL[$target]}" >/dev/null 2>&1 ||
        die "pgbench through $target fails"
done
for ((round = 1; round <= ROUNDS; round++)); do
    for target in direct pgbouncer podrouter; do
        log "round $round/$ROUNDS: $target"
        line=$(python3 bench/cpu_per_txn.py --postmaster "$POSTMASTER" ${PROXY[$target]:+--proxy "${PROXY[$target]}"} -- \
            pgbench -n -S -M "$PROTOCOL" -c "$CLIENTS" -j "$JOBS" -T "$DURATION" "${URL[$target]}")
        printf '{"round": %d, "target": "%s", "m": %s}\n' "$round" "$target" "$line" >>"$RESULTS"
    done
done

python3 - "$RESULTS" "$GIT_REV" "$PGB_VERSION" "$CLIENTS" "$JOBS" "$POOL" "$DURATION" "$ROUNDS" "$PROTOCOL" <<'EOF'
import json, statistics, sys
path, rev, pgb, clients, jobs, pool, duration, rounds, protocol = sys.argv[1:]
rows = [json.loads(l) for l in open(path)]
errors = [r for r in rows if "error" in r["m"]]
print(f"pgbench -n -S -M {protocol} -c {clients} -j {jobs} -T {duration}, pool {pool}, {rounds} rounds "
      f"interleaved (direct, PgBouncer {pgb}, podrouter); {rev}. CPU in µs per transaction, median "
      "over rounds; the columns before idle add up to the busy time.\n")
for r in errors:
    print(f"- round {r['round']} {r['target']}: {r['m']['error']}")
cols = ["tps", "proxy_user_us", "proxy_sys_us", "postgres_us", "pgbench_us", "rest_us", "idle_us", "steal_us", "proxy_ivcs", "pgbench_vcs"]
head = ["target", "tps", "proxy user", "proxy sys", "Postgres", "pgbench", "rest", "idle", "steal", "busy total", "proxy preempted /txn", "pgbench sleeps /txn", "tps vs PgBouncer"]
print("| " + " | ".join(head) + " |")
print("|---|" + "---:|" * (len(head) - 1))
med = {}
for target in ["direct", "pgbouncer", "podrouter"]:
    ms = [r["m"] for r in rows if r["target"] == target and "error" not in r["m"]]
    if not ms:
        continue
    med[target] = {c: statistics.median(m[c] for m in ms) for c in cols}
    med[target]["busy"] = statistics.median(
        sum(m[c] for c in ["proxy_user_us", "proxy_sys_us", "postgres_us", "pgbench_us", "rest_us"]) for m in ms)
for target, m in med.items():
    vs = f"{m['tps'] / med['pgbouncer']['tps']:.2f}×" if "pgbouncer" in med else "—"
    proxy = target != "direct"
    cells = [target, f"{m['tps']:,.0f}",
             f"{m['proxy_user_us']:.1f}" if proxy else "—", f"{m['proxy_sys_us']:.1f}" if proxy else "—",
             f"{m['postgres_us']:.1f}", f"{m['pgbench_us']:.1f}", f"{m['rest_us']:.1f}", f"{m['idle_us']:.1f}",
             f"{m['steal_us']:.1f}", f"{m['busy']:.1f}", f"{m['proxy_ivcs']:.2f}" if proxy else "—",
             f"{m['pgbench_vcs']:.2f}", vs]
    print("| " + " | ".join(cells) + " |")
print("\nPer round (tps): " + "; ".join(
    f"{r['round']} {r['target']} {r['m'].get('tps', 'error')}" for r in rows))
EOF
