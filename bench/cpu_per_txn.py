#!/usr/bin/env python3
"""Where a machine's CPU goes per transaction, for one pgbench run against one target.

Called by bench/cpu.sh (not meant to be run by hand). Runs pgbench once and prints one JSON
line: tps, transactions, and CPU microseconds per transaction spent by the proxy process (user
and system, all threads), by the pod's Postgres processes (live ones plus the backends the
postmaster reaped during the run), by pgbench itself, the rest of the busy time (kernel work
not charged to a process, e.g. softirq, and everything else on the machine), the idle time,
and the proxy's and pgbench's context switches per transaction.

usage: cpu_per_txn.py --postmaster PID [--proxy PID] -- pgbench ARGS...
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

HZ = os.sysconf("SC_CLK_TCK")


def stat_fields(pid):
    """utime, stime, cutime, cstime (clock ticks) of a process, all its threads included."""
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    # The command name may hold spaces and parentheses: fields start after the last ')'.
    rest = text[text.rindex(")") + 2 :].split()
    return [int(x) for x in rest[11:15]]


def children(pid):
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(c) for c in f.read().split())
        except FileNotFoundError:
            pass
    return out


def postgres_ticks(postmaster):
    """CPU ticks of the postmaster, its live children, and the children it has reaped."""
    u, s, cu, cs = stat_fields(postmaster)
    total = u + s + cu + cs
    for child in children(postmaster):
        try:
            child_user, child_sys = stat_fields(child)[:2]
        except (FileNotFoundError, ProcessLookupError):
            continue  # ended since the listing: the postmaster's cutime will hold it
        total += child_user + child_sys
    return total


def proxy_ticks(pid):
    if pid is None:
        return (0, 0)
    u, s = stat_fields(pid)[:2]
    return (u, s)


def proxy_switches(pid):
    """Voluntary and involuntary context switches of all the proxy's threads."""
    if pid is None:
        return (0, 0)
    vol = invol = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        vol += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches:"):
                        invol += int(line.split()[1])
        except FileNotFoundError:
            pass
    return (vol, invol)


def machine_ticks():
    """(busy, idle, steal) ticks summed over all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq, idle + iowait, steal)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--postmaster", type=int, required=True)
    ap.add_argument("--proxy", type=int)
    ap.add_argument("pgbench", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.pgbench[1:] if a.pgbench[:1] == ["--"] else a.pgbench

    pg0, px0, cs0, m0 = postgres_ticks(a.postmaster), proxy_ticks(a.proxy), proxy_switches(a.proxy), machine_ticks()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    time.sleep(0.3)  # let the postmaster reap backends that ended with pgbench's connections
    pg1, px1, cs1, m1 = postgres_ticks(a.postmaster), proxy_ticks(a.proxy), proxy_switches(a.proxy), machine_ticks()

    tps = re.search(r"^tps = ([0-9.]+)", out, re.M)
    txns = re.search(r"^number of transactions actually processed: (\d+)", out, re.M)
    failed = re.search(r"^number of failed transactions: (\d+)", out, re.M)
    code = os.waitstatus_to_exitcode(status)
    if code != 0 or not tps or not txns or int(txns.group(1)) == 0:
        tail = "\n".join(out.strip().splitlines()[-3:])
        print(json.dumps({"error": f"pgbench exited {code}: {tail}"}))
        return 0
    n = int(txns.group(1))
    per = lambda ticks: ticks / HZ * 1e6 / n  # noqa: E731
    busy, idle, steal = (m1[i] - m0[i] for i in range(3))
    proxy_user, proxy_sys = px1[0] - px0[0], px1[1] - px0[1]
    postgres = pg1 - pg0
    pgbench = round((usage.ru_utime + usage.ru_stime) * HZ)
    print(
        json.dumps(
            {
                "tps": float(tps.group(1)),
                "transactions": n,
                "failed": int(failed.group(1)) if failed else 0,
                "proxy_user_us": per(proxy_user),
                "proxy_sys_us": per(proxy_sys),
                "postgres_us": per(postgres),
                "pgbench_us": per(pgbench),
                "rest_us": per(busy - proxy_user - proxy_sys - postgres - pgbench),
                "idle_us": per(idle),
                "steal_us": per(steal),
                "proxy_vcs": (cs1[0] - cs0[0]) / n,
                "proxy_ivcs": (cs1[1] - cs0[1]) / n,
                "pgbench_vcs": usage.ru_nvcsw / n,
                "pgbench_ivcs": usage.ru_nivcsw / n,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
