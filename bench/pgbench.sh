#!/usr/bin/env bash
# pgbench through podrouter vs. a direct connection vs. PgBouncer, in one run, interleaved.
# See bench/README.md. Run from the repository root (or anywhere: it changes to the root):
#
#   DURATION=10 CLIENTS="1 50" bench/pgbench.sh | tee /tmp/pgbench.md
#
# Environment: DURATION (s per run, 15), CLIENTS ("1 50 500"), POOL (20), SCALE (10),
# MODES ("select-only select-only-prepared tpcb"), ROUNDS (1), JOBS (pgbench -j, 2),
# SAMPLING (--sampling-rate for the p99 log, 0.2), WARMUP (s of unrecorded direct
# select-only load before the first run, 5), KEEP_WORK (1 keeps the temporary directory),
# PODROUTER_BIN (target/release/podrouter), PGBOUNCER (/usr/sbin/pgbouncer).
# The markdown report goes to stdout, progress to stderr.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=bench/common.sh
source bench/common.sh
# shellcheck source=bench/pgbouncer.sh
source bench/pgbouncer.sh

DURATION=${DURATION:-15}
CLIENTS=${CLIENTS:-"1 50 500"}
POOL=${POOL:-20}
SCALE=${SCALE:-10}
MODES=${MODES:-"select-only select-only-prepared tpcb"}
ROUNDS=${ROUNDS:-1}
JOBS=${JOBS:-2}
SAMPLING=${SAMPLING:-0.2}
WARMUP=${WARMUP:-5}

whole_numbers DURATION POOL SCALE ROUNDS JOBS WARMUP
((DURATION > 0 && ROUNDS > 0 && JOBS > 0)) || die "DURATION, ROUNDS and JOBS must be positive"
max_clients=0
for c in $CLIENTS; do
    [[ $c =~ ^[1-9][0-9]*$ ]] || die "CLIENTS must be positive whole numbers, got '$c'"
    ((c > max_clients)) && max_clients=$c
done
for m in $MODES; do
    case $m in select-only | select-only-prepared | tpcb) ;;
    *) die "unknown mode '$m' in MODES (select-only, select-only-prepared, tpcb)" ;;
    esac
done

bench_init pgbench
need pgbench "apt-get install postgresql-client"
GIT_REV=$(podrouter_desc)
log "$GIT_REV"

nofile=$(raise_nofile 30000)
((nofile >= max_clients * 2 + 100)) ||
    die "open-files limit is $nofile; $max_clients clients need about $((max_clients * 2 + 100))"
pgbouncer_init

# --- one pgbench run -------------------------------------------------------------------------
RESULTS=$BENCH_WORK/results.tsv
: >"$RESULTS"

clean_field() { tr '\t\n|' '  /' | cut -c1-180; }

