"""psycopg 3 through podrouter in transaction mode: more clients than server connections,
each using prepared statements (automatic after `prepare_threshold` runs, and explicit),
pipelines with an error inside, executemany, statement eviction (DEALLOCATE), transactions
and server-side cursors. Exits non-zero with a message on the first wrong result.

    python3 tests/clients/psycopg3.py URL [CLIENTS]
"""
import sys
import threading

import psycopg
from psycopg import errors

URL = sys.argv[1]
CLIENTS = int(sys.argv[2]) if len(sys.argv) > 2 else 6
ROUNDS = 40
failures = []


def check(what, got, want):
    if got != want:
        raise AssertionError(f"{what}: got {got!r}, want {want!r}")


def client(i):
    # prepared_max small: psycopg evicts statements (DEALLOCATE name, sent as a prepared
    # query) while the test runs, between transactions (autocommit) and inside them.
    for autocommit in (True, False):
        with psycopg.connect(URL, prepare_threshold=2, autocommit=autocommit) as c:
            c.prepared_max = 3
            for j in range(ROUNDS):
                k = 1 + (i * 7 + j) % 100
                check("kv lookup", c.execute("select v from kv where k = %s", (k,)).fetchone(), (f"v{k}",))
                check("sum", c.execute("select %s::int + %s::int", (i, j)).fetchone(), (i + j,))
                # A rotating set of texts, prepared at once, pushes statements out of psycopg's
                # cache: one DEALLOCATE per round.
                n = j % 5
                check("rotating", c.execute(f"select %s::int * {n + 2}", (j,), prepare=True).fetchone(), (j * (n + 2),))
                check("explicit", c.execute("select %s::text || '!'", (str(j),), prepare=True).fetchone(), (f"{j}!",))
                if not autocommit and j % 4 == 3:
                    c.commit()
            c.commit()
    with psycopg.connect(URL, autocommit=True) as c:
        check("before pipeline", c.execute("select v from kv where k = %s", (4,), prepare=True).fetchone(), ("v4",))
        # An error inside a pipeline: the statements before it stand, it is reported, the
        # connection and its prepared statements keep working. (The statement after the error
        # is not used again: psycopg 3.1 wrongly believes it was prepared, with or without a
        # router in between.)
        try:
            with c.pipeline():
                c.execute("select %s::int", (1,), prepare=True)
                c.execute("select 1 / %s::int", (0,), prepare=True)
                c.execute("select %s::int - 1", (2,), prepare=True)
            raise AssertionError("division by zero in a pipeline was not reported")
        except errors.DivisionByZero:
            pass
        check("after pipeline error", c.execute("select v from kv where k = %s", (5,), prepare=True).fetchone(), ("v5",))
        check("prepared in the pipeline", c.execute("select %s::int", (3,), prepare=True).fetchone(), (3,))
        # executemany runs in a pipeline of prepared statements.
        with c.cursor() as cur:
            cur.executemany("insert into log (client, n) values (%s, %s)", [(i, n) for n in range(20)])
        check("executemany rows", c.execute("select count(*) from log where client = %s", (i,)).fetchone(), (20,))
    # Evictions inside pipelines: the DEALLOCATEs travel with the queries, and some results
    # are read before the pipeline ends.
    for autocommit in (True, False):
        with psycopg.connect(URL, autocommit=autocommit) as c:
            c.prepared_max = 2
            with c.pipeline():
                curs = []
                for j in range(12):
                    cur = c.cursor()
                    cur.execute(f"select %s::int + {j % 4}", (j,), prepare=True)
                    curs.append((cur, j + j % 4))
                    if j % 3 == 0:
                        check("read inside a pipeline", cur.fetchone(), (j + j % 4,))
            for cur, want in curs:
                if cur.pgresult is not None and cur.rownumber == 0:
                    check("read after a pipeline", cur.fetchone(), (want,))
            check("after evicting pipeline", c.execute("select %s::int * 2", (21,), prepare=True).fetchone(), (42,))
            c.commit()
    # Transactions (psycopg's default) and a server-side cursor inside one.
    with psycopg.connect(URL, prepare_threshold=0) as c:
        for j in range(10):
            with c.transaction():
                c.execute("update counters set n = n + 1 where id = %s", (i,))
                check("in transaction", c.execute("select n from counters where id = %s", (i,)).fetchone(), (j + 1,))
        with c.transaction():
            with c.cursor(name=f"cur{i}") as cur:
                cur.execute("select k from kv where k <= %s order by k", (30,))
                check("named cursor", [r[0] for r in cur.fetchmany(10)] + [r[0] for r in cur.fetchall()], list(range(1, 31)))
        try:
            with c.transaction():
                c.execute("update counters set n = n + 100 where id = %s", (i,))
                c.execute("select %s::int / 0", (i,))
            raise AssertionError("division by zero was not reported")
        except errors.DivisionByZero:
            pass
        check("after rollback", c.execute("select n from counters where id = %s", (i,)).fetchone(), (10,))
        c.commit()


def run(i):
    try:
        client(i)
    except Exception as e:  # reported by the main thread
        failures.append(f"client {i}: {type(e).__name__}: {e}")


with psycopg.connect(URL, autocommit=True) as setup:
    setup.execute("drop table if exists kv, log, counters")
    setup.execute("create table kv (k int primary key, v text)")
    setup.execute("insert into kv select g, 'v' || g from generate_series(1, 100) g")
    setup.execute("create table log (client int, n int)")
    setup.execute("create table counters (id int primary key, n int not null default 0)")
    setup.execute("insert into counters select g, 0 from generate_series(0, %s) g", (CLIENTS,))

threads = [threading.Thread(target=run, args=(i,)) for i in range(CLIENTS)]
for t in threads:
    t.start()
for t in threads:
    t.join()
if failures:
    sys.exit("psycopg 3 through podrouter:\n" + "\n".join(failures))
print(f"psycopg {psycopg.__version__}: {CLIENTS} clients ok")
