#!/usr/bin/env bash
# User-space CPU instructions per transaction, podrouter vs. PgBouncer: both run under
# valgrind --tool=callgrind in front of the same demo pod, and the same pgbench select-only
# load goes through each. Reports Ir per transaction of each proxy process (all its threads)
# and podrouter's top functions. Kernel time is not counted. See bench/README.md.
#
#   bench/callgrind.sh > /tmp/callgrind.md        # about 1 min on 2 cores
#   TX=500 bench/callgrind.sh                     # quicker, noisier
#
# Environment: TX (transactions per client in the measured run, 5000), CLIENTS (4), POOL (20),
# IDLE (s of idle background measured after each run, 10; 0 skips it), TOP (functions listed,
# 25), KEEP_WORK (1 keeps the temporary directory, with the callgrind dumps), PODROUTER_BIN
# (target/release/podrouter), PGBOUNCER (/usr/sbin/pgbouncer), DEMO_START_TIMEOUT (s, 600
# here: podrouter starts slowly under valgrind).
# The markdown report goes to stdout, progress to stderr.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=bench/common.sh
source bench/common.sh
# shellcheck source=bench/pgbouncer.sh
source bench/pgbouncer.sh

TX=${TX:-5000}
CLIENTS=${CLIENTS:-4}
POOL=${POOL:-20}
IDLE=${IDLE:-10}
TOP=${TOP:-25}
WARMUP_TX=500
DEMO_START_TIMEOUT=${DEMO_START_TIMEOUT:-600}
PGB_START_TIMEOUT=${PGB_START_TIMEOUT:-120}

whole_numbers TX CLIENTS POOL IDLE TOP
((TX > 0 && CLIENTS > 0 && POOL > 0 && TOP > 0)) || die "TX, CLIENTS, POOL and TOP must be positive"
((CLIENTS <= 150)) || die "CLIENTS must be at most 150 (the pod's max_connections is 200)"

bench_init callgrind
need pgbench "apt-get install postgresql-client" valgrind "apt-get install valgrind" \
    callgrind_control "apt-get install valgrind" callgrind_annotate "apt-get install valgrind"
# Before PODROUTER_BIN points at the wrapper below.
GIT_REV=$(podrouter_desc)
log "$GIT_REV"
REAL_BIN=$(readlink -f "$PODROUTER_BIN")
VALGRIND_VERSION=$(valgrind --version)
pgbouncer_init

# The demo starts "$PODROUTER_BIN demo ..." in the background; the wrapper execs valgrind,
# which execs the tool, so DEMO_PID is the traced podrouter. Children (Postgres) run untraced.
WRAPPER=$BENCH_WORK/podrouter-callgrind
printf '#!/usr/bin/env bash\nexec valgrind --tool=callgrind --callgrind-out-file=%q %q "$@"\n' \
    "$BENCH_WORK/podrouter.%p.cg" "$REAL_BIN" >"$WRAPPER"
chmod 755 "$WRAPPER"
PODROUTER_BIN=$WRAPPER
# PgBouncer's directory belongs to its user (RUN_AS), so its dumps go there.
PGB_WRAP=(valgrind --tool=callgrind "--callgrind-out-file=$BENCH_WORK/pgbouncer/pgbouncer.%p.cg")

# cg PID ARG: callgrind_control ARG PID, as the user the process runs as (so that vgdb can
# reach it even when it has to ptrace a process that waits in a system call).
cg() {
    local pid=$1 arg=$2 user out
    user=$(stat -c %U "/proc/$pid") || die "process $pid is gone"
    if [[ $user == "$(id -un)" ]]; then
        out=$(timeout 120 callgrind_control "$arg" "$pid" 2>&1) || die "callgrind_control $arg $pid failed: $out"
    else
        out=$(timeout 120 setpriv --reuid="$user" --regid="$(id -g "$user")" --init-groups \
            callgrind_control "$arg" "$pid" 2>&1) || die "callgrind_control $arg $pid (as $user) failed: $out"
    fi
    printf '%s\n' "$out" >>"$BENCH_WORK/callgrind_control.log"
}

