"""asyncpg through podrouter in transaction mode: more clients than server connections, with
asyncpg's statement cache (every query with arguments is a named prepared statement; a
small cache evicts), explicit prepared statements, executemany, transactions, a cursor, COPY, an error inside a
transaction, and asyncpg's own pool (whose connection reset runs UNLISTEN, advisory unlock
and RESET ALL). Exits non-zero with a message on the first wrong result.

    python3 tests/clients/asyncpg_client.py URL [CLIENTS]
"""
import asyncio
import sys

import asyncpg

URL = sys.argv[1]
CLIENTS = int(sys.argv[2]) if len(sys.argv) > 2 else 6
ROUNDS = 40


def check(what, got, want):
    if got != want:
        raise AssertionError(f"{what}: got {got!r}, want {want!r}")


async def client(i):
    c = await asyncpg.connect(URL)
    try:
        for j in range(ROUNDS):
            k = 1 + (i * 7 + j) % 100
            check("kv lookup", await c.fetchval("select v from kv where k = $1", k), f"v{k}")
            check("sum", await c.fetchval("select $1::int + $2::int", i, j), i + j)
            check("row", tuple(await c.fetchrow("select $1::text, $2::int[]", "x", [j, i])), ("x", [j, i]))
        stmt = await c.prepare("select v from kv where k = $1")
        for k in (3, 4, 5):
            check("explicit", await stmt.fetchval(k), f"v{k}")
        check("explicit columns", [a.name for a in stmt.get_attributes()], ["v"])
        await c.executemany("insert into log (client, n) values ($1, $2)", [(i, n) for n in range(20)])
        check("executemany", await c.fetchval("select count(*) from log where client = $1", i), 20)
        for j in range(10):
            async with c.transaction():
                await c.execute("update counters set n = n + 1 where id = $1", i)
                check("in transaction", await c.fetchval("select n from counters where id = $1", i), j + 1)
        async with c.transaction():
            got = [r["k"] async for r in c.cursor("select k from kv where k <= $1 order by k", 30, prefetch=7)]
            check("cursor", got, list(range(1, 31)))
        try:
            async with c.transaction():
                await c.execute("update counters set n = n + 100 where id = $1", i)
                await c.fetchval("select 1 / $1::int", 0)
            raise AssertionError("division by zero was not reported")
        except asyncpg.DivisionByZeroError:
            pass
        check("after rollback", await c.fetchval("select n from counters where id = $1", i), 10)
        n = await c.copy_records_to_table("log", records=[(i, 100 + n) for n in range(50)], columns=["client", "n"])
        check("copy in", n, "COPY 50")
        check("after copy", await c.fetchval("select count(*) from log where client = $1", i), 70)
    finally:
        await c.close()
    # A statement cache smaller than the statements in use: asyncpg closes the ones it
    # evicts (Close messages), in and out of transactions.
    c = await asyncpg.connect(URL, statement_cache_size=2)
    try:
        for j in range(ROUNDS):
            n = j % 5
            check("evicting", await c.fetchval(f"select $1::int * {n + 2}", j), j * (n + 2))
            async with c.transaction():
                check("evicting in transaction", await c.fetchval(f"select $1::int + {n}", j), j + n)
    finally:
        await c.close()


async def pooled(pool, i):
    for j in range(20):
        async with pool.acquire() as c:
            check("pooled", await c.fetchval("select $1::int * 2", i * 100 + j), (i * 100 + j) * 2)


async def main():
    setup = await asyncpg.connect(URL)
    await setup.execute("drop table if exists kv, log, counters")
    await setup.execute("create table kv (k int primary key, v text)")
    await setup.execute("insert into kv select g, 'v' || g from generate_series(1, 100) g")
    await setup.execute("create table log (client int, n int)")
    await setup.execute("create table counters (id int primary key, n int not null default 0)")
    await setup.execute("insert into counters select g, 0 from generate_series(0, $1::int) g", CLIENTS)
    await setup.close()
    results = await asyncio.gather(*(client(i) for i in range(CLIENTS)), return_exceptions=True)
    failures = [f"client {i}: {type(r).__name__}: {r}" for i, r in enumerate(results) if r is not None]
    async with asyncpg.create_pool(URL, min_size=2, max_size=4) as pool:
        results = await asyncio.gather(*(pooled(pool, i) for i in range(CLIENTS)), return_exceptions=True)
        failures += [f"pool user {i}: {type(r).__name__}: {r}" for i, r in enumerate(results) if r is not None]
    if failures:
        sys.exit("asyncpg through podrouter:\n" + "\n".join(failures))
    print(f"asyncpg {asyncpg.__version__}: {CLIENTS} clients ok")


asyncio.run(main())