# run_one ROUND MODE CLIENTS TARGET URL: appends a row to $RESULTS:
# round mode clients target status tps avg_ms p99_ms failed error
run_one() {
    local round=$1 mode=$2 clients=$3 target=$4 url=$5
    local dir=$BENCH_WORK/runs/r$round-$mode-c$clients-$target rc=0 tps avg failed p99 status err
    mkdir -p "$dir"
    local args=(-n -T "$DURATION" -c "$clients" -j "$((clients < JOBS ? clients : JOBS))")
    case $mode in
    select-only) args+=(-S) ;;
    select-only-prepared) args+=(-S -M prepared) ;;
    tpcb) ;;
    esac
    args+=(--log --log-prefix="$dir/tx" --sampling-rate="$SAMPLING")
    log "round $round: $mode, $clients clients, $target"
    timeout --foreground --kill-after=10 $((DURATION + 120)) pgbench "${args[@]}" "$url" >"$dir/out" 2>&1 || rc=$?
    if ((rc == 130 || rc == 143)); then
        log "interrupted"
        exit "$rc"
    fi
    tps=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time).*/\1/p' "$dir/out" | head -n1)
    avg=$(sed -n 's/^latency average = \([0-9.]*\) ms.*/\1/p' "$dir/out" | head -n1)
    failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$dir/out" | head -n1)
    p99=$(python3 - "$dir" <<'EOF'
import glob, math, sys
lat = []
for f in glob.glob(sys.argv[1] + "/tx.*"):
    with open(f) as fh:
        for line in fh:
            cols = line.split()
            if len(cols) >= 3 and cols[2].isdigit():
                lat.append(int(cols[2]))
if lat:
    lat.sort()
    print("%.3f" % (lat[max(0, math.ceil(0.99 * len(lat)) - 1)] / 1000.0))
EOF
)
    rm -f "$dir"/tx.*
    status=OK
    err=""
    if ((rc == 124 || rc == 137)); then
        status=FAIL
        err="pgbench did not finish within $((DURATION + 120)) s"
    elif ((rc != 0)) || [[ -z $tps || ${failed:-0} != 0 ]]; then
        status=FAIL
        err=$(grep -m1 -E 'error|ERROR|FATAL|abort' "$dir/out" || head -n1 "$dir/out" || true)
        err="exit $rc, failed tx ${failed:-?}: ${err:-no output}"
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$mode" "$clients" "$target" \
        "$status" "${tps:-}" "${avg:-}" "${p99:-}" "${failed:-}" "$(printf '%s' "$err" | clean_field)" >>"$RESULTS"
    if [[ $status == OK ]]; then
        log "  tps $tps, avg $avg ms, p99 ${p99:-?} ms"
    else
        log "  FAIL: $err (output: $dir/out)"
    fi
}

# --- main ------------------------------------------------------------------------------------
start_demo "$POOL"
MAX_CONN=$(psql -XAtq "$POD_SUPER_URL" -c 'show max_connections')
PG_VERSION=$(psql -XAtq "$POD_SUPER_URL" -c 'show server_version')
start_pgbouncer

log "pgbench -i -s $SCALE on the pod (as demo)"
pgbench -i -q -s "$SCALE" "$POD_DEMO_URL" >"$BENCH_WORK/init.log" 2>&1 ||
    { cat "$BENCH_WORK/init.log" >&2; die "pgbench -i failed"; }
if ((WARMUP > 0)); then
    log "warm-up: ${WARMUP} s select-only, direct, not recorded"
    pgbench -n -S -T "$WARMUP" -c 4 -j 2 "$POD_DEMO_URL" >"$BENCH_WORK/warmup.log" 2>&1 ||
        { cat "$BENCH_WORK/warmup.log" >&2; die "warm-up pgbench failed"; }
fi

start_s=$SECONDS
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
for ((round = 1; round <= ROUNDS; round++)); do
    for mode in $MODES; do
        for clients in $CLIENTS; do
            if ((clients > MAX_CONN - 10)); then
                printf '%s\t%s\t%s\t%s\t%s\t\t\t\t\t%s\n' "$round" "$mode" "$clients" direct NA \
                    "n/a (max_connections $MAX_CONN)" >>"$RESULTS"
                log "round $round: $mode, $clients clients, direct: skipped (pod max_connections $MAX_CONN)"
            else
                run_one "$round" "$mode" "$clients" direct "$POD_DEMO_URL"
                sleep 1
            fi
            run_one "$round" "$mode" "$clients" pgbouncer "$PGB_URL"
            sleep 1
            run_one "$round" "$mode" "$clients" podrouter "$ROUTER_URL"
            sleep 1
        done
    done
done
kill -0 "$DEMO_PID" 2>/dev/null || die "podrouter demo died during the benchmark (log: $DEMO_LOG)"
RUN_SECONDS=$((SECONDS - start_s))
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
log "runs took $RUN_SECONDS s"


python3 - "$RESULTS" <<EOF
import statistics, sys
from collections import OrderedDict

rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
runs = OrderedDict()
for r in rows:
    rnd, mode, clients, target, status, tps, avg, p99, failed, err = (r + [""] * 10)[:10]
    runs.setdefault((mode, int(clients), target), []).append(
        dict(status=status, tps=tps, avg=avg, p99=p99, failed=failed, err=err))

def med(xs):
    xs = [float(x) for x in xs if x]
    return statistics.median(xs) if xs else None