# newest_dump PREFIX: the dump file with the highest number (PREFIX.1, PREFIX.2, ...).
newest_dump() {
    local f
    f=$(find "$(dirname "$1")" -maxdepth 1 -name "$(basename "$1").*" -print | sort -V | tail -n1)
    [[ -n $f ]] || die "no callgrind dump $1.* (log: $BENCH_WORK/callgrind_control.log)"
    echo "$f"
}

# total Ir of a dump: its totals: (or older summary:) line.
dump_total() {
    local n
    n=$(awk '/^(totals|summary):/ {n = $2} END {print n}' "$1")
    [[ $n =~ ^[0-9]+$ ]] || die "no totals: line in $1"
    echo "$n"
}

RESULTS=$BENCH_WORK/results.tsv
: >"$RESULTS"

# measure NAME PID URL DUMP_PREFIX: warm-up, zero, measured run, dump; then IDLE s idle,
# dumped separately. Appends: name total_ir transactions failed wall_s idle_ir dump rc
measure() {
    local name=$1 pid=$2 url=$3 prefix=$4 dir=$BENCH_WORK/runs/$1 rc=0 t0 wall total tx failed
    local dump idle_ir=""
    mkdir -p "$dir"
    log "$name: warm-up, pgbench -n -S -c $CLIENTS -j 1 -t $WARMUP_TX (not measured)"
    pgbench -n -S -c "$CLIENTS" -j 1 -t "$WARMUP_TX" "$url" >"$dir/warmup.out" 2>&1 ||
        { cat "$dir/warmup.out" >&2; die "$name: warm-up pgbench failed"; }
    cg "$pid" -z
    log "$name: measured, pgbench -n -S -c $CLIENTS -j 1 -t $TX"
    t0=$EPOCHREALTIME
    timeout --foreground --kill-after=10 $((600 + TX * CLIENTS / 10)) \
        pgbench -n -S -c "$CLIENTS" -j 1 -t "$TX" "$url" >"$dir/out" 2>&1 || rc=$?
    wall=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.1f", b - a}')
    if ((rc == 130 || rc == 143)); then
        log "interrupted"
        exit "$rc"
    fi
    cg "$pid" -d
    dump=$(newest_dump "$prefix")
    total=$(dump_total "$dump")
    tx=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$dir/out" | head -n1)
    failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$dir/out" | head -n1)
    log "  $total Ir, ${tx:-?} transactions, ${failed:-?} failed, ${wall} s, pgbench exit $rc (dump $dump)"
    if ((IDLE > 0)); then
        cg "$pid" -z
        sleep "$IDLE"
        cg "$pid" -d
        idle_ir=$(dump_total "$(newest_dump "$prefix")")
        log "  idle: $idle_ir Ir in $IDLE s"
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$total" "${tx:-}" "${failed:-}" "$wall" \
        "$idle_ir" "$dump" "$rc" >>"$RESULTS"
}

# --- main ------------------------------------------------------------------------------------
start_demo "$POOL"
PG_VERSION=$(psql -XAtq "$POD_SUPER_URL" -c 'show server_version')
start_pgbouncer

log "pgbench -i -s 1 on the pod (as demo)"
pgbench -i -q -s 1 "$POD_DEMO_URL" >"$BENCH_WORK/init.log" 2>&1 ||
    { cat "$BENCH_WORK/init.log" >&2; die "pgbench -i failed"; }

