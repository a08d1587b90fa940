#!/usr/bin/env python3
"""Opens N idle PostgreSQL client connections (startup + SCRAM-SHA-256 as a password role),
keeps them open, samples a process's RSS before, while and after, then closes them all.

Used by bench/idle_clients.sh; standard library only. Connections come from many loopback
source addresses (127.0.0.2, 127.0.0.3, ...) so ephemeral ports never run out.

Prints one JSON object on stdout; progress on stderr.
"""

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import os
import struct
import subprocess
import sys
import time


def log(msg):
    print("[%s] %s" % (time.strftime("%H:%M:%S"), msg), file=sys.stderr, flush=True)


def proc_status(pid):
    """VmRSS and VmHWM of pid in KiB, and its open file descriptors."""
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads"):
                out[key] = int(value.split()[0])
    try:
        out["fds"] = len(os.listdir("/proc/%d/fd" % pid))
    except OSError:
        out["fds"] = None
    return out


class PgError(Exception):
    pass


def error_fields(body):
    fields = {}
    for part in body.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode(errors="replace")
    return "%s %s %s" % (fields.get("S", "?"), fields.get("C", "?"), fields.get("M", "?"))


async def read_msg(reader):
    head = await reader.readexactly(5)
    kind, length = head[:1], struct.unpack("!I", head[1:])[0]
    body = await reader.readexactly(length - 4)
    return kind, body


NEXT = [0]  # round robin over --database's tenants


SALTED = {}  # (salt, iterations) -> SaltedPassword: one PBKDF2 per run, not per connection


async def connect(args, src):
    reader, writer = await asyncio.open_connection(args.host, args.port, local_addr=(src, 0))
    try:
        dbs = args.database.split(",")
        db = dbs[NEXT[0] % len(dbs)]
        NEXT[0] += 1
        params = b"user\0" + args.user.encode() + b"\0database\0" + db.encode() + b"\0"
        params += b"application_name\0idle_clients\0\0"
        writer.write(struct.pack("!II", 8 + len(params), 196608) + params)
        await writer.drain()
        nonce = base64.b64encode(os.urandom(18)).decode()
        client_first_bare = "n=,r=" + nonce
        client_final_bare = server_first = None
        salted = None
        while True:
            kind, body = await read_msg(reader)
            if kind == b"E":
                raise PgError(error_fields(body))
            if kind == b"R":
                code = struct.unpack("!I", body[:4])[0]
                if code == 0:
                    continue
                if code == 10:  # AuthenticationSASL
                    mechs = body[4:].split(b"\0")
                    if b"SCRAM-SHA-256" not in mechs:
                        raise PgError("server offers no SCRAM-SHA-256: %r" % mechs)
                    first = ("n,," + client_first_bare).encode()
                    payload = b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first
                    writer.write(b"p" + struct.pack("!I", 4 + len(payload)) + payload)
                elif code == 11:  # SASLContinue
                    server_first = body[4:].decode()
                    attrs = dict(kv.split("=", 1) for kv in server_first.split(","))
                    if not attrs["r"].startswith(nonce):
                        raise PgError("server nonce does not extend ours")
                    salt, iters = base64.b64decode(attrs["s"]), int(attrs["i"])
                    salted = SALTED.get((salt, iters))
                    if salted is None:
                        salted = hashlib.pbkdf2_hmac("sha256", args.password.encode(), salt, iters)
                        SALTED[(salt, iters)] = salted
                    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
                    stored_key = hashlib.sha256(client_key).digest()
                    client_final_bare = "c=biws,r=" + attrs["r"]
                    auth_message = ",".join((client_first_bare, server_first, client_final_bare)).encode()
                    signature = hmac.new(stored_key, auth_message, hashlib.sha256).digest()
                    proof = bytes(a ^ b for a, b in zip(client_key, signature))
                    final = (client_final_bare + ",p=" + base64.b64encode(proof).decode()).encode()
                    writer.write(b"p" + struct.pack("!I", 4 + len(final)) + final)
                elif code == 12:  # SASLFinal: check the server's signature
                    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
                    auth_message = ",".join((client_first_bare, server_first, client_final_bare)).encode()
                    expected = base64.b64encode(hmac.new(server_key, auth_message, hashlib.sha256).digest())
                    if body[4:].strip() != b"v=" + expected:
                        raise PgError("server signature does not verify")
                else:
                    raise PgError("unsupported authentication request %d" % code)
                await writer.drain()
            elif kind == b"Z":
                return reader, writer
            # S (ParameterStatus), K (BackendKeyData), N (NoticeResponse): ignore
    except BaseException:
        writer.close()
        raise


