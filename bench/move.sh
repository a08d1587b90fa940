#!/usr/bin/env bash
# Live moves, measured: MOVES (default 20) moves of tenant1 back and forth between two pods
# while pgbench (tpcb-like, 8 clients) runs against it through the router; reports the pause
# distribution (each job's result.pause_ms), failed client transactions, and the copy
# throughput of one move of a large tenant (tenant2 filled to MOVE_COPY_MB, default 1024).
#
#   cargo build --release && bench/move.sh            # prints a markdown report
#   MOVES=5 MOVE_COPY_MB=200 bench/move.sh            # quicker
#   MOVE_CUTOVER_LAG=65536 bench/move.sh               # [moves] cutover_lag_bytes for the run
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/common.sh
bench_init move
need pgbench "install postgresql-client" curl "install curl"
MOVES=${MOVES:-20}
COPY_MB=${MOVE_COPY_MB:-1024}

DEMO_PODS=2 DEMO_TENANTS=2 start_demo 20
READY=$DEMO_DIR/ready.json
ADMIN=$(json_get "$READY" 'd["admin_url"]')
TOKEN=$(json_get "$READY" 'd["admin_token"]')
ROUTER=$(json_get "$READY" 'd["router_url"]')
if [ -n "${MOVE_CUTOVER_LAG:-}" ]; then
    printf '\n[moves]\ncutover_lag_bytes = %s\n' "$MOVE_CUTOVER_LAG" >>"$DEMO_DIR/pods.toml"
    "$PODROUTER_BIN" --demo-dir "$DEMO_DIR" config reload >/dev/null
    log "moves.cutover_lag_bytes = $MOVE_CUTOVER_LAG"
fi
api() { curl -sS -X "$1" -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' "$ADMIN$2" ${3:+-d "$3"}; }
pod_of() { api GET "/v1/tenants/$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["pod"])'; }
other_pod() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print([p["name"] for p in d["pods"] if p["name"] != sys.argv[2]][0])' "$READY" "$1"; }
# move TENANT: moves it to the other pod; prints the finished job's JSON
move() {
    local t=$1 to id j st i
    to=$(other_pod "$(pod_of "$t")")
    id=$(api POST "/v1/tenants/$t/move" "{\"to\": \"$to\"}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
    for ((i = 0; i < 6000; i++)); do
        j=$(api GET "/v1/jobs/$id")
        st=$(echo "$j" | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])')
        case $st in succeeded | failed | cancelled) echo "$j"; return 0 ;; esac
        sleep 0.2
    done
    die "move job $id did not finish in 20 minutes"
}

log "pgbench -i -s 2 on tenant1 through the router"
pgbench -i -s 2 -q "$ROUTER/tenant1" >"$BENCH_WORK/init.log" 2>&1
# A bounded load that ends by itself, so pgbench prints its report (a signal would lose it;
# and a background job of a script ignores SIGINT anyway). Moves take ~10 s each here.
LOAD_SECS=${LOAD_SECS:-$((MOVES * 15 + 20))}
log "load: pgbench tpcb-like, 8 clients, ${LOAD_SECS}s, while $MOVES moves run"
pgbench -n -c 8 -j 2 -T "$LOAD_SECS" "$ROUTER/tenant1" >"$BENCH_WORK/load.log" 2>&1 &
LOAD=$!
sleep 3
: >"$BENCH_WORK/moves.jsonl"
for ((m = 1; m <= MOVES; m++)); do
    j=$(move tenant1)
    echo "$j" >>"$BENCH_WORK/moves.jsonl"
    log "move $m: $(echo "$j" | python3 -c 'import json,sys; d=json.load(sys.stdin); r=d.get("result") or {}; print(d["state"], r.get("from"), "->", r.get("to"), "pause", r.get("pause_ms"), "ms", (r.get("timings") or {}))')"
    sleep 1
done
log "waiting for the load to end (its report counts failed transactions)"
wait "$LOAD" || true
failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$BENCH_WORK/load.log")
processed=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$BENCH_WORK/load.log")

log "filling tenant2 with ${COPY_MB} MB"
psql -XAtq "$ROUTER/tenant2" -c "create table big (id bigint primary key, body text)" >/dev/null
rows=$((COPY_MB * 1000))
for ((start = 1; start <= rows; start += 200000)); do
    end=$((start + 199999 < rows ? start + 199999 : rows))
    psql -XAtq "$ROUTER/tenant2" -c "insert into big select g, repeat(md5(g::text), 29) from generate_series($start, $end) g" >/dev/null
done
size=$(psql -XAtq "$ROUTER/tenant2" -c "select pg_database_size(current_database())")
log "moving tenant2 ($((size / 1024 / 1024)) MB on disk)"
copyjob=$(move tenant2)

python3 - "$BENCH_WORK/moves.jsonl" "$copyjob" "${failed:-0}" "${processed:-0}" "$size" "$(podrouter_desc)" <<'PY'
import json, sys
moves = [json.loads(l) for l in open(sys.argv[1])]
copy = json.loads(sys.argv[2]); failed, processed, size, desc = sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6]
ok = [m for m in moves if m["state"] == "succeeded"]
pauses = sorted(m["result"]["pause_ms"] for m in ok)
def pct(p):
    if not pauses: return "n/a"
    return pauses[min(len(pauses) - 1, int(round(p / 100 * (len(pauses) - 1))))]
print(f"### Live moves ({desc})\n")
print(f"{len(ok)} of {len(moves)} moves succeeded under pgbench tpcb-like load (8 clients): "
      f"{processed} transactions processed, {failed} failed.\n")
print("| pause p50 | pause p99 | pause max | pauses (ms, sorted) |")
print("|---|---|---|---|")
print(f"| {pct(50)} ms | {pct(99)} ms | {pauses[-1] if pauses else 'n/a'} ms | {' '.join(map(str, pauses))} |\n")
if ok:
    keys = sorted({k for m in ok for k in m["result"].get("timings", {}) if k.startswith("pause_")})
    avg = {k: sum(m["result"]["timings"].get(k, 0) for m in ok) / len(ok) for k in keys}
    print("Mean pause breakdown: " + ", ".join(f"{k[6:-3]} {v:.0f} ms" for k, v in avg.items()) + "\n")
r = copy.get("result") or {}
t = r.get("timings", {})
copy_ms = t.get("copy_ms", 0)
print(f"Copy of a large tenant: state {copy['state']}, {size/1e6:.0f} MB on disk, "
      f"{r.get('bytes', 0)/1e6:.0f} MB of tables, initial copy {copy_ms/1000:.1f} s "
      f"= {(r.get('bytes', 0)/1e6)/(copy_ms/1000) if copy_ms else 0:.1f} MB/s; whole move {r.get('duration_ms', 0)/1000:.1f} s, pause {r.get('pause_ms')} ms.")
PY