start_s=$SECONDS
measure PgBouncer "$PGB_PID" "$PGB_URL" "$BENCH_WORK/pgbouncer/pgbouncer.$PGB_PID.cg"
measure podrouter "$DEMO_PID" "$ROUTER_URL" "$BENCH_WORK/podrouter.$DEMO_PID.cg"
kill -0 "$DEMO_PID" 2>/dev/null || die "podrouter demo died during the benchmark (log: $DEMO_LOG)"
RUN_SECONDS=$((SECONDS - start_s))
PR_DUMP=$(awk -F'\t' '$1 == "podrouter" {print $7}' "$RESULTS")
# The function tables below are computed from the dump itself (load() in the report), not
# from callgrind_annotate 3.19, which counts the cost of "calls=0" lines (calls that were
# already running at -z, such as every thread's start routine) as the caller's self cost and
# lists a function once per source file its inlined code came from. Its listings (with
# calls=0 made calls=1, which only changes the call counts it prints) are kept with KEEP_WORK=1
# for digging by source file. Its PROGRAM TOTALS is the dump's summary: line, which can be a
# little lower than totals: (the sum of all the costs in the dump, used here).
sed 's/^calls=0 /calls=1 /' "$PR_DUMP" >"$BENCH_WORK/podrouter.measured.cg"
for incl in yes no; do
    callgrind_annotate --auto=no --threshold=100 --inclusive=$incl "$BENCH_WORK/podrouter.measured.cg" \
        >"$BENCH_WORK/podrouter.annotate.inclusive-$incl.txt" 2>"$BENCH_WORK/annotate.err" ||
        { cat "$BENCH_WORK/annotate.err" >&2; die "callgrind_annotate --inclusive=$incl failed"; }
done
log "measurements took $RUN_SECONDS s"

settings="pgbench -n -S -c $CLIENTS -j 1 -t $TX (select-only, simple protocol, scale 1) through each proxy, \
after an unmeasured warm-up of -t $WARMUP_TX; pool size $POOL, transaction pooling, SCRAM pass-through; \
$VALGRIND_VERSION --tool=callgrind; PostgreSQL $PG_VERSION, PgBouncer $PGB_VERSION, $GIT_REV, \
$(date -u +%Y-%m-%dT%H:%MZ); $(nproc) cores; measurements took $RUN_SECONDS s."
python3 - "$RESULTS" "$PR_DUMP" "$CLIENTS" "$IDLE" "$TOP" "$settings" <<'EOF'
import re, sys
from collections import defaultdict

results, dump = sys.argv[1:3]
CLIENTS, IDLE, TOP = (int(x) for x in sys.argv[3:6])
settings = sys.argv[6]
WIDTH = 110

rows = {}
for line in open(results):
    name, total, tx, failed, wall, idle, _dump, rc = line.rstrip("\n").split("\t")
    rows[name] = dict(total=int(total), tx=int(tx) if tx else None, failed=failed or "?",
                      wall=float(wall), idle=int(idle) if idle else None, rc=int(rc))

def per_tx(r):
    return r["total"] / r["tx"] if r["tx"] else None

def less_idle(r):
    """Ir/txn less the idle rate (Ir/s measured right after) times the run's wall time."""
    if not r["tx"] or r["idle"] is None or IDLE == 0:
        return None
    return (r["total"] - r["idle"] / IDLE * r["wall"]) / r["tx"]

def n(x):
    return "—" if x is None else format(round(x), ",")

def load(path):
    """Self and inclusive Ir per function name, from a callgrind dump (all source files and
    threads of a function merged). Inclusive = self + the cost of its calls to functions of
    another name, so calls between instances of one name are not counted twice."""
    space = {"ob": "ob", "cob": "ob", "fl": "fl", "fi": "fl", "fe": "fl", "cfi": "fl", "cfl": "fl",
             "fn": "fn", "cfn": "fn"}
    names = {"ob": {}, "fl": {}, "fn": {}}
    own, called, obj = defaultdict(int), defaultdict(int), {}
    ob = fn = cfn = None
    in_call, totals = False, None
    for line in open(path):
        c = line[:1]
        if c.isdigit() or c in "+-*":
            parts = line.split()
            ir = int(parts[1]) if len(parts) > 1 else 0
            if in_call:
                if cfn != fn:
                    called[fn] += ir
                in_call = False
            else:
                own[fn] += ir
            continue
        key, eq, val = line.rstrip("\n").partition("=")
        if eq and key in space:
            m = re.match(r"\((\d+)\)(?: (.*))?$", val)
            if m:
                if m.group(2) is not None:
                    names[space[key]][m.group(1)] = m.group(2)
                val = names[space[key]].get(m.group(1), "?")
            if key == "ob":
                ob = val
            elif key == "fn":
                fn = val
                obj.setdefault(fn, ob)
            elif key == "cfn":
                cfn = val
        elif eq and key == "calls":
            in_call = True
        elif line.startswith(("totals:", "summary:")):
            totals = int(line.split()[1])
    incl = {f: own[f] + called[f] for f in set(own) | set(called)}
    return own, incl, obj, totals