async def main(args):
    sources = ["127.0.0.%d" % i for i in range(args.first_source, args.first_source + args.sources)]
    result = {"requested": args.n, "sources": len(sources)}
    result["before"] = proc_status(args.pid)
    log("router pid %d before: VmRSS %d KiB" % (args.pid, result["before"]["VmRSS"]))

    conns, errors = [], {}
    sem = asyncio.Semaphore(args.concurrency)
    deadline = time.monotonic() + args.open_timeout

    async def one(i):
        async with sem:
            if time.monotonic() > deadline:
                raise PgError("open phase deadline passed")
            return await asyncio.wait_for(connect(args, sources[i % len(sources)]), args.connect_timeout)

    started = time.monotonic()
    tasks = [asyncio.ensure_future(one(i)) for i in range(args.n)]
    for done, fut in enumerate(asyncio.as_completed(tasks), 1):
        try:
            conns.append(await fut)
        except Exception as e:  # noqa: BLE001 - report every kind of failure
            msg = "%s: %s" % (type(e).__name__, e)
            errors[msg] = errors.get(msg, 0) + 1
        if done % 1000 == 0:
            log("  %d/%d handshakes finished (%d open)" % (done, args.n, len(conns)))
    result["open_seconds"] = round(time.monotonic() - started, 2)
    result["opened"] = len(conns)
    result["errors"] = errors
    log("opened %d of %d in %.1f s; errors: %s" % (len(conns), args.n, result["open_seconds"], errors or "none"))

    await asyncio.sleep(args.settle)
    result["open"] = proc_status(args.pid)
    log("with %d idle clients: VmRSS %d KiB" % (len(conns), result["open"]["VmRSS"]))
    if args.pod_url:
        names = ",".join("'%s'" % d for d in args.database.split(","))
        q = "select count(*) from pg_stat_activity where datname in (%s) and usename = '%s'" % (names, args.user)
        out = subprocess.run(["psql", "-XAtq", args.pod_url, "-c", q], capture_output=True, text=True, timeout=30)
        result["server_conns_on_pod"] = int(out.stdout.strip()) if out.returncode == 0 else out.stderr.strip()
    if args.probe_url:
        t = time.monotonic()
        out = subprocess.run(["psql", "-XAtq", args.probe_url, "-c", "select 1"], capture_output=True, text=True, timeout=30)
        result["probe_query_ms"] = round((time.monotonic() - t) * 1000, 1)
        result["probe_ok"] = out.returncode == 0 and out.stdout.strip() == "1"
        if not result["probe_ok"]:
            result["probe_error"] = out.stderr.strip()
    # Are the connections still alive after the hold? An idle client gets nothing; EOF means closed.
    await asyncio.sleep(args.hold)
    dropped = sum(1 for r, _ in conns if r.at_eof())
    result["dropped_during_hold"] = dropped
    result["held"] = proc_status(args.pid)
    log("after holding %d s: VmRSS %d KiB, %d connections closed by the router"
        % (args.hold, result["held"]["VmRSS"], dropped))

    for _, w in conns:
        w.write(b"X\0\0\0\4")  # Terminate
        w.close()
    await asyncio.gather(*(w.wait_closed() for _, w in conns), return_exceptions=True)
    await asyncio.sleep(args.settle)
    result["closed"] = proc_status(args.pid)
    log("after closing all: VmRSS %d KiB" % result["closed"]["VmRSS"])
    print(json.dumps(result))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--user", default="demo")
    p.add_argument("--password", default="demo")
    p.add_argument("--database", default="tenant1", help="tenant, or a comma-separated list the clients are spread over")
    p.add_argument("--pid", type=int, required=True, help="process whose RSS is sampled")
    p.add_argument("-n", type=int, default=10000)
    p.add_argument("--sources", type=int, default=49, help="loopback source addresses to use")
    p.add_argument("--first-source", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=200, help="handshakes in flight")
    p.add_argument("--connect-timeout", type=float, default=20)
    p.add_argument("--open-timeout", type=float, default=180, help="deadline for the open phase")
    p.add_argument("--settle", type=float, default=3)
    p.add_argument("--hold", type=float, default=10)
    p.add_argument("--pod-url", help="superuser URL of the pod: count server connections")
    p.add_argument("--probe-url", help="URL for one query through the router while clients are idle")
    a = p.parse_args()
    if not 1 <= a.sources <= 250 or a.first_source + a.sources > 255:
        p.error("--sources/--first-source must stay within 127.0.0.1..254")
    try:
        asyncio.run(main(a))
    except KeyboardInterrupt:
        log("interrupted; closing all connections")
        sys.exit(130)