summary = OrderedDict()
for key, rs in runs.items():
    ok = [r for r in rs if r["status"] == "OK"]
    bad = [r for r in rs if r["status"] == "FAIL"]
    na = [r for r in rs if r["status"] == "NA"]
    s = dict(tps=None, avg=None, p99=None, errors="none")
    if na:
        s["errors"] = na[0]["err"]
    elif bad:
        s["errors"] = "FAIL" + (" (%d/%d rounds)" % (len(bad), len(rs)) if len(rs) > 1 else "") + ": " + bad[0]["err"]
    if ok and not bad:
        s.update(tps=med(r["tps"] for r in ok), avg=med(r["avg"] for r in ok), p99=med(r["p99"] for r in ok))
    summary[key] = s

def f(x, fmt):
    return "—" if x is None else fmt % x

def ratio(a, b):
    return "—" if a is None or b is None or b == 0 else "%.2f×" % (a / b)

print("Settings: DURATION=${DURATION} s per run, CLIENTS=\"${CLIENTS}\", POOL=${POOL}, SCALE=${SCALE}, "
      "ROUNDS=${ROUNDS} (median over rounds), pgbench -j ${JOBS} -n, p99 from --log --sampling-rate=${SAMPLING}; "
      "$(nproc) cores, PostgreSQL ${PG_VERSION} (max_connections ${MAX_CONN}), PgBouncer ${PGB_VERSION}, "
      "${GIT_REV}, $(date -u +%Y-%m-%dT%H:%MZ); runs took ${RUN_SECONDS} s; "
      "load average before the runs ${LOAD_BEFORE}, after ${LOAD_AFTER} (other processes on the machine add to it).")
print()
print("| workload | clients | target | tps | avg ms | p99 ms | vs direct | vs PgBouncer | errors |")
print("|---|---:|---|---:|---:|---:|---:|---:|---|")
for (mode, clients, target), s in summary.items():
    d = summary.get((mode, clients, "direct"), {}).get("tps")
    b = summary.get((mode, clients, "pgbouncer"), {}).get("tps")
    vd = ratio(s["tps"], d) if target != "direct" else "—"
    vb = ratio(s["tps"], b) if target == "podrouter" else "—"
    print("| %s | %d | %s | %s | %s | %s | %s | %s | %s |" % (
        mode, clients, target, f(s["tps"], "%.0f"), f(s["avg"], "%.3f"), f(s["p99"], "%.3f"), vd, vb, s["errors"]))
print()

verdicts = []
for mode in dict.fromkeys(m for m, _, _ in summary):
    d = summary.get((mode, 1, "direct"), {}).get("avg")
    if d is None:
        continue
    parts = []
    for target, name in (("podrouter", "podrouter"), ("pgbouncer", "PgBouncer")):
        a = summary.get((mode, 1, target), {}).get("avg")
        parts.append("%s %s" % (name, "n/a (failed)" if a is None else "%+.0f µs" % ((a - d) * 1000)))
    print("- 1-client added latency, %s (avg vs direct %.3f ms): %s" % (mode, d, "; ".join(parts)))
    if mode == "select-only":
        a = summary.get((mode, 1, "podrouter"), {}).get("avg")
        if a is not None:
            verdicts.append("1 client select-only: podrouter adds %.0f µs (target ≤ 30 µs): %s"
                            % ((a - d) * 1000, "met" if (a - d) * 1000 <= 30 else "NOT met"))
so = {t: summary.get(("select-only", 50, t), {}).get("tps") for t in ("direct", "pgbouncer", "podrouter")}
if all(v is not None for v in so.values()) and ${POOL} == 20:
    rb, rd = so["podrouter"] / so["pgbouncer"], so["podrouter"] / so["direct"]
    verdicts.append("select-only 50 clients pool 20: %.2f× PgBouncer (target ≥ 1.2×): %s; %.2f× direct (target ≥ 0.85×): %s"
                    % (rb, "met" if rb >= 1.2 else "NOT met", rd, "met" if rd >= 0.85 else "NOT met"))
if verdicts:
    print()
    for v in verdicts:
        print("- Target: " + v)
EOF