print("Settings: " + settings)
print()
print("Ir = user-space instructions executed by the proxy process (all threads), counted from "
      "callgrind_control -z right before the measured run to -d right after it. That includes "
      "the %d client connections' startup and authentication, and the proxy's background work "
      "during the run, which lasts longer under callgrind than natively: the \"less idle\" "
      "column subtracts the idle rate measured for %d s after the run times the run's wall time. "
      "Kernel time (system calls, TCP), Postgres and pgbench are not counted." % (CLIENTS, IDLE))
print()
print("| target | total Ir | transactions | Ir/txn | vs PgBouncer | Ir/txn less idle (est.) | vs PgBouncer | failed tx | pgbench exit | run s under callgrind | idle Ir/s |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
base, base_li = per_tx(rows["PgBouncer"]), less_idle(rows["PgBouncer"])
for name in ("PgBouncer", "podrouter"):
    r = rows[name]
    p, li = per_tx(r), less_idle(r)
    print("| %s | %s | %s | %s | %s | %s | %s | %s | %d | %.1f | %s |" % (
        name, n(r["total"]), r["tx"] or "?", n(p),
        "%.2f×" % (p / base) if p and base else "—", n(li),
        "%.2f×" % (li / base_li) if li and base_li else "—",
        r["failed"], r["rc"], r["wall"], n(r["idle"] / IDLE) if r["idle"] is not None and IDLE else "—"))
print()
pr = per_tx(rows["podrouter"])
if pr and base:
    print("podrouter / PgBouncer: %.2f× the instructions per transaction (%s vs %s Ir/txn)."
          % (pr / base, n(pr), n(base)))
    print()

own, incl, obj, totals = load(dump)
tx, total = rows["podrouter"]["tx"], rows["podrouter"]["total"]
if sum(own.values()) != total:
    print("Warning: the podrouter dump's totals (%s) differ from the sum of its functions' self "
          "costs (%s)." % (n(total), n(sum(own.values()))))
    print()

def show(fn):
    fn = re.sub(r"::h[0-9a-f]{16}\b", "", fn)
    if len(fn) > WIDTH:
        fn = fn[:WIDTH - 1] + "…"
    return fn.replace("`", "'").replace("|", "\\|")

# Thread entry points and the runtime's worker loop include nearly everything: named once.
frames = sorted((f for f, ir in incl.items() if total and ir >= 0.99 * total), key=lambda f: -incl[f])
for costs, title in ((incl, "inclusive"), (own, "self")):
    top = sorted((kv for kv in costs.items() if title == "self" or kv[0] not in frames),
                 key=lambda kv: -kv[1])[:TOP]
    print("podrouter: top %d functions by %s Ir per transaction (%% of podrouter's total):" % (len(top), title))
    print()
    if title == "inclusive" and frames:
        print("Not listed: %d functions with 99%% or more inclusive (thread start and the runtime's "
              "worker loop): %s." % (len(frames), ", ".join("`%s`" % show(f) for f in frames)))
        print()
    print("| Ir/txn | % | function | object |")
    print("|---:|---:|---|---|")
    for fn, ir in top:
        print("| %s | %.1f | `%s` | %s |" % (n(ir / tx) if tx else "—", 100.0 * ir / total if total else 0,
              show(fn), (obj.get(fn) or "?").rsplit("/", 1)[-1]))
    print()
EOF

bad=""
for name in PgBouncer podrouter; do
    read -r failed rc < <(awk -F'\t' -v n="$name" '$1 == n {print ($4 == "" ? "?" : $4), $8}' "$RESULTS")
    [[ $failed == 0 && $rc == 0 ]] || bad+=" $name (failed tx $failed, pgbench exit $rc)"
done
[[ -z $bad ]] || die "measured runs with errors:$bad (outputs in $BENCH_WORK/runs)"
